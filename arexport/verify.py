"""`arexport verify`: an engine against the PyTorch reference, step function by step function.

Each case sets up the same cache state on both sides (condition prefill, then per-row prefixes of
different lengths), runs one step function (prefill, decode q = 1, verify q = K) at zero and
non-zero write offsets, and returns its logits plus the K/V it wrote. Polygraphy's Comparator runs
both runners over the cases and reports max absolute / relative error per output; a greedy
whole-image generation on both sides gives token agreement.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from arexport.errors import ArexportError
from arexport.families import get_family
from arexport.format.stepkinds import STEP_KINDS, get_step_kind
from arexport.runtime.engine import StepEngine

# Default tolerances per precision: fp32 is the 1e-4 bound on logits; half precisions are
# bounded by rounding of activations and caches (see docs/benchmarks.md for measured errors).
KINDS = ("prefill", "decode", "verify", "multi_query", "scale", "next_scale")
TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (5e-2, 5e-2), "bf16": (2e-1, 1e-1)}
STEPS = tuple(STEP_KINDS)  # a case's `step`: index of the step kind it runs


def _polygraphy():
    try:
        from polygraphy.backend.base import BaseRunner
        from polygraphy.comparator import CompareFunc, Comparator
        from polygraphy.common import TensorMetadata
    except ImportError as e:
        raise ArexportError(f"arexport verify needs polygraphy (pip install polygraphy): {e}") from None
    return BaseRunner, CompareFunc, Comparator, TensorMetadata


def make_cases(spec, batch: int, verify_len: int, seed: int = 0, steps: Optional[tuple[str, ...]] = None) -> list[OrderedDict]:
    """Feed dicts for every step kind in `steps` (default: the family's), built by the scenario each
    declaration names (format.stepkinds `verify`); kinds without one are covered by the prefill case."""
    family = get_family(spec.family)
    cases: list[OrderedDict] = []
    seen: set[str] = set()
    for kind in (get_step_kind(n) for n in (steps or family.steps(spec))):
        if kind.verify is None:
            continue
        first = kind.verify not in seen  # the scenario's own extra cases (prefill, next-scale graphs) once
        seen.add(kind.verify)
        for case in SCENARIOS[kind.verify][0](spec, batch, verify_len, seed, first):
            case["step"] = np.array(STEPS.index(kind.name), dtype=np.int64)
            cases.append(case)
    return cases


def make_token_cases(spec, batch: int, verify_len: int, seed: int = 0, with_prefill: bool = True) -> list[OrderedDict]:
    """Raster steps: (the condition prefill), decode and verify at offset 0 and at non-zero,
    per-row-different offsets."""
    family = get_family(spec.family)
    g = torch.Generator().manual_seed(seed)
    n = spec.n_tokens
    k = min(verify_len, n - 1)
    cases = []

    def case(kind: str, q: int, prefix: list[int]):
        toks = torch.randint(0, spec.vocab_size, (batch, max(prefix) + q), generator=g)
        d = OrderedDict(family.verify_conditions(spec, batch, g))
        d.update(kind=np.array(KINDS.index(kind), dtype=np.int64), prefix_len=np.array(prefix, dtype=np.int64), tokens=toks.numpy(), q=np.array(q, dtype=np.int64),
                 chunk=np.array(max(1, min(verify_len, 8)), dtype=np.int64))
        cases.append(d)

    if with_prefill:
        case("prefill", 0, [0] * batch)
    mid = [min(n - 1 - k, 3 + 5 * r) for r in range(batch)]  # rows at different lengths
    case("decode", 1, [0] * batch)
    case("decode", 1, mid)
    case("verify", k, [0] * batch)
    case("verify", k, mid)
    late = [max(0, n - 1 - k - r) for r in range(batch)]  # window ending at the last slot
    case("verify", k, late)
    return cases


def make_multi_query_cases(spec, batch: int, max_q: int, seed: int = 0, first: bool = True) -> list[OrderedDict]:
    """ARPG cases: (prefix of already-fed tokens, n new tokens, m queries), rows in their own random orders."""
    g = torch.Generator().manual_seed(seed)
    n_tok = spec.n_tokens
    m = min(8, max_q, n_tok - 1)
    cases = []
    for prefix, n_new in (([0] * batch, 1), ([0] * batch, 4), ([3 + 5 * r for r in range(batch)], 3),
                          ([n_tok - m - 4 - r for r in range(batch)], 4)):
        prefix = [max(0, min(p, n_tok - m - n_new)) for p in prefix]
        d = OrderedDict(classes=torch.randint(0, spec.num_classes + 1, (batch,), generator=g).numpy())
        d["kind"] = np.array(3, dtype=np.int64)
        d["prefix_len"] = np.array(prefix, dtype=np.int64)
        d["tokens"] = torch.randint(0, spec.vocab_size, (batch, n_tok), generator=g).numpy()
        d["order"] = torch.stack([torch.randperm(n_tok, generator=g) for _ in range(batch)]).numpy()
        d["q"] = np.array(n_new, dtype=np.int64)
        d["m"] = np.array(m, dtype=np.int64)
        d["chunk"] = np.array(max(1, min(max_q, 8)), dtype=np.int64)
        cases.append(d)
    return cases


def make_scale_cases(spec, batch: int, max_q: int, seed: int = 0, first: bool = True) -> list[OrderedDict]:
    """VAR cases: a scale block at the first, a middle and the last scale (after the earlier scales),
    a CoDe-refiner entry block (every position up to a scale at once) and each next-scale graph. (The
    image decoders end in a uint8 cast, whose rounding differs by one grey level between backends:
    tests compare images within that.)"""
    g = torch.Generator().manual_seed(seed)
    family = get_family(spec.family)
    sc, cvae = family.scales(spec), family.latent_channels(spec)
    hw = sc.patch_nums[-1]
    cases = []

    def base(kind: str, k: int) -> OrderedDict:
        """Every case carries every input (Polygraphy reads one input signature for all cases)."""
        d = OrderedDict(classes=torch.randint(0, spec.num_classes + 1, (batch,), generator=g).numpy())
        d["kind"] = np.array(KINDS.index(kind), dtype=np.int64)
        d["scale"] = np.array(k, dtype=np.int64)
        d["entry"] = np.array(0, dtype=np.int64)
        d["features"] = (torch.randn(batch, sc.total, cvae, generator=g) * 0.5).numpy()
        d["f_hat"] = (torch.randn(batch, cvae, hw, hw, generator=g) * 0.5).numpy()
        d["h"] = (torch.randn(batch, sc.sizes[k], cvae, generator=g) * 0.5).numpy()
        return d

    last = len(sc) - 1
    cases += [base("scale", k) for k in sorted({0, last // 2, last})]
    k = max(0, last - 1)
    if sc.ends[k] <= max_q:
        cases.append(base("scale", k))
        cases[-1]["entry"] = np.array(1, dtype=np.int64)
    return cases + ([base("next_scale", si) for si in range(len(sc))] if first else [])


def run_scale_case(engine: StepEngine, kind, feed: dict) -> "OrderedDict[str, np.ndarray]":
    """A VAR case: scale blocks 0..k-1 then block k (or, `entry`, positions [0, end_k) in one block);
    the logits of block k and the K/V it wrote. Or a next-scale graph."""
    case_kind, k = KINDS[int(feed["kind"])], int(feed["scale"])
    if case_kind == "next_scale":
        f, nxt = engine.next_scale(k, torch.from_numpy(feed["f_hat"]), torch.from_numpy(feed["h"]))
        out = OrderedDict(f_hat=f.float().cpu().numpy())
        if nxt is not None:
            out["next"] = nxt.float().cpu().numpy()
        return out
    sc = engine.family.scales(engine.spec)
    feats, classes = torch.from_numpy(feed["features"]), torch.from_numpy(feed["classes"])
    b = classes.shape[0]
    cache = engine.allocate(b)

    def block(a: int, z: int):
        pos = torch.arange(a, z).expand(b, -1)
        return engine.scale_step(cache, feats[:, a:z], pos, classes, torch.full((b,), a), sc.visible_mask(pos, cache.s_max))

    if int(feed["entry"]):
        logits = block(0, sc.ends[k])[:, sc.begins[k]:]
    else:
        for j in range(k):
            block(sc.begins[j], sc.ends[j])
        logits = block(sc.begins[k], sc.ends[k])
    out = OrderedDict(logits=logits.float().cpu().numpy())
    for li in sorted({0, engine.spec.n_cache_layers - 1}):
        for name, buf in (("key", cache.keys[li]), ("value", cache.values[li])):
            out[f"new_{name}_{li}"] = buf[:, :, sc.begins[k]:sc.ends[k]].float().cpu().numpy()
    return out


def run_multi_query_case(engine: StepEngine, kind, feed: dict) -> "OrderedDict[str, np.ndarray]":
    """Class step, then each row's prefix (in its order, lockstep chunks), then n new tokens + m queries."""
    spec = engine.spec
    b = len(feed["prefix_len"])
    toks, order = torch.from_numpy(feed["tokens"]), torch.from_numpy(feed["order"])
    prefix = torch.from_numpy(feed["prefix_len"])
    n_new, m, chunk = int(feed["q"]), int(feed["m"]), int(feed["chunk"])
    cache = engine.allocate(b)
    cls = torch.from_numpy(feed["classes"]) + spec.class_token_offset
    pos_seq = order  # generation order of grid positions
    tok_seq = toks.gather(1, order)

    def step(tokens, positions, queries):
        w = cache.length.clone()
        n = tokens.shape[1]
        attn = cache.block_mask(w, n)
        qmask = attn[:, :, :1].expand(-1, -1, queries.shape[1], -1)
        out = engine.multi_query_step(cache, tokens, positions, w, attn, queries, qmask)
        return out, w

    step(cls[:, None], torch.full((b, 1), -1), pos_seq[:, :1])
    cache.length += 1
    done, longest = 0, int(prefix.max())
    while done < longest:
        c = min(chunk, longest - done)
        step(tok_seq[:, done:done + c], pos_seq[:, done:done + c], pos_seq[:, :1])
        cache.length += (prefix - done).clamp(min=0, max=c)
        done += c
    if n_new == 1 and int(prefix.max()) == 0:
        new_t, new_p = cls[:, None], torch.full((b, 1), -1)  # the class step itself, re-run
        cache.length.zero_()
    else:
        idx = prefix[:, None] + torch.arange(n_new)
        new_t, new_p = tok_seq.gather(1, idx), pos_seq.gather(1, idx)
    qidx = (prefix[:, None] + n_new + torch.arange(m)).clamp(max=spec.n_tokens - 1)
    logits, w = step(new_t, new_p, pos_seq.gather(1, qidx))
    out = OrderedDict(logits=logits.float().cpu().numpy())
    slots = (w[:, None] + torch.arange(new_t.shape[1])).to(cache.keys[0].device)
    for li in sorted({0, spec.n_cache_layers - 1}):
        for name, buf in (("key", cache.keys[li]), ("value", cache.values[li])):
            sel = buf.gather(2, slots.view(b, 1, -1, 1).expand(b, buf.shape[1], -1, buf.shape[3]))
            out[f"new_{name}_{li}"] = sel.float().cpu().numpy()
    return out


def run_case(engine: StepEngine, feed: dict) -> "OrderedDict[str, np.ndarray]":
    """Set up the case's cache state on `engine`, run its step kind, return outputs as numpy."""
    kind = get_step_kind(STEPS[int(feed["step"])])
    return SCENARIOS[kind.verify][1](engine, kind, feed)


def run_token_case(engine: StepEngine, kind, feed: dict) -> "OrderedDict[str, np.ndarray]":
    """A raster case: the condition prefill, each row's prefix in lockstep chunks, then one call of
    `kind` (every declared output and the K/V it wrote are compared); or the prefill itself."""
    spec = engine.spec
    b = len(feed["prefix_len"])
    conds = engine.family.verify_feed_conditions(spec, feed)
    cache = engine.allocate(b)
    logits = engine.family.prefill(engine, cache, conds)
    case_kind = KINDS[int(feed["kind"])]
    toks = torch.from_numpy(feed["tokens"])
    prefix = torch.from_numpy(feed["prefix_len"])
    if case_kind == "prefill":
        written = slice(0, spec.cond_len)
        out = OrderedDict(logits=logits.float().cpu().numpy())
    else:
        # Feed the rows' prefixes in lockstep chunks: a row whose prefix is done keeps writing
        # garbage past its own length (never read, later overwritten), as rows do in real decoding.
        chunk = int(feed["chunk"])
        done, longest = 0, int(prefix.max())
        prefix_kind = "token" if "token" in engine.step_kinds() else kind.name  # a model whose step has other outputs
        while done < longest:
            c = min(chunk, longest - done)
            w = cache.length.clone()
            pos = (done + torch.arange(c)).expand(b, c)
            engine.run(prefix_kind, cache, tokens=toks[:, done:done + c].contiguous(), positions=pos, write_index=w,
                       attn_mask=cache.causal_mask(w, c))
            cache.length += (prefix - done).clamp(min=0, max=c)
            done += c
        q = int(feed["q"])
        w = cache.length.clone()
        idx = prefix.view(-1, 1) + torch.arange(q).view(1, -1)
        step_toks = toks.gather(1, idx)
        outs = engine.run(kind, cache, tokens=step_toks, positions=idx, write_index=w, attn_mask=cache.causal_mask(w, q))
        out = OrderedDict((name, t.float().cpu().numpy()) for name, t in outs.items())
        written = None
    for li in sorted({0, spec.n_cache_layers - 1}):
        for name, buf in (("key", cache.keys[li]), ("value", cache.values[li])):
            if written is not None:
                sel = buf[:, :, written]
            else:
                q = int(feed["q"])
                slots = (cache.length.view(-1, 1) + torch.arange(q).view(1, -1)).to(buf.device)
                sel = buf.gather(2, slots.view(b, 1, q, 1).expand(b, buf.shape[1], q, buf.shape[3]))
            out[f"new_{name}_{li}"] = sel.float().cpu().numpy()
    return out


def _case_name(case: dict, spec) -> str:
    name = _kind_case_name(case, spec)
    step = STEPS[int(case["step"])]
    return name if get_step_kind(step).graph == "step" else f"{name} ({step})"


def _kind_case_name(case: dict, spec) -> str:
    kind = KINDS[int(case["kind"])]
    if kind == "multi_query":
        return f"multi_query n={int(case['q'])} m={int(case['m'])}"
    if kind == "scale":
        return f"scale {int(case['scale'])}" + (" (refiner entry: scales 0.. at once)" if int(case["entry"]) else "")
    if kind == "next_scale":
        return f"next_scale {int(case['scale'])}"
    return f"{kind} q={int(case['q']) if kind != 'prefill' else spec.cond_len}"


@dataclass
class VerifyReport:
    """Per case and output: max abs / rel error and pass; plus greedy whole-image agreement."""

    precision: str
    atol: float
    rtol: float
    rows: list[dict] = field(default_factory=list)
    token_agreement: Optional[float] = None
    images_identical: Optional[str] = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        ok = all(r["passed"] for r in self.rows)
        return ok and (self.token_agreement is None or self.token_agreement >= 0.99 or self.precision != "fp32")

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["passed"] = self.passed
        return d


def verify_engine(engine: StepEngine, reference: StepEngine, precision: str, batch: int = 2, verify_len: int = 16,
                  atol: Optional[float] = None, rtol: Optional[float] = None, full_image: bool = True,
                  n_images: int = 2, seed: int = 0, progress=lambda msg: None) -> VerifyReport:
    """Compare `engine` with `reference` on every step function; see module docstring. `progress` gets
    a line per stage (progress)."""
    BaseRunner, CompareFunc, Comparator, TensorMetadata = _polygraphy()
    d_atol, d_rtol = TOLERANCES[precision]
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol

    class StepRunner(BaseRunner):
        """Polygraphy runner over a StepEngine: one feed dict = one step-function case."""

        def __init__(self, eng: StepEngine, name: str):
            super().__init__(name=name)
            self.eng = eng

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for k, v in cases[0].items():
                meta.add(k, v.dtype, [None] * v.ndim)
            return meta

        def infer_impl(self, feed_dict):
            t0 = time.perf_counter()
            out = run_case(self.eng, feed_dict)
            self.inference_time = time.perf_counter() - t0
            return out

    t0 = time.perf_counter()
    missing = [k for k in engine.step_kinds() if k not in reference.step_kinds()]
    if missing:
        raise ArexportError(f"the reference has no {', '.join(missing)} step to compare the engine's with")
    cases = make_cases(engine.spec, batch, verify_len, seed, steps=engine.step_kinds())
    runners = [StepRunner(engine, f"{engine.backend}"), StepRunner(reference, "torch-reference")]
    from polygraphy.logger import G_LOGGER

    progress(f"running {len(cases)} step cases on {engine.backend} and the PyTorch reference")
    with G_LOGGER.verbosity(G_LOGGER.ERROR):  # we print our own table
        results = Comparator.run(runners, data_loader=cases)
        acc = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol, check_shapes=True))
    report = VerifyReport(precision, atol, rtol)
    per_pair = acc[0]  # one comparison function
    pair = next(iter(per_pair.keys()))
    for case, outputs in zip(cases, per_pair[pair]):
        for name, res in outputs.items():
            report.rows.append({
                "case": _case_name(case, engine.spec),
                "offsets": [int(x) + engine.spec.cond_len for x in case["prefix_len"]] if "prefix_len" in case else [],
                "output": name,
                "max_abs": float(res.max_absdiff),
                "max_rel": float(res.max_reldiff),
                "passed": bool(res),
            })
    if full_image:
        progress(f"greedy whole-image token agreement on {n_images} images")
        report.token_agreement, report.images_identical = greedy_agreement(engine, reference, n_images, seed)
    report.seconds = time.perf_counter() - t0
    return report


