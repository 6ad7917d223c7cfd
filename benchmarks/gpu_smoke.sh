#!/usr/bin/env bash
# GPU smoke run: both trainers under torchrun (2 processes, AMP) for a few steps, then `rsna-cspine predict`
# on 3 realistic-size studies with the per-study time of each stage.
#
#   bash benchmarks/gpu_smoke.sh                # GPU: nccl, AMP, configs/seg.yaml + configs/cls_resnet50.yaml
#   bash benchmarks/gpu_smoke.sh --cpu          # the same commands on CPU (gloo, no AMP, the *_cpu configs, small)
#   bash benchmarks/gpu_smoke.sh --dry-run      # print the commands only
#
# Options: --out DIR (default work/gpu_smoke, replaced), --nproc N (default 2; on GPU at most the GPU count:
# nccl refuses two ranks on one GPU), --python PATH (default .venv/bin/python, else python3).
# Everything is synthetic and local: the datasets come from `rsna-cspine synth`, and the stage-2 "pretrained"
# weights file is a randomly initialised timm state dict saved as safetensors, so that the
# model.pretrained_file path (stem adaptation, pretrained_cfg normalisation) runs too; nothing is downloaded.
# The override keys below follow configs/*.yaml; tests/test_gpu_smoke.py checks them against the config schema.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE=gpu
DRY=0
OUT="$REPO/work/gpu_smoke"
NPROC=2
PY="$REPO/.venv/bin/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --nproc) NPROC="$2"; shift ;;
    --python) PY="$2"; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"
cd "$REPO"  # the configs/ paths below are relative to the repository
# The repository's own package first, whatever the environment's editable install points at.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if [[ "$MODE" == gpu ]]; then
  DEVICE=cuda
  AMP=true
  SEG_CONFIG=configs/seg.yaml
  CLS_CONFIG=configs/cls_resnet50.yaml
  BACKBONE=resnet50.a1_in1k
  TRAIN_SYNTH=(--studies 8 test_fraction=0 image_size=192)
  PREDICT_SYNTH=(--studies 4 test_fraction=0.75 image_size=512 "n_slices=[300,300]")
  SEG_SIZE=(train.num_workers=2)
  CLS_SIZE=(train.batch_size=4 train.val_batch_size=8 train.num_workers=4)
  PREP_SIZE=()
  if [[ "$DRY" == 0 ]]; then
    GPUS="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
    if [[ "$GPUS" -lt 1 ]]; then echo "no CUDA device visible to torch; use --cpu" >&2; exit 1; fi
    if [[ "$NPROC" -gt "$GPUS" ]]; then
      echo "NOTE: $GPUS GPU(s): torchrun with $GPUS process(es), not $NPROC (nccl needs one GPU per rank)"
      NPROC="$GPUS"
    fi
  fi
else
  DEVICE=cpu
  AMP=false
  SEG_CONFIG=configs/seg_cpu.yaml
  CLS_CONFIG=configs/cls_cpu.yaml
  BACKBONE=test_resnet
  TRAIN_SYNTH=(--studies 8 test_fraction=0 image_size=96)
  PREDICT_SYNTH=(--studies 4 test_fraction=0.75 image_size=128)
  # Two localiser epochs, as two of the fine network: its 60 took 55 of stage 1's 81 s here (2-core AMD EPYC).
  SEG_SIZE=(train.num_workers=0 data.grid=[32,64,64] train.patch_size=[0,32,32] localiser.epochs=2)
  CLS_SIZE=(train.batch_size=4 train.val_batch_size=8 train.num_workers=0 data.crop.size=48)
  PREP_SIZE=(stage1.grid=[32,64,64] crop.size=48)   # the same sizes as SEG_SIZE and CLS_SIZE
fi

DATA="$OUT/data_train"
TEST_DATA="$OUT/data_predict"
WEIGHTS="$OUT/weights/$BACKBONE.safetensors"
MODELS="$OUT/models"
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC")

run() {  # print the command; run it unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ "$DRY" == 0 ]]; then "$@"; fi
}

declare -A WALL
timed() {  # timed NAME CMD...: run CMD, keep its wall time in milliseconds
  local name="$1" start
  shift
  start=$(date +%s%N)
  run "$@"
  WALL[$name]=$(( ($(date +%s%N) - start) / 1000000 ))
}

if [[ "$DRY" == 0 ]]; then
  rm -rf "$OUT"/{data_train,data_predict,work,runs,models,weights,submission*}
  mkdir -p "$OUT/weights"
  echo "== machine"
  "$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
EOF
fi
echo "== mode $MODE, $NPROC process(es), device $DEVICE, amp $AMP, out $OUT"

echo "== 1/5 synthetic data: training set and a 3-study prediction set"
timed synth "$PY" -m rsna_cspine.cli synth "$DATA" --seed 0 --no-progress "${TRAIN_SYNTH[@]}"
run "$PY" -m rsna_cspine.cli synth "$TEST_DATA" --seed 1 --no-progress "${PREDICT_SYNTH[@]}"
run "$PY" -c "import sys, timm; from safetensors.torch import save_file; \
save_file(timm.create_model(sys.argv[1], pretrained=False).state_dict(), sys.argv[2])" "$BACKBONE" "$WEIGHTS"

