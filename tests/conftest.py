"""Shared by the tests: the repository's paths, the optional third-party folders beside it, random
view images, a thin sign, and tiny random models built once per seed for the whole session.

Test modules import the constants and helpers (`from conftest import VASE, random_views`); the
fixtures reach them as usual.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
VASE = REPO / "examples" / "vase.glb"

# Optional folders beside the repository (not part of it): tests that need one are skipped without it.
SHARED_MESHES = REPO.parent / "shared" / "meshes"  # third-party meshes in many formats
SHARED_PARITY = REPO.parent / "shared" / "parity"  # the release's parity script and fixture


def _present(folder: Path, what: str) -> Path:
    if not folder.is_dir():
        pytest.skip(f"../shared/{folder.name} is absent ({what}; expected at {folder})")
    return folder


@pytest.fixture
def shared_meshes() -> Path:
    """The third-party meshes folder; the test is skipped when it is absent."""
    return _present(SHARED_MESHES, "third-party meshes")


@pytest.fixture
def shared_parity() -> Path:
    """The release parity folder (check_parity.py, fixture/); the test is skipped when it is absent."""
    return _present(SHARED_PARITY, "the release's parity script and fixture")


def random_views(n: int, *, size: int = 32, seed: int = 0) -> tuple[list[Image.Image], list[Image.Image]]:
    """`n` random RGB views and `n` random point-map views, `size` x `size`, drawn from `seed`."""
    rng = np.random.default_rng(seed)
    make = lambda: Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))  # noqa: E731
    return [make() for _ in range(n)], [make() for _ in range(n)]


def sign_mesh(turn_deg: float = 0.0):
    """A square sign standing in the XY plane, no thickness along z, turned about the vertical
    axis: the 0° and 180° reference views see it edge-on (blank) unless it is turned."""
    import trimesh

    sign = trimesh.Trimesh([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], [[0, 1, 2], [0, 2, 3]])
    return sign.apply_transform(trimesh.transformations.rotation_matrix(np.radians(turn_deg), [0, 1, 0]))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model(seed)` -> (base_dir, ref_dir) of `refany3d.tiny.build_tiny_model(folder, seed=seed)`,
    built once per seed and shared by every test of the session: read it, never write into it (a
    test that changes a model copies it or builds its own)."""
    built: dict[int, tuple[Path, Path]] = {}

    def get(seed: int = 0) -> tuple[Path, Path]:
        if seed not in built:
            from refany3d.tiny import build_tiny_model

            built[seed] = build_tiny_model(tmp_path_factory.mktemp(f"tiny_seed{seed}"), seed=seed)
        return built[seed]

    return get
