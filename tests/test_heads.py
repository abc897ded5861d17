"""Serialized LM head and sparse MLM head: same loss and gradients as the plain heads, no (tokens × vocab) tensor
saved for backward, models patched per instance with weights, tying and state_dict untouched."""
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (BertConfig, BertForMaskedLM, BertForPreTraining, BertForSequenceClassification,
                          GPT2Config, GPT2LMHeadModel, RobertaConfig, RobertaForMaskedLM)

from ipu_train.pipeline.heads import (chunked_lm_loss, enable_serialized_heads, select_masked_positions,
                                      serialization_factor, sparse_mlm_loss)

VOCAB = 101


def ipu_config(embedding=1, projection=1):
    return types.SimpleNamespace(embedding_serialization_factor=embedding, projection_serialization_factor=projection)


def plain_loss(hidden, weight, labels, bias=None, num_items_in_batch=None):
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, weight.shape[0])
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels.reshape(-1))
    return F.cross_entropy(logits, labels.reshape(-1), reduction="sum") / num_items_in_batch


def loss_and_grads(loss_fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    loss = loss_fn(*leaves)
    loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


def head_problem(seed=0, batch=2, seq=9, hidden_size=8):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, hidden_size, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, hidden_size, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(VOCAB, generator=g, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels[0, :3] = -100
    labels[1, -1] = -100
    return hidden, weight, bias, labels


# ---------------------------------------------------------------------------------------------- chunked_lm_loss
@pytest.mark.parametrize("n_chunks", [1, 2, 5, 7, 18, 40])  # 18 tokens: 5 and 7 do not divide; 40 > tokens
@pytest.mark.parametrize("with_bias", [True, False])
def test_chunked_loss_and_grads_equal_plain_head(n_chunks, with_bias):
    hidden, weight, bias, labels = head_problem()
    bias = bias if with_bias else None
    expected, expected_grads = loss_and_grads(lambda h, w, b: plain_loss(h, w, labels, b), hidden, weight, bias)
    got, got_grads = loss_and_grads(lambda h, w, b: chunked_lm_loss(h, w, labels, n_chunks, bias=b),
                                    hidden, weight, bias)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    for g, e in zip(got_grads, expected_grads):
        if e is None:
            assert g is None
        else:
            assert g.dtype == e.dtype and g.shape == e.shape
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alignment", [1, 8, 64, 128])
def test_padding_the_vocabulary_changes_nothing_but_the_matmul_shapes(alignment):
    hidden, weight, bias, labels = head_problem(seed=5)  # VOCAB = 101 rows
    expected, expected_grads = loss_and_grads(lambda h, w, b: plain_loss(h, w, labels, b), hidden, weight, bias)
    with RecordMatmulShapes() as shapes:
        got, got_grads = loss_and_grads(
            lambda h, w, b: chunked_lm_loss(h, w, labels, 2, bias=b, vocab_alignment=alignment), hidden, weight, bias)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    for g, e in zip(got_grads, expected_grads):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    padded = -(-VOCAB // alignment) * alignment
    # logits, grad of hidden and grad of weight in each of the 2 chunks: every one spans the padded vocabulary
    assert len(shapes) == 6 and all(padded in dims for dims in shapes)
    assert alignment == 1 or not any(VOCAB in dims for dims in shapes)


class RecordMatmulShapes(TorchDispatchMode):
    """The (m, k, n) of every matrix product run inside the block."""

    def __enter__(self):
        self.shapes = []
        super().__enter__()
        return self.shapes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = args[-2:]
            self.shapes.append((a.shape[0], a.shape[1], b.shape[1]))
        return func(*args, **(kwargs or {}))


def test_chunked_loss_divides_by_num_items_in_batch():
    hidden, weight, bias, labels = head_problem(seed=1)
    n = torch.tensor(40)
    expected, expected_grads = loss_and_grads(lambda h, w: plain_loss(h, w, labels, None, n), hidden, weight)
    got, got_grads = loss_and_grads(lambda h, w: chunked_lm_loss(h, w, labels, 3, num_items_in_batch=n),
                                    hidden, weight)
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_chunked_loss_without_grad_and_with_frozen_weight():
    hidden, weight, bias, labels = head_problem(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(chunked_lm_loss(hidden, weight, labels, 4, bias=bias),
                                   plain_loss(hidden, weight, labels, bias))
    h = hidden.clone().requires_grad_(True)
    chunked_lm_loss(h, weight, labels, 4).backward()  # weight does not require grad: only hidden gets one
    h_ref = hidden.clone().requires_grad_(True)
    plain_loss(h_ref, weight, labels).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-10, atol=1e-12)


def test_chunked_loss_under_bf16_autocast_matches_plain_head():
    hidden, weight, bias, labels = (t.float() if t.is_floating_point() else t for t in head_problem(seed=3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = loss_and_grads(lambda h, w, b: plain_loss(h, w, labels, b), hidden, weight, bias)
        got, got_grads = loss_and_grads(lambda h, w, b: chunked_lm_loss(h, w, labels, 3, bias=b),
                                        hidden, weight, bias)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    for g, e in zip(got_grads, expected_grads):
        assert g.dtype == torch.float32  # gradients in the parameters' dtype
        torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-3)


def test_chunked_loss_saves_no_tokens_by_vocab_tensor():
    hidden, weight, bias, labels = head_problem(seed=4, batch=4, seq=16)  # 64 tokens × 101 > 101 × 8
    n_tokens = labels.numel()
    assert largest_saved_numel(lambda: plain_loss(hidden.requires_grad_(True), weight.requires_grad_(True),
                                                  labels)) >= n_tokens * VOCAB
    assert largest_saved_numel(lambda: chunked_lm_loss(hidden, weight, labels, 4)) < n_tokens * VOCAB // 4


def largest_saved_numel(fn):
    sizes = [0]

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


# ------------------------------------------------------------------------------------------------ sparse MLM head
def test_select_masked_positions_keeps_order_and_pads_with_ignore_index():
    labels = torch.tensor([[-100, 5, -100, 7, 8], [-100, -100, -100, -100, 9]])
    hidden = torch.arange(10.0).reshape(2, 5, 1)
    got_hidden, got_labels = select_masked_positions(hidden, labels, max_predictions=3)
    assert got_labels.tolist() == [[5, 7, 8], [9, -100, -100]]
    assert got_hidden[0, :, 0].tolist() == [1.0, 3.0, 4.0] and got_hidden[1, 0, 0].item() == 9.0
    assert select_masked_positions(hidden, labels, max_predictions=2)[1].tolist() == [[5, 7], [9, -100]]
    plain_hidden, plain_labels = select_masked_positions(hidden, labels)
    assert plain_labels.tolist() == [5, 7, 8, 9] and plain_hidden[:, 0].tolist() == [1.0, 3.0, 4.0, 9.0]


@pytest.mark.parametrize("max_predictions", [None, 4, 9])
def test_sparse_mlm_loss_equals_dense(max_predictions):
    hidden, weight, bias, labels = head_problem(seed=5)
    labels[:, ::2] = -100  # at most 4 masked tokens per sequence of 9
    transform = torch.nn.Linear(8, 8).double()
    expected, expected_grads = loss_and_grads(lambda h, w, b: plain_loss(transform(h), w, labels, b),
                                              hidden, weight, bias)
    got, got_grads = loss_and_grads(
        lambda h, w, b: sparse_mlm_loss(h, labels, transform, w, b, max_predictions=max_predictions, n_chunks=3),
        hidden, weight, bias)
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_sparse_mlm_cap_below_masked_count_drops_the_last_masked_tokens():
    hidden, weight, bias, labels = head_problem(seed=6)
    kept = labels.clone()
    for row in kept:  # keep the first 2 masked tokens of each sequence
        row[(row != -100).nonzero().flatten()[2:]] = -100
    identity = torch.nn.Identity()
    torch.testing.assert_close(sparse_mlm_loss(hidden, labels, identity, weight, bias, max_predictions=2),
                               plain_loss(hidden, weight, kept, bias))


# ------------------------------------------------------------------------------------------------ patched models
def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB * 5, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).double()


def tiny_bert(cls):
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                        vocab_size=VOCAB, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return cls(config).double()


def tiny_roberta():
    torch.manual_seed(0)
    config = RobertaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                           vocab_size=VOCAB, max_position_embeddings=40, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, pad_token_id=1)
    return RobertaForMaskedLM(config).double()


def causal_batch(vocab=VOCAB * 5, batch=3, seq=12):
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = input_ids.clone()
    labels[0, -4:] = -100  # padding
    return dict(input_ids=input_ids, labels=labels)


def mlm_batch(batch=3, seq=12, with_nsp=False):
    g = torch.Generator().manual_seed(2)
    input_ids = torch.randint(5, VOCAB, (batch, seq), generator=g)
    labels = torch.full_like(input_ids, -100)
    masked = torch.rand(batch, seq, generator=g) < 0.3
    masked[:, 2] = True
    labels[masked] = input_ids[masked]
    out = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
    if with_nsp:
        out["next_sentence_label"] = torch.tensor([0, 1, 1])
    return out


def train_step_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(model, batch, config, rtol=1e-10, **kw):
    expected_loss, expected_grads = train_step_grads(model, batch)
    assert enable_serialized_heads(model, config, **kw) is True
    got_loss, got_grads = train_step_grads(model, batch)
    torch.testing.assert_close(got_loss.to(expected_loss.dtype), expected_loss, rtol=rtol, atol=0)
    assert got_grads.keys() == expected_grads.keys()
    # One absolute floor for all: some gradients are zero up to rounding (attention key biases).
    scale = max(g.abs().max().item() for g in expected_grads.values())
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=rtol, atol=rtol * scale, msg=name)


@pytest.mark.parametrize("config", [ipu_config(embedding=4), ipu_config(projection=5), ipu_config()])
def test_gpt2_patched_loss_and_grads_equal_unpatched(config):
    # GPT-2's own loss upcasts its logits with .float(): float32 even for this float64 model, hence the rtol.
    assert_same_loss_and_grads(tiny_gpt2(), causal_batch(), config, rtol=1e-6)


def test_gpt2_patched_honours_num_items_in_batch():
    model, batch = tiny_gpt2(), causal_batch()
    model.train()
    expected = model(**batch, num_items_in_batch=torch.tensor(50)).loss
    enable_serialized_heads(model, ipu_config(embedding=3))
    torch.testing.assert_close(model(**batch, num_items_in_batch=torch.tensor(50)).loss.float(), expected)


def test_gpt2_patched_keeps_tying_state_dict_and_saves(tmp_path):
    model = tiny_gpt2()
    keys = list(model.state_dict().keys())
    enable_serialized_heads(model, ipu_config(embedding=4))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert list(model.state_dict().keys()) == keys
    model.train()
    out = model(**causal_batch())
    assert out.logits is None and out.loss is not None
    model.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).double()
    torch.testing.assert_close(reloaded.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])


