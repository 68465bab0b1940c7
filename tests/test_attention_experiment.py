"""The ``attention`` experiment's smoke profile, with its numbers checked."""

from __future__ import annotations

import math

import numpy as np
import pytest

import optfm.experiments.attention as att  # importing registers the experiment
from optfm.experiments import Arm, RunContext, run_experiment
from optfm.experiments.config import ConfigError, apply_overrides
from optfm.training import read_json

SMOKE = att.AttentionExperiment.config("smoke")
STATUSES = {"success", "diverged", "decreasing", "nonstationary", "saddle", "minimum", "flat",
            "unclassified"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_experiment("attention", profile="smoke", out_root=tmp_path_factory.mktemp("runs"),
                          verbose=False)


def _arm(run, key):
    return read_json(run / "arms" / f"{key}.json")["result"]


def test_every_arm_is_present(run):
    exp = att.AttentionExperiment()
    keys = [a.key for a in exp.arms(SMOKE)]
    for k in SMOKE.kernels:
        for s in SMOKE.subsets:
            assert f"grid-{k}-{att.SUBSET_KEYS[s]}-N4-n3-D8-i0.5" in keys
        for D in SMOKE.wv_Ds:
            assert f"wv-{k}-WV-N2-n2-D{D}-i1" in keys
    assert "landscape-softmax" in keys and "listops-softmax" in keys
    assert "listops-gaussian" in keys
    for key in keys:
        assert (run / "arms" / f"{key}.json").is_file()


def test_wv_random_targets_reach_zero_loss_iff_D_at_least_Nn(run):
    """Claim 1 on the smoke grid (N·n = 4): D = 16 gives A full row rank (LS optimum 0) and GD
    obeys the linear-rate bound (1 - lr_frac/κ²)^(2t); D = 2 leaves a positive LS residual that
    GD cannot beat."""
    for k in SMOKE.kernels:
        big = _arm(run, f"wv-{k}-WV-N2-n2-D16-i1")
        small = _arm(run, f"wv-{k}-WV-N2-n2-D2-i1")
        assert len(big["runs"]) == len(small["runs"]) == SMOKE.wv_seeds
        for r in big["runs"]:
            assert r["opt_ratio"] < 1e-20 and r["sigma_min_start"] > 0
            assert r["lr"] == pytest.approx(SMOKE.lr_frac * 2 / r["sigma_max_start"] ** 2)
            bound = (1 - SMOKE.lr_frac / r["kappa2_start"]) ** (2 * r["steps_run"])
            assert r["final_ratio"] <= bound * (1 + 1e-6) + 1e-12, (k, r["seed"])
            assert all(b <= a * (1 + 1e-12) for a, b in zip(r["curve_ratio"], r["curve_ratio"][1:]))
            assert r["status"] in ("success", "decreasing", "nonstationary", "minimum")
        for r in small["runs"]:
            assert r["sigma_min_start"] == 0.0 and r["kappa2_start"] is None
            assert r["opt_ratio"] > 0.1 and not r["success"]
            assert r["final_ratio"] >= r["opt_ratio"] * (1 - 1e-9)
            assert r["final_ratio"] == pytest.approx(r["opt_ratio"], rel=1e-3)  # GD reached it
            assert r["status"] == "minimum" and r["lambda_min_end"] >= 0  # convex, at the optimum
    # measured: softmax (κ² ≈ 3-40 here) reaches the strict threshold on both seeds
    soft = _arm(run, "wv-softmax-WV-N2-n2-D16-i1")["runs"]
    assert all(r["strict"] and r["final_ratio"] < SMOKE.tol_strict for r in soft)


def test_grid_runs_are_consistent(run):
    for k in SMOKE.kernels:
        for s in SMOKE.subsets:
            cell = _arm(run, f"grid-{k}-{att.SUBSET_KEYS[s]}-N4-n3-D8-i0.5")
            assert cell["kernel"] == k and cell["subset"] == s and cell["teacher_scale"] == 1.0
            runs = cell["runs"]
            assert len(runs) == SMOKE.seeds and [r["seed"] for r in runs] == [0, 1]
            assert 0 <= sum(r["success"] for r in runs) <= SMOKE.seeds
            for r in runs:
                assert r["status"] in STATUSES
                assert not r["diverged"] and r["final_ratio"] < 1.0  # GD lowered the loss
                assert r["success"] == (r["final_ratio"] < SMOKE.tol_success)
                assert r["strict"] <= r["success"]
                assert r["curve_steps"][0] == 0 and r["curve_ratio"][0] == pytest.approx(1.0)
                assert r["curve_steps"][-1] == r["steps_run"] <= SMOKE.steps
                assert r["lr"] == pytest.approx(SMOKE.lr_frac / r["lambda_max_init"])
                assert 0 <= r["underflow_rows_start"] <= r["rows"] == 12
                assert 0.0 <= r["start"]["frac_saturated"] <= 1.0
                if k == "softmax":
                    assert r["start"]["mean_row_sum"] == pytest.approx(1.0)
                if r["status"] in ("saddle", "minimum"):
                    assert r["lambda_min_end"] <= r["lambda_max_end"]
                    assert (r["status"] == "saddle") == (
                        r["lambda_min_end"] < -att.SADDLE_REL * abs(r["lambda_max_end"]))
    # W_V with teacher targets is a consistent least-squares problem: the LS optimum is 0
    for k in SMOKE.kernels:
        for r in _arm(run, f"grid-{k}-WV-N4-n3-D8-i0.5")["runs"]:
            assert r["opt_ratio"] < 1e-20
    # measured: softmax W_V reaches 1e-3 on both seeds within 300 steps
    assert all(r["success"] for r in _arm(run, "grid-softmax-WV-N4-n3-D8-i0.5")["runs"])


def test_lr_rule_is_half_over_the_initial_hessian_lambda_max(run):
    """Rebuild one run's student from the recorded seeds and recompute λ_max independently."""
    from optfm.attention import (
        make_student,
        make_teacher_data,
        max_hessian_eigenvalue,
        regression_loss,
    )

    r = _arm(run, "grid-gaussian-WQ-N4-n3-D8-i0.5")["runs"][1]
    X, y, t = make_teacher_data(4, 3, 8, kernel="gaussian", init_scale=1.0,
                                seed=att._salted(1, "data"))
    m = make_student(t, trainable="W_Q", seed=att._salted(1, "student"), init_scale=0.5)
    lam = max_hessian_eigenvalue(lambda: regression_loss(m, X, y), [m.W_Q], iters=64)
    assert r["lambda_max_init"] == pytest.approx(lam, rel=1e-6)
    assert r["initial_loss"] == pytest.approx(regression_loss(m, X, y).item(), rel=1e-12)


def test_landscape(run):
    res = _arm(run, "landscape-softmax")["seeds"]
    assert len(res) == SMOKE.landscape_seeds
    p = SMOKE.landscape_points
    for k in ("softmax", "gaussian"):
        r = res[0]["kernels"][k]
        g = np.asarray(r["grid"])
        assert g.shape == (p, p) and np.isfinite(g).all() and (g >= 0).all()
        # the centre of the slice is the point the second stage ended at
        assert g[p // 2, p // 2] == pytest.approx(r["stage2_final_loss"], rel=1e-9)
        assert r["stage2_final_loss"] < r["stage2_initial_loss"]
        assert 0 <= r["local_minima"] <= (p - 2) ** 2 and 0 <= r["nonconvex_frac"] <= 1
        assert r["second_diff"] > 0
    # both kernels start stage 2 from the same shared point (same W, different kernel)
    assert res[0]["first_ratio"] < 1


def test_listops(run):
    arms = {v: _arm(run, f"listops-{v}")["seeds"] for v in SMOKE.listops_variants}
    assert set(arms) == {"softmax", "gaussian"}
    for v, rs in arms.items():
        for r in rs:
            h = r["history"]
            assert [e["epoch"] for e in h] == list(range(SMOKE.listops_epochs + 1))
            assert 0.05 < r["majority_acc"] < 0.3
            assert h[-1]["test_loss"] < h[0]["test_loss"]  # training lowers the test loss
            assert h[-1]["train_loss"] < h[1]["train_loss"] or SMOKE.listops_epochs == 1
            assert all(0 <= e["test_acc"] <= 1 for e in h)
            assert h[-1]["underflow_rows"] <= h[-1]["underflow_checked"]
            if v == "softmax":
                assert h[0]["underflow_checked"] == 0 and h[-1]["underflow_checked"] == 0
    # measured 0.150 (chance 0.10, majority 0.145) after 2 short epochs
    assert arms["softmax"][0]["final_test_acc"] > 0.1


def test_summary_metrics_and_figures(run):
    text = (run / "summary.md").read_text()
    for heading in ("W_V only, random targets", "GD on realisable teacher data",
                    "Pooled success rates", "Loss landscapes", "ListOps"):
        assert heading in text
    assert "| softmax | 1 | 2 | 2 | 16 | yes | 2/2 [0.34, 1.00] |" in text
    metrics = read_json(run / "metrics.json")
    assert metrics["wv_softmax_N2_n2_D16_i1_success_rate"] == 1.0
    assert metrics["wv_softmax_N2_n2_D2_i1_success_rate"] == 0.0
    assert 0 <= metrics["pooled_gaussian_WQ_success_rate"] <= 1
    assert metrics["grid_runs_total"] == len(SMOKE.kernels) * len(SMOKE.subsets) * SMOKE.seeds
    for name in ("attention_wv.png", "attention_success.png", "attention_curves.png",
                 "attention_landscape.png", "attention_listops.png"):
        assert (run / name).stat().st_size > 1000, name
        assert f"]({name})" in text


def test_landscape_roughness_and_wilson():
    x = np.linspace(-1, 1, 21)
    bowl = x[:, None] ** 2 + 2 * x[None, :] ** 2
    r = att.landscape_roughness(bowl)
    h = x[1] - x[0]
    assert r["local_minima"] == 1 and r["nonconvex_frac"] == 0.0
    assert r["second_diff"] == pytest.approx(h**2)
    wavy = bowl + 0.3 * np.sin(12 * x)[:, None] * np.sin(12 * x)[None, :]
    w = att.landscape_roughness(wavy)
    assert w["local_minima"] > 1 and w["nonconvex_frac"] > 0.2 and w["second_diff"] > 3 * h**2
    with pytest.raises(ValueError, match="2-D"):
        att.landscape_roughness(np.zeros((2, 5)))
    lo, hi = att.wilson_ci(7, 10)
    assert (lo, hi) == pytest.approx((0.3968, 0.8922), abs=1e-4)
    assert att.wilson_ci(0, 10)[0] == 0.0 and att.wilson_ci(10, 10)[1] == pytest.approx(1.0)


def test_classify_run():
    base = {"success": False, "diverged": False, "late_decrease": 0.0, "grad_norm_init": 1.0,
            "grad_norm_final": 1e-4, "hvp_norm_end": 1.0, "lambda_max_init": 1.0,
            "lambda_min_end": -0.1, "lambda_max_end": 2.0}
    assert att.classify_run({**base, "success": True}) == "success"
    assert att.classify_run({**base, "diverged": True}) == "diverged"
    assert att.classify_run({**base, "late_decrease": 0.2}) == "decreasing"
    assert att.classify_run({**base, "grad_norm_final": 0.5}) == "nonstationary"
    assert att.classify_run({**base, "hvp_norm_end": 1e-12}) == "flat"
    assert att.classify_run(base) == "saddle"
    assert att.classify_run({**base, "lambda_min_end": -1e-9}) == "minimum"  # ~0: softmax zeros
    assert att.classify_run({**base, "lambda_min_end": None}) == "unclassified"


def test_config_validation():
    with pytest.raises(ConfigError, match="kernels"):
        apply_overrides(SMOKE, ["kernels=softmax,laplace"])
    with pytest.raises(ConfigError, match="subsets"):
        apply_overrides(SMOKE, ["subsets=W_K"])
    with pytest.raises(ConfigError, match="lr_frac"):
        apply_overrides(SMOKE, ["lr_frac=2"])
    with pytest.raises(ConfigError, match="stop_tol"):
        apply_overrides(SMOKE, ["tol_strict=0.1"])
    with pytest.raises(ConfigError, match="listops_variants"):
        apply_overrides(SMOKE, ["listops_variants=relu"])
    cfg = apply_overrides(SMOKE, ["teacher_scale=none", "subsets=W_Q+W_K", "inits=0.25,4"])
    assert cfg.teacher_scale is None and cfg.subsets == ("W_Q+W_K",) and cfg.inits == (0.25, 4.0)
    for profile in ("smoke", "quick", "full"):
        att.AttentionExperiment.config(profile).validate()


def test_worker_processes_give_the_same_runs(tmp_path):
    """The multi-process path (spawned workers) returns exactly the in-process results."""
    exp = att.AttentionExperiment()
    cfg = apply_overrides(SMOKE, ["steps=50"])
    arm = Arm("grid-softmax-WQ-N4-n3-D8-i0.5", {"family": "grid", "kernel": "softmax",
                                                 "subset": "W_Q", "N": 4, "n": 3, "D": 8,
                                                 "init": 0.5})
    ctx = RunContext(tmp_path, profile="smoke", verbose=False)
    one = exp.run_arm(cfg, arm, ctx)
    two = exp.run_arm(apply_overrides(cfg, ["workers=2"]), arm, ctx)
    exp._shutdown()
    for a, b in zip(one["runs"], two["runs"]):
        assert a["curve_ratio"] == b["curve_ratio"] and a["lr"] == b["lr"]
        assert math.isclose(a["final_ratio"], b["final_ratio"], rel_tol=0, abs_tol=0)
