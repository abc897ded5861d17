"""Which `transformers.TrainingArguments` fields IPUTrainer honours and which it refuses. IPUTrainer runs its own step
loop, so a field read only inside transformers.Trainer's loop would otherwise be silently ignored.

HONOURED: read by the trainer, its backends, the scripts, or the transformers.Trainer machinery that IPUTrainer runs
(callbacks, logging, checkpoints, model card, hub push, the scheduler). The fields IPUTrainingArguments declares itself
are ours, so honoured without being listed. REFUSED: refused when set to anything but their default, with why and what
to do. A field in neither (a newer transformers) is refused likewise until it is placed in one of them;
tests/test_supported_args.py fails while one is.
"""
import dataclasses

from transformers import TrainingArguments

from .compat import field_names
from .errors import UserError
from .optim import check_optimizer_flags

HONOURED = frozenset({
    # what runs, from where
    "output_dir", "do_train", "do_eval", "resume_from_checkpoint", "ignore_data_skip", "use_cpu", "local_rank",
    "seed", "data_seed", "full_determinism",
    # batches and steps
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "num_train_epochs",
    "max_steps",
    # optimizer and schedule
    "optim", "optim_args", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "max_grad_norm", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
    # precision, compilation, memory
    "bf16", "fp16", "tf32", "torch_compile", "torch_compile_backend", "torch_compile_mode",
    "activation_checkpointing", "gradient_checkpointing", "use_cache",
    # logging and reporting
    "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter", "log_on_each_node",
    "log_level", "log_level_replica", "disable_tqdm", "skip_memory_metrics", "report_to", "run_name", "project",
    "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
    # the tokens counted are those the attention masks keep (transformers' non_padding), also for "all", the one
    # value the command line can give: the two differ in padded batches only
    "include_num_input_tokens_seen",
    # evaluation (predictions are gathered with all_gather_object whatever eval_use_gather_object says)
    "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "prediction_loss_only", "batch_eval_metrics",
    "eval_use_gather_object", "label_names", "remove_unused_columns",
    # checkpoints and the best model
    "save_strategy", "save_steps", "save_total_limit", "save_only_model", "save_on_each_node",
    "load_best_model_at_end", "metric_for_best_model", "greater_is_better", "restore_callback_states_from_checkpoint",
    # the hub
    "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision",
    # data loading
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_prefetch_factor", "train_sampling_strategy",
    # data parallelism (the process group is set up by TrainingArguments, the DDP wrap by the backend)
    "ddp_backend", "ddp_timeout", "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers",
    "ddp_static_graph",
})

_NO_FSDP = ("IPUTrainer runs data-parallel replicas (torchrun) and shards the optimizer state with "
            "replicated_tensor_sharding: drop it")
_NO_LIGER = "IPUTrainer does not apply Liger kernels (its LM heads compute the loss in chunks): drop it"
_NO_RECOMPUTE_OPTIONS = ("activation checkpointing (--gradient_checkpointing, recompute_checkpoint_every_layer) covers "
                         "every layer and takes no options: drop it")

