"""On-device sampling shared by every decoding method (so method comparisons are apples to apples).

Semantics follow LlamaGen's sampler: CFG combines raw logits (`u + s * (c - u)`) before
temperature; top-k keeps every logit >= the k-th largest (ties kept); top-p keeps the smallest
prefix of the sorted distribution whose mass reaches p (the token crossing p is kept).
Temperature 0 means greedy (argmax). Draws use inverse-CDF sampling on uniforms from `RowRNG`.

Sampling is per image: a batch whose images all share one `SamplingParams` passes it to these
functions as is; a batch whose images differ passes `RowParams`, and each function applies every
distinct setting to the images that use it (gathered, computed, scattered back). Every operation
here is row-wise, so an image gets exactly the numbers it would get in a batch of its own kind.

The guidance scale may change per image token (`cfg_schedule`); every method asks `cfg_scales`
for the scale of the token index it samples, so a schedule applies inside verify blocks and
parallel steps position by position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from arexport.errors import ArexportError


# Bounds past which sampling is numerically meaningless (inf/NaN logits), not a matter of taste:
# published guidance scales are <= 10 and temperatures near 1.
MAX_CFG_SCALE = 100.0
MAX_CFG_POWER = 100.0
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 1e4


@dataclass(frozen=True)
class SamplingParams:
    """Sampling options shared by all methods."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    cfg_interval: int = -1  # LlamaGen: CFG only for image tokens 0..cfg_interval+1; -1 = always
    cfg_schedule: str = "constant"  # guidance scale per token index: see CFG_SCHEDULES
    cfg_power: float = 1.0  # exponent of the cosine schedule (RAR's guidance_scale_pow)
    temperatures: tuple = ()  # per-step temperatures (next-scale methods: one per scale); () = `temperature`
    filter_first: bool = False  # top-k/top-p on the guided logits, then temperature (VAR's helper order)
    entropy_temperature: bool = False  # per-token temperature from the filtered distribution's entropy (ARsample)

    def validate(self, vocab_size: int) -> "SamplingParams":
        """Raise ArexportError naming the first invalid option (NaN and infinity included)."""
        for name, v in (("temperature", self.temperature), ("top-p", self.top_p), ("cfg-scale", self.cfg_scale),
                        ("cfg-power", self.cfg_power)):
            if not math.isfinite(v):
                raise ArexportError(f"{name} must be a finite number, got {v}")
        if self.temperature < 0:
            raise ArexportError(f"temperature must be >= 0, got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE or self.temperature > MAX_TEMPERATURE:
            raise ArexportError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got "
                                f"{self.temperature:g} (outside that, logits / temperature overflow or the draw is uniform)")
        if self.top_k < 0:
            raise ArexportError(f"top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ArexportError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.cfg_scale <= MAX_CFG_SCALE:
            raise ArexportError(f"cfg-scale must be in [0, {MAX_CFG_SCALE:g}], got {self.cfg_scale:g} (larger scales "
                                "overflow the guided logits)")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ArexportError(f"cfg-schedule must be one of {', '.join(CFG_SCHEDULES)}, got {self.cfg_schedule!r}")
        for t in self.temperatures:
            if not (math.isfinite(t) and t > 0):
                raise ArexportError(f"per-step temperatures must be finite and > 0, got {t}")
        if not 0 <= self.cfg_power <= MAX_CFG_POWER:
            raise ArexportError(f"cfg-power must be in [0, {MAX_CFG_POWER:g}], got {self.cfg_power:g}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_cfg(self) -> bool:
        """LlamaGen doubles the batch only when cfg_scale > 1; VAR's ramp (scale 1 + g k / (S - 1))
        guides whenever g > 0."""
        return self.cfg_scale > 1.0 or (self.cfg_schedule == "ramp" and self.cfg_scale > 0)

    def cfg_active(self, token_index: int) -> bool:
        """Whether image token `token_index` is sampled from guided logits (LlamaGen's cfg_interval)."""
        return self.uses_cfg and (self.cfg_interval < 0 or token_index <= self.cfg_interval + 1)


CFG_SCHEDULES = ("constant", "linear", "cosine", "ramp")
MAX_CFG_POWER = 64.0


class RowParams:
    """Sampling of a batch's images [0, n) when they differ: each distinct SamplingParams with the
    (ascending) image indices that use it. Build it with `row_params`, which returns the shared
    SamplingParams instead when every image has the same."""

    def __init__(self, per_image: list, device):
        groups: dict = {}
        for i, p in enumerate(per_image):
            groups.setdefault(p, []).append(i)
        self.n = len(per_image)
        self.per_image = list(per_image)
        self.groups = [(p, torch.tensor(idx, dtype=torch.int64, device=device)) for p, idx in groups.items()]

    def repeat_interleave(self, k: int) -> "RowParams":
        """Each image's params for k consecutive rows (GridAR's candidates)."""
        return RowParams([p for p in self.per_image for _ in range(k)], self.groups[0][1].device)

    def same(self, name: str):
        """The value of option `name` shared by every image; ArexportError when images differ in it."""
        vals = {getattr(p, name) for p, _ in self.groups}
        if len(vals) != 1:
            raise ArexportError(f"images of one batch differ in {name} ({sorted(map(str, vals))}); "
                                "this code path needs one value per batch")
        return vals.pop()

    @property
    def greedy(self) -> bool:
        return self.same("greedy")


def row_params(per_image: list, device):
    """SamplingParams when every image of the list shares it (the batch-wide code path, as before
    per-row sampling existed), else RowParams."""
    first = per_image[0]
    if all(p is first or p == first for p in per_image):
        return first
    return RowParams(per_image, device)


def per_group(params, fn, *args):
    """fn(p, *args restricted to p's images) for each setting of RowParams, scattered into one
    tensor along dim 0; args that are tensors with a leading dim of n images are indexed, others
    (ints, None) pass as they are. With SamplingParams: fn(params, *args)."""
    if not isinstance(params, RowParams):
        return fn(params, *args)
    out = None
    for p, idx in params.groups:
        sub = [a.index_select(0, idx.to(a.device)) if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == params.n
               else a for a in args]
        r = fn(p, *sub)
        if out is None:
            out = torch.empty((params.n, *r.shape[1:]), dtype=r.dtype, device=r.device)
        out[idx.to(out.device)] = r
    return out


def cfg_scales(params: SamplingParams, token_index, n_tokens: int):
    """Guidance scale for the image token with 0-based index `token_index` (an int or an integer
    tensor) of n_tokens, with g = cfg_scale and t = token_index:

    * `constant`: g.
    * `linear`: 1 + (g - 1) (t + 1) / n, reaching g at the last token. ARPG's `generate` evaluates it
      at the count of tokens predicted including the current step's: its decoder passes the index
      of the step's last token for every token of the step.
    * `cosine`: 1 + (g - 1) (1 - cos(pi (t / n) ** p)) / 2 with p = cfg_power: MDT's power-cosine ramp
      that RAR's `generate` uses (scale 1 at the first token; p = 0 is constant g there, as 0 ** 0 = 1).
    * `ramp`: 1 + g t / (n - 1): VAR's (1 + t') c - t' u with t' = cfg * k / (S - 1) over its S scales
      (VAR passes the scale index k and n = S; the last scale is guided at 1 + g).

    Returns a float for `constant`, else a float32 tensor shaped like token_index (a float for an int).
    """
    g, kind = params.cfg_scale, params.cfg_schedule
    if kind == "constant":
        return g
    scalar = not isinstance(token_index, torch.Tensor)
    t = torch.as_tensor(token_index, dtype=torch.float64)
    if kind == "linear":
        s = 1.0 + (g - 1.0) * (t + 1.0) / n_tokens
    elif kind == "ramp":
        s = 1.0 + g * t / max(n_tokens - 1, 1)
    else:
        s = 1.0 + (g - 1.0) * (1.0 - torch.cos(torch.pow(t / n_tokens, params.cfg_power) * math.pi)) / 2.0
    return float(s) if scalar else s.float()


def default_sampling(spec, **overrides) -> SamplingParams:
    """The model's sampler defaults (recorded in its spec), with any non-None overrides applied."""
    from arexport.families import get_family

    family = get_family(spec.family).sampling_defaults(spec)  # fills keys an older engine did not record
    d = {**family, **(spec.extra.get("sampling_defaults") or {})}
    base = SamplingParams()
    vals = {k: d.get(k, getattr(base, k)) for k in ("temperature", "top_k", "top_p", "cfg_scale", "cfg_interval",
                                                    "cfg_schedule", "cfg_power", "entropy_temperature")}
    vals.update({k: v for k, v in overrides.items() if v is not None})
    return SamplingParams(**vals)


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """Guided logits u + s (c - u); `scale` a float or a tensor broadcasting against the logits."""
    return uncond + (cond - uncond) * scale


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, params: SamplingParams, token_index, n_tokens: int,
                  extra: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CFG at the scale the schedule gives each token index (an int, or an integer tensor over the
    leading dims of the logits); tokens outside LlamaGen's cfg_interval keep the conditional logits.
    `extra` (shaped like cond) is a further guidance term added where guidance applies (GridAR's
    3-way CFG), so the interval rules it too. `params` may be RowParams (per image of the leading dim).

    The one guidance rule: every method (ar and the speculative ones per token, ARPG per parallel
    step at the index of the step's last token, VAR per scale, GridAR's 3-way) guides through it."""
    if isinstance(params, RowParams):
        return per_group(params, lambda p, c, u, t, x: guided_logits(c, u, p, t, n_tokens, x), cond, uncond,
                         token_index, extra)
    scale = cfg_scales(params, token_index, n_tokens)
    if isinstance(token_index, int):
        if not params.cfg_active(token_index):
            return cond
        guided = cfg_combine(cond, uncond, scale)
        return guided if extra is None else guided + extra
    pad = (1,) * (cond.dim() - token_index.dim())
    if isinstance(scale, torch.Tensor):
        scale = scale.to(cond.device).view(*scale.shape, *pad)
    guided = cfg_combine(cond, uncond, scale)
    if extra is not None:
        guided = guided + extra
    if params.cfg_interval < 0:
        return guided
    active = token_index <= params.cfg_interval + 1
    return torch.where(active.view(*active.shape, *pad), guided, cond)


def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value along the last axis, keeping it: [..., 1]. On the CPU a partial
    partition (numpy) finds it about 8x faster than torch.topk for LlamaGen's k = 1000 of 16384."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        v = x.shape[-1]
        return torch.from_numpy(np.partition(x.detach().numpy(), v - k, axis=-1)[..., v - k:v - k + 1])
    return torch.topk(x, k, dim=-1).values[..., -1:]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p filtering over the last axis; removed entries become -inf (a new tensor)."""
    out = logits.clone()
    v = out.shape[-1]
    if top_k > 0 and top_k < v:
        kth = kth_largest(out, top_k)
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        out = out.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return out


def filter_rows(logits: torch.Tensor, params) -> torch.Tensor:
    """filter_logits with each image's top-k and top-p (params: SamplingParams or RowParams)."""
    return per_group(params, lambda p, x: filter_logits(x, p.top_k, p.top_p), logits)


def probs_from_logits(logits: torch.Tensor, params: SamplingParams, step=None) -> torch.Tensor:
    """Target distribution p over the vocabulary (fp32) after temperature and filtering.

    With temperature 0 this is the one-hot argmax distribution, so acceptance rules stay exact.
    Filtering follows temperature (LlamaGen's order) unless `params.filter_first` (VAR's and CoDe's
    helper: top-k/top-p on the untempered logits, then divide by the temperature). With per-step
    `params.temperatures`, `step` (an int, or an integer tensor over the leading dims of the logits,
    e.g. the scale index) picks each row's temperature. `params` may be RowParams (per image of the
    leading dim).
    """
    if isinstance(params, RowParams):
        return per_group(params, lambda p, x, st: probs_from_logits(x, p, st), logits, step)
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    temp = params.temperature
    if params.temperatures:
        if step is None:
            raise ArexportError("per-step temperatures need the step each row samples (only var and code sample by scale)")
        t = torch.tensor(params.temperatures, dtype=torch.float32, device=logits.device)
        t = t[torch.as_tensor(step, device=logits.device)]
        temp = t.view(*t.shape, *(1,) * (logits.dim() - t.dim()))
    filtering = params.top_k > 0 or params.top_p < 1.0
    if params.entropy_temperature:
        if filtering:
            logits = filter_logits(logits, params.top_k, params.top_p)
        return torch.softmax(logits / (temp * entropy_temperature(logits)), dim=-1)
    if filtering and params.filter_first:
        logits = filter_logits(logits, params.top_k, params.top_p)
    if isinstance(temp, torch.Tensor) or temp != 1.0:
        logits = logits / temp
    if filtering and not params.filter_first:
        logits = filter_logits(logits, params.top_k, params.top_p)
    return torch.softmax(logits, dim=-1)


ENTROPY_TEMPERATURE = (2.5, 3.0, 0.6)  # a, b, c of a exp(-H / b) + c (ARsample's LlamaGen sampler)


def entropy_temperature(logits: torch.Tensor) -> torch.Tensor:
    """Entropy-aware temperature factor [..., 1] of (top-k/top-p filtered) logits [..., V]: with H the
    entropy in nats of softmax(logits) (each term p log(p + 1e-12), so filtered tokens add nothing),
    2.5 exp(-H / 3) + 0.6 — confident positions (low H) are sampled hotter, up to 3.1x, uncertain ones
    cooler, down to 0.6x. The sampler's temperature multiplies it; filtering comes first."""
    a, b, c = ENTROPY_TEMPERATURE
    p = torch.softmax(logits.float(), dim=-1)
    h = -(p * torch.log(p + 1e-12)).sum(-1, keepdim=True)
    return a * torch.exp(-h / b) + c


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [..., V] (rows need not be normalised), u [...] in [0,1) -> ids [...]."""
    cdf = torch.cumsum(probs, -1, dtype=torch.float64)
    total = cdf[..., -1:]
    # the first index whose cdf exceeds u * total has mass; u * total can round up to total, so the
    # target stays just below it (then the token that reached the total). total * (1 - 2**-53) is
    # the largest double below total (nextafter towards 0) for every normal total, in one op; a
    # total of probabilities from float32 is never subnormal. No host synchronisation.
    target = torch.minimum(u.double().unsqueeze(-1) * total, total * (1.0 - 2.0**-53))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def sample_from_probs_host(probs: np.ndarray, u) -> np.ndarray:
    """`sample_from_probs` on host arrays, probs [..., V] >= 0 and u [...] (or a float) -> ids [...]: the same
    float64 cumulative sum (widened first, then summed in order, as torch's CPU scan does), the same target
    just below the total, and its right-sided search as a count of cdf entries <= target (the cdf never
    decreases), so the same ids. For the CPU host paths (SJD's row verification, EAGLE's tree levels): a small
    row costs ~1 us per numpy op against ~3-5 us per torch op."""
    cdf = np.asarray(probs, dtype=np.float64).cumsum(-1)  # no copy for rows already float64
    total = cdf[..., -1:]
    target = np.minimum(np.asarray(u, dtype=np.float64)[..., None] * total, total * (1.0 - 2.0**-53))
    return np.minimum((cdf <= target).sum(-1), probs.shape[-1] - 1)


def sample_logits(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor) -> torch.Tensor:
    """Sample token ids from logits [..., V] with uniforms u [...]; greedy when temperature is 0."""
    if isinstance(params, RowParams):
        return per_group(params, lambda p, x, v: sample_logits(x, p, v), logits, u)
    if params.greedy:
        return logits.argmax(-1)
    return sample_from_probs(probs_from_logits(logits, params), u)
