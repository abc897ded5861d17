"""IPUTrainer on CPU: batch and step counts, no host read inside a device-iteration group, evaluation, checkpoints
and exact resume, outputs users expect (from_pretrained, model card, tensorboard), optimizer choice."""
import glob
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from ipu_train.arguments import IPUTrainingArguments
from ipu_train.backends.torch import ReplicaBatchSampler
from ipu_train.config import IPUConfig
from ipu_train.errors import UserError
from ipu_train.optim import LAMB
from ipu_train.trainer import BatchLayout, IPUTrainer

from ._trainer_fixtures import SEQ, collate, losses, tiny_gpt2, token_rows


def make_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, per_device_eval_batch_size=4,
                  learning_rate=1e-3, num_train_epochs=1, logging_steps=1, save_strategy="no", report_to="none",
                  disable_tqdm=True, device_type="cpu", seed=7)
    values.update(overrides)
    return IPUTrainingArguments(**values)


def make_trainer(tmp_path, rows, ipu_config=None, model=None, args=None, **kwargs):
    return IPUTrainer(model=model or tiny_gpt2(), ipu_config=ipu_config or IPUConfig(),
                      args=args or make_args(tmp_path), data_collator=kwargs.pop("data_collator", collate),
                      train_dataset=rows, **kwargs)


class CountingCollator:
    def __init__(self):
        self.samples = self.calls = 0

    def __call__(self, rows):
        self.samples += len(rows)
        self.calls += 1
        return collate(rows)


# --- batch and step counts --------------------------------------------------------------------------------------

@pytest.mark.parametrize("micro, accumulation, iterations, samples, pad, steps", [
    (2, 1, 1, 10, False, 5),
    (2, 2, 1, 10, False, 2),   # 2 samples left over: dropped
    (2, 2, 2, 10, False, 2),   # one group of 8 samples = 2 optimizer steps
    (2, 2, 2, 10, True, 4),    # the incomplete second group is completed
    (1, 3, 2, 13, False, 4),
])
def test_one_epoch_runs_whole_groups_of_combined_batches(tmp_path, micro, accumulation, iterations, samples, pad,
                                                         steps):
    collator = CountingCollator()
    args = make_args(tmp_path, per_device_train_batch_size=micro, pad_on_batch_axis=pad)
    config = IPUConfig(gradient_accumulation_steps=accumulation, device_iterations=iterations)
    trainer = make_trainer(tmp_path, token_rows(samples), config, args=args, data_collator=collator)
    output = trainer.train()
    assert output.global_step == trainer.state.global_step == steps
    assert collator.calls == steps * accumulation  # one call per micro-batch
    assert collator.samples == steps * micro * accumulation
    assert trainer.state.train_batch_size == micro * accumulation


def test_max_steps_spans_epochs_with_a_new_order_each_epoch(tmp_path):
    rows = token_rows(8)
    index = {tuple(row["input_ids"]): i for i, row in enumerate(rows)}
    seen = []

    def recording(batch_rows):
        seen.append([index[tuple(row["input_ids"])] for row in batch_rows])
        return collate(batch_rows)

    args = make_args(tmp_path, per_device_train_batch_size=2, max_steps=7)
    trainer = make_trainer(tmp_path, rows, IPUConfig(device_iterations=2), args=args, data_collator=recording)
    trainer.train()
    assert trainer.state.global_step == 7  # the last group is cut short at max_steps
    # Each epoch reads the permutation drawn from seed + epoch, and epoch 2's is not epoch 1's replayed.
    layout = BatchLayout(2, 1, 1, 2)
    first, second = (layout.epoch_order(8, args.seed + epoch, pad=False) for epoch in (0, 1))
    assert first[:6] != second[:6]  # seed 7 and 8 draw different orders: the check below can tell them apart
    assert seen == [first[i:i + 2] for i in range(0, 8, 2)] + [second[i:i + 2] for i in range(0, 6, 2)]
    assert math.isclose(trainer.state.epoch, 7 / 4)


@pytest.mark.parametrize("micro, accumulation, replicas", [(2, 1, 2), (1, 3, 2), (2, 2, 4)])
def test_replicas_split_each_combined_batch_without_overlap(micro, accumulation, replicas):
    layout = BatchLayout(micro, accumulation, replicas, device_iterations=1)
    order = layout.epoch_order(50, seed=3, pad=False)
    assert len(order) == layout.steps_per_epoch(50, pad=False) * micro * accumulation * replicas
    shards = [list(ReplicaBatchSampler(order, micro, accumulation, replicas, rank)) for rank in range(replicas)]
    steps = len(order) // layout.step_samples
    for step in range(steps):
        per_replica = [sum(shard[step * accumulation:(step + 1) * accumulation], []) for shard in shards]
        step_samples = order[step * layout.step_samples:(step + 1) * layout.step_samples]
        assert sorted(sum(per_replica, [])) == sorted(step_samples)
        assert all(len(part) == micro * accumulation for part in per_replica)


