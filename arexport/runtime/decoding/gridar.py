"""`gridar` and `best-of-n`: test-time scaling over N partial candidates per condition.

GridAR generates N candidates (a multiple of 4) for every condition as one batch with raster AR.
At checkpoints (a quarter and half of the grid rows) it decodes each partial canvas — the visible
rows repeated to fill the grid, then cropped back for the verifier — asks a verifier which
candidates are feasible, and replaces the infeasible ones by copies of feasible ones (round robin,
cache rows included; a copy gets a fresh random stream so it diverges from its source). If none is
feasible the group is kept as is. At the end a scorer picks one image per condition.
`best-of-n` is the same code with no checkpoints, so the costs compare exactly.

Text-conditional hooks: `reformulate(partial, conditions) -> Conditions` may rewrite the caption
features at a checkpoint; then `w3 > 0` guides with the 3-way CFG
u + (w3 + 1)(c - u) + w3 * perp(r - u), where r are the logits under the reformulated caption and
perp removes the component along (c - u). The reformulated rows keep their own cache, prefilled
with the new caption and fed the tokens so far.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from arexport.errors import ArexportError
from arexport.runtime.decoding.ar import ar_advance, ar_start
from arexport.runtime.decoding.base import CFGRows, DecodeResult, Method, register
from arexport.runtime.engine import Conditions
from arexport.runtime.rng import RowRNG, derive_seeds
from arexport.runtime.verifiers import BUILTIN_SCORERS, BUILTIN_VERIFIERS, PartialCanvas, resolve


def three_way_cfg(c: torch.Tensor, u: torch.Tensor, r: torch.Tensor, w: float) -> torch.Tensor:
    """u + (w + 1)(c - u) + w * perp(r - u), perp taken against (c - u) over the vocabulary axis."""
    d = c - u
    e = r - u
    coef = (e * d).sum(-1, keepdim=True) / (d * d).sum(-1, keepdim=True).clamp(min=1e-12)
    return u + (w + 1.0) * d + w * (e - coef * d)


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


@register("gridar")
class GridAR(Method):
    """GridAR test-time scaling (see module docstring)."""

    def __init__(self, candidates: int = 4, verifier="auto", scorer="auto", checkpoints=(0.25, 0.5),
                 reformulate: Optional[Callable] = None, w3: float = 0.0, multiple_of: int = 4):
        if candidates < 1 or candidates % multiple_of:
            raise ArexportError(f"gridar candidates must be a positive multiple of {multiple_of}, got {candidates}")
        if isinstance(checkpoints, str):
            checkpoints = tuple(float(x) for x in checkpoints.split("/") if x)
        if any(not 0 < f < 1 for f in checkpoints):
            raise ArexportError(f"gridar checkpoints must be fractions in (0, 1), got {checkpoints}")
        self.n = candidates
        self.verifier_spec, self.scorer_spec = verifier, scorer
        self.checkpoints = tuple(sorted(checkpoints))
        self.reformulate, self.w3 = reformulate, w3

    def generate(self, engine, conds, params, rng, progress=None, draft=None):
        spec = engine.spec
        if spec.family == "arpg":
            raise ArexportError("gridar runs raster AR models; ARPG models decode with --method arpg")
        verifier = resolve(self.verifier_spec, BUILTIN_VERIFIERS, "verifier", spec.image.kind) if self.checkpoints else None
        scorer = resolve(self.scorer_spec, BUILTIN_SCORERS, "scorer", spec.image.kind)
        b, n, g = len(conds), self.n, spec.grid_size
        group = torch.arange(b).repeat_interleave(n)
        cand_conds = conds.select(group.to(conds.classes.device if conds.classes is not None else conds.embeds.device))
        # candidate c of image i: a stream derived from image i's seed, so it matches ar under those seeds
        cand_rng = RowRNG(derive_seeds(rng.seeds.repeat_interleave(n), torch.arange(n, device=rng.seeds.device).repeat(b)))
        cfg = CFGRows(params, b * n)
        st = ar_start(engine, cand_conds, cfg)
        side = _Reformulated(engine, cfg, params, self.w3) if self.reformulate is not None else None
        stats = {"candidates": n, "verifier_calls": 0, "replaced": 0, "checkpoint_feasible": []}
        for i, frac in enumerate(self.checkpoints):
            until = max(1, int(round(frac * g))) * g
            ar_advance(engine, st, until, cfg, params, cand_rng, progress, *side.hooks() if side else (None, None))
            partial = self._partial(engine, st.tokens[:, :until], until // g, cand_conds)
            feasible = verifier(partial).to(torch.bool).cpu()
            stats["verifier_calls"] += 1
            stats["checkpoint_feasible"].append(float(feasible.float().mean()))
            plan = replacement_plan(feasible, n)
            moved = plan != torch.arange(b * n)
            stats["replaced"] += int(moved.sum())
            if bool(moved.any()):
                self._copy_rows(st, cfg, plan.to(engine.device), cand_rng, moved.to(cand_rng.seeds.device), salt=1000 + i)
                if side is not None:
                    side.copy_rows(cfg, plan.to(engine.device))
            if side is not None and spec.model_type == "t2i":
                side.refresh(self.reformulate(partial, cand_conds), st)
        ar_advance(engine, st, spec.n_tokens, cfg, params, cand_rng, progress, *side.hooks() if side else (None, None))
        images = engine.decode_images(st.tokens)
        scores = scorer(images, cand_conds).float().cpu().view(b, n)
        best = scores.argmax(1)
        pick = (torch.arange(b) * n + best).to(engine.device)
        return DecodeResult(st.tokens[pick], {
            "forwards_per_row": [spec.n_tokens] * b, "candidate_forwards_per_row": [n * spec.n_tokens] * b,
            "gridar_replaced": stats["replaced"],
            "gridar_verifier_calls": stats["verifier_calls"],
            "gridar_checkpoint_feasible": stats["checkpoint_feasible"],
            "gridar_best_scores": scores.max(1).values.tolist()},
            extras={"candidate_tokens": st.tokens, "candidate_scores": scores, "best": best})

    def _partial(self, engine, tokens: torch.Tensor, rows: int, conds: Conditions) -> PartialCanvas:
        g = engine.spec.grid_size
        reps = -(-g // rows)
        canvas_tokens = tokens.view(-1, rows, g).repeat(1, reps, 1)[:, :g].reshape(-1, g * g)
        canvas = engine.decode_images(canvas_tokens)
        px = canvas.shape[1] * rows // g
        return PartialCanvas(canvas, canvas[:, :px], tokens, rows / g, conds)

    @staticmethod
    def _copy_rows(st, cfg: CFGRows, plan: torch.Tensor, rng: RowRNG, moved: torch.Tensor, salt: int) -> None:
        rows = torch.cat([plan, plan + len(plan)]) if cfg.double else plan  # [cond; uncond] rows move together
        st.cache.select_rows(rows)
        st.logits = st.logits.index_select(0, rows)
        st.tokens = st.tokens.index_select(0, plan)
        rng.select_rows(plan)
        rng.reseed(moved, salt)


@register("best-of-n")
class BestOfN(GridAR):
    """N independent candidates per condition, the scorer picks one: GridAR without checkpoints."""

    def __init__(self, candidates: int = 4, scorer="auto", verifier=None):
        super().__init__(candidates=candidates, verifier=None, scorer=scorer, checkpoints=(), multiple_of=1)


class _Reformulated:
    """Reformulated-caption rows for the 3-way CFG: their own cache, stepped with the main rows."""

    def __init__(self, engine, cfg: CFGRows, params, w3: float):
        if engine.spec.model_type != "t2i":
            raise ArexportError("prompt reformulation and 3-way CFG apply to text-conditional models")
        self.engine, self.cfg, self.params, self.w3 = engine, cfg, params, w3
        self.cache, self.logits = None, None

    def refresh(self, conds: Conditions, st) -> None:
        """Prefill the reformulated captions and feed the tokens generated so far."""
        e = self.engine
        b = len(conds)
        self.cache = e.allocate(b)
        logits = e.prefill(self.cache, conds.to(e.device))
        done = 0
        while done < st.t:
            c = min(e.max_q, st.t - done)
            w = self.cache.length.clone()
            pos = (done + torch.arange(c, device=e.device)).expand(b, c)
            logits = e.step(self.cache, st.tokens[:, done:done + c], pos, w, self.cache.causal_mask(w, c))[:, -1]
            self.cache.length += c
            done += c
        self.logits = logits

    def copy_rows(self, cfg, plan) -> None:
        if self.cache is not None:
            self.cache.select_rows(plan)
            self.logits = self.logits.index_select(0, plan)

    def hooks(self):
        return self.guide, self.on_token

    def on_token(self, tok: torch.Tensor, t: int) -> None:
        """Feed the sampled token to the reformulated rows (keeps them in lockstep)."""
        if self.cache is None:
            return
        w = self.cache.length.clone()
        feed = tok.view(-1, 1)
        self.logits = self.engine.step(self.cache, feed, torch.full_like(feed, t), w, self.cache.causal_mask(w, 1))[:, 0]
        self.cache.length += 1

    def guide(self, logits: torch.Tensor, t: int) -> torch.Tensor:
        """3-way CFG when reformulated rows exist, standard CFG otherwise."""
        if self.logits is None or not self.cfg.double:
            return self.cfg.guide(logits, self.params.cfg_active(t))
        c, u = logits.chunk(2)
        return three_way_cfg(c, u, self.logits, self.w3) if self.w3 > 0 else self.cfg.guide(logits, True)
