"""Example assets made by code: a textured armchair and a traffic cone (the release's demo subjects)
and a vertex-coloured vase, each with a prompt. They let the app and the docs run on meshes the
project may redistribute, and they exercise every appearance path of the loader (textures in a
multi-part scene, flat PBR colours, vertex colours).

Regenerate with `python -m refany3d.examples` (writes examples/*.glb and examples/prompts.json).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"

PROMPTS = {
    "armchair.glb": "a cozy living room with a red tartan armchair next to a window, warm afternoon light",
    "traffic_cone.glb": "a traffic cone standing on a wet city street at night, neon reflections",
    "vase.glb": "a ceramic vase on a wooden table in a bright minimalist kitchen",
}

_TEXTURE_SIZE = 128


def _tartan_texture(size: int = _TEXTURE_SIZE) -> np.ndarray:
    """Red tartan fabric: overlapping dark stripes on red."""
    t = np.arange(size)
    stripes = ((t // 8) % 4 == 0).astype(np.float64) * 0.5 + ((t // 4) % 8 == 3).astype(np.float64) * 0.3
    shade = 1.0 - np.clip(stripes[None, :] + stripes[:, None], 0.0, 0.8)
    base = np.array([178.0, 34.0, 34.0])
    return np.clip(shade[..., None] * base + (1 - shade[..., None]) * np.array([40.0, 20.0, 30.0]), 0, 255).astype(np.uint8)


def _wood_texture(size: int = _TEXTURE_SIZE) -> np.ndarray:
    """Walnut-like grain: sinusoidal rings along one axis."""
    y, x = np.mgrid[0:size, 0:size] / size
    grain = 0.5 + 0.5 * np.sin(2 * np.pi * (12 * x + 0.8 * np.sin(2 * np.pi * y)))
    light, dark = np.array([150.0, 100.0, 60.0]), np.array([90.0, 55.0, 30.0])
    return (grain[..., None] * light + (1 - grain[..., None]) * dark).astype(np.uint8)


def _uv_box(extents, center) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box with 4 unshared vertices per side so each side maps the whole texture."""
    vertices, faces, uvs = [], [], []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            u_axis, v_axis = [a for a in range(3) if a != axis]
            corners = np.zeros((4, 3))
            corners[:, axis] = sign
            corners[:, u_axis] = [-1, 1, 1, -1]
            corners[:, v_axis] = [-1, -1, 1, 1]
            base = len(vertices) * 4
            quad = [[0, 1, 2], [0, 2, 3]]
            # keep faces outward: flip winding where the corner order runs clockwise
            normal = np.cross(corners[1] - corners[0], corners[2] - corners[0])
            if normal[axis] * sign < 0:
                quad = [[0, 2, 1], [0, 3, 2]]
            vertices.append(corners * np.asarray(extents) / 2 + center)
            faces.append(np.asarray(quad) + base)
            uvs.append(np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float64))
    return np.concatenate(vertices), np.concatenate(faces), np.concatenate(uvs)


def _textured(vertices, faces, uv, texture: np.ndarray) -> trimesh.Trimesh:
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(texture))
    return trimesh.Trimesh(vertices, faces, visual=trimesh.visual.TextureVisuals(uv=uv, material=material), process=False)


def _boxes(specs: list[tuple], texture: np.ndarray) -> trimesh.Trimesh:
    parts = [_uv_box(extents, center) for extents, center in specs]
    offsets = np.cumsum([0] + [len(v) for v, _, _ in parts[:-1]])
    return _textured(
        np.concatenate([v for v, _, _ in parts]),
        np.concatenate([f + o for (_, f, _), o in zip(parts, offsets)]),
        np.concatenate([uv for _, _, uv in parts]),
        texture,
    )


def make_armchair() -> trimesh.Scene:
    """Armchair: tartan upholstery (seat, back, arms) and wooden legs, two textures in one scene."""
    upholstery = _boxes(
        [
            ((0.8, 0.18, 0.75), (0.0, 0.45, 0.0)),  # seat
            ((0.8, 0.7, 0.15), (0.0, 0.89, -0.3)),  # back
            ((0.14, 0.3, 0.75), (-0.47, 0.64, 0.0)),  # left arm
            ((0.14, 0.3, 0.75), (0.47, 0.64, 0.0)),  # right arm
        ],
        _tartan_texture(),
    )
    legs = _boxes(
        [((0.08, 0.36, 0.08), (x, 0.18, z)) for x in (-0.45, 0.45) for z in (-0.32, 0.32)],
        _wood_texture(),
    )
    scene = trimesh.Scene()
    scene.add_geometry(upholstery, geom_name="upholstery")
    scene.add_geometry(legs, geom_name="legs")
    return scene


