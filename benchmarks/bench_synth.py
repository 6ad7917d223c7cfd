"""Phantom generation speed at the demo's settings: seconds per study written in the Kaggle layout.

Writes ``--studies`` studies with the ``synth:`` settings of ``configs/demo.yaml`` (seed 0) in a fresh
process and reports wall and CPU seconds per study (phantom + DICOM + NIfTI), slices per study and the
field-of-view kinds drawn. ``--baseline SRC`` times another copy of the package too (a folder holding
``rsna_cspine/``, e.g. an older commit exported with ``git archive``), alternating the two in
``--rounds`` rounds so load drift on a shared machine hits both::

    .venv/bin/python benchmarks/bench_synth.py --studies 12
    git archive c3dc17a rsna_cspine | tar -x -C /tmp/before
    .venv/bin/python benchmarks/bench_synth.py --studies 12 --baseline /tmp/before --rounds 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import common
import probes


def child(studies: int, config: Path) -> None:
    """Time ``write_dataset`` in this process and emit the figures."""
    import yaml

    from rsna_cspine.synth import SynthConfig, write_dataset

    synth = (yaml.safe_load(config.read_text()) or {}).get("synth", {})
    cfg = SynthConfig(**{**synth, "n_studies": studies, "seed": 0})
    with tempfile.TemporaryDirectory(prefix="bench_synth_") as out:
        wall, cpu = time.perf_counter(), time.process_time()
        table = write_dataset(out, cfg, progress=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    kinds = table["fov"].value_counts().to_dict() if "fov" in table else "n/a"
    probes.emit_result({"wall_s_per_study": wall / studies, "cpu_s_per_study": cpu / studies,
                        "slices_mean": float(table["n_slices"].mean()), "slices_max": int(table["n_slices"].max()),
                        "image_size": cfg.image_size, "fov": kinds})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--config", type=Path, default=common.REPO_ROOT / "configs" / "demo.yaml")
    parser.add_argument("--baseline", type=Path, default=None, help="another source tree to time alongside")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3 studies, 1 round (smoke run)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.studies, args.rounds = 3, 1
    if args.child:
        child(args.studies, args.config)
        return 0

    info = common.machine_info()
    sources = {"current": str(common.REPO_ROOT)}
    if args.baseline is not None:
        sources["baseline"] = str(args.baseline.resolve())
    runs: dict[str, list[dict]] = {name: [] for name in sources}
    for _ in range(args.rounds):
        for name, source in sources.items():
            env = {"PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
            runs[name].append(probes.run_fresh(Path(__file__), ["--child", "--studies", str(args.studies),
                                                                "--config", str(args.config)], env=env))
    rows = []
    for name, results in runs.items():
        best = min(results, key=lambda r: r["wall_s_per_study"])
        rows.append([name, args.studies, common.fmt(best["wall_s_per_study"]), common.fmt(best["cpu_s_per_study"]),
                     f"{best['slices_mean']:.0f} / {best['slices_max']}", best["image_size"], best["fov"]])
    table = common.markdown_table(["code", "studies", "wall s/study (best round)", "CPU s/study",
                                   "slices mean / max", "px", "windows drawn"], rows)
    common.save_results("synth", info, common.command_line(), table, {"runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
