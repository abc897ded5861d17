"""recompute_checkpoint_every_layer: the same loss and gradients, with each layer's forward run again in backward."""
import copy

import torch
from transformers import GPT2Config, GPT2LMHeadModel, XLNetConfig, XLNetLMHeadModel

from ipu_train.pipeline.recompute import enable_recompute
from ipu_train.pipeline.stages import transformer_layers


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def forward_calls(model):
    """Counts runs of each layer's first submodule (a recomputation calls the layer's forward, not its hooks)."""
    counts = []
    for layer in transformer_layers(model):
        next(layer.children()).register_forward_pre_hook(lambda module, args: counts.append(1))
    return counts


def assert_same_training_with_recompute(model, batch):
    model.train()  # dropout is 0 in these configs, so the two runs are deterministic
    plain_loss, plain_grads = loss_and_grads(model, batch)
    recomputed = copy.deepcopy(model)
    how = enable_recompute(recomputed)
    calls = forward_calls(recomputed)
    loss, grads = loss_and_grads(recomputed, batch)
    torch.testing.assert_close(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-6)
    layers = len(transformer_layers(recomputed))
    assert len(calls) == 2 * layers, how  # every layer ran again in backward
    with torch.no_grad():
        calls.clear()
        recomputed(**batch)
    assert len(calls) == layers  # no recomputation without gradients
    return how


def test_hugging_face_models_use_their_own_checkpointing():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    ids = torch.randint(0, 64, (2, 16))
    how = assert_same_training_with_recompute(GPT2LMHeadModel(config), {"input_ids": ids, "labels": ids})
    assert how.startswith("Hugging Face")


def test_models_without_it_get_each_layer_wrapped():
    torch.manual_seed(0)
    config = XLNetConfig(n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, vocab_size=64, dropout=0.0)
    model = XLNetLMHeadModel(config)
    assert not model.supports_gradient_checkpointing
    ids = torch.randint(0, 64, (2, 16))
    how = assert_same_training_with_recompute(model, {"input_ids": ids, "labels": ids})
    assert how.startswith("torch.utils.checkpoint")
