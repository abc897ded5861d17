"""Checkpoints that are complete or absent, and the choice of the one to resume from.

A checkpoint is written into a staging folder beside its final place (`.partial-checkpoint-N`, a name that no
checkpoint search matches), every file flushed to disk, then a manifest written last (`checkpoint_manifest.json`:
its files and their sizes, the step, the model configuration's fingerprint, the batch geometry), and only then is
the folder renamed to `checkpoint-N`. A save killed half-way, or stopped by a full disk, leaves no `checkpoint-N`
behind; a `checkpoint-N` without a manifest, or whose files do not match it, is incomplete and never resumed from.
"""
import hashlib
import json
import logging
import os
import re
import shutil

import torch.distributed as dist

from .errors import UserError

logger = logging.getLogger("ipu_train")

MANIFEST_NAME = "checkpoint_manifest.json"
STAGING_PREFIX = ".partial-"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# How to use a checkpoint's weights without resuming it: a new run, in another folder (in its own output_dir the
# checkpoint would be resumed again).
AFRESH = "start afresh from its weights with --model_name_or_path {folder} and another --output_dir"
# Config keys that say how a model was loaded or run, not what it computes: a resume may differ in them.
_RUNTIME_CONFIG_KEYS = {"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "use_cache",
                        "_commit_hash", "_attn_implementation_autoset", "output_attentions",
                        "output_hidden_states", "return_dict"}


# --- what a checkpoint must match ------------------------------------------------------------------------------

def model_signature(config):
    """The model configuration's values that define the computation (a dict that JSON keeps as it is)."""
    values = config.to_dict() if hasattr(config, "to_dict") else {}
    return {key: value for key, value in sorted(values.items())
            if key not in _RUNTIME_CONFIG_KEYS and not key.startswith("_")}


def fingerprint(signature):
    return hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_geometry(geometry):
    samples = geometry.get("train_samples")
    return (f"micro-batch {geometry['micro_batch']} x gradient accumulation {geometry['accumulation']} x replicas "
            f"{geometry['replicas']}, device iterations {geometry['device_iterations']}, "
            f"{geometry['processes']} process(es), {'a stream' if samples is None else f'{samples:,} samples'}"
            f"{' padded' if geometry.get('pad_on_batch_axis') else ''}")


def describe_pipeline(geometry):
    pipeline = geometry.get("pipeline")
    if pipeline is None:
        return "whole replicas in each process"
    return (f"{pipeline['stages']} pipeline stages across {pipeline['processes_per_replica']} processes per replica "
            f"({pipeline['schedule']})")


# --- writing -----------------------------------------------------------------------------------------------------

def staging_path(final):
    parent, name = os.path.split(final)
    return os.path.join(parent, STAGING_PREFIX + name)


def write_manifest(folder, step, signature, geometry, totals, resumable):
    """The manifest, written last into a staging folder whose every other file is complete."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            _fsync_file(path)
            files[os.path.relpath(path, folder)] = os.path.getsize(path)
    manifest = {"format": 1, "step": step, "files": files, "model_config": fingerprint(signature),
                "model_signature": signature, "geometry": geometry, "train_loss_totals": totals,
                "resumable": resumable}
    path = os.path.join(folder, MANIFEST_NAME)
    with open(path, "w") as handle:
        json.dump(manifest, handle, indent=1, default=str)
        handle.flush()
        os.fsync(handle.fileno())


def publish(staging, final):
    """Rename the finished staging folder into place. A folder already there under that name (an incomplete save
    of an earlier run at the same step) is moved aside first and removed once the new one is in place."""
    _fsync_dir(staging)
    aside = None
    if os.path.exists(final):
        aside = staging_path(final) + ".old"
        remove(aside)
        os.rename(final, aside)
    os.rename(staging, final)
    _fsync_dir(os.path.dirname(final) or ".")
    if aside is not None:
        remove(aside)


def rotate(output_dir, limit, keep):
    """--save_total_limit: at most `limit` complete checkpoints stay, always those in `keep` (the one just saved, the
    best one), then the newest. Only complete checkpoints are counted or removed: an incomplete one never takes a
    complete one's place."""
    if not limit or limit <= 0:
        return
    keep = {os.path.abspath(path) for path in keep if path}
    complete = [os.path.abspath(f) for f in checkpoints_in(output_dir) if incompleteness(f) is None]
    others = [folder for folder in complete if folder not in keep]
    room = max(limit - len(keep & set(complete)), 0)
    for folder in others[room:]:
        logger.info("Deleting older checkpoint %s (--save_total_limit %d)", folder, limit)
        remove(folder)


def remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def leftover_staging(output_dir):
    """Staging folders of saves that never finished (a killed run)."""
    if not os.path.isdir(output_dir):
        return []
    return [os.path.join(output_dir, name) for name in os.listdir(output_dir) if name.startswith(STAGING_PREFIX)]


def _fsync_file(path):
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --- reading -----------------------------------------------------------------------------------------------------

