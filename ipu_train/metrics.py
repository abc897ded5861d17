"""Evaluation metrics computed locally, batch by batch: each batch's logits are reduced to argmax predictions on the
device and folded into running counts, so neither logits nor predictions accumulate over the evaluation set and
nothing is downloaded (unlike `evaluate.load("accuracy")`)."""
import torch


def argmax_predictions(logits, labels):
    """`preprocess_logits_for_metrics`: keep the argmax of the (first) logits tensor, drop the rest."""
    if isinstance(logits, (tuple, list)):
        return tuple(argmax_predictions(part, labels) for part in logits)
    return logits.argmax(dim=-1)


class RunningAccuracy:
    """`compute_metrics` for `batch_eval_metrics=True`: called once per batch, returns the totals on the last one.

    `shift=True` compares the prediction at position t with the label at t + 1 (causal LM); labels of -100 are
    ignored (padding, unmasked positions)."""

    def __init__(self, name="accuracy", shift=False):
        self.name, self.shift = name, shift
        self.correct = self.total = 0

    def __call__(self, eval_pred, compute_result=True):
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        preds, labels = torch.as_tensor(preds), torch.as_tensor(labels)
        if self.shift:
            preds, labels = preds[..., :-1], labels[..., 1:]
        counted = labels != -100
        self.correct += int((preds.eq(labels) & counted).sum())
        self.total += int(counted.sum())
        if not compute_result:
            return {}
        result = {self.name: self.correct / max(self.total, 1)}
        self.correct = self.total = 0
        return result


def pretraining_batch_statistics(logits, labels):
    """`preprocess_logits_for_metrics` for MLM + NSP: reduce one batch to six sums on the device — masked-LM loss
    sum, masked-token count, correct masked predictions, NSP loss sum, pair count, correct NSP predictions — so the
    separate losses and accuracies can be reported without keeping logits."""
    prediction_logits, relationship_logits = logits[0], logits[1]
    mlm_labels, nsp_labels = labels
    masked = mlm_labels != -100
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
        self.totals += torch.as_tensor(eval_pred.predictions, dtype=torch.float64).reshape(-1, 6).sum(0)
        if not compute_result:
            return {}
        mlm_loss, masked, mlm_correct, nsp_loss, pairs, nsp_correct = self.totals.tolist()
        self.totals.zero_()
        return {"mlm_loss": mlm_loss / max(masked, 1), "mlm_accuracy": mlm_correct / max(masked, 1),
                "nsp_loss": nsp_loss / max(pairs, 1), "nsp_accuracy": nsp_correct / max(pairs, 1)}
