"""The ``concept-erasure`` experiment's smoke profile, with its numbers checked."""

import math

import pytest

from optfm.experiments import run_experiment
from optfm.training import read_json


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_experiment("concept-erasure", profile="smoke",
                          out_root=tmp_path_factory.mktemp("runs"), verbose=False)


def test_every_model_is_evaluated_under_every_attack(run):
    for key in ("original-s0", "esd-s0", "advunlearn-g1-s0"):
        r = read_json(run / "arms" / f"{key}.json")["result"]
        for k in ("asr_none", "asr_soft", "asr_discrete", "prompt_alignment"):
            assert 0.0 <= r[k] <= 1.0, (key, k)
        # a sample that succeeds without attack counts for every attack: ASR can only grow
        assert r["asr_soft"] >= r["asr_none"] and r["asr_discrete"] >= r["asr_none"]
        assert math.isfinite(r["fd_retain"]) and r["fd_retain"] >= 0
        assert len(r["samples_concept"]) == 8
    adv = read_json(run / "arms" / "advunlearn-g1-s0.json")["result"]
    assert len(adv["history"]) == 3 and "plug" in adv
    esd = read_json(run / "arms" / "esd-s0.json")["result"]
    assert len(esd["history"]) == 3 and "plug" not in esd


def test_summary_and_figure(run):
    text = (run / "summary.md").read_text()
    assert "| advunlearn γ=1 |" in text and "second UNet" in text
    assert (run / "asr_vs_utility.png").stat().st_size > 1000
