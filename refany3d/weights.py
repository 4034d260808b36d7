"""The RefAny3D weights in their published layout (`JudgementH/RefAny3D`): find, create, save, load.

A RefAny3D model is a FLUX base plus three files: two LoRA adapters on the base's transformer,
`default.safetensors` (the reference LoRA) and `coord.safetensors` (the point-map domain LoRA),
and `domain_embedder.pth`, the small network whose output is added to the timestep embedding of
each image branch. The trainer writes this layout, and the pipeline reads it, whether the base is
FLUX.1-dev or a small model built here (`refany3d.tiny`).
"""
from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from refany3d.errors import ModelLoadError

DEFAULT_BASE_MODEL = "black-forest-labs/FLUX.1-dev"
DEFAULT_REF_MODEL = "JudgementH/RefAny3D"
REF_WEIGHT_FILES = ("coord.safetensors", "default.safetensors", "domain_embedder.pth")
ADAPTERS = ("default", "coord")
# The release's LoRA targets (a peft regex over FluxTransformer2DModel module names): the image
# input projection and, in every block, the image stream's modulation, attention and MLP output
# projections. The text stream's own projections and the final proj_out carry no LoRA.
LORA_TARGET_MODULES = (
    r"x_embedder"
    r"|transformer_blocks\.\d+\.(norm1\.linear|attn\.to_(q|k|v|out\.0)|ff\.net\.2)"
    r"|single_transformer_blocks\.\d+\.(norm\.linear|attn\.to_(q|k|v)|proj_mlp|proj_out)"
)


