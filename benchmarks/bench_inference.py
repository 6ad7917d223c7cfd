"""Per-study inference time and peak memory of the full pipeline, split by stage.

One synthetic study (default 500 slices of 512², uncompressed; ``--codecs`` adds compressed copies of
the same pixels) goes through ``rsna_cspine.inference.FracturePipeline.predict_study``: load the DICOM
series → stage-1 UNet → per-vertebra crops → stage-2 classifier → patient_overall. The models are the
default stage configs (``configs/seg.yaml``: 128³ MONAI UNet; ``configs/cls_resnet50.yaml``: resnet50 +
GRU, 15 slices × 5 channels × 224 px), one fold each, randomly initialised and saved as checkpoints:
untrained weights cost the same arithmetic as trained ones.

Each measurement runs in a fresh process: it loads the models, predicts the study ``--warmup`` times
(the first call pays one-off costs: allocator growth, oneDNN/cuDNN kernel selection), then
``--repeats`` timed times; medians are reported. Memory: the process's exact peak RSS (kernel
high-water mark, reset before each timed study) and, per stage, the largest RSS sampled every 5 ms
inside that stage's time window. Compressed series are decoded in a pool of forked worker
processes: their memory is sampled as USS (what they add; their RSS would recount pages shared with
the parent) and the memory figure checked against the target is the larger of the process's exact
peak and the largest process RSS + workers' USS seen at one sampling tick.

Targets: ≤ 20 s per study on 2 CPU cores (Kaggle allows 21.6 s), ≤ 4 GiB peak; on GPU with AMP ≤ 3 s.

    .venv/bin/python benchmarks/bench_inference.py                      # CPU, all cores
    .venv/bin/python benchmarks/bench_inference.py --device cuda --amp   # GPU machine
    .venv/bin/python benchmarks/bench_inference.py --quick               # smoke run (64 slices, 1 run)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import common
import probes

STAGES = ("load", "segment", "crop", "classify")
CPU_TARGET_S = 20.0
GPU_TARGET_S = 3.0
PEAK_TARGET_MIB = 4 * 1024.0


# ----------------------------------------------------------------------------------------------
# The measurement (runs in a fresh process)
# ----------------------------------------------------------------------------------------------


def measure_in_process(
    study: Path, models: Path, device: str, threads: int, amp: bool, warmup: int, repeats: int, cpu_bf16: bool = False
) -> dict[str, Any]:
    """Load the pipeline and time ``warmup + repeats`` predictions of one study, with memory per stage.

    Args:
        study: DICOM folder.
        models: models folder (``seg/``, ``cls/``).
        device: ``cpu`` or ``cuda[:k]``.
        threads: torch intra-op threads.
        amp: mixed precision on GPU (the project's autocast is a no-op on CPU).
        warmup: untimed first predictions.
        repeats: timed predictions.
        cpu_bf16: stage 2 under bfloat16 autocast on CPU (where the CPU has native bf16).
    """
    import torch

    torch.set_num_threads(threads)
    from rsna_cspine.inference import FracturePipeline, PipelineConfig

    cuda = device.startswith("cuda")
    tick = time.perf_counter()
    pipeline = FracturePipeline.from_models_dir(models, PipelineConfig(device=device, cpu_bf16=cpu_bf16))
    # FracturePipeline has no AMP switch of its own: the segmenter takes load_segmenter's default and the
    # classifiers their checkpoint's ``amp``; set both to what this run asks for.
    pipeline.segmenter("full").amp = amp
    pipeline.classifiers("full").amp = amp
    if cuda:
        torch.cuda.synchronize()
    model_load_s = time.perf_counter() - tick
    rss_after_models = probes.peak_rss_mib()

    cold: list[dict[str, float]] = []
    for _ in range(warmup):
        cold.append(pipeline.predict_study(study).timings)
    peak_before_timed = probes.peak_rss_mib()  # imports + models + warm-up

    runs: list[dict[str, Any]] = []
    for _ in range(repeats):
        exact_reset = probes.reset_peak_rss()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with probes.RssSampler() as sampler:
            start = time.perf_counter()
            prediction = pipeline.predict_study(study)
        timings = prediction.timings
        stage_peaks: dict[str, float | None] = {}
        window_start = start
        for stage in STAGES:
            window_end = window_start + timings[stage]
            stage_peaks[stage] = sampler.peak_between(window_start, window_end)
            window_start = window_end
        run: dict[str, Any] = {
            "timings": timings,
            "stage_peak_rss_mib": stage_peaks,
            "peak_rss_mib": probes.peak_rss_mib() if exact_reset else max(r for _, r in sampler.samples),
            "peak_exact": exact_reset,
            "decoder_workers_uss_mib": sampler.children_peak(),
            "peak_with_workers_mib": sampler.combined_peak(),
            "vertebrae_found": prediction.vertebrae_found,
            "n_slices": prediction.n_slices,
        }
        if cuda:
            run["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / common.MIB
        runs.append(run)
    return {
        "reference_crops": reference_crops(pipeline, study, max(repeats, 1)),
        "study": str(study),
        "device": device,
        "threads": threads,
        "amp": amp,
        "cpu_bf16": pipeline.classifiers("full").cpu_bf16,
        "model_load_s": model_load_s,
        "rss_after_models_mib": rss_after_models,
        "peak_rss_warmup_mib": peak_before_timed,
        "cold_timings": cold,
        "runs": runs,
    }


def reference_crops(pipeline: Any, study: Path, repeats: int) -> dict[str, Any] | None:
    """Crop-stage time with the study's true label map, and the crop boxes of both masks.

    An untrained UNet labels voxels all over the volume, so its "vertebrae" span whole slices and the
    crop stage cuts and resizes full 512² planes; a trained one gives boxes of a few centimetres. The
    true mask shows what the crop stage costs with realistic boxes (the other stages do not depend on
    the mask's shape: the classifier always sees 7 stacks resized to the crop size). Runs after the
    timed predictions, through the pipeline's public steps (load, segment, crop), so that keeping the
    volume for it never weighs on their memory figures.

    Args:
        pipeline: the loaded pipeline (its steps and crop settings are used).
        study: DICOM folder with ``segmentation.nii`` beside it (None is returned without one).
        repeats: timed crop extractions (median reported).
    """
    from rsna_cspine.crops.extract import extract_vertebra_crops
    from rsna_cspine.io.nifti import load_segmentation

    segmentation = common.study_segmentation(study)
    if segmentation is None:
        return None
    volume = pipeline.load(study)
    truth = load_segmentation(segmentation, volume)
    seconds, classify_seconds = [], []
    for _ in range(repeats):
        tick = time.perf_counter()
        crops = extract_vertebra_crops(volume.hu, truth, pipeline.crop_config, spacing=volume.spacing)
        seconds.append(time.perf_counter() - tick)
    # Stage 1's QC drops an untrained network's vertebrae, so the timed predictions may classify nothing;
    # the true mask's seven stacks give stage 2 its real work.
    pipeline.classify(crops)  # warm-up
    for _ in range(repeats):
        tick = time.perf_counter()
        pipeline.classify(crops)
        classify_seconds.append(time.perf_counter() - tick)
    random_crops = pipeline.crop(volume, pipeline.segment(volume))

    def sides(boxes: Any, present: Any) -> list[int]:
        return [int(b[1] - b[0]) for b, p in zip(boxes, present) if p]

    return {
        "crop_s": statistics.median(seconds),
        "classify_s": statistics.median(classify_seconds),
        "true_box_side_px": sides(crops.boxes, crops.present),
        "true_vertebrae": int(crops.present.sum()),
        "model_box_side_px": sides(random_crops.boxes, random_crops.present),
    }


def measure(
    study: Path, models: Path, device: str = "cpu", threads: int | None = None, amp: bool = False,
    warmup: int = 1, repeats: int = 3, cpu_bf16: bool = False,
) -> dict[str, Any]:
    """:func:`measure_in_process` in a fresh interpreter (so its peak memory is this study's alone).

    Args:
        study: DICOM folder.
        models: models folder.
        device: ``cpu`` or ``cuda[:k]``.
        threads: torch intra-op threads (None = every usable core).
        amp: mixed precision on GPU.
        warmup: untimed first predictions.
        repeats: timed predictions.
        cpu_bf16: stage 2 in bfloat16 on CPU.
    """
    args = ["--child", "--study", str(study), "--models", str(models), "--device", device,
            "--threads", str(threads or common.usable_cores()), "--warmup", str(warmup), "--repeats", str(repeats)]
    flags = (["--amp"] if amp else []) + (["--cpu-bf16"] if cpu_bf16 else [])
    return probes.run_fresh(Path(__file__), args + flags)


# ----------------------------------------------------------------------------------------------
# Summaries and tables
# ----------------------------------------------------------------------------------------------


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Medians over the timed runs: seconds and peak RSS per stage, total, overall peak."""
    runs = result["runs"]
    summary: dict[str, Any] = {"stage_s": {}, "stage_peak_mib": {}}
    for stage in STAGES:
        summary["stage_s"][stage] = statistics.median(r["timings"][stage] for r in runs)
        peaks = [r["stage_peak_rss_mib"][stage] for r in runs if r["stage_peak_rss_mib"][stage] is not None]
        summary["stage_peak_mib"][stage] = max(peaks) if peaks else None
    summary["total_s"] = statistics.median(r["timings"]["total"] for r in runs)
    summary["peak_rss_mib"] = max([r["peak_rss_mib"] for r in runs] + [result["peak_rss_warmup_mib"]])
    summary["decoder_workers_uss_mib"] = max(r["decoder_workers_uss_mib"] for r in runs)
    summary["peak_total_mib"] = max(summary["peak_rss_mib"], *(r["peak_with_workers_mib"] for r in runs))
    summary["vertebrae_found"] = min(r["vertebrae_found"] for r in runs)
    summary["n_slices"] = runs[0]["n_slices"]
    if "gpu_peak_mib" in runs[0]:
        summary["gpu_peak_mib"] = max(r["gpu_peak_mib"] for r in runs)
    reference = result.get("reference_crops")
    if reference is not None:
        summary["crop_true_mask_s"] = reference["crop_s"]
        summary["classify_true_mask_s"] = reference["classify_s"]
        summary["total_realistic_s"] = (summary["total_s"] - summary["stage_s"]["crop"] - summary["stage_s"]["classify"]
                                        + reference["crop_s"] + reference["classify_s"])
    summary["cold_total_s"] = result["cold_timings"][0]["total"] if result["cold_timings"] else None
    return summary


def render_stage_table(label: str, result: dict[str, Any], summary: dict[str, Any], target_s: float) -> str:
    """One study's per-stage table: seconds, share of the total, peak RSS in the stage."""
    total = summary["total_s"]
    rows = []
    for stage in STAGES:
        seconds = summary["stage_s"][stage]
        rows.append([stage, common.fmt(seconds, 2), f"{100 * seconds / total:.0f} %",
                     common.fmt(summary["stage_peak_mib"][stage], 0)])
    rows.append(["**total per study**", f"**{total:.2f}**", "100 %", f"**{summary['peak_rss_mib']:.0f}** (exact peak)"])
    reference = result.get("reference_crops")
    if reference is not None:
        rows.append(["crop with the true mask (reference)", common.fmt(reference["crop_s"], 2), "", ""])
        rows.append(["classify the true mask's stacks (reference)", common.fmt(reference["classify_s"], 2), "", ""])
        rows.append(["**total with realistic crops**", f"**{summary['total_realistic_s']:.2f}**", "", ""])
    table = common.markdown_table(["stage", "time (s, median)", "share", "peak RSS (MiB)"], rows)
    if reference is not None:
        table += (
            f"\n\nCrop boxes (side, px): untrained UNet {reference['model_box_side_px']}, true mask "
            f"{reference['true_box_side_px']}. The untrained UNet's labels cover whole slices, so its crop stage "
            "is an upper bound, and stage 1's QC may drop its vertebrae so that nothing is classified; *total with "
            "realistic crops* swaps in the crop and classify times of the true mask's stacks."
        )
    gpu = f"; GPU peak allocated {summary['gpu_peak_mib']:.0f} MiB" if "gpu_peak_mib" in summary else ""
    notes = (
        f"\n\n{label}: {summary['n_slices']} slices, vertebrae found {summary['vertebrae_found']}/7; "
        f"models loaded once in {result['model_load_s']:.1f} s (RSS {result['rss_after_models_mib']:.0f} MiB); "
        f"first (cold) study {common.fmt(summary['cold_total_s'], 2)} s; "
        f"decoder workers (USS, summed) peak {summary['decoder_workers_uss_mib']:.0f} MiB, "
        f"process + workers peak {summary['peak_total_mib']:.0f} MiB{gpu}."
    )
    return f"{table}{notes}"


def render_summary(summaries: dict[str, dict[str, Any]], target_s: float) -> str:
    """One line per storage: total, ratio to the time target, peak and ratio to the memory target."""
    rows = []
    for label, s in summaries.items():
        realistic = s.get("total_realistic_s", s["total_s"])
        rows.append([
            label,
            common.fmt(s["total_s"], 2),
            common.fmt(realistic, 2),
            f"{realistic / target_s:.2f}",
            "yes" if realistic <= target_s else "**no**",
            f"{s['peak_total_mib'] / 1024:.2f}",
            f"{s['peak_total_mib'] / PEAK_TARGET_MIB:.2f}",
            "yes" if s["peak_total_mib"] <= PEAK_TARGET_MIB else "**no**",
            f"{21.6 / realistic:.1f}×",
        ])
    columns = ["study storage", "s / study (untrained UNet masks)", "s / study (realistic crops)",
               f"÷ {target_s:g} s target", "time ok", "peak memory (GiB)",
               "÷ 4 GiB target", "memory ok", "headroom vs Kaggle 21.6 s"]
    return common.markdown_table(columns, rows) + (
        "\n\nPeak memory: the larger of the process's exact peak RSS (models loaded, warm-up included) and "
        "process RSS + DICOM decoder workers' USS sampled together; per-stage peaks below are 5 ms RSS samples."
    )


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared with bench_scaling: which configs the random models come from."""
    parser.add_argument("--seg-config", default="configs/seg.yaml", help="stage-1 config (default: 128³ UNet)")
    parser.add_argument("--cls-config", default="configs/cls_resnet50.yaml", help="stage-2 config")
    parser.add_argument("--seg-set", nargs="*", default=[], metavar="KEY=VALUE", help="stage-1 config overrides")
    parser.add_argument("--cls-set", nargs="*", default=[], metavar="KEY=VALUE", help="stage-2 config overrides")
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="stage 2 under bfloat16 autocast on CPU (only where the CPU has native bf16)")


def model_spec(args: argparse.Namespace) -> common.ModelSpec:
    return common.ModelSpec(args.seg_config, args.cls_config, tuple(args.seg_set), tuple(args.cls_set))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=500, help="slices of the synthetic study")
    parser.add_argument("--size", type=int, default=512, help="rows = columns")
    parser.add_argument("--codecs", nargs="+", default=["none"], help="storages of the study: none, jpeg_lossless, ...")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    parser.add_argument("--amp", action="store_true", help="mixed precision (GPU only; a no-op on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every usable core)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed predictions before the timed ones")
    parser.add_argument("--repeats", type=int, default=3, help="timed predictions (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed")
    parser.add_argument("--work", type=Path, default=common.DEFAULT_WORK, help="cache of studies and models")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 slices, no warm-up, 1 timed run")
    add_model_arguments(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--study", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        probes.emit_result(measure_in_process(args.study, args.models, args.device, args.threads, args.amp,
                                              args.warmup, args.repeats, args.cpu_bf16))
        return 0
    if args.quick:
        args.slices, args.warmup, args.repeats = min(args.slices, 64), 0, 1
    threads = args.threads or common.usable_cores()
    target = GPU_TARGET_S if args.device.startswith("cuda") else CPU_TARGET_S

    info = common.machine_info(threads)
    command = common.command_line()
    models = common.random_models(args.work, model_spec(args))
    studies = common.synthetic_studies(args.work, args.slices, args.size, args.codecs, args.seed)
    results, summaries, sections = {}, {}, []
    for codec, folder in studies.items():
        label = common.CODEC_LABELS.get(codec, codec)
        print(f"measuring {label} on {args.device} ({threads} threads, amp={args.amp}) ...", flush=True)
        result = measure(folder, models, args.device, threads, args.amp, args.warmup, args.repeats, args.cpu_bf16)
        results[codec], summaries[label] = result, summarise(result)
        sections.append(f"#### {label}\n\n{render_stage_table(label, result, summaries[label], target)}")
    device_text = args.device + (" + AMP" if args.amp and args.device.startswith("cuda") else "")
    device_text += " + stage-2 bf16" if args.cpu_bf16 and not args.device.startswith("cuda") else ""
    title = (f"### Per-study inference, {device_text}, {threads} torch threads "
             f"({args.slices}×{args.size}² study, {args.warmup} warm-up + {args.repeats} timed run(s))\n\n"
             f"Models: `{args.seg_config}` + `{args.cls_config}`, one fold each, random weights.\n\n")
    markdown = title + render_summary(summaries, target) + "\n\n" + "\n\n".join(sections)
    common.save_results("inference", info, command, markdown,
                        {"args": vars(args) | {"work": str(args.work)}, "summaries": summaries, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
