"""arexport's `sjd` on Lumina-mGPT against the official SJD loop (issue 32): the same accepted count in
every iteration for the same random numbers, on a tiny random Lumina-mGPT.

The official loop is re-derived in this file from tyshiwo1/Accelerating-T2I-AR-with-SJD at commit
b389cfb2b6aa228efab32190f98bc13c3fd4b8e6, scheduler/jacobi_iteration_lumina_mgpt.py:
* l.1062-1071, 1142-1144: the window is [newest committed token, output_token_num - 1 drafts] and
  shrinks to the end of the Jacobi interval (here the image's end: model_wrappers/model_loader.py
  l.50-51 ends it 10 tokens early; `--option end` does the same in arexport);
* l.97-126 (sampling_logits2tokens): guidance on raw logits s (c - u) + u, then the logits processors,
  softmax, a sample at every window position; the processors (logit_processor_3dim.py l.25-44 and
  84-150, top-k l.190-203): image tokens only, the new-line token alone where (t + 1) % (w + 1) == 0;
* l.247-315 (SpeculativeSampler.__call__): for drafts i = 1 .. L-1, accept while r < min(1,
  p_{i-1}(x_i) / q_i(x_i)); at the first rejection resample from log(max(0, p - q)) through the
  processors; the committed count is that index (accepted drafts + the resampled token), or L;
* l.617-667 and 688-701: the next drafts are the samples after the committed ones (their q: this
  step's p rows), then random image tokens (l.502-514, q one-hot) up to the window.
The random numbers are shared lane by lane: draft i's acceptance uniform, one uniform per sample
(inverse CDF in token order), one per random draft slot (token floor(u * V)); they are read from
arexport's run. Teacher-forced: each iteration starts from arexport's committed tokens; when every
draft is accepted the official bonus token is the sample the window already drew at that position,
arexport's a draw from the same distribution on another lane, so only that token's lane differs.
The batch is one image (the official batch commits its minimum, README's `sjd` row).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="Lumina-mGPT needs transformers (the [text] extra)")

import arexport.runtime.methods.sjd as sjd_module  # noqa: E402
from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import SamplingParams  # noqa: E402
from tests.test_lumina_mgpt import OVERRIDES, SIDE, V, img_name, make_lumina, official_prompt  # noqa: E402

N_TOK = SIDE * (SIDE + 1)
WINDOW = 5


@pytest.fixture(scope="module")
def lumina(tmp_path_factory):
    d = tmp_path_factory.mktemp("lumina-sjd") / "Lumina-mGPT-tiny"
    model, vocab = make_lumina(d)
    return Generator.load("lumina-mgpt-7b-768", checkpoint=str(d), overrides=OVERRIDES), model, vocab


def recorded_run(gen, monkeypatch, caption, seed, top_k):
    """arexport's sjd on one image, with what each iteration drew and decided."""
    steps, rand = [], []
    real_lanes, real_verify, real_random = sjd_module.per_row_lanes, sjd_module.verify_chain, sjd_module.SJDDecoder._random_tokens

    def lanes(u, length, width, ls):
        ua, ud = real_lanes(u, length, width, ls)
        steps.append({"u_accept": ua[0].clone(), "u_draw": ud[0].clone()})
        return ua, ud

    def verify(P, Q, D, limit, u_accept, u_token, rule):
        res = real_verify(P, Q, D, limit, u_accept, u_token, rule)
        steps[-1].update(drafts=D[0].tolist(), accepted=int(res.accepted[0]))
        return res

    def random_tokens(self, u):
        rand.append(u[0].clone())
        return real_random(self, u)

    monkeypatch.setattr(sjd_module, "per_row_lanes", lanes)
    monkeypatch.setattr(sjd_module, "verify_chain", verify)
    monkeypatch.setattr(sjd_module.SJDDecoder, "_random_tokens", random_tokens)
    out = gen.generate(prompts=[caption], method="sjd", method_options={"window": WINDOW}, seed=seed, images=False,
                       sampling=SamplingParams(temperature=1.0, top_k=top_k, cfg_scale=3.0))
    monkeypatch.undo()  # the next run wraps the originals, not these recorders
    return out.tokens[0].tolist(), steps, rand, out.stats


def inverse_cdf(p, u):
    """The smallest token whose cumulative probability (token order) exceeds u times the total."""
    c = torch.cumsum(p.double(), 0)
    return int(torch.searchsorted(c, torch.tensor([float(u) * float(c[-1])], dtype=torch.float64), right=True)[0])


