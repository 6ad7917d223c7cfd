"""Write a phantom as an RSNA-style DICOM series and its segmentation as an RSNA-style NIfTI.

DICOM: one CT Image Storage file per slice, ``<n>.dcm`` with ``n`` = InstanceNumber, axial
orientation, ImagePositionPatient z decreasing from superior to inferior. Series vary the way the
real data do: compressed or not (RLE, JPEG 2000 lossless, JPEG-LS lossless, JPEG Lossless .70 through
GDCM — whichever encoders are installed), signed or unsigned pixels, 12 or 16 stored bits, per-slice
RescaleIntercept, and file numbers running superior→inferior, inferior→superior or shuffled.

NIfTI: stored sagittal-first like the RSNA files, i.e. ``stack.transpose(2, 1, 0)[:, ::-1, ::-1]``
of the axial stack in instance order (so the public recipe
``get_fdata()[:, ::-1, ::-1].transpose(2, 1, 0)`` recovers it), with the true RAS affine of that
storage so that any affine-aware loader aligns it too.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from rsna_cspine.errors import DicomSeriesError, NiftiError
from rsna_cspine.synth.config import SynthConfig
from rsna_cspine.synth.phantom import HU_RANGE, Phantom
from rsna_cspine.synth.slice_files import SliceFileWriter

log = logging.getLogger(__name__)
# pylibjpeg-openjpeg logs one INFO line per encoded frame, which floods any INFO-level log.
logging.getLogger("openjpeg").setLevel(logging.WARNING)

#: RSNA's UID root; every synthetic UID is this prefix followed by digits.
UID_PREFIX = "1.2.826.0.1.3680043."
#: Lossless codecs by short name.
CODECS: dict[str, str] = {
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
    "jpeg_lossless": JPEGLosslessSV1,
}
#: Fixed date/time: files must be byte-identical for a seed, so nothing reads the clock.
STUDY_DATE, STUDY_TIME = "20220101", "120000"


@dataclass(frozen=True)
class SeriesStorage:
    """How one phantom is stored on disk.

    Attributes:
        codec: key of ``CODECS`` or ``"none"``.
        transfer_syntax: Transfer Syntax UID.
        pixel_representation: 0 unsigned, 1 signed.
        bits_stored: 12 or 16.
        intercepts: RescaleIntercept per phantom slice (z order).
        file_numbers: file/instance number per phantom slice (z order).
        numbering: ``"natural"`` (1 = most superior), ``"reversed"`` or ``"shuffled"``.
        origin: LPS mm of voxel ``(0, 0, 0)`` (top-left pixel of the most superior slice).
        window: ``(centre, width)``, each a float or a list of floats.
    """

    codec: str
    transfer_syntax: str
    pixel_representation: int
    bits_stored: int
    intercepts: tuple[float, ...]
    file_numbers: tuple[int, ...]
    numbering: str
    origin: tuple[float, float, float]
    window: tuple

    @property
    def mixed_rescale(self) -> bool:
        return len(set(self.intercepts)) > 1


@lru_cache(maxsize=1)
def available_codecs() -> tuple[str, ...]:
    """Lossless codecs whose encoder works here, checked at run time by a round trip."""
    found = []
    probe = (np.arange(64 * 64, dtype=np.int32).reshape(64, 64) % 3000 - 1000).astype(np.int16)
    for name in CODECS:
        try:
            _encode_frame(probe, name, bits_stored=16)
            found.append(name)
        except Exception as exc:  # any missing plugin or failing encoder just removes that codec
            log.debug("codec %s unavailable: %s", name, exc)
    return tuple(found)


def plan_storage(phantom: Phantom, rng: np.random.Generator, cfg: SynthConfig,
                 codecs: tuple[str, ...] | None = None) -> SeriesStorage:
    """Draw how a study is stored (codec, pixel format, numbering, position).

    Args:
        phantom: the study.
        rng: the study's storage stream (consumed a fixed number of times).
        cfg: storage shares.
        codecs: codecs to choose from (default: ``available_codecs()``).

    Returns:
        The storage plan.
    """
    codecs = available_codecs() if codecs is None else codecs
    nz = phantom.hu.shape[0]
    compressed = rng.random() < cfg.compressed_fraction
    codec_pick = int(rng.integers(0, 1 << 30))
    implicit = rng.random() < cfg.implicit_vr_fraction
    signed = rng.random() < cfg.signed_fraction
    mixed = rng.random() < cfg.mixed_rescale_fraction
    twelve_bits = rng.random() < 0.5
    signed_intercept = -1024.0 if rng.random() < 0.5 else 0.0
    order_draw = rng.random()
    permutation = rng.permutation(nz)
    origin = (round(-phantom.hu.shape[2] * phantom.spacing[2] / 2 + rng.uniform(-15, 15), 3),
              round(-phantom.hu.shape[1] * phantom.spacing[1] / 2 + rng.uniform(-30, 10), 3),
              round(rng.uniform(-80.0, 120.0), 1))
    window = [(400.0, 1800.0), (500.0, 2000.0), ([40.0, 400.0], [400.0, 2000.0])][int(rng.integers(3))]

    if compressed and codecs:
        codec = codecs[codec_pick % len(codecs)]
        syntax = CODECS[codec]
    else:
        codec = "none"
        syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    low = int(phantom.hu.min())
    signed = signed or mixed  # per-slice intercepts are written as signed data
    if signed:
        representation, bits = 1, 16
        intercepts = [signed_intercept] * nz
        if mixed:
            intercepts = [(-1024.0, 0.0)[z % 2] for z in range(nz)]
    else:
        representation = 0
        intercept = -1024.0 if low >= HU_RANGE[0] else -2048.0  # room for −2048 padding
        top = int(phantom.hu.max()) - intercept
        bits = 12 if twelve_bits and top < 4096 else 16
        intercepts = [intercept] * nz
    if order_draw < cfg.shuffled_fraction:
        numbering, numbers = "shuffled", permutation + 1
    elif order_draw < cfg.shuffled_fraction + cfg.reversed_fraction:
        numbering, numbers = "reversed", np.arange(nz, 0, -1)
    else:
        numbering, numbers = "natural", np.arange(1, nz + 1)
    return SeriesStorage(codec=codec, transfer_syntax=str(syntax), pixel_representation=representation,
                         bits_stored=bits, intercepts=tuple(intercepts),
                         file_numbers=tuple(int(n) for n in numbers), numbering=numbering,
                         origin=origin, window=window)


def slice_positions(phantom: Phantom, storage: SeriesStorage) -> np.ndarray:
    """``(z, 3)`` ImagePositionPatient (LPS mm) of each phantom slice; z falls towards the feet."""
    dz = phantom.spacing[0]
    x0, y0, z0 = storage.origin
    nz = phantom.hu.shape[0]
    return np.array([[x0, y0, round(z0 - k * dz, 3)] for k in range(nz)])


def make_uid(*entropy: object) -> str:
    """Deterministic UID ``1.2.826.0.1.3680043.<digits>`` from the given entropy values."""
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=["rsna_cspine.synth", *map(str, entropy)]))


def write_dicom_series(phantom: Phantom, folder: str | Path, study_uid: str,
                       storage: SeriesStorage) -> list[Path]:
    """Write one ``<n>.dcm`` per slice of ``phantom`` into ``folder``.

    Args:
        phantom: the study.
        folder: output folder (created).
        study_uid: StudyInstanceUID (also PatientID, as in the RSNA data).
        storage: how to store it.

    Returns:
        The written paths in phantom z order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = make_uid(study_uid, "series")
    frame_uid = make_uid(study_uid, "frame")
    positions = slice_positions(phantom, storage)
    dtype = np.int16 if storage.pixel_representation else np.uint16
    paths = []
    # One dataset per series, updated slice by slice: building ~50 elements per file dominated the time.
    ds = _series_dataset(phantom, storage, study_uid, series_uid, frame_uid)
    files = SliceFileWriter()  # the shared header encoded once: save_as per slice was most of the time
    info = np.iinfo(dtype)
    limit = info.max if storage.pixel_representation else (1 << storage.bits_stored) - 1
    with tempfile.TemporaryDirectory(prefix="rsna_cspine_synth_") as scratch:
        for z in range(phantom.hu.shape[0]):
            number = storage.file_numbers[z]
            intercept = storage.intercepts[z]
            raw = phantom.hu[z].astype(np.int32) - int(intercept)
            if raw.min() < info.min or raw.max() > limit:
                raise DicomSeriesError(f"slice {z} does not fit {storage.bits_stored}-bit "
                                       f"{'signed' if storage.pixel_representation else 'unsigned'} pixels",
                                       folder)
            raw = raw.astype(dtype)
            sop_uid = make_uid(study_uid, "sop", number)
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = int(number)
            ds.ImagePositionPatient = [_ds(v) for v in positions[z]]
            ds.SliceLocation = _ds(positions[z][2])
            ds.RescaleIntercept = _ds(intercept)
            if storage.codec == "none":
                ds.file_meta.TransferSyntaxUID = storage.transfer_syntax
                ds.PixelData = raw.tobytes()
            elif storage.codec == "jpeg_lossless":
                ds.file_meta.TransferSyntaxUID = storage.transfer_syntax
                ds.PixelData = encapsulate([_gdcm_jpeg_lossless(raw, storage.bits_stored, scratch)])
                ds["PixelData"].VR = "OB"
                ds["PixelData"].is_undefined_length = True
            else:
                ds.compress(storage.transfer_syntax, raw, generate_instance_uid=False)
            path = folder / f"{number}.dcm"
            files.write(ds, path)
            paths.append(path)
    return paths


