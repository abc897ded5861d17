"""Packed against padded BERT pretraining pairs from the bundled corpus: padding fraction, real tokens per second of
a BERT training step, and the packed collator's host cost (issue 15, points 5 and 6).

    OMP_NUM_THREADS=1 python benchmarks/packing.py [--seq 128 512] [--max_per_pack 3] [--steps 6]
    python benchmarks/packing.py --device cuda --size bert-base --bf16 --seq 512 --rows 64 --warmup 5 --steps 15 \
        --json packing_512.json                          # phase-2 BERT-base at 512 (benchmarks/gpu_packing.sh)

Pairs are built as run_pretraining.py builds them (`nsp_pair_builder`, short_seq_prob 0.1, seed 0) from
data/corpus/train.txt with a WordPiece tokenizer trained here (vocabulary 8000), 15% of their tokens masked; the
sparse MLM head gathers every masked token (shapes that change from step to step), or with `--cap` as
run_pretraining.py trains: each sequence capped at `masked_token_cap(seq)` and the head gathering the collator's cap
per row (one sequence's cap per padded row, the packed collator's sum of its sequences' caps per packed row: 3 x 96
slots at 512 against 96), static shapes, which `--compile` needs. Each side trains the
same BertForPreTraining, dropout off, with AdamW (fused on CUDA): `--size small` is 4 layers of hidden 128 (the CPU
default); `--size bert-base` is BERT-base (12 layers, hidden 768, 12 heads, intermediate 3072) with BERT-base's
vocabulary of 30522 rows, so that its embedding and MLM decoder cost what BERT-base's do (the 8000-token tokenizer's
ids use the first rows; a 30522-token WordPiece trained on 2 MB of text would stop short of that size anyway).
`--bf16` runs the steps under bf16 autocast, as the trainer's --bf16 does; `--compile` compiles each model in place
as the trainer's --torch_compile does (its first `--warmup` steps compile).

Both sides take the same number of rows per step (`--rows`): one pair per padded row, or packs of up to
`--max_per_pack` pairs per row (ipu_train.packing), so packed steps carry more pairs. Real tokens per second = the
pairs' own tokens in the timed steps over their time; the two sides take their steps in turn, so that a shared
machine's changing load weighs on both alike, and the first `--warmup` steps of each are left out. The packed
side's model is routed as the scripts route it (`ipu_train.attention`): where the variable-length kernel
serves (CUDA, `--bf16`) its rows take the kernel, and a third side, `packed_mask`, trains the same packed rows
through the block-diagonal mask (`kernel_over_mask`: what the kernel gains; `--no_packed_mask` leaves it out);
elsewhere the packed side takes the mask.
Either is built on the device inside the timed step, as the trainer builds it
(`ipu_train.packing.packed_model_inputs`). On CUDA each step
ends with a device synchronisation, and its peak memory (allocated, both models' weights and optimizer states
included) is read. Rows run out after rows/--rows steps; further steps take them again from the start.

The host cost: median ms and bytes of one batch of `--collate_rows` rows from each side's collator
(`--collate_batches` batches, 0: not measured). `--collate_against REV` also times the packed collator of git
revision REV (its ipu_train/data.py and ipu_train/packing.py, loaded beside the current ones) on the same packs, its
batches interleaved with the current ones', and checks that both give the same batch, bit for bit, for a seed;
`--collate_only` measures the host cost alone (no model, no steps):

    OMP_NUM_THREADS=1 python benchmarks/packing.py --collate_only --collate_against e081b82 --collate_batches 30

`--json PATH` writes every figure.
"""
import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import datasets
import torch
import transformers
from transformers import AutoTokenizer, BertConfig, BertForPreTraining

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from collate import collators_at, median_ms  # noqa: E402
from ipu_train import IPUConfig  # noqa: E402
from ipu_train.compat import compile_in_place  # noqa: E402
from ipu_train.data import (DataCollatorForCappedMLM, masked_token_cap, nsp_pair_builder,  # noqa: E402
                            read_text_documents)
from ipu_train.attention import kernel_refusal, route_packed_attention  # noqa: E402
from ipu_train.packing import (DataCollatorForPackedSequences, PackedDataset, packed_model_inputs,  # noqa: E402
                               padded_efficiency)
from ipu_train.pipeline.families import family_for_model_type  # noqa: E402
from ipu_train.pipeline.heads import enable_serialized_heads  # noqa: E402

MLM_PROBABILITY = 0.15
SIZES = {"small": dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=2, intermediate_size=512),
         "bert-base": family_for_model_type("bert").shipped_sizes["bert-base"].sizes}


