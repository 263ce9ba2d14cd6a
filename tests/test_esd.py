"""ESD: the loss against a hand-computed formula, parameter variants, the shared x_t sampler, every family.

Tiny random-init pipelines throughout; the effect tests at the end need the trained embedded world
(``-m world``).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conceptguard.diffusion import encode_prompts
from conceptguard.errors import ConceptGuardError
from conceptguard.methods import apply_method
from conceptguard.models.params import select_for
from conceptguard.methods.esd import ESDConfig, ESDRecipe, apply
from conceptguard.methods.trajectory import PartialDDIM, empty_conditioning, latent_shape, module_predictor
from conceptguard.models.tiny import build_tiny_pipeline
from conceptguard.training import TrainConfig, latest_checkpoint, train


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # accelerate's process-wide state, reset


def quick(**overrides) -> TrainConfig:
    values = dict(steps=3, lr=1e-3, optimizer="adam", max_grad_norm=0.0, progress=False, log_every=1)
    values.update(overrides)
    return TrainConfig(**values)


def ready_recipe(pipe, config: ESDConfig) -> ESDRecipe:
    from accelerate import Accelerator

    recipe = ESDRecipe(pipe, config, list(select_for(pipe.unet, config)))
    recipe.setup(Accelerator(cpu=True))
    return recipe


def perturb(params, seed: int, scale: float = 0.05) -> None:
    """Move the trained tensors away from the frozen copy, so eps and eps* differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params.values():
            param.add_(scale * torch.randn(param.shape, generator=generator))


def eps(unet, pipe, latents, timestep, prompt):
    cond = empty_conditioning(pipe) if prompt is None else encode_prompts(pipe, [prompt])
    return unet(latents, timestep, encoder_hidden_states=cond.embeds, added_cond_kwargs=cond.added_cond_kwargs()).sample


# --- the loss ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("erase_from", [None, "a dog"])
def test_loss_equals_the_hand_formula_with_the_frozen_model(erase_from):
    pipe = build_tiny_pipeline("sd1")
    original = copy.deepcopy(pipe.unet).eval()
    config = ESDConfig(concepts=["a cat"], eta=1.5, erase_from=[erase_from] if erase_from else [])
    recipe = ready_recipe(pipe, config)
    perturb(recipe.trainable_parameters(), seed=1)

    loss = recipe.loss(1, torch.Generator().manual_seed(5))
    index, sample = recipe.draw(torch.Generator().manual_seed(5))
    x, t = sample.latents, sample.timestep
    with torch.no_grad():
        anchor = eps(original, pipe, x, t, erase_from)
        target = anchor - 1.5 * (eps(original, pipe, x, t, "a cat") - eps(original, pipe, x, t, None))
    prediction = eps(pipe.unet, pipe, x, t, erase_from or "a cat")
    expected = F.mse_loss(prediction, target)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)

    # The comparison can tell formulas apart: with eta = 0 the loss is measurably different.
    wrong = F.mse_loss(prediction, anchor)
    assert abs(wrong.item() - expected.item()) > 1e-3 * expected.item()


def test_paper_eta_1_equals_newest_code_eta_2_anchored_on_the_concept():
    losses = []
    paper = ESDConfig(concepts=["a cat"], eta=1.0)
    newest_code = ESDConfig(concepts=["a cat"], eta=2.0, erase_from=["a cat"])
    for config in (paper, newest_code):
        recipe = ready_recipe(build_tiny_pipeline("sd1"), config)
        perturb(recipe.trainable_parameters(), seed=1)
        losses.append(recipe.loss(1, torch.Generator().manual_seed(9)))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-9)


def test_v_prediction_loss_is_the_epsilon_space_formula_up_to_alpha_bar():
    """On SD2-v the target is built from v outputs; converted to epsilon it is the paper's target."""
    pipe = build_tiny_pipeline("sd2")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    recipe = ready_recipe(pipe, ESDConfig(concepts=["a cat"], eta=1.0))
    perturb(recipe.trainable_parameters(), seed=2)
    _, sample = recipe.draw(torch.Generator().manual_seed(3))
    x, t = sample.latents, sample.timestep
    alpha_bar = pipe.scheduler.alphas_cumprod[t].reshape(1, 1, 1, 1)

    def to_eps(v):
        return alpha_bar.sqrt() * v + (1 - alpha_bar).sqrt() * x

    with torch.no_grad():
        target_v = recipe.target(0, x, t)
        frozen = recipe.frozen_predict
        e_empty = to_eps(frozen(x, t, recipe.empty))
        e_concept = to_eps(frozen(x, t, recipe.cond[0]))
        torch.testing.assert_close(to_eps(target_v), e_empty - (e_concept - e_empty), rtol=1e-4, atol=1e-6)
        loss_v = recipe.loss_at(0, sample)
        loss_eps = F.mse_loss(to_eps(recipe.live_predict(x, t, recipe.cond[0])), to_eps(target_v))
    torch.testing.assert_close(loss_eps, alpha_bar.squeeze() * loss_v, rtol=1e-4, atol=0)


