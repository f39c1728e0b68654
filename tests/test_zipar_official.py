"""ZipAR parity with the official LlamaGen-ZipAR decoding loop (greedy: same tokens for the same window).

The reference below is re-derived, in this file's own code, from ThisisBillhe/ZipAR at commit
2a5695ca2525872ac6ee38c9d62be38f0c9e985b:
* LlamaGen-ZipAR/autoregressive/models/generate_zipar.py lines 124-218 (`decode_n_tokens_zipar`: the
  active-row list, per-row token counts, the stand-in token appended when a row reaches the window,
  its position at the row above's last slot, the re-feed of a completed row's last token whose logits
  are skipped, the stand-in's removal after the new row's first token) and lines 262-279 (`generate`:
  prefill samples token 0, row 0 sequentially, then the ZipAR loop from row 1);
* LlamaGen-ZipAR/autoregressive/models/gpt.py lines 170-185 (K/V written at the slots of `input_pos`,
  i.e. raster slots, so a re-fed token overwrites the stand-in) and line 364 (mask = causal over slots).

It keeps the official layout (a raster-slot cache, input_ids with the stand-in inserted and removed)
and shares nothing with arexport/runtime/methods/zipar.py (generation-order cache, planned schedule,
masks that hide replaced entries): equal tokens mean the plan and the masks are the official ones.
One documented difference: the official cache is zero-initialised and its causal mask also shows the
not-yet-written slots below a query (zero keys/values that still take softmax weight); the reference,
like arexport, shows a query only written slots (`written` below).
"""

from __future__ import annotations

import pytest
import torch

from arexport.errors import ArexportError
from arexport.models.registry import load_model
from arexport.runtime.backends.torch.runner import TorchEngine
from arexport.runtime.generator import Generator
from arexport.runtime.methods import zipar as zipar_mod
from arexport.runtime.sampling import SamplingParams

GRID = 6
TINY = {"n_layer": 2, "dim": 64, "n_head": 4, "grid_size": GRID, "multiple_of": 32, "vocab_size": 1024}


@pytest.fixture(scope="module")
def model():
    return load_model("llamagen-c2i-B", random_init=True, seed=5, overrides=dict(TINY))


