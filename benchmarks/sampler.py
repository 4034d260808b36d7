#!/usr/bin/env python
"""Sampler speed: the faithful path against the fast modes ("exact", "cached"), side by side.

Every configuration builds one model, then runs the modes interleaved (warm-up round, then
`--repeats` rounds of faithful, exact, cached) on the same inputs and seed, so a shared, noisy
machine slows them alike. Printed per mode: median wall time, speed-up over faithful, max abs
difference and PSNR of the image and point map against faithful (cached also against exact),
peak memory, FLOPs per denoising step and achieved TFLOP/s (FLOPs counted by
torch.utils.flop_counter over a 1-step and a 2-step call: per step = difference).

    python benchmarks/sampler.py                         # tiny + mid-size random models on CPU
    python benchmarks/sampler.py --configs embedded      # the trained model in assets/embedded
    python benchmarks/sampler.py --gpu-full              # FLUX.1-dev-size random transformer, bf16,
                                                         # 512², 8 and 4 views, 28 steps (needs CUDA)
    python benchmarks/sampler.py --gpu-full --dry-run    # the same code path, small, on CPU

Cached mode is an approximation; its PSNR is printed next to its speed. Variants: `cached/4`
refreshes the views' keys/values every 4 steps; `exact+compile` runs torch.compile'd blocks
(compiled during the warm-up round, which is not timed), e.g. `--modes faithful exact exact+compile`;
`exact@blocks` and `exact@model` sample with CPU offload by block or by model (the weights move
before the timed call), e.g. `--gpu-full --modes exact exact@model exact@blocks` for what
offload costs on FLUX.1-dev's size and how little GPU memory it leaves; `+int8` samples a copy of
the model whose transformer's linear layers hold int8 weights (torchao's int8 weight-only scheme,
as `from_pretrained(quantize="int8")` loads them), e.g. `exact+int8` and `exact+int8@blocks`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refany3d.cli import positive_int, run_reporting_errors  # noqa: E402
from refany3d.fast import cached_encoders  # noqa: E402
from refany3d.offload import OFFLOAD_MODES  # noqa: E402
from refany3d.pipeline import EMBEDDED_MODEL_DIR, RefAny3DPipeline  # noqa: E402
from refany3d.tiny import TinyConfig, build_base_pipeline, build_tiny_model  # noqa: E402
from refany3d.weights import add_refany3d_adapters, new_domain_embedder  # noqa: E402

# Sampler variants: a pipeline mode, optionally "/K" (cached: refresh the views' keys/values every
# K steps), "+int8" (int8 weights), "+compile" (torch.compile the fast blocks; timed after the
# warm-up round compiled) and "@GRAIN" (CPU offload).
MODES = ("faithful", "exact", "cached", "cached/4")


@dataclass(frozen=True)
class Variant:
    mode: str
    cache_refresh_every: int = 0
    compile: bool = False
    offload: str | None = None  # CPU offload grain (refany3d.offload), or None
    int8: bool = False  # a copy of the model with int8 weights (refany3d.quantization)

    @classmethod
    def parse(cls, name: str) -> Variant:
        name_without_offload, _, offload = name.partition("@")
        compiled = name_without_offload.endswith("+compile")
        name_without_offload = name_without_offload.removesuffix("+compile")
        int8 = name_without_offload.endswith("+int8")
        mode, _, refresh = name_without_offload.removesuffix("+int8").partition("/")
        if (mode not in ("faithful", "exact", "cached") or (refresh and (mode != "cached" or not refresh.isdigit()))
                or (offload and offload not in OFFLOAD_MODES)):
            raise argparse.ArgumentTypeError(f"unknown sampler variant {name!r} (e.g. exact, cached, cached/4, "
                                             "exact+compile, exact+int8, exact@blocks)")
        if compiled and mode == "faithful":
            raise argparse.ArgumentTypeError("+compile applies to the fast modes only")
        return cls(mode, int(refresh or 0), compiled, offload or None, int8)

    @property
    def resident(self) -> str:
        """The variant this one must match or approximate: the same mode with full-precision weights
        that stay on the device."""
        return f"{self.mode}/{self.cache_refresh_every}" if self.cache_refresh_every else self.mode


PROMPT = "a red table in the room with a wooden floor"
H100_BF16_DENSE_TFLOPS = 989.0


@dataclass
class Config:
    name: str
    size: int  # image size
    n_views: int
    steps: int
    condition_size: int | None = None  # default: the image size
    views: tuple | None = None  # (rgb, point-map) images; default: random images


def mid_config() -> TinyConfig:
    """Big enough that matmuls and attention, not Python, dominate on a CPU."""
    return TinyConfig(
        num_layers=2,
        num_single_layers=4,
        num_attention_heads=8,
        attention_head_dim=32,
        axes_dims_rope=(8, 12, 12),
        text_dim=64,
        vae_channels=(8, 16, 16),  # VAE downsamples 4x: 128² -> 32x32 latents -> 256 tokens per branch
        lora_rank=8,
        lora_alpha=8,
    )


def flux_dev_config(lora_rank: int) -> TinyConfig:
    """FLUX.1-dev's transformer (19 double + 38 single blocks, 24 x 128 heads, 16 latent channels,
    512 T5 tokens); text encoders and VAE are minimal stand-ins of the right widths."""
    return TinyConfig(
        num_layers=19,
        num_single_layers=38,
        num_attention_heads=24,
        attention_head_dim=128,
        axes_dims_rope=(16, 56, 56),
        text_dim=4096,
        text_layers=1,
        vae_channels=(8, 8, 8, 8),  # 8x downsampling, as FLUX's VAE
        latent_channels=16,
        max_text_tokens=512,
        lora_rank=lora_rank,
        lora_alpha=lora_rank,
    )


def build_in_memory(config: TinyConfig, device: str, dtype: torch.dtype) -> RefAny3DPipeline:
    """A random pipeline created directly on `device` in `dtype` (no 48 GB float32 detour)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            flux = build_base_pipeline(config, seed=0)
            add_refany3d_adapters(flux.transformer, config.lora_rank, config.lora_alpha, init_scale=1e-3)
            embedder = new_domain_embedder(config.num_attention_heads * config.attention_head_dim)
    finally:
        torch.set_default_dtype(previous)
    flux.transformer.requires_grad_(False)
    return RefAny3DPipeline(flux, embedder).to(device)