@pytest.mark.parametrize("samples", [10, 3])
def test_a_padded_epoch_is_completed_by_repeating_its_permutation(samples):
    layout = BatchLayout(2, 2, 1, device_iterations=2)  # groups of 8 samples
    order = layout.epoch_order(samples, seed=5, pad=True)
    assert len(order) == 8 * -(-samples // 8)
    assert sorted(order[:samples]) == list(range(samples))  # one shuffled pass first
    assert order[samples:] == order[:len(order) - samples]  # then the same pass again, cut where the groups end
    counts = [order.count(i) for i in range(samples)]
    assert max(counts) - min(counts) <= 1  # every sample is read as often as any other, give or take one


def test_resumed_sampler_starts_at_the_step_without_reading_earlier_batches():
    order = list(range(24))
    full = list(ReplicaBatchSampler(order, 2, 2, 2, rank=1))
    resumed = list(ReplicaBatchSampler(order, 2, 2, 2, rank=1, start_step=2))
    assert resumed == full[4:] and len(ReplicaBatchSampler(order, 2, 2, 2, 1, 2)) == len(resumed)


def test_a_group_logs_the_mean_loss_of_its_window_and_the_grad_norm_of_its_last_step(tmp_path):
    # The same four steps, logged at every step, then at the end of groups of two: a window's loss is the mean of
    # its steps' losses (not their sum) and its grad_norm is the one of its last step (not the group's sum).
    logs = {}
    for name, iterations in (("every_step", 1), ("grouped", 2)):
        args = make_args(tmp_path / name, max_steps=4, logging_steps=iterations, max_grad_norm=1.0)
        trainer = make_trainer(tmp_path / name, token_rows(8), IPUConfig(device_iterations=iterations), args=args)
        trainer.train()
        logs[name] = [entry for entry in trainer.state.log_history if "loss" in entry and "grad_norm" in entry]
    single, grouped = logs["every_step"], logs["grouped"]
    assert [entry["step"] for entry in single] == [1, 2, 3, 4] and [entry["step"] for entry in grouped] == [2, 4]
    assert len({entry["grad_norm"] for entry in single}) == 4  # distinct norms: a sum could not pass for the last
    for window, entry in zip((single[:2], single[2:]), grouped):
        assert math.isclose(entry["loss"], (window[0]["loss"] + window[1]["loss"]) / 2, rel_tol=1e-5)
        assert math.isclose(entry["grad_norm"], window[1]["grad_norm"], rel_tol=1e-5)


def test_too_few_samples_for_one_combined_batch_is_a_clear_error(tmp_path):
    trainer = make_trainer(tmp_path, token_rows(5), IPUConfig(gradient_accumulation_steps=4))
    with pytest.raises(Exception, match="fewer than one combined batch of 8"):
        trainer.train()


# --- no host read inside a group ----------------------------------------------------------------------------------

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _is_loop_code(code):
    """The training loop's own code: ipu_train, transformers' Trainer and callbacks, and this test's callbacks.
    The model's internals (transformers' eager attention-mask check) and torch.optim's host-side step counters
    are not the loop's reads, nor is the backend's look at a loader's attention mask, which it makes only on a
    tensor in host memory (on the CPU every tensor is, so this test cannot tell that from a device read)."""
    filename = code.co_filename
    if code.co_name == "_without_full_attention_mask":
        return False
    return ("/ipu_train/" in filename or "/transformers/trainer" in filename
            or filename.endswith("test_trainer.py"))


@pytest.fixture
def host_read_recorder(monkeypatch):
    import sys
    state = {"inside": False, "reads": []}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def recording(self, *args, _original=original, _name=name, **kwargs):
            if state["inside"]:
                caller = sys._getframe(1).f_code
                if _is_loop_code(caller):
                    state["reads"].append((_name, caller.co_filename))
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, recording)
    return state


def _watch_groups(trainer, state):
    """Mark the time from a group's start to its finish as inside it; record each group's steps."""
    new_group = trainer.backend.new_group
    groups = []

    def watched():
        group = new_group()
        finish = group.finish
        state["inside"] = True

        def finished(stop_requested):
            result = finish(stop_requested)
            state["inside"] = False
            groups.append(result.steps)
            return result
        group.finish = finished
        return group
    trainer.backend.new_group = watched
    return groups


