"""The bytes of a series' slice files, with the header the slices share encoded once.

pydicom's ``save_as`` encodes all ~45 header elements and copies and validates the file meta again for
every file. For a synthetic series only six elements change from slice to slice, and ``save_as`` was
most of a study's generation time (eight 128 px studies, profiled: 8.9 of 17.6 s in ``save_as``). This
writer keeps pydicom's element encoding (``write_data_element``, ``write_file_meta_info``) and only
skips re-encoding what did not change; the files are byte for byte what ``save_as`` writes for the
same dataset (tests/test_synth.py reads every file back and compares).
"""

from __future__ import annotations

from pathlib import Path

from pydicom.charset import default_encoding
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import UID, ImplicitVRLittleEndian

#: The elements a slice writer sets per file (``synth.writer.write_dicom_series``).
PER_SLICE_TAGS = frozenset(Tag(name) for name in ("SOPInstanceUID", "InstanceNumber", "ImagePositionPatient",
                                                  "SliceLocation", "RescaleIntercept", "PixelData"))
_PREAMBLE = b"\x00" * 128 + b"DICM"


class SliceFileWriter:
    """Writes the files of one series whose datasets differ only in :data:`PER_SLICE_TAGS`.

    The shared elements are encoded from the dataset as it is at the first :meth:`write` (after its pixel
    data was set, which may change the transfer syntax); a later change to them is not seen.
    """

    def __init__(self) -> None:
        self._parts: list[bytes | Tag] = []
        self._implicit = False
        self._encoding: str | list[str] = default_encoding

    def _buffer(self) -> DicomBytesIO:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, self._implicit
        return fp

    def _encode_shared(self, ds: Dataset) -> None:
        self._implicit = UID(ds.file_meta.TransferSyntaxUID) == ImplicitVRLittleEndian
        self._encoding = ds.get("SpecificCharacterSet", default_encoding)
        run = self._buffer()
        for tag in sorted(ds.keys()):
            if tag.element == 0 and tag.group > 6:  # retired group lengths: save_as skips them too
                continue
            if tag in PER_SLICE_TAGS:
                self._parts += [run.getvalue(), tag]
                run = self._buffer()
            else:
                write_data_element(run, correct_ambiguous_vr_element(ds[tag], ds, True), self._encoding)
        self._parts.append(run.getvalue())

    def write(self, ds: Dataset, path: str | Path) -> None:
        """Write ``ds`` as a DICOM file (preamble, file meta, then the dataset) to ``path``.

        Args:
            ds: the slice's dataset, with ``file_meta`` (its MediaStorageSOPInstanceUID set by the caller).
            path: the file (overwritten).
        """
        if not self._parts:
            self._encode_shared(ds)
        syntax = UID(ds.file_meta.TransferSyntaxUID)
        if "PixelData" in ds:  # PS3.5 A.4, as save_as: encapsulated pixel data has undefined length
            ds["PixelData"].is_undefined_length = syntax.is_compressed
        meta = DicomBytesIO()
        meta.is_little_endian, meta.is_implicit_VR = True, False
        write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
        out = self._buffer()
        for part in self._parts:
            if isinstance(part, bytes):
                out.write(part)
            elif part in ds:
                write_data_element(out, correct_ambiguous_vr_element(ds[part], ds, True), self._encoding)
        Path(path).write_bytes(_PREAMBLE + meta.getvalue() + out.getvalue())
