"""The scripts' input flags end to end, through main(argv), on tiny models: data file formats, the held-out
validation split, sample limits, preprocessing workers, a pretrained model with config overrides and a dtype,
block sizes longer than the model, resuming from --output_dir, line breaks, and pre-tokenized pretraining pairs."""
import json

import datasets
import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

import run_clm
import run_pretraining

from .test_script_pretraining import pretraining_args
from .test_scripts_clm_mlm import clm_args, logged_losses, results

ALL_BLOCKS = "100000"  # a --max_eval_samples that keeps every block


def without(argv, flag):
    """argv less `flag` and its value."""
    at = argv.index(flag)
    return argv[:at] + argv[at + 2:]


def global_step(output_dir):
    return json.loads((output_dir / "trainer_state.json").read_text())["global_step"]


def paragraphs(path):
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def record_files(text_files, tmp_path_factory):
    """The paragraphs of train.txt / validation.txt as records {"id", "text"} in every record format; "id" comes
    first, so the script must pick the column named "text" rather than the first one."""
    folder = tmp_path_factory.mktemp("records")
    for split in ("train", "validation"):
        lines = paragraphs(text_files / f"{split}.txt")
        records = datasets.Dataset.from_dict({"id": list(range(len(lines))), "text": lines})
        records.to_csv(str(folder / f"{split}.csv"), index=False)
        records.to_json(str(folder / f"{split}.json"), lines=True)
        records.to_json(str(folder / f"{split}.jsonl"), lines=True)
        records.to_parquet(str(folder / f"{split}.parquet"))
    return folder


def token_count(tokenizer_dir, lines):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return sum(len(ids) for ids in tokenizer(lines)["input_ids"])


@pytest.mark.parametrize("extension", ["csv", "json", "jsonl", "parquet"])
def test_clm_trains_from_record_files(extension, record_files, text_files, bpe_tokenizer_dir,
                                      tmp_path):
    out = tmp_path / "out"
    argv = clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--do_eval", "--max_steps", "2",
                    "--max_eval_samples", ALL_BLOCKS, "--train_file", str(record_files / f"train.{extension}"),
                    "--validation_file", str(record_files / f"validation.{extension}"))
    run_clm.main(argv)
    assert global_step(out) == 2
    metrics = results(out, "eval")
    assert metrics["eval_loss"] > 0 and 0 <= metrics["eval_accuracy"] <= 1
    # Every paragraph of the "text" column, tokenized and cut into 32-token blocks (the "id" column is dropped).
    assert metrics["eval_samples"] == token_count(bpe_tokenizer_dir, paragraphs(text_files / "validation.txt")) // 32


def test_validation_split_percentage_holds_out_part_of_the_train_file(text_files, bpe_tokenizer_dir,
                                                                      tmp_path):
    whole = tmp_path / "whole"
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, whole, "--do_train", "--max_steps", "1"))
    split = tmp_path / "split"
    argv = clm_args(text_files, bpe_tokenizer_dir, split, "--do_train", "--do_eval", "--max_steps", "2",
                    "--validation_split_percentage", "10", "--max_eval_samples", ALL_BLOCKS)
    run_clm.main(without(argv, "--validation_file"))
    all_blocks = results(whole, "train")["train_samples"]
    trained, held_out = results(split, "train")["train_samples"], results(split, "eval")["eval_samples"]
    assert 0 < held_out < trained < all_blocks
    # The two parts are grouped apart, so each may drop one partial block more than the whole did.
    assert all_blocks - 1 <= trained + held_out <= all_blocks
    assert 0.05 * all_blocks < held_out < 0.15 * all_blocks  # about 10% (lines, not tokens, are split)


def test_max_train_and_eval_samples_cut_the_splits(text_files, bpe_tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--do_eval", "--max_steps", "2",
                          "--max_train_samples", "40", "--max_eval_samples", "7"))
    assert results(out, "train")["train_samples"] == 40
    assert results(out, "eval")["eval_samples"] == 7


