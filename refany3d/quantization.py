"""Weights stored in 8 bits (`quantize="int8"`): FLUX.1-dev's two large models in half the memory.

The transformer (22 GiB in bfloat16) and the T5 encoder (9 GiB) hold nearly all of FLUX.1-dev's
weights, and nearly all of those are linear layers. torchao's int8 weight-only scheme stores each
of their weight matrices as int8 with one scale per output row and computes in the model's dtype,
so both halve (11.1 and 4.6 GiB) and everything fits a 24 GB GPU without offload. The LoRA
adapters and the domain embedder stay in the model's dtype: peft wraps a quantized linear layer as
it wraps any other, and the joint pass adds each adapter's delta to the quantized layer's output.

It goes through diffusers' own loading (`PipelineQuantizationConfig`), so the weights are
quantized as they load and never all sit in memory at full precision. torchao is imported only
when asked for, since it is a GPU-minded package most CPU runs never need.
"""
from __future__ import annotations

from typing import Any

from refany3d.errors import InputError, ModelLoadError

QUANTIZE_MODES = ("int8",)
# FluxPipeline components quantized, with the library that loads each (their configs differ).
QUANTIZED_COMPONENTS = {"transformer": "diffusers", "text_encoder_2": "transformers"}
TORCHAO_REQUIREMENT = "torchao==0.18.0"


def parse_quantize(value: str | None) -> str | None:
    """None (full precision) or one of QUANTIZE_MODES; "none" and "" also mean None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, str) and value.strip().lower() in QUANTIZE_MODES:
        return value.strip().lower()
    raise InputError(f"quantize must be one of {', '.join(QUANTIZE_MODES)} (or None for full precision), got {value!r}")


def quantization_config(mode: str | None) -> Any | None:
    """diffusers' PipelineQuantizationConfig that loads FluxPipeline's transformer and T5 in `mode`
    (None for None: full precision, diffusers' default)."""
    if parse_quantize(mode) is None:
        return None
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError:
        raise ModelLoadError(f"quantize={mode!r} needs torchao, which is not installed: "
                             f"pip install {TORCHAO_REQUIREMENT}") from None
    from diffusers import PipelineQuantizationConfig
    from diffusers import TorchAoConfig as DiffusersTorchAoConfig
    from transformers import TorchAoConfig as TransformersTorchAoConfig

    configs = {"diffusers": DiffusersTorchAoConfig, "transformers": TransformersTorchAoConfig}
    return PipelineQuantizationConfig(quant_mapping={
        component: configs[library](Int8WeightOnlyConfig()) for component, library in QUANTIZED_COMPONENTS.items()
    })
