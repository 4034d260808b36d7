"""The app's logic without a server: configuration, registry, validation, models, sessions, errors."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pickle
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from refany3d import app_config
from refany3d import app_logic as logic
from refany3d.errors import InputError, MeshError, ModelLoadError
from refany3d.pipeline import EMBEDDED_MODEL_DIR

from conftest import VASE, sign_mesh


@pytest.fixture
def service(monkeypatch):
    """Install a service for the handlers (which use the process-wide one) and restore after."""

    def install(config: logic.AppConfig, loader=None) -> logic.AppService:
        installed = logic.AppService(config, loader)
        monkeypatch.setattr(logic, "_service", installed)
        return installed

    return install


def _settings(**changes) -> logic.GenerationSettings:
    settings = logic.default_settings("a vase on a table", logic.AppConfig(), app_config.PUBLISHED_MODEL)
    for name, value in changes.items():
        setattr(settings, name, value)
    return settings


class _Request:
    def __init__(self, session_hash: str):
        self.session_hash = session_hash


# ------------------------------------------------------------------------------ configuration
def test_config_reads_the_environment():
    config = logic.AppConfig.from_env({
        "REFANY3D_BASE_MODEL": "/models/base", "REFANY3D_MAX_UPLOAD_MB": "7", "REFANY3D_CPU_OFFLOAD": "yes",
        "REFANY3D_GPU_TFLOPS": "150.5", "REFANY3D_SAMPLER": "faithful", "SPACE_ID": "someone/refany3d",
    })
    assert config.base_model == "/models/base" and config.ref_model is None
    assert config.max_upload_mb == 7 and config.cpu_offload == "model" and config.gpu_tflops == 150.5
    assert config.sampler == "faithful"
    assert config.preload  # on a Space the model loads at start-up unless told otherwise
    assert logic.launch_options(config)["max_file_size"] == "7mb"
    assert not logic.AppConfig.from_env({}).preload
    assert logic.AppConfig.from_env({}).cpu_offload is None
    assert logic.AppConfig.from_env({"REFANY3D_CPU_OFFLOAD": "Blocks"}).cpu_offload == "blocks"
    assert logic.AppConfig.from_env({"REFANY3D_CPU_OFFLOAD": "off"}).cpu_offload is None


@pytest.mark.parametrize("env, message", [
    ({"REFANY3D_MAX_STEPS": "many"}, "REFANY3D_MAX_STEPS='many' is not a valid int"),
    ({"REFANY3D_CPU_OFFLOAD": "maybe"}, "'maybe' must be 1/0, true/false, yes/no, on/off, model or blocks"),
    ({"REFANY3D_PRELOAD": "maybe"}, "'maybe' must be 1/0, true/false, yes/no or on/off$"),
    ({"REFANY3D_MAX_VIEWS": "0"}, "max_views must be positive"),
    ({"REFANY3D_DEFAULT_STEPS": "60"}, r"default steps 60 must be within \[1, 50\]"),
    ({"REFANY3D_DEFAULT_RESOLUTION": "32"}, "default resolution 32"),
    ({"REFANY3D_SAMPLER": "turbo"}, "sampler 'turbo' must be one of faithful, exact, cached"),
    ({"REFANY3D_DTYPE": "float8"}, "dtype must be torch.bfloat16, torch.float16 or torch.float32, got 'float8'"),
    ({"REFANY3D_DEVICE": "cuda:7"}, "device 'cuda:7' asked for, but this machine has"),
])
def test_bad_configuration_is_refused_at_start(env, message):
    with pytest.raises(InputError, match=message):
        logic.AppConfig.from_env(env)


def test_bad_configuration_stops_the_app_with_one_line():
    import subprocess
    import sys

    env = {**os.environ, "REFANY3D_MAX_STEPS": "many"}
    done = subprocess.run([sys.executable, "app.py"], cwd=Path(logic.__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == ("refany3d app: environment variable REFANY3D_MAX_STEPS='many' "
                                                    "is not a valid int (see App configuration in README.md)")
    assert "Traceback" not in done.stderr


def test_a_space_that_preloads_the_published_model_serves_it(monkeypatch):
    """The README's front matter preloads FLUX.1-dev and the published weights into the Hub cache;
    a Space with them there serves them by default, at their own settings."""
    monkeypatch.setattr(app_config, "_hub_file_cached", lambda repo, name: True)
    space = logic.AppConfig.from_env({"SPACE_ID": "someone/refany3d"})
    assert next(iter(space.model_registry())) == app_config.PUBLISHED_MODEL
    assert space.default_resolution == 512 and space.default_views == 8
    assert app_config.EMBEDDED_MODEL in space.model_registry()  # still offered
    # not on a Space, or with a model configured, nothing changes
    assert next(iter(logic.AppConfig.from_env({}).model_registry())) != app_config.PUBLISHED_MODEL
    configured = logic.AppConfig.from_env({"SPACE_ID": "s/r", "REFANY3D_REF_MODEL": "JudgementH/RefAny3D"})
    assert next(iter(configured.model_registry())) == app_config.CONFIGURED_MODEL
    monkeypatch.setattr(app_config, "_hub_file_cached", lambda repo, name: False)  # a Space without the preload
    assert next(iter(logic.AppConfig.from_env({"SPACE_ID": "s/r"}).model_registry())) == app_config.EMBEDDED_MODEL


def test_the_app_offers_the_pipelines_sampler_modes():
    """The app keeps its own copy of the mode names so that it imports without torch; the copy
    must not drift from the pipeline's."""
    from refany3d.pipeline import SAMPLER_MODES

    assert app_config.SAMPLERS == SAMPLER_MODES