def test_gpt2_patched_saves_no_tokens_by_vocab_tensor():
    model, batch = tiny_gpt2(), causal_batch()  # 36 tokens × 505 vocabulary; 505 × 16 weight
    tokens_by_vocab = batch["input_ids"].numel() * model.config.vocab_size
    model.train()
    assert largest_saved_numel(lambda: model(**batch).loss) >= tokens_by_vocab
    enable_serialized_heads(model, ipu_config(embedding=4))
    assert largest_saved_numel(lambda: model(**batch).loss) < tokens_by_vocab // 2


def test_gpt2_eval_and_no_labels_run_the_original_forward():
    model, batch = tiny_gpt2(), causal_batch()
    model.eval()
    expected = model(**batch)
    enable_serialized_heads(model, ipu_config(embedding=4))
    got = model(**batch)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)
    model.train()
    assert model(input_ids=batch["input_ids"]).logits.shape == (3, 12, model.config.vocab_size)


def test_return_dict_false_gives_a_tuple_with_the_loss_first():
    model, batch = tiny_gpt2(), causal_batch()
    enable_serialized_heads(model, ipu_config(embedding=2))
    model.train()
    out = model(**batch, return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], model(**batch).loss)


@pytest.mark.parametrize("max_predictions", [None, 12])
@pytest.mark.parametrize("config", [ipu_config(), ipu_config(embedding=2)])
def test_bert_mlm_sparse_head_equals_dense(config, max_predictions):
    assert_same_loss_and_grads(tiny_bert(BertForMaskedLM), mlm_batch(), config, max_predictions=max_predictions)


