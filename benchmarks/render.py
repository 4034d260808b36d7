"""Time per reference view at 512x512 for a small mesh and a ~1M-face mesh.

Run: python benchmarks/render.py [--resolution 512] [--views 8]
Prints milliseconds per view (RGB + point map), measured after one warm-up view so that GL context
creation and the mesh upload are reported separately.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import trimesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from refany3d.cameras import orbit_camera, reference_azimuths  # noqa: E402
from refany3d.cli import positive_int, run_reporting_errors  # noqa: E402
from refany3d.examples import EXAMPLES_DIR  # noqa: E402
from refany3d.mesh import load_mesh  # noqa: E402
from refany3d.views import Renderer  # noqa: E402


def big_mesh(target_faces: int = 1_000_000) -> trimesh.Trimesh:
    """A bumpy UV sphere with about `target_faces` faces and vertex colours."""
    rings = int(np.sqrt(target_faces / 4))  # uv_sphere has about 4 * rings^2 faces
    sphere = trimesh.creation.uv_sphere(radius=1.0, count=(rings, rings))
    bumps = 1.0 + 0.05 * np.sin(12 * sphere.vertices[:, 0]) * np.cos(9 * sphere.vertices[:, 1])
    colors = np.clip((sphere.vertices * 0.5 + 0.5) * 255, 0, 255).astype(np.uint8)
    return trimesh.Trimesh(sphere.vertices * bumps[:, None], sphere.faces, vertex_colors=colors, process=False)


def time_views(renderer: Renderer, mesh: trimesh.Trimesh, resolution: int, n_views: int) -> tuple[float, float]:
    cameras = [orbit_camera(a, 0.0, 4.0, resolution) for a in reference_azimuths(n_views)]
    start = time.perf_counter()
    renderer.render(mesh, cameras[0])  # upload + first view
    first = time.perf_counter() - start
    start = time.perf_counter()
    for camera in cameras:
        renderer.render(mesh, camera)
    return first * 1e3, (time.perf_counter() - start) * 1e3 / n_views


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=positive_int, default=512)
    parser.add_argument("--views", type=positive_int, default=8)
    args = parser.parse_args()
    start = time.perf_counter()
    renderer = Renderer()
    small = load_mesh(EXAMPLES_DIR / "armchair.glb")
    big = big_mesh()
    print(f"resolution {args.resolution}, {args.views} views")
    for name, mesh in (("armchair (small)", small), ("bumpy sphere", big)):
        first, per_view = time_views(renderer, mesh, args.resolution, args.views)
        print(f"{name:18s} {len(mesh.faces):>9,d} faces: first view (upload) {first:7.1f} ms, "
              f"then {per_view:6.1f} ms/view")
    print(f"total incl. GL context and mesh generation: {time.perf_counter() - start:.1f} s")
    renderer.close()


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
