"""`arexport build`: model -> engine directory (ONNX graphs, shared weights, manifest, TRT plans).

The directory is built in a temporary sibling and renamed into place only when complete, so an
interrupted or failed build leaves nothing half-written (and an existing directory untouched).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from arexport.devices import PRECISIONS, torch_dtype
from arexport.errors import ArexportError
from arexport.families import get_family
from arexport.fileio import atomic_directory
from arexport.format.manifest import Graph, Manifest, Profiles, tool_versions, write_manifest
from arexport.format.arrays import latent_neighbors
from arexport.format.spec import s_max_for
from arexport.format.stepkinds import get_step_kind
from arexport.models.fused import fused_export

@dataclass
class BuildOptions:
    """What to build; batch sizes count rows (an image with CFG is 2 rows)."""

    precision: str = "fp32"
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    verify_len: Optional[int] = None  # largest step query length; default: the family's (LlamaGen 16, ARPG all tokens)
    backend: str = "onnx"  # onnx | trt
    images: bool = True
    overwrite: bool = False
    overwrite_any: bool = False  # --overwrite may replace a directory that is not an arexport one
    trt_opt_level: int = 3
    trt_timing_cache: Optional[str] = None
    trt_workspace_gb: Optional[float] = None
    lantern_k: int = 1000
    text_encoder: Optional[str] = None  # a T5 save_pretrained directory exported next to a t2i model (prompts)
    steps: tuple[str, ...] = ()  # step kinds (format.stepkinds) built besides the family's own
    # image decoders and VAR's next-scale graphs: auto (the engine's precision; fp16 only where the
    # build's calibration on these weights finds it safe, else fp32), fp32, or fp16/bf16 forced
    # (exporter/calibrate.py: a forced fp16 that would overflow is refused)
    decoder_precision: str = "auto"
    # RotaryEmbedding / RMSNormalization as single ONNX nodes (models/fused.py): default on (ONNX
    # Runtime >= 1.27 has kernels for both; TensorRT >= 10.15 imports both, onnx-tensorrt operators.md)
    fused_ops: Optional[bool] = None
    # masks narrowed to the live bound, attention over those cache slots only (models.fused.live_slots): off
    # by default, as ORT CPU's Slice copies the live part, which near a full cache costs more than it saves
    live_attention: bool = False

    @property
    def fused(self) -> bool:
        return True if self.fused_ops is None else self.fused_ops

    def validate(self) -> "BuildOptions":
        if self.precision not in PRECISIONS:
            raise ArexportError(f"unknown precision {self.precision!r}; choose fp32, fp16 or bf16")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ArexportError(f"batch sizes must be positive integers, got {self.batch_sizes}")
        if self.verify_len is not None and self.verify_len < 1:
            raise ArexportError(f"--verify-len must be >= 1, got {self.verify_len}")
        if self.decoder_precision not in ("auto",) + PRECISIONS:
            raise ArexportError(f"unknown decoder precision {self.decoder_precision!r}; choose auto, fp32, fp16 or bf16")
        if self.backend not in ("onnx", "trt"):
            raise ArexportError(f"unknown build backend {self.backend!r}; choose onnx or trt")
        for name in self.steps:
            get_step_kind(name)  # an unknown kind fails here, naming the known ones
        return self


Reporter = Callable[[str], None]


def build_engine(loaded, out: str | Path, opts: BuildOptions, report: Reporter = lambda s: None) -> Manifest:
    """Export `loaded` (a LoadedModel) into the engine directory `out`; returns its manifest."""
    from arexport.exporter.checks import check_graph, raise_on_problems
    from arexport.exporter.export import WeightStore, export_step_kind, export_text_encoder
    from arexport.hf import load_t5_encoder

    opts.validate()
    why = getattr(loaded.decoder, "not_exportable", None)  # a decoder that only holds a codebook (Lumina-mGPT)
    if opts.images and why:
        raise ArexportError(f"{loaded.name}: {why}; build with --no-images")
    if opts.backend == "trt":
        from arexport.devices import require_tensorrt

        require_tensorrt()  # fail before the long export, not after
    family = get_family(loaded.spec.family)
    kinds = step_kinds_to_build(loaded, family, opts.steps)
    dtype = torch_dtype(opts.precision)
    max_q = step_query_len(family, loaded.spec, opts.verify_len, kinds)
    # the cache carries the lookahead rows of one batch need when they step different query lengths
    spec = dataclasses.replace(loaded.spec, s_max=s_max_for(loaded.spec.cond_len, loaded.spec.n_tokens,
                                                            family.cache_lookahead(max_q, loaded.spec)))
    model = loaded.model.to_precision(dtype=dtype).eval()
    max_batch = max(opts.batch_sizes)
    t5, text_info, tokenizer_src = None, None, None  # the text encoder to export, what the manifest records, its tokenizer.json
    if opts.text_encoder is not None:
        if not family.caption_prefill(spec):
            raise ArexportError(f"--text-encoder is for text-conditional LlamaGen (T5 caption features); {spec.name} is not")
        t5 = load_t5_encoder(opts.text_encoder, eager=True)  # before the long export: a bad directory fails now
        if t5.config.d_model != spec.caption_dim:
            raise ArexportError(f"the text encoder in {opts.text_encoder} gives {t5.config.d_model}-d features; "
                                f"{spec.name} takes {spec.caption_dim}-d captions")
        text_info = {"tokenizer": "tokenizer.json", "max_length": spec.cond_len, "pad_id": int(t5.config.pad_token_id or 0),
                     "source": str(Path(opts.text_encoder).resolve())}
        tokenizer_src = Path(opts.text_encoder) / "tokenizer.json"
    elif loaded.text_encoder is not None:  # a packaged prompt encoder (demo-t2i), T5's interface
        t5 = loaded.text_encoder["module"]
        text_info = {"tokenizer": "tokenizer.json", **{k: loaded.text_encoder[k] for k in ("max_length", "pad_id", "overflow", "source")}}
        tokenizer_src = Path(loaded.text_encoder["tokenizer"])
    t_start = time.perf_counter()
    with atomic_directory(out, overwrite=opts.overwrite, report=report, replace_any=opts.overwrite_any) as tmp:
        store = WeightStore(tmp)
        graphs: dict[str, Any] = {}
        try:
            with fused_export(opts.fused):  # RotaryEmbedding / RMSNormalization nodes for ONNX Runtime
                aliases = {f"present_{k}_{i}": f"past_{k}_{i}" for i in range(spec.n_cache_layers) for k in ("key", "value")}
                for kind in kinds:
                    report(f"exporting the {kind.name} step graph ({kind.doc.split(':')[0]}; "
                           f"{'/'.join(kind.query_dims) or 'no query dim'} up to {max_q}, {opts.precision})")
                    t0 = time.perf_counter()
                    g = export_step_kind(model, kind, spec, tmp, store, dtype, max_q=max_q, max_batch=max_batch,
                                         live=opts.live_attention)
                    labels = {} if not kind.query_dims else {kind.labels[0]: 1, kind.labels[-1]: max_q}
                    graphs[kind.graph] = Graph(g.file, kinds=labels, q_range=[1, max_q] if kind.query_dims else None,
                                               aliases=dict(aliases), step=kind.name,
                                               export_seconds=round(time.perf_counter() - t0, 2))
                if loaded.prompter is not None:  # a chat model's prompt files (tokenizer.json, chat template)
                    for name, src in loaded.prompter["files"].items():
                        if isinstance(src, str):
                            (tmp / name).write_text(src, encoding="utf-8")
                        else:
                            shutil.copyfile(src, tmp / name)
                if t5 is not None:
                    report(f"exporting the text encoder graph ({spec.cond_len} tokens)")
                    g = export_text_encoder(t5, spec.cond_len, tmp, store, max_batch=max_batch)
                    graphs["text_encoder"] = Graph(g.file)
                    shutil.copyfile(tokenizer_src, tmp / "tokenizer.json")
                decoders = _export_decoders(loaded, spec, family, opts, tmp, store, max_batch, graphs, report)
        finally:
            store.close()
        extras = _write_arrays(loaded, tmp, opts)
        reports = {}
        for name, g in graphs.items():
            report(f"checking {g.file}")
            r = check_graph(tmp / g.file, require_trt=not opts.fused)
            raise_on_problems(r)
            g.inputs, g.outputs = r.inputs, r.outputs
            reports[name] = {k: v for k, v in r.as_dict().items() if k not in ("inputs", "outputs")}
        from arexport.exporter.trt_build import check_targets

        check_targets(tmp, graphs, report)  # refuses graphs ONNX Runtime CUDA or TensorRT would not run
        manifest = Manifest(
            spec=spec, precision=opts.precision, graphs=graphs, source=loaded.source, arrays=extras,
            profiles=Profiles(sorted(set(opts.batch_sizes)), max_q, dict(graphs["step"].kinds)),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            weights={"file": store.filename, "unique_bytes": store.unique_bytes, "referenced_bytes": store.referenced_bytes},
            cache={"layout": "[B, H_kv, S_max, D] per layer, K and V", "n_layers": spec.n_cache_layers,
                   "s_max": spec.s_max, "lookahead": spec.s_max - spec.min_slots, "dtype": opts.precision,
                   "slots": "generation order; positions drive RoPE"},
            report=reports, tools=tool_versions(), export={"fused_ops": opts.fused, "live_attention": opts.live_attention, **({"decoders": decoders} if decoders else {}),
                **({"text_encoder": text_info} if text_info is not None else {}),
                **({"prompter": loaded.prompter["info"]} if loaded.prompter is not None else {})})
        if opts.backend == "trt":
            from arexport.exporter.trt_build import build_plans

            report("building TensorRT plans")
            manifest.tensorrt = build_plans(tmp, manifest, opts, report)
        manifest.build_seconds = round(time.perf_counter() - t_start, 2)
        write_manifest(tmp, manifest)
    report(f"wrote {out}")
    return manifest


def _export_decoders(loaded, spec, family, opts: BuildOptions, tmp: Path, store, max_batch: int, graphs: dict,
                     report: Reporter) -> dict[str, dict]:
    """Export VAR's next-scale and latent decoder graphs, or the image decoder, each in the precision
    exporter/calibrate.decide picks (the calibration runs once, on the fp32 module, only for fp16);
    returns graph -> the decision record for the manifest (`export.decoders`)."""
    from arexport.exporter.calibrate import calibrate_image_decoder, calibrate_var, decide, line
    from arexport.exporter.export import export_image_decoder, export_latent_decoder, export_next_scale

    if loaded.decoder is None:
        return {}
    module = loaded.decoder.float().eval()
    memo: dict = {}

    def once(key, fn):
        if key not in memo:
            memo[key] = fn()
        return memo[key]

    def export(name: str, fn, peaks) -> None:
        rec = decide(name, opts.decoder_precision, opts.precision, module, peaks)
        half = rec["precision"] != "fp32"
        g = fn(once(rec["precision"], lambda: _in_precision(module, rec["precision"])), half)
        rec.update(fp32_islands=g.islands, casts=g.ops.get("Cast", 0), nodes=sum(g.ops.values()))
        graphs[name] = Graph(g.file)
        records[name] = rec
        report(line(name, rec))

    records: dict[str, dict] = {}
    scales = family.scales(spec)
    if scales is not None:  # a multi-scale VQVAE: its next-scale inputs, then its latent decoder
        cvae = family.latent_channels(spec)
        peaks = lambda: once("var peaks", lambda: calibrate_var(module, scales, module.codebook().shape[0]))  # noqa: E731
        for si in range(len(scales)):
            report(f"exporting next-scale graph {si + 1}/{len(scales)}")
            export(f"next_scale_{si}", lambda m, half, si=si: export_next_scale(m, scales, cvae, si, tmp, store, max_batch=max_batch,
                                                                                half=half), peaks)
        if opts.images:
            report("exporting latent decoder graph")
            export("latent_decoder", lambda m, half: export_latent_decoder(m, scales, cvae, tmp, store, max_batch=max_batch,
                                                                           half=half), peaks)
    if opts.images:  # tokens -> images (VAR's too: its VQVAE's forward sums the scales, then decodes)
        report("exporting image decoder graph")
        vocab = module.codebook().shape[0] if hasattr(module, "codebook") else spec.vocab_size
        peaks = lambda: once("image peaks", lambda: calibrate_image_decoder(module, vocab, spec.n_tokens))  # noqa: E731
        export("vq_decoder", lambda m, half: export_image_decoder(m, spec, tmp, store, max_batch=max_batch, half=half), peaks)
    return records


def _in_precision(module: torch.nn.Module, precision: str) -> torch.nn.Module:
    """A copy of `module` with its floating-point parameters in `precision` (buffers, e.g. a
    decoder's pixel mapping constants, stay as they are; the loaded fp32 module is not touched)."""
    if precision == "fp32":
        return module
    import copy

    out = copy.deepcopy(module)
    dtype = torch_dtype(precision)
    with torch.no_grad():
        for p in out.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    return out


def step_query_len(family, spec, verify_len: Optional[int], kinds) -> int:
    """The largest query length (K) an engine of `spec` is built with: --verify-len, else the family's
    default for this model (default_query_len; None: every token), at most the image's tokens, at least
    what its prefill feeds and what its step kinds need traced (e.g. distinct dynamic n and m)."""
    max_q = min(verify_len or family.default_query_len(spec) or spec.n_tokens, spec.n_tokens)
    max_q = max(max_q, family.prefill_queries(spec))  # RAR prefills two inputs, Janus its prompt, through the step graph
    return max([max_q] + [k.min_max_q for k in kinds])


def step_kinds_to_build(loaded, family, extra: tuple[str, ...] = ()) -> list:
    """The family's step kinds for this model plus the extra ones asked for, each one the model
    implements (its `step_kinds`); the main step graph first."""
    names = list(family.steps(loaded.spec)) + [k for k in extra if k not in family.steps(loaded.spec)]
    kinds = [get_step_kind(n) for n in names]
    have = tuple(loaded.model.step_kinds)
    for k in kinds:
        if k.name not in have:
            raise ArexportError(f"{loaded.spec.name} has no {k.name} step (its model implements {', '.join(have)})")
    if sum(k.graph == "step" for k in kinds) != 1:
        raise ArexportError(f"{loaded.spec.name}: exactly one step kind must be the main step graph, got "
                            f"{', '.join(k.name for k in kinds)}")
    return sorted(kinds, key=lambda k: k.graph != "step")


def _write_arrays(loaded, tmp: Path, opts: BuildOptions) -> dict[str, str]:
    """Codebook (+ latent neighbours for LANTERN) and the t2i null caption, as .npy files."""
    out: dict[str, str] = {}
    family = get_family(loaded.spec.family)
    if loaded.decoder is not None and hasattr(loaded.decoder, "codebook"):
        cb = loaded.decoder.codebook().detach().float().cpu().numpy()
        np.save(tmp / "codebook.npy", cb)
        out["codebook"] = "codebook.npy"
        if "lantern" in family.methods:
            nb = latent_neighbors(torch.from_numpy(cb), opts.lantern_k + 1).numpy()  # LANTERN removes k + 1 on rejection
            np.save(tmp / "neighbors.npy", nb.astype(np.int16 if cb.shape[0] <= 32767 else np.int32))
            out["neighbors"] = "neighbors.npy"
    if family.caption_prefill(loaded.spec):
        np.save(tmp / "uncond_embedding.npy", loaded.model.cls_embedding.uncond_embedding.detach().float().cpu().numpy())
        out["uncond_embedding"] = "uncond_embedding.npy"
    return out
