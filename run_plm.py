#!/usr/bin/env python
"""Permutation language modeling (XLNet) from one IPU configuration, on IPUs, NVIDIA GPUs or CPUs.

Spans of up to --max_span_length tokens, about --plm_probability of the sequence, are predicted under a random
factorisation order. Flags follow Hugging Face's run_plm.py, plus the IPU training flags (see the README)."""
import logging
from dataclasses import dataclass, field
from typing import Optional

from transformers import XLNetLMHeadModel

from ipu_train import IPUTrainer
from ipu_train.cli import main_entry
from ipu_train.data import DataCollatorForPLM
from ipu_train.errors import UserError
from ipu_train.loading import (build_model, load_config, load_raw_datasets, load_tokenizer, sequence_length,
                               texts)
from ipu_train.script_args import DataArguments
from ipu_train.script_args import ModelArguments as SharedModelArguments
from ipu_train.workflow import (columns_to_tokenize, evaluate_and_report, publish, select_splits, start,
                                tokenize_and_group, train_and_save)

# The runtime's logger: one logger carries the whole run, which CaptureLogger(<script>.logger) sees.
logger = logging.getLogger("ipu_train")


@dataclass
class ModelArguments(SharedModelArguments):
    model_type: Optional[str] = field(
        default="xlnet", metadata={"help": "Model type to build from scratch. Default xlnet: with no "
                                           "--model_name_or_path or --config_name, a new XLNet from XLNetConfig() "
                                           "plus --config_overrides, as in Hugging Face's run_plm.py."})


@dataclass
class DataTrainingArguments(DataArguments):
    max_seq_length: Optional[int] = field(
        default=None, metadata={"help": "Tokens per sequence; must be even (XLNet's leakage-free permutation mask). "
                                        "Default: the tokenizer's maximum, at most 512; a longer request is clamped "
                                        "to it with a warning, and an odd maximum rounded down."})
    plm_probability: float = field(
        default=1 / 6, metadata={"help": "Ratio of the length of a span of masked tokens to its surrounding context."})
    max_span_length: int = field(default=5, metadata={"help": "Longest span of masked tokens."})
    line_by_line: bool = field(
        default=False, metadata={"help": "One sequence per non-empty line (each batch padded to an even length) "
                                         "instead of concatenated blocks."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "With --line_by_line, pad every line to --max_seq_length (static shapes) "
                                         "instead of padding each batch to its longest line."})

    def __post_init__(self):
        super().__post_init__()
        length = self.max_seq_length
        if length is not None and length < 2:
            raise UserError(f"--max_seq_length {length}: use an even length of 2 or more, e.g. 512")
        if length is not None and length % 2:
            raise UserError(f"--max_seq_length {length} is odd: permutation LM needs an even length, e.g. {length + 1}")
        if not 0 < self.plm_probability < 1:
            raise UserError(f"--plm_probability {self.plm_probability}: use a value between 0 and 1, e.g. 0.1667")
        if self.max_span_length < 1:
            raise UserError(f"--max_span_length {self.max_span_length}: use 1 or more")


def even_sequence_length(data_args, tokenizer, config):
    """--max_seq_length, else the tokenizer's maximum (at most 512, Hugging Face's default), clamped as in
    run_mlm.py. A clamped length that is odd is rounded down: permutation LM needs an even one."""
    length = sequence_length(data_args.max_seq_length, "--max_seq_length", tokenizer, config, default=512)
    if length < 2:
        raise UserError(f"the tokenizer takes at most {length} token per sequence: permutation LM needs 2 or more")
    if length % 2:
        logger.warning("--max_seq_length: the tokenizer allows %d tokens, an odd length; using %d (permutation LM "
                       "needs an even length).", length, length - 1)
    return length - length % 2


@main_entry
def main(argv=None):
    model_args, data_args, training_args, ipu_config, last_checkpoint = start(
        DataTrainingArguments, argv, model_arguments_class=ModelArguments)

    raw_datasets = load_raw_datasets(data_args, model_args)
    config = load_config(model_args)
    if config.model_type != "xlnet":
        raise UserError(f"permutation LM is implemented for XLNet; this is a {config.model_type} model: pass "
                        "--model_type xlnet or an XLNet --model_name_or_path")
    tokenizer = load_tokenizer(model_args)
    if tokenizer.mask_token is None or tokenizer.pad_token is None:
        raise UserError("permutation LM needs a tokenizer with mask and padding tokens: pass a --tokenizer_name made "
                        "for XLNet (train_tokenizer.py --type unigram)")
    model = build_model(model_args, config, tokenizer, XLNetLMHeadModel, ipu_config, training_args)

    text, columns = columns_to_tokenize(raw_datasets, training_args)
    max_seq_length = even_sequence_length(data_args, tokenizer, config)

    if data_args.line_by_line:
        padding = "max_length" if data_args.pad_to_max_length else False

        def tokenize(examples):
            lines = [line for line in examples[text] if line and not line.isspace()]
            return tokenizer(lines, padding=padding, truncation=True, max_length=max_seq_length)
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
