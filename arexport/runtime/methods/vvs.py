"""`vvs`: verification skipping on top of speculative decoding with LANTERN acceptance: a draft model's
chains (`--drafter sd`) or an EAGLE head's trees (`--drafter eagle`, the official setup: VVSEagleDecoder
below, whose skipped rounds feed the head cached target features).

Some rounds skip the target forward. The schedule is the official `skip_verify` (HyattDD/VVS
`models/skip_utils_llamagen.py` lines 61-90, commit 7790173). Its `new_token` counts the tokens
committed before the round *without* the round's root token (the token the drafts continue from,
which `update_inference_inputs_skip` adds to `new_token` only in the round that commits it); here
an image's count n includes that token, so new_token = n - 1. Never while new_token <= 5;
`uniform` skips round r (the loop index `idx`, counted from 0 over all of the image's rounds,
skipped ones included; `steps_in_first_row` stays 0 in `ea_llamagen.py`'s `generate`) when
r % skip_interval == 1; `dynamic` skips when the previous round was verified and the drafter's
candidate paths agree: every second path (the official down-sampling) compared position by position
through the cosine similarity of their codebook latents, weighted 0.9^j over positions j and
averaged over path pairs, >= sim_threshold; `none` never skips (then vvs == lantern).

A skipped round commits what the official skip branch commits (`skip_evaluate` then
`update_inference_inputs_skip` with `cur_skip=True`, `skip_utils_llamagen.py` lines 119-151 and
276-287, 428-429): a path truncated to the mean path length - 1 drafts (a chain has one path of g
drafts, so accept_length = g), of which the root and the first g - 1 drafts are appended and draft g
becomes the next round's root. In this runtime's count (root included) that is the g drafts: n grows
by g, as the official `new_token` does, and no token is drawn from the cached target distribution
(the official `reuse_logits` sample is not read on the skip branch). The committed tokens stay
*pending*: the next verified round prepends them to its verify block, so their K/V enters the target
cache then (the official `tree_decoding_skip_llamagen` feeds `last_skip_tokens` the same way).
Candidate paths of a chain drafter are the top-`n_candidates` tokens of the draft distribution at
each drafted position (the EAGLE tree's top-k per depth). Each image decides for itself; images that
skip sit out the round's target forward. Defaults follow the reference: interval 5, threshold 0.7,
LANTERN delta 0.2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from arexport.errors import ArexportError
from arexport.runtime.methods.base import Method, Options, RowStats, option, register
from arexport.runtime.methods.eagle import EagleDecoder, EagleDrafting, EagleOptions
from arexport.runtime.methods.sd import SDDecoder
from arexport.runtime.speculative import LANTERN_RULES, LanternRule, StandardRule, check_lantern
from arexport.runtime.tree import Tree

POLICIES = ("uniform", "dynamic", "none")
DRAFTERS = ("sd", "eagle")
MIN_TOKENS = 5  # skip_verify never skips while new_token (committed tokens before the root) <= 5


def candidate_similarity(q: torch.Tensor, latents: torch.Tensor, n_candidates: int = 4, decay: float = 0.9) -> torch.Tensor:
    """[B]: the official path similarity for a chain's candidate paths (the top-n_candidates tokens at
    each drafted position, rank r making path r), down-sampled to every second path: exp-decay
    (0.9^j, normalised) weighted sum over positions of the pairwise cosine similarity of the paths'
    codebook latents, averaged over path pairs. Fewer than 2 paths give 0 (never skip), as officially.
    q: [B, g, V] draft distributions; latents [V, d]."""
    b, g, _ = q.shape
    top = q.topk(min(n_candidates, q.shape[-1]), dim=-1).indices[..., ::2]  # [B, g, c] every second path
    if top.shape[-1] < 2:
        return torch.zeros(b, device=q.device)
    z = F.normalize(latents.float()[top], dim=-1)  # [B, g, c, d]
    sim = z @ z.transpose(-1, -2)  # [B, g, c, c]
    c = top.shape[-1]
    off = ~torch.eye(c, dtype=torch.bool, device=q.device)
    per_pos = (sim * off).sum((-1, -2)) / max(c * (c - 1), 1)  # [B, g]
    w = decay ** torch.arange(g, device=q.device, dtype=per_pos.dtype)
    return (per_pos * w).sum(-1) / w.sum()


@dataclass(frozen=True)
class VVSOptions(EagleDrafting, Options):
    gamma: Optional[int] = None  # sd's default
    policy: str = option("uniform", "when to skip verification", flag="--policy", choices=POLICIES)
    skip_interval: int = option(5, "uniform: skip every N-th round", flag="--skip-interval")
    sim_threshold: float = option(0.7, "dynamic: candidate latent cosine similarity to skip", flag="--sim-threshold")
    n_candidates: int = option(4, "dynamic: draft candidates compared per position")
    k: int = 1000
    delta: float = 0.2
    lam: Optional[float] = None
    rule: str = option("official", "LANTERN acceptance rule: official or capped (see lantern)", choices=LANTERN_RULES)
    drafter: Optional[str] = option(None, "drafter: sd (a draft model, chain drafts) or eagle (an EAGLE head's tree, the "
                                    "official setup, with skipped rounds reusing cached target features; the default "
                                    "when --draft-head is given)", flag="--drafter", choices=DRAFTERS)
    draft_head: Optional[str] = None  # eagle drafter (its options)
    tree: str = EagleOptions.__dataclass_fields__["tree"].default
    top_k: int = EagleOptions.__dataclass_fields__["top_k"].default
    depth: int = EagleOptions.__dataclass_fields__["depth"].default
    tokens: Optional[int] = None
    choices: Optional[str] = None

    def validate(self):
        if self.gamma is not None and self.gamma < 1:
            raise ArexportError(f"vvs gamma must be >= 1, got {self.gamma}")
        if self.skip_interval < 2:
            raise ArexportError(f"vvs skip interval must be >= 2 (a skipped round needs a verified one before), got {self.skip_interval}")
        check_lantern(self.k, self.delta, self.lam, self.rule)
        if self.drafter_name == "eagle":
            self.eagle_options().validate()
        elif self.draft_head:
            raise ArexportError("--draft-head is read by the eagle drafter; vvs --drafter sd does not use it")
        return self


@dataclass
class VVSStats(RowStats):
    """An image's VVS statistics: its skipped rounds and every skip decision."""

    skipped_rounds: int = 0  # rounds committed without a target forward
    decisions: list[tuple[int, bool]] = field(default_factory=list)  # (tokens done, skipped?) per round

    @classmethod
    def run_fields(cls, rows, events, forwards_per_image):
        return {"skipped_rounds": sum(r.skipped_rounds for r in rows)}


