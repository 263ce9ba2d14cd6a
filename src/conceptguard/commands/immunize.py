"""Immunize weights so adapting them to a concept fails, with any registered immunize method (IMMA, MIMA).

    conceptguard immunize --method imma --concepts yulbar --data yulbar/ --adaptation lora --out imm/
    conceptguard immunize --method mima --concepts yulbar drennik ospera --data y/ d/ o/ --out imm/
    conceptguard immunize --method mima --model erased/pipeline ...   # re-learning: erase, then immunize

Writes OUT/pipeline (a diffusers folder), OUT/delta.safetensors (the changed tensors only) and
OUT/README.md, like ``conceptguard erase``; checkpoints and logs go to the run folder (default
OUT.run) and continue with --resume. --model takes any pipeline folder, so an erase output's
``pipeline/`` is immunized the same way (the delta is then relative to the erased model).
Every method's options are flags (each marked with the methods it applies to); --config FILE takes
the same options, flat or in sections named after the method and "train".
"""

from __future__ import annotations

from conceptguard.commands.method_cli import add_method_arguments, run_method


def add_arguments(parser) -> None:
    from conceptguard.methods import methods

    add_method_arguments(parser, methods(kind="immunize"), kind="immunize",
                         train_title="optimization of the immunization (outer) step")


def run(args) -> int:
    return run_method(args, kind="immunize", required={
        "concepts": "--concepts is required: name the concept(s) to immunize",
        "data": "--data is required: folder(s) of images of the concepts"})
