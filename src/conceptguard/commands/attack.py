"""Red-team a model: fine-tune / LoRA / DreamBooth / Textual Inversion re-learning and prompt attacks."""

from __future__ import annotations

from conceptguard.commands.common import add_model_arguments, not_yet_available


def add_arguments(parser) -> None:
    add_model_arguments(parser)


def run(args) -> int:
    return not_yet_available("attack", 6)