def _flat(mesh: trimesh.Trimesh, rgb) -> trimesh.Trimesh:
    material = trimesh.visual.material.PBRMaterial(baseColorFactor=[*rgb, 255])
    uv = np.zeros((len(mesh.vertices), 2))
    mesh.visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    return mesh


def _frustum(r_bottom: float, r_top: float, y_bottom: float, y_top: float, sections: int = 48) -> trimesh.Trimesh:
    """Open truncated-cone band around +y."""
    angles = np.linspace(0, 2 * np.pi, sections, endpoint=False)
    ring = np.stack([np.cos(angles), np.zeros_like(angles), np.sin(angles)], 1)
    bottom = ring * r_bottom + [0, y_bottom, 0]
    top = ring * r_top + [0, y_top, 0]
    i = np.arange(sections)
    j = (i + 1) % sections
    faces = np.concatenate([np.stack([i, i + sections, j], 1), np.stack([j, i + sections, j + sections], 1)])
    return trimesh.Trimesh(np.concatenate([bottom, top]), faces, process=False)


def make_traffic_cone() -> trimesh.Scene:
    """Traffic cone: black square base, orange body with two white reflective bands (flat PBR colours)."""
    orange, white, black = (255, 90, 10), (245, 245, 245), (25, 25, 25)
    bands = [(0.05, 0.35, orange), (0.35, 0.5, white), (0.5, 0.7, orange), (0.7, 0.82, white), (0.82, 1.0, orange)]
    radius = lambda y: 0.3 - 0.22 * (y - 0.05) / 0.95  # noqa: E731  (linear taper)
    scene = trimesh.Scene()
    base = trimesh.creation.box(extents=(0.75, 0.05, 0.75))
    base.apply_translation((0, 0.025, 0))
    scene.add_geometry(_flat(base, black), geom_name="base")
    for k, (y0, y1, color) in enumerate(bands):
        scene.add_geometry(_flat(_frustum(radius(y0), radius(y1), y0, y1), color), geom_name=f"band_{k}")
    cap = trimesh.creation.cylinder(radius=radius(1.0), height=0.01, sections=48)
    cap.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, (1, 0, 0)))
    cap.apply_translation((0, 1.0, 0))
    scene.add_geometry(_flat(cap, orange), geom_name="cap")
    return scene


def make_vase() -> trimesh.Scene:
    """Vase: a profile revolved about +y, vertex colours fading teal -> purple with height."""
    heights = np.linspace(0.0, 1.0, 24)
    radii = 0.18 + 0.14 * np.sin(np.pi * heights * 1.2) - 0.06 * heights
    profile = np.stack([radii, heights], 1)
    profile = np.concatenate([[[0.0, 0.0]], profile])  # closed bottom
    mesh = trimesh.creation.revolve(profile, sections=64)
    # revolve spins about z; stand the vase up along +y
    mesh.apply_transform(trimesh.transformations.rotation_matrix(-np.pi / 2, (1, 0, 0)))
    t = (mesh.vertices[:, 1] - mesh.vertices[:, 1].min()) / np.ptp(mesh.vertices[:, 1])
    teal, purple = np.array([20, 160, 150]), np.array([120, 40, 170])
    rgb = (teal[None] * (1 - t[:, None]) + purple[None] * t[:, None]).round().astype(np.uint8)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], 1))
    return trimesh.Scene(mesh)


BUILDERS = {"armchair.glb": make_armchair, "traffic_cone.glb": make_traffic_cone, "vase.glb": make_vase}


def example_paths(folder: Path = EXAMPLES_DIR) -> dict[str, Path]:
    """name -> path of each example GLB."""
    return {name: folder / name for name in BUILDERS}


def write_examples(folder: str | Path = EXAMPLES_DIR) -> list[Path]:
    """(Re)generate the example GLBs and prompts.json in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in BUILDERS.items():
        path = folder / name
        path.write_bytes(build().export(file_type="glb"))
        written.append(path)
    (folder / "prompts.json").write_text(json.dumps(PROMPTS, indent=2) + "\n")
    return written + [folder / "prompts.json"]


if __name__ == "__main__":
    for written_path in write_examples():
        print(written_path)
