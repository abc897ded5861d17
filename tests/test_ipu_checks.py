"""What the IPU target refuses when compiling, refused before any data is read (IPUConfig.check_for_ipu): pipelined
training needs gradient_accumulation_steps >= 2 x forward stages - 1, and the IPUs PopTorch reserves (a power of two)
must fit what --n_ipu / --pod_type give. Each rule refuses with one line naming the key and the fix, and accepts
the fix; the shipped configurations pass with their own settings; the plan printer and the scripts (with --device
ipu) run the same check; CPU runs with the same configurations are not refused."""
import os
import sys
import types

import datasets
import pytest

import run_clm
from ipu_train.config import IPUConfig, IPUConfigError
from ipu_train.plan import main as plan_main

from .conftest import REPO
from .test_scripts_clm_mlm import clm_args, run_and_expect_user_error

CONFIGS = REPO / "ipu_configs"
SHIPPED = sorted(os.listdir(CONFIGS))
# name: forward pipeline stages of its training layout, IPU by IPU (the head back on IPU 0)
STAGES = {
    "bert-base": [0, 1, 2, 3, 0],
    "bert-large": [0, 1, 2, 3, 0],
    "roberta-base": [0, 1, 2, 3, 0],
    "roberta-large": [0, 1, 2, 3, 0],
    "gpt2": [0, 1, 2, 3, 0],
    "gpt2-medium": [0, 1, 2, 3, 4, 5, 6, 7, 0],
    "distilbert-base": [0, 1, 0],
    "xlnet-base": [0, 1, 2, 3, 0],
    "albert-base": [0],
}


def shipped(name, pod_type=None):
    return IPUConfig.from_pretrained(CONFIGS / name).for_pod_type(pod_type)


# --- the rules ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers, ipus, path", [
    ([0, 4, 4, 4], None, [0, 1, 2, 3, 0]),  # IPU 0 holds only the embeddings and the head
    ([3, 7, 7, 7], None, [0, 1, 2, 3, 0]),  # layers on IPU 0 too: no extra stage
    ([2, 4], None, [0, 1, 0]),
    ([-1], 4, [0, 1, 2, 3, 0]),  # a share of the layers on every IPU
    ([0, -1, -1, -1], None, [0, 1, 2, 3, 0]),
    ([0, 3, 3, 0], None, [0, 1, 2, 0]),  # an IPU without layers is no stage
    ([-1], None, [0]),  # one IPU: no pipeline
])
def test_the_forward_pipeline_runs_from_ipu_0_over_the_layers_and_back_to_ipu_0(layers, ipus, path):
    config = IPUConfig(layers_per_ipu=layers, ipus_per_replica=ipus, gradient_accumulation_steps=64)
    assert config.pipeline_ipus() == path
    assert config.pipeline_stages() == len(path)
    assert config.min_gradient_accumulation() == 2 * len(path) - 1


def test_too_little_accumulation_for_the_pipeline_is_refused_in_one_line_and_the_fix_accepted():
    config = IPUConfig(layers_per_ipu=[0, 4, 4, 4], gradient_accumulation_steps=8)
    with pytest.raises(IPUConfigError) as refused:
        config.check_for_ipu()
    assert str(refused.value) == (
        "gradient_accumulation_steps=8 is below the 9 that pipelined training over 5 stages needs on IPU (2 x 5 - 1; "
        "IPU 0 -> 1 -> 2 -> 3 -> 0 from layers_per_ipu=[0, 4, 4, 4], the head back on IPU 0): pass "
        "--gradient_accumulation_steps 9 or more (or --ipu_config_overrides gradient_accumulation_steps=9)")
    config.update_from_string("gradient_accumulation_steps=9")  # the fix the message gives
    assert config.check_for_ipu() is config


def test_accumulation_is_not_needed_without_training_or_without_a_pipeline():
    IPUConfig(layers_per_ipu=[0, 4, 4, 4]).check_for_ipu(training=False)  # evaluation runs sharded
    IPUConfig(layers_per_ipu=[-1]).check_for_ipu()  # one IPU


def test_the_check_reads_the_training_layout_in_inference_mode_too():
    config = IPUConfig(layers_per_ipu=[0, 4, 4, 4], inference_layers_per_ipu=[-1], gradient_accumulation_steps=2)
    with config.in_mode("inference"), pytest.raises(IPUConfigError, match="^gradient_accumulation_steps=2 is below "
                                                                          "the 9"):
        config.check_for_ipu()


