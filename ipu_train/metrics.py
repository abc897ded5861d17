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
