"""Attention over packed rows without a mask: torch's variable-length FlashAttention kernel, on CUDA.

A packed row's sequences must not see each other. packing.packed_model_inputs gives the model a [rows, 1, L, L]
block-diagonal mask wherever this kernel cannot run (the CPU, fp32, attention dropout in training, a torch without
it), and SDPA then computes every row's full L x L scores, most of them masked. Where it can run,
`torch.nn.attention.varlen.varlen_attn` (torch >= 2.10; FlashAttention's variable-length kernel) takes all the rows'
tokens as one run of sequences described by their cumulative lengths, and computes each sequence's scores alone: no
mask is built or read, no score between two sequences is computed.

The models reach it through transformers' attention interface: `route_packed_attention` registers
`packed_attention` under ATTENTION and sets it on a model that uses SDPA. Called with the kernel's keyword arguments
(`kernel_inputs`), which transformers passes down to every attention layer, it runs the kernel; called without
them it is transformers' SDPA, unchanged, for every other batch. The name is not saved with the model
(transformers leaves the attention implementation out of config.json).
"""
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers

logger = logging.getLogger("ipu_train")

ATTENTION = "ipu_train_packed"
KERNEL_DEVICE_TYPES = ("cuda",)  # FlashAttention checks that every input is on CUDA (mha_varlen_fwd)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # "FlashAttention only support fp16 and bf16 data type"


try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # torch before 2.10
    _varlen_attn = None


def variable_length_kernel():
    """torch's varlen_attn, or None where this torch has none."""
    return _varlen_attn


@dataclass
class PackedAttention:
    """What a model routed through ATTENTION keeps: the rows' layout, why the kernel can never serve it (None: it
    can, given CUDA, half precision and, in training, no attention dropout) and which choices were logged."""

    max_per_pack: int
    never: str = None
    attention_dropout: float = None  # None: the config does not say (then no kernel in training)
    logged: set = field(default_factory=set)


def route_packed_attention(model, max_per_pack):
    """Send `model`'s attention through `packed_attention` where transformers lets us (its layers use the attention
    interface, with SDPA), so that packed rows can take the kernel; any other model keeps its attention and packed
    rows get the mask. Once per model."""
    if getattr(model, "_packed_attention", None) is not None:
        return
    state = PackedAttention(max_per_pack, never=_never_reason(model))
    config = model.config
    state.attention_dropout = next((getattr(config, key) for key in ("attention_probs_dropout_prob",
                                                                     "attention_dropout") if hasattr(config, key)),
                                   None)
    if state.never is None:
        _register()
        model.set_attn_implementation(ATTENTION)
        if model.config._attn_implementation != ATTENTION:  # transformers warned: its layers do not use the interface
            state.never = f"{type(model).__name__}'s attention does not go through transformers' attention interface"
    model._packed_attention = state


def _never_reason(model):
    config = getattr(model, "config", None)
    if variable_length_kernel() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch 2.10 or later has)"
    if not hasattr(model, "set_attn_implementation"):
        return f"transformers {transformers.__version__} cannot switch a model's attention (transformers 5 can)"
    implementation = getattr(config, "_attn_implementation", None)
    if implementation != "sdpa":
        return f"the model's attention is {implementation!r}, not 'sdpa'"
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if not heads or not hidden or hidden % heads:
        return "the config does not give the attention heads' size"
    head_size = hidden // heads
    if head_size % 8 or head_size > 256:  # FlashAttention's checks on the head size (mha_varlen_fwd)
        return f"its heads have {head_size} dimensions: FlashAttention takes multiples of 8 up to 256"
    return None


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, packed_attention)
    AttentionMaskInterface.register(ATTENTION, packed_attention_mask)


