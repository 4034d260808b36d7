"""Weights that wait in CPU memory and visit the GPU only while they run (`cpu_offload=`).

Two grains, for two sizes of GPU (FLUX.1-dev in bfloat16: transformer 22 GiB, T5 9 GiB):
  - "model": each model (the text encoders, the VAE, the transformer with the domain embedder)
    moves to the GPU for the stage that uses it and back after. The transformer is the largest
    visitor, so it needs a GPU of about 40 GB.
  - "blocks": the encoders and the VAE as above, but the transformer's blocks stay in pinned CPU
    memory; each is copied onto the GPU just before it runs and dropped right after, so only its
    embedders, its output layer and one block are there while sampling. The largest visitor is
    then T5 while it encodes the prompt, and 16-24 GB GPUs are enough. Every denoising step
    copies all blocks once (22 GiB), on the compute stream, without overlap.

This is done here, not with diffusers' offload hooks, because those fire on a model's or a
block's forward(), and the joint pass calls the blocks' submodules directly. The loops over the
blocks go through `streamed`, which is the plain ModuleList when no offload is set.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from refany3d.errors import InputError

if TYPE_CHECKING:  # torch is imported where needed, so the CLI can read OFFLOAD_MODES without it
    import torch

OFFLOAD_MODES = ("model", "blocks")
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # FluxTransformer2DModel's ModuleLists
_STREAM_ATTRIBUTE = "_refany3d_block_stream"


def parse_offload(value: bool | str | None) -> str | None:
    """None for no offload, else one of OFFLOAD_MODES; True (the older flag) means "model"."""
    if value is None or value is False:
        return None
    if value is True:
        return "model"
    if isinstance(value, str) and value.strip().lower() in OFFLOAD_MODES:
        return value.strip().lower()
    raise InputError(f"cpu_offload must be one of {', '.join(OFFLOAD_MODES)} (or True for 'model', False for none), "
                     f"got {value!r}")


class BlockStream:
    """Streams a ModuleList's blocks onto `device` one at a time.

    Each block's tensors rest in CPU memory (pinned when the device is a GPU, so copies are
    asynchronous). While a block runs its parameters point at fresh copies on the device; after,
    they point back at the resting tensors, and the copies are freed. Inference only: the weights
    are never written, so nothing is copied back."""

    def __init__(self, blocks: torch.nn.ModuleList, device: torch.device):
        self.blocks, self.device = blocks, device
        pin = device.type == "cuda"
        self.resting: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for block in blocks:
            block.to("cpu")
            tensors = [*block.parameters(), *block.buffers()]
            self.resting.append([(t, _pinned(t.data) if pin else t.data) for t in tensors])
            for holder, rest in self.resting[-1]:
                holder.data = rest

    def __iter__(self) -> Iterator[torch.nn.Module]:
        for block, tensors in zip(self.blocks, self.resting):
            for holder, rest in tensors:
                holder.data = rest.to(self.device, non_blocking=True, copy=True)
            try:
                yield block
            finally:
                for holder, rest in tensors:
                    holder.data = rest

    def attach(self) -> None:
        setattr(self.blocks, _STREAM_ATTRIBUTE, self)

    def detach(self) -> None:
        if getattr(self.blocks, _STREAM_ATTRIBUTE, None) is self:
            delattr(self.blocks, _STREAM_ATTRIBUTE)


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    try:
        return tensor.pin_memory()
    except (RuntimeError, NotImplementedError):
        # Pinned memory is limited on some systems, and quantized tensor types may not pin:
        # pageable copies are slower, not wrong.
        return tensor


def streamed(blocks: torch.nn.ModuleList) -> Iterable[torch.nn.Module]:
    """The blocks in order; under block offload each is on the GPU while the loop body runs."""
    stream = getattr(blocks, _STREAM_ATTRIBUTE, None)
    return blocks if stream is None else iter(stream)


def release_accelerator_memory() -> None:
    """Hand the GPU memory torch keeps cached back (after running out of it, say)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class CpuOffload:
    """A pipeline's offload: which grain, which GPU the models visit, and the transformer's
    block streams under "blocks"."""

    def __init__(self, mode: str, device: torch.device, transformer: torch.nn.Module):
        self.mode, self.device, self.transformer = mode, device, transformer
        self.streams = [BlockStream(getattr(transformer, name), device) for name in BLOCK_LISTS] if mode == "blocks" else []
        for stream in self.streams:
            stream.attach()

    def remove(self) -> None:
        """Stop streaming; every weight stays where it rests (the CPU)."""
        for stream in self.streams:
            stream.detach()
        self.streams = []

    def _visitors(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """What of `model` moves to the GPU for its stage: all of it, or under block offload all
        of the transformer but its blocks."""
        if self.mode == "blocks" and model is self.transformer:
            return [child for name, child in model.named_children() if name not in BLOCK_LISTS]
        return [model]

    @contextmanager
    def on_device(self, *models: torch.nn.Module):
        """Move `models` to the GPU for the `with` body and back to the CPU after."""
        visitors = [part for model in models for part in self._visitors(model)]
        for part in visitors:
            part.to(self.device)
        try:
            yield
        finally:
            for part in visitors:
                part.to("cpu")
            if self.device.type == "cuda":
                release_accelerator_memory()
