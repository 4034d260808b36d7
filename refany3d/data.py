"""Training data in the release's format: an asset's reference views plus a target image of it in a scene.

A sample pairs an asset (N unlit RGB views and N point maps on the reference orbit) with a target:
an image showing the asset somewhere in a scene, the caption of that image, and the *aligned*
target point map, i.e. the asset's normalized coordinates rendered with the target's own camera
(white background). Two producers write samples:

- `make_dataset` writes procedural assets and scenes (`refany3d.procedural`: textured primitives,
  patterned floor and wall, distractor shapes, a soft shadow) so that a small model can be trained
  offline;
- `write_real_sample` is the paper's route for real photographs: given the image, the mesh, the
  camera intrinsics and the object pose (what a pose estimator outputs) it renders the aligned
  point map.

On-disk format (`FORMAT`), one folder per dataset:

    dataset.json                    {"format", "resolution", "n_views", "split", "seed", "asset_size", "count"}
    assets/<asset_id>/mesh.ply      the asset (vertex colours), or the real mesh's own file
    assets/<asset_id>/rgb_<k>.png   reference view k (unlit RGB, white background)
    assets/<asset_id>/pointmap_<k>.png   reference point map k (normalized coordinates as RGB)
    assets/<asset_id>/meta.json     {"azimuths", "cameras", "normalization", "description"}
    samples/<sample_id>/image.png   the target image
    samples/<sample_id>/pointmap.png  the aligned target point map (white background)
    samples/<sample_id>/mask.png    where the asset is visible in the target
    samples/<sample_id>/meta.json   {"asset", "caption", "camera", "viewpoint", "scene"}

Several samples share an asset (its reference views are rendered once). `SampleDataset` streams
the samples of one or more such folders as tensors for training.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from refany3d.cameras import Camera
from refany3d.errors import InputError, require_whole_number
from refany3d.procedural import DEFAULT_ASSET_SIZE, TargetSample, compose_target, describe_asset, random_asset

FORMAT = "refany3d-samples/1"

# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _to_png(array: np.ndarray, path: Path) -> None:
    if array.dtype != np.uint8:
        array = np.clip(np.asarray(array) * 255.0, 0, 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1))


def write_asset(
    root: Path, asset_id: str, mesh, n_views: int, resolution: int, description: str,
    mesh_file: Path | None = None, renderer=None,
) -> Path:
    """Render and write an asset's reference views (and its mesh) under root/assets/<asset_id>."""
    from refany3d.views import render_views

    folder = root / "assets" / asset_id
    folder.mkdir(parents=True, exist_ok=True)
    views = render_views(mesh, n_views=n_views, resolution=resolution, renderer=renderer)
    for k in range(n_views):
        views.rgb[k].save(folder / f"rgb_{k}.png")
        _to_png(views.pointmap_xyz[k], folder / f"pointmap_{k}.png")
    if mesh_file is None:
        mesh.export(folder / "mesh.ply")
        mesh_name = "mesh.ply"
    else:
        mesh_name = str(Path(mesh_file).resolve())
    _write_json(folder / "meta.json", {
        "mesh": mesh_name,
        "description": description,
        "azimuths": list(views.azimuths),
        "cameras": [c.to_dict() for c in views.cameras],
        "normalization": views.normalization.to_dict(),
    })
    return folder


def write_sample(root: Path, sample_id: str, asset_id: str, target: TargetSample) -> Path:
    """Write one target (image, aligned point map, mask, meta) under root/samples/<sample_id>."""
    folder = root / "samples" / sample_id
    folder.mkdir(parents=True, exist_ok=True)
    _to_png(target.image, folder / "image.png")
    _to_png(target.pointmap, folder / "pointmap.png")
    _to_png(target.mask.astype(np.uint8) * 255, folder / "mask.png")
    _write_json(folder / "meta.json", {
        "asset": asset_id,
        "caption": target.caption,
        "viewpoint": target.viewpoint,
        "camera": target.camera.to_dict(),
        "scene": target.scene,
    })
    return folder


