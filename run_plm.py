#!/usr/bin/env python
"""Permutation language modeling (XLNet) from one IPU configuration, on IPUs, NVIDIA GPUs or CPUs.

Spans of up to --max_span_length tokens, about --plm_probability of the sequence, are predicted under a random
factorisation order. Flags follow Hugging Face's run_plm.py, plus the IPU training flags (see the README)."""
import logging
from dataclasses import dataclass, field

from transformers import XLNetLMHeadModel

from ipu_train import IPUTrainer
from ipu_train.cli import main_entry
from ipu_train.data import DataCollatorForPLM
from ipu_train.errors import UserError
from ipu_train.loading import build_model, load_config, load_raw_datasets, load_tokenizer, texts
from ipu_train.script_args import DataArguments
from ipu_train.workflow import (columns_to_tokenize, evaluate_and_report, publish, select_splits, start,
                                tokenize_and_group, train_and_save)

logger = logging.getLogger(__name__)


@dataclass
class DataTrainingArguments(DataArguments):
    max_seq_length: int = field(
        default=512, metadata={"help": "Tokens per sequence; must be even (XLNet's leakage-free permutation mask)."})
    plm_probability: float = field(
        default=1 / 6, metadata={"help": "Ratio of the length of a span of masked tokens to its surrounding context."})
    max_span_length: int = field(default=5, metadata={"help": "Longest span of masked tokens."})
    line_by_line: bool = field(
        default=False, metadata={"help": "One sequence per non-empty line (each batch padded to an even length) "
                                         "instead of concatenated blocks."})

    def __post_init__(self):
        super().__post_init__()
        if self.max_seq_length < 2:
            raise UserError(f"--max_seq_length {self.max_seq_length}: use an even length of 2 or more, e.g. 512")
        if self.max_seq_length % 2:
            raise UserError(f"--max_seq_length {self.max_seq_length} is odd: permutation LM needs an even length, "
                            f"e.g. {self.max_seq_length + 1}")
        if not 0 < self.plm_probability < 1:
            raise UserError(f"--plm_probability {self.plm_probability}: use a value between 0 and 1, e.g. 0.1667")
        if self.max_span_length < 1:
            raise UserError(f"--max_span_length {self.max_span_length}: use 1 or more")


@main_entry
def main(argv=None):
    model_args, data_args, training_args, ipu_config, last_checkpoint = start(DataTrainingArguments, argv)

    raw_datasets = load_raw_datasets(data_args, model_args)
    config = load_config(model_args)
    if config.model_type != "xlnet":
        raise UserError(f"permutation LM is implemented for XLNet; this is a {config.model_type} model: pass "
                        "--model_type xlnet or an XLNet --model_name_or_path")
    tokenizer = load_tokenizer(model_args)
    if tokenizer.mask_token is None or tokenizer.pad_token is None:
        raise UserError("permutation LM needs a tokenizer with mask and padding tokens: pass a --tokenizer_name made "
                        "for XLNet (train_tokenizer.py --type unigram)")
    model = build_model(model_args, config, tokenizer, XLNetLMHeadModel, ipu_config)

    text, columns = columns_to_tokenize(raw_datasets, training_args)
    max_seq_length = data_args.max_seq_length

    if data_args.line_by_line:
        def tokenize(examples):
            lines = [line for line in examples[text] if line and not line.isspace()]
            return tokenizer(lines, truncation=True, max_length=max_seq_length)
    else:
        def tokenize(examples):
            # Documents are longer than a block until grouped: verbose=False silences the over-length warning.
            return tokenizer(texts(examples, text), verbose=False)

    lm_datasets = tokenize_and_group(raw_datasets, tokenize, columns, data_args, training_args,
                                     block_size=None if data_args.line_by_line else max_seq_length)
    train_dataset, eval_dataset = select_splits(lm_datasets, data_args, training_args, ipu_config,
                                                f"sequences of {max_seq_length} tokens", "lower --max_seq_length")

    trainer = IPUTrainer(
        model=model,
        ipu_config=ipu_config,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForPLM(
            tokenizer, plm_probability=data_args.plm_probability, max_span_length=data_args.max_span_length),
    )
    if training_args.do_train:
        train_and_save(trainer, training_args, last_checkpoint, train_dataset)
    if training_args.do_eval:
        evaluate_and_report(trainer, eval_dataset)
    publish(trainer, training_args, model_args, data_args, tasks="text-generation")


if __name__ == "__main__":
    main()
