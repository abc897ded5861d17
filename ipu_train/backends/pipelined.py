"""The PyTorch backend with each replica's pipeline stages on separate processes (--pipeline_stages_across_processes):
every process builds only its stages from the model (pipeline/process_stages.py) and an optimizer step runs the
step's micro-batches through the schedule. Devices, data and the training group are the TorchBackend's; the step,
clipping, saving and the optimizer's files are the pipeline's.

No host read happens inside a group: the loss comes back broadcast on the device, the gradient norm is all-reduced
on it. On CUDA the stages talk over NCCL (written, not yet run: CI has no GPU); on CPU over gloo."""
import logging
import os

import torch
from torch import nn

from ..errors import UserError
from ..pipeline.heads import serialization_factor
from ..pipeline.process_stages import (PipelineRanks, build_process_pipeline, build_stage_module,
                                       clip_global_grad_norm, gather_model_state, load_whole_model_state,
                                       new_pipeline_groups, pipeline_train_step, stage_plan_for)
from .base import input_tokens
from .torch import TorchBackend

logger = logging.getLogger("ipu_train")

SCHEDULER_NAME = "scheduler.pt"


def optimizer_file(pipeline_rank, processes):
    """Each pipeline position's optimizer state in a checkpoint (replica 0 writes them; the others hold the same)."""
    return f"optimizer.pipeline-{pipeline_rank}-of-{processes}.pt"


class PipelinedBackend(TorchBackend):  # implements backends.base.Backend
    """Owns this process's stage modules, its part of the schedule, and their optimizer."""

    def __init__(self, args, ipu_config, layout):
        super().__init__(args, ipu_config, layout)
        self.pipeline = None
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

    def prepare_model(self, model, max_predictions=None):
        """This process's stages, built from the model's weights (the scripts build the same model, from the same
        seed or files, in every process); returns them as one module. The model itself stays for saving."""
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
        self.pipeline = build_process_pipeline(self.ranks, groups, modules, self.layout.accumulation,
                                               schedule=self.args.pipeline_schedule, device=self.device)
        self.non_embedding_params = model.num_parameters(exclude_embeddings=True)
        self.model, self.train_module = model, nn.ModuleList(modules)
        return self.train_module

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
        grad_norm = None
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            grad_norm = clip_global_grad_norm(self.pipeline, self.args.max_grad_norm)
        self.optimizer.step()
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
        raise UserError("--compile_only: the pipeline stages run eagerly")

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

