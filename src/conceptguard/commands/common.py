"""Arguments and helpers shared by the subcommands."""

from __future__ import annotations

import argparse

from conceptguard.errors import ConceptGuardError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="embedded",
                       help="diffusers pipeline folder or single .safetensors file (SD 1.x, 2.x, SDXL); "
                            "default: the embedded world's tiny model")
    group.add_argument("--config-dir", default=None,
                       help="local diffusers folder of the same family, needed to load a single-file checkpoint offline")
    group.add_argument("--allow-pickle", action="store_true",
                       help="allow loading pickle checkpoints (.ckpt/.bin/.pt): they can run arbitrary code")
    group.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def add_config_file_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML or JSON file of option values; flags given on the command line win")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--out", required=True, help="output folder: pipeline/, delta.safetensors, README.md")
    group.add_argument("--run-dir", default=None, help="checkpoints and logs (default: OUT.run next to OUT)")
    group.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder")
    group.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def split_config_file(args, sections: dict[str, type]) -> dict[str, dict]:
    """Read ``--config`` and return, per dataclass, the file's values merged under the CLI flags.

    The file may be flat (keys of any of the dataclasses) or sectioned by the names in ``sections``.
    """
    import dataclasses

    from conceptguard.config import load_config_file

    file_values = load_config_file(args.config) if getattr(args, "config", None) else {}
    merged: dict[str, dict] = {}
    for section, cls in sections.items():
        names = {f.name for f in dataclasses.fields(cls)}
        values = dict(file_values.get(section, {})) if isinstance(file_values.get(section), dict) else {}
        values.update({k.replace("-", "_"): v for k, v in file_values.items()
                       if k.replace("-", "_") in names and not isinstance(v, dict)})
        values.update({name: getattr(args, name) for name in names if getattr(args, name, None) is not None})
        merged[section] = values
    known = set(sections) | {f.name for cls in sections.values() for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in file_values if k.replace("-", "_") not in known)
    if unknown:
        raise ConceptGuardError(f"unknown option(s) in {args.config}: {', '.join(unknown)}")
    return merged


def run_dir_for(args) -> str:
    return args.run_dir or str(args.out).rstrip("/") + ".run"


def not_yet_available(command: str, issue: int) -> int:
    raise ConceptGuardError(f"`conceptguard {command}` is not available in this version yet (tracked in issue #{issue})")
