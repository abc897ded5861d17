"""Runs that never lose work: checkpoints complete or absent, resumed only when complete and from the same run,
stale checkpoints never resumed, a full disk or a diverged loss stopping with one line, an output_dir checked before
any work. End to end through run_clm.main on a tiny GPT-2."""
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess

import pytest
import torch

import run_clm
from ipu_train import checkpoint as ckpt

from .test_scripts_clm_mlm import clm_args, logged_losses


def run(args, capsys=None):
    """run_clm.main(args): the exit code (0 when it returns) and the one error line, if any."""
    try:
        run_clm.main(args)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err.strip().splitlines() if capsys else []
    return code, (err[-1] if err else "")


def steps(max_steps, save_steps=2):
    return ["--do_train", "--max_steps", str(max_steps), "--save_steps", str(save_steps)]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def state(output_dir):
    return json.loads((output_dir / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(text_files, bpe_tokenizer_dir, tmp_path_factory):
    """8 steps in one go, a checkpoint every 2."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, *steps(8)))
    return out


def test_a_checkpoint_is_renamed_into_place_with_a_manifest_of_its_files(uninterrupted):
    folders = sorted(p.name for p in uninterrupted.iterdir() if p.name.startswith(("checkpoint-", ".partial")))
    assert folders == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    manifest = ckpt.read_manifest(uninterrupted / "checkpoint-4")
    assert manifest["step"] == 4 and manifest["resumable"]
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(
        manifest["files"])
    assert manifest["geometry"] == {"micro_batch": 4, "accumulation": 1, "replicas": 1, "device_iterations": 1,
                                    "processes": 1, "train_samples": 738, "pad_on_batch_axis": False}
    assert ckpt.incompleteness(uninterrupted / "checkpoint-4") is None


@pytest.mark.parametrize("content, size", [(b"8 by", 4), (b"8 bytes!12345678", 16)])
def test_a_file_whose_size_differs_from_the_manifest_makes_the_checkpoint_incomplete(tmp_path, content, size):
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"8 bytes!")
    ckpt.write_manifest(str(folder), 2, {}, {}, {}, True)
    assert ckpt.incompleteness(str(folder)) is None
    # Cut short (a save that never finished) or grown (written over by another run): either way not that save.
    (folder / "weights.bin").write_bytes(content)
    assert ckpt.incompleteness(str(folder)) == f"weights.bin has {size} bytes, not the 8 it was saved with"


@pytest.mark.parametrize("removed", [("trainer_state.json", "scheduler.pt", "rng_state.pth"), ("model.safetensors",)])
def test_resume_skips_an_incomplete_newest_checkpoint(text_files, bpe_tokenizer_dir, uninterrupted, tmp_path, caplog,
                                                      removed):
    """(a) weights written but not the state: the rerun used to restart from step 0 while saying it resumed;
    (b) weights missing (a full disk): every rerun used to crash although a complete checkpoint sat beside it."""
    out = tmp_path / "out"
    for name in ("checkpoint-4", "checkpoint-6"):  # as an 8-step run killed after its third save
        shutil.copytree(uninterrupted / name, out / name)
    for name in removed:
        (out / "checkpoint-6" / name).unlink()
    with caplog.at_level(logging.INFO, logger="ipu_train"):
        run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, *steps(8)))
    messages = [r.getMessage() for r in caplog.records]
    assert any("Skipping" in m and "checkpoint-6" in m and any(name in m for name in removed) for m in messages)
    assert any("Resuming from" in m and "checkpoint-4" in m for m in messages)
    assert state(out)["global_step"] == 8
    assert logged_losses(out) == logged_losses(uninterrupted)


def test_train_loss_after_a_resume_covers_the_whole_run(text_files, bpe_tokenizer_dir, uninterrupted, tmp_path):
    out = tmp_path / "out"
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, *steps(8), "--resume_from_checkpoint",
                          str(uninterrupted / "checkpoint-4")))
    resumed = json.loads((out / "train_results.json").read_text())["train_loss"]
    whole = json.loads((uninterrupted / "train_results.json").read_text())["train_loss"]
    assert resumed == pytest.approx(whole, rel=1e-6)


def test_checkpoints_that_cannot_be_resumed_are_one_line_errors(text_files, bpe_tokenizer_dir, uninterrupted,
                                                                 tmp_path, capsys):
    source = tmp_path / "checkpoint-4"
    shutil.copytree(uninterrupted / "checkpoint-4", source)
    base = clm_args(text_files, bpe_tokenizer_dir, tmp_path / "out", *steps(8))

    def resume(folder, *extra):
        return run(base + ["--resume_from_checkpoint", str(folder), *extra], capsys)

    assert resume(tmp_path / "nothing") == (2, f"error: --resume_from_checkpoint {tmp_path / 'nothing'} does not "
                                                "exist: pass a checkpoint-N directory")
    code, line = resume(text_files)
    assert code == 2 and "is not a complete checkpoint: it has no checkpoint_manifest.json" in line
    optimizer = source / "optimizer.pt"
    saved = optimizer.read_bytes()
    optimizer.write_bytes(saved[:10])
    code, line = resume(source)
    assert code == 2 and "optimizer.pt has 10 bytes, not the" in line
    assert not (tmp_path / "out").exists()  # all found before any data was processed
    optimizer.write_bytes(saved)
    # Another model: 3 layers instead of 2.
    other = [arg.replace("n_layer=2", "n_layer=3") for arg in base]
    code, line = run(other + ["--resume_from_checkpoint", str(source)], capsys)
    assert code == 2 and "was saved by another model (n_layer 2 there, 3 here)" in line
    # Another batch geometry, or other data: the data position would be wrong.
    code, line = resume(source, "--per_device_train_batch_size", "2")
    assert code == 2 and "micro-batch 4 x gradient accumulation 1" in line and "micro-batch 2" in line
    assert "--ignore_data_skip" in line and f"--model_name_or_path {source} and another --output_dir" in line
    code, line = resume(source, "--max_train_samples", "100")
    assert code == 2 and "738 samples; this run has" in line and "100 samples" in line
    # A corrupt trainer state of the right size.
    trainer_state = source / "trainer_state.json"
    state_text = trainer_state.read_bytes()
    trainer_state.write_bytes(b"{" * len(state_text))
    code, line = resume(source)
    assert code == 2 and line.startswith(f"error: checkpoint {source} cannot be loaded")
    trainer_state.write_bytes(state_text)
    # A corrupt file of the right size.
    optimizer.write_bytes(b"\0" * len(saved))
    code, line = resume(source)
    assert code == 2 and line.startswith(f"error: checkpoint {source} cannot be loaded")


def test_resuming_a_run_that_is_already_done_is_refused_and_keeps_the_model(text_files, bpe_tokenizer_dir, tmp_path,
                                                                            capsys):
    out = tmp_path / "out"
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, *steps(4)))
    before = digest(out / "model.safetensors")
    code, line = run(clm_args(text_files, bpe_tokenizer_dir, out, *steps(4)), capsys)
    assert code == 2 and "is at step 4, and this run ends at step 4: nothing is left to train" in line
    assert digest(out / "model.safetensors") == before


def test_overwrite_output_dir_removes_an_earlier_runs_checkpoints(text_files, bpe_tokenizer_dir, tmp_path, capsys):
    """The reported case: an old checkpoint-10, a run with --overwrite_output_dir, then one without it used to resume
    the old checkpoint, train 0 steps and replace the new model with the old weights."""
    out = tmp_path / "out"
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, *steps(10, save_steps=10)))
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, *steps(6), "--overwrite_output_dir"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, *steps(8)))
    assert state(out)["global_step"] == 8
    assert state(out / "checkpoint-8")["log_history"][0]["step"] == 2  # the new run's history, from its start


def test_a_full_disk_stops_with_one_line_and_the_same_command_resumes(text_files, bpe_tokenizer_dir, uninterrupted,
                                                                      tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    command = clm_args(text_files, bpe_tokenizer_dir, out, *steps(8))
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path) and str(path).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    code, line = run(command, capsys)
    assert code == 1
    assert line.startswith("error: saving checkpoint-4") and "No space left on device" in line
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert ckpt.incompleteness(out / "checkpoint-2") is None and not (out / "model.safetensors").exists()
    monkeypatch.setattr(torch, "save", real_save)
    assert run(command, capsys)[0] == 0
    assert logged_losses(out) == logged_losses(uninterrupted)


def test_only_complete_checkpoints_count_for_the_save_total_limit(text_files, bpe_tokenizer_dir, uninterrupted,
                                                                   tmp_path):
    """An incomplete checkpoint of a higher step (an earlier run's, killed) must not push the complete ones out."""
    out = tmp_path / "out"
    shutil.copytree(uninterrupted / "checkpoint-8", out / "checkpoint-100")
    (out / "checkpoint-100" / "model.safetensors").unlink()
    shutil.copytree(uninterrupted / "checkpoint-2", out / "checkpoint-2")
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, *steps(8), "--save_total_limit", "1"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-100", "checkpoint-8"]
    assert ckpt.newest_complete(out)[0] == str(out / "checkpoint-8")


def test_a_nan_loss_at_the_end_writes_no_final_model(text_files, bpe_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = clm_args(text_files, bpe_tokenizer_dir, out, *steps(6, save_steps=100))
    args[args.index("--learning_rate") + 1] = "1e6"
    code, line = run(args, capsys)
    assert code == 1 and "the loss of the last step was NaN or inf, by step 6" in line
    assert not (out / "model.safetensors").exists()


def test_overwrite_removes_earlier_checkpoints_even_when_the_new_run_fails_early(text_files, bpe_tokenizer_dir,
                                                                                 uninterrupted, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    args = clm_args(text_files, bpe_tokenizer_dir, out, *steps(8, save_steps=100), "--overwrite_output_dir")
    args[args.index("--learning_rate") + 1] = "1e6"
    code, line = run(args + ["--max_consecutive_nonfinite_steps", "3"], capsys)
    assert code == 1 and "no checkpoint was saved" in line
    assert not list(out.glob("checkpoint-*"))


def test_a_diverging_run_stops_with_one_line_and_saves_no_nan_weights(text_files, bpe_tokenizer_dir, tmp_path,
                                                                      capsys):
    out = tmp_path / "out"
    args = clm_args(text_files, bpe_tokenizer_dir, out, *steps(30, save_steps=1), "--max_consecutive_nonfinite_steps",
                    "3")
    args[args.index("--learning_rate") + 1] = "1e6"
    code, line = run(args, capsys)
    assert code == 1
    assert line.startswith("error: training diverged: the loss was NaN or inf for 3 optimizer steps in a row, by step")
    assert "(learning rate 9e+05)" in line  # the rate of the last step, linearly decaying from 1e6
    assert not (out / "model.safetensors").exists()
    kept = ckpt.checkpoints_in(out)
    assert kept, "the steps before the first NaN were saved"
    weights = torch.load(os.path.join(kept[0], "optimizer.pt"), weights_only=True)["state"]
    assert all(torch.isfinite(v).all() for s in weights.values() for v in s.values() if torch.is_tensor(v))
    assert str(kept[0]) in line


def test_epochs_that_train_nothing_are_refused(text_files, bpe_tokenizer_dir, tmp_path, capsys):
    for epochs in ("-1", "0"):
        code, line = run(clm_args(text_files, bpe_tokenizer_dir, tmp_path / "out", "--do_train",
                                  "--num_train_epochs", epochs), capsys)
        assert code == 2 and "--num_train_epochs" in line
    assert not (tmp_path / "out").exists()


def test_an_output_dir_that_cannot_be_written_stops_before_any_work(text_files, bpe_tokenizer_dir, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for target, message in ((a_file, "is a file, not a directory"), (a_file / "sub", "is a file, so no directory"),
                            ("/proc/ipu-train-test", "cannot be written")):
        code, line = run(clm_args(text_files, bpe_tokenizer_dir, target, *steps(2)), capsys)
        assert code == 2 and message in line, line
    assert a_file.read_text() == "x"


def test_failing_runs_create_no_output_dir(text_files, bpe_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    mistakes = (["--block_size", "0"], ["--learning_rate", "-1"], ["--resume_from_checkpoint", str(tmp_path / "x")],
                ["--ipu_config_overrides", "layers_per_ipu=[9 9]"], ["--per_device_train_batch_size", "100000"])
    for extra in mistakes:
        code, line = run(clm_args(text_files, bpe_tokenizer_dir, out, *steps(2)) + extra, capsys)
        assert code == 2, (extra, line)
        assert not out.exists(), extra


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real file system that fills up: a tmpfs (needs root and mount permission; skipped elsewhere)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()

    def mount(size, *options):
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join((*options, f"size={size}")), "tmpfs",
                               str(mount_point)], capture_output=True, text=True)
        return done.returncode == 0

    if not mount(4096):
        pytest.skip("a tmpfs cannot be mounted here (root with mount permission is needed)")
    subprocess.run(["umount", str(mount_point)], check=True)
    yield mount_point, mount
    subprocess.run(["umount", str(mount_point)], capture_output=True)


def test_a_really_full_disk_stops_with_one_line_and_the_same_command_resumes(text_files, bpe_tokenizer_dir,
                                                                             uninterrupted, small_tmpfs, capsys):
    mount_point, mount = small_tmpfs
    checkpoint_bytes = sum(f.stat().st_size for f in (uninterrupted / "checkpoint-2").rglob("*") if f.is_file())
    assert mount(int(checkpoint_bytes * 1.5))  # room for checkpoint-2, not for checkpoint-4 beside it
    out = mount_point / "out"
    command = clm_args(text_files, bpe_tokenizer_dir, out, *steps(8))
    code, line = run(command, capsys)
    assert code == 1 and line.startswith("error: saving checkpoint-4") and "checkpoint-2 is untouched" in line, line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
    assert ckpt.incompleteness(out / "checkpoint-2") is None
    assert mount("64m", "remount")  # space freed
    assert run(command, capsys)[0] == 0
    assert logged_losses(out) == logged_losses(uninterrupted)


def test_late_found_mistakes_are_one_line(text_files, bpe_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    for extra, phrase in ((["--block_size", "1"], "--block_size 1: a causal LM block needs 2 tokens or more"),
                          (["--max_train_samples", "0"], "--max_train_samples 0: keep at least 1 sample"),
                          (["--save_strategy", "best"], "metric_for_best_model")):
        code, line = run(clm_args(text_files, bpe_tokenizer_dir, out, *steps(2)) + extra, capsys)
        assert code == 2 and phrase in line, (extra, line)
    code, line = run(clm_args(text_files, bpe_tokenizer_dir, "", *steps(2)), capsys)
    assert code == 2 and "--output_dir is empty" in line


def test_a_resume_takes_this_runs_logging_and_save_steps(text_files, bpe_tokenizer_dir, uninterrupted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted / "checkpoint-4", out / "checkpoint-4")
    run_clm.main(clm_args(text_files, bpe_tokenizer_dir, out, "--do_train", "--max_steps", "10", "--save_steps", "3",
                          "--logging_steps", "1"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-4", "checkpoint-6",
                                                                 "checkpoint-9"]
    assert [e["step"] for e in state(out)["log_history"] if "loss" in e][-6:] == [5, 6, 7, 8, 9, 10]


def test_a_full_disk_at_the_final_save_is_one_line(text_files, bpe_tokenizer_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if str(path).endswith("training_args.bin") and "checkpoint" not in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    code, line = run(clm_args(text_files, bpe_tokenizer_dir, out, *steps(4)), capsys)
    assert code == 1 and line.startswith(f"error: saving the trained model in {out} failed (")
    assert "No space left on device" in line and ckpt.incompleteness(out / "checkpoint-4") is None
