"""LAMB against a plain NumPy transcription of the formula (ipu_train/optim.py docstring), step by step."""
import numpy as np
import pytest
import torch

from ipu_train.optim import LAMB


def numpy_lamb(weights, grads_per_step, lr, betas, eps, weight_decay, bias_correction, max_trust_ratio=None):
    """weights: list of arrays; grads_per_step: one list of arrays per step. Returns the weights after each step."""
    b1, b2 = betas
    w = [x.astype(np.float64).copy() for x in weights]
    m = [np.zeros_like(x) for x in w]
    v = [np.zeros_like(x) for x in w]
    history = []
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = (m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)) if bias_correction else (m[i], v[i])
            u = m_hat / (np.sqrt(v_hat) + eps) + weight_decay * w[i]
            w_norm, u_norm = np.linalg.norm(w[i]), np.linalg.norm(u)
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            if max_trust_ratio is not None:
                ratio = min(ratio, max_trust_ratio)
            w[i] = w[i] - lr * ratio * u
        history.append([x.copy() for x in w])
    return history


def run_torch(weights, grads_per_step, **kw):
    params = [torch.nn.Parameter(torch.tensor(x, dtype=torch.float64)) for x in weights]
    opt = LAMB(params, **kw)
    history = []
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        history.append([p.detach().numpy().copy() for p in params])
    return history


def random_problem(seed, steps=5):
    rng = np.random.default_rng(seed)
    shapes = [(4, 3), (3,), (2, 2, 2)]
    weights = [rng.normal(size=s) for s in shapes]
    # Gradients of very different scales per tensor, so that the trust ratios differ per tensor.
    grads = [[rng.normal(size=s) * 10.0 ** (i - 1) for i, s in enumerate(shapes)] for _ in range(steps)]
    return weights, grads


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_matches_numpy_formula(bias_correction, weight_decay):
    weights, grads = random_problem(seed=1)
    kw = dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay, bias_correction=bias_correction)
    expected = numpy_lamb(weights, grads, **kw)
    got = run_torch(weights, grads, **kw)
    for step_expected, step_got in zip(expected, got):
        for e, g in zip(step_expected, step_got):
            np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)


def test_bias_correction_changes_the_first_steps():
    weights, grads = random_problem(seed=2, steps=2)
    kw = dict(lr=0.02, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    with_bc = run_torch(weights, grads, bias_correction=True, **kw)
    without_bc = run_torch(weights, grads, bias_correction=False, **kw)
    assert not np.allclose(with_bc[1][0], without_bc[1][0])


def test_max_trust_ratio_clips():
    weights, grads = random_problem(seed=3)
    kw = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True, max_trust_ratio=0.5)
    expected = numpy_lamb(weights, grads, **kw)
    got = run_torch(weights, grads, **kw)
    for e, g in zip(expected[-1], got[-1]):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)
    unclipped = run_torch(weights, grads, **{**kw, "max_trust_ratio": None})
    assert not np.allclose(unclipped[-1][0], got[-1][0])


def test_zero_weight_uses_ratio_one():
    # ||w|| = 0: the plain Adam-style update is applied with trust ratio 1.
    kw = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias_correction=True)
    grads = [[np.array([1.0, -2.0, 0.5])]]
    got = run_torch([np.zeros(3)], grads, **kw)[0][0]
    expected = numpy_lamb([np.zeros(3)], grads, **kw)[0][0]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # With bias correction the first Adam step is sign(g)·(1 − tiny): the weight moves by about lr.
    np.testing.assert_allclose(got, -0.1 * np.sign(grads[0][0]), rtol=1e-5)


def test_zero_update_leaves_weight_unchanged():
    # ||u|| = 0 (zero gradient, no decay): ratio 1, nothing moves, and nothing becomes NaN.
    w = np.array([[1.0, 2.0], [3.0, 4.0]])
    got = run_torch([w], [[np.zeros_like(w)]] * 3, lr=0.1, weight_decay=0.0)
    np.testing.assert_array_equal(got[-1][0], w)


