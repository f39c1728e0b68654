"""The LlamaGen reference model: published configs, RoPE facts, and cache decoding == teacher forcing."""

from __future__ import annotations

import math

import pytest
import torch

from arexport.models.llamagen import LlamaGen, LlamaGenConfig
from arexport.models.registry import LLAMAGEN_SIZES, canonical_name, model_config
from arexport.models.rope import rope_table_2d
from arexport.runtime.backends.torch.runner import TorchEngine
from arexport.families import Conditions
from arexport.errors import ArexportError

# Parameter counts LlamaGen reports next to each config in gpt.py (c2i at 256 px; t2i 7B/3B/1B).
REPORTED_PARAMS = {"B": 111e6, "L": 343e6, "XL": 775e6, "XXL": 1.4e9, "XXXL": 3.9e9, "1B": 1.2e9, "3B": 3.1e9, "7B": 6.6e9}


@pytest.mark.parametrize("size", list(LLAMAGEN_SIZES))
def test_published_configs_match_reported_sizes(size):
    mtype = "t2i" if size in ("1B", "3B", "7B") else "c2i"
    cfg = model_config(f"llamagen-{mtype}-{size}")
    n_layer, n_head, dim = LLAMAGEN_SIZES[size]
    assert (cfg.n_layer, cfg.n_head, cfg.dim) == (n_layer, n_head, dim)
    assert cfg.ffn_hidden == math.ceil(int(2 * 4 * dim / 3) / 256) * 256
    with torch.device("meta"):
        model = LlamaGen(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - REPORTED_PARAMS[size]) / REPORTED_PARAMS[size] < 0.06, (size, n)


def test_3b_head_dim_and_aliases():
    assert model_config("llamagen-c2i-3B").head_dim == 100
    assert canonical_name("GPT-XL") == "llamagen-c2i-XL"
    assert canonical_name("t2i-xl") == "llamagen-t2i-XL"
    with pytest.raises(ArexportError, match="unknown model name 'GPT-Q'"):
        canonical_name("GPT-Q")


def test_t2i_defaults():
    cfg = model_config("llamagen-t2i-XL", image_size=512)
    assert cfg.cls_token_num == 120 and cfg.caption_dim == 2048 and cfg.grid_size == 32
    spec = cfg.spec("x")
    assert spec.s_max == 120 + 1024  # already a multiple of 8
    assert model_config("llamagen-c2i-B").spec("y").s_max == 264  # 1 + 256 rounded up


def test_rope_table_matches_reference_formula():
    """Independent re-derivation of LlamaGen's precompute_freqs_cis_2d (zero rows for the condition)."""
    grid, hd, base = 4, 16, 10000.0
    cos, sin = rope_table_2d(grid, hd, base)
    half = hd // 2
    for r in range(grid):
        for c in range(grid):
            for j in range(half):
                axis_pos, k = (r, j) if j < half // 2 else (c, j - half // 2)
                theta = axis_pos / base ** (2 * k / half)
                assert cos[1 + r * grid + c, j].item() == pytest.approx(math.cos(theta), abs=1e-6)
                assert sin[1 + r * grid + c, j].item() == pytest.approx(math.sin(theta), abs=1e-6)
    assert torch.all(cos[0] == 0) and torch.all(sin[0] == 0)


def test_condition_q_and_k_are_zeroed(tiny_c2i):
    m = tiny_c2i.model
    x = torch.randn(2, 1, m.cfg.dim)
    cos, sin = m.rope(torch.full((2, 1), -1))
    q, k, v = m.layers[0].attention.project(x, cos, sin)
    assert torch.all(q == 0) and torch.all(k == 0) and v.abs().sum() > 0


