"""Stopping a run from outside: SIGTERM / SIGINT save a checkpoint at a group boundary and exit with 128 + the
signal (in one process and under torchrun with two), a kill at any moment of a save leaves only complete
checkpoints, and the same command then resumes exactly. Real processes, tiny GPT-2."""
import os
import signal
import subprocess
import sys
import time

import pytest

import run_clm
from ipu_train import checkpoint as ckpt
from ipu_train import signals

from .conftest import REPO
from .test_scripts_clm_mlm import clm_args, logged_losses

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PYTHONUNBUFFERED": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def long_run(text_files, tokenizer_dir, output_dir, *extra, steps=100):
    """Many quick steps, so that a signal sent at the first logged loss lands in the middle of training."""
    return clm_args(text_files, tokenizer_dir, output_dir, "--do_train", "--max_steps", str(steps), "--logging_steps",
                    "1", *extra)


def start_and_wait_for(command, marker, timeout=120):
    """Start `command` and return (process, output so far) once a line holding `marker` is printed."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                               env=ENV)
    lines, deadline = [], time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            return process, lines
        assert time.monotonic() < deadline, "".join(lines[-30:])
    raise AssertionError(f"the run ended before printing {marker!r}:\n{''.join(lines[-30:])}")


def finish(process, lines, timeout=120):
    lines += process.stdout.read().splitlines(keepends=True)
    return process.wait(timeout=timeout), "".join(lines)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_the_same_command_resumes_exactly(text_files, bpe_tokenizer_dir, tmp_path,
                                                                          number):
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "run_clm.py"), *long_run(text_files, bpe_tokenizer_dir, out)]
    process, lines = start_and_wait_for(command, "'loss'")
    process.send_signal(number)
    code, output = finish(process, lines)
    assert code == 128 + number, output[-3000:]
    assert "Traceback" not in output
    saved = ckpt.checkpoints_in(out)
    assert len(saved) == 1 and ckpt.incompleteness(saved[0]) is None, output[-3000:]
    step = ckpt.read_manifest(saved[0])["step"]
    assert 0 < step < 100
    assert (out / "trainer_state.json").is_file() and not (out / "model.safetensors").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=ENV)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"Resuming from {saved[0]}" in resumed.stdout
    reference = tmp_path / "reference"
    run_clm.main(long_run(text_files, bpe_tokenizer_dir, reference))
    assert logged_losses(out) == logged_losses(reference)


def workers_of(launcher):
    """The processes torchrun started (its children)."""
    with open(f"/proc/{launcher.pid}/task/{launcher.pid}/children") as handle:
        return [int(pid) for pid in handle.read().split()]


STAGES = ("--pipeline_stages_across_processes", "--ipu_config_overrides", "layers_per_ipu=[1 1]",
          "--gradient_accumulation_steps", "2")


@pytest.mark.parametrize("target", ["torchrun", "one worker", "one pipeline stage"])
def test_torchrun_replicas_stop_together_on_a_signal_and_resume(text_files, bpe_tokenizer_dir, tmp_path, target):
    """torchrun relays a signal to every worker; a signal that reaches one worker only (a node's own supervisor)
    stops them all at the same group too, since the request travels with the group's results; so does one that
    reaches the last of two pipeline stages (--pipeline_stages_across_processes)."""
    out = tmp_path / "out"
    extra = STAGES if target == "one pipeline stage" else ()
    command = TORCHRUN + [str(REPO / "run_clm.py"), *long_run(text_files, bpe_tokenizer_dir, out, *extra)]
    process, lines = start_and_wait_for(command, "'loss'")
    if target == "torchrun":
        process.send_signal(signal.SIGTERM)
    else:
        os.kill(workers_of(process)[-1], signal.SIGTERM)
    code, output = finish(process, lines, timeout=60)
    assert code != 0
    saved = ckpt.checkpoints_in(out)
    assert len(saved) == 1 and ckpt.incompleteness(saved[0]) is None, output[-3000:]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(ckpt.read_manifest(saved[0])["files"])
    assert output.count("Stopped by signal 15 at step") == 2  # both processes stopped through the save, at one step
    assert not (out / "model.safetensors").exists()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=ENV)
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"Resuming from {saved[0]}" in done.stdout


@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_a_kill_at_any_moment_of_a_save_leaves_only_complete_checkpoints(text_files, bpe_tokenizer_dir, tmp_path,
                                                                         delay):
    """SIGKILL, which no handler sees, during the saves of a run that saves every step."""
    out = tmp_path / "out"
    argv = long_run(text_files, bpe_tokenizer_dir, out, "--save_steps", "1", steps=30)
    process, _ = start_and_wait_for([sys.executable, str(REPO / "run_clm.py"), *argv], "Saving model checkpoint")
    time.sleep(delay)
    process.kill()
    process.wait()
    for folder in ckpt.checkpoints_in(out):
        assert ckpt.incompleteness(folder) is None, folder
    run_clm.main(argv)  # the same command: resumes from the newest complete checkpoint and finishes
    assert not ckpt.leftover_staging(out)
    reference = tmp_path / "reference"
    run_clm.main(long_run(text_files, bpe_tokenizer_dir, reference, "--save_steps", "100", steps=30))
    assert logged_losses(out) == logged_losses(reference)


def test_the_first_signal_asks_a_second_later_one_ends_at_once(monkeypatch):
    exits, clock = [], [100.0]
    monkeypatch.setattr(signals.os, "_exit", exits.append)
    monkeypatch.setattr(signals.time, "monotonic", lambda: clock[0])
    with signals.StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_number == signal.SIGTERM and exits == []
        clock[0] += 0.5  # torchrun relaying the terminal's Ctrl-C: the same request
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == []
        clock[0] += 2.0
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [128 + signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
