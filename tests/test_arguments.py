"""IPUTrainingArguments flags and load_ipu_config's order: source -> pod type / n_ipu -> overrides -> command-line
flags -> seed; world size checks; one clear UserError per bad combination."""
import json
import logging
import sys
import types

import pytest
import torch
from transformers import HfArgumentParser

from ipu_train.arguments import IPUTrainingArguments, compile_by_default, load_ipu_config
from ipu_train.parallel import ParallelLayout
from ipu_train.config import IPUConfig
from ipu_train.errors import UserError

GPT2_CONFIG = "ipu_configs/gpt2"


def parse(tmp_path, *flags):
    parser = HfArgumentParser(IPUTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path / "out"), "--device", "cpu",
                                                       *flags])
    return args


def test_command_line_flags_override_the_file_and_its_overrides(tmp_path):
    args = parse(tmp_path, "--ipu_config_name", GPT2_CONFIG, "--ipu_config_overrides",
                 "device_iterations=4, gradient_accumulation_steps=2", "--gradient_accumulation_steps", "8",
                 "--auto_loss_scaling", "--seed", "3", "--overwrite_output_dir")
    config = load_ipu_config(args)
    assert config.device_iterations == 4  # from the overrides
    assert config.gradient_accumulation_steps == 8  # the command line wins over the overrides
    assert config.auto_loss_scaling is True and config.seed == 3
    assert config.embedding_serialization_factor == 4  # from the file
    ParallelLayout.build(config, args)  # where the training arguments take the configuration's accumulation
    assert args.gradient_accumulation_steps == 8 and args.overwrite_output_dir


def test_values_not_given_on_the_command_line_leave_the_configuration_alone(tmp_path):
    args = parse(tmp_path, "--ipu_config_name", GPT2_CONFIG, "--ipu_config_overrides", "gradient_accumulation_steps=6")
    config = load_ipu_config(args)
    assert config.gradient_accumulation_steps == 6
    assert config.recompute_checkpoint_every_layer is True  # the file's value: no --gradient_checkpointing given
    assert ParallelLayout.build(config, args).accumulation == args.gradient_accumulation_steps == 6


def test_gradient_checkpointing_turns_recompute_on(tmp_path):
    config = load_ipu_config(parse(tmp_path, "--gradient_checkpointing"))
    assert config.recompute_checkpoint_every_layer is True


def test_the_source_is_logged_once(tmp_path, caplog):
    model_dir = tmp_path / "model"
    IPUConfig(device_iterations=3).save_pretrained(str(model_dir))
    with caplog.at_level(logging.INFO, logger="ipu_train"):
        assert load_ipu_config(parse(tmp_path, "--ipu_config_name", GPT2_CONFIG)).device_iterations == 2
        assert load_ipu_config(parse(tmp_path), str(model_dir)).device_iterations == 3
        assert load_ipu_config(parse(tmp_path), str(tmp_path / "elsewhere")).device_iterations == 1
    sources = [r.getMessage() for r in caplog.records if r.getMessage().startswith("IPU configuration:")]
    assert len(sources) == 3
    assert "--ipu_config_name" in sources[0] and "model directory" in sources[1] and "defaults" in sources[2]


def test_pod_type_and_n_ipu_set_replicas_that_one_process_runs_in_turn(tmp_path):
    assert load_ipu_config(parse(tmp_path, "--ipu_config_name", GPT2_CONFIG, "--n_ipu", "4")).replication_factor == 1
    for flags, replicas in ((("--pod_type", "pod16"), 4), (("--n_ipu", "8"), 2)):
        args = parse(tmp_path, "--ipu_config_name", GPT2_CONFIG, *flags)
        config = load_ipu_config(args)
        layout = ParallelLayout.build(config, args)
        assert config.replication_factor == layout.replicas == layout.replicas_per_process == replicas
        assert layout.micro_batches_per_step == replicas * config.gradient_accumulation_steps


def _world(tmp_path, processes, rank=0):
    """Training arguments as a process of a `processes`-process torchrun sees them."""
    args = parse(tmp_path)
    return types.SimpleNamespace(**{**vars(args), "device_type": "cpu", "world_size": processes,
                                    "process_index": rank, "should_save": rank == 0})


def test_replication_follows_the_world_size_when_left_at_its_default(tmp_path):
    config = IPUConfig()
    layout = ParallelLayout.build(config, _world(tmp_path, 4, rank=1))
    assert config.replication_factor == 4 and config.inference_replication_factor == 4
    assert (layout.processes, layout.rank, layout.replicas_per_process, layout.writes_files) == (4, 1, 1, False)
    assert ParallelLayout.build(IPUConfig(replication_factor=8), _world(tmp_path, 4)).replicas_per_process == 2
    with pytest.raises(UserError, match=r"replication_factor=2 does not divide over the 4 process\(es\) that run: "
                                        r"launch `torchrun --nproc_per_node N` with N one of 1, 2"):
        ParallelLayout.build(IPUConfig(replication_factor=2), _world(tmp_path, 4))


