"""FreezeAsGuard mask learning and the mask file, on toys and tiny random pipelines."""

from __future__ import annotations

import gc
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conceptguard.errors import ConceptGuardError
from conceptguard.guard import (
    GuardConfig,
    GuardMask,
    MaskedWeights,
    MaskLearningRecipe,
    exact_count,
    guard_train_config,
    learn_mask,
    mask_objective,
    random_frozen,
    random_mask,
    top_k_frozen,
)
from conceptguard.models.io import content_hash, read_safetensors_header
from conceptguard.models.tiny import build_tiny_pipeline
from conceptguard.training import checkpoint as ckpt


def tiny_pairs(n: int, seed: int, word: str) -> list[tuple[np.ndarray, str]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), f"a {word}") for _ in range(n)]


def short_config(**overrides) -> GuardConfig:
    values = dict(ratio=0.3, inner_steps=2, batch_size=2, user_lr=1e-3, init_steps=2)
    values.update(overrides)
    return GuardConfig(**values)


# --- the bi-level arithmetic on a toy --------------------------------------------------------


class TwoTensors(torch.nn.Module):
    """y = a·x1 + b·x2: the illegal task needs ``a``, the innocent task needs ``b``."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(3))
        self.b = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x1, x2):
        return (self.a * x1).sum(-1) + (self.b * x2).sum(-1)


def toy_losses(masked: MaskedWeights, weights):
    x = torch.ones(4, 3)
    zero = torch.zeros(4, 3)
    # Illegal data: output must be 3 from x1 alone; innocent data: 3 from x2 alone.
    illegal = ((masked.forward(weights, x, zero) - 3.0) ** 2).mean()
    innocent = ((masked.forward(weights, zero, x) - 3.0) ** 2).mean()
    return illegal, innocent


def test_mask_gradient_freezes_the_tensor_illegal_learning_needs():
    model = TwoTensors()
    masked = MaskedWeights(model, temperature=0.2, logits=torch.full((2,), -1.0))
    with torch.no_grad():  # the fully fine-tuned model: both tasks learned
        model.a.fill_(1.0)
        model.b.fill_(1.0)
    mask = masked.mask()
    illegal, innocent = toy_losses(masked, masked.live_weights(mask, grad_to="mask"))
    mask_objective(illegal, innocent, mask, GuardConfig(sparsity_weight=0.0)).backward()
    grad_a, grad_b = masked.logits.grad.tolist()
    # Freezing `a` reverts it to 0 and raises the illegal loss: descent raises its logit.
    assert grad_a < 0
    # Freezing `b` would hurt the innocent task: descent lowers its logit.
    assert grad_b > 0
    # Hand-checked value: d/dx_a of -L_ill = -dL/dm_a * m(1-m)/T, with L_ill = (3(1-m_a) - 3)^2 = 9 m_a^2.
    m_a = float(mask[0].detach())
    assert grad_a == pytest.approx(-18 * m_a * m_a * (1 - m_a) / 0.2, rel=1e-4)


def test_sparsity_pulls_the_mean_mask_towards_the_ratio():
    masked = MaskedWeights(TwoTensors(), temperature=0.2, logits=torch.full((2,), -1.0))
    mask = masked.mask()
    zero = torch.zeros(())
    mask_objective(zero, zero, mask, GuardConfig(ratio=0.5, sparsity_weight=1.0)).backward()
    assert (masked.logits.grad < 0).all()  # the mean (0.007) is below 0.5: every logit goes up


def test_live_weights_mix_pre_and_fine_tuned_and_route_gradients():
    model = TwoTensors()
    masked = MaskedWeights(model, temperature=0.2, logits=torch.tensor([0.1, -0.3]))
    with torch.no_grad():
        model.a.copy_(torch.tensor([1.0, 2.0, 3.0]))
        model.b.copy_(torch.tensor([-1.0, 0.5, 4.0]))
    mask = masked.mask()
    live = masked.live_weights(mask, grad_to="mask")
    for i, name in enumerate(masked.names):
        expected = mask[i] * masked.w_pre[name] + (1 - mask[i]) * masked.w_ft[name]
        torch.testing.assert_close(live[name], expected)
    # The user's step sees the mask as a constant; its gradient on W_ft is (1 - m) dL/dW.
    user_live = masked.live_weights(mask, grad_to="user")
    user_live["a"].sum().backward()
    torch.testing.assert_close(model.a.grad, (1 - mask[0].detach()).expand(3))
    assert masked.logits.grad is None
    masked.restore_pre()
    assert torch.equal(model.a.detach(), torch.zeros(3))


def _storages_of_shape(shape) -> set[int]:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some torch.distributed objects warns
        warnings.simplefilter("ignore")
        return {t.untyped_storage().data_ptr() for t in gc.get_objects()
                if isinstance(t, torch.Tensor) and tuple(t.shape) == shape}


def test_mask_learning_holds_only_two_copies_of_the_weights():
    from accelerate import Accelerator

    pipe = build_tiny_pipeline("sd1")
    probe_shape = tuple(pipe.unet.conv_in.weight.shape)  # unique within one tiny UNet
    before = _storages_of_shape(probe_shape)  # this UNet's weight (to become W_ft) and other tests' models
    assert pipe.unet.conv_in.weight.untyped_storage().data_ptr() in before
    recipe = MaskLearningRecipe(pipe, _encoded(pipe, 4, 1, "red circle"), _encoded(pipe, 4, 2, "blue square"),
                                short_config(user_optimizer="sgd"))
    recipe.setup(Accelerator(cpu=True))
    generator = torch.Generator().manual_seed(0)
    recipe.loss(1, generator).backward()  # init, user steps and the mask objective have all run
    del generator
    # Exactly one new copy (W_pre) survives a step: no third copy, no live model kept around.
    new = _storages_of_shape(probe_shape) - before
    assert new == {recipe.masked.w_pre["conv_in.weight"].untyped_storage().data_ptr()}
    unet_bytes = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    pre_bytes = sum(t.numel() * t.element_size() for t in recipe.masked.w_pre.values())
    assert pre_bytes == unet_bytes
    recipe.finish()


def _encoded(pipe, n, seed, word):
    from conceptguard.diffusion import image_size
    from conceptguard.finetune import images_and_captions

    return images_and_captions(tiny_pairs(n, seed, word), image_size(pipe))


# --- exact ratios ------------------------------------------------------------------------------


def test_top_k_hits_the_ratio_exactly_and_breaks_ties_by_name():
    soft = {f"t{i:02d}": 0.5 for i in range(10)}  # all tied: the first names win
    assert top_k_frozen(soft, 0.3) == ["t00", "t01", "t02"]
    soft.update({"t09": 0.9, "t05": 0.7})
    assert top_k_frozen(soft, 0.3) == ["t00", "t05", "t09"]
    # Rounding the soft mask would freeze all ten (every value >= 0.5); top-k freezes exactly 3.
    assert len(top_k_frozen(soft, 0.3)) == 3
    assert exact_count(0.3, 326) == 98 and exact_count(0.25, 10) == 3 and exact_count(0.0, 5) == 0
    with pytest.raises(ConceptGuardError):
        exact_count(1.5, 10)


def test_random_baseline_is_exact_seeded_and_order_independent():
    names = [f"layer{i}.weight" for i in range(50)]
    first = random_frozen(names, 0.2, seed=3)
    assert len(first) == 10 and len(set(first)) == 10
    assert random_frozen(list(reversed(names)), 0.2, seed=3) == first
    assert random_frozen(names, 0.2, seed=4) != first


# --- the mask file -------------------------------------------------------------------------------


def test_mask_file_round_trip_is_keyed_by_tensor_name(tiny_sd1, tmp_path):
    mask = random_mask(tiny_sd1, 0.25, seed=7)
    path = mask.save(tmp_path / "mask.safetensors")
    names = [name for name, _ in tiny_sd1.unet.named_parameters()]
    stored = load_file(path)
    assert {k for k in stored if not k.startswith("soft/")} == set(names)
    assert sum(int(stored[name]) for name in names) == exact_count(0.25, len(names))
    loaded = GuardMask.load(path)
    assert loaded.frozen == mask.frozen and loaded.soft == mask.soft
    manifest = loaded.manifest
    assert manifest["base_model_hash"] == content_hash(tiny_sd1)
    assert manifest["frozen_tensors"] == len(mask.frozen) and manifest["total_tensors"] == len(names)
    assert 0 < manifest["ratio_parameters"] < 1 and manifest["conceptguard_version"]
    metadata = read_safetensors_header(path)["__metadata__"]
    assert json.loads(metadata["manifest"])["method"] == "random"
    loaded.check_model(tiny_sd1)


def test_mask_for_another_model_is_refused(tiny_sd1, tmp_path):
    mask = GuardMask.load(random_mask(tiny_sd1, 0.3).save(tmp_path / "mask.safetensors"))
    with pytest.raises(ConceptGuardError, match="made for model"):
        mask.check_model(build_tiny_pipeline("sd1", seed=1))
    with pytest.raises(ConceptGuardError, match="made for model"):
        mask.check_model(build_tiny_pipeline("sd2"))


def _rewrite(path, edit_tensors=None, edit_manifest=None):
    metadata = dict(read_safetensors_header(path)["__metadata__"])
    tensors = load_file(path)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_manifest:
        manifest = json.loads(metadata["manifest"])
        edit_manifest(manifest)
        metadata["manifest"] = json.dumps(manifest, sort_keys=True)
    save_file(tensors, path, metadata=metadata)


def test_tampered_masks_are_refused(tiny_sd1, tmp_path):
    mask = random_mask(tiny_sd1, 0.3)
    frozen_name = sorted(mask.frozen)[0]

    unfrozen = mask.save(tmp_path / "a.safetensors")
    _rewrite(unfrozen, edit_tensors=lambda t: t.__setitem__(frozen_name, torch.tensor(0, dtype=torch.uint8)))
    with pytest.raises(ConceptGuardError, match="modified after it was written"):
        GuardMask.load(unfrozen)

    rehashed = mask.save(tmp_path / "b.safetensors")
    _rewrite(rehashed, edit_manifest=lambda m: m.__setitem__("base_model_hash", "0" * 64))
    with pytest.raises(ConceptGuardError, match="modified after it was written"):
        GuardMask.load(rehashed)

    foreign = tmp_path / "c.safetensors"
    save_file({"x": torch.zeros(1)}, foreign)
    with pytest.raises(ConceptGuardError, match="not a conceptguard guard mask"):
        GuardMask.load(foreign)
    with pytest.raises(ConceptGuardError, match="not found"):
        GuardMask.load(tmp_path / "missing.safetensors")


# --- learning on a tiny pipeline ---------------------------------------------------------------


def test_learn_mask_hits_the_ratio_and_leaves_the_base_model_intact(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    before = content_hash(pipe)
    result = learn_mask(pipe, tiny_pairs(4, 1, "red circle"), tiny_pairs(4, 2, "blue square"), tmp_path / "run",
                        config=short_config(), train_config=guard_train_config(steps=2, progress=False))
    assert content_hash(pipe) == before
    mask = result.mask
    total = len(list(pipe.unet.parameters()))
    assert len(mask.frozen) == exact_count(0.3, total)
    assert mask.manifest["base_model_hash"] == before
    assert mask.manifest["domains"]["illegal"][0]["pairs"] == 4
    assert mask.manifest["config"]["guard"]["ratio"] == 0.3
    log = [json.loads(line) for line in (tmp_path / "run" / "guard_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [1, 2]
    # The paper's init: mask near 0, W_ft fine-tuned; every soft value moved off its start.
    assert all(0 < value < 0.05 for value in mask.soft.values())
    mask.check_model(pipe)


def test_mask_learning_resumes_bit_identically(tmp_path):
    def run(run_dir, steps, resume=False):
        pipe = build_tiny_pipeline("sd1")
        return learn_mask(pipe, tiny_pairs(4, 1, "red circle"), tiny_pairs(4, 2, "blue square"), run_dir,
                          config=short_config(), resume=resume,
                          train_config=guard_train_config(steps=steps, checkpoint_every=1, progress=False))

    straight = run(tmp_path / "straight", 3)
    run(tmp_path / "split", 2)
    resumed = run(tmp_path / "split", 3, resume=True)
    assert resumed.train.start_step == 2
    assert resumed.mask.soft == straight.mask.soft
    final_straight = ckpt.checkpoint_path(tmp_path / "straight", 3)
    final_split = ckpt.checkpoint_path(tmp_path / "split", 3)
    a, b = ckpt.load_recipe_state(final_straight), ckpt.load_recipe_state(final_split)
    assert set(a) == set(b) and any(k.startswith("user_optimizer.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # W_ft and the user's Adam moments
    assert torch.equal(ckpt.load_trainable_parameters(final_straight)["mask_logits"],
                       ckpt.load_trainable_parameters(final_split)["mask_logits"])
    lines = (tmp_path / "split" / "guard_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_learn_mask_runs_on_every_family(family, tmp_path):
    pipe = build_tiny_pipeline(family)
    result = learn_mask(pipe, tiny_pairs(2, 1, "red circle"), tiny_pairs(2, 2, "blue square"), tmp_path / "run",
                        config=short_config(inner_steps=1, init_steps=1), train_config=guard_train_config(
                            steps=1, progress=False))
    assert len(result.mask.frozen) == exact_count(0.3, len(result.mask.soft))
    assert result.mask.manifest["family"] == family
    result.mask.check_model(pipe)


def test_mask_update_can_share_noise_between_domains_and_use_its_own_batch_size():
    from accelerate import Accelerator

    pipe = build_tiny_pipeline("sd1")
    recipe = MaskLearningRecipe(pipe, _encoded(pipe, 4, 1, "red circle"), _encoded(pipe, 6, 2, "blue square"),
                                short_config(mask_batch_size=3, shared_noise=True))
    recipe.setup(Accelerator(cpu=True))
    drawn = {}
    for domain in ("illegal", "innocent"):
        data = getattr(recipe, domain)
        original = data.draw

        def record(batch_size, generator, domain=domain, original=original):
            batch = original(batch_size, generator)
            drawn.setdefault(domain, []).append(batch)
            return batch
        data.draw = record
    recipe.loss(1, torch.Generator().manual_seed(0))
    # The user's steps draw independent batches of batch_size; the mask update's last draw is the shared one.
    user_illegal, user_innocent = drawn["illegal"][0], drawn["innocent"][0]
    assert user_illegal[0].shape[0] == 2 and not torch.equal(user_illegal[1], user_innocent[1])
    (_, t_ill, _, target_ill), (_, t_inn, _, target_inn) = drawn["illegal"][-1], drawn["innocent"][-1]
    assert t_ill.shape[0] == 3 and torch.equal(t_ill, t_inn)
    assert torch.equal(target_ill, target_inn)  # epsilon targets: the same noise
    recipe.finish()
