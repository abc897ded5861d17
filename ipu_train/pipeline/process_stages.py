"""Pipeline stages across processes with `torch.distributed.pipelining`: one stage module per rank, built from the
stage plan, and one optimizer step's micro-batches run through a GPipe, 1F1B or interleaved 1F1B schedule.

Ranks: world size = ranks per pipeline x replicas; replica r holds ranks [r*P, (r+1)*P). Stage s of a replica runs
on its pipeline rank s % P: one stage per rank when the plan has P stages, several virtual stages per rank (looped,
for the interleaved schedule) when it has a multiple of P.

Unlike on IPU, where the tied LM head stays on IPU 0 with its embedding, the head runs on the last stage: it needs
the last layer's hidden states, and sending them back to stage 0 would add a pipeline hop. The last stage holds its
own copy of the embedding weight; after backward the two copies' gradients are summed between the first and last
rank of each replica (as Megatron does), so the same optimizer keeps them equal.

Served: GPT2LMHeadModel, BertForPreTraining, BertForMaskedLM, RobertaForMaskedLM, XLMRobertaForMaskedLM,
DistilBertForMaskedLM and XLNetLMHeadModel. Between stages flow only hidden states, in floating point ((B, S, H);
XLNet's two streams), the same shapes for every micro-batch: torch before 2.13 makes every tensor a stage receives
require a gradient and expects one back for it. The attention mask and the other inputs each stage rebuilds its
attention bias from (`side_names`: token types, XLNet's permutation mask and target mapping) go to every stage by
name, from its own copy of the batch (every process of a replica reads the same micro-batches), rather than a
(B, 1, S, S) tensor being sent. The last stage returns its final hidden states; the schedule's loss function
(`loss`) runs the head on them, the chunked LM loss (GPT-2, XLNet) or the sparse MLM loss (BERT, RoBERTa,
DistilBERT; plus next-sentence prediction for BERT pretraining), against a target tensor: the labels, with BERT's
next-sentence label as one extra column.
"""
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .families import family_layers, output_projection, roberta_head_transform
from .heads import chunked_lm_loss, next_token_labels, sparse_mlm_loss
from .weight_files import SavedWeights, deferred_weights, folder_weights

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


# --- process layout -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineRanks:
    """Where this rank sits in a mesh of `replicas` pipelines of `ranks_per_pipeline` processes each."""

    rank: int
    ranks_per_pipeline: int
    replicas: int
    num_stages: int  # stages of one pipeline (the plan's), a multiple of ranks_per_pipeline

    def __post_init__(self):
        if self.num_stages % self.ranks_per_pipeline:
            raise ValueError(f"{self.num_stages} pipeline stages do not share out over {self.ranks_per_pipeline} "
                             f"ranks per pipeline: use a multiple of it")

    @property
    def replica(self) -> int:
        return self.rank // self.ranks_per_pipeline

    @property
    def pipeline_rank(self) -> int:
        return self.rank % self.ranks_per_pipeline

    @property
    def stage_indices(self) -> list:
        """The stages this rank runs, looped: rank p holds p, p + P, p + 2P, ..."""
        return list(range(self.pipeline_rank, self.num_stages, self.ranks_per_pipeline))

    def pipeline_of(self, replica) -> list:
        return [replica * self.ranks_per_pipeline + p for p in range(self.ranks_per_pipeline)]

    def last_stage_rank(self) -> int:
        """Global rank of this replica's last stage."""
        return self.pipeline_of(self.replica)[(self.num_stages - 1) % self.ranks_per_pipeline]


@dataclass
class PipelineGroups:
    pipeline: dist.ProcessGroup  # the ranks of this rank's replica
    data_parallel: Optional[dist.ProcessGroup]  # the ranks at this pipeline position in every replica; None: 1
    tied: Optional[dist.ProcessGroup]  # this replica's first- and last-stage ranks; None where one rank holds both


def new_pipeline_groups(ranks: PipelineRanks) -> PipelineGroups:
    """The process groups of the mesh. Collective: every rank calls it, in the same order."""
    replicas, per_pipeline = range(ranks.replicas), ranks.ranks_per_pipeline
    pipeline, _ = dist.new_subgroups_by_enumeration([ranks.pipeline_of(r) for r in replicas])
    data_parallel = None
    if ranks.replicas > 1:
        data_parallel, _ = dist.new_subgroups_by_enumeration(
            [[r * per_pipeline + p for r in replicas] for p in range(per_pipeline)])
    tied = None
    last = (ranks.num_stages - 1) % per_pipeline
    if last != 0:
        tied, _ = dist.new_subgroups_by_enumeration([[r * per_pipeline, r * per_pipeline + last] for r in replicas])
    return PipelineGroups(pipeline=pipeline, data_parallel=data_parallel, tied=tied)


