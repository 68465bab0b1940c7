"""The ``contrastive`` experiment's smoke profile, with its numbers checked."""

import math

import pytest
import torch

from optfm.experiments import run_experiment
from optfm.training import read_json


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_experiment("contrastive", profile="smoke",
                          out_root=tmp_path_factory.mktemp("runs"), verbose=False)


def test_every_method_and_batch_is_measured(run):
    for m in ("simclr", "sogclr", "emc2"):
        for b in (8, 32):
            r = read_json(run / "arms" / f"{m}-b{b}-s0.json")["result"]
            assert r["iterations"] > 0 and len(r["evals"]) >= 2
            assert r["evals"][0]["iteration"] == 0
            for e in r["evals"]:
                assert math.isfinite(e["exact_gcl"]) and -1 <= e["grad_cos"] <= 1
                assert e["grad_err"] > 0 and math.isfinite(e["grad_err"])
            # training lowers the exact global contrastive loss on the fixed subset
            assert r["final_gcl"] < r["evals"][0]["exact_gcl"]
            assert 0.1 < r["probe_acc"] <= 1 and 0.1 < r["knn1_acc"] <= 1
    assert read_json(run / "arms" / "simclr-b8-s0.json")["result"]["state_bytes_per_sample"] == 0
    sog = read_json(run / "arms" / "sogclr-b8-s0.json")["result"]
    emc = read_json(run / "arms" / "emc2-b8-s0.json")["result"]
    assert sog["state_bytes_per_sample"] > 0 and emc["state_bytes_per_sample"] > 0
    assert 0 < emc["acceptance_rate"] < 1


def test_summary_and_figure(run):
    assert "| EMC² | 32 |" in (run / "summary.md").read_text()
    assert (run / "contrastive.png").stat().st_size > 1000


@pytest.mark.parametrize("method", ["simclr", "sogclr", "emc2"])
def test_grad_scale_puts_each_estimate_on_the_exact_gradient_scale(method: str) -> None:
    """With the whole set as one batch (fresh state), SogCLR's scaled gradient IS ∇F; SimCLR's
    differs only by the positive in its denominator; EMC²'s is a Monte-Carlo estimate of it."""
    from optfm.contrastive.losses import EMC2State, SogCLRState, exact_gcl, nt_xent_loss
    from optfm.experiments.contrastive import ContrastiveConfig, grad_scale

    config = ContrastiveConfig()
    n, d = 24, 6
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, d, generator=g, requires_grad=True)
    x1, x2 = torch.randn(n, 10, generator=g), torch.randn(n, 10, generator=g)
    (full,) = torch.autograd.grad(exact_gcl(torch.stack([x1 @ w, x2 @ w], 1), config.temperature), w)
    index = torch.arange(n)
    if method == "simclr":
        loss = nt_xent_loss(x1 @ w, x2 @ w, temperature=config.temperature)
    elif method == "sogclr":
        loss = SogCLRState(n, gamma=config.gamma, temperature=config.temperature).loss(
            x1 @ w, x2 @ w, index)
    else:
        state = EMC2State(n, beta=1 / config.temperature, burn_in=0.0)
        loss = sum(state.loss(x1 @ w, x2 @ w, index, generator=g) for _ in range(200)) / 200
    (est,) = torch.autograd.grad(loss, w)
    err = float((grad_scale(method, config) * est - full).square().sum() / full.square().sum())
    bound = {"sogclr": 1e-10, "simclr": 1e-3, "emc2": 0.1}[method]  # measured 7e-14, 2e-4, 0.04
    assert err < bound, err
