"""Learn a FreezeAsGuard mask: which UNet tensors to freeze so illegal fine-tuning fails."""

from __future__ import annotations

from conceptguard.commands.common import add_model_arguments, not_yet_available


def add_arguments(parser) -> None:
    add_model_arguments(parser)


def run(args) -> int:
    return not_yet_available("guard", 7)
