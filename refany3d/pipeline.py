"""RefAny3DPipeline: generate an image of a 3D asset in a described scene, plus its point map.

It wraps a diffusers FluxPipeline (text encoders, VAE, transformer, scheduler) with the RefAny3D
weights (LoRA adapters "default" and "coord", and the domain embedder) and samples both targets
with the joint multi-branch pass of `refany3d.transformer`.
"""
from __future__ import annotations

import copy
import json
import math
import os
import warnings
from contextlib import nullcontext
from functools import partial
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from refany3d.cameras import ORBIT_RADIUS
from refany3d.conditions import black_like, condition_tokens, latent_position_ids, pack_latents, unpack_latents
from refany3d.errors import InputError, ModelLoadError, RefAny3DWarning, require_finite, require_whole_number
from refany3d.images import MAX_IMAGE_SIDE, ImageLike, to_rgb_image
from refany3d.offload import OFFLOAD_MODES, CpuOffload, parse_offload
from refany3d.quantization import parse_quantize, quantization_config
from refany3d.transformer import joint_forward, refany3d_branches, refany3d_group_mask
from refany3d.weights import (DEFAULT_BASE_MODEL, DEFAULT_REF_MODEL, load_refany3d_weights, looks_like_a_path,
                              partner_base, partner_ref, resolve_ref_weights)


StepCallback = Callable[[int, int], None]
# diffusers' callback_on_step_end tensors, by the index of the target they hold (packed latents)
STEP_END_TENSORS = {"latents": 0, "pointmap_latents": 1}
SAMPLER_MODES = ("faithful", "exact", "cached")

# The small model trained by this project (`python -m refany3d train`), shipped in the repository.
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "embedded"


# The settings FLUX.1-dev + RefAny3D were trained for (the release's demo settings).
RELEASE_SETTINGS = dict(
    height=512, width=512, condition_size=512, n_views=8, num_inference_steps=28,
    guidance_scale=3.5, image_guidance_scale=2.0, max_sequence_length=512,
)


# Recorded only for a model trained as an ablation (`train --no-group-mask / --no-pointmap-branch`).
ABLATION_SETTINGS = ("group_mask", "pointmap_branch")


def recommended_settings(ref_model: str | Path) -> dict:
    """The settings a model was trained for: a local model's `settings.json` beside its ref folder
    (the embedded model ships one: 64 px, 4 views at 32 px), else the release's."""
    settings = dict(RELEASE_SETTINGS)
    path = Path(ref_model).expanduser().parent / "settings.json"
    if Path(ref_model).expanduser().is_dir() and path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot read the model's settings {str(path)!r}: {err}") from None
        settings.update({k: v for k, v in stored.items() if k in RELEASE_SETTINGS or k in ABLATION_SETTINGS})
    return settings


def default_model(environ: Mapping[str, str] | None = None, base: str | None = None,
                  ref: str | None = None) -> tuple[str, str]:
    """(base, ref) to sample with. The halves given come first (the arguments, then
    $REFANY3D_BASE_MODEL / $REFANY3D_REF_MODEL); one given alone comes with its partner (weights
    trained here with the base beside them, the published ones with FLUX.1-dev: see
    `weights.partner_base`), since a base and weights made for another cannot load together.
    With neither: the embedded model when present, else FLUX.1-dev + the published weights."""
    environ = os.environ if environ is None else environ
    base = base or environ.get("REFANY3D_BASE_MODEL", "").strip() or None
    ref = ref or environ.get("REFANY3D_REF_MODEL", "").strip() or None
    if base and ref:
        return base, ref
    if ref:
        return partner_base(ref), ref
    if base:
        return base, partner_ref(base)
    if (EMBEDDED_MODEL_DIR / "base").is_dir() and (EMBEDDED_MODEL_DIR / "ref").is_dir():
        return str(EMBEDDED_MODEL_DIR / "base"), str(EMBEDDED_MODEL_DIR / "ref")
    return DEFAULT_BASE_MODEL, DEFAULT_REF_MODEL


