"""The IPU backend, written against PopTorch's API (the Poplar SDK's `poptorch`, not on PyPI). Imported only with
--device ipu. PopTorch runs a whole group on the device in one call: a data-loader item is the combined batch of
micro_batch x gradient_accumulation_steps x replication_factor x device_iterations samples, and the returned loss is
already on the host. Differences from the PyTorch backend: the group always holds device_iterations steps (a
max_steps that is not a multiple of it ends at the next group boundary), the serialized heads are not patched in,
and the learning rate reaches the device once per group (setOptimizer).

What PopTorch requires, and where it is met here (each checked by tests/poptorch_double.py, which cites the source):
- a module begins one block only (python/ops.py: BeginBlock): blocks are removed before the other layout's are
  placed, and a layer module shared by several layers (ALBERT) is placed once; the embedding and the vocabulary
  projection are serialized per layout (poptorch_serialization.py);
- a weight is used on one IPU when pipelining (popart willow/src/transforms/pipeline.cpp): the head tied to the word
  embedding runs on IPU 0, as in optimum-graphcore;
- one loss (poptorch/source/RemoveSurplusIdentityLosses.cpp): the training executable returns the model's loss alone,
  marked with identity_loss (BERT pretraining adds two);
- PopTorch traces the mode the model has (python/__init__.py): train() before the training executable, eval() before
  the inference one;
- a POD has IPUs for one executable at a time (popart_compiler Compiler.cpp: createDevice): the other one is
  detached before each runs;
- static shapes (python/_poplar_executor.py: _narrow_tensor): evaluation pads its last combined batch, and the
  padding is left out of the loss and the metrics;
- Options.randomSeed reseeds the host (python/options.py): the options are built once per mode, the seed set once;
- under `poprun --num-instances N` (N > 1) the options are popdist.poptorch.Options, which set this instance's replicas
  (--num-replicas / N) and process id themselves and refuse replicationFactor (poptorch tests/popdist_test.py); each
  instance feeds its own share of every combined batch, so PopTorch's DataLoader must not partition the data again
  (python/__init__.py: DataLoader, auto_distributed_partitioning), and the host-side sums are added over the
  instances (the gradients PopTorch reduces over every replica on the IPUs)."""
import inspect
import logging
import tempfile

import poptorch
import torch

from ..pipeline.families import stage0_modules, tied_head
from ..pipeline.heads import loss_of
from ..pipeline.stages import transformer_layers
from . import poptorch_serialization as serialization
from .base import (DeviceSums, GroupResult, GroupSums, PendingHostRead, batch_size, ignore_padding_labels,
                   input_tokens, real_rows_loss)

logger = logging.getLogger("ipu_train")

PADDING_ROWS = "ipu_padding_rows"  # the padded rows of an evaluation batch, which eval_outputs leaves out
# IPU configuration fields with no effect here: optimum-graphcore passes them to its own per-model parallelize().
IGNORED_FIELDS = ("parallelize_kwargs", "inference_parallelize_kwargs")
# PopART enum values optimum-graphcore sets by name through the SDK's `popart` module (popart sessionoptions.hpp):
# AccumulateOuterFragmentSchedule::OverlapMemoryOptimized and SubgraphCopyingStrategy::JustInTime.
OVERLAP_MEMORY_OPTIMIZED, JUST_IN_TIME = 3, 1


def build_options(ipu_config, *, training, compile_only=False, instances=1):
    """poptorch.Options for the configuration's training or inference layout, run by `instances` poprun instances."""
    cfg = ipu_config
    prefix = "" if training else "inference_"
    replicas = getattr(cfg, f"{prefix}replication_factor")
    stages = getattr(cfg, f"{prefix}ipus_per_replica")
    opts = _new_options(replicas, stages, instances)
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
        opts.setExecutionStrategy(poptorch.ShardedExecution(poptorch.AutoStage.AutoIncrement))
    if training and cfg.seed is not None:  # it reseeds the host as well: once per run, with the training options
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
    _set_popart(opts, explicit_ir=not training and cfg.explicit_ir_inference)
    return opts


