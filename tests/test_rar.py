"""RAR: the step function against an independent transcription of the official forward and
`generate` (bytedance/1d-tokenizer modeling/rar.py, KV-cache path included), released file layouts,
named errors for mixed-up files, every raster method, ORT engines and serving."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arexport.errors import ArexportError, CheckpointError
from arexport.models.registry import load_model, model_config
from arexport.runtime.backends.torch.runner import TorchEngine
from arexport.runtime.generator import Generator
from arexport.runtime.sampling import SamplingParams

TINY = dict(dim=64, n_layer=3, n_head=4, intermediate_size=96, num_classes=10, vocab_size=40, grid_size=4)
TINY_CFG = ",".join(f"{k}={v}" for k, v in TINY.items())


@pytest.fixture(scope="module")
def rar():
    lm = load_model("rar-b", random_init=True, seed=5, overrides=dict(TINY))
    lm.model.init_random(5, std=0.25)  # large enough that every adaLN term moves the logits
    return lm


class OfficialRAR:
    """RAR's inference forward as the reference writes it, over a state dict of its parameter names:
    full-sequence embeddings, cls + condition prefix, target-aware postfix, per-position adaLN
    condition, and the KV-cache path that concatenates keys and feeds only the newest input."""

    def __init__(self, sd, n_head, n, vocab, num_classes):
        self.sd, self.h, self.n, self.V, self.C = sd, n_head, n, vocab, num_classes
        self.layers = sum(1 for k in sd if k.endswith("attn.qkv.weight"))
        self.cache = None

    def lin(self, x, name):
        return F.linear(x, self.sd[name + ".weight"], self.sd.get(name + ".bias"))

    def ln(self, x, name=None, eps=1e-6):
        w = None if name is None else self.sd[name + ".weight"]
        b = None if name is None else self.sd[name + ".bias"]
        return F.layer_norm(x, x.shape[-1:], w, b, eps)

    def attn(self, i, x, mask):
        b, n, c = x.shape
        p = f"blocks.{i}.attn"
        qkv = self.lin(x, p + ".qkv").reshape(b, n, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.ln(q, p + ".q_norm"), self.ln(k, p + ".k_norm")
        if self.cache is not None:
            if self.cache[i] is not None:
                k = torch.cat([self.cache[i][0], k], -2)
                v = torch.cat([self.cache[i][1], v], -2)
            self.cache[i] = (k, v)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.lin(o.transpose(1, 2).reshape(b, n, c), p + ".proj")

    def forward_fn(self, ids, condition):
        sd, bsz = self.sd, ids.shape[0]
        inp = torch.cat([condition.view(bsz, -1), ids.view(bsz, -1)], 1)
        emb = F.embedding(inp, sd["embeddings.weight"])
        cond_tok = emb[:, 0]
        pos = sd["pos_embed"].repeat(bsz, 1, 1)
        ta = sd["target_aware_pos_embed"].repeat(bsz, 1, 1)[:, 2:2 + self.n]
        x = torch.cat([sd["cls_token"].expand(bsz, -1, -1), emb], 1)
        x = x + torch.cat([pos[:, :2], pos[:, 2:2 + self.n]], 1)[:, :x.shape[1]]
        x = x + torch.cat([torch.zeros_like(x[:, :1]), ta, torch.zeros_like(x[:, -1:])], 1)[:, :x.shape[1]]
        length = x.shape[1]
        mask = torch.full((length, length), float("-inf")).triu(1)
        c = cond_tok.unsqueeze(1) + sd["timesteps_embeddings"][:, :length]
        if self.cache is not None and self.cache[0] is not None:
            x, mask, c = x[:, -1:], None, c[:, -1:]
        for i in range(self.layers):
            p = f"blocks.{i}"
            sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.lin(F.silu(c), p + ".adaLN_modulation.1").chunk(6, -1)
            x = x + g_a * self.attn(i, self.ln(x, p + ".norm1") * (1 + sc_a) + sh_a, mask)
            hmid = self.ln(x, p + ".norm2") * (1 + sc_m) + sh_m
            x = x + g_m * self.lin(F.gelu(self.lin(hmid, p + ".mlp.fc1")), p + ".mlp.fc2")
        if self.cache is None:
            x, c = x[:, 1:], c[:, 1:]
        sc, sh = self.lin(F.silu(c), "adaln_before_head.adaLN_modulation.1").chunk(2, -1)
        return self.lin(self.ln(x) * (1 + sc) + sh, "lm_head")

    def generate(self, classes, g, temperature, power, pick):
        """The reference loop (CFG rows [cond; none], cosine-power schedule, cached decoding); pick(probs) draws."""
        cond = classes + self.V + 1
        none = torch.full_like(cond, self.V + 1 + self.C)
        ids = torch.zeros(len(classes), 0, dtype=torch.long)
        self.cache = [None] * self.layers
        for step in range(self.n):
            s = (1 - torch.cos(((step / self.n) ** (torch.ones(1) * power)) * torch.pi)) / 2
            scale = (g - 1) * s + 1
            logits = self.forward_fn(torch.cat([ids, ids]), torch.cat([cond, none]))
            cl, ul = logits[:len(cond)], logits[len(cond):]
            logits = (ul + (cl - ul) * scale)[:, -1] / temperature
            ids = torch.cat([ids, pick(F.softmax(logits, -1))], -1)
        self.cache = None
        return ids


def official(lm):
    cfg = lm.model.cfg
    return OfficialRAR({k: v.detach() for k, v in lm.model.state_dict().items()}, cfg.n_head, cfg.n_tokens,
                       cfg.vocab_size, cfg.num_classes)


def test_released_sizes_and_key_names():
    for size, (layers, dim, ffn) in {"b": (24, 768, 3072), "l": (24, 1024, 4096), "xl": (32, 1280, 5120),
                                     "xxl": (40, 1408, 6144)}.items():
        cfg = model_config(f"rar-{size}")
        assert (cfg.n_layer, cfg.dim, cfg.intermediate_size, cfg.n_head, cfg.vocab_size) == (layers, dim, ffn, 16, 1024)
    assert model_config("rar_XL").dim == 1280  # the released file names work as model names
    with torch.device("meta"):
        m = model_config("rar-b").build()
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["embeddings.weight"] == (1024 + 1 + 1000 + 1, 768)
    assert shapes["pos_embed"] == shapes["target_aware_pos_embed"] == (1, 256 + 1024, 768)
    assert shapes["timesteps_embeddings"] == (1, 356, 768) and shapes["cls_token"] == (1, 1, 768)
    for k in ("blocks.23.attn.qkv.bias", "blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.bias", "blocks.0.mlp.fc1.weight",
              "blocks.0.adaLN_modulation.1.weight", "adaln_before_head.adaLN_modulation.1.bias", "lm_head.bias"):
        assert k in shapes, k
    assert sum(np.prod(s) for s in shapes.values()) / 1e6 == pytest.approx(261, abs=2)  # RAR-B is 261M parameters


def test_teacher_forcing_and_cached_steps_match_the_official_forward(rar):
    ref = official(rar)
    torch.manual_seed(0)
    cls = torch.tensor([1, 7, 10])  # 10 = the none class
    toks = torch.randint(0, 40, (3, 16))
    cond = cls + 41
    with torch.no_grad():
        want = ref.forward_fn(toks[:, :-1], cond)  # rows: condition, t0 .. t14 -> predictions of t0 .. t15
        got = rar.model(cond, toks)
    assert (got - want).abs().max().item() < 1e-5
    # the step function over static caches: prefill, then one token at a time, then a 5-token block
    eng = TorchEngine(rar)
    cache = eng.allocate(3)
    from arexport.families import get_family
    from arexport.families.base import Conditions

    outs = [get_family("rar").prefill(eng, cache, Conditions(classes=cls))[:, None]]
    for t in range(10):
        w = cache.length.clone()
        outs.append(eng.step(cache, toks[:, t:t + 1], torch.full((3, 1), t), w, cache.causal_mask(w, 1)))
        cache.length += 1
    w = cache.length.clone()
    outs.append(eng.step(cache, toks[:, 10:15], torch.arange(10, 15).expand(3, 5), w, cache.causal_mask(w, 5)))
    stepped = torch.cat(outs, 1)
    assert stepped.shape == want.shape
    assert (stepped - want).abs().max().item() < 1e-5
    # and the official KV-cache path gives the same numbers
    ref.cache = [None] * ref.layers
    with torch.no_grad():
        cached = [ref.forward_fn(toks[:, :0], cond)[:, -1:]]
        cached += [ref.forward_fn(toks[:, :t + 1], cond)[:, -1:] for t in range(15)]
    ref.cache = None
    assert (torch.cat(cached, 1) - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("g,power", [(16.0, 2.75), (6.9, 1.5), (4.0, 0.0)])
def test_whole_generation_matches_the_official_generate(rar, g, power):
    """Guided, scheduled, cached decoding: the reference's loop with the draw made greedy == `ar` greedy."""
    classes = torch.tensor([0, 3, 9])
    want = official(rar).generate(classes, g, 1.0, power, pick=lambda p: p.argmax(-1, keepdim=True))
    res = Generator(TorchEngine(rar)).generate(
        classes=classes.tolist(), method="ar", images=False,
        sampling=SamplingParams(temperature=0.0, cfg_scale=g, cfg_schedule="cosine", cfg_power=power))
    assert np.array_equal(res.tokens, want.numpy())