def test_parameters_without_grad_are_skipped():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = LAMB([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert not torch.equal(a.detach(), torch.ones(3))
    assert torch.equal(b.detach(), torch.ones(3)) and b not in opt.state


def test_state_dict_round_trip_continues_identically():
    weights, grads = random_problem(seed=4, steps=6)
    kw = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01, bias_correction=True)
    expected = run_torch(weights, grads, **kw)[-1]

    params = [torch.nn.Parameter(torch.tensor(x)) for x in weights]
    opt = LAMB(params, **kw)
    for grads_t in grads[:3]:
        for p, g in zip(params, grads_t):
            p.grad = torch.tensor(g)
        opt.step()
    saved_params = [p.detach().clone() for p in params]
    saved_state = opt.state_dict()

    resumed = [torch.nn.Parameter(x.clone()) for x in saved_params]
    opt2 = LAMB(resumed, lr=1.0)  # hyper-parameters come back from the state dict
    opt2.load_state_dict(saved_state)
    for grads_t in grads[3:]:
        for p, g in zip(resumed, grads_t):
            p.grad = torch.tensor(g)
        opt2.step()
    for e, p in zip(expected, resumed):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-12, atol=1e-12)


def test_trains_a_small_regression():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1)
    opt = LAMB(model.parameters(), lr=0.05, weight_decay=0.0)
    first = None
    for _ in range(100):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


def test_rejects_invalid_hyperparameters():
    p = [torch.nn.Parameter(torch.ones(1))]
    for bad in (dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(eps=-1.0), dict(max_trust_ratio=0.0)):
        with pytest.raises(ValueError):
            LAMB(p, **bad)


# --- --optim: transformers' mapping of optimizer names, on the PyTorch backend -------------------------------------

def parse(tmp_path, *flags):
    """IPUTrainingArguments from command-line flags, on the CPU."""
    from transformers import HfArgumentParser

    from ipu_train.arguments import IPUTrainingArguments

    (args,) = HfArgumentParser(IPUTrainingArguments).parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path / "out"), "--device", "cpu", *flags])
    return args


def cpu_optimizer(tmp_path, *flags):
    """The optimizer the CPU backend builds for a small model's decay / no-decay parameter groups."""
    from ipu_train.backends.torch import TorchBackend
    from ipu_train.config import IPUConfig
    from ipu_train.parallel import ParallelLayout

    args = parse(tmp_path, *flags)
    backend = TorchBackend(args, IPUConfig(), ParallelLayout.build(IPUConfig(), args))
    model = torch.nn.Linear(4, 2)
    return backend.create_optimizer([{"params": [model.weight], "weight_decay": 0.01},
                                     {"params": [model.bias], "weight_decay": 0.0}])


def test_default_optim_is_our_adamw_foreach_on_cpu_and_fused_on_cuda(tmp_path):
    from ipu_train.optim import torch_optimizer

    optimizer = cpu_optimizer(tmp_path, "--learning_rate", "0.003", "--adam_beta2", "0.98")
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]
    assert optimizer.defaults["lr"] == 0.003 and optimizer.defaults["betas"] == (0.9, 0.98)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    optimizer_class, kwargs = torch_optimizer(parse(tmp_path), "cuda")
    assert optimizer_class is torch.optim.AdamW and kwargs["fused"] is True and "foreach" not in kwargs


def test_optim_adafactor_builds_transformers_adafactor(tmp_path):
    from transformers.optimization import Adafactor

    optimizer = cpu_optimizer(tmp_path, "--optim", "adafactor", "--learning_rate", "0.01")
    assert type(optimizer) is Adafactor
    assert optimizer.defaults["lr"] == 0.01 and optimizer.defaults["relative_step"] is False


def test_optim_sgd_takes_the_learning_rate_and_its_optim_args(tmp_path):
    optimizer = cpu_optimizer(tmp_path, "--optim", "sgd", "--learning_rate", "0.2",
                              "--optim_args", "momentum=0.9, nesterov=true")
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.defaults["lr"] == 0.2 and optimizer.defaults["momentum"] == 0.9
    assert optimizer.defaults["nesterov"] is True
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]


@pytest.mark.parametrize("name, optimizer_class", [("adamw_torch", torch.optim.AdamW),
                                                    ("adagrad", torch.optim.Adagrad),
                                                    ("rmsprop", torch.optim.RMSprop)])
