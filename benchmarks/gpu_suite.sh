#!/usr/bin/env bash
# seglabel's GPU figures in one command, in under 9 minutes on one CUDA GPU:
#   1. annotate end to end (ViT-B/16 with random weights of the real architecture, default method,
#      short side 512, bf16, batch 32, 640x480 JPEGs made here), JPEGs decoded on the CPU and on
#      the GPU, against Predictor alone and the model alone on pre-loaded batches; peak GPU memory;
#   2. distill: DeepLabv2-R101 training iterations/s at crop 512, batch 16, AMP; peak GPU memory;
#      and the toy world's MaskCLIP+ loop on the GPU with both defaults (does the student beat its
#      teacher there too): the CUDA default (ImageNet ResNet-101, cross-entropy alone; offline, give
#      the weights file as BACKBONE_WEIGHTS=FILE) and the CPU default (ResNet-18/16, random init);
#   3. the test suite's CUDA-marked tests;
#   4. how far GPU-decoded pixels and labels are from the CPU path's;
#   5. the writers' speed per core on this machine's CPU.
#
#   bash benchmarks/gpu_suite.sh              # on a CUDA machine
#   bash benchmarks/gpu_suite.sh --cpu-smoke  # on a CPU, tiny sizes: proves the script works (CI)
#
# Environment: PYTHON (default python3), IMAGES (photos, default 8192), BACKBONE_WEIGHTS (the
# student's ImageNet ResNet-101 weights file where they cannot be downloaded). Needs seglabel's
# dependencies importable (torch, torchvision, open_clip, pycocotools); seglabel itself is taken
# from this checkout. Exit status: 0 when every step ran, 1 when one failed or ran out of time,
# 2 when it cannot start (no CUDA without --cpu-smoke, a missing package).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd "$REPO" || exit 2

SMOKE=0
case "${1:-}" in
  --cpu-smoke) SMOKE=1 ;;
  "") ;;
  -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "gpu_suite.sh: unknown argument $1 (use --cpu-smoke or nothing)" >&2; exit 2 ;;
esac

if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu; MODEL=(--model maskclip:tiny-vit --model-config tests/fixtures/tiny-vit.json)
  IMAGES=${IMAGES:-12}; SIZE=120x160; SHORT=64; BATCH=4; PRECISION=fp32
  DISTILL=(--device cpu --depth 18 --crop 64 --batch 1 --iters 1 --warmup 0 --classes 5)
  TOY_DISTILL=(--train-n 8 --test-n 4 --short-side 32 --speed-images 4 -- --device cpu --iters 2 --workers 0)
  TOY_CUDA_DEFAULTS=(--backbone-weights none)  # no download in a smoke run
  BUDGET=480  # generous: CI machines are slow and shared; the 9 minutes are for the GPU run
else
  DEVICE=cuda; MODEL=(--model maskclip:ViT-B-16)
  IMAGES=${IMAGES:-8192}; SIZE=480x640; SHORT=512; BATCH=32; PRECISION=bf16
  DISTILL=(--device cuda --depth 101 --crop 512 --batch 16 --iters 20 --warmup 3 --amp)
  TOY_DISTILL=(-- --device cuda)
  TOY_CUDA_DEFAULTS=(${BACKBONE_WEIGHTS:+--backbone-weights "$BACKBONE_WEIGHTS"})
  BUDGET=540  # seconds for all steps: the whole suite stays under 9 minutes
fi

if ! missing=$("$PY" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("torch", "torchvision", "open_clip", "pycocotools", "PIL", "typer", "yaml", "pytest")
               if importlib.util.find_spec(m) is None))
EOF
); then
  echo "gpu_suite.sh: $PY does not run" >&2
  exit 2
fi
if [ -n "$missing" ]; then
  echo "gpu_suite.sh: missing Python packages: $missing (pip install -e '.[test]' installs seglabel's)" >&2
  exit 2
fi
if [ "$SMOKE" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_suite.sh: no CUDA device here; on a CPU run: bash benchmarks/gpu_suite.sh --cpu-smoke" >&2
  exit 2
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/seglabel-gpu-suite.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
FAILED=()

# step NAME SECONDS COMMAND...: run under a time limit cut to what the budget has left
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  echo
  echo "== $name"
  if [ "$limit" -lt 10 ]; then
    echo "(skipped: the suite's time budget is spent)"; FAILED+=("$name (no time left)"); return
  fi
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  if [ $rc -ne 0 ]; then
    [ $rc -eq 124 ] && echo "(stopped after ${limit} s)"
    FAILED+=("$name (exit $rc)")
  fi
}

