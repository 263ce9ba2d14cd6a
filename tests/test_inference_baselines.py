"""Inference-time baselines: our sampling loop against diffusers' pipelines, the SLD and SEGA rules,
the image-source registry, and their effect on the embedded world."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import numpy as np
import pytest
import torch

from conceptguard.errors import ConceptGuardError
from conceptguard.evaluation.sources import ImageSource, make_source, source_kinds
from conceptguard.methods.inference import (
    SLD_PRESETS,
    GuidedSource,
    SafeLatentDiffusion,
    SEGAParams,
    SemanticGuidance,
    SLDParams,
    generate_guided,
    generate_with_baseline,
)
from conceptguard.sampling import generate_images

PROMPTS = ["a photo of a cat", "a dog in the forest", "a car on the sea"]
SEEDS = [3, 14, 15]
STEPS = 20  # enough for every preset's warm-up (at most 15 steps) to end
ALL_SPECS = ["negative-prompt", "sld:weak", "sld:medium", "sld:strong", "sld:max", "sega", "sega:joined"]


def _plain(pipe, steps=STEPS, guidance_scale=7.5):
    return generate_images(pipe, PROMPTS, seeds=SEEDS, num_inference_steps=steps, guidance_scale=guidance_scale,
                           progress=False)


def _to_uint8(images):
    return (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)


def _max_diff(a, b):
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# --------------------------------------------------------------------------------------------
# The loop reproduces the pipelines
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_loop_reproduces_plain_sampling_exactly(request, family):
    pipe = request.getfixturevalue(f"tiny_{family}")
    ours = generate_guided(pipe, PROMPTS, SEEDS, num_inference_steps=STEPS, guidance_scale=7.5, batch_size=2)
    assert ours.dtype == np.uint8 and ours.shape == (3, 16, 16, 3)
    assert np.array_equal(ours, _plain(pipe))


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                       "DPMSolverMultistepScheduler"])
def test_loop_reproduces_plain_sampling_with_other_schedulers(scheduler):
    # Non-unit initial sigma, input scaling, multistep state and per-step noise from the
    # per-image generators: whatever the scheduler needs, the loop must give it as the pipeline does.
    import diffusers

    from conceptguard.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd1")
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    ours = generate_guided(pipe, PROMPTS, SEEDS, num_inference_steps=8, guidance_scale=7.5)
    assert np.array_equal(ours, _plain(pipe, steps=8))


def test_nothing_to_avoid_or_zero_guidance_reproduces_plain_sampling(tiny_sd1):
    plain = _plain(tiny_sd1)
    sources = [make_source(spec, tiny_sd1, []) for spec in ALL_SPECS]
    sources += [
        GuidedSource(tiny_sd1, negative_prompt=""),
        # s_S <= 1 disables SLD, as in diffusers.
        GuidedSource(tiny_sd1, guidance=SafeLatentDiffusion("cat", dataclasses.replace(SLD_PRESETS["max"],
                                                                                       guidance_scale=0.0))),
        # The safety branch runs, but every element is "far enough" from the concept: zero safety term.
        GuidedSource(tiny_sd1, guidance=SafeLatentDiffusion("cat", dataclasses.replace(SLD_PRESETS["max"],
                                                                                       threshold=-float("inf")))),
        # The edit branch runs with a zero edit scale.
        GuidedSource(tiny_sd1, guidance=SemanticGuidance(("cat", "dog"), SEGAParams(edit_guidance_scale=0.0))),
    ]
    for source in sources:
        images = source.generate(PROMPTS, SEEDS, num_inference_steps=STEPS, guidance_scale=7.5)
        assert _max_diff(images, plain) <= 1, source.name


def _reference_pipelines(pipe):
    """diffusers' deprecated SLD and SEGA pipelines around the same components: the oracle."""
    deprecated = pytest.importorskip("diffusers.pipelines.deprecated.stable_diffusion_safe")
    semantic = pytest.importorskip("diffusers.pipelines.deprecated.semantic_stable_diffusion")
    components = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        safe = deprecated.StableDiffusionPipelineSafe(**components, requires_safety_checker=False)
        sega = semantic.SemanticStableDiffusionPipeline(**components, requires_safety_checker=False)
    for p in (safe, sega):
        p.set_progress_bar_config(disable=True)
    return deprecated.SafetyConfig, safe, sega


