"""Which precision each image-decoder graph is exported in, checked on the user's own weights.

A decoder (or VAR's next-scale graphs) is exported in the engine's precision unless asked
otherwise (`BuildOptions.decoder_precision`). fp16 has a range of +-65504; whether a released
VQ decoder stays inside it depends on its weights, which no test here has. So at build time the
decoder runs in fp32 PyTorch on a few calibration token grids while every operator's output is
recorded (a dispatch mode sees every op, the attention products inside blocks included, not only
module outputs), and the largest |activation| of each layer (innermost module) is kept, with the
largest |weight|. If the peak exceeds fp16's range divided by MARGIN, an fp16 graph would come too
close to overflowing on inputs the few grids did not cover: `auto` keeps that graph in fp32, a
forced fp16 refuses with DecoderOverflow. bf16 has fp32's exponent range (max about 3.4e38): no
overflow check is needed and none is run. The decision and its figures go into the manifest
(`export.decoders`) and the build's report.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from arexport.errors import ArexportError

FP16_MAX = 65504.0
MARGIN = 8.0  # headroom (3 binades) over the calibration peak: real token grids and prompts may go further
LIMIT = FP16_MAX / MARGIN
GRIDS = 3  # calibration token grids: 2 uniformly random, 1 constant (one code everywhere)
SEED = 0
CHOICES = ("auto", "fp32", "fp16", "bf16")


class DecoderOverflow(ArexportError):
    """A decoder forced to fp16 whose calibration activations come too close to fp16's range."""


@dataclass
class Peaks:
    """Largest |value| per (graph, layer) seen while calibrating, and whether any was not finite."""

    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    nonfinite: dict[str, str] = field(default_factory=dict)  # graph -> first layer with inf/nan

    def of(self, graph: str) -> dict[str, float]:
        return self.layers.get(graph, {})

    def peak(self, graph: str) -> tuple[str, float]:
        """(layer, value) of graph's largest |activation| (('', 0.0) when nothing was recorded)."""
        layers = self.of(graph)
        return max(layers.items(), key=lambda kv: kv[1]) if layers else ("", 0.0)

    def top(self, graph: str, k: int = 5) -> list[list]:
        return [[n, round(v, 3)] for n, v in sorted(self.of(graph).items(), key=lambda kv: -kv[1])[:k]]


class _Recorder(TorchDispatchMode):
    """Records max |output| of every floating-point operator under the innermost running module."""

    def __init__(self, peaks: Peaks):
        super().__init__()
        self.peaks, self.graph, self.stack = peaks, "", ["(top level)"]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                self._note(self.stack[-1], t)
        return out

    def _note(self, layer: str, t: torch.Tensor) -> None:
        a = t.detach().abs()
        if bool(torch.isfinite(a).all()):
            v = float(a.max())
        else:
            self.peaks.nonfinite.setdefault(self.graph, layer)
            v = float("inf")
        d = self.peaks.layers.setdefault(self.graph, {})
        d[layer] = max(d.get(layer, 0.0), v)


@contextlib.contextmanager
def recording(module: nn.Module, peaks: Peaks):
    """Within this block, ops run by `module` (fp32) are recorded into `peaks` under the graph name set
    with `.graph = name` on the yielded recorder."""
    rec = _Recorder(peaks)
    names = {id(m): n for n, m in module.named_modules() if n}
    handles = []

    def enter(m, args) -> None:
        rec.stack.append(names[id(m)])

    def leave(m, args, out) -> None:  # returns None: the module's output is kept
        rec.stack.pop()

    for m in module.modules():
        if id(m) in names:
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        with rec, torch.no_grad():
            yield rec
    finally:
        for h in handles:
            h.remove()


