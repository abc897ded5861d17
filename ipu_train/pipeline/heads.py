"""Serialized (chunked) LM heads and the sparse MLM head: the training loss without the (tokens × vocab) logits.

On IPUs, `embedding_serialization_factor` / `projection_serialization_factor` split the vocabulary projection into
parts to fit in tile memory. Here the factor is the number of token chunks the projection and its cross-entropy
are computed in: per chunk the logits, the softmax and the gradients of the hidden states, the weight and the bias
are computed at once, and only the gradients (sizes of hidden, weight and bias) are kept for backward. That does
the three matmuls of a plain head (logits, grad hidden, grad weight) with no recompute, and no logits tensor is
ever saved; per-chunk checkpointing would have to recompute each chunk's logits in backward (a fourth matmul).
The projection's vocabulary rows are padded to a multiple of 64 inside the head (GPT-2's 50257 becomes 50304): with
an odd vocabulary every logits row is misaligned and the three matmuls miss the fast tensor-core kernels. The padded
rows are zero and their logits are -inf, so they take no probability and get no gradient; the model's weights,
tied or not, keep their size.

For masked LM the prediction head (transform + decoder) runs only at the masked positions, as on IPU; a static cap
on masked tokens per sequence keeps the shapes static (for compiled graphs and no host read of the mask count).

`enable_serialized_heads(model, ipu_config)` patches one model instance so that its training forward with labels
uses these heads; evaluation and calls without labels run the model's own forward unchanged. The training forwards,
one per head class, live with their model families (families.py).
"""
import functools
import inspect
import types

import torch
import torch.nn.functional as F

from ..compat import autocast_dtype

IGNORE_INDEX = -100  # the label of positions the loss skips (the collators write it, the metrics skip it)
VOCAB_ALIGNMENT = 64


def loss_of(outputs):
    """The loss of a model's forward: a ModelOutput (or dict) holds it as "loss", a tuple first."""
    return outputs["loss"] if isinstance(outputs, dict) else outputs[0]


# ---------------------------------------------------------------------------------------------------- chunked loss
def next_token_labels(labels):
    """A causal LM's targets: position t predicts token t + 1; the last position predicts nothing."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def chunked_lm_loss(hidden, weight, labels, n_chunks, bias=None, ignore_index=IGNORE_INDEX, num_items_in_batch=None,
                    vocab_alignment=VOCAB_ALIGNMENT):
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `labels`, computed in `n_chunks` chunks of tokens.

    hidden (..., H), labels (...), weight (V, H), bias (V,). The loss is the mean over tokens whose label is not
    `ignore_index`, or their sum divided by `num_items_in_batch` when given (as transformers' loss functions do
    under gradient accumulation). Logits are at least float32 for the softmax; the matmuls run in the autocast
    dtype when autocast is on, as `nn.Linear` would. With no valid token the loss is NaN, as `F.cross_entropy` gives.
    The vocabulary is padded to a multiple of `vocab_alignment` for the matmuls (1: no padding)."""
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    labels_1d = labels.reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        denominator = (labels_1d != ignore_index).sum()
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device)
    n_chunks = max(1, min(int(n_chunks), hidden_2d.shape[0]))
    dtype = _matmul_dtype(hidden, weight)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not wants_grad:
        loss_sum, *_ = _chunk_loop(hidden_2d, weight, bias, labels_1d, n_chunks, ignore_index, dtype,
                                   vocab_alignment, needs=(False, False, False))
        return loss_sum / denominator
    return _ChunkedLinearCrossEntropy.apply(hidden_2d, weight, bias, labels_1d, n_chunks, ignore_index,
                                            denominator, dtype, vocab_alignment)


