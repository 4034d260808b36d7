"""The work behind the Gradio app: sessions, validation, GPU time, handlers.

`app.py` only lays out and wires the UI; every handler it wires lives here, so the same logic
serves the browser, the `gradio_client` API and tests. What the operator configures, and the
models on offer, are in `refany3d.app_config`. The parts:

- `SessionFolders`: one private temporary folder per browser session, deleted when it ends.
- handlers: mesh display, reference-view preview, generation (CPU work around one GPU call),
  alignment analysis of a generation (CPU), each turning every expected failure into a `gr.Error`
  with a message meant for the visitor.
"""
from __future__ import annotations

import csv
import inspect
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import wraps
from pathlib import Path
from typing import Any

import anyio
import gradio as gr
import numpy as np
import spaces

from refany3d.app_config import (MIN_RESOLUTION, AppConfig, ModelSpec, ModelStore, condition_ratio, pipeline_loader,
                                 weights_problem)
from refany3d.cameras import ORBIT_RADIUS
from refany3d.errors import GenerationStopped, InputError, MeshError, ModelLoadError, RefAny3DError, is_out_of_memory
from refany3d.examples import EXAMPLES_DIR
from refany3d.offload import release_accelerator_memory

logger = logging.getLogger(__name__)

PAPER_URL = "https://arxiv.org/abs/2601.22094"
PROJECT_URL = "https://judgementh.github.io/RefAny3D"
DEFAULT_PROMPT = "a photo of the object on a wooden table in a sunlit room"
PREVIEW_RESOLUTION = 192  # the preview gallery only needs thumbnails; rendering stays interactive
MAX_CONDITION_SIZE = 512  # the release's reference-view size; larger outputs reuse it
MESH_UPLOAD_TYPES = [".glb", ".gltf", ".obj", ".ply", ".stl", ".off", ".zip"]
EXAMPLES_SESSION = "examples"  # the folder cached example outputs are written to
DEFAULT_GUIDANCE = 3.5
DEFAULT_IMAGE_GUIDANCE = 2.0
# The inputs' ranges: the page's sliders and the validators (the API's bounds) use the same ones.
RADIUS_RANGE = (2.0, 10.0)  # camera distance, in asset sizes (the asset spans [-1, 1])
PITCH_RANGE = (-89.0, 89.0)  # degrees; +-90 would look straight down the orbit's axis
Y_ROTATION_RANGE = (-180.0, 180.0)  # degrees
GUIDANCE_RANGE = (0.0, 20.0)
MAX_UPSCALE = 4  # the largest output a model is offered, as a multiple of the size it was trained at
APP_CSS = """
#title { margin-bottom: 0; }
#status { min-height: 1.5em; }
/* on a phone the views gallery scrolls within its column instead of widening the page */
#views-gallery { max-width: 100%; overflow-x: auto; }
/* a small model's 64 px result fills its box, with sharp pixels instead of a blur */
#result-image img, #result-pointmap img, #alignment-overlay img {
  width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;
}
/* the result's files are outputs: Gradio's "Remove this file" there would only drop them from the list */
#downloads .label-clear-button, #ply-file .label-clear-button { display: none; }
"""


def launch_options(config: AppConfig) -> dict[str, Any]:
    """Keyword arguments for `demo.launch` (Gradio 6 takes theme and css there)."""
    return {
        "theme": gr.themes.Soft(primary_hue="indigo"),
        "css": APP_CSS,
        "max_file_size": f"{config.max_upload_mb}mb",
        "allowed_paths": [str(EXAMPLES_DIR)],
    }


# ----------------------------------------------------------------------------------- sessions
_SESSION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class SessionFolders:
    """A private temporary folder per Gradio session under one root, removed when it ends.

    Folders live under the system temp directory, which Gradio may read outputs from (it copies
    them into its own cache, served by unguessable names); the root itself is never exposed.
    Folders of sessions that ended without an unload event (API clients, crashed tabs) are
    removed once untouched for `ttl_s`.
    """

    def __init__(self, root: Path, ttl_s: float):
        self.root = Path(root)
        self.ttl_s = ttl_s

    def folder(self, session_hash: str | None) -> Path:
        if not session_hash or not _SESSION_NAME.match(session_hash):
            raise InputError("this request has no valid session; reload the page")
        self.clean_stale()
        folder = self.root / session_hash
        folder.mkdir(parents=True, exist_ok=True)
        os.utime(folder)  # touched = alive
        return folder

    def new_run_folder(self, session_hash: str | None, prefix: str) -> Path:
        """A fresh folder inside the session's, so two runs of one session never share files."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.folder(session_hash)))

    def remove(self, session_hash: str | None) -> None:
        if session_hash and _SESSION_NAME.match(session_hash):
            shutil.rmtree(self.root / session_hash, ignore_errors=True)

    def clean_stale(self) -> None:
        if not self.root.is_dir():
            return
        cutoff = time.time() - self.ttl_s
        for folder in self.root.iterdir():
            try:
                if folder.is_dir() and folder.stat().st_mtime < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)
            except FileNotFoundError:  # another thread removed it first
                continue


# --------------------------------------------------------------------------------- validation
@dataclass
class GenerationSettings:
    """Every setting of a generation, in the order the UI and the API take them."""

    prompt: str
    n_views: int
    radius: float
    pitch: float
    y_rotation: float
    seed: int
    randomize_seed: bool
    steps: int
    guidance_scale: float
    image_guidance_scale: float
    resolution: int
    model: str
    candidates: int = 1  # seeds seed..seed+K-1 are sampled; the most rigid point map is kept

    def condition_size(self, condition_ratio: float) -> int:
        """Reference-view size: the output size times the reference-view / output ratio the chosen
        model was trained with (`app_config.condition_ratio`), a multiple of 16."""
        scaled = 16 * max(1, round(self.resolution * condition_ratio / 16))
        return min(scaled, MAX_CONDITION_SIZE)

    def to_record(self, condition_ratio: float) -> dict[str, Any]:
        """What the sampler and settings.json get: every setting, the reference-view size included."""
        record = asdict(self)
        record.pop("randomize_seed")
        record["condition_size"] = self.condition_size(condition_ratio)
        return record


SETTING_FIELDS = [f for f in GenerationSettings.__dataclass_fields__]
MAX_SEED = 2**32 - 1  # the app's seeds: short enough to read and type, exact in the browser's numbers


# ------------------------------------------------------------------------------- number inputs
def _number_as_given(payload: Any, precision: int | None) -> Any:
    """A number input's value, rounded as Gradio rounds it but not range-checked."""
    if isinstance(payload, (int, float)) and not isinstance(payload, bool):
        return gr.Number.round_to_precision(payload, precision)
    return payload


