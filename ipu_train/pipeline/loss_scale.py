"""fp16 loss scaling over pipeline stages on separate processes, as torch.amp.GradScaler scales one process's loss:
the last stage's loss is multiplied by the scale for its backward (the loss itself, logged, is not), every stage
divides its gradients by it, and when any gradient of any stage or replica is inf or NaN every process skips the
same optimizer step. With dynamic scaling the scale is then cut by `backoff_factor`, and grows by `growth_factor`
after `growth_interval` clean steps (GradScaler's rule and defaults, its own update op); a static scale
(--loss_scaling without auto_loss_scaling, as on IPU) never changes and never skips. Every process holds the same
scale, so the main process's state is the checkpoint's (`scaler.pt`, GradScaler's keys)."""
import torch
import torch.distributed as dist


class _ScaledBackward(torch.autograd.Function):
    """The loss unchanged forward; its gradient multiplied by `scale` backward."""

    @staticmethod
    def forward(ctx, loss, scale):
        ctx.save_for_backward(scale)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None


class PipelineLossScale:
    def __init__(self, init_scale, device, dynamic=True, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000):
        self.scale = torch.full((), float(init_scale), dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.dynamic = dynamic
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.found_inf = None  # of the step being taken, once unscale_ has run

    def scaled_backward(self, loss):
        """For the last stage's loss function: `loss`, whose backward starts from the scale instead of 1."""
        return _ScaledBackward.apply(loss, self.scale)

    def unscale_(self, parameters):
        """Divide this process's gradients by the scale and learn whether any process's holds inf or NaN (an
        all-reduce over every process: every stage of every replica)."""
        found = torch.zeros(1, dtype=torch.float32, device=self.scale.device)
        inverse = self.scale.double().reciprocal().float()
        by_dtype = {}
        for param in parameters:
            if param.grad is not None:
                by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
        for grads in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inverse)
        if self.dynamic:
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        self.found_inf = found

    def step(self, optimizer):
        """The optimizer's step, unless a gradient was not finite (a host read, as GradScaler.step makes). Returns
        whether it stepped."""
        stepped = not (self.dynamic and self.found_inf.item())
        if stepped:
            optimizer.step()
        return stepped

    def update(self):
        if self.dynamic:
            torch._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf, self.growth_factor,
                                     self.backoff_factor, self.growth_interval)
        self.found_inf = None

    def get_scale(self) -> float:
        return self.scale.item()

    def state_dict(self):
        return {"scale": self.get_scale(), "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": int(self.growth_tracker.item())}

    def load_state_dict(self, state):
        self.scale.fill_(state["scale"])
        self.growth_tracker.fill_(state["_growth_tracker"])
        self.growth_factor, self.backoff_factor = state["growth_factor"], state["backoff_factor"]
        self.growth_interval = state["growth_interval"]