REFUSED = {
    "deepspeed": ("IPUTrainer runs its own step loop without DeepSpeed (replicas: torchrun; optimizer state sharding: "
                  "replicated_tensor_sharding): drop it"),
    "fsdp": _NO_FSDP,
    "fsdp_config": _NO_FSDP,
    "accelerator_config": "IPUTrainer's batches and steps do not go through Accelerate: drop it",
    "parallelism_config": ("no tensor, context or sequence parallelism: pipeline stages come from layers_per_ipu, "
                           "replicas from torchrun: drop it"),
    "average_tokens_across_devices": ("the loss is the mean over micro-batches and replicas (PopTorch's Mean "
                                      "reduction), never a token count: drop it"),
    "label_smoothing_factor": "the loss is the model's own, with no smoothing: drop it",
    "bf16_full_eval": "evaluation runs in the training precision (--bf16, --fp16, --fp32): drop it",
    "fp16_full_eval": "evaluation runs in the training precision (--bf16, --fp16, --fp32): drop it",
    "activation_checkpointing_kwargs": _NO_RECOMPUTE_OPTIONS,
    "gradient_checkpointing_kwargs": _NO_RECOMPUTE_OPTIONS,
    "use_liger_kernel": _NO_LIGER,
    "liger_kernel_config": _NO_LIGER,
    "neftune_noise_alpha": "IPUTrainer adds no NEFTune noise to the embeddings: drop it",
    "torch_empty_cache_steps": "IPUTrainer never empties the CUDA cache during training: drop it",
    "auto_find_batch_size": "the batch size is fixed: set --per_device_train_batch_size yourself",
    "optim_target_modules": "only GaLore and APOLLO read it, and --optim offers neither here: drop it",
    "eval_do_concat_batches": "evaluation always concatenates the batches' predictions: drop it",
    "eval_accumulation_steps": ("predictions reach the host every inference_device_iterations batches: set that "
                                "with --ipu_config_overrides instead"),
    "include_for_metrics": "compute_metrics receives predictions and labels only: drop it",
    "enable_jit_checkpoint": ("its SIGTERM checkpoint would be taken inside a device-iteration group, where "
                              "IPUTrainer never saves: drop it (--save_steps saves regularly)"),
    "dataloader_drop_last": ("training always drops an incomplete combined batch (--pad_on_batch_axis completes "
                             "it) and evaluation keeps every sample: drop it"),
    "dataloader_persistent_workers": "the data loader's workers are started afresh each epoch: drop it",
    "dataloader_multiprocessing_context": "data loader workers use PyTorch's default start method: drop it",
    "dataloader_in_order": "batches always come in order (resuming exactly depends on it): drop it",
    "length_column_name": "only length-grouped sampling reads it, and IPUTrainer samples at random or in order: "
                          "drop it",
    "debug": "transformers.Trainer's debug hooks (underflow/overflow, TPU metrics) do not run here: drop it",
    "do_predict": "the scripts have no prediction step: drop it (--do_eval evaluates)",
}

# Honoured fields of which some values are not implemented: field -> (refuses(value), why and what to do).
REFUSED_VALUES = {
    "train_sampling_strategy": (lambda value: value not in ("random", "sequential"),
                                "IPUTrainer draws samples at random or in order: pass random or sequential"),
    "lr_scheduler_type": (lambda value: value in ("reduce_lr_on_plateau", "greedy"),
                          "the schedule steps once per optimizer step, with no metric to follow: choose another"),
}


def check_supported(args):
    """Refuse in one line the first refused (or unsorted) field set to a non-default value, then an unimplemented
    value of an honoured field, then optimizer flags that give no optimizer. Runs on the values as given, before
    transformers derives fields from others."""
    defaults = _defaults(type(args))
    unsorted = {name: "ipu_train does not know it yet (ipu_train/supported_args.py): drop it"
                for name in unsorted_fields(type(args))}
    declared = field_names(type(args))
    for name, reason in {**REFUSED, **unsorted}.items():
        if name not in declared:  # a field of another transformers version
            continue
        value = getattr(args, name)
        if not _is_default(value, defaults[name]):
            raise UserError(f"{_flag(name, value)} is not supported: {reason}")
    for name, (refuses, reason) in REFUSED_VALUES.items():
        value = getattr(args, name)
        if refuses(value):
            raise UserError(f"{_flag(name, value)}: {reason}")
    check_optimizer_flags(args)


def honoured_fields(cls):
    """HONOURED plus the fields `cls` declares beyond TrainingArguments (IPUTrainingArguments' own)."""
    own = set()  # declared by cls or a class between it and TrainingArguments, a redeclared field included
    for klass in cls.__mro__:
        if klass is TrainingArguments:
            break
        own.update(vars(klass).get("__annotations__", {}))
    return HONOURED | {f.name for f in dataclasses.fields(cls) if f.name in own}


def unsorted_fields(cls):
    """Fields of `cls` in neither list."""
    honoured = honoured_fields(cls)
    return [f.name for f in dataclasses.fields(cls) if f.name not in honoured and f.name not in REFUSED]


def _defaults(cls):
    return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(cls)}


def _is_default(value, default):
    # An empty value (None, "", [], {}, False, 0) means "off" for every field here, however it is spelled.
    return value == default or not (value or default)


def _flag(name, value):
    """--name, with its value when that is short enough to read in one line."""
    if isinstance(value, (bool, int, float, str)) and len(str(value)) <= 40:
        return f"--{name} {value}"
    return f"--{name}"