def _new_options(replicas, ipus_per_replica, instances):
    """Options running `replicas` replicas in all: in this process, or over poprun's instances through popdist, which
    sets each instance's share (--num-replicas / --num-instances, checked against `replicas` by
    parallel.check_poprun) as graphcore/examples' BERT does (nlp/bert/pytorch/ipu_options.py: get_options)."""
    if instances == 1:
        return poptorch.Options().replicationFactor(replicas)
    import popdist.poptorch

    return popdist.poptorch.Options(ipus_per_replica=ipus_per_replica)


def _set_popart(opts, explicit_ir):
    """The PopART settings optimum-graphcore's IPUConfig._to_options makes for every model (ipu_configuration.py)."""
    popart = opts._Popart
    popart.set("saveInitializersToFile", tempfile.NamedTemporaryFile().name)  # models over 2 GB need it
    popart.set("disableGradAccumulationTensorStreams", True)  # stream back only the tensors asked for
    # the optimizer step of every IPU but IPU 0 overlapped with the others
    popart.set("accumulateOuterFragmentSettings.schedule", OVERLAP_MEMORY_OPTIMIZED)
    popart.set("accumulateOuterFragmentSettings.excludedVirtualGraphs", ["0"])
    popart.set("outlineThreshold", 10.0)
    popart.set("subgraphCopyingStrategy", JUST_IN_TIME)
    popart.set("scheduleNonWeightUpdateGradientConsumersEarly", True)
    popart.setPatterns({"TiedGather": True, "TiedGatherAccumulate": True, "UpdateInplacePrioritiesForIpu": True})
    if explicit_ir:
        popart.set("enableExplicitIR", True)
    popart.set("engineOptions", {"opt.useAutoloader": "true", "target.syncReplicasIndependently": "true"})


def place_blocks(model, ipu_config, mode, recompute):
    """The blocks of `mode`'s layout (its layers_per_ipu and serialization): the family's stage-0 modules (the
    embeddings) on IPU 0, each layer on its IPU, the tied head back on IPU 0 (optimum-graphcore's placement), after
    removing the blocks and serialization of any earlier placement. A serialized embedding or projection spread over
    IPUs (*_splits_per_ipu) begins its blocks at its parts instead. Returns each layer's IPU and the recompute
    hooks' handles."""
    poptorch.removeBlocks(model)
    serialization.restore(model)
    layers = transformer_layers(model)
    pipelined = mode == "training"  # build_options: PipelinedExecution for training, ShardedExecution otherwise
    head = tied_head(model)
    with ipu_config.in_mode(mode):
        stage_of = ipu_config.layer_stages(len(layers))
        embedding_factor = ipu_config.embedding_serialization_factor
        projection_factor = ipu_config.projection_serialization_factor
        if head is not None and projection_factor == 1:
            # optimum-graphcore: on a model whose LM head is tied to the word embedding, embedding_serialization_factor
            # splits that head's matmul (models/gpt2/modeling_gpt2.py, models/bert/modeling_bert.py: SerializedLinear),
            # as the PyTorch backend's chunked loss does; the lookup is spread by its splits_per_ipu alone
            embedding_factor, projection_factor = 1, embedding_factor
        embedding_parts = serialization.serialize_embedding(
            model, embedding_factor, ipu_config.serialized_embedding_splits_per_ipu, pipelined=pipelined)
        projection_parts = serialization.serialize_projection(
            model, projection_factor, ipu_config.serialized_projection_splits_per_ipu, pipelined=pipelined)
    embedding = model.get_input_embeddings()
    for index, module in enumerate(stage0_modules(model)):
        if module is embedding and embedding_parts:
            _begin(embedding_parts)
        else:
            poptorch.BeginBlock(module, "Embedding" if index == 0 else f"Embedding{index}", ipu_id=0)
    placed, handles = set(), []
    for index, (layer, ipu) in enumerate(zip(layers, stage_of)):
        if id(layer) in placed:  # one module runs as several layers (ALBERT): it begins its block where it first runs
            continue
        placed.add(id(layer))
        poptorch.BeginBlock(layer, f"Layer{index}", ipu_id=ipu)
        if recompute:
            handles.append(layer.register_forward_hook(_checkpoint_output))
    if projection_parts:
        _begin(projection_parts)
    elif head is not None:
        poptorch.BeginBlock(head, "LMHead", ipu_id=0)
    return stage_of, handles


