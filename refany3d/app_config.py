"""What the operator of the app sets, and the models it offers: configuration from environment
variables (README "App configuration"), the model registry, and a store that loads each model once.

Kept apart from the handlers (`refany3d.app_logic`) so that it reads, and is tested, without Gradio.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refany3d.errors import InputError, ModelLoadError
from refany3d.offload import OFFLOAD_MODES
from refany3d.quantization import QUANTIZE_MODES, parse_quantize

PUBLISHED_MODEL = "published"
EMBEDDED_MODEL = "embedded"
CONFIGURED_MODEL = "configured"
MIN_RESOLUTION = 64  # the smallest output the app offers
SAMPLERS = ("faithful", "exact", "cached")  # pipeline.SAMPLER_MODES, without importing torch; exact = faithful output, faster


def _env(environ: Mapping[str, str], name: str, default: str) -> str:
    value = environ.get(name, "").strip()
    return value or default


def _env_number(environ: Mapping[str, str], name: str, default: float, cast: type = int):
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return cast(raw)
    except ValueError:
        raise InputError(f"environment variable {name}={raw!r} is not a valid {cast.__name__}") from None


def _env_offload(environ: Mapping[str, str], name: str) -> str | None:
    """model / blocks, or a flag: on means "model", off none."""
    raw = environ.get(name, "").strip().lower()
    if raw in OFFLOAD_MODES:
        return raw
    return "model" if _env_flag(environ, name, False, also=OFFLOAD_MODES) else None


def _env_quantize(environ: Mapping[str, str], name: str) -> str | None:
    raw = environ.get(name, "").strip()
    try:
        return parse_quantize(raw)
    except InputError:
        raise InputError(f"environment variable {name}={raw!r} must be {' or '.join(QUANTIZE_MODES)}, or none") from None


def _env_flag(environ: Mapping[str, str], name: str, default: bool, also: tuple[str, ...] = ()) -> bool:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    *words, last = ("1/0", "true/false", "yes/no", "on/off", *also)
    raise InputError(f"environment variable {name}={raw!r} must be {', '.join(words)} or {last}")


@dataclass(frozen=True)
class ModelSpec:
    """Where one selectable model's weights are: a FLUX base and RefAny3D weights (ids or folders)."""

    label: str
    base_model: str
    ref_model: str


