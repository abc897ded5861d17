"""User mistakes end to end, through main(argv): one line on stderr naming the flag, key or file and the fix, exit
code 2, and nothing created in --output_dir. Data files that are not UTF-8 or lack texts, impossible training
numbers, mistyped values in argument files, models and tokenizers that are not there, and config overrides that
cannot build a model."""
import json

import datasets
import pytest
import yaml

import run_clm
import run_mlm
import run_pretraining
from ipu_train.loading import first_non_utf8

from .test_script_pretraining import pretraining_args
from .test_scripts_clm_mlm import TINY_GPT2, clm_args, mlm_args, results, run_and_expect_user_error
from .test_scripts_inputs import pretrained_args, pretrained_gpt2, without  # noqa: F401 (a fixture)

LATIN1_LINE = "a café in the old town\n".encode("latin-1")  # é is 0xe9 in Latin-1, not UTF-8
OFFSET_IN_LINE = LATIN1_LINE.index(b"\xe9")


def expect_refused(main, argv, capsys, output_dir, *phrases):
    line = run_and_expect_user_error(main, argv, capsys, *phrases)
    assert not output_dir.exists()
    return line


def lines_of(text_files, count=40):
    return (text_files / "train.txt").read_text(encoding="utf-8").splitlines()[:count]


def record_bytes(extension, texts):
    """Records holding `texts` (bytes, one per line) in a text format, one record per line after a CSV header."""
    if extension == "csv":
        return b"text\n" + b"".join(b'"' + text.replace(b'"', b"'") + b'"\n' for text in texts)
    if extension in ("json", "jsonl"):  # JSON lines: datasets reads them from .json too
        return b"".join(b'{"text": "' + text.replace(b'"', b"'") + b'"}\n' for text in texts)
    return b"".join(text + b"\n" for text in texts)


@pytest.mark.parametrize("extension", ["txt", "jsonl", "json", "csv"])
def test_a_file_that_is_not_utf8_names_its_line_and_byte(extension, text_files, bpe_tokenizer_dir, tmp_path, capsys):
    texts = [line.encode("utf-8") for line in lines_of(text_files)]
    texts[6] = LATIN1_LINE.rstrip(b"\n")
    data = record_bytes(extension, texts)
    bad_file = tmp_path / f"latin1.{extension}"
    bad_file.write_bytes(data)
    offset = data.index(b"\xe9")
    line_number = data[:offset].count(b"\n") + 1  # the header of a CSV is line 1
    out = tmp_path / "out"
    argv = clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--max_steps", "2", "--train_file",
                    str(bad_file))
    if extension != "txt":
        good = tmp_path / f"good.{extension}"
        good.write_bytes(record_bytes(extension, [line.encode() for line in lines_of(text_files)]))
        argv += ["--validation_file", str(good)]
    expect_refused(run_clm.main, argv, capsys, out, f"--train_file {bad_file} is not UTF-8 text",
                   f"line {line_number} ", f"byte offset {offset}", "0xe9", "convert")


def test_a_binary_validation_file_is_named(text_files, bpe_tokenizer_dir, tmp_path, capsys):
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 4)  # ASCII up to 0x7f, with one line break (0x0a)
    out = tmp_path / "out"
    argv = clm_args(text_files, bpe_tokenizer_dir, out, "--do_eval", "--validation_file", str(binary))
    expect_refused(run_clm.main, argv, capsys, out, f"--validation_file {binary} is not UTF-8", "line 2 ",
                   "byte offset 128", "0x80", "binary")


def test_a_parquet_column_that_is_not_utf8_is_named(text_files, bpe_tokenizer_dir, tmp_path, capsys):
    """pyarrow keeps such strings when it reads Parquet (and JSON): they would fail later, while tokenizing."""
    import pyarrow
    import pyarrow.parquet

    raw = [line.encode() for line in lines_of(text_files)] + [LATIN1_LINE]
    texts = pyarrow.array(raw, type=pyarrow.binary()).view(pyarrow.string())
    for split in ("train", "validation"):
        pyarrow.parquet.write_table(pyarrow.table({"text": texts}), str(tmp_path / f"{split}.parquet"))
    out = tmp_path / "out"
    argv = clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--max_steps", "2",
                    "--train_file", str(tmp_path / "train.parquet"),
                    "--validation_file", str(tmp_path / "validation.parquet"))
    expect_refused(run_clm.main, argv, capsys, out, "--train_file", "train.parquet", "column 'text'", "not UTF-8")


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 1 << 20])
def test_the_first_byte_that_is_not_utf8_is_found_across_chunks(tmp_path, chunk_size):
    path = tmp_path / "mixed.txt"
    good = "naïve — ünïcödé 🙂\n".encode("utf-8")  # characters of 2, 3 and 4 bytes, cut by small chunks
    path.write_bytes(good * 3 + b"ok " + LATIN1_LINE)
    assert first_non_utf8(path, chunk_size) == (4, len(good) * 3 + 3 + OFFSET_IN_LINE, 0xe9)
    path.write_bytes(good * 3)
    assert first_non_utf8(path, chunk_size) is None
    path.write_bytes(good + "é".encode("utf-8")[:1])  # cut short at the end of the file
    assert first_non_utf8(path, chunk_size) == (2, len(good), 0xc3)


