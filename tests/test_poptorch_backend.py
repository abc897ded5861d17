"""The IPU backend against the strict PopTorch double (tests/poptorch_double.py: PopTorch 3.4's names, argument
checks and refusals, each citing its source; the Poplar SDK is not installable here): the options of each mode,
blocks placed once per layout with the tied head on IPU 0, one loss per training executable, the two executables
taking the IPUs in turn, evaluation in static shapes with the padding left out, the loss of each output mode, the
seed set once, and PopTorch's optimizers."""
import importlib
import sys

import pytest
import torch

from ipu_train.config import IPUConfig

from ._trainer_fixtures import collate, tiny_gpt2, token_rows
from .poptorch_double import _BlockHook, make_strict_poptorch


IPU_MODULES = ("ipu_train.backends.poptorch", "ipu_train.backends.poptorch_serialization")  # they import poptorch


@pytest.fixture
def poptorch(monkeypatch):
    strict = make_strict_poptorch()
    monkeypatch.setitem(sys.modules, "poptorch", strict)
    for module in IPU_MODULES:
        monkeypatch.delitem(sys.modules, module, raising=False)
    yield strict
    for module in IPU_MODULES:
        sys.modules.pop(module, None)


def backend_module():
    return importlib.import_module("ipu_train.backends.poptorch")


def gpt2_pod16():
    return IPUConfig.from_pretrained("ipu_configs/gpt2").for_pod_type("pod16").update(
        gradient_accumulation_steps=16, seed=5, auto_loss_scaling=True, executable_cache_dir="/tmp/exe")


def test_training_options_follow_the_configuration(poptorch):
    opts = backend_module().build_options(gpt2_pod16(), training=True)
    assert (opts.replication_factor, opts.device_iterations, opts.Training.gradient_accumulation) == (4, 2, 16)
    assert opts.auto_round_num_ipus and opts.random_seed == 5
    assert opts.Training.accumulation_and_replication_reduction_type == poptorch.ReductionType.Mean
    assert opts.output_mode == poptorch.OutputMode.Final
    assert type(opts._execution_strategy) is poptorch.PipelinedExecution
    assert opts.available_memory_proportion == {0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25}
    popart = opts._Popart.options
    assert popart["automaticLossScalingSettings.enabled"] is True and popart["cachePath"] == "/tmp/exe"
    assert popart["enableStochasticRounding"] is True and popart["partialsTypeMatMuls"] == "half"
    assert opts.connection_type != poptorch.ConnectionType.Never
    location = opts.TensorLocations.location_optimizer  # optimizer state off chip, sharded over the 4 replicas
    assert location == {"onChip": 0, "useReplicatedTensorSharding": 1}
    # optimum-graphcore's PopART settings (ipu_configuration.py: _to_options)
    assert popart["saveInitializersToFile"] and popart["disableGradAccumulationTensorStreams"] is True
    assert popart["accumulateOuterFragmentSettings.schedule"] == 3  # OverlapMemoryOptimized
    assert popart["accumulateOuterFragmentSettings.excludedVirtualGraphs"] == ["0"]
    assert (popart["outlineThreshold"], popart["subgraphCopyingStrategy"]) == (10.0, 1)  # 1: JustInTime
    assert popart["patterns"] == {"TiedGather": True, "TiedGatherAccumulate": True,
                                  "UpdateInplacePrioritiesForIpu": True}
    assert popart["engineOptions"] == {"opt.useAutoloader": "true", "target.syncReplicasIndependently": "true"}
    assert "enableExplicitIR" not in popart


def test_inference_options_use_the_inference_layout_and_leave_the_seed_alone(poptorch):
    config = gpt2_pod16().update(inference_replication_factor=2, explicit_ir_inference=True)
    opts = backend_module().build_options(config, training=False, compile_only=True)
    assert (opts.replication_factor, opts.device_iterations, opts.Training.gradient_accumulation) == (2, 5, 1)
    assert opts.output_mode == poptorch.OutputMode.All
    assert type(opts._execution_strategy) is poptorch.ShardedExecution
    assert opts._Popart.options["enableStochasticRounding"] is False
    assert opts.connection_type == poptorch.ConnectionType.Never
    assert not opts.exists("random_seed")  # Options.randomSeed reseeds the host: the training options set it once
    assert opts._Popart.options["enableExplicitIR"] is True


def _blocks(model):
    """(module name, IPU) of every block, in module order."""
    return [(name, hook._ipu_id) for name, module in model.named_modules()
            for hook in module._forward_pre_hooks.values() if isinstance(hook, _BlockHook)]