def test_no_host_read_inside_a_device_iteration_group(tmp_path, host_read_recorder):
    args = make_args(tmp_path, max_steps=8, logging_steps=1, max_grad_norm=1.0, save_strategy="steps", save_steps=4)
    trainer = make_trainer(tmp_path, token_rows(32), IPUConfig(device_iterations=4, gradient_accumulation_steps=2),
                           args=args)
    groups = _watch_groups(trainer, host_read_recorder)
    trainer.train()
    assert groups == [4, 4]
    assert host_read_recorder["reads"] == []
    # logging_steps=1 is honoured at the group boundaries: one log per group, covering its 4 steps
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [4, 8]


class ReadsInsideStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        torch.ones(1).item()


def test_the_host_read_check_sees_a_read_inside_a_group(tmp_path, host_read_recorder):
    args = make_args(tmp_path, max_steps=2)
    trainer = make_trainer(tmp_path, token_rows(8), IPUConfig(device_iterations=2), args=args,
                           callbacks=[ReadsInsideStep()])
    _watch_groups(trainer, host_read_recorder)
    trainer.train()
    assert [name for name, _ in host_read_recorder["reads"]] == ["item", "item"]


# --- evaluation -------------------------------------------------------------------------------------------------

def test_evaluation_keeps_every_sample_and_weights_batches_by_size(tmp_path):
    rows = token_rows(11, seed=5)
    model = tiny_gpt2()
    trainer = make_trainer(tmp_path, rows, IPUConfig(inference_device_iterations=2), model=model,
                           eval_dataset=rows)
    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        batch_losses = [(model(**collate(rows[i:i + 4])).loss.item(), len(rows[i:i + 4])) for i in range(0, 11, 4)]
    expected = sum(loss * n for loss, n in batch_losses) / 11
    assert math.isclose(metrics["eval_loss"], expected, rel_tol=1e-6)
    assert metrics["eval_samples_per_second"] > 0


def test_predict_returns_every_sample_and_metrics_see_the_predictions(tmp_path):
    rows = token_rows(11, seed=5)
    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        return {"agree": float((prediction.predictions[:, :-1] == prediction.label_ids[:, 1:]).mean())}

    trainer = make_trainer(tmp_path, rows, IPUConfig(inference_device_iterations=2), eval_dataset=rows,
                           compute_metrics=compute_metrics,
                           preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1))
    output = trainer.predict(rows)
    assert output.predictions.shape == (11, SEQ) and output.label_ids.shape == (11, SEQ)
    assert seen["shape"] == (11, SEQ)
    assert set(output.metrics) >= {"test_loss", "test_agree"}


# --- checkpoints, resume and outputs ------------------------------------------------------------------------------

def _resume_args(tmp_path, **overrides):
    return make_args(tmp_path, max_steps=10, logging_steps=1, save_strategy="steps", save_steps=4,
                     per_device_train_batch_size=2, **overrides)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    # Dropout on, groups of 2 steps, an epoch of 6 steps: the resumed run must restore weights, optimizer,
    # scheduler and RNG, skip the samples already seen, and cross the epoch boundary the same way.
    rows = token_rows(24, seed=2)
    config = dict(gradient_accumulation_steps=2, device_iterations=2)
    first = make_trainer(tmp_path, rows, IPUConfig(**config), model=tiny_gpt2(dropout=0.1), args=_resume_args(tmp_path))
    first.train()
    uninterrupted = losses(first.state.log_history)
    assert len(uninterrupted) == 5  # logging_steps=1 acts at each group boundary: steps 2, 4, ..., 10

    checkpoint = tmp_path / "out" / "checkpoint-4"
    expected_files = {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                      "trainer_state.json", "ipu_config.json", "training_args.bin"}
    assert expected_files <= set(os.listdir(checkpoint))
    assert IPUConfig.from_pretrained(str(checkpoint)).device_iterations == 2

    second = make_trainer(tmp_path, rows, IPUConfig(**config), model=tiny_gpt2(seed=99, dropout=0.1),
                          args=_resume_args(tmp_path, output_dir=str(tmp_path / "resumed")))
    second.train(resume_from_checkpoint=str(checkpoint))
    resumed = [e["loss"] for e in second.state.log_history if "loss" in e and e["step"] > 4]
    assert resumed == uninterrupted[2:]
    assert second.state.global_step == 10


