"""RAR (bytedance/1d-tokenizer): raster next-token class-to-image models with adaLN conditioning.

The prefill feeds two inputs through the step graph: the learned cls slot (position -2; its token
id is ignored) and the condition token (class id + V + 1, the "none" class for CFG rows) at
position -1. The step graph keeps the condition vector in its cache (see `arexport.models.rar`),
so decode and verify steps are LlamaGen's: every raster method applies. The sampler defaults are
the per-size settings the RAR authors report (a cosine guidance schedule with its power).
"""

from __future__ import annotations

import torch

from arexport.families.base import NEXT_TOKEN_METHODS, NEXT_TOKEN_STEPS, Conditions, Family


class RARFamily(Family):
    name = "rar"
    methods = NEXT_TOKEN_METHODS
    default_method = "ar"
    step_kinds = NEXT_TOKEN_STEPS
    prefill_len = 2  # the cls slot and the condition

    def sampling_defaults(self, spec):
        # RAR-B's reported sampler (README_RAR.md); each size records its own in the model spec
        return {"cfg_scale": 16.0, "cfg_schedule": "cosine", "cfg_power": 2.75, "temperature": 1.0, "top_k": 0, "top_p": 1.0}

    def prefill(self, engine, cache, conds: Conditions) -> torch.Tensor:
        spec, dev = engine.spec, engine.device
        b = len(conds)
        zero = torch.zeros(b, dtype=torch.int64, device=dev)
        cond = self.condition_tokens(spec, conds.classes.to(dev)).view(b, 1)
        tokens = torch.cat([torch.zeros_like(cond), cond], 1)
        positions = torch.tensor([[-2, -1]], dtype=torch.int64, device=dev).expand(b, 2)
        logits = engine.step(cache, tokens, positions, zero, cache.causal_mask(zero, 2), kind="prefill")[:, 1]
        cache.length.fill_(2)
        return logits
