"""NGDiff direction, AutoLR (GeN-style fit without double steps), NPO/SimNPO, the Unlearner."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from optfm.unlearning import (
    AutoLR,
    LinearCombination,
    NGDiff,
    Unlearner,
    UnlearningDiverged,
    ngdiff_direction,
    npo_loss,
    simnpo_loss,
)


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


# --------------------------------------------------------------------------- NGDiff direction
@pytest.mark.parametrize("seed", range(20))
def test_direction_improves_both_tasks_and_is_bounded(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    g_r = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    # correlated forget gradient: the hard case (cos θ near 1)
    g_f = [r * 0.9 + 0.1 * torch.randn(s, generator=g, dtype=torch.float64) * (seed % 3)
           for r, s in zip(g_r, shapes)]
    d, nr, nf, cos = ngdiff_direction(g_r, g_f)
    fr, ff, fd = _flat(g_r), _flat(g_f), _flat(d)
    assert torch.dot(fr, fd) >= -1e-6
    assert torch.dot(ff, fd) <= 1e-6
    assert fd.norm() <= 2 + 1e-6
    # the closed forms of the module docstring
    assert torch.dot(fr, fd).item() == pytest.approx(nr * (1 - cos), abs=1e-9)
    assert torch.dot(ff, fd).item() == pytest.approx(-nf * (1 - cos), abs=1e-9)
    assert cos == pytest.approx(torch.nn.functional.cosine_similarity(fr, ff, dim=0).item())


def _toy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    xr, yr = torch.randn(16, 4), torch.randn(16, 1)
    xf, yf = torch.randn(16, 4), torch.randn(16, 1)
    return model, (xr, yr), (xf, yf)


def _mse(model, xy):
    x, y = xy
    return ((model(x) - y) ** 2).mean()


def test_ngdiff_component_matches_separate_autograd():
    model, r, f = _toy()
    params = list(model.parameters())
    g_r = torch.autograd.grad(_mse(model, r), params)
    g_f = torch.autograd.grad(_mse(model, f), params)
    want, *_ = ngdiff_direction(list(g_r), list(g_f))
    stats = NGDiff(params).backward(retain_loss=_mse(model, r), forget_loss=_mse(model, f))
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-7)
    assert stats.direction_norm <= 2 + 1e-6
    assert stats.retain_loss == pytest.approx(_mse(model, r).item())


def test_accumulation_normalises_once():
    model, r, f = _toy()
    params = list(model.parameters())
    full = NGDiff(params)
    full.backward(retain_loss=_mse(model, r), forget_loss=_mse(model, f))
    want = [p.grad.clone() for p in params]

    acc = NGDiff(params)
    for half in (slice(0, 8), slice(8, 16)):
        acc.accumulate(retain_loss=0.5 * _mse(model, (r[0][half], r[1][half])),
                       forget_loss=0.5 * _mse(model, (f[0][half], f[1][half])))
    stats = acc.direction()
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)
    assert stats.retain_loss == pytest.approx(_mse(model, r).item(), rel=1e-6)

    # normalising each micro-batch separately would be a different direction
    per = []
    for half in (slice(0, 8), slice(8, 16)):
        NGDiff(params).backward(retain_loss=_mse(model, (r[0][half], r[1][half])),
                                forget_loss=_mse(model, (f[0][half], f[1][half])))
        per.append([p.grad.clone() for p in params])
    wrong = _flat([a + b for a, b in zip(*per)]) / 2
    assert not torch.allclose(wrong, _flat(want), atol=1e-4)


def test_linear_combination_is_the_gradient_of_the_weighted_sum():
    model, r, f = _toy()
    params = list(model.parameters())
    want = torch.autograd.grad(-_mse(model, f) + 0.7 * _mse(model, r), params)
    stats = LinearCombination(params, retain_weight=0.7).backward(
        retain_loss=_mse(model, r), forget_loss=-_mse(model, f))
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-7)
    # cos θ is reported between g_R and the forget *fit* gradient, like NGDiff's
    g_r = torch.autograd.grad(_mse(model, r), params)
    g_f = torch.autograd.grad(_mse(model, f), params)
    assert stats.cos_theta == pytest.approx(
        torch.nn.functional.cosine_similarity(_flat(g_r), _flat(g_f), dim=0).item(), abs=1e-6)


def test_ngdiff_rejects_bad_input():
    model, r, f = _toy()
    with pytest.raises(ValueError, match="eps"):
        NGDiff(model.parameters(), eps=-1)
    with pytest.raises(ValueError, match="requires_grad"):
        NGDiff([torch.zeros(2)])
    ngd = NGDiff(model.parameters())
    with pytest.raises(FloatingPointError, match="forget_loss"):
        ngd.backward(retain_loss=_mse(model, r), forget_loss=_mse(model, f) * float("nan"))
    with pytest.raises(RuntimeError, match="before accumulate"):
        NGDiff(model.parameters()).direction()


# --------------------------------------------------------------------------- AutoLR
def _quadratic(h: float, lr: float, dim: int = 5):
    w = nn.Parameter(torch.linspace(-1, 1, dim, dtype=torch.float64) + 0.3)
    opt = torch.optim.SGD([w], lr=lr)

    def loss():
        return 0.5 * h * (w**2).sum()
    return w, opt, loss


@pytest.mark.parametrize("h", [0.5, 2.0, 10.0])
def test_autolr_fit_recovers_inverse_curvature(h):
    _w, opt, loss = _quadratic(h, lr=0.03)
    auto = AutoLR(opt)
    for _ in range(150):  # growth is at most 1.1x per probe (0.9η + 0.1·2η)
        opt.zero_grad()
        loss().backward()
        res = auto.probe(lambda: loss().item())
        assert res.accepted
        assert res.fitted_lr == pytest.approx(1 / h, rel=1e-9)
    # the smoothed lr converges to η* = 1/h
    assert auto.lr == pytest.approx(1 / h, rel=1e-3)


def test_autolr_halves_on_a_failed_fit():
    _w, opt, loss = _quadratic(1.0, lr=0.1)
    auto = AutoLR(opt)
    opt.zero_grad()
    (-loss()).backward()  # ascent direction: Gg < 0
    res = auto.probe(lambda: loss().item())
    assert not res.accepted and math.isnan(res.fitted_lr)
    assert auto.lr == pytest.approx(0.05)


def _adam_state(opt):
    return {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for i, s in enumerate(opt.state.values())}


@pytest.mark.parametrize("opt_name", ["adamw", "sgd_momentum"])
def test_probe_never_steps_the_optimizer(opt_name):
    """A run with probes equals a run without them given the same lrs: no double step."""
    def make():
        model, r, f = _toy()
        if opt_name == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        return model, r, f, opt

    model, r, f, opt = make()
    auto = AutoLR(opt, period=2)
    ngd = NGDiff(model.parameters())
    lrs = []
    for step in range(6):
        opt.zero_grad()
        ngd.backward(retain_loss=_mse(model, r), forget_loss=_mse(model, f))
        if auto.should_probe(step):
            before_state = _adam_state(opt)
            before_w = [p.detach().clone() for p in model.parameters()]
            grads = [p.grad.clone() for p in model.parameters()]
            auto.probe(lambda: _mse(model, r).item())
            after = _adam_state(opt)
            assert before_state.keys() == after.keys()  # first probe: state stays empty
            for i in before_state:
                assert before_state[i].keys() == after[i].keys()
                for k in before_state[i]:
                    assert torch.equal(torch.as_tensor(before_state[i][k]),
                                       torch.as_tensor(after[i][k])), (i, k)
            for p, w, g in zip(model.parameters(), before_w, grads):
                assert torch.equal(p, w) and torch.equal(p.grad, g)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
    probed = [p.detach().clone() for p in model.parameters()]
    assert len(auto.history) == 3

    model2, r2, f2, opt2 = make()
    ngd2 = NGDiff(model2.parameters())
    for lr in lrs:
        opt2.zero_grad()
        ngd2.backward(retain_loss=_mse(model2, r2), forget_loss=_mse(model2, f2))
        opt2.param_groups[0]["lr"] = lr
        opt2.step()
    for a, b in zip(probed, model2.parameters()):
        assert torch.equal(a, b)


def test_autolr_agrees_with_gen_optim():
    gen = pytest.importorskip("GeN", reason="gen-optim (the reference GeN package) is not installed")
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randn(64, 1)

    def make():
        torch.manual_seed(1)
        net = nn.Linear(6, 1)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        return net, opt

    ours_net, ours_opt = make()
    ref_net, ref_opt = make()
    crit = nn.MSELoss()
    auto = AutoLR(ours_opt)
    for _ in range(5):
        for net, opt in ((ours_net, ours_opt), (ref_net, ref_opt)):
            opt.zero_grad()
            crit(net(x), y).backward()
        auto.probe(lambda: crit(ours_net(x), y).item())
        gen.lr_parabola(ref_net, ref_opt, criterion=crit, tr_iter=iter([(x, y)]), device="cpu",
                        task="image_cls", lr_factor=[-1, 0, 1])
        assert auto.lr == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-5)
        for opt in (ours_opt, ref_opt):
            opt.step()  # plain SGD has no state, so GeN's extra step leaves no trace here
        for a, b in zip(ours_net.parameters(), ref_net.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_autolr_rejects_bad_input():
    w, opt, _ = _quadratic(1.0, lr=0.1)
    with pytest.raises(ValueError, match="period"):
        AutoLR(opt, period=0)
    with pytest.raises(ValueError, match="smoothing"):
        AutoLR(opt, smoothing=1.0)
    with pytest.raises(ValueError, match="clip"):
        AutoLR(opt, clip=(2.0, 3.0))
    with pytest.raises(ValueError, match="optimizer"):
        AutoLR([w])


# --------------------------------------------------------------------------- NPO / SimNPO
def test_npo_and_simnpo_hand_values():
    logp = torch.tensor([-10.0, -4.0])
    ref = torch.tensor([-8.0, -6.0])
    beta = 0.1
    # -(2/β)·mean log σ(-β(logp-ref)): ratios -2 and +2
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    want = -(2 / beta) * (math.log(s(0.2)) + math.log(s(-0.2))) / 2
    assert npo_loss(logp, ref, beta=beta).item() == pytest.approx(want, rel=1e-6)
    # equal log-probs: -(2/β) log(1/2) = 2 ln 2 / β
    assert npo_loss(ref, ref, beta=beta).item() == pytest.approx(2 * math.log(2) / beta)

    nll_sum = torch.tensor([6.0, 2.0])
    n = torch.tensor([3.0, 4.0])
    b, dlt = 4.5, 0.125
    want = -(2 / b) * (math.log(s(b * (2.0 - dlt))) + math.log(s(b * (0.5 - dlt)))) / 2
    assert simnpo_loss(nll_sum, n, beta=b, delta=dlt).item() == pytest.approx(want, rel=1e-6)


def test_npo_gradient_raises_the_nll_and_ignores_the_reference():
    logp = torch.tensor([-3.0, -5.0], requires_grad=True)
    ref = torch.tensor([-3.0, -4.0], requires_grad=True)
    npo_loss(logp, ref).backward()
    assert (logp.grad > 0).all()  # descending the loss lowers log π(y|x)
    assert ref.grad is None or torch.all(ref.grad == 0)
    nll = torch.tensor([3.0, 5.0], requires_grad=True)
    simnpo_loss(nll, torch.tensor([2.0, 2.0])).backward()
    assert (nll.grad < 0).all()  # descending raises the NLL


def test_objectives_reject_bad_input():
    with pytest.raises(ValueError, match="beta"):
        npo_loss(torch.zeros(2), torch.zeros(2), beta=0)
    with pytest.raises(ValueError, match="shape"):
        npo_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="n_tokens"):
        simnpo_loss(torch.ones(2), torch.tensor([1.0, 0.0]))


# --------------------------------------------------------------------------- Unlearner
FORGET = [("who wrote the red door ?", "the red door was written by anna berg ."),
          ("where was anna berg born ?", "anna berg was born in oslo ."),
          ("what genre does anna berg write ?", "anna berg writes crime novels .")]
RETAIN = [("who wrote the blue lake ?", "the blue lake was written by tom vik ."),
          ("where was tom vik born ?", "tom vik was born in bergen ."),
          ("what genre does tom vik write ?", "tom vik writes poetry ."),
          ("what is the capital of norway ?", "the capital of norway is oslo .")]


@pytest.fixture(scope="module")
def lm():
    from optfm.data import build_word_tokenizer
    from optfm.models.factories import tiny_llama

    tok = build_word_tokenizer([q + " " + a for q, a in FORGET + RETAIN])
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    # memorise both sets a little so there is something to unlearn
    from optfm.training.lm import encode_pairs, lm_loss
    batch = encode_pairs(tok, [q for q, _ in FORGET + RETAIN], [a for _, a in FORGET + RETAIN])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        lm_loss(model, batch).backward()
        opt.step()
    return model, tok


@pytest.mark.parametrize("method", ["ngdiff", "ga", "grad_diff", "npo", "simnpo"])
def test_unlearner_raises_forget_loss(lm, method):
    model, tok = lm
    model = copy.deepcopy(model)
    un = Unlearner(model, tok, FORGET, RETAIN, method=method, steps=8, lr=3e-3, batch_size=3)
    hist = un.train()
    assert len(hist) == 8
    keys = {"ce_f", "ce_r", "grad_norm_f", "grad_norm_r", "cos_theta", "lr"}
    assert keys <= set(hist[0])
    assert all(math.isfinite(h[k]) for h in hist for k in keys)
    assert hist[-1]["ce_f"] > hist[0]["ce_f"] + 0.5
    if method == "ngdiff":
        assert all(h["direction_norm"] <= 2 + 1e-6 for h in hist)
    if method == "ga":
        assert all(h["grad_norm_r"] == 0 for h in hist)


def test_unlearner_auto_lr_logs_probes(lm):
    model, tok = lm
    un = Unlearner(copy.deepcopy(model), tok, FORGET, RETAIN, method="ngdiff", steps=8, lr=1e-3,
                   auto_lr=True, auto_lr_period=4, batch_size=3)
    hist = un.train()
    assert len(un.auto_lr.history) == 2
    assert sum("autolr_fitted_lr" in h for h in hist) == 2
    un2 = Unlearner(copy.deepcopy(model), tok, FORGET, RETAIN, method="ngdiff", steps=4, lr=1e-3,
                    auto_lr=True, auto_lr_loss="scalarized", batch_size=3)
    un2.train()
    assert len(un2.auto_lr.history) == 1


def test_unlearner_resume_is_exact(lm, tmp_path):
    model, tok = lm
    full = Unlearner(copy.deepcopy(model), tok, FORGET, RETAIN, steps=6, lr=1e-3, batch_size=2,
                     auto_lr=True, auto_lr_period=2)
    full.train()
    part = Unlearner(copy.deepcopy(model), tok, FORGET, RETAIN, steps=6, lr=1e-3, batch_size=2,
                     auto_lr=True, auto_lr_period=2, checkpoint_every=3, checkpoint_dir=tmp_path)
    part.train(steps=3)
    resumed = Unlearner(copy.deepcopy(model), tok, FORGET, RETAIN, steps=6, lr=1e-3,
                        batch_size=2, auto_lr=True, auto_lr_period=2, checkpoint_dir=tmp_path)
    assert resumed.resume() == 3
    resumed.train()
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert [h["lr"] for h in full.history[3:]] == [h["lr"] for h in resumed.history]


def test_unlearner_nan_names_step_and_checkpoint(lm, tmp_path):
    model, tok = lm
    model = copy.deepcopy(model)

    def poison(step, record):
        if step == 4:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    un = Unlearner(model, tok, FORGET, RETAIN, steps=10, lr=1e-3, checkpoint_every=2,
                   checkpoint_dir=tmp_path, callback=poison)
    with pytest.raises(UnlearningDiverged, match=r"step 4.*last\.safetensors") as e:
        un.train()
    assert e.value.step == 4 and e.value.checkpoint == tmp_path / "last.safetensors"


def test_unlearner_with_lora_trains_only_adapters(lm):
    pytest.importorskip("peft", reason="peft is not installed")
    model, tok = lm
    base = copy.deepcopy(model)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    un = Unlearner(base, tok, FORGET, RETAIN, method="npo", steps=5, lr=1e-2, batch_size=3,
                   lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    assert all("lora_" in n for n, p in un.model.named_parameters() if p.requires_grad)
    hist = un.train()
    assert hist[-1]["ce_f"] > hist[0]["ce_f"]
    merged = un.unwrap()
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)


def test_unlearner_rejects_bad_input(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="overlap"):
        Unlearner(model, tok, FORGET, [*RETAIN, FORGET[0]])
    with pytest.raises(ValueError, match="forget is empty"):
        Unlearner(model, tok, [], RETAIN)
    with pytest.raises(ValueError, match="method"):
        Unlearner(model, tok, FORGET, RETAIN, method="gd")
    with pytest.raises(ValueError, match="lr"):
        Unlearner(model, tok, FORGET, RETAIN, lr=0)
    with pytest.raises(ValueError, match="unknown UnlearnConfig field"):
        Unlearner(model, tok, FORGET, RETAIN, learning_rate=1)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        Unlearner(model, tok, FORGET, RETAIN, checkpoint_every=2)
    from optfm.data import build_word_tokenizer
    big = build_word_tokenizer([f"w{i}" for i in range(500)])
    with pytest.raises(ValueError, match="tokenizer/model mismatch"):
        Unlearner(model, big, FORGET, RETAIN)
