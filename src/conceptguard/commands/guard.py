"""FreezeAsGuard: learn which UNet tensors to freeze so that fine-tuning cannot teach an illegal domain.

    conceptguard guard learn --illegal data/characters --innocent data/logos --ratio 0.3 --out guard.safetensors
    conceptguard finetune --data data/mine --guard guard.safetensors --out tuned/
    conceptguard guard random --ratio 0.3 --out random30.safetensors     # the Random-rho baseline
    conceptguard guard show guard.safetensors [--model PATH]
    conceptguard guard table --out guard-table/                           # Table 2 in the embedded world

`learn` keeps checkpoints and logs in the run folder (default MASK.run) and continues with
--resume; --steps counts mask updates and --lr is the mask's step size (paper: plain gradient
steps of size 10). The mask file names every UNet tensor and records the model's content hash:
fine-tuning refuses it on any other model, and refuses it if it was edited.
"""

from __future__ import annotations

import argparse

from conceptguard.commands.common import add_config_file_argument, add_model_arguments, split_config_file
from conceptguard.config import add_dataclass_arguments
from conceptguard.errors import ConceptGuardError


def add_arguments(parser) -> None:
    from conceptguard.guard.mask import GuardConfig
    from conceptguard.guard.table import TableConfig
    from conceptguard.training.loop import TrainConfig

    actions = parser.add_subparsers(dest="guard_action", metavar="ACTION")

    learn = actions.add_parser("learn", help="learn a mask from illegal- and innocent-domain data")
    add_model_arguments(learn)
    learn.add_argument("--illegal", nargs="+", required=True, metavar="DATA",
                       help="folder(s) of images with captions of the illegal domain")
    learn.add_argument("--innocent", nargs="+", required=True, metavar="DATA",
                       help="folder(s) of images with captions of the innocent domain(s)")
    learn.add_argument("--out", required=True, help="mask file to write (.safetensors)")
    learn.add_argument("--run-dir", default=None, help="checkpoints and logs (default: OUT.run next to OUT)")
    learn.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder")
    learn.add_argument("--overwrite", action="store_true", help="replace an existing mask file")
    add_config_file_argument(learn)
    add_dataclass_arguments(learn.add_argument_group("FreezeAsGuard"), GuardConfig)
    add_dataclass_arguments(learn.add_argument_group("mask optimization (steps = mask updates)"), TrainConfig)

    random = actions.add_parser("random", help="write a Random-rho baseline mask (seeded, exact ratio)")
    add_model_arguments(random)
    random.add_argument("--ratio", type=float, required=True, help="share of UNet tensors to freeze")
    random.add_argument("--seed", type=int, default=0, help="seed of the random choice")
    random.add_argument("--out", required=True, help="mask file to write (.safetensors)")
    random.add_argument("--overwrite", action="store_true", help="replace an existing mask file")

    show = actions.add_parser("show", help="print a mask's manifest and most-frozen tensors; verify it")
    show.add_argument("mask", help="mask file (.safetensors)")
    show.add_argument("--model", default=None, help="also check that the mask is made for this model")
    show.add_argument("--config-dir", default=None, help=argparse.SUPPRESS)
    show.add_argument("--allow-pickle", action="store_true", help=argparse.SUPPRESS)
    show.add_argument("--top", type=int, default=10, help="how many tensors to list")

    table = actions.add_parser("table", help="FreezeAsGuard vs Random-rho vs Full FT over ratios (embedded world)")
    add_model_arguments(table)
    table.add_argument("--out", required=True, help="folder for results.json, table.md, masks and run folders")
    table.add_argument("--world-assets", default=None,
                       help="world assets folder with the detector (default: the installed world)")
    table.add_argument("--overwrite", action="store_true", help="discard the cached cells of an earlier run")
    add_config_file_argument(table)
    add_dataclass_arguments(table.add_argument_group("experiment"), TableConfig)


def run(args) -> int:
    handlers = {"learn": _learn, "random": _random, "show": _show, "table": _table}
    if args.guard_action not in handlers:
        raise ConceptGuardError("choose an action: conceptguard guard {learn,random,show,table} (see --help)")
    return handlers[args.guard_action](args)


