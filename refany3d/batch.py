"""Generation runs on disk: one folder per run, and batches of runs from a JSONL file.

A run folder holds image.png, pointmap.png (not for the no-point-map ablation) and settings.json
(every setting, the seed and the mesh's SHA-256), so that `python -m refany3d eval --batch` and
people can redo or measure it.
Batches split their jobs across processes under `accelerate launch` and skip finished runs, so an
interrupted batch resumes where it stopped.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from refany3d.cameras import ORBIT_RADIUS
from refany3d.errors import (InputError, JobsFailed, RefAny3DError, is_out_of_memory, out_of_memory_message,
                             require_finite, require_whole_number)
from refany3d.offload import release_accelerator_memory

RUN_FILES = ("image.png", "pointmap.png", "settings.json")
MAX_SEED = 2**63 - 1  # the largest seed torch.Generator.manual_seed takes as a signed 64-bit integer


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Job:
    """One generation: a mesh, a prompt and every view and sampler setting."""

    mesh: str
    prompt: str
    seed: int | None = None
    candidates: int = 1  # sample seeds seed..seed+K-1 and keep the most self-consistent (see generate_from_mesh)
    name: str | None = None
    n_views: int = 8
    radius: float = ORBIT_RADIUS
    pitch: float = 0.0
    y_rotation: float = 0.0
    height: int = 512
    width: int = 512
    condition_size: int = 512
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    image_guidance_scale: float = 2.0
    max_sequence_length: int = 512
    mode: str = "exact"
    cache_refresh_every: int = 0  # cached mode only: recompute the views' keys/values every k steps
    group_mask: bool = True  # False only for models trained without it (`train --no-group-mask`)
    pointmap_branch: bool = True  # False only for `train --no-pointmap-branch` models: an image alone (faithful mode)

    def __post_init__(self) -> None:
        """Check each setting's type and sign, so a bad jobs line fails before any model loads;
        the model-dependent rules (sizes that are multiples of the latent patch) stay with the pipeline."""
        for name in ("mesh", "prompt", "mode"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("n_views", "height", "width", "condition_size", "num_inference_steps", "max_sequence_length",
                     "candidates"):
            require_whole_number(name, getattr(self, name), minimum=1)
        require_whole_number("cache_refresh_every", self.cache_refresh_every)
        for name in ("radius", "pitch", "y_rotation", "guidance_scale", "image_guidance_scale"):
            require_finite(name, getattr(self, name))
        for name in ("group_mask", "pointmap_branch"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.seed is not None and (not _is_integer(self.seed) or not 0 <= self.seed <= MAX_SEED - self.candidates + 1):
            raise InputError(f"seed must be a whole number from 0 to {MAX_SEED}"
                             + (f" less {self.candidates - 1} (one seed per candidate)" if self.candidates > 1 else "")
                             + f", got {self.seed!r}")
        if self.name is not None and (not isinstance(self.name, str) or self.name in ("", ".", "..")
                                      or Path(self.name).name != self.name or "\\" in self.name):
            raise InputError(f"name must be a folder name without '/' (it is created under the output folder), "
                             f"got {self.name!r}")

    @classmethod
    def from_dict(cls, data: dict, where: str = "job", defaults: dict | None = None) -> Job:
        """A job from its JSON object; settings it leaves out come from `defaults`, then the class."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for required in ("mesh", "prompt"):
            if not data.get(required):
                raise InputError(f"{where}: '{required}' is required")
        try:
            return cls(**{**(defaults or {}), **data})
        except InputError as err:
            raise InputError(f"{where}: {err}") from None

    def sampler_kwargs(self) -> dict:
        """The settings `generate_from_mesh` takes as keywords; the rest (the mesh and prompt, which
        it takes first, the seed and candidates, which become its generators, and the run's folder
        name) `run_job` handles."""
        handled_by_run_job = {"mesh", "prompt", "seed", "candidates", "name"}
        return {k: v for k, v in asdict(self).items() if k not in handled_by_run_job}


