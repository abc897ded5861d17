"""Loading what the scripts train on: raw datasets (hub or local files), config (+ overrides), tokenizer, model.
Hub names work when online; local paths always. Mistakes become UserError naming the flag."""
import codecs
import contextlib
import logging
import math
import os

import datasets
import pyarrow
import pyarrow.compute
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import CONFIG_MAPPING, AutoConfig, AutoTokenizer

from .errors import UserError
from .pipeline.stages import transformer_layers

logger = logging.getLogger("ipu_train")

# Very large values mean "no limit" in tokenizers (pain point: a huge model_max_length breaking block sizes).
_UNBOUNDED = 1_000_000
BINARY_EXTENSIONS = ("parquet",)  # data files whose bytes are not text
ARROW_READERS = ("json", "parquet")  # the `datasets` builders that read without decoding strings (see below)
FILE_FLAGS = {"train": "train_file", "validation": "validation_file"}


@contextlib.contextmanager
def _named(flag, value):
    """A model, tokenizer or dataset that cannot be found or fetched is the user's to fix: name the flag."""
    try:
        yield
    except (OSError, ConnectionError, ValueError) as err:
        reason = " ".join(str(err).split()).split(". ")[0] or type(err).__name__  # the first sentence says it
        offline = " (the Hub is offline here: pass a local path, or go online)" if _hub_offline() else ""
        raise UserError(f"--{flag} {value}: {reason}{offline}") from None


def _hub_offline():
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def load_raw_datasets(data_args, model_args):
    """A DatasetDict (or IterableDatasetDict with --streaming) with "train" and, when available, "validation":
    without a validation split, the first --validation_split_percentage of "train" (a stream has none)."""
    common = dict(cache_dir=model_args.cache_dir, token=model_args.token, streaming=data_args.streaming)
    if data_args.dataset_name is not None:
        with _named("dataset_name", data_args.dataset_name):
            raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, **common)
    else:
        data_files = local_data_files(data_args)
        extension = _extension(next(iter(data_files.values())))
        builder = {"txt": "text", "jsonl": "json"}.get(extension, extension)
        options = dict(keep_linebreaks=data_args.keep_linebreaks) if builder == "text" else {}
        with _readable(data_files, builder):
            raw = datasets.load_dataset(builder, data_files=data_files, **common, **options)
        if not data_args.streaming and builder in ARROW_READERS:
            refuse_undecodable_strings(raw, data_files)
        if not data_args.streaming and builder != "csv":
            refuse_rows_without_text(raw, data_files)
    if "validation" not in raw and "train" in raw and not data_args.streaming:
        raw = split_off_validation(raw["train"], data_args.validation_split_percentage)
    return raw


def local_data_files(data_args):
    """{"train": --train_file, "validation": --validation_file}, for the ones given: files that exist, hold
    something, and share one format."""
    files = {}
    for split, flag in FILE_FLAGS.items():
        path = getattr(data_args, flag)
        if path is None:
            continue
        if not os.path.isfile(path):
            raise UserError(f"--{flag} {path} does not exist")
        if os.path.getsize(path) == 0:
            raise UserError(f"--{flag} {path} is empty")
        files[split] = path
    if len({_extension(path) for path in files.values()}) > 1:
        raise UserError(f"--train_file {files['train']} and --validation_file {files['validation']} differ in format: "
                        "give both in the same one")
    return files


def _extension(path):
    return path.rsplit(".", 1)[-1]


def _files_flag(data_files):
    """The flag and value(s) that name these files in a message."""
    return f"--{FILE_FLAGS[next(iter(data_files))]} {', '.join(data_files.values())}"


@contextlib.contextmanager
def _readable(data_files, builder):
    """Local files that `datasets` cannot read are the user's to fix. Bytes that are not UTF-8 are searched for only
    here, once reading failed, so that files that read cost no extra pass."""
    try:
        yield
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
        if not isinstance(err, OSError):
            refuse_non_utf8(data_files)
        reason = " ".join(str(err.__cause__ or err).split())  # datasets wraps the reader's error
        raise UserError(f"{_files_flag(data_files)}: cannot be read as {builder}: {reason}") from None


def refuse_non_utf8(data_files):
    """The first text file holding a byte that is not UTF-8 is refused, naming the line and the byte offset."""
    for split, path in data_files.items():
        found = None if _extension(path) in BINARY_EXTENSIONS else first_non_utf8(path)
        if found is not None:
            line, offset, byte = found
            raise UserError(f"--{FILE_FLAGS[split]} {path} is not UTF-8 text: line {line} (byte offset {offset}) holds "
                            f"the byte 0x{byte:02x}; convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8), or "
                            "pass a text file, not a binary one")


