"""The joint multi-branch pass of RefAny3D over diffusers' FluxTransformer2DModel modules.

FLUX runs one text stream and one image stream. RefAny3D runs several image streams ("branches")
through the same weights in one pass: the RGB target, the point-map target, N RGB reference views
and N point-map reference views. Branches differ only in
  - which LoRA adapters their linear layers use (`Branch.adapters`),
  - their timestep/guidance embedding, plus a learned domain offset (`Branch.domain`),
  - their rotary position ids,
and a group attention mask decides which branch's queries see which branch's keys.

This module is the reference pass, used for training and by the faithful sampler. It never changes
the model and keeps every branch's arithmetic, but lays the branches out as rows of one tensor so
each layer runs once for all of them (the per-branch walk launched ~8000 kernels per training
step, which left a GPU idle): every linear layer is one matmul plus, per adapter, a low-rank delta
masked to the rows of the branches that use it, and the branches' adaLN modulations are computed in
one matmul and broadcast onto their rows. It is autograd-safe (no in-place updates) and traces in
one graph for torch.compile. `refany3d.fast` goes further for sampling.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from refany3d.errors import InputError
from refany3d.offload import streamed

RGB_DOMAIN, POINTMAP_DOMAIN = 0, 1
AdapterRows = Mapping[str, torch.Tensor | None]  # adapter -> (R, 1) 0/1 row mask, or None: every row


@dataclass
class Branch:
    """One stream of tokens in the joint pass."""

    hidden: torch.Tensor  # (B, L, C): packed latents, or T5 embeddings for the text branch
    ids: torch.Tensor  # (L, 3) rotary position ids
    timestep: torch.Tensor  # (B,) flow-matching time in [0, 1]
    guidance: torch.Tensor | None  # (B,) guidance scale, for guidance-distilled models
    pooled: torch.Tensor  # (B, P) pooled CLIP embedding
    adapters: tuple[str, ...] = ()  # LoRA adapters active on this branch's linear layers
    domain: int | None = None  # domain-embedder index (RGB_DOMAIN / POINTMAP_DOMAIN); None: no offset
    is_text: bool = False


def lora_linear(layer: torch.nn.Module, x: torch.Tensor, adapters: AdapterRows) -> torch.Tensor:
    """Apply a (possibly peft-wrapped) linear layer over rows x (..., R, C) with exactly the given
    LoRA adapters, each on the rows its mask selects (`dict.fromkeys(names)`: on every row).

    peft's own forward uses the globally active adapters; branches need different sets within one
    pass, so the base layer runs once and each adapter's low-rank delta is added explicitly. The
    mask multiplies the rank-r activations, so rows outside it get exactly nothing.
    """
    base = getattr(layer, "base_layer", None)
    if base is None:
        return layer(x)
    out = base(x)
    for name, rows in adapters.items():
        if name not in layer.lora_A:
            continue
        lora_a = layer.lora_A[name]
        low = lora_a(layer.lora_dropout[name](x.to(lora_a.weight.dtype)))
        # scale (and mask) the rank-r activations rather than the full-width delta: same product, less work
        scale = layer.scaling[name] if rows is None else rows.to(low.dtype) * layer.scaling[name]
        out = out + layer.lora_B[name](low * scale).to(out.dtype)
    return out


def group_attention_mask(lengths: list[int], allowed: torch.Tensor) -> torch.Tensor:
    """Expand a (branches x branches) bool matrix, query -> key, to a token-level bool mask.

    The branch index of every token is built from the Python lengths (not repeat_interleave on a
    tensor), so its shape is static and torch.compile traces the training step in one graph."""
    index = torch.tensor([branch for branch, length in enumerate(lengths) for _ in range(length)], device=allowed.device)
    return allowed[index][:, index]


class AttentionRecorder(TorchFunctionMode):
    """Within `with AttentionRecorder() as rec:`, keeps the attention probabilities of every
    `scaled_dot_product_attention` call (one per block of `joint_forward`), averaged over heads, in
    `rec.maps` as (B, queries, keys): what probes of a trained model read to see which branches it
    looks at. Analysis only; it computes every softmax a second time."""

    def __init__(self) -> None:
        super().__init__()
        self.maps: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            scale = kwargs.get("scale") or q.shape[-1] ** -0.5
            logits = (q @ k.transpose(-1, -2)).float() * scale
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
            self.maps.append(logits.softmax(-1).mean(1).detach())
        return func(*args, **kwargs)


def branch_attention(maps: list[torch.Tensor], lengths: list[int]) -> torch.Tensor:
    """(calls, branches, branches): the share of a query branch's attention (averaged over its
    tokens and the batch) that goes to each key branch; rows sum to 1. `lengths` are the branches'
    token counts in `joint_forward`'s order (text first), e.g. from `[b.hidden.shape[1] for b in branches]`."""
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    spans = list(zip(bounds[:-1], bounds[1:]))
    return torch.stack([
        torch.stack([torch.stack([m[:, q0:q1, k0:k1].sum(-1).mean() for k0, k1 in spans]) for q0, q1 in spans])
        for m in maps
    ])


