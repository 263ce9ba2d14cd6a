"""Erase concepts from a model's weights with any registered erase method (ESD, SDD, UCE, ...).

    conceptguard erase --method esd --concepts "van gogh" --out erased/
    conceptguard erase --method sdd --concepts nudity violence --steps 1000 --ema-decay 0.998 --out safe/

Writes OUT/pipeline (a diffusers folder), OUT/delta.safetensors (the changed tensors only) and
OUT/README.md. Trained methods keep checkpoints and logs in the run folder (default OUT.run) and
continue with --resume. Every method's options are flags (each marked with the methods it applies
to); --config FILE takes the same options, flat or in sections named after the method and "train".
Optimization defaults are each method's paper recipe.
"""

from __future__ import annotations

from conceptguard.commands.method_cli import add_method_arguments, run_method


def add_arguments(parser) -> None:
    from conceptguard.methods import methods

    add_method_arguments(parser, methods(kind="erase"), kind="erase", train_title="optimization")


def run(args) -> int:
    return run_method(args, kind="erase", required={"concepts": "--concepts is required: name the concept(s) to erase"})
