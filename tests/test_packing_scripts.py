"""--pack_sequences from the command line (issue 15): run_pretraining.py and run_mlm.py --line_by_line train and
evaluate on packed rows, report the same evaluation as without packing, resume exactly, and refuse what cannot
pack with one line."""
import json
import logging
import shutil
import sys
import types

import pytest

import run_clm
import run_mlm
import run_plm
import run_pretraining
from ipu_train.packing import DataCollatorForPackedSequences

from .test_script_plm import plm_args
from .test_script_pretraining import pretraining_args
from .test_scripts_clm_mlm import TINY_BERT, clm_args, logged_losses, mlm_args, results, run_and_expect_user_error

PACK = ("--pack_sequences", "--max_sequences_per_pack", "3")
NO_DROPOUT = ",hidden_dropout_prob=0.0,attention_probs_dropout_prob=0.0"


def without_dropout(argv):
    at = argv.index("--config_overrides")
    return argv[:at + 1] + [argv[at + 1] + NO_DROPOUT] + argv[at + 2:]


def packing_lines(caplog):
    return [record.getMessage() for record in caplog.records if record.getMessage().startswith("Packing the")]


def test_pretraining_trains_and_evaluates_on_packed_rows(text_files, wordpiece_tokenizer_dir, tmp_path, caplog):
    out = tmp_path / "packed"
    caplog.set_level(logging.INFO, logger="ipu_train")
    run_pretraining.main(pretraining_args(text_files, wordpiece_tokenizer_dir, out, "--do_train", "--do_eval",
                                          "--max_steps", "12", "--dataloader_num_workers", "2",
                                          "--short_seq_probability", "0.6", *PACK))
    losses = logged_losses(out)
    assert losses[-1] < losses[0]
    lines = packing_lines(caplog)
    assert [line.split(":")[0] for line in lines] == ["Packing the train split", "Packing the validation split"]
    attention = [record.getMessage() for record in caplog.records if record.getMessage().startswith("Packed rows")]
    assert [line.split(": ")[:2] for line in attention] == [  # once per mode: the CPU takes the mask
        ["Packed rows (training)", "attention through SDPA with a block-diagonal mask, not the variable-length kernel"],
        ["Packed rows (evaluation)", "attention through SDPA with a block-diagonal mask, not the variable-length "
                                     "kernel"]]
    one_per_row, packed = (float(part.split()[0]) for part in lines[0].split(": ")[-1].split(", "))
    assert 0 < one_per_row < packed <= 1  # short pairs of the corpus: packing fills the rows
    metrics = results(out, "eval")
    assert metrics["eval_samples"] == 32  # sequences, not rows
    for key in ("eval_mlm_accuracy", "eval_nsp_accuracy"):
        assert 0 <= metrics[key] <= 1
    train = results(out, "train")
    assert train["train_samples"] > 0
    # Tokens seen are the pairs' own (those of sequence_in_row's sequences), not the rows' padding.
    seen = json.loads((out / "trainer_state.json").read_text())["num_input_tokens_seen"]
    assert 0 < seen <= 12 * 8 * 64


def test_mlm_line_by_line_trains_on_packed_rows(sentence_files, wordpiece_tokenizer_dir, tmp_path, caplog):
    out = tmp_path / "packed"
    caplog.set_level(logging.INFO, logger="ipu_train")
    run_mlm.main(mlm_args(sentence_files, wordpiece_tokenizer_dir, out, "--do_train", "--do_eval", "--max_steps", "12",
                          "--line_by_line", "--max_seq_length", "64", *PACK))
    losses = logged_losses(out)
    assert losses[-1] < losses[0]
    assert len(packing_lines(caplog)) == 2
    assert 0 <= results(out, "eval")["eval_accuracy"] <= 1


def evaluation(main, argv, out):
    main(argv + ["--output_dir", str(out)])
    return results(out, "eval")


def packed_rows(caplog):
    """(sequences, rows) of the last split packed."""
    words = packing_lines(caplog)[-1].split(": ")[1].split()
    return int(words[0]), int(words[3])


def corpus_sentences(text_files, name, words=6):
    """The corpus's sentences cut to their first `words` words: about 15 tokens of the fixtures' small vocabulary."""
    text = (text_files / name).read_text(encoding="utf-8")
    return [" ".join(sentence.split()[:words]) + "." for sentence in text.replace("\n", " ").split(". ")
            if sentence.strip()]