@pytest.mark.parametrize("values, flags, message, fix", [
    (dict(replication_factor=4), dict(n_ipu=8),
     "replication_factor=4 x ipus_per_replica=4 needs 16 IPUs but --n_ipu 8 has 8: set replication_factor=2 "
     "(--ipu_config_overrides replication_factor=2), or run on more IPUs", "replication_factor=2"),
    (dict(replication_factor=8), dict(pod_type="pod16"),
     "replication_factor=8 x ipus_per_replica=4 needs 32 IPUs but --pod_type pod16 has 16: set replication_factor=4 "
     "(--ipu_config_overrides replication_factor=4), or run on more IPUs", "replication_factor=4"),
    # PopTorch reserves a power of two: 3 replicas of 4 IPUs take 16
    (dict(replication_factor=3), dict(n_ipu=12),
     "replication_factor=3 x ipus_per_replica=4 needs 12 IPUs, which PopTorch rounds up to 16 (a power of two), but "
     "--n_ipu 12 has 12: set replication_factor=2 (--ipu_config_overrides replication_factor=2), or run on more IPUs",
     "replication_factor=2"),
    (dict(inference_replication_factor=2), dict(pod_type="pod4"),
     "inference_replication_factor=2 x inference_ipus_per_replica=4 needs 8 IPUs but --pod_type pod4 has 4: set "
     "inference_replication_factor=1 (--ipu_config_overrides inference_replication_factor=1), or run on more IPUs",
     "inference_replication_factor=1"),
    (dict(layers_per_ipu=[0, 2, 2, 2, 2, 2, 2, 0]), dict(pod_type="pod4"),
     "replication_factor=1 x ipus_per_replica=8 needs 8 IPUs but --pod_type pod4 has 4: lay the model over at most 4 "
     "IPUs (layers_per_ipu), or run on more IPUs", "layers_per_ipu=[0 4 4 4]"),
])
def test_more_ipus_than_available_are_refused_in_one_line_and_the_fix_accepted(values, flags, message, fix):
    config = IPUConfig(**{"layers_per_ipu": [0, 4, 4, 4], "gradient_accumulation_steps": 64, **values})
    with pytest.raises(IPUConfigError) as refused:
        config.check_for_ipu(**flags)
    assert str(refused.value) == message
    config.update_from_string(fix)
    config.check_for_ipu(**flags)


def test_without_n_ipu_or_pod_type_the_ipus_are_not_checked():
    IPUConfig(layers_per_ipu=[0, 4, 4, 4], replication_factor=64, gradient_accumulation_steps=9).check_for_ipu()


def test_ipus_needed_round_up_to_a_power_of_two():
    config = IPUConfig(layers_per_ipu=[4, 4, 4], replication_factor=1, inference_replication_factor=3)
    assert (config.ipus_needed(), config.ipus_needed(for_inference=True)) == (4, 16)


# --- the shipped configurations --------------------------------------------------------------------------------

def test_every_shipped_configuration_has_its_stages_listed():
    assert sorted(STAGES) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configurations_pass_the_ipu_check_with_their_own_settings(name):
    config = shipped(name)
    assert config.pipeline_ipus() == STAGES[name]
    assert config.gradient_accumulation_steps >= config.min_gradient_accumulation()
    config.check_for_ipu()
    pods = [pod for pod in IPUConfig.from_pretrained(CONFIGS / name).to_dict()["replication_factor"]
            if pod != "default"]
    assert pods
    for pod in pods:  # each pod the file defines: its replicas fill the pod exactly
        resolved = shipped(name, pod)
        resolved.check_for_ipu(pod_type=pod)
        assert resolved.ipus_needed() == resolved.ipus_needed(for_inference=True) == int(pod[len("pod"):])


# --- the plan printer ------------------------------------------------------------------------------------------

def test_plan_with_device_ipu_prints_the_stages_and_the_least_accumulation(capsys):
    assert plan_main(["--ipu_config", str(CONFIGS / "gpt2"), "--model_type", "gpt2", "--config_overrides",
                      "n_embd=32,n_head=2", "--pod_type", "pod16", "--device", "ipu"]) == 0
    out = capsys.readouterr().out
    assert ("IPU target: training pipelined over 5 stage(s), IPU 0 -> 1 -> 2 -> 3 -> 0 (the head back on IPU 0): "
            "gradient accumulation 128 >= 9 (2 x 5 - 1)\n"
            "            IPUs reserved: training 16, inference 16, of the 16 --pod_type pod16 gives\n") in out


def test_plan_without_device_ipu_neither_checks_nor_prints_the_ipu_target(capsys):
    assert plan_main(["--ipu_config", str(CONFIGS / "gpt2"), "--model_type", "gpt2", "--config_overrides",
                      "n_embd=32,n_head=2", "--ipu_config_overrides", "gradient_accumulation_steps=1"]) == 0
    assert "IPU target" not in capsys.readouterr().out


