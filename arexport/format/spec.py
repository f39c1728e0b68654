"""ModelSpec: the shapes and ids every part (exporter, engine directory, runtime) agrees on.

It is plain data (JSON in the manifest), so the runtime can run an engine directory without
importing the PyTorch model code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def round_up(n: int, k: int) -> int:
    """Smallest multiple of k that is >= n."""
    return ((n + k - 1) // k) * k


@dataclass(frozen=True)
class ImageSpec:
    """How tokens become pixels: `vq16` (LlamaGen VQ-16 decoder) or `digits` (demo grey levels)."""

    kind: str
    grid_size: int
    image_size: int  # output pixels per side
    codebook_dim: int  # latent dimension of one codebook vector (8 for VQ-16, 1 for digits)


@dataclass(frozen=True)
class ModelSpec:
    """Static description of one exported/generating model."""

    name: str
    family: str  # a registered family adapter (arexport.families): "llamagen" | "arpg"
    model_type: str  # "c2i" | "t2i"
    vocab_size: int
    n_tokens: int  # image tokens per image (grid_size**2)
    grid_size: int
    cond_len: int  # condition tokens written at cache slots [0, cond_len)
    num_classes: int  # c2i: class ids 0..num_classes-1; num_classes is the null class
    caption_dim: int  # t2i: width of caption embeddings
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    dim: int
    n_cache_layers: int  # KV buffers per K and V (LlamaGen: n_layer; ARPG: n_layer/2 + 1)
    s_max: int  # static cache length (slots), a multiple of 8
    image: ImageSpec
    extra: dict = field(default_factory=dict)

    @property
    def null_class(self) -> int:
        """Class id used for the unconditional CFG row (c2i)."""
        return self.num_classes

    @property
    def class_token_offset(self) -> int:
        """Token id of class 0 in the step function's token space (LlamaGen: V; ARPG: V + 1)."""
        return int(self.extra.get("class_token_offset", self.vocab_size))

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelSpec":
        """Inverse of to_json; raises KeyError/TypeError on a malformed dict."""
        d = dict(d)
        d["image"] = ImageSpec(**d["image"])
        return cls(**d)

    def cache_shape(self, batch: int, slots: int | None = None) -> tuple[int, int, int, int]:
        """Shape of one K or V buffer: [B, H_kv, slots (default S_max), D]."""
        return (batch, self.n_kv_head, self.s_max if slots is None else slots, self.head_dim)

    @property
    def min_slots(self) -> int:
        """Slots one image needs: condition + tokens (the last token is never fed back)."""
        return self.cond_len + self.n_tokens


def s_max_for(cond_len: int, n_tokens: int, lookahead: int = 0) -> int:
    """Cache slots for a whole image (condition + tokens) plus `lookahead` slots past its end, rounded
    up to a multiple of 8. Lookahead lets rows of one batch step with different query lengths: a short
    row's padding positions land past its own committed slots and never overflow the buffer."""
    return round_up(cond_len + n_tokens + lookahead, 8)