def greedy_agreement(engine: StepEngine, reference: StepEngine, n_images: int, seed: int = 0):
    """Greedy generation (the family's default method) of whole images on both engines:
    (token agreement, 'k/n identical')."""
    from arexport.runtime.generator import Generator
    from arexport.runtime.sampling import SamplingParams

    g = torch.Generator().manual_seed(seed + 1)
    request = engine.family.verify_request(engine.spec, n_images, g)  # classes, captions or prompts
    params = SamplingParams(temperature=0.0, cfg_scale=1.0)
    toks = []
    for e in (engine, reference):
        res = Generator(e).generate(**request, sampling=params, seed=seed, batch_size=n_images, images=False, timings=False)
        toks.append(torch.from_numpy(res.tokens))
    agree = float((toks[0] == toks[1]).float().mean())
    same = int((toks[0] == toks[1]).all(dim=1).sum())
    return agree, f"{same}/{n_images}"


# scenario -> (case maker(spec, batch, max_q, seed, first), case runner(engine, kind, feed)); a step
# kind's declaration names its scenario
def make_condition_hidden_cases(spec, batch: int, verify_len: int, seed: int = 0, first: bool = True) -> list[OrderedDict]:
    """The condition prefill that also returns every condition position's hidden state: the token scenario's
    prefill case."""
    return make_token_cases(spec, batch, verify_len, seed, with_prefill=True)[:1]


