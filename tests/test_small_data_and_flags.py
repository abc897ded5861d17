"""Small data and contradicting flags, end to end through main(argv) (issue 11): a validation set smaller than one
evaluation batch evaluates every sample; a training set smaller than one combined batch trains with
--pad_on_batch_axis or is refused naming it; --dataset_path with other data flags, and --config_overrides that change
a pretrained model's shape, are one-line errors; the config logged is the model's as built; --push_to_hub without
the Hub or a token stops before any work."""
import json
from types import SimpleNamespace

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

import run_clm
from ipu_train.loading import check_hub_access

from .test_scripts_clm_mlm import clm_args, results, run_and_expect_user_error
from .test_scripts_inputs import global_step, pretrained_gpt2, without  # noqa: F401 (a fixture)

BLOCK = 32  # clm_args' --block_size


def expect_refused(main, argv, capsys, output_dir, *phrases):
    line = run_and_expect_user_error(main, argv, capsys, *phrases)
    assert not output_dir.exists()
    return line


# --- evaluation: every sample, however few ----------------------------------------------------------------------


def text_of_blocks(tokenizer, blocks):
    """One line of corpus words that tokenizes to `blocks` whole blocks and a part of one more."""
    words = "the interpreter reads each line of the program and runs it before the next one".split()
    text, i = "", 0
    while len(tokenizer(text)["input_ids"]) < blocks * BLOCK + BLOCK // 2:
        text += (" " if text else "") + words[i % len(words)]
        i += 1
    assert len(tokenizer(text)["input_ids"]) < (blocks + 1) * BLOCK
    return text


def test_a_validation_set_smaller_than_one_eval_batch_evaluates_every_sample(text_files, pretrained_gpt2, tmp_path):
    """3 blocks, an eval micro-batch of 8 and 5 micro-batches per read: one partial batch, every block in the
    loss and the accuracy, which equal the model's own over those 3 blocks."""
    tokenizer = AutoTokenizer.from_pretrained(pretrained_gpt2)
    validation = tmp_path / "validation.txt"
    validation.write_text(text_of_blocks(tokenizer, 3))  # one line, no line break
    out = tmp_path / "out"
    argv = clm_args(text_files, pretrained_gpt2, out)
    for flag in ("--model_type", "--config_overrides", "--tokenizer_name", "--train_file", "--validation_file",
                 "--max_eval_samples"):
        argv = without(argv, flag)
    run_clm.main(["--model_name_or_path", str(pretrained_gpt2), "--dtype", "float32", *argv, "--do_eval",
                  "--validation_file", str(validation), "--per_device_eval_batch_size", "8",
                  "--ipu_config_overrides", "inference_device_iterations=5"])
    metrics = results(out, "eval")
    assert metrics["eval_samples"] == 3

    ids = torch.tensor(tokenizer(validation.read_text())["input_ids"][:3 * BLOCK]).view(3, BLOCK)
    model = GPT2LMHeadModel.from_pretrained(pretrained_gpt2, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [model(block[None], labels=block[None]).loss.item() for block in ids]
        predicted = model(ids).logits[:, :-1].argmax(-1)
    assert metrics["eval_loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert metrics["eval_accuracy"] == pytest.approx((predicted == ids[:, 1:]).float().mean().item())


# --- training: fewer samples than one combined batch -------------------------------------------------------------


@pytest.mark.parametrize("samples, accumulation", [(3, 1), (5, 2)])
def test_too_few_training_samples_name_pad_on_batch_axis(samples, accumulation, text_files, bpe_tokenizer_dir,
                                                          tmp_path, capsys):
    out = tmp_path / "out"
    argv = clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--max_train_samples", str(samples),
                    "--gradient_accumulation_steps", str(accumulation))
    expect_refused(run_clm.main, argv, capsys, out, f"has {samples} samples but one batch needs {4 * accumulation}",
                   "--pad_on_batch_axis", "--per_device_train_batch_size", "--block_size")


@pytest.mark.parametrize("samples, accumulation", [(3, 1), (5, 2)])
def test_pad_on_batch_axis_trains_on_fewer_samples_than_one_batch(samples, accumulation, text_files,
                                                                   bpe_tokenizer_dir, tmp_path):
    """Each epoch is one optimizer step: the samples, completed with repeats of the first ones."""
    out = tmp_path / "out"
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--max_train_samples", str(samples),
                          "--gradient_accumulation_steps", str(accumulation), "--pad_on_batch_axis",
                          "--num_train_epochs", "3", "--logging_steps", "1"))
    assert global_step(out) == 3
    train = results(out, "train")
    assert train["train_samples"] == samples and train["train_loss"] > 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [entry["epoch"] for entry in history if "loss" in entry] == [1, 2, 3]


def test_pad_on_batch_axis_still_needs_one_sample(text_files, bpe_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--max_train_samples", "0",
                    "--pad_on_batch_axis")
    expect_refused(run_clm.main, argv, capsys, out, "has 0 samples", "add data")


# --- --push_to_hub ---------------------------------------------------------------------------------------------------


@pytest.fixture
def no_preprocessing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the data was loaded before --push_to_hub was checked")
    monkeypatch.setattr(run_clm, "load_raw_datasets", refuse)


@pytest.fixture
def online_without_token(monkeypatch, tmp_path):
    """The Hub online, and no token anywhere huggingface_hub looks (environment, saved login)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert huggingface_hub.get_token() is None


def test_push_to_hub_offline_stops_before_any_work(text_files, bpe_tokenizer_dir, tmp_path, capsys, monkeypatch,
                                                   no_preprocessing):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    argv = clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--push_to_hub", "--hub_token", "hf_x")
    expect_refused(run_clm.main, argv, capsys, out, "--push_to_hub", "offline", "HF_HUB_OFFLINE",
                   "drop --push_to_hub")


def test_push_to_hub_without_a_token_stops_before_any_work(text_files, bpe_tokenizer_dir, tmp_path, capsys,
                                                           online_without_token, no_preprocessing):
    out = tmp_path / "out"
    argv = clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--push_to_hub")
    expect_refused(run_clm.main, argv, capsys, out, "--push_to_hub needs a Hub token", "--hub_token", "HF_TOKEN",
                   "hf auth login")


def test_push_to_hub_online_with_a_token_passes_the_check(online_without_token, monkeypatch):
    check_hub_access(SimpleNamespace(push_to_hub=True, hub_token="hf_flag"))
    monkeypatch.setenv("HF_TOKEN", "hf_environment")
    check_hub_access(SimpleNamespace(push_to_hub=True, hub_token=None))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a token is not enough offline
    with pytest.raises(Exception, match="offline"):
        check_hub_access(SimpleNamespace(push_to_hub=True, hub_token=None))
    check_hub_access(SimpleNamespace(push_to_hub=False, hub_token=None))  # nothing to check without the flag
