"""Mesh ingestion: any supported file (or a .zip of one) -> one merged, validated `trimesh.Trimesh`.

The renderer needs a single mesh with a single appearance, so scenes are flattened here: every
geometry gets its node transform, and all appearances are folded into either per-vertex colours
or one texture atlas. Appearance follows the release's priority: PBR baseColorTexture (as is, not
multiplied by the factor), else PBR baseColorFactor, else the OBJ material's diffuse texture or
colour, else vertex colours, else gray. Every way a user's file can be unusable becomes a
`MeshError` with a message meant for them.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import trimesh
from PIL import Image

from refany3d.errors import InputError, MeshError, RefAny3DWarning

MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")
DEFAULT_MAX_FACES = 2_000_000
DEFAULT_MAX_ZIP_BYTES = 1 << 30  # uncompressed bytes a .zip may expand to
GRAY = np.array([128, 128, 128], dtype=np.uint8)
_ATLAS_PAD = 2  # edge pixels replicated around each atlas block so bilinear filtering never bleeds
_MAX_ATLAS_SIDE = 8192
_FLAT_BLOCK = 4
_NAN_IN_TEXT = re.compile(rb"^(?:v|vt|vn)[ \t][^\n]*\b(?:nan|inf)", re.IGNORECASE | re.MULTILINE)


# --------------------------------------------------------------------------------------------
# Normalization: the asset frame the cameras live in, and the point-map colour mapping
# --------------------------------------------------------------------------------------------


def _y_rotation(degrees: float) -> np.ndarray:
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


@dataclass(frozen=True, eq=False)
class Normalization:
    """Maps the mesh's own frame to the normalized frame (centred, largest axis spans [-1, 1]).

    `bounds` are kept too because point maps are per-axis min-max normalized in the own frame.
    """

    center: np.ndarray = field(repr=False)
    scale: float
    bounds: np.ndarray = field(repr=False)

    @property
    def extent(self) -> np.ndarray:
        return self.bounds[1] - self.bounds[0]

    def to_normalized(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) - self.center) * self.scale

    def from_normalized(self, Xn: np.ndarray) -> np.ndarray:
        return np.asarray(Xn, dtype=np.float64) / self.scale + self.center

    def pointmap_from_own(self, X: np.ndarray, y_rotation: float = 0.0) -> np.ndarray:
        """Own-frame points -> point-map colours in [0, 1] (zero-extent axis -> 0.5).

        `y_rotation` rotates the colours about +y in centred [-1, 1] space and clamps, as the
        release does to present the asset turned without re-rendering it.
        """
        X = np.asarray(X, dtype=np.float64)
        ext = self.extent
        flat = ext <= 0
        P = (X - self.bounds[0]) / np.where(flat, 1.0, ext)
        P[..., flat] = 0.5
        if y_rotation:
            P = ((2.0 * P - 1.0) @ _y_rotation(y_rotation).T + 1.0) / 2.0
        return np.clip(P, 0.0, 1.0)

    def own_from_pointmap(self, P: np.ndarray, y_rotation: float = 0.0) -> np.ndarray:
        """Inverse of `pointmap_from_own` (exact where the colours were not clamped)."""
        P = np.asarray(P, dtype=np.float64)
        if y_rotation:
            P = ((2.0 * P - 1.0) @ _y_rotation(y_rotation) + 1.0) / 2.0
        return self.bounds[0] + P * self.extent

    def to_dict(self) -> dict:
        return {"center": self.center.tolist(), "scale": self.scale, "bounds": self.bounds.tolist()}


def normalization_of(mesh: trimesh.Trimesh) -> Normalization:
    """Normalization of a mesh: centre = bbox centre, scale = 2 / largest bbox extent."""
    used = np.asarray(mesh.vertices, dtype=np.float64)
    if len(mesh.faces):
        used = used[np.unique(np.asarray(mesh.faces))]
    bounds = np.stack([used.min(axis=0), used.max(axis=0)])
    largest = float((bounds[1] - bounds[0]).max())
    if not largest > 0:
        raise MeshError("the mesh has zero size (all its vertices are at one point)")
    return Normalization(center=bounds.mean(axis=0), scale=2.0 / largest, bounds=bounds)


# --------------------------------------------------------------------------------------------
# Appearance of one scene part
# --------------------------------------------------------------------------------------------


@dataclass
class _Part:
    """One geometry in world (own) coordinates with exactly one kind of appearance."""

    vertices: np.ndarray  # (V,3) float64
    faces: np.ndarray  # (F,3) int64
    image: np.ndarray | None = None  # (H,W,3) uint8, with uv
    uv: np.ndarray | None = None  # (V,2), v up (trimesh convention)
    vertex_colors: np.ndarray | None = None  # (V,3) uint8


def _rgb_array(image) -> np.ndarray | None:
    if image is None:
        return None
    try:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise MeshError(f"a texture of the mesh cannot be read: {err}") from None


def _rgb_of(color) -> np.ndarray:
    c = np.asarray(color, dtype=np.float64).reshape(-1)[:3]
    if not np.all(np.isfinite(c)):
        raise MeshError("the mesh has a material colour that is NaN or infinite")
    if c.max() <= 1.0 and np.issubdtype(np.asarray(color).dtype, np.floating):
        c = c * 255.0
    return np.clip(np.round(c), 0, 255).astype(np.uint8)


def _is_placeholder(material: trimesh.visual.material.SimpleMaterial) -> bool:
    """True for the stand-in material trimesh invents for UVs without a material (not the file's)."""
    placeholder = trimesh.visual.material.empty_material()
    return (
        material.image is not None
        and material.image.size == placeholder.image.size
        and np.array_equal(np.asarray(material.image), np.asarray(placeholder.image))
        and np.array_equal(material.diffuse, placeholder.diffuse)
    )


def _part_from_geometry(geom: trimesh.Trimesh, transform: np.ndarray) -> _Part:
    vertices = np.asarray(geom.vertices, dtype=np.float64)
    faces = np.asarray(geom.faces, dtype=np.int64)
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise MeshError("the mesh has faces that are not triangles and could not be triangulated")
    if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise MeshError(
            f"the mesh has face indices outside its {len(vertices)} vertices (corrupt file)"
        )
    if not np.all(np.isfinite(vertices)):
        raise MeshError("the mesh has vertex coordinates that are NaN or infinite")
    transform = np.asarray(transform, dtype=np.float64)
    world = vertices @ transform[:3, :3].T + transform[:3, 3]
    if np.linalg.det(transform[:3, :3]) < 0:  # a mirroring node flips winding; keep outward faces
        faces = faces[:, ::-1]
    part = _Part(vertices=world, faces=faces)

    visual = geom.visual
    if isinstance(visual, trimesh.visual.TextureVisuals):
        material = visual.material
        uv = None if visual.uv is None else np.asarray(visual.uv, dtype=np.float64)
        if uv is not None and (len(uv) != len(vertices) or not np.all(np.isfinite(uv))):
            uv = None
        if isinstance(material, trimesh.visual.material.PBRMaterial):
            texture = _rgb_array(material.baseColorTexture)
            if texture is not None and uv is not None:
                part.image, part.uv = texture, uv
            elif material.baseColorFactor is not None:
                part.vertex_colors = np.tile(_rgb_of(material.baseColorFactor), (len(world), 1))
        elif isinstance(material, trimesh.visual.material.SimpleMaterial) and not _is_placeholder(material):
            texture = _rgb_array(material.image)
            if texture is not None and uv is not None:
                part.image, part.uv = texture, uv
            elif material.diffuse is not None:
                part.vertex_colors = np.tile(_rgb_of(material.diffuse), (len(world), 1))
    elif isinstance(visual, trimesh.visual.ColorVisuals) and visual.kind in ("vertex", "face"):
        if visual.kind == "vertex":
            colors = np.asarray(visual.vertex_colors)[:, :3]
        else:  # face colours: unshare vertices so each face keeps its own colour
            colors = np.repeat(np.asarray(visual.face_colors)[:, :3], 3, axis=0)
            part.vertices = part.vertices[part.faces].reshape(-1, 3)
            part.faces = np.arange(3 * len(faces), dtype=np.int64).reshape(-1, 3)
        part.vertex_colors = colors.astype(np.uint8)
    if part.image is None and part.vertex_colors is None:
        part.vertex_colors = np.tile(GRAY, (len(part.vertices), 1))
    return part


# --------------------------------------------------------------------------------------------
# Merging parts into one mesh
# --------------------------------------------------------------------------------------------


def _tiled_block(image: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The texture repeated as often as the UVs wrap, and the UVs shifted into it (in texels).

    Repeating the image (instead of taking UVs modulo 1) keeps interpolation across a wrap seam
    correct, as GL_REPEAT would.
    """
    lo = np.floor(uv.min(axis=0) + 1e-6)
    hi = np.maximum(np.ceil(uv.max(axis=0) - 1e-6), lo + 1)
    tiles_u, tiles_v = int(hi[0] - lo[0]), int(hi[1] - lo[1])
    h, w = image.shape[:2]
    shrink = max(1.0, tiles_u * w / _MAX_ATLAS_SIDE, tiles_v * h / _MAX_ATLAS_SIDE)
    if shrink > 1.0:
        w, h = max(1, int(w / shrink)), max(1, int(h / shrink))
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    block = np.tile(image, (tiles_v, tiles_u, 1))
    local = uv - lo
    # texel coordinates inside the block, rows from the top (image convention)
    texel = np.stack([local[:, 0] * w, (tiles_v - local[:, 1]) * h], axis=1)
    return block, texel


def _merge_texture_atlas(parts: list[_Part]) -> tuple[np.ndarray, np.ndarray]:
    """One atlas image and per-vertex UVs (v up) for all parts, blocks stacked top to bottom.

    Flat-coloured parts get a small solid block; vertex-coloured parts in a textured scene get one
    texel per face (their face-mean colour), since a texture cannot interpolate vertex colours.
    """
    blocks: list[np.ndarray] = []
    texels: list[tuple[int, np.ndarray]] = []  # (block index, texel coordinates per vertex)
    seen: dict[bytes, int] = {}
    for part in parts:
        if part.image is not None:
            block, texel = _tiled_block(part.image, part.uv)
        else:
            colors = part.vertex_colors
            face_colors = colors[part.faces].mean(axis=1).round().astype(np.uint8)
            unique, inverse = np.unique(face_colors, axis=0, return_inverse=True)
            side = int(math.ceil(math.sqrt(len(unique))))
            grid = np.zeros((side * side, 3), dtype=np.uint8)
            grid[: len(unique)] = unique
            block = np.repeat(np.repeat(grid.reshape(side, side, 3), _FLAT_BLOCK, 0), _FLAT_BLOCK, 1)
            cell = inverse.reshape(-1)
            centre = (np.stack([cell % side, cell // side], axis=1) + 0.5) * _FLAT_BLOCK
            # unshare vertices so each face samples its own texel
            part.vertices = part.vertices[part.faces].reshape(-1, 3)
            part.faces = np.arange(len(part.vertices), dtype=np.int64).reshape(-1, 3)
            texel = np.repeat(centre, 3, axis=0)
        key = hashlib.sha1(block.tobytes()).digest() + repr(block.shape).encode()
        if key not in seen:  # parts sharing one texture share one block
            seen[key] = len(blocks)
            blocks.append(np.pad(block, ((_ATLAS_PAD,) * 2, (_ATLAS_PAD,) * 2, (0, 0)), mode="edge"))
        texels.append((seen[key], texel + _ATLAS_PAD))
    width = max(b.shape[1] for b in blocks)
    height = sum(b.shape[0] for b in blocks)
    tops = np.cumsum([0] + [b.shape[0] for b in blocks[:-1]])
    atlas = np.full((height, width, 3), 255, dtype=np.uint8)
    for block, top in zip(blocks, tops):
        atlas[top : top + block.shape[0], : block.shape[1]] = block
    uvs = [
        np.stack([texel[:, 0] / width, 1.0 - (texel[:, 1] + tops[index]) / height], axis=1)
        for index, texel in texels
    ]
    side = max(atlas.shape[:2])
    if side > _MAX_ATLAS_SIDE:  # GL texture size limit; UVs are relative so they stay valid
        scale = _MAX_ATLAS_SIDE / side
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        atlas = np.asarray(Image.fromarray(atlas).resize(size, Image.BILINEAR))
    return atlas, np.concatenate(uvs)


def _merge_parts(parts: list[_Part]) -> trimesh.Trimesh:
    if any(p.image is not None for p in parts):
        atlas, uv = _merge_texture_atlas(parts)
        visual = trimesh.visual.TextureVisuals(
            uv=uv, material=trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(atlas))
        )
    else:
        colors = np.concatenate([p.vertex_colors for p in parts])
        rgba = np.concatenate([colors, np.full((len(colors), 1), 255, np.uint8)], axis=1)
        visual = trimesh.visual.ColorVisuals(vertex_colors=rgba)
    offsets = np.cumsum([0] + [len(p.vertices) for p in parts[:-1]])
    vertices = np.concatenate([p.vertices for p in parts])
    faces = np.concatenate([p.faces + o for p, o in zip(parts, offsets)])
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, visual=visual, process=False)
    return mesh


# --------------------------------------------------------------------------------------------
# Files and archives
# --------------------------------------------------------------------------------------------


def _safe_extract(archive: Path, dest: Path, max_bytes: int) -> None:
    """Extract a zip into `dest`, refusing escaping paths, links and more than `max_bytes`.

    Sizes are counted while copying (headers can lie), so a zip bomb stops at the limit.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise MeshError(f"{archive.name} is not a readable zip archive ({err})") from None
    with zf:
        total = 0
        for info in zf.infolist():
            name = PurePosixPath(info.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or re.match(r"^[A-Za-z]:", info.filename):
                raise MeshError(f"the zip archive has a member path that escapes its folder: {info.filename!r}")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise MeshError(f"the zip archive holds a symbolic link: {info.filename!r}")
            if info.is_dir():
                continue
            if info.flag_bits & 0x1:
                raise MeshError("the zip archive is encrypted")
            target = dest.joinpath(*name.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        total += len(chunk)
                        if total > max_bytes:
                            raise MeshError(
                                f"the zip archive expands to more than {max_bytes >> 20} MiB; refusing it"
                            )
                        out.write(chunk)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as err:
                raise MeshError(f"the zip archive is damaged ({err})") from None


def _mesh_in_folder(folder: Path) -> tuple[Path, str | None]:
    """The one mesh file of an extracted zip, and a note when other formats of it were passed over."""
    candidates = [
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in MESH_SUFFIXES
        and not any(part.startswith((".", "__MACOSX")) for part in p.relative_to(folder).parts)
    ]
    if not candidates:
        raise MeshError(f"the zip archive holds no mesh file ({', '.join(MESH_SUFFIXES)})")
    ranked = sorted(candidates, key=lambda p: (MESH_SUFFIXES.index(p.suffix.lower()), len(p.parts), str(p)))
    best = [p for p in ranked if p.suffix.lower() == ranked[0].suffix.lower()]
    if len(best) > 1:
        names = ", ".join(str(p.relative_to(folder)) for p in best[:5])
        raise MeshError(f"the zip archive holds several meshes ({names}); keep only one")
    if len(ranked) == 1:
        return ranked[0], None
    # the same asset exported twice, most likely: the richest format is read
    others = ", ".join(str(p.relative_to(folder)) for p in ranked[1:5])
    return ranked[0], (f"the zip archive holds meshes in several formats: {ranked[0].relative_to(folder)} is used, "
                       f"{others} {'is' if len(ranked) == 2 else 'are'} not (formats are read in the order "
                       f"{', '.join(s[1:].upper() for s in MESH_SUFFIXES)})")


def _load_scene(path: Path) -> trimesh.Scene:
    suffix = path.suffix.lower()
    if suffix in (".obj", ".off"):
        if _NAN_IN_TEXT.search(path.read_bytes()):
            raise MeshError(f"{path.name} has NaN or infinite values in its vertex data")
    try:
        loaded = trimesh.load_scene(str(path), file_type=suffix[1:], process=False)
    except MeshError:
        raise
    except FileNotFoundError as err:  # a file the mesh refers to: a .gltf's buffers, say
        missing = Path(err.filename).name if err.filename else "a file it refers to"
        raise MeshError(f"{path.name} refers to {missing}, which is not beside it: give a .glb (one file), or a "
                        f".zip of {path.name} with the files it refers to") from None
    except Exception as err:  # trimesh raises many types for malformed files
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise MeshError(f"{path.name} is not a readable {suffix[1:].upper()} file ({reason})") from None
    return loaded


def _find_beside(folder: Path, name: str) -> Path | None:
    """The file an OBJ or MTL names, found as trimesh finds it: as given, without a leading "/", or
    by its base name, in the OBJ's folder (trimesh.resolvers.FilePathResolver's rule)."""
    name = name.strip()
    found = [folder / c for c in (name, name.lstrip("/"), Path(name).name) if c and (folder / c).is_file()]
    return found[0] if found else None


def _missing_obj_files(path: Path) -> list[str]:
    """The .mtl an OBJ names, or the textures that .mtl names, where trimesh will not find them.

    trimesh skips what it cannot find, and the asset then renders grey or, with a white material,
    white on the white background: the appearance the model is asked to keep would be lost unsaid.
    Names are read as trimesh reads them: the rest of the first `mtllib` line, of each `map_Kd` line.
    """
    library = re.search(rb"mtllib([^\n]*)", path.read_bytes())
    if library is None:
        return []
    mtl_name = library.group(1).decode("utf-8", "replace").strip()
    mtl = _find_beside(path.parent, mtl_name)
    if mtl is None:
        return [mtl_name]
    textures = re.findall(rb"map_kd([^\n]*)", mtl.read_bytes(), re.IGNORECASE)
    return [name for name in (t.decode("utf-8", "replace").strip() for t in textures)
            if name and _find_beside(path.parent, name) is None]


def _load_file(path: Path, max_faces: int) -> trimesh.Trimesh:
    if path.suffix.lower() == ".obj" and (missing := _missing_obj_files(path)):
        raise MeshError(f"{path.name} refers to {', '.join(missing)}, which is not beside it: give a .zip of "
                        f"{path.name} with its .mtl and textures, or remove the reference from the file")
    return prepare_mesh(_load_scene(path), max_faces, name=path.name)


_PREPARED = "refany3d_prepared"  # metadata key of meshes that went through prepare_mesh
LOAD_NOTES = "refany3d_load_notes"  # metadata key: what load_mesh warned about this mesh


def prepare_mesh(mesh: trimesh.Trimesh | trimesh.Scene, max_faces: int = DEFAULT_MAX_FACES,
                 name: str | None = None) -> trimesh.Trimesh:
    """One checked mesh with one appearance, from a trimesh mesh or scene: what `load_mesh` returns.

    Scene node transforms are applied and every part's appearance folded into one texture atlas
    or vertex colours, the two kinds the renderer draws. Raises MeshError for an object without
    faces, with NaN or infinite coordinates, of zero size, or over `max_faces`; `name` is the
    file it was read from, for those messages. A mesh this returned is returned as it is.
    """
    if isinstance(mesh, trimesh.Trimesh) and mesh.metadata.get(_PREPARED):
        return mesh
    if isinstance(mesh, trimesh.Scene):
        placed = [(mesh.graph[node][0], mesh.geometry.get(mesh.graph[node][1])) for node in mesh.graph.nodes_geometry]
    elif isinstance(mesh, trimesh.parent.Geometry):
        placed = [(np.eye(4), mesh)]
    else:
        raise MeshError(f"expected a trimesh mesh or scene, got {type(mesh).__name__}")
    parts: list[_Part] = []
    n_faces = 0
    skipped = 0
    for transform, geom in placed:
        if not isinstance(geom, trimesh.Trimesh) or len(geom.faces) == 0:
            skipped += len(getattr(geom, "vertices", ())) > 0  # points or lines, not nothing
            continue
        n_faces += len(geom.faces)
        if n_faces > max_faces:
            raise MeshError(
                f"the mesh has more than {max_faces:,} faces; simplify it or raise max_faces"
            )
        parts.append(_part_from_geometry(geom, transform))
    if not parts:
        what = "a point cloud or lines" if skipped else "empty"
        misread = f", or the file is not valid {Path(name).suffix[1:].upper()}" if name and not skipped else ""
        raise MeshError(f"{name or 'the mesh'} has no faces ({what}); a surface mesh is needed{misread}")
    merged = _merge_parts(parts)
    merged.remove_unreferenced_vertices()
    normalization_of(merged)  # raises on a zero-size object
    merged.metadata[_PREPARED] = True
    return merged


def load_mesh(
    path: str | Path,
    max_faces: int = DEFAULT_MAX_FACES,
    max_zip_bytes: int = DEFAULT_MAX_ZIP_BYTES,
) -> trimesh.Trimesh:
    """Load GLB/glTF/OBJ/PLY/STL/OFF (or a .zip holding one) as one merged mesh in its own frame.

    Scene node transforms are applied; the visual is TextureVisuals (uv + one atlas image) or
    ColorVisuals (vertex colours, gray 128 when the file has no appearance).
    """
    path = Path(path)
    if not path.exists():
        raise MeshError(f"mesh file not found: {path}")
    if not path.is_file():
        raise MeshError(f"not a file: {path}")
    if path.stat().st_size == 0:
        raise MeshError(f"{path.name} is empty")
    suffix = path.suffix.lower()
    if suffix == ".zip":
        with tempfile.TemporaryDirectory(prefix="refany3d_zip_") as tmp:
            _safe_extract(path, Path(tmp), max_zip_bytes)
            chosen, note = _mesh_in_folder(Path(tmp))
            mesh = _load_file(chosen, max_faces)
        if note:  # said now, and kept with the mesh for whoever shows it later (the app's viewer)
            mesh.metadata[LOAD_NOTES] = [note]
            warnings.warn(note, RefAny3DWarning, stacklevel=2)
        return mesh
    if suffix not in MESH_SUFFIXES:
        known = ", ".join(s[1:].upper() for s in MESH_SUFFIXES)
        raise MeshError(f"unsupported mesh format {suffix or '(no extension)'!r}; use {known} or a .zip")
    return _load_file(path, max_faces)


def as_mesh(mesh_or_path: trimesh.Trimesh | trimesh.Scene | str | os.PathLike) -> trimesh.Trimesh:
    """The checked, merged mesh of a path (`load_mesh`) or of a trimesh object (`prepare_mesh`)."""
    if isinstance(mesh_or_path, (trimesh.parent.Geometry, trimesh.Scene)):
        return prepare_mesh(mesh_or_path)
    if isinstance(mesh_or_path, (str, os.PathLike)):
        return load_mesh(mesh_or_path)
    raise InputError(f"expected a mesh or a path to one, got {type(mesh_or_path).__name__}")
