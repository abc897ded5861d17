"""Print the pipeline plan of an IPU configuration for a model, before any long compile or training run.

    python -m ipu_train.plan --ipu_config ipu_configs/gpt2 --model_type gpt2

The model is built from its configuration on the meta device: no weights are downloaded or allocated.
"""
import argparse
import os
import sys

from .cli import OneLineErrors, one_line_errors
from .errors import UserError


def parse_args(argv=None):
    parser = _Parser(prog="python -m ipu_train.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--ipu_config", "--ipu_config_name", dest="ipu_config", required=True,
                        help="a directory holding ipu_config.json, a .json file, or a hub name")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model_type", help="a transformers model type, e.g. gpt2, bert (default sizes)")
    model.add_argument("--config_name", help="a model configuration: a directory or a hub name")
    model.add_argument("--model_name_or_path", help="a model directory or hub name: only its config.json is read")
    parser.add_argument("--config_overrides", help='model configuration overrides, e.g. "n_layer=24,n_embd=1024"')
    parser.add_argument("--head", choices=("causal-lm", "masked-lm", "pretraining"),
                        help="the model head to plan for (default: the one its training script uses)")
    parser.add_argument("--ipu_config_overrides", help='e.g. "layers_per_ipu=[1 3 4 4],matmul_proportion=0.2"')
    replication = parser.add_mutually_exclusive_group()  # both set the replication, as in the training scripts
    replication.add_argument("--pod_type", help="resolves per-pod values: pod4, pod8, pod16, pod32 or pod64")
    replication.add_argument("--n_ipu", type=_positive, help="IPUs available: replication_factor = n_ipu // "
                                                             "ipus_per_replica")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "ipu"), default="auto",
                        help="ipu: also check what the IPU target needs (gradient accumulation for the pipeline, IPUs "
                             "available with --n_ipu / --pod_type), as the training scripts do with --device ipu")
    parser.add_argument("--pipeline_stages_across_processes", action="store_true",
                        help="also print the process grid of the training stages, one per process (torchrun)")
    parser.add_argument("--pipeline_schedule", choices=("gpipe", "1f1b", "interleaved_1f1b"), default="1f1b",
                        help="the schedule of --pipeline_stages_across_processes")
    parser.add_argument("--per_device_train_batch_size", type=_positive, default=1, help="the micro-batch size")
    parser.add_argument("--per_device_eval_batch_size", type=_positive,
                        help="default: the training micro-batch size")
    return parser.parse_args(argv)


class _Parser(OneLineErrors, argparse.ArgumentParser):
    """A flag mistake is one `error:` line and exit code 2, like the training scripts' (no usage block)."""


