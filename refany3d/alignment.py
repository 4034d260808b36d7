"""Alignment analysis: does the generated image show *this* asset, in one consistent pose?

The predicted point map names, for every foreground pixel, the point of the asset it shows
(per-axis min-max normalized coordinates, white background). Undoing that normalization gives
2D-3D correspondences, RANSAC PnP recovers the camera of the generated image from them, and the
asset is re-rendered at that camera so the result can be scored: inlier ratio, median reprojection
error, silhouette IoU, IoU with the object segmented in the generated image, colour agreement.

Why OpenCV (headless): PnP with RANSAC, its LM refinement and joint focal refinement
(`calibrateCamera`) are numerically delicate and need degenerate-case handling (planar point sets,
near-minimal samples); `cv2.solvePnPRansac` / `solvePnPRefineLM` are decades-tested, fast C++,
ship as one pip wheel without GUI dependencies, and the pipeline already needs OpenCV-style
intrinsics (cameras.py uses its pixel convention). GrabCut, contours and morphology come with it.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from refany3d.cameras import DEFAULT_FOV_Y_DEG, Camera, focal_from_fov
from refany3d.errors import AlignmentError, InputError, RefAny3DError, require_finite, require_whole_number
from refany3d.images import as_float_image
from refany3d.outputs import BACKGROUND_TOLERANCE, foreground_mask

# OpenGL camera axes (x right, y up, -z forward) <-> OpenCV axes (x right, y down, +z forward).

MIN_FOREGROUND_PIXELS = 64
MIN_INLIER_RATIO = 0.3  # below: the point map is not one view of this asset
MAX_POINTMAP_ERROR = 0.08  # median point-map disagreement (fraction of the size) above: wrong asset
_RANSAC_POINTS = 4000  # correspondences RANSAC looks at; all of them are scored afterwards
_FOCAL_SEARCH_FOVS = np.geomspace(8.0, 110.0, 18)  # vertical FOV candidates (degrees) for the search
_FOCAL_SEARCH_POINTS = 1500


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def default_intrinsics(width: int, height: int, fov_y_deg: float = DEFAULT_FOV_Y_DEG) -> np.ndarray:
    """The reference views' intrinsics: square pixels, vertical FOV `fov_y_deg`, centred."""
    focal = focal_from_fov(fov_y_deg, height)
    return np.array([[focal, 0.0, (width - 1) / 2.0], [0.0, focal, (height - 1) / 2.0], [0, 0, 1.0]])


# --------------------------------------------------------------------------------------------
# Pose from 2D-3D correspondences
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PoseEstimate:
    """A camera recovered from correspondences, with how well it explains them."""

    rotation: np.ndarray  # 3x3 world->camera, OpenCV axes
    translation: np.ndarray  # (3,) x_cv = rotation @ X + translation
    camera: Camera
    inlier_ratio: float  # fraction of correspondences within the inlier threshold
    reprojection_error_px: float  # median over all correspondences
    inlier_threshold_px: float
    n_correspondences: int


