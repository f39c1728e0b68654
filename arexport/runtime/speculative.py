"""Shared pieces of speculative decoding: acceptance rules, chain verification, latent neighbours.

`verify_chain` is the whole accept/resample step of speculative sampling for a batch of chains:
draft tokens D[j] drawn from q_j are tested left to right against the target p_j, the first
rejected one is replaced by a draw from the rule's residual, and if every draft is accepted the
target's next distribution gives a bonus token. The acceptance rule decides how:

* `StandardRule` — lossless speculative sampling: accept with min(1, p(x)/q(x)), resample from
  norm(max(0, p - q)).
* `LanternRule` — LANTERN's relaxed acceptance (jadohu/LANTERN `models/ea_model_llamagen.py`
  `evaluate_posterior_v1`, the path `--static_tree` runs, lines 597-669 at commit 3a56e45): the
  target mass of x's nearest codebook neighbours (nearest first, L2 on the raw codebook rows) is
  pooled onto x while the pooled mass stays <= delta or, with lambda (LANTERN++), <= (lambda - 1) p(x).
  `official` (the default) accepts with min(1, p~(x)/q(x)); on rejection, when x's nearest neighbour
  alone is within the bound (even with zero mass), the proposal row q loses its mass on x's k + 1
  nearest neighbours, and the next token is drawn from norm(max(0, p - q)): those neighbours keep
  their target mass there. At temperature 0 it is the official greedy variant: x is kept iff it is
  the argmax of p with p(x) raised to p~(x) (p = softmax of the guided logits), and the next token
  is argmax p. `capped` credits at most delta * q(x) and zeroes x and the pooled neighbours in the
  residual: that keeps the output within total variation delta of the target for any draft
  distribution (see LanternRule). delta = 0 is StandardRule under either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from arexport.errors import ArexportError
from arexport.runtime.kv_cache import arange
from arexport.runtime.sampling import probs_from_logits, sample_from_probs, sample_from_probs_host


_TINY, _ONE, _ZERO = np.float32(1e-30), np.float32(1.0), np.float32(0.0)  # the host paths' float32 constants


class StandardRule:
    """Lossless speculative sampling."""

    batch_sampling_keys: tuple = ()  # sampling options the rule is built for, so one value per batch

    name = "standard"

    def target_probs(self, guided_logits: torch.Tensor, params) -> torch.Tensor:
        """The target distributions P verification compares drafts with (one-hot at temperature 0)."""
        return probs_from_logits(guided_logits, params)

    def bonus(self, p: torch.Tensor) -> torch.Tensor:
        """Distribution of the token after an accepted run (and of fresh drafts) given P's row p."""
        return p

    def accept_prob(self, p: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The acceptance probability of drafts x [...] drawn from rows q [..., V], target rows p [..., V]."""
        return self.acceptance(p, q.gather(-1, x[..., None])[..., 0], x)

    def acceptance(self, p: torch.Tensor, qx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`accept_prob` given only q(x) [...]: min(1, p(x) / q(x)) (no credit: the lossless rule)."""
        return _ratio(p.gather(-1, x[..., None])[..., 0], qx)

    def chain_acceptance(self, p: torch.Tensor, Q, x: torch.Tensor) -> torch.Tensor:
        """The acceptance probabilities [B, L] of drafts x [B, L] drawn from Q (Proposals) under targets
        p [B, L, V]. Rules that read q beyond q(x) (GSD's clusters: `Q.at`) override this."""
        return self.acceptance(p, Q.prob(x), x)

    def residual(self, p: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised distribution to resample from after x was rejected: [N, V]."""
        x = x[:, None]
        return _nonempty((p - q).clamp(min=0).scatter_(-1, x, 0.0), p.scatter(-1, x, 0.0), p)


def ratio_host(px: np.float32, qx: np.float32) -> np.float32:
    """`_ratio` on numpy float32 scalars: the same IEEE operations as on one-element tensors, without
    their per-op cost (the CPU host paths: SJD's row verification, EAGLE's tree walk)."""
    return min(px / max(qx, _TINY), _ONE)


def _ratio(px: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
    """min(1, px / qx). A real draft has qx > 0 (it was drawn from q); qx = 0 reads as 1 where
    px > 0 (p / q = inf) and 0 where px = 0."""
    return (px / qx.clamp(min=1e-30)).clamp(max=1.0)


def _nonempty(r: torch.Tensor, without: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The residual r, or where it has no mass p without the removed tokens, or else p itself.

    p == q up to rounding leaves no residual mass; rejection then had (near) zero probability and a
    draw from p without the removed tokens is as good as any."""
    r = torch.where(r.sum(-1, keepdim=True) <= 0, without, r)
    return torch.where(r.sum(-1, keepdim=True) <= 0, p, r)


LANTERN_RULES = ("official", "capped")


def check_lantern(k: int, delta: float, lam: Optional[float], rule: str) -> None:
    """LANTERN's parameters, checked in this one place (the lantern and vvs options and the rule
    itself call it): k neighbours >= 1, delta in [0, 1], lambda None or >= 1, a known rule."""
    if k < 1:
        raise ArexportError(f"lantern k must be >= 1, got {k}")
    if not 0 <= delta <= 1:
        raise ArexportError(f"lantern delta must be in [0, 1], got {delta}")
    if lam is not None and lam < 1:
        raise ArexportError(f"lantern lambda must be >= 1, got {lam}")
    if rule not in LANTERN_RULES:
        raise ArexportError(f"lantern rule must be one of {', '.join(LANTERN_RULES)}, got {rule!r}")


class LanternRule(StandardRule):
    """LANTERN relaxed acceptance over latent-space neighbourhoods.

    For draft x the pooled mass m(x) is the target mass of x's nearest codebook neighbours, taken
    nearest first while the running sum stays <= delta (or <= (lam - 1) p(x) with LANTERN++), and
    p~(x) = p(x) + m(x).

    * `official`: accept with min(1, p~(x)/q(x)). On rejection, if the nearest neighbour's running
      sum is within the bound (the official `indices != -1`, true even when its mass is 0), the
      proposal row q is zeroed at x's k + 1 nearest neighbours before the residual max(0, p - q) is
      formed, so those neighbours keep their target mass (LANTERN `ea_model_llamagen.py` lines
      645-661; x itself drops out because a rejected x has q(x) > p~(x) >= p(x)). With `greedy`
      (temperature 0) P holds softmax(guided logits), x is accepted iff it is the argmax of P with
      P(x) replaced by p~(x), and the next token is argmax P (the official greedy branch).
    * `capped`: the credit is min(m(x), delta * q(x)) and x and its pooled neighbours are zeroed in the
      residual. With one-hot drafts that is LANTERN's p~(x); in general it caps every proposal's
      acceptance gain at delta, which keeps the output distribution within total variation delta of
      the target (tests check this on enumerable cases). No relaxation at temperature 0.

    A residual without mass (p == q' up to rounding; a rejection then had zero probability) falls
    back to p without the rejected token (the official code falls back to the uniform distribution).
    """

    batch_sampling_keys = ("greedy",)  # its greedy variant is chosen when it is built

    name = "lantern"

    def __init__(self, neighbors: torch.Tensor, k: int = 1000, delta: float = 0.1, lam: Optional[float] = None,
                 rule: str = "official", greedy: bool = False):
        check_lantern(k, delta, lam, rule)
        self.table = neighbors[:, : min(k + 1, neighbors.shape[1])].long()  # k searched, k + 1 removed (official)
        self.k = min(k, neighbors.shape[1])
        self.delta, self.lam, self.rule = delta, lam, rule
        self.greedy = greedy and rule == "official"

    def target_probs(self, guided_logits, params):
        if self.greedy:
            return torch.softmax(guided_logits.float(), dim=-1)
        return probs_from_logits(guided_logits, params)

    def bonus(self, p):
        if self.greedy:
            return torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).to(p.dtype)
        return p

    def pooled(self, p: torch.Tensor, x: torch.Tensor):
        """m(x) [...] and the pooled-neighbour mask over x's k nearest [..., k] (a prefix, nearest first)."""
        nb = self.table.to(p.device)[x, : self.k]
        pn = p.gather(-1, nb)
        cum = pn.cumsum(-1)
        if self.lam is not None:
            limit = (self.lam - 1.0) * p.gather(-1, x[..., None])
        else:
            limit = torch.full_like(cum[..., :1], self.delta)
        take = cum <= limit  # a prefix, since cum is non-decreasing
        return (pn * take).sum(-1), take

    def credit(self, p: torch.Tensor, qx: torch.Tensor, x: torch.Tensor):
        """Extra target mass credited to draft x [...] with proposal mass q(x) = qx [...], and the
        [..., V] mask a rejection zeroes: in the proposal row (official) or in the residual (capped)."""
        m, take = self.pooled(p, x)
        table = self.table.to(p.device)[x]
        if self.rule == "capped":
            removed = torch.nn.functional.one_hot(x, p.shape[-1]).bool()
            removed.scatter_(-1, table[..., : self.k], take)  # neighbours never include x itself and never repeat
            return torch.minimum(m, self.delta * qx), removed
        removed = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
        removed.scatter_(-1, table, take[..., :1].expand_as(table))  # the first neighbour within the bound
        return m, removed

    def acceptance(self, p, qx, x):
        if not self.greedy:  # min(1, (p(x) + credit) / q(x))
            extra, _ = self.credit(p, qx, x)
            return _ratio(p.gather(-1, x[..., None])[..., 0] + extra, qx)
        m, _ = self.pooled(p, x)
        boosted = p.scatter_add(-1, x[..., None], m[..., None])
        return (boosted.argmax(-1) == x).to(p.dtype)

    def residual(self, p, q, x):
        if self.greedy:
            return self.bonus(p)
        _, removed = self.credit(p, q.gather(-1, x[..., None])[..., 0], x)
        if self.rule == "capped":
            return _nonempty((p - q).clamp(min=0).masked_fill(removed, 0.0), p.masked_fill(removed, 0.0), p)
        # official: the neighbours leave q, not p, so they keep their mass in max(0, p - q)
        return _nonempty((p - q.masked_fill(removed, 0.0)).clamp(min=0), p.scatter(-1, x[:, None], 0.0), p)


class DraftLength:
    """Latency-aware speculation: how many drafts each image verifies per round.

    An image whose drafts are each accepted with probability a (left to right, independently)
    commits E(d) = 1 + a + ... + a^d = (1 - a^(d+1)) / (1 - a) tokens in a round with d drafts. The
    round costs cost[d] (its engine steps) plus `host` (the runtime's own work), priced before
    decoding by runtime/step_cost.py: a fixed model of the engines, or the user's latency profile.
    Each image takes d in [low, min(high, cap)] maximising E(d) / (cost[d] + host), with a estimated
    from its own recent rounds: (accepted + 1) / (accepted + rejections + 2), counts decayed by
    `decay` per observed round. An image that stops accepting falls back to d = low (plain decoding
    when low is 0); after `explore` rounds without a verified draft it tries one (d = 1) again, so a
    wrong estimate cannot stick.

    No clock is read: d depends only on the prices and the image's own history, so an image's
    tokens do not depend on timing, load, the machine or what it is batched with (issue 38). The
    acceptance rules are exact for any d, so neither does the output distribution."""

    def __init__(self, slots, cost: torch.Tensor, low: int, high: int, host: Optional[float] = None,
                 decay: float = 0.8, explore: int = 8):
        self.cost = cost.to(slots.device, torch.float64)
        self.host = float(self.cost[0]) if host is None else float(host)
        self.low, self.high, self.decay, self.explore = low, high, decay, explore
        self.accepted = slots.image_tensor((), torch.float64)
        self.rejected = slots.image_tensor((), torch.float64)
        self.idle = slots.image_tensor(())  # rounds since the image last verified a draft
        self._d = torch.arange(high + 1, device=slots.device, dtype=torch.float64)

    def acceptance(self, n: int) -> torch.Tensor:
        """The estimated per-draft acceptance probability of images [0, n)."""
        a, r = self.accepted[:n], self.rejected[:n]
        return (a + 1.0) / (a + r + 2.0)

    def choose(self, n: int, cap: torch.Tensor) -> torch.Tensor:
        """Drafts per image [n] (int64), at most cap [n] (what is left to draft)."""
        alpha = self.acceptance(n)[:, None]
        expected = (1.0 - alpha ** (self._d + 1.0)) / (1.0 - alpha)
        d = (expected / (self.cost + self.host)).masked_fill(self._d < self.low, float("-inf")).argmax(1)
        d = torch.where((d == 0) & (self.idle[:n] >= self.explore), 1, d)
        return torch.minimum(d, cap.clamp(min=0))

    def observe(self, offered: torch.Tensor, accepted: torch.Tensor, active: torch.Tensor) -> None:
        """After a verify step: drafts offered [n] and accepted [n] per image, for the `active` [n] ones."""
        n = offered.shape[0]
        seen = active & (offered > 0)
        rejection = (accepted < offered).to(torch.float64)
        self.accepted[:n] = torch.where(seen, self.decay * self.accepted[:n] + accepted, self.accepted[:n])
        self.rejected[:n] = torch.where(seen, self.decay * self.rejected[:n] + rejection, self.rejected[:n])
        self.idle[:n] = torch.where(seen, 0, self.idle[:n] + active.long())


class WindowArms:
    """Latency-aware Jacobi windows (SJD): per image and step, speculate with the window or decode one
    token.

    A Jacobi window's drafts are not independent guesses: its tail is refined from step to step, so
    a window that runs long raises the acceptance of the next one, and shorter windows are not a
    cheaper version of the same bet (measured on the demo: 1.35, 1.73, 2.40 and 3.17 tokens per step
    at 2, 4, 8 and 16). Each image therefore chooses per step between two arms, the full window and
    L = 1, by tokens committed per unit of cost: tokens per step over the step's price (cost[L - 1]
    plus `host`, fixed before decoding by runtime/step_cost.py). L = 1 commits exactly one token per
    step, so only the window's yield is estimated: a running mean of the tokens the image commits per
    window step, counted only when its step before also ran the window (the first step after a switch
    finds its drafts cold) and the window was not cut short. The window runs first, until `trust`
    steps are behind its mean (an image's first steps, with random drafts, commit little, and one
    image's yields are spiky: 1, 1, 7, 1, 3, 15 on the demo; 8 steps, not 4, kept SJD from stopping
    on most demo images). While L = 1 wins, the window is re-measured `probe` steps in a row every
    `reprobe` steps, and those steps enter the mean, so a stale estimate cannot stick.

    No clock is read and every image decides from its own history, so an image's tokens do not
    depend on timing, load, the machine or what it is batched with (issue 38); the acceptance rules
    keep the output distribution exact whatever is chosen. The price of per-image choices: an image
    at L = 1 next to one at the window still waits for the window's step."""

    def __init__(self, slots, cost: torch.Tensor, window: int, host: float, reprobe: int = 16, probe: int = 3,
                 decay: float = 0.85, trust: int = 8):
        cost = cost.to(torch.float64)
        # the window wins where tokens / (c(L) + host) >= 1 / (c(1) + host)
        self.threshold = float((cost[window - 1] + host) / (cost[0] + host))
        self.window, self.reprobe, self.probe, self.decay, self.trust = window, reprobe, probe, decay, trust
        # per-image state on the host whatever the engine's device: the decoder reads the arms as host
        # ints anyway, and numpy on views of these tensors costs a fraction of torch's per-op overhead
        # on a few numbers (issue 35); float64 arithmetic gives the same bits either way
        cpu = torch.device("cpu")
        self.tokens = slots.image_tensor((), torch.float64, device=cpu)  # the window's committed tokens per step (running mean)
        self.counted = slots.image_tensor((), device=cpu)  # window steps measured
        self.since = slots.image_tensor((), device=cpu)  # steps since the window last ran
        self.burst = slots.image_tensor((), device=cpu)  # window steps left in the current re-measurement
        self.last = slots.image_tensor((), device=cpu)  # the arm of the previous step (0: none yet)
        self.previous = slots.image_tensor((), device=cpu)  # and of the one before it
        self._np = {k: getattr(self, k).numpy() for k in ("tokens", "counted", "since", "burst", "last", "previous")}

    def choose(self, n: int) -> list[int]:
        """The window length of each image [n] for the next step: the window or 1."""
        if n <= ROW_PATH_ROWS:
            return [self._choose_one(i) for i in range(n)]
        return self._choose_arrays(n).tolist()

    def _choose_one(self, i: int) -> int:
        """`_choose_arrays` for image i alone, in Python scalars (the same decisions and state)."""
        a, w = self._np, self.window
        burst, since = int(a["burst"][i]), int(a["since"][i])
        keep = a["counted"][i] < self.trust or burst > 0 or a["tokens"][i] >= self.threshold
        probe = not keep and since >= self.reprobe
        if probe:
            burst = self.probe
        window = keep or probe
        if window:
            a["burst"][i], a["since"][i] = max(burst - 1, 0), 0
        else:
            a["since"][i] = since + 1
        arm = w if window else 1
        a["previous"][i], a["last"][i] = a["last"][i], arm
        return arm

    def _choose_arrays(self, n: int) -> np.ndarray:
        """The arms of images [0, n) in numpy over all of them: int64 [n]."""
        a, w = self._np, self.window
        burst, since = a["burst"][:n], a["since"][:n]
        keep = (a["counted"][:n] < self.trust) | (burst > 0) | (a["tokens"][:n] >= self.threshold)
        probe = ~keep & (since >= self.reprobe)  # one token per step wins; re-measure the window now and then
        window = keep | probe
        burst = np.where(probe, self.probe, burst)
        a["burst"][:n] = np.where(window, np.maximum(burst - 1, 0), burst)
        a["since"][:n] = np.where(window, 0, since + 1)
        arm = np.where(window, w, 1).astype(np.int64)
        a["previous"][:n], a["last"][:n] = a["last"][:n], arm
        return arm

    def observe(self, committed, full) -> None:
        """After a step: tokens each image committed [n] (float), and whether it ran its whole chosen
        arm [n] (bool; a window cut short by the image's end or the speculative interval says little);
        tensors (any device), arrays or lists."""
        if isinstance(committed, list) and len(committed) <= ROW_PATH_ROWS:
            for i, (c, f) in enumerate(zip(committed, full)):
                self._observe_one(i, float(c), bool(f))
            return
        committed, full = _host(committed, np.float64), _host(full, bool)
        n, a = committed.shape[0], self._np
        use = full & (a["last"][:n] == self.window) & (a["previous"][:n] == self.window)
        old = a["tokens"][:n]
        mean = np.where(a["counted"][:n] > 0, self.decay * old + (1 - self.decay) * committed, committed)
        a["tokens"][:n] = np.where(use, mean, old)
        a["counted"][:n] += use

    def _observe_one(self, i: int, committed: float, full: bool) -> None:
        """`observe` of image i alone, in Python floats (float64: the same bits as the arrays')."""
        a = self._np
        if full and a["last"][i] == self.window and a["previous"][i] == self.window:
            old = float(a["tokens"][i])
            a["tokens"][i] = self.decay * old + (1 - self.decay) * committed if a["counted"][i] > 0 else committed
            a["counted"][i] += 1


def _host(x, dtype) -> np.ndarray:
    """x (a tensor on any device, an array or a list) as a numpy array of dtype."""
    if isinstance(x, torch.Tensor):
        x = x.cpu().numpy()
    return np.asarray(x, dtype=dtype)


@dataclass
class ChainResult:
    """Per row: accepted drafts k [B], the distribution of the token at index k (the residual after a
    rejection, else the bonus) [B, V], and that token [B] (None when the caller draws it)."""

    accepted: torch.Tensor
    dist: torch.Tensor
    token: Optional[torch.Tensor]


def per_row_lanes(u: torch.Tensor, length: torch.Tensor, width: int, lanes: torch.Tensor):
    """Split uniforms u [B, 2*width] of rows whose windows have `length` [B] <= width positions:
    acceptance lanes [0, width-1) (a row reads its first length-1) and [B, width+1] draw lanes:
    the token lane length-1, then the fresh-sample lanes length .. length+width-1. A row reads the
    same lanes whatever the batch's width. `lanes`: 0, 1, ... (at least width + 1 of them)."""
    draw = u.gather(1, (length - 1)[:, None] + lanes[: width + 1])
    return u[:, : width - 1], draw


class Proposals:
    """The distributions q drafts were drawn from, [B, L, V] as a tensor: q(x) of every draft and
    the full row of one draft per chain (all a rejection needs)."""

    def __init__(self, q: torch.Tensor):
        self.q = q

    def prob(self, D: torch.Tensor) -> torch.Tensor:
        """q_j(D[:, j]) [B, L]."""
        return self.q.gather(-1, D[..., None])[..., 0]

    def row(self, j: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Row j [B, 1] of each chain, whose draft is d [B]: [B, V]."""
        return self.q.gather(1, j[:, :, None].expand(-1, 1, self.q.shape[-1]))[:, 0]

    def at(self, D: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """q_j at other tokens [B, L, C] of each draft's row (drafts D [B, L]): [B, L, C]."""
        return self.q.gather(-1, tokens)


class SampledProposals(Proposals):
    """Drafts D [B, L] that are either samples from rows of an earlier step's distributions or
    one-hot proposals (q = 1 at the draft itself: SJD's new random or repeated tokens): `index`
    [B, L] into `rows` [N, V] (None when there are none), -1 for one-hot. Nothing of size [B, L, V]
    is built, and q(D) is read when first asked for."""

    def __init__(self, rows: Optional[torch.Tensor], index: torch.Tensor, D: torch.Tensor, vocab: int):
        self.rows, self.index, self.D, self.vocab = rows, index, D, vocab
        self._qx: Optional[torch.Tensor] = None

    @property
    def qx(self) -> torch.Tensor:
        """q(D) [B, L], read on first use (the host row path of `verify_chain` reads its few entries itself).
        Valid only until the decoder commits: in sjd D and the rows are views of buffers the commit rewrites."""
        if self._qx is None:
            if self.rows is None:
                self._qx = torch.ones(self.D.shape, dtype=torch.float32, device=self.D.device)
            else:
                flat = self.index.clamp(min=0) * self.vocab + self.D
                self._qx = torch.where(self.index < 0, 1.0, self.rows.view(-1).take(flat))
        return self._qx

    def prob(self, D):
        if D is not self.D and not torch.equal(D, self.D):
            raise ValueError("SampledProposals.prob: drafts differ from the ones it was built for")
        return self.qx

    def at(self, D, tokens):
        one = (tokens == D[..., None]).float()  # a one-hot proposal has mass only at its draft
        if self.rows is None:
            return one
        got = self.rows.view(-1).take(self.index.clamp(min=0)[..., None] * self.vocab + tokens)
        return torch.where((self.index < 0)[..., None], one, got)

    def row(self, j, d):
        one = torch.zeros(d.shape[0], self.vocab, device=d.device).scatter_(1, d[:, None], 1.0)
        if self.rows is None:
            return one
        i = self.index.gather(1, j)[:, 0]
        return torch.where((i < 0)[:, None], one, self.rows.index_select(0, i.clamp(min=0)))


def verify_chain(P: torch.Tensor, Q, D: torch.Tensor, limit: torch.Tensor, u_accept: torch.Tensor,
                 u_token: Optional[torch.Tensor], rule: StandardRule) -> ChainResult:
    """Speculative verification of B chains of L drafts.

    P [B, L+1, V]: target distributions for the L draft positions plus the bonus position;
    Q: what the drafts were drawn from, a tensor [B, L, V] or `Proposals`; D [B, L] drafts;
    limit [B] (each <= L): how many leading drafts may be accepted at all (in range, inside the
    speculative interval); a chain stopped before its limit was rejected there; u_accept [B, L]
    and u_token [B] uniforms (None: the caller draws the token from `dist`). Accepted drafts are the
    leading run with u < acceptance probability.
    """
    b, l = D.shape
    if type(rule) is StandardRule and type(Q) is SampledProposals and P.device.type == "cpu" and b <= ROW_PATH_ROWS:
        return _verify_rows(P, Q, D, limit, u_accept, u_token)
    return _verify_tensors(P, Q, D, limit, u_accept, u_token, rule)


# up to this many chains (images), lossless verification of sampled drafts walks each row on the host, and
# WindowArms.choose / observe decide in Python scalars instead of arrays (the same bits either way)
ROW_PATH_ROWS = 4


def _verify_tensors(P, Q, D, limit, u_accept, u_token, rule) -> ChainResult:
    """`verify_chain` in tensor ops over the whole batch (any rule, any proposals, any device)."""
    b, l = D.shape
    v = P.shape[-1]
    Q = Proposals(Q) if isinstance(Q, torch.Tensor) else Q
    if l:
        ok = (u_accept < rule.chain_acceptance(P[:, :l], Q, D)) & (arange(l, D.device) < limit[:, None])
        k = ok.long().cumprod(1).sum(1)
    else:
        k = torch.zeros(b, dtype=torch.long, device=P.device)
    p_k = P.gather(1, k.view(b, 1, 1).expand(b, 1, v))[:, 0]
    if l:
        j = k.clamp(max=l - 1)[:, None]  # the first rejected draft, where there is one
        d_k = D.gather(1, j)[:, 0]
        dist = torch.where((k < limit)[:, None], rule.residual(p_k, Q.row(j, d_k), d_k), rule.bonus(p_k))
    else:
        dist = rule.bonus(p_k)
    return ChainResult(k, dist, None if u_token is None else sample_from_probs(dist, u_token))




def _verify_rows(P: torch.Tensor, Q: "SampledProposals", D: torch.Tensor, limit: torch.Tensor,
                 u_accept: torch.Tensor, u_token: Optional[torch.Tensor] = None) -> ChainResult:
    """`_verify_tensors` for StandardRule and SampledProposals on the CPU, one chain at a time: the same
    numbers (float32 ratios min(1, p(x) / max(q(x), 1e-30)) compared with the float64 uniforms, the
    residual max(0, p - q) without x, falling back to p without x, then p), computed only where
    they are read. A chain stops at its first rejection, so a step reads a few of the window's
    ratios instead of all of them, and the residual is built for one row per rejected chain (issue
    35: the tensor path's ~45 small ops were a fifth of a small model's SJD step on the host)."""
    b, l = D.shape
    p, d, u, index = P.numpy(), D.numpy(), u_accept.numpy(), Q.index.numpy()
    rows = None if Q.rows is None else Q.rows.numpy()
    accepted, dist = [], np.empty((b, p.shape[-1]), dtype=p.dtype)
    for i, lim in enumerate(limit.tolist()):
        k, stop = 0, min(lim, l)
        while k < stop:
            x, j = d[i, k], index[i, k]
            qx = _ONE if j < 0 or rows is None else rows[j, x]  # q(x): 1 for a one-hot proposal
            ratio = ratio_host(p[i, k, x], qx)  # float32, as the tensor path's
            if not u[i, k] < ratio:
                break
            k += 1
        accepted.append(k)
        pk = p[i, k]
        if not (l and k < lim):  # every allowed draft accepted: the bonus row
            dist[i] = pk
            continue
        x, j = d[i, min(k, l - 1)], index[i, min(k, l - 1)]
        if j < 0 or rows is None:  # a one-hot proposal: max(0, p - q) is p except at x
            r = pk.copy()
        else:
            r = np.maximum(pk - rows[j], _ZERO)
        r[x] = 0
        if not r.sum() > 0:  # no residual mass: p without x, else p (`_nonempty`)
            r = pk.copy()
            r[x] = 0
            if not r.sum() > 0:
                r = pk
        dist[i] = r
    token = None
    if u_token is not None:
        token = torch.from_numpy(sample_from_probs_host(dist, u_token.numpy()).astype(np.int64))
    return ChainResult(torch.from_numpy(np.array(accepted, dtype=np.int64)), torch.from_numpy(dist), token)
