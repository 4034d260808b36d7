"""Where and in what precision a pipeline runs: dtype by name or as diffusers' `torch_dtype`,
`pipe.to(dtype)`, and diffusers' own offload hooks refused with what to use instead."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from refany3d.errors import InputError
from refany3d.pipeline import RefAny3DPipeline, parse_dtype


@pytest.fixture(scope="module")
def model_dirs(tiny_model):
    return tuple(map(str, tiny_model(5)))


def _sample(pipe):
    rng = np.random.default_rng(0)
    views = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    return pipe("a red box", views[:1], views[1:], height=32, width=32, condition_size=32, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="np")


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
    with pytest.raises(InputError, match="diffusers' CPU offload hooks are on transformer.*cpu_offload=True"):
        _sample(pipe)
