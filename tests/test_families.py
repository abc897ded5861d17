"""The model-family registry: each entry finds its layers, head and training forward on a real (tiny) model, every
model type has one entry, and models of other types take the generic rules."""
import os

import pytest
import torch
from transformers import (AutoConfig, AutoModel, BertConfig, BertForMaskedLM, BertForPreTraining,
                          BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, RobertaConfig,
                          RobertaForMaskedLM, XLMRobertaConfig, XLMRobertaForMaskedLM, XLNetConfig, XLNetLMHeadModel)

from ipu_train.loading import max_positions
from ipu_train.pipeline.families import (FAMILIES, family_for_model_type, family_layers, family_of, position_offset,
                                         serialized_head_of, stage0_modules)
from ipu_train.pipeline.stages import transformer_layers
from ipu_train.plan import build_model_skeleton, default_head, shipped_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = 3
_BERT_LIKE = dict(num_hidden_layers=LAYERS, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=64,
                  max_position_embeddings=40)
# Tiny sizes for every registered model type, with LAYERS layers.
TINY = {
    "gpt2": dict(n_layer=LAYERS, n_embd=16, n_head=2, vocab_size=64, n_positions=32),
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "longformer": dict(_BERT_LIKE, attention_window=8),
    "distilbert": dict(n_layers=LAYERS, dim=16, n_heads=2, hidden_dim=32, vocab_size=64, max_position_embeddings=32),
    "albert": dict(_BERT_LIKE, embedding_size=8),
    "xlnet": dict(n_layer=LAYERS, d_model=16, n_head=2, d_inner=32, vocab_size=64),
}
MODEL_TYPES = sorted(TINY)


def tiny_config(model_type):
    return AutoConfig.for_model(model_type, **TINY[model_type])


def on_meta(build):
    with torch.device("meta"):
        return build()


def test_every_model_type_has_one_entry_and_is_a_transformers_type():
    registered = [model_type for family in FAMILIES for model_type in family.model_types]
    assert len(registered) == len(set(registered))
    assert sorted(registered) == MODEL_TYPES  # a new entry needs its tiny sizes here
    for model_type in registered:
        assert AutoConfig.for_model(model_type).model_type == model_type


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("with_head", [True, False], ids=["with its default head", "bare"])
def test_every_family_finds_its_layers(model_type, with_head):
    config = tiny_config(model_type)
    model = on_meta(lambda: build_model_skeleton(config) if with_head else AutoModel.from_config(config))
    family = family_of(model)
    assert family is family_for_model_type(model_type)
    path, layers = family_layers(model)
    assert path == family.layer_paths[0 if with_head else 1]
    assert len(layers) == LAYERS and list(transformer_layers(model)) == list(layers)
    assert all(isinstance(layer, torch.nn.Module) for layer in layers)


def test_albert_layers_repeat_its_shared_group():
    model = on_meta(lambda: AutoModel.from_config(tiny_config("albert")))
    _, layers = family_layers(model)
    assert all(layer is model.encoder.albert_layer_groups[0] for layer in layers)


@pytest.mark.parametrize("model_type, head, model_class", [
    ("gpt2", "causal-lm", "GPT2LMHeadModel"),
    ("bert", "pretraining", "BertForPreTraining"),
    ("roberta", "masked-lm", "RobertaForMaskedLM"),
    ("distilbert", "masked-lm", "DistilBertForMaskedLM"),
    ("albert", "masked-lm", "AlbertForMaskedLM"),
    ("xlnet", "causal-lm", "XLNetLMHeadModel"),
    ("electra", "masked-lm", None),  # no entry: masked LM where the type has it
    ("gpt_neo", "causal-lm", None),  # no entry and no masked LM
])
def test_default_head_of_the_plan_printer(model_type, head, model_class):
    assert default_head(model_type) == head
    if model_class:
        assert type(on_meta(lambda: build_model_skeleton(tiny_config(model_type)))).__name__ == model_class


def test_an_unknown_model_type_falls_back_to_the_longest_module_list():
    config = AutoConfig.for_model("gpt_neo", num_layers=LAYERS, attention_types=[[["global"], LAYERS]],
                                  hidden_size=16, num_heads=2, vocab_size=64, max_position_embeddings=32)
    model = on_meta(lambda: AutoModel.from_config(config))
    assert family_of(model) is None and family_layers(model) is None
    assert transformer_layers(model) is model.h
    assert stage0_modules(model) == [model.wte]


def test_a_model_without_a_config_has_no_family():
    model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)]))
    assert family_of(model) is None and family_layers(model) is None and serialized_head_of(model) is None


@pytest.mark.parametrize("model_class, config, forward, labels", [
    (GPT2LMHeadModel, GPT2Config(**TINY["gpt2"]), "_gpt2_training_forward", ("labels",)),
    (BertForPreTraining, BertConfig(**_BERT_LIKE), "_bert_pretraining_training_forward",
     ("labels", "next_sentence_label")),
    (BertForMaskedLM, BertConfig(**_BERT_LIKE), "_bert_mlm_training_forward", ("labels",)),
    (RobertaForMaskedLM, RobertaConfig(**_BERT_LIKE), "_roberta_mlm_training_forward", ("labels",)),
])
def test_the_four_head_classes_have_their_training_forward(model_class, config, forward, labels):
    head = serialized_head_of(on_meta(lambda: model_class(config)))
    assert head.training_forward.__name__ == forward and head.labels == labels


@pytest.mark.parametrize("model_class, config", [
    (BertForSequenceClassification, BertConfig(**_BERT_LIKE)),
    (XLMRobertaForMaskedLM, XLMRobertaConfig(**_BERT_LIKE)),  # its family's, but not a RobertaForMaskedLM
    (XLNetLMHeadModel, XLNetConfig(**TINY["xlnet"])),
])
def test_other_head_classes_have_none(model_class, config):
    assert serialized_head_of(on_meta(lambda: model_class(config))) is None


@pytest.mark.parametrize("model_type, offset", [
    ("roberta", 2), ("xlm-roberta", 2), ("camembert", 2), ("longformer", 2), ("bert", 0), ("gpt2", 0), ("electra", 0),
])
def test_position_offset_and_the_longest_sequence(model_type, offset):
    config = AutoConfig.for_model(model_type, max_position_embeddings=40, pad_token_id=1)
    assert position_offset(config) == offset
    assert max_positions(config) == 40 - offset


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_stage0_modules_begin_with_the_input_embeddings(model_type):
    model = on_meta(lambda: build_model_skeleton(tiny_config(model_type)))
    assert stage0_modules(model) == [model.get_input_embeddings()]


def test_every_shipped_configuration_has_one_size_in_its_family():
    shipped = [name for family in FAMILIES for name in family.shipped_sizes]
    assert sorted(shipped) == sorted(os.listdir(f"{ROOT}/ipu_configs"))
    for family in FAMILIES:
        for name in family.shipped_sizes:
            config = AutoConfig.for_model(family.model_types[0], **family.shipped_sizes[name].sizes)
            assert shipped_size(f"{ROOT}/ipu_configs/{name}", config.model_type) is family.shipped_sizes[name]


def test_shipped_sizes_are_of_the_familys_first_model_type():
    assert shipped_size(f"{ROOT}/ipu_configs/roberta-base", "roberta").name == "RoBERTa base (roberta-base)"
    assert shipped_size(f"{ROOT}/ipu_configs/roberta-base", "xlm-roberta") is None
    assert shipped_size(f"{ROOT}/ipu_configs/roberta-base", "bert") is None
