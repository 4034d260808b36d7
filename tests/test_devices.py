"""Where and in what precision a pipeline runs: dtype by name or as diffusers' `torch_dtype`,
`pipe.to(dtype)`, CPU offload by model or by block, int8 weights (`quantize`), and diffusers' own
offload hooks refused with what to use instead."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from refany3d.errors import InputError, ModelLoadError
from refany3d.pipeline import RefAny3DPipeline, parse_dtype


@pytest.fixture(scope="module")
def model_dirs(tiny_model):
    return tuple(map(str, tiny_model(5)))


def _sample(pipe, **kwargs):
    rng = np.random.default_rng(0)
    views = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    return pipe("a red box", views[:1], views[1:], height=32, width=32, condition_size=32, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)


def test_dtype_by_name_and_as_torch_dtype(model_dirs):
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16
    assert parse_dtype(None) is None
    pipe = RefAny3DPipeline.from_pretrained(*model_dirs, device="cpu", torch_dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and pipe.domain_embedder[1].weight.dtype == torch.bfloat16
    assert pipe.source["dtype"] == "bfloat16"
    with pytest.raises(InputError, match="dtype=.* and torch_dtype=.* disagree"):
        RefAny3DPipeline.from_pretrained(*model_dirs, device="cpu", dtype="float32", torch_dtype=torch.bfloat16)


def test_to_casts_and_moves(model_dirs):
    pipe = RefAny3DPipeline.from_pretrained(*model_dirs, device="cpu")
    full = _sample(pipe)
    assert pipe.to(torch.bfloat16) is pipe
    assert pipe.dtype == torch.bfloat16 and pipe.flux.vae.dtype == torch.bfloat16
    assert pipe.domain_embedder[1].weight.dtype == torch.bfloat16 and pipe.source["dtype"] == "bfloat16"
    half = _sample(pipe)
    assert np.isfinite(half.image).all() and np.abs(half.image - full.image).max() < 0.1  # same picture, rounded
    pipe.to("cpu", dtype=torch.float32)
    np.testing.assert_allclose(_sample(pipe).image, full.image, atol=1e-2)
    with pytest.raises(InputError, match="dtype must be"):
        pipe.to(dtype="float64")


def test_diffusers_offload_hooks_are_refused_with_what_to_use(model_dirs):
    """enable_model_cpu_offload hooks forward(), which the joint pass never calls: it would sample
    on the wrong device (and sequential offload on meta tensors)."""
    pipe = RefAny3DPipeline.from_pretrained(*model_dirs, device="cpu")
    pipe.flux.enable_model_cpu_offload(device="cpu")
    with pytest.raises(InputError, match="diffusers' CPU offload hooks are on transformer.*enable_cpu_offload"):
        _sample(pipe)


def _block_lists(pipe):
    transformer = pipe.flux.transformer
    return [transformer.transformer_blocks, transformer.single_transformer_blocks]


def _resting(pipe) -> list[bool]:
    """Per block (double blocks first), whether its weights are the tensors it rests in."""
    return [all(holder.data_ptr() == rest.data_ptr() for holder, rest in tensors)
            for stream in pipe.offload.streams for tensors in stream.resting]


@pytest.mark.parametrize("mode", ["faithful", "exact"])
def test_model_offload_moves_each_model_there_and_back(model_dirs, mode):
    """Model offload: every model visits the execution device for its stage only; on this CPU-only
    machine that device is the CPU, so the output must not change."""
    pipe = RefAny3DPipeline.from_pretrained(*model_dirs, device="cpu")
    plain = _sample(pipe, mode=mode)
    moved = []
    original = torch.nn.Module.to

    def spy(module, *args, **kwargs):
        moved.append(type(module).__name__)
        return original(module, *args, **kwargs)

    assert pipe.enable_cpu_offload("model", device="cpu") is pipe and pipe.cpu_offload == "model"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.Module, "to", spy)
        offloaded = _sample(pipe, mode=mode)
    np.testing.assert_array_equal(plain.image, offloaded.image)
    for model in ("CLIPTextModel", "T5EncoderModel", "AutoencoderKL", "FluxTransformer2DModel", "Sequential"):
        assert moved.count(model) >= 2, (model, moved)  # there and back


@pytest.mark.parametrize("mode", ["faithful", "exact"])
def test_block_offload_brings_one_block_at_a_time(model_dirs, mode):
    """Block offload: while a block runs, its weights are fresh copies on the execution device and
    every other block's are the CPU tensors they rest in; after the call all rest again. The
    output is the same as without offload."""
    pipe = RefAny3DPipeline.from_pretrained(*model_dirs, device="cpu")
    plain = _sample(pipe, mode=mode)
    pipe.enable_cpu_offload("blocks", device="cpu")
    assert pipe.cpu_offload == "blocks" and all(_resting(pipe))
    seen = []
    blocks = [block for blocks in _block_lists(pipe) for block in blocks]
    hooks = [block.attn.to_q.base_layer.register_forward_pre_hook(lambda *_, i=i: seen.append((i, _resting(pipe))))
             for i, block in enumerate(blocks)]
    try:
        offloaded = _sample(pipe, mode=mode)
    finally:
        for hook in hooks:
            hook.remove()
    # the same numbers, up to float rounding (the copies are new allocations, which can change
    # how the CPU's matmul kernels split their work)
    np.testing.assert_allclose(plain.image, offloaded.image, atol=1e-5)
    np.testing.assert_allclose(plain.pointmap, offloaded.pointmap, atol=1e-5)
    assert {i for i, _ in seen} == set(range(len(blocks)))
    for i, resting in seen:
        assert resting == [j != i for j in range(len(blocks))], (i, resting)
    assert all(_resting(pipe))


def test_block_offload_puts_blocks_back_when_a_step_fails(model_dirs):
    pipe = RefAny3DPipeline.from_pretrained(*model_dirs, device="cpu").enable_cpu_offload("blocks", device="cpu")

    def fail(*_):
        raise RuntimeError("out of memory (simulated)")

    hook = _block_lists(pipe)[1][0].attn.to_q.base_layer.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            _sample(pipe)
    finally:
        hook.remove()
    assert all(_resting(pipe))
    assert np.isfinite(_sample(pipe).image).all()  # and it samples again


def test_offload_survives_a_cast_and_ends_with_a_move(model_dirs):
    pipe = RefAny3DPipeline.from_pretrained(*model_dirs, device="cpu")
    plain = _sample(pipe)
    pipe.enable_cpu_offload("blocks", device="cpu").to(torch.bfloat16)
    assert pipe.cpu_offload == "blocks" and all(_resting(pipe))
    assert all(rest.dtype == torch.bfloat16 for stream in pipe.offload.streams for tensors in stream.resting
               for holder, rest in tensors if rest.is_floating_point())
    assert np.abs(_sample(pipe).image - plain.image).max() < 0.1  # the same picture, rounded to bfloat16
    pipe.to("cpu", dtype=torch.float32)
    assert pipe.cpu_offload is None and not hasattr(_block_lists(pipe)[0], "_refany3d_block_stream")
    np.testing.assert_allclose(_sample(pipe).image, plain.image, atol=1e-2)


def test_offload_grain_is_checked(model_dirs):
    with pytest.raises(InputError, match="cpu_offload must be one of model, blocks .*got 'layers'"):
        RefAny3DPipeline.from_pretrained(*model_dirs, device="cpu", cpu_offload="layers")
    pipe = RefAny3DPipeline.from_pretrained(*model_dirs, device="cpu", cpu_offload="blocks")
    assert pipe.cpu_offload is None  # on the CPU there is nothing to offload to
    with pytest.raises(InputError, match="enable_cpu_offload takes one of model, blocks, got False"):
        pipe.enable_cpu_offload(False)


def _linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The model's own linear layers by name (inside peft's wrappers, without the adapters' A and B)."""
    return {name.removesuffix(".base_layer"): module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".lora_" not in name
            and not hasattr(module, "base_layer")}