class VVSDecoder(SDDecoder):
    row_stats = VVSStats

    def __init__(self, ctx, capacity):
        o = ctx.options
        rule = LanternRule(ctx.engine.neighbors(o.k + 1), k=o.k, delta=o.delta, lam=o.lam, rule=o.rule,
                           greedy=ctx.params.greedy) if o.delta > 0 or o.lam is not None else StandardRule()
        super().__init__(ctx, capacity, rule)
        self.latents = ctx.draft.codebook() if o.policy == "dynamic" else None
        self.rounds = self.slots.image_tensor(())  # the official loop index: rounds so far, skipped ones included
        self.last_skipped = self.slots.image_tensor((), torch.bool)

    def start(self, a, b, conds):
        super().start(a, b, conds)
        self.rounds[a:b], self.last_skipped[a:b] = 0, False

    def skip(self, g, drafts, q):
        """[n] drafts each image commits unverified this round: g_i on a skip, else 0."""
        o, s = self.opts, self.slots
        m = torch.zeros_like(g)
        for i in range(s.n):
            gi, ni, st = int(g[i]), int(self.n[i]), s.stats[i]
            r = int(self.rounds[i])
            self.rounds[i] += 1  # every round of the image counts, as the official idx does
            if gi == 0:  # nothing drafted (the image's last token): nothing to skip
                continue
            new_token = ni - 1  # the official count leaves out the root token tokens[n - 1]
            want = False
            if o.policy != "none" and new_token > MIN_TOKENS:
                if o.policy == "uniform":
                    want = r % o.skip_interval == 1
                else:
                    sim = candidate_similarity(q[i:i + 1, :gi], self.latents.to(q.device), o.n_candidates)
                    want = not bool(self.last_skipped[i]) and bool(sim[0] >= o.sim_threshold)
            st.decisions.append((ni, want))
            m[i] = gi if want else 0  # g drafts: the last one is the next round's root (g <= tokens left - 1)
        self.last_skipped[: s.n] = m > 0
        return m


