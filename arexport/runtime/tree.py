"""Draft trees and tree acceptance for EAGLE-style speculative decoding.

A tree holds, per image, node 0 (the root: the newest committed token, not yet seen by the target)
and N draft nodes in an order where a parent precedes its children. It is verified in one target
call: node i is fed at position root + depth[i] and attends to the committed cache and to its
ancestors (`ancestor_mask`). Two growers:

* `grow_dynamic` — EAGLE-2's dynamic tree as LANTERN runs it (jadohu/LANTERN
  `models/drafters/cnets_llamagen.py` `Model.topK_genrate`, commit 3a56e45, lines 731-866): the root's
  top_k children, then `depth` rounds that expand the top_k frontier nodes by cumulative draft
  log-probability into top_k children each and keep the top_k of those top_k^2 as the next frontier;
  every node ever proposed is a candidate, and the `total` candidates with the highest cumulative
  log-probability form the tree (kept in proposal order). Drafts are deterministic (q = 1).
* `static_tree` + `sampled_children` — LANTERN++'s `--static_tree` (`topK_genrate_v1`, lines 891-964;
  tree buffers from `ea_model_llamagen.py` `generate_tree_buffers`, lines 283-421): a fixed tree of
  choice paths ([0], [1], [0, 0], ...: child rank at each depth); each node's children are drawn
  without replacement from the head's distribution at it, child of rank r being the r-th draw.

`accept_tree` walks a tree from the root with the target's rows P (one per node): at each node the
children are tried in rank order (a repeated token is skipped); a child x is accepted with
probability rule.acceptance(p, q'(x), x), where q' is the node's draft row with the earlier siblings
removed and renormalised (sampled trees) or one-hot at x (dynamic trees: the official q = 1); on
rejection p becomes the rule's residual. With StandardRule this is multi-candidate speculative
sampling, which is lossless (sampling without replacement for q = 1). After the last accepted node,
the next token is drawn from the final p (the node's own row if nothing at it was rejected).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Callable, Optional

import numpy as np
import torch

from arexport.errors import ArexportError
from arexport.runtime.sampling import sample_from_probs, sample_from_probs_host
from arexport.runtime.speculative import StandardRule, ratio_host

# LANTERN++'s default --static_tree choices (`models/drafters/choices.py` `naive_extend_57` at 3a56e45 is
# the official default, 57 nodes); this is a prefix-closed 15-node tree for small verify blocks, 4 levels deep,
# so a round costs 4 head calls (the catch-up and 3 levels), what a chain draft of 4 costs (sd --gamma 4):
# on the digits demo it accepts more per target forward than that chain with fewer draft calls per image
# (docs/benchmarks.md, issue 30's table). Ranks 0-2 at the first level, the best-ranked branches deepest.
SMALL_STATIC_TREE = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (2, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0),
                     (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 0, 0))
LOGP_FLOOR = -1e4  # -inf draft log-probs (filtered tokens) clamp here so a child never outranks its parent


@dataclass
class Tree:
    """One draft tree per image: tokens [B, N+1] (node 0 the root), parent [B, N+1] (-1 at the root),
    depth [B, N+1] (0 at the root), rank [B, N+1] (child order at its parent), q [B, N+1, V] or None:
    for sampled trees the head's distribution at each node's parent (what it was drawn from)."""

    tokens: torch.Tensor
    parent: torch.Tensor
    depth: torch.Tensor
    rank: torch.Tensor
    q: Optional[torch.Tensor] = None
    anc: Optional[torch.Tensor] = None  # [B, N+1, N+1] ancestor mask when already known (static trees)

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    def mask(self) -> torch.Tensor:
        return self.anc if self.anc is not None else ancestor_mask(self.parent)


def ancestor_mask(parent: torch.Tensor) -> torch.Tensor:
    """[B, N+1] parents (-1 at the root) -> [B, N+1, N+1] bool: node i sees j iff j is i or an ancestor
    of i. Transitive closure of "is i or i's parent" by squaring: ceil(log2(N+1)) boolean products
    instead of a Python loop over the nodes (host work per round)."""
    b, n = parent.shape
    eye = torch.eye(n, dtype=torch.bool, device=parent.device)
    up = torch.nn.functional.one_hot(parent.clamp(min=0), n).bool() & (parent >= 0)[:, :, None]
    m = (eye | up).float()  # reach within one step
    for _ in range(max(n - 1, 1).bit_length()):
        m = (torch.bmm(m, m) > 0).float()
    return m > 0


def grow_dynamic(logp0: torch.Tensor, expand: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
                 top_k: int, depth: int, total: int) -> Tree:
    """EAGLE-2's dynamic tree for B images.

    logp0 [B, V]: the head's log-probabilities after the root. expand(level, tokens [B, k], parents
    [B, k]) feeds frontier nodes (parents: index of each one's parent frontier entry in the previous
    level, -1 for the root's children) and returns their log-probabilities [B, k, V]. `total` drafts
    are kept (1 <= total <= top_k + depth * top_k^2)."""
    b, v = logp0.shape
    if not 1 <= top_k <= v:
        raise ArexportError(f"eagle top-k must be in 1..{v}, got {top_k}")
    pool = top_k + depth * top_k * top_k
    if not 1 <= total <= pool:
        raise ArexportError(f"eagle tree of {total} drafts does not fit top-k {top_k} and depth {depth} ({pool} candidates)")
    dev = logp0.device
    top = logp0.clamp(min=LOGP_FLOOR).topk(top_k, dim=-1)
    scores = top.values  # [B, k] cumulative log-prob of the frontier
    cand_tok, cand_score = [top.indices], [scores]
    cand_parent = [torch.full((b, top_k), -1, dtype=torch.long, device=dev)]  # pool index of the parent
    cand_depth = [torch.ones(b, top_k, dtype=torch.long, device=dev)]
    frontier = torch.arange(top_k, device=dev).expand(b, top_k)  # pool indices
    f_tok, f_par = top.indices, torch.full((b, top_k), -1, dtype=torch.long, device=dev)
    base = top_k
    for level in range(depth):
        lp = expand(level, f_tok, f_par).clamp(min=LOGP_FLOOR)  # [B, k, V]
        t = lp.topk(top_k, dim=-1)
        cu = t.values + scores[:, :, None]  # [B, k, k]
        cand_tok.append(t.indices.reshape(b, -1))
        cand_score.append(cu.reshape(b, -1))
        cand_parent.append(frontier[:, :, None].expand(-1, -1, top_k).reshape(b, -1))
        cand_depth.append(torch.full((b, top_k * top_k), level + 2, dtype=torch.long, device=dev))
        sel = cu.reshape(b, -1).topk(top_k, dim=-1)
        scores = sel.values
        f_par = sel.indices // top_k
        f_tok = t.indices.reshape(b, -1).gather(1, sel.indices)
        frontier = base + sel.indices
        base += top_k * top_k
    tok, score, par, dep = (torch.cat(x, 1) for x in (cand_tok, cand_score, cand_parent, cand_depth))
    # the best `total` by score; ties keep proposal order, so a parent (proposed first, score >= child's) is kept
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :total]
    keep = torch.sort(order, dim=1).values  # proposal order: parents before children
    pos_of = torch.full((b, pool), -1, dtype=torch.long, device=dev)
    pos_of.scatter_(1, keep, torch.arange(1, total + 1, device=dev).expand(b, total))
    kp = par.gather(1, keep)
    parent = torch.where(kp >= 0, pos_of.gather(1, kp.clamp(min=0)), 0)
    if bool((parent < 0).any()):
        raise ArexportError("internal: a dynamic-tree node was kept without its parent")
    ktok = tok.gather(1, keep)
    rank = torch.zeros_like(parent)
    for i in range(1, total):  # rank = how many kept siblings came before (proposal order = draft rank order)
        rank[:, i] = (parent[:, :i] == parent[:, i:i + 1]).sum(1)
    zeros = torch.zeros(b, 1, dtype=torch.long, device=dev)
    return Tree(tokens=torch.cat([zeros, ktok], 1), parent=torch.cat([zeros - 1, parent], 1),
                depth=torch.cat([zeros, dep.gather(1, keep)], 1), rank=torch.cat([zeros, rank], 1))


def parse_tree_choices(text: str) -> tuple[tuple[int, ...], ...]:
    """'0;1;0,0;0,1' -> ((0,), (1,), (0, 0), (0, 1)); checked prefix-closed with contiguous ranks."""
    try:
        paths = tuple(tuple(int(c) for c in part.split(",")) for part in text.split(";") if part.strip())
    except ValueError:
        raise ArexportError(f"tree choices {text!r}: expected paths like '0;1;0,0' (child ranks, ';' between paths)") from None
    check_tree_choices(paths)
    return paths


def check_tree_choices(paths) -> None:
    if not paths:
        raise ArexportError("a static tree needs at least one path")
    have = set(paths)
    if len(have) != len(paths):
        raise ArexportError("static tree choices repeat a path")
    for p in paths:
        if not p or min(p) < 0:
            raise ArexportError(f"static tree path {list(p)}: ranks must be >= 0")
        if len(p) > 1 and p[:-1] not in have:
            raise ArexportError(f"static tree path {list(p)} has no parent path {list(p[:-1])}")
        if p[-1] > 0 and p[:-1] + (p[-1] - 1,) not in have:
            raise ArexportError(f"static tree path {list(p)}: rank {p[-1] - 1} of the same parent is missing")


def static_tree(paths) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choice paths -> (parent [N+1], depth [N+1], rank [N+1]) with nodes sorted by (depth, path), as the
    official tree buffers order them (node 0 the root)."""
    check_tree_choices(paths)
    order = sorted(paths, key=lambda p: (len(p), p))
    index = {p: i + 1 for i, p in enumerate(order)}
    parent = [-1] + [index[p[:-1]] if len(p) > 1 else 0 for p in order]
    depth = [0] + [len(p) for p in order]
    rank = [0] + [p[-1] for p in order]
    return torch.tensor(parent), torch.tensor(depth), torch.tensor(rank)


@dataclass(frozen=True)
class StaticLevel:
    """One depth d of a static tree, precomputed once per decoder (host work per round is tensor ops only).

    nodes [L]: the level's node indices (consecutive, from `first`); parents [C]: the distinct parents of
    those nodes, ascending; draws: per child rank r, (positions into `parents` of the parents that have a
    rank-r child [a], the node index of each such child [a], its uniform's lane: node - 1 [a]); node_parent [L]:
    each node's parent; host: copies for the CPU draws (parents, ((pos, kids - first, lane) per rank) as numpy
    arrays, and per rank the (pos, kids - first, lane) triple of each child as ints)."""

    nodes: torch.Tensor
    first: int
    parents: torch.Tensor
    draws: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]
    node_parent: torch.Tensor
    host: tuple


