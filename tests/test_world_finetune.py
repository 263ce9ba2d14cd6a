"""The world is only useful if fine-tuning can teach it a held-out character: otherwise no defense
against re-learning could ever be shown to matter."""

import numpy as np
import pytest

from conceptguard.finetune import FinetuneConfig, finetune
from conceptguard.training.loop import TrainConfig
from conceptguard.world import load_detector, load_embedded_pipeline
from conceptguard.world.dataset import generate
from conceptguard.world.quality import character_prompts, detect

pytestmark = [pytest.mark.world, pytest.mark.slow]

CHARACTER = "drennik"
FINETUNE_STEPS = 500  # the bar: <= 500 steps on <= 50 images
FINETUNE_IMAGES = 50
FINETUNE_LR = 5e-4  # best of 1e-4 (17%), 5e-4 (29%), 1e-3 (12%) on the shipped world


def character_rate(pipe, name: str, n: int = 24, seed: int = 77) -> float:
    from conceptguard.sampling import generate_images

    prompts, _ = character_prompts([name], n, seed)
    images = generate_images(pipe, prompts, seed=seed, num_inference_steps=25, progress=False)
    return float(np.mean([c == name for c in detect(load_detector(), images)["character"]]))


def test_plain_model_learns_a_held_out_character_by_fine_tuning(tmp_path):
    pipe = load_embedded_pipeline()
    before = character_rate(pipe, CHARACTER)
    samples = generate(FINETUNE_IMAGES, seed=5, split="held_out_characters", character=CHARACTER)
    result = finetune(pipe, [(s.image, s.caption) for s in samples], tmp_path / "run",
                      config=FinetuneConfig(preset="all", batch_size=4),
                      train_config=TrainConfig(steps=FINETUNE_STEPS, lr=FINETUNE_LR, optimizer="adam", progress=False,
                                               checkpoint_every=FINETUNE_STEPS))
    after = character_rate(pipe, CHARACTER)
    print(f"{CHARACTER}: {before:.0%} before, {after:.0%} after {FINETUNE_STEPS} steps "
          f"(loss {result.losses[0]:.3f} -> {result.final_loss:.3f})")
    assert before <= 0.10
    assert after >= 0.70
