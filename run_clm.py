#!/usr/bin/env python
"""Causal language modeling (GPT-2, GPT, ...) from one IPU configuration, on IPUs, NVIDIA GPUs or CPUs.

Text is tokenized, concatenated and cut into blocks of --block_size tokens; the labels are the inputs (the model
shifts them). Flags follow Hugging Face's run_clm.py, plus the IPU training flags (see the README)."""
import logging
from dataclasses import dataclass, field
from typing import Optional

from transformers import AutoModelForCausalLM, default_data_collator

from ipu_train import IPUTrainer
from ipu_train.cli import main_entry
from ipu_train.errors import UserError
from ipu_train.loading import (build_model, load_config, load_raw_datasets, load_tokenizer, sequence_length,
                               texts)
from ipu_train.metrics import RunningAccuracy, argmax_predictions
from ipu_train.script_args import DataArguments
from ipu_train.workflow import (columns_to_tokenize, evaluate_and_report, publish, select_splits, start,
                                tokenize_and_group, train_and_save)

# The runtime's logger: one logger carries the whole run, which CaptureLogger(<script>.logger) sees.
logger = logging.getLogger("ipu_train")


@dataclass
class DataTrainingArguments(DataArguments):
    block_size: Optional[int] = field(
        default=None, metadata={"help": "Tokens per training block. Default: the model's maximum (at most 1024); "
                                        "a longer request is clamped to it with a warning."})


@main_entry
def main(argv=None):
    model_args, data_args, training_args, ipu_config, last_checkpoint = start(DataTrainingArguments, argv)

    raw_datasets = load_raw_datasets(data_args, model_args)
    config = load_config(model_args)
    tokenizer = load_tokenizer(model_args)
    model = build_model(model_args, config, tokenizer, AutoModelForCausalLM, ipu_config, training_args)

    text, columns = columns_to_tokenize(raw_datasets, training_args)
    block_size = sequence_length(data_args.block_size, "--block_size", tokenizer, config)
    if block_size < 2:  # a block of one token predicts nothing: every loss would be NaN
        raise UserError(f"--block_size {block_size}: a causal LM block needs 2 tokens or more (the first has no "
                        "context to be predicted from), e.g. 128")

    def tokenize(examples):
        # Documents are longer than a block until grouped: verbose=False silences the over-length warning.
        return tokenizer(texts(examples, text), verbose=False)

    lm_datasets = tokenize_and_group(raw_datasets, tokenize, columns, data_args, training_args, block_size,
                                     labels=True)
    train_dataset, eval_dataset = select_splits(lm_datasets, data_args, training_args, ipu_config,
                                                f"blocks of {block_size} tokens", "lower --block_size")
    # Blocks as tensors: the loader stacks them instead of converting Python lists (16 x 1024: 10 ms -> 1 ms a batch).
    train_dataset, eval_dataset = (None if split is None else split.with_format("torch")
                                   for split in (train_dataset, eval_dataset))

    with_accuracy = training_args.do_eval and not training_args.prediction_loss_only
    training_args.batch_eval_metrics = with_accuracy  # metrics fold in batch by batch; no predictions are kept
    trainer = IPUTrainer(
        model=model,
        ipu_config=ipu_config,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=RunningAccuracy(shift=True) if with_accuracy else None,
        preprocess_logits_for_metrics=argmax_predictions if with_accuracy else None,
    )
    if training_args.do_train:
        train_and_save(trainer, training_args, last_checkpoint, train_dataset)
    if training_args.do_eval:
        evaluate_and_report(trainer, eval_dataset)
    publish(trainer, training_args, model_args, data_args, tasks="text-generation")


if __name__ == "__main__":
    main()
