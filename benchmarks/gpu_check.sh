#!/usr/bin/env bash
# The one prepared GPU check (about 6-8 minutes on an H100), every number from the same card in the same call:
#   1. CUDA correctness of the kernels (benchmarks/cuda_check.py): chunked head = plain head in bf16, no host sync;
#   2. our trainer against transformers.Trainer and a plain eager loop: GPT-2 124M (seq 1024, micro-batch 16) and
#      BERT-base pretraining (seq 128, micro-batch 128), bf16 (benchmarks/throughput.py);
#   3. the shared baseline's matmul ceiling and plain compiled loops (benchmarks/hf_baseline_gpu.py);
#   4. while time is left: both trainers with torch_compile on GPT-2.
# One short table last; JSON and the full log under $OUT.
#
# From the repository root, through the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# .whl holds the project's pinned transformers and datasets (+ dill, multiprocess) for the GPU image's Python 3.12
# (see benchmarks/RESULTS.md); they are installed into /tmp/site when present.
# DRY=1 runs steps 2 and 4 with tiny models on the CPU, to check the script anywhere.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
if [ "${DRY:-0}" = 1 ]; then SIZE=tiny; STEPS="--steps 8 --warmup 3"; else SIZE=full; STEPS="--steps 40 --warmup 10"; fi
start=$SECONDS
under() { [ $((SECONDS - start)) -lt "$1" ]; }  # true while the call has run less than $1 seconds

{
  nvidia-smi -L 2>/dev/null
  $PY -c "import torch, transformers, datasets; print('torch', torch.__version__, '| transformers', transformers.__version__, '| datasets', datasets.__version__)"
  if [ "${DRY:-0}" != 1 ]; then
    timeout 150 $PY benchmarks/cuda_check.py || echo "cuda_check FAILED (exit $?)"
  fi
  timeout 200 $PY benchmarks/throughput.py --model gpt2 --size $SIZE $STEPS --json "$OUT/throughput_gpt2.json"
  timeout 160 $PY benchmarks/throughput.py --model bert --size $SIZE $STEPS --json "$OUT/throughput_bert.json"
  [ "${DRY:-0}" != 1 ] && under 330 && timeout 200 $PY benchmarks/hf_baseline_gpu.py gpt2_loop bert_loop
  under 380 && timeout 170 $PY benchmarks/throughput.py --model gpt2 --size $SIZE $STEPS --torch_compile \
    --sides ours,hf --json "$OUT/throughput_gpt2_compiled.json"
  echo "elapsed $((SECONDS - start)) s"
} 2>&1 | tee "$LOG"

$PY benchmarks/summarize.py "$OUT/throughput_gpt2.json" "$OUT/throughput_bert.json" \
  "$OUT/throughput_gpt2_compiled.json" "$OUT/anchors.json" 2>&1 | tee -a "$LOG"