def test_preprocessing_workers_do_not_change_the_data(text_files, bpe_tokenizer_dir, tmp_path,
                                                      caplog):
    """Eval-only runs of the same fresh model. Each run reads its own copy of the files: the datasets cache of a
    1-worker run would otherwise be reused by a 2-worker run (datasets keeps the shard count it cached with)."""
    evaluated = {}
    for workers in ("2", "1"):
        copies = tmp_path / f"data{workers}"
        copies.mkdir()
        for name in ("train.txt", "validation.txt"):
            (copies / name).write_bytes((text_files / name).read_bytes())
        caplog.clear()
        caplog.set_level("INFO")
        run_clm.main(clm_args(copies, bpe_tokenizer_dir, tmp_path / workers, "--do_eval", "--max_eval_samples",
                              ALL_BLOCKS, "--preprocessing_num_workers", workers))
        evaluated[workers] = results(tmp_path / workers, "eval")
        sharded = any("Concatenating 2 shards" in r.getMessage() for r in caplog.records)
        assert sharded == (workers == "2")  # two workers really split the data
    assert evaluated["2"]["eval_samples"] == evaluated["1"]["eval_samples"] > 0
    assert evaluated["2"]["eval_loss"] == evaluated["1"]["eval_loss"]


@pytest.fixture(scope="module")
def pretrained_gpt2(bpe_tokenizer_dir, tmp_path_factory):
    """A tiny GPT-2 saved with its tokenizer, in bfloat16, with gelu_new activations."""
    folder = tmp_path_factory.mktemp("pretrained_gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=500,
                        activation_function="gelu_new")
    GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(bpe_tokenizer_dir).save_pretrained(folder)
    return folder


def pretrained_args(text_files, pretrained, output_dir, *extra):
    argv = clm_args(text_files, pretrained, output_dir, "--do_train", "--max_steps", "2", *extra)
    for flag in ("--model_type", "--config_overrides", "--tokenizer_name"):
        argv = without(argv, flag)
    return ["--model_name_or_path", str(pretrained), *argv]


def saved_dtypes(output_dir):
    with safe_open(str(output_dir / "model.safetensors"), framework="pt") as weights:
        return {weights.get_tensor(name).dtype for name in weights.keys()}


def test_config_overrides_apply_on_top_of_a_pretrained_model(text_files, pretrained_gpt2, tmp_path,
                                                             caplog):
    out = tmp_path / "gelu"
    caplog.set_level("INFO")
    run_clm.main(pretrained_args(text_files, pretrained_gpt2, out, "--config_overrides", "activation_function=gelu",
                                 "--dtype", "float32"))
    assert json.loads((out / "config.json").read_text())["activation_function"] == "gelu"
    assert '"activation_function": "gelu"' in caplog.text  # the resulting config is logged
    assert global_step(out) == 2
    assert saved_dtypes(out) == {torch.float32}  # the bfloat16 checkpoint was loaded as --dtype float32


def test_pretrained_model_keeps_its_config_and_dtype_without_flags(text_files, pretrained_gpt2,
                                                                   tmp_path):
    """The counterpart of the test above: without the flags the run keeps gelu_new and bfloat16 weights."""
    out = tmp_path / "as_saved"
    run_clm.main(pretrained_args(text_files, pretrained_gpt2, out))
    assert json.loads((out / "config.json").read_text())["activation_function"] == "gelu_new"
    assert saved_dtypes(out) == {torch.bfloat16}


def test_block_size_longer_than_the_model_is_clamped_with_a_warning(text_files, bpe_tokenizer_dir,
                                                                     tmp_path, caplog):
    runs = {}
    for block_size in ("1000", "64"):
        out = tmp_path / block_size
        caplog.clear()
        caplog.set_level("INFO")
        run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--do_eval", "--max_steps", "2",
                              "--block_size", block_size, "--max_eval_samples", ALL_BLOCKS))
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "--block_size" in
                    r.getMessage()]
        runs[block_size] = (results(out, "eval"), logged_losses(out), warnings)
    clamped, explicit = runs["1000"], runs["64"]
    assert len(clamped[2]) == 1 and "1000" in clamped[2][0] and "64" in clamped[2][0]
    assert explicit[2] == []
    assert clamped[0]["eval_samples"] == explicit[0]["eval_samples"]  # 64-token blocks, as asked explicitly
    assert clamped[0]["eval_loss"] == explicit[0]["eval_loss"]
    assert clamped[1] == explicit[1]


def test_resume_from_the_output_dir_and_overwrite_it(text_files, bpe_tokenizer_dir, tmp_path, caplog):
    out = tmp_path / "out"
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--max_steps", "4", "--save_steps", "2"))
    assert (out / "checkpoint-4").is_dir()
    first_losses = logged_losses(out)

    caplog.set_level("INFO")
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--max_steps", "6", "--save_steps", "2"))
    assert global_step(out) == 6
    resumed = [r.getMessage() for r in caplog.records if "Resuming from" in r.getMessage()]
    assert len(resumed) == 1 and str(out / "checkpoint-4") in resumed[0]
    assert logged_losses(out)[:len(first_losses)] == first_losses  # the history continues the first run's

    caplog.clear()
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--max_steps", "2", "--save_steps", "2",
                          "--overwrite_output_dir"))
    assert global_step(out) == 2
    assert not any("Resuming from" in r.getMessage() for r in caplog.records)
    assert logged_losses(out) == first_losses[:1]  # afresh: same seed, same first step as the first run


