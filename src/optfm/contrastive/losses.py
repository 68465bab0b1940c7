r"""Contrastive losses: SimCLR (NT-Xent), SogCLR (moving-average GCL), EMC² (MCMC negatives).

Paper: "EMC²: Efficient MCMC Negative Sampling for Contrastive Learning with Global Convergence"
(ICML 2024, arXiv 2404.10575). Baselines: SimCLR and SogCLR (Yuan et al. 2022; LibAUC ``GCLoss_v1``).
See ``specs/contrastive.md``.

Notation: a batch holds ``b`` samples with data-set indices ``index`` and two augmented views
``z1, z2`` of shape ``(b, d)``. Every function L2-normalises its embeddings first (``normalize=True``,
idempotent on unit vectors); pass ``normalize=False`` only with inputs already on the unit sphere.
``beta = 1 / temperature``.

Exact global contrastive loss (``exact_gcl``), on a fixed set of ``n`` samples with ``V >= 2``
pre-computed views ``z_views[i, a]``; anchor view ``a``, positive view ``a' != a`` (mean over the
``V (V - 1)`` ordered pairs), Neg(i) = all views of every other sample::

    F = (1/n) Σ_i mean_{a != a'} [ -β <z_i^a, z_i^a'> + log Σ_{j != i, c} exp(β <z_i^a, z_j^c>) ]
    ∇F = mean[ -β ∇<z_i^a, z_i^a'> + E_{(j,c) ~ π_i^a} β ∇<z_i^a, z_j^c> ],
    π_i^a(j, c) ∝ exp(β <z_i^a, z_j^c>)

Its full gradient with respect to encoder parameters is obtained by autograd: compute
``z_views = encoder(views)`` and call ``exact_gcl(z_views, temperature).backward()``.

SimCLR / NT-Xent (``nt_xent_loss``), in-batch negatives over the ``2b`` views ``z = [z1; z2]``::

    L = (1/2b) Σ_r -log( exp(<z_r, z_r+>/τ) / Σ_{c != r} exp(<z_r, z_c>/τ) )

SogCLR (``SogCLRState.loss``), one float ``u[i]`` per sample; for anchor row r = (i, a),
``Neg_r`` = the 2(b-1) views of the other in-batch samples::

    g_i^a = mean_{z in Neg_r} exp(<z_i^a, z>/τ)
    u_i^a = (1 - γ) u[i] + γ g_i^a          (u_i^a = g_i^a at the first visit of sample i)
    u[i] <- sg((u_i^1 + u_i^2) / 2)
    L = (1/b) Σ_i Σ_a [ -<z_i^a, z_i^ā> + mean_{z in Neg_r} sg(exp(<z_i^a, z>/τ) / u_i^a) <z_i^a, z> ]

EMC² (``EMC2State``), per sample a persistent chain state: ``cur_idx[i]`` (data-set index of the
current negative, -1 before the first visit) and ``cur_score[i]`` = <z_i, z_cur> at the time it was
computed (the score is exp(β cur_score); stored as the inner product for numerical range). For each
view a = 1, 2 of anchor i the chain scans the 2b in-batch embeddings ``[z1; z2]`` in order, skipping
the proposals that belong to sample i itself (self and positive are never accepted)::

    accept j' with probability min{1, exp(β (<z_i^a, z_j'> - score_cur))}

The first ``floor(burn_in * P_i)`` of the ``P_i = 2(b-1)`` valid proposals of each view are burn-in;
the chain state after every later proposal is recorded as a negative (with repeats). The chain
continues from view 1 into view 2 (about 4b proposals per sample per iteration). Score convention:
a state carried over from an earlier iteration keeps its stale stored score until the chain moves;
a state accepted in this iteration has a fresh score, recomputed against the view-2 anchor when the
chain passes from view 1 to view 2. A carried-over state that is recorded gets the embedding of its
first in-batch view when its sample is in the batch, otherwise a fresh forward pass through the
user's ``embed_fn(indices) -> z`` (un-augmented samples). Loss, gradients flowing into anchors,
positives and negatives::

    L = (1/2b) Σ_i Σ_a β [ -<z_i^a, z_i^ā> + mean_{k recorded} <z_i^a, z_neg(i,a,k)> ]

Each single accept/reject step is an exact MH step for π_i^a when its proposal is an independent
uniform draw. The full scan is not exactly π-invariant: each in-batch sample is proposed several
times per iteration (its two views, once per anchor view), and repeated proposals bias the chain's
law towards uniform (tests pin the single step against π and mark the full-scan chi-square xfail). ``last_acceptance_rate``
(accepted / valid proposals, burn-in included) is logged at DEBUG level on every call.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "EMC2Negatives",
    "EMC2State",
    "SogCLRState",
    "exact_gcl",
    "nt_xent_loss",
]

logger = logging.getLogger(__name__)


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ValueError(f"n must be an int >= 2 (number of training samples), got {n!r}")


def _check_views(z1: torch.Tensor, z2: torch.Tensor) -> int:
    if z1.ndim != 2:
        raise ValueError(f"z1 must have shape (b, d), got {tuple(z1.shape)}")
    if z2.shape != z1.shape:
        raise ValueError(f"z2 must have the shape of z1 {tuple(z1.shape)}, got {tuple(z2.shape)}")
    b = z1.shape[0]
    if b < 2:
        raise ValueError(f"z1: batch size must be >= 2 (in-batch negatives), got {b}")
    return b


def _check_index(index: torch.Tensor, b: int, n: int, unique: bool) -> torch.Tensor:
    if not isinstance(index, torch.Tensor) or index.ndim != 1 or index.numel() != b:
        raise ValueError(f"index must be a 1-D integer tensor of length {b}")
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"index must be an integer tensor, got dtype {index.dtype}")
    if int(index.min()) < 0 or int(index.max()) >= n:
        raise ValueError(f"index values must lie in [0, {n - 1}]")
    if unique and torch.unique(index).numel() != b:
        raise ValueError("index must not contain duplicate sample indices within a batch")
    return index.long()


def _normalize(z: torch.Tensor, normalize: bool) -> torch.Tensor:
    return F.normalize(z, p=2, dim=-1) if normalize else z


def nt_xent_loss(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, normalize: bool = True
) -> torch.Tensor:
    """SimCLR InfoNCE (NT-Xent) over the ``2b`` views with in-batch negatives (mean over 2b rows).

    ``z1[k]`` and ``z2[k]`` are the two views of sample k; embeddings are L2-normalised inside
    unless ``normalize=False``.
    """
    _check_positive("temperature", temperature)
    b = _check_views(z1, z2)
    z = _normalize(torch.cat([z1, z2]), normalize)
    sim = z @ z.T / temperature
    eye = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    target = (torch.arange(2 * b, device=z.device) + b) % (2 * b)
    return F.cross_entropy(sim, target)


class SogCLRState:
    """SogCLR moving-average estimator: one float ``u`` (and a ``seen`` flag) per training sample.

    Parameters: ``n`` training samples, ``gamma`` in (0, 1] (weight of the new batch estimate),
    ``temperature`` > 0, ``eps`` clamp of ``u`` in the weights. The state lives on the embeddings'
    device (moved on the first call). Indices within a batch must be unique.
    """

    def __init__(
        self, n: int, gamma: float = 0.9, temperature: float = 0.1, eps: float = 1e-8
    ) -> None:
        _check_n(n)
        if not (isinstance(gamma, (int, float)) and 0.0 < gamma <= 1.0):
            raise ValueError(f"gamma must lie in (0, 1], got {gamma!r}")
        _check_positive("temperature", temperature)
        _check_positive("eps", eps)
        self.n, self.gamma, self.temperature, self.eps = n, float(gamma), float(temperature), eps
        self.u = torch.zeros(n)
        self.seen = torch.zeros(n, dtype=torch.bool)

    def _to(self, device: torch.device) -> None:
        if self.u.device != device:
            self.u, self.seen = self.u.to(device), self.seen.to(device)

    def loss(
        self, z1: torch.Tensor, z2: torch.Tensor, index: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Surrogate loss of the module docstring; updates ``u[index]`` and ``seen[index]``."""
        b = _check_views(z1, z2)
        index = _check_index(index, b, self.n, unique=True)
        z = _normalize(torch.cat([z1, z2]), normalize)
        self._to(z.device)
        index = index.to(z.device)
        sim = z @ z.T  # (2b, 2b)
        rows = torch.arange(2 * b, device=z.device)
        pos_col = (rows + b) % (2 * b)
        neg_mask = torch.ones_like(sim, dtype=torch.bool)
        neg_mask[rows, rows] = False
        neg_mask[rows, pos_col] = False
        exp_sim = torch.exp(sim / self.temperature) * neg_mask
        m = 2 * (b - 1)
        g = exp_sim.sum(dim=1) / m  # (2b,)
        u_prev = self.u[index].repeat(2)
        seen = self.seen[index].repeat(2)
        u_view = torch.where(seen, (1 - self.gamma) * u_prev + self.gamma * g, g)
        self.u[index] = ((u_view[:b] + u_view[b:]) / 2).detach().to(self.u.dtype)
        self.seen[index] = True
        weights = (exp_sim / u_view.clamp(min=self.eps)[:, None]).detach()
        per_row = -sim[rows, pos_col] + (weights * sim * neg_mask).sum(dim=1) / m
        return per_row.sum() / b

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"u": self.u.detach().cpu().clone(), "seen": self.seen.cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        u, seen = state["u"], state["seen"]
        if u.shape != (self.n,) or seen.shape != (self.n,):
            raise ValueError(f"state_dict: u and seen must have shape ({self.n},)")
        self.u = u.detach().clone().to(self.u.device, self.u.dtype)
        self.seen = seen.clone().to(self.seen.device, torch.bool)


