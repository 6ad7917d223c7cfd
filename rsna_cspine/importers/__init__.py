"""Public spine data sets (VerSe, TotalSegmentator, CTSpine1K) → stage-1 training data in the RSNA layout.

* :mod:`~rsna_cspine.importers.tables`: each data set's vertebra label ids → C1–C7 (sources cited there);
* :mod:`~rsna_cspine.importers.cases`: where each data set keeps a case's image and labels;
* :mod:`~rsna_cspine.importers.run`: :func:`import_labels`, the ``rsna-cspine import-labels`` job.
"""

from rsna_cspine.importers.cases import Case, find_cases
from rsna_cspine.importers.run import REPORT_COLUMNS, import_case, import_labels
from rsna_cspine.importers.tables import CERVICAL_IDS, FORMATS, TS_VERSIONS, cervical_lookup

__all__ = [
    "CERVICAL_IDS",
    "FORMATS",
    "REPORT_COLUMNS",
    "TS_VERSIONS",
    "Case",
    "cervical_lookup",
    "find_cases",
    "import_case",
    "import_labels",
]
