"""A script under torchrun: two gloo replicas evaluate their shards and report the same metrics as one process."""
import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO
from .test_scripts_clm_mlm import clm_args, results


def test_two_replicas_report_the_metrics_of_one_process(text_files, bpe_tokenizer_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    single, double = tmp_path / "one", tmp_path / "two"
    # Evaluation only: the same seed builds the same new model in every process.
    argv = clm_args(text_files, bpe_tokenizer_dir, single, "--do_eval", "--per_device_eval_batch_size", "4")
    subprocess.run([sys.executable, str(REPO / "run_clm.py"), *argv], check=True, capture_output=True, cwd=REPO,
                   env=env)
    argv = clm_args(text_files, bpe_tokenizer_dir, double, "--do_eval", "--per_device_eval_batch_size", "4")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "run_clm.py"), *argv], capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = results(single, "eval"), results(double, "eval")
    assert two["eval_samples"] == one["eval_samples"] == 32
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-6)
    assert two["eval_accuracy"] == pytest.approx(one["eval_accuracy"], rel=1e-9)
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
    assert json.loads((double / "all_results.json").read_text())["eval_loss"] == two["eval_loss"]


def test_a_replica_without_evaluation_samples_still_reports(text_files, bpe_tokenizer_dir, tmp_path):
    """One evaluation sample for two replicas: the second has none, yet takes part in the metrics' reduction."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    argv = clm_args(text_files, bpe_tokenizer_dir, tmp_path / "out", "--do_eval", "--max_eval_samples", "1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "run_clm.py"), *argv], capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = results(tmp_path / "out", "eval")
    assert metrics["eval_samples"] == 1 and 0 <= metrics["eval_accuracy"] <= 1
