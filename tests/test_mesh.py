"""Mesh ingestion: formats, scenes, appearance priority, and every kind of bad input."""
from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from refany3d.errors import MeshError, RefAny3DWarning
from refany3d.mesh import Normalization, load_mesh, normalization_of


CUBE_OBJ = """v 0 0 0\nv 2 0 0\nv 2 1 0\nv 0 1 0\nv 0 0 3\nv 2 0 3\nv 2 1 3\nv 0 1 3
f 1 3 2\nf 1 4 3\nf 5 6 7\nf 5 7 8\nf 1 2 6\nf 1 6 5\nf 4 8 7\nf 4 7 3\nf 1 5 8\nf 1 8 4\nf 2 3 7\nf 2 7 6
"""
CUBE_BOUNDS = np.array([[0, 0, 0], [2, 1, 3]], float)


def write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def box_mesh(**visual) -> trimesh.Trimesh:
    box = trimesh.creation.box(bounds=CUBE_BOUNDS)
    return trimesh.Trimesh(box.vertices, box.faces, process=False, **visual)


# ------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("suffix", ["glb", "ply", "stl", "off", "obj"])
def test_formats_load_with_own_frame_bounds(tmp_path, suffix):
    mesh = load_mesh(write(tmp_path / f"box.{suffix}", box_mesh().export(file_type=suffix)))
    assert len(mesh.faces) == 12
    np.testing.assert_allclose(mesh.bounds, CUBE_BOUNDS)
    np.testing.assert_array_equal(mesh.visual.vertex_colors[:, :3], 128)  # no appearance -> gray


def test_gltf_with_external_buffer_and_texture(tmp_path):
    uv = np.random.default_rng(0).random((8, 2))
    texture = np.zeros((8, 8, 3), np.uint8)
    texture[..., 1] = 200
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(texture))
    mesh = box_mesh(visual=trimesh.visual.TextureVisuals(uv=uv, material=material))
    files = trimesh.Scene(mesh).export(file_type="gltf")
    assert len(files) > 1  # the .gltf plus external buffer/texture files
    for name, data in files.items():
        write(tmp_path / name, data)
    loaded = load_mesh(tmp_path / "model.gltf")
    np.testing.assert_allclose(loaded.bounds, CUBE_BOUNDS)
    atlas = np.asarray(loaded.visual.material.baseColorTexture.convert("RGB"))
    assert (atlas[..., 1] == 200).all() and (atlas[..., 0] == 0).all()

    alone = tmp_path / "alone"  # uploaded without its buffers: say which file is missing and what to give
    alone.mkdir()
    (alone / "model.gltf").write_bytes((tmp_path / "model.gltf").read_bytes())
    buffer = json.loads((alone / "model.gltf").read_text())["buffers"][0]["uri"]
    with pytest.raises(MeshError, match=f"model.gltf refers to {re.escape(buffer)}, which is not beside it: give a "
                                        "\\.glb \\(one file\\), or a \\.zip of model.gltf with the files it refers to"):
        load_mesh(alone / "model.gltf")


def test_obj_with_mtl_texture_whose_name_has_spaces(tmp_path):
    Image.fromarray(np.full((4, 4, 3), (10, 20, 30), np.uint8)).save(tmp_path / "my texture.png")
    write(tmp_path / "chair.mtl", "newmtl fabric\nKd 1 1 1\nmap_Kd my texture.png\n")
    uv_lines = "vt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\n"
    faces = "\n".join(f"f {a}/1 {b}/2 {c}/3" for a, b, c in
                      [line.split()[1:] for line in CUBE_OBJ.splitlines() if line.startswith("f")])
    obj = "mtllib chair.mtl\n" + "\n".join(l for l in CUBE_OBJ.splitlines() if l.startswith("v")) + "\n" + uv_lines + "usemtl fabric\n" + faces + "\n"
    mesh = load_mesh(write(tmp_path / "chair.obj", obj))
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)
    atlas = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"))
    assert (atlas == (10, 20, 30)).all(axis=-1).mean() > 0.5


