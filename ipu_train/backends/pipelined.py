"""The PyTorch backend with each replica's pipeline stages on separate processes (--pipeline_stages_across_processes):
every process builds only its stages from the model (pipeline/process_stages.py) and an optimizer step runs the
step's micro-batches through the schedule. Devices, data and the training group are the TorchBackend's; the step,
clipping, evaluation, saving and the optimizer's files are the pipeline's.

Evaluation runs forward only through the same stages (an evaluation schedule of its own:
process_stages.pipeline_forward_step), a step of `gradient_accumulation_steps` evaluation batches at a time, every
process of a replica reading the same ones; the trainer then receives the step one micro-batch at a time, as one
process would. The last stage alone accounts for the loss, the samples and the logits (its head run on one micro-
batch's real rows at a time, so no more logits exist at once than in one process), so that summing over every
process counts each sample once; the other processes hand over no rows.

No host read happens inside a group: the loss comes back broadcast on the device, the gradient norm is all-reduced
on it. On CUDA the stages talk over NCCL (written, not yet run: CI has no GPU); on CPU over gloo."""
import contextlib
import itertools
import logging
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..pipeline.heads import serialization_factor
from ..pipeline.loss_scale import PipelineLossScale
from ..pipeline.process_stages import (PipelineRanks, build_process_pipeline, build_stage_module, copy_saved_weights,
                                       gather_model_state, load_whole_model_state, new_pipeline_groups,
                                       pipeline_forward_step, pipeline_optimizer_step, pipeline_train_step,
                                       stage_plan_for)
from ..pipeline.weight_files import defer_loading, folder_weights
from .base import batch_size, ignore_padding_labels, input_tokens
from .torch import TorchBackend, _chunks

logger = logging.getLogger("ipu_train")

SCHEDULER_NAME = "scheduler.pt"
REAL_ROWS = "real_rows"  # the batch key of an evaluation step's rows that are samples, not padding
STEP_POSITION = "step_position"  # an evaluation item's micro-batch in its step (0 carries the whole step)


def optimizer_file(pipeline_rank, processes):
    """Each pipeline position's optimizer state in a checkpoint (replica 0 writes them; the others hold the same)."""
    return f"optimizer.pipeline-{pipeline_rank}-of-{processes}.pt"


