#!/usr/bin/env bash
# The GPU checks, as device calls of one script. NOT run by CI (it needs a GPU machine).
#
# Prepare on the development machine (the device machine has no network and no ../shared; a call carries 64 MiB):
#   printf '/.whl/\n/.devdata/\n' >> .git/info/exclude
#   mkdir -p .whl && cp ../shared/device-wheels-py312/*.whl .whl/ && rm .whl/jedi-* .whl/debugpy-*  # 16 MB
#   python .ci/device_data.py pack ../shared/per-covid19/crops 144 .devdata/crops144.tar   # gpu_profile: 46 MiB
#   python -m utils.sweep pack --data ../shared/per-covid19/crops --sizes 144 --out .devdata/train144.npz  # search
#   python .ci/device_data.py pack ../shared/per-covid19/crops 224 .devdata/c224.tar 46   # gpu224: 3 parts, 109 MiB
# Then device calls carrying [".whl", ".devdata"], in this order (15 device minutes a session, 10 a call):
#   1. PARTS="bench paper" bash .ci/gpu_checks.sh     timeout_s 570   (4 + 4.5 min at most)
#   2. PARTS=compile bash .ci/gpu_checks.sh           timeout_s 330   (what is left: 2 x 2.5 min at most)
# The accuracy run at the crops' own 224 px (the lossless gray carry is ~109 MiB): three calls back to back, the
# machine kept warm between them, each carrying [".whl", ".devdata/c224.partN.tar"] (.whl in the first only):
#   a. PARTS=unpack DATA_TAR=.devdata/c224.part1.tar bash .ci/gpu_checks.sh       timeout_s 120
#   b. PARTS=unpack DATA_TAR=.devdata/c224.part2.tar bash .ci/gpu_checks.sh       timeout_s 120
#   c. PARTS="unpack gpu224" DATA_TAR=.devdata/c224.part3.tar bash .ci/gpu_checks.sh   timeout_s 600
# Self-supervision at GPU scale (after those, when device time is left), carrying [".whl", ".devdata/crops144.tar"]:
#   d. PARTS=selfsup bash .ci/gpu_checks.sh                                        timeout_s 570
# Each part has its own time limit (below) and prints its figures as they are measured, so a part stopped by its
# limit still reports what it had; the parts run in the order PARTS lists them.
#
# Parts (results under $OUT, plus versions.txt: card, driver, torch, timm; timeline.txt: when each part began):
#   bench        utils.bench of the paper setting (resnest50d, 512 px, batch 8, bf16, SAM, uint8 batches) with
#                K = 1, 2, 4, 8 jobs sharing the GPU, and its estimate of the `paper` profile's wall time on 1 and
#                2 GPUs: bench.json, bench.log.
#   paper        the `paper` profile shortened (1 epoch, no downloaded weights) end to end on the 512 px phantoms:
#                all 4 models x 2 folds as parallel Dask jobs, the pseudo-label retrain, the submission; each stage's
#                time: paper.log, paper_short.csv, paper_run.tar.gz (the run without its checkpoints).
#   compile      the bench's single-job figures (a)-(c) with torch.compile, for each of COMPILE_MODES
#                ("reduce-overhead": CUDA graphs; "default"): bench_compile_<mode>.json/.log. Compare (a) with the
#                bench part's (a): a mode becomes the GPU default only if measured faster.
#   gpu_profile  the `gpu` profile end to end on the real crops (Train + Val), 10 jobs per GPU: gpu.log, val_gpu.csv,
#                gpu_run.tar.gz. (Ran on an H200 on 2026-11-27: 301 s.)
#   search       the search_gpu profile's paired 5-fold CV (Table 1 at GPU scale): search_gpu_cv_summary.csv.
#   selfsup      SimCLR on every crop, SimCLR after near-duplicate removal, and BYOL, 15 epochs each at 144 px on
#                DATA_TAR's crops (crops144.tar), then the selfsup_gpu profile's paired 5-fold CV against no
#                pretraining (~7 min on an H200; one call, timeout_s 570): selfsup.log, selfsup_gpu_cv_summary.csv.
#   unpack       add DATA_TAR's slices to $CARRIED (outside the checkout: it stays while the machine is warm).
#   gpu224       the `gpu` profile at 224 px (-p img_size 224) on $CARRIED, 10 jobs per GPU, then the Val
#                submission with 90 % intervals: gpu224.log, val_gpu224.csv, val_gpu224_intervals.csv,
#                gpu224_cv.csv (the out-of-fold table, per severity class), gpu224_run.tar.gz.
# On a CPU machine, QUICK=1 DEVICE=cpu DATA_TAR=small.tar runs the same flow at toy sizes (a check of the script).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/gpu_checks}; DEVICE=${DEVICE:-cuda}; QUICK=${QUICK:-0}; PY=${PY:-python3}
PARTS=${PARTS:-bench paper}
BENCH_LIMIT=${BENCH_LIMIT:-240}; PAPER_LIMIT=${PAPER_LIMIT:-270}; COMPILE_LIMIT=${COMPILE_LIMIT:-150}
PIPELINE_LIMIT=${PIPELINE_LIMIT:-380}; SEARCH_LIMIT=${SEARCH_LIMIT:-540}; GPU224_LIMIT=${GPU224_LIMIT:-540}
SELFSUP_LIMIT=${SELFSUP_LIMIT:-540}
COMPILE_MODES=${COMPILE_MODES:-reduce-overhead default}
DATA_TAR=${DATA_TAR:-.devdata/crops144.tar}; SEARCH_NPZ=${SEARCH_NPZ:-.devdata/train144.npz}
CARRIED=${CARRIED:-/tmp/carried_crops}
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