def test_registry_puts_the_configured_model_first():
    published = logic.AppConfig().model_registry()
    assert list(published)[-1] == app_config.PUBLISHED_MODEL
    assert published[app_config.PUBLISHED_MODEL].base_model == "black-forest-labs/FLUX.1-dev"
    assert published[app_config.PUBLISHED_MODEL].ref_model == "JudgementH/RefAny3D"
    assert (app_config.EMBEDDED_MODEL in published) == (EMBEDDED_MODEL_DIR / "ref").is_dir()

    configured = logic.AppConfig(ref_model="/weights/ref").model_registry()
    first_name, first = next(iter(configured.items()))
    assert first_name == app_config.CONFIGURED_MODEL and first.ref_model == "/weights/ref"
    # the unset half is the given one's partner, as in the CLI: weights with no base beside them
    # belong with FLUX.1-dev, a base trained here with the weights beside it
    assert first.base_model == "black-forest-labs/FLUX.1-dev"
    embedded_base = str(EMBEDDED_MODEL_DIR / "base")
    assert logic.AppConfig(base_model=embedded_base).model_registry()[app_config.CONFIGURED_MODEL].ref_model == \
        str(EMBEDDED_MODEL_DIR / "ref")


def test_weights_problem_names_what_is_missing(tmp_path):
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "coord.safetensors").write_bytes(b"")
    spec = logic.ModelSpec("test", str(tmp_path / "nowhere"), str(tmp_path / "ref"))
    problem = logic.weights_problem(spec)
    assert "nowhere does not exist" in problem
    assert "lacks default.safetensors, domain_embedder.pth" in problem
    assert "(RefAny3D weights) is not in the Hugging Face cache" in logic.weights_problem(
        logic.ModelSpec("hub", "nobody/no-such-model-xyz", "nobody/no-such-weights-xyz"))


# --------------------------------------------------------------------------------- validation
def test_default_settings_are_valid():
    config = logic.AppConfig()
    assert logic.settings_problems(_settings(), config, config.model_registry()) == {}


@pytest.mark.parametrize("field, value, message", [
    ("prompt", "  ", "write a prompt"),
    ("prompt", "x" * 2001, "longer than 2000"),
    ("n_views", 0, "from 1 to 12"),
    ("n_views", 2.5, "whole number"),
    ("radius", 1.0, "between 2 and 10"),
    ("radius", float("nan"), "between 2 and 10"),
    ("pitch", 95, "between -89 and 89"),
    ("y_rotation", 200, "between -180 and 180"),
    ("seed", -1, "from 0 to 4294967295"),
    ("steps", 51, "from 1 to 50"),
    ("guidance_scale", -1, "between 0 and 20"),
    ("image_guidance_scale", 25, "between 0 and 20"),
    ("resolution", 63.5, "whole number from 64 to 1024"),
    ("resolution", 2048, "from 64 to 1024"),
    ("model", "gpt", "unknown model 'gpt'"),
    ("candidates", 0, "from 1 to 4"),
    ("candidates", 1.5, "whole number"),
])
def test_each_bad_setting_is_named(field, value, message):
    config = logic.AppConfig()
    problems = logic.settings_problems(_settings(**{field: value}), config, config.model_registry())
    assert list(problems) == [field] and message in problems[field]


def test_a_small_model_is_offered_up_to_four_times_its_training_size():
    config = logic.AppConfig()
    registry = config.model_registry()
    assert logic.resolution_limit(config, registry[app_config.PUBLISHED_MODEL]) == 1024  # 512 px: the operator's cap
    assert logic.resolution_limit(config, registry[app_config.EMBEDDED_MODEL]) == 256  # trained at 64 px
    problems = logic.settings_problems(_settings(model=app_config.EMBEDDED_MODEL, resolution=272), config, registry)
    assert problems == {"resolution": "resolution must be a whole number from 64 to 256 for this model, "
                                      "which was trained at 64 px"}
    assert logic.settings_problems(_settings(model=app_config.EMBEDDED_MODEL, resolution=256), config, registry) == {}


def test_a_randomized_seed_ignores_the_seed_box():
    config = logic.AppConfig()
    assert logic.settings_problems(_settings(seed=None, randomize_seed=True), config, config.model_registry()) == {}


def test_candidates_seeds_must_stay_within_the_seed_range():
    config = logic.AppConfig()
    last = _settings(seed=logic.MAX_SEED - 2, candidates=3)
    assert logic.settings_problems(last, config, config.model_registry()) == {}
    problems = logic.settings_problems(_settings(seed=logic.MAX_SEED - 1, candidates=3), config, config.model_registry())
    assert problems == {"seed": f"with 3 candidates the seed can be at most {logic.MAX_SEED - 2}"}


def test_mesh_problems(tmp_path):
    config = logic.AppConfig(max_upload_mb=1)
    assert "upload a mesh" in logic.mesh_problem(None, config)
    assert "missing" in logic.mesh_problem(tmp_path / "gone.glb", config)
    (tmp_path / "notes.txt").write_text("hi")
    assert "unsupported mesh type '.txt'" in logic.mesh_problem(tmp_path / "notes.txt", config)
    (tmp_path / "big.obj").write_bytes(b"#" * (3 * 2**19))
    assert logic.mesh_problem(tmp_path / "big.obj", config) == "the mesh file is 1.5 MB; the limit is 1 MB"
    assert logic.mesh_problem(VASE, config) is None


def generate_now(*args):
    """The app's (async) generation handler, run to its end as Gradio's event loop would."""
    return asyncio.run(logic.generate(*args))


def test_validator_gives_one_verdict_per_input(service):
    service(logic.AppConfig())
    args = [None, "", 3, 4.0, 0.0, 0.0, 5, False, 0, 3.5, 2.0, 512, app_config.PUBLISHED_MODEL, 9, False]
    verdicts = logic.validate_generation(*args, _Request("visitor"))
    assert len(verdicts) == len(args) == 2 + len(logic.SETTING_FIELDS)
    failed = {i: v["message"] for i, v in enumerate(verdicts) if not v["is_valid"]}
    assert set(failed) == {0, 1, 8, 13}  # mesh, prompt, steps, candidates
    assert "upload a mesh" in failed[0] and "write a prompt" in failed[1] and "steps" in failed[8]
    assert "candidates must be a whole number from 1 to 4" in failed[13]


