"""Evaluation metrics computed locally, batch by batch: each batch's logits are reduced to argmax predictions on the
device and folded into running counts, so neither logits nor predictions accumulate over the evaluation set and
nothing is downloaded (unlike `evaluate.load("accuracy")`)."""
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


def pretraining_batch_statistics(logits, labels):
    """`preprocess_logits_for_metrics` for MLM + NSP: reduce one batch to six sums on the device — masked-LM loss
    sum, masked-token count, correct masked predictions, NSP loss sum, pair count, correct NSP predictions — so the
    separate losses and accuracies can be reported without keeping logits."""
    prediction_logits, relationship_logits = logits[0], logits[1]
    mlm_labels, nsp_labels = labels
    masked = mlm_labels != IGNORE_INDEX
    token_logits = prediction_logits[masked].float()
    token_labels = mlm_labels[masked]
    nsp_logits = relationship_logits.float().view(-1, 2)
    nsp_labels = nsp_labels.view(-1)
    stats = torch.stack([
        torch.nn.functional.cross_entropy(token_logits, token_labels, reduction="sum"),
        masked.sum().float(),
        token_logits.argmax(-1).eq(token_labels).sum().float(),
        torch.nn.functional.cross_entropy(nsp_logits, nsp_labels, reduction="sum"),
        torch.tensor(float(nsp_labels.numel()), device=nsp_logits.device),
        nsp_logits.argmax(-1).eq(nsp_labels).sum().float(),
    ])
    return stats.view(1, -1)


class RunningPretrainingMetrics:
    """`compute_metrics` folding `pretraining_batch_statistics` over the evaluation set (per batch or all at once)."""

    def __init__(self):
        self.totals = torch.zeros(6, dtype=torch.float64)

    def __call__(self, eval_pred, compute_result=True):
        batch = torch.as_tensor(eval_pred.predictions).reshape(-1, 6).sum(0).double()
        self.totals = self.totals.to(batch.device) + batch
        if not compute_result:
            return {}
        mlm_loss, masked, mlm_correct, nsp_loss, pairs, nsp_correct = _summed_over_processes(self.totals).tolist()
        self.totals = torch.zeros(6, dtype=torch.float64)
        return {"mlm_loss": mlm_loss / max(masked, 1), "mlm_accuracy": mlm_correct / max(masked, 1),
                "nsp_loss": nsp_loss / max(pairs, 1), "nsp_accuracy": nsp_correct / max(pairs, 1)}
