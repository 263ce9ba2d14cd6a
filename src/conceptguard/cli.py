"""The ``conceptguard`` command line.

Each subcommand lives in its own module under ``conceptguard.commands`` with two functions,
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported lazily so that ``--help``
stays fast and a broken optional dependency only breaks its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from conceptguard import __version__
from conceptguard.errors import ConceptGuardError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "erase": ("conceptguard.commands.erase", "erase concepts from a model's weights (ESD, SDD, UCE)"),
    "immunize": ("conceptguard.commands.immunize", "make concepts hard to re-learn by fine-tuning (IMMA, MIMA)"),
    "guard": ("conceptguard.commands.guard", "learn a FreezeAsGuard mask of tensors to freeze"),
    "stack": ("conceptguard.commands.stack", "erase, immunize and guard in one run, from one config file"),
    "finetune": ("conceptguard.commands.finetune", "fine-tune a model, optionally under a guard mask"),
    "attack": ("conceptguard.commands.attack", "red-team a model: re-learning and adversarial-prompt attacks"),
    "eval": ("conceptguard.commands.eval", "measure erasure, preservation and quality on seeded images"),
    "report": ("conceptguard.commands.report", "build an HTML report from evaluation and attack runs"),
    "reproduce": ("conceptguard.commands.reproduce", "re-run the papers' claims on the embedded world; write docs/results.md"),
    "world": ("conceptguard.commands.world", "the embedded world: build, inspect and sample it"),
    "info": ("conceptguard.commands.info", "describe a model: family, parameters, content hash"),
    "demo": ("conceptguard.commands.demo", "run the main job end to end on the embedded model"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conceptguard",
        description="Erase, immunize, guard and red-team concepts in text-to-image diffusion models. "
        "Every command defaults to the embedded world's tiny model, so it runs offline on a CPU.",
    )
    parser.add_argument("--version", action="version", version=f"conceptguard {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from conceptguard.models.io import quiet_libraries

    quiet_libraries()  # stderr carries our one-line errors, not library chatter
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except ConceptGuardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