@pytest.mark.parametrize("extra, phrase", [
    (["--ipu_config_overrides", "gradient_accumulation_steps=8"],
     "gradient_accumulation_steps=8 is below the 9 that pipelined training over 5 stages needs on IPU"),
    (["--n_ipu", "8", "--ipu_config_overrides", "replication_factor=4"],
     "replication_factor=4 x ipus_per_replica=4 needs 16 IPUs but --n_ipu 8 has 8"),
])
def test_plan_with_device_ipu_fails_with_the_one_line_error(extra, phrase, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan_main(["--ipu_config", str(CONFIGS / "gpt2"), "--model_type", "gpt2", "--device", "ipu", *extra])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {phrase}"), err
    assert "IPU plan" not in captured.out


# --- the scripts -----------------------------------------------------------------------------------------------

@pytest.fixture
def no_data_read(monkeypatch):
    """poptorch importable (--device ipu needs it), and any data read fails the test."""
    monkeypatch.setitem(sys.modules, "poptorch", types.ModuleType("poptorch"))

    def refuse(*args, **kwargs):
        raise AssertionError("data was read before the IPU check")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


@pytest.mark.parametrize("flags, phrase", [
    (["--ipu_config_overrides", "layers_per_ipu=[0 1 1],gradient_accumulation_steps=4"],
     "gradient_accumulation_steps=4 is below the 7 that pipelined training over 4 stages needs on IPU"),
    (["--gradient_accumulation_steps", "4", "--ipu_config_overrides", "layers_per_ipu=[0 1 1]"],
     "pass --gradient_accumulation_steps 7 or more"),
    (["--n_ipu", "2", "--ipu_config_overrides", "replication_factor=3"],
     "replication_factor=3 x ipus_per_replica=1 needs 3 IPUs, which PopTorch rounds up to 4 (a power of two), but "
     "--n_ipu 2 has 2: set replication_factor=2"),
])
def test_an_ipu_run_is_refused_before_any_data_is_read(flags, phrase, no_data_read, text_files, bpe_tokenizer_dir,
                                                       tmp_path, capsys):
    out = tmp_path / "out"
    run_and_expect_user_error(run_clm.main, clm_args(text_files, bpe_tokenizer_dir, out, "--do_train",
                                                     "--device", "ipu", *flags), capsys, phrase)
    assert not out.exists()


def test_an_ipu_run_that_only_evaluates_needs_no_accumulation(no_data_read, text_files, bpe_tokenizer_dir, tmp_path):
    argv = clm_args(text_files, bpe_tokenizer_dir, tmp_path / "out", "--do_eval", "--device", "ipu",
                    "--ipu_config_name", str(CONFIGS / "gpt2"), "--ipu_config_overrides",
                    "layers_per_ipu=[0 1 1 0],gradient_accumulation_steps=1")
    with pytest.raises(AssertionError, match="data was read before the IPU check"):  # the check passed
        run_clm.main(argv)


def test_a_cpu_run_with_a_pipelined_configuration_and_no_accumulation_is_not_refused(text_files, bpe_tokenizer_dir,
                                                                                      tmp_path):
    out = tmp_path / "out"
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--device", "cpu", "--max_steps", "1",
                          "--ipu_config_name", str(CONFIGS / "gpt2"), "--pod_type", "pod4", "--ipu_config_overrides",
                          "layers_per_ipu=[0 1 1 0],gradient_accumulation_steps=1"))
    assert (out / "train_results.json").is_file()


@pytest.mark.parametrize("part", ["embedding", "projection"])
def test_training_serialization_spread_over_ipus_is_refused(part):
    config = IPUConfig(layers_per_ipu=[1, 1], ipus_per_replica=2, gradient_accumulation_steps=9)
    config.update(**{f"serialized_{part}_splits_per_ipu": [1, 1]})
    key = f"serialized_{part}_splits_per_ipu"
    with pytest.raises(IPUConfigError, match=rf"^{key}=\[1, 1\] spreads the {part} over IPUs in training, .* pass "
                                             rf"--ipu_config_overrides {key}=null,{part}_serialization_factor=2 "
                                             rf"\(spread only inference_{key}\)$"):
        config.check_for_ipu()
    config.update(**{f"serialized_{part}_splits_per_ipu": [2, 0]}).check_for_ipu()  # all on IPU 0
    config.check_for_ipu(training=False)  # evaluation alone runs sharded


def test_an_ipu_run_pads_every_sequence_to_the_same_length(no_data_read, text_files, wordpiece_tokenizer_dir, tmp_path):
    import run_mlm
    from ipu_train.workflow import start

    argv = ["--model_type", "bert", "--tokenizer_name", str(wordpiece_tokenizer_dir), "--train_file",
            str(text_files / "train.txt"), "--line_by_line", "--max_seq_length", "64", "--do_train", "--device", "ipu",
            "--ipu_config_overrides", "gradient_accumulation_steps=1", "--output_dir", str(tmp_path / "out")]
    _, data_args, *_ = start(run_mlm.DataTrainingArguments, argv)
    assert data_args.pad_to_max_length  # PopTorch runs the shapes it compiled: no batch padded to its own longest
    _, on_cpu, *_ = start(run_mlm.DataTrainingArguments, [*argv[:-6], "--device", "cpu", *argv[-4:]])
    assert not on_cpu.pad_to_max_length
