"""ipu_train: run one IPU configuration on IPUs (PopTorch), NVIDIA GPUs and CPUs (PyTorch)."""
import importlib

__all__ = ["IPUConfig", "IPUTrainer", "IPUTrainingArguments", "UserError"]

_WHERE = {
    "IPUConfig": "ipu_train.config",
    "IPUTrainer": "ipu_train.trainer",
    "IPUTrainingArguments": "ipu_train.arguments",
    "UserError": "ipu_train.errors",
}


def __getattr__(name):
    # Lazy: `python -m ipu_train.plan` and the config tests need not import the trainer stack.
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(name)