def _reprojection_errors(points: np.ndarray, pixels: np.ndarray, rvec: np.ndarray,
                         tvec: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pixel distance per correspondence; points behind the camera get +inf."""
    rot = cv2.Rodrigues(rvec)[0]
    cam = points @ rot.T + tvec.reshape(1, 3)
    z = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = cam[:, :2] / z[:, None] * np.array([K[0, 0], K[1, 1]]) + np.array([K[0, 2], K[1, 2]])
    err = np.linalg.norm(uv - pixels, axis=1)
    err[~(z > 1e-9) | ~np.isfinite(err)] = np.inf
    return err


def _check_spread(points: np.ndarray, estimate_focal: bool) -> None:
    """Refuse point sets no camera can be recovered from (a blob of one colour, a line)."""
    spread = np.linalg.svd(points - points.mean(axis=0), compute_uv=False) / math.sqrt(len(points))
    if spread[0] < 0.01:
        raise AlignmentError("the point map's foreground shows nearly a single 3D point "
                             "(one flat colour), so no camera can be recovered")
    if spread[1] < 0.02 * spread[0]:
        raise AlignmentError("the visible part of the asset is a line in 3D; no camera can be recovered")
    if estimate_focal and spread[2] < 0.02 * spread[0]:
        raise AlignmentError("the visible part of the asset is flat, which leaves the focal length "
                             "undetermined; give the field of view instead of estimating it")


def _ransac(points: np.ndarray, pixels: np.ndarray, K: np.ndarray, threshold: float,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """RANSAC PnP on a subsample, then LM refinement on all inliers; None when it finds nothing."""
    sample = rng.choice(len(points), size=min(len(points), _RANSAC_POINTS), replace=False)
    try:
        ok, rvec, tvec, _ = cv2.solvePnPRansac(
            points[sample], pixels[sample], K, None, iterationsCount=300,
            reprojectionError=threshold, confidence=0.9999, flags=cv2.SOLVEPNP_SQPNP)
    except cv2.error:
        return None
    if not ok or rvec is None:
        return None
    # Refine on *all* correspondences, keeping those within 3x the inliers' median error: the
    # inlier threshold is generous for noisy maps, and on clean ones the tighter cut keeps
    # slightly-off pixels (clamped colours, silhouette blends) from pulling the pose.
    err = _reprojection_errors(points, pixels, rvec, tvec, K)
    for _ in range(3):
        inliers = err < threshold
        if inliers.sum() < 6:
            return None
        keep = err < min(threshold, max(0.5, 3.0 * float(np.median(err[inliers]))))
        rvec, tvec = cv2.solvePnPRefineLM(points[keep], pixels[keep], K, None, rvec, tvec)
        err = _reprojection_errors(points, pixels, rvec, tvec, K)
    return rvec, tvec, err


def _estimate_focal(points: np.ndarray, pixels: np.ndarray, K: np.ndarray, width: int,
                    height: int, threshold: float, rng: np.random.Generator) -> np.ndarray:
    """Focal length by a coarse FOV search (RANSAC at each), then a joint LM refinement.

    The search ranks candidates by inlier count; `cv2.calibrateCamera` then refines focal and pose
    together on the inliers, with square pixels, the principal point fixed and no distortion.
    The search looks at a subsample (ranking needs few points); the refinement at all inliers.
    """
    sample = rng.choice(len(points), size=min(len(points), _FOCAL_SEARCH_POINTS), replace=False)
    best = None
    for fov in _FOCAL_SEARCH_FOVS:
        K_try = K.copy()
        K_try[0, 0] = K_try[1, 1] = focal_from_fov(float(fov), height)
        found = _ransac(points[sample], pixels[sample], K_try, threshold, rng)
        if found is None:
            continue
        err = found[2]
        score = (int((err < threshold).sum()), -float(np.median(err)))
        if best is None or score > best[0]:
            best = (score, K_try, found)
    if best is None:
        raise AlignmentError("no focal length explains the point map")
    _, K_best, (rvec, tvec, _) = best
    inliers = _reprojection_errors(points, pixels, rvec, tvec, K_best) < threshold
    flags = (cv2.CALIB_USE_INTRINSIC_GUESS | cv2.CALIB_USE_EXTRINSIC_GUESS
             | cv2.CALIB_FIX_PRINCIPAL_POINT | cv2.CALIB_FIX_ASPECT_RATIO
             | cv2.CALIB_ZERO_TANGENT_DIST | cv2.CALIB_FIX_K1 | cv2.CALIB_FIX_K2 | cv2.CALIB_FIX_K3)
    obj = points[inliers].astype(np.float32)
    img = pixels[inliers].astype(np.float32)
    try:
        _, K_ref, _, _, _ = cv2.calibrateCamera(
            [obj], [img], (width, height), K_best.copy(), np.zeros(5), [rvec.copy()], [tvec.copy()],
            flags=flags, criteria=(cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-10))
    except cv2.error:
        return K_best
    if not (np.isfinite(K_ref).all() and K_ref[0, 0] > 0):
        return K_best
    return K_ref


def estimate_pose(
    pixels: np.ndarray,
    points: np.ndarray,
    width: int,
    height: int,
    *,
    intrinsics: np.ndarray | None = None,
    fov_y_deg: float = DEFAULT_FOV_Y_DEG,
    estimate_focal: bool = False,
    inlier_threshold_px: float | None = None,
    seed: int = 0,
) -> PoseEstimate:
    """Recover the camera that maps 3D `points` (normalized frame) to `pixels` (u, v).

    Intrinsics: `intrinsics` (3x3) if given, else square pixels with vertical FOV `fov_y_deg`
    centred in the image; `estimate_focal=True` searches the focal length instead (principal point
    stays where the intrinsics put it). The inlier threshold defaults to 2% of the larger image
    side (at least 2 px): generated point maps are noisy, and an outlier is a pixel that names a
    clearly wrong point. Raises AlignmentError when no camera can be recovered.
    """
    pixels = np.asarray(pixels, dtype=np.float64).reshape(-1, 2)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(pixels) != len(points):
        raise InputError(f"{len(pixels)} pixels but {len(points)} points")
    if len(points) < MIN_FOREGROUND_PIXELS:
        raise AlignmentError(f"only {len(points)} foreground pixels; at least "
                             f"{MIN_FOREGROUND_PIXELS} are needed to recover a camera")
    _check_spread(points, estimate_focal)
    K = default_intrinsics(width, height, fov_y_deg) if intrinsics is None else np.asarray(
        intrinsics, dtype=np.float64)
    if K.shape != (3, 3) or not (K[0, 0] > 0 and K[1, 1] > 0):
        raise InputError("intrinsics must be a 3x3 matrix with positive focal lengths")
    threshold = inlier_threshold_px or max(2.0, 0.02 * max(width, height))
    rng = np.random.default_rng(seed)
    if estimate_focal:
        K = _estimate_focal(points, pixels, K, width, height, threshold, rng)
    found = _ransac(points, pixels, K, threshold, rng)
    if found is None:
        raise AlignmentError("RANSAC found no camera consistent with the point map")
    rvec, tvec, err = found
    rotation = cv2.Rodrigues(rvec)[0]
    translation = tvec.reshape(3).astype(np.float64)
    return PoseEstimate(
        rotation=rotation,
        translation=translation,
        camera=Camera.from_opencv(rotation, translation, K, width, height),
        inlier_ratio=float(np.mean(err < threshold)),
        reprojection_error_px=float(np.median(err)),
        inlier_threshold_px=float(threshold),
        n_correspondences=len(points),
    )


# --------------------------------------------------------------------------------------------
# Segmenting the generated image
# --------------------------------------------------------------------------------------------

_PLAIN_BORDER_SPREAD = 0.08  # colour distance of a border pixel to the median border colour ...
_PLAIN_BORDER_SHARE = 0.7  # ... that this share of the border stays within for a plain background
_OBJECT_COLOUR_DISTANCE = 0.12  # a pixel this far from a plain background's colour is object
_MAX_BACKGROUND_COLOURED = 0.3  # share of the point-map foreground that may look like background
_GRABCUT_SIDE = 256
_SPECK_SHARE = 0.02  # point-map blobs under this share of its foreground (or 5 px) do not place the box


def _without_specks(hint: np.ndarray) -> np.ndarray:
    """The point map's foreground without stray specks: a decoded point map has off-white pixels
    here and there (often a corner), which would stretch the object's bounding box to the frame."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(hint.astype(np.uint8), connectivity=8)
    smallest = max(5, _SPECK_SHARE * hint.sum())
    keep = [label for label in range(1, count) if stats[label, cv2.CC_STAT_AREA] >= smallest]
    if not keep:  # only specks: keep them all, so the box is as before
        return hint
    return np.isin(labels, keep)


def segment_object(image: np.ndarray, hint: np.ndarray, seed: int = 0) -> tuple[np.ndarray | None, str]:
    """The object's region in a generated image, and how it was found (or why it was not).

    A plain background (most of the image border is one colour) is separated by colour distance,
    unless much of the object has that colour too (then there is no answer, and it says so).
    Otherwise
    GrabCut runs with only a rectangle: the bounding box of `hint` (the point map's foreground,
    stray specks left out) grown by 10%; inside it, colour statistics alone decide the shape, so the IoU with `hint` still
    measures whether the image shows the object where the point map says. GrabCut's k-means starts
    from OpenCV's global RNG, so it is seeded with `seed` first: the same image gives the same mask
    whatever ran before.
    """
    height, width = image.shape[:2]
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                             image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    near = np.linalg.norm(border - background, axis=1) < _PLAIN_BORDER_SPREAD
    if near.mean() > _PLAIN_BORDER_SHARE:  # the object may touch the border, the rest is plain
        # background = the background-coloured regions connected to the border, so that parts of
        # the object that happen to have the background's colour but lie inside it still count
        plain = (np.linalg.norm(image - background, axis=2) <= _OBJECT_COLOUR_DISTANCE).astype(np.uint8)
        hidden = float(plain[hint].mean()) if hint.any() else 0.0
        if hidden > _MAX_BACKGROUND_COLOURED:
            return None, (f"{hidden:.0%} of the point map's foreground has the background's colour "
                          "in the image (a light object on a light background, or no object there)")
        _, labels = cv2.connectedComponents(plain, connectivity=4)
        edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        mask = ~np.isin(labels, edge_labels[edge_labels > 0])
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
        if not mask.any():
            return None, "plain background but no object found in the image"
        return mask, "plain background (border-connected regions of the border colour)"
    rows, cols = np.nonzero(_without_specks(hint))
    if len(rows) == 0:
        return None, "no point-map foreground to place the object"
    grow_r, grow_c = 0.1 * (rows.max() - rows.min() + 1), 0.1 * (cols.max() - cols.min() + 1)
    top, bottom = max(0, int(rows.min() - grow_r)), min(height - 1, int(rows.max() + grow_r))
    left, right = max(0, int(cols.min() - grow_c)), min(width - 1, int(cols.max() + grow_c))
    if (bottom - top + 1) * (right - left + 1) > 0.95 * height * width:
        return None, "the object fills the frame; no background to segment against"
    scale = min(1.0, _GRABCUT_SIDE / max(height, width))
    small = cv2.resize((image * 255).astype(np.uint8), None, fx=scale, fy=scale,
                       interpolation=cv2.INTER_AREA) if scale < 1 else (image * 255).astype(np.uint8)
    rect = (int(left * scale), int(top * scale), max(1, int((right - left + 1) * scale)),
            max(1, int((bottom - top + 1) * scale)))
    labels = np.zeros(small.shape[:2], np.uint8)
    cv2.setRNGSeed(seed)
    try:
        cv2.grabCut(small, labels, rect, np.zeros((1, 65)), np.zeros((1, 65)), 5,
                    cv2.GC_INIT_WITH_RECT)
    except cv2.error as err:
        return None, f"GrabCut failed ({err.msg.strip() if hasattr(err, 'msg') else err})"
    fg = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)
    mask = cv2.resize(fg, (width, height), interpolation=cv2.INTER_NEAREST) > 0
    if not mask.any():
        return None, "GrabCut found no object in the image"
    return mask, "GrabCut inside the point map's bounding box"


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def masked_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float | None:
    """PSNR (dB) of two [0,1] images inside `mask`; None for an empty mask, capped at 100 dB."""
    if not mask.any():
        return None
    return psnr_from_mse(float(np.mean((a[mask] - b[mask]) ** 2)))