def run_condition_hidden_case(engine: StepEngine, kind, feed: dict) -> "OrderedDict[str, np.ndarray]":
    """The family's hidden-state prefill (`prefill_hidden`, which runs `kind` where the engine has it): logits
    [B, V], hidden [B, T_cond, dim] (every condition position) and the K/V written at the condition's slots."""
    spec = engine.spec
    conds = engine.family.verify_feed_conditions(spec, feed)
    cache = engine.allocate(len(feed["prefix_len"]))
    logits, hidden = engine.family.prefill_hidden(engine, cache, conds)
    if hidden is None:
        raise ArexportError(f"{engine.backend} engine has a {kind.name} step but its prefill returned no hidden state")
    out = OrderedDict(logits=logits.float().cpu().numpy(), hidden=hidden.float().cpu().numpy())
    for li in sorted({0, spec.n_cache_layers - 1}):
        for name, buf in (("key", cache.keys[li]), ("value", cache.values[li])):
            out[f"new_{name}_{li}"] = buf[:, :, :spec.cond_len].float().cpu().numpy()
    return out


SCENARIOS = {"token": (make_token_cases, run_token_case), "multi_query": (make_multi_query_cases, run_multi_query_case),
             "scale": (make_scale_cases, run_scale_case),
             "condition_hidden": (make_condition_hidden_cases, run_condition_hidden_case)}