def first_non_utf8(path, chunk_size=1 << 20):
    """(line number, byte offset, byte) of the first byte of the file that does not decode as UTF-8, else None. Read
    in chunks, so that a binary file without line breaks is never read whole."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0  # of the chunk about to be read: its offset in the file, the line breaks before it
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_size)
            held = len(decoder.getstate()[0])  # the start of a character cut by the previous chunk (never a line break)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:  # err.object: the held bytes, then the chunk
                bad = err.start
                return lines + err.object.count(b"\n", 0, bad) + 1, offset - held + bad, err.object[bad]
            if not chunk:
                return None
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")


def refuse_undecodable_strings(raw, data_files):
    """pyarrow's JSON and Parquet readers keep strings that are not UTF-8, which fail only when read, in the middle
    of tokenizing: Arrow checks the string columns here (gigabytes per second), and a text file is searched if one
    fails (in a binary one, only the column can be named)."""
    for split, dataset in raw.items():
        for name, column in zip(dataset.data.column_names, dataset.data.columns):
            if pyarrow.types.is_string(column.type) or pyarrow.types.is_large_string(column.type):
                try:
                    column.validate(full=True)
                except pyarrow.ArrowInvalid:
                    refuse_non_utf8({split: data_files[split]})
                    raise UserError(f"--{FILE_FLAGS[split]} {data_files[split]}: the column '{name}' holds text that "
                                    "is not UTF-8: write the file again from valid UTF-8 strings") from None


def refuse_rows_without_text(raw, data_files):
    """Records without a text value would train as empty texts, silently: refused, counted. A JSON null cannot be
    told from a missing key once loaded, and both mean "no text" ("" is an empty text). CSV is not checked: an empty
    cell is how CSV writes an empty text, and it reads back as None too (see `texts`)."""
    for split, dataset in raw.items():
        if "input_ids" in dataset.column_names:  # pre-tokenized: the text columns are not read
            continue
        column = text_column(dataset)
        values = dataset.data.column(column)
        if values.null_count:
            first = pyarrow.compute.index(pyarrow.compute.is_null(values), True).as_py()
            raise UserError(f"--{FILE_FLAGS[split]} {data_files[split]}: {values.null_count} of {len(dataset)} rows "
                            f"have no '{column}' value (the first is row {first + 1}): give every row one (\"\" for "
                            "an empty text), or drop those rows")


def split_off_validation(dataset, percentage):
    """The first `percentage`% of a dataset as "validation", the rest as "train" (as `train[:5%]` does, but never
    an empty validation split)."""
    held_out = max(1, len(dataset) * percentage // 100)
    return datasets.DatasetDict(train=dataset.select(range(held_out, len(dataset))),
                                validation=dataset.select(range(held_out)))


def column_names(dataset):
    names = list(dataset.column_names or [])
    if names:
        return names
    first = next(iter(dataset), None)  # a stream whose features are unknown until read
    if first is None:
        raise UserError("the data holds no records: check --train_file / --validation_file / --dataset_name")
    return list(first.keys())


def text_column(dataset):
    """"text" if there is one, else the first column of strings."""
    names = column_names(dataset)
    if "text" in names:
        return "text"
    features = dataset.features or {}
    if features:
        strings = [name for name in names if getattr(features[name], "dtype", None) in ("string", "large_string")]
    else:
        first = next(iter(dataset))
        strings = [name for name in names if isinstance(first[name], str)]
    if not strings:
        raise UserError(f"the data has no text column (its columns: {', '.join(names)}): name the text column "
                        "'text'")
    return strings[0]


def texts(examples, column):
    """The batch's texts, a missing value read as an empty text: an empty CSV cell, or a null in a hub dataset (local
    JSON and Parquet files with nulls are refused by `refuse_rows_without_text`)."""
    return [text if text is not None else "" for text in examples[column]]


def _config_source(model_args):
    return model_args.config_name or model_args.model_name_or_path


def load_config(model_args):
    """The model config; --config_overrides applies on top of a pretrained config too, and the result is logged."""
    common = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
                  trust_remote_code=model_args.trust_remote_code)
    if _config_source(model_args):
        with _named("config_name" if model_args.config_name else "model_name_or_path", _config_source(model_args)):
            config = AutoConfig.from_pretrained(_config_source(model_args), **common)
    elif model_args.model_type in CONFIG_MAPPING:
        config = CONFIG_MAPPING[model_args.model_type]()
        logger.warning("Training a new %s model from scratch.", model_args.model_type)
    else:
        raise UserError(f"--model_type {model_args.model_type} is unknown: use one of "
                        f"{', '.join(sorted(CONFIG_MAPPING.keys())[:12])}, ...")
    if model_args.config_overrides:
        apply_config_overrides(config, model_args.config_overrides)
        logger.info("Config after --config_overrides %s: %s", model_args.config_overrides, config)
    return config


def parse_config_overrides(overrides):
    """--config_overrides 'k=v,k=v' as {key: value text}, whitespace stripped; an item without '=' names the flag."""
    parsed = {}
    for item in filter(None, (part.strip() for part in (overrides or "").split(","))):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key:
            raise UserError(f"--config_overrides: '{item}' is not key=value")
        parsed[key] = value
    return parsed


def apply_config_overrides(config, overrides):
    """Each value parsed as the type of the existing attribute; an unknown key names the flag."""
    parsed = parse_config_overrides(overrides)
    for key in parsed:
        if not hasattr(config, key):
            raise UserError(f"--config_overrides: {type(config).__name__} has no attribute '{key}'")
    try:
        config.update_from_string(",".join(f"{key}={value}" for key, value in parsed.items()))
        config.validate()  # values that contradict each other (e.g. XLNet's d_head vs d_model // n_head)
    except (ValueError, TypeError, StrictDataclassError) as err:
        raise UserError(f"--config_overrides {overrides}: {' '.join(str(err).split())}") from None


def load_tokenizer(model_args):
    source = model_args.tokenizer_name or model_args.model_name_or_path
    with _named("tokenizer_name" if model_args.tokenizer_name else "model_name_or_path", source):
        return AutoTokenizer.from_pretrained(source, cache_dir=model_args.cache_dir,
                                             use_fast=model_args.use_fast_tokenizer,
                                             revision=model_args.model_revision, token=model_args.token,
                                             trust_remote_code=model_args.trust_remote_code)


def load_model(model_args, config, auto_class):
    """Pretrained weights when --model_name_or_path is given, else a new model from the config."""
    if model_args.model_name_or_path:
        dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
        with _named("model_name_or_path", model_args.model_name_or_path):
            return auto_class.from_pretrained(model_args.model_name_or_path, config=config,
                                              cache_dir=model_args.cache_dir, revision=model_args.model_revision,
                                              token=model_args.token, trust_remote_code=model_args.trust_remote_code,
                                              dtype=dtype)
    if hasattr(auto_class, "from_config"):  # an Auto class
        with _named("model_type" if model_args.model_type else "config_name", config.model_type):
            model = auto_class.from_config(config, trust_remote_code=model_args.trust_remote_code)
    else:  # a concrete model class, such as XLNetLMHeadModel
        model = auto_class(config)
    logger.info("New model from scratch: %.1fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def build_model(model_args, config, tokenizer, auto_class, ipu_config):
    """The model for this tokenizer: a new one sized to it, or pretrained weights with the embedding table grown
    to fit tokens the tokenizer added. A layer layout that does not fit the model stops here, before any data is
    processed."""
    fit_config_to_tokenizer(config, tokenizer, model_args)
    model = load_model(model_args, config, auto_class)
    fit_embeddings_to_tokenizer(model, tokenizer)
    num_layers = len(transformer_layers(model))
    ipu_config.eval().layer_stages(num_layers)
    ipu_config.train().layer_stages(num_layers)
    return model


def fit_config_to_tokenizer(config, tokenizer, model_args):
    """A model built from scratch takes its vocabulary size and special-token ids from the tokenizer (a config's
    defaults describe the original tokenizer, e.g. GPT-2's 50257 tokens), unless --config_overrides set them."""
    if model_args.model_name_or_path:
        return
    overridden = parse_config_overrides(model_args.config_overrides)
    if "vocab_size" not in overridden:
        config.vocab_size = len(tokenizer)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None and name not in overridden:
            setattr(config, name, token_id)


def fit_embeddings_to_tokenizer(model, tokenizer):
    """A tokenizer larger than the embedding table (new tokens, a from-scratch config) grows the table."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


def max_positions(config):
    """Longest sequence the model can take. RoBERTa-style models offset positions by padding_idx + 1."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is None:  # relative-position models such as XLNet
        return None
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "longformer"):
        positions -= getattr(config, "pad_token_id", 1) + 1
    return positions


def sequence_length(requested, flag, tokenizer, config, default=1024):
    """The block / sequence length: the request, else the tokenizer's limit (capped at `default`), never more than
    the model's positions (a larger request warns and is clamped)."""
    if requested is not None and requested < 1:
        raise UserError(f"{flag} {requested}: use a length of 1 or more tokens")
    limits = [n for n in (max_positions(config), tokenizer.model_max_length) if n and n < _UNBOUNDED]
    limit = min(limits) if limits else None
    if requested is None:
        return min([default] + ([limit] if limit else []))
    if limit is not None and requested > limit:
        logger.warning("%s %d is longer than the model and tokenizer allow (%d): using %d.", flag, requested, limit,
                       limit)
        return limit
    return requested


def require_samples(dataset, needed, what, fix):
    """A split with fewer samples than one batch (or none) stops here, naming the numbers and the flag to change."""
    count = len(dataset)
    if count < needed:
        raise UserError(f"{what} has {count} samples but one batch needs {needed}: {fix}")


def perplexity(loss):
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
