"""Packed rows through the variable-length kernel (issue 15, point 2: no cross-contamination, "a variable-length
kernel on CUDA where it exists"): ipu_train/attention.py, with torch's varlen_attn replaced by a strict double
(tests/varlen_double.py) allowed on the CPU. The real kernel runs in benchmarks/gpu_packing.sh."""
import copy
import json
import logging

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertForPreTraining

from ipu_train import IPUConfig, attention
from ipu_train.data import DataCollatorForCappedMLM
from ipu_train.attention import (ATTENTION, eager_sdpa_masks, kernel_inputs, kernel_refusal, route_packed_attention,
                                 sdpa_or_kernel)
from ipu_train.packing import SEQUENCE_IN_ROW, DataCollatorForPackedSequences, PackedDataset, packed_model_inputs
from ipu_train.pipeline.families import position_offset
from ipu_train.pipeline.heads import enable_serialized_heads

from .test_packed_batches import SMALL, backend_on, bert, distilbert, roberta, sequences
from .varlen_double import KernelError, strict_varlen_attn

PER_PACK = 3
FIRST_ATTENTION = {"bert": "bert.encoder.layer.0.attention.self", "roberta": "roberta.encoder.layer.0.attention.self",
                   "distilbert": "distilbert.transformer.layer.0.attention"}
LENGTH = 64


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """The double in place of torch's kernel, and the CPU allowed to run it."""
    monkeypatch.setattr(attention, "variable_length_kernel", lambda: strict_varlen_attn)
    monkeypatch.setattr(attention, "KERNEL_DEVICE_TYPES", ("cuda", "cpu"))
    strict_varlen_attn.calls = 0
    return strict_varlen_attn


def test_the_bounds_cover_each_rows_sequences_then_its_padding():
    sequence_in_row = torch.tensor([[1, 1, 2, 2, 2, 0],   # two sequences and padding
                                    [1, 1, 1, 1, 1, 1],   # one sequence filling the row
                                    [1, 2, 3, 3, 0, 0]],  # three, the most a row holds here
                                   dtype=torch.int32)
    inputs = kernel_inputs(sequence_in_row, max_per_pack=3)
    bounds = inputs["cu_seq_lens_q"]
    assert bounds.dtype == torch.int32 and bounds is inputs["cu_seq_lens_k"]
    lengths = (bounds[1:] - bounds[:-1]).view(3, 4).tolist()  # per row: sequences 1, 2, 3, then padding
    assert lengths == [[2, 3, 0, 1], [6, 0, 0, 0], [1, 1, 2, 2]]
    assert bounds[-1] == sequence_in_row.numel()
    assert inputs["max_length_q"] == inputs["max_length_k"] == 6  # a plain int: no host read


def test_the_double_refuses_what_flash_attention_refuses():
    tokens = torch.randn(6, 2, 8, dtype=torch.bfloat16)
    bounds = torch.tensor([0, 2, 6], dtype=torch.int32)
    assert strict_varlen_attn(tokens, tokens, tokens, bounds, bounds, 4, 4).shape == tokens.shape
    for call, message in [
        (lambda: strict_varlen_attn(tokens.float(), tokens.float(), tokens.float(), bounds, bounds, 4, 4), "fp16 and bf16"),
        (lambda: strict_varlen_attn(tokens, tokens, tokens, bounds.long(), bounds.long(), 4, 4), "int32"),
        (lambda: strict_varlen_attn(tokens, tokens, tokens, bounds, bounds, torch.tensor(4), 4), "must be an int"),
        (lambda: strict_varlen_attn(tokens[..., :4], tokens[..., :4], tokens[..., :4], bounds, bounds, 4, 4),
         "multiple of 8"),
        (lambda: strict_varlen_attn(*(torch.randn(6, 8, 2, dtype=torch.bfloat16).transpose(1, 2),) * 3, bounds,
                                    bounds, 4, 4), "contiguous last dimension"),
        (lambda: strict_varlen_attn(tokens, tokens, tokens, bounds, bounds, 3, 3), "longer than max_q"),
        (lambda: strict_varlen_attn(tokens, tokens, tokens, bounds.flip(0).contiguous(), bounds, 6, 6), "start at 0"),
        (lambda: strict_varlen_attn(tokens, tokens, tokens, bounds, bounds, 4, 4, enable_gqa=False), "enable_gqa"),
    ]:
        with pytest.raises((KernelError, TypeError), match=message):
            call()