def tokenizer_dir():
    path = os.path.join(tempfile.gettempdir(), "packing_bench_wordpiece")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "train_tokenizer.py"), "--type", "wordpiece", "--files",
                        os.path.join(ROOT, "data/corpus/train.txt"), "--vocab_size", "8000", "--output_dir", path],
                       check=True, capture_output=True)
    return path


def build_pairs(tokenizer, seq):
    documents = datasets.Dataset.from_dict({"text": read_text_documents(os.path.join(ROOT, "data/corpus/train.txt"))})
    build = nsp_pair_builder(tokenizer, seq, corpus=documents["text"])
    return documents.map(build, batched=True, with_indices=True, remove_columns=["text"])


def bert_config(size, tokenizer, seq):
    sizes = dict(SIZES[size])
    vocab_size = max(len(tokenizer), sizes.pop("vocab_size", 0))
    return BertConfig(vocab_size=vocab_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      max_position_embeddings=seq, pad_token_id=tokenizer.pad_token_id, **sizes)


def autocast(opts):
    return torch.autocast(opts.device.type, dtype=torch.bfloat16) if opts.bf16 else contextlib.nullcontext()


def kernel_refused(model, opts):
    """Why packed rows do not take the variable-length kernel in this model's training steps (None: they do)."""
    with autocast(opts):
        return kernel_refusal(model, torch.ones(1, 1, dtype=torch.int32, device=opts.device))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_bytes(batch):
    return sum(value.numel() * value.element_size() for value in batch.values() if torch.is_tensor(value))


class Side:
    """One side of the comparison: its collator, its rows, its model and optimizer, its timed steps."""

    def __init__(self, name, rows, collate, real_tokens, max_predictions, routed=False):
        self.name, self.rows, self.collate, self.real_tokens = name, rows, collate, real_tokens
        self.max_predictions, self.routed = max_predictions, routed
        self.seconds = self.tokens = self.pairs = self.timed = 0
        self.peak_bytes = 0

    def examples(self, step, rows_per_step):
        return [self.rows[(step * rows_per_step + i) % len(self.rows)] for i in range(rows_per_step)]

    def prepare(self, config, opts):
        torch.manual_seed(1)  # the same initial weights on both sides
        self.model = BertForPreTraining(config).train()
        enable_serialized_heads(self.model, IPUConfig(), max_predictions=self.max_predictions)
        if self.routed:  # packed rows may take the variable-length kernel, as the scripts' packed runs do
            route_packed_attention(self.model, opts.max_per_pack)
        self.model.to(opts.device)
        if opts.compile:
            compile_in_place(self.model, backend=opts.compile_backend)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=opts.device.type == "cuda")

    def step(self, batch, opts):
        """One training step; the seconds it took."""
        cuda = opts.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(opts.device)
        synchronize(opts.device)
        start = time.perf_counter()
        with autocast(opts):
            loss = self.model(**packed_model_inputs(batch, self.model)).loss  # a packed side's mask or bounds: here
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        synchronize(opts.device)
        elapsed = time.perf_counter() - start
        if cuda:
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(opts.device))
        return elapsed

    def result(self, opts, seq):
        return dict(real_tokens_per_s=round(self.tokens / self.seconds, 1),
                    ms_per_step=round(1e3 * self.seconds / self.timed, 2),
                    pairs_per_step=round(self.pairs / self.timed, 2),
                    padding_fraction=round(1 - self.tokens / (self.timed * opts.rows * seq), 4),
                    peak_memory_GB=round(self.peak_bytes / 1e9, 3) if self.peak_bytes else None)


def interleaved_steps(sides, opts, seq):
    """Every side's warm-up and timed steps, in turn with the other's (a shared machine's load then weighs on both
    alike). Each step's batch is collated and moved to the device before its clock starts; the packed side's
    attention mask is built inside the step, on the device, as the trainer builds it."""
    for step in range(opts.warmup + opts.steps):
        for side in sides:
            examples = side.examples(step, opts.rows)
            batch = {key: value.to(opts.device) if torch.is_tensor(value) else value
                     for key, value in side.collate(examples).items()}
            elapsed = side.step(batch, opts)
            if step >= opts.warmup:
                side.seconds += elapsed
                side.tokens += side.real_tokens(examples)
                side.pairs += sum(len(row) if isinstance(row, list) else 1 for row in examples)
                side.timed += 1