def tree_paths(tree: Tree, i: int, sampled: bool) -> list[list[int]]:
    """Image i's candidate paths as the official `topK_genrate_v2` lists them (`retrieve_indices`, VVS
    `models/drafters/cnets_llamagen.py` lines 1095-1126 at 7790173): one per leaf, root first, leaves in node
    order; with a sampler (`logits_processor`) sorted by their node indices, a missing entry (-1) after any node."""
    parent = tree.parent[i].tolist()
    inner = set(parent[1:])
    paths = []
    for leaf in range(1, len(parent)):
        if leaf in inner:
            continue
        path = [leaf]
        while path[-1] != 0:
            path.append(parent[path[-1]])
        paths.append(path[::-1])
    if sampled:
        width = max(len(q) for q in paths)
        paths.sort(key=lambda q: q + [len(parent) + 5] * (width - len(q)))
    return paths


def tree_similarity(token_paths: list[list[int]], latents: torch.Tensor, decay: float = 0.9) -> float:
    """The official dynamic-skip similarity of a tree's candidate paths (`compute_similarity_pytorch_jit`,
    `models/skip_utils_llamagen.py` lines 9-57 at 7790173) after its down-sampling to every second path
    (`skip_verify` line 83): each path's drafts (root left out) as unit codebook latents, zero-padded to the
    longest; per pair of paths the exp-decay weighted (0.9^j normalised over the longest path) sum over
    positions where both have a draft of their cosine similarity; the mean over pairs. Fewer than 2 paths: 0."""
    seqs = [q[1:] for q in token_paths[::2]]
    if len(seqs) < 2:
        return 0.0
    width = max(len(q) for q in seqs)
    z = torch.zeros(len(seqs), width, latents.shape[1])
    on = torch.zeros(len(seqs), width, dtype=torch.bool)
    for a_, q in enumerate(seqs):
        z[a_, : len(q)] = F.normalize(latents[torch.tensor(q, dtype=torch.long)].float(), dim=-1)
        on[a_, : len(q)] = True
    w = decay ** torch.arange(width, dtype=torch.float32)
    w = w / w.sum()
    sims = torch.einsum("nld,mld->nml", z, z) * (on[:, None, :] & on[None, :, :])
    pair = (sims * w).sum(-1)
    iu = torch.triu_indices(len(seqs), len(seqs), 1)
    return float(pair[iu[0], iu[1]].mean())


