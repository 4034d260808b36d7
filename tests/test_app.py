"""The app's API through gradio_client, on a tiny random model served by `python app.py`."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import trimesh
from PIL import Image

from app_server import running_app, tiny_app_env
from conftest import REPO, VASE

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError, ValidationError  # noqa: E402


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model):
    workdir = tmp_path_factory.mktemp("app_api")
    with running_app(tiny_app_env(workdir, tiny_model()), workdir / "server.log") as url:
        yield Client(url, verbose=False)


def _generate(client, mesh, prompt="a vase on a wooden table", seed=7, **settings):
    args = dict(n_views=2, radius=4.0, pitch=0.0, y_rotation=0.0, seed=seed, randomize_seed=False,
                steps=1, guidance_scale=3.5, image_guidance_scale=2.0, resolution=64, model="configured",
                show_asset=False)
    args.update(settings)
    return client.predict(handle_file(str(mesh)), prompt, api_name="/generate", **args)


def test_api_lists_the_main_endpoints(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/generate", "/preview_views", "/display_mesh", "/align"} <= set(endpoints)
    assert "/redraw_pointcloud" not in endpoints  # a display toggle, not part of the API
    assert "/align_result" not in endpoints  # the UI's automatic step; /align is its API
    align_params = [p["parameter_name"] for p in endpoints["/align"]["parameters"]]
    assert align_params == ["mesh_path", "image_path", "pointmap_path", "y_rotation"]
    generate_params = [p["parameter_name"] for p in endpoints["/generate"]["parameters"]]
    assert generate_params[:2] == ["mesh_path", "prompt"] and "candidates" in generate_params


def test_generate_returns_image_pointmap_and_matching_ply(client):
    image_path, pointmap_path, plot, ply_path, files, seed, status = _generate(client, VASE, y_rotation=30.0)
    image = np.asarray(Image.open(image_path).convert("RGB"))
    pointmap = np.asarray(Image.open(pointmap_path).convert("RGB"))
    assert image.shape == pointmap.shape == (64, 64, 3)
    assert seed == 7 and "seed 7" in status

    # the PLY holds exactly the point map's non-white pixels, coloured by the image, in the
    # asset's own frame (inside its bounding box)
    foreground = (pointmap < 0.95 * 255).any(axis=-1)
    cloud = trimesh.load(ply_path)
    assert len(cloud.vertices) == foreground.sum() > 0
    np.testing.assert_array_equal(np.asarray(cloud.colors)[:, :3], image[foreground])
    lo, hi = trimesh.load(VASE, force="mesh").bounds
    size = (hi - lo).max()
    assert (cloud.vertices >= lo - size).all() and (cloud.vertices <= hi + size).all()

    assert plot["type"] == "plotly"
    figure = json.loads(plot["plot"])
    xs = figure["data"][0]["x"]  # plotly sends arrays base64-encoded
    xs = np.frombuffer(base64.b64decode(xs["bdata"]), dtype=xs["dtype"]) if isinstance(xs, dict) else xs
    np.testing.assert_allclose(np.sort(xs), np.sort(cloud.vertices[:, 0]), atol=1e-6)
    assert figure["layout"]["scene"]["aspectmode"] == "data"

    names = sorted(Path(f).name for f in files)
    assert names == ["image.png", "pointcloud.ply", "pointmap.png", "settings.json"]
    record = json.loads(Path(next(f for f in files if f.endswith(".json"))).read_text())
    assert record["settings"]["seed"] == 7 and record["settings"]["y_rotation"] == 30.0
    assert record["settings"]["prompt"] == "a vase on a wooden table"
    assert record["mesh"]["name"] == "vase.glb"


def test_same_seed_same_image_and_randomize_reports_the_seed_used(client):
    first = np.asarray(Image.open(_generate(client, VASE, seed=11)[0]))
    again = np.asarray(Image.open(_generate(client, VASE, seed=11)[0]))
    np.testing.assert_array_equal(first, again)
    image_path, *_, seed, status = _generate(client, VASE, seed=11, randomize_seed=True)
    assert 0 <= seed < 2**32 and f"seed {seed}" in status
    # the seed it reports is the one it used: that seed, not randomized, gives the same image
    replay = np.asarray(Image.open(_generate(client, VASE, seed=seed)[0]))
    np.testing.assert_array_equal(replay, np.asarray(Image.open(image_path)))


def test_candidates_over_the_api_return_the_kept_seed(client):
    image_path, *_, files, seed, status = _generate(client, VASE, seed=20, candidates=2)
    assert seed in (20, 21) and f"seed {seed}" in status and "of 2 candidates (seeds 20–21)" in status
    record = json.loads(Path(next(f for f in files if f.endswith("settings.json"))).read_text())["settings"]
    assert record["candidates"] == 2 and record["chosen_seed"] == seed
    alone = _generate(client, VASE, seed=seed)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(alone)), np.asarray(Image.open(image_path)))
    with pytest.raises(ValidationError, match="candidates must be a whole number from 1 to 4"):
        _generate(client, VASE, candidates=5)


def test_preview_returns_rgb_and_pointmap_views(client):
    gallery = client.predict(handle_file(str(VASE)), 3, 4.0, 10.0, 0.0, api_name="/preview_views")
    assert [item["caption"] for item in gallery] == [
        "RGB 0°", "point map 0°", "RGB 120°", "point map 120°", "RGB 240°", "point map 240°"
    ]
    rgb = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))
    pointmap = np.asarray(Image.open(gallery[1]["image"]).convert("RGB"))
    background = (pointmap == 255).all(axis=-1)
    assert 0 < background.mean() < 1  # the vase covers part of the view, white around it
    assert (rgb[background] >= 250).all(axis=-1).mean() > 0.99  # the RGB view's background is white too


def test_preview_names_out_of_range_view_settings(client):
    with pytest.raises(ValidationError, match="camera radius must be between 2 and 10"):
        client.predict(handle_file(str(VASE)), 3, 50.0, 10.0, 0.0, api_name="/preview_views")
    with pytest.raises(ValidationError, match="pitch must be between -89 and 89 degrees"):
        client.predict(handle_file(str(VASE)), 3, 4.0, 95.0, 0.0, api_name="/preview_views")


def test_display_mesh_returns_a_glb_of_the_asset(client):
    glb = client.predict(handle_file(str(VASE)), api_name="/display_mesh")
    assert Path(glb).suffix == ".glb"
    shown, original = trimesh.load(glb, force="mesh"), trimesh.load(VASE, force="mesh")
    np.testing.assert_allclose(shown.bounds, original.bounds, atol=1e-5)


def test_bad_inputs_give_clear_errors_and_the_app_keeps_serving(client, tmp_path):
    junk = tmp_path / "junk.obj"
    junk.write_text("this is not a mesh\n")
    with pytest.raises(ValidationError, match="junk.obj has no faces"):  # parsed, and refused, before the queue
        _generate(client, junk)
    with pytest.raises(ValidationError, match="write a prompt"):
        _generate(client, VASE, prompt="   ")
    with pytest.raises(ValidationError, match="from 64 to 256 for this model, which was trained at 64 px"):
        _generate(client, VASE, model="embedded", resolution=512)
    # out of a slider's or number box's range: the validator's message, not Gradio's bare 400
    for setting, message in [({"steps": 0}, "steps must be a whole number from 1 to"),
                             ({"seed": -1}, "seed must be a whole number from 0 to 4294967295"),
                             ({"y_rotation": 400.0}, "y rotation must be between -180 and 180 degrees"),
                             ({"guidance_scale": 25.0}, "guidance must be between 0 and 20"),
                             ({"n_views": 2.5}, "number of views must be a whole number")]:
        with pytest.raises(ValidationError, match=message):
            _generate(client, VASE, **setting)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(httpx.HTTPStatusError) as refused:  # Gradio's own file-type check
        _generate(client, text)
    assert "Invalid file type" in refused.value.response.text
    big = tmp_path / "big.obj"
    big.write_bytes(b"# padding\n" * 150_000)  # 1.5 MB, over the 1 MB limit of this server
    with pytest.raises(ValueError, match="exceeds the maximum file size of 1048576 bytes"):
        _generate(client, big)  # gradio_client knows the server's limit
    with big.open("rb") as f:  # and the server refuses the upload itself
        response = httpx.post(client.src.rstrip("/") + "/gradio_api/upload", files={"files": f})
    assert response.status_code == 413 and "maximum allowed size of 1048576 bytes" in response.text
    # still serving
    assert Path(_generate(client, VASE)[0]).is_file()


def test_point_cloud_only_file_is_refused(shared_meshes, client):
    with pytest.raises(ValidationError, match="no faces"):
        _generate(client, shared_meshes / "points_emptyface.ply")


def _rendered_pair(folder: Path, mesh: Path, camera, y_rotation: float) -> tuple[Path, Path]:
    """The mesh rendered at a known camera, saved as a generation's image and point map."""
    from refany3d.views import pointmap_image, render_at

    view = render_at(mesh, camera, y_rotation)
    image, pointmap = folder / f"{mesh.stem}_image.png", folder / f"{mesh.stem}_pointmap.png"
    Image.fromarray(view.rgb).save(image)
    pointmap_image(view.pointmap_xyz).save(pointmap)
    return image, pointmap


