"""EAGLE draft heads and `--method eagle`: the released drafter layout loads (random weights written in
it), bad heads are refused by name, eagle is lossless on an enumerable model (chi-square, with a
negative control the test rejects), greedy eagle equals greedy ar, and batch composition does not
change an image's tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from arexport.errors import ArexportError
from arexport.models.eagle import EagleConfig, EagleHead, load_eagle_head, save_eagle_head
from arexport.runtime.backends.torch.runner import TorchEngine
from arexport.runtime.generator import Generator
from arexport.runtime.sampling import SamplingParams
from tests.test_speculative import _tiny, chi2_p, exact_distribution, sample_counts

TINY_HEAD = dict(dim=32, n_head=2, n_kv_head=2, ffn_hidden=64, vocab_size=3, grid_size=2)


def _head_for(lm, seed=3, std=0.3):
    """A random head sharing the target's token table and output projection (as released heads do)."""
    h = EagleHead(EagleConfig(**TINY_HEAD)).init_random(seed, std=std)
    with torch.no_grad():
        h.embed_tokens.weight.copy_(lm.model.tok_embeddings.weight)
        h.lm_head.weight.copy_(lm.model.output.weight)
    return h


@pytest.fixture(scope="module")
def enum_setup(tmp_path_factory):
    lm = _tiny(11)
    path = tmp_path_factory.mktemp("head") / "tiny.safetensors"
    save_eagle_head(_head_for(lm), path)
    return lm, str(path)


def _official_dir(tmp_path, cfg: EagleConfig, fmt: str, seed=0, extra=None, drop=None):
    """A drafter directory in the released layout: config.json (HF Llama keys) and weights under the
    official parameter names (jadohu/LANTERN cnets_llamagen.py `Model`), no lm_head."""
    g = torch.Generator().manual_seed(seed)
    d, f, hd = cfg.dim, cfg.ffn_hidden, cfg.head_dim
    sd = {"embed_tokens.weight": torch.randn(cfg.vocab_size, d, generator=g), "fc.weight": torch.randn(d, 2 * d, generator=g) * 0.05,
          "fc.bias": torch.randn(d, generator=g) * 0.05}
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": torch.randn(cfg.n_head * hd, d, generator=g) * 0.1,
                   p + "self_attn.k_proj.weight": torch.randn(cfg.n_kv_head * hd, d, generator=g) * 0.1,
                   p + "self_attn.v_proj.weight": torch.randn(cfg.n_kv_head * hd, d, generator=g) * 0.1,
                   p + "self_attn.o_proj.weight": torch.randn(d, d, generator=g) * 0.1,
                   p + "mlp.gate_proj.weight": torch.randn(f, d, generator=g) * 0.1,
                   p + "mlp.up_proj.weight": torch.randn(f, d, generator=g) * 0.1,
                   p + "mlp.down_proj.weight": torch.randn(d, f, generator=g) * 0.1,
                   p + "post_attention_layernorm.weight": 1 + 0.1 * torch.randn(d, generator=g)})
        if i:
            sd[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
    sd.update(extra or {})
    for k in drop or ():
        sd.pop(k)
    out = tmp_path / f"drafter-{fmt}"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": d, "intermediate_size": f, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "num_hidden_layers": cfg.n_layer, "rms_norm_eps": 1e-6, "vocab_size": cfg.vocab_size,
        "hidden_act": "silu", "input_type": "t2i", "pretraining_tp": 1, "rope_scaling": None}))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(out / "model.safetensors"))
    else:
        torch.save(sd, out / "pytorch_model.bin")
    return out, sd


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_released_layout_loads_with_the_official_names(tmp_path, fmt):
    cfg = EagleConfig(dim=64, n_head=4, n_kv_head=4, ffn_hidden=96, vocab_size=50, grid_size=16, n_layer=2)
    out, sd = _official_dir(tmp_path, cfg, fmt)
    lm_head = torch.randn(50, 64)
    head = load_eagle_head(str(out), target_dim=64, target_vocab=50, lm_head=lm_head)
    assert head.cfg.grid_size == 16  # input_type t2i: LlamaGen t2i's 16 x 16 grid
    got = head.state_dict()
    for k, v in sd.items():
        assert torch.equal(got[k], v.float()), k
    assert torch.equal(got["lm_head.weight"], lm_head)