@dataclass(frozen=True)
class AppConfig:
    """Everything an operator can set through environment variables (see README)."""

    base_model: str | None = None  # set: a "configured" model comes first in the registry
    ref_model: str | None = None
    published_first: bool = False  # the published model before the embedded one (a Space that preloads it)
    device: str | None = None
    dtype: str | None = None  # bfloat16 / float16 / float32; None: bfloat16 on a GPU, float32 on the CPU
    sampler: str = "exact"
    cpu_offload: str | None = None  # "model" / "blocks" (see refany3d.offload)
    quantize: str | None = None  # "int8" (see refany3d.quantization)
    preload: bool = False
    max_upload_mb: int = 50
    max_faces: int = 1_000_000
    max_resolution: int = 1024
    max_steps: int = 50
    max_views: int = 12
    max_candidates: int = 4
    default_resolution: int = 512
    default_steps: int = 28
    default_views: int = 8
    concurrency: int = 1
    session_ttl_s: int = 6 * 3600
    gpu_duration_cap_s: int = 120
    zero_gpu: bool = False  # on a ZeroGPU Space (SPACES_ZERO_GPU): a GPU call ends at its requested duration
    gpu_tflops: float = 300.0
    cache_examples: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AppConfig:
        from refany3d.pipeline import DEFAULT_BASE_MODEL, DEFAULT_REF_MODEL, default_model, recommended_settings

        env = os.environ if environ is None else environ
        on_space = bool(env.get("SPACE_ID"))
        base_model = env.get("REFANY3D_BASE_MODEL", "").strip() or None
        ref_model = env.get("REFANY3D_REF_MODEL", "").strip() or None
        # A Space whose front matter preloads FLUX.1-dev and the published weights serves them.
        published_first = (on_space and not (base_model or ref_model)
                           and weights_problem(ModelSpec("", DEFAULT_BASE_MODEL, DEFAULT_REF_MODEL)) is None)
        # Starting values follow what the default model was trained for (the embedded one: 64 px).
        native = recommended_settings(DEFAULT_REF_MODEL if published_first else default_model(env)[1])
        config = cls(
            base_model=base_model,
            ref_model=ref_model,
            published_first=published_first,
            device=env.get("REFANY3D_DEVICE", "").strip() or None,
            dtype=env.get("REFANY3D_DTYPE", "").strip() or None,
            sampler=_env(env, "REFANY3D_SAMPLER", cls.sampler),
            cpu_offload=_env_offload(env, "REFANY3D_CPU_OFFLOAD"),
            quantize=_env_quantize(env, "REFANY3D_QUANTIZE"),
            preload=_env_flag(env, "REFANY3D_PRELOAD", on_space),
            max_upload_mb=_env_number(env, "REFANY3D_MAX_UPLOAD_MB", cls.max_upload_mb),
            max_faces=_env_number(env, "REFANY3D_MAX_FACES", cls.max_faces),
            max_resolution=_env_number(env, "REFANY3D_MAX_RESOLUTION", cls.max_resolution),
            max_steps=_env_number(env, "REFANY3D_MAX_STEPS", cls.max_steps),
            max_views=_env_number(env, "REFANY3D_MAX_VIEWS", cls.max_views),
            max_candidates=_env_number(env, "REFANY3D_MAX_CANDIDATES", cls.max_candidates),
            default_resolution=_env_number(env, "REFANY3D_DEFAULT_RESOLUTION", native["height"]),
            default_steps=_env_number(env, "REFANY3D_DEFAULT_STEPS", native["num_inference_steps"]),
            default_views=_env_number(env, "REFANY3D_DEFAULT_VIEWS", native["n_views"]),
            concurrency=_env_number(env, "REFANY3D_CONCURRENCY", cls.concurrency),
            session_ttl_s=_env_number(env, "REFANY3D_SESSION_TTL", cls.session_ttl_s),
            gpu_duration_cap_s=_env_number(env, "REFANY3D_GPU_DURATION_CAP", cls.gpu_duration_cap_s),
            zero_gpu=_env_flag(env, "SPACES_ZERO_GPU", False),
            gpu_tflops=_env_number(env, "REFANY3D_GPU_TFLOPS", cls.gpu_tflops, float),
            cache_examples=_env_flag(env, "REFANY3D_CACHE_EXAMPLES", True),
        )
        config.check()
        return config

    def check(self) -> None:
        """Refuse inconsistent limits at start-up rather than with a confusing error per visitor."""
        positive = ("max_upload_mb", "max_faces", "max_resolution", "max_steps", "max_views",
                    "max_candidates", "concurrency", "session_ttl_s", "gpu_duration_cap_s", "gpu_tflops")
        for name in positive:
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if not MIN_RESOLUTION <= self.default_resolution <= self.max_resolution:
            raise InputError(f"default resolution {self.default_resolution} must be within "
                             f"[{MIN_RESOLUTION}, {self.max_resolution}]")
        if not 1 <= self.default_steps <= self.max_steps:
            raise InputError(f"default steps {self.default_steps} must be within [1, {self.max_steps}]")
        if not 1 <= self.default_views <= self.max_views:
            raise InputError(f"default views {self.default_views} must be within [1, {self.max_views}]")
        if self.sampler not in SAMPLERS:
            raise InputError(f"sampler {self.sampler!r} must be one of {', '.join(SAMPLERS)}")
        if self.device is not None or self.dtype is not None:
            from refany3d.pipeline import parse_device, parse_dtype

            parse_dtype(self.dtype)
            if self.device is not None:
                parse_device(self.device)  # a device this machine lacks is named now, not at the first run

    def model_registry(self) -> dict[str, ModelSpec]:
        """Selectable models by name, the default first: the configured one (environment), the
        embedded one trained by this project (when shipped), the published FLUX.1-dev release."""
        from refany3d.pipeline import DEFAULT_BASE_MODEL, DEFAULT_REF_MODEL, EMBEDDED_MODEL_DIR, default_model

        registry: dict[str, ModelSpec] = {}
        published = ModelSpec(f"RefAny3D ({DEFAULT_REF_MODEL}) on {DEFAULT_BASE_MODEL}",
                              DEFAULT_BASE_MODEL, DEFAULT_REF_MODEL)
        embedded = None
        if (EMBEDDED_MODEL_DIR / "base").is_dir() and (EMBEDDED_MODEL_DIR / "ref").is_dir():
            embedded = ModelSpec("Embedded small model (trained by this project)",
                                 str(EMBEDDED_MODEL_DIR / "base"), str(EMBEDDED_MODEL_DIR / "ref"))
        if self.base_model or self.ref_model:
            base, ref = default_model({}, self.base_model, self.ref_model)  # one half comes with its partner
            registry[CONFIGURED_MODEL] = ModelSpec(f"Configured: {ref} on {base}", base, ref)
        if self.published_first:
            registry[PUBLISHED_MODEL] = published
        if embedded is not None:
            registry[EMBEDDED_MODEL] = embedded
        registry[PUBLISHED_MODEL] = published
        return registry


