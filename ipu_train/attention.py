"""transformers' SDPA, two ways faster: SDPA's masks as in eager mode for the models TorchBackend compiles, and
packed rows on torch's variable-length FlashAttention kernel.

1. A model given no attention mask gets none, compiled or not. transformers' SDPA mask leaves out a mask that masks
   nothing only where torch.compiler.is_exporting() is false, and in torch 2.11 (the GPU image's) that is true
   inside every compiled function: the compiled BERT and GPT-2 then build a mask of ones, which takes SDPA off flash
   attention. `eager_sdpa_masks` (TorchBackend.compile) registers `mask_where_needed` as transformers' SDPA mask:
   none where the eager one gives none, the eager one's mask everywhere else. The models keep their attention
   implementation, "sdpa" (some of transformers' models branch on that name).
2. Packed rows (--pack_sequences) without a mask. A packed row's sequences must not see each other.
   packing.packed_model_inputs gives the model a [rows, 1, L, L] block-diagonal mask wherever the kernel cannot run
   (the CPU, fp32, attention dropout in training, another model type or torch), and SDPA then computes every row's
   full L x L scores, most of them masked. Where it can run, `torch.nn.attention.varlen.varlen_attn` (torch >= 2.11)
   takes all the rows' tokens as one run of sequences described by their cumulative lengths (`kernel_inputs`, which
   transformers passes down to every attention layer) and computes each sequence's scores alone: no mask is built
   or read, no score between two sequences is computed. The models of KERNEL_MODEL_TYPES reach it through
   transformers' attention interface, as the implementation ATTENTION (`route_packed_attention`): SDPA, unless
   given the sequences' bounds. The name is not saved with the model (transformers leaves the attention
   implementation out of config.json).
"""
import inspect
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers

logger = logging.getLogger("ipu_train")

ATTENTION = "ipu_train_sdpa"
KERNEL_DEVICE_TYPES = ("cuda",)  # FlashAttention checks that every input is on CUDA (mha_varlen_fwd)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # "FlashAttention only support fp16 and bf16 data type"
# The masked-LM families whose packed rows may take the kernel: their attention layers call the interface with the
# plain bidirectional mask and nothing else, keep query, key and value in one dtype under autocast and have heads of
# hidden_size / num_attention_heads; each is checked against the mask (tests/test_attention.py). Others keep the
# mask: rotary embeddings leave query and key in float32 under autocast (EuroBERT, NomicBERT, ...), ModernBERT's
# sliding-window layers take a mask, MobileBERT's heads are not hidden_size / heads, LayoutLM builds its own mask.
KERNEL_MODEL_TYPES = ("albert", "bert", "camembert", "distilbert", "electra", "ernie", "roberta",
                      "roberta-prelayernorm", "xlm-roberta")

try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # torch before 2.10 (2.10's takes no scale: see _kernel_never)
    _varlen_attn = None


def variable_length_kernel():
    """torch's varlen_attn, or None where this torch has none."""
    return _varlen_attn


def eager_sdpa_masks():
    """Make `mask_where_needed` transformers' SDPA mask, for every model of this process (transformers 5; earlier
    ones have no mask interface and never build a mask of ones)."""
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return
    AttentionMaskInterface.register("sdpa", mask_where_needed)


