"""Each pipeline stage reads only its own weights from a saved model (issue 14, point 2): safetensors read tensor by
tensor (ipu_train/pipeline/weight_files.py), one file or shards, a base model's checkpoint under its shorter names;
with --pipeline_stages_across_processes, a pretrained model is built with meta weights (ipu_train/loading.py) and
the stages load from its files; where that cannot be, the whole model loads as without stages."""
import types

import pytest
import torch
import transformers

from ipu_train.config import IPUConfig
from ipu_train.loading import build_model, load_config
from ipu_train.pipeline import weight_files
from ipu_train.pipeline.process_stages import build_stage_module, stage_plan_for
from ipu_train.pipeline.weight_files import SavedWeights, deferred_weights, find_saved_weights
from tests.test_process_stages import model_class, save_tiny_model, tiny_config

TWO_STAGES = IPUConfig(layers_per_ipu=[2, 2])


def folder_weights(folder, dtype=None):
    return find_saved_weights(lambda name: str(folder / name), dtype)


def stage_parameters(module):
    return {name.removeprefix("model."): param for name, param in module.named_parameters()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny GPT-2 saved in one file and in several shards; the model itself."""
    root = tmp_path_factory.mktemp("stage_weights")
    save_tiny_model("gpt2", root / "single")
    model = transformers.GPT2LMHeadModel.from_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    return types.SimpleNamespace(root=root, model=model)


def test_sharded_and_single_files_hold_the_same_tensors(saved):
    single, sharded = folder_weights(saved.root / "single"), folder_weights(saved.root / "sharded")
    assert len(set(sharded.files_by_name.values())) > 2  # really shards
    assert set(single.keys()) == set(sharded.keys())
    state = saved.model.state_dict()
    for name in single.keys():
        assert single.shapes[name] == sharded.shapes[name] == tuple(state[name].shape)
        assert torch.equal(sharded.read(name), state[name])


def test_a_stage_from_shards_equals_the_stage_from_the_models_own_weights(saved):
    plan = stage_plan_for(saved.model.config, TWO_STAGES, "GPT2LMHeadModel")
    for index in range(2):
        expected = stage_parameters(build_stage_module(saved.model, plan, index))
        got = stage_parameters(build_stage_module(saved.model.config, plan, index, weights=saved.root / "sharded",
                                                  model_class="GPT2LMHeadModel"))
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.equal(got[name], expected[name]), name


def test_a_stage_reads_its_own_tensors_and_no_other(saved, monkeypatch):
    read = []
    original = SavedWeights.read
    monkeypatch.setattr(SavedWeights, "read", lambda self, name: read.append(name) or original(self, name))
    plan = stage_plan_for(saved.model.config, TWO_STAGES, "GPT2LMHeadModel")
    build_stage_module(saved.model.config, plan, 1, weights=folder_weights(saved.root / "sharded"),
                       model_class="GPT2LMHeadModel")
    assert read and not [name for name in read if name.startswith(("transformer.h.0.", "transformer.h.1.",
                                                                    "transformer.wpe"))]
    assert any(name.startswith("transformer.h.3.") for name in read)
    assert "transformer.wte.weight" in read  # the LM head's tied weight, saved under the embedding's name


def test_a_base_model_checkpoint_loads_under_its_shorter_names(saved, tmp_path):
    """The hub's gpt2 is a GPT2Model checkpoint: `h.0.attn.c_attn.weight`, `wte.weight`, no `transformer.`."""
    saved.model.transformer.save_pretrained(tmp_path)
    weights = folder_weights(tmp_path)
    assert "wte.weight" in weights and "transformer.wte.weight" not in weights
    plan = stage_plan_for(saved.model.config, TWO_STAGES, "GPT2LMHeadModel")
    last = stage_parameters(build_stage_module(saved.model.config, plan, 1, weights=weights,
                                               model_class="GPT2LMHeadModel"))
    assert torch.equal(last["lm_head.weight"], saved.model.lm_head.weight)
    assert torch.equal(last["transformer.h.3.mlp.c_fc.weight"], saved.model.transformer.h[3].mlp.c_fc.weight)


def model_args(path, **changes):
    return types.SimpleNamespace(**{**dict(model_name_or_path=str(path), model_type=None, config_name=None,
                                           config_overrides=None, dtype=None, cache_dir=None, model_revision="main",
                                           token=None, trust_remote_code=False), **changes})


STAGES = types.SimpleNamespace(pipeline_stages_across_processes=True)


def built(path, auto_class=transformers.AutoModelForCausalLM, tokens=None, training_args=STAGES, **changes):
    """build_model as the scripts call it, for a saved folder and a tokenizer of `tokens` tokens."""
    args = model_args(path, **changes)
    config = load_config(args)
    return build_model(args, config, Tokenizer(tokens or config.vocab_size), auto_class, TWO_STAGES, training_args)


class Tokenizer:
    """As much of a tokenizer as build_model reads of a pretrained model's: its length."""

    def __init__(self, tokens):
        self.tokens = tokens

    def __len__(self):
        return self.tokens


def is_meta(model):
    return all(param.is_meta for param in model.parameters())


def test_with_stages_a_pretrained_model_is_built_without_weights_and_the_stages_load_from_its_files(saved):
    model = built(saved.root / "sharded")
    assert is_meta(model) and deferred_weights(model) is not None
    plan = stage_plan_for(model.config, TWO_STAGES, "GPT2LMHeadModel")
    first = stage_parameters(build_stage_module(model, plan, 0))  # as the pipelined backend calls it
    assert torch.equal(first["transformer.h.1.attn.c_attn.weight"], saved.model.transformer.h[1].attn.c_attn.weight)
    assert not is_meta(built(saved.root / "sharded", training_args=None))  # without stages: loaded whole


def test_the_dtype_is_the_flags_or_the_saved_one(saved, tmp_path):
    model = built(saved.root / "single", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and deferred_weights(model).dtype == torch.bfloat16
    plan = stage_plan_for(model.config, TWO_STAGES, "GPT2LMHeadModel")
    assert {p.dtype for p in build_stage_module(model, plan, 1).parameters()} == {torch.bfloat16}
    saved.model.to(torch.bfloat16).save_pretrained(tmp_path)
    saved.model.to(torch.float32)
    assert built(tmp_path).dtype == torch.bfloat16  # as from_pretrained's default ("auto") gives it


@pytest.mark.parametrize("case", ["pytorch_bin", "missing_head", "reshaping_override", "dropping_override",
                                  "larger_tokenizer"])
def test_where_the_stages_cannot_read_the_files_the_whole_model_loads(saved, tmp_path, case, caplog):
    path, auto_class, extra = saved.root / "single", transformers.AutoModelForCausalLM, {}
    if case == "pytorch_bin":  # as older transformers saved models (transformers 5 writes safetensors only)
        saved.model.save_pretrained(tmp_path)
        (tmp_path / "model.safetensors").unlink()
        torch.save(saved.model.state_dict(), tmp_path / "pytorch_model.bin")
        path = tmp_path
    elif case == "missing_head":  # BERT pretraining from a masked-LM checkpoint: no next-sentence head saved
        save_tiny_model("bert-mlm", tmp_path)
        path, auto_class = tmp_path, transformers.AutoModelForPreTraining
    elif case == "reshaping_override":
        extra = dict(config_overrides="n_positions=32")
    elif case == "dropping_override":  # fewer layers than saved: every weight the model has is in the files
        extra = dict(config_overrides="n_layer=2")
    else:
        extra = dict(tokens=tiny_config("gpt2").vocab_size + 3)
    caplog.set_level("INFO", logger="ipu_train")
    if case.endswith("_override"):  # refused by the whole-model loading, as without stages
        with pytest.raises(Exception, match="changes the shape of the pretrained model"):
            built(path, auto_class, **extra)
        return
    model = built(path, auto_class, **extra)
    assert not is_meta(model) and deferred_weights(model) is None
    assert "Every process loads the whole model" in caplog.text


def test_a_folder_without_safetensors_has_no_saved_weights(tmp_path):
    assert weight_files.find_saved_weights(lambda name: str(tmp_path / name)) is None


def test_older_layer_norm_names_load_as_from_pretrained_renames_them(tmp_path):
    """Older BERT checkpoints name layer norms' weights `LayerNorm.gamma` and `LayerNorm.beta`."""
    from safetensors.torch import save_file

    save_tiny_model("bert-mlm", tmp_path)
    model = transformers.BertForMaskedLM.from_pretrained(tmp_path)
    state = {name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"):
             tensor.clone() for name, tensor in model.state_dict().items()
             if name not in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")}  # tied: saved once
    assert any(name.endswith("LayerNorm.gamma") for name in state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    plan = stage_plan_for(model.config, TWO_STAGES, "BertForMaskedLM")
    for index in range(2):
        expected = stage_parameters(build_stage_module(model, plan, index))
        got = stage_parameters(build_stage_module(model.config, plan, index, weights=tmp_path,
                                                  model_class="BertForMaskedLM"))
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
