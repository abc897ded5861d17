"""Serialization of the word embedding and the vocabulary projection on IPU (embedding_serialization_factor,
serialized_embedding_splits_per_ipu, projection_serialization_factor, serialized_projection_splits_per_ipu), after
optimum-graphcore's SerializedEmbedding / SplitProjection (optimum/graphcore/modeling_utils.py). Imported by the
IPU backend only.

The idea is optimum-graphcore's: the lookup (or the projection) is computed in parts, each over a slice of the
vocabulary, so that no single step holds the whole table's gradient; with splits_per_ipu the parts are spread over
consecutive IPUs, a block beginning at the first part of each IPU (modeling_utils.py: SerializedEmbedding.parallelize).
What differs, and why:

- The module is the SAME object with the SAME Parameter: its class is switched to a serializing subclass (the
  `__class__` switch optimum-graphcore's SerializedLinear.from_model uses) and it gains `parts`, parameter-free child
  modules that each compute one slice from the weight they are handed. So a head tied to the embedding stays tied
  (optimum-graphcore copies the slices into new Parameters, which unties them, and so refuses ties with splits:
  models/mt5/modeling_mt5.py), the state_dict keys and shapes are unchanged (the parts hold nothing), the optimizer's
  Parameter is the one trained, and a checkpoint saved while serialized loads into a plain transformers model.
  `restore` still undoes it (the class back, the parts gone) because the inference layout may serialize differently
  from the training one (the backend restores, then serializes per mode) and CPU code expects the plain classes.
- Parts need not be equal: the vocabulary is cut into `n` nearly equal slices, so no padding of the vocabulary
  (optimum-graphcore resizes the embedding to a multiple of the factor: models/gpt2/modeling_gpt2.py), which would
  change the state_dict's shapes. poptorch.serializedMatMul is not used for the same reason: its factor "must be a
  factor of the dimensions to serialize on" (poptorch python/ops.py: serializedMatMul), and parts in modules are
  what a block can begin at.
- One Parameter cannot be spread over several IPUs when pipelining: popart refuses to copy a variable tensor between
  virtual graphs (popart willow/src/transforms/pipeline.cpp: setIPUCopyPipelineStage), and the backend runs the head
  tied to the embedding on IPU 0. With `pipelined=True` (the training executable, PipelinedExecution) the parts, and
  IPU 0 when the weight is tied, must be one IPU; spreading is for the inference executable (ShardedExecution, where
  popart copies weights between IPUs) and for parts all on one IPU.
"""
import logging
from dataclasses import dataclass

import poptorch
import torch
import torch.nn.functional as F

from ..pipeline.families import output_projection, tied_head

logger = logging.getLogger("ipu_train")


@dataclass(frozen=True)
class PartBlock:
    """A block to begin: `poptorch.BeginBlock(module, user_id, ipu_id=ipu_id)` (see begin_blocks)."""

    module: torch.nn.Module
    user_id: str
    ipu_id: int


def _bounds(size, parts):
    """Part i covers rows [bounds[i], bounds[i + 1]) of a table of `size` rows: nearly equal, in order."""
    return [i * size // parts for i in range(parts + 1)]


class _EmbeddingPart(torch.nn.Module):
    """One slice of the table: ids outside it look up row 0 of the slice and are zeroed, as optimum-graphcore's
    SerializedEmbedding.forward does (static shapes: no gather of a variable number of ids)."""

    def __init__(self, start, stop):
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, ids, weight, padding_idx):
        local = ids - self.start
        inside = ((local >= 0) & (local < self.stop - self.start)).detach()
        local = local * inside
        # padding_idx only stops the gradient of its row; it is passed to the part that holds that row
        pad = padding_idx - self.start if padding_idx is not None and self.start <= padding_idx < self.stop else None
        return F.embedding(local, weight[self.start:self.stop], pad) * inside.unsqueeze(-1).to(weight.dtype)

    def extra_repr(self):
        return f"rows {self.start}:{self.stop}"


class _ProjectionPart(torch.nn.Module):
    """The logits of one slice of the vocabulary (SplitProjection's OutputChannels mode)."""

    def __init__(self, start, stop):
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, hidden, weight, bias):
        return F.linear(hidden, weight[self.start:self.stop], None if bias is None else bias[self.start:self.stop])

    def extra_repr(self):
        return f"rows {self.start}:{self.stop}"


class SerializedEmbedding(torch.nn.Embedding):
    """An nn.Embedding whose lookup is the sum of its parts' lookups (each zero outside its slice)."""

    def forward(self, ids):
        total = None
        for part in self.parts:  # each called as a module, so a block can begin at it
            x = part(ids, self.weight, self.padding_idx)
            total = x if total is None else total + x
        return total


class SerializedProjection(torch.nn.Linear):
    """An nn.Linear whose output is its parts' logits, concatenated over the vocabulary."""

    def forward(self, hidden):
        return torch.cat([part(hidden, self.weight, self.bias) for part in self.parts], dim=-1)