@dataclass
class RefAny3DOutput:
    """The generated image and its pixel-aligned point map (PIL images, or float HxWx3 in [0,1])."""

    image: Image.Image | np.ndarray
    pointmap: Image.Image | np.ndarray | None  # None only for the no-point-map ablation
    settings: dict = field(default_factory=dict)
    candidates: list | None = None  # alignment reports of every candidate (generate_from_mesh with K generators)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """torch.bfloat16 / float16 / float32, also by name ("bfloat16", "torch.float16"); None stays None."""
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype.removeprefix("torch."), dtype)
    if dtype is not None and dtype not in _DTYPES.values():
        raise InputError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype!r}")
    return dtype


def parse_device(device: str | int | torch.device) -> torch.device:
    """A torch device that exists on this machine, or an InputError that says what does."""
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}"  # torch's convention for a bare index
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' asked for, but this machine or torch build has no Apple MPS support; use cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"device {str(device)!r} cannot run the pipeline; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(device)!r} asked for, but this machine has no CUDA GPU (torch "
                         f"{torch.__version__}); use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"device {str(device)!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def _as_images(views: Sequence[ImageLike], what: str) -> list[Image.Image]:
    if isinstance(views, (Image.Image, np.ndarray, str, Path)):
        views = [views]
    return [to_rgb_image(v, f"{what} {i}") for i, v in enumerate(views)]


class RefAny3DPipeline:
    """RefAny3D sampler. Build it with `from_pretrained`; call it with a prompt and reference views."""

    def __init__(self, flux, domain_embedder: torch.nn.Module, default_settings: Mapping[str, Any] | None = None):
        self.flux = flux
        # What a call leaves out: the settings the model was trained for (see recommended_settings).
        # Settings a partial `default_settings` leaves out are the release's; the ablation flags
        # are on (the release's design).
        self.default_settings = {**RELEASE_SETTINGS, **{flag: True for flag in ABLATION_SETTINGS},
                                 **(default_settings or {})}
        self.domain_embedder = domain_embedder.to(device=flux.transformer.device, dtype=flux.transformer.dtype)
        self.offload: CpuOffload | None = None  # set: weights wait on the CPU between uses (enable_cpu_offload)
        self.quantize: str | None = None  # set by from_pretrained(quantize=...): the large models' weights are int8
        self.source: dict[str, str] = {}  # from_pretrained's base and ref model: what batch runs record

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        base_model: str | Path = DEFAULT_BASE_MODEL,
        ref_model: str | Path = DEFAULT_REF_MODEL,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        cpu_offload: bool | str = False,
        torch_dtype: torch.dtype | str | None = None,
        quantize: str | None = None,
    ) -> RefAny3DPipeline:
        """Load a diffusers FLUX base (hub id or folder) and RefAny3D weights (hub id or folder).

        bf16 on GPU and float32 on CPU unless `dtype` (or diffusers' older name `torch_dtype`) is
        given; FLUX overflows in float16, so prefer bfloat16. `cpu_offload` ("model", or "blocks"
        for smaller GPUs; True means "model") keeps weights in CPU memory and brings them to the GPU
        only while they run (see `enable_cpu_offload`). `quantize="int8"` loads the transformer and
        T5 with int8 weights (half the memory; needs torchao; see `refany3d.quantization`).
        """
        from diffusers import FluxPipeline

        device = parse_device(device) if device is not None else default_device()
        if dtype is not None and torch_dtype is not None and parse_dtype(dtype) != parse_dtype(torch_dtype):
            raise InputError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; give one of them")
        dtype = parse_dtype(dtype if dtype is not None else torch_dtype)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        offload = parse_offload(cpu_offload)
        quantize = parse_quantize(quantize)
        quantized_loading = quantization_config(quantize)  # a missing torchao fails before the base loads
        ref_files = resolve_ref_weights(ref_model)  # a missing ref model fails before the (large) base loads
        base_folder = Path(base_model).expanduser()
        if not base_folder.is_dir() and (base_folder.exists() or looks_like_a_path(str(base_model))):
            raise ModelLoadError(f"FLUX base model folder {str(base_folder)!r} not found (CLI: --base-model DIR): give a "
                                 f"diffusers FluxPipeline folder or a Hugging Face repo id such as {DEFAULT_BASE_MODEL}")
        try:
            flux = FluxPipeline.from_pretrained(str(base_model), dtype=dtype, quantization_config=quantized_loading)
        except Exception as err:
            raise ModelLoadError(
                f"could not load the FLUX base model {str(base_model)!r} ({type(err).__name__}: {err}). "
                "Give a local diffusers FluxPipeline folder as base_model (CLI: --base-model DIR); "
                f"{DEFAULT_BASE_MODEL} is gated on the Hub and needs an access token."
            ) from None
        embedder = load_refany3d_weights(flux, ref_files)
        flux.transformer.requires_grad_(False)
        pipe = cls(flux, embedder.to(dtype), recommended_settings(ref_model))
        pipe.quantize = quantize
        pipe.source = {"base_model": str(base_model), "ref_model": str(ref_model),
                       "dtype": str(dtype).removeprefix("torch."), **({"quantize": quantize} if quantize else {})}
        if offload and device.type != "cpu":
            pipe.enable_cpu_offload(offload, device)
        else:
            pipe.to(device)
        return pipe

    def to(self, *args: str | torch.device | torch.dtype, device: str | torch.device | None = None,
           dtype: torch.dtype | str | None = None) -> RefAny3DPipeline:
        """Move to a device and/or cast to a dtype, as `pipe.to("cuda")`, `pipe.to(torch.bfloat16)`.
        A device places every weight there, which ends CPU offload."""
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        dtype = parse_dtype(dtype)
        if device is not None:
            device = parse_device(device)
        if self.quantize and dtype is not None:
            if dtype != self.dtype:
                raise InputError(f"a pipeline loaded with quantize={self.quantize!r} keeps the dtype it was loaded in "
                                 f"({str(self.dtype).removeprefix('torch.')}); load it again with dtype={dtype}")
            dtype = None  # it is that dtype already, and diffusers refuses to cast a quantized model at all
        offload = self.offload
        if offload is not None:
            offload.remove()  # its block streams hold the weights as they rest now
            self.offload = None
        self.flux.to(device=device, dtype=dtype)
        self.domain_embedder.to(device=device, dtype=dtype)
        if offload is not None and device is None:
            self.enable_cpu_offload(offload.mode, offload.device)
        if dtype is not None and self.source:
            self.source["dtype"] = str(dtype).removeprefix("torch.")
        return self

    def enable_cpu_offload(self, mode: str = "model", device: str | torch.device | None = None) -> RefAny3DPipeline:
        """Keep the weights in CPU memory and bring them to `device` (default: the GPU) only while
        they run: "model" moves each model for its stage (about 40 GB GPUs for FLUX.1-dev),
        "blocks" also streams the transformer's blocks one at a time (16-24 GB GPUs; slower, as
        every step copies the blocks over). See `refany3d.offload`."""
        grain = parse_offload(mode)
        if grain is None:
            raise InputError(f"enable_cpu_offload takes one of {', '.join(OFFLOAD_MODES)}, got {mode!r}")
        device = parse_device(device) if device is not None else default_device()
        self.to("cpu")
        self.offload = CpuOffload(grain, device, self.flux.transformer)
        return self

    @property
    def cpu_offload(self) -> str | None:
        """The offload grain ("model" / "blocks"), or None when every weight stays on its device."""
        return self.offload.mode if self.offload else None

    def enable_compile(self, enabled: bool = True) -> RefAny3DPipeline:
        """Run the fast modes' transformer blocks through `torch.compile`. The first call of each
        image size compiles (slow); it pays off over many images of one size (batch jobs)."""
        from refany3d.fast import cached_encoders

        cached_encoders(self).compile = enabled
        return self

    @property
    def device(self) -> torch.device:
        """Where sampling runs (with CPU offload: the GPU the models visit)."""
        return self.offload.device if self.offload else self.flux.transformer.device

    def _models_on_device(self, *models: torch.nn.Module):
        """A context with `models` on the execution device: a no-op unless CPU offload is on."""
        return self.offload.on_device(*models) if self.offload else nullcontext()

    @property
    def dtype(self) -> torch.dtype:
        return self.flux.transformer.dtype

    @property
    def latent_channels(self) -> int:
        return self.flux.transformer.config.in_channels // 4

    # ----------------------------------------------------------------------------------- encoding
    def encode_prompt(self, prompt: str, max_sequence_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 token embeddings (1, L, D) and the pooled CLIP embedding (1, P)."""
        max_len = min(max_sequence_length, self.flux.tokenizer_2.model_max_length)
        embeds, pooled, _ = self.flux.encode_prompt(
            prompt=prompt, prompt_2=None, device=self.device, max_sequence_length=max_len
        )
        return embeds, pooled

    def encode_views(
        self, images: Sequence[Image.Image], size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return condition_tokens(self.flux.vae, self.flux.image_processor, images, size, generator)

    def decode(self, tokens: torch.Tensor, height: int, width: int, output_type: str):
        vae = self.flux.vae
        lat_h, lat_w = self._latent_size(height, width)
        latents = unpack_latents(tokens, lat_h, lat_w)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        pixels = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        if not torch.isfinite(pixels).all():  # else a black image, or NaNs, with no word of why
            raise InputError("sampling diverged to NaN or infinite values: lower the guidance"
                             + {torch.float16: ", or load the model in bfloat16 (FLUX overflows in float16)",
                                torch.bfloat16: ", or load the model in float32"}.get(vae.dtype, ""))
        return self.flux.image_processor.postprocess(pixels, output_type=output_type)[0]

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        factor = self.flux.vae_scale_factor
        return 2 * (height // (factor * 2)), 2 * (width // (factor * 2))

    # ----------------------------------------------------------------------------------- sampling
    def _check(self, prompt, rgb_views, pointmap_views, height, width, condition_size, steps, output_type,
               guidance_scales, max_sequence_length, callback):
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        for name, value in guidance_scales.items():
            require_finite(name, value)
        require_whole_number("max_sequence_length", max_sequence_length, minimum=1)
        if len(rgb_views) == 0:
            raise InputError("at least one reference view is needed (got 0 RGB views)")
        if len(rgb_views) != len(pointmap_views):
            raise InputError(
                f"rgb_views and pointmap_views must have the same length, got {len(rgb_views)} and {len(pointmap_views)}"
            )
        for name, value in (("height", height), ("width", width), ("condition_size", condition_size)):
            self._check_size(name, value)
        require_whole_number("num_inference_steps", steps, minimum=1)
        if callback is not None and not callable(callback):
            raise InputError(f"callback must be a function callback(step, total), got {type(callback).__name__}")
        if output_type not in ("pil", "np"):
            raise InputError(f"output_type must be 'pil' or 'np', got {output_type!r}")

    def _own(self, name: str, value):
        """`value`, or when it is None the model's own setting (`default_settings`)."""
        return self.default_settings[name] if value is None else value

    def _refuse_diffusers_offload(self) -> None:
        """diffusers' enable_model_cpu_offload / enable_sequential_cpu_offload hook a model's
        forward(), which the joint pass never calls (see `refany3d.offload`): with them, sampling
        would run on the wrong device or on meta tensors."""
        flux = self.flux
        hooked = [name for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
                  if getattr(getattr(flux, name, None), "_hf_hook", None) is not None]
        if hooked:
            raise InputError(f"diffusers' CPU offload hooks are on {', '.join(hooked)}; they do not apply to "
                             "RefAny3D's joint pass: use pipe.enable_cpu_offload('model' or 'blocks') instead "
                             "(CLI --cpu-offload)")

    def _check_size(self, name: str, value) -> None:
        """An image side the model can take: a positive multiple of its latent patch (16 for FLUX),
        at most MAX_IMAGE_SIDE (beyond it a call would only fail to allocate memory)."""
        multiple = self.flux.vae_scale_factor * 2
        require_whole_number(name, value, minimum=1)
        if value % multiple:
            raise InputError(f"{name} must be a multiple of {multiple}, got {value}")
        if value > MAX_IMAGE_SIDE:
            raise InputError(f"{name} must be at most {MAX_IMAGE_SIDE}, got {value}")

    def _timesteps(self, steps: int, image_tokens: int):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        # Each call steps schedulers of its own: a scheduler keeps its step index, and the app's
        # generations (REFANY3D_CONCURRENCY > 1) share one pipeline across threads.
        scheduler = copy.deepcopy(self.flux.scheduler)
        mu = calculate_shift(
            image_tokens,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1.0 / steps, steps)
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas, mu=mu)
        # The point-map target steps with a scheduler of its own (same schedule, own step index).
        return timesteps, scheduler, copy.deepcopy(scheduler)

    def _predict_faithful(self, text, pooled, target_ids, views, black, guidance, group_mask, targets, t) -> list[list[torch.Tensor]]:
        """Per guidance pass (conditional first), the velocity predictions of the targets
        ([RGB, point map], or [RGB] for the no-point-map ablation, whose `views` have no point maps)."""
        transformer, (rgb, pm, view_ids) = self.flux.transformer, views
        n, outputs = rgb.shape[0], tuple(range(1, 1 + len(targets)))
        branches = refany3d_branches(text, pooled, targets, target_ids, list(rgb[:, None]), list(pm[:, None]),
                                     view_ids, t, guidance)
        mask = refany3d_group_mask(n, pointmap_branch=pm.shape[0] > 0).to(t.device) if group_mask else None
        passes = [joint_forward(transformer, branches, self.domain_embedder, mask, outputs)]
        if black is not None:  # image guidance: every view black, full attention
            blacks = [black] * n
            branches = refany3d_branches(text, pooled, targets, target_ids, blacks, blacks[: pm.shape[0]], view_ids, t, guidance)
            passes.append(joint_forward(transformer, branches, self.domain_embedder, None, outputs))
        return passes

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        rgb_views: Sequence[ImageLike],
        pointmap_views: Sequence[ImageLike],
        height: int | None = None,
        width: int | None = None,
        condition_size: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        max_sequence_length: int | None = None,
        callback: StepCallback | None = None,
        callback_on_step_end: Callable[..., dict | None] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        output_type: str = "pil",
        mode: str | None = None,
        cache_refresh_every: int = 0,
        group_mask: bool | None = None,
        pointmap_branch: bool | None = None,
    ) -> RefAny3DOutput:
        """Sample the RGB image and the point map of `prompt`, referencing the given views.

        rgb_views / pointmap_views: equal-length lists (N >= 1) of images (PIL, arrays or paths),
        resized to condition_size. `callback(step, total)` runs after every denoising step, for
        progress. As in diffusers, `callback_on_step_end(pipe, step, timestep, tensors)` runs there
        too with the packed latents named in `callback_on_step_end_tensor_inputs` ("latents": the
        image's, "pointmap_latents": the point map's); tensors in the dict it returns replace them.
        Sizes, steps, guidance and max_sequence_length left as None are the model's own
        (`self.default_settings`: its settings.json, else the release's 512 px, 28 steps, 3.5, 2.0).
        mode: "exact" (the default: the reference pass's output with less work and memory, with
        prompt/view encodings cached across calls), "faithful" (the reference pass,
        `transformer.joint_forward`, once per guidance pass, with a dense group mask: memory grows
        with the square of all tokens; the default with pointmap_branch=False) or "cached"
        (approximate: the views' keys/values of the first step reused); see `refany3d.fast`.
        cache_refresh_every: in cached mode, recompute the views' keys/values every this many steps
        (0: only at the first step); smaller is slower and closer to exact.
        group_mask: False samples with full attention among all branches, for models trained
        without the release's group mask (`train --no-group-mask`, the ablation; such a model's
        settings.json says so, and None follows it).
        pointmap_branch: False samples a model trained without the point-map target and views
        (`train --no-pointmap-branch`, the ablation; faithful mode): the point-map views are
        encoded as usual, so a seed draws the same numbers, but not shown to the model, and the
        output has no point map.
        """
        self._refuse_diffusers_offload()
        height = self._own("height", height)
        width = self._own("width", width)
        condition_size = self._own("condition_size", condition_size)
        num_inference_steps = self._own("num_inference_steps", num_inference_steps)
        guidance_scale = self._own("guidance_scale", guidance_scale)
        image_guidance_scale = self._own("image_guidance_scale", image_guidance_scale)
        max_sequence_length = self._own("max_sequence_length", max_sequence_length)
        group_mask = self._own("group_mask", group_mask)
        pointmap_branch = self._own("pointmap_branch", pointmap_branch)
        if mode is None:
            mode = "exact" if pointmap_branch else "faithful"  # the ablation's only sampler
        if mode not in SAMPLER_MODES:
            raise InputError(f"mode must be one of {', '.join(SAMPLER_MODES)}, got {mode!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise InputError(f"generator must be a torch.Generator, got {type(generator).__name__} (a list of "
                             "generators, one per candidate, is for generate_from_mesh)")
        for name, flag in (("group_mask", group_mask), ("pointmap_branch", pointmap_branch)):
            if not isinstance(flag, bool):
                raise InputError(f"{name} must be true or false, got {flag!r}")
        if not pointmap_branch and mode != "faithful":
            raise InputError(f"pointmap_branch=False (the ablation) samples in mode='faithful' only (mode is {mode!r})")
        if cache_refresh_every and mode != "cached":
            raise InputError(f"cache_refresh_every applies to mode='cached' only (mode is {mode!r})")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise InputError("callback_on_step_end must be a function (pipe, step, timestep, tensors) -> dict, got "
                             f"{type(callback_on_step_end).__name__}")
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in STEP_END_TENSORS]
        if unknown:
            raise InputError(f"callback_on_step_end_tensor_inputs: unknown {', '.join(map(repr, unknown))}; "
                             f"choose from {', '.join(STEP_END_TENSORS)}")
        rgb_images = _as_images(rgb_views, "RGB view")
        pm_images = _as_images(pointmap_views, "point-map view")
        self._check(prompt, rgb_images, pm_images, height, width, condition_size, num_inference_steps, output_type,
                    {"guidance_scale": guidance_scale, "image_guidance_scale": image_guidance_scale}, max_sequence_length,
                    callback)
        height, width, condition_size = int(height), int(width), int(condition_size)  # NumPy numbers too
        num_inference_steps = int(num_inference_steps)
        # the text encoder's limit caps it (T5: 512 tokens); settings record what was used
        max_sequence_length = min(int(max_sequence_length), self.flux.tokenizer_2.model_max_length)
        guidance_scale, image_guidance_scale = float(guidance_scale), float(image_guidance_scale)
        device, dtype = self.device, self.dtype
        if mode == "faithful":
            encoder = self
        else:
            from refany3d.fast import FastDenoiser, cached_encoders

            encoder = cached_encoders(self)  # same encodings, cached across calls

        flux = self.flux
        with self._models_on_device(flux.text_encoder, flux.text_encoder_2):
            text, pooled = encoder.encode_prompt(prompt, max_sequence_length)
        lat_h, lat_w = self._latent_size(height, width)
        shape = (1, self.latent_channels, lat_h, lat_w)
        # Noise: RGB target first, then the point-map target, from the same generator.
        noise = [torch.randn(shape, generator=generator, device=generator.device if generator else "cpu") for _ in range(2)]
        targets = [pack_latents(n).to(device=device, dtype=dtype) for n in noise]
        target_ids = latent_position_ids(lat_h, lat_w).to(device)

        n = len(rgb_images)
        black = None
        with self._models_on_device(flux.vae):
            # Conditions draw their VAE posterior samples after the noise, from the same generator.
            tokens, cond_ids = encoder.encode_views(rgb_images + pm_images, condition_size, generator)
            if not math.isclose(image_guidance_scale, 1.0):
                black = encoder.encode_views(black_like(rgb_images[:1]), condition_size, generator)[0]
        views = (tokens[:n], tokens[n:] if pointmap_branch else tokens[:0], cond_ids)
        targets = targets if pointmap_branch else targets[:1]
        with self._models_on_device(flux.transformer, self.domain_embedder):
            guidance = torch.full((1,), guidance_scale, device=device, dtype=torch.float32)
            if mode == "faithful":
                predict = partial(self._predict_faithful, text, pooled, target_ids, views, black, guidance, group_mask)
            else:
                uncond = None if black is None else (black, black)
                predict = FastDenoiser(self.flux.transformer, self.domain_embedder, text, pooled, target_ids, views,
                                       uncond, guidance, mode=mode, compile=encoder.compile,
                                       cache_refresh_every=cache_refresh_every, group_mask=group_mask).predict
            timesteps, *schedulers = self._timesteps(num_inference_steps, targets[0].shape[1])
            for i, t in enumerate(timesteps):
                passes = predict(targets, (t / 1000).expand(1).to(dtype))
                preds = passes[0] if len(passes) == 1 else [u + image_guidance_scale * (c - u) for c, u in zip(*passes)]
                targets = [sch.step(p, t, x, return_dict=False)[0] for sch, p, x in zip(schedulers, preds, targets)]
                if callback_on_step_end is not None:
                    targets = self._step_end(callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, targets)
                if callback is not None:
                    callback(i + 1, len(timesteps))

        settings = dict(
            prompt=prompt,
            n_views=n,
            height=height,
            width=width,
            condition_size=condition_size,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            image_guidance_scale=image_guidance_scale,
            max_sequence_length=max_sequence_length,
            mode=mode,
            **({"cache_refresh_every": cache_refresh_every} if mode == "cached" else {}),
            **({} if group_mask else {"group_mask": False}),
            **({} if pointmap_branch else {"pointmap_branch": False}),
        )
        with self._models_on_device(flux.vae):
            image = self.decode(targets[0], height, width, output_type)
            pointmap = self.decode(targets[1], height, width, output_type) if pointmap_branch else None
        return RefAny3DOutput(image=image, pointmap=pointmap, settings=settings)

    def _step_end(self, callback: Callable[..., dict | None], names: Sequence[str], step: int, timestep,
                  targets: list[torch.Tensor]) -> list[torch.Tensor]:
        """diffusers' callback_on_step_end: the requested latents go out, returned ones come back."""
        given = {name: targets[STEP_END_TENSORS[name]] for name in names if STEP_END_TENSORS[name] < len(targets)}
        returned = callback(self, step, timestep, given) or {}
        targets = list(targets)
        for name, index in STEP_END_TENSORS.items():
            if name in returned and index < len(targets):
                targets[index] = returned[name]
        return targets

    def generate_from_mesh(
        self,
        mesh_or_path,
        prompt: str,
        n_views: int | None = None,
        radius: float = ORBIT_RADIUS,
        pitch: float = 0.0,
        y_rotation: float = 0.0,
        condition_size: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        **call_kwargs,
    ) -> RefAny3DOutput:
        """Render the asset's reference views (see `refany3d.render_views`), then sample.

        n_views and condition_size left as None, like the call's settings, are the model's own.

        A list of K generators samples K candidates and returns the most self-consistent one: the
        one whose point map is the most rigid view of the asset (`alignment.consistency_key`), as
        a small model's samples vary much in that from seed to seed. Its `candidates` holds every
        candidate's alignment report and settings["candidate"] the index of the one returned.
        """
        from refany3d.mesh import as_mesh
        from refany3d.views import render_views

        n_views, condition_size = self._own("n_views", n_views), self._own("condition_size", condition_size)
        generators = list(generator) if isinstance(generator, (list, tuple)) else None
        if generators is not None:
            if not generators:
                raise InputError("generator is an empty list: give one generator per candidate")
            if not all(isinstance(g, torch.Generator) for g in generators):
                kinds = ", ".join(sorted({type(g).__name__ for g in generators}))
                raise InputError(f"generator must be a torch.Generator or a list of them, got a list of {kinds}")
            if self._own("pointmap_branch", call_kwargs.get("pointmap_branch")) is False:
                raise InputError("choosing among candidates needs their point maps (pointmap_branch=False has none)")
        self._check_size("condition_size", condition_size)  # before rendering views of that size
        mesh = as_mesh(mesh_or_path)  # loaded once
        views = render_views(mesh, n_views=n_views, resolution=condition_size, radius=radius, pitch=pitch,
                             y_rotation=y_rotation)
        views.require_visible()
        note = views.blind_views_note()
        if note:
            warnings.warn(note, RefAny3DWarning, stacklevel=2)
        sample = partial(self, prompt, views.rgb, views.pointmap, condition_size=condition_size, **call_kwargs)
        if generators is None:
            out = sample(generator=generator)
        else:
            from refany3d.alignment import choose_candidate

            outs = [sample(generator=g) for g in generators]
            best, reports = choose_candidate(mesh, [(o.image, o.pointmap) for o in outs], y_rotation)
            out = outs[best]
            out.candidates = reports
            out.settings.update(candidates=len(outs), candidate=best)
        out.settings.update(radius=radius, pitch=pitch, y_rotation=y_rotation)
        return out
