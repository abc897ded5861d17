"""The strict PopTorch double (tests/poptorch_double.py) refuses what real PopTorch refuses, with PopTorch's
messages, and accepts the correct use: argument types and enums of the options, unknown attributes, a second
BeginBlock, a model wrapped twice, independent losses, too little gradient accumulation for the pipeline, a batch
that is not a multiple of the combined batch, weights shared across IPUs, a model in the wrong mode, and an
inference model while the training one holds the IPUs."""
import inspect
import re

import pytest
import torch
import torch.nn.functional as F

from .poptorch_double import OutputMode, make_strict_poptorch

VOCAB, WIDTH = 10, 4


@pytest.fixture
def poptorch():
    return make_strict_poptorch()


class Net(torch.nn.Module):
    """Embedding, two hidden layers and a head; `tied`: the head's weight is the embedding's."""

    def __init__(self, tied=False, losses=1):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.hidden = torch.nn.ModuleList([torch.nn.Linear(WIDTH, WIDTH) for _ in range(2)])
        self.head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        self.losses = losses

    def forward(self, x, labels):
        h = self.embed(x)
        for layer in self.hidden:
            h = torch.relu(layer(h))
        logits = self.head(h)
        if self.losses == 0:
            return logits
        loss = F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1))
        for _ in range(self.losses - 1):
            loss = loss + F.mse_loss(logits, torch.zeros_like(logits))
        return {"loss": loss, "logits": logits}


def batch(rows, seq=3):
    x = torch.arange(rows * seq).reshape(rows, seq) % VOCAB
    return {"x": x, "labels": x.clone()}


def place(poptorch, model, ipus=(0, 0, 1)):
    """The embedding and each hidden layer in a block on its IPU (the head follows the last block)."""
    poptorch.BeginBlock(model.embed, "Embedding", ipu_id=ipus[0])
    for index, layer in enumerate(model.hidden):
        poptorch.BeginBlock(layer, f"Layer{index}", ipu_id=ipus[index + 1])
    return model


def options(poptorch, accumulation=1, iterations=1, replicas=1, sharded=False):
    opts = poptorch.Options().deviceIterations(iterations).replicationFactor(replicas).autoRoundNumIPUs(True)
    opts.Training.gradientAccumulation(accumulation)
    strategy = poptorch.ShardedExecution() if sharded else poptorch.PipelinedExecution(
        poptorch.AutoStage.AutoIncrement)
    return opts.setExecutionStrategy(strategy)


def sgd(poptorch, model, lr=0.1):
    return poptorch.optim.SGD(model.parameters(), lr=lr)


# ----------------------------------------------------------------------------------------------------- options
def test_the_backends_option_calls_are_accepted_with_real_enums(poptorch):
    opts = poptorch.Options()
    opts.replicationFactor(4).autoRoundNumIPUs(True).deviceIterations(2)
    opts.Training.gradientAccumulation(8).accumulationAndReplicationReductionType(poptorch.ReductionType.Mean)
    opts.Training.setAutomaticLossScaling(True)
    opts.Training.setMeanAccumulationAndReplicationReductionStrategy(poptorch.MeanReductionStrategy.Running)
    opts.outputMode(poptorch.OutputMode.Final).randomSeed(5)
    opts.setExecutionStrategy(poptorch.PipelinedExecution(poptorch.AutoStage.AutoIncrement))
    opts.TensorLocations.setOptimizerLocation(
        poptorch.TensorLocationSettings().useOnChipStorage(False).useReplicatedTensorSharding(True))
    opts.useOfflineIpuTarget().setAvailableMemoryProportion({"IPU0": 0.25, "IPU1": 0.2})
    opts.enableExecutableCaching("/tmp/exe").Precision.enableStochasticRounding(True)
    opts.Precision.setPartialsType(torch.float16)
    opts._Popart.set("saveInitializersToFile", "weights.onnx")
    assert (opts.replication_factor, opts.device_iterations, opts.Training.gradient_accumulation) == (4, 2, 8)
    assert opts.output_mode == poptorch.OutputMode.Final.value == 0
    assert opts.available_memory_proportion == {0: 0.25, 1: 0.2}
    assert opts.connection_type == poptorch.ConnectionType.Never
    assert opts._Popart.options["cachePath"] == "/tmp/exe"
    assert opts._Popart.options["partialsTypeMatMuls"] == "half"
    assert opts._Popart.options["automaticLossScalingSettings.enabled"] is True
    assert [m.name for m in poptorch.DataLoaderMode] == ["Sync", "Async", "AsyncRebatched"]
    assert [m.name for m in poptorch.OutputMode] == ["Final", "EveryN", "All", "Sum", "Default"]


