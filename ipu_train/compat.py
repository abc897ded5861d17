"""The differences between the two stacks ipu_train runs on, absorbed in one place: the main one (requirements.txt:
current torch, transformers 5) and the Poplar SDK's (requirements-ipu.txt: PopTorch's torch 2.0.1, transformers 4.49,
huggingface_hub 0.x). Each helper tests for the feature it needs rather than for a version number."""
import contextlib
import dataclasses
import inspect
import os
import warnings
from collections.abc import Mapping
from typing import Optional

import huggingface_hub.constants
import numpy
import torch
import transformers
from transformers.data.data_collator import _torch_collate_batch, pad_without_fast_tokenizer_warning


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is offline (HF_HUB_OFFLINE): huggingface_hub 1.x asks is_offline_mode(), 0.x keeps
    a constant."""
    is_offline_mode = getattr(huggingface_hub.constants, "is_offline_mode", None)
    return bool(is_offline_mode() if is_offline_mode is not None else huggingface_hub.constants.HF_HUB_OFFLINE)


def field_names(cls) -> frozenset:
    """The dataclass fields of `cls` (TrainingArguments differs between transformers versions)."""
    return frozenset(f.name for f in dataclasses.fields(cls))


# --- TrainingArguments -------------------------------------------------------------------------------------------

# Fields of transformers 5's TrainingArguments that ipu_train reads itself, with their transformers 5 defaults: on a
# transformers without them they are declared here, so the same flags parse and the same attributes exist.
_BACKPORTED_FIELDS = {
    "activation_checkpointing": (Optional[bool], dataclasses.field(default=None, metadata={
        "help": "Enable activation checkpointing (--gradient_checkpointing is an alias).", "nargs": "?",
        "const": True})),
    "train_sampling_strategy": (str, dataclasses.field(default="random", metadata={
        "help": "Sampler for training: 'random' (default) or 'sequential'.", "choices": ["random", "sequential"]})),
    "ddp_static_graph": (Optional[bool], dataclasses.field(default=None, metadata={
        "help": "The `static_graph` passed to DistributedDataParallel."})),
}


def _training_arguments_base():
    declared = field_names(transformers.TrainingArguments)
    missing = [(name, kind, spec) for name, (kind, spec) in _BACKPORTED_FIELDS.items() if name not in declared]
    if not missing:
        return transformers.TrainingArguments

    def __post_init__(self):
        # transformers 4: --gradient_checkpointing is its own field; transformers 5 turns it into the alias.
        if "activation_checkpointing" not in declared and self.activation_checkpointing is None:
            self.activation_checkpointing = bool(getattr(self, "gradient_checkpointing", False))
        # transformers 4 declares warmup_ratio as a float (0.0: none) and compares it; IPUTrainingArguments' None
        # (not given) means the same.
        with _warmup_ratio_as_float(self):
            transformers.TrainingArguments.__post_init__(self)

    def get_warmup_steps(self, num_training_steps):
        with _warmup_ratio_as_float(self):
            return transformers.TrainingArguments.get_warmup_steps(self, num_training_steps)

    return dataclasses.make_dataclass(
        "TrainingArguments", [(name, kind, spec) for name, kind, spec in missing],
        bases=(transformers.TrainingArguments,),
        namespace={"__post_init__": __post_init__, "get_warmup_steps": get_warmup_steps,
                   "__doc__": transformers.TrainingArguments.__doc__, "__module__": __name__})


@contextlib.contextmanager
def _warmup_ratio_as_float(args):
    if getattr(args, "warmup_ratio", 0.0) is not None:
        yield
        return
    args.warmup_ratio = 0.0
    try:
        yield
    finally:
        args.warmup_ratio = None


TrainingArguments = _training_arguments_base()


def enable_activation_checkpointing(model, **kwargs):
    """Hugging Face activation checkpointing on `model`: activation_checkpointing_enable in transformers 5,
    gradient_checkpointing_enable (its older name, kept there as a deprecated alias) before."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        return enable(activation_checkpointing_kwargs=kwargs)
    return model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# --- the optimizer mapping ---------------------------------------------------------------------------------------

# The --optim_args keys that transformers 5 passes on to torch's SGD, Adagrad and RMSprop (floats, and booleans
# written true/1/yes); transformers 4 passes none of them.
_TORCH_OPTIM_ARGS = {"SGD": (("momentum", "dampening", "weight_decay"), ("nesterov",)),
                     "Adagrad": (("lr_decay", "weight_decay", "eps"), ()),
                     "RMSprop": (("momentum", "alpha", "eps", "weight_decay"), ("centered",))}