def collate_cost(sides, opts):
    """Median ms and bytes of one batch of --collate_rows rows, per side."""
    examples = [side.examples(0, opts.collate_rows) for side in sides]
    batches = [side.collate(rows) for side, rows in zip(sides, examples)]
    collators = [lambda _, side=side, rows=rows: side.collate(rows) for side, rows in zip(sides, examples)]
    times = median_ms(collators, None, opts.collate_batches)
    return {side.name: dict(rows=opts.collate_rows, ms=round(ms, 2), bytes=batch_bytes(batch))
            for side, ms, batch in zip(sides, times, batches)}


def same_batches(collators, rows):
    """Whether the collators give the same batch (keys, dtypes, values) for the same seed."""
    batches = []
    for collate in collators:
        torch.manual_seed(0)
        batches.append(collate(rows))
    first = batches[0]
    return all(list(batch) == list(first) and all(batch[key].dtype == first[key].dtype
                                                  and torch.equal(batch[key], first[key]) for key in first)
               for batch in batches[1:])


def run_seq(seq, tokenizer, opts):
    pairs = build_pairs(tokenizer, seq)
    lengths = [len(ids) for ids in pairs["input_ids"]]
    packed = PackedDataset(pairs, seq, opts.max_per_pack)
    cap = masked_token_cap(seq, MLM_PROBABILITY) if opts.cap else None
    mlm = DataCollatorForCappedMLM(tokenizer, mlm_probability=MLM_PROBABILITY, max_masked_tokens=cap,
                                   pad_to_multiple_of=None)
    pad_to_seq = DataCollatorForCappedMLM(tokenizer, mlm_probability=MLM_PROBABILITY, max_masked_tokens=cap,
                                          pad_to_multiple_of=seq)
    pack = DataCollatorForPackedSequences(mlm, seq, opts.max_per_pack, tokenizer.pad_token_id)
    packed_tokens = lambda rows: sum(len(e["input_ids"]) for row in rows for e in row)  # noqa: E731
    sides = [Side("padded", [pairs[i] for i in range(len(pairs))], pad_to_seq,
                  lambda rows: sum(len(e["input_ids"]) for e in rows), cap),
             Side("packed", [packed[i] for i in range(len(packed))], pack, packed_tokens, pack.max_masked_tokens,
                  routed=True)]
    collate = None
    if opts.collate_batches:
        timed = list(sides)
        if opts.collate_against:
            data_then, packing_then = collators_at(opts.collate_against)
            mlm_then = data_then.DataCollatorForCappedMLM(tokenizer, mlm_probability=MLM_PROBABILITY,
                                                          max_masked_tokens=cap, pad_to_multiple_of=None)
            pack_then = packing_then.DataCollatorForPackedSequences(mlm_then, seq, opts.max_per_pack,
                                                                    tokenizer.pad_token_id)
            timed.append(Side(f"packed at {opts.collate_against}", sides[1].rows, pack_then, packed_tokens, None))
        collate = collate_cost(timed, opts)
        if opts.collate_against:
            collate[timed[-1].name]["same_batch"] = same_batches([pack, timed[-1].collate],
                                                                 sides[1].examples(0, opts.collate_rows))
    run = dict(seq=seq, pairs=len(lengths), mean_pair_tokens=round(sum(lengths) / len(lengths), 1),
               packed_rows=len(packed), padded_row_efficiency=round(padded_efficiency(lengths, seq), 4),
               packed_row_efficiency=round(packed.packing.efficiency, 4))
    if opts.collate_only:
        return dict(run, collate=collate)
    config = bert_config(opts.size, tokenizer, seq)
    for side in sides:
        side.prepare(config, opts)
    refused = kernel_refused(sides[1].model, opts)
    run["packed_attention"] = "variable-length kernel" if refused is None else f"block-diagonal mask: {refused}"
    if refused is None and not opts.no_packed_mask:  # the same packed rows through the mask: what the kernel gains
        sides.append(Side("packed_mask", sides[1].rows, pack, packed_tokens, pack.max_masked_tokens))
        sides[-1].prepare(config, opts)
    interleaved_steps(sides, opts, seq)
    rates = {side.name: side.result(opts, seq) for side in sides}
    for side in sides:  # the next sequence length's models start with the device memory free
        del side.model, side.optimizer
    tokens_per_s = {name: rate["real_tokens_per_s"] for name, rate in rates.items()}
    ratios = dict(packed_over_padded=round(tokens_per_s["packed"] / tokens_per_s["padded"], 3))
    if "packed_mask" in rates:
        ratios["kernel_over_mask"] = round(tokens_per_s["packed"] / tokens_per_s["packed_mask"], 3)
    return dict(run, **rates, collate=collate, **ratios)


