"""The IPU backend, written against PopTorch's API (the Poplar SDK's `poptorch`, not on PyPI). Imported only with
--device ipu. PopTorch runs a whole group on the device in one call: a data-loader item is the combined batch of
micro_batch x gradient_accumulation_steps x replication_factor x device_iterations samples, and the returned loss is
already on the host. Differences from the PyTorch backend: the group always holds device_iterations steps (a
max_steps that is not a multiple of it ends at the next group boundary), the serialized heads are not patched in
(the IPU splits its projection itself through the stage plan), and the learning rate is updated once per group."""
import logging

import poptorch
import torch

from ..pipeline.heads import loss_of
from ..pipeline.families import stage0_modules
from ..pipeline.stages import transformer_layers
from .base import DeviceSums, GroupResult, GroupSums, PendingHostRead

logger = logging.getLogger("ipu_train")


def build_options(ipu_config, *, training, compile_only=False):
    """poptorch.Options for the configuration's training or inference layout."""
    cfg = ipu_config
    prefix = "" if training else "inference_"
    replicas = getattr(cfg, f"{prefix}replication_factor")
    stages = getattr(cfg, f"{prefix}ipus_per_replica")
    opts = poptorch.Options()
    opts.replicationFactor(replicas)
    opts.autoRoundNumIPUs(True)
    opts.deviceIterations(getattr(cfg, f"{prefix}device_iterations"))
    if training:
        opts.Training.gradientAccumulation(cfg.gradient_accumulation_steps)
        opts.Training.accumulationAndReplicationReductionType(poptorch.ReductionType.Mean)
        if cfg.auto_loss_scaling:
            opts.Training.setAutomaticLossScaling(True)
        opts.outputMode(getattr(poptorch.OutputMode, cfg.output_mode.capitalize()))  # one of OUTPUT_MODES
        opts.setExecutionStrategy(poptorch.PipelinedExecution(poptorch.AutoStage.AutoIncrement))
    else:
        opts.outputMode(poptorch.OutputMode.All)
        opts.setExecutionStrategy(poptorch.ShardedExecution())
    if cfg.seed is not None:
        opts.randomSeed(cfg.seed)
    opts.TensorLocations.setOptimizerLocation(
        poptorch.TensorLocationSettings()
        .useOnChipStorage(not cfg.optimizer_state_offchip)
        .useReplicatedTensorSharding(cfg.replicated_tensor_sharding and replicas > 1))
    if compile_only:
        opts.useOfflineIpuTarget()
    proportion = getattr(cfg, f"{prefix}matmul_proportion")
    proportions = proportion if isinstance(proportion, list) else [proportion] * stages
    opts.setAvailableMemoryProportion({f"IPU{i}": p for i, p in enumerate(proportions)})
    if cfg.executable_cache_dir and cfg.executable_cache_dir != "disabled":
        opts.enableExecutableCaching(cfg.executable_cache_dir)
    opts.Precision.enableStochasticRounding(training)
    if cfg.enable_half_partials:
        opts.Precision.setPartialsType(torch.float16)
    return opts


def annotate_stages(model, ipu_config, recompute):
    """The model family's stage-0 modules (the embeddings) on IPU 0 and each layer in a BeginBlock on its IPU
    (optimum-graphcore's placement); a recomputation checkpoint on each layer output when asked."""
    layers = transformer_layers(model)
    stage_of = ipu_config.layer_stages(len(layers))
    for index, module in enumerate(stage0_modules(model)):
        poptorch.BeginBlock(module, "Embedding" if index == 0 else f"Embedding{index}", ipu_id=0)
    for index, (layer, ipu) in enumerate(zip(layers, stage_of)):
        poptorch.BeginBlock(layer, f"Layer{index}", ipu_id=ipu)
        if recompute:
            layer.register_forward_hook(_checkpoint_output)
    return stage_of


def _checkpoint_output(module, inputs, output):
    if isinstance(output, tuple):
        return (poptorch.recomputationCheckpoint(output[0]),) + output[1:]
    return poptorch.recomputationCheckpoint(output)