def packed_attention_mask(*, attention_mask=None, mask_function=None, **kwargs):
    """transformers' mask for a model routed through ATTENTION: SDPA's (a batch's padding mask), except that a
    bidirectional model given no mask gets none, as SDPA's gives in eager mode. Under torch.compile in torch 2.11,
    torch.compiler.is_exporting() is true, and SDPA's would then build a mask of ones, which the kernel's call
    cannot take (and with which SDPA leaves flash attention)."""
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask

    if attention_mask is None and mask_function is bidirectional_mask_function:
        return None
    return sdpa_mask(attention_mask=attention_mask, mask_function=mask_function, **kwargs)


def kernel_refusal(model, sequence_in_row):
    """None where the kernel runs `model` on these packed rows now; otherwise why it does not, for the log."""
    state = getattr(model, "_packed_attention", None)
    if state is None:
        return "the model was not routed through ipu_train.packed_attention"
    if state.never:
        return state.never
    if sequence_in_row.device.type not in KERNEL_DEVICE_TYPES:
        return f"it runs on CUDA, and the batch is on {sequence_in_row.device.type}"
    dtype = _activation_dtype(model, sequence_in_row.device.type)
    if dtype not in KERNEL_DTYPES:
        return f"it computes in bf16 or fp16 (--bf16, --fp16), and the model runs in {dtype}"
    if model.training and state.attention_dropout != 0:
        return (f"it applies no attention dropout, and the model trains with {state.attention_dropout} (set it to 0 "
                "with --config_overrides to take the kernel)")
    return None


def _activation_dtype(model, device_type):
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def log_choice(model, refusal):
    """One log line per model, mode and choice: which attention packed rows take, and why not the kernel."""
    state = getattr(model, "_packed_attention", None)
    mode = "training" if model.training else "evaluation"
    if state is None or (mode, refusal) in state.logged:
        return
    state.logged.add((mode, refusal))
    if refusal is None:
        logger.info(f"Packed rows ({mode}): attention through FlashAttention's variable-length kernel, no mask")
    else:
        logger.info(f"Packed rows ({mode}): attention through SDPA with a block-diagonal mask, not the variable-length "
                    f"kernel: {refusal}")


def kernel_inputs(sequence_in_row, max_per_pack):
    """The kernel's keyword arguments for packed rows ([rows, L] int32, each token's sequence in its row, 1, 2, ...,
    then 0 for padding, in that order along the row, as DataCollatorForPackedSequences lays them out): the
    cumulative lengths of every row's `max_per_pack` sequences and its padding, in the order of the flattened
    tokens. A row holding fewer sequences, or no padding, has sequences of no tokens there (FlashAttention skips
    them), so the shapes never change and nothing is read on the host. The padding tokens attend to each other,
    apart from every sequence; no loss reads them."""
    rows, length = sequence_in_row.shape
    segment = torch.where(sequence_in_row > 0, sequence_in_row.long() - 1, max_per_pack)
    lengths = torch.zeros(rows, max_per_pack + 1, dtype=torch.int32, device=sequence_in_row.device)
    lengths.scatter_add_(1, segment, torch.ones_like(segment, dtype=torch.int32))
    bounds = F.pad(lengths.view(-1).cumsum(0, dtype=torch.int32), (1, 0))
    # The longest sequence is at most a row: the kernel sizes its grid from this bound, read from no tensor.
    return dict(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=length, max_length_k=length)


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None,
                     cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """transformers' attention interface: [rows, heads, L, head size] in, [rows, L, heads, head size] out."""
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:  # kernel_refusal keeps training with attention dropout off the kernel
        raise RuntimeError(f"the variable-length kernel applies no attention dropout, and {type(module).__name__} "
                           f"asks for {dropout}")
    if attention_mask is not None:
        raise RuntimeError("packed rows take the variable-length kernel or an attention mask, not both")
    rows, heads, length, size = query.shape

    def tokens(states):  # [rows, heads, L, size] -> [rows x L, heads, size], contiguous
        return states.transpose(1, 2).reshape(rows * length, states.shape[1], size)

    output = variable_length_kernel()(tokens(query), tokens(key), tokens(value), cu_seq_lens_q, cu_seq_lens_k,
                                      max_length_q, max_length_k, scale=scaling)
    return output.view(rows, length, heads, size), None
