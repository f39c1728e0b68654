#!/usr/bin/env python
"""Wall-clock of latency-aware speculation (issue 19, part 1): ar vs sjd adaptive vs sjd window 16.

    python benchmarks/speculation.py --engine ENGINE_DIR --images 10 --runs 5
    python benchmarks/speculation.py --model GPT-B --images 1 --runs 5     # builds a random-weight engine

Same process, same engine, batch 1 (CFG rows at the model's default scale), ONNX Runtime on the
CPU. Each config is warmed up once, then generates `--images` images `--runs` times; the table has
the median ms per image, target forwards per image, engine and host ms per step, and the ratio of
ar's median to each config's. Ratios come from one run: the machines are noisy. Beside the speed, the
cost (arexport/profiling/quality_column.py, `--quality-images` images, seed 0, untimed): the fraction of
tokens equal to ar's under the same seed, the token-histogram TV distance to ar, and on the digits demo
the CNN judge's class accuracy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import git_rev, machine, markdown_table  # noqa: E402

from arexport.exporter.build import BuildOptions, build_engine  # noqa: E402
from arexport.models.registry import load_model  # noqa: E402
from arexport.profiling.quality_column import measure_quality  # noqa: E402
from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import default_sampling  # noqa: E402

CONFIGS = [("ar", {}), ("sjd adaptive", {}), ("sjd window 16", {"window": 16})]


def run(gen, method: str, options: dict, classes: list[int], runs: int) -> dict:
    sampling = default_sampling(gen.spec)
    gen.generate(classes=classes[:1], method=method, method_options=options, sampling=sampling, batch_size=1,
                 images=False, timings=False)
    per_image, stats = [], None
    engine_s = steps = host_s = 0.0
    for r in range(runs):
        t0 = time.perf_counter()
        res = gen.generate(classes=classes, method=method, method_options=options, sampling=sampling, batch_size=1,
                           images=False, timings=True, seed=r)
        dt = time.perf_counter() - t0
        per_image.append(dt / len(classes))
        e = sum(x.seconds for x in gen.engine.records)
        engine_s += e
        host_s += dt - e
        steps += len(gen.engine.records)
        stats = res.stats
    return {"ms/image": 1e3 * statistics.median(per_image), "runs ms/image": [round(1e3 * x, 1) for x in per_image],
            "fwd/image": stats["target_forwards_per_image"], "engine ms/step": 1e3 * engine_s / steps,
            "host ms/step": 1e3 * host_s / steps}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default=None, help="engine directory (default: build --model with random weights)")
    ap.add_argument("--model", default="GPT-B")
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quality-images", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    engine = args.engine
    if engine is None:
        engine = tempfile.mkdtemp(prefix="spec-")
        build_engine(load_model(args.model, random_init=True), engine,
                     BuildOptions(batch_sizes=[2], verify_len=16, images=False, overwrite=True))
    gen = Generator.load(engine, backend="ort")
    classes = [i % gen.spec.num_classes for i in range(args.images)]
    rows = []
    for label, (method, options) in zip([c[0] for c in CONFIGS], [(c[0].split()[0], c[1]) for c in CONFIGS]):
        rows.append({"config": label, **run(gen, method, options, classes, args.runs)})
    cache: dict = {}
    for r, (method, options) in zip(rows, [(c[0].split()[0], c[1]) for c in CONFIGS]):
        r["x ar"] = rows[0]["ms/image"] / r["ms/image"]
        q = measure_quality(gen, method, options, classes, default_sampling(gen.spec), 1, args.quality_images, ar_cache=cache)
        r.update({"tokens = ar": q.get("tokens_equal_ar"), "token TV vs ar": q.get("token_tv_vs_ar"), "judge acc": q.get("accuracy", "-")})
    print(machine(), "git", git_rev())
    print(f"{gen.spec.name}, ort cpu, batch 1, {args.images} images x {args.runs} runs (median)")
    print(markdown_table(rows, ["config", "ms/image", "x ar", "fwd/image", "engine ms/step", "host ms/step", "tokens = ar",
                                "token TV vs ar", "judge acc", "runs ms/image"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
