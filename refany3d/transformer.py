"""The joint multi-branch pass of RefAny3D over diffusers' FluxTransformer2DModel modules.

FLUX runs one text stream and one image stream. RefAny3D runs several image streams ("branches")
through the same weights in one pass: the RGB target, the point-map target, N RGB reference views
and N point-map reference views. Branches differ only in
  - which LoRA adapters their linear layers use (`Branch.adapters`),
  - their timestep/guidance embedding, plus a learned domain offset (`Branch.domain`),
  - their rotary position ids,
and a group attention mask decides which branch's queries see which branch's keys.

This module is the faithful reference: it walks the modules of the diffusers model branch by
branch, in the clearest order, and never changes the model. Faster paths are checked against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

RGB_DOMAIN, POINTMAP_DOMAIN = 0, 1


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


def lora_linear(layer: torch.nn.Module, x: torch.Tensor, adapters: tuple[str, ...]) -> torch.Tensor:
    """Apply a (possibly peft-wrapped) linear layer with exactly the given LoRA adapters.

    peft's own forward uses the globally active adapters; branches need different sets within one
    pass, so the base layer and each adapter's low-rank delta are applied here explicitly.
    """
    base = getattr(layer, "base_layer", None)
    if base is None:
        return layer(x)
    out = base(x)
    for name in adapters:
        if name not in layer.lora_A:
            continue
        lora_a = layer.lora_A[name]
        delta = layer.lora_B[name](lora_a(layer.lora_dropout[name](x.to(lora_a.weight.dtype))))
        out = out + (delta * layer.scaling[name]).to(out.dtype)
    return out


def group_attention_mask(lengths: list[int], allowed: torch.Tensor) -> torch.Tensor:
    """Expand a (branches x branches) bool matrix, query -> key, to a token-level bool mask.

    The branch index of every token is built from the Python lengths (not repeat_interleave on a
    tensor), so its shape is static and torch.compile traces the training step in one graph."""
    index = torch.tensor([branch for branch, length in enumerate(lengths) for _ in range(length)], device=allowed.device)
    return allowed[index][:, index]


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
    lists of (B, L, C) tokens; sampling and training build the same layout with this.
    """
    zero = torch.zeros_like(t)
    one = torch.ones_like(guidance) if guidance is not None else None
    text_ids = torch.zeros(text.shape[1], 3, device=text.device, dtype=target_ids.dtype)
    return [
        Branch(text, text_ids, t, guidance, pooled, is_text=True),
        Branch(targets[0], target_ids, t, guidance, pooled, TARGET_RGB_ADAPTERS, RGB_DOMAIN),
        Branch(targets[1], target_ids, t, guidance, pooled, TARGET_POINTMAP_ADAPTERS, POINTMAP_DOMAIN),
        *[Branch(v, view_ids, zero, one, pooled, CONDITION_RGB_ADAPTERS, RGB_DOMAIN) for v in rgb_views],
        *[Branch(v, view_ids, zero, one, pooled, CONDITION_POINTMAP_ADAPTERS, POINTMAP_DOMAIN) for v in pointmap_views],
    ]


def refany3d_group_mask(n_views: int) -> torch.Tensor:
    """The release's group mask for branches [text, rgb target, point-map target, N rgb, N point map].

    Targets and text see everything, except that the point-map target does not see the text; each
    reference view sees the text, both targets, itself and its partner view of the other domain.
    """
    n = 3 + 2 * n_views
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[:3, :] = True
    allowed[2, 0] = False
    for k in range(n_views):
        rgb, pm = 3 + k, 3 + n_views + k
        for row in (rgb, pm):
            allowed[row, :3] = True
            allowed[row, rgb] = True
            allowed[row, pm] = True
    return allowed