def psnr_from_mse(mse: float) -> float:
    """PSNR (dB) of [0,1] images with this mean squared error, capped at 100 dB (identical images)."""
    return 100.0 if mse <= 1e-10 else min(100.0, 10.0 * math.log10(1.0 / mse))


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class AlignmentReport:
    """How well a generated (image, point map) pair shows the asset.

    `measurable` is False when no camera of this asset explains the point map; `reason` says why
    (and, when measurable, notes anything that could not be scored). The scores that could be
    computed are filled in either way, so a wrong asset still shows how badly it fits.
    """

    measurable: bool
    reason: str
    camera: Camera | None = None
    rotation: np.ndarray | None = None  # world->camera, OpenCV axes (x right, y down, z forward)
    translation: np.ndarray | None = None
    inlier_ratio: float | None = None
    reprojection_error_px: float | None = None
    iou: float | None = None  # re-rendered silhouette vs point-map foreground
    image_iou: float | None = None  # generated image's object region vs point-map foreground
    colour_psnr: float | None = None  # dB, generated image vs re-rendered asset inside both masks
    pointmap_error: float | None = None  # median |predicted - re-rendered| point, fraction of size
    foreground_pixels: int = 0
    image_segmentation: str = ""
    foreground: np.ndarray | None = field(default=None, repr=False)
    rendered: Any = field(default=None, repr=False)  # views.RenderedView at the recovered camera
    image: np.ndarray | None = field(default=None, repr=False)  # generated image, float [0,1]
    normalization: Any = field(default=None, repr=False)
    y_rotation: float = 0.0

    @property
    def orbit(self) -> dict[str, float] | None:
        """The recovered camera in orbit terms: azimuth, pitch, distance (as orbit_camera) and roll.

        Roll is the angle (degrees) from the orbit camera's right axis at that azimuth and pitch to
        the recovered right axis, positive when it turns towards the orbit camera's up axis.
        """
        if self.camera is None:
            return None
        pos = self.camera.position
        distance = float(np.linalg.norm(pos))
        if distance < 1e-9:
            return None
        azimuth = math.degrees(math.atan2(pos[2], pos[0]))
        pitch = math.degrees(math.asin(np.clip(pos[1] / distance, -1.0, 1.0)))
        a = math.radians(azimuth)
        right = np.array([math.sin(a), 0.0, -math.cos(a)])
        up = np.cross(pos / distance, right)
        cam_right = self.camera.pose[:3, 0]
        roll = math.degrees(math.atan2(cam_right @ up, cam_right @ right))
        return {"azimuth_deg": azimuth % 360.0, "pitch_deg": pitch, "distance": distance,
                "roll_deg": roll}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready numbers (None where not computed); colour_agreement is the PSNR in dB."""
        def num(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else float(x)

        return {
            "measurable": self.measurable,
            "reason": self.reason,
            "rotation": None if self.rotation is None else self.rotation.tolist(),
            "translation": None if self.translation is None else self.translation.tolist(),
            "inlier_ratio": num(self.inlier_ratio),
            "reprojection_error_px": num(self.reprojection_error_px),
            "iou": num(self.iou),
            "image_iou": num(self.image_iou),
            "colour_agreement": num(self.colour_psnr),
            "pointmap_error": num(self.pointmap_error),
            "foreground_pixels": self.foreground_pixels,
            "image_segmentation": self.image_segmentation,
            "orbit": self.orbit,
            "camera": None if self.camera is None else self.camera.to_dict(),
        }

    def summary(self) -> str:
        """A few human-readable lines (the CLI prints these, the app shows them)."""
        def fmt(x: float | None, spec: str, unit: str = "") -> str:
            return "n/a" if x is None else f"{x:{spec}}{unit}"

        lines = ["measurable: yes" if self.measurable else f"measurable: no ({self.reason})"]
        if self.rotation is not None:
            rvec = cv2.Rodrigues(self.rotation)[0].ravel()
            lines.append("rotation (world->camera, OpenCV): " + np.array2string(
                self.rotation, precision=4, suppress_small=True).replace("\n", ""))
            lines.append(f"rotation angle: {math.degrees(np.linalg.norm(rvec)):.2f} deg")
            lines.append("translation: " + np.array2string(self.translation, precision=4))
        if self.orbit is not None:
            o = self.orbit
            lines.append(f"camera: azimuth {o['azimuth_deg']:.1f} deg, pitch {o['pitch_deg']:.1f} deg, "
                         f"distance {o['distance']:.3f}, roll {o['roll_deg']:.1f} deg, "
                         f"focal {self.camera.fy:.1f} px")
        lines += [
            f"inlier_ratio: {fmt(self.inlier_ratio, '.3f')}",
            f"reprojection_error_px: {fmt(self.reprojection_error_px, '.2f')}",
            f"iou: {fmt(self.iou, '.3f')}",
            f"image_iou: {fmt(self.image_iou, '.3f')}"
            + (f" ({self.image_segmentation})" if self.image_segmentation else ""),
            f"colour_agreement: {fmt(self.colour_psnr, '.2f', ' dB PSNR')}",
            f"pointmap_error: {fmt(self.pointmap_error, '.4f')}",
        ]
        return "\n".join(lines)

    def overlay(self, alpha: float = 0.5) -> Image.Image | None:
        """The re-rendered asset blended over the generated image (or the point map when there is
        no image), with the re-rendered silhouette outlined; None when nothing was re-rendered."""
        if self.rendered is None:
            return None
        base = self.image if self.image is not None else None
        return overlay_image(base, self.rendered.rgb, self.rendered.mask, alpha)

    def frustum(self, depth: float | None = None, frame: str = "normalized") -> np.ndarray | None:
        """Line segments (S,2,3) of the recovered camera's frustum in `frame`; see frustum_segments."""
        if self.camera is None:
            return None
        segments = frustum_segments(self.camera, depth)
        return to_frame(segments, frame, self.normalization, self.y_rotation)


