#!/usr/bin/env bash
# The prepared GPU checks of issues 10 and 14. NOT run by CI (it needs a lent GPU machine); one script, run once.
#
# Prepare on the development machine (the device machine has no network and no ../shared):
#   mkdir -p .whl && cp ../shared/device-wheels-py312/*.whl .whl/ && echo /.whl/ >> .git/info/exclude
#   python -m utils.sweep pack --data ../shared/per-covid19/crops --sizes 224 --out data/crops224.npz   # PART=search
# Then one device call, carrying [".whl", "data/crops224.npz"], command: bash .ci/gpu_checks.sh
# Everything it measures lands in $OUT: versions and card, bench.json (K = 1, 2, 4, 8 jobs of the paper setting
# sharing the GPU; the paper profile's wall-time estimate), compiled.json (the same step with torch.compile),
# paper_short.log (the paper profile end to end on 512 px phantoms, 1 epoch, every (model, fold) a parallel job,
# with each stage's time), and with PART=search the 5-fold CV of search_gpu.yaml.
# On a CPU machine, QUICK=1 DEVICE=cpu runs the same flow at toy sizes (a check of the script, nothing measured).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/gpu_checks}; DEVICE=${DEVICE:-cuda}; QUICK=${QUICK:-0}; PART=${PART:-speed}; PY=${PY:-python3}
mkdir -p "$OUT"
if [ -d .whl ]; then  # the wheels the device machine lacks (albumentations, papermill, a kernel, dask)
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  $PY -m ipykernel install --user --name python3 >/dev/null
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} NO_ALBUMENTATIONS_UPDATE=1
{ nvidia-smi || true; $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"; } \
  > "$OUT/versions.txt" 2>&1
if [ "$QUICK" = 1 ]; then
  BENCH=(--arch resnet18 --img-size 32 --batch-size 4 --steps 3 --warmup-steps 1 --concurrent 1 2)
  PHANTOMS=(--subjects 8 --size 64); EPOCH_ARGS=(-p img_size 32 -p arch resnet18 -p batch_size 4); SIZE=64
else
  BENCH=(--arch resnest50d --img-size 512 --batch-size 8 --concurrent 1 2 4 8)
  PHANTOMS=(--subjects 40 --size 512); EPOCH_ARGS=(); SIZE=512
fi
stamp() { echo "$(date +%s) $*" >> "$OUT/timeline.txt"; }

if [ "$PART" = speed ]; then
  stamp bench
  timeout 200 $PY -m utils.bench "${BENCH[@]}" --device "$DEVICE" --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
  stamp compiled
  timeout 120 $PY -m utils.bench "${BENCH[@]:0:6}" --device "$DEVICE" --compile --json "$OUT/compiled.json" \
    > "$OUT/compiled.log" 2>&1
  stamp phantoms
  $PY -m utils.phantoms /tmp/phantoms$SIZE "${PHANTOMS[@]}" > "$OUT/phantoms.log" 2>&1
  stamp paper_short
  timeout 330 $PY -m utils.pipeline --workdir /tmp/work --data /tmp/phantoms$SIZE --profile paper --name paper_short \
    --kernel python3 --jobs-per-gpu 4 -p epochs 1 -p warmup_epochs 0 -p save_last_k 1 -p pretrained false \
    -p device "$DEVICE" "${EPOCH_ARGS[@]}" > "$OUT/paper_short.log" 2>&1
  stamp done
else
  stamp search
  timeout 560 $PY -m utils.sweep run --profile search_gpu --images data/crops224.npz --jobs-per-gpu 8 \
    --name search_gpu -p device "$DEVICE" > "$OUT/search_gpu.log" 2>&1
  cp runs/search_gpu/cv_summary.csv "$OUT/" 2>/dev/null
  stamp done
fi
tail -n 30 "$OUT"/*.log
