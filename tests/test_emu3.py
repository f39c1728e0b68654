"""Emu3 through transformers' model definition (issue 32): parity with its own generate under the
official demo's logits processors, export to ORT, the raster methods."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="Emu3 needs transformers (the [text] extra)")

from arexport.errors import ArexportError  # noqa: E402
from arexport.models.emu3 import NEGATIVE_PROMPT, POSITIVE_PROMPT  # noqa: E402
from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import SamplingParams  # noqa: E402

SIDE, V = 4, 40  # 4 x 4 tokens (32 px at the VQ-VAE's 8x), a 40-entry codebook
AREA = (SIDE * 8) ** 2
SPECIAL = ["<|endoftext|>", "<|extra_203|>", "<|extra_204|>", "<|extra_200|>", "<|extra_201|>", "<|image start|>",
           "<|image end|>", "<|image token|>", "<image>"]
WORDS = "a dog cat red blue running under the rain with hat big small green photo of tree house 4 *".split()
OVERRIDES = {"prompt_slots": 64, "image_area": AREA}


def make_emu3(d, seed=0, layers=2, v=V, text=None, vq=None, scale=0.2):
    """A tiny random Emu3 saved in the layout of BAAI/Emu3-Gen-hf: config.json (vocabulary_map with
    '<|visual token NNNNNN|>' entries), model.safetensors, tokenizer.json + tokenizer_config.json and
    processor_config.json, written by transformers' own save_pretrained. `v` codebook entries; `text`
    (Emu3TextConfig fields) and `vq` (an Emu3VQVAEConfig) replace the tiny shapes
    (benchmarks/t2i_shapes.py writes full-width ones); weights ~ N(0, scale^2)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import (Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor, Emu3Processor,
                              PreTrainedTokenizerFast)
    from transformers.models.emu3.configuration_emu3 import Emu3TextConfig, Emu3VQVAEConfig

    d.mkdir(parents=True, exist_ok=True)
    words = sorted(set(WORDS) | set(re.findall(r"\w+|[^\w\s]+", POSITIVE_PROMPT + " " + NEGATIVE_PROMPT)))
    visual = [f"<|visual token {i:06d}|>" for i in range(v)]
    vocab = {t: i for i, t in enumerate(SPECIAL + words + visual)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL + visual])
    tok.save(str(d / "raw.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(d / "raw.json"), bos_token="<|extra_203|>", eos_token="<|extra_204|>",
                                   pad_token="<|endoftext|>", extra_special_tokens={
                                       "image_token": "<image>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
                                       "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>"})
    (d / "raw.json").unlink()
    proc = Emu3Processor(image_processor=Emu3ImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3), tokenizer=fast)
    proc.save_pretrained(str(d))
    text = Emu3TextConfig(**{**dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2), **(text or {})})
    vq = vq or Emu3VQVAEConfig(codebook_size=v, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1, 1, 1],
                               num_res_blocks=1, attn_resolutions=[], hidden_size=32, num_attention_heads=1)
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(Emu3Config(text_config=text, vq_config=vq, vocabulary_map=vocab)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights large enough that greedy decoding does not collapse onto one token
        for name, p in model.named_parameters():
            if "norm" not in name and "vqmodel" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(str(d))
    return model, proc


@pytest.fixture(scope="module")
def emu3_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("emu3") / "Emu3-Gen-tiny"
    model, proc = make_emu3(d)
    return d, model, proc


def official_prefix_fn(proc, height, width, first_image_token_pos):
    """The prefix constraint of baaivision/Emu3 (commit f6ea9aa, emu3/mllm/utils_emu3.py lines 45-68),
    re-derived: with `offset` = tokens so far after the '<|image token|>' wrapper + 1, EOL where offset
    is a multiple of width + 1, then EOF, EOI, EOS, pads; visual tokens otherwise."""
    tk = proc.tokenizer
    visual = [tk.convert_tokens_to_ids(f"<|visual token {i:06d}|>") for i in range(V)]
    eol, eof = tk.convert_tokens_to_ids("<|extra_200|>"), tk.convert_tokens_to_ids("<|extra_201|>")
    eoi, eos, pad = tk.convert_tokens_to_ids("<|image end|>"), tk.eos_token_id, tk.pad_token_id

    def fn(batch_id, input_ids):
        offset = input_ids.shape[0] - first_image_token_pos
        if offset % (width + 1) == 0:
            return [eol]
        if offset == (width + 1) * height + 1:
            return [eof]
        if offset == (width + 1) * height + 2:
            return [eoi]
        if offset == (width + 1) * height + 3:
            return [eos]
        if offset > (width + 1) * height + 3:
            return [pad]
        return visual
    return fn


def official_generate(model, proc, prompt, cfg, negative=NEGATIVE_PROMPT, constraint=official_prefix_fn):
    """The official demo's call (baaivision/Emu3 image_generation.py lines 31-79): the prompt plus the
    positive suffix, the negative prompt as the unconditional context of transformers'
    UnbatchedClassifierFreeGuidanceLogitsProcessor, then the prefix constraint; greedy here."""
    from transformers.generation import LogitsProcessorList, PrefixConstrainedLogitsProcessor, UnbatchedClassifierFreeGuidanceLogitsProcessor

    kw = dict(return_for_image_generation=True, image_area=AREA, return_tensors="pt")
    pos = proc(text=[prompt + POSITIVE_PROMPT], **kw)
    neg = proc(text=[negative], **kw)
    wrapper = proc.tokenizer.convert_tokens_to_ids("<|image token|>")
    at = int((pos.input_ids[0] == wrapper).nonzero()[0, 0])
    procs = LogitsProcessorList([UnbatchedClassifierFreeGuidanceLogitsProcessor(cfg, model, unconditional_ids=neg.input_ids),
                                 PrefixConstrainedLogitsProcessor(constraint(proc, SIDE, SIDE, at), num_beams=1)])
    out = model.generate(pos.input_ids, attention_mask=pos.attention_mask, logits_processor=procs, do_sample=False,
                         max_new_tokens=SIDE * (SIDE + 1) + 3, pad_token_id=proc.tokenizer.pad_token_id)
    return pos.input_ids, out[:, pos.input_ids.shape[1]:]


def to_step_ids(model, bpe):
    """BPE ids of the generated grid -> codebook ids, with EOL as V (the engine's token space)."""
    b2i = model.model.vocabulary_mapping.bpe2img
    eol = model.model.vocabulary_mapping.eol_token_id
    return np.array([[V if int(t) == eol else b2i[int(t)] for t in row] for row in bpe])


@pytest.mark.parametrize("cfg,prompts", [(3.0, ("a red dog", "photo of a big green tree house under the rain")),
                                         (1.5, ("blue cat with a hat",))])
def test_greedy_tokens_equal_transformers_with_the_official_processors(emu3_dir, cfg, prompts):
    d, model, proc = emu3_dir
    gen = Generator.load("emu3-gen", checkpoint=str(d), overrides=OVERRIDES)
    n = SIDE * (SIDE + 1)
    for prompt in prompts:
        ids_ref, ref = official_generate(model, proc, prompt, cfg)
        ids, mask = gen.engine.encode_prompts([prompt])
        assert ids[mask].tolist() == ids_ref[0].tolist()
        out = gen.generate(prompts=[prompt], sampling=SamplingParams(temperature=0.0, cfg_scale=cfg))
        want = to_step_ids(model, ref[:, :n])
        assert len(set(want[0].tolist())) > 3  # not a collapsed sequence
        assert np.array_equal(out.tokens, want), prompt
        tk = proc.tokenizer  # the official tail after the grid: EOF, EOI, EOS
        assert ref[0, n:].tolist() == [tk.convert_tokens_to_ids(t) for t in ("<|extra_201|>", "<|image end|>", "<|extra_204|>")]
        px = model.decode_image_tokens(image_tokens=ref, height=SIDE, width=SIDE)
        pil = proc.postprocess(list(px.float()), return_tensors="PIL.Image.Image")["pixel_values"]  # the official decode
        assert np.abs(out.images.astype(int) - np.stack([np.asarray(p) for p in pil]).astype(int)).max() <= 1
        assert out.images.std() > 10  # a varied image, not a saturated one


def test_negative_controls_are_rejected(emu3_dir):
    """The parity test can fail: an unconstrained row end, or the empty prompt as the unconditional
    context, give other tokens than the engine."""
    d, model, proc = emu3_dir
    gen = Generator.load("emu3-gen", checkpoint=str(d), overrides=OVERRIDES)
    n = SIDE * (SIDE + 1)
    out = gen.generate(prompts=["a red dog"], sampling=SamplingParams(temperature=0.0, cfg_scale=3.0), images=False)

    def no_eol(proc, h, w, at):
        fn = official_prefix_fn(proc, h, w, at)
        visual = fn(0, torch.zeros(at + 1))
        return lambda b, ids: visual if (ids.shape[0] - at) <= (w + 1) * h else fn(b, ids)

    _, ref = official_generate(model, proc, "a red dog", 3.0, constraint=no_eol)
    assert not (ref[:, :n] == model.model.vocabulary_mapping.eol_token_id).any()
    _, ref = official_generate(model, proc, "a red dog", 3.0, negative="a")
    assert not np.array_equal(out.tokens, to_step_ids(model, ref[:, :n]))


def test_methods_run_on_emu3(emu3_dir, tmp_path):
    d, _, _ = emu3_dir
    from arexport.runtime.loading import open_engine

    gen = Generator.load("emu3-gen", checkpoint=str(d), overrides=OVERRIDES)
    prompts = ["a red dog", "blue cat with a hat"]
    a = gen.generate(prompts=prompts, batch_size=1, seed=4, images=False)
    b = gen.generate(prompts=prompts, batch_size=2, seed=4, images=False)
    assert np.array_equal(a.tokens, b.tokens)
    eol_cols = a.tokens.reshape(2, SIDE, SIDE + 1)
    assert (eol_cols[:, :, -1] == V).all() and (eol_cols[:, :, :-1] < V).all()  # sampled, yet EOL exactly at row ends
    greedy = SamplingParams(temperature=0.0, cfg_scale=3.0)
    ar = gen.generate(prompts=prompts, sampling=greedy, images=False)
    sjd = gen.generate(prompts=prompts, method="sjd", method_options={"window": 4}, sampling=greedy, images=False)
    assert np.array_equal(sjd.tokens, ar.tokens)  # lossless: greedy SJD is greedy AR
    draft_dir = tmp_path / "draft"
    make_emu3(draft_dir, seed=1, layers=1)  # a random-init draft of the same tokenizer
    gen.draft = open_engine("emu3-gen", checkpoint=str(draft_dir), overrides=OVERRIDES)
    for method in ("sd", "lantern", "vvs"):
        r = gen.generate(prompts=prompts, method=method, method_options={"gamma": 2}, seed=1, images=False)
        t = r.tokens.reshape(2, SIDE, SIDE + 1)
        assert r.stats["draft_forwards"] > 0 and (t[:, :, -1] == V).all() and (t[:, :, :-1] < V).all(), method
    for method in ("gridar", "best-of-n"):
        opts = {"candidates": 4, "scorer": "tests.test_janus:brightness"}
        r = gen.generate(prompts=prompts[:1], method=method, images=False,
                         method_options={**opts, "verifier": "accept-all"} if method == "gridar" else opts)
        assert r.tokens.shape == (1, SIDE * (SIDE + 1)) and (r.tokens.reshape(SIDE, SIDE + 1)[:, -1] == V).all()
    for method, opts in (("zipar", {"window": 2}), ("gsd", {"window": 4})):  # rows of w + 1 with EOL; EOL's zero codebook row
        r = gen.generate(prompts=prompts, method=method, method_options=opts, seed=1, images=False)
        t = r.tokens.reshape(2, SIDE, SIDE + 1)
        assert (t[:, :, -1] == V).all() and (t[:, :, :-1] < V).all(), method


@pytest.fixture(scope="module")
def emu3_engine(emu3_dir, tmp_path_factory):
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.models.registry import load_model

    d, _, _ = emu3_dir
    out = tmp_path_factory.mktemp("emu3-engine") / "eng"
    build_engine(load_model("emu3-gen", checkpoint=str(d), overrides=OVERRIDES), out, BuildOptions(batch_sizes=[1, 4]))
    return out


def test_ort_engine_equals_torch_without_transformers(emu3_dir, emu3_engine, tmp_path):
    import subprocess
    import sys

    d, model, proc = emu3_dir
    manifest = json.loads((emu3_engine / "manifest.json").read_text())
    assert manifest["export"]["prompter"]["negative_prompt"] == NEGATIVE_PROMPT
    prompts = ["a red dog", "photo of a big green tree house under the rain"]
    b = Generator.load("emu3-gen", checkpoint=str(d), overrides=OVERRIDES).generate(
        prompts=prompts, sampling=SamplingParams(temperature=0.0, cfg_scale=3.0))
    code = (  # a fresh interpreter where importing transformers fails
        "import sys, numpy as np; sys.modules['transformers'] = None\n"
        "from arexport.runtime.generator import Generator\nfrom arexport.runtime.sampling import SamplingParams\n"
        f"g = Generator.load({str(emu3_engine)!r}, backend='ort')\n"
        f"r = g.generate(prompts={prompts!r}, sampling=SamplingParams(temperature=0.0, cfg_scale=3.0))\n"
        f"np.savez({str(tmp_path / 'ort.npz')!r}, tokens=r.tokens, images=r.images)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    a = np.load(tmp_path / "ort.npz")
    assert np.array_equal(a["tokens"], b.tokens) and np.abs(a["images"].astype(int) - b.images.astype(int)).max() <= 1


def test_profile_of_an_emu3_engine(emu3_engine, tmp_path):
    """`arexport profile ENGINE --prompt ... --compare ort:ar,ort:sjd`: step counts of the grid (EOL
    column included), JSON results for both configurations."""
    from click.testing import CliRunner

    from arexport.cli import cli

    res = CliRunner().invoke(cli, ["profile", str(emu3_engine), "--prompt", "a red dog", "--prompt", "blue cat with a hat",
                                   "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--no-bandwidth",
                                   "--compare", "ort:ar,ort:sjd:window=4", "--json", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    ar, sjd = json.loads((tmp_path / "p.json").read_text())["results"]
    n = SIDE * (SIDE + 1)
    assert ar["target_forwards_per_image"] == n and ar["steps"]["decode"]["count"] == n - 1  # one batch, one repeat
    assert sjd["target_forwards_per_image"] < n
    assert ar["images_per_s"] > 0 and sjd["tokens_per_s"] > 0 and "verify" in sjd["steps"]


def test_bad_emu3_input_is_named(emu3_dir, tmp_path):
    d, _, _ = emu3_dir
    with pytest.raises(ArexportError, match="prompt 0 is [0-9]+ tokens"):
        Generator.load("emu3-gen", checkpoint=str(d), overrides={**OVERRIDES, "prompt_slots": 8}).generate(prompts=["a red dog"])
    with pytest.raises(ArexportError, match="image_area 100000000 gives 1250 tokens per side"):
        Generator.load("emu3-gen", checkpoint=str(d), overrides={"image_area": 10 ** 8})
    with pytest.raises(ArexportError, match="not n_layer"):
        Generator.load("emu3-gen", checkpoint=str(d), overrides={"n_layer": 2})
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(ArexportError, match="has no processor_config.json"):
        Generator.load("emu3-gen", checkpoint=str(bare))
    (bare / "processor_config.json").write_text((d / "processor_config.json").read_text())
    with pytest.raises(ArexportError, match="has no tokenizer.json"):
        Generator.load("emu3-gen", checkpoint=str(bare))


def test_dry_run_prints_the_memory_of_a_full_size_engine(tmp_path):
    """Emu3-Gen's shapes (transformers' Emu3 config defaults: 4096 wide, 32 layers, 8 KV heads of 128,
    184622 text tokens) from config.json alone; the KV cache figure re-derived by hand."""
    from click.testing import CliRunner
    from transformers import Emu3Config
    from transformers.models.emu3.configuration_emu3 import Emu3TextConfig, Emu3VQVAEConfig

    from arexport.cli import cli

    vmap = {f"<|visual token {i:06d}|>": 151854 + i for i in range(32768)}
    Emu3Config(text_config=Emu3TextConfig(), vq_config=Emu3VQVAEConfig(), vocabulary_map=vmap).save_pretrained(tmp_path)
    r = CliRunner().invoke(cli, ["build", "emu3-gen", "--checkpoint", str(tmp_path), "--dry-run", "--precision", "bf16"])
    assert r.exit_code == 0, r.output
    slots = -(-(128 + 90 * 91 + 15) // 8) * 8  # prompt slots + 90 rows of 91 + verify lookahead, rounded to 8
    kv1 = 2 * 32 * 8 * 128 * slots * 2 * 2  # K and V, layers, heads, head_dim, slots, 2 CFG rows, bf16
    assert f"{slots} cache slots" in r.output and f"KV cache {kv1 / 2 ** 30:.2f} GiB" in r.output
    assert f"KV cache {8 * kv1 / 2 ** 30:.2f} GiB" in r.output and "8.49 B step parameters" in r.output
    r = CliRunner().invoke(cli, ["build", "demo", "--dry-run"])
    assert r.exit_code != 0 and "config-only models" in r.output
