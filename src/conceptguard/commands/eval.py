"""Measure erasure, preservation and quality of a model on seeded images."""

from __future__ import annotations

from conceptguard.commands.common import add_model_arguments, not_yet_available


def add_arguments(parser) -> None:
    add_model_arguments(parser)


def run(args) -> int:
    return not_yet_available("eval", 4)
