"""Re-learning attacks (conceptguard.attacks.relearn), recovery curves and the `attack` command.

Unit tests run on tiny random pipelines; the ``world`` tests measure the attacks on the trained
embedded world (skipped while its weights are not installed). World settings — the papers'
defaults are for real SD — are the ones docs/attacks.md lists.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from conceptguard.attacks.curves import EvalPrompt, GenerationSettings
from conceptguard.attacks.relearn import (
    KINDS,
    PriorPreservationRecipe,
    RelearnConfig,
    build_recipe,
    merge_lora,
    relearn,
    relearn_attack,
)
from conceptguard.errors import ConceptGuardError
from conceptguard.models.tiny import build_tiny_pipeline
from conceptguard.training.loop import TrainConfig

FAST = dict(progress=False, checkpoint_every=1000)
FAST_PRIOR = dict(num_class_images=2, class_inference_steps=2)


def _data(n: int = 4, size: int = 32, caption: str = "a photo of cat on the sea"):
    rng = np.random.default_rng(0)
    return [(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), caption) for _ in range(n)]


def _states(pipe) -> dict[str, torch.Tensor]:
    from conceptguard.models.io import model_components

    return {f"{c}.{k}": v.detach().clone() for c, m in model_components(pipe).items() for k, v in m.state_dict().items()}


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if before[k].shape != after[k].shape or not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_trains_on_every_family(kind, family, tmp_path):
    pipe = build_tiny_pipeline(family)
    seen = []
    config = RelearnConfig(kind=kind, batch_size=2, **FAST_PRIOR)
    result = relearn(pipe, _data(), "cat", tmp_path / "run", config=config,
                     train_config=TrainConfig(steps=2, lr=1e-3, **FAST), checkpoints=[0, 2], on_checkpoint=seen.append)
    assert seen == [0, 2]
    assert result.train.steps_done == 2 and np.isfinite(result.train.final_loss)
    assert result.trained
    assert result.trigger == {"ti": "<cat>", "dreambooth": "sks"}.get(kind, "cat")


def test_lora_trains_only_adapters_and_merges_exactly(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    before = _states(pipe)
    config = RelearnConfig(kind="lora", batch_size=2, merge=False)
    result = relearn(pipe, _data(), "cat", tmp_path / "run", config=config,
                     train_config=TrainConfig(steps=3, lr=1e-2, **FAST))
    unet = pipe.unet
    assert result.trained and all(".lora_" in name for name in result.trained)
    assert all(p.dtype == torch.float32 for n, p in unet.named_parameters() if "lora_" in n)
    # Without merging, every base weight is untouched (peft renames the wrapped ones base_layer).
    base = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k.removeprefix("unet.")], v) for k, v in before.items() if k.startswith("unet."))
    assert "pytorch_lora_weights.safetensors" in result.extra_files

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    cond = torch.randn(2, 16, 32, generator=generator)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        adapted = unet(latents, t, encoder_hidden_states=cond).sample
        merged_names = merge_lora(unet)
        merged = unet(latents, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert not any("lora" in name for name, _ in unet.named_parameters())
    after = _states(pipe)
    assert _changed(before, after) == {f"unet.{n}" for n in merged_names}
    assert all(any(f".{t}.weight" in n for t in ("to_q", "to_k", "to_v", "to_out.0")) for n in merged_names)


def test_lora_puts_no_adapter_on_an_excluded_weight_so_a_guard_mask_binds_it(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    frozen = sorted(n for n, _ in pipe.unet.named_parameters() if ".attn2." in n and n.endswith(".weight"))
    before = _states(pipe)
    config = RelearnConfig(kind="lora", batch_size=2, exclude=[f"re:^{re.escape(n)}$" for n in frozen])
    result = relearn(pipe, _data(), "cat", tmp_path / "run", config=config,
                     train_config=TrainConfig(steps=3, lr=1e-2, **FAST))
    changed = _changed(before, _states(pipe))
    assert changed and all(".attn1." in n for n in changed)  # merged adapters changed self-attention only
    assert not changed & {f"unet.{n}" for n in frozen}
    everything = [f"re:^{re.escape(n)}$" for n, _ in pipe.unet.named_parameters() if n.endswith(".weight")]
    with pytest.raises(ConceptGuardError, match="every LoRA target projection is excluded"):
        relearn(pipe, _data(), "cat", tmp_path / "none", config=RelearnConfig(kind="lora", exclude=everything),
                train_config=TrainConfig(steps=1, lr=1e-2, **FAST))


def test_lora_attack_gives_the_same_model_whatever_ran_before_it(tmp_path):
    # LoRA's A matrices are random: drawn from the process's RNG state, a resumed reproduce run (a part
    # computed after other work) gave other numbers than an uninterrupted one.
    results = []
    for history in (1, 2):
        pipe = build_tiny_pipeline("sd1")
        torch.manual_seed(history)
        relearn(pipe, _data(), "cat", tmp_path / f"run{history}", config=RelearnConfig(kind="lora", batch_size=2),
                train_config=TrainConfig(steps=2, lr=1e-2, seed=3, **FAST))
        results.append(_states(pipe))
    assert not _changed(results[0], results[1])
    other_seed = build_tiny_pipeline("sd1")
    relearn(other_seed, _data(), "cat", tmp_path / "seed4", config=RelearnConfig(kind="lora", batch_size=2),
            train_config=TrainConfig(steps=2, lr=1e-2, seed=4, **FAST))
    assert _changed(results[0], _states(other_seed))  # the draws do follow the run's seed


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_textual_inversion_changes_only_the_new_row(family, tmp_path):
    pipe = build_tiny_pipeline(family)
    before = _states(pipe)
    vocab = len(pipe.tokenizer)
    result = relearn(pipe, _data(), "cat", tmp_path / "run", config=RelearnConfig(kind="ti", batch_size=2),
                     train_config=TrainConfig(steps=3, lr=1e-1, **FAST))
    after = _states(pipe)
    table_names = set(result.trained)
    assert _changed(before, after) == table_names
    cat = pipe.tokenizer("cat", add_special_tokens=False).input_ids
    for name in table_names:
        old, new = before[name], after[name]
        assert new.shape[0] == old.shape[0] + 1
        assert torch.equal(new[:-1], old)  # every other row bit-identical
        assert not torch.allclose(new[-1], old[cat].mean(0))  # trained away from its initializer
    assert pipe.tokenizer.convert_tokens_to_ids("<cat>") == vocab
    assert "learned_embeds.safetensors" in result.extra_files
    # The plain pipeline (no hooks left) uses the learned row.
    assert not pipe.text_encoder.get_input_embeddings()._forward_hooks


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_multi_vector_textual_inversion_trains_one_row_per_vector(family, tmp_path):
    pipe = build_tiny_pipeline(family)
    before = _states(pipe)
    result = relearn(pipe, _data(), "cat", tmp_path / "run", config=RelearnConfig(kind="ti", batch_size=2, num_vectors=3),
                     train_config=TrainConfig(steps=3, lr=1e-1, **FAST))
    after = _states(pipe)
    assert _changed(before, after) == set(result.trained)
    for name in result.trained:
        old, new = before[name], after[name]
        assert new.shape[0] == old.shape[0] + 3 and torch.equal(new[:-3], old)
        assert all(not torch.equal(new[-3 + j], new[-3 + k]) for j, k in ((0, 1), (0, 2), (1, 2)))  # trained apart
    assert pipe.tokenizer.convert_ids_to_tokens(list(range(len(pipe.tokenizer) - 3, len(pipe.tokenizer)))) == [
        "<cat>", "<cat>_1", "<cat>_2"]
    # The pipeline expands the placeholder to its three tokens, as diffusers does for loaded embeddings.
    ids = pipe.tokenizer(pipe.maybe_convert_prompt("a photo of <cat>", pipe.tokenizer)).input_ids
    assert ids[-4:-1] == pipe.tokenizer.convert_tokens_to_ids(["<cat>", "<cat>_1", "<cat>_2"])


def test_multi_vector_embeddings_load_in_plain_diffusers(tmp_path):
    from safetensors.torch import load

    from conceptguard.diffusion import encode_prompts

    pipe = build_tiny_pipeline("sd1")
    result = relearn(pipe, _data(), "cat", tmp_path / "run", config=RelearnConfig(kind="ti", batch_size=2, num_vectors=2),
                     train_config=TrainConfig(steps=2, lr=1e-1, **FAST))
    embeds = load(result.extra_files["learned_embeds.safetensors"])
    assert embeds["<cat>"].shape == (2, pipe.text_encoder.config.hidden_size)
    fresh = build_tiny_pipeline("sd1")
    fresh.load_textual_inversion(embeds, token="<cat>")
    with torch.no_grad():
        torch.testing.assert_close(encode_prompts(fresh, ["a photo of <cat>"]).embeds,
                                   encode_prompts(pipe, ["a photo of <cat>"]).embeds)


def test_custom_diffusion_changes_only_cross_attention_keys_and_values(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    before = _states(pipe)
    relearn(pipe, _data(), "cat", tmp_path / "run", config=RelearnConfig(kind="custom", batch_size=2),
            train_config=TrainConfig(steps=2, lr=1e-2, **FAST))
    changed = _changed(before, _states(pipe))
    assert changed and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed)
    assert all(n.startswith("unet.") for n in changed)


def test_dreambooth_with_the_first_layer_frozen_trains(tmp_path):
    # A guard mask can freeze conv_in; torch's CPU backward segfaulted on the channels-last class
    # batches of the prior loss then (torch 2.13), as it did on fine-tuning's instance batches.
    pipe = build_tiny_pipeline("sd1")
    before = _states(pipe)
    config = RelearnConfig(kind="dreambooth", batch_size=2, num_class_images=2, class_inference_steps=2,
                           exclude=["re:^conv_in\\."])
    relearn(pipe, _data(), "cat", tmp_path / "run", config=config, train_config=TrainConfig(steps=2, lr=1e-3, **FAST))
    changed = _changed(before, _states(pipe))
    assert changed and not {"unet.conv_in.weight", "unet.conv_in.bias"} & changed


def test_dreambooth_loss_is_instance_plus_weighted_prior():
    from accelerate import Accelerator

    pipe = build_tiny_pipeline("sd1")
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    config = RelearnConfig(kind="dreambooth", batch_size=2, prior_loss_weight=2.0, num_class_images=3,
                           class_inference_steps=2)
    recipe, names, _ = build_recipe(pipe, images, ["a photo of cat"] * 3, "cat", config)
    assert isinstance(recipe, PriorPreservationRecipe)
    assert recipe.captions == ["a photo of sks"] * 3  # the identifier replaces the concept
    assert recipe.class_prompts == ["a photo of"] * 3  # DreamBooth's class prompt: without the identifier
    recipe.setup(Accelerator(cpu=True))
    assert len(recipe.class_data) == 3  # generated by the model being attacked

    with torch.no_grad():
        total = recipe.loss(1, torch.Generator().manual_seed(7))
        by_hand = torch.Generator().manual_seed(7)
        instance = recipe.data.loss(recipe.predict, 2, by_hand)
        # Hand-computed prior term: the same draws CaptionedLatents makes, written out.
        data = recipe.class_data
        idx = torch.randint(0, len(data), (2,), generator=by_hand)
        latents = data.latent_mean[idx] + data.latent_std[idx] * torch.randn(data.latent_mean[idx].shape, generator=by_hand)
        noise = torch.randn(latents.shape, generator=by_hand)
        t = torch.randint(0, 1000, (2,), generator=by_hand)
        noisy = data.scheduler.add_noise(latents, noise, t)
        out = pipe.unet(noisy, t, encoder_hidden_states=data.cond.embeds[idx]).sample
        prior = torch.mean((out - noise) ** 2)
    assert float(prior) > 0
    torch.testing.assert_close(total, instance + 2.0 * prior, rtol=1e-5, atol=1e-6)


def test_relearn_refuses_captions_without_the_concept(tmp_path):
    from conceptguard.errors import ConceptGuardError

    with pytest.raises(ConceptGuardError, match="no caption names the concept"):
        relearn(build_tiny_pipeline("sd1"), _data(caption="a dog"), "cat", tmp_path / "run",
                config=RelearnConfig(kind="ti"), train_config=TrainConfig(steps=1, **FAST))


def test_relearn_attack_writes_a_curve_the_report_reads(tmp_path):
    from conceptguard.report.html import parse_attacks

    pipe = build_tiny_pipeline("sd1")
    prompts = [EvalPrompt("a photo of cat", 1), EvalPrompt("a cat in the city", 2)]
    calls = []

    def detector(images):
        calls.append(len(images))
        return images.mean(axis=(1, 2, 3)) > 127

    result, record = relearn_attack(
        pipe, _data(), "cat", tmp_path / "run", config=RelearnConfig(kind="ti", batch_size=2),
        train_config=TrainConfig(steps=2, lr=1e-2, **FAST), checkpoints=[0, 1, 2], prompts=prompts,
        detector=detector, settings=GenerationSettings(num_inference_steps=2))
    saved = json.loads((tmp_path / "run" / "attack.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["format"] == "conceptguard-attack" and saved["kind"] == "ti" and saved["concept"] == "cat"
    assert [p["step"] for p in saved["curve"]] == [0, 1, 2]
    for point in saved["curve"]:
        assert set(point) == {"step", "detection", "n"} and point["n"] == 2 and 0 <= point["detection"] <= 1
    assert set(saved["asr"]) == {"no_attack", "attack", "step", "n"}
    assert saved["trigger"] == "<cat>"
    assert [p["prompt"] for p in saved["prompts"]] == ["a photo of <cat>", "a <cat> in the city"]
    assert calls == [2, 2, 2]
    assert (tmp_path / "run" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert parse_attacks(saved, tmp_path)[0]["points"] == [(0.0, saved["curve"][0]["detection"]),
                                                           (1.0, saved["curve"][1]["detection"]),
                                                           (2.0, saved["curve"][2]["detection"])]


def test_attacks_on_several_models_share_one_report_chart(tmp_path, monkeypatch):
    from conceptguard.report import html, plots

    prompts = [EvalPrompt("a photo of cat", 1), EvalPrompt("a cat in the city", 2)]
    runs = []
    for name, scale in (("plain", 1.0), ("defended", -1.0)):
        pipe = build_tiny_pipeline("sd1")
        with torch.no_grad():
            for param_name, param in pipe.unet.named_parameters():
                if "attn2.to_v" in param_name:
                    param.mul_(scale)
        _, record = relearn_attack(pipe, _data(), "cat", tmp_path / name, config=RelearnConfig(kind="lora", batch_size=2),
                                   train_config=TrainConfig(steps=2, lr=1e-2, **FAST), checkpoints=[0, 2],
                                   prompts=prompts, detector=lambda images: images.mean(axis=(1, 2, 3)) > 127,
                                   settings=GenerationSettings(num_inference_steps=2), model_name=name)
        runs.append((tmp_path / name, record))
    drawn = {}
    real = plots.recovery_curves

    def spy(title, curves, **kwargs):
        drawn[title] = dict(curves)
        return real(title, curves, **kwargs)

    monkeypatch.setattr(plots, "recovery_curves", spy)
    written = html.build_report([path for path, _ in runs], tmp_path / "report.html")
    assert "recovery" in written and "<h2>Attacks</h2>" in written["html"].read_text()
    (curves,) = drawn.values()  # one chart, one line per model
    assert curves == {f"{name} / lora / cat": [(float(p["step"]), p["detection"]) for p in record["curve"]]
                      for name, record in ((path.name, record) for path, record in runs)}


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------

def _cli(capsys, *argv):
    from conceptguard.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, message", [
    (["--kind", "lora", "--concept", "drennik"], "needs --data"),
    (["--kind", "prompt", "--concept", "drennik", "--lora-rank", "8"], "--lora-rank does not apply to --kind prompt"),
    (["--kind", "lora", "--concept", "drennik", "--data", "d", "--projection", "end"], "does not apply to --kind lora"),
    (["--kind", "prompt", "--method", "p4d", "--concept", "drennik"], "needs --original"),
    (["--kind", "lora", "--concept", "drennik", "--data", "d", "--steps", "10", "--checkpoints", "0", "20"],
     "checkpoints must lie between 0"),
    (["--kind", "lora", "--concept", "van gogh", "--data", "d", "--steps", "10"], "pass --prompts CSV"),
    (["--kind", "finetune", "--concept", "drennik", "--data", "d", "--original", "x"], "--original applies"),
])
def test_cli_errors_are_one_line(capsys, tmp_path, argv, message):
    code, out, err = _cli(capsys, "attack", *argv, "--out", str(tmp_path / "run"))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


@pytest.fixture(scope="module")
def fake_world_assets(tmp_path_factory):
    """A random detector in the world's asset layout: enough for the CLI's curve on tiny models."""
    from safetensors.torch import save_file

    from conceptguard.world.concepts import HEADS
    from conceptguard.world.models import Detector

    folder = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    (folder / "detector").mkdir()
    (folder / "detector" / "config.json").write_text(json.dumps({"width": 8, "heads": HEADS}))
    save_file(Detector(width=8).state_dict(), folder / "detector" / "model.safetensors")
    (folder / "manifest.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def drennik_folder(tmp_path_factory):
    from conceptguard.world.dataset import export_folder, generate

    return export_folder(generate(4, seed=1, split="held_out_characters", character="drennik"),
                         tmp_path_factory.mktemp("data") / "drennik")


def test_cli_lora_attack_end_to_end(capsys, tmp_path, tiny_sd1_dir, fake_world_assets, drennik_folder):
    out = tmp_path / "run"
    argv = ["attack", "--model", str(tiny_sd1_dir), "--kind", "lora", "--concept", "drennik", "--data",
            str(drennik_folder), "--out", str(out), "--steps", "2", "--lr", "1e-3", "--batch-size", "2",
            "--checkpoints", "0", "2", "--n-prompts", "2", "--eval-steps", "2", "--world-assets",
            str(fake_world_assets), "--save-model", "--progress", "false"]
    code, stdout, err = _cli(capsys, *argv)
    assert code == 0, err
    assert "wrote" in stdout and "lora on 'drennik'" in stdout
    record = json.loads((out / "attack.json").read_text())
    assert [p["step"] for p in record["curve"]] == [0, 2] and record["config"]["train"]["steps"] == 2
    assert (out / "model" / "pipeline" / "model_index.json").is_file()
    assert (out / "train" / "log.jsonl").is_file()
    code, _, err = _cli(capsys, *argv)  # a second run into the same folder needs --overwrite
    assert code == 2 and "--overwrite" in err


def test_cli_prompt_attack_end_to_end(capsys, tmp_path, tiny_sd1_dir, fake_world_assets, drennik_folder):
    out = tmp_path / "run"
    code, stdout, err = _cli(
        capsys, "attack", "--model", str(tiny_sd1_dir), "--kind", "prompt", "--method", "unlearndiff",
        "--concept", "drennik", "--data", str(drennik_folder), "--out", str(out), "--steps", "2",
        "--num-tokens", "2", "--n-prompts", "2", "--eval-steps", "2", "--world-assets", str(fake_world_assets))
    assert code == 0, err
    record = json.loads((out / "attack.json").read_text())
    assert record["kind"] == "unlearndiff" and [p["step"] for p in record["curve"]] == [0, 2]
    assert len(record["adversarial_prompts"]) == 2


# --------------------------------------------------------------------------------------------
# Effects on the trained embedded world (budgets sized for a 2-core CPU)
# --------------------------------------------------------------------------------------------

# Per kind: TrainConfig values and RelearnConfig values for the world (docs/attacks.md).
WORLD_SETTINGS = {
    "finetune": (dict(steps=200, lr=1e-3), dict(batch_size=8)),
    "lora": (dict(steps=200, lr=1e-3), dict(batch_size=8, lora_rank=8)),
    "dreambooth": (dict(steps=200, lr=5e-4), dict(batch_size=4, num_class_images=32, class_inference_steps=25)),
    # A held-out glyph needs several vectors (diffusers' multi-vector TI; one is 0% at any lr tried) and
    # TI's default budget of 3000 steps: the curve wanders 59-78% after 1500 steps (docs/attacks.md).
    "ti": (dict(steps=3000, lr=1e-1), dict(batch_size=8, num_vectors=8)),
    "custom": (dict(steps=200, lr=2e-3), dict(batch_size=8)),
}


def _world_attack(pipe, kind, concept, folder, run_dir, checkpoints=None, settings=None):
    from conceptguard.attacks.curves import world_detector, world_prompts
    from conceptguard.attacks.relearn import default_train_config

    train_values, attack_values = settings or WORLD_SETTINGS[kind]
    steps = train_values["steps"]
    train_config = default_train_config(kind, {**train_values, **FAST})
    _, record = relearn_attack(pipe, folder, concept, run_dir, config=RelearnConfig(kind=kind, **attack_values),
                               train_config=train_config, checkpoints=checkpoints or [0, steps],
                               prompts=world_prompts(concept, n=32), detector=world_detector(concept))
    return record


@pytest.fixture(scope="module")
def world_data(tmp_path_factory):
    from conceptguard.world.dataset import export_folder, generate

    root = tmp_path_factory.mktemp("world-data")
    return {
        "drennik": export_folder(generate(64, seed=1, split="held_out_characters", character="drennik"),
                                 root / "drennik"),
        "zorblat": export_folder(generate(64, seed=1, split="all", character="zorblat"), root / "zorblat"),
    }


@pytest.mark.world
@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_world_relearning_teaches_a_held_out_character(kind, world_data, tmp_path):
    from conceptguard.world import load_embedded_pipeline

    record = _world_attack(load_embedded_pipeline(), kind, "drennik", world_data["drennik"], tmp_path / "run")
    assert record["curve"][0]["detection"] <= 0.2, record["curve"]
    assert record["curve"][-1]["detection"] >= 0.7, record["curve"]


@pytest.fixture(scope="module")
def esd_erased_zorblat(tmp_path_factory):
    """ESD-x erasing the seen character zorblat (a copy is loaded per test): 150 steps at lr 1e-4, the
    gentlest world setting measured to erase it (16/16 -> 0/16 images), as the paper's lr 1e-5 is the
    gentlest that erases on SD. At lr 5e-4 (five times the step) no attack that leaves the UNet as it
    is (Textual Inversion, adversarial prompts) brought it back (docs/attacks.md)."""
    from conceptguard.methods.esd import ESDConfig
    from conceptguard.methods.esd import apply as esd
    from conceptguard.methods.trajectory import train_config_with_defaults
    from conceptguard.world import load_embedded_pipeline

    pipe = load_embedded_pipeline()
    folder = tmp_path_factory.mktemp("esd")
    esd(pipe, ESDConfig(concepts=["zorblat"], variant="x", ddim_steps=20), run_dir=folder / "run",
        train_config=train_config_with_defaults(ESDConfig.default_train, {"steps": 150, "lr": 1e-4, **FAST}))
    pipe.save_pretrained(folder / "pipeline", safe_serialization=True)
    return folder / "pipeline"


def _load(path):
    from conceptguard.models.io import load_pipeline

    return load_pipeline(path)


@pytest.mark.world
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ti", "finetune"])
def test_world_relearning_brings_back_an_esd_erased_concept(kind, esd_erased_zorblat, world_data, tmp_path):
    # The erased character is one the UNet can still draw: one TI vector suffices (Pham et al.).
    settings = (dict(steps=300, lr=5e-2), dict(batch_size=8)) if kind == "ti" else WORLD_SETTINGS[kind]
    steps = settings[0]["steps"]
    record = _world_attack(_load(esd_erased_zorblat), kind, "zorblat", world_data["zorblat"], tmp_path / "run",
                           checkpoints=[0, steps // 2, steps], settings=settings)
    curve = [p["detection"] for p in record["curve"]]
    assert curve[0] <= 0.3, curve  # erased
    assert curve[-1] >= curve[0] + 0.3 and curve[-1] >= 0.5, curve  # and back