class PopTorchBackend:  # implements backends.base.Backend
    """The trainer's backend interface over poptorch.trainingModel / inferenceModel."""

    reports_grad_norm = False  # PopTorch clips inside the device program and does not return the norm

    def __init__(self, args, ipu_config, layout):
        self.args, self.ipu_config, self.layout = args, ipu_config, layout
        self.device = torch.device("cpu")  # the host: PopTorch moves the data itself
        self.precision = args.precision
        self.scaler = None  # loss scaling is the optimizer's (loss_scaling) and the options' (automatic)
        self.model = self.training_model = self.inference_model = None
        self.optimizer = self.lr_scheduler = None
        self.last_learning_rate = None
        self.nonfinite_run = 0  # steps in a row with a non-finite loss

    def prepare_model(self, model, max_predictions=None):
        """Stages and recompute marked for PopTorch. The serialized heads (and so `max_predictions`) are not applied
        on IPU: their custom autograd has not been run through PopTorch's tracer."""
        if self.precision == "fp16":
            model.half()
        annotate_stages(model, self.ipu_config, self.ipu_config.recompute_checkpoint_every_layer)
        self.model = model
        return model

    def compile(self, model):
        """PopTorch compiles in compile_step (trainingModel.compile); nothing to do beforehand."""

    def create_optimizer(self, param_groups):
        """PopTorch's LAMB with --lamb, else PopTorch's optimizer of the class --optim maps to (AdamW, SGD, RMSprop):
        see ipu_train.optim.poptorch_optimizer."""
        from ..optim import poptorch_optimizer

        optimizer_class, kwargs = poptorch_optimizer(self.args, poptorch.optim)
        return optimizer_class(param_groups, **kwargs)

    def attach(self, optimizer, lr_scheduler):
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        options = build_options(self.ipu_config, training=True, compile_only=self.args.compile_only)
        self.training_model = poptorch.trainingModel(self.model, options=options, optimizer=optimizer)

    def train_loader(self, dataset, collator, order, start_step, seed):
        first = start_step * self.args.per_device_train_batch_size * self.layout.accumulation * self.layout.replicas
        subset = torch.utils.data.Subset(dataset, order[first:])
        return self._loader(build_options(self.ipu_config, training=True), subset, collator,
                            self.args.per_device_train_batch_size, drop_last=True)

    def eval_loader(self, dataset, collator, indices):
        options = build_options(self.ipu_config, training=False)
        return self._loader(options, torch.utils.data.Subset(dataset, indices), collator,
                            self.args.per_device_eval_batch_size, drop_last=False)

    def _loader(self, options, dataset, collator, batch_size, drop_last):
        modes = {"sync": poptorch.DataLoaderMode.Sync, "async": poptorch.DataLoaderMode.Async,
                 "async_rebatched": poptorch.DataLoaderMode.AsyncRebatched}
        return poptorch.DataLoader(options, dataset, batch_size=batch_size, shuffle=False, drop_last=drop_last,
                                   collate_fn=collator, num_workers=self.args.dataloader_num_workers,
                                   mode=modes[self.args.dataloader_mode])

    def to_device(self, batch):
        return batch

    def new_group(self):
        return _PopTorchGroup(self)

    def compile_step(self, micro_batches):
        self.training_model.compile(**micro_batches[0])

    def eval_outputs(self, model, batch):
        if self.inference_model is None:
            if self.model is None:  # evaluation without training: place the model for inference
                self.prepare_model(model)
            self.inference_model = poptorch.inferenceModel(self.model,
                                                           options=build_options(self.ipu_config, training=False))
        outputs = self.inference_model(**batch)
        if isinstance(outputs, dict) and outputs.get("loss") is not None:
            outputs["loss"] = outputs["loss"].float().mean()  # one loss per replica and iteration
        return outputs

    def to_host(self, sums):
        return PendingHostRead(sums)  # PopTorch returns host tensors, already summed over the replicas

    def read(self, pending):
        return pending.result()

    def peak_flops_per_second(self):
        return None  # MFU is reported on CUDA only

    def save_state(self, folder):
        """Nothing beyond the optimizer's state: loss scaling lives in the optimizer and the options."""

    def load_state(self, folder):
        """Nothing beyond the optimizer's state (see save_state)."""


class _PopTorchGroup:
    """One device call runs the group's device_iterations steps, at its first `step`; each `step` then advances the
    learning-rate schedule. PopTorch returns the group's mean loss, so a non-finite one counts every step of the
    group as non-finite."""

    def __init__(self, backend):
        self.backend = backend
        self.batch = self.loss = None
        self.steps = 0

    def step(self, batches):
        backend = self.backend
        if self.batch is None:
            self.batch = next(batches)
            self.loss = loss_of(backend.training_model(**self.batch)).float().mean()
        backend.last_learning_rate = backend.lr_scheduler.get_last_lr()[0]
        backend.lr_scheduler.step()
        self.steps += 1

    def finish(self, stop_requested):
        backend, batch, steps = self.backend, self.batch, self.steps
        backend.training_model.setOptimizer(backend.optimizer)  # the new learning rate, for the next group
        tokens = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        samples = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
        finite = bool(torch.isfinite(self.loss))
        backend.nonfinite_run = 0 if finite else backend.nonfinite_run + steps
        limit = backend.args.max_consecutive_nonfinite_steps
        sums = DeviceSums(GroupSums, backend.device)
        for name, value in (("loss", self.loss * steps if finite else 0.0), ("finite_steps", steps if finite else 0),
                            ("tokens", tokens), ("stop_requested", float(stop_requested)),
                            ("diverged", float(bool(limit) and backend.nonfinite_run >= limit)),
                            ("ends_nonfinite", float(not finite))):
            sums.put(name, value)
        return GroupResult(steps, samples, 0, backend.to_host(sums))

