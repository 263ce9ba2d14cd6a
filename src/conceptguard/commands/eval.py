"""Measure erasure, preservation and quality of a model on seeded images.

Generates one image per prompt (seeded), scores them and writes OUT/results.json, the images
under OUT/images/ and OUT/timing.json. Prompt sets: the embedded world's built-in sets (quick,
target, paraphrase, implicit, preservation, full) or a CSV with prompt, evaluation_seed
[, evaluation_guidance, case_number] columns (e.g. I2P). Several processes share the generation
and give the same results.json as one:

  accelerate launch --num_processes 2 --cpu -m conceptguard eval --erase halo --out runs/eval
"""

from __future__ import annotations

from conceptguard.commands.common import add_model_arguments

SCORERS = ("auto", "world", "external", "none")


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--base", default=None, metavar="PATH",
                        help="the unedited model (path or 'embedded'), drawn with the same seeds: adds the "
                             "LPIPS-like distance and the preservation drop")
    parser.add_argument("--source", default="model", metavar="KIND[:OPTION]",
                        help="wrap the model in an inference-time method, e.g. negative-prompt or sld:strong "
                             "(default: plain sampling)")
    parser.add_argument("--erase", nargs="+", default=[], metavar="CONCEPT",
                        help="concepts the model should no longer draw (space or comma separated); world "
                             "concepts use canonical names: circle, red, striped, zorblat, halo, ...")
    parser.add_argument("--prompts", default="quick", metavar="SET|CSV",
                        help="built-in set (quick, target, paraphrase, implicit, preservation, full) or a CSV "
                             "file (default: quick, at most 256 images)")
    parser.add_argument("--out", required=True, help="run folder: results.json, images/, timing.json")
    parser.add_argument("--overwrite", action="store_true", help="replace the results in an existing run folder")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--seed", type=int, default=0, help="seed of the built-in prompt sets (default: 0)")
    gen.add_argument("--n-per-prompt", type=int, default=1, help="images per prompt, seeds s, s+1, ... (default: 1)")
    gen.add_argument("--steps", type=int, default=25, help="sampler steps (default: 25)")
    gen.add_argument("--guidance", type=float, default=7.5,
                     help="classifier-free guidance, unless the CSV gives evaluation_guidance (default: 7.5)")
    gen.add_argument("--batch-size", type=int, default=32, help="images per generation batch (default: 32)")

    score = parser.add_argument_group("scoring")
    score.add_argument("--metrics", nargs="+", default=None, metavar="METRIC",
                       help="detection, preservation, clip, fid, lpips, nudenet (default: all that apply)")
    score.add_argument("--scorer", choices=SCORERS, default="auto",
                       help="world: the embedded world's detector and CLIP; external: --clip/--inception models; "
                            "auto: world for built-in sets, else external when --clip/--inception are given")
    score.add_argument("--world-assets", default=None, metavar="DIR",
                       help="the embedded world's assets folder (default: the shipped ones); also used for "
                            "--model embedded")
    score.add_argument("--clip", default=None, metavar="PATH", help="local transformers CLIP folder (real models)")
    score.add_argument("--inception", default=None, metavar="PATH",
                       help="torch-fidelity FID Inception weights (.pth), for FID on real models")
    score.add_argument("--fid-reference", default=None, metavar="DIR",
                       help="folder of reference images for FID on real models (default: the base model's images)")
    score.add_argument("--nudenet", action="store_true",
                       help="add NudeNet %%nude (*_EXPOSED above 0.6); needs pip install 'conceptguard[nsfw]'")


def _split_list(values: list[str]) -> list[str]:
    return [item for value in values for item in value.split(",") if item.strip()]


def _load(spec: str, args):
    from pathlib import Path

    from conceptguard.models.io import EMBEDDED_NAMES, load_pipeline

    if spec in EMBEDDED_NAMES and args.world_assets:
        from conceptguard.world import load_embedded_pipeline

        return load_embedded_pipeline(device=args.device, assets=Path(args.world_assets))
    return load_pipeline(spec, allow_pickle=args.allow_pickle, config_dir=args.config_dir, device=args.device)