@pytest.mark.parametrize("call, error, message", [
    (lambda o: o.Training.gradientAccumulation(2.0), AssertionError,
     "Unexpected type <class 'float'> for option gradient_accumulation. Expected <class 'int'>"),
    (lambda o: o.deviceIterations("2"), AssertionError, "Unexpected type <class 'str'> for option device_iterations"),
    (lambda o: o.replicationFactor(None), AssertionError, "Unexpected type <class 'NoneType'>"),
    (lambda o: o.autoRoundNumIPUs(1), AssertionError, "Unexpected type <class 'int'> for option auto_round_num_ipus"),
    (lambda o: o.outputMode("Final"), AssertionError, ""),
    (lambda o: o.outputMode(OutputMode.EveryN), AssertionError,
     "EveryN anchor must have output_return_period set to valid positive integer"),
    (lambda o: o.Training.accumulationAndReplicationReductionType("Mean"), ValueError,
     "accumulationAndReplicationReductionType must be set to poptorch.ReductionType.Mean or "
     "poptorch.ReductionType.Sum"),
    (lambda o: o.Training.setMeanAccumulationAndReplicationReductionStrategy(0), AssertionError,
     "Unexpected type <class 'int'> for option meanAccumulationAndReplicationReductionStrategy"),
    (lambda o: o.setExecutionStrategy(("PipelinedExecution", 1)), AssertionError, ""),
    (lambda o: o.randomSeed(1.5), AssertionError, ""),
    (lambda o: o.setAvailableMemoryProportion({"0": 0.2}), AssertionError, "Invalid key: 0"),
    (lambda o: o.Precision.setPartialsType(torch.bfloat16), ValueError,
     "parameter to setPartialsType should be eithertorch.float or torch.half"),
    (lambda o: o.TensorLocations.setOptimizerLocation({"onChip": 0}), AssertionError, ""),
])
def test_option_arguments_are_type_checked_as_poptorch_does(poptorch, call, error, message):
    with pytest.raises(error, match=re.escape(message) if message else None):
        call(poptorch.Options())


def test_tensor_location_settings_take_booleans_only(poptorch):
    with pytest.raises(AssertionError):
        poptorch.TensorLocationSettings().useOnChipStorage(1)
    with pytest.raises(AssertionError):
        poptorch.TensorLocationSettings().useReplicatedTensorSharding(0)


@pytest.mark.parametrize("path", ["setGradientAccumulation", "Training.setGradientAccumulation",
                                  "Precision.enableHalfPartials", "TensorLocations.setOptimizerState",
                                  "gradient_accumulation"])
def test_an_unknown_option_method_raises_attribute_error(poptorch, path):
    target = poptorch.Options()
    *parents, name = path.split(".")
    for parent in parents:
        target = getattr(target, parent)
    with pytest.raises(AttributeError, match=f"^Invalid attribute {name}.$"):
        getattr(target, name)


def test_an_unknown_module_attribute_raises_attribute_error(poptorch):
    with pytest.raises(AttributeError):
        poptorch.setLearningRate
    with pytest.raises(AttributeError):
        poptorch.optim.Adafactor


def test_options_are_frozen_once_a_wrapper_or_data_loader_uses_them(poptorch):
    opts = options(poptorch)
    poptorch.trainingModel(Net(), options=opts, optimizer=None)
    with pytest.raises(AttributeError, match="^Can't modify frozen Options$"):
        opts.deviceIterations(2)
    with pytest.raises(AttributeError, match="^Can't modify frozen Options$"):
        opts.Training.gradientAccumulation(2)
    loader_opts = poptorch.Options()
    poptorch.DataLoader(loader_opts, list(range(4)))
    with pytest.raises(AttributeError, match="^Can't modify frozen Options$"):
        loader_opts._Popart.set("enableStableNorm", True)