@pytest.mark.parametrize("missing", ["chair.mtl", "wood grain.png"])
def test_obj_whose_material_or_texture_is_not_beside_it_is_refused(tmp_path, missing):
    """trimesh drops what it cannot find, and a white material would render white on white."""
    Image.fromarray(np.full((4, 4, 3), 90, np.uint8)).save(tmp_path / "wood grain.png")
    write(tmp_path / "chair.mtl", "newmtl wood\nKd 1 1 1\nmap_Kd wood grain.png\n")
    obj = write(tmp_path / "chair.obj", "mtllib chair.mtl\nusemtl wood\n" + CUBE_OBJ)
    assert isinstance(load_mesh(obj).visual, trimesh.visual.ColorVisuals)  # whole: loads (no uv: its Kd)
    (tmp_path / missing).unlink()
    with pytest.raises(MeshError, match=f"chair.obj refers to {missing}, which is not beside it: give a .zip of "
                                        "chair.obj with its .mtl and textures"):
        load_mesh(obj)


def test_a_file_in_another_format_says_it_may_not_be_that_format(tmp_path):
    glb_bytes = box_mesh().export(file_type="glb")
    with pytest.raises(MeshError, match=r"box.obj has no faces \(empty\); a surface mesh is needed, "
                                        r"or the file is not valid OBJ"):
        load_mesh(write(tmp_path / "box.obj", glb_bytes))


def test_obj_material_diffuse_colour(tmp_path):
    write(tmp_path / "m.mtl", "newmtl red\nKd 1 0 0\n")
    mesh = load_mesh(write(tmp_path / "m.obj", "mtllib m.mtl\nusemtl red\n" + CUBE_OBJ))
    np.testing.assert_array_equal(mesh.visual.vertex_colors[:, :3], np.tile([255, 0, 0], (len(mesh.vertices), 1)))


def test_zip_with_side_files_loads_and_cleans_up(tmp_path):
    write(tmp_path / "m.mtl", "newmtl blue\nKd 0 0 1\n")
    archive = tmp_path / "asset.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("asset/m.obj", "mtllib m.mtl\nusemtl blue\n" + CUBE_OBJ)
        zf.write(tmp_path / "m.mtl", "asset/m.mtl")
        zf.writestr("__MACOSX/asset/._m.obj", "junk")
    before = set(os.listdir(tempfile.gettempdir()))
    mesh = load_mesh(archive)
    assert set(os.listdir(tempfile.gettempdir())) <= before  # temp folder removed
    np.testing.assert_allclose(mesh.bounds, CUBE_BOUNDS)
    assert tuple(mesh.visual.vertex_colors[0, :3]) == (0, 0, 255)


# ------------------------------------------------------------------------ scenes, appearance


def test_scene_node_transforms_are_applied_and_merged(tmp_path):
    unit = trimesh.creation.box(extents=(1, 1, 1))
    scene = trimesh.Scene()
    scene.add_geometry(unit, node_name="a", geom_name="g", transform=trimesh.transformations.translation_matrix((10, 0, 0)))
    parent = trimesh.transformations.rotation_matrix(np.pi / 2, (0, 0, 1))
    scene.graph.update(frame_to="parent", frame_from=scene.graph.base_frame, matrix=parent)
    scene.add_geometry(unit.copy(), node_name="child", geom_name="g2", parent_node_name="parent",
                       transform=trimesh.transformations.translation_matrix((0, -5, 0)))
    mesh = load_mesh(write(tmp_path / "scene.glb", scene.export(file_type="glb")))
    assert len(mesh.faces) == 24
    # child: rotated 90 deg about z after moving to y=-5 -> centred at (5, 0, 0)
    np.testing.assert_allclose(mesh.bounds, [[4.5, -0.5, -0.5], [10.5, 0.5, 0.5]], atol=1e-6)


def test_appearance_priority_texture_over_factor_over_vertex_colours(tmp_path):
    red = np.full((4, 4, 3), (255, 0, 0), np.uint8)
    uv = np.zeros((8, 2)) + 0.5
    textured = box_mesh(visual=trimesh.visual.TextureVisuals(
        uv=uv, material=trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(red), baseColorFactor=[0, 0, 255, 255])))
    flat = box_mesh(visual=trimesh.visual.TextureVisuals(
        uv=uv, material=trimesh.visual.material.PBRMaterial(baseColorFactor=[0, 255, 0, 255])))
    vertex = box_mesh(vertex_colors=np.tile([9, 8, 7, 255], (8, 1)))
    loaded = {name: load_mesh(write(tmp_path / f"{name}.glb", m.export(file_type="glb")))
              for name, m in (("textured", textured), ("flat", flat), ("vertex", vertex))}
    assert (np.asarray(loaded["textured"].visual.material.baseColorTexture.convert("RGB")) == (255, 0, 0)).all()
    assert tuple(loaded["flat"].visual.vertex_colors[0, :3]) == (0, 255, 0)
    assert tuple(loaded["vertex"].visual.vertex_colors[0, :3]) == (9, 8, 7)
    # a scene mixing a textured part and a flat part shares one atlas holding both
    scene = trimesh.Scene()
    scene.add_geometry(textured, geom_name="t")
    scene.add_geometry(flat, geom_name="f", transform=trimesh.transformations.translation_matrix((5, 0, 0)))
    mixed = load_mesh(write(tmp_path / "mixed.glb", scene.export(file_type="glb")))
    atlas = mixed.visual.material.baseColorTexture.convert("RGB")
    uvs = mixed.visual.uv
    w, h = atlas.size
    sample = lambda uv: atlas.getpixel((int(uv[0] * w), int((1 - uv[1]) * h)))  # noqa: E731
    left = mixed.vertices[:, 0] < 3
    assert {sample(uv) for uv in uvs[left]} == {(255, 0, 0)}
    assert {sample(uv) for uv in uvs[~left]} == {(0, 255, 0)}