def test_blocks_follow_each_layout_with_the_tied_head_on_ipu_0(poptorch):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=128, n_positions=64))
    config = IPUConfig(layers_per_ipu=[0, 2, 2], ipus_per_replica=3, inference_layers_per_ipu=[4],
                       inference_ipus_per_replica=1)
    place = backend_module().place_blocks
    stages, hooks = place(model, config, "training", recompute=True)
    assert stages == [1, 1, 2, 2] and len(hooks) == 4
    assert _blocks(model) == [("transformer.wte", 0), ("transformer.h.0", 1), ("transformer.h.1", 1),
                              ("transformer.h.2", 2), ("transformer.h.3", 2), ("lm_head", 0)]
    for handle in hooks:
        handle.remove()
    stages, hooks = place(model, config, "inference", recompute=False)  # a second placement: no "already assigned"
    assert stages == [0, 0, 0, 0] and hooks == []
    assert {ipu for _, ipu in _blocks(model)} == {0} and len(_blocks(model)) == 6


def test_albert_shared_layer_begins_one_block(poptorch):
    from transformers import AlbertConfig, AlbertForMaskedLM

    model = AlbertForMaskedLM(AlbertConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=2,
                                           intermediate_size=64, embedding_size=16, vocab_size=64))
    backend_module().place_blocks(model, IPUConfig(layers_per_ipu=[2, 2], ipus_per_replica=2), "training",
                                  recompute=False)
    shared = [name for name, _ in _blocks(model) if "albert_layer_groups" in name]
    assert shared == ["albert.encoder.albert_layer_groups.0"]


def _ipu_trainer(tmp_path, config=None, model=None, rows=None, eval_rows=5, collator=collate, **flags):
    from ipu_train.arguments import IPUTrainingArguments
    from ipu_train.trainer import IPUTrainer

    settings = dict(output_dir=str(tmp_path / "out"), device_type="ipu", per_device_train_batch_size=2,
                    per_device_eval_batch_size=2, max_steps=4, logging_steps=1, save_strategy="no", report_to="none",
                    disable_tqdm=True, loss_scaling=128.0)
    args = IPUTrainingArguments(**{**settings, **flags})
    config = config or IPUConfig(gradient_accumulation_steps=1, device_iterations=2, inference_device_iterations=2)
    rows = rows or token_rows(32)
    return IPUTrainer(model=model or tiny_gpt2(), ipu_config=config, args=args, data_collator=collator,
                      train_dataset=rows, eval_dataset=rows[:eval_rows])


def _pipelined():
    # 2 IPUs, the tied head back on IPU 0: 3 forward stages, so at least 2 x 3 - 1 = 5 micro-batches per step
    return IPUConfig(layers_per_ipu=[1, 1], ipus_per_replica=2, gradient_accumulation_steps=5, device_iterations=2,
                     inference_device_iterations=2)


def test_train_evaluate_and_train_again_on_a_pipelined_layout(poptorch, tmp_path):
    trainer = _ipu_trainer(tmp_path, _pipelined(), fp32=True, max_grad_norm=0.0)
    assert trainer.train().global_step == 4
    training = [e for e in poptorch._double.executors if e.training]
    assert len(training) == 1 and type(training[0].model).__name__ == "PoptorchLossOnly"
    assert type(trainer.model).__name__ == "GPT2LMHeadModel"  # saved with its own class name
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [2, 4]
    assert "eval_loss" in trainer.evaluate()  # the training executable gave the IPUs back
    assert not training[0].isAttachedToDevice()
    assert trainer.train().global_step == 4  # and takes them back; its blocks were not placed twice
    assert len([e for e in poptorch._double.executors if e.training]) == 1


def test_evaluation_pads_its_last_batch_and_leaves_the_padding_out(poptorch, tmp_path):
    from ipu_train.arguments import IPUTrainingArguments
    from ipu_train.trainer import IPUTrainer

    model = tiny_gpt2()
    rows = token_rows(32)
    on_ipu = _ipu_trainer(tmp_path, model=model, rows=rows, eval_rows=7, fp32=True)  # 7 rows, batches of 2 x 2
    args = IPUTrainingArguments(output_dir=str(tmp_path / "cpu"), device_type="cpu", per_device_eval_batch_size=7,
                                report_to="none", disable_tqdm=True)
    on_cpu = IPUTrainer(model=model, ipu_config=IPUConfig(), args=args, data_collator=collate, eval_dataset=rows[:7])
    ipu_metrics, cpu_metrics = on_ipu.evaluate(), on_cpu.evaluate()
    assert ipu_metrics["eval_loss"] == pytest.approx(cpu_metrics["eval_loss"], rel=1e-5)


