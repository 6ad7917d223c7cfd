"""One folder of axial CT DICOM files → a :class:`~rsna_cspine.io.volume.Volume` in Hounsfield units.

Two passes, and no file is parsed twice. The header pass parses each header with the pixel data
deferred (pydicom records where the pixel bytes start and skips them), picks the series, drops what
cannot be placed and sorts the slices along the slice normal, superior first. The pixel pass reads
each slice's pixel bytes at that file offset and writes them, rescaled per slice, straight into their
row of one preallocated float32 array: uncompressed 16-bit slices with numpy, compressed frames
through pydicom's decoders (GDCM, pylibjpeg, ...) with a fallback to the next plugin when one fails.

Larger folders are read by forked worker processes, in chunks of files: pydicom's parser and the
decoders (pylibjpeg-libjpeg, -openjpeg, GDCM) all hold the GIL, so threads would not run in parallel.
The header pass goes to the workers from 64 files on; the pixel pass from 8 compressed slices on,
each decoded slice coming back through its worker's pipe straight into its row of the output (no
pixel array is pickled). Uncompressed slices are read in this process: reading one costs less than
sending it back from a worker.

Every repair (skipped file, dropped slice, gap, decoder fallback, ...) is written to
``Volume.warnings`` and logged; anything that would leave a wrong volume raises
:class:`~rsna_cspine.errors.DicomSeriesError` naming the folder or file and the cause.

Modules, in the order a load runs them:

* :mod:`~rsna_cspine.io.dicom.pool`: the forked worker processes and their raw-array replies;
* :mod:`~rsna_cspine.io.dicom.headers`: the header pass (:class:`SliceHeader`);
* :mod:`~rsna_cspine.io.dicom.series`: :func:`load_series` and the series plan (which slices, in
  which order), the seam where another way to assemble a series (Enhanced CT) plugs in;
* :mod:`~rsna_cspine.io.dicom.decode`: the pixel pass and the decoder plugin order;
* :mod:`~rsna_cspine.io.dicom.geometry`: slice step, gaps, tilt, numbering → the Volume.
"""

from rsna_cspine.io.dicom.decode import DEFAULT_DECODING_PLUGINS, WORKER_DECODING_PLUGINS, read_slice_hu
from rsna_cspine.io.dicom.headers import SliceHeader, read_slice_header
from rsna_cspine.io.dicom.series import SeriesPlan, load_series

__all__ = [
    "DEFAULT_DECODING_PLUGINS",
    "WORKER_DECODING_PLUGINS",
    "SeriesPlan",
    "SliceHeader",
    "load_series",
    "read_slice_header",
    "read_slice_hu",
]
