"""Assemble finished runs into ``report.md`` (figures linked) and ``report.html`` (figures embedded
as base64 data URIs, so the single file can be mailed or archived).

By default the newest *complete* run of each experiment under the runs root is used (a run is
complete when its ``summary.md`` exists; killed runs are listed as incomplete, not reported as
results).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import os
import re
from collections.abc import Iterable
from pathlib import Path

from optfm.training.io import atomic_write_text, read_json

__all__ = ["ReportError", "build_report", "find_latest_runs"]

_IMG = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,6})(\s)", re.MULTILINE)

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 980px;
       margin: 2em auto; padding: 0 1em; color: #1f2328; line-height: 1.5; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; }
th { background: #f6f8fa; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 4px; }
img { max-width: 100%; }
h2 { border-top: 2px solid #d0d7de; padding-top: 1em; margin-top: 2em; }
"""


class ReportError(ValueError):
    """A path given to the report is not a run directory."""


def _is_complete(d: Path) -> bool:
    return (d / "summary.md").is_file() and (d / "metrics.json").is_file()


def find_latest_runs(root: str | os.PathLike = "runs") -> tuple[list[Path], list[Path]]:
    """``(newest complete run per experiment, newer incomplete runs)`` under ``root``.

    Run directories are named by UTC timestamp, so the lexicographically last is the newest.
    """
    root = Path(root)
    complete: list[Path] = []
    incomplete: list[Path] = []
    if not root.is_dir():
        return complete, incomplete
    for exp_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        runs = sorted(p for p in exp_dir.iterdir() if (p / "config.json").is_file())
        done = [r for r in runs if _is_complete(r)]
        if done:
            complete.append(done[-1])
        incomplete.extend(r for r in runs if not _is_complete(r) and (not done or r.name > done[-1].name))
    return complete, incomplete


def _demote_headings(md: str) -> str:
    """Shift headings one level down so each run sits under its own ``##`` section."""
    return _HEADING.sub(lambda m: "#" + m.group(1) + m.group(2), md)


def _rewrite_images(md: str, run_dir: Path, out_dir: Path, *, embed: bool) -> str:
    def repl(m: re.Match) -> str:
        alt, src = m.group(1), m.group(2)
        if re.match(r"^[a-z]+:", src):
            return m.group(0)
        path = (run_dir / src).resolve()
        if not path.is_file():
            return f"*(missing figure: {src})*"
        if embed:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            return f"![{alt}](data:image/png;base64,{data})"
        return f"![{alt}]({Path(os.path.relpath(path, out_dir.resolve())).as_posix()})"

    return _IMG.sub(repl, md)


def _render_html(md: str, title: str) -> str:
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"{body}</body>\n</html>\n"
    )


def build_report(run_dirs: Iterable[str | os.PathLike] | None = None, *,
                 runs_root: str | os.PathLike = "runs",
                 out_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir`` (default: ``runs_root``).

    ``run_dirs=None`` selects the newest complete run of each experiment under ``runs_root``.
    Returns the two paths.
    """
    runs_root = Path(runs_root)
    out = Path(out_dir) if out_dir is not None else runs_root
    incomplete: list[Path] = []
    if run_dirs is None:
        runs, incomplete = find_latest_runs(runs_root)
    else:
        runs = []
        for d in map(Path, run_dirs):
            if not d.is_dir():
                raise ReportError(f"run directory not found: {d}")
            if not (d / "config.json").is_file():
                raise ReportError(f"{d} is not a run directory (no config.json)")
            if not _is_complete(d):
                raise ReportError(f"{d} is an incomplete run (no summary.md); finish it with "
                                  f"`optfm run --resume {d}`")
            runs.append(d)

    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [f"# optfm report\n\nGenerated {now} from {len(runs)} run(s).\n"]
    if runs:
        head += ["| experiment | profile | seed | run | wall time (s) | arms time (s) | git revision |",
                 "|---|---|---|---|---|---|---|"]
        for d in runs:
            cfg = read_json(d / "config.json")
            met = read_json(d / "metrics.json")
            wall, arms = met.get("wall_time_s"), met.get("arms_time_s")
            head.append(
                f"| {cfg['experiment']} | {cfg.get('profile', '?')} | {cfg.get('seed', '?')} | "
                f"`{d}` | {wall if wall is not None else '?'} | {arms if arms is not None else '?'} "
                f"| `{cfg.get('git_revision') or '?'}` |")
    else:
        head.append(f"No complete runs found under `{runs_root}`. Run `optfm run all` first.")
    if incomplete:
        head += ["", "Incomplete runs (killed or still running; resume with `optfm run --resume DIR`):", ""]
        head += [f"- `{d}`" for d in incomplete]

    md_parts, html_parts = ["\n".join(head)], ["\n".join(head)]
    for d in runs:
        summary = _demote_headings((d / "summary.md").read_text(encoding="utf-8"))
        md_parts.append(_rewrite_images(summary, d, out, embed=False))
        html_parts.append(_rewrite_images(summary, d, out, embed=True))

    out.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, "\n\n".join(md_parts) + "\n")
    atomic_write_text(html_path, _render_html("\n\n".join(html_parts), "optfm report"))
    return md_path, html_path
