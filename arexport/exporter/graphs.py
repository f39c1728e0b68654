"""Traceable wrappers fixing each step function's graph signature (names in io_names())."""

from __future__ import annotations

import torch.nn as nn

from arexport.exporter.ops import functional_cache_write


def _flat(outputs, keys, values) -> tuple:
    """(*outputs, key_0, value_0, key_1, ...) in the graphs' output order."""
    out = list(outputs)
    for k, v in zip(keys, values):
        out += [k, v]
    return tuple(out)


def cache_names(n_layers: int, prefix: str) -> list[str]:
    """['{prefix}_key_0', '{prefix}_value_0', ...] in the order the graphs take and return them."""
    out = []
    for i in range(n_layers):
        out += [f"{prefix}_key_{i}", f"{prefix}_value_{i}"]
    return out


class DeclaredStepGraph(nn.Module):
    """A step kind's graph as its declaration states it (format.stepkinds):
    (*inputs, *past) -> (*outputs, *present), running `model.<kind.method>` with a functional cache write."""

    def __init__(self, model, kind):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, *args):
        n = len(self.kind.inputs)
        past = args[n:]
        keys, values = list(past[0::2]), list(past[1::2])
        out = getattr(self.model, self.kind.method)(*args[:n], keys, values, cache_write=functional_cache_write)
        return _flat(out[:-2], out[-2], out[-1])

    @staticmethod
    def io_names(kind, n_layers: int):
        return list(kind.input_names) + cache_names(n_layers, "past"), list(kind.output_names) + cache_names(n_layers, "present")


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
    """VAR's VQVAE at scale si: (f_hat, h) -> (f_hat, next) (only f_hat after the last scale), fp32 in
    and out; a half VQVAE runs its phi convolution in its dtype and f_hat accumulates in fp32
    (VARVQVAE.next_scale)."""

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
    """VAR's VQVAE decoder: f_hat [N, Cvae, H, W] fp32 -> images [N, H', W', 3] uint8; f_hat is cast to
    the decoder's dtype inside the graph (the runtime feeds fp32 whatever the decoder's precision)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.dtype = vae.post_quant_conv.weight.dtype

    def forward(self, f_hat):
        return self.vae.latents_to_images(f_hat.to(self.dtype))

    @staticmethod
    def io_names():
        return ["f_hat"], ["images"]
