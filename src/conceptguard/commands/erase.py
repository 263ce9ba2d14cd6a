"""Erase concepts from a model's weights: ESD (x, x-strict, u, all), SDD, UCE."""

from __future__ import annotations

from conceptguard.commands.common import add_model_arguments, not_yet_available


def add_arguments(parser) -> None:
    add_model_arguments(parser)


def run(args) -> int:
    return not_yet_available("erase", 5)
