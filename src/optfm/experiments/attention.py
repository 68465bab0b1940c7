"""``attention``: softmax vs Gaussian attention kernels, gradient descent on one attention layer, and
a real-task check on locally generated ListOps (specs/attention.md; paper: "Unraveling the Gradient
Descent Dynamics of Transformers", NeurIPS 2024).

Five arm families (one arm = one grid cell with all its seeds, so a killed run resumes per cell):

``grid`` (claims 2-4)
    Realisable teacher data (:func:`~optfm.attention.make_teacher_data`: X with N(0, 1) entries,
    y = teacher(X), one head, no W_O, head size d = D). The student
    (:func:`~optfm.attention.make_student`) copies the teacher and redraws only the trained subset
    (``W_V`` | ``W_Q`` | ``W_Q+W_K`` | ``all``) from N(0, (init/√D)²), so the global minimum is 0.
    The teacher's weights have scale ``teacher_scale`` (default 1; ``none`` ties it to the
    student's init scale). Full-batch float64 GD (:func:`~optfm.attention.train_gd`) for ``steps``
    steps (stopping early once loss/initial < ``stop_tol``).

    **Learning-rate rule**: ``lr = lr_frac / λ_max(∇²L at the initial point, trained subset)``
    per run (Lanczos on Hessian-vector products; for ``W_V`` the exact ``σ_max(A)²/N``). This
    adapts to each kernel's curvature (the Gaussian Hessian is typically several times sharper) and
    to each init scale, so neither kernel is favoured by a shared step size - but it also removes
    the plain *scale* of vanishing gradients (tiny attention entries give a tiny λ_max and a large
    lr); only the shape of the landscape is left. The lr of every run is recorded.

    Per run: final/initial loss ratio, success (< ``tol_success``) and strict success
    (< ``tol_strict``), steps to each threshold, final gradient norm (and its ratio to the
    initial one), σ_min and σ_max of the stacked attention output A at the start, σ_min at the
    end, attention-row statistics at start and end (rows with max weight > 0.99: softmax
    saturation; the largest entry per row; Gaussian rows that vanished, i.e. every entry at or
    below machine epsilon, as :func:`~optfm.attention.count_underflow_rows` counts them), and for
    runs that are neither successful nor diverged the extreme Hessian
    eigenvalues at the end point (Lanczos; skipped above ``hessian_max_params`` parameters).
    :func:`classify_run` sorts unsuccessful runs into *still decreasing* (the loss fell by more
    than 5 % over the last fifth of the steps), *not stationary* (final gradient > 1 % of the
    initial one: oscillating or crawling), *flat* (Hessian-vector products vanish), *saddle*
    (near-stationary with λ_min < -1e-6·λ_max) and *minimum-like* (near-stationary with
    λ_min ≥ -1e-6·λ_max, which includes the exact zero eigenvalues of softmax).

``wv`` (claim 1)
    Only W_V trained, **random** targets y ~ N(0, 1) (not realisable unless A has full row rank,
    which needs D ≥ N·n): with teacher targets a W_V-only problem is consistent for every D, so
    the D ≥ N·n condition can only be seen with targets outside the span of A. Also records the
    least-squares optimum ``min_W ‖A W - Y‖² / ‖A W_0 - Y‖²`` (the best ratio any method can
    reach) and the steps to each threshold against κ(A)² = (σ_max/σ_min)². For GD on this
    quadratic with ``lr = lr_frac·N/σ_max²`` the loss ratio is at most ``(1 - lr_frac/κ²)^{2t}``
    when A has full row rank, i.e. about ``ln(1/tol)·κ² / (2·lr_frac)`` steps.

``landscape`` (claim 5)
    :func:`~optfm.attention.two_stage_training`: a shared first stage (softmax, W_V only,
    ``landscape_first_steps``) then, per kernel, a second stage on all weights from the same point
    (``landscape_second_steps``, lr = lr_frac / λ_max of that kernel's Hessian at the shared
    point). Around each kernel's final point: the loss on a 2-D slice
    (:func:`~optfm.attention.loss_slice_2d`) along two filter-normalised directions
    (:func:`~optfm.attention.filter_normalized_directions` with ``filter_dim=1``: a filter is a
    column of ``W ∈ R^{D×D}``, one output unit of ``X W``; the same random draw for both kernels).
    Roughness of the grid: strict local minima (8-neighbourhood, interior), the fraction of
    interior points where the 2×2 finite-difference Hessian is not positive semi-definite, and
    the mean |second difference| (over both axes) divided by the grid's loss range (h² for a bowl
    ``a·α² + b·β²`` centred on the grid, h the grid step; larger = rougher).

``listops`` (real task)
    ListOps generated locally (:func:`~optfm.data.listops.make_listops_splits`, lengths 10 to
    ``listops_max_length``), a 2-layer pre-LN :class:`~optfm.attention.TransformerClassifier`
    (mean pooling) per kernel variant (``softmax``, ``gaussian``, ``gaussian-rownorm`` =
    row-normalised Gaussian), AdamW, cross-entropy; test accuracy and loss per epoch (epoch 0 =
    before training), training loss per epoch, Gaussian underflow rows; the majority-class
    baseline for reference.

The seeds of one arm are independent runs; with ``workers > 1`` (quick and full) they run in that
many spawned worker processes (``concurrent.futures`` with the ``spawn`` start method, one intra-op
thread each), with results identical to ``workers=1``. As for any spawn-based code, a script that
calls :func:`~optfm.experiments.run_experiment` itself needs the ``if __name__ == "__main__":``
guard (the ``optfm`` command and ``python -m optfm`` are fine); ``--set workers=1`` avoids
processes altogether.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from optfm.experiments.base import Arm, Experiment, Outcome, RunContext, pyplot, register
from optfm.experiments.config import ConfigError, ExperimentConfig
from optfm.experiments.stats import mean_se

__all__ = [
    "AttentionConfig",
    "AttentionExperiment",
    "classify_run",
    "landscape_roughness",
    "wilson_ci",
]

KERNELS = ("softmax", "gaussian")
SUBSETS = ("W_V", "W_Q", "W_Q+W_K", "all")
SUBSET_KEYS = {"W_V": "WV", "W_Q": "WQ", "W_Q+W_K": "WQ+WK", "all": "all"}
LISTOPS_VARIANTS = {"softmax": ("softmax", False), "gaussian": ("gaussian", False),
                    "gaussian-rownorm": ("gaussian", True)}
COLORS = {"softmax": "tab:orange", "gaussian": "tab:blue", "gaussian-rownorm": "tab:green"}
SATURATED = 0.99  # a softmax row with max weight above this is (nearly) one-hot
VANISHING = 1e-8  # a Gaussian row whose largest entry is below this has (nearly) no gradient
SADDLE_REL = 1e-6  # λ_min < -SADDLE_REL·λ_max: a direction of negative curvature
LATE_DECREASE = 0.05  # loss fell by more than this fraction over the last fifth: still moving
GRAD_STATIONARY = 1e-2  # final gradient above this fraction of the initial one: not stationary
CURVE_POINTS = 80


@dataclass
class AttentionConfig(ExperimentConfig):
    """Fields of the ``attention`` experiment (module docstring for the protocol)."""

    # GD grid on realisable teacher data (claims 2-4): kernels × subsets × inits × Ds at (N, n)
    kernels: tuple[str, ...] = KERNELS
    subsets: tuple[str, ...] = SUBSETS
    inits: tuple[float, ...] = (0.5, 2.0)
    Ds: tuple[int, ...] = (4, 16, 64)
    N: int = 8
    n: int = 4
    # extra (N, n) pairs (size_Ns × size_ns) at D = size_D, init = size_init, every kernel/subset
    size_Ns: tuple[int, ...] = ()
    size_ns: tuple[int, ...] = ()
    size_D: int = 16
    size_init: float = 1.0
    teacher_scale: float | None = 1.0  # None: the teacher is drawn at the student's init scale
    seeds: int = 4
    steps: int = 4000
    lr_frac: float = 0.5
    tol_success: float = 1e-3
    tol_strict: float = 1e-6
    stop_tol: float = 1e-6
    hessian_max_params: int = 20000
    hessian_iters: int = 200
    # claim 1: W_V only, random targets, (N, n) in wv_Ns × wv_ns, every D in wv_Ds
    wv_Ns: tuple[int, ...] = (2, 8)
    wv_ns: tuple[int, ...] = (2, 4)
    wv_Ds: tuple[int, ...] = (8, 32, 128)
    wv_inits: tuple[float, ...] = (1.0,)
    wv_seeds: int = 4
    wv_steps: int = 10000
    # claim 5: two-stage training and 2-D loss slices
    landscape_teachers: tuple[str, ...] = KERNELS
    landscape_seeds: int = 2
    landscape_D: int = 16
    landscape_first_steps: int = 2000
    landscape_second_steps: int = 3000
    landscape_points: int = 25
    landscape_span: float = 1.0
    # real task: ListOps
    listops_variants: tuple[str, ...] = tuple(LISTOPS_VARIANTS)
    listops_seeds: int = 2
    listops_train: int = 2000
    listops_test: int = 500
    listops_max_length: int = 50
    listops_epochs: int = 5
    listops_batch: int = 50
    listops_lr: float = 1e-3
    listops_d_model: int = 64
    listops_heads: int = 4
    listops_layers: int = 2
    # independent runs of one arm (seeds) go to this many worker processes (1 = in process)
    workers: int = 2

    def validate(self) -> None:
        super().validate()
        for k in (*self.kernels, *self.landscape_teachers):
            if k not in KERNELS:
                raise ConfigError(f"kernels / landscape_teachers: {k!r} is not one of "
                                  f"{', '.join(KERNELS)}")
        for s in self.subsets:
            if s not in SUBSETS:
                raise ConfigError(f"subsets: {s!r} is not one of {', '.join(SUBSETS)}")
        for v in self.listops_variants:
            if v not in LISTOPS_VARIANTS:
                raise ConfigError(f"listops_variants: {v!r} is not one of "
                                  f"{', '.join(LISTOPS_VARIANTS)}")
        for key in ("Ds", "wv_Ds", "size_Ns", "size_ns", "wv_Ns", "wv_ns"):
            if any(v < 1 for v in getattr(self, key)):
                raise ConfigError(f"{key} must hold ints >= 1, got {getattr(self, key)}")
        if any(not (math.isfinite(v) and v > 0) for v in (*self.inits, *self.wv_inits,
                                                          self.size_init)):
            raise ConfigError(f"inits, wv_inits and size_init must be > 0, got {self.inits}, "
                              f"{self.wv_inits}, {self.size_init}")
        if self.teacher_scale is not None and not self.teacher_scale > 0:
            raise ConfigError(f"teacher_scale must be > 0 or none, got {self.teacher_scale}")
        for key in ("N", "n", "size_D", "seeds", "wv_seeds", "hessian_iters", "landscape_D",
                    "landscape_points", "listops_batch", "listops_d_model", "listops_heads",
                    "listops_layers", "listops_train", "listops_test", "listops_epochs",
                    "workers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.landscape_points < 3:
            raise ConfigError(f"landscape_points must be >= 3, got {self.landscape_points}")
        for key in ("steps", "wv_steps", "landscape_seeds", "landscape_first_steps",
                    "landscape_second_steps", "listops_seeds", "hessian_max_params"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0 < self.lr_frac < 2:
            raise ConfigError(f"lr_frac must lie in (0, 2) (GD is unstable at 2/λ_max), "
                              f"got {self.lr_frac}")
        if not 0 <= self.stop_tol <= self.tol_strict <= self.tol_success < 1:
            raise ConfigError("need 0 <= stop_tol <= tol_strict <= tol_success < 1, got "
                              f"{self.stop_tol}, {self.tol_strict}, {self.tol_success}")
        if self.landscape_span <= 0 or self.listops_lr <= 0:
            raise ConfigError("landscape_span and listops_lr must be > 0")
        if self.listops_d_model % self.listops_heads:
            raise ConfigError(f"listops_d_model ({self.listops_d_model}) must be divisible by "
                              f"listops_heads ({self.listops_heads})")
        if self.listops_max_length < 10:
            raise ConfigError(f"listops_max_length must be >= 10, got {self.listops_max_length}")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def wilson_ci(k: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval for k successes out of n (``scipy.stats.binomtest``)."""
    from scipy.stats import binomtest

    if n == 0:
        return (0.0, 1.0)
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def _salted(seed: int, salt: str) -> int:
    digest = hashlib.sha256(f"attention-exp:{salt}:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**62


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:.{digits}g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.{digits}f}"