def test_bert_pretraining_trains_as_one_loss(poptorch, tmp_path):
    from transformers import BertConfig, BertForPreTraining

    model = BertForPreTraining(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64))
    rows = [{**row, "next_sentence_label": i % 2} for i, row in enumerate(token_rows(32))]

    def pairs(batch):
        return {**collate(batch), "next_sentence_label": torch.tensor([row["next_sentence_label"] for row in batch])}
    trainer = _ipu_trainer(tmp_path, _pipelined(), model=model, rows=rows, collator=pairs, fp32=True,
                           max_grad_norm=0.0)
    assert trainer.train().global_step == 4  # MLM + NSP: identity_loss marks their sum as the one loss


@pytest.mark.parametrize("mode", ["all", "sum", "final"])
def test_each_output_mode_logs_the_loss_of_the_steps_it_returns(poptorch, tmp_path, mode):
    config = IPUConfig(gradient_accumulation_steps=2, device_iterations=2, output_mode=mode)
    rows = token_rows(32)
    model = tiny_gpt2()
    # 3 steps: a group of 2, then one of 1 (the device still runs 2); 4 micro-batches of 2 rows a group
    trainer = _ipu_trainer(tmp_path, config, model=model, rows=rows, fp32=True, learning_rate=0.0, max_steps=3,
                           max_grad_norm=0.0, train_sampling_strategy="sequential")
    logged = trainer.train().training_loss
    model.eval()  # the weights never change (learning rate 0)
    with torch.no_grad():
        losses = [model(**collate(rows[i:i + 2])).loss.item() for i in range(0, 16, 2)]
    first, second = losses[:4], losses[4:]
    if mode == "final":  # each group's last micro-batch stands for its last step
        expected = (first[-1] + second[-1]) / 2
    else:  # each group's mean stands for the steps the trainer counted in it
        expected = (2 * sum(first) / 4 + sum(second) / 4) / 3
    assert logged == pytest.approx(expected, rel=1e-5)


def test_evaluation_does_not_reseed_the_host(poptorch, tmp_path):
    trainer = _ipu_trainer(tmp_path, fp32=True, seed=5)
    states = []
    for seed in (1, 2):  # a reseed (to 5) would leave both evaluations with the same host state
        torch.manual_seed(seed)
        trainer.evaluate()
        states.append(torch.get_rng_state())
    assert not torch.equal(*states)


def test_the_model_is_wrapped_in_train_mode_and_evaluated_in_eval_mode(poptorch, tmp_path):
    trainer = _ipu_trainer(tmp_path, fp32=True, max_grad_norm=0.0)
    trainer.model.eval()  # as a model fresh from evaluation would be: PopTorch would compile it without dropout
    trainer.train()
    training = [e for e in poptorch._double.executors if e.training][0]
    assert all(training._trace.modes.values())  # every module traced in train mode
    trainer.model.train()
    trainer.evaluate()
    inference = [e for e in poptorch._double.executors if not e.training][0]
    assert not any(inference._trace.modes.values())


def test_the_trainer_takes_poptorchs_adamw_in_optimum_graphcores_precisions(poptorch, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="ipu_train"):
        trainer = _ipu_trainer(tmp_path)  # fp16 by default on IPU; --max_grad_norm left at transformers' 1.0
    assert "--max_grad_norm 1.0 is not applied on IPU" in caplog.text
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is poptorch.optim.AdamW
    assert (optimizer.loss_scaling, optimizer.bias_correction, optimizer.max_grad_norm) == (128.0, True, float("inf"))
    assert (optimizer.accum_type, optimizer.first_order_momentum_accum_type,
            optimizer.second_order_momentum_accum_type) == (torch.float16, torch.float16, torch.float32)
    backend = trainer.backend
    backend.prepare_model(trainer.model)
    backend.attach(optimizer, None)
    training = backend.executable("training")  # built, not compiled: fp16 accumulation sets PopTorch's Running mean
    assert training.options.Training.meanAccumulationAndReplicationReductionStrategy == \
        poptorch.MeanReductionStrategy.Running
    fp32 = _ipu_trainer(tmp_path, fp32=True, max_grad_norm=0.0).create_optimizer()
    assert fp32.accum_type == fp32.first_order_momentum_accum_type == torch.float32


def _cpu_runs_half_layer_norm():
    try:
        torch.nn.functional.layer_norm(torch.ones(2, 2, dtype=torch.float16), (2,))
        return True
    except RuntimeError:  # torch 2.0 (PopTorch's): no fp16 LayerNorm kernel on the CPU, where the double runs
        return False


@pytest.mark.skipif(not _cpu_runs_half_layer_norm(), reason="this torch has no fp16 LayerNorm on the CPU")
def test_lamb_without_bias_correction_and_fp16_by_default(poptorch, tmp_path):
    trainer = _ipu_trainer(tmp_path, lamb=True, lamb_no_bias_correction=True, compile_only=True)
    output = trainer.train()
    training = [e for e in poptorch._double.executors if e.training][0]
    assert training.isCompiled() and output.global_step == 0
    assert type(trainer.optimizer) is poptorch.optim.LAMB and trainer.optimizer.bias_correction is False
    assert trainer.optimizer.accum_type == torch.float16
    assert next(trainer.model.parameters()).dtype == torch.float16


