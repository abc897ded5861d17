"""Packed rows give a masked LM exactly what one sequence per padded row gives it (issue 15, points 2 and 3)."""
import random
import types

import pytest
import torch
from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM,
                          RobertaConfig, RobertaForMaskedLM)

from ipu_train.backends.base import input_tokens
from ipu_train.backends.torch import TorchBackend
from ipu_train.config import IPUConfig
from ipu_train.data import DataCollatorForCappedMLM
from ipu_train.packing import (SEQUENCE_IN_ROW, DataCollatorForPackedSequences, PackedDataset, block_diagonal_mask,
                               packed_model_inputs, refuse_unconverted_packed_rows)
from ipu_train.parallel import ParallelLayout
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
    loss = model(**packed_model_inputs(batch, model)).loss
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
    assert batch[SEQUENCE_IN_ROW].tolist() == [[1] * 4 + [2] * 3 + [0] * 3, [1] * 5 + [0] * 5]
    assert "attention_mask" not in batch
    allowed = packed_model_inputs(batch, bert(len(tokenizer), tokenizer))["attention_mask"][0, 0] == 0
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


def test_the_collator_hands_over_no_l_by_l_tensor(wordpiece_tokenizer_dir):
    """A batch of packed rows holds per-token and per-sequence tensors only: the [rows, 1, L, L] mask is built on the
    device (packed_model_inputs), not by the collator, and the batch's bytes grow with L, not with L x L."""
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    examples = sequences(tokenizer, 24, seed=4)
    packs = [[examples[i] for i in pack] for pack in PackedDataset(
        {"input_ids": [e["input_ids"] for e in examples]}, max_length=128, max_per_pack=3).packing.packs]
    mlm = DataCollatorForCappedMLM(tokenizer, mlm_probability=0.15, pad_to_multiple_of=None)
    batch = DataCollatorForPackedSequences(mlm, 128, 3, tokenizer.pad_token_id)(packs)
    rows = len(packs)
    assert {tuple(value.shape) for value in batch.values()} <= {(rows, 128), (rows, 3)}
    assert batch[SEQUENCE_IN_ROW].dtype == torch.int32
    assert sum(value.numel() * value.element_size() for value in batch.values()) < 8 * rows * 128 * 8


def test_the_mask_is_built_in_the_model_dtype_with_each_padding_token_alone():
    sequence_in_row = torch.tensor([[1, 1, 2, 0, 0]], dtype=torch.int32)
    mask = block_diagonal_mask(sequence_in_row, torch.bfloat16)
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bfloat16
    allowed = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]],
                           dtype=torch.bool)
    assert torch.equal(mask[0, 0] == 0, allowed)
    assert (mask[0, 0][~allowed] == torch.finfo(torch.bfloat16).min).all()
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert packed_model_inputs({SEQUENCE_IN_ROW: sequence_in_row}, model)["attention_mask"].dtype == torch.bfloat16


def test_a_model_refuses_packed_rows_whose_mask_was_not_built(wordpiece_tokenizer_dir):
    """transformers' models take unknown keyword arguments without a word: unguarded, a batch that skipped
    packed_model_inputs would run with no attention mask at all, each sequence attending to its neighbours."""
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    model = bert(len(tokenizer), tokenizer)
    batch = DataCollatorForPackedSequences(DataCollatorForCappedMLM(tokenizer, pad_to_multiple_of=None), 120, 3,
                                           tokenizer.pad_token_id)([sequences(tokenizer, 3, seed=5)])
    model(**batch)  # unguarded: no error, and no mask either
    refuse_unconverted_packed_rows(model)
    refuse_unconverted_packed_rows(model)  # once per model
    with pytest.raises(RuntimeError, match="packed_model_inputs"):
        model(**batch)
    assert model(**packed_model_inputs(batch, model)).loss is not None


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def backend_on(device):
    args = types.SimpleNamespace(device=torch.device(device), world_size=1, process_index=0, precision="fp32",
                                 loss_scaling=None, cuda_graphs=False, torch_compile=False, max_grad_norm=1.0,
                                 dataloader_pin_memory=True)
    return TorchBackend(args, IPUConfig(), ParallelLayout(processes=1, rank=0, replicas=1, accumulation=1,
                                                          writes_files=True))


def packed_pair_batch(tokenizer, second_ids, mlm_probability=1e-9):
    """Two rows: a first and a second sequence packed together, then one sequence alone (by default no token
    masked)."""
    first = {"input_ids": [2, 7, 8, 9, 3]}
    alone = {"input_ids": [2, 10, 11, 3]}
    mlm = DataCollatorForCappedMLM(tokenizer, mlm_probability=mlm_probability, pad_to_multiple_of=None)
    return DataCollatorForPackedSequences(mlm, 16, 3, tokenizer.pad_token_id)([[first, {"input_ids": second_ids}],
                                                                             [alone]])


@pytest.mark.parametrize("device", DEVICES)
def test_the_device_path_keeps_each_packed_sequence_to_itself(device, wordpiece_tokenizer_dir):
    """Evaluated as the trainer evaluates (TorchBackend.to_device, then eval_outputs, which builds the mask on the
    device), a row's first sequence gives the same logits whatever its neighbour holds, while the neighbour's own
    logits change; without the mask they would not stay the same."""
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    torch.manual_seed(0)
    model = bert(len(tokenizer), tokenizer).to(device).eval()
    refuse_unconverted_packed_rows(model)
    backend = backend_on(device)

    def logits(batch):
        outputs, _ = backend.eval_outputs(model, backend.to_device(batch))
        return outputs.logits.cpu()

    batches = [packed_pair_batch(tokenizer, [2, *range(first, first + 8), 3]) for first in (12, 40)]
    before, after = (logits(batch) for batch in batches)
    assert torch.allclose(before[0, :5], after[0, :5], rtol=0, atol=1e-6)  # the first sequence: untouched
    assert (before[0, 5:15] - after[0, 5:15]).abs().max() > 0.1  # its neighbour: changed
    assert torch.equal(before[1], after[1])  # the other row
    with torch.no_grad():
        unmasked = [model(**{key: value.to(device) for key, value in batch.items() if key != SEQUENCE_IN_ROW}).logits
                    for batch in batches]
    assert (unmasked[0][0, :5] - unmasked[1][0, :5]).abs().max() > 1e-4  # what a leak would do


@pytest.mark.parametrize("device", DEVICES)
def test_the_training_step_builds_the_mask_and_counts_real_tokens(device, wordpiece_tokenizer_dir):
    """TorchBackend's training and compile steps hand the model its mask (the model refuses a batch without it),
    and the step's input tokens are the sequences' own."""
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    torch.manual_seed(0)
    model = bert(len(tokenizer), tokenizer).to(device)
    refuse_unconverted_packed_rows(model)
    backend = backend_on(device)
    module = backend.prepare_model(model)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    backend.attach(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    torch.manual_seed(0)
    batch = packed_pair_batch(tokenizer, [2, 12, 13, 3], mlm_probability=0.5)
    assert (batch["labels"] != -100).any()
    backend.compile_step(iter([batch]))
    loss, tokens, _ = backend.train_step([backend.to_device(batch)])
    assert torch.isfinite(loss) and int(tokens) == int(input_tokens(batch)) == 5 + 4 + 4