def test_sld_and_sega_match_diffusers_reference_pipelines(tiny_sd2):
    # tiny SD2 (v-prediction) reacts most visibly to the guidance, so agreement is not vacuous.
    safety_config, safe, sega = _reference_pipelines(tiny_sd2)
    concepts = ["cat", "dog"]
    plain = _plain(tiny_sd2)

    def generators():
        return [torch.Generator().manual_seed(s) for s in SEEDS]

    safe.safety_concept = "cat, dog"
    for preset in SLD_PRESETS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = _to_uint8(safe(PROMPTS, generator=generators(), num_inference_steps=STEPS, guidance_scale=7.5,
                                       output_type="np", **getattr(safety_config, preset.upper())).images)
        ours = generate_with_baseline(tiny_sd2, f"sld:{preset}", concepts, PROMPTS, SEEDS, num_inference_steps=STEPS)
        assert _max_diff(ours, reference) <= 1, preset
        assert _max_diff(reference, plain) > 1, preset
    reference = _to_uint8(sega(PROMPTS, generator=generators(), num_inference_steps=STEPS, guidance_scale=7.5,
                               output_type="np", editing_prompt=concepts, reverse_editing_direction=True).images)
    ours = generate_with_baseline(tiny_sd2, "sega", concepts, PROMPTS, SEEDS, num_inference_steps=STEPS)
    assert _max_diff(ours, reference) <= 1
    assert _max_diff(reference, plain) > 1


class _Spy:
    """Wraps a guidance rule and records how far its prediction strays from plain CFG."""

    def __init__(self, rule):
        self.rule, self.deviation = rule, 0.0

    @property
    def extra_prompts(self):
        return self.rule.extra_prompts

    def combine(self, step, uncond, text, extra, guidance_scale, state):
        pred, state = self.rule.combine(step, uncond, text, extra, guidance_scale, state)
        cfg = uncond + guidance_scale * (text - uncond)
        self.deviation = max(self.deviation, float((pred - cfg).abs().max()))
        return pred, state


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_baseline_runs_and_changes_the_images(request, family):
    pipe = request.getfixturevalue(f"tiny_{family}")
    plain = _plain(pipe)
    for spec in ALL_SPECS:
        source = make_source(spec, pipe, ["cat", "forest"])
        assert isinstance(source, ImageSource) and source.name == spec
        spy = source.guidance = _Spy(source.guidance) if source.guidance is not None else None
        images = source.generate(PROMPTS, SEEDS, num_inference_steps=STEPS, guidance_scale=7.5, batch_size=2)
        assert images.dtype == np.uint8 and images.shape == plain.shape
        if spy is not None:
            assert spy.deviation > 1e-4, f"{spec} on {family} never changed a noise prediction"
        # Random tiny SD1/SDXL decoders flatten small guidance changes below one uint8 level; tiny SD2
        # shows every baseline's effect in the images themselves.
        if family == "sd2" or spec in ("negative-prompt", "sld:max"):
            assert not np.array_equal(images, plain), f"{spec} on {family} changed nothing"


def test_image_depends_on_its_seed_only(tiny_sdxl):
    both = generate_with_baseline(tiny_sdxl, "sld:max", ["cat"], PROMPTS[:2], SEEDS[:2], num_inference_steps=8)
    alone = generate_with_baseline(tiny_sdxl, "sld:max", ["cat"], PROMPTS[1:2], SEEDS[1:2], num_inference_steps=8)
    assert _max_diff(both[1:], alone) <= 1


def test_without_cfg_nothing_is_guided(tiny_sd1):
    # guidance_scale <= 1 turns CFG off in the pipelines, and every rule with it.
    plain = _plain(tiny_sd1, guidance_scale=1.0)
    for spec in ("negative-prompt", "sld:max", "sega"):
        images = generate_with_baseline(tiny_sd1, spec, ["cat"], PROMPTS, SEEDS, num_inference_steps=STEPS,
                                        guidance_scale=1.0)
        assert np.array_equal(images, plain), spec


# --------------------------------------------------------------------------------------------
# The guidance rules, by hand
# --------------------------------------------------------------------------------------------


def _t(value):
    return torch.full((1, 1, 2, 2), float(value), dtype=torch.float64)


