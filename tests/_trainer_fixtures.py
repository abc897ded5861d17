"""Tiny GPT-2 models and synthetic token data shared by the trainer tests (built from configs: no hub)."""
import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB, SEQ = 128, 16


def tiny_gpt2(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2LMHeadModel(config)


def token_rows(n, seed=1, seq=SEQ):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (seq,), generator=generator).tolist()} for _ in range(n)]


def collate(rows):
    """Causal LM batch of equal-length rows: no padding, so every micro-batch has the same number of tokens."""
    ids = torch.tensor([row["input_ids"] for row in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def losses(log_history):
    return [entry["loss"] for entry in log_history if "loss" in entry]