def _check_same_format(root: Path, **fields: Any) -> None:
    """Samples added to an existing dataset must match it, or training would mix sizes silently."""
    if root.exists() and not root.is_dir():
        raise InputError(f"{root} is a file, not a dataset folder")
    manifest = root / "dataset.json"
    if not manifest.is_file():
        return
    try:
        existing = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{manifest} cannot be read ({err}); write to a new folder") from None
    different = [f"{k} {existing[k]} (asked: {v})" for k, v in fields.items() if k in existing and existing[k] != v]
    if different:
        raise InputError(f"{root} already holds a dataset with {', '.join(different)}; write to a new folder, "
                         "or add samples with the same settings and another --seed")


def _write_manifest(root: Path, **fields: Any) -> None:
    manifest = root / "dataset.json"
    data = json.loads(manifest.read_text()) if manifest.exists() else {"format": FORMAT}
    data.update(fields)
    data["count"] = len(list((root / "samples").glob("*/meta.json"))) if (root / "samples").exists() else 0
    _write_json(manifest, data)


def make_dataset(
    out_dir: str | Path,
    count: int,
    n_views: int = 4,
    resolution: int = 64,
    seed: int = 0,
    targets_per_asset: int = 4,
    split: str = "train",
    progress: bool = False,
    asset_size: tuple[float, float] = DEFAULT_ASSET_SIZE,
    workers: int = 1,
) -> Path:
    """Write `count` procedural samples. `split="val"` draws held-out assets and scene styles.

    `asset_size` (MIN, MAX) bounds the asset's bounding-sphere diameter as a share of the target's
    width; the default puts it on a median 7 % of the pixels.

    Assets come from a random stream keyed by (split, seed, index), so train and val never share
    one, and val scenes use floor/wall colour pairs that train never shows. The same key makes
    every asset and its targets independent of the others, so `workers` processes (each with its
    own renderer) write the same files as one.
    """
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from refany3d.images import MAX_IMAGE_SIDE

    if split not in ("train", "val"):
        raise InputError(f"split must be 'train' or 'val', got {split!r}")
    for name, value, low in (("count", count, 1), ("views", n_views, 1), ("targets per asset", targets_per_asset, 1),
                             ("workers", workers, 1), ("seed", seed, 0)):
        require_whole_number(name, value, minimum=low)
    require_whole_number("resolution", resolution, minimum=16, maximum=MAX_IMAGE_SIDE)
    smallest, largest = (float(v) for v in asset_size)
    if not 0.05 <= smallest <= largest <= 1.0:
        raise InputError("asset size must be MIN <= MAX within [0.05, 1] (a share of the image width), "
                         f"got {smallest:g} {largest:g}")
    root = Path(out_dir)
    _check_same_format(root, resolution=resolution, n_views=n_views, split=split)
    root.mkdir(parents=True, exist_ok=True)
    job = _AssetJob(root, count, n_views, resolution, seed, targets_per_asset, split, (smallest, largest))
    chunks = [range(a, min(a + _ASSETS_PER_CHUNK, job.n_assets)) for a in range(0, job.n_assets, _ASSETS_PER_CHUNK)]
    done = 0

    def report(written: int) -> None:
        nonlocal done
        done += written
        if progress:
            print(f"\r{done}/{count} samples", end="", flush=True)

    if workers == 1 or len(chunks) == 1:
        from refany3d.views import Renderer

        renderer = Renderer()
        for chunk in chunks:
            report(job(chunk, renderer))
    else:  # fresh processes: an OpenGL context does not survive a fork
        with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_write_in_worker, job, chunk) for chunk in chunks]
            try:
                for future in as_completed(futures):
                    report(future.result())
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
    if progress:
        print()
    _write_manifest(root, resolution=resolution, n_views=n_views, split=split, seed=seed, asset_size=[smallest, largest])
    return root


_ASSETS_PER_CHUNK = 8  # assets per task of a worker: small enough to spread, large enough to keep a renderer busy
_worker_renderer = None  # a worker process's offscreen renderer, made by its first task


