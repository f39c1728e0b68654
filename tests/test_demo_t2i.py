"""demo-t2i: the shipped text-to-image digits model, prompts to images with no download.

Torch and ONNX Runtime give the same tokens for the same prompts and seed; the engine directory
carries its prompt encoder (text_encoder.onnx + tokenizer.json) so the ORT path imports neither
transformers nor model code; prompts files, HTTP prompts and every raster method work; the images
show the named digit under both demo judges; bad prompts get a one-line error.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from arexport.errors import ArexportError
from arexport.quality import score_digits
from arexport.runtime.generator import Generator
from arexport.runtime.sampling import SamplingParams, default_sampling

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPTS = ["a handwritten seven", "the digit 3", "draw a 4"]


@pytest.fixture(scope="module")
def gen():
    return Generator.load("demo-t2i")


@pytest.fixture(scope="module")
def engine(demo_t2i_engine):
    """The session's demo-t2i engine (conftest), built once for this module and test_deploy_triton.py."""
    return demo_t2i_engine


@pytest.fixture(scope="module")
def ort_gen(engine):
    return Generator.load(str(engine), backend="ort")


def test_torch_and_ort_give_the_same_tokens_from_prompts(gen, ort_gen):
    a = gen.generate(prompts=PROMPTS, seed=5, images=False).tokens
    b = ort_gen.generate(prompts=PROMPTS, seed=5, images=False).tokens
    assert a.shape == (3, 64) and np.array_equal(a, b)
    assert not np.array_equal(a, gen.generate(prompts=PROMPTS, seed=6, images=False).tokens)  # the seed matters
    feats, mask = ort_gen.engine.encode_prompts(PROMPTS)
    ref, ref_mask = gen.engine.encode_prompts(PROMPTS)
    assert feats.shape == (3, 12, 32) and (feats - ref).abs().max() < 1e-5 and bool((mask == ref_mask).all())
    # left-padded as LlamaGen's captions: "the digit 3" is 3 words + </s>
    assert mask[1].tolist() == [False] * 8 + [True] * 4


