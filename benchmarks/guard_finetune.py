"""Memory and time of guarded fine-tuning vs full fine-tuning, at several freeze ratios (paper Table 3).

    OMP_NUM_THREADS=1 python benchmarks/guard_finetune.py                       # embedded world model
    python benchmarks/guard_finetune.py --world-assets /tmp/wsmoke3/world --steps 30
    python benchmarks/guard_finetune.py --model path/to/sd15 --device cuda --mask guard.safetensors

Each ratio runs in its own process, so that one run's peak memory cannot hide another's. Reported:

- ``state MB``: what freezing saves by construction, counted exactly — gradients plus optimizer
  state (AdamW: two moments) of the trainable tensors;
- ``peak MB``: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the process's peak resident
  memory during training minus its resident memory before (weights, data and imports excluded);
- ``s/step``: median wall time of an optimizer step (the first steps are left out as warm-up).

Masks are Random-ρ masks (the cost depends on which tensors are frozen only through their sizes),
or the learned masks given with ``--mask``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.8)


def _rss_mb() -> float:
    """Current resident memory of this process (Linux /proc; ru_maxrss only gives the peak)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _load(args):
    import torch

    if args.model == "tiny":
        from conceptguard.models.tiny import build_tiny_pipeline

        return build_tiny_pipeline("sd1").to(args.device)
    if args.model == "embedded" and args.world_assets:
        from conceptguard.world import load_embedded_pipeline

        return load_embedded_pipeline(device=args.device, assets=Path(args.world_assets))
    from conceptguard.models.io import load_pipeline

    return load_pipeline(args.model, device=args.device, torch_dtype=torch.float32)


def _data(pipe, n: int):
    import numpy as np
    from PIL import Image

    from conceptguard.diffusion import image_size
    from conceptguard.world.dataset import generate

    size = image_size(pipe)
    samples = generate(n, seed=0, split="held_out_characters")
    return [(np.asarray(Image.fromarray(s.image).resize((size, size), Image.BICUBIC)), s.caption) for s in samples]


def worker(args) -> dict:
    """One fine-tuning run at one ratio (or under one mask file); returns its measurements."""
    import torch

    from conceptguard.finetune import FinetuneConfig, finetune
    from conceptguard.guard.maskfile import random_mask
    from conceptguard.training.loop import TrainConfig

    torch.manual_seed(0)
    pipe = _load(args)
    data = _data(pipe, 16)
    mask = args.mask if args.mask else (random_mask(pipe, args.ratio, seed=0) if args.ratio > 0 else None)
    params = dict(pipe.unet.named_parameters())
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start_memory = torch.cuda.memory_allocated() / 2**20
    else:
        start_memory = _rss_mb()
    with tempfile.TemporaryDirectory() as run_dir:
        finetune(pipe, data, run_dir, guard=mask, config=FinetuneConfig(batch_size=args.batch_size),
                 train_config=TrainConfig(steps=args.steps, lr=1e-5, optimizer="adamw", log_every=1,
                                          checkpoint_every=args.steps, progress=False))
        times = [json.loads(line)["time"] for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20 - start_memory
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - start_memory
    trainable = [p for p in params.values() if p.requires_grad]
    state_bytes = sum(3 * p.numel() * p.element_size() for p in trainable)  # gradient + two AdamW moments
    step_times = [b - a for a, b in zip(times, times[1:])][args.warmup:]
    return {
        "ratio": args.ratio,
        "frozen_tensors": len(params) - len(trainable),
        "total_tensors": len(params),
        "frozen_params": sum(p.numel() for p in params.values() if not p.requires_grad),
        "total_params": sum(p.numel() for p in params.values()),
        "state_mb": state_bytes / 2**20,
        "peak_mb": peak,
        "s_per_step": statistics.median(step_times) if step_times else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded", help="embedded, tiny, or a pipeline folder / file")
    parser.add_argument("--world-assets", default=None, help="world assets folder (e.g. a smoke build)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--mask", nargs="*", default=[], help="learned mask files to measure as well")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ratio", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.mask = args.mask[0] if args.mask else None
        print(json.dumps(worker(args)))
        return

    common = ["--model", args.model, "--device", args.device, "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--batch-size", str(args.batch_size)]
    if args.world_assets:
        common += ["--world-assets", args.world_assets]
    runs = [(f"{'Full FT' if r == 0 else f'Random-{100 * r:g}%'}", ["--ratio", str(r)]) for r in args.ratios]
    runs += [(Path(m).name, ["--mask", m]) for m in args.mask]
    rows = []
    for label, extra in runs:
        out = subprocess.run([sys.executable, __file__, "--worker", *common, *extra], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        if out.returncode != 0:
            sys.exit(f"{label} failed:\n{out.stderr[-2000:]}")
        rows.append((label, json.loads(out.stdout.strip().splitlines()[-1])))
        print(f"measured {label}", file=sys.stderr)

    full = rows[0][1] if rows and rows[0][1]["frozen_tensors"] == 0 else None
    memory = "peak MB (CUDA allocated)" if args.device.startswith("cuda") else "peak MB (RSS over start)"
    print(f"model {args.model}, device {args.device}, batch {args.batch_size}, {args.steps} steps per run")
    print()
    print(f"| run | frozen tensors | frozen params | state MB | {memory} | s/step | time vs Full FT |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in rows:
        relative = f"{100 * (r['s_per_step'] / full['s_per_step'] - 1):+.0f}%" if full else "–"
        print(f"| {label} | {r['frozen_tensors']}/{r['total_tensors']} | "
              f"{100 * r['frozen_params'] / r['total_params']:.1f}% | {r['state_mb']:.1f} | {r['peak_mb']:.1f} | "
              f"{r['s_per_step']:.3f} | {relative} |")


if __name__ == "__main__":
    main()
