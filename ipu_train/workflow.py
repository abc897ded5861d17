"""The steps every script shares, in the order of the Hugging Face example scripts: start (flags, logging, the
checkpoint to resume from, the IPU configuration, the seed), tokenize and group, pick the splits, train (resuming
when asked), save, evaluate, report metrics, and write the model card."""
import inspect
import logging

import datasets
from transformers import set_seed

from .arguments import IPUTrainingArguments, load_ipu_config
from .parallel import check_replication, replicas_that_fit
from .checkpoint import resume_checkpoint
from .cli import ScriptArgumentParser, setup_logging
from .data import group_texts
from .loading import check_hub_access, column_names, perplexity, require_samples, text_column
from .errors import RunFailed, UserError, one_line
from .output_dir import check_writable
from .attention import route_packed_attention
from .packing import DataCollatorForPackedSequences, PackedDataset, pack_split, refuse_unconverted_packed_rows
from .pipeline.families import position_offset
from .script_args import ModelArguments
from .signals import StopRequest

logger = logging.getLogger("ipu_train")

# Columns of pre-tokenized data that are kept (and grouped) as they are.
TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask", "word_ids")


def start(data_arguments_class, argv=None, model_arguments_class=ModelArguments):
    """Parse the flags (or one .json/.yaml file) into model, data and training arguments; set up logging; check that
    --output_dir can be written; find the checkpoint to resume from (or refuse a non-empty --output_dir); check that
    --push_to_hub can upload; load the IPU configuration and check that its replicas fit the processes (on IPU: that
    its pipeline and IPU count compile, IPUConfig.check_for_ipu); seed
    everything. Nothing is processed, and nothing
    written, before these checks.
    Returns (model_args, data_args, training_args, ipu_config, last_checkpoint)."""
    parser = ScriptArgumentParser((model_arguments_class, data_arguments_class, IPUTrainingArguments))
    model_args, data_args, training_args = parser.parse_script_args(argv)
    setup_logging(training_args)
    data_args.check_with(training_args)
    check_writable(training_args.output_dir)
    last_checkpoint = resume_checkpoint(training_args)
    check_hub_access(training_args)
    ipu_config = load_ipu_config(training_args, model_args.model_name_or_path)
    check_replication(ipu_config, training_args)
    if training_args.device_type == "ipu":  # what PopTorch would refuse when compiling; CPU/GPU do not pipeline
        ipu_config.check_for_ipu(training_args.n_ipu, training_args.pod_type, training=training_args.do_train)
    set_seed(training_args.seed)
    return model_args, data_args, training_args, ipu_config, last_checkpoint


def take(dataset, limit):
    """The first `limit` samples (--max_train_samples / --max_eval_samples), for maps and streams alike."""
    if limit is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(limit)
    return dataset.select(range(min(limit, len(dataset))))


def columns_to_tokenize(raw_datasets, training_args):
    """(text column, all columns) of the split the preprocessing follows, after checking that the splits the flags
    need are there. The text column is None for data that is already tokenized (an `input_ids` column)."""
    if training_args.do_train and "train" not in raw_datasets:
        raise UserError("--do_train: the data has no train split: pass --train_file, or a dataset with one")
    if training_args.do_eval and "validation" not in raw_datasets:
        raise UserError("--do_eval: the data has no validation split, and a stream cannot be split by "
                        "--validation_split_percentage: pass --validation_file, or a dataset with one")
    split = raw_datasets["train" if training_args.do_train else "validation"]
    columns = column_names(split)
    return (None if "input_ids" in columns else text_column(split)), columns