def looks_like_a_path(name: str) -> bool:
    """A Hub repo id is 'owner/name'; anything absolute, relative-dotted or deeper is a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or os.sep != "/" and os.sep in name


def partner_base(ref_model: str | Path) -> str:
    """The base model that RefAny3D weights given alone belong with. `train` writes OUT/base beside
    OUT/ref, or records in OUT/settings.json the base that stage 1 ran on; weights with neither
    (the Hub's) belong with FLUX.1-dev."""
    import json

    folder = Path(ref_model).expanduser()
    if folder.is_dir():
        if (folder.parent / "base" / "model_index.json").is_file():
            return str(folder.parent / "base")
        try:
            recorded = json.loads((folder.parent / "settings.json").read_text()).get("base_model")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if isinstance(recorded, str) and recorded:
            return recorded
    return DEFAULT_BASE_MODEL


def partner_ref(base_model: str | Path) -> str:
    """The RefAny3D weights that a base model given alone belongs with: OUT/ref beside a base that
    `train` wrote as OUT/base, else the published weights (for FLUX.1-dev)."""
    folder = Path(base_model).expanduser()
    beside = folder.parent / "ref"
    if folder.is_dir() and all((beside / name).is_file() for name in REF_WEIGHT_FILES):
        return str(beside)
    return DEFAULT_REF_MODEL


def resolve_ref_weights(ref_model: str | Path) -> dict[str, Path]:
    """Local paths of the RefAny3D weight files, from a folder or a Hugging Face repo id."""
    folder = Path(ref_model).expanduser()
    if folder.is_dir():
        missing = [name for name in REF_WEIGHT_FILES if not (folder / name).is_file()]
        if missing:
            raise ModelLoadError(
                f"RefAny3D weights folder {str(folder)!r} lacks {', '.join(missing)}; it must hold "
                f"{', '.join(REF_WEIGHT_FILES)} (the layout of {DEFAULT_REF_MODEL})."
            )
        return {name: folder / name for name in REF_WEIGHT_FILES}
    if folder.exists():
        raise ModelLoadError(f"RefAny3D weights {str(folder)!r} is a file; give the folder that holds "
                             f"{', '.join(REF_WEIGHT_FILES)} (CLI: --ref-model DIR; train: --init-ref DIR)")
    if looks_like_a_path(str(ref_model)):
        raise ModelLoadError(f"RefAny3D weights folder {str(ref_model)!r} not found "
                             "(CLI: --ref-model DIR; train: --init-ref DIR), "
                             f"and it is not a Hugging Face repo id such as {DEFAULT_REF_MODEL}")
    try:
        from huggingface_hub import hf_hub_download

        return {name: Path(hf_hub_download(str(ref_model), name)) for name in REF_WEIGHT_FILES}
    except Exception as err:  # hub errors come in many types: network, auth, not found, offline
        raise ModelLoadError(
            f"could not get RefAny3D weights {', '.join(REF_WEIGHT_FILES)} from {str(ref_model)!r} "
            f"(not a local folder, and the Hugging Face Hub said: {type(err).__name__}: {err}). "
            "Download them and pass the folder as ref_model (CLI: --ref-model DIR; train: --init-ref DIR)."
        ) from None


@contextmanager
def two_adapters_allowed():
    """Silence peft's warning about a second adapter on one model: RefAny3D has two by design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        yield


def add_refany3d_adapters(transformer, rank: int = 4, alpha: int = 4, init_scale: float = 0.0) -> None:
    """Attach the two RefAny3D LoRA adapters ("default", "coord") to a FluxTransformer2DModel.

    `init_scale` > 0 gives lora_B random values, so an untrained adapter already changes outputs
    (tests need that to see which branch used which adapter); 0 is the usual training init.
    """
    from peft import LoraConfig

    with two_adapters_allowed():
        for name in ADAPTERS:
            transformer.add_adapter(
                LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=LORA_TARGET_MODULES),
                adapter_name=name,
            )
    if init_scale > 0:
        with torch.no_grad():
            for pname, param in transformer.named_parameters():
                if "lora_B" in pname:
                    param.normal_(0.0, init_scale)


def new_domain_embedder(inner_dim: int) -> torch.nn.Sequential:
    """Embedding(2,256) -> Linear -> SiLU -> Linear: the per-domain (RGB=0, point map=1) offset."""
    return torch.nn.Sequential(
        torch.nn.Embedding(2, 256),
        torch.nn.Linear(256, inner_dim),
        torch.nn.SiLU(),
        torch.nn.Linear(inner_dim, inner_dim),
    )


def save_refany3d_weights(transformer, domain_embedder: torch.nn.Module, ref_dir: str | Path) -> Path:
    """Write coord.safetensors, default.safetensors and domain_embedder.pth (the published layout)."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    ref_dir = Path(ref_dir)
    ref_dir.mkdir(parents=True, exist_ok=True)
    for name in ADAPTERS:
        layers = get_peft_model_state_dict(transformer, adapter_name=name)
        FluxPipeline.save_lora_weights(
            ref_dir, transformer_lora_layers=layers, weight_name=f"{name}.safetensors", safe_serialization=True
        )
    torch.save(domain_embedder.state_dict(), ref_dir / "domain_embedder.pth")
    return ref_dir


def load_domain_embedder(path: Path, inner_dim: int) -> torch.nn.Sequential:
    embedder = new_domain_embedder(inner_dim)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        embedder.load_state_dict(state)
    except Exception as err:
        raise ModelLoadError(f"cannot load the domain embedder {str(path)!r}: {err}") from None
    return embedder


def _lora_layers(path: Path) -> dict[str, tuple[list[int], list[int] | None]]:
    """The layers a LoRA file adapts, with the shapes of their down- and up-projections when the
    file is in diffusers' layout (`transformer.<layer>.lora_A.weight`); text encoders' left out
    (RefAny3D adapts the transformer only)."""
    from safetensors import safe_open

    layers: dict[str, tuple[list[int], list[int] | None]] = {}
    with safe_open(str(path), "pt") as weights:
        keys = set(weights.keys())
        for key in sorted(keys):
            if ("lora_A" in key or "lora_down" in key) and "text_encoder" not in key and "lora_te" not in key:
                up = key.replace("lora_A", "lora_B").replace("lora_down", "lora_up")
                layers[key] = (list(weights.get_slice(key).get_shape()),
                               list(weights.get_slice(up).get_shape()) if up in keys else None)
    return layers


def _check_lora_fits(transformer, path: Path, layers: dict[str, tuple[list[int], list[int] | None]]) -> None:
    """Refuse, naming one layer, a LoRA (`path`, whose `_lora_layers` these are) made for another
    base: torch would list every mismatching layer (hundreds for FLUX), and layers the base lacks
    would be dropped in silence."""
    for key, (down, up) in layers.items():
        match = re.fullmatch(r"transformer\.(.+)\.lora_A(?:\.[^.]+)?\.weight", key)
        if match is None:
            continue  # another layout: diffusers converts it, and the count after loading checks it
        try:
            layer = transformer.get_submodule(match.group(1))
        except AttributeError:
            raise ModelLoadError(f"LoRA {str(path)!r} adapts layer {match.group(1)}, which this base model "
                                 "lacks: these RefAny3D weights were made for another base (give that base model)") from None
        ours = (getattr(layer, "in_features", None), getattr(layer, "out_features", None))
        if None in ours:
            continue  # not a linear layer: diffusers checks it as it loads
        theirs = (down[-1], up[0] if up else ours[1])
        if ours != theirs:
            raise ModelLoadError(
                f"LoRA {str(path)!r} does not fit this base model: layer {match.group(1)} maps {theirs[0]} to "
                f"{theirs[1]} features in the file, {ours[0]} to {ours[1]} in the base; these RefAny3D weights "
                "were made for another base (give that base model)")


def _adapted_layer_count(transformer, adapter: str) -> int:
    return sum(1 for module in transformer.modules() if adapter in getattr(module, "lora_A", {}))


def load_refany3d_weights(flux, ref_files: Mapping[str, Path]) -> torch.nn.Sequential:
    """Attach the RefAny3D LoRAs ("default", "coord") among `ref_files` (`resolve_ref_weights`) to
    a FluxPipeline's transformer and return its domain embedder; used to sample and to train on.

    Weights made for another base are refused by name: a layer of another width fails to load,
    and a layer the base lacks (a FLUX variant with fewer blocks) would be dropped in silence."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # silence "no LoRA keys for the text encoder": by design
    try:
        with two_adapters_allowed():
            for name in ADAPTERS:
                path = ref_files[f"{name}.safetensors"]
                try:
                    layers = _lora_layers(path)  # the file's header, read once
                    _check_lora_fits(flux.transformer, path, layers)
                    flux.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
                except ModelLoadError:
                    raise
                except Exception as err:
                    raise ModelLoadError(f"cannot load LoRA {str(path)!r} as adapter {name!r}: "
                                         f"{_first_line(err)}") from None
                expected, adapted = len(layers), _adapted_layer_count(flux.transformer, name)
                if adapted != expected:
                    raise ModelLoadError(
                        f"LoRA {str(path)!r} adapts {expected} layers, but only {adapted} of them were found in this "
                        "base model: the weights were made for another base (give that base model), or their "
                        "layout is not one diffusers reads")
    finally:
        diffusers_logging.set_verbosity(verbosity)
    # The branches apply their adapters explicitly (transformer.lora_linear); with peft's own
    # forward disabled, `pipe.flux` stays the plain base model for text-to-image use.
    flux.disable_lora()
    inner = flux.transformer.config.num_attention_heads * flux.transformer.config.attention_head_dim
    return load_domain_embedder(ref_files["domain_embedder.pth"], inner)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