# -- quantized engines ---------------------------------------------------------------------------------

DEMO_GATE_IMAGES = 200  # as many generated digits as calibrate's demo gate scores, so the thresholds mean the same


@dataclass
class QuantizedReport:
    """A quantized engine against its own accuracy gates (the thresholds calibrate recorded in the
    manifest), measured afresh against the PyTorch reference: top-1 agreement and mean KL of next-token
    distributions on the verify cases' logits, and for the digits demo the drop in class accuracy."""

    mode: str
    thresholds: dict
    gates: list[dict] = field(default_factory=list)  # name, value, limit, passed
    calibration: dict = field(default_factory=dict)  # what calibrate measured (manifest), shown next to ours
    token_agreement: Optional[float] = None  # greedy whole images: informational (quantization may diverge)
    # per step graph with a hidden-state output (a draft head's tree verification): cosine of its hidden states
    # against the reference's, per position; informational, shown beside what calibrate measured
    hidden_fidelity: dict = field(default_factory=dict)
    images_identical: Optional[str] = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.gates) and all(g["passed"] for g in self.gates)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["passed"] = self.passed
        return d


def logits_agreement(ref: np.ndarray, out: np.ndarray) -> tuple[int, list[float], int]:
    """(argmax matches, KL(p_ref || p_out) per position, positions) over logits [..., V]."""
    a = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    b = out.reshape(-1, out.shape[-1]).astype(np.float64)
    la = a - a.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    kl = (np.exp(la) * (la - lb)).sum(-1)
    return int((a.argmax(-1) == b.argmax(-1)).sum()), list(kl), a.shape[0]