def test_a_json_file_holds_the_same_fields(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "o"), "device_type": "cpu", "lamb": True,
                                "ipu_config_overrides": "device_iterations=2"}))
    (args,) = HfArgumentParser(IPUTrainingArguments).parse_json_file(str(path))
    assert args.use_lamb and args.device_type == "cpu" and load_ipu_config(args).device_iterations == 2


def test_precision_defaults_and_flags(tmp_path):
    assert parse(tmp_path).precision == "fp32"
    assert parse(tmp_path, "--bf16").precision == "bf16"
    assert parse(tmp_path, "--fp32").precision == "fp32"


@pytest.mark.parametrize("requested, device, compiled", [
    (None, "cuda", True), (None, "cpu", False), (None, "ipu", False),
    (False, "cuda", False), (True, "cpu", True),
])
def test_the_step_is_compiled_by_default_on_cuda_only(requested, device, compiled):
    assert compile_by_default(requested, device) is compiled


@pytest.mark.parametrize("flags, compiled", [
    ([], False),  # CPU: eager by default
    (["--torch_compile"], True),
    (["--torch_compile", "true"], True),
    (["--torch_compile", "false"], False),
    (["--no_torch_compile"], False),
    (["--torch_compile_mode", "max-autotune-no-cudagraphs"], True),
])
def test_compile_flags_resolve_to_a_recorded_boolean(tmp_path, flags, compiled):
    args = parse(tmp_path, *flags)
    assert args.torch_compile is compiled
    assert args.to_dict()["torch_compile"] is compiled  # what training_args.bin and the logs show


def _cuda_flags(**given):
    """The compile flags of a CUDA run, resolved by IPUTrainingArguments' own method (no GPU needed)."""
    flags = types.SimpleNamespace(device_type="cuda", torch_compile=None, no_torch_compile=False, cuda_graphs=False,
                                  torch_compile_mode=None, torch_compile_backend=None)
    vars(flags).update(given)
    IPUTrainingArguments._resolve_compilation(flags)
    return flags


def test_cuda_runs_compile_unless_told_not_to_and_cuda_graphs_pick_the_graph_mode():
    assert _cuda_flags().torch_compile is True
    assert _cuda_flags(no_torch_compile=True).torch_compile is False
    assert _cuda_flags(torch_compile=False).torch_compile is False
    graphs = _cuda_flags(cuda_graphs=True)
    assert (graphs.torch_compile, graphs.torch_compile_mode) == (True, "reduce-overhead")
    assert _cuda_flags(cuda_graphs=True, torch_compile_mode="max-autotune").torch_compile_mode == "max-autotune"


@pytest.mark.parametrize("given, message", [
    (dict(cuda_graphs=True, torch_compile=False), "--cuda_graphs replays compiled graphs"),
    (dict(cuda_graphs=True, torch_compile_mode="default"), "--cuda_graphs contradicts --torch_compile_mode default"),
    (dict(no_torch_compile=True, torch_compile_mode="max-autotune"), "--no_torch_compile contradicts"),
])
def test_contradicting_compile_flags_on_cuda_are_user_errors(given, message):
    with pytest.raises(UserError, match=message):
        _cuda_flags(**given)


@pytest.mark.parametrize("values, message", [
    (dict(fp32=True, bf16=True), "--fp32 contradicts --fp16/--bf16"),
    (dict(no_torch_compile=True, torch_compile=True), "--no_torch_compile contradicts --torch_compile"),
    (dict(no_torch_compile=True, cuda_graphs=True), "--no_torch_compile contradicts --cuda_graphs"),
    (dict(cuda_graphs=True), "--cuda_graphs needs --device cuda"),
    (dict(pod_type="pod16", n_ipu=16), "--pod_type and --n_ipu"),
    (dict(fp16=True), "--fp16 needs --device cuda or ipu"),
    (dict(device_type="tpu"), "--device tpu is not one of"),
    (dict(loss_scaling=0.0), "--loss_scaling must be > 0"),
    (dict(gradient_accumulation_steps=0), "--gradient_accumulation_steps must be >= 1"),
    (dict(throughput_warmup_steps=-1), "--throughput_warmup_steps must be >= 0"),
    (dict(dataloader_mode="fast"), "--dataloader_mode fast"),
    (dict(n_ipu=0), "--n_ipu must be >= 1"),
    (dict(per_device_train_batch_size=0), "--per_device_train_batch_size must be >= 1"),
    (dict(per_device_eval_batch_size=0), "--per_device_eval_batch_size must be >= 1"),
    (dict(seed=-1), "--seed must be between 0 and 2"),
])
def test_bad_combinations_are_one_line_user_errors(tmp_path, values, message):
    values = {"device_type": "cpu", **values}
    with pytest.raises(UserError, match=message) as error:
        IPUTrainingArguments(output_dir=str(tmp_path), **values)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("values, message", [
    (dict(learning_rate=-1e-4), "--learning_rate must be a number >= 0"),
    (dict(learning_rate=float("inf")), "--learning_rate must be a number >= 0"),
    (dict(weight_decay=-0.1), "--weight_decay must be a number >= 0"),
    (dict(max_grad_norm=-1.0), "0 turns gradient clipping off"),
    (dict(adam_beta1=1.0), "--adam_beta1 must be at least 0 and below 1"),
    (dict(adam_epsilon=-1e-8), "--adam_epsilon must be a number >= 0"),
    (dict(do_train=True, num_train_epochs=0), "--num_train_epochs 0 trains nothing"),
    (dict(warmup_ratio=-0.1), "--warmup_ratio is a fraction of the training steps"),
    (dict(warmup_ratio=0.1, warmup_steps=0.1), "--warmup_ratio and --warmup_steps 0.1"),
])
def test_impossible_training_numbers_are_one_line_user_errors(tmp_path, values, message):
    with pytest.raises(UserError, match=message) as error:
        IPUTrainingArguments(output_dir=str(tmp_path), device_type="cpu", **values)
    assert "\n" not in str(error.value)


