"""LlamaGen (FoundationVision/LlamaGen): raster next-token models, class- or text-conditional.

Class-conditional models prefill the class token (id = vocab + class) through the step graph at
the condition position; text-conditional models run the prefill graph over caption features with
their padding mask, and use the model's learned null caption for CFG. Every raster method applies.
"""

from __future__ import annotations

import numpy as np
import torch

from arexport.errors import ArexportError
from arexport.families.base import NEXT_TOKEN_METHODS, NEXT_TOKEN_STEPS, Conditions, Family
from arexport.format.stepkinds import hidden_prefill_kind


class LlamaGenFamily(Family):
    name = "llamagen"
    methods = NEXT_TOKEN_METHODS + ("eagle",)  # EAGLE draft heads read LlamaGen hidden states
    default_method = "ar"
    step_kinds = NEXT_TOKEN_STEPS

    def caption_prefill(self, spec) -> bool:
        return spec.model_type == "t2i"

    def sampling_defaults(self, spec):
        if spec.model_type == "t2i":  # LlamaGen's t2i demo
            return {"cfg_scale": 7.5, "top_k": 1000, "top_p": 1.0, "temperature": 1.0}
        return {"cfg_scale": 4.0, "top_k": 2000, "top_p": 1.0, "temperature": 1.0}  # its c2i demo

    def conditions(self, spec, classes=None, captions=None, caption_mask=None) -> Conditions:
        if spec.model_type == "c2i":
            return super().conditions(spec, classes, captions, caption_mask)
        if classes is not None:
            raise ArexportError(f"model {spec.name} is text-conditional: give prompts or caption embeddings, not class ids")
        if captions is None:
            raise ArexportError(f"model {spec.name} is text-conditional: give prompts (with its text encoder) or caption "
                                f"embeddings [N, {spec.cond_len}, {spec.caption_dim}]")
        emb = torch.as_tensor(np.asarray(captions, dtype=np.float32))
        if emb.dim() != 3 or tuple(emb.shape[1:]) != (spec.cond_len, spec.caption_dim) or emb.shape[0] == 0:
            raise ArexportError(f"caption embeddings must have shape [N, {spec.cond_len}, {spec.caption_dim}], got {list(emb.shape)}")
        mask = torch.ones(emb.shape[:2], dtype=torch.bool) if caption_mask is None else torch.as_tensor(np.asarray(caption_mask)).bool()
        if tuple(mask.shape) != tuple(emb.shape[:2]):
            raise ArexportError(f"caption mask must have shape {list(emb.shape[:2])}, got {list(mask.shape)}")
        if not bool(mask[:, -1].all()):
            raise ArexportError("caption mask must be left-padded (the last position valid), as LlamaGen's T5 features are")
        return Conditions(embeds=emb, mask=mask)

    def prompt_conditions(self, engine, prompts) -> Conditions:
        spec = engine.spec
        if spec.model_type == "c2i":
            return super().prompt_conditions(engine, prompts)
        embeds, mask = engine.encode_prompts(prompts)
        if tuple(embeds.shape[1:]) != (spec.cond_len, spec.caption_dim):
            raise ArexportError(f"the text encoder gives features [{embeds.shape[1]}, {embeds.shape[2]}] per prompt; "
                                f"{spec.name} takes [{spec.cond_len}, {spec.caption_dim}]")
        return self.conditions(spec, captions=embeds.numpy(), caption_mask=mask.numpy())

    def null_conditions(self, engine, conds: Conditions) -> Conditions:
        if engine.spec.model_type == "c2i":
            return super().null_conditions(engine, conds)
        u = engine.null_caption().to(conds.embeds.device, conds.embeds.dtype)
        # LlamaGen reuses the caption's padding mask for its null rows
        return Conditions(embeds=u.unsqueeze(0).expand(len(conds), *u.shape).clone(), mask=conds.mask.clone())

    def verify_conditions(self, spec, batch, g):
        if spec.model_type == "c2i":
            return super().verify_conditions(spec, batch, g)
        emb = torch.randn(batch, spec.cond_len, spec.caption_dim, generator=g)
        mask = np.ones((batch, spec.cond_len), dtype=bool)
        mask[0, : spec.cond_len // 3] = False  # a left-padded caption
        return {"cond_embeds": emb.numpy(), "cond_mask": mask}

    def verify_feed_conditions(self, spec, feed):
        if spec.model_type == "c2i":
            return super().verify_feed_conditions(spec, feed)
        return Conditions(embeds=torch.from_numpy(feed["cond_embeds"]), mask=torch.from_numpy(feed["cond_mask"]))

    def verify_request(self, spec, n, g):
        if spec.model_type == "c2i":
            return super().verify_request(spec, n, g)
        return {"captions": torch.randn(n, spec.cond_len, spec.caption_dim, generator=g),
                "caption_mask": torch.ones(n, spec.cond_len, dtype=torch.bool)}

    def prefill(self, engine, cache, conds: Conditions) -> torch.Tensor:
        spec = engine.spec
        b, t, dev = len(conds), spec.cond_len, engine.device
        zero = torch.zeros(b, dtype=torch.int64, device=dev)
        if spec.model_type == "c2i":
            tokens = self.condition_tokens(spec, conds.classes.to(dev)).view(b, 1)
            positions = torch.full((b, 1), -1, dtype=torch.int64, device=dev)
            logits = engine.step(cache, tokens, positions, zero, cache.causal_mask(zero, 1), kind="prefill")[:, 0]
        else:
            cache.key_valid[:, :t] = conds.mask.to(dev).bool()
            logits = engine.prefill_embeds(cache, conds.embeds, cache.causal_mask(zero, t))
        cache.length.fill_(t)
        return logits

    def prefill_hidden(self, engine, cache, conds: Conditions):
        """`prefill` that also returns every condition position's hidden state [B, T_cond, dim] (after the final
        norm), which an EAGLE head catches up on (the last one paired with token 0) to draft an image's first round:
        the c2i class token goes through the kind declared `prefills="c2i"` (the tree step: the same layers as the
        prefill, plus the hidden output; T_cond 1), a t2i caption through the one declared `prefills="t2i"` (every
        caption position). An engine without that step: (logits, None)."""
        spec = engine.spec
        b, dev = len(conds), engine.device
        zero = torch.zeros(b, dtype=torch.int64, device=dev)
        kind = hidden_prefill_kind(spec.model_type, engine.step_kinds())
        if kind is None:
            return self.prefill(engine, cache, conds), None
        if kind.cache == "condition":  # caption features at slots [0, T)
            t = spec.cond_len
            cache.key_valid[:, :t] = conds.mask.to(dev).bool()
            out = engine.run(kind.name, cache, label="prefill", cond_embeds=conds.embeds, attn_mask=cache.causal_mask(zero, t))
            cache.length.fill_(t)
            if out["hidden"].dim() != 3:
                raise ArexportError(f"this engine's {kind.name} graph returns only the last caption position's hidden state "
                                    "(built before heads caught up on every caption position): rebuild it")
            return out["logits"], out["hidden"]
        tokens = self.condition_tokens(spec, conds.classes.to(dev)).view(b, 1)  # the class token, fed as a token
        positions = torch.full((b, 1), -1, dtype=torch.int64, device=dev)
        out = engine.run(kind.name, cache, label="prefill", tokens=tokens, positions=positions, write_index=zero,
                         attn_mask=cache.causal_mask(zero, 1))
        cache.length.fill_(spec.cond_len)
        return out["logits"][:, 0], out["hidden"]
