"""Steps per second of a GPT-2 trained in one process against its 2 pipeline stages on 2 processes (gloo, CPU), and
the pipeline's measured bubble against the schedule's estimate.

    OMP_NUM_THREADS=1 python benchmarks/pipeline.py [--steps 10] [--micro_batches 8] [--schedule 1f1b]

Every process runs one thread, so the two stages can use two cores at once. The measured bubble is the share of a
pipelined step that an even split of the one-process step does not explain: 1 - (T_one / P) / T_pipeline. It holds
everything a real pipeline adds on top of the schedule's idle time (sending activations, unequal stages), so it is
an upper bound on the schedule's own bubble, (P - 1) / (m + P - 1)."""
import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ipu_train.config import IPUConfig  # noqa: E402
from ipu_train.pipeline.process_stages import (PipelineRanks, build_process_pipeline, build_stage_module,  # noqa: E402
                                               estimated_bubble, new_pipeline_groups, pipeline_train_step,
                                               stage_plan_for)

SEQ, MICRO_BATCH, VOCAB, WARMUP = 128, 4, 1000, 2


def model_config():
    return transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=VOCAB, n_positions=SEQ,
                                   bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def micro_batches(count):
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=generator) for _ in range(count)]
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]


def one_process_seconds(model_dir, steps, count):
    """Seconds per optimizer step of the whole model, accumulating `count` micro-batches."""
    torch.set_num_threads(1)
    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = micro_batches(count)
    for step in range(WARMUP + steps):
        if step == WARMUP:
            started = time.perf_counter()
        for batch in batches:
            (model(**batch).loss / count).backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - started) / steps


def stage_worker(rank, port, model_dir, steps, count, schedule, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    config = model_config()
    layers = [1, 1, 1, 1] if schedule == "interleaved_1f1b" else [2, 2]
    plan = stage_plan_for(config, IPUConfig(layers_per_ipu=layers))
    ranks = PipelineRanks(rank=rank, ranks_per_pipeline=2, replicas=1, num_stages=len(plan.stages))
    groups = new_pipeline_groups(ranks)
    modules = [build_stage_module(config, plan, index, weights=model_dir) for index in ranks.stage_indices]
    pipeline = build_process_pipeline(ranks, groups, modules, count, schedule=schedule)
    optimizer = torch.optim.AdamW(pipeline.parameters(), lr=1e-4)
    batches = micro_batches(count)
    for step in range(WARMUP + steps):
        if step == WARMUP:
            dist.barrier()
            started = time.perf_counter()
        pipeline_train_step(pipeline, batches)
        optimizer.step()
        optimizer.zero_grad()
    dist.barrier()
    if rank == 0:
        torch.save((time.perf_counter() - started) / steps, out)
    dist.destroy_process_group()


def pipelined_seconds(model_dir, steps, count, schedule):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = os.path.join(model_dir, "seconds.pt")
    mp.spawn(stage_worker, args=(port, model_dir, steps, count, schedule, out), nprocs=2, join=True)
    return torch.load(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro_batches", type=int, default=8)
    parser.add_argument("--schedule", choices=("gpipe", "1f1b", "interleaved_1f1b"), default="1f1b")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as model_dir:
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(model_config()).save_pretrained(model_dir)
        one = one_process_seconds(model_dir, args.steps, args.micro_batches)
        two = pipelined_seconds(model_dir, args.steps, args.micro_batches, args.schedule)
    virtual = 2 if args.schedule == "interleaved_1f1b" else 1
    print(f"GPT-2 4 layers x 256, sequence {SEQ}, micro-batch {MICRO_BATCH}, {args.micro_batches} micro-batches, "
          f"{args.schedule}, {os.cpu_count()} CPU(s)")
    print(f"1 process:             {1 / one:.3f} steps/s")
    print(f"2 stages, 2 processes: {1 / two:.3f} steps/s ({one / two:.2f}x)")
    print(f"bubble: measured {1 - (one / 2) / two:.1%}, estimated "
          f"{estimated_bubble(2, args.micro_batches, virtual):.1%}")


if __name__ == "__main__":
    main()
