"""Choose which UNet parameters a method trains or edits: presets from the papers, plus patterns.

Names are diffusers' (``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight``),
where ``attn1`` is self-attention and ``attn2`` cross-attention to the text.

A selection is a pipeline of filters: the preset (or every parameter when there is none) is
narrowed to the names matching at least one ``include`` pattern (when any are given), then names
matching any ``exclude`` pattern are dropped. Patterns are regular expressions searched anywhere
in the name; prefix one with ``glob:`` for a shell glob matched against the whole name
(``glob:*attn2.to_[kv].weight``), or with ``re:`` to force a regular expression. An unprefixed
pattern that is not a valid regular expression (``*attn2*``) is taken as a glob.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

import torch

from conceptguard.errors import ConceptGuardError

_ATTN2 = re.compile(r"(^|\.)attn2\.")
_ATTN2_KEY_VALUE = re.compile(r"(^|\.)attn2\.to_[kv]\.")
_SELF_AND_CROSS_PROJECTIONS = re.compile(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out)\.")
# ESD/SDD's "noxattn" variants also leave the timestep embedding and the output conv alone.
_TIME_AND_OUT = re.compile(r"^(time_embedding|conv_out)\.")

PRESETS: dict[str, str] = {
    "x": "cross-attention: every parameter of attn2 (ESD-x, UCE)",
    "x-strict": "cross-attention keys and values only: attn2.to_k and attn2.to_v",
    "u": "everything except cross-attention (ESD-u)",
    "all": "every UNet parameter",
    "imma": "attention projections (to_q, to_k, to_v, to_out) of self- and cross-attention (IMMA)",
}

_PRESET_FILTERS: dict[str, Callable[[str], bool]] = {
    "x": lambda name: bool(_ATTN2.search(name)),
    "x-strict": lambda name: bool(_ATTN2_KEY_VALUE.search(name)),
    "u": lambda name: not _ATTN2.search(name),
    "all": lambda name: True,
    "imma": lambda name: bool(_SELF_AND_CROSS_PROJECTIONS.search(name)),
}


def compile_pattern(pattern: str) -> Callable[[str], bool]:
    """A predicate on parameter names for one pattern (see the module docstring for the syntax)."""
    if pattern.startswith("glob:"):
        glob = pattern[len("glob:"):]
        return lambda name: fnmatch.fnmatchcase(name, glob)
    forced_regex = pattern.startswith("re:")
    expression = pattern[len("re:"):] if forced_regex else pattern
    try:
        regex = re.compile(expression)
    except re.error as exc:
        if forced_regex:
            raise ConceptGuardError(f"invalid regular expression {expression!r}: {exc}") from exc
        return lambda name: fnmatch.fnmatchcase(name, pattern)
    return lambda name: bool(regex.search(name))


def describe_selection(preset: str | None, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> str:
    parts = [f"preset {preset!r}" if preset else "all parameters"]
    include, exclude = list(include), list(exclude)
    if include:
        parts.append("include " + ", ".join(repr(p) for p in include))
    if exclude:
        parts.append("exclude " + ", ".join(repr(p) for p in exclude))
    return "; ".join(parts)


def select_parameters(
    unet: torch.nn.Module,
    preset: str | None = None,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    *,
    exclude_time_and_out: bool = False,
) -> dict[str, torch.nn.Parameter]:
    """The selected UNet parameters by name, sorted by name.

    ``exclude_time_and_out`` also drops ``time_embedding.*`` and ``conv_out.*``, as the ESD/SDD
    reference code does for its non-cross-attention variants.
    """
    include, exclude = list(include), list(exclude)
    if preset is not None and preset not in PRESETS:
        raise ConceptGuardError(f"unknown parameter preset {preset!r}; known presets: {', '.join(PRESETS)}")
    preset_filter = _PRESET_FILTERS[preset] if preset is not None else _PRESET_FILTERS["all"]
    include_filters = [compile_pattern(p) for p in include]
    exclude_filters = [compile_pattern(p) for p in exclude]

    selected: dict[str, torch.nn.Parameter] = {}
    for name, param in sorted(unet.named_parameters(), key=lambda item: item[0]):
        if not preset_filter(name):
            continue
        if include_filters and not any(match(name) for match in include_filters):
            continue
        if any(match(name) for match in exclude_filters):
            continue
        if exclude_time_and_out and _TIME_AND_OUT.search(name):
            continue
        selected[name] = param
    if not selected:
        raise ConceptGuardError(
            f"selection {describe_selection(preset, include, exclude)} matched no parameter of the UNet")
    return selected


def count_parameters(params: dict[str, torch.nn.Parameter] | Iterable[torch.Tensor]) -> int:
    values = params.values() if isinstance(params, dict) else params
    return sum(p.numel() for p in values)


def freeze_all_but(unet: torch.nn.Module, names: Iterable[str]) -> list[torch.nn.Parameter]:
    """Make exactly ``names`` trainable; returns those parameters, in name order, for the optimizer."""
    wanted = set(names)
    all_params = dict(unet.named_parameters())
    unknown = sorted(wanted - set(all_params))
    if unknown:
        raise ConceptGuardError(f"no UNet parameter named {unknown[0]!r} ({len(unknown)} unknown names)")
    for name, param in all_params.items():
        param.requires_grad_(name in wanted)
    return [all_params[name] for name in sorted(wanted)]


def select_for(unet: torch.nn.Module, config) -> dict[str, torch.nn.Parameter]:
    """The selection a method config describes with ``variant``, ``include``, ``exclude`` and
    ``exclude_time_and_out`` (ESD, SDD)."""
    return select_parameters(unet, config.variant, include=config.include, exclude=config.exclude,
                             exclude_time_and_out=config.exclude_time_and_out)
