"""Reports on results: the cross-validation report (``report.cv``) and visual explanations.

Kept free of imports so that ``import rsna_cspine.report.<module>`` pays only for what it uses.
"""

from __future__ import annotations