def _begin(parts):
    """The blocks of a serialized module's parts, each on its IPU."""
    for part in parts:
        poptorch.BeginBlock(part.module, part.user_id, ipu_id=part.ipu_id)


def _checkpoint_output(module, inputs, output):
    if isinstance(output, tuple):
        return (poptorch.recomputationCheckpoint(output[0]),) + output[1:]
    return poptorch.recomputationCheckpoint(output)


def _without_cache(model, batch):
    """The batch with use_cache=False (use_mems=False for XLNet) where the model takes it: a cache is never read
    here, and returning it costs a device-to-host copy of every layer's keys and values."""
    accepted = inspect.signature(model.forward).parameters
    return {**batch, **{flag: False for flag in ("use_cache", "use_mems") if flag in accepted}}


class LossOnly(torch.nn.Module):
    """What the training executable computes: the model's loss alone (no logits or cache to copy back), marked as
    the one loss; the model's own class is left as it is (PopTorch renames the class of what it wraps). PopTorch
    binds inputs to the forward's named parameters (python/_args_parser.py), so they are named: every input the
    scripts' collators produce."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, next_sentence_label=None,
                perm_mask=None, target_mapping=None):
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                 "labels": labels, "next_sentence_label": next_sentence_label, "perm_mask": perm_mask,
                 "target_mapping": target_mapping}
        batch = _without_cache(self.model, {name: value for name, value in given.items() if value is not None})
        return poptorch.identity_loss(loss_of(self.model(**batch)), reduction="none")


class _PaddedSubset(torch.utils.data.Subset):
    """The samples at `indices`, then repeats of the last one up to `length`; each item says whether it is
    padding."""

    def __init__(self, dataset, indices, length):
        last = indices[-1:] or [0]  # an instance with no sample of its own pads with the first one
        super().__init__(dataset, indices + last * (length - len(indices)))
        self.real = len(indices)

    def __getitem__(self, index):
        return super().__getitem__(index), index >= self.real

    def __getitems__(self, indices):  # torch's DataLoader fetches a batch through it when it exists
        return [self[index] for index in indices]


class _PaddingCollator:
    """Collates rows and padding alike (static shapes); the padding's labels become IGNORE_INDEX, so no loss counts
    them, and their number travels with the batch."""

    def __init__(self, collator, label_names):
        self.collator, self.label_names = collator, label_names

    def __call__(self, items):
        rows, padding = zip(*items)
        padded = sum(padding)  # the padding is at the end of the last batch
        batch = ignore_padding_labels(dict(self.collator(list(rows))), len(rows) - padded, self.label_names)
        batch[PADDING_ROWS] = torch.tensor(padded)  # a tensor: PopTorch's asynchronous loaders pass tensors only
        return batch


class PopTorchBackend:  # implements backends.base.Backend
    """The trainer's backend interface over poptorch.trainingModel / inferenceModel."""

    reports_grad_norm = False  # PopTorch clips inside the device program and does not return the norm

    def __init__(self, args, ipu_config, layout):
        self.args, self.ipu_config, self.layout = args, ipu_config, layout
        self.device = torch.device("cpu")  # the host: PopTorch moves the data itself
        self.precision = args.precision
        # Built once: Options.randomSeed reseeds the host, and a DataLoader freezes the options it is given.
        instances = layout.processes  # parallel.check_poprun: on IPU, the processes are poprun's instances
        self.options = {"training": build_options(ipu_config, training=True, compile_only=args.compile_only,
                                                  instances=instances),
                        "inference": build_options(ipu_config, training=False, instances=instances)}
        self.model = self.training_model = self.inference_model = None
        self.optimizer = self.lr_scheduler = None
        self.last_learning_rate = None
        self.nonfinite_run = 0  # steps in a row with a non-finite loss
        self._placed = None  # the mode whose blocks the model holds
        self._recompute_hooks = []
        if args.max_grad_norm:
            logger.warning("--max_grad_norm %s is not applied on IPU: PopTorch's gradient clipping fails to compile "
                           "pipelined models (optimum-graphcore turns it off too); pass --max_grad_norm 0 to train "
                           "without it knowingly", args.max_grad_norm)
        ignored = [name for name in IGNORED_FIELDS if getattr(ipu_config, name)]
        if ignored:
            logger.info("IPU configuration fields with no effect here: %s (optimum-graphcore's per-model "
                        "parallelize() arguments)", ", ".join(ignored))

    def prepare_model(self, model, max_predictions=None):
        """The model in the precision asked for; its blocks and the serialization of its embedding and projection
        are placed when an executable is built. The serialized heads of the PyTorch backend (and so
        `max_predictions`) are not applied on IPU: their custom autograd has not been run through PopTorch's
        tracer."""
        if self.precision == "fp16":
            model.half()
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
        if self.training_model is not None:  # a later train(): the executable stays, with this optimizer
            self.training_model.setOptimizer(optimizer)
            if self.training_model.isAttachedToDevice():  # weights loaded on the host (a resume) go to the IPUs
                self.training_model.copyWeightsToDevice()

    def executable(self, mode):
        """`mode`'s executable, built on first use (the model in that mode, in that layout's blocks), with the other
        one detached from the IPUs."""
        other = self.inference_model if mode == "training" else self.training_model
        if other is not None and other.isAttachedToDevice():
            other.detachFromDevice()
        if mode == "training" and self.training_model is None:
            self._place(mode)
            wrapper = LossOnly(self.model).train()
            self.training_model = poptorch.trainingModel(wrapper, options=self.options[mode],
                                                         optimizer=self.optimizer)
        if mode == "inference" and self.inference_model is None:
            self._place(mode)
            self.inference_model = poptorch.inferenceModel(self.model.eval(), options=self.options[mode])
        return self.training_model if mode == "training" else self.inference_model

    def _place(self, mode):
        if self._placed != mode:
            for handle in self._recompute_hooks:
                handle.remove()
            recompute = mode == "training" and self.ipu_config.recompute_checkpoint_every_layer
            _, self._recompute_hooks = place_blocks(self.model, self.ipu_config, mode, recompute)
            self._placed = mode

    def train_loader(self, dataset, collator, order, start_step, seed):
        """This instance's share of each step from `start_step` on (all of it without poprun): the contiguous slice of
        its local replicas, as the PyTorch backend gives each process its replicas' slice."""
        micro = self.args.per_device_train_batch_size
        subset = torch.utils.data.Subset(dataset, self.layout.share_of_steps(order, micro, start_step))
        return self._loader(self.options["training"], subset, collator, micro, drop_last=True)

    def eval_loader(self, dataset, collator, indices, label_names=()):
        """Every sample of this instance's share once, completed with padding to as many combined batches as the
        largest share needs (PopTorch runs static shapes, and every instance runs the same number of batches)."""
        micro, instances = self.args.per_device_eval_batch_size, self.layout.processes
        combined = micro * self.ipu_config.batch_size_factor(for_inference=True) // instances
        largest_share = -(-len(dataset) // instances) if instances > 1 else len(indices)
        length = -(-largest_share // combined) * combined
        padded = _PaddedSubset(dataset, indices, length) if length else torch.utils.data.Subset(dataset, [])
        # drop_last=True drops nothing (the padded share is whole combined batches) and spares PopTorch's warning
        # about a short last batch, which under poprun it reckons against all instances' batches together
        # (python/__init__.py: DataLoader.__init__, combined batch x Distributed.numProcesses).
        return self._loader(self.options["inference"], padded, _PaddingCollator(collator, label_names), micro,
                            drop_last=True)

    def _loader(self, options, dataset, collator, batch_size, drop_last):
        modes = {"sync": poptorch.DataLoaderMode.Sync, "async": poptorch.DataLoaderMode.Async,
                 "async_rebatched": poptorch.DataLoaderMode.AsyncRebatched}
        # auto_distributed_partitioning=False: the dataset is already this instance's share
        return poptorch.DataLoader(options, dataset, batch_size=batch_size, shuffle=False, drop_last=drop_last,
                                   collate_fn=collator, num_workers=self.args.dataloader_num_workers,
                                   auto_distributed_partitioning=False, mode=modes[self.args.dataloader_mode])

    def to_device(self, batch):
        return batch

    def new_group(self):
        return _PopTorchGroup(self)

    def compile_step(self, batches):
        self.executable("training").compile(**next(batches))  # one loader item is a whole group's combined batch

    def eval_outputs(self, model, batch):
        """The outputs of the batch's real rows, and those rows: the loss is each micro-batch's, weighted by its real
        rows (a micro-batch of padding alone has none)."""
        if self.model is None:  # evaluation without training
            self.prepare_model(model)
        padded = int(batch.pop(PADDING_ROWS, 0))
        outputs = self.executable("inference")(**_without_cache(self.model, batch))
        real = batch_size(batch) - padded
        if isinstance(outputs, dict) and outputs.get("loss") is not None:
            # a batch of padding alone (an instance whose share ended earlier) has no loss
            outputs["loss"] = real_rows_loss(outputs["loss"], real, self.args.per_device_eval_batch_size) \
                if real else None
        if not padded:
            return outputs, batch
        trim = {key: value[:real] if torch.is_tensor(value) and value.dim() else value
                for key, value in outputs.items() if key != "loss"}
        return {**trim, "loss": outputs.get("loss")}, {key: value[:real] if torch.is_tensor(value) else value
                                                       for key, value in batch.items()}

    def group_loss(self, loss, steps):
        """The mean step loss of a group of `steps` steps from what the training output mode returned, and how many
        steps it stands for (python/enums.py: OutputMode): all, every micro-batch's loss; sum, their sum per
        replica; final (and default, which is final in training), the last micro-batch of each replica, so the
        group's last step alone."""
        cfg, loss = self.ipu_config, loss.float()
        if cfg.output_mode == "all":
            return loss.mean(), steps
        if cfg.output_mode == "sum":  # the sum over every micro-batch of the group, of this instance's replicas
            return loss.sum() / (cfg.batch_size_factor() // self.layout.processes), steps
        return loss.mean(), 1

    def to_host(self, sums):
        """PopTorch returns host tensors, already summed over this instance's replicas; under poprun the sums of
        every instance are added (the torch.distributed group of the instances)."""
        if self.layout.distributed:
            torch.distributed.all_reduce(sums.tensor)
        return PendingHostRead(sums)

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
    learning-rate schedule. A non-finite loss counts every step of the group as non-finite."""

    def __init__(self, backend):
        self.backend = backend
        self.batch = self.losses = None
        self.steps = 0

    def step(self, batches):
        backend = self.backend
        if self.batch is None:
            self.batch = next(batches)
            self.losses = backend.executable("training")(**self.batch)
        backend.last_learning_rate = backend.lr_scheduler.get_last_lr()[0]
        backend.lr_scheduler.step()
        self.steps += 1

    def finish(self, stop_requested):
        backend, batch, steps = self.backend, self.batch, self.steps
        backend.training_model.setOptimizer(backend.optimizer)  # the new learning rate, for the next group
        loss, counted = backend.group_loss(self.losses, steps)
        finite = bool(torch.isfinite(loss))
        backend.nonfinite_run = 0 if finite else backend.nonfinite_run + steps
        limit = backend.args.max_consecutive_nonfinite_steps
        sums = DeviceSums(GroupSums, backend.device)
        for name, value in (("loss", loss * counted if finite else 0.0), ("finite_steps", counted if finite else 0),
                            ("tokens", input_tokens(batch)), ("stop_requested", float(stop_requested)),
                            ("diverged", float(bool(limit) and backend.nonfinite_run >= limit)),
                            ("ends_nonfinite", float(not finite))):
            sums.put(name, value)
        return GroupResult(steps, batch_size(batch), 0, backend.to_host(sums))