def mask_where_needed(*, attention_mask=None, mask_function=None, local_size=None, q_length=None, kv_length=None,
                      q_offset=0, kv_offset=0, allow_is_causal_skip=True, allow_is_bidirectional_skip=False,
                      **kwargs):
    """transformers' mask interface: SDPA's mask (sdpa_mask), except that a batch with no padding mask, attending
    to all of itself (bidirectional) or causally over itself alone (no cache), gets none, as sdpa_mask gives it in
    eager mode, whatever torch.compiler.is_exporting() says."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    if attention_mask is None and local_size is None:
        if mask_function is bidirectional_mask_function and allow_is_bidirectional_skip:
            return None
        itself = q_length == kv_length and isinstance(q_offset, int) and q_offset == 0 == kv_offset
        if mask_function is causal_mask_function and allow_is_causal_skip and itself:
            return None  # SDPA's is_causal then
    return sdpa_mask(attention_mask=attention_mask, mask_function=mask_function, local_size=local_size,
                     q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     allow_is_causal_skip=allow_is_causal_skip,
                     allow_is_bidirectional_skip=allow_is_bidirectional_skip, **kwargs)


# --- packed rows -------------------------------------------------------------------------------------------------


@dataclass
class PackedAttention:
    """What a packed run's model keeps: the rows' layout, why the kernel can never serve it (None: it can, given
    CUDA, half precision and, in training, no attention dropout) and which choices were logged."""

    max_per_pack: int
    never: str = None
    attention_dropout: float = None  # None: the config does not say (then no kernel in training)
    logged: set = field(default_factory=set)


def route_packed_attention(model, max_per_pack):
    """Set ATTENTION on `model` where its packed rows can take the kernel (a model of KERNEL_MODEL_TYPES whose
    layers use the attention interface, with SDPA); any other model keeps its attention and packed rows get the
    mask. Once per model."""
    if getattr(model, "_packed_attention", None) is not None:
        model._packed_attention.max_per_pack = max_per_pack  # the rows' layout: the collator's, for this run
        return
    config = model.config
    dropout = next((getattr(config, key) for key in ("attention_probs_dropout_prob", "attention_dropout")
                    if hasattr(config, key)), None)
    never = _kernel_never(config) or _route(model)
    model._packed_attention = PackedAttention(max_per_pack, never=never, attention_dropout=dropout)


def _route(model):
    """Set ATTENTION on `model`; None where it is set, otherwise why not."""
    if not hasattr(model, "set_attn_implementation"):
        return f"transformers {transformers.__version__} cannot switch a model's attention (transformers 5 can)"
    implementation = model.config._attn_implementation
    if implementation != "sdpa":
        return f"the model's attention is {implementation!r}, not 'sdpa'"
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, sdpa_or_kernel)
    AttentionMaskInterface.register(ATTENTION, mask_where_needed)
    model.set_attn_implementation(ATTENTION)
    if model.config._attn_implementation != ATTENTION:  # transformers warned: its layers do not use the interface
        return f"{type(model).__name__}'s attention does not go through transformers' attention interface"
    return None


def sdpa_or_kernel(module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None,
                   cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """transformers' attention interface: [rows, heads, L, head size] in, [rows, L, heads, head size] out. Given
    packed rows' sequence bounds (kernel_inputs), the variable-length kernel; otherwise transformers' SDPA."""
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:  # kernel_refusal keeps training with attention dropout off the kernel
        raise RuntimeError(f"the variable-length kernel applies no attention dropout, and {type(module).__name__} "
                           f"asks for {dropout}")
    unserved = sorted(key for key in ("is_causal", "sliding_window", "softcap") if kwargs.get(key))
    if unserved:  # KERNEL_MODEL_TYPES ask for none of these
        raise RuntimeError(f"packed rows on the variable-length kernel: {type(module).__name__} asks for {unserved}, "
                           "which this call does not pass on")
    if attention_mask is not None:
        raise RuntimeError("packed rows take the variable-length kernel or an attention mask, not both")
    rows, heads, length, size = query.shape

    def tokens(states):  # [rows, heads, L, size] -> [rows x L, heads, size], contiguous
        return states.transpose(1, 2).reshape(rows * length, states.shape[1], size)

    output = variable_length_kernel()(tokens(query), tokens(key), tokens(value), cu_seq_lens_q, cu_seq_lens_k,
                                      max_length_q, max_length_k, scale=scaling)
    return output.view(rows, length, heads, size), None


def _kernel_never(config):
    kernel = variable_length_kernel()
    if kernel is None or "scale" not in inspect.signature(kernel).parameters:  # torch 2.10's takes no scale
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn with a scale (torch 2.11 has)"
    if getattr(config, "model_type", None) not in KERNEL_MODEL_TYPES:
        return (f"it serves {', '.join(KERNEL_MODEL_TYPES)} (checked against the mask), and the model is "
                f"{getattr(config, 'model_type', None)!r}")
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if not heads or not hidden or hidden % heads:
        return "the config does not give the attention heads' size"
    head_size = hidden // heads
    if head_size % 8 or head_size > 256:  # FlashAttention's checks on the head size (mha_varlen_fwd)
        return f"its heads have {head_size} dimensions: FlashAttention takes multiples of 8 up to 256"
    return None


def kernel_refusal(model, sequence_in_row):
    """None where the kernel runs `model` on these packed rows now; otherwise why it does not, for the log."""
    state = getattr(model, "_packed_attention", None)
    if state is None:
        return "the model was not routed through ipu_train.attention"
    if state.never:
        return state.never
    if sequence_in_row.device.type not in KERNEL_DEVICE_TYPES:
        return f"it runs on CUDA, and the batch is on {sequence_in_row.device.type}"
    gpu_refusal = _gpu_refusal(sequence_in_row.device) if sequence_in_row.device.type == "cuda" else None
    if gpu_refusal:
        return gpu_refusal
    dtype = _activation_dtype(model, sequence_in_row.device.type)
    if dtype not in KERNEL_DTYPES:
        return f"it computes in bf16 or fp16 (--bf16, --fp16), and the model runs in {dtype}"
    if model.training and state.attention_dropout != 0:
        return (f"it applies no attention dropout, and the model trains with {state.attention_dropout} (set it to 0 "
                "with --config_overrides to take the kernel)")
    return None


def _gpu_refusal(device):
    """Why this GPU cannot run FlashAttention, or None."""
    if not torch.backends.cuda.is_flash_attention_available():
        return f"torch {torch.__version__} was built without FlashAttention"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 0):  # "FlashAttention only supports Ampere GPUs or newer." (mha_varlen_fwd)
        return (f"FlashAttention needs a GPU of compute capability 8.0 or newer (Ampere), and "
                f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")
    return None


def _activation_dtype(model, device_type):
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weights_dtype(model)


def weights_dtype(model):
    """The dtype of the model's activations where no autocast changes it: its floating-point weights'."""
    dtype = getattr(model, "dtype", None)  # transformers' models say it
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def kernel_inputs_for(model, sequence_in_row):
    """The kernel's keyword arguments for `model` on these packed rows (kernel_inputs), or None where the kernel does
    not run them now; the choice logged (log_choice)."""
    refusal = kernel_refusal(model, sequence_in_row)
    log_choice(model, refusal)
    return None if refusal else kernel_inputs(sequence_in_row, model._packed_attention.max_per_pack)


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