def _chains_numpy(sims: np.ndarray, e: np.ndarray, index: np.ndarray, score: np.ndarray,
                  beta: float, burn_in: float) -> tuple[np.ndarray, ...]:
    """Both views' MH scans, vectorised over anchors and sequential in the proposal (NumPy).

    Inputs: ``sims`` (2b, 2b) similarities (row ``a*b + r`` = anchor r of view a), ``e`` (2, b, 2b)
    = -log u ~ Exp(1), ``index`` (b,) data-set indices, ``score`` (b,) the carried-over states'
    scores (-inf for a new chain). Proposal p is accepted iff it is valid (another sample) and
    ``score < s + e / β`` (float32), i.e. u < exp(β (s - score)).

    Returns ``rec`` (2, b, 2b) position after every proposal (-1: carried-over state),
    ``recorded`` (b, 2b) the post-burn-in valid proposals, ``weights`` (2b, 2b + 1) how often each
    position was recorded per anchor row (last column: the carried-over state), final ``pos`` and
    ``score`` (b,), and the number of accepted and of valid proposals.
    """
    b = index.shape[0]
    n_prop = 2 * b
    beta32 = np.float32(beta)
    owner = np.concatenate([index, index])
    valid = owner[None, :] != index[:, None]
    n_valid = valid.sum(axis=1)
    burn = np.floor(burn_in * n_valid).astype(np.int64)
    recorded = valid & (np.cumsum(valid, axis=1) > burn[:, None])
    score = score.astype(np.float32)
    pos = np.full(b, -1, dtype=np.int64)
    rows = np.arange(b)
    rec = np.empty((2, b, n_prop), dtype=np.int64)
    accepted = 0
    for a in range(2):
        s = sims[a * b : (a + 1) * b]
        if a == 1:  # states accepted in view 1 get their score against the view-2 anchor
            moved = pos >= 0
            score[moved] = s[rows[moved], pos[moved]]
        thr_t = np.ascontiguousarray(np.where(valid, s + e[a] / beta32, np.float32(-np.inf)).T)
        s_t = np.ascontiguousarray(s.T)
        for p in range(n_prop):
            acc = score < thr_t[p]
            np.copyto(score, s_t[p], where=acc)
            np.copyto(pos, p, where=acc)
            rec[a, :, p] = pos
            accepted += int(np.count_nonzero(acc))
    cols = np.where(rec >= 0, rec, n_prop)
    flat = (np.arange(2 * b).reshape(2, b, 1) * (n_prop + 1) + cols)[:, recorded]
    weights = np.bincount(flat.ravel(), minlength=2 * b * (n_prop + 1))
    weights = weights.reshape(2 * b, n_prop + 1).astype(np.float32)
    return rec, recorded, weights, pos, score, accepted, int(n_valid.sum())


