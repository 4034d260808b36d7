#!/usr/bin/env python
"""Stage-1 activation memory on FLUX.1-dev, with and without `--gradient-checkpointing`.

A FLUX.1-dev stage-1 step cannot be run on this machine, but what autograd keeps for the backward
pass can be counted on a model of FLUX.1-dev's width with fewer blocks. This script builds the
stage-1 objective (LoRA adapters, domain embedder, group mask) on FLUX-width transformers with no
block, one double block and one single block; runs one forward pass at two image sizes; and sums the
bytes of the tensors autograd saves (each storage once, the weights left out: they are resident
anyway; the group mask, shared by all blocks, is added once). The differences give each block
kind's bytes per token (the slope between the two sizes; the count grows linearly with the
tokens, as an earlier probe at 1152 and 3072 rows found), which it extrapolates to FLUX.1-dev's
19 double and 38 single blocks at the asked resolution and view counts. With checkpointing a block keeps only its input, and the
backward pass holds one block's activations at a time on top.

    python benchmarks/train_memory.py                     # 512 px, 4 and 8 views, batch 1, bf16
    python benchmarks/train_memory.py --resolution 1024 --views 4
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refany3d.cli import positive_int, run_reporting_errors  # noqa: E402
from refany3d.train import RefAny3DObjective, train_only_lora  # noqa: E402
from refany3d.weights import add_refany3d_adapters, new_domain_embedder  # noqa: E402

FLUX_DEV = dict(num_layers=19, num_single_layers=38, heads=24, head_dim=128, text_dim=4096, text_tokens=512,
                latent_channels=16, vae_factor=8)
GIB = 2**30


def saved_bytes(double: int, single: int, heads: int, latent_grid: int, views: int, checkpointing: bool) -> int:
    """Bytes autograd keeps after one stage-1 forward pass (batch 1, bf16) of a FLUX-width model with
    `double` + `single` blocks on targets and views of latent_grid² latent cells."""
    from diffusers import FluxTransformer2DModel

    flux = FLUX_DEV
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * flux["latent_channels"], num_layers=double, num_single_layers=single,
        attention_head_dim=flux["head_dim"], num_attention_heads=heads, joint_attention_dim=flux["text_dim"],
        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    ).to(torch.bfloat16)
    add_refany3d_adapters(transformer, 16, 16)
    train_only_lora(transformer)
    embedder = new_domain_embedder(heads * flux["head_dim"]).to(torch.bfloat16)
    objective = RefAny3DObjective(transformer, embedder, views, gradient_checkpointing=checkpointing)
    c, g = flux["latent_channels"], latent_grid
    noise = lambda *shape: torch.randn(*shape, dtype=torch.bfloat16)  # noqa: E731
    inputs = dict(rgb_latents=noise(1, c, g, g), pm_latents=noise(1, c, g, g), rgb_views=noise(1, views, c, g, g),
                  pm_views=noise(1, views, c, g, g), text=noise(1, flux["text_tokens"], flux["text_dim"]),
                  pooled=noise(1, 768), guidance=torch.ones(1))
    weights = {id(p) for p in objective.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        # The weights are resident anyway, and the group mask (bool, rows x rows) is one tensor
        # that all blocks share: it is added once to the estimate, not per block.
        if id(base) not in weights and base.dtype != torch.bool:
            kept[base.untyped_storage().data_ptr()] = base.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = objective(**inputs)  # its graph holds every saved tensor until the sum is taken
    total = sum(kept.values())
    del loss
    return total


def tokens(latent_grid: int, views: int) -> int:
    """Rows of the joint pass: T5's tokens, and (grid/2)² packed tokens for each of 2 + 2N image branches."""
    return FLUX_DEV["text_tokens"] + (2 + 2 * views) * (latent_grid // 2) ** 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=positive_int, default=512, help="target and view size in pixels (default 512)")
    ap.add_argument("--views", type=positive_int, nargs="+", default=[4, 8], help="reference views (default 4 8)")
    ap.add_argument("--heads", type=positive_int, default=FLUX_DEV["heads"],
                    help="attention heads of 128 (24: FLUX.1-dev's width; fewer for a quick check of the script)")
    args = ap.parse_args()
    probe_views, grids = 4, (8, 16)  # measured at 64 and 128 px, 4 views: 672 and 1152 rows
    print(f"FLUX width {args.heads * 128}, batch 1, bf16; bytes autograd keeps per row of the joint pass "
          f"(measured at {', '.join(str(tokens(g, probe_views)) for g in grids)} rows):")
    per_row = {}
    for checkpointing in (False, True):
        slopes = {}
        for name, (double, single) in (("none", (0, 0)), ("double", (1, 0)), ("single", (0, 1))):
            sizes = [saved_bytes(double, single, args.heads, g, probe_views, checkpointing) for g in grids]
            slopes[name] = (sizes[1] - sizes[0]) / (tokens(grids[1], probe_views) - tokens(grids[0], probe_views))
        rest = slopes["none"]
        double_block, single_block = slopes["double"] - rest, slopes["single"] - rest
        per_row[checkpointing] = (double_block, single_block, rest)
        print(f"  {'checkpointed' if checkpointing else 'plain':>12}: double block {double_block / 1024:7.1f} KiB, "
              f"single block {single_block / 1024:7.1f} KiB, outside the blocks {rest / 1024:6.1f} KiB")
    grid = args.resolution // FLUX_DEV["vae_factor"]
    plain_double, plain_single, _ = per_row[False]
    print(f"\nFLUX.1-dev ({FLUX_DEV['num_layers']} double + {FLUX_DEV['num_single_layers']} single blocks), "
          f"{args.resolution} px, batch 1: activations kept for the backward pass")
    for views in args.views:
        rows = tokens(grid, views)
        estimates = []
        for checkpointing in (False, True):
            double_block, single_block, rest = per_row[checkpointing]
            total = rows * (FLUX_DEV["num_layers"] * double_block + FLUX_DEV["num_single_layers"] * single_block + rest)
            total += rows * rows  # the group mask, 1 byte per (query, key) pair
            if checkpointing:  # the backward pass recomputes one block at a time
                total += rows * max(plain_double, plain_single)
            estimates.append(total)
        print(f"  {views} views ({rows} rows): plain {estimates[0] / GIB:6.1f} GiB, "
              f"--gradient-checkpointing {estimates[1] / GIB:5.1f} GiB  (x{estimates[0] / estimates[1]:.0f} less)")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
