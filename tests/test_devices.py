"""Where and in what precision a pipeline runs: dtype by name or as diffusers' `torch_dtype`,
`pipe.to(dtype)`, CPU offload by model or by block, and diffusers' own offload hooks refused with
what to use instead."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from refany3d.errors import InputError
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