# --- stage modules -------------------------------------------------------------------------------------------------


class _StageModule(nn.Module):
    """One pipeline stage of a model whose other stages were pruned away before any weight was allocated.

    `self.model` is the model with only this stage's modules left (the others set to None), so parameter names are
    the model's own (`transformer.h.2.attn.c_attn.weight`). Subclasses say which modules begin and end the model,
    and how its embeddings, attention bias, layers, final modules and loss run."""

    model_class = None  # the transformers class name served
    model_type = None  # its config's model_type
    first_modules = ()  # module paths only the first stage keeps
    last_modules = ()  # module paths only the last stage keeps
    side_names = ("attention_mask",)  # what every stage reads from the batch by name, beside what flows in

    def __init__(self, model, layer_indices, is_first, is_last, n_chunks=1, max_predictions=None, recompute=False):
        super().__init__()
        self.recompute = recompute
        self.model = model
        self.layer_indices = list(layer_indices)
        self.is_first, self.is_last = is_first, is_last
        self.n_chunks, self.max_predictions = n_chunks, max_predictions

    @property
    def layers(self):
        """The model's layer list, other stages' entries None (a property: the state dict names each weight once)."""
        return family_layers(self.model)[1]

    def forward(self, *flowing, **side):
        """The first stage's `flowing` is the input ids, the others' the hidden states the previous stage sent;
        `side`: the batch's inputs of `side_names`, each stage's own copy."""
        hidden = self.embed(*flowing, **side) if self.is_first else flowing
        context = self.layer_context(hidden, **side)
        layers = self.layers
        for index in self.layer_indices:
            if self.recompute and torch.is_grad_enabled():  # recompute_checkpoint_every_layer
                hidden = checkpoint(self.run_layer, layers[index], hidden, context, use_reentrant=False)
            else:
                hidden = self.run_layer(layers[index], hidden, context)
        if self.is_last:
            return self.finish(*hidden)
        return tuple(hidden)

    def tied_weight(self) -> Optional[nn.Parameter]:
        """This stage's copy of the weight shared by the input embedding and the LM head, if it holds one."""
        if self.is_first:
            return self.model.get_input_embeddings().weight
        if self.is_last:
            return output_projection(self.model).weight
        return None

    @classmethod
    def stage_inputs(cls, batch) -> tuple:
        """(the first stage's positional inputs: the input ids; every stage's inputs by name) of a batch dict."""
        batch = cls.with_defaults(dict(batch))
        return (batch["input_ids"],), {name: batch[name] for name in cls.side_names}

    @classmethod
    def with_defaults(cls, batch):
        """The batch with what the model assumes of an input it lacks: an all-ones attention mask."""
        batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
        return batch

    @staticmethod
    def loss_target(batch):
        """What the last stage's loss compares with: the labels (B, S)."""
        return batch["labels"]

    def masked_lm_loss(self, hidden, labels, transform, decoder):
        """The sparse MLM loss, as the families' training forwards compute it: a mean over masked tokens."""
        return sparse_mlm_loss(hidden, labels, transform, decoder.weight, decoder.bias,
                               max_predictions=self.max_predictions, n_chunks=self.n_chunks)

    @staticmethod
    def logits_row_shapes(batch, vocab_size):
        """The shape of one row of each of logits()'s outputs, for the stages that hold none: a logit per token and
        vocabulary entry."""
        return {"logits": (batch["input_ids"].shape[1], vocab_size)}

    # Per family: embed(input_ids, **side) -> hidden (a tuple); layer_context(hidden, **side): what every layer
    # needs, rebuilt on each stage (the attention bias); run_layer(layer, hidden, context) -> hidden;
    # finish(*hidden); loss(finished, target); logits(finished) -> the logits the model's own output names
    # (evaluation, on the last stage); with_defaults(batch), loss_target(batch) and logits_row_shapes where they
    # differ.