def read_manifest(folder):
    with open(os.path.join(folder, MANIFEST_NAME)) as handle:
        return json.load(handle)


def incompleteness(folder):
    """Why `folder` is not a complete checkpoint, or None when it is."""
    if not os.path.isdir(folder):
        return "it is not a directory"
    if not os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
        return f"it has no {MANIFEST_NAME} (its save never finished, or it is not a checkpoint of these scripts)"
    try:
        files = read_manifest(folder)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST_NAME} is unreadable"
    for name, size in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path):,} bytes, not the {size:,} it was saved with"
    return None


def checkpoints_in(output_dir):
    """The `checkpoint-N` folders of `output_dir`, newest (highest step) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))
             and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)]


def newest_complete(output_dir):
    """(the newest complete checkpoint or None, the incomplete ones newer than it, each with the reason)."""
    skipped = []
    for folder in checkpoints_in(output_dir):
        reason = incompleteness(folder)
        if reason is None:
            return folder, skipped
        skipped.append((folder, reason))
    return None, skipped


def require_complete(folder, flag="--resume_from_checkpoint"):
    """A checkpoint asked for by name must be complete: one line saying what is wrong with it."""
    if not os.path.exists(folder):
        raise UserError(f"{flag} {folder} does not exist: pass a checkpoint-N directory")
    reason = incompleteness(folder)
    if reason is not None:
        raise UserError(f"{flag} {folder} is not a complete checkpoint: {reason}. Resume from an earlier "
                        "checkpoint-N, or start afresh with another --output_dir")
    return folder


def resume_checkpoint(training_args):
    """The checkpoint a training run resumes from, checked before any data is processed: --resume_from_checkpoint
    (which must be complete), else the newest complete `checkpoint-N` of `output_dir`, skipping (and naming)
    incomplete ones. A non-empty `output_dir` without one is refused unless --overwrite_output_dir: training would
    write over what is there."""
    args = training_args
    if not args.do_train:
        return None
    if args.resume_from_checkpoint:
        return agree(require_complete(args.resume_from_checkpoint))
    out = args.output_dir
    if getattr(args, "overwrite_output_dir", False) or not os.path.isdir(out):
        return None
    last, skipped = newest_complete(out)
    for folder, reason in skipped:
        logger.warning("Skipping %s, an incomplete checkpoint: %s", folder, reason)
    if last is None:
        staged = set(leftover_staging(out))
        if any(os.path.join(out, name) not in staged for name in os.listdir(out)):
            found = f"only incomplete checkpoints ({', '.join(os.path.basename(f) for f, _ in skipped)})" \
                if skipped else "no checkpoint-N"
            raise UserError(f"--output_dir {out} is not empty and holds {found} to resume from: pass "
                            "--overwrite_output_dir to train into it anyway, or choose another --output_dir")
        return None
    logger.info("Resuming from %s (found in --output_dir); pass --overwrite_output_dir to start afresh.", last)
    return agree(last)


def agree(path):
    """Every process resumes from the checkpoint the main process chose (they may see the file system at
    different moments)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return path
    chosen = [path]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def check_resumable(folder, signature, geometry, ignore_data_skip=False):
    """The run must be the one the checkpoint was saved by: the same model and the same batch geometry (the data
    position is counted in optimizer steps of that geometry); with --ignore_data_skip the data position is not used,
    so another geometry only warns."""
    manifest = read_manifest(folder)
    if manifest["model_config"] != fingerprint(signature):
        saved, signature = manifest["model_signature"], json.loads(json.dumps(signature, default=str))
        differences = [f"{key} {saved.get(key)!r} there, {signature.get(key)!r} here"
                       for key in sorted(set(saved) | set(signature)) if saved.get(key) != signature.get(key)]
        raise UserError(f"{folder} was saved by another model ({'; '.join(differences[:4]) or 'its configuration'}"
                        "): resume with the same model flags, or pass --overwrite_output_dir to start afresh")
    if not manifest["resumable"]:
        raise UserError(f"{folder} was saved with --save_only_model and holds no optimizer state: "
                        f"{AFRESH.format(folder=folder)}")
    if manifest["geometry"].get("pipeline") != geometry.get("pipeline"):
        raise UserError(f"{folder} was trained with {describe_pipeline(manifest['geometry'])}; this run has "
                        f"{describe_pipeline(geometry)}: its optimizer state is laid out per process, so resume on "
                        f"the same layout, or {AFRESH.format(folder=folder)}")
    if manifest["geometry"] != geometry:
        message = (f"{folder} was trained with {describe_geometry(manifest['geometry'])}; this run has "
                   f"{describe_geometry(geometry)}")
        if not ignore_data_skip:
            raise UserError(f"{message}: resume with the same batch flags, data and number of processes, pass "
                            f"--ignore_data_skip to start its data afresh, or {AFRESH.format(folder=folder)}")
        logger.warning("%s: --ignore_data_skip, so the data starts afresh", message)
    return manifest
