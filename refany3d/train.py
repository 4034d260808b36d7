"""Training: stage 0 builds a small FLUX-architecture base, stage 1 is the RefAny3D fine-tune.

Stage 1 is the release's recipe and runs unchanged on FLUX.1-dev: rectified flow with
t = sigmoid(randn), x_t = (1 - t) x0 + t noise, MSE between the prediction and (noise - x0) on both
targets (RGB and point map), 10% empty captions, 10% black reference views, the "default" and
"coord" LoRA adapters on the release's target modules and the domain embedder trained jointly.
No pretrained base can be downloaded here, so stage 0 first trains one on the procedural scenes:
the VAE (autoencoding images and point maps; latent shift/scale measured afterwards) and then the
transformer as a text-to-image rectified-flow model. The text encoders stay random and frozen.

Everything runs under `accelerate` (CPU, one GPU, `accelerate launch` for several). Each stage
trains a small nn.Module whose forward returns the loss, so that DDP sees every forward pass.
Outputs use the published layouts: OUT/base (a diffusers FluxPipeline folder) and OUT/ref
(coord.safetensors, default.safetensors, domain_embedder.pth).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from refany3d.conditions import CONDITION_POSITION_DELTA, latent_position_ids, pack_latents
from refany3d.data import SampleDataset, collate
from refany3d.procedural import caption_vocabulary
from refany3d.errors import InputError, require_finite, require_whole_number
from refany3d.tiny import TinyConfig, build_base_pipeline
from refany3d.quantization import parse_quantize, quantization_config
from refany3d.weights import (add_refany3d_adapters, load_refany3d_weights, new_domain_embedder, resolve_ref_weights,
                              save_refany3d_weights)
from refany3d.transformer import Branch, joint_forward, refany3d_branches, refany3d_group_mask

STAGES = ("vae", "base", "refany3d")


@dataclass
class TrainConfig:
    """Every setting of a training run (saved as OUT/train_config.json)."""

    data: list[str]
    output_dir: str
    stages: tuple[str, ...] = STAGES
    base_model: str | None = None  # stage 1 only: a diffusers FLUX folder or hub id (default: OUT/base)
    init_ref: str | None = None  # stage 1 starts from these RefAny3D weights (folder or hub id), not fresh adapters
    resolution: int = 64
    condition_size: int | None = None  # size of the reference views given to the model (None: resolution)
    n_views: int = 4
    batch_size: int = 8
    gradient_accumulation: int = 1
    seed: int = 0
    mixed_precision: str = "no"  # "no", "bf16", "fp16" (accelerate)
    optimizer: str = "adamw"  # "adamw" or "prodigy"
    # stage 0
    tiny: TinyConfig = field(default_factory=TinyConfig)
    vae_steps: int = 600
    vae_lr: float = 2e-3
    base_steps: int = 1500
    base_lr: float = 1e-3
    # stage 1 (release defaults)
    ref_steps: int = 1500
    ref_lr: float = 1e-3
    lora_rank: int = 4
    lora_alpha: int = 4
    text_dropout: float = 0.1
    reference_dropout: float = 0.1
    guidance: float = 1.0  # FLUX.1-dev's distilled guidance input during stage 1 (the release's value)
    # Stage 0 draws the guidance input uniformly from this range, so that the base (which has no
    # teacher to distil guidance from) learns to ignore it and samples alike at any setting.
    base_guidance_range: tuple[float, float] = (1.0, 5.0)
    group_mask: bool = True
    pointmap_branch: bool = True  # False: the ablation without point-map target and views
    # Not in the release (1: every token counts the same): the RGB target's flow loss counts the
    # tokens that show the asset this many times, since it covers a small share of a scene (~7 % here)
    asset_loss_weight: float = 1.0
    # torch.compile each stage's objective (forward + backward); pays off over long runs: the small
    # models here are launch-bound on a GPU, and compiling fuses the elementwise work
    compile: bool = False
    # Stage 1 for large bases (FLUX.1-dev): recompute each block in the backward pass instead of
    # keeping its activations, and load the base's transformer and T5 with int8 weights
    gradient_checkpointing: bool = False
    quantize: str | None = None
    # Time budgets in minutes (None: none): a stage's step count is cut to what fits (`run_stage`)
    vae_minutes: float | None = None
    base_minutes: float | None = None
    ref_minutes: float | None = None
    # bookkeeping
    checkpoint_every: int = 250
    max_grad_norm: float = 1.0
    warmup_steps: int = 50
    num_workers: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.tiny, dict):
            self.tiny = TinyConfig(**self.tiny)
        self.stages = tuple(self.stages)
        if not self.stages:
            raise InputError(f"no training stage given; choose from {', '.join(STAGES)}")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise InputError(f"unknown training stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise InputError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        for name in ("vae_steps", "base_steps", "ref_steps", "batch_size", "n_views", "gradient_accumulation",
                     "checkpoint_every", "lora_rank", "lora_alpha"):
            require_whole_number(name, getattr(self, name), minimum=1)
        require_whole_number("num_workers", self.num_workers)
        for name in ("vae_lr", "base_lr", "ref_lr", "text_dropout", "reference_dropout", "asset_loss_weight"):
            require_finite(name, getattr(self, name))
        for name in ("vae_lr", "base_lr", "ref_lr"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.optimizer not in ("adamw", "prodigy"):
            raise InputError(f"optimizer must be 'adamw' or 'prodigy', got {self.optimizer!r}")
        for name in ("text_dropout", "reference_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        for name in ("vae_minutes", "base_minutes", "ref_minutes"):
            minutes = getattr(self, name)
            if minutes is not None:
                require_finite(name, minutes)
                if minutes <= 0:
                    raise InputError(f"{name} must be a positive number of minutes, got {minutes}")
        self.quantize = parse_quantize(self.quantize)
        if not self.asset_loss_weight > 0:
            raise InputError(f"asset_loss_weight must be positive, got {self.asset_loss_weight}")
        if not self.data:
            raise InputError("no training data given")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Rectified flow
# ---------------------------------------------------------------------------------------------


def sample_flow(
    x0: torch.Tensor, generator: torch.Generator | None = None, t: torch.Tensor | None = None, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t = (1 - t) x0 + t noise with t = sigmoid(randn) per sample (unless t or noise are given,
    as probes of a trained model give them); returns (x_t, t, noise - x0)."""
    if t is None:
        t = torch.sigmoid(torch.randn(x0.shape[0], generator=generator, device=x0.device))
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    tt = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - tt) * x0 + tt * noise, t, noise - x0


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of (B, L, C) token predictions; with (B, L) token weights, their weighted mean over tokens."""
    if token_weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_token = (pred.float() - target.float()).pow(2).mean(-1)
    return (per_token * token_weights).sum() / token_weights.sum()


def asset_token_weights(mask: torch.Tensor, token_pixels: int, asset_weight: float) -> torch.Tensor:
    """(B, L) loss weights of the packed target tokens from the asset's mask (B, 1, H, W) in {0, 1}:
    1 for scene, `asset_weight` for asset, in between by the share of a token's pixels it covers."""
    share = F.avg_pool2d(mask.float(), token_pixels).flatten(1)  # row-major, as pack_latents orders tokens
    return 1.0 + (asset_weight - 1.0) * share


