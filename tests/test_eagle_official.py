"""EAGLE head, draft trees and tree acceptance against the official LANTERN code, re-derived here.

Source: jadohu/LANTERN at commit 3a56e451dd5ebfa1903d044f754c68c420de27a9, read line by line:
* head forward: models/drafters/cnets_llamagen.py `Model.forward` (lines 623-727), `LlamaDecoderLayer`
  (428-493), `LlamaAttention.forward` (279-374), `precompute_freqs_cis_2d` / `apply_rotary_emb` (47-78);
* dynamic tree: cnets_llamagen.py `Model.topK_genrate` (lines 731-866);
* tree acceptance, dynamic trees (q = 1): models/ea_model_llamagen.py `evaluate_posterior`, sampling
  branch (lines 709-789), greedy branch (790-815 and 866-872);
* tree acceptance, static trees (sampled drafts): ea_model_llamagen.py `evaluate_posterior_v1`, sampling
  branch (lines 597-669), with the draft probabilities of cnets_llamagen.py `Model.sample` (924-941).

Each official procedure is re-derived below in this file's own code (nothing is shared with the
package); each comparison has a negative control (a perturbed implementation the test rejects).
"""

from __future__ import annotations

import math
import random
import zlib

import pytest
import torch

import arexport.runtime.tree as tree_mod
from arexport.models.eagle import EagleConfig, EagleHead
from arexport.runtime.speculative import LanternRule, StandardRule
from arexport.runtime.tree import accept_tree, ancestor_mask, grow_dynamic, static_tree


# -- head forward ------------------------------------------------------------------------------------------
def _official_freqs(grid, n_elem, base=10000, cls=120):
    """precompute_freqs_cis_2d (cnets_llamagen.py 47-64): [cls zeros | grid cells | 10 zeros, n_elem/2, 2]."""
    half = n_elem // 2
    f = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    f = torch.outer(torch.arange(grid).float(), f)
    g = torch.cat([f[:, None, :].expand(-1, grid, -1), f[None, :, :].expand(grid, -1, -1)], -1)
    cache = torch.stack([torch.cos(g), torch.sin(g)], -1).flatten(0, 1)
    return torch.cat([torch.zeros(cls, half, 2), cache, torch.zeros(10, half, 2)])


def _official_rot(x, fc):
    """apply_rotary_emb (67-78) on x [b, s, h, d] with fc [s, d/2, 2]."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    fc = fc.view(1, xs.shape[1], 1, xs.shape[3], 2)
    return torch.stack([xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
                        xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], -1).flatten(3)


def _official_head(sd, cfg, hidden, ids, seq_pos):
    """Model.forward with a causal mask over a fresh sequence (no cache), then the target's lm_head."""
    x = torch.nn.functional.linear(torch.cat([sd["embed_tokens.weight"][ids], hidden], -1), sd["fc.weight"], sd["fc.bias"])
    b, s, d = x.shape
    nh, hd = cfg.n_head, d // cfg.n_head
    fc = _official_freqs(cfg.grid_size, hd, cls=119)[seq_pos]  # t2i heads: cls_token_num = 119 (lines 566-569)
    causal = torch.full((s, s), torch.finfo(torch.float32).min).triu(1)

    def rms(v, w):
        return w * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6))

    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        res = x
        h = rms(x, sd[p + "input_layernorm.weight"]) if i else x  # layer 0 has no input norm
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(b, s, nh, hd)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(b, s, nh, hd)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(b, s, nh, hd).transpose(1, 2)
        q, k = _official_rot(q, fc).transpose(1, 2), _official_rot(k, fc).transpose(1, 2)
        w = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(hd) + causal, -1)
        x = res + ((w @ v).transpose(1, 2).reshape(b, s, d) @ sd[p + "self_attn.o_proj.weight"].T)
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        g, u = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ sd[p + "mlp.down_proj.weight"].T
    return x @ sd["lm_head.weight"].T, x


