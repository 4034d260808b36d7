"""Fast RefAny3D sampling: the faithful pass's arithmetic with less work ("exact"), and an
approximation that skips most of the work ("cached").

`refany3d.transformer.joint_forward` is the reference: the branches as rows of one pass, each
adapter's delta masked to its branches' rows, a dense group mask, one guidance pass per call.
Exact mode computes the same function with less work:

- Row ranges. Rows are ordered [RGB target, point-map target, point-map views, RGB views], which
  makes the rows of each adapter ("coord": point-map target + views; "default": all views)
  contiguous, so an adapter's low-rank delta runs on those rows only.
- Branch kinds. The N views of one domain share their timestep, domain and adapters, hence their
  adaLN modulation: it is computed once per kind (5 kinds) and applied per row segment.
- Grouped attention. The group mask is applied by choosing keys, not by masking: text + RGB
  target attend to all keys, the point-map target to all but the text, and the N view pairs
  attend to [text, targets, own pair] in one batched call.
- Guidance passes in one forward. The image-guidance pass (black views, full attention) shares the
  rows of the conditional pass. Its N black views of a domain are identical tokens at identical
  positions, so they stay identical through every layer; one copy is kept, and its keys get
  log(N) added to their logits, which is the same softmax as N copies.

Cached mode (approximate, opt-in): the condition views are never noised, so after one full step
their per-layer keys and values are kept (per guidance pass) and later steps run only text and
the two targets. It is approximate because with the group mask the views attend to the targets,
which change every step; `cache_refresh_every=k` recomputes the views' keys/values with a full
step every k steps, trading speed for accuracy. `benchmarks/sampler.py` measures the drift (PSNR).

Prompt and view encodings are cached (LRU, keyed by content) across calls, in the pipeline's CachedEncoders.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from PIL import Image

from refany3d.conditions import pack_conditions, sample_latents, view_posterior
from refany3d.errors import InputError, require_whole_number
from refany3d.offload import streamed
from refany3d.transformer import (
    CONDITION_POINTMAP_ADAPTERS,
    CONDITION_RGB_ADAPTERS,
    POINTMAP_DOMAIN,
    RGB_DOMAIN,
    TARGET_POINTMAP_ADAPTERS,
    TARGET_RGB_ADAPTERS,
    Branch,
    branch_embeddings,
    lora_linear,
    split_heads,
)

MODES = ("exact", "cached")

# Branch kinds, in the row order of a guidance pass. All views of one domain form one kind.
TEXT, RGB_TARGET, POINTMAP_TARGET, POINTMAP_VIEWS, RGB_VIEWS = range(5)
KIND_ADAPTERS: tuple[tuple[str, ...], ...] = (
    (),
    TARGET_RGB_ADAPTERS,
    TARGET_POINTMAP_ADAPTERS,
    CONDITION_POINTMAP_ADAPTERS,
    CONDITION_RGB_ADAPTERS,
)
N_KINDS = len(KIND_ADAPTERS)
# Kind -> (its timestep is the step's (True) or the views' 0, its domain) for the kind embeddings.
_KIND_TIMES = ((True, None), (True, RGB_DOMAIN), (True, POINTMAP_DOMAIN), (False, POINTMAP_DOMAIN), (False, RGB_DOMAIN))
# lora_linear adds a branch's adapters in its tuple's order; keep that order for shared rows.
ADAPTER_ORDER = tuple(dict.fromkeys(name for kind in sorted(KIND_ADAPTERS, key=len, reverse=True) for name in kind))

Segment = tuple[int, int, int]  # (first row, end row, kind)
RowRanges = dict[str, list[tuple[int, int]]]  # adapter -> row ranges that use it


def adapter_ranges(segments: Sequence[Segment]) -> RowRanges:
    """Row ranges of each adapter, adjacent segments merged so each range is one low-rank matmul."""
    ranges: RowRanges = {}
    for name in ADAPTER_ORDER:
        runs: list[tuple[int, int]] = []
        for start, stop, kind in segments:
            if stop == start or name not in KIND_ADAPTERS[kind]:
                continue
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], stop)
            else:
                runs.append((start, stop))
        if runs:
            ranges[name] = runs
    return ranges


# The kind-embedding matrix has one row per kind; its modulation rows use the kind's adapters.
_KIND_RANGES = adapter_ranges([(kind, kind + 1, kind) for kind in range(N_KINDS)])


def segment_linear(layer: torch.nn.Module, x: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    """A (possibly peft-wrapped) linear layer over rows x (R, C_in): one base matmul for all rows,
    then each adapter's low-rank delta added to the rows in its ranges (as `lora_linear` would)."""
    base = getattr(layer, "base_layer", None)
    if base is None:
        return layer(x)
    out = base(x)
    for name, runs in ranges.items():
        if name not in layer.lora_A:
            continue
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        for start, stop in runs:
            rows = layer.lora_dropout[name](x[start:stop].to(lora_a.weight.dtype))
            out[start:stop] += (lora_b(lora_a(rows)) * layer.scaling[name]).to(out.dtype)
    return out