@dataclass(frozen=True)
class StaticPlan:
    """A static tree (`static_tree`'s parent, depth, rank [N+1]), its ancestor mask anc [N+1, N+1],
    levels 1..max depth and seen [N, N]: draft node i + 1 sees draft node j + 1 (anc without the root; a
    level's rows are sliced from it per round)."""

    parent: torch.Tensor
    depth: torch.Tensor
    rank: torch.Tensor
    anc: torch.Tensor
    levels: tuple[StaticLevel, ...]
    seen: torch.Tensor

    @property
    def n_nodes(self) -> int:
        return self.parent.numel() - 1

    def to(self, device) -> "StaticPlan":
        move = lambda t: t.to(device)  # noqa: E731
        levels = tuple(StaticLevel(move(lv.nodes), lv.first, move(lv.parents),
                                   tuple(tuple(move(t) for t in dr) for dr in lv.draws), move(lv.node_parent),
                                   lv.host)
                       for lv in self.levels)
        return StaticPlan(move(self.parent), move(self.depth), move(self.rank), move(self.anc), levels, move(self.seen))


def static_plan(paths) -> StaticPlan:
    """The StaticPlan of choice paths (nodes ordered as `static_tree` orders them)."""
    parent, depth, rank = static_tree(paths)
    anc = ancestor_mask(parent[None])[0]
    N = parent.numel() - 1
    par, dep, rk = parent.tolist(), depth.tolist(), rank.tolist()
    levels = []
    for d in range(1, max(dep) + 1):
        nodes = [i for i in range(1, N + 1) if dep[i] == d]  # consecutive: nodes are sorted by depth
        parents = sorted({par[i] for i in nodes})
        draws = []
        for r in range(max(rk[i] for i in nodes) + 1):
            kids = [i for i in nodes if rk[i] == r]  # ranks are contiguous per parent (check_tree_choices)
            draws.append((torch.tensor([parents.index(par[i]) for i in kids]), torch.tensor(kids), torch.tensor(kids) - 1))
        host = (np.array(parents), tuple((pos.numpy(), kids.numpy() - nodes[0], lane.numpy()) for pos, kids, lane in draws))
        host += (tuple(tuple(zip(*(a.tolist() for a in dr))) for dr in host[1]),)  # per rank: (pos, col, lane) per child
        levels.append(StaticLevel(torch.tensor(nodes), nodes[0], torch.tensor(parents), tuple(draws),
                                  torch.tensor([par[i] for i in nodes]), host))
    return StaticPlan(parent, depth, rank, anc, tuple(levels), anc[1:, 1:].clone())


