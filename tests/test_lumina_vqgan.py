"""Lumina-mGPT images (issue 32): the Chameleon VQGAN decoder (models/chameleon_vq.py) against a
re-derivation of the official decoder, the released vqgan.ckpt layout through the weights-only reader,
and ONNX Runtime generation of images with no transformers import."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="Lumina-mGPT needs transformers (the [text] extra)")

from arexport.errors import ArexportError, CheckpointError  # noqa: E402
from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import SamplingParams  # noqa: E402
from tests.test_lumina_mgpt import OVERRIDES, SIDE, V, make_lumina  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, cfg_scale=3.0)


# -- the official decoder, re-derived -------------------------------------------------------------
# Alpha-VLLM/Lumina-mGPT commit 104abe4, lumina_mgpt/model/chameleon_vae_ori/vqgan.py: Normalize
# l.158-159 (GroupNorm 32, eps 1e-6), Upsample l.162-173 (nearest x2, 3x3 conv), ResnetBlock l.194-243
# (temb_channels 0: no temb_proj; nin_shortcut where channels change), AttnBlock l.246-281, Decoder
# l.410-529, VQModel l.550-560 and decode l.589-592; get_codebook_entry l.131-146 (rows as stored);
# image_tokenizer.py l.95-121 (pixels) and data/item_processor.py l.173-193 (the new-line column dropped).
def official_param_shapes(vq) -> dict:
    """{name: shape} of the decoding half of vqgan.ckpt's state_dict, walked as Decoder.__init__ builds it."""
    ch, mult, nrb, z, emb = vq.base_channels, vq.channel_multiplier, vq.num_res_blocks, vq.latent_channels, vq.embed_dim
    out: dict = {}

    def norm(p, c):
        out[p + ".weight"], out[p + ".bias"] = (c,), (c,)

    def conv(p, cin, cout, k):
        out[p + ".weight"], out[p + ".bias"] = (cout, cin, k, k), (cout,)

    def resnet(p, cin, cout):
        norm(p + "norm1", cin), conv(p + "conv1", cin, cout, 3), norm(p + "norm2", cout), conv(p + "conv2", cout, cout, 3)
        if cin != cout:
            conv(p + "nin_shortcut", cin, cout, 1)

    def attn(p, c):
        norm(p + "norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(p + n, c, c, 1)

    block_in = ch * mult[-1]
    res = vq.resolution // 2 ** (len(mult) - 1)
    conv("decoder.conv_in", z, block_in, 3)
    resnet("decoder.mid.block_1.", block_in, block_in), attn("decoder.mid.attn_1.", block_in)
    resnet("decoder.mid.block_2.", block_in, block_in)
    for level in reversed(range(len(mult))):
        for b in range(nrb + 1):
            resnet(f"decoder.up.{level}.block.{b}.", block_in, ch * mult[level])
            block_in = ch * mult[level]
            if res in (vq.attn_resolutions or []):
                attn(f"decoder.up.{level}.attn.{b}.", block_in)
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
            res *= 2
    norm("decoder.norm_out", block_in), conv("decoder.conv_out", block_in, 3, 3)
    conv("post_quant_conv", emb, z, 1), conv("quant_conv", z, emb, 1)
    out["quantize.embedding.weight"] = (vq.num_embeddings, emb)
    return out


def official_decode(sd, vq, ids, perturb=None):
    """codebook ids [N, h, w] -> uint8 [N, 16h, 16w, 3] as the official ImageTokenizer decodes them.
    `perturb` names a deliberate deviation (the negative controls)."""
    def gn(x, p):
        return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)

    def cv(x, p, pad):
        return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], padding=pad)

    def sw(x):
        return x * torch.sigmoid(x)

    def res(x, p):
        h = cv(sw(gn(x, p + "norm1")), p + "conv1", 1)
        h = cv(sw(gn(h, p + "norm2")), p + "conv2", 1)
        return (cv(x, p + "nin_shortcut", 0) if p + "nin_shortcut.weight" in sd else x) + h

    def att(x, p):
        if perturb == "no-attention":
            return x
        h = gn(x, p + "norm")
        q, k, v = (cv(h, p + n, 0) for n in ("q", "k", "v"))
        b, c, hh, ww = q.shape
        w = torch.softmax(torch.bmm(q.reshape(b, c, hh * ww).permute(0, 2, 1), k.reshape(b, c, hh * ww)) * c ** -0.5, dim=2)
        return x + cv(torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww), p + "proj_out", 0)

    cb = sd["quantize.embedding.weight"]
    if perturb == "l2-codebook":  # LlamaGen's lookup, not Chameleon's
        cb = F.normalize(cb, dim=-1)
    n, hgt, wid = ids.shape
    z = cb[ids.reshape(-1)].view(n, hgt, wid, -1).permute(0, 3, 1, 2)
    h = cv(cv(z, "post_quant_conv", 0), "decoder.conv_in", 1)
    h = res(att(res(h, "decoder.mid.block_1."), "decoder.mid.attn_1."), "decoder.mid.block_2.")
    levels = len(vq.channel_multiplier)
    for level in reversed(range(levels)):
        for b in range(vq.num_res_blocks + 1):
            h = res(h, f"decoder.up.{level}.block.{b}.")
            if f"decoder.up.{level}.attn.{b}.q.weight" in sd:
                h = att(h, f"decoder.up.{level}.attn.{b}.")
        if level != 0:
            h = cv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.up.{level}.upsample.conv", 1)
    x = cv(sw(gn(h, "decoder.norm_out")), "decoder.conv_out", 1)
    x = ((torch.clamp(x, -1.0, 1.0) + 1.0) / 2.0).permute(0, 2, 3, 1).numpy()
    return np.rint(x * 255).astype(np.uint8) if perturb == "round" else (x * 255).astype(np.uint8)