def test_sampler_defaults_per_size():
    for size, (t, g, p) in {"b": (1.0, 16.0, 2.75), "l": (1.02, 15.5, 2.5), "xl": (1.02, 6.9, 1.5), "xxl": (1.02, 8.0, 1.2)}.items():
        lm = load_model(f"rar-{size}", random_init=True, overrides=dict(TINY))
        d = lm.spec.extra["sampling_defaults"]
        assert (d["temperature"], d["cfg_scale"], d["cfg_schedule"], d["cfg_power"], d["top_k"]) == (t, g, "cosine", p, 0)


def test_released_file_layouts_load(tmp_path, rar):
    """rar_b.bin is a bare state dict; the MaskGIT tokenizer file holds encoder + decoder + quantizer."""
    torch.save(rar.model.state_dict(), tmp_path / "rar_b.bin")
    dec = rar.decoder
    tok = {f"decoder.{k}": v for k, v in dec.decoder.state_dict().items()}
    tok["quantize.embedding.weight"] = dec.quantize.embedding.weight.detach()
    tok["encoder.conv_in.weight"] = torch.zeros(128, 3, 3, 3)  # the encoder half is ignored
    torch.save(tok, tmp_path / "maskgit-vqgan-imagenet-f16-256.bin")
    lm = load_model("rar-b", checkpoint=str(tmp_path / "rar_b.bin"), overrides=dict(TINY),
                    vq_checkpoint=str(tmp_path / "maskgit-vqgan-imagenet-f16-256.bin"))
    assert torch.equal(lm.model.lm_head.weight, rar.model.lm_head.weight)
    toks = torch.randint(0, 40, (2, 16))
    assert torch.equal(lm.decoder(toks), rar.decoder(toks))


