"""`python -m refany3d generate`: single runs, JSONL batches with resume, and bad input."""
from __future__ import annotations

import json
from dataclasses import fields
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from refany3d.batch import Job, read_jobs
from refany3d.cli import main
from refany3d.errors import InputError
from refany3d.examples import EXAMPLES_DIR

from conftest import REPO, VASE

SMALL = ["--views", "2", "--height", "32", "--width", "32", "--condition-size", "32", "--steps", "2"]


@pytest.fixture(scope="module")
def model_args(tiny_model):
    base, ref = tiny_model(1)
    return ["--base-model", str(base), "--ref-model", str(ref), "--device", "cpu"]


def test_generate_writes_image_pointmap_and_settings(model_args, tmp_path, monkeypatch):
    out = tmp_path / "run"
    mesh = EXAMPLES_DIR / "traffic_cone.glb"
    code = main(["generate", str(mesh), "--prompt", "a cone on a street", "--out", str(out), "--seed", "7",
                 *SMALL, *model_args])
    assert code == 0
    image, pointmap = Image.open(out / "image.png"), Image.open(out / "pointmap.png")
    assert image.size == (32, 32) and pointmap.size == (32, 32)
    record = json.loads((out / "settings.json").read_text())
    assert record["settings"]["seed"] == 7 and record["settings"]["n_views"] == 2
    assert record["settings"]["prompt"] == "a cone on a street"
    assert record["mesh"]["name"] == "traffic_cone.glb" and len(record["mesh"]["sha256"]) == 64

    again = tmp_path / "again"
    monkeypatch.chdir(EXAMPLES_DIR)  # a mesh path relative to here is recorded absolute, for `eval --batch`
    assert main(["generate", mesh.name, "--prompt", "a cone on a street", "--out", str(again), "--seed", "7",
                 *SMALL, *model_args]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(again / "image.png")), np.asarray(image))
    assert json.loads((again / "settings.json").read_text())["settings"]["mesh"] == str(mesh)


