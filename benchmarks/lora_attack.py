"""Time a LoRA re-learning attack and its recovery curve on the embedded model.

Goal (issue #6): a 200-step LoRA attack plus its curve (detection at steps 0, 50, 100, 200 on 32
target prompts) in at most 3 minutes on a 2-core CPU. The attacker's data is 64 rendered images
of a held-out character (default: drennik). Prints the time split and the curve.

    OMP_NUM_THREADS=1 python benchmarks/lora_attack.py [--concept drennik] [--steps 200] [--assets DIR]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from conceptguard.attacks.curves import GenerationSettings, world_detector, world_prompts
from conceptguard.attacks.relearn import RelearnConfig, default_train_config, relearn_attack
from conceptguard.world import ASSETS_DIR, load_embedded_pipeline
from conceptguard.world.dataset import export_folder, generate

# The embedded world's LoRA settings (docs/attacks.md); the defaults are real SD's (lr 1e-4).
WORLD_LORA = dict(lr=1e-3, batch_size=8, rank=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="drennik")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--images", type=int, default=64, help="attacker images")
    parser.add_argument("--prompts", type=int, default=32, help="curve prompts per checkpoint")
    parser.add_argument("--eval-steps", type=int, default=25, help="sampling steps of curve images")
    parser.add_argument("--lr", type=float, default=WORLD_LORA["lr"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--assets", default=None, help="world assets folder (default: the shipped ones)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    assets = Path(args.assets) if args.assets else ASSETS_DIR

    start = time.perf_counter()
    pipe = load_embedded_pipeline(assets=assets)
    detector = world_detector(args.concept, assets)
    loaded = time.perf_counter() - start
    checkpoints = sorted({s for s in (0, 50, 100, 200) if s <= args.steps} | {args.steps})
    with tempfile.TemporaryDirectory() as tmp:
        data = export_folder(generate(args.images, seed=1, split="held_out_characters", character=args.concept),
                             Path(tmp) / "data")
        config = RelearnConfig(kind="lora", batch_size=WORLD_LORA["batch_size"], lora_rank=WORLD_LORA["rank"])
        train_config = default_train_config("lora", {"steps": args.steps, "lr": args.lr, "progress": False,
                                                     "checkpoint_every": args.steps})
        start = time.perf_counter()
        _, record = relearn_attack(pipe, data, args.concept, Path(tmp) / "run", config=config,
                                   train_config=train_config, checkpoints=checkpoints,
                                   prompts=world_prompts(args.concept, n=args.prompts), detector=detector,
                                   settings=GenerationSettings(num_inference_steps=args.eval_steps))
        total = time.perf_counter() - start
        log = [json.loads(line) for line in (Path(tmp) / "run" / "train" / "log.jsonl").read_text().splitlines()]
    curve = ", ".join(f"{p['step']}: {100 * p['detection']:.0f}%" for p in record["curve"])
    print(f"model + detector load: {loaded:.1f} s")
    print(f"LoRA attack, {args.steps} steps + curve at {len(checkpoints)} checkpoints x {args.prompts} images: "
          f"{total:.1f} s (goal <= 180 s); training loop alone (incl. curve calls) {log[-1]['elapsed']:.1f} s")
    print(f"recovery curve ({args.concept}): {curve}")


if __name__ == "__main__":
    main()
