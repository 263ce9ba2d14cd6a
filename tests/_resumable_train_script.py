"""A toy training run for tests/test_training_loop.py; the kill-and-resume test runs it as a subprocess.

    python tests/_resumable_train_script.py RUN_DIR OUT [--resume] [--steps 60] [--sleep 0.01]
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 tests/_resumable_train_script.py ...   # DDP on CPU

Trains :class:`ToyRecipe` with the shared loop and, once ``train`` returns, writes the final
trainable parameters and EMA state to OUT (safetensors) and a one-line JSON summary to stdout.
The test module imports :class:`ToyRecipe` from here too.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import numpy as np
import torch
from safetensors.torch import save_file

from conceptguard.training import TrainConfig, train


class ToyRecipe:
    """A small MLP with dropout regressing a random linear map from noisy samples.

    Batches come from the loop's generator as the protocol asks; on top of that the recipe
    deliberately touches the global torch (dropout), numpy and python RNGs, so that the resume test
    also proves the checkpoints restore those. It keeps an EMA of its weights to exercise the
    ``on_optimizer_step`` / ``state_dict`` / ``load_state_dict`` hooks.
    """

    def __init__(self, *, batch: int = 16, dim: int = 8, hidden: int = 32, dropout: float = 0.1,
                 micro_batches: int = 1, sleep: float = 0.0, ema_decay: float = 0.9):
        self.batch, self.dim, self.hidden, self.dropout = batch, dim, hidden, dropout
        self.micro_batches = micro_batches  # sub-batches averaged inside one loss call
        self.sleep = sleep  # slows steps down so that a kill lands mid-run
        self.ema_decay = ema_decay
        self.optimizer_steps: list[int] = []

    def setup(self, accelerator) -> None:
        # Drawn from the global RNG that the loop has just seeded, so the init is reproducible.
        self.model = torch.nn.Sequential(
            torch.nn.Linear(self.dim, self.hidden), torch.nn.GELU(), torch.nn.Dropout(self.dropout),
            torch.nn.Linear(self.hidden, self.dim))
        self.target = torch.randn(self.dim, self.dim).to(accelerator.device)
        self.device = accelerator.device
        self.accelerator = accelerator
        self.model = accelerator.prepare(self.model)
        self.ema = {name: p.detach().clone() for name, p in self.trainable_parameters().items()}

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.accelerator.unwrap_model(self.model).named_parameters())

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        if self.sleep:
            time.sleep(self.sleep)
        return sum(self._batch_loss(generator) for _ in range(self.micro_batches)) / self.micro_batches

    def _batch_loss(self, generator: torch.Generator) -> torch.Tensor:
        x = torch.randn(self.batch, self.dim, generator=generator).to(self.device)
        noise_scale = 0.01 * (1.0 + np.random.rand() + random.random())
        y = x @ self.target + noise_scale * torch.randn(self.batch, self.dim, generator=generator).to(self.device)
        return torch.nn.functional.mse_loss(self.model(x).float(), y)

    def on_optimizer_step(self, step: int) -> None:
        self.optimizer_steps.append(step)
        with torch.no_grad():
            for name, p in self.trainable_parameters().items():
                self.ema[name].lerp_(p, 1.0 - self.ema_decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{name}": t for name, t in self.ema.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.ema:
            self.ema[name].copy_(state[f"ema.{name}"])


def resume_test_config(steps: int) -> TrainConfig:
    """Exercises warmup + cosine, AdamW with weight decay, accumulation and clipping."""
    return TrainConfig(
        steps=steps, lr=3e-3, optimizer="adamw", weight_decay=0.01, lr_schedule="cosine", warmup_steps=5,
        grad_accum=2, max_grad_norm=0.5, seed=1234, checkpoint_every=7, keep_checkpoints=2, log_every=1,
        progress=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sleep", type=float, default=0.01)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the test machine is small and busy

    recipe = ToyRecipe(sleep=args.sleep)
    result = train(recipe, resume_test_config(args.steps), args.run_dir, resume=args.resume,
                   resolved_config={"method": "toy"})
    if recipe.accelerator.is_main_process:  # under torchrun every process gets here
        final = {f"param.{name}": p.detach() for name, p in recipe.trainable_parameters().items()}
        final.update(recipe.state_dict())
        save_file({name: t.contiguous() for name, t in final.items()}, args.out)
        print(json.dumps({"start_step": result.start_step, "steps_done": result.steps_done,
                          "final_loss": result.final_loss, "num_processes": recipe.accelerator.num_processes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
