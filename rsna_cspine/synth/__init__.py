"""Synthetic head-and-neck CT phantoms with C1–C7 fractures, written in the exact Kaggle RSNA 2022 layout.

No real RSNA images exist here: every stage is trained and judged on these phantoms. Each phantom is a
patient from the vertex to T4 (skull, brain, face and teeth, neck, shoulders, lung apices) seen
through a scan window (``fov``: head-to-chest, skull-base-to-T1–T4, or a few slices). The public API:
``SynthConfig`` (every knob), ``Phantom`` / ``make_phantom`` (one study in memory, with its tissue
map) and ``write_dataset`` (DICOM series, NIfTI segmentations and the competition CSVs on disk).
"""

from __future__ import annotations

from rsna_cspine.synth.config import SynthConfig, load_config
from rsna_cspine.synth.dataset import write_dataset
from rsna_cspine.synth.labels import sample_fracture_labels
from rsna_cspine.synth.phantom import Phantom, make_phantom

__all__ = ["Phantom", "SynthConfig", "load_config", "make_phantom", "sample_fracture_labels", "write_dataset"]
