"""Host cost of the MLM collator: median ms per batch of 128 BERT pairs, the previous collator against the current one on the
same rows, as run_pretraining.py builds it (15% masked, the static cap, padding to a multiple of 8).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/collate.py
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/collate.py --tokenizer DIR --batches 50 --against e081b82

Rows are make_pretokenized.py's pairs (every row full length, as saved pairs are), plus one case of rows of 256 to
512 tokens, which are padded. Without --tokenizer, train_tokenizer.py trains a WordPiece one on
data/corpus/train.txt. `PreviousCollator` is the collator before the fast paths, kept as the baseline here and as
the reference tests/test_collator_fast.py compares masks with. `--against REV` adds the collator of git revision REV
(`collators_at`), timed on the same rows, its batches interleaved with the others'.
"""
import argparse
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Mapping

import numpy as np
import torch
from transformers import AutoTokenizer

from ipu_train.compat import DataCollatorForLanguageModeling
from ipu_train.data import DataCollatorForCappedMLM, masked_token_cap

ROOT = pathlib.Path(__file__).resolve().parent.parent


class PreviousCollator(DataCollatorForCappedMLM):
    """tokenizer.pad for every batch, and the parent's per-row Python special-token mask."""

    def torch_call(self, examples):
        if not isinstance(examples[0], Mapping):
            return DataCollatorForLanguageModeling.torch_call(self, examples)
        stripped = [{key: value for key, value in example.items() if key != "word_ids"} for example in examples]
        if self.whole_word_mask and examples[0].get("word_ids") is not None:
            offsets = self._offsets(self._padded_word_ids(examples)).numpy()
            for example, row in zip(stripped, offsets):
                example["offset_mapping"] = row
        return DataCollatorForLanguageModeling.torch_call(self, stripped)

    def torch_mask_tokens(self, inputs, special_tokens_mask=None, offset_mapping=None):
        if special_tokens_mask is None:
            special_tokens_mask = [self.tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True)
                                   for row in inputs.tolist()]
        return super().torch_mask_tokens(inputs, special_tokens_mask, offset_mapping)


def pairs(rows, seq, vocab, shortest=None, seed=0):
    """make_pretokenized.py's pair rows as the dataset hands them over: dicts of Python lists; with `shortest`, each
    row cut to a random length from `shortest` to `seq`."""
    from make_pretokenized import pair_rows  # beside this script, which runs from here
    rng = np.random.default_rng(seed)
    columns = pair_rows(rows, seq, vocab, rng)
    examples = [{key: values[i] for key, values in columns.items()} for i in range(rows)]
    if shortest is not None:
        for example in examples:
            length = int(rng.integers(shortest, seq + 1))
            example.update({key: value[:length] for key, value in example.items() if isinstance(value, list)})
    return examples


def collators_at(revision):
    """The modules ipu_train.data and ipu_train.packing as of git `revision`, loaded beside the current ones (what
    they import from the package is the current code): the collators before a change, to time on the same rows."""
    modules = []
    for name in ("data", "packing"):
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:ipu_train/{name}.py"], check=True,
                                capture_output=True, text=True).stdout
        module = types.ModuleType(f"ipu_train._{name}_at_{len(sys.modules)}")
        module.__package__ = "ipu_train"
        sys.modules[module.__name__] = module  # dataclasses look their module up
        exec(compile(source, f"{revision}:ipu_train/{name}.py", "exec"), module.__dict__)
        modules.append(module)
    return modules


def median_ms(collators, examples, batches):
    """Median ms per batch of each collator, their batches interleaved: the machine's other work weighs on both
    alike and lengthens some batches, not the typical one."""
    times = [[] for _ in collators]
    for collator in collators:
        collator(examples)  # warm-up
    for _ in range(batches):
        for collator, own in zip(collators, times):
            start = time.perf_counter()
            collator(examples)
            own.append(time.perf_counter() - start)
    return [1e3 * statistics.median(own) for own in times]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", help="a saved BERT tokenizer (default: train a WordPiece one)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per case")
    p.add_argument("--rows", type=int, default=128, help="pairs per batch")
    p.add_argument("--against", metavar="REV", help="also time the collator of this git revision")
    opts = p.parse_args(argv)
    then = collators_at(opts.against)[0].DataCollatorForCappedMLM if opts.against else None
    with tempfile.TemporaryDirectory() as scratch:
        if opts.tokenizer is None:
            opts.tokenizer = scratch
            subprocess.run([sys.executable, str(ROOT / "train_tokenizer.py"), "--type", "wordpiece", "--files",
                            str(ROOT / "data/corpus/train.txt"), "--vocab_size", "8000", "--output_dir", scratch],
                           check=True, capture_output=True)
        tokenizer = AutoTokenizer.from_pretrained(opts.tokenizer)
    print(f"{opts.rows} pairs a batch, {opts.batches} batches, torch threads {torch.get_num_threads()}")
    against = f"{opts.against} ms" if then else ""
    print(f"{'rows':<28}{'previous ms':>12}{against:>12}{'current ms':>12}{'speed-up':>10}")
    for label, seq, shortest in [("128 tokens", 128, None), ("512 tokens", 512, None),
                                 ("256-512 tokens (padded)", 512, 256)]:
        examples = pairs(opts.rows, seq, len(tokenizer), shortest)
        options = dict(mlm_probability=0.15, max_masked_tokens=masked_token_cap(seq, 0.15), pad_to_multiple_of=8)
        collators = [PreviousCollator(tokenizer, **options), DataCollatorForCappedMLM(tokenizer, **options)]
        if then:
            collators.insert(1, then(tokenizer, **options))
        times = median_ms(collators, examples, opts.batches)
        between = f"{times[1]:>12.2f}" if then else ""
        print(f"{label:<28}{times[0]:>12.2f}{between:>12}{times[-1]:>12.2f}{times[0] / times[-1]:>9.1f}x")


if __name__ == "__main__":
    main()
