"""Evaluation metrics computed locally, batch by batch: each batch's logits are reduced to argmax predictions on the
device and folded into running counts, so neither logits nor predictions accumulate over the evaluation set and
nothing is downloaded (unlike `evaluate.load("accuracy")`)."""
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .pipeline.heads import IGNORE_INDEX


def argmax_predictions(logits, labels):
    """`preprocess_logits_for_metrics`: keep the argmax of the (first) logits tensor, drop the rest."""
    if isinstance(logits, (tuple, list)):
        return tuple(argmax_predictions(part, labels) for part in logits)
    return logits.argmax(dim=-1)


def _summed_over_processes(tensor):
    """With `batch_eval_metrics` each process sees only its shard: add the counts of all processes."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


class RunningAccuracy:
    """`compute_metrics` for `batch_eval_metrics=True`: called once per batch, returns the totals on the last one.

    `shift=True` compares the prediction at position t with the label at t + 1 (causal LM); labels of -100 are
    ignored (padding, unmasked positions)."""

    def __init__(self, name="accuracy", shift=False):
        self.name, self.shift = name, shift
        self.counts = 0  # tensor([correct, counted]) on the batches' device once a batch has been seen

    def __call__(self, eval_pred, compute_result=True):
        preds, labels = torch.as_tensor(eval_pred.predictions), torch.as_tensor(eval_pred.label_ids)
        if self.shift:
            preds, labels = preds[..., :-1], labels[..., 1:]
        counted = labels != IGNORE_INDEX
        self.counts = self.counts + torch.stack([(preds.eq(labels) & counted).sum(), counted.sum()]).double()
        if not compute_result:
            return {}
        correct, total = _summed_over_processes(self.counts).tolist()
        self.counts = 0
        return {self.name: correct / max(total, 1)}


@dataclass(frozen=True)
class PretrainingSums:
    """One evaluation batch (or all of them) of MLM + NSP, as sums: they add over batches and processes. They travel
    through the evaluation loop as one tensor row, the fields in this order."""
    mlm_loss: float  # cross-entropy summed over the masked tokens
    masked: float  # masked tokens
    mlm_correct: float  # masked tokens predicted right
    nsp_loss: float  # cross-entropy summed over the sentence pairs
    pairs: float
    nsp_correct: float

    @classmethod
    def row(cls, **values):
        """The fields' device values as one (1, fields) tensor row."""
        return torch.stack([values[field.name] for field in dataclasses.fields(cls)]).view(1, -1)

    def metrics(self):
        return {"mlm_loss": self.mlm_loss / max(self.masked, 1), "mlm_accuracy": self.mlm_correct / max(self.masked, 1),
                "nsp_loss": self.nsp_loss / max(self.pairs, 1), "nsp_accuracy": self.nsp_correct / max(self.pairs, 1)}


def pretraining_batch_statistics(logits, labels):
    """`preprocess_logits_for_metrics` for MLM + NSP: reduce one batch to its `PretrainingSums` on the device, so the
    separate losses and accuracies can be reported without keeping logits."""
    prediction_logits, relationship_logits = logits[0], logits[1]
    mlm_labels, nsp_labels = labels
    masked = mlm_labels != IGNORE_INDEX
    token_logits = prediction_logits[masked].float()
    token_labels = mlm_labels[masked]
    # Packed rows give one prediction per sequence, [rows, max_per_pack, 2], with -100 in the empty places.
    nsp_logits = relationship_logits.float().view(-1, 2)
    nsp_labels = nsp_labels.view(-1)
    pairs = nsp_labels != IGNORE_INDEX
    return PretrainingSums.row(
        mlm_loss=torch.nn.functional.cross_entropy(token_logits, token_labels, reduction="sum"),
        masked=masked.sum().float(),
        mlm_correct=token_logits.argmax(-1).eq(token_labels).sum().float(),
        nsp_loss=torch.nn.functional.cross_entropy(nsp_logits, nsp_labels, reduction="sum"),
        pairs=pairs.sum().float(),
        nsp_correct=nsp_logits.argmax(-1).eq(nsp_labels).sum().float())


class RunningPretrainingMetrics:
    """`compute_metrics` folding `pretraining_batch_statistics` over the evaluation set (per batch or all at once)."""

    width = len(dataclasses.fields(PretrainingSums))

    def __init__(self):
        self.totals = torch.zeros(self.width, dtype=torch.float64)

    def __call__(self, eval_pred, compute_result=True):
        batch = torch.as_tensor(eval_pred.predictions).reshape(-1, self.width).sum(0).double()
        self.totals = self.totals.to(batch.device) + batch
        if not compute_result:
            return {}
        sums = PretrainingSums(*_summed_over_processes(self.totals).tolist())
        self.totals = torch.zeros(self.width, dtype=torch.float64)
        return sums.metrics()
