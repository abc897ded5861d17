"""The parallel layout of a run: how the IPU configuration's replicas (and, with --pipeline_stages_across_processes,
its pipeline stages) map onto the processes that run. Built once, by the trainer, from the configuration and the process group; everything that asks
"how many processes, which one am I, how many micro-batches per step, do I write files" asks it.

On PyTorch the replicas are data-parallel processes (torchrun): `replication_factor` left at its default of 1
follows the world size, and a multiple of the world size runs its extra replicas inside each process as further
micro-batches of the same optimizer step (the same combined batch and mean loss). On IPU the replicas live inside
PopTorch, which compiles them itself: one process drives them all, or, under `poprun --num-instances N`, each of the N
instances drives its local share (`replication_factor` is the total over the instances) and the host-side sums go
through the torch.distributed group that transformers starts from poprun's MPI environment.

With --pipeline_stages_across_processes (PyTorch only) each replica is a pipeline of processes, one per stage of
`layers_per_ipu` (two stages per process with the interleaved schedule): world size = processes per pipeline x
replicas, replica r on ranks [r*P, (r+1)*P). Every process of a replica reads the same micro-batches."""
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
    pipeline_stages: int = 1  # pipeline stages of a replica across processes; 1: each process runs whole replicas
    pipeline_processes: int = 1  # processes of one replica's pipeline (the stages, or half of them interleaved)

    @classmethod
    def build(cls, ipu_config, args):
        """The layout of this run; fits the configuration's replication to the world size (on PyTorch) and gives
        the training arguments the configuration's gradient accumulation, so both say the same from here on."""
        if args.gradient_accumulation_steps not in (None, ipu_config.gradient_accumulation_steps):
            raise UserError(
                f"--gradient_accumulation_steps {args.gradient_accumulation_steps} disagrees with the IPU "
                f"configuration's {ipu_config.gradient_accumulation_steps}: build it with load_ipu_config(args)")
        args.gradient_accumulation_steps = ipu_config.gradient_accumulation_steps
        if args.device_type == "ipu":  # PopTorch places the replicas itself; poprun's instances must fit them
            check_poprun(ipu_config, args)
        elif stages_across_processes(args):
            return cls._pipelined(ipu_config, args)
        else:
            for key in REPLICATION_KEYS:
                _fit_to_processes(ipu_config, key, args.world_size)
        return cls(processes=args.world_size, rank=args.process_index,
                   replicas=ipu_config.replication_factor, accumulation=ipu_config.gradient_accumulation_steps,
                   writes_files=args.should_save)

    @classmethod
    def _pipelined(cls, ipu_config, args):
        per_pipeline = check_process_stages(ipu_config, args)
        replicas = args.world_size // per_pipeline
        if ipu_config.replication_factor != replicas:
            logger.info("replication_factor = %d, from the number of processes", replicas)
            ipu_config.update_from_string(f"replication_factor={replicas}")
        return cls(processes=args.world_size, rank=args.process_index, replicas=replicas,
                   accumulation=ipu_config.gradient_accumulation_steps, writes_files=args.should_save,
                   pipeline_stages=ipu_config.ipus_per_replica, pipeline_processes=per_pipeline)

    @property
    def pipelined(self):
        """Whether the stages of each replica run on separate processes."""
        return self.pipeline_processes > 1

    @property
    def data_processes(self):
        """Processes that read different data: one per replica pipeline (each process otherwise)."""
        return self.processes // self.pipeline_processes

    @property
    def data_rank(self):
        """Which of the `data_processes` shares this process reads: its replica's."""
        return self.rank // self.pipeline_processes

    @property
    def replicas_per_process(self):
        """Training replicas each process runs: more than one when the configuration asks for more replicas than
        there are processes (`--n_ipu 8` on one GPU)."""
        return max(self.replicas // self.data_processes, 1)

    @property
    def micro_batches_per_step(self):
        """Micro-batches one process runs per optimizer step: the gradient accumulation of each of its replicas, one
        replica after another."""
        return self.accumulation * self.replicas_per_process

    def share_of_steps(self, order, micro_batch, start_step=0):
        """This process's samples of each step of `order` from `start_step` on: step s consumes the combined batch
        order[s*C : (s+1)*C] (C = micro_batch x micro_batches_per_step x processes), and process r its r-th
        contiguous slice, as the PyTorch backend's ReplicaBatchSampler cuts it."""
        mine = micro_batch * self.micro_batches_per_step
        combined = mine * self.data_processes
        first_of = [step * combined + self.data_rank * mine for step in range(start_step, len(order) // combined)]
        return [index for first in first_of for index in order[first:first + mine]]

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
    fits them later, when it is built. On IPU the processes are poprun's instances (see check_poprun)."""
    if stages_across_processes(args):
        check_process_stages(ipu_config, args)
        return
    if args.device_type != "ipu":
        for key in REPLICATION_KEYS:
            replicas_that_fit(ipu_config, key, args.world_size)
        return
    check_poprun(ipu_config, args)


def check_poprun(ipu_config, args):
    """On IPU the processes are poprun's instances (one without poprun), each driving its local replicas: the IPU
    configuration's replicas must be poprun's --num-replicas, split evenly over --num-instances, with poprun's
    --ipus-per-replica, and transformers' process group (started from poprun's MPI environment) must be those
    instances, in the same order."""
    popdist = running_popdist()
    instances = popdist.getNumInstances() if popdist else 1
    if instances > 1:
        for key in REPLICATION_KEYS:
            _check_instance_replicas(ipu_config, key, popdist)
        _check_instance_ipus(ipu_config, popdist)
    index = popdist.getInstanceIndex() if popdist else 0
    if (args.world_size, args.process_index) != (instances, index):
        raise UserError(
            f"this IPU process is rank {args.process_index} of {args.world_size} but instance {index} of {instances} "
            "that poprun started: launch IPU runs with poprun alone (not torchrun), and pass every instance the same "
            "MASTER_ADDR and MASTER_PORT (poprun --mpi-local-args=\"-x MASTER_ADDR=<first host> -x MASTER_PORT=29500\")")


def stages_across_processes(args):
    """Whether --pipeline_stages_across_processes asks for one pipeline stage per process."""
    return bool(getattr(args, "pipeline_stages_across_processes", False))


def check_process_stages(ipu_config, args):
    """The processes of one replica's pipeline, once the training layout fits the world size: its stages (two per
    process with interleaved_1f1b) times the replicas must be the world size, and the schedule must have enough
    micro-batches (gradient_accumulation_steps). Each mismatch is one line naming what fits."""
    schedule = args.pipeline_schedule
    with ipu_config.in_mode("training"):
        stages = ipu_config.ipus_per_replica
    least_stages = 4 if schedule == "interleaved_1f1b" else 2
    if stages < least_stages:
        raise UserError(f"--pipeline_stages_across_processes with --pipeline_schedule {schedule} needs {least_stages} "
                        f"or more pipeline stages, and layers_per_ipu gives {stages}: pass e.g. --ipu_config_overrides "
                        f"\"layers_per_ipu=[{' '.join(['-1'] * least_stages)}]\"")
    if schedule == "interleaved_1f1b" and stages % 2:
        raise UserError(f"--pipeline_schedule interleaved_1f1b runs two stages per process, and layers_per_ipu gives "
                        f"{stages}: use an even number of stages, or --pipeline_schedule 1f1b")
    per_pipeline = processes_per_pipeline(stages, schedule)
    world, replicas = args.world_size, ipu_config.replication_factor
    fits = ", ".join(str(per_pipeline * n) for n in range(1, 5))
    if world % per_pipeline or replicas not in (1, world // per_pipeline):
        wanted = f"{per_pipeline * replicas}" if replicas != 1 else f"a multiple of {per_pipeline}: {fits}, ..."
        raise UserError(f"--pipeline_stages_across_processes: {stages} stages ({per_pipeline} process(es) per "
                        f"replica with {schedule}) x replication_factor={replicas} do not fit the {world} process(es) "
                        f"that run: launch `torchrun --nproc_per_node N` with N {wanted} (stages x replicas)")
    if ipu_config.replicated_tensor_sharding and world > per_pipeline:
        raise UserError("--pipeline_stages_across_processes does not shard the optimizer state over replicas yet: "
                        "pass --ipu_config_overrides replicated_tensor_sharding=false")
    check_schedule_micro_batches(schedule, per_pipeline, ipu_config.gradient_accumulation_steps)
    return per_pipeline


def processes_per_pipeline(stages, schedule):
    """One stage per process, or two (virtual stages, looped) with the interleaved schedule."""
    return stages // 2 if schedule == "interleaved_1f1b" else stages


def check_schedule_micro_batches(schedule, per_pipeline, micro_batches):
    """torch.distributed.pipelining's limits: 1F1B needs as many micro-batches as processes per pipeline, interleaved
    1F1B a multiple of them (whole rounds)."""
    if schedule == "1f1b" and micro_batches < per_pipeline:
        raise UserError(f"--pipeline_schedule 1f1b needs gradient_accumulation_steps >= {per_pipeline} (the processes "
                        f"of a pipeline), got {micro_batches}: pass --gradient_accumulation_steps {per_pipeline} or "
                        "more, or --pipeline_schedule gpipe")
    if schedule == "interleaved_1f1b" and micro_batches % per_pipeline:
        raise UserError(f"--pipeline_schedule interleaved_1f1b needs gradient_accumulation_steps a multiple of "
                        f"{per_pipeline} (the processes of a pipeline), got {micro_batches}: pass "
                        f"--gradient_accumulation_steps {per_pipeline * max(1, micro_batches // per_pipeline)}")


def running_popdist():
    """The Poplar SDK's popdist when poprun started this process, else None (no poprun, or no SDK)."""
    try:
        import popdist
    except ImportError:
        return None
    return popdist if popdist.isPopdistEnvSet() else None


def _check_instance_replicas(ipu_config, key, popdist):
    """`key` is the total over the instances: poprun's --num-replicas, a multiple of --num-instances (each instance
    runs --num-replicas / --num-instances of them)."""
    value, instances, total = getattr(ipu_config, key), popdist.getNumInstances(), popdist.getNumTotalReplicas()
    if value % instances:
        raise UserError(f"{key}={value} does not divide over the {instances} poprun instances: pass "
                        f"--ipu_config_overrides {key}=<a multiple of {instances}> (or a --pod_type that sets one), "
                        "the same as poprun --num-replicas")
    if value != total:
        raise UserError(f"{key}={value} (the IPU configuration: the total over the instances) disagrees with poprun "
                        f"--num-replicas {total}: pass poprun --num-replicas {value}, or --ipu_config_overrides "
                        f"{key}={total}")


def _check_instance_ipus(ipu_config, popdist):
    """poprun reserves --ipus-per-replica IPUs for each replica: the training layout's."""
    stages, reserved = ipu_config.ipus_per_replica, popdist.getNumIpusPerReplica()
    if stages != reserved:
        raise UserError(f"ipus_per_replica={stages} (the IPU configuration's training layout) disagrees with poprun "
                        f"--ipus-per-replica {reserved}: pass poprun --ipus-per-replica {stages}")


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
