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


def not_yet_available(command: str, issue: int) -> int:
    raise ConceptGuardError(f"`conceptguard {command}` is not available in this version yet (tracked in issue #{issue})")