def test_engine_directory_carries_its_prompt_encoder(engine):
    manifest = json.loads((engine / "manifest.json").read_text())
    assert "text_encoder" in manifest["graphs"] and "prefill" in manifest["graphs"]
    assert (engine / "tokenizer.json").is_file() and (engine / "uncond_embedding.npy").is_file()
    assert manifest["export"]["text_encoder"]["max_length"] == 12 and manifest["export"]["text_encoder"]["overflow"] == "error"
    code = ("import sys; from arexport.runtime.generator import Generator; "
            f"g = Generator.load({str(engine)!r}, backend='ort'); "
            "t = g.generate(prompts=['a handwritten seven'], images=True); assert t.images.shape[0] == 1; "
            "bad = [m for m in ('transformers', 'arexport.models', 'sklearn') if m in sys.modules]; "
            "assert not bad, f'imported {bad}'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_prompts_file_and_cli(engine, ort_gen, tmp_path):
    from click.testing import CliRunner

    from arexport.cli import cli

    f = tmp_path / "p.txt"
    f.write_text("a handwritten seven\n\nthe digit 3\n")
    tok = {}
    for name, args in (("torch", ["--model", "demo-t2i"]), ("ort", [str(engine), "--backend", "ort"])):
        r = CliRunner().invoke(cli, ["generate", *args, "--prompt", "draw a 4", "--prompts-file", str(f), "--seed", "3",
                                     "--save-tokens", str(tmp_path / f"{name}.npy")])
        assert r.exit_code == 0, r.output
        tok[name] = np.load(tmp_path / f"{name}.npy")
    assert tok["torch"].shape == (3, 64) and np.array_equal(tok["torch"], tok["ort"])
    # order: --prompt first, then the file's lines
    want = ort_gen.generate(prompts=["draw a 4", "a handwritten seven", "the digit 3"], seed=3,
                            sampling=default_sampling(ort_gen.spec), images=False).tokens  # the CLI's sampler: the model's
    assert np.array_equal(tok["ort"], want)


def test_http_prompts(ort_gen):
    import httpx

    from arexport.serving.http import create_app
    from arexport.serving.server import BackgroundServer
    from arexport.serving.service import GenerationService

    svc = GenerationService(ort_gen, max_batch=2)
    try:
        with BackgroundServer(create_app(svc)) as url:
            r = httpx.post(f"{url}/generate", json={"prompts": PROMPTS, "seed": 2, "format": "tokens"}, timeout=120)
            assert r.status_code == 200, r.text
            alone = ort_gen.generate(prompts=PROMPTS, seed=2, sampling=svc.default_sampling(), images=False).tokens
            assert np.array_equal(np.array(r.json()["tokens"]), alone)
            r = httpx.post(f"{url}/generate", json={"prompt": " ".join(["seven"] * 20)}, timeout=60)
            assert r.status_code == 400 and "at most 12" in r.json()["error"]
    finally:
        svc.close()


def _prompts(n: int) -> tuple[list[str], list[int]]:
    """n prompts cycling classes 0..9 and three phrasings (words and numerals)."""
    forms = ("a handwritten {w}", "the digit {n}", "draw a {n}")
    out = [forms[(i // 10) % 3].format(w=WORDS[i % 10], n=i % 10) for i in range(n)]
    return out, [i % 10 for i in range(n)]


def test_images_show_the_named_digit_under_both_judges(gen):
    prompts, classes = _prompts(100)
    r = gen.generate(prompts=prompts, sampling=default_sampling(gen.spec), seed=0, batch_size=50, images=False)
    for judge in ("cnn", "mlp"):
        assert score_digits(r.tokens, classes, judge).accuracy >= 0.85, judge
        # negative control: the same images against the wrong labels
        assert score_digits(r.tokens, [(c + 1) % 10 for c in classes], judge).accuracy < 0.2, judge
    # and the prompt, not chance, decides: the same seed with other digits named gives other classes
    swapped = gen.generate(prompts=[p.replace(WORDS[c], WORDS[(c + 5) % 10]).replace(str(c), str((c + 5) % 10))
                                    for p, c in zip(prompts[:20], classes[:20])], seed=0, images=False)
    assert score_digits(swapped.tokens, [(c + 5) % 10 for c in classes[:20]], "cnn").accuracy >= 0.8


def test_every_raster_method_runs_from_prompts(gen, ort_gen):
    greedy = SamplingParams(temperature=0.0, cfg_scale=1.5)
    ar = gen.generate(prompts=PROMPTS, sampling=greedy, images=False)
    sjd = gen.generate(prompts=PROMPTS, method="sjd", method_options={"window": 8}, sampling=greedy, images=False)
    assert np.array_equal(ar.tokens, sjd.tokens)  # lossless
    for backend in (gen, ort_gen):
        for method, opts in (("lantern", {"drafter": "sjd", "window": 8}), ("gridar", {"candidates": 4}),
                             ("best-of-n", {"candidates": 2})):
            r = backend.generate(prompts=PROMPTS[:2], method=method, method_options=opts, seed=1, images=False)
            assert r.tokens.shape == (2, 64), method
    a = gen.generate(prompts=PROMPTS[:2], method="gridar", method_options={"candidates": 4}, seed=1, images=False).tokens
    b = ort_gen.generate(prompts=PROMPTS[:2], method="gridar", method_options={"candidates": 4}, seed=1, images=False).tokens
    assert np.array_equal(a, b)
    for method in ("sd", "vvs"):  # demo-t2i ships no draft model
        with pytest.raises(ArexportError, match="needs a draft model"):
            gen.generate(prompts=PROMPTS[:1], method=method)


@pytest.mark.parametrize("prompt, message", [("", "prompt 0 is empty"), ("   ", "prompt 0 is empty"),
                                             (" ".join(["seven"] * 12), "prompt 0 is 13 tokens; .* at most 12")])
def test_bad_prompts_get_a_one_line_error(gen, ort_gen, prompt, message):
    for g in (gen, ort_gen):
        with pytest.raises(ArexportError, match=message) as e:
            g.generate(prompts=[prompt], images=False)
        assert "\n" not in str(e.value)
    # 11 words + </s> fit exactly
    assert gen.generate(prompts=[" ".join(["seven"] * 11)], images=False).tokens.shape == (1, 64)


def test_cli_bad_prompt_is_one_line(tmp_path):
    from click.testing import CliRunner

    from arexport.cli import cli

    r = CliRunner().invoke(cli, ["generate", "--model", "demo-t2i", "--prompt", "draw " * 15, "--save-tokens",
                                 str(tmp_path / "t.npy")])
    assert r.exit_code == 1 and "at most 12" in r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1, r.output
    assert not (tmp_path / "t.npy").exists()


def test_digit_scorer_ranks_prompted_candidates_by_the_judges_top_class(gen):
    import torch

    from arexport.families import Conditions
    from arexport.quality import judge
    from arexport.runtime.verifiers import DigitScorer, _digit_input

    r = gen.generate(prompts=PROMPTS, sampling=default_sampling(gen.spec), seed=0)
    images = torch.from_numpy(np.concatenate([r.images, np.zeros_like(r.images[:1])]))  # + a blank canvas
    feats, mask = gen.engine.encode_prompts(PROMPTS + ["an eight"])
    p = torch.softmax(judge("cnn")(_digit_input(images)).double(), -1)
    by_prompt = DigitScorer()(images, Conditions(embeds=feats, mask=mask))
    assert torch.equal(by_prompt, p.max(1).values)
    assert by_prompt[:3].min() > by_prompt[3]  # drawn digits read more clearly than a blank canvas
    classes = torch.tensor([7, 3, 4, 8])
    assert torch.equal(DigitScorer()(images, Conditions(classes=classes)), p.gather(1, classes[:, None])[:, 0])
