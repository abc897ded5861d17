"""Packed against padded BERT pretraining pairs from the bundled corpus: padding fraction, and real tokens per second
of a small BERT's training step on the CPU (issue 15, point 5).

    OMP_NUM_THREADS=1 python benchmarks/packing.py [--seq 128 512] [--max_per_pack 3] [--steps 6]

Pairs are built as run_pretraining.py builds them (`nsp_pair_builder`, short_seq_prob 0.1, seed 0) from
data/corpus/train.txt with a WordPiece tokenizer trained here (vocabulary 8000). Each side trains the same
BertForPreTraining (4 layers, hidden 128, dropout off, fp32, eager) on micro-batches of rows: one pair per padded
row, or packs of up to `--max_per_pack` pairs per row (ipu_train.packing); the same number of rows per step, so
packed steps carry more pairs. Real tokens per second = the pairs' own tokens in the timed steps over their time;
the two sides take their steps in turn, so that a shared machine's changing load weighs on both alike.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import datasets
import torch
from transformers import AutoTokenizer, BertConfig, BertForPreTraining

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ipu_train import IPUConfig  # noqa: E402
from ipu_train.data import DataCollatorForCappedMLM, nsp_pair_builder, read_text_documents  # noqa: E402
from ipu_train.packing import DataCollatorForPackedSequences, PackedDataset, padded_efficiency  # noqa: E402
from ipu_train.pipeline.heads import enable_serialized_heads  # noqa: E402


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


def train_step(model, optimizer, batch):
    """Seconds of one training step."""
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - start


def interleaved_rates(models, batches):
    """Real tokens per second of each side, its steps taken in turn with the other's (a shared machine's load then
    weighs on both alike); the first step of each (warm-up) is left out. batches: per side, a list of (batch,
    real tokens)."""
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-4) for model in models]
    seconds, tokens = [0.0] * len(models), [0] * len(models)
    for step in range(len(batches[0])):
        for side, (model, optimizer) in enumerate(zip(models, optimizers)):
            batch, real_tokens = batches[side][step]
            elapsed = train_step(model, optimizer, batch)
            if step:
                seconds[side] += elapsed
                tokens[side] += real_tokens
    return [t / s for t, s in zip(tokens, seconds)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    p.add_argument("--max_per_pack", type=int, default=3)
    p.add_argument("--rows", type=int, default=16, help="rows per micro-batch, both sides")
    p.add_argument("--steps", type=int, default=6, help="timed steps per side, after one warm-up step")
    opts = p.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    print("seq | pairs | mean pair tokens | padded: real/row tokens | packed rows | packed: real/row tokens | "
          "padded real tokens/s | packed real tokens/s | packed / padded")
    for seq in opts.seq:
        pairs = build_pairs(tokenizer, seq)
        lengths = [len(ids) for ids in pairs["input_ids"]]
        packed = PackedDataset(pairs, seq, opts.max_per_pack)
        mlm = DataCollatorForCappedMLM(tokenizer, mlm_probability=0.15, pad_to_multiple_of=None)
        pad_to_seq = DataCollatorForCappedMLM(tokenizer, mlm_probability=0.15, pad_to_multiple_of=seq)
        pack = DataCollatorForPackedSequences(mlm, seq, opts.max_per_pack, tokenizer.pad_token_id)
        config = BertConfig(vocab_size=len(tokenizer), num_hidden_layers=4, hidden_size=128, num_attention_heads=2,
                            intermediate_size=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            max_position_embeddings=seq, pad_token_id=tokenizer.pad_token_id)
        models, batches = [], []
        for side in ("padded", "packed"):
            torch.manual_seed(1)
            model = BertForPreTraining(config).train()
            enable_serialized_heads(model, IPUConfig(), max_predictions=None)
            models.append(model)
            side_batches = []
            for step in range(opts.steps + 1):
                rows = range(step * opts.rows, (step + 1) * opts.rows)
                if side == "padded":
                    examples = [pairs[i] for i in rows]
                    side_batches.append((pad_to_seq(examples), sum(len(e["input_ids"]) for e in examples)))
                else:
                    examples = [packed[i] for i in rows]
                    side_batches.append((pack(examples), sum(len(e["input_ids"]) for row in examples for e in row)))
            batches.append(side_batches)
        rates = interleaved_rates(models, batches)
        print(f"{seq} | {len(lengths)} | {sum(lengths) / len(lengths):.1f} | {padded_efficiency(lengths, seq):.3f} | "
              f"{len(packed)} | {packed.packing.efficiency:.3f} | {rates[0]:,.0f} | {rates[1]:,.0f} | "
              f"{rates[1] / rates[0]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