@pytest.mark.parametrize("extension", ["jsonl", "parquet"])
def test_records_without_the_text_column_are_counted(extension, text_files, bpe_tokenizer_dir, tmp_path, capsys):
    """A JSON null and a missing key both read as None: both are refused. "" is an empty text and is kept."""
    records = [{"id": i, "text": line} for i, line in enumerate(lines_of(text_files))]
    records[2], records[9] = {"id": 2}, {"id": 9, "content": "elsewhere"}
    records[11]["text"] = None
    records[12]["text"] = ""
    path = tmp_path / f"mixed.{extension}"
    if extension == "jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    else:
        datasets.Dataset.from_list(records).to_parquet(str(path))
    out = tmp_path / "out"
    argv = clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--max_steps", "2")
    argv = without(argv, "--validation_file") + ["--train_file", str(path)]
    expect_refused(run_clm.main, argv, capsys, out, f"--train_file {path}: 3 of {len(records)} rows have no 'text'",
                   "row 3", "drop those rows")


def test_empty_texts_in_json_lines_are_kept(text_files, bpe_tokenizer_dir, tmp_path):
    lines = lines_of(text_files, 80)
    rows = [{"text": line} for line in lines] + [{"text": ""}] * 5
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--do_eval", "--max_steps", "2",
                          "--train_file", str(tmp_path / "train.jsonl"),
                          "--validation_file", str(tmp_path / "validation.jsonl")))
    assert results(out, "eval")["eval_samples"] > 0


@pytest.mark.parametrize("change, phrases", [
    (["--learning_rate", "-1"], ["--learning_rate must be a number >= 0", "-1"]),
    (["--learning_rate", "nan"], ["--learning_rate must be a number >= 0", "nan"]),
    (["--weight_decay", "-0.01"], ["--weight_decay must be a number >= 0"]),
    (["--max_grad_norm", "-1"], ["--max_grad_norm must be a number >= 0", "0 turns gradient clipping off"]),
    (["--adam_beta2", "1"], ["--adam_beta2 must be at least 0 and below 1"]),
    (["--adam_epsilon", "-0.5"], ["--adam_epsilon must be a number >= 0"]),
    (["--dataloader_num_workers", "-1"], ["--dataloader_num_workers must be a number >= 0", "main process"]),
    (["--num_train_epochs", "0"], ["--num_train_epochs 0", "trains nothing", "--max_steps"]),
    (["--num_train_epochs", "-1"], ["--num_train_epochs -1", "trains nothing"]),
    (["--warmup_ratio", "1.5"], ["--warmup_ratio", "from 0 to 1", "1.5"]),
    (["--warmup_ratio", "0.1", "--warmup_steps", "0.2"], ["--warmup_ratio and --warmup_steps 0.2"]),
    (["--warmup_ratio", "0.1", "--warmup_steps", "5"], ["--warmup_ratio and --warmup_steps 5"]),
])
def test_impossible_training_numbers(change, phrases, text_files, bpe_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", *change)
    expect_refused(run_clm.main, argv, capsys, out, *phrases)


def test_zero_epochs_are_fine_without_training(text_files, bpe_tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, "--do_eval", "--num_train_epochs", "0"))
    assert results(out, "eval")["eval_loss"] > 0