def describe(opts):
    device = torch.cuda.get_device_name(opts.device) if opts.device.type == "cuda" else platform.processor() or "cpu"
    return dict(device=device, torch=torch.__version__, transformers=transformers.__version__, size=opts.size,
                bf16=opts.bf16, compiled=opts.compile_backend if opts.compile else False, capped=opts.cap,
                rows=opts.rows,
                warmup=opts.warmup, steps=opts.steps, max_per_pack=opts.max_per_pack,
                torch_threads=torch.get_num_threads())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    p.add_argument("--max_per_pack", type=int, default=3)
    p.add_argument("--rows", type=int, default=16, help="rows per step, both sides")
    p.add_argument("--steps", type=int, default=6, help="timed steps per side, after the warm-up")
    p.add_argument("--warmup", type=int, default=1, help="steps per side left out of the timing")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile each model in place")
    p.add_argument("--compile_backend", default="inductor")
    p.add_argument("--cap", action="store_true", help="cap the masked tokens as run_pretraining.py's training does "
                   "(static shapes)")
    p.add_argument("--collate_rows", type=int, default=64, help="rows of the batches whose collation is timed")
    p.add_argument("--collate_batches", type=int, default=10, help="timed batches per side (0: none)")
    p.add_argument("--collate_against", metavar="REV", help="also time the packed collator of this git revision on "
                   "the same packs, and check that it gives the same batches")
    p.add_argument("--collate_only", action="store_true", help="measure the host cost alone: no model, no steps")
    p.add_argument("--no_packed_mask", action="store_true", help="no packed_mask side where the packed side takes "
                   "the variable-length kernel (one model fewer to compile)")
    p.add_argument("--json", help="write every figure to this JSON file")
    opts = p.parse_args(argv)
    if opts.compile and not opts.cap:
        p.error("--compile needs --cap: without it the MLM head's shapes change from step to step")
    if (opts.collate_only or opts.collate_against) and not opts.collate_batches:
        p.error("--collate_only and --collate_against time the collation: --collate_batches must be at least 1")
    opts.device = torch.device(opts.device)
    return opts


def main(argv=None):
    opts = parse_args(argv)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    setup = describe(opts)
    print(" | ".join(f"{key} {value}" for key, value in setup.items()), flush=True)
    print("seq | pairs | mean pair tokens | padded: real/row tokens | packed rows | packed: real/row tokens | "
          "padded real tokens/s | packed real tokens/s | packed / padded")
    runs = []
    for seq in opts.seq:
        run = run_seq(seq, tokenizer, opts)
        runs.append(run)
        padded, packed = run.get("padded"), run.get("packed")  # none with --collate_only
        print(f"{seq} | {run['pairs']} | {run['mean_pair_tokens']:.1f} | {run['padded_row_efficiency']:.3f} | "
              f"{run['packed_rows']} | {run['packed_row_efficiency']:.3f} | "
              + (f"{padded['real_tokens_per_s']:,.0f} | {packed['real_tokens_per_s']:,.0f} | "
                 f"{run['packed_over_padded']:.2f}x" if padded else "- | - | -"), flush=True)
        if padded:
            print(f"    ms/step padded {padded['ms_per_step']}, packed {packed['ms_per_step']}; peak GB padded "
                  f"{padded['peak_memory_GB']}, packed {packed['peak_memory_GB']}; packed rows' attention: "
                  f"{run['packed_attention']}", flush=True)
        if "packed_mask" in run:
            mask = run["packed_mask"]
            print(f"    packed through the mask instead: {mask['real_tokens_per_s']:,.0f} real tokens/s, "
                  f"{mask['ms_per_step']} ms/step, peak GB {mask['peak_memory_GB']}; kernel / mask "
                  f"{run['kernel_over_mask']:.2f}x", flush=True)
        if run["collate"]:
            print("    collate, " + "; ".join(
                f"{name}: {c['ms']:.2f} ms, {c['bytes'] / 2 ** 20:.2f} MiB per batch of {c['rows']} rows"
                + ("" if "same_batch" not in c else " (the same batch)" if c["same_batch"] else " (A DIFFERENT BATCH)")
                for name, c in run["collate"].items()), flush=True)
    if opts.json:
        with open(opts.json, "w") as handle:
            json.dump(dict(setup, runs=runs), handle, indent=1)


if __name__ == "__main__":
    main()
