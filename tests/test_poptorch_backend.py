"""The IPU backend against a recording double of the `poptorch` module (the Poplar SDK is not installable here):
the options it sets for training and inference, a BeginBlock per layer on its IPU, recomputation checkpoints, the
trainingModel wrapping with PopTorch's optimizer, and a whole IPUTrainer run through it."""
import importlib
import sys
import types

import pytest
import torch

from ipu_train.config import IPUConfig

from ._trainer_fixtures import collate, tiny_gpt2, token_rows


class Chain:
    """Records every method call made on it (under a dotted name) and returns itself, so calls can be chained."""

    def __init__(self, log, prefix=""):
        self._log, self._prefix = log, prefix

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self._log.append((self._prefix + name, args, kwargs))
            return self
        return call


class Options(Chain):
    def __init__(self):
        super().__init__([])
        self.Training = Chain(self._log, "Training.")
        self.TensorLocations = Chain(self._log, "TensorLocations.")
        self.Precision = Chain(self._log, "Precision.")

    def calls(self, name):
        return [args for called, args, _ in self._log if called == name]

    def value(self, name, default=1):
        found = self.calls(name)
        return found[-1][0] if found else default


def make_poptorch():
    fake = types.ModuleType("poptorch")
    fake.blocks, fake.checkpoints, fake.wrapped = [], [], []
    fake.Options = Options
    fake.ReductionType = types.SimpleNamespace(Mean="Mean", Sum="Sum")
    fake.OutputMode = types.SimpleNamespace(All="All", Sum="Sum", Final="Final", Default="Default")
    fake.AutoStage = types.SimpleNamespace(AutoIncrement="AutoIncrement")
    fake.DataLoaderMode = types.SimpleNamespace(Sync="Sync", Async="Async", AsyncRebatched="AsyncRebatched")
    fake.PipelinedExecution = lambda stage: ("PipelinedExecution", stage)
    fake.ShardedExecution = lambda: ("ShardedExecution",)
    fake.TensorLocationSettings = lambda: Chain(fake_settings, "")
    fake_settings = fake.settings = []

    def begin_block(module, user_id, ipu_id):
        fake.blocks.append((user_id, ipu_id))
        return module

    def recomputation_checkpoint(tensor):
        fake.checkpoints.append(tuple(tensor.shape))
        return tensor

    class TrainingModel:
        """Stands in for the device: one call runs device_iterations optimizer steps of GA micro-batches."""

        def __init__(self, model, options, optimizer):
            self.model, self.options, self.optimizer = model, options, optimizer
            self.set_optimizer_calls, self.compiled = 0, False

        def __call__(self, **batch):
            opts = self.options
            steps = opts.value("deviceIterations")
            micro = len(batch["input_ids"]) // steps
            losses = []
            for step in range(steps):
                rows = {k: v[step * micro:(step + 1) * micro] for k, v in batch.items()}
                loss = self.model(**rows).loss
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad()
                losses.append(loss.detach())
            return {"loss": torch.stack(losses)}

        def setOptimizer(self, optimizer):
            self.set_optimizer_calls += 1

        def compile(self, **batch):
            self.compiled = True

    def training_model(model, options, optimizer):
        wrapper = TrainingModel(model, options, optimizer)
        fake.wrapped.append(("trainingModel", wrapper))
        return wrapper

    def inference_model(model, options):
        fake.wrapped.append(("inferenceModel", options))
        return lambda **batch: model(**batch)

    def data_loader(options, dataset, batch_size, shuffle, drop_last, collate_fn, num_workers, mode):
        factor = (options.value("replicationFactor") * options.value("deviceIterations")
                  * options.value("Training.gradientAccumulation"))
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size * factor, shuffle=shuffle,
                                           drop_last=drop_last, collate_fn=collate_fn)

    class AdamW(torch.optim.AdamW):
        def __init__(self, params, lr, betas, eps, loss_scaling, bias_correction, max_grad_norm):
            super().__init__(params, lr=lr, betas=betas, eps=eps)
            self.poptorch_kwargs = dict(loss_scaling=loss_scaling, bias_correction=bias_correction,
                                        max_grad_norm=max_grad_norm)

    class LAMB(torch.optim.AdamW):
        def __init__(self, params, lr, betas, eps, loss_scaling, bias_correction):
            super().__init__(params, lr=lr, betas=betas, eps=eps)
            self.poptorch_kwargs = dict(loss_scaling=loss_scaling, bias_correction=bias_correction)

    class SGD(torch.optim.SGD):
        def __init__(self, params, lr, loss_scaling, max_grad_norm, momentum=0.0, dampening=0.0, nesterov=False):
            super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov)
            self.poptorch_kwargs = dict(loss_scaling=loss_scaling, max_grad_norm=max_grad_norm)

    class RMSprop(torch.optim.RMSprop):  # PopTorch's takes no max_grad_norm
        def __init__(self, params, lr, loss_scaling, alpha=0.99, eps=1e-8, momentum=0.0, centered=False):
            super().__init__(params, lr=lr, alpha=alpha, eps=eps, momentum=momentum, centered=centered)
            self.poptorch_kwargs = dict(loss_scaling=loss_scaling)

    fake.BeginBlock = begin_block
    fake.recomputationCheckpoint = recomputation_checkpoint
    fake.trainingModel = training_model
    fake.inferenceModel = inference_model
    fake.DataLoader = data_loader
    fake.optim = types.SimpleNamespace(AdamW=AdamW, LAMB=LAMB, SGD=SGD, RMSprop=RMSprop)
    return fake