def write_vqgan_ckpt(path, hf_model, seed=0, drop=None, codebook=None):
    """vqgan.ckpt as released: torch.save({'state_dict': {encoder, decoder, quantizer, loss ...}}),
    random decoder weights at the official names; the codebook is the language model checkpoint's."""
    vq = hf_model.config.vq_config
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in official_param_shapes(vq).items():
        if "norm" in name:
            sd[name] = (1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            sd[name] = torch.randn(shape, generator=g) / fan_in ** 0.5 * (0.3 if name.startswith("decoder.conv_out") else 1.0)
    sd["quantize.embedding.weight"] = (codebook if codebook is not None else
                                       hf_model.model.vqmodel.quantize.embedding.weight.detach().clone())
    sd.update({"encoder." + k: v.detach().clone() for k, v in hf_model.model.vqmodel.encoder.state_dict().items()})
    sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4, generator=g)  # trainer leftovers, ignored
    if drop:
        del sd[drop]
    torch.save({"state_dict": sd}, path)
    return sd


@pytest.fixture(scope="module")
def lumina_vq(tmp_path_factory):
    d = tmp_path_factory.mktemp("lumina-vq") / "Lumina-mGPT-tiny"
    model, vocab = make_lumina(d)
    sd = write_vqgan_ckpt(d / "vqgan.ckpt", model)  # found there by the loader
    return d, model, sd


