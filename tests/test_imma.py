"""IMMA: the outer step's sign, first-order bookkeeping at θ', which tensors change, families, resume, CLI."""

from __future__ import annotations

import pytest
import torch

from conceptguard.errors import ConceptGuardError
from conceptguard.methods import get_method
from conceptguard.methods.imma import IMMAConfig, IMMARecipe, apply
from conceptguard.models.params import select_parameters
from conceptguard.models.tiny import build_tiny_pipeline
from conceptguard.training import TrainConfig


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


@pytest.fixture(scope="module")
def yulbar_dir(tmp_path_factory):
    from conceptguard.world.dataset import export_folder, generate

    return export_folder(generate(4, 0, "held_out_characters", character="yulbar"),
                         tmp_path_factory.mktemp("data") / "yulbar")


def quick(**overrides) -> TrainConfig:
    values = dict(steps=2, lr=1e-3, optimizer="adam", max_grad_norm=0.0, progress=False, log_every=1)
    values.update(overrides)
    return TrainConfig(**values)


def ready_recipe(pipe, config: IMMAConfig) -> IMMARecipe:
    from accelerate import Accelerator

    from conceptguard.finetune import images_and_captions

    images, captions = images_and_captions(config.data, 16)
    names = list(select_parameters(pipe.unet, config.preset))
    recipe = IMMARecipe(pipe, config, images, captions, names)
    recipe.setup(Accelerator(cpu=True))
    return recipe


@pytest.mark.parametrize("adaptation", ["lora", "custom"])
def test_outer_step_increases_the_adaptation_loss_at_fixed_inner_state(adaptation, yulbar_dir):
    torch.manual_seed(0)
    recipe = ready_recipe(build_tiny_pipeline("sd1"), IMMAConfig(concepts=["yulbar"], data=[str(yulbar_dir)],
                                                                 adaptation=adaptation, inner_lr=1e-2))
    recipe.adapt(1, torch.Generator().manual_seed(1))
    theta = recipe.trainable_parameters()

    def adaptation_loss():
        return recipe.outer_loss(1, torch.Generator().manual_seed(7))

    before = adaptation_loss()
    recipe_loss = -before  # what IMMARecipe.loss returns without the prior
    grads = torch.autograd.grad(recipe_loss, list(theta.values()))
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    with torch.no_grad():  # a plain descent step on the recipe's loss, as the loop's optimizer takes
        for param, grad in zip(theta.values(), grads):
            param.sub_(1e-2 * grad)
    after = adaptation_loss()
    assert after.item() > before.item()


