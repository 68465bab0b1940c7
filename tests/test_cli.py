import json

import pytest

from optfm.cli import main
from tests.conftest import run_cli


@pytest.mark.parametrize(("argv", "msg"), [
    (["run", "nope"], "unknown experiment 'nope'; choose from: alignment, attention, concept-erasure, contrastive, digits-baseline"),
    (["run", "digits-baseline", "--set", "foo=1"], "unknown config key 'foo'; allowed keys: seed"),
    (["run", "digits-baseline", "--set", "steps=abc"], "--set steps='abc': expected int"),
    (["run", "digits-baseline", "--set", "steps"], "--set expects key=value"),
    (["run", "digits-baseline", "--profile", "huge"], "--profile must be one of smoke, quick, full"),
    (["run", "digits-baseline", "--seed", "x"], "invalid int value"),
    (["run", "--resume", "/nonexistent/run"], "run directory not found"),
    (["run", "digits-baseline", "--resume", "/x"], "do not combine it with a name"),
    (["run"], "run needs an experiment name or 'all'"),
    (["report", "/nonexistent/run"], "run directory not found"),
    (["bench", "nope"], "unknown benchmark 'nope'; choose from: advunlearn, alignment, attention, contrastive, digits, dno, privacy, sltrain, unlearning, all"),
    (["bench", "digits", "--repeats", "0"], "--repeats must be >= 1"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_line(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("optfm: error: ")
    assert msg in err


def test_resume_of_a_non_run_dir(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_subprocess_error_has_no_traceback():
    res = run_cli("run", "digits-baseline", "--set", "n_seeds=-1")
    assert res.returncode == 2
    assert res.stderr.strip() == "optfm: error: n_seeds must be >= 1, got -1"


def test_list_shows_experiments_with_minutes(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "digits-baseline" in out and "smoke / quick / full" in out and "digits" in out


def test_run_all_smoke_then_report(tmp_path):
    res = run_cli("run", "all", "--profile", "smoke", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "report.html").is_file() and (tmp_path / "report.md").is_file()
    runs = list((tmp_path / "digits-baseline").iterdir())
    assert len(runs) == 1 and (runs[0] / "summary.md").is_file()
    res = run_cli("report", "--runs", str(tmp_path), "--out", str(tmp_path / "r"))
    assert res.returncode == 0, res.stderr
    assert "data:image/png;base64" in (tmp_path / "r" / "report.html").read_text()


def test_bench_prints_table_and_json(tmp_path, capsys):
    assert main(["bench", "digits", "--repeats", "1", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("threads: torch_num_threads=1")
    assert "harness step / bare step" in out
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {r["name"] for r in rows} >= {"harness step / bare step (SGD, batch 64)"}
    assert all(r["ratio"] > 0 for r in rows)
