"""`eagle`: tree speculative decoding with an EAGLE draft head (lossless with the standard rule).

Per round and image (runtime/tree.py has the tree and acceptance rules):

1. the head catches up on the pairs (h_t, x_{t+1}) the last verification produced (target hidden
   states of the accepted path and the tokens after them), one head call for the batch; its last
   output drafts the root's children;
2. a tree grows: EAGLE-2's dynamic tree (`--tree dynamic`: `--tree-depth` more head calls on the top-k
   frontier) or LANTERN++'s static tree (`--tree static`: one head call per level, children drawn
   without replacement);
3. one target call (the `tree_verify` step: logits and hidden states) over [root, nodes] at positions
   root + depth under the tree mask; the walk keeps a path and draws the next token;
4. the target cache keeps the path's K/V (copied down to consecutive slots), the head keeps none of
   the tree's: the path's target hidden states are its next catch-up.

A pair (h, x) sits at the grid cell of the token x it feeds (the official head's position ids:
`cnets_llamagen.py` at 3a56e45 counts `cls_token_num` = 119 zero-RoPE rows for t2i, 0 for c2i, lines
562-573, and `topK_genrate` numbers the shifted pairs from 0, lines 731-760, so the pair of the last
condition position and token 0 lands on cell 0). The prefill of a c2i image runs through the
`tree_verify` step, so it also returns the class position's hidden state: the image's first round
catches up on (h_cond, token 0) and drafts, as the official `initialize_tree` does; a t2i caption
prefill does the same through the `caption_prefill_hidden` step, which returns every caption position's hidden
state: the head first catches up on all of them as the official t2i `initialize_tree` -> `topK_genrate` does
(`_caption_catch_up`), then drafts from the last one paired with token 0.
On an engine built without that step, a t2i image's first round drafts nothing and its verify is a plain
decode of token 0. Images of one batch share tree shapes; a node
that would pass the image's last token is never accepted. Each image draws N + 1 uniforms per round
for acceptance (and N for a static tree's draws) from its own stream, so its tokens do not depend on
the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from arexport.errors import ArexportError
from arexport.runtime.engine import HEAD_RECORD, StepRecord
from arexport.runtime.kv_cache import KVCache
from arexport.runtime.methods.base import Decoder, Method, Options, option, register
from arexport.runtime.sampling import probs_from_logits
from arexport.runtime.speculative import StandardRule
from arexport.runtime.tree import (SMALL_STATIC_TREE, Tree, accept_tree, grow_dynamic, parse_tree_choices, sampled_level,
                                   static_plan)

TREES = ("dynamic", "static")
MAX_HEAD_THREADS = 256
VERIFY_KIND = "tree_verify"


@dataclass(frozen=True)
class EagleOptions(Options):
    draft_head: Optional[str] = option(None, "EAGLE draft head: a packaged name (demo-eagle), a released drafter directory "
                                       "(config.json + model.safetensors|pytorch_model.bin) or a .safetensors file",
                                       flag="--draft-head")
    tree: str = option("dynamic", "draft tree: dynamic (EAGLE-2: top-k expansion by cumulative draft probability, "
                       "re-ranked to --tree-tokens) or static (LANTERN++ --static_tree: fixed --tree-choices, sampled drafts)",
                       flag="--tree", choices=TREES)
    top_k: int = option(4, "children per expanded node (dynamic tree)", flag="--tree-top-k")
    depth: int = option(3, "head calls that expand the dynamic tree past the root's children", flag="--tree-depth")
    tokens: Optional[int] = option(None, "draft nodes per tree (dynamic; default: the engine's verify block - 1, at most 15)",
                                   flag="--tree-tokens")
    choices: Optional[str] = option(None, "static tree paths, child ranks joined by ',' and paths by ';' "
                                    "(default: a 15-node tree 4 levels deep)", flag="--tree-choices")
    head_threads: Optional[int] = option(None, "intra-op threads of an exported head's ONNX Runtime session (default: 1 "
                                         "for a head narrower than 512, ONNX Runtime's default otherwise)",
                                         flag="--head-threads")

    def validate(self):
        if self.top_k < 1 or self.depth < 0:
            raise ArexportError(f"eagle needs --tree-top-k >= 1 and --tree-depth >= 0, got {self.top_k} and {self.depth}")
        if self.tokens is not None and self.tokens < 1:
            raise ArexportError(f"eagle --tree-tokens must be >= 1, got {self.tokens}")
        if self.choices is not None:
            parse_tree_choices(self.choices)
        if self.head_threads is not None and not 1 <= self.head_threads <= MAX_HEAD_THREADS:
            raise ArexportError(f"eagle --head-threads must be in 1..{MAX_HEAD_THREADS}, got {self.head_threads}")
        return self


class EagleDrafting:
    """Methods for an options class whose method can draft with an EAGLE head (lantern, vvs): the class declares
    `drafter` and EagleOptions' fields (draft_head, tree, top_k, depth, tokens, choices) under the same names."""

    @property
    def drafter_name(self) -> str:
        return self.drafter or ("eagle" if self.draft_head else "sd")

    def eagle_options(self) -> EagleOptions:
        return EagleOptions(draft_head=self.draft_head, tree=self.tree, top_k=self.top_k, depth=self.depth,
                            tokens=self.tokens, choices=self.choices)