def sampled_level(dist: torch.Tensor, level: StaticLevel, u: torch.Tensor, tokens: torch.Tensor) -> None:
    """Draw a static level's children for B images: dist [B, N+1, V] the head's distribution after each node
    (the level's parents filled), u [B, N] one uniform per draft node (node i reads u[:, i - 1]); writes
    tokens[:, node]. Each parent's children are `sampled_children` of its row (rank r the r-th draw without
    replacement), all parents of the level drawing rank r at once. On the CPU the draws run in numpy
    (`_sampled_level_host`, the same tokens: tests/test_eagle_tree_host.py), or for a level of at most
    SMALL_LEVEL probabilities in plain Python floats (`_sampled_level_small`), elsewhere as torch ops."""
    if dist.device.type == "cpu" and u.device.type == "cpu":
        if dist.shape[0] * level.parents.numel() * dist.shape[2] <= SMALL_LEVEL:
            _sampled_level_small(dist, level, u, tokens)
        else:
            _sampled_level_host(dist, level, u, tokens)
    else:
        _sampled_level_torch(dist, level, u, tokens)


def _sampled_level_torch(dist: torch.Tensor, level: StaticLevel, u: torch.Tensor, tokens: torch.Tensor) -> None:
    q = dist[:, level.parents]  # [B, C, V] (advanced indexing: a copy, so the removals below leave dist alone)
    last, C = len(level.draws) - 1, level.parents.numel()
    for r, (pos, kids, lane) in enumerate(level.draws):
        # every parent draws this rank (rank 0 always; pos is ascending and distinct, so C of them is 0..C-1): q
        # itself, no gather and put back
        whole = pos.numel() == C
        qa = q if whole else q[:, pos]
        x = sample_from_probs(qa, u[:, lane])  # [B, a]
        tokens[:, kids] = x
        if r == last:  # nothing draws from the updated rows
            break
        qa.scatter_(2, x[:, :, None], 0.0)
        qa = torch.where(qa.sum(2, keepdim=True) > 0, qa, 1.0)  # exhausted support: any token
        if whole:
            q = qa
        else:
            q[:, pos] = qa