def leave_ranges_to_validators(*inputs: gr.Slider | gr.Number) -> None:
    """Let these number inputs pass any number on, for their events' validators to check.

    Gradio's own range check runs before a validator and answers an API client's out-of-range
    value with a bare "400 Bad Request" (gradio_client shows no message); the validators name the
    setting and its range. The page keeps the inputs' ranges. (An instance attribute, not a
    subclass: Gradio writes a .pyi stub beside the module of every component subclass.)
    """
    for component in inputs:
        component.preprocess = lambda payload, precision=component.precision: _number_as_given(payload, precision)


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer, float)) and not isinstance(value, bool) and float(value).is_integer()


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and np.isfinite(value)


def mesh_problem(path: str | Path | None, config: AppConfig) -> str | None:
    """What is wrong with an uploaded mesh file before it is parsed (existence, type, size)."""
    if path is None or str(path) == "":
        return "upload a mesh (GLB, glTF, OBJ, PLY, STL, OFF, or a .zip with an OBJ and its textures)"
    path = Path(path)
    if not path.is_file():
        return f"the mesh file {path.name} is missing; upload it again"
    if path.suffix.lower() not in MESH_UPLOAD_TYPES:
        return f"unsupported mesh type {path.suffix or '(none)'!r}; use {', '.join(MESH_UPLOAD_TYPES)}"
    size_mb = path.stat().st_size / 2**20
    if size_mb > config.max_upload_mb:
        return f"the mesh file is {size_mb:.1f} MB; the limit is {config.max_upload_mb} MB"
    return None