def test_bad_heads_are_refused_by_name(tmp_path):
    cfg = EagleConfig(dim=64, n_head=4, n_kv_head=4, ffn_hidden=96, vocab_size=50, grid_size=16)
    out, _ = _official_dir(tmp_path, cfg, "safetensors")
    with pytest.raises(ArexportError, match="has width 64; the target's hidden state has width 128"):
        load_eagle_head(str(out), target_dim=128, target_vocab=50, lm_head=torch.zeros(50, 64))
    with pytest.raises(ArexportError, match="has a vocabulary of 50; the target's is 16384"):
        load_eagle_head(str(out), target_dim=64, target_vocab=16384, lm_head=torch.zeros(50, 64))
    with pytest.raises(ArexportError, match="no lm_head.weight"):
        load_eagle_head(str(out), target_dim=64, target_vocab=50)
    bad, _ = _official_dir(tmp_path, cfg, "bin", drop=["fc.bias"])
    with pytest.raises(ArexportError, match="missing fc.bias"):
        load_eagle_head(str(bad), lm_head=torch.zeros(50, 64))
    with pytest.raises(ArexportError, match="no such file or directory"):
        load_eagle_head(str(tmp_path / "nope"))


def _gen_eagle(gen, n, params, opts, seed, batch=None):
    res = gen.generate(classes=[1] * n, method="eagle", method_options=opts, sampling=params, seed=seed,
                       batch_size=batch or n, images=False, timings=False)
    return res


N = 2000


@pytest.mark.parametrize("opts,params", [
    ({"tree": "dynamic", "top_k": 2, "depth": 2, "tokens": 3}, SamplingParams(cfg_scale=2.0)),
    ({"tree": "static", "choices": "0;1;0,0"}, SamplingParams(temperature=0.8, top_k=2, cfg_scale=1.0)),
], ids=["dynamic-cfg2", "static-t0.8-top2"])
def test_eagle_is_lossless_against_the_exact_distribution(enum_setup, opts, params):
    lm, head = enum_setup
    gen = Generator(TorchEngine(lm))
    counts, stats = sample_counts(gen, "eagle", params, N, dict(opts, draft_head=head), seed=5)
    assert chi2_p(counts, exact_distribution(lm, 1, params)) > 1e-3
    assert stats["mean_accepted_length"] > 1.02  # drafts really were accepted (the first round of an image drafts none)


def test_chi_square_rejects_a_tree_walk_without_the_residual(enum_setup, monkeypatch):
    """Negative control: resampling from the target itself after a rejection (no residual) is biased,
    and the same test rejects it."""
    import arexport.runtime.tree as tree

    lm, head = enum_setup
    monkeypatch.setattr(tree, "_tree_residual", lambda rule, p, qrow, x, one_hot: p.clone())
    params = SamplingParams(cfg_scale=2.0)
    counts, _ = sample_counts(Generator(TorchEngine(lm)), "eagle", params, N // 2,
                              {"draft_head": head, "tree": "dynamic", "top_k": 2, "depth": 2, "tokens": 3}, seed=5)
    assert chi2_p(counts, exact_distribution(lm, 1, params)) < 1e-6


