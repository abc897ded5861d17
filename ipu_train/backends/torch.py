"""The PyTorch backend (CPU and CUDA): device, precision, data-parallel replicas (DDP), compilation, the optimizer and
the training step. Nothing here reads a device value on the host: a training group leaves its sums on the device and
`read` brings them back in one transfer per group of `device_iterations` optimizer steps."""
import contextlib
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..attention import eager_sdpa_masks
from ..compat import compile_in_place, grad_scaler
from ..errors import UserError
from ..optim import LAMB
from ..packing import packed_model_inputs
from ..pipeline.heads import enable_serialized_heads, loss_of
from ..pipeline.recompute import enable_recompute
from .base import DeviceSums, GroupResult, GroupSums, PendingHostRead, batch_size, input_tokens

logger = logging.getLogger("ipu_train")

SCALER_NAME = "scaler.pt"  # the fp16 loss scaler's state in a checkpoint

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, matched in this order against
# torch.cuda.get_device_name() (so "A100" is tried before "A10", "L40S" before "L4"). MFU is reported only for bf16
# or fp16 training on a GPU listed here.
PEAK_TFLOPS = (("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
               ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("V100", 125.0))


def peak_flops_per_second(device, precision) -> Optional[float]:
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key in name), None)


class StaticLossScale:
    """--loss_scaling without auto loss scaling, as on IPU: the loss is multiplied by a fixed scale and the gradients
    divided by it before clipping; no step is ever skipped. The same calls as torch.amp.GradScaler."""

    def __init__(self, scale):
        self.loss_scale = float(scale)

    def scale(self, loss):
        return loss * self.loss_scale

    def unscale_(self, optimizer):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch._foreach_mul_(grads, 1.0 / self.loss_scale)

    def step(self, optimizer):
        optimizer.step()

    def update(self):
        pass

    def state_dict(self):
        return {"scale": self.loss_scale}

    def load_state_dict(self, state):
        self.loss_scale = state["scale"]


class ReplicaBatchSampler:
    """This replica's micro-batches, step after step from `start_step`. Step s consumes the combined batch
    order[s*C : (s+1)*C] with C = micro_batch x accumulation x replicas; replica r takes its slice
    [r*micro_batch*accumulation, (r+1)*micro_batch*accumulation) in `accumulation` micro-batches."""

    def __init__(self, order, micro_batch, accumulation, replicas, rank, start_step=0):
        self.order, self.micro_batch, self.accumulation = order, micro_batch, accumulation
        self.rank, self.start_step = rank, start_step
        self.combined = micro_batch * accumulation * replicas
        self.steps = len(order) // self.combined

    def __len__(self):
        return max(self.steps - self.start_step, 0) * self.accumulation

    def __iter__(self):
        per_replica = self.micro_batch * self.accumulation
        for step in range(self.start_step, self.steps):
            first = step * self.combined + self.rank * per_replica
            for k in range(self.accumulation):
                yield self.order[first + k * self.micro_batch: first + (k + 1) * self.micro_batch]