# ------------------------------------------------------------------------------------------------ blocks, ops
def test_a_second_begin_block_on_a_module_is_refused(poptorch):
    model = Net()
    assert poptorch.BeginBlock(model.embed, "Embedding", ipu_id=0) is model.embed
    with pytest.raises(poptorch.Error, match="^'poptorch_py_error': module has already been assigned to a block.$"):
        poptorch.BeginBlock(model.embed, "Again", ipu_id=1)
    poptorch.removeBlocks(model)
    poptorch.BeginBlock(model.embed, "Again", ipu_id=1)


def test_begin_block_signature_and_argument_check(poptorch):
    assert list(inspect.signature(poptorch.BeginBlock).parameters) == ["layer_to_call", "user_id", "ipu_id"]
    with pytest.raises(poptorch.Error, match="module is not an instance of torch.nn.Module or function."):
        poptorch.BeginBlock(3, "Layer")


def test_recomputation_checkpoint_and_identity_loss_check_their_arguments(poptorch):
    t = torch.ones(2)
    assert poptorch.recomputationCheckpoint(t) is t
    assert poptorch.recomputationCheckpoint([t, t]) == [t, t]
    with pytest.raises(ValueError, match="^All inputs must be tensors$"):
        poptorch.recomputationCheckpoint(t, 1.0)
    assert poptorch.identity_loss(t, reduction="sum") == 2.0
    assert poptorch.identity_loss(t, reduction="mean") == 1.0
    with pytest.raises(AssertionError, match="^Unsupported reduction type!$"):
        poptorch.identity_loss(t, reduction="average")


# -------------------------------------------------------------------------------------------------- wrapping
def test_a_model_wrapped_twice_for_training_is_refused(poptorch):
    model = Net()
    first = poptorch.trainingModel(model, options=options(poptorch))
    assert type(model).__name__ == "PoptorchNet"
    with pytest.raises(RuntimeError, match=re.escape(
            "Model has already been wrapped in 'poptorch.trainingModel'. Call model.destroy() on the model to "
            "unwrap before wrapping again.")):
        poptorch.trainingModel(model, options=options(poptorch))
    poptorch.inferenceModel(model.eval())  # the original checks only trainingModel
    model.train()
    first(**batch(1))
    first.destroy()
    assert type(model) is Net
    poptorch.trainingModel(model, options=options(poptorch))


def test_wrappers_check_options_and_optimizer(poptorch):
    with pytest.raises(poptorch.Error, match=re.escape(
            "Invalid type: 'options' is of type <class 'dict'> (Expected poptorch.Options)")):
        poptorch.trainingModel(Net(), options={"deviceIterations": 2})
    with pytest.raises(poptorch.Error, match=re.escape(
            "You must set poptorch.Options().Training.gradientAccumulation to 1 or leave it as its default value "
            "(1) when running a poptorch.inferenceModel(). Use poptorch.Options().deviceIterations")):
        poptorch.inferenceModel(Net().eval(), options=options(poptorch, accumulation=2))
    model = Net()
    with pytest.raises(AssertionError, match="^Unsupported optimizer type"):
        poptorch.trainingModel(model, optimizer=torch.optim.Adagrad(model.parameters()))


def test_a_training_model_compiled_in_eval_mode_is_refused_by_the_double(poptorch):
    model = Net().eval()
    training = poptorch.trainingModel(model, options=options(poptorch))
    model.train()  # too late: PopTorch traces its own shallow copy, still in eval mode
    with pytest.raises(poptorch.Error, match=re.escape(
            "[strict double, not a PopTorch error] poptorch.trainingModel compiled a model in eval mode")):
        training(**batch(1))
    lenient = make_strict_poptorch(check_modes=False)
    lenient.trainingModel(Net().eval(), options=options(lenient))(**batch(1))


def test_an_inference_model_compiled_in_train_mode_is_refused_by_the_double(poptorch):
    with pytest.raises(poptorch.Error, match="poptorch.inferenceModel compiled a model in train mode"):
        poptorch.inferenceModel(Net().train())(**batch(1))
    poptorch.inferenceModel(Net().eval())(**batch(1))