echo "== 2/5 prepare: one decode per training study, the inputs of both stages (the trainers never decode)"
CACHE="$OUT/work/prepared"
timed prepare "$PY" -m rsna_cspine.cli prepare --data "$DATA" --out "$CACHE" --seg-config "$SEG_CONFIG" \
  --cls-config "$CLS_CONFIG" --no-progress mask_source=gt ${PREP_SIZE[@]+"${PREP_SIZE[@]}"}

echo "== 3/5 stage 1 under torchrun"
SEG_ARGS=(--config "$SEG_CONFIG" --fold 0 --no-progress
  "data.root=$DATA" --cache "$CACHE" "run_dir=$OUT/runs/seg" "device=$DEVICE"
  train.epochs=2 train.val_every=1 "train.amp=$AMP" train.max_minutes=0 ${SEG_SIZE[@]+"${SEG_SIZE[@]}"})
timed seg "${TORCHRUN[@]}" -m rsna_cspine.cli train-seg "${SEG_ARGS[@]}"

echo "== 4/5 stage 2 under torchrun (model.pretrained_file = the local stand-in weights)"
CLS_ARGS=(--config "$CLS_CONFIG" --fold 0
  "data.root=$DATA" --cache "$CACHE" "run_dir=$OUT/runs/cls" "device=$DEVICE"
  "model.backbone=$BACKBONE" "model.pretrained_file=$WEIGHTS" train.epochs=2 train.max_minutes=0 "train.amp=$AMP"
  ${CLS_SIZE[@]+"${CLS_SIZE[@]}"})
timed cls "${TORCHRUN[@]}" -m rsna_cspine.cli train-cls "${CLS_ARGS[@]}"

echo "== 5/6 predict the 3 test studies"
run mkdir -p "$MODELS/seg/fold0" "$MODELS/cls/fold0"
run cp "$OUT/runs/seg/fold0/best.pt" "$MODELS/seg/fold0/best.pt"
run cp "$OUT/runs/cls/fold0/best.pt" "$MODELS/cls/fold0/best.pt"
SAMPLER=""
if [[ "$DRY" == 0 && "$MODE" == gpu ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/gpu_memory_mib.txt" &
  SAMPLER=$!
fi
timed predict "$PY" -m rsna_cspine.cli predict --data "$TEST_DATA" --models "$MODELS" --out "$OUT/submission.csv" \
  --device "$DEVICE" --no-resume --no-progress
if [[ -n "$SAMPLER" ]]; then kill "$SAMPLER"; wait "$SAMPLER" 2>/dev/null || true; fi

echo "== 6/6 check and report"
[[ "$DRY" == 1 ]] && exit 0
"$PY" - "$OUT" "$MODE" "$NPROC" "${WALL[synth]}" "${WALL[prepare]}" "${WALL[seg]}" "${WALL[cls]}" "${WALL[predict]}" <<'EOF'
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

out, mode, nproc = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
names = ("synth (training set)", "prepare", "stage 1 torchrun", "stage 2 torchrun", "predict")
walls = {name: int(ms) / 1000 for name, ms in zip(names, sys.argv[4:9])}
problems = []
for stage in ("seg/fold0", "cls/fold0"):
    summary = pd.read_csv(out / "runs" / stage / "summary.csv")
    state = torch.load(out / "runs" / stage / "best.pt", map_location="cpu", weights_only=False)
    cfg = state["config"]
    amp = cfg["train"]["amp"]
    print(f"{stage}: {len(summary)} epochs, last train_loss {summary['train_loss'].iloc[-1]:.4f}, amp={amp}")
    if not np.isfinite(summary["train_loss"]).all():
        problems.append(f"{stage}: non-finite training loss")
test = pd.read_csv(out / "data_predict" / "test.csv")
sub = pd.read_csv(out / "submission.csv")
if sub["row_id"].tolist() != test["row_id"].tolist() or not sub["fractured"].between(0, 1).all():
    problems.append("submission.csv does not match test.csv or holds values outside [0, 1]")
timings = pd.read_csv(out / "submission.timings.csv")
if (timings["status"] != "ok").any():
    problems.append(f"studies not ok: {timings.loc[timings['status'] != 'ok', ['StudyInstanceUID', 'status', 'reason']].to_dict('records')}")
cols = ["n_slices", "vertebrae_found", "load_s", "segment_s", "crop_s", "classify_s", "total_s"]
print("\nper-study time (s), predict on", "GPU" if mode == "gpu" else "CPU", "(the first study includes warm-up):")
print(timings[["StudyInstanceUID", "path", "status", *cols]].to_string(index=False))
print(f"median total {timings['total_s'].median():.2f} s/study; without the first {timings['total_s'].iloc[1:].median():.2f} s")
memory = out / "gpu_memory_mib.txt"
if memory.is_file() and memory.stat().st_size:
    print(f"peak GPU memory used during predict (nvidia-smi, whole device): {max(map(int, memory.read_text().split()))} MiB")
print("\nwall time (s), torchrun with", nproc, "process(es):")
for name, seconds in walls.items():
    print(f"  {name:22s} {seconds:8.1f}")
if problems:
    print("\nFAILED:\n  " + "\n  ".join(problems))
    sys.exit(1)
print("\nOK: both stages trained under torchrun, 3 studies predicted")
EOF
