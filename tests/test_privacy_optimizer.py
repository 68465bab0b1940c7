"""make_private + PrivateOptimizer: the semantics specs/privacy.md pins."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from optfm.privacy import (
    KalmanFilter,
    LowPassFilter,
    PrivacyBudgetExhaustedError,
    epsilon_for,
    make_private,
)


def _data(n=256, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    return TensorDataset(x, y)


def _model(seed=0, d=6, k=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, k))


def _setup(filter=None, *, sigma=0.0, C=1e6, lr=0.1, opt="sgd", poisson=False, bs=32, seed=0,
           **kw):
    model = _model(seed)
    base = (torch.optim.SGD if opt == "sgd" else torch.optim.Adam)(model.parameters(), lr=lr)
    loader = DataLoader(_data(), batch_size=bs)
    return make_private(model, base, loader, noise_multiplier=sigma, max_grad_norm=C,
                        filter=filter, poisson_sampling=poisson, **kw)


def _train(model, opt, loader, steps):
    lf = nn.CrossEntropyLoss()
    done = 0
    while done < steps:
        for x, y in loader:
            def closure(x=x, y=y):
                opt.zero_grad()
                loss = lf(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
            done += 1
            if done == steps:
                return


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _plain_sgd(steps, lr=0.1, seed=0):
    model = _model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(_data(), batch_size=32)
    _train(model, opt, loader, steps)
    return _params(model)


@pytest.mark.parametrize("filt", [None, LowPassFilter([1.0], [1.0]), KalmanFilter(1.0, 0.5)],
                         ids=["dp-sgd", "doppler-b1", "disk-kappa1"])
def test_sigma0_no_clipping_reproduces_plain_sgd(filt):
    model, opt, loader, _ = _setup(filt)
    _train(model, opt, loader, 12)
    for a, b in zip(_params(model), _plain_sgd(12)):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_disk_kappa1_equals_dp_sgd_with_noise_and_clipping():
    runs = []
    for filt in (None, KalmanFilter(1.0, 0.3)):
        torch.manual_seed(123)  # Poisson batches and noise both come from the global RNG
        model, opt, loader, _ = _setup(filt, sigma=1.0, C=0.5, poisson=True)
        torch.manual_seed(7)
        _train(model, opt, loader, 10)
        runs.append(_params(model))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _full_grad(model, params, ds):
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().requires_grad_() for p in params]

    def loss(ps):
        return nn.functional.cross_entropy(functional_call(model, dict(zip(names, ps)), (ds.tensors[0],)), ds.tensors[1])
    return torch.autograd.grad(loss(params), params)


def test_disk_sigma0_full_batch_matches_reference_recursion():
    """DiSK's whole dynamics (two evaluation points, m recursion, d tracking) against a direct
    full-batch implementation of the paper's equations."""
    kappa, gamma, lr, steps = 0.6, 0.8, 0.2, 8
    ds = _data(n=64)
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model, opt, loader, _ = make_private(model, opt, DataLoader(ds, batch_size=64),
                                         noise_multiplier=0.0, max_grad_norm=1e6,
                                         filter=KalmanFilter(kappa, gamma), poisson_sampling=False)
    _train(model, opt, loader, steps)

    ref = _model(0)
    x = [p.detach().clone() for p in ref.parameters()]
    d = [torch.zeros_like(p) for p in x]
    m = None
    c = (1 - kappa) / (kappa * gamma)
    for _ in range(steps):
        g_ext = _full_grad(ref, [xi + gamma * di for xi, di in zip(x, d)], ds)
        g_now = _full_grad(ref, x, ds)
        g = [c * a + (1 - c) * b for a, b in zip(g_ext, g_now)]
        m = g if m is None else [(1 - kappa) * mi + kappa * gi for mi, gi in zip(m, g)]
        new = [xi - lr * mi for xi, mi in zip(x, m)]
        d = [a - b for a, b in zip(new, x)]
        x = new
    for a, b in zip(_params(model), x):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def _per_sample_grads(model, params, x, y):
    names = [n for n, _ in model.named_parameters()]
    def loss(ps, xi, yi):
        out = functional_call(model, dict(zip(names, ps)), (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])
    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def test_disk_combines_per_sample_before_clipping_once():
    """Σ clip_C(c g(x+γd) + (1-c) g(x)) per sample, clipped once (not c·clip + (1-c)·clip)."""
    kappa, gamma, C = 0.7, 0.5, 0.05
    filt = KalmanFilter(kappa, gamma)
    model, opt, loader, _ = _setup(filt, sigma=0.0, C=C, lr=0.5)
    x, y = next(iter(loader))
    _train(model, opt, loader, 1)  # d_1 != 0 from now on
    ref = _model(0)
    seen = {}

    def capture(o):
        seen["combined"] = [p.grad_sample.clone() for p in o.params]
        seen["x"] = [p.detach().clone() for p in o.params]

    opt.add_per_sample_hook(capture)
    for b in filt._d:  # a long last step: the two evaluation points differ clearly
        b.mul_(300.0)
    d = [b.clone() for b in filt._d]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    c = filt.c
    xs = seen["x"]
    g_ext = _per_sample_grads(ref, [a + gamma * b for a, b in zip(xs, d)], x, y)
    g_now = _per_sample_grads(ref, xs, x, y)
    combined = [c * a + (1 - c) * b for a, b in zip(g_ext, g_now)]
    for got, want in zip(seen["combined"], combined):
        assert torch.allclose(got, want, atol=1e-6)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in combined], 1).norm(dim=1)
    factor = (C / (norms + 1e-6)).clamp(max=1.0)
    assert (norms * factor).max() <= C * (1 + 1e-5)
    once = [torch.einsum("i,i...", factor, g) for g in combined]
    for p, want in zip(model.parameters(), once):
        assert torch.allclose(p.summed_grad, want, atol=1e-6)
    # Clipping the two evaluations separately (the fastDP pitfall) would give something else.
    n_ext = torch.stack([g.flatten(1).norm(dim=1) for g in g_ext], 1).norm(dim=1)
    n_now = torch.stack([g.flatten(1).norm(dim=1) for g in g_now], 1).norm(dim=1)
    sep = [torch.einsum("i,i...", c * (C / (n_ext + 1e-6)).clamp(max=1), a)
           + torch.einsum("i,i...", (1 - c) * (C / (n_now + 1e-6)).clamp(max=1), b)
           for a, b in zip(g_ext, g_now)]
    assert not all(torch.allclose(p.summed_grad, s, atol=1e-4) for p, s in zip(model.parameters(), sep))


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _model(0)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize(("filt", "per_step"), [
    (None, 1), (LowPassFilter.preset("a9b1"), 1), (KalmanFilter(1.0, 0.5), 1),
    (KalmanFilter.one_evaluation(0.7), 1), (KalmanFilter(0.7, 0.5), 2)])