def overlay_image(image: np.ndarray | None, rendered_rgb: np.ndarray, mask: np.ndarray,
                  alpha: float = 0.5) -> Image.Image:
    """Blend `rendered_rgb` over `image` inside `mask` with weight `alpha`, outline the mask.

    `image` may be None (blends over white); it is resized to the render when sizes differ.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"overlay alpha must be within [0, 1], got {alpha}")
    rendered = np.asarray(rendered_rgb).astype(np.float32) / 255.0
    height, width = rendered.shape[:2]
    base = np.ones_like(rendered) if image is None else as_float_image(image)
    if base.shape[:2] != (height, width):
        base = cv2.resize(base, (width, height), interpolation=cv2.INTER_AREA)
    mask = np.asarray(mask, dtype=bool)
    out = base.copy()
    out[mask] = (1.0 - alpha) * base[mask] + alpha * rendered[mask]
    out8 = (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out8, contours, -1, (0, 255, 0), max(1, round(max(height, width) / 256)))
    return Image.fromarray(out8)


def frustum_segments(camera: Camera, depth: float | None = None) -> np.ndarray:
    """The camera's viewing pyramid as line segments (8,2,3) in the normalized frame.

    Four edges from the centre to the image-plane corners at `depth` (default: 40% of the
    distance to the origin) and the four sides of that image rectangle. Plain numbers, so any
    plotting library can draw them.
    """
    if depth is None:
        depth = 0.4 * max(float(np.linalg.norm(camera.position)), 1e-3)
    corners_px = np.array([[-0.5, -0.5], [camera.width - 0.5, -0.5],
                           [camera.width - 0.5, camera.height - 0.5], [-0.5, camera.height - 0.5]])
    rays_cv = np.column_stack([(corners_px[:, 0] - camera.cx) / camera.fx,
                               (corners_px[:, 1] - camera.cy) / camera.fy, np.ones(4)])
    rotation, translation = camera.world_to_camera_cv()
    corners = (rays_cv * depth - translation) @ rotation  # R^T (x - t), row-wise
    centre = camera.position
    edges = [(centre, c) for c in corners] + [(corners[i], corners[(i + 1) % 4]) for i in range(4)]
    return np.array(edges)


def to_frame(points: np.ndarray, frame: str, normalization: Any, y_rotation: float = 0.0) -> np.ndarray:
    """Normalized-frame points -> `frame`: "normalized", "own" (the mesh file's coordinates) or
    "pointmap" (point-map colour space, unclamped, with `y_rotation` applied).

    All three are affine maps, so line segments stay line segments.
    """
    points = np.asarray(points, dtype=np.float64)
    if frame == "normalized":
        return points
    if normalization is None:
        raise InputError(f"frame {frame!r} needs the asset's normalization")
    own = normalization.from_normalized(points)
    if frame == "own":
        return own
    if frame == "pointmap":
        # own_from_pointmap is affine and never clamps: invert it from its values at the unit basis
        basis = normalization.own_from_pointmap(np.vstack([np.zeros(3), np.eye(3)]), y_rotation)
        linear = (basis[1:] - basis[0]).T
        return (own - basis[0]) @ np.linalg.pinv(linear).T
    raise InputError(f"unknown frame {frame!r}; use 'normalized', 'own' or 'pointmap'")


# --------------------------------------------------------------------------------------------
# The whole measurement
# --------------------------------------------------------------------------------------------


def _same_size(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The generated image at the point map's size (they come out of one sampler, so only a
    uniform rescale is plausible; other shapes are refused)."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    if abs(w / h - width / height) > 0.01 * width / height:
        raise InputError(f"image {w}x{h} and point map {width}x{height} have different aspect ratios")
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def _check_align_settings(y_rotation, fov_y_deg, inlier_threshold_px, tolerance, seed) -> None:
    """InputError naming the first of align's settings that cannot be used as given."""
    require_finite("y_rotation", y_rotation)
    require_finite("fov_y_deg", fov_y_deg)
    if not 0 < fov_y_deg < 180:
        raise InputError(f"fov_y_deg must be between 0 and 180, got {fov_y_deg!r}")
    if inlier_threshold_px is not None:
        require_finite("inlier_threshold_px", inlier_threshold_px)
        if inlier_threshold_px <= 0:
            raise InputError(f"inlier_threshold_px must be positive (None: the default), got {inlier_threshold_px!r}")
    require_finite("tolerance", tolerance)
    if not 0 <= tolerance < 1:
        raise InputError(f"tolerance (how far from white a background pixel may be) must be in [0, 1), "
                         f"got {tolerance!r}")
    require_whole_number("seed", seed)


def align(
    mesh: Any,
    pointmap: Any,
    image: Any = None,
    *,
    y_rotation: float = 0.0,
    fov_y_deg: float = DEFAULT_FOV_Y_DEG,
    intrinsics: np.ndarray | None = None,
    estimate_focal: bool = False,
    inlier_threshold_px: float | None = None,
    renderer: Any = None,
    tolerance: float = BACKGROUND_TOLERANCE,
    seed: int = 0,
) -> AlignmentReport:
    """Recover the generated image's camera from its point map and score the match.

    `mesh` is a trimesh mesh or a path; `pointmap` and `image` are PIL images, arrays or paths;
    `y_rotation` is the one the reference views were made with. See `estimate_pose` for the
    intrinsics options. `renderer` defaults to this thread's shared `views.Renderer`. Inputs that
    cannot be measured give a report with `measurable=False` and a reason, not an exception;
    unreadable files and invalid settings raise MeshError / InputError.
    """
    from refany3d.mesh import as_mesh, normalization_of
    from refany3d.views import render_at

    _check_align_settings(y_rotation, fov_y_deg, inlier_threshold_px, tolerance, seed)
    mesh = as_mesh(mesh)
    normalization = normalization_of(mesh)
    P = as_float_image(pointmap, "point map")
    height, width = P.shape[:2]
    img = None if image is None else _same_size(as_float_image(image, "image"), height, width)
    fg = foreground_mask(P, tolerance)
    report = AlignmentReport(measurable=False, reason="", foreground_pixels=int(fg.sum()),
                             foreground=fg, image=img, normalization=normalization,
                             y_rotation=float(y_rotation))
    if img is not None and fg.any():
        region, report.image_segmentation = segment_object(img, fg, seed)
        report.image_iou = None if region is None else mask_iou(region, fg)

    rows, cols = np.nonzero(fg)
    pixels = np.column_stack([cols, rows]).astype(np.float64)
    points = normalization.to_normalized(normalization.own_from_pointmap(P[fg], y_rotation))
    try:
        pose = estimate_pose(pixels, points, width, height, intrinsics=intrinsics,
                             fov_y_deg=fov_y_deg, estimate_focal=estimate_focal,
                             inlier_threshold_px=inlier_threshold_px, seed=seed)
    except AlignmentError as err:
        report.reason = str(err)
        return report
    report.camera, report.rotation, report.translation = pose.camera, pose.rotation, pose.translation
    report.inlier_ratio, report.reprojection_error_px = pose.inlier_ratio, pose.reprojection_error_px

    rendered = render_at(mesh, pose.camera, renderer=renderer)
    report.rendered = rendered
    report.iou = mask_iou(rendered.mask, fg)
    both = rendered.mask & fg
    if both.any():
        rerendered = normalization.to_normalized(normalization.own_from_pointmap(rendered.pointmap_xyz[both]))
        predicted = normalization.to_normalized(normalization.own_from_pointmap(P[both], y_rotation))
        # the normalized frame's largest axis spans 2, so /2 makes it a fraction of the asset size
        report.pointmap_error = float(np.median(np.linalg.norm(rerendered - predicted, axis=1)) / 2.0)
    if img is not None:
        report.colour_psnr = masked_psnr(img, rendered.rgb.astype(np.float32) / 255.0, both)

    if pose.inlier_ratio < MIN_INLIER_RATIO:
        report.reason = (f"only {pose.inlier_ratio:.0%} of the foreground pixels fit one camera "
                         f"(at least {MIN_INLIER_RATIO:.0%} needed): the point map is not a view of "
                         "this asset")
    elif report.pointmap_error is None or report.pointmap_error > MAX_POINTMAP_ERROR:
        report.reason = ("the re-rendered asset does not overlap the point map's foreground"
                         if report.pointmap_error is None else
                         f"the point map's coordinates differ from the asset's surface by "
                         f"{report.pointmap_error:.0%} of its size (median; at most "
                         f"{MAX_POINTMAP_ERROR:.0%} expected): likely a different asset")
    else:
        report.measurable = True
        if img is not None and report.image_iou is None:
            report.reason = f"image IoU not measured: {report.image_segmentation}"
    return report


def consistency_key(report: AlignmentReport) -> tuple[bool, float, float]:
    """Sort key of a generation's self-consistency, larger is better: measurable first, then the
    larger share of the point map one camera explains (inlier ratio), then the smaller
    reprojection error. It reads only the generation and the asset, so it can choose among
    candidates at sampling time (no ground truth)."""
    inliers = report.inlier_ratio if report.inlier_ratio is not None else -1.0
    error = report.reprojection_error_px if report.reprojection_error_px is not None else math.inf
    return report.measurable, inliers, -error


def most_consistent(reports: list[AlignmentReport]) -> int:
    """Index of the most self-consistent report by `consistency_key` (the first of equals)."""
    if not reports:
        raise InputError("no candidates to choose from")
    return max(range(len(reports)), key=lambda i: consistency_key(reports[i]))


def candidate_record(first_seed: int, best: int, reports: list[AlignmentReport]) -> dict[str, Any]:
    """What settings.json keeps of a choice among candidates sampled with seeds first_seed + k:
    the chosen seed (alone, with one candidate, it gives the chosen image again), and each
    candidate's seed and how rigid its point map is."""
    keep = ("measurable", "inlier_ratio", "reprojection_error_px", "iou")
    return {"chosen_seed": first_seed + best,
            "candidate_scores": [{"seed": first_seed + k, **{key: report.to_dict()[key] for key in keep}}
                                 for k, report in enumerate(reports)]}


def choose_candidate(mesh: Any, candidates: list[tuple[Any, Any]],
                     y_rotation: float = 0.0) -> tuple[int, list[AlignmentReport]]:
    """Align every (image, point map) candidate with the asset; the index of the most
    self-consistent one (`most_consistent`) and every report."""
    from refany3d.mesh import as_mesh

    if not all(isinstance(c, (tuple, list)) and len(c) == 2 for c in candidates):
        raise InputError("candidates must be (image, point map) pairs")
    mesh = as_mesh(mesh)  # once for every candidate
    reports = [align(mesh, pointmap, image, y_rotation=y_rotation) for image, pointmap in candidates]
    return most_consistent(reports), reports


# --------------------------------------------------------------------------------------------
# Many runs: a folder of generate outputs
# --------------------------------------------------------------------------------------------

BATCH_COLUMNS = ("run", "measurable", "reason", "inlier_ratio", "reprojection_error_px", "iou",
                 "image_iou", "colour_agreement", "pointmap_error", "azimuth_deg", "pitch_deg",
                 "distance", "roll_deg", "foreground_pixels")


def _run_settings(run: Path) -> dict[str, Any]:
    """settings.json of a run, with keys at the top or under "settings" (those win: the writer in
    outputs.py keeps the run's settings there and a {"name", "sha256"} mesh record at the top)."""
    try:
        record = json.loads((run / "settings.json").read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"settings.json cannot be read: {err}") from None
    if not isinstance(record, dict):
        raise InputError("settings.json is not a JSON object")
    nested = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    return {**{k: v for k, v in record.items() if k != "settings"}, **nested}


def _run_mesh_path(run: Path, settings: dict[str, Any]) -> Path:
    """The mesh a run used: its "mesh" setting (a path, or a record with "path"/"name"), looked up
    as given, then next to the run, then next to the batch folder (also by file name alone)."""
    entry = settings.get("mesh")
    if isinstance(entry, dict):
        entry = entry.get("path") or entry.get("name")
    if not isinstance(entry, str) or not entry:
        raise InputError("settings.json names no mesh")
    name = Path(entry).name
    for candidate in (Path(entry), run / entry, run.parent / entry, run / name, run.parent / name):
        if candidate.is_file():
            return candidate
    raise InputError(f"mesh {entry!r} not found (give the mesh: `eval MESH --batch DIR`)")


def align_runs(directory: str | Path, mesh: str | os.PathLike | Any | None = None,
               **align_kwargs: Any) -> list[tuple[str, AlignmentReport]]:
    """Align every run folder (image.png, pointmap.png, settings.json) under `directory`.

    `mesh` (a path or a loaded mesh) replaces the runs' own, and a bad one fails at once. Each
    run's own mesh is loaded once for all runs that use it; a run that cannot be read becomes a
    not-measurable report with the reason, so one bad folder does not stop the batch.
    """
    from refany3d.mesh import as_mesh, load_mesh

    given = None if mesh is None else as_mesh(mesh)

    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"not a folder: {directory}")
    runs = sorted(p for p in directory.iterdir() if (p / "pointmap.png").is_file())
    if not runs:
        raise InputError(f"{directory} holds no run folders with a pointmap.png")
    meshes: dict[Path, Any] = {}
    results: list[tuple[str, AlignmentReport]] = []
    for run in runs:
        try:
            settings = _run_settings(run)
            if given is None:
                mesh_path = _run_mesh_path(run, settings)
                if mesh_path not in meshes:
                    meshes[mesh_path] = load_mesh(mesh_path)
            image = run / "image.png"
            report = align(given if given is not None else meshes[mesh_path], run / "pointmap.png",
                           image if image.is_file() else None,
                           y_rotation=float(settings.get("y_rotation", 0.0) or 0.0), **align_kwargs)
        except RefAny3DError as err:
            report = AlignmentReport(measurable=False, reason=str(err))
        results.append((run.name, report))
    return results


