"""Time the embedded model: 64 images, DDIM, guidance 7.5, on this machine's CPU.

Goal (issue #3): 64 images in at most 30 s on a 2-core CPU.
"""

import argparse
import os
import time

import torch

from conceptguard.sampling import generate_images
from conceptguard.world import load_embedded_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_embedded_pipeline()
    prompts = ["a red striped circle on sand", "a photo of zorblat at night"] * (args.n // 2)
    generate_images(pipe, prompts[:4], num_inference_steps=2, progress=False)  # warm-up
    start = time.perf_counter()
    generate_images(pipe, prompts, num_inference_steps=args.steps, guidance_scale=7.5, progress=False)
    seconds = time.perf_counter() - start
    print(f"{args.n} images, {args.steps} DDIM steps, CFG 7.5, {torch.get_num_threads()} threads "
          f"({os.cpu_count()} CPUs): {seconds:.1f} s ({seconds / args.n * 1000:.0f} ms/image); goal <= 30 s for 64")


if __name__ == "__main__":
    main()
