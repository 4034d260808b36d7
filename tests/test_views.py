"""Cameras and rendering, checked against geometry computed independently in the tests.

The test box has one colour per side, so which side a pixel shows is known from the camera alone.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from refany3d.cameras import Camera, look_at, orbit_camera, reference_azimuths
from refany3d.errors import InputError
from refany3d.mesh import load_mesh, normalization_of
from refany3d.views import Renderer, render_at, render_views

from conftest import sign_mesh


SIDE_COLORS = {  # (axis, sign) -> RGB
    (0, 1): (255, 0, 0), (0, -1): (0, 255, 255),
    (1, 1): (0, 255, 0), (1, -1): (255, 0, 255),
    (2, 1): (0, 0, 255), (2, -1): (255, 255, 0),
}


def side_quads(extents, center):
    """(axis, sign, 4 corners (counter-clockwise seen from outside), uv) for each side of a box."""
    half = np.asarray(extents, dtype=float) / 2
    for (axis, sign) in SIDE_COLORS:
        u_axis, v_axis = [a for a in range(3) if a != axis]
        corners = np.zeros((4, 3))
        corners[:, axis] = sign
        corners[:, u_axis] = [-1, 1, 1, -1]
        corners[:, v_axis] = [-1, -1, 1, 1]
        if np.cross(corners[1] - corners[0], corners[2] - corners[0])[axis] * sign < 0:
            corners = corners[::-1]
        yield axis, sign, corners * half + center, np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)[: 4]


def colored_box(extents=(2, 2, 2), center=(0, 0, 0)) -> trimesh.Trimesh:
    vertices, faces, colors = [], [], []
    for axis, sign, corners, _ in side_quads(extents, center):
        base = len(vertices) * 4
        vertices.append(corners)
        faces += [[base, base + 1, base + 2], [base, base + 2, base + 3]]
        colors.append(np.tile([*SIDE_COLORS[(axis, sign)], 255], (4, 1)))
    return trimesh.Trimesh(np.concatenate(vertices), np.array(faces), vertex_colors=np.concatenate(colors), process=False)


@pytest.fixture(scope="module")
def renderer():
    with Renderer() as r:
        yield r


@pytest.fixture(scope="module")
def box_glb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("box") / "box.glb"
    path.write_bytes(trimesh.Scene(colored_box()).export(file_type="glb"))
    return path


# ------------------------------------------------------------------------------------ cameras


def test_reference_azimuths_follow_the_60_frame_orbit():
    assert reference_azimuths(8) == [0.0, 42.0, 84.0, 126.0, 168.0, 210.0, 252.0, 294.0]
    assert reference_azimuths(4) == [0.0, 90.0, 180.0, 270.0]
    assert reference_azimuths(7) == [i * 8 * 6.0 for i in range(7)]  # floor(60/7) = 8 frames of 6 degrees
    for bad in (0, 61, 2.5):
        with pytest.raises(InputError):
            reference_azimuths(bad)


def test_orbit_camera_matches_release_formula_and_look_at():
    cam = orbit_camera(30.0, 20.0, radius=3.0, resolution=64)
    a, p = math.radians(30), math.radians(20)
    eye = 3.0 * np.array([math.cos(p) * math.cos(a), math.sin(p), math.cos(p) * math.sin(a)])
    np.testing.assert_allclose(cam.position, eye, atol=1e-12)
    np.testing.assert_allclose(cam.pose, look_at(eye), atol=1e-12)
    assert cam.fy == pytest.approx(32 / math.tan(math.radians(22.5)))
    assert (cam.cx, cam.cy) == (31.5, 31.5)
    np.testing.assert_allclose(cam.project(np.zeros((1, 3))), [[31.5, 31.5]], atol=1e-9)
    # the world's up direction projects upward in the image (v decreases)
    assert cam.project(np.array([[0.0, 0.5, 0.0]]))[0, 1] < 31.5


def test_orbit_camera_straight_above_is_well_defined():
    cam = orbit_camera(0.0, 90.0)
    assert np.all(np.isfinite(cam.pose))
    np.testing.assert_allclose(cam.pose[:3, :3] @ cam.pose[:3, :3].T, np.eye(3), atol=1e-12)


def test_camera_opencv_extrinsics_and_dict_round_trip():
    cam = Camera(pose=look_at((1.0, 2.0, 3.0), (0.1, 0.0, -0.2)), fx=70, fy=50, cx=20.3, cy=40.7, width=64, height=80)
    R, t = cam.world_to_camera_cv()
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)
    target_cv = R @ np.array([0.1, 0.0, -0.2]) + t
    assert target_cv[0] == pytest.approx(0, abs=1e-12) and target_cv[1] == pytest.approx(0, abs=1e-12)
    assert target_cv[2] > 0  # in front of the camera
    np.testing.assert_allclose(cam.project(np.array([[0.1, 0.0, -0.2]])), [[20.3, 40.7]], atol=1e-9)
    assert Camera.from_dict(cam.to_dict()) == cam
    assert np.isnan(cam.project(np.array([[2.0, 4.0, 6.0]]))).all()  # behind the camera
    with pytest.raises(InputError):
        Camera(pose=np.eye(4), fx=-1, fy=1, cx=0, cy=0, width=4, height=4)


# ---------------------------------------------------------------------------------- rendering


def _inside(poly: np.ndarray, points: np.ndarray, margin: float) -> np.ndarray:
    """Points at least `margin` pixels inside a convex polygon (either winding)."""
    signed = []
    for i in range(len(poly)):
        a, b = poly[i], poly[(i + 1) % len(poly)]
        edge = b - a
        signed.append((edge[0] * (points[:, 1] - a[1]) - edge[1] * (points[:, 0] - a[0])) / np.linalg.norm(edge))
    signed = np.stack(signed, 1)
    return np.all(signed > margin, 1) | np.all(signed < -margin, 1)


@pytest.mark.parametrize(
    "camera",
    [
        orbit_camera(0.0, resolution=64),
        Camera(pose=look_at((3.5, 1.2, 0.8)), fx=70.0, fy=50.0, cx=20.3, cy=40.7, width=64, height=80),
    ],
    ids=["orbit", "off-centre-anisotropic"],
)
def test_projected_side_lands_where_the_renderer_draws_it(renderer, camera):
    mesh = colored_box()
    view = renderer.render(mesh, camera)
    vv, uu = np.mgrid[0 : camera.height, 0 : camera.width]
    pixels = np.stack([uu.ravel(), vv.ravel()], 1).astype(float)
    corners = next(c for axis, sign, c, _ in side_quads((2, 2, 2), (0, 0, 0)) if (axis, sign) == (0, 1))
    poly = camera.project(corners)
    inside = _inside(poly, pixels, margin=0.75).reshape(camera.height, camera.width)
    assert inside.sum() > 100
    assert np.all(view.rgb[inside] == SIDE_COLORS[(0, 1)])
    # the +x side is at x = +1 = the top of the x range: red channel of the point map is 1
    np.testing.assert_allclose(view.pointmap_xyz[inside][:, 0], 1.0, atol=1e-4)
    silhouette = camera.project(mesh.vertices)
    # pixels far outside the box's projected bounding rectangle are white background
    lo, hi = silhouette.min(0) - 1, silhouette.max(0) + 1
    far = ((pixels[:, 0] < lo[0]) | (pixels[:, 0] > hi[0]) | (pixels[:, 1] < lo[1]) | (pixels[:, 1] > hi[1])).reshape(inside.shape)
    assert np.all(view.rgb[far] == 255) and not view.mask[far].any()
    assert np.all(view.pointmap_xyz[far] == 1.0)


def test_point_map_is_exact_surface_even_at_silhouettes(renderer):
    """Every foreground pixel of a cube lies on the cube: blended or quantized values would not."""
    mesh = colored_box()
    norm = normalization_of(mesh)
    camera = orbit_camera(33.0, 27.0, resolution=96)
    view = renderer.render(mesh, camera)
    own = norm.own_from_pointmap(view.pointmap_xyz[view.mask])
    np.testing.assert_allclose(np.abs(own).max(1), 1.0, atol=2e-4)
    # and each recovered point projects back to its own pixel centre
    rows, cols = np.nonzero(view.mask)
    np.testing.assert_allclose(camera.project(norm.to_normalized(own)), np.stack([cols, rows], 1), atol=0.02)
    # silhouette pixels are included (the mask is not eroded)
    edge = view.mask & ~np.pad(view.mask, 1)[2:, 1:-1]
    assert edge.sum() > 10


def _recovered_points_sit_on_their_pixels(view, norm, camera) -> np.ndarray:
    own = norm.own_from_pointmap(view.pointmap_xyz[view.mask])
    rows, cols = np.nonzero(view.mask)
    np.testing.assert_allclose(camera.project(norm.to_normalized(own)), np.stack([cols, rows], 1), atol=0.02)
    return own


def test_surfaces_seen_from_behind_are_in_the_point_map(renderer):
    """pyrender culls back faces in its depth pass: an open surface seen from behind, and a box
    wound inside out, must still be measured where the RGB view shows them."""
    box = colored_box()
    inside_out = trimesh.Trimesh(box.vertices, box.faces[:, ::-1], vertex_colors=box.visual.vertex_colors,
                                 process=False)
    camera = orbit_camera(33.0, 27.0, resolution=64)
    normal, flipped = renderer.render(box, camera), renderer.render(inside_out, camera)
    assert normal.mask.sum() > 500
    np.testing.assert_array_equal(flipped.mask, normal.mask)
    np.testing.assert_array_equal(flipped.rgb, normal.rgb)
    np.testing.assert_allclose(flipped.pointmap_xyz, normal.pointmap_xyz, atol=1e-6)

    # two sides of the box (+x, +y) only, looked at from the -x, -y side: both from behind
    keep = [i for i, (axis, sign) in enumerate(SIDE_COLORS) if sign == 1 and axis < 2]
    faces = box.faces.reshape(6, 2, 3)[keep].reshape(-1, 3)
    open_box = trimesh.Trimesh(box.vertices, faces, vertex_colors=box.visual.vertex_colors, process=False)
    behind = Camera(pose=look_at((-3.0, -2.0, -2.5)), fx=60.0, fy=60.0, cx=31.5, cy=31.5, width=64, height=64)
    view = renderer.render(open_box, behind)
    drawn = (view.rgb != 255).any(axis=-1)
    assert drawn.sum() > 300
    # the mask is the drawn area (up to silhouette pixels the multisampled RGB pass blends)
    assert (view.mask != drawn).sum() <= 0.1 * drawn.sum()
    own = _recovered_points_sit_on_their_pixels(view, normalization_of(open_box), behind)
    assert (np.isclose(own[:, 0], 1.0, atol=2e-4) | np.isclose(own[:, 1], 1.0, atol=2e-4)).all()


def test_a_mesh_far_from_the_origin_keeps_its_shape(renderer):
    """Coordinates are normalized in float64 before the GPU's float32: a scan placed millions of
    units out (float32 steps of 0.25 there) keeps its shape."""
    camera = orbit_camera(33.0, 27.0, resolution=64)
    sphere = trimesh.creation.icosphere(subdivisions=3)
    near = renderer.render(sphere, camera)
    far_sphere = trimesh.Trimesh(sphere.vertices + (3.3e6, -1.7e6, 2.9e6), sphere.faces, process=False)
    far = renderer.render(far_sphere, camera)
    assert (far.mask != near.mask).sum() <= 2
    both = far.mask & near.mask
    np.testing.assert_allclose(far.pointmap_xyz[both], near.pointmap_xyz[both], atol=1e-4)


def test_trimesh_objects_render_as_their_files_do(box_glb):
    """A mesh or scene from trimesh is checked and folded into one appearance as a loaded file is."""
    from refany3d.errors import MeshError

    from_file = render_views(box_glb, n_views=2, resolution=48)
    from_scene = render_views(trimesh.load_scene(box_glb), n_views=2, resolution=48)
    for a, b in zip(from_file.rgb + from_file.pointmap, from_scene.rgb + from_scene.pointmap):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    box = trimesh.creation.box(extents=(2, 2, 2))  # an OBJ-style material with a texture: drawn green
    green = Image.fromarray(np.full((8, 8, 3), (20, 180, 40), np.uint8))
    box.visual = trimesh.visual.TextureVisuals(uv=np.full((len(box.vertices), 2), 0.5),
                                               material=trimesh.visual.material.SimpleMaterial(image=green))
    views = render_views(box, n_views=1, resolution=48)
    assert (np.asarray(views.rgb[0])[views.masks[0]] == (20, 180, 40)).all(axis=-1).mean() > 0.9

    faces = trimesh.creation.box(extents=(2, 2, 2))  # one colour per face stays one colour per face
    palette = np.random.default_rng(0).integers(0, 256, (len(faces.faces), 3))
    faces.visual.face_colors = np.concatenate([palette, np.full((len(palette), 1), 255)], axis=1).astype(np.uint8)
    views = render_views(faces, n_views=1, resolution=48)
    pixels = np.asarray(views.rgb[0])[views.masks[0]]
    assert (pixels[:, None, :] == palette[None]).all(axis=-1).any(axis=1).mean() > 0.8

    nan_box = trimesh.creation.box()
    nan_box.vertices[0] = np.nan
    for bad, message in [(trimesh.Trimesh(), "no faces \\(empty\\)"),
                         (trimesh.PointCloud(np.random.default_rng(0).random((9, 3))), "no faces \\(a point cloud"),
                         (trimesh.Trimesh(nan_box.vertices, nan_box.faces, process=False), "NaN or infinite")]:
        with pytest.raises(MeshError, match=message):
            render_views(bad, n_views=1, resolution=32)


def test_views_follow_azimuth_order_and_pitch(box_glb):
    views = render_views(box_glb, n_views=4, resolution=32)
    assert views.azimuths == [0.0, 90.0, 180.0, 270.0]
    centre = [tuple(np.asarray(im)[16, 16]) for im in views.rgb]
    # eye at +x, +z, -x, -z in turn
    assert centre == [SIDE_COLORS[(0, 1)], SIDE_COLORS[(2, 1)], SIDE_COLORS[(0, -1)], SIDE_COLORS[(2, -1)]]
    above = render_views(box_glb, n_views=1, resolution=32, pitch=60.0)
    below = render_views(box_glb, n_views=1, resolution=32, pitch=-60.0)
    assert tuple(np.asarray(above.rgb[0])[16, 16]) == SIDE_COLORS[(1, 1)]
    assert tuple(np.asarray(below.rgb[0])[16, 16]) == SIDE_COLORS[(1, -1)]
    assert all(m.dtype == bool and m.shape == (32, 32) for m in views.masks)


def test_y_rotation_rotates_point_map_colours_only(renderer):
    mesh = colored_box(extents=(2.0, 1.0, 1.0), center=(5.0, 3.0, -2.0))
    camera = orbit_camera(42.0, 15.0, resolution=48)
    plain = render_at(mesh, camera, renderer=renderer)
    turned = render_at(mesh, camera, y_rotation=90.0, renderer=renderer)
    np.testing.assert_array_equal(plain.rgb, turned.rgb)
    p, q = plain.pointmap_xyz[plain.mask], turned.pointmap_xyz[plain.mask]
    # R_y(90) maps centred (x, y, z) to (z, y, -x)
    np.testing.assert_allclose(q[:, 0], p[:, 2], atol=1e-6)
    np.testing.assert_allclose(q[:, 1], p[:, 1], atol=1e-6)
    np.testing.assert_allclose(q[:, 2], 1.0 - p[:, 0], atol=1e-6)


def test_point_map_uses_own_frame_min_max_per_axis(renderer):
    mesh = colored_box(extents=(2.0, 1.0, 4.0), center=(5.0, 3.0, -2.0))
    norm = normalization_of(mesh)
    assert norm.scale == pytest.approx(0.5)
    np.testing.assert_allclose(norm.center, [5, 3, -2])
    camera = orbit_camera(0.0, 30.0, resolution=64)  # sees +x and +y sides
    view = renderer.render(mesh, camera)
    P = view.pointmap_xyz[view.mask]
    own = np.stack([4.0 + 2.0 * P[:, 0], 2.5 + 1.0 * P[:, 1], -4.0 + 4.0 * P[:, 2]], 1)
    on_side = np.isclose(own[:, 0], 6.0, atol=1e-3) | np.isclose(own[:, 1], 3.5, atol=1e-3)
    assert on_side.all()


def test_known_texture_lands_on_known_pixels(renderer, tmp_path):
    """Quadrant texture on the +x side: a surface point at uv (0.25, 0.75) shows the top-left quadrant."""
    quadrants = np.zeros((64, 64, 3), np.uint8)
    quadrants[:32, :32] = (200, 30, 30)  # top-left of the image = uv (u<.5, v>.5)
    quadrants[:32, 32:] = (30, 200, 30)
    quadrants[32:, :32] = (30, 30, 200)
    quadrants[32:, 32:] = (220, 220, 40)
    vertices, faces, uvs = [], [], []
    for axis, sign, corners, uv in side_quads((2, 2, 2), (0, 0, 0)):
        base = len(vertices) * 4
        vertices.append(corners)
        uvs.append(uv)
        faces += [[base, base + 1, base + 2], [base, base + 2, base + 3]]
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(quadrants), baseColorFactor=[10, 10, 10, 255])
    box = trimesh.Trimesh(np.concatenate(vertices), np.array(faces), process=False,
                          visual=trimesh.visual.TextureVisuals(uv=np.concatenate(uvs), material=material))
    path = tmp_path / "textured.glb"
    path.write_bytes(trimesh.Scene(box).export(file_type="glb"))
    mesh = load_mesh(path)
    camera = orbit_camera(0.0, resolution=128)
    view = renderer.render(mesh, camera)
    axis, sign, corners, uv = next(q for q in side_quads((2, 2, 2), (0, 0, 0)) if q[:2] == (0, 1))

    def surface(u, v):  # bilinear map of the quad from its corner uvs (0,0) (1,0) (1,1) (0,1)
        return (1 - u) * (1 - v) * corners[0] + u * (1 - v) * corners[1] + u * v * corners[2] + (1 - u) * v * corners[3]

    expected = {(0.25, 0.75): (200, 30, 30), (0.75, 0.75): (30, 200, 30), (0.25, 0.25): (30, 30, 200), (0.75, 0.25): (220, 220, 40)}
    for (u, v), rgb in expected.items():
        col, row = np.round(camera.project(surface(u, v)[None])[0]).astype(int)
        # used as is: the baseColorFactor (10, 10, 10) does not darken the texture
        assert tuple(view.rgb[row, col]) == rgb


def test_render_views_outputs_and_bad_settings(box_glb):
    views = render_views(box_glb, n_views=3, resolution=40, radius=5.0)
    assert len(views.rgb) == len(views.pointmap) == len(views.cameras) == 3
    assert views.rgb[0].size == (40, 40) and views.pointmap[0].mode == "RGB"
    xyz = views.pointmap_xyz[0]
    assert xyz.dtype == np.float32 and xyz.shape == (40, 40, 3)
    np.testing.assert_array_equal(np.asarray(views.pointmap[0]), np.round(xyz * 255).astype(np.uint8))
    assert views.cameras[1] == orbit_camera(views.azimuths[1], 0.0, 5.0, 40)
    for kwargs in ({"n_views": 0}, {"resolution": 2}, {"resolution": 64.5}, {"radius": 0.5}, {"pitch": 120.0},
                   {"y_rotation": float("nan")}):
        with pytest.raises(InputError):
            render_views(box_glb, **kwargs)
    with pytest.raises(InputError):
        render_views(12345)


def test_cli_render_writes_views(box_glb, tmp_path, capsys):
    from refany3d.cli import main

    out = tmp_path / "views"
    assert main(["render", str(box_glb), "--views", "2", "--resolution", "32", "--pitch", "10", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["contact_sheet.png", "pointmap_00.png", "pointmap_01.png", "rgb_00.png", "rgb_01.png", "views.json"]
    import json

    meta = json.loads((out / "views.json").read_text())
    assert meta["azimuths"] == [0.0, 180.0] and meta["pitch"] == 10.0
    assert Camera.from_dict(meta["cameras"][1]) == orbit_camera(180.0, 10.0, 4.0, 32)
    bad = tmp_path / "bad.glb"
    bad.write_bytes(b"not a mesh at all")
    assert main(["render", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: bad.glb")


def test_views_that_see_a_thin_asset_edge_on_are_named():
    """A sign seen edge-on by the 0° and 180° views: the note names those two, and turning the mesh
    by 45°, as it advises, leaves none blind. No note when no view or every view is blind."""
    views = render_views(sign_mesh(), n_views=4, resolution=32)
    shares = [float(m.mean()) for m in views.masks]
    assert shares[0] == shares[2] == 0.0 and min(shares[1], shares[3]) > 0.2
    note = views.blind_views_note()
    assert note.startswith("2 of 4 reference views (azimuth 0°, 180°) show almost nothing of the asset")
    assert "turned about its vertical axis in its file (by 45°, say) is seen in every view" in note
    turned = render_views(sign_mesh(45.0), n_views=4, resolution=32)
    assert min(float(m.mean()) for m in turned.masks) > 0.2 and turned.blind_views_note() is None
    # a thin but not flat board (2 % thick) still shows a sliver edge-on at 64 px: not blind
    board = render_views(trimesh.creation.box(extents=(2.0, 2.0, 0.04)), n_views=4, resolution=64)
    assert 0.0 < float(board.masks[0].mean()) and board.blind_views_note() is None
    # a rug circled at pitch 0 is blind in every view: require_visible refuses it, the note stays out of it
    rug = trimesh.Trimesh([[-1, 0, -1], [1, 0, -1], [1, 0, 1], [-1, 0, 1]], [[0, 2, 1], [0, 3, 2]])
    assert render_views(rug, n_views=4, resolution=32).blind_views_note() is None


def test_cli_render_prints_the_blind_views_note_as_one_line(tmp_path, capsys):
    from refany3d.cli import main

    sign = tmp_path / "sign.obj"
    sign_mesh().export(sign)
    assert main(["render", str(sign), "--views", "4", "--resolution", "32", "--out", str(tmp_path / "v")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: 2 of 4 reference views (azimuth 0°, 180°) show almost nothing")
    assert (tmp_path / "v" / "rgb_03.png").is_file()  # still written: a note, not an error
    # each run says it again (Python shows a warning once per place by default)
    assert main(["render", str(sign), "--views", "4", "--resolution", "32", "--out", str(tmp_path / "w")]) == 0
    assert capsys.readouterr().err.count("warning: 2 of 4") == 1


@pytest.mark.parametrize("name", ["Duck.glb", "CesiumMilkTruck.glb", "capsule.obj"])
def test_shared_meshes_render_upright_and_textured(shared_meshes, name):
    views = render_views(shared_meshes / name, n_views=2, resolution=96)
    for rgb, mask, xyz in zip(views.rgb, views.masks, views.pointmap_xyz):
        pixels = np.asarray(rgb)[mask]
        assert 0.03 < mask.mean() < 0.9
        assert len(np.unique(pixels // 16, axis=0)) > 3  # textured, not one flat colour
        # point-map green (own-frame y) grows upward in the image for upright assets
        rows = np.nonzero(mask)[0]
        top, bottom = rows < np.percentile(rows, 20), rows > np.percentile(rows, 80)
        if name != "capsule.obj":
            assert xyz[mask][top, 1].mean() > xyz[mask][bottom, 1].mean()


def test_closing_one_renderer_leaves_the_others_working():
    """pyrender's EGL platform used to terminate the process-wide display on delete (EGL_BAD_DISPLAY)."""
    from refany3d.examples import EXAMPLES_DIR

    path = EXAMPLES_DIR / "vase.glb"
    before = render_views(path, n_views=1, resolution=32)
    with Renderer() as other:
        other.render(load_mesh(path), before.cameras[0])
    after = render_views(path, n_views=1, resolution=32)
    np.testing.assert_array_equal(np.asarray(before.rgb[0]), np.asarray(after.rgb[0]))


def test_no_opengl_is_a_render_error_naming_what_to_install(monkeypatch):
    """Without a usable GL context the renderer says what to install, not a GL traceback."""
    import pyrender

    from refany3d.errors import RenderError

    def no_context(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(pyrender, "OffscreenRenderer", no_context)
    with pytest.raises(RenderError, match=r"cannot create an offscreen OpenGL context .*no display.*libegl1"):
        Renderer().render(trimesh.creation.box(), orbit_camera(0.0, 0.0, 4.0, 32))
