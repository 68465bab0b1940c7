r"""Gradient descent on a single attention layer: the model, teacher data, GD and landscape tools.

Paper: "Unraveling the Gradient Descent Dynamics of Transformers" (Song et al., NeurIPS 2024,
arXiv 2411.07538). See ``specs/attention.md``. Everything here is float64.

Model (:class:`SingleLayer`): N samples ``X_i ∈ R^{n×D}``, H heads of size d, ``S_h`` the softmax
or Gaussian kernel of :func:`~optfm.attention.kernels.attention_scores` (scale ``1/√d``)::

    q_h = X W_Q^h,  k_h = X W_K^h                   W_Q, W_K ∈ R^{D × H·d}  (W^h = columns of head h)
    out_proj=False:  out(X) = Σ_h S_h(X) X W_V^h     W_V ∈ R^{D × H·D}  (H = 1: W_V ∈ R^{D×D})
    out_proj=True:   out(X) = concat_h(S_h(X) X W_V^h) W_O,   W_V ∈ R^{D × H·d},  W_O ∈ R^{H·d × D}
    every weight ~ N(0, (init_scale/√D)²)

Loss (:func:`regression_loss`) and full-batch gradient descent (:func:`train_gd`) on the
``trainable`` subset ("W_V" | "W_Q" | "W_Q+W_K" | "all"; the others stay frozen)::

    L(θ) = (1/2N) Σ_i ‖out(X_i) - y_i‖_F²,        θ <- θ - lr ∇_θ L(θ)

Stacked attention output (:func:`stacked_attention_output`), rows = the N·n tokens::

    A = [ S_1(X_i) X_i, ..., S_H(X_i) X_i ]_{i=1..N}  ∈ R^{N·n × H·D}

Without ``W_O`` the outputs stacked over tokens are ``A W_V'`` with ``W_V' ∈ R^{H·D×D}`` the heads'
blocks of ``W_V`` stacked vertically, so with only ``W_V`` trained the loss is a least-squares
problem. When ``H·D >= N·n`` and A has full row rank (:func:`sigma_min` ``> 0``) zero loss is
reachable and GD with ``lr <= N/σ_max(A)²`` converges linearly at a rate set by
``σ_min(A)² / σ_max(A)²``. :func:`sigma_min` is ``σ_{N·n}(A) = sqrt(λ_min(A Aᵀ))``: the smallest
singular value over the N·n rows, 0 whenever A has fewer columns than rows.

Teacher (:func:`make_teacher_data`): ``X_i`` with i.i.d. N(0, 1) entries, ``y_i = out*(X_i)`` for an
independently drawn teacher layer; :func:`make_student` copies the teacher and redraws only the
parameters to be trained, so the problem is realisable (global minimum 0) for any subset.

Landscape: :func:`min_hessian_eigenvalue` (Lanczos / ARPACK on Hessian-vector products, double
backward), :func:`filter_normalized_directions` (Li et al. 2018: a Gaussian direction rescaled per
filter so that ``‖d_f‖ = ‖θ_f‖``), :func:`loss_slice_2d` (``L(θ + a d1 + b d2)`` on a grid) and
:func:`two_stage_training` (a shared first stage, then one second stage per kernel from the same
point).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from optfm.attention.kernels import (
    _check_kernel,
    _check_pos_int,
    _check_scale,
    attention_scores,
    count_underflow_rows,
)
from optfm.training.seed import make_generator

__all__ = [
    "TRAINABLE",
    "GDResult",
    "SingleLayer",
    "TeacherData",
    "TwoStageResult",
    "filter_normalized_directions",
    "loss_slice_2d",
    "make_student",
    "make_teacher_data",
    "max_hessian_eigenvalue",
    "min_hessian_eigenvalue",
    "regression_loss",
    "sigma_min",
    "stacked_attention_output",
    "train_gd",
    "trainable_parameters",
    "two_stage_training",
]

DTYPE = torch.float64
TRAINABLE: dict[str, tuple[str, ...]] = {
    "W_V": ("W_V",),
    "W_Q": ("W_Q",),
    "W_Q+W_K": ("W_Q", "W_K"),
    "all": ("W_Q", "W_K", "W_V", "W_O"),
}


def _salted(seed: int, salt: str) -> int:
    """A seed derived from ``seed`` and ``salt`` (stable across processes), so that draws made
    with the same integer seed for different purposes (weights, directions) are independent."""
    digest = hashlib.sha256(f"{salt}:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def _check_trainable(trainable: str) -> tuple[str, ...]:
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {tuple(TRAINABLE)}, got {trainable!r}")
    return TRAINABLE[trainable]


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class SingleLayer(nn.Module):
    """The paper's single attention layer (module docstring), parameters as plain float64 matrices.

    ``D`` features, ``n`` tokens per sample, ``d`` head size (default ``D``), ``kernel``
    ``"softmax"`` | ``"gaussian"``, ``normalize_rows`` (Gaussian only), ``scale`` (default
    ``1/√d``), ``num_heads`` H, ``out_proj`` (adds ``W_O``; else ``W_O`` is None), weights drawn
    from ``N(0, (init_scale/√D)²)`` with a generator seeded by ``seed`` (order W_Q, W_K, W_V, W_O).
    Gaussian underflow is not warned about here: :func:`train_gd` records it.
    """

    def __init__(
        self,
        D: int,
        n: int,
        *,
        d: int | None = None,
        kernel: str,
        num_heads: int = 1,
        init_scale: float = 1.0,
        out_proj: bool = False,
        normalize_rows: bool = False,
        scale: float | None = None,
        seed: int,
    ) -> None:
        super().__init__()
        _check_pos_int("D", D)
        _check_pos_int("n", n)
        _check_pos_int("d", d, allow_none=True)
        _check_pos_int("num_heads", num_heads)
        _check_kernel(kernel)
        _check_positive("init_scale", init_scale)
        self.D, self.n, self.d = D, n, D if d is None else d
        self.num_heads, self.kernel = num_heads, kernel
        self.normalize_rows = bool(normalize_rows)
        self.scale = _check_scale(scale)
        self.init_scale, self.seed = float(init_scale), seed
        self.value_dim = self.d if out_proj else D
        g = make_generator(seed)
        std = self.init_scale / math.sqrt(D)
        h = num_heads

        def draw(rows: int, cols: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(rows, cols, generator=g, dtype=DTYPE) * std)

        self.W_Q = draw(D, h * self.d)
        self.W_K = draw(D, h * self.d)
        self.W_V = draw(D, h * self.value_dim)
        self.W_O = draw(h * self.d, D) if out_proj else None

    def extra_repr(self) -> str:
        return (
            f"D={self.D}, n={self.n}, d={self.d}, kernel={self.kernel!r}, "
            f"num_heads={self.num_heads}, init_scale={self.init_scale}, "
            f"out_proj={self.W_O is not None}"
        )

    def _check_x(self, X: torch.Tensor) -> torch.Tensor:
        if not isinstance(X, torch.Tensor) or X.ndim != 3 or tuple(X.shape[1:]) != (self.n, self.D):
            shape = tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__
            raise ValueError(f"X must have shape (N, n, D) = (N, {self.n}, {self.D}), got {shape}")
        return X.to(self.W_Q)

    def attention_matrix(self, X: torch.Tensor) -> torch.Tensor:
        """``S_h(X_i)`` for every sample and head, shape ``(N, H, n, n)`` (also for H = 1)."""
        X = self._check_x(X)
        N, h = X.shape[0], self.num_heads
        q = (X @ self.W_Q).view(N, self.n, h, self.d).transpose(1, 2)
        k = (X @ self.W_K).view(N, self.n, h, self.d).transpose(1, 2)
        return attention_scores(
            q, k, kernel=self.kernel, scale=self.scale, normalize_rows=self.normalize_rows
        )

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """``out(X_i)`` for ``X (N, n, D)`` -> ``(N, n, D)``."""
        X = self._check_x(X)
        N, h = X.shape[0], self.num_heads
        s = self.attention_matrix(X)
        v = (X @ self.W_V).view(N, self.n, h, self.value_dim).transpose(1, 2)
        heads = s @ v  # (N, H, n, value_dim)
        if self.W_O is None:
            return heads.sum(dim=1)
        return heads.transpose(1, 2).reshape(N, self.n, h * self.value_dim) @ self.W_O

    def copy(self, kernel: str | None = None) -> SingleLayer:
        """A deep copy (same parameters), optionally with another ``kernel``."""
        new = copy.deepcopy(self)
        if kernel is not None:
            new.kernel = _check_kernel(kernel)
        return new


class TeacherData(NamedTuple):
    """``X (N, n, D)``, targets ``y (N, n, D)`` and the ``teacher`` layer that produced them."""

    X: torch.Tensor
    y: torch.Tensor
    teacher: SingleLayer


def make_teacher_data(
    N: int,
    n: int,
    D: int,
    *,
    kernel: str,
    init_scale: float,
    seed: int,
    d: int | None = None,
    num_heads: int = 1,
    out_proj: bool = False,
    normalize_rows: bool = False,
    scale: float | None = None,
) -> TeacherData:
    """Realisable teacher data: ``X_i`` with N(0, 1) entries and ``y_i = teacher(X_i)``.

    One generator seeded with ``seed`` draws X and then the teacher's own seed, so the teacher's
    weights are independent of any student built with a small integer seed.
    """
    _check_pos_int("N", N)
    g = make_generator(seed)
    X = torch.randn(N, n, D, generator=g, dtype=DTYPE)
    teacher_seed = int(torch.randint(0, 2**62, (1,), generator=g))
    teacher = SingleLayer(
        D, n, d=d, kernel=kernel, num_heads=num_heads, init_scale=init_scale, out_proj=out_proj,
        normalize_rows=normalize_rows, scale=scale, seed=teacher_seed,
    )
    with torch.no_grad():
        y = teacher(X)
    return TeacherData(X, y, teacher)


def make_student(
    teacher: SingleLayer, *, trainable: str, seed: int, init_scale: float | None = None
) -> SingleLayer:
    """A copy of ``teacher`` whose ``trainable`` parameters are redrawn from
    ``N(0, (init_scale/√D)²)`` (default: the teacher's init scale) with a generator seeded by
    ``seed``; the frozen ones equal the teacher's, so the global minimum of the loss is 0."""
    names = _check_trainable(trainable)
    scale = teacher.init_scale if init_scale is None else _check_positive("init_scale", init_scale)
    student = teacher.copy()
    student.init_scale, student.seed = scale, seed
    g = make_generator(seed)
    std = scale / math.sqrt(teacher.D)
    with torch.no_grad():
        for name in names:
            p = getattr(student, name)
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=g, dtype=DTYPE) * std)
    return student