@pytest.mark.parametrize("tree", ["dynamic", "static"])
def test_greedy_eagle_equals_greedy_ar_and_ignores_the_batch(enum_setup, tree):
    lm, head = enum_setup
    gen = Generator(TorchEngine(lm))
    greedy = SamplingParams(temperature=0.0, cfg_scale=2.0)
    opts = {"draft_head": head, "tree": tree, "top_k": 2, "depth": 2, "tokens": 3, "choices": "0;1;0,0"}
    classes = [0, 1, 1, 0, 1]
    ar = gen.generate(classes=classes, method="ar", sampling=greedy, seed=0, batch_size=5, images=False, timings=False)
    eg = gen.generate(classes=classes, method="eagle", method_options=opts, sampling=greedy, seed=0, batch_size=5,
                      images=False, timings=False)
    assert np.array_equal(ar.tokens, eg.tokens)
    sampled = SamplingParams(cfg_scale=2.0)
    a = gen.generate(classes=classes, method="eagle", method_options=opts, sampling=sampled, seed=4, batch_size=5,
                     images=False, timings=False)
    b = gen.generate(classes=classes, method="eagle", method_options=opts, sampling=sampled, seed=4, batch_size=2,
                     images=False, timings=False)
    assert np.array_equal(a.tokens, b.tokens)  # continuous batching: same seed, same tokens, whatever the batch


def test_eagle_refuses_bad_options(enum_setup):
    lm, head = enum_setup
    gen = Generator(TorchEngine(lm))
    with pytest.raises(ArexportError, match="needs a draft head"):
        _gen_eagle(gen, 1, SamplingParams(), {}, 0)
    with pytest.raises(ArexportError, match="rank 0 of the same parent is missing"):
        _gen_eagle(gen, 1, SamplingParams(), {"draft_head": head, "tree": "static", "choices": "0;1;1,1"}, 0)
    with pytest.raises(ArexportError, match="does not fit this engine's verify block"):
        _gen_eagle(gen, 1, SamplingParams(), {"draft_head": head, "tokens": 99, "top_k": 3, "depth": 30}, 0)


def test_lantern_on_the_eagle_drafter(enum_setup):
    """--draft-head makes eagle lantern's drafter; delta 0 reproduces eagle token for token, a relaxed
    delta accepts more drafts (static tree = LANTERN++'s --static_tree)."""
    from arexport.runtime.methods.base import make_method

    lm, head = enum_setup
    assert make_method("lantern", draft_head=head).options.drafter_name == "eagle"
    assert make_method("lantern").options.drafter_name == "sd"
    with pytest.raises(ArexportError, match="--draft-head is read by the eagle drafter"):
        make_method("lantern", draft_head=head, drafter="sjd").options.validate()
    gen = Generator(TorchEngine(lm))
    opts = {"draft_head": head, "tree": "static", "choices": "0;1;0,0"}
    params = SamplingParams(cfg_scale=2.0)
    classes = [1, 0] * 40
    eg = gen.generate(classes=classes, method="eagle", method_options=opts, sampling=params, seed=2, batch_size=80,
                      images=False, timings=False)
    l0 = gen.generate(classes=classes, method="lantern", method_options=dict(opts, delta=0.0), sampling=params, seed=2,
                      batch_size=80, images=False, timings=False)
    l1 = gen.generate(classes=classes, method="lantern", method_options=dict(opts, delta=0.5, k=2), sampling=params, seed=2,
                      batch_size=80, images=False, timings=False)
    assert np.array_equal(eg.tokens, l0.tokens)
    assert l1.stats["mean_accepted_length"] > eg.stats["mean_accepted_length"]


def test_cli_generate_demo_with_the_packaged_head(tmp_path):
    """`arexport generate --model demo --method eagle --draft-head demo-eagle --stats-json` on a fresh checkout:
    the shipped head drafts trees the demo accepts (more than one token per target forward)."""
    from click.testing import CliRunner

    from arexport.cli import cli

    stats = tmp_path / "s.json"
    r = CliRunner().invoke(cli, ["generate", "--model", "demo", "--method", "eagle", "--draft-head", "demo-eagle",
                                 "--classes", "3,7", "--seed", "1", "--stats-json", str(stats),
                                 "--save-tokens", str(tmp_path / "t.npy")])
    assert r.exit_code == 0, r.output
    s = json.loads(stats.read_text())
    assert s["method"] == "eagle" and s["images"] == 2
    assert 64 / s["target_forwards_per_image"] > 1.5 and s["mean_accepted_length"] > 1.5
