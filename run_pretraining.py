#!/usr/bin/env python
"""BERT pretraining: masked LM + next-sentence prediction, from one IPU configuration, on IPUs, NVIDIA GPUs or CPUs.

Data comes in three forms:
- raw text (--train_file .txt with documents separated by blank lines, or one document per record in other files
  and hub datasets): sentence pairs are built as in the original BERT recipe, then masked dynamically;
- pre-tokenized pairs with `input_ids`, `attention_mask`, `token_type_ids`, `next_sentence_label` (and `labels`
  with --is_already_masked), from the hub (--dataset_name Graphcore/wikipedia-bert-128 --is_already_preprocessed)
  or from disk (--dataset_path, a dataset saved with `save_to_disk`, e.g. by --save_preprocessed_dataset).
In training the MLM predictions are computed only at the (capped) masked positions."""
import dataclasses
import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import datasets
from transformers import AutoModelForPreTraining, DataCollatorForTokenClassification

from ipu_train import IPUTrainer
from ipu_train.cli import main_entry
from ipu_train.data import DataCollatorForCappedMLM, masked_token_cap, nsp_pair_builder, read_text_documents
from ipu_train.errors import UserError
from ipu_train.loading import (build_model, column_names, load_config, load_raw_datasets, load_tokenizer,
                               local_data_files, refuse_non_utf8, sequence_length, split_off_validation,
                               text_column)
from ipu_train.metrics import RunningPretrainingMetrics, pretraining_batch_statistics
from ipu_train.packing import accept_packed_pretraining_rows
from ipu_train.script_args import DataArguments, check_mlm_probability
from ipu_train.workflow import (evaluate_and_report, pack_splits, packed_collator, publish, select_splits, start,
                                train_and_save)

# The runtime's logger: one logger carries the whole run, which CaptureLogger(<script>.logger) sees.
logger = logging.getLogger("ipu_train")

PAIR_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "next_sentence_label")
MIN_PAIR_LENGTH = 5


