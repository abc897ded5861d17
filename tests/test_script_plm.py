"""run_plm.py (XLNet permutation LM) end to end, through its command line."""
import math

import pytest
from transformers import AutoTokenizer, XLNetConfig, XLNetLMHeadModel

import run_plm
from ipu_train.data import DataCollatorForPLM

from .test_scripts_clm_mlm import logged_losses, results, run_and_expect_user_error, script_args

TINY_XLNET = "n_layer=2,d_model=32,n_head=2,d_head=16,d_inner=64"


def plm_args(text_files, tokenizer_dir, output_dir, *extra):
    return script_args(text_files, tokenizer_dir, output_dir, "xlnet", TINY_XLNET, "--max_seq_length", 32,
                       eval_samples=16) + list(extra)


def without_flag(argv, flag):
    """`argv` less `flag` and its value: the run as if the flag had never been given."""
    at = argv.index(flag)
    return argv[:at] + argv[at + 2:]


@pytest.fixture
def batch_lengths(monkeypatch):
    """The sequence length of every batch run_plm.py builds, for training and evaluation."""
    lengths = []

    class RecordingCollator(DataCollatorForPLM):
        def __call__(self, examples):
            batch = super().__call__(examples)
            lengths.append(batch["input_ids"].shape[1])
            return batch

    monkeypatch.setattr(run_plm, "DataCollatorForPLM", RecordingCollator)
    return lengths


def test_xlnet_trains_evaluates_and_reloads(text_files, unigram_tokenizer_dir, tmp_path):
    out = tmp_path / "plm"
    run_plm.main(plm_args(text_files, unigram_tokenizer_dir, out, "--do_train", "--do_eval", "--max_steps", "12"))
    losses = logged_losses(out)
    assert losses[-1] < losses[0]
    metrics = results(out, "eval")
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert XLNetLMHeadModel.from_pretrained(out).config.n_layer == 2


@pytest.mark.parametrize("pad_to_max_length", [True, False])
def test_line_by_line_pads_every_line_to_max_seq_length_only_when_asked(
        pad_to_max_length, text_files, unigram_tokenizer_dir, tmp_path, batch_lengths):
    out = tmp_path / "lbl"
    # No line of the test corpus reaches 512 tokens: a batch 512 long is padded, not truncated.
    flags = ["--line_by_line", "--max_seq_length", "512", "--do_train", "--do_eval", "--max_steps", "2"]
    run_plm.main(plm_args(text_files, unigram_tokenizer_dir, out, *flags,
                          *(["--pad_to_max_length"] if pad_to_max_length else [])))
    assert len(logged_losses(out)) == 1
    if pad_to_max_length:
        assert set(batch_lengths) == {512}
    else:  # each batch padded to its longest line, rounded up to an even length
        assert batch_lengths and max(batch_lengths) < 512
        assert all(length % 2 == 0 for length in batch_lengths)


def tokenizer_limited_to(tokenizer_dir, model_max_length, folder):
    AutoTokenizer.from_pretrained(tokenizer_dir, model_max_length=model_max_length).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("requested, tokenizer_limit, expected", [
    (None, 35, 34),  # the default (512) clamped to the tokenizer's odd maximum, then rounded down to even
    (512, 40, 40),  # a request longer than the tokenizer allows
])
def test_max_seq_length_is_clamped_to_the_tokenizer_and_kept_even(
        requested, tokenizer_limit, expected, text_files, unigram_tokenizer_dir, tmp_path, batch_lengths, caplog):
    tokenizer_dir = tokenizer_limited_to(unigram_tokenizer_dir, tokenizer_limit, tmp_path / "tokenizer")
    argv = without_flag(plm_args(text_files, tokenizer_dir, tmp_path / "out", "--do_train", "--max_steps", "2"),
                        "--max_seq_length")
    if requested is not None:
        argv += ["--max_seq_length", str(requested)]
    run_plm.main(argv)
    assert set(batch_lengths) == {expected}  # every block of grouped text
    assert f"using {expected}" in caplog.text


def test_no_model_given_trains_a_new_xlnet_from_xlnet_config(text_files, unigram_tokenizer_dir, tmp_path, caplog):
    """As Hugging Face's run_plm.py: XLNetConfig() plus --config_overrides."""
    out = tmp_path / "new"
    argv = without_flag(plm_args(text_files, unigram_tokenizer_dir, out, "--do_train", "--max_steps", "2"),
                        "--model_type")
    run_plm.main(argv)
    assert "Training a new xlnet model from scratch" in caplog.text
    expected = XLNetConfig()
    expected.update_from_string(TINY_XLNET)
    saved = XLNetConfig.from_pretrained(out).to_dict()
    fitted_to_the_tokenizer = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")
    differences = {key for key, value in expected.to_dict().items() if saved.get(key) != value}
    assert differences <= {*fitted_to_the_tokenizer, "architectures", "dtype", "transformers_version"}
    assert saved["n_layer"] == 2 and saved["vocab_size"] == 500


def test_contradicting_config_overrides_are_a_user_error(text_files, unigram_tokenizer_dir, tmp_path, capsys):
    argv = plm_args(text_files, unigram_tokenizer_dir, tmp_path / "out", "--do_train", "--max_steps", "2",
                    "--config_overrides", "d_model=32,n_head=2")
    run_and_expect_user_error(run_plm.main, argv, capsys, "--config_overrides", "d_head")


def test_odd_length_is_refused_before_any_work(text_files, unigram_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "odd"
    argv = plm_args(text_files, unigram_tokenizer_dir, out, "--do_train", "--max_steps", "2", "--max_seq_length", "33")
    run_and_expect_user_error(run_plm.main, argv, capsys, "--max_seq_length 33", "even")
    assert not out.exists()
