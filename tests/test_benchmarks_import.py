"""The benchmark scripts import on a machine without a GPU: a name they take from ipu_train that is renamed or
removed fails here, not on the lent GPU machine, where cuda_check.py runs only in benchmarks/gpu_check.sh."""
import importlib.util
import pathlib

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script", sorted(path.name for path in BENCHMARKS.glob("*.py")))
def test_the_benchmark_script_imports(script):
    spec = importlib.util.spec_from_file_location(f"benchmark_{script[:-3]}", BENCHMARKS / script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # each runs its work under __main__ only
