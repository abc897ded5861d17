"""CUDA correctness of the numerical kernels, in seconds, before any timing (benchmarks/gpu_check.sh runs it):

- the chunked LM head under bf16 autocast equals the plain head (loss and gradients) at GPT-2 scale, with a
  smaller peak memory;
- the chunked loss, the capped sparse MLM head and a LAMB step make no host synchronisation
  (torch.cuda.set_sync_debug_mode("error") turns any into an exception);
- a GPT-2 patched with the serialized head gives the unpatched model's loss and gradients on the GPU.
Then one measurement: forward and backward of the GPT-2 head at the benchmark's size, plain (logits +
cross-entropy), chunked, and chunked with the vocabulary padded to a multiple of 64 (the default), to show what the
aligned matmuls are worth on this card. Last, a check: a group's sums on their way to the host (`PendingHostRead`) start
their copy with no host synchronisation and are read without waiting for kernels launched after them.
Then one finding, no verdict: which attention kernel the compiled training step of BERT (with our sparse MLM head)
and of GPT-2 asks for under bf16 autocast (flash, memory-efficient, cuDNN, or SDPA's math path of separate matmuls
and softmax), read off the forward graph that torch.compile hands to its compiler.
Then the pipeline stages' machinery (--pipeline_stages_across_processes) on CUDA, as far as one GPU allows: one
stage in one process, bf16 and fp16 with its loss scale, against the whole model. Last, packed rows through
torch's variable-length attention kernel against the block-diagonal mask, and whether that step synchronises.
Prints one line per check and exits non-zero on the first failure."""
import sys
import types

import torch
import torch.nn.functional as F

from ipu_train.attention import eager_sdpa_masks
from ipu_train.backends.base import DeviceSums, EvalSums, PendingHostRead
from ipu_train.optim import LAMB
from ipu_train.pipeline.heads import chunked_lm_loss, enable_serialized_heads, sparse_mlm_loss

DEVICE = "cuda"


def report(name, ok, detail):
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        sys.exit(1)


