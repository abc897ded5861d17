#!/usr/bin/env bash
# Packed against padded phase-2 BERT-base pretraining at sequence 512 on one GPU (issue 15, point 6), in at most
# about 4 minutes on an H100 or H200: benchmarks/packing.py on the bundled corpus's pairs, BERT-base (vocabulary
# 30522), bf16 autocast, both sides the same rows per step, their steps taken in turn; where packed rows take the
# variable-length kernel, a third side trains them through the mask. In order of importance, each
# run started only while the call has time left for it:
#   1. 512, eager, 64 rows per step, masked tokens capped as run_pretraining.py trains: the comparison issue 15 asks;
#   2. 128, eager, 128 rows per step (phase 1, gpu_check.sh's micro-batch);
#   3. 512 compiled (torch.compile, as the trainer runs on CUDA by default), without the packed_mask side (two
#      models to compile, not three);
#   4. 512, eager, every masked token gathered (no cap): what the packed rows' larger MLM head costs.
# $OUT gets gpu_packing.log and results.json (each run's JSON under its name, and one table).
#
# From the repository root, through the device tool:
#   run(command="bash benchmarks/gpu_packing.sh", carry=[".whl"], timeout_s=300)
# .whl holds the project's pinned transformers and datasets for the GPU image's Python 3.12; benchmarks/gpu_setup.sh
# installs them into /tmp/site when present.
# DRY=1 runs the same steps on the CPU with the small model, few rows and steps, and the compile step through
# TorchDynamo's eager backend, to check the script anywhere (about a minute).
set -u
start=$SECONDS  # every step's guard counts from here: the call must end inside the tool's limit (300 s asked)
cd "$(dirname "$0")/.."
NAME=gpu_packing
source benchmarks/gpu_setup.sh  # PY, OUT, WORK (each run's JSON), LOG; the .whl wheels; PYTHONPATH
export HF_DATASETS_DISABLE_PROGRESS_BARS=1

DRY=${DRY:-0}
if [ "$DRY" = 1 ]; then
  BENCH="$PY benchmarks/packing.py --size small --device cpu --bf16 --warmup 1 --steps 2 --collate_rows 8"
  BENCH="$BENCH --collate_batches 1"
  ROWS_512="--rows 4"; ROWS_128="--rows 8"; COMPILE="--compile --compile_backend eager"
else
  BENCH="$PY benchmarks/packing.py --size bert-base --device cuda --bf16 --warmup 5 --steps 20 --collate_batches 5"
  ROWS_512="--rows 64"; ROWS_128="--rows 128"; COMPILE="--compile"
fi
under() { [ $((SECONDS - start)) -lt "$1" ]; }  # true while the call has run less than $1 seconds

{
  nvidia-smi -L 2>/dev/null
  $PY -c "import torch, transformers, datasets; print('torch', torch.__version__, '| transformers', transformers.__version__, '| datasets', datasets.__version__)"
  echo "== 512, eager, masked tokens capped as in training"
  timeout 100 $BENCH --seq 512 $ROWS_512 --cap --json "$WORK/packing_512.json" || echo "FAILED (exit $?)"
  echo "== 128, eager, masked tokens capped"
  under 150 && { timeout 50 $BENCH --seq 128 $ROWS_128 --cap --json "$WORK/packing_128.json" \
    || echo "FAILED (exit $?)"; }
  echo "== 512, compiled, masked tokens capped"
  under 100 && { timeout 150 $BENCH --seq 512 $ROWS_512 --cap $COMPILE --no_packed_mask \
    --json "$WORK/packing_512_compiled.json" \
    || echo "FAILED (exit $?)"; }
  echo "== 512, eager, every masked token gathered"
  under 215 && { timeout 35 $BENCH --seq 512 $ROWS_512 --json "$WORK/packing_512_uncapped.json" \
    || echo "FAILED (exit $?)"; }
  echo "elapsed $((SECONDS - start)) s"
} 2>&1 | tee "$LOG"

$PY benchmarks/summarize.py --combined "$OUT/results.json" "$WORK"/packing_*.json 2>&1 | tee -a "$LOG"
