"""Reference views -> condition tokens: the model inputs that carry the asset.

Every view (RGB or point map) is resized to `condition_size`, VAE-encoded, shifted/scaled like
FLUX latents and packed into 2x2 patches, exactly as the targets are. Its rotary position ids are
its own latent grid shifted by CONDITION_POSITION_DELTA, so the model tells views from the target.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

# (row, column) shift of every condition's position ids, in latent tokens: the release's value.
CONDITION_POSITION_DELTA = (0, -32)


def black_like(images: Sequence[Image.Image]) -> list[Image.Image]:
    """All-black stand-ins for the reference views: the 'no reference' input of image guidance."""
    return [Image.new("RGB", img.size, (0, 0, 0)) for img in images]


def latent_position_ids(latent_height: int, latent_width: int, delta: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """(H/2*W/2, 3) ids of packed 2x2 latent patches: (0, row + d_row, col + d_col)."""
    rows, cols = latent_height // 2, latent_width // 2
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None] + delta[0]
    ids[..., 2] = torch.arange(cols)[None, :] + delta[1]
    return ids.reshape(rows * cols, 3)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2*W/2, 4C): FLUX's 2x2 patch tokens."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """Inverse of pack_latents."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, latent_height // 2, latent_width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, latent_height, latent_width)


def view_posterior(vae, image_processor, image: Image.Image, size: int):
    """The VAE's posterior of one view resized to size x size (the deterministic, costly part)."""
    pixels = image_processor.preprocess([image], height=size, width=size)
    return vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist


def sample_latents(vae, posterior, generator: torch.Generator | None = None) -> torch.Tensor:
    """A posterior sample drawn from `generator` (so seeded calls repeat), FLUX-normalized."""
    return (posterior.sample(generator=generator) - vae.config.shift_factor) * vae.config.scaling_factor


def pack_conditions(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views' latents (N, C, h, w) -> packed tokens (N, L, 4C) and their shared position ids (L, 3)."""
    ids = latent_position_ids(latents.shape[2], latents.shape[3], CONDITION_POSITION_DELTA)
    return pack_latents(latents), ids.to(latents.device)


def condition_tokens(
    vae, image_processor, images: Sequence[Image.Image], size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed condition tokens (N, L, 4C) and their shared position ids (L, 3).

    Views are encoded one at a time, as the release does: the VAE's batched forward differs from
    its single-image forward by up to ~1e-3 on CPU, enough to move outputs past parity tolerance.
    """
    posteriors = [view_posterior(vae, image_processor, img, size) for img in images]
    return pack_conditions(torch.cat([sample_latents(vae, post, generator) for post in posteriors]))
