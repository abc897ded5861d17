"""Where a run writes: checked once the flags are parsed, before any data is processed, so that a folder that cannot
take the results stops the run at once, not at its first save after hours of training. Nothing is created here."""
import os
import tempfile

from .errors import UserError


def check_writable(output_dir):
    """`output_dir` must be a directory this process can write into, or a path one can be created at."""
    if not output_dir or not output_dir.strip():
        raise UserError("--output_dir is empty: name the directory to write the model and checkpoints to")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir} is a file, not a directory: choose another --output_dir")
    existing = _nearest_existing(os.path.abspath(output_dir))
    if not os.path.isdir(existing):
        raise UserError(f"--output_dir {output_dir}: {existing} is a file, so no directory can be made there: "
                        "choose another --output_dir")
    reason = _cannot_write(existing)
    if reason is not None:
        where = "" if existing == os.path.abspath(output_dir) else f" (it would be made inside {existing})"
        raise UserError(f"--output_dir {output_dir} cannot be written{where}: {reason}: choose another "
                        "--output_dir")


def _nearest_existing(path):
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _cannot_write(directory):
    """Why a file cannot be made in `directory` (a read-only mount, missing permission, a full disk), or None. A
    real file is tried: permission bits alone say nothing of a read-only mount, nor for root."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as err:
        return err.strerror or type(err).__name__
    return None
