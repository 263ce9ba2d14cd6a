"""Tiny, randomly initialised pipelines of every supported family, built from configs alone.

They mirror the *layout* of the real models (the parameter names, the SD2 and SDXL specific
options) at a size that runs a full denoising loop in milliseconds on a CPU, so tests and smoke
runs can exercise real diffusers code paths without downloading anything.
"""

from __future__ import annotations

import tempfile

import torch

from conceptguard.errors import ConceptGuardError
from conceptguard.world.tokenizer import build_clip_tokenizer

TINY_FAMILIES = ("sd1", "sd2", "sdxl")

# Every word is a single token of the tiny tokenizer, so prompts made of them exercise the text
# encoder the way real prompts do; any other word still tokenizes, letter by letter.
TINY_WORDS = (
    "a photo of the an in on with and painting drawing style by artist "
    "cat dog car tree house church bird horse person city forest sea"
).split()

# The tiny tokenizer's context length; the text encoders' position tables are sized to it.
TINY_MAX_LENGTH = 16
TEXT_HIDDEN_SIZE = 32


def _tiny_tokenizer():
    # The tokenizer keeps its vocabulary in memory, so its build folder can go right away
    # (pipelines are built many times in tests; leaked folders would pile up in /tmp).
    with tempfile.TemporaryDirectory(prefix="conceptguard-tiny-tok-") as folder:
        return build_clip_tokenizer(list(TINY_WORDS), folder, model_max_length=TINY_MAX_LENGTH)


def _text_config(tokenizer, hidden_act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection_dim} if projection_dim is not None else {}
    # The token ids must be the tokenizer's: CLIP pools the text embedding at the EOS position.
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_LENGTH,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )


def _scheduler(prediction_type: str):
    from diffusers import DDIMScheduler

    # SD's training schedule; set_alpha_to_one=False and no clipping as the real SD configs have.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _build_sd(v_prediction: bool):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _tiny_tokenizer()
    if v_prediction:
        # SD2's UNet: per-block head dims and linear (not 1x1 conv) transformer projections.
        unet_extra = {"attention_head_dim": (2, 4), "use_linear_projection": True}
    else:
        unet_extra = {"attention_head_dim": 8}
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        norm_num_groups=32,
        **unet_extra,
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_act="gelu" if v_prediction else "quick_gelu"))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler("v_prediction" if v_prediction else "epsilon"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl():
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _tiny_tokenizer()
    tokenizer_2 = _tiny_tokenizer()
    projection_dim = 32
    addition_time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        # SDXL conditions on both encoders' hidden states, concatenated along the feature axis.
        cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        # Six micro-conditioning numbers (size, crop, target size), each Fourier-embedded, plus
        # the second encoder's pooled projection.
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + projection_dim,
        norm_num_groups=32,
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_act="quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer_2, hidden_act="gelu", projection_dim=projection_dim))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler("epsilon"),
        # The invisible-watermark package is optional and would only perturb test images.
        add_watermarker=False,
    )


def build_tiny_pipeline(family: str = "sd1", seed: int = 0):
    """A random-init tiny ``StableDiffusionPipeline`` ("sd1", "sd2") or ``StableDiffusionXLPipeline``.

    The same ``family`` and ``seed`` give bit-identical weights; the global torch RNG is left as
    it was, so building a pipeline never changes the randomness of the caller's code.
    """
    builders = {"sd1": lambda: _build_sd(False), "sd2": lambda: _build_sd(True), "sdxl": _build_sdxl}
    if family not in builders:
        raise ConceptGuardError(f"unknown model family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = builders[family]()
    pipe.set_progress_bar_config(disable=True)
    return pipe