def official_zipar(lm, classes: torch.Tensor, window: int, cfg_scale: float = 1.0) -> torch.Tensor:
    """Greedy ZipAR the official way; raster tokens [B, GRID * GRID]."""
    net, T, W = lm.model, 1, GRID
    b = classes.shape[0]
    cond = torch.cat([classes, torch.full_like(classes, net.cfg.num_classes)]) if cfg_scale > 1.0 else classes
    rows = cond.shape[0]
    slots = T + W * W
    shape = (rows, net.cfg.n_head, slots, net.cfg.dim // net.cfg.n_head)
    keys = [torch.zeros(shape) for _ in net.layers]
    values = [torch.zeros(shape) for _ in net.layers]
    written = torch.zeros(slots, dtype=torch.bool)

    def forward(tok: torch.Tensor, grid_pos: list[int]) -> torch.Tensor:
        """Feed tok [B, q] at grid positions (raster slot T + pos); greedy-ready logits [B, q, V]."""
        slot = torch.tensor([T + p for p in grid_pos])
        written[slot] = True
        mask = (torch.arange(slots)[None, :] <= slot[:, None]) & written[None, :]  # gpt.py:364, written slots only
        tok = torch.cat([tok, tok]) if cfg_scale > 1.0 else tok

        def write(past, new, _):  # gpt.py:182-183: k/v at the slots of input_pos
            past[:, :, slot] = new.to(past.dtype)
            return past

        logits, _, _ = net.step(tok, torch.tensor(grid_pos).expand(rows, -1), torch.zeros(rows, dtype=torch.long),
                                mask[None, None].expand(rows, 1, -1, -1), keys, values, write)
        if cfg_scale > 1.0:
            c, u = logits[:b], logits[b:]
            logits = u + (c - u) * cfg_scale
        return logits

    # prefill (generate_zipar.py:264-265): the class token at slot 0
    written[:T] = True
    pre, _, _ = net.prefill_embeds(cond, written[None, None, None].expand(rows, 1, T, -1), keys, values,
                                   lambda past, new, _: past.index_copy_(2, torch.arange(T), new.to(past.dtype)))
    if cfg_scale > 1.0:
        pre = pre[b:] + (pre[:b] - pre[b:]) * cfg_scale
    input_ids = pre.argmax(-1)[:, None]
    # row 0 one token at a time (generate_zipar.py:270-273)
    for c in range(1, W):
        nxt = forward(input_ids[:, -1:], [c - 1]).argmax(-1)
        input_ids = torch.cat([input_ids, nxt], 1)
    # the ZipAR loop (generate_zipar.py:124-218)
    count = [W] + [0] * (W - 1)
    ongoing = [1]
    last_of_done_row = None  # index in input_ids of a completed row's last token, fed next step
    while input_ids.shape[1] < W * W:
        feed, pos = [], []
        if last_of_done_row is not None:
            r = ongoing[0] - 1
            assert last_of_done_row == sum(count[:ongoing[0]]) - 1
            feed.append(input_ids[:, last_of_done_row])
            pos.append(r * W + count[r] - 1)
        for i, r in enumerate(ongoing):
            at = sum(count[:r + 1]) - 1
            if count[r] == 1 and count[ongoing[i - 1]] == window:  # the new row's stand-in, first use
                count[r] = 0
            feed.append(input_ids[:, at])
            pos.append(r * W + count[r] - 1)
        logits = forward(torch.stack(feed, 1), pos)
        skip = 1 if last_of_done_row is not None else 0
        last_of_done_row = None
        finished = []
        for i in range(len(feed) - skip):
            r = ongoing[i]
            nxt = logits[:, i + skip].argmax(-1)[:, None]
            at = sum(count[:r + 1])
            input_ids = torch.cat([input_ids[:, :at], nxt, input_ids[:, at:]], 1)
            count[r] += 1
            if r > 1 and count[r] == 1:
                input_ids = input_ids[:, :-1]  # drop the stand-in
            if count[r] == window and r < W - 1 and r + 1 not in ongoing:
                above_last = sum(count[:r]) - 1  # line 201: the newest token of the rows before r
                input_ids = torch.cat([input_ids, input_ids[:, above_last:above_last + 1]], 1)
                ongoing.append(r + 1)
                count[r + 1] += 1
            if count[r] == W:
                last_of_done_row = at
                finished.append(r)
        for r in finished:
            ongoing.remove(r)
    return input_ids


def run_zipar(lm, classes, window, cfg_scale=1.0, batch_size=None):
    gen = Generator(TorchEngine(lm))
    res = gen.generate(classes=classes.tolist(), method="zipar", method_options={"window": window},
                       sampling=SamplingParams(temperature=0.0, cfg_scale=cfg_scale), seed=0, images=False,
                       timings=False, batch_size=batch_size or 8)
    return res


CLASSES = torch.tensor([3, 17, 256, 999, 640])


@pytest.mark.parametrize("window,cfg", [(2, 1.0), (5, 1.0), (3, 4.0)])
def test_greedy_tokens_equal_official(model, window, cfg):
    ref = official_zipar(model, CLASSES, window, cfg)
    res = run_zipar(model, CLASSES, window, cfg, batch_size=3)  # continuous batching: images admitted at different steps
    assert torch.equal(torch.as_tensor(res.tokens), ref)
    # forwards: prefill, W - 1 for row 0, then (H - 2) * window + W ZipAR steps
    assert res.stats["forwards_per_image_alone"] == 1 + (GRID - 1) + (GRID - 2) * window + GRID


def _not_hiding_replaced(plan, device):
    """Perturbed: a replaced stand-in stays visible next to the re-fed token."""
    t = ORIG_TABLES(plan, device)
    entries = [(k, f.pos) for k, s in enumerate(plan) for f in s]
    ek = torch.tensor([k for k, _ in entries])
    ep = torch.tensor([p for _, p in entries])
    for k, feeds in enumerate(plan):
        for j, f in enumerate(feeds):
            t["vis"][k, j] = (ek <= k) & (ep <= f.pos)
    return t


def _stand_in_from_row_above(grid, window, rows=None):
    """Perturbed: row r's stand-in is the newest token of row r - 1 instead of row r - 2's."""
    plan = ORIG_PLAN(grid, window, rows)
    return [[zipar_mod.Feed(f.target - grid + window - 1, f.pos, f.target) if f.target % grid == 0 and f.target >= 2 * grid
             else f for f in s] for s in plan]


ORIG_TABLES, ORIG_PLAN = zipar_mod.plan_tables, zipar_mod.zipar_plan


@pytest.mark.parametrize("perturb", ["visible_stand_in", "stand_in_row"])
def test_negative_controls_are_rejected(model, monkeypatch, perturb):
    ref = official_zipar(model, CLASSES, 2)
    if perturb == "visible_stand_in":
        monkeypatch.setattr(zipar_mod, "plan_tables", _not_hiding_replaced)
    else:
        monkeypatch.setattr(zipar_mod, "zipar_plan", _stand_in_from_row_above)
    assert not torch.equal(torch.as_tensor(run_zipar(model, CLASSES, 2).tokens), ref)


def test_window_limits(model):
    for bad in (1, GRID, GRID + 3):
        with pytest.raises(ArexportError, match="zipar window"):
            run_zipar(model, CLASSES[:1], bad)
    plan = zipar_mod.zipar_plan(GRID, 2)
    fed = sorted(f.target for s in plan for f in s if f.target >= 0)
    assert fed == list(range(1, GRID * GRID))  # every token but the prefill's, once


def test_onnx_engine_matches_torch(demo, demo_engine):
    """The exported token step (ONNX Runtime) runs ZipAR's non-contiguous queries and masks as torch does."""
    opts = dict(classes=[0, 3, 7], method="zipar", method_options={"window": 3}, sampling=SamplingParams(cfg_scale=1.5),
                seed=4, images=False, timings=False, batch_size=2)
    ref = Generator(TorchEngine(demo)).generate(**opts).tokens
    got = Generator.load(str(demo_engine), backend="ort").generate(**opts).tokens
    assert (got == ref).all()
    with pytest.raises(ArexportError, match="zipar window 2 on a 8x8 grid needs 9 cache slots past the image"):
        Generator.load(str(demo_engine), backend="ort").generate(**dict(opts, method_options={"window": 2}))


def test_other_raster_families_share_the_method(tmp_path):
    """RAR and Janus run zipar on their token step: rows 0 and 1 (whose queries share steps with row 2's,
    at non-contiguous positions) equal greedy raster AR; later rows differ (ZipAR is lossy)."""
    from test_janus import make_janus
    from test_rar import TINY as RAR_TINY

    sp = SamplingParams(temperature=0.0)
    rar = Generator(TorchEngine(load_model("rar-b", random_init=True, seed=5, overrides=dict(RAR_TINY, grid_size=5))))
    make_janus(tmp_path / "janus")
    janus = Generator.load("janus-pro", checkpoint=str(tmp_path / "janus"), overrides={"prompt_slots": 16})
    for gen, cond, w in ((rar, {"classes": [1, 2, 3]}, 5), (janus, {"prompts": ["a cat", "a red dog"]}, 4)):
        ar = gen.generate(**cond, method="ar", sampling=sp, images=False, timings=False).tokens
        z = gen.generate(**cond, method="zipar", method_options={"window": 2}, sampling=sp, images=False, timings=False).tokens
        assert (ar[:, :2 * w] == z[:, :2 * w]).all()
        assert not (ar == z).all()