def test_validator_refuses_a_mesh_that_cannot_be_read_before_the_run_is_queued(service, tmp_path):
    service(logic.AppConfig())
    cloud = tmp_path / "cloud.obj"
    cloud.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")  # points only: the right type and size, no surface
    args = [str(cloud), "a cloud", 3, 4.0, 0.0, 0.0, 5, False, 4, 3.5, 2.0, 64, app_config.EMBEDDED_MODEL, 1, False]
    mesh_verdict = logic.validate_generation(*args, _Request("visitor"))[0]
    assert not mesh_verdict["is_valid"] and "cloud.obj has no faces" in mesh_verdict["message"]
    assert logic.validate_generation(str(VASE), *args[1:], _Request("visitor"))[0]["is_valid"]


def test_views_validator_names_each_view_setting(service):
    service(logic.AppConfig())
    verdicts = logic.validate_views(None, 0, 50.0, 0.0, float("nan"))
    assert [v["is_valid"] for v in verdicts] == [True, False, False, True, False]  # mesh, views, radius, pitch, y
    messages = [v["message"] for v in verdicts]
    assert "number of views must be a whole number from 1 to" in messages[1]
    assert messages[2] == "camera radius must be between 2 and 10"
    assert messages[4] == "y rotation must be between -180 and 180 degrees"


def test_number_inputs_leave_their_ranges_to_the_validators():
    """Gradio's own range check answers gradio_client with a bare 400; these pass the value on."""
    slider = gr.Slider(1, 10, value=5, step=1)
    number = gr.Number(value=3, precision=0, minimum=0, maximum=9)
    with pytest.raises(gr.Error, match="greater than maximum"):
        slider.preprocess(50)
    logic.leave_ranges_to_validators(slider, number)
    assert slider.preprocess(50) == 50 and number.preprocess(-3.4) == -3 and number.preprocess("x") == "x"
    assert (slider.minimum, slider.maximum) == (1, 10)  # the page keeps the range


# ------------------------------------------------------------------------------------- models
def test_model_loads_once_for_concurrent_requests():
    calls = []

    def slow_loader(spec):
        calls.append(spec.label)
        time.sleep(0.2)
        return object()

    store = logic.ModelStore({"a": logic.ModelSpec("A", "b", "r")}, slow_loader)
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.get("a"))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["A"] and len(results) == 6 and all(r is results[0] for r in results)


def test_failed_load_is_remembered_then_retried():
    calls = []

    def failing(spec):
        calls.append(1)
        raise ModelLoadError("weights folder /x does not exist")

    store = logic.ModelStore({"a": logic.ModelSpec("A", "b", "r")}, failing, retry_after_s=3600)
    for _ in range(2):
        with pytest.raises(ModelLoadError, match="no model weights available for A on this server"):
            store.get("a")
    assert len(calls) == 1
    store._retry_after_s = 0
    with pytest.raises(ModelLoadError):
        store.get("a")
    assert len(calls) == 2
    with pytest.raises(InputError, match="unknown model 'b'"):
        store.get("b")


def test_weights_that_are_here_but_do_not_load_are_not_called_missing():
    here = logic.ModelSpec("Here", str(EMBEDDED_MODEL_DIR / "base"), str(EMBEDDED_MODEL_DIR / "ref"))
    assert logic.weights_problem(here) is None

    def mismatched(spec):
        raise ModelLoadError("LoRA default.safetensors does not fit this base model")

    store = logic.ModelStore({"here": here}, mismatched)
    with pytest.raises(ModelLoadError, match="the weights of Here are on this server but could not be loaded"):
        store.get("here")


def test_switching_models_keeps_one_in_memory():
    store = logic.ModelStore({"a": logic.ModelSpec("A", "", ""), "b": logic.ModelSpec("B", "", "")},
                             lambda spec: spec.label)
    assert store.get("a") == "A" and store.loaded_name() == "a"
    assert store.get("b") == "B" and store.loaded_name() == "b"