def _positive(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use a whole number of 1 or more")
    return int(text)


def shipped_size(ipu_config_source, model_type):
    """The size a shipped configuration's directory name stands for, when the model type is the one it was written
    for (its family's first); a .json path counts by its directory. A bare --model_type would otherwise plan the
    library's default size, which for XLNet is large and for ALBERT xxlarge."""
    from .pipeline.families import family_for_model_type

    family = family_for_model_type(model_type)
    if family is None or model_type != family.model_types[0]:
        return None
    directory = os.path.dirname(ipu_config_source) if ipu_config_source.endswith(".json") else ipu_config_source
    return family.shipped_sizes.get(os.path.basename(os.path.abspath(directory)))  # abspath: "." and a trailing "/"


def _bare_model_type_config(args):
    """The size the shipped ipu_config was written for, else the library's default, and which one it is."""
    from transformers import AutoConfig

    size = shipped_size(args.ipu_config, args.model_type)
    if size is None:
        return AutoConfig.for_model(args.model_type), f"the library's default {args.model_type} config"
    return AutoConfig.for_model(args.model_type, **size.sizes), f"{size.name}, from the configuration's name"


def load_model_config(args):
    """The model configuration and, for a bare --model_type, which size was assumed (None for a given config)."""
    from transformers import AutoConfig

    try:
        if args.model_type:
            config, assumed = _bare_model_type_config(args)
        else:
            config, assumed = AutoConfig.from_pretrained(args.config_name or args.model_name_or_path), None
    except (ValueError, OSError) as error:
        flag = "--model_type" if args.model_type else "--config_name" if args.config_name else "--model_name_or_path"
        value = args.model_type or args.config_name or args.model_name_or_path
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{flag} {value}: no model configuration ({first_line})") from None
    if args.config_overrides:
        try:
            config.update_from_string(args.config_overrides)
        except ValueError as error:
            raise UserError(f"--config_overrides: {error}") from None
        assumed = assumed and f"{assumed}, with --config_overrides"
    return config, assumed


def build_model_skeleton(config, head=None):
    """The model with its parameters on the meta device: shapes and structure, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForPreTraining

    if head is None:
        head = default_head(config.model_type)
    auto_class = {
        "causal-lm": AutoModelForCausalLM,
        "masked-lm": AutoModelForMaskedLM,
        "pretraining": AutoModelForPreTraining,
    }[head]
    try:
        with torch.device("meta"):
            return auto_class.from_config(config)
    except ValueError as error:
        raise UserError(f"--head {head} does not exist for model type {config.model_type} ({error})") from None


def default_head(model_type):
    """The head its training script trains: the family's, else masked LM where the model type has one, else causal
    LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    from .pipeline.families import family_for_model_type

    family = family_for_model_type(model_type)
    if family is not None and family.default_head:
        return family.default_head
    return "masked-lm" if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "causal-lm"


def render_plan(args) -> str:
    from .arguments import resolve_ipu_config  # the training scripts' order: source -> pod type -> n_ipu -> overrides
    from .pipeline.stages import build_stage_plan, describe_batch

    ipu_config = resolve_ipu_config(args.ipu_config, args.pod_type, args.n_ipu, args.ipu_config_overrides)
    if args.device == "ipu":  # the training scripts' check with --device ipu, before the model is built
        ipu_config.check_for_ipu(args.n_ipu, args.pod_type)
    config, assumed = load_model_config(args)
    model = build_model_skeleton(config, args.head)
    subject = f"{assumed}: {type(model).__name__}" if assumed else type(model).__name__
    layouts = {}
    for mode, prefix in (("training", ""), ("inference", "inference_")):
        with ipu_config.in_mode(mode):  # layout attributes read the inference_* values in inference mode
            layout = f"{prefix}layers_per_ipu={ipu_config.layers_per_ipu}, {prefix}ipus_per_replica="
            layouts[mode] = (f"{layout}{ipu_config.ipus_per_replica}", build_stage_plan(model, ipu_config))
    (training_layout, training), (inference_layout, inference) = layouts["training"], layouts["inference"]
    num_layers = sum(len(stage.layers) for stage in training.stages)
    lines = [
        f"IPU plan: {args.ipu_config} for {subject} ({num_layers} layers, "
        f"{training.total_parameters:,} parameters; weights not loaded)",
        "",
        f"training: {training_layout}",
        training.describe(),
        "",
    ]
    if inference.stages == training.stages:
        lines += [f"inference: {inference_layout} (the same stages as training)", ""]
    else:
        lines += [f"inference: {inference_layout}", inference.describe(), ""]
    lines += [
        describe_batch(ipu_config, args.per_device_train_batch_size, args.per_device_eval_batch_size),
        "",
        f"IPUs: training {ipu_config.ipus_per_replica} per replica x {ipu_config.replication_factor} replicas = "
        f"{ipu_config.ipus_per_replica * ipu_config.replication_factor}; inference "
        f"{ipu_config.inference_ipus_per_replica} x {ipu_config.inference_replication_factor} = "
        f"{ipu_config.inference_ipus_per_replica * ipu_config.inference_replication_factor}",
    ]
    if args.device == "ipu":
        lines.append(describe_ipu_target(ipu_config, args))
    if args.pipeline_stages_across_processes:
        lines += ["", describe_process_grid(ipu_config, args.pipeline_schedule)]
    unused = ipu_config.unused_on_pytorch()
    if unused:
        lines.append(f"IPU only (no effect on PyTorch): {', '.join(unused)}")
    return "\n".join(lines)


def describe_ipu_target(ipu_config, args) -> str:
    """What the IPU target needs, once IPUConfig.check_for_ipu has passed: the training pipeline's stages, the least
    gradient accumulation, and the IPUs PopTorch reserves (a power of two) against those --n_ipu / --pod_type give."""
    path = " -> ".join(str(ipu) for ipu in ipu_config.pipeline_ipus())
    path = f"IPU {path} (the head back on IPU 0)" if len(ipu_config.pipeline_ipus()) > 1 else "IPU 0"
    stages, least = ipu_config.pipeline_stages(), ipu_config.min_gradient_accumulation()
    available = (f", of the {args.n_ipu} --n_ipu gives" if args.n_ipu else
                 f", of the {args.pod_type[len('pod'):]} --pod_type {args.pod_type} gives" if args.pod_type else "")
    return "\n".join([
        f"IPU target: training pipelined over {stages} stage(s), {path}: gradient "
        f"accumulation {ipu_config.gradient_accumulation_steps} >= {least} (2 x {stages} - 1)",
        f"            IPUs reserved: training {ipu_config.ipus_needed()}, inference "
        f"{ipu_config.ipus_needed(for_inference=True)}{available}",
    ])


def describe_process_grid(ipu_config, schedule) -> str:
    """Stages across processes: which process runs which stages of which replica, the torchrun size, and the
    schedule's estimated bubble; a layout that would not run is refused as the training scripts refuse it."""
    import types

    from .parallel import check_process_stages, processes_per_pipeline
    from .pipeline.process_stages import PipelineRanks, estimated_bubble

    with ipu_config.in_mode("training"):
        stages = ipu_config.ipus_per_replica
    replicas = ipu_config.replication_factor
    world = processes_per_pipeline(stages, schedule) * replicas
    per_pipeline = check_process_stages(ipu_config, types.SimpleNamespace(pipeline_schedule=schedule,
                                                                          world_size=world))
    micro_batches, virtual = ipu_config.gradient_accumulation_steps, stages // per_pipeline
    lines = [f"stages across processes ({schedule}): {per_pipeline} process(es) per replica x {replicas} "
             f"replica(s) = torchrun --nproc_per_node {world} (in all, over the machines)"]
    for rank in range(world):
        ranks = PipelineRanks(rank=rank, ranks_per_pipeline=per_pipeline, replicas=replicas, num_stages=stages)
        held = ranks.stage_indices
        stage_names = f"stages {', '.join(str(s) for s in held)}" if len(held) > 1 else f"stage {held[0]}"
        lines.append(f"  rank {rank}: {stage_names}, replica {ranks.replica}"
                     + (" (writes output_dir)" if rank == 0 else ""))
    bubble = estimated_bubble(per_pipeline, micro_batches, virtual)
    lines.append(f"  estimated bubble: {bubble:.1%} of each step idle ({per_pipeline} processes, {micro_batches} "
                 f"micro-batches = gradient_accumulation_steps" + (f", {virtual} stages per process" if virtual > 1
                                                                      else "") + ")")
    return "\n".join(lines)


@one_line_errors()
def main(argv=None) -> int:
    """Print the plan and return 0; a mistake (a flag, a key, a file) is one `error:` line and exit code 2."""
    print(render_plan(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
