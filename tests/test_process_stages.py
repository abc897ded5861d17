"""Pipeline stages across processes (ipu_train/pipeline/process_stages.py), on CPU with gloo: the losses of tiny GPT-2,
BERT (pretraining and masked LM), RoBERTa, XLM-RoBERTa and DistilBERT masked LM and XLNet permutation LM models
trained through GPipe, 1F1B and interleaved 1F1B schedules equal those of the whole model trained in this process
with gradient accumulation over the same micro-batches; the tied embedding stays equal on the first and last stage;
a stage's process holds only its own weights; a dead stage ends the rest.

Each spawn starts its processes once and runs several scenarios in them (process start-up dominates on 2 cores)."""
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

from ipu_train.config import IPUConfig
from ipu_train.pipeline.process_stages import (
    PipelineRanks, build_process_pipeline, build_stage_module, new_pipeline_groups, pipeline_train_step,
    stage_plan_for)

STEPS, MICRO_BATCHES, MICRO_BATCH, SEQ, VOCAB = 10, 4, 2, 16, 128
LEARNING_RATE = 3e-3
TOLERANCE = 1e-5
TIED_KEYS = {"gpt2": ("transformer.wte.weight", "lm_head.weight"),
             "bert": ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"),
             "bert-mlm": ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"),
             "roberta": ("roberta.embeddings.word_embeddings.weight", "lm_head.decoder.weight"),
             "xlm-roberta": ("roberta.embeddings.word_embeddings.weight", "lm_head.decoder.weight"),
             "distilbert": ("distilbert.embeddings.word_embeddings.weight", "vocab_projector.weight"),
             "xlnet": ("transformer.word_embedding.weight", "lm_loss.weight")}
FAMILIES = tuple(TIED_KEYS)


# --- models and data ---------------------------------------------------------------------------------------------


def tiny_config(family):
    if family == "gpt2":
        return transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                       bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0)
    if family == "xlnet":  # weights larger than the default, so that the masks and segments change the loss
        return transformers.XLNetConfig(n_layer=4, d_model=32, n_head=2, d_inner=64, vocab_size=VOCAB, dropout=0.0,
                                        initializer_range=0.3)
    encoder = dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "roberta":  # positions start after the padding index 1
        return transformers.RobertaConfig(max_position_embeddings=SEQ + 2, pad_token_id=1, **encoder)
    if family == "xlm-roberta":
        return transformers.XLMRobertaConfig(max_position_embeddings=SEQ + 2, pad_token_id=1, **encoder)
    if family == "distilbert":
        return transformers.DistilBertConfig(n_layers=4, dim=32, n_heads=2, hidden_dim=64, vocab_size=VOCAB,
                                             max_position_embeddings=SEQ, dropout=0.0, attention_dropout=0.0)
    return transformers.BertConfig(max_position_embeddings=SEQ, **encoder)


def model_class(family):
    return {"gpt2": transformers.GPT2LMHeadModel, "bert": transformers.BertForPreTraining,
            "bert-mlm": transformers.BertForMaskedLM, "roberta": transformers.RobertaForMaskedLM,
            "xlm-roberta": transformers.XLMRobertaForMaskedLM, "distilbert": transformers.DistilBertForMaskedLM,
            "xlnet": transformers.XLNetLMHeadModel}[family]


def save_tiny_model(family, directory):
    torch.manual_seed(11)
    model_class(family)(tiny_config(family)).save_pretrained(directory)


