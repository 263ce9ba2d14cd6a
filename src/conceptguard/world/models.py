"""Architectures of the embedded world's models.

The tiny pipeline is made of the same diffusers/transformers classes as Stable Diffusion 1.x —
only smaller — so every method runs on it through the same code paths as on SD:
- AutoencoderKL with 4× down-sampling (64×64 RGB ↔ 16×16×4 latents);
- UNet2DConditionModel with cross-attention (``attn1``/``attn2`` named as in SD);
- CLIPTextModel + CLIPTokenizer, trained contrastively with a CLIP vision tower that we keep as the
  world's CLIP-score model;
- DDIM scheduler with SD's scaled-linear betas.

The detector is a small CNN with one head per concept kind; its penultimate features feed the
world-FID and the LPIPS-like distance.
"""

from __future__ import annotations

import torch
from torch import nn

from conceptguard.world.concepts import HEADS

IMAGE_SIZE = 64
LATENT_CHANNELS = 4
LATENT_SIZE = 16
TEXT_HIDDEN = 64
MAX_TOKENS = 20

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=LATENT_CHANNELS,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
)

UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    block_out_channels=(32, 64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=TEXT_HIDDEN,
    attention_head_dim=4,
    norm_num_groups=16,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def clip_config(vocab_size: int):
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
                          num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                          projection_dim=64, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                          pad_token_id=vocab_size - 1)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=96, intermediate_size=384,
                              num_hidden_layers=4, num_attention_heads=4, projection_dim=64)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=64)


class Detector(nn.Module):
    """Multi-head classifier of the world's concepts.

    Input: images in [-1, 1], (N, 3, 64, 64). ``forward`` returns logits per head;
    ``features`` the 256-d penultimate embedding (world-FID), ``feature_maps`` the per-stage
    activations (the LPIPS-like distance).
    """

    def __init__(self, width: int = 32, heads: dict[str, tuple[str, ...]] | None = None):
        super().__init__()
        self.heads_spec = dict(heads or HEADS)

        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.AvgPool2d(2))

        self.stages = nn.ModuleList([stage(3, width), stage(width, 2 * width), stage(2 * width, 4 * width),
                                     stage(4 * width, 4 * width)])
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, 256), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(labels)) for name, labels in self.heads_spec.items()})

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps, x = [], images
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.feature_maps(images)[-1])

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, list[str]]:
        """Label names per head for a batch of images in [-1, 1]."""
        out: dict[str, list[str]] = {name: [] for name in self.heads_spec}
        for chunk in images.split(batch_size):
            logits = self(chunk)
            for name, labels in self.heads_spec.items():
                out[name] += [labels[i] for i in logits[name].argmax(-1).tolist()]
        return out
