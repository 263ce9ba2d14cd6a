"""Stack defenses in one run — erase, then immunize, then guard — from one config file.

    conceptguard stack --config stack.yaml --out protected/
    conceptguard stack --config stack.yaml --out protected/ --resume     # after an interruption

The config file (YAML or JSON) has up to three sections, run in this order on the previous one's
weights; each is optional, at least one is needed:

    model: embedded                 # optional; --model wins
    erase:                          # any erase method (esd, sdd, uce) and its options
      method: esd
      concepts: [zorblat]
      train: {steps: 200}           # optimization, over the method's paper recipe
    immunize:                       # any immunize method (imma, mima) and its options
      method: imma
      concepts: [yulbar]
      data: [data/yulbar]
    guard:                          # FreezeAsGuard, learned on the erased and immunized model
      illegal: [data/yulbar]
      innocent: [data/logos]
      ratio: 0.3

Writes OUT/pipeline (the final weights), OUT/delta.safetensors (against the original model),
OUT/guard.safetensors (the mask, bound to the final weights), OUT/stack.json and OUT/README.md
(a model card with one section per stage). Each stage keeps its output and training run in the
run folder (default OUT.run); --resume reuses finished stages and continues an interrupted one
from its newest checkpoint. See docs/stack.md.
"""

from __future__ import annotations

import argparse

from conceptguard.commands.common import add_model_arguments, add_run_arguments


def add_arguments(parser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the example's line breaks
    add_model_arguments(parser)
    parser.set_defaults(model=None)  # "not given": the config file's model, else the embedded one
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="YAML or JSON file with the stages: erase, immunize, guard (see above)")
    add_run_arguments(parser)


def run(args) -> int:
    from conceptguard.stack import load_stack_config, stack

    config = load_stack_config(args.config)
    result = stack(args.model, config, args.out, run_dir=args.run_dir, resume=args.resume,
                   overwrite=args.overwrite, allow_pickle=args.allow_pickle, config_dir=args.config_dir,
                   device=args.device)
    for record in result.stages:
        how = "reused" if record["reused"] else "ran"
        print(f"{record['stage']} ({record['method']}, {how}): {record['summary']}")
    print(f"wrote {result.out}: model {result.model_hash[:16]}... from base {result.base_model_hash[:16]}... "
          f"(run folder {result.run_dir})")
    return 0
