"""Packed rows give a masked LM exactly what one sequence per padded row gives it (issue 15, points 2 and 3)."""
import random

import pytest
import torch
from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM,
                          RobertaConfig, RobertaForMaskedLM)

from ipu_train.data import DataCollatorForCappedMLM
from ipu_train.packing import DataCollatorForPackedSequences, PackedDataset
from ipu_train.pipeline.families import position_offset

SMALL = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def bert(vocab, tokenizer):
    return BertForMaskedLM(BertConfig(vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, **SMALL))


def roberta(vocab, tokenizer):
    return RobertaForMaskedLM(RobertaConfig(vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                                            max_position_embeddings=64 + tokenizer.pad_token_id + 1, **SMALL))


def distilbert(vocab, tokenizer):
    return DistilBertForMaskedLM(DistilBertConfig(vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, n_layers=2,
                                                  dim=32, n_heads=2, hidden_dim=64, dropout=0.0,
                                                  attention_dropout=0.0))


def sequences(tokenizer, count, seed):
    """Sentences of the corpus as single-sequence examples of 4 to 40 tokens."""
    rng = random.Random(seed)
    words = "the cat sat on a mat while some dogs ran far away into green hills under grey skies".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 30))) for _ in range(count)]
    encoded = tokenizer(texts, truncation=True, max_length=40)
    return [{key: encoded[key][i] for key in ("input_ids",)} for i in range(count)]


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,tokenizer_fixture", [("bert", "wordpiece_tokenizer_dir"),
                                                      ("roberta", "roberta_tokenizer_dir"),
                                                      ("distilbert", "wordpiece_tokenizer_dir")])
def test_packed_loss_and_gradients_equal_padded(family, tokenizer_fixture, request):
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(tokenizer_fixture))
    torch.manual_seed(0)
    model = {"bert": bert, "roberta": roberta, "distilbert": distilbert}[family](len(tokenizer), tokenizer)
    examples = sequences(tokenizer, 24, seed=1)
    packed = PackedDataset({"input_ids": [e["input_ids"] for e in examples]}, max_length=64, max_per_pack=4)
    packs = [[examples[i] for i in pack] for pack in packed.packing.packs]
    assert len(packs) < len(examples) and max(len(p) for p in packs) > 1  # the test packs for real
    mlm = DataCollatorForCappedMLM(tokenizer, mlm_probability=0.3, max_masked_tokens="auto", pad_to_multiple_of=None)
    collator = DataCollatorForPackedSequences(mlm, 64, 4, tokenizer.pad_token_id,
                                              position_offset=position_offset(model.config))
    torch.manual_seed(5)
    packed_batch = collator(packs)
    torch.manual_seed(5)  # the same draws, so the same masks, for the same sequences one per padded row
    padded_batch = mlm([sequence for pack in packs for sequence in pack])
    if family == "distilbert":
        packed_batch.pop("token_type_ids", None)
        padded_batch.pop("token_type_ids", None)
    assert (packed_batch["labels"] != -100).sum() == (padded_batch["labels"] != -100).sum() > 0
    packed_loss, packed_grads = loss_and_grads(model, packed_batch)
    padded_loss, padded_grads = loss_and_grads(model, padded_batch)
    assert torch.allclose(packed_loss, padded_loss, rtol=1e-5, atol=0)
    for name, grad in padded_grads.items():
        if "position_embeddings" in name:  # padded rows train more positions (beyond each sequence) with zero grads
            continue
        assert torch.allclose(packed_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_packed_rows_keep_each_sequence_to_itself(wordpiece_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    examples = [{"input_ids": ids, "token_type_ids": [0] * 2 + [1] * (len(ids) - 2), "next_sentence_label": label}
                for ids, label in (([2, 7, 8, 3], 1), ([2, 9, 3], 0), ([2, 10, 11, 12, 3], 1))]
    mlm = DataCollatorForCappedMLM(tokenizer, mlm_probability=0.0001, pad_to_multiple_of=None)
    batch = DataCollatorForPackedSequences(mlm, 10, 3, tokenizer.pad_token_id)([examples[:2], examples[2:]])
    assert batch["input_ids"].tolist() == [[2, 7, 8, 3, 2, 9, 3] + [tokenizer.pad_token_id] * 3,
                                           [2, 10, 11, 12, 3] + [tokenizer.pad_token_id] * 5]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 0, 0], [0, 1, 2, 3, 4, 0, 0, 0, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1, 1, 0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]]
    assert batch["next_sentence_label"].tolist() == [[1, 0, -100], [1, -100, -100]]
    assert batch["sequence_starts"].tolist() == [[0, 4, 0], [0, 0, 0]]
    allowed = batch["attention_mask"][0, 0] == 0
    assert allowed[:4, :4].all() and allowed[4:7, 4:7].all()
    assert not allowed[:4, 4:].any() and not allowed[4:7, :4].any() and not allowed[4:7, 7:].any()
    assert torch.equal(allowed[7:, 7:], torch.eye(3, dtype=torch.bool))  # padding sees itself alone


def test_packed_pretraining_equals_padded_pairs(wordpiece_tokenizer_dir):
    """MLM + NSP on packed pairs (each pair's NSP read at its own [CLS]) equals BertForPreTraining's own loss and
    gradients on the same pairs one per padded row."""
    from transformers import BertForPreTraining

    from ipu_train import IPUConfig
    from ipu_train.pipeline.heads import enable_serialized_heads

    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **SMALL))
    reference = BertForPreTraining(model.config)
    reference.load_state_dict(model.state_dict())
    enable_serialized_heads(model, IPUConfig(), max_predictions=None)
    rng = random.Random(2)
    pairs = []
    for example in sequences(tokenizer, 20, seed=3):
        ids = example["input_ids"]
        cut = rng.randint(2, len(ids) - 1)
        pairs.append({"input_ids": ids, "token_type_ids": [0] * cut + [1] * (len(ids) - cut),
                      "next_sentence_label": rng.randint(0, 1)})
    packs = [[pairs[i] for i in pack] for pack in PackedDataset(
        {"input_ids": [p["input_ids"] for p in pairs]}, max_length=64, max_per_pack=3).packing.packs]
    assert len(packs) < len(pairs)
    mlm = DataCollatorForCappedMLM(tokenizer, mlm_probability=0.3, pad_to_multiple_of=None)
    torch.manual_seed(7)
    packed_batch = DataCollatorForPackedSequences(mlm, 64, 3, tokenizer.pad_token_id)(packs)
    torch.manual_seed(7)
    padded_batch = mlm([pair for pack in packs for pair in pack])
    packed_loss, packed_grads = loss_and_grads(model.train(), packed_batch)
    padded_loss, padded_grads = loss_and_grads(reference.train(), padded_batch)
    assert torch.allclose(packed_loss, padded_loss, rtol=1e-5, atol=0)
    for name, grad in padded_grads.items():
        if "position_embeddings" not in name:
            assert torch.allclose(packed_grads[name], grad, rtol=1e-4, atol=1e-6), name