def test_generation_without_weights_is_a_clear_error(service, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    installed = service(logic.AppConfig(base_model=str(tmp_path / "base"), ref_model=str(tmp_path / "ref")))
    assert "does not exist" in installed.model_status()
    assert not logic.cache_examples(installed)
    with pytest.raises(gr.Error, match="no model weights available for .* on this server") as error:
        generate_now(str(VASE), "a vase", 1, 4.0, 0.0, 0.0, 1, False, 1, 3.5, 2.0, 64,
                       app_config.CONFIGURED_MODEL, 1, False, _Request("session1"), lambda *a, **k: None)
    # one short line for the visitor, with what to do; what was looked for goes to the server log
    assert "; choose Embedded" in error.value.message and "CLI:" not in error.value.message
    assert "RefAny3D weights folder" in capsys.readouterr().out
    # the views preview still works without weights
    assert len(logic.preview_views(str(VASE), 2, 4.0, 0.0, 0.0)) == 4


# ----------------------------------------------------------------------------------- sessions
def test_session_folders_are_private_and_removed(tmp_path):
    sessions = logic.SessionFolders(tmp_path, ttl_s=3600)
    a, b = sessions.new_run_folder("abc123", "run-"), sessions.new_run_folder("xyz789", "run-")
    assert a.parent == tmp_path / "abc123" and b.parent == tmp_path / "xyz789"
    assert sessions.new_run_folder("abc123", "run-") != a  # runs of one session never share files
    for bad in ("../escape", "", None, "a/b", "x" * 65):
        with pytest.raises(InputError, match="no valid session"):
            sessions.folder(bad)
    sessions.remove("abc123")
    assert not (tmp_path / "abc123").exists() and b.is_dir()


def test_stale_session_folders_are_cleaned(tmp_path):
    sessions = logic.SessionFolders(tmp_path, ttl_s=60)
    old = sessions.folder("old")
    (old / "image.png").write_bytes(b"x")
    os.utime(old, (time.time() - 120, time.time() - 120))
    fresh = sessions.folder("fresh")  # creating a folder sweeps the stale ones
    assert not old.exists() and fresh.is_dir()


# ---------------------------------------------------------------------------- GPU and errors
def test_gpu_duration_grows_with_work_and_is_capped(service):
    service(logic.AppConfig(gpu_duration_cap_s=90))
    flops = logic.generation_flops
    assert flops(28, 8, 512, 512, 2.0) > flops(14, 8, 512, 512, 2.0)
    assert flops(28, 8, 512, 512, 2.0) > flops(28, 4, 512, 512, 2.0)
    assert flops(28, 8, 512, 512, 2.0) == pytest.approx(2 * flops(28, 8, 512, 512, 1.0))  # guidance: 2 passes
    # cached: the views run at the first step only, so it costs less, and the same at 1 step
    assert flops(28, 8, 512, 512, 2.0, "cached") < flops(28, 8, 512, 512, 2.0) / 2
    assert flops(1, 8, 512, 512, 2.0, "cached") == flops(1, 8, 512, 512, 2.0)

    def duration(steps, n_views, resolution, sampler="exact", candidates=1):
        record = {"steps": steps, "resolution": resolution, "condition_size": min(resolution, 512),
                  "image_guidance_scale": 2.0, "sampler": sampler, "candidates": candidates}
        return logic.gpu_duration("m", "p", [None] * n_views, [None] * n_views, record)

    assert duration(50, 12, 1024) == 90  # capped so a visitor with little quota is not refused
    assert duration(1, 1, 64) == 15  # floor: start-up and decoding
    assert 15 < duration(10, 4, 512) < 90
    assert duration(28, 8, 512, "cached") < duration(28, 8, 512)
    assert duration(5, 4, 512) < duration(5, 4, 512, candidates=2) < 90  # each candidate is a whole sampling


def test_gpu_duration_follows_measured_timings(service):
    svc = service(logic.AppConfig(gpu_duration_cap_s=300, gpu_tflops=300))
    record = {"steps": 28, "resolution": 512, "condition_size": 512, "image_guidance_scale": 2.0, "sampler": "exact",
              "candidates": 1}
    views = [None] * 8
    work = logic.generation_flops(28, 8, 512, 512, 2.0)
    unmeasured = logic.gpu_duration("m", "p", views, views, record)
    assert unmeasured == int(10.0 + work / 300e12)  # FLOP estimate: start-up + FLOPs at 300 TFLOP/s
    # This GPU turns out to need 40 s for that call (a slow rate), then one 20 s call: the slowest counts.
    svc.gpu_timings.record(("m", "exact"), work, 40.0)
    svc.gpu_timings.record(("m", "exact"), work, 20.0)
    assert logic.gpu_duration("m", "p", views, views, record) == int(1.3 * 40.0)
    half = {**record, "steps": 14}  # half the work: half the measured time (with the margin)
    assert logic.gpu_duration("m", "p", views, views, half) == int(1.3 * 20.0)
    # Timings are per model and sampler: others still use the estimate.
    assert logic.gpu_duration("other", "p", views, views, record) == unmeasured
    assert logic.gpu_duration("m", "p", views, views, {**record, "sampler": "cached"}) < unmeasured
    # Only the last `keep` calls count: five fast calls replace the slow one.
    for _ in range(5):
        svc.gpu_timings.record(("m", "exact"), work, 16.0)
    assert logic.gpu_duration("m", "p", views, views, record) == int(1.3 * 16.0)


def test_gpu_call_arguments_survive_pickling():
    """ZeroGPU ships the GPU function's arguments to a worker process by pickling them."""
    from refany3d.views import render_views

    views = render_views(str(VASE), 2, 32)
    record = _settings().to_record(1.0)
    payload = ("m", "prompt", views.rgb, views.pointmap, record, gr.Progress())
    restored = pickle.loads(pickle.dumps(payload))
    assert restored[2][0].size == (32, 32) and restored[4] == record
    assert np.array_equal(np.asarray(restored[3][1]), np.asarray(views.pointmap[1]))


def test_condition_size_follows_the_chosen_models_training_ratio():
    """The embedded model was trained with views at half the output size; FLUX.1-dev at the same.
    Each model's own ratio counts, whichever model is the default."""
    registry = logic.AppConfig.from_env({}).model_registry()
    published = app_config.condition_ratio(registry[app_config.PUBLISHED_MODEL])
    assert published == 1.0
    for resolution, expected in ((512, 512), (1024, 512), (64, 64)):  # at most the release's 512
        assert dataclasses.replace(_settings(), resolution=resolution).condition_size(published) == expected
    embedded = app_config.condition_ratio(registry[app_config.EMBEDDED_MODEL])
    assert embedded == 0.5  # assets/embedded/settings.json: 32 px views for 64 px images
    assert dataclasses.replace(_settings(), resolution=64).condition_size(embedded) == 32
    assert dataclasses.replace(_settings(), resolution=64).to_record(embedded)["condition_size"] == 32


def test_sampling_reports_every_step_to_the_progress_bar(service, tiny_model):
    from refany3d.views import render_views

    base, ref = tiny_model()
    service(logic.AppConfig(base_model=str(base), ref_model=str(ref), device="cpu"))
    views = render_views(str(VASE), 1, 64)
    record = {**_settings(steps=3, resolution=64, seed=5).to_record(1.0), "sampler": "exact"}
    calls = []
    [(image, pointmap)] = logic.sample_on_gpu(app_config.CONFIGURED_MODEL, "a vase", views.rgb, views.pointmap, record,
                                              lambda value, **kwargs: calls.append(value)).candidates
    assert calls == [0.0, (1, 3), (2, 3), (3, 3)]
    assert image.size == pointmap.size == (64, 64)

    # Candidates: one bar over all of them, and candidate k is exactly seed + k sampled alone.
    calls.clear()
    pairs = logic.sample_on_gpu(app_config.CONFIGURED_MODEL, "a vase", views.rgb, views.pointmap,
                                {**record, "candidates": 2}, lambda value, **kwargs: calls.append(value)).candidates
    assert calls == [0.0, (1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)]
    [(alone, _)] = logic.sample_on_gpu(app_config.CONFIGURED_MODEL, "a vase", views.rgb, views.pointmap,
                                       {**record, "seed": 6}).candidates
    np.testing.assert_array_equal(np.asarray(pairs[0][0]), np.asarray(image))
    np.testing.assert_array_equal(np.asarray(pairs[1][0]), np.asarray(alone))
    assert not np.array_equal(np.asarray(pairs[0][0]), np.asarray(pairs[1][0]))


def test_a_generation_calibrates_the_gpu_duration(service, tiny_model):
    base, ref = tiny_model()
    # An absurdly slow FLOP estimate: before any measurement the request is the cap.
    svc = service(logic.AppConfig(base_model=str(base), ref_model=str(ref), device="cpu", gpu_tflops=0.001,
                                  gpu_duration_cap_s=120))
    record = {**_settings(n_views=1, steps=2, resolution=64).to_record(1.0), "sampler": "exact"}
    assert logic.gpu_duration(app_config.CONFIGURED_MODEL, "p", [None], [None], record) == 120
    generate_now(str(VASE), "a vase", 1, 4.0, 0.0, 0.0, 1, False, 2, 3.5, 2.0, 64,
                   app_config.CONFIGURED_MODEL, 1, False, _Request("calibrate"), lambda *a, **k: None)
    assert len(svc.gpu_timings._rates[(app_config.CONFIGURED_MODEL, "exact")]) == 1
    # The tiny model took well under a second: the measured rate gives the 15 s floor.
    assert logic.gpu_duration(app_config.CONFIGURED_MODEL, "p", [None], [None], record) == 15


def test_a_generation_with_candidates_keeps_the_most_rigid_and_says_which(service, tiny_model):
    from refany3d.alignment import align, most_consistent

    base, ref = tiny_model()
    service(logic.AppConfig(base_model=str(base), ref_model=str(ref), device="cpu"))
    args = (str(VASE), "a vase", 1, 4.0, 0.0, 30.0, 11, False, 2, 3.5, 2.0, 64, app_config.CONFIGURED_MODEL)
    image, pointmap, _, _, files, seed, status, result = generate_now(
        *args, 3, False, _Request("candidates"), lambda *a, **k: None)
    record = json.loads(Path(result.settings_json).read_text())["settings"]
    assert record["seed"] == 11 and record["candidates"] == 3 and record["chosen_seed"] == seed == result.seed
    assert [c["seed"] for c in record["candidate_scores"]] == [11, 12, 13]
    assert f"seed {seed}" in status and "of 3 candidates (seeds 11–13)" in status
    # each candidate alone, aligned here: the kept one ranks first and is the same image
    alone = [generate_now(*args[:6], s, *args[7:], 1, False, _Request(f"alone{s}"), lambda *a, **k: None)
             for s in (11, 12, 13)]
    reports = [align(VASE, a[1], a[0], y_rotation=30.0) for a in alone]
    assert seed == 11 + most_consistent(reports)
    assert [c["inlier_ratio"] for c in record["candidate_scores"]] == [r.to_dict()["inlier_ratio"] for r in reports]
    np.testing.assert_array_equal(np.asarray(Image.open(image)), np.asarray(Image.open(alone[seed - 11][0])))
    # the alignment panel shows the kept candidate's report (the one the choice made, not redone)
    _, text, details, *_ = logic.align_result(result, False)
    assert details == reports[seed - 11].to_dict() and f"seed {seed}" in text


def test_stop_ends_the_running_generation_after_its_current_step_and_only_that_one(service, tiny_model, monkeypatch):
    base, ref = tiny_model()
    svc = service(logic.AppConfig(base_model=str(base), ref_model=str(ref), device="cpu"))
    args = (str(VASE), "a vase", 1, 4.0, 0.0, 0.0, 3, False, 4, 3.5, 2.0, 64, app_config.CONFIGURED_MODEL, 1, False)
    notices, steps = [], []
    monkeypatch.setattr(logic.gr, "Info", notices.append)

    def press_stop_at_step_two(value, **kwargs):  # what the Stop button does, from the progress bar
        steps.append(value)
        if value == (2, 4):
            # the run reports its own end; the page must not cancel it (that would hold the page)
            assert logic.request_stop(_Request("visitor")) == gr.skip()

    stopped = generate_now(*args, _Request("visitor"), press_stop_at_step_two)  # not an error: no red badges
    assert stopped[6] == "Stopped after step 2 of 4, as asked. The results shown are the previous ones."
    assert all(output == gr.skip() for i, output in enumerate(stopped) if i != 6)
    assert steps[-1] == (2, 4) and notices == [logic.STOPPING]
    # nothing runs now: the stop is for a generation waiting in the queue, which the page cancels
    # (a new number for the State whose change cancels it) and which ends at once should it start
    first_number, second_number = logic.request_stop(_Request("visitor")), logic.request_stop(_Request("visitor"))
    assert isinstance(first_number, int) and first_number != second_number
    assert notices == [logic.STOPPING, logic.NOTHING_TO_STOP, logic.NOTHING_TO_STOP]
    waiting = generate_now(*args, _Request("visitor"), lambda *a, **k: steps.append("sampled"))
    assert waiting[6] == "Stopped before it started, as asked. The results shown are the previous ones."
    assert steps[-1] == (2, 4)  # nothing was loaded or sampled for it

    logic.request_stop(_Request("visitor"))
    logic.validate_generation(*args, _Request("visitor"))  # a new submission: the stop is not for it
    image, *_, status, _ = generate_now(*args[:11], 70, *args[12:], _Request("visitor"), lambda *a, **k: None)
    assert Image.open(image).size == (64, 64)  # a typed 70 px samples at the multiple of 16 below
    assert "Sampled at 64 px: sizes are multiples of 16." in status

    other = []  # another visitor's Stop leaves this generation alone
    generate_now(*args, _Request("visitor"),
                   lambda value, **kwargs: other.append(svc.stops.request("someone else")) or None)
    assert other and not any(other)


def test_a_generation_cancelled_by_gradio_stops_sampling_after_its_current_step(service, tiny_model, monkeypatch):
    """An API client's job.cancel() ends the event at once; the thread, which cannot be
    interrupted, must not sample on beside the next generation."""
    base, ref = tiny_model()
    service(logic.AppConfig(base_model=str(base), ref_model=str(ref), device="cpu"))
    args = (str(VASE), "a vase", 1, 4.0, 0.0, 0.0, 3, False, 40, 3.5, 2.0, 64, app_config.CONFIGURED_MODEL, 1, False)
    steps, at_step_two, cancelled, ended, outcome = [], threading.Event(), threading.Event(), threading.Event(), []
    real_generate = logic._generate

    def recorded_generate(*a, **k):
        try:
            outcome.append(real_generate(*a, **k))
        except Exception as err:
            outcome.append(err)
        finally:
            ended.set()

    monkeypatch.setattr(logic, "_generate", recorded_generate)

    def progress(value, **kwargs):
        steps.append(value)
        if value == (2, 40):  # hold the thread here until the event is cancelled
            at_step_two.set()
            assert cancelled.wait(60)

    async def cancel_at_step_two():
        task = asyncio.create_task(logic.generate(*args, _Request("api"), progress))
        while not at_step_two.is_set():
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled.set()

    asyncio.run(cancel_at_step_two())
    assert ended.wait(60)
    assert isinstance(outcome[0], logic.GenerationStopped) and str(outcome[0]) == "Stopped after step 2 of 40, as asked."
    assert steps[-1] == (2, 40)


@contextmanager
def _run(stops: logic.StopRequests, session: str):
    """A run of the session's, as `generate` begins and ends one."""
    run = stops.begin(session)
    try:
        yield run
    finally:
        stops.end(run)


def test_a_stop_reaches_every_run_of_the_session_under_way_and_no_later_one():
    stops = logic.StopRequests()
    with _run(stops, "a") as old, _run(stops, "a") as new, _run(stops, "b") as other:
        # two runs of one session (an API client's), beside another session's
        assert stops.request("a")
        for run in (old, new):
            with pytest.raises(logic.GenerationStopped, match="Stopped at step 3, as asked."):
                stops.check(run, "at step 3")
        stops.check(other, "never")  # another session's run goes on
    with _run(stops, "a") as later:
        stops.check(later, "never")  # the stop was for the runs under way then


def _sample_in_a_forked_worker(views, record, run, steps_seen, results):  # runs in the child process
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive a fork (as in DataLoader workers)
    sampled = logic.sample_on_gpu(app_config.CONFIGURED_MODEL, "a vase", views.rgb, views.pointmap, record,
                                  lambda value, **kwargs: steps_seen.put(value), run)
    results.put((sampled.stopped, len(sampled.candidates)))


def test_a_stop_reaches_the_sampler_in_a_forked_worker_as_under_zerogpu(service, tiny_model):
    """ZeroGPU runs `sample_on_gpu` in a process forked from the app (spaces' wrappers), which no
    longer shares the app's memory: the stop still reaches it, and comes back as a value."""
    import multiprocessing

    from refany3d.views import render_views

    base, ref = tiny_model()
    svc = service(logic.AppConfig(base_model=str(base), ref_model=str(ref), device="cpu"))
    svc.models.get(app_config.CONFIGURED_MODEL)  # loaded before the fork, as a ZeroGPU Space preloads
    record = {**_settings(steps=40, resolution=64, seed=5).to_record(0.5), "sampler": "exact"}
    views = render_views(str(VASE), 1, 32)  # on the app's side, as `_generate` does
    fork = multiprocessing.get_context("fork")
    steps_seen, results = fork.Queue(), fork.Queue()
    with _run(svc.stops, "visitor") as run:
        worker = fork.Process(target=_sample_in_a_forked_worker, args=(views, record, run, steps_seen, results))
        worker.start()
        try:
            while steps_seen.get(timeout=120) != (2, 40):
                pass
            assert svc.stops.request("visitor")  # the Stop button, in the app's process
            stopped, pairs = results.get(timeout=120)
        finally:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()
    assert re.fullmatch(r"Stopped after step (\d+) of 40, as asked\.", stopped) and pairs == 0
    assert 2 <= int(re.search(r"step (\d+)", stopped).group(1)) < 40
    assert list(svc.stops.folder.iterdir()) == []  # the finished run leaves no flag behind


def test_a_tab_closed_during_its_generation_stops_it_and_says_so_in_the_server_log(service, caplog):
    svc = service(logic.AppConfig())
    svc.sessions.new_run_folder("visitor", "run-")
    with _run(svc.stops, "visitor") as run, caplog.at_level("WARNING", logger="refany3d.app_logic"):
        logic.end_session(_Request("visitor"))
        with pytest.raises(logic.GenerationStopped):
            svc.stops.check(run, "after step 3 of 28")
    assert [r.getMessage() for r in caplog.records] == [
        "session visitor closed during its generation, which stops after its current step"]
    assert not (svc.sessions.root / "visitor").exists()
    caplog.clear()
    logic.end_session(_Request("idle"))  # nothing under way: nothing to log
    assert caplog.records == []


def test_a_stop_with_nothing_under_way_ends_the_sessions_next_run_unless_it_submits_anew():
    stops = logic.StopRequests()
    assert not stops.request("a")
    with _run(stops, "b") as other:
        stops.check(other, "never")  # another session's
    with _run(stops, "a") as waiting:  # the run that waited in the queue
        with pytest.raises(logic.GenerationStopped, match="Stopped before it started"):
            stops.check(waiting, "before it started")
    with _run(stops, "a") as after:  # that stop is spent
        stops.check(after, "never")
    assert not stops.request("a")
    stops.submitted("a")
    with _run(stops, "a") as fresh:
        stops.check(fresh, "never")
    assert not stops.end_session("a")  # a closed tab leaves no stop behind for the session
    with _run(stops, "a") as reopened:
        stops.check(reopened, "never")


def test_the_resolution_slider_follows_the_chosen_model(service):
    service(logic.AppConfig())
    slider = logic.resolution_slider(app_config.EMBEDDED_MODEL, 512)
    assert (slider.maximum, slider.value) == (256, 256)
    slider = logic.resolution_slider(app_config.PUBLISHED_MODEL, 512)
    assert (slider.maximum, slider.value) == (1024, 512)


def test_handler_errors_become_gradio_errors():
    @logic.user_errors
    def bad_mesh():
        raise MeshError("bunny.ply has no faces")

    @logic.user_errors
    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    @logic.user_errors
    def bug():
        raise KeyError("x")

    with pytest.raises(gr.Error, match="bunny.ply has no faces") as refused:
        bad_mesh()
    assert refused.value.title == "Mesh error" and not refused.value.print_exception  # a visitor's, not a bug
    with pytest.raises(gr.Error, match="Out of memory while generating. Try fewer views"):
        out_of_memory()
    with pytest.raises(KeyError):  # a bug keeps its traceback
        bug()


# ---------------------------------------------------------------------------------- alignment
def _rendered_generation(folder: Path, mesh_path: Path, camera, y_rotation: float, seed: int = 3):
    """A "generation" whose image and point map are the mesh rendered at `camera`: a pair the
    alignment must find measurable, with the camera known."""
    from refany3d.mesh import load_mesh, normalization_of
    from refany3d.outputs import pointcloud_from_pointmap, write_ply, write_settings_json
    from refany3d.views import pointmap_image, render_at

    mesh = load_mesh(mesh_path)
    view = render_at(mesh, camera, y_rotation)
    image, pointmap = folder / "image.png", folder / "pointmap.png"
    Image.fromarray(view.rgb).save(image)
    pointmap_image(view.pointmap_xyz).save(pointmap)
    cloud = pointcloud_from_pointmap(Image.open(pointmap), Image.open(image), normalization_of(mesh), y_rotation)
    ply = write_ply(cloud, folder / "pointcloud.ply")
    settings = write_settings_json({"seed": seed, "y_rotation": y_rotation}, folder / "settings.json", mesh_path)
    files = [str(image), str(pointmap), str(ply), str(settings)]
    return logic.GenerationResult(str(image), str(pointmap), str(ply), str(settings), str(mesh_path), y_rotation,
                                  seed, files=list(files)), normalization_of(mesh)


def _traces(figure, name_start: str):
    return [trace for trace in figure.data if trace.name.startswith(name_start)]


def test_alignment_of_a_generation_measures_the_known_camera(service, tmp_path):
    from refany3d.cameras import orbit_camera

    service(logic.AppConfig())
    camera = orbit_camera(azimuth_deg=40.0, pitch_deg=20.0, radius=4.0, resolution=160)
    result, normalization = _rendered_generation(tmp_path, VASE, camera, y_rotation=25.0)
    overlay, text, details, figure, files, kept = logic.align_result(result, True)

    assert details["measurable"] and details["inlier_ratio"] > 0.9 and details["iou"] > 0.95
    assert details["reprojection_error_px"] < 1.0 and details["pointmap_error"] < 0.01
    assert abs(details["orbit"]["azimuth_deg"] - 40.0) < 1.0 and abs(details["orbit"]["pitch_deg"] - 20.0) < 1.0
    assert "**Measured:**" in text and "seed 3" in text
    assert f"| Inlier ratio | {details['inlier_ratio']:.3f} |" in text
    assert f"| Silhouette IoU | {details['iou']:.3f} |" in text
    assert f"{details['colour_agreement']:.1f} dB PSNR" in text

    # the recovered camera is drawn beside the cloud, in the cloud's (the asset's own) frame: 8 frustum
    # segments, their apex at the true camera position
    (frustum,) = _traces(figure, "recovered camera")
    xyz = np.array([frustum.x, frustum.y, frustum.z], dtype=float).T.reshape(8, 3, 3)
    assert np.isnan(xyz[:, 2]).all()  # a break after every segment
    apex = normalization.from_normalized(camera.position[None])[0]
    np.testing.assert_allclose(xyz[:4, 0], np.repeat(apex[None], 4, axis=0), atol=0.01 * np.linalg.norm(apex))
    predicted = _traces(figure, "predicted")[0]
    assert len(predicted.x) > 1000 and _traces(figure, "asset surface")  # cloud and overlay still there
    ply_points = np.asarray(trimesh.load(result.ply).vertices)
    assert np.abs(apex).max() > np.abs(ply_points).max()  # the camera sits outside the asset, same frame

    # the overlay is the generated-size image; downloads gain the report; the state keeps the camera
    assert Image.open(overlay).size == (160, 160)
    assert files[-1].endswith("alignment.json") and len(files) == 5 and kept is result
    assert kept.camera_segments is not None
    assert json.loads(Path(files[-1]).read_text())["inlier_ratio"] == details["inlier_ratio"]
    figure, box = logic.redraw_pointcloud(kept, False)
    assert _traces(figure, "recovered camera") and box == gr.skip()  # toggling keeps the camera
    # a stopped generation (its outputs skipped) leaves this result in place: it is not aligned again
    Path(files[-1]).unlink()
    assert logic.align_result(kept, False) == (gr.skip(),) * 6 and not Path(files[-1]).exists()
    assert logic.redraw_pointcloud(None, True)[1] is False  # no generation of the visitor's: the box unticks


def test_alignment_after_the_tab_closed_ends_quietly(service, tmp_path):
    """The tab closed while its generation was being aligned: end_session removed the session's
    folder, so there is nothing to read or write and nobody to show it to. No error, no traceback."""
    import shutil

    from refany3d.cameras import orbit_camera

    service(logic.AppConfig())
    for measured_first in (False, True):  # files still to read, or (a candidate's report) only to write
        folder = tmp_path / f"run{measured_first:d}"
        folder.mkdir()
        result, _ = _rendered_generation(folder, VASE, orbit_camera(azimuth_deg=0.0, resolution=64), y_rotation=0.0)
        if measured_first:
            result.report = logic._align_files(result.mesh_path, result.image, result.pointmap, 0.0)
        shutil.rmtree(folder)
        assert logic.align_result(result, False) == (gr.skip(),) * 6
    # with the folder there, a missing file is still an error the visitor sees
    folder = tmp_path / "run2"
    folder.mkdir()
    result, _ = _rendered_generation(folder, VASE, orbit_camera(azimuth_deg=0.0, resolution=64), y_rotation=0.0)
    Path(result.pointmap).unlink()
    with pytest.raises(gr.Error):
        logic.align_result(result, False)


def test_an_unmeasurable_generation_says_why_without_an_error(service, tmp_path):
    from refany3d.cameras import orbit_camera

    service(logic.AppConfig())
    camera = orbit_camera(azimuth_deg=0.0, resolution=96)
    result, _ = _rendered_generation(tmp_path, VASE, camera, y_rotation=0.0)
    Image.new("RGB", (96, 96), "white").save(result.pointmap)  # the point map shows nothing
    overlay, text, details, figure, _, kept = logic.align_result(result, False)
    assert not details["measurable"] and overlay is None
    assert "**Not measurable:** only 0 foreground pixels" in text
    assert "| Inlier ratio | n/a |" in text
    assert not _traces(figure, "recovered camera") and kept.camera_segments is None


def test_zero_gpu_refuses_a_run_that_cannot_finish_in_its_time(service, tiny_model):
    """ZeroGPU ends a call at the duration it asked for; a run expected to take longer than the
    cap is refused up front with what to lower, instead of dying mid-way."""
    base, ref = tiny_model()
    svc = service(logic.AppConfig(base_model=str(base), ref_model=str(ref), device="cpu", gpu_tflops=0.001,
                                  gpu_duration_cap_s=120, zero_gpu=True))
    arguments = (str(VASE), "a vase", 1, 4.0, 0.0, 0.0, 1, False, 2, 3.5, 2.0, 64, app_config.CONFIGURED_MODEL, 1, False)
    with pytest.raises(gr.Error, match=r"this run would take about \d+ s of GPU time, more than the 120 s this "
                                       "Space allows: lower the steps"):
        generate_now(*arguments, _Request("zero"), lambda *a, **k: None)
    # measured: this GPU is fast enough, so the same run goes ahead
    record = {**_settings(n_views=1, steps=2, resolution=64).to_record(1.0), "sampler": "exact"}
    svc.gpu_timings.record((app_config.CONFIGURED_MODEL, "exact"), logic._call_flops(1, record), 1.0)
    image = generate_now(*arguments, _Request("zero"), lambda *a, **k: None)[0]
    assert image is not None
    assert logic.AppConfig.from_env({"SPACES_ZERO_GPU": "true"}).zero_gpu


def test_an_asset_no_view_shows_is_refused_before_sampling(service, tiny_model, tmp_path, monkeypatch):
    """A flat asset (a rug) circled at pitch 0 is seen edge-on by every view: the visitor is told
    to raise the pitch, and no GPU call is made on empty views."""
    import trimesh

    rug = tmp_path / "rug.obj"
    trimesh.Trimesh([[-1, 0, -1], [1, 0, -1], [1, 0, 1], [-1, 0, 1]], [[0, 2, 1], [0, 3, 2]]).export(rug)
    base, ref = tiny_model()
    service(logic.AppConfig(base_model=str(base), ref_model=str(ref), device="cpu"))
    sampled = []
    real = logic.sample_on_gpu
    monkeypatch.setattr(logic, "sample_on_gpu", lambda *args: sampled.append(args[4]["pitch"]) or real(*args))

    def generate(pitch: float):
        return generate_now(str(rug), "a rug", 1, 4.0, pitch, 0.0, 1, False, 1, 3.5, 2.0, 64,
                              app_config.CONFIGURED_MODEL, 1, False, _Request("rug"), lambda *a, **k: None)

    with pytest.raises(gr.Error, match=r"flat \(no height\) and the views circle it edge-on at pitch 0°; give a pitch"):
        generate(0.0)
    assert sampled == []
    assert Image.open(generate(30.0)[0]).size == (64, 64) and sampled == [30.0]


def test_the_viewer_notes_which_file_of_a_zip_is_used_on_every_upload_of_it(service, tmp_path):
    """A .zip of one asset as .glb and .obj: the viewer shows the GLB, and a notice says so each
    time it is shown (the parsed mesh is cached, so the note travels with it)."""
    import zipfile

    from refany3d.errors import RefAny3DWarning

    service(logic.AppConfig())
    archive = tmp_path / "asset.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("asset.glb", trimesh.creation.box().export(file_type="glb"))
        zf.writestr("asset.obj", trimesh.creation.icosphere().export(file_type="obj"))
    note = "the zip archive holds meshes in several formats: asset.glb is used, asset.obj is not"
    for upload in range(2):
        with pytest.warns(UserWarning) as caught:
            shown = logic.show_mesh(str(archive), _Request("zip"))
        notices = [w for w in caught if w.category is UserWarning]  # gr.Warning outside a running app
        assert len(notices) == 1 and str(notices[0].message).startswith(note)
        assert [w.category for w in caught if w.category is not UserWarning] == [RefAny3DWarning] * (upload == 0)
        assert len(trimesh.load(shown, force="mesh").faces) == 12  # the box, not the sphere


def test_views_that_see_a_thin_asset_edge_on_are_noted_in_the_preview_and_the_status(service, tiny_model, tmp_path):
    """A sign is seen edge-on by two of four views: the preview and the generation warn (a notice
    in the app) and the status line says which views, and the generation still runs."""
    sign = tmp_path / "sign.obj"
    sign_mesh().export(sign)
    base, ref = tiny_model()
    service(logic.AppConfig(base_model=str(base), ref_model=str(ref), device="cpu"))
    note = r"2 of 4 reference views \(azimuth 0°, 180°\) show almost nothing of the asset"
    with pytest.warns(UserWarning, match=note):  # gr.Warning outside a running app
        gallery = logic.preview_views(str(sign), 4, 4.0, 0.0, 0.0)
    assert len(gallery) == 8
    with pytest.warns(UserWarning, match=note):
        out = generate_now(str(sign), "a sign", 4, 4.0, 0.0, 0.0, 1, False, 1, 3.5, 2.0, 64,
                             app_config.CONFIGURED_MODEL, 1, False, _Request("sign"), lambda *a, **k: None)
    assert Image.open(out[0]).size == (64, 64)
    status = out[6]
    assert status.startswith("Done: seed 1") and re.search(note, status)
