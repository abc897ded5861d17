"""ipu_train.data: grouping, capped dynamic masking, whole-word masking, NSP pairs, PLM batches."""
import dataclasses
import math
import warnings

import datasets
import pytest
import torch
from transformers import AutoTokenizer, DataCollatorForPermutationLanguageModeling, XLNetConfig, XLNetLMHeadModel

from ipu_train.compat import DataCollatorForLanguageModeling  # transformers', with whole-word masking on either stack
from ipu_train.data import (DataCollatorForCappedMLM, DataCollatorForPLM, build_nsp_pairs, group_texts,
                            masked_token_cap, nsp_pair_builder, read_text_documents, split_sentences)

CLS, SEP = 2, 3  # ids in the synthetic NSP documents below


@pytest.fixture(scope="module")
def bert(wordpiece_tokenizer_dir):
    return AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)


@pytest.fixture(scope="module")
def documents(corpus_dir):
    return read_text_documents(corpus_dir / "train.txt")


# ----------------------------------------------------------------------------------------------- grouping

def test_group_texts_concatenates_and_drops_the_remainder():
    examples = {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]], "attention_mask": [[1, 1, 1], [1, 1], [1, 1, 1, 0]]}
    grouped = group_texts(examples, 4)
    assert grouped["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert grouped["attention_mask"] == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert group_texts(examples, 10) == {"input_ids": [], "attention_mask": []}
    with pytest.raises(ValueError):
        group_texts(examples, 0)


# ----------------------------------------------------------------------------------------------- masking

@pytest.mark.parametrize("seq_len, probability, expected", [
    (128, 0.15, 32),   # 19.2 + 2·sqrt(16.32) = 27.3 → 32
    (512, 0.15, 96),   # 76.8 + 16.2 = 93.0 → 96
    (384, 0.15, 80),   # 57.6 + 14.0 = 71.6 → 80
    (256, 0.5, 144),   # 128 + 16 = 144, already a multiple of 16
    (8, 0.15, 8),      # 16 would exceed the sequence
])
def test_masked_token_cap(seq_len, probability, expected):
    assert masked_token_cap(seq_len, probability) == expected


def test_masked_token_cap_is_a_multiple_of_16_above_two_sigma():
    for seq_len in range(16, 1025, 16):
        cap = masked_token_cap(seq_len, 0.15)
        mean = 0.15 * seq_len
        assert cap % 16 == 0 and mean + 2 * math.sqrt(mean * 0.85) <= cap < mean + 2 * math.sqrt(mean * 0.85) + 16


def synthetic_batch(tokenizer, rows=512, max_len=128, seed=0, full=False):
    """[CLS] random word pieces [SEP] of random lengths (so the batch is padded), or all of `max_len` if `full`."""
    generator = torch.Generator().manual_seed(seed)
    first_plain = max(tokenizer.all_special_ids) + 1
    examples = []
    for _ in range(rows):
        length = max_len - 2 if full else int(torch.randint(max_len // 2, max_len - 1, (1,), generator=generator))
        body = torch.randint(first_plain, len(tokenizer), (length,), generator=generator).tolist()
        ids = [tokenizer.cls_token_id, *body, tokenizer.sep_token_id]
        examples.append({"input_ids": ids, "token_type_ids": [0] * len(ids), "attention_mask": [1] * len(ids)})
    return examples


def padded_originals(tokenizer, examples, length):
    return torch.tensor([e["input_ids"] + [tokenizer.pad_token_id] * (length - len(e["input_ids"])) for e in examples])


def test_dynamic_masking_statistics(bert):
    examples = synthetic_batch(bert)
    torch.manual_seed(0)
    batch = DataCollatorForCappedMLM(bert, mlm_probability=0.15)(examples)
    original = padded_originals(bert, examples, batch["input_ids"].shape[1])
    masked = batch["labels"] != -100
    maskable = batch["attention_mask"].bool() & ~torch.isin(original, torch.tensor(bert.all_special_ids))

    assert not (masked & ~maskable).any()  # never a special token or padding
    assert torch.equal(batch["labels"][masked], original[masked])
    assert torch.equal(batch["input_ids"][~masked], original[~masked])
    assert masked.sum() / maskable.sum() == pytest.approx(0.15, abs=0.01)

    inputs = batch["input_ids"][masked]
    as_mask = (inputs == bert.mask_token_id).float().mean()
    kept = (inputs == original[masked]).float().mean()
    assert as_mask == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1 + 0.1 / len(bert), abs=0.02)  # a random token is drawn from the whole vocabulary
    assert 1 - as_mask - kept == pytest.approx(0.1, abs=0.02)


@pytest.mark.parametrize("probability, max_len, full, cap", [
    (0.15, 128, False, 12),
    (0.5, 256, True, "auto"),  # 254 maskable tokens: the cap, 144, is 2 sigma above the mean, so some rows exceed it
])
def test_cap_keeps_a_subset_and_uncapped_keeps_all(bert, probability, max_len, full, cap):
    examples = synthetic_batch(bert, rows=512, max_len=max_len, full=full)
    masked = {}
    for max_masked_tokens in (None, cap):
        torch.manual_seed(1)
        collator = DataCollatorForCappedMLM(bert, mlm_probability=probability, max_masked_tokens=max_masked_tokens)
        batch = collator(examples)
        masked[max_masked_tokens] = batch["labels"] != -100
    uncapped, capped = masked[None], masked[cap]
    limit = collator.cap_for(uncapped.shape[1])
    assert limit == (12 if cap == 12 else masked_token_cap(uncapped.shape[1], probability))
    assert uncapped.sum(1).max() > limit  # the fixture does exceed the cap, so capping is exercised
    assert not (capped & ~uncapped).any()  # the cap only drops selected tokens
    assert torch.equal(capped.sum(1), uncapped.sum(1).clamp(max=limit))
    original = padded_originals(bert, examples, capped.shape[1])
    assert torch.equal(batch["labels"][capped], original[capped])
    assert torch.equal(batch["input_ids"][~capped], original[~capped])  # dropped tokens are restored


def test_evaluation_collator_has_no_cap(bert):
    training = DataCollatorForCappedMLM(bert, max_masked_tokens="auto")
    evaluation = dataclasses.replace(training, max_masked_tokens=None)
    examples = synthetic_batch(bert, rows=64, max_len=32)
    torch.manual_seed(2)
    masked = DataCollatorForCappedMLM(bert, mlm_probability=0.9)(examples)["labels"] != -100
    torch.manual_seed(2)
    same = dataclasses.replace(evaluation, mlm_probability=0.9)(examples)["labels"] != -100
    assert torch.equal(masked, same) and masked.sum(1).max() > masked_token_cap(32, 0.9) - 16


def test_masking_follows_torch_global_seed_and_pads_to_multiple(bert):
    examples = synthetic_batch(bert, rows=8, max_len=30)
    collator = DataCollatorForCappedMLM(bert, max_masked_tokens="auto", pad_to_multiple_of=16)
    torch.manual_seed(3)
    first = collator(examples)
    torch.manual_seed(3)
    second = collator(examples)
    third = collator(examples)
    assert first["input_ids"].shape[1] % 16 == 0
    assert torch.equal(first["labels"], second["labels"]) and not torch.equal(second["labels"], third["labels"])


def test_nsp_columns_pass_through(bert):
    examples = [{"input_ids": [CLS, 10, 11, SEP, 12, SEP], "token_type_ids": [0, 0, 0, 0, 1, 1],
                 "next_sentence_label": 1},
                {"input_ids": [CLS, 13, SEP, 14, SEP], "token_type_ids": [0, 0, 0, 1, 1], "next_sentence_label": 0}]
    batch = DataCollatorForCappedMLM(bert)(examples)
    assert batch["next_sentence_label"].tolist() == [1, 0]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 0]]
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label"}


