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
import transformers
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertForPreTraining, GPT2LMHeadModel

import run_clm
import run_pretraining
from ipu_train.loading import check_hub_access

from .test_script_pretraining import from_saved_pairs, pretraining_args
from .test_scripts_clm_mlm import TINY_BERT, clm_args, results, run_and_expect_user_error
from .test_scripts_inputs import global_step, pretrained_args, pretrained_gpt2, without  # noqa: F401 (a fixture)

BLOCK = 32  # clm_args' --block_size


@pytest.fixture
def no_loading_bar():
    """transformers' "Loading weights" bar goes to stderr even with --disable_tqdm true: off, so that stderr holds
    the error line alone."""
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()


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
    expect_refused(run_clm.main, argv, capsys, out, "--max_train_samples 0: keep at least 1 sample")


# --- contradicting flags -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep, extra, phrases", [
    ("train", [], ["--dataset_path", "--train_file", "would be ignored", "drop --train_file"]),
    ("validation", [], ["--validation_file", "drop --validation_file to train on the saved pairs"]),
    ("both", [], ["--train_file", "and --validation_file"]),
    ("none", ["--dataset_name", "wikitext"], ["--dataset_name wikitext", "would be ignored"]),
    ("none", ["--save_preprocessed_dataset", "again"], ["--save_preprocessed_dataset again", "nothing to save",
                                                         "drop --save_preprocessed_dataset"]),
])
def test_dataset_path_with_other_data_flags_is_refused(keep, extra, phrases, text_files, wordpiece_tokenizer_dir,
                                                       tmp_path, capsys):
    out = tmp_path / "out"
    argv = pretraining_args(text_files, wordpiece_tokenizer_dir, out, "--do_train", "--dataset_path",
                            str(tmp_path / "pairs"), *extra)
    if keep != "both":
        argv = from_saved_pairs(argv) + ([f"--{keep}_file", str(text_files / f"{keep}.txt")] if keep != "none"
                                         else [])
    expect_refused(run_pretraining.main, argv, capsys, out, *phrases)


@pytest.mark.parametrize("overrides, named, effect", [
    ("n_layer=1", "--config_overrides n_layer=1 changes the shape", "2 there): 12 of its weights would be dropped"),
    ("n_layer=3", "--config_overrides n_layer=3 changes", "12 of its weights would be new and untrained"),
    ("n_embd=64", "--config_overrides n_embd=64 changes", "of another shape, so not loaded"),
    ("activation_function=gelu,n_layer=1", "--config_overrides n_layer=1 changes", "dropped"),
])
def test_config_overrides_that_reshape_a_pretrained_model_are_refused(overrides, named, effect, text_files,
                                                                     pretrained_gpt2, tmp_path, capsys,
                                                                     no_loading_bar):
    out = tmp_path / "out"
    argv = pretrained_args(text_files, pretrained_gpt2, out, "--config_overrides", overrides)
    line = expect_refused(run_clm.main, argv, capsys, out, named, effect, f"--config_name {pretrained_gpt2}",
                          "--model_type gpt2", f"drop {named.split()[1]} from --config_overrides")
    assert "activation_function" not in line  # the item that keeps every weight is not blamed


@pytest.fixture(scope="module")
def pretrained_bert_mlm(wordpiece_tokenizer_dir, tmp_path_factory):
    """A tiny BERT with a masked-LM head only: pretraining adds the next-sentence head, untrained."""
    folder = tmp_path_factory.mktemp("pretrained_bert_mlm")
    torch.manual_seed(0)
    values = dict(item.split("=") for item in TINY_BERT.split(","))
    config = BertConfig(vocab_size=500, **{key: int(value) for key, value in values.items()})
    BertForMaskedLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir).save_pretrained(folder)
    return folder


def bert_args(text_files, pretrained, output_dir, overrides):
    argv = pretraining_args(text_files, pretrained, output_dir, "--do_train", "--max_steps", "1")
    argv = without(without(argv, "--model_type"), "--tokenizer_name")
    return ["--model_name_or_path", str(pretrained), *without(argv, "--config_overrides"),
            "--config_overrides", overrides]


def test_overrides_on_a_checkpoint_without_the_nsp_head_blame_only_what_they_change(text_files, pretrained_bert_mlm,
                                                                                  tmp_path, capsys, no_loading_bar):
    """The NSP head is missing from the checkpoint with or without overrides: a dropout override trains, a layer
    count override is refused for the layer it drops, not for the head."""
    out = tmp_path / "dropout"
    run_pretraining.main(bert_args(text_files, pretrained_bert_mlm, out, "hidden_dropout_prob=0.0"))
    assert global_step(out) == 1
    assert BertForPreTraining.from_pretrained(out).config.hidden_dropout_prob == 0.0

    refused = tmp_path / "refused"
    line = expect_refused(run_pretraining.main, bert_args(text_files, pretrained_bert_mlm, refused,
                                                          "num_hidden_layers=1"), capsys, refused,
                          "--config_overrides num_hidden_layers=1 changes the shape", "num_hidden_layers 2 there",
                          "would be dropped", "--model_type bert")
    assert "seq_relationship" not in line and "untrained" not in line


# --- the config logged is the model's --------------------------------------------------------------------------------


def test_the_logged_config_is_the_model_as_built(text_files, bpe_tokenizer_dir, tmp_path, caplog):
    """GPT-2's default config says 50257 tokens; the model built for the 500-token tokenizer has 500: logged once,
    after the model is built, with the overrides that made it."""
    caplog.set_level("INFO")
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, tmp_path / "out", "--do_eval"))
    logged = [r.getMessage() for r in caplog.records if '"vocab_size"' in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].startswith("Model config (with --config_overrides n_layer=2,n_embd=32")
    assert '"vocab_size": 500' in logged[0] and '"n_layer": 2' in logged[0]
    tokenizer = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    assert f'"eos_token_id": {tokenizer.eos_token_id}' in logged[0]
    assert "50257" not in caplog.text and "50256" not in caplog.text


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
