"""Loading what the scripts train on: raw datasets (hub or local files), config (+ overrides), tokenizer, model.
Hub names work when online; local paths always. Mistakes become UserError naming the flag."""
import codecs
import contextlib
import copy
import logging
import math
import os

import datasets
import pyarrow
import pyarrow.compute
import huggingface_hub
import huggingface_hub.constants
import torch
from accelerate import init_empty_weights
from huggingface_hub.errors import HFValidationError, StrictDataclassError
from transformers import CONFIG_MAPPING, AutoConfig, AutoTokenizer

from .compat import dtype_kwarg, validate_config
from .errors import UserError
from .pipeline.families import position_offset
from .pipeline.process_stages import unloadable_names
from .pipeline.stages import transformer_layers
from .pipeline.weight_files import defer_loading, find_saved_weights

logger = logging.getLogger("ipu_train")

# Very large values mean "no limit" in tokenizers (pain point: a huge model_max_length breaking block sizes).
_UNBOUNDED = 1_000_000
BINARY_EXTENSIONS = ("parquet",)  # data files whose bytes are not text
ARROW_READERS = ("json", "parquet")  # the `datasets` builders that read without decoding strings (see below)
FILE_FLAGS = {"train": "train_file", "validation": "validation_file"}
# What to do about a name that is neither a local path nor a hub name this machine can fetch, by flag.
MISSING_FIXES = {
    "tokenizer_name": "train one with train_tokenizer.py, or pass a hub name",
    "model_name_or_path": "pass a directory saved by a training run, or a hub name",
    "config_name": "pass a config.json or its directory, or a hub name",
    "dataset_name": "pass --train_file, or a hub dataset name",
}


@contextlib.contextmanager
def _fetched(flag, name):
    """A model, tokenizer, config or dataset loaded by local path or hub name: what cannot be found or fetched is the
    user's to fix, named by its flag. A name only a path can have (./x, ~/x, /x, a/b/c) is checked here; the Hub is
    blamed only where it was asked (no local path of that name) and is offline."""
    local = os.path.exists(name)
    if not local and _only_a_path(name):
        raise UserError(f"--{flag} {name} does not exist: {MISSING_FIXES[flag]}")
    try:
        yield
    except (OSError, ConnectionError, ValueError) as err:
        if not local and _hub_offline():
            raise UserError(f"--{flag} {name}: neither a local path nor a hub name cached here (the Hub is offline): "
                            f"{MISSING_FIXES[flag]}, or go online") from None
        raise UserError(f"--{flag} {name}: {_first_sentence(err)}") from None


def _only_a_path(name):
    """Hub names are `name` or `namespace/name` (never starting with '.'); anything else is a path."""
    return name.startswith((".", "~", "/")) or name.count("/") > 1 or "\\" in name


def _first_sentence(err):
    return " ".join(str(err).split()).split(". ")[0] or type(err).__name__


def _hub_offline():
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def check_hub_access(training_args):
    """--push_to_hub uploads at the end of the run: without the Hub (offline) or a token to write with (--hub_token,
    HF_TOKEN, a saved login, as huggingface_hub looks them up) it would fail after all the work, so it stops here."""
    if not training_args.push_to_hub:
        return
    if _hub_offline() or huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UserError("--push_to_hub needs the Hub, and it is offline here (HF_HUB_OFFLINE=1): drop --push_to_hub "
                        "(the model is saved in --output_dir; upload it later with `hf upload`), or go online")
    if not (training_args.hub_token or huggingface_hub.get_token()):
        raise UserError("--push_to_hub needs a Hub token to write with, and none is set: pass --hub_token, set "
                        "HF_TOKEN, or log in with `hf auth login`; or drop --push_to_hub")


def load_raw_datasets(data_args, model_args):
    """A DatasetDict (or IterableDatasetDict with --streaming) with "train" and, when available, "validation":
    without a validation split, the first --validation_split_percentage of "train" (a stream has none)."""
    common = dict(cache_dir=model_args.cache_dir, token=model_args.token, streaming=data_args.streaming)
    if data_args.dataset_name is not None:
        with _fetched("dataset_name", data_args.dataset_name):
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


def _config_flag(model_args):
    """The flag the config comes from, and its value: --config_name, else --model_name_or_path, else --model_type."""
    flag = next(flag for flag in ("config_name", "model_name_or_path", "model_type") if getattr(model_args, flag))
    return flag, getattr(model_args, flag)


