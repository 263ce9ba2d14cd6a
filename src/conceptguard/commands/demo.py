"""Run the main job end to end on the embedded model and write what a person can look at.

1. check the shipped world against its manifest and draw its contact sheet;
2. erase a character from the weights with ESD-x (a short run on the CPU);
3. evaluate the base and the erased model on the same seeded prompts;
4. build the HTML report comparing them.

Everything lands in --out: world.png, erased/ (pipeline, delta, model card), esd-x/ (results.json
and images of both models) and report.html.
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="out/demo", help="folder for the demo's outputs")
    parser.add_argument("--concept", default="zorblat", help="world concept to erase (default: a seen character)")
    parser.add_argument("--steps", type=int, default=150, help="ESD iterations")
    parser.add_argument("--lr", type=float, default=2e-4, help="ESD learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier demo")


def run(args) -> int:
    import shutil

    from conceptguard.evaluation.harness import evaluate
    from conceptguard.evaluation.sources import PipelineSource
    from conceptguard.methods import apply_method
    from conceptguard.models.io import content_hash
    from conceptguard.outputs import save_method_outputs
    from conceptguard.report.html import build_report
    from conceptguard.training.loop import TrainConfig
    from conceptguard.world import load_embedded_pipeline, verify_assets
    from conceptguard.world.show import contact_sheet

    out = Path(args.out)
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    manifest = verify_assets()
    base = load_embedded_pipeline()
    sheet = contact_sheet(base, out / "world.png", seed=args.seed)
    print(f"[1/4] embedded world verified ({len(manifest['files'])} files); contact sheet: {sheet}")

    erased = load_embedded_pipeline()
    base_hash = content_hash(erased)
    train = TrainConfig(steps=args.steps, lr=args.lr, optimizer="adam", max_grad_norm=None, seed=args.seed,
                        checkpoint_every=args.steps)
    result = apply_method(erased, "esd", run_dir=out / "erased.run", train_config=train, concepts=[args.concept],
                          variant="x")
    state = {name: tensor for name, tensor in erased.unet.state_dict().items()}
    changed = {key: state[key.partition(".")[2]] for key in result.changed}
    save_method_outputs(erased, out / "erased", base_pipe_hash=base_hash, changed=changed, method="esd",
                        config={"concepts": [args.concept], "variant": "x", "steps": args.steps, "lr": args.lr},
                        summary=result.summary, overwrite=True)
    print(f"[2/4] ESD-x erased {args.concept!r}: {out / 'erased'}")

    results = evaluate(PipelineSource(erased, name="esd-x"), erase=[args.concept], prompt_set="quick",
                       base_source=PipelineSource(base, name="base"), seed=args.seed, out_dir=out / "esd-x",
                       overwrite=True)
    print(f"[3/4] evaluated base and erased on the same seeds: {_headline(results, args.concept)}")
    written = build_report([out / "esd-x"], out / "report.html")
    print(f"[4/4] report: {written.get('html', out / 'report.html')}")
    return 0


def _headline(results: dict, concept: str) -> str:
    """The figures that matter: target detection of the erased concept and preservation, per model."""
    parts = []
    for model in ("base", "model"):
        summary = results["metrics"].get(model, {})
        target = summary.get("groups", {}).get("target", {}).get("detection", {}).get(concept)
        accuracy = summary.get("preservation", {}).get("accuracy")
        name = "base" if model == "base" else "erased"
        if target is not None:
            parts.append(f"{name}: {concept} detected in {target:.0%} of target images")
        if accuracy is not None:
            parts.append(f"{name}: preservation accuracy {accuracy:.0%}")
    return "; ".join(parts) or "see results.json"
