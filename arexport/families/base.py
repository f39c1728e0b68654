"""Family adapters: the one place that says how a model family is driven at run time.

A family adapter states what its step graph is (its step kinds), how user input becomes a batch of
conditions, what the null (unconditional) condition is, how a condition is prefilled into the KV
cache, which decoding methods apply and its sampler defaults. The runtime, the exporter and the
CLI ask the adapter instead of branching on family names, so adding a family is one adapter
module (registered in `arexport.families`) next to its PyTorch reference model.

Adapters import no PyTorch model code: the engines they drive are duck-typed StepEngines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from arexport.errors import ArexportError


@dataclass
class Conditions:
    """A batch of conditions: class ids [B] (c2i), caption features [B,T,C] with mask [B,T] (t2i), or
    prompt token ids [B,T] with mask [B,T] (Janus); masks are left-padded."""

    classes: Optional[torch.Tensor] = None
    embeds: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    ids: Optional[torch.Tensor] = None

    def fields(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in (("classes", self.classes), ("embeds", self.embeds), ("mask", self.mask),
                                  ("ids", self.ids)) if v is not None}

    def __len__(self) -> int:
        return int(next(iter(self.fields().values())).shape[0])

    def _map(self, fn) -> "Conditions":
        return Conditions(**{k: fn(v) for k, v in self.fields().items()})

    def select(self, rows) -> "Conditions":
        """The given rows (slice or index tensor)."""
        return self._map(lambda t: t[rows])

    def repeat_interleave(self, n: int) -> "Conditions":
        """Every row n times in a row (candidates of GridAR)."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def to(self, device) -> "Conditions":
        return self._map(lambda t: t.to(device))

    def interleave(self, other: "Conditions") -> "Conditions":
        """Rows [self_0, other_0, self_1, other_1, ...] (CFG: a cond row, then its uncond row)."""
        return Conditions(**{k: torch.stack([v, getattr(other, k)], 1).flatten(0, 1) for k, v in self.fields().items()})

    @staticmethod
    def cat(parts: list["Conditions"]) -> "Conditions":
        """Rows of every part in order."""
        return Conditions(**{k: torch.cat([getattr(p, k) for p in parts]) for k in parts[0].fields()})


# Raster next-token families (LlamaGen, RAR, Janus) share their decoding methods and step kinds.
NEXT_TOKEN_METHODS = ("ar", "sjd", "sd", "lantern", "vvs", "gridar", "best-of-n", "zipar", "gsd")
NEXT_TOKEN_STEPS = ("token",)