@pytest.fixture(scope="module")
def sentence_files(text_files, tmp_path_factory):
    """The corpus one sentence per line: short lines, which packing puts several to a row."""
    folder = tmp_path_factory.mktemp("sentences")
    for name in ("train.txt", "validation.txt"):
        (folder / name).write_text("\n".join(corpus_sentences(text_files, name)) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def short_documents(text_files, tmp_path_factory):
    """Documents of two sentences: short sentence pairs (with few random next sentences, which fill the row)."""
    folder = tmp_path_factory.mktemp("short_documents")
    for name in ("train.txt", "validation.txt"):
        sentences = corpus_sentences(text_files, name)
        documents = [" ".join(sentences[i:i + 2]) for i in range(0, len(sentences) - 1, 2)]
        (folder / name).write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return folder


def test_pretraining_evaluation_is_the_same_packed_or_not(short_documents, wordpiece_tokenizer_dir, tmp_path,
                                                         caplog):
    """The same pairs, masked the same way (each sequence masked alone, with the same draws), give the same MLM
    and NSP sums whether they lie one per padded row or packed; the evaluation batch holds all of them, so the
    model's own loss agrees too."""
    caplog.set_level(logging.INFO, logger="ipu_train")
    argv = without_dropout(pretraining_args(short_documents, wordpiece_tokenizer_dir, tmp_path / "unused",
                                            "--do_eval", "--per_device_eval_batch_size", "64", "--max_eval_samples",
                                            "40", "--nsp_probability", "0.2"))
    padded = evaluation(run_pretraining.main, argv, tmp_path / "padded")
    packed = evaluation(run_pretraining.main, argv + list(PACK), tmp_path / "packed")
    sequences, rows = packed_rows(caplog)
    assert sequences == 40 and rows < 30  # the rows hold several pairs
    assert padded["eval_samples"] == packed["eval_samples"] == 40
    for key in ("eval_loss", "eval_mlm_loss", "eval_mlm_accuracy", "eval_nsp_loss", "eval_nsp_accuracy",
                "perplexity"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-5), key


def test_mlm_evaluation_is_the_same_packed_or_not(sentence_files, roberta_tokenizer_dir, tmp_path, caplog):
    """RoBERTa counts its positions from the padding index: packed rows restart them after it."""
    caplog.set_level(logging.INFO, logger="ipu_train")
    argv = without_dropout(mlm_args(sentence_files, roberta_tokenizer_dir, tmp_path / "unused", "--do_eval",
                                    "--model_type", "roberta", "--config_overrides", TINY_BERT.replace("64", "66"),
                                    "--line_by_line", "--max_seq_length", "64", "--per_device_eval_batch_size",
                                    "64"))
    padded = evaluation(run_mlm.main, argv, tmp_path / "padded")
    packed = evaluation(run_mlm.main, argv + list(PACK), tmp_path / "packed")
    sequences, rows = packed_rows(caplog)
    assert sequences == 32 and rows < 20
    for key in ("eval_loss", "eval_accuracy", "perplexity"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-5), key


def test_a_packed_run_resumes_exactly(text_files, wordpiece_tokenizer_dir, tmp_path, caplog):
    """Steps 5 to 8 from checkpoint-4 take the same packed rows, masks and dropout as the run that did not stop."""
    steps = ("--do_train", "--max_steps", "8", "--save_steps", "4", "--short_seq_probability", "0.6", *PACK)
    full = tmp_path / "full"
    run_pretraining.main(pretraining_args(text_files, wordpiece_tokenizer_dir, full, *steps))
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")  # as a run killed after its first save
    caplog.set_level(logging.INFO, logger="ipu_train")
    run_pretraining.main(pretraining_args(text_files, wordpiece_tokenizer_dir, resumed, *steps))  # the same command
    assert any(m.startswith("Resuming from") and "checkpoint-4" in m for m in caplog.messages)
    assert len(logged_losses(full)) == 4  # logged every 2 steps; the resumed state keeps steps 2 and 4
    assert logged_losses(resumed) == logged_losses(full)
    assert json.loads((resumed / "train_results.json").read_text())["train_loss"] == pytest.approx(
        json.loads((full / "train_results.json").read_text())["train_loss"], rel=1e-6)


def test_saved_pairs_pack_as_the_raw_text_does(text_files, wordpiece_tokenizer_dir, tmp_path, caplog):
    saved = tmp_path / "pairs"
    caplog.set_level(logging.INFO, logger="ipu_train")
    run_pretraining.main(pretraining_args(text_files, wordpiece_tokenizer_dir, tmp_path / "raw", "--do_train",
                                          "--max_steps", "2", "--save_preprocessed_dataset", str(saved), *PACK))
    from_raw = packing_lines(caplog)
    caplog.clear()
    argv = pretraining_args(text_files, wordpiece_tokenizer_dir, tmp_path / "disk", "--do_train", "--max_steps", "2",
                            "--dataset_path", str(saved), *PACK)
    for flag in ("--train_file", "--validation_file"):
        at = argv.index(flag)
        argv = argv[:at] + argv[at + 2:]
    run_pretraining.main(argv)
    assert packing_lines(caplog) == from_raw[:1]  # training only: the same rows


def test_the_packed_collator_caps_a_row_at_its_sequences_caps(wordpiece_tokenizer_dir):
    from transformers import AutoTokenizer

    from ipu_train.data import DataCollatorForCappedMLM

    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    mlm = DataCollatorForCappedMLM(tokenizer, max_masked_tokens=32)
    assert DataCollatorForPackedSequences(mlm, 128, 3, 0).max_masked_tokens == 96
    assert DataCollatorForPackedSequences(mlm, 64, 3, 0).max_masked_tokens == 64  # a row holds 64 tokens at most
    uncapped = DataCollatorForCappedMLM(tokenizer, max_masked_tokens=None)
    assert DataCollatorForPackedSequences(uncapped, 128, 3, 0).max_masked_tokens is None


@pytest.mark.parametrize("script,extra,phrases", [
    ("mlm", [], ["--pack_sequences", "--line_by_line"]),
    ("mlm", ["--line_by_line", "--pad_to_max_length"], ["--pack_sequences", "drop --pad_to_max_length"]),
    ("pretraining", ["--pad_to_max_length"], ["--pack_sequences", "drop --pad_to_max_length"]),
    ("pretraining", ["--max_sequences_per_pack", "0"], ["--max_sequences_per_pack 0"]),
    ("pretraining", ["--device", "ipu"], ["--pack_sequences", "--device ipu"]),
    ("clm", [], ["--pack_sequences", "run_mlm.py --line_by_line", "drop --pack_sequences"]),
    ("plm", [], ["--pack_sequences", "drop --pack_sequences"]),
])
def test_what_cannot_pack_is_refused_in_one_line(script, extra, phrases, text_files, wordpiece_tokenizer_dir,
                                                 bpe_tokenizer_dir, unigram_tokenizer_dir, tmp_path, capsys,
                                                 monkeypatch):
    monkeypatch.setitem(sys.modules, "poptorch", types.ModuleType("poptorch"))  # --device ipu needs it importable
    out = tmp_path / "out"
    main, argv = {
        "mlm": (run_mlm.main, mlm_args(text_files, wordpiece_tokenizer_dir, out, "--do_train")),
        "pretraining": (run_pretraining.main, pretraining_args(text_files, wordpiece_tokenizer_dir, out,
                                                               "--do_train")),
        "clm": (run_clm.main, clm_args(text_files, bpe_tokenizer_dir, out, "--do_train")),
        "plm": (run_plm.main, plm_args(text_files, unigram_tokenizer_dir, out, "--do_train")),
    }[script]
    run_and_expect_user_error(main, argv + ["--pack_sequences", *extra], capsys, *phrases)
    assert not out.exists()


def test_a_pack_size_without_packing_is_refused(text_files, wordpiece_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = pretraining_args(text_files, wordpiece_tokenizer_dir, out, "--do_train") + ["--max_sequences_per_pack", "4"]
    run_and_expect_user_error(run_pretraining.main, argv, capsys, "--max_sequences_per_pack 4", "add --pack_sequences")
    assert not out.exists()


def test_sequences_saved_padded_pack_by_their_real_tokens():
    """Pre-tokenized pairs saved padded (e.g. to 128) pack by their attention mask's ones and lose their padding."""
    import datasets

    from ipu_train.errors import UserError
    from ipu_train.packing import SEQUENCE_INDEX, PackedDataset

    rows = {"input_ids": [[2, 7, 3, 0, 0, 0], [2, 8, 9, 3, 0, 0], [2, 5, 6, 7, 8, 3]],
            "attention_mask": [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1] * 6],
            "next_sentence_label": [0, 1, 1]}
    packed = PackedDataset(datasets.Dataset.from_dict(rows).select([2, 0, 1]), max_length=8, max_per_pack=3)
    assert packed.lengths == [6, 3, 4]
    assert sorted(map(sorted, packed.packing.packs)) == [[0], [1, 2]]
    pair = next(pack for pack in (packed[0], packed[1]) if len(pack) == 2)
    assert sorted((s["input_ids"], s["attention_mask"], s["next_sentence_label"], s[SEQUENCE_INDEX]) for s in pair) \
        == [([2, 7, 3], [1, 1, 1], 0, 1), ([2, 8, 9, 3], [1, 1, 1, 1], 1, 2)]
    left_padded = PackedDataset(datasets.Dataset.from_dict({"input_ids": [[0, 2, 3]], "attention_mask": [[0, 1, 1]]}),
                                8, 3)
    with pytest.raises(UserError, match="padded on the left"):
        left_padded[0]
