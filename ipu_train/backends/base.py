"""What the trainer needs from a backend, and the results that cross between them. The trainer imports only this
module; `TorchBackend` (CPU and CUDA) and `PopTorchBackend` (IPU) implement it.

A training group is `device_iterations` optimizer steps run with no host read of a device value: the trainer opens
one (`backend.new_group()`), calls `step` once per optimizer step (its callbacks run between steps), then `finish`,
which starts the group's one host read (`PendingHostRead`). The sums travel as one device tensor, so that summing
them over the replicas is one all-reduce and bringing them to the host is one copy; on each side they are named."""
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol

import torch

from ..packing import SEQUENCE_IN_ROW
from ..pipeline.heads import IGNORE_INDEX


@dataclass(frozen=True)
class GroupSums:
    """A training group's results, summed over the replicas."""
    loss: float  # the sum of the group's step losses (non-finite ones left out with --logging_nan_inf_filter)
    finite_steps: float  # the steps counted in `loss`
    tokens: float  # input tokens
    grad_norm: float  # the gradient norm of the group's last step (summed over replicas: divide by their number)
    stop_requested: float  # > 0: some process was asked to stop (a signal)
    diverged: float  # > 0: the loss was non-finite for max_consecutive_nonfinite_steps steps in a row
    ends_nonfinite: float  # > 0: the group's last step had a non-finite loss (its weights may be NaN)


@dataclass(frozen=True)
class EvalSums:
    """An evaluation's sums over its batches (and processes)."""
    loss: float  # the sum of batch loss x batch size
    counted: float  # the samples of batches that had a loss
    samples: float  # every sample evaluated


def batch_size(batch):
    """The rows of a collated batch: the first dimension of its first tensor."""
    return next(v for v in batch.values() if torch.is_tensor(v)).shape[0]


def ignore_padding_labels(batch, first_padding_row, label_names):
    """`batch` (a dict) with the labels of its rows from `first_padding_row` on set to IGNORE_INDEX, so that no loss
    counts the padding that completes a static-shaped evaluation batch (the padding is at the end)."""
    for name in label_names:
        if torch.is_tensor(batch.get(name)) and first_padding_row < batch_size(batch):
            batch[name] = batch[name].clone()
            batch[name][first_padding_row:] = IGNORE_INDEX
    return batch


def real_rows_loss(losses, real, micro_batch):
    """The mean loss of an evaluation step's first `real` rows from one mean loss per micro-batch (in batch order),
    each weighted by its real rows; the padding is at the end, and a micro-batch of padding alone (whose mean may be
    NaN) is left out. No host read: the weights are known on the host."""
    losses = losses.float().reshape(-1)
    weights = torch.tensor([min(max(real - k * micro_batch, 0), micro_batch) for k in range(losses.numel())],
                           dtype=torch.float, device=losses.device)
    return torch.where(weights > 0, losses * weights, 0.0).sum() / weights.sum()


def input_tokens(batch):
    """The tokens a batch feeds the model: the tokens of its sequences where it holds packed rows (as the collator
    made it: padding is sequence 0), else its attention mask's ones, else every input id (a device value where the
    batch is on the device)."""
    sequence_in_row = batch.get(SEQUENCE_IN_ROW)
    if sequence_in_row is not None:
        return (sequence_in_row > 0).sum()
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask.sum()
    ids = batch.get("input_ids")
    return ids.numel() if ids is not None else 0


class DeviceSums:
    """The fields of a host dataclass (`GroupSums`, `EvalSums`, ...) accumulated in one device tensor."""

    def __init__(self, kind, device):
        self.kind = kind
        self._index = {field.name: i for i, field in enumerate(dataclasses.fields(kind))}
        self.tensor = torch.zeros(len(self._index), device=device)

    def add(self, name, value):
        self.tensor[self._index[name]] += value

    def put(self, name, value):
        self.tensor[self._index[name]] = value

    def raise_flag(self, name, flag):
        """Keep `name` at 1 once `flag` (a device boolean) has been true."""
        index = self._index[name]
        self.tensor[index] = torch.maximum(self.tensor[index], flag.float())

    def named(self, values):
        """The host values of `tensor`, by name."""
        return self.kind(*values)


class PendingHostRead:
    """Device values on their way to the host. On CUDA they are copied into pinned memory without waiting, behind an
    event recorded where they are final in stream order, so that `result()` waits for the kernels before that point
    only, not for the ones launched after it (a group's sums read once the next group is launched). Elsewhere the
    tensor is read as it is."""

    def __init__(self, sums: DeviceSums):
        tensor, self._ready, self._named = sums.tensor, None, sums.named
        if tensor.device.type == "cuda":
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
            tensor = host
        self._tensor = tensor

    def result(self):
        """The host values, named (this is the host read)."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._named(self._tensor.tolist())


@dataclass
class GroupResult:
    """One group of optimizer steps: counts known on the host, sums on their way to it."""
    steps: int
    samples: int  # this process's samples
    flops: int  # model FLOPs of this process (forward and backward)
    sums: PendingHostRead  # of GroupSums, summed over the replicas


class TrainingGroup(Protocol):
    def step(self, batches: Iterator[dict]) -> None:
        """One optimizer step on the next micro-batches of `batches`, with no host read of a device value."""

    def finish(self, stop_requested: bool) -> GroupResult:
        """The group's results; `stop_requested` (a host flag) travels with its sums, so that every process learns
        of a stop asked of any of them at the same group boundary."""


class Backend(Protocol):
    device: torch.device
    last_learning_rate: Optional[float]  # the rate of the last optimizer step run (a host float)
    reports_grad_norm: bool  # whether GroupSums.grad_norm holds the gradient norm

    def prepare_model(self, model, max_predictions=None) -> torch.nn.Module:
        """The module to train (recompute, serialized heads, compiled, wrapped for data parallelism as asked)."""

    def compile(self, model) -> None:
        """Compile the model ahead of training (--compile_only)."""

    def compile_step(self, batches) -> None:
        """Compile one training step on the first batches of `batches` (as many as a step takes), without changing
        the weights."""

    def create_optimizer(self, param_groups):
        """The optimizer --optim / --lamb ask for, over `param_groups`."""

    def attach(self, optimizer, lr_scheduler) -> None:
        """The optimizer and schedule the training steps use."""

    def train_loader(self, dataset, collator, order, start_step, seed):
        """This process's micro-batches of an epoch whose global sample order is `order`, from `start_step` on."""

    def eval_loader(self, dataset, collator, indices, label_names=()):
        """Evaluation batches of the samples at `indices`, each once (`label_names`: the batch keys that hold
        labels, for a backend that pads batches to a static shape)."""

    def to_device(self, batch) -> dict:
        """A collated batch, on its way to the device."""

    def new_group(self) -> TrainingGroup:
        """A training group (see the module's docstring)."""

    def peak_flops_per_second(self) -> Optional[float]:
        """The device's peak FLOP/s at this precision, for MFU; None where it is not known."""

    def eval_outputs(self, model, batch):
        """The model's outputs on an evaluation batch already on the device, and the batch they are for: both
        without any rows a static shape added."""

    def to_host(self, sums: DeviceSums) -> PendingHostRead:
        """Start the host read of `sums`, summed over the processes."""

    def read(self, pending: PendingHostRead):
        """The one host read: the named values of a `to_host` result."""

    def save_state(self, folder) -> None:
        """The backend's own state (the loss scaler) into a checkpoint folder."""

    def load_state(self, folder) -> None:
        """The backend's own state from a checkpoint folder, where it has one."""
