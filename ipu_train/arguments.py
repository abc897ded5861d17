"""IPUTrainingArguments: every `transformers.TrainingArguments` flag plus the IPU flags users of the IPU examples know,
and `load_ipu_config`, which turns those flags into the one IPU configuration a run uses (in the order
`resolve_ipu_config` owns, which `python -m ipu_train.plan` uses too)."""
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from .compat import TrainingArguments
from .errors import UserError
from .supported_args import check_supported

logger = logging.getLogger("ipu_train")

DEVICE_TYPES = ("auto", "cpu", "cuda", "ipu")
DATALOADER_MODES = ("sync", "async", "async_rebatched")
# Numbers that cannot be below 0: torch refuses a negative rate, epsilon or worker count (with a traceback, once the
# model is built), a negative decay grows the weights, a negative norm silently turns clipping off. With what 0 means.
NON_NEGATIVE_FLAGS = {"learning_rate": "", "weight_decay": " (0: no decay)", "adam_epsilon": "",
                      "max_grad_norm": " (0 turns gradient clipping off)",
                      "dataloader_num_workers": " (0 loads the data in the main process)"}
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that record CUDA graphs
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")  # pipeline.process_stages.SCHEDULES (not imported: torch
# versions without torch.distributed.pipelining parse these arguments too)


