"""Adversarial-prompt attacks (UnlearnDiffAtk, P4D) and the token machinery under them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptguard.attacks.curves import EvalPrompt, GenerationSettings
from conceptguard.attacks.prompt_attacks import (
    ImageTargets,
    PromptAttackConfig,
    TrajectoryTargets,
    generate_from_ids,
    optimise_prompt,
    prompt_attack,
)
from conceptguard.attacks.tokens import (
    PrefixEmbeddings,
    candidate_token_ids,
    encode_ids,
    nearest_tokens,
    prefixed_ids,
    text_encoders,
)
from conceptguard.diffusion import encode_prompts
from conceptguard.models.tiny import build_tiny_pipeline

FAMILIES = ["sd1", "sd2", "sdxl"]


def _ids(pipe, prompts, prefix):
    return [prefixed_ids(tokenizer, prompts, prefix) for tokenizer, _ in text_encoders(pipe)]


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_ids_matches_the_pipelines_encoding(family, request):
    pipe = request.getfixturevalue(f"tiny_{family}")
    prompts = ["a photo of cat", "a red house in the forest by artist"]
    with torch.no_grad():
        expected = encode_prompts(pipe, prompts)
        got = encode_ids(pipe, _ids(pipe, prompts, torch.tensor([], dtype=torch.long)))
    torch.testing.assert_close(got.embeds, expected.embeds)
    if expected.pooled is not None:
        torch.testing.assert_close(got.pooled, expected.pooled)
        torch.testing.assert_close(got.time_ids, expected.time_ids)


def test_hard_prompt_images_match_text_prompt_images(tiny_sd1):
    from conceptguard.sampling import generate_images

    settings = GenerationSettings(num_inference_steps=2)
    prompts, seeds = ["a photo of cat", "a dog"], [3, 4]
    from_text = generate_images(tiny_sd1, prompts, seeds=seeds, num_inference_steps=2, progress=False)
    from_ids = generate_from_ids(tiny_sd1, _ids(tiny_sd1, prompts, torch.tensor([], dtype=torch.long)), seeds, settings)
    np.testing.assert_array_equal(from_ids, from_text)


def test_projection_returns_the_nearest_real_token(tiny_sdxl):
    pairs = text_encoders(tiny_sdxl)
    tables = [encoder.get_input_embeddings().weight.detach() for _, encoder in pairs]
    candidates = candidate_token_ids(*pairs[0])
    special = set(pairs[0][0].all_special_ids)
    assert not special & set(candidates.tolist())
    wanted = candidates[[5, 17, 40]]
    noisy = [table[wanted] + 1e-4 * torch.randn(3, table.shape[1]) for table in tables]
    assert nearest_tokens(noisy, tables, candidates).tolist() == wanted.tolist()


def test_straight_through_reads_real_tokens_and_trains_the_vectors(tiny_sd1):
    init = torch.tensor([30, 31])
    prompt_ids = _ids(tiny_sd1, ["a photo of cat"], init)
    prefix = PrefixEmbeddings(tiny_sd1, init, straight_through=True)
    with torch.no_grad():
        prefix.vectors[0] += 1e-3 * torch.randn_like(prefix.vectors[0])  # off the token, still nearest to it
    with prefix:
        hooked = encode_ids(tiny_sd1, prompt_ids).embeds
    with torch.no_grad():
        plain = encode_ids(tiny_sd1, _ids(tiny_sd1, ["a photo of cat"], prefix.project())).embeds
    torch.testing.assert_close(hooked.detach(), plain)
    hooked.sum().backward()
    assert prefix.vectors[0].grad is not None and prefix.vectors[0].grad.abs().sum() > 0
    assert not tiny_sd1.text_encoder.get_input_embeddings()._forward_hooks  # the hook is gone


@pytest.mark.parametrize("family", FAMILIES)
def test_unlearndiff_loss_decreases_and_projects_to_vocabulary(family):
    from conceptguard.world.dataset import images_to_tensor

    pipe = build_tiny_pipeline(family)
    for module in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
    rng = np.random.default_rng(0)
    images = ImageTargets(pipe, images_to_tensor(rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)))
    batch = images.draw(4, torch.Generator().manual_seed(0))

    class FixedBatch:  # one batch every step: the optimised loss must then go down
        def draw(self, batch_size, generator):
            return batch

    config = PromptAttackConfig(method="unlearndiff", num_tokens=3, steps=25, lr=0.05, batch_size=4, projection="end")
    result = optimise_prompt(pipe, "a photo of cat", FixedBatch(), config, checkpoints=[0, 10, 25])
    assert result.final_loss < result.initial_loss
    assert result.losses[-1] < result.losses[0]
    assert sorted(result.token_ids) == [0, 10, 25]
    vocabulary = set(candidate_token_ids(*text_encoders(pipe)[0]).tolist())
    for ids in result.token_ids.values():
        assert len(ids) == 3 and set(ids) <= vocabulary
    assert result.text(pipe.tokenizer).endswith("a photo of cat")


def test_p4d_targets_come_from_the_original_models_trajectory(tiny_sd1):
    original = build_tiny_pipeline("sd1", seed=1)
    targets = TrajectoryTargets(original, "a photo of cat", seed=3, ddim_steps=4, guidance_scale=7.5)
    assert targets.latents.shape == (4, 4, 8, 8) and targets.targets.shape == (4, 4, 8, 8)
    with torch.no_grad():
        cond = encode_prompts(original, ["a photo of cat"]).embeds
        again = original.unet(targets.latents[2:3], targets.timesteps[2:3], encoder_hidden_states=cond).sample
    torch.testing.assert_close(again, targets.targets[2:3], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["unlearndiff", "p4d"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_prompt_attack_curve_starts_without_attack(method, family):
    pipe = build_tiny_pipeline(family)
    original = build_tiny_pipeline(family, seed=1)
    prompts = [EvalPrompt("a photo of cat", 1), EvalPrompt("a cat in the city", 2)]
    seen = []

    def detector(images):
        seen.append(images.copy())
        return images.mean(axis=(1, 2, 3)) > 127

    config = PromptAttackConfig(method=method, num_tokens=2, steps=3, lr=0.05, batch_size=2, ddim_steps=3)
    points, results, flags = prompt_attack(pipe, prompts, detector, config=config, original=original,
                                           checkpoints=[0, 3], settings=GenerationSettings(num_inference_steps=2))
    assert [p.step for p in points] == [0, 3] and all(p.n == 2 for p in points)
    assert len(results) == 2 and all(len(r.token_ids[3]) == 2 for r in results)
    assert [f.tolist() for f in flags] == [(s.mean(axis=(1, 2, 3)) > 127).tolist() for s in seen]
    # Step 0 is the plain prompts; the attacked point uses other (prefixed) prompts.
    assert not np.array_equal(seen[0], seen[1])


def test_prompt_attack_needs_its_references(tiny_sd1):
    from conceptguard.errors import ConceptGuardError

    prompts = [EvalPrompt("a cat", 1)]
    with pytest.raises(ConceptGuardError, match="original"):
        prompt_attack(tiny_sd1, prompts, lambda x: x, config=PromptAttackConfig(method="p4d"))
    with pytest.raises(ConceptGuardError, match="images of the concept"):
        prompt_attack(tiny_sd1, prompts, lambda x: x, config=PromptAttackConfig(method="unlearndiff"))


# --------------------------------------------------------------------------------------------
# The embedded world: prompt attacks against ESD-x erasing the seen character zorblat
# --------------------------------------------------------------------------------------------

from test_attacks import esd_erased_zorblat  # noqa: E402,F401  (shared module fixture)

# UnlearnDiffAtk's 5 prepended tokens for both methods; a larger step than the paper's 0.01 for the
# tiny world's 64-d embeddings. Against the fixture's ESD-x model both measured 0/16 -> 3/16 at 30 steps.
WORLD_PROMPT_ATTACK = dict(num_tokens=5, steps=30, lr=0.05, batch_size=4, ddim_steps=25)


@pytest.mark.world
@pytest.mark.slow
@pytest.mark.parametrize("method", ["unlearndiff", "p4d"])
def test_world_prompt_attacks_raise_detection_on_an_erased_model(method, esd_erased_zorblat):  # noqa: F811
    from conceptguard.attacks.curves import world_detector, world_prompts
    from conceptguard.models.io import load_pipeline
    from conceptguard.world import load_embedded_pipeline

    config = PromptAttackConfig(method=method, **WORLD_PROMPT_ATTACK)
    points, _, _ = prompt_attack(load_pipeline(esd_erased_zorblat), world_prompts("zorblat", n=16),
                                 world_detector("zorblat"), config=config, original=load_embedded_pipeline(),
                                 checkpoints=[0, config.steps])
    # At least two more images of 16 than the plain prompts: not a single-image fluke.
    assert points[-1].detection >= points[0].detection + 2 / 16, points
