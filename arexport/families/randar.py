"""RandAR (ziqipang/RandAR, "Decoder-only Autoregressive Visual Generation in Random Orders"): a
LlamaGen-shaped GPT that generates the grid in a random order, each token announced by a
position-instruction token carrying its grid position (models/randar.py).

Decoding (`--method randar`, runtime/methods/randar.py) predicts a group of tokens per forward: the
group's instruction tokens are fed together (causal among themselves) and their outputs sampled at
once. Group sizes follow the reference's cosine schedule over `num_inference_steps` forwards (88 by
default; -1: one token per forward). The step graph is the plain `token` kind; the cache holds the
class token and interleaved (instruction, token) pairs, so an image takes 1 + 2 N slots (N tokens)
plus the lookahead of one padded feed.
"""

from __future__ import annotations

import math

import torch

from arexport.errors import ArexportError
from arexport.families.llamagen import LlamaGenFamily

DEFAULT_STEPS = 88  # RandAR's num_inference_steps (configs and sample_c2i.py)
DEFAULT_CFG_START = 1.0  # the first of sample_c2i.py's --cfg-scales 1.0,4.0 (the ramp's scale at the first token)
MAX_STEPS = 1 << 20  # the schedule runs at most one forward per token whatever steps says


def randar_group_sizes(n_tokens: int, steps: int) -> list[int]:
    """Tokens predicted by each forward: RandAR's cosine schedule. After forward c (of `steps`) the
    image should hold floor(N (1 - cos(pi/2 (c + 1) / steps))) + 1 tokens (at most N); the next group
    is what is missing, at least 1 and no more than what is left. The first group is one token.
    steps = -1 means one token per forward; steps >= N gives one token per forward too. Sums to n_tokens."""
    if steps == -1:
        steps = n_tokens
    if not 1 <= steps <= MAX_STEPS:  # more steps than tokens is allowed (the reference's 88 on small grids)
        raise ArexportError(f"randar steps must be -1 or in [1, {MAX_STEPS}], got {steps}")
    sizes, done, size = [], 0, 1
    while size > 0:
        sizes.append(size)
        target = min(int((1.0 - math.cos(math.pi / 2.0 * (len(sizes) + 1) / steps)) * n_tokens + 1), n_tokens)
        done += size
        size = min(max(target - done, 1), n_tokens - done)
    return sizes


def randar_cfg_scale(start: float, end: float, first, n_tokens: int):
    """RandAR's guidance scale for a group whose first token has generation index `first` (an int or
    an integer tensor) of n_tokens: the linear ramp start + (end - start) first / N (the reference's
    `cfg_scales` pair; start = end is a constant scale). Computed in float64; a float for an int, else
    a float32 tensor shaped like `first`."""
    if isinstance(first, torch.Tensor):
        return (start + (end - start) * first.double() / n_tokens).float()
    return start + (end - start) * first / n_tokens


def randar_feed_len(sizes: list[int]) -> int:
    """The longest feed of a schedule: the previous group's tokens with their instructions (2 n - 1)
    plus the next group's instructions (m), or the class token and the first instruction."""
    return max([2] + [2 * n - 1 + m for n, m in zip(sizes, sizes[1:])])


class RandARFamily(LlamaGenFamily):
    """Class-conditional RandAR models: LlamaGen's conditions, its own method and cache layout."""

    name = "randar"
    methods = ("randar",)
    default_method = "randar"
    step_kinds = ("token",)
    default_verify_len = 16  # covers the default schedule's longest feed on the released 16 x 16 grid (13)

    def default_query_len(self, spec) -> int:
        """The default schedule's longest feed on this grid (13 on 16 x 16), at least default_verify_len."""
        return max(self.default_verify_len, randar_feed_len(randar_group_sizes(spec.n_tokens, DEFAULT_STEPS)))

    def caption_prefill(self, spec) -> bool:
        return False

    def sampling_defaults(self, spec):
        # sample_c2i.py's defaults: --cfg-scales 1.0,4.0 (linear from 1 at the first token to 4), no top-k/top-p
        return {"cfg_scale": 4.0, "top_k": 0, "top_p": 1.0, "temperature": 1.0, "cfg_schedule": "linear"}

    def cache_lookahead(self, max_q: int, spec=None) -> int:
        """Instruction tokens take N slots beside the N image tokens, plus one padded feed of max_q."""
        if spec is None:
            raise ArexportError("RandAR's cache size depends on its token count: pass the model spec")
        return spec.n_tokens + max_q - 1

    def instruction_token(self, spec) -> int:
        """Token id of the position-instruction token."""
        t = spec.extra.get("instruction_token")
        if not isinstance(t, int):
            raise ArexportError(f"{spec.name} records no instruction_token: not a RandAR model spec")
        return t
