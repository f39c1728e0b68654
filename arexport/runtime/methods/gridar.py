"""`gridar` and `best-of-n`: test-time scaling over N partial candidates per image.

GridAR generates N candidates (a multiple of 4) for every image with raster AR, in lockstep. At
checkpoints (a quarter and half of the tokens, the official `total // 4` and `total // 2` of
JoonHyung-Park/GridAR `GridAR-Janus-Pro/generator/janus_generator.py` lines 196-238; `split=rows`
rounds them to whole grid rows, which differs on grids not divisible by 4) it decodes each partial
canvas — the generated prefix repeated to fill the grid (the official pad "repeat", lines 22-41),
then its top fraction cropped for the verifier — asks a verifier which
candidates are feasible, and replaces the infeasible ones by copies of feasible ones of the same
group of `group` candidates (4, the official `is_grouped_by_4`; `group=N` pools all N), round robin,
cache rows included; a copy gets a fresh random stream so it diverges from its source. A group with
no feasible candidate keeps its candidates. At the end a scorer picks one image per condition.
`best-of-n` is the same decoder with no checkpoints, so the costs compare exactly.

Text-conditional hooks: `reformulate(partial, conditions) -> Conditions` may rewrite the caption
features at a checkpoint, from the partial canvases *after* replacement (the selected candidates,
as the official loop refines from the selected images); then the 3-way CFG guides
u + s (c - u) + w3 * perp(r - u), where r are the logits under the reformulated caption, perp removes
the component along (c - u), s is the sampler's guidance scale and w3 defaults to s - 1: the
official `cfg_decode_3_way` is u + (w + 1)(c - u) + w perp(r - u) with one guidance weight w, in
Janus-Pro's convention where our s is w + 1 (`decode.py` lines 7-32): the official default
`cfg_scale: 5.0` (`configs/evaluate_gridar.yaml` line 10) is `--cfg-scale 6` here. `w3=0` turns the
third term off; that is not the official ablation without 3-way CFG, which conditions on the
reformulated caption alone (`evaluate_gridar.py` lines 281-288, 340-347): `guidance=replace`
guides u + s (r - u). The reformulated rows keep their own cache, prefilled with the new caption
and fed the tokens so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from arexport.errors import ArexportError
from arexport.families import Conditions
from arexport.runtime.methods.ar import ARDecoder
from arexport.runtime.methods.base import Method, Options, RowStats, option, register
from arexport.runtime.rng import derive_seeds
from arexport.runtime.verifiers import BUILTIN_SCORERS, BUILTIN_VERIFIERS, PartialCanvas, call_hook, resolve


def orthogonal_part(c: torch.Tensor, u: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """perp(r - u): the part of (r - u) orthogonal to (c - u) over the vocabulary axis."""
    d = c - u
    e = r - u
    coef = (e * d).sum(-1, keepdim=True) / (d * d).sum(-1, keepdim=True).clamp(min=1e-12)
    return e - coef * d


def replacement_plan(feasible: torch.Tensor, n: int) -> torch.Tensor:
    """[B*N] source row for every candidate row: infeasible rows copy feasible ones of the same group
    round robin; a group with no feasible row keeps all its rows."""
    rows = torch.arange(feasible.numel())
    plan = rows.clone()
    for g in range(feasible.numel() // n):
        f = feasible[g * n:(g + 1) * n].cpu()
        good = torch.nonzero(f).flatten()
        if len(good) == 0 or len(good) == n:
            continue
        bad = torch.nonzero(~f).flatten()
        for i, r in enumerate(bad.tolist()):
            plan[g * n + r] = g * n + int(good[i % len(good)])
    return plan


@dataclass(frozen=True)
class GridAROptions(Options):
    candidates: int = option(4, "candidates per condition (gridar: a multiple of 4)", flag="--candidates")
    verifier: Any = option("auto", "verifier of partial candidates: digits, accept-all, or module:callable (CLI only)",
                           flag="--verifier")
    scorer: Any = option("auto", "final scorer: digits, or module:callable (CLI only)", flag="--scorer")
    checkpoints: Any = option((0.25, 0.5), "fractions of the image where candidates are verified (a/b/...)")
    split: str = option("tokens", "where a checkpoint falls: tokens (floor(fraction x tokens), the official total // 4 "
                        "and // 2) or rows (whole grid rows, round(fraction x rows)); they differ on grids not "
                        "divisible by 4", choices=("tokens", "rows"))
    group: int = option(4, "candidates replaced within groups of this size (4: the official is_grouped_by_4; N: all)",
                        flag="--group")
    reformulate: Any = option(None, "t2i: module:callable (CLI) or callable (partial, conditions) -> new prompts (a list "
                              "of strings, one per candidate) or Conditions, rewriting them from the partial canvases",
                              flag="--reformulate")
    guidance: str = option("3way", "t2i, after a reformulation: 3way (the official default) or replace (guide with the "
                           "reformulated caption alone, u + s (r - u): the official ablation without 3-way CFG)",
                           choices=("3way", "replace"))
    w3: Optional[float] = option(None, "t2i: weight of the reformulated caption in 3-way CFG (default cfg_scale - 1, "
                                 "the official single guidance weight; 0 = off)")
    multiple_of: int = 4

    def validate(self):
        if self.candidates < 1 or self.candidates % self.multiple_of:
            raise ArexportError(f"{'gridar' if self.multiple_of == 4 else 'best-of-n'} candidates must be a positive "
                                f"multiple of {self.multiple_of}, got {self.candidates}")
        if self.group < 1 or self.candidates % self.group:
            raise ArexportError(f"gridar group must divide the {self.candidates} candidates, got {self.group}")
        if self.w3 is not None and not (math.isfinite(self.w3) and self.w3 >= 0):
            raise ArexportError(f"gridar w3 must be a finite number >= 0, got {self.w3}")
        cps = self.checkpoints
        if isinstance(cps, str):
            try:
                cps = tuple(float(x) for x in cps.split("/") if x)
            except ValueError:
                raise ArexportError(f"gridar checkpoints must be fractions like 0.25/0.5, got {self.checkpoints!r}") from None
        if any(not 0 < f < 1 for f in cps):
            raise ArexportError(f"gridar checkpoints must be fractions in (0, 1), got {cps}")
        object.__setattr__(self, "checkpoints", tuple(sorted(cps)))
        return self


@dataclass(frozen=True)
class BestOfNOptions(Options):
    candidates: int = option(4, "candidates per condition", flag="--candidates")
    scorer: Any = option("auto", "final scorer: digits, or module:callable (CLI only)", flag="--scorer")

    def validate(self):
        if self.candidates < 1:
            raise ArexportError(f"best-of-n candidates must be >= 1, got {self.candidates}")
        return self


@dataclass
class GridARStats(RowStats):
    """An image's GridAR / best-of-N statistics."""

    candidates: int = 1  # candidates generated for it
    replaced: int = 0  # candidates replaced at checkpoints
    checkpoint_feasible: list[float] = field(default_factory=list)  # feasible fraction per checkpoint
    best_score: Optional[float] = None  # the chosen candidate's score

    @classmethod
    def run_fields(cls, rows, events, forwards_per_image):
        return {"candidate_forwards_per_image": float(np.mean([r.forwards * r.candidates for r in rows])) if rows else 0.0,
                "gridar_replaced": sum(r.replaced for r in rows),
                "gridar_verifier_calls": int(events.get("verifier_calls", 0)),
                "gridar_checkpoint_feasible": [f for r in rows for f in r.checkpoint_feasible],
                "gridar_best_scores": [float(r.best_score) for r in rows if r.best_score is not None]}

    @classmethod
    def summary(cls, stats):
        return (f"{stats['candidate_forwards_per_image']:.1f} candidate forwards per image "
                f"({stats['target_forwards_per_image']:.1f} batched steps over its candidates)")


