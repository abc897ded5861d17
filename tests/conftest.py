"""Shared fixtures: the bundled corpus and tiny tokenizers of every kind, trained once per test session."""
import os
from pathlib import Path

# The tests run on local files only, also when pytest is called directly on a machine that is online: these must
# be set before transformers, datasets and huggingface_hub are imported (they read them once).
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

import pytest

from train_tokenizer import train_tokenizer


def pytest_configure(config):
    config.addinivalue_line("markers", "ipu: runs on real IPUs with the Poplar SDK's PopTorch (pytest -m ipu)")

REPO = Path(__file__).resolve().parent.parent
SLICE_LINES = 1500  # about 280 kB of text: every tokenizer trains in about a second
FIXTURE_VOCAB_SIZE = 500


@pytest.fixture(scope="session")
def corpus_dir():
    """data/corpus: train.txt and validation.txt, documents separated by blank lines, one paragraph per line."""
    return REPO / "data" / "corpus"


@pytest.fixture(scope="session")
def corpus_slice(corpus_dir, tmp_path_factory):
    lines = (corpus_dir / "train.txt").read_text(encoding="utf-8").splitlines(keepends=True)[:SLICE_LINES]
    path = tmp_path_factory.mktemp("corpus") / "slice.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def _trained(tmp_path_factory, corpus_slice, name, kind, style=None):
    output_dir = tmp_path_factory.mktemp(name)
    train_tokenizer([corpus_slice], kind, FIXTURE_VOCAB_SIZE, output_dir, style=style)
    return output_dir


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory, corpus_slice):
    """GPT-2 style byte-level BPE: <|endoftext|>, model_max_length 1024."""
    return _trained(tmp_path_factory, corpus_slice, "tok_gpt2", "bpe", style="gpt2")


@pytest.fixture(scope="session")
def roberta_tokenizer_dir(tmp_path_factory, corpus_slice):
    """RoBERTa style byte-level BPE: <s> <pad> </s> <unk> <mask> (ids 0-4), model_max_length 512."""
    return _trained(tmp_path_factory, corpus_slice, "tok_roberta", "bpe", style="roberta")


@pytest.fixture(scope="session")
def wordpiece_tokenizer_dir(tmp_path_factory, corpus_slice):
    """BERT WordPiece, lowercased: [PAD] [UNK] [CLS] [SEP] [MASK] (ids 0-4), token_type_ids."""
    return _trained(tmp_path_factory, corpus_slice, "tok_wordpiece", "wordpiece")


@pytest.fixture(scope="session")
def unigram_tokenizer_dir(tmp_path_factory, corpus_slice):
    """XLNet Unigram: <unk> <s> </s> <cls> <sep> <pad> <mask> (ids 0-6), `A <sep> <cls>`, left padding."""
    return _trained(tmp_path_factory, corpus_slice, "tok_unigram", "unigram")


@pytest.fixture(scope="session")
def text_files(corpus_dir, tmp_path_factory):
    """A few hundred paragraphs of the corpus for training, fewer for validation: seconds per script run."""
    folder = tmp_path_factory.mktemp("text")
    for name, lines in (("train.txt", 240), ("validation.txt", 60)):
        text = (corpus_dir / name).read_text(encoding="utf-8").splitlines(keepends=True)[:lines]
        (folder / name).write_text("".join(text), encoding="utf-8")
    return folder
