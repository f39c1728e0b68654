"""The Ray Serve replica class without Ray: its HTTP entry point (what Serve's proxy calls) in this
process, on a real starlette Request (tests/test_deploy_ray.py runs it inside a Ray cluster)."""

from __future__ import annotations

import numpy as np

from arexport.runtime.generator import Generator


def test_replica_http_entry_point_without_ray():
    """Replica.__call__ answers a JSON request like the handle does, and a bad one with 400."""
    import asyncio
    import base64
    import io
    import json

    from PIL import Image
    from starlette.requests import Request

    from arexport.deploy.ray_serve import Replica

    def request(body: dict) -> Request:
        payload = json.dumps(body).encode()

        async def receive():
            return {"type": "http.request", "body": payload, "more_body": False}

        return Request({"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}, receive)

    replica = Replica("demo", max_batch=2)
    try:
        out = asyncio.run(replica(request({"classes": [2, 5], "seed": 8})))
        bad = asyncio.run(replica(request({"classes": [2], "seeed": 8})))
    finally:
        replica.service.close()
    gen = Generator.load("demo")
    ref = gen.generate(classes=[2, 5], seed=8)
    assert np.array_equal(np.asarray(out["tokens"]), ref.tokens)
    imgs = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(p))).convert("RGB")) for p in out["images"]])
    assert np.array_equal(imgs, ref.images)
    assert bad.status_code == 400 and "seeed" in json.loads(bad.body)["error"]
