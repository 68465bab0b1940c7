r"""Direct Noise Optimization (DNO; Tang et al., "Tuning-Free Alignment of Diffusion Models with
Direct Noise Optimization", ICML 2025, arXiv 2405.18881).

Not the motion-generation method of the same acronym ("Optimizing Diffusion Noise Can Serve As
Universal Motion Priors"): this module aligns a frozen image diffusion sampler to a reward by
optimising the noise it consumes, with no change to the model's weights.

**Variable.** A sampler M (e.g. DDIM with η > 0) maps the injected noise
Z = (x_T, z_T, …, z_1), one tensor of shape (B, S+1, *latent) (slot 0 = x_T), to samples x = M(Z).
With η = 0 the sampler only reads x_T, so only slot 0 is optimised (``DNO.slots``).

**Loss** (per batch element b; the elements are independent problems)

    ℓ_b(Z)   = −r(M(Z)_b)
    L(Z)     = mean_b ℓ_b + γ · mean_b R(Z_b)

and one iteration is ``g = ∇ Σ_b [ℓ_b + γ R(Z_b)]`` (each element gets the gradient of its own
loss, as if it were optimised alone), per-element clipping ``g_b ← g_b · min(1, c/‖g_b‖)`` with
c = ``max_grad_norm``, then Adam (lr 0.01, *no* weight decay) on Z.

**Reward-gradient estimators** (``estimator``; ξ_k ~ N(0, I) on the optimised slots, K = n_perturb):

- ``"grad"``:  ∇ℓ by autograd through the sampler (the reward must be differentiable).
- ``"zeroth_order"``:  ĝ_Z = (1/(Kμ)) Σ_k (ℓ(Z + μξ_k) − ℓ(Z)) ξ_k — sampler and reward under
  ``no_grad``; the surrogate ⟨ĝ_Z, Z⟩ carries ĝ_Z into the optimiser.
- ``"hybrid"`` (Hybrid-2, as the authors implement it): x = M(Z) with the graph kept,
  x_k = M(Z + μξ_k) under ``no_grad``, a sample-space estimate
  ĝ_x = Σ_k (ℓ(x_k) − ℓ(x)) (x_k − x), normalised to unit norm per element, and back-propagation of
  the surrogate ⟨ĝ_x, M(Z)⟩ (update direction Jᵀĝ_x).

In every case R's gradient is exact (autograd on Z alone, no sampler call).

**Probability regulariser** R (:func:`probability_regularizer`). Flatten a noise sample to
D values, reshape into n = D/d rows of d values (U ∈ ℝ^{n×d}), μ̂ = row mean, Σ̂ = UᵀU/n:

    log p_mean = min(−n‖μ̂‖² / (2d), −log 2)
    t          = max(√(1 + ‖Σ̂ − I‖₂) − 1 − √(d/n), 0)        (‖·‖₂ spectral norm)
    log p_cov  = min(−n t² / 2, −log 2)
    R          = −[(log p_mean + log p_cov)(natural order)
                  + mean over K random permutations of the D values of the same]

The clamps make R a hinge with floor 4·log 2 and zero gradient while the noise looks Gaussian.
Under exact N(0, I) noise the covariance term sits at its floor for realistic n, but n‖μ̂‖² is
χ²_d whatever n is, so each ordering's mean term leaves its floor with probability
P(χ²_d > 2d log 2) (≈ 0.24 for d = 4); E[R] − 4 log 2 = 2·E[(χ²_d/(2d) − log 2)₊]
(= (1 + 2 log 2)/16 ≈ 0.149 for d = 4). R detects *atypical noise* (shifted mean, wrong scale,
correlated values); it does not detect every off-manifold sample: an unbounded reward can still
drift out of distribution through noise that looks typical.

Reward API mirrors DDPO: ``reward_fn(samples, prompts, metadata) -> (rewards (B,), info dict)``.
See ``specs/dno.md``.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["DNO", "DNO_ESTIMATORS", "probability_regularizer"]

DNO_ESTIMATORS = ("grad", "zeroth_order", "hybrid")
_LOG2 = math.log(2.0)
_CHUNK_ELEMENTS = 2**24  # bound on B·(orderings per chunk)·D floats held at once in R


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _draw_perms(k: int, size: int, generator: torch.Generator | None,
                device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    perms = [torch.randperm(size, generator=generator, device=gen_device) for _ in range(k)]
    return torch.stack(perms).to(device)


def _log_probs(u: Tensor, d: int) -> Tensor:
    """(…, D) values, D = n·d → log p_mean + log p_cov, shape (…)."""
    n = u.shape[-1] // d
    rows = u.reshape(*u.shape[:-1], n, d)
    mean = rows.mean(dim=-2)  # (…, d)
    log_p_mean = torch.clamp(-n * mean.pow(2).sum(-1) / (2 * d), max=-_LOG2)
    cov = rows.transpose(-1, -2) @ rows / n  # (…, d, d), symmetric
    eye = torch.eye(d, dtype=u.dtype, device=u.device)
    # Spectral norm of a symmetric matrix = largest |eigenvalue|; eigvalsh's backward has no
    # 1/(λ_i − λ_j) terms, so it stays finite for (near-)repeated eigenvalues.
    spec = torch.linalg.eigvalsh(cov - eye).abs().amax(dim=-1)
    t = torch.clamp(torch.sqrt(1 + spec) - 1 - math.sqrt(d / n), min=0)
    log_p_cov = torch.clamp(-n * t.pow(2) / 2, max=-_LOG2)
    return log_p_mean + log_p_cov


def probability_regularizer(noise: Tensor, *, d: int = 4, n_permutations: int = 100,
                            generator: torch.Generator | None = None,
                            pad: bool = False) -> Tensor:
    r"""DNO's probability regulariser R per sample (see the module docstring for the formula).

    Args:
        noise: (B, *rest); each sample is flattened to D values.
        d: row length (the paper's subsample dimension, 4 by default).
        n_permutations: K, the number of random orderings of the D values averaged with the
            natural order (the authors use 100). The same K permutations are used for every
            sample of the batch.
        generator: source of the permutations (the global RNG when ``None``).
        pad: when D is not a multiple of d, append zeros to reach the next multiple (after
            permuting, so the zeros always fill the last row) instead of raising. The zeros pull
            Σ̂ slightly towards 0 (by at most (d−1)/n), which matters only for tiny D.

    Returns:
        (B,) tensor R ≥ 4·log 2, differentiable w.r.t. ``noise`` (computed in float32 or wider,
        returned in that dtype).
    """
    if not isinstance(noise, Tensor) or noise.dim() < 2:
        raise ValueError("noise must be a tensor of shape (B, *rest) with at least 2 dims, got "
                         f"{getattr(noise, 'shape', type(noise).__name__)}")
    _check_int(d, "d", 1)
    _check_int(n_permutations, "n_permutations", 1)
    v = noise.reshape(noise.shape[0], -1)
    if not v.dtype.is_floating_point or v.dtype in (torch.float16, torch.bfloat16):
        v = v.float()
    b, size = v.shape
    rem = size % d
    if rem and not pad:
        raise ValueError(f"probability_regularizer: the flattened noise size D={size} is not "
                         f"divisible by d={d}; choose d dividing D or pass pad=True")
    n_pad = (d - rem) % d

    def padded(u: Tensor) -> Tensor:
        return torch.nn.functional.pad(u, (0, n_pad)) if n_pad else u

    natural = _log_probs(padded(v), d)  # (B,)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * (size + n_pad)))
    total = torch.zeros_like(natural)
    for start in range(0, n_permutations, chunk):
        # drawn chunk by chunk (same sequence of draws), so only k·D indices live at once
        idx = _draw_perms(min(chunk, n_permutations - start), size, generator, v.device)
        shuffled = v[:, idx]  # (B, k, D)
        total = total + _log_probs(padded(shuffled), d).sum(dim=1)
    return -(natural + total / n_permutations)


RewardFn = Callable[[Tensor, Any, Any], Any]


def _modules_of(sampler: Any, depth: int = 0) -> list[nn.Module]:
    """The modules a sampler runs: itself if a Module, else its ``unet``/``vae`` (also through
    a wrapping ``sampler``/``inner`` attribute)."""
    if isinstance(sampler, nn.Module):
        return [sampler]
    out: list[nn.Module] = []
    for name in ("unet", "vae"):
        m = getattr(sampler, name, None)
        if isinstance(m, nn.Module):
            out.append(m)
    if depth < 3:
        for name in ("sampler", "inner"):
            inner = getattr(sampler, name, None)
            if inner is not None and inner is not sampler:
                out.extend(_modules_of(inner, depth + 1))
    return out


class DNO:
    """Direct Noise Optimization of a frozen sampler's injected noise (see module docstring).

    Args:
        sampler: callable mapping noise (B, S+1, *latent) to samples (B, …); the model inside is
            frozen (call ``requires_grad_(False)`` on it; DNO differentiates w.r.t. the noise
            only and never writes ``.grad`` of the model). Optional attributes: ``eta`` (when
            ``eta == 0`` only slot 0, x_T, is optimised and regularised) and ``noise_shape``
            (a (S+1, *latent) tuple, checked against ``noise``; a method is ignored).
        reward_fn: ``reward_fn(samples, prompts, metadata) -> (rewards, info)`` with rewards of
            shape (B,) (a tensor, array or list; a bare rewards value without info is accepted).
            Must be differentiable for ``estimator="grad"``.
        noise: the initial noise (B, S+1, *latent); cloned into the leaf parameter ``self.noise``.
        prompts, metadata: passed unchanged to ``reward_fn`` (``prompts`` must have length B).
        lr: Adam learning rate (> 0); Adam has no weight decay.
        gamma: weight γ ≥ 0 of the regulariser R.
        estimator: one of ``DNO_ESTIMATORS`` (``"grad"``, ``"zeroth_order"``, ``"hybrid"``).
        mu: perturbation scale μ > 0 of the zeroth-order and hybrid estimators.
        n_perturb: K ≥ 1, perturbations per iteration (zeroth-order, hybrid).
        max_grad_norm: per-element gradient-norm clip (> 0), or ``None`` for no clipping.
        reg_d, reg_permutations: ``d`` and ``n_permutations`` of :func:`probability_regularizer`.
        generator: ``torch.Generator`` for the perturbations ξ_k and R's permutations.

    Attributes:
        noise: the optimised ``nn.Parameter`` (B, S+1, *latent).
        optimizer: the ``torch.optim.Adam`` over ``noise``.
        slots: the optimised slots (``slice(0, 1)`` when ``eta == 0``, else all).
        history: one dict per :meth:`step`.
        best_rewards, best_samples, best_noise: per batch element, the best reward seen so far,
            its sample and its noise (``None`` before the first evaluation).
    """

    def __init__(self, sampler: Callable[[Tensor], Tensor], reward_fn: RewardFn, noise: Tensor,
                 *, prompts: Sequence[Any] | None = None, metadata: Any = None,
                 lr: float = 0.01, gamma: float = 0.0, estimator: str = "grad",
                 mu: float = 0.01, n_perturb: int = 4, max_grad_norm: float | None = 1.0,
                 reg_d: int = 4, reg_permutations: int = 100,
                 generator: torch.Generator | None = None) -> None:
        if not callable(sampler):
            raise ValueError("sampler must be callable: noise (B, S+1, *latent) -> samples (B, ...)")
        if not callable(reward_fn):
            raise ValueError("reward_fn must be callable: (samples, prompts, metadata) -> "
                             "(rewards, info)")
        if estimator not in DNO_ESTIMATORS:
            raise ValueError(f"estimator must be one of {DNO_ESTIMATORS}, got {estimator!r}")
        for name, value, strict in (("lr", lr, True), ("gamma", gamma, False), ("mu", mu, True)):
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value < 0 or (strict and value == 0)):
                bound = "> 0" if strict else ">= 0"
                raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool)
                                          or not isinstance(max_grad_norm, (int, float))
                                          or not max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        self.n_perturb = _check_int(n_perturb, "n_perturb", 1)
        self.reg_d = _check_int(reg_d, "reg_d", 1)
        self.reg_permutations = _check_int(reg_permutations, "reg_permutations", 1)
        if not isinstance(noise, Tensor) or not noise.dtype.is_floating_point:
            raise ValueError("noise must be a floating-point tensor of shape (B, S+1, *latent)")
        if noise.dim() < 2 or noise.shape[0] < 1 or noise.shape[1] < 1:
            raise ValueError(f"noise must have shape (B, S+1, *latent) with B, S+1 >= 1, got "
                             f"{tuple(noise.shape)}")
        # a (S+1, *latent) sequence attribute is checked; a noise_shape *method* (as on
        # optfm.diffusion's DDIMSampler, which validates its input itself) is left alone
        expected = getattr(sampler, "noise_shape", None)
        if (expected is not None and not callable(expected)
                and tuple(noise.shape[1:]) != tuple(expected)):
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match the sampler's "
                             f"noise_shape (B, {', '.join(map(str, expected))})")
        if not torch.isfinite(noise).all():
            raise ValueError("noise contains non-finite values")
        self.batch_size = noise.shape[0]
        if prompts is not None and hasattr(prompts, "__len__") and len(prompts) != self.batch_size:
            raise ValueError(f"prompts has length {len(prompts)}, expected the batch size "
                             f"{self.batch_size} (noise.shape[0])")
        self.eta = float(getattr(sampler, "eta", 1.0))
        self.slots = slice(0, 1) if self.eta == 0 else slice(None)
        n_opt = noise[:, self.slots][0].numel()
        if n_opt % self.reg_d:
            raise ValueError(f"reg_d={self.reg_d} must divide the optimised noise size per "
                             f"sample D={n_opt}")
        self.sampler = sampler
        self.reward_fn = reward_fn
        self.prompts = prompts
        self.metadata = metadata
        self.lr, self.gamma, self.mu = float(lr), float(gamma), float(mu)
        self.estimator = estimator
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.generator = generator
        self.noise = nn.Parameter(noise.detach().clone())
        self.optimizer = torch.optim.Adam([self.noise], lr=self.lr, weight_decay=0.0)
        self.history: list[dict[str, Any]] = []
        self.best_rewards: Tensor | None = None
        self.best_samples: Tensor | None = None
        self.best_noise: Tensor | None = None
        self._samples_cache: tuple[int, Tensor] | None = None
        if any(p.requires_grad for m in _modules_of(sampler) for p in m.parameters()):
            import warnings
            warnings.warn("DNO: the sampler's model has parameters with requires_grad=True; "
                          "they are not optimised, only their gradients cost time and memory "
                          "(call unet.requires_grad_(False) and vae.requires_grad_(False))",
                          stacklevel=2)

    # ----------------------------------------------------------------- helpers
    def _sample(self, noise: Tensor, *, need_grad: bool) -> Tensor:
        with torch.set_grad_enabled(need_grad):
            x = self.sampler(noise)
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] != self.batch_size:
            raise ValueError(f"sampler must return a tensor of shape (B={self.batch_size}, ...), "
                             f"got {getattr(x, 'shape', type(x).__name__)}")
        if need_grad and not x.requires_grad:
            raise ValueError("sampler output does not depend differentiably on the noise (does "
                             "it run under torch.no_grad or detach?); estimator="
                             f"{self.estimator!r} needs gradients through the sampler")
        if not torch.isfinite(x.detach()).all():
            raise FloatingPointError("sampler returned non-finite samples")
        return x

    def _reward(self, x: Tensor, *, what: str = "rewards") -> tuple[Tensor, dict[str, Any]]:
        out = self.reward_fn(x, self.prompts, self.metadata)
        if isinstance(out, tuple) and len(out) == 2:
            rewards, info = out
        else:
            rewards, info = out, {}
        if not isinstance(rewards, Tensor):
            rewards = torch.as_tensor(rewards, dtype=torch.float32, device=x.device)
        if tuple(rewards.shape) != (self.batch_size,):
            raise ValueError(f"reward_fn must return rewards of shape (B,)=({self.batch_size},), "
                             f"got {tuple(rewards.shape)}")
        if not rewards.dtype.is_floating_point:
            rewards = rewards.float()
        if not torch.isfinite(rewards.detach()).all():
            raise FloatingPointError(f"reward_fn returned non-finite {what}: "
                                     f"{rewards.detach().cpu().tolist()}")
        return rewards, (info if isinstance(info, dict) else {"info": info})

    def _perturbation(self) -> Tensor:
        """ξ ~ N(0, I) on the optimised slots, zero elsewhere; shape of ``noise``."""
        shape = self.noise[:, self.slots].shape
        g = self.generator
        dev = g.device if g is not None else self.noise.device
        xi = torch.randn(shape, generator=g, device=dev, dtype=torch.float32)
        full = torch.zeros_like(self.noise)
        full[:, self.slots] = xi.to(self.noise.device, self.noise.dtype)
        return full

    def _regularizer(self, noise: Tensor) -> Tensor:
        return probability_regularizer(noise[:, self.slots], d=self.reg_d,
                                       n_permutations=self.reg_permutations,
                                       generator=self.generator)

    def _track_best(self, x: Tensor, rewards: Tensor, noise: Tensor) -> None:
        r = rewards.detach().float()
        if self.best_rewards is None:
            self.best_rewards = torch.full_like(r, -math.inf)
            self.best_samples = x.detach().clone()
            self.best_noise = noise.detach().clone()
        better = r > self.best_rewards
        if better.any():
            self.best_rewards = torch.where(better, r, self.best_rewards)
            self.best_samples[better] = x.detach()[better]
            self.best_noise[better] = noise.detach()[better]

    # ----------------------------------------------------------------- public
    def compute_gradient(self) -> tuple[Tensor, dict[str, Any]]:
        """The estimator's gradient of Σ_b [ℓ_b + γ R_b] w.r.t. ``noise`` at the current noise
        (before clipping; zero on non-optimised slots), and a record of the evaluation
        (rewards, R, loss, samples, info). Does not change the noise or the best-sample state."""
        z = self.noise
        b = self.batch_size
        bshape = (b,) + (1,) * (z.dim() - 1)
        # R first, so its permutations are the generator's first draws for every estimator
        with torch.set_grad_enabled(self.gamma > 0):
            reg = self._regularizer(z)
        if self.estimator == "grad":
            x = self._sample(z, need_grad=True)
            rewards, info = self._reward(x)
            if not rewards.requires_grad:
                raise ValueError("estimator='grad' needs a reward differentiable w.r.t. the "
                                 "samples (reward_fn returned a tensor without grad); use "
                                 "estimator='zeroth_order' or 'hybrid' for black-box rewards")
            surrogate = -rewards.sum()
        elif self.estimator == "zeroth_order":
            with torch.no_grad():
                x = self._sample(z.detach(), need_grad=False)
                rewards, info = self._reward(x)
                g = torch.zeros_like(z)
                for _ in range(self.n_perturb):
                    xi = self._perturbation()
                    r_k, _ = self._reward(self._sample(z.detach() + self.mu * xi,
                                                       need_grad=False), what="perturbed rewards")
                    # ℓ(Z + μξ) − ℓ(Z) with ℓ = −r
                    g += (rewards - r_k).to(z.dtype).view(bshape) * xi
                g /= self.n_perturb * self.mu
            surrogate = (g * z).sum()
        else:  # hybrid
            x = self._sample(z, need_grad=True)
            with torch.no_grad():
                xd = x.detach()
                rewards, info = self._reward(xd)
                gx = torch.zeros_like(xd)
                xb = (b,) + (1,) * (xd.dim() - 1)
                for _ in range(self.n_perturb):
                    xi = self._perturbation()
                    x_k = self._sample(z.detach() + self.mu * xi, need_grad=False)
                    r_k, _ = self._reward(x_k, what="perturbed rewards")
                    gx += (rewards - r_k).to(xd.dtype).view(xb) * (x_k - xd)
                norms = gx.reshape(b, -1).norm(dim=1).clamp_min(1e-12).view(xb)
                gx = gx / norms
            surrogate = (gx * x).sum()
        rewards = rewards.detach()
        total = surrogate + self.gamma * reg.sum() if self.gamma > 0 else surrogate
        (grad,) = torch.autograd.grad(total, [z])
        if self.slots != slice(None):
            mask = torch.zeros_like(grad)
            mask[:, self.slots] = 1
            grad = grad * mask
        reg = reg.detach()
        loss = -rewards.float().mean() + self.gamma * reg.float().mean()
        record = {"samples": x.detach(), "rewards": rewards, "reg": reg,
                  "loss": float(loss), "info": info}
        return grad, record

    def step(self) -> dict[str, Any]:
        """One DNO iteration; returns (and appends to ``history``) a record with ``iteration``,
        ``reward_mean``, ``rewards`` (per sample, at the noise *before* the update), ``reg_mean``,
        ``reg`` (per sample), ``loss`` (−mean reward + γ·mean R), ``grad_norm`` (per-sample
        pre-clip gradient norms), ``grad_norm_mean``, ``time_s`` and scalar ``info`` entries."""
        t0 = time.perf_counter()
        grad, rec = self.compute_gradient()
        z_before = self.noise.detach().clone()
        self._track_best(rec["samples"], rec["rewards"], z_before)
        norms = grad.reshape(self.batch_size, -1).norm(dim=1)
        if self.max_grad_norm is not None:
            coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            grad = grad * coef.view((-1,) + (1,) * (grad.dim() - 1)).to(grad.dtype)
        self.optimizer.zero_grad(set_to_none=True)
        self.noise.grad = grad
        self.optimizer.step()
        self.noise.grad = None
        self._samples_cache = None
        rewards = rec["rewards"].float().cpu()
        reg = rec["reg"].float().cpu()
        entry: dict[str, Any] = {
            "iteration": len(self.history),
            "reward_mean": float(rewards.mean()),
            "rewards": rewards.tolist(),
            "reg_mean": float(reg.mean()),
            "reg": reg.tolist(),
            "loss": rec["loss"],
            "grad_norm": norms.detach().float().cpu().tolist(),
            "grad_norm_mean": float(norms.detach().float().mean()),
            "time_s": time.perf_counter() - t0,
        }
        for key, value in rec["info"].items():
            if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
                entry[f"info_{key}"] = float(value)
            elif isinstance(value, Tensor) and value.numel() == 1:
                entry[f"info_{key}"] = float(value.detach())
        self.history.append(entry)
        return entry

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Samples and rewards at the current noise (no update); updates the best-sample state.
        Returns ``{"samples", "rewards", "reg", "info"}``."""
        z = self.noise.detach()
        x = self._sample(z, need_grad=False)
        rewards, info = self._reward(x)
        self._track_best(x, rewards, z)
        self._samples_cache = (self.noise._version, x)
        return {"samples": x, "rewards": rewards.detach(), "reg": self._regularizer(z),
                "info": info}

    def run(self, iterations: int, callback: Callable[[DNO, dict[str, Any]], Any] | None = None,
            *, final_eval: bool = True) -> list[dict[str, Any]]:
        """``iterations`` calls of :meth:`step`; ``callback(self, entry)`` after each (a truthy
        return stops early). With ``final_eval`` the final noise is evaluated too, so the best
        state includes it. Returns ``history``."""
        _check_int(iterations, "iterations", 0)
        for _ in range(iterations):
            entry = self.step()
            if callback is not None and callback(self, entry):
                break
        if final_eval:
            self.evaluate()
        return self.history

    @property
    def samples(self) -> Tensor:
        """Samples M(Z) of the current noise (computed under ``no_grad``, cached until the noise
        changes)."""
        cache = self._samples_cache
        if cache is None or cache[0] != self.noise._version:
            with torch.no_grad():
                x = self._sample(self.noise.detach(), need_grad=False)
            self._samples_cache = (self.noise._version, x)
            return x
        return cache[1]
