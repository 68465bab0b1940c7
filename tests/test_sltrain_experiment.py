import pytest

from optfm.experiments import ConfigError, get_experiment, run_experiment
from optfm.experiments.config import apply_overrides, config_to_dict
from optfm.experiments.sltrain import SLTrainExperimentConfig, skip_reason, train_arm
from optfm.experiments.worker import run_in_subprocess
from optfm.training import read_json

HAS_BNB = skip_reason("sltrain", "adamw8bit") is None


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
    assert arm["rss_before_model_bytes"] > 0 and arm["activation_bytes"] > 0
    for f in ("val_curves.png", "memory.png"):
        assert (d / f).stat().st_size > 1000
    # the smoke profile's per-layer 8-bit SLTrain arm
    lab = "sltrain_adamw8bit_per_layer"
    if not HAS_BNB:
        assert f"{lab} skipped: bitsandbytes is not installed" in (d / "summary.md").read_text()
        return
    pl = read_json(d / "arms" / "sltrain-adamw8bit+per-layer-lr0.003-s0.json")["result"]
    assert pl["optimizer"] == "adamw8bit" and pl["per_layer"] is True
    assert pl["history"][-1]["val_loss"] < 5.0  # it trains (uniform: ln 257 = 5.55)
    assert abs(m[f"val_loss_{lab}"] - m["val_loss_sltrain"]) < 0.2
    # one gradient at a time and 8-bit states (for the tensors large enough to quantise)
    assert pl["grad_bytes"] < arm["grad_bytes"] and pl["param_bytes"] == arm["param_bytes"]
    assert pl["optimizer_state_bytes"] < arm["optimizer_state_bytes"]
    assert m[f"ratio_static_bytes_{lab}_vs_full"] < m["ratio_static_bytes_sltrain_vs_full"]


def test_optimizer_settings_and_extra_arms_are_validated():
    cfg = SLTrainExperimentConfig()
    new = apply_overrides(cfg, ["optimizer=adamw8bit", "per_layer=true",
                                "extra_arms=full:adamw,galore:adamw8bit-torchao:per_layer"])
    assert (new.optimizer, new.per_layer) == ("adamw8bit", True)
    exp = get_experiment("sltrain")()
    keys = [a.key for a in exp.arms(new)]
    assert "sltrain-adamw8bit+per-layer-lr0.003-s0" in keys
    assert "galore-adamw8bit-torchao+per-layer-lr0.01-s0" in keys and "full-lr0.001-s0" in keys
    for bad, msg in (("optimizer=sgd", "optimizer must be one of adamw, adamw8bit"),
                     ("extra_arms=sltrain", "is not 'method:optimizer'"),
                     ("extra_arms=big:adamw", "method 'big' is not one of"),
                     ("extra_arms=full:adamw:fast", "is not 'method:optimizer'")):
        with pytest.raises(ConfigError, match=msg):
            apply_overrides(cfg, [bad])


def test_memory_experiment_smoke(tmp_path):
    d = run_experiment("sltrain-memory", profile="smoke", out_root=tmp_path, verbose=False)
    m = read_json(d / "metrics.json")
    summary = (d / "summary.md").read_text()
    assert "| 7B (closed form, bf16 weights) |" in summary
    assert m["paper_7b_saving_pct"] == pytest.approx(71.9, abs=0.05)
    # exact static memory equals the closed form for fp32 AdamW, global and per-layer
    for mode in ("global", "per-layer"):
        for meth in ("full", "sltrain"):
            k = f"{meth}-adamw-{mode}"
            assert m[f"static_bytes_{k}"] == pytest.approx(m[f"closed_form_bytes_{k}"], rel=1e-3)
    assert m["ratio_static_full-adamw-per-layer"] < 1
    if HAS_BNB:
        assert m["target_vs_ref_static"] < 0.45
        assert m["static_bytes_sltrain-adamw8bit-per-layer"] < m["static_bytes_sltrain-adamw8bit-global"]
        assert "SLTrain + 8-bit AdamW + per-layer vs full-rank fp32 AdamW" in summary


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