def hidden_cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Cosine similarity per position of hidden states [..., dim] (reference against quantized)."""
    a = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    b = out.reshape(-1, out.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def verify_quantized(engine: StepEngine, reference: StepEngine, quantization: dict, batch: int = 2,
                     verify_len: int = 16, n_images: int = 2, seed: int = 0, demo_images: int = DEMO_GATE_IMAGES,
                     progress=lambda msg: None) -> QuantizedReport:
    """Check a quantized `engine` against the gates in its manifest's `quantization` block."""
    gates = quantization.get("gates") or {}
    th = gates.get("thresholds")
    if not th:
        raise ArexportError("the manifest's quantization block records no gate thresholds: re-run arexport calibrate")
    t0 = time.perf_counter()
    rep = QuantizedReport(quantization["mode"], dict(th), calibration={
        k: gates[k] for k in ("top1_agreement", "mean_kl", "heldout_steps", "demo", "passed") if k in gates})
    # every step graph the directory has (a tree-verification graph included), not only the family's default
    cases = make_cases(engine.spec, batch, verify_len, seed, steps=engine.step_kinds())
    progress(f"running {len(cases)} step cases on the quantized engine and the PyTorch reference")
    agree, kls, n = 0, [], 0
    hidden: dict[str, list[np.ndarray]] = {}
    for case in cases:
        ref_out, q_out = run_case(reference, dict(case)), run_case(engine, dict(case))
        for name in ref_out:
            if name.startswith("logits"):  # every head's next-token distribution (NAR's logits_below too)
                a, k, m = logits_agreement(ref_out[name], q_out[name])
                agree, kls, n = agree + a, kls + k, n + m
            elif name == "hidden":  # what a draft head reads: its fidelity is reported beside calibrate's
                hidden.setdefault(STEPS[int(case["step"])], []).append(hidden_cosines(ref_out[name], q_out[name]))
    for step, c in hidden.items():
        recorded = ((quantization.get("graphs") or {}).get(get_step_kind(step).graph) or {}).get("fidelity") or {}
        rep.hidden_fidelity[step] = {"cosine_min": float(np.min(np.concatenate(c))),
                                     "cosine_mean": float(np.mean(np.concatenate(c))),
                                     "positions": int(sum(len(x) for x in c)),
                                     "calibrate_cosine_min": recorded.get("hidden_cosine_min")}
    top1, mean_kl = agree / max(n, 1), float(np.mean(kls)) if kls else float("nan")
    rep.gates.append({"name": f"top-1 agreement ({n} positions)", "value": top1, "limit": f">= {th['min_agreement']}",
                      "passed": top1 >= th["min_agreement"]})
    rep.gates.append({"name": "mean KL(reference || quantized)", "value": mean_kl, "limit": f"<= {th['max_kl']}",
                      "passed": bool(mean_kl <= th["max_kl"])})
    if engine.spec.image.kind == "digits" and "max_accuracy_drop" in th and demo_images > 0:
        progress(f"generating {demo_images} digits on each engine for the accuracy gate")
        acc = {name: _digits_accuracy(e, demo_images, seed) for name, e in (("reference", reference), ("quantized", engine))}
        drop = acc["reference"] - acc["quantized"]
        rep.gates.append({"name": f"demo accuracy drop ({acc['reference']:.3f} -> {acc['quantized']:.3f}, "
                                  f"{demo_images} digits)", "value": drop, "limit": f"<= {th['max_accuracy_drop']}",
                          "passed": drop <= th["max_accuracy_drop"]})
    if n_images > 0:
        progress(f"greedy whole-image token agreement on {n_images} images (informational)")
        rep.token_agreement, rep.images_identical = greedy_agreement(engine, reference, n_images, seed)
    rep.seconds = time.perf_counter() - t0
    return rep


