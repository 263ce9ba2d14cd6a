"""SDD: the self-distillation loss and its stop-gradient, the EMA teacher, exact resume, every family.

Tiny random-init pipelines throughout; the effect test at the end needs the trained embedded world
(``-m world``).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conceptguard.diffusion import encode_prompts
from conceptguard.methods import apply_method
from conceptguard.models.params import select_for
from conceptguard.methods.sdd import I2P_CONCEPTS, SDDConfig, SDDRecipe, apply
from conceptguard.methods.trajectory import empty_conditioning
from conceptguard.models.tiny import build_tiny_pipeline
from conceptguard.training import TrainConfig, latest_checkpoint, train


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # accelerate's process-wide state, reset


def quick(**overrides) -> TrainConfig:
    values = dict(steps=3, lr=1e-3, optimizer="adamw", max_grad_norm=1.0, progress=False, log_every=1)
    values.update(overrides)
    return TrainConfig(**values)


def ready_recipe(pipe, config: SDDConfig) -> SDDRecipe:
    from accelerate import Accelerator

    recipe = SDDRecipe(pipe, config, list(select_for(pipe.unet, config)))
    recipe.setup(Accelerator(cpu=True))
    return recipe


def eps(unet, pipe, latents, timestep, prompt):
    cond = empty_conditioning(pipe) if prompt is None else encode_prompts(pipe, [prompt])
    return unet(latents, timestep, encoder_hidden_states=cond.embeds, added_cond_kwargs=cond.added_cond_kwargs()).sample


# --- the loss ---------------------------------------------------------------------------------------


def test_loss_and_gradients_follow_the_hand_formula_with_stop_gradient():
    pipe = build_tiny_pipeline("sd1")
    recipe = ready_recipe(pipe, SDDConfig(concepts=["a cat", "a dog"]))
    params = recipe.trainable_parameters()
    generator_seed = 4

    loss = recipe.loss(1, torch.Generator().manual_seed(generator_seed))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None

    _, sample = recipe.draw(torch.Generator().manual_seed(generator_seed))
    x, t = sample.latents, sample.timestep
    conditional = eps(pipe.unet, pipe, x, t, "a cat, a dog")  # ALL concepts, joined
    unconditional = eps(pipe.unet, pipe, x, t, None)
    expected = F.mse_loss(conditional, unconditional.detach())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    expected.backward(retain_graph=True)
    for name, param in params.items():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-10)

    # Without the stop-gradient the ∅ branch would add gradients of its own: the check above can see it.
    for p in params.values():
        p.grad = None
    F.mse_loss(conditional, unconditional).backward()
    assert any(not torch.allclose(grads[n], p.grad, rtol=1e-3, atol=1e-10) for n, p in params.items())


def test_latent_is_sampled_by_the_teacher_from_one_concept():
    pipe = build_tiny_pipeline("sd1")
    recipe = ready_recipe(pipe, SDDConfig(concepts=["a cat", "a dog", "a car"], ddim_steps=6))
    # Make student and teacher differ, so using the wrong one shows.
    with torch.no_grad():
        for p in recipe.trainable_parameters().values():
            p.mul_(1.5)
    for seed in range(4):
        index, sample = recipe.draw(torch.Generator().manual_seed(seed))
        generator = torch.Generator().manual_seed(seed)
        assert int(torch.randint(0, 3, (1,), generator=generator)) == index
        replay = recipe.sampler.sample(recipe.teacher_predict, encode_prompts(pipe, [recipe.config.concepts[index]]),
                                       recipe.empty, generator, recipe.shape, device="cpu")
        assert replay.steps_done == sample.steps_done
        torch.testing.assert_close(sample.latents, replay.latents, rtol=0, atol=0)


def test_code_variant_samples_from_all_concepts_and_conditions_on_one():
    """multi_concept="code" (the public code): z_t from the joined prompt, the loss on the drawn concept."""
    pipe = build_tiny_pipeline("sd1")
    recipe = ready_recipe(pipe, SDDConfig(concepts=["a cat", "a dog", "a car"], ddim_steps=6, multi_concept="code"))
    seed = 5
    loss = recipe.loss(1, torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed)
    index = int(torch.randint(0, 3, (1,), generator=generator))
    replay = recipe.sampler.sample(recipe.teacher_predict, encode_prompts(pipe, ["a cat, a dog, a car"]),
                                   recipe.empty, generator, recipe.shape, device="cpu")
    x, t = replay.latents, replay.timestep
    expected = F.mse_loss(eps(pipe.unet, pipe, x, t, recipe.config.concepts[index]), eps(pipe.unet, pipe, x, t, None))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="multi_concept"):
        SDDConfig(concepts=["a cat"], multi_concept="both")


def test_k_zero_returns_the_initial_noise():
    """The public SDD code never stops early for k = 0; here x_t is then x_T itself."""
    pipe = build_tiny_pipeline("sd1")
    recipe = ready_recipe(pipe, SDDConfig(concepts=["a cat"]))

    def must_not_run(*args):
        raise AssertionError("k = 0 ran the model")

    sample = recipe.sampler.sample(must_not_run, recipe.cond[0], recipe.empty, torch.Generator().manual_seed(3),
                                   recipe.shape, device="cpu", k=0)
    x_T = torch.randn(recipe.shape, generator=torch.Generator().manual_seed(3))
    assert sample.steps_done == 0
    torch.testing.assert_close(sample.latents, x_T, rtol=0, atol=0)
    assert 980 <= int(sample.timestep) <= 999


def test_defaults_are_the_papers():
    config = SDDConfig()
    assert config.concepts == list(I2P_CONCEPTS) and len(I2P_CONCEPTS) == 20
    assert (config.variant, config.ema_decay, config.ddim_steps, config.sample_guidance) == ("x", 0.999, 50, 3.0)
    train_defaults = SDDConfig.default_train
    assert train_defaults["steps"] == 1500 and train_defaults["optimizer"] == "adamw"
    assert train_defaults["lr_schedule"] == "cosine" and train_defaults["warmup_steps"] == 500
    assert train_defaults["weight_decay"] == 1e-2 and tuple(train_defaults["betas"]) == (0.9, 0.999)
    assert config.joined_prompt.startswith("hate, harassment, violence")


# --- the EMA teacher --------------------------------------------------------------------------------


class RecordingSDD(SDDRecipe):
    """Keeps a copy of the student after every optimizer step, before the EMA update."""

    def on_optimizer_step(self, step: int) -> None:
        self.trajectory.append({n: p.detach().clone() for n, p in self.trainable_parameters().items()})
        super().on_optimizer_step(step)


def test_saved_model_is_the_ema_of_the_student_trajectory(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    config = SDDConfig(concepts=["a cat"], ema_decay=0.8, ddim_steps=5)
    names = list(select_for(pipe.unet, config))
    initial = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if n in names}
    recipe = RecordingSDD(pipe, config, names)
    recipe.trajectory = []
    train(recipe, quick(steps=5, lr=1e-2), tmp_path)
    recipe.copy_teacher_into_model()

    expected = dict(initial)
    for student in recipe.trajectory:
        expected = {n: 0.8 * expected[n] + 0.2 * student[n] for n in names}
    live = dict(pipe.unet.named_parameters())
    for name in names:
        torch.testing.assert_close(live[name].detach(), expected[name], rtol=1e-6, atol=1e-7)
    assert any(not torch.allclose(live[n], recipe.trajectory[-1][n]) for n in names)  # the teacher, not the student


def test_apply_saves_the_teacher_and_resume_is_bit_identical(tmp_path):
    config = SDDConfig(concepts=["a cat", "a dog"], ema_decay=0.9, ddim_steps=5)
    settings = dict(lr=1e-2, lr_schedule="constant", warmup_steps=0, checkpoint_every=2)

    straight = build_tiny_pipeline("sd1")
    result = apply(straight, config, run_dir=tmp_path / "straight", train_config=quick(steps=4, **settings))
    ema = load_file(latest_checkpoint(tmp_path / "straight") / "recipe.safetensors")
    live = dict(straight.unet.named_parameters())
    assert set(result.changed) == {f"unet.{name[len('ema.'):]}" for name in ema}
    for key, value in ema.items():
        assert torch.equal(live[key[len("ema."):]].detach(), value)

    apply(build_tiny_pipeline("sd1"), config, run_dir=tmp_path / "split", train_config=quick(steps=2, **settings))
    resumed = build_tiny_pipeline("sd1")
    apply(resumed, config, run_dir=tmp_path / "split", resume=True, train_config=quick(steps=4, **settings))
    for name, param in resumed.unet.named_parameters():
        assert torch.equal(param, live[name]), name


# --- end to end ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_short_run_on_every_family(family, tmp_path):
    pipe = build_tiny_pipeline(family)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    result = apply(pipe, SDDConfig(concepts=["a cat", "a dog"], ddim_steps=10), run_dir=tmp_path,
                   train_config=quick(steps=3))
    changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".attn2." in n for n in changed)
    assert np.isfinite(result.metrics["final_loss"])


def test_apply_method_uses_the_paper_recipe_and_shortens_only_a_default_warmup(tmp_path, monkeypatch):
    from conceptguard.methods.trajectory import train_config_with_defaults

    seen = {}

    def fake_train(recipe, config, run_dir, **kwargs):
        seen["config"] = config
        raise RuntimeError("stop")

    monkeypatch.setattr("conceptguard.training.loop.train", fake_train)
    with pytest.raises(RuntimeError, match="stop"):
        apply_method(build_tiny_pipeline("sd1"), "sdd", concepts=["a cat"], run_dir=tmp_path)
    config = seen["config"]
    assert (config.steps, config.warmup_steps, config.lr_schedule, config.weight_decay) == (1500, 500, "cosine", 1e-2)
    assert train_config_with_defaults(SDDConfig.default_train, {"steps": 5}).warmup_steps == 5
    with pytest.raises(Exception, match="warmup_steps"):
        train_config_with_defaults(SDDConfig.default_train, {"steps": 5, "warmup_steps": 9})


def test_a_truncated_joined_prompt_is_reported(caplog):
    pipe = build_tiny_pipeline("sd1")  # its tokenizer reads 16 tokens
    with caplog.at_level("WARNING", logger="conceptguard.methods.sdd"):
        SDDRecipe(pipe, SDDConfig(concepts=["cat", "dog", "car", "tree", "house", "church", "bird", "horse"]),
                  list(select_for(pipe.unet, SDDConfig())))
    assert "cut off" in caplog.text


# --- effects on the embedded world (needs the trained world: -m world) ------------------------------



@pytest.mark.world
@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "not reproduced on the embedded world (issue #5 open): the paper's rule leaves all five characters at 100% "
    "(250 steps at 3e-4, 600 at 3e-4, x-strict 400 at 1e-3, the fast recipe 1000 at 3e-4 with EMA 0.998): its loss "
    "on the joined prompt reaches ~0 (gap 2% of the base's) but the world's cross-attention renders that prompt as "
    "a fixed blend whatever z_t shows, and the edit weakens every prompt alike (targets keep 20-46% of their "
    "conditional gap, the other characters 20-54%, objects 53-62%); the public code's rule removes them only with "
    "collateral damage (x-strict, 1000 steps at 3e-4: 12/0/25/12/38%, other characters 100% -> 80%). "
    "docs/methods/sdd.md"))
def test_world_sdd_removes_five_characters_and_keeps_the_rest(tmp_path):
    from conceptguard.sampling import generate_images
    from conceptguard.world import load_detector, load_embedded_pipeline
    from conceptguard.world.concepts import SEEN_CHARACTERS
    from conceptguard.world.quality import agreement, character_prompts, detect, object_prompts

    targets = list(SEEN_CHARACTERS[:5])
    target_prompts, target_labels = character_prompts(targets, 8, seed=1)
    keep_chars, keep_char_labels = character_prompts(SEEN_CHARACTERS[5:], 4, seed=1)
    keep_objs, keep_obj_labels = object_prompts(2, seed=1)
    detector = load_detector()

    def measure(pipe):
        images = generate_images(pipe, target_prompts + keep_chars + keep_objs, seed=0, num_inference_steps=25,
                                 guidance_scale=7.5, progress=False)
        found = detect(detector, images)
        n, m = len(target_prompts), len(keep_chars)
        per_target = [agreement(found["character"][i * 8:(i + 1) * 8], target_labels[i * 8:(i + 1) * 8], "character")
                      for i in range(len(targets))]
        kept = np.mean([found["character"][n + i] == lab["character"] for i, lab in enumerate(keep_char_labels)]
                       + [found["shape"][n + m + i] == lab["shape"] for i, lab in enumerate(keep_obj_labels)])
        return per_target, float(kept)

    pipe = load_embedded_pipeline()
    targets_before, kept_before = measure(pipe)
    assert np.mean(targets_before) >= 0.8, "the world model should draw the characters before removal"
    started = time.time()
    # The paper's rule and fast recipe (constant lr, faster EMA) cut to 250 steps (~0.7-2 s each on one CPU
    # core, mostly the teacher's sampler): a larger lr and an EMA with a 100-step horizon to match.
    apply(pipe, SDDConfig(concepts=targets, ema_decay=0.99), run_dir=tmp_path / "run",
          train_config=TrainConfig(steps=250, lr=3e-4, optimizer="adamw", weight_decay=1e-2, lr_schedule="constant",
                                   progress=False))
    print(f"SDD, five concepts, 250 steps: {time.time() - started:.0f} s")
    per_target, kept_after = measure(pipe)
    print(f"targets {dict(zip(targets, per_target))}; kept {kept_before:.3f} -> {kept_after:.3f}")
    assert max(per_target) <= 0.15, dict(zip(targets, per_target))
    assert kept_before - kept_after <= 0.08, (kept_before, kept_after)