def read_jobs(path: str | Path, defaults: dict | None = None) -> list[Job]:
    """Parse a JSONL file of jobs (one JSON object per line; blank lines and # comments skipped).

    `defaults` fills the settings a line leaves out (the CLI passes the model's own)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise InputError(f"cannot read jobs file {str(path)!r}: {err.strerror}") from None
    jobs = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path.name} line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(data, dict):
            raise InputError(f"{path.name} line {number}: expected a JSON object")
        job = Job.from_dict(data, f"{path.name} line {number}", defaults)
        if not Path(job.mesh).is_absolute():
            job.mesh = str((path.parent / job.mesh).resolve())
        jobs.append(job)
    return jobs


def run_is_complete(folder: Path, job: Job, model: dict[str, str] | None = None) -> bool:
    """The folder holds this job's run: its files, and settings.json records the job's settings
    and `model` (the pipeline's source: a job edited since, or run with other weights, is run
    again; a random seed is whatever the run drew)."""
    files = RUN_FILES if job.pointmap_branch else tuple(name for name in RUN_FILES if name != "pointmap.png")
    if not all((folder / name).is_file() for name in files):
        return False
    try:
        recorded = json.loads((folder / "settings.json").read_text()).get("settings", {})
    except (OSError, ValueError):
        return False
    wanted = {k: v for k, v in asdict(job).items() if not (k == "seed" and v is None)}
    if model:
        wanted["model"] = model
    return all(recorded.get(k) == v for k, v in wanted.items())


def run_job(pipe, job: Job, folder: str | Path, generator_device: str = "cpu", callback: Callable | None = None) -> Path:
    """Render the job's views, sample, and write the run folder; returns the folder."""
    import torch

    from refany3d.alignment import candidate_record
    from refany3d.outputs import write_settings_json

    folder = Path(folder)
    seed = job.seed if job.seed is not None else random.randint(0, 2**31 - 1)  # short enough to type again
    generators = [torch.Generator(generator_device).manual_seed(seed + k) for k in range(job.candidates)]
    out = pipe.generate_from_mesh(job.mesh, job.prompt, generator=generators if job.candidates > 1 else generators[0],
                                  callback=callback, **job.sampler_kwargs())
    folder.mkdir(parents=True, exist_ok=True)
    out.image.save(folder / "image.png")
    if out.pointmap is not None:
        out.pointmap.save(folder / "pointmap.png")
    settings = {**asdict(job), "seed": seed, "mesh": str(job.mesh)}
    if pipe.source:  # so a rerun with other weights is not taken for done (run_is_complete)
        settings["model"] = pipe.source
    if out.candidates is not None:
        settings.update(candidate_record(seed, out.settings["candidate"], out.candidates))
    # settings.json last: its presence marks the run complete (see run_is_complete).
    write_settings_json(settings, folder / "settings.json", mesh_path=job.mesh)
    return folder


def run_folder_name(index: int, job: Job) -> str:
    return job.name or f"job_{index:05d}"


def run_jobs(pipe, jobs: list[Job], out_dir: str | Path, process_index: int = 0, num_processes: int = 1,
             generator_device: str = "cpu", log: Callable[[str], None] = print) -> list[Path]:
    """Run this process's share of the jobs (every num_processes-th), skipping finished runs.

    A job that fails (an asset not visible at its radius, or too large for the memory, say) is
    logged and the others still run; a JobsFailed at the end names the failed ones, which a rerun retries."""
    out_dir = Path(out_dir)
    names = [run_folder_name(i, job) for i, job in enumerate(jobs)]
    if len(set(names)) != len(names):
        raise InputError("job names must be unique (two jobs would write the same folder)")
    done, failed = [], []
    for index in range(process_index, len(jobs), num_processes):
        folder = out_dir / names[index]
        if run_is_complete(folder, jobs[index], pipe.source):
            log(f"[{index + 1}/{len(jobs)}] {folder.name}: already done, skipped")
            done.append(folder)
            continue
        try:
            run_job(pipe, jobs[index], folder, generator_device)
        except Exception as err:
            if isinstance(err, RefAny3DError):
                reason = str(err)
            elif is_out_of_memory(err):  # a larger job than the others; the smaller ones still fit
                release_accelerator_memory()
                reason = out_of_memory_message(err)
            else:
                raise
            log(f"[{index + 1}/{len(jobs)}] {folder.name}: failed: {reason}")
            failed.append(f"{folder.name}: {reason}")
            continue
        log(f"[{index + 1}/{len(jobs)}] {folder.name}: written")
        done.append(folder)
    if failed:
        raise JobsFailed(f"{len(failed)} of {len(done) + len(failed)} jobs failed, the first {failed[0]}"
                         + (". The others are written: fix" if done else ". Fix") + " the failed jobs and rerun "
                         "the same command (finished runs are skipped)")
    return done