def packed_batch(tokenizer, model, count=24, seed=1):
    examples = sequences(tokenizer, count, seed=seed)
    packed = PackedDataset({"input_ids": [e["input_ids"] for e in examples]}, max_length=LENGTH,
                           max_per_pack=PER_PACK)
    packs = [[examples[i] for i in pack] for pack in packed.packing.packs]
    assert max(len(p) for p in packs) > 1 and min(len(p) for p in packs) < PER_PACK  # several and empty slots
    mlm = DataCollatorForCappedMLM(tokenizer, mlm_probability=0.3, max_masked_tokens="auto", pad_to_multiple_of=None)
    torch.manual_seed(5)
    batch = DataCollatorForPackedSequences(mlm, LENGTH, PER_PACK, tokenizer.pad_token_id,
                                           position_offset=position_offset(model.config))(packs)
    if "token_type_ids" not in model.forward.__code__.co_varnames:
        batch.pop("token_type_ids", None)
    return batch


def bf16_loss_and_grads(model, batch):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**packed_model_inputs(batch, model)).loss.float()
    loss.backward()
    return loss.detach(), {name: p.grad.float() for name, p in model.named_parameters() if p.grad is not None}


def relative_difference(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family,tokenizer_fixture", [("bert", "wordpiece_tokenizer_dir"),
                                                      ("roberta", "roberta_tokenizer_dir"),
                                                      ("distilbert", "wordpiece_tokenizer_dir")])
def test_the_kernel_gives_what_the_mask_gives(family, tokenizer_fixture, request, kernel_on_cpu):
    """bf16 training forward and backward: the kernel's loss and gradients are the block-diagonal mask's, to bf16's
    precision; with the bounds of whole rows instead (sequences attending across the row) they are not."""
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(tokenizer_fixture))
    torch.manual_seed(0)
    # Heads of 8 dimensions (FlashAttention takes multiples of 8): hidden 32 over 4 heads.
    build = {"bert": bert, "roberta": roberta, "distilbert": distilbert}[family]
    masked = build(len(tokenizer), tokenizer)
    config = masked.config
    config.num_attention_heads = 4  # DistilBERT's n_heads, through its attribute map
    masked = type(masked)(config).train()
    routed = copy.deepcopy(masked)
    route_packed_attention(routed, PER_PACK)
    batch = packed_batch(tokenizer, masked)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inputs = packed_model_inputs(batch, routed)
    assert "attention_mask" not in inputs and inputs["cu_seq_lens_q"].numel() == len(batch["input_ids"]) * 4 + 1

    kernel_loss, kernel_grads = bf16_loss_and_grads(routed, batch)
    assert kernel_on_cpu.calls == config.num_hidden_layers  # every layer took the kernel
    mask_loss, mask_grads = bf16_loss_and_grads(masked, batch)
    assert kernel_on_cpu.calls == config.num_hidden_layers  # the unrouted model: the mask, never the kernel
    assert kernel_loss == pytest.approx(mask_loss.item(), rel=5e-3)
    for name, grad in mask_grads.items():
        if grad.norm() > 1e-6:  # not the key bias's: zero but for rounding (softmax ignores a shift of the scores)
            assert relative_difference(kernel_grads[name], grad) < 0.03, name

    def context(model, inputs):  # the first attention layer's output at every real token
        seen = []
        hook = model.get_submodule(FIRST_ATTENTION[family]).register_forward_hook(
            lambda module, args, output: seen.append(output[0]))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.eval()(**inputs)
        hook.remove()
        return seen[0].float()[batch[SEQUENCE_IN_ROW] > 0]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernel, mask = (packed_model_inputs(batch, model) for model in (routed, masked))
    reference = context(masked, mask)
    assert relative_difference(context(routed, kernel), reference) < 0.01
    whole_rows = torch.arange(0, batch["input_ids"].numel() + 1, LENGTH, dtype=torch.int32)
    leaking = dict(kernel, cu_seq_lens_q=whole_rows, cu_seq_lens_k=whole_rows)  # sequences see their neighbours
    assert relative_difference(context(routed, leaking), reference) > 0.1  # what the test would catch


