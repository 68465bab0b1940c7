"""The pretraining recipe under torch.distributed: two CPU ranks (gloo) launched with torchrun.

The worker (tests/pretrain_ddp_worker.py) pretrains a tiny byte-level Llama, full rank and with
SLTrain layers, wrapped in torch's ``DistributedDataParallel``: every rank draws the same global
batch of 4 windows and trains on rows ``rank::2``; DDP averages the two half-batch gradients, which
(equal token counts per rank) is the gradient of the global-batch mean loss. So the ranks must end
bitwise identical, and equal to one process trained with ``world_size=1`` on the same global
batches, up to floating-point summation order. All arms share one torchrun launch (about 15 s on
two cores); the single-process references run in this process with the worker's own code.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from optfm.data.corpus import python_stdlib_corpus
from tests import pretrain_ddp_worker as W
from tests.conftest import run_torchrun

WORKER = Path(__file__).with_name("pretrain_ddp_worker.py")
WORLD = 2
FP32_ARMS = ["full", "sltrain"]

# Tolerances on the final parameters (max abs difference, DDP vs one process). The two runs sum
# the per-token gradients in a different order (each rank sums its 64 tokens, then the all-reduce
# averages the two halves; one process sums all 128 at once), so the float32 gradients differ by
# rounding, ~1e-7 relative. AdamW's update m/(√v + ε) is normalised per element: for an entry whose
# gradient nearly cancels, a rounding difference that is small in absolute terms is large relative
# to the entry and moves the update by a visible fraction of the learning rate. Measured with
# lr = 3e-3 over 6 steps: 6.7e-6 (full rank) and 2.9e-5 (SLTrain; lm_head and a gate_proj.A),
# so float32 gets 1e-4. Skipping the all-reduce instead (each rank training on its half batch)
# moves parameters by 2.4e-2, so 1e-4 still tells a correct run from a broken one. In float64 the
# same runs agree to ~1e-14, which shows the float32 gap is rounding only.
ATOL = {torch.float32: 1e-4, torch.float64: 1e-10}
RTOL_GRAD_NORM = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """``[rank0, rank1]``: each ``{arm: result}`` as written by the worker."""
    # Build the corpus once here (in conftest's private $OPTFM_CACHE, which the subprocess
    # inherits), so the two ranks only read the cache and never race to write it.
    python_stdlib_corpus()
    out = tmp_path_factory.mktemp("pretrain-ddp")
    results = run_torchrun(WORKER, out, nproc=WORLD, timeout=300)
    assert all(r["world_size"] == WORLD for r in results)
    return [r["runs"] for r in results]


@pytest.fixture(scope="module")
def single() -> dict:
    """The single-process references: ``world_size=1``, no DDP, the same global batches."""
    return {arm: W.run(arm) for arm in W.ARMS}


def _params(run: dict) -> torch.Tensor:
    return torch.tensor(run["params"], dtype=torch.float64)


@pytest.mark.parametrize("arm", list(W.ARMS))
def test_ranks_end_identical(ranks, arm):
    r0, r1 = ranks[0][arm], ranks[1][arm]
    assert r0["numel"] == r1["numel"] == len(r0["params"])
    assert torch.equal(_params(r0), _params(r1))  # bitwise: same averaged gradient on both
    assert r0["initial_val_loss"] == r1["initial_val_loss"]
    assert [h["step"] for h in r0["history"]] == [3, 6]
    for h0, h1 in zip(r0["history"], r1["history"], strict=True):
        for k in ("step", "lr", "grad_norm", "val_loss", "val_bpb", "val_ppl", "train_loss"):
            assert h0[k] == h1[k], k  # train_loss: all-reduced global-batch loss


@pytest.mark.parametrize("arm", list(W.ARMS))
def test_ddp_matches_one_process_on_the_global_batch(ranks, single, arm):
    dtype = W.ARMS[arm][1]
    ref = single[arm]
    assert ref["numel"] == ranks[0][arm]["numel"]
    diff = (_params(ranks[0][arm]) - _params(ref)).abs().max().item()
    assert diff < ATOL[dtype], f"{arm}: max |DDP - single| = {diff:.3g}"
    init = torch.cat([p.detach().flatten() for _, p in W.build_model(arm).named_parameters()])
    assert (_params(ref) - init.double()).abs().max() > 1e-3  # training moved the parameters
    for h0, _h1, hs in zip(ranks[0][arm]["history"], ranks[1][arm]["history"], ref["history"],
                          strict=True):
        assert h0["step"] == hs["step"] and h0["lr"] == hs["lr"]
        # the clipped norm is of the all-reduced gradient: the global-batch gradient's norm (a
        # sum instead of a mean over ranks would double it)
        assert h0["grad_norm"] == pytest.approx(hs["grad_norm"], rel=RTOL_GRAD_NORM[dtype])
        assert h0["val_loss"] == pytest.approx(hs["val_loss"], abs=1e-5)
        # equal token counts per rank: the logged (all-reduced) loss is the global-batch loss
        assert h0["train_loss"] == pytest.approx(hs["train_loss"], abs=1e-5)


@pytest.mark.parametrize("arm", FP32_ARMS)
def test_validation_loss_falls(ranks, single, arm):
    for run in (ranks[0][arm], single[arm]):
        losses = [run["initial_val_loss"], *(h["val_loss"] for h in run["history"])]
        assert losses[0] == pytest.approx(5.55, abs=0.1)  # ≈ ln 257 at initialisation
        assert all(a > b for a, b in itertools.pairwise(losses)), losses
        assert losses[-1] < losses[0] - 0.2, losses
