"""Lumina-mGPT 1.0 through transformers' Chameleon modules (issue 32): greedy parity with the official
generation loop re-derived here, the raster methods."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="Lumina-mGPT needs transformers (the [text] extra)")

from arexport.errors import ArexportError  # noqa: E402
from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import SamplingParams  # noqa: E402

PX, V = 64, 48  # 2 resolution grids of 32 px -> 4 x 4 image tokens; a 48-entry codebook
SIDE = 2 * PX // 32
SPECIAL = ["<s>", "<pad>", "</s>", "<reserved08706>", "<racm3:break>", "<eoss>", "<reserved08799>", "<reserved08802>"]
WORDS = "a dog cat red blue under the rain with hat big green photo of tree house Generate an image 64x64 according to following prompt :"
OVERRIDES = {"prompt_slots": 32, "image_px": PX}


def img_name(i: int) -> str:
    """Chameleon's name of image token i: IMGIMG, the decimal digits as letters A-J, Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(i)) + "Z"


def make_lumina(d, seed=0, layers=2, v=V, text=None, vq=None, vocab_size=None, scale=0.2):
    """A tiny random Lumina-mGPT (Chameleon layout: config.json with vocabulary_map, model.safetensors,
    tokenizer.json) written by transformers' save_pretrained. `v` image tokens; `text` (ChameleonConfig
    fields) and `vq` (a ChameleonVQVAEConfig) replace the tiny shapes; `vocab_size` pads the vocabulary
    with filler tokens (benchmarks/t2i_shapes.py: 7B shapes); weights ~ N(0, scale^2)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration, PreTrainedTokenizerFast
    from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig

    d.mkdir(parents=True, exist_ok=True)
    words = sorted(set(WORDS.split()))
    grids = [f"<reserved{8800 + n:05d}>" for n in range(1, 65) if f"<reserved{8800 + n:05d}>" not in SPECIAL]
    names = SPECIAL + [img_name(i) for i in range(v)] + words + (grids if vocab_size else [])
    vocab = {t: i for i, t in enumerate(names + [f"<filler{i}>" for i in range((vocab_size or 0) - len(names))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL + (grids if vocab_size else [])])
    tok.save(str(d / "raw.json"))
    PreTrainedTokenizerFast(tokenizer_file=str(d / "raw.json"), bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(str(d))
    (d / "raw.json").unlink()
    # five levels as released (16 px a token), narrow; attention at 8 px and new channel counts exercise
    # every decoder part (tests/test_lumina_vqgan.py)
    vq = vq or ChameleonVQVAEConfig(embed_dim=4, num_embeddings=v, latent_channels=4, base_channels=32,
                                    channel_multiplier=[1, 2, 1, 1, 2], num_res_blocks=1, attn_resolutions=[8], resolution=64)
    cfg = ChameleonConfig(**{**dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256),
                             **(text or {}), **dict(vocabulary_map=vocab, vq_config=vq.to_dict(), bos_token_id=0,
                                                    pad_token_id=1, eos_token_id=2)})
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and "vqmodel" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(str(d))
    return model, vocab


@pytest.fixture(scope="module")
def lumina_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lumina") / "Lumina-mGPT-tiny"
    model, vocab = make_lumina(d)
    return d, model, vocab


def official_prompt(vocab, caption):
    """(conditional prompt ids, unconditional ids) as official_loop documents them."""
    words = re.findall(r"\w+|[^\w\s]+", f"Generate an image of {PX}x{PX} according to the following prompt:\n{caption}")
    header = [vocab["<racm3:break>"], vocab["<reserved08802>"], vocab["<reserved08802>"]]
    return [vocab["<s>"]] + [vocab[w] for w in words] + [vocab["<reserved08706>"]] + header, header


def official_loop(model, vocab, caption, cfg, uncond=None, newline=True):
    """Alpha-VLLM/Lumina-mGPT (commit 104abe4) generation, re-derived (greedy in place of sampling):
    - prompt: BOS + 'Generate an image of {w}x{h} according to the following prompt:\\n' + caption + the
      separator <reserved08706> (generate.py l.57; data/convertsation.py l.11-21; xllmx tokenizer.py
      l.50-60: no special tokens, BOS prepended), then <racm3:break> and the two resolution tokens
      (here part of the prompt; officially the model writes them);
    - guidance (inference_solver.py l.95-126): raw logits s (c - u) + u, with the unconditional context
      starting at the image-start token (l.58-66);
    - constraint (l.172-215): with t image tokens so far, the new-line token alone when (t + 1) % (w + 1)
      == 0, otherwise only image tokens;
    - the model's logits are lm_head(hidden states) with image tokens allowed (mask_image_logits off)."""
    img = [vocab[img_name(i)] for i in range(V)]
    nl = vocab["<reserved08799>"]
    cond, header = official_prompt(vocab, caption)
    unc = list(uncond if uncond is not None else header)
    out = []

    def last_logits(ids):
        with torch.no_grad():
            h = model.model(input_ids=torch.tensor([ids])).last_hidden_state
            return model.lm_head(h)[0, -1].float()

    for t in range(SIDE * (SIDE + 1)):
        c, u = last_logits(cond), last_logits(unc)
        s = cfg * (c - u) + u
        allowed = torch.zeros_like(s, dtype=torch.bool)
        if newline and (t + 1) % (SIDE + 1) == 0:
            allowed[nl] = True
        else:
            allowed[img] = True
        nxt = int(torch.where(allowed, s, torch.tensor(-float("inf"))).argmax())
        out.append(nxt)
        cond.append(nxt)
        unc.append(nxt)
    b2i = {vocab[img_name(i)]: i for i in range(V)}
    return cond[: len(cond) - len(out)], np.array([[V if t == nl else b2i[t] for t in out]])