def allow_half_partials(ipu_config, device):
    """`enable_half_partials` (fp16 partials on IPU): on CUDA, whether fp16/bf16 matmuls may accumulate partial sums
    in reduced precision (cuBLAS's faster path); no effect on the CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = ipu_config.enable_half_partials
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = ipu_config.enable_half_partials


class TorchBackend:  # implements backends.base.Backend
    """Owns the training module (the model, compiled and wrapped in DDP as asked), optimizer, scheduler and scaler."""

    reports_grad_norm = True

    def __init__(self, args, ipu_config, layout):
        self.args, self.ipu_config, self.layout = args, ipu_config, layout
        self.device = args.device
        if layout.replicas_per_process > 1:
            logger.info("%d replicas on %d process(es): each process runs %d replicas as %d micro-batches per "
                        "optimizer step (the same global batch and losses; torchrun --nproc_per_node %d runs them "
                        "in parallel)", layout.replicas, layout.processes, layout.replicas_per_process,
                        layout.micro_batches_per_step, layout.replicas)
        self.precision = args.precision
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.scaler = self._loss_scaler()
        allow_half_partials(ipu_config, self.device)
        self.cuda_graphs = bool(getattr(args, "cuda_graphs", False))
        if self.cuda_graphs:
            self._check_cuda_graphs()
        self.model = self.train_module = self.optimizer = self.lr_scheduler = None
        self.last_learning_rate = None
        self.nonfinite_run = torch.zeros((), dtype=torch.int64, device=self.device)
        self.non_embedding_params = 0
        # replicated_tensor_sharding: each replica keeps the optimizer state of its share of the parameters (ZeRO-1).
        self.shard_optimizer_state = self._shards_optimizer_state()
        if ipu_config.optimizer_state_offchip:
            logger.info("optimizer_state_offchip: not applied on PyTorch yet; the optimizer state stays on %s",
                        self.device.type)

    def _shards_optimizer_state(self):
        shards = self.ipu_config.replicated_tensor_sharding and self.layout.distributed
        if shards:
            logger.info("Optimizer state sharded over the %d replicas (replicated_tensor_sharding)",
                        self.layout.processes)
        return shards

    def _check_cuda_graphs(self):
        """CUDA graph trees (torch.compile's reduce-overhead mode) hand out gradients that live in the graph's memory
        pool: a second backward before the optimizer step overwrites them (gradient accumulation silently loses
        micro-batches, pytorch/pytorch#169545), and DDP's reducer copies gradients between graph replays."""
        if self.layout.micro_batches_per_step > 1:
            raise UserError(f"--cuda_graphs needs one micro-batch per step (this run has "
                            f"{self.layout.micro_batches_per_step}: gradient_accumulation_steps x replicas per "
                            "process): pass --gradient_accumulation_steps 1 with one replica per process, or drop "
                            "--cuda_graphs")
        if self.layout.distributed:
            raise UserError(f"--cuda_graphs runs in one process ({self.layout.processes} run): drop --cuda_graphs "
                            "under torchrun")

    # --- precision ---------------------------------------------------------------------------------------------

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loss_scaler(self):
        choice = self._loss_scale_choice()
        if choice is None:
            return None
        dynamic, scale = choice
        return grad_scaler(self.device.type, init_scale=scale) if dynamic else StaticLossScale(scale)

    def _loss_scale_choice(self):
        """fp16's loss scale, (dynamic, first scale): static where --loss_scaling is given without
        auto_loss_scaling; None in other precisions."""
        args, auto = self.args, self.ipu_config.auto_loss_scaling
        if self.precision != "fp16":
            if args.loss_scaling is not None or auto:
                logger.info("Loss scaling has no effect in %s: it applies to fp16 only", self.precision)
            return None
        if args.loss_scaling is not None and not auto:
            return False, args.loss_scaling
        return True, args.loss_scaling or 2.0 ** 16

    # --- model and optimizer -----------------------------------------------------------------------------------

    def prepare_model(self, model, max_predictions=None):
        """Recompute, serialized heads (`max_predictions`: the masked-token cap per sequence, if fixed), compilation
        and DDP, in that order; returns the module to train."""
        cfg, args = self.ipu_config, self.args
        if cfg.recompute_checkpoint_every_layer:
            how = enable_recompute(model)
            logger.info("Activation checkpointing on every layer (recompute_checkpoint_every_layer): %s", how)
        if enable_serialized_heads(model, cfg, max_predictions=max_predictions):
            logger.info("Training loss computed by the serialized head: full logits are never materialised")
        self.non_embedding_params = (model.num_parameters(exclude_embeddings=True) if hasattr(model, "num_parameters")
                                     else sum(p.numel() for p in model.parameters()))
        attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if self.device.type == "cuda" and attention == "eager":
            logger.info("Attention runs in eager PyTorch (attn_implementation='eager'): load the model with "
                        "attn_implementation='sdpa' for fused attention kernels, where the architecture has them")
        if args.torch_compile:
            self.compile(model)
        module = model
        if self.layout.distributed:
            module = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(args.ddp_find_unused_parameters),
                bucket_cap_mb=args.ddp_bucket_cap_mb or 25,
                broadcast_buffers=args.ddp_broadcast_buffers if args.ddp_broadcast_buffers is not None else True,
                static_graph=bool(args.ddp_static_graph))
        self.model, self.train_module = model, module
        return module

    def compile(self, model):
        """torch.compile in place (state_dict keys unchanged), caching in executable_cache_dir when it is set."""
        cache_dir = self.ipu_config.executable_cache_dir
        if cache_dir and cache_dir != "disabled":
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(cache_dir)
            os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
            logger.info("torch.compile cache: %s (executable_cache_dir)", cache_dir)
        logger.info("torch.compile: the model's forward, loss and backward (backend %s, mode %s)%s",
                    self.args.torch_compile_backend, self.args.torch_compile_mode or "default",
                    ", replayed as CUDA graphs" if self.cuda_graphs else "")
        eager_sdpa_masks()  # a model given no mask gets none compiled too (torch 2.11): flash attention stays
        compile_in_place(model, backend=self.args.torch_compile_backend, mode=self.args.torch_compile_mode)

    def create_optimizer(self, param_groups):
        """LAMB with --lamb, else --optim (and --optim_args) as transformers maps them: by default AdamW with bias
        correction, fused on CUDA and foreach on CPU. Sharded over the replicas with replicated_tensor_sharding."""
        from ..optim import lamb_kwargs, torch_optimizer

        if self.args.use_lamb:
            optimizer_class, kwargs = LAMB, lamb_kwargs(self.args)
        else:
            optimizer_class, kwargs = torch_optimizer(self.args, self.device.type)
        if self.shard_optimizer_state:
            # Imported here: torch.distributed.optim scripts functions with the deprecated torch.jit on import.
            from torch.distributed.optim import ZeroRedundancyOptimizer

            return ZeroRedundancyOptimizer(param_groups, optimizer_class=optimizer_class, **kwargs)
        return optimizer_class(param_groups, **kwargs)

    def attach(self, optimizer, lr_scheduler):
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler

    # --- data ----------------------------------------------------------------------------------------------------

    def train_loader(self, dataset, collator, order, start_step, seed):
        """This replica's micro-batches for one epoch whose global sample order is `order`. The loader draws its
        worker seeds from its own generator, so the global RNG (dropout, masking) is untouched by its creation."""
        layout = self.layout
        sampler = ReplicaBatchSampler(order, self.args.per_device_train_batch_size, layout.micro_batches_per_step,
                                      layout.data_processes, layout.data_rank, start_step)
        return self._loader(dataset, collator, sampler, seed)

    def eval_loader(self, dataset, collator, indices, label_names=()):
        return self._loader(dataset, collator, _chunks(indices, self.args.per_device_eval_batch_size), 0)

    def _loader(self, dataset, collator, batch_sampler, seed):
        args = self.args
        workers = args.dataloader_num_workers
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collator, num_workers=workers,
                          pin_memory=args.dataloader_pin_memory and self.device.type == "cuda",
                          prefetch_factor=args.dataloader_prefetch_factor if workers else None,
                          generator=torch.Generator().manual_seed(seed))

    def to_device(self, batch):
        """On CUDA the copies are issued without waiting (they run in stream order, before the kernels that read
        them) from pinned memory; a tensor the loader did not pin (a stream's batch) is pinned first, since a copy
        from pageable memory would make the host wait for the device. An attention mask of ones is dropped first."""
        return self.move_to_device(_without_full_attention_mask(batch))

    def move_to_device(self, batch):
        """The batch's tensors on the device, copied without waiting on CUDA."""
        if self.device.type != "cuda":
            return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        pin = self.args.dataloader_pin_memory
        return {k: _pinned(v, pin).to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    # --- the step ------------------------------------------------------------------------------------------------

    def peak_flops_per_second(self):
        return peak_flops_per_second(self.device, self.precision)

    def new_group(self):
        return _TorchGroup(self)

    def count_nonfinite(self, finite, sums):
        """The run of consecutive non-finite losses, on the device; `diverged` is raised when it reaches the limit."""
        self.nonfinite_run = torch.where(finite, torch.zeros_like(self.nonfinite_run), self.nonfinite_run + 1)
        limit = self.args.max_consecutive_nonfinite_steps
        if limit:
            sums.raise_flag("diverged", self.nonfinite_run >= limit)

    def train_step(self, micro_batches):
        """One optimizer step: the loss of each micro-batch divided by their number (mean over micro-batches, as
        PopTorch's Mean reduction), gradients all-reduced on the last one only, clipping, step, schedule."""
        module, accumulation = self.train_module, len(micro_batches)
        module.train()
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are no longer read
        step_loss = torch.zeros((), device=self.device)
        tokens = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            defer_all_reduce = self.layout.distributed and i < accumulation - 1
            with module.no_sync() if defer_all_reduce else contextlib.nullcontext():
                with self.autocast():
                    outputs = module(**packed_model_inputs(batch, self.model))
                loss = loss_of(outputs).float() / accumulation
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            step_loss += loss.detach()
            tokens += input_tokens(batch)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm, foreach=True)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.last_learning_rate = self.lr_scheduler.get_last_lr()[0]  # the rate this step used (a host float)
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, tokens, grad_norm

    def compile_step(self, batches):
        """Forward and backward of one step's micro-batches through the compiled module, to compile both; gradients
        discarded."""
        self.train_module.train()
        for batch in [next(batches) for _ in range(self.layout.micro_batches_per_step)]:
            with self.autocast():
                loss = loss_of(self.train_module(**packed_model_inputs(self.to_device(batch), self.model))).float()
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)

    def batch_flops(self, batch):
        """Model FLOPs of one forward and backward pass: 6 per non-embedding parameter per token, plus attention
        (12 x layers x hidden size x sequence length per token) when the model config says its shape."""
        ids = batch.get("input_ids")
        if ids is None:
            return 0
        per_token = 6 * self.non_embedding_params
        config = getattr(self.model, "config", None)
        layers = getattr(config, "num_hidden_layers", None)
        hidden = getattr(config, "hidden_size", None)
        if layers and hidden and ids.dim() == 2:
            per_token += 12 * layers * hidden * ids.shape[1]
        return per_token * ids.numel()

    def eval_outputs(self, model, batch):
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad(), self.autocast():
            outputs = model(**packed_model_inputs(batch, model))
        if self.cuda_graphs:  # the next replay overwrites the graph's outputs: keep copies of what is read later
            return _cloned(outputs), batch
        return outputs, batch

    def to_host(self, sums):
        """Start the host read of `sums` where they are final: summed over the processes (an all-reduce, itself on
        the device), then on their way to the host."""
        if self.layout.distributed:
            dist.all_reduce(sums.tensor)
        return PendingHostRead(sums)

    def read(self, pending):
        return pending.result()

    # --- checkpoints ---------------------------------------------------------------------------------------------

    def save_state(self, folder):
        if self.scaler is not None and self.layout.writes_files:
            torch.save(self.scaler.state_dict(), os.path.join(folder, SCALER_NAME))

    def load_state(self, folder):
        path = os.path.join(folder, SCALER_NAME)
        if self.scaler is not None and os.path.isfile(path):
            self.scaler.load_state_dict(torch.load(path, weights_only=True))


