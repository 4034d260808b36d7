"""Command line: `python -m refany3d {render,generate,eval,...}`, mirroring the Python API.

Each subcommand has an `_add_<name>` function that declares its arguments and a `_run_<name>`
function that calls the library. Errors refany3d raises on purpose, and the operating system's
(a folder that cannot be written, a disk that is full), become one line on stderr and exit
status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager

from refany3d.cameras import DEFAULT_FOV_Y_DEG, ORBIT_RADIUS
from refany3d.errors import RefAny3DError, RefAny3DWarning, is_out_of_memory, out_of_memory_message
from refany3d.offload import OFFLOAD_MODES
from refany3d.quantization import QUANTIZE_MODES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m refany3d", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def _flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Setting name -> the flag that sets it, where they are spelled differently (num_inference_steps
    -> --steps), so that errors raised in the API's terms name what the user typed."""
    return {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings and "_" in a.dest}


def _in_flag_terms(message: str, flags: dict[str, str]) -> str:
    return re.sub(r"\b[a-z]+(?:_[a-z]+)+\b", lambda m: flags.get(m.group(0), m.group(0)), message)


def run_reporting_errors(run: Callable[[], int | None], describe: Callable[[str], str] = str) -> int:
    """Run a command: refany3d's own errors, the operating system's and running out of memory become
    one line on stderr (`describe` may reword it) and exit status 2; anything else is a bug and
    keeps its traceback.
    Its warnings (RefAny3DWarning) become "warning: ..." lines, each time they occur.
    The benchmarks' scripts run through it too."""
    try:
        with _warnings_as_lines(describe):
            return int(run() or 0)
    except RefAny3DError as err:
        print(f"error: {describe(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        print(f"error: {describe(out_of_memory_message(err))}", file=sys.stderr)
        return 2


@contextmanager
def _warnings_as_lines(describe: Callable[[str], str]):
    """Show refany3d's warnings as one plain line on stderr, every time (a batch may warn per job)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", RefAny3DWarning)
        show_other = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, RefAny3DWarning):
                print(f"warning: {describe(str(message))}", file=sys.stderr)
            else:
                show_other(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_ablation_flags(parser: argparse.ArgumentParser, verb: str) -> None:
    """--no-group-mask and --no-pointmap-branch, for models trained as the paper's ablations. Left
    out (None), the model's settings.json decides."""
    parser.add_argument("--no-group-mask", dest="group_mask", action="store_false", default=None,
                        help=f"{verb} with full attention among all branches, for models trained with "
                        "`train --no-group-mask` (default: as the model's settings.json says)")
    parser.add_argument("--no-pointmap-branch", dest="pointmap_branch", action="store_false", default=None,
                        help=f"{verb} the image alone (no point map), for models trained with "
                        "`train --no-pointmap-branch` (default: as the model's settings.json says)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # settings given as flags are named as flags; a jobs file's keys keep the API's names
    flags = getattr(args, "flag_names", None) if not getattr(args, "jobs", None) else None
    return run_reporting_errors(lambda: args.run(args), (lambda m: _in_flag_terms(m, flags)) if flags else str)


# Subcommands register themselves below, one section each.
_SUBCOMMANDS: list = []


# ---------------------------------------------------------------------------------- generate
def _add_generate(sub) -> None:
    from refany3d.batch import Job

    p = sub.add_parser(
        "generate",
        help="generate an image of a mesh in a described scene, with its point map",
        description="Render the mesh's reference views and sample an image + point map. "
        "With --jobs, run a JSONL batch (data-parallel under `accelerate launch`).",
    )
    p.add_argument("mesh", nargs="?", help="mesh file (GLB, glTF, OBJ, PLY, STL, OFF or a .zip)")
    p.add_argument("--prompt", help="what the scene should show")
    p.add_argument("--out", required=True, help="output folder (a batch writes one subfolder per job)")
    p.add_argument("--jobs", help="JSONL file, one job per line: {\"mesh\": ..., \"prompt\": ..., \"seed\": ...}; "
                   "a relative mesh path is read from the jobs file's folder")
    p.add_argument("--seed", type=int, help="random seed (default: a random one, recorded in settings.json)")
    p.add_argument("--candidates", type=int, help="sample K seeds (seed, seed+1, ...) and keep the one whose point map "
                   "is the most rigid view of the mesh (default 1; settings.json records the chosen seed)")
    defaults = Job(mesh="", prompt="")
    for flag, field_name, kind in (("--radius", "radius", float), ("--pitch", "pitch", float),
                                   ("--y-rotation", "y_rotation", float)):
        default = getattr(defaults, field_name)
        p.add_argument(flag, dest=field_name, type=kind, default=default, help=f"default {default}")
    # Settings the model was trained for default to the model's own (see recommended_settings).
    for flag, field_name, kind in (
        ("--views", "n_views", int),
        ("--height", "height", int),
        ("--width", "width", int),
        ("--condition-size", "condition_size", int),
        ("--steps", "num_inference_steps", int),
        ("--guidance", "guidance_scale", float),
        ("--image-guidance", "image_guidance_scale", float),
        ("--max-sequence-length", "max_sequence_length", int),
    ):
        p.add_argument(flag, dest=field_name, type=kind, help=f"default: the model's ({getattr(defaults, field_name)} "
                       "for FLUX.1-dev)")
    p.add_argument("--mode", choices=("faithful", "exact", "cached"),
                   help=f"sampler: {defaults.mode} (default; the faithful output, faster), faithful (the reference "
                   "path; the default with --no-pointmap-branch) or cached (approximate, fastest)")
    p.add_argument("--cache-refresh-every", dest="cache_refresh_every", type=int, default=defaults.cache_refresh_every,
                   help="cached mode: recompute the views' keys/values every K steps (default 0: first step only; "
                   "smaller is slower and closer to exact)")
    add_ablation_flags(p, "sample")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the fast modes' transformer blocks (pays off over many images of one size)")
    p.add_argument("--base-model", help="diffusers FLUX folder or hub id (default: $REFANY3D_BASE_MODEL, else the "
                   "base that --ref-model belongs with, else the embedded model, else black-forest-labs/FLUX.1-dev)")
    p.add_argument("--ref-model", help="RefAny3D weights folder or hub id (default: $REFANY3D_REF_MODEL, else the "
                   "weights that --base-model belongs with, else the embedded model, else JudgementH/RefAny3D)")
    p.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    p.add_argument("--cpu-offload", nargs="?", const="model", choices=OFFLOAD_MODES,
                   help="keep weights on the CPU between uses: model (each model visits the GPU for its stage; "
                   "~40 GB GPUs for FLUX.1-dev; the default of a bare --cpu-offload) or blocks (the transformer's "
                   "blocks one at a time too; 16-24 GB GPUs, slower)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES,
                   help="store the transformer's and T5's weights in int8 (half the memory: FLUX.1-dev fits a 24 GB "
                   "GPU, or 16 GB with --cpu-offload; needs torchao)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="weights' precision (default: bfloat16 on a GPU, float32 on the CPU; FLUX overflows in float16)")
    p.set_defaults(run=_run_generate, flag_names=_flag_names(p))


@contextmanager
def _output_folder(path: str):
    """Create `path` before the model loads, and remove it again if the command fails before
    writing into it, so a failed run leaves no empty folder behind."""
    created = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    try:
        yield
    except BaseException:
        if created and os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        raise


def _run_generate(args) -> int:
    import json
    from dataclasses import fields

    from tqdm.auto import tqdm

    from refany3d.batch import Job, read_jobs, run_job, run_jobs
    from refany3d.errors import InputError
    from refany3d.pipeline import RefAny3DPipeline, default_model, recommended_settings

    if args.jobs and args.mesh:
        raise InputError("give either a MESH or --jobs, not both")
    if not args.jobs and not (args.mesh and args.prompt):
        raise InputError("give a MESH and --prompt (or --jobs FILE)")
    base, ref = default_model(base=args.base_model, ref=args.ref_model)
    given = {f.name: getattr(args, f.name) for f in fields(Job) if getattr(args, f.name, None) is not None}
    settings = {**recommended_settings(ref), **given}  # an ablation model's settings.json names its flags
    if settings.get("pointmap_branch") is False:
        settings.setdefault("mode", "faithful")  # the only sampler of the ablation
    settings.pop("mesh", None)
    # The mesh's absolute path goes into settings.json, so `eval --batch` finds it from anywhere.
    jobs = read_jobs(args.jobs, defaults=settings) if args.jobs else [Job(mesh=os.path.abspath(args.mesh), **settings)]
    for job in jobs:  # before the model loads, which can take minutes
        if not os.path.isfile(job.mesh):
            raise InputError(f"mesh file not found: {job.mesh}")
    with _output_folder(args.out):  # an unwritable --out fails now, not after sampling
        from accelerate import PartialState

        state = PartialState(cpu=args.device == "cpu")
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != state.num_processes:  # each process would run every job, into the same folders
            raise InputError(f"launched as {launched} processes, but they did not join one group (each sees "
                             f"{state.num_processes}); on GPUs use `accelerate launch --multi_gpu`, on CPUs "
                             "`torchrun --nproc_per_node N -m refany3d generate ... --device cpu`")
        device = args.device if args.device and state.num_processes == 1 else state.device
        pipe = RefAny3DPipeline.from_pretrained(base, ref, device=device, dtype=args.dtype,
                                                cpu_offload=args.cpu_offload, quantize=args.quantize)
        pipe.enable_compile(args.compile)
        if args.jobs:
            run_jobs(pipe, jobs, args.out, state.process_index, state.num_processes,
                     log=lambda line: print(f"[process {state.process_index}] {line}"))
            return 0
        job = jobs[0]
        with tqdm(total=job.num_inference_steps * job.candidates, desc="sampling", unit="step") as bar:
            folder = run_job(pipe, job, args.out, callback=lambda step, total: bar.update(1))
        written = [name for name in ("image.png", "pointmap.png", "settings.json") if (folder / name).is_file()]
        print("wrote " + ", ".join(str(folder / name) for name in written))
        if job.candidates > 1:
            settings = json.loads((folder / "settings.json").read_text())["settings"]
            print(f"kept seed {settings['chosen_seed']}, the most rigid of {job.candidates} candidates")
        return 0


_SUBCOMMANDS.append(_add_generate)


# ---------------------------------------------------------------------------------- render
def _add_render(sub) -> None:
    p = sub.add_parser(
        "render",
        help="render a mesh's reference views (RGB + point maps) as the model sees them",
        description="Write rgb_XX.png, pointmap_XX.png, contact_sheet.png and views.json.",
    )
    p.add_argument("mesh", help="mesh file (GLB, glTF, OBJ, PLY, STL, OFF or a .zip)")
    p.add_argument("--views", type=int, default=8, help="number of reference views (default 8)")
    p.add_argument("--resolution", type=int, default=512, help="square image size in pixels (default 512)")
    p.add_argument("--radius", type=float, default=ORBIT_RADIUS,
                   help=f"camera distance in normalized units (default {ORBIT_RADIUS:g})")
    p.add_argument("--pitch", type=float, default=0.0, help="camera elevation in degrees (default 0)")
    p.add_argument("--y-rotation", type=float, default=0.0, help="point-map rotation about +y in degrees")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(run=_run_render)


def _run_render(args) -> int:
    from refany3d.views import render_views

    views = render_views(args.mesh, n_views=args.views, resolution=args.resolution, radius=args.radius,
                         pitch=args.pitch, y_rotation=args.y_rotation)
    note = views.blind_views_note()
    if note:
        warnings.warn(note, RefAny3DWarning, stacklevel=1)
    views.save(args.out)
    print(f"wrote {len(views.rgb)} views of {args.mesh} to {args.out} (contact_sheet.png, views.json)")
    return 0


_SUBCOMMANDS.append(_add_render)


# --- eval (issue 6: alignment analysis) -----------------------------------------------------


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="recover the camera from a predicted point map and score the match",
                       description="Recover the generated image's camera from its point map (RANSAC "
                       "PnP) and score it against the asset re-rendered there.")
    p.add_argument("mesh", nargs="?", help="the asset's mesh file (with --batch: overrides settings.json)")
    p.add_argument("pointmap", nargs="?", help="the predicted point map (PNG)")
    p.add_argument("--image", help="the generated image (PNG), for image IoU and colour agreement")
    p.add_argument("--y-rotation", type=float, help="y rotation the views were made with (deg; default 0)")
    p.add_argument("--fov", type=float, default=DEFAULT_FOV_Y_DEG,
                   help=f"vertical field of view (deg) of the image (default {DEFAULT_FOV_Y_DEG:g})")
    p.add_argument("--estimate-focal", action="store_true", help="estimate the focal length instead")
    p.add_argument("--inlier-threshold", type=float, metavar="PX",
                   help="RANSAC inlier threshold in pixels (default: scaled with the image size)")
    p.add_argument("--seed", type=int, default=0, help="RANSAC seed (default 0)")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON to OUT ('-' for stdout)")
    p.add_argument("--overlay", metavar="PNG", help="write the re-rendered asset over the image")
    p.add_argument("--batch", metavar="DIR", help="evaluate every run folder in DIR (image.png, "
                   "pointmap.png, settings.json); writes DIR/alignment.csv unless --csv")
    p.add_argument("--csv", metavar="OUT", help="with --batch: where to write the CSV")
    p.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    import csv
    import json
    from pathlib import Path

    from refany3d import alignment
    from refany3d.errors import InputError

    options = {"fov_y_deg": args.fov, "estimate_focal": args.estimate_focal,
               "inlier_threshold_px": args.inlier_threshold, "seed": args.seed}
    if args.batch:
        if args.pointmap:
            raise InputError("with --batch give at most a MESH, not a point map")
        ignored = [flag for flag, value in (("--image", args.image), ("--json", args.json), ("--overlay", args.overlay),
                                            ("--y-rotation", args.y_rotation)) if value is not None]
        if ignored:
            raise InputError(f"{', '.join(ignored)} do(es) not apply to --batch, which reads each run's own files and "
                             "settings.json")
        results = alignment.align_runs(args.batch, mesh=args.mesh, **options)
        out = Path(args.csv) if args.csv else Path(args.batch) / "alignment.csv"
        with out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=alignment.BATCH_COLUMNS)
            writer.writeheader()
            writer.writerows(alignment.batch_row(run, report) for run, report in results)
        print(alignment.batch_summary(results))
        print(f"wrote {out}")
        return 0
    if not (args.mesh and args.pointmap):
        raise InputError("eval needs MESH and POINTMAP_PNG, or --batch DIR")
    if args.overlay and Path(args.overlay).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise InputError(f"--overlay must name a .png, .jpg or .webp file, got {args.overlay!r}")
    report = alignment.align(args.mesh, args.pointmap, args.image, y_rotation=args.y_rotation or 0.0, **options)
    if args.overlay:
        overlay = report.overlay()
        if overlay is None:
            print(f"no overlay: {report.reason}", file=sys.stderr)
        else:
            overlay.save(args.overlay)
    if args.json == "-":
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary())
        if args.json:
            Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
            print(f"wrote {args.json}")
    return 0


