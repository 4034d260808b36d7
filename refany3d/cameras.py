"""Pinhole cameras in the normalized asset frame, with the orbit the published model was trained on.

One `Camera` type serves rendering (OpenGL pose, as pyrender wants), projection and alignment
(OpenCV intrinsics/extrinsics, as solvers want), so that every part of the project agrees on one
pixel convention: pixel (u=col, v=row) centres sit at integer coordinates and v grows downward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refany3d.errors import InputError, require_whole_number

# OpenGL camera axes (x right, y up, looking down -z) -> OpenCV axes (x right, y down, z forward).
_GL_TO_CV = np.diag([1.0, -1.0, -1.0])

ORBIT_FRAMES = 60
DEFAULT_FOV_Y_DEG = 45.0
ORBIT_RADIUS = 4.0  # the release's camera distance for reference views, in normalized units


@dataclass(frozen=True, eq=False)
class Camera:
    """Pinhole camera in the *normalized* asset frame (centred, largest bbox axis spans [-1,1])."""

    pose: np.ndarray = field(repr=False)  # 4x4 camera-to-world, OpenGL convention
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    znear: float = 0.1
    zfar: float = 100.0

    def __post_init__(self) -> None:
        pose = np.asarray(self.pose, dtype=np.float64)
        if pose.shape != (4, 4) or not np.all(np.isfinite(pose)):
            raise InputError("camera pose must be a finite 4x4 matrix")
        if not (self.fx > 0 and self.fy > 0):
            raise InputError(f"camera focal lengths must be positive, got fx={self.fx}, fy={self.fy}")
        if int(self.width) < 1 or int(self.height) < 1:
            raise InputError(f"camera size must be positive, got {self.width}x{self.height}")
        if not 0 < self.znear < self.zfar:
            raise InputError(f"camera needs 0 < znear < zfar, got {self.znear}, {self.zfar}")
        pose.setflags(write=False)
        object.__setattr__(self, "pose", pose)
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))
        for name in ("fx", "fy", "cx", "cy", "znear", "zfar"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Camera):
            return NotImplemented
        scalars = ("fx", "fy", "cx", "cy", "width", "height", "znear", "zfar")
        return all(getattr(self, k) == getattr(other, k) for k in scalars) and np.array_equal(
            self.pose, other.pose
        )

    __hash__ = None  # the pose is an array; cameras are values, not dictionary keys

    @property
    def K(self) -> np.ndarray:
        """3x3 OpenCV intrinsics."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    @property
    def position(self) -> np.ndarray:
        """Camera centre in the normalized frame."""
        return self.pose[:3, 3].copy()

    def world_to_camera_cv(self) -> tuple[np.ndarray, np.ndarray]:
        """R, t with x_cv = R @ X + t (OpenCV axes: x right, y down, z forward)."""
        rot_c2w = self.pose[:3, :3]
        rot = _GL_TO_CV @ rot_c2w.T
        t = -rot @ self.pose[:3, 3]
        return rot, t

    def project(self, points: np.ndarray) -> np.ndarray:
        """(N,3) normalized-frame points -> (N,2) pixel coordinates (u, v).

        Points behind the camera get NaN, since they have no pixel.
        """
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        rot, t = self.world_to_camera_cv()
        cam = pts @ rot.T + t
        z = cam[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = self.fx * cam[:, 0] / z + self.cx
            v = self.fy * cam[:, 1] / z + self.cy
        uv = np.stack([u, v], axis=1)
        uv[z <= 0] = np.nan
        return uv

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (pose row-major, plus K for readers that want OpenCV form)."""
        rot, t = self.world_to_camera_cv()
        return {
            "pose_c2w_opengl": self.pose.tolist(),
            "fx": self.fx,
            "fy": self.fy,
            "cx": self.cx,
            "cy": self.cy,
            "width": self.width,
            "height": self.height,
            "znear": self.znear,
            "zfar": self.zfar,
            "K": self.K.tolist(),
            "R_w2c_opencv": rot.tolist(),
            "t_w2c_opencv": t.tolist(),
        }

    @classmethod
    def from_opencv(cls, rotation: np.ndarray, translation: np.ndarray, K: np.ndarray, width: int,
                    height: int) -> "Camera":
        """The camera of OpenCV's world->camera R, t (x_cv = R X + t) and intrinsics K, with
        clipping planes that enclose the normalized asset (radius <= sqrt(3)) around the origin."""
        rot_c2w = np.asarray(rotation, dtype=np.float64).T
        centre = -rot_c2w @ np.asarray(translation, dtype=np.float64).reshape(3)
        pose = np.eye(4)
        pose[:3, :3] = rot_c2w @ _GL_TO_CV
        pose[:3, 3] = centre
        depth = float(np.linalg.norm(centre))
        znear = max(1e-3, 0.5 * (depth - math.sqrt(3.0))) if depth > 1.8 else 1e-3
        return cls(pose=pose, fx=K[0, 0], fy=K[1, 1], cx=K[0, 2], cy=K[1, 2], width=width, height=height,
                   znear=znear, zfar=depth + 4.0)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Camera":
        """Inverse of `to_dict` (derived keys K, R, t are ignored)."""
        try:
            return cls(
                pose=np.asarray(d["pose_c2w_opengl"], dtype=np.float64),
                fx=d["fx"], fy=d["fy"], cx=d["cx"], cy=d["cy"],
                width=d["width"], height=d["height"],
                znear=d.get("znear", 0.1), zfar=d.get("zfar", 100.0),
            )
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, InputError):
                raise
            raise InputError(f"not a camera description: {err}") from None


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """4x4 OpenGL camera-to-world pose at `eye` looking at `target` (right-handed, looks down -z)."""
    eye = np.asarray(eye, dtype=np.float64)
    back = eye - np.asarray(target, dtype=np.float64)
    norm = np.linalg.norm(back)
    if norm < 1e-12:
        raise InputError("look_at: eye and target coincide")
    z = back / norm
    x = np.cross(np.asarray(up, dtype=np.float64), z)
    if np.linalg.norm(x) < 1e-9:
        raise InputError("look_at: viewing direction is parallel to the up vector")
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = x, y, z, eye
    return pose


def focal_from_fov(fov_deg: float, size: int) -> float:
    """Focal length in pixels that spans `size` pixels with field of view `fov_deg`."""
    if not 0 < fov_deg < 180:
        raise InputError(f"field of view must be in (0, 180) degrees, got {fov_deg}")
    return (size / 2.0) / math.tan(math.radians(fov_deg) / 2.0)


def orbit_camera(
    azimuth_deg: float,
    pitch_deg: float = 0.0,
    radius: float = ORBIT_RADIUS,
    resolution: int = 512,
    fov_y_deg: float = DEFAULT_FOV_Y_DEG,
) -> Camera:
    """The release's orbit camera: eye = (r cos p cos a, r sin p, r cos p sin a), looking at the origin.

    The right axis is (sin a, 0, -cos a), the same as `look_at` with up +y, written in closed form
    so that pitch ±90° (straight above/below) still has a well-defined roll.
    """
    if not math.isfinite(radius) or radius <= 0:
        raise InputError(f"camera radius must be positive, got {radius}")
    if not -90.0 <= pitch_deg <= 90.0:
        raise InputError(f"pitch must be within [-90, 90] degrees, got {pitch_deg}")
    if int(resolution) < 8:
        raise InputError(f"resolution must be at least 8 pixels, got {resolution}")
    a, p = math.radians(azimuth_deg), math.radians(pitch_deg)
    z = np.array([math.cos(p) * math.cos(a), math.sin(p), math.cos(p) * math.sin(a)])
    x = np.array([math.sin(a), 0.0, -math.cos(a)])
    y = np.cross(z, x)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = x, y, z, radius * z
    res = int(resolution)
    focal = focal_from_fov(fov_y_deg, res)
    centre = (res - 1) / 2.0
    return Camera(pose=pose, fx=focal, fy=focal, cx=centre, cy=centre, width=res, height=res)


def reference_azimuths(n_views: int, n_frames: int = ORBIT_FRAMES) -> list[float]:
    """Azimuths (degrees) of the N reference views: orbit frames i*floor(n_frames/N), a = 360*i/n_frames."""
    require_whole_number("number of views", n_views, minimum=1, maximum=n_frames)
    step = n_frames // n_views
    return [360.0 * i * step / n_frames for i in range(n_views)]
