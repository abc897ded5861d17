"""Synthetic pre-tokenized training data for the real scripts (throughput only), as gpu_check.sh feeds them:

    python benchmarks/make_pretokenized.py clm DIR --rows 512 --seq 1024 --vocab 50257    # DIR/train.parquet
    python benchmarks/make_pretokenized.py pairs DIR --rows 4096 --seq 128 --vocab 30522  # DIR, a DatasetDict

clm: `input_ids` (--seq random ids per row) and `attention_mask` (ones), as a tokenizer gives them; run_clm.py only
groups them into blocks (and the trainer drops the mask of ones, as it does for text the script tokenizes).
pairs: the columns of BERT pretraining pairs (input_ids, attention_mask, token_type_ids, next_sentence_label), saved
with `DatasetDict.save_to_disk` for run_pretraining.py --dataset_path; the script masks them itself."""
import argparse
import os

import numpy as np


def clm_rows(rows, seq, vocab, rng):
    return {"input_ids": rng.integers(0, vocab, (rows, seq)).tolist(),
            "attention_mask": np.ones((rows, seq), np.int64).tolist()}


def pair_rows(rows, seq, vocab, rng):
    ids = rng.integers(5, vocab, (rows, seq))
    ids[:, 0], ids[:, seq // 2 - 1], ids[:, -1] = 2, 3, 3  # [CLS] A [SEP] B [SEP], as a WordPiece vocabulary numbers them
    segment_b = (np.arange(seq) >= seq // 2).astype(np.int64)
    return {"input_ids": ids.tolist(), "attention_mask": np.ones((rows, seq), np.int64).tolist(),
            "token_type_ids": np.broadcast_to(segment_b, (rows, seq)).tolist(),
            "next_sentence_label": rng.integers(0, 2, rows).tolist()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["clm", "pairs"])
    p.add_argument("out_dir")
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--vocab", type=int, required=True)
    opts = p.parse_args(argv)
    rng = np.random.default_rng(0)
    os.makedirs(opts.out_dir, exist_ok=True)
    if opts.kind == "clm":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = os.path.join(opts.out_dir, "train.parquet")
        pq.write_table(pa.table(clm_rows(opts.rows, opts.seq, opts.vocab, rng)), path)
        print(f"{opts.rows} rows of {opts.seq} token ids: {path}")
        return
    import datasets

    train = datasets.Dataset.from_dict(pair_rows(opts.rows, opts.seq, opts.vocab, rng))
    datasets.DatasetDict(train=train).save_to_disk(opts.out_dir)
    print(f"{opts.rows} sentence pairs of {opts.seq} tokens: {opts.out_dir}")


if __name__ == "__main__":
    main()
