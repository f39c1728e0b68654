"""Janus-Pro (transformers' JanusForConditionalGeneration): raster text-to-image from prompts.

A prompt is rendered with the checkpoint's chat template, ends with the image-start token and is
tokenized (BOS first); the prefill feeds it through the step graph as text tokens (id + V), left-
padded to the engine's prompt slots with the pads masked. CFG rows are the same ids with every token
but BOS and the image-start token replaced by the pad token, as transformers' generate builds them.
Image tokens then decode like any raster model, so every raster method applies.
"""

from __future__ import annotations

import numpy as np
import torch

from arexport.errors import ArexportError
from arexport.families.base import NEXT_TOKEN_METHODS, NEXT_TOKEN_STEPS, Conditions, Family


class JanusFamily(Family):
    name = "janus"
    methods = NEXT_TOKEN_METHODS
    default_method = "ar"
    step_kinds = NEXT_TOKEN_STEPS

    def prefill_queries(self, spec) -> int:
        return spec.cond_len  # the whole (padded) prompt in one step

    def sampling_defaults(self, spec):
        # transformers' Janus generate: guidance 5 when none is configured, plain multinomial sampling
        return {"cfg_scale": 5.0, "top_k": 0, "top_p": 1.0, "temperature": 1.0}

    def conditions(self, spec, classes=None, captions=None, caption_mask=None) -> Conditions:
        raise ArexportError(f"model {spec.name} generates from prompts: give --prompt TEXT (not class ids or caption embeddings)")

    def prompt_conditions(self, engine, prompts) -> Conditions:
        ids, mask = engine.encode_prompts(prompts)
        return Conditions(ids=ids, mask=mask)

    def null_conditions(self, engine, conds: Conditions) -> Conditions:
        x = engine.spec.extra
        keep = (conds.ids == x["bos_token_id"]) | (conds.ids == x["boi_token_id"]) | ~conds.mask
        return Conditions(ids=torch.where(keep, conds.ids, torch.full_like(conds.ids, x["pad_token_id"])), mask=conds.mask.clone())

    def check_draft(self, target_spec, draft_spec) -> None:
        super().check_draft(target_spec, draft_spec)
        for f in ("bos_token_id", "pad_token_id", "boi_token_id", "text_vocab_size"):
            if target_spec.extra.get(f) != draft_spec.extra.get(f):
                raise ArexportError(f"draft {draft_spec.name} does not share {target_spec.name}'s tokenizer ({f})")

    def verify_conditions(self, spec, batch, g):
        ids = torch.randint(0, spec.extra["text_vocab_size"], (batch, spec.cond_len), generator=g)
        mask = np.ones((batch, spec.cond_len), dtype=bool)
        mask[0, : spec.cond_len // 3] = False  # one row left-padded
        return {"prompt_ids": ids.numpy(), "prompt_mask": mask}

    def verify_feed_conditions(self, spec, feed):
        return Conditions(ids=torch.from_numpy(feed["prompt_ids"]), mask=torch.from_numpy(feed["prompt_mask"]))

    def verify_request(self, spec, n, g):
        return {"prompts": [f"a photo number {i}" for i in range(n)]}  # through each engine's own template and tokenizer

    def prefill(self, engine, cache, conds: Conditions) -> torch.Tensor:
        spec = engine.spec
        b, t, dev = len(conds), spec.cond_len, engine.device
        zero = torch.zeros(b, dtype=torch.int64, device=dev)
        cache.key_valid[:, :t] = conds.mask.to(dev).bool()
        tokens = conds.ids.to(dev) + spec.class_token_offset  # text tokens follow the image codebook
        positions = (torch.arange(t, device=dev) - t).expand(b, t)
        logits = engine.step(cache, tokens, positions, zero, cache.causal_mask(zero, t), kind="prefill")[:, -1]
        cache.length.fill_(t)
        return logits
