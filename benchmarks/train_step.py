#!/usr/bin/env python
"""Stage-1 training step speed: eager against torch.compile (`train --compile`), side by side.

Builds the RefAny3D objective (LoRA adapters + domain embedder on a frozen base, the group mask)
on the embedded model's base, feeds it random latents of the sizes --resolution and
--condition-size encode to (the embedded model's 64² targets and 32² views by default; 4 views),
and times whole optimizer steps (forward, backward, AdamW) for each batch size, eager and
compiled interleaved round by round, so a busy machine slows both alike. Compile time (the first
compiled step) is printed apart, and so is how many operators (and, on a GPU, kernels) an eager
step runs. Throughput in samples/s shows whether a step is bound by work (grows with the
batch) or by per-operation overhead (flat).

With --data, it also times what comes before each step: turning a batch of a dataset into the
objective's inputs (`train.RefAny3DInputs`: VAE encodings of targets and views, caption
encodings), with the VAE posteriors encoded afresh every time (cache size 0) against remembered
(`train.PosteriorCache`, warmed by one pass over the batches).

    python benchmarks/train_step.py                       # CPU, batch 8
    python benchmarks/train_step.py --batch 8 128         # on a GPU: is the step launch-bound?
    python benchmarks/train_step.py --data data/train     # also the input preparation
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refany3d.cli import positive_int, run_reporting_errors  # noqa: E402
from refany3d.pipeline import EMBEDDED_MODEL_DIR  # noqa: E402
from refany3d.weights import add_refany3d_adapters, new_domain_embedder  # noqa: E402
from refany3d.train import PosteriorCache, RefAny3DInputs, RefAny3DObjective, train_only_lora  # noqa: E402


def build_objective(base: Path, device: str, rank: int, views: int) -> RefAny3DObjective:
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(base / "transformer").to(device)
    add_refany3d_adapters(transformer, rank, rank)
    train_only_lora(transformer)
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    return RefAny3DObjective(transformer, new_domain_embedder(inner).to(device), views).to(device)


def latent_factor(base: Path) -> int:
    """Pixels per latent cell of the base's VAE: 8 for FLUX.1-dev, 4 for the embedded model."""
    config = json.loads((base / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


def random_batch(transformer, batch: int, views: int, target: int, view: int, device: str) -> dict[str, torch.Tensor]:
    c, cfg = transformer.config.in_channels // 4, transformer.config
    rand = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    return {
        "rgb_latents": rand(batch, c, target, target), "pm_latents": rand(batch, c, target, target),
        "rgb_views": rand(batch, views, c, view, view), "pm_views": rand(batch, views, c, view, view),
        "text": rand(batch, 32, cfg.joint_attention_dim), "pooled": rand(batch, cfg.pooled_projection_dim),
        "guidance": torch.ones(batch, device=device),
    }


def count_operations(fn) -> tuple[int, int]:
    """(aten operator calls, nested ones included; GPU kernels) of one call of fn: on a GPU a small
    model's step costs about one launch per kernel, so these say how launch-bound it can be."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    averages = prof.key_averages()
    operators = sum(e.count for e in averages if e.key.startswith("aten::"))
    kernels = sum(e.count for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
    return operators, kernels


def time_inputs(base: Path, data: Path, batch: int, views: int, resolution: int, condition_size: int, device: str,
                rounds: int) -> None:
    """Input preparation of 8 batches, posteriors encoded afresh vs remembered, interleaved per round."""
    from diffusers import FluxPipeline

    from refany3d.data import SampleDataset, collate

    flux = FluxPipeline.from_pretrained(base).to(device)
    dataset = SampleDataset([data], resolution, views, shuffle=False, repeat=False)
    items = [dataset.item(i) for i in range(min(8 * batch, len(dataset)))]
    batches = [collate(items[i:i + batch]) for i in range(0, len(items), batch)]
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    variants = {"afresh": RefAny3DInputs(flux, condition_size, torch.Generator()),
                "cached": RefAny3DInputs(flux, condition_size, torch.Generator())}
    variants["afresh"].encode = PosteriorCache(flux.vae, max_bytes=0)
    for prepare in variants.values():  # warm-up: caption encodings of both, the posteriors of "cached"
        for b in batches:
            prepare(b)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, prepare in variants.items():
            start = time.perf_counter()
            for b in batches:
                prepare(b)
            times[name].append((time.perf_counter() - start) / len(batches))
    afresh = statistics.median(times["afresh"])
    for name, values in times.items():
        t = statistics.median(values)
        print(f"  inputs of a batch of {batch}, posteriors {name:>6}: {1000 * t:7.1f} ms  x{afresh / t:5.2f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=EMBEDDED_MODEL_DIR / "base", help="diffusers FLUX base folder")
    ap.add_argument("--batch", type=positive_int, nargs="+", default=[8])
    ap.add_argument("--views", type=positive_int, default=4)
    ap.add_argument("--rank", type=positive_int, default=16)
    ap.add_argument("--steps", type=positive_int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data", type=Path, help="a dataset (make-data): also time the input preparation on it")
    ap.add_argument("--resolution", type=positive_int, default=64, help="target size in pixels (embedded: 64)")
    ap.add_argument("--condition-size", type=positive_int, default=32, help="view size in pixels (embedded: 32)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    eager = build_objective(args.base, device, args.rank, args.views)
    variants = {"eager": eager, "compiled": torch.compile(copy.deepcopy(eager), dynamic=False)}
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for name, m in variants.items()}

    def step(name: str, batch: dict[str, torch.Tensor]) -> None:
        variants[name](**batch).backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    factor = latent_factor(args.base)
    print(f"stage-1 training step on {device}, {args.resolution}² targets, {args.views} views of "
          f"{args.condition_size}², LoRA rank {args.rank}, base {args.base}")
    if args.data:
        for size in args.batch:
            time_inputs(args.base, args.data, size, args.views, args.resolution, args.condition_size, device, args.rounds)
    for size in args.batch:
        batch = random_batch(eager.transformer, size, args.views, args.resolution // factor,
                             args.condition_size // factor, device)
        for name in variants:  # warm-up (compiles; a new batch size recompiles)
            sync()
            start = time.perf_counter()
            step(name, batch)
            sync()
            if name == "compiled":
                print(f"  batch {size}: compiling took {time.perf_counter() - start:.1f} s")
        operators, kernels = count_operations(lambda: (step("eager", batch), sync()))
        print(f"  batch {size}: an eager step calls {operators} aten operators" + (f", {kernels} GPU kernels" if kernels else ""))
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name in variants:
                sync()
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(name, batch)
                sync()
                times[name].append((time.perf_counter() - start) / args.steps)
        base = statistics.median(times["eager"])
        for name, values in times.items():
            t = statistics.median(values)
            print(f"  batch {size:4d} {name:>9}: {1000 * t:8.1f} ms/step  x{base / t:5.2f}  {size / t:8.1f} samples/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
