"""The CUDA data path, checked on the CPU: micro-batches read ahead come in the same order, the read-ahead happens
before a group's host read and never before a save (so a resumed run stays exact), and --cuda_graphs refuses the
set-ups where CUDA graph trees would lose gradients."""
import types

import pytest
import torch

from ipu_train.backends.torch import TorchBackend
from ipu_train.config import IPUConfig
from ipu_train.errors import UserError
from ipu_train.trainer import DeviceBatches

from ._trainer_fixtures import collate, losses, tiny_gpt2, token_rows
from .test_trainer import make_args, make_trainer


# --- DeviceBatches ------------------------------------------------------------------------------------------------

def test_device_batches_come_in_order_each_moved_once():
    moved = []

    def to_device(batch):
        moved.append(batch)
        return ("on device", batch)

    batches = DeviceBatches(iter(range(5)), to_device)
    assert next(batches) == ("on device", 0)
    batches.prefetch(2)
    assert moved == [0, 1, 2]  # two read ahead
    batches.prefetch(1)
    assert moved == [0, 1, 2]  # already ahead: nothing more read
    assert list(batches) == [("on device", i) for i in range(1, 5)]
    assert moved == list(range(5))


def test_prefetch_past_the_end_stops_quietly():
    batches = DeviceBatches(iter([1, 2]), lambda b: b)
    batches.prefetch(5)
    assert list(batches) == [1, 2]
    batches.prefetch(1)
    with pytest.raises(StopIteration):
        next(batches)


# --- read-ahead in the training loop --------------------------------------------------------------------------

class RandomlyMasking:
    """A collator drawing from the global random state, like the MLM collator: a read-ahead that moved a draw
    across a checkpoint would change the masks of a resumed run."""

    def __init__(self, events=None):
        self.events = events

    def __call__(self, rows):
        batch = collate(rows)
        keep = torch.rand(batch["labels"].shape) < 0.7
        batch["labels"] = torch.where(keep, batch["labels"], -100)
        if self.events is not None:
            self.events.append("collate")
        return batch


def _trainer(tmp_path, read_ahead, output="out", events=None, **arg_overrides):
    values = dict(max_steps=8, logging_steps=1, save_strategy="steps", save_steps=4, output_dir=str(tmp_path / output))
    values.update(arg_overrides)
    trainer = make_trainer(tmp_path, token_rows(24, seed=2), IPUConfig(device_iterations=2), model=tiny_gpt2(),
                           args=make_args(tmp_path, **values), data_collator=RandomlyMasking(events))
    trainer.read_ahead = read_ahead
    return trainer


def test_read_ahead_collates_the_next_step_before_the_host_read_except_before_a_save(tmp_path):
    events = []
    trainer = _trainer(tmp_path, read_ahead=True, events=events, save_steps=4)
    read = trainer.backend.read

    def recording_read(tensor):
        events.append("read")
        return read(tensor)
    trainer.backend.read = recording_read
    trainer.train()
    # groups of 2 steps; the boundary at step 4 saves, the one at step 8 ends the run: no read-ahead there
    assert " ".join(events) == ("collate collate collate read "   # step 2: step 3's batch read ahead
                                "collate read "                   # step 4: saves
                                "collate collate collate read "   # step 6
                                "collate read")                   # step 8: the end


def test_read_ahead_trains_and_resumes_exactly_as_without(tmp_path):
    plain = _trainer(tmp_path, read_ahead=False, output="plain")
    plain.train()
    ahead = _trainer(tmp_path, read_ahead=True, output="ahead")
    ahead.train()
    assert losses(ahead.state.log_history) == losses(plain.state.log_history)

    resumed = _trainer(tmp_path, read_ahead=True, output="resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "ahead" / "checkpoint-4"))
    after_resume = [e["loss"] for e in resumed.state.log_history if "loss" in e and e["step"] > 4]
    assert after_resume == losses(plain.state.log_history)[2:]


# --- --cuda_graphs -------------------------------------------------------------------------------------------

def _backend_args(world_size=1):
    return types.SimpleNamespace(device=torch.device("cpu"), world_size=world_size, process_index=0,
                                 precision="fp32", loss_scaling=None, cuda_graphs=True)


@pytest.mark.parametrize("world_size, accumulation, message", [
    (1, 4, "--cuda_graphs needs gradient_accumulation_steps=1"),
    (2, 1, "--cuda_graphs runs in one process"),
])
def test_cuda_graphs_refuse_accumulation_and_several_processes(world_size, accumulation, message):
    with pytest.raises(UserError, match=message) as error:
        TorchBackend(_backend_args(world_size), IPUConfig(gradient_accumulation_steps=accumulation))
    assert "\n" not in str(error.value)


def test_cuda_graphs_accept_one_process_without_accumulation():
    assert TorchBackend(_backend_args(), IPUConfig()).cuda_graphs