def test_the_update_computed_at_the_adapted_weights_is_applied_to_theta(yulbar_dir):
    """Custom Diffusion adapts attn2 k/v in place: the step runs at θ' = θ + Δ and lands on θ."""
    pipe = build_tiny_pipeline("sd1")
    recipe = ready_recipe(pipe, IMMAConfig(concepts=["yulbar"], data=[str(yulbar_dir)], adaptation="custom",
                                           inner_lr=1e-2))
    theta = recipe.trainable_parameters()
    clean = {n: p.detach().clone() for n, p in theta.items()}
    loss = recipe.loss(1, torch.Generator().manual_seed(3))
    kv = [n for n in recipe.swapped]
    assert kv and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in kv)
    # During the step the model holds θ' (the attacker moved), and Δ records the move.
    assert all(recipe.delta[n].abs().sum() > 0 for n in kv)
    torch.testing.assert_close(theta[kv[0]].detach(), clean[kv[0]] + recipe.delta[kv[0]])
    grads = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()))))
    with torch.no_grad():
        for name, param in theta.items():
            param.sub_(1e-3 * grads[name])
    recipe.on_optimizer_step(1)
    for name, param in theta.items():
        torch.testing.assert_close(param.detach(), clean[name] - 1e-3 * grads[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("adaptation", ["lora", "finetune"])
def test_only_the_preset_tensors_change_and_no_attacker_is_left(adaptation, yulbar_dir, tmp_path):
    pipe = build_tiny_pipeline("sd1")
    unet_before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    text_before = {n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters()}
    result = apply(pipe, IMMAConfig(concepts=["yulbar"], data=[str(yulbar_dir)], adaptation=adaptation,
                                    prior_weight=1.0), run_dir=tmp_path, train_config=quick())
    after = dict(pipe.unet.named_parameters())
    assert set(after) == set(unet_before)  # no LoRA tensors or peft-renamed weights remain
    changed = {n for n in unet_before if not torch.equal(after[n], unet_before[n])}
    preset = set(select_parameters(pipe.unet, "imma"))
    assert changed and changed <= preset  # full fine-tuning's other weights are restored bit for bit
    assert set(result.changed) == {f"unet.{n}" for n in changed}
    assert all(torch.equal(p, text_before[n]) for n, p in pipe.text_encoder.named_parameters())
    assert not any(p.requires_grad for p in pipe.unet.parameters())


@pytest.mark.parametrize("family, adaptation", [("sd2", "custom"), ("sdxl", "lora")])
def test_runs_on_every_family(family, adaptation, yulbar_dir, tmp_path):
    pipe = build_tiny_pipeline(family)
    result = apply(pipe, IMMAConfig(concepts=["yulbar"], data=[str(yulbar_dir)], adaptation=adaptation),
                   run_dir=tmp_path, train_config=quick())
    assert result.changed and all(n.startswith("unet.") for n in result.changed)


def test_dreambooth_adaptation_runs(yulbar_dir, tmp_path):
    result = apply(build_tiny_pipeline("sd1"),
                   IMMAConfig(concepts=["yulbar"], data=[str(yulbar_dir)], adaptation="dreambooth",
                              num_class_images=2, class_inference_steps=2), run_dir=tmp_path, train_config=quick())
    assert result.changed


def test_resume_is_bit_identical(yulbar_dir, tmp_path):
    """The attacker's LoRA adapters and Adam state are checkpointed with θ."""
    config = IMMAConfig(concepts=["yulbar"], data=[str(yulbar_dir)], adaptation="lora", prior_weight=0.5)
    straight = build_tiny_pipeline("sd1")
    apply(straight, config, run_dir=tmp_path / "a", train_config=quick(steps=4, checkpoint_every=2))

    resumed = build_tiny_pipeline("sd1")
    apply(resumed, config, run_dir=tmp_path / "b", train_config=quick(steps=2, checkpoint_every=2))
    apply(build_tiny_pipeline("sd1"), config, run_dir=tmp_path / "b", resume=True,
          train_config=quick(steps=4, checkpoint_every=2))
    # The resumed pipeline object was freshly built: compare the final checkpoints' weights instead.
    from conceptguard.training import latest_checkpoint
    from conceptguard.training.checkpoint import load_recipe_state, load_trainable_parameters

    a, b = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    assert a.name == b.name
    for left, right in ((load_trainable_parameters(a), load_trainable_parameters(b)),
                        (load_recipe_state(a), load_recipe_state(b))):
        assert left.keys() == right.keys() and left
        assert all(torch.equal(left[k], right[k]) for k in left)


def test_registered_and_bad_configs_refused():
    assert get_method("imma", kind="immunize").config is IMMAConfig
    with pytest.raises(ValueError, match="Textual Inversion"):
        IMMAConfig(concepts=["a"], adaptation="ti")
    with pytest.raises(ValueError, match="adaptation"):
        IMMAConfig(concepts=["a"], adaptation="nope")
    with pytest.raises(ValueError, match="inner_steps"):
        IMMAConfig(concepts=["a"], inner_steps=0)
    with pytest.raises(ConceptGuardError, match="--data"):
        apply(build_tiny_pipeline("sd1"), IMMAConfig(concepts=["a"]), run_dir="unused", train_config=quick())


def test_prior_data_pins_the_model_on_the_publishers_own_images_and_captions(yulbar_dir, tmp_path):
    """With ``prior_data`` the prior term draws the publisher's images under *their* captions (not the
    concept images under generic prompts); it is zero at the original weights and grows as θ moves."""
    from accelerate import Accelerator

    from conceptguard.methods.imma import prior_term
    from conceptguard.methods.trajectory import functional_predictor, module_predictor
    from conceptguard.world.dataset import export_folder, generate

    keep = export_folder(generate(3, 5, "pretrain", subject="character"), tmp_path / "keep")
    pipe = build_tiny_pipeline("sd1")
    config = IMMAConfig(concepts=["yulbar"], data=[str(yulbar_dir)], prior_data=[str(keep)], prior_batch_size=3)
    images = torch.zeros(4, 3, 16, 16)
    term = prior_term(pipe, config, images, Accelerator(cpu=True).device)
    expected = sorted(line for line in (keep / "metadata.jsonl").read_text().splitlines())
    assert len(term.captions) == 3 and all(c in "".join(expected) for c in term.captions)
    original = functional_predictor(pipe.unet, {n: p.detach().clone() for n, p in pipe.unet.named_parameters()})
    live = module_predictor(pipe.unet)
    assert term.loss(live, original, torch.Generator().manual_seed(0)) == 0
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "attn2.to_v" in name:
                param.add_(0.05)
    assert term.loss(live, original, torch.Generator().manual_seed(0)) > 0
    # Without prior_data: the concept images, captioned with the generic prompts in turn.
    default = prior_term(pipe, IMMAConfig(concepts=["yulbar"], data=[str(yulbar_dir)]), images,
                         Accelerator(cpu=True).device)
    assert default.captions == list(config.regularization_prompts[:4])
