"""Traceable wrappers fixing each step function's graph signature (names in io_names())."""

from __future__ import annotations

import torch.nn as nn

from arexport.exporter.ops import functional_cache_write


def _flat(logits, keys, values) -> tuple:
    """(logits, key_0, value_0, key_1, ...) in the graphs' output order."""
    out = [logits]
    for k, v in zip(keys, values):
        out += [k, v]
    return tuple(out)


def cache_names(n_layers: int, prefix: str) -> list[str]:
    """['{prefix}_key_0', '{prefix}_value_0', ...] in the order the graphs take and return them."""
    out = []
    for i in range(n_layers):
        out += [f"{prefix}_key_{i}", f"{prefix}_value_{i}"]
    return out


class StepGraph(nn.Module):
    """(tokens, positions, write_index, attn_mask, *past) -> (logits, *present)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, write_index, attn_mask, *past):
        keys, values = list(past[0::2]), list(past[1::2])
        return _flat(*self.model.step(tokens, positions, write_index, attn_mask, keys, values, cache_write=functional_cache_write))

    @staticmethod
    def io_names(n_layers: int):
        ins = ["tokens", "positions", "write_index", "attn_mask"] + cache_names(n_layers, "past")
        outs = ["logits"] + cache_names(n_layers, "present")
        return ins, outs


class MultiQueryStepGraph(nn.Module):
    """ARPG: (tokens, positions, write_index, attn_mask, query_positions, query_mask, *past) -> (logits, *present)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, write_index, attn_mask, query_positions, query_mask, *past):
        keys, values = list(past[0::2]), list(past[1::2])
        return _flat(*self.model.step(tokens, positions, write_index, attn_mask, query_positions, query_mask,
                                      keys, values, cache_write=functional_cache_write))

    @staticmethod
    def io_names(n_layers: int):
        ins = ["tokens", "positions", "write_index", "attn_mask", "query_positions", "query_mask"] + cache_names(n_layers, "past")
        return ins, ["logits"] + cache_names(n_layers, "present")


class PrefillGraph(nn.Module):
    """t2i: (cond_embeds, attn_mask, *past) -> (logits of the last condition token, *present)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, cond_embeds, attn_mask, *past):
        keys, values = list(past[0::2]), list(past[1::2])
        return _flat(*self.model.prefill_embeds(cond_embeds, attn_mask, keys, values, cache_write=functional_cache_write))

    @staticmethod
    def io_names(n_layers: int):
        return ["cond_embeds", "attn_mask"] + cache_names(n_layers, "past"), ["logits"] + cache_names(n_layers, "present")


class ImageDecoderGraph(nn.Module):
    """tokens [N, n_tokens] int64 -> images [N, H, W, 3] uint8."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens):
        return self.decoder(tokens)

    @staticmethod
    def io_names():
        return ["tokens"], ["images"]


class ScaleStepGraph(nn.Module):
    """VAR: (features, positions, classes, write_index, attn_mask, *past) -> (logits, *present)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, features, positions, classes, write_index, attn_mask, *past):
        keys, values = list(past[0::2]), list(past[1::2])
        return _flat(*self.model.step(features, positions, classes, write_index, attn_mask, keys, values,
                                      cache_write=functional_cache_write))

    @staticmethod
    def io_names(n_layers: int):
        ins = ["features", "positions", "classes", "write_index", "attn_mask"] + cache_names(n_layers, "past")
        return ins, ["logits"] + cache_names(n_layers, "present")


class NextScaleGraph(nn.Module):
    """VAR's VQVAE at scale si: (f_hat, h) -> (f_hat, next) (only f_hat after the last scale)."""

    def __init__(self, vae, si: int):
        super().__init__()
        self.vae, self.si = vae, si

    def forward(self, f_hat, h):
        f, nxt = self.vae.next_scale(self.si, f_hat, h)
        return f if nxt is None else (f, nxt)

    @staticmethod
    def io_names(last: bool):
        return ["f_hat", "h"], ["f_hat_out"] if last else ["f_hat_out", "next"]


class LatentDecoderGraph(nn.Module):
    """VAR's VQVAE decoder: f_hat [N, Cvae, H, W] -> images [N, H', W', 3] uint8."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, f_hat):
        return self.vae.latents_to_images(f_hat)

    @staticmethod
    def io_names():
        return ["f_hat"], ["images"]
