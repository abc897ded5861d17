"""The backend interface: both backends implement every method of `backends.base.Backend` with its parameters, the
trainer reaches a backend through that interface only, and the named sums survive their trip to the host."""
import ast
import inspect
import pathlib

import pytest
import torch

from ipu_train.backends.base import Backend, DeviceSums, GroupSums, PendingHostRead, TrainingGroup
from ipu_train.arguments import IPUTrainingArguments
from ipu_train.backends.torch import TorchBackend
from ipu_train.config import IPUConfig
from ipu_train.parallel import ParallelLayout

from .test_poptorch_backend import backend_module, poptorch  # noqa: F401 (a fixture)

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ipu_train"


def _methods(protocol):
    return {name: inspect.signature(member) for name, member in vars(protocol).items()
            if callable(member) and not name.startswith("_")}


def _check_implements(cls, protocol):
    for name, expected in _methods(protocol).items():
        assert callable(getattr(cls, name, None)), f"{cls.__name__} lacks {name}"
        assert list(inspect.signature(getattr(cls, name)).parameters) == list(expected.parameters), name


def test_the_torch_backend_implements_the_interface(tmp_path):
    _check_implements(TorchBackend, Backend)
    args = IPUTrainingArguments(output_dir=str(tmp_path), device_type="cpu")
    backend = TorchBackend(args, IPUConfig(), ParallelLayout.build(IPUConfig(), args))
    for name in Backend.__annotations__:
        assert hasattr(backend, name), f"TorchBackend lacks the attribute {name}"
    from ipu_train.backends.torch import _TorchGroup
    _check_implements(_TorchGroup, TrainingGroup)


def test_the_poptorch_backend_implements_the_interface(poptorch):  # noqa: F811 (the fixture)
    module = backend_module()
    _check_implements(module.PopTorchBackend, Backend)
    _check_implements(module._PopTorchGroup, TrainingGroup)


def _relative_imports(path):
    """The modules of the package that `path` imports from (`from .x import y`: "x")."""
    tree = ast.parse(path.read_text())
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level and node.module}


def test_the_trainer_imports_the_interface_not_a_backend():
    backends = {module for module in _relative_imports(PACKAGE / "trainer.py") if module.startswith("backends")}
    assert backends == {"backends", "backends.base"}


def test_the_poptorch_backend_does_not_import_the_torch_backend():
    assert "torch" not in _relative_imports(PACKAGE / "backends" / "poptorch.py")


def test_named_sums_reach_the_host_by_name():
    sums = DeviceSums(GroupSums, torch.device("cpu"))
    sums.add("loss", torch.tensor(2.5))
    sums.add("loss", torch.tensor(1.0))
    sums.add("finite_steps", torch.tensor(True))
    sums.put("grad_norm", torch.tensor(0.75))
    sums.raise_flag("diverged", torch.tensor(False))
    sums.raise_flag("diverged", torch.tensor(True))
    sums.raise_flag("diverged", torch.tensor(False))  # once raised, it stays
    result = PendingHostRead(sums).result()
    assert result == GroupSums(loss=3.5, finite_steps=1.0, tokens=0.0, grad_norm=0.75, stop_requested=0.0,
                               diverged=1.0, ends_nonfinite=0.0)
    with pytest.raises(KeyError):
        sums.add("losses", 1.0)