def test_training_numbers_at_their_limits_are_accepted(tmp_path):
    args = IPUTrainingArguments(output_dir=str(tmp_path), device_type="cpu", learning_rate=0, weight_decay=0,
                                max_grad_norm=0, adam_beta1=0, do_train=True, num_train_epochs=0, max_steps=5)
    assert args.max_steps == 5  # --max_steps sets the length: no epochs needed


@pytest.mark.parametrize("ratio, steps", [(0.0, 0), (0.25, 3), (0.1, 1), (1.0, 10)])
def test_warmup_ratio_is_a_share_of_the_steps_rounded_up(tmp_path, ratio, steps):
    args = IPUTrainingArguments(output_dir=str(tmp_path), device_type="cpu", warmup_ratio=ratio)
    assert args.get_warmup_steps(10) == steps


def test_without_warmup_ratio_warmup_steps_counts_as_transformers_counts_it(tmp_path):
    assert IPUTrainingArguments(output_dir=str(tmp_path), device_type="cpu", warmup_steps=0.25).get_warmup_steps(
        10) == 3
    assert IPUTrainingArguments(output_dir=str(tmp_path), device_type="cpu", warmup_steps=4).get_warmup_steps(10) == 4


def test_devices_that_are_not_there_are_refused(tmp_path):
    try:
        import poptorch  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="--device ipu needs the Poplar SDK's poptorch"):
            IPUTrainingArguments(output_dir=str(tmp_path), device_type="ipu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: no CUDA device"):
            IPUTrainingArguments(output_dir=str(tmp_path), device_type="cuda")
        assert IPUTrainingArguments(output_dir=str(tmp_path)).device_type == "cpu"  # auto


def test_trainer_refuses_accumulation_that_disagrees_with_its_configuration(tmp_path):
    from ipu_train.trainer import IPUTrainer
    from tests._trainer_fixtures import tiny_gpt2

    args = IPUTrainingArguments(output_dir=str(tmp_path), device_type="cpu", gradient_accumulation_steps=4)
    with pytest.raises(UserError, match="--gradient_accumulation_steps 4 disagrees"):
        IPUTrainer(model=tiny_gpt2(), ipu_config=IPUConfig(gradient_accumulation_steps=2), args=args)


def test_several_poprun_instances_run_on_ipu_when_they_fit_the_configuration(tmp_path, monkeypatch):
    """Each poprun instance drives its share of the replicas (more in tests/test_popdist.py, against the strict
    popdist double)."""
    from ipu_train.parallel import check_replication
    from tests.poptorch_double import make_strict_popdist

    monkeypatch.setitem(sys.modules, "popdist", make_strict_popdist(instances=4, replicas=4, index=2))
    check_replication(IPUConfig(replication_factor=4, inference_replication_factor=4),
                      types.SimpleNamespace(device_type="ipu", world_size=4, process_index=2))
    with pytest.raises(UserError, match=r"^replication_factor=8 \(the IPU configuration: the total over the "
                                        r"instances\) disagrees with poprun --num-replicas 4: "):
        check_replication(IPUConfig(replication_factor=8, inference_replication_factor=8),
                          types.SimpleNamespace(device_type="ipu", world_size=4, process_index=2))
    monkeypatch.setitem(sys.modules, "popdist", None)  # no SDK: no poprun either, one process
    check_replication(IPUConfig(), types.SimpleNamespace(device_type="ipu", world_size=1, process_index=0))
