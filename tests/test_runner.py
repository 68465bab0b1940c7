import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from optfm.experiments import (
    Arm,
    Experiment,
    ExperimentConfig,
    Outcome,
    get_experiment,
    is_complete,
    resume_run,
    run_experiment,
)
from optfm.experiments import base as exp_base
from optfm.training import read_json


@dataclass
class CounterConfig(ExperimentConfig):
    n_arms: int = 4
    fail_at: int = -1  # raise in this arm (simulates a crash), -1: never


CALLS: list[str] = []


class Counter(Experiment):
    name = "test-counter"
    description = "counts arm executions"
    config_cls = CounterConfig
    minutes = {"smoke": 0, "quick": 0, "full": 0}

    @classmethod
    def profiles(cls):
        return {p: CounterConfig() for p in ("smoke", "quick", "full")}

    def arms(self, config):
        return [Arm(f"a{i}", {"i": i}) for i in range(config.n_arms)]

    def run_arm(self, config, arm, ctx):
        if arm.params["i"] == config.fail_at:
            raise RuntimeError("simulated crash")
        CALLS.append(arm.key)
        return {"value": arm.params["i"] ** 2}

    def finalize(self, config, results, ctx):
        return Outcome({"total": sum(r["value"] for r in results.values())}, "total computed")


@pytest.fixture
def counter(monkeypatch):
    monkeypatch.setitem(exp_base._REGISTRY, Counter.name, Counter)
    CALLS.clear()
    return Counter


def test_run_dir_layout_and_provenance(tmp_path, counter):
    d = run_experiment("test-counter", profile="smoke", out_root=tmp_path, verbose=False)
    assert d.parent == tmp_path / "test-counter"
    cfg = read_json(d / "config.json")
    assert cfg["experiment"] == "test-counter" and cfg["profile"] == "smoke"
    assert cfg["config"]["n_arms"] == 4 and cfg["seed"] == 0
    assert {"python", "torch", "numpy", "optfm"} <= set(cfg["versions"])
    assert "git_revision" in cfg
    assert read_json(d / "metrics.json")["total"] == 0 + 1 + 4 + 9
    assert is_complete(d)
    assert sorted(p.name for p in (d / "arms").iterdir()) == ["a0.json", "a1.json", "a2.json", "a3.json"]


def test_resume_after_crash_skips_finished_arms(tmp_path, counter):
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment("test-counter", overrides=["fail_at=2"], out_root=tmp_path, verbose=False)
    (d,) = (tmp_path / "test-counter").iterdir()
    assert CALLS == ["a0", "a1"] and not is_complete(d)
    # The crash was fixed (e.g. a bug): clear fail_at in the stored config, then resume.
    meta = read_json(d / "config.json")
    meta["config"]["fail_at"] = -1
    (d / "config.json").write_text(json.dumps(meta))
    CALLS.clear()
    resume_run(d, verbose=False)
    assert CALLS == ["a2", "a3"]
    assert is_complete(d) and read_json(d / "metrics.json")["total"] == 14
    # arms_time_s counts the arms of both processes (wall_time_s only the resuming one)
    elapsed = sum(read_json(p)["elapsed_s"] for p in (d / "arms").glob("*.json"))
    assert read_json(d / "metrics.json")["arms_time_s"] == pytest.approx(elapsed, abs=2e-3)


def test_two_runs_in_one_second_get_distinct_dirs(tmp_path, counter):
    a = run_experiment("test-counter", out_root=tmp_path, verbose=False)
    b = run_experiment("test-counter", out_root=tmp_path, verbose=False)
    assert a != b


def test_digits_baseline_killed_and_resumed(tmp_path):
    """SIGKILL a real run after its first arms finish; --resume completes it without redoing them."""
    cmd = [sys.executable, "-m", "optfm", "--quiet", "run", "digits-baseline", "--profile", "smoke",
           "--set", "steps=1500", "--set", "n_seeds=3", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    arms_dir = None
    while time.time() < deadline:
        found = list(tmp_path.glob("digits-baseline/*/arms/*.json"))
        if found:
            arms_dir = found[0].parent
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert arms_dir is not None, "no arm finished within the deadline"
    run_dir = arms_dir.parent
    assert not is_complete(run_dir)
    before = {p.name: p.stat().st_mtime_ns for p in arms_dir.glob("*.json")}
    assert 1 <= len(before) < 6
    res = subprocess.run([sys.executable, "-m", "optfm", "run", "--resume", str(run_dir)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{len(before)} finished arm(s) loaded, {6 - len(before)} run" in res.stderr
    after = {p.name: p.stat().st_mtime_ns for p in arms_dir.glob("*.json")}
    assert len(after) == 6
    assert all(after[k] == v for k, v in before.items())  # finished arms untouched
    assert is_complete(run_dir)
    assert (run_dir / "learning_curves.png").stat().st_size > 1000


def test_registry_rejects_incomplete_experiments():
    class Bad(Experiment):
        name = "bad"
        description = "x"
        config_cls = CounterConfig
        minutes = {}

        @classmethod
        def profiles(cls):
            return {"quick": CounterConfig()}

        arms = run_arm = finalize = None

    with pytest.raises(TypeError, match="lacks profiles"):
        exp_base.register(Bad)
    with pytest.raises(ValueError, match="arm key"):
        Arm("bad key/with slash")
    assert get_experiment("digits-baseline").name == "digits-baseline"