@pytest.mark.parametrize("shift", [0, 1], ids=["ours", "negative-control-c2i-offset"])
def test_head_logits_match_the_official_forward(shift):
    cfg = EagleConfig(dim=32, n_head=4, n_kv_head=4, ffn_hidden=48, vocab_size=37, grid_size=16, n_layer=2)
    head = EagleHead(cfg).init_random(5, std=0.2)
    with torch.no_grad():
        for n, p in head.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
            if n == "fc.bias":
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    sd = {k: v.clone() for k, v in head.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    b, s, t0 = 2, 6, 13  # positions cross a grid row: RoPE is relative only within a row
    hidden, ids = torch.randn(b, s, cfg.dim, generator=g), torch.randint(0, 37, (b, s), generator=g)
    keys, values = head.allocate(b, 20)
    pos = (t0 + torch.arange(s)).expand(b, s)  # the cells of the fed tokens
    mask = (torch.arange(20)[None, :] >= t0) & (torch.arange(20)[None, :] <= t0 + torch.arange(s)[:, None])
    logits, out, _, _ = head.step(hidden, ids, pos, torch.full((b,), t0), mask.expand(b, 1, s, 20), keys, values)
    # topK_genrate numbers the shifted pairs from 0: the pair feeding token j (h of the 120 caption slots'
    # last for j = 0) is sequence index 119 + j, i.e. cell j after the 119 zero rows
    ref_logits, ref_out = _official_head(sd, cfg, hidden, ids, 119 + t0 + torch.arange(s) + shift)
    close = torch.allclose(logits, ref_logits, atol=1e-5) and torch.allclose(out, ref_out, atol=1e-5)
    assert close == (shift == 0)


# -- dynamic tree ------------------------------------------------------------------------------------------
def _logp_of(path, v, filtered):
    """A fixed draft log-distribution after each path (seeded by the path)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr(path).encode()))
    lg = torch.randn(v, generator=g) * 2.0
    if filtered:  # top-k filtered: all but the 6 best at -inf
        lg = lg.masked_fill(lg < lg.topk(6).values[-1], float("-inf"))
    return torch.log_softmax(lg, -1)


def _official_dynamic(top_k, depth, total, v, filtered, local=False):
    """topK_genrate's tree (cnets_llamagen.py 731-866): draft tokens, tree mask, position ids.
    local=True is the negative control: the frontier re-ranked by the last step's log-prob alone."""
    top = torch.topk(_logp_of((), v, filtered), top_k)
    scores, frontier = top.values, [(int(t),) for t in top.indices]
    scores_list, parents_list, ss_token = [scores[None]], [torch.zeros(1, dtype=torch.long)], [top.indices[None]]
    cs_index = torch.arange(top_k)
    for i in range(depth):
        bias = 1 + top_k**2 * max(0, i - 1) + (top_k if i > 0 else 0)
        parents_list.append(cs_index + bias)
        lp = torch.stack([_logp_of(p, v, filtered) for p in frontier])
        t = torch.topk(lp, top_k, dim=-1)
        cu = t.values + scores[:, None]
        cs = torch.topk((t.values if local else cu).view(-1), top_k)
        cs_index, scores = cs.indices, cu.view(-1)[cs.indices]
        out_ids = cs_index // top_k
        frontier = [frontier[int(o)] + (int(t.indices.view(-1)[c]),) for o, c in zip(out_ids, cs_index)]
        ss_token.append(t.indices)
        scores_list.append(cu)
    all_scores = torch.cat(scores_list).view(-1)
    all_tokens = torch.cat(ss_token).view(-1)
    idx = torch.sort(torch.topk(all_scores, total).indices).values
    draft = all_tokens[idx]
    parents = torch.cat(parents_list)[idx // top_k]
    mask_index = torch.searchsorted(idx, parents - 1)
    mask_index[parents == 0] = -1
    mask_index = (mask_index + 1).tolist()
    m = torch.eye(total + 1).bool()
    m[:, 0] = True
    for i in range(total):
        m[i + 1] |= m[mask_index[i]]
    return draft, m, m.sum(1) - 1


def _ours_dynamic(top_k, depth, total, v, filtered):
    paths = {}

    def expand(level, f_tok, f_par):
        prev = paths.get(level - 1)
        cur = [((prev[int(p)] if level else ()) + (int(t),)) for t, p in zip(f_tok[0], f_par[0])]
        paths[level] = cur
        return torch.stack([_logp_of(p, v, filtered) for p in cur])[None]

    return grow_dynamic(_logp_of((), v, filtered)[None], expand, top_k, depth, total)


CASES = [(3, 3, 10, 20, False), (4, 2, 12, 30, True), (1, 4, 5, 9, False), (5, 2, 30, 7, False), (2, 3, 14, 11, True)]


@pytest.mark.parametrize("top_k,depth,total,v,filtered", CASES)
def test_dynamic_tree_matches_the_official_construction(top_k, depth, total, v, filtered):
    ours = _ours_dynamic(top_k, depth, total, v, filtered)
    draft, mask, pos = _official_dynamic(top_k, depth, total, v, filtered)
    assert ours.tokens[0, 1:].tolist() == draft.tolist()
    assert torch.equal(ancestor_mask(ours.parent)[0], mask)
    assert ours.depth[0].tolist() == pos.tolist()


def test_dynamic_tree_negative_control():
    """A frontier ranked by the last step's log-prob alone builds other trees, which the comparison sees."""
    differ = 0
    for top_k, depth, total, v, filtered in CASES[:2] + CASES[4:]:
        ours = _ours_dynamic(top_k, depth, total, v, filtered)
        draft, mask, _ = _official_dynamic(top_k, depth, total, v, filtered, local=True)
        differ += ours.tokens[0, 1:].tolist() != draft.tolist() or not torch.equal(ancestor_mask(ours.parent)[0], mask)
    assert differ >= 2


# -- tree acceptance -----------------------------------------------------------------------------------------
def _retrieve(parent):
    """Leaf paths of node indices from the root, -1 padded, sorted as with a logits processor
    (cnets_llamagen.py 838-866: -1 sorts last)."""
    n = len(parent)
    kids = {int(p) for p in parent[1:]}
    paths = []
    for i in range(n):
        if i not in kids:
            path, c = [], i
            while c != -1:
                path.append(c)
                c = int(parent[c])
            paths.append(path[::-1])
    width = max(map(len, paths))
    rows = [p + [-1] * (width - len(p)) for p in paths]
    return sorted(rows, key=lambda r: [x if x >= 0 else n + 5 for x in r])


def _official_accept(P, tokens, parent, rs, draft=None, lantern=None):
    """evaluate_posterior (q = 1, draft None) or evaluate_posterior_v1 (draft: (q rows at each node's
    parent, conditional draw probs per node)) with a logits processor; rs: the random.random() draws.
    lantern: (neighbour table, k, delta). Returns (accepted node path, sample_p)."""
    ret = _retrieve(parent)
    tok = tokens.tolist() + [-1]
    cand = torch.tensor([[tok[i] for i in r] for r in ret])
    C = cand.shape[1]
    rs = iter(rs)
    acc_len, acc = 1, cand[0, :1]
    best, gtp, adjust = 0, None, False
    for i in range(1, C):
        if i != acc_len:
            break
        adjust = False
        is_eq = (cand[:, :acc_len] == acc).all(1)
        fi = int(torch.nonzero(is_eq)[0][0])
        gtp = P[ret[fi][i - 1]].clone()
        seen = []
        for j in range(cand.shape[0]):
            if not is_eq[j]:
                continue
            x = int(cand[j, i])
            if x in seen or x == -1:
                continue
            seen.append(x)
            r = next(rs)
            px = gtp[x]
            ind = -1
            if lantern is not None:
                nl, k, delta = lantern
                cums = torch.cumsum(gtp[nl[x, :k]], 0)
                hit = (cums <= delta).nonzero()
                ind = int(hit[-1]) if hit.numel() else -1
                if ind != -1:
                    px = px + cums[ind]
            node = ret[j][i]
            if draft is None:
                qx = 1.0
            else:
                qx = float(draft[1][node])
                if qx <= 0:
                    continue
            if r <= px / qx:
                acc = torch.cat([acc, cand[j, i:i + 1]])
                acc_len += 1
                best = j
                break
            if draft is None:
                gtp[x] = 0
                if lantern is not None and ind != -1:
                    gtp[lantern[0][x, :lantern[1] + 1]] = 0
            else:
                q = draft[0][node].clone()
                earlier = [ret[jj][i] for jj in range(cand.shape[0]) if is_eq[jj] and cand[jj, i] != -1
                           and int(parent[ret[jj][i]]) == int(parent[node]) and ret[jj][i] < node]
                if earlier:
                    q[[int(tokens[e]) for e in set(earlier)]] = 0
                    q = q / q.sum()
                if lantern is not None and ind != -1:
                    q[lantern[0][x, :lantern[1] + 1]] = 0
                gtp = (gtp - q).clamp(min=0)
            if gtp.sum() == 0:
                gtp = torch.ones_like(gtp)
            gtp = gtp / gtp.sum()
            adjust = True
    path = ret[best][:acc_len]
    sample_p = gtp if adjust and acc_len != C else P[ret[best][acc_len - 1]]
    return path, sample_p


def _tree_case(seed, v=12, static_choices=None, filtered=False):
    g = torch.Generator().manual_seed(seed)
    if static_choices is None:
        t = _ours_dynamic(3, 2, 9, v, filtered)
        tokens, parent, rank, q, cond = t.tokens[0].clone(), t.parent[0], t.rank[0], None, None
    else:
        parent, depth, rank = static_tree(static_choices)
        n = len(parent)
        tokens = torch.zeros(n, dtype=torch.long)
        qrows = torch.softmax(torch.randn(n, v, generator=g) * 1.5, -1)
        if filtered:
            qrows = qrows * (qrows >= qrows.topk(5, dim=-1).values[:, -1:])
            qrows = qrows / qrows.sum(-1, keepdim=True)
        q = torch.zeros(n, v)
        cond = torch.zeros(n)
        for c in range(n):  # Model.sample: k draws without replacement, prob / (1 - mass drawn before)
            kids = sorted((i for i in range(1, n) if int(parent[i]) == c), key=lambda i: int(rank[i]))
            if not kids:
                continue
            drawn = torch.multinomial(qrows[c], len(kids), replacement=False, generator=g)
            before = 0.0
            for i, x in zip(kids, drawn.tolist()):
                tokens[i], q[i] = x, qrows[c]
                cond[i] = qrows[c, x] / (1 - before)
                before += float(qrows[c, x])
    tokens[0] = 0
    logits = torch.randn(len(parent), v, generator=g) * 1.5
    if filtered:
        logits = logits.masked_fill(logits < logits.topk(4, dim=-1).values[:, -1:], float("-inf"))
    P = torch.softmax(logits, -1)
    # bias the target towards the drafts so that paths of several nodes get accepted
    for i in range(1, len(parent)):
        P[int(parent[i]), int(tokens[i])] += 0.3 * float(P[int(parent[i])].max()) * (int(rank[i]) == 0)
    P = P / P.sum(-1, keepdim=True)
    return P, tokens, parent, rank, q, cond


def _neighbours(v, k, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.tensor([j for j in torch.randperm(v, generator=g).tolist() if j != x][: k + 1]) for x in range(v)])


RULES = {"standard": lambda v: (StandardRule(), None),
         "lantern": lambda v: (LanternRule(_neighbours(v, 4), k=4, delta=0.3), (_neighbours(v, 4), 4, 0.3))}


def _compare(seed, tree, rule_name, filtered, perturb=None):
    choices = None if tree == "dynamic" else ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1))
    P, tokens, parent, rank, q, cond = _tree_case(seed, static_choices=choices, filtered=filtered)
    rule, lant = RULES[rule_name](P.shape[1])
    rng = random.Random(seed)
    rs = [rng.random() for _ in range(len(parent) + 1)]
    ref_path, ref_p = _official_accept(P, tokens, parent, rs, None if q is None else (q, cond), lant)
    u = torch.tensor(rs[: len(parent) - 1] + [0.5], dtype=torch.float64)
    res = accept_tree(P, tokens, parent, rank, q, rule, u)
    return res.path == ref_path and torch.allclose(res.dist, ref_p, atol=1e-6), len(ref_path)


