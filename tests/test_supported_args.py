"""Every TrainingArguments field is honoured or refused (ipu_train/supported_args.py): a refused field set to anything
but its default is one line naming it, exit code 2 from a script. tests/test_readme_commands.py parses every README
command, so none of them is refused."""
import dataclasses
import importlib

import pytest
from transformers import TrainingArguments

from ipu_train import supported_args
from ipu_train.arguments import IPUTrainingArguments
from ipu_train.cli import ScriptArgumentParser
from ipu_train.errors import UserError


def parse(tmp_path, *flags):
    """IPUTrainingArguments through the scripts' parser, on the CPU."""
    parser = ScriptArgumentParser(IPUTrainingArguments)
    (args,) = parser.parse_script_args(["--output_dir", str(tmp_path / "out"), "--device", "cpu", *flags])
    return args


def test_every_field_is_honoured_or_refused_exactly_once():
    honoured = supported_args.honoured_fields(IPUTrainingArguments)
    both = sorted(honoured & supported_args.REFUSED.keys())
    assert not both, f"in both lists of ipu_train/supported_args.py: {both}"
    unsorted = supported_args.unsorted_fields(IPUTrainingArguments)
    assert not unsorted, (f"fields in neither list of ipu_train/supported_args.py: {unsorted}: add each to HONOURED "
                          "if the trainer, its backends or the scripts honour it, else to REFUSED with why")


def test_the_lists_name_only_real_fields():
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    stale = sorted((supported_args.HONOURED | supported_args.REFUSED.keys()) - fields)
    assert not stale, f"not fields of transformers.TrainingArguments (any more): {stale}"
    assert supported_args.REFUSED_VALUES.keys() <= supported_args.HONOURED


def test_our_own_fields_count_as_honoured():
    own = {f.name for f in dataclasses.fields(IPUTrainingArguments)} - {f.name for f in dataclasses.fields(
        TrainingArguments)}
    assert own and own <= supported_args.honoured_fields(IPUTrainingArguments)
    assert {"ipu_config_name", "lamb", "device_type"} <= own


@pytest.mark.parametrize("flags, message", [
    (["--deepspeed", "ds_config.json"], "--deepspeed ds_config.json is not supported: IPUTrainer runs its own step "
                                        "loop without DeepSpeed"),
    (["--neftune_noise_alpha", "5"], "--neftune_noise_alpha 5.0 is not supported: IPUTrainer adds no NEFTune noise"),
    (["--fsdp"], "--fsdp True is not supported"),
    (["--dataloader_drop_last"], "--dataloader_drop_last True is not supported: training always drops"),
    (["--no_dataloader_in_order"], "--dataloader_in_order False is not supported"),
    (["--eval_accumulation_steps", "4"], "--eval_accumulation_steps 4 is not supported: predictions reach the host "
                                         "every inference_device_iterations batches"),
    (["--label_smoothing_factor", "0.1"], "--label_smoothing_factor 0.1 is not supported"),
    (["--debug", "underflow_overflow"], "--debug is not supported"),
    (["--do_predict"], "--do_predict True is not supported: the scripts have no prediction step"),
    (["--train_sampling_strategy", "group_by_length"], "--train_sampling_strategy group_by_length: IPUTrainer draws "
                                                       "samples at random or in order"),
    (["--lr_scheduler_type", "reduce_lr_on_plateau"], "--lr_scheduler_type reduce_lr_on_plateau: the schedule steps "
                                                      "once per optimizer step"),
])
def test_a_refused_field_is_one_line_naming_it(tmp_path, flags, message):
    with pytest.raises(UserError) as refused:
        parse(tmp_path, *flags)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_group_by_length_is_no_flag_of_this_transformers(tmp_path):
    with pytest.raises(UserError, match="--group_by_length") as refused:
        parse(tmp_path, "--group_by_length")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("flags", [
    ["--save_total_limit", "2", "--save_strategy", "steps", "--save_steps", "10", "--save_only_model"],
    ["--eval_strategy", "steps", "--eval_steps", "5", "--eval_on_start", "--prediction_loss_only"],
    ["--logging_first_step", "--logging_steps", "3", "--report_to", "tensorboard", "--run_name", "x"],
    ["--train_sampling_strategy", "sequential", "--data_seed", "3", "--ignore_data_skip"],
    ["--lr_scheduler_type", "cosine", "--warmup_steps", "0.1", "--include_num_input_tokens_seen"],
    ["--dataloader_num_workers", "2", "--dataloader_prefetch_factor", "4", "--no_dataloader_pin_memory"],
    ["--ddp_find_unused_parameters", "false", "--ddp_bucket_cap_mb", "50", "--ddp_timeout", "60"],
])
def test_honoured_fields_set_to_other_values_are_accepted(tmp_path, flags):
    parse(tmp_path, *flags)


def test_a_field_in_neither_list_is_refused_when_set(tmp_path, monkeypatch):
    monkeypatch.setattr(supported_args, "HONOURED", supported_args.HONOURED - {"logging_first_step"})
    assert supported_args.unsorted_fields(IPUTrainingArguments) == ["logging_first_step"]
    parse(tmp_path)  # left at its default: nothing to refuse
    with pytest.raises(UserError, match="^--logging_first_step True is not supported: ipu_train does not know it "
                                        "yet"):
        parse(tmp_path, "--logging_first_step")


def test_a_script_refuses_a_refused_field_with_exit_code_2_and_touches_nothing(tmp_path, capsys):
    run_clm = importlib.import_module("run_clm")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        run_clm.main(["--model_type", "gpt2", "--tokenizer_name", str(tmp_path / "tokenizer"), "--train_file",
                      str(tmp_path / "train.txt"), "--do_train", "--output_dir", str(out), "--deepspeed", "ds.json"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --deepspeed ds.json is not supported: IPUTrainer runs its own step loop without DeepSpeed (replicas: "
        "torchrun; optimizer state sharding: replicated_tensor_sharding): drop it"]
    assert not out.exists()