def test_collator_needs_mask_and_pad_tokens(bpe_tokenizer_dir):
    from ipu_train.errors import UserError
    with pytest.raises(UserError, match="mask"):
        DataCollatorForCappedMLM(AutoTokenizer.from_pretrained(bpe_tokenizer_dir))


# ----------------------------------------------------------------------------------------------- whole words

def tokenized_with_word_ids(tokenizer, texts, max_length=128):
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    return [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
             "word_ids": encoded.word_ids(i)} for i in range(len(texts))]


def assert_whole_words(examples, labels, cap=None):
    masked_tokens = 0
    for example, row in zip(examples, labels):
        words = {}
        for position, word in enumerate(example["word_ids"]):
            if word is not None:
                words.setdefault(word, []).append(bool(row[position] != -100))
        assert all(all(flags) or not any(flags) for flags in words.values())
        assert cap is None or int((row != -100).sum()) <= cap
        masked_tokens += sum(len(flags) for flags in words.values() if flags[0])
    return masked_tokens


@pytest.mark.parametrize("tokenizer_dir", ["wordpiece_tokenizer_dir", "roberta_tokenizer_dir"])
def test_whole_word_masking_masks_whole_words(request, documents, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(tokenizer_dir))
    examples = tokenized_with_word_ids(tokenizer, documents[:200])
    assert any(len(set(e["word_ids"])) < len(e["word_ids"]) - 2 for e in examples)  # multi-piece words exist
    torch.manual_seed(4)
    batch = DataCollatorForCappedMLM(tokenizer, whole_word_mask=True)(examples)
    labels = batch["labels"]
    masked = assert_whole_words(examples, labels)
    total = sum(sum(w is not None for w in e["word_ids"]) for e in examples)
    assert masked / total == pytest.approx(0.15, abs=0.03)
    selected = labels != -100
    original = padded_originals(tokenizer, examples, labels.shape[1])
    assert torch.equal(labels[selected], original[selected])
    assert (batch["input_ids"][selected] == tokenizer.mask_token_id).all()  # transformers: whole words all [MASK]

    torch.manual_seed(4)
    capped = DataCollatorForCappedMLM(tokenizer, whole_word_mask=True, max_masked_tokens=8)(examples)["labels"]
    assert_whole_words(examples, capped, cap=8)
    assert not ((capped != -100) & (labels == -100)).any()


