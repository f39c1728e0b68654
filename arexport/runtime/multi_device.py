"""Several devices inside one process: a StepEngine whose rows are spread over identical engines.

`RowSplitEngine([e0, e1])` is one StepEngine to every decoding method: each engine call's batch of
B rows is split by row parity, row r running on engine r % 2 (r // 2 among that engine's rows), the
parts run concurrently (one thread per engine) and their outputs are put back in row order on the
first engine's device. Classifier-free guidance lays an image out as rows [cond, uncond] next to
each other (methods/base.py CFGRows), so with a guided batch every conditional row runs on the
first device and every unconditional row on the second: the CFG split. An unguided batch is split
the same way (images alternate between the devices), which is still exact, only not "CFG".

Exactness: a row's K/V live on one engine's cache for the image's whole life (`SplitKVCache`); the
per-row bookkeeping (committed lengths, key masks) stays on the first device where the methods
read and write it; only the declared feeds of a call (tokens, positions, masks) go out and its
declared outputs (logits [B, q, V], hidden states) come back. What a row computes is what the same
row computes on a single engine of the same kind, so a seed's tokens are the same (tests/
test_serving_multi_device.py pins it on two CPU "devices").

Latency model (per engine call, README "Scaling out"): a single device runs 2b rows
in t(2b); split, each device runs b rows in t(b) and the b-row half of the logits comes back over
the link: t_split = t(b) + b * q * V * 4 bytes / bandwidth + a fixed launch/sync cost. It pays
where t(b) is well under t(2b) (a step that is compute-bound at this batch), not where a step reads
the weights whatever the batch (a memory-bound decode at small batch: t(b) ~ t(2b)), nor on shared
CPU cores (both halves compete for the same cores).

Methods that edit cache buffers directly rather than through engine calls cannot run on split
caches: EAGLE's tree commit gathers K/V along the accepted path itself, so its tree step (declared
`no_row_split`)
is refused with an ArexportError (serve it with replicas); `SplitKVCache.keys` lists every part's
buffers, whose row counts differ from the logical batch, so any other such edit fails too, never
silently.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import torch

from arexport.errors import ArexportError
from arexport.runtime.engine import StepEngine
from arexport.runtime.kv_cache import KVCache

PARTS = 2  # rows split by parity: CFG's [cond, uncond] pairs land on two devices


def _part_rows(start: int, stop: int, part: int) -> tuple[int, int]:
    """Rows [lo, hi) of part `part` holding the logical rows [start, stop) that map to it (r % PARTS == part)."""
    first = lambda r: (r - part + PARTS - 1) // PARTS if r > part else 0  # noqa: E731 (rows of this part before logical row r)
    return first(start), first(stop)


class SplitKVCache(KVCache):
    """A KV cache whose row r lives in part r % PARTS (one KVCache per device) at index r // PARTS.
    `length` [B] and `key_valid` [B, S] are the logical per-row bookkeeping on the first device;
    `keys`/`values` list every part's buffers (for byte counts; see the module docstring)."""

    def __init__(self, parts: Sequence[KVCache], length: torch.Tensor, key_valid: torch.Tensor, start: int = 0):
        self.parts, self.start = list(parts), start  # start: logical index of this view's row 0 (its parity matters)
        super().__init__([k for p in self.parts for k in p.keys], [v for p in self.parts for v in p.values],
                         length, key_valid)

    def view(self, start: int, stop: int) -> "SplitKVCache":
        have = self._views.get((start, stop))
        if have is None:
            a, b = self.start + start, self.start + stop
            parts = [p.view(*(x - y for x, y in zip(_part_rows(a, b, i), _part_rows(self.start, self.start, i))))
                     for i, p in enumerate(self.parts)]
            have = self._views[(start, stop)] = SplitKVCache(parts, self.length[start:stop], self.key_valid[start:stop], a)
        return have

    def rows_of(self, part: int, batch: int) -> torch.Tensor:
        """Indices among this view's `batch` rows that run on `part` (in order)."""
        r = torch.arange(batch, device=self.length.device)
        return r[(r + self.start) % PARTS == part]

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Row dst[i] becomes a copy of row src[i], across devices where their parts differ."""
        dst, src = dst.tolist(), src.tolist()
        for d, s in zip(dst, src):
            pd, ps = self.parts[(self.start + d) % PARTS], self.parts[(self.start + s) % PARTS]
            i, j = (self.start + d) // PARTS - self.parts_offset((self.start + d) % PARTS), \
                (self.start + s) // PARTS - self.parts_offset((self.start + s) % PARTS)
            for bd, bs in zip(pd.keys + pd.values, ps.keys + ps.values):
                bd[i] = bs[j].to(bd.device)
        idx_d = torch.as_tensor(dst, device=self.length.device)
        idx_s = torch.as_tensor(src, device=self.length.device)
        self.length[idx_d] = self.length[idx_s]
        self.key_valid[idx_d] = self.key_valid[idx_s]

    def parts_offset(self, part: int) -> int:
        """Index in part `part` of this view's first row of that part (views start mid-cache)."""
        return _part_rows(self.start, self.start, part)[0]