def tokenize_and_group(raw_datasets, tokenize, columns, data_args, training_args, block_size=None, labels=False):
    """Tokenize, then concatenate and cut into `block_size` blocks (none: keep one sequence per record), with
    `labels` a copy of the inputs when asked. Data that is already tokenized (an `input_ids` column) is only
    grouped. Runs on the main process first so the others read its cache."""
    # Streams are processed as they are read; maps are cached by `datasets`. Grouping runs in one process: each
    # worker would drop its own shard's remainder, making the blocks depend on --preprocessing_num_workers.
    group_options = {} if data_args.streaming else dict(load_from_cache_file=not data_args.overwrite_cache)
    tokenize_options = group_options if data_args.streaming else dict(
        group_options, num_proc=data_args.preprocessing_num_workers)
    pretokenized = "input_ids" in columns
    if pretokenized and block_size is None:
        raise UserError("the data is already tokenized (it has an input_ids column), so it is grouped into blocks: "
                        "drop --line_by_line")

    def make_blocks(examples):
        blocks = group_texts(examples, block_size)
        if labels:
            blocks["labels"] = [list(ids) for ids in blocks["input_ids"]]
        return blocks

    with training_args.main_process_first(desc="tokenizing and grouping"):
        if pretokenized:
            logger.info("The data is already tokenized (input_ids column): grouping it into blocks only.")
            processed = raw_datasets.remove_columns([name for name in columns if name not in TOKEN_COLUMNS])
        else:
            processed = raw_datasets.map(tokenize, batched=True, remove_columns=columns, **tokenize_options,
                                         **_progress_label("Running tokenizer on dataset", data_args))
        if block_size is not None:
            processed = processed.map(make_blocks, batched=True, **group_options,
                                      **_progress_label(f"Grouping texts in chunks of {block_size}", data_args))
    return processed


def _progress_label(desc, data_args):
    """The `desc` of a progress bar, as in Hugging Face's scripts; a stream is mapped as it is read, without one."""
    return {} if data_args.streaming else {"desc": desc}


def select_splits(lm_datasets, data_args, training_args, ipu_config, unit, fix):
    """The train and eval splits the flags ask for, cut by --max_*_samples. A training split too small for one
    combined batch is completed with repeated samples under --pad_on_batch_axis, else refused naming the numbers,
    the sample `unit`, --pad_on_batch_axis and the `fix`; an empty split is always refused. Evaluation takes every
    sample, however few (the last batch is smaller)."""
    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = take(lm_datasets["train"], data_args.max_train_samples)
        if not data_args.streaming:
            if training_args.pad_on_batch_axis:  # the trainer completes the last combined batch of each epoch
                require_samples(train_dataset, 1, f"the training data ({unit})", f"{fix}, or add data")
            else:
                # One data-loader item: micro-batch x accumulation x replicas x device iterations.
                replicas = replicas_that_fit(ipu_config, "replication_factor", training_args.world_size)
                combined_batch = (training_args.per_device_train_batch_size * ipu_config.gradient_accumulation_steps
                                  * replicas * ipu_config.device_iterations)
                require_samples(train_dataset, combined_batch, f"the training data ({unit})",
                                "pass --pad_on_batch_axis to complete the batch with repeated samples, or "
                                f"{fix}, --per_device_train_batch_size, --gradient_accumulation_steps or "
                                "device_iterations (--ipu_config_overrides), or add data")
    if training_args.do_eval:
        eval_dataset = take(lm_datasets["validation"], data_args.max_eval_samples)
        if not data_args.streaming:
            require_samples(eval_dataset, 1, f"the validation data ({unit})", f"{fix} or add validation data")
    return train_dataset, eval_dataset