@dataclass(frozen=True)
class _AssetJob:
    """Writes assets (by index) and their targets: picklable, so worker processes can run it."""

    root: Path
    count: int
    n_views: int
    resolution: int
    seed: int
    targets_per_asset: int
    split: str
    asset_size: tuple[float, float]

    @property
    def n_assets(self) -> int:
        return math.ceil(self.count / self.targets_per_asset)

    def __call__(self, assets: range, renderer) -> int:
        """Write the given assets and their targets; return how many targets were written."""
        held_out, written = self.split == "val", 0
        for a in assets:
            rng = np.random.default_rng([self.seed, 1 if held_out else 0, a])
            mesh, parts = random_asset(rng)
            description = describe_asset(parts)
            asset_id = f"{self.split}-{self.seed}-a{a:06d}"
            write_asset(self.root, asset_id, mesh, self.n_views, self.resolution, description, renderer=renderer)
            first = a * self.targets_per_asset
            for index in range(first, min(first + self.targets_per_asset, self.count)):
                target = compose_target(renderer, mesh, description, rng, self.resolution, held_out, asset_size=self.asset_size)
                write_sample(self.root, f"{self.split}-{self.seed}-s{index:06d}", asset_id, target)
                written += 1
        return written


def _write_in_worker(job: _AssetJob, assets: range) -> int:
    global _worker_renderer
    if _worker_renderer is None:
        from refany3d.views import Renderer

        _worker_renderer = Renderer()
    return job(assets, _worker_renderer)


def camera_from_object_pose(K: np.ndarray, rotation: np.ndarray, translation: np.ndarray, width: int, height: int, normalization) -> Camera:
    """The normalized-frame camera that sees the asset as a pose estimator reports it.

    The pose maps the mesh's own frame to OpenCV camera coordinates: x = R X + t. With
    X = Xn / s + c (normalized -> own), x = (R Xn + s (R c + t)) / s, and a pinhole projection
    ignores that overall 1/s, so the camera in the normalized frame has R and t' = s (R c + t).
    """
    K = np.asarray(K, dtype=np.float64)
    R = np.asarray(rotation, dtype=np.float64)
    t = np.asarray(translation, dtype=np.float64).reshape(3)
    if K.shape != (3, 3) or R.shape != (3, 3):
        raise InputError("intrinsics and rotation must be 3x3 matrices")
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0:
        raise InputError("object rotation must be a proper rotation matrix")
    s = float(normalization.scale)
    t_norm = s * (R @ np.asarray(normalization.center, dtype=np.float64) + t)
    if t_norm[2] <= 0:
        raise InputError("the object is behind the camera (translation z must be positive)")
    return Camera.from_opencv(R, t_norm, K, width, height)


def _square_around(mask: np.ndarray) -> tuple[int, int, int]:
    """(x0, y0, side) of the largest square in the image centred on the mask's bounding box, moved
    inside the image where the object sits near an edge."""
    height, width = mask.shape
    side = min(height, width)
    rows, cols = np.nonzero(mask)
    x0 = int(np.clip(round((cols.min() + cols.max() + 1 - side) / 2), 0, width - side))
    y0 = int(np.clip(round((rows.min() + rows.max() + 1 - side) / 2), 0, height - side))
    return x0, y0, side


