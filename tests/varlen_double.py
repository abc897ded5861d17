"""A strict double of `torch.nn.attention.varlen.varlen_attn` (torch 2.11 and 2.13), for testing
ipu_train/attention.py where no CUDA device is: `strict_varlen_attn` takes what the real function takes and
refuses what it refuses, with its messages, and computes each sequence's attention alone, in float32, returned in
the inputs' dtype.

Its rules and where they come from (pytorch: aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp,
`mha_varlen_fwd`, which `_flash_attention_forward` calls for varlen_attn; torch/nn/attention/varlen.py):
- the signature: varlen.py's `varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
  scale=None, window_size=(-1, -1))` in torch 2.11; 2.13 adds keyword arguments we do not use (enable_gqa, ...), so
  those are refused here, to keep the call valid on both;
- max_q and max_k are ints: the custom op's schema (`int max_q, int max_k`) refuses a tensor;
- "FlashAttention only support fp16 and bf16 data type"; "query and key/value must have the same dtype";
- "cu_seqlens_q must have dtype int32", contiguous, shape (batch_size + 1), batch_size = its size - 1 > 0;
- "Input tensor must have contiguous last dimension" (query, key, value);
- query (total_q, num_heads, head_size), key and value (total_k, num_heads_k, head_size); "Number of heads in
  key/value must divide number of heads in query" (equal here: 2.11 has no enable_gqa);
- "FlashAttention forward only supports head dimension at most 256"; "head_size must be a multiple of 8".
The real function also checks that every tensor is on CUDA ("must be on CUDA"): the one rule this double drops,
so that it runs on the CPU.

Two rules are the double's own, and say so: the kernel does not check them, and breaking them gives wrong results
rather than an error. The cumulative lengths must start at 0, never decrease and end inside the tokens (the kernel
reads each sequence between two of them), and no sequence may be longer than max_q / max_k (the kernel's grid
covers max_q rows per sequence: a longer sequence's last rows would never be computed).
"""
import torch
import torch.nn.functional as F

FLASH = "flash_api.cpp mha_varlen_fwd"


class KernelError(RuntimeError):
    """What the real function raises (torch's checks raise RuntimeError)."""


def strict_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                       window_size=(-1, -1)):
    strict_varlen_attn.calls += 1
    for name, bound in (("max_q", max_q), ("max_k", max_k)):
        if not isinstance(bound, int) or isinstance(bound, bool):
            raise KernelError(f"{name} must be an int (the custom op's schema), got {type(bound).__name__}")
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise KernelError(f"FlashAttention only support fp16 and bf16 data type ({FLASH})")
    for name, tensor in (("key", key), ("value", value)):
        if tensor.dtype != query.dtype:
            raise KernelError(f"query and {name} must have the same dtype ({FLASH})")
    for name, bounds in (("cu_seqlens_q", cu_seq_q), ("cu_seqlens_k", cu_seq_k)):
        if bounds.dtype != torch.int32:
            raise KernelError(f"{name} must have dtype int32 ({FLASH})")
        if not bounds.is_contiguous():
            raise KernelError(f"{name} must be contiguous ({FLASH})")
    for tensor in (query, key, value):
        if tensor.dim() != 3:
            raise KernelError(f"query, key and value must be (total, num_heads, head_size), got {tuple(tensor.shape)}")
        if tensor.stride(-1) != 1:
            raise KernelError(f"Input tensor must have contiguous last dimension ({FLASH})")
    batch_size = cu_seq_q.numel() - 1
    if batch_size <= 0:
        raise KernelError(f"batch size must be positive ({FLASH})")
    if tuple(cu_seq_q.shape) != (batch_size + 1,) or tuple(cu_seq_k.shape) != (batch_size + 1,):
        raise KernelError(f"cu_seqlens_q and cu_seqlens_k must have shape (batch_size + 1) ({FLASH})")
    total_q, heads, head_size = query.shape
    if key.shape[1:] != (heads, head_size) or value.shape != key.shape:
        raise KernelError(f"Number of heads in key/value must divide number of heads in query, and key and value "
                          f"must be (total_k, num_heads_k, head_size) ({FLASH}; torch 2.11 has no enable_gqa)")
    if head_size > 256:
        raise KernelError(f"FlashAttention forward only supports head dimension at most 256 ({FLASH})")
    if head_size % 8:
        raise KernelError(f"head_size must be a multiple of 8, this is ensured by padding! ({FLASH})")
    if tuple(window_size) != (-1, -1) or return_aux is not None:
        raise KernelError("the double serves full attention without auxiliary outputs only")

    starts_q, starts_k = cu_seq_q.tolist(), cu_seq_k.tolist()
    for bounds, total, bound, name in ((starts_q, total_q, max_q, "max_q"), (starts_k, key.shape[0], max_k, "max_k")):
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        if bounds[0] != 0 or min(lengths) < 0 or bounds[-1] > total:
            raise KernelError("(the double's rule) the cumulative lengths must start at 0, never decrease and end "
                              f"inside the {total} tokens: the kernel would read other memory; got {bounds}")
        if max(lengths) > bound:
            raise KernelError(f"(the double's rule) a sequence of {max(lengths)} tokens is longer than {name} "
                              f"{bound}: the kernel would leave its last rows uncomputed")
    outputs = []
    for (q0, q1), (k0, k1) in zip(zip(starts_q, starts_q[1:]), zip(starts_k, starts_k[1:])):
        if q1 == q0:
            continue
        q, k, v = (t.float().transpose(0, 1) for t in (query[q0:q1], key[k0:k1], value[k0:k1]))
        outputs.append(F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(0, 1))
    output = torch.cat(outputs) if outputs else query.new_zeros(0, heads, head_size, dtype=torch.float32)
    rest = query.new_zeros(total_q - output.shape[0], heads, head_size, dtype=torch.float32)  # past the last bound
    return torch.cat([output, rest]).to(query.dtype)


strict_varlen_attn.calls = 0