def load_config(model_args):
    """The model config; --config_overrides applies on top of a pretrained config too. It is logged once the model
    is built (see build_model), as the model holds it."""
    config = _source_config(model_args)
    if model_args.config_overrides:
        apply_config_overrides(config, model_args.config_overrides)
    return config


def _source_config(model_args):
    """The config named by --config_name, --model_name_or_path or --model_type, before --config_overrides."""
    common = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
                  trust_remote_code=model_args.trust_remote_code)
    flag, source = _config_flag(model_args)
    if flag != "model_type":
        with _fetched(flag, source):
            return AutoConfig.from_pretrained(source, **common)
    if model_args.model_type in CONFIG_MAPPING:
        logger.warning("Training a new %s model from scratch.", model_args.model_type)
        return CONFIG_MAPPING[model_args.model_type]()
    raise UserError(f"--model_type {model_args.model_type} is unknown: use one of "
                    f"{', '.join(sorted(CONFIG_MAPPING.keys())[:12])}, ...")


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
    """Each value parsed as the type of the existing attribute; an unknown key or a value of the wrong type names the
    item."""
    parsed = parse_config_overrides(overrides)
    for key in parsed:
        if not hasattr(config, key):
            raise UserError(f"--config_overrides: {type(config).__name__} has no attribute '{key}'")
    for key, value in parsed.items():
        try:
            config.update_from_string(f"{key}={value}")
        except (ValueError, TypeError, StrictDataclassError) as err:
            raise UserError(f"--config_overrides {key}={value}: {' '.join(str(err).split())}") from None
    try:
        validate_config(config)  # values that contradict each other (e.g. XLNet's d_head vs d_model // n_head)
    except (ValueError, TypeError, StrictDataclassError) as err:
        raise UserError(f"--config_overrides {overrides}: {' '.join(str(err).split())}") from None


def load_tokenizer(model_args):
    source = model_args.tokenizer_name or model_args.model_name_or_path
    with _fetched("tokenizer_name" if model_args.tokenizer_name else "model_name_or_path", source):
        return AutoTokenizer.from_pretrained(source, cache_dir=model_args.cache_dir,
                                             use_fast=model_args.use_fast_tokenizer,
                                             revision=model_args.model_revision, token=model_args.token,
                                             trust_remote_code=model_args.trust_remote_code)