def _sampled_level_host(dist: torch.Tensor, level: StaticLevel, u: torch.Tensor, tokens: torch.Tensor) -> None:
    """`_sampled_level_torch` in numpy on CPU tensors (the level's tokens written in one op). q is widened to
    float64 once per level (exact: the draw widens each rank's rows anyway and zeroes stay zero), so a rank's draw
    is a scan, a compare and a count; a row is exhausted when no entry is > 0 (max: for non-negative rows the
    same test as a sum > 0, NaN included)."""
    parents, draws, _ = level.host
    q = dist.numpy()[:, parents].astype(np.float64)  # a copy, as above
    un = u.numpy()
    last, C, first = len(draws) - 1, parents.size, level.first
    xs = np.empty((q.shape[0], level.nodes.numel()), dtype=np.int64)
    for r, (pos, col, lane) in enumerate(draws):
        whole = pos.size == C
        qa = q if whole else q[:, pos]
        x = sample_from_probs_host(qa, un[:, lane])
        xs[:, col] = x
        if r == last:
            break
        bi, ai = _grid(*x.shape)
        qa[bi, ai, x] = 0.0  # (fancy-indexed copies need not be C-ordered: index, never reshape)
        empty = ~(qa.max(2) > 0)  # exhausted support: any token
        if empty.any():
            qa[empty] = 1.0
        if not whole:
            q[:, pos] = qa
    tokens[:, first:first + xs.shape[1]] = torch.from_numpy(xs).to(tokens.dtype)