def trainable_parameters(model: SingleLayer, trainable: str) -> list[nn.Parameter]:
    """The parameters of ``model`` in the ``trainable`` subset (``"W_V"`` | ``"W_Q"`` |
    ``"W_Q+W_K"`` | ``"all"``), in the order W_Q, W_K, W_V, W_O; e.g. for
    :func:`min_hessian_eigenvalue` on the subset a run trained."""
    names = _check_trainable(trainable)
    return [getattr(model, nm) for nm in names if getattr(model, nm) is not None]


def regression_loss(model: SingleLayer, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``L = (1/2N) Σ_i ‖model(X_i) - y_i‖_F²`` (a 0-d tensor)."""
    out = model(X)
    if y.shape != out.shape:
        raise ValueError(f"y must have shape {tuple(out.shape)}, got {tuple(y.shape)}")
    return F.mse_loss(out, y.to(out), reduction="sum") * (0.5 / X.shape[0])


def stacked_attention_output(model: SingleLayer, X: torch.Tensor) -> torch.Tensor:
    """``A = [S_h(X_i) X_i]`` stacked over the N·n tokens (rows) and heads (column blocks):
    shape ``(N·n, H·D)`` (``(N·n, D)`` for one head)."""
    with torch.no_grad():
        s = model.attention_matrix(X)  # (N, H, n, n)
        sx = s @ X.to(s).unsqueeze(1)  # (N, H, n, D)
        N, h, n, D = sx.shape
        return sx.permute(0, 2, 1, 3).reshape(N * n, h * D)


def sigma_min(A: torch.Tensor) -> float:
    """``σ_{rows}(A) = sqrt(λ_min(A Aᵀ))``: the smallest singular value over the rows of A; > 0 iff
    A has full row rank, and 0 when A has fewer columns than rows."""
    if A.ndim != 2:
        raise ValueError(f"A must be a matrix, got shape {tuple(A.shape)}")
    rows, cols = A.shape
    if cols < rows:
        return 0.0
    return float(torch.linalg.svdvals(A.detach())[rows - 1])


@dataclass
class GDResult:
    """Outcome of :func:`train_gd`.

    ``losses[k]`` is the loss after ``log_steps[k]`` GD steps (every ``log_every`` steps and the
    last one); ``final_ratio`` = final / initial loss; ``final_grad_norm`` is the Euclidean norm of
    the trainable parameters' gradient at the final point; ``sigma_min_*`` = :func:`sigma_min` of
    A at the start and end; ``underflow_rows_*`` = all-zero Gaussian rows (``count_underflow_rows``)
    out of N·H·n; ``converged`` = final_ratio < tol; ``diverged`` = the loss became non-finite.
    """

    trainable: str
    lr: float
    steps_run: int
    initial_loss: float
    final_loss: float
    final_ratio: float
    final_grad_norm: float
    sigma_min_start: float
    sigma_min_end: float
    converged: bool
    diverged: bool
    underflow_rows_start: int = 0
    underflow_rows_end: int = 0
    losses: list[float] = field(default_factory=list)
    log_steps: list[int] = field(default_factory=list)


def _underflow(model: SingleLayer, X: torch.Tensor) -> int:
    if model.kernel != "gaussian" or model.normalize_rows:
        return 0
    with torch.no_grad():
        return count_underflow_rows(model.attention_matrix(X))


def train_gd(
    model: SingleLayer,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    trainable: str,
    lr: float,
    steps: int,
    tol: float = 1e-12,
    log_every: int = 100,
) -> GDResult:
    """Full-batch GD on :func:`regression_loss` over the ``trainable`` parameters, in place.

    ``trainable`` is ``"W_V"``, ``"W_Q"``, ``"W_Q+W_K"`` or ``"all"`` (``W_O`` is trained only
    with ``"all"``); the others are frozen during the run and their ``requires_grad`` flags are
    restored afterwards. Runs at most ``steps`` updates and stops early once
    ``loss / initial_loss < tol`` or the loss is not finite. With only ``W_V`` trained and no
    ``W_O`` the loss is quadratic in ``W_V`` and the loop uses the closed-form gradient
    ``(1/N) Aᵀ (A W_V' - Y)`` (same iterates as autograd, several times faster).
    """
    names = _check_trainable(trainable)
    lr = _check_positive("lr", lr)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    _check_pos_int("log_every", log_every)
    X = model._check_x(X)
    y = y.to(X)
    if y.shape != X.shape:
        raise ValueError(f"y must have shape {tuple(X.shape)}, got {tuple(y.shape)}")
    params = trainable_parameters(model, trainable)
    flags = {nm: p.requires_grad for nm, p in model.named_parameters()}
    a0 = stacked_attention_output(model, X)
    sig0, uf0 = sigma_min(a0), _underflow(model, X)
    losses: list[float] = []
    log_steps: list[int] = []
    try:
        for nm, p in model.named_parameters():
            p.requires_grad_(nm in names)
        if names == ("W_V",) and model.W_O is None:
            step_fn = _closed_form_wv(model, X, y, a0, lr)
        else:
            step_fn = _autograd_step(model, X, y, params, lr)
        initial = float("nan")
        converged = diverged = False
        t = 0
        while True:
            loss, grad_norm_fn, update = step_fn()
            if t == 0:
                initial = loss
            if not math.isfinite(loss):
                diverged = True
            elif initial == 0.0 or loss / initial < tol:
                converged = True
            last = diverged or converged or t == steps
            if t % log_every == 0 or last:
                losses.append(loss)
                log_steps.append(t)
            if last:
                break
            update()
            t += 1
    finally:
        for nm, p in model.named_parameters():
            p.requires_grad_(flags[nm])
    final_ratio = loss / initial if initial > 0 else 0.0
    return GDResult(
        trainable=trainable, lr=lr, steps_run=t, initial_loss=initial, final_loss=loss,
        final_ratio=final_ratio, final_grad_norm=grad_norm_fn(), sigma_min_start=sig0,
        sigma_min_end=sigma_min(stacked_attention_output(model, X)), converged=converged,
        diverged=diverged, underflow_rows_start=uf0, underflow_rows_end=_underflow(model, X),
        losses=losses, log_steps=log_steps,
    )


# one evaluation: (loss, grad norm at this point (lazy), apply the GD update)
_StepFn = Callable[[], tuple[float, Callable[[], float], Callable[[], None]]]


def _autograd_step(
    model: SingleLayer, X: torch.Tensor, y: torch.Tensor, params: list[torch.Tensor], lr: float
) -> _StepFn:
    def step() -> tuple[float, Callable[[], float], Callable[[], None]]:
        loss = regression_loss(model, X, y)
        grads = torch.autograd.grad(loss, params)

        def update() -> None:
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(g, alpha=lr)

        def grad_norm() -> float:
            return math.sqrt(sum(float(g.pow(2).sum()) for g in grads))

        return float(loss.detach()), grad_norm, update

    return step


def _closed_form_wv(
    model: SingleLayer, X: torch.Tensor, y: torch.Tensor, A: torch.Tensor, lr: float
) -> _StepFn:
    N, D, h = X.shape[0], model.D, model.num_heads
    Y = y.reshape(-1, D)
    W = model.W_V

    def stacked() -> torch.Tensor:  # W_V (D, H·D) -> W_V' (H·D, D), a copy
        return W.detach().view(D, h, D).permute(1, 0, 2).reshape(h * D, D)

    def step() -> tuple[float, Callable[[], float], Callable[[], None]]:
        with torch.no_grad():
            r = A @ stacked() - Y
            loss = 0.5 * float(r.pow(2).sum()) / N
            g = (A.T @ r / N).view(h, D, D).permute(1, 0, 2).reshape(D, h * D)

        def update() -> None:
            with torch.no_grad():
                W.sub_(g, alpha=lr)

        return loss, lambda: float(g.norm()), update

    return step


def _hessian_extreme_eigenvalue(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    which: str,
    iters: int,
    seed: int,
    tol: float,
) -> float:
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh

    params = list(params)
    if not params:
        raise ValueError("params must contain at least one tensor")
    if not all(isinstance(p, torch.Tensor) and p.requires_grad for p in params):
        raise ValueError("every tensor in params must require grad")
    _check_pos_int("iters", iters)
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    loss = loss_fn()
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor")
    grads = torch.autograd.grad(loss.reshape(()), params, create_graph=True, allow_unused=True)
    flat = torch.cat([
        (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)
    ])
    P = flat.numel()
    if not flat.requires_grad:  # the loss is at most linear in params: H = 0
        return 0.0

    def hvp(v: np.ndarray) -> np.ndarray:
        vt = torch.as_tensor(np.asarray(v, dtype=np.float64).reshape(-1)).to(flat)
        hv = torch.autograd.grad(flat, params, grad_outputs=vt, retain_graph=True,
                                 allow_unused=True)
        out = torch.cat([
            (h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(hv, params)
        ])
        return out.detach().to(torch.float64).cpu().numpy()

    def dense() -> float:
        H = np.stack([hvp(e) for e in np.eye(P)], axis=1)
        ev = np.linalg.eigvalsh(0.5 * (H + H.T))
        return float(ev[0] if which == "SA" else ev[-1])

    if P <= 3:
        return dense()
    op = LinearOperator((P, P), matvec=hvp, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(P)
    if not np.any(hvp(v0)):  # H v0 = 0 for a random v0: the Hessian vanishes (e.g. every
        return 0.0           # Gaussian row underflowed); ARPACK would fail on a zero vector
    ncv = min(P, max(iters, 3))
    # Below the dense-fallback size, stop Lanczos once it has used about P products (what the
    # dense Hessian costs); ARPACK's own limit (10 P restarts) took minutes on clustered spectra.
    maxiter = max(2, -(-P // ncv)) if P <= _DENSE_FALLBACK else None
    try:
        vals = eigsh(op, k=1, which=which, v0=v0, ncv=ncv, tol=tol, maxiter=maxiter,
                     return_eigenvectors=False)
    except (ArpackNoConvergence, ArpackError) as err:  # clustered extreme eigenvalues
        if P <= _DENSE_FALLBACK:
            return dense()
        raise RuntimeError(
            f"Lanczos did not converge for {P} parameters; raise iters (now {iters}) or tol "
            f"(now {tol})"
        ) from err
    return float(vals[0])


_DENSE_FALLBACK = 4096


def min_hessian_eigenvalue(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    *,
    iters: int = 50,
    seed: int = 0,
    tol: float = 1e-10,
) -> float:
    """Smallest eigenvalue of the Hessian of ``loss_fn()`` with respect to ``params``.

    Hessian-vector products by double backward (the gradient graph is built once) feed ARPACK's
    implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``, ``which="SA"``) with a basis of
    ``min(iters, P)`` vectors (P = number of parameters), a start vector drawn from ``seed`` and
    relative tolerance ``tol`` (0 = machine precision). The Hessian is formed densely from P
    products when P <= 3, or when Lanczos has not converged within about P products and
    P <= 4096 (otherwise ``RuntimeError``). Every parameter must require grad.
    """
    return _hessian_extreme_eigenvalue(loss_fn, params, "SA", iters, seed, tol)


def max_hessian_eigenvalue(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    *,
    iters: int = 50,
    seed: int = 0,
    tol: float = 1e-10,
) -> float:
    """Largest eigenvalue of the Hessian (as :func:`min_hessian_eigenvalue`, ``which="LA"``);
    ``lr < 2 / λ_max`` is the classical stability bound of GD near the current point."""
    return _hessian_extreme_eigenvalue(loss_fn, params, "LA", iters, seed, tol)


def filter_normalized_directions(
    params: Sequence[torch.Tensor], seed: int, *, filter_dim: int = 0
) -> list[torch.Tensor]:
    """One random direction per parameter tensor, filter-normalised (Li et al. 2018).

    For a tensor with ``ndim >= 2`` each slice along ``filter_dim`` (a "filter": by default a row,
    e.g. one output unit of an ``nn.Linear`` weight) of a standard Gaussian draw is rescaled to the
    norm of the same slice of the parameter (zero where the parameter's slice is zero). Vectors and
    scalars (biases, norms) get a zero direction, as in the paper. Draws come from a CPU generator
    seeded from ``seed`` (salted, so that the same integer as a :class:`SingleLayer` seed does not
    reproduce its weights), in the order of ``params``.
    """
    g = make_generator(_salted(seed, "filter_normalized_directions"))
    out = []
    for p in params:
        p = p.detach()
        if p.ndim < 2:
            out.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p)
        pm, dm = p.movedim(filter_dim, 0), d.movedim(filter_dim, 0)
        p_norm = pm.reshape(pm.shape[0], -1).norm(dim=1)
        d_norm = dm.reshape(dm.shape[0], -1).norm(dim=1).clamp(min=torch.finfo(p.dtype).tiny)
        factor = (p_norm / d_norm).view(-1, *([1] * (pm.ndim - 1)))
        out.append((dm * factor).movedim(0, filter_dim).contiguous())
    return out


def loss_slice_2d(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    d1: Sequence[torch.Tensor],
    d2: Sequence[torch.Tensor],
    *,
    span: float = 1.0,
    points: int = 21,
) -> torch.Tensor:
    """Loss on a 2-D slice: ``grid[i, j] = loss_fn()`` at ``θ + a_i d1 + b_j d2`` with
    ``a = b = torch.linspace(-span, span, points)`` (float64, CPU, shape ``(points, points)``).

    ``params`` are modified in place during the sweep and restored bit for bit afterwards (also on
    error); with an odd ``points`` the centre ``grid[points // 2, points // 2]`` is the loss at θ.
    """
    params, d1, d2 = list(params), list(d1), list(d2)
    if not (len(d1) == len(d2) == len(params)) or any(
        a.shape != p.shape or b.shape != p.shape for p, a, b in zip(params, d1, d2)
    ):
        raise ValueError("d1 and d2 must hold one tensor of the shape of each tensor in params")
    _check_positive("span", span)
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an int >= 2, got {points!r}")
    coords = torch.linspace(-span, span, points, dtype=torch.float64)
    grid = torch.empty(points, points, dtype=torch.float64)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for i, a in enumerate(coords.tolist()):
                for j, b in enumerate(coords.tolist()):
                    for p, p0, u, v in zip(params, saved, d1, d2):
                        p.copy_(p0 + a * u.to(p0) + b * v.to(p0))
                    grid[i, j] = float(loss_fn())
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, saved):
                p.copy_(p0)
    return grid


@dataclass
class TwoStageResult:
    """:func:`two_stage_training`: the model after the shared stage (``shared``, ``first``) and,
    per kernel, the model after its second stage (``models[kernel]``, ``results[kernel]``)."""

    shared: SingleLayer
    first: GDResult
    models: dict[str, SingleLayer]
    results: dict[str, GDResult]


def two_stage_training(
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    first_steps: int,
    second_steps: int,
    kernels: Sequence[str] = ("softmax", "gaussian"),
    first_kernel: str = "softmax",
    first_trainable: str = "W_V",
    second_trainable: str = "all",
    second_lr: float | None = None,
    d: int | None = None,
    num_heads: int = 1,
    out_proj: bool = False,
    init_scale: float = 1.0,
    seed: int = 0,
    tol: float = 0.0,
    log_every: int = 100,
) -> TwoStageResult:
    """Shared first stage, then one second stage per kernel from the same point.

    Stage 1: a fresh :class:`SingleLayer` (``first_kernel``, ``init_scale``, ``seed``) trained by
    :func:`train_gd` on ``first_trainable`` for ``first_steps`` steps with ``lr``. Stage 2: for each
    kernel in ``kernels``, a copy of that model with the kernel swapped is trained on
    ``second_trainable`` for ``second_steps`` steps with ``second_lr`` (default ``lr``). Compare
    the landscapes around ``models[kernel]`` with :func:`filter_normalized_directions` (same seed
    for every kernel) and :func:`loss_slice_2d`. ``tol`` = 0 runs every step.
    """
    if isinstance(X, torch.Tensor) and X.ndim == 3:
        _, n, D = X.shape
    else:
        raise ValueError("X must have shape (N, n, D)")
    kernels = [_check_kernel(k) for k in kernels]
    if not kernels:
        raise ValueError("kernels must name at least one kernel")
    _check_trainable(first_trainable)
    _check_trainable(second_trainable)
    model = SingleLayer(D, n, d=d, kernel=first_kernel, num_heads=num_heads,
                        init_scale=init_scale, out_proj=out_proj, seed=seed)
    first = train_gd(model, X, y, trainable=first_trainable, lr=lr, steps=first_steps, tol=tol,
                     log_every=log_every)
    models, results = {}, {}
    for kernel in kernels:
        m = model.copy(kernel=kernel)
        results[kernel] = train_gd(
            m, X, y, trainable=second_trainable, lr=lr if second_lr is None else second_lr,
            steps=second_steps, tol=tol, log_every=log_every,
        )
        models[kernel] = m
    return TwoStageResult(shared=model, first=first, models=models, results=results)