def argument_file(tmp_path, text_files, tokenizer_dir, suffix, **values):
    """A .json or .yaml argument file of a short CLM run, with `values` added or replaced."""
    flags = clm_args(text_files, tokenizer_dir, tmp_path / "out", "--max_steps", "2")
    settings = {key.lstrip("-"): value for key, value in zip(flags[::2], flags[1::2])}
    settings.update({"do_train": True, **values})
    path = tmp_path / f"args{suffix}"
    path.write_text(json.dumps(settings) if suffix == ".json" else yaml.safe_dump(settings))
    return path


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize("values, phrases", [
    (dict(per_device_train_batch_size="abc"), ["per_device_train_batch_size must be an integer", '"abc"']),
    (dict(per_device_train_batch_size=2.5), ["per_device_train_batch_size must be an integer", "2.5"]),
    (dict(learning_rate=[1]), ["learning_rate must be a number", "[1]"]),
    (dict(do_train="maybe"), ["do_train must be true or false", '"maybe"']),
    (dict(max_train_samples=True), ["max_train_samples must be an integer or null", "true"]),
    (dict(device_type="tpu"), ["device_type must be one of auto, cpu, cuda, ipu", '"tpu"']),
    (dict(dtype=16), ["dtype must be one of auto, bfloat16, float16, float32", "16"]),
    (dict(save_strategy=False), ["save_strategy must be one of no, steps, epoch", "false"]),
    (dict(label_names=[1, 2]), ["label_names must be a list (a string each) or null", "[1, 2]"]),
    (dict(tokenizer_name=["a", "b"]), ["tokenizer_name must be a string or null"]),
    (dict(learning_rate_typo=0.1), ["learning_rate_typo is not a flag of this script"]),
])
def test_argument_files_name_the_key_and_its_type(suffix, values, phrases, text_files, bpe_tokenizer_dir, tmp_path,
                                                  capsys):
    path = argument_file(tmp_path, text_files, bpe_tokenizer_dir, suffix, **values)
    expect_refused(run_clm.main, [str(path)], capsys, tmp_path / "out", f"{path}: ", *phrases)


def test_yaml_booleans_where_words_are_expected_say_to_quote_them(tmp_path, capsys):
    path = tmp_path / "args.yaml"
    path.write_text("save_strategy: no\n")
    run_and_expect_user_error(run_clm.main, [str(path)], capsys, "save_strategy must be one of no, steps, epoch",
                              "got false", "YAML reads a bare yes, no, on or off as true or false: quote it")
    path.write_text("max_train_samples: yes\n")
    line = run_and_expect_user_error(run_clm.main, [str(path)], capsys, "max_train_samples must be an integer")
    assert "quote it" not in line


def test_an_argument_file_must_hold_a_mapping(tmp_path, capsys):
    path = tmp_path / "args.yaml"
    path.write_text("- --do_train\n- --learning_rate\n")
    run_and_expect_user_error(run_clm.main, [str(path)], capsys, f"{path} must map flag names to values", "list")


def test_argument_files_take_text_as_the_command_line_does(text_files, bpe_tokenizer_dir, tmp_path):
    """YAML reads 3e-3 (no dot) as a string; "8" and "true" are what the command line would pass; one label name
    is a list of one, as `--label_names labels` gives."""
    path = argument_file(tmp_path, text_files, bpe_tokenizer_dir, ".yaml")
    path.write_text(path.read_text() + "learning_rate: 3e-3\nseed: '8'\nfp32: 'true'\nlabel_names: labels\n")
    from ipu_train.arguments import IPUTrainingArguments
    from ipu_train.cli import ScriptArgumentParser
    from ipu_train.script_args import ModelArguments

    parser = ScriptArgumentParser((ModelArguments, run_clm.DataTrainingArguments, IPUTrainingArguments))
    _, data_args, training_args = parser.parse_script_args([str(path)])
    assert training_args.learning_rate == 0.003 and training_args.seed == 8 and training_args.fp32 is True
    assert training_args.label_names == ["labels"] and data_args.block_size == 32


