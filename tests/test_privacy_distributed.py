"""make_private under torch.distributed: two CPU ranks (gloo) launched with torchrun.

The worker (tests/dp_ddp_worker.py) trains a small MLP wrapped in Opacus's ``DPDDP`` (and, for
comparison, torch's ``DistributedDataParallel``; Opacus's ``make_private`` treats both, and
``FSDPModule``, as distributed) with DOPPLER and DiSK filters. Opacus then adds the noise on rank
0 only and all-reduces the privatized gradient; optfm's ``DistributedPrivateOptimizer`` applies the
filter after that all-reduce, so every rank filters the same averaged noised gradient and the
filter states, and hence the parameters, stay identical. All runs share one torchrun launch
(about 10 s on two cores).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from optfm.privacy import epsilon_for, make_private
from tests import dp_ddp_worker as W
from tests.conftest import run_torchrun

WORKER = Path(__file__).with_name("dp_ddp_worker.py")
WORLD = 2
NOISY = ["none-noisy", "a9b1-noisy", "kalman-noisy", "a9b1-noisy-ddp", "kalman-noisy-ddp"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """``[rank0, rank1]``: each ``{run name: result}`` as written by the worker."""
    out = tmp_path_factory.mktemp("dp-ddp")
    results = run_torchrun(WORKER, out, nproc=WORLD, timeout=240)
    return [r["runs"] for r in results]


def _params(run: dict) -> torch.Tensor:
    return torch.tensor(run["params"], dtype=torch.float64)


@pytest.mark.parametrize("name", [name for name, *_ in W.RUNS])
def test_ranks_end_with_identical_parameters(ranks, name):
    r0, r1 = ranks[0][name], ranks[1][name]
    assert torch.equal(_params(r0), _params(r1))  # bitwise: filter states stayed in sync
    assert r0["steps"] == r1["steps"] == W.STEPS
    for r in (r0, r1):
        assert r["optimizer"] == "DistributedPrivateOptimizer"
        assert r["world_size"] == WORLD
        # Opacus: q = 1 / len(loader) = 1/8 (global batch 64 of 512), per-rank batch 32
        assert r["sample_rate"] == 1 / 8 and r["loader_batches"] == 8
        assert r["expected_batch_size"] == W.GLOBAL_BATCH / WORLD


@pytest.mark.parametrize("name", NOISY)
def test_epsilon_is_the_accountants_for_the_global_sample_rate(ranks, name):
    eps = [ranks[r][name]["epsilon"] for r in range(WORLD)]
    assert eps[0] == eps[1] > 0.0
    assert eps[0] == pytest.approx(epsilon_for(W.SIGMA, 1 / 8, W.STEPS, W.DELTA))


@pytest.mark.parametrize("name", NOISY)
def test_noise_is_added_once_with_std_sigma_C(ranks, name):
    """In the all-reduced gradient, (grad · B − Σ_ranks clipped sums) is N(0, σ²C²): noise from
    rank 0 only (two ranks each adding it would give √2 σC), averaged over the global batch."""
    for r in range(WORLD):
        run = ranks[r][name]
        assert run["noise_numel"] == 899
        assert run["noise_std"] == pytest.approx(W.SIGMA * W.C, rel=0.1)
        assert abs(run["noise_mean"]) < 0.15 * W.SIGMA * W.C


@pytest.mark.parametrize("filt", ["a9b1", "kalman"])
def test_noise_changes_the_trajectory(ranks, filt):
    noisy, quiet = ranks[0][f"{filt}-noisy"], ranks[0][f"{filt}-sigma0"]
    assert quiet["noise_std"] < 1e-5
    assert (_params(noisy) - _params(quiet)).abs().max() > 1e-2


def test_filters_are_applied(ranks):
    runs = ranks[0]
    none, a9b1, kalman = (_params(runs[n]) for n in ("none-noisy", "a9b1-noisy", "kalman-noisy"))
    assert (none - a9b1).abs().max() > 1e-3
    assert (none - kalman).abs().max() > 1e-3
    assert (a9b1 - kalman).abs().max() > 1e-3


@pytest.mark.parametrize("filt", ["a9b1", "kalman"])
def test_torch_ddp_and_opacus_dpddp_agree(ranks, filt):
    assert torch.allclose(_params(ranks[0][f"{filt}-noisy"]),
                          _params(ranks[0][f"{filt}-noisy-ddp"]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("filt", ["a9b1", "kalman"])
def test_without_noise_matches_one_process_on_the_global_batches(ranks, filt):
    """σ = 0, no clipping, fixed batches: rank r's DistributedSampler batch k holds samples
    64k + 2j + r, so the two ranks together see samples [64k, 64k + 64), the k-th batch of a
    plain loader in one process. The all-reduced, filtered run equals that single-process run
    (DiSK's two evaluations and the DOPPLER recursion included)."""
    model = W.model()
    loader = DataLoader(W.dataset(), batch_size=W.GLOBAL_BATCH)
    model, opt, loader, engine = make_private(
        model, torch.optim.Adam(model.parameters(), lr=W.LR), loader, noise_multiplier=0.0,
        max_grad_norm=1e6, filter=W.make_filter(filt), poisson_sampling=False)
    W.train(model, opt, loader, W.STEPS)
    assert engine.steps == W.STEPS
    single = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    for r in range(WORLD):
        distributed = _params(ranks[r][f"{filt}-exact"])
        assert torch.allclose(distributed, single, atol=1e-5, rtol=0)
    init = torch.cat([p.detach().flatten() for p in W.model().parameters()]).double()
    assert (single - init).abs().max() > 1e-2  # training moved the parameters