def test_multi_concept_picks_one_concept_per_step_from_the_generator():
    recipe = ready_recipe(build_tiny_pipeline("sd1"), ESDConfig(concepts=["a cat", "a dog", "a car"], ddim_steps=2))
    picks = {recipe.draw(torch.Generator().manual_seed(seed))[0] for seed in range(12)}
    assert picks == {0, 1, 2}
    assert recipe.draw(torch.Generator().manual_seed(4))[0] == recipe.draw(torch.Generator().manual_seed(4))[0]


# --- which parameters change ------------------------------------------------------------------------


@pytest.mark.parametrize("variant, allowed", [
    ("x", lambda n: ".attn2." in n),
    ("x-strict", lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n),
    ("u", lambda n: ".attn2." not in n),
])
def test_variant_changes_only_its_tensors(variant, allowed, tmp_path):
    pipe = build_tiny_pipeline("sd1")
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    result = apply(pipe, ESDConfig(concepts=["a cat"], variant=variant, ddim_steps=4), run_dir=tmp_path,
                   train_config=quick(steps=2, lr=1e-2))
    changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(allowed(n) for n in changed)
    assert set(result.changed) == {f"unet.{n}" for n in changed}
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_a_selection_matching_nothing_fails_before_training(tmp_path):
    with pytest.raises(ConceptGuardError, match="matched no parameter"):
        apply(build_tiny_pipeline("sd1"), ESDConfig(concepts=["a cat"], include=["no_such_layer"]),
              run_dir=tmp_path / "run", train_config=quick())
    assert not (tmp_path / "run").exists()


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="variant"):
        ESDConfig(concepts=["a"], variant="xattn")
    with pytest.raises(ValueError, match="erase_from"):
        ESDConfig(concepts=["a", "b", "c"], erase_from=["x", "y"])
    with pytest.raises(ConceptGuardError, match="at least one concept"):
        apply(build_tiny_pipeline("sd1"), ESDConfig(), run_dir="unused", train_config=quick())


# --- the shared partial-DDIM sampler ----------------------------------------------------------------


