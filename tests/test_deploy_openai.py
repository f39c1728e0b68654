"""POST /v1/images/generations through the official `openai` client against a real `arexport serve`
app on loopback: images equal `arexport generate` and the service alone; errors in OpenAI's shape."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

openai = pytest.importorskip("openai", reason="the OpenAI endpoint tests need the openai client (pip install 'arexport[deploy]')")

from arexport.cli import cli  # noqa: E402
from arexport.runtime.generator import Generator  # noqa: E402
from arexport.serving.http import create_app  # noqa: E402
from arexport.serving.server import BackgroundServer  # noqa: E402
from arexport.serving.service import GenerationService  # noqa: E402

TOKEN = "s3cret"


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _cli_images(tmp_path, *args) -> list[np.ndarray]:
    """The images `arexport generate ... --out DIR` writes, in order."""
    out = tmp_path / "cli"
    res = CliRunner().invoke(cli, ["generate", *map(str, args), "--out", str(out), "--no-progress"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(out.glob("*.png"))]


@pytest.fixture(scope="module")
def demo_server():
    svc = GenerationService(Generator.load("demo"), batching="continuous", max_batch=4)
    with BackgroundServer(create_app(svc, token=TOKEN, max_images=8)) as url:
        yield url, svc
    svc.close()


@pytest.fixture(scope="module")
def t2i_server():
    svc = GenerationService(Generator.load("demo-t2i"), batching="continuous", max_batch=4)
    with BackgroundServer(create_app(svc, token=TOKEN, max_images=8)) as url:
        yield url, svc
    svc.close()


def _client(url, key=TOKEN):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)


def test_class_conditional_matches_cli_and_service(demo_server, tmp_path):
    url, svc = demo_server
    client = _client(url)
    reqs = [dict(classes=[3, 7], seed=5), dict(classes=[1], seed=9, n=3), dict(classes=[0, 2, 4], seed=11),
            dict(classes=[8], seed=2, method="sjd", temperature=0.7)]

    def ask(extra):
        n = extra.pop("n", None)
        return client.images.generate(prompt="", size="128x128", response_format="b64_json", model="demo",
                                      extra_body=extra, **({"n": n} if n else {}))

    with ThreadPoolExecutor(len(reqs)) as pool:  # concurrent: they share the service's batches
        answers = list(pool.map(ask, [dict(r) for r in reqs]))
    for req, ans in zip(reqs, answers):
        classes = req["classes"] * req.get("n", 1)
        got = np.stack([_decode(d.b64_json) for d in ans.data])
        assert got.shape == (len(classes), 128, 128, 3)
        alone = svc.generate(classes, seed=req["seed"], method=req.get("method"),
                             sampling=svc.gen.sampling_params(temperature=req.get("temperature")))
        assert np.array_equal(got, alone.images)
        assert ans.model_extra["arexport"]["seed"] == req["seed"]
    # and `arexport generate` for the first request
    cli_imgs = _cli_images(tmp_path, "--model", "demo", "--classes", "3,7", "--seed", 5)
    assert np.array_equal(np.stack(cli_imgs), np.stack([_decode(d.b64_json) for d in answers[0].data]))
    # a different seed gives different images (the comparison can fail)
    other = client.images.generate(prompt="", extra_body=dict(classes=[3, 7], seed=6))
    assert not np.array_equal(np.stack([_decode(d.b64_json) for d in other.data]),
                              np.stack([_decode(d.b64_json) for d in answers[0].data]))


def test_prompts_match_cli(t2i_server, tmp_path):
    url, svc = t2i_server
    client = _client(url)
    ans = client.images.generate(prompt="a handwritten seven", n=2, extra_body={"seed": 3})
    got = np.stack([_decode(d.b64_json) for d in ans.data])
    cli_imgs = np.stack(_cli_images(tmp_path, "--model", "demo-t2i", "--prompt", "a handwritten seven",
                                    "--prompt", "a handwritten seven", "--seed", 3))
    assert got.shape == cli_imgs.shape == (2, svc.engine.spec.image.image_size, svc.engine.spec.image.image_size, 3)
    assert np.array_equal(got, cli_imgs)
    assert not np.array_equal(got[0], got[1])  # image i has its own seed image_seed(3, i)


@pytest.mark.parametrize("kwargs, extra, status, param, words", [
    (dict(size="512x512"), {"classes": [1]}, 400, "size", "512x512"),
    (dict(response_format="url"), {"classes": [1]}, 400, "response_format", "b64_json"),
    (dict(model="dall-e-3"), {"classes": [1]}, 404, "model", "dall-e-3"),
    ({}, {}, 400, "classes", "classes extension"),
    (dict(n=3), {"classes": [1, 2]}, 400, "n", "2 classes"),
    ({}, {"classes": [1], "clases": [2]}, 400, "clases", "unknown field"),
    ({}, {"classes": [1], "method": "nope"}, 400, "method", "nope"),
    (dict(n=9), {"classes": [1]}, 400, "n", "limit"),
])
def test_bad_requests_get_openai_errors(demo_server, kwargs, extra, status, param, words):
    url, _ = demo_server
    with pytest.raises(openai.APIStatusError) as ei:
        _client(url).images.generate(prompt="", extra_body=extra, **kwargs)
    e = ei.value
    assert e.status_code == status
    assert e.param == param and e.type == "invalid_request_error"
    assert words in e.message


def test_prompt_refused_for_class_conditional(demo_server):
    url, _ = demo_server
    with pytest.raises(openai.BadRequestError, match="class-conditional"):
        _client(url).images.generate(prompt="a cat", extra_body={"classes": [1]})


def test_auth_and_error_shape(demo_server):
    url, _ = demo_server
    with pytest.raises(openai.AuthenticationError) as ei:
        _client(url, key="wrong").images.generate(prompt="", extra_body={"classes": [1]})
    assert ei.value.code == "invalid_api_key"
    r = httpx.post(url + "/v1/images/generations", json={"prompt": "", "classes": [1]})  # no token
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(url + "/generate", json={"classes": [1]})  # the native API keeps its own shape
    assert r.status_code == 401 and isinstance(r.json()["error"], str)
    r = httpx.post(url + "/v1/images/generations", content=b"{not json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