def _ds(value: float) -> str:
    # DS text is limited to 16 characters; the geometry is pre-rounded so this is exact.
    return str(round(float(value), 6))


def _series_dataset(phantom: Phantom, storage: SeriesStorage, study_uid: str, series_uid: str,
                    frame_uid: str) -> Dataset:
    """Header shared by every slice of a series (per-slice elements are set by the caller)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = series_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = series_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = STUDY_TIME
    ds.Modality = "CT"
    ds.Manufacturer = "rsna_cspine synthetic phantom"
    ds.PatientName = ""
    ds.PatientID = study_uid
    ds.BodyPartExamined = "CSPINE"
    ds.SliceThickness = _ds(phantom.spacing[0])
    ds.KVP = "120"
    ds.ConvolutionKernel = "BONE"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = ["0", "0", "0"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = "0"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in phantom.hu.shape[1:])
    ds.PixelSpacing = [_ds(phantom.spacing[1]), _ds(phantom.spacing[2])]
    ds.BitsAllocated = 16
    ds.BitsStored = storage.bits_stored
    ds.HighBit = storage.bits_stored - 1
    ds.PixelRepresentation = storage.pixel_representation
    centre, width = storage.window
    ds.WindowCenter = [_ds(c) for c in centre] if isinstance(centre, list) else _ds(centre)
    ds.WindowWidth = [_ds(w) for w in width] if isinstance(width, list) else _ds(width)
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _encode_frame(raw: np.ndarray, codec: str, bits_stored: int) -> bytes:
    """Encode one frame (used to probe encoder availability)."""
    if codec == "jpeg_lossless":
        with tempfile.TemporaryDirectory(prefix="rsna_cspine_synth_") as scratch:
            return _gdcm_jpeg_lossless(raw, bits_stored, scratch)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(raw.dtype == np.int16)
    ds.compress(CODECS[codec], raw, generate_instance_uid=False)
    decoded = ds.pixel_array
    if not np.array_equal(decoded, raw):
        raise ValueError(f"{codec} round trip is not lossless")
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _gdcm_jpeg_lossless(raw: np.ndarray, bits_stored: int, scratch: str) -> bytes:
    """JPEG Lossless (process 14, SV1) codestream of one frame, encoded by GDCM.

    pydicom has no encoder for this transfer syntax (the most common compressed one in RSNA), so the
    frame goes through GDCM via a scratch file; only the codestream is kept, the file GDCM writes
    (which stamps the current time) is discarded.
    """
    import gdcm  # optional at import time: only this codec needs it

    source = Path(scratch) / "in.dcm"
    target = Path(scratch) / "out.dcm"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID_PREFIX + "1"
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, UID_PREFIX + "1"
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(raw.dtype == np.int16)
    ds.PixelData = raw.tobytes()
    ds.save_as(source, enforce_file_format=True)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    if not reader.Read():
        raise DicomSeriesError("GDCM cannot read its scratch input", source)
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise DicomSeriesError("GDCM JPEG Lossless encoding failed", source)
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise DicomSeriesError("GDCM cannot write its scratch output", target)
    return next(generate_frames(pydicom.dcmread(target).PixelData, number_of_frames=1))


def segmentation_stack(phantom: Phantom, storage: SeriesStorage) -> tuple[np.ndarray, np.ndarray]:
    """Labels as an axial stack in instance order, and the LPS affine of that stack's indices.

    Shuffled numbering has no spatially monotonic instance order, so those studies use the natural
    superior→inferior order (the affine stays exact either way).

    Returns:
        ``(stack, affine)``: ``(n, rows, cols)`` uint8 and the 4×4 map ``(i, row, col, 1)`` → LPS.
    """
    dz, dy, dx = phantom.spacing
    positions = slice_positions(phantom, storage)
    reverse = storage.numbering == "reversed"
    stack = phantom.labels[::-1] if reverse else phantom.labels
    first = positions[-1] if reverse else positions[0]
    affine = np.eye(4)
    affine[:3, 0] = (0.0, 0.0, dz if reverse else -dz)
    affine[:3, 1] = (0.0, dy, 0.0)
    affine[:3, 2] = (dx, 0.0, 0.0)
    affine[:3, 3] = first
    return stack, affine


def segmentation_affine(phantom: Phantom, storage: SeriesStorage) -> np.ndarray:
    """RAS affine of the stored (sagittal-first) NIfTI array written by ``write_segmentation``."""
    stack, stack_affine = segmentation_stack(phantom, storage)
    n, rows, _ = stack.shape
    # stored[a, b, c] = stack[n-1-c, rows-1-b, a]
    to_stack = np.array([[0, 0, -1, n - 1], [0, -1, 0, rows - 1], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    return lps_to_ras @ stack_affine @ to_stack


def write_segmentation(phantom: Phantom, path: str | Path, storage: SeriesStorage) -> Path:
    """Write ``phantom.labels`` as an uncompressed RSNA-style ``.nii``.

    Args:
        phantom: the study.
        path: output file (``<UID>.nii``).
        storage: the study's DICOM storage (its geometry and numbering define the stored order).

    Returns:
        The path written.
    """
    path = Path(path)
    if path.suffix != ".nii":
        raise NiftiError("segmentations are written uncompressed as .nii, like RSNA's", path)
    stack, _ = segmentation_stack(phantom, storage)
    stored = np.ascontiguousarray(stack.transpose(2, 1, 0)[:, ::-1, ::-1]).astype(np.uint8)
    affine = segmentation_affine(phantom, storage)
    image = nib.Nifti1Image(stored, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path