@pytest.mark.parametrize("max_predictions", [None, 8])
def test_bert_pretraining_sparse_head_with_nsp_equals_dense(max_predictions):
    batch = mlm_batch(with_nsp=True)
    assert (batch["labels"] != -100).sum(1).max() <= 8
    assert_same_loss_and_grads(tiny_bert(BertForPreTraining), batch, ipu_config(projection=3),
                               max_predictions=max_predictions)


def test_bert_pretraining_outputs():
    model = tiny_bert(BertForPreTraining)
    keys = list(model.state_dict().keys())
    enable_serialized_heads(model, ipu_config(), max_predictions=8)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert list(model.state_dict().keys()) == keys
    model.train()
    out = model(**mlm_batch(with_nsp=True))
    assert out.prediction_logits is None and out.seq_relationship_logits.shape == (3, 2)
    model.eval()
    out = model(**mlm_batch(with_nsp=True))
    assert out.prediction_logits.shape == (3, 12, VOCAB)
    model.train()
    without_nsp_label = mlm_batch()  # BertForPreTraining computes no loss then: its own forward runs
    out = model(**without_nsp_label)
    assert out.loss is None and out.prediction_logits.shape == (3, 12, VOCAB)


def test_positional_arguments_reach_the_patched_forward():
    model, batch = tiny_gpt2(), causal_batch()
    model.train()
    expected = model(batch["input_ids"], labels=batch["labels"]).loss
    enable_serialized_heads(model, ipu_config(embedding=3))
    out = model(batch["input_ids"], labels=batch["labels"])
    assert out.logits is None
    torch.testing.assert_close(out.loss.float(), expected)


