"""RefAny3D Gradio app (Hugging Face Space and local `python app.py`).

Layout and wiring only; every handler lives in refany3d.app_logic. Configuration: environment
variables, see "App configuration" in README.md.
"""
from __future__ import annotations

import gradio as gr

from refany3d import app_logic as logic

service = logic.get_service()
config = service.config
defaults = logic.default_settings(logic.DEFAULT_PROMPT, config, service.default_model())
example_rows, example_labels = logic.example_rows()

with gr.Blocks(title="RefAny3D", delete_cache=(3600, 6 * 3600)) as demo:
    # Result components are created first and placed later, so the examples (whose cached
    # outputs they are) can sit right under the upload.
    status = gr.Markdown(label="Status", elem_id="status", render=False)
    image = gr.Image(label="Generated image", type="filepath", format="png", height=300, interactive=False,
                     buttons=["download", "fullscreen"], elem_id="result-image", render=False)
    pointmap = gr.Image(label="Predicted point map", type="filepath", format="png", height=300, interactive=False,
                        buttons=["download", "fullscreen"], elem_id="result-pointmap", render=False)
    pointcloud_plot = gr.Plot(label="Predicted point cloud (asset frame)", elem_id="pointcloud", render=False)
    ply = gr.File(label="Point cloud (PLY)", interactive=False, elem_id="ply-file", render=False)
    downloads = gr.File(label="All files (image, point map, PLY, settings JSON)", file_count="multiple",
                        interactive=False, elem_id="downloads", render=False)
    seed = gr.Number(label="Seed", value=defaults.seed, precision=0, minimum=0, maximum=logic.MAX_SEED,
                     render=False)
    randomize_seed = gr.Checkbox(label="Randomize seed", value=True, render=False)
    result_outputs = [image, pointmap, pointcloud_plot, ply, downloads, seed, status]
    alignment_overlay = gr.Image(label="Asset re-rendered at the recovered camera, over the generated image",
                                 type="filepath", format="png", height=300, interactive=False,
                                 buttons=["download", "fullscreen"], elem_id="alignment-overlay", render=False)
    alignment_text = gr.Markdown(logic.ALIGNMENT_INTRO, label="Alignment", elem_id="alignment-numbers", render=False)
    alignment_details = gr.JSON(label="Alignment report", elem_id="alignment-details", render=False)
    alignment_outputs = [alignment_overlay, alignment_text, alignment_details]

    gr.Markdown("# RefAny3D: 3D asset-referenced image generation", elem_id="title")
    gr.Markdown(
        "Upload a 3D asset and describe a scene: the model generates an image showing *your* asset "
        "in it, plus a point map telling which point of the asset each pixel shows. "
        f"[Paper]({logic.PAPER_URL}) · [Project page]({logic.PROJECT_URL})"
    )
    model_notice = service.model_status()
    gr.Markdown(model_notice, visible=bool(model_notice), elem_id="model-notice")

    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            mesh_file = gr.File(
                label="Mesh: GLB, glTF, OBJ, PLY, STL, OFF, or a .zip of one with its files",
                file_types=logic.MESH_UPLOAD_TYPES,
                type="filepath",
                elem_id="mesh-upload",
            )
            prompt = gr.Textbox(label="Prompt", value=logic.DEFAULT_PROMPT, lines=2, elem_id="prompt")
            examples = gr.Examples(
                examples=example_rows,
                inputs=[mesh_file, prompt],
                outputs=[*result_outputs, *alignment_outputs],
                fn=logic.generate_example,
                cache_examples=logic.cache_examples(service),
                cache_mode="lazy",
                example_labels=example_labels,
                label="Examples (click one)",
            )
            # always visible at load: gr.Model3D collapses when it starts in a hidden tab
            mesh_view = gr.Model3D(label="Uploaded asset", height=300, interactive=False, elem_id="mesh-view")
            with gr.Accordion("Reference views", open=True):
                with gr.Row():
                    n_views = gr.Slider(1, config.max_views, value=defaults.n_views, step=1, label="Views")
                    radius = gr.Slider(*logic.RADIUS_RANGE, value=defaults.radius, step=0.1, label="Camera radius",
                                       info="in asset sizes: the asset spans [-1, 1]")
                with gr.Row():
                    pitch = gr.Slider(*logic.PITCH_RANGE, value=defaults.pitch, step=1, label="Pitch (°)")
                    y_rotation = gr.Slider(*logic.Y_ROTATION_RANGE, value=defaults.y_rotation, step=1, label="Y rotation (°)")
                views_gallery = gr.Gallery(
                    label="What the model sees: RGB and point-map views",
                    columns=4, height=260, object_fit="contain", format="png", elem_id="views-gallery",
                )
            with gr.Row():
                seed.render()
                randomize_seed.render()
            with gr.Accordion("Advanced", open=False):
                steps = gr.Slider(1, config.max_steps, value=defaults.steps, step=1, label="Steps", elem_id="steps",
                                  info="denoising steps: more is slower, rarely better past 28")
                guidance_scale = gr.Slider(*logic.GUIDANCE_RANGE, value=defaults.guidance_scale, step=0.1, label="Guidance",
                                           info="how closely to follow the prompt (FLUX.1-dev's distilled guidance)")
                image_guidance_scale = gr.Slider(
                    *logic.GUIDANCE_RANGE, value=defaults.image_guidance_scale, step=0.1, label="Image guidance",
                    info="how strongly to follow the reference views (1: off; 2 in the release)",
                )
                # The API accepts up to the operator's cap (each model's own limit is checked by the
                # validator); the page narrows the slider to the chosen model's at load and on change.
                resolution = gr.Slider(
                    logic.MIN_RESOLUTION, config.max_resolution, value=defaults.resolution, step=16,
                    label="Resolution (px)", elem_id="resolution",
                    info=f"up to {logic.MAX_UPSCALE}x the size the chosen model was trained at",
                )
                model = gr.Dropdown(service.model_choices(), value=defaults.model, label="Model")
                candidates = gr.Slider(
                    1, config.max_candidates, value=defaults.candidates, step=1, label="Candidates",
                    info="Sample this many seeds (seed, seed+1, ...) and keep the most rigid point map",
                    elem_id="candidates",
                )
            with gr.Row():
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
                stop_button = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)

        with gr.Column(scale=1):
            status.render()
            with gr.Tabs():
                with gr.Tab("Result"):
                    with gr.Row():
                        image.render()
                        pointmap.render()
                    show_asset = gr.Checkbox(label="Overlay the asset's surface points", value=False,
                                             elem_id="show-asset")
                    pointcloud_plot.render()
                    ply.render()  # one above the other: side by side, their file names were cut short
                    downloads.render()
                with gr.Tab("Alignment", elem_id="alignment-tab"):
                    alignment_text.render()
                    alignment_overlay.render()
                    with gr.Accordion("Report (JSON)", open=False):
                        alignment_details.render()
            result = gr.State()
            stop_in_queue = gr.State(0)  # a new number from Stop cancels a generation waiting in the queue

    # API clients get the validators' messages for out-of-range numbers, not Gradio's bare 400
    logic.leave_ranges_to_validators(seed, n_views, radius, pitch, y_rotation, steps, guidance_scale,
                                     image_guidance_scale, resolution, candidates)

    mesh_file.change(logic.show_mesh, mesh_file, mesh_view, api_name="display_mesh").success(
        logic.preview_views, [mesh_file, n_views, radius, pitch, y_rotation], views_gallery,
        api_name="preview_uploaded_views", api_visibility="private", show_progress="minimal",
        validator=logic.validate_views,
    )
    gr.on(
        [n_views.change, radius.change, pitch.change, y_rotation.change],
        logic.preview_views,
        inputs=[mesh_file, n_views, radius, pitch, y_rotation],
        outputs=views_gallery,
        api_name="preview_views",
        validator=logic.validate_views,
        trigger_mode="always_last",
        show_progress="minimal",
    )
    generation_inputs = [mesh_file, prompt, n_views, radius, pitch, y_rotation, seed, randomize_seed,
                         steps, guidance_scale, image_guidance_scale, resolution, model, candidates, show_asset]
    generation = gr.on(
        [generate_button.click, prompt.submit],
        logic.generate,
        inputs=generation_inputs,
        outputs=[*result_outputs, result],
        api_name="generate",
        validator=logic.validate_generation,
        show_progress_on=[status],  # progress, and a failure's "Error" mark, on the status line alone
        concurrency_limit=config.concurrency,
        concurrency_id="gpu",
    )
    # The alignment runs by itself after every generation: it is the measured answer to "is this my
    # asset?", takes well under a second on the CPU at the generated size, and as its own event it
    # neither delays the image nor holds the GPU queue slot.
    generation.success(
        logic.align_result, [result, show_asset], [*alignment_outputs, pointcloud_plot, downloads, result],
        api_name="align_result", api_visibility="private", show_progress_on=[alignment_text],
    )
    gr.on(  # API only: align any (image, point map) pair with its mesh
        [], logic.align_pair, [mesh_file, image, pointmap, y_rotation], [*alignment_outputs, pointcloud_plot],
        api_name="align",
    )
    show_asset.change(logic.redraw_pointcloud, [result, show_asset], [pointcloud_plot, show_asset],
                      api_visibility="private")
    # Stop: a running generation ends after its current step, reporting it itself; one waiting in
    # the queue is cancelled by Gradio (a cancelled running one samples on beside the next one).
    stop_button.click(logic.request_stop, None, stop_in_queue, api_visibility="private", concurrency_limit=None)
    stop_in_queue.change(None, None, None, cancels=[generation], api_visibility="private")
    gr.on([demo.load, model.change], logic.resolution_slider, [model, resolution], resolution,
          api_visibility="private")
    examples.dataset.click(logic.forget_result, None, [result, show_asset, randomize_seed], api_visibility="private")
    demo.unload(logic.end_session)

demo.queue(max_size=32, default_concurrency_limit=2)
if config.preload:
    service.preload()

if __name__ == "__main__":
    demo.launch(**logic.launch_options(config))
