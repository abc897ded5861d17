"""What every script does around its own work: read flags (or one .json/.yaml file), set up logging, refuse an
output directory that would be clobbered, and turn a user mistake into one line on stderr with exit code 2."""
import contextlib
import dataclasses
import enum
import functools
import json
import logging
import os
import signal
import sys
import types
import typing
from argparse import ArgumentTypeError

import torch
import transformers
import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import string_to_bool

from .errors import RunFailed, UserError

logger = logging.getLogger("ipu_train")

# --help's groups for the training arguments, in this order, after the script's model and data flags.
TRAINING_GROUP = "IPU training (this project's flags, and the TrainingArguments flags it changes)"
INHERITED_GROUP = "TrainingArguments (from transformers)"


class OneLineErrors:
    """An argparse parser mixin: a flag mistake raises a UserError, which `one_line_errors` (and `main_entry`, built
    on it) prints as one `error: ...` line with exit code 2 (no usage block)."""

    def error(self, message):
        raise UserError(message)


class ScriptArgumentParser(OneLineErrors, HfArgumentParser):
    """HfArgumentParser whose errors are one line (no usage block) and exit code 2, and whose --help shows the IPU
    flags before the long list inherited from transformers' TrainingArguments."""

    def _add_dataclass_arguments(self, dtype):
        """A TrainingArguments subclass's flags in two help groups: its own (new, then changed), then the inherited
        ones. Each flag is built by HfArgumentParser as before: the groups only arrange --help and the usage."""
        if not (isinstance(dtype, type) and issubclass(dtype, TrainingArguments)):
            return super()._add_dataclass_arguments(dtype)
        hints = typing.get_type_hints(dtype)
        base = TrainingArguments.__dataclass_fields__  # a subclass shares the Field objects it does not redeclare
        fields = [field for field in dataclasses.fields(dtype) if field.init]
        new = [field for field in fields if field.name not in base]
        changed = [field for field in fields if field.name in base and base[field.name] is not field]
        inherited = [field for field in fields if base.get(field.name) is field]
        for title, group_fields in ((TRAINING_GROUP, new + changed), (INHERITED_GROUP, inherited)):
            group = self.add_argument_group(title)
            for field in group_fields:
                field.type = hints[field.name]  # as HfArgumentParser does before building a flag
                self._parse_dataclass_field(group, field)

    def parse_script_args(self, argv=None):
        """Flags, or a single .json / .yaml / .yml file holding all of them (the Hugging Face convention)."""
        argv = sys.argv[1:] if argv is None else argv
        try:
            if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
                path = _existing(argv[0])
                return self.parse_dict(self._typed_values(path, _read_argument_file(path)), allow_extra_keys=False)
            return self.parse_args_into_dataclasses(args=argv)
        except ValueError as err:  # dataclass __post_init__ checks (transformers' and ours) raise ValueError
            raise UserError(_first_line(err)) from None

    def _typed_values(self, path, values):
        """The values of an argument file, each checked against its field's type before any dataclass sees it (they
        would take a string for a number, or a list for a flag, and fail far from the file), text converted as the
        command line converts it."""
        fields = self._fields_by_name()
        typed = {}
        for key, value in values.items():
            if key not in fields:
                raise UserError(f"{path}: {key} is not a flag of this script: check its spelling")
            hint, choices = fields[key]
            typed[key] = _as_type(value, hint)
            if typed[key] is _MISMATCH or (choices and typed[key] is not None and typed[key] not in choices):
                expected = f"one of {', '.join(map(str, choices))}" if choices else _describe(hint)
                quote = path.endswith((".yaml", ".yml")) and isinstance(value, bool) and _takes_words(hint, choices)
                raise UserError(f"{path}: {key} must be {expected}, got {json.dumps(value, default=str)}"
                                f"{_YAML_BOOLEAN_HINT if quote else ''}")
        return typed

    def _fields_by_name(self):
        """{name: (type, choices)} of the fields that flags set, the first dataclass's where two share a name."""
        fields = {}
        for dtype in self.dataclass_types:
            hints = typing.get_type_hints(dtype)
            for field in dataclasses.fields(dtype):
                if field.init:
                    fields.setdefault(field.name, (hints[field.name], field.metadata.get("choices")))
        return fields


def _read_argument_file(path):
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise UserError(f"{path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                        f"{' '.join(str(err).split())}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} must map flag names to values (e.g. learning_rate: 0.0003), not hold a "
                        f"{type(values).__name__}")
    return values


_MISMATCH = object()  # what _as_type returns for a value the type cannot take
_YAML_BOOLEAN_HINT = " (YAML reads a bare yes, no, on or off as true or false: quote it)"


