"""Direct Noise Optimization (optfm.alignment.dno): the regulariser R, the three estimators, DNO."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from optfm.alignment.dno import DNO, DNO_ESTIMATORS, probability_regularizer

FLOOR = 4 * math.log(2)


class ToySampler(nn.Module):
    """A DDIM-shaped toy: x = tanh(W_0 x_T + eta · Σ_s W_s z_s), as (B, 4, 4) "images".

    With eta = 0 the injected noise z_s is ignored, like DDIM with η = 0."""

    def __init__(self, slots: int = 3, latent=(2, 4, 4), eta: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        dim = math.prod(latent)
        self.register_buffer("w", torch.randn(slots, 16, dim, generator=g) / math.sqrt(dim))
        self.register_buffer("w2", torch.randn(16, 16, generator=g) / 4)
        self.eta = eta
        self.noise_shape = (slots, *latent)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.flatten(2)  # (B, S+1, dim)
        h = torch.einsum("bsd,sod->bso", flat, self.w)
        pre = h[:, 0] + self.eta * h[:, 1:].sum(1)
        x = torch.tanh(pre + 0.5 * torch.tanh(pre) @ self.w2)
        return x.view(-1, 4, 4)


def brightness(samples, prompts, metadata):
    return samples.mean(dim=(1, 2)), {"scale": 1.0}


TARGET = torch.linspace(-0.8, 0.8, 16).view(4, 4)


def smooth_reward(samples, prompts, metadata):
    return -((samples - TARGET) ** 2).mean(dim=(1, 2)), {}


def numpy_reward(samples, prompts, metadata):
    """Black-box: numpy in, numpy out (no autograd)."""
    x = samples.detach().cpu().numpy()
    return -((x - TARGET.numpy()) ** 2).mean(axis=(1, 2)), {}


def make_noise(b=4, slots=3, latent=(2, 4, 4), seed=1, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, slots, *latent, generator=g) + shift


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- regulariser


def reference_R(v: torch.Tensor, d: int, perms: list[torch.Tensor]) -> float:
    """Direct transcription of the formula for one flattened sample (spectral norm by SVD)."""

    def logp(u):
        n = u.numel() // d
        rows = u.view(n, d).double()
        mu = rows.mean(0)
        cov = rows.T @ rows / n
        lpm = min(-n * float(mu @ mu) / (2 * d), -math.log(2))
        spec = float(torch.linalg.matrix_norm(cov - torch.eye(d, dtype=cov.dtype), ord=2))
        t = max(math.sqrt(1 + spec) - 1 - math.sqrt(d / n), 0.0)
        lpc = min(-n * t * t / 2, -math.log(2))
        return lpm + lpc

    return -(logp(v) + sum(logp(v[p]) for p in perms) / len(perms))


def test_regularizer_matches_formula():
    scale = torch.tensor([1.0, 1.8, 0.5]).view(3, 1, 1, 1, 1)
    shift = torch.tensor([0.6, 0.0, 0.2]).view(3, 1, 1, 1, 1)
    noise = make_noise(b=3, latent=(4, 8, 8)) * scale + shift
    r = probability_regularizer(noise, d=4, n_permutations=5, generator=gen(3))
    g = gen(3)
    size = noise[0].numel()
    perms = [torch.randperm(size, generator=g) for _ in range(5)]
    for b in range(3):
        assert r[b].item() == pytest.approx(reference_R(noise[b].flatten(), 4, perms), rel=1e-4)
    assert r.shape == (3,)
    assert (r > FLOOR + 1).all()  # terms active for this shifted / scaled noise


def test_regularizer_floor_is_exact_with_zero_gradient_when_all_clamps_active():
    # n = 1 row: every ordering has n‖μ̂‖² = ‖v‖² < 2d·log 2 and t = 0, so R = 4·log 2 exactly.
    v = (torch.randn(5, 4, generator=gen(0)) * 0.5).requires_grad_()
    r = probability_regularizer(v, d=4, n_permutations=7, generator=gen(1))
    assert torch.allclose(r, torch.full_like(r, FLOOR), atol=1e-6)
    r.sum().backward()
    assert torch.equal(v.grad, torch.zeros_like(v))


def test_regularizer_gaussian_noise_sits_near_its_floor():
    # Realistic size (S+1 = 11 slots of 4×8×8). n‖μ̂‖² ~ χ²_4 for every n, so each ordering's mean
    # term leaves its floor with probability (1 + 4 log 2)/16 ≈ 0.24 and
    # E[R] = 4 log 2 + (1 + 2 log 2)/16 ≈ 2.922; the covariance term stays at its floor.
    z = torch.randn(256, 11, 4, 8, 8, generator=gen(0)).requires_grad_()
    r = probability_regularizer(z, n_permutations=20, generator=gen(1))
    assert (r >= FLOOR - 1e-5).all()
    expected = FLOOR + (1 + 2 * math.log(2)) / 16
    assert r.mean().item() == pytest.approx(expected, abs=0.06)
    r.sum().backward()
    at_floor = (r - FLOOR).abs() < 1e-6
    assert at_floor.sum() >= 1
    # the hinge: samples whose every ordering is at the floor get exactly zero gradient
    assert torch.equal(z.grad[at_floor], torch.zeros_like(z.grad[at_floor]))
    # elsewhere the gradient is small compared with atypical noise
    zs = (torch.randn(16, 11, 4, 8, 8, generator=gen(2)) + 0.5).requires_grad_()
    probability_regularizer(zs, n_permutations=20, generator=gen(1)).sum().backward()
    assert z.grad.flatten(1).norm(dim=1).max() < 0.1 * zs.grad.flatten(1).norm(dim=1).min()


def test_regularizer_grows_for_shifted_and_scaled_noise():
    z = torch.randn(8, 11, 4, 8, 8, generator=gen(0))
    base = probability_regularizer(z, n_permutations=10, generator=gen(1))
    small = probability_regularizer(z + 0.1, n_permutations=10, generator=gen(1))
    shifted = probability_regularizer(z + 0.5, n_permutations=10, generator=gen(1))
    scaled = probability_regularizer(2 * z, n_permutations=10, generator=gen(1))
    assert base.max() < FLOOR + 1.0
    assert (small > base.max()).all()
    assert (shifted > 50 * FLOOR).all() and (shifted > small).all()
    assert (scaled > 50 * FLOOR).all()
    # decorrelated → correlated values (each value repeated 4× along rows) is atypical too
    corr = z.flatten(1)[:, : z[0].numel() // 4].repeat_interleave(4, dim=1)
    assert (probability_regularizer(corr, n_permutations=10, generator=gen(1)) > 50).all()


def test_regularizer_divisibility_and_padding():
    z = torch.randn(2, 10, generator=gen(0))
    with pytest.raises(ValueError, match=r"D=10.*d=4"):
        probability_regularizer(z, d=4)
    r = probability_regularizer(z, d=4, pad=True, n_permutations=3, generator=gen(0))
    assert r.shape == (2,) and torch.isfinite(r).all()
    with pytest.raises(ValueError, match="n_permutations"):
        probability_regularizer(z, d=2, n_permutations=0)
    with pytest.raises(ValueError, match="d must"):
        probability_regularizer(z, d=0)
    a = probability_regularizer(z, d=2, n_permutations=4, generator=gen(5))
    b = probability_regularizer(z, d=2, n_permutations=4, generator=gen(5))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------- DNO


def test_grad_estimator_raises_brightness_and_tracks_best():
    sampler = ToySampler()
    noise = make_noise()
    dno = DNO(sampler, brightness, noise, lr=0.05, generator=gen(0), reg_permutations=4)
    group = dno.optimizer.param_groups[0]
    assert isinstance(dno.optimizer, torch.optim.Adam) and group["weight_decay"] == 0
    assert dno.noise.is_leaf and dno.noise.data_ptr() != noise.data_ptr()
    hist = dno.run(30)
    assert len(hist) == 30
    assert hist[-1]["reward_mean"] > hist[0]["reward_mean"] + 0.3
    for key in ("reward_mean", "rewards", "reg_mean", "reg", "loss", "grad_norm", "time_s"):
        assert key in hist[0]
    assert hist[0]["info_scale"] == 1.0 and len(hist[0]["rewards"]) == 4
    with torch.no_grad():
        final = brightness(sampler(dno.noise), None, None)[0]
        assert torch.allclose(dno.samples, sampler(dno.noise))
        # best state: consistent, and at least as good as every reward seen (incl. the final one)
        assert torch.allclose(dno.best_samples, sampler(dno.best_noise))
        assert torch.allclose(brightness(dno.best_samples, None, None)[0], dno.best_rewards)
    seen = torch.tensor([h["rewards"] for h in hist]).amax(0)
    assert (dno.best_rewards >= torch.maximum(seen, final) - 1e-6).all()
    assert torch.equal(noise, make_noise())  # the caller's tensor is untouched


def test_batch_elements_are_independent_problems():
    noise = make_noise(b=3)
    kw = dict(lr=0.05, gamma=0.5, reg_permutations=3)
    joint = DNO(ToySampler(), brightness, noise, generator=gen(0), **kw)
    alone = DNO(ToySampler(), brightness, noise[:1], generator=gen(0), **kw)
    joint.run(5, final_eval=False)
    alone.run(5, final_eval=False)
    assert torch.allclose(joint.noise[:1], alone.noise, atol=1e-6)


def test_gamma_keeps_noise_typical():
    noise = make_noise(b=4)
    runs = {}
    for gamma in (0.0, 1.0):
        dno = DNO(ToySampler(), brightness, noise, lr=0.05, gamma=gamma, generator=gen(0),
                  reg_permutations=8)
        runs[gamma] = dno.run(100)
    r0, r1 = runs[0.0][-1], runs[1.0][-1]
    # γ = 0 drifts to atypical noise (R ≈ 8.4 here); γ = 1 stays at the floor (≈ 2.78)
    assert r0["reg_mean"] > 2 * r1["reg_mean"]
    assert r1["reg_mean"] < FLOOR + 0.2
    assert r1["reward_mean"] > runs[1.0][0]["reward_mean"]  # still brightens with γ > 0


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def test_zeroth_order_estimate_correlates_with_true_gradient():
    noise = make_noise(b=8, seed=4)
    true, _ = DNO(ToySampler(), smooth_reward, noise, estimator="grad").compute_gradient()
    zo = DNO(ToySampler(), numpy_reward, noise, estimator="zeroth_order", n_perturb=128,
             generator=gen(0))
    est, rec = zo.compute_gradient()
    cos = _cosines(est, true)
    # D = 96 values per sample, K = 128: E[cos] ≈ √(K/(K+D+1)) ≈ 0.75
    assert cos.min() > 0.3 and cos.mean() > 0.5, cos
    assert rec["rewards"].shape == (8,)
    # Hybrid-2 estimates in the 16-dim sample space, then maps back with Jᵀ: better per K
    hy = DNO(ToySampler(), numpy_reward, noise, estimator="hybrid", n_perturb=32,
             generator=gen(0))
    est_h, _ = hy.compute_gradient()
    cos_h = _cosines(est_h, true)
    assert cos_h.min() > 0.3 and cos_h.mean() > 0.5, cos_h


def test_hybrid_raises_black_box_reward():
    noise = make_noise(b=4, seed=2)
    dno = DNO(ToySampler(), numpy_reward, noise, estimator="hybrid", lr=0.05, generator=gen(0))
    hist = dno.run(40)
    first, last = hist[0]["rewards"], hist[-1]["rewards"]
    assert all(b > a for a, b in zip(first, last)), (first, last)
    assert hist[-1]["reward_mean"] > hist[0]["reward_mean"] + 0.05


def test_zeroth_order_raises_black_box_reward():
    noise = make_noise(b=4, seed=2)
    dno = DNO(ToySampler(), numpy_reward, noise, estimator="zeroth_order", lr=0.05,
              n_perturb=16, generator=gen(0))
    hist = dno.run(40)
    assert hist[-1]["reward_mean"] > hist[0]["reward_mean"] + 0.05


@pytest.mark.parametrize("estimator", DNO_ESTIMATORS)
def test_eta_zero_optimises_only_x_T(estimator):
    sampler = ToySampler(eta=0.0)
    noise = make_noise(b=2, shift=0.3)  # atypical, so R's gradient is active on every slot
    dno = DNO(sampler, smooth_reward, noise, estimator=estimator, gamma=1.0, lr=0.05,
              generator=gen(0), reg_permutations=4)
    assert dno.slots == slice(0, 1)
    dno.run(5)
    assert torch.equal(dno.noise[:, 1:], noise[:, 1:])
    assert not torch.allclose(dno.noise[:, 0], noise[:, 0])
    # R is computed on slot 0 only
    r = probability_regularizer(noise[:, :1], n_permutations=4, generator=gen(0))
    assert dno.history[0]["reg"] == pytest.approx(r.tolist(), rel=1e-5)


def test_eta_one_optimises_all_slots():
    noise = make_noise(b=2)
    dno = DNO(ToySampler(eta=1.0), smooth_reward, noise, lr=0.05)
    dno.run(3)
    assert (dno.noise - noise).flatten(2).abs().amax(-1).min() > 0


def test_gradient_clipping_is_per_sample_then_adam():
    noise = make_noise(b=3)

    def big(samples, prompts, metadata):  # per-sample gradient norms far above the clip
        return 1e3 * samples.mean(dim=(1, 2)) * torch.tensor([1.0, 3.0, 10.0]), {}

    probe = DNO(ToySampler(), big, noise, max_grad_norm=1.0, lr=0.01)
    dno = DNO(ToySampler(), big, noise, max_grad_norm=1.0, lr=0.01)
    ref = nn.Parameter(noise.clone())
    adam = torch.optim.Adam([ref], lr=0.01)
    for _ in range(3):
        probe.noise.data.copy_(ref.data)
        grad, _ = probe.compute_gradient()
        norms = grad.flatten(1).norm(dim=1)
        assert (norms > 1).all()
        ref.grad = grad / (norms + 1e-6).view(-1, 1, 1, 1, 1)  # each sample clipped to norm 1
        adam.step()
        entry = dno.step()
        assert entry["grad_norm"] == pytest.approx(norms.tolist(), rel=1e-5)
    assert torch.allclose(dno.noise, ref, atol=1e-6)


def test_invalid_hyperparameters():
    s, n = ToySampler(), make_noise()
    for kw, name in [({"estimator": "adam"}, "estimator"), ({"gamma": -1.0}, "gamma"),
                     ({"lr": 0.0}, "lr"), ({"lr": -1e-3}, "lr"), ({"mu": 0.0}, "mu"),
                     ({"n_perturb": 0}, "n_perturb"), ({"max_grad_norm": 0.0}, "max_grad_norm"),
                     ({"reg_d": 5}, "reg_d"), ({"reg_permutations": 0}, "reg_permutations"),
                     ({"prompts": ["a", "b"]}, "prompts")]:
        with pytest.raises(ValueError, match=name):
            DNO(s, brightness, n, **kw)


def test_noise_shape_mismatch():
    s = ToySampler()
    with pytest.raises(ValueError, match="noise_shape"):
        DNO(s, brightness, torch.randn(2, 4, 2, 4, 4))
    with pytest.raises(ValueError, match="noise"):
        DNO(s, brightness, torch.randn(8))

    class MethodShape:  # like optfm.diffusion's DDIMSampler: noise_shape(batch_size) is a method
        eta = 1.0

        def __init__(self):
            self.toy = ToySampler()

        def noise_shape(self, batch_size):
            return (batch_size, 3, 2, 4, 4)

        def __call__(self, z):
            return self.toy(z)

    DNO(MethodShape(), brightness, make_noise()).step()
    with pytest.raises(ValueError, match="non-finite"):
        DNO(s, brightness, make_noise().fill_(float("nan")))


def test_bad_rewards_and_samplers():
    n = make_noise()
    wrong_shape = DNO(ToySampler(), lambda x, p, m: (x.mean(dim=(1, 2))[:, None], {}), n)
    with pytest.raises(ValueError, match="shape"):
        wrong_shape.step()

    def nan_reward(x, p, m):
        r = x.mean(dim=(1, 2))
        return r * torch.tensor([1.0, float("nan"), 1.0, 1.0]), {}

    with pytest.raises(FloatingPointError, match="non-finite"):
        DNO(ToySampler(), nan_reward, n).step()
    with pytest.raises(ValueError, match="differentiable"):
        DNO(ToySampler(), numpy_reward, n, estimator="grad").step()

    def detached(z):
        with torch.no_grad():
            return ToySampler()(z)

    with pytest.raises(ValueError, match="sampler output"):
        DNO(detached, smooth_reward, n, estimator="hybrid").step()
    with pytest.raises(ValueError, match="sampler must return"):
        DNO(lambda z: z[:2, 0], smooth_reward, n).step()
    # a bare rewards array (no info dict) is accepted
    entry = DNO(ToySampler(), lambda x, p, m: np.zeros(4), n, estimator="zeroth_order").step()
    assert entry["reward_mean"] == 0.0
