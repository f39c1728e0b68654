"""What latency-aware speculation believes a step costs: a fixed model of the engines, or a latency
profile the user passed, never a clock.

`sd` (and `lantern` / `vvs` on it) chooses per image how many drafts to verify and `sjd` per image
whether to verify its window or one token (runtime/speculative.py: DraftLength, WindowArms). The
acceptance rules are exact for any choice, so it never changes the output distribution, but it
does change which tokens a seed gives. For "same seed, same options, same engine: same tokens"
whatever the timing, the load, the batch or the machine, a choice reads only the image's own
acceptance history and the prices below, which are fixed before decoding starts:

* default, the model: units of one target decode step (one query over one image's rows). A target
  step with q queries costs 1 + KAPPA (q - 1); a draft step costs `draft_ratio` of the target's
  (from the two specs); the runtime's own work per speculative round or step (drawing the drafts,
  guidance, acceptance over the block, bookkeeping) costs HOST. The numbers are middle values of
  what was measured (docs/benchmarks.md, issues 38 and 38-II): a 16-query step cost 1.2-1.5 decode
  steps for one demo image on a CPU, 2.7 for 16 rows, 3.2 for GPT-B on a CPU and about 1 on a GPU;
  an sd round on the demo (torch, 1 thread, gamma 8) took 11.5 ms of which its engine steps were
  6.7 ms, a decode step 1.2 ms: about 4 decode steps of the runtime's own work per round. (HOST = 1,
  one plain decode step's host work, made sd draft 2-3 tokens a round: 26 target forwards per demo
  image where timing had chosen 15.5.)
* `--latency-profile FILE` (`Generator.load(latency_profile=...)`): the curves an `arexport profile
  --json` run measured, in seconds, with HOST priced at that curve's c(1). The tokens then depend on
  the file's numbers: the same file gives the same tokens on any machine, a profile measured again
  gives other tokens (of the same distribution). A profile without a needed curve is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from arexport.errors import ArexportError

KAPPA = 1.0 / 16  # an extra query in a verify block, in decode steps
HOST = 4.0  # the runtime's own work per speculative round (sd) or step (sjd), in decode steps
SPECULATION_Q = 16  # the longest block a default choice verifies (sjd's window; sd's is 9): what a profile measures
DRAFT_Q = 2  # a draft round's longest step (its catch-up of the two newest tokens)
LATENCY_AWARE = ("sd", "sjd", "lantern", "vvs")  # methods whose defaults read these prices


@dataclass(frozen=True)
class StepPrices:
    """target: float64 [max_q], a target step with q queries at index q - 1; draft: float64 [DRAFT_Q]
    for the draft engine (None without one); host: the runtime's work per step; all in one unit
    (decode steps for the model, seconds for a profile). source: "model" or "profile"."""

    target: torch.Tensor
    draft: Optional[torch.Tensor]
    host: float
    source: str


def prices(engine, rows: int, max_q: int, draft=None) -> StepPrices:
    """Prices for steps of 1 .. max_q queries over `rows` cache rows (one image's: 1, or 2 with CFG):
    the user's latency profile where one was loaded into the target engine, else the model."""
    if engine.profiled_latency:
        target = _profiled(engine, "target", rows, max_q)
        dcurve = None if draft is None else _profiled(draft, "draft", rows, DRAFT_Q)
        return StepPrices(target, dcurve, float(target[0]), "profile")
    q = torch.arange(max_q, dtype=torch.float64)
    target = 1.0 + KAPPA * q
    dcurve = None if draft is None else draft_ratio(engine.spec, draft.spec) * target[:DRAFT_Q].clone()
    return StepPrices(target, dcurve, HOST, "model")


def draft_ratio(target_spec, draft_spec) -> float:
    """A draft step's price over the target's, between the layer ratio (a small step is bound by
    per-layer latency: launches, synchronisation) and the step-weight ratio (a large one by reading
    its weights): their geometric mean, or the layer ratio when a spec does not record its weights.
    (The larger of the two, used before, priced every draft as if launch-bound and drafted shorter
    chains than the engines' timing chose.) Demo: layers 2/4, weights 0.108M/0.445M: 0.35."""
    ratio = draft_spec.n_layer / target_spec.n_layer
    tw, dw = (int(s.extra.get("step_weight_params") or 0) for s in (target_spec, draft_spec))
    if tw > 0 and dw > 0:
        ratio = math.sqrt(ratio * (dw / tw))
    return float(ratio)


def _profiled(engine, who: str, rows: int, q: int) -> torch.Tensor:
    """The first q points of a loaded curve over `rows` rows that reaches q queries."""
    fits = sorted(m for r, m in engine.profiled_latency if r == rows and m >= q)
    if not fits:
        have = ", ".join(f"{r} rows up to {m}" for r, m in sorted(engine.profiled_latency)) or "none"
        raise ArexportError(f"the latency profile has no {who}-engine curve over {rows} rows up to {q} queries (it has: "
                            f"{have}); profile this method with the same guidance, or leave out --latency-profile")
    return engine.profiled_latency[(rows, fits[0])][:q].to(torch.float64)


def measure_for_profile(engine, draft, rows: int) -> None:
    """Time the curves `prices` reads from a profile (`arexport profile` records them): the target
    over `rows` rows up to SPECULATION_Q queries (or the engine's largest block), the draft up to
    DRAFT_Q. Timing only: nothing decoding reads comes from this."""
    engine.latency_curve(rows, min(SPECULATION_Q, engine.max_q, engine.spec.n_tokens))
    if draft is not None:
        draft.latency_curve(rows, min(DRAFT_Q, draft.max_q))