class GPT2Stage(_StageModule):
    model_class = "GPT2LMHeadModel"
    model_type = "gpt2"
    first_modules = ("transformer.wte", "transformer.wpe")
    last_modules = ("transformer.ln_f", "lm_head")

    def embed(self, input_ids, attention_mask):
        transformer = self.model.transformer
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return (transformer.drop(transformer.wte(input_ids) + transformer.wpe(positions)),)

    def layer_context(self, hidden, attention_mask):
        from transformers.masking_utils import create_causal_mask

        positions = torch.arange(hidden[0].shape[1], device=hidden[0].device).unsqueeze(0)
        return create_causal_mask(config=self.model.config, inputs_embeds=hidden[0], attention_mask=attention_mask,
                                  cache=None, position_ids=positions)

    def run_layer(self, layer, hidden, bias):
        return (layer(hidden[0], None, bias),)

    def finish(self, hidden):
        return self.model.transformer.ln_f(hidden)

    def loss(self, hidden, labels):
        """As GPT2LMHeadModel's: position t predicts token t + 1, the mean over labelled tokens."""
        head = self.model.lm_head
        return chunked_lm_loss(hidden, head.weight, next_token_labels(labels), self.n_chunks, bias=head.bias)

    def logits(self, hidden):
        return {"logits": self.model.lm_head(hidden)}


class _EncoderStage(_StageModule):
    """BERT-like encoders: embeddings of tokens and segments (positions after the padding index for RoBERTa, as
    its embeddings module counts them), a bidirectional attention bias from the 2-D mask."""

    side_names = ("attention_mask", "token_type_ids")

    def embed(self, input_ids, attention_mask, token_type_ids):
        return (self.model.base_model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids),)

    def layer_context(self, hidden, attention_mask, token_type_ids):
        bias, _ = self.model.base_model._create_attention_masks(attention_mask, None, hidden[0], None, None)
        return bias

    def run_layer(self, layer, hidden, bias):
        return (layer(hidden[0], attention_mask=bias),)

    def finish(self, hidden):
        return hidden

    @classmethod
    def with_defaults(cls, batch):
        """Segment 0 throughout where the batch has no token_type_ids: what the embeddings use without them."""
        batch.setdefault("token_type_ids", torch.zeros_like(batch["input_ids"]))
        return super().with_defaults(batch)


class BertPreTrainingStage(_EncoderStage):
    model_class = "BertForPreTraining"
    model_type = "bert"
    first_modules = ("bert.embeddings",)
    last_modules = ("bert.pooler", "cls")

    def finish(self, hidden):
        return hidden, self.model.bert.pooler(hidden)

    def loss(self, outputs, target):
        """As BertForPreTraining's: masked-LM mean over masked tokens plus next-sentence cross-entropy. `target`
        is the labels (B, S) with the next-sentence label as column S."""
        hidden, pooled = outputs
        labels, next_sentence_label = target[:, :-1], target[:, -1]
        head = self.model.cls
        mlm = self.masked_lm_loss(hidden, labels, head.predictions.transform, head.predictions.decoder)
        return mlm + F.cross_entropy(head.seq_relationship(pooled), next_sentence_label)

    @staticmethod
    def loss_target(batch):
        return torch.cat([batch["labels"], batch["next_sentence_label"].reshape(-1, 1)], dim=1)

    def logits(self, outputs):
        prediction_logits, seq_relationship_logits = self.model.cls(*outputs)
        return {"prediction_logits": prediction_logits, "seq_relationship_logits": seq_relationship_logits}

    @staticmethod
    def logits_row_shapes(batch, vocab_size):
        return {"prediction_logits": (batch["input_ids"].shape[1], vocab_size), "seq_relationship_logits": (2,)}


class BertMaskedLMStage(_EncoderStage):
    model_class = "BertForMaskedLM"
    model_type = "bert"
    first_modules = ("bert.embeddings",)
    last_modules = ("cls",)

    def loss(self, hidden, labels):
        """As BertForMaskedLM's: the mean over masked tokens (the decoder tied to the word embeddings)."""
        predictions = self.model.cls.predictions
        return self.masked_lm_loss(hidden, labels, predictions.transform, predictions.decoder)

    def logits(self, hidden):
        return {"logits": self.model.cls(hidden)}


class RobertaMaskedLMStage(_EncoderStage):
    model_class = "RobertaForMaskedLM"
    model_type = "roberta"
    first_modules = ("roberta.embeddings",)
    last_modules = ("lm_head",)

    def loss(self, hidden, labels):
        """As RobertaForMaskedLM's: the mean over masked tokens (the decoder tied to the word embeddings)."""
        head = self.model.lm_head
        return self.masked_lm_loss(hidden, labels, roberta_head_transform(head), head.decoder)

    def logits(self, hidden):
        return {"logits": self.model.lm_head(hidden)}


class XLMRobertaMaskedLMStage(RobertaMaskedLMStage):
    model_class = "XLMRobertaForMaskedLM"
    model_type = "xlm-roberta"