def skip_length(paths: list[list[int]], pick: list[int]) -> int:
    """Drafts a skipped round commits from candidate path `pick` (`skip_evaluate`, `skip_utils_llamagen.py`
    lines 126-143 at 7790173): its drafts, truncated to the mean number of valid entries per path (root
    included, integer division) minus 1."""
    return min(len(pick) - 1, sum(len(q) for q in paths) // len(paths) - 1)


def reuse_features(history: torch.Tensor, count: int, m: int) -> torch.Tensor:
    """The official `retrieve_features` (`reuse_prev`, `skip_utils_llamagen.py` lines 215-243 at 7790173) on
    one row: the last m of the `count` cached target hidden states (history [H, dim], oldest first), or all of
    them with the last repeated when fewer are cached: [m, dim]."""
    if count < 1:
        raise ArexportError("vvs: a skipped round found no cached target features (no verified round before it)")
    have = history[max(count - m, 0):count]
    if count >= m:
        return have
    return torch.cat([have, have[-1:].expand(m - count, -1)])


class VVSEagleDecoder(EagleDecoder):
    """VVS on an EAGLE head's tree, as the official VVS runs it (`models/ea_llamagen.py` `generate`, lines
    433-600 at 7790173):

    * skip decision: `skip_verify` (see the module docstring) with the tree's candidate paths;
    * a skipped round (`skip_evaluate`, lines 119-151): a candidate path drawn uniformly (the image's own
      stream, one draw) truncated to min(its drafts, (valid tokens over all paths) // paths - 1) drafts, and at
      most the image's tokens left - 1; those drafts are committed (the last one is the next root) and stay
      without target K/V (the next verified round feeds them before its tree, as `tree_decoding_skip_llamagen`);
    * the head then catches up on the m committed drafts paired with the m newest *cached target features*
      (`update_inference_inputs_skip` with `cur_skip`, lines 276-287, `retrieve_features` `reuse_prev`): no
      target hidden state exists for them;
    * `cached_features` (lines 512-539): every verified round appends the target hidden states of the chain it
      fed first (the skipped tokens) and of its accepted path, so the cache holds the hidden states of the
      target's committed tokens in order; the head itself reads only the accepted path's (as in eagle).
    """

    row_stats = VVSStats
    max_pend = 1  # becomes the tree's depth in EagleDecoder.__init__
    one_hash = False  # a skipping image draws no walk (EagleDecoder.one_hash)
    trim_levels = False  # the dynamic policy's path similarity reads every node's token, deep ones included

    def __init__(self, ctx, capacity, vopts: "VVSOptions", rule):
        super().__init__(ctx, capacity, rule)
        self.vopts = vopts
        s = self.slots
        self.latents = ctx.engine.codebook().float().cpu() if vopts.policy == "dynamic" else None
        self.rounds = s.image_tensor(())
        self.last_skipped = s.image_tensor((), torch.bool)
        H = self.max_depth + 1
        self.hist = s.row_tensor((H, self.head.cfg.dim), self.ph.dtype)  # the newest cached target features
        self.hcount = s.row_tensor((), torch.long)

    def start(self, a, b, conds):
        super().start(a, b, conds)
        r0, r1 = self.slots.rows_of(a, b)
        self.rounds[a:b], self.last_skipped[a:b], self.hcount[r0:r1] = 0, False, 0
        self._choice = {}

    def skip(self, tree, ready):
        o, s = self.vopts, self.slots
        b = s.n
        out = torch.zeros(b, dtype=torch.bool, device=ready.device)
        sampled = not getattr(self.params, "greedy", False)
        self._choice = {}
        for i in range(b):
            r = int(self.rounds[i])
            self.rounds[i] += 1  # the official idx counts every round, skipped ones included
            if not bool(ready[i]):
                continue
            ni = int(self.n[i])
            want = False
            if o.policy != "none" and ni - 1 > MIN_TOKENS:
                if o.policy == "uniform":
                    want = r % o.skip_interval == 1
                elif not bool(self.last_skipped[i]):
                    paths = tree_paths(tree, i, sampled)
                    toks = tree.tokens[i].cpu()
                    want = tree_similarity([toks[q].tolist() for q in paths], self.latents) >= o.sim_threshold
            s.stats[i].decisions.append((ni, want))
            out[i] = want
        if bool(out.any()):
            u = s.uniform(1, out).cpu()
            for i in out.nonzero()[:, 0].tolist():
                paths = tree_paths(tree, i, sampled)
                pick = paths[min(int(float(u[i, 0]) * len(paths)), len(paths) - 1)]
                m = min(skip_length(paths, pick), self.spec.n_tokens - int(self.n[i]) - 1)
                if m < 1:  # nothing can be committed unverified: the round verifies
                    out[i] = False
                    s.stats[i].decisions[-1] = (s.stats[i].decisions[-1][0], False)
                    continue
                self._choice[i] = (pick, m)
        self.last_skipped[:b] = out
        return out

    def commit_unverified(self, tree, skipping):
        s, cfg = self.slots, self.cfg
        per = cfg.per_image
        for i, (pick, m) in self._choice.items():
            ni = int(self.n[i])
            self.tokens[i, ni:ni + m] = tree.tokens[i, pick[1:m + 1]]
            self.n[i] += m
            self.pend[i] += m  # the old root and the first m - 1 drafts; draft m is the new root
            self.pc[i] = m
            for r in range(i * per, (i + 1) * per):
                self.ph[r, :m] = reuse_features(self.hist[r], int(self.hcount[r]), m)
            s.stats[i].skipped_rounds += 1
            s.stats[i].accepted.append(m)

    def verified(self, rows, chain_hidden, chain_len, path_hidden, path_len):
        H = self.hist.shape[1]
        P = chain_hidden.shape[1]
        for r in rows.nonzero()[:, 0].tolist():
            c, a_ = int(chain_len[r]), int(path_len[r])
            new = torch.cat([chain_hidden[r, P - c:], path_hidden[r, :a_]]).to(self.hist.dtype)
            k = int(self.hcount[r])
            both = torch.cat([self.hist[r, :k], new])[-H:]
            self.hist[r, : both.shape[0]] = both
            self.hcount[r] = both.shape[0]


@register("vvs")
class VVS(Method):
    """SD (or an EAGLE head's tree) + LANTERN acceptance + verification skipping."""

    Options = VVSOptions
    needs_draft = True  # with its default --drafter sd (requires_draft)
    help = "verification skipping on top of sd or an EAGLE head (--draft-head) + LANTERN: some rounds commit drafts without a target forward"

    def requires_draft(self) -> bool:
        return self.options.drafter_name == "sd"

    def decoder(self, ctx, capacity):
        o = self.options
        if o.drafter_name == "sd":
            return VVSDecoder(ctx, capacity)
        rule = LanternRule(ctx.engine.neighbors(o.k + 1), k=o.k, delta=o.delta, lam=o.lam, rule=o.rule,
                           greedy=ctx.params.greedy) if o.delta > 0 or o.lam is not None else StandardRule()
        return VVSEagleDecoder(type(ctx)(ctx.engine, ctx.params, o.eagle_options(), ctx.draft), capacity, o, rule)