# ------------------------------------------------------------------------------------- models
def condition_ratio(spec: ModelSpec) -> float:
    """Reference-view size / output size the model was trained with (its settings.json; the
    embedded model: 32 px views for 64 px images, 0.5), so views scale with the output as in training."""
    from refany3d.pipeline import recommended_settings

    try:
        native = recommended_settings(spec.ref_model)
    except ModelLoadError:
        return 1.0  # an unreadable settings.json: the release's views, as large as the output
    return native["condition_size"] / native["height"]


def _hub_file_cached(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # an invalid repo id is simply "not cached"
        return False


def weights_problem(spec: ModelSpec) -> str | None:
    """Why this model's weights are not on this machine (None when they are), without network.

    Folders must hold the files; hub ids must be in the local Hugging Face cache (Spaces preload
    them). Missing hub weights may still download on first use.
    """
    from refany3d.weights import REF_WEIGHT_FILES, looks_like_a_path

    problems = []
    for what, location, files in (
        ("FLUX base model", spec.base_model, ("model_index.json",)),
        ("RefAny3D weights", spec.ref_model, REF_WEIGHT_FILES),
    ):
        folder = Path(location).expanduser()
        if folder.is_dir():
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                problems.append(f"the {what} folder {location} lacks {', '.join(missing)}")
        elif looks_like_a_path(location):
            problems.append(f"the {what} folder {location} does not exist")
        elif not all(_hub_file_cached(location, f) for f in files):
            problems.append(f"{location} ({what}) is not in the Hugging Face cache")
    return "; ".join(problems) or None


class ModelStore:
    """Pipelines by registry name, each loaded at most once per process, one in memory at a time.

    A load is expensive (minutes for FLUX.1-dev), so concurrent first requests wait for one load
    instead of starting several; a failed load is remembered for `retry_after_s` so a visitor
    clicking again gets the message at once instead of another slow attempt.
    """

    def __init__(self, registry: dict[str, ModelSpec], loader: Callable[[ModelSpec], Any],
                 retry_after_s: float = 300.0):
        self.registry = registry
        self._loader = loader
        self._retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._loaded: tuple[str, Any] | None = None
        self._failures: dict[str, tuple[float, str]] = {}

    def get(self, name: str) -> Any:
        spec = self.registry.get(name)
        if spec is None:
            raise InputError(f"unknown model {name!r}; choose one of {', '.join(self.registry)}")
        with self._lock:
            if self._loaded is not None and self._loaded[0] == name:
                return self._loaded[1]
            failed = self._failures.get(name)
            if failed is not None and time.monotonic() - failed[0] < self._retry_after_s:
                raise ModelLoadError(failed[1])
            self._loaded = None  # free the previous model before loading the next one
            try:
                pipeline = self._loader(spec)
            except ModelLoadError as err:  # the details are for the operator; the visitor gets what to do
                print(f"refany3d app: model {name!r} could not be loaded: {err}")
                others = [other.label for other_name, other in self.registry.items() if other_name != name]
                if weights_problem(spec) is None:  # the files are here: they do not load (e.g. do not fit)
                    what = f"the weights of {spec.label} are on this server but could not be loaded"
                else:
                    what = (f"no model weights available for {spec.label} on this server: they are not here and "
                            "could not be downloaded")
                message = what + (f"; choose {others[0]}" if others else "") + " (the server log says why)"
                self._failures[name] = (time.monotonic(), message)
                raise ModelLoadError(message) from None
            self._failures.pop(name, None)
            self._loaded = (name, pipeline)
            return pipeline

    def loaded_name(self) -> str | None:
        return None if self._loaded is None else self._loaded[0]


def pipeline_loader(config: AppConfig) -> Callable[[ModelSpec], Any]:
    """The loader ModelStore uses: RefAny3DPipeline.from_pretrained with the configured device."""

    def load(spec: ModelSpec):
        from refany3d.pipeline import RefAny3DPipeline

        return RefAny3DPipeline.from_pretrained(
            spec.base_model, spec.ref_model, device=config.device, dtype=config.dtype, cpu_offload=config.cpu_offload,
            quantize=config.quantize,
        )

    return load
