"""Several poprun instances on IPU, against the strict popdist and PopTorch doubles (tests/poptorch_double.py): the
double accepts only what popdist accepts; each instance drives its local replicas with popdist.poptorch.Options, reads
its own share of every combined batch (PopTorch's DataLoader does not partition it again), and runs as many
evaluation batches as the others; a launch that does not fit the IPU configuration is refused in one line; and two
instances (two processes over gloo, as transformers starts them from poprun's MPI environment) train and evaluate
as one process running all the replicas, with only instance 0 writing files.

Run as a script, this file is one instance of that two-process run (see `_instance_main`)."""
import importlib
import json
import math
import os
import socket
import subprocess
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ipu_train.config import IPUConfig  # noqa: E402
from ipu_train.errors import UserError  # noqa: E402
from ipu_train.parallel import ParallelLayout, check_replication  # noqa: E402
from tests._trainer_fixtures import collate, losses, tiny_gpt2, token_rows  # noqa: E402
from tests.poptorch_double import make_strict_popdist, make_strict_poptorch  # noqa: E402

IPU_MODULES = ("ipu_train.backends.poptorch", "ipu_train.backends.poptorch_serialization")
ROWS, EVAL_ROWS = 24, 7


def install_doubles(popdist=None):
    """The doubles in sys.modules (popdist.poptorch too: `import popdist.poptorch` looks it up there)."""
    sys.modules["poptorch"] = make_strict_poptorch()
    for name in IPU_MODULES:
        sys.modules.pop(name, None)
    if popdist is not None:
        sys.modules["popdist"], sys.modules["popdist.poptorch"] = popdist, popdist.poptorch


@pytest.fixture
def doubles(monkeypatch):
    """Installs the PopTorch double and, through the returned function, a popdist double; undone afterwards."""
    for name in ("poptorch", "popdist", "popdist.poptorch", *IPU_MODULES):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "poptorch", make_strict_poptorch())

    def with_popdist(instances, replicas, ipus_per_replica=1, index=0):
        popdist = make_strict_popdist(instances, replicas, ipus_per_replica, index)
        monkeypatch.setitem(sys.modules, "popdist", popdist)
        monkeypatch.setitem(sys.modules, "popdist.poptorch", popdist.poptorch)
        return popdist

    yield with_popdist
    for name in IPU_MODULES:
        sys.modules.pop(name, None)


# --------------------------------------------------------------------------------------------- the popdist double
def test_popdist_options_take_this_instances_replicas_and_refuse_what_popdist_sets():
    popdist = make_strict_popdist(instances=2, replicas=8, ipus_per_replica=4, index=1)
    assert (popdist.getNumLocalReplicas(), popdist.getReplicaIndexOffset()) == (4, 4)
    opts = popdist.poptorch.Options(ipus_per_replica=4)
    assert opts.replication_factor == 4
    assert (opts.Distributed.processId, opts.Distributed.numProcesses) == (1, 2)
    for call, name in ((lambda: opts.replicationFactor(8), "replicationFactor"), (lambda: opts.useIpuId(1), "useIpuId"),
                       (lambda: opts.Distributed.configureProcessId(0, 1), "Distributed.configureProcessId"),
                       (lambda: opts.Distributed.disable(), "Distributed.disable"),
                       (lambda: opts.Distributed.setEnvVarNames("A", "B"), "Distributed.setEnvVarNames")):
        with pytest.raises(RuntimeError, match=rf"^Cannot call `{name}` with popdist\.poptorch\.Options$"):
            call()
    opts.deviceIterations(2).Training.gradientAccumulation(3)  # everything else is PopTorch's own
    with pytest.raises(AssertionError):
        make_strict_popdist(instances=2, replicas=3)  # poprun: --num-replicas a multiple of --num-instances


def test_poptorchs_data_loader_partitions_the_data_per_instance_unless_told_not_to(doubles):
    popdist = doubles(instances=2, replicas=2, index=1)
    poptorch = sys.modules["poptorch"]
    data = torch.arange(10).unsqueeze(1)
    opts = popdist.poptorch.Options()  # one local replica: combined batch of 2
    partitioned = [b.flatten().tolist() for b in poptorch.DataLoader(opts, data, batch_size=2)]
    assert partitioned == [[4, 5], [6, 7]]  # python/__init__.py _SubDataset: instance 1's block of 2 whole batches
    whole = [b.flatten().tolist() for b in poptorch.DataLoader(opts, data, batch_size=2,
                                                               auto_distributed_partitioning=False)]
    assert whole == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


# ------------------------------------------------------------------------------------------------ launch checks
def _ipu_args(world_size=1, rank=0):
    return types.SimpleNamespace(device_type="ipu", world_size=world_size, process_index=rank)


