"""What a run says, as Hugging Face users know it: the scripts' module loggers carry the run's messages (a test's
CaptureLogger sees them) in the example scripts' format, once each; an ipu_config.json found with the model is named
with its key settings; evaluation and preprocessing show labelled progress bars; --help lists the IPU and data flags
before the ones inherited from TrainingArguments, which all parse as before."""
import json
import logging
import re
import subprocess
import sys

import datasets
import pytest
import torch
from transformers import HfArgumentParser
from transformers.testing_utils import CaptureLogger

import run_clm
import run_mlm
import run_plm
import run_pretraining
from ipu_train.arguments import IPUTrainingArguments, load_ipu_config
from ipu_train.cli import ScriptArgumentParser
from ipu_train.config import IPUConfig
from ipu_train.script_args import DataArguments, ModelArguments
from ipu_train.trainer import _num_examples

from ._trainer_fixtures import token_rows
from .conftest import REPO
from .test_script_pretraining import pretraining_args
from .test_scripts_clm_mlm import clm_args
from .test_trainer import make_args, make_trainer

SCRIPTS = (run_clm, run_mlm, run_plm, run_pretraining)
LOG_LINE = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d - (INFO|WARNING) - ipu_train - (.*)$")


@pytest.fixture
def progress_bars():
    """datasets' bars on for one test: an earlier run with --disable_tqdm in this process turned them off."""
    were_on = datasets.is_progress_bar_enabled()
    datasets.enable_progress_bars()
    yield
    if not were_on:
        datasets.disable_progress_bars()


def bar_reached(stderr, total):
    """Whether a tqdm bar of `total` steps ran to its end."""
    return re.search(rf"\| {total}/{total} \[", stderr) is not None


# --- the scripts' loggers -------------------------------------------------------------------------------------------

def test_run_clm_logger_carries_the_run_and_its_bars_are_labelled(text_files, bpe_tokenizer_dir, tmp_path, capsys,
                                                                   progress_bars):
    out = tmp_path / "clm"
    with CaptureLogger(run_clm.logger) as captured:
        run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--do_eval", "--max_steps", "2",
                              "--overwrite_cache", "--disable_tqdm", "false"))
    for line in ("Training a new gpt2 model from scratch", "IPU configuration: the defaults",
                 "***** Running training *****", "***** Running Evaluation *****\n  Num examples = 32\n"
                 "  Batch size = 8\n"):
        assert line in captured.out
    stderr = capsys.readouterr().err
    assert "Running tokenizer on dataset" in stderr and "Grouping texts in chunks of 32" in stderr
    assert bar_reached(stderr, 4)  # evaluation: 32 samples in batches of 8

    # The saved model holds its ipu_config.json: a run from it says so, at WARNING level.
    argv = ["--model_name_or_path", str(out), "--validation_file", str(text_files / "validation.txt"),
            "--block_size", "32", "--do_eval", "--max_eval_samples", "8", "--output_dir", str(tmp_path / "again"),
            "--report_to", "none", "--log_level", "warning", "--disable_tqdm", "true"]
    with CaptureLogger(run_clm.logger) as captured:
        run_clm.main(argv)
    assert f"IPU configuration: {out / 'ipu_config.json'}, found in the model directory" in captured.out
    assert "***** Running Evaluation *****" not in captured.out  # --log_level warning: INFO is quiet


def test_run_pretraining_logger_carries_the_run_and_labels_the_pairs(text_files, wordpiece_tokenizer_dir, tmp_path,
                                                                      capsys, progress_bars):
    with CaptureLogger(run_pretraining.logger) as captured:
        run_pretraining.main(pretraining_args(text_files, wordpiece_tokenizer_dir, tmp_path / "bert", "--do_train",
                                              "--do_eval", "--max_steps", "2", "--overwrite_cache",
                                              "--disable_tqdm", "false"))
    for line in ("Training a new bert model from scratch", "IPU configuration: the defaults",
                 "***** Running training *****", "***** Running Evaluation *****", "  Num examples = 32"):
        assert line in captured.out
    assert "Building sentence pairs" in capsys.readouterr().err