def optimizer_cls_and_kwargs(args):
    """transformers.Trainer.get_optimizer_cls_and_kwargs(args), with --optim_args reaching torch's SGD, Adagrad and
    RMSprop on a transformers that leaves them out."""
    optimizer_class, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args)
    floats, booleans = _TORCH_OPTIM_ARGS.get(optimizer_class.__name__, ((), ()))
    if args.optim_args and optimizer_class.__module__.startswith("torch.optim.") and (floats or booleans):
        given = dict(pair.split("=", 1) for pair in args.optim_args.replace(" ", "").split(",") if "=" in pair)
        if not any(key in kwargs for key in given):  # transformers passed none of them on
            kwargs = {**kwargs, **{key: float(given[key]) for key in floats if key in given},
                      **{key: given[key].lower() in ("true", "1", "yes") for key in booleans if key in given}}
    return optimizer_class, kwargs


# --- models and the trainer's state ------------------------------------------------------------------------------

def validate_config(config):
    """Raise ValueError or TypeError for values of a model config that contradict each other. transformers 5's
    configs validate themselves (validate()); a transformers 4 config checks its values in __init__ only, so a copy
    is built from them."""
    validate = getattr(config, "validate", None)
    if validate is not None:
        return validate()
    type(config)(**config.to_dict())


def init_training_references(state, trainer, max_steps, num_train_epochs, trial):
    """TrainerState.init_training_references: transformers 4 also takes the train dataloader (IPUTrainer runs its
    own loaders, so none)."""
    if "train_dataloader" in inspect.signature(state.init_training_references).parameters:
        return state.init_training_references(trainer, None, max_steps, num_train_epochs, trial)
    return state.init_training_references(trainer, max_steps, num_train_epochs, trial)


# --- the MLM collator --------------------------------------------------------------------------------------------