def test_pretraining_with_serialized_heads_takes_the_kernel(wordpiece_tokenizer_dir, kernel_on_cpu):
    """BertForPreTraining as run_pretraining.py trains it (serialized heads reading each pair's [CLS]) and evaluates
    it: the kernel's losses are the mask's."""
    from ipu_train.packing import accept_packed_pretraining_rows

    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    torch.manual_seed(0)
    masked = BertForPreTraining(BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                           **dict(SMALL, num_attention_heads=4)))
    routed = copy.deepcopy(masked)
    for model in (masked, routed):
        enable_serialized_heads(model, IPUConfig(), max_predictions=None)
        accept_packed_pretraining_rows(model)
    route_packed_attention(routed, PER_PACK)
    examples = sequences(tokenizer, 18, seed=3)
    pairs = [dict(e, token_type_ids=[0] * 3 + [1] * (len(e["input_ids"]) - 3), next_sentence_label=i % 2)
             for i, e in enumerate(examples) if len(e["input_ids"]) > 4]
    packs = [[pairs[i] for i in pack] for pack in PackedDataset(
        {"input_ids": [p["input_ids"] for p in pairs]}, max_length=LENGTH, max_per_pack=PER_PACK).packing.packs]
    mlm = DataCollatorForCappedMLM(tokenizer, mlm_probability=0.3, pad_to_multiple_of=None)
    torch.manual_seed(7)
    batch = DataCollatorForPackedSequences(mlm, LENGTH, PER_PACK, tokenizer.pad_token_id)(packs)
    for mode in ("train", "eval"):
        losses = [bf16_loss_and_grads(getattr(model, mode)(), batch)[0] for model in (routed, masked)]
        assert losses[0] == pytest.approx(losses[1].item(), rel=5e-3), mode
    assert kernel_on_cpu.calls == 2 * routed.config.num_hidden_layers


def test_when_the_kernel_serves_and_why_not(wordpiece_tokenizer_dir, kernel_on_cpu, monkeypatch, caplog):
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    rows = torch.tensor([[1, 1, 0]], dtype=torch.int32)

    def routed(**overrides):
        model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), **{**SMALL, "num_attention_heads": 4,
                                                                           **overrides}))
        route_packed_attention(model, PER_PACK)
        return model

    model = routed()
    assert kernel_refusal(model.train(), rows) == "it computes in bf16 or fp16 (--bf16, --fp16), and the model " \
                                                  "runs in torch.float32"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernel_refusal(model, rows) is None
        assert "dropout" in kernel_refusal(routed(attention_probs_dropout_prob=0.1).train(), rows)
        assert kernel_refusal(routed(attention_probs_dropout_prob=0.1).eval(), rows) is None  # no dropout there
        assert "multiples of 8" in kernel_refusal(routed(num_attention_heads=8), rows)  # heads of 4
        assert "not routed" in kernel_refusal(BertForMaskedLM(model.config), rows)
        eager = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), attn_implementation="eager",
                                           **dict(SMALL, num_attention_heads=4)))
        route_packed_attention(eager, PER_PACK)
        assert "'eager', not 'sdpa'" in kernel_refusal(eager, rows)
        assert eager.config._attn_implementation == "eager"  # left as it was
    monkeypatch.setattr(attention, "KERNEL_DEVICE_TYPES", ("cuda",))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernel_refusal(model, rows) == "it runs on CUDA, and the batch is on cpu"
    monkeypatch.setattr(attention, "variable_length_kernel", lambda: None)
    assert "has no torch.nn.attention.varlen" in kernel_refusal(routed(), rows)

    caplog.set_level(logging.INFO, logger="ipu_train")
    batch = {"input_ids": torch.tensor([[5, 6, 0]]), SEQUENCE_IN_ROW: rows}
    for _ in range(2):
        packed_model_inputs(batch, model.train())
        packed_model_inputs(batch, model.eval())
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Packed rows")]
    assert said == [f"Packed rows ({mode}): attention through SDPA with a block-diagonal mask, not the "
                    "variable-length kernel: it runs on CUDA, and the batch is on cpu"
                    for mode in ("training", "evaluation")]  # once per mode and choice


