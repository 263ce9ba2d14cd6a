"""The speed switches of issue #9 on tiny random-init pipelines: trajectory pools (ESD, SDD),
compiled sampling, SDPA attention, bf16 autocast and gradient checkpointing.

Each switch must leave the method's mathematics alone: pooled states are the per-step sampler's
latents, checkpointed gradients are the plain ones, and a pooled run is seeded and resumes bit for
bit. The effect on erasure is measured on the embedded world in ``tests/test_esd.py`` (``-m world``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptguard.diffusion import encode_prompts
from conceptguard.methods.esd import ESDConfig, ESDRecipe
from conceptguard.methods.sdd import SDDConfig, SDDRecipe
from conceptguard.methods.trajectory import (
    PartialDDIM,
    TrajectoryPool,
    compile_predictor,
    empty_conditioning,
    latent_shape,
    module_predictor,
)
from conceptguard.models.params import select_for
from conceptguard.models.tiny import build_tiny_pipeline
from conceptguard.training import TrainConfig, train
from conceptguard.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def quick(**overrides) -> TrainConfig:
    values = dict(steps=4, lr=1e-3, optimizer="adam", max_grad_norm=0.0, progress=False, checkpoint_every=1)
    values.update(overrides)
    return TrainConfig(**values)


def ready(recipe):
    from accelerate import Accelerator

    recipe.setup(Accelerator(cpu=True))
    return recipe


# --- trajectory pools -------------------------------------------------------------------------------


def test_pooled_states_are_the_per_step_samplers_latents():
    """State k of a batched trajectory is what the per-step sampler returns after k steps, same x_T."""
    pipe = build_tiny_pipeline("sd1")
    sampler = PartialDDIM(pipe.scheduler.config, num_steps=6, guidance_scale=3.0)
    predict, cond, empty = module_predictor(pipe.unet.eval()), encode_prompts(pipe, ["a cat"]), empty_conditioning(pipe)
    shape = latent_shape(pipe.unet)
    seeds = [3, 4, 5]
    noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    states = sampler.trajectories(predict, cond, empty, noise)
    assert states.shape == (3, 6, *shape[1:])
    for j, seed in enumerate(seeds):
        for k in range(6):
            one = sampler.sample(predict, cond, empty, torch.Generator().manual_seed(seed), shape, device="cpu", k=k)
            torch.testing.assert_close(states[j, k][None], one.latents, rtol=1e-4, atol=1e-5)


def test_pool_hands_out_every_state_once_then_samples_again():
    pipe = build_tiny_pipeline("sd1")
    sampler = PartialDDIM(pipe.scheduler.config, num_steps=4)
    calls = []

    def counting(latents, timesteps, cond):
        calls.append(latents.shape[0])
        return module_predictor(pipe.unet)(latents, timesteps, cond)

    args = (counting, encode_prompts(pipe, ["a cat"]), empty_conditioning(pipe))
    generator = torch.Generator().manual_seed(0)
    pool = TrajectoryPool(sampler, size=2)
    drawn = []
    for step in range(1, 9):
        sample = pool.draw(*args, generator, latent_shape(pipe.unet), step=step, device="cpu")
        low, high = sample.interval
        assert low <= int(sample.timestep) <= high and sample.interval == sampler.interval(sample.steps_done)
        drawn.append((sample.latents, sample.steps_done))
    # One batched run: 3 guided steps (k = 0 is the noise) for both trajectories' CFG branches.
    assert calls == [4, 4, 4] and pool.fills == 1
    # Every (trajectory, k) once: each k exactly twice, no latent handed out twice.
    assert sorted(k for _, k in drawn) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len({latents.sum().item() for latents, _ in drawn}) == 8
    pool.draw(*args, generator, latent_shape(pipe.unet), step=9, device="cpu")
    assert pool.fills == 2 and len(calls) == 6

    # With refresh, a pool is sampled again once it is that many training steps old, when next drawn.
    refreshed = TrajectoryPool(sampler, size=2, refresh=3)
    for step in (1, 2, 3, 4, 5, 9):
        refreshed.draw(*args, generator, latent_shape(pipe.unet), step=step, device="cpu")
    assert refreshed.fills == 3 and refreshed.filled_at == 9


def test_pool_settings_are_checked():
    with pytest.raises(ValueError, match="sampler='frozen'"):
        ESDConfig(concepts=["a cat"], trajectory_pool=4)  # the default sampler is the model being trained
    with pytest.raises(ValueError, match="trajectory_pool"):
        ESDConfig(concepts=["a cat"], sampler="frozen", trajectory_pool=-1)
    with pytest.raises(ValueError, match="pool_refresh"):
        SDDConfig(concepts=["a cat"], trajectory_pool=2, pool_refresh=-1)
    assert ESDConfig().trajectory_pool == 0 and SDDConfig().trajectory_pool == 0  # off by default: the papers
    assert SDDConfig().pool_refresh == 50


def _esd_run(run_dir, steps, resume=False, **config):
    pipe = build_tiny_pipeline("sd1")
    esd = ESDConfig(concepts=["a cat", "a dog"], ddim_steps=5, **config)
    recipe = ESDRecipe(pipe, esd, list(select_for(pipe.unet, esd)))
    result = train(recipe, quick(steps=steps), run_dir, resume=resume)
    return recipe, result


def test_pooled_esd_is_seeded_and_resumes_bit_identically(tmp_path):
    pooled = dict(sampler="frozen", trajectory_pool=2)
    straight, result = _esd_run(tmp_path / "straight", 4, **pooled)
    again, _ = _esd_run(tmp_path / "again", 4, **pooled)
    _esd_run(tmp_path / "split", 2, **pooled)
    resumed, _ = _esd_run(tmp_path / "split", 4, resume=True, **pooled)
    # Both concepts' pools were filled once (4 draws, 10 states each) and went into the checkpoint.
    assert sum(pool.fills for pool in straight.pools) == 2
    assert {"pool.0.states", "pool.1.order"} <= set(ckpt.load_recipe_state(result.checkpoint))
    for recipe in (again, resumed):
        for name, param in straight.trainable_parameters().items():
            assert torch.equal(param, recipe.trainable_parameters()[name]), name


def test_pooled_sdd_samples_again_from_the_teacher_and_resumes_bit_identically(tmp_path):
    def run(run_dir, steps, resume=False):
        pipe = build_tiny_pipeline("sd1")
        sdd = SDDConfig(concepts=["a cat"], ddim_steps=4, trajectory_pool=2, pool_refresh=3)
        recipe = SDDRecipe(pipe, sdd, list(select_for(pipe.unet, sdd)))
        train(recipe, quick(steps=steps, optimizer="adamw", warmup_steps=0), run_dir, resume=resume)
        return recipe

    straight = run(tmp_path / "straight", 7)
    assert straight.pools[0].fills == 3  # steps 1, 4 and 7
    run(tmp_path / "split", 5)
    resumed = run(tmp_path / "split", 7, resume=True)
    for name, ema in straight.ema.items():
        assert torch.equal(ema, resumed.ema[name]), name


# --- compiled sampling, SDPA, bf16 -------------------------------------------------------------------


def test_compile_sampler_is_a_no_op_off_cuda():
    predict = module_predictor(build_tiny_pipeline("sd1").unet)
    assert compile_predictor(predict, "cpu") is predict


def test_compiled_predictor_traces_the_unet_and_matches_it(monkeypatch):
    """The CUDA path, traced on the CPU: dynamo with a backend that needs no GPU in place of CUDA graphs."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: real_compile(fn, backend="aot_eager"))
    pipe = build_tiny_pipeline("sd1")
    predict = module_predictor(pipe.unet.eval())
    compiled = compile_predictor(predict, "cuda")
    assert compiled is not predict
    cond = encode_prompts(pipe, ["a cat"])
    latents = torch.randn(latent_shape(pipe.unet), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        torch.testing.assert_close(compiled(latents, t, cond), predict(latents, t, cond))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_unets_attend_with_sdpa(family, tmp_path):
    """diffusers' default AttnProcessor2_0 (torch's scaled_dot_product_attention), also after a reload."""
    from conceptguard.models.io import load_pipeline

    pipe = build_tiny_pipeline(family)
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    pipe.save_pretrained(tmp_path / "pipeline", safe_serialization=True)
    reloaded = load_pipeline(str(tmp_path / "pipeline"))
    assert {type(p).__name__ for p in reloaded.unet.attn_processors.values()} == {"AttnProcessor2_0"}


@pytest.mark.parametrize("pool", [0, 2])
def test_bf16_autocast_reaches_the_esd_unet_and_keeps_fp32_weights(pool, tmp_path):
    pipe = build_tiny_pipeline("sd1")
    config = ESDConfig(concepts=["a cat"], ddim_steps=4, sampler="frozen", trajectory_pool=pool)
    recipe = ESDRecipe(pipe, config, list(select_for(pipe.unet, config)))
    seen = {"grad": set(), "no_grad": set()}
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q
    layer.register_forward_hook(
        lambda module, args, out: seen["grad" if torch.is_grad_enabled() else "no_grad"].add(out.dtype))
    train(recipe, quick(steps=2, mixed_precision="bf16"), tmp_path / "run")
    # The sampler and the frozen target (no grad) and the trained forward all ran in bf16 ...
    assert seen == {"grad": {torch.bfloat16}, "no_grad": {torch.bfloat16}}
    # ... on fp32 master weights.
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())


