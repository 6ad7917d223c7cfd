"""Overview pictures of synthetic studies, one per field-of-view kind (``head``, ``neck``, ``slab``).

Each picture (``rsna_cspine.synth.overview``) shows a mid-sagittal and a coronal reformat with the
vertebra labels tinted, and axial slices at the skull base, C2, C5 and T1 (a slab: four slices
through it). The ``head`` study is drawn with the wide in-plane field of view, down to T3 and with dental
metal, so the shoulders, arms and streaks show; the ``slab`` is the first seed from ``--seed`` whose
slices cross the skull base (brain in its last slice, no vertebra in view), like the partial series in
``rsna_partial``. Writes ``synth_overview_<kind>.png`` (< 300 KB each)::

    .venv/bin/python benchmarks/synth_overview.py --out-dir benchmarks/results --seed 3
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="in-plane matrix")
    parser.add_argument("--quick", action="store_true", help="128 px (smoke run)")
    args = parser.parse_args(argv)

    from rsna_cspine.synth import SynthConfig, make_phantom
    from rsna_cspine.synth.overview import overview_figure
    from rsna_cspine.synth.skeleton import HEAD_HEIGHT_MM
    from rsna_cspine.synth.tissues import Tissue

    cfg = SynthConfig(image_size=128 if args.quick else args.size, thick_slice_fraction=0.0)
    jobs = {"head": replace(cfg, wide_fov_fraction=1.0, arms_fraction=1.0, dental_metal_fraction=1.0,
                            thoracic_vertebrae=(3, 3)),
            "neck": cfg, "slab": replace(cfg, slab_slices=(10, 10))}
    for kind, kind_cfg in jobs.items():
        seed = args.seed
        phantom = make_phantom(kind_cfg, np.random.default_rng(seed), fov=kind)
        while kind == "slab" and not (phantom.scan_top_mm > HEAD_HEIGHT_MM - 35.0 and not phantom.labels.any()
                                      and (phantom.tissue[-1] == Tissue.GREY_MATTER).any()):
            seed += 1  # a slab through the skull base (brain, no vertebra), like the partial RSNA series
            phantom = make_phantom(kind_cfg, np.random.default_rng(seed), fov=kind)
        path = overview_figure(phantom, args.out_dir / f"synth_overview_{kind}.png", title=f"seed {seed}")
        print(f"{path}: {phantom.hu.shape[0]} slices, {path.stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
