"""Janus-Pro through transformers' model definition (issue 14): parity with its own image generate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="Janus needs transformers (the [text] extra)")

from arexport.errors import ArexportError  # noqa: E402
from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import SamplingParams  # noqa: E402

WORDS = "a dog cat red blue running under the rain with hat big small green photo of tree house".split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<begin_of_image>", "<end_of_image>", "<image_placeholder>", "<|User|>", "<|Assistant|>", ":"]
TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}<|User|>: {% for c in message['content'] %}"
            "{{ c['text'] }}{% endfor %}\n\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|Assistant|>:{% endif %}")


def make_janus(d, seed=0, layers=2):
    """A tiny random Janus saved as transformers saves it: model, processor (tokenizer.json, chat template)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import (JanusConfig, JanusForConditionalGeneration, JanusImageProcessorPil, JanusProcessor, LlamaConfig,
                              PreTrainedTokenizerFast)
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    d.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL[:9]])
    tok.save(str(d / "raw.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(d / "raw.json"), bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image_placeholder>",
                                                                            "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"})
    (d / "raw.json").unlink()
    improc = JanusImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)  # Janus-Pro's
    proc = JanusProcessor(image_processor=improc, tokenizer=fast, chat_template=TEMPLATE, num_image_tokens=16)
    proc.save_pretrained(str(d))
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = JanusVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                               patch_size=8, num_image_tokens=16)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=40, latent_channels=32, base_channels=32, channel_multiplier=[1, 1],
                          num_res_blocks=1, num_patches=4, projection_dim=32, image_token_embed_dim=32, num_hidden_layers=2)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(JanusConfig(text_config=text, vision_config=vision, vq_config=vq)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights large enough that greedy decoding does not collapse onto one token
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.generation_config.generation_kwargs = {"boi_token_id": vocab["<begin_of_image>"]}
    model.save_pretrained(str(d))
    return model, proc


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("janus") / "Janus-Pro-tiny"
    model, proc = make_janus(d)
    return d, model, proc


def hf_generate(model, proc, prompt, cfg, n=1):
    msgs = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = proc(text=[text] * n, generation_mode="image", return_tensors="pt")
    out = model.generate(**inputs, generation_mode="image", do_sample=False, guidance_scale=cfg)
    return inputs["input_ids"], out


@pytest.mark.parametrize("cfg", [2.0, 5.0])  # transformers cannot generate images at guidance <= 1
def test_greedy_tokens_equal_transformers_generate(janus_dir, cfg):
    d, model, proc = janus_dir
    gen = Generator.load("janus-pro", checkpoint=str(d), overrides={"prompt_slots": 16})
    for prompt in ("a red dog", "photo of a big green tree house under the rain"):
        ids_ref, ref = hf_generate(model, proc, prompt, cfg)
        ids, mask = gen.engine.encode_prompts([prompt])
        assert ids[mask].tolist() == ids_ref[0].tolist()
        out = gen.generate(prompts=[prompt], sampling=SamplingParams(temperature=0.0, cfg_scale=cfg))
        assert np.array_equal(out.tokens, ref.numpy()), prompt
        # channels first: on a tiny 8x8x3 image the processor cannot tell channels-last apart
        px = proc.postprocess(list(model.decode_image_tokens(ref).permute(0, 3, 1, 2).float()), return_tensors="pt")["pixel_values"]
        assert np.abs(out.images.astype(int) - px.permute(0, 2, 3, 1).numpy().astype(int)).max() <= 1


def test_methods_run_on_janus_and_prompts_batch_independently(janus_dir, tmp_path):
    d, _, _ = janus_dir
    draft_dir = tmp_path / "draft"
    make_janus(draft_dir, seed=1, layers=1)
    gen = Generator.load("janus-pro", checkpoint=str(d), overrides={"prompt_slots": 16}, draft=None)
    prompts = ["a red dog", "blue cat with a hat", "green tree"]
    a = gen.generate(prompts=prompts, batch_size=1, seed=4, images=False)
    b = gen.generate(prompts=prompts, batch_size=3, seed=4, images=False)
    assert np.array_equal(a.tokens, b.tokens)  # left padding and per-row positions do not leak between prompts
    sjd = gen.generate(prompts=prompts, method="sjd", method_options={"window": 4}, sampling=SamplingParams(temperature=0.0, cfg_scale=5.0),
                       images=False)
    ar = gen.generate(prompts=prompts, sampling=SamplingParams(temperature=0.0, cfg_scale=5.0), images=False)
    assert np.array_equal(sjd.tokens, ar.tokens)  # lossless: greedy SJD is greedy AR
    from arexport.runtime.loading import open_engine

    gen.draft = open_engine("janus-pro", checkpoint=str(draft_dir), overrides={"prompt_slots": 16})
    gen.engine.family.check_draft(gen.spec, gen.draft.spec)
    for method in ("sd", "lantern", "vvs"):
        r = gen.generate(prompts=prompts[:2], method=method, method_options={"gamma": 2}, images=False)
        assert r.tokens.shape == (2, 16) and r.stats["draft_forwards"] > 0
    for method in ("gridar", "best-of-n"):
        r = gen.generate(prompts=prompts[:1], method=method, method_options={"candidates": 4, "verifier": "accept-all",
                                                                             "scorer": "tests.test_janus:brightness"}
                         if method == "gridar" else {"candidates": 4, "scorer": "tests.test_janus:brightness"}, images=False)
        assert r.tokens.shape == (1, 16)


def brightness(images, *args, **kwargs):
    """A scorer for the test-time scaling methods: mean brightness of each candidate."""
    return torch.as_tensor(np.asarray(images)).float().mean(dim=(1, 2, 3))


def test_ort_engine_equals_torch_on_prompts(janus_dir, tmp_path):
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.models.registry import load_model

    d, model, proc = janus_dir
    loaded = load_model("janus-pro", checkpoint=str(d), overrides={"prompt_slots": 16})
    build_engine(loaded, tmp_path / "eng", BuildOptions(batch_sizes=[1, 4]))
    manifest = json.loads((tmp_path / "eng" / "manifest.json").read_text())
    assert manifest["export"]["prompter"]["template"] == "chat_template.jinja"
    ort_gen = Generator.load(str(tmp_path / "eng"), backend="ort")
    params = SamplingParams(temperature=0.0, cfg_scale=5.0)
    prompts = ["a red dog", "photo of a big green tree house under the rain"]
    a = ort_gen.generate(prompts=prompts, sampling=params)
    _, ref = hf_generate(model, proc, prompts[0], 5.0)
    assert np.array_equal(a.tokens[0], ref[0].numpy())
    b = Generator.load("janus-pro", checkpoint=str(d), overrides={"prompt_slots": 16}).generate(prompts=prompts, sampling=params)
    assert np.array_equal(a.tokens, b.tokens) and np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1


def test_bad_janus_input_is_named(janus_dir, tmp_path):
    d, _, _ = janus_dir
    gen = Generator.load("janus-pro", checkpoint=str(d), overrides={"prompt_slots": 8})
    with pytest.raises(ArexportError, match="prompt 0 is 1[0-9] tokens with the chat template"):
        gen.generate(prompts=["photo of a big green tree house under the rain"])
    with pytest.raises(ArexportError, match="generates from prompts"):
        gen.generate(classes=[1])
    with pytest.raises(ArexportError, match="prompt 0 is empty"):
        gen.generate(prompts=[""])
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(ArexportError, match="has no tokenizer.json"):
        Generator.load("janus-pro", checkpoint=str(bare))
    with pytest.raises(ArexportError, match="pass --checkpoint DIR"):
        Generator.load("janus-pro", random_init=True)


REWRITES: list = []


def rewrite(partial, conditions):
    """A reformulation hook named as module:callable: one new prompt per candidate, from the partial canvas."""
    REWRITES.append(partial.canvas.shape[0])
    return ["red dog" if float(img.float().mean()) > 100 else "blue cat" for img in partial.canvas]


def test_gridar_reformulates_prompts_from_the_partial_canvas(janus_dir):
    d, _, _ = janus_dir
    gen = Generator.load("janus-pro", checkpoint=str(d), overrides={"prompt_slots": 16})
    opts = {"candidates": 4, "verifier": "accept-all", "scorer": "tests.test_janus:brightness"}
    REWRITES.clear()
    r = gen.generate(prompts=["a red dog"], method="gridar", images=False, method_options={**opts, "reformulate": rewrite})
    assert r.tokens.shape == (1, 16) and REWRITES == [4, 4]  # called at both checkpoints with every candidate
    named = gen.generate(prompts=["a red dog"], method="gridar", images=False,  # the CLI's module:callable form
                         method_options={**opts, "reformulate": "tests.test_janus:rewrite"})
    assert np.array_equal(named.tokens, r.tokens)
    with pytest.raises(ArexportError, match="reformulate must return prompts"):
        gen.generate(prompts=["a red dog"], method="gridar", images=False,
                     method_options={**opts, "reformulate": lambda partial, conds: 42})
