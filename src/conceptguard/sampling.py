"""Seeded image generation shared by every command that looks at a model's outputs.

Image ``i`` of a call is drawn with its own generator seeded ``seed + i``, so an image depends only
on (model, prompt, seed, index) — not on the batch size or on how the work is sharded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


@torch.no_grad()
def generate_images(pipe, prompts: Sequence[str], *, seeds: Sequence[int] | None = None, seed: int = 0,
                    num_inference_steps: int = 25, guidance_scale: float = 7.5, batch_size: int = 64,
                    negative_prompts: Sequence[str] | None = None, progress: bool = True) -> np.ndarray:
    """Generate one image per prompt; returns uint8 (N, H, W, 3)."""
    prompts = list(prompts)
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError("need one seed per prompt")
    device = pipe.device if hasattr(pipe, "device") else "cpu"
    out = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generating", disable=not progress or len(starts) < 2):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[chunk]]
        kwargs = {}
        if negative_prompts is not None:
            kwargs["negative_prompt"] = list(negative_prompts[chunk])
        images = pipe(prompts[chunk], generator=generators, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, output_type="np", **kwargs).images
        out.append((np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8))
    del device
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)