def write_real_sample(
    out_dir: str | Path,
    image: str | Path | Image.Image,
    mesh_path: str | Path,
    K: np.ndarray,
    rotation: np.ndarray,
    translation: np.ndarray,
    caption: str,
    n_views: int = 4,
    resolution: int = 512,
    sample_id: str | None = None,
) -> Path:
    """Add a real photograph to a dataset: render its aligned point map from the object pose.

    `rotation`, `translation` map the mesh's own coordinates to OpenCV camera coordinates
    (x right, y down, z forward); `K` are the image's pixel intrinsics. A non-square photo is
    cropped to the largest square centred on the object as far as the photo allows (the recorded
    camera's principal point moves with it; meta.json's scene.crop is [x0, y0, side]), so the
    trainer's resize to its square size does not stretch it. Image and point map keep the
    photo's pixel scale; the trainer resizes both.
    """
    from refany3d.mesh import load_mesh
    from refany3d.views import Renderer

    root = Path(out_dir)
    _check_same_format(root, n_views=n_views, resolution=resolution)
    picture = image if isinstance(image, Image.Image) else Image.open(image)
    picture = picture.convert("RGB")
    mesh = load_mesh(mesh_path)
    from refany3d.mesh import normalization_of

    norm = normalization_of(mesh)
    camera = camera_from_object_pose(K, rotation, translation, picture.width, picture.height, norm)
    view = Renderer().render(mesh, camera)
    if not view.mask.any():
        raise InputError("the asset is not visible at the given pose and intrinsics")
    x0, y0, side = _square_around(view.mask)
    crop = (slice(y0, y0 + side), slice(x0, x0 + side))
    camera = replace(camera, cx=camera.cx - x0, cy=camera.cy - y0, width=side, height=side)
    stem = Path(mesh_path).stem
    # by content too: real data often names every mesh model.obj, and views must be of this one
    asset_id = f"real-{stem}-{hashlib.sha256(Path(mesh_path).read_bytes()).hexdigest()[:10]}"
    if not (root / "assets" / asset_id / "meta.json").exists():
        write_asset(root, asset_id, mesh, n_views, resolution, description=stem, mesh_file=Path(mesh_path))
    sample_id = sample_id or f"real-{stem}-{len(list((root / 'samples').glob('real-*'))) if (root / 'samples').exists() else 0:06d}"
    target = TargetSample(np.asarray(picture)[crop], view.pointmap_xyz[crop], view.mask[crop], caption, camera, "",
                          {"source": "real", "crop": [x0, y0, side]})
    folder = write_sample(root, sample_id, asset_id, target)
    _write_manifest(root, n_views=n_views, resolution=resolution)
    return folder


# ---------------------------------------------------------------------------------------------
# Reading and streaming
# ---------------------------------------------------------------------------------------------


def _read_image(path: Path, size: int, exact: bool = False) -> np.ndarray:
    """An RGB array at size x size; `exact` for point maps and masks, whose values must not blend
    (nearest-neighbour resizing), else bicubic."""
    img = Image.open(path).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.NEAREST if exact else Image.BICUBIC)
    return np.asarray(img)