def test_a_script_writes_each_line_once_in_the_hugging_face_format(text_files, bpe_tokenizer_dir, tmp_path):
    argv = clm_args(text_files, bpe_tokenizer_dir, tmp_path / "clm", "--do_train", "--do_eval", "--max_steps", "1")
    run = subprocess.run([sys.executable, "run_clm.py", *argv], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    for level, message in (("WARNING", "Training a new gpt2 model from scratch."),
                           ("INFO", "***** Running training *****"), ("INFO", "***** Running Evaluation *****"),
                           ("INFO", "  Num examples = 32")):
        [line] = [line for line in lines if line.endswith(message)]
        assert LOG_LINE.match(line).groups() == (level, message)


# --- the IPU configuration found with the model ----------------------------------------------------------------------

def model_directory(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "ipu_config.json").write_text(json.dumps({"layers_per_ipu": [0, 4, 4, 4], "device_iterations": 2,
                                                        "gradient_accumulation_steps": 16}))
    return folder


def test_an_ipu_config_found_with_the_model_is_named_with_its_settings_after_the_flags(tmp_path, caplog):
    folder = model_directory(tmp_path)
    args = IPUTrainingArguments(output_dir=str(tmp_path / "out"), device_type="cpu", report_to="none",
                                ipu_config_overrides="device_iterations=3", gradient_accumulation_steps=4)
    with caplog.at_level(logging.WARNING, logger="ipu_train"):  # as with --log_level warning
        load_ipu_config(args, str(folder))
    [record] = [r for r in caplog.records if "ipu_config.json" in r.getMessage()]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    for part in (str(folder / "ipu_config.json"), "layers_per_ipu=[0, 4, 4, 4]", "ipus_per_replica=4",
                 "gradient_accumulation_steps=4", "device_iterations=3", "replication_factor=1",
                 "--ipu_config_name or --ipu_config_overrides"):
        assert part in message


def test_an_ipu_config_asked_for_is_not_warned_about(tmp_path, caplog):
    folder = model_directory(tmp_path)
    args = IPUTrainingArguments(output_dir=str(tmp_path / "out"), device_type="cpu", report_to="none",
                                ipu_config_name=str(folder))
    with caplog.at_level(logging.INFO, logger="ipu_train"):
        load_ipu_config(args, str(folder))
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "ipu_train"] == [
        ("INFO", f"IPU configuration: {folder} (--ipu_config_name)")]


# --- evaluation ----------------------------------------------------------------------------------------------------

class Stream(torch.utils.data.IterableDataset):
    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def evaluated(tmp_path, caplog, capsys, eval_dataset, world_process_zero=True, **overrides):
    """(log, stderr) of one evaluation of 10 samples in batches of 4."""
    args = make_args(tmp_path, **{"disable_tqdm": False, **overrides})
    trainer = make_trainer(tmp_path, token_rows(4), args=args, eval_dataset=eval_dataset)
    trainer.state.is_world_process_zero = world_process_zero
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="ipu_train"):
        trainer.evaluate()
    return caplog.text, capsys.readouterr().err


def test_evaluation_says_what_it_evaluates_and_shows_a_bar(tmp_path, caplog, capsys):
    log, stderr = evaluated(tmp_path, caplog, capsys, token_rows(10))
    assert re.search(r"\*\*\*\*\* Running Evaluation \*\*\*\*\*\n.*  Num examples = 10\n.*  Batch size = 4\n", log)
    assert bar_reached(stderr, 3)


@pytest.mark.parametrize("overrides, world_process_zero", [({"disable_tqdm": True}, True), ({}, False)])
def test_no_evaluation_bar_with_disable_tqdm_or_off_the_main_process(tmp_path, caplog, capsys, overrides,
                                                                    world_process_zero):
    log, stderr = evaluated(tmp_path, caplog, capsys, token_rows(10), world_process_zero, **overrides)
    assert "  Num examples = 10" in log
    assert "3/3" not in stderr


def test_a_share_held_as_a_subset_counts_the_whole_dataset():
    """PopTorch's loader holds this process's share as a Subset: the header counts every process's samples."""
    rows = token_rows(10)
    assert _num_examples(torch.utils.data.DataLoader(torch.utils.data.Subset(rows, range(3)))) == 10


def test_a_streamed_evaluation_set_has_no_count(tmp_path, caplog, capsys):
    log, _ = evaluated(tmp_path, caplog, capsys, Stream(token_rows(10)))
    assert "  Num examples: Unknown" in log and "  Num examples =" not in log


# --- --help ----------------------------------------------------------------------------------------------------------

def flag_lines(help_text):
    """The flags --help defines, in order (not the flags that help texts mention)."""
    return [line.split()[0].rstrip(",") for line in help_text.splitlines() if re.match(r"^  --\w", line)]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.__name__)
def test_help_lists_the_ipu_and_data_flags_before_the_inherited_ones(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    usage, body = text.split("\noptions:\n")
    flags = flag_lines(body)
    data_flag = "--train_file" if "--train_file" in flags else "--dataset_name"
    order = [flags.index(flag) for flag in (data_flag, "--ipu_config_name", "--pod_type", "--n_ipu",
                                            "--per_device_train_batch_size", "--learning_rate")]
    assert order == sorted(order)
    assert usage.index("--ipu_config_name") < usage.index("--per_device_train_batch_size")
    assert body.index("IPU training") < body.index("TrainingArguments (from transformers):")


def test_the_help_groups_change_no_flag():
    """Every flag parses as HfArgumentParser builds it: same option strings, destinations, types and defaults."""
    classes = (ModelArguments, DataArguments, IPUTrainingArguments)
    ours, plain = ScriptArgumentParser(classes), HfArgumentParser(classes)

    def described(parser):  # a choice's type is a function built per flag: compared by name
        return {option: (action.dest, action.nargs, action.const, action.default,
                         getattr(action.type, "__qualname__", action.type), action.choices, action.required)
                for option, action in parser._option_string_actions.items()}

    assert described(ours) == described(plain)
    argv = ["--output_dir", "out", "--device", "cpu", "--ipu-config-overrides", "device_iterations=2",
            "--learning_rate", "1e-4", "--gradient_accumulation_steps", "3", "--torch_compile"]
    assert ours.parse_args(argv) == plain.parse_args(argv)
