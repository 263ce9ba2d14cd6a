"""Build one self-contained HTML report from evaluation and attack runs.

Each RUN is a folder written by `conceptguard eval` (results.json + images/) and/or holding an
attack.json of recovery curves. The report embeds every image as base64 PNG: bar charts of the
metrics, image grids (same prompts and seeds side by side, one row per model), recovery curves and
the configs used. The charts are also written as PNG files next to the HTML.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (results.json and/or attack.json)")
    parser.add_argument("--out", default="report.html", help="HTML file to write (default: report.html)")


def run(args) -> int:
    from conceptguard.report.html import build_report

    written = build_report(args.runs, args.out)
    charts = [path.name for key, path in written.items() if key != "html"]
    print(f"wrote {written['html']}" + (f" and {', '.join(charts)}" if charts else ""))
    return 0
