"""LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning"), as the IPU and NVIDIA implementations
compute it:

    m = b1·m + (1−b1)·g                  v = b2·v + (1−b2)·g²
    m̂ = m / (1−b1^t)                     v̂ = v / (1−b2^t)          (only with bias_correction)
    u = m̂ / (√v̂ + eps) + weight_decay·w                               (decoupled decay, inside the update)
    r = ‖w‖ / ‖u‖, or 1 when either norm is 0; min(r, max_trust_ratio) when a maximum is set
    w = w − lr·r·u

Everything stays on the parameters' device: the step count is a Python int, the trust ratios are tensors, and
nothing is read back to the host, so a step never waits for the device.

Also here: the optimizer that --optim and --optim_args choose, through transformers' own mapping of their names
(`Trainer.get_optimizer_cls_and_kwargs`), for each backend; what a backend cannot run is refused in one line.
"""
import copy
import dataclasses
from collections import defaultdict

import torch
from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from .compat import optimizer_cls_and_kwargs
from .errors import UserError

# --optim_args keys that the trainer's parameter groups set themselves (0 for biases and norms), so that an
# optimizer-wide value would never be read.
GROUP_KEYS = ("weight_decay",)
# torch's choice of kernels: no meaning to PopTorch, which compiles the update itself.
TORCH_KERNEL_KEYS = ("fused", "foreach")
# The PopTorch optimizers whose accumulators and momenta take a precision (poptorch python/optim.py), which
# optimum-graphcore sets (trainer.py: create_optimizer): fp16 first-order terms unless --fp32, fp32 second-order.
POPTORCH_ACCUMULATING = ("Adam", "AdamW", "LAMB")


class LAMB(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias_correction=True,
                 max_trust_ratio=None):
        if lr < 0.0:
            raise ValueError(f"LAMB: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"LAMB: betas must lie in [0, 1), got {betas}")
        if eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"LAMB: eps and weight_decay must be >= 0, got {eps} and {weight_decay}")
        if max_trust_ratio is not None and max_trust_ratio <= 0.0:
            raise ValueError(f"LAMB: max_trust_ratio must be > 0 or None, got {max_trust_ratio}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, max_trust_ratio=max_trust_ratio)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # foreach kernels need one device and one dtype per call.
            buckets = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients")
                buckets[(p.device, p.dtype)].append(p)
            for params in buckets.values():
                self._update(params, group)
        return loss

    def _update(self, params, group):
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
        grads = [p.grad for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]

        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

        # u = m̂ / (√v̂ + eps) with m̂ = m/bc1, v̂ = v/bc2, computed as (m/bc1) / (√v/√bc2 + eps).
        if group["bias_correction"]:
            steps = [self.state[p]["step"] for p in params]
            bc1 = [1 - beta1 ** t for t in steps]
            sqrt_bc2 = [(1 - beta2 ** t) ** 0.5 for t in steps]
        else:
            bc1 = sqrt_bc2 = [1.0] * len(params)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, sqrt_bc2)
        torch._foreach_add_(denoms, group["eps"])
        updates = torch._foreach_div(exp_avgs, bc1)
        torch._foreach_div_(updates, denoms)
        if group["weight_decay"] != 0:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])

        weight_norms = torch.stack(torch._foreach_norm(params))
        update_norms = torch.stack(torch._foreach_norm(updates))
        ratios = torch.where((weight_norms > 0) & (update_norms > 0), weight_norms / update_norms,
                             torch.ones_like(weight_norms))
        if group["max_trust_ratio"] is not None:
            ratios = ratios.clamp(max=group["max_trust_ratio"])
        torch._foreach_mul_(updates, list((ratios * -group["lr"]).unbind()))
        torch._foreach_add_(params, updates)


def check_optimizer_flags(args):
    """At parse time, what building the optimizer would refuse later: --lamb with --optim or --optim_args, and an
    --optim (or --optim_args) that gives no optimizer of torch or transformers."""
    if args.use_lamb:
        if not is_default_optim(args):
            raise UserError(f"--lamb contradicts --optim {_name(args)}: drop one of them")
        if args.optim_args:
            raise UserError("--optim_args does not apply to --lamb: drop it")
        return
    torch_optimizer(args, args.device_type)


def is_default_optim(args):
    """Whether --optim is left at TrainingArguments' default (AdamW)."""
    default = next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == "optim")
    return args.optim == default


def lamb_kwargs(args):
    """--lamb / --lamb_no_bias_correction, with the Adam flags."""
    return dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                bias_correction=not args.lamb_no_bias_correction)


