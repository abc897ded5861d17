"""Data-parallel replicas over torchrun (gloo, CPU): 2 processes x micro-batch 2 give the losses of 1 process with
micro-batch 2 x gradient accumulation 2 at the same combined batch of 4.

Why they are equal: step s consumes order[4s : 4s+4] in both runs. One process accumulates the mean loss of samples
(0,1) and of (2,3), each divided by 2; with 2 replicas, replica 0 takes (0,1) and replica 1 takes (2,3), and DDP
averages their gradients, which is the same sum divided by 2. Rows have equal lengths (no padding) and dropout is
off, so each micro-batch mean covers the same number of tokens and no randomness differs between the runs."""
import json
import math
import os
import subprocess
import sys

from tests._ddp_worker import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_gloo_replicas_match_one_process_at_the_same_combined_batch(tmp_path):
    distributed = tmp_path / "ddp"
    distributed.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(ROOT, "tests", "_ddp_worker.py"), str(distributed), "2", "1"],
        env=env, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [json.loads((distributed / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    single = run(str(tmp_path / "single"), micro_batch=2, accumulation=2)

    assert all(r["world_size"] == 2 and r["replication_factor"] == 2 for r in ranks)
    assert ranks[0]["losses"] == ranks[1]["losses"]  # every replica logs the all-reduced loss
    assert len(single["losses"]) == len(ranks[0]["losses"]) == 10
    for step, (one, two) in enumerate(zip(single["losses"], ranks[0]["losses"]), 1):
        assert math.isclose(one, two, rel_tol=1e-5), f"step {step}: 1 process {one} vs 2 replicas {two}"
    assert math.isclose(single["eval_loss"], ranks[0]["eval_loss"], rel_tol=1e-6)  # every eval sample, once

    # only the main process writes: one checkpoint tree, with each replica's RNG state
    checkpoint = distributed / "checkpoint-5"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "ipu_config.json").is_file()
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(checkpoint))