class PipelinedBackend(TorchBackend):  # implements backends.base.Backend
    """Owns this process's stage modules, its part of the schedule, and their optimizer."""

    def __init__(self, args, ipu_config, layout):
        super().__init__(args, ipu_config, layout)
        self.pipeline = None
        self._evaluated = None  # the evaluation step whose micro-batches the trainer is reading
        self.ranks = PipelineRanks(rank=layout.rank, ranks_per_pipeline=layout.pipeline_processes,
                                   replicas=layout.replicas, num_stages=layout.pipeline_stages)
        logger.info("Pipeline stages across processes: this process (rank %d) runs stage(s) %s of replica %d, "
                    "schedule %s over %d micro-batches", layout.rank, self.ranks.stage_indices, self.ranks.replica,
                    args.pipeline_schedule, layout.accumulation)

    def _shards_optimizer_state(self):
        """One replica (check_process_stages refuses sharding over several): nothing to shard over."""
        if self.ipu_config.replicated_tensor_sharding:
            logger.info("replicated_tensor_sharding: no effect with one replica; each process keeps its stages' "
                        "optimizer state")
        return False

    def _loss_scaler(self):
        """fp16: the same scale on every process of the pipelines (see pipeline/loss_scale.py), chosen as without
        stages."""
        choice = self._loss_scale_choice()
        if choice is None:
            return None
        dynamic, scale = choice
        return PipelineLossScale(scale, self.device, dynamic=dynamic)

    def prepare_model(self, model, max_predictions=None):
        """This process's stages, built from the model's weights (the scripts build the same model, from the same
        seed or files, in every process), alone on the device; returns them as one module. The model itself stays,
        its weights freed, for its config and for saving (the stages' weights are gathered into it then)."""
        plan = stage_plan_for(model.config, self.ipu_config)
        groups = new_pipeline_groups(self.ranks)
        try:
            modules = [build_stage_module(model, plan, index, device=self.device,
                                          n_chunks=serialization_factor(self.ipu_config),
                                          max_predictions=max_predictions,
                                          recompute=self.ipu_config.recompute_checkpoint_every_layer)
                       for index in self.ranks.stage_indices]
        except ValueError as err:
            raise UserError(f"--pipeline_stages_across_processes: {err}") from None
        if self._evaluates():
            self._check_evaluation()
        if self.args.torch_compile:
            self._compile_stages(modules)
        self.pipeline = build_process_pipeline(self.ranks, groups, modules, self.layout.accumulation,
                                               schedule=self.args.pipeline_schedule, device=self.device,
                                               loss_scale=self.scaler)
        self.non_embedding_params = model.num_parameters(exclude_embeddings=True)
        self.model, self.train_module = model, nn.ModuleList(modules)
        self._log_kept_share(model)
        free_weights(model)
        return self.train_module

    def _compile_stages(self, modules):
        """Each stage module compiled in place, and the last stage's loss (the LM or MLM head): what the model's
        compilation covers without stages. The schedule's sends and receives stay outside the compiled code."""
        for module in modules:
            self.compile(module)
            if module.is_last:
                module.loss = torch.compile(module.loss, backend=self.args.torch_compile_backend,
                                            mode=self.args.torch_compile_mode)

    def resume_weights(self, model, checkpoint):
        """Resuming: this process's stages will read their weights from the checkpoint's model files (the whole
        model, gathered when it was saved) instead of the model's own or pretrained ones."""
        defer_loading(model, folder_weights(checkpoint))

    def load_weights_into_stages(self, checkpoint):
        """The weights of a checkpoint copied into this process's stages (--load_best_model_at_end)."""
        copy_saved_weights(self.pipeline, folder_weights(checkpoint), self.model)

    def _log_kept_share(self, model):
        kept = sum(p.numel() for p in self.train_module.parameters())
        logger.info("Rank %d keeps stage(s) %s on %s: %d of the model's %d parameters; the whole model's weights are "
                    "freed", self.layout.rank, self.ranks.stage_indices, self.device, kept, model.num_parameters())

    def to_device(self, batch):
        """The batch as it is: every micro-batch of a step keeps its attention mask, since the schedule concatenates
        them."""
        return self.move_to_device(batch)

    def train_step(self, micro_batches):
        """One optimizer step through the schedule: the mean loss over the micro-batches and replicas (on every
        process), clipping by the global gradient norm, the optimizer and schedule of this process's stages."""
        self.train_module.train()
        with self.autocast():
            step_loss = pipeline_train_step(self.pipeline, micro_batches, device=self.device)
        grad_norm = pipeline_optimizer_step(self.pipeline, self.optimizer, self.args.max_grad_norm, self.scaler)
        self.last_learning_rate = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = torch.zeros((), device=self.device)
        if self.ranks.pipeline_rank == 0:  # every process of a replica reads the same tokens: count them once
            for batch in micro_batches:
                tokens += input_tokens(batch)
        return step_loss, tokens, grad_norm

    def batch_flops(self, batch):
        """This process's share of the replica's model FLOPs, so that the sum over the processes is the model's."""
        return super().batch_flops(batch) // self.layout.pipeline_processes

    def compile_step(self, batches):
        raise UserError("--compile_only: each stage compiles on the first step, through the schedule")

    # --- evaluation --------------------------------------------------------------------------------------------

    def _evaluates(self):
        args = self.args
        return args.do_eval or args.eval_strategy not in ("no", None) or args.eval_on_start

    def _check_evaluation(self):
        """Before training: what evaluation cannot run on these stages is refused in one line."""
        cfg = self.ipu_config
        with cfg.in_mode("training"):
            training, inference = cfg.layers_per_ipu, cfg.inference_layers_per_ipu
        if training != inference:
            raise UserError(f"--pipeline_stages_across_processes evaluates on the training stages (layers_per_ipu="
                            f"{training}), not inference_layers_per_ipu={inference}: drop inference_layers_per_ipu")

    def eval_loader(self, dataset, collator, indices, label_names=()):
        """The replica's samples (`indices`) in steps of the schedule's micro-batches, read alike by every process
        of the replica. The micro-batches are collated as one process collates them (so random masks draw alike);
        the last step is then completed with repeats of its last row, their labels ignored."""
        micro = self.args.per_device_eval_batch_size
        loader = self._loader(dataset, collator, _chunks(indices, micro), 0)
        return _EvaluationSteps(loader, micro, self.layout.accumulation, label_names)

    def eval_outputs(self, model, batch):
        """One micro-batch's outputs and rows. At the first of a step, the whole step runs forward only through the
        stages. The last stage returns the micro-batch's loss (over its real rows) and, where metrics need them,
        their logits, with those rows; the other processes return no loss, no rows and logits of no rows."""
        position = batch.pop(STEP_POSITION)
        if position == 0:
            if self.pipeline is None:  # evaluation without training
                self.prepare_model(model)
            self._evaluated = self._forward_step(batch)
        step = self._evaluated
        if position == self.layout.accumulation - 1:
            self._evaluated = None  # the step's final outputs go with its last micro-batch
        micro = self.args.per_device_eval_batch_size
        first = position * micro
        rows = slice(first, first + min(max(step.real - first, 0), micro))
        outputs = {"loss": step.losses[position].float() if rows.stop > first else None}
        if not self.args.prediction_loss_only:
            outputs.update(self._logits(step, rows))
        return outputs, {key: _rows_of(value, rows) for key, value in step.batch.items()}

    def _forward_step(self, batch):
        real = batch.pop(REAL_ROWS)
        self.train_module.eval()
        with torch.no_grad(), self.autocast(), _uncapped(self.pipeline.modules):
            losses, finished = pipeline_forward_step(self.pipeline, batch)
        return _EvaluatedStep(batch, real if self.pipeline.holds_last else 0, losses, finished)

    def _logits(self, step, rows):
        """The model's logits, by the names its own output gives them, of the step's `rows` (a slice), computed on
        the last stage from its final outputs; elsewhere the same names with no rows."""
        if step.finished is None:
            dtype = self.autocast_dtype or self.model.dtype
            shapes = self.pipeline.modules[0].logits_row_shapes(step.batch, self.model.config.vocab_size)
            return {name: torch.zeros((0, *shape), dtype=dtype, device=self.device) for name, shape in shapes.items()}
        with torch.no_grad(), self.autocast():
            return self.pipeline.modules[-1].logits(_rows_of(step.finished, rows))

    # --- saving ------------------------------------------------------------------------------------------------

    def gather_model(self):
        """The trained weights of every stage, copied into the main process's model (collective: every process
        calls it) so that it saves as one from_pretrained folder; the tied weight's copies are equal."""
        state = gather_model_state(self.pipeline, dst=0)
        if state is None:
            return
        load_whole_model_state(self.model, state)

    def save_optimizer(self, folder):
        """Each pipeline position's optimizer state (from replica 0), and the schedule's from the main process."""
        if self.ranks.replica == 0:
            os.makedirs(folder, exist_ok=True)
            name = optimizer_file(self.ranks.pipeline_rank, self.layout.pipeline_processes)
            torch.save(self.optimizer.state_dict(), os.path.join(folder, name))
        if self.layout.writes_files:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(folder, SCHEDULER_NAME))

    def load_optimizer(self, folder, optimizer, lr_scheduler):
        """This pipeline position's optimizer state and the schedule's, into the trainer's (not yet attached)."""
        name = optimizer_file(self.ranks.pipeline_rank, self.layout.pipeline_processes)
        optimizer.load_state_dict(torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True))
        lr_scheduler.load_state_dict(torch.load(os.path.join(folder, SCHEDULER_NAME), weights_only=True))