def test_whole_words_fill_the_cap_exactly(bert):
    # Every token its own word, nearly all of them chosen: each row keeps exactly `cap` words, up to the last that fits.
    examples = synthetic_batch(bert, rows=32, max_len=40)
    for example in examples:
        example["word_ids"] = [None, *range(len(example["input_ids"]) - 2), None]
    torch.manual_seed(6)
    collator = DataCollatorForCappedMLM(bert, mlm_probability=0.9, whole_word_mask=True, max_masked_tokens=8)
    masked = collator(examples)["labels"] != -100
    assert masked.sum(1).tolist() == [8] * len(examples)


def test_whole_word_evaluation_collator_keeps_whole_words_uncapped(bert, documents):
    examples = tokenized_with_word_ids(bert, documents[:50])
    training = DataCollatorForCappedMLM(bert, mlm_probability=0.9, whole_word_mask=True, max_masked_tokens=8)
    evaluation = dataclasses.replace(training, max_masked_tokens=None)
    assert evaluation.whole_word_mask and not training.random_replace_prob  # transformers: every word [MASK]
    labels = evaluation(examples)["labels"]
    assert_whole_words(examples, labels)
    assert (labels != -100).sum(1).max() > 8


def test_wordpiece_boundaries_without_word_ids(bert, documents):
    examples = tokenized_with_word_ids(bert, documents[:50])
    collator = DataCollatorForCappedMLM(bert, whole_word_mask=True)
    torch.manual_seed(5)
    with_ids = collator(examples)["labels"]
    torch.manual_seed(5)
    from_pieces = collator([{k: v for k, v in e.items() if k != "word_ids"} for e in examples])["labels"]
    assert torch.equal(with_ids, from_pieces)


