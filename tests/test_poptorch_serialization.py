"""ipu_train/backends/poptorch_serialization.py against the strict PopTorch double (tests/poptorch_double.py): the
serialized word embedding and vocabulary projection give the plain modules' outputs and gradients (GPT-2 and BERT,
factors 1, 2 and 4 of vocabularies they do not divide), the weights stay one tied Parameter, the state_dict keys and
saved checkpoints are unchanged, the blocks of splits_per_ipu begin on their IPUs, and what popart refuses when
pipelining is refused."""
import importlib
import sys

import pytest
import torch

from .poptorch_double import _BlockHook
from . import test_poptorch_backend

VOCAB = 101  # prime: no factor above 1 divides it
MODULE = "ipu_train.backends.poptorch_serialization"
backend_poptorch = test_poptorch_backend.poptorch  # its fixture: the strict double installed as poptorch


@pytest.fixture
def poptorch(backend_poptorch, monkeypatch):
    monkeypatch.delitem(sys.modules, MODULE, raising=False)  # imported again, so that it binds this double
    yield backend_poptorch
    sys.modules.pop(MODULE, None)


def serialization():
    return importlib.import_module(MODULE)


def gpt2(tied=True):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32,
                                      tie_word_embeddings=tied, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0)).eval()


def bert(pad_token_id=0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                      intermediate_size=32, vocab_size=VOCAB, max_position_embeddings=32,
                                      pad_token_id=pad_token_id, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)).eval()


def batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 12), generator=generator)
    ids[0, :3] = torch.tensor([0, VOCAB - 1, 50])  # the first and last rows of the table, and a middle one
    labels = ids.clone()
    labels[:, ::3] = -100
    return {"input_ids": ids, "labels": labels}


