"""Describe a model: its family, prediction type, parameter counts per component and content hash.

The content hash is conceptguard's sha256 over the UNet, text encoder(s) and VAE weights; output
folders and deltas record it, so it tells which base model an edit was made from.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from conceptguard.commands.common import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the description as JSON")


def describe(pipe, source: str) -> dict:
    """The facts ``info`` prints, as plain data."""
    from conceptguard.models.io import content_hash, detect_family, model_components, prediction_type

    parameters = {name: sum(p.numel() for p in module.parameters())
                  for name, module in model_components(pipe).items()}
    return {
        "model": source,
        "pipeline": type(pipe).__name__,
        "family": detect_family(pipe),
        "prediction_type": prediction_type(pipe),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "parameters": parameters,
        "total_parameters": sum(parameters.values()),
        "content_hash": content_hash(pipe),
    }


def _format_text(facts: dict) -> str:
    width = max(len(name) for name in [*facts["parameters"], "total"])
    lines = [
        f"model:            {facts['model']}",
        f"pipeline:         {facts['pipeline']}",
        f"family:           {facts['family']}",
        f"prediction type:  {facts['prediction_type']}",
        f"dtype:            {facts['dtype']}",
        "parameters:",
    ]
    lines += [f"  {name:<{width}}  {count:>15,}" for name, count in facts["parameters"].items()]
    lines.append(f"  {'total':<{width}}  {facts['total_parameters']:>15,}")
    lines.append(f"content hash:     sha256:{facts['content_hash']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from conceptguard.models.io import load_pipeline, quiet_libraries

    quiet_libraries()
    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle, config_dir=args.config_dir, device=args.device)
    facts = describe(pipe, str(args.model) if args.model else "embedded")
    print(json.dumps(facts, indent=2) if args.json else _format_text(facts))
    return 0
