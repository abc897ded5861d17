"""The CUDA data path, checked on the CPU: micro-batches read ahead come in the same order, the read-ahead happens
before a group's host read and never before a save (so a resumed run stays exact), a quiet group's host read waits
until the next group is launched and changes nothing that is logged, an attention mask of ones is dropped before
the model sees it (same losses), and --cuda_graphs refuses the set-ups where
CUDA graph trees would lose gradients."""
import types

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, TrainerCallback

from ipu_train.backends.torch import TorchBackend
from ipu_train.config import IPUConfig
from ipu_train.errors import UserError
from ipu_train.parallel import ParallelLayout
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


def record_reads(trainer, events):
    read = trainer.backend.read

    def recording_read(tensor):
        events.append("read")
        return read(tensor)
    trainer.backend.read = recording_read


def test_read_ahead_collates_the_next_step_before_the_host_read_except_before_a_save(tmp_path):
    events = []
    trainer = _trainer(tmp_path, read_ahead=True, events=events, save_steps=4)
    record_reads(trainer, events)
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


# --- deferred reads of quiet groups ----------------------------------------------------------------------------

class RecordSteps(TrainerCallback):
    def __init__(self, events):
        self.events = events

    def on_step_begin(self, args, state, control, **kwargs):
        self.events.append(f"step{state.global_step + 1}")


def _recorded_run(tmp_path, defer, output, **arg_overrides):
    events = []
    values = dict(max_steps=8, logging_steps=4, output_dir=str(tmp_path / output))
    values.update(arg_overrides)
    trainer = make_trainer(tmp_path, token_rows(24, seed=3), IPUConfig(device_iterations=2), model=tiny_gpt2(),
                           args=make_args(tmp_path, **values), callbacks=[RecordSteps(events)])
    trainer.defer_quiet_reads = defer
    record_reads(trainer, events)
    trainer.train()
    return trainer, " ".join(events)


def test_a_quiet_groups_read_waits_until_the_next_group_is_launched(tmp_path):
    _, deferred = _recorded_run(tmp_path, defer=True, output="deferred")
    _, in_place = _recorded_run(tmp_path, defer=False, output="in_place")
    # groups of 2 steps, a log at step 4 and the end at step 8: the groups ending at steps 2 and 6 are quiet, but
    # the first is read at once, since its read starts the throughput clock (no warm-up steps here)
    assert in_place == "step1 step2 read step3 step4 read step5 step6 read step7 step8 read"
    assert deferred == "step1 step2 read step3 step4 read step5 step6 step7 step8 read read"


class Clock:
    """A stand-in for time.perf_counter that moves one second per optimizer step, and only then."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Tick(TrainerCallback):
    def __init__(self, clock):
        self.clock = clock

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.now += 1.0


@pytest.mark.parametrize("defer", [True, False])
def test_throughput_counts_the_steps_of_the_time_it_measures(tmp_path, monkeypatch, defer):
    clock = Clock()
    monkeypatch.setattr("ipu_train.trainer.time.perf_counter", clock)
    args = make_args(tmp_path, max_steps=12, logging_steps=100, throughput_warmup_steps=2)
    trainer = make_trainer(tmp_path, token_rows(24), IPUConfig(device_iterations=2), args=args,
                           callbacks=[Tick(clock)])
    trainer.defer_quiet_reads = defer
    metrics = trainer.train().metrics
    assert metrics["train_steps_per_second"] == 1.0  # 10 steps after the warm-up, 10 seconds


@pytest.mark.parametrize("logging_steps", [3, 5])
def test_deferred_reads_log_and_count_what_in_place_reads_do(tmp_path, logging_steps):
    runs = [_recorded_run(tmp_path, defer, output=f"defer_{defer}", max_steps=12, logging_steps=logging_steps,
                          save_strategy="steps", save_steps=6)[0] for defer in (True, False)]
    deferred, in_place = [[{k: v for k, v in entry.items() if k != "train_runtime" and "per_second"
                            not in k} for entry in trainer.state.log_history] for trainer in runs]
    assert deferred == in_place and len(losses(deferred)) >= 2
    assert runs[0].state.num_input_tokens_seen == runs[1].state.num_input_tokens_seen > 0


# --- attention masks of ones -------------------------------------------------------------------------------

def _cpu_backend():
    args = types.SimpleNamespace(device=torch.device("cpu"), world_size=1, process_index=0, precision="fp32",
                                 loss_scaling=None, cuda_graphs=False)
    return TorchBackend(args, IPUConfig(), ParallelLayout(processes=1, rank=0, replicas=1, accumulation=1,
                                                          writes_files=True))


def test_an_attention_mask_of_ones_is_dropped_and_a_padding_mask_kept():
    backend = _cpu_backend()
    ids = torch.arange(12).reshape(2, 6)
    full = backend.to_device({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    assert sorted(full) == ["input_ids", "labels"]
    padded_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    padded = backend.to_device({"input_ids": ids, "attention_mask": padded_mask})
    assert torch.equal(padded["attention_mask"], padded_mask)
    assert sorted(backend.to_device({"input_ids": ids})) == ["input_ids"]


@pytest.mark.parametrize("model", [
    lambda: tiny_gpt2(),
    lambda: BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0)),
], ids=["causal", "bidirectional"])
def test_a_model_without_the_mask_of_ones_computes_the_same_loss(model):
    torch.manual_seed(0)
    net = model()
    ids = torch.randint(0, 128, (2, 16))
    with_mask = net(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    without = net(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(without, with_mask, rtol=1e-6, atol=1e-6)


def test_training_on_full_blocks_passes_no_attention_mask(tmp_path):
    seen = []
    model = tiny_gpt2()
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append("attention_mask" in kwargs),
                                    with_kwargs=True)
    make_trainer(tmp_path, token_rows(8), model=model, args=make_args(tmp_path, max_steps=2)).train()
    assert seen and not any(seen)  # the fixtures' collator adds a mask of ones to every batch


# --- --cuda_graphs -------------------------------------------------------------------------------------------

def _backend_args(world_size=1):
    return types.SimpleNamespace(device=torch.device("cpu"), world_size=world_size, process_index=0,
                                 precision="fp32", loss_scaling=None, cuda_graphs=True)


@pytest.mark.parametrize("world_size, accumulation, replicas, message", [
    (1, 4, 1, r"--cuda_graphs needs one micro-batch per step \(this run has 4"),
    (1, 1, 2, r"--cuda_graphs needs one micro-batch per step \(this run has 2"),  # replicas folded into the process
    (2, 1, 2, "--cuda_graphs runs in one process"),
])
def test_cuda_graphs_refuse_accumulation_and_several_processes(world_size, accumulation, replicas, message):
    with pytest.raises(UserError, match=message) as error:
        layout = ParallelLayout(processes=world_size, rank=0, replicas=replicas, accumulation=accumulation,
                                writes_files=True)
        TorchBackend(_backend_args(world_size), IPUConfig(gradient_accumulation_steps=accumulation,
                                                          replication_factor=replicas), layout)
    assert "\n" not in str(error.value)


def test_cuda_graphs_accept_one_process_without_accumulation():
    layout = ParallelLayout(processes=1, rank=0, replicas=1, accumulation=1, writes_files=True)
    assert TorchBackend(_backend_args(), IPUConfig(), layout).cuda_graphs