def _chains_compiled() -> Callable[..., tuple[np.ndarray, ...]] | None:
    """:func:`_chains_numpy` compiled by numba (``pip install 'optfm[fast]'``), None without numba.

    Same float32 arithmetic and the same outputs (tested), one pass per anchor."""
    global _CHAINS_JIT
    if _CHAINS_JIT is None:
        try:
            import numba
        except ImportError:
            _CHAINS_JIT = False
        else:
            def chains(sims, e, index, score0, beta, burn_in):  # pragma: no cover - compiled
                b = index.shape[0]
                n_prop = 2 * b
                beta32 = np.float32(beta)
                rec = np.empty((2, b, n_prop), dtype=np.int64)
                recorded = np.zeros((b, n_prop), dtype=np.bool_)
                weights = np.zeros((2 * b, n_prop + 1), dtype=np.float32)
                pos_out = np.empty(b, dtype=np.int64)
                score_out = np.empty(b, dtype=np.float32)
                owner = np.concatenate((index, index))
                accepted = 0
                total = 0
                for r in range(b):
                    me = index[r]
                    n_valid = 0
                    for p in range(n_prop):
                        n_valid += owner[p] != me
                    total += n_valid
                    burn = int(np.floor(burn_in * n_valid))
                    k = 0
                    for p in range(n_prop):
                        if owner[p] != me:
                            k += 1
                            recorded[r, p] = k > burn
                    sc = np.float32(score0[r])
                    ps = -1
                    for a in range(2):
                        row = a * b + r
                        if a == 1 and ps >= 0:
                            sc = sims[row, ps]
                        for p in range(n_prop):  # the MH scan (the only sequential part)
                            if owner[p] != me and sc < sims[row, p] + e[a, r, p] / beta32:
                                sc = sims[row, p]
                                ps = p
                                accepted += 1
                            rec[a, r, p] = ps
                        for p in range(n_prop):
                            if recorded[r, p]:
                                q = rec[a, r, p]
                                weights[row, q if q >= 0 else n_prop] += 1
                    pos_out[r] = ps
                    score_out[r] = sc
                return rec, recorded, weights, pos_out, score_out, accepted, total

            _CHAINS_JIT = numba.njit(cache=True, nogil=True)(chains)
    return _CHAINS_JIT or None