def test_the_compiled_mode_holds_whatever_the_host_model_does_later(poptorch):
    model = Net()
    training = poptorch.trainingModel(model, options=options(poptorch))
    training(**batch(1))
    model.eval()
    seen = []
    model.hidden[0].register_forward_hook(lambda module, args, out: seen.append(module.training))
    training(**batch(1))
    assert seen == [True] and not model.hidden[0].training


# ---------------------------------------------------------------------------------------------- compilation
def test_independent_losses_are_refused_unless_combined_through_identity_loss(poptorch):
    with pytest.raises(poptorch.Error, match=re.escape(
            "'poptorch_cpp_error': Multiple independent losses found in graph. Graph must have one final loss. "
            "Wrap final graph loss in poptorch.identity_loss.")):
        poptorch.trainingModel(Net(losses=2))(**batch(1))

    class Combined(Net):
        def forward(self, x, labels):
            out = super().forward(x, labels)
            out["loss"] = poptorch.identity_loss(out["loss"], reduction="none")
            return out

    poptorch.trainingModel(Combined(losses=2))(**batch(1))


def test_a_training_model_without_a_loss_is_refused(poptorch):
    with pytest.raises(poptorch.Error, match="Couldn't find a loss in graph!"):
        poptorch.trainingModel(Net(losses=0))(**batch(1))


def test_gradient_accumulation_below_the_pipeline_depth_is_refused(poptorch):
    model = place(poptorch, Net())  # two forward stages: 3 stages when training
    with pytest.raises(poptorch.Error, match=re.escape(
            "poptorch.Options().Training.gradientAccumulation must be greater than or equal to the number of "
            "pipeline stages (3) when using poptorch.PipelinedExecution. Please note that a model with 2 pipeline "
            "stages in PopTorch will have an additional 1 stages when training.")):
        poptorch.trainingModel(model, options=options(poptorch, accumulation=2))(**batch(2))
    model = place(poptorch, Net())
    poptorch.trainingModel(model, options=options(poptorch, accumulation=3))(**batch(3))


def test_pipelined_inference_needs_device_iterations_for_its_stages(poptorch):
    model = place(poptorch, Net()).eval()
    with pytest.raises(poptorch.Error, match=re.escape(
            "poptorch.Options().deviceIterations must be greater than or equal to the number of pipeline stages "
            "(2) when using PopTorch.PipelinedExecution.")):
        poptorch.inferenceModel(model, options=options(poptorch))(**batch(1))
    poptorch.inferenceModel(model, options=options(poptorch, sharded=True))(**batch(1))


def test_a_batch_that_is_not_a_multiple_of_the_combined_batch_is_refused(poptorch):
    training = poptorch.trainingModel(Net(), options=options(poptorch, accumulation=2, iterations=2))
    with pytest.raises(AssertionError, match=re.escape(
            "Invalid batch dimension: In the input torch.Size([6, 3]), the batch dimension (6) must be a multiple "
            "of Options.deviceIterations(2) * (Options.replicationFactor(1) / "
            "Options.inputReplicaGrouping.input_group_size(1)) * Options.Training.gradientAccumulation(2) = 4")):
        training(**batch(6))
    training(**batch(8))


def test_a_later_batch_of_another_shape_is_refused(poptorch):
    inference = poptorch.inferenceModel(Net().eval(), options=options(poptorch, iterations=2))
    inference(**batch(4))
    with pytest.raises(poptorch.Error, match=re.escape(
            "Shape mismatch for x: expected torch.Size([4, 3]) but got torch.Size([2, 3]).")):
        inference(**batch(2))


def test_weights_shared_by_layers_on_different_ipus_are_refused(poptorch):
    model = place(poptorch, Net(tied=True))  # the head runs on IPU 1, its weight is the embedding's on IPU 0
    with pytest.raises(poptorch.Error, match=re.escape(
            "'popart_exception': Can not copy variable tensor embed.weight between virtual graphs when pipelining. "
            "All pipeline stages using this tensor should be on the same graph.")):
        poptorch.trainingModel(model, options=options(poptorch, accumulation=3))(**batch(3))
    model = place(poptorch, Net(tied=True), ipus=(0, 1, 1))
    poptorch.BeginBlock(model.head, "Head", ipu_id=0)  # back on the embedding's IPU: 3 forward stages
    poptorch.trainingModel(model, options=options(poptorch, accumulation=5))(**batch(5))