# --- gradient checkpointing --------------------------------------------------------------------------


def _gradients(loss_fn, params, checkpointing_of, enable):
    checkpointing_of(enable)
    for p in params:
        p.grad = None
    grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
    checkpointing_of(False)
    return grads


def _assert_same(plain, checkpointed):
    assert any(g is not None for g in plain)
    for a, b in zip(plain, checkpointed):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_checkpointed_esd_gradients_are_the_plain_ones(family):
    pipe = build_tiny_pipeline(family)
    recipe = ready(ESDRecipe(pipe, ESDConfig(concepts=["a cat"], variant="all", ddim_steps=4),
                             [n for n, _ in pipe.unet.named_parameters()]))
    params = list(recipe.trainable_parameters().values())
    pipe.unet.train()

    def loss():
        return recipe.loss(1, torch.Generator().manual_seed(1))

    plain = _gradients(loss, params, recipe.set_gradient_checkpointing, False)
    _assert_same(plain, _gradients(loss, params, recipe.set_gradient_checkpointing, True))


def test_checkpointed_guard_gradients_are_the_plain_ones():
    """FreezeAsGuard runs the UNet through functional_call with live weights; diffusers' stock
    checkpointing would recompute with the stored weights and get these gradients wrong."""
    from conceptguard.guard import GuardConfig, MaskLearningRecipe
    from conceptguard.finetune import images_and_captions

    pipe = build_tiny_pipeline("sd1")
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "a cat") for _ in range(2)]
    recipe = ready(MaskLearningRecipe(pipe, images_and_captions(pairs, 16), images_and_captions(pairs, 16),
                                      GuardConfig(batch_size=2, init="code")))
    masked = recipe.masked
    with torch.no_grad():  # W_ft away from W_pre, so the mask has something to choose
        for param in masked.w_ft.values():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(2)))
    pipe.unet.train()

    for grad_to, params in (("mask", [masked.logits]), ("user", list(masked.w_ft.values()))):
        def loss():
            weights = masked.live_weights(masked.mask(), grad_to=grad_to)
            illegal, innocent = recipe._domain_losses(weights, torch.Generator().manual_seed(3))
            return illegal - innocent

        plain = _gradients(loss, params, recipe.set_gradient_checkpointing, False)
        _assert_same(plain, _gradients(loss, params, recipe.set_gradient_checkpointing, True))