def load_model(model_args, config, auto_class):
    """Pretrained weights when --model_name_or_path is given, else a new model from the config. On pretrained
    weights, --config_overrides may change what does not change a weight (activation_function=gelu), not the
    model's shape (see _refuse_reshaping_overrides)."""
    _require_model_class(auto_class, config, model_args)
    if model_args.model_name_or_path:
        dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
        overridden = bool(parse_config_overrides(model_args.config_overrides))
        with _fetched("model_name_or_path", model_args.model_name_or_path), _built(model_args):
            # With overrides, weights of another shape are reported (and refused below) instead of raised.
            model, loading_info = auto_class.from_pretrained(
                model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir,
                revision=model_args.model_revision, token=model_args.token,
                trust_remote_code=model_args.trust_remote_code, **dtype_kwarg(dtype), output_loading_info=True,
                ignore_mismatched_sizes=overridden)
        if overridden:
            _refuse_reshaping_overrides(model_args, config, auto_class, loading_info)
        return model
    with _built(model_args):
        model = _new_model(auto_class, config, model_args)
    logger.info("New model from scratch: %.1fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def _new_model(auto_class, config, model_args):
    if hasattr(auto_class, "from_config"):  # an Auto class
        return auto_class.from_config(config, trust_remote_code=model_args.trust_remote_code)
    return auto_class(config)  # a concrete model class, such as XLNetLMHeadModel


def _weight_shapes(auto_class, config, model_args):
    """{weight name: shape} of the model this config builds, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = _new_model(auto_class, config, model_args)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _refuse_reshaping_overrides(model_args, config, auto_class, loading_info):
    """--config_overrides that change the pretrained model's shape (n_layer=2 on a 4-layer model: its other layers
    silently dropped; n_embd: every weight of another size) are refused, naming the override items that do it. Only
    what the overrides cause counts: a checkpoint without a head this class adds (BERT's NSP head) loads as before.
    A weight of another size that the overrides do not explain is refused as transformers refuses it."""
    missing, unexpected = set(loading_info["missing_keys"]), set(loading_info["unexpected_keys"])
    mismatched = {entry[0]: entry[1:] for entry in loading_info["mismatched_keys"]}
    if not (missing or unexpected or mismatched):
        return
    base_config = _source_config(model_args)
    base = _weight_shapes(auto_class, base_config, model_args)
    built = _weight_shapes(auto_class, config, model_args)
    caused = ([name for name in unexpected if name in base and name not in built]
              + [name for name in missing if name not in base]
              + [name for name in mismatched if name in base and base[name] != built.get(name)])
    if not caused:
        if mismatched:
            name, (saved, wanted) = sorted(mismatched.items())[0]
            raise UserError(f"--model_name_or_path {model_args.model_name_or_path}: the model cannot be built: "
                            f"{name} is {tuple(saved)} in the checkpoint but {tuple(wanted)} in the config")
        return
    # Counted on the two shapes, as loading reports some names under a pattern it ignores (GPT-2's attn.c_attn.bias).
    dropped = sorted(set(base) - set(built))
    added = sorted(set(built) - set(base))
    resized = sorted(name for name in set(base) & set(built) if base[name] != built[name])
    effects = [f"{len(names)} of its weights would be {what} ({_some(names)})"
               for names, what in ((dropped, "dropped"), (resized, "of another shape, so not loaded"),
                                   (added, "new and untrained")) if names]
    items = _reshaping_items(model_args, auto_class, base_config, base)
    named = ",".join(f"{key}={value}" for key, value, _ in items)
    pretrained = ", ".join(f"{key} {before}" for key, _, before in items)
    source = model_args.config_name or model_args.model_name_or_path
    raise UserError(f"--config_overrides {named} changes the shape of the pretrained model "
                    f"{model_args.model_name_or_path} ({pretrained} there): {'; '.join(effects)}. To train a new "
                    f"model of that shape, pass --config_name {source} (or --model_type {base_config.model_type}) and "
                    f"--tokenizer_name instead of --model_name_or_path; to fine-tune the pretrained model, drop "
                    f"{named} from --config_overrides")


def _some(names, shown=2):
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _reshaping_items(model_args, auto_class, base_config, base_shapes):
    """(key, value, pretrained value) of the override items that change a weight's shape on their own (of all the
    items that change a value, when only their combination does)."""
    changed, reshaping = [], []
    for key, value in parse_config_overrides(model_args.config_overrides).items():
        single = copy.deepcopy(base_config)
        single.update_from_string(f"{key}={value}")  # checked by load_config already
        if getattr(single, key) == getattr(base_config, key):
            continue
        item = (key, value, getattr(base_config, key))
        changed.append(item)
        try:
            shapes = _weight_shapes(auto_class, single, model_args)
        except (ValueError, TypeError, RuntimeError, AssertionError, StrictDataclassError):
            shapes = None  # it builds only with the other overrides
        if shapes != base_shapes:
            reshaping.append(item)
    return reshaping or changed


def _require_model_class(auto_class, config, model_args):
    """An Auto class with no model for this config (AutoModelForMaskedLM for gpt2) is the model type's mistake, not
    the overrides': checked as `from_config` checks it, before any building (code from the hub is left to it)."""
    mapping = getattr(auto_class, "_model_mapping", None)
    if mapping is not None and type(config) not in mapping and not getattr(config, "auto_map", None):
        flag, value = _config_flag(model_args)
        raise UserError(f"--{flag} {value}: {auto_class.__name__} has no {config.model_type} model: choose a model "
                        "type that has one")


@contextlib.contextmanager
def _built(model_args):
    """A config that cannot make a model (e.g. n_embd not a multiple of n_head) names what set its values: the
    overrides when given, else the config's source. No hub is involved, so no hub is blamed."""
    try:
        yield
    except (ValueError, RuntimeError, AssertionError) as err:
        if isinstance(err, HFValidationError):  # a malformed hub name: for _fetched to report
            raise
        flag, value = (("config_overrides", model_args.config_overrides) if model_args.config_overrides
                       else _config_flag(model_args))
        raise UserError(f"--{flag} {value}: the model cannot be built: {_first_sentence(err)}") from None