class DistilBertMaskedLMStage(_StageModule):
    """DistilBertForMaskedLM: embeddings of tokens and positions (no segments), a bidirectional attention bias from
    the 2-D mask, and its head: transform, activation and layer norm, then the projector tied to the word
    embeddings."""

    model_class = "DistilBertForMaskedLM"
    model_type = "distilbert"
    first_modules = ("distilbert.embeddings",)
    last_modules = ("vocab_transform", "vocab_layer_norm", "vocab_projector")

    def embed(self, input_ids, attention_mask):
        return (self.model.distilbert.embeddings(input_ids),)

    def layer_context(self, hidden, attention_mask):
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden[0],
                                         attention_mask=attention_mask)

    def run_layer(self, layer, hidden, bias):
        return (layer(hidden[0], attention_mask=bias),)

    def finish(self, hidden):
        return hidden

    def head_transform(self, hidden):
        model = self.model
        return model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))

    def loss(self, hidden, labels):
        """As DistilBertForMaskedLM's: the mean cross-entropy over the masked tokens."""
        return self.masked_lm_loss(hidden, labels, self.head_transform, self.model.vocab_projector)

    def logits(self, hidden):
        return {"logits": self.model.vocab_projector(self.head_transform(hidden))}


class XLNetStage(_StageModule):
    """XLNetLMHeadModel as run_plm.py trains it: two-stream attention, mems off. Between stages flow both streams
    in XLNet's own layout, output_h (S, B, H) and output_g (P, B, H); every stage rebuilds its masks from the batch's
    attention_mask (B, S), perm_mask (B, S, S), target_mapping (B, P, S) and token_type_ids (B, S), or (B, 0) for a
    batch without segments (the model then adds no segment term). The relative positional encoding depends
    only on the shapes: each stage computes its own (its dropout mask is the stage's)."""

    model_class = "XLNetLMHeadModel"
    model_type = "xlnet"
    first_modules = ("transformer.word_embedding", "transformer.mask_emb")
    last_modules = ("lm_loss",)
    side_names = ("attention_mask", "perm_mask", "target_mapping", "token_type_ids")

    def embed(self, input_ids, attention_mask, perm_mask, target_mapping, token_type_ids):
        transformer = self.model.transformer
        output_h = transformer.dropout(transformer.word_embedding(input_ids.t()))
        output_g = transformer.dropout(transformer.mask_emb.expand(target_mapping.shape[1], input_ids.shape[0], -1))
        return output_h, output_g

    def layer_context(self, hidden, attention_mask, perm_mask, target_mapping, token_type_ids):
        """As XLNetModel.forward without mems: the query stream's mask, the content stream's (which also sees its
        own token), the relative positional encoding, the segment matrix, the target mapping (P, S, B)."""
        transformer, dtype = self.model.transformer, self.model.dtype
        length, batch = attention_mask.shape[1], attention_mask.shape[0]
        data_mask = (1.0 - attention_mask.t())[None] + perm_mask.permute(1, 2, 0)
        query_mask = data_mask[:, :, :, None]
        if transformer.attn_type == "uni":
            query_mask = query_mask + transformer.create_mask(length, 0)[:, :, None, None]
        query_mask = (query_mask > 0).to(dtype)
        not_self = -torch.eye(length, device=query_mask.device, dtype=dtype)
        content_mask = ((query_mask + not_self[:, :, None, None]) > 0).to(dtype)
        positions = transformer.dropout(transformer.relative_positional_encoding(length, length, bsz=batch,
                                                                                 device=query_mask.device))
        return content_mask, query_mask, positions, self._segments(token_type_ids, dtype), \
            target_mapping.permute(1, 2, 0)

    @staticmethod
    def _segments(token_type_ids, dtype):
        """XLNet's seg_mat (S, S, B, 2): one-hot of "not in the same segment"; None for a batch without segments."""
        if token_type_ids.shape[1] == 0:
            return None
        segments = token_type_ids.t()
        return F.one_hot((segments[:, None] != segments[None, :]).long(), num_classes=2).to(dtype)

    def run_layer(self, layer, hidden, context):
        content_mask, query_mask, positions, segments, target_mapping = context
        output_h, output_g = hidden
        return layer(output_h, output_g, attn_mask_h=content_mask, attn_mask_g=query_mask, r=positions,
                     seg_mat=segments, target_mapping=target_mapping)[:2]

    def finish(self, output_h, output_g):
        return self.model.transformer.dropout(output_g).permute(1, 0, 2)

    def loss(self, hidden, labels):
        """As XLNetLMHeadModel's: the mean cross-entropy over the labelled predictions (lm_loss tied to the word
        embedding)."""
        head = self.model.lm_loss
        return chunked_lm_loss(hidden, head.weight, labels, self.n_chunks, bias=head.bias)

    def logits(self, hidden):
        return {"logits": self.model.lm_loss(hidden)}

    @staticmethod
    def logits_row_shapes(batch, vocab_size):  # one row of logits per predicted position (target_mapping's 2nd axis)
        return {"logits": (batch["target_mapping"].shape[1], vocab_size)}

    @classmethod
    def with_defaults(cls, batch):
        """An empty token_type_ids where the batch has none: the model then builds no segment matrix."""
        batch.setdefault("token_type_ids", batch["input_ids"][:, :0])
        return super().with_defaults(batch)


