"""Re-run the papers' headline experiments on the embedded world and write docs/results.md.

    conceptguard reproduce --quick                  # CI-sized profile (minutes)
    conceptguard reproduce                          # the full profile (about 3 hours with --jobs 2 on 2 CPU cores)
    conceptguard reproduce --only esd sdd --resume  # some claims; reuse finished ones

Claims: esd (ESD-x vs ESD-u), sdd (SDD vs ESD), guard (FreezeAsGuard vs Random vs Full FT vs UCE vs
IMMA), immunize (MIMA vs IMMA: MSGR/MRSGR), attacks (every defense against every attack). Each runs
the real methods, caches its result in OUT/<claim>/result.json as it finishes, and is judged from its
numbers (✅ reproduced / ❌ not reproduced); --resume reuses a finished claim whose profile, config,
seed, base model and measuring code are unchanged. OUT/report.html is the HTML report over every run.
"""

from __future__ import annotations

# The experiments of conceptguard.reproduce, named here so that --help imports nothing heavy (a test
# checks the two lists agree).
CLAIMS = ("esd", "sdd", "guard", "immunize", "attacks")


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="the CI-sized profile (default: the full profile)")
    parser.add_argument("--out", default="runs/reproduce", help="run folder (default: runs/reproduce)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every experiment (default: 0)")
    parser.add_argument("--only", nargs="+", choices=CLAIMS, metavar="CLAIM",
                        help=f"run only these claims ({', '.join(CLAIMS)})")
    parser.add_argument("--results-md", default="docs/results.md",
                        help="results page to write (default: docs/results.md)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse finished claims whose profile, config, seed, base model and measuring code "
                             "are unchanged")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes that run experiments, or rows of the attack matrix, at once (default 1; "
                             "one per CPU core)")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML reports")


def run(args) -> int:
    from conceptguard.reproduce.runner import reproduce

    summary = reproduce(args.out, profile="quick" if args.quick else "full", seed=args.seed, only=args.only,
                        results_md=args.results_md, resume=args.resume, report=not args.no_report, jobs=args.jobs)
    for name, result in summary["results"].items():
        print(f"{name}: {result['verdict']}")
    print(f"done in {summary['seconds']:.0f} s; results: {summary.get('results_md')}; "
          f"report: {summary.get('report')}")
    return 0