class EagleDecoder(Decoder):
    """EAGLE tree speculative decoding under an acceptance rule (StandardRule: lossless)."""

    max_pend = 0  # tokens a skipped round may leave without target K/V (VVS: a tree path's drafts)
    # a static tree grows no level past the deepest node any image can accept (fewer head calls near an image's end;
    # the tokens are the same). VVS keeps every level: its skip decision reads every node's token.
    trim_levels = True
    # a static-tree round where every image verifies draws the tree's N uniforms and the walk's N + 1 in one hash
    # (Slots.uniforms: the same numbers as two calls). VVS's skipping images draw no walk, so it draws them apart.
    one_hash = True

    def __init__(self, ctx, capacity: int, rule=None, head=None):
        super().__init__(ctx, capacity, 2 if ctx.params.uses_cfg else 1)
        o, spec, s = self.opts, self.spec, self.slots
        self.rule = rule or StandardRule()
        self.batch_sampling_keys = self.rule.batch_sampling_keys
        if VERIFY_KIND not in self.engine.step_kinds():
            raise ArexportError(f"eagle verifies trees with the {VERIFY_KIND} step, which this engine lacks (it has "
                                f"{', '.join(self.engine.step_kinds())}): rebuild it with --step {VERIFY_KIND}")
        self.head = head if head is not None else load_head(o, spec, self.engine.device)
        limit = self.engine.max_q - 1
        if o.tree == "static":
            paths = parse_tree_choices(o.choices) if o.choices else SMALL_STATIC_TREE
            plan = static_plan(paths)
            if plan.n_nodes > limit:
                raise ArexportError(f"the static tree has {plan.n_nodes} nodes; this engine verifies at most {limit} "
                                    "drafts at once: pass smaller --tree-choices or rebuild with a larger --verify-len")
            self.static = plan.to(self.slots.device)
            self.n_nodes = plan.n_nodes
            self.max_depth = len(plan.levels)
        else:
            pool = o.top_k + o.depth * o.top_k**2
            room = limit - (o.depth + 1 if self.max_pend else 0)  # VVS: a skipped path's drafts go first
            self.n_nodes = o.tokens if o.tokens is not None else max(1, min(room, 15, pool))
            if self.n_nodes > limit:
                raise ArexportError(f"--tree-tokens {self.n_nodes} does not fit this engine's verify block of "
                                    f"{limit + 1}: pass {limit} or less, or rebuild with a larger --verify-len")
            if self.n_nodes > pool:
                raise ArexportError(f"--tree-tokens {self.n_nodes} exceeds the {pool} candidates of top-k {o.top_k} and "
                                    f"depth {o.depth}")
            self.static = None
            self.max_depth = o.depth + 1
        if self.max_pend:
            self.max_pend = self.max_depth
            if self.n_nodes + self.max_pend > limit:
                raise ArexportError(f"a tree of {self.n_nodes} nodes after up to {self.max_pend} tokens of a skipped round does "
                                    f"not fit this engine's verify block of {limit + 1}: pass --tree-tokens "
                                    f"{max(limit - self.max_pend, 0)} or less (or smaller --tree-choices), or rebuild with a "
                                    "larger --verify-len")
        N, rows = self.n_nodes, capacity * self.cfg.per_image
        self.tcache = s.cache(self.engine.allocate(rows, lookahead=N + self.max_pend))
        hc = self.head.cfg
        tree_slots = N if self.static is not None else o.depth * o.top_k
        self.caption_pairs = max(spec.cond_len - 1, 0) if spec.model_type == "t2i" else 0  # see _caption_catch_up
        # committed pairs (caption ones included), a catch-up, the tree levels
        hslots = self.caption_pairs + spec.n_tokens + max(N, tree_slots) + self.max_depth + 2
        k, v = self.head.allocate(rows, hslots)
        hslots = k[0].shape[2]  # an exported head's static cache may be longer than needed
        self.hcache = s.cache(KVCache(k, v, torch.zeros(rows, dtype=torch.long, device=s.device),
                                      torch.ones(rows, hslots, dtype=torch.bool, device=s.device)))
        self.tokens = s.image_tensor((spec.n_tokens + 1,))
        self.n = s.image_tensor(())  # committed tokens
        self.pc = s.image_tensor(())  # pending head pairs (hidden states in self.ph)
        self.pend = s.image_tensor(())  # committed tokens before the root without target K/V (VVS skips)
        self.ph = s.row_tensor((self.max_depth + 1, hc.dim), self.head.dtype)
        self._aranges: dict = {}

    def start(self, a, b, conds):
        rows = self.cfg.conditions(self.engine, conds)
        view = self.tcache.view(*self.slots.rows_of(a, b))
        view.key_valid.fill_(True)
        logits, hidden = self.engine.family.prefill_hidden(self.engine, view, rows.to(self.engine.device))
        self.tokens[a:b, 0] = self.first_token(logits, a, b)
        self.n[a:b], self.pend[a:b] = 1, 0
        r0, r1 = self.slots.rows_of(a, b)
        self.hcache.length[r0:r1] = 0
        if hidden is None:  # t2i engine without caption_prefill_hidden: the first round drafts nothing
            self.pc[a:b] = 0
        else:  # hidden [rows, T_cond, dim]: the pair (h_last, token 0) waits for the first round's catch-up
            if hidden.shape[1] > 1:
                self._caption_catch_up(a, b, r0, r1, hidden[:, :-1])
            self.ph[r0:r1, 0] = hidden[:, -1].to(self.ph.dtype)
            self.pc[a:b] = 1
        for st in self.slots.stats[a:b]:
            st.forwards += 1

    # -- head -----------------------------------------------------------------------------------------
    def _caption_catch_up(self, a, b, r0, r1, hidden):
        """A t2i image's head cache before its first round, as the official first head call fills it: the pairs
        (h_i, x_{i+1}) of caption positions i < T-1 (every target hidden state but the last, hidden [rows, T-1,
        dim]), whose x_{i+1} are token 0 (the official zero padding after the caption) at position -1 (zero
        rotary: the head table's `cls_token_num` = T-1 leading rows), causal, no caption mask, at head slots
        0..T-2; the last pair (h_{T-1}, token 0 of the image) at cell 0 is the round's catch-up. Calls of at most
        the head's query limit (an exported head's max_q), each timed like `_head`; the outputs are unused (the
        official call drafts from its last output, the pair the catch-up feeds)."""
        rows, t = hidden.shape[0], hidden.shape[1]
        if t > self.caption_pairs:
            raise ArexportError(f"{t} caption hidden states exceed the {self.caption_pairs} head slots set aside for them")
        dev = hidden.device
        hc = self.hcache.view(r0, r1)
        slots = torch.arange(self.hcache.s_max, device=dev)
        chunk = int(getattr(self.head, "max_q", t))
        for s0 in range(0, t, chunk):
            q = min(chunk, t - s0)
            write = torch.full((rows,), s0, dtype=torch.long, device=dev)
            mask = (slots[None, None, :] <= (s0 + torch.arange(q, device=dev))[None, :, None]).expand(rows, -1, -1)
            self._head(hidden[:, s0:s0 + q].to(self.head.dtype), torch.zeros(rows, q, dtype=torch.long, device=dev),
                       torch.full((rows, q), -1, dtype=torch.long, device=dev), write, mask[:, None].contiguous(), hc)
            for st in self.slots.stats[a:b]:
                st.draft_forwards += 1
        self.hcache.length[r0:r1] = t

    def _head(self, hidden, tokens, positions, write, mask, hc=None):
        """One head call on rows: (guided draft logits per image [B, q, V], out hidden per row); positions are cells
        >= 0 (every node's and catch-up's: n - pc + j, n - 1 + depth, n >= pc >= 0), or -1 for a caption pair. hc:
        the head cache's rows (default: the first hidden.shape[0]). When the target engine records timings, the
        call is timed as a `draft_head` record of its own (HEAD_RECORD) in the target's records, so `profile`
        reports it beside the target's steps instead of inside the host time."""
        hc = self.hcache.view(0, hidden.shape[0]) if hc is None else hc
        eng = self.engine
        timed = eng.record_timings
        if timed:
            eng._sync()
            t0 = time.perf_counter()
        logits, out, _, _ = self.head.step(hidden, tokens, positions, write, mask, hc.keys, hc.values)
        if timed:
            eng._sync()
            eng.records.append(StepRecord(HEAD_RECORD, hidden.shape[0], tokens.shape[1], time.perf_counter() - t0))
        return logits, out

    def _draft_dist(self, logits, token_index):
        """Per-image draft log-probabilities [B, q, V] and probabilities from per-row head logits."""
        params = self.params
        g = self.cfg.guide(logits, token_index, params)
        if getattr(params, "greedy", False):
            lp = torch.log_softmax(g.float(), -1)
            return lp, lp.exp()
        p = probs_from_logits(g, params)
        return torch.log(p), p

    def _draft_probs(self, logits, token_index):
        """`_draft_dist`'s probabilities alone (a static tree draws from them and never reads the log)."""
        params = self.params
        if getattr(params, "greedy", False):
            return self._draft_dist(logits, token_index)[1]
        return probs_from_logits(self.cfg.guide(logits, token_index, params), params)

    def _catch_up(self, b, dev):
        """Feed the pending pairs; the head's last output per row (hidden [rows, dim]) and per-image draft
        log-probs / probs [B, V] for the root's children; `ready` [B]: images with a pending pair."""
        cfg, n, pc = self.cfg, self.n[:b], self.pc[:b]
        rows = b * cfg.per_image
        ready = pc > 0
        P = max(int(pc.max()), 1)
        j = self._arange(P)
        tok_idx = (n - pc)[:, None] + j  # x_{t+1} of pair j
        toks = torch.where(j < pc[:, None], self.tokens[:b].gather(1, tok_idx.clamp(0, self.tokens.shape[1] - 1)), 0)
        pos = tok_idx  # the fed token's cell
        hl = self.hcache.length[:rows]
        write = hl.clone()
        slots = self._arange(self.hcache.s_max)
        qslot = write[:, None] + j[None, :]
        mask = (slots[None, None, :] <= qslot[:, :, None]).unsqueeze(1)
        logits, out = self._head(self.ph[:rows, :P], cfg.expand(toks), cfg.expand(pos), write, mask)
        last = cfg.expand((pc - 1).clamp(min=0))
        every = self._arange(rows)
        out_last = out[every, last]
        lg_last = logits[every, last][:, None]
        self.hcache.length[:rows] += cfg.expand(pc)
        lp, p = self._draft_dist(lg_last, n[:, None].clamp(max=self.spec.n_tokens - 1))
        self._count(ready, draft=True)
        return out_last, lp[:, 0], p[:, 0], ready

    def _grow(self, b, dev, out_root, lp0, p0, ready, u=None):
        """The round's tree [B] and the head calls it took; u: a static tree's uniforms [B, N] when already drawn."""
        cfg, n = self.cfg, self.n[:b]
        rows = b * cfg.per_image
        base = self.hcache.length[:rows].clone()  # committed head slots (catch-up included)
        slots = self._arange(self.hcache.s_max)
        committed = slots[None, :] < base[:, None]  # [rows, S]
        if self.static is None:
            k = self.opts.top_k
            state = {}

            def expand(level, f_tok, f_par):
                """Feed one frontier level [B, k] (slots base + level k ..): its draft log-probs [B, k, V]."""
                if level == 0:
                    hid = out_root[:, None].expand(-1, k, -1)
                    anc = torch.zeros(rows, k, 0, dtype=torch.bool, device=dev)
                else:  # a node's input is its parent's head output; it sees the parent's ancestors and the parent
                    par = cfg.expand(f_par)
                    hid = state["hidden"].gather(1, par[:, :, None].expand(-1, -1, state["hidden"].shape[-1]))
                    prev = state["anc"].gather(1, par[:, :, None].expand(-1, -1, state["anc"].shape[-1]))
                    anc = torch.cat([prev, torch.nn.functional.one_hot(par, k).bool()], 2)
                write = base + level * k
                m = committed[:, None, :].expand(-1, k, -1).clone()
                ar = torch.arange(level * k + k, device=dev)
                seen = torch.cat([anc, torch.eye(k, dtype=torch.bool, device=dev).expand(rows, k, k)], 2)
                m.scatter_(2, (base[:, None] + ar[None, :])[:, None, :].expand(-1, k, -1), seen)
                pos = cfg.expand((n + level)[:, None].expand(-1, k))  # the level's tokens are token n + level
                logits, out = self._head(hid, cfg.expand(f_tok), pos, write, m[:, None])
                state["hidden"], state["anc"] = out, anc
                lp, _ = self._draft_dist(logits, (n[:, None] + level + 1).clamp(max=self.spec.n_tokens - 1).expand(-1, k))
                self._count(ready, draft=True)
                return lp

            tree = grow_dynamic(lp0, expand, k, self.opts.depth, self.n_nodes)
            return tree
        plan, N = self.static, self.n_nodes
        if u is None:
            u = self.slots.uniform(N, ready)  # one draw per node
        tokens = torch.zeros(b, N + 1, dtype=torch.long, device=dev)  # the root's (column 0): advance writes it
        dist = p0.new_zeros(b, N + 1, p0.shape[-1])  # the head's distribution after each node
        dist[:, 0] = p0
        hid = out_root.new_empty(rows, N + 1, out_root.shape[-1])  # its output at each node (a level reads only
        # its parents' rows, which the root or an earlier level wrote: not zeroed)
        hid[:, 0] = out_root
        slot_of = base[:, None, None] + self._arange(N)  # draft node j + 1's head slot
        deepest = self.max_depth
        if self.trim_levels:  # no image can accept a node deeper than its tokens left - 1: those levels cost nothing
            left = (self.spec.n_tokens - n)[ready]
            deepest = min(deepest, int(left.max()) - 1 if left.numel() else 0)
        if deepest > 1:  # the head mask of every fed node at once [rows, 1, N, S]: the committed pairs, its
            # ancestors' slots and itself (slots >= base: uncommitted); a level reads its consecutive nodes' rows
            fed = committed[:, None, :].expand(-1, N, -1).clone()
            fed.scatter_(2, slot_of.expand(-1, N, -1), plan.seen.expand(rows, -1, -1))
            fed = fed[:, None]
            node_depth = plan.depth[1:]  # every draft node's position and guidance index at once; a level slices them
            pos_all = cfg.expand(n[:, None] - 1 + node_depth)  # a depth-d node is token n - 1 + d
            guide_all = (n[:, None] + node_depth).clamp(max=self.spec.n_tokens - 1)  # its draft predicts token n + d
        ready_l = ready.tolist()
        for d, lv in enumerate(plan.levels, start=1):
            sampled_level(dist, lv, u, tokens)
            if d >= deepest:
                break
            L, f0 = lv.nodes.numel(), lv.first - 1
            logits, out = self._head(hid[:, lv.node_parent], cfg.expand(tokens[:, lv.first:lv.first + L]),
                                     pos_all[:, f0:f0 + L], base + f0, fed[:, :, f0:f0 + L])
            pl = self._draft_probs(logits, guide_all[:, f0:f0 + L])
            dist[:, lv.first:lv.first + L], hid[:, lv.first:lv.first + L] = pl.to(dist.dtype), out.to(hid.dtype)
            self._count(ready_l, draft=True)
        q = dist[:, plan.parent].to(torch.float32)  # what each node was drawn from (a copy); the root: from nothing
        q[:, 0] = 0.0
        return Tree(tokens=tokens, parent=plan.parent[None].expand(b, -1), depth=plan.depth[None].expand(b, -1),
                    rank=plan.rank[None].expand(b, -1), q=q, anc=plan.anc[None].expand(b, -1, -1))

    # -- one round -----------------------------------------------------------------------------------
    def advance(self):
        s, spec, dev = self.slots, self.spec, self.slots.device
        b, n_tok = s.n, spec.n_tokens
        out_root, lp0, p0, ready = self._catch_up(b, dev)
        u_tree = u_walk = None
        if self.static is not None and self.one_hash and bool(ready.all()):  # see one_hash
            u_tree, u_walk = s.uniforms(self.n_nodes, self.n_nodes + 1)
        tree = self._grow(b, dev, out_root, lp0, p0, ready, u_tree)
        n = self.n[:b]
        tree.tokens[:, 0] = self.tokens[:b].gather(1, (n - 1)[:, None])[:, 0]
        skipping = self.skip(tree, ready)
        verifying = ~skipping
        if bool(verifying.any()):  # before the skips commit: the verify reads n, pend and the head's pairs
            self._verify(tree, ready, verifying, u_walk)
        if bool(skipping.any()):
            self.commit_unverified(tree, skipping)
        return s.where(self.n[: s.n] >= n_tok)

    # -- hooks for methods built on eagle (VVS) ----------------------------------------------------------
    def skip(self, tree: Tree, ready: torch.Tensor) -> torch.Tensor:
        """[B] bool: images that commit part of this round's tree without the target. Eagle never skips."""
        return torch.zeros_like(ready)

    def commit_unverified(self, tree: Tree, skipping: torch.Tensor) -> None:
        raise NotImplementedError

    def verified(self, rows: torch.Tensor, chain_hidden: torch.Tensor, chain_len: torch.Tensor,
                 path_hidden: torch.Tensor, path_len: torch.Tensor) -> None:
        """Hook after a verify: per row the target hidden states of the pending chain [rows, P, dim] (first
        chain_len valid: right-aligned) and of the kept path [rows, D+1, dim] (first path_len valid)."""

    # -- verification ------------------------------------------------------------------------------------
    def _verify(self, tree: Tree, ready: torch.Tensor, verifying: torch.Tensor, u: Optional[torch.Tensor] = None) -> None:
        """One target call for the verifying images over [pad, pending chain, root, nodes]: the chain (tokens a
        skipped round committed, VVS) causal, right-aligned against the root; each node sees the cache, the chain
        and its ancestors. The walk keeps a path and draws the next token; the chain's and the path's K/V move
        down to consecutive slots. Without a chain (eagle, and VVS rounds after a verify) the block is the tree
        alone: none of the chain's tensors are built (host work per round)."""
        s, spec, cfg, dev = self.slots, self.spec, self.cfg, self.slots.device
        b, n_tok = s.n, spec.n_tokens
        n = self.n[:b]
        pend = torch.where(verifying, self.pend[:b], 0) if self.max_pend else None
        Pm = int(pend.max()) if self.max_pend else 0
        N1 = tree.size
        T = Pm + N1
        view = self.tcache.view(0, s.rows)
        write = view.length.clone()
        slots = self._arange(view.s_max)
        m = ((slots[None, None, :] < write[:, None, None]) & view.key_valid[:, None, :]).expand(-1, T, -1).clone()
        tslots = (write[:, None] + self._arange(T)[None, :]).clamp(max=view.s_max - 1)
        tree_pos = (n[:, None] - 1 + tree.depth).clamp(max=n_tok - 1)
        if Pm:
            j = torch.arange(Pm, device=dev)
            chain_on = j[None, :] >= (Pm - pend)[:, None]  # [B, Pm] the real chain entries (right-aligned)
            blk = torch.zeros(b, T, T, dtype=torch.bool, device=dev)
            causal = torch.ones(Pm, Pm, dtype=torch.bool, device=dev).tril()
            blk[:, :Pm, :Pm] = causal[None] & chain_on[:, None, :]
            blk[:, :Pm, :Pm] |= torch.eye(Pm, dtype=torch.bool, device=dev)[None]  # padding rows see themselves
            blk[:, Pm:, :Pm] = chain_on[:, None, :]
            blk[:, Pm:, Pm:] = tree.mask()
            cstart = n - 1 - pend  # token index of the first chain token
            ctok = self.tokens[:b].gather(1, (cstart[:, None] + j - (Pm - pend)[:, None]).clamp(0, n_tok))
            feed = torch.cat([torch.where(chain_on, ctok, 0), tree.tokens], 1)
            cpos = (cstart[:, None] + j - (Pm - pend)[:, None]).clamp(0, n_tok - 1)
            pos = torch.cat([cpos, tree_pos], 1)
        else:
            blk, feed, pos = tree.mask(), tree.tokens, tree_pos
        m.scatter_(2, tslots[:, None, :].expand(-1, T, -1), cfg.expand(blk))
        out = self.engine.run(VERIFY_KIND, view, tokens=cfg.expand(feed), positions=cfg.expand(pos), write_index=write,
                              attn_mask=m[:, None])
        params = self.params
        tok_index = (n[:, None] + tree.depth).clamp(max=n_tok - 1)
        P = self.rule.target_probs(cfg.guide(out["logits"][:, Pm:], tok_index, params), params)  # [B, N+1, V]
        hidden = out["hidden"]
        if u is None:  # the walk's uniforms [B, N + 1] unless advance drew them with the tree's
            u = s.uniform(N1, verifying)
        remaining = n_tok - n
        allowed = (tree.depth <= (remaining - 1)[:, None]) & ready[:, None]
        D1 = self.max_depth + 1
        Pc, uc, ac = P.cpu(), u.cpu(), allowed.cpu()
        tk, pa, rk = tree.tokens.cpu(), tree.parent.cpu(), tree.rank.cpu()
        qc = None if tree.q is None else tree.q.cpu()
        tk_rows, n_list = tk.tolist(), n.tolist()
        paths_l, adv_l = [[0] * D1 for _ in range(b)], [0] * b
        for i, on in enumerate(verifying.tolist()):
            if not on:
                continue
            res = accept_tree(Pc[i], tk[i], pa[i], rk[i], None if qc is None else qc[i], self.rule, uc[i], ac[i])
            L = len(res.path) - 1
            ni = n_list[i]
            self.tokens[i, ni:ni + L + 1] = torch.tensor([tk_rows[i][j_] for j_ in res.path[1:]] + [res.token])
            adv_l[i] = L + 1
            paths_l[i] = res.path + [res.path[-1]] * (D1 - L - 1)  # padding: copies past the kept slots, which nothing reads
            s.stats[i].forwards += 1
            s.stats[i].accepted.append(L + 1)
        paths = torch.tensor(paths_l, dtype=torch.long, device=dev)
        adv = torch.tensor(adv_l, dtype=torch.long, device=dev)
        # kept K/V: the chain, then the path, down to consecutive slots from the first one written (sources never
        # precede their destinations; everything is read before anything is written)
        if Pm:
            keep_src = torch.cat([j[None, :].expand(b, -1), Pm + paths], 1)  # block offsets
            order = torch.argsort((~torch.cat([chain_on, torch.ones_like(paths, dtype=torch.bool)], 1)).long(), dim=1,
                                  stable=True)
            keep_src = keep_src.gather(1, order)  # the real chain entries first, then the path
        else:
            keep_src = paths
        rk_ = cfg.expand(keep_src)
        src = (write[:, None] + rk_).clamp(max=view.s_max - 1)
        dst = (write[:, None] + self._arange(rk_.shape[1])[None, :]).clamp(max=view.s_max - 1)
        index = {}  # (heads, head dim) -> the expanded source and destination indices, made once for all layers
        for buf in view.keys + view.values:
            hd = (buf.shape[1], buf.shape[3])
            if hd not in index:
                index[hd] = (src[:, None, :, None].expand(-1, hd[0], -1, hd[1]), dst[:, None, :, None].expand(-1, hd[0], -1, hd[1]))
            gi, si = index[hd]
            buf.scatter_(2, si, buf.gather(2, gi))
        rp = cfg.expand(paths)
        path_hidden = hidden[:, Pm:].gather(1, rp[:, :, None].expand(-1, -1, hidden.shape[-1]))
        vr = cfg.expand(verifying)
        rows = s.rows
        self.ph[:rows, : rp.shape[1]] = torch.where(vr[:, None, None], path_hidden.to(self.ph.dtype), self.ph[:rows, : rp.shape[1]])
        pend_rows = cfg.expand(pend) if Pm else torch.zeros_like(write)
        view.length.copy_(torch.where(vr, write + pend_rows + cfg.expand(adv), write))
        self.verified(vr, hidden[:, :Pm], pend_rows, path_hidden, cfg.expand(adv))
        self.pc[:b] = torch.where(verifying, adv, self.pc[:b])
        if self.max_pend:
            self.pend[:b] = torch.where(verifying, 0, self.pend[:b])
        self.n[:b] += adv

    def _arange(self, n: int) -> torch.Tensor:
        """torch.arange(n) on the slots' device, made once per n (read only: nothing writes into it)."""
        t = self._aranges.get(n)
        if t is None:
            t = self._aranges[n] = torch.arange(n, device=self.slots.device)
        return t

    def _count(self, rows, draft: bool = False) -> None:
        """rows: [B] bool tensor, or its list (a static tree's levels make it once per round)."""
        for st, on in zip(self.slots.stats, rows if isinstance(rows, list) else rows.tolist()):
            if on and draft:
                st.draft_forwards += 1

    def finish(self, i):
        return self.finished(i, self.tokens[i, : self.spec.n_tokens].clone())