def test_the_other_torch_optimizers_map_as_transformers_maps_them(tmp_path, name, optimizer_class):
    optimizer = cpu_optimizer(tmp_path, "--optim", name, "--learning_rate", "0.02")
    assert type(optimizer) is optimizer_class and optimizer.defaults["lr"] == 0.02
    if name == "adamw_torch":  # transformers' plain AdamW: torch picks its kernels, not our default's foreach
        assert optimizer.defaults["foreach"] is None and not optimizer.defaults["fused"]


@pytest.mark.parametrize("flags, message", [
    (["--optim", "adamw_bnb_8bit"], "--optim adamw_bnb_8bit is not supported (You need to install `bitsandbytes`"),
    (["--optim", "galore_adamw"], "--optim galore_adamw is not supported"),
    (["--optim", "adamw_torch_xla"], "--optim adamw_torch_xla is not supported"),
    (["--lamb", "--optim", "sgd"], "--lamb contradicts --optim sgd"),
    (["--lamb", "--optim_args", "momentum=0.9"], "--optim_args does not apply to --lamb"),
    (["--optim", "adafactor", "--optim_args", "momentum=0.9"], "--optim_args momentum: --optim adafactor does not "
                                                               "use it"),
    (["--optim", "sgd", "--optim_args", "lr=0.5"], "--optim_args lr: --optim sgd does not use it"),
    (["--optim", "sgd", "--optim_args", "weight_decay=0.1"], "--optim_args weight_decay: the parameter groups"),
    (["--optim", "sgd", "--optim_args", "momentum"], "--optim_args momentum: write key=value pairs"),
])
def test_what_gives_no_optimizer_here_is_refused_in_one_line_when_parsed(tmp_path, flags, message):
    from ipu_train.errors import UserError

    with pytest.raises(UserError) as refused:
        parse(tmp_path, *flags)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_a_refusal_lists_the_names_that_work(tmp_path):
    from ipu_train.errors import UserError

    with pytest.raises(UserError, match="use one of adamw_torch, adamw_torch_fused, adafactor, sgd, adagrad, "
                                        "rmsprop, or --lamb"):
        parse(tmp_path, "--optim", "lion_8bit")


def test_the_sharded_optimizer_takes_the_chosen_class_and_arguments(tmp_path):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from ipu_train.backends.torch import TorchBackend
    from ipu_train.config import IPUConfig
    from ipu_train.parallel import ParallelLayout

    args = parse(tmp_path, "--optim", "sgd", "--learning_rate", "0.3", "--optim_args", "momentum=0.8")
    backend = TorchBackend(args, IPUConfig(), ParallelLayout.build(IPUConfig(), args))
    backend.shard_optimizer_state = True  # as with replicated_tensor_sharding under torchrun
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        optimizer = backend.create_optimizer([{"params": list(torch.nn.Linear(4, 2).parameters()),
                                               "weight_decay": 0.0}])
    finally:
        torch.distributed.destroy_process_group()
    assert isinstance(optimizer, ZeroRedundancyOptimizer)
    assert type(optimizer.optim) is torch.optim.SGD
    assert optimizer.optim.defaults["lr"] == 0.3 and optimizer.optim.defaults["momentum"] == 0.8


def test_a_run_with_optim_sgd_trains_with_sgd(tmp_path):
    from ipu_train.config import IPUConfig
    from ipu_train.trainer import IPUTrainer

    from ._trainer_fixtures import collate, tiny_gpt2, token_rows

    args = parse(tmp_path, "--optim", "sgd", "--optim_args", "momentum=0.9", "--learning_rate", "0.05",
                 "--max_steps", "3", "--per_device_train_batch_size", "2", "--logging_steps", "1",
                 "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true")
    model = tiny_gpt2()
    before = model.lm_head.weight.detach().clone()
    trainer = IPUTrainer(model=model, ipu_config=IPUConfig(), args=args, data_collator=collate,
                         train_dataset=token_rows(8))
    trainer.train()
    assert type(trainer.optimizer) is torch.optim.SGD and trainer.optimizer.defaults["momentum"] == 0.9
    assert not torch.equal(before, model.lm_head.weight.detach())