def _modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
    """In place: each segment's rows * (1 + scale[kind]) + shift[kind] (adaLN per branch kind)."""
    for start, stop, kind in segments:
        normed[start:stop].mul_(1 + scale[kind]).add_(shift[kind])
    return normed


def _gated_add(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor, segments: Sequence[Segment]) -> None:
    """In place: x += gate[kind] * update, per segment (the residual update of one sub-block)."""
    for start, stop, kind in segments:
        x[start:stop] += gate[kind] * update[start:stop]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention on (L, H, D) or (B, L, H, D) tensors."""
    single = q.dim() == 3
    if single:
        q, k, v = q[None], k[None], v[None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
    out = out.transpose(1, 2)
    return out[0] if single else out


def _stream_segments(joint_segments: Sequence[Segment], text: bool) -> tuple[Segment, ...]:
    """The text stream's (or image stream's) segments: the joint ones of that stream, packed from row 0."""
    segments, row = [], 0
    for start, stop, kind in joint_segments:
        if (kind == TEXT) == text:
            segments.append((row, row + stop - start, kind))
            row += stop - start
    return tuple(segments)


@dataclass(frozen=True)
class GuidancePass:
    """One guidance pass: its rows are [text, RGB target, point-map target, point-map views, RGB views]."""

    n_views: int  # view rows kept per domain (the unconditional pass keeps 1 of its N identical views)
    view_multiplicity: int  # how many identical views each kept view stands for
    group_mask: bool  # the release's group mask (conditional pass) or full attention


@dataclass(frozen=True)
class JointLayout:
    """Where every branch kind's rows sit, in the text stream, the image stream and the joint sequence.

    Joint order is pass by pass: [text, RGB target, point-map target, point-map views, RGB views].
    With `view_queries` False (cached steps) the view rows are absent; their keys come from a cache.
    """

    text_len: int
    target_len: int
    view_len: int
    n_views: int
    guided: bool
    view_queries: bool = True
    group_mask: bool = True  # False: the conditional pass attends fully (models trained --no-group-mask)
    # Derived row bookkeeping, computed once here: plain attributes (not cached_property, whose
    # lock torch.compile cannot trace) read by every layer.
    passes: tuple[GuidancePass, ...] = field(init=False)
    joint_segments: tuple[Segment, ...] = field(init=False)
    text_segments: tuple[Segment, ...] = field(init=False)
    image_segments: tuple[Segment, ...] = field(init=False)
    joint_ranges: RowRanges = field(init=False, compare=False)
    image_ranges: RowRanges = field(init=False, compare=False)
    pass_offsets: tuple[int, ...] = field(init=False)  # first joint row of each pass

    def __post_init__(self) -> None:
        cond = GuidancePass(self.n_views, 1, group_mask=self.group_mask)
        passes = (cond, GuidancePass(1, self.n_views, group_mask=False)) if self.guided else (cond,)
        joint, row = [], 0
        for p in passes:
            for kind, length in enumerate(self.part_lengths(p, self.view_queries)):
                joint.append((row, row + length, kind))
                row += length
        text, image = _stream_segments(joint, text=True), _stream_segments(joint, text=False)
        derived = dict(passes=passes, joint_segments=tuple(joint), text_segments=text, image_segments=image,
                       joint_ranges=adapter_ranges(joint), image_ranges=adapter_ranges(image),
                       pass_offsets=tuple(joint[N_KINDS * i + TEXT][0] for i in range(len(passes))))
        for name, value in derived.items():
            object.__setattr__(self, name, value)  # frozen: set once, here

    def part_lengths(self, p: GuidancePass, with_views: bool) -> tuple[int, ...]:
        views = p.n_views * self.view_len if with_views else 0
        return (self.text_len, self.target_len, self.target_len, views, views)

    def to_joint(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Interleave text-stream and image-stream rows into joint order."""
        parts, t_row, i_row = [], 0, 0
        for p in self.passes:
            lengths = self.part_lengths(p, self.view_queries)
            n_image = sum(lengths[1:])
            parts += [text[t_row : t_row + lengths[0]], image[i_row : i_row + n_image]]
            t_row, i_row = t_row + lengths[0], i_row + n_image
        return torch.cat(parts)

    def from_joint(self, joint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        text, image = [], []
        for offset, p in zip(self.pass_offsets, self.passes):
            lengths = self.part_lengths(p, self.view_queries)
            text.append(joint[offset : offset + lengths[0]])
            image.append(joint[offset + lengths[0] : offset + sum(lengths)])
        return torch.cat(text), torch.cat(image)


class ViewKeyCache:
    """Per-layer keys/values of the view rows of each guidance pass (cached mode)."""

    def __init__(self) -> None:
        self.layers: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        self.recording = True

    def next_layer(self, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.recording:
            self.layers.append([])
        return self.layers[index]


class FastDenoiser:
    """Predicts both targets' velocities for both guidance passes in one reorganised forward.

    Holds everything constant over a sampling run: embedded text rows, raw view rows, rotary
    tables, and (cached mode) the views' keys and values.
    """

    def __init__(
        self,
        transformer,
        domain_embedder: torch.nn.Module | None,
        text: torch.Tensor,
        pooled: torch.Tensor,
        target_ids: torch.Tensor,
        views: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        uncond_views: tuple[torch.Tensor, torch.Tensor] | None,
        guidance: torch.Tensor | None,
        mode: str = "exact",
        compile: bool = False,
        cache_refresh_every: int = 0,
        group_mask: bool = True,
    ):
        """views: (rgb tokens (N, L, C), point-map tokens (N, L, C), position ids (L, 3));
        uncond_views: the black view's (rgb, point-map) tokens (1, L, C), or None without image guidance.
        cache_refresh_every: cached mode runs a full step (and re-records the views' keys/values)
        every this many steps; 0 records them only at the first step. group_mask: False for full
        attention in the conditional pass too (models trained without the group mask)."""
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        require_whole_number("cache_refresh_every", cache_refresh_every)
        self.transformer, self.domain_embedder, self.mode = transformer, domain_embedder, mode
        self.cache_refresh_every, self.steps_done = cache_refresh_every, 0
        self.pooled, self.guidance, self.target_ids = pooled, guidance, target_ids
        dtype = transformer.dtype
        rgb, pm, self.view_ids = views
        self.n_views = rgb.shape[0]
        self.full = JointLayout(text.shape[1], target_ids.shape[0], rgb.shape[1], self.n_views, uncond_views is not None,
                                group_mask=group_mask)
        self.targets_only = dataclasses.replace(self.full, view_queries=False)
        self.text_rows = transformer.context_embedder(text[0].to(dtype))
        # Raw (not yet embedded) view rows of each pass, in row order [point-map views, RGB views].
        self.view_rows = [torch.cat([pm.flatten(0, 1), rgb.flatten(0, 1)]).to(dtype)]
        if uncond_views is not None:
            self.view_rows.append(torch.cat([uncond_views[1][0], uncond_views[0][0]]).to(dtype))
        self.rotary = {layout: self._rotary(layout) for layout in (self.full, self.targets_only)}
        self.kv_cache: ViewKeyCache | None = None
        self.double_block = torch.compile(_double_block, dynamic=False) if compile else _double_block
        self.single_block = torch.compile(_single_block, dynamic=False) if compile else _single_block

    def _rotary(self, layout: JointLayout) -> tuple[torch.Tensor, torch.Tensor]:
        text_ids = torch.zeros(layout.text_len, 3, dtype=self.target_ids.dtype, device=self.target_ids.device)
        ids = []
        for p in layout.passes:
            n = p.n_views if layout.view_queries else 0
            ids += [text_ids, self.target_ids, self.target_ids] + [self.view_ids] * (2 * n)
        return self.transformer.pos_embed(torch.cat(ids))

    def kind_embeddings(self, t: torch.Tensor) -> torch.Tensor:
        """(5, C): each kind's time/guidance/text embedding plus its domain offset."""
        zero = torch.zeros_like(t)
        one = torch.ones_like(self.guidance) if self.guidance is not None else None
        empty = t.new_zeros(0)
        branches = [
            Branch(empty, empty, t if is_step else zero, self.guidance if is_step else one, self.pooled, domain=domain)
            for is_step, domain in _KIND_TIMES
        ]
        return branch_embeddings(self.transformer, self.domain_embedder, branches)[0]

    @torch.no_grad()
    def predict(self, targets: Sequence[torch.Tensor], t: torch.Tensor) -> list[list[torch.Tensor]]:
        """targets: packed RGB and point-map latents (1, L, C); t: (1,) time in [0, 1].
        Returns per guidance pass (conditional first) the [RGB, point-map] predictions (1, L, C)."""
        transformer, dtype = self.transformer, self.transformer.dtype
        refresh = self.kv_cache is None or (self.cache_refresh_every > 0 and self.steps_done % self.cache_refresh_every == 0)
        use_cache = self.mode == "cached" and not refresh
        if self.mode == "cached" and refresh:
            self.kv_cache = ViewKeyCache()
        elif use_cache:
            self.kv_cache.recording = False
        self.steps_done += 1
        layout = self.targets_only if use_cache else self.full
        target_rows = [x[0].to(dtype) for x in targets]
        raw = []
        for view_rows in self.view_rows:
            raw += target_rows + ([] if use_cache else [view_rows])
        image = segment_linear(transformer.x_embedder, torch.cat(raw), layout.image_ranges)
        text = torch.cat([self.text_rows] * len(layout.passes))
        embs = self.kind_embeddings(t.to(dtype))
        rotary, cache = self.rotary[layout], self.kv_cache
        layer = 0
        for block in streamed(transformer.transformer_blocks):
            text, image = self.double_block(block, text, image, layout, embs, rotary, cache and cache.next_layer(layer))
            layer += 1
        joint = layout.to_joint(text, image)
        for block in streamed(transformer.single_transformer_blocks):
            joint = self.single_block(block, joint, layout, embs, rotary, cache and cache.next_layer(layer))
            layer += 1
        return [
            [
                lora_linear(
                    transformer.proj_out,
                    transformer.norm_out(joint[None, start:stop], embs[kind : kind + 1]),
                    dict.fromkeys(KIND_ADAPTERS[kind]),
                )
                for start, stop, kind in layout.joint_segments[N_KINDS * i + RGB_TARGET : N_KINDS * i + POINTMAP_TARGET + 1]
            ]
            for i in range(len(layout.passes))
        ]


def _rope(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return apply_rotary_emb(x[None], rotary, sequence_dim=1)[0]


def _grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: JointLayout,
    cache: list[tuple[torch.Tensor, torch.Tensor]] | None,
) -> torch.Tensor:
    """Attention of joint rows (L, H, D) under the group mask (conditional pass) and full attention
    (unconditional pass), each pass attending only within itself; view keys from `cache` when the
    layout has no view rows, recorded into it when it is empty (first cached step)."""
    out = torch.empty_like(q)
    text_len, target_len, view_len = layout.text_len, layout.target_len, layout.view_len
    head = text_len + target_len  # text + RGB target: attend to every key of their pass
    fixed = text_len + 2 * target_len  # rows before the views
    for i, (p, offset) in enumerate(zip(layout.passes, layout.pass_offsets)):
        length = sum(layout.part_lengths(p, layout.view_queries))
        qp, kp, vp = q[offset : offset + length], k[offset : offset + length], v[offset : offset + length]
        if not layout.view_queries:
            view_k, view_v = cache[i]
            kp, vp = torch.cat([kp, view_k]), torch.cat([vp, view_v])
        elif cache is not None:
            cache.append((kp[fixed:].clone(), vp[fixed:].clone()))
        if not p.group_mask:
            bias = None
            if p.view_multiplicity > 1:
                bias = torch.zeros(1, kp.shape[0], dtype=q.dtype, device=q.device)
                bias[:, fixed:] = math.log(p.view_multiplicity)
            out[offset : offset + length] = _sdpa(qp, kp, vp, bias)
            continue
        out[offset : offset + head] = _sdpa(qp[:head], kp, vp)
        out[offset + head : offset + fixed] = _sdpa(qp[head:fixed], kp[text_len:], vp[text_len:])
        if layout.view_queries:
            n, span = p.n_views, p.n_views * view_len

            def pairs(x: torch.Tensor) -> torch.Tensor:  # (n, 2 * view_len, H, D): [RGB view k, point-map view k]
                pm, rgb = x[fixed : fixed + span], x[fixed + span : fixed + 2 * span]
                return torch.cat([rgb.unflatten(0, (n, view_len)), pm.unflatten(0, (n, view_len))], dim=1)

            def keys(x: torch.Tensor) -> torch.Tensor:  # shared [text, targets] + own pair
                return torch.cat([x[None, :fixed].expand(n, -1, -1, -1), pairs(x)], dim=1)

            o = _sdpa(pairs(qp), keys(kp), keys(vp))
            out[offset + fixed : offset + fixed + span] = o[:, view_len:].flatten(0, 1)
            out[offset + fixed + span : offset + fixed + 2 * span] = o[:, :view_len].flatten(0, 1)
    return out


def _double_block(block, text, image, layout: JointLayout, embs, rotary, cache):
    """A FLUX double-stream block over all rows: text with the *_context / add_* modules."""
    attn, d = block.attn, block.attn.head_dim
    image_mod = segment_linear(block.norm1.linear, block.norm1.silu(embs), _KIND_RANGES)
    text_mod = block.norm1_context.linear(block.norm1_context.silu(embs[:1]))
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = image_mod.chunk(6, dim=1)
    t_shift, t_scale, t_gate, t_shift_mlp, t_scale_mlp, t_gate_mlp = text_mod.chunk(6, dim=1)

    h = _modulate(block.norm1.norm(image), shift, scale, layout.image_segments)
    ht = _modulate(block.norm1_context.norm(text), t_shift, t_scale, layout.text_segments)
    ranges = layout.image_ranges
    q = layout.to_joint(
        attn.norm_added_q(split_heads(attn.add_q_proj(ht), d)), attn.norm_q(split_heads(segment_linear(attn.to_q, h, ranges), d))
    )
    k = layout.to_joint(
        attn.norm_added_k(split_heads(attn.add_k_proj(ht), d)), attn.norm_k(split_heads(segment_linear(attn.to_k, h, ranges), d))
    )
    v = layout.to_joint(split_heads(attn.add_v_proj(ht), d), split_heads(segment_linear(attn.to_v, h, ranges), d))
    attended = _grouped_attention(_rope(q, rotary), _rope(k, rotary), v, layout, cache).flatten(1, 2)
    a_text, a_image = layout.from_joint(attended)

    _gated_add(image, attn.to_out[1](segment_linear(attn.to_out[0], a_image, ranges)), gate, layout.image_segments)
    h = _modulate(block.norm2(image), shift_mlp, scale_mlp, layout.image_segments)
    _gated_add(image, segment_linear(block.ff.net[2], block.ff.net[1](block.ff.net[0](h)), ranges), gate_mlp, layout.image_segments)

    _gated_add(text, attn.to_add_out(a_text), t_gate, layout.text_segments)
    ht = _modulate(block.norm2_context(text), t_shift_mlp, t_scale_mlp, layout.text_segments)
    ff = block.ff_context
    _gated_add(text, segment_linear(ff.net[2], ff.net[1](ff.net[0](ht)), {}), t_gate_mlp, layout.text_segments)
    return text, image


def _single_block(block, x, layout: JointLayout, embs, rotary, cache):
    """A FLUX single-stream block over all joint rows, each kind with its own adapters."""
    attn, d, ranges = block.attn, block.attn.head_dim, layout.joint_ranges
    shift, scale, gate = segment_linear(block.norm.linear, block.norm.silu(embs), _KIND_RANGES).chunk(3, dim=1)
    h = _modulate(block.norm.norm(x), shift, scale, layout.joint_segments)
    mlp = block.act_mlp(segment_linear(block.proj_mlp, h, ranges))
    q = attn.norm_q(split_heads(segment_linear(attn.to_q, h, ranges), d))
    k = attn.norm_k(split_heads(segment_linear(attn.to_k, h, ranges), d))
    v = split_heads(segment_linear(attn.to_v, h, ranges), d)
    attended = _grouped_attention(_rope(q, rotary), _rope(k, rotary), v, layout, cache).flatten(1, 2)
    _gated_add(x, segment_linear(block.proj_out, torch.cat([attended, mlp], dim=1), ranges), gate, layout.joint_segments)
    return x


class _LRU(OrderedDict):
    """A small least-recently-used cache; safe to share between the app's generation threads
    (a value may be computed twice by a race, never lost or half-stored)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self._lock = threading.Lock()

    def get_or_compute(self, key, compute: Callable):
        with self._lock:
            if key in self:
                self.move_to_end(key)
                return self[key]
        value = compute()
        with self._lock:
            self[key] = value
            while len(self) > self.size:
                self.popitem(last=False)
        return value


def _image_key(image: Image.Image, size: int) -> tuple:
    return (hashlib.sha1(image.tobytes()).hexdigest(), image.size, image.mode, size)


class CachedEncoders:
    """The encoders of the fast modes: like the pipeline's, but prompt encodings and the views'
    VAE posteriors are reused across calls (LRU, keyed by prompt text / image content); posterior
    samples are still drawn from each call's generator. `compile=True` runs the transformer
    blocks through torch.compile."""

    def __init__(self, pipe, prompt_cache_size: int = 16, view_cache_size: int = 64, compile: bool = False):
        self.pipe = pipe
        self.compile = compile
        self.prompt_cache = _LRU(prompt_cache_size)
        self.view_cache = _LRU(view_cache_size)

    def clear_caches(self) -> None:
        """Forget cached encodings (needed after changing the text encoders' or VAE's weights)."""
        self.prompt_cache.clear()
        self.view_cache.clear()

    def encode_prompt(self, prompt: str, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (prompt, max_sequence_length, str(self.pipe.device), str(self.pipe.dtype))  # pipe.to() changes both
        return self.prompt_cache.get_or_compute(key, lambda: self.pipe.encode_prompt(prompt, max_sequence_length))

    def posterior(self, image: Image.Image, size: int):
        """The VAE's posterior of one view (the deterministic, expensive part of encoding), cached."""
        flux = self.pipe.flux
        key = _image_key(image, size) + (str(flux.vae.device), str(flux.vae.dtype))
        return self.view_cache.get_or_compute(
            key, lambda: view_posterior(flux.vae, flux.image_processor, image, size)
        )

    def encode_views(
        self, images: Sequence[Image.Image], size: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed condition tokens (N, L, C) and ids, as `conditions.condition_tokens` makes them:
        one view at a time, each posterior sample drawn from `generator` in the same order."""
        vae = self.pipe.flux.vae
        return pack_conditions(torch.cat([sample_latents(vae, self.posterior(img, size), generator) for img in images]))


def cached_encoders(pipe) -> CachedEncoders:
    """The pipeline's CachedEncoders, created on first use so its caches live as long as the pipeline."""
    encoders = getattr(pipe, "_cached_encoders", None)
    if encoders is None:
        encoders = pipe._cached_encoders = CachedEncoders(pipe)
    return encoders
