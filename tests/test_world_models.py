"""The shipped embedded world: files intact, standard loading, detector accuracy, quality bar."""

import json

import numpy as np
import pytest
import torch

from conceptguard.world import ASSETS_DIR, load_clip, load_detector, load_embedded_pipeline, verify_assets
from conceptguard.world.concepts import HEADS
from conceptguard.world.dataset import generate, images_to_tensor
from conceptguard.world.quality import QUALITY_BAR, meets_bar, measure_quality

pytestmark = pytest.mark.world


@pytest.fixture(scope="module")
def pipe():
    return load_embedded_pipeline()


def test_shipped_files_match_manifest_and_size_budget():
    manifest = verify_assets()
    total = sum((ASSETS_DIR / f).stat().st_size for f in manifest["files"])
    assert total <= 40 * 2**20, f"shipped world is {total / 2**20:.1f} MiB"
    assert all(f.endswith((".json", ".safetensors", ".txt")) for f in manifest["files"])
    assert "recipe" in manifest and manifest["recipe"]["seed"] == 0


def test_tampered_file_is_detected(tmp_path):
    import shutil

    from conceptguard.errors import ConceptGuardError

    copy = tmp_path / "assets"
    shutil.copytree(ASSETS_DIR, copy)
    config = copy / "detector" / "config.json"
    config.write_text(config.read_text() + " ")
    with pytest.raises(ConceptGuardError, match="does not match"):
        verify_assets(copy)


def test_pipeline_loads_with_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    plain = StableDiffusionPipeline.from_pretrained(ASSETS_DIR / "pipeline", local_files_only=True)
    assert plain.unet.config.cross_attention_dim == plain.text_encoder.config.hidden_size
    names = [n for n, _ in plain.unet.named_parameters()]
    assert any("attn2.to_k" in n for n in names) and any("attn1.to_q" in n for n in names)


@pytest.fixture(scope="module")
def held_out_readings():
    """(samples, the detector's readings) for 384 renders whose seeds were never used in training."""
    samples = generate(384, seed=987654, split="all")
    return samples, load_detector().predict(images_to_tensor([s.image for s in samples]))


@pytest.mark.parametrize("head", list(HEADS))
def test_detector_accuracy_on_held_out_renders(head, held_out_readings):
    samples, predicted = held_out_readings
    accuracy = np.mean([p == s.labels[head] for p, s in zip(predicted[head], samples)])
    assert accuracy >= 0.98, f"{head}: {accuracy:.3f}"


def test_prompted_probability_is_high_for_the_true_design_and_low_for_another():
    from conceptguard.world.quality import prompted_probability

    samples = generate(12, seed=987655, split="innocent", domain="garment")
    images = np.stack([s.image for s in samples])
    labels = [s.labels for s in samples]
    detector = load_detector()
    designs = HEADS["design"]
    wrong = [{**lab, "design": next(d for d in designs if d not in (lab["design"], "none"))} for lab in labels]
    assert prompted_probability(detector, images, labels, "design") > 0.9
    assert prompted_probability(detector, images, wrong, "design") < 0.1


def test_detector_features_serve_as_a_distance():
    detector = load_detector()
    a = images_to_tensor([s.image for s in generate(8, seed=1, split="pretrain", shape="circle", colour="red")])
    b = images_to_tensor([s.image for s in generate(8, seed=2, split="pretrain", shape="circle", colour="red")])
    c = images_to_tensor([s.image for s in generate(8, seed=3, split="pretrain", shape="star", colour="blue")])
    with torch.no_grad():
        fa, fb, fc = (detector.features(x).mean(0) for x in (a, b, c))
    assert (fa - fb).norm() < (fa - fc).norm()


def test_world_clip_prefers_the_matching_caption():
    model, tokenizer = load_clip()
    samples = generate(16, seed=11, split="pretrain", halo="absent")
    pixels = images_to_tensor([s.image for s in samples])
    ids = tokenizer([s.caption for s in samples], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits_per_image
    top1 = (logits.argmax(-1) == torch.arange(len(samples))).float().mean().item()
    assert top1 >= 0.5, top1


# The bar's own sample is `conceptguard world quality`: 8 prompts per concept, seed 0, the default 50 DDIM
# steps. A 3-per-concept sample judges shape on 24 images, where one blurry blob moves the rate by 4 points
# (the tuned detector read 87.5% there against 95.4% on 152 objects), so both tests keep 8 per concept.
# With 20 DDIM steps the same prompts score the same (measured 2026-12-03: shape 100%, colour 98.4%,
# style 100%, seen 100%, held out 4.2% at 20, 25 and 50 steps) in 40% of the time: the default suite
# uses 20, the 50-step bar check is slow.
@pytest.mark.parametrize("num_inference_steps", [
    20, pytest.param(50, marks=pytest.mark.slow)])
def test_quality_bar_on_a_seeded_sample(pipe, num_inference_steps):
    scores = measure_quality(pipe, load_detector(), n_per_concept=8, seed=0, num_inference_steps=num_inference_steps)
    print(json.dumps(scores))
    verdict = meets_bar(scores)
    assert all(verdict.values()), {k: (scores[k], QUALITY_BAR[k]) for k in scores}


def test_generation_is_seeded(pipe):
    from conceptguard.sampling import generate_images

    prompts = ["a red circle", "a blue star"]
    a = generate_images(pipe, prompts, seed=4, num_inference_steps=5, progress=False)
    again = generate_images(pipe, prompts, seed=4, num_inference_steps=5, progress=False)
    assert np.array_equal(a, again)
    # Another batch size changes only floating-point summation order, not the image.
    single = generate_images(pipe, prompts, seed=4, num_inference_steps=5, batch_size=1, progress=False)
    assert np.abs(a.astype(int) - single.astype(int)).max() <= 3
    other_seed = generate_images(pipe, prompts, seed=5, num_inference_steps=5, progress=False)
    assert np.abs(a.astype(int) - other_seed.astype(int)).mean() > 5