def official_probs(model, vocab, caption, image_ids, q_len, top_k, cfg=3.0):
    """p [q_len, V + 1] (image ids, new-line last) of the last q_len positions of image_ids (the
    committed image tokens and the window), recomputed from scratch as the official step sees them."""
    bpe = [vocab[img_name(i)] for i in range(V)] + [vocab["<reserved08799>"]]
    cond, header = official_prompt(vocab, caption)
    seq = [bpe[t] for t in image_ids]

    def logits(prefix):
        with torch.no_grad():
            h = model.model(input_ids=torch.tensor([prefix + seq])).last_hidden_state
            return model.lm_head(h)[0, -q_len:].float()

    c, u = logits(cond), logits(header)
    s = cfg * (c - u) + u
    start = len(image_ids) - q_len + 1  # image tokens so far when the first of these positions predicts
    out = torch.full_like(s, -float("inf"))
    for j in range(q_len):
        t = start + j
        allowed = [bpe[V]] if (t + 1) % (SIDE + 1) == 0 else bpe[:V]
        out[j, allowed] = s[j, allowed]
        if top_k:
            kth = torch.topk(out[j], top_k).values[-1]
            out[j] = out[j].masked_fill(out[j] < kth, -float("inf"))
    return torch.softmax(out, -1)[:, bpe]


def official_counts(model, vocab, caption, tokens, steps, rand, top_k, perturb=None):
    """Committed tokens per iteration, the official way, teacher-forced on `tokens` (see the module
    docstring); also checks the official drafting reproduces arexport's drafts."""
    counts = []
    c = 1  # the first token comes from the prefill's logits (plain sampling)
    drafts = [int(float(u) * V) for u in rand[0]]  # random image tokens
    q_rows = [None] * len(drafts)  # None: one-hot (a random draft)
    for t, st in enumerate(steps):
        L = min(WINDOW, N_TOK - c)
        assert st["drafts"] == drafts[: L - 1], f"iteration {t}: the official drafts differ"
        window = [tokens[c - 1]] + drafts[: L - 1]
        p = official_probs(model, vocab, caption, tokens[: c - 1] + window, L, top_k)
        k = L
        for i in range(1, L):  # SpeculativeSampler.__call__
            x = window[i]
            qx = 1.0 if q_rows[i - 1] is None else float(q_rows[i - 1][x])
            px = float(p[i - 1, x])
            if perturb == "q-ignored":
                qx = 1.0
            if perturb == "shifted-target":
                px = float(p[min(i, L - 1), x])
            if not float(st["u_accept"][i - 1]) < min(1.0, px / qx):
                k = i
                break
        counts.append(k)
        if perturb is None:
            if k < L:  # the resample at the rejected position, from the shared lane
                q = torch.nn.functional.one_hot(torch.tensor(window[k]), V + 1).float() if q_rows[k - 1] is None else q_rows[k - 1]
                assert inverse_cdf((p[k - 1] - q).clamp(min=0), st["u_draw"][0]) == tokens[c + k - 1], t
            else:
                assert float(p[L - 1, tokens[c + L - 1]]) > 0  # the bonus: arexport's draw, a token p allows
        samples = [inverse_cdf(p[j], st["u_draw"][1 + j]) for j in range(L)]
        fresh, fresh_q = samples[k:], [p[j] for j in range(k, L)]
        new = [int(float(u) * V) for u in rand[t + 1]]
        drafts = (fresh + new[len(fresh):])[: WINDOW - 1]
        q_rows = (fresh_q + [None] * WINDOW)[: WINDOW - 1]
        c += k
    assert c == N_TOK
    return counts


CASES = (("a red dog", 1, 0), ("photo of a big green tree house under the rain", 3, 10))


@pytest.fixture(scope="module")
def runs(lumina):
    """arexport's recorded runs: plain and top-k-filtered targets (zero-probability tokens drafted)."""
    return [(caption, top_k, recorded_run(lumina[0], pytest.MonkeyPatch(), caption, seed, top_k))
            for caption, seed, top_k in CASES]


def test_accepted_counts_equal_the_official_sjd_loop(lumina, runs):
    _, model, vocab = lumina
    decisions = rejected = accepted = 0
    for caption, top_k, (tokens, steps, rand, stats) in runs:
        counts = official_counts(model, vocab, caption, tokens, steps, rand, top_k)
        assert counts == [s["accepted"] + 1 for s in steps], caption
        assert stats["mean_accepted_length"] == pytest.approx(np.mean(counts))  # what the run reports
        decisions += sum(len(s["drafts"]) for s in steps)
        rejected += sum(s["accepted"] < len(s["drafts"]) for s in steps)
        accepted += sum(s["accepted"] > 0 for s in steps)
    print(f"{decisions} draft positions, {rejected} rejections, {accepted} iterations with accepted drafts")
    assert rejected >= 3 and accepted >= 3 and decisions >= 30  # the comparison saw both outcomes


def test_perturbed_official_loops_are_rejected(lumina, runs):
    """Negative controls: acceptance without q, or against the next position's p, changes the counts."""
    _, model, vocab = lumina
    for perturb in ("q-ignored", "shifted-target"):
        differs = False
        for caption, top_k, (tokens, steps, rand, _) in runs:
            try:
                got = official_counts(model, vocab, caption, tokens, steps, rand, top_k, perturb=perturb)
            except AssertionError:  # the perturbed loop lost track of arexport's drafts: it differs
                differs = True
                continue
            differs |= got != [s["accepted"] + 1 for s in steps]
        assert differs, perturb