def micro_batch(family, generator):
    """Random tokens; the second row ends in padding (the attention mask must reach every stage)."""
    input_ids = torch.randint(5, VOCAB, (MICRO_BATCH, SEQ), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    if family == "gpt2":
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    masked = (torch.rand(input_ids.shape, generator=generator) < 0.3) & (attention_mask == 1)
    masked[:, 0] = True  # at least one masked token per row
    batch = {"input_ids": input_ids.masked_fill(masked, 4), "attention_mask": attention_mask,
             "labels": input_ids.masked_fill(~masked, -100)}
    if family == "xlnet":
        batch.update(permutation_inputs(masked, generator))
    if family == "bert":
        batch.update(token_type_ids=segments(), next_sentence_label=torch.randint(0, 2, (MICRO_BATCH,),
                                                                                  generator=generator))
    return batch


def segments():
    return (torch.arange(SEQ) >= SEQ // 2).long().expand(MICRO_BATCH, SEQ).clone()


def permutation_inputs(masked, generator):
    """XLNet's: the masked tokens are predicted in a random order, each seeing the unmasked tokens and the masked
    ones earlier in that order; one prediction per position."""
    order = torch.rand(masked.shape, generator=generator)
    perm_mask = ((order[:, None, :] >= order[:, :, None]) & masked[:, None, :]).float()
    return {"perm_mask": perm_mask, "target_mapping": torch.eye(SEQ).expand(MICRO_BATCH, SEQ, SEQ).clone()}


def training_data(family, replicas):
    """Per optimizer step, the micro-batches of all replicas (replica r takes the r-th run of MICRO_BATCHES): the
    same each step, so that the loss falls fast and a pipeline that does not train shows."""
    generator = torch.Generator().manual_seed(5)
    micro_batches = [micro_batch(family, generator) for _ in range(MICRO_BATCHES * replicas)]
    return [micro_batches] * STEPS


def reference_run(family, model_dir, replicas=1):
    """The whole model in this process: gradient accumulation over every micro-batch of a step, mean loss."""
    model = model_class(family).from_pretrained(model_dir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    losses = []
    for micro_batches in training_data(family, replicas):
        total = 0.0
        for batch in micro_batches:
            loss = model(**batch).loss / len(micro_batches)
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    return losses, model.get_input_embeddings().weight.detach().clone()


# --- the processes -----------------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_gloo(rank, world, port, timeout_s=60):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def run_scenario(rank, world, scenario, model_dir):
    """Train one scenario's stages on this rank; what the tests compare."""
    family, layers_per_ipu = scenario["family"], scenario["layers_per_ipu"]
    replicas = scenario.get("replicas", 1)
    config, class_name = tiny_config(family), model_class(family).__name__
    plan = stage_plan_for(config, IPUConfig(layers_per_ipu=layers_per_ipu), class_name)
    ranks = PipelineRanks(rank=rank, ranks_per_pipeline=world // replicas, replicas=replicas,
                          num_stages=len(plan.stages))
    groups = new_pipeline_groups(ranks)
    modules = [build_stage_module(config, plan, index, weights=model_dir, model_class=class_name)
               for index in ranks.stage_indices]
    for module in modules:
        module.train()
    pipeline = build_process_pipeline(ranks, groups, modules, MICRO_BATCHES, schedule=scenario["schedule"])
    optimizer = torch.optim.AdamW(pipeline.parameters(), lr=LEARNING_RATE)
    losses = []
    for step, micro_batches in enumerate(training_data(family, replicas)):
        mine = micro_batches[ranks.replica * MICRO_BATCHES:(ranks.replica + 1) * MICRO_BATCHES]
        losses.append(pipeline_train_step(pipeline, mine).item())
        optimizer.step()
        optimizer.zero_grad()
        if (rank, step) == scenario.get("crash_at"):
            os._exit(3)  # a crash: no shutdown, no goodbye to the other ranks
    return {"losses": losses, "stages": ranks.stage_indices,
            "tied": {name: param.detach().clone() for module in modules
                     for name, param in module.named_parameters() if name.removeprefix("model.") in TIED_KEYS[family]},
            "parameters": [name for module in modules for name, _ in module.named_parameters()],
            "devices": sorted({str(p.device) for module in modules for p in module.parameters()})}


def worker(rank, world, port, scenarios, model_dirs, out_dir):
    init_gloo(rank, world, port)
    for number, scenario in enumerate(scenarios):
        result = run_scenario(rank, world, scenario, model_dirs[scenario["family"]])
        torch.save(result, os.path.join(out_dir, f"{number}-{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def spawn(world, scenarios, model_dirs, out_dir):
    """Per scenario, the results of each rank."""
    mp.spawn(worker, args=(world, free_port(), scenarios, model_dirs, str(out_dir)), nprocs=world, join=True)
    return [[torch.load(os.path.join(out_dir, f"{n}-{r}.pt")) for r in range(world)] for n in range(len(scenarios))]


# --- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for family in FAMILIES:
        dirs[family] = str(tmp_path_factory.mktemp(family))
        save_tiny_model(family, dirs[family])
    return dirs


@pytest.fixture(scope="module")
def references(model_dirs):
    """(family, replicas) -> reference_run's result, each run once when a test first asks for it."""
    runs = {}

    def reference(family, replicas):
        if (family, replicas) not in runs:
            runs[(family, replicas)] = reference_run(family, model_dirs[family], replicas)
        return runs[(family, replicas)]

    return reference


TWO_STAGES = [
    {"family": "gpt2", "layers_per_ipu": [2, 2], "schedule": "gpipe"},
    {"family": "gpt2", "layers_per_ipu": [2, 2], "schedule": "1f1b"},
    {"family": "bert", "layers_per_ipu": [2, 2], "schedule": "gpipe"},
    {"family": "bert", "layers_per_ipu": [2, 2], "schedule": "1f1b"},
    {"family": "gpt2", "layers_per_ipu": [1, 1, 1, 1], "schedule": "interleaved_1f1b"},  # 2 virtual stages a rank
    *({"family": family, "layers_per_ipu": [2, 2], "schedule": schedule}
      for family in ("bert-mlm", "roberta", "xlnet") for schedule in ("gpipe", "1f1b")),
    *({"family": family, "layers_per_ipu": [2, 2], "schedule": "1f1b"} for family in ("xlm-roberta", "distilbert")),
]


@pytest.fixture(scope="module")
def two_stage_results(model_dirs, tmp_path_factory):
    return spawn(2, TWO_STAGES, model_dirs, tmp_path_factory.mktemp("two_stages"))


def assert_losses_close(pipeline_losses, reference_losses):
    assert len(pipeline_losses) == len(reference_losses) == STEPS
    worst = max(abs(p - r) / abs(r) for p, r in zip(pipeline_losses, reference_losses))
    assert worst <= TOLERANCE, f"relative loss difference {worst:.2e}: {pipeline_losses} vs {reference_losses}"
    assert reference_losses[-1] < 0.9 * reference_losses[0]  # it trained: the comparison is not of constants


# --- tests -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("number", range(len(TWO_STAGES)),
                         ids=[f"{s['family']}-{s['schedule']}" for s in TWO_STAGES])
def test_two_stage_losses_equal_one_process_with_accumulation(two_stage_results, references, number):
    family = TWO_STAGES[number]["family"]
    reference_losses, _ = references(family, 1)
    for rank_result in two_stage_results[number]:  # every rank logs the loss the last stage computed
        assert_losses_close(rank_result["losses"], reference_losses)


@pytest.mark.parametrize("number", range(len(TWO_STAGES)),
                         ids=[f"{s['family']}-{s['schedule']}" for s in TWO_STAGES])
def test_tied_weight_equal_on_first_and_last_stage(two_stage_results, references, number):
    family = TWO_STAGES[number]["family"]
    embedding_key, head_key = TIED_KEYS[family]
    first, last = two_stage_results[number]
    if 0 not in first["stages"]:
        first, last = last, first
    embedding, head = first["tied"][f"model.{embedding_key}"], last["tied"][f"model.{head_key}"]
    assert torch.equal(embedding, head)
    _, reference_embedding = references(family, 1)
    torch.testing.assert_close(embedding, reference_embedding, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("number", [0, 2], ids=["gpt2", "bert"])
def test_the_second_stage_holds_only_its_layers_and_the_head(two_stage_results, number):
    family = TWO_STAGES[number]["family"]
    stage0, stage1 = two_stage_results[number]
    layer_prefix = "model.transformer.h." if family == "gpt2" else "model.bert.encoder.layer."
    layers_of = lambda result: {name[len(layer_prefix):].split(".")[0]  # noqa: E731
                                for name in result["parameters"] if name.startswith(layer_prefix)}
    assert layers_of(stage0) == {"0", "1"} and layers_of(stage1) == {"2", "3"}
    embedding_module = TIED_KEYS[family][0].rpartition(".")[0]
    assert not any(name.startswith(f"model.{embedding_module}") for name in stage1["parameters"])
    assert any(name == f"model.{TIED_KEYS[family][1]}" for name in stage1["parameters"])  # the tied copy
    assert stage0["devices"] == stage1["devices"] == ["cpu"]  # materialised: nothing left on the meta device


TWO_REPLICAS = [
    {"family": "gpt2", "layers_per_ipu": [2, 2], "schedule": "1f1b", "replicas": 2},
    {"family": "bert", "layers_per_ipu": [2, 2], "schedule": "gpipe", "replicas": 2},
]


@pytest.fixture(scope="module")
def two_replica_results(model_dirs, tmp_path_factory):
    return spawn(4, TWO_REPLICAS, model_dirs, tmp_path_factory.mktemp("replicas"))


@pytest.mark.parametrize("number", range(len(TWO_REPLICAS)),
                         ids=[f"{s['family']}-{s['schedule']}" for s in TWO_REPLICAS])
def test_two_stages_by_two_replicas_equal_one_process(two_replica_results, references, number):
    """4 processes: replica r on ranks 2r, 2r + 1; each stage's gradients averaged with the other replica's."""
    results = two_replica_results[number]
    family = TWO_REPLICAS[number]["family"]
    reference_losses, reference_embedding = references(family, 2)
    for rank_result in results:
        assert_losses_close(rank_result["losses"], reference_losses)
    embedding_key, head_key = TIED_KEYS[family]
    copies = [r["tied"][f"model.{key}"] for r, key in zip(results, (embedding_key, head_key, embedding_key, head_key))]
    assert all(torch.equal(copy, copies[0]) for copy in copies[1:])  # both stages of both replicas
    torch.testing.assert_close(copies[0], reference_embedding, rtol=1e-4, atol=1e-5)


def test_a_crashed_stage_ends_the_other_within_a_minute(model_dirs, tmp_path):
    """Rank 1 dies in the middle of training; rank 0, waiting on it inside the schedule, must fail, not hang."""
    scenario = {"family": "gpt2", "layers_per_ipu": [2, 2], "schedule": "1f1b", "crash_at": (1, 2)}
    context = mp.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=worker, args=(rank, 2, port, [scenario], model_dirs, str(tmp_path)))
                 for rank in range(2)]
    for process in processes:
        process.start()
    processes[1].join(timeout=120)
    crashed = time.monotonic()
    processes[0].join(timeout=60)
    waited = time.monotonic() - crashed
    alive = processes[0].is_alive()
    for process in processes:
        if process.is_alive():
            process.kill()
    assert processes[1].exitcode == 3
    assert not alive, "the surviving stage still runs a minute after the other crashed"
    assert processes[0].exitcode != 0 and waited < 60


# --- in one process: the pieces the spawned tests run ------------------------------------------------------------


def test_ranks_loop_virtual_stages_and_keep_each_replica_contiguous():
    ranks = [PipelineRanks(rank=r, ranks_per_pipeline=2, replicas=2, num_stages=4) for r in range(4)]
    assert [r.stage_indices for r in ranks] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r.replica for r in ranks] == [0, 0, 1, 1]
    assert [r.last_stage_rank() for r in ranks] == [1, 1, 3, 3]
    with pytest.raises(ValueError, match="multiple"):
        PipelineRanks(rank=0, ranks_per_pipeline=2, replicas=1, num_stages=3)


@pytest.mark.parametrize("family, with_segments", [*((family, False) for family in FAMILIES), ("xlnet", True)])
def test_stages_chained_in_one_process_give_the_models_loss(model_dirs, family, with_segments):
    """Stage 0's output fed to stage 1 by hand, weights from an in-memory model: the model's own loss (XLNet's with
    and without segments: the model adds a segment term only for a batch with token_type_ids)."""
    model = model_class(family).from_pretrained(model_dirs[family])
    plan = stage_plan_for(model.config, IPUConfig(layers_per_ipu=[1, 3]), type(model).__name__)
    first, last = (build_stage_module(model, plan, index) for index in (0, 1))
    batch = micro_batch(family, torch.Generator().manual_seed(0))
    if with_segments:
        batch["token_type_ids"] = segments()
    inputs, side = first.stage_inputs(batch)
    loss = last.loss(last(*first(*inputs, **side), **side), last.loss_target(batch))
    torch.testing.assert_close(loss, model(**batch).loss, rtol=1e-6, atol=0)
    assert {p.data_ptr() for p in first.parameters()}.isdisjoint(p.data_ptr() for p in model.parameters())


def test_a_stage_names_each_weight_once_under_the_models_names(model_dirs):
    model = model_class("gpt2").from_pretrained(model_dirs["gpt2"])
    plan = stage_plan_for(model.config, IPUConfig(layers_per_ipu=[2, 2]))
    names = list(build_stage_module(model, plan, 1).state_dict())
    assert all(name.startswith("model.") and name[len("model."):] in model.state_dict() for name in names)
    assert "model.lm_head.weight" in names and not any(".h.0." in name or ".h.1." in name for name in names)


def test_a_head_the_stages_do_not_serve_is_refused():
    config = tiny_config("bert")
    with pytest.raises(ValueError, match="serve BertForPreTraining and BertForMaskedLM for model type 'bert', not "
                                         "BertForSequenceClassification"):
        build_stage_module(transformers.BertForSequenceClassification(config), stage_plan_for(config, IPUConfig()), 0)