@dataclass
class DataTrainingArguments(DataArguments):
    dataset_path: Optional[str] = field(
        default=None, metadata={"help": "A pre-tokenized dataset saved with `save_to_disk` (for instance by "
                                        "--save_preprocessed_dataset)."})
    is_already_preprocessed: bool = field(
        default=False, metadata={"help": "The dataset already holds tokenized sentence pairs (columns "
                                         f"{', '.join(PAIR_COLUMNS)})."})
    is_already_masked: bool = field(
        default=False, metadata={"help": "The pre-tokenized dataset is also masked: it has a `labels` column."})
    save_preprocessed_dataset: Optional[str] = field(
        default=None, metadata={"help": "Write the tokenized sentence pairs here, so later runs can start at once "
                                        "with --dataset_path."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per sentence pair, [CLS] and [SEP]s included."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Share of tokens to mask."})
    whole_word_masking: bool = field(default=False, metadata={"help": "Mask whole words rather than tokens."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every pair to --max_seq_length (static shapes, e.g. for compiled "
                                         "steps) instead of padding each batch to its longest pair."})
    short_seq_probability: float = field(
        default=0.1, metadata={"help": "Probability of a pair shorter than --max_seq_length (BERT recipe)."})
    nsp_probability: float = field(
        default=0.5, metadata={"help": "Probability that segment B comes from another document."})

    def training_source(self):
        return self.dataset_path or super().training_source()

    def __post_init__(self):
        super().__post_init__()
        if self.dataset_path is not None:
            # The saved pairs are the whole data: other sources would be ignored, and there is nothing to save.
            others = [flag for flag in ("train_file", "validation_file", "dataset_name") if getattr(self, flag)]
            if others:
                named = " and ".join(f"--{flag} {getattr(self, flag)}" for flag in others)
                raise UserError(f"--dataset_path {self.dataset_path} holds all the data (saved pairs), so {named} "
                                f"would be ignored: drop {' and '.join('--' + flag for flag in others)} to train on "
                                "the saved pairs, or drop --dataset_path to use those instead")
            if self.save_preprocessed_dataset is not None:
                raise UserError(f"--dataset_path {self.dataset_path} is already preprocessed, so "
                                f"--save_preprocessed_dataset {self.save_preprocessed_dataset} has nothing to save: "
                                "drop --save_preprocessed_dataset")
            self.is_already_preprocessed = True
        if self.is_already_masked and not self.is_already_preprocessed:
            raise UserError("--is_already_masked needs pre-tokenized data: add --is_already_preprocessed, or "
                            "--dataset_path")
        if self.streaming and not self.is_already_preprocessed:
            raise UserError("--streaming needs --is_already_preprocessed data: building next-sentence pairs from raw "
                            "text draws random segments from the whole corpus")
        check_mlm_probability(self.mlm_probability)
        for flag in ("short_seq_probability", "nsp_probability"):
            if not 0 <= getattr(self, flag) <= 1:
                raise UserError(f"--{flag} {getattr(self, flag)}: use a probability between 0 and 1")
        if self.max_seq_length < MIN_PAIR_LENGTH:
            raise UserError(f"--max_seq_length {self.max_seq_length}: a sentence pair needs at least "
                            f"{MIN_PAIR_LENGTH} tokens ([CLS] A [SEP] B [SEP]); 128 is usual")

    def check_packing(self):
        if self.pad_to_max_length:
            raise UserError("--pack_sequences fills rows of --max_seq_length itself: drop --pad_to_max_length")


def load_documents(data_args, model_args):
    """Raw text, one record per document: .txt files are split on blank lines; other files and hub datasets hold
    one document per record."""
    files = {} if data_args.dataset_name is not None else local_data_files(data_args)
    if not files or not all(path.endswith(".txt") for path in files.values()):
        return load_raw_datasets(data_args, model_args)
    try:
        splits = {split: datasets.Dataset.from_dict({"text": read_text_documents(path)})
                  for split, path in files.items()}
    except UnicodeDecodeError:
        refuse_non_utf8(files)  # names the file, line and byte
        raise
    if "validation" not in splits:
        return split_off_validation(splits["train"], data_args.validation_split_percentage)
    return datasets.DatasetDict(splits)


def load_pairs(data_args, model_args, training_args, tokenizer, max_seq_length):
    """Tokenized sentence pairs for every split, from disk, the hub, or built from raw text."""
    if data_args.dataset_path is not None:
        if not os.path.isdir(data_args.dataset_path):
            raise UserError(f"--dataset_path {data_args.dataset_path} does not exist: give a directory written by "
                            "`save_to_disk` or --save_preprocessed_dataset")
        loaded = datasets.load_from_disk(data_args.dataset_path)
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict(train=loaded)
        if "validation" not in loaded:
            loaded = split_off_validation(loaded["train"], data_args.validation_split_percentage)
        return loaded
    if data_args.is_already_preprocessed:
        return load_raw_datasets(data_args, model_args)

    documents = load_documents(data_args, model_args)
    pairs = datasets.DatasetDict()
    with training_args.main_process_first(desc="building next-sentence pairs"):
        for split, split_documents in documents.items():
            text = text_column(split_documents)
            build = nsp_pair_builder(tokenizer, max_seq_length, data_args.short_seq_probability,
                                     data_args.nsp_probability, seed=training_args.seed,
                                     corpus=split_documents[text], text_column=text)
            pairs[split] = split_documents.map(
                build, batched=True, with_indices=True, remove_columns=column_names(split_documents),
                num_proc=data_args.preprocessing_num_workers, load_from_cache_file=not data_args.overwrite_cache,
                desc="Building sentence pairs")
            if len(pairs[split]) == 0:
                raise UserError(f"no sentence pair could be built from the {split} text ({len(split_documents)} "
                                "documents): a pair needs a document of two sentences or more; add text")
    if data_args.save_preprocessed_dataset and training_args.should_save:
        pairs.save_to_disk(data_args.save_preprocessed_dataset)
        logger.info("Saved the tokenized pairs to %s: pass --dataset_path %s next time.",
                    data_args.save_preprocessed_dataset, data_args.save_preprocessed_dataset)
    return pairs


def keep_pair_columns(pairs, data_args):
    needed = PAIR_COLUMNS + (("labels",) if data_args.is_already_masked else ())
    for split, dataset in pairs.items():
        present = column_names(dataset)
        missing = [name for name in needed if name not in present]
        if missing:
            raise UserError(f"the {split} data lacks the column(s) {', '.join(missing)} that pre-tokenized pairs "
                            "need: drop --is_already_preprocessed / --is_already_masked to build pairs from raw text")
        pairs[split] = dataset.remove_columns([name for name in present if name not in needed])
    return pairs


@main_entry
def main(argv=None):
    model_args, data_args, training_args, ipu_config, last_checkpoint = start(DataTrainingArguments, argv)

    config = load_config(model_args)
    tokenizer = load_tokenizer(model_args)
    model = build_model(model_args, config, tokenizer, AutoModelForPreTraining, ipu_config, training_args)
    if "next_sentence_label" not in inspect.signature(model.forward).parameters:
        raise UserError(f"pretraining needs a model with a next-sentence head; {type(model).__name__} has none: pass "
                        "--model_type bert, or a BERT --model_name_or_path (run_mlm.py trains masked LM alone)")
    max_seq_length = sequence_length(data_args.max_seq_length, "--max_seq_length", tokenizer, config)

    pairs = keep_pair_columns(load_pairs(data_args, model_args, training_args, tokenizer, max_seq_length), data_args)
    train_dataset, eval_dataset = select_splits(pairs, data_args, training_args, ipu_config,
                                                f"sentence pairs of at most {max_seq_length} tokens",
                                                "lower --max_seq_length")

    if data_args.is_already_masked:  # pad the pairs, and their labels with -100
        train_collator = eval_collator = DataCollatorForTokenClassification(
            tokenizer, pad_to_multiple_of=max_seq_length if data_args.pad_to_max_length else 8)
    else:
        train_collator = DataCollatorForCappedMLM(
            tokenizer, mlm_probability=data_args.mlm_probability,
            max_masked_tokens=masked_token_cap(max_seq_length, data_args.mlm_probability),
            whole_word_mask=data_args.whole_word_masking,
            pad_to_multiple_of=max_seq_length if data_args.pad_to_max_length else 8)
        eval_collator = dataclasses.replace(train_collator, max_masked_tokens=None)
    if data_args.pack_sequences:  # several pairs per row, each masked as alone, its NSP read at its own [CLS]
        train_dataset, eval_dataset = pack_splits(train_dataset, eval_dataset, data_args, max_seq_length, model)
        train_collator, eval_collator = (packed_collator(collator, data_args, max_seq_length, tokenizer, model)
                                         for collator in (train_collator, eval_collator))
        accept_packed_pretraining_rows(model)
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
        compute_metrics=RunningPretrainingMetrics() if with_accuracy else None,
        preprocess_logits_for_metrics=pretraining_batch_statistics if with_accuracy else None,
    )
    if training_args.do_train:
        train_and_save(trainer, training_args, last_checkpoint, train_dataset)
    if training_args.do_eval:
        # Perplexity is the MLM loss's; --prediction_loss_only leaves the MLM loss (and so perplexity) out.
        evaluate_and_report(trainer, eval_dataset, loss_key="eval_mlm_loss" if with_accuracy else None)
    publish(trainer, training_args, model_args, data_args, tasks="fill-mask")


if __name__ == "__main__":
    main()