_PLAIN = {SerializedEmbedding: torch.nn.Embedding, SerializedProjection: torch.nn.Linear}


def _serialize(module, plain, serialized, factor, splits_per_ipu, name, tied, pipelined):
    if splits_per_ipu is not None:
        if factor not in (1, sum(splits_per_ipu)):  # IPUConfig.validate allows one of the two
            raise ValueError(f"{name}: a factor of {factor} and splits {splits_per_ipu}: give one of them")
        parts = sum(splits_per_ipu)
    else:
        parts = factor
    if parts <= 1 and splits_per_ipu is None:
        return []
    if type(module) is not plain:  # a subclass has its own forward (e.g. a scaled embedding), which this would drop
        raise ValueError(f"{name}: only a plain {plain.__name__} can be serialized, not {type(module).__name__}")
    if plain is torch.nn.Embedding and (module.max_norm is not None or module.scale_grad_by_freq or module.sparse):
        raise ValueError(f"{name}: an embedding with max_norm, scale_grad_by_freq or sparse cannot be serialized")
    rows = module.weight.shape[0]
    if parts > rows:
        raise ValueError(f"{name}: {parts} parts for a vocabulary of {rows}")
    # The first part of each IPU's run of parts begins its block (SerializedEmbedding.parallelize); no splits: all
    # parts run inside the block the module itself is in.
    blocks_at = {}
    if splits_per_ipu is not None:
        for ipu, count in enumerate(splits_per_ipu):
            if count:
                first = sum(splits_per_ipu[:ipu])
                blocks_at[first] = (ipu, first + count - 1)
    ipus = {ipu for ipu, _ in blocks_at.values()} | ({0} if tied else set())
    if pipelined and len(ipus) > 1:
        raise ValueError(
            f"{name}: splits {splits_per_ipu} would use one weight on IPUs {sorted(ipus)}"
            f"{' (the tied head runs on IPU 0)' if tied else ''}; popart cannot copy a weight between IPUs when "
            "pipelining (willow/src/transforms/pipeline.cpp). Put the training splits on one IPU, or use the "
            "serialization factor (one IPU); spreading them is for inference.")
    bounds = _bounds(rows, parts)
    kind = _EmbeddingPart if plain is torch.nn.Embedding else _ProjectionPart
    module.__class__ = serialized
    module.parts = torch.nn.ModuleList(kind(bounds[i], bounds[i + 1]) for i in range(parts))
    label = "Embedding" if plain is torch.nn.Embedding else "Projection"
    blocks = []
    for first, (ipu, last) in sorted(blocks_at.items()):
        span = f"{first}" if first == last else f"{first}-{last}"
        blocks.append(PartBlock(module.parts[first], f"{label}-{span}", ipu))
        logger.info("%s parts %s --> IPU %d", label, span, ipu)
    module.part_blocks = blocks  # read again by serialized_blocks after removeBlocks
    return blocks


def serialize_embedding(model, factor, splits_per_ipu=None, *, pipelined=False):
    """Computes `model.get_input_embeddings()` in `factor` parts (or sum(splits_per_ipu) parts, splits_per_ipu[i]
    of them on IPU i), the module and its Parameter unchanged in identity. Returns the blocks to begin (empty
    without splits_per_ipu: the parts run in the embedding's own block). `pipelined`: refuse what popart refuses
    when pipelining (see the module's docstring)."""
    return _serialize(model.get_input_embeddings(), torch.nn.Embedding, SerializedEmbedding, factor, splits_per_ipu,
                      "the word embedding", tied_head(model) is not None, pipelined)


def serialize_projection(model, factor, splits_per_ipu=None, *, pipelined=False):
    """Computes `model.get_output_embeddings()` in parts over the vocabulary, as serialize_embedding. A model
    without a vocabulary projection (a classifier, a bare encoder) has nothing to serialize: no blocks."""
    head = output_projection(model)
    if head is None:
        if factor > 1 or splits_per_ipu is not None:
            logger.info("%s has no vocabulary projection to serialize", type(model).__name__)
        return []
    return _serialize(head, torch.nn.Linear, SerializedProjection, factor, splits_per_ipu,
                      "the vocabulary projection", tied_head(model) is not None, pipelined)


def serialized_blocks(model):
    """The blocks of every serialized module in `model`, in module order (after poptorch.removeBlocks they can be
    begun again without serializing again)."""
    return [block for module in model.modules() if type(module) in _PLAIN for block in module.part_blocks]


def begin_blocks(blocks):
    for block in blocks:
        poptorch.BeginBlock(block.module, block.user_id, ipu_id=block.ipu_id)


def restore(model):
    """The plain nn.Embedding / nn.Linear again (same objects, same Parameters); the parts and their blocks go."""
    for module in list(model.modules()):  # listed first: removing the parts changes the tree being walked
        plain = _PLAIN.get(type(module))
        if plain is not None:
            del module.parts, module.part_blocks
            module.__class__ = plain
    return model
