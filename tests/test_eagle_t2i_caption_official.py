"""A t2i image's first EAGLE round against the official LANTERN t2i code: the head catches up on every caption
position before drafting, as jadohu/LANTERN does.

Re-derived here (not imported, not copied) from jadohu/LANTERN at commit 3a56e45:
- `models/ea_model_llamagen.py` l. 423-440 (`initialize_tree`): the caption prefill's hidden states
  `hidden_states` [2, T, dim] (the base model's output after its final norm, `modeling_llamagen_kv.py` l. 1186)
  go whole to `topK_genrate` with `input_ids` = T zeros (padding) followed by the first sampled token;
- `models/drafters/cnets_llamagen.py` l. 731-775 (`topK_genrate`, first call: no `stable_kv`): `input_ids[:, 1:]`,
  so pair i is (h_i, 0) for i < T-1 and (h_{T-1}, token 0); one causal call over the T pairs (no caption mask,
  l. 653-657), positions 0..T-1 (l. 645-651); the draft for the root's children is logsoftmax of the CFG
  combination (`cfg_logit_process`, l. 38-45: uncond + (cond - uncond) * scale) of lm_head(last output);
- l. 561-573 + 47-63: the head's rotary table has `cls_token_num` = T-1 all-zero rows (t2i: 119 of a 120-token
  caption) before the 2D grid rows, so the first T-1 pairs' q and k are zeroed and the last pair sits at cell 0;
  l. 67-77 rotate interleaved pairs; l. 411-501 the layer (no input norm on layer 0, RMSNorm, SiLU MLP).
The reference below recomputes the head from its state dict with those rules; the decoder under test runs its
own head code. Negative controls: the pre-fix behaviour (the last caption position only), the caption pairs at
grid cell 0 instead of the zero rotary rows, and the caption pairs fed their own token instead of the padding 0.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

T_CAPTION = 6  # tiny_t2i's caption length: 5 caption pairs, then (h_5, token 0)
CFG = 2.0


def _official_first_draft(sd, cfg, hidden, token0):
    """The official first head call on rows [cond, uncond] * images (interleaved as arexport's rows):
    hidden [R, T, dim] target hidden states, token0 [R] -> (last output [R, dim], guided log-probs [B, V])."""
    R, T, D = hidden.shape
    nh, nkv, hd, G = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.grid_size
    half = hd // 2
    freqs = 1.0 / (cfg.rope_base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    f = torch.outer(torch.arange(G).float(), freqs)
    grid = torch.cat([f[:, None, :].expand(-1, G, -1), f[None, :, :].expand(G, -1, -1)], -1).reshape(G * G, half)
    table = torch.cat([torch.zeros(T - 1, half, 2), torch.stack([grid.cos(), grid.sin()], -1)])  # cls rows first
    rope = table[torch.arange(T)].view(1, T, 1, half, 2)  # position ids 0..T-1

    def rot(x):  # [R, T, H, hd], interleaved pairs
        xs = x.float().reshape(*x.shape[:-1], half, 2)
        return torch.stack([xs[..., 0] * rope[..., 0] - xs[..., 1] * rope[..., 1],
                            xs[..., 1] * rope[..., 0] + xs[..., 0] * rope[..., 1]], -1).flatten(3)

    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps))

    ids = torch.cat([torch.zeros(R, T, dtype=torch.long), token0[:, None]], 1)[:, 1:]  # the official shift
    h = lin(torch.cat([sd["embed_tokens.weight"][ids], hidden], -1), "fc")
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        x = rms(h, sd[p + "input_layernorm.weight"]) if i else h
        q = rot(lin(x, p + "self_attn.q_proj").view(R, T, nh, hd)).transpose(1, 2)
        k = rot(lin(x, p + "self_attn.k_proj").view(R, T, nkv, hd)).transpose(1, 2).repeat_interleave(nh // nkv, 1)
        v = lin(x, p + "self_attn.v_proj").view(R, T, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, 1)
        w = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(hd) + causal, -1)
        h = h + lin((w @ v).transpose(1, 2).reshape(R, T, D), p + "self_attn.o_proj")
        y = rms(h, sd[p + "post_attention_layernorm.weight"])
        h = h + lin(F.silu(lin(y, p + "mlp.gate_proj")) * lin(y, p + "mlp.up_proj"), p + "mlp.down_proj")
    last = h[:, -1]
    logits = last @ sd["lm_head.weight"].T
    cond, uncond = logits[0::2], logits[1::2]
    return last, torch.log_softmax(uncond + (cond - uncond) * CFG, -1)


@pytest.fixture(scope="module")
def t2i_head(tiny_t2i, tmp_path_factory):
    """A random head for tiny_t2i sharing its token table and output projection, saved as a released-layout file."""
    from arexport.models.eagle import EagleConfig, EagleHead, save_eagle_head

    lm = tiny_t2i
    head = EagleHead(EagleConfig(dim=64, n_head=4, n_kv_head=2, ffn_hidden=96, vocab_size=lm.spec.vocab_size,
                                 grid_size=lm.spec.grid_size)).init_random(7, std=0.3)
    with torch.no_grad():
        head.embed_tokens.weight.copy_(lm.model.tok_embeddings.weight)
        head.lm_head.weight.copy_(lm.model.output.weight)
        for layer in head.layers:  # norms away from 1, so a dropped norm shows
            for n, p in layer.named_parameters():
                if "norm" in n:
                    p.mul_(1.0 + 0.3 * torch.rand(p.shape, generator=torch.Generator().manual_seed(3)))
    path = tmp_path_factory.mktemp("t2i-head") / "head.safetensors"
    save_eagle_head(head, path)
    return path, head


class _FirstRound(Exception):
    pass


def _first_round(lm, head_source, monkeypatch, patch=None):
    """Run greedy guided eagle on 2 captions (image 0 left-padded by 2); returns what the first catch-up saw:
    the prefill's hidden states [R, T, dim], token 0 per row, the head's last output [R, dim] and draft log-probs."""
    from arexport.runtime.backends.torch.runner import TorchEngine
    from arexport.runtime.generator import Generator
    from arexport.runtime.methods.eagle import EagleDecoder
    from arexport.runtime.sampling import SamplingParams

    engine = TorchEngine(lm)
    seen = {}
    fam = type(engine.family)
    prefill = fam.prefill_hidden
    monkeypatch.setattr(fam, "prefill_hidden", lambda self, *a: seen.setdefault("pre", prefill(self, *a)))
    catch = EagleDecoder._catch_up

    def spy(self, b, dev):
        out = catch(self, b, dev)
        seen["first"] = (self.cfg.expand(self.tokens[:b, 0].clone()), out[0].clone(), out[1].clone())
        raise _FirstRound  # nothing after round one's catch-up is compared

    monkeypatch.setattr(EagleDecoder, "_catch_up", spy)
    if patch:
        patch(monkeypatch)
    emb = torch.randn(2, T_CAPTION, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, T_CAPTION, dtype=torch.bool)
    mask[0, :2] = False
    with pytest.raises(_FirstRound):
        Generator(engine).generate(method="eagle", method_options={"draft_head": str(head_source), "tree": "static"},
                                   captions=emb, caption_mask=mask.numpy(), seed=0, images=False, timings=False,
                                   sampling=SamplingParams(temperature=0.0, cfg_scale=CFG))
    (_, hidden), (tok0, last, lp) = seen["pre"], seen["first"]
    return hidden, tok0, last, lp


def _matches_official(head, hidden, tok0, last, lp) -> bool:
    ref_last, ref_lp = _official_first_draft({k: v.float() for k, v in head.state_dict().items()}, head.cfg,
                                             hidden.float(), tok0)
    return (hidden.shape[1] == T_CAPTION and torch.allclose(last, ref_last, atol=2e-5, rtol=1e-4)
            and torch.allclose(lp, ref_lp, atol=1e-4) and torch.equal(lp.topk(4).indices, ref_lp.topk(4).indices))


def test_first_round_catches_up_on_every_caption_position_as_the_official_code(tiny_t2i, t2i_head, monkeypatch):
    path, head = t2i_head
    hidden, tok0, last, lp = _first_round(tiny_t2i, path, monkeypatch)
    assert hidden.shape == (4, T_CAPTION, 64)
    assert _matches_official(head, hidden, tok0, last, lp)


def _last_only(mp):  # the pre-fix round one: the head saw only (h_{T-1}, token 0)
    from arexport.runtime.methods.eagle import EagleDecoder

    mp.setattr(EagleDecoder, "_caption_catch_up", lambda self, *a: None)


def _pairs_at_cell0(mp):  # caption pairs rotated as grid cell 0 instead of the zero (cls) rows
    from arexport.models.eagle import EagleHead

    step = EagleHead.step
    mp.setattr(EagleHead, "step", lambda self, h, t, pos, *a, **k: step(self, h, t, pos.clamp(min=0), *a, **k))


def _own_tokens(mp):  # caption pairs fed token 1 instead of the official zero padding
    from arexport.models.eagle import EagleHead

    step = EagleHead.step
    mp.setattr(EagleHead, "step", lambda self, h, t, pos, *a, **k: step(self, h, torch.where(pos < 0, 1, t), pos, *a, **k))


@pytest.mark.parametrize("perturb", [_last_only, _pairs_at_cell0, _own_tokens])
def test_perturbed_first_rounds_are_rejected(tiny_t2i, t2i_head, monkeypatch, perturb):
    path, head = t2i_head
    assert not _matches_official(head, *_first_round(tiny_t2i, path, monkeypatch, perturb))


def test_an_exported_head_catches_up_in_calls_of_its_query_limit(tiny_t2i, t2i_head, monkeypatch, tmp_path):
    """The exported head (ONNX Runtime) with --verify-len 4 < the 5 caption pairs: the catch-up is two causal calls
    (4 + 1 pairs) and still equals the official single call; its cache was sized for the caption (caption_pairs)."""
    pytest.importorskip("onnxruntime")
    from arexport.exporter.head import build_head_engine, caption_pairs
    from arexport.runtime.backends.ort.head import OrtDraftHead

    path, head = t2i_head
    spec = tiny_t2i.spec
    out = tmp_path / "head"
    info = build_head_engine(str(path), out, spec.dim, spec.vocab_size, spec.grid_size, spec.n_tokens,
                             lm_head=tiny_t2i.model.output.weight.detach().float(), max_q=4, max_batch=4, extra_slots=24,
                             caption_pairs=caption_pairs(spec))
    assert info["slots"] == T_CAPTION - 1 + spec.n_tokens + 24
    sizes = []
    step = OrtDraftHead.step
    monkeypatch.setattr(OrtDraftHead, "step", lambda self, h, *a: sizes.append(tuple(h.shape[:2])) or step(self, h, *a))
    res = _first_round(tiny_t2i, out, monkeypatch)
    assert sizes == [(4, 4), (4, 1), (4, 1)]  # caption pairs 4 + 1, then round one's catch-up (h_5, token 0)
    assert _matches_official(head, *res)