# LoRA adapters of each branch kind, as the release trained them.
TARGET_RGB_ADAPTERS: tuple[str, ...] = ()
TARGET_POINTMAP_ADAPTERS = ("coord",)
CONDITION_RGB_ADAPTERS = ("default",)
CONDITION_POINTMAP_ADAPTERS = ("default", "coord")


def refany3d_branches(
    text: torch.Tensor,
    pooled: torch.Tensor,
    targets: list[torch.Tensor],
    target_ids: torch.Tensor,
    rgb_views: list[torch.Tensor],
    pointmap_views: list[torch.Tensor],
    view_ids: torch.Tensor,
    t: torch.Tensor,
    guidance: torch.Tensor | None,
) -> list[Branch]:
    """RefAny3D's branches [text, RGB target, point-map target, N RGB views, N point-map views].

    Targets sit at time t with the given guidance; views are clean (time 0, guidance 1). Views are
    lists of (B, L, C) tokens; sampling and training build the same layout with this. Given one
    target and no point-map views, it builds the no-point-map ablation [text, RGB target, N RGB views].
    """
    if len(targets) != (2 if pointmap_views else 1):
        raise InputError("give two targets with point-map views, one target (RGB) without them")
    zero = torch.zeros_like(t)
    one = torch.ones_like(guidance) if guidance is not None else None
    text_ids = torch.zeros(text.shape[1], 3, device=text.device, dtype=target_ids.dtype)
    kinds = ((TARGET_RGB_ADAPTERS, RGB_DOMAIN), (TARGET_POINTMAP_ADAPTERS, POINTMAP_DOMAIN))
    return [
        Branch(text, text_ids, t, guidance, pooled, is_text=True),
        *[Branch(x, target_ids, t, guidance, pooled, adapters, domain) for x, (adapters, domain) in zip(targets, kinds)],
        *[Branch(v, view_ids, zero, one, pooled, CONDITION_RGB_ADAPTERS, RGB_DOMAIN) for v in rgb_views],
        *[Branch(v, view_ids, zero, one, pooled, CONDITION_POINTMAP_ADAPTERS, POINTMAP_DOMAIN) for v in pointmap_views],
    ]


def refany3d_group_mask(n_views: int, pointmap_branch: bool = True) -> torch.Tensor:
    """The release's group mask for branches [text, rgb target, point-map target, N rgb, N point map].

    Targets and text see everything, except that the point-map target does not see the text; each
    reference view sees the text, both targets, itself and its partner view of the other domain.
    pointmap_branch=False: the same rule for the ablation's branches [text, rgb target, N rgb].
    """
    targets = 2 if pointmap_branch else 1
    heads = 1 + targets  # text and targets: the branches every view sees
    n = heads + targets * n_views
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[:heads, :] = True
    if pointmap_branch:
        allowed[2, 0] = False
    for k in range(n_views):
        group = [heads + k + j * n_views for j in range(targets)]  # view k of each domain
        for row in group:
            allowed[row, :heads] = True
            allowed[row, group] = True
    return allowed


class Run(NamedTuple):
    """Neighbouring branches of equal length, whose rows can be viewed as (B, count, length, C)."""

    row: int  # first row
    first: int  # first branch
    count: int  # branches
    length: int  # tokens of each


