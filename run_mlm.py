#!/usr/bin/env python
"""Masked language modeling (BERT, RoBERTa, DistilBERT, ALBERT, ...) from one IPU configuration, on IPUs, NVIDIA
GPUs or CPUs.

Training masks tokens dynamically (80% [MASK], 10% random, 10% kept) with a static cap on masked tokens per
sequence, so the model predicts only at masked positions; evaluation masks without a cap. Flags follow Hugging
Face's run_mlm.py, plus the IPU training flags (see the README)."""
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Optional

from transformers import AutoModelForMaskedLM

from ipu_train import IPUTrainer
from ipu_train.cli import main_entry
from ipu_train.data import DataCollatorForCappedMLM, masked_token_cap
from ipu_train.errors import UserError
from ipu_train.loading import (build_model, load_config, load_raw_datasets, load_tokenizer, sequence_length,
                               texts)
from ipu_train.metrics import RunningAccuracy, argmax_predictions
from ipu_train.script_args import DataArguments, check_mlm_probability
from ipu_train.workflow import (columns_to_tokenize, evaluate_and_report, pack_splits, packed_collator, publish,
                                select_splits, start, tokenize_and_group, train_and_save)

# The runtime's logger: one logger carries the whole run, which CaptureLogger(<script>.logger) sees.
logger = logging.getLogger("ipu_train")


@dataclass
class DataTrainingArguments(DataArguments):
    max_seq_length: Optional[int] = field(
        default=None, metadata={"help": "Tokens per sequence. Default: the model's maximum (at most 1024); a longer "
                                        "request is clamped to it with a warning."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Share of tokens to mask."})
    line_by_line: bool = field(
        default=False, metadata={"help": "One sequence per non-empty line instead of concatenated blocks."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "With --line_by_line, pad every line to --max_seq_length (static shapes) "
                                         "instead of padding each batch to its longest line."})
    whole_word_masking: bool = field(default=False, metadata={"help": "Mask whole words rather than tokens."})

    def __post_init__(self):
        super().__post_init__()
        check_mlm_probability(self.mlm_probability)

    def check_packing(self):
        if not self.line_by_line:
            raise UserError("--pack_sequences packs lines, and grouped blocks are full rows already: add "
                            "--line_by_line, or drop --pack_sequences")
        if self.pad_to_max_length:
            raise UserError("--pack_sequences fills rows of --max_seq_length itself, and padded lines leave no room to "
                            "pack: drop --pad_to_max_length")


@main_entry
def main(argv=None):
    model_args, data_args, training_args, ipu_config, last_checkpoint = start(DataTrainingArguments, argv)

    raw_datasets = load_raw_datasets(data_args, model_args)
    config = load_config(model_args)
    tokenizer = load_tokenizer(model_args)
    if tokenizer.mask_token is None:
        raise UserError("this tokenizer has no mask token, so it cannot be used for masked LM: pass a --tokenizer_name "
                        "made for BERT/RoBERTa (train_tokenizer.py --type wordpiece, or --type bpe --style roberta)")
    model = build_model(model_args, config, tokenizer, AutoModelForMaskedLM, ipu_config, training_args)

    text, columns = columns_to_tokenize(raw_datasets, training_args)
    max_seq_length = sequence_length(data_args.max_seq_length, "--max_seq_length", tokenizer, config)
    word_ids = data_args.whole_word_masking  # whole-word masking needs each token's word index

    if data_args.line_by_line:
        padding = "max_length" if data_args.pad_to_max_length else False

        def tokenize(examples):
            lines = [line for line in examples[text] if line and not line.isspace()]
            encoded = tokenizer(lines, padding=padding, truncation=True, max_length=max_seq_length,
                                return_special_tokens_mask=True)
            if word_ids:
                encoded["word_ids"] = [encoded.word_ids(i) for i in range(len(lines))]
            return encoded
    else:
        def tokenize(examples):
            # Documents are longer than a block until grouped: verbose=False silences the over-length warning.
            documents = texts(examples, text)
            encoded = tokenizer(documents, return_special_tokens_mask=True, verbose=False)
            if word_ids:
                encoded["word_ids"] = [encoded.word_ids(i) for i in range(len(documents))]
            return encoded

    lm_datasets = tokenize_and_group(raw_datasets, tokenize, columns, data_args, training_args,
                                     block_size=None if data_args.line_by_line else max_seq_length)
    train_dataset, eval_dataset = select_splits(lm_datasets, data_args, training_args, ipu_config,
                                                f"sequences of {max_seq_length} tokens", "lower --max_seq_length")

    train_collator = DataCollatorForCappedMLM(
        tokenizer, mlm_probability=data_args.mlm_probability,
        max_masked_tokens=masked_token_cap(max_seq_length, data_args.mlm_probability),
        whole_word_mask=data_args.whole_word_masking,
        pad_to_multiple_of=8 if data_args.line_by_line and not data_args.pad_to_max_length else None)
    eval_collator = dataclasses.replace(train_collator, max_masked_tokens=None)  # never drop a masked token
    if data_args.pack_sequences:  # several lines per row, each masked as alone and attending only to itself
        train_dataset, eval_dataset = pack_splits(train_dataset, eval_dataset, data_args, max_seq_length, model)
        train_collator, eval_collator = (packed_collator(collator, data_args, max_seq_length, tokenizer, model)
                                         for collator in (train_collator, eval_collator))
    with_accuracy = training_args.do_eval and not training_args.prediction_loss_only
    training_args.batch_eval_metrics = with_accuracy  # metrics fold in batch by batch; no predictions are kept
    trainer = IPUTrainer(
        model=model,
        ipu_config=ipu_config,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=train_collator,
        eval_data_collator=eval_collator,
        compute_metrics=RunningAccuracy() if with_accuracy else None,
        preprocess_logits_for_metrics=argmax_predictions if with_accuracy else None,
    )
    if training_args.do_train:
        train_and_save(trainer, training_args, last_checkpoint, train_dataset)
    if training_args.do_eval:
        evaluate_and_report(trainer, eval_dataset)
    publish(trainer, training_args, model_args, data_args, tasks="fill-mask")


if __name__ == "__main__":
    main()