def run(model, inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_run(reference, serialized, inputs):
    logits, loss, grads = run(reference, inputs)
    s_logits, s_loss, s_grads = run(serialized, inputs)
    torch.testing.assert_close(s_logits, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_loss, loss, rtol=1e-5, atol=1e-6)
    assert s_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(s_grads[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)


def _blocks(model):
    """(module name, IPU) of every block, in module order (as tests/test_poptorch_backend.py reads them)."""
    return [(name, hook._ipu_id) for name, module in model.named_modules()
            for hook in module._forward_pre_hooks.values() if isinstance(hook, _BlockHook)]


@pytest.mark.parametrize("factor", [1, 2, 4])
@pytest.mark.parametrize("make, embedding, head", [
    (gpt2, "transformer.wte", "lm_head"),
    (bert, "bert.embeddings.word_embeddings", "cls.predictions.decoder"),
    (lambda: bert(pad_token_id=VOCAB - 1), "bert.embeddings.word_embeddings", "cls.predictions.decoder"),
], ids=["gpt2", "bert", "bert-padding-in-last-part"])
def test_serialized_embedding_and_projection_match_the_plain_ones(poptorch, make, embedding, head, factor):
    reference, model = make(), make()
    weight = model.get_input_embeddings().weight
    keys = {k: v.shape for k, v in model.state_dict().items()}
    modules = (model.get_input_embeddings(), model.get_output_embeddings())
    assert serialization().serialize_embedding(model, factor, None) == []  # no splits: no blocks of its own
    assert serialization().serialize_projection(model, factor, None) == []
    # the same modules, the same tied Parameter, the same state_dict
    assert (model.get_input_embeddings(), model.get_output_embeddings()) == modules
    assert model.get_submodule(embedding).weight is weight and model.get_submodule(head).weight is weight
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    parts = [len(getattr(m, "parts", [])) for m in modules]
    assert parts == ([0, 0] if factor == 1 else [factor, factor])
    assert_same_run(reference, model, batch())
    if factor > 1:  # the weight's gradient came through the parts' slices, into the one tied Parameter
        assert type(model.get_input_embeddings()).__name__ == "SerializedEmbedding"
        assert type(model.get_output_embeddings()).__name__ == "SerializedProjection"


def test_parts_cover_the_vocabulary_in_nearly_equal_slices(poptorch):
    model = gpt2()
    serialization().serialize_embedding(model, 4)
    rows = [(p.start, p.stop) for p in model.transformer.wte.parts]
    assert rows == [(0, 25), (25, 50), (50, 75), (75, 101)]


def test_half_precision_embedding(poptorch):
    reference, model = gpt2().half(), gpt2().half()
    serialization().serialize_embedding(model, 3)
    ids = batch()["input_ids"]
    assert torch.equal(model.transformer.wte(ids), reference.transformer.wte(ids))


def test_checkpoint_saved_while_serialized_loads_into_plain_transformers(poptorch, tmp_path):
    from transformers import GPT2LMHeadModel

    model, reference = gpt2(), gpt2()
    serialization().serialize_embedding(model, 4)
    serialization().serialize_projection(model, 2)
    with torch.no_grad():
        model.transformer.wte.weight.add_(0.5)  # a trained weight, to see that it is what was saved
        reference.transformer.wte.weight.add_(0.5)
    model.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert loaded.state_dict().keys() == reference.state_dict().keys()
    torch.testing.assert_close(loaded.transformer.wte.weight, reference.transformer.wte.weight)
    assert_same_run(reference, loaded, batch())
    # and the serialized model loads a plain state_dict
    model.load_state_dict(reference.state_dict())


def test_restore_gives_the_plain_modules_back_and_serializing_again_works(poptorch):
    reference, model = gpt2(), gpt2()
    weight, names = model.transformer.wte.weight, [n for n, _ in model.named_modules()]
    serialization().serialize_embedding(model, 1, [2, 1], pipelined=False)
    blocks = serialization().serialize_projection(model, 1, [1, 2], pipelined=False)
    serialization().begin_blocks(blocks)
    serialization().restore(model)
    assert type(model.transformer.wte) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
    assert [n for n, _ in model.named_modules()] == names and _blocks(model) == []
    assert model.lm_head.weight is weight and model.transformer.wte.weight is weight
    assert serialization().serialized_blocks(model) == []
    serialization().serialize_embedding(model, 3)  # another mode's layout
    assert_same_run(reference, model, batch())


def test_splits_begin_a_block_at_the_first_part_of_each_ipu(poptorch):
    model = gpt2()
    emb = serialization().serialize_embedding(model, 1, [0, 2, 1, 0])
    proj = serialization().serialize_projection(model, 1, [1, 0, 0, 3])
    assert [(b.user_id, b.ipu_id) for b in emb] == [("Embedding-0-1", 1), ("Embedding-2", 2)]
    assert [(b.user_id, b.ipu_id) for b in proj] == [("Projection-0", 0), ("Projection-1-3", 3)]
    assert serialization().serialized_blocks(model) == emb + proj  # what place_blocks reads after removeBlocks
    serialization().begin_blocks(serialization().serialized_blocks(model))
    assert _blocks(model) == [("transformer.wte.parts.0", 1), ("transformer.wte.parts.2", 2),
                              ("lm_head.parts.0", 0), ("lm_head.parts.1", 3)]
    poptorch.removeBlocks(model)
    serialization().begin_blocks(serialization().serialized_blocks(model))  # again: no "already assigned"
    assert len(_blocks(model)) == 4


def test_sharded_inference_runs_the_parts_on_their_ipus(poptorch):
    reference, model = gpt2(), gpt2()
    serialization().begin_blocks(serialization().serialize_embedding(model, 1, [2, 2]) +
                                 serialization().serialize_projection(model, 1, [1, 3]))
    opts = poptorch.Options()
    opts.setExecutionStrategy(poptorch.ShardedExecution())  # the backend's inference strategy
    inference = poptorch.inferenceModel(model, options=opts)
    inputs = batch()
    out = inference(**inputs)
    assert inference._trace.stage_manager.used_ipus == {0, 1}
    torch.testing.assert_close(out.logits, reference(**inputs).logits, rtol=1e-5, atol=1e-6)


def test_pipelined_refuses_one_weight_on_several_ipus(poptorch):
    tied, untied = gpt2(), gpt2(tied=False)
    with pytest.raises(ValueError, match=r"IPUs \[0, 1\] \(the tied head runs on IPU 0\).*pipeline.cpp"):
        serialization().serialize_embedding(tied, 1, [1, 1], pipelined=True)
    with pytest.raises(ValueError, match=r"IPUs \[0, 1\] \(the tied head"):
        serialization().serialize_projection(tied, 1, [0, 2], pipelined=True)  # the tied weight is on IPU 0
    with pytest.raises(ValueError, match=r"IPUs \[1, 2\]:?"):
        serialization().serialize_embedding(untied, 1, [0, 1, 1], pipelined=True)
    assert type(tied.transformer.wte) is torch.nn.Embedding  # refused before anything changed
    # allowed: the tied weight's parts all on IPU 0, an untied weight's all on one IPU
    assert [b.ipu_id for b in serialization().serialize_embedding(tied, 1, [2, 0], pipelined=True)] == [0]
    assert [b.ipu_id for b in serialization().serialize_embedding(untied, 1, [0, 3], pipelined=True)] == [1]
    assert [b.ipu_id for b in serialization().serialize_projection(untied, 1, [0, 0, 2], pipelined=True)] == [2]


class _Loss(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels):
        return self.model(input_ids=input_ids, labels=labels).loss


def test_the_double_refuses_a_tied_weight_spread_when_pipelining(poptorch):
    """Why the check above exists: the tied weight on IPUs 0 and 1 of a pipeline is popart's error."""
    model = gpt2()
    serialization().begin_blocks(serialization().serialize_embedding(model, 1, [1, 1]))
    poptorch.BeginBlock(model.transformer.h[0], "Layer0", ipu_id=1)
    poptorch.BeginBlock(model.lm_head, "LMHead", ipu_id=0)
    opts = poptorch.Options()
    opts.Training.gradientAccumulation(8)
    opts.setExecutionStrategy(poptorch.PipelinedExecution(poptorch.AutoStage.AutoIncrement))
    training = poptorch.trainingModel(_Loss(model.train()), options=opts,
                                      optimizer=poptorch.optim.SGD(model.parameters(), lr=0.1))
    inputs = batch()
    inputs = {k: v.repeat(8, 1) for k, v in inputs.items()}
    with pytest.raises(poptorch.Error, match="transformer.wte.weight between virtual graphs"):
        training(**inputs)


def test_refusals(poptorch):
    model = gpt2()
    with pytest.raises(ValueError, match="102 parts for a vocabulary of 101"):
        serialization().serialize_embedding(model, 102)
    with pytest.raises(ValueError, match="give one of them"):
        serialization().serialize_embedding(model, 2, [1, 2])

    class Scaled(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    model.transformer.wte.__class__ = Scaled
    with pytest.raises(ValueError, match="only a plain Embedding can be serialized, not Scaled"):
        serialization().serialize_embedding(model, 2)


def test_a_model_without_a_vocabulary_projection_has_nothing_to_serialize(poptorch):
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                 vocab_size=VOCAB))
    assert serialization().serialize_projection(model, 4, None) == []
    assert serialization().serialize_embedding(model, 1, [1, 1]) != []
