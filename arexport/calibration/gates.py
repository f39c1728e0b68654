"""Accuracy gates for quantized engines: numbers computed on held-out captured steps (and, for the
digits demo, on generated images), compared with thresholds; a failing engine is not written."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from arexport.calibration.quantize import cast_to_inputs, input_dtypes

DEFAULT_THRESHOLDS = {
    "int8": {"min_agreement": 0.90, "max_kl": 0.05, "max_accuracy_drop": 0.05},
    "fp8": {"min_agreement": 0.90, "max_kl": 0.05, "max_accuracy_drop": 0.05},
    "int4-weight": {"min_agreement": 0.85, "max_kl": 0.10, "max_accuracy_drop": 0.08},
}


@dataclass
class GateReport:
    top1_agreement: float
    mean_kl: float
    heldout_steps: int
    thresholds: dict
    demo: Optional[dict] = None  # accuracy / feature distance for reference and quantized engines
    failures: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _logits(sess, sample: dict, dtypes: dict) -> np.ndarray:
    """Every logits output of the step (a kind may declare more than one head), concatenated along the positions."""
    names = [o.name for o in sess.get_outputs() if o.name.startswith("logits")]
    return np.concatenate([o.reshape(-1, o.shape[-1]) for o in sess.run(names, cast_to_inputs(sample, dtypes))], 0)


def step_agreement(ref_model: Path, q_model: Path, samples: list[dict]) -> tuple[float, float, int]:
    """Top-1 agreement and mean KL(p_ref || p_q) of next-token distributions over held-out steps."""
    ref, q = _session(ref_model), _session(q_model)
    ref_types, q_types = input_dtypes(ref_model), input_dtypes(q_model)
    agree, kls, n = 0, [], 0
    for s in samples:
        a = _logits(ref, s, ref_types).astype(np.float64)
        b = _logits(q, s, q_types).astype(np.float64)
        a = a.reshape(-1, a.shape[-1])
        b = b.reshape(-1, b.shape[-1])
        pa = np.exp(a - a.max(-1, keepdims=True))
        pa /= pa.sum(-1, keepdims=True)
        lb = b - b.max(-1, keepdims=True)
        lb = lb - np.log(np.exp(lb).sum(-1, keepdims=True))
        la = np.log(np.clip(pa, 1e-300, None))
        kls += list((pa * (la - lb)).sum(-1))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
    return agree / max(n, 1), float(np.mean(kls)) if kls else float("nan"), n


def demo_quality(ref_dir: Path, q_dir: Path, n_images: int = 200, seed: int = 0) -> dict:
    """Generated-digit quality of the reference and quantized engines (same seeds)."""
    from arexport.quality import score_digits
    from arexport.runtime.generator import Generator

    classes = [i % 10 for i in range(n_images)]
    out = {}
    for name, d in (("reference", ref_dir), ("quantized", q_dir)):
        gen = Generator.load(str(d), backend="ort", verify_hashes=False)
        toks = gen.generate(classes=classes, seed=seed, batch_size=100, images=False, timings=False).tokens
        s = score_digits(toks, classes)
        out[name] = {"accuracy": s.accuracy, "feature_distance": s.feature_distance}
    out["n_images"] = n_images
    return out


def evaluate(ref_dir: Path, q_dir: Path, step_file: str, heldout: list[dict], mode: str, thresholds: dict,
             demo: bool) -> GateReport:
    agree, kl, n = step_agreement(ref_dir / step_file, q_dir / step_file, heldout)
    rep = GateReport(agree, kl, n, thresholds)
    if agree < thresholds["min_agreement"]:
        rep.failures.append(f"top-1 agreement {agree:.4f} < {thresholds['min_agreement']}")
    if not kl <= thresholds["max_kl"]:
        rep.failures.append(f"mean KL {kl:.4g} > {thresholds['max_kl']}")
    if demo:
        rep.demo = demo_quality(ref_dir, q_dir)
        drop = rep.demo["reference"]["accuracy"] - rep.demo["quantized"]["accuracy"]
        if drop > thresholds["max_accuracy_drop"]:
            rep.failures.append(f"demo accuracy drop {drop:.3f} > {thresholds['max_accuracy_drop']}")
    return rep


SAME_MODEL_ATOL = 1e-4  # max |logits| difference allowed between a hidden-state graph and the step graph, both quantized


def hidden_graph_fidelity(ref_graph: Path, q_graph: Path, q_step: Path, samples: list[dict]) -> dict:
    """How a quantized hidden-state graph (the tree-verification graph's) compares, on held-out step samples:

    * `logits_vs_step_max_abs`: max |logits| difference from the quantized step graph on the same feeds; the
      draft-head methods verify with this graph while `ar` decodes with the step graph, so it must be ~0
      (same model), gated at SAME_MODEL_ATOL;
    * the hidden states [.., dim] against the full-precision graph's (what the head was trained on): cosine
      per position (`hidden_cosine_min` / `_mean`), relative L2 error per position ||h_q - h|| / ||h||
      (`hidden_rel_l2_max` / `_mean`) and elementwise max |h_q - h| / max |h| (`hidden_max_rel_error`)."""
    ref, q, step = _session(ref_graph), _session(q_graph), _session(q_step)
    rt, qt, st = input_dtypes(ref_graph), input_dtypes(q_graph), input_dtypes(q_step)
    cos, rel, diff_logits, worst = [], [], 0.0, 0.0
    for s in samples:
        h = ref.run(["hidden"], cast_to_inputs(s, rt))[0].astype(np.float64)
        lq, hq = q.run(["logits", "hidden"], cast_to_inputs(s, qt))
        ls = step.run(["logits"], cast_to_inputs(s, st))[0]
        diff_logits = max(diff_logits, float(np.abs(lq.astype(np.float64) - ls).max()))
        hq = hq.astype(np.float64)
        a, b = h.reshape(-1, h.shape[-1]), hq.reshape(-1, hq.shape[-1])
        na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
        cos += list((a * b).sum(-1) / np.maximum(na * nb, 1e-30))
        rel += list(np.linalg.norm(a - b, axis=-1) / np.maximum(na, 1e-30))
        worst = max(worst, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)))
    return {"logits_vs_step_max_abs": diff_logits, "hidden_cosine_min": float(np.min(cos)),
            "hidden_cosine_mean": float(np.mean(cos)), "hidden_rel_l2_max": float(np.max(rel)),
            "hidden_rel_l2_mean": float(np.mean(rel)), "hidden_max_rel_error": worst, "samples": len(samples),
            "same_model_atol": SAME_MODEL_ATOL}
