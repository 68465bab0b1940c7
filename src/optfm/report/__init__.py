"""Report assembly: many run directories -> one ``report.md`` and a self-contained ``report.html``."""

from optfm.report.build import build_report, find_latest_runs

__all__ = ["build_report", "find_latest_runs"]
