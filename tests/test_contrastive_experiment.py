"""The ``contrastive`` experiment's smoke profile, with its numbers checked."""

import math

import pytest

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