def test_outputs_load_with_from_pretrained_and_old_checkpoints_rotate(tmp_path):
    args = make_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=2,
                     report_to="tensorboard")
    trainer = make_trainer(tmp_path, token_rows(16), args=args)
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    trainer.create_model_card(model_name="tiny")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    for name in ("ipu_config.json", "trainer_state.json", "README.md", "training_args.bin", "model.safetensors"):
        assert (out / name).is_file(), name
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    saved = load_file(str(out / "model.safetensors"))
    assert torch.equal(reloaded.transformer.h[0].mlp.c_fc.weight, saved["transformer.h.0.mlp.c_fc.weight"])
    assert torch.equal(reloaded.transformer.h[0].mlp.c_fc.weight, trainer.model.transformer.h[0].mlp.c_fc.weight)
    assert glob.glob(str(out / "runs" / "**" / "events.out.tfevents.*"), recursive=True)


def test_train_metrics_report_throughput_in_samples_and_tokens(tmp_path):
    args = make_args(tmp_path, max_steps=6, throughput_warmup_steps=2)
    trainer = make_trainer(tmp_path, token_rows(16), args=args)
    output = trainer.train()
    metrics = output.metrics
    assert {"train_runtime", "train_samples_per_second", "train_tokens_per_second", "train_loss"} <= set(metrics)
    # every token is real here (no padding): tokens per sample = the sequence length
    assert math.isclose(metrics["train_tokens_per_second"], SEQ * metrics["train_samples_per_second"], rel_tol=1e-3)
    assert math.isclose(output.training_loss, sum(losses(trainer.state.log_history)) / 6, rel_tol=1e-6)
    assert trainer.state.num_input_tokens_seen == 6 * 2 * SEQ


def test_memory_metrics_when_asked_for(tmp_path):
    args = make_args(tmp_path, max_steps=2, skip_memory_metrics=False)
    metrics = make_trainer(tmp_path, token_rows(8), args=args).train().metrics
    assert {"train_mem_cpu_alloc_delta", "train_mem_cpu_peaked_delta"} <= set(metrics)


# --- optimizers and compile -------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, bias_correction", [({"lamb": True}, True), ({"lamb_no_bias_correction": True}, False)])
def test_lamb_flags_choose_lamb(tmp_path, flags, bias_correction):
    trainer = make_trainer(tmp_path, token_rows(8), args=make_args(tmp_path, max_steps=1, **flags))
    trainer.train()
    assert isinstance(trainer.optimizer, LAMB)
    assert all(group["bias_correction"] is bias_correction for group in trainer.optimizer.param_groups)


def test_adamw_keeps_biases_and_norms_out_of_weight_decay(tmp_path):
    trainer = make_trainer(tmp_path, token_rows(8), args=make_args(tmp_path, max_steps=1, weight_decay=0.1))
    trainer.train()
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    decays = sorted(group["weight_decay"] for group in trainer.optimizer.param_groups)
    assert decays == [0.0, 0.1]


def test_compile_only_compiles_and_leaves_the_weights_untouched(tmp_path):
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = make_args(tmp_path, compile_only=True, torch_compile_backend="eager")
    output = make_trainer(tmp_path, token_rows(8), model=model, args=args).train()
    assert output.global_step == 0 and output.metrics["compile_time"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert hasattr(model, "_compiled_call_impl") and model._compiled_call_impl is not None


# --- streams and the evaluation collator --------------------------------------------------------------------------

class Stream(torch.utils.data.IterableDataset):
    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def test_a_stream_trains_for_max_steps_over_several_passes_and_evaluates_every_row(tmp_path):
    collator = CountingCollator()
    args = make_args(tmp_path, max_steps=5, per_device_eval_batch_size=3)
    rows = token_rows(7)
    trainer = make_trainer(tmp_path, Stream(rows), IPUConfig(gradient_accumulation_steps=2, device_iterations=2),
                           args=args, data_collator=collator, eval_dataset=Stream(rows))
    assert trainer.train().global_step == 5
    assert collator.samples == 5 * 4  # 7 rows give one combined batch of 4 per pass: 5 passes
    with pytest.raises(UserError, match="max_steps"):  # transformers.Trainer refuses it at construction: one line
        make_trainer(tmp_path, Stream(rows), args=make_args(tmp_path)).train()
    streamed = trainer.evaluate()
    assert math.isclose(streamed["eval_loss"], trainer.evaluate(rows)["eval_loss"], rel_tol=1e-6)


def test_evaluation_uses_the_evaluation_collator(tmp_path):
    training, evaluation = CountingCollator(), CountingCollator()
    rows = token_rows(8)
    trainer = make_trainer(tmp_path, rows, args=make_args(tmp_path, max_steps=1), data_collator=training,
                           eval_data_collator=evaluation, eval_dataset=rows)
    trainer.train()
    trainer.evaluate()
    assert (training.samples, evaluation.samples) == (2, 8)
