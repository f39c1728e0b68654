"""What an engine of a full-size model would need in memory, from its config alone (`build --dry-run`).

Estimates, in bytes, of one engine's device memory: the step graph's weights, the VQ decoder's
weights, the static KV cache (2 x layers x kv_heads x head_dim x s_max per row, CFG doubling the rows)
and the largest activations of one step (the logits over the full text vocabulary in fp32, which the
step computes before selecting the image columns, the MLP's intermediate and the attention scores
over the whole cache) and of one image decode (a few copies of the largest feature map). They are
arithmetic on shapes, not measurements: allocator slack and backend workspaces come on top.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepShape:
    """The shapes that size an engine (ModelSpec fields plus what the spec does not record)."""

    name: str
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    dim: int
    intermediate: int
    logits_width: int  # columns the step's head computes (the whole text vocabulary for Emu3 / Chameleon)
    s_max: int  # cache slots per row
    step_params: int
    decoder_params: int = 0
    decoder_peak_elems: int = 0  # elements of the decoder's largest feature map for one image
    note: str = ""  # what the figures stand in for (printed with them)


def estimate(shape: StepShape, bytes_per_param: int, images: int, verify_len: int = 16, cfg: bool = True) -> dict[str, int]:
    """Bytes for `images` images at once (rows = 2 images with CFG); see the module docstring."""
    rows = images * (2 if cfg else 1)
    p = bytes_per_param
    cache = 2 * shape.n_layer * shape.n_kv_head * shape.head_dim * shape.s_max * rows * p
    q = verify_len
    step_act = (rows * q * shape.logits_width * 4  # fp32 logits of every vocabulary column
                + rows * q * shape.intermediate * p * 2  # gate and up projections
                + rows * shape.n_head * q * shape.s_max * 4  # attention scores (fp32 softmax)
                + rows * q * shape.dim * p * 4)  # residual, normed, attention output, MLP output
    decode_act = 3 * shape.decoder_peak_elems * images * p
    return {"weights_step": shape.step_params * p, "weights_decoder": shape.decoder_params * p, "kv_cache": cache,
            "step_activations": step_act, "decoder_activations": decode_act,
            "total": shape.step_params * p + shape.decoder_params * p + cache + max(step_act, decode_act)}


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def report(shape: StepShape, bytes_per_param: int, batches=(1, 8), verify_len: int = 16) -> list[str]:
    """Lines printed by `build --dry-run`: one per image batch."""
    lines = [f"{shape.name}: {shape.step_params / 1e9:.2f} B step parameters, {shape.decoder_params / 1e6:.1f} M decoder "
             f"parameters, {shape.s_max} cache slots per row, {bytes_per_param} bytes per parameter, step q <= {verify_len}"
             + (f" ({shape.note})" if shape.note else "")]
    for b in batches:
        e = estimate(shape, bytes_per_param, b, verify_len)
        lines.append(f"  batch {b} image(s), {2 * b} CFG rows: weights {gib(e['weights_step'])} step + "
                     f"{gib(e['weights_decoder'])} decoder, KV cache {gib(e['kv_cache'])}, activations "
                     f"{gib(e['step_activations'])} step / {gib(e['decoder_activations'])} decode; total ~{gib(e['total'])}")
    return lines
