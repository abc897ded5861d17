"""run_plm.py (XLNet permutation LM) end to end, through its command line."""
import math

import pytest
from transformers import XLNetLMHeadModel

import run_plm

from .test_scripts_clm_mlm import logged_losses, results, run_and_expect_user_error, script_args

TINY_XLNET = "n_layer=2,d_model=32,n_head=2,d_head=16,d_inner=64"


def plm_args(text_files, tokenizer_dir, output_dir, *extra):
    return script_args(text_files, tokenizer_dir, output_dir, "xlnet", TINY_XLNET, "--max_seq_length", 32,
                       eval_samples=16) + list(extra)


def test_xlnet_trains_evaluates_and_reloads(text_files, unigram_tokenizer_dir, tmp_path):
    out = tmp_path / "plm"
    run_plm.main(plm_args(text_files, unigram_tokenizer_dir, out, "--do_train", "--do_eval", "--max_steps", "12"))
    losses = logged_losses(out)
    assert losses[-1] < losses[0]
    metrics = results(out, "eval")
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert XLNetLMHeadModel.from_pretrained(out).config.n_layer == 2


def test_xlnet_line_by_line(text_files, unigram_tokenizer_dir, tmp_path):
    out = tmp_path / "lbl"
    run_plm.main(plm_args(text_files, unigram_tokenizer_dir, out, "--do_train", "--max_steps", "2", "--line_by_line"))
    assert len(logged_losses(out)) == 1


def test_contradicting_config_overrides_are_a_user_error(text_files, unigram_tokenizer_dir, tmp_path, capsys):
    argv = plm_args(text_files, unigram_tokenizer_dir, tmp_path / "out", "--do_train", "--max_steps", "2",
                    "--config_overrides", "d_model=32,n_head=2")
    run_and_expect_user_error(run_plm.main, argv, capsys, "--config_overrides", "d_head")


def test_odd_length_is_refused_before_any_work(text_files, unigram_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "odd"
    argv = plm_args(text_files, unigram_tokenizer_dir, out, "--do_train", "--max_steps", "2", "--max_seq_length", "33")
    run_and_expect_user_error(run_plm.main, argv, capsys, "--max_seq_length 33", "even")
    assert not out.exists()
