"""Procedural training material: textured assets made of primitives, captions, and scenes.

Nothing here can be downloaded in this project's build environment, so a small model is trained
on what this module draws: an asset composed of textured primitives (`random_asset`), a camera
that shows it at a random pose, scale and offset (`random_target_camera`), and a scene around it
(patterned floor and wall, distractor shapes, a soft shadow) with a caption that names the asset,
the scene and the viewpoint (`compose_target`). `refany3d.data` writes them as samples.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from refany3d.cameras import Camera, look_at
from refany3d.errors import InputError

# Colour names double as caption words, so they must be in the tokenizers' vocabulary.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 45, 40),
    "green": (50, 160, 60),
    "blue": (45, 85, 200),
    "yellow": (235, 205, 50),
    "orange": (240, 130, 30),
    "purple": (130, 60, 170),
    "pink": (240, 140, 180),
    "brown": (120, 75, 40),
    "gray": (128, 128, 128),
    "black": (30, 30, 30),
    "white": (235, 235, 235),
    "cyan": (60, 200, 210),
}
SHAPES = ("box", "ball", "cylinder", "cone", "capsule", "ring")
ASSET_PATTERNS = ("plain", "striped", "checkered", "gradient")
FLOOR_PATTERNS = ("plain", "checkered", "striped")
WALL_PATTERNS = ("plain", "striped", "gradient")
DISTRACTOR_SHAPES = ("ball", "block", "pyramid")
CAPTION_WORDS = (
    "a an the with and on in of front floor wall next to seen from above left right back side "
    "object view shape"
).split()


def caption_vocabulary() -> list[str]:
    """Every word a procedural caption can contain (the word-level tokenizers need them)."""
    words = [*COLOURS, *SHAPES, *ASSET_PATTERNS, *FLOOR_PATTERNS, *WALL_PATTERNS, *DISTRACTOR_SHAPES, *CAPTION_WORDS]
    return list(dict.fromkeys(words))


# ---------------------------------------------------------------------------------------------
# Procedural assets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartSpec:
    """One primitive of a procedural asset and its texture."""

    shape: str
    colour: str
    second_colour: str
    pattern: str


def _primitive(shape: str, rng: np.random.Generator):
    """A unit-ish primitive mesh with enough vertices for per-vertex patterns to show."""
    import trimesh

    c = trimesh.creation
    if shape == "box":
        mesh = c.box(extents=rng.uniform(0.5, 1.2, size=3))
    elif shape == "ball":
        mesh = c.icosphere(subdivisions=3, radius=rng.uniform(0.35, 0.6))
    elif shape == "cylinder":
        mesh = c.cylinder(radius=rng.uniform(0.2, 0.45), height=rng.uniform(0.6, 1.4), sections=24)
    elif shape == "cone":
        mesh = c.cone(radius=rng.uniform(0.3, 0.55), height=rng.uniform(0.6, 1.2), sections=24)
    elif shape == "capsule":
        mesh = c.capsule(radius=rng.uniform(0.2, 0.35), height=rng.uniform(0.4, 1.0), count=[24, 12])
    elif shape == "ring":
        major = rng.uniform(0.35, 0.55)
        mesh = c.torus(major_radius=major, minor_radius=major * rng.uniform(0.25, 0.45), major_sections=32, minor_sections=12)
    else:
        raise InputError(f"unknown primitive {shape!r}")
    if shape in ("box", "cylinder", "cone"):
        mesh = mesh.subdivide_to_size(max_edge=0.08, max_iter=6)
    return mesh


def _pattern_colours(local: np.ndarray, part: PartSpec, rng: np.random.Generator) -> np.ndarray:
    """Per-vertex RGB of a part's procedural texture, evaluated in the part's own frame."""
    a = np.array(COLOURS[part.colour], dtype=np.float64)
    b = np.array(COLOURS[part.second_colour], dtype=np.float64)
    if part.pattern == "plain":
        w = np.zeros(len(local))
    elif part.pattern == "striped":
        freq = rng.uniform(3.0, 6.0)
        w = (np.floor(local[:, 1] * freq) % 2).astype(np.float64)
    elif part.pattern == "checkered":
        freq = rng.uniform(3.0, 5.0)
        w = (np.floor(local * freq).sum(axis=1) % 2).astype(np.float64)
    else:  # gradient along the part's height
        y = local[:, 1]
        w = (y - y.min()) / max(np.ptp(y), 1e-9)
    return (a[None] * (1 - w[:, None]) + b[None] * w[:, None]).round().astype(np.uint8)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.random(random_state=int(rng.integers(2**31))).as_matrix()


def random_asset(rng: np.random.Generator):
    """A procedural asset: 1-3 textured primitives stacked and joined; returns (mesh, parts).

    The first part is the largest and names the asset in captions.
    """
    import trimesh

    n_parts = int(rng.choice([1, 2, 2, 3]))
    colour_names = list(COLOURS)
    meshes, parts = [], []
    top = 0.0
    for i in range(n_parts):
        shape = str(rng.choice(SHAPES))
        first, second = rng.choice(colour_names, size=2, replace=False)
        part = PartSpec(shape, str(first), str(second), str(rng.choice(ASSET_PATTERNS)))
        mesh = _primitive(shape, rng)
        if i > 0:  # smaller parts, tilted, resting on top of / beside the previous ones
            mesh.apply_scale(rng.uniform(0.45, 0.8))
        local = mesh.vertices.copy()
        colours = _pattern_colours(local, part, rng)
        rot = _random_rotation(rng) if i > 0 or rng.random() < 0.3 else np.eye(3)
        mesh.vertices = mesh.vertices @ rot.T
        lo, hi = mesh.bounds
        if i == 0:
            shift = -0.5 * (lo + hi)
        else:
            side = rng.uniform(-0.35, 0.35, size=2)
            shift = np.array([side[0], top - lo[1] - 0.05, side[1]])
        mesh.vertices = mesh.vertices + shift
        top = max(top, float(mesh.bounds[1][1])) if i else float(mesh.bounds[1][1])
        alpha = np.full((len(colours), 1), 255, dtype=np.uint8)
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.hstack([colours, alpha]))
        meshes.append(mesh)
        parts.append(part)
    joined = trimesh.util.concatenate(meshes)
    return joined, parts


def describe_asset(parts: Sequence[PartSpec]) -> str:
    """Caption phrase for an asset, e.g. 'a red striped box with a blue ball'."""
    def phrase(p: PartSpec) -> str:
        pattern = "" if p.pattern == "plain" else f"{p.pattern} "
        return f"{p.colour} {pattern}{p.shape}"

    text = f"a {phrase(parts[0])}"
    if len(parts) > 1:
        text += f" with a {parts[1].colour} {parts[1].shape}"
    return text


# ---------------------------------------------------------------------------------------------
# Target cameras and viewpoint words
# ---------------------------------------------------------------------------------------------


def viewpoint_phrase(azimuth_deg: float, pitch_deg: float) -> str:
    """Words for where the target camera is, relative to reference view 0 (azimuth 0 = front).

    Azimuth grows towards the front camera's left (the orbit's eye moves to +z), so 90 = left.
    """
    if pitch_deg >= 40.0:
        return "seen from above"
    a = azimuth_deg % 360.0
    if a < 45 or a >= 315:
        return "seen from the front"
    if a < 135:
        return "seen from the left"
    if a < 225:
        return "seen from the back"
    return "seen from the right"


DEFAULT_ASSET_SIZE = (0.35, 0.7)


def random_target_camera(rng: np.random.Generator, resolution: int, size_range=DEFAULT_ASSET_SIZE) -> tuple[Camera, dict]:
    """A camera at a random pose, distance (apparent scale) and principal-point offset.

    The asset's normalized bounding sphere (radius <= sqrt(3), usually ~1.2) covers about
    `size` of the image width; the principal point is shifted so the asset sits off-centre.
    """
    azimuth = float(rng.uniform(0.0, 360.0))
    pitch = float(rng.uniform(-5.0, 55.0))
    fov = float(rng.uniform(30.0, 60.0))
    size = float(rng.uniform(*size_range))
    half = math.tan(math.radians(fov) / 2.0)
    distance = 1.25 / (size * half)
    a, p = math.radians(azimuth), math.radians(pitch)
    eye = distance * np.array([math.cos(p) * math.cos(a), math.sin(p), math.cos(p) * math.sin(a)])
    focal = (resolution / 2.0) / half
    room = 0.5 * resolution * (1.0 - size) * 0.8
    du, dv = rng.uniform(-room, room, size=2)
    centre = (resolution - 1) / 2.0
    camera = Camera(
        pose=look_at(eye), fx=focal, fy=focal, cx=centre + du, cy=centre + dv,
        width=resolution, height=resolution, znear=0.05, zfar=distance + 10.0,
    )
    return camera, {"azimuth": azimuth, "pitch": pitch, "fov_y": fov, "size": size}


# ---------------------------------------------------------------------------------------------
# Procedural scenes (2D, composited behind the rendered asset)
# ---------------------------------------------------------------------------------------------


def _checker(x: np.ndarray, y: np.ndarray, period: float) -> np.ndarray:
    return ((np.floor(x / period) + np.floor(y / period)) % 2).astype(np.float32)


def _scene_background(rng: np.random.Generator, res: int, floor: tuple[str, str, str], wall: tuple[str, str, str]) -> tuple[np.ndarray, int]:
    """Wall above a horizon, a perspective floor below it; light falls off with distance."""
    horizon = int(rng.uniform(0.3, 0.6) * res)
    v, u = np.mgrid[0:res, 0:res].astype(np.float32)
    img = np.zeros((res, res, 3), np.float32)

    wall_a, wall_b = np.array(COLOURS[wall[0]], np.float32), np.array(COLOURS[wall[1]], np.float32)
    if wall[2] == "striped":
        w = (np.floor(u / (res / rng.uniform(4, 10))) % 2)
    elif wall[2] == "gradient":
        w = v / max(horizon, 1)
    else:
        w = np.zeros_like(u)
    wall_img = wall_a * (1 - w[..., None]) + wall_b * w[..., None]
    wall_img *= (0.8 + 0.2 * v / max(horizon, 1))[..., None]

    depth = res * 0.5 / np.maximum(v - horizon + 1.0, 1.0)  # ground distance per row
    fx = (u - res / 2.0) * depth / (res * 0.5)
    floor_a, floor_b = np.array(COLOURS[floor[0]], np.float32), np.array(COLOURS[floor[1]], np.float32)
    if floor[2] == "checkered":
        f = _checker(fx, depth, rng.uniform(0.3, 0.8))
    elif floor[2] == "striped":
        f = (np.floor(depth / rng.uniform(0.25, 0.6)) % 2).astype(np.float32)
    else:
        f = np.zeros_like(u)
    floor_img = floor_a * (1 - f[..., None]) + floor_b * f[..., None]
    floor_img *= np.clip(1.05 - 0.06 * depth, 0.6, 1.05)[..., None]

    below = (v >= horizon)[..., None]
    img = np.where(below, floor_img, wall_img)
    return img, horizon


def _draw_distractor(img: np.ndarray, rng: np.random.Generator, shape: str, colour: str, horizon: int) -> None:
    """A shaded 2D shape standing on the floor (drawn behind the asset)."""
    import cv2

    res = img.shape[0]
    r = int(rng.uniform(0.06, 0.14) * res)
    cx = int(rng.uniform(0.05, 0.95) * res)
    base = int(rng.uniform(horizon + 0.15 * (res - horizon), res - 1))
    cy = base - r
    mask = np.zeros(img.shape[:2], np.uint8)
    if shape == "ball":
        cv2.circle(mask, (cx, cy), r, 1, -1, lineType=cv2.LINE_8)
    elif shape == "block":
        cv2.rectangle(mask, (cx - r, cy - r), (cx + r, base), 1, -1)
    else:
        pts = np.array([[cx - r, base], [cx + r, base], [cx, base - 2 * r]], np.int32)
        cv2.fillConvexPoly(mask, pts, 1)
    v, u = np.mgrid[0:res, 0:res].astype(np.float32)
    shade = np.clip(1.1 - 0.5 * ((u - cx + 0.4 * r) ** 2 + (v - cy + 0.4 * r) ** 2) ** 0.5 / max(r, 1) * 0.6, 0.55, 1.1)
    col = np.array(COLOURS[colour], np.float32)[None, None] * shade[..., None]
    img[mask > 0] = col[mask > 0]


def _drop_shadow(img: np.ndarray, mask: np.ndarray, strength: float) -> None:
    """Darken an ellipse on the floor under the asset's lowest visible pixels."""
    import cv2

    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return
    bottom, left, right = rows.max(), cols.min(), cols.max()
    res = img.shape[0]
    shadow = np.zeros(mask.shape, np.float32)
    axes = (max(int((right - left) * 0.6), 1), max(int((right - left) * 0.12), 1))
    cv2.ellipse(shadow, (int((left + right) / 2), int(bottom)), axes, 0, 0, 360, 1.0, -1)
    k = max(3, (res // 16) | 1)
    shadow = cv2.GaussianBlur(shadow, (k, k), 0)
    img *= (1.0 - strength * shadow)[..., None]


@dataclass
class TargetSample:
    """A composited target: image, aligned point map (white background), mask, caption, camera."""

    image: np.ndarray  # uint8 HxWx3
    pointmap: np.ndarray  # float32 HxWx3 in [0, 1], 1.0 where the asset is not visible
    mask: np.ndarray  # bool HxW
    caption: str
    camera: Camera
    viewpoint: str
    scene: dict[str, Any]


def _scene_choice(rng: np.random.Generator, held_out: bool) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """Floor and wall styles. Pairs whose colour indices sum to 0 mod 5 are reserved for evaluation."""
    names = list(COLOURS)
    while True:
        fi, wi = rng.integers(len(names), size=2)
        if fi == wi or ((fi + wi) % 5 == 0) != held_out:
            continue
        floor = (names[fi], str(rng.choice(names)), str(rng.choice(FLOOR_PATTERNS)))
        wall = (names[wi], str(rng.choice(names)), str(rng.choice(WALL_PATTERNS)))
        return floor, wall


def compose_target(
    renderer, mesh, asset_description: str, rng: np.random.Generator, resolution: int, held_out: bool = False,
    asset_size: tuple[float, float] = DEFAULT_ASSET_SIZE,
) -> TargetSample:
    """Render the asset at a random camera and composite it into a procedural scene.

    `asset_size` is the range of the asset's bounding-sphere diameter as a share of the image
    width; a draw that crops the asset at the border is redrawn smaller.
    """
    low, high = asset_size
    for attempt in range(8):
        camera, pose = random_target_camera(rng, resolution, size_range=(low, max(low, high - 0.04 * attempt)))
        view = renderer.render(mesh, camera)
        m = view.mask
        if m.sum() > 0.02 * m.size and not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()):
            break
    floor, wall = _scene_choice(rng, held_out)
    img, horizon = _scene_background(rng, resolution, floor, wall)
    names = list(COLOURS)
    distractors = []
    for _ in range(int(rng.integers(0, 4))):
        shape, colour = str(rng.choice(DISTRACTOR_SHAPES)), str(rng.choice(names))
        _draw_distractor(img, rng, shape, colour, horizon)
        distractors.append({"shape": shape, "colour": colour})
    _drop_shadow(img, view.mask, float(rng.uniform(0.2, 0.5)))
    brightness = float(rng.uniform(0.85, 1.1))
    img = np.where(view.mask[..., None], view.rgb.astype(np.float32) * brightness, img)
    image = np.clip(img, 0, 255).round().astype(np.uint8)

    viewpoint = viewpoint_phrase(pose["azimuth"], pose["pitch"])
    floor_words = f"{floor[0]} {floor[2]} floor" if floor[2] != "plain" else f"{floor[0]} floor"
    wall_words = f"{wall[0]} {wall[2]} wall" if wall[2] != "plain" else f"{wall[0]} wall"
    caption = f"{asset_description} on a {floor_words} in front of a {wall_words}"
    if distractors:
        caption += f" next to a {distractors[0]['colour']} {distractors[0]['shape']}"
    caption += f", {viewpoint}"
    scene = {"floor": floor, "wall": wall, "horizon": horizon, "distractors": distractors, "brightness": brightness, **pose}
    return TargetSample(image, view.pointmap_xyz.astype(np.float32), view.mask.copy(), caption, camera, viewpoint, scene)
