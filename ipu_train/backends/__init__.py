"""The backends that run training steps: PyTorch (CPU, CUDA; its pipelined form with stages on separate processes)
and PopTorch (IPU), behind `base.Backend`."""


def make_backend(args, ipu_config, layout):
    """The backend for --device: PopTorch's is imported only on IPU (its module imports the Poplar SDK)."""
    if args.device_type == "ipu":
        from .poptorch import PopTorchBackend
        return PopTorchBackend(args, ipu_config, layout)
    if layout.pipelined:  # torch.distributed.pipelining: imported only when the stages run on separate processes
        from .pipelined import PipelinedBackend
        return PipelinedBackend(args, ipu_config, layout)
    from .torch import TorchBackend
    return TorchBackend(args, ipu_config, layout)