# ---------------------------------------------------------------------------------------------
# Training modules: forward(batch) -> loss
# ---------------------------------------------------------------------------------------------


class VAEObjective(torch.nn.Module):
    """Autoencoding loss of the VAE on images and point maps: L1 + MSE + a small KL term."""

    def __init__(self, vae, kl_weight: float = 1e-6):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(pixels).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        return F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels) + self.kl_weight * posterior.kl().mean()


class TextToImageObjective(torch.nn.Module):
    """Stage 0: FLUX text-to-image rectified flow on packed latents."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, latents, text, pooled, text_ids, image_ids, guidance) -> torch.Tensor:
        x_t, t, target = sample_flow(pack_latents(latents))
        pred = self.transformer(
            hidden_states=x_t, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
            img_ids=image_ids, txt_ids=text_ids, guidance=guidance, return_dict=False,
        )[0]
        return F.mse_loss(pred.float(), target.float())


class RefAny3DObjective(torch.nn.Module):
    """Stage 1: both targets noised with one t, predicted jointly with the reference views.

    pointmap_branch=False is the reviewers' ablation: no point-map target and no point-map views,
    so the model learns the RGB target from the RGB views alone.
    """

    def __init__(self, transformer, domain_embedder, n_views: int, group_mask: bool = True, pointmap_branch: bool = True,
                 gradient_checkpointing: bool = False):
        super().__init__()
        self.transformer, self.domain_embedder, self.pointmap_branch = transformer, domain_embedder, pointmap_branch
        self.gradient_checkpointing = gradient_checkpointing
        mask = refany3d_group_mask(n_views, pointmap_branch) if group_mask else torch.empty(0)
        self.register_buffer("group", mask, persistent=False)

    def forward(
        self, rgb_latents, pm_latents, rgb_views, pm_views, text, pooled, guidance, token_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Latents (B, C, h, w); views (B, N, C, h, w) (already black where dropped); token_weights
        (B, L) weigh the RGB target's tokens in its loss (None: equally, as the release does)."""
        losses = self.branch_losses(rgb_latents, pm_latents, rgb_views, pm_views, text, pooled, guidance,
                                    token_weights=token_weights)
        return sum(losses) / len(losses)

    def branch_losses(
        self, rgb_latents, pm_latents, rgb_views, pm_views, text, pooled, guidance,
        t: torch.Tensor | None = None, noise: torch.Tensor | None = None, token_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """The flow losses of the RGB and the point-map target (the RGB one alone without the
        point-map branch); t (B,) and noise (B, 2, L, C) are drawn as in training unless given
        (`benchmarks/reference_use.py` fixes them).

        token_weights reach the RGB target only: weighing the point map's asset tokens makes a false
        background cost more than a false asset, and the model learned point maps ~3x the asset's area.
        """
        branches, target = self.noised_branches(rgb_latents, pm_latents, rgb_views, pm_views, text, pooled, guidance, t, noise)
        outputs = tuple(range(1, 1 + target.shape[1]))
        preds = joint_forward(self.transformer, branches, self.domain_embedder, self.group_mask, outputs,
                              checkpoint_blocks=self.gradient_checkpointing)
        weights = (token_weights, None)  # RGB target, point-map target
        return tuple(weighted_mse(pred, target[:, i], weights[i]) for i, pred in enumerate(preds))

    def noised_branches(
        self, rgb_latents, pm_latents, rgb_views, pm_views, text, pooled, guidance,
        t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
    ) -> tuple[list[Branch], torch.Tensor]:
        """The joint pass's branches, the targets noised to one x_t, and the flow target (noise - x0),
        (B, targets, L, C)."""
        n = rgb_views.shape[1]
        x0 = torch.stack([pack_latents(rgb_latents), pack_latents(pm_latents)], dim=1)  # (B, 2, L, C)
        x_t, t, target = sample_flow(x0, t=t, noise=noise)
        if not self.pointmap_branch:  # noised as above, so the RGB target's noise is the same without it
            x_t, target = x_t[:, :1], target[:, :1]
        h, w = rgb_latents.shape[2:]
        target_ids = latent_position_ids(h, w).to(x0.device)
        view_ids = latent_position_ids(*rgb_views.shape[3:], CONDITION_POSITION_DELTA).to(x0.device)
        rgb_tok = [pack_latents(rgb_views[:, k]) for k in range(n)]
        pm_tok = [pack_latents(pm_views[:, k]) for k in range(n)] if self.pointmap_branch else []
        branches = refany3d_branches(text, pooled, list(x_t.unbind(1)), target_ids, rgb_tok, pm_tok, view_ids, t, guidance)
        return branches, target

    @property
    def group_mask(self) -> torch.Tensor | None:
        """The release's group mask, or None for the no-mask ablation (full attention)."""
        return self.group if self.group.numel() else None


# ---------------------------------------------------------------------------------------------
# The shared loop
# ---------------------------------------------------------------------------------------------


@dataclass
class StageResult:
    losses: list[float]
    seconds: float
    resumed_from: int
    planned_steps: int  # the configured count, or what a time budget found to fit


# Timed steps before a time-budgeted stage is first sized, counted after its first step (which may compile).
PROBE_STEPS = 10


def _optimizer(config: TrainConfig, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if config.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=1.0, weight_decay=0.01, safeguard_warmup=True, use_bias_correction=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def _checkpoint_path(out: Path, stage: str) -> Path:
    return out / "checkpoints" / f"{stage}.pt"


def _agreed(value: Any) -> Any:
    """The main process's value on every process, so that all of them run the same steps."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def run_stage(
    stage: str,
    accelerator,
    objective: torch.nn.Module,
    batches: Iterator[dict[str, Any]],
    to_inputs: Callable[[dict[str, Any]], dict[str, Any]],
    steps: int,
    lr: float,
    config: TrainConfig,
    minutes: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> StageResult:
    """Optimise the objective's trainable parameters for `steps` steps, with checkpoints and resume.

    A checkpoint holds only the trainable parameters, the optimizer and the loss history, so that
    LoRA checkpoints of a 12B base stay small; it is removed once the stage's result is saved.

    `minutes` is a time budget (a lease, a rented GPU): from PROBE_STEPS timed steps on (the first
    step, which may compile, is not timed), the step count is re-estimated after every step as
    what fits at the mean step time so far, at most `steps`, so that the learning-rate schedule
    decays to its end within the budget; before that, the stage stops if the budget is spent.
    The budget counts the stage's training time across resumes.
    """
    from tqdm.auto import tqdm

    out = Path(config.output_dir)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    names = [n for n, p in objective.named_parameters() if p.requires_grad]
    optimizer = _optimizer(config, trainable, lr)
    warmup = max(1, min(config.warmup_steps, steps // 5))
    plan = [steps]  # the schedule reads the plan, which a time budget re-estimates
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.5 + 0.5 * math.cos(math.pi * min(s / max(plan[0], 1), 1.0)))
    )
    losses: list[float] = []
    start, spent = 0, 0.0
    ckpt = _checkpoint_path(out, stage)
    if ckpt.exists():
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
        except Exception as err:  # a save cut short by a crash (saves are atomic since, see below)
            raise InputError(f"checkpoint {ckpt} cannot be read ({type(err).__name__}); delete it to restart "
                             f"the {stage} stage from its beginning") from None
        params = dict(zip(names, trainable))
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        losses, start = state["losses"], state["step"]
        plan[0], spent = state.get("planned_steps", steps), state.get("seconds", 0.0)
        torch.set_rng_state(state["rng"])
    if config.compile:
        objective = torch.compile(objective, dynamic=False)  # fixed batch shapes; no symbolic sizes
    objective, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler)

    began = probe_began = clock() - spent
    bar = tqdm(total=plan[0], initial=start, desc=stage, disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    step = start
    while step < plan[0]:
        inputs = to_inputs(next(batches))
        with accelerator.accumulate(objective):
            loss = objective(**inputs)
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(accelerator.gather(loss.detach()[None]).mean().item())
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if minutes is not None:
            now = clock()
            if step == start + 1:
                probe_began = now
            elif step >= start + 1 + PROBE_STEPS:
                seconds_per_step = (now - probe_began) / (step - start - 1)
                fits = step + int(max(minutes * 60 - (now - began), 0) / seconds_per_step)
                plan[0] = bar.total = _agreed(min(steps, fits))
            if step < plan[0] and _agreed(now - began >= minutes * 60):
                accelerator.print(f"{stage}: the {minutes:g}-minute budget ran out after step {step} of {plan[0]}")
                break
        if step % config.checkpoint_every == 0 and step < plan[0]:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                partial = ckpt.with_name(ckpt.name + ".partial")  # then renamed: an interrupted save leaves the old one
                torch.save({
                    "trainable": {n: p.detach().cpu() for n, p in zip(names, trainable)},
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "losses": losses, "step": step, "planned_steps": plan[0], "seconds": clock() - began,
                    "rng": torch.get_rng_state(),
                }, partial)
                os.replace(partial, ckpt)
    bar.close()
    accelerator.wait_for_everyone()
    return StageResult(losses, clock() - began, start, plan[0])


def _batches(config: TrainConfig, accelerator, seed: int) -> Iterator[dict[str, Any]]:
    from torch.utils.data import DataLoader

    dataset = SampleDataset(
        config.data, config.resolution, config.n_views, seed=seed,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
    )
    loader = DataLoader(dataset, batch_size=config.batch_size, collate_fn=collate, num_workers=config.num_workers)
    for batch in loader:
        yield {k: (v.to(accelerator.device) if torch.is_tensor(v) else v) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


class _BoundedStore(dict):
    """Tensor tuples by key, kept while their bytes fit in `max_bytes`: the memory of the encoder
    caches below. Kept tensors are clones, not views that would keep a whole batch alive."""

    def __init__(self, max_bytes: int):
        super().__init__()
        self.max_bytes, self.bytes = max_bytes, 0

    def keep(self, key: str, tensors: tuple[torch.Tensor, ...]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors)
        if self.bytes + size <= self.max_bytes:
            self[key] = tuple(t.clone() for t in tensors)
            self.bytes += size


class CaptionEncoder:
    """The frozen text encoders, remembered per caption: a dataset's captions come back every epoch
    (the empty one at every text dropout), and on a GPU encoding them cost about as much per step
    as the transformer's forward and backward. Encodings are kept until `max_bytes` is used, after
    which new captions are still encoded, just not kept."""

    def __init__(self, flux, max_length: int, max_bytes: int = 1 << 30):
        self.flux, self.max_length = flux, max_length
        self.cache = _BoundedStore(max_bytes)

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text (B, L, C), pooled (B, P), text ids (L, 3)), as `FluxPipeline.encode_prompt` gives them."""
        fresh: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            text, pooled, _ = self.flux.encode_prompt(
                prompt=missing, prompt_2=None, device=self.flux.transformer.device, max_sequence_length=self.max_length
            )
            for caption, t, p in zip(missing, text, pooled):
                fresh[caption] = (t, p)
                self.cache.keep(caption, (t, p))
        pairs = [self.cache[c] if c in self.cache else fresh[c] for c in captions]
        text, pooled = torch.stack([t for t, _ in pairs]), torch.stack([p for _, p in pairs])
        return text, pooled, torch.zeros(text.shape[1], 3, device=text.device, dtype=text.dtype)


@torch.no_grad()
def _encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """FLUX-normalized latents of (..., 3, H, W) pixels in [-1, 1]."""
    lead = pixels.shape[:-3]
    latents = vae.encode(pixels.reshape(-1, *pixels.shape[-3:]).to(vae.dtype)).latent_dist.sample()
    return _normalized(vae, latents.reshape(*lead, *latents.shape[1:]))


def _normalized(vae, latents: torch.Tensor) -> torch.Tensor:
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


class PosteriorCache:
    """The frozen VAE's posteriors (mean, std), remembered per key (a sample's image, an asset's
    views): a dataset's pictures come back every epoch, and encoding them is a large share of a
    small model's step. Latents are still drawn afresh from the posterior at every use, with the
    same random numbers as `vae.encode(...).latent_dist.sample()`, so training is unchanged.
    Posteriors are kept until `max_bytes` is used; past that they are computed, not kept."""

    def __init__(self, vae, max_bytes: int = 1 << 30):
        self.vae = vae
        self.store = _BoundedStore(max_bytes)

    @torch.no_grad()
    def __call__(self, keys: list[str], pixels: torch.Tensor) -> torch.Tensor:
        """FLUX-normalized latents of pixels (K, ..., 3, H, W) in [-1, 1], row k named keys[k]."""
        vae, item = self.vae, pixels.shape[1:-3]
        fresh: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        first = {key: row for row, key in reversed(list(enumerate(keys)))}
        missing = [key for key in first if key not in self.store]
        if missing:
            rows = pixels[[first[key] for key in missing]]
            posterior = vae.encode(rows.reshape(-1, *pixels.shape[-3:]).to(vae.dtype)).latent_dist
            means = posterior.mean.reshape(len(missing), *item, *posterior.mean.shape[1:])
            stds = posterior.std.reshape(means.shape)
            for key, mean, std in zip(missing, means, stds):
                fresh[key] = (mean, std)
                self.store.keep(key, (mean, std))
        pairs = [self.store[key] if key in self.store else fresh[key] for key in keys]
        mean, std = torch.stack([m for m, _ in pairs]), torch.stack([s for _, s in pairs])
        return _normalized(vae, mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype))


def _drop(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    return ["" if torch.rand(1, generator=generator).item() < p else c for c in captions]


def _text_length(flux) -> int:
    return min(512, flux.tokenizer_2.model_max_length)


def train_vae(config: TrainConfig, accelerator, flux) -> StageResult:
    """Stage 0a: the VAE learns to autoencode targets, point maps and reference views."""
    vae = flux.vae
    _start_with_small_posterior_variance(vae)
    vae.train().requires_grad_(True)

    def to_inputs(batch):
        b = batch["image"].shape[0]
        view = torch.randint(batch["ref_rgb"].shape[1], (b,))
        refs = torch.cat([batch["ref_rgb"][torch.arange(b), view], batch["ref_pointmap"][torch.arange(b), view]])
        return {"pixels": torch.cat([batch["image"], batch["pointmap"], refs])}

    result = run_stage("vae", accelerator, VAEObjective(vae), _batches(config, accelerator, config.seed), to_inputs,
                       config.vae_steps, config.vae_lr, config, config.vae_minutes)
    vae.eval().requires_grad_(False)
    _measure_latent_statistics(vae, _batches(config, accelerator, config.seed + 1))
    return result


@torch.no_grad()
def _start_with_small_posterior_variance(vae, log_variance: float = -8.0) -> None:
    """Make the encoder's initial posterior nearly deterministic.

    A fresh encoder's log-variance is about 0, so sampled latents are mostly noise and a short
    training run spends its steps shrinking it; the sampler also *samples* latents of the reference
    views, so a large leftover variance would blur them. Starting at std ~0.02 avoids both.
    """
    conv = vae.encoder.conv_out
    half = conv.out_channels // 2
    conv.weight[half:].zero_()
    conv.bias[half:].fill_(log_variance)


@torch.no_grad()
def _measure_latent_statistics(vae, batches: Iterator[dict[str, Any]], n_batches: int = 8) -> None:
    """Set shift_factor / scaling_factor so that latents have zero mean and unit variance (as FLUX's)."""
    samples = []
    for _ in range(n_batches):
        batch = next(batches)
        pixels = torch.cat([batch["image"], batch["pointmap"]]).to(vae.dtype)
        samples.append(vae.encode(pixels).latent_dist.sample().flatten())
    z = torch.cat(samples).float()
    vae.register_to_config(shift_factor=round(z.mean().item(), 4), scaling_factor=round(1.0 / z.std().item(), 4))


def train_base(config: TrainConfig, accelerator, flux) -> StageResult:
    """Stage 0b: the transformer learns text-to-image rectified flow on the procedural scenes."""
    generator = torch.Generator().manual_seed(config.seed + 2)
    transformer = flux.transformer.train().requires_grad_(True)
    encode_text = CaptionEncoder(flux, _text_length(flux))
    encode_image = PosteriorCache(flux.vae)

    def to_inputs(batch):
        latents = encode_image(batch["sample"], batch["image"])
        text, pooled, text_ids = encode_text(_drop(batch["caption"], config.text_dropout, generator))
        h, w = latents.shape[2:]
        low, high = config.base_guidance_range
        guidance = low + (high - low) * torch.rand(latents.shape[0], generator=generator).to(latents.device)
        return {"latents": latents, "text": text, "pooled": pooled, "text_ids": text_ids,
                "image_ids": latent_position_ids(h, w).to(latents.device), "guidance": guidance}

    result = run_stage("base", accelerator, TextToImageObjective(transformer), _batches(config, accelerator, config.seed + 3),
                       to_inputs, config.base_steps, config.base_lr, config, config.base_minutes)
    transformer.eval().requires_grad_(False)
    return result


def train_only_lora(transformer) -> None:
    """Stage 1's trainable set: the LoRA adapters' weights; the base stays frozen."""
    transformer.requires_grad_(False)
    for name, param in transformer.named_parameters():
        param.requires_grad_("lora_" in name)


class RefAny3DInputs:
    """A data batch as stage 1's objective takes it: VAE latents of both targets and of the views
    (resized to the condition size as the sampler resizes them), the caption encodings, and the
    release's dropouts (an empty caption, all views black); with an asset weight other than 1, the
    RGB target's token weights from the asset's mask (`asset_token_weights`)."""

    def __init__(
        self, flux, condition_size: int, generator: torch.Generator,
        text_dropout: float = 0.1, reference_dropout: float = 0.1, guidance: float = 1.0, asset_weight: float = 1.0,
    ):
        self.flux, self.size, self.generator = flux, condition_size, generator
        self.text_dropout, self.reference_dropout, self.guidance = text_dropout, reference_dropout, guidance
        self.asset_weight = asset_weight
        self.encode_text = CaptionEncoder(flux, _text_length(flux))
        self.encode = PosteriorCache(flux.vae)
        self.black: torch.Tensor | None = None

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        size, samples = self.size, batch["sample"]
        rgb = self.encode([f"{s}:image" for s in samples], batch["image"])
        pm = self.encode([f"{s}:pointmap" for s in samples], batch["pointmap"])
        refs = torch.stack([batch["ref_rgb"], batch["ref_pointmap"]], dim=2)
        if size != refs.shape[-1]:  # resized like the sampler resizes its views (bicubic, antialiased)
            flat = F.interpolate(refs.flatten(0, 2), size=(size, size), mode="bicubic", antialias=True)
            refs = flat.clamp(-1, 1).view(*refs.shape[:3], 3, size, size)
        views = self.encode([f"{a}:views@{size}" for a in batch["asset"]], refs)
        drop = torch.rand(views.shape[0], generator=self.generator) < self.reference_dropout
        views[drop.to(views.device)] = self.black_view().to(views.dtype)
        text, pooled, _ = self.encode_text(_drop(batch["caption"], self.text_dropout, self.generator))
        guidance = torch.full((rgb.shape[0],), self.guidance, device=rgb.device)
        inputs = {"rgb_latents": rgb, "pm_latents": pm, "rgb_views": views[:, :, 0], "pm_views": views[:, :, 1],
                  "text": text, "pooled": pooled, "guidance": guidance}
        if self.asset_weight != 1.0:
            token_pixels = 2 * batch["image"].shape[-1] // rgb.shape[-1]  # a packed token: 2x2 latent pixels
            inputs["token_weights"] = asset_token_weights(batch["mask"], token_pixels, self.asset_weight)
        return inputs

    def black_view(self) -> torch.Tensor:
        """Latents (C, h, w) of a black view: what reference dropout (and image guidance) shows the model."""
        if self.black is None:
            vae = self.flux.vae
            self.black = _encode_pixels(vae, -torch.ones(1, 3, self.size, self.size, device=vae.device))[0]
        return self.black


def train_refany3d(config: TrainConfig, accelerator, flux, domain_embedder) -> StageResult:
    """Stage 1: LoRA adapters + domain embedder on a frozen base, the release's objective."""
    to_inputs = RefAny3DInputs(flux, config.condition_size or config.resolution, torch.Generator().manual_seed(config.seed + 4),
                               config.text_dropout, config.reference_dropout, config.guidance, config.asset_loss_weight)
    train_only_lora(flux.transformer)
    domain_embedder.requires_grad_(True)
    objective = RefAny3DObjective(flux.transformer, domain_embedder, config.n_views, config.group_mask, config.pointmap_branch,
                                  config.gradient_checkpointing)
    return run_stage("refany3d", accelerator, objective, _batches(config, accelerator, config.seed + 5), to_inputs,
                     config.ref_steps, config.ref_lr, config, config.ref_minutes)


def _vocabulary(config: TrainConfig) -> list[str]:
    """Tokenizer words: the base vocabulary, every procedural caption word, and the datasets' captions."""
    from refany3d.data import list_samples
    from refany3d.tiny import words_of

    captions = [json.loads((folder / "meta.json").read_text())["caption"] for _, folder in list_samples(config.data)]
    return list(dict.fromkeys([*config.tiny.vocabulary, *caption_vocabulary(), *words_of(captions)]))


def train(config: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the configured stages; return a summary (also written to OUT/training_summary.json).

    A stage whose result already exists in OUT is skipped, and an interrupted stage resumes from
    its last checkpoint, so rerunning the same command continues a run.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = Path(config.output_dir)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation)
    set_seed(config.seed)
    base_dir, ref_dir = out / "base", out / "ref"
    summary_path = out / "training_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"stages": {}}
    settings = json.loads(json.dumps(config.to_json()))  # as JSON has it: lists, not tuples
    earlier = out / "train_config.json"
    if summary["stages"] and earlier.is_file():
        before = json.loads(earlier.read_text())
        changed = sorted(k for k, v in settings.items() if k != "stages" and before.get(k) != v)
        if changed:
            log(f"note: {out} holds an earlier run; its finished stages ({', '.join(summary['stages'])}) stay as "
                f"trained, so changed settings ({', '.join(changed)}) apply only to stages not finished yet")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        earlier.write_text(json.dumps(settings, indent=1))

    _train_base_stages(config, accelerator, summary, log)
    if "refany3d" in config.stages and not config.base_model and not (base_dir / "model_index.json").exists():
        raise InputError(f"stage refany3d needs a base: {base_dir} does not exist. Train stage 0 first "
                         "(--stages vae,base,refany3d) or give one with --base-model")
    if "refany3d" in config.stages and not (ref_dir / "domain_embedder.pth").exists():
        _train_refany3d_stage(config, accelerator, summary, log)
    if accelerator.is_main_process:
        for stage in config.stages:
            _checkpoint_path(out, stage).unlink(missing_ok=True)
        summary_path.write_text(json.dumps(summary, indent=1))
        plot_loss_curves({s: v["losses"] for s, v in summary["stages"].items()}, out / "loss_curve.png")
    return summary


def _train_base_stages(config: TrainConfig, accelerator, summary: dict[str, Any], log: Callable[[str], None]) -> None:
    """Stage 0 (vae, then base) on a small FLUX-architecture model built here. Each saves OUT/base
    when it finishes, so a rerun skips it and goes on from there."""
    from diffusers import FluxPipeline

    out = Path(config.output_dir)
    base_dir, summary_path = out / "base", out / "training_summary.json"
    finished = summary["stages"]
    stage0 = [s for s in ("vae", "base") if s in config.stages and s not in finished]
    if (base_dir / "model_index.json").exists() and not {"vae", "base"} & set(finished):
        stage0 = []  # a base put there by hand is used as it is
    if stage0:
        if config.base_model is not None:
            raise InputError("stage 0 builds its own base; do not combine it with base_model")
        if (base_dir / "model_index.json").exists():  # an earlier stage-0 stage finished it
            flux = FluxPipeline.from_pretrained(str(base_dir)).to(accelerator.device)
        else:
            config.tiny.vocabulary = _vocabulary(config)
            flux = build_base_pipeline(config.tiny, seed=config.seed).to(accelerator.device)
        for module in (flux.text_encoder, flux.text_encoder_2, flux.transformer, flux.vae):
            module.requires_grad_(False)
        for stage, fn in (("vae", train_vae), ("base", train_base)):
            if stage in stage0:
                result = fn(config, accelerator, flux)
                finished[stage] = _stage_summary(result)
                log(f"{stage}: {len(result.losses)} steps, final loss {_tail_mean(result.losses):.4f}, {result.seconds:.0f} s")
                if accelerator.is_main_process:
                    flux.save_pretrained(base_dir)
                    summary_path.write_text(json.dumps(summary, indent=1))
                    _checkpoint_path(out, stage).unlink(missing_ok=True)
                accelerator.wait_for_everyone()


def _train_refany3d_stage(config: TrainConfig, accelerator, summary: dict[str, Any],
                          log: Callable[[str], None]) -> None:
    """Stage 1, as it would run on FLUX.1-dev: the two LoRAs and the domain embedder on a frozen
    base (OUT/base or config.base_model), from scratch or from config.init_ref; writes OUT/ref
    and OUT/settings.json."""
    from diffusers import FluxPipeline

    out = Path(config.output_dir)
    source = config.base_model or out / "base"
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    flux = FluxPipeline.from_pretrained(str(source), dtype=dtype, quantization_config=quantization_config(config.quantize)
                                        ).to(accelerator.device)
    for module in (flux.vae, flux.text_encoder, flux.text_encoder_2, flux.transformer):
        module.requires_grad_(False).eval()
    if config.init_ref:  # continue a finished stage 1, or fine-tune published weights
        embedder = load_refany3d_weights(flux, resolve_ref_weights(config.init_ref)).to(accelerator.device)
    else:
        add_refany3d_adapters(flux.transformer, config.lora_rank, config.lora_alpha)
        inner = flux.transformer.config.num_attention_heads * flux.transformer.config.attention_head_dim
        torch.manual_seed(config.seed + 6)
        embedder = new_domain_embedder(inner).to(accelerator.device)
        _zero_last_layer(embedder)
    result = train_refany3d(config, accelerator, flux, embedder)
    summary["stages"]["refany3d"] = _stage_summary(result)
    log(f"refany3d: {len(result.losses)} steps, final loss {_tail_mean(result.losses):.4f}, {result.seconds:.0f} s")
    if accelerator.is_main_process:
        save_refany3d_weights(accelerator.unwrap_model(flux.transformer), embedder.float().cpu(), out / "ref")
        (out / "settings.json").write_text(json.dumps(sampling_settings(config, _text_length(flux)), indent=1) + "\n")
        (out / "training_summary.json").write_text(json.dumps(summary, indent=1))


def sampling_settings(config: TrainConfig, text_length: int) -> dict[str, Any]:
    """What the trained model samples best with, read by `pipeline.recommended_settings` from
    OUT/settings.json: the training sizes, views and caption length; the release's steps and guidance."""
    from refany3d.pipeline import RELEASE_SETTINGS

    return {
        "description": f"trained by `python -m refany3d train` ({', '.join(config.stages)}) on {', '.join(config.data)}",
        **RELEASE_SETTINGS,
        "height": config.resolution, "width": config.resolution,
        "condition_size": config.condition_size or config.resolution, "n_views": config.n_views,
        "max_sequence_length": text_length,
        # stage 1 on a base other than OUT/base: the one these weights belong with (weights.partner_base)
        **({"base_model": _location(config.base_model)} if config.base_model else {}),
        # an ablation samples only the way it was trained
        **({} if config.group_mask else {"group_mask": False}),
        **({} if config.pointmap_branch else {"pointmap_branch": False}),
    }


def _location(model: str) -> str:
    """A model folder as an absolute path (so OUT can move), a Hub id as it is."""
    folder = Path(model).expanduser()
    return str(folder.resolve()) if folder.is_dir() else model


def _zero_last_layer(embedder: torch.nn.Sequential) -> None:
    """Start the domain offset at zero, like the zero-initialised LoRA B: stage 1 begins at the base."""
    with torch.no_grad():
        embedder[-1].weight.zero_()
        embedder[-1].bias.zero_()


def _tail_mean(losses: list[float], n: int = 50) -> float:
    tail = losses[-n:]
    return sum(tail) / max(len(tail), 1)


def _stage_summary(result: StageResult) -> dict[str, Any]:
    return {"steps": len(result.losses), "planned_steps": result.planned_steps, "seconds": round(result.seconds, 1),
            "resumed_from": result.resumed_from, "final_loss": _tail_mean(result.losses), "losses": result.losses}


# ---------------------------------------------------------------------------------------------
# Loss curve (drawn with PIL: no plotting library is needed)
# ---------------------------------------------------------------------------------------------


def plot_loss_curves(curves: dict[str, list[float]], path: str | Path, width: int = 900, height: int = 300) -> Path:
    """One panel per stage: raw loss (light) and its moving average (dark), log scale."""
    from PIL import Image, ImageDraw

    curves = {k: v for k, v in curves.items() if v}
    panels = max(len(curves), 1)
    img = Image.new("RGB", (width, height * panels), "white")
    draw = ImageDraw.Draw(img)
    for row, (stage, losses) in enumerate(curves.items()):
        top, left, w, h = row * height + 30, 60, width - 80, height - 60
        values = [math.log10(max(x, 1e-8)) for x in losses]
        smooth, acc = [], values[0]
        for v in values:
            acc = 0.95 * acc + 0.05 * v
            smooth.append(acc)
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1.0

        def point(i: int, v: float) -> tuple[float, float]:
            return left + w * i / max(len(values) - 1, 1), top + h * (hi - v) / (hi - lo)

        draw.rectangle([left, top, left + w, top + h], outline="black")
        draw.line([point(i, v) for i, v in enumerate(values)], fill=(170, 190, 230), width=1)
        draw.line([point(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 160), width=2)
        draw.text((left, top - 20), f"{stage}: loss (log10) over {len(losses)} steps, final {_tail_mean(losses):.4f}", fill="black")
        draw.text((5, top), f"{10 ** hi:.3g}", fill="black")
        draw.text((5, top + h - 10), f"{10 ** lo:.3g}", fill="black")
    path = Path(path)
    img.save(path)
    return path


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

# The shipped default model: 64x64 targets, 4 reference views at 32x32, a VAE with 4x downsampling
# and 8 latent channels, so a target branch is 8x8 = 64 tokens and a view 4x4 = 16. Sized so that
# the preset trains on 2 CPU cores in about 1.5 hours; README "The embedded model" has the recipe.
EMBEDDED_TINY = TinyConfig(
    num_layers=2, num_single_layers=2, num_attention_heads=4, attention_head_dim=32, axes_dims_rope=(8, 12, 12),
    text_dim=64, text_layers=1, vae_channels=(16, 32, 64), latent_channels=8, max_text_tokens=32,
)
# A larger model for GPU runs: 4 + 4 blocks, a wider VAE with 16 latent channels (as FLUX has),
# LoRA rank 32; 26 MB. Its step counts are those of the one 8-minute H200 run (docs/experiments.md
# "Training on a GPU"), which were far too few: give it many more (--vae-steps, --base-steps, --ref-steps).
GPU_TINY = TinyConfig(
    num_layers=4, num_single_layers=4, num_attention_heads=4, attention_head_dim=32, axes_dims_rope=(8, 12, 12),
    text_dim=64, text_layers=1, vae_channels=(24, 48, 96), latent_channels=16, max_text_tokens=32,
)
PRESETS: dict[str, dict[str, Any]] = {
    "embedded": dict(tiny=EMBEDDED_TINY, resolution=64, condition_size=32, n_views=4, batch_size=8, vae_steps=3000,
                     base_steps=5000, ref_steps=16000, lora_rank=16, lora_alpha=16, checkpoint_every=100),
    "gpu": dict(tiny=GPU_TINY, resolution=64, condition_size=32, n_views=4, batch_size=128, vae_steps=708,
                base_steps=555, ref_steps=444, lora_rank=32, lora_alpha=32, checkpoint_every=100, num_workers=14),
    # Smoke tests: the smallest model that still has every part.
    "tiny": dict(tiny=TinyConfig(vae_channels=(8, 16), latent_channels=4), resolution=32, n_views=2, batch_size=2,
                 vae_steps=2, base_steps=2, ref_steps=2, lora_rank=4, lora_alpha=4, checkpoint_every=1, warmup_steps=1),
}


def preset_config(preset: str, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a named preset, with some fields replaced."""
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    settings = dict(PRESETS[preset])
    settings["tiny"] = TinyConfig(**asdict(settings["tiny"]))  # a copy: training extends its vocabulary
    settings.update(overrides)
    return TrainConfig(**settings)
