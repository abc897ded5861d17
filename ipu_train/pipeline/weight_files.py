"""A saved model's weights read one tensor at a time, from its safetensors files (one file, or shards listed by
`model.safetensors.index.json`), so that a pipeline stage reads its own tensors and never the others'
(--pipeline_stages_across_processes). Shapes come from the files' headers: checking that a checkpoint fits a model
reads no tensor data."""
import json
import os
import weakref

import torch

# Models built with meta weights, to be loaded stage by stage: {model: its SavedWeights}.
_DEFERRED = weakref.WeakKeyDictionary()

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


class SavedWeights:
    """{tensor name: its safetensors file}, with each tensor's shape, read on demand; `shapes`: {tensor name: shape}.
    `dtype`: the dtype floating tensors are read in (None: as stored)."""

    def __init__(self, files_by_name, shapes, dtype=None):
        self.files_by_name, self.shapes = dict(files_by_name), dict(shapes)
        self.dtype = dtype

    @classmethod
    def from_files(cls, files, dtype=None):
        """Every tensor of the given safetensors files (their headers read, no tensor)."""
        from safetensors import safe_open

        files_by_name, shapes = {}, {}
        for path in files:
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    files_by_name[name], shapes[name] = path, tuple(handle.get_slice(name).get_shape())
        return cls(files_by_name, shapes, dtype)

    def keys(self):
        return self.files_by_name.keys()

    def __contains__(self, name):
        return name in self.files_by_name

    def read(self, name) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.files_by_name[name], framework="pt") as handle:
            tensor = handle.get_tensor(name)
        return tensor.to(self.dtype) if self.dtype is not None and tensor.is_floating_point() else tensor


def find_saved_weights(locate, dtype=None):
    """The SavedWeights of the model whose files `locate(filename)` finds (a local path, or None where the model has
    no such file: a folder's, or a hub model's fetched into the cache); None where the model has no safetensors
    (or a shard cannot be found)."""
    index = locate(SHARD_INDEX)
    if index is not None and os.path.isfile(index):
        with open(index) as handle:
            shards = [locate(shard) for shard in sorted(set(json.load(handle)["weight_map"].values()))]
        if not all(shard is not None and os.path.isfile(shard) for shard in shards):
            return None  # a shard that cannot be fetched: the whole-model loading reports it
        return SavedWeights.from_files(shards, dtype)
    single = locate(SINGLE_FILE)
    if single is not None and os.path.isfile(single):
        return SavedWeights.from_files([single], dtype)
    return None


def defer_loading(model, weights):
    """Mark `model` (built with meta weights) as to be loaded from `weights`, stage by stage."""
    _DEFERRED[model] = weights


def deferred_weights(model):
    """The SavedWeights a model built with meta weights is to be loaded from; None for a model holding its own."""
    return _DEFERRED.get(model)


def folder_weights(folder):
    """The SavedWeights of a model folder or of a checkpoint this runtime saved (its whole model)."""
    weights = find_saved_weights(lambda name: os.path.join(folder, name))
    if weights is None:
        raise ValueError(f"{folder} holds no {SINGLE_FILE} (nor {SHARD_INDEX})")
    return weights