HEAD_CACHE_SIZE = 4
_heads: dict = {}  # loaded heads, newest last: each decoder (one per generate call or session) reuses them


def _files_stamp(source: str):
    """What changes when the head on disk changes: (name, mtime_ns, size) of the file or the directory's files;
    None for a name that is not a path (a packaged head)."""
    path = Path(source)
    try:
        files = sorted(path.iterdir()) if path.is_dir() else [path] if path.exists() else []
        return tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file()) or None
    except OSError:
        return None


def load_head(opts, spec, device):
    """The head named by --draft-head, checked against the target's width and vocabulary (and, for an exported
    head, its image tokens): an exported head directory (`arexport build-head`) or an engine directory holding
    one (`build-head --into`) runs on ONNX Runtime beside a CPU target and as its TensorRT plan beside a CUDA one,
    anything else in PyTorch. A head holds only weights (or a session) that no call changes, so one is loaded
    once per source, files, device and target shape (40-70 ms on the demo, which a batch-1 generate call would
    otherwise pay); the target check runs on every call."""
    from arexport.runtime.backends import backend_package

    if not opts.draft_head:
        raise ArexportError("eagle needs a draft head: pass --draft-head DIR|FILE (or demo-eagle for --model demo), or "
                            "embed one in the engine directory with `arexport build-head HEAD --into ENGINE_DIR`")
    from arexport.runtime.backends.ort.head import OrtDraftHead, check_head_target, is_head_directory, read_head_info

    directory = is_head_directory(opts.draft_head)
    if directory:
        check_head_target(read_head_info(Path(opts.draft_head), "--draft-head"), opts.draft_head, spec)
    threads = getattr(opts, "head_threads", None)  # lantern/vvs options carry none: the default rule
    if threads is not None and not (directory and torch.device(device).type == "cpu"):
        raise ArexportError("--head-threads sets an exported head's ONNX Runtime session; this head runs in "
                            f"{'TensorRT' if directory else 'PyTorch'} (its threads are torch's: see --threads)")
    key = (opts.draft_head, _files_stamp(opts.draft_head), str(device), spec.dim, spec.vocab_size, spec.grid_size, threads)
    head = _heads.pop(key, None)
    if head is None:
        if directory and torch.device(device).type == "cuda":  # its TensorRT plan (build-head --backend trt)
            from arexport.runtime.backends.trt.head import TrtDraftHead

            head = TrtDraftHead(opts.draft_head, spec.dim, spec.vocab_size, str(device))
        elif directory:
            head = OrtDraftHead(opts.draft_head, spec.dim, spec.vocab_size, str(device), threads=threads)
        else:
            head = backend_package("torch").open_draft_head(opts.draft_head, spec.dim, spec.vocab_size, spec.grid_size,
                                                            str(device))
    _heads[key] = head
    while len(_heads) > HEAD_CACHE_SIZE:
        _heads.pop(next(iter(_heads)))
    return head