def load_asset_views(folder: Path, size: int, n_views: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(rgb (V,H,W,3) uint8, pointmap (V,H,W,3) uint8, meta) of an asset's reference views."""
    meta = json.loads((folder / "meta.json").read_text())
    total = len(meta["azimuths"])
    if n_views is not None and (n_views > total or total % n_views):
        raise InputError(f"asset {folder.name} has {total} views, cannot take {n_views} evenly spaced ones")
    picks = range(0, total, total // (n_views or total))
    rgb = np.stack([_read_image(folder / f"rgb_{k}.png", size) for k in picks])
    pm = np.stack([_read_image(folder / f"pointmap_{k}.png", size, exact=True) for k in picks])
    return rgb, pm, meta


def list_samples(roots: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """(dataset root, sample folder) of every sample in some datasets, in a stable order."""
    found = []
    for root in map(Path, roots):
        if not (root / "dataset.json").exists():
            raise InputError(f"{root} is not a refany3d dataset (no dataset.json)")
        found += [(root, p.parent) for p in sorted((root / "samples").glob("*/meta.json"))]
    if not found:
        raise InputError(f"no samples found in {', '.join(map(str, roots))}")
    return found


def dataset_manifest(root: str | Path) -> dict[str, Any]:
    """A dataset's dataset.json: format, resolution, n_views, split, seed, count."""
    manifest = Path(root) / "dataset.json"
    if not manifest.is_file():
        raise InputError(f"{root} is not a refany3d dataset (no dataset.json)")
    try:
        return json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{manifest} cannot be read ({err})") from None


def other_asset_indices(assets: Sequence[str]) -> list[int]:
    """For each sample (given by its asset id), the next sample, cyclically, that shows a different
    asset: a held-out set puts several scenes of one asset side by side, and probes that swap in
    "another asset" must not pick the same one."""
    order = []
    for i, asset in enumerate(assets):
        j = next((j % len(assets) for j in range(i + 1, i + len(assets)) if assets[j % len(assets)] != asset), None)
        if j is None:
            raise InputError(f"all {len(assets)} samples show the same asset ({asset}); comparing with another "
                             "asset needs more samples (make-data writes each asset's scenes one after another)")
        order.append(j)
    return order


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (...,H,W,3) -> float (...,3,H,W) in [-1, 1], the VAE's input range."""
    t = torch.from_numpy(np.array(images, dtype=np.float32)).div(127.5).sub(1.0)
    return t.movedim(-1, -3)


class SampleDataset(IterableDataset):
    """Streams samples as tensors: an infinite, shuffled stream split over processes and workers.

    Items: {"image": (3,H,W), "pointmap": (3,H,W), "ref_rgb": (V,3,H,W), "ref_pointmap": (V,3,H,W)
    in [-1, 1], "mask": (1,H,W) in {0, 1} (where the asset shows), "caption": str, "sample"/"asset":
    their folders (keys for caches of encodings)}.
    `rank`/`world_size` give each training process a disjoint share.
    """

    def __init__(
        self,
        roots: Sequence[str | Path] | str | Path,
        resolution: int,
        n_views: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        repeat: bool = True,
        shuffle: bool = True,
        asset_cache: int = 256,
    ) -> None:
        roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
        self.samples = list_samples(roots)
        self.resolution, self.n_views, self.seed = resolution, n_views, seed
        self.rank, self.world_size, self.repeat, self.shuffle = rank, world_size, repeat, shuffle
        self._assets: OrderedDict[Path, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._asset_cache = asset_cache

    def __len__(self) -> int:
        return len(self.samples)

    def _asset(self, folder: Path) -> tuple[np.ndarray, np.ndarray]:
        if folder not in self._assets:
            rgb, pm, _ = load_asset_views(folder, self.resolution, self.n_views)
            self._assets[folder] = (rgb, pm)
            if len(self._assets) > self._asset_cache:
                self._assets.popitem(last=False)
        return self._assets[folder]

    def item(self, index: int) -> dict[str, Any]:
        """One sample by index (deterministic; used by evaluation)."""
        root, folder = self.samples[index]
        meta = json.loads((folder / "meta.json").read_text())
        rgb, pm = self._asset(root / "assets" / meta["asset"])
        return {
            "sample": str(folder),
            "asset": str(root / "assets" / meta["asset"]),
            "image": _to_tensor(_read_image(folder / "image.png", self.resolution)),
            "pointmap": _to_tensor(_read_image(folder / "pointmap.png", self.resolution, exact=True)),
            "mask": torch.from_numpy(_read_image(folder / "mask.png", self.resolution, exact=True)[None, ..., 0] > 127).float(),
            "ref_rgb": _to_tensor(rgb),
            "ref_pointmap": _to_tensor(pm),
            "caption": meta["caption"],
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        shard, n_shards = self.rank * workers + worker, self.world_size * workers
        epoch = 0
        while True:
            order = list(range(len(self.samples)))
            if self.shuffle:
                random.Random(self.seed * 100_003 + epoch).shuffle(order)
            # a shard with no sample of its own (more loader workers or ranks than samples) repeats
            # one rather than yield nothing, which would leave the loader waiting for good
            for index in order[shard::n_shards] or [order[shard % len(order)]]:
                yield self.item(index)
            epoch += 1
            if not self.repeat:
                return


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; keep strings (captions, sample and asset names) as lists."""
    return {k: [it[k] for it in items] if isinstance(items[0][k], str) else torch.stack([it[k] for it in items]) for k in items[0]}
