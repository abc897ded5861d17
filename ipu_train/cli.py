"""What every script does around its own work: read flags (or one .json/.yaml file), set up logging, refuse an
output directory that would be clobbered, and turn a user mistake into one line on stderr with exit code 2."""
import functools
import logging
import os
import signal
import sys

import datasets
import torch
import transformers
import yaml
from transformers import HfArgumentParser

from .errors import RunFailed, UserError

logger = logging.getLogger("ipu_train")


class ScriptArgumentParser(HfArgumentParser):
    """HfArgumentParser whose errors are one line (no usage block) and exit code 2."""

    def error(self, message):
        raise UserError(message)

    def parse_script_args(self, argv=None):
        """Flags, or a single .json / .yaml / .yml file holding all of them (the Hugging Face convention)."""
        argv = sys.argv[1:] if argv is None else argv
        try:
            if len(argv) == 1 and argv[0].endswith(".json"):
                return self.parse_json_file(_existing(argv[0]), allow_extra_keys=False)
            if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
                return self.parse_yaml_file(_existing(argv[0]), allow_extra_keys=False)
            return self.parse_args_into_dataclasses(args=argv)
        except ValueError as err:  # dataclass __post_init__ checks (transformers' and ours) raise ValueError
            raise UserError(_first_line(err)) from None
        except yaml.YAMLError as err:
            raise UserError(f"{argv[0]} is not valid YAML: {' '.join(str(err).split())}") from None


def _existing(path):
    if not os.path.isfile(path):
        raise UserError(f"argument file {path} does not exist: pass flags, or the path of a .json/.yaml file")
    return path


def _first_line(err):
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def main_entry(main):
    """Decorate a script's main(): a UserError becomes `error: ...` on stderr and exit code 2, a RunFailed (a full
    disk, a diverged run) the same with exit code 1, Ctrl-C outside training (which stops with a checkpoint) exit
    code 130; no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        distributed = torch.distributed.is_available()
        try:
            result = main(*args, **kwargs)
            if distributed and torch.distributed.is_initialized():
                torch.distributed.barrier()  # every rank is done with the group before any leaves it
            return result
        except (UserError, RunFailed) as err:
            print(f"error: {_first_line(err)}", file=sys.stderr)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            print("error: interrupted before training started; nothing was trained", file=sys.stderr)
            sys.exit(128 + signal.SIGINT)
        finally:
            # Under torchrun: leave the process group cleanly, so that no rank aborts while another exits.
            if distributed and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    return wrapper


def setup_logging(training_args):
    """Hugging Face example-script logging: INFO on the main process, warnings elsewhere."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%m/%d/%Y %H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log:  # --log_level defaults to "passive": INFO on the main process, as users expect
        transformers.utils.logging.set_verbosity_info()
    level = training_args.get_process_log_level()
    for name in ("ipu_train", "__main__"):
        logging.getLogger(name).setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    if training_args.disable_tqdm:
        datasets.disable_progress_bars()
