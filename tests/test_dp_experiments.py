"""Smoke profiles of the privacy experiments, with their numbers checked."""

import pytest

from optfm.experiments import run_experiment
from optfm.training import read_json


@pytest.fixture(scope="module")
def audit_run(tmp_path_factory):
    return run_experiment("dp-audit", profile="smoke", out_root=tmp_path_factory.mktemp("runs"),
                          verbose=False)


def test_dp_audit_smoke_bounds_hold_and_control_is_caught(audit_run):
    m = read_json(audit_run / "metrics.json")
    assert m["violations"] == 0
    for f in ("none", "a9b1", "disk"):
        assert m[f"eps_emp_max_{f}"] <= m["eps_claimed"]
    assert m["control_caught"] == 1
    assert m["eps_emp_max_control-no-noise"] > 2 * m["eps_claimed"]
    arm = read_json(audit_run / "arms" / "none-s0.json")["result"]
    assert arm["eps_accounted"] <= 1.0 and arm["noise_multiplier"] > 1.0
    assert arm["members"] > 150 and arm["canary_samples_mean"] > 5
    assert "caught" in (audit_run / "summary.md").read_text()


def test_dp_filters_smoke_filters_cut_gradient_error(tmp_path):
    d = run_experiment("dp-filters", profile="smoke", out_root=tmp_path, verbose=False)
    m = read_json(d / "metrics.json")
    key = "eps4_dp-sgd"
    assert m[f"grad_err_reduction_{key}_a9b1"] > 2.0   # low-pass filtering removes most noise
    assert m[f"grad_err_reduction_{key}_disk"] > 1.0
    for f in ("none", "a9b1", "disk"):
        assert m[f"test_acc_best_{key}_{f}"] > 0.8
        # the raw privatized gradient is equally noisy in every arm: the filter is what differs
        assert m[f"grad_err_rel_raw_{key}_{f}"] == pytest.approx(m[f"grad_err_rel_raw_{key}_none"], rel=0.3)
    arms = [read_json(p)["result"] for p in sorted((d / "arms").glob("*.json"))]
    assert len({a["noise_multiplier"] for a in arms}) == 1  # σ does not depend on the filter
    assert all(a["eps_spent"] <= 4.0 for a in arms)
    assert "psd_raw" in arms[0] and len(arms[0]["psd_freq"]) == len(arms[0]["psd_raw"])
    for name in ("accuracy_best_lr.png", "grad_error.png", "spectrum.png", "lr_curves.png"):
        assert (d / name).stat().st_size > 1000