_SUBCOMMANDS.append(_add_eval)


# --- make-data, train (issue 7: training) ---------------------------------------------------


def _add_make_data(sub) -> None:
    p = sub.add_parser("make-data", help="write procedural training samples (asset views + target scenes)",
                       description="Write a dataset in refany3d's sample format (see refany3d/data.py).")
    p.add_argument("out", help="dataset folder (created; to add samples to an existing one, give its settings and "
                   "another --seed: the same seed writes the same samples again)")
    p.add_argument("--count", type=int, default=1000, help="number of target samples (default 1000)")
    p.add_argument("--views", type=int, default=4, help="reference views per asset (default 4)")
    p.add_argument("--resolution", type=int, default=64, help="image size in pixels (default 64)")
    p.add_argument("--targets-per-asset", type=int, default=4, help="scenes per asset (default 4)")
    p.add_argument("--split", choices=("train", "val"), default="train", help="val: held-out assets and scene styles")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--asset-size", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="the asset's bounding-sphere diameter as a share of the image width (default 0.35 0.7)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes writing samples in parallel (default 1; the files are the same for any number)")
    p.set_defaults(run=_run_make_data)


def _run_make_data(args) -> int:
    from refany3d.data import make_dataset

    size = {} if args.asset_size is None else {"asset_size": tuple(args.asset_size)}
    root = make_dataset(args.out, args.count, n_views=args.views, resolution=args.resolution, seed=args.seed,
                        targets_per_asset=args.targets_per_asset, split=args.split, progress=True,
                        workers=args.workers, **size)
    print(f"wrote {args.count} samples to {root}")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a RefAny3D model (stage 0 base + stage 1 fine-tune)",
                       description="Stage 0 trains a small FLUX-architecture base (vae, base); stage 1 "
                       "(refany3d) trains the LoRA adapters and domain embedder, on any FLUX base. "
                       "Rerun the same command to resume. Multi-GPU: `accelerate launch -m refany3d train ...`.")
    p.add_argument("data", nargs="+", help="dataset folder(s) written by make-data or write_real_sample")
    p.add_argument("--out", required=True, help="output folder: base/, ref/, loss_curve.png, checkpoints/")
    p.add_argument("--preset", choices=("embedded", "gpu", "tiny"), default="embedded",
                   help="model size and step counts (embedded: the shipped default; gpu: a larger model "
                   "for GPU runs, give it more steps; tiny: for smoke tests)")
    p.add_argument("--stages", default="vae,base,refany3d", help="comma-separated subset of vae,base,refany3d")
    p.add_argument("--base-model", help="stage 1 on this diffusers FLUX base (folder or hub id) instead of OUT/base")
    p.add_argument("--init-ref", help="stage 1 starts from these RefAny3D weights (folder or hub id): continue a "
                   "finished run or fine-tune published weights (their LoRA rank is kept)")
    for flag, dest, kind in (
        ("--resolution", "resolution", int), ("--condition-size", "condition_size", int),
        ("--views", "n_views", int), ("--batch-size", "batch_size", int),
        ("--vae-steps", "vae_steps", int), ("--base-steps", "base_steps", int), ("--ref-steps", "ref_steps", int),
        ("--lr", "ref_lr", float), ("--vae-lr", "vae_lr", float), ("--base-lr", "base_lr", float),
        ("--lora-rank", "lora_rank", int), ("--lora-alpha", "lora_alpha", int),
        ("--optimizer", "optimizer", str), ("--mixed-precision", "mixed_precision", str),
        ("--checkpoint-every", "checkpoint_every", int), ("--seed", "seed", int),
        ("--gradient-accumulation", "gradient_accumulation", int), ("--num-workers", "num_workers", int),
    ):
        p.add_argument(flag, dest=dest, type=kind, help="overrides the preset")
    for stage, dest in (("vae", "vae_minutes"), ("base", "base_minutes"), ("ref", "ref_minutes")):
        p.add_argument(f"--{stage}-minutes", dest=dest, type=float, metavar="M",
                       help=f"time budget of the {stage} stage: after a few timed steps its step count is cut to "
                       "what fits in M minutes (the learning rate still decays to its end)")
    p.add_argument("--no-group-mask", dest="group_mask", action="store_false", default=None,
                   help="ablation: full attention between all branches")
    p.add_argument("--no-pointmap-branch", dest="pointmap_branch", action="store_false", default=None,
                   help="ablation: stage 1 without the point-map target and views (RGB target from RGB views only)")
    p.add_argument("--asset-loss-weight", type=float, help="not in the release (default 1): stage 1's RGB loss "
                   "counts the target tokens that show the asset (mask.png) this many times")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile each stage's training step (a few minutes of compiling, then faster steps)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="stage 1: recompute each transformer block in the backward pass instead of keeping its "
                   "activations (slower steps, far less memory: needed for FLUX.1-dev)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES,
                   help="stage 1: load the base's transformer and T5 with int8 weights (half their memory; the "
                   "LoRAs and domain embedder train in full precision on top; needs torchao)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (1 is fastest on a busy machine)")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from dataclasses import fields
    from pathlib import Path

    import torch

    from refany3d.train import TrainConfig, preset_config, train

    if args.threads:
        torch.set_num_threads(args.threads)
    # every TrainConfig setting a flag gave (each flag's dest is the setting's name)
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                 if f.name not in ("data", "stages") and getattr(args, f.name, None) is not None}
    config = preset_config(args.preset, data=args.data, output_dir=args.out,
                           stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()), **overrides)
    summary = train(config)
    stages = ", ".join(f"{name}: {info['steps']} steps" for name, info in summary["stages"].items())
    out = Path(args.out)
    written = [str(out / name) for name in ("base", "ref", "settings.json", "loss_curve.png") if (out / name).exists()]
    print(f"{args.out} holds {', '.join(written)} ({stages})")
    return 0


_SUBCOMMANDS += [_add_make_data, _add_train]