def test_whole_words_without_word_ids_need_wordpiece(roberta_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(roberta_tokenizer_dir)
    ids = tokenizer("a b c")["input_ids"]
    for examples in ([{"input_ids": ids}], [ids]):
        with pytest.raises(ValueError, match="word_ids"):
            DataCollatorForCappedMLM(tokenizer, whole_word_mask=True)(examples)


def test_evaluation_copy_does_not_repeat_the_whole_word_warning(bert):
    with pytest.warns(UserWarning, match="Random token replacement"):
        training = DataCollatorForCappedMLM(bert, whole_word_mask=True, max_masked_tokens=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the copy gets mask_replace_prob=1 from the training collator: no warning
        dataclasses.replace(training, max_masked_tokens=None)


class QuadraticWholeWords(DataCollatorForCappedMLM):
    """The previous whole-word path, as the reference: offsets as per-row Python lists of pairs, and transformers'
    own [B, L, L] same-word comparison."""

    def torch_call(self, examples):
        longest = max(len(example["input_ids"]) for example in examples)
        multiple = self.pad_to_multiple_of or 1
        length = -(-longest // multiple) * multiple
        rows = []
        for example in examples:
            if example.get("word_ids") is not None:
                words = torch.tensor([-1 if word is None else word for word in example["word_ids"]])
            else:
                words = (~self._continuation_flags()[torch.tensor(example["input_ids"])]).long().cumsum(dim=0)
            starts = torch.arange(len(words)) + words
            offsets = torch.stack([starts, starts + 1], dim=1)
            padding = torch.zeros(length - len(words), 2, dtype=torch.long)
            pieces = (padding, offsets) if self.tokenizer.padding_side == "left" else (offsets, padding)
            rows.append({**{key: value for key, value in example.items() if key != "word_ids"},
                         "offset_mapping": torch.cat(pieces).tolist()})
        return DataCollatorForLanguageModeling.torch_call(self, rows)

    def _whole_word_mask(self, word_ids, mask):
        selected = torch.as_tensor(DataCollatorForLanguageModeling._whole_word_mask(word_ids, mask))
        return self._within_cap(selected, torch.as_tensor(word_ids)).numpy()


def test_whole_word_hook_matches_the_parents(bert):
    collator = DataCollatorForCappedMLM(bert, whole_word_mask=True)  # uncapped: the hook is the parent's selection
    generator = torch.Generator().manual_seed(0)
    for rows, length in [(1, 1), (3, 7), (8, 64), (2, 500)]:
        word_ids = torch.randint(-1, length + 1, (rows, length), generator=generator).numpy()  # any order, 0 and -1
        mask = torch.rand(rows, length, generator=generator) < 0.3  # also on -1, which the parent ignores
        expected = DataCollatorForLanguageModeling._whole_word_mask(word_ids, mask)
        assert (collator._whole_word_mask(word_ids, mask) == expected).all()


def random_word_ids(length, generator):
    """None, words of 1-4 pieces (a None between segments now and then), None."""
    words, word = [], 0
    while len(words) < length - 2:
        if torch.rand(1, generator=generator) < 0.03:
            words.append(None)
        words.extend([word] * int(torch.randint(1, 5, (1,), generator=generator)))
        word += 1
    return [None, *words[:length - 2], None]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_whole_words_match_the_quadratic_reference(wordpiece_tokenizer_dir, padding_side):
    # Same seed, same masks and replacements as the previous implementation, with and without a word_ids column.
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir, padding_side=padding_side)
    generator = torch.Generator().manual_seed(0)
    for trial in range(24):
        rows, max_len = [(1, 9), (4, 40), (16, 128), (3, 300)][trial % 4]
        examples = synthetic_batch(tokenizer, rows=rows, max_len=max_len, seed=trial, full=trial % 5 == 0)
        for example in examples:
            example["word_ids"] = random_word_ids(len(example["input_ids"]), generator)
            if trial % 3 == 0:
                example["special_tokens_mask"] = [int(word is None) for word in example["word_ids"]]
        options = dict(mlm_probability=[0.15, 0.5, 0.9][trial % 3], max_masked_tokens=[None, "auto", 3][trial % 3],
                       pad_to_multiple_of=[None, 8][trial % 2], whole_word_mask=True, seed=trial)
        without_word_ids = [{key: value for key, value in e.items() if key != "word_ids"} for e in examples]
        new, reference = DataCollatorForCappedMLM(tokenizer, **options), QuadraticWholeWords(tokenizer, **options)
        for batch in (examples, without_word_ids, examples):  # the generators run on from call to call
            expected = reference(batch)
            got = new(batch)
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[key], expected[key]) for key in got)
        as_lists = new([e["input_ids"] for e in examples])  # lists of ids: "##" pieces, as dicts without word_ids
        expected = reference([{"input_ids": e["input_ids"]} for e in examples])
        assert torch.equal(as_lists["input_ids"], expected["input_ids"])
        assert torch.equal(as_lists["labels"], expected["labels"])