STAGE_CLASSES = (GPT2Stage, BertPreTrainingStage, BertMaskedLMStage, RobertaMaskedLMStage, XLMRobertaMaskedLMStage,
                 DistilBertMaskedLMStage, XLNetStage)


def stage_class_for(config, model_class=None):
    """The stage class of the transformers class named `model_class`; without one, the first class served for the
    config's model type (the heads differ, the layers and so the stage plan do not)."""
    served = [stage_class for stage_class in STAGE_CLASSES if stage_class.model_type == config.model_type]
    if not served:
        raise ValueError(f"no pipeline stages across processes for model type {config.model_type!r} yet: "
                         f"{', '.join(dict.fromkeys(c.model_type for c in STAGE_CLASSES))} have them")
    chosen = [c for c in served if c.model_class == model_class] if model_class else served[:1]
    if not chosen:
        raise ValueError(f"pipeline stages across processes serve {' and '.join(c.model_class for c in served)} "
                         f"for model type {config.model_type!r}, not {model_class}")
    return chosen[0]


def stage_plan_for(config, ipu_config, model_class=None):
    """The stage plan of the model `config` describes (of the transformers class `model_class`, else the model
    type's first served), from a model with no weights allocated."""
    from .stages import build_stage_plan

    return build_stage_plan(_empty_model(stage_class_for(config, model_class), config), ipu_config)


def build_stage_module(model_or_config, stage_plan, stage_index, weights=None, device="cpu", n_chunks=1,
                       max_predictions=None, recompute=False, model_class=None) -> _StageModule:
    """The module of pipeline stage `stage_index` of `stage_plan`, with only that stage's weights, on `device`.

    `model_or_config`: a model (the weights are its own, or the saved weights it was built to read later, unless
    `weights` is given) or its config, with `model_class` the name of the transformers class to build (default:
    the model type's first served). `weights`: a state dict, SavedWeights, a safetensors file or a model folder
    (single or sharded safetensors), read one tensor at a time so that the other stages' weights are never loaded.
    The model is built with parameters on the meta device, pruned to the stage, then loaded; a weight is read under
    whichever of its names the weights store (see stored_names: the last stage's LM head from the embedding's).
    `n_chunks`, `max_predictions`: as for the serialized heads;
    `recompute`: activation checkpointing around each layer."""
    config = getattr(model_or_config, "config", model_or_config)
    if config is not model_or_config:
        model_class = type(model_or_config).__name__
        if weights is None:  # the saved weights of a model built without them (loading.py), else its own
            weights = deferred_weights(model_or_config)
        if weights is None:
            weights = model_or_config.state_dict()
    stage_class = stage_class_for(config, model_class)
    if weights is None:
        raise ValueError("build_stage_module needs weights (a state dict or a safetensors path) with a config")
    model = _empty_model(stage_class, config)
    num_stages = len(stage_plan.stages)
    is_first, is_last = stage_index == 0, stage_index == num_stages - 1
    layer_indices = stage_plan.stages[stage_index].layers
    shared_names = _shared_names(model)
    _prune(model, stage_class, layer_indices, is_first, is_last)
    _load(model, weights, device, shared_names)
    _retie(model, shared_names)
    return stage_class(model, layer_indices, is_first, is_last, n_chunks, max_predictions, recompute)


def _empty_model(stage_class, config):
    """The model with every parameter on the meta device (no memory); buffers are real (position ids, ...)."""
    import transformers
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = getattr(transformers, stage_class.model_class)(config)
    model.tie_weights()  # the context's parameter hook gave each tied name its own meta tensor
    return model


def _shared_names(model):
    """{parameter name: every name of that tensor}: tied weights have several (GPT-2's transformer.wte.weight and
    lm_head.weight, BERT's decoder bias and cls.predictions.bias), and saved weights keep only one of them."""
    by_tensor = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    return {name: names for names in by_tensor.values() for name in names}


def _prune(model, stage_class, layer_indices, is_first, is_last):
    """Drop what another stage runs: the first stage's modules, the last stage's, the other layers."""
    dropped = (() if is_first else stage_class.first_modules) + (() if is_last else stage_class.last_modules)
    for path in dropped:
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, None)
    layers = family_layers(model)[1]
    keep = set(layer_indices)
    for index in range(len(layers)):
        if index not in keep:
            layers[index] = None


