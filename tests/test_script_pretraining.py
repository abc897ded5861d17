"""run_pretraining.py (BERT MLM + NSP) end to end: from raw text, and from the pairs it saved."""
import math

import datasets
import pytest
from transformers import BertForPreTraining

import run_pretraining

from .test_scripts_clm_mlm import TINY_BERT, logged_losses, results, run_and_expect_user_error, script_args


def pretraining_args(text_files, tokenizer_dir, output_dir, *extra):
    return script_args(text_files, tokenizer_dir, output_dir, "bert", TINY_BERT, "--max_seq_length", 64) + list(extra)


def from_saved_pairs(argv):
    """argv without --train_file and --validation_file: --dataset_path holds all the data and refuses them."""
    for flag in ("--train_file", "--validation_file"):
        at = argv.index(flag)
        argv = argv[:at] + argv[at + 2:]
    return argv


def test_pretraining_from_raw_text_then_from_the_saved_pairs(text_files, wordpiece_tokenizer_dir, tmp_path):
    out, saved = tmp_path / "raw", tmp_path / "pairs"
    run_pretraining.main(pretraining_args(text_files, wordpiece_tokenizer_dir, out, "--do_train", "--do_eval",
                                          "--max_steps", "16", "--save_preprocessed_dataset", str(saved)))
    losses = logged_losses(out)
    assert losses[-1] < losses[0]
    metrics = results(out, "eval")
    for key in ("eval_loss", "eval_mlm_loss", "eval_nsp_loss", "eval_mlm_accuracy", "eval_nsp_accuracy"):
        assert key in metrics
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_mlm_loss"]))
    # The model's loss is MLM + NSP; reduced per batch vs per token, the two agree closely, not exactly.
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_mlm_loss"] + metrics["eval_nsp_loss"], rel=0.05)
    assert BertForPreTraining.from_pretrained(out).config.num_hidden_layers == 2

    pairs = datasets.load_from_disk(str(saved))
    assert set(pairs["train"].column_names) >= {"input_ids", "token_type_ids", "attention_mask",
                                                "next_sentence_label"}
    assert max(len(ids) for ids in pairs["train"]["input_ids"]) <= 64

    again = tmp_path / "from_disk"
    run_pretraining.main(from_saved_pairs(pretraining_args(text_files, wordpiece_tokenizer_dir, again, "--do_train",
                                                           "--max_steps", "16", "--dataset_path", str(saved),
                                                           "--pad_to_max_length")))
    assert logged_losses(again)[-1] < logged_losses(again)[0]


@pytest.mark.parametrize("change, phrases", [
    (["--is_already_masked"], ["--is_already_masked", "--is_already_preprocessed"]),
    (["--dataset_path", "nowhere"], ["--dataset_path nowhere does not exist"]),
    (["--streaming", "--max_steps", "2"], ["--streaming", "--is_already_preprocessed"]),
    (["--is_already_preprocessed"], ["next_sentence_label", "--is_already_preprocessed"]),
    (["--mlm_probability", "0"], ["--mlm_probability 0"]),
    (["--max_seq_length", "4"], ["--max_seq_length 4", "at least 5"]),
    (["--model_type", "gpt2", "--config_overrides", "n_layer=2,n_embd=32,n_head=2,n_positions=64"],
     ["next-sentence head", "GPT2"]),
])
def test_pretraining_user_errors(change, phrases, text_files, wordpiece_tokenizer_dir, tmp_path, capsys):
    argv = pretraining_args(text_files, wordpiece_tokenizer_dir, tmp_path / "out", "--do_train", *change)
    if "--dataset_path" in change:
        argv = from_saved_pairs(argv)
    run_and_expect_user_error(run_pretraining.main, argv, capsys, *phrases)


def test_pretraining_needs_cls_and_sep(text_files, bpe_tokenizer_dir, tmp_path, capsys):
    argv = pretraining_args(text_files, bpe_tokenizer_dir, tmp_path / "out", "--do_train", "--max_steps", "2")
    run_and_expect_user_error(run_pretraining.main, argv, capsys, "[CLS]", "wordpiece")


def test_too_little_text_for_one_pair_says_so(wordpiece_tokenizer_dir, tmp_path, capsys):
    for name in ("train.txt", "validation.txt"):
        (tmp_path / name).write_text("\n \n\n")  # blank lines only: no document, so no pair
    argv = pretraining_args(tmp_path, wordpiece_tokenizer_dir, tmp_path / "out", "--do_train", "--max_steps", "2")
    run_and_expect_user_error(run_pretraining.main, argv, capsys, "no sentence pair could be built", "add text")


def test_already_masked_pairs_are_padded_with_their_labels(text_files, wordpiece_tokenizer_dir, tmp_path):
    """Unpadded pairs with their own `labels` (static masks): padded per batch, labels with -100."""
    saved = tmp_path / "pairs"
    run_pretraining.main(pretraining_args(text_files, wordpiece_tokenizer_dir, tmp_path / "first", "--do_train",
                                          "--max_steps", "1", "--save_preprocessed_dataset", str(saved)))
    pairs = datasets.load_from_disk(str(saved))

    def mask_every_seventh(example):
        labels = [token if i % 7 == 3 else -100 for i, token in enumerate(example["input_ids"])]
        return {"labels": labels}

    masked = tmp_path / "masked"
    pairs.map(mask_every_seventh).save_to_disk(str(masked))
    out = tmp_path / "out"
    run_pretraining.main(from_saved_pairs(pretraining_args(text_files, wordpiece_tokenizer_dir, out, "--do_train",
                                                           "--do_eval", "--max_steps", "4", "--dataset_path",
                                                           str(masked), "--is_already_masked")))
    metrics = results(out, "eval")
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_mlm_loss"]))
    assert len(logged_losses(out)) == 2


def test_prediction_loss_only_reports_no_mlm_perplexity(text_files, wordpiece_tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    run_pretraining.main(pretraining_args(text_files, wordpiece_tokenizer_dir, out, "--do_eval",
                                          "--prediction_loss_only"))
    metrics = results(out, "eval")
    assert "eval_loss" in metrics and "perplexity" not in metrics and "eval_mlm_loss" not in metrics