def _config(replicas=4, inference_replicas=None, ipus=1):
    return IPUConfig(replication_factor=replicas, inference_replication_factor=inference_replicas or replicas,
                     layers_per_ipu=[-1] * ipus, ipus_per_replica=ipus)


def test_instances_that_fit_the_configuration_are_accepted(doubles):
    doubles(instances=2, replicas=4, ipus_per_replica=2, index=1)
    check_replication(_config(replicas=4, ipus=2), _ipu_args(world_size=2, rank=1))


@pytest.mark.parametrize("config, launch, args, message", [
    (_config(replicas=3), (2, 4, 1), (2, 0),
     r"^replication_factor=3 does not divide over the 2 poprun instances: pass --ipu_config_overrides "
     r"replication_factor=<a multiple of 2> .*$"),
    (_config(replicas=8), (2, 4, 1), (2, 0),
     r"^replication_factor=8 \(the IPU configuration: the total over the instances\) disagrees with poprun "
     r"--num-replicas 4: pass poprun --num-replicas 8, or --ipu_config_overrides replication_factor=4$"),
    (_config(replicas=4, inference_replicas=2), (2, 4, 1), (2, 0),
     r"^inference_replication_factor=2 \(the IPU configuration: .* disagrees with poprun --num-replicas 4"),
    (_config(replicas=4, ipus=2), (2, 4, 4), (2, 0),
     r"^ipus_per_replica=2 \(the IPU configuration's training layout\) disagrees with poprun --ipus-per-replica 4: "
     r"pass poprun --ipus-per-replica 2$"),
    (_config(replicas=4), (2, 4, 1), (1, 0),  # no process group: MASTER_ADDR was not passed to the instances
     r"^this IPU process is rank 0 of 1 but instance 0 of 2 that poprun started: .* -x MASTER_PORT=29500\"\)$"),
    (_config(replicas=4), None, (2, 1),  # torchrun with --device ipu
     r"^this IPU process is rank 1 of 2 but instance 0 of 1 that poprun started: launch IPU runs with poprun alone"),
])
def test_a_launch_that_does_not_fit_is_refused_in_one_line(doubles, config, launch, args, message):
    if launch:
        doubles(*launch)
    with pytest.raises(UserError, match=message) as refused:
        check_replication(config, _ipu_args(*args))
    assert "\n" not in str(refused.value)
    with pytest.raises(UserError, match=message):  # the trainer's layout checks the same
        ParallelLayout.build(config, types.SimpleNamespace(**vars(_ipu_args(*args)), gradient_accumulation_steps=None,
                                                           should_save=True))


# ------------------------------------------------------------------------------------------------------ backend
def _backend(layout, config, micro=1):
    args = types.SimpleNamespace(per_device_train_batch_size=micro, per_device_eval_batch_size=micro,
                                 dataloader_num_workers=0, dataloader_mode="sync", compile_only=False,
                                 max_grad_norm=0.0, precision="fp32")
    return importlib.import_module("ipu_train.backends.poptorch").PopTorchBackend(args, config, layout)


def _layout(instances, rank, replicas):
    return ParallelLayout(processes=instances, rank=rank, replicas=replicas, accumulation=2,
                          writes_files=rank == 0)


def _rows(loader):
    return [batch["input_ids"].flatten().tolist() for batch in loader]


def _indexed(n):
    return [{"input_ids": torch.tensor([i])} for i in range(n)]


def _stack(rows):
    return {"input_ids": torch.stack([row["input_ids"] for row in rows])}


def test_each_instance_runs_popdists_options_and_reads_its_share_of_every_step(doubles):
    config = IPUConfig(replication_factor=4, gradient_accumulation_steps=2, device_iterations=1, seed=3)
    single = _rows(_backend(_layout(1, 0, 4), config).train_loader(_indexed(24), _stack, list(range(24)), 1, 0))
    shares = []
    for rank in (0, 1):
        doubles(instances=2, replicas=4, index=rank)
        backend = _backend(_layout(2, rank, 4), config)
        options = backend.options["training"]
        assert type(options).__name__ == "PopdistOptions" and options.replication_factor == 2
        assert options.Distributed.numProcesses == 2 and options.Distributed.processId == rank
        assert options.ipus_per_replica == 1 and backend.options["inference"].replication_factor == 2
        shares.append(_rows(backend.train_loader(_indexed(24), _stack, list(range(24)), 1, 0)))
    # a step is 1 x 2 x 4 = 8 samples; from step 1 on, instance 0 takes the first 4 of each, instance 1 the rest
    assert single == [list(range(8, 16)), list(range(16, 24))]
    assert shares == [[[8, 9, 10, 11], [16, 17, 18, 19]], [[12, 13, 14, 15], [20, 21, 22, 23]]]