# ----------------------------------------------------------------------------------------------- NSP pairs

def synthetic_documents(count=60, seed=0):
    """Documents of 10-30 sentences of 4-20 tokens; every token id is unique, so its document and place are known."""
    generator = torch.Generator().manual_seed(seed)
    documents, where, next_id = [], {}, 10
    for d in range(count):
        document, position = [], 0
        for _ in range(int(torch.randint(10, 31, (1,), generator=generator))):
            length = int(torch.randint(4, 21, (1,), generator=generator))
            document.append(list(range(next_id, next_id + length)))
            for token in document[-1]:
                where[token] = (d, position, token - next_id, length)  # document, place, place in sentence, length
                position += 1
            next_id += length
        documents.append(document)
    return documents, where


def split_pair(input_ids, token_type_ids):
    assert input_ids[0] == CLS and input_ids[-1] == SEP
    a_end = input_ids.index(SEP)
    assert token_type_ids == [0] * (a_end + 1) + [1] * (len(input_ids) - a_end - 1)
    return input_ids[1:a_end], input_ids[a_end + 1:-1]


def test_nsp_pairs_follow_the_bert_recipe():
    documents, where = synthetic_documents()
    pairs = build_nsp_pairs(documents, 64, CLS, SEP, seed=7)
    labels = pairs["next_sentence_label"]
    assert len(labels) > 300
    # About half: a one-sentence chunk always takes a random B, as in BERT's recipe, so slightly fewer.
    assert 0.35 < labels.count(0) / len(labels) < 0.55
    always_next = build_nsp_pairs(documents, 64, CLS, SEP, nsp_probability=0.0, seed=7)["next_sentence_label"]
    assert always_next.count(0) / len(always_next) > 0.85
    trimmed_front = trimmed_back = 0
    for input_ids, types, mask, label in zip(pairs["input_ids"], pairs["token_type_ids"], pairs["attention_mask"],
                                             labels):
        assert len(input_ids) <= 64 and mask == [1] * len(input_ids)
        tokens_a, tokens_b = split_pair(input_ids, types)
        assert tokens_a and tokens_b
        places_a, places_b = [where[t] for t in tokens_a], [where[t] for t in tokens_b]
        for places in (places_a, places_b):  # each segment is one contiguous run of one document
            assert len({place[0] for place in places}) == 1
            assert [place[1] for place in places] == list(range(places[0][1], places[0][1] + len(places)))
        trimmed_front += places_a[0][2] != 0 or places_b[0][2] != 0
        trimmed_back += places_a[-1][2] != places_a[-1][3] - 1 or places_b[-1][2] != places_b[-1][3] - 1
        if label == 0:  # the actual continuation: same document, after A
            assert places_a[0][0] == places_b[0][0] and places_b[0][1] > places_a[-1][1]
        else:
            assert places_a[0][0] != places_b[0][0]
    assert trimmed_front > 20 and trimmed_back > 20  # the longer segment loses tokens at either end


def test_a_pair_without_another_document_to_draw_from_is_labelled_as_the_actual_next():
    # One document: no random B can be drawn, so every pair takes its actual continuation and is labelled 0.
    documents, where = synthetic_documents(count=1)
    pairs = build_nsp_pairs(documents, 64, CLS, SEP, nsp_probability=0.9, seed=4)
    assert len(pairs["next_sentence_label"]) >= 3 and set(pairs["next_sentence_label"]) == {0}
    for input_ids, types in zip(pairs["input_ids"], pairs["token_type_ids"]):
        tokens_a, tokens_b = split_pair(input_ids, types)
        assert where[tokens_b[0]][1] > where[tokens_a[-1]][1]  # B follows A


