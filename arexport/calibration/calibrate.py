"""`arexport calibrate`: capture (or reuse) a calibration set, quantize, gate, write a new engine dir."""

from __future__ import annotations

import copy
import datetime as _dt
import os
from pathlib import Path
from typing import Callable, Optional

from arexport.calibration.capture import capture_set, load_set
from arexport.calibration.gates import DEFAULT_THRESHOLDS, evaluate, hidden_graph_fidelity
from arexport.calibration.quantize import MODES, build_quantized_dir, same_feed_graphs
from arexport.format.manifest import read_manifest, tool_versions, verify_files, write_manifest
from arexport.errors import ArexportError
from arexport.fileio import atomic_directory


def calibrate_engine(src_dir: str | Path, out_dir: str | Path, mode: str, samples: int = 64,
                     calib_set: Optional[str | Path] = None, classes: Optional[list[int]] = None, every: int = 4,
                     force: bool = False, thresholds: Optional[dict] = None, overwrite: bool = False,
                     activations: str = "s8", report: Callable[[str], None] = lambda s: None):
    """Quantize src_dir into out_dir (atomically); refuse when a gate fails unless force."""
    if mode not in MODES:
        raise ArexportError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if samples < 2:
        raise ArexportError(f"--samples must be >= 2 (some are held out for the gates), got {samples}")
    src = Path(src_dir)
    manifest = read_manifest(src)
    verify_files(src, manifest)
    if manifest.quantization:
        raise ArexportError(f"{src} is already quantized ({manifest.quantization['mode']}); start from a full-precision engine")
    spec = manifest.spec
    step = manifest.step_graphs()["step"]
    if not step.calibrate:  # its declaration (format.stepkinds) says whether calibration captures it
        raise ArexportError(f"calibrate captures decode and multi-query steps; {spec.name}'s step graph serves "
                            f"{', '.join(manifest.step.kinds)} ({spec.family}), which it does not quantize yet")
    _refuse_unquantized_step_graphs(src, manifest)
    th = dict(DEFAULT_THRESHOLDS[mode], **(thresholds or {}))
    calib_path = Path(calib_set) if calib_set else src.parent / f"{src.name}.calib"
    if not (calib_path / "manifest.json").exists():
        n_cls = classes or [i % max(spec.num_classes, 1) for i in range(max(4, min(16, samples // 4)))]
        report(f"capturing {samples} step inputs into {calib_path}")
        capture_set(src, calib_path, n_cls, every=every, samples=samples)
    calib_manifest, data = load_set(calib_path, manifest)
    if classes and list(map(int, classes)) != list(calib_manifest.get("classes", [])):
        raise ArexportError(f"calibration set {calib_path} was captured from classes {calib_manifest.get('classes')}, not the "
                            f"--classes given: pass a new --calib-set DIR to capture them, or drop --classes to reuse it")
    report(f"calibration set {calib_path}: {len(data)} samples (hash {calib_manifest['hash'][:12]})")
    if len(data) < samples:  # a sample is one captured step call over every image decoded together
        report(f"{len(data)} samples, not --samples {samples}: a sample is one step call over the "
               f"{len(calib_manifest.get('classes', []))} images decoded together, {spec.n_tokens} steps of which every "
               f"{calib_manifest.get('every', every)}th is kept; pass a smaller --every (and a new --calib-set) for more")
    n_held = max(1, len(data) // 5)
    calib, heldout = data[:-n_held], data[-n_held:]
    if not calib:  # checked here: ORT's calibrater would only say "No data is collected"
        raise ArexportError(f"calibration set {calib_path} holds {len(data)} step call(s) of {spec.name}: too few to calibrate on "
                            "with some held out for the gates; capture again into a new --calib-set with a smaller --every")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        report(f"quantizing the step graph ({mode}) with {len(calib)} calibration samples ({n_held} held out for the gates)")
        info, graphs = build_quantized_dir(src, Path(out_dir), mode, calib, tmp, activations)
        if manifest.draft_head:  # a head built into the source (build-head --into) comes along unchanged (fp32)
            import shutil

            from arexport.exporter.head import head_files

            for f in head_files(manifest.draft_head):
                shutil.copy2(src / f, tmp / f)
        from arexport.exporter.checks import check_graph, raise_on_problems

        reports = copy.deepcopy(manifest.report)
        for name, g in graphs.items():
            r = check_graph(tmp / g.file, require_trt=not manifest.export.get("fused_ops", False))
            raise_on_problems(r)
            g.inputs, g.outputs = r.inputs, r.outputs
            reports[name] = {k: v for k, v in r.as_dict().items() if k not in ("inputs", "outputs")}
        new = copy.deepcopy(manifest)
        new.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        new.graphs, new.report, new.tools = graphs, reports, tool_versions()
        new.weights = {"file": "weights.bin", "unique_bytes": info["weights_bytes"], "referenced_bytes": info["weights_bytes"]}
        new.tensorrt = None  # plans must be rebuilt from the quantized graph
        # paths relative to the new engine directory, so it can be moved together with its source
        here = Path(out_dir).resolve()
        new.quantization = {"mode": mode, **info, "source_engine": os.path.relpath(src.resolve(), here),
                            "calibration": {"path": os.path.relpath(calib_path.resolve(), here), "hash": calib_manifest["hash"],
                                            "samples": len(calib), "heldout": len(heldout)}}
        write_manifest(tmp, new)
        for name in info["graphs"]:  # hidden-state graphs quantized beside the step (same_feed_graphs)
            fid = hidden_graph_fidelity(src / manifest.graphs[name].file, tmp / graphs[name].file, tmp / graphs["step"].file,
                                        heldout)
            new.quantization["graphs"][name]["fidelity"] = fid
            report(f"{name}: logits vs the quantized step {fid['logits_vs_step_max_abs']:.2e}, hidden states vs "
                   f"{manifest.precision}: cosine min {fid['hidden_cosine_min']:.5f}, relative L2 max {fid['hidden_rel_l2_max']:.4f}")
            if fid["logits_vs_step_max_abs"] > fid["same_model_atol"]:  # not a gate that --force lifts: a wrong engine
                raise ArexportError(f"the quantized {name} graph's logits differ from the quantized step graph's by "
                                    f"{fid['logits_vs_step_max_abs']:.2e} on the same feeds (> {fid['same_model_atol']}): "
                                    "draft-head methods would verify on another model than ar decodes with; nothing was written")
        demo = spec.image.kind == "digits"
        report("evaluating accuracy gates on held-out steps" + (" and generated digits" if demo else ""))
        gate = evaluate(src, tmp, graphs["step"].file, heldout, mode, th, demo=demo)
        new.quantization["gates"] = gate.as_dict()
        if not gate.passed and not force:
            raise ArexportError(f"quantized engine failed its accuracy gate ({'; '.join(gate.failures)}); "
                                "nothing was written (use --force to keep it anyway)")
        new.quantization["forced"] = bool(force and not gate.passed)
        write_manifest(tmp, new)
    return new


def _refuse_unquantized_step_graphs(src: Path, manifest) -> None:
    """The step graph is quantized, and so is every step graph fed the step's own inputs (same_feed_graphs: the
    tree-verification graph whose hidden states EAGLE heads read), on the same samples. A condition prefill that also
    returns hidden states (caption_prefill_hidden) stays at full precision like the plain condition prefill ar
    uses. Any other step graph with hidden-state outputs would stay at full precision while ar decodes with the
    quantized step, so eagle / lantern / vvs would verify on another model: refused, not re-packed."""
    same = set(same_feed_graphs(manifest))
    others = sorted(f"{name} ({kind.name})" for name, kind in manifest.step_graphs().items()
                    if name != "step" and name not in same and kind.cache != "condition"
                    and any(o.name == "hidden" for o in kind.outputs))
    if others:
        raise ArexportError(f"calibrate quantizes {src}'s token step and the step graphs fed its inputs; its "
                            f"{', '.join(others)} graph takes other inputs and would stay at {manifest.precision}, so "
                            "draft-head methods (eagle, lantern/vvs --draft-head) would verify on another model than ar "
                            "decodes with: calibrate an engine built without that --step")


def refuse_draft_head(head: str) -> None:
    """`calibrate --draft-head`: there is nothing to tune for a head. calibrate quantizes a target engine's step
    graph under accuracy gates; it chooses no speculative option (draft length, tree, thresholds), and an exported
    head directory runs its fp32 graph on ONNX Runtime's CPU provider, which calibrate does not quantize."""
    raise ArexportError(f"calibrate has nothing to tune for the draft head {head}: it quantizes the target engine's step "
                        "graph only (no draft lengths, trees or thresholds are calibrated, and the head stays fp32); "
                        "calibrate the engine without --draft-head and pass --draft-head at generate time")