def free_weights(model):
    """Every parameter of `model` replaced by a meta tensor of its shape (no memory), tied ones still shared; the
    buffers stay (small, and read by some models' config-level code)."""
    emptied = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                if id(param) not in emptied:
                    emptied[id(param)] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
                module._parameters[name] = emptied[id(param)]


def _rows_of(value, rows):
    """`value`'s rows `rows` (a slice), a tuple of tensors (the last stage's outputs) slice by slice."""
    if isinstance(value, tuple):
        return tuple(_rows_of(part, rows) for part in value)
    return value[rows] if torch.is_tensor(value) else value


@dataclass
class _EvaluatedStep:
    """An evaluation step run through the stages: its batch, its real rows (0 but on the last stage), the last
    stage's loss per micro-batch and its final outputs (None elsewhere)."""
    batch: dict
    real: int
    losses: list
    finished: object


class _EvaluationSteps:
    """A loader's micro-batches, `per_step` at a time, as steps of `micro` x `per_step` rows: the first item of a
    step is the whole step, the last one completed with repeats of its last row, with REAL_ROWS, the rows before
    that padding (whose labels are ignored); the others name only their micro-batch's position in the step
    (STEP_POSITION), so that the trainer reads one micro-batch per item. `dataset`: the whole evaluation set, for
    the trainer's count."""

    def __init__(self, loader, micro, per_step, label_names):
        self.loader, self.micro, self.per_step, self.label_names = loader, micro, per_step, label_names
        self.dataset = loader.dataset

    def __len__(self):
        return math.ceil(len(self.loader) / self.per_step) * self.per_step

    def __iter__(self):
        batches, rows, shape = iter(self.loader), self.micro * self.per_step, None
        while group := list(itertools.islice(batches, self.per_step)):
            shape = shape or _row_shapes(group[0])
            if any(_row_shapes(batch) != shape for batch in group):
                raise UserError("--pipeline_stages_across_processes: evaluation batches differ in shape, and the "
                                "stages run one shape: pad every batch to one length (e.g. --pad_to_max_length)")
            step = {key: torch.cat([batch[key] for batch in group]) for key in group[0]}
            real = batch_size(step)
            step = {key: torch.cat([value, value[-1:].expand(rows - real, *value.shape[1:])])
                    for key, value in step.items()}
            yield {**ignore_padding_labels(step, real, self.label_names), REAL_ROWS: real, STEP_POSITION: 0}
            for position in range(1, self.per_step):
                yield {STEP_POSITION: position}


def _row_shapes(batch):
    return {key: tuple(value.shape[1:]) for key, value in batch.items() if torch.is_tensor(value)}


@contextlib.contextmanager
def _uncapped(modules):
    """The stages' sparse MLM loss without the training cap on masked tokens per sequence: the evaluation collators
    mask without one, and one process evaluates with the model's own forward, which counts every masked token."""
    caps = [module.max_predictions for module in modules]
    for module in modules:
        module.max_predictions = None
    try:
        yield
    finally:
        for module, cap in zip(modules, caps):
            module.max_predictions = cap