def test_an_inference_model_cannot_take_the_ipus_the_training_one_holds(poptorch):
    model = Net()
    training = poptorch.trainingModel(model, options=options(poptorch))
    training(**batch(1))  # the machine: the one IPU it needs
    inference = poptorch.inferenceModel(model.eval())
    with pytest.raises(poptorch.Error, match=re.escape("'poptorch_cpp_error': Failed to acquire 1 IPU(s)")):
        inference(**batch(1))
    training.detachFromDevice()
    inference(**batch(1))
    with pytest.raises(poptorch.Error, match=re.escape("Failed to acquire 1 IPU(s)")):
        training(**batch(1))  # re-attaching needs the inference model's IPU back
    inference.detachFromDevice()
    model.train()
    training(**batch(1))
    assert training.isAttachedToDevice() and not inference.isAttachedToDevice()


def test_attach_and_detach_follow_the_executor_state(poptorch):
    training = poptorch.trainingModel(Net(), options=options(poptorch))
    with pytest.raises(poptorch.Error, match="Model has not been compiled or has been destroyed."):
        training.detachFromDevice()
    training(**batch(1))
    with pytest.raises(poptorch.Error, match="Device is already attached"):
        training.attachToDevice()
    training.detachFromDevice()
    with pytest.raises(poptorch.Error, match="Device is not attached"):
        training.detachFromDevice()
    training.attachToDevice()


def test_an_offline_target_compiles_but_does_not_run(poptorch):
    opts = options(poptorch).useOfflineIpuTarget()
    training = poptorch.trainingModel(Net(), options=opts)
    training.compile(**batch(1))
    assert training.isCompiled() and not training.isAttachedToDevice()
    with pytest.raises(AssertionError, match=re.escape("Trying to run a model on an offline device")):
        training(**batch(1))


def test_a_number_of_ipus_not_a_power_of_two_needs_auto_rounding(poptorch):
    model = place(poptorch, Net(), ipus=(0, 1, 2))
    opts = options(poptorch, accumulation=5).autoRoundNumIPUs(False)
    with pytest.raises(poptorch.Error, match=re.escape(
            "The model specifies the use of 3 IPUs, however PopTorch must reserve a minimum of 4")):
        poptorch.trainingModel(model, options=opts)(**batch(5))


# --------------------------------------------------------------------------------------------------- running
def test_training_averages_the_micro_batch_gradients_and_steps_once_per_device_iteration(poptorch):
    reference, model = Net(), Net()
    poptorch.trainingModel(model, options=options(poptorch, accumulation=2),
                           optimizer=sgd(poptorch, model))(**batch(2))
    torch_sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference(**batch(2))["loss"].backward()  # a mean over 2 equal micro-batches: the same gradient
    torch_sgd.step()
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs)


def test_a_learning_rate_reaches_the_device_through_set_optimizer_only(poptorch):
    model = Net()
    optimizer = sgd(poptorch, model)
    training = poptorch.trainingModel(model, options=options(poptorch), optimizer=optimizer)
    optimizer.param_groups[0]["lr"] = 0.0  # the host's value; the device still has 0.1
    before = model.head.weight.detach().clone()
    training(**batch(1))
    assert not torch.equal(model.head.weight, before)
    training.setOptimizer(optimizer)
    before = model.head.weight.detach().clone()
    training(**batch(1))
    assert torch.equal(model.head.weight, before)


@pytest.mark.parametrize("mode, shape", [("All", (4,)), ("Final", ()), ("Sum", ())])
def test_the_loss_comes_back_per_output_mode(poptorch, mode, shape):
    opts = options(poptorch, accumulation=2, iterations=2).outputMode(getattr(poptorch.OutputMode, mode))
    out = poptorch.trainingModel(Net(), options=opts)(**batch(4))
    assert out["loss"].shape == shape and out["logits"].shape[0] == (4 if mode == "All" else 1)


def test_training_returns_the_final_loss_by_default_and_one_per_replica(poptorch):
    training = poptorch.trainingModel(Net(), options=options(poptorch, replicas=2))
    assert training(**batch(2))["loss"].shape == (2,)
    training.detachFromDevice()
    inference = poptorch.inferenceModel(Net().eval(), options=options(poptorch, iterations=2))
    assert inference(**batch(2))["loss"].shape == (2,)  # All by default for inference