def test_keep_linebreaks_false_drops_the_newline_tokens(text_files, bpe_tokenizer_dir, tmp_path):
    counts = {}
    for keep in ("true", "false"):
        out = tmp_path / keep
        run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--do_eval", "--max_steps", "2",
                              "--keep_linebreaks", keep, "--max_eval_samples", ALL_BLOCKS))
        assert global_step(out) == 2
        counts[keep] = results(out, "eval")["eval_samples"]
    lines = (text_files / "validation.txt").read_text(encoding="utf-8").splitlines()
    assert counts["false"] == token_count(bpe_tokenizer_dir, lines) // 32
    assert counts["true"] == token_count(bpe_tokenizer_dir, [line + "\n" for line in lines]) // 32
    assert counts["false"] < counts["true"]


def test_pretraining_on_pre_tokenized_pairs_in_json_lines(text_files, wordpiece_tokenizer_dir,
                                                          tmp_path):
    saved = tmp_path / "pairs"
    run_pretraining.main(pretraining_args(text_files, wordpiece_tokenizer_dir, tmp_path / "build", "--do_eval",
                                          "--save_preprocessed_dataset", str(saved)))
    pairs = datasets.load_from_disk(str(saved))
    for split in ("train", "validation"):
        pairs[split].to_json(str(tmp_path / f"{split}.jsonl"), lines=True)

    out = tmp_path / "out"
    argv = pretraining_args(text_files, wordpiece_tokenizer_dir, out, "--do_train", "--do_eval", "--max_steps", "2",
                            "--is_already_preprocessed", "--train_file", str(tmp_path / "train.jsonl"),
                            "--validation_file", str(tmp_path / "validation.jsonl"))
    run_pretraining.main(argv)
    assert global_step(out) == 2
    assert results(out, "train")["train_samples"] == len(pairs["train"])
    metrics = results(out, "eval")
    assert metrics["eval_samples"] == min(32, len(pairs["validation"]))
    assert metrics["eval_mlm_loss"] > 0 and 0 <= metrics["eval_nsp_accuracy"] <= 1


def test_empty_cells_read_as_empty_texts(corpus_dir, bpe_tokenizer_dir, tmp_path):
    """A CSV written from lines with blank ones holds empty fields, which datasets reads as None."""
    lines = (corpus_dir / "validation.txt").read_text(encoding="utf-8").splitlines()[:60]
    assert "" in lines
    for name in ("train.csv", "validation.csv"):
        datasets.Dataset.from_dict({"text": lines}).to_csv(str(tmp_path / name), index=False)
    out = tmp_path / "out"
    run_clm.main(["--model_type", "gpt2", "--config_overrides", "n_layer=2,n_embd=32,n_head=2,n_positions=64",
                  "--tokenizer_name", str(bpe_tokenizer_dir), "--train_file", str(tmp_path / "train.csv"),
                  "--validation_file", str(tmp_path / "validation.csv"), "--block_size", "32", "--do_train",
                  "--do_eval", "--max_steps", "2", "--output_dir", str(out), "--report_to", "none",
                  "--disable_tqdm", "true"])
    assert global_step(out) == 2 and results(out, "eval")["eval_samples"] > 0


def logged_learning_rates(output_dir):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]


@pytest.mark.parametrize("ratio, warmup_steps", [("0.5", 4), ("0.3", 3), ("1.0", 8)])
def test_warmup_ratio_warms_up_over_its_share_of_the_steps(ratio, warmup_steps, text_files, bpe_tokenizer_dir,
                                                          tmp_path):
    """8 steps of a linear schedule: the rate climbs from 0 over ceil(8 x ratio) steps, then decays; a ratio of 1
    (which --warmup_steps cannot express: 1.0 is one step there) climbs to the end."""
    out = tmp_path / "out"
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--max_steps", "8", "--logging_steps",
                          "1", "--learning_rate", "0.004", "--warmup_ratio", ratio))
    rates = logged_learning_rates(out)
    climb = [0.004 * step / warmup_steps for step in range(warmup_steps)]
    decay = [0.004 * (8 - step) / (8 - warmup_steps) for step in range(warmup_steps, 8)]
    assert rates == pytest.approx(climb + decay)