def _check_new_file(path, overwrite: bool) -> None:
    from pathlib import Path

    path = Path(path)
    if path.exists() and not overwrite:
        raise ConceptGuardError(f"{path} already exists; choose another --out or pass --overwrite")
    if path.exists() and not path.is_file():
        raise ConceptGuardError(f"{path} exists and is not a file; refusing to replace it")


def _learn(args) -> int:
    from conceptguard.config import build_config
    from conceptguard.guard.mask import GuardConfig, learn_mask
    from conceptguard.models.io import content_hash, load_pipeline
    from conceptguard.training.loop import TrainConfig

    values = split_config_file(args, {"guard": GuardConfig, "train": TrainConfig})
    config = build_config(GuardConfig, cli_values=values["guard"])
    train_config = build_config(TrainConfig, file_values=GuardConfig.default_train, cli_values=values["train"])
    _check_new_file(args.out, args.overwrite)  # fail before the work, not after
    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle, config_dir=args.config_dir, device=args.device)
    model_hash = content_hash(pipe)
    run_dir = args.run_dir or str(args.out).rstrip("/") + ".run"
    result = learn_mask(pipe, args.illegal, args.innocent, run_dir, config=config, train_config=train_config,
                        resume=args.resume, model_hash=model_hash, resolved_config={"model": str(args.model)})
    path = result.mask.save(args.out)
    print(f"wrote {path}: {result.mask.describe()} (run folder {result.train.run_dir})")
    return 0


def _random(args) -> int:
    from conceptguard.guard.maskfile import random_mask
    from conceptguard.models.io import load_pipeline

    _check_new_file(args.out, args.overwrite)
    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle, config_dir=args.config_dir, device=args.device)
    mask = random_mask(pipe, args.ratio, seed=args.seed)
    path = mask.save(args.out)
    print(f"wrote {path}: {mask.describe()}")
    return 0


def _show(args) -> int:
    import json

    from conceptguard.guard.maskfile import GuardMask

    mask = GuardMask.load(args.mask)  # verifies the payload hash
    manifest = mask.manifest
    print(f"{args.mask}: {mask.describe()}")
    print(f"  base model: {manifest.get('base_model_hash')} ({manifest.get('family')}); "
          f"conceptguard {manifest.get('conceptguard_version')}; sha256 {mask.sha256[:16]}...")
    for role, entries in (manifest.get("domains") or {}).items():
        for entry in entries:
            where = entry.get("path") or f"{entry.get('pairs')} in-memory pairs"
            print(f"  {role}: {where} (sha256 {str(entry.get('sha256'))[:16]}...)")
    if manifest.get("config"):
        print(f"  config: {json.dumps(manifest['config'], sort_keys=True)}")
    ranked = sorted(mask.soft, key=lambda name: (-mask.soft[name], name))[:max(0, args.top)]
    if ranked:
        print(f"  top {len(ranked)} tensors by soft mask (F = frozen):")
        for name in ranked:
            print(f"    {'F' if name in mask.frozen else ' '} {mask.soft[name]:.4f}  {name}")
    if args.model is not None:
        from conceptguard.models.io import load_pipeline

        pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle, config_dir=args.config_dir)
        mask.check_model(pipe)
        print(f"  matches model {args.model}")
    return 0


def _table(args) -> int:
    from pathlib import Path

    from conceptguard.config import build_config
    from conceptguard.guard.table import TableConfig, run_table
    from conceptguard.models.io import load_pipeline
    from conceptguard.world import ASSETS_DIR, load_detector

    values = split_config_file(args, {"table": TableConfig})
    config = build_config(TableConfig, cli_values=values["table"])
    assets = Path(args.world_assets) if args.world_assets else ASSETS_DIR
    if args.model in ("embedded", None) and args.world_assets:
        from conceptguard.world import load_embedded_pipeline

        pipe = load_embedded_pipeline(device=args.device, assets=assets)
    else:
        pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle, config_dir=args.config_dir, device=args.device)
    detector = load_detector(assets)
    run_table(pipe, detector, args.out, config, fresh=args.overwrite)
    table_path = Path(args.out) / "table.md"
    print(table_path.read_text(), end="")
    print(f"wrote {table_path} and {Path(args.out) / 'results.json'}")
    return 0