@dataclass(frozen=True)
class RowLayout:
    """Which branch, and which adapters, each row of the joint pass belongs to.

    Rows are the branches' tokens concatenated in branch order, text first. The image stream of
    the double blocks is the rows after the text; single blocks run on all of them. Neighbouring
    branches of equal length form a run, whose rows are viewed as (B, branches, tokens, C) so
    per-branch adaLN parameters broadcast onto them (no per-row copies, no scatter in backward).
    """

    runs: tuple[Run, ...]
    branch_adapters: dict[str, torch.Tensor]  # adapter -> (branches, 1) mask: for the modulation rows
    row_adapters: dict[str, torch.Tensor]  # adapter -> (R, 1) mask

    @classmethod
    def of(cls, branches: list[Branch], device: torch.device) -> RowLayout:
        lengths = [br.hidden.shape[1] for br in branches]
        names = dict.fromkeys(name for br in branches for name in br.adapters)

        def mask(repeats: list[int]) -> dict[str, torch.Tensor]:
            return {
                name: torch.tensor(
                    [float(name in br.adapters) for br, n in zip(branches, repeats) for _ in range(n)], device=device
                )[:, None]
                for name in names
            }

        runs: list[Run] = []
        row = 0
        for index, (br, length) in enumerate(zip(branches, lengths)):
            last = runs[-1] if runs else None
            if last and last.length == length and branches[last.first].is_text == br.is_text:
                runs[-1] = last._replace(count=last.count + 1)
            else:
                runs.append(Run(row, index, 1, length))
            row += length
        return cls(tuple(runs), mask([1] * len(branches)), mask(lengths))

    def streams(self) -> tuple[RowLayout, RowLayout]:
        """The layouts of the double blocks' two streams: the text branch, and the image branches after it."""
        text_run, *rest = self.runs
        text_len = text_run.length
        text = RowLayout((Run(0, 0, 1, text_len),), {}, {})
        runs = tuple(Run(r.row - text_len, r.first - 1, r.count, r.length) for r in rest)
        image = RowLayout(runs, {name: m[1:] for name, m in self.branch_adapters.items()},
                          {name: m[text_len:] for name, m in self.row_adapters.items()})
        return text, image

    def modulation(self, norm: torch.nn.Module, embs: torch.Tensor, chunks: int) -> list[torch.Tensor]:
        """adaLN parameters (B, branches, C) of each branch (linear(silu(emb)) with the branch's
        adapters), split into shift/scale/gate chunks."""
        return list(lora_linear(norm.linear, norm.silu(embs), self.branch_adapters).chunk(chunks, dim=-1))

    def branch_rows(self, branch: int) -> slice:
        """The rows of one branch."""
        run = next(r for r in self.runs if r.first <= branch < r.first + r.count)
        start = run.row + (branch - run.first) * run.length
        return slice(start, start + run.length)

    def _each_run(self, x: torch.Tensor) -> list[tuple[torch.Tensor, slice]]:
        return [(x[:, r.row : r.row + r.count * r.length].unflatten(1, (r.count, r.length)), slice(r.first, r.first + r.count))
                for r in self.runs]

    def modulate(self, x: torch.Tensor, layer_norm: torch.nn.Module, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """layer_norm(x) * (1 + scale) + shift, each branch's rows with its own parameters."""
        runs = self._each_run(layer_norm(x))
        return _cat_rows([(r * (1 + scale[:, b, None]) + shift[:, b, None]).flatten(1, 2) for r, b in runs])

    def gated(self, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """gate * update, each branch's rows with its own gate (a residual branch's contribution)."""
        return _cat_rows([(gate[:, b, None] * r).flatten(1, 2) for r, b in self._each_run(update)])


def _cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))