def test_forward_passes_per_step(filt, per_step):
    inner = _Counting()
    opt = torch.optim.SGD(inner.parameters(), lr=0.1)
    model, opt, loader, _ = make_private(inner, opt, DataLoader(_data(), batch_size=32),
                                         noise_multiplier=1.0, max_grad_norm=1.0, filter=filt)
    _train(model, opt, loader, 5)
    assert inner.calls == 5 * per_step


@pytest.mark.parametrize("filt", [None, KalmanFilter(0.7, 0.5), KalmanFilter.one_evaluation(0.5)],
                         ids=["dp-sgd", "disk", "disk-c1"])
def test_noise_std_is_sigma_times_C_never_rescaled(filt):
    sigma, C, B = 2.0, 0.5, 32
    inner = nn.Sequential(nn.Linear(100, 100), nn.Tanh(), nn.Linear(100, 3))
    opt = torch.optim.SGD(inner.parameters(), lr=0.0)
    ds = TensorDataset(torch.randn(256, 100), torch.randint(0, 3, (256,)))
    model, opt, loader, _ = make_private(inner, opt, DataLoader(ds, batch_size=B),
                                         noise_multiplier=sigma, max_grad_norm=C, filter=filt,
                                         poisson_sampling=False)
    _train(model, opt, loader, 1)  # first step: m_0 = g̃_0, so p.grad is the privatized gradient
    noise = torch.cat([(p.grad * B - p.summed_grad).flatten() for p in model.parameters()])
    assert noise.numel() > 10000
    assert noise.std().item() == pytest.approx(sigma * C, rel=0.03)
    assert noise.mean().abs().item() < 0.05 * sigma * C