_CHAINS_JIT: Callable[..., tuple[np.ndarray, ...]] | bool | None = None
_SCANS = ("auto", "numba", "numpy")


@dataclass
class EMC2Negatives:
    """Recorded negatives of one ``EMC2State.sample_negatives`` call.

    ``positions[a, r, p]`` indexes the table ``[z_all_views; embed_fn(extra_indices)]`` (-1: the
    chain is still in its carried-over state, which is not recorded there); only entries with
    ``mask[a, r, p]`` are recorded (view ``a``, anchor row ``r``, proposal step ``p``).
    ``proposal_ids`` (2b,) and ``start_ids`` (b,) are the data-set indices of the in-batch views and
    of the carried-over states; ``sample_ids[a, r, p]`` is the data-set index of the chain state.
    ``weights[a * b + r, t]`` counts how often table row t was recorded for anchor r of view a.
    ``loss_matrix`` M (2b, T): Σ_r <z_r, (M table)_r> = (1/2b) Σ_r [mean_recorded <z_r, z_neg> −
    <z_r, z_r⁺>] (rows of ``weights`` normalised to 1/(2b), minus 1/(2b) at each row's positive).
    """

    positions: torch.Tensor
    mask: torch.Tensor
    extra_indices: torch.Tensor
    acceptance_rate: float
    proposal_ids: torch.Tensor
    start_ids: torch.Tensor
    weights: torch.Tensor
    loss_matrix: torch.Tensor

    @property
    def sample_ids(self) -> torch.Tensor:
        table_ids = torch.cat([self.proposal_ids, self.extra_indices])
        ids = table_ids[self.positions.clamp(min=0)]
        return torch.where(self.positions >= 0, ids, self.start_ids[None, :, None])


