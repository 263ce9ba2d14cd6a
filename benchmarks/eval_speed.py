"""Time `evaluate` on the embedded model: one erased concept, the default quick set (<= 256 images).

Goal (issue #4): at most 90 s on a 2-core CPU for the model alone (add --with-base to also draw
the base model's images, which doubles the generation). Prints the split between generation and
scoring; the numbers come from the run's timing.json.

    OMP_NUM_THREADS=1 python benchmarks/eval_speed.py [--concept halo] [--steps 25] [--assets DIR]
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from conceptguard.evaluation.harness import evaluate
from conceptguard.evaluation.sources import PipelineSource
from conceptguard.world import ASSETS_DIR, load_embedded_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="halo")
    parser.add_argument("--prompts", default="quick")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--with-base", action="store_true", help="also generate the base model's images")
    parser.add_argument("--assets", default=None, help="world assets folder (default: the shipped ones)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    assets = Path(args.assets) if args.assets else ASSETS_DIR
    start = time.perf_counter()
    pipe = load_embedded_pipeline(assets=assets)
    loaded = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as out:
        result = evaluate(PipelineSource(pipe), erase=[args.concept], prompt_set=args.prompts,
                          base_source=PipelineSource(pipe, "base") if args.with_base else None,
                          num_inference_steps=args.steps, batch_size=args.batch_size, out_dir=out,
                          world_assets=assets)
        timing = json.loads((Path(out) / "timing.json").read_text())
    total = timing["total_seconds"]
    print(f"{len(result['images'])} prompts, {timing['images']} images, {args.steps} DDIM steps, CFG 7.5, "
          f"{torch.get_num_threads()} threads ({os.cpu_count()} CPUs): {total:.1f} s "
          f"(generation {timing['generation_seconds']:.1f} s, scoring and writing "
          f"{total - timing['generation_seconds']:.1f} s; model loading {loaded:.1f} s); goal <= 90 s")


if __name__ == "__main__":
    main()