@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_greedy_tokens_equal_the_official_loop(lumina_dir, cfg):
    d, model, vocab = lumina_dir
    gen = Generator.load("lumina-mgpt-7b-768", checkpoint=str(d), overrides=OVERRIDES)
    for caption in ("a red dog", "photo of a big green tree house under the rain"):
        prompt_ref, want = official_loop(model, vocab, caption, cfg)
        ids, mask = gen.engine.encode_prompts([caption])
        assert ids[mask].tolist() == prompt_ref
        out = gen.generate(prompts=[caption], sampling=SamplingParams(temperature=0.0, cfg_scale=cfg), images=False)
        assert len(set(want[0].tolist())) > 3 and np.array_equal(out.tokens, want), caption


def test_negative_controls_are_rejected(lumina_dir):
    """The loop can tell: a BOS in the unconditional context, or no new-line constraint, change the tokens."""
    d, model, vocab = lumina_dir
    gen = Generator.load("lumina-mgpt-7b-768", checkpoint=str(d), overrides=OVERRIDES)
    out = gen.generate(prompts=["a red dog"], sampling=SamplingParams(temperature=0.0, cfg_scale=3.0), images=False)
    header = [vocab["<racm3:break>"], vocab["<reserved08802>"], vocab["<reserved08802>"]]
    _, bos_uncond = official_loop(model, vocab, "a red dog", 3.0, uncond=[vocab["<s>"]] + header)
    _, free = official_loop(model, vocab, "a red dog", 3.0, newline=False)
    assert not np.array_equal(out.tokens, bos_uncond) and not np.array_equal(out.tokens, free)


def test_methods_run_and_images_are_refused(lumina_dir, tmp_path):
    from arexport.runtime.loading import open_engine

    d, _, _ = lumina_dir
    gen = Generator.load("lumina-mgpt-7b-768", checkpoint=str(d), overrides=OVERRIDES)
    prompts = ["a red dog", "blue cat with a hat"]
    greedy = SamplingParams(temperature=0.0, cfg_scale=3.0)
    ar = gen.generate(prompts=prompts, sampling=greedy, images=False)
    sjd = gen.generate(prompts=prompts, method="sjd", method_options={"window": 4}, sampling=greedy, images=False)
    assert np.array_equal(sjd.tokens, ar.tokens)
    draft_dir = tmp_path / "draft"
    make_lumina(draft_dir, seed=1, layers=1)
    gen.draft = open_engine("lumina-mgpt-7b-768", checkpoint=str(draft_dir), overrides=OVERRIDES)
    for method in ("sd", "lantern", "vvs"):
        r = gen.generate(prompts=prompts, method=method, method_options={"gamma": 2}, seed=1, images=False)
        t = r.tokens.reshape(2, SIDE, SIDE + 1)
        assert r.stats["draft_forwards"] > 0 and (t[:, :, -1] == V).all() and (t[:, :, :-1] < V).all(), method
    with pytest.raises(ArexportError, match="VQGAN decoder"):
        gen.generate(prompts=prompts[:1])
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.models.registry import load_model

    with pytest.raises(ArexportError, match="build with --no-images"):  # refused before anything is written
        build_engine(load_model("lumina-mgpt-7b-768", checkpoint=str(d), overrides=OVERRIDES), tmp_path / "eng", BuildOptions())
    assert not (tmp_path / "eng").exists()


def test_dry_run_prints_the_memory_of_a_7b_engine(tmp_path):
    """Chameleon-7B shapes (transformers' ChameleonConfig defaults: 4096 wide, 32 layers, 32 KV heads of
    128) at 768 px; the KV cache figure re-derived by hand."""
    from click.testing import CliRunner
    from transformers import ChameleonConfig

    from arexport.cli import cli

    ChameleonConfig().save_pretrained(tmp_path)
    r = CliRunner().invoke(cli, ["build", "lumina-mgpt-7b-768", "--checkpoint", str(tmp_path), "--dry-run", "--precision", "bf16"])
    assert r.exit_code == 0, r.output
    slots = -(-(128 + 48 * 49 + 15) // 8) * 8
    kv1 = 2 * 32 * 32 * 128 * slots * 2 * 2  # K and V, layers, heads, head_dim, slots, 2 CFG rows, bf16
    assert f"{slots} cache slots" in r.output and f"KV cache {kv1 / 2 ** 30:.2f} GiB" in r.output
    assert f"KV cache {8 * kv1 / 2 ** 30:.2f} GiB" in r.output
    from tests.test_lumina_vqgan import official_param_shapes  # the released vqgan.yaml's decoder, walked by hand

    dec = sum(int(np.prod(s)) for n, s in official_param_shapes(ChameleonConfig().vq_config).items() if "quant_conv" not in n
              or n.startswith("post_quant_conv"))
    assert f"{dec / 1e6:.1f} M decoder parameters" in r.output
