#!/usr/bin/env python
"""Does a trained RefAny3D model use its reference views? Flow losses under swapped conditions,
and where its targets' attention goes.

A model that draws *this* asset must predict its targets better from the asset's own views than
from another asset's. On held-out samples, with t and the noise fixed so that only the condition
changes, this prints the stage-1 flow loss of each target (RGB, point map) given

- the caption and the sample's own views (as trained),
- the caption and another sample's views (another asset: the views carry nothing about this one),
- the caption and black views (what reference dropout and image guidance show the model),
- an empty caption and the own views,

and the gain of the own views over another asset's. It then records the attention of one joint
pass (`refany3d.transformer.AttentionRecorder`) and prints, per block, the share of each target's
attention that goes to the text, the two targets and the two kinds of views. Seconds on a CPU for
the embedded model, where `benchmarks/quality.py` takes minutes, so it also tracks a training run.

    python benchmarks/reference_use.py --data VAL_DIR [--base DIR --ref DIR] [--count 32]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refany3d.cli import add_ablation_flags, positive_int, run_reporting_errors  # noqa: E402
from refany3d.conditions import pack_latents  # noqa: E402
from refany3d.data import SampleDataset, collate, dataset_manifest, other_asset_indices  # noqa: E402
from refany3d.pipeline import RefAny3DPipeline, default_model  # noqa: E402
from refany3d.train import RefAny3DInputs, RefAny3DObjective  # noqa: E402
from refany3d.transformer import AttentionRecorder, branch_attention, joint_forward  # noqa: E402

KEY_GROUPS = ("text", "RGB target", "point-map target", "RGB views", "point-map views")


def conditions(inputs: dict, others: list[int], black: torch.Tensor, empty_caption: tuple[torch.Tensor, torch.Tensor]) -> dict[str, dict]:
    """The same targets under each condition the table compares."""
    swapped = {k: inputs[k][others] for k in ("rgb_views", "pm_views")}
    blacks = {k: black.expand_as(inputs[k]).clone() for k in ("rgb_views", "pm_views")}
    text, pooled = (x.expand(inputs["text"].shape[0], *x.shape[1:]) for x in empty_caption)
    return {"own views": inputs, "another asset's views": {**inputs, **swapped}, "black views": {**inputs, **blacks},
            "own views, empty caption": {**inputs, "text": text, "pooled": pooled}}


def attention_shares(objective: RefAny3DObjective, inputs: dict, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """(blocks, targets, 5): per block, each target's attention shares over KEY_GROUPS (0 for the
    point-map groups of a model without the point-map branch)."""
    branches, target = objective.noised_branches(**inputs, t=t, noise=noise)
    with AttentionRecorder() as recorder:
        joint_forward(objective.transformer, branches, objective.domain_embedder, objective.group_mask)
    targets, n = target.shape[1], inputs["rgb_views"].shape[1]
    shares = branch_attention(recorder.maps, [b.hidden.shape[1] for b in branches])[:, 1:1 + targets]  # target queries
    # keys: text, the targets, then the N views of each domain summed
    text_and_targets = shares[..., : 1 + targets]
    views = [shares[..., 1 + targets + k * n: 1 + targets + (k + 1) * n].sum(-1, keepdim=True) for k in range(targets)]
    if targets == 1:  # no point-map target and views: their columns are zero
        zero = torch.zeros_like(views[0])
        return torch.cat([text_and_targets, zero, views[0], zero], -1)
    return torch.cat([text_and_targets, *views], -1)


@torch.no_grad()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--data", required=True, help="held-out dataset (make-data --split val)")
    ap.add_argument("--base", help="base model folder (default: the embedded model)")
    ap.add_argument("--ref", help="RefAny3D weights folder (default: the embedded model)")
    ap.add_argument("--count", type=positive_int, default=32)
    ap.add_argument("--resolution", type=positive_int, help="default: the model's (its settings.json; embedded: 64)")
    ap.add_argument("--condition-size", type=positive_int, help="size of the reference views (default: the model's; embedded: 32)")
    ap.add_argument("--views", type=positive_int, help="default: the model's (embedded: 4)")
    ap.add_argument("--times", type=float, nargs="+", default=[0.5, 0.8, 0.95], help="flow times t to probe")
    ap.add_argument("--attention-time", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    add_ablation_flags(ap, "probe")
    args = ap.parse_args()
    if args.count < 2:
        ap.error("--count must be at least 2 (another sample's views stand for another asset)")
    if not all(0.0 <= t <= 1.0 for t in [*args.times, args.attention_time]):
        ap.error("flow times (--times, --attention-time) must be within [0, 1]")

    pipe = RefAny3DPipeline.from_pretrained(*default_model(base=args.base, ref=args.ref), device="cpu")
    for name, key in (("resolution", "height"), ("condition_size", "condition_size"), ("views", "n_views")):
        if getattr(args, name) is None:
            setattr(args, name, pipe.default_settings[key])
    for flag in ("group_mask", "pointmap_branch"):  # an ablation model's settings.json names its flag
        if getattr(args, flag) is None:
            setattr(args, flag, pipe.default_settings[flag])
    stored = dataset_manifest(args.data)
    if stored.get("n_views", args.views) % args.views:
        ap.error(f"{args.data} holds {stored['n_views']} views per asset; --views must divide it "
                 f"(the model's own: {pipe.default_settings['n_views']})")
    dataset = SampleDataset([args.data], args.resolution, args.views, shuffle=False, repeat=False)
    count = min(args.count, len(dataset))
    batch = collate([dataset.item(i) for i in range(count)])
    assets = [json.loads((folder / "meta.json").read_text())["asset"] for _, folder in dataset.samples[:count]]
    torch.manual_seed(args.seed)  # the VAE's posterior samples
    make_inputs = RefAny3DInputs(pipe.flux, args.condition_size, torch.Generator(), text_dropout=0.0, reference_dropout=0.0)
    inputs = make_inputs(batch)
    black = make_inputs.black_view()
    empty = make_inputs.encode_text([""])[:2]
    objective = RefAny3DObjective(pipe.flux.transformer, pipe.domain_embedder, args.views, args.group_mask,
                                  args.pointmap_branch).eval()
    b = inputs["rgb_latents"].shape[0]
    noise = torch.randn(b, 2, *pack_latents(inputs["rgb_latents"]).shape[1:], generator=torch.Generator().manual_seed(args.seed))

    print(f"flow loss on {b} held-out samples of {args.data} (lower is better), RGB / point map")
    cases = conditions(inputs, other_asset_indices(assets), black, empty)
    print("| t | " + " | ".join(cases) + " | gain of own views over another asset's |")
    print("|---" * (len(cases) + 2) + "|")
    for value in args.times:
        t = torch.full((b,), value)
        losses = {name: [x.item() for x in objective.branch_losses(**kw, t=t, noise=noise)] for name, kw in cases.items()}
        own, other = losses["own views"], losses["another asset's views"]
        gain = " / ".join(f"{100 * (o / m - 1):+.1f}%" for m, o in zip(own, other))
        print(f"| {value} | " + " | ".join(" / ".join(f"{x:.4f}" for x in pair) for pair in losses.values()) + f" | {gain} |")

    shares = attention_shares(objective, inputs, torch.full((b,), args.attention_time), noise)
    print(f"\nattention of the targets at t = {args.attention_time} (share per key group; rows sum to 1)")
    print("| block | target | " + " | ".join(KEY_GROUPS) + " |")
    print("|---" * (len(KEY_GROUPS) + 2) + "|")
    for block, per_target in enumerate(shares):
        for target, row in zip(("RGB", "point map"), per_target):  # RGB alone without the point-map branch
            print(f"| {block} | {target} | " + " | ".join(f"{x:.3f}" for x in row.tolist()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
