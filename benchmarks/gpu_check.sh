#!/usr/bin/env bash
# The one prepared GPU check (about 9 minutes on an H200), every number from the same card in one call.
# The most important numbers come first; a later step starts only while the call has time left for it. The order
# follows the first run (2026-11-28, benchmarks/RESULTS.md): what it measured is not repeated unless it is the
# side-by-side comparison, and what it left open comes early:
#   1. CUDA correctness of the kernels and of our step (benchmarks/cuda_check.py, which also says which attention
#      kernel the compiled steps ask for), and the bf16 matmul ceiling;
#   2. our trainer (its defaults: compiled on CUDA) against transformers.Trainer (its defaults: eager), bf16:
#      GPT-2 124M (seq 1024, micro-batch 16), then BERT-base pretraining (seq 128, micro-batch 128);
#   3. BERT with --cuda_graphs, and BERT's timed steps under sync debug mode (is the step host-bound, or waiting?);
#   4. the real scripts on pre-tokenized synthetic data, --max_steps: run_clm.py (GPT-2) and run_pretraining.py
#      (BERT), their train_tokens_per_second set against the benchmark's;
#   5. BERT without host overlap, a kernel profile of our GPT-2 step, transformers.Trainer compiled on GPT-2, and
#      ours eager on GPT-2.
# One table last. $OUT gets gpu_check.log, results.json (every JSON of the run in one file), the GPU kernel table
# kernels_ours_gpt2_full.txt and the sync report syncs_ours_bert_full.txt.
#
# From the repository root, through the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# .whl holds the project's pinned transformers and datasets (+ dill, multiprocess) for the GPU image's Python 3.12
# (see benchmarks/RESULTS.md); benchmarks/gpu_setup.sh installs them into /tmp/site when present.
# DRY=1 runs steps 2 to 5 with tiny models on the CPU, to check the script anywhere (about 2 minutes).
set -u
start=$SECONDS  # every step's guard counts from here: the call must end inside the tool's 600 s
cd "$(dirname "$0")/.."
NAME=gpu_check
source benchmarks/gpu_setup.sh  # PY, OUT, WORK (intermediate JSON and data), LOG; the .whl wheels; PYTHONPATH

DRY=${DRY:-0}
if [ "$DRY" = 1 ]; then
  SIZE=tiny; WARMUP=4; STEPS="--steps 12 --warmup $WARMUP"; SCRIPT_STEPS=12
  # the tiny models of throughput.py --size tiny; the scripts split 5% off for validation, hence the spare rows
  GPT2="--config_overrides vocab_size=4096,n_layer=2,n_embd=64,n_head=2 --block_size 128 --per_device_train_batch_size 8"
  GPT2_DATA="--seq 128 --vocab 4096 --rows 104"
  BERT="--config_overrides vocab_size=4096,num_hidden_layers=2,hidden_size=64,num_attention_heads=2,intermediate_size=256"
  BERT="$BERT --per_device_train_batch_size 16"
  BERT_DATA="--seq 128 --vocab 4096 --rows 208"
else
  SIZE=full; WARMUP=10; STEPS="--steps 40 --warmup $WARMUP"; SCRIPT_STEPS=40
  GPT2="--config_overrides vocab_size=50257 --block_size 1024 --per_device_train_batch_size 16"
  GPT2_DATA="--seq 1024 --vocab 50257 --rows 760"  # 40 steps x 16 sequences, 5% split off for validation
  BERT="--config_overrides vocab_size=30522 --per_device_train_batch_size 128"
  BERT_DATA="--seq 128 --vocab 30522 --rows 5700"  # 40 steps x 128 pairs, 5% split off for validation
fi
under() { [ $((SECONDS - start)) -lt "$1" ]; }  # true while the call has run less than $1 seconds
THROUGHPUT="$PY benchmarks/throughput.py --size $SIZE $STEPS"
COMMON="--do_train --max_steps $SCRIPT_STEPS --throughput_warmup_steps $WARMUP --seed 0 --report_to none
  --save_strategy no --logging_steps 1000 --disable_tqdm true --skip_memory_metrics false --overwrite_output_dir"

script_clm() {  # run_clm.py on a parquet of token ids (no text column: it only groups them into blocks)
  $PY benchmarks/make_pretokenized.py clm "$WORK/clm_data" $GPT2_DATA \
    && $PY train_tokenizer.py --type bpe --style gpt2 --files data/corpus/train.txt --vocab_size 1000 \
         --output_dir "$WORK/tok_bpe" >/dev/null \
    && timeout 150 $PY run_clm.py --model_type gpt2 --tokenizer_name "$WORK/tok_bpe" --train_file "$WORK/clm_data/train.parquet" \
         $GPT2 --ipu_config_name ipu_configs/gpt2 \
         --ipu_config_overrides "layers_per_ipu=[-1],gradient_accumulation_steps=1,recompute_checkpoint_every_layer=false" \
         --output_dir "$WORK/clm_out" $COMMON >"$WORK/clm.log" 2>&1 \
    && cp "$WORK/clm_out/train_results.json" "$WORK/script_gpt2.json" \
    || { echo "run_clm.py FAILED; the end of its log:"; tail -n 25 "$WORK/clm.log"; }
}