def test_decoder_equals_the_official_decode(lumina_vq):
    from arexport.models.chameleon_vq import ChameleonVQConfig, load_chameleon_vqgan

    d, model, sd = lumina_vq
    vq = model.config.vq_config
    rows, cols = 2, 3  # odd, non-square: a transposed or square-only reshape would not pass
    dec = load_chameleon_vqgan(str(d / "vqgan.ckpt"), ChameleonVQConfig.from_hf(vq), rows, cols)
    ids = torch.randint(0, V, (3, rows, cols), generator=torch.Generator().manual_seed(1))
    ids[0, 0, 0], ids[1, 1, 2] = 0, V - 1  # the codebook's ends
    tokens = torch.cat([ids, torch.full((3, rows, 1), V)], -1).reshape(3, -1)  # rows closed by the new-line id
    with torch.no_grad():
        got = dec(tokens).numpy()
    want = official_decode(sd, vq, ids)
    assert got.shape == (3, 16 * rows, 16 * cols, 3)
    sat = np.mean((want == 0) | (want == 255))
    assert sat < 0.5 and len(np.unique(want)) > 100  # not a saturated or constant image: the comparison can tell
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1 and np.mean(got == want) > 0.99
    for perturb in ("no-attention", "l2-codebook", "round"):  # negative controls
        bad = official_decode(sd, vq, ids, perturb=perturb)
        assert np.mean(got == bad) < 0.9, perturb


def test_vqgan_ckpt_layout_errors_are_named(lumina_vq, tmp_path):
    from arexport.models.chameleon_vq import ChameleonVQConfig, load_chameleon_vqgan

    d, model, _ = lumina_vq
    cfg = ChameleonVQConfig.from_hf(model.config.vq_config)
    write_vqgan_ckpt(tmp_path / "short.ckpt", model, drop="decoder.up.3.attn.0.q.weight")
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.up\.3\.attn\.0\.q\.weight"):
        load_chameleon_vqgan(str(tmp_path / "short.ckpt"), cfg, SIDE, SIDE)
    write_vqgan_ckpt(tmp_path / "other.ckpt", model, codebook=torch.randn(V, 4))
    with pytest.raises(CheckpointError, match="belongs to another model"):
        Generator.load("lumina-mgpt-7b-768", checkpoint=str(d), overrides=OVERRIDES, vq_checkpoint=str(tmp_path / "other.ckpt"))
    torch.save({"state_dict": {"decoder.conv_in.weight": torch.zeros(1)}, "callbacks": {"x": torch.nn.ReLU()}},
               tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match="holds a torch.nn.modules.activation.ReLU object"):
        load_chameleon_vqgan(str(tmp_path / "pickled.ckpt"), cfg, SIDE, SIDE)


@pytest.fixture(scope="module")
def lumina_engine(lumina_vq, tmp_path_factory):
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.models.registry import load_model

    d, _, _ = lumina_vq
    out = tmp_path_factory.mktemp("lumina-engine") / "eng"
    build_engine(load_model("lumina-mgpt-7b-768", checkpoint=str(d), overrides=OVERRIDES), out, BuildOptions(batch_sizes=[1, 2]))
    return out


