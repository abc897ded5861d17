"""LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning"), as the IPU and NVIDIA implementations
compute it:

    m = b1·m + (1−b1)·g                  v = b2·v + (1−b2)·g²
    m̂ = m / (1−b1^t)                     v̂ = v / (1−b2^t)          (only with bias_correction)
    u = m̂ / (√v̂ + eps) + weight_decay·w                               (decoupled decay, inside the update)
    r = ‖w‖ / ‖u‖, or 1 when either norm is 0; min(r, max_trust_ratio) when a maximum is set
    w = w − lr·r·u

Everything stays on the parameters' device: the step count is a Python int, the trust ratios are tensors, and
nothing is read back to the host, so a step never waits for the device.
"""
from collections import defaultdict

import torch


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