script_pretraining() {  # run_pretraining.py on saved sentence pairs, masked by the script's collator
  $PY benchmarks/make_pretokenized.py pairs "$WORK/pairs" $BERT_DATA \
    && $PY train_tokenizer.py --type wordpiece --files data/corpus/train.txt --vocab_size 1000 \
         --output_dir "$WORK/tok_wordpiece" >/dev/null \
    && timeout 130 $PY run_pretraining.py --model_type bert --tokenizer_name "$WORK/tok_wordpiece" --dataset_path "$WORK/pairs" \
         $BERT --max_seq_length 128 --ipu_config_name ipu_configs/bert-base \
         --ipu_config_overrides "layers_per_ipu=[-1],gradient_accumulation_steps=1,recompute_checkpoint_every_layer=false" \
         --output_dir "$WORK/pretraining_out" $COMMON >"$WORK/pretraining.log" 2>&1 \
    && cp "$WORK/pretraining_out/train_results.json" "$WORK/script_bert.json" \
    || { echo "run_pretraining.py FAILED; the end of its log:"; tail -n 25 "$WORK/pretraining.log"; }
}

{
  nvidia-smi -L 2>/dev/null
  $PY -c "import torch, transformers, datasets, pyarrow, fsspec; print('torch', torch.__version__, '| transformers', transformers.__version__, '| datasets', datasets.__version__, '| pyarrow', pyarrow.__version__, '| fsspec', fsspec.__version__)"
  if [ "$DRY" != 1 ]; then
    timeout 120 $PY benchmarks/cuda_check.py || echo "cuda_check FAILED (exit $?)"
    OUT=$WORK timeout 60 $PY benchmarks/hf_baseline_gpu.py peak_only  # the bf16 matmul ceiling alone
  fi
  echo "== GPT-2: ours (defaults) vs transformers.Trainer (defaults)"
  timeout 200 $THROUGHPUT --json "$WORK/throughput_gpt2.json" --model gpt2 --sides ours,hf
  echo "== BERT pretraining: ours (defaults) vs transformers.Trainer (defaults)"
  under 330 && timeout 170 $THROUGHPUT --json "$WORK/throughput_bert.json" --model bert --sides ours,hf
  echo "== BERT pretraining: ours with --cuda_graphs (is the step host-bound?)"
  [ "$DRY" != 1 ] && under 330 && timeout 90 $THROUGHPUT --json "$WORK/throughput_bert_ours_graphs.json" --model bert --sides ours --cuda_graphs
  echo "== BERT pretraining: every operation of our timed steps that makes the host wait (sync debug mode)"
  [ "$DRY" != 1 ] && under 360 && timeout 60 $THROUGHPUT --json "$WORK/throughput_bert_sync_debug.json" --model bert --sides ours --sync_debug \
    --steps $((WARMUP + 3)) --warmup $WARMUP
  echo "== run_clm.py, pre-tokenized"
  under 380 && script_clm
  echo "== run_pretraining.py, pre-tokenized"
  under 420 && script_pretraining
  echo "== BERT pretraining: ours without host overlap (no read-ahead, every group's read in place)"
  under 460 && timeout 60 $THROUGHPUT --json "$WORK/throughput_bert_no_host_overlap.json" --model bert --sides ours --no_host_overlap
  echo "== where our GPT-2 step's device time goes (torch.profiler, 3 steps after the warm-up)"
  under 480 && timeout 60 $THROUGHPUT --json "$WORK/kernels_gpt2.json" --model gpt2 --sides ours --kernel_profile \
    --steps $((WARMUP + 3)) --warmup $WARMUP
  echo "== GPT-2: transformers.Trainer with torch_compile=True"
  under 460 && timeout 150 $THROUGHPUT --json "$WORK/throughput_gpt2_hf_compiled.json" --model gpt2 --sides hf --torch_compile
  echo "== GPT-2: ours eager (--no_torch_compile)"
  under 520 && timeout 60 $THROUGHPUT --json "$WORK/throughput_gpt2_ours_eager.json" --model gpt2 --sides ours --no_torch_compile
  echo "elapsed $((SECONDS - start)) s"
} 2>&1 | tee "$LOG"

$PY benchmarks/summarize.py --combined "$OUT/results.json" "$WORK"/anchors.json "$WORK"/throughput_*.json \
  "$WORK"/script_*.json 2>&1 | tee -a "$LOG"
