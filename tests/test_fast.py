"""Fast sampler (refany3d.fast): exact mode equals the faithful path, caches change nothing,
cached mode stays close; on tiny random models the tests build."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from refany3d import InputError, RefAny3DPipeline
from refany3d.conditions import latent_position_ids
from refany3d.fast import KIND_ADAPTERS, FastDenoiser, JointLayout, adapter_ranges, cached_encoders
from refany3d.transformer import joint_forward, refany3d_branches, refany3d_group_mask

from conftest import random_views

PROMPT = "a red chair on the wooden floor"


@pytest.fixture(scope="module")
def pipe(tiny_model):
    base, ref = tiny_model(5)
    return RefAny3DPipeline.from_pretrained(str(base), str(ref), device="cpu", dtype=torch.float32)


def run(pipe, mode: str, n_views: int = 2, seed: int = 0, view_seed: int = 0, **kw):
    rgb, pm = random_views(n_views, size=kw.get("condition_size", 32), seed=view_seed)
    kw = {**dict(height=32, width=32, condition_size=32, num_inference_steps=2, output_type="np"), **kw}
    return pipe(PROMPT, rgb, pm, generator=torch.Generator().manual_seed(seed), mode=mode, **kw)


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.mark.parametrize("image_guidance_scale", [1.0, 2.0])
@pytest.mark.parametrize("n_views", [1, 3, 8])
def test_exact_mode_equals_faithful(pipe, n_views, image_guidance_scale):
    seed = 10 * n_views + int(image_guidance_scale)  # a different seed for every case
    size = dict(height=16, width=16, condition_size=16)
    kw = dict(n_views=n_views, seed=seed, view_seed=seed, image_guidance_scale=image_guidance_scale, **size)
    faithful, exact = run(pipe, "faithful", **kw), run(pipe, "exact", **kw)
    assert exact.image.shape == faithful.image.shape == (16, 16, 3)
    assert max_abs(exact.image, faithful.image) <= 1e-4
    assert max_abs(exact.pointmap, faithful.pointmap) <= 1e-4
    assert exact.settings["mode"] == "exact"


def test_cache_hits_give_identical_outputs_and_keep_seeds_meaningful(pipe):
    encoders = cached_encoders(pipe)
    encoders.clear_caches()
    first = run(pipe, "exact", n_views=3, seed=4)
    assert len(encoders.prompt_cache) == 1 and len(encoders.view_cache) == 7  # 3 + 3 views + the black view
    again = run(pipe, "exact", n_views=3, seed=4)
    assert len(encoders.prompt_cache) == 1 and len(encoders.view_cache) == 7  # all hits
    np.testing.assert_array_equal(again.image, first.image)
    np.testing.assert_array_equal(again.pointmap, first.pointmap)
    # A new seed with every encoding cached still draws fresh noise and posterior samples.
    other = run(pipe, "exact", n_views=3, seed=5)
    assert max_abs(other.image, first.image) > 1e-2
    assert max_abs(other.image, run(pipe, "faithful", n_views=3, seed=5).image) <= 1e-4
    assert cached_encoders(pipe) is encoders


def test_cached_mode_is_close_to_exact(pipe):
    kw = dict(n_views=4, seed=2, num_inference_steps=8, image_guidance_scale=2.0)
    exact, cached = run(pipe, "exact", **kw), run(pipe, "cached", **kw)
    assert cached.settings["mode"] == "cached"
    assert 0 < max_abs(cached.image, exact.image)  # it is an approximation, and a different computation
    assert psnr(cached.image, exact.image) >= 30
    assert psnr(cached.pointmap, exact.pointmap) >= 30


def test_cache_refresh_trades_speed_for_accuracy(pipe):
    kw = dict(n_views=3, seed=6, num_inference_steps=6, image_guidance_scale=2.0)
    exact = run(pipe, "exact", **kw)
    # Refreshing at every step is a full step every step: the exact computation.
    every = run(pipe, "cached", cache_refresh_every=1, **kw)
    assert max_abs(every.pointmap, exact.pointmap) <= 1e-4 and max_abs(every.image, exact.image) <= 1e-4
    assert every.settings["cache_refresh_every"] == 1
    once, some = run(pipe, "cached", **kw), run(pipe, "cached", cache_refresh_every=2, **kw)
    assert once.settings["cache_refresh_every"] == 0
    assert 0 < max_abs(some.pointmap, exact.pointmap) < max_abs(once.pointmap, exact.pointmap)


@pytest.mark.parametrize("mode, refresh, message", [
    ("exact", 2, "cache_refresh_every applies to mode='cached' only"),
    ("cached", -1, "cache_refresh_every must be a whole number >= 0, got -1"),
    ("cached", 1.5, "cache_refresh_every must be a whole number >= 0, got 1.5"),
])
def test_bad_cache_refresh_is_an_input_error(pipe, mode, refresh, message):
    with pytest.raises(InputError, match=message):
        run(pipe, mode, cache_refresh_every=refresh)


def test_fast_modes_report_every_step(pipe):
    for mode in ("exact", "cached"):
        calls = []
        run(pipe, mode, num_inference_steps=3, callback=lambda i, n: calls.append((i, n)))
        assert calls == [(1, 3), (2, 3), (3, 3)]


def test_unknown_mode_is_an_input_error(pipe):
    with pytest.raises(InputError, match="mode must be one of faithful, exact, cached, got 'fastest'"):
        run(pipe, "fastest")


def test_adapter_ranges_merge_adjacent_rows_of_each_adapter():
    # One row per kind: text, RGB target, point-map target, point-map views, RGB views.
    ranges = adapter_ranges([(k, k + 1, k) for k in range(5)])
    assert ranges == {"default": [(3, 5)], "coord": [(2, 4)]}
    assert KIND_ADAPTERS[3] == ("default", "coord")
    layout = JointLayout(text_len=3, target_len=4, view_len=2, n_views=2, guided=True)
    # cond pass: 3 text + 4 + 4 + 2*2 + 2*2 = 19 rows; uncond keeps 1 view per domain: 3+4+4+2+2 = 15
    assert layout.pass_offsets == (0, 19)
    # uncond rows: text 19-22, RGB target 22-26, point-map target 26-30, point-map view 30-32, RGB view 32-34
    assert layout.joint_ranges == {"default": [(11, 19), (30, 34)], "coord": [(7, 15), (26, 32)]}
    assert [s[2] for s in layout.image_segments] == [1, 2, 3, 4] * 2


def _random_inputs(transformer, n_views: int, side: int = 4, text_len: int = 6):
    g = torch.Generator().manual_seed(n_views)
    c = transformer.config.in_channels
    tokens = side * side
    return dict(
        text=torch.randn(1, text_len, transformer.config.joint_attention_dim, generator=g),
        pooled=torch.randn(1, transformer.config.pooled_projection_dim, generator=g),
        targets=[torch.randn(1, tokens, c, generator=g) for _ in range(2)],
        target_ids=latent_position_ids(2 * side, 2 * side),
        rgb=torch.randn(n_views, tokens, c, generator=g),
        pm=torch.randn(n_views, tokens, c, generator=g),
        view_ids=latent_position_ids(2 * side, 2 * side, (0, -32)),
        black=torch.randn(1, tokens, c, generator=g),
        guidance=torch.full((1,), 3.5),
        t=torch.tensor([0.6]),
    )


@pytest.mark.parametrize("n_views", [1, 5])
def test_fast_forward_matches_joint_forward_with_random_lora(pipe, n_views):
    transformer = pipe.flux.transformer
    lora = [p for name, p in transformer.named_parameters() if "lora_" in name]
    saved = [p.detach().clone() for p in lora]
    try:
        torch.manual_seed(n_views)
        with torch.no_grad():
            for p in lora:
                p.normal_(0.0, 0.3)
        x = _random_inputs(transformer, n_views)
        denoiser = FastDenoiser(
            transformer, pipe.domain_embedder, x["text"], x["pooled"], x["target_ids"],
            (x["rgb"], x["pm"], x["view_ids"]), (x["black"], x["black"]), x["guidance"],
        )
        cond, uncond = denoiser.predict(x["targets"], x["t"])

        def reference(rgb, pm, mask):
            branches = refany3d_branches(
                x["text"], x["pooled"], x["targets"], x["target_ids"], list(rgb[:, None]), list(pm[:, None]),
                x["view_ids"], x["t"], x["guidance"],
            )
            return joint_forward(transformer, branches, pipe.domain_embedder, mask)

        with torch.no_grad():
            want_cond = reference(x["rgb"], x["pm"], refany3d_group_mask(n_views))
            black = x["black"].expand(n_views, -1, -1)
            want_uncond = reference(black, black, None)
            for p in lora:
                p.zero_()
            without_lora = reference(x["rgb"], x["pm"], refany3d_group_mask(n_views))
        for got, want in zip(cond + uncond, want_cond + want_uncond):
            assert got.shape == want.shape
            assert float((got - want).abs().max()) <= 1e-5
        # The adapters really act (else this test could not see a wrong adapter on some rows).
        assert float((want_cond[1] - without_lora[1]).abs().max()) > 1e-2
    finally:
        with torch.no_grad():
            for p, value in zip(lora, saved):
                p.copy_(value)


def test_exact_mode_matches_release_outputs(shared_parity):
    fixture = shared_parity / "fixture"
    pipe = RefAny3DPipeline.from_pretrained(str(fixture / "base"), str(fixture / "ref"), device="cpu", dtype=torch.float32)
    case = json.loads((fixture / "cases.json").read_text())[0]
    torch.manual_seed(case["torch_manual_seed_before"])
    out = pipe(
        case["prompt"],
        [Image.open(fixture / name) for name in case["rgb_views"]],
        [Image.open(fixture / name) for name in case["pointmap_views"]],
        height=case["height"],
        width=case["width"],
        condition_size=case["condition_size"],
        num_inference_steps=case["num_inference_steps"],
        guidance_scale=case["guidance_scale"],
        image_guidance_scale=case["image_guidance_scale"],
        generator=torch.Generator("cpu").manual_seed(case["seed"]),
        max_sequence_length=case["max_sequence_length"],
        output_type="np",
        mode="exact",
    )
    expected = np.load(fixture / case["expected"])
    assert max_abs(out.image, expected["image"]) <= 1e-4
    assert max_abs(out.pointmap, expected["pointmap"]) <= 1e-4


def test_compiled_blocks_match_eager_in_one_graph_each(pipe):
    """enable_compile(): the same output as eager exact mode, each block function one graph (a graph
    break splits a block into fragments that recompile per layer, and FLUX has 57 blocks)."""
    from torch._dynamo.utils import counters

    eager = run(pipe, "exact", n_views=2, seed=3)
    torch._dynamo.reset()
    counters.clear()
    pipe.enable_compile()
    try:
        compiled = run(pipe, "exact", n_views=2, seed=3)
    finally:
        pipe.enable_compile(False)
        torch._dynamo.reset()
    assert max_abs(compiled.image, eager.image) <= 1e-4
    assert max_abs(compiled.pointmap, eager.pointmap) <= 1e-4
    assert not counters["unimplemented"], list(counters["unimplemented"])  # what dynamo broke the graph on
    # One graph per block function, shared by every layer: no fragments, no per-layer recompiles.
    assert counters["stats"]["unique_graphs"] == 2


def test_sampling_without_the_group_mask_for_the_ablation(pipe):
    """group_mask=False (models trained --no-group-mask): exact equals faithful, and full attention
    changes the output (with random LoRA the point-map target then reads the text)."""
    kw = dict(n_views=3, seed=4, view_seed=4, height=16, width=16, condition_size=16)
    faithful = run(pipe, "faithful", group_mask=False, **kw)
    exact = run(pipe, "exact", group_mask=False, **kw)
    masked = run(pipe, "exact", **kw)
    assert max_abs(exact.image, faithful.image) <= 1e-4
    assert max_abs(exact.pointmap, faithful.pointmap) <= 1e-4
    assert max_abs(exact.pointmap, masked.pointmap) > 1e-3
    assert faithful.settings["group_mask"] is False and "group_mask" not in masked.settings
    with pytest.raises(InputError, match="group_mask must be true or false, got 'no'"):
        run(pipe, "exact", group_mask="no")