class RowSplitEngine(StepEngine):
    """One StepEngine over PARTS identical engines on different devices (see module docstring).
    Counts, times and validates each call once, like a single engine; decoding images, codebooks,
    VAR's VQVAE graphs and text encoding run on the first engine."""

    def __init__(self, engines: Sequence[StepEngine]):
        engines = list(engines)
        if len(engines) != PARTS:
            raise ArexportError(f"a row split needs exactly {PARTS} engines (one per device), got {len(engines)}")
        first = engines[0]
        for e in engines[1:]:
            if e.spec != first.spec or e.backend != first.backend or e.cache_dtype != first.cache_dtype:
                raise ArexportError("a row split needs the same model, backend and precision on every device: "
                                    f"{first.spec.name}/{first.backend}/{first.cache_dtype} vs {e.spec.name}/{e.backend}/{e.cache_dtype}")
        super().__init__(first.spec, first.device, first.cache_dtype, max_q=min(e.max_q for e in engines))
        self.engines = engines
        self.backend = first.backend
        self.fixed_slots = first.fixed_slots
        batches = [e.max_batch for e in engines]
        self.max_batch = None if any(b is None for b in batches) else PARTS * min(batches)
        self.text_encoder = first.text_encoder
        self.profiled_latency = dict(first.profiled_latency)  # a loaded latency profile prices the split engine's steps
        self._latency = dict(first._latency)
        self.devices = [str(e.device) for e in engines]
        self._pool = ThreadPoolExecutor(max_workers=PARTS - 1, thread_name_prefix="arexport-split")

    def step_kinds(self) -> tuple[str, ...]:
        kinds = set(self.engines[0].step_kinds())
        return tuple(k for k in self.engines[0].step_kinds() if all(k in e.step_kinds() for e in self.engines[1:]) and k in kinds)

    def allocate(self, batch: int, lookahead: int = 0) -> SplitKVCache:
        self.check_batch(batch)
        parts = [e.allocate(max(1, _part_rows(0, batch, i)[1]), lookahead) for i, e in enumerate(self.engines)]
        slots = parts[0].s_max
        return SplitKVCache(parts, torch.zeros(batch, dtype=torch.int64, device=self.device),
                            torch.ones(batch, slots, dtype=torch.bool, device=self.device))

    def _forward(self, kind, cache, feeds):
        if kind.no_row_split:
            raise ArexportError(f"the {kind.name} step cannot run on a CFG split: {kind.no_row_split}; run this method "
                                "with one device per replica (serve --devices ... --device-split replicas)")
        if not isinstance(cache, SplitKVCache):
            raise ArexportError("a row-split engine runs on its own caches (allocate them with this engine)")
        for io in (*kind.inputs, *kind.outputs):
            if io.dims[0] != "batch":
                raise ArexportError(f"step kind {kind.name} has {io.name} without a leading batch dimension: it cannot be split by rows")
        batch = next(iter(feeds.values())).shape[0]
        if cache.batch != batch:
            raise ArexportError(f"a step over {batch} rows was given a cache view of {cache.batch} rows")

        def part(i: int):
            off = (i - cache.start) % PARTS  # this view's first row on part i; then every PARTS-th
            if off >= batch:
                return off, None
            e = self.engines[i]
            sub = {k: v[off::PARTS].to(e.device, non_blocking=True).contiguous() for k, v in feeds.items()}
            return off, e._forward(kind, cache.parts[i], sub)

        later = [self._pool.submit(part, i) for i in range(1, PARTS)]  # the other devices' parts on the pool,
        done = [part(0)] + [f.result() for f in later]  # the first one's in this thread meanwhile
        out = {}
        for io in kind.outputs:
            pieces = [(off, res[io.name]) for off, res in done if res is not None]
            ref = pieces[0][1]
            full = torch.empty((batch, *ref.shape[1:]), dtype=ref.dtype, device=self.device)
            for off, t in pieces:
                full[off::PARTS] = t.to(self.device)
            out[io.name] = full
        return out

    # -- everything that is not a row-batched step runs on the first engine ----------------------
    def _next_scale(self, si, f_hat, h):
        return self.engines[0]._next_scale(si, f_hat, h)

    def _decode_latents(self, f_hat):
        return self.engines[0]._decode_latents(f_hat)

    def _decode_images(self, tokens):
        return self.engines[0]._decode_images(tokens)

    @property
    def has_images(self) -> bool:
        return self.engines[0].has_images

    def codebook(self):
        return self.engines[0].codebook()

    def _load_neighbors(self, k: int):
        return self.engines[0]._load_neighbors(k)

    def null_caption(self):
        return self.engines[0].null_caption()


def open_row_split(source: str, devices: Sequence[str], backend: str = "torch", **kw) -> RowSplitEngine:
    """A RowSplitEngine over `source` opened once per device (two devices: cond rows on the first,
    uncond rows on the second)."""
    from arexport.runtime.loading import open_engine

    devices = list(devices)
    if len(devices) != PARTS:
        raise ArexportError(f"the CFG split takes exactly {PARTS} devices (conditional rows, unconditional rows), got "
                            f"{len(devices)}: {','.join(devices) or '(none)'}")
    return RowSplitEngine([open_engine(source, backend=backend, device=d, **kw) for d in devices])


def split_generator(gen, source: str, device: str, backend: str = "torch", **kw):
    """A Generator like `gen` (its draft, text encoder, latency profile) whose target engine is split
    over gen's device (conditional rows) and `device` (unconditional rows); kw: open_engine's."""
    from arexport.runtime.generator import Generator
    from arexport.runtime.loading import open_engine

    return Generator(RowSplitEngine([gen.engine, open_engine(source, backend=backend, device=device, **kw)]), gen.draft)


def check_devices(devices: Optional[Sequence[str]]) -> list[str]:
    """A device list from the CLI/API ('cpu,cpu', 'cuda:0,cuda:1'): each one checked, at least one."""
    from arexport.devices import check_device

    out = [d.strip() for d in (devices or []) if d.strip()]
    if not out:
        raise ArexportError("give at least one device (e.g. cpu or cuda:0,cuda:1)")
    for d in out:
        check_device(d)
    return out
