"""transformers' Llama-style decoder layers run over arexport's static KV cache (Janus-Pro, Emu3 and
Lumina-mGPT reuse the model definitions of transformers; only the cache and the mask are ours)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from arexport.models.fused import live_slots


def plain_qk(attn, x: torch.Tensor, b: int, q: int, hd: int):
    """q and k projections as [B, heads, q, hd] (Llama, Janus, Emu3)."""
    return (attn.q_proj(x).view(b, q, -1, hd).transpose(1, 2), attn.k_proj(x).view(b, q, -1, hd).transpose(1, 2))


def static_cache_layers(layers, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys, values,
                        write_index: torch.Tensor, attn_mask: torch.Tensor, cache_write: Callable,
                        rotate: Callable, project_qk: Optional[Callable] = None):
    """h [B, q, D] through `layers`, each writing its K/V into its static cache at write_index (GQA
    heads repeated for the attention) and attending to the live slots under attn_mask [B, 1, q, L]; returns (h, new
    keys, new values). `rotate` is the model's apply_rotary_pos_emb; `project_qk(attn, x, b, q, hd)`
    its q/k projections (Chameleon normalises them per head), plain_qk by default."""
    project_qk = project_qk or plain_qk
    b, q = h.shape[:2]
    new_keys, new_values = [], []
    for layer, pk, pv in zip(layers, keys, values):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        hd = attn.head_dim
        qh, kh = project_qk(attn, x, b, q, hd)
        vh = attn.v_proj(x).view(b, q, -1, hd).transpose(1, 2)
        qh, kh = rotate(qh, kh, cos, sin)
        k_all, v_all = cache_write(pk, kh, write_index), cache_write(pv, vh, write_index)
        new_keys.append(k_all)
        new_values.append(v_all)
        rep = qh.shape[1] // k_all.shape[1]
        k_live, v_live = live_slots(k_all, attn_mask), live_slots(v_all, attn_mask)
        k_use = k_live.to(qh.dtype).repeat_interleave(rep, 1) if rep > 1 else k_live.to(qh.dtype)
        v_use = v_live.to(qh.dtype).repeat_interleave(rep, 1) if rep > 1 else v_live.to(qh.dtype)
        o = F.scaled_dot_product_attention(qh, k_use, v_use, attn_mask=attn_mask, scale=attn.scaling)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(b, q, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, new_keys, new_values
