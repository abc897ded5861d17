"""`recompute_checkpoint_every_layer` on PyTorch: activation checkpointing on each layer's output, as the IPU
placed a recomputation checkpoint there. Models with Hugging Face's own support use it; the others (XLNet, ...)
get each of their repeated blocks wrapped in `torch.utils.checkpoint`."""
import torch
from torch.utils.checkpoint import checkpoint

from ..compat import enable_activation_checkpointing
from .stages import transformer_layers


def enable_recompute(model) -> str:
    """Turn checkpointing on for every layer; returns how, for the log."""
    if getattr(model, "supports_gradient_checkpointing", False):
        enable_activation_checkpointing(model, use_reentrant=False)
        model.config.use_cache = False
        return "Hugging Face activation checkpointing"
    for layer in dict.fromkeys(transformer_layers(model)):  # ALBERT repeats one module: wrap it once
        layer.forward = _checkpointed(layer.forward)
    return "torch.utils.checkpoint around each layer"


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