def torch_optimizer(args, device_type):
    """(class, keyword arguments) for the PyTorch backend: --optim as transformers maps it, among the optimizers of
    torch and transformers (the others are not known to run in our step loop). --optim left at its default is our
    AdamW: fused on CUDA, foreach elsewhere."""
    optimizer_class, kwargs = mapped_optimizer(args, _comes_with_torch_or_transformers, "PyTorch")
    if is_default_optim(args) and device_type != "cuda":
        kwargs.pop("fused", None)  # the default --optim of transformers 4 (adamw_torch) has no "fused"
        kwargs["foreach"] = True
    return optimizer_class, kwargs


def poptorch_optimizer(args, optim):
    """(class, keyword arguments) from `optim` (poptorch.optim): its LAMB with --lamb, else its optimizer named as the
    torch one --optim maps to, with the loss scaling and the accumulation precisions optimum-graphcore uses. No
    max_grad_norm: PopTorch's clipping fails to compile pipelined models (optimum-graphcore turns it off, trainer.py),
    so the backend warns that it is not applied."""
    if args.use_lamb:
        optimizer_class, kwargs = optim.LAMB, lamb_kwargs(args)
    else:
        torch_class, mapped = mapped_optimizer(args, lambda cls: _poptorch_class(cls, optim) is not None, "PopTorch")
        optimizer_class = _poptorch_class(torch_class, optim)
        kwargs = {key: value for key, value in mapped.items() if key not in TORCH_KERNEL_KEYS}
        if torch_class is torch.optim.AdamW:
            kwargs["bias_correction"] = True  # as torch computes it
    kwargs["loss_scaling"] = args.loss_scaling or 1.0
    if optimizer_class.__name__ in POPTORCH_ACCUMULATING:
        first_order = torch.float32 if args.precision == "fp32" else torch.float16
        kwargs.update(accum_type=first_order, first_order_momentum_accum_type=first_order,
                      second_order_momentum_accum_type=torch.float32)
    return optimizer_class, kwargs


def mapped_optimizer(args, runs, backend):
    """--optim and --optim_args as transformers maps them. Refused in one line: a name that maps to no class for which
    `runs(class)` holds (its package missing, or not an optimizer that `backend` runs), and an --optim_args key that
    the mapping does not pass on."""
    _check_optim_args_syntax(args)
    try:
        optimizer_class, kwargs = optimizer_cls_and_kwargs(args)
    except (ImportError, ValueError) as err:
        raise _unsupported(args, runs, str(err).strip().splitlines()[0]) from None
    if not runs(optimizer_class):
        raise _unsupported(args, runs, f"IPUTrainer runs no {optimizer_class.__module__}."
                                       f"{optimizer_class.__qualname__} on {backend}")
    _check_optim_args_used(args, kwargs)
    return optimizer_class, kwargs


def _unsupported(args, runs, reason):
    return UserError(f"--optim {_name(args)} is not supported ({reason}): use one of {_optim_names(args, runs)}, "
                     "or --lamb")


def _optim_names(args, runs):
    """The --optim names that transformers maps to a class for which `runs(class)` holds, for the messages."""
    names = []
    for name in OptimizerNames:
        trial = copy.copy(args)
        trial.optim, trial.optim_args = name, None
        try:
            optimizer_class, _ = optimizer_cls_and_kwargs(trial)
        except (ImportError, ValueError):
            continue
        if runs(optimizer_class):
            names.append(name.value)
    return ", ".join(names)


def _check_optim_args_syntax(args):
    if args.optim_args and not all("=" in pair for pair in args.optim_args.split(",")):
        raise UserError(f"--optim_args {args.optim_args}: write key=value pairs separated by commas")


def _check_optim_args_used(args, kwargs):
    """transformers' mapping silently drops the --optim_args keys an optimizer does not read: each given key must
    change what reaches the optimizer."""
    if not args.optim_args:
        return
    plain = copy.copy(args)
    plain.optim_args = None
    _, without = optimizer_cls_and_kwargs(plain)
    for key in (pair.split("=")[0].strip() for pair in args.optim_args.split(",")):
        if key in GROUP_KEYS:
            raise UserError(f"--optim_args {key}: the parameter groups set their own (0 for biases and norms): pass "
                            f"--{key} instead")
        if key not in kwargs or (key in without and kwargs[key] == without[key]):
            raise UserError(f"--optim_args {key}: --optim {_name(args)} does not use it: drop it")


def _comes_with_torch_or_transformers(optimizer_class):
    return optimizer_class.__module__.split(".")[0] in ("torch", "transformers")


def _poptorch_class(torch_class, optim):
    """PopTorch's optimizer of the same name as a torch.optim one, or None."""
    if not torch_class.__module__.startswith("torch.optim."):
        return None
    return getattr(optim, torch_class.__name__, None)


def _name(args):
    return getattr(args.optim, "value", args.optim)