def test_normalization_maps_and_inverts():
    mesh = box_mesh()
    norm = normalization_of(mesh)
    assert isinstance(norm, Normalization)
    assert norm.scale == pytest.approx(2 / 3)
    np.testing.assert_allclose(norm.to_normalized(CUBE_BOUNDS), [[-2 / 3, -1 / 3, -1], [2 / 3, 1 / 3, 1]])
    X = np.array([[0.5, 0.25, 1.5], [2.0, 1.0, 3.0]])
    np.testing.assert_allclose(norm.pointmap_from_own(X), [[0.25, 0.25, 0.5], [1, 1, 1]])
    np.testing.assert_allclose(norm.own_from_pointmap(norm.pointmap_from_own(X, 30.0), 30.0)[0], X[0])
    np.testing.assert_allclose(norm.from_normalized(norm.to_normalized(X)), X)
    plane = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 0, 1]], [[0, 1, 2]], process=False)
    assert normalization_of(plane).pointmap_from_own(np.array([[1.0, 0, 0]]))[0, 1] == 0.5


# -------------------------------------------------------------------------------- bad inputs


def zip_with(tmp_path, members: dict[str, bytes], name="bad.zip") -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    return path


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("empty.glb", b"", "is empty"),
        ("model.xyz", b"solid", "unsupported mesh format"),
        ("noext", b"solid", "unsupported mesh format"),
        ("garbage.glb", b"\x00\x01 definitely not a glb", "garbage.glb is not a readable GLB file"),
        ("nan.obj", "v 0 0 0\nv 1 0 nan\nv 0 1 0\nf 1 2 3\n", "NaN"),
        ("inf.off", "OFF\n3 1 0\n0 0 0\n1 0 inf\n0 1 0\n3 0 1 2\n", "NaN"),
        ("range.off", "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n", "outside"),
        ("points.ply", "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
                       "end_header\n0 0 0\n1 0 0\n0 1 0\n", "no faces"),
        ("dot.obj", "v 1 1 1\nv 1 1 1\nv 1 1 1\nf 1 2 3\n", "zero size"),
    ],
)
def test_bad_files_raise_mesh_error(tmp_path, name, data, message):
    with pytest.raises(MeshError, match=message):
        load_mesh(write(tmp_path / name, data))