def test_images_from_torch_and_an_ort_engine_without_transformers(lumina_vq, lumina_engine, tmp_path):
    import subprocess
    import sys

    d, model, sd = lumina_vq
    prompts = ["a red dog", "photo of a big green tree house under the rain"]
    ref = Generator.load("lumina-mgpt-7b-768", checkpoint=str(d), overrides=OVERRIDES).generate(prompts=prompts, sampling=GREEDY)
    ids = torch.from_numpy(ref.tokens).view(2, SIDE, SIDE + 1)[:, :, :SIDE]
    assert ref.images.shape == (2, 16 * SIDE, 16 * SIDE, 3)
    assert np.abs(ref.images.astype(int) - official_decode(sd, model.config.vq_config, ids).astype(int)).max() <= 1
    manifest = json.loads((lumina_engine / "manifest.json").read_text())
    assert manifest["source"]["vq_checkpoint"].endswith("vqgan.ckpt")
    code = (  # a fresh interpreter where importing transformers fails
        "import sys, numpy as np; sys.modules['transformers'] = None\n"
        "from arexport.runtime.generator import Generator\nfrom arexport.runtime.sampling import SamplingParams\n"
        f"g = Generator.load({str(lumina_engine)!r}, backend='ort')\n"
        f"r = g.generate(prompts={prompts!r}, sampling=SamplingParams(temperature=0.0, cfg_scale=3.0))\n"
        f"np.savez({str(tmp_path / 'ort.npz')!r}, tokens=r.tokens, images=r.images)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    a = np.load(tmp_path / "ort.npz")
    assert np.array_equal(a["tokens"], ref.tokens) and np.abs(a["images"].astype(int) - ref.images.astype(int)).max() <= 1


def test_served_over_http_from_the_ort_engine(lumina_engine):
    """/generate (PNG of a prompt) and /v1/images/generations on the engine equal solo runs; sjd too."""
    import base64
    import io

    import httpx
    from PIL import Image

    from arexport.serving.http import create_app
    from arexport.serving.server import BackgroundServer
    from arexport.serving.service import GenerationService

    gen = Generator.load(str(lumina_engine), backend="ort")
    svc = GenerationService(gen, batching="continuous", max_batch=2)
    params = svc.default_sampling()
    try:
        with BackgroundServer(create_app(svc, max_images=4)) as url, httpx.Client(timeout=120) as client:
            r = client.post(f"{url}/generate", json={"prompt": "a red dog", "seed": 3})
            assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
            png = np.asarray(Image.open(io.BytesIO(r.content)))
            r = client.post(f"{url}/generate", json={"prompts": ["a red dog", "blue cat with a hat"], "seed": 4,
                                                     "method": "sjd", "options": {"window": 4}, "format": "tokens"})
            assert r.status_code == 200, r.text
            sjd = np.array(r.json()["tokens"])
            r = client.post(f"{url}/v1/images/generations", json={"prompt": "blue cat with a hat", "n": 1, "seed": 5,
                                                                  "response_format": "b64_json"})
            assert r.status_code == 200, r.text
            oai = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))
    finally:
        svc.close()
    assert np.array_equal(png, gen.generate(prompts=["a red dog"], seed=3, sampling=params).images[0])
    alone = gen.generate(prompts=["a red dog", "blue cat with a hat"], seed=4, sampling=params, method="sjd",
                         method_options={"window": 4}, images=False).tokens
    assert np.array_equal(sjd, alone)
    assert np.array_equal(oai, gen.generate(prompts=["blue cat with a hat"], seed=5, sampling=params).images[0])


def test_every_raster_method_runs_with_images(lumina_vq):
    """gridar and best-of-n score decoded images (they need the decoder); zipar (rows of w + 1 with the
    new-line token) and gsd (codebook rows, a zero row for new-line) run on the same grid."""
    d, _, _ = lumina_vq
    gen = Generator.load("lumina-mgpt-7b-768", checkpoint=str(d), overrides=OVERRIDES)
    prompts = ["a red dog", "blue cat with a hat"]
    runs = {"gridar": {"candidates": 4, "scorer": "tests.test_janus:brightness", "verifier": "accept-all"},
            "best-of-n": {"candidates": 2, "scorer": "tests.test_janus:brightness"},
            "zipar": {"window": 2}, "gsd": {"window": 4}}
    for method, opts in runs.items():
        r = gen.generate(prompts=prompts[:1], method=method, method_options=opts, seed=2)
        t = r.tokens.reshape(1, SIDE, SIDE + 1)
        assert (t[:, :, -1] == V).all() and (t[:, :, :-1] < V).all(), method
        assert r.images.shape == (1, 16 * SIDE, 16 * SIDE, 3), method
    greedy = gen.generate(prompts=prompts, sampling=GREEDY, images=False)
    zipar = gen.generate(prompts=prompts, method="zipar", method_options={"window": 2}, sampling=GREEDY, images=False)
    # greedy ZipAR starts row r + 1 before row r is done (lossy): row 0 is raster AR's, the rest may differ
    assert np.array_equal(zipar.tokens[:, : SIDE + 1], greedy.tokens[:, : SIDE + 1])
    assert zipar.stats["target_forwards_per_image"] < greedy.stats["target_forwards_per_image"]
