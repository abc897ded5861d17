"""run_clm.py and run_mlm.py end to end, through their command lines, on tiny models and the bundled corpus."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

import run_clm
import run_mlm

from .conftest import REPO

TINY_GPT2 = "n_layer=2,n_embd=32,n_head=2,n_positions=64"
TINY_BERT = "num_hidden_layers=2,hidden_size=32,num_attention_heads=2,intermediate_size=64,max_position_embeddings=64"
OUTPUT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training_args.bin",
                "ipu_config.json", "train_results.json", "eval_results.json", "all_results.json",
                "trainer_state.json", "README.md")


def script_args(text_files, tokenizer_dir, output_dir, model_type, config_overrides, length_flag, length,
                train_batch=8, eval_samples=32):
    """The flags every end-to-end test shares: a tiny model from scratch on `text_files`, quick logging."""
    return ["--model_type", model_type, "--config_overrides", config_overrides, "--tokenizer_name", str(tokenizer_dir),
            "--train_file", str(text_files / "train.txt"), "--validation_file", str(text_files / "validation.txt"),
            length_flag, str(length), "--per_device_train_batch_size", str(train_batch),
            "--per_device_eval_batch_size", "8", "--learning_rate", "3e-3", "--output_dir", str(output_dir),
            "--report_to", "none", "--seed", "0", "--logging_steps", "2", "--disable_tqdm", "true",
            "--max_eval_samples", str(eval_samples)]


def clm_args(text_files, tokenizer_dir, output_dir, *extra):
    return script_args(text_files, tokenizer_dir, output_dir, "gpt2", TINY_GPT2, "--block_size", 32,
                       train_batch=4) + list(extra)


def mlm_args(text_files, tokenizer_dir, output_dir, *extra):
    return script_args(text_files, tokenizer_dir, output_dir, "bert", TINY_BERT, "--max_seq_length", 32) + list(extra)


def logged_losses(output_dir):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def results(output_dir, split):
    return json.loads((output_dir / f"{split}_results.json").read_text())


def assert_trained_and_saved(output_dir):
    for name in OUTPUT_FILES:
        assert (output_dir / name).is_file(), name
    losses = logged_losses(output_dir)
    assert len(losses) >= 3
    assert losses[-1] < losses[0]
    metrics = results(output_dir, "eval")
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert 0 <= metrics["eval_accuracy"] <= 1
    return metrics


def test_clm_trains_evaluates_saves_and_reloads(text_files, bpe_tokenizer_dir, tmp_path, caplog):
    out = tmp_path / "clm"
    caplog.set_level("INFO")
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--do_eval", "--max_steps", "16"))
    assert_trained_and_saved(out)
    assert "n_layer=2,n_embd=32" in caplog.text  # --config_overrides and the resulting config are logged
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.n_layer == 2 and model.config.vocab_size == 500


def test_mlm_trains_evaluates_saves_and_reloads(text_files, wordpiece_tokenizer_dir, tmp_path):
    out = tmp_path / "mlm"
    run_mlm.main(mlm_args(text_files, wordpiece_tokenizer_dir, out, "--do_train", "--do_eval", "--max_steps", "16"))
    assert_trained_and_saved(out)
    assert AutoModelForMaskedLM.from_pretrained(out).config.num_hidden_layers == 2


def test_mlm_line_by_line_with_padding(text_files, roberta_tokenizer_dir, tmp_path):
    out = tmp_path / "lbl"
    run_mlm.main(mlm_args(text_files, roberta_tokenizer_dir, out, "--do_train", "--do_eval", "--max_steps", "4",
                          "--model_type", "roberta", "--config_overrides", TINY_BERT.replace("64", "66"),
                          "--line_by_line", "--pad_to_max_length", "--prediction_loss_only"))
    metrics = results(out, "eval")
    assert "eval_accuracy" not in metrics  # --prediction_loss_only skips accuracy
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))


def typed(value):
    """A flag's text as the JSON/YAML value a user would write."""
    if value in ("true", "false"):
        return value == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def test_argument_files_give_the_same_run_as_flags(text_files, bpe_tokenizer_dir, tmp_path):
    """Evaluation of a freshly initialised model (same seed, same weights) through flags, .json and .yaml."""
    flags = clm_args(text_files, bpe_tokenizer_dir, tmp_path / "flags", "--do_eval")
    run_clm.main(flags)
    as_dict = {key.lstrip("-"): typed(value) for key, value in zip(flags[::2], flags[1::2])}  # drops --do_eval
    as_dict["do_eval"] = True
    for suffix, dump in ((".json", json.dumps), (".yaml", yaml.safe_dump)):
        as_dict["output_dir"] = str(tmp_path / suffix[1:])
        path = tmp_path / f"args{suffix}"
        path.write_text(dump(as_dict))
        run_clm.main([str(path)])
        assert results(tmp_path / suffix[1:], "eval")["eval_loss"] == results(tmp_path / "flags", "eval")["eval_loss"]


