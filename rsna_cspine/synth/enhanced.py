"""A written series of single-frame CT slices → one Enhanced CT file (what current scanners export).

The frames keep the slices' stored values; each frame's ImagePositionPatient goes to its Plane Position
functional group, the orientation and pixel spacing to the shared groups, and the rescale to the shared
Pixel Value Transformation group when every slice has the same one, else to each frame's own. The
slices are read with pydicom alone, so a loader test can compare the file with the folder it came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

#: Enhanced CT Image Storage.
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _group(keyword: str, **values: object) -> Dataset:
    """A functional-group item holding one macro sequence with one item."""
    group = Dataset()
    setattr(group, keyword, DicomSequence([_item(**values)]))
    return group


def write_enhanced_ct(
    folder: str | Path,
    out_path: str | Path,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    frame_order: Sequence[int] | None = None,
) -> Path:
    """Write the single-frame slices of ``folder`` as one multi-frame Enhanced CT file.

    Args:
        folder: a series folder (e.g. ``train_images/<UID>`` written by ``synth.writer``), one slice per
            file, all of one matrix size, orientation and pixel spacing.
        out_path: the file to write.
        transfer_syntax: uncompressed, or a syntax pydicom encodes (RLE Lossless, JPEG 2000 Lossless).
        frame_order: the slices (indices into the folder's files sorted by name) in frame order;
            default the files' order.

    Returns:
        ``out_path``.
    """
    paths = sorted((p for p in Path(folder).iterdir() if p.is_file()),
                   key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0, p.name))
    slices = [pydicom.dcmread(p) for p in paths]
    if frame_order is not None:
        slices = [slices[i] for i in frame_order]
    first = slices[0]
    stored = np.stack([s.pixel_array for s in slices])
    if stored.dtype.kind == "u" and stored.max() > np.iinfo(np.int16).max:
        raise ValueError(f"{folder}: stored values above 32767 do not fit one signed frame type")
    stored = stored.astype(np.int16 if any(int(s.PixelRepresentation) == 1 for s in slices) else np.uint16)
    rescales = {(float(s.get("RescaleSlope", 1.0)), float(s.get("RescaleIntercept", 0.0))) for s in slices}

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENHANCED_CT_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = ENHANCED_CT_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "PatientID", "FrameOfReferenceUID"):
        if keyword in first:
            setattr(ds, keyword, first.get(keyword))
    ds.InstanceNumber = 1
    shared = _group("PlaneOrientationSequence", ImageOrientationPatient=list(first.ImageOrientationPatient))
    measures = {"PixelSpacing": list(first.PixelSpacing)}
    if "SliceThickness" in first:
        measures["SliceThickness"] = first.SliceThickness
    shared.PixelMeasuresSequence = DicomSequence([_item(**measures)])
    if len(rescales) == 1:
        slope, intercept = rescales.pop()
        shared.PixelValueTransformationSequence = DicomSequence(
            [_item(RescaleSlope=slope, RescaleIntercept=intercept, RescaleType="HU")])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for k, s in enumerate(slices):
        frame = _group("PlanePositionSequence", ImagePositionPatient=list(s.ImagePositionPatient))
        frame.FrameContentSequence = DicomSequence([_item(InStackPositionNumber=k + 1)])
        if "PixelValueTransformationSequence" not in shared:
            frame.PixelValueTransformationSequence = DicomSequence([_item(
                RescaleSlope=float(s.get("RescaleSlope", 1.0)), RescaleIntercept=float(s.get("RescaleIntercept", 0.0)),
                RescaleType="HU")])
        per_frame.append(frame)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.set_pixel_data(stored, photometric_interpretation="MONOCHROME2", bits_stored=16, generate_instance_uid=False)
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out_path, enforce_file_format=True)
    return out_path