def load_embedded() -> RefAny3DPipeline:
    return RefAny3DPipeline.from_pretrained(EMBEDDED_MODEL_DIR / "base", EMBEDDED_MODEL_DIR / "ref", device="cpu")


def embedded_config(steps: int) -> Config:
    """The embedded model at its own settings, with views rendered from a shipped example mesh."""
    import json

    from refany3d.views import render_views

    settings = json.loads((EMBEDDED_MODEL_DIR / "settings.json").read_text())
    mesh = Path(__file__).resolve().parents[1] / "examples" / "armchair.glb"
    rendered = render_views(mesh, n_views=settings["n_views"], resolution=settings["condition_size"])
    return Config(
        "embedded (armchair views)", settings["height"], settings["n_views"], steps,
        settings["condition_size"], (rendered.rgb, rendered.pointmap),
    )


def random_views(n: int, size: int, seed: int = 0) -> tuple[list[Image.Image], list[Image.Image]]:
    rng = np.random.default_rng(seed)
    make = lambda: Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))  # noqa: E731
    return [make() for _ in range(n)], [make() for _ in range(n)]


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or peak process RSS growth (sampled) on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak_mb = 0.0

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self._base, self._stop = self._rss_mb(), threading.Event()
        self.peak_mb = 0.0

        def poll():
            while not self._stop.wait(0.002):
                self.peak_mb = max(self.peak_mb, self._rss_mb() - self._base)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()


def int8_copy(pipe: RefAny3DPipeline) -> RefAny3DPipeline:
    """A copy of `pipe` whose transformer's own linear layers hold int8 weights: the scheme
    `from_pretrained(quantize="int8")` loads, applied to a model built in memory. The adapters'
    A and B stay in the model's dtype, as they do there."""
    import copy

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantized = copy.deepcopy(pipe)
    quantize_(quantized.flux.transformer, Int8WeightOnlyConfig(),
              filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and ".lora_" not in f".{name}")
    quantized.quantize = "int8"
    return quantized