@pytest.mark.parametrize("flag, name, phrases", [
    ("--tokenizer_name", "./no/such/dir", ["--tokenizer_name ./no/such/dir does not exist", "train_tokenizer.py"]),
    ("--tokenizer_name", "output/gpt2-tokenizer", ["--tokenizer_name output/gpt2-tokenizer: neither a local path nor",
                                                   "offline", "train_tokenizer.py"]),
    ("--config_name", "~/no-such-config", ["--config_name ~/no-such-config does not exist", "config.json"]),
    ("--model_name_or_path", "/no/such/model", ["--model_name_or_path /no/such/model does not exist", "hub name"]),
])
def test_models_and_tokenizers_that_are_not_there(flag, name, phrases, text_files, bpe_tokenizer_dir, tmp_path,
                                                  capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no output/ here
    out = tmp_path / "out"
    argv = clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--max_steps", "2")
    if flag == "--model_name_or_path":
        argv = without(argv, "--model_type")
    expect_refused(run_clm.main, argv + [flag, name], capsys, out, *phrases)


def test_a_local_directory_that_holds_no_tokenizer_does_not_blame_the_hub(text_files, bpe_tokenizer_dir, tmp_path,
                                                                           capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    argv = clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--tokenizer_name", str(empty))
    line = expect_refused(run_clm.main, argv, capsys, out, f"--tokenizer_name {empty}: ")
    assert "offline" not in line


@pytest.mark.parametrize("overrides, phrases", [
    ("n_layer=2,n_embd=384,n_head=5", ["--config_overrides n_layer=2,n_embd=384,n_head=5: the model cannot be built",
                                      "divisible"]),
    ("n_layer=abc", ["--config_overrides n_layer=abc", "abc"]),
])
def test_config_overrides_that_cannot_build_the_model_name_the_flag(overrides, phrases, text_files,
                                                                     bpe_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--config_overrides", overrides)
    line = expect_refused(run_clm.main, argv, capsys, out, *phrases)
    assert "--model_type" not in line and "offline" not in line


def test_config_overrides_on_a_pretrained_model_name_the_flag(text_files, pretrained_gpt2, tmp_path, capsys):
    out = tmp_path / "out"
    argv = pretrained_args(text_files, pretrained_gpt2, out, "--config_overrides", "n_head=3")
    line = expect_refused(run_clm.main, argv, capsys, out, "--config_overrides n_head=3: the model cannot be built")
    assert "offline" not in line


def test_a_model_type_without_the_head_still_names_the_model_type(text_files, wordpiece_tokenizer_dir, tmp_path,
                                                                  capsys):
    out = tmp_path / "out"
    argv = mlm_args(text_files, wordpiece_tokenizer_dir, out, "--do_train", "--model_type", "gpt2",
                    "--config_overrides", TINY_GPT2)
    line = expect_refused(run_mlm.main, argv, capsys, out, "--model_type gpt2", "AutoModelForMaskedLM")
    assert "--config_overrides" not in line and "offline" not in line


def test_a_malformed_json_lines_file_gives_the_readers_reason(text_files, bpe_tokenizer_dir, tmp_path, capsys):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    out = tmp_path / "out"
    argv = without(clm_args(text_files, bpe_tokenizer_dir, out, "--do_train"), "--validation_file")
    expect_refused(run_clm.main, argv + ["--train_file", str(broken)], capsys, out,
                   f"--train_file {broken}: cannot be read as json: JSON parse error")


def test_pretraining_text_that_is_not_utf8_names_its_line(text_files, wordpiece_tokenizer_dir, tmp_path, capsys):
    """run_pretraining.py reads .txt documents itself (blank lines separate them)."""
    data = "".join(line + "\n" for line in lines_of(text_files, 10)).encode("utf-8") + LATIN1_LINE
    bad_file = tmp_path / "latin1.txt"
    bad_file.write_bytes(data)
    out = tmp_path / "out"
    argv = pretraining_args(text_files, wordpiece_tokenizer_dir, out, "--do_train", "--max_steps", "2",
                            "--train_file", str(bad_file))
    offset = data.index(b"\xe9")
    expect_refused(run_pretraining.main, argv, capsys, out, f"--train_file {bad_file} is not UTF-8 text", "line 11 ",
                   f"byte offset {offset}")


def test_pretraining_reads_an_empty_csv_cell_as_an_empty_document(text_files, wordpiece_tokenizer_dir, tmp_path):
    rows = ['"' + line.replace('"', "'") + '"' for line in lines_of(text_files, 60)]
    rows[3] = ""
    csv = tmp_path / "docs.csv"
    csv.write_text("text\n" + "\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    run_pretraining.main(pretraining_args(text_files, wordpiece_tokenizer_dir, out, "--do_train", "--max_steps", "2",
                                          "--train_file", str(csv), "--validation_file", str(csv)))
    assert (out / "model.safetensors").is_file()


def test_replicas_that_do_not_fit_the_processes_are_refused_before_any_data(text_files, bpe_tokenizer_dir, tmp_path,
                                                                           capsys, monkeypatch):
    from ipu_train.arguments import IPUTrainingArguments

    monkeypatch.setattr(IPUTrainingArguments, "world_size", property(lambda self: 4))  # as under torchrun
    monkeypatch.setattr(run_clm, "load_raw_datasets", lambda *a, **k: pytest.fail("data read"))
    out = tmp_path / "out"
    argv = clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--max_steps", "2",
                    "--ipu_config_overrides", "replication_factor=6")
    expect_refused(run_clm.main, argv, capsys, out, "replication_factor=6 does not divide over the 4 process(es)",
                   "--nproc_per_node N` with N one of 1, 2, 3, 6")