def test_resume_from_checkpoint_continues_the_run(text_files, bpe_tokenizer_dir, tmp_path):
    steps = ("--do_train", "--max_steps", "8", "--save_steps", "4")
    full = tmp_path / "full"
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, full, *steps))
    assert (full / "checkpoint-4").is_dir() and (full / "checkpoint-8").is_dir()
    resumed = tmp_path / "resumed"
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, resumed, *steps[:3], "--save_steps", "100",
                          "--resume_from_checkpoint", str(full / "checkpoint-4")))
    assert logged_losses(resumed) == logged_losses(full)[-len(logged_losses(resumed)):]
    assert json.loads((resumed / "trainer_state.json").read_text())["global_step"] == 8


def test_streaming_trains_with_max_steps(text_files, bpe_tokenizer_dir, tmp_path):
    out = tmp_path / "stream"
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--do_eval", "--streaming",
                          "--max_steps", "4"))
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert "eval_loss" in results(out, "eval")


def run_and_expect_user_error(main, argv, capsys, *phrases):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for phrase in phrases:
        assert phrase in err[0], err[0]
    return err[0]


@pytest.mark.parametrize("change, phrases", [
    (["--train_file", "missing.txt"], ["--train_file", "missing.txt", "does not exist"]),
    (["--train_file", "data.docx"], ["--train_file", "txt"]),
    (["--no_such_flag", "1"], ["--no_such_flag"]),
    (["--config_overrides", "n_layers=2"], ["--config_overrides", "n_layers"]),
    (["--block_size", "60", "--per_device_train_batch_size", "4096"], ["training data", "4096",
                                                                         "--per_device_train_batch_size"]),
    (["--streaming"], ["--streaming", "--max_steps"]),
    (["--ipu_config_overrides", "device_iterations=0"], ["device_iterations"]),
    (["--model_name_or_path", "no-such-model"], ["--model_name_or_path no-such-model", "offline"]),
    (["--tokenizer_name", "no-such-tokenizer"], ["--tokenizer_name no-such-tokenizer", "offline"]),
    (["--dataset_name", "no-such-dataset"], ["--dataset_name no-such-dataset", "offline"]),
    (["--block_size", "0"], ["--block_size 0", "1 or more"]),
    (["--validation_file", "v.jsonl"], ["--validation_file v.jsonl", "does not exist"]),
])
def test_clm_user_errors(change, phrases, text_files, bpe_tokenizer_dir, tmp_path, capsys):
    argv = clm_args(text_files, bpe_tokenizer_dir, tmp_path / "out", "--do_train", "--num_train_epochs", "1")
    argv += change
    run_and_expect_user_error(run_clm.main, argv, capsys, *phrases)


def test_compile_only_compiles_and_leaves_the_output_dir_empty(text_files, bpe_tokenizer_dir, tmp_path):
    out = tmp_path / "compiled"
    with pytest.raises(SystemExit) as exit_info:
        run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--do_eval", "--compile_only",
                              "--torch_compile_backend", "eager", "--max_steps", "4"))
    assert exit_info.value.code == 0
    assert not out.exists() or not any(out.iterdir())  # a real run can follow into the same directory


def test_mlm_refuses_a_tokenizer_without_mask_token(text_files, bpe_tokenizer_dir, tmp_path, capsys):
    argv = mlm_args(text_files, bpe_tokenizer_dir, tmp_path / "out", "--do_train", "--max_steps", "2")
    run_and_expect_user_error(run_mlm.main, argv, capsys, "mask token", "--tokenizer_name")