def calibration_tokens(vocab: int, n_tokens: int, grids: int = GRIDS, seed: int = SEED) -> torch.Tensor:
    """[grids, n_tokens] int64: uniformly random codes, the last grid one code everywhere."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (grids, n_tokens), generator=g)
    t[-1] = t[-1, 0]
    return t


def weight_peak(module: nn.Module) -> tuple[str, float]:
    """(name, value) of the largest |parameter| (an fp16 weight must fit too)."""
    best = ("", 0.0)
    for n, p in module.named_parameters():
        if p.is_floating_point() and p.numel():
            v = float(p.detach().abs().max())
            best = max(best, (n, v), key=lambda b: b[1])
    return best


def has_weights(module: nn.Module) -> bool:
    return any(p.is_floating_point() for p in module.parameters())


def decide(graph: str, requested: str, engine_precision: str, module: nn.Module, peaks: Callable[[], Peaks] | None) -> dict:
    """The precision of one decoder graph and the figures behind it (the manifest's record).
    requested: auto (the engine's precision, fp32 where fp16 would come near overflow) or a precision
    (fp16 forced: DecoderOverflow instead of falling back). `peaks` runs the calibration (fp16 only)."""
    target = engine_precision if requested == "auto" else requested
    rec: dict = {"requested": requested, "precision": target}
    if not has_weights(module):
        rec.update(precision="fp32", why="no weights: the graph has no half arithmetic to choose")
        return rec
    if target == "fp32":
        rec["why"] = "fp32 engine" if requested == "auto" else "asked for fp32"
        return rec
    if target == "bf16":
        rec["why"] = "bf16 has fp32's exponent range: no overflow check needed"
        return rec
    p = peaks()
    if not p.of(graph):
        raise ArexportError(f"the calibration of {graph} recorded no activations (nothing ran under its name)")
    layer, value = p.peak(graph)
    wname, wvalue = weight_peak(module)
    bad = graph in p.nonfinite or max(value, wvalue) > LIMIT
    rec["calibration"] = {"grids": GRIDS, "seed": SEED, "peak": round(value, 3), "peak_layer": layer,
                          "weight_peak": round(wvalue, 3), "weight_peak_name": wname, "limit": LIMIT,
                          "margin": MARGIN, "top": p.top(graph)}
    if graph in p.nonfinite:
        rec["calibration"]["nonfinite_layer"] = p.nonfinite[graph]
    if not bad:
        rec["why"] = f"calibration peak {value:.4g} at {layer} is within fp16 max / {MARGIN:g} = {LIMIT:g}"
        return rec
    where = (f"not finite at {p.nonfinite[graph]}" if graph in p.nonfinite else
             f"{value:.4g} at {layer}" if value >= wvalue else f"weight {wname} = {wvalue:.4g}")
    why = (f"{graph}: fp16 would come too close to overflowing: calibration peak {where} exceeds "
           f"fp16 max / {MARGIN:g} = {LIMIT:g} ({GRIDS} token grids, seed {SEED})")
    if requested == "fp16":
        raise DecoderOverflow(why + "; build with --decoder-precision auto (keeps it fp32) or bf16")
    rec.update(precision="fp32", why=why + "; kept in fp32")
    return rec


def line(graph: str, rec: dict) -> str:
    """One report line for a graph's decision."""
    return f"{graph}: {rec['precision']} ({rec['why']})"


def calibrate_image_decoder(decoder: nn.Module, vocab: int, n_tokens: int, graph: str = "vq_decoder") -> Peaks:
    """Peaks of an fp32 tokens -> images decoder over the calibration grids (one at a time: a 512 px
    decoder's feature maps are hundreds of MB per image)."""
    peaks = Peaks()
    with recording(decoder, peaks) as rec:
        rec.graph = graph
        for grid in calibration_tokens(vocab, n_tokens):
            decoder(grid[None])
    return peaks


def calibrate_var(vae: nn.Module, scales, vocab: int) -> Peaks:
    """Peaks of an fp32 VAR VQVAE: each next-scale graph (f_hat accumulated over the scales of the
    calibration grids' tokens) and the latent decoder on the final f_hat."""
    peaks = Peaks()
    tokens = calibration_tokens(vocab, scales.ends[-1])
    hw = scales.patch_nums[-1]
    emb = vae.codebook()
    with recording(vae, peaks) as rec:
        f_hat = emb.new_zeros(tokens.shape[0], emb.shape[1], hw, hw)
        for si in range(len(scales)):
            rec.graph = f"next_scale_{si}"
            f_hat, _ = vae.next_scale(si, f_hat, emb[tokens[:, scales.begins[si]:scales.ends[si]]])
        rec.graph = "latent_decoder"
        vae.latents_to_images(f_hat)
    return peaks