def resolution_limit(config: AppConfig, spec: ModelSpec) -> int:
    """The largest output offered for a model: MAX_UPSCALE times the size it was trained at (a small
    model drawn far larger shows nothing more, and takes minutes on a CPU), within the operator's cap."""
    from refany3d.pipeline import recommended_settings

    try:
        native = int(recommended_settings(spec.ref_model)["height"])
    except ModelLoadError:
        native = config.max_resolution
    return max(MIN_RESOLUTION, min(config.max_resolution, MAX_UPSCALE * native) // 16 * 16)


def view_problems(n_views: Any, radius: Any, pitch: Any, y_rotation: Any, config: AppConfig) -> dict[str, str]:
    """Field name -> what is wrong with it, for the reference views' settings."""
    problems: dict[str, str] = {}
    if not _is_integer(n_views) or not 1 <= n_views <= config.max_views:
        problems["n_views"] = f"number of views must be a whole number from 1 to {config.max_views}"
    for name, value, bounds, what in (("radius", radius, RADIUS_RANGE, "camera radius"),
                                      ("pitch", pitch, PITCH_RANGE, "pitch"),
                                      ("y_rotation", y_rotation, Y_ROTATION_RANGE, "y rotation")):
        problem = _range_problem(what, value, bounds, "" if name == "radius" else " degrees")
        if problem:
            problems[name] = problem
    return problems


def _range_problem(what: str, value: Any, bounds: tuple[float, float], unit: str = "") -> str | None:
    low, high = bounds
    if _is_finite(value) and low <= value <= high:
        return None
    return f"{what} must be between {low:g} and {high:g}{unit}"


def settings_problems(s: GenerationSettings, config: AppConfig, registry: Mapping[str, ModelSpec]) -> dict[str, str]:
    """Field name -> what is wrong with it. Empty when every setting is usable."""
    problems: dict[str, str] = {}
    if not isinstance(s.prompt, str) or not s.prompt.strip():
        problems["prompt"] = "write a prompt describing the scene"
    elif len(s.prompt) > 2000:
        problems["prompt"] = "the prompt is longer than 2000 characters"
    problems.update(view_problems(s.n_views, s.radius, s.pitch, s.y_rotation, config))
    if not s.randomize_seed and (not _is_integer(s.seed) or not 0 <= s.seed <= MAX_SEED):
        problems["seed"] = f"seed must be a whole number from 0 to {MAX_SEED}"
    elif not s.randomize_seed and _is_integer(s.candidates) and s.seed + s.candidates - 1 > MAX_SEED:
        problems["seed"] = f"with {s.candidates} candidates the seed can be at most {MAX_SEED - s.candidates + 1}"
    if not _is_integer(s.steps) or not 1 <= s.steps <= config.max_steps:
        problems["steps"] = f"steps must be a whole number from 1 to {config.max_steps}"
    for name, what in (("guidance_scale", "guidance"), ("image_guidance_scale", "image guidance")):
        problem = _range_problem(what, getattr(s, name), GUIDANCE_RANGE)
        if problem:
            problems[name] = problem
    if s.model not in registry:
        problems["model"] = f"unknown model {s.model!r}; choose one of {', '.join(registry)}"
    largest = resolution_limit(config, registry[s.model]) if s.model in registry else config.max_resolution
    if not _is_integer(s.resolution) or not MIN_RESOLUTION <= s.resolution <= largest:
        problems["resolution"] = (f"resolution must be a whole number from {MIN_RESOLUTION} to {largest}"
                                  + ("" if largest == config.max_resolution else
                                     f" for this model, which was trained at {largest // MAX_UPSCALE} px"))
    if not _is_integer(s.candidates) or not 1 <= s.candidates <= config.max_candidates:
        problems["candidates"] = f"candidates must be a whole number from 1 to {config.max_candidates}"
    return problems


# ------------------------------------------------------------------------------- GPU duration
# FLUX.1-dev: ~12e9 transformer parameters (2 FLOPs each per token), 57 blocks of width 3072.
_FLUX_PARAMS = 12e9
_FLUX_BLOCKS = 57
_FLUX_WIDTH = 3072
_LOAD_AND_DECODE_S = 10.0  # moving weights onto the GPU, text encoding, VAE decoding


def generation_flops(steps: int, n_views: int, resolution: int, condition_size: int,
                     image_guidance_scale: float, sampler: str = "exact") -> float:
    """Transformer FLOPs of one generation at FLUX.1-dev's size: the unit GPU time is measured in.

    Tokens: two targets (image + point map) at resolution/16 per side, text (512), and every
    reference view twice (RGB + point map) at condition_size/16 per side; image guidance runs a
    second pass per step. The cached sampler runs the views only at its first step.
    """
    views = 2 * n_views * (condition_size // 16) ** 2
    queries = 2 * (resolution // 16) ** 2 + 512

    def step(rows: int) -> float:  # linear layers over `rows`, attention of `rows` over every key
        return 2 * _FLUX_PARAMS * rows + _FLUX_BLOCKS * 4 * rows * (queries + views) * _FLUX_WIDTH

    passes = 1 if np.isclose(image_guidance_scale, 1.0) else 2
    per_pass = steps * step(queries + views) if sampler != "cached" else step(queries + views) + (steps - 1) * step(queries)
    return passes * per_pass


class GpuTimings:
    """Measured speed of the GPU calls, per (model, sampler), so ZeroGPU requests what this GPU and
    model really need. A rate is generation FLOPs per wall-clock second of a whole `sample_on_gpu`
    call (start-up and decoding included, so small jobs err long); the slowest of the last few
    calls is used, with a margin. Measured in the main process: on ZeroGPU the call itself runs in
    a worker process, while the duration is asked for here."""

    def __init__(self, keep: int = 5, margin: float = 1.3):
        self.keep, self.margin = keep, margin
        self._rates: dict[tuple[str, str], list[float]] = {}
        self._lock = threading.Lock()

    def record(self, key: tuple[str, str], flops: float, seconds: float) -> None:
        if seconds <= 0 or flops <= 0:
            return
        with self._lock:
            rates = self._rates.setdefault(key, [])
            rates.append(flops / seconds)
            del rates[: -self.keep]

    def seconds(self, key: tuple[str, str], flops: float) -> float | None:
        """Predicted seconds of a call of `flops`, or None before the first measurement."""
        with self._lock:
            rates = self._rates.get(key)
            return None if not rates else self.margin * flops / min(rates)


# -------------------------------------------------------------------------------- the service
class StopRequests:
    """Stops asked for by sessions; the sampler checks after each step.

    Gradio's `cancels=` cannot interrupt a function that is already running: it frees the page
    and the queue slot while the cancelled thread samples on, so the next generation ran beside
    it (two samplers on one GPU). So a run under way is only flagged here: it ends itself after
    its current step, and its own "Stopped after step N" line reaches the page together with the
    end of the run, after which the next Generate starts alone.

    A stop while none of the session's runs is under way is for its generation waiting in the
    queue, which the page cancels; should it start in between, it ends before it starts. The
    session's next submission (`submitted`, from the validator) clears that.

    A run's flag is a file in a folder of this process's: under ZeroGPU the sampler runs in a
    forked worker whose copy of this object no longer follows this process's memory, but sees
    the same folder."""

    def __init__(self) -> None:
        self._runs: dict[int, str | None] = {}  # run id -> session
        self._stopped_in_queue: set[str | None] = set()  # sessions whose waiting run must not start
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.folder = Path(tempfile.mkdtemp(prefix="refany3d-stops-"))
        weakref.finalize(self, _remove_own_folder, self.folder, os.getpid())

    def _flag(self, run: int) -> Path:
        return self.folder / str(run)

    def begin(self, session: str | None) -> int:
        """A run of the session's starts; returns its id for `check`, `stop_run` and `end`."""
        with self._lock:
            run = next(self._ids)
            self._runs[run] = session
            if session in self._stopped_in_queue:
                self._stopped_in_queue.discard(session)
                self._flag(run).touch()
        return run

    def end(self, run: int) -> None:
        with self._lock:
            del self._runs[run]
            self._flag(run).unlink(missing_ok=True)

    def stop_run(self, run: int) -> None:
        """Ask this one run to stop, if it has not ended."""
        with self._lock:
            if run in self._runs:
                self._flag(run).touch()

    def submitted(self, session: str | None) -> None:
        """The session submitted a new generation: an earlier stop is not for it."""
        with self._lock:
            self._stopped_in_queue.discard(session)

    def request(self, session: str | None) -> bool:
        """Ask every run of the session under way to stop; when none is, its waiting one. True
        when a run was under way."""
        with self._lock:
            runs = [run for run, owner in self._runs.items() if owner == session]
            for run in runs:
                self._flag(run).touch()  # (not stop_run: the lock is held)
            if not runs:
                self._stopped_in_queue.add(session)
            return bool(runs)

    def end_session(self, session: str | None) -> bool:
        """The session's tab closed: its runs under way stop (Gradio drops its waiting ones).
        True when a run was under way."""
        under_way = self.request(session)
        with self._lock:
            self._stopped_in_queue.discard(session)
        return under_way

    def check(self, run: int | None, what: str) -> None:
        """Raise GenerationStopped if the run was asked to stop (from any process)."""
        if run is not None and self._flag(run).exists():
            raise GenerationStopped(f"Stopped {what}, as asked.")


def _remove_own_folder(folder: Path, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # never from a forked worker's copy
        shutil.rmtree(folder, ignore_errors=True)


class AppService:
    """One per process: configuration, model store, session folders and a small mesh cache."""

    def __init__(self, config: AppConfig, loader: Callable[[ModelSpec], Any] | None = None):
        self.config = config
        self.registry = config.model_registry()
        self.models = ModelStore(self.registry, loader or pipeline_loader(config))
        self.sessions = SessionFolders(Path(tempfile.gettempdir()) / "refany3d-sessions", config.session_ttl_s)
        self._meshes: OrderedDict[tuple[str, float], Any] = OrderedDict()
        self._mesh_lock = threading.Lock()
        self.gpu_timings = GpuTimings()
        self.stops = StopRequests()

    def default_model(self) -> str:
        return next(iter(self.registry))

    def model_choices(self) -> list[tuple[str, str]]:
        """(label, name) per model; a model whose weights are not on this machine says so."""
        missing = " (weights not on this machine: downloaded on first use)"
        return [(spec.label + (missing if weights_problem(spec) else ""), name) for name, spec in self.registry.items()]

    def model_status(self) -> str:
        """A one-line notice for the page when the default model cannot be loaded here."""
        problem = weights_problem(self.registry[self.default_model()])
        if problem is None:
            return ""
        return (f"**Model weights not found on this machine:** {problem}. Generating will try to "
                "download them from the Hugging Face Hub (FLUX.1-dev is gated: it needs an HF_TOKEN) "
                "and says so if it cannot; everything else works. See *App configuration* in the "
                "README to point the app at local weights.")

    def load_mesh(self, path: str | Path):
        """Load (or reuse) a mesh; the preview and the generation of one upload parse it once."""
        from refany3d.mesh import load_mesh

        path = Path(path)
        key = (str(path.resolve()), path.stat().st_mtime)
        with self._mesh_lock:
            if key in self._meshes:
                self._meshes.move_to_end(key)
                return self._meshes[key]
        mesh = load_mesh(path, max_faces=self.config.max_faces)
        with self._mesh_lock:
            self._meshes[key] = mesh
            while len(self._meshes) > 4:
                self._meshes.popitem(last=False)
        return mesh

    def preload(self) -> None:
        """Load the default model now (Spaces: before the first visitor, while the GPU is free)."""
        try:
            self.models.get(self.default_model())
        except ModelLoadError as err:
            print(f"refany3d app: model not preloaded: {err}")


_service: AppService | None = None
_service_lock = threading.Lock()


def get_service() -> AppService:
    """The process-wide service, built from the environment on first use."""
    global _service
    with _service_lock:
        if _service is None:
            try:
                config = AppConfig.from_env()
            except RefAny3DError as err:  # the operator's settings: one line at start-up, not a traceback
                raise SystemExit(f"refany3d app: {err} (see App configuration in README.md)") from None
            _service = AppService(config)
        return _service


# ----------------------------------------------------------------------------------- handlers
@contextmanager
def _as_user_errors():
    """Expected failures become a gr.Error with their message, so the app keeps serving."""
    try:
        yield
    except gr.Error:
        raise
    except RefAny3DError as err:  # the visitor's to mend, not the server's: no traceback in its log
        raise gr.Error(str(err), title=type(err).__name__.replace("Error", " error"),
                       print_exception=False) from None
    except Exception as err:
        if is_out_of_memory(err):
            release_accelerator_memory()
            raise gr.Error(
                "Out of memory while generating. Try fewer views, a lower resolution, or "
                "fewer steps.", title="Out of memory"
            ) from None
        raise


def user_errors(fn: Callable) -> Callable:
    """A handler (plain or async) whose expected failures reach the visitor as a gr.Error."""
    if inspect.iscoroutinefunction(fn):
        @wraps(fn)
        async def async_wrapper(*args, **kwargs):
            with _as_user_errors():
                return await fn(*args, **kwargs)

        return async_wrapper

    @wraps(fn)
    def wrapper(*args, **kwargs):
        with _as_user_errors():
            return fn(*args, **kwargs)

    return wrapper


def _session_hash(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None)


@user_errors
def show_mesh(mesh_path: str | None, request: gr.Request) -> str | None:
    """The uploaded mesh as a textured GLB for the 3D viewer (None clears it), with a notice of
    what loading it noted (which file of a .zip was used)."""
    from refany3d.mesh import LOAD_NOTES

    if not mesh_path:
        return None
    service = get_service()
    problem = mesh_problem(mesh_path, service.config)
    if problem:
        raise MeshError(problem)
    mesh = service.load_mesh(mesh_path)
    for note in mesh.metadata.get(LOAD_NOTES, []):
        gr.Warning(note)
    folder = service.sessions.new_run_folder(_session_hash(request), "view-")
    target = folder / (Path(mesh_path).stem + ".glb")
    mesh.export(target)
    return str(target)


@user_errors
def preview_views(mesh_path: str | None, n_views: int, radius: float, pitch: float,
                  y_rotation: float) -> list[tuple[Any, str]]:
    """Thumbnails of the reference views the model will see: each RGB view, then its point map."""
    from refany3d.views import render_views

    if not mesh_path:
        return []
    service = get_service()
    problem = mesh_problem(mesh_path, service.config)
    if problem:
        raise MeshError(problem)
    problems = view_problems(n_views, radius, pitch, y_rotation, service.config)
    if problems:
        raise InputError("; ".join(problems.values()))
    views = render_views(service.load_mesh(mesh_path), int(n_views), PREVIEW_RESOLUTION,
                         float(radius), float(pitch), float(y_rotation))
    blind_views = views.blind_views_note()
    if blind_views:
        gr.Warning(blind_views)
    gallery: list[tuple[Any, str]] = []
    for azimuth, rgb, pointmap in zip(views.azimuths, views.rgb, views.pointmap):
        gallery += [(rgb, f"RGB {azimuth:.0f}°"), (pointmap, f"point map {azimuth:.0f}°")]
    return gallery


def gpu_duration(model: str, prompt: str, rgb_views: list, pointmap_views: list, settings: dict,
                 progress: Any = None, run: int | None = None) -> int:
    """ZeroGPU seconds to request for `sample_on_gpu` with these arguments: from this process's
    measured timings of the model and sampler, else from the FLOP estimate (capped, see README)."""
    config = get_service().config
    return int(min(config.gpu_duration_cap_s, max(15.0, expected_gpu_seconds(model, len(rgb_views), settings))))


def expected_gpu_seconds(model: str, n_views: int, settings: dict) -> float:
    """Seconds of GPU time a call with these settings should take: from this process's measured
    timings of the model and sampler, else from the FLOP estimate."""
    service = get_service()
    flops = _call_flops(n_views, settings)
    seconds = service.gpu_timings.seconds((model, settings["sampler"]), flops)
    return seconds if seconds is not None else _LOAD_AND_DECODE_S + flops / (service.config.gpu_tflops * 1e12)


def _call_flops(n_views: int, settings: dict) -> float:
    one = generation_flops(settings["steps"], n_views, settings["resolution"], settings["condition_size"],
                           settings["image_guidance_scale"], settings["sampler"])
    return one * settings["candidates"]


@dataclass
class Sampling:
    """What `sample_on_gpu` hands back: the candidates' (image, point map) pairs, or why it
    stopped. A value, not a raised GenerationStopped, since ZeroGPU's worker process passes on
    only gr.Error's messages."""

    candidates: list[tuple[Any, Any]]
    stopped: str | None = None


@spaces.GPU(duration=gpu_duration)
def sample_on_gpu(model: str, prompt: str, rgb_views: list, pointmap_views: list, settings: dict,
                  progress: Any = None, run: int | None = None) -> Sampling:
    """The only GPU work: load (once) and run the sampler, once per candidate (seeds seed,
    seed+1, ...); views and files stay on the CPU side. A stop asked for the run
    (`StopRequests`) ends it after the current step."""
    import torch

    pipeline = get_service().models.get(model)
    candidates = settings["candidates"]
    total = settings["steps"] * candidates
    if progress is not None:
        progress(0.0, desc="Sampling")
    outputs = []

    def on_step(step: int, _: int) -> None:
        done = len(outputs) * settings["steps"] + step
        if progress is not None:  # one bar over every candidate's steps
            progress((done, total), desc="Sampling", unit="steps")
        if done < total:
            get_service().stops.check(run, f"after step {done} of {total}")

    try:
        for k in range(candidates):
            output = pipeline(
                prompt,
                rgb_views,
                pointmap_views,
                height=settings["resolution"],
                width=settings["resolution"],
                condition_size=settings["condition_size"],
                num_inference_steps=settings["steps"],
                guidance_scale=settings["guidance_scale"],
                image_guidance_scale=settings["image_guidance_scale"],
                generator=torch.Generator("cpu").manual_seed(int(settings["seed"]) + k),
                callback=on_step,
                mode=settings["sampler"],
            )
            outputs.append((output.image, output.pointmap))
    except GenerationStopped as stopped:
        return Sampling([], str(stopped))
    return Sampling(outputs)


@dataclass
class GenerationResult:
    """Files of one generation; kept in the session so the plot can be redrawn with the overlay
    and, once the alignment has run, the recovered camera."""

    image: str
    pointmap: str
    ply: str
    settings_json: str
    mesh_path: str
    y_rotation: float
    seed: int
    files: list[str] = field(default_factory=list)
    camera_segments: np.ndarray | None = None  # recovered camera's frustum (asset's own frame)
    aligned: bool = False  # its alignment panel has been made (once: a stopped run leaves it as it was)
    report: Any = field(default=None, repr=False)  # its alignment, when choosing among candidates made it


def _figure(result: GenerationResult, show_asset: bool):
    import trimesh

    from refany3d.outputs import PointCloud, pointcloud_figure, surface_points

    cloud = trimesh.load(result.ply)
    points = PointCloud(np.asarray(cloud.vertices), np.asarray(cloud.colors)[:, :3])
    asset = surface_points(get_service().load_mesh(result.mesh_path)) if show_asset else None
    return pointcloud_figure(points, asset, camera_segments=result.camera_segments)


def _generate(mesh_path: str | None, settings: GenerationSettings, session: str | None,
              progress: Any, run: int | None = None) -> tuple[GenerationResult, str]:
    """Render the reference views (CPU), sample on the GPU, write every output file (CPU).

    `run` is the id under which a stop can end it (`StopRequests.begin`). Returns the result
    and a status line."""
    from refany3d.alignment import candidate_record, choose_candidate
    from refany3d.outputs import pointcloud_from_pointmap, write_ply, write_settings_json
    from refany3d.views import render_views

    service = get_service()
    problem = mesh_problem(mesh_path, service.config)
    if problem:
        raise MeshError(problem)
    problems = settings_problems(settings, service.config, service.registry)
    if problems:
        raise InputError("; ".join(problems.values()))
    settings.candidates = int(settings.candidates)
    if settings.randomize_seed:  # leaving room for the candidates' seeds
        settings.seed = int(np.random.default_rng().integers(0, MAX_SEED + 2 - settings.candidates))
    for name in ("n_views", "seed", "steps", "resolution"):
        setattr(settings, name, int(getattr(settings, name)))
    typed_resolution = settings.resolution
    settings.resolution -= settings.resolution % 16  # the model's latent patch; a typed 70 samples at 64
    for name in ("radius", "pitch", "y_rotation", "guidance_scale", "image_guidance_scale"):
        setattr(settings, name, float(getattr(settings, name)))
    settings.prompt = settings.prompt.strip()

    progress(0.0, desc="Loading the model")
    service.models.get(settings.model)  # on the CPU side: a missing model never requests a GPU
    progress(0.0, desc="Loading the mesh")
    mesh = service.load_mesh(mesh_path)
    progress(0.0, desc="Rendering reference views")
    ratio = condition_ratio(service.registry[settings.model])
    views = render_views(mesh, settings.n_views, settings.condition_size(ratio),
                         settings.radius, settings.pitch, settings.y_rotation)
    views.require_visible()
    blind_views = views.blind_views_note()
    if blind_views:
        gr.Warning(blind_views)
    record = {**settings.to_record(ratio), "sampler": service.config.sampler}
    if service.config.zero_gpu:  # ZeroGPU ends a call at its requested duration: refuse what cannot finish
        expected = expected_gpu_seconds(settings.model, len(views.rgb), record)
        if expected > service.config.gpu_duration_cap_s:
            raise InputError(f"this run would take about {expected:.0f} s of GPU time, more than the "
                             f"{service.config.gpu_duration_cap_s} s this Space allows: lower the steps, "
                             "resolution, views or candidates")
    began = time.perf_counter()
    service.stops.check(run, "before sampling")
    sampled = sample_on_gpu(settings.model, settings.prompt, views.rgb, views.pointmap, record, progress, run)
    if sampled.stopped:
        raise GenerationStopped(sampled.stopped)
    candidates = sampled.candidates
    service.gpu_timings.record((settings.model, record["sampler"]), _call_flops(len(views.rgb), record),
                               time.perf_counter() - began)
    best, reports = 0, [None]
    if len(candidates) > 1:
        progress(1.0, desc="Choosing the most rigid candidate")
        best, reports = choose_candidate(mesh, candidates, settings.y_rotation)
        record.update(candidate_record(settings.seed, best, reports))
    image, pointmap = candidates[best]
    seed = settings.seed + best

    progress(1.0, desc="Writing files")
    folder = service.sessions.new_run_folder(session, "run-")
    image_path, pointmap_path = folder / "image.png", folder / "pointmap.png"
    image.save(image_path)
    pointmap.save(pointmap_path)
    cloud = pointcloud_from_pointmap(pointmap, image, views.normalization, settings.y_rotation)
    ply_path = write_ply(cloud, folder / "pointcloud.ply")
    json_path = write_settings_json(record, folder / "settings.json", mesh_path=mesh_path)
    result = GenerationResult(
        image=str(image_path), pointmap=str(pointmap_path), ply=str(ply_path),
        settings_json=str(json_path), mesh_path=str(mesh_path), y_rotation=settings.y_rotation,
        seed=seed, files=[str(image_path), str(pointmap_path), str(ply_path), str(json_path)], report=reports[best],
    )
    status = f"Done: seed {seed}, {len(cloud)} foreground points."
    if settings.resolution != typed_resolution:
        status += f" Sampled at {settings.resolution} px: sizes are multiples of 16."
    if len(candidates) > 1:
        status += (f" The most rigid point map of {len(candidates)} candidates (seeds {settings.seed}–"
                   f"{settings.seed + len(candidates) - 1}); seed {seed} with 1 candidate gives it again.")
    if len(cloud) == 0:
        status += " The point map has no foreground, so the point cloud is empty."
    if blind_views:
        status += f" {blind_views}."
    return result, status


@user_errors
async def generate(mesh_path: str | None, prompt: str, n_views: int, radius: float, pitch: float,
                   y_rotation: float, seed: int, randomize_seed: bool, steps: int, guidance_scale: float,
                   image_guidance_scale: float, resolution: int, model: str, candidates: int, show_asset: bool,
                   request: gr.Request, progress: gr.Progress = gr.Progress()):
    """Generate an image and point map of the mesh in the prompt's scene.

    Returns image, point map, point-cloud figure, PLY, all downloads (image, point map, PLY,
    settings JSON), the seed used, a status line and the result (session state).

    The work runs in a thread. Cancelled by Gradio (an API client's job.cancel(), a closed
    connection), the event ends at once but the thread cannot be interrupted: it is asked to stop
    after its current step, instead of sampling on beside the next generation.
    """
    settings = GenerationSettings(prompt, n_views, radius, pitch, y_rotation, seed, bool(randomize_seed),
                                  steps, guidance_scale, image_guidance_scale, resolution, model, candidates)
    session = _session_hash(request)
    stops = get_service().stops
    run = stops.begin(session)

    def work() -> tuple:
        try:
            stops.check(run, "before it started")
            result, status = _generate(mesh_path, settings, session, progress, run)
            return (result.image, result.pointmap, _figure(result, show_asset), result.ply, result.files,
                    result.seed, status, result)
        finally:
            stops.end(run)

    try:
        return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
    except GenerationStopped as stopped:  # asked for, not a failure: the outputs stay as they were
        return (*[gr.skip()] * 6, f"{stopped} The results shown are the previous ones.", gr.skip())
    except anyio.get_cancelled_exc_class():
        stops.stop_run(run)
        raise


def default_settings(prompt: str, config: AppConfig, model: str) -> GenerationSettings:
    """The settings the UI starts with (and examples are generated with)."""
    return GenerationSettings(
        prompt=prompt, n_views=config.default_views, radius=ORBIT_RADIUS, pitch=0.0, y_rotation=0.0,
        seed=0, randomize_seed=False, steps=config.default_steps, guidance_scale=DEFAULT_GUIDANCE,
        image_guidance_scale=DEFAULT_IMAGE_GUIDANCE, resolution=config.default_resolution, model=model,
    )


@user_errors
def generate_example(mesh_path: str, prompt: str, progress: gr.Progress = gr.Progress()):
    """An example's outputs at the default settings and seed 0, with its alignment panel (cached
    once, shared by everyone)."""
    service = get_service()
    settings = default_settings(prompt, service.config, service.default_model())
    result, status = _generate(mesh_path, settings, EXAMPLES_SESSION, progress)
    panel = _align_generation(result)
    return (result.image, result.pointmap, _figure(result, False), result.ply, result.files, result.seed,
            status, *panel)


def example_rows() -> tuple[list[list[str]], list[str]]:
    """(mesh path, prompt) rows of the project's example meshes, and their labels."""
    from refany3d.examples import PROMPTS, example_paths

    paths = {name: path for name, path in example_paths().items() if path.is_file()}
    rows = [[str(path), PROMPTS[name]] for name, path in paths.items()]
    labels = [Path(name).stem.replace("_", " ") for name in paths]
    return rows, labels


def cache_examples(service: AppService) -> bool:
    """Cache example outputs (lazily, on first click) only when they can be generated here."""
    if not service.config.cache_examples:
        return False
    # Gradio keeps cached outputs in a CSV file; a point-cloud figure is one field far above
    # Python's default 128 KiB field limit, which would make reading the cache fail.
    csv.field_size_limit(2**31 - 1)
    return weights_problem(service.registry[service.default_model()]) is None


@user_errors
def redraw_pointcloud(result: GenerationResult | None, show_asset: bool):
    """The point-cloud plot again, with or without the asset's surface overlay (and the box
    unticked again when there is no generation of the visitor's to draw it on)."""
    if result is None:
        if show_asset:
            gr.Info("The overlay draws on a generation of yours: click Generate first.")
        return gr.skip(), False
    return _figure(result, show_asset), gr.skip()


def forget_result() -> tuple[None, bool, bool]:
    """An example's outputs replace the shown result: the overlay must not redraw an older one,
    and "Randomize seed" is unticked, so Generate at the default settings gives the example again."""
    return None, False, False


# ---------------------------------------------------------------------------------- alignment
ALIGNMENT_INTRO = (
    "After each generation this panel answers *does the image show my asset, in one consistent "
    "pose?*: the camera is recovered from the predicted point map, the asset is re-rendered there "
    "and laid over the image, and the match is scored."
)
# (label, AlignmentReport attribute, value format, what it measures)
_ALIGNMENT_SCORES = (
    ("Inlier ratio", "inlier_ratio", "{:.3f}", "share of the point map's pixels that one camera explains"),
    ("Median reprojection error", "reprojection_error_px", "{:.2f} px",
     "how far those pixels land from where the camera puts their asset points"),
    ("Silhouette IoU", "iou", "{:.3f}", "asset re-rendered at that camera vs the point map's foreground"),
    ("Image IoU", "image_iou", "{:.3f}", "object found in the generated image vs the point map's foreground"),
    ("Colour agreement", "colour_psnr", "{:.1f} dB PSNR",
     "generated image vs re-rendered asset where both show it"),
    ("Point-map error", "pointmap_error", "{:.2%} of the asset size",
     "median distance between predicted and re-rendered surface points"),
)


def alignment_markdown(report: Any, heading: str = "Alignment") -> str:
    """The panel's text: a verdict (or the reason it is not measurable), every score (n/a where it
    could not be computed), how the object was found in the image, and the recovered camera."""
    lines = [f"### {heading}"]
    if report.measurable:
        lines.append("**Measured:** one camera of this asset explains the point map.")
        if report.reason:
            lines.append(f"Note: {report.reason.rstrip('.')}.")
    else:
        lines.append(f"**Not measurable:** {report.reason.rstrip('.')}.")
        if report.inlier_ratio is not None:
            lines.append("The scores below are those of the best camera found; they show how far off it is.")
    lines += ["", "| Score | Value | What it measures |", "|---|---|---|"]
    for label, attribute, spec, meaning in _ALIGNMENT_SCORES:
        value = getattr(report, attribute)
        lines.append(f"| {label} | {'n/a' if value is None else spec.format(value)} | {meaning} |")
    lines.append("")
    if report.image_segmentation:
        lines.append(f"Object in the image: {report.image_segmentation}.")
    if report.measurable and report.orbit is not None:
        o = report.orbit
        lines.append(
            f"Recovered camera: azimuth {o['azimuth_deg']:.1f}°, pitch {o['pitch_deg']:.1f}°, "
            f"roll {o['roll_deg']:.1f}°, distance {o['distance']:.2f} asset half-sizes, focal "
            f"{report.camera.fy:.0f} px; drawn in red beside the point cloud (Result tab)."
        )
    return "\n".join(lines)


def _align_files(mesh_path: str | None, image_path: str | None, pointmap_path: str | None,
                 y_rotation: float):
    """Validate, then align at the point map's own (the generated) resolution: one PnP and one
    render, well under a second at 512 px on a CPU."""
    from refany3d.alignment import align

    service = get_service()
    problem = mesh_problem(mesh_path, service.config)
    if problem:
        raise MeshError(problem)
    if not pointmap_path:
        raise InputError("give the predicted point map (PNG) to align")
    problem = _range_problem("y rotation", y_rotation, Y_ROTATION_RANGE, " degrees")
    if problem:
        raise InputError(problem)
    return align(service.load_mesh(mesh_path), pointmap_path, image_path or None, y_rotation=float(y_rotation))


def _save_overlay(report: Any, folder: Path) -> str | None:
    overlay = report.overlay()
    if overlay is None:
        return None
    path = folder / "alignment_overlay.png"
    overlay.save(path)
    return str(path)


def _align_generation(result: GenerationResult) -> tuple[str | None, str, dict[str, Any]]:
    """Align a generation; the result keeps the camera (for plots) and gets alignment.json.

    Returns the overlay, the panel's text and the report as a dict.
    """
    report = result.report or _align_files(result.mesh_path, result.image, result.pointmap, result.y_rotation)
    folder = Path(result.image).parent
    details = report.to_dict()
    json_path = folder / "alignment.json"
    json_path.write_text(json.dumps(details, indent=2) + "\n")
    if str(json_path) not in result.files:
        result.files.append(str(json_path))
    result.camera_segments = report.frustum(frame="own") if report.measurable else None
    result.aligned = True
    heading = f"Alignment of the generation with seed {result.seed}"
    return _save_overlay(report, folder), alignment_markdown(report, heading), details


@user_errors
def align_result(result: GenerationResult | None, show_asset: bool):
    """Run after every generation (CPU, no GPU): the alignment panel (overlay, text, report), the
    point-cloud plot with the recovered camera, the downloads with alignment.json, the result.
    A stopped generation leaves the previous result, already aligned, in place: nothing to do."""
    if result is None or result.aligned:
        return (gr.skip(),) * 6
    try:
        overlay, text, details = _align_generation(result)
        figure = _figure(result, show_asset)
    except (FileNotFoundError, InputError):
        if Path(result.image).parent.is_dir():
            raise
        return (gr.skip(),) * 6  # the tab closed and its session's folder went with it (end_session)
    return overlay, text, details, figure, result.files, result


@user_errors
def align_pair(mesh_path: str | None, image_path: str | None, pointmap_path: str | None, y_rotation: float,
               request: gr.Request):
    """Align any generated (image, point map) pair with its mesh; `y_rotation` is the one of the
    reference views. The image is optional (without it, image IoU and colour are not scored).

    Returns the overlay, the panel's text, the report as a dict and a point-cloud plot of the
    point map with the recovered camera (when measurable). A point map that cannot be measured is
    a result with the reason, not an error.
    """
    from refany3d.images import as_float_image
    from refany3d.outputs import pointcloud_figure, pointcloud_from_pointmap

    report = _align_files(mesh_path, image_path, pointmap_path, y_rotation)
    pointmap = as_float_image(pointmap_path, "point map")
    colours = report.image if report.image is not None else pointmap
    cloud = pointcloud_from_pointmap(pointmap, colours, report.normalization, float(y_rotation))
    camera = report.frustum(frame="own") if report.measurable else None
    folder = get_service().sessions.new_run_folder(_session_hash(request), "align-")
    return (_save_overlay(report, folder), alignment_markdown(report), report.to_dict(),
            pointcloud_figure(cloud, camera_segments=camera))


def validate_generation(mesh_path, prompt, n_views, radius, pitch, y_rotation, seed, randomize_seed,
                        steps, guidance_scale, image_guidance_scale, resolution, model, candidates, show_asset,
                        request: gr.Request):
    """Gradio `validator=`: one gr.validate per input, checked before the event is queued (and
    the moment a session submits a new generation, which an earlier Stop is not for)."""
    service = get_service()
    service.stops.submitted(_session_hash(request))
    settings = GenerationSettings(prompt, n_views, radius, pitch, y_rotation, seed, bool(randomize_seed),
                                  steps, guidance_scale, image_guidance_scale, resolution, model, candidates)
    problems = settings_problems(settings, service.config, service.registry)
    mesh = mesh_problem(mesh_path, service.config)
    if mesh is None:  # parse it now (once: the generation reuses it) so an unusable mesh is refused here
        try:
            service.load_mesh(mesh_path)
        except RefAny3DError as err:
            mesh = str(err)
    verdicts = [gr.validate(mesh is None, mesh or "")]
    verdicts += [gr.validate(name not in problems, problems.get(name, "")) for name in SETTING_FIELDS]
    verdicts.append(gr.validate(True, ""))  # show_asset is a display toggle
    return verdicts


def validate_views(mesh_path, n_views, radius, pitch, y_rotation):
    """Gradio `validator=` of the views preview: one gr.validate per input."""
    problems = view_problems(n_views, radius, pitch, y_rotation, get_service().config)
    verdicts = [gr.validate(True, "")]  # the mesh: the preview names its problems itself
    return verdicts + [gr.validate(name not in problems, problems.get(name, ""))
                       for name in ("n_views", "radius", "pitch", "y_rotation")]


STOPPING = "Stopping: the generation ends after its current step."
NOTHING_TO_STOP = "Nothing was sampling; a generation still waiting in the queue, if any, is cancelled."
_queue_stops = itertools.count(1)


def request_stop(request: gr.Request):
    """The Stop button, which answers with a notice and leaves the status line to the generation
    (its progress stays on show until it ends). A running generation of the session ends after
    its current step and says so there. Otherwise the output, a new number, has the page cancel a
    generation waiting in the queue (see `StopRequests`)."""
    if get_service().stops.request(_session_hash(request)):
        gr.Info(STOPPING)
        return gr.skip()
    gr.Info(NOTHING_TO_STOP)
    return next(_queue_stops)


def resolution_slider(model: str, resolution: int):
    """The resolution slider for the chosen model: its largest offered size, the value kept within it."""
    service = get_service()
    if model not in service.registry:
        return gr.skip()
    largest = resolution_limit(service.config, service.registry[model])
    value = min(int(resolution), largest) if _is_integer(resolution) else largest
    return gr.Slider(maximum=largest, value=value)


def end_session(request: gr.Request) -> None:
    """Stop the session's generation and remove its folder when its browser tab closes."""
    service = get_service()
    session = _session_hash(request)
    if service.stops.end_session(session):  # in the server's log: a run that ends without its page
        logger.warning("session %s closed during its generation, which stops after its current step", session)
    service.sessions.remove(session)