def _mlm_collator_base():
    """transformers' DataCollatorForLanguageModeling where it has whole-word masking and a seed (transformers 5);
    before that, the same class with both added as transformers 5 implements them (Apache-2.0, The HuggingFace
    Team): words from the offset_mapping column, every token of a selected word masked, [MASK] only."""
    parent = transformers.DataCollatorForLanguageModeling
    if "whole_word_mask" in field_names(parent):
        return parent

    def __post_init__(self):
        parent.__post_init__(self)
        if self.whole_word_mask:
            if not self.mlm:
                raise ValueError("Whole word masking can only be used with mlm=True.")
            if not self.tokenizer.is_fast:
                warnings.warn("Whole word masking depends on offset mapping which is only natively available with "
                              "fast tokenizers.", UserWarning)
            if self.mask_replace_prob < 1:
                warnings.warn("Random token replacement is not supported with whole word masking. Setting "
                              "mask_replace_prob to 1.")
                self.mask_replace_prob, self.random_replace_prob = 1.0, 0.0
        self.generator = None
        self._generator_pid = None

    def torch_call(self, examples):
        if self.seed is not None and self._generator_pid != os.getpid():
            worker = torch.utils.data.get_worker_info()
            self.generator = torch.Generator().manual_seed(self.seed + (worker.id if worker is not None else 0))
            self._generator_pid = os.getpid()
        if isinstance(examples[0], Mapping):
            batch = pad_without_fast_tokenizer_warning(self.tokenizer, examples, return_tensors="pt",
                                                       pad_to_multiple_of=self.pad_to_multiple_of)
        else:
            batch = {"input_ids": _torch_collate_batch(examples, self.tokenizer,
                                                       pad_to_multiple_of=self.pad_to_multiple_of)}
        special_tokens_mask = batch.pop("special_tokens_mask", None)
        offset_mapping = batch.pop("offset_mapping", None)
        if self.mlm:
            batch["input_ids"], batch["labels"] = self.torch_mask_tokens(
                batch["input_ids"], special_tokens_mask=special_tokens_mask, offset_mapping=offset_mapping)
        else:
            labels = batch["input_ids"].clone()
            if self.tokenizer.pad_token_id is not None:
                labels[labels == self.tokenizer.pad_token_id] = -100
            batch["labels"] = labels
        return batch

    def torch_mask_tokens(self, inputs, special_tokens_mask=None, offset_mapping=None):
        labels = inputs.clone()
        probability_matrix = torch.full(labels.shape, self.mlm_probability)
        if special_tokens_mask is None:
            special_tokens_mask = [self.tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True)
                                   for row in labels.tolist()]
        if self.whole_word_mask:
            word_ids, no_mask = self._calc_word_ids_and_prob_mask(numpy.asarray(offset_mapping),
                                                                  numpy.asarray(special_tokens_mask))
            no_mask = torch.tensor(no_mask, dtype=torch.bool)
        else:
            no_mask = torch.as_tensor(special_tokens_mask).bool()
        probability_matrix.masked_fill_(no_mask, value=0.0)
        masked = torch.bernoulli(probability_matrix, generator=self.generator).bool()
        if self.whole_word_mask:
            masked = torch.as_tensor(self._whole_word_mask(word_ids, masked))
        labels[~masked] = -100
        replaced = torch.bernoulli(torch.full(labels.shape, self.mask_replace_prob), generator=self.generator).bool()
        replaced &= masked
        inputs[replaced] = self.tokenizer.convert_tokens_to_ids(self.tokenizer.mask_token)
        if self.mask_replace_prob == 1 or self.random_replace_prob == 0:
            return inputs, labels
        scaled = self.random_replace_prob / (1 - self.mask_replace_prob)
        randomised = torch.bernoulli(torch.full(labels.shape, scaled), generator=self.generator).bool()
        randomised &= masked & ~replaced
        words = torch.randint(len(self.tokenizer), labels.shape, dtype=torch.long, generator=self.generator)
        inputs[randomised] = words[randomised]
        return inputs, labels

    def _calc_word_ids_and_prob_mask(offsets, special_tokens_mask):
        """Word ids (-1: special tokens) from character offsets, and the tokens that continue a word (never drawn:
        a word is drawn by its first token)."""
        previous_ends = numpy.roll(offsets[:, :, 1], 1, axis=1)
        previous_ends[:, 0] = -1
        previous_special = numpy.roll(special_tokens_mask, 1, axis=1)
        previous_special[:, 0] = 0
        special = special_tokens_mask.astype(bool)
        new_word = ~special & ((offsets[:, :, 0] != previous_ends) | (previous_special == 1))
        word_ids = numpy.cumsum(new_word, axis=1)
        word_ids[special] = -1
        return word_ids, ~new_word

    def _whole_word_mask(word_ids, mask):
        """Every token of a word any token of which is in `mask`."""
        mask = mask.numpy() if hasattr(mask, "numpy") else numpy.asarray(mask)
        valid = word_ids != -1
        same_word = (word_ids[:, :, None] == word_ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        return numpy.any(same_word & mask[:, None, :], axis=2)

    return dataclasses.make_dataclass(
        "DataCollatorForLanguageModeling",
        [("whole_word_mask", bool, dataclasses.field(default=False)),
         ("seed", Optional[int], dataclasses.field(default=None))],
        bases=(parent,),
        namespace={"__post_init__": __post_init__, "torch_call": torch_call, "torch_mask_tokens": torch_mask_tokens,
                   "_calc_word_ids_and_prob_mask": staticmethod(_calc_word_ids_and_prob_mask),
                   "_whole_word_mask": staticmethod(_whole_word_mask), "__module__": __name__})


DataCollatorForLanguageModeling = _mlm_collator_base()


def best_global_step(state):
    """The step of the best checkpoint so far, which transformers 5 records in TrainerState; transformers 4 has no
    such field and sets state.best_model_checkpoint itself when it finds a new best metric (None here)."""
    return getattr(state, "best_global_step", None)


# --- torch -------------------------------------------------------------------------------------------------------

def autocast_dtype(device_type):
    """The dtype autocast computes in on `device_type`, None where autocast is off. torch 2.4 asks by device type;
    torch 2.0 has one function per device (CPU, CUDA)."""
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return None


def grad_scaler(device_type, **kwargs):
    """torch.amp.GradScaler(device_type) (torch 2.3 and later); before that, CUDA's own."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device_type, **kwargs)
    return torch.cuda.amp.GradScaler(**kwargs)


def compile_in_place(model, **kwargs):
    """torch.compile `model` without wrapping it, so its state_dict keys stay the same: Module.compile (torch 2.2
    and later), else its forward compiled."""
    if hasattr(model, "compile"):
        return model.compile(**kwargs)
    model.forward = torch.compile(model.forward, **kwargs)


def dtype_kwarg(dtype) -> dict:
    """The from_pretrained keyword for the weights' dtype: `dtype` where configs keep it under that name
    (transformers 5), `torch_dtype` before, where None (float32) is not yet the default of transformers 5 ("auto":
    the checkpoint's own dtype)."""
    if "dtype" in vars(transformers.PretrainedConfig()):
        return {"dtype": dtype}
    return {"torch_dtype": "auto" if dtype is None else dtype}


# torch 2.1 gave torch.cpu the device functions that Accelerate calls for a multi-process CPU run (gloo): one CPU
# "device", nothing to select.
if not hasattr(torch.cpu, "device_count"):
    torch.cpu.device_count = lambda: 1
if not hasattr(torch.cpu, "set_device"):
    torch.cpu.set_device = lambda device: None