def test_truncated_glb(tmp_path):
    data = box_mesh().export(file_type="glb")
    with pytest.raises(MeshError, match="is not a readable GLB file"):
        load_mesh(write(tmp_path / "cut.glb", data[: len(data) // 2]))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(MeshError, match="not found"):
        load_mesh(tmp_path / "nope.glb")
    with pytest.raises(MeshError, match="not a file"):
        load_mesh(tmp_path)


def test_face_limit(tmp_path):
    path = write(tmp_path / "box.obj", CUBE_OBJ)
    with pytest.raises(MeshError, match="more than 11 faces"):
        load_mesh(path, max_faces=11)
    assert len(load_mesh(path, max_faces=12).faces) == 12


def test_bad_zips(tmp_path):
    with pytest.raises(MeshError, match="no mesh"):
        load_mesh(zip_with(tmp_path, {"readme.txt": b"hi"}))
    with pytest.raises(MeshError, match="escapes"):
        load_mesh(zip_with(tmp_path, {"ok.obj": CUBE_OBJ.encode(), "../../evil.obj": CUBE_OBJ.encode()}))
    assert not (tmp_path.parent / "evil.obj").exists()
    with pytest.raises(MeshError, match="escapes"):
        load_mesh(zip_with(tmp_path, {"/abs/evil.obj": CUBE_OBJ.encode()}))
    with pytest.raises(MeshError, match="several meshes"):
        load_mesh(zip_with(tmp_path, {"a.obj": CUBE_OBJ.encode(), "b.obj": CUBE_OBJ.encode()}))
    with pytest.raises(MeshError, match="not a readable zip"):
        load_mesh(write(tmp_path / "fake.zip", b"PK not really"))
    bomb = zip_with(tmp_path, {"box.obj": CUBE_OBJ.encode(), "pad.bin": bytes(4 << 20)}, name="bomb.zip")
    assert bomb.stat().st_size < 64 << 10
    before = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(MeshError, match="expands to more than 1 MiB"):
        load_mesh(bomb, max_zip_bytes=1 << 20)
    assert set(os.listdir(tempfile.gettempdir())) <= before


def test_a_zip_of_one_asset_in_two_formats_reads_the_glb_and_says_so(tmp_path):
    box_glb = trimesh.creation.box().export(file_type="glb")
    with pytest.warns(RefAny3DWarning) as caught:
        both = load_mesh(zip_with(tmp_path, {"model.obj": CUBE_OBJ.encode(), "model.glb": box_glb}))
    assert [str(w.message) for w in caught] == [
        "the zip archive holds meshes in several formats: model.glb is used, model.obj is not (formats are read "
        "in the order GLB, GLTF, OBJ, PLY, STL, OFF)"]
    np.testing.assert_allclose(both.bounds, [[-0.5] * 3, [0.5] * 3])  # the GLB's unit box, not the OBJ's cube
    with warnings.catch_warnings():  # one mesh and its other files: nothing to say
        warnings.simplefilter("error", RefAny3DWarning)
        alone = load_mesh(zip_with(tmp_path, {"model.obj": CUBE_OBJ.encode(), "notes.txt": b"hi"}, name="one.zip"))
    np.testing.assert_allclose(alone.bounds, CUBE_BOUNDS)


# --------------------------------------------------------------------------- shared meshes

SHARED_EXPECTED = {  # name -> (kind of appearance, or the MeshError message)
    "BoxTextured.glb": "texture", "CesiumMilkTruck.glb": "texture", "Duck.glb": "texture",
    "TestScene.gltf": "color", "rgb_cube_with_primitives.gltf": "color", "cubevc.glb": "color",
    "monkey.glb": "color", "nested.glb": "color", "pins.glb": "color", "no_indices_3storybuilding.glb": "color",
    "capsule.obj": "texture", "fuze.obj": "texture", "rabbit.obj": "color", "textured_tetrahedron.obj": "color",
    "bunny.ply": "color", "suzanne.ply": "color", "teapot.stl": "color",
    "nancolor.obj": "NaN", "points_emptyface.ply": "no faces",
}


@pytest.mark.parametrize("name", sorted(SHARED_EXPECTED))
def test_shared_meshes_load_or_fail_clearly(shared_meshes, name):
    expected = SHARED_EXPECTED[name]
    if expected not in ("texture", "color"):
        with pytest.raises(MeshError, match=expected):
            load_mesh(shared_meshes / name)
        return
    mesh = load_mesh(shared_meshes / name)
    assert len(mesh.faces) > 0 and np.isfinite(mesh.vertices).all()
    assert mesh.faces.max() < len(mesh.vertices)
    textured = isinstance(mesh.visual, trimesh.visual.TextureVisuals)
    assert textured == (expected == "texture")
    if name == "rabbit.obj":
        assert tuple(mesh.visual.vertex_colors[0, :3]) == (255, 0, 255)  # its MTL diffuse colour
    if name in ("suzanne.ply", "teapot.stl", "textured_tetrahedron.obj"):
        assert (mesh.visual.vertex_colors[:, :3] == 128).all()  # no appearance -> gray
    if name == "cubevc.glb":  # its own vertex colours, as trimesh reads them
        raw = next(iter(trimesh.load_scene(shared_meshes / name).geometry.values())).visual.vertex_colors
        assert {tuple(c) for c in mesh.visual.vertex_colors[:, :3]} == {tuple(c) for c in raw[:, :3]}


def test_a_prepared_mesh_is_returned_as_it_is():
    """Views, alignment and the pipeline each pass what they get through prepare_mesh; a mesh that
    went through it once is not merged or copied again."""
    from refany3d.mesh import as_mesh, prepare_mesh

    box = trimesh.creation.box()
    prepared = prepare_mesh(box)
    assert prepared is not box and prepare_mesh(prepared) is prepared and as_mesh(prepared) is prepared