def place(pipe, name: str, device: torch.device, others: tuple[RefAny3DPipeline, ...] = ()) -> None:
    """Put the weights where the variant samples from: on `device`, or offloaded to the CPU. The
    `others` (the int8 copy, or the model it was copied from) wait on the CPU, so a GPU peak is
    the variant's own."""
    for other in others:
        if other is not pipe and other.cpu_offload is None and other.device.type != "cpu":
            other.to("cpu")
    offload = Variant.parse(name).offload
    if offload and pipe.cpu_offload != offload:
        pipe.enable_cpu_offload(offload, device)
    elif not offload and (pipe.cpu_offload or pipe.device != device):
        pipe.to(device)


def call(pipe, name: str, views, config: Config, steps: int | None = None, compile: bool | None = None):
    variant = Variant.parse(name)
    pipe.enable_compile(variant.compile if compile is None else compile)
    return pipe(
        PROMPT,
        *views,
        height=config.size,
        width=config.size,
        condition_size=config.condition_size or config.size,
        num_inference_steps=steps or config.steps,
        image_guidance_scale=2.0,
        generator=torch.Generator("cpu").manual_seed(0),
        max_sequence_length=512,
        output_type="np",
        mode=variant.mode,
        cache_refresh_every=variant.cache_refresh_every,
    )


def counted_flops(pipe, mode: str, views, config: Config) -> tuple[float, float]:
    """(FLOPs of a whole call, FLOPs of one later denoising step), from a 1-step and a 2-step call."""
    from torch.utils.flop_counter import FlopCounterMode

    totals = []
    place(pipe, mode, pipe.device)
    for steps in (1, 2):
        cached_encoders(pipe).clear_caches()  # both calls encode the prompt and views
        with FlopCounterMode(display=False) as counter:  # counted uncompiled: the same arithmetic
            call(pipe, mode, views, config, steps, compile=False)
        totals.append(counter.get_total_flops())
    per_step = totals[1] - totals[0]
    return totals[0] + (config.steps - 1) * per_step, per_step


def si(value: float) -> str:
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(value) >= scale:
            return f"{value / scale:7.2f} {prefix}"
    return f"{value:7.0f} "


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def compare(out, ref) -> str:
    diff = max(float(np.abs(np.asarray(o, np.float64) - np.asarray(r, np.float64)).max()) for o, r in ((out.image, ref.image), (out.pointmap, ref.pointmap)))
    return f"max|d| {diff:.1e}  PSNR {psnr(out.image, ref.image):6.1f}/{psnr(out.pointmap, ref.pointmap):6.1f} dB"