def _attention(q, k, v, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
    """Attention over all rows (B, L, H, D) -> (B, L, H*D), under the token-level mask."""
    q = apply_rotary_emb(q, rotary, sequence_dim=1)
    k = apply_rotary_emb(k, rotary, sequence_dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2, 3).to(q.dtype)


def _double_block(block, text, image, embs: torch.Tensor, text_rows: RowLayout, image_rows: RowLayout, rotary, mask):
    """A FLUX double-stream block: text rows use the *_context / add_* modules, image rows the others."""
    attn, d = block.attn, block.attn.head_dim
    t_shift, t_scale, t_gate, t_shift_mlp, t_scale_mlp, t_gate_mlp = text_rows.modulation(block.norm1_context, embs[:, :1], 6)
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = image_rows.modulation(block.norm1, embs[:, 1:], 6)

    ht = text_rows.modulate(text, block.norm1_context.norm, t_shift, t_scale)
    h = image_rows.modulate(image, block.norm1.norm, shift, scale)
    adapters = image_rows.row_adapters
    q = torch.cat([attn.norm_added_q(split_heads(attn.add_q_proj(ht), d)),
                   attn.norm_q(split_heads(lora_linear(attn.to_q, h, adapters), d))], dim=1)
    k = torch.cat([attn.norm_added_k(split_heads(attn.add_k_proj(ht), d)),
                   attn.norm_k(split_heads(lora_linear(attn.to_k, h, adapters), d))], dim=1)
    v = torch.cat([split_heads(attn.add_v_proj(ht), d), split_heads(lora_linear(attn.to_v, h, adapters), d)], dim=1)
    attended = _attention(q, k, v, rotary, mask)
    a_text, a_image = attended[:, : text.shape[1]], attended[:, text.shape[1] :]

    image = image + image_rows.gated(gate, attn.to_out[1](lora_linear(attn.to_out[0], a_image, adapters)))
    h = image_rows.modulate(image, block.norm2, shift_mlp, scale_mlp)
    image = image + image_rows.gated(gate_mlp, lora_linear(block.ff.net[2], block.ff.net[1](block.ff.net[0](h)), adapters))

    text = text + text_rows.gated(t_gate, attn.to_add_out(a_text))
    ht = text_rows.modulate(text, block.norm2_context, t_shift_mlp, t_scale_mlp)
    ff = block.ff_context
    text = text + text_rows.gated(t_gate_mlp, lora_linear(ff.net[2], ff.net[1](ff.net[0](ht)), {}))
    return text, image


def _single_block(block, x, embs: torch.Tensor, rows: RowLayout, rotary, mask):
    """A FLUX single-stream block: all rows use the same modules, each branch with its own adapters."""
    attn, d, adapters = block.attn, block.attn.head_dim, rows.row_adapters
    shift, scale, gate = rows.modulation(block.norm, embs, 3)
    h = rows.modulate(x, block.norm.norm, shift, scale)
    mlp = block.act_mlp(lora_linear(block.proj_mlp, h, adapters))
    q = attn.norm_q(split_heads(lora_linear(attn.to_q, h, adapters), d))
    k = attn.norm_k(split_heads(lora_linear(attn.to_k, h, adapters), d))
    v = split_heads(lora_linear(attn.to_v, h, adapters), d)
    attended = _attention(q, k, v, rotary, mask)
    return x + rows.gated(gate, lora_linear(block.proj_out, torch.cat([attended, mlp], dim=2), adapters))


def _called(fn, *args):
    return fn(*args)


def _recomputed(fn, *args):
    """fn(*args), keeping only its inputs for backward, where it runs again (with the same RNG state)."""
    return checkpoint(fn, *args, use_reentrant=False)


def branch_embeddings(transformer, domain_embedder: torch.nn.Module | None, branches: list[Branch]) -> torch.Tensor:
    """(B, branches, C): each branch's FLUX time/guidance/text embedding plus its domain offset,
    computed for all branches in one call."""
    dtype = transformer.dtype
    t = torch.cat([br.timestep for br in branches]).to(dtype) * 1000
    pooled = torch.cat([br.pooled for br in branches])
    if transformer.config.guidance_embeds:
        if any(br.guidance is None for br in branches):
            raise InputError("this transformer is guidance-distilled: every branch needs a guidance value")
        guidance = torch.cat([br.guidance for br in branches]).to(dtype) * 1000
        emb = transformer.time_text_embed(t, guidance, pooled)
    else:
        emb = transformer.time_text_embed(t, pooled)
    emb = emb.unflatten(0, (len(branches), -1)).transpose(0, 1)
    if domain_embedder is not None and any(br.domain is not None for br in branches):
        index = torch.tensor([br.domain or 0 for br in branches], device=emb.device)
        present = torch.tensor([[float(br.domain is not None)] for br in branches], device=emb.device)
        emb = emb + (domain_embedder(index) * present).to(emb.dtype)
    return emb


def joint_forward(
    transformer,
    branches: list[Branch],
    domain_embedder: torch.nn.Module | None = None,
    group_mask: torch.Tensor | None = None,
    outputs: tuple[int, ...] = (1, 2),
    checkpoint_blocks: bool = False,
) -> list[torch.Tensor]:
    """Run all branches (the text branch first) through the transformer at once; return the
    predictions of `outputs`.

    `group_mask` is a (branches x branches) bool matrix, query -> key (None: full attention).
    `checkpoint_blocks` (training): keep only each block's inputs for the backward pass and run the
    block again there (gradient checkpointing). The gradients are the same; the activations kept
    shrink from every intermediate of every block to one hidden state per block, which is what
    lets stage 1 run on FLUX.1-dev (57 blocks over ~19k tokens) at all.
    """
    if not branches[0].is_text or any(br.is_text for br in branches[1:]):
        raise InputError("joint_forward takes exactly one text branch, first")
    dtype, device = transformer.dtype, branches[0].hidden.device
    rows = RowLayout.of(branches, device)
    text_rows, image_rows = rows.streams()
    text = transformer.context_embedder(branches[0].hidden.to(dtype))
    image = lora_linear(
        transformer.x_embedder, torch.cat([br.hidden.to(dtype) for br in branches[1:]], dim=1), image_rows.row_adapters
    )
    embs = branch_embeddings(transformer, domain_embedder, branches)
    rotary = transformer.pos_embed(torch.cat([br.ids for br in branches], dim=0))
    mask = None
    if group_mask is not None:
        mask = group_attention_mask([br.hidden.shape[1] for br in branches], group_mask.to(device))

    run = _recomputed if checkpoint_blocks and torch.is_grad_enabled() else _called
    for block in streamed(transformer.transformer_blocks):
        text, image = run(_double_block, block, text, image, embs, text_rows, image_rows, rotary, mask)
    hidden = torch.cat([text, image], dim=1)
    for block in streamed(transformer.single_transformer_blocks):
        hidden = run(_single_block, block, hidden, embs, rows, rotary, mask)

    return [
        lora_linear(
            transformer.proj_out,
            transformer.norm_out(hidden[:, rows.branch_rows(i)], embs[:, i]),
            dict.fromkeys(branches[i].adapters),
        )
        for i in outputs
    ]
