import pytest

from optfm.experiments import run_experiment
from optfm.experiments.config import config_to_dict
from optfm.experiments.sltrain import SLTrainExperimentConfig, train_arm
from optfm.experiments.worker import run_in_subprocess
from optfm.training import read_json


def test_smoke_profile_reports_every_method(tmp_path):
    d = run_experiment("sltrain", profile="smoke", out_root=tmp_path, verbose=False)
    m = read_json(d / "metrics.json")
    methods = ["full", "lowrank", "sltrain"]
    try:
        import galore_torch  # noqa: F401
        methods.append("galore")
    except ImportError:
        assert "galore skipped" in (d / "summary.md").read_text()
    for meth in methods:
        assert 0 < m[f"val_loss_{meth}"] < 5.6  # below uniform over 257 bytes (ln 257 = 5.55)
        assert m[f"val_bpb_{meth}"] == pytest.approx(m[f"val_loss_{meth}"] / 0.6931471805599453)
        assert m[f"static_bytes_{meth}"] > 0 and m[f"peak_rss_bytes_{meth}"] > 0
    # SLTrain and low rank hold fewer parameters and less static memory than full rank
    assert m["ratio_params_sltrain_vs_full"] < 0.8 and m["ratio_params_lowrank_vs_full"] < 0.8
    assert m["ratio_static_bytes_sltrain_vs_full"] < 0.85
    arm = read_json(d / "arms" / "sltrain-lr0.003-s0.json")["result"]
    assert arm["buffer_bytes"] > 0  # the int32 index buffers are counted
    assert arm["history"][-1]["val_loss"] < arm["history"][0]["val_loss"] + 0.5
    for f in ("val_curves.png", "memory.png"):
        assert (d / f).stat().st_size > 1000


def test_arm_in_a_subprocess_matches_in_process(tmp_path):
    cfg = SLTrainExperimentConfig(hidden_size=32, intermediate_size=88, num_layers=2, num_heads=2,
                                  rank=8, steps=6, batch_size=2, block_size=32, eval_every=6,
                                  eval_batches=1)
    payload = {"method": "sltrain", "lr": 3e-3, "seed": 0, "config": config_to_dict(cfg)}
    child = run_in_subprocess("optfm.experiments.sltrain:train_arm", payload, tmp_path / "arm")
    here = train_arm(payload)
    assert child["val_loss"] == pytest.approx(here["val_loss"], abs=1e-6)
    assert child["params"] == here["params"] and child["static_bytes"] == here["static_bytes"]
    assert child["peak_rss_bytes"] > 50 * 2**20
    with pytest.raises(RuntimeError, match="failed in its subprocess"):
        run_in_subprocess("optfm.experiments.sltrain:train_arm", {"method": "x"}, tmp_path / "bad")