def test_mixed_up_files_get_named_errors(tmp_path, rar):
    torch.save(rar.model.state_dict(), tmp_path / "rar_b.bin")
    with pytest.raises(ArexportError, match=r"holds a rar model, not a llamagen one .*--model rar-b"):
        load_model("GPT-B", checkpoint=str(tmp_path / "rar_b.bin"))
    gpt = load_model("GPT-B", random_init=True, overrides=dict(n_layer=1, dim=64, n_head=4, grid_size=4))
    torch.save({"model": gpt.model.state_dict()}, tmp_path / "c2i_B_256.pt")
    with pytest.raises(ArexportError, match=r"holds a llamagen model, not a rar one"):
        load_model("rar-b", checkpoint=str(tmp_path / "c2i_B_256.pt"), overrides=dict(TINY))
    # a LlamaGen VQ-16 tokenizer given as RAR's tokenizer, and a random file
    vq = {f"decoder.conv_blocks.0.res.0.conv1.weight": torch.zeros(1), "quantize.embedding.weight": torch.zeros(4, 8)}
    torch.save({"model": vq}, tmp_path / "vq_ds16_c2i.pt")
    with pytest.raises(CheckpointError, match="is a LlamaGen VQ-16 tokenizer: RAR decodes with maskgit-vqgan"):
        load_model("rar-b", random_init=True, overrides=dict(TINY), vq_checkpoint=str(tmp_path / "vq_ds16_c2i.pt"))
    (tmp_path / "notes.bin").write_text("not weights")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model("rar-b", random_init=True, overrides=dict(TINY), vq_checkpoint=str(tmp_path / "notes.bin"))