def test_the_loop_turns_gradient_checkpointing_on_for_the_run_only(tmp_path):
    from conceptguard.errors import ConceptGuardError

    pipe = build_tiny_pipeline("sd1")
    config = ESDConfig(concepts=["a cat"], ddim_steps=3)
    seen = []

    class Recording(ESDRecipe):
        def loss(self, step, generator):
            seen.append(pipe.unet.down_blocks[0].gradient_checkpointing)
            return super().loss(step, generator)

    train(Recording(pipe, config, list(select_for(pipe.unet, config))), quick(steps=2, gradient_checkpointing=True),
          tmp_path / "run")
    assert seen == [True, True] and not pipe.unet.down_blocks[0].gradient_checkpointing

    class NoHook:
        def setup(self, accelerator): ...

        def trainable_parameters(self): ...

        def loss(self, step, generator): ...

    with pytest.raises(ConceptGuardError, match="gradient_checkpointing"):
        train(NoHook(), quick(gradient_checkpointing=True), tmp_path / "other")


# --- the benchmark script ------------------------------------------------------------------------------


def test_the_scale_benchmark_runs_at_tiny_scale_on_the_cpu():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "methods_at_scale.py"), "--device", "cpu", "--scale", "tiny",
         "--steps", "2", "--warmup", "1", "--pool", "2", "--ddim-steps", "10"],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    for method in ("full FT", "ESD-x faithful", "ESD-x pooled", "SDD", "UCE", "mask step", "guarded FT"):
        assert method in out.stdout, out.stdout
    assert "failed" not in out.stdout, out.stdout