def test_filter_sees_only_noised_gradients():
    seen = []
    filt = LowPassFilter.preset("a9b1")
    original = filt.step
    filt.step = lambda grads: (seen.append([g.clone() for g in grads]), original(grads))
    model, opt, loader, _ = _setup(filt, sigma=5.0, C=1.0)
    _train(model, opt, loader, 1)
    (grads,) = seen
    noise = torch.cat([(g * 32 - p.summed_grad).flatten() for g, p in zip(grads, model.parameters())])
    assert 3.5 < noise.std().item() < 6.5  # σC = 5 per coordinate before averaging


def test_accountant_sees_the_sigma_used_and_eps_is_filter_independent():
    eps = []
    for filt in (None, LowPassFilter.preset("a9b1"), LowPassFilter.preset("cheby2"),
                 KalmanFilter(0.7, 0.5), KalmanFilter.one_evaluation(0.7)):
        torch.manual_seed(0)
        model, opt, loader, eng = _setup(filt, sigma=None, C=1.0, poisson=True,
                                         target_epsilon=3.0, steps=40)
        _train(model, opt, loader, 6)
        (sigma, q, steps), = eng.accountant.history
        assert sigma == opt.noise_multiplier == eng.noise_multiplier
        assert q == eng.sample_rate == 1 / 8 and steps == 6 == eng.steps
        eps.append(eng.epsilon())
    assert len(set(eps)) == 1 and 0 < eps[0] < 3.0
    assert eps[0] == pytest.approx(epsilon_for(eng.noise_multiplier, 1 / 8, 6, 1e-5))
    # the calibrated σ spends the whole budget over the planned 40 steps
    assert epsilon_for(eng.noise_multiplier, 1 / 8, 40, 1e-5) == pytest.approx(3.0, abs=0.05)


def test_rdp_accountant_and_epochs():
    _, _, _, eng = _setup(None, sigma=None, C=1.0, poisson=True, target_epsilon=2.0, epochs=3,
                          accountant="rdp")
    assert eng.accountant.mechanism() == "rdp"
    assert epsilon_for(eng.noise_multiplier, 1 / 8, 24, 1e-5, "rdp") == pytest.approx(2.0, abs=0.05)


def test_budget_exhaustion_raise_and_warn():
    torch.manual_seed(0)
    model, opt, loader, eng = _setup(None, sigma=2.0, C=1.0, poisson=True, target_epsilon=1.0,
                                     on_budget_exhausted="raise")
    assert eng.max_steps is not None and eng.max_steps > 0
    assert epsilon_for(2.0, 1 / 8, eng.max_steps, 1e-5) <= 1.0 < epsilon_for(2.0, 1 / 8, eng.max_steps + 1, 1e-5)
    _train(model, opt, loader, eng.max_steps)
    before = _params(model)
    with pytest.raises(PrivacyBudgetExhaustedError, match="privacy budget exhausted"):
        _train(model, opt, loader, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model)))  # nothing was spent
    assert eng.epsilon() <= 1.0

    model, opt, loader, eng = _setup(None, sigma=2.0, C=1.0, poisson=True, target_epsilon=0.5,
                                     on_budget_exhausted="warn")
    with pytest.warns(UserWarning, match="privacy budget exhausted"):
        _train(model, opt, loader, eng.max_steps + 2)
    assert eng.steps == eng.max_steps + 2


def test_dp_nsgd_normalises_per_sample_gradients():
    C, r = 0.3, 0.01
    model, opt, loader, _ = _setup(None, sigma=0.0, C=C, normalize=True, normalize_r=r)
    x, y = next(iter(loader))
    ref = _model(0)
    g = _per_sample_grads(ref, [p.detach().clone() for p in model.parameters()], x, y)
    _train(model, opt, loader, 1)
    norms = torch.stack([t.flatten(1).norm(dim=1) for t in g], 1).norm(dim=1)
    for p, t in zip(model.parameters(), g):
        assert torch.allclose(p.summed_grad, torch.einsum("i,i...", C / (norms + r), t), atol=1e-6)


def test_disk_needs_a_closure():
    model, opt, loader, _ = _setup(KalmanFilter(0.7, 0.5))
    x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"optimizer.step\(closure\)"):
        opt.step()


