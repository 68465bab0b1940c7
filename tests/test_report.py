import re
from pathlib import Path

import pytest

from optfm.experiments import run_experiment
from optfm.report import build_report, find_latest_runs
from optfm.report.build import ReportError


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    old = run_experiment("digits-baseline", profile="smoke", out_root=root, verbose=False)
    new = run_experiment("digits-baseline", profile="smoke", seed=3, out_root=root, verbose=False)
    killed = root / "digits-baseline" / "99991231T000000Z"  # newer, but never finished
    killed.mkdir()
    (killed / "config.json").write_text("{}")
    return root, old, new, killed


def test_latest_complete_run_per_experiment(runs):
    root, _, new, killed = runs
    complete, incomplete = find_latest_runs(root)
    assert complete == [new]
    assert incomplete == [killed]


def test_report_embeds_figures_in_html_and_links_them_in_md(runs, tmp_path):
    root, _, _, killed = runs
    md, html = build_report(runs_root=root, out_dir=tmp_path / "out")
    text = md.read_text()
    assert "# optfm report" in text and "## digits-baseline" in text
    assert "### Best learning rate per optimizer" in text  # run headings demoted one level
    assert str(killed) in text  # incomplete runs are listed, not reported
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 2
    for link in links:
        assert (md.parent / link).resolve().is_file()
    page = html.read_text()
    assert page.count('src="data:image/png;base64,') == 2
    assert "<table>" in page and "seed 3" in page


def test_report_of_explicit_runs_and_errors(runs, tmp_path):
    _, old, _, killed = runs
    md, _ = build_report([old], out_dir=tmp_path)
    assert str(old) in md.read_text()
    with pytest.raises(ReportError, match="incomplete run"):
        build_report([killed], out_dir=tmp_path)
    with pytest.raises(ReportError, match="not found"):
        build_report([tmp_path / "nope"], out_dir=tmp_path)
    with pytest.raises(ReportError, match="not a run directory"):
        build_report([tmp_path], out_dir=tmp_path)


def test_empty_runs_root(tmp_path):
    md, _ = build_report(runs_root=tmp_path / "none", out_dir=tmp_path)
    assert "No complete runs" in Path(md).read_text()