def bench(pipe: RefAny3DPipeline, config: Config, repeats: int, modes: tuple[str, ...], peak_tflops: float | None) -> None:
    device = pipe.device
    views = config.views or random_views(config.n_views, config.condition_size or config.size)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    quantized = int8_copy(pipe) if any(Variant.parse(mode).int8 for mode in modes) else None
    model = {mode: quantized if Variant.parse(mode).int8 else pipe for mode in modes}
    models = tuple({id(m): m for m in model.values()}.values())
    flops = {mode: counted_flops(model[mode], mode, views, config) for mode in modes}
    for each in models:
        cached_encoders(each).clear_caches()
    outputs, times, memory = {}, {m: [] for m in modes}, {m: 0.0 for m in modes}
    for mode in modes:  # warm-up round (first-call costs; fills the fast sampler's caches)
        place(model[mode], mode, device, models)
        outputs[mode] = call(model[mode], mode, views, config)
    for _ in range(repeats):
        for mode in modes:
            place(model[mode], mode, device, models)
            with PeakMemory(device) as peak:
                sync()
                start = time.perf_counter()
                out = call(model[mode], mode, views, config)
                sync()
                times[mode].append(time.perf_counter() - start)
            memory[mode] = max(memory[mode], peak.peak_mb)
            assert np.array_equal(out.image, outputs[mode].image) or device.type == "cuda", f"{mode} is not deterministic"

    tokens = (config.size // pipe.flux.vae_scale_factor // 2) ** 2
    print(
        f"\n== {config.name}: {config.size}², {config.n_views} views ({tokens} tokens per branch), {config.steps} steps, "
        f"image guidance 2, {str(pipe.dtype).replace('torch.', '')} on {device}; median of {repeats} =="
    )
    base = statistics.median(times["faithful"]) if "faithful" in times else None
    mem_unit = "MB GPU peak" if device.type == "cuda" else "MB RSS growth"
    for mode in modes:
        t = statistics.median(times[mode])
        total, per_step = flops[mode]
        line = f"{mode:>17}: {t:8.3f} s"
        line += f"  x{base / t:5.2f}" if base else ""
        line += f"  {memory[mode]:8.0f} {mem_unit}"
        line += f"  step {si(per_step)}FLOP  achieved {si(total / t)}FLOP/s"
        if peak_tflops:
            line += f" ({100 * total / t / 1e12 / peak_tflops:4.1f}% of {peak_tflops:.0f})"
        if mode != "faithful" and "faithful" in outputs:
            line += f"  vs faithful: {compare(outputs[mode], outputs['faithful'])}"
        if mode.startswith("cached") and "exact" in outputs:
            line += f"  vs exact: {compare(outputs[mode], outputs['exact'])}"
        resident = Variant.parse(mode).resident
        if resident != mode and resident in outputs:  # offload must not change the output, int8 only round it
            line += f"  vs {resident}: {compare(outputs[mode], outputs[resident])}"
        print(line, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid", "embedded"])
    ap.add_argument("--views", type=positive_int, nargs="+", default=[8],
                    help="views per call of the tiny and mid configs (embedded: its own 4; --gpu-full: 8 and 4)")
    ap.add_argument("--steps", type=positive_int, default=8, help="denoising steps (--gpu-full: 28)")
    ap.add_argument("--repeats", type=positive_int, default=3, help="timed calls per mode (--gpu-full: 1)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), type=lambda name: Variant.parse(name) and name,
                    help=f"sampler variants (default: {' '.join(MODES)}; also cached/K, exact+compile, cached+compile)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--gpu-full", action="store_true", help="FLUX.1-dev-size random transformer on CUDA (bf16, 512², 8 and 4 views, 28 steps)")
    ap.add_argument("--dry-run", action="store_true", help="with --gpu-full: the same code path with a small model on CPU")
    ap.add_argument("--lora-rank", type=int, default=64, help="LoRA rank of the full-size model")
    ap.add_argument("--peak-tflops", type=float, default=None, help=f"device peak for the %% column (H100 bf16 dense: {H100_BF16_DENSE_TFLOPS:.0f})")
    args = ap.parse_args()
    if args.dry_run and not args.gpu_full:
        ap.error("--dry-run applies to --gpu-full (the full-size code path, small, on CPU)")
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = tuple(args.modes)

    if args.gpu_full:
        if args.dry_run:
            pipe = build_in_memory(mid_config(), "cpu", torch.float32)
            configs = [Config("full-size code path (dry run: mid model, CPU)", 64, n, 2) for n in (8, 4)]
        else:
            if not torch.cuda.is_available():
                print("--gpu-full needs a CUDA device (use --dry-run to check the code path on CPU)")
                return 2
            torch.backends.cuda.matmul.allow_tf32 = True
            pipe = build_in_memory(flux_dev_config(args.lora_rank), "cuda", torch.bfloat16)
            configs = [Config(f"FLUX.1-dev size, random weights, LoRA rank {args.lora_rank}", 512, n, 28) for n in (8, 4)]
        for config in configs:
            bench(pipe, config, 1 if not args.dry_run else args.repeats, modes, args.peak_tflops or (None if args.dry_run else H100_BF16_DENSE_TFLOPS))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            if name == "embedded":
                if not (EMBEDDED_MODEL_DIR / "base").is_dir():
                    print(f"\n== embedded: no model in {EMBEDDED_MODEL_DIR}; skipped ==")
                    continue
                bench(load_embedded(), embedded_config(args.steps), args.repeats, modes, args.peak_tflops)
                continue
            else:
                tiny = TinyConfig() if name == "tiny" else mid_config()
                base, ref = build_tiny_model(Path(tmp) / name, seed=0, config=tiny)
                pipe = RefAny3DPipeline.from_pretrained(base, ref, device="cpu", dtype=torch.float32)
                size = 64 if name == "tiny" else 128
            for n in args.views:
                bench(pipe, Config(name, size, n, args.steps), args.repeats, modes, args.peak_tflops)
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