def _matmul_dtype(hidden, weight):
    return autocast_dtype(hidden.device.type) or torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_loop(hidden, weight, bias, labels, n_chunks, ignore_index, dtype, vocab_alignment, needs):
    """Sum of the token losses and, for the inputs flagged in `needs` (hidden, weight, bias), the gradients of
    that sum. Returns (loss_sum, grad_hidden, grad_weight, grad_bias), the gradients None where not needed."""
    need_hidden, need_weight, need_bias = needs
    softmax_dtype = torch.promote_types(dtype, torch.float32)
    vocab = weight.shape[0]
    pad = -vocab % vocab_alignment
    with torch.autocast(hidden.device.type, enabled=False):
        w = F.pad(weight.to(dtype), (0, 0, 0, pad))
        b = _padded_bias(bias, vocab, pad, softmax_dtype, hidden.device)
        loss_sum = torch.zeros((), dtype=softmax_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = w.new_zeros(w.shape, dtype=softmax_dtype) if need_weight else None
        grad_bias = w.new_zeros(vocab + pad, dtype=softmax_dtype) if need_bias else None
        n_tokens = hidden.shape[0]
        for i in range(n_chunks):
            start, end = n_tokens * i // n_chunks, n_tokens * (i + 1) // n_chunks
            h = hidden[start:end].to(dtype)
            logits = (h @ w.t()).to(softmax_dtype)
            if b is not None:
                logits += b
            y = labels[start:end]
            valid = y != ignore_index
            target = torch.where(valid, y, 0).unsqueeze(1)
            log_normalizer = torch.logsumexp(logits, dim=1)
            target_logit = logits.gather(1, target).squeeze(1)
            loss_sum += torch.where(valid, log_normalizer - target_logit, 0.0).sum()
            if not any(needs):
                continue
            # d(token loss)/d(logits) = softmax − one_hot(target), zero on ignored tokens. Reuses the logits buffer.
            grad_logits = logits.sub_(log_normalizer.unsqueeze(1)).exp_()
            grad_logits.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad_logits.dtype))
            grad_logits.mul_(valid.unsqueeze(1))
            if need_bias:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(dtype)
            if need_hidden:
                grad_hidden[start:end] = grad_logits @ w
            if need_weight:
                grad_weight += grad_logits.t() @ h
    return (loss_sum, grad_hidden, None if grad_weight is None else grad_weight[:vocab],
            None if grad_bias is None else grad_bias[:vocab])


def _padded_bias(bias, vocab, pad, dtype, device):
    """The bias in `dtype` (zeros when there is none but rows are padded) with `pad` entries of -inf."""
    if pad == 0:
        return None if bias is None else bias.to(dtype)
    real = torch.zeros(vocab, dtype=dtype, device=device) if bias is None else bias.to(dtype)
    return F.pad(real, (0, pad), value=float("-inf"))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Gradients are computed in forward, unscaled (softmax − one_hot has entries in [−1, 1], safe in fp16), and
    scaled by grad_output / denominator in backward, so loss scaling works as with any other loss."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, n_chunks, ignore_index, denominator, dtype, vocab_alignment):
        needs = tuple(ctx.needs_input_grad[:3])
        loss_sum, grad_hidden, grad_weight, grad_bias = _chunk_loop(
            hidden, weight, bias, labels, n_chunks, ignore_index, dtype, vocab_alignment, needs)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, denominator)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return loss_sum / denominator

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias, denominator = ctx.saved_tensors
        scale = grad_loss / denominator
        return (None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype),
                None if grad_bias is None else (grad_bias * scale).to(ctx.bias_dtype),
                None, None, None, None, None, None)


# ------------------------------------------------------------------------------------------------ sparse MLM loss
def sparse_mlm_loss(hidden, labels, transform, weight, bias=None, max_predictions=None, n_chunks=1,
                    ignore_index=IGNORE_INDEX, num_items_in_batch=None):
    """The masked-LM loss with the prediction head (`transform`, then the decoder `weight`/`bias`) applied only at
    masked positions (labels != ignore_index). hidden (B, S, H), labels (B, S).

    Without `max_predictions`, boolean indexing picks the masked tokens (exact; a dynamic shape, and on a GPU a
    host read of their count). With it, the first `max_predictions` masked positions of each sequence are gathered
    with a static-shape index; unused slots carry `ignore_index` and weigh nothing. Masked tokens beyond the cap
    are dropped (the data collator's cap should make that never happen)."""
    selected_hidden, selected_labels = select_masked_positions(hidden, labels, max_predictions, ignore_index)
    return chunked_lm_loss(transform(selected_hidden), weight, selected_labels, n_chunks, bias=bias,
                           ignore_index=ignore_index, num_items_in_batch=num_items_in_batch)