def test_candidates_record_the_kept_seed_which_regenerates_the_image(model_args, tmp_path, capsys):
    mesh = EXAMPLES_DIR / "traffic_cone.glb"
    out = tmp_path / "best"
    assert main(["generate", str(mesh), "--prompt", "a cone", "--out", str(out), "--seed", "7", "--candidates", "3",
                 *SMALL, *model_args]) == 0
    settings = json.loads((out / "settings.json").read_text())["settings"]
    assert settings["seed"] == 7 and settings["candidates"] == 3
    assert [c["seed"] for c in settings["candidate_scores"]] == [7, 8, 9]
    chosen = settings["chosen_seed"]
    assert chosen in (7, 8, 9) and f"kept seed {chosen}, the most rigid of 3 candidates" in capsys.readouterr().out
    alone = tmp_path / "alone"
    assert main(["generate", str(mesh), "--prompt", "a cone", "--out", str(alone), "--seed", str(chosen),
                 *SMALL, *model_args]) == 0
    for name in ("image.png", "pointmap.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(alone / name)), np.asarray(Image.open(out / name)))
    assert "chosen_seed" not in json.loads((alone / "settings.json").read_text())["settings"]


def test_jobs_batch_runs_and_resumes(model_args, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    mesh = EXAMPLES_DIR / "vase.glb"
    lines = [
        {"mesh": str(mesh), "prompt": "a vase", "seed": 1, "name": "first", "n_views": 1, "height": 32, "width": 32,
         "condition_size": 32, "num_inference_steps": 1},
        {"mesh": str(mesh), "prompt": "a vase on a table", "seed": 2, "n_views": 2, "height": 32, "width": 32,
         "condition_size": 32, "num_inference_steps": 1},
    ]
    jobs.write_text("# a comment\n" + "\n".join(json.dumps(line) for line in lines) + "\n\n")
    out = tmp_path / "batch"
    assert main(["generate", "--jobs", str(jobs), "--out", str(out), *model_args]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["first", "job_00001"]
    first_time = (out / "first" / "image.png").stat().st_mtime_ns
    (out / "job_00001" / "settings.json").unlink()  # an interrupted run: redone on resume
    assert main(["generate", "--jobs", str(jobs), "--out", str(out), *model_args]) == 0
    assert (out / "first" / "image.png").stat().st_mtime_ns == first_time
    assert (out / "job_00001" / "settings.json").is_file()
    lines[0]["num_inference_steps"] = 2  # a job edited since its run: run again, not skipped
    jobs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert main(["generate", "--jobs", str(jobs), "--out", str(out), *model_args]) == 0
    assert (out / "first" / "image.png").stat().st_mtime_ns != first_time
    assert json.loads((out / "first" / "settings.json").read_text())["settings"]["num_inference_steps"] == 2


def test_no_pointmap_branch_writes_an_image_alone_and_resumes(model_args, tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    job = {"mesh": str(EXAMPLES_DIR / "vase.glb"), "prompt": "a vase", "seed": 3, "n_views": 2, "height": 32,
           "width": 32, "condition_size": 32, "num_inference_steps": 1, "pointmap_branch": False, "mode": "faithful"}
    jobs.write_text(json.dumps(job) + "\n")
    out = tmp_path / "batch"
    assert main(["generate", "--jobs", str(jobs), "--out", str(out), *model_args]) == 0
    run = out / "job_00000"
    assert sorted(p.name for p in run.iterdir()) == ["image.png", "settings.json"]
    assert json.loads((run / "settings.json").read_text())["settings"]["pointmap_branch"] is False
    written = (run / "image.png").stat().st_mtime_ns
    assert main(["generate", "--jobs", str(jobs), "--out", str(out), *model_args]) == 0
    assert (run / "image.png").stat().st_mtime_ns == written  # complete without a point map: skipped

    single = tmp_path / "single"  # the CLI flag picks the faithful sampler by itself
    assert main(["generate", job["mesh"], "--prompt", "a vase", "--out", str(single), "--seed", "3",
                 "--no-pointmap-branch", *SMALL, *model_args]) == 0
    assert not (single / "pointmap.png").exists()
    assert json.loads((single / "settings.json").read_text())["settings"]["mode"] == "faithful"
    job.pop("mode")  # a jobs file that asks for the ablation with a fast sampler is told why not
    jobs.write_text(json.dumps(job) + "\n")
    assert main(["generate", "--jobs", str(jobs), "--out", str(tmp_path / "exact"), *model_args]) == 2
    assert "mode='faithful' only" in capsys.readouterr().err
    jobs.write_text(json.dumps({**job, "num_inference_steps": 0}) + "\n")  # a jobs file's keys keep their names
    assert main(["generate", "--jobs", str(jobs), "--out", str(tmp_path / "zero"), *model_args]) == 2
    assert "num_inference_steps must be a positive whole number, got 0" in capsys.readouterr().err


def test_read_jobs_errors(tmp_path):
    bad = tmp_path / "jobs.jsonl"
    bad.write_text('{"mesh": "a.glb", "prompt": "x", "colour": 3}\n')
    with pytest.raises(InputError, match="line 1: unknown setting"):
        read_jobs(bad)
    bad.write_text('{"mesh": "a.glb"\n')
    with pytest.raises(InputError, match="line 1: not valid JSON"):
        read_jobs(bad)
    bad.write_text('{"mesh": "a.glb", "prompt": "x", "candidates": 0}\n')
    with pytest.raises(InputError, match="line 1: candidates must be a positive whole number, got 0"):
        read_jobs(bad)
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(InputError, match="'mesh' is required"):
        read_jobs(bad)
    for setting, message in (('"seed": "abc"', "seed must be a whole number from 0 to 9223372036854775807, got 'abc'"),
                             ('"seed": 9223372036854775807, "candidates": 2', "seed .* less 1 \\(one seed per candidate\\)"),
                             ('"guidance_scale": "3"', "guidance_scale must be a finite number, got '3'"),
                             ('"n_views": 2.5', "n_views must be a positive whole number, got 2.5"),
                             ('"group_mask": "no"', "group_mask must be true or false"),
                             ('"name": "../../escape"', "name must be a folder name without '/'")):
        bad.write_text('{"mesh": "a.glb", "prompt": "x", %s}\n' % setting)
        with pytest.raises(InputError, match="line 1: " + message):
            read_jobs(bad)
    bad.write_text('{"mesh": "sub/a.glb", "prompt": "x"}\n')
    assert read_jobs(bad)[0].mesh == str((tmp_path / "sub" / "a.glb").resolve())


def test_every_job_setting_reaches_the_sampler():
    """A Job's sampler settings are keywords generate_from_mesh (or the call it forwards to) takes,
    so no setting of a jobs file is dropped or refused on the way."""
    import inspect

    from refany3d.pipeline import RefAny3DPipeline

    taken = {*inspect.signature(RefAny3DPipeline.generate_from_mesh).parameters,
             *inspect.signature(RefAny3DPipeline.__call__).parameters}
    kwargs = Job(mesh="m", prompt="p").sampler_kwargs()
    assert set(kwargs) <= taken
    assert not {"mesh", "prompt", "seed", "candidates", "name"} & set(kwargs)
    assert set(kwargs) | {"mesh", "prompt", "seed", "candidates", "name"} == {f.name for f in fields(Job)}


GOOD = ["generate", str(VASE), "--prompt", "p", "--out", "x"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--out", "x"], "give a MESH and --prompt"),
        (["generate", "m.glb", "--prompt", "p", "--out", "x", "--candidates", "0"], "candidates must be a positive"),
        (["generate", "nope.glb", "--prompt", "p", "--out", "x"], "mesh file not found: "),
        ([*GOOD, "--base-model", "nowhere", "--ref-model", "/no/such/ref"], "RefAny3D weights folder '/no/such/ref' not found"),
        ([*GOOD, "--ref-model", "JudgementH/RefAny3D", "--base-model", "/no/such/base"],
         "RefAny3D weights"),  # offline: the hub id fails first, without a traceback
        ([*GOOD, "--device", "bogus"], "unknown device 'bogus'; use cpu, cuda or cuda:N"),
        ([*GOOD, "--guidance", "nan"], "--guidance must be a finite number, got nan"),  # named as typed
        ([*GOOD, "--image-guidance", "inf"], "--image-guidance must be a finite number, got inf"),
        ([*GOOD, "--steps", "0"], "--steps must be a positive whole number, got 0"),
        ([*GOOD, "--max-sequence-length", "0"], "--max-sequence-length must be a positive whole number, got 0"),
        ([*GOOD, "--seed", str(2**64 - 1)], "seed must be a whole number from 0 to 9223372036854775807"),
        ([*GOOD[:-1], "a_file/sub"], "Not a directory: a_file/sub"),
    ],
)
def test_bad_generate_input_is_one_line_and_exit_2(argv, message, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    result = subprocess.run([sys.executable, "-m", "refany3d", *argv], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()  # a failed run leaves no empty output folder behind


def test_a_run_prints_its_own_lines_and_no_library_start_up_noise(model_args, tmp_path):
    """Importing FluxPipeline with torchao and no torchvision logs seven harmless lines (kernel
    libraries, deprecations, fallbacks): refany3d drops those, and stderr keeps the progress bars."""
    import re

    from refany3d.library_noise import HARMLESS

    result = subprocess.run([sys.executable, "-m", "refany3d", "generate", str(VASE), "--prompt", "a vase",
                             "--out", str(tmp_path / "run"), "--seed", "1", *SMALL, *model_args],
                            cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {tmp_path / 'run' / 'image.png'}")
    lines = [line for line in re.split(r"[\r\n]+", result.stderr) if line.strip()]
    assert [line for line in lines if any(p.search(line) for p in HARMLESS.values())] == []
    assert [line for line in lines if not re.search(r"^(Loading|sampling)\b.*\|", line)] == []  # progress only


def test_library_noise_filters_drop_only_their_own_messages():
    import logging

    from refany3d.library_noise import _DropMatching, drop_harmless_library_messages

    drop_harmless_library_messages()
    drop_harmless_library_messages()  # installed once however often it is called
    samples = {
        "torchao": "Failed to load /x/torchao/_C_mxfp8.so: Could not load this library",
        "torch.utils._pytree": "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch",
        "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects. This may affect",
        "transformers.utils.import_utils": "`CLIPImageProcessor` requires torchvision (not installed); falling back to",
    }
    seen = []
    collect = logging.Handler(logging.WARNING)
    collect.emit = lambda record: seen.append(record.getMessage())
    for name, message in samples.items():
        logger = logging.getLogger(name)
        assert sum(isinstance(f, _DropMatching) for f in logger.filters) == 1
        logger.addHandler(collect)  # on the logger itself: these libraries' loggers do not all propagate
        try:
            logger.warning(message)
            logger.warning("something else went wrong in %s", name)
        finally:
            logger.removeHandler(collect)
    assert seen == [f"something else went wrong in {name}" for name in samples]


def test_unreadable_mesh_is_a_clear_error(model_args, tmp_path, capsys):
    bad = tmp_path / "broken.glb"
    bad.write_bytes(b"glTF\x02\x00\x00\x00garbage")
    assert main(["generate", str(bad), "--prompt", "p", "--out", str(tmp_path / "o"), *SMALL, *model_args]) == 2
    assert "broken.glb" in capsys.readouterr().err


def test_model_settings_default_to_what_the_model_was_trained_for(tmp_path):
    from refany3d.pipeline import EMBEDDED_MODEL_DIR, RELEASE_SETTINGS, recommended_settings

    assert recommended_settings("JudgementH/RefAny3D") == RELEASE_SETTINGS
    shipped = json.loads((EMBEDDED_MODEL_DIR / "settings.json").read_text())
    embedded = recommended_settings(EMBEDDED_MODEL_DIR / "ref")
    assert embedded["height"] == shipped["height"] == 64 and embedded["condition_size"] == shipped["condition_size"]
    (tmp_path / "ref").mkdir()
    (tmp_path / "settings.json").write_text("{not json")
    from refany3d.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="cannot read the model's settings"):
        recommended_settings(tmp_path / "ref")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"mesh": "a.glb", "prompt": "p", "height": 128}\n')
    job = read_jobs(jobs, defaults=embedded)[0]
    assert job.height == 128 and job.condition_size == embedded["condition_size"] and job.n_views == embedded["n_views"]


def test_no_group_mask_flag_samples_with_full_attention(model_args, tmp_path):
    mesh = EXAMPLES_DIR / "traffic_cone.glb"
    common = ["--prompt", "a cone on a street", "--seed", "3", *SMALL, *model_args]
    assert main(["generate", str(mesh), "--out", str(tmp_path / "masked"), *common]) == 0
    assert main(["generate", str(mesh), "--out", str(tmp_path / "full"), "--no-group-mask", *common]) == 0
    record = json.loads((tmp_path / "full" / "settings.json").read_text())
    assert record["settings"]["group_mask"] is False
    assert json.loads((tmp_path / "masked" / "settings.json").read_text())["settings"]["group_mask"] is True
    masked, full = (np.asarray(Image.open(tmp_path / d / "pointmap.png"), np.int16) for d in ("masked", "full"))
    assert np.abs(masked - full).max() > 0


def test_a_failing_job_does_not_stop_the_others(model_args, tmp_path, capsys):
    """A job that cannot run is logged with its reason; the batch goes on, and exits 2 naming it."""
    mesh = str(EXAMPLES_DIR / "vase.glb")
    small = {"n_views": 1, "height": 32, "width": 32, "condition_size": 32, "num_inference_steps": 1}
    lines = [{"mesh": mesh, "prompt": "a vase", "seed": 1, "name": "near", **small},
             {"mesh": mesh, "prompt": "a vase", "seed": 2, "name": "far", "radius": 500.0, **small},
             {"mesh": mesh, "prompt": "a vase", "seed": 3, "name": "after", **small}]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "batch"
    assert main(["generate", "--jobs", str(jobs), "--out", str(out), *model_args]) == 2
    captured = capsys.readouterr()
    assert "[2/3] far: failed: the asset is not visible in any reference view" in captured.out
    assert "1 of 3 jobs failed, the first far: the asset is not visible" in captured.err
    assert "The others are written" in captured.err
    assert (out / "near" / "settings.json").is_file() and (out / "after" / "settings.json").is_file()
    assert not (out / "far" / "settings.json").exists()


def test_a_batch_rerun_with_other_weights_runs_again(model_args, tmp_path, tiny_model, capsys):
    """settings.json records the model, so a batch is not taken for done with other weights."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"mesh": str(EXAMPLES_DIR / "vase.glb"), "prompt": "a vase", "seed": 1, "n_views": 1,
                                "height": 32, "width": 32, "condition_size": 32, "num_inference_steps": 1}) + "\n")
    out = tmp_path / "batch"
    assert main(["generate", "--jobs", str(jobs), "--out", str(out), *model_args]) == 0
    model = json.loads((out / "job_00000" / "settings.json").read_text())["settings"]["model"]
    assert model == {"base_model": model_args[1], "ref_model": model_args[3], "dtype": "float32"}
    assert main(["generate", "--jobs", str(jobs), "--out", str(out), *model_args]) == 0
    assert "already done, skipped" in capsys.readouterr().out
    other_base, other_ref = tiny_model(2)
    assert main(["generate", "--jobs", str(jobs), "--out", str(out), "--base-model", str(other_base),
                 "--ref-model", str(other_ref), "--device", "cpu"]) == 0
    assert "job_00000: written" in capsys.readouterr().out
    assert json.loads((out / "job_00000" / "settings.json").read_text())["settings"]["model"]["ref_model"] == \
        str(other_ref)


def test_processes_share_the_jobs_and_names_must_differ(model_args, tmp_path):
    from refany3d.batch import run_jobs
    from refany3d.pipeline import RefAny3DPipeline

    pipe = RefAny3DPipeline.from_pretrained(model_args[1], model_args[3], device="cpu")
    small = dict(n_views=1, height=32, width=32, condition_size=32, num_inference_steps=1)
    jobs = [Job(mesh=str(EXAMPLES_DIR / "vase.glb"), prompt="a vase", seed=i, **small) for i in range(5)]
    written = run_jobs(pipe, jobs, tmp_path, process_index=1, num_processes=2, log=lambda line: None)
    assert [p.name for p in written] == ["job_00001", "job_00003"]  # every second job, from the second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job_00001", "job_00003"]
    twins = [Job(mesh=jobs[0].mesh, prompt="a", name="same", **small), Job(mesh=jobs[0].mesh, prompt="b", name="same")]
    with pytest.raises(InputError, match="job names must be unique"):
        run_jobs(pipe, twins, tmp_path / "twins")
    assert not (tmp_path / "twins").exists()


def test_a_launch_that_did_not_form_one_group_is_refused(model_args, tmp_path, monkeypatch, capsys):
    """Two processes that each see only themselves would both run every job into the same folders."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"mesh": str(EXAMPLES_DIR / "vase.glb"), "prompt": "a vase"}) + "\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["generate", "--jobs", str(jobs), "--out", str(tmp_path / "out"), *model_args]) == 2
    assert "launched as 2 processes, but they did not join one group (each sees 1)" in capsys.readouterr().err


@pytest.mark.parametrize("flag, grain", [([], None), (["--cpu-offload"], "model"),
                                         (["--cpu-offload", "blocks"], "blocks")])
def test_cpu_offload_flag_reaches_the_loader(model_args, tmp_path, monkeypatch, flag, grain):
    from refany3d.pipeline import RefAny3DPipeline

    asked = {}

    def load(*args, **kwargs):
        asked.update(kwargs)
        raise InputError("stop here")

    monkeypatch.setattr(RefAny3DPipeline, "from_pretrained", load)
    argv = ["generate", str(VASE), "--prompt", "p", "--out", str(tmp_path / "o"), *model_args, *flag]
    assert main(argv) == 2
    assert asked["cpu_offload"] == grain


def _run_out_of_memory_on(monkeypatch, prompt: str) -> None:
    """generate_from_mesh runs out of GPU memory for `prompt`, as a too-large job would."""
    import torch

    from refany3d.pipeline import RefAny3DPipeline

    real = RefAny3DPipeline.generate_from_mesh

    def generate(self, mesh, text, *args, **kwargs):
        if text == prompt:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 23.6 GiB total)")
        return real(self, mesh, text, *args, **kwargs)

    monkeypatch.setattr(RefAny3DPipeline, "generate_from_mesh", generate)


def test_running_out_of_memory_is_one_line_with_what_to_change(model_args, tmp_path, monkeypatch, capsys):
    _run_out_of_memory_on(monkeypatch, "a huge vase")
    argv = ["generate", str(VASE), "--prompt", "a huge vase", "--out", str(tmp_path / "o"), *SMALL, *model_args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: out of memory (CUDA out of memory. Tried to allocate 20.00")
    assert "fewer views" in errors[0] and "'blocks' for 16-24 GB GPUs" in errors[0] and "Traceback" not in err


def test_a_job_that_runs_out_of_memory_does_not_stop_the_others(model_args, tmp_path, monkeypatch, capsys):
    _run_out_of_memory_on(monkeypatch, "a huge vase")
    small = {"n_views": 1, "height": 32, "width": 32, "condition_size": 32, "num_inference_steps": 1}
    lines = [{"mesh": str(VASE), "prompt": prompt, "seed": 1, "name": name, **small}
             for name, prompt in (("huge", "a huge vase"), ("small", "a small vase"))]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert main(["generate", "--jobs", str(jobs), "--out", str(tmp_path / "batch"), *model_args]) == 2
    captured = capsys.readouterr()
    assert "[1/2] huge: failed: out of memory (CUDA out of memory." in captured.out
    assert "1 of 2 jobs failed, the first huge: out of memory" in captured.err
    assert (tmp_path / "batch" / "small" / "image.png").is_file()
    assert not (tmp_path / "batch" / "huge" / "settings.json").exists()


def test_quantize_flag_loads_int8_weights_and_is_recorded(model_args, tmp_path):
    out = tmp_path / "int8"
    assert main(["generate", str(VASE), "--prompt", "a vase", "--out", str(out), "--seed", "1", "--quantize", "int8",
                 *SMALL, *model_args]) == 0
    assert Image.open(out / "image.png").size == (32, 32)
    record = json.loads((out / "settings.json").read_text())
    assert record["settings"]["model"]["quantize"] == "int8" and record["settings"]["model"]["dtype"] == "float32"
