"""The embedded world: build its models from a seed, look at it, sample data from it, check it.

  conceptguard world build [--out DIR] [--install]   re-create every model from the seed (resumable)
  conceptguard world show --out sheet.png             contact sheet: rendered vs generated per concept
  conceptguard world sample --out DIR --n 50 ...      a fine-tuning folder (images + captions)
  conceptguard world verify                           shipped files match their sha256 manifest
  conceptguard world quality                          the quality bar, measured on a seeded sample
"""

from __future__ import annotations

import json
from pathlib import Path

from conceptguard.errors import ConceptGuardError


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="world_command", metavar="ACTION", required=True)

    build = sub.add_parser("build", help="re-create the world's models from the seed (CPU or GPU; resumable)")
    build.add_argument("--out", default="runs/world-build", help="build folder; finished stages are reused")
    build.add_argument("--install", action="store_true", help="copy the result into the package's assets")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--device", default="cpu")
    build.add_argument("--from-shipped", metavar="STATE_DIR", default=None,
                       help="continue from the shipped world: finished stages from the package assets, the UNet "
                            "from its exported training state (e.g. world-training-state/); raise --unet-steps")
    build.add_argument("--export-state", metavar="STATE_DIR", default=None,
                       help="after building, write the UNet's training state there so a later build can continue")
    for name in ("vae_steps", "clip_steps", "detector_steps", "unet_steps", "unet_samples", "unet_batch"):
        build.add_argument("--" + name.replace("_", "-"), type=int, default=None)

    show = sub.add_parser("show", help="render a contact sheet (PNG) of real and generated samples per concept")
    show.add_argument("--out", default="world.png", help="PNG path")
    show.add_argument("--per-row", type=int, default=4)
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--no-generate", action="store_true", help="rendered samples only (no model needed)")

    sample = sub.add_parser("sample", help="write a fine-tuning folder of rendered images with captions")
    sample.add_argument("--out", required=True, help="folder to create")
    sample.add_argument("--n", type=int, default=50)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--split", default="pretrain",
                        choices=("pretrain", "held_out_characters", "innocent", "all"))
    for label in ("character", "shape", "colour", "style", "background", "design", "domain", "halo"):
        sample.add_argument("--" + label, default=None, help=f"pin the {label} label")

    sub.add_parser("verify", help="check the shipped files against their sha256 manifest")

    quality = sub.add_parser("quality", help="measure the quality bar on a seeded sample")
    quality.add_argument("--n-per-concept", type=int, default=8)
    quality.add_argument("--seed", type=int, default=0)
    quality.add_argument("--steps", type=int, default=50, help="DDIM steps")


def run(args) -> int:
    return {"build": _build, "show": _show, "sample": _sample, "verify": _verify, "quality": _quality}[
        args.world_command](args)


def _build(args) -> int:
    import shutil

    from conceptguard.world import ASSETS_DIR
    from conceptguard.world.build import BuildConfig, build_world

    overrides = {k: getattr(args, k) for k in ("vae_steps", "clip_steps", "detector_steps", "unet_steps",
                                               "unet_samples", "unet_batch") if getattr(args, k) is not None}
    from pathlib import Path

    from conceptguard.world.build import export_unet_state, seed_build_from_shipped

    cfg = BuildConfig(seed=args.seed, device=args.device, **overrides)
    if args.from_shipped:
        step = seed_build_from_shipped(Path(args.out), ASSETS_DIR, Path(args.from_shipped))
        if cfg.unet_steps <= step:
            raise ConceptGuardError(f"the shipped UNet is at step {step}: pass --unet-steps above it to continue")
        print(f"continuing the shipped world from UNet step {step}")
    result = build_world(args.out, cfg=cfg)
    if args.export_state:
        print(f"UNet training state written to {export_unet_state(Path(args.out), Path(args.export_state))}")
    print(f"built the world in {result}")
    if args.install:
        staging = ASSETS_DIR.with_name(ASSETS_DIR.name + ".new")
        if staging.exists():
            shutil.rmtree(staging)
        shutil.copytree(result, staging)
        old = ASSETS_DIR.with_name(ASSETS_DIR.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if ASSETS_DIR.exists():  # swap, so a crash never leaves the package without a world
            ASSETS_DIR.rename(old)
        staging.rename(ASSETS_DIR)
        shutil.rmtree(old, ignore_errors=True)
        print(f"installed into {ASSETS_DIR}")
    return 0


def _show(args) -> int:
    from conceptguard.world import load_embedded_pipeline
    from conceptguard.world.show import contact_sheet

    if not args.out.lower().endswith(".png"):
        raise ConceptGuardError(f"--out must be a .png path, got {args.out}")
    pipe = None if args.no_generate else load_embedded_pipeline()
    path = contact_sheet(pipe, args.out, per_row=args.per_row, seed=args.seed)
    print(f"wrote {path}")
    return 0


def _sample(args) -> int:
    from conceptguard.world.dataset import export_folder, generate

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConceptGuardError(f"output folder {out} is not empty")
    if args.n <= 0:
        raise ConceptGuardError("--n must be positive")
    fixed = {k: getattr(args, k) for k in ("character", "shape", "colour", "style", "background", "design",
                                           "domain", "halo") if getattr(args, k)}
    samples = generate(args.n, seed=args.seed, split=args.split, **fixed)
    export_folder(samples, out)
    print(f"wrote {len(samples)} images with captions to {out}")
    return 0


def _verify(args) -> int:
    from conceptguard.world import ASSETS_DIR, verify_assets

    manifest = verify_assets()
    print(f"ok: {len(manifest['files'])} files in {ASSETS_DIR} match the manifest")
    return 0


def _quality(args) -> int:
    from conceptguard.world import load_detector, load_embedded_pipeline
    from conceptguard.world.quality import QUALITY_BAR, meets_bar, measure_quality

    scores = measure_quality(load_embedded_pipeline(), load_detector(), n_per_concept=args.n_per_concept,
                             seed=args.seed, num_inference_steps=args.steps)
    verdict = meets_bar(scores)
    for key, value in scores.items():
        relation = "<=" if key == "held_out_character" else ">="
        print(f"{key:20s} {value:6.1%}  (bar {relation} {QUALITY_BAR[key]:.0%})  {'ok' if verdict[key] else 'BELOW BAR'}")
    print(json.dumps(scores))
    return 0 if all(verdict.values()) else 1
