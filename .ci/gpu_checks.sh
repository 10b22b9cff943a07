#!/usr/bin/env bash
# The GPU checks of issues 10 and 14, as ONE device call. NOT run by CI (it needs a lent GPU machine).
#
# Prepare on the development machine (the device machine has no network and no ../shared; a call carries 64 MiB):
#   printf '/.whl/\n/.devdata/\n' >> .git/info/exclude
#   mkdir -p .whl && cp ../shared/device-wheels-py312/*.whl .whl/ && rm .whl/jedi-* .whl/debugpy-*  # optional: 9 MB
#   python .ci/device_data.py pack ../shared/per-covid19/crops 144 .devdata/crops144.tar   # Train + Val, 46 MiB
#   python -m utils.sweep pack --data ../shared/per-covid19/crops --sizes 144 --out .devdata/train144.npz  # search
# Then one device call, carrying [".whl", ".devdata"], timeout 570 s, command: bash .ci/gpu_checks.sh
# (PARTS="bench" runs the bench alone, BENCH_LIMIT=400 say: on 2026-11-27 it got 110 s, then 150 s, and printed
# nothing before its time limit; it now prints each figure as it is measured.)
#
# 1. The `gpu` profile end to end on the real crops (Train + Val), every (model, fold) a Dask job, 10 per GPU:
#    gpu.log (each stage's time), val_gpu.csv (the Val submission), gpu_run.tar.gz (the run folder without its
#    checkpoints: executed notebooks, per-fold predictions and histories, the ensemble and pseudo-label tables).
# 2. utils.bench of the paper setting (resnest50d, 512 px, batch 8, bf16, SAM) with K = 1, 2, 4, 8 jobs sharing
#    the GPU, and its estimate of the `paper` profile's wall time: bench.json, bench.log.
# 3. PARTS=search: the search_gpu profile's paired 5-fold CV (Table 1 at GPU scale): search_gpu_cv_summary.csv.
# Plus versions.txt (card, driver, torch, timm) and timeline.txt (epoch seconds of each step).
# On a CPU machine, QUICK=1 DEVICE=cpu DATA_TAR=small.tar runs the same flow at toy sizes (a check of the script).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/gpu_checks}; DEVICE=${DEVICE:-cuda}; QUICK=${QUICK:-0}; PY=${PY:-python3}
DATA_TAR=${DATA_TAR:-.devdata/crops144.tar}; PIPELINE_LIMIT=${PIPELINE_LIMIT:-380}; BENCH_LIMIT=${BENCH_LIMIT:-150}
SEARCH_LIMIT=${SEARCH_LIMIT:-540}; SEARCH_NPZ=${SEARCH_NPZ:-.devdata/train144.npz}
PARTS=${PARTS:-gpu_profile bench}  # or search (alone: ~9 min)
mkdir -p "$OUT"
stamp() { echo "$(date +%s) $*" >> "$OUT/timeline.txt"; }
stamp start
WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ]; then  # the wheels the device machine lacks (albumentations, papermill, a kernel, dask)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  $PY -m ipykernel install --user --name python3 >/dev/null || exit 1
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
{ nvidia-smi || true; nproc; $PY -c "import os; print('cpu_count', os.cpu_count(), 'affinity', len(os.sched_getaffinity(0)))"; $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
} > "$OUT/versions.txt" 2>&1
DATA=data/device_crops
if [[ " $PARTS " == *" gpu_profile "* ]]; then
  rm -rf "$DATA" && $PY .ci/device_data.py unpack "$DATA_TAR" "$DATA" > "$OUT/gpu.log" 2>&1 || exit 1
  stamp unpacked
fi

if [ "$QUICK" = 1 ]; then
  TOY=(-p img_size 32 -p epochs 2 -p warmup_epochs 0 -p save_last_k 1 -p folds "[0, 1]" -p selfsup_epochs 1
       -p arch resnet18 -p batch_size 8)
  BENCH=(--arch resnet18 --img-size 32 --batch-size 4 --steps 3 --warmup-steps 1 --concurrent 1 2)
  SEARCH_TOY=(--folds 0 1 -p img_size 32 -p epochs 2 -p warmup_epochs 0 -p save_last_k 1 -p batch_size 8)
else
  TOY=(); SEARCH_TOY=()
  BENCH=(--arch resnest50d --img-size 512 --batch-size 8 --steps 20 --warmup-steps 3 --concurrent 2 4 8)
fi

if [[ " $PARTS " == *" gpu_profile "* ]]; then
  stamp gpu_profile
  timeout "$PIPELINE_LIMIT" $PY -m utils.pipeline --profile gpu --data "$DATA" --name gpu --force --kernel python3 \
    --jobs-per-gpu 10 -p device "$DEVICE" "${TOY[@]}" >> "$OUT/gpu.log" 2>&1
  echo "pipeline exit $?" >> "$OUT/gpu.log"
  stamp gpu_profile_end
  cp submissions/gpu.csv "$OUT/val_gpu.csv" 2>/dev/null
  tar -czf "$OUT/gpu_run.tar.gz" --exclude='*.pt' --exclude='*.pth' --exclude=export --exclude=.lock runs/gpu \
    2>/dev/null
fi
if [[ " $PARTS " == *" search "* ]]; then  # Table 1 at GPU scale (needs .devdata/train144.npz, see the top)
  stamp search
  timeout "$SEARCH_LIMIT" $PY -m utils.sweep run --profile search_gpu --images "$SEARCH_NPZ" \
    --jobs-per-gpu 10 -p device "$DEVICE" "${SEARCH_TOY[@]}" > "$OUT/search_gpu.log" 2>&1
  echo "search exit $?" >> "$OUT/search_gpu.log"
  cp runs/search_gpu/cv_summary.csv "$OUT/search_gpu_cv_summary.csv" 2>/dev/null
fi
if [[ " $PARTS " == *" bench "* ]]; then
  stamp bench
  timeout "$BENCH_LIMIT" $PY -m utils.bench "${BENCH[@]}" --device "$DEVICE" --json "$OUT/bench.json" \
    > "$OUT/bench.log" 2>&1
  echo "bench exit $?" >> "$OUT/bench.log"
fi
stamp done
tail -n 25 "$OUT"/*.log
