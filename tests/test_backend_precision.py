"""enable_half_partials maps onto cuBLAS's reduced-precision accumulation on CUDA, and leaves the CPU alone."""
import pytest
import torch

from ipu_train import IPUConfig
from ipu_train.backends.torch import allow_half_partials

FLAGS = ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")


@pytest.fixture
def restore_matmul_flags():
    saved = {name: getattr(torch.backends.cuda.matmul, name) for name in FLAGS}
    yield
    for name, value in saved.items():
        setattr(torch.backends.cuda.matmul, name, value)


@pytest.mark.parametrize("half_partials", [True, False])
def test_cuda_follows_the_configuration(half_partials, restore_matmul_flags):
    allow_half_partials(IPUConfig(enable_half_partials=half_partials), torch.device("cuda"))
    assert all(getattr(torch.backends.cuda.matmul, name) is half_partials for name in FLAGS)


def test_the_cpu_is_left_alone(restore_matmul_flags):
    before = {name: getattr(torch.backends.cuda.matmul, name) for name in FLAGS}
    allow_half_partials(IPUConfig(enable_half_partials=not before[FLAGS[0]]), torch.device("cpu"))
    assert {name: getattr(torch.backends.cuda.matmul, name) for name in FLAGS} == before
