"""VAR (FoundationVision/VAR): next-scale prediction through the scale-block step graph.

There is no prefill: an image starts at its first scale, whose one input is the class embedding
(the step graph takes the class ids of its rows every call, the null class for CFG rows). Each
step feeds one whole scale; a CoDe refiner's first step feeds every scale up to its entry scale
at once under the block-causal mask. Images decode from their tokens through the multi-scale
VQVAE (the image decoder graph), or from their accumulated f_hat (`more_smooth`).
"""

from __future__ import annotations

from arexport.errors import ArexportError
from arexport.families.base import Family
from arexport.format.scales import Scales


class VARFamily(Family):
    name = "var"
    methods = ("var", "code")
    default_method = "var"
    step_kinds = ("scale",)
    default_verify_len = None  # a CoDe refiner's first step feeds up to every position

    def cache_lookahead(self, max_q: int, spec=None) -> int:
        return 0  # a padded scale block never passes the end: begin_k + largest scale <= total

    def sampling_defaults(self, spec):
        # the reference demo's sampler: cfg 4 on VAR's ramp t = cfg * k / (S - 1), top-k 900, top-p 0.95
        return {"cfg_scale": 4.0, "cfg_schedule": "ramp", "top_k": 900, "top_p": 0.95, "temperature": 1.0}

    def scales(self, spec) -> Scales:
        return Scales(spec.extra["patch_nums"])

    def token_layout(self, spec) -> str:
        return "scales " + ",".join(map(str, self.scales(spec).patch_nums))

    def latent_channels(self, spec) -> int:
        """Cvae: channels of the VQVAE latents (the scale step's features, next-scale inputs, f_hat)."""
        return int(spec.extra["cvae"])

    def exact_query_sizes(self, spec) -> tuple[int, ...]:
        return tuple(self.scales(spec).sizes)

    def check_draft(self, target_spec, draft_spec) -> None:
        super().check_draft(target_spec, draft_spec)
        for f in ("patch_nums", "cvae"):
            if target_spec.extra.get(f) != draft_spec.extra.get(f):
                raise ArexportError(f"refiner {draft_spec.name} does not match {target_spec.name}: {f} "
                                    f"{draft_spec.extra.get(f)} != {target_spec.extra.get(f)}")
