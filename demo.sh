#!/usr/bin/env bash
# The README's first command (`make demo`): train a tokenizer and a small GPT-2 from scratch on the bundled corpus,
# on whatever this machine has (a GPU if present, else the CPU), and report validation perplexity before and after.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-.venv/bin/python}
TOKENIZER=output/demo-tokenizer
MODEL=output/demo-gpt2

"$PYTHON" train_tokenizer.py --type bpe --style gpt2 --files data/corpus/train.txt --vocab_size 8000 \
    --output_dir "$TOKENIZER"

"$PYTHON" run_clm.py \
    --model_type gpt2 --config_overrides "n_layer=4,n_embd=256,n_head=4,n_positions=128" \
    --tokenizer_name "$TOKENIZER" \
    --train_file data/corpus/train.txt --validation_file data/corpus/validation.txt --block_size 128 \
    --ipu_config_name ipu_configs/gpt2 \
    --ipu_config_overrides "layers_per_ipu=[0 -1 -1 -1],recompute_checkpoint_every_layer=false,gradient_accumulation_steps=1" \
    --do_train --do_eval --eval_on_start --num_train_epochs 1 \
    --per_device_train_batch_size 16 --per_device_eval_batch_size 16 \
    --learning_rate 1e-3 --warmup_steps 20 --lr_scheduler_type cosine --weight_decay 0.01 \
    --logging_steps 20 --save_strategy no --report_to none --seed 42 \
    --output_dir "$MODEL" --overwrite_output_dir

"$PYTHON" - "$MODEL" <<'PY'
import json, math, sys
model = sys.argv[1]
history = json.load(open(f"{model}/trainer_state.json"))["log_history"]
before = next(entry["eval_loss"] for entry in history if "eval_loss" in entry)
after = json.load(open(f"{model}/eval_results.json"))["eval_loss"]
print(f"\nValidation perplexity: {math.exp(before):,.0f} before training -> {math.exp(after):,.1f} after.")
print(f"Model, tokenizer and ipu_config.json saved in {model}/")
PY