class EMC2State:
    """EMC² Metropolis–Hastings negative sampler with one index + one score per training sample.

    Parameters: ``n`` training samples, ``beta`` = 1/τ > 0, ``burn_in`` in [0, 1) (fraction of the
    valid proposals of each view that are not recorded). Randomness only through ``generator``.
    Duplicate indices in a batch are allowed (the state written last for a duplicate is unspecified).
    """

    def __init__(self, n: int, beta: float = 14.28, burn_in: float = 0.5, scan: str = "auto") -> None:
        _check_n(n)
        _check_positive("beta", beta)
        if not (isinstance(burn_in, (int, float)) and 0.0 <= burn_in < 1.0):
            raise ValueError(f"burn_in must lie in [0, 1), got {burn_in!r}")
        if scan not in _SCANS:
            raise ValueError(f"scan must be one of {', '.join(_SCANS)}, got {scan!r}")
        if scan == "numba" and _chains_compiled() is None:
            raise ValueError("scan='numba' needs numba: pip install 'optfm[fast]' (or scan='auto')")
        self.n, self.beta, self.burn_in, self.scan = n, float(beta), float(burn_in), scan
        self.cur_idx = torch.full((n,), -1, dtype=torch.long)  # on the CPU, where the scan runs
        self.cur_score = torch.zeros(n)
        # NumPy views of the same memory (the scan's side; torch and NumPy see every write)
        self._idx_np, self._score_np = self.cur_idx.numpy(), self.cur_score.numpy()
        self.last_acceptance_rate = float("nan")

    @property
    def backend(self) -> str:
        """``"numba"`` (compiled scan) or ``"numpy"`` (the NumPy loop) — what ``scan`` resolved to."""
        return "numpy" if self._chains_fn() is _chains_numpy else "numba"

    def _chains_fn(self) -> Callable[..., tuple[np.ndarray, ...]]:
        if self.scan == "numpy":
            return _chains_numpy
        return _chains_compiled() or _chains_numpy

    @torch.no_grad()
    def sample_negatives(
        self,
        z_all_views: torch.Tensor,
        index: torch.Tensor,
        generator: torch.Generator | None = None,
        normalize: bool = True,
    ) -> EMC2Negatives:
        """Run the in-batch proposal scan for both views and update the chain states.

        ``z_all_views`` = ``[z1; z2]`` of shape ``(2b, d)`` (detached inside). The scan runs on the
        CPU (one (2b, 2b) similarity matrix is copied there); the returned tensors are on
        ``z_all_views.device``.
        """
        if z_all_views.ndim != 2 or z_all_views.shape[0] % 2:
            raise ValueError(f"z_all_views must have shape (2b, d), got {tuple(z_all_views.shape)}")
        b = z_all_views.shape[0] // 2
        if b < 2:
            raise ValueError(f"z_all_views: batch size must be >= 2, got {b}")
        index = _check_index(index, b, self.n, unique=False)
        index_np = index.cpu().numpy()
        if (index_np == index_np[0]).all():
            raise ValueError("index: every anchor needs at least one other sample in the batch")
        device = z_all_views.device
        z = _normalize(z_all_views.detach().float(), normalize)
        sims = (z @ z.T).cpu().numpy()  # (2b, 2b): row a*b + r is anchor r of view a
        gen_device = generator.device if generator is not None else torch.device("cpu")
        # e = -log u ~ Exp(1): accept iff score < s + e / β  <=>  u < exp(β (s - score))
        e = torch.rand((2, b, 2 * b), generator=generator, device=gen_device)
        e = e.log_().neg_().cpu().numpy()
        start = self._idx_np[index_np]
        score = self._score_np[index_np]
        score[start < 0] = -np.inf  # the first proposal of a new chain is always accepted
        rec, recorded, weights, pos, score, accepted, n_valid = self._chains_fn()(
            sims, e, index_np, score, self.beta, self.burn_in)
        n_prop = 2 * b
        owner = np.concatenate([index_np, index_np])
        self._idx_np[index_np] = np.where(pos >= 0, owner[pos.clip(min=0)], start)
        self._score_np[index_np] = score
        self.last_acceptance_rate = accepted / (2 * n_valid)
        logger.debug("EMC2 acceptance rate %.4f", self.last_acceptance_rate)

        # Carried-over states that were recorded (no acceptance before the first recorded proposal
        # of the anchor): an in-batch view of the sample, or embed_fn on the un-augmented sample.
        positions, table_weights = rec, weights[:, :n_prop]
        extra_indices = np.zeros(0, dtype=np.int64)
        carried_rows = np.flatnonzero(weights[:, n_prop])
        if carried_rows.size:
            anchors = np.unique(carried_rows % b)
            ids = start[anchors]
            match = owner[None, :] == ids[:, None]
            has = match.any(axis=1)
            col = match.argmax(axis=1)
            extra_indices, inverse = np.unique(ids[~has], return_inverse=True)
            col[~has] = n_prop + inverse.reshape(-1)
            carried_col = np.full(b, -1, dtype=np.int64)
            carried_col[anchors] = col
            positions = rec.copy()
            carried = recorded[None] & (rec < 0)
            positions[carried] = carried_col[np.nonzero(carried)[1]]
            table_weights = np.zeros((2 * b, n_prop + extra_indices.size), dtype=np.float32)
            table_weights[:, :n_prop] = weights[:, :n_prop]
            np.add.at(table_weights, (carried_rows, carried_col[carried_rows % b]),
                      weights[carried_rows, n_prop])

        rows = np.arange(2 * b)
        loss_matrix = table_weights / (table_weights.sum(axis=1, keepdims=True) * (2 * b))
        loss_matrix[rows, (rows + b) % (2 * b)] -= np.float32(1.0 / (2 * b))

        def out(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device)

        return EMC2Negatives(out(positions), out(recorded).expand(2, b, n_prop),
                             out(extra_indices), self.last_acceptance_rate, out(owner), out(start),
                             out(np.ascontiguousarray(table_weights)), out(loss_matrix))

    def loss(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        index: torch.Tensor,
        embed_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """EMC² loss of the module docstring (samples negatives, updates the chains).

        ``embed_fn(indices) -> (m, d)`` embeds un-augmented samples; it is required only when a
        recorded carried-over state is not in the batch (``ValueError`` otherwise).
        """
        _check_views(z1, z2)
        z_all = _normalize(torch.cat([z1, z2]), normalize)
        neg = self.sample_negatives(z_all, index, generator, normalize=False)
        table = z_all
        if neg.extra_indices.numel():
            if embed_fn is None:
                raise ValueError(
                    "embed_fn is required: a recorded chain state is not in the batch "
                    f"(samples {neg.extra_indices.tolist()})"
                )
            extra = embed_fn(neg.extra_indices)
            if extra.shape != (neg.extra_indices.numel(), z_all.shape[1]):
                raise ValueError(
                    f"embed_fn must return shape ({neg.extra_indices.numel()}, {z_all.shape[1]}), "
                    f"got {tuple(extra.shape)}"
                )
            table = torch.cat([z_all, _normalize(extra.to(z_all), normalize)])
        # L = β Σ_r <z_r, (M table)_r>: one matmul (few small ops, cheap backward); gradients flow
        # into anchors, positives and negatives alike
        return self.beta * (z_all * (neg.loss_matrix.to(z_all) @ table)).sum()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"cur_idx": self.cur_idx.cpu().clone(), "cur_score": self.cur_score.cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        idx, score = state["cur_idx"], state["cur_score"]
        if idx.shape != (self.n,) or score.shape != (self.n,):
            raise ValueError(f"state_dict: cur_idx and cur_score must have shape ({self.n},)")
        if int(idx.min()) < -1 or int(idx.max()) >= self.n:
            raise ValueError(f"state_dict: cur_idx values must lie in [-1, {self.n - 1}]")
        self.cur_idx.copy_(idx)  # in place: the NumPy views stay valid
        self.cur_score.copy_(score)


def exact_gcl(
    z_views: torch.Tensor, temperature: float = 0.1, normalize: bool = True
) -> torch.Tensor:
    """Exact global contrastive loss F on a fixed set; ``z_views`` has shape ``(n, V, d)``, V >= 2.

    Differentiable: the full gradient is ``autograd`` of this value (see module docstring).
    Memory O((nV)²).
    """
    _check_positive("temperature", temperature)
    if z_views.ndim != 3 or z_views.shape[0] < 2 or z_views.shape[1] < 2:
        raise ValueError(f"z_views must have shape (n>=2, V>=2, d), got {tuple(z_views.shape)}")
    n, v, d = z_views.shape
    beta = 1.0 / temperature
    z = _normalize(z_views, normalize)
    flat = z.reshape(n * v, d)
    owner = torch.arange(n, device=z.device).repeat_interleave(v)
    logits = beta * flat @ flat.T  # (nV, nV)
    same = owner[:, None] == owner[None, :]
    lse = torch.logsumexp(logits.masked_fill(same, float("-inf")), dim=1)  # (nV,)
    pos = torch.einsum("iad,ibd->iab", z, z)  # (n, V, V)
    off = ~torch.eye(v, dtype=torch.bool, device=z.device)
    pos_mean = (pos * off).sum(dim=2) / (v - 1)  # (n, V): mean over a' != a
    return (-beta * pos_mean + lse.view(n, v)).mean()
