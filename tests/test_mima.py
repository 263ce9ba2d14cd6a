"""MIMA: gradient through the Merge (and the no-gradient variant), constraint in the model, families,
resume, the CLI; the world-effect test needs the trained embedded world (``-m world``)."""

from __future__ import annotations

import pytest
import torch

from conceptguard.methods.mima import MIMAConfig, MIMARecipe, apply, unique_rows
from conceptguard.models.params import select_parameters
from conceptguard.models.tiny import build_tiny_pipeline
from conceptguard.training import TrainConfig

CHARACTERS = ("yulbar", "drennik", "ospera")


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from conceptguard.world.dataset import export_folder, generate

    root = tmp_path_factory.mktemp("data")
    return [str(export_folder(generate(3, 0, "held_out_characters", character=c), root / c)) for c in CHARACTERS[:2]]


def quick(**overrides) -> TrainConfig:
    values = dict(steps=2, lr=1e-3, optimizer="adam", max_grad_norm=0.0, progress=False, log_every=1)
    values.update(overrides)
    return TrainConfig(**values)


def ready_recipe(pipe, config: MIMAConfig) -> MIMARecipe:
    from accelerate import Accelerator

    from conceptguard.methods.imma import concept_data

    groups = concept_data(config.data, config.concepts, 16)
    recipe = MIMARecipe(pipe, config, groups, list(select_parameters(pipe.unet, config.preset)))
    recipe.setup(Accelerator(cpu=True))
    return recipe


@pytest.mark.parametrize("merge_gradient", [True, False])
def test_outer_gradient_reaches_theta_kv_only_through_the_merge(merge_gradient, folders):
    recipe = ready_recipe(build_tiny_pipeline("sd1"), MIMAConfig(
        concepts=list(CHARACTERS[:2]), data=folders, prior_weight=0.0, merge_gradient=merge_gradient, inner_lr=1e-2))
    recipe.loss(1, torch.Generator().manual_seed(0)).backward()  # one inner step per concept, then the outer loss
    theta = recipe.trainable_parameters()
    kv = set(recipe.kv_names)
    assert kv and kv <= set(theta)
    others = [n for n in theta if n not in kv]
    assert all(theta[n].grad is not None and theta[n].grad.abs().sum() > 0 for n in others)
    if merge_gradient:
        assert all(theta[n].grad is not None and theta[n].grad.abs().sum() > 0 for n in kv)
    else:
        assert all(theta[n].grad is None for n in kv)


def test_merged_keys_and_values_meet_each_concepts_constraint(folders):
    recipe = ready_recipe(build_tiny_pipeline("sd1"), MIMAConfig(concepts=list(CHARACTERS[:2]), data=folders,
                                                                 inner_lr=1e-2))
    generator = torch.Generator().manual_seed(0)
    for n in range(2):
        recipe.inner_step(n, 1, generator)
    with torch.no_grad():
        merged = recipe.merged_weights()
        name = recipe.kv_names[0]
        theta = recipe.trainable_parameters()[name]
        # Rows owned by one concept only go exactly where that concept's adapted weight sends them.
        for n in range(2):
            own = recipe.row_weights[:, n] == 1
            assert own.any()
            rows = recipe.rows[own]
            torch.testing.assert_close(merged[name] @ rows.T, (theta + recipe.delta[n][name]) @ rows.T,
                                       rtol=1e-3, atol=1e-4)
        assert not torch.allclose(merged[name], theta)


def test_rows_shared_by_concepts_are_kept_once_with_averaged_targets():
    a, b, c = torch.eye(3)
    rows, weights = unique_rows([torch.stack([a, b]), torch.stack([a, c])])
    torch.testing.assert_close(rows, torch.stack([a, b, c]))
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_runs_on_every_family_and_changes_only_preset_tensors(family, folders, tmp_path):
    pipe = build_tiny_pipeline(family)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    result = apply(pipe, MIMAConfig(concepts=list(CHARACTERS[:2]), data=folders), run_dir=tmp_path,
                   train_config=quick())
    changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(select_parameters(pipe.unet, "imma"))
    assert set(result.changed) == {f"unet.{n}" for n in changed}