@pytest.mark.parametrize("filtered", [False, True], ids=["full", "top-k-filtered"])
@pytest.mark.parametrize("rule_name", ["standard", "lantern"])
@pytest.mark.parametrize("tree", ["dynamic", "static"])
def test_tree_acceptance_matches_the_official_walk(tree, rule_name, filtered):
    lengths = []
    for seed in range(40):
        same, n = _compare(seed, tree, rule_name, filtered)
        assert same, f"seed {seed}"
        lengths.append(n)
    assert max(lengths) >= 3 and len(set(lengths)) >= 2  # deep acceptances and early stops both covered
    if rule_name == "standard":
        assert min(lengths) == 1  # and walks where every child of the root was rejected


@pytest.mark.parametrize("tree", ["dynamic", "static"])
def test_tree_acceptance_negative_control(tree, monkeypatch):
    """A walk that does not form the residual after a rejection disagrees with the official one."""
    monkeypatch.setattr(tree_mod, "_tree_residual", lambda rule, p, qrow, x, one_hot: p.clone())
    assert sum(not _compare(seed, tree, "standard", False)[0] for seed in range(40)) >= 3


def test_greedy_path_matches_the_official_greedy_branch():
    """evaluate_posterior without a logits processor: the longest run of argmax matches over the leaf
    paths (the first such path), then argmax at its end."""
    mismatched_control = 0
    for seed in range(30):
        P, tokens, parent, rank, _, _ = _tree_case(seed)
        ret = _retrieve(parent)
        tok = tokens.tolist() + [-1]
        cand = torch.tensor([[tok[i] for i in r] for r in ret])
        logits = torch.log(P)[torch.tensor(ret)]
        top = logits[:, :-1].argmax(-1)
        valid = cand[:, 1:] != -1
        acc = torch.cumprod(((cand[:, 1:] == top) & valid).int(), 1).sum(1)
        L = int(acc.max())
        best = int(acc.argmax()) if L else 0
        ref_path, ref_next = ret[best][: L + 1], int(logits[best, L].argmax())
        onehot = torch.nn.functional.one_hot(P.argmax(-1), P.shape[1]).float()
        res = accept_tree(onehot, tokens, parent, rank, None, StandardRule(), torch.rand(len(parent), dtype=torch.float64))
        assert res.path == ref_path and res.token == ref_next
        # negative control: accepting on the argmax of the draft-free row (P itself, sampled) differs somewhere
        other = accept_tree(P, tokens, parent, rank, None, StandardRule(), torch.full((len(parent),), 0.5, dtype=torch.float64))
        mismatched_control += other.path != ref_path or other.token != ref_next
    assert mismatched_control >= 3
