"""The stage plan: which pipeline stage holds each layer and parameter, and the batch arithmetic around it.

Placement follows optimum-graphcore: embeddings and heads on stage 0 (a tied LM head stays with its embedding),
each layer on the stage its `layers_per_ipu` entry maps it to, and modules that run after the last layer inside
the layers' parent (GPT-2's final LayerNorm) on the last layer's stage, where PopTorch's block rule left them.
"""
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from .families import family_layers


@dataclass
class Stage:
    index: int
    layers: list
    parameters: int
    holds: list = field(default_factory=list)  # modules other than layers, and notes on shared weights


@dataclass
class StagePlan:
    stages: list
    total_parameters: int

    def describe(self) -> str:
        """A table: stage, layers, parameters, share of the model, other modules held."""
        rows = [("stage", "layers", "parameters", "share", "also holds")]
        for stage in self.stages:
            share = stage.parameters / self.total_parameters if self.total_parameters else 0.0
            rows.append(
                (
                    str(stage.index),
                    _layer_ranges(stage.layers),
                    f"{stage.parameters:,}",
                    f"{share:.1%}",
                    ", ".join(stage.holds),
                )
            )
        num_layers = sum(len(stage.layers) for stage in self.stages)
        rows.append(("total", f"{num_layers} layers", f"{self.total_parameters:,}", "100.0%", ""))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = []
        for row in rows:
            cells = [row[0].rjust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]), row[3].rjust(widths[3])]
            lines.append("  ".join(cells + [row[4]]).rstrip())
        return "\n".join(lines)


def transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's repeated blocks, one entry per layer.

    ALBERT shares one group of weights between all its layers: entry i is the group that layer i runs (the same
    module repeated), so the list has `config.num_hidden_layers` entries and maps like any other model.
    """
    return _find_layers(model)[1]


def build_stage_plan(model: torch.nn.Module, ipu_config) -> StagePlan:
    """Per stage, for the configuration's current mode: its layers, the parameters it stores, what else it holds."""
    container_path, layers = _find_layers(model)
    layer_stage = ipu_config.layer_stages(len(layers))
    num_stages = len(ipu_config.layers_per_stage(len(layers)))
    last_layer_stage = layer_stage[-1] if layer_stage else 0

    # Each tensor once (tied weights), on the stage of the first layer that uses it.
    param_stage = {}
    for index, layer in enumerate(layers):
        for param in layer.parameters():
            param_stage.setdefault(id(param), layer_stage[index])
    layer_ids = {id(layer) for layer in layers}
    after_layers = _registered_after(model, container_path)
    holds = [[] for _ in range(num_stages)]
    first_holder = {}
    for name, params in _holders(model, layer_ids):
        stage = last_layer_stage if name in after_layers else 0
        tied_to = sorted({first_holder[id(p)] for p in params if id(p) in first_holder})
        holds[stage].append(f"{name} (tied to {', '.join(tied_to)})" if tied_to else name)
        for param in params:
            param_stage.setdefault(id(param), stage)
            first_holder.setdefault(id(param), name)

    counts = [0] * num_stages
    for param in model.parameters():
        counts[param_stage[id(param)]] += param.numel()
    for index, layer in enumerate(layers):
        first_param = next(layer.parameters(), None)
        if first_param is None:
            continue
        owner, stage = param_stage[id(first_param)], layer_stage[index]
        note = f"layer weights shared with stage {owner}"
        if owner != stage and note not in holds[stage]:
            holds[stage].append(note)

    stages = [
        Stage(index=s, layers=[i for i, st in enumerate(layer_stage) if st == s], parameters=counts[s], holds=holds[s])
        for s in range(num_stages)
    ]
    return StagePlan(stages=stages, total_parameters=sum(counts))


def describe_batch(ipu_config, micro_batch: int, inference_micro_batch: int = None) -> str:
    """The combined-batch arithmetic for training and inference."""
    if inference_micro_batch is None:
        inference_micro_batch = micro_batch
    cfg = ipu_config
    step = micro_batch * cfg.gradient_accumulation_steps * cfg.replication_factor
    call = step * cfg.device_iterations
    inference_step = inference_micro_batch * cfg.inference_replication_factor
    inference_call = inference_step * cfg.inference_device_iterations
    return "\n".join(
        [
            f"training:  micro-batch {micro_batch} x gradient accumulation {cfg.gradient_accumulation_steps}"
            f" x replicas {cfg.replication_factor} = {step} samples per optimizer step",
            f"           x device iterations {cfg.device_iterations} = {call} samples per host call"
            f" (one data-loader item, batch_size_factor {cfg.batch_size_factor()})",
            f"inference: micro-batch {inference_micro_batch} x replicas {cfg.inference_replication_factor}"
            f" = {inference_step} samples per step",
            f"           x device iterations {cfg.inference_device_iterations} = {inference_call} samples per host call"
            f" (batch_size_factor {cfg.batch_size_factor(for_inference=True)})",
        ]
    )


# --- helpers ---------------------------------------------------------------------------------------------------


def _find_layers(model):
    """(path of the layer container, the layers as a ModuleList): where the model's family keeps them, else the
    longest ModuleList."""
    known = family_layers(model)
    if known is not None:
        return known
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise UserError(
            f"{type(model).__name__} has no list of repeated layers (torch.nn.ModuleList) to place on pipeline "
            f"stages: use a transformer model"
        )
    name, layers = max(lists, key=lambda item: len(item[1]))
    return name, layers


def _holders(model, layer_ids):
    """(name, parameters) of the coarsest modules that hold parameters but no layer, in registration order; a
    module that contains layers lists its own parameters one by one (XLNet's transformer.mask_emb)."""
    found = []

    def visit(prefix, module):
        if id(module) in layer_ids:
            return
        if not any(id(m) in layer_ids for m in module.modules()):
            params = list(module.parameters())
            if params:
                found.append((prefix, params))
            return
        for name, param in module.named_parameters(recurse=False):
            found.append((f"{prefix}.{name}" if prefix else name, [param]))
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return found


def _registered_after(model, container_path):
    """Names of the modules registered after the layer container in its parent: they run after the last layer."""
    parent_path, _, container_name = container_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    names = [name for name, _ in parent.named_children()]
    if container_name not in names:
        return set()
    later = names[names.index(container_name) + 1 :]
    return {f"{parent_path}.{name}" if parent_path else name for name in later}


def _layer_ranges(indices) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"; no layers -> "-"."""
    if not indices:
        return "-"
    runs = [[indices[0], indices[0]]]
    for index in indices[1:]:
        if index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ", ".join(f"{first}-{last}" if last != first else f"{first}" for first, last in runs)
