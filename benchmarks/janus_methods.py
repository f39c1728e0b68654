#!/usr/bin/env python
"""Every method on a tiny random Janus from prompts: target and draft forwards per image (machine-independent).

    python benchmarks/janus_methods.py --images 8

The target is the 2-layer model of tests/test_janus.py (16 image tokens), the draft its 1-layer sibling
(another seed). Random weights: acceptance says nothing about real models, only that each method runs
its loop on Janus (prompt prefill, pad-token CFG rows) and what it costs in forwards.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from common import git_rev, machine, markdown_table  # noqa: E402
from tests.test_janus import make_janus  # noqa: E402

from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.loading import open_engine  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    args = ap.parse_args()
    words = "a dog cat red blue running under the rain with hat big small green photo of tree house".split()
    prompts = [" ".join(words[i % 7:i % 7 + 4]) for i in range(args.images)]
    with tempfile.TemporaryDirectory() as d:
        make_janus(Path(d) / "target")
        make_janus(Path(d) / "draft", seed=1, layers=1)
        gen = Generator(open_engine("janus-pro", checkpoint=str(Path(d) / "target"), overrides={"prompt_slots": 16}),
                        open_engine("janus-pro", checkpoint=str(Path(d) / "draft"), overrides={"prompt_slots": 16}))
        scorer = "benchmarks.janus_methods:brightness"
        runs = [("ar", {}), ("sjd", {"window": 16}), ("sd", {"gamma": 4}), ("lantern", {"gamma": 4}),
                ("vvs", {"gamma": 4}), ("gridar", {"candidates": 4, "verifier": "accept-all", "scorer": scorer}),
                ("best-of-n", {"candidates": 4, "scorer": scorer})]
        rows = []
        for method, opts in runs:
            r = gen.generate(prompts=prompts, method=method, method_options=opts, images=False, seed=0)
            rows.append({"method": method + "".join(f" {k}={v}" for k, v in opts.items() if k not in ("scorer", "verifier")),
                         "target fwd/img": r.stats["target_forwards_per_image"],
                         "draft fwd/img": r.stats["draft_forwards_per_image"],
                         "candidate fwd/img": r.stats.get("candidate_forwards_per_image", "")})
            print(rows[-1], file=sys.stderr)
    print(f"tiny random Janus (2 layers, 16 image tokens), {args.images} prompts, default sampler (cfg 5, T 1); "
          f"{machine()}; commit {git_rev()}")
    print(markdown_table(rows, ["method", "target fwd/img", "draft fwd/img", "candidate fwd/img"]))


def brightness(images, *args, **kwargs):
    import numpy as np
    import torch

    return torch.as_tensor(np.asarray(images)).float().mean(dim=(1, 2, 3))


if __name__ == "__main__":
    main()