def select_masked_positions(hidden, labels, max_predictions=None, ignore_index=IGNORE_INDEX):
    masked = labels != ignore_index
    if max_predictions is None:
        return hidden[masked], labels[masked]
    slots = min(int(max_predictions), labels.shape[1])
    # A stable sort of "not masked" puts each sequence's masked positions first, in order.
    positions = torch.sort((~masked).to(torch.uint8), dim=1, stable=True).indices[:, :slots]
    gathered_hidden = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return gathered_hidden, labels.gather(1, positions)


# ------------------------------------------------------------------------------------------------ model patching
def serialization_factor(ipu_config):
    """The number of chunks for the vocabulary projection. The shipped configurations (gpt2: 4, bert-large: 2) set
    `embedding_serialization_factor`, which on IPU split the tied embedding/projection matrix; the newer
    `projection_serialization_factor` splits only the projection. PyTorch's embedding lookup needs no split, so
    both mean "project in this many chunks"; when both are above 1 the projection factor, the specific one, wins."""
    projection = int(getattr(ipu_config, "projection_serialization_factor", 1) or 1)
    embedding = int(getattr(ipu_config, "embedding_serialization_factor", 1) or 1)
    return projection if projection > 1 else max(embedding, 1)


def enable_serialized_heads(model, ipu_config, max_predictions=None):
    """Patch `model.forward` (this instance only) so that a training forward with labels computes the loss with the
    chunked LM head (GPT-2) or the sparse, optionally chunked, MLM head (BERT, RoBERTa, BERT pretraining with NSP),
    and returns no logits (`logits=None`, `prediction_logits=None`; BERT pretraining keeps its NSP logits). In eval
    mode or without labels the model's own forward runs. Modules, parameters, tied weights and state_dict keys are
    untouched. `max_predictions` is the cap on masked tokens per sequence (static shapes); None means no cap.
    A model already patched keeps its first patch. Returns False, patching nothing, for a class that no model family
    serves with a training forward (families.py)."""
    if getattr(model, "_serialized_heads", False):
        return True
    from .families import serialized_head_of  # the families' training forwards are built on this module's losses

    head = serialized_head_of(model)
    original_function = getattr(model.forward, "__func__", None)
    if head is None or original_function is None:
        return False
    training_forward, required_labels = head.training_forward, head.labels
    n_chunks = serialization_factor(ipu_config)
    # Name the positional arguments by hand rather than with Signature.bind: torch.compile traces this cheaply.
    parameters = inspect.signature(model.forward).parameters.values()
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def forward(self, *args, **kwargs):
        named = dict(zip(positional, args), **kwargs)
        if not self.training or not _has_training_labels(named, required_labels):
            # Called on `self`, not on the patched instance: a deep copy of the model runs on its own weights.
            return original_function(self, *args, **kwargs)
        extra = {k: named.pop(k) for k in list(named) if k not in positional}
        return_dict = extra.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        output = training_forward(self, named, extra, n_chunks=n_chunks, max_predictions=max_predictions)
        return output if return_dict else output.to_tuple()

    # The original's name and signature: Trainer's column selection and loss-kwargs detection inspect them.
    functools.update_wrapper(forward, original_function)
    model.forward = types.MethodType(forward, model)
    model._serialized_heads = True
    return True


def _has_training_labels(named, required_labels):
    # Without all its labels a model computes no loss (BertForPreTraining needs both): its own forward runs.
    if any(named.get(name) is None for name in required_labels):
        return False
    logits_to_keep = named.get("logits_to_keep", 0)
    return isinstance(logits_to_keep, int) and logits_to_keep == 0
