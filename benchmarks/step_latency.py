#!/usr/bin/env python
"""Per-step latency: ONNX Runtime engine (IOBinding, in-place cache) vs PyTorch eager, same model and batch.

    python benchmarks/step_latency.py --model GPT-B --random-init --batch 2 --q 1,16

Builds an engine directory for the model (or reuses --engine DIR), fills the cache to --offset
tokens, then times decode (q = 1) and verify (q = K) steps on both backends at that offset.
Prints a markdown table and writes --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import git_rev, machine, markdown_table, summary_ms, time_calls  # noqa: E402

from arexport.exporter.build import BuildOptions, build_engine  # noqa: E402
from arexport.runtime.backends import open_directory  # noqa: E402
from arexport.runtime.loading import open_engine  # noqa: E402
from arexport.models.registry import load_model, parse_overrides  # noqa: E402
from arexport.families import Conditions  # noqa: E402


def conditions(spec, batch: int) -> Conditions:
    """A batch of conditions of the model's kind (classes, caption features or prompt ids)."""
    g = torch.Generator().manual_seed(1)
    if "text_vocab_size" in spec.extra:  # Janus: prompt ids filling the prompt slots
        return Conditions(ids=torch.randint(0, spec.extra["text_vocab_size"], (batch, spec.cond_len), generator=g),
                          mask=torch.ones(batch, spec.cond_len, dtype=torch.bool))
    if spec.model_type == "t2i":
        return Conditions(embeds=torch.randn(batch, spec.cond_len, spec.caption_dim, generator=g),
                          mask=torch.ones(batch, spec.cond_len, dtype=torch.bool))
    return Conditions(classes=torch.arange(batch) % spec.num_classes)


def fill(engine, batch: int, offset: int):
    cache = engine.allocate(batch)
    engine.family.prefill(engine, cache, conditions(engine.spec, batch))
    done = 0
    g = torch.Generator().manual_seed(0)
    while done < offset:
        c = min(engine.max_q, offset - done)
        tok = torch.randint(0, engine.spec.vocab_size, (batch, c), generator=g)
        w = cache.length.clone()
        engine.step(cache, tok, (done + torch.arange(c)).expand(batch, c), w, cache.causal_mask(w, c))
        cache.length += c
        done += c
    return cache


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="GPT-B")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--checkpoint", default=None, help="weights file, or a save_pretrained directory (janus-pro)")
    ap.add_argument("--model-config", default=None)
    ap.add_argument("--engine", default=None, help="existing engine directory (skips the build)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--q", default="1,16")
    ap.add_argument("--offset", type=int, default=128, help="image tokens already in the cache")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    qs = [int(x) for x in args.q.split(",")]
    tmp = None
    if args.engine:
        eng_dir = Path(args.engine)
    else:
        tmp = tempfile.TemporaryDirectory()
        eng_dir = Path(tmp.name) / "engine"
        lm = load_model(args.model, random_init=args.random_init, checkpoint=args.checkpoint,
                        overrides=parse_overrides(args.model_config))
        print(f"building {eng_dir} ...", file=sys.stderr)
        build_engine(lm, eng_dir, BuildOptions(precision=args.precision, batch_sizes=[args.batch], verify_len=max(qs), images=False))
        del lm  # the torch backend below loads its own copy: one fewer set of weights in memory (7B widths)
    ort_engine = open_engine(str(eng_dir), "ort", threads=args.threads)
    torch_engine = open_directory("torch", ort_engine.directory, ort_engine.manifest)
    spec = ort_engine.spec
    offset = min(args.offset, spec.n_tokens - max(qs) - 1)
    rows = []
    for q in qs:
        res = {}
        for name, eng in (("torch eager", torch_engine), ("ort", ort_engine)):
            cache = fill(eng, args.batch, offset)
            w = cache.length.clone()
            tok = torch.randint(0, spec.vocab_size, (args.batch, q))
            pos = (offset + torch.arange(q)).expand(args.batch, q)
            mask = cache.causal_mask(w, q)
            with torch.inference_mode():
                secs = time_calls(lambda: eng.step(cache, tok, pos, w, mask), args.warmup, args.iters)
            res[name] = summary_ms(secs)
        rows.append({"step": "decode" if q == 1 else "verify", "q": q, "batch (rows)": args.batch,
                     "torch eager median ms": res["torch eager"]["median_ms"], "ort median ms": res["ort"]["median_ms"],
                     "torch p90 ms": res["torch eager"]["p90_ms"], "ort p90 ms": res["ort"]["p90_ms"],
                     "torch / ort": res["torch eager"]["median_ms"] / res["ort"]["median_ms"]})
    header = (f"model {spec.name} {json.dumps(ort_engine.manifest.source.get('overrides') or {})} "
              f"({spec.n_layer} layers, dim {spec.dim}), {args.precision}, cache offset {offset} tokens, S_max {spec.s_max}; "
              f"{machine()}; commit {git_rev()}")
    print(header)
    print(markdown_table(rows, ["step", "q", "batch (rows)", "torch eager median ms", "ort median ms", "torch p90 ms", "ort p90 ms", "torch / ort"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