def engine_head(engine) -> Optional[str]:
    """The engine's directory when its manifest records a draft head built into it (`build-head --into`), else None."""
    from arexport.runtime.backends.ort.head import embedded_head

    d = getattr(engine, "directory", None)
    return None if d is None or embedded_head(d) is None else str(d)


def with_engine_head(method_cls, options: Optional[dict], engine, has_draft: bool) -> Optional[dict]:
    """`options` for `method_cls`, with `draft_head` set to the engine's own head when the method drafts with a head
    (eagle; lantern and vvs, whose drafter then defaults to eagle) and the caller named none, chose no other
    drafter, and gave no draft model (which lantern/vvs would draft with: sd). Explicit choices always win."""
    fields = getattr(method_cls.Options, "__dataclass_fields__", {})
    o = options or {}
    if "draft_head" not in fields or o.get("draft_head"):
        return options
    if "drafter" in fields and (o.get("drafter") not in (None, "eagle") or (o.get("drafter") is None and has_draft)):
        return options
    d = engine_head(engine)
    return options if d is None else dict(o, draft_head=d)


@register("eagle")
class Eagle(Method):
    """EAGLE tree speculative decoding (lossless)."""

    Options = EagleOptions
    help = "tree speculative decoding with an EAGLE draft head (--draft-head), lossless"

    def decoder(self, ctx, capacity, rule=None):
        return EagleDecoder(ctx, capacity, rule)
