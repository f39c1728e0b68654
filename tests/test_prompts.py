"""Prompts for text-conditional LlamaGen (issue 14): the T5 encoder as LlamaGen's T5Embedder uses it."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the T5 text encoder tests need transformers (the [text] extra)")

from arexport.errors import ArexportError  # noqa: E402
from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import SamplingParams  # noqa: E402

WORDS = "a dog cat red blue running under the rain with hat big small green photo of tree house".split()
T = 12  # caption tokens (LlamaGen: 120)
OVERRIDES = "n_layer=1,dim=64,n_head=4,grid_size=4,multiple_of=32,cls_token_num=12,caption_dim=32"


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A tiny random T5 encoder saved with save_pretrained, with a T5 (Unigram, SentencePiece-style) fast
    tokenizer built offline from a small piece list: the layout of flan-t5-xl's directory."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    d = tmp_path_factory.mktemp("t5")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(WORDS)] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    fast = T5TokenizerFast(vocab=pieces, extra_ids=0)
    fast.save_pretrained(str(d))
    cfg = T5Config(vocab_size=len(pieces), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    T5EncoderModel(cfg).eval().save_pretrained(str(d))
    return d


def reference_features(t5_dir, prompts):
    """T5Embedder.get_text_embeddings then sample_t2i's left padding, with transformers directly."""
    from transformers import AutoTokenizer, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(str(t5_dir))
    model = T5EncoderModel.from_pretrained(str(t5_dir)).eval()
    enc = tok(prompts, max_length=T, padding="max_length", truncation=True, return_attention_mask=True,
              add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        emb = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])["last_hidden_state"]
    mask = enc["attention_mask"]
    new_emb, new_mask = [], mask.flip(dims=[-1])
    for e, m in zip(emb, mask):
        n = int(m.sum())
        new_emb.append(torch.cat([e[n:], e[:n]]))
    c = torch.stack(new_emb) * new_mask[:, :, None]
    return enc["input_ids"], c, new_mask.bool()


@pytest.fixture(scope="module")
def t2i_gen(t5_dir):
    from arexport.models.registry import parse_overrides

    return Generator.load("llamagen-t2i-B", random_init=True, seed=3, overrides=parse_overrides(OVERRIDES), text_encoder=str(t5_dir))


PROMPTS = ["a dog running under the rain", "red cat with a big hat", "photo of a green tree house"]


def test_caption_features_equal_t5_encoder_run_directly(t5_dir, t2i_gen):
    from arexport.runtime.text import PromptTokenizer

    ids_ref, feats_ref, mask_ref = reference_features(t5_dir, PROMPTS)
    ids, _ = PromptTokenizer(t5_dir / "tokenizer.json", T)(PROMPTS)
    assert np.array_equal(ids, ids_ref.numpy())
    feats, mask = t2i_gen.engine.encode_prompts(PROMPTS)
    assert torch.equal(mask, mask_ref)
    assert (feats - feats_ref).abs().max() < 1e-6
    params = SamplingParams(temperature=0.0, cfg_scale=3.0)
    a = t2i_gen.generate(prompts=PROMPTS, sampling=params, images=False, seed=1)
    b = t2i_gen.generate(captions=feats_ref.numpy(), caption_mask=mask_ref.numpy(), sampling=params, images=False, seed=1)
    assert np.array_equal(a.tokens, b.tokens)


def test_long_prompts_are_truncated_with_a_warning_as_the_reference_does(t5_dir, t2i_gen):
    long = " ".join(WORDS * 2)  # 38 words + </s>: over the 12-token limit
    ids_ref, feats_ref, _ = reference_features(t5_dir, [long])
    with pytest.warns(UserWarning, match="truncated to the text encoder's 12"):
        feats, mask = t2i_gen.engine.encode_prompts([long])
    assert bool(mask.all()) and (feats - feats_ref).abs().max() < 1e-6


def test_bad_prompt_input_is_named(t5_dir, t2i_gen, tmp_path):
    with pytest.raises(ArexportError, match="prompt 1 is empty"):
        t2i_gen.generate(prompts=["a dog", "  "])
    with pytest.raises(ArexportError, match="give prompts or caption embeddings, not class ids"):
        t2i_gen.generate(classes=[1])
    with pytest.raises(ArexportError, match="class-conditional: give class ids, not prompts"):
        Generator.load("demo").generate(prompts=["a dog"])
    with pytest.raises(ArexportError, match="takes prompts only with its text encoder"):
        Generator(t2i_gen.engine.__class__(t2i_gen.engine.loaded)).generate(prompts=["a dog"])
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((t5_dir / "config.json").read_text())
    with pytest.raises(ArexportError, match="has no tokenizer.json"):
        Generator.load("llamagen-t2i-B", random_init=True, text_encoder=str(bare))