def _as_type(value, hint):
    """`value`, from a JSON/YAML file, as a field of type `hint` takes it: text converted as the command line converts
    it (int("8"), float("3e-4"), "true" as True), an int taken for a float, a single value for a list. _MISMATCH if
    the type cannot take it. Types no file can spell (config objects) are left to the dataclass."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None if type(None) in typing.get_args(hint) else _MISMATCH
        taken = [typed for typed in (_as_type(value, member) for member in _members(hint)) if typed is not _MISMATCH]
        return value if any(typed is value for typed in taken) else next(iter(taken), _MISMATCH)  # unchanged first
    if origin is typing.Literal:
        return value if value in typing.get_args(hint) else _MISMATCH
    if origin is list:
        (item_type,) = typing.get_args(hint) or (typing.Any,)
        items = [_as_type(item, item_type) for item in (value if isinstance(value, list) else [value])]
        return _MISMATCH if _MISMATCH in items else items
    if hint is bool:
        return value if isinstance(value, bool) else _text_as(value, string_to_bool, ArgumentTypeError)
    if hint in (int, float):
        if isinstance(value, str):
            return _text_as(value, hint, ValueError)
        numbers = int if hint is int else (int, float)
        return hint(value) if isinstance(value, numbers) and not isinstance(value, bool) else _MISMATCH
    if hint is str:
        return value if isinstance(value, str) else _MISMATCH
    if dict in (hint, origin):
        return value if isinstance(value, dict) else _MISMATCH
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value if isinstance(value, hint) or value in [member.value for member in hint] else _MISMATCH
    return value


def _text_as(value, convert, error):
    if not isinstance(value, str):
        return _MISMATCH
    try:
        return convert(value)
    except error:
        return _MISMATCH


def _takes_words(hint, choices):
    """Whether a field takes words (strings, or a choice of them): where YAML's yes/no/on/off are a likely slip."""
    return bool(choices) or any(member is str or typing.get_origin(member) is typing.Literal
                                or (isinstance(member, type) and issubclass(member, enum.Enum))
                                for member in _members(hint))


def _members(hint):
    """The types a Union (or Optional) admits besides None; the type itself otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [member for member in typing.get_args(hint) if member is not type(None)]
    return [hint]


def _describe(hint):
    """The type as the message names it."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        described = " or ".join(_describe(member) for member in _members(hint))
        return described + (" or null" if type(None) in typing.get_args(hint) else "")
    if origin is typing.Literal:
        return f"one of {', '.join(map(str, typing.get_args(hint)))}"
    if origin is list:
        return f"a list ({' or '.join(_describe(item) for item in typing.get_args(hint)) or 'anything'} each)"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = [str(member.value) for member in hint]
        return f"one of {', '.join(values[:6])}{', ...' if len(values) > 6 else ''}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    return names.get(origin or hint, getattr(hint, "__name__", str(hint)))


def _existing(path):
    if not os.path.isfile(path):
        raise UserError(f"argument file {path} does not exist: pass flags, or the path of a .json/.yaml file")
    return path


def _first_line(err):
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


@contextlib.contextmanager
def one_line_errors():
    """Around a command (or, as `@one_line_errors()`, its main()): a UserError becomes `error: ...` on stderr and exit
    code 2, a RunFailed (a full disk, a diverged run) the same with exit code 1; no traceback. The one place that
    does it: the training scripts (through `main_entry`), `python -m ipu_train.plan` and train_tokenizer.py."""
    try:
        yield
    except (UserError, RunFailed) as err:
        print(f"error: {_first_line(err)}", file=sys.stderr)
        sys.exit(err.exit_code)


def main_entry(main):
    """Decorate a training script's main(): `one_line_errors`, plus Ctrl-C outside training (which stops with a
    checkpoint) as exit code 130 with no traceback, and, under torchrun, a clean exit from the process group."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        distributed = torch.distributed.is_available()
        try:
            with one_line_errors():
                result = main(*args, **kwargs)
                if distributed and torch.distributed.is_initialized():
                    torch.distributed.barrier()  # every rank is done with the group before any leaves it
                return result
        except KeyboardInterrupt:
            print("error: interrupted (Ctrl-C); checkpoints saved before stay as they are", file=sys.stderr)
            sys.exit(128 + signal.SIGINT)
        finally:
            # Under torchrun: leave the process group cleanly, so that no rank aborts while another exits.
            if distributed and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    return wrapper


def setup_logging(training_args):
    """Hugging Face example-script logging: INFO on the main process, warnings elsewhere. The scripts and the runtime
    share the "ipu_train" logger, so that each line is written once and `CaptureLogger(run_clm.logger)` sees them."""
    import datasets  # here, not at the top: `python -m ipu_train.plan` and train_tokenizer.py load no datasets

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%m/%d/%Y %H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log:  # --log_level defaults to "passive": INFO on the main process, as users expect
        transformers.utils.logging.set_verbosity_info()
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    if training_args.disable_tqdm:  # every bar: the data's, and transformers' own (loading weights)
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