if [ "$QUICK" = 1 ]; then
  TOY=(-p img_size 32 -p epochs 2 -p warmup_epochs 0 -p save_last_k 1 -p folds "[0, 1]" -p selfsup_epochs 1
       -p arch resnet18 -p batch_size 8)
  BENCH_SIZE=(--arch resnet18 --img-size 32 --batch-size 4 --steps 3 --warmup-steps 3); KS=(2)
  SSL_SIZE=(--img-size 32 --epochs 1 --batch-size 8)
  PAPER_TOY=(-p img_size 64 -p arch resnet18 -p max_steps_per_epoch 2)
  SEARCH_TOY=(--folds 0 1 -p img_size 32 -p epochs 2 -p warmup_epochs 0 -p save_last_k 1 -p batch_size 8)
else
  TOY=(); PAPER_TOY=(); SEARCH_TOY=(); KS=(2 4 8); SSL_SIZE=(--img-size 144 --epochs 15)
  BENCH_SIZE=(--arch resnest50d --img-size 512 --batch-size 8 --steps 20 --warmup-steps 4)
fi

part_bench() {
  timeout "$BENCH_LIMIT" $PY -m utils.bench "${BENCH_SIZE[@]}" --concurrent "${KS[@]}" --device "$DEVICE" \
    --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
  echo "bench exit $?" >> "$OUT/bench.log"
}

part_compile() {  # reduce-overhead records CUDA graphs after its warm-up steps: keep >= 3 of them (BENCH_SIZE: 4)
  for mode in $COMPILE_MODES; do
    stamp "compile $mode"
    timeout "$COMPILE_LIMIT" $PY -m utils.bench "${BENCH_SIZE[@]}" --compile "$mode" --device "$DEVICE" \
      --json "$OUT/bench_compile_$mode.json" > "$OUT/bench_compile_$mode.log" 2>&1
    echo "bench --compile $mode exit $?" >> "$OUT/bench_compile_$mode.log"
  done
}

part_paper() {  # all 8 first-stage jobs on the GPU at once; the phantoms (512 px) are made on first use
  timeout "$PAPER_LIMIT" $PY -m utils.pipeline --profile paper --name paper_short --force --kernel python3 \
    --jobs-per-gpu 8 -p device "$DEVICE" -p epochs 1 -p warmup_epochs 0 -p save_last_k 1 -p pretrained false \
    "${PAPER_TOY[@]}" > "$OUT/paper.log" 2>&1
  echo "pipeline exit $?" >> "$OUT/paper.log"
  cp submissions/paper_short.csv "$OUT/paper_short.csv" 2>/dev/null
  tar -czf "$OUT/paper_run.tar.gz" --exclude='*.pt' --exclude='*.pth' --exclude=export --exclude=.lock \
    runs/paper_short 2>/dev/null
}