def relative_error(a, b):
    """|a - b| / |b|, in float32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fresh_grads(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def peak_of(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return result, (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def check_chunked_head_bf16():
    g = torch.Generator(DEVICE).manual_seed(0)
    tokens, hidden_size, vocab = 8 * 1024, 768, 50257
    hidden = torch.randn(tokens, hidden_size, device=DEVICE, generator=g)
    weight = torch.randn(vocab, hidden_size, device=DEVICE, generator=g) * 0.02
    labels = torch.randint(0, vocab, (tokens,), device=DEVICE, generator=g)
    labels[::7] = -100

    def run(loss_fn):
        h, w = fresh_grads(hidden, weight)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = loss_fn(h, w)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    def plain(h, w):
        return F.cross_entropy(F.linear(h, w).float(), labels)

    (loss_p, gh_p, gw_p), mem_plain = peak_of(lambda: run(plain))
    (loss_c, gh_c, gw_c), mem_chunked = peak_of(lambda: run(lambda h, w: chunked_lm_loss(h, w, labels, 4)))
    errors = dict(loss=abs(loss_c - loss_p).item(), grad_hidden=relative_error(gh_c, gh_p),
                  grad_weight=relative_error(gw_c, gw_p))
    report("chunked head = plain head (bf16, 8192 tokens x 50257)",
           errors["loss"] < 2e-3 and errors["grad_hidden"] < 2e-2 and errors["grad_weight"] < 2e-2,
           ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    report("chunked head peak memory below the plain head's", mem_chunked < mem_plain,
           f"{mem_chunked:.2f} GiB vs {mem_plain:.2f} GiB")


def check_no_host_sync():
    g = torch.Generator(DEVICE).manual_seed(1)
    hidden = torch.randn(8, 128, 64, device=DEVICE, generator=g, requires_grad=True)
    weight = torch.randn(1000, 64, device=DEVICE, generator=g, requires_grad=True)
    labels = torch.randint(0, 1000, (8, 128), device=DEVICE, generator=g)
    mlm_labels = torch.where(torch.rand(8, 128, device=DEVICE, generator=g) < 0.15, labels, -100)
    transform = torch.nn.Linear(64, 64, device=DEVICE)
    model = torch.nn.Linear(64, 64, device=DEVICE)
    optimizer = LAMB(model.parameters(), lr=1e-3, weight_decay=0.01)
    model(hidden.detach()).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        chunked_lm_loss(hidden, weight, labels, 3).backward()
        sparse_mlm_loss(hidden, mlm_labels, transform, weight, max_predictions=32, n_chunks=2).backward()
        optimizer.step()
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    report("no host synchronisation", True, "chunked loss, capped sparse MLM loss, LAMB steps")


def check_deferred_read_waits_for_its_own_kernels():
    import time

    sums = DeviceSums(EvalSums, DEVICE)
    sums.tensor.copy_(torch.arange(3.0, device=DEVICE))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sums.tensor *= 2
        pending = PendingHostRead(sums)  # starting the copy makes no host synchronisation
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda._sleep(4 * 10 ** 9)  # about two seconds of device work launched after the copy
    started = time.perf_counter()
    values = pending.result()
    waited = time.perf_counter() - started
    torch.cuda.synchronize()
    report("a PendingHostRead waits for its own kernels only",
           values == EvalSums(loss=0.0, counted=2.0, samples=4.0) and waited < 0.5,
           f"read {values} after {waited * 1e3:.1f} ms while about 2 s of later device work ran")


def check_gpt2_patched():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0)).to(DEVICE).train()
    ids = torch.randint(0, model.config.vocab_size, (4, 256), device=DEVICE)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_ref, grads_ref = loss_and_grads()
    enable_serialized_heads(model, types.SimpleNamespace(embedding_serialization_factor=4,
                                                         projection_serialization_factor=1))
    loss, grads = loss_and_grads()
    worst = max(((grads[n] - grads_ref[n]).norm() / grads_ref[n].norm().clamp_min(1e-12)).item() for n in grads)
    report("GPT-2 patched = unpatched (fp32)", abs(loss - loss_ref).item() < 1e-4 and worst < 1e-3,
           f"loss {loss.item():.5f} vs {loss_ref.item():.5f}, worst relative gradient error {worst:.1e}")


def time_gpt2_head():
    g = torch.Generator(DEVICE).manual_seed(2)
    tokens, hidden_size, vocab = 16 * 1024, 768, 50257
    hidden = torch.randn(tokens, hidden_size, device=DEVICE, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, device=DEVICE, generator=g) * 0.02).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), device=DEVICE, generator=g)
    heads = {"plain": lambda: F.cross_entropy(F.linear(hidden, weight).float(), labels),
             "chunked, vocabulary 50257": lambda: chunked_lm_loss(hidden, weight, labels, 4, vocab_alignment=1),
             "chunked, padded to 50304": lambda: chunked_lm_loss(hidden, weight, labels, 4)}
    timings = []
    for name, loss_fn in heads.items():
        def step():
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = loss_fn()
            loss.backward()
        for _ in range(3):
            step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            step()
        end.record()
        torch.cuda.synchronize()
        timings.append(f"{name} {start.elapsed_time(end) / 10:.2f} ms")
    print("time  GPT-2 head forward + backward, 16384 tokens, bf16: " + "; ".join(timings), flush=True)


ATTENTION_OPS = {"_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_efficient_attention":
                 "memory-efficient", "_scaled_dot_product_cudnn_attention": "cuDNN",
                 "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)", "_safe_softmax": "math (bmm + softmax)"}


def attention_kernels_of(model, batch):
    """The SDPA kernels in the forward graph of `model(**batch)` compiled in training mode under bf16 autocast."""
    from torch._functorch.aot_autograd import aot_module_simplified

    found = set()

    def record(graph_module, _inputs):
        for node in graph_module.graph.nodes:
            name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
            if name in ATTENTION_OPS:
                found.add(ATTENTION_OPS[name])
        return graph_module

    eager_sdpa_masks()  # as TorchBackend compiles models
    torch._dynamo.reset()
    compiled = torch.compile(model.train(), backend=lambda gm, inputs: aot_module_simplified(
        gm, inputs, fw_compiler=record, bw_compiler=lambda g, _: g))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        compiled(**batch)
    torch._dynamo.reset()
    return ", ".join(sorted(found)) or "none found"


def report_attention_kernels():
    from transformers import BertConfig, BertForPreTraining, GPT2Config, GPT2LMHeadModel

    from ipu_train import IPUConfig

    g = torch.Generator(DEVICE).manual_seed(0)
    ids = torch.randint(5, 1000, (8, 128), device=DEVICE, generator=g)
    bert = BertForPreTraining(BertConfig(vocab_size=1000, num_hidden_layers=2)).to(DEVICE)
    enable_serialized_heads(bert, IPUConfig(), max_predictions=32)
    labels = torch.where(torch.rand(8, 128, device=DEVICE, generator=g) < 0.15, ids, -100)
    bert_batch = dict(input_ids=ids, token_type_ids=torch.zeros_like(ids), labels=labels,
                      next_sentence_label=torch.zeros(8, dtype=torch.long, device=DEVICE))
    bert_without_attention_dropout = BertForPreTraining(BertConfig(vocab_size=1000, num_hidden_layers=2,
                                                                   attention_probs_dropout_prob=0.0)).to(DEVICE)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_layer=2, eos_token_id=0, bos_token_id=0)).to(DEVICE)
    print(f"info  attention in the compiled training step (bf16, dropout on, no mask): "
          f"BERT with the sparse MLM head: {attention_kernels_of(bert, bert_batch)}; plain BERT without attention "
          f"dropout: {attention_kernels_of(bert_without_attention_dropout, bert_batch)}; GPT-2: "
          f"{attention_kernels_of(gpt2, dict(input_ids=ids, labels=ids))}; SDPA backends enabled: flash "
          f"{torch.backends.cuda.flash_sdp_enabled()}, memory-efficient {torch.backends.cuda.mem_efficient_sdp_enabled()}, "
          f"cuDNN {torch.backends.cuda.cudnn_sdp_enabled()}", flush=True)


def check_pipeline_stages_on_one_gpu():
    """--pipeline_stages_across_processes's machinery on CUDA, within the one GPU this check has: a GPT-2 as one
    pipeline stage (its schedule, stage module, loss function and gradient syncs; an NCCL world of one), trained 4
    steps of 4 micro-batches against the whole model with gradient accumulation, in bf16 and in fp16 with the
    pipelines' loss scale against torch.amp.GradScaler (a first scale that overflows: the same steps skipped, the same
    scales). Two stages need two processes, so two GPUs (NCCL refuses two ranks on one device; and torch before 2.13
    sends between two stages of one process through the process group, which cannot send to itself)."""
    import socket

    import torch.distributed as dist
    from transformers import GPT2Config, GPT2LMHeadModel

    from ipu_train.config import IPUConfig
    from ipu_train.pipeline.loss_scale import PipelineLossScale
    from ipu_train.pipeline.process_stages import (PipelineRanks, build_process_pipeline, build_stage_module,
                                                   new_pipeline_groups, pipeline_optimizer_step,
                                                   pipeline_train_step, stage_plan_for)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    on_cuda = DEVICE == "cuda"  # the CPU (gloo) only to try the check itself
    if on_cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if on_cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=1024, n_positions=128, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    weights = GPT2LMHeadModel(config).state_dict()
    g = torch.Generator(DEVICE).manual_seed(1)
    steps = [[dict(input_ids=ids, labels=ids) for ids in torch.randint(0, 1024, (4, 8, 128), device=DEVICE,
                                                                           generator=g)] for _ in range(4)]
    scaling = dict(growth_factor=2.0, backoff_factor=2.0 ** -12, growth_interval=2)
    ranks = PipelineRanks(rank=0, ranks_per_pipeline=1, replicas=1, num_stages=1)
    groups = new_pipeline_groups(ranks)
    plan = stage_plan_for(config, IPUConfig(layers_per_ipu=[4]), "GPT2LMHeadModel")
    for dtype in (torch.bfloat16, torch.float16):
        whole = GPT2LMHeadModel(config).to(DEVICE)
        whole.load_state_dict(weights)
        optimizer = torch.optim.AdamW(whole.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 40, **scaling) if dtype == torch.float16 else None
        modules = [build_stage_module(config, plan, index, weights=weights, device=DEVICE,
                                      model_class="GPT2LMHeadModel") for index in ranks.stage_indices]
        scale = PipelineLossScale(2.0 ** 40, DEVICE, **scaling) if scaler else None
        pipeline = build_process_pipeline(ranks, groups, modules, 4, schedule="gpipe", device=DEVICE,
                                          loss_scale=scale)
        staged_optimizer = torch.optim.AdamW(pipeline.parameters(), lr=1e-3)
        expected, got, scales = [], [], []
        for micro_batches in steps:
            total = 0.0
            for batch in micro_batches:
                with torch.autocast(DEVICE, dtype=dtype):
                    loss = whole(**batch).loss.float() / len(micro_batches)
                (scaler.scale(loss) if scaler else loss).backward()
                total += loss.item()
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(whole.parameters(), 1.0)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad()
            expected.append(total)
            with torch.autocast(DEVICE, dtype=dtype):
                got.append(pipeline_train_step(pipeline, micro_batches, device=DEVICE).item())
            pipeline_optimizer_step(pipeline, staged_optimizer, 1.0, scale)
            staged_optimizer.zero_grad()
            scales.append((scaler.get_scale(), scale.get_scale()) if scaler else None)
        worst = max(abs(a - b) / abs(b) for a, b in zip(got, expected))
        same_scales = all(s is None or s[0] == s[1] for s in scales)
        report(f"pipeline stage on one GPU ({str(dtype)[6:]})", worst < 2e-2 and same_scales,
               f"losses {['%.4f' % x for x in got]} vs whole model {['%.4f' % x for x in expected]} (worst relative "
               f"{worst:.1e})" + (f"; scales (GradScaler, stages) {scales}" if scaler else ""))
    dist.destroy_process_group()


def packed_rows(rows, length, vocab, generator):
    """A batch of packed rows as DataCollatorForPackedSequences lays them out: 1 to 3 sequences a row, some rows
    full, the rest padding; position ids restarting at each sequence; 15% of the real tokens labelled."""
    sequence_in_row = torch.zeros(rows, length, dtype=torch.int32)
    position_ids = torch.zeros(rows, length, dtype=torch.long)
    for row in range(rows):
        count = 1 + row % 3
        end = length if row % 4 == 0 else int(torch.randint(length // 2, length, (1,), generator=generator))
        cuts = sorted((torch.randperm(end - 1, generator=generator)[:count - 1] + 1).tolist())
        for index, (start, stop) in enumerate(zip([0, *cuts], [*cuts, end])):
            sequence_in_row[row, start:stop] = index + 1
            position_ids[row, start:stop] = torch.arange(stop - start)
    real = sequence_in_row > 0
    input_ids = torch.where(real, torch.randint(5, vocab, (rows, length), generator=generator), 0)
    labels = torch.where(real & (torch.rand(rows, length, generator=generator) < 0.15), input_ids, -100)
    batch = dict(input_ids=input_ids, position_ids=position_ids, labels=labels, sequence_in_row=sequence_in_row)
    return {key: value.to(DEVICE) for key, value in batch.items()}


def check_packed_rows_on_the_kernel():
    """Packed rows (--pack_sequences) through torch's variable-length FlashAttention kernel
    (ipu_train.attention), against the same rows through the block-diagonal mask, a 2-layer BERT in bf16
    (heads of 64): the first attention layer's output at every real token, the loss, the gradients. Then a finding,
    no verdict: whether a step on the kernel (its sequence bounds built on the device, forward, backward) makes a
    host synchronisation."""
    import copy

    from transformers import BertConfig, BertForMaskedLM

    from ipu_train.attention import kernel_refusal, route_packed_attention
    from ipu_train.packing import SEQUENCE_IN_ROW, packed_model_inputs

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=1024, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=512)
    masked = BertForMaskedLM(config).to(DEVICE).train()
    routed = copy.deepcopy(masked)
    route_packed_attention(routed, 3)
    batch = packed_rows(16, 512, config.vocab_size, torch.Generator().manual_seed(2))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        refused = kernel_refusal(routed, batch[SEQUENCE_IN_ROW])
    if refused is not None:
        report("packed rows on the variable-length kernel", False, f"the kernel does not serve: {refused}")

    def run(model):
        model.zero_grad()
        seen = []
        hook = model.bert.encoder.layer[0].attention.self.register_forward_hook(
            lambda module, args, output: seen.append(output[0].detach().float()))
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            inputs = packed_model_inputs(batch, model)
            loss = model(**inputs).loss.float()
        loss.backward()
        hook.remove()
        grads = {name: p.grad.float() for name, p in model.named_parameters() if p.grad is not None}
        return set(inputs), seen[0], loss.detach(), grads

    kernel_keys, kernel_context, kernel_loss, kernel_grads = run(routed)
    mask_keys, mask_context, mask_loss, mask_grads = run(masked)
    real = batch[SEQUENCE_IN_ROW] > 0  # indexing by it synchronises: outside the step whose syncs are looked for
    kernel_context, mask_context = kernel_context[real], mask_context[real]
    worst_grad = max(relative_error(kernel_grads[name], grad) for name, grad in mask_grads.items()
                     if grad.norm() > 1e-6)
    errors = dict(context=relative_error(kernel_context, mask_context),
                  loss=abs(kernel_loss - mask_loss).item() / mask_loss.item(), worst_grad=worst_grad)
    took_kernel = ("cu_seq_lens_q" in kernel_keys and "attention_mask" not in kernel_keys
                   and "attention_mask" in mask_keys)
    report("packed rows: variable-length kernel = block-diagonal mask (bf16, 16 x 512, BERT 2 x 256)",
           took_kernel and errors["context"] < 1e-2 and errors["loss"] < 5e-3 and worst_grad < 5e-2,
           ", ".join(f"{k} {v:.2e}" for k, v in errors.items()) + ("" if took_kernel else "; THE MASK WAS TAKEN"))
    if DEVICE != "cuda":
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(routed)
        finding = "none"
    except RuntimeError as error:
        finding = str(error).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(f"     packed rows on the kernel, host synchronisations in a step: {finding}", flush=True)


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}", flush=True)
    check_chunked_head_bf16()
    check_no_host_sync()
    check_gpt2_patched()
    time_gpt2_head()
    check_deferred_read_waits_for_its_own_kernels()
    report_attention_kernels()
    check_pipeline_stages_on_one_gpu()  # after the others: its NCCL group is the check's only collective
    check_packed_rows_on_the_kernel()