def _summary_lines(result: dict) -> list[str]:
    lines = []
    model = result["metrics"]["model"]
    for group, entry in model["groups"].items():
        parts = [f"{entry['n']} images"]
        for concept, rate in entry.get("detection", {}).items():
            if rate is not None:
                parts.append(f"{concept} detected {rate:.1%}")
        if entry.get("clip_score") is not None:
            parts.append(f"CLIP {entry['clip_score']:.2f}")
        if entry.get("nude_rate") is not None:
            parts.append(f"nude {entry['nude_rate']:.1%}")
        lines.append(f"  {group:13s} " + ", ".join(parts))
    if model.get("preservation"):
        lines.append("  preservation  " + ", ".join(f"{k} {v:.1%}" for k, v in model["preservation"].items()
                                                     if v is not None))
    if model.get("fid"):
        lines.append(f"  FID           {model['fid']['value']:.3f}")
    comparison = result["metrics"].get("comparison", {})
    if comparison.get("lpips"):
        lines.append(f"  LPIPS-like vs base {comparison['lpips']['all']:.4f}")
    if comparison.get("preservation_drop", {}).get("accuracy") is not None:
        lines.append(f"  preservation drop vs base {comparison['preservation_drop']['accuracy']:+.1%}")
    return lines


def run(args) -> int:
    from pathlib import Path

    from accelerate import PartialState

    from conceptguard.errors import ConceptGuardError
    from conceptguard.evaluation.harness import ExternalScorer, evaluate
    from conceptguard.evaluation.prompts import check_concepts, is_builtin
    from conceptguard.evaluation.sources import make_source

    for name in ("n_per_prompt", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ConceptGuardError(f"--{name.replace('_', '-')} must be at least 1")
    # cpu=True makes a multi-process launch on a machine without accelerators use gloo on the CPU
    # (accelerate otherwise falls back to independent single processes that would all write).
    state = PartialState(cpu=args.device == "cpu")
    if state.num_processes > 1 and args.device != "cpu":
        args.device = str(state.device)  # one accelerator per process under `accelerate launch`
    erase = _split_list(args.erase)
    # Check what is cheap to check before loading models (seconds for a real one).
    if is_builtin(args.prompts):
        check_concepts(erase)
    elif not Path(args.prompts).is_file():
        raise ConceptGuardError(f"--prompts {args.prompts!r} is neither a built-in set (quick, target, paraphrase, "
                                f"implicit, preservation, full) nor an existing CSV file")

    scorer = args.scorer
    if scorer == "external" or (scorer == "auto" and not is_builtin(args.prompts) and (args.clip or args.inception)):
        scorer = ExternalScorer(args.clip, args.inception, args.fid_reference)
    elif scorer == "none":
        scorer = None
    elif args.clip or args.inception:
        raise ConceptGuardError("--clip/--inception score real models: pass --scorer external to use them")

    pipe = _load(args.model, args)
    source = make_source(args.source, pipe, erase)
    base_source = make_source("model", _load(args.base, args)) if args.base else None
    if base_source is not None:
        base_source.name = "base"
    result = evaluate(
        source, erase=erase, prompt_set=args.prompts, base_source=base_source, seed=args.seed,
        n_per_prompt=args.n_per_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
        batch_size=args.batch_size, out_dir=Path(args.out), scorer=scorer, metrics=args.metrics,
        nudenet=args.nudenet, world_assets=args.world_assets, model_info={"model": str(args.model)},
        base_info={"model": str(args.base)} if args.base else None, overwrite=args.overwrite, state=state)
    if state.is_main_process:
        print(f"wrote {Path(args.out) / 'results.json'} ({len(result['images'])} prompts)")
        for line in _summary_lines(result):
            print(line)
    return 0
