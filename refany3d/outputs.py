"""What a generation leaves behind: a point cloud from the predicted point map, files, a figure.

A predicted point map names, for every foreground pixel, the asset point that pixel shows (per-axis
min-max normalized own-frame coordinates, white background). Undoing the normalization turns the
foreground pixels into a coloured 3D point cloud in the asset's own frame, which can be laid over
the asset's own surface to see how well the generated image agrees with it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from refany3d.errors import InputError, require_whole_number
from refany3d.images import as_float_image

# A pixel is background when every channel is at least 1 - this (the white of the point map).
BACKGROUND_TOLERANCE = 0.05
FIGURE_MAX_POINTS = 20_000
ASSET_OVERLAY_POINTS = 5_000


@dataclass
class PointCloud:
    """Points (N, 3) float32 with colours (N, 3) uint8."""

    points: np.ndarray
    colors: np.ndarray

    def __post_init__(self) -> None:
        points, colors = np.asarray(self.points), np.asarray(self.colors)
        if points.size and not np.isfinite(points).all():
            raise InputError("point cloud coordinates must be finite, got NaN or infinite values")
        if colors.size and (colors.min() < 0 or colors.max() > 255):  # a uint8 cast would wrap them
            raise InputError(f"point colours must be within [0, 255], got [{colors.min()}, {colors.max()}]")
        self.points = points.astype(np.float32).reshape(-1, 3)
        self.colors = colors.astype(np.uint8).reshape(-1, 3)
        if len(self.points) != len(self.colors):
            raise InputError(f"{len(self.points)} points but {len(self.colors)} colours")

    def __len__(self) -> int:
        return len(self.points)


def foreground_mask(pointmap: np.ndarray, tolerance: float = BACKGROUND_TOLERANCE) -> np.ndarray:
    """True where the point map is not (near-)white background."""
    return (np.asarray(pointmap)[..., :3] < 1.0 - tolerance).any(axis=-1)


def pointcloud_from_pointmap(
    pointmap: Image.Image | np.ndarray,
    image: Image.Image | np.ndarray,
    normalization: Any | None = None,
    y_rotation: float = 0.0,
    tolerance: float = BACKGROUND_TOLERANCE,
) -> PointCloud:
    """Foreground pixels of a point map as 3D points coloured by the generated image.

    With the asset's `normalization` (refany3d.mesh.Normalization) and the views' `y_rotation`,
    points are in the asset's own frame, so they overlay its surface; without, they stay in the
    point map's [0, 1]^3 cube.
    """
    P = as_float_image(pointmap, "point map")
    rgb = as_float_image(image, "image")
    if P.shape[:2] != rgb.shape[:2]:
        raise InputError(f"point map {P.shape[1]}x{P.shape[0]} and image {rgb.shape[1]}x{rgb.shape[0]} differ in size")
    mask = foreground_mask(P, tolerance)
    points = P[mask].astype(np.float64)
    if normalization is not None:
        points = normalization.own_from_pointmap(points, y_rotation)
    colors = np.clip(np.rint(rgb[mask] * 255.0), 0, 255)
    return PointCloud(points, colors)


def subsample(cloud: PointCloud, max_points: int, seed: int = 0) -> PointCloud:
    """At most `max_points` points, drawn without replacement (keeps plots responsive)."""
    require_whole_number("max_points", max_points)
    if len(cloud) <= max_points:
        return cloud
    keep = np.sort(np.random.default_rng(seed).choice(len(cloud), size=max_points, replace=False))
    return PointCloud(cloud.points[keep], cloud.colors[keep])


def surface_points(mesh, count: int = ASSET_OVERLAY_POINTS, seed: int = 0) -> PointCloud:
    """Points sampled uniformly (by area) on a mesh's surface (a trimesh object or a mesh file),
    neutral gray: the comparison overlay."""
    import trimesh

    from refany3d.mesh import as_mesh

    mesh = as_mesh(mesh)
    points, _ = trimesh.sample.sample_surface(mesh, count, seed=seed)
    return PointCloud(points, np.full((len(points), 3), 150, dtype=np.uint8))


def write_ply(cloud: PointCloud, path: str | Path) -> Path:
    """Binary little-endian PLY with float x, y, z and uchar red, green, blue per vertex."""
    path = Path(path)
    vertex = np.empty(
        len(cloud),
        dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")],
    )
    for i, axis in enumerate("xyz"):
        vertex[axis] = cloud.points[:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        vertex[channel] = cloud.colors[:, i]
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment refany3d predicted point cloud\n"
        f"element vertex {len(cloud)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    )
    with path.open("wb") as f:
        f.write(header.encode("ascii"))
        f.write(vertex.tobytes())
    return path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def settings_record(settings: dict[str, Any], mesh_path: str | Path | None = None) -> dict[str, Any]:
    """Every setting of a run plus what identifies the mesh (name, path, SHA-256), so it can be redone."""
    from refany3d import __version__

    record: dict[str, Any] = {"refany3d_version": __version__, "settings": dict(settings)}
    if mesh_path is not None:
        mesh_path = Path(mesh_path)
        if not mesh_path.is_file():
            raise InputError(f"mesh file not found: {mesh_path}")
        record["mesh"] = {"name": mesh_path.name, "path": str(mesh_path), "sha256": file_sha256(mesh_path)}
    return record


def write_settings_json(settings: dict[str, Any], path: str | Path, mesh_path: str | Path | None = None) -> Path:
    """Write `settings_record` as indented JSON (numpy scalars become plain numbers). Values JSON
    cannot hold (NaN, infinities, objects) are refused by name rather than written unreadable."""
    path = Path(path)

    def plain(value: Any) -> Any:
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, Path):
            return str(value)
        raise InputError(f"a setting of type {type(value).__name__} cannot go into settings.json")

    record = settings_record(settings, mesh_path)
    try:
        text = json.dumps(record, indent=2, default=plain, allow_nan=False)
    except InputError:
        raise
    except ValueError:  # NaN or an infinity
        bad = [k for k, v in settings.items() if isinstance(v, (float, np.floating)) and not np.isfinite(v)]
        raise InputError(f"settings.json cannot hold NaN or infinite values ({', '.join(bad) or 'a nested setting'})"
                         ) from None
    path.write_text(text + "\n")
    return path


def _rgb_strings(colors: np.ndarray) -> list[str]:
    return [f"rgb({r},{g},{b})" for r, g, b in colors.tolist()]


def _polyline_coordinates(segments: np.ndarray) -> list[list[float | None]]:
    """x, y, z lists of line segments (S, 2, 3) for one Plotly lines trace (None breaks the line)."""
    segments = np.asarray(segments, dtype=np.float64).reshape(-1, 2, 3)
    breaks = np.full((len(segments), 1, 3), np.nan)
    joined = np.concatenate([segments, breaks], axis=1).reshape(-1, 3)
    return [[None if np.isnan(v) else float(v) for v in joined[:, axis]] for axis in range(3)]


def pointcloud_figure(
    cloud: PointCloud,
    asset: PointCloud | None = None,
    max_points: int = FIGURE_MAX_POINTS,
    seed: int = 0,
    camera_segments: np.ndarray | None = None,
    camera_label: str = "recovered camera",
):
    """Interactive Plotly 3D scatter of the predicted points (and the asset's surface), equal axes.

    `camera_segments` (S, 2, 3), in the points' frame, draws a camera (the alignment's recovered
    one, as a frustum) beside the cloud, so its pose can be judged against the asset.
    The traces are plain dicts in a figure built without Plotly's per-value validation: checking
    20,000 colour strings one by one took ~1.5 s per figure, the same JSON comes out without it.
    """
    import plotly.graph_objects as go

    shown = subsample(cloud, max_points, seed)

    def scatter(points: np.ndarray, name: str, **style: Any) -> dict[str, Any]:
        return {"type": "scatter3d", "x": points[:, 0], "y": points[:, 1], "z": points[:, 2], "name": name, **style}

    traces = [scatter(shown.points, f"predicted ({len(cloud)} points)", mode="markers",
                      marker={"size": 2, "color": _rgb_strings(shown.colors)})]
    if asset is not None:
        traces.append(scatter(asset.points, "asset surface", mode="markers",
                              marker={"size": 1.5, "color": "rgb(150,150,150)", "opacity": 0.35}))
    if camera_segments is not None:
        x, y, z = _polyline_coordinates(camera_segments)
        traces.append({"type": "scatter3d", "x": x, "y": y, "z": z, "mode": "lines", "name": camera_label,
                       "line": {"color": "rgb(220,40,40)", "width": 4}})
    figure = go.Figure(traces, _validate=False)
    figure.update_layout(
        scene={"aspectmode": "data", "camera": {"up": {"x": 0, "y": 1, "z": 0}}},
        margin={"l": 0, "r": 0, "t": 0, "b": 0},
        legend={"x": 0, "y": 0, "yanchor": "bottom"},  # at the top, the component's label would cover it
        height=420,
    )
    return figure
