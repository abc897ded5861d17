"""The parallel layout of a run: how the IPU configuration's replicas (and, later, pipeline stages) map onto the
processes that run. Built once, by the trainer, from the configuration and the process group; everything that asks
"how many processes, which one am I, how many micro-batches per step, do I write files" asks it.

On PyTorch the replicas are data-parallel processes (torchrun): `replication_factor` left at its default of 1
follows the world size, and a multiple of the world size runs its extra replicas inside each process as further
micro-batches of the same optimizer step (the same combined batch and mean loss). On IPU the replicas live inside
one PopTorch process, which compiles them itself."""
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError

logger = logging.getLogger("ipu_train")

REPLICATION_KEYS = ("replication_factor", "inference_replication_factor")


@dataclass(frozen=True)
class ParallelLayout:
    processes: int  # data-parallel processes (the world size)
    rank: int  # this process's data-parallel rank
    replicas: int  # training replicas of the configuration, a multiple of `processes`
    accumulation: int  # gradient_accumulation_steps: micro-batches of one replica per optimizer step
    writes_files: bool  # whether this process writes output_dir (the main process, or each node's first)
    pipeline_stages: int = 1  # pipeline stages across processes: 1, each process runs whole replicas

    @classmethod
    def build(cls, ipu_config, args):
        """The layout of this run; fits the configuration's replication to the world size (on PyTorch) and gives
        the training arguments the configuration's gradient accumulation, so both say the same from here on."""
        if args.gradient_accumulation_steps not in (None, ipu_config.gradient_accumulation_steps):
            raise UserError(
                f"--gradient_accumulation_steps {args.gradient_accumulation_steps} disagrees with the IPU "
                f"configuration's {ipu_config.gradient_accumulation_steps}: build it with load_ipu_config(args)")
        args.gradient_accumulation_steps = ipu_config.gradient_accumulation_steps
        if args.device_type != "ipu":  # PopTorch places the replicas itself
            for key in REPLICATION_KEYS:
                _fit_to_processes(ipu_config, key, args.world_size)
        return cls(processes=args.world_size, rank=args.process_index,
                   replicas=ipu_config.replication_factor, accumulation=ipu_config.gradient_accumulation_steps,
                   writes_files=args.should_save)

    @property
    def replicas_per_process(self):
        """Training replicas each process runs: more than one when the configuration asks for more replicas than
        there are processes (`--n_ipu 8` on one GPU)."""
        return max(self.replicas // self.processes, 1)

    @property
    def micro_batches_per_step(self):
        """Micro-batches one process runs per optimizer step: the gradient accumulation of each of its replicas, one
        replica after another."""
        return self.accumulation * self.replicas_per_process

    @property
    def distributed(self):
        return self.processes > 1

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def largest_over_processes(self, value, device):
        """The largest of every process's host `value` (a host read: only around a save or a stop, never in a
        group)."""
        if not self.distributed:
            return value
        tensor = torch.tensor([float(value)], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.item()

    def gather_objects(self, value):
        """Every process's `value`, in rank order."""
        if not self.distributed:
            return [value]
        values = [None] * self.processes
        dist.all_gather_object(values, value)
        return values


def check_replication(ipu_config, args):
    """Refuse, before any work, replicas that cannot be spread over the processes that run; the trainer's layout
    fits them later, when it is built. On IPU one process drives every replica: several poprun instances are not
    supported yet."""
    if args.device_type != "ipu":
        for key in REPLICATION_KEYS:
            replicas_that_fit(ipu_config, key, args.world_size)
        return
    instances = _poprun_instances()
    if instances > 1:
        raise UserError(f"poprun started {instances} instances: IPU runs take one process, which drives all the "
                        "replicas (replication_factor, or --pod_type); launch it with poprun --num-instances 1 or "
                        "without poprun")


def _poprun_instances():
    """The instances poprun started (the Poplar SDK's popdist says), 1 without poprun or popdist."""
    try:
        import popdist
    except ImportError:
        return 1
    return popdist.getNumInstances() if popdist.isPopdistEnvSet() else 1


def replicas_that_fit(ipu_config, key, processes):
    """What `key` (a replication factor) becomes on `processes` processes: the world size when left at 1, itself when
    a multiple of it; any other value is a one-line error listing what fits."""
    value = getattr(ipu_config, key)
    if value % processes == 0:
        return value
    if value != 1:
        fits = ", ".join(str(n) for n in range(1, value + 1) if value % n == 0)
        raise UserError(
            f"{key}={value} does not divide over the {processes} process(es) that run: launch `torchrun "
            f"--nproc_per_node N` with N one of {fits}, or pass --ipu_config_overrides {key}={processes}")
    return processes


def _fit_to_processes(ipu_config, key, processes):
    value = replicas_that_fit(ipu_config, key, processes)
    if value != getattr(ipu_config, key):
        logger.info("%s = %d, from the number of processes", key, value)
        ipu_config.update_from_string(f"{key}={value}")