@pytest.fixture
def poptorch(monkeypatch):
    fake = make_poptorch()
    monkeypatch.setitem(sys.modules, "poptorch", fake)
    monkeypatch.delitem(sys.modules, "ipu_train.backends.poptorch", raising=False)
    yield fake
    sys.modules.pop("ipu_train.backends.poptorch", None)


def backend_module():
    return importlib.import_module("ipu_train.backends.poptorch")


def gpt2_pod16():
    return IPUConfig.from_pretrained("ipu_configs/gpt2").for_pod_type("pod16").update(
        gradient_accumulation_steps=8, seed=5, auto_loss_scaling=True, executable_cache_dir="/tmp/exe")


def test_training_options_follow_the_configuration(poptorch):
    opts = backend_module().build_options(gpt2_pod16(), training=True)
    assert opts.calls("replicationFactor") == [(4,)]
    assert opts.calls("autoRoundNumIPUs") == [(True,)]
    assert opts.calls("deviceIterations") == [(2,)]
    assert opts.calls("Training.gradientAccumulation") == [(8,)]
    assert opts.calls("Training.accumulationAndReplicationReductionType") == [("Mean",)]
    assert opts.calls("Training.setAutomaticLossScaling") == [(True,)]
    assert opts.calls("outputMode") == [("Final",)]
    assert opts.calls("randomSeed") == [(5,)]
    assert opts.calls("setExecutionStrategy") == [(("PipelinedExecution", "AutoIncrement"),)]
    assert opts.calls("setAvailableMemoryProportion") == [({"IPU0": 0.25, "IPU1": 0.25, "IPU2": 0.25, "IPU3": 0.25},)]
    assert opts.calls("enableExecutableCaching") == [("/tmp/exe",)]
    assert opts.calls("Precision.enableStochasticRounding") == [(True,)]
    assert opts.calls("Precision.setPartialsType") == [(torch.float16,)]
    assert opts.calls("useOfflineIpuTarget") == []
    # optimizer state off chip and sharded over the 4 replicas
    assert [(name, args) for name, args, _ in poptorch.settings] == [("useOnChipStorage", (False,)),
                                                                     ("useReplicatedTensorSharding", (True,))]


def test_inference_options_use_the_inference_layout(poptorch):
    config = gpt2_pod16().update(inference_replication_factor=2)
    opts = backend_module().build_options(config, training=False, compile_only=True)
    assert opts.calls("replicationFactor") == [(2,)]
    assert opts.calls("deviceIterations") == [(5,)]
    assert opts.calls("Training.gradientAccumulation") == []
    assert opts.calls("outputMode") == [("All",)]
    assert opts.calls("setExecutionStrategy") == [(("ShardedExecution",),)]
    assert opts.calls("Precision.enableStochasticRounding") == [(False,)]
    assert opts.calls("useOfflineIpuTarget") == [()]


def test_each_layer_begins_a_block_on_its_ipu_with_recompute_checkpoints(poptorch):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=128, n_positions=64))
    config = IPUConfig(layers_per_ipu=[0, 2, 2], ipus_per_replica=3)
    assert backend_module().annotate_stages(model, config, recompute=True) == [1, 1, 2, 2]
    assert poptorch.blocks == [("Embedding", 0), ("Layer0", 1), ("Layer1", 1), ("Layer2", 2), ("Layer3", 2)]
    model(input_ids=torch.zeros(1, 4, dtype=torch.long), use_cache=False)
    assert poptorch.checkpoints == [(1, 4, 32)] * 4