def test_int8_stores_the_large_models_weights_in_int8_and_keeps_the_picture(model_dirs):
    """quantize="int8": every linear layer of the transformer and of T5 holds int8 weights with
    one scale per row, each within half a step of the full-precision weight; the adapters stay in
    float on top of them; the output is the full-precision output up to that rounding."""
    from torchao.quantization import Int8Tensor

    full = RefAny3DPipeline.from_pretrained(*model_dirs, device="cpu")
    pipe = RefAny3DPipeline.from_pretrained(*model_dirs, device="cpu", quantize="int8")
    assert pipe.quantize == "int8" and pipe.source["quantize"] == "int8" and "quantize" not in full.source
    for component in ("transformer", "text_encoder_2"):
        plain = _linear_layers(getattr(full.flux, component))
        quantized = _linear_layers(getattr(pipe.flux, component))
        assert plain.keys() == quantized.keys() and len(plain) >= 7
        for name, layer in quantized.items():
            weight, reference = layer.weight, plain[name].weight
            assert isinstance(weight, Int8Tensor) and weight.qdata.dtype == torch.int8, name
            assert weight.scale.shape == (reference.shape[0], 1), name  # one scale per output row
            assert (weight.dequantize() - reference).abs().le(weight.scale / 2 + 1e-6).all(), name
    for model in ("text_encoder", "vae"):  # small: kept as they were
        assert not any(isinstance(p, Int8Tensor) for p in getattr(pipe.flux, model).parameters())
    to_q = pipe.flux.transformer.transformer_blocks[0].attn.to_q
    assert set(to_q.lora_A) == {"default", "coord"} and to_q.lora_A["coord"].weight.dtype == torch.float32
    assert pipe.domain_embedder[1].weight.dtype == torch.float32

    for mode in ("faithful", "exact"):
        reference, quantized = _sample(full, mode=mode), _sample(pipe, mode=mode)
        assert np.isfinite(quantized.image).all() and np.isfinite(quantized.pointmap).all()
        assert np.abs(quantized.image - reference.image).mean() < 0.01, mode
        assert np.abs(quantized.pointmap - reference.pointmap).mean() < 0.01, mode
    # what the adapters add is still there: without "coord" the point map moves far more than int8 rounding moves it
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("refany3d.transformer.TARGET_POINTMAP_ADAPTERS", ())
        mp.setattr("refany3d.transformer.CONDITION_POINTMAP_ADAPTERS", ("default",))
        without_coord = _sample(pipe, mode="faithful")
    quantized = _sample(pipe, mode="faithful")
    reference = _sample(full, mode="faithful")
    assert np.abs(without_coord.pointmap - quantized.pointmap).mean() > 5 * np.abs(quantized.pointmap - reference.pointmap).mean()