def pack_splits(train_dataset, eval_dataset, data_args, max_length, model):
    """--pack_sequences: the splits as rows of `max_length` tokens holding up to --max_sequences_per_pack sequences
    each, packed once from the sequences' lengths (a view: no token is copied); the efficiency of each is logged.
    The model refuses from then on a packed batch that did not go through packing.packed_model_inputs, and its
    attention can take the variable-length kernel (ipu_train.attention)."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise UserError(f"--pack_sequences restarts the position ids at each packed sequence, and "
                        f"{type(model).__name__} takes none: drop --pack_sequences")
    refuse_unconverted_packed_rows(model)
    route_packed_attention(model, data_args.max_sequences_per_pack)
    return tuple(None if dataset is None else pack_split(dataset, split, max_length, data_args.max_sequences_per_pack)
                 for dataset, split in ((train_dataset, "train"), (eval_dataset, "validation")))


def packed_collator(sequence_collator, data_args, max_length, tokenizer, model):
    """Rows of packed sequences, each masked by `sequence_collator` as it would be alone (see ipu_train.packing)."""
    return DataCollatorForPackedSequences(sequence_collator, max_length, data_args.max_sequences_per_pack,
                                          tokenizer.pad_token_id, position_offset(model.config))


def sample_count(dataset):
    """The samples a split holds: its sequences, also where they are packed into fewer rows."""
    return len(dataset.sequences if isinstance(dataset, PackedDataset) else dataset)


def train_and_save(trainer, training_args, last_checkpoint, train_dataset):
    """Train and save the model with its metrics and state. A run stopped by a signal keeps its last checkpoint and
    state, writes no final model, and exits with 128 + the signal's number."""
    result = trainer.train(resume_from_checkpoint=last_checkpoint)
    if training_args.compile_only:  # compiled, nothing trained: no model, metrics or card to write, no evaluation
        logger.info("--compile_only: done in %.1f s", result.metrics["compile_time"])
        raise SystemExit(0)
    if trainer.stopped_by_signal is not None:
        trainer.save_state()
        step = trainer.state.global_step
        logger.warning("Stopped by signal %d at step %d: %s", trainer.stopped_by_signal, step,
                       _how_to_continue(training_args, step))
        raise SystemExit(128 + trainer.stopped_by_signal)
    with StopRequest(then="saving the trained model first") as late:  # written whole, even when a signal comes now
        try:
            _save_trained(trainer, train_dataset, result)
        except (OSError, RuntimeError) as err:  # a full disk
            raise RunFailed(f"saving the trained model in {training_args.output_dir} failed "
                            f"({one_line(err, 200)}); its checkpoints are untouched and each loads with "
                            "from_pretrained (one at the last step holds the trained model): free space, then rerun") \
                from None
    if late.requested:
        logger.warning("Signal %d came after training had finished: the run completed", late.signal_number)


def _how_to_continue(training_args, step):
    """What to run after a signal stopped training at `step`."""
    if training_args.save_only_model:
        return (f"continue from its weights with --model_name_or_path {training_args.output_dir}/checkpoint-{step} "
                "and another --output_dir (--save_only_model saves no optimizer state)")
    if training_args.overwrite_output_dir:
        return "rerun the same command without --overwrite_output_dir to resume from its checkpoint"
    return "rerun the same command to resume from its checkpoint"


def _save_trained(trainer, train_dataset, result):
    trainer.save_model()  # model, tokenizer and ipu_config.json, loadable with from_pretrained
    metrics = dict(result.metrics)
    if not isinstance(train_dataset, datasets.IterableDataset):
        metrics["train_samples"] = sample_count(train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()


def evaluate_and_report(trainer, eval_dataset, loss_key="eval_loss"):
    """Evaluate; `perplexity` is exp of `loss_key` (the MLM loss for pretraining; None: no perplexity), inf on
    overflow."""
    metrics = trainer.evaluate()
    if not isinstance(eval_dataset, datasets.IterableDataset):
        metrics["eval_samples"] = sample_count(eval_dataset)
    if loss_key is not None:
        metrics["perplexity"] = perplexity(metrics[loss_key])
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics


def publish(trainer, training_args, model_args, data_args, tasks):
    card = {"finetuned_from": model_args.model_name_or_path, "tasks": tasks}
    if data_args.dataset_name is not None:
        card["dataset_tags"] = data_args.dataset_name
        card["dataset"] = " ".join(filter(None, (data_args.dataset_name, data_args.dataset_config_name)))
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)
