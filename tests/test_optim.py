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
