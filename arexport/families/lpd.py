"""LPD (mit-han-lab/lpd, "Locality-aware Parallel Decoding for Efficient Autoregressive Image
Generation"): a ViT-style decoder that predicts a group of tokens per forward from learnable
position-query tokens (models/lpd.py).

Decoding (`--method lpd`, runtime/methods/lpd.py): forward i feeds the tokens of group i - 1 (the
class token for i = 0) and one query per position of group i; the queries see each other and all
tokens before them, the group's tokens see each other and the tokens before them. Group sizes come
from the reference's lookup table per resolution and step count (`orders/group_sizes_lookup.json`;
the schedules its evaluation scripts use are shipped here). The step graph is the plain `token`
kind; an image takes 1 + N slots plus one group of queries past them.
"""

from __future__ import annotations

from arexport.errors import ArexportError
from arexport.families.llamagen import LlamaGenFamily

# mit-han-lab/lpd@f447b83 orders/group_sizes_lookup.json: the schedules of scripts/eval/*.sh
# (grid tokens -> steps -> group sizes)
GROUP_SIZES = {
    256: {20: [1, 2, 4, 5, 7, 8, 10, 11, 12, 14, 15, 16, 17, 18, 18, 19, 19, 20, 20, 20],
          32: [1, 1, 2, 2, 3, 3, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 10, 11, 11, 11, 11, 12, 12, 12, 12, 12, 12, 12,
               12]},
    1024: {48: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 23, 24, 25, 26, 26, 27,
                28, 28, 29, 29, 30, 30, 31, 31, 32, 32, 32, 33, 33, 33, 33, 33, 33, 33, 34]},
}
DEFAULT_STEPS = {256: 20, 1024: 48}


def lpd_group_sizes(n_tokens: int, steps) -> list[int]:
    """Tokens per forward: the reference's table for (n_tokens, steps); steps None = the evaluation
    default (20 at 256 px, 48 at 512 px); steps == n_tokens = one token per forward (any grid)."""
    table = GROUP_SIZES.get(n_tokens, {})
    if steps is None:
        steps = DEFAULT_STEPS.get(n_tokens, n_tokens)
    if steps == n_tokens:
        return [1] * n_tokens
    if steps not in table:
        have = ", ".join(str(s) for s in sorted(table) + [n_tokens])
        raise ArexportError(f"lpd has group sizes for {have} steps on {n_tokens} tokens (the reference's table), got {steps}")
    return list(table[steps])


def lpd_feed_len(sizes: list[int]) -> int:
    """The longest feed: the previous group's tokens plus the next group's queries (class + first group)."""
    return max([1 + sizes[0]] + [n + m for n, m in zip(sizes, sizes[1:])])


class LPDFamily(LlamaGenFamily):
    """Class-conditional LPD models: LlamaGen's class conditions and VQ-16 images, its own method."""

    name = "lpd"
    methods = ("lpd",)
    default_method = "lpd"
    step_kinds = ("token",)
    default_verify_len = 40  # the 256 px default schedule's longest feed (20 + 20); 512 px needs 67

    def caption_prefill(self, spec) -> bool:
        return False

    def sampling_defaults(self, spec):
        # main.py's defaults with the lpd-l-256 evaluation script's guidance: linear CFG 4.8, no top-k/top-p
        return {"cfg_scale": 4.8, "top_k": 0, "top_p": 1.0, "temperature": 1.0, "cfg_schedule": "linear"}

    def query_token(self, spec) -> int:
        """Token id of the position query."""
        t = spec.extra.get("query_token")
        if not isinstance(t, int):
            raise ArexportError(f"{spec.name} records no query_token: not an LPD model spec")
        return t
