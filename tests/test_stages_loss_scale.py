"""fp16 loss scaling across pipeline stages on separate processes (ipu_train/pipeline/loss_scale.py): two GPT-2
stages on two gloo processes, in fp16 autocast on the CPU, take the steps torch.amp.GradScaler takes for the whole
model in one process: the same losses, the same steps skipped on overflow on every process (also where only one
stage overflows), the same scale after each step; a static scale never skips."""
import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

from ipu_train.backends.pipelined import PipelinedBackend
from ipu_train.config import IPUConfig
from ipu_train.pipeline.loss_scale import PipelineLossScale
from ipu_train.pipeline.process_stages import (PipelineRanks, build_process_pipeline, build_stage_module,
                                               new_pipeline_groups, pipeline_optimizer_step, pipeline_train_step,
                                               stage_plan_for)
from tests.test_process_stages import free_port, init_gloo, micro_batch, save_tiny_model

STEPS, MICRO_BATCHES, MAX_NORM, LEARNING_RATE = 8, 4, 1.0, 3e-3
# A first scale far too large, cut hard at each overflow, grown after 2 clean steps: a run that skips steps,
# recovers and grows its scale within STEPS.
SCALING = dict(init_scale=2.0 ** 40, backoff_factor=2.0 ** -12, growth_factor=2.0, growth_interval=2)


def steps_data():
    generator = torch.Generator().manual_seed(3)
    return [[micro_batch("gpt2", generator) for _ in range(MICRO_BATCHES)] for _ in range(STEPS)]


def fp16():
    return torch.autocast("cpu", dtype=torch.float16)


def reference_run(model_dir):
    """The whole model in one process with torch.amp.GradScaler, accumulating the micro-batches' mean losses."""
    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    scaler = torch.amp.GradScaler("cpu", **SCALING)
    losses, scales = [], []
    for micro_batches in steps_data():
        total = 0.0
        for batch in micro_batches:
            with fp16():
                loss = model(**batch).loss.float() / len(micro_batches)
            scaler.scale(loss).backward()
            total += loss.item()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        losses.append(total)
        scales.append(scaler.get_scale())
    return losses, scales


def worker(rank, world, port, model_dir, mode, out_dir):
    init_gloo(rank, world, port)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    plan = stage_plan_for(config, IPUConfig(layers_per_ipu=[2, 2]), "GPT2LMHeadModel")
    ranks = PipelineRanks(rank=rank, ranks_per_pipeline=2, replicas=1, num_stages=2)
    modules = [build_stage_module(config, plan, rank, weights=model_dir, model_class="GPT2LMHeadModel")]
    if mode == "dynamic":
        scale = PipelineLossScale(SCALING["init_scale"], "cpu", growth_factor=SCALING["growth_factor"],
                                  backoff_factor=SCALING["backoff_factor"], growth_interval=SCALING["growth_interval"])
    elif mode == "static":
        scale = PipelineLossScale(2.0 ** 8, "cpu", dynamic=False)
    else:  # "rank_0_overflows": a scale that never overflows here, and an inf put into rank 0's gradient at step 2
        scale = PipelineLossScale(2.0 ** 8, "cpu")
    pipeline = build_process_pipeline(ranks, new_pipeline_groups(ranks), modules, MICRO_BATCHES, loss_scale=scale)
    optimizer = torch.optim.AdamW(pipeline.parameters(), lr=LEARNING_RATE)
    losses, scales, finite, changed = [], [], [], []
    for step, micro_batches in enumerate(steps_data()):
        with fp16():
            losses.append(pipeline_train_step(pipeline, micro_batches).item())
        if mode == "rank_0_overflows" and step == 2 and rank == 0:
            pipeline.parameters()[0].grad.view(-1)[0] = float("inf")
        before = [p.detach().clone() for p in pipeline.parameters()]
        pipeline_optimizer_step(pipeline, optimizer, MAX_NORM, scale)
        changed.append(any(not torch.equal(a, p) for a, p in zip(before, pipeline.parameters())))
        optimizer.zero_grad()
        scales.append(scale.get_scale())
        finite.append(all(torch.isfinite(p).all() for p in pipeline.parameters()))
    torch.save({"losses": losses, "scales": scales, "finite": finite, "changed": changed,
                "state": scale.state_dict()},
               os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def staged_run(model_dir, out_dir, mode="dynamic"):
    mp.spawn(worker, args=(2, free_port(), str(model_dir), mode, str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"{rank}.pt") for rank in range(2)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fp16_stages") / "gpt2"
    save_tiny_model("gpt2", directory)
    return directory


def test_stages_scale_skip_and_grow_as_gradscaler_does_for_the_whole_model(model_dir, tmp_path):
    expected_losses, expected_scales = reference_run(model_dir)
    first, last = staged_run(model_dir, tmp_path)
    assert first["scales"] == last["scales"] == expected_scales  # every process skipped the same steps
    assert expected_scales[0] < SCALING["init_scale"] and max(expected_scales) > min(expected_scales)  # skipped, grew
    assert first["losses"] == last["losses"]
    assert last["losses"] == pytest.approx(expected_losses, rel=1e-3)
    assert all(first["finite"]) and all(last["finite"])  # no overflowed gradient ever reached the weights
    assert first["state"]["scale"] == expected_scales[-1] and first["state"]["_growth_tracker"] >= 0


def test_a_static_scale_never_changes_nor_skips_a_step(model_dir, tmp_path):
    first, last = staged_run(model_dir, tmp_path, "static")
    assert first["scales"] == last["scales"] == [2.0 ** 8] * STEPS
    assert all(first["changed"]) and all(last["changed"]) and all(first["finite"]) and all(last["finite"])


def test_an_overflow_on_one_stage_skips_the_step_on_every_stage(model_dir, tmp_path):
    first, last = staged_run(model_dir, tmp_path, "rank_0_overflows")
    assert first["changed"] == last["changed"] == [True, True, False] + [True] * (STEPS - 3)
    assert first["scales"][:3] == last["scales"][:3] == [2.0 ** 8, 2.0 ** 8, 2.0 ** 7]


@pytest.mark.parametrize("auto, loss_scaling, dynamic, first_scale", [
    (True, None, True, 2.0 ** 16), (True, 512.0, True, 512.0), (False, 1024.0, False, 1024.0)])
def test_the_pipelined_backend_gives_fp16_runs_one_scale_for_every_process(auto, loss_scaling, dynamic, first_scale):
    """As the one-process backend chooses GradScaler or a static scale (auto_loss_scaling, --loss_scaling)."""
    args = types.SimpleNamespace(device=torch.device("cpu"), precision="fp16", loss_scaling=loss_scaling,
                                 pipeline_schedule="1f1b", cuda_graphs=False)
    layout = types.SimpleNamespace(replicas_per_process=1, rank=0, pipeline_processes=2, replicas=1,
                                   pipeline_stages=2, accumulation=4)
    scaler = PipelinedBackend(args, IPUConfig(auto_loss_scaling=auto), layout).scaler
    assert isinstance(scaler, PipelineLossScale)
    assert (scaler.dynamic, scaler.get_scale()) == (dynamic, first_scale)
