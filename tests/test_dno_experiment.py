"""The ``dno`` experiment's smoke profile, with its numbers checked."""

import math

import pytest

from optfm.experiments import run_experiment
from optfm.training import read_json


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_experiment("dno", profile="smoke", out_root=tmp_path_factory.mktemp("runs"),
                          verbose=False)


def _arm(run, key):
    return read_json(run / "arms" / f"{key}.json")["result"]


def test_every_arm_optimises_its_reward(run):
    for key in ("brightness-g0-s0", "brightness-g10-s0", "classifier-s0", "classifier_eta0-s0",
                "hybrid_rf-s0"):
        r = _arm(run, key)
        assert len(r["reward_curve"]) == 3 and len(r["evals"]) == 2
        assert r["final"]["reward"] >= r["initial"]["reward"] - 1e-6, key
        for k in ("gmm_loglik", "nearest_dist", "gold_conf", "noise_sq_norm"):
            assert math.isfinite(r["final"][k]), (key, k)
        assert 0.5 < r["final"]["noise_sq_norm"] < 1.5  # still Gaussian-looking noise
        assert len(r["final_samples"]) == 4 and len(r["final_samples"][0]) == 64
        assert all(-1 <= v <= 1 for row in r["final_samples"] for v in row)  # clamped images
    # the differentiable rewards rise within 3 iterations
    assert _arm(run, "classifier-s0")["final"]["reward"] > _arm(run, "classifier-s0")["initial"][
        "reward"]
    assert _arm(run, "brightness-g0-s0")["final"]["reward"] > _arm(run, "brightness-g0-s0")[
        "initial"]["reward"]
    assert _arm(run, "classifier_eta0-s0")["eta"] == 0.0


def test_summary_and_figures(run):
    text = (run / "summary.md").read_text()
    assert "brightness γ=10" in text and "RF p(3), hybrid" in text
    for name in ("curves.png", "samples.png"):
        assert (run / name).stat().st_size > 1000
