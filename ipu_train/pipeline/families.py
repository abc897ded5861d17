"""Model families: what the runtime knows about each architecture it was taught, one entry per family.

An entry says where the repeated layers live, which training forward the serialized heads run for which head
classes, where position ids start, which head the plan printer builds, the sizes each shipped `ipu_configs/`
directory was written for, and which modules go on IPU 0. Teaching the runtime a family is one entry in `FAMILIES`
(plus its JSON in `ipu_configs/`). A model of any other type gets the generic rules: its longest ModuleList holds
the layers (see stages.py), its input embeddings go on IPU 0, and its own forward computes the loss.
"""
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .heads import IGNORE_INDEX, chunked_lm_loss, next_token_labels, sparse_mlm_loss


def input_embeddings(model):
    """IPU 0's modules for most families: the input embeddings, where the forward starts."""
    return [model.get_input_embeddings()]


@dataclass(frozen=True)
class SerializedHead:
    """A head class whose training loss the serialized heads compute (see heads.enable_serialized_heads)."""

    model_class: str  # a transformers class name; its subclasses are served too
    training_forward: Callable  # (model, named inputs, other keyword arguments, n_chunks, max_predictions) -> output
    labels: tuple = ("labels",)  # without all of them the model computes no loss, so its own forward runs


@dataclass(frozen=True)
class ShippedSize:
    """The checkpoint a shipped `ipu_configs/<directory>` was written for, in its published sizes. Keyed by the
    directory's name: ipu_config.json refuses unknown keys, so it cannot say this itself."""

    name: str
    sizes: dict  # AutoConfig.for_model keyword arguments


@dataclass(frozen=True)
class ModelFamily:
    """What the runtime knows about one model family; the defaults are the generic rules."""

    model_types: tuple  # transformers' config.model_type values; the shipped sizes are of the first
    layer_paths: tuple  # where the repeated blocks live: under the model's head first, then in the bare model
    # From the module at a layer path to one entry per layer, where they differ (ALBERT's shared groups).
    layer_list: Optional[Callable] = None
    serialized_heads: tuple = ()  # SerializedHead per head class; none: every class runs its own forward
    positions_after_padding: bool = False  # position ids start at padding_idx + 1 (RoBERTa), so fewer are usable
    default_head: Optional[str] = None  # the head the plan printer builds: causal-lm, masked-lm or pretraining
    shipped_sizes: dict = field(default_factory=dict)  # {ipu_configs directory name: ShippedSize}
    stage0_modules: Callable = input_embeddings  # model -> the modules that begin IPU 0, in the order they run


# --- per-family code ---------------------------------------------------------------------------------------------


def _albert_layers(model, groups):
    """ALBERT shares one group of weights between all its layers: entry i is the group that layer i runs."""
    num_layers = model.config.num_hidden_layers
    per_group = num_layers / model.config.num_hidden_groups
    # transformers' AlbertTransformer runs group int(i / (layers / groups)) for layer i.
    return torch.nn.ModuleList([groups[int(i / per_group)] for i in range(num_layers)])


def _gpt2_training_forward(model, named, extra, n_chunks, max_predictions):
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

    labels = named.pop("labels")
    named.pop("logits_to_keep", None)
    outputs = model.transformer(**named, **extra)
    shift_labels = extra.get("shift_labels")
    if shift_labels is None:
        shift_labels = next_token_labels(labels)
    # The LM head is tied to transformer.wte: its weight is the embedding table.
    loss = chunked_lm_loss(outputs.last_hidden_state, model.lm_head.weight, shift_labels, n_chunks,
                           bias=model.lm_head.bias, num_items_in_batch=extra.get("num_items_in_batch"))
    # The transformer's other outputs (cache, hidden states, attentions) carry the same names in the LM output.
    rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
    return CausalLMOutputWithCrossAttentions(loss=loss, logits=None, **rest)


def _masked_lm_loss(encoder_outputs, labels, transform, decoder, n_chunks, max_predictions):
    # Like the models' own CrossEntropyLoss(): a mean over masked tokens, whatever num_items_in_batch says.
    return sparse_mlm_loss(encoder_outputs.last_hidden_state, labels, transform, decoder.weight, decoder.bias,
                           max_predictions=max_predictions, n_chunks=n_chunks)


