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

import argparse
import dataclasses
import typing
from typing import Any

from conceptguard.commands.common import (
    add_config_file_argument,
    add_model_arguments,
    add_run_arguments,
    run_dir_for,
    split_config_file,
)

# The option machinery is erase's, shared so both commands read the same way.
from conceptguard.commands.erase import _add_flag, _default, _flag, _given, _joint_default, _method_options, _shared_hint
from conceptguard.errors import ConceptGuardError

KIND = "immunize"


def _specs():
    import conceptguard.methods.imma  # noqa: F401  (registers imma, also when the registry does not list it)
    import conceptguard.methods.mima  # noqa: F401
    from conceptguard.methods import methods

    return methods(kind=KIND)


def add_arguments(parser) -> None:
    from conceptguard.training.loop import TrainConfig

    specs = _specs()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arguments(parser)
    listing = "; ".join(f"{name}: {spec.description.rstrip('.')}" for name, spec in sorted(specs.items()))
    parser.add_argument("--method", required=True, metavar="{" + ",".join(sorted(specs)) + "}",
                        help=f"immunization method — {listing}")
    add_run_arguments(parser)
    add_config_file_argument(parser)

    train_group = parser.add_argument_group("optimization of the immunization (outer) step; defaults: each method's")
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        defaults = {name: spec.config.default_train.get(field.name, _default(field)) for name, spec in specs.items()}
        _add_flag(train_group, field.name, hints[field.name], field.metadata.get("help", ""), _joint_default(defaults))

    method_group = parser.add_argument_group("method options (the methods each applies to in brackets)")
    owners: dict[str, tuple[str, ...]] = {}
    for name, entries in _method_options(specs).items():
        methods_of = tuple(method for method, _, _ in entries)
        wording = min((field.metadata.get("help", "") for _, field, _ in entries), key=len)
        default = _joint_default({method: _default(field) for method, field, _ in entries})
        if _add_flag(method_group, name, _shared_hint([hint for _, _, hint in entries]),
                     f"[{', '.join(methods_of)}] {wording}", default):
            owners[name] = methods_of
    parser.set_defaults(_method_flags=owners)


def run(args) -> int:
    from pathlib import Path

    from conceptguard.config import build_config, config_to_dict
    from conceptguard.methods import get_method
    from conceptguard.methods.trajectory import train_config_with_defaults
    from conceptguard.models.io import content_hash, load_pipeline, model_components
    from conceptguard.outputs import _check_output_target, save_method_outputs
    from conceptguard.training.loop import TrainConfig

    _specs()
    spec = get_method(args.method, kind=KIND)
    owners: dict[str, tuple[str, ...]] = args._method_flags
    foreign = [name for name in _given(args, owners) if spec.name not in owners[name]]
    if foreign:
        verb = "does" if len(foreign) == 1 else "do"
        raise ConceptGuardError(f"{', '.join(_flag(n) for n in foreign)} {verb} not apply to --method {spec.name}; "
                                "see `conceptguard immunize --help`")

    own = [name for name, methods_of in owners.items() if spec.name in methods_of]
    train_names = [f.name for f in dataclasses.fields(TrainConfig)]
    namespace = argparse.Namespace(config=args.config, **{name: getattr(args, name) for name in own + train_names})
    values = split_config_file(namespace, {spec.name: spec.config, "train": TrainConfig})
    if not values[spec.name].get("concepts"):
        raise ConceptGuardError("--concepts is required: name the concept(s) to immunize")
    if not values[spec.name].get("data"):
        raise ConceptGuardError("--data is required: folder(s) of images of the concepts")
    config = build_config(spec.config, cli_values=values[spec.name])
    train_config = train_config_with_defaults(spec.config.default_train, values["train"])

    out = Path(args.out).absolute()
    _check_output_target(out, args.overwrite)  # fail before hours of training
    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle, config_dir=args.config_dir, device=args.device)
    base_hash = content_hash(pipe)
    resolved: dict[str, Any] = {"model": str(args.model), "base_model_hash": base_hash,
                                spec.name: config_to_dict(config)}
    result = spec.apply(pipe, config, run_dir=Path(run_dir_for(args)), resume=args.resume,
                        train_config=train_config, resolved_config=dict(resolved))
    resolved["train"] = config_to_dict(train_config)

    states = {name: module.state_dict() for name, module in model_components(pipe).items()}
    changed = {}
    for key in result.changed:
        component, _, name = key.partition(".")
        changed[key] = states[component][name]
    written = save_method_outputs(pipe, out, base_pipe_hash=base_hash, changed=changed, method=spec.name,
                                  config=resolved, overwrite=args.overwrite, summary=result.summary)
    print(f"wrote {written}: {result.summary}")
    return 0