def test_sld_rule_by_hand():
    params = SLDParams(warmup_steps=1, guidance_scale=1000.0, threshold=0.01, momentum_scale=0.5, mom_beta=0.7)
    rule = SafeLatentDiffusion("cat", params)
    uncond, text, concept, g = _t(0.0), _t(0.5), _t(0.6), 7.5
    # Step 0 (warm-up): plain CFG, but the momentum builds: safety term = (0.6 − 0) · 1 = 0.6.
    pred, momentum = rule.combine(0, uncond, text, [concept], g, None)
    torch.testing.assert_close(pred, _t(g * 0.5))
    torch.testing.assert_close(momentum, _t(0.3 * 0.6))
    # Step 1: safety = 0.6 + 0.5 · 0.18 = 0.69, subtracted from the guidance direction.
    pred, momentum = rule.combine(1, uncond, text, [concept], g, momentum)
    torch.testing.assert_close(pred, _t(g * (0.5 - 0.69)))
    torch.testing.assert_close(momentum, _t(0.7 * 0.18 + 0.3 * 0.69))
    # Where the prompt is already λ away from the concept, nothing is subtracted (momentum aside).
    pred, _ = SafeLatentDiffusion("cat", dataclasses.replace(params, warmup_steps=0)).combine(
        0, uncond, _t(0.5), [_t(0.2)], g, None)
    torch.testing.assert_close(pred, _t(g * 0.5))
    # The per-element scale saturates at 1 and is proportional below: |0.5 − 0.54| · s_S = 0.4 for s_S = 10.
    proportional = dataclasses.replace(params, warmup_steps=0, momentum_scale=0.0, guidance_scale=10.0)
    pred, _ = SafeLatentDiffusion("cat", proportional).combine(0, uncond, _t(0.5), [_t(0.54)], g, None)
    torch.testing.assert_close(pred, _t(g * (0.5 - 0.54 * 0.4)))


def test_sega_rule_by_hand():
    params = SEGAParams(edit_guidance_scale=2.0, warmup_steps=1, threshold=0.0, momentum_scale=0.5, mom_beta=0.4)
    rule = SemanticGuidance(("cat",), params)
    uncond, text, concept, g = _t(0.0), _t(1.0), _t(0.3), 3.0
    # Reverse direction: edit = 2 · (0 − 0.3) = −0.6; applied only after the warm-up step.
    pred, momentum = rule.combine(0, uncond, text, [concept], g, None)
    torch.testing.assert_close(pred, _t(g * 1.0))
    torch.testing.assert_close(momentum, _t(0.6 * -0.6))
    pred, _ = rule.combine(1, uncond, text, [concept], g, momentum)
    torch.testing.assert_close(pred, _t(g * 1.0 - 0.6 + 0.5 * 0.6 * -0.6))
    # Two concepts add up; forward direction flips the sign.
    pred, _ = SemanticGuidance(("cat", "dog"), dataclasses.replace(params, warmup_steps=0, momentum_scale=0.0)).combine(
        0, uncond, text, [concept, _t(0.1)], g, None)
    torch.testing.assert_close(pred, _t(g - 0.6 - 0.2))
    pred, _ = SemanticGuidance(("cat",), dataclasses.replace(params, warmup_steps=0, reverse=False)).combine(
        0, uncond, text, [concept], g, None)
    torch.testing.assert_close(pred, _t(g + 0.6))
    # The threshold keeps only the largest-magnitude elements of each image-channel.
    concept = torch.tensor([[[[0.1, 0.2], [0.3, 0.4]]]], dtype=torch.float64)
    pred, _ = SemanticGuidance(("cat",), SEGAParams(edit_guidance_scale=1.0, warmup_steps=0, threshold=0.5,
                                                     momentum_scale=0.0)).combine(0, uncond, uncond, [concept], g, None)
    torch.testing.assert_close(pred, torch.tensor([[[[0.0, 0.0], [-0.3, -0.4]]]], dtype=torch.float64))


def test_presets_are_the_papers():
    expected = {  # Schramowski et al., CVPR 2023, Table / diffusers SafetyConfig
        "weak": (15, 20, 0.0, 0.0, 0.0),
        "medium": (10, 1000, 0.01, 0.3, 0.4),
        "strong": (7, 2000, 0.025, 0.5, 0.7),
        "max": (0, 5000, 1.0, 0.5, 0.7),
    }
    assert {k: dataclasses.astuple(v) for k, v in SLD_PRESETS.items()} == expected
    safe = pytest.importorskip("diffusers.pipelines.deprecated.stable_diffusion_safe")
    for name, params in SLD_PRESETS.items():
        reference = getattr(safe.SafetyConfig, name.upper())
        assert reference == {f"sld_{f.name}": getattr(params, f.name) for f in dataclasses.fields(params)}


def test_sega_defaults_are_diffusers():
    semantic = pytest.importorskip("diffusers.pipelines.deprecated.semantic_stable_diffusion")
    defaults = {k: p.default for k, p in
                inspect.signature(semantic.SemanticStableDiffusionPipeline.__call__).parameters.items()}
    ours = SEGAParams()
    assert (ours.edit_guidance_scale, ours.warmup_steps, ours.cooldown_steps, ours.threshold, ours.momentum_scale,
            ours.mom_beta) == (defaults["edit_guidance_scale"], defaults["edit_warmup_steps"],
                               defaults["edit_cooldown_steps"], defaults["edit_threshold"],
                               defaults["edit_momentum_scale"], defaults["edit_mom_beta"])
    assert ours.reverse