def test_the_kernel_never_drops_attention_dropout_silently():
    tokens = torch.zeros(2, 2, 4, 8)
    bounds = torch.tensor([0, 4, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="no attention dropout"):
        sdpa_or_kernel(torch.nn.Module(), tokens, tokens, tokens, None, dropout=0.1, cu_seq_lens_q=bounds,
                       cu_seq_lens_k=bounds, max_length_q=4, max_length_k=4)


def test_a_routed_model_runs_other_batches_and_saves_as_before(wordpiece_tokenizer_dir, tmp_path):
    """Batches without the kernel's arguments (padded rows with their padding mask, packed rows given the mask)
    take transformers' SDPA as before, to the bit; the saved config does not name the routing."""
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    torch.manual_seed(0)
    plain = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), **dict(SMALL, num_attention_heads=4))).eval()
    routed = copy.deepcopy(plain)
    route_packed_attention(routed, PER_PACK)
    assert routed.config._attn_implementation == ATTENTION
    ids = torch.randint(5, len(tokenizer), (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        assert torch.equal(routed(input_ids=ids, attention_mask=mask).logits,
                           plain(input_ids=ids, attention_mask=mask).logits)
        batch = packed_batch(tokenizer, plain)
        assert torch.equal(routed(**packed_model_inputs(batch, routed)).logits,  # fp32: the mask
                           plain(**packed_model_inputs(batch, plain)).logits)
    routed.save_pretrained(tmp_path)
    assert ATTENTION not in (tmp_path / "config.json").read_text()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "bert"
    assert BertForMaskedLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_the_training_step_takes_the_kernel_in_bf16(wordpiece_tokenizer_dir, kernel_on_cpu):
    """TorchBackend's bf16 training step (autocast around the call that builds the inputs) and its evaluation."""
    from ipu_train.backends.base import input_tokens
    from ipu_train.packing import refuse_unconverted_packed_rows

    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                       **dict(SMALL, num_attention_heads=4)))
    refuse_unconverted_packed_rows(model)
    route_packed_attention(model, PER_PACK)
    backend = backend_on("cpu")
    backend.autocast_dtype = torch.bfloat16
    module = backend.prepare_model(model)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    backend.attach(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    batch = packed_batch(tokenizer, model)
    loss, tokens, _ = backend.train_step([backend.to_device(batch)])
    assert torch.isfinite(loss) and int(tokens) == int(input_tokens(batch))
    assert kernel_on_cpu.calls == model.config.num_hidden_layers
    backend.eval_outputs(model, backend.to_device(batch))
    assert kernel_on_cpu.calls == 2 * model.config.num_hidden_layers


def test_the_real_kernel_takes_the_call_and_compiles_into_one_graph(monkeypatch):
    """torch's own varlen_attn, on meta tensors (its registered fake: shapes and autograd, no CUDA): a routed bf16
    BERT's packed rows run forward and backward through it, and TorchDynamo traces the forward into one graph that
    holds the kernel, with no graph break (the trainer compiles the model by default on CUDA)."""
    import torch._dynamo

    if attention.variable_length_kernel() is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    monkeypatch.setattr(attention, "KERNEL_DEVICE_TYPES", ("cuda", "meta"))
    config = BertConfig(vocab_size=100, **dict(SMALL, hidden_size=64, num_attention_heads=4))
    model = BertForMaskedLM(config).to(torch.bfloat16).to("meta").train()
    route_packed_attention(model, PER_PACK)
    ids = torch.randint(5, 100, (2, 10))
    batch = dict(input_ids=ids, labels=ids, position_ids=torch.tensor([[*range(5), *range(3), 0, 0], [*range(10)]]),
                 sequence_in_row=torch.tensor([[1] * 5 + [2] * 3 + [0] * 2, [1] * 10], dtype=torch.int32))
    inputs = packed_model_inputs({key: value.to("meta") for key, value in batch.items()}, model)
    assert "cu_seq_lens_q" in inputs and "attention_mask" not in inputs
    model(**inputs).loss.backward()
    assert all(p.grad is not None for p in model.bert.encoder.parameters())
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    kernels = [node for graph in explained.graphs for node in graph.graph.nodes if "varlen" in str(node.target)]
    assert len(kernels) == config.num_hidden_layers


def sdpa_calls_compiled(model, batch):
    """(mask given?, is_causal) of each SDPA call in the graph TorchDynamo captures for model(**batch), and the
    compiled output."""
    calls = []

    def capture(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            if node.target is torch.nn.functional.scaled_dot_product_attention:
                mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
                calls.append((mask is not None, node.kwargs.get("is_causal")))
        return graph_module.forward

    torch._dynamo.reset()
    output = torch.compile(model, backend=capture)(**batch)
    torch._dynamo.reset()
    return calls, output


@pytest.fixture
def sdpa_mask_restored(monkeypatch):
    """transformers' own SDPA mask during the test (an earlier test's TorchBackend.compile may have registered
    ours), and whatever was registered before put back after it."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    monkeypatch.setitem(AttentionMaskInterface._global_mapping, "sdpa", sdpa_mask)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_a_compiled_model_given_no_mask_gets_none(family, monkeypatch, sdpa_mask_restored):
    """In torch 2.11, torch.compiler.is_exporting() is true inside every compiled function, and transformers' SDPA
    mask then builds a mask of ones for a model given none, which takes SDPA off flash attention. Made so here (as
    transformers sees it): with the masks TorchBackend.compile registers (eager_sdpa_masks) the model calls SDPA with
    no mask, causal for GPT-2, where before it got a mask; same outputs; a padding mask is kept. The model's
    attention implementation stays "sdpa"."""
    import transformers.masking_utils
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if family == "bert":
        model = BertForMaskedLM(BertConfig(vocab_size=100, **dict(SMALL, num_attention_heads=4))).eval()
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4)).eval()
    monkeypatch.setattr(transformers.masking_utils, "is_torchdynamo_exporting", lambda: True)
    ids = torch.randint(5, 100, (2, 12))
    padding = torch.ones_like(ids)
    padding[1, 7:] = 0
    causal = family == "gpt2"
    with torch.no_grad():
        before_calls, before = sdpa_calls_compiled(model, dict(input_ids=ids))
        eager_sdpa_masks()
        after_calls, after = sdpa_calls_compiled(model, dict(input_ids=ids))
        assert before_calls == [(True, False)] * 2 and after_calls == [(False, causal)] * 2
        assert torch.allclose(after.logits, before.logits, atol=1e-5)
        padded_calls, padded = sdpa_calls_compiled(model, dict(input_ids=ids, attention_mask=padding))
        assert padded_calls == [(True, False)] * 2
        assert torch.allclose(padded.logits, model(input_ids=ids, attention_mask=padding).logits, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"


def test_the_trainer_registers_eager_masks_when_it_compiles(wordpiece_tokenizer_dir, sdpa_mask_restored):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), **dict(SMALL, num_attention_heads=4)))
    backend = backend_on("cpu")
    backend.args.torch_compile, backend.args.torch_compile_backend, backend.args.torch_compile_mode = True, "eager", None
    backend.compile(model)
    assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is attention.mask_where_needed
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("model_type", attention.KERNEL_MODEL_TYPES)
def test_every_model_type_served_by_the_kernel_matches_the_mask(model_type, wordpiece_tokenizer_dir, kernel_on_cpu):
    """Each type in KERNEL_MODEL_TYPES, built small: its packed rows' logits on the kernel are the mask's (bf16),
    every layer taking the kernel."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=32, embedding_size=32,
                                  num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
                                  max_position_embeddings=LENGTH + 8, pad_token_id=tokenizer.pad_token_id,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dropout=0.0,
                                  attention_dropout=0.0)
    torch.manual_seed(0)
    masked = AutoModelForMaskedLM.from_config(config).eval()
    routed = copy.deepcopy(masked)
    route_packed_attention(routed, PER_PACK)
    batch = packed_batch(tokenizer, masked)
    real = batch[SEQUENCE_IN_ROW] > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernel_refusal(routed, batch[SEQUENCE_IN_ROW]) is None
        kernel = routed(**packed_model_inputs(batch, routed)).logits.float()[real]
        mask = masked(**packed_model_inputs(batch, masked)).logits.float()[real]
    assert kernel_on_cpu.calls == config.num_hidden_layers
    assert relative_difference(kernel, mask) < 0.01


def test_other_models_and_gpus_keep_the_mask(monkeypatch):
    """A masked LM outside KERNEL_MODEL_TYPES (ModernBERT: its sliding-window layers take a mask) is not routed; a
    GPU older than Ampere, or a torch without FlashAttention, keeps the mask."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    config = AutoConfig.for_model("modernbert", vocab_size=100, hidden_size=32, num_attention_heads=4,
                                  num_hidden_layers=2, intermediate_size=64, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, cls_token_id=1, sep_token_id=2)
    model = AutoModelForMaskedLM.from_config(config)
    route_packed_attention(model, PER_PACK)
    assert model.config._attn_implementation == "sdpa"  # left as it was
    assert "the model is 'modernbert'" in kernel_refusal(model, torch.ones(1, 4, dtype=torch.int32))

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert attention._gpu_refusal(cuda) == ("FlashAttention needs a GPU of compute capability 8.0 or newer (Ampere), "
                                            "and Tesla V100 has 7.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert attention._gpu_refusal(cuda) is None
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: False)
    assert "built without FlashAttention" in attention._gpu_refusal(cuda)


def test_a_torch_whose_kernel_takes_no_scale_keeps_the_mask(monkeypatch):
    """torch 2.10's varlen_attn has no `scale` (2.11 added it): calling it would raise at the first packed step."""
    def varlen_attn_of_torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
                                  return_aux=None):
        raise AssertionError("never called")

    monkeypatch.setattr(attention, "variable_length_kernel", lambda: varlen_attn_of_torch_2_10)
    model = BertForMaskedLM(BertConfig(vocab_size=100, **dict(SMALL, num_attention_heads=4)))
    route_packed_attention(model, PER_PACK)
    assert "with a scale (torch 2.11 has)" in kernel_refusal(model, torch.ones(1, 4, dtype=torch.int32))
