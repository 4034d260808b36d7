"""Procedural training data: files, shapes, the target point map's alignment, splits, streaming."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refany3d.cameras import Camera
from refany3d.data import (
    SampleDataset,
    camera_from_object_pose,
    collate,
    list_samples,
    make_dataset,
    other_asset_indices,
    write_real_sample,
)
from refany3d.procedural import COLOURS, random_asset, random_target_camera, viewpoint_phrase
from refany3d.errors import InputError
from refany3d.mesh import Normalization

RES, VIEWS = 48, 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), count=4, n_views=VIEWS, resolution=RES, seed=3, targets_per_asset=2)


@pytest.fixture(scope="module")
def val_dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("val"), count=4, n_views=VIEWS, resolution=RES, seed=3,
                        targets_per_asset=2, split="val")


def _normalization(asset_meta: dict) -> Normalization:
    n = asset_meta["normalization"]
    return Normalization(center=np.array(n["center"]), scale=n["scale"], bounds=np.array(n["bounds"]))


def _check_aligned(pointmap: np.ndarray, mask: np.ndarray, camera: Camera, norm: Normalization) -> None:
    """Every coloured pixel holds a surface point that projects back onto that pixel; others are white."""
    coloured = (pointmap != 255).any(axis=2)
    assert coloured.sum() > 20
    np.testing.assert_array_equal(coloured, mask)
    assert (pointmap[~mask] == 255).all()
    rows, cols = np.nonzero(mask)
    own = norm.own_from_pointmap(pointmap[rows, cols] / 255.0)
    uv = camera.project(norm.to_normalized(own))
    error = np.hypot(uv[:, 0] - cols, uv[:, 1] - rows)
    # 8-bit colours quantize the coordinates to 1/255 of the asset's extent: well under a pixel.
    assert np.median(error) < 0.5
    assert np.percentile(error, 95) < 1.0


def test_dataset_layout_and_shapes(dataset: Path) -> None:
    manifest = json.loads((dataset / "dataset.json").read_text())
    assert manifest["count"] == 4 and manifest["n_views"] == VIEWS and manifest["resolution"] == RES
    samples = list_samples([dataset])
    assert len(samples) == 4
    assets = sorted((dataset / "assets").iterdir())
    assert len(assets) == 2  # two targets per asset
    for asset in assets:
        for k in range(VIEWS):
            assert np.asarray(Image.open(asset / f"rgb_{k}.png")).shape == (RES, RES, 3)
            assert np.asarray(Image.open(asset / f"pointmap_{k}.png")).shape == (RES, RES, 3)
        assert (asset / "mesh.ply").exists()
    for _, folder in samples:
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["caption"].startswith("a ") and meta["viewpoint"] in meta["caption"]
        image = np.asarray(Image.open(folder / "image.png"))
        assert image.shape == (RES, RES, 3)
        assert image.std() > 5  # a scene, not a blank canvas


def test_target_pointmap_is_aligned_with_the_target_camera(dataset: Path) -> None:
    for root, folder in list_samples([dataset]):
        meta = json.loads((folder / "meta.json").read_text())
        asset_meta = json.loads((root / "assets" / meta["asset"] / "meta.json").read_text())
        mask = np.asarray(Image.open(folder / "mask.png")) > 127
        pointmap = np.asarray(Image.open(folder / "pointmap.png"))
        _check_aligned(pointmap, mask, Camera.from_dict(meta["camera"]), _normalization(asset_meta))
        # the asset is pasted where the mask is: the scene differs from the asset's unlit colours only by brightness
        assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()


def test_reference_pointmaps_are_aligned_with_the_orbit_cameras(dataset: Path) -> None:
    asset = sorted((dataset / "assets").iterdir())[0]
    meta = json.loads((asset / "meta.json").read_text())
    for k, cam in enumerate(meta["cameras"]):
        pointmap = np.asarray(Image.open(asset / f"pointmap_{k}.png"))
        mask = (pointmap != 255).any(axis=2)
        _check_aligned(pointmap, mask, Camera.from_dict(cam), _normalization(meta))


def test_held_out_split_has_its_own_assets_and_scene_styles(dataset: Path, val_dataset: Path) -> None:
    names = list(COLOURS)

    def styles(root: Path) -> set[bool]:
        held = set()
        for _, folder in list_samples([root]):
            scene = json.loads((folder / "meta.json").read_text())["scene"]
            held.add((names.index(scene["floor"][0]) + names.index(scene["wall"][0])) % 5 == 0)
        return held

    assert styles(dataset) == {False} and styles(val_dataset) == {True}
    train_mesh = (sorted((dataset / "assets").iterdir())[0] / "mesh.ply").read_bytes()
    val_meshes = [(a / "mesh.ply").read_bytes() for a in (val_dataset / "assets").iterdir()]
    assert train_mesh not in val_meshes


def test_dataset_streams_tensors_and_shards_disjointly(dataset: Path) -> None:
    stream = iter(SampleDataset(dataset, resolution=32, n_views=1, seed=0))
    item = next(stream)
    assert item["image"].shape == (3, 32, 32) and item["pointmap"].shape == (3, 32, 32)
    assert item["ref_rgb"].shape == (1, 3, 32, 32) and item["ref_pointmap"].shape == (1, 3, 32, 32)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["mask"].shape == (1, 32, 32) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    # the mask marks the asset: exactly the point map's coloured (non-white) pixels
    assert (item["mask"][0].bool() == (item["pointmap"] < 1).any(0)).all() and item["mask"].sum() > 0
    # point maps are resized without blending: every coordinate read is one the files hold
    stored = {tuple(c) for path in dataset.glob("assets/*/pointmap_*.png")
              for c in np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)}
    read = ((item["ref_pointmap"][0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).reshape(-1, 3).tolist()
    assert {tuple(c) for c in read} <= stored
    for _ in range(10):  # infinite: it cycles past the 4 samples
        next(stream)

    def captions(rank: int) -> list[str]:
        ds = SampleDataset(dataset, resolution=RES, rank=rank, world_size=2, repeat=False, shuffle=False)
        return [it["caption"] for it in ds]

    all_captions = [it["caption"] for it in SampleDataset(dataset, resolution=RES, repeat=False, shuffle=False)]
    first, second = captions(0), captions(1)
    assert len(first) == len(second) == 2
    assert sorted(first + second) == sorted(all_captions)
    # more loader workers than samples: every worker yields (an empty one would stall the loader)
    loader = torch.utils.data.DataLoader(SampleDataset(dataset, resolution=RES, n_views=1), batch_size=2,
                                         num_workers=6, collate_fn=collate, timeout=120)
    batches = iter(loader)
    assert all(next(batches)["image"].shape[0] == 2 for _ in range(8))
    full = SampleDataset(dataset, resolution=RES).item(0)
    assert full["ref_rgb"].shape[0] == VIEWS
    meta = json.loads((list_samples([dataset])[0][1] / "meta.json").read_text())
    view = np.asarray(Image.open(dataset / "assets" / meta["asset"] / "rgb_1.png"), dtype=np.float32)
    torch.testing.assert_close(full["ref_rgb"][1], torch.from_numpy(view / 127.5 - 1).permute(2, 0, 1))


def test_object_pose_camera_projects_like_the_original() -> None:
    rng = np.random.default_rng(0)
    camera, _ = random_target_camera(rng, 64)
    norm = Normalization(center=np.array([0.3, -1.0, 2.0]), scale=0.5, bounds=np.array([[-1.7, -3.0, 0.0], [2.3, 1.0, 4.0]]))
    rot_n, t_n = camera.world_to_camera_cv()
    # own frame: x = R (X - c) s + t_n  ->  divided by s: R X + (t_n / s - R c)
    rotation, translation = rot_n, t_n / norm.scale - rot_n @ norm.center
    recovered = camera_from_object_pose(camera.K, rotation, translation, 64, 64, norm)
    points = rng.uniform(-1, 1, size=(50, 3))
    np.testing.assert_allclose(recovered.project(points), camera.project(points), atol=1e-6)
    with pytest.raises(InputError, match="rotation"):
        camera_from_object_pose(camera.K, 2 * rotation, translation, 64, 64, norm)


def test_real_sample_builder_renders_the_aligned_pointmap(tmp_path: Path) -> None:
    mesh, _ = random_asset(np.random.default_rng(5))
    mesh_path = tmp_path / "thing.ply"
    mesh.export(mesh_path)
    K = np.array([[60.0, 0, 31.5], [0, 55.0, 35.0], [0, 0, 1]])
    angle = np.radians(30)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    translation = np.array([0.1, 0.0, 4.0])
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 64, 3), dtype=np.uint8))  # portrait
    folder = write_real_sample(tmp_path / "real", photo, mesh_path, K, rotation, translation, "a thing", n_views=2, resolution=32)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["caption"] == "a thing"
    # cropped to a square (the trainer resizes to a square: a portrait would be squashed)
    x0, y0, side = meta["scene"]["crop"]
    assert (x0, side) == (0, 64) and 0 < y0 < 32
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "image.png")), np.asarray(photo)[y0 : y0 + 64])
    pointmap = np.asarray(Image.open(folder / "pointmap.png"))
    assert pointmap.shape == (64, 64, 3)
    asset_meta = json.loads((tmp_path / "real" / "assets" / meta["asset"] / "meta.json").read_text())
    mask = np.asarray(Image.open(folder / "mask.png")) > 127
    rows, cols = np.nonzero(mask)
    assert abs((rows.min() + rows.max()) / 2 - 31.5) <= 1  # the object is centred in the crop
    _check_aligned(pointmap, mask, Camera.from_dict(meta["camera"]), _normalization(asset_meta))
    # the object's own origin-frame points land where the pose puts them in the photo
    norm = _normalization(asset_meta)
    own = norm.own_from_pointmap(pointmap[rows, cols] / 255.0)
    cam = own @ rotation.T + translation
    uv = np.stack([K[0, 0] * cam[:, 0] / cam[:, 2] + K[0, 2], K[1, 1] * cam[:, 1] / cam[:, 2] + K[1, 2]], 1)
    assert np.median(np.hypot(uv[:, 0] - (cols + x0), uv[:, 1] - (rows + y0))) < 0.5
    assert len(list_samples([tmp_path / "real"])) == 1

    # another mesh under the same file name gets its own views; another format is refused
    other, _ = random_asset(np.random.default_rng(6))
    (tmp_path / "other").mkdir()
    other.export(tmp_path / "other" / "thing.ply")
    second = write_real_sample(tmp_path / "real", photo, tmp_path / "other" / "thing.ply", K, rotation, translation,
                               "another thing", n_views=2, resolution=32)
    assert json.loads((second / "meta.json").read_text())["asset"] != meta["asset"]
    with pytest.raises(InputError, match="already holds a dataset with n_views 2 \\(asked: 4\\), resolution 32 "
                                         "\\(asked: 512\\)"):
        write_real_sample(tmp_path / "real", photo, mesh_path, K, rotation, translation, "a thing")


def test_viewpoint_words() -> None:
    assert viewpoint_phrase(10, 60) == "seen from above"
    assert viewpoint_phrase(350, 0) == "seen from the front"
    assert viewpoint_phrase(90, 10) == "seen from the left"
    assert viewpoint_phrase(180, 0) == "seen from the back"
    assert viewpoint_phrase(-90, 0) == "seen from the right"


def test_bad_settings_raise_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="count"):
        make_dataset(tmp_path / "x", count=0)
    with pytest.raises(InputError, match="split"):
        make_dataset(tmp_path / "x", count=1, split="test")
    with pytest.raises(InputError, match="asset size must be MIN <= MAX"):
        make_dataset(tmp_path / "x", count=1, asset_size=(0.8, 0.5))
    with pytest.raises(InputError, match="asset size"):
        make_dataset(tmp_path / "x", count=1, asset_size=(0.5, 1.5))
    with pytest.raises(InputError, match="not a refany3d dataset"):
        SampleDataset(tmp_path, resolution=32)
    with pytest.raises(InputError, match="seed must be a whole number >= 0, got -3"):
        make_dataset(tmp_path / "y", count=1, seed=-3)
    with pytest.raises(InputError, match="resolution must be a whole number from 16 to 4096, got 100000"):
        make_dataset(tmp_path / "y", count=1, resolution=100000)
    assert not (tmp_path / "y").exists()  # refused before anything was written

    make_dataset(tmp_path / "z", count=1, n_views=1, resolution=32)
    with pytest.raises(InputError, match="already holds a dataset with resolution 32 \\(asked: 64\\), n_views 1 "
                                         "\\(asked: 4\\); write to a new folder"):
        make_dataset(tmp_path / "z", count=1, seed=1)
    make_dataset(tmp_path / "z", count=1, n_views=1, resolution=32, seed=1)  # the same settings: added
    assert len(list((tmp_path / "z" / "samples").iterdir())) == 2


def test_asset_size_sets_how_much_of_the_target_the_asset_covers(tmp_path: Path) -> None:
    def coverage(root: Path) -> float:
        masks = [np.asarray(Image.open(p)) > 0 for p in sorted(root.glob("samples/*/mask.png"))]
        return float(np.median([m.mean() for m in masks]))

    small = make_dataset(tmp_path / "small", count=6, n_views=1, resolution=32, seed=5, asset_size=(0.2, 0.25))
    large = make_dataset(tmp_path / "large", count=6, n_views=1, resolution=32, seed=5, asset_size=(0.8, 0.85))
    assert json.loads((large / "dataset.json").read_text())["asset_size"] == [0.8, 0.85]
    # Area grows with the square of the diameter: (0.825 / 0.225)^2 = 13x; shapes vary per draw.
    assert coverage(large) > 6 * coverage(small)
    for sample in sorted(large.glob("samples/*/mask.png")):
        mask = np.asarray(Image.open(sample)) > 0
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def test_make_data_cli(tmp_path: Path, capsys) -> None:
    from refany3d.cli import main

    assert main(["make-data", str(tmp_path / "d"), "--count", "2", "--views", "1", "--resolution", "32"]) == 0
    assert json.loads((tmp_path / "d" / "dataset.json").read_text())["count"] == 2
    assert main(["make-data", str(tmp_path / "e"), "--count", "0"]) == 2
    assert "count must be a positive whole number" in capsys.readouterr().err
    assert main(["make-data", str(tmp_path / "f"), "--count", "1", "--views", "1", "--resolution", "32",
                 "--asset-size", "0.5", "0.6"]) == 0
    assert json.loads((tmp_path / "f" / "dataset.json").read_text())["asset_size"] == [0.5, 0.6]


def test_worker_processes_write_the_same_files_as_one(tmp_path: Path, capsys) -> None:
    from refany3d.cli import main

    # 19 samples of 2 per asset: 10 assets in two tasks of 8 and 2, the last asset with one scene
    settings = dict(count=19, n_views=1, resolution=32, seed=3, targets_per_asset=2, split="val")
    one = make_dataset(tmp_path / "one", **settings)
    two = make_dataset(tmp_path / "two", workers=2, **settings)
    files = sorted(f.relative_to(one) for f in one.rglob("*") if f.is_file())
    assert files == sorted(f.relative_to(two) for f in two.rglob("*") if f.is_file())
    assert len([f for f in files if f.parts[0] == "samples" and f.name == "meta.json"]) == 19
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name

    assert main(["make-data", str(tmp_path / "bad"), "--count", "2", "--workers", "0"]) == 2
    assert "workers must be a positive whole number, got 0" in capsys.readouterr().err


def test_other_asset_indices_skip_scenes_of_the_same_asset() -> None:
    assert other_asset_indices(["a", "a", "b", "b", "a"]) == [2, 2, 4, 4, 2]
    with pytest.raises(InputError, match="same asset"):
        other_asset_indices(["a", "a"])