def build_model(model_args, config, tokenizer, auto_class, ipu_config, training_args=None):
    """The model for this tokenizer: a new one sized to it, or pretrained weights with the embedding table grown
    to fit tokens the tokenizer added. A layer layout that does not fit the model stops here, before any data is
    processed. With --pipeline_stages_across_processes, pretrained weights are read later, stage by stage, where
    they can be (see model_to_load_by_stage)."""
    fit_config_to_tokenizer(config, tokenizer, model_args)
    by_stage = getattr(training_args, "pipeline_stages_across_processes", False)
    model = model_to_load_by_stage(model_args, config, tokenizer, auto_class) if by_stage else None
    if model is None:
        model = load_model(model_args, config, auto_class)
    fit_embeddings_to_tokenizer(model, tokenizer)
    # Logged once, as built: vocabulary size and token ids fitted to the tokenizer, --config_overrides applied.
    overrides = f" (with --config_overrides {model_args.config_overrides})" if model_args.config_overrides else ""
    logger.info("Model config%s: %s", overrides, model.config)
    num_layers = len(transformer_layers(model))
    for mode in ("inference", "training"):  # the scripts check the inference layout first
        with ipu_config.in_mode(mode):
            ipu_config.layer_stages(num_layers)
    return model


def model_to_load_by_stage(model_args, config, tokenizer, auto_class):
    """For --pipeline_stages_across_processes: the pretrained model built with meta weights (no memory), to be loaded
    by each process from its stage's tensors alone (pipeline/process_stages.py), where its safetensors hold every
    weight in the shape the config gives and the tokenizer fits the embedding table. None otherwise, and the model
    loads whole, as without stages: a new model (every process builds it from the seed, so that each layout starts
    from one process's weights), --config_overrides (refused there where they reshape the pretrained model), a
    checkpoint in other files, or weights to add, reshape or grow."""
    if not model_args.model_name_or_path:
        return None
    if parse_config_overrides(model_args.config_overrides):  # checked against the whole pretrained model
        return _loaded_whole("--config_overrides are checked against the pretrained model's weights")
    _require_model_class(auto_class, config, model_args)
    weights = find_saved_weights(_model_file_locator(model_args), dtype=_weights_dtype(model_args, config))
    if weights is None:
        return _loaded_whole(f"{model_args.model_name_or_path} has no safetensors weights")
    with _built(model_args), init_empty_weights(include_buffers=False):
        model = _new_model(auto_class, config, model_args)
    model.tie_weights()  # the context gave each tied name its own meta tensor
    unloadable = unloadable_names(model, weights)
    if unloadable:
        return _loaded_whole(f"{len(unloadable)} weights ({_some(unloadable)}) are not saved in the model's shape")
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        return _loaded_whole("the tokenizer has more tokens than the embedding table")
    if weights.dtype is not None:
        model.to(weights.dtype)
    defer_loading(model, weights)
    logger.info("Each process will read only its stage's weights from %s (%d tensors in %d file(s))",
                model_args.model_name_or_path, len(weights.files_by_name), len(set(weights.files_by_name.values())))
    return model


def _loaded_whole(reason):
    """model_to_load_by_stage's answer where the model must load whole: None, and a log line saying why."""
    logger.info("Every process loads the whole model before keeping its stage: %s", reason)
    return None


def _model_file_locator(model_args):
    """filename -> the local path of that file of --model_name_or_path (a folder, or a hub model fetched into the
    cache), None where there is none or it cannot be fetched (the whole-model loading then reports why)."""
    source = model_args.model_name_or_path
    if os.path.isdir(source):
        return lambda filename: os.path.join(source, filename)
    if os.path.exists(source) or _only_a_path(source):
        return lambda filename: None

    def fetch(filename):
        from transformers.utils import cached_file

        try:
            return cached_file(source, filename, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
                               token=model_args.token, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except (OSError, ValueError):
            return None

    return fetch


def _weights_dtype(model_args, config):
    """The dtype pretrained weights load in, as from_pretrained gives them: --dtype, else the config's (transformers
    5's "auto"); None: as saved."""
    name = model_args.dtype if model_args.dtype not in (None, "auto") else getattr(config, "dtype", None)
    return getattr(torch, name) if isinstance(name, str) else name


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
    """Longest sequence the model can take: its position embeddings, less those before the first token's (RoBERTa's
    padding_idx + 1)."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is None or positions <= 0:  # relative-position models such as XLNet (whose config says -1)
        return None
    return positions - position_offset(config)


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