def _load(model, weights, device, shared_names):
    """Replace the model's meta parameters with the stage's tensors from `weights`, on `device`."""
    weights = _as_saved_weights(weights)
    found = _all_stored(model, weights, shared_names)
    state = {name: weights.read(stored).to(device) for name, stored in found.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device)  # the buffers


def stored_names(model, weights, shared_names=None):
    """({name in the model's state dict: the name `weights` hold it under}, [names held under none]). A weight is
    read under its own name or a tied weight's other name, either also without the base model's prefix (a
    checkpoint of the base model, as the hub's gpt2 is: `h.0.attn.c_attn.weight`), or under the older names of
    layer norms' weights that from_pretrained renames (`LayerNorm.gamma` and `.beta`, older BERT checkpoints)."""
    shared_names = _shared_names(model) if shared_names is None else shared_names
    prefix = model.base_model_prefix + "."
    found, missing = {}, []
    for name in model.state_dict():
        candidates = [older for own in shared_names.get(name, [name]) for form in (own, own.removeprefix(prefix))
                      for older in (form, *_legacy_names(form))]
        stored = next((candidate for candidate in candidates if candidate in weights), None)
        if stored is None:
            missing.append(name)
        else:
            found[name] = stored
    return found, missing


def _all_stored(model, weights, shared_names):
    """stored_names' found names, every one of the model's: a name the weights lack is an error."""
    found, missing = stored_names(model, weights, shared_names)
    if missing:
        raise ValueError(f"the weights lack {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
    return found


def _legacy_names(name):
    """The names older checkpoints give a layer norm's weight and bias."""
    for current, older in LEGACY_LAYER_NORM_NAMES:
        if name.endswith(current):
            return [name[:-len(current)] + older]
    return []


LEGACY_LAYER_NORM_NAMES = (("LayerNorm.weight", "LayerNorm.gamma"), ("LayerNorm.bias", "LayerNorm.beta"))


def unloadable_names(model, weights):
    """The names of the model's state dict (a model with meta weights will do) that `weights` (SavedWeights) do not
    hold in the model's shape: missing, or saved in another shape. Reads no tensor."""
    found, missing = stored_names(model, weights)
    state = model.state_dict()
    return missing + [name for name, stored in found.items() if weights.shapes[stored] != tuple(state[name].shape)]


def copy_saved_weights(pipeline, weights, model):
    """Saved weights copied into this rank's stages in place (the optimizer keeps its parameters). `model`: the
    whole model (meta weights will do), whose tied names say where a stage's copy of a tied weight is saved."""
    shared_names = _shared_names(model)
    with torch.no_grad():
        for module in pipeline.modules:
            found = _all_stored(module.model, weights, shared_names)
            for name, param in module.model.named_parameters():
                param.copy_(weights.read(found[name]))


def _retie(model, shared_names):
    """Loading assigns each name its own tensor: make the names of one weight that this stage holds share it again
    (BERT's decoder bias; on a single stage, the LM head and the embedding)."""
    held = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for name in held:
        first = next(n for n in shared_names[name] if n in held)
        if first != name:
            owner_path, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner_path), attribute, model.get_parameter(first))


def _as_saved_weights(weights):
    """A state dict as it is; a safetensors file, or a model folder, as SavedWeights."""
    if isinstance(weights, SavedWeights):
        return weights
    if isinstance(weights, dict):
        return _StateDictWeights(weights)
    path = os.fspath(weights)
    if os.path.isdir(path):
        return folder_weights(path)
    return SavedWeights.from_files([path])


class _StateDictWeights(dict):
    """A state dict read as SavedWeights: each tensor a copy, so that the stage never shares the model's."""

    def read(self, name):
        return self[name].detach().clone()


# --- schedules ---------------------------------------------------------------------------------------------------


@dataclass
class ProcessPipeline:
    """This rank's part of one replica's pipeline: its stage modules (in stage order), training's schedule, and
    evaluation's, each over `PipelineStage`s of its own made by `new_schedule`: a pipeline stage fixes the shapes
    it sends and receives at its first step (torch before 2.13 never reads them again), and evaluation batches may
    differ from training's."""

    ranks: PipelineRanks
    groups: PipelineGroups
    modules: list
    new_schedule: Callable  # () -> a schedule over new PipelineStage objects of `modules`
    schedule: object = None
    _evaluation_schedule: object = None

    def __post_init__(self):
        self.schedule = self.new_schedule()

    def evaluation_schedule(self):
        if self._evaluation_schedule is None:
            self._evaluation_schedule = self.new_schedule()
        return self._evaluation_schedule

    def parameters(self):
        """What the optimizer steps: every stage module's parameters, the tied copy included."""
        return [param for module in self.modules for param in module.parameters()]

    @property
    def holds_first(self):
        return self.modules[0].is_first

    @property
    def holds_last(self):
        return self.modules[-1].is_last