@dataclass
class IPUTrainingArguments(TrainingArguments):
    ipu_config_name: Optional[str] = field(
        default=None, metadata={"help": "IPU configuration: a JSON file, a directory holding ipu_config.json, "
                                        "or a hub name. Default: the model directory's ipu_config.json, else "
                                        "defaults."})
    ipu_config_overrides: Optional[str] = field(
        default=None, metadata={"help": 'Override IPU configuration fields: "k=v,k=v" '
                                        '(lists: "layers_per_ipu=[0 4 4 4]").'})
    pod_type: Optional[str] = field(
        default=None, metadata={"help": "Resolve per-pod values of the IPU configuration (pod4, pod16, ...)."})
    n_ipu: Optional[int] = field(
        default=None, metadata={"help": "Number of IPUs: replication_factor = n_ipu // ipus_per_replica."})
    fp32: bool = field(default=False, metadata={"help": "Train in full fp32 precision (no autocast)."})
    lamb: bool = field(default=False, metadata={"help": "Use the LAMB optimizer instead of AdamW."})
    lamb_no_bias_correction: bool = field(default=False, metadata={"help": "Use LAMB without bias correction."})
    loss_scaling: Optional[float] = field(
        default=None, metadata={"help": "Static loss scale (fp16); with --auto_loss_scaling, the initial scale."})
    auto_loss_scaling: Optional[bool] = field(
        default=None, metadata={"help": "Dynamic loss scaling (an IPU configuration override).", "nargs": "?",
                                "const": True})
    dataloader_mode: str = field(
        default="sync", metadata={"help": "IPU data loader mode.", "choices": list(DATALOADER_MODES)})
    compile_only: bool = field(default=False, metadata={"help": "Compile the training step, then exit."})
    pad_on_batch_axis: bool = field(
        default=False, metadata={"help": "Complete the last combined batch of an epoch instead of dropping it."})
    throughput_warmup_steps: int = field(
        default=0, metadata={"help": "Optimizer steps left out of the throughput metrics (besides compilation)."})
    max_consecutive_nonfinite_steps: int = field(
        default=10, metadata={"help": "Stop the run (exit code 1, the last finite checkpoint kept) after this many "
                                      "optimizer steps in a row with a NaN/inf loss; 0 never stops."})
    device_type: str = field(
        default="auto", metadata={"aliases": ["--device"], "choices": list(DEVICE_TYPES),
                                  "help": "Where to run: auto (CUDA when present, else CPU), cpu, cuda or ipu."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Train into a non-empty --output_dir that holds no checkpoint."})
    # None means "not given": on CUDA the step is compiled, elsewhere it runs eagerly (see compile_by_default).
    torch_compile: Optional[bool] = field(
        default=None, metadata={"help": "Compile the model (forward, loss and backward) with torch.compile. Default: "
                                        "on with CUDA, off on CPU; --no_torch_compile or --torch_compile false turns "
                                        "it off.", "nargs": "?", "const": True})
    no_torch_compile: bool = field(
        default=False, metadata={"help": "Train eagerly on CUDA (torch.compile is the CUDA default)."})
    cuda_graphs: bool = field(
        default=False, metadata={"help": "Replay each compiled step as CUDA graphs (torch.compile mode "
                                         "reduce-overhead): CUDA only, static shapes, one process, no gradient "
                                         "accumulation."})
    # None means "not given on the command line": only a given value overrides the IPU configuration.
    gradient_accumulation_steps: Optional[int] = field(
        default=None, metadata={"help": "Micro-batches per optimizer step (overrides the IPU configuration)."})
    pipeline_stages_across_processes: bool = field(
        default=False, metadata={"help": "Run each pipeline stage of layers_per_ipu in its own process (torchrun; "
                                         "CPU or CUDA): world size = stages x replicas. GPT-2, BERT, RoBERTa, "
                                         "DistilBERT, XLNet."})
    # None means "not given": 1f1b with --pipeline_stages_across_processes, refused without it.
    pipeline_schedule: Optional[str] = field(
        default=None, metadata={"choices": list(PIPELINE_SCHEDULES),
                                "help": "The schedule of --pipeline_stages_across_processes (default 1f1b); "
                                        "interleaved_1f1b runs two stages per process."})
    # transformers 5 dropped --warmup_ratio (its --warmup_steps takes a fraction below 1), but the IPU README and older
    # Hugging Face scripts use it.
    warmup_ratio: Optional[float] = field(
        default=None, metadata={"help": "Linear warmup over this fraction of the training steps, from 0 to 1 "
                                        "(instead of --warmup_steps)."})

    def __post_init__(self):
        check_supported(self)  # before anything derives one field from another
        self._check_ipu_flags()
        self._check_training_numbers()
        self.device_type = _resolve_device_type(self.device_type)
        self._check_process_stages()
        if self.device_type in ("cpu", "ipu"):
            self.use_cpu = True  # on IPU the host side (data, saving) is the CPU
        elif self.use_cpu:
            raise UserError("--use_cpu contradicts --device cuda: drop one of them")
        if self.device_type == "cuda" and not (self.fp32 or self.fp16 or self.bf16):
            self.bf16 = True  # the CUDA default, recorded in training_args.bin
        if self.device_type == "cpu" and self.fp16:
            raise UserError("--fp16 needs --device cuda or ipu: on CPU train in fp32 (the default) or with --bf16")
        self._resolve_compilation()
        super().__post_init__()

    def _resolve_compilation(self):
        """torch_compile becomes True or False here, so that training_args.bin records what ran."""
        asked_for_compilation = [flag for flag, given in (("--torch_compile", self.torch_compile),
                                                          ("--cuda_graphs", self.cuda_graphs),
                                                          ("--torch_compile_mode", self.torch_compile_mode),
                                                          ("--torch_compile_backend", self.torch_compile_backend))
                                 if given]
        if self.no_torch_compile and asked_for_compilation:
            raise UserError(f"--no_torch_compile contradicts {asked_for_compilation[0]}: drop one of them")
        if self.cuda_graphs:
            if self.device_type != "cuda":
                raise UserError(f"--cuda_graphs needs --device cuda (this run is on {self.device_type}): drop it")
            if self.torch_compile is False:
                raise UserError("--cuda_graphs replays compiled graphs: drop --torch_compile false or --cuda_graphs")
            if self.torch_compile_mode not in (None, *CUDA_GRAPH_MODES):
                raise UserError(f"--cuda_graphs contradicts --torch_compile_mode {self.torch_compile_mode}: use "
                                f"{' or '.join(CUDA_GRAPH_MODES)}, or drop --torch_compile_mode")
            self.torch_compile_mode = self.torch_compile_mode or CUDA_GRAPH_MODES[0]
        requested = False if self.no_torch_compile else self.torch_compile
        if requested is None and (self.torch_compile_mode or self.torch_compile_backend):
            requested = True  # as transformers.TrainingArguments does
        self.torch_compile = compile_by_default(requested, self.device_type)

    def _check_process_stages(self):
        """--pipeline_stages_across_processes trains through torch.distributed.pipelining, in fp32, bf16 or fp16, each
        stage compiled as the model would be (by default on CUDA); what it does not run yet is refused here, before
        any data is read."""
        if self.pipeline_schedule not in (None, *PIPELINE_SCHEDULES):
            raise UserError(f"--pipeline_schedule {self.pipeline_schedule} is not one of {', '.join(PIPELINE_SCHEDULES)}")
        if not self.pipeline_stages_across_processes:
            if self.pipeline_schedule is not None:
                raise UserError("--pipeline_schedule schedules --pipeline_stages_across_processes: add that flag, or "
                                "drop --pipeline_schedule")
            return
        self.pipeline_schedule = self.pipeline_schedule or "1f1b"
        unsupported = [
            (self.device_type == "ipu", "--device ipu", "on IPU PopTorch pipelines the stages itself"),
            (self.cuda_graphs or self.torch_compile_mode in CUDA_GRAPH_MODES,
             f"--cuda_graphs (nor --torch_compile_mode {' or '.join(CUDA_GRAPH_MODES)})",
             "a schedule keeps several micro-batches' activations, which a CUDA graph's replay would overwrite"),
            (self.compile_only, "--compile_only", "each stage compiles on the first step, through the schedule"),
        ]
        for refused, what, why in unsupported:
            if refused:
                raise UserError(f"--pipeline_stages_across_processes does not support {what} yet ({why}): drop one "
                                "of them")

    def _check_ipu_flags(self):
        if self.device_type not in DEVICE_TYPES:
            raise UserError(f"--device {self.device_type} is not one of {', '.join(DEVICE_TYPES)}")
        if self.dataloader_mode not in DATALOADER_MODES:
            raise UserError(f"--dataloader_mode {self.dataloader_mode} is not one of {', '.join(DATALOADER_MODES)}")
        if self.fp32 and (self.fp16 or self.bf16):
            raise UserError("--fp32 contradicts --fp16/--bf16: pass only one precision flag")
        if self.device_type == "ipu" and self.bf16:
            raise UserError("--bf16: IPUs train in fp16 (the default there) or fp32: pass --fp16 or --fp32")
        if self.pod_type is not None and self.n_ipu is not None:
            raise UserError("--pod_type and --n_ipu both set the replication: pass only one of them")
        if self.n_ipu is not None and self.n_ipu < 1:
            raise UserError(f"--n_ipu must be >= 1, got {self.n_ipu}")
        if self.loss_scaling is not None and not self.loss_scaling > 0:
            raise UserError(f"--loss_scaling must be > 0, got {self.loss_scaling}")
        for flag in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(self, flag) < 1:
                raise UserError(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        if not 0 <= self.seed < 2 ** 32:
            raise UserError(f"--seed must be between 0 and 2**32 - 1, got {self.seed}")
        if self.max_consecutive_nonfinite_steps < 0:
            raise UserError(f"--max_consecutive_nonfinite_steps must be >= 0 (0: never stop), got "
                            f"{self.max_consecutive_nonfinite_steps}")
        if self.throughput_warmup_steps < 0:
            raise UserError(f"--throughput_warmup_steps must be >= 0, got {self.throughput_warmup_steps}")
        if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps < 1:
            raise UserError(f"--gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")

    def _check_training_numbers(self):
        for flag, instead in NON_NEGATIVE_FLAGS.items():
            if not 0 <= getattr(self, flag) < math.inf:
                raise UserError(f"--{flag} must be a number >= 0{instead}, got {getattr(self, flag)}")
        for flag in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, flag) < 1:
                raise UserError(f"--{flag} must be at least 0 and below 1 (e.g. 0.9), got {getattr(self, flag)}")
        # Without --max_steps the epochs set the length of training: none would save an untrained model.
        if self.do_train and self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise UserError(f"--num_train_epochs {self.num_train_epochs} trains nothing: pass a number of epochs above "
                            "0, or --max_steps")
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio <= 1:
                raise UserError(f"--warmup_ratio is a fraction of the training steps, from 0 to 1, got "
                                f"{self.warmup_ratio}")
            if self.warmup_steps:
                raise UserError(f"--warmup_ratio and --warmup_steps {self.warmup_steps} both set the warmup: pass only "
                                "one of them")

    def get_warmup_steps(self, num_training_steps):
        """--warmup_ratio's share of the steps, rounded up as transformers rounds a fractional --warmup_steps (which
        cannot express 1: a --warmup_steps of 1.0 is one step)."""
        if self.warmup_ratio is None:
            return super().get_warmup_steps(num_training_steps)
        return math.ceil(num_training_steps * self.warmup_ratio)

    @property
    def precision(self) -> str:
        """fp32, bf16 or fp16: the flags, else the device's default (fp16 on IPU, bf16 on CUDA, fp32 on CPU)."""
        if self.fp32:
            return "fp32"
        if self.fp16:
            return "fp16"
        if self.bf16:
            return "bf16"
        return "fp16" if self.device_type == "ipu" else "fp32"

    @property
    def use_lamb(self) -> bool:
        return self.lamb or self.lamb_no_bias_correction


def compile_by_default(requested, device_type):
    """Whether the step is compiled: as asked, else on CUDA only (where compilation pays back its minute at start in
    a few hundred steps; on CPU the compile time rarely pays back and eager is easier to debug)."""
    if requested is not None:
        return bool(requested)
    return device_type == "cuda"


def _resolve_device_type(requested):
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu (or auto)")
    if requested == "ipu":
        try:
            import poptorch  # noqa: F401
        except ImportError:
            raise UserError("--device ipu needs the Poplar SDK's poptorch; install the SDK or use --device auto") \
                from None
    return requested


def resolve_ipu_config(source, pod_type=None, n_ipu=None, overrides=None):
    """An IPU configuration in the documented order, the one place that owns it: `source` (a directory holding
    ipu_config.json, a .json file or a hub name; None for the defaults) -> `pod_type` (None resolves per-pod values to
    their "default") -> `n_ipu` -> `overrides` ("key=value,..."). The training scripts (load_ipu_config) and
    `python -m ipu_train.plan` both build theirs with it."""
    from .config import IPUConfig

    ipu_config = IPUConfig() if source is None else IPUConfig.from_pretrained(source)
    ipu_config = ipu_config.for_pod_type(pod_type)
    if n_ipu is not None:
        ipu_config.apply_n_ipu(n_ipu)
    if overrides:
        ipu_config.update_from_string(overrides)
    return ipu_config


def load_ipu_config(training_args, model_name_or_path=None):
    """The IPU configuration of a run, built in the documented order: source (--ipu_config_name, else the model
    directory's ipu_config.json, else the defaults) -> --pod_type or --n_ipu -> --ipu_config_overrides ->
    --gradient_accumulation_steps / --gradient_checkpointing / --auto_loss_scaling -> seed = --seed.
    The trainer's ParallelLayout then fits the replication factor to the processes that run."""
    args = training_args
    found_with_model = None
    source = None
    if args.ipu_config_name:
        logger.info("IPU configuration: %s (--ipu_config_name)", args.ipu_config_name)
        source = args.ipu_config_name
    elif model_name_or_path and os.path.isfile(os.path.join(model_name_or_path, "ipu_config.json")):
        found_with_model = os.path.join(model_name_or_path, "ipu_config.json")
        source = model_name_or_path
    else:
        logger.info("IPU configuration: the defaults (no --ipu_config_name, no ipu_config.json with the model)")
    ipu_config = resolve_ipu_config(source, args.pod_type, args.n_ipu, args.ipu_config_overrides)

    command_line = []
    if args.gradient_accumulation_steps is not None:
        command_line.append(f"gradient_accumulation_steps={args.gradient_accumulation_steps}")
    if args.activation_checkpointing:  # --gradient_checkpointing lands here (its deprecated alias)
        command_line.append("recompute_checkpoint_every_layer=true")
    if args.auto_loss_scaling is not None:
        command_line.append(f"auto_loss_scaling={str(args.auto_loss_scaling).lower()}")
    command_line.append(f"seed={args.seed}")
    ipu_config.update_from_string(",".join(command_line))

    if found_with_model:
        # Not asked for, yet it sets the batch arithmetic: a warning, visible with quieter logging too.
        logger.warning("IPU configuration: %s, found in the model directory (no --ipu_config_name); with the flags "
                       "applied: %s. --ipu_config_name or --ipu_config_overrides changes it", found_with_model,
                       _key_settings(ipu_config))
    return ipu_config


# The settings that decide the batch arithmetic, the pipeline layout and the cost of a step.
KEY_SETTINGS = ("layers_per_ipu", "ipus_per_replica", "gradient_accumulation_steps", "device_iterations",
                "replication_factor", "inference_device_iterations", "inference_replication_factor",
                "recompute_checkpoint_every_layer")


def _key_settings(ipu_config):
    return ", ".join(f"{key}={json.dumps(getattr(ipu_config, key))}" for key in KEY_SETTINGS)