def batch_row(run: str, report: AlignmentReport) -> dict[str, Any]:
    """One CSV row (BATCH_COLUMNS) of a run's report."""
    values = report.to_dict()
    orbit = report.orbit or {}
    row = {"run": run, **{k: values.get(k) for k in BATCH_COLUMNS if k in values}, **orbit}
    return {k: ("" if row.get(k) is None else row[k]) for k in BATCH_COLUMNS}


def batch_summary(results: list[tuple[str, AlignmentReport]]) -> str:
    """Counts and medians over the measurable runs."""
    measured = [r for _, r in results if r.measurable]
    lines = [f"{len(measured)} of {len(results)} runs measurable"]
    for name in ("inlier_ratio", "reprojection_error_px", "iou", "image_iou", "colour_psnr",
                 "pointmap_error"):
        values = [getattr(r, name) for r in measured if getattr(r, name) is not None]
        if values:
            label = "colour_agreement" if name == "colour_psnr" else name
            lines.append(f"{label}: median {np.median(values):.3f}, mean {np.mean(values):.3f}, "
                         f"min {np.min(values):.3f}, max {np.max(values):.3f} ({len(values)} runs)")
    reasons = [f"  {run}: {r.reason}" for run, r in results if not r.measurable]
    if reasons:
        lines += ["not measurable:", *reasons]
    return "\n".join(lines)
