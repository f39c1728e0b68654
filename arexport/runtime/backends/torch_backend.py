"""The `torch` backend: the PyTorch reference model run eagerly on static cache buffers."""

from __future__ import annotations

import torch

from arexport.models.registry import LoadedModel
from arexport.runtime.engine import Conditions, StepEngine
from arexport.errors import ArexportError


class TorchEngine(StepEngine):
    """StepEngine over a LlamaGen module; K/V are scattered into the cache buffers in place."""

    backend = "torch"

    def __init__(self, loaded: LoadedModel, device="cpu", dtype: torch.dtype | None = None):
        model = loaded.model
        dtype = dtype or next(model.parameters()).dtype
        super().__init__(loaded.spec, torch.device(device), dtype)
        self.loaded = loaded
        self.model = model.to(self.device, dtype=dtype).eval()
        self.model.rope_cos, self.model.rope_sin = self.model.rope_cos.float(), self.model.rope_sin.float()
        self.decoder = loaded.decoder.to(self.device).eval() if loaded.decoder is not None else None

    @torch.inference_mode()
    def _step(self, cache, tokens, positions, write_index, attn_mask):
        if self.spec.family == "arpg":
            raise ArexportError(f"{self.spec.name} is an ARPG model: it decodes with --method arpg")
        logits, _, _ = self.model.step(
            tokens.to(self.device), positions.to(self.device), write_index.to(self.device), attn_mask, cache.keys, cache.values
        )
        return logits

    @torch.inference_mode()
    def _multi_query_step(self, cache, tokens, positions, write_index, attn_mask, query_positions, query_mask):
        dev = self.device
        logits, _, _ = self.model.step(tokens.to(dev), positions.to(dev), write_index.to(dev), attn_mask,
                                       query_positions.to(dev), query_mask, cache.keys, cache.values)
        return logits

    @torch.inference_mode()
    def _prefill_embeds(self, cache, conds: Conditions, attn_mask):
        embeds = conds.embeds.to(self.device, dtype=self.cache_dtype)
        logits, _, _ = self.model.prefill_embeds(embeds, attn_mask, cache.keys, cache.values)
        return logits

    @torch.inference_mode()
    def _decode_images(self, tokens):
        if self.decoder is None:
            raise ArexportError(
                f"no image decoder for {self.spec.name}: pass --vq-checkpoint (or --random-init for random VQ weights)"
            )
        return self.decoder(tokens)

    def codebook(self) -> torch.Tensor:
        if self.decoder is None:
            raise ArexportError(f"no codebook for {self.spec.name}: pass --vq-checkpoint")
        return self.decoder.codebook().detach().float().to(self.device)

    def null_caption(self) -> torch.Tensor:
        return self.model.cls_embedding.uncond_embedding.detach()