@pytest.mark.parametrize(("kwargs", "msg"), [
    ({"target_epsilon": 0.0, "steps": 10}, "target_epsilon must be"),
    ({"target_epsilon": -1.0, "steps": 10}, "target_epsilon must be"),
    ({"target_epsilon": 1.0, "steps": 10, "target_delta": 1.0}, "target_delta must be in"),
    ({"target_epsilon": 1.0, "steps": 10, "target_delta": 0.0}, "target_delta must be in"),
    ({"target_epsilon": 1.0}, "needs epochs or steps"),
    ({"target_epsilon": 1.0, "steps": 10, "epochs": 1}, "not both"),
    ({"noise_multiplier": -1.0}, "noise_multiplier must be"),
    ({}, "give target_epsilon"),
    ({"noise_multiplier": 1.0, "accountant": "gdp"}, "accountant must be"),
    ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max_grad_norm must be"),
    ({"noise_multiplier": 1.0, "on_budget_exhausted": "stop"}, "on_budget_exhausted must be"),
    ({"noise_multiplier": 1.0, "on_budget_exhausted": "raise"}, "needs target_epsilon"),
    ({"noise_multiplier": 1.0, "normalize": True, "normalize_r": 0.0}, "normalize_r must be"),
])
def test_bad_arguments(kwargs, msg):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=msg):
        make_private(model, opt, DataLoader(_data(), batch_size=32), **kwargs)


@pytest.mark.parametrize("filt", [LowPassFilter.preset("a9b1505"), KalmanFilter(0.7, 0.5)])
def test_resume_from_engine_state_is_exact(filt, tmp_path):
    """Checkpoint mid-run (model, optimizer, filter, accountant), resume, get the same trajectory."""
    kind = type(filt)
    mk = (lambda: LowPassFilter.preset("a9b1505")) if kind is LowPassFilter else (lambda: KalmanFilter(0.7, 0.5))
    model, opt, loader, eng = _setup(mk(), sigma=1.0, C=1.0, opt="adam", lr=0.01,
                                     noise_generator=torch.Generator().manual_seed(5))
    _train(model, opt, loader, 3)
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()},
             "opt": opt.state_dict(), "eng": eng.state_dict(),
             "noise": opt.generator.get_state()}
    import copy
    state = copy.deepcopy(state)
    _train(model, opt, loader, 4)
    ref = _params(model)

    model2, opt2, loader2, eng2 = _setup(mk(), sigma=1.0, C=1.0, opt="adam", lr=0.01,
                                         noise_generator=torch.Generator().manual_seed(99))
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    eng2.load_state_dict(state["eng"])
    opt2.generator.set_state(state["noise"])
    _train(model2, opt2, loader2, 4)
    for a, b in zip(ref, _params(model2)):
        assert torch.equal(a, b)
    assert eng2.steps == 7


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("filt", [None, "a9b1", "disk"])
def test_any_torch_optimizer_trains(opt_cls, filt):
    f = {None: None, "a9b1": LowPassFilter.preset("a9b1"), "disk": KalmanFilter(0.7, 0.5)}[filt]
    torch.manual_seed(0)
    x = torch.randn(512, 6)
    y = (x[:, 0] > 0).long()
    model = _model(0, k=2)
    opt = opt_cls(model.parameters(), lr=0.05 if opt_cls is torch.optim.SGD else 0.01)
    model, opt, loader, eng = make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=64),
                                           target_epsilon=8.0, steps=80, filter=f)
    with torch.no_grad():
        before = nn.functional.cross_entropy(model(x), y).item()
    _train(model, opt, loader, 80)
    with torch.no_grad():
        after = nn.functional.cross_entropy(model(x), y).item()
    assert after < 0.7 * before
    assert 0 < eng.epsilon() <= 8.0


def test_no_noise_reports_infinite_epsilon():
    model, opt, loader, eng = _setup(None, sigma=0.0, C=1.0)
    _train(model, opt, loader, 2)
    assert eng.epsilon() == float("inf")
    assert epsilon_for(0.0, 0.1, 5, 1e-5) == float("inf")
    model, opt, loader, eng = _setup(None, sigma=0.0, C=1.0, target_epsilon=1.0,
                                     on_budget_exhausted="raise")
    assert eng.max_steps == 0
    with pytest.raises(PrivacyBudgetExhaustedError):
        _train(model, opt, loader, 1)
