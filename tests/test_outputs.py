"""Point cloud, PLY, settings-JSON and figure helpers of refany3d.outputs."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import trimesh
from PIL import Image

from refany3d.errors import InputError
from refany3d.mesh import normalization_of
from refany3d.outputs import (
    PointCloud,
    pointcloud_figure,
    pointcloud_from_pointmap,
    subsample,
    surface_points,
    write_ply,
    write_settings_json,
)


@pytest.fixture
def box():
    mesh = trimesh.creation.box(extents=(2.0, 1.0, 0.5))
    mesh.apply_translation((3.0, -1.0, 0.25))
    return mesh


def _scene(box, y_rotation=0.0):
    """A 6x7 point map whose left half shows known own-frame points; the rest is white."""
    norm = normalization_of(box)
    rng = np.random.default_rng(1)
    h, w = 6, 7
    lo, hi = norm.bounds
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    # points near the centre so a y rotation never clamps their colours
    own = centre + rng.uniform(-0.3, 0.3, size=(h, 3, 3)) * half
    pointmap = np.ones((h, w, 3), dtype=np.float32)
    pointmap[:, :3] = norm.pointmap_from_own(own.reshape(-1, 3), y_rotation).reshape(h, 3, 3)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return norm, pointmap, image, own


def test_pointcloud_recovers_own_frame_points_and_image_colours(box):
    norm, pointmap, image, own = _scene(box)
    cloud = pointcloud_from_pointmap(pointmap, image, norm)
    assert len(cloud) == 6 * 3  # only the foreground columns
    np.testing.assert_allclose(cloud.points, own.reshape(-1, 3), atol=1e-5)
    np.testing.assert_array_equal(cloud.colors, image[:, :3].reshape(-1, 3))


def test_pointcloud_undoes_y_rotation(box):
    norm, pointmap, image, own = _scene(box, y_rotation=35.0)
    cloud = pointcloud_from_pointmap(pointmap, image, norm, y_rotation=35.0)
    np.testing.assert_allclose(cloud.points, own.reshape(-1, 3), atol=1e-5)
    unrotated = pointcloud_from_pointmap(pointmap, image, norm)
    assert np.abs(unrotated.points - own.reshape(-1, 3)).max() > 0.05


def test_pointcloud_accepts_pil_and_keeps_unit_cube_without_normalization(box):
    _, pointmap, image, _ = _scene(box)
    pm8 = np.rint(pointmap * 255).astype(np.uint8)
    cloud = pointcloud_from_pointmap(Image.fromarray(pm8), Image.fromarray(image))
    np.testing.assert_allclose(cloud.points, pm8[:, :3].reshape(-1, 3) / 255.0, atol=1e-6)
    assert cloud.points.min() >= 0.0 and cloud.points.max() <= 1.0


def test_near_white_pixels_are_background():
    pointmap = np.full((1, 3, 3), 0.97, dtype=np.float32)  # within the 0.05 tolerance of white
    pointmap[0, 1] = (0.97, 0.5, 0.97)
    cloud = pointcloud_from_pointmap(pointmap, np.zeros((1, 3, 3), np.uint8))
    assert len(cloud) == 1
    np.testing.assert_allclose(cloud.points[0], (0.97, 0.5, 0.97), atol=1e-6)


def test_pointcloud_rejects_mismatched_or_invalid_inputs():
    with pytest.raises(InputError, match="differ in size"):
        pointcloud_from_pointmap(np.zeros((4, 4, 3), np.float32), np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        pointcloud_from_pointmap(np.full((2, 2, 3), 2.0, np.float32), np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(InputError, match="HxWx3"):
        pointcloud_from_pointmap(np.zeros((4, 4), np.float32), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(InputError, match="coordinates must be finite"):
        PointCloud(np.array([[0.0, np.nan, 1.0]]), [[1, 2, 3]])
    with pytest.raises(InputError, match="colours must be within \\[0, 255\\], got \\[-5, 300\\]"):
        PointCloud(np.zeros((1, 3)), [[300, -5, 1]])  # a uint8 cast would wrap them to (44, 251, 1)


def test_subsample_draws_distinct_points_deterministically():
    rng = np.random.default_rng(0)
    cloud = PointCloud(rng.normal(size=(1000, 3)), rng.integers(0, 256, size=(1000, 3)))
    small = subsample(cloud, 100, seed=3)
    assert len(small) == 100
    rows = {tuple(p) for p in cloud.points.tolist()}
    assert all(tuple(p) in rows for p in small.points.tolist())
    assert len({tuple(p) for p in small.points.tolist()}) == 100
    np.testing.assert_array_equal(small.points, subsample(cloud, 100, seed=3).points)
    assert subsample(cloud, 5000) is cloud
    with pytest.raises(InputError, match="max_points must be a whole number >= 0, got -1"):
        subsample(cloud, -1)


def test_ply_round_trips_through_trimesh(tmp_path):
    rng = np.random.default_rng(2)
    cloud = PointCloud(rng.normal(size=(257, 3)), rng.integers(0, 256, size=(257, 3)))
    path = write_ply(cloud, tmp_path / "cloud.ply")
    loaded = trimesh.load(path)
    assert isinstance(loaded, trimesh.PointCloud)
    np.testing.assert_allclose(loaded.vertices, cloud.points, rtol=0, atol=0)
    np.testing.assert_array_equal(loaded.colors[:, :3], cloud.colors)
    header_end = path.read_bytes().index(b"end_header\n") + len(b"end_header\n")
    assert path.stat().st_size == header_end + 257 * (3 * 4 + 3)


def test_empty_point_cloud_writes_a_valid_ply(tmp_path):
    path = write_ply(PointCloud(np.zeros((0, 3)), np.zeros((0, 3))), tmp_path / "empty.ply")
    assert b"element vertex 0\n" in path.read_bytes()
    # a reader takes it: no geometry, and nothing after the header
    assert trimesh.load(path).is_empty
    assert path.read_bytes().endswith(b"end_header\n")


def test_settings_json_records_settings_and_mesh_identity(tmp_path):
    mesh_file = tmp_path / "thing.obj"
    mesh_file.write_bytes(b"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    settings = {"prompt": "a duck", "seed": np.int64(7), "guidance_scale": np.float32(3.5), "n_views": 8}
    path = write_settings_json(settings, tmp_path / "settings.json", mesh_path=mesh_file)
    record = json.loads(path.read_text())
    assert record["settings"] == {"prompt": "a duck", "seed": 7, "guidance_scale": 3.5, "n_views": 8}
    assert record["mesh"] == {
        "name": "thing.obj",
        "path": str(mesh_file),
        "sha256": hashlib.sha256(mesh_file.read_bytes()).hexdigest(),
    }
    assert record["refany3d_version"]
    with pytest.raises(InputError, match="cannot hold NaN or infinite values \\(guidance_scale\\)"):
        write_settings_json({**settings, "guidance_scale": float("nan")}, tmp_path / "nan.json")
    assert not (tmp_path / "nan.json").exists()  # nothing unreadable was written
    with pytest.raises(InputError, match="mesh file not found"):
        write_settings_json(settings, tmp_path / "s.json", mesh_path=tmp_path / "gone.obj")


def test_surface_points_lie_on_the_box(box):
    cloud = surface_points(box, count=500, seed=0)
    lo, hi = box.bounds
    on_a_face = np.isclose(cloud.points, lo, atol=1e-5) | np.isclose(cloud.points, hi, atol=1e-5)
    assert len(cloud) == 500 and on_a_face.any(axis=1).all()
    assert (cloud.points >= lo - 1e-5).all() and (cloud.points <= hi + 1e-5).all()


def test_figure_shows_subsampled_coloured_points_with_equal_axes(box):
    rng = np.random.default_rng(4)
    cloud = PointCloud(rng.normal(size=(300, 3)), rng.integers(0, 256, size=(300, 3)))
    figure = pointcloud_figure(cloud, max_points=120)
    (trace,) = figure.data
    assert len(trace.x) == 120
    first = tuple(int(v) for v in trace.marker.color[0][4:-1].split(","))
    row = np.flatnonzero((cloud.points[:, 0] == np.float32(trace.x[0])))[0]
    assert first == tuple(cloud.colors[row])
    assert figure.layout.scene.aspectmode == "data"

    with_asset = pointcloud_figure(cloud, asset=surface_points(box, 50))
    assert len(with_asset.data) == 2 and len(with_asset.data[1].x) == 50
