"""The command line of registry methods, shared by ``erase`` and ``immunize``.

Flags come from the registered methods' Config dataclasses (each flag marked with the methods it
applies to), optimization flags from TrainConfig with each method's paper defaults; the run loads
the model, applies the method and writes the standard outputs (pipeline/, delta, model card).
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
from conceptguard.config import add_dataclass_arguments
from conceptguard.errors import ConceptGuardError

def _is_trained(config_cls: type) -> bool:
    """Trained methods declare their paper's optimization as ``default_train`` (a ClassVar)."""
    return isinstance(getattr(config_cls, "default_train", None), dict)


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _add_flag(group, name: str, hint: Any, help_text: str, default: Any) -> bool:
    """Add ``--name`` the way :func:`add_dataclass_arguments` does; False if the flag is taken.

    ``default`` only feeds the help text (the parsed default stays None = "not given").
    """
    spec = dataclasses.field(default_factory=lambda: default, metadata={"help": help_text})
    try:
        add_dataclass_arguments(group, dataclasses.make_dataclass(f"_{name}", [(name, hint, spec)]))
    except argparse.ArgumentError:
        # A method option named like a common flag (--model, --steps, ...) would be ambiguous on the
        # command line; it stays settable from --config.
        return False
    return True


def _short(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and len(value) > 4:
        return f"[{', '.join(map(repr, value[:3]))}, ... ({len(value)} items)]"
    return value


def _joint_default(defaults: dict[str, Any]) -> Any:
    values = list(defaults.values())
    if all(v == values[0] for v in values):
        return _short(values[0])
    return "; ".join(f"{method}: {_short(value)}" for method, value in defaults.items())


def _method_options(specs) -> dict[str, list[tuple[str, dataclasses.Field, Any]]]:
    """Every option of every method, by field name: [(method, field, type hint)]."""
    options: dict[str, list[tuple[str, dataclasses.Field, Any]]] = {}
    for method, spec in specs.items():
        hints = typing.get_type_hints(spec.config)
        for field in dataclasses.fields(spec.config):
            if not field.name.startswith("_"):
                options.setdefault(field.name, []).append((method, field, hints[field.name]))
    return options


def _shared_hint(hints: list[Any]) -> Any:
    if all(h == hints[0] for h in hints):
        return hints[0]
    # Methods disagree on the type: keep lists as lists, leave the rest to each config to validate.
    is_list = [typing.get_origin(h) in (list, tuple) for h in hints]
    return list[str] if all(is_list) else str


def _given(args, names) -> list[str]:
    return [name for name in names if getattr(args, name, None) is not None]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_method_arguments(parser, specs: dict, *, kind: str, train_title: str) -> None:
    """``--method`` plus every option of ``specs`` (registered methods of ``kind``)."""
    from conceptguard.training.loop import TrainConfig

    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the examples' line breaks
    add_model_arguments(parser)
    listing = "; ".join(f"{name}: {spec.description.rstrip('.')}" for name, spec in sorted(specs.items()))
    parser.add_argument("--method", required=True, metavar="{" + ",".join(sorted(specs)) + "}",
                        help=f"{kind} method — {listing}")
    add_run_arguments(parser)
    add_config_file_argument(parser)

    trained = {name: spec for name, spec in specs.items() if _is_trained(spec.config)}
    train_group = parser.add_argument_group(
        f"{train_title} (trained methods: {', '.join(sorted(trained)) or 'none'}; defaults: each method's recipe)")
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        defaults = {name: spec.config.default_train.get(field.name, _default(field)) for name, spec in trained.items()}
        _add_flag(train_group, field.name, hints[field.name], field.metadata.get("help", ""),
                  _joint_default(defaults) if defaults else _default(field))

    method_group = parser.add_argument_group("method options (the methods each applies to in brackets)")
    owners: dict[str, tuple[str, ...]] = {}
    for name, entries in _method_options(specs).items():
        methods_of = tuple(method for method, _, _ in entries)
        # Where the methods word an option differently, the shortest wording is the generic one.
        wording = min((field.metadata.get("help", "") for _, field, _ in entries), key=len)
        help_text = f"[{', '.join(methods_of)}] {wording}"
        default = _joint_default({method: _default(field) for method, field, _ in entries})
        if _add_flag(method_group, name, _shared_hint([hint for _, _, hint in entries]), help_text, default):
            owners[name] = methods_of
    parser.set_defaults(_method_flags=owners)


def run_method(args, *, kind: str, required: dict[str, str]) -> int:
    """Apply ``--method`` to ``--model`` and write the outputs; ``required`` maps config fields
    that must be given to the error shown when they are missing."""
    from pathlib import Path

    from conceptguard.config import build_config, config_to_dict
    from conceptguard.methods import get_method
    from conceptguard.methods.trajectory import train_config_with_defaults
    from conceptguard.models.io import content_hash, load_pipeline, model_components
    from conceptguard.outputs import check_output_target, save_method_outputs
    from conceptguard.training.loop import TrainConfig

    spec = get_method(args.method, kind=kind)
    trained = _is_trained(spec.config)
    owners: dict[str, tuple[str, ...]] = args._method_flags
    train_names = [f.name for f in dataclasses.fields(TrainConfig)]
    foreign = [name for name in _given(args, owners) if spec.name not in owners[name]]
    if not trained:
        foreign += _given(args, train_names)
    if foreign:
        verb = "does" if len(foreign) == 1 else "do"
        raise ConceptGuardError(
            f"{', '.join(_flag(n) for n in foreign)} {verb} not apply to --method {spec.name}; "
            f"see `conceptguard {kind} --help`")

    # Only this method's flags feed the merge, so a flag of another method cannot leak in.
    own = [name for name, methods_of in owners.items() if spec.name in methods_of]
    namespace = argparse.Namespace(config=args.config, **{name: getattr(args, name) for name in own})
    sections: dict[str, type] = {spec.name: spec.config}
    if trained:
        sections["train"] = TrainConfig
        namespace.__dict__.update({name: getattr(args, name) for name in train_names})
    values = split_config_file(namespace, sections)
    field_names = {f.name for f in dataclasses.fields(spec.config)}
    for name, message in required.items():
        if name in field_names and not values[spec.name].get(name):
            raise ConceptGuardError(message)
    config = build_config(spec.config, cli_values=values[spec.name])
    train_config = train_config_with_defaults(spec.config.default_train, values["train"]) if trained else None

    out = Path(args.out).absolute()
    check_output_target(out, args.overwrite)  # fail before hours of training
    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle, config_dir=args.config_dir, device=args.device)
    base_hash = content_hash(pipe)
    resolved: dict[str, Any] = {"model": str(args.model), "base_model_hash": base_hash,
                                spec.name: config_to_dict(config)}
    extra = {"train_config": train_config, "resolved_config": dict(resolved)} if trained else {}
    result = spec.apply(pipe, config, run_dir=Path(run_dir_for(args)), resume=args.resume, **extra)
    if trained:
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