def _modulation(norm: torch.nn.Module, emb: torch.Tensor, adapters: tuple[str, ...]) -> list[torch.Tensor]:
    """adaLN parameters of one branch: linear(silu(temb)) split into shift/scale/gate chunks."""
    params = lora_linear(norm.linear, norm.silu(emb), adapters)
    return list(params.chunk(params.shape[1] // emb.shape[1], dim=1))


def _modulate(x: torch.Tensor, layer_norm: torch.nn.Module, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))


def _joint_attention(
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    rotary: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
) -> list[torch.Tensor]:
    """Attention over the concatenation of all branches; returns each branch's output (B, L, H*D)."""
    lengths = [q.shape[1] for q in queries]
    q = apply_rotary_emb(torch.cat(queries, dim=1), rotary, sequence_dim=1)
    k = apply_rotary_emb(torch.cat(keys, dim=1), rotary, sequence_dim=1)
    v = torch.cat(values, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
    return list(out.split(lengths, dim=1))


def _double_block(block, hidden: list[torch.Tensor], embs: list[torch.Tensor], branches: list[Branch], rotary, mask):
    """A FLUX double-stream block: text uses the *_context / add_* modules, images the others."""
    attn = block.attn
    mods, queries, keys, values = [], [], [], []
    for x, emb, br in zip(hidden, embs, branches):
        norm = block.norm1_context if br.is_text else block.norm1
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(norm, emb, br.adapters)
        mods.append((gate_msa, shift_mlp, scale_mlp, gate_mlp))
        h = _modulate(x, norm.norm, shift_msa, scale_msa)
        if br.is_text:
            q, k, v = attn.add_q_proj(h), attn.add_k_proj(h), attn.add_v_proj(h)
            q, k = attn.norm_added_q(_heads(q, attn.head_dim)), attn.norm_added_k(_heads(k, attn.head_dim))
        else:
            q, k, v = (lora_linear(proj, h, br.adapters) for proj in (attn.to_q, attn.to_k, attn.to_v))
            q, k = attn.norm_q(_heads(q, attn.head_dim)), attn.norm_k(_heads(k, attn.head_dim))
        queries.append(q)
        keys.append(k)
        values.append(_heads(v, attn.head_dim))
    attended = _joint_attention(queries, keys, values, rotary, mask)

    out = []
    for x, a, (gate_msa, shift_mlp, scale_mlp, gate_mlp), br in zip(hidden, attended, mods, branches):
        if br.is_text:
            a = attn.to_add_out(a)
            norm2, ff, adapters = block.norm2_context, block.ff_context, ()
        else:
            a = attn.to_out[1](lora_linear(attn.to_out[0], a, br.adapters))
            norm2, ff, adapters = block.norm2, block.ff, br.adapters
        x = x + gate_msa[:, None] * a
        h = _modulate(x, norm2, shift_mlp, scale_mlp)
        h = ff.net[1](ff.net[0](h))
        x = x + gate_mlp[:, None] * lora_linear(ff.net[2], h, adapters)
        out.append(x)
    return out


def _single_block(block, hidden: list[torch.Tensor], embs: list[torch.Tensor], branches: list[Branch], rotary, mask):
    """A FLUX single-stream block: every branch uses the same modules, with its own adapters."""
    attn = block.attn
    gates, mlps, queries, keys, values = [], [], [], [], []
    for x, emb, br in zip(hidden, embs, branches):
        shift, scale, gate = _modulation(block.norm, emb, br.adapters)
        h = _modulate(x, block.norm.norm, shift, scale)
        mlps.append(block.act_mlp(lora_linear(block.proj_mlp, h, br.adapters)))
        q, k, v = (lora_linear(proj, h, br.adapters) for proj in (attn.to_q, attn.to_k, attn.to_v))
        queries.append(attn.norm_q(_heads(q, attn.head_dim)))
        keys.append(attn.norm_k(_heads(k, attn.head_dim)))
        values.append(_heads(v, attn.head_dim))
        gates.append(gate)
    attended = _joint_attention(queries, keys, values, rotary, mask)
    return [
        x + gate[:, None] * lora_linear(block.proj_out, torch.cat([a, m], dim=2), br.adapters)
        for x, a, m, gate, br in zip(hidden, attended, mlps, gates, branches)
    ]


def branch_embeddings(transformer, domain_embedder: torch.nn.Module | None, branches: list[Branch]) -> list[torch.Tensor]:
    """Each branch's conditioning vector: FLUX's time/guidance/text embedding + its domain offset."""
    embs = []
    dtype = transformer.dtype
    for br in branches:
        t = br.timestep.to(dtype) * 1000
        if br.guidance is not None and transformer.config.guidance_embeds:
            emb = transformer.time_text_embed(t, br.guidance.to(dtype) * 1000, br.pooled)
        else:
            emb = transformer.time_text_embed(t, br.pooled)
        if br.domain is not None and domain_embedder is not None:
            index = torch.full((emb.shape[0],), br.domain, dtype=torch.long, device=emb.device)
            emb = emb + domain_embedder(index).to(emb.dtype)
        embs.append(emb)
    return embs


def joint_forward(
    transformer,
    branches: list[Branch],
    domain_embedder: torch.nn.Module | None = None,
    group_mask: torch.Tensor | None = None,
    outputs: tuple[int, ...] = (1, 2),
) -> list[torch.Tensor]:
    """Run all branches through the transformer at once; return the predictions of `outputs`.

    `group_mask` is a (branches x branches) bool matrix, query -> key (None: full attention).
    """
    dtype = transformer.dtype
    hidden = [
        transformer.context_embedder(br.hidden.to(dtype))
        if br.is_text
        else lora_linear(transformer.x_embedder, br.hidden.to(dtype), br.adapters)
        for br in branches
    ]
    embs = branch_embeddings(transformer, domain_embedder, branches)
    rotary = transformer.pos_embed(torch.cat([br.ids for br in branches], dim=0))
    mask = None
    if group_mask is not None:
        mask = group_attention_mask([h.shape[1] for h in hidden], group_mask).to(hidden[0].device)

    for block in transformer.transformer_blocks:
        hidden = _double_block(block, hidden, embs, branches, rotary, mask)
    for block in transformer.single_transformer_blocks:
        hidden = _single_block(block, hidden, embs, branches, rotary, mask)

    return [
        lora_linear(transformer.proj_out, transformer.norm_out(hidden[i], embs[i]), branches[i].adapters)
        for i in outputs
    ]
