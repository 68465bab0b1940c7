"""The ``alignment`` experiment's smoke profile, with its numbers checked."""

import math

import pytest

from optfm.experiments import run_experiment
from optfm.training import read_json


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_experiment("alignment", profile="smoke", out_root=tmp_path_factory.mktemp("runs"),
                          verbose=False)


def _arm(run, key):
    return read_json(run / "arms" / f"{key}.json")["result"]


def test_every_method_gets_the_same_budget_from_the_same_start(run):
    start = _arm(run, "demo-start-n64-z0-s0")
    assert start["kl_from_start"] == 0 and start["pref_acc"] is None
    keys = [f"demo-{m}-lr0.001-n64-z0-s0" for m in ("sft", "spin", "irft", "rft")]
    keys += [f"pref-{m}-lr0.001-p64-s0" for m in ("sft_dpo", "sft_rm_rloo", "aihf_nll",
                                                   "aihf_self_play")]
    for key in keys:
        r = _arm(run, key)
        assert r["steps"] == 6, key
        for k in ("score", "greedy_score", "win_rate_vs_start", "heldout_nll", "kl_from_start"):
            assert math.isfinite(r[k]), (key, k)
        assert -1.5 < r["score"] < 1.0 and 0 <= r["win_rate_vs_start"] <= 1
        assert r["kl_from_start"] > -0.05  # a KL estimate on 64 samples
    # SFT keeps fitting the expert: its held-out expert NLL falls below the start's
    assert _arm(run, keys[0])["heldout_nll"] < start["heldout_nll"]
    # preference learners' implicit rewards order held-out pairs better than chance
    for m in ("sft_dpo", "aihf_nll", "aihf_self_play"):
        assert _arm(run, f"pref-{m}-lr0.001-p64-s0")["pref_acc"] > 0.5, m


def test_summary_and_figures(run):
    m = read_json(run / "metrics.json")
    assert 0.6 < m["expert_score"] < 0.7  # the expert is built at 65% of the maximum reward
    text = (run / "summary.md").read_text()
    assert "| IRFT |" in text and "| AIHF (self-play) |" in text and "### Claims" in text
    for name in ("demonstrations.png", "preferences.png"):
        assert (run / name).stat().st_size > 1000