def test_source_registry(tiny_sd1):
    assert {"model", "negative-prompt", "sld", "sega"} <= set(source_kinds())
    assert make_source("sld", tiny_sd1, ["cat"]).guidance.params == SLD_PRESETS["medium"]
    assert make_source("sega:joined", tiny_sd1, ["cat", "dog"]).guidance.concepts == ("cat, dog",)
    assert make_source("sega", tiny_sd1, ["cat", "dog"]).guidance.concepts == ("cat", "dog")
    assert make_source("negative-prompt", tiny_sd1, ["cat", "dog"]).negative_prompt == "cat, dog"
    for bad in ("sld:extreme", "sega:all", "negative-prompt:x", "nope"):
        with pytest.raises(ConceptGuardError):
            make_source(bad, tiny_sd1, ["cat"])
    with pytest.raises(ConceptGuardError):
        generate_guided(tiny_sd1, PROMPTS, SEEDS[:2])


# --------------------------------------------------------------------------------------------
# Effect on the trained embedded world
# --------------------------------------------------------------------------------------------

# A style — the artist analogue, the field's use of these baselines. A character is a poor target
# in this world: most of its prompts are the name alone ("zorblat"), so with the name as negative
# prompt both CFG branches carry the same text and nothing changes (measured: 12 of 12 zorblat
# images before and after; SLD weak and SEGA also 12/12, SLD strong/max 2/12).
WORLD_TARGET = "striped"
WORLD_STEPS = 50  # the SLD presets' warm-ups are tuned for 50 steps
# SLD's weak preset is left out: its safety term starts after 15 of 50 steps, when the world's
# 16x16 latents have already fixed the texture (striped in 16/16 images as without it; 15/16 with
# the warm-up cut to 0 or 5 steps, 16/16 at 10). test_world_sld_presets_are_ordered covers it.
WORLD_SPECS = ["negative-prompt", "sld:medium", "sld:strong", "sld:max", "sega"]


@pytest.fixture(scope="module")
def world_base():
    """(pipeline, detector, prompts, seeds, base detection rate of the target)."""
    from conceptguard import world
    from conceptguard.evaluation.prompts import concept_prompts
    from conceptguard.world.quality import detect

    pipe, detector = world.load_embedded_pipeline(), world.load_detector()
    records = concept_prompts(WORLD_TARGET, "target", 16, seed=5)
    prompts, seeds = [r.prompt for r in records], [r.seed for r in records]
    found = detect(detector, generate_images(pipe, prompts, seeds=seeds, num_inference_steps=WORLD_STEPS,
                                             progress=False))
    rate = float(np.mean([c == WORLD_TARGET for c in found["style"]]))
    return pipe, detector, prompts, seeds, rate


@pytest.mark.world
@pytest.mark.slow
@pytest.mark.parametrize("spec", WORLD_SPECS)
def test_world_baseline_lowers_target_detection(world_base, spec):
    from conceptguard.world.quality import detect

    pipe, detector, prompts, seeds, base_rate = world_base
    images = generate_with_baseline(pipe, spec, [WORLD_TARGET], prompts, seeds, num_inference_steps=WORLD_STEPS)
    rate = float(np.mean([c == WORLD_TARGET for c in detect(detector, images)["style"]]))
    print(f"{spec}: {WORLD_TARGET} detected in {rate:.0%} of images (base model {base_rate:.0%})")
    assert base_rate > 0.5, "the base model should draw the target for the comparison to mean anything"
    assert rate < base_rate


@pytest.mark.world
@pytest.mark.slow
def test_world_sld_presets_are_ordered(world_base):
    """The paper's configurations, weak to max, remove the target at least as well as the one before."""
    from conceptguard.world.quality import detect

    pipe, detector, prompts, seeds, base_rate = world_base
    rates = {"none": base_rate}
    for preset in SLD_PRESETS:
        images = generate_with_baseline(pipe, f"sld:{preset}", [WORLD_TARGET], prompts, seeds,
                                        num_inference_steps=WORLD_STEPS)
        rates[preset] = float(np.mean([c == WORLD_TARGET for c in detect(detector, images)["style"]]))
    print(f"SLD presets on {WORLD_TARGET}: {rates}")
    values = list(rates.values())
    assert all(later <= earlier for earlier, later in zip(values, values[1:])), rates
    assert rates["max"] <= 0.25 * base_rate, rates
