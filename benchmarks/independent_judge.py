#!/usr/bin/env python
"""Demo accuracy under the two packaged judges and two independent ones (issue 33's quality check).

The packaged judges (arexport.quality: `cnn`, `mlp`) were trained on the 80% training split of
scikit-learn's digits, the same split the demo generators learned from. The independent judges here
never see that split: a k-NN (k = 3, Euclidean on raw 0..16 pixels) and a multinomial logistic
regression, both fit on the 20% held-out split only (360 digits; the split of scripts/train_demo.py,
re-made here with the same seed). Their accuracy on the 1437 real training digits is printed as
their own yardstick. Demo tokens are grey levels 0..16, i.e. the pixels themselves.

    python benchmarks/independent_judge.py --images 1000 --seed 0            # the table
    python benchmarks/independent_judge.py --images 1000 --seed 0 --sweep    # + ARPG sampler sweep
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import git_rev, machine, markdown_table  # noqa: E402

from arexport.quality import score_digits  # noqa: E402
from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import default_sampling  # noqa: E402


def independent_judges() -> tuple[dict, dict]:
    """{name: fitted classifier} on the held-out split, and {name: accuracy on the real training split}."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.neighbors import KNeighborsClassifier

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data, d.target, test_size=0.2, random_state=0, stratify=d.target)
    judges = {"kNN": KNeighborsClassifier(n_neighbors=3).fit(xte, yte),
              "logreg": LogisticRegression(max_iter=5000, C=0.1).fit(xte, yte)}
    real = {k: float((j.predict(xtr) == ytr).mean()) for k, j in judges.items()}
    return judges, real


def accuracies(tokens, classes, judges) -> dict[str, float]:
    t = np.asarray(tokens).reshape(len(classes), -1)
    y = np.asarray(classes)
    out = {f"acc {j.upper()}": score_digits(t, classes, j).accuracy for j in ("cnn", "mlp")}
    out.update({f"acc {k}": float((m.predict(t.astype(np.float64)) == y).mean()) for k, m in judges.items()})
    return out


def run(model, method, opts, classes, seed, judges, **sampling):
    gen = Generator.load(model)
    params = default_sampling(gen.spec, **sampling)
    t0 = time.perf_counter()
    r = gen.generate(classes=classes, method=method, method_options=opts, sampling=params, batch_size=200, images=False,
                     timings=False, seed=seed)
    row = {"model": model, "method": method + "".join(f" {k}={v}" for k, v in opts.items()),
           "sampling": f"T {params.temperature}, top-k {params.top_k}, cfg {params.cfg_scale} {params.cfg_schedule}",
           "fwd/img": r.stats["forwards_per_image_alone"], **accuracies(r.tokens, classes, judges)}
    row["gap (packaged mean - independent mean)"] = (
        (row["acc CNN"] + row["acc MLP"]) / 2 - np.mean([row[f"acc {k}"] for k in judges]))
    print(row, f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", action="store_true", help="ARPG at 16 steps over temperature, top-k, CFG scale and schedule")
    args = ap.parse_args()
    classes = [i % 10 for i in range(args.images)]
    judges, real = independent_judges()
    rows = [run("demo", "ar", {}, classes, args.seed, judges), run("demo-par", "par", {}, classes, args.seed, judges)]
    rows += [run("demo-arpg", "arpg", {"steps": s}, classes, args.seed, judges) for s in (16, 64)]
    if args.sweep:
        for t in (1.0, 0.7, 0.5, 0.3):
            for k in (0, 4):
                for cfg, sched in ((None, None), (1.0, "constant"), (6.0, "constant"), (None, "linear")):
                    rows.append(run("demo-arpg", "arpg", {"steps": 16}, classes, args.seed, judges, temperature=t, top_k=k,
                                    cfg_scale=cfg, cfg_schedule=sched))
    cols = ["model", "method", "sampling", "fwd/img", "acc CNN", "acc MLP", "acc kNN", "acc logreg",
            "gap (packaged mean - independent mean)"]
    print(f"digits demo, {args.images} images (classes i % 10), seed {args.seed}, torch CPU; {machine()}; commit {git_rev()}")
    print("independent judges fit on the 360 held-out real digits; their accuracy on the 1437 real training digits: "
          + ", ".join(f"{k} {v:.3f}" for k, v in real.items()))
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