def test_int8_pipeline_keeps_its_dtype_and_offloads_by_block(model_dirs):
    pipe = RefAny3DPipeline.from_pretrained(*model_dirs, device="cpu", quantize="int8")
    resident = _sample(pipe)
    with pytest.raises(InputError, match="loaded with quantize='int8' keeps the dtype it was loaded in "
                                         r"\(float32\); load it again with dtype=torch.bfloat16"):
        pipe.to(torch.bfloat16)
    assert pipe.to("cpu", dtype=torch.float32) is pipe  # its own dtype: nothing to cast
    pipe.enable_cpu_offload("blocks", device="cpu")
    assert all(_resting(pipe))
    np.testing.assert_allclose(_sample(pipe).image, resident.image, atol=1e-5)
    assert all(_resting(pipe))


def test_quantize_mode_is_checked_and_torchao_named_when_missing(model_dirs, monkeypatch):
    from refany3d.app_config import AppConfig

    with pytest.raises(InputError, match="quantize must be one of int8 .*got 'int4'"):
        RefAny3DPipeline.from_pretrained(*model_dirs, device="cpu", quantize="int4")
    assert AppConfig.from_env({"REFANY3D_QUANTIZE": "INT8"}).quantize == "int8"
    assert AppConfig.from_env({"REFANY3D_QUANTIZE": "none"}).quantize is None
    with pytest.raises(InputError, match="REFANY3D_QUANTIZE='nf4' must be int8, or none"):
        AppConfig.from_env({"REFANY3D_QUANTIZE": "nf4"})
    monkeypatch.setitem(__import__("sys").modules, "torchao.quantization", None)  # import fails as if absent
    with pytest.raises(ModelLoadError, match=r"quantize='int8' needs torchao, which is not installed: pip install torchao=="):
        RefAny3DPipeline.from_pretrained(*model_dirs, device="cpu", quantize="int8")