part_gpu_profile() {
  local data=data/device_crops
  rm -rf "$data" && $PY .ci/device_data.py unpack "$DATA_TAR" "$data" > "$OUT/gpu.log" 2>&1 || return 1
  stamp unpacked
  timeout "$PIPELINE_LIMIT" $PY -m utils.pipeline --profile gpu --data "$data" --name gpu --force --kernel python3 \
    --jobs-per-gpu 10 -p device "$DEVICE" "${TOY[@]}" >> "$OUT/gpu.log" 2>&1
  echo "pipeline exit $?" >> "$OUT/gpu.log"
  cp submissions/gpu.csv "$OUT/val_gpu.csv" 2>/dev/null
  tar -czf "$OUT/gpu_run.tar.gz" --exclude='*.pt' --exclude='*.pth' --exclude=export --exclude=.lock runs/gpu \
    2>/dev/null
}

part_search() {  # Table 1 at GPU scale (needs .devdata/train144.npz, see the top)
  timeout "$SEARCH_LIMIT" $PY -m utils.sweep run --profile search_gpu --images "$SEARCH_NPZ" \
    --jobs-per-gpu 10 -p device "$DEVICE" "${SEARCH_TOY[@]}" > "$OUT/search_gpu.log" 2>&1
  echo "search exit $?" >> "$OUT/search_gpu.log"
  cp runs/search_gpu/cv_summary.csv "$OUT/search_gpu_cv_summary.csv" 2>/dev/null
}

part_selfsup() {  # the weights first (the profile names them), then every (model, fold), 10 per GPU
  local data=data/device_crops ssl=runs/ssl_gpu/resnet10t_3ch_144px started=$SECONDS
  left() { local l=$((SELFSUP_LIMIT - SECONDS + started)); echo $((l > 1 ? l : 1)); }  # timeout 0 would not stop
  rm -rf "$data" && $PY .ci/device_data.py unpack "$DATA_TAR" "$data" > "$OUT/selfsup.log" 2>&1 || return 1
  for variant in "simclr_e15" "simclr_e15_dedup0.95 --dedup-correlation 0.95" "byol_e15 --method byol"; do
    read -r name extra <<< "$variant"
    timeout "$(left)" $PY -m utils.selfsup --data "$data" --device "$DEVICE" \
      "${SSL_SIZE[@]}" $extra --out "${ssl}_$name.pth" >> "$OUT/selfsup.log" 2>&1 || return 1
    stamp "selfsup $name"
  done
  timeout "$(left)" $PY -m utils.sweep run --profile selfsup_gpu --data "$data" \
    --jobs-per-gpu 10 -p device "$DEVICE" "${SEARCH_TOY[@]}" >> "$OUT/selfsup.log" 2>&1
  echo "selfsup exit $?" >> "$OUT/selfsup.log"
  cp runs/selfsup_gpu/cv_summary.csv "$OUT/selfsup_gpu_cv_summary.csv" 2>/dev/null
}

part_unpack() {
  mkdir -p "$CARRIED" && $PY .ci/device_data.py unpack "$DATA_TAR" "$CARRIED" >> "$OUT/unpack.log" 2>&1
  echo "unpack exit $? ($(find "$CARRIED" -name '*.png' | wc -l) slices in $CARRIED)" >> "$OUT/unpack.log"
}

part_gpu224() {
  local size=(-p img_size 224); [ "$QUICK" = 1 ] && size=()  # the toy run sets its own
  timeout "$GPU224_LIMIT" $PY -m utils.pipeline --profile gpu --data "$CARRIED" --name gpu224 --force \
    --kernel python3 --jobs-per-gpu 10 -p device "$DEVICE" "${size[@]}" "${TOY[@]}" > "$OUT/gpu224.log" 2>&1
  echo "pipeline exit $?" >> "$OUT/gpu224.log"
  cp submissions/gpu224.csv "$OUT/val_gpu224.csv" 2>/dev/null
  $PY -m utils.predict runs/gpu224/export "$CARRIED/Val" --out "$OUT/val_gpu224_intervals.csv" --interval 0.9 \
    --device "$DEVICE" >> "$OUT/gpu224.log" 2>&1
  $PY -c "from utils import sweep; sweep.cv_table('runs/gpu224', complete_only=False).to_csv('$OUT/gpu224_cv.csv')" \
    >> "$OUT/gpu224.log" 2>&1
  tar -czf "$OUT/gpu224_run.tar.gz" --exclude='*.pt' --exclude='*.pth' --exclude=export --exclude=.lock \
    runs/gpu224 2>/dev/null
}

for part in $PARTS; do
  if ! declare -F "part_$part" > /dev/null; then
    echo "unknown part '$part': choose from bench paper compile gpu_profile search selfsup unpack gpu224" >&2; exit 2
  fi
  stamp "$part"
  "part_$part"
done
stamp done
tail -n 25 "$OUT"/*.log