def _ipu_trainer(tmp_path, **flags):
    from ipu_train.arguments import IPUTrainingArguments
    from ipu_train.trainer import IPUTrainer

    args = IPUTrainingArguments(output_dir=str(tmp_path / "out"), device_type="ipu", per_device_train_batch_size=2,
                                per_device_eval_batch_size=2, max_steps=4, logging_steps=1, save_strategy="no",
                                report_to="none", disable_tqdm=True, loss_scaling=128.0, **flags)
    config = IPUConfig(gradient_accumulation_steps=1, device_iterations=2, inference_device_iterations=1)
    rows = token_rows(16)
    return IPUTrainer(model=tiny_gpt2(), ipu_config=config, args=args, data_collator=collate, train_dataset=rows,
                      eval_dataset=rows[:4])


def test_a_trainer_run_wraps_the_model_once_and_runs_one_call_per_group(poptorch, tmp_path):
    trainer = _ipu_trainer(tmp_path, fp32=True)
    output = trainer.train()
    assert output.global_step == 4
    training = [w for kind, w in poptorch.wrapped if kind == "trainingModel"]
    assert len(training) == 1 and training[0].model is trainer.model
    assert training[0].set_optimizer_calls == 2  # one learning-rate update per group of 2 steps
    assert training[0].optimizer.poptorch_kwargs == {"loss_scaling": 128.0, "bias_correction": True,
                                                     "max_grad_norm": 1.0}
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [2, 4]
    assert "eval_loss" in trainer.evaluate()
    assert [kind for kind, _ in poptorch.wrapped] == ["trainingModel", "inferenceModel"]


def test_lamb_without_bias_correction_and_fp16_by_default(poptorch, tmp_path):
    trainer = _ipu_trainer(tmp_path, lamb_no_bias_correction=True, compile_only=True, max_grad_norm=0.0)
    output = trainer.train()
    training = [w for kind, w in poptorch.wrapped if kind == "trainingModel"][0]
    assert training.compiled and output.global_step == 0
    assert training.optimizer.poptorch_kwargs == {"loss_scaling": 128.0, "bias_correction": False}
    assert next(trainer.model.parameters()).dtype == torch.float16


def test_optim_sgd_runs_poptorchs_sgd_with_its_optim_args(poptorch, tmp_path):
    trainer = _ipu_trainer(tmp_path, optim="sgd", optim_args="momentum=0.9", learning_rate=0.1)
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is poptorch.optim.SGD
    assert optimizer.defaults["lr"] == 0.1 and optimizer.defaults["momentum"] == 0.9
    assert optimizer.poptorch_kwargs == {"loss_scaling": 128.0, "max_grad_norm": 1.0}


def test_optim_rmsprop_runs_poptorchs_rmsprop_which_does_not_clip(poptorch, tmp_path):
    from ipu_train.errors import UserError

    with pytest.raises(UserError, match=r"^--max_grad_norm 1.0: PopTorch's RMSprop does not clip gradients: pass "
                                        r"--max_grad_norm 0, or --optim adamw_torch, adamw_torch_fused, sgd$"):
        _ipu_trainer(tmp_path, optim="rmsprop").create_optimizer()
    optimizer = _ipu_trainer(tmp_path, optim="rmsprop", max_grad_norm=0.0).create_optimizer()
    assert type(optimizer) is poptorch.optim.RMSprop and optimizer.poptorch_kwargs == {"loss_scaling": 128.0}


def test_lamb_with_gradient_clipping_is_refused_on_ipu(poptorch, tmp_path):
    from ipu_train.errors import UserError

    with pytest.raises(UserError, match="^--max_grad_norm 1.0: PopTorch's LAMB does not clip gradients"):
        _ipu_trainer(tmp_path, lamb=True).create_optimizer()


@pytest.mark.parametrize("name", ["adafactor", "adagrad"])
def test_an_optim_poptorch_does_not_offer_is_refused(poptorch, tmp_path, name):
    from ipu_train.errors import UserError

    with pytest.raises(UserError, match=rf"^--optim {name} is not supported \(IPUTrainer runs no .* on PopTorch\): "
                                        r"use one of adamw_torch, adamw_torch_fused, sgd, rmsprop, or --lamb$"):
        _ipu_trainer(tmp_path, optim=name).create_optimizer()
