"""On-device sampling shared by every decoding method (so method comparisons are apples to apples).

Semantics follow LlamaGen's sampler: CFG combines raw logits (`u + s * (c - u)`) before
temperature; top-k keeps every logit >= the k-th largest (ties kept); top-p keeps the smallest
prefix of the sorted distribution whose mass reaches p (the token crossing p is kept).
Temperature 0 means greedy (argmax). Draws use inverse-CDF sampling on uniforms from `RowRNG`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arexport.errors import ArexportError


@dataclass(frozen=True)
class SamplingParams:
    """Sampling options shared by all methods."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    cfg_interval: int = -1  # LlamaGen: CFG only for image tokens 0..cfg_interval+1; -1 = always

    def validate(self, vocab_size: int) -> "SamplingParams":
        """Raise ArexportError naming the first invalid option (NaN and infinity included)."""
        import math

        for name, v in (("temperature", self.temperature), ("top-p", self.top_p), ("cfg-scale", self.cfg_scale)):
            if not math.isfinite(v):
                raise ArexportError(f"{name} must be a finite number, got {v}")
        if self.temperature < 0:
            raise ArexportError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ArexportError(f"top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ArexportError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.cfg_scale < 0:
            raise ArexportError(f"cfg-scale must be >= 0, got {self.cfg_scale}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_cfg(self) -> bool:
        """LlamaGen doubles the batch only when cfg_scale > 1."""
        return self.cfg_scale > 1.0

    def cfg_active(self, token_index: int) -> bool:
        """Whether image token `token_index` is sampled from guided logits (LlamaGen's cfg_interval)."""
        return self.uses_cfg and (self.cfg_interval < 0 or token_index <= self.cfg_interval + 1)


def default_sampling(spec, **overrides) -> SamplingParams:
    """The model's sampler defaults (recorded in its spec), with any non-None overrides applied."""
    from arexport.families import get_family

    d = spec.extra.get("sampling_defaults") or get_family(spec.family).sampling_defaults(spec)
    base = SamplingParams()
    vals = {k: d.get(k, getattr(base, k)) for k in ("temperature", "top_k", "top_p", "cfg_scale", "cfg_interval")}
    vals.update({k: v for k, v in overrides.items() if v is not None})
    return SamplingParams(**vals)


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """Guided logits u + s (c - u); `scale` a float or a tensor broadcasting against the logits."""
    return uncond + (cond - uncond) * scale


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, params: SamplingParams, active) -> torch.Tensor:
    """CFG where `active` (bool, or a bool tensor over the leading dims); inactive rows keep the
    conditional logits (LlamaGen's cfg_interval)."""
    if isinstance(active, bool):
        return cfg_combine(cond, uncond, params.cfg_scale) if active else cond
    guided = cfg_combine(cond, uncond, params.cfg_scale)
    return torch.where(active.view(*active.shape, *(1,) * (guided.dim() - active.dim())), guided, cond)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p filtering over the last axis; removed entries become -inf (a new tensor)."""
    out = logits.clone()
    v = out.shape[-1]
    if top_k > 0 and top_k < v:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        out = out.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return out


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Target distribution p over the vocabulary (fp32) after temperature and filtering.

    With temperature 0 this is the one-hot argmax distribution, so acceptance rules stay exact.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k > 0 or params.top_p < 1.0:
        logits = filter_logits(logits, params.top_k, params.top_p)
    return torch.softmax(logits, dim=-1)


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [..., V] (rows need not be normalised), u [...] in [0,1) -> ids [...]."""
    cdf = probs.double().cumsum(-1)
    total = cdf[..., -1:]
    target = u.double().unsqueeze(-1) * total
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # right=True never lands on a zero-probability token except past the end from rounding
    # (u * total == total): fall back to the last token with mass. No host synchronisation.
    past_end = idx >= probs.shape[-1]
    return torch.where(past_end, _last_nonzero(probs), idx.clamp(max=probs.shape[-1] - 1))


def _last_nonzero(probs: torch.Tensor) -> torch.Tensor:
    v = probs.shape[-1]
    ar = torch.arange(v, device=probs.device).expand_as(probs)
    return torch.where(probs > 0, ar, torch.zeros_like(ar)).amax(-1)


def sample_logits(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor) -> torch.Tensor:
    """Sample token ids from logits [..., V] with uniforms u [...]; greedy when temperature is 0."""
    if params.greedy:
        return logits.argmax(-1)
    return sample_from_probs(probs_from_logits(logits, params), u)