class _TorchGroup:
    """A group of optimizer steps on micro-batches already on the device (gradient_accumulation_steps x replicas in
    this process per step), its sums accumulated on the device."""

    def __init__(self, backend):
        self.backend = backend
        self.sums = DeviceSums(GroupSums, backend.device)
        self.steps = self.samples = self.flops = 0

    def step(self, batches):
        backend, sums = self.backend, self.sums
        micro_batches = [next(batches) for _ in range(backend.layout.micro_batches_per_step)]
        step_loss, tokens, grad_norm = backend.train_step(micro_batches)
        finite = torch.isfinite(step_loss)
        if backend.args.logging_nan_inf_filter:  # as transformers.Trainer: NaN/inf losses left out of the mean
            sums.add("loss", torch.where(finite, step_loss, torch.zeros_like(step_loss)))
            sums.add("finite_steps", finite)
        else:
            sums.add("loss", step_loss)
            sums.add("finite_steps", 1)
        sums.add("tokens", tokens)
        if grad_norm is not None:
            sums.put("grad_norm", grad_norm)
        backend.count_nonfinite(finite, sums)
        self.steps += 1
        self.samples += sum(batch_size(b) for b in micro_batches)
        self.flops += sum(backend.batch_flops(b) for b in micro_batches)

    def finish(self, stop_requested):
        self.sums.put("stop_requested", float(stop_requested))
        self.sums.put("ends_nonfinite", self.backend.nonfinite_run > 0)
        return GroupResult(self.steps, self.samples, self.flops, self.backend.to_host(self.sums))


def _without_full_attention_mask(batch):
    """The batch without its attention mask when that is all ones (blocks of grouped text always are): a model
    given no mask attends to every position just the same. Under torch.compile transformers never skips a mask it
    is given, so SDPA would run its masked kernel; without one it runs flash attention (causal where the model is).
    In eager mode transformers reads a given mask on the device to decide whether to skip it, a host
    synchronisation that a model given none (BERT; GPT-2 while it keeps a cache) does not make."""
    mask = batch.get("attention_mask")
    # numpy: a test of host memory, which no device tensor could reach by mistake
    if torch.is_tensor(mask) and mask.device.type == "cpu" and mask.numpy().all():
        return {key: value for key, value in batch.items() if key != "attention_mask"}
    return batch



def _cloned(outputs):
    if isinstance(outputs, dict):
        for key, value in outputs.items():
            if torch.is_tensor(value):
                outputs[key] = value.clone()
        return outputs
    return tuple(v.clone() if torch.is_tensor(v) else v for v in outputs)


def _pinned(tensor, pin):
    if pin and tensor.device.type == "cpu" and not tensor.is_pinned():
        return tensor.pin_memory()
    return tensor


def _chunks(indices, size):
    return [indices[i:i + size] for i in range(0, len(indices), size)]