@pytest.fixture(scope="module")
def t2i_engine(t5_dir, tmp_path_factory):
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.models.registry import load_model, parse_overrides

    d = tmp_path_factory.mktemp("t2i") / "eng"
    loaded = load_model("llamagen-t2i-B", random_init=True, seed=3, overrides=parse_overrides(OVERRIDES))
    # no image decoder: these tests serve prompts as tokens, and exporting the random full-width VQ-16 decoder
    # was most of this fixture's ~30 s (the decoder graph is tested in test_engines.py)
    build_engine(loaded, d, BuildOptions(batch_sizes=[1, 4], text_encoder=str(t5_dir), images=False))
    return d


def test_ort_engine_serves_prompts_without_transformers(t2i_engine, t2i_gen):
    manifest = json.loads((t2i_engine / "manifest.json").read_text())
    assert "text_encoder" in manifest["graphs"] and (t2i_engine / "tokenizer.json").exists()
    ort_gen = Generator.load(str(t2i_engine), backend="ort")
    params = SamplingParams(temperature=0.0, cfg_scale=3.0)
    a = ort_gen.generate(prompts=PROMPTS, sampling=params, images=False)
    b = t2i_gen.generate(prompts=PROMPTS, sampling=params, images=False)
    assert np.array_equal(a.tokens, b.tokens)
    feats, _ = ort_gen.engine.encode_prompts(PROMPTS)
    ref, _ = t2i_gen.engine.encode_prompts(PROMPTS)
    assert (feats - ref).abs().max() < 1e-4
    code = ("import sys; from arexport.runtime.generator import Generator; "
            f"g = Generator.load({str(t2i_engine)!r}, backend='ort'); "
            "g.generate(prompts=['a red dog'], images=False); "
            "assert 'transformers' not in sys.modules and 'arexport.models' not in sys.modules, 'model code imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_cli_prompts_and_http(t2i_engine, tmp_path):
    import httpx
    from click.testing import CliRunner

    from arexport.cli import cli
    from arexport.serving.http import create_app
    from arexport.serving.server import BackgroundServer
    from arexport.serving.service import GenerationService

    f = tmp_path / "p.txt"
    f.write_text("a dog\n\nred cat\n")
    r = CliRunner().invoke(cli, ["generate", str(t2i_engine), "--backend", "ort", "--prompt", "blue house", "--prompts-file", str(f),
                                 "--save-tokens", str(tmp_path / "t.npy")])
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "t.npy").shape == (3, 16)
    r = CliRunner().invoke(cli, ["generate", str(t2i_engine), "--backend", "ort", "--prompt", "", "--save-tokens", str(tmp_path / "u.npy")])
    assert r.exit_code == 1 and "prompt 0 is empty" in r.output
    r = CliRunner().invoke(cli, ["profile", str(t2i_engine), "--backend", "ort", "--prompt", "a dog", "--prompt", "red cat",
                                 "--repeats", "1", "--warmup", "0", "--no-bandwidth", "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p.json").read_text())["results"][0]["images"] == 2
    gen = Generator.load(str(t2i_engine), backend="ort")
    svc = GenerationService(gen, max_batch=2)
    with BackgroundServer(create_app(svc)) as url:
        r = httpx.post(f"{url}/generate", json={"prompts": ["a dog", "red cat"], "seed": 2, "format": "tokens"}, timeout=120)
        assert r.status_code == 200, r.text
        alone = gen.generate(prompts=["a dog", "red cat"], seed=2, sampling=svc.default_sampling(), images=False).tokens
        assert np.array_equal(np.array(r.json()["tokens"]), alone)
        r = httpx.post(f"{url}/generate", json={"prompt": "a dog", "prompts": ["x"]}, timeout=60)
        assert r.status_code == 400 and "not both" in r.json()["error"]
        r = httpx.post(f"{url}/generate", json={"prompt": ""}, timeout=60)
        assert r.status_code == 400 and "empty" in r.json()["error"]
    svc.close()


def test_methods_run_on_llamagen_t2i_from_prompts(t2i_gen):
    greedy = SamplingParams(temperature=0.0, cfg_scale=3.0)
    ar = t2i_gen.generate(prompts=PROMPTS, sampling=greedy, images=False)
    sjd = t2i_gen.generate(prompts=PROMPTS, method="sjd", method_options={"window": 4}, sampling=greedy, images=False)
    assert np.array_equal(ar.tokens, sjd.tokens)  # lossless
    bon = t2i_gen.generate(prompts=PROMPTS[:1], method="best-of-n", method_options={"candidates": 2, "scorer": "tests.test_janus:brightness"})
    assert bon.tokens.shape == (1, 16)