class GridARDecoder(ARDecoder):
    derive_streams = True
    row_stats = GridARStats

    def new_stats(self) -> GridARStats:
        return GridARStats(candidates=self.slots.streams)

    def __init__(self, ctx, capacity, candidates, checkpoints, verifier, scorer, reformulate=None, w3=None, group=None,
                 guidance="3way", split="tokens"):
        super().__init__(ctx, capacity, candidates)
        self.group = group or candidates
        kind = self.spec.image.kind
        self.checkpoints = checkpoints
        g, n = self.spec.grid_size, self.spec.n_tokens  # token index of each checkpoint, then a sentinel
        if split == "tokens":
            at = [max(1, int(c * n)) for c in checkpoints]
        else:
            at = [max(1, int(round(c * g))) * g for c in checkpoints]
        self.until = torch.tensor(at + [-1], device=self.slots.device)
        self.verifier = resolve(verifier, BUILTIN_VERIFIERS, "verifier", kind) if checkpoints else None
        self.scorer = resolve(scorer, BUILTIN_SCORERS, "scorer", kind)
        self.passed = self.slots.image_tensor(())  # checkpoints done
        self.image_conds = self.slots.image_list()  # each image's condition (the verifier gets them)
        if w3 is None:  # the 3-way weight follows the batch's guidance scale, so the batch shares it
            w3 = max(0.0, ctx.params.cfg_scale - 1.0)
            self.batch_sampling_keys = ("cfg_scale",) if reformulate is not None else ()
        if reformulate is not None and not callable(reformulate):
            reformulate = resolve(reformulate, {}, "reformulate", kind)
        self.side = _Reformulated(self, reformulate, w3, guidance) if reformulate is not None else None

    def start(self, a, b, conds):
        super().start(a, b, conds)
        for i in range(a, b):
            self.image_conds[i] = conds.select(slice(i - a, i - a + 1))
        if self.side is not None:
            self.side.reset(a, b)

    def guide(self, logits, token_index, params):
        return self.side.guide(logits, token_index, params) if self.side is not None else self.cfg.guide(logits, token_index, params)

    def after(self):
        super().after()
        if self.side is not None:
            self.side.feed()
        n = self.slots.n
        due = self.slots.where(self.t[:n] == self.until[self.passed[:n]])
        if due:
            self._checkpoint(due)

    def _checkpoint(self, images: list[int]) -> None:
        """Verify the partial candidates of `images` (one verifier call) and replace infeasible ones."""
        N, n, s = self.N, self.spec.n_tokens, self.slots
        until = int(self.t[images[0]])
        tokens = self.tokens[images, :, :until].reshape(len(images) * N, until)
        conds = Conditions.cat([self.image_conds[i] for i in images]).repeat_interleave(N)
        # the generated prefix tiled over the grid (the official pad "repeat"; whole rows when until is)
        canvas = self.engine.decode_images(tokens.repeat(1, -(-n // until))[:, :n])
        px = canvas.shape[1] * until // n  # the visible top: image_size // 4 at a quarter, as officially
        frac = until / n
        partial = PartialCanvas(canvas, canvas[:, :px], tokens, frac, conds)
        feasible = call_hook(self.verifier, "verifier", len(tokens), partial).to(torch.bool).cpu()
        self.events["verifier_calls"] += 1
        selected = torch.arange(len(tokens))  # which partial canvas each candidate holds after replacement
        for j, i in enumerate(images):
            f = feasible[j * N:(j + 1) * N]
            plan = replacement_plan(f, self.group)
            selected[j * N:(j + 1) * N] = j * N + plan
            moved = plan != torch.arange(N)
            st = s.stats[i]
            st.checkpoint_feasible.append(float(f.float().mean()))
            st.replaced += int(moved.sum())
            salt = 1000 + int(self.passed[i])
            if bool(moved.any()):
                self._copy_candidates(i, plan.to(s.device), moved.to(s.device), salt)
            self.passed[i] += 1
        if self.side is not None and self.spec.model_type == "t2i":
            chosen = PartialCanvas(canvas[selected], canvas[selected, :px], tokens[selected], frac, conds)
            new = self.side.reformulate(chosen, conds)
            if isinstance(new, (list, tuple)) and all(isinstance(p, str) for p in new):  # rewritten prompts
                new = self.engine.family.prompt_conditions(self.engine, list(new))
            if not isinstance(new, Conditions):
                raise ArexportError(f"reformulate must return prompts (a list of strings) or Conditions, got {type(new).__name__}")
            self.side.refresh(images, new)

    def _copy_candidates(self, i: int, plan: torch.Tensor, moved: torch.Tensor, salt: int) -> None:
        """Candidate c of image i becomes a copy of candidate plan[c] (cache rows, logits, tokens, stream)."""
        r = self.cfg.per_image
        base = i * self.N * r
        rows = base + (plan[:, None] * r + torch.arange(r, device=plan.device)).flatten()
        dst = torch.arange(base, base + self.N * r, device=plan.device)
        self.cache.copy_rows(dst, rows)
        self.logits[dst] = self.logits[rows]
        self.tokens[i] = self.tokens[i, plan]
        s = self.slots
        s.seeds[i], s.counters[i] = s.seeds[i, plan], s.counters[i, plan]
        s.seeds[i] = torch.where(moved, derive_seeds(s.seeds[i], salt), s.seeds[i])
        if self.side is not None:
            self.side.copy(i, plan)

    def finish(self, i):
        images = self.engine.decode_images(self.tokens[i])
        scores = call_hook(self.scorer, "scorer", self.N, images, self.image_conds[i].repeat_interleave(self.N)).double().cpu()  # float64: confident scores tie in float32
        best = int(scores.argmax())
        st = self.slots.stats[i]
        st.best_score = float(scores[best])
        return self.finished(i, self.tokens[i, best].clone(),
                             {"candidate_tokens": self.tokens[i].clone(), "candidate_scores": scores, "best": best})


class _Reformulated:
    """Reformulated-caption rows for the 3-way CFG: one row per candidate with its own cache, prefilled
    at a checkpoint with the rewritten caption and fed every token since, in lockstep with the main rows."""

    def __init__(self, dec: GridARDecoder, reformulate, w3: float, guidance: str = "3way"):
        if dec.spec.model_type != "t2i":
            raise ArexportError("prompt reformulation and 3-way CFG apply to text-conditional models")
        self.dec, self.reformulate, self.w3, self.guidance = dec, reformulate, w3, guidance
        s = dec.slots
        self.cache = s.cache(dec.engine.allocate(s.capacity * dec.N), rows_per_image=dec.N)
        self.on = s.image_tensor((), torch.bool)
        self.logits_view = s.image_tensor((dec.N, dec.spec.vocab_size), torch.float32)

    def reset(self, a, b):
        self.on[a:b] = False

    def refresh(self, images: list[int], conds: Conditions) -> None:
        """Prefill the reformulated captions of `images` and feed the tokens generated so far."""
        dec, e, N = self.dec, self.dec.engine, self.dec.N
        for j, i in enumerate(images):
            view = self.cache.view(i * N, (i + 1) * N)
            view.key_valid.fill_(True)
            logits = e.family.prefill(e, view, conds.select(slice(j * N, (j + 1) * N)).to(e.device))
            t = int(dec.t[i])
            done = 0
            while done < t:
                c = min(e.max_q, t - done)
                w = view.length.clone()
                pos = (done + torch.arange(c, device=e.device)).expand(N, c)
                logits = e.step(view, dec.tokens[i, :, done:done + c], pos, w, view.causal_mask(w, c))[:, -1]
                view.length += c
                done += c
            self.logits_view[i] = logits
            self.on[i] = True

    def copy(self, i: int, plan: torch.Tensor) -> None:
        if bool(self.on[i]):
            N = self.dec.N
            self.cache.copy_rows(torch.arange(i * N, (i + 1) * N, device=plan.device), i * N + plan)
            self.logits_view[i] = self.logits_view[i, plan]

    def feed(self) -> None:
        """Feed every active image's newest tokens to its reformulated rows."""
        dec, e, N = self.dec, self.dec.engine, self.dec.N
        for i in range(dec.slots.n):
            if not bool(self.on[i]):
                continue
            view = self.cache.view(i * N, (i + 1) * N)
            t = int(dec.t[i]) - 1
            w = view.length.clone()
            tok = dec.tokens[i, :, t:t + 1]
            self.logits_view[i] = e.step(view, tok, torch.full_like(tok, t), w, view.causal_mask(w, 1))[:, 0]
            view.length += 1

    def guide(self, logits: torch.Tensor, token_index, params) -> torch.Tensor:
        """3-way CFG (or, with guidance=replace, CFG with the reformulated caption as the condition)
        for images with reformulated rows, the decoder's CFG otherwise."""
        dec = self.dec
        if dec.cfg.per_image == 1 or (self.guidance == "3way" and self.w3 <= 0):
            return dec.cfg.guide(logits, token_index, params)
        n, N = dec.slots.n, dec.N
        on = self.on[:n].repeat_interleave(N)
        if not bool(on.any()):
            return dec.cfg.guide(logits, token_index, params)
        c, u = logits[0::2], logits[1::2]
        r = self.logits_view[:n].reshape(n * N, -1)
        if self.guidance == "replace":  # evaluate_gridar.py lines 281-288: the refined prompt is the condition
            return torch.where(on[:, None], dec.cfg.guide(torch.stack([r, u], 1).flatten(0, 1), token_index, params),
                               dec.cfg.guide(logits, token_index, params))
        # the third term joins the decoder's guidance, so cfg_interval stops it with the rest
        return dec.cfg.guide(logits, token_index, params, torch.where(on[:, None], self.w3 * orthogonal_part(c, u, r), 0.0))


@register("gridar")
class GridAR(Method):
    """GridAR test-time scaling (see module docstring)."""

    Options = GridAROptions
    decoder_class = GridARDecoder  # built by decoder() below; named for its statistics (GridARStats)
    help = "GridAR test-time scaling: N candidates, prune after 1/4 and 1/2 of the tokens with a verifier, pick with a scorer"

    def decoder(self, ctx, capacity):
        o = self.options
        return GridARDecoder(ctx, capacity, o.candidates, o.checkpoints, o.verifier, o.scorer, o.reformulate, o.w3, o.group,
                             o.guidance, o.split)


@register("best-of-n")
class BestOfN(Method):
    """N independent candidates per condition, the scorer picks one: GridAR without checkpoints."""

    Options = BestOfNOptions
    decoder_class = GridARDecoder  # built by decoder() below; named for its statistics (GridARStats)
    help = "N independent candidates, the scorer picks one (same code as gridar, no pruning)"

    def decoder(self, ctx, capacity):
        return GridARDecoder(ctx, capacity, self.options.candidates, (), None, self.options.scorer)
