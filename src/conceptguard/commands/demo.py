"""Run the main job end to end on the embedded model and write what a person can look at.

Today: check the shipped world against its manifest, measure its quality bar, render its contact
sheet and export a fine-tuning folder. Each later stage of the mission (erase, immunize, guard,
attack, report) joins this command as it lands.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="out/demo", help="folder for the demo's outputs")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from conceptguard.world import load_detector, load_embedded_pipeline, verify_assets
    from conceptguard.world.dataset import export_folder, generate
    from conceptguard.world.quality import meets_bar, measure_quality
    from conceptguard.world.show import contact_sheet

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = verify_assets()
    print(f"[1/4] embedded world verified: {len(manifest['files'])} files match their sha256")
    pipe = load_embedded_pipeline()
    sheet = contact_sheet(pipe, out / "world.png", seed=args.seed)
    print(f"[2/4] contact sheet: {sheet}")
    scores = measure_quality(pipe, load_detector(), n_per_concept=4, seed=args.seed)
    verdict = meets_bar(scores)
    (out / "quality.json").write_text(json.dumps({"scores": scores, "meets_bar": verdict}, indent=1))
    print("[3/4] quality bar: " + ", ".join(f"{k} {v:.0%}{'' if verdict[k] else ' (below bar)'}" for k, v in scores.items()))
    folder = export_folder(generate(20, seed=args.seed, split="held_out_characters", character="yulbar"),
                           out / "finetune-data-yulbar")
    print(f"[4/4] a fine-tuning folder an attacker could bring: {folder}")
    return 0