def test_maskgit_decoder_matches_its_reference_layout(rar):
    """Quirks kept: no conv bias in residual blocks; a width change adds a 1x1 conv of the block *output*."""
    dec = rar.decoder
    blk = dec.decoder.up[3].block[0]  # 512 -> 256 channels entering level 3
    assert blk.conv1.bias is None and blk.nin_shortcut is not None
    x = torch.randn(1, 512, 2, 2)
    h = blk.conv2(F.silu(blk.norm2(blk.conv1(F.silu(blk.norm1(x))))))
    assert torch.allclose(blk(x), h + blk.nin_shortcut(h), atol=1e-6)
    img = dec(torch.randint(0, 40, (2, 16)))
    assert img.dtype == torch.uint8 and tuple(img.shape) == (2, 64, 64, 3)


@pytest.mark.parametrize("method,opts", [("sjd", {"window": 4}), ("sd", {"gamma": 3}), ("lantern", {"gamma": 3}),
                                         ("vvs", {"gamma": 3}), ("gridar", {"candidates": 4, "verifier": "accept-all"}),
                                         ("best-of-n", {"candidates": 2})])
def test_every_raster_method_runs_on_rar(rar, method, opts):
    draft = load_model("rar-b", random_init=True, seed=6, overrides=dict(TINY, n_layer=1))
    gen = Generator(TorchEngine(rar), TorchEngine(draft))
    if method in ("gridar", "best-of-n"):  # a scorer for a non-digit model: mean brightness of the decoded image
        opts = dict(opts, scorer=lambda images, c: images.float().mean((1, 2, 3)))
    sampling = SamplingParams(cfg_scale=4.0, cfg_schedule="cosine", cfg_power=1.5)
    res = gen.generate(classes=[2, 5], method=method, method_options=opts, sampling=sampling, images=False, seed=1)
    assert res.tokens.shape == (2, 16) and res.tokens.min() >= 0 and res.tokens.max() < 40
    if method in ("sjd",):  # greedy speculation reproduces greedy ar exactly
        greedy = SamplingParams(temperature=0.0, cfg_scale=4.0, cfg_schedule="cosine", cfg_power=1.5)
        a = gen.generate(classes=[2, 5], method="ar", sampling=greedy, images=False).tokens
        b = gen.generate(classes=[2, 5], method=method, method_options=opts, sampling=greedy, images=False).tokens
        assert np.array_equal(a, b)


def test_a_draft_of_another_family_is_refused(rar):
    llama = load_model("GPT-B", random_init=True, overrides=dict(n_layer=1, dim=64, n_head=4, grid_size=4, vocab_size=40,
                                                                   num_classes=10))
    with pytest.raises(ArexportError, match="a draft must be of the target's family"):
        TorchEngine(rar).family.check_draft(rar.spec, llama.spec)