def _digits_accuracy(engine: StepEngine, n_images: int, seed: int) -> float:
    """Class accuracy (the CNN judge) of `n_images` digits at the model's default sampling."""
    from arexport.quality import score_digits
    from arexport.runtime.generator import Generator

    classes = [i % 10 for i in range(n_images)]
    res = Generator(engine).generate(classes=classes, seed=seed,  # the model's sampler
                                     batch_size=min(100, n_images), images=False, timings=False)
    return float(score_digits(res.tokens, classes).accuracy)


# -- exported draft heads (`arexport build-head`) ---------------------------------------------------------
def _head_cases(slots: int, max_q: int, batch: int):
    """(name, write_index [B], q, tree) per case: one pair at offset 0 and at per-row offsets, a tree level
    (row r > 0 sees only every other new pair) and the longest call at the deepest offsets that fit."""
    deep = [max(0, slots - max_q - 2 * r) for r in range(batch)]
    cases = [("decode q=1", [0] * batch, 1, False), ("decode q=1", [min(3 + 5 * r, slots - 1) for r in range(batch)], 1, False)]
    q = min(4, max_q)
    cases.append((f"tree q={q}", [min(3 + 4 * r, slots - q) for r in range(batch)], q, True))
    cases.append((f"verify q={max_q}", deep, max_q, True))
    return cases