def build_process_pipeline(ranks, groups, modules, n_microbatches, schedule="1f1b", device="cpu",
                           loss_scale=None) -> ProcessPipeline:
    """Wrap this rank's stage modules (one per entry of `ranks.stage_indices`) in `PipelineStage`s and a schedule.
    `n_microbatches`: gradient_accumulation_steps. Shapes between stages are inferred from the first micro-batch
    (every micro-batch must have the same). The schedule scales gradients by 1 / n_microbatches: each micro-batch's
    loss is its mean, so the step's gradient is that of the mean over micro-batches, as under accumulation.
    `loss_scale`: a PipelineLossScale (fp16), whose scale the last stage's backward starts from."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    from torch.distributed import pipelining

    if schedule != "interleaved_1f1b" and len(modules) > 1:
        raise ValueError(f"the {schedule} schedule runs one stage per rank; {len(modules)} stages share each rank "
                         f"here: use interleaved_1f1b")
    # Every rank passes a loss function: without one the schedule runs no backward. Only the last stage calls it.
    loss_fn = modules[-1].loss if modules[-1].is_last else _loss_on_the_last_stage_only
    if loss_scale is not None and modules[-1].is_last:
        unscaled_loss = loss_fn

        def loss_fn(output, target):
            return loss_scale.scaled_backward(unscaled_loss(output, target))

    def new_schedule():
        stages = [pipelining.PipelineStage(module, index, ranks.num_stages, torch.device(device),
                                           group=groups.pipeline)
                  for index, module in zip(ranks.stage_indices, modules)]
        if schedule == "interleaved_1f1b":
            return pipelining.ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn)
        single = {"gpipe": pipelining.ScheduleGPipe, "1f1b": pipelining.Schedule1F1B}[schedule]
        return single(stages[0], n_microbatches, loss_fn=loss_fn)

    return ProcessPipeline(ranks=ranks, groups=groups, modules=list(modules), new_schedule=new_schedule)


def estimated_bubble(processes_per_pipeline, micro_batches, stages_per_process=1) -> float:
    """The fraction of a step each process idles, filling and draining the pipeline, with equal stages and no
    communication cost: (P - 1) / (m + P - 1) for GPipe and 1F1B; interleaving v virtual stages per process divides
    it by v (Narayanan et al., 2021)."""
    p = processes_per_pipeline
    return (p - 1) / (micro_batches + p - 1) / stages_per_process


def _loss_on_the_last_stage_only(output, target):
    raise RuntimeError("the pipeline's loss runs on the last stage's rank only")


def pipeline_train_step(pipeline: ProcessPipeline, micro_batches, device="cpu") -> torch.Tensor:
    """Forward and backward of one optimizer step's micro-batches (equal-sized batch dicts; every rank passes the
    same ones of its replica), then the gradient syncs: the tied weight's copies summed, the replicas averaged.
    The caller steps the optimizer. Returns the mean loss over the micro-batches (and replicas) on every rank."""
    batch = {key: torch.cat([mb[key] for mb in micro_batches]).to(device) for key in micro_batches[0]}
    inputs, keywords = _schedule_arguments(pipeline, batch)
    pipeline.schedule.step(*inputs, return_outputs=False, **keywords)
    sync_tied_gradients(pipeline)
    average_replica_gradients(pipeline)
    return _mean_loss(pipeline, keywords["losses"], device)


def pipeline_forward_step(pipeline: ProcessPipeline, batch):
    """One evaluation step (a batch of the step's micro-batches) through the evaluation schedule, forward only: the
    last stage's loss per micro-batch and its final outputs, the micro-batches' concatenated (None and None on the
    other ranks)."""
    inputs, keywords = _schedule_arguments(pipeline, batch)
    outputs = pipeline.evaluation_schedule().eval(*inputs, **keywords)
    return keywords["losses"], outputs


def _schedule_arguments(pipeline, batch):
    """A schedule call's positional inputs (the first stage's) and keywords (the last stage's loss target and list
    of losses, every stage's inputs by name) for this rank, from a step's batch."""
    stage_class = type(pipeline.modules[0])
    inputs, side = stage_class.stage_inputs(batch)
    target = stage_class.loss_target(batch) if pipeline.holds_last else None
    losses = [] if pipeline.holds_last else None
    return (inputs if pipeline.holds_first else ()), dict(target=target, losses=losses, **side)


def sync_tied_gradients(pipeline: ProcessPipeline):
    """Sum the gradients of the embedding weight's copies (first stage) and the LM head's (last stage): each then
    holds the full gradient of the shared weight, as in one process."""
    copies = [w for w in (module.tied_weight() for module in pipeline.modules) if w is not None and w.grad is not None]
    if not copies:
        return
    total = torch.stack([w.grad for w in copies]).sum(0)
    if pipeline.groups.tied is not None:
        dist.all_reduce(total, group=pipeline.groups.tied)
    for weight in copies:
        weight.grad.copy_(total)


def average_replica_gradients(pipeline: ProcessPipeline):
    """Average every gradient over the replicas, in one flat buffer per call."""
    group = pipeline.groups.data_parallel
    if group is None:
        return
    grads = [p.grad for p in pipeline.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= pipeline.ranks.replicas
    for grad, piece in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(piece.view_as(grad))


def _mean_loss(pipeline, losses, device):
    """The last stage's mean micro-batch loss, broadcast over the pipeline and averaged over the replicas."""
    loss = torch.stack(losses).detach().mean().float() if losses else torch.zeros((), device=device)
    dist.broadcast(loss, src=pipeline.ranks.last_stage_rank(), group=pipeline.groups.pipeline)
    if pipeline.groups.data_parallel is not None:
        dist.all_reduce(loss, group=pipeline.groups.data_parallel)
        loss /= pipeline.ranks.replicas
    return loss


def pipeline_optimizer_step(pipeline: ProcessPipeline, optimizer, max_grad_norm=None, loss_scale=None):
    """After pipeline_train_step: the gradients unscaled (fp16: `loss_scale`), clipped by the global norm, the
    optimizer's step (skipped on every process where a scaled step overflowed on any), the scale updated. Returns
    the global gradient norm, None without clipping."""
    if loss_scale is not None:
        loss_scale.unscale_(pipeline.parameters())
    grad_norm = clip_global_grad_norm(pipeline, max_grad_norm) if max_grad_norm and max_grad_norm > 0 else None
    if loss_scale is None:
        optimizer.step()
    else:
        loss_scale.step(optimizer)
        loss_scale.update()
    return grad_norm


def clip_global_grad_norm(pipeline: ProcessPipeline, max_norm) -> torch.Tensor:
    """Clip every stage's gradients by the norm of the whole model's gradient, as one process would: the squared
    norms of the stages are summed over the pipeline (the tied weight counted once, on the first stage) without a
    host read. Replicas hold equal gradients once averaged, so the pipeline's norm is the replica's. Returns it."""
    counted = [p.grad for module in pipeline.modules for p in _norm_parameters(module) if p.grad is not None]
    squared = torch.nn.utils.get_total_norm(counted, foreach=True) ** 2 if counted else _zero_of(pipeline)
    dist.all_reduce(squared, group=pipeline.groups.pipeline)
    total = squared.sqrt()
    torch.nn.utils.clip_grads_with_norm_(pipeline.parameters(), max_norm, total, foreach=True)
    return total


def _norm_parameters(module):
    """The module's parameters but a last stage's copy of the tied weight (the first stage counts it)."""
    copy = module.tied_weight() if module.is_last and not module.is_first else None
    return [p for p in module.parameters() if p is not copy]


def _zero_of(pipeline):
    return torch.zeros((), device=pipeline.parameters()[0].device)


def gather_model_state(pipeline: ProcessPipeline, dst=0):
    """The whole model's state dict under the model's own names, on rank `dst` (None elsewhere), from the stages of
    replica 0 (every replica holds the same weights). Collective over every rank."""
    mine = {}
    if pipeline.ranks.replica == 0:
        mine = {name.removeprefix("model."): tensor.detach().cpu()
                for module in pipeline.modules for name, tensor in module.state_dict().items()}
    shares = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(mine, shares, dst=dst)
    if shares is None:
        return None
    return {name: tensor for share in shares for name, tensor in share.items()}


def load_whole_model_state(model, state):
    """Load a gathered state dict into the whole model, whose weights may have been freed (meta): every weight must
    come from some stage, a tied weight under any of its names."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # assigned one name at a time, a tied weight's names hold separate copies
    shared = _shared_names(model)
    absent = [name for name in missing if not any(other in state for other in shared.get(name, [name]))]
    if unexpected or absent:
        raise RuntimeError(f"the stages' weights do not make the model: missing {absent}, unexpected {unexpected}")
