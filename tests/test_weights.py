"""RefAny3D weights in the published layout: which base they go with, and weights made for another
base refused by name instead of loading wrong or failing with torch's page of mismatches."""
from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import refany3d
from refany3d.errors import ModelLoadError
from refany3d.pipeline import RefAny3DPipeline, default_model
from refany3d.tiny import TinyConfig, build_tiny_model
from refany3d.weights import DEFAULT_BASE_MODEL, DEFAULT_REF_MODEL, partner_base, partner_ref


def test_every_public_name_resolves():
    """`refany3d.X` is imported lazily from the module `_EXPORTS` names; a stale entry would only
    fail at a user's first use."""
    for name, module in refany3d._EXPORTS.items():
        assert getattr(refany3d, name) is getattr(importlib.import_module(f"refany3d.{module}"), name)
    assert set(refany3d._EXPORTS) <= set(dir(refany3d))
    with pytest.raises(AttributeError, match="has no attribute 'nonexistent'"):
        refany3d.nonexistent  # noqa: B018


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model) -> dict[str, tuple[Path, Path]]:
    """Three tiny models as `train` lays them out (OUT/base beside OUT/ref): the usual one, one with
    a second double block, one twice as wide."""
    root = tmp_path_factory.mktemp("weights")
    return {
        "usual": tiny_model(),
        "deeper": build_tiny_model(root / "deeper", config=TinyConfig(num_layers=2)),
        "wider": build_tiny_model(root / "wider", config=TinyConfig(attention_head_dim=32,
                                                                    axes_dims_rope=(8, 12, 12))),
    }


def test_weights_for_a_deeper_base_are_refused_not_half_loaded(models):
    """A LoRA naming blocks the base lacks (FLUX.1-dev's weights on a variant with fewer blocks)
    loads in diffusers without a word; here it is refused, naming the layer."""
    base, _ = models["usual"]
    _, deeper_ref = models["deeper"]
    with pytest.raises(ModelLoadError) as caught:
        RefAny3DPipeline.from_pretrained(str(base), str(deeper_ref), device="cpu")
    message = str(caught.value)
    assert "default.safetensors" in message and "made for another base" in message
    assert "adapts layer transformer_blocks.1." in message and "which this base model lacks" in message


def test_a_lora_diffusers_applies_nowhere_is_refused(models, tmp_path):
    """Keys without diffusers' `transformer.` prefix load as nothing at all, in silence; counting
    the adapted layers after the load catches it, whatever the file's layout."""
    base, ref = models["usual"]
    odd = tmp_path / "odd"
    odd.mkdir()
    for name in ("default", "coord"):
        weights = load_file(ref / f"{name}.safetensors")
        save_file({key.removeprefix("transformer."): value for key, value in weights.items()},
                  odd / f"{name}.safetensors")
    shutil.copy(ref / "domain_embedder.pth", odd)
    layers = sum("lora_A" in key for key in load_file(ref / "default.safetensors"))
    with pytest.raises(ModelLoadError, match=f"adapts {layers} layers, but only 0 of them were found in this base model"):
        RefAny3DPipeline.from_pretrained(str(base), str(odd), device="cpu")


def test_weights_of_another_width_give_one_line(models):
    base, _ = models["usual"]
    _, wider_ref = models["wider"]
    with pytest.raises(ModelLoadError) as caught:
        RefAny3DPipeline.from_pretrained(str(base), str(wider_ref), device="cpu")
    message = str(caught.value)
    assert "\n" not in message
    assert "does not fit this base model" in message and "made for another base" in message
    # the file's width (2 heads x 32) and the base's (2 heads x 16)
    assert "64 features in the file, 32 to 32 in the base" in message


def test_one_half_comes_with_its_partner(models, tmp_path):
    base, ref = models["usual"]
    # train's layout: OUT/base beside OUT/ref
    assert default_model({}, ref=str(ref)) == (str(base), str(ref))
    assert default_model({}, base=str(base)) == (str(base), str(ref))
    assert default_model({"REFANY3D_REF_MODEL": f" {ref} "}) == (str(base), str(ref))
    # weights with no base beside them: the base their settings.json names, else FLUX.1-dev
    alone = tmp_path / "alone" / "ref"
    shutil.copytree(ref, alone)
    assert partner_base(alone) == DEFAULT_BASE_MODEL
    (alone.parent / "settings.json").write_text(json.dumps({"base_model": "someone/flux-variant"}))
    assert partner_base(alone) == "someone/flux-variant"
    # hub ids: the published pair
    assert default_model({}, ref=DEFAULT_REF_MODEL) == (DEFAULT_BASE_MODEL, DEFAULT_REF_MODEL)
    assert partner_ref(DEFAULT_BASE_MODEL) == DEFAULT_REF_MODEL
    # both halves given: taken as they are
    assert default_model({"REFANY3D_BASE_MODEL": "b/b"}, ref="r/r") == ("b/b", "r/r")
