"""Metrics folded batch by batch equal the same metrics computed over the whole set at once."""
import torch
from transformers import BertConfig, BertForPreTraining, EvalPrediction

from ipu_train.metrics import (RunningAccuracy, RunningPretrainingMetrics, argmax_predictions,
                               pretraining_batch_statistics)


def test_running_accuracy_per_batch_equals_whole_set_and_shifts_for_causal_lm():
    torch.manual_seed(0)
    logits = torch.randn(6, 10, 5)
    labels = torch.randint(0, 5, (6, 10))
    labels[:, :3] = -100
    preds = argmax_predictions(logits, labels)
    for shift in (False, True):
        p, y = (preds[:, :-1], labels[:, 1:]) if shift else (preds, labels)
        expected = ((p == y) & (y != -100)).sum().item() / (y != -100).sum().item()
        metric = RunningAccuracy(shift=shift)
        for rows, last in ((slice(0, 2), False), (slice(2, 5), False), (slice(5, 6), True)):
            result = metric(EvalPrediction(predictions=preds[rows], label_ids=labels[rows]), compute_result=last)
        assert result["accuracy"] == expected
        assert metric(EvalPrediction(predictions=preds, label_ids=labels))["accuracy"] == expected  # reset after


def test_pretraining_statistics_reproduce_the_models_losses_and_accuracies():
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=50)
    model = BertForPreTraining(config).eval()
    ids = torch.randint(5, 50, (4, 16))
    labels = torch.full_like(ids, -100)
    labels[:, 3:6] = ids[:, 3:6]
    nsp = torch.tensor([0, 1, 0, 1])
    out = model(input_ids=ids, labels=labels, next_sentence_label=nsp)
    labels[0, 3] = out.prediction_logits[0, 3].argmax()  # one prediction right for sure
    out = model(input_ids=ids, labels=labels, next_sentence_label=nsp)
    metric = RunningPretrainingMetrics()
    for rows, last in ((slice(0, 1), False), (slice(1, 4), True)):
        stats = pretraining_batch_statistics((out.prediction_logits[rows], out.seq_relationship_logits[rows]),
                                             (labels[rows], nsp[rows]))
        result = metric(EvalPrediction(predictions=stats, label_ids=None), compute_result=last)
    masked = labels != -100
    mlm_correct = (out.prediction_logits.argmax(-1)[masked] == labels[masked]).float().mean().item()
    nsp_correct = (out.seq_relationship_logits.argmax(-1) == nsp).float().mean().item()
    assert mlm_correct > 0
    assert abs(result["mlm_loss"] + result["nsp_loss"] - out.loss.item()) < 1e-5  # the model's loss is the sum
    assert abs(result["mlm_accuracy"] - mlm_correct) < 1e-6
    assert abs(result["nsp_accuracy"] - nsp_correct) < 1e-6