# a level whose rows hold at most this many probabilities (images x parents x vocabulary: the 17-code demo's
# 1 x 3 x 17) draws in Python floats: ~60 ns per entry against ~1.5 us per numpy call, ~15 calls per rank
SMALL_LEVEL = 512


def _sampled_level_small(dist: torch.Tensor, level: StaticLevel, u: torch.Tensor, tokens: torch.Tensor) -> None:
    """`_sampled_level_host` on Python floats (doubles: float32 widens exactly): the same in-order float64 scan,
    the same target just below the total and the same count of scan entries <= target, so the same ids; an
    exhausted row (sum not > 0, NaN included, as the numpy path's max) becomes all ones."""
    parents, _, draws = level.host
    q = dist.numpy()[:, parents].tolist()  # [B][C][V]: copies, as above
    un = u.numpy().tolist()
    last, first, V = len(draws) - 1, level.first, dist.shape[2]
    xs = [[0] * level.nodes.numel() for _ in q]
    for r, children in enumerate(draws):
        for qb, ub, xb in zip(q, un, xs):
            for c, k, ln in children:
                row = qb[c]
                xb[k] = x = _draw_small(row, ub[ln])
                if r == last:
                    continue
                row[x] = 0.0
                if not sum(row) > 0:  # exhausted support: any token
                    qb[c] = [1.0] * V
    tokens[:, first:first + len(xs[0])] = torch.tensor(xs, dtype=tokens.dtype)


def _draw_small(row: list, u: float) -> int:
    """`sample_from_probs_host` of one row of Python floats (probabilities widened to doubles) and uniform u: the
    in-order double scan, the target just below the total and the count of scan entries <= target."""
    cdf = list(accumulate(row))
    total = cdf[-1]
    target = min(u * total, total * (1.0 - 2.0**-53))
    return min(sum(1 for e in cdf if e <= target), len(row) - 1)


_GRIDS: dict = {}


