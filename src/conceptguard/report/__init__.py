"""Reports: one self-contained HTML file (and PNG charts) from evaluation and attack run folders."""

from conceptguard.report.html import build_report, load_run, parse_attacks

__all__ = ["build_report", "load_run", "parse_attacks"]