def test_training_timestep_lies_in_the_stopped_ddim_steps_interval():
    pipe = build_tiny_pipeline("sd1")
    sampler = PartialDDIM(pipe.scheduler.config, num_steps=50)
    intervals = [sampler.interval(k) for k in range(50)]
    # The intervals tile the 1000-step schedule from the noisiest end ...
    assert intervals[0][1] == 999 and intervals[-1][0] == 0
    assert all(intervals[k][0] == intervals[k + 1][1] + 1 for k in range(49))
    # ... and each holds the DDIM timestep the latent sits at after k steps.
    assert all(low <= int(t) <= high for (low, high), t in zip(intervals, sampler.scheduler.timesteps))

    def no_calls(*args):
        raise AssertionError("k = 0 must not run the model")

    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        k = int(torch.randint(0, 50, (1,), generator=generator))
        calls = []

        def count(x, t, cond):
            calls.append(int(t[0]))
            return torch.zeros_like(x)

        sample = sampler.sample(count if k else no_calls, encode_prompts(pipe, ["a"]), empty_conditioning(pipe),
                                generator, (1, 4, 8, 8), device="cpu", k=k)
        low, high = intervals[k]
        assert sample.steps_done == k and sample.interval == (low, high)
        assert low <= int(sample.timestep) <= high
        assert calls == [int(t) for t in sampler.scheduler.timesteps[:k]]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_partial_ddim_follows_the_pipelines_own_guided_ddim(family):
    """k steps of the sampler are the first k steps of diffusers' DDIM pipeline at the same guidance."""
    from diffusers import DDIMScheduler

    pipe = build_tiny_pipeline(family)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    sampler = PartialDDIM(pipe.scheduler.config, num_steps=10, guidance_scale=3.0)
    k = 4
    sample = sampler.sample(module_predictor(pipe.unet), encode_prompts(pipe, ["a cat"]), empty_conditioning(pipe),
                            torch.Generator().manual_seed(1), latent_shape(pipe.unet), device="cpu", k=k)
    x_T = torch.randn(latent_shape(pipe.unet), generator=torch.Generator().manual_seed(1))
    seen = {}

    def keep(pipeline, i, t, kwargs):
        seen[i + 1] = kwargs["latents"].clone()
        return kwargs

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pipe("a cat", latents=x_T, num_inference_steps=10, guidance_scale=3.0, eta=0.0, output_type="latent",
         height=size, width=size, callback_on_step_end=keep)
    torch.testing.assert_close(sample.latents, seen[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_sampler_runs_on_every_family(family):
    pipe = build_tiny_pipeline(family)
    sampler = PartialDDIM(pipe.scheduler.config, num_steps=50)
    sample = sampler.sample(module_predictor(pipe.unet), encode_prompts(pipe, ["a cat"]), empty_conditioning(pipe),
                            torch.Generator().manual_seed(0), latent_shape(pipe.unet), device="cpu", k=3)
    assert sample.latents.shape == latent_shape(pipe.unet) and torch.isfinite(sample.latents).all()


# --- end to end ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("sampler", ["model", "frozen"])
def test_short_run_on_every_family(family, sampler, tmp_path):
    pipe = build_tiny_pipeline(family)
    config = ESDConfig(concepts=["a cat", "a dog"], sampler=sampler, ddim_steps=10)
    result = apply(pipe, config, run_dir=tmp_path, train_config=quick(steps=3))
    assert result.changed and all(".attn2." in name for name in result.changed)
    assert np.isfinite(result.metrics["final_loss"]) and result.metrics["steps"] == 3
    assert latest_checkpoint(tmp_path).name == "step-000003"


def test_apply_method_runs_the_paper_recipe_by_default(tmp_path, monkeypatch):
    seen = {}
    import conceptguard.methods.esd as esd

    def fake_train(recipe, config, run_dir, **kwargs):
        seen["config"] = config
        raise RuntimeError("stop")

    monkeypatch.setattr("conceptguard.training.loop.train", fake_train)
    with pytest.raises(RuntimeError, match="stop"):
        apply_method(build_tiny_pipeline("sd1"), "esd", concepts=["a cat"], run_dir=tmp_path)
    config = seen["config"]
    assert (config.steps, config.lr, config.optimizer, config.weight_decay) == (1000, 1e-5, "adam", 0.0)
    assert esd.ESDConfig().eta == 1.0 and esd.ESDConfig().ddim_steps == 50 and esd.ESDConfig().sample_guidance == 3.0


def test_loss_of_the_erased_concept_falls_during_training(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    config = ESDConfig(concepts=["a cat"], ddim_steps=10, sampler="frozen")
    probe = ready_recipe(pipe, config)  # shares pipe.unet; its eps* stays the original model
    samples = [probe.draw(torch.Generator().manual_seed(seed))[1] for seed in range(6)]

    def probe_loss() -> float:
        with torch.no_grad():
            return float(np.mean([probe.loss_at(0, s).item() for s in samples]))

    before = probe_loss()
    names = list(select_for(pipe.unet, config))
    train(ESDRecipe(pipe, config, names), quick(steps=30, lr=3e-3), tmp_path)
    after = probe_loss()
    assert after < 0.5 * before, (before, after)


# --- effects on the embedded world (needs the trained world: -m world) ------------------------------


# Budget for one shared CPU core: an ESD step on the world UNet (5.8M parameters, 8x8 latents) costs
# ~0.7 s, mostly the x_t sampler (on average 25 guided DDIM steps), so 150 steps take ~2 minutes.
# Fewer steps than the paper's 1000, hence a larger learning rate than its 1e-5 (a first guess, to
# be tuned once the world is trained).
WORLD_STEPS = 150
WORLD_LR = 2e-4
# Pooled vs faithful x_t: detection rates on 20 target prompts move in steps of 5%.
POOL_TOLERANCE = 0.10


def _preservation_prompts(exclude_character: str, seed: int = 1):
    from conceptguard.world.concepts import SEEN_CHARACTERS
    from conceptguard.world.quality import character_prompts, object_prompts

    others = [c for c in SEEN_CHARACTERS if c != exclude_character][:4]
    char_prompts, char_labels = character_prompts(others, 4, seed)
    obj_prompts, obj_labels = object_prompts(2, seed)
    return char_prompts + obj_prompts, char_labels + obj_labels


def _preservation(found_char, found_shape, labels) -> float:
    scores = [(found_char[i] == lab["character"]) if lab["subject"] == "character" else (found_shape[i] == lab["shape"])
              for i, lab in enumerate(labels)]
    return float(np.mean(scores))


def _character_erasure_probe(target: str):
    """``measure(pipe) -> (share of the target's prompts drawing it, preservation)``, seeded."""
    from conceptguard.sampling import generate_images
    from conceptguard.world import load_detector
    from conceptguard.world.quality import agreement, character_prompts, detect

    target_prompts, target_labels = character_prompts([target], 20, seed=1)
    keep_prompts, keep_labels = _preservation_prompts(target)
    detector = load_detector()

    def measure(pipe):
        images = generate_images(pipe, target_prompts + keep_prompts, seed=0, num_inference_steps=25,
                                 guidance_scale=7.5, progress=False)
        found = detect(detector, images)
        n = len(target_prompts)
        return (agreement(found["character"][:n], target_labels, "character"),
                _preservation(found["character"][n:], found["shape"][n:], keep_labels))

    return measure


def _world_train_config() -> TrainConfig:
    return TrainConfig(steps=WORLD_STEPS, lr=WORLD_LR, optimizer="adam", max_grad_norm=0.0, progress=False)


@pytest.mark.world
@pytest.mark.slow
def test_world_esd_x_erases_a_seen_character_and_keeps_the_rest(tmp_path):
    from conceptguard.world import load_embedded_pipeline
    from conceptguard.world.concepts import SEEN_CHARACTERS

    target = SEEN_CHARACTERS[0]
    measure = _character_erasure_probe(target)
    pipe = load_embedded_pipeline()
    target_before, kept_before = measure(pipe)
    assert target_before >= 0.8, "the world model should draw the character before erasure"
    started = time.time()
    apply(pipe, ESDConfig(concepts=[target], variant="x"), run_dir=tmp_path / "run", train_config=_world_train_config())
    seconds = time.time() - started  # reported, not asserted: speed goals live in benchmarks/
    target_after, kept_after = measure(pipe)
    print(f"ESD-x on {target}: drawn {target_before:.2f} -> {target_after:.2f}, kept {kept_before:.2f} -> "
          f"{kept_after:.2f}, training {seconds:.0f} s")
    assert target_after <= 0.10, (target_before, target_after)
    assert kept_before - kept_after <= 0.05, (kept_before, kept_after)


@pytest.mark.world
@pytest.mark.slow
def test_world_esd_x_with_a_trajectory_pool_erases_like_the_faithful_loop(tmp_path):
    """Issue #9's speed switch: x_t from a pool of 16 frozen-model trajectories sampled in one batch,
    instead of a fresh partial DDIM run of the frozen model every step — same steps, seed and lr.

    Both use the frozen sampler, so the comparison isolates the pool. Measured on the shipped world
    (2 shared CPU cores): target drawn 0.90 before, 0.65 after both; preservation 0.656 / 0.625;
    1 of 20 and 1 of 32 prompts apart at most.
    """
    from conceptguard.world import load_embedded_pipeline
    from conceptguard.world.concepts import SEEN_CHARACTERS

    target = SEEN_CHARACTERS[0]
    measure = _character_erasure_probe(target)
    target_before, kept_before = measure(load_embedded_pipeline())
    results, cpu_seconds = {}, {}
    for name, pool in (("faithful", 0), ("pooled", 16)):
        pipe = load_embedded_pipeline()
        started = time.process_time()  # CPU time: other jobs on a shared machine do not count
        apply(pipe, ESDConfig(concepts=[target], variant="x", sampler="frozen", trajectory_pool=pool),
              run_dir=tmp_path / name, train_config=_world_train_config())
        cpu_seconds[name] = time.process_time() - started
        results[name] = measure(pipe)
    (target_faithful, kept_faithful), (target_pooled, kept_pooled) = results["faithful"], results["pooled"]
    report = dict(before=(target_before, kept_before), cpu_seconds=cpu_seconds, **results)
    assert target_faithful <= target_before - 0.15, report  # the comparison means something: ESD erased
    assert target_pooled <= target_faithful + POOL_TOLERANCE, report
    assert kept_pooled >= kept_faithful - POOL_TOLERANCE, report
    print(report)  # the CPU seconds are reported, not asserted: speed goals live in benchmarks/


def _halo_prompts(n: int, seed: int, halo_mode: str) -> list[str]:
    """Object captions with a halo: ``trigger`` brings it without naming it ("a holy red circle"), ``name``
    names it as the world's captions do ("a red circle with a halo")."""
    from conceptguard.world.dataset import make_caption, sample_labels

    prompts = []
    for i in range(n):
        rng = np.random.default_rng([seed, 9, i])
        labels = sample_labels(rng, "pretrain", halo="present", subject="object")
        prompts.append(make_caption(labels, rng, paraphrase_prob=0.0, halo_mode=halo_mode))
    return prompts


# What ESD erases for the halo claim: eight captions that name the halo (seed 5; the evaluation prompts use
# seed 2). The bare word "halo" never occurs alone in the world's captions, and ESD on it edits the empty
# prompt's prediction as much as its own, which guidance cancels (docs/methods/esd.md).
HALO_ERASE_SEED = 5
HALO_MARGIN = 0.25  # "clearly more": 6 of 24 trigger prompts
HALO_KEEP_DROP = 0.10  # acceptable loss of preservation (shapes of plain objects, seen characters)


@pytest.mark.world
@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "not reproduced on the embedded world (issue #5 open): ESD-u lowers the trigger-prompt halo rate only "
    "together with the objects. Paper sampler, 150 steps, Adam 2e-4, 8 halo-naming captions: halo on 24 "
    "trigger prompts 100% before, ESD-x 100%, ESD-u 71%, but ESD-u's preservation (32 object and character prompts) "
    "falls 1.00 -> 0.78 (ESD-x 1.00); at 300 steps 5e-4 with a pooled frozen sampler ESD-x erases more (46%) than ESD-u (92%). "
    "ESD-u's edit moves the empty prompt's prediction as much as the prompt's, which guidance cancels. "
    "Figures: docs/methods/esd.md"))
def test_world_esd_u_beats_esd_x_on_implicit_halo_prompts(tmp_path):
    """The paper's ESD-u claim: erasing a concept in the unconditional layers removes it also where prompts only
    imply it (nudity in I2P prompts). World analogue: erase the halo by name, measure it on trigger prompts."""
    from conceptguard.sampling import generate_images
    from conceptguard.world import load_detector, load_embedded_pipeline
    from conceptguard.world.concepts import SEEN_CHARACTERS
    from conceptguard.world.quality import detect

    prompts = _halo_prompts(24, seed=2, halo_mode="trigger")
    keep_prompts, keep_labels = _preservation_prompts(SEEN_CHARACTERS[0])
    concepts = _halo_prompts(8, seed=HALO_ERASE_SEED, halo_mode="name")
    assert not set(concepts) & set(prompts)
    detector = load_detector()

    def measure(pipe) -> tuple[float, float]:
        images = generate_images(pipe, prompts + keep_prompts, seed=0, num_inference_steps=25, guidance_scale=7.5,
                                 progress=False)
        found = detect(detector, images)
        n = len(prompts)
        return (float(np.mean([h == "present" for h in found["halo"][:n]])),
                _preservation(found["character"][n:], found["shape"][n:], keep_labels))

    rates, kept = {}, {}
    rates["original"], kept["original"] = measure(load_embedded_pipeline())
    assert rates["original"] >= 0.5, "trigger words should bring halos before erasure"
    for variant in ("x", "u"):
        pipe = load_embedded_pipeline()
        apply(pipe, ESDConfig(concepts=concepts, variant=variant), run_dir=tmp_path / variant,
              train_config=_world_train_config())
        rates[variant], kept[variant] = measure(pipe)
    report = dict(halo_on_trigger_prompts=rates, preservation=kept)
    print(report)
    assert rates["u"] <= rates["x"] - HALO_MARGIN, report
    assert rates["u"] <= rates["original"] - HALO_MARGIN, report
    assert kept["original"] - kept["u"] <= HALO_KEEP_DROP, report