def test_nsp_pairs_are_deterministic_per_seed():
    documents, _ = synthetic_documents()
    assert build_nsp_pairs(documents, 64, CLS, SEP, seed=1) == build_nsp_pairs(documents, 64, CLS, SEP, seed=1)
    assert build_nsp_pairs(documents, 64, CLS, SEP, seed=1) != build_nsp_pairs(documents, 64, CLS, SEP, seed=2)


def test_short_sequences_are_drawn_with_short_seq_prob():
    documents, _ = synthetic_documents()

    def mean_length(probability):
        pairs = build_nsp_pairs(documents, 64, CLS, SEP, short_seq_prob=probability, seed=3)["input_ids"]
        return sum(map(len, pairs)) / len(pairs)

    assert mean_length(1.0) < 0.8 * mean_length(0.0)


def test_nsp_needs_room_for_two_segments():
    with pytest.raises(ValueError, match="max_seq_length"):
        build_nsp_pairs([[[10, 11]]], 4, CLS, SEP)


def test_nsp_builder_is_independent_of_batching_and_processes(bert, documents):
    dataset = datasets.Dataset.from_dict({"text": documents[:120]})
    builder = nsp_pair_builder(bert, 96, seed=11, corpus=dataset["text"])
    options = dict(batched=True, with_indices=True, remove_columns=["text"], load_from_cache_file=False)
    single = dataset.map(builder, batch_size=1000, **options)
    parallel = dataset.map(builder, batch_size=7, num_proc=2, **options)
    assert len(single) > 120 and single.to_dict() == parallel.to_dict()
    assert max(map(len, single["input_ids"])) <= 96
    within_batch = dataset.map(nsp_pair_builder(bert, 96, seed=11), batch_size=1000, **options)
    assert within_batch.to_dict() == single.to_dict()  # one batch holding the whole corpus draws from the same pool


# ----------------------------------------------------------------------------------------------- text helpers

def test_split_sentences():
    text = ('Python 3.8 was released. It is "fast." See e.g. the FAQ, by G. van Rossum! Really?\n'
            "A new paragraph")
    assert split_sentences(text) == ["Python 3.8 was released.", 'It is "fast."',
                                     "See e.g. the FAQ, by G. van Rossum!", "Really?", "A new paragraph"]


def test_read_text_documents_splits_on_blank_lines(corpus_dir, documents, tmp_path):
    raw = (corpus_dir / "train.txt").read_text(encoding="utf-8")
    assert len(documents) == raw.count("\n\n") + 1
    path = tmp_path / "docs.txt"
    path.write_text("First line.\nSecond line.\n\n\n  \nOther document.\n")
    assert read_text_documents(path) == ["First line.\nSecond line.", "Other document."]


# ----------------------------------------------------------------------------------------------- PLM

def test_plm_collator_pads_to_even_length_with_attention_mask(unigram_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(unigram_tokenizer_dir)
    encoded = tokenizer(["The interpreter reads a line.", "Short.", "Modules hold definitions and statements."])
    examples = [{key: encoded[key][i] for key in encoded} for i in range(3)]
    lengths = [len(e["input_ids"]) for e in examples]
    assert max(lengths) % 2 == 1  # the upstream collator refuses this batch
    with pytest.raises(ValueError, match="even"):
        DataCollatorForPermutationLanguageModeling(tokenizer)(examples)

    torch.manual_seed(0)
    batch = DataCollatorForPLM(tokenizer)(examples)
    length = batch["input_ids"].shape[1]
    assert length == max(lengths) + 1
    assert batch["perm_mask"].shape == batch["target_mapping"].shape == (3, length, length)
    for row, real in enumerate(lengths):  # left padding, masked out, never a target
        assert batch["attention_mask"][row].tolist() == [0] * (length - real) + [1] * real
        assert (batch["labels"][row, :length - real] == -100).all()
    assert (batch["labels"] != -100).any()
    model = XLNetLMHeadModel(XLNetConfig(vocab_size=len(tokenizer), d_model=16, n_layer=1, n_head=2, d_inner=32))
    assert torch.isfinite(model(**batch).loss)