def _grid(B: int, a: int) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays arange(B)[:, None], arange(a)[None, :] (made once per shape; read only)."""
    g = _GRIDS.get((B, a))
    if g is None:
        g = _GRIDS[(B, a)] = (np.arange(B)[:, None], np.arange(a)[None, :])
    return g


def sampled_children(q: torch.Tensor, n: int, u: torch.Tensor) -> torch.Tensor:
    """n draws without replacement from rows q [B, V] with uniforms u [B, n]: tokens [B, n]
    (rank r is the r-th draw: q with the earlier draws removed, renormalised)."""
    q = q.clone()
    out = []
    for r in range(n):
        x = sample_from_probs(q, u[:, r])
        out.append(x)
        q.scatter_(1, x[:, None], 0.0)
        q = torch.where(q.sum(1, keepdim=True) > 0, q, torch.ones_like(q))  # exhausted support: any token
    return torch.stack(out, 1)


@dataclass
class TreeResult:
    path: list[int]  # node indices from the root (node 0) to the last accepted node
    token: int  # the token after it
    tests: int  # children tested (uniforms used before the final draw)
    dist: torch.Tensor  # [V] the distribution the token was drawn from


def accept_tree(P: torch.Tensor, tokens: torch.Tensor, parent: torch.Tensor, rank: torch.Tensor,
                q: Optional[torch.Tensor], rule, u: torch.Tensor, allowed: Optional[torch.Tensor] = None) -> TreeResult:
    """One image's tree walk (module docstring). P [N+1, V] target rows (rule.target_probs), tokens,
    parent, rank [N+1], q [N+1, V] or None (dynamic tree: q = 1), u [N+1] uniforms (u[t] for the t-th
    test, u[N] for the final draw), allowed [N+1] bool: nodes that may be accepted (inside the image)."""
    n = tokens.shape[0]
    # the tree's small integer arrays as Python lists once (per-element tensor reads cost microseconds each)
    toks, par, rk = tokens.tolist(), parent.tolist(), rank.tolist()
    ok = [True] * n if allowed is None else allowed.tolist()
    uu = u.tolist()
    children: dict[int, list[int]] = {}
    for i in range(1, n):
        if ok[i]:
            children.setdefault(par[i], []).append(i)
    for c in children.values():
        c.sort(key=lambda i: rk[i])
    # the lossless rule on fp32 CPU rows of a sampled tree: a child's acceptance min(1, p(x) / q'(x)) as numpy fp32
    # scalars (speculative.ratio_host, the same IEEE operations StandardRule.acceptance does on one-element tensors)
    scalar = (q is not None and type(rule) is StandardRule and P.dtype == q.dtype == torch.float32
              and P.device.type == "cpu" and q.device.type == "cpu")
    node, path, t = 0, [0], 0
    p, rejected = P[0], False
    while True:
        tried: list[int] = []
        rejected = False
        accepted = None
        for ch in children.get(node, []):
            x = toks[ch]
            if x in tried:
                continue
            a = None
            if q is None:
                qrow = torch.zeros_like(p)
                qrow[x] = 1.0
            else:
                qrow = q[ch]
                if tried:  # a copy with the earlier siblings removed (q itself is left alone)
                    qrow = qrow.clone()
                    qrow[tried] = 0.0
                s = qrow.sum()
                s_, qx = (s.numpy()[()], qrow.numpy()[x]) if scalar else (s, qrow[x])
                if s_ <= 0 or qx <= 0:
                    tried.append(x)
                    continue
                if scalar:  # the renormalised row q' only when a rejection reads it (below)
                    a = float(ratio_host(p.numpy()[x], qx / s_))
                else:
                    qrow = qrow / s
            tried.append(x)
            xt = torch.tensor([x], device=p.device)
            if a is None:
                a = float(rule.acceptance(p[None], qrow[x][None], xt)[0])
            ut = uu[t]  # t <= N - 1 tests in all: u[N] stays for the final draw
            t += 1
            if ut < a:
                accepted = ch
                break
            r = _tree_residual(rule, p, qrow / s if scalar else qrow, xt, q is None)
            p, rejected = r / r.sum(), True
        if accepted is None:
            break
        node = accepted
        path.append(node)
        p = P[node]
    final = p if rejected else rule.bonus(p[None])[0]
    if final.device.type != "cpu":
        y = int(sample_from_probs(final[None], u[n - 1:n])[0])
    elif final.shape[0] <= SMALL_LEVEL:  # the same id in Python floats (_draw_small), numpy or torch
        y = _draw_small(final.tolist(), uu[n - 1])
    else:
        y = int(sample_from_probs_host(final.numpy()[None], np.asarray(uu[n - 1:n]))[0])
    return TreeResult(path, y, t, final)


def _tree_residual(rule, p: torch.Tensor, qrow: torch.Tensor, x: torch.Tensor, one_hot_draft: bool) -> torch.Tensor:
    """The rule's residual after rejecting x. For dynamic trees (q = 1) LANTERN's official path zeroes x
    and, when its nearest neighbour was within the bound, its k + 1 nearest neighbours in p itself
    (`evaluate_posterior`, lines 765-778 at 3a56e45); otherwise the rule's own residual."""
    if one_hot_draft and getattr(rule, "name", "") == "lantern" and not getattr(rule, "greedy", False) \
            and getattr(rule, "rule", "official") == "official":
        _, take = rule.pooled(p[None], x)
        r = p.clone()
        r[x] = 0.0
        if bool(take[0, 0]):
            r[rule.table.to(p.device)[x[0]]] = 0.0
        return r if r.sum() > 0 else torch.ones_like(r)
    return rule.residual(p[None], qrow[None], x)[0]