def test_non_empty_output_dir_is_refused_and_kept(text_files, bpe_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--max_steps", "2")
    run_and_expect_user_error(run_clm.main, argv, capsys, "--output_dir", "--overwrite_output_dir")
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_a_real_process_exits_2_without_traceback(text_files, bpe_tokenizer_dir, tmp_path):
    argv = clm_args(text_files, bpe_tokenizer_dir, tmp_path / "out", "--do_train", "--block_size", "abc")
    done = subprocess.run([sys.executable, str(REPO / "run_clm.py"), *argv], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "--block_size" in done.stderr


def test_mlm_whole_word_masking_with_byte_level_bpe(text_files, roberta_tokenizer_dir, tmp_path):
    """Byte-level BPE has no "##" marks: word boundaries must reach the collator as the `word_ids` column."""
    out = tmp_path / "wwm"
    run_mlm.main(mlm_args(text_files, roberta_tokenizer_dir, out, "--do_train", "--max_steps", "2",
                          "--model_type", "roberta", "--config_overrides", TINY_BERT.replace("64", "66"),
                          "--whole_word_masking"))
    assert len(logged_losses(out)) == 1


def test_clm_on_pre_tokenized_data_only_groups(bpe_tokenizer_dir, tmp_path):
    ids = torch.randint(0, 500, (64, 40), generator=torch.Generator().manual_seed(0)).tolist()
    for name, rows in (("train.jsonl", ids[:56]), ("validation.jsonl", ids[56:])):
        (tmp_path / name).write_text("".join(json.dumps({"id": i, "input_ids": row}) + "\n"
                                             for i, row in enumerate(rows)))
    out = tmp_path / "out"
    run_clm.main(["--model_type", "gpt2", "--config_overrides", TINY_GPT2, "--tokenizer_name", str(bpe_tokenizer_dir),
                  "--train_file", str(tmp_path / "train.jsonl"),
                  "--validation_file", str(tmp_path / "validation.jsonl"),
                  "--block_size", "32", "--per_device_train_batch_size", "4", "--do_train", "--do_eval",
                  "--max_steps", "4", "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true"])
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert results(out, "eval")["eval_samples"] == 8 * 40 // 32  # 8 rows of 40 ids, concatenated into 32-id blocks


def test_a_layout_that_does_not_fit_the_model_stops_before_the_data_is_processed(text_files, bpe_tokenizer_dir,
                                                                                   tmp_path, capsys):
    argv = clm_args(text_files, bpe_tokenizer_dir, tmp_path / "out", "--do_train", "--max_steps", "2",
                    "--ipu_config_overrides", "layers_per_ipu=[1 2]")
    run_and_expect_user_error(run_clm.main, argv, capsys, "layers_per_ipu=[1, 2]", "the model has 2")


def test_data_mistakes_are_user_errors(text_files, bpe_tokenizer_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "score": 0.5}) + "\n" for i in range(20)))
    yaml_file = tmp_path / "args.yaml"
    yaml_file.write_text("model_type: gpt2\n  bad: [indentation\n")
    base = clm_args(text_files, bpe_tokenizer_dir, tmp_path / "out", "--do_train", "--max_steps", "2")
    cases = [
        (base + ["--train_file", str(empty)], ["--train_file", "is empty"]),
        (base + ["--validation_file", str(rows)], ["differ in format"]),
        (base + ["--train_file", str(rows), "--validation_file", str(rows)], ["no text column", "id, score"]),
        ([str(yaml_file)], ["args.yaml is not valid YAML"]),
    ]
    for argv, phrases in cases:
        run_and_expect_user_error(run_clm.main, argv, capsys, *phrases)


def test_masked_lm_refuses_a_model_without_a_masked_lm_head(text_files, wordpiece_tokenizer_dir, tmp_path, capsys):
    argv = mlm_args(text_files, wordpiece_tokenizer_dir, tmp_path / "out", "--do_train", "--max_steps", "2",
                    "--model_type", "gpt2", "--config_overrides", TINY_GPT2)
    run_and_expect_user_error(run_mlm.main, argv, capsys, "--model_type gpt2", "AutoModelForMaskedLM")


def test_streaming_training_needs_no_validation_split(text_files, bpe_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "stream"
    argv = clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--streaming", "--max_steps", "2")
    at = argv.index("--validation_file")
    argv = argv[:at] + argv[at + 2:]  # a stream cannot be split: no validation data at all
    run_clm.main(argv)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    capsys.readouterr()
    run_and_expect_user_error(run_clm.main, argv + ["--do_eval", "--output_dir", str(tmp_path / "eval")], capsys,
                              "--do_eval", "no validation split", "--validation_file")


def test_a_tiny_file_still_holds_out_one_validation_line(tmp_path, bpe_tokenizer_dir, corpus_dir):
    small = tmp_path / "small.txt"
    small.write_text("".join((corpus_dir / "train.txt").read_text().splitlines(keepends=True)[:12]))
    out = tmp_path / "out"
    run_clm.main(["--model_type", "gpt2", "--config_overrides", TINY_GPT2, "--tokenizer_name", str(bpe_tokenizer_dir),
                  "--train_file", str(small), "--block_size", "16", "--do_train", "--do_eval", "--max_steps", "2",
                  "--per_device_train_batch_size", "2", "--output_dir", str(out), "--report_to", "none",
                  "--disable_tqdm", "true"])
    assert results(out, "eval")["eval_samples"] >= 1