echo "== environment"
"$PY" - "$DEVICE" <<'EOF'
import os, platform, sys
import torch, torchvision
from seglabel.decode import device_decoding_available
device = torch.device(sys.argv[1])
gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none"
print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"GPU {gpu}, JPEG decoding on the GPU: {'yes' if device_decoding_available(device) else 'no'}")
print(f"CPU cores {os.cpu_count()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
EOF

PHOTOS="$WORK/photos"
COMMON=("${MODEL[@]}" --device "$DEVICE" --images "$IMAGES" --size "$SIZE" --short-side "$SHORT"
        --batch-size "$BATCH" --precision "$PRECISION" --photo-dir "$PHOTOS")

step "annotate: end to end (decode on the CPU, on the GPU) against Predictor and the model alone" 270 \
  "$PY" benchmarks/annotate_throughput.py "${COMMON[@]}" --modes model,predict,pipeline-cpu,pipeline-device \
  --keep "$WORK/out" --json "$WORK/throughput.json"

step "distill: DeepLabv2 training iterations/s" 100 \
  "$PY" -c 'import runpy, sys, torch
sys.argv = ["distill_speed.py"] + sys.argv[1:]
runpy.run_path("benchmarks/distill_speed.py", run_name="__main__")
if torch.cuda.is_available() and "cuda" in sys.argv:
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")' "${DISTILL[@]}"

step "distill on the toy world, the CUDA defaults (ImageNet ResNet-101): teacher and student mIoU, speed" 150 \
  "$PY" benchmarks/toyworld/distill_quality.py "${TOY_DISTILL[@]}" "${TOY_CUDA_DEFAULTS[@]}"

step "distill on the toy world, the CPU defaults (ResNet-18 width 16, random init, colour prior, guided upsampling)" 120 \
  "$PY" benchmarks/toyworld/distill_quality.py "${TOY_DISTILL[@]}" --depth 18 --width 16 --backbone-weights none --upsample guided

CUDA_TESTS=$(grep -l "pytest.mark.cuda" tests/test_*.py | tr '\n' ' ')
# shellcheck disable=SC2086
step "tests marked cuda ($CUDA_TESTS)" 100 "$PY" -m pytest -q -rs -p no:cacheprovider -m cuda $CUDA_TESTS

step "decoders: GPU (nvjpeg) against CPU (libjpeg-turbo) pixels, and labels" 45 \
  "$PY" benchmarks/decode_diff.py --photos "$PHOTOS" --device "$DEVICE" --limit 64 \
  --masks "$WORK/out/pipeline-cpu" "$WORK/out/pipeline-device"

if [ "$SMOKE" = 1 ]; then
  step "writers per core" 30 "$PY" benchmarks/writers.py --sizes 48x64 --classes 19 --seconds 0.05
else
  step "writers per core (this machine's CPU)" 40 "$PY" benchmarks/writers.py --sizes 480x640 --classes 19,150 \
    --maps blobs --seconds 0.5
  step "annotate, decode on the GPU, 8 writer threads (annotate's default is 2)" 90 \
    "$PY" benchmarks/annotate_throughput.py "${COMMON[@]}" --modes pipeline-device --writer-threads 8
fi

echo
echo "== summary"
"$PY" - "$WORK/throughput.json" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("no annotate figures (that step failed)")
model = r["model"]["images_per_second"]
for mode, what in (("pipeline-device", "decode on the GPU"), ("pipeline-cpu", "decode on the CPU"),
                   ("predict", "Predictor on pre-loaded batches"), ("model", "model alone, pre-loaded batches")):
    x = r[mode]
    gpu = f", peak GPU memory {x['peak_gpu_mib']:.0f} MiB" if x["peak_gpu_mib"] is not None else ""
    share = f" = {x['images_per_second'] / model:.0%} of the model alone" if mode != "model" else ""
    print(f"{what:34s} {x['images_per_second']:9.1f} images/s{share}{gpu}")
print("goal: annotate (decode on the GPU) at >= 90% of the model alone")
EOF
echo "suite time: ${SECONDS} s"
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "all steps ran"