def _decode_logits(engine, conds, tokens, chunks):
    """Prefill then feed `tokens[:, :-1]` in the given chunk sizes; logits [B, n, V] for every position."""
    b, n = tokens.shape
    cache = engine.allocate(b)
    out = [engine.family.prefill(engine, cache, conds).unsqueeze(1)]
    t = 0
    for q in chunks:
        w = cache.length.clone()
        pos = (t + torch.arange(q)).expand(b, q)
        out.append(engine.step(cache, tokens[:, t:t + q], pos, w, cache.causal_mask(w, q)))
        cache.length += q
        t += q
    assert t == n - 1
    return torch.cat(out, 1)


@pytest.mark.parametrize("chunks", [[1] * 15, [4, 4, 4, 3], [7, 1, 1, 6], [15]])
def test_cache_decoding_matches_teacher_forcing_c2i(tiny_c2i, chunks):
    torch.manual_seed(0)
    eng = TorchEngine(tiny_c2i)
    cls = torch.tensor([3, 1000, 999])  # includes the null class
    tok = torch.randint(0, tiny_c2i.spec.vocab_size, (3, 16))
    ref = tiny_c2i.model(cls, tok)
    got = _decode_logits(eng, Conditions(classes=cls), tok, chunks)
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("chunks", [[1] * 15, [5, 10]])
def test_cache_decoding_matches_teacher_forcing_t2i_with_padding(tiny_t2i, chunks):
    torch.manual_seed(0)
    eng = TorchEngine(tiny_t2i)
    emb = torch.randn(3, 6, 32)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, :3] = False  # left padding, as LlamaGen arranges T5 features
    mask[1, :1] = False
    tok = torch.randint(0, tiny_t2i.spec.vocab_size, (3, 16))
    ref = tiny_t2i.model(emb, tok, mask)
    got = _decode_logits(eng, Conditions(embeds=emb, mask=mask), tok, chunks)
    assert (got - ref).abs().max().item() < 1e-4


def test_rows_at_different_offsets(tiny_c2i):
    """One batched step where each row writes at its own slot equals per-row steps."""
    torch.manual_seed(1)
    eng = TorchEngine(tiny_c2i)
    cls = torch.tensor([5, 6])
    tok = torch.randint(0, 16384, (2, 16))
    ref = tiny_c2i.model(cls, tok)
    cache = eng.allocate(2)
    eng.family.prefill(eng, cache, Conditions(classes=cls))
    # Row 0 advances 5 tokens, row 1 advances 9, one row at a time.
    for row, k in ((0, 5), (1, 9)):
        w = cache.length.clone()
        sub = torch.zeros(2, k, dtype=torch.long)
        sub[row] = tok[row, :k]
        mask = cache.causal_mask(w, k)
        logits = eng.step(cache, sub, torch.arange(k).expand(2, k), w, mask)
        cache.length[row] += k
        # restore the other row's slots by re-running is unnecessary: its length did not advance
    w = cache.length.clone()  # [6, 10]
    nxt = torch.stack([tok[0, 5:8], tok[1, 9:12]])
    pos = torch.stack([torch.arange(5, 8), torch.arange(9, 12)])
    logits = eng.step(cache, nxt, pos, w, cache.causal_mask(w, 3))
    assert (logits[0] - ref[0, 6:9]).abs().max() < 1e-4
    assert (logits[1] - ref[1, 10:13]).abs().max() < 1e-4


def test_gqa_config_decodes_like_teacher_forcing():
    from arexport.models.registry import load_model

    lm = load_model("llamagen-c2i-B", random_init=True, overrides=dict(n_layer=2, dim=64, n_head=4, n_kv_head=2, grid_size=4, multiple_of=32))
    assert lm.spec.n_kv_head == 2
    eng = TorchEngine(lm)
    cls = torch.tensor([7])
    tok = torch.randint(0, 16384, (1, 16))
    got = _decode_logits(eng, Conditions(classes=cls), tok, [3, 12])
    assert (got - lm.model(cls, tok)).abs().max() < 1e-4


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="not divisible"):
        LlamaGenConfig(dim=100, n_layer=1, n_head=3)
    with pytest.raises(ArexportError, match="unknown model config field 'layers'"):
        from arexport.models.registry import parse_overrides

        parse_overrides("layers=3")