@pytest.fixture(scope="module")
def rar_engine(tmp_path_factory):
    from click.testing import CliRunner

    from arexport.cli import cli

    out = tmp_path_factory.mktemp("rar") / "eng"
    r = CliRunner().invoke(cli, ["build", "rar-b", "--random-init", "--init-seed", "5", "--model-config", TINY_CFG,
                                 "--batch-sizes", "1,2,4", "--verify-len", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_ort_engine_tokens_equal_torch_tokens(rar_engine):
    from arexport.format.manifest import read_manifest

    man = read_manifest(rar_engine)
    assert man.spec.family == "rar" and man.spec.n_cache_layers == TINY["n_layer"] + 1
    torch_gen = Generator.load("rar-b", random_init=True, seed=5, overrides=dict(TINY))
    ort_gen = Generator.load(str(rar_engine), backend="ort")
    greedy = SamplingParams(temperature=0.0, cfg_scale=4.0, cfg_schedule="cosine", cfg_power=2.0)
    for method, opts in (("ar", {}), ("sjd", {"window": 4})):
        a = torch_gen.generate(classes=[1, 4], method=method, method_options=opts, sampling=greedy, images=False).tokens
        b = ort_gen.generate(classes=[1, 4], method=method, method_options=opts, sampling=greedy, images=False).tokens
        assert np.array_equal(a, b), method
    imgs = ort_gen.generate(classes=[3], images=True, seed=2)
    assert imgs.images.shape == (1, 64, 64, 3)


def test_verify_and_serving_on_a_rar_engine(rar_engine):
    from click.testing import CliRunner

    from arexport.cli import cli

    r = CliRunner().invoke(cli, ["verify", str(rar_engine)])
    assert r.exit_code == 0 and "PASS" in r.output, r.output
    import httpx

    from arexport.serving.http import create_app
    from arexport.serving.server import BackgroundServer
    from arexport.serving.service import GenerationService

    service = GenerationService(Generator.load(str(rar_engine), backend="ort"), max_batch=4)
    try:
        with BackgroundServer(create_app(service)) as url:
            body = {"classes": [1, 2], "format": "tokens", "method": "sjd", "cfg_schedule": "cosine", "cfg_power": 2.75}
            resp = httpx.post(f"{url}/generate", json=body, timeout=120)
            assert resp.status_code == 200, resp.text
            assert np.asarray(resp.json()["tokens"]).shape == (2, 16)
            resp = httpx.post(f"{url}/generate", json=dict(body, cfg_schedule="cos"), timeout=120)
            assert resp.status_code == 422 and "cfg_schedule" in resp.text
    finally:
        service.close()


def test_guidance_schedule_formula_reaches_g_at_the_end():
    from arexport.runtime.sampling import cfg_scales

    p = SamplingParams(cfg_scale=16.0, cfg_schedule="cosine", cfg_power=2.75)
    s = cfg_scales(p, torch.arange(256), 256)
    assert s[0].item() == 1.0 and s[-1].item() == pytest.approx(1 + 15 * (1 - math.cos(math.pi * (255 / 256) ** 2.75)) / 2)


def test_calibrate_and_profile_a_rar_engine_from_the_cli(rar_engine, tmp_path):
    from click.testing import CliRunner

    from arexport.cli import cli

    r = CliRunner().invoke(cli, ["calibrate", str(rar_engine), "--mode", "int8", "--samples", "16", "--calib-set",
                                 str(tmp_path / "calib"), "--out", str(tmp_path / "q")])
    assert r.exit_code == 0 and "int8: top-1 agreement" in r.output, r.output
    r = CliRunner().invoke(cli, ["profile", str(tmp_path / "q"), "--backend", "ort", "--classes", "1,2", "--repeats", "1",
                                 "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p.json").exists()


def test_calibrate_prints_no_quantizer_log_lines(rar_engine, tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "arexport", "calibrate", str(rar_engine), "--mode", "int8", "--samples", "8",
                          "--calib-set", str(tmp_path / "c"), "--out", str(tmp_path / "q")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    noise = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith(("WARNING:root", "INFO:root"))]
    assert not noise, noise[:3]