def _trace(plot, name_start: str):
    figure = json.loads(plot["plot"])
    return [trace for trace in figure["data"] if trace["name"].startswith(name_start)]


def test_align_measures_a_rendered_pair_and_explains_a_wrong_asset(client, tmp_path):
    from refany3d.cameras import orbit_camera

    camera = orbit_camera(azimuth_deg=200.0, pitch_deg=-10.0, radius=5.0, resolution=128)
    image, pointmap = _rendered_pair(tmp_path, VASE, camera, y_rotation=-40.0)
    overlay, text, details, plot = client.predict(handle_file(str(VASE)), handle_file(str(image)),
                                                  handle_file(str(pointmap)), -40.0, api_name="/align")
    assert details["measurable"] and details["inlier_ratio"] > 0.9 and details["iou"] > 0.95
    assert abs(details["orbit"]["azimuth_deg"] - 200.0) < 1.0 and abs(details["orbit"]["distance"] - 5.0) < 0.05
    assert f"| Inlier ratio | {details['inlier_ratio']:.3f} |" in text
    assert np.asarray(Image.open(overlay)).shape == (128, 128, 3)
    (frustum,) = _trace(plot, "recovered camera")
    assert len(frustum["x"]) == 8 * 3  # 8 segments, each followed by a break

    # a point map of another asset: a result saying why, not an error
    cone = REPO / "examples" / "traffic_cone.glb"
    _, cone_pointmap = _rendered_pair(tmp_path, cone, camera, y_rotation=0.0)
    _, text, details, plot = client.predict(handle_file(str(VASE)), None, handle_file(str(cone_pointmap)), 0.0,
                                            api_name="/align")
    assert not details["measurable"] and details["reason"]
    assert f"**Not measurable:** {details['reason']}" in text
    assert not _trace(plot, "recovered camera")
    with pytest.raises(AppError, match="give the predicted point map"):
        client.predict(handle_file(str(VASE)), None, None, 0.0, api_name="/align")
