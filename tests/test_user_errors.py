"""User mistakes end to end, through main(argv): one line on stderr naming the flag, key or file and the fix, exit
code 2, and nothing created in --output_dir. Mistyped values in argument files."""
import json

import pytest
import yaml

import run_clm

from .test_scripts_clm_mlm import clm_args, run_and_expect_user_error


def expect_refused(main, argv, capsys, output_dir, *phrases):
    line = run_and_expect_user_error(main, argv, capsys, *phrases)
    assert not output_dir.exists()
    return line


def argument_file(tmp_path, text_files, tokenizer_dir, suffix, **values):
    """A .json or .yaml argument file of a short CLM run, with `values` added or replaced."""
    flags = clm_args(text_files, tokenizer_dir, tmp_path / "out", "--max_steps", "2")
    settings = {key.lstrip("-"): value for key, value in zip(flags[::2], flags[1::2])}
    settings.update({"do_train": True, **values})
    path = tmp_path / f"args{suffix}"
    path.write_text(json.dumps(settings) if suffix == ".json" else yaml.safe_dump(settings))
    return path


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize("values, phrases", [
    (dict(per_device_train_batch_size="abc"), ["per_device_train_batch_size must be an integer", '"abc"']),
    (dict(per_device_train_batch_size=2.5), ["per_device_train_batch_size must be an integer", "2.5"]),
    (dict(learning_rate=[1]), ["learning_rate must be a number", "[1]"]),
    (dict(do_train="maybe"), ["do_train must be true or false", '"maybe"']),
    (dict(max_train_samples=True), ["max_train_samples must be an integer or null", "true"]),
    (dict(device_type="tpu"), ["device_type must be one of auto, cpu, cuda, ipu", '"tpu"']),
    (dict(dtype=16), ["dtype must be one of auto, bfloat16, float16, float32", "16"]),
    (dict(save_strategy=False), ["save_strategy must be one of no, steps, epoch", "false"]),
    (dict(label_names=[1, 2]), ["label_names must be a list (a string each) or null", "[1, 2]"]),
    (dict(tokenizer_name=["a", "b"]), ["tokenizer_name must be a string or null"]),
    (dict(learning_rate_typo=0.1), ["learning_rate_typo is not a flag of this script"]),
])
def test_argument_files_name_the_key_and_its_type(suffix, values, phrases, text_files, bpe_tokenizer_dir, tmp_path,
                                                  capsys):
    path = argument_file(tmp_path, text_files, bpe_tokenizer_dir, suffix, **values)
    expect_refused(run_clm.main, [str(path)], capsys, tmp_path / "out", f"{path}: ", *phrases)


def test_yaml_booleans_where_words_are_expected_say_to_quote_them(tmp_path, capsys):
    path = tmp_path / "args.yaml"
    path.write_text("save_strategy: no\n")
    run_and_expect_user_error(run_clm.main, [str(path)], capsys, "save_strategy must be one of no, steps, epoch",
                              "got false", "YAML reads a bare yes, no, on or off as true or false: quote it")
    path.write_text("max_train_samples: yes\n")
    line = run_and_expect_user_error(run_clm.main, [str(path)], capsys, "max_train_samples must be an integer")
    assert "quote it" not in line


def test_an_argument_file_must_hold_a_mapping(tmp_path, capsys):
    path = tmp_path / "args.yaml"
    path.write_text("- --do_train\n- --learning_rate\n")
    run_and_expect_user_error(run_clm.main, [str(path)], capsys, f"{path} must map flag names to values", "list")


def test_argument_files_take_text_as_the_command_line_does(text_files, bpe_tokenizer_dir, tmp_path):
    """YAML reads 3e-3 (no dot) as a string; "8" and "true" are what the command line would pass; one label name
    is a list of one, as `--label_names labels` gives."""
    path = argument_file(tmp_path, text_files, bpe_tokenizer_dir, ".yaml")
    path.write_text(path.read_text() + "learning_rate: 3e-3\nseed: '8'\nfp32: 'true'\nlabel_names: labels\n")
    from ipu_train.arguments import IPUTrainingArguments
    from ipu_train.cli import ScriptArgumentParser
    from ipu_train.script_args import ModelArguments

    parser = ScriptArgumentParser((ModelArguments, run_clm.DataTrainingArguments, IPUTrainingArguments))
    _, data_args, training_args = parser.parse_script_args([str(path)])
    assert training_args.learning_rate == 0.003 and training_args.seed == 8 and training_args.fp32 is True
    assert training_args.label_names == ["labels"] and data_args.block_size == 32
