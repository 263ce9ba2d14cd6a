"""Fine-tune a model on a folder of images and captions, optionally under a guard mask."""

from __future__ import annotations

from conceptguard.commands.common import add_model_arguments, not_yet_available


def add_arguments(parser) -> None:
    add_model_arguments(parser)


def run(args) -> int:
    return not_yet_available("finetune", 7)