class Family:
    """Base adapter; subclasses set the class attributes and override what differs."""

    name: str = "?"
    methods: tuple[str, ...] = ()  # decoding methods that apply to this family
    default_method: str = "ar"
    step_kinds: tuple[str, ...] = NEXT_TOKEN_STEPS  # step kinds (format.stepkinds) an engine of the family always has
    default_verify_len: Optional[int] = 16  # largest query length built by default (None: all tokens)
    prefill_len: int = 1  # inputs its prefill feeds through the step graph at once (the graph's q must reach it)

    def caption_prefill(self, spec) -> bool:
        """Whether the family prefills caption features through a prefill graph (text-conditional LlamaGen)."""
        return False

    def steps(self, spec) -> tuple[str, ...]:
        """The step kinds an engine of this model is built with by default (format.stepkinds names)."""
        return self.step_kinds + (("caption_prefill",) if self.caption_prefill(spec) else ())

    def scales(self, spec):
        """The scales (format.scales.Scales) of a next-scale family, whose VQVAE adds one scale at a time
        (next-scale input graphs, a latent decoder); None for token-grid families."""
        return None

    def token_layout(self, spec) -> str:
        """How its tokens are laid out, for people (inspect): the grid here, VAR's scales."""
        return f"{spec.grid_size}x{spec.grid_size}"

    def latent_channels(self, spec) -> int:
        """Channels of a next-scale family's VQVAE latents (its steps' features)."""
        raise ArexportError(f"{spec.name} ({self.name}) has no multi-scale latents")

    def exact_query_sizes(self, spec) -> tuple[int, ...]:
        """Query lengths its steps take so often that TensorRT gets a profile for each (VAR: its scales)."""
        return ()

    def default_query_len(self, spec) -> Optional[int]:
        """Largest step query length an engine is built with when --verify-len is not given (None: all
        tokens): `default_verify_len`, or more where the family's own method feeds more per forward on
        this model's grid (its TensorRT profiles then cover every feed of the default schedule)."""
        return self.default_verify_len

    def prefill_queries(self, spec) -> int:
        """Inputs the prefill feeds through the step graph at once (the exported q range must reach it)."""
        return self.prefill_len

    def cache_lookahead(self, max_q: int, spec=None) -> int:
        """Cache slots an engine needs past a whole image (condition + tokens) so that rows of one batch
        can step query lengths up to max_q side by side (the short rows pad into them); `spec` for
        families whose layout adds slots (RandAR's instruction tokens)."""
        return max_q - 1

    def sampling_defaults(self, spec) -> dict[str, Any]:
        """Sampler settings of the family's reference demo (used when a model records none)."""
        return {"cfg_scale": 4.0, "top_k": 0, "top_p": 1.0, "temperature": 1.0}

    def check_method(self, method: str, spec) -> None:
        if method not in self.methods:
            raise ArexportError(f"method {method} does not apply to {spec.name}: {self.name} models decode with "
                                f"--method {'|'.join(self.methods)}")

    # -- conditions -------------------------------------------------------------------------------
    def conditions(self, spec, classes=None, captions=None, caption_mask=None) -> Conditions:
        """Validate user input into a Conditions batch (class ids here; text families override)."""
        if captions is not None:
            raise ArexportError(f"model {spec.name} is class-conditional: give class ids, not caption embeddings")
        if classes is None or len(classes) == 0:
            raise ArexportError(f"model {spec.name} is class-conditional: give at least one class id")
        ids = torch.as_tensor(np.asarray(classes, dtype=np.int64))
        bad = ids[(ids < 0) | (ids >= spec.num_classes)]
        if bad.numel():
            raise ArexportError(f"class id {int(bad[0])} out of range [0, {spec.num_classes - 1}] for model {spec.name}")
        return Conditions(classes=ids)

    def prompt_conditions(self, engine, prompts) -> Conditions:
        """Prompts -> a Conditions batch (text-conditional families override)."""
        raise ArexportError(f"model {engine.spec.name} is class-conditional: give class ids, not prompts")

    def null_conditions(self, engine, conds: Conditions) -> Conditions:
        """Unconditional rows matching `conds` for classifier-free guidance (class models: the null class)."""
        return Conditions(classes=torch.full((len(conds),), engine.spec.null_class, dtype=torch.int64,
                                             device=conds.classes.device))

    def condition_tokens(self, spec, classes: torch.Tensor) -> torch.Tensor:
        """Class ids (null class included) -> token ids in the step graph's token space."""
        return classes.long() + spec.class_token_offset

    def prefill(self, engine, cache, conds: Conditions) -> torch.Tensor:
        """Write the condition at slots [0, cond_len) of `cache` and return the logits [B, V] of its last position."""
        raise ArexportError(f"{engine.spec.name} ({self.name}) has no prefill step")

    # -- verification inputs (arexport verify) -----------------------------------------------------
    def verify_conditions(self, spec, batch: int, g: torch.Generator) -> dict[str, np.ndarray]:
        """Random conditions of one verify case as numpy feeds (class models: ids, the null class included)."""
        return {"classes": torch.randint(0, spec.num_classes + 1, (batch,), generator=g).numpy()}

    def verify_feed_conditions(self, spec, feed: dict) -> Conditions:
        """The Conditions of a verify case's feeds (inverse of verify_conditions)."""
        return Conditions(classes=torch.from_numpy(feed["classes"]))

    def verify_request(self, spec, n: int, g: torch.Generator) -> dict[str, Any]:
        """Generator.generate inputs of verify's whole-image comparison (classes, captions or prompts)."""
        return {"classes": torch.randint(0, spec.num_classes, (n,), generator=g)}

    def check_draft(self, target_spec, draft_spec) -> None:
        """A draft model must share the target's tokenizer, grid and condition space."""
        if draft_spec.family != target_spec.family:
            raise ArexportError(f"draft {draft_spec.name} belongs to the {draft_spec.family} family and the target "
                                f"{target_spec.name} to {target_spec.family}: a draft must be of the target's family")
        for f in ("vocab_size", "n_tokens", "model_type", "num_classes", "cond_len", "caption_dim"):
            if getattr(target_spec, f) != getattr(draft_spec, f):
                raise ArexportError(f"draft {draft_spec.name} does not match target {target_spec.name}: "
                                    f"{f} {getattr(draft_spec, f)} != {getattr(target_spec, f)}")
