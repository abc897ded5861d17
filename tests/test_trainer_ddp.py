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


def two_replicas(output_dir, *worker_args):
    """Runs tests/_ddp_worker.py in 2 gloo processes (micro-batch 2, no accumulation); returns each rank's result."""
    output_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(ROOT, "tests", "_ddp_worker.py"), str(output_dir), "2", "1", *worker_args],
        env=env, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return [json.loads((output_dir / f"result-{rank}.json").read_text()) for rank in (0, 1)]


def test_two_gloo_replicas_match_one_process_at_the_same_combined_batch(tmp_path):
    distributed = tmp_path / "ddp"
    ranks = two_replicas(distributed)
    single = run(str(tmp_path / "single"), micro_batch=2, accumulation=2)

    assert all(r["world_size"] == 2 and r["replication_factor"] == 2 for r in ranks)
    assert ranks[0]["losses"] == ranks[1]["losses"]  # every replica logs the all-reduced loss
    assert len(single["losses"]) == len(ranks[0]["losses"]) == 10
    for step, (one, two) in enumerate(zip(single["losses"], ranks[0]["losses"]), 1):
        assert math.isclose(one, two, rel_tol=1e-5), f"step {step}: 1 process {one} vs 2 replicas {two}"
    assert math.isclose(single["eval_loss"], ranks[0]["eval_loss"], rel_tol=1e-6)  # every eval sample, once

    # Two replicas in one process (as `--n_ipu 8` on one GPU asks): run in turn, the losses of the two processes.
    folded = run(str(tmp_path / "folded"), micro_batch=2, accumulation=1, replicas=2)
    assert folded["replication_factor"] == 2 and folded["world_size"] == 1
    for step, (one, two) in enumerate(zip(folded["losses"], ranks[0]["losses"]), 1):
        assert math.isclose(one, two, rel_tol=1e-5), f"step {step}: 2 replicas in 1 process {one} vs 2 processes {two}"

    # only the main process writes: one checkpoint tree, with each replica's RNG state
    checkpoint = distributed / "checkpoint-5"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "ipu_config.json").is_file()
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(checkpoint))


def test_sharded_optimizer_state_trains_and_resumes_like_the_whole_state(tmp_path):
    """replicated_tensor_sharding (ZeRO-1): each replica updates its share of the parameters and broadcasts it; the
    losses equal those of replicas that each keep the whole state, and a checkpoint (state gathered on the main
    process) resumes the run exactly."""
    whole = two_replicas(tmp_path / "whole")
    sharded = two_replicas(tmp_path / "sharded", "sharded")
    assert whole[0]["optimizer"] == "AdamW" and sharded[0]["optimizer"] == "ZeroRedundancyOptimizer"
    for step, (one, two) in enumerate(zip(whole[0]["losses"], sharded[0]["losses"]), 1):
        assert math.isclose(one, two, rel_tol=1e-5), f"step {step}: whole state {one} vs sharded {two}"
    assert math.isclose(whole[0]["eval_loss"], sharded[0]["eval_loss"], rel_tol=1e-5)
    resumed = two_replicas(tmp_path / "resumed", "sharded", str(tmp_path / "sharded" / "checkpoint-5"))
    assert resumed[0]["losses"] == sharded[0]["losses"]  # the first 5 come back with the trainer state