def test_resume_is_bit_identical(folders, tmp_path):
    from conceptguard.training import latest_checkpoint
    from conceptguard.training.checkpoint import load_recipe_state, load_trainable_parameters

    config = MIMAConfig(concepts=list(CHARACTERS[:2]), data=folders)
    apply(build_tiny_pipeline("sd1"), config, run_dir=tmp_path / "a", train_config=quick(steps=4, checkpoint_every=2))
    apply(build_tiny_pipeline("sd1"), config, run_dir=tmp_path / "b", train_config=quick(steps=2, checkpoint_every=2))
    apply(build_tiny_pipeline("sd1"), config, run_dir=tmp_path / "b", resume=True,
          train_config=quick(steps=4, checkpoint_every=2))
    a, b = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    assert a.name == b.name == "step-000004"
    for left, right in ((load_trainable_parameters(a), load_trainable_parameters(b)),
                        (load_recipe_state(a), load_recipe_state(b))):
        assert left.keys() == right.keys() and left
        assert all(torch.equal(left[k], right[k]) for k in left)


def test_cli_writes_the_three_artefacts_and_stacks_on_an_erased_model(tiny_sd1_dir, folders, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from conceptguard.cli import main

    erased = tmp_path / "E"
    assert main(["erase", "--method", "esd", "--model", str(tiny_sd1_dir), "--concepts", "yulbar", "--out",
                 str(erased), "--steps", "1", "--ddim-steps", "2", "--progress", "false"]) == 0
    out = tmp_path / "I"
    assert main(["immunize", "--method", "mima", "--model", str(erased / "pipeline"), "--concepts", *CHARACTERS[:2],
                 "--data", *folders, "--adaptation", "custom", "--out", str(out), "--steps", "2",
                 "--merge-gradient", "false", "--progress", "false"]) == 0
    assert (out / "pipeline").is_dir() and (out / "delta.safetensors").is_file() and (out / "README.md").is_file()
    assert "mima" in (out / "README.md").read_text()
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    delta = load_file(out / "delta.safetensors")
    state = pipe.unet.state_dict()
    assert delta and all(torch.equal(state[k[len("unet."):]], v) for k, v in delta.items())

    imma_out = tmp_path / "J"
    assert main(["immunize", "--method", "imma", "--model", str(tiny_sd1_dir), "--concepts", "yulbar",
                 "--data", folders[0], "--adaptation", "lora", "--out", str(imma_out), "--steps", "1",
                 "--progress", "false"]) == 0
    assert (imma_out / "delta.safetensors").is_file()


def test_cli_refuses_foreign_options_and_missing_data(tiny_sd1_dir, folders, tmp_path, capsys):
    from conceptguard.cli import main

    assert main(["immunize", "--method", "imma", "--model", str(tiny_sd1_dir), "--concepts", "yulbar",
                 "--data", folders[0], "--merge-gradient", "false", "--out", str(tmp_path / "X")]) != 0
    assert "--merge-gradient" in capsys.readouterr().err
    assert main(["immunize", "--method", "mima", "--model", str(tiny_sd1_dir), "--concepts", "yulbar",
                 "--out", str(tmp_path / "Y")]) != 0
    assert "--data" in capsys.readouterr().err
    assert not (tmp_path / "X").exists() and not (tmp_path / "Y").exists()


# --- world effect (needs the trained embedded world) --------------------------------------------------


def _world_folder(character: str, root, n: int = 16):
    from conceptguard.world.dataset import export_folder, generate

    return str(export_folder(generate(n, 7, "held_out_characters", character=character), root / character))


def _personalization_rate(pipe, character: str, folder: str, run_dir) -> float:
    """Detection rate of ``character`` after a LoRA personalization of a copy of ``pipe``."""
    import copy

    from conceptguard.attacks.curves import GenerationSettings, detection_rate, world_detector
    from conceptguard.attacks.relearn import RelearnConfig, default_train_config, relearn
    from conceptguard.evaluation.prompts import concept_prompts

    attacked = copy.deepcopy(pipe)
    relearn(attacked, folder, character, run_dir, config=RelearnConfig(kind="lora", batch_size=4),
            train_config=default_train_config("lora", {"steps": 60, "lr": 1e-3, "progress": False}))
    prompts = concept_prompts(character, "target", 16, 0)
    rate, _ = detection_rate(attacked, [p.prompt for p in prompts], [p.seed for p in prompts],
                             world_detector(character), GenerationSettings(num_inference_steps=10, batch_size=16))
    return rate


@pytest.mark.world
@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "measured 2026-12-02 (issue #8 open): the 60-step LoRA attacker personalizes the PLAIN model too weakly "
    "for the checks to mean anything: yulbar 31%, drennik 0%, ospera 0%, cavix 0% (MSGR on yulbar alone: MIMA "
    "0.8, IMMA 0.2). With LoRA at 200 steps the plain model learns yulbar 81%, drennik 62%, ospera 0%, cavix "
    "75%, and the immunization barely holds: MSGR MIMA 0.015, IMMA -0.023; cavix after MIMA 56%"))
