import pytest

from optfm.experiments import run_experiment
from optfm.training import read_json


def test_smoke_profile_trains_both_optimizers(tmp_path):
    d = run_experiment("digits-baseline", profile="smoke", out_root=tmp_path, verbose=False)
    m = read_json(d / "metrics.json")
    # 60 steps of batch 64 already separate the classes well on digits.
    assert m["test_acc_sgd_best"] > 0.85
    assert m["test_acc_adam_best"] > 0.90
    assert m["step_time_ms_sgd"] > 0
    arm = read_json(d / "arms" / "sgd-lr0.1-s0.json")
    curve = arm["result"]["curve"]
    assert [p["step"] for p in curve] == [20, 40, 60]
    assert curve[-1]["train_loss"] < curve[0]["train_loss"]
    summary = (d / "summary.md").read_text()
    assert "![Learning curves](learning_curves.png)" in summary
    assert (d / "lr_curves.png").is_file()


def test_same_seed_same_numbers(tmp_path):
    a = run_experiment("digits-baseline", profile="smoke", out_root=tmp_path / "a", verbose=False)
    b = run_experiment("digits-baseline", profile="smoke", out_root=tmp_path / "b", verbose=False)
    ra = read_json(a / "arms" / "adam-lr0.004-s1.json")["result"]
    rb = read_json(b / "arms" / "adam-lr0.004-s1.json")["result"]
    assert ra["curve"] == rb["curve"]
    c = run_experiment("digits-baseline", profile="smoke", seed=5, out_root=tmp_path / "c", verbose=False)
    assert (c / "arms" / "adam-lr0.004-s5.json").is_file()


@pytest.mark.slow
def test_quick_profile_reaches_reference_accuracy(tmp_path):
    d = run_experiment("digits-baseline", profile="quick", out_root=tmp_path, verbose=False)
    m = read_json(d / "metrics.json")
    assert m["test_acc_sgd_best"] > 0.96 and m["test_acc_adam_best"] > 0.96