def _median(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.median(v)) if v else None


def _row_stats(model, X: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        s = model.attention_matrix(X)  # (N, H, n, n)
        rmax = s.amax(dim=-1)
    return {"frac_saturated": float((rmax > SATURATED).double().mean()),
            "frac_vanishing": float((rmax < VANISHING).double().mean()),
            "mean_row_max": float(rmax.mean()), "median_row_max": float(rmax.median()),
            "mean_row_sum": float(s.sum(dim=-1).mean())}


def _steps_to(ratios: list[float], steps: list[int], tol: float) -> int | None:
    for r, t in zip(ratios, steps):
        if r is not None and math.isfinite(r) and r < tol:
            return int(t)
    return None


def _downsample(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    if len(steps) <= CURVE_POINTS:
        return list(steps), list(values)
    idx = np.unique(np.linspace(0, len(steps) - 1, CURVE_POINTS).round().astype(int))
    return [steps[i] for i in idx], [values[i] for i in idx]


def landscape_roughness(grid: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Roughness of a 2-D loss grid (module docstring): ``local_minima`` (strict, interior,
    8-neighbourhood), ``nonconvex_frac`` (interior points whose 2×2 finite-difference Hessian has
    a negative eigenvalue beyond rounding) and ``second_diff`` (mean |Δ²L| over both axes divided
    by the grid's range; ``h²`` for a centred bowl ``a·α² + b·β²`` with grid step h)."""
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 2 or min(g.shape) < 3:
        raise ValueError(f"grid must be 2-D with at least 3 points per axis, got {g.shape}")
    c = g[1:-1, 1:-1]
    neigh = [g[1 + di:g.shape[0] - 1 + di, 1 + dj:g.shape[1] - 1 + dj]
             for di in (-1, 0, 1) for dj in (-1, 0, 1) if (di, dj) != (0, 0)]
    minima = np.all([c < nb for nb in neigh], axis=0)
    dxx = g[2:, 1:-1] - 2 * c + g[:-2, 1:-1]
    dyy = g[1:-1, 2:] - 2 * c + g[1:-1, :-2]
    dxy = (g[2:, 2:] - g[2:, :-2] - g[:-2, 2:] + g[:-2, :-2]) / 4
    half_tr = (dxx + dyy) / 2
    lam_min = half_tr - np.sqrt(((dxx - dyy) / 2) ** 2 + dxy**2)
    span = float(g.max() - g.min())
    eps = 1e-9 * max(span, np.finfo(np.float64).tiny)
    return {
        "local_minima": int(minima.sum()),
        "nonconvex_frac": float((lam_min < -eps).mean()),
        "second_diff": float((np.abs(dxx).mean() + np.abs(dyy).mean()) / 2 / span) if span > 0
        else 0.0,
    }


# --------------------------------------------------------------------------------------------
# one GD run
# --------------------------------------------------------------------------------------------


def _hvp_norm(loss_fn, params: list[torch.Tensor], seed: int) -> float:
    """‖H v‖ / ‖v‖ for one random v (0 when the loss is at most linear in ``params``)."""
    from optfm.training.seed import make_generator

    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    if not any(g.requires_grad for g in grads):
        return 0.0
    g = make_generator(seed)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    hv = torch.autograd.grad(grads, params, grad_outputs=v, allow_unused=True)
    num = sum(float(h.pow(2).sum()) for h in hv if h is not None)
    return math.sqrt(num / sum(float(x.pow(2).sum()) for x in v))


def _gd_run(job: dict[str, Any]) -> dict[str, Any]:
    """One GD run (a picklable job: ``config`` plus the cell's parameters and a seed)."""
    from optfm.attention import (
        make_student,
        make_teacher_data,
        max_hessian_eigenvalue,
        min_hessian_eigenvalue,
        regression_loss,
        stacked_attention_output,
        train_gd,
        trainable_parameters,
    )
    from optfm.training.seed import make_generator

    config: AttentionConfig = job["config"]
    kernel, subset, seed, steps = job["kernel"], job["subset"], job["seed"], job["steps"]
    N, n, D, init = job["N"], job["n"], job["D"], job["init"]
    t0 = time.perf_counter()
    X, y, teacher = make_teacher_data(N, n, D, kernel=kernel, init_scale=job["teacher_scale"],
                                      seed=_salted(seed, "data"))
    if job["target"] == "random":
        y = torch.randn(y.shape, generator=make_generator(_salted(seed, "targets")),
                        dtype=y.dtype)
    student = make_student(teacher, trainable=subset, seed=_salted(seed, "student"),
                           init_scale=init)
    params = trainable_parameters(student, subset)
    n_params = sum(p.numel() for p in params)

    def loss_fn() -> torch.Tensor:
        return regression_loss(student, X, y)

    A = stacked_attention_output(student, X)
    sv = torch.linalg.svdvals(A)
    sigma_max = float(sv[0])
    opt_ratio = None
    if subset == "W_V":  # Hessian = (1/N) AᵀA ⊗ I: λ_max = σ_max(A)² / N exactly
        lam_max0 = sigma_max**2 / N
        Y = y.reshape(-1, D)
        W_opt = torch.linalg.lstsq(A, Y, driver="gelsd").solution
        r0 = float((A @ student.W_V.detach() - Y).pow(2).sum())
        opt_ratio = float((A @ W_opt - Y).pow(2).sum()) / r0 if r0 > 0 else 0.0
    else:
        lam_max0 = max_hessian_eigenvalue(loss_fn, params, iters=config.hessian_iters,
                                          seed=_salted(seed, "lanczos"))
    lr = config.lr_frac / max(lam_max0, np.finfo(np.float64).tiny)
    grads = torch.autograd.grad(loss_fn(), params)
    grad0 = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    start = _row_stats(student, X)
    log_every = max(1, steps // 500)
    res = train_gd(student, X, y, trainable=subset, lr=lr, steps=steps, tol=config.stop_tol,
                   log_every=log_every)
    init_loss = res.initial_loss
    ratios = [(v / init_loss) if init_loss > 0 else 0.0 for v in res.losses]
    end = _row_stats(student, X)
    ratio = res.final_ratio if math.isfinite(res.final_ratio) and not res.diverged else None
    success = ratio is not None and ratio < config.tol_success
    strict = ratio is not None and ratio < config.tol_strict
    # loss decrease over the last fifth of the run
    late = None
    if not res.diverged and res.steps_run > 0:
        cut = 0.8 * res.steps_run
        i = next(k for k, t in enumerate(res.log_steps) if t >= cut)
        if res.losses[i] > 0:
            late = 1.0 - res.final_loss / res.losses[i]
    # late-phase linear rate: -ln(L_T / L_{T/2}) per step over the second half of the run
    late_rate = None
    if not res.diverged and res.steps_run >= 4:
        i = next(k for k, t in enumerate(res.log_steps) if t >= res.steps_run / 2)
        dt = res.log_steps[-1] - res.log_steps[i]
        if dt > 0 and res.losses[i] > 0 and res.final_loss > 0:
            late_rate = -math.log(res.final_loss / res.losses[i]) / dt
    kappa2 = (sigma_max / res.sigma_min_start) ** 2 if res.sigma_min_start > 0 else None
    bound_rate = None
    if subset == "W_V" and kappa2 is not None:  # slowest mode of GD on the quadratic
        x = config.lr_frac / kappa2  # per-step factor max(|1 - x|, |1 - lr_frac|) on the residual
        if abs(1 - x) >= abs(1 - config.lr_frac):
            bound_rate = -2 * math.log1p(-x)
        else:
            bound_rate = -2 * math.log(abs(1 - config.lr_frac))
    lam_min_end = lam_max_end = hv_norm = None
    if not (success or res.diverged):  # curvature at the end point of an unsuccessful run
        if subset == "W_V":  # convex quadratic, exact spectrum (1/N)·σ_k(A)²
            lam_max_end = sigma_max**2 / N
            lam_min_end = float(sv[D - 1]) ** 2 / N if sv.numel() >= D else 0.0
        elif n_params <= config.hessian_max_params:
            seed_l = _salted(seed, "lanczos-end")
            hv_norm = _hvp_norm(loss_fn, params, seed_l)
            if hv_norm <= 1e-10 * lam_max0:
                lam_min_end = lam_max_end = 0.0
            else:
                try:
                    lam_min_end = min_hessian_eigenvalue(
                        loss_fn, params, iters=config.hessian_iters, seed=seed_l)
                    lam_max_end = max_hessian_eigenvalue(
                        loss_fn, params, iters=config.hessian_iters, seed=seed_l)
                except RuntimeError:  # Lanczos did not converge (ArpackError is one too)
                    lam_min_end = lam_max_end = None
    rises = [b / a - 1 for a, b in zip(res.losses, res.losses[1:]) if a > 0 and math.isfinite(b)]
    c_steps, c_ratios = _downsample(res.log_steps, ratios)
    out = {
        "seed": seed, "lr": lr, "lambda_max_init": lam_max0, "n_params": n_params,
        "initial_loss": init_loss, "target_rms": float(y.pow(2).mean().sqrt()),
        "final_ratio": ratio, "success": success, "strict": strict,
        "diverged": bool(res.diverged), "steps_run": res.steps_run,
        "steps_to_success": _steps_to(ratios, res.log_steps, config.tol_success),
        "steps_to_strict": _steps_to(ratios, res.log_steps, config.tol_strict),
        "grad_norm_init": grad0, "grad_norm_final": res.final_grad_norm,
        "sigma_min_start": res.sigma_min_start, "sigma_max_start": sigma_max,
        "sigma_min_end": res.sigma_min_end,
        "kappa2_start": kappa2, "late_rate": late_rate, "bound_rate": bound_rate,
        "opt_ratio": opt_ratio,
        "underflow_rows_start": res.underflow_rows_start,
        "underflow_rows_end": res.underflow_rows_end, "rows": N * n,
        "start": start, "end": end, "late_decrease": late, "hvp_norm_end": hv_norm,
        "max_rise": max(rises, default=0.0),
        "lambda_min_end": lam_min_end, "lambda_max_end": lam_max_end,
        "curve_steps": c_steps, "curve_ratio": c_ratios,
        "time_s": time.perf_counter() - t0,
    }
    out["status"] = classify_run(out)
    return out


def classify_run(r: dict[str, Any]) -> str:
    """The outcome of one GD run from its recorded numbers (module docstring): ``success``,
    ``diverged``, ``decreasing`` (the loss fell by > 5 % over the last fifth), ``nonstationary``
    (the final gradient is > 1 % of the initial one: oscillating or crawling), ``flat`` (no
    curvature left), ``saddle`` / ``minimum`` (a near-stationary point with / without a negative
    Hessian eigenvalue beyond -1e-6·λ_max) or ``unclassified`` (no Hessian)."""
    if r["success"]:
        return "success"
    if r["diverged"]:
        return "diverged"
    if r["late_decrease"] is not None and r["late_decrease"] > LATE_DECREASE:
        return "decreasing"
    g0, g1 = r["grad_norm_init"], r["grad_norm_final"]
    if g0 > 0 and g1 > GRAD_STATIONARY * g0:
        return "nonstationary"
    if r["hvp_norm_end"] is not None and r["hvp_norm_end"] <= 1e-10 * r["lambda_max_init"]:
        return "flat"
    lmin, lmax = r["lambda_min_end"], r["lambda_max_end"]
    if lmin is None or lmax is None:
        return "unclassified"
    return "saddle" if lmin < -SADDLE_REL * abs(lmax) else "minimum"


# --------------------------------------------------------------------------------------------
# landscape and ListOps arms
# --------------------------------------------------------------------------------------------


def _landscape(job: dict[str, Any]) -> dict[str, Any]:
    """Two-stage training and 2-D slices for one teacher kernel and seed (a picklable job)."""
    from optfm.attention import (
        SingleLayer,
        filter_normalized_directions,
        loss_slice_2d,
        make_teacher_data,
        max_hessian_eigenvalue,
        regression_loss,
        stacked_attention_output,
        trainable_parameters,
        two_stage_training,
    )

    config: AttentionConfig = job["config"]
    teacher_kernel, seed = job["teacher"], job["seed"]
    N, n, D = config.N, config.n, config.landscape_D
    X, y, _ = make_teacher_data(N, n, D, kernel=teacher_kernel,
                                init_scale=config.teacher_scale or 1.0,
                                seed=_salted(seed, "landscape-data"))
    model_seed = _salted(seed, "landscape-model")
    first = SingleLayer(D, n, kernel="softmax", init_scale=1.0, seed=model_seed)
    sv_max = float(torch.linalg.svdvals(stacked_attention_output(first, X))[0])
    first_lr = config.lr_frac * N / sv_max**2
    common = {"lr": first_lr, "first_steps": config.landscape_first_steps,
              "first_kernel": "softmax", "first_trainable": "W_V", "second_trainable": "all",
              "init_scale": 1.0, "seed": model_seed, "tol": 0.0, "log_every": 10}
    shared = two_stage_training(X, y, second_steps=0, kernels=("softmax",), **common)
    out: dict[str, Any] = {"teacher": teacher_kernel, "seed": seed,
                           "first_ratio": shared.first.final_ratio, "kernels": {}}
    for k in KERNELS:
        start = shared.shared.copy(kernel=k)
        params = trainable_parameters(start, "all")
        lam = max_hessian_eigenvalue(lambda m=start: regression_loss(m, X, y), params,
                                     iters=config.hessian_iters, seed=_salted(seed, "l-lam"))
        second_lr = config.lr_frac / lam
        res = two_stage_training(X, y, second_steps=config.landscape_second_steps, kernels=(k,),
                                 second_lr=second_lr, **common)
        if not torch.equal(res.shared.W_V, shared.shared.W_V):  # the first stage is deterministic
            raise RuntimeError("two_stage_training's first stage is not reproducible")
        model = res.models[k]
        r = res.results[k]
        params = trainable_parameters(model, "all")
        dirs_seed = _salted(seed, "directions")
        d1 = filter_normalized_directions(params, dirs_seed, filter_dim=1)
        d2 = filter_normalized_directions(params, dirs_seed + 1, filter_dim=1)
        grid = loss_slice_2d(lambda m=model: regression_loss(m, X, y), params, d1, d2,
                             span=config.landscape_span, points=config.landscape_points)
        out["kernels"][k] = {
            "second_lr": second_lr, "stage2_initial_loss": r.initial_loss,
            "stage2_final_loss": r.final_loss,
            "stage2_ratio": r.final_ratio if math.isfinite(r.final_ratio) else None,
            "diverged": bool(r.diverged), "grid": grid.tolist(),
            **landscape_roughness(grid),
        }
    return out


def _listops(job: dict[str, Any]) -> dict[str, Any]:
    """Train one ListOps encoder (a picklable job: config, variant, seed)."""
    import torch.nn.functional as F

    from optfm.attention import TransformerClassifier
    from optfm.data.listops import make_listops_splits

    config: AttentionConfig = job["config"]
    variant, seed = job["variant"], job["seed"]
    kernel, rownorm = LISTOPS_VARIANTS[variant]
    splits = make_listops_splits(config.listops_train, 0, config.listops_test, seed=config.seed,
                                 max_length=config.listops_max_length)
    tok = splits.tokenizer
    torch.manual_seed(seed)
    model = TransformerClassifier(
        tok.vocab_size, 10, d_model=config.listops_d_model, num_heads=config.listops_heads,
        num_layers=config.listops_layers, dim_feedforward=2 * config.listops_d_model,
        max_len=config.listops_max_length, kernel=kernel, normalize_rows=rownorm,
        pad_id=tok.pad_id, on_underflow="warn")
    opt = torch.optim.AdamW(model.parameters(), lr=config.listops_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(_salted(seed, "listops-shuffle"))
    test_ids, test_y = tok.collate(splits.test)
    underflow = {"rows": 0, "checked": 0}

    def count_underflow() -> None:
        for blk in model.blocks:
            underflow["rows"] += blk.attn.last_underflow_rows
            underflow["checked"] += blk.attn.last_checked_rows

    def evaluate(ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(ids[i:i + 250]) for i in range(0, len(ids), 250)])
        model.train()
        return (float(F.cross_entropy(logits, labels)),
                float((logits.argmax(1) == labels).double().mean()))

    hist = []
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="KernelAttention: .* Gaussian attention rows")
        te_loss, te_acc = evaluate(test_ids, test_y)
        hist.append({"epoch": 0, "train_loss": None, "test_loss": te_loss, "test_acc": te_acc,
                     "underflow_rows": 0, "underflow_checked": 0})
        model.train()
        for epoch in range(1, config.listops_epochs + 1):
            perm = torch.randperm(len(splits.train), generator=gen).tolist()
            underflow["rows"] = underflow["checked"] = 0
            total, count = 0.0, 0
            for i in range(0, len(perm), config.listops_batch):
                ids, labels = tok.collate([splits.train[j] for j in perm[i:i + config.listops_batch]])
                loss = F.cross_entropy(model(ids), labels)
                count_underflow()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(labels)
                count += len(labels)
            te_loss, te_acc = evaluate(test_ids, test_y)
            hist.append({"epoch": epoch, "train_loss": total / count, "test_loss": te_loss,
                         "test_acc": te_acc, "underflow_rows": underflow["rows"],
                         "underflow_checked": underflow["checked"]})
    return {"variant": variant, "seed": seed, "history": hist,
            "final_test_acc": hist[-1]["test_acc"], "final_test_loss": hist[-1]["test_loss"],
            "majority_acc": splits.majority_accuracy("test"),
            "train_time_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------
# the experiment
# --------------------------------------------------------------------------------------------


def _worker_init(threads: int) -> None:
    torch.set_num_threads(max(1, threads))


def _grid_cells(config: AttentionConfig) -> list[dict[str, Any]]:
    cells, seen = [], set()

    def add(kernel, subset, N, n, D, init):
        key = (kernel, subset, N, n, D, float(init))
        if key not in seen:
            seen.add(key)
            cells.append({"family": "grid", "kernel": kernel, "subset": subset, "N": N, "n": n,
                          "D": D, "init": float(init)})

    for subset in config.subsets:
        for init in config.inits:
            for D in config.Ds:
                for kernel in config.kernels:
                    add(kernel, subset, config.N, config.n, D, init)
    for N in config.size_Ns:
        for n in config.size_ns:
            for subset in config.subsets:
                for kernel in config.kernels:
                    add(kernel, subset, N, n, config.size_D, config.size_init)
    return cells


def _cell_key(c: dict[str, Any]) -> str:
    return (f"{c['family']}-{c['kernel']}-{SUBSET_KEYS[c['subset']]}-N{c['N']}-n{c['n']}"
            f"-D{c['D']}-i{c['init']:g}")


@register
class AttentionExperiment(Experiment):
    name = "attention"
    description = ("Softmax vs Gaussian attention: GD convergence of one attention layer on "
                   "teacher data (success rates per kernel × trained subset × init × D), W_V-only "
                   "convergence vs σ_min(A), 2-D loss landscapes, and a ListOps encoder check.")
    config_cls = AttentionConfig
    minutes = {"smoke": 0.2, "quick": 5.0, "full": 180.0}

    @classmethod
    def profiles(cls) -> dict[str, AttentionConfig]:
        return {
            "smoke": AttentionConfig(
                subsets=("W_V", "W_Q", "all"), inits=(0.5,), Ds=(8,), N=4, n=3, seeds=2,
                steps=300, wv_Ns=(2,), wv_ns=(2,), wv_Ds=(2, 16), wv_seeds=2, wv_steps=2000,
                landscape_teachers=("softmax",), landscape_seeds=1, landscape_D=6,
                landscape_first_steps=200, landscape_second_steps=200, landscape_points=9,
                listops_variants=("softmax", "gaussian"), listops_seeds=1, listops_train=400,
                listops_test=200, listops_max_length=30, listops_epochs=2, listops_batch=25,
                listops_d_model=32, listops_heads=2, listops_lr=3e-3, workers=1),
            "quick": AttentionConfig(),
            "full": AttentionConfig(
                inits=(0.25, 0.5, 1.0, 2.0, 4.0), Ds=(4, 8, 16, 32, 64, 128, 256), seeds=10,
                steps=10000, size_Ns=(8, 16, 32), size_ns=(4, 6), wv_Ns=(8, 16, 32),
                wv_ns=(4, 6), wv_Ds=(16, 32, 64, 128, 256), wv_seeds=10, wv_steps=20000,
                landscape_seeds=5, landscape_points=41, listops_seeds=3, listops_train=8000,
                listops_test=1000, listops_max_length=100, listops_epochs=10),
        }

    def __init__(self) -> None:
        self._executor = None

    def arms(self, config: AttentionConfig) -> list[Arm]:
        arms = [Arm(_cell_key(c), c) for c in _grid_cells(config)]
        for N in config.wv_Ns:
            for n in config.wv_ns:
                for D in config.wv_Ds:
                    for init in config.wv_inits:
                        for kernel in config.kernels:
                            c = {"family": "wv", "kernel": kernel, "subset": "W_V", "N": N,
                                 "n": n, "D": D, "init": float(init)}
                            arms.append(Arm(_cell_key(c), c))
        for teacher in config.landscape_teachers:
            if config.landscape_seeds:
                arms.append(Arm(f"landscape-{teacher}", {"family": "landscape",
                                                         "teacher": teacher}))
        for variant in config.listops_variants:
            if config.listops_seeds:
                arms.append(Arm(f"listops-{variant}", {"family": "listops", "variant": variant}))
        return arms

    def _map(self, config: AttentionConfig, fn, jobs: list[dict[str, Any]]) -> list[Any]:
        """``[fn(job) for job in jobs]``, in ``config.workers`` spawned processes when > 1 (the
        pool lives until :meth:`finalize`)."""
        if config.workers <= 1 or len(jobs) <= 1:
            return [fn(j) for j in jobs]
        if self._executor is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._executor = ProcessPoolExecutor(
                max_workers=config.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init, initargs=(config.threads,))
        return list(self._executor.map(fn, jobs))

    def _shutdown(self, *, cancel: bool = False) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=not cancel, cancel_futures=cancel)
            self._executor = None

    def run_arm(self, config: AttentionConfig, arm: Arm, ctx: RunContext) -> dict[str, Any]:
        p = arm.params
        fam = p["family"]
        try:
            if fam in ("grid", "wv"):
                n_seeds = config.seeds if fam == "grid" else config.wv_seeds
                steps = config.steps if fam == "grid" else config.wv_steps
                if fam == "wv":  # attention weights and W_V at the cell's init scale
                    teacher_scale = p["init"]
                else:
                    teacher_scale = config.teacher_scale or p["init"]
                jobs = [{**p, "config": config, "seed": config.seed + i, "steps": steps,
                         "teacher_scale": teacher_scale,
                         "target": "teacher" if fam == "grid" else "random"}
                        for i in range(n_seeds)]
                return {**p, "teacher_scale": teacher_scale,
                        "runs": self._map(config, _gd_run, jobs)}
            if fam == "landscape":
                jobs = [{"config": config, "teacher": p["teacher"], "seed": config.seed + i}
                        for i in range(config.landscape_seeds)]
                return {**p, "seeds": self._map(config, _landscape, jobs)}
            jobs = [{"config": config, "variant": p["variant"], "seed": config.seed + i}
                    for i in range(config.listops_seeds)]
            return {**p, "seeds": self._map(config, _listops, jobs)}
        except BaseException:
            self._shutdown(cancel=True)
            raise

    # ----------------------------------------------------------------------------------------

    def finalize(self, config: AttentionConfig, results: dict[str, dict[str, Any]],
                 ctx: RunContext) -> Outcome:
        self._shutdown()
        arms = self.arms(config)
        fam: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for a in arms:
            r = results[a.key]
            if a.params["family"] in ("landscape", "listops"):
                fam[a.params["family"]].extend(r["seeds"])
            else:
                for run in r["runs"]:  # from the recorded numbers, so a resume re-derives it
                    run["status"] = classify_run(run)
                fam[a.params["family"]].append(r)
        metrics: dict[str, float] = {}
        parts: list[str] = []
        figs: list[str] = []
        if fam["wv"]:
            parts += self._wv_section(config, fam["wv"], metrics)
            figs.append(self._plot_wv(config, fam["wv"], ctx))
        if fam["grid"]:
            parts += self._grid_section(config, fam["grid"], metrics)
            figs.append(self._plot_success(config, fam["grid"], ctx))
            figs.append(self._plot_curves(config, fam["grid"], ctx))
        if fam["landscape"]:
            parts += self._landscape_section(config, fam["landscape"], metrics)
            figs.append(self._plot_landscape(config, fam["landscape"], ctx))
        if fam["listops"]:
            parts += self._listops_section(config, fam["listops"], metrics)
            figs.append(self._plot_listops(config, fam["listops"], ctx))
        parts += ["", "## Figures", "", *(f"![{f}]({f})" for f in figs)]
        return Outcome(metrics=metrics, summary="\n".join(parts))

    # --- claim 1 ---

    def _wv_section(self, config, cells, metrics) -> list[str]:
        rows = ["## W_V only, random targets (claim 1)", "",
                f"GD with lr = {config.lr_frac:g}·N/σ_max(A)², at most {config.wv_steps} steps; "
                f"success = loss < {config.tol_success:g} × initial (strict: "
                f"{config.tol_strict:g}); 'LS optimum' = the least-squares minimum of the ratio "
                "(0 when A has full row rank); κ² = (σ_max/σ_min)² of A (∞ when D < N·n). "
                "Medians over seeds; [95 % Wilson interval].", "",
                "| kernel | init | N | n | D | D ≥ N·n | success | strict | median final ratio | "
                "median LS optimum | median σ_min(A) | median κ² | median late rate / bound |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in cells:
            runs = c["runs"]
            k = sum(r["success"] for r in runs)
            ks = sum(r["strict"] for r in runs)
            lo, hi = wilson_ci(k, len(runs))
            tag = f"wv_{c['kernel']}_N{c['N']}_n{c['n']}_D{c['D']}_i{c['init']:g}"
            metrics[f"{tag}_success_rate"] = k / len(runs)
            metrics[f"{tag}_median_final_ratio"] = _median([r["final_ratio"] for r in runs]) or 0.0
            rr = _median([r["late_rate"] / r["bound_rate"] for r in runs
                          if r["late_rate"] is not None and r["bound_rate"]])
            rows.append(
                f"| {c['kernel']} | {c['init']:g} | {c['N']} | {c['n']} | {c['D']} | "
                f"{'yes' if c['D'] >= c['N'] * c['n'] else 'no'} | {k}/{len(runs)} "
                f"[{lo:.2f}, {hi:.2f}] | {ks}/{len(runs)} | "
                f"{_fmt(_median([r['final_ratio'] for r in runs]))} | "
                f"{_fmt(_median([r['opt_ratio'] for r in runs]))} | "
                f"{_fmt(_median([r['sigma_min_start'] for r in runs]))} | "
                f"{_fmt(_median([r['kappa2_start'] for r in runs]))} | {_fmt(rr)} |")
        full = [r for c in cells if c["D"] >= c["N"] * c["n"] for r in c["runs"]]
        short = [r for c in cells if c["D"] < c["N"] * c["n"] for r in c["runs"]]
        if full:
            from scipy.stats import spearmanr

            ok = [r for r in full if r["late_rate"] is not None and r["bound_rate"]]
            ratios = [r["late_rate"] / r["bound_rate"] for r in ok]
            rho = None
            if len(ok) >= 3:
                rho = float(spearmanr([r["kappa2_start"] for r in ok],
                                      [r["late_rate"] for r in ok]).statistic)
                metrics["wv_spearman_kappa2_late_rate"] = rho
            metrics["wv_full_rank_success_rate"] = sum(r["success"] for r in full) / len(full)
            metrics["wv_full_rank_median_opt_ratio"] = _median([r["opt_ratio"] for r in full])
            if ratios:
                metrics["wv_median_rate_over_bound"] = float(np.median(ratios))
            rows += ["", f"D ≥ N·n: {sum(r['success'] for r in full)}/{len(full)} runs reach "
                     f"{config.tol_success:g} and {sum(r['strict'] for r in full)}/{len(full)} "
                     f"reach {config.tol_strict:g} within {config.wv_steps} steps; the LS optimum "
                     f"is ≤ {_fmt(max(r['opt_ratio'] for r in full))} in every run. Late-phase "
                     "rate −ln(L_T/L_{T/2})/(T/2) over the bound −2 ln(1 − lr_frac/κ²) set by "
                     f"σ_min(A): median {_fmt(float(np.median(ratios)) if ratios else None)} "
                     f"(range {_fmt(min(ratios) if ratios else None)}–"
                     f"{_fmt(max(ratios) if ratios else None)}; ≥ 1 is guaranteed, ≈ 1 means "
                     "the slowest mode alone sets the speed); Spearman ρ(κ², late rate) = "
                     f"{_fmt(rho, 3)}."]
        if short:
            gap = [r["final_ratio"] / r["opt_ratio"] for r in short
                   if r["final_ratio"] is not None and r["opt_ratio"]]
            rows += ["", f"D < N·n: {sum(r['success'] for r in short)}/{len(short)} runs reach "
                     f"{config.tol_success:g}; the LS optimum is ≥ "
                     f"{_fmt(min(r['opt_ratio'] for r in short))}, and GD ends at "
                     f"{_fmt(min(gap) if gap else None, 4)}–{_fmt(max(gap) if gap else None, 4)}"
                     " × that optimum."]
        return rows

    # --- claims 2-4 ---

    def _grid_section(self, config, cells, metrics) -> list[str]:
        by = {(c["kernel"], c["subset"], c["N"], c["n"], c["D"], c["init"]): c for c in cells}
        kernels = [k for k in KERNELS if k in config.kernels]
        out = ["", "## GD on realisable teacher data (claims 2-4)", "",
               f"Teacher scale {config.teacher_scale if config.teacher_scale else 'tied to init'}"
               f", lr = {config.lr_frac:g}/λ_max(Hessian at init) per run, at most {config.steps}"
               f" steps (stop at {config.stop_tol:g}); success = final/initial < "
               f"{config.tol_success:g} (strict {config.tol_strict:g}); k/S [95 % Wilson]. "
               "Unsuccessful runs: d = still decreasing (> 5 % over the last fifth), o = "
               "not stationary (final ‖∇‖ > 1 % of the initial one without that decrease: "
               "oscillating or crawling), f = flat (‖Hv‖ < 1e-10·λ_max(init): no curvature left),"
               " s = saddle (near-stationary, λ_min < −1e-6 λ_max at the end), m = minimum-like "
               "(near-stationary, λ_min ≥ −1e-6 λ_max), u = not classified (Lanczos "
               "skipped or failed), x = diverged. 'med. lr' = median lr of the rule. softmax sat "
               "= mean fraction of softmax rows with max weight > 0.99 at the start; gaussian "
               "row max = median over rows and seeds of the largest Gaussian attention entry per "
               "row at the start (vanished rows, every entry ≤ machine epsilon, are counted "
               "below).",
               "",
               "| subset | init | N | n | D | " + " | ".join(
                   f"{k} success | {k} strict | {k} med. ratio | {k} stuck | {k} med. lr"
                   for k in kernels) + " | softmax sat | gaussian row max |",
               "|---|---|---|---|---|" + "---|" * (5 * len(kernels) + 2)]
        seen = []
        for c in cells:
            key = (c["subset"], c["init"], c["N"], c["n"], c["D"])
            if key in seen:
                continue
            seen.append(key)
            cols = []
            for k in kernels:
                cell = by.get((k, c["subset"], c["N"], c["n"], c["D"], c["init"]))
                if cell is None:
                    cols.append("— | — | — | — | —")
                    continue
                runs = cell["runs"]
                s = sum(r["success"] for r in runs)
                ss = sum(r["strict"] for r in runs)
                lo, hi = wilson_ci(s, len(runs))
                st = defaultdict(int)
                for r in runs:
                    st[r["status"]] += 1
                stuck = " ".join(f"{st[name]}{code}" for name, code in
                                 (("decreasing", "d"), ("nonstationary", "o"), ("flat", "f"),
                                  ("saddle", "s"), ("minimum", "m"), ("unclassified", "u"),
                                  ("diverged", "x"))
                                 if st[name]) or "—"
                tag = (f"grid_{k}_{SUBSET_KEYS[c['subset']]}_N{c['N']}_n{c['n']}_D{c['D']}"
                       f"_i{c['init']:g}")
                metrics[f"{tag}_success_rate"] = s / len(runs)
                metrics[f"{tag}_strict_rate"] = ss / len(runs)
                cols.append(f"{s}/{len(runs)} [{lo:.2f}, {hi:.2f}] | {ss}/{len(runs)} | "
                            f"{_fmt(_median([r['final_ratio'] for r in runs]))} | {stuck} | "
                            f"{_fmt(_median([r['lr'] for r in runs]))}")
            sat = by.get(("softmax", c["subset"], c["N"], c["n"], c["D"], c["init"]))
            gau = by.get(("gaussian", c["subset"], c["N"], c["n"], c["D"], c["init"]))
            sat_s = _fmt(np.mean([r["start"]["frac_saturated"] for r in sat["runs"]])) if sat \
                else "—"
            van_s = _fmt(_median([r["start"]["median_row_max"] for r in gau["runs"]])) if gau \
                else "—"
            out.append(f"| {c['subset']} | {c['init']:g} | {c['N']} | {c['n']} | {c['D']} | "
                       + " | ".join(cols) + f" | {sat_s} | {van_s} |")
        # pooled per kernel × subset, per kernel × subset × init, per kernel × subset × D
        out += ["", "### Pooled success rates (base N, n)", "",
                "| subset | pooled over | level | " + " | ".join(kernels) + " |",
                "|---|---|---|" + "---|" * len(kernels)]
        base = [c for c in cells if (c["N"], c["n"]) == (config.N, config.n)]
        for subset in config.subsets:
            for what, levels in (("inits and Ds", [None]), ("Ds", config.inits),
                                 ("inits", config.Ds)):
                for lev in levels:
                    vals = []
                    for k in kernels:
                        rs = [r for c in base if c["kernel"] == k and c["subset"] == subset
                              and (lev is None or (c["init"] if what == "Ds" else c["D"])
                                   == lev) for r in c["runs"]]
                        s = sum(r["success"] for r in rs)
                        lo, hi = wilson_ci(s, len(rs))
                        vals.append(f"{s}/{len(rs)} [{lo:.2f}, {hi:.2f}]")
                        if lev is None:
                            metrics[f"pooled_{k}_{SUBSET_KEYS[subset]}_success_rate"] = (
                                s / len(rs) if rs else 0.0)
                    label = "—" if lev is None else (f"init {lev:g}" if what == "Ds"
                                                      else f"D {lev}")
                    out.append(f"| {subset} | {what} | {label} | " + " | ".join(vals) + " |")
        # underflow and Hessian diagnostics
        all_runs = [(c, r) for c in cells for r in c["runs"]]
        uf0 = sum(r["underflow_rows_start"] for _, r in all_runs)
        uf = sum(r["underflow_rows_end"] for _, r in all_runs)
        uf_cells = defaultdict(int)
        for c, r in all_runs:
            if r["underflow_rows_end"]:
                uf_cells[f"{c['subset']} init {c['init']:g} D {c['D']}"] += 1
        stuck = [(c, r) for c, r in all_runs if r["status"] in ("saddle", "minimum")]
        listed = [(c, r) for c, r in all_runs
                  if r["status"] in ("saddle", "minimum", "nonstationary")]
        out += ["", "Vanished Gaussian rows (every entry ≤ float64 machine epsilon, "
                f"count_underflow_rows; N·n rows per run): {uf0} at the start of all runs, "
                f"{uf} at the end, in {sum(uf_cells.values())} runs ("
                + (", ".join(f"{k}: {v}" for k, v in uf_cells.items()) or "none") + "). "
                f"Near-stationary stuck runs: {len(stuck)} "
                f"({sum(r['status'] == 'saddle' for _, r in stuck)} saddles, "
                f"{sum(r['status'] == 'minimum' for _, r in stuck)} minimum-like); "
                f"{len(listed) - len(stuck)} non-stationary."]
        metrics["grid_underflow_rows_start_total"] = uf0
        rising = defaultdict(int)
        for c, r in all_runs:
            if r["max_rise"] > 0.1:
                rising[(c["kernel"], c["subset"])] += 1
        out += ["", "Runs whose loss rose by more than 10 % between two logged points (every "
                f"{max(1, config.steps // 500)} steps; the lr of the rule is too large for the "
                "curvature met later): " + (", ".join(
                    f"{k} {s}: {rising[(k, s)]}" for k in kernels for s in config.subsets
                    if rising[(k, s)]) or "none") + "."]
        metrics["grid_underflow_rows_total"] = uf
        metrics["grid_runs_total"] = len(all_runs)
        metrics["grid_diverged_total"] = sum(r["diverged"] for _, r in all_runs)
        if listed:
            out += ["", "| kernel | subset | init | D | seed | final ratio | ‖∇‖ end / init | "
                    "λ_min end | λ_max end | status |", "|---|---|---|---|---|---|---|---|---|---|"]
            for c, r in listed[:40]:
                gr = r["grad_norm_final"] / r["grad_norm_init"] if r["grad_norm_init"] else None
                out.append(f"| {c['kernel']} | {c['subset']} | {c['init']:g} | {c['D']} | "
                           f"{r['seed']} | {_fmt(r['final_ratio'])} | {_fmt(gr)} | "
                           f"{_fmt(r['lambda_min_end'], 3)} | {_fmt(r['lambda_max_end'], 3)} | "
                           f"{r['status']} |")
            if len(listed) > 40:
                out.append(f"| … {len(listed) - 40} more in the arm files | | | | | | | | | |")
        return out

    # --- claim 5 ---

    def _landscape_section(self, config, arms, metrics) -> list[str]:
        out = ["", "## Loss landscapes after two-stage training (claim 5)", "",
               f"N = {config.N}, n = {config.n}, D = {config.landscape_D}; stage 1 softmax W_V "
               f"({config.landscape_first_steps} steps), stage 2 all weights per kernel "
               f"({config.landscape_second_steps} steps, lr = {config.lr_frac:g}/λ_max at the "
               f"shared point); {config.landscape_points}² grid over [−{config.landscape_span:g},"
               f" {config.landscape_span:g}]² along two filter-normalised directions. Mean ± s.e. "
               "over seeds.", "",
               "| teacher | kernel | stage-2 final/initial | local minima | non-convex fraction |"
               " mean abs second difference / range |", "|---|---|---|---|---|---|"]
        for teacher in config.landscape_teachers:
            for k in KERNELS:
                rs = [a["kernels"][k] for a in arms if a["teacher"] == teacher]
                if not rs:
                    continue
                cells = []
                for key, d in (("local_minima", 2), ("nonconvex_frac", 3), ("second_diff", 4)):
                    m, se = mean_se([r[key] for r in rs])
                    metrics[f"landscape_{teacher}_{k}_{key}"] = m
                    cells.append(f"{m:.{d}f} ± {se:.{d}f}")
                ratio = _median([r["stage2_ratio"] for r in rs])
                out.append(f"| {teacher} | {k} | {_fmt(ratio)} | " + " | ".join(cells) + " |")
        return out

    # --- ListOps ---

    def _listops_section(self, config, arms, metrics) -> list[str]:
        maj = arms[0]["majority_acc"]
        metrics["listops_majority_acc"] = maj
        out = ["", "## ListOps (real task)", "",
               f"{config.listops_train} training / {config.listops_test} test expressions of "
               f"10–{config.listops_max_length} tokens (generated, seed {config.seed}); encoder "
               f"d_model {config.listops_d_model}, {config.listops_heads} heads, "
               f"{config.listops_layers} layers, AdamW lr {config.listops_lr:g}, batch "
               f"{config.listops_batch}, {config.listops_epochs} epochs; majority-class test "
               f"accuracy {maj:.3f}. Mean ± s.e. over seeds.", "",
               "| variant | test acc (epoch 0) | test acc (final) | best epoch acc | "
               "test loss (final) | train loss (final) | underflow rows (last epoch) |",
               "|---|---|---|---|---|---|---|"]
        for v in config.listops_variants:
            rs = [a for a in arms if a["variant"] == v]
            if not rs:
                continue
            h0 = [r["history"][0]["test_acc"] for r in rs]
            fin = [r["final_test_acc"] for r in rs]
            best = [max(e["test_acc"] for e in r["history"]) for r in rs]
            tl = [r["final_test_loss"] for r in rs]
            trl = [r["history"][-1]["train_loss"] for r in rs]
            uf = sum(r["history"][-1]["underflow_rows"] for r in rs)
            metrics[f"listops_{v}_test_acc"] = mean_se(fin)[0]
            metrics[f"listops_{v}_test_loss"] = mean_se(tl)[0]
            out.append(f"| {v} | {self._ms(h0)} | {self._ms(fin)} | {self._ms(best)} | "
                       f"{self._ms(tl)} | {self._ms(trl)} | {uf} |")
        return out

    @staticmethod
    def _ms(values: list[float], d: int = 3) -> str:
        m, se = mean_se(values)
        return f"{m:.{d}f} ± {se:.{d}f}"

    # --- figures ---

    def _plot_wv(self, config, cells, ctx) -> str:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for k in KERNELS:
            cs = [c for c in cells if c["kernel"] == k]
            if not cs:
                continue
            xs = [c["D"] / (c["N"] * c["n"]) for c in cs for _ in c["runs"]]
            ys = [max(r["final_ratio"] or 1e-300, 1e-18) for c in cs for r in c["runs"]]
            axes[0].scatter(np.array(xs) * (1.03 if k == "gaussian" else 0.97), ys, s=14,
                            alpha=0.7, color=COLORS[k], label=k)
            ok = [r for c in cs for r in c["runs"] if r["late_rate"] and r["bound_rate"]]
            axes[1].scatter([r["bound_rate"] for r in ok], [r["late_rate"] for r in ok],
                            s=14, alpha=0.7, color=COLORS[k], label=k)
        lims = [r["bound_rate"] for c in cells for r in c["runs"] if r["bound_rate"]]
        if lims:
            xs = np.geomspace(min(lims), max(lims), 20)
            axes[1].plot(xs, xs, "k--", lw=1, label="bound (slowest mode, from σ_min)")
        axes[0].axhline(config.tol_success, color="gray", ls=":", lw=1)
        axes[0].axvline(1.0, color="gray", ls="--", lw=1)
        axes[0].set(xscale="log", yscale="log", xlabel="D / (N·n)",
                    ylabel="final / initial loss", title="W_V only, random targets")
        axes[1].set(xscale="log", yscale="log",
                    xlabel="bound rate −2 ln(1 − lr_frac·σ_min²/σ_max²) per step",
                    ylabel="measured late-phase rate per step",
                    title="D ≥ N·n: speed vs σ_min(A)")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        return ctx.savefig(fig, "attention_wv.png")

    def _plot_success(self, config, cells, ctx) -> str:
        plt = pyplot()
        subsets = [s for s in SUBSETS if s in config.subsets]
        base = [c for c in cells if (c["N"], c["n"]) == (config.N, config.n)]
        fig, axes = plt.subplots(2, len(subsets), figsize=(3.6 * len(subsets), 6.6),
                                 squeeze=False)
        markers = "osD^v<>"
        for j, subset in enumerate(subsets):
            for row, (xname, lname, xs_all, ls_all) in enumerate(
                    (("D", "init", config.Ds, config.inits), ("init", "D", config.inits,
                                                               config.Ds))):
                ax = axes[row, j]
                for k in KERNELS:
                    cmap = plt.get_cmap("Oranges" if k == "softmax" else "Blues")
                    shades = np.linspace(0.45, 0.95, max(len(ls_all), 1))
                    for li, lev in enumerate(ls_all):
                        xs, ys, lo, hi = [], [], [], []
                        for x in xs_all:
                            c = next((c for c in base if c["kernel"] == k and c["subset"] == subset
                                      and c[xname] == x and c[lname] == lev), None)
                            if c is None:
                                continue
                            s, m = sum(r["success"] for r in c["runs"]), len(c["runs"])
                            a, b = wilson_ci(s, m)
                            xs.append(x * (1.04 if k == "gaussian" else 0.96))
                            ys.append(s / m)
                            lo.append(s / m - a)
                            hi.append(b - s / m)
                        if xs:
                            ax.errorbar(xs, ys, yerr=[lo, hi], color=cmap(shades[li]), capsize=2,
                                        marker=markers[li % len(markers)], ms=4, lw=1,
                                        ls="-" if k == "softmax" else "--",
                                        label=f"{k}, {lname} {lev:g}")
                ax.set(xscale="log", ylim=(-0.05, 1.05), xlabel=xname,
                       title=f"{subset}: success vs {xname}")
                ax.set_xticks(list(xs_all), [f"{x:g}" for x in xs_all])
                ax.xaxis.set_minor_locator(plt.NullLocator())
                if j == 0:
                    ax.set_ylabel(f"P(loss < {config.tol_success:g}·initial)")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=6)
        fig.tight_layout()
        return ctx.savefig(fig, "attention_success.png")

    def _plot_curves(self, config, cells, ctx) -> str:
        plt = pyplot()
        subsets = [s for s in SUBSETS if s in config.subsets]
        base = [c for c in cells if (c["N"], c["n"]) == (config.N, config.n)]
        inits = sorted(config.inits)
        fig, axes = plt.subplots(len(inits), len(subsets),
                                 figsize=(3.6 * len(subsets), 3.0 * len(inits)), squeeze=False)
        shades = np.linspace(0.35, 1.0, len(config.Ds))
        for i, init in enumerate(inits):
            for j, subset in enumerate(subsets):
                ax = axes[i, j]
                for k in KERNELS:
                    cmap = plt.get_cmap("Oranges" if k == "softmax" else "Blues")
                    for di, D in enumerate(config.Ds):
                        c = next((c for c in base if c["kernel"] == k and c["subset"] == subset
                                  and c["D"] == D and c["init"] == init), None)
                        if c is None:
                            continue
                        for ri, r in enumerate(c["runs"]):
                            ys = [max(v, 1e-12) if v is not None else np.nan
                                  for v in r["curve_ratio"]]
                            ax.plot(r["curve_steps"], ys, color=cmap(shades[di]), lw=0.7,
                                    alpha=0.8, label=f"{k} D{D}" if ri == 0 else None)
                ax.axhline(config.tol_success, color="gray", ls=":", lw=1)
                ax.set(yscale="log", ylim=(1e-9, 10), title=f"{subset}, init {init:g}",
                       xlabel="GD step")
                if j == 0:
                    ax.set_ylabel("loss / initial")
                ax.grid(alpha=0.3)
                if i == 0 and j == 0:
                    ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        return ctx.savefig(fig, "attention_curves.png")

    def _plot_landscape(self, config, arms, ctx) -> str:
        plt = pyplot()
        teachers = [t for t in config.landscape_teachers if any(a["teacher"] == t for a in arms)]
        fig, axes = plt.subplots(len(teachers), 2, figsize=(8.4, 3.8 * len(teachers)),
                                 squeeze=False)
        span = config.landscape_span
        for i, t in enumerate(teachers):
            a = next(a for a in arms if a["teacher"] == t)
            for j, k in enumerate(KERNELS):
                g = np.asarray(a["kernels"][k]["grid"])
                ax = axes[i, j]
                im = ax.imshow(np.log10(np.maximum(g, 1e-16)).T, origin="lower",
                               extent=(-span, span, -span, span), cmap="viridis", aspect="auto")
                ax.contour(np.linspace(-span, span, g.shape[0]),
                           np.linspace(-span, span, g.shape[1]),
                           np.log10(np.maximum(g, 1e-16)).T, levels=12, colors="w",
                           linewidths=0.4)
                r = a["kernels"][k]
                ax.set(title=f"{t} teacher, {k} (seed {a['seed']})\nminima {r['local_minima']},"
                       f" non-convex {r['nonconvex_frac']:.2f}", xlabel="α (d₁)",
                       ylabel="β (d₂)")
                fig.colorbar(im, ax=ax, label="log10 loss")
        fig.tight_layout()
        return ctx.savefig(fig, "attention_landscape.png")

    def _plot_listops(self, config, arms, ctx) -> str:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for v in config.listops_variants:
            rs = [a for a in arms if a["variant"] == v]
            if not rs:
                continue
            ep = [e["epoch"] for e in rs[0]["history"]]
            for ax, key in ((axes[0], "test_acc"), (axes[1], "test_loss")):
                vals = np.array([[e[key] for e in r["history"]] for r in rs])
                m = vals.mean(0)
                se = vals.std(0, ddof=1) / math.sqrt(len(rs)) if len(rs) > 1 else 0 * m
                ax.errorbar(ep, m, yerr=se, marker="o", ms=3, capsize=2, color=COLORS[v],
                            label=v)
            tr = np.array([[e["train_loss"] for e in r["history"][1:]] for r in rs]).mean(0)
            axes[1].plot(ep[1:], tr, ls=":", color=COLORS[v], label=f"{v} (train, epoch mean)")
        axes[0].axhline(arms[0]["majority_acc"], color="gray", ls="--", lw=1,
                        label="majority class")
        axes[0].set(xlabel="epoch", ylabel="test accuracy", title="ListOps")
        axes[1].set(xlabel="epoch", ylabel="cross-entropy", title="ListOps loss")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        return ctx.savefig(fig, "attention_listops.png")