def test_outputs_cannot_be_back_propagated_and_longs_come_back_as_ints(poptorch):
    class Argmax(Net):
        def forward(self, x, labels):
            return super().forward(x, labels)["logits"].argmax(-1)

    inference = poptorch.inferenceModel(Argmax().eval())
    assert inference(**batch(1)).dtype == torch.int32
    inference.detachFromDevice()
    loss = poptorch.trainingModel(Net(), options=options(poptorch))(**batch(1))["loss"]
    with pytest.raises(poptorch.Error, match="backward\\(\\) cannot be called explicitly"):
        loss.backward()


# ----------------------------------------------------------------------------------------- data, optimizers
def test_the_data_loader_yields_combined_batches_and_drops_the_last_partial_one(poptorch):
    opts = options(poptorch, accumulation=2, iterations=2)
    loader = poptorch.DataLoader(opts, list(range(10)), batch_size=2, drop_last=True,
                                 mode=poptorch.DataLoaderMode.AsyncRebatched)
    assert loader.combinedBatchSize == 8 and [len(b) for b in loader] == [8]
    kept = poptorch.DataLoader(options(poptorch, accumulation=2, iterations=2), list(range(10)), batch_size=2,
                               drop_last=False)
    assert [len(b) for b in kept] == [8, 2]
    assert list(inspect.signature(poptorch.DataLoader.__init__).parameters)[1:13] == [
        "options", "dataset", "batch_size", "shuffle", "num_workers", "drop_last", "persistent_workers",
        "auto_distributed_partitioning", "mode", "async_options", "rebatched_worker_size", "batch_sampler"]


def test_optimizers_take_poptorchs_extra_arguments_and_check_accumulation_types(poptorch):
    model = Net()
    adamw = poptorch.optim.AdamW(model.parameters(), lr=1e-3, loss_scaling=128.0, accum_type=torch.float16,
                                 first_order_momentum_accum_type=torch.float16,
                                 second_order_momentum_accum_type=torch.float32, max_grad_norm=1.0)
    assert (adamw.loss_scaling, adamw.bias_correction, adamw.max_grad_norm) == (128.0, True, 1.0)
    with pytest.raises(AssertionError, match="Accumulation types must be either torch.float32 or torch.float16"):
        poptorch.optim.AdamW(model.parameters(), accum_type=torch.bfloat16)
    lamb = poptorch.optim.LAMB(model.parameters(), lr=1e-3, bias_correction=False, max_weight_norm=0.0)
    assert lamb.max_weight_norm == 0.0 and lamb.defaults["weight_decay"] == 1e-2
    with pytest.raises(TypeError):
        poptorch.optim.LAMB(model.parameters(), max_grad_norm=1.0)  # PopTorch's LAMB does not clip
    with pytest.raises(TypeError):
        poptorch.optim.RMSprop(model.parameters(), lr=0.1, max_grad_norm=1.0)
    assert "max_grad_norm" in inspect.signature(poptorch.optim.SGD).parameters


def test_fp16_accumulation_sets_the_running_mean_reduction_strategy(poptorch):
    model = Net()
    optimizer = poptorch.optim.AdamW(model.parameters(), accum_type=torch.float16)
    training = poptorch.trainingModel(model, options=options(poptorch), optimizer=optimizer)
    assert training.options.Training.meanAccumulationAndReplicationReductionStrategy == \
        poptorch.MeanReductionStrategy.Running


def test_the_asynchronous_loader_takes_tensors_only(poptorch):
    def collate(rows):  # an int beside the tensors, as a collator could add
        return {"x": torch.stack(rows), "note": len(rows)}
    rows = [torch.tensor([i]) for i in range(4)]
    loader = poptorch.DataLoader(poptorch.Options(), rows, batch_size=2, collate_fn=collate,
                                 mode=poptorch.DataLoaderMode.Async)
    with pytest.raises(AssertionError, match="Tensor at index 1 is not a torch tensor"):
        next(iter(loader))
    sync = poptorch.DataLoader(poptorch.Options(), rows, batch_size=2, collate_fn=collate,
                               mode=poptorch.DataLoaderMode.Sync)
    assert next(iter(sync))["note"] == 2  # the synchronous loader passes it on