def test_every_instance_runs_as_many_evaluation_batches_padding_its_share(doubles):
    config = IPUConfig(inference_replication_factor=4, replication_factor=4, inference_device_iterations=1)
    counts = []
    for rank, indices in ((0, [0, 1, 2]), (1, [3, 4])):  # the trainer's shares of 5 samples
        doubles(instances=2, replicas=4, index=rank)
        loader = _backend(_layout(2, rank, 4), config).eval_loader(_indexed(5), _stack, indices)
        counts.append([int(batch.pop("ipu_padding_rows")) for batch in loader])
    # 2 local replicas x micro-batch 1: the largest share (3) takes 2 batches, so does the other
    assert counts == [[0, 1], [0, 2]]
    doubles(instances=2, replicas=4, index=1)
    nothing_of_its_own = _backend(_layout(2, 1, 4), config).eval_loader(_indexed(1), _stack, [])
    assert [int(batch["ipu_padding_rows"]) for batch in nothing_of_its_own] == [2]


# ------------------------------------------------------------------------------------------------ two instances
def _run(output_dir, replicas, **flags):
    from ipu_train.arguments import IPUTrainingArguments
    from ipu_train.trainer import IPUTrainer

    args = IPUTrainingArguments(output_dir=output_dir, device_type="ipu", fp32=True, max_grad_norm=0.0,
                                per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=6,
                                learning_rate=2e-3, logging_steps=1, save_strategy="steps", save_steps=3,
                                report_to="none", disable_tqdm=True, seed=5, **flags)
    config = IPUConfig(replication_factor=replicas, inference_replication_factor=replicas,
                       gradient_accumulation_steps=1, device_iterations=1, inference_device_iterations=1,
                       output_mode="sum")  # the loss summed over the local replicas: divided by their number
    trainer = IPUTrainer(model=tiny_gpt2(seed=3), ipu_config=config, args=args, data_collator=collate,
                         train_dataset=token_rows(ROWS, seed=4), eval_dataset=token_rows(EVAL_ROWS, seed=6))
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    return {"losses": losses(trainer.state.log_history), "eval_loss": metrics["eval_loss"],
            "eval_samples": metrics.get("eval_samples"), "world_size": args.world_size}


def _instance_main(output_dir):
    """One poprun instance: its rank from OpenMPI's environment (as poprun's mpirun sets it), the doubles installed
    before ipu_train imports PopTorch."""
    rank, size = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
    install_doubles(make_strict_popdist(instances=size, replicas=2, index=rank))
    result = _run(output_dir, replicas=2)
    with open(os.path.join(output_dir, f"result-{rank}.json"), "w") as handle:
        json.dump(result, handle)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_instances_train_and_evaluate_as_one_process_with_every_replica(doubles, tmp_path):
    """Instance r takes samples (2r, 2r+1) of each step of 4; PopTorch (the double) averages the gradients of the
    two instances' replicas; the logged loss and the eval loss are sums over the instances. One process running both
    replicas must give the same losses."""
    two = tmp_path / "two"
    two.mkdir()
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port, "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    instances = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(two)],
                                  env={**env, "OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_LOCAL_RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = [instance.communicate(timeout=300) for instance in instances]
    for instance, (_, err) in zip(instances, outputs):
        assert instance.returncode == 0, err[-3000:]
    ranks = [json.loads((two / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    single = _run(str(tmp_path / "one"), replicas=2)

    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(single["losses"]) == 6
    for step, (one, two_instances) in enumerate(zip(single["losses"], ranks[0]["losses"]), 1):
        assert math.isclose(one, two_instances, rel_tol=1e-5), f"step {step}: {one} vs {two_instances}"
    assert math.isclose(single["eval_loss"], ranks[0]["eval_loss"], rel_tol=1e-5)  # 7 samples: shares of 4 and 3
    # only instance 0 wrote the model and the checkpoints (each instance's RNG state goes into them)
    assert (two / "model.safetensors").is_file() and (two / "checkpoint-6" / "model.safetensors").is_file()
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(two / "checkpoint-3"))


if __name__ == "__main__":
    _instance_main(sys.argv[1])


def test_an_instances_padded_evaluation_share_draws_no_short_batch_warning(doubles, caplog):
    """PopTorch reckons a short last batch against all instances' combined batches (python/__init__.py); the padded
    share is whole batches of this instance, so it is loaded with drop_last=True, which drops nothing."""
    config = IPUConfig(inference_replication_factor=4, replication_factor=4, inference_device_iterations=1)
    doubles(instances=2, replicas=4, index=0)
    with caplog.at_level("WARNING"):
        loader = _backend(_layout(2, 0, 4), config).eval_loader(_indexed(9), _stack, [0, 1, 2, 3, 4])
        padding = [int(batch.pop("ipu_padding_rows")) for batch in loader]
    assert padding == [0, 0, 1]  # 5 samples of its own in 3 batches of 2: all kept, one padding row
    assert "not divisible" not in caplog.text