def verify_head(head_dir, spec, lm_head: Optional[torch.Tensor] = None, batch: int = 2, atol: Optional[float] = None,
                rtol: Optional[float] = None, seed: int = 0, progress=lambda msg: None) -> VerifyReport:
    """Compare an exported draft-head directory (ONNX Runtime, the runner `--draft-head DIR` uses) with the
    PyTorch head it was built from, for the target `spec` (the engine's): logits [B, q, V], hidden_out
    [B, q, dim] and every layer's K/V cache after the call [B, H_kv, slots, D] (the written slots and the
    untouched ones), with the fp32 tolerances. `lm_head` [V, dim] is the target's output projection, for
    heads released without one. A head built for another target is refused in one line."""
    from pathlib import Path

    from arexport.models.eagle import load_eagle_head
    from arexport.runtime.backends.ort.head import OrtDraftHead, check_head_target, read_head_info

    d_atol, d_rtol = TOLERANCES["fp32"]  # the head graph is exported and run in fp32
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    d = Path(head_dir)
    info = read_head_info(d, "--draft-head")
    c = info.get("config", {})
    check_head_target(info, d, spec)
    if not (1 <= batch <= int(info["max_batch"])):
        raise ArexportError(f"--batch {batch}: the draft head {d} takes 1..{info['max_batch']} rows")
    ort_head = OrtDraftHead(str(d), spec.dim, spec.vocab_size)
    progress(f"loading the PyTorch head {info['source']} the directory was built from")
    head = load_eagle_head(info["source"], target_dim=spec.dim, target_vocab=spec.vocab_size, lm_head=lm_head,
                           grid_size=spec.grid_size).float().eval()
    if head.cfg.to_official() != c:
        raise ArexportError(f"draft head {d}: its head.json config differs from that of {info['source']}, which it names as "
                            "its source (rebuild the directory)")
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    slots, cfg = ort_head.slots, head.cfg
    report = VerifyReport("fp32", atol, rtol)
    for name, write, q, tree in _head_cases(slots, ort_head.max_q, batch):
        write = torch.tensor(write)
        positions = write[:, None] + torch.arange(q)[None, :]
        s = torch.arange(slots)
        mask = s[None, None, :] <= positions[:, :, None]
        if tree:  # rows after the first see only every other earlier pair of the call
            skip = (s[None, :] >= write[:, None]) & ((s[None, :] - write[:, None]) % 2 == 1) & (s[None, :] < (write + q - 1)[:, None])
            skip[0] = False
            mask = mask & ~skip[:, None, :]
        hidden = torch.randn(batch, q, cfg.dim, generator=g)
        tokens = torch.randint(0, cfg.vocab_size, (batch, q), generator=g)
        keys, values = ort_head.allocate(batch, slots)
        for t in keys + values:
            t.copy_(torch.randn(t.shape, generator=g) * 0.5)  # pairs already committed
        rk, rv = [k.clone() for k in keys], [v.clone() for v in values]
        logits, out, keys, values = ort_head.step(hidden, tokens, positions, write, mask[:, None], keys, values)
        with torch.no_grad():
            r_logits, r_out, rk, rv = head.step(hidden, tokens, positions, write, mask[:, None], rk, rv)
        pairs = [("logits", logits, r_logits), ("hidden_out", out, r_out)]
        pairs += [(f"present_key_{i}", a, b) for i, (a, b) in enumerate(zip(keys, rk))]
        pairs += [(f"present_value_{i}", a, b) for i, (a, b) in enumerate(zip(values, rv))]
        for output, a, b in pairs:
            diff = (a.float() - b.float()).abs()
            rel = diff / b.float().abs().clamp_min(1e-12)
            report.rows.append({"case": f"draft_head {name}", "offsets": [int(x) for x in write], "output": output,
                                "max_abs": float(diff.max()), "max_rel": float(rel.max()),
                                "passed": bool(((diff <= atol) | (rel <= rtol)).all())})
    progress(f"{len(report.rows)} head outputs compared")
    report.seconds = time.perf_counter() - t0
    return report