def _bert_mlm_training_forward(model, named, extra, n_chunks, max_predictions):
    from transformers.modeling_outputs import MaskedLMOutput

    labels = named.pop("labels")
    outputs = model.bert(**named, **extra, return_dict=True)
    head = model.cls.predictions  # its decoder is tied to bert.embeddings.word_embeddings
    loss = _masked_lm_loss(outputs, labels, head.transform, head.decoder, n_chunks, max_predictions)
    return MaskedLMOutput(loss=loss, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def _bert_pretraining_training_forward(model, named, extra, n_chunks, max_predictions):
    from transformers.models.bert.modeling_bert import BertForPreTrainingOutput

    labels, next_sentence_label = named.pop("labels"), named.pop("next_sentence_label")
    sequence_starts = extra.pop("sequence_starts", None)  # packed rows: each sequence's [CLS] (ipu_train.packing)
    outputs = model.bert(**named, **extra, return_dict=True)
    head = model.cls.predictions
    mlm_loss = _masked_lm_loss(outputs, labels, head.transform, head.decoder, n_chunks, max_predictions)
    pooled = outputs.pooler_output if sequence_starts is None else _pooled_at(model.bert.pooler, outputs,
                                                                              sequence_starts)
    nsp_logits = model.cls.seq_relationship(pooled)
    nsp_loss = F.cross_entropy(nsp_logits.view(-1, 2), next_sentence_label.view(-1), ignore_index=IGNORE_INDEX)
    return BertForPreTrainingOutput(loss=mlm_loss + nsp_loss, prediction_logits=None,
                                    seq_relationship_logits=nsp_logits, hidden_states=outputs.hidden_states,
                                    attentions=outputs.attentions)


def _pooled_at(pooler, encoder_outputs, positions):
    """BertPooler (dense + tanh on a [CLS] token) at each packed sequence's first token: [rows, sequences, hidden]."""
    hidden = encoder_outputs.last_hidden_state
    first_tokens = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
    return pooler.activation(pooler.dense(first_tokens))


def roberta_head_transform(head):
    """RobertaLMHead.forward without its decoder, as a function of the hidden states."""
    from transformers.models.roberta.modeling_roberta import gelu

    return lambda hidden: head.layer_norm(gelu(head.dense(hidden)))


def _roberta_mlm_training_forward(model, named, extra, n_chunks, max_predictions):
    from transformers.modeling_outputs import MaskedLMOutput

    labels = named.pop("labels")
    outputs = model.roberta(**named, **extra, return_dict=True)
    head = model.lm_head  # its decoder is tied to roberta.embeddings.word_embeddings
    loss = _masked_lm_loss(outputs, labels, roberta_head_transform(head), head.decoder, n_chunks, max_predictions)
    return MaskedLMOutput(loss=loss, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


# --- the registry ------------------------------------------------------------------------------------------------

FAMILIES = (
    ModelFamily(
        model_types=("gpt2",),
        layer_paths=("transformer.h", "h"),
        serialized_heads=(SerializedHead("GPT2LMHeadModel", _gpt2_training_forward),),
        default_head="causal-lm",
        shipped_sizes={
            "gpt2": ShippedSize("GPT-2 small (gpt2)", dict(
                vocab_size=50257, n_positions=1024, n_layer=12, n_embd=768, n_head=12)),
            "gpt2-medium": ShippedSize("GPT-2 medium (gpt2-medium)", dict(
                vocab_size=50257, n_positions=1024, n_layer=24, n_embd=1024, n_head=16)),
        },
    ),
    ModelFamily(
        model_types=("bert",),
        layer_paths=("bert.encoder.layer", "encoder.layer"),
        serialized_heads=(
            SerializedHead("BertForPreTraining", _bert_pretraining_training_forward,
                           labels=("labels", "next_sentence_label")),
            SerializedHead("BertForMaskedLM", _bert_mlm_training_forward),
        ),
        default_head="pretraining",
        shipped_sizes={
            "bert-base": ShippedSize("BERT base (bert-base-uncased)", dict(
                vocab_size=30522, num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                intermediate_size=3072)),
            "bert-large": ShippedSize("BERT large (bert-large-uncased)", dict(
                vocab_size=30522, num_hidden_layers=24, hidden_size=1024, num_attention_heads=16,
                intermediate_size=4096)),
        },
    ),
    ModelFamily(
        model_types=("roberta", "xlm-roberta", "camembert"),
        layer_paths=("roberta.encoder.layer", "encoder.layer"),
        serialized_heads=(SerializedHead("RobertaForMaskedLM", _roberta_mlm_training_forward),),
        positions_after_padding=True,
        default_head="masked-lm",
        shipped_sizes={
            "roberta-base": ShippedSize("RoBERTa base (roberta-base)", dict(
                vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072)),
            "roberta-large": ShippedSize("RoBERTa large (roberta-large)", dict(
                vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096)),
        },
    ),
    ModelFamily(
        model_types=("longformer",),
        layer_paths=("longformer.encoder.layer", "encoder.layer"),
        positions_after_padding=True,
        default_head="masked-lm",
    ),
    ModelFamily(
        model_types=("distilbert",),
        layer_paths=("distilbert.transformer.layer", "transformer.layer"),
        default_head="masked-lm",
        shipped_sizes={
            "distilbert-base": ShippedSize("DistilBERT base (distilbert-base-uncased)", dict(
                vocab_size=30522, n_layers=6, dim=768, n_heads=12, hidden_dim=3072)),
        },
    ),
    ModelFamily(
        model_types=("albert",),
        layer_paths=("albert.encoder.albert_layer_groups", "encoder.albert_layer_groups"),
        layer_list=_albert_layers,
        default_head="masked-lm",
        shipped_sizes={
            "albert-base": ShippedSize("ALBERT base (albert-base-v2)", dict(
                vocab_size=30000, embedding_size=128, num_hidden_layers=12, hidden_size=768,
                num_attention_heads=12, intermediate_size=3072)),
        },
    ),
    ModelFamily(
        model_types=("xlnet",),
        layer_paths=("transformer.layer", "layer"),
        default_head="causal-lm",  # run_plm.py's XLNetLMHeadModel
        shipped_sizes={
            "xlnet-base": ShippedSize("XLNet base (xlnet-base-cased)", dict(
                vocab_size=32000, n_layer=12, d_model=768, n_head=12, d_inner=3072)),
        },
    ),
)

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


# --- lookups -----------------------------------------------------------------------------------------------------


def family_for_model_type(model_type) -> Optional[ModelFamily]:
    return _BY_MODEL_TYPE.get(model_type)


def family_of(model) -> Optional[ModelFamily]:
    """The family of a model by its config's model_type; None for an unknown type or a model without a config."""
    return family_for_model_type(getattr(getattr(model, "config", None), "model_type", None))


def family_layers(model):
    """(path of the layer container, one entry per layer) from the model's family, or None where it has no entry
    or none of its paths holds a non-empty ModuleList."""
    family = family_of(model)
    if family is None:
        return None
    for path in family.layer_paths:
        try:
            container = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(container, torch.nn.ModuleList) and len(container):
            return path, family.layer_list(model, container) if family.layer_list else container
    return None


def serialized_head_of(model) -> Optional[SerializedHead]:
    """The serialized head for the model's class, or None for a class without one."""
    import transformers

    for family in FAMILIES:
        for head in family.serialized_heads:
            if isinstance(model, getattr(transformers, head.model_class)):
                return head
    return None


def position_offset(config) -> int:
    """How many position embeddings come before the first token's: padding_idx + 1 where the family starts its
    position ids after the padding index, else 0."""
    family = family_for_model_type(getattr(config, "model_type", ""))
    if family is None or not family.positions_after_padding:
        return 0
    return getattr(config, "pad_token_id", 1) + 1


def stage0_modules(model) -> list:
    """The modules that begin IPU 0's block, in the order they run: the family's, else the input embeddings."""
    family = family_of(model)
    return (family.stage0_modules if family else input_embeddings)(model)


def output_projection(model):
    """The model's vocabulary projection (`get_output_embeddings()`), or None for a model without one."""
    try:
        return model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def tied_head(model):
    """The output projection whose weight is the input embedding's (GPT-2's lm_head, BERT's decoder, ...), or None.
    On IPU it must run where that weight lives, IPU 0: PopTorch cannot share a weight between pipeline stages on
    different IPUs."""
    head = output_projection(model)
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if head is None or embeddings is None or getattr(head, "weight", None) is not embeddings.weight:
        return None
    return head