def test_roberta_mlm_sparse_head_equals_dense():
    assert_same_loss_and_grads(tiny_roberta(), mlm_batch(), ipu_config(embedding=2), max_predictions=12)


def test_bert_mlm_eval_mode_returns_full_logits():
    model, batch = tiny_bert(BertForMaskedLM), mlm_batch()
    model.eval()
    expected = model(**batch).logits
    enable_serialized_heads(model, ipu_config(embedding=2))
    torch.testing.assert_close(model(**batch).logits, expected)


def test_unsupported_architecture_is_not_patched():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                                     intermediate_size=32, vocab_size=VOCAB))
    assert enable_serialized_heads(model, ipu_config(embedding=2)) is False
    assert "forward" not in vars(model)


def test_patched_forward_keeps_the_signature_trainers_inspect():
    import inspect

    model = tiny_bert(BertForPreTraining)
    expected = inspect.signature(model.forward)
    enable_serialized_heads(model, ipu_config())
    assert inspect.signature(model.forward) == expected
    assert "next_sentence_label" in inspect.signature(model.forward).parameters


def test_a_deep_copy_of_a_patched_model_uses_its_own_weights():
    import copy

    model, batch = tiny_gpt2(), causal_batch()
    enable_serialized_heads(model, ipu_config(embedding=2))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.transformer.wte.weight.mul_(2.0)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        getattr(clone, mode)()
        assert not torch.allclose(clone(**batch).loss, model(**batch).loss), mode
    assert clone.lm_head.weight is clone.transformer.wte.weight


def test_patching_twice_patches_once():
    model = tiny_gpt2()
    assert enable_serialized_heads(model, ipu_config(embedding=2))
    patched = model.forward
    assert enable_serialized_heads(model, ipu_config(embedding=2))
    assert model.forward is patched


def test_serialization_factor_prefers_projection_then_embedding():
    assert serialization_factor(ipu_config()) == 1
    assert serialization_factor(ipu_config(embedding=4)) == 4
    assert serialization_factor(ipu_config(projection=3)) == 3
    assert serialization_factor(ipu_config(embedding=4, projection=2)) == 2