def test_optim_sgd_runs_poptorchs_sgd_with_its_optim_args(poptorch, tmp_path):
    trainer = _ipu_trainer(tmp_path, optim="sgd", optim_args="momentum=0.9", learning_rate=0.1)
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is poptorch.optim.SGD
    assert optimizer.defaults["lr"] == 0.1 and optimizer.defaults["momentum"] == 0.9
    assert optimizer.loss_scaling == 128.0


def test_optim_rmsprop_runs_poptorchs_rmsprop(poptorch, tmp_path):
    optimizer = _ipu_trainer(tmp_path, optim="rmsprop").create_optimizer()
    assert type(optimizer) is poptorch.optim.RMSprop and optimizer.loss_scaling == 128.0


@pytest.mark.parametrize("name", ["adafactor", "adagrad"])
def test_an_optim_poptorch_does_not_offer_is_refused(poptorch, tmp_path, name):
    from ipu_train.errors import UserError

    with pytest.raises(UserError, match=rf"^--optim {name} is not supported \(IPUTrainer runs no .* on PopTorch\): "
                                        r"use one of adamw_torch, adamw_torch_fused, sgd, rmsprop, or --lamb$"):
        _ipu_trainer(tmp_path, optim=name).create_optimizer()


def test_serialized_embedding_and_projection_train_and_evaluate_as_the_plain_ones(poptorch, tmp_path):
    runs = []
    for serialized in (False, True):
        config = _pipelined()
        if serialized:  # training: parts on one IPU (a tied weight stays on IPU 0); evaluation: spread over two
            config.update(embedding_serialization_factor=2, projection_serialization_factor=3,
                          inference_layers_per_ipu=[1, 1], inference_ipus_per_replica=2,
                          inference_serialized_embedding_splits_per_ipu=[1, 1],
                          inference_serialized_projection_splits_per_ipu=[2, 1])
        trainer = _ipu_trainer(tmp_path / str(serialized), config, fp32=True, max_grad_norm=0.0, seed=3)
        trainer.train()
        runs.append(([e["loss"] for e in trainer.state.log_history if "loss" in e], trainer.evaluate()["eval_loss"]))
        model = trainer.model
        assert model.lm_head.weight is model.transformer.wte.weight
        trainer.backend.inference_model.detachFromDevice()  # the IPUs free for the next run, as a process's end does
    (plain_losses, plain_eval), (losses, eval_loss) = runs
    assert losses == pytest.approx(plain_losses, rel=1e-5) and eval_loss == pytest.approx(plain_eval, rel=1e-5)
    parts = [name for name, _ in _blocks(model) if ".parts." in name]
    assert parts == ["transformer.wte.parts.0", "transformer.wte.parts.1", "lm_head.parts.0", "lm_head.parts.2"]


def test_embedding_serialization_factor_splits_the_tied_head_as_in_optimum_graphcore(poptorch):
    model = tiny_gpt2()
    backend_module().place_blocks(model, IPUConfig(embedding_serialization_factor=4), "training", recompute=False)
    assert type(model.lm_head).__name__ == "SerializedProjection" and len(model.lm_head.parts) == 4
    assert type(model.transformer.wte) is torch.nn.Embedding  # the lookup stays whole without splits_per_ipu
    assert model.lm_head.weight is model.transformer.wte.weight


def test_compile_only_reads_one_combined_batch(poptorch, tmp_path):
    # 16 rows are one combined batch of micro-batch 2 x accumulation 8: a loader item is a whole group on IPU
    config = IPUConfig(gradient_accumulation_steps=8, device_iterations=1)
    trainer = _ipu_trainer(tmp_path, config, rows=token_rows(16), compile_only=True, fp32=True, max_grad_norm=0.0)
    assert trainer.train().global_step == 0
    assert [e for e in poptorch._double.executors if e.training][0].isCompiled()


def test_bf16_is_refused_on_ipu(poptorch, tmp_path):
    from ipu_train.arguments import IPUTrainingArguments
    from ipu_train.errors import UserError

    with pytest.raises(UserError, match=r"^--bf16: IPUs train in fp16 \(the default there\) or fp32"):
        IPUTrainingArguments(output_dir=str(tmp_path), device_type="ipu", bf16=True)


def test_evaluation_batches_suit_the_asynchronous_loader(poptorch, tmp_path):
    # python/_dataloader.py: the asynchronous loaders carry tensors only (the padding count included)
    trainer = _ipu_trainer(tmp_path, fp32=True, eval_rows=7, dataloader_mode="async")
    assert "eval_loss" in trainer.evaluate()
