"""Method configs are dataclasses; CLI flags and an optional YAML/JSON file map onto them.

Precedence: dataclass defaults < config file < explicit CLI flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from conceptguard.errors import ConceptGuardError


def _base_type(tp: Any) -> Any:
    """Strip Optional[...] / X | None down to X."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _base_type(args[0])
    return tp


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--field-name`` flag per dataclass field (default None = "not given")."""
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if field.name in skip or field.name.startswith("_"):
            continue
        tp = _base_type(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        help_text = f"{help_text} (default: {default})".strip()
        origin = typing.get_origin(tp)
        if origin in (list, tuple):
            (item_type,) = typing.get_args(tp)[:1] or (str,)
            parser.add_argument(flag, nargs="+", type=item_type, default=None, help=help_text)
        elif tp is bool:
            parser.add_argument(flag, type=_parse_bool, default=None, metavar="BOOL", help=help_text)
        elif typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            parser.add_argument(flag, choices=choices, default=None, help=help_text)
        elif tp in (int, float, str):
            parser.add_argument(flag, type=tp, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=str, default=None, help=help_text)


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConceptGuardError(f"config file not found: {path}")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConceptGuardError(f"cannot parse config file {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConceptGuardError(f"config file {path} must hold a mapping of field: value")
    return data


def build_config(config_cls: type, file_values: dict[str, Any] | None = None, cli_values: dict[str, Any] | None = None):
    """Merge defaults, a config file and CLI flags into a ``config_cls`` instance."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    merged: dict[str, Any] = {}
    for source in (file_values or {}, cli_values or {}):
        for key, value in source.items():
            key = key.replace("-", "_")
            if value is None:
                continue
            if key not in names:
                raise ConceptGuardError(
                    f"unknown option {key!r} for {config_cls.__name__}; known: {', '.join(sorted(names))}")
            merged[key] = value
    hints = typing.get_type_hints(config_cls)
    for key, value in merged.items():
        tp = _base_type(hints[key])
        if typing.get_origin(tp) is tuple and isinstance(value, list):
            merged[key] = tuple(value)
    try:
        return config_cls(**merged)
    except (TypeError, ValueError) as exc:
        raise ConceptGuardError(f"invalid {config_cls.__name__}: {exc}") from exc


def config_to_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
