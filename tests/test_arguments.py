"""IPUTrainingArguments flags and load_ipu_config's order: source -> pod type / n_ipu -> overrides -> command-line
flags -> seed; world size checks; one clear UserError per bad combination."""
import json
import logging

import pytest
import torch
from transformers import HfArgumentParser

from ipu_train.arguments import IPUTrainingArguments, fit_replication_to_world, load_ipu_config
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
    assert args.gradient_accumulation_steps == 8 and args.overwrite_output_dir


def test_values_not_given_on_the_command_line_leave_the_configuration_alone(tmp_path):
    args = parse(tmp_path, "--ipu_config_name", GPT2_CONFIG, "--ipu_config_overrides", "gradient_accumulation_steps=6")
    config = load_ipu_config(args)
    assert config.gradient_accumulation_steps == 6
    assert config.recompute_checkpoint_every_layer is True  # the file's value: no --gradient_checkpointing given
    assert args.gradient_accumulation_steps == 6


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


def test_pod_type_and_n_ipu_set_replication_which_must_match_the_processes(tmp_path):
    assert load_ipu_config(parse(tmp_path, "--ipu_config_name", GPT2_CONFIG, "--n_ipu", "4")).replication_factor == 1
    with pytest.raises(UserError, match=r"replication_factor=4 but 1 process\(es\) run.*nproc_per_node 4"):
        load_ipu_config(parse(tmp_path, "--ipu_config_name", GPT2_CONFIG, "--pod_type", "pod16"))
    with pytest.raises(UserError, match="replication_factor=2"):
        load_ipu_config(parse(tmp_path, "--ipu_config_name", GPT2_CONFIG, "--n_ipu", "8"))


def test_replication_follows_the_world_size_when_left_at_its_default():
    config = fit_replication_to_world(IPUConfig(), world_size=4)
    assert config.replication_factor == 4 and config.inference_replication_factor == 4
    with pytest.raises(UserError, match="replication_factor=2 but 4"):
        fit_replication_to_world(IPUConfig(replication_factor=2), world_size=4)


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


@pytest.mark.parametrize("values, message", [
    (dict(fp32=True, bf16=True), "--fp32 contradicts --fp16/--bf16"),
    (dict(pod_type="pod16", n_ipu=16), "--pod_type and --n_ipu"),
    (dict(fp16=True), "--fp16 needs --device cuda or ipu"),
    (dict(device_type="tpu"), "--device tpu is not one of"),
    (dict(loss_scaling=0.0), "--loss_scaling must be > 0"),
    (dict(gradient_accumulation_steps=0), "--gradient_accumulation_steps must be >= 1"),
    (dict(throughput_warmup_steps=-1), "--throughput_warmup_steps must be >= 0"),
    (dict(dataloader_mode="fast"), "--dataloader_mode fast"),
    (dict(n_ipu=0), "--n_ipu must be >= 1"),
])
def test_bad_combinations_are_one_line_user_errors(tmp_path, values, message):
    values = {"device_type": "cpu", **values}
    with pytest.raises(UserError, match=message) as error:
        IPUTrainingArguments(output_dir=str(tmp_path), **values)
    assert "\n" not in str(error.value)


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