def test_mima_lowers_personalization_of_three_characters_and_keeps_a_fourth(tmp_path):
    """MSGR > 0 on yulbar/drennik/ospera under LoRA; cavix personalizes at >= 90% of the plain model.

    M = the detector's rate of the character in the personalized model's images (a similarity to
    the reference concept: higher = more like it). Also runs IMMA on the same concepts and prints
    which of the two immunizes more (reported, not asserted).
    """
    from conceptguard.evaluation.metrics import msgr
    from conceptguard.methods.imma import IMMAConfig
    from conceptguard.methods.imma import apply as imma
    from conceptguard.world import load_embedded_pipeline

    folders = {c: _world_folder(c, tmp_path) for c in (*CHARACTERS, "cavix")}
    plain = load_embedded_pipeline()
    train = TrainConfig(steps=40, lr=1e-4, optimizer="adam", max_grad_norm=0.0, progress=False, checkpoint_every=40)

    immunized = {}
    immunized["mima"] = load_embedded_pipeline()
    apply(immunized["mima"], MIMAConfig(concepts=list(CHARACTERS), data=[folders[c] for c in CHARACTERS],
                                        inner_lr=1e-3, inner_batch_size=4), run_dir=tmp_path / "mima", train_config=train)
    immunized["imma"] = load_embedded_pipeline()
    imma(immunized["imma"], IMMAConfig(concepts=list(CHARACTERS), data=[folders[c] for c in CHARACTERS],
                                       adaptation="custom", inner_lr=1e-3, inner_batch_size=4, prior_weight=1.0),
         run_dir=tmp_path / "imma", train_config=train)

    without = {c: _personalization_rate(plain, c, folders[c], tmp_path / f"plain-{c}") for c in (*CHARACTERS, "cavix")}
    scores = {}
    for method, pipe in immunized.items():
        pairs = {c: [(without[c], _personalization_rate(pipe, c, folders[c], tmp_path / f"{method}-{c}"))]
                 for c in CHARACTERS if without[c] > 0}
        assert pairs, f"LoRA did not personalize any character on the plain model: {without}"
        scores[method] = msgr(pairs)
        if method == "mima":
            kept = _personalization_rate(pipe, "cavix", folders["cavix"], tmp_path / "mima-cavix")
    print(f"MSGR (detection rate): {scores}; plain rates {without}; cavix after MIMA {kept}")
    # Without these the checks below pass vacuously (an SGR over one character, a kept rate of 0 >= 0).
    assert min(without.values()) >= 0.5, f"the attacker did not personalize the plain model: {without}"
    assert scores["mima"] > 0.2
    assert kept >= 0.9 * without["cavix"]
