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


@dataclass
class EMC2Negatives:
    """Recorded negatives of one ``EMC2State.sample_negatives`` call.

    ``positions[a, r, p]`` indexes the table ``[z_all_views; embed_fn(extra_indices)]``,
    ``sample_ids[a, r, p]`` is the data-set index of that negative; only entries with
    ``mask[a, r, p]`` are recorded (view ``a``, anchor row ``r``, proposal step ``p``).
    """

    positions: torch.Tensor
    sample_ids: torch.Tensor
    mask: torch.Tensor
    extra_indices: torch.Tensor
    acceptance_rate: float


class EMC2State:
    """EMC² Metropolis–Hastings negative sampler with one index + one score per training sample.

    Parameters: ``n`` training samples, ``beta`` = 1/τ > 0, ``burn_in`` in [0, 1) (fraction of the
    valid proposals of each view that are not recorded). Randomness only through ``generator``.
    Duplicate indices in a batch are allowed (the state written last for a duplicate is unspecified).
    """

    def __init__(self, n: int, beta: float = 14.28, burn_in: float = 0.5) -> None:
        _check_n(n)
        _check_positive("beta", beta)
        if not (isinstance(burn_in, (int, float)) and 0.0 <= burn_in < 1.0):
            raise ValueError(f"burn_in must lie in [0, 1), got {burn_in!r}")
        self.n, self.beta, self.burn_in = n, float(beta), float(burn_in)
        self.cur_idx = torch.full((n,), -1, dtype=torch.long)
        self.cur_score = torch.zeros(n)
        self.last_acceptance_rate = float("nan")

    def _to(self, device: torch.device) -> None:
        if self.cur_idx.device != device:
            self.cur_idx, self.cur_score = self.cur_idx.to(device), self.cur_score.to(device)

    @torch.no_grad()
    def sample_negatives(
        self,
        z_all_views: torch.Tensor,
        index: torch.Tensor,
        generator: torch.Generator | None = None,
        normalize: bool = True,
    ) -> EMC2Negatives:
        """Run the in-batch proposal scan for both views and update the chain states.

        ``z_all_views`` = ``[z1; z2]`` of shape ``(2b, d)`` (detached inside).
        """
        if z_all_views.ndim != 2 or z_all_views.shape[0] % 2:
            raise ValueError(f"z_all_views must have shape (2b, d), got {tuple(z_all_views.shape)}")
        b = z_all_views.shape[0] // 2
        if b < 2:
            raise ValueError(f"z_all_views: batch size must be >= 2, got {b}")
        index = _check_index(index, b, self.n, unique=False)
        z = _normalize(z_all_views.detach().float(), normalize)
        device = z.device
        self._to(device)
        index = index.to(device)
        n_prop = 2 * b
        owner = torch.cat([index, index])  # (2b,) data-set index of every proposal
        valid_all = owner[None, :] != index[:, None]  # (b, 2b)
        n_valid = valid_all.sum(dim=1)
        if int(n_valid.min()) == 0:
            raise ValueError("index: every anchor needs at least one other sample in the batch")
        burn = torch.floor(self.burn_in * n_valid.float()).long()

        start_idx = self.cur_idx[index].clone()
        cur = start_idx.clone()
        cur_pos = torch.full((b,), -1, dtype=torch.long, device=device)  # -1: carried over
        score = self.cur_score[index].clone().float()
        score[cur < 0] = float("-inf")
        positions = torch.full((2, b, n_prop), -1, dtype=torch.long, device=device)
        sample_ids = torch.full((2, b, n_prop), -1, dtype=torch.long, device=device)
        mask = torch.zeros((2, b, n_prop), dtype=torch.bool, device=device)
        accepted = torch.zeros((), dtype=torch.long, device=device)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        for a in range(2):
            anchor = z[a * b : (a + 1) * b]
            moved = cur_pos >= 0
            if a == 1 and bool(moved.any()):
                fresh = (anchor * z[cur_pos.clamp(min=0)]).sum(dim=1)
                score = torch.where(moved, fresh, score)
            s_all = anchor @ z.T  # (b, 2b)
            log_u = torch.log(torch.rand((b, n_prop), generator=generator, device=gen_device)).to(
                device
            )
            # The scan is sequential in p (each decision depends on the current score) but
            # vectorised over anchors; it runs on small CPU NumPy arrays, where one step costs
            # ~1 µs per operation instead of a torch op's ~5 µs. Same float32 arithmetic.
            valid_np = valid_all.cpu().numpy()
            s_np = s_all.float().cpu().numpy()
            lu_np = log_u.float().cpu().numpy()
            owner_np = owner.cpu().numpy()
            cur_np, pos_np = cur.cpu().numpy().copy(), cur_pos.cpu().numpy().copy()
            score_np = score.float().cpu().numpy().copy()
            beta = np.float32(self.beta)
            pos_rec = np.empty((b, n_prop), dtype=np.int64)
            ids_rec = np.empty((b, n_prop), dtype=np.int64)
            n_acc = 0
            for p in range(n_prop):
                acc = valid_np[:, p] & (lu_np[:, p] < beta * (s_np[:, p] - score_np))
                if acc.any():
                    cur_np[acc] = owner_np[p]
                    pos_np[acc] = p
                    score_np[acc] = s_np[acc, p]
                    n_acc += int(acc.sum())
                pos_rec[:, p] = pos_np
                ids_rec[:, p] = cur_np
            step = torch.from_numpy(np.cumsum(valid_np, axis=1)).to(device)
            mask[a] = valid_all & (step > burn[:, None])
            positions[a] = torch.from_numpy(pos_rec).to(device)
            sample_ids[a] = torch.from_numpy(ids_rec).to(device)
            cur = torch.from_numpy(cur_np).to(device)
            cur_pos = torch.from_numpy(pos_np).to(device)
            score = torch.from_numpy(score_np).to(device)
            accepted += n_acc
        # Carried-over states that were recorded: an in-batch view of the sample, or embed_fn.
        carried = mask & (positions < 0)
        extra_indices = torch.zeros(0, dtype=torch.long, device=device)
        if bool(carried.any()):
            ids = sample_ids[carried]
            in_batch = owner[None, :] == ids[:, None]  # (m, 2b)
            has = in_batch.any(dim=1)
            first_pos = in_batch.float().argmax(dim=1)
            extra_indices, inverse = torch.unique(ids[~has], return_inverse=True)
            fill = first_pos.clone()
            fill[~has] = n_prop + inverse
            positions[carried] = fill
        self.cur_idx[index] = cur
        self.cur_score[index] = score.to(self.cur_score.dtype)
        total = int(n_valid.sum()) * 2
        self.last_acceptance_rate = int(accepted) / total
        logger.debug("EMC2 acceptance rate %.4f", self.last_acceptance_rate)
        return EMC2Negatives(positions, sample_ids, mask, extra_indices, self.last_acceptance_rate)

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
        b = _check_views(z1, z2)
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
        anchors = z_all.view(2, b, -1)
        positives = torch.stack([anchors[1], anchors[0]])
        pos_term = (anchors * positives).sum(dim=-1)  # (2, b)
        sims = anchors @ table.T  # (2, b, T)
        gathered = torch.gather(sims, 2, neg.positions.clamp(min=0))  # (2, b, 2b)
        maskf = neg.mask.to(sims.dtype)
        neg_term = (gathered * maskf).sum(dim=-1) / maskf.sum(dim=-1)
        return self.beta * (neg_term - pos_term).mean()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"cur_idx": self.cur_idx.cpu().clone(), "cur_score": self.cur_score.cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        idx, score = state["cur_idx"], state["cur_score"]
        if idx.shape != (self.n,) or score.shape != (self.n,):
            raise ValueError(f"state_dict: cur_idx and cur_score must have shape ({self.n},)")
        if int(idx.min()) < -1 or int(idx.max()) >= self.n:
            raise ValueError(f"state_dict: cur_idx values must lie in [-1, {self.n - 1}]")
        self.cur_idx = idx.clone().to(self.cur_idx.device, torch.long)
        self.cur_score = score.clone().to(self.cur_score.device, self.cur_score.dtype)


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
