"""ARPG (hp-l33/ARPG): random-order parallel decoding through the multi-query step graph.

There is no separate prefill: the first multi-query step feeds the class token (id = vocab + 1 +
class) with the condition position and asks the first queries, so only `arpg` applies.
"""

from __future__ import annotations

from arexport.families.base import Family


class ARPGFamily(Family):
    name = "arpg"
    methods = ("arpg",)
    default_method = "arpg"
    step_kinds = ("multi_query",)
    default_verify_len = None  # the multi-query step serves up to every token at once

    def sampling_defaults(self, spec):
        return {"cfg_scale": 4.0, "top_k": 0, "top_p": 1.0, "temperature": 1.0, "cfg_schedule": "linear"}  # its demo

    def cache_lookahead(self, max_q: int, spec=None) -> int:
        return 0  # its schedules end with their largest step, so padded feeds always fit
