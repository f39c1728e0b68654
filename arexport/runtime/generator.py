"""Generator: the public API — load an engine (model name or engine directory), generate images.

    gen = Generator.load("demo")                       # torch backend, packaged weights
    gen = Generator.load("engines/demo", backend="ort")  # an engine directory
    out = gen.generate(classes=[3, 7], method="ar", seed=0)
    out.tokens, out.images, out.stats

Image i of a call uses the row seed `image_seed(seed, i)`, so a result does not depend on the
batch size or on which other requests share the batch. `generate` runs a step-wise Session
(runtime/session.py) to completion; `session()` opens one for callers that run their own loop.
Sampling not given is the model's sampler (its recorded defaults), whoever calls.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from arexport.errors import ArexportError
from arexport.runtime.backends import get_backend
from arexport.runtime.engine import StepEngine
from arexport.runtime.methods.base import METHODS, Method, RowStats, make_method
from arexport.runtime.methods.eagle import with_engine_head
from arexport.runtime.sampling import SamplingParams, default_sampling
from arexport.runtime.session import Session, decode_finished
from arexport.runtime.stats import RunStats
from arexport.runtime.verifiers import request_safe_options


@dataclass
class GenerationResult:
    """tokens [N, n_tokens] int64 (raster), images [N, H, W, 3] uint8 or None, stats."""

    tokens: np.ndarray
    images: Optional[np.ndarray]
    stats: dict[str, Any] = field(default_factory=dict)
    extras: list[dict[str, Any]] = field(default_factory=list)  # per image: method extras (GridAR candidates, ...)
    rows: list[RowStats] = field(default_factory=list)  # per image: what generating it cost and did


class Generator:
    """Thread-safe front end over a target engine (and an optional draft engine)."""

    def __init__(self, engine: StepEngine, draft: Optional[StepEngine] = None):
        self.engine = engine
        self.draft = draft
        self._lock = threading.Lock()

    @classmethod
    def load(cls, source: str, backend: str = "torch", device: str = "cpu", draft: Optional[str] = None,
             host_threads: Optional[int] = None, text_encoder: Optional[str] = None,
             latency_profile: Optional[str] = None, **kw) -> "Generator":
        """Open a model name or engine directory on a backend; `draft` names a draft model/engine.

        text_encoder: a local T5 save_pretrained directory for text-conditional LlamaGen (prompts).
        latency_profile: an `arexport profile --json` file of this model and backend whose latency curves
        latency-aware speculation prices its steps with instead of the fixed cost model (runtime/step_cost.py;
        the tokens a seed gives then follow the file's numbers).
        host_threads: torch intra-op threads for the runtime's own work (sampling, acceptance, masks).
        With ONNX Runtime on the CPU it defaults to 1: that work is on tiny tensors, and torch's thread
        pool spinning next to ORT's on the same cores made an SJD step 3x slower (engine and host both).
        Torch's setting is process-wide; pass host_threads to choose another."""
        from arexport.runtime.loading import open_engine

        engine = open_engine(source, backend=backend, device=device, **kw)
        if text_encoder is not None:  # a T5 save_pretrained directory (else an engine's own text_encoder.onnx)
            from arexport.runtime.text import TorchT5

            engine.text_encoder = TorchT5(text_encoder, max_length=engine.spec.cond_len, device=device)
        if host_threads is None and engine.device.type == "cpu":
            host_threads = get_backend(engine.backend).cpu_host_threads
        if host_threads is not None and torch.get_num_threads() != host_threads:
            torch.set_num_threads(host_threads)
        draft_engine = None
        if draft is not None:
            dkw = {k: v for k, v in kw.items() if k in ("dtype", "threads")}
            draft_engine = open_engine(draft, backend=backend, device=device, **dkw)
            engine.family.check_draft(engine.spec, draft_engine.spec)
        if latency_profile is not None:
            load_latency_profile(latency_profile, engine, draft_engine)
        return cls(engine, draft_engine)

    @property
    def spec(self):
        return self.engine.spec

    def conditions(self, classes=None, captions=None, caption_mask=None, prompts=None):
        """Validate and pack user conditions into a Conditions batch (the family adapter's rules);
        prompts go through the engine's text encoder."""
        if prompts is not None:
            if classes is not None or captions is not None:
                raise ArexportError("give prompts, class ids or caption embeddings, not several")
            return self.engine.family.prompt_conditions(self.engine, prompts)
        return self.engine.family.conditions(self.spec, classes, captions, caption_mask)

    def method(self, method: Optional[str], options: Optional[dict] = None) -> Method:
        """A validated method for this model (its family's default when None)."""
        name = method or self.engine.family.default_method
        if name in METHODS:  # an engine directory's own draft head (build-head --into) unless told otherwise
            options = with_engine_head(METHODS[name], options, self.engine, self.draft is not None)
        m = make_method(name, **(options or {}))
        self.engine.family.check_method(name, self.spec)
        if m.requires_draft() and self.draft is None:
            what = "a refiner" if m.second_engine == "--refiner" else "a draft model"
            raise ArexportError(f"method {name} needs {what}: pass {m.second_engine} NAME|DIR")
        return m

    def request_method(self, method: Optional[str], options: Optional[dict] = None) -> Method:
        """`method` for an untrusted request (HTTP and other remote callers): validated as `method`,
        and its hook options (verifier, scorer) may only name built-ins, never code to import."""
        request_safe_options(options or {})
        return self.method(method, options)

    def sampling_params(self, **overrides) -> SamplingParams:
        """The model's sampler (the defaults its spec records) with every non-None override applied:
        what the CLI, HTTP and Python callers all start from."""
        return default_sampling(self.spec, **overrides)

    def resolve_sampling(self, sampling) -> SamplingParams:
        """None -> the model's sampler; a dict -> the model's sampler with those overrides; a
        SamplingParams as given. Validated against the model's vocabulary."""
        if sampling is None:
            sampling = self.sampling_params()
        elif isinstance(sampling, dict):
            sampling = self.sampling_params(**sampling)
        elif not isinstance(sampling, SamplingParams):
            raise ArexportError(f"sampling must be SamplingParams, a dict of overrides or None, got {type(sampling).__name__}")
        return sampling.validate(self.spec.vocab_size)

    def session(self, method=None, method_options: Optional[dict] = None, sampling=None,
                capacity: int = 8, images: bool = True) -> Session:
        """A step-wise batch of `capacity` slots for `method` (a name, None for the family's default,
        or a Method from `method()`; see runtime/session.py). `sampling` (None, a dict of overrides
        or SamplingParams, see resolve_sampling) is what requests added without their own use, and
        whether the batch is guided. Not locked: one caller drives it."""
        if not isinstance(method, Method):
            method = self.method(method, method_options)
        elif method_options:
            raise ArexportError("give method options to method(), not beside a Method")
        return Session(self.engine, method, self.resolve_sampling(sampling), capacity,
                       self.draft, images=images, decode_batch=capacity)

    def images(self, finished: list, batch_size: int) -> np.ndarray:
        """uint8 images of finished results (see session.decode_finished)."""
        return decode_finished(self.engine, finished, batch_size)

    def generate(
        self,
        classes=None,
        captions=None,
        caption_mask=None,
        method: Optional[str] = None,
        method_options: Optional[dict] = None,
        sampling=None,
        seed: int = 0,
        seeds: Optional[Sequence[int]] = None,
        batch_size: int = 8,
        images: bool = True,
        timings: bool = True,
        progress: Optional[Callable[[int, int], None]] = None,
        prompts=None,
    ) -> GenerationResult:
        """Generate one image per condition, `batch_size` images at a time (refilled as images finish).
        progress(done_tokens, total_tokens) is called as images finish. `prompts` (text-to-image models)
        replace classes or caption features: one image per prompt. `sampling`: None (the model's
        sampler), a dict of overrides of it, or SamplingParams.

        Image i uses the row seed image_seed(seed, i), or seeds[i] when per-image seeds are given."""
        if batch_size < 1:
            raise ArexportError(f"batch size must be >= 1, got {batch_size}")
        conds = self.conditions(classes, captions, caption_mask, prompts)
        n = len(conds)
        total = n * self.spec.n_tokens
        with self._lock:
            engines = {"target": self.engine, "draft": self.draft}
            for e in (self.engine, self.draft):
                if e is not None:
                    e.calls.clear()
                    e.records.clear()
                    e.record_timings = timings
            t0 = time.perf_counter()
            session = self.session(method, method_options, sampling, min(batch_size, max(n, 1)), images=False)
            session.add(conditions=conds, seed=seed, seeds=seeds)
            finished, done = [], 0
            while not session.is_done():
                session.step()
                for f in session.take():
                    finished.append(f)
                    done += self.spec.n_tokens
                    if progress:
                        progress(done, total)
            finished.sort(key=lambda f: f.tag[1])
            tokens = torch.stack([f.tokens for f in finished])
            imgs = self.images(finished, batch_size) if images else None
            seconds = time.perf_counter() - t0
            stats = RunStats.aggregate([f.stats for f in finished], self.spec.n_tokens, engines, seconds,
                                       session.admissions, session.events)
        return GenerationResult(tokens.cpu().numpy(), imgs, stats.as_dict(), [f.extras for f in finished],
                                [f.stats for f in finished])


def load_latency_profile(path: str, engine: StepEngine, draft: Optional[StepEngine] = None) -> None:
    """Latency curves from a profile JSON made for this model on this backend and device."""
    import json
    from pathlib import Path

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArexportError(f"cannot read latency profile {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema") != "arexport-profile":
        raise ArexportError(f"{path} is not an arexport profile --json file")
    model = (doc.get("context") or {}).get("model")
    if model != engine.spec.name:
        raise ArexportError(f"{path} profiles {model!r}, not {engine.spec.name!r}")
    found = False
    for r in doc.get("results", []):
        if r.get("backend") == engine.backend and r.get("device") == str(engine.device) and r.get("latency_curves"):
            curves = r["latency_curves"]
            engine.load_latency_curves(curves.get("target", {}))
            if draft is not None:
                draft.load_latency_curves(curves.get("draft", {}))
            found = True
    if not found:
        raise ArexportError(f"{path} has no latency curves measured on {engine.backend} {engine.device} "
                            "(profile a speculative method, sjd or sd, on this backend and device)")
