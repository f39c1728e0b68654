"""Step kinds as declarations: every step function an engine can run, declared once as data.

A step kind is a function of some feeds and the static KV cache. Its declaration says everything
the other layers need, so none of them branches on its name:

* `graph`: the engine-directory graph implementing it (kinds never share a graph; graphs share
  weights through the exporter's content-addressed weights.bin, so an extra kind costs no weights);
* `method`: the PyTorch model method the exporter traces and the torch backend runs, called as
  `model.<method>(*inputs, keys, values, cache_write=...) -> (*outputs, keys, values)`; a model
  lists the kinds it implements in `step_kinds`;
* `inputs` / `outputs`: names, dtypes and symbolic dims in graph order (the per-layer caches follow
  as past_key_i, past_value_i / present_key_i, present_value_i, the outputs aliased to the inputs);
* `cache`: where a call writes K/V ("write_index": slots write_index[b] .. + q of each row;
  "condition": slots [0, T), the condition prefill);
* `labels`: what a call is counted, timed and TensorRT-profiled as (q == 1 -> labels[0], else the
  last), and `count_dim` the dim its records report;
* `profiles`: TensorRT optimization-profile ranges of its dynamic dims;
* `verify`: the scenario `arexport verify` builds its cases with (None: covered by the family's
  prefill case); `calibrate`: whether calibration captures its feeds (and the cache before them).

Dims: "batch" (rows), "q" (query length, exported as 1..K), "m" (ARPG's query count) and "L" (the live
bound: the width of every attention mask, 1..S, dynamic in engines built with --live-attention and S in
the others; attention reads cache slots [0, L) only, see `models.fused.live_slots` and
`runtime.engine.live_width`) are dynamic;
"S" (cache slots), "V" (vocabulary), "dim" (model width), "T" (condition slots), "C" (caption width)
come from the ModelSpec, and "extra.<key>" from `spec.extra[key]` (a family's own size).
Dtypes: int64, bool, float32, or "model" (the engine's precision).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from arexport.errors import ArexportError

DYNAMIC = ("batch", "q", "m", "L")
MASKED = "L"  # the dim of the attention masks the runtime narrows to the live bound of each call
Bound = Union[int, str]  # a profile bound: an int, "K" (largest q), "K/8" (max(1, K // 8)) or "Z" (largest exact size)


@dataclass(frozen=True)
class IO:
    """One graph input or output: name, dtype and symbolic dims. `example` says how the exporter fills
    the tracing input ("zeros", "ones", "arange" along the last dim, "slots": distinct write indices)."""

    name: str
    dtype: str
    dims: tuple[str, ...]
    example: str = "zeros"


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile of a step kind: (min, opt, max) of q (and m). `exact`: one
    profile per exact query size the family names (VAR's scale sizes), each q = [s, s, s]."""

    label: str
    q: tuple[Bound, Bound, Bound] = (1, 1, 1)
    m: Optional[tuple[Bound, Bound, Bound]] = None
    exact: bool = False


@dataclass(frozen=True)
class StepKind:
    """The declaration of one step function (see the module docstring)."""

    name: str
    graph: str
    method: str
    inputs: tuple[IO, ...]
    outputs: tuple[IO, ...]
    labels: tuple[str, ...]
    profiles: tuple[Profile, ...]
    cache: str = "write_index"
    count_dim: str = "q"
    min_max_q: int = 1  # the export needs at least this largest q (distinct example sizes of q and m)
    verify: Optional[str] = None
    calibrate: bool = False
    prefills: Optional[str] = None  # the model_type whose condition this kind prefills with a hidden output (EAGLE round one)
    no_row_split: Optional[str] = None  # why a call cannot run on rows split across devices (runtime.multi_device)
    doc: str = ""

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(io.name for io in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(io.name for io in self.outputs)

    @property
    def query_dims(self) -> tuple[str, ...]:
        """The dynamic query dims of its inputs (each bounded by the engine's largest q)."""
        return tuple(d for d in ("q", "m") if any(d in io.dims for io in self.inputs))

    def label(self, dims: dict[str, int]) -> str:
        """What a call with these bound dims is counted as."""
        return self.labels[0] if dims.get("q", 0) == 1 or len(self.labels) == 1 else self.labels[-1]

    def bind(self, feeds: dict[str, Any]) -> dict[str, int]:
        """Symbolic dims of the inputs bound to the feeds' sizes; raises ArexportError on a missing
        feed or two feeds disagreeing about a dim."""
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise ArexportError(f"the {self.name} step takes {', '.join(self.input_names)}; "
                                + (f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(extra)}"))
        dims: dict[str, int] = {}
        for io in self.inputs:
            shape = tuple(feeds[io.name].shape)
            if len(shape) != len(io.dims):
                raise ArexportError(f"{self.name} step input {io.name} has shape {list(shape)}; expected dims {list(io.dims)}")
            for sym, size in zip(io.dims, shape):
                if dims.setdefault(sym, int(size)) != int(size):
                    raise ArexportError(f"{self.name} step input {io.name}: dim {sym} is {size}, another input says {dims[sym]}")
        return dims

    def output_shape(self, io: IO, dims: dict[str, int], spec) -> tuple[int, ...]:
        """Concrete shape of an output from the bound input dims and the spec's sizes."""
        return tuple(dims[d] if d in dims else spec_size(spec, d) for d in io.dims)

    def trt_profiles(self, top_batch: int, max_q: int, exact_sizes: tuple[int, ...] = ()) -> list[dict[str, Any]]:
        """Its TensorRT profiles for batches 1..top_batch (tuned for top_batch) and q up to max_q;
        profiles whose range is empty (verify when K = 1) are left out."""
        z = max(exact_sizes or (1,))

        def val(b: Bound) -> int:
            return {"K": max_q, "K/8": max(1, max_q // 8), "Z": z}[b] if isinstance(b, str) else int(b)

        out = []
        for p in self.profiles:
            batch = [1, top_batch, top_batch]
            if p.exact:
                out += [{"kind": p.label, "batch": batch, "q": [s, s, s]} for s in sorted(set(exact_sizes)) if s <= max_q]
                continue
            q = [val(b) for b in p.q]
            if q[0] > q[2]:
                continue
            prof: dict[str, Any] = {"kind": p.label, "batch": batch, "q": q}
            if p.m is not None:
                prof["m"] = [val(b) for b in p.m]
            out.append(prof)
        return out


def spec_size(spec, sym: str) -> int:
    """A static dim's size from the ModelSpec."""
    if sym.startswith("extra."):
        key = sym[len("extra."):]
        if key not in spec.extra:
            raise ArexportError(f"{spec.name} records no {key!r}, which a dim of its step graph needs")
        return int(spec.extra[key])
    sizes = {"S": spec.s_max, "L": spec.s_max, "V": spec.vocab_size, "dim": spec.dim, "T": spec.cond_len, "C": spec.caption_dim}
    if sym not in sizes:
        raise ArexportError(f"unknown step-graph dim {sym!r}")
    return int(sizes[sym])


# -- the registry -------------------------------------------------------------------------------------
_TOKEN_INPUTS = (
    IO("tokens", "int64", ("batch", "q")),
    IO("positions", "int64", ("batch", "q"), "arange"),
    IO("write_index", "int64", ("batch",), "slots"),
    IO("attn_mask", "bool", ("batch", "1", "q", "L"), "ones"),
)
_TOKEN_PROFILES = (Profile("decode", q=(1, 1, 1)), Profile("verify", q=(2, "K", "K")))

TOKEN = StepKind(
    name="token", graph="step", method="step", inputs=_TOKEN_INPUTS,
    outputs=(IO("logits", "float32", ("batch", "q", "V")),),
    labels=("decode", "verify"), profiles=_TOKEN_PROFILES, verify="token", calibrate=True,
    doc="q new tokens at grid positions, written from slot write_index: logits [B, q, V] (decode q = 1, verify q = K)")

TOKEN_HIDDEN = StepKind(
    name="token_hidden", graph="step_hidden", method="step_hidden", inputs=_TOKEN_INPUTS,
    outputs=(IO("logits", "float32", ("batch", "q", "V")), IO("hidden", "model", ("batch", "q", "dim"))),
    labels=("decode", "verify"), profiles=_TOKEN_PROFILES, verify="token",
    doc="the token step that also returns the last layer's hidden state [B, q, dim] of the positions fed "
        "(after the final norm: the output head's input, the base model's last_hidden_state that EAGLE-style "
        "draft heads read)")

MULTI_QUERY = StepKind(
    name="multi_query", graph="step", method="step",
    inputs=(*_TOKEN_INPUTS, IO("query_positions", "int64", ("batch", "m"), "arange"),
            IO("query_mask", "bool", ("batch", "1", "m", "L"), "ones")),
    outputs=(IO("logits", "float32", ("batch", "m", "V")),),
    labels=("multi_query",), profiles=(Profile("multi_query", q=(1, "K/8", "K"), m=(1, "K/8", "K")),),
    count_dim="m", min_max_q=4, verify="multi_query", calibrate=True,
    doc="ARPG: n new tokens [B, n] and m mask-token queries at query_positions [B, m]: logits [B, m, V]")

SCALE = StepKind(
    name="scale", graph="step", method="step",
    inputs=(IO("features", "float32", ("batch", "q", "extra.cvae")), IO("positions", "int64", ("batch", "q"), "arange"),
            IO("classes", "int64", ("batch",)), IO("write_index", "int64", ("batch",), "slots"),
            IO("attn_mask", "bool", ("batch", "1", "q", "L"), "ones")),
    outputs=(IO("logits", "float32", ("batch", "q", "V")),),
    labels=("scale",), profiles=(Profile("scale", exact=True), Profile("scale", q=(1, "Z", "K"))), verify="scale",
    doc="VAR: one scale block (q positions with their next-scale features, the rows' classes): logits [B, q, V]")

CAPTION_PREFILL = StepKind(
    name="caption_prefill", graph="prefill", method="prefill_embeds",
    inputs=(IO("cond_embeds", "model", ("batch", "T", "C")), IO("attn_mask", "bool", ("batch", "1", "T", "L"), "ones")),
    outputs=(IO("logits", "float32", ("batch", "V")),),
    labels=("prefill",), profiles=(Profile("prefill", q=(0, 0, 0)),), cache="condition", count_dim="T",
    doc="text-conditional LlamaGen: caption features at slots [0, T): logits of the last position [B, V]")

# -- EAGLE draft trees (issue 30) ----------------------------------------------------------------------
TREE_VERIFY = StepKind(
    name="tree_verify", graph="step_tree", method="step_hidden", inputs=_TOKEN_INPUTS,
    outputs=(IO("logits", "float32", ("batch", "q", "V")), IO("hidden", "model", ("batch", "q", "dim"))),
    labels=("tree",), profiles=(Profile("tree", q=(1, "K", "K")),), verify="token", prefills="c2i",
    no_row_split="EAGLE moves the accepted path's K/V inside the cache buffers itself",
    doc="a draft tree's K nodes [B, K] at per-node positions (root + depth), written from slot write_index, each "
        "attending to the cache and its ancestors in the block through attn_mask (the tree mask): logits [B, K, V] "
        "and the last hidden states [B, K, dim] (after the final norm) that the draft head's next round reads")

DRAFT_HEAD = StepKind(
    name="draft_head", graph="draft_head", method="step",
    inputs=(IO("hidden", "model", ("batch", "q", "dim")), *_TOKEN_INPUTS),
    outputs=(IO("logits", "float32", ("batch", "q", "V")), IO("hidden_out", "model", ("batch", "q", "dim"))),
    labels=("draft",), profiles=(Profile("draft", q=(1, "K", "K")),),
    doc="an EAGLE draft head's step over its own cache: pairs (hidden h_t [B, q, dim], token x_t+1) at grid "
        "positions t, written from slot write_index, under attn_mask (causal for a catch-up, the tree mask for a "
        "tree level): draft logits [B, q, V] (through the target's output projection) and its hidden states")

CAPTION_PREFILL_HIDDEN = StepKind(
    name="caption_prefill_hidden", graph="prefill_hidden", method="prefill_embeds_hidden", inputs=CAPTION_PREFILL.inputs,
    outputs=(IO("logits", "float32", ("batch", "V")), IO("hidden", "model", ("batch", "T", "dim"))),
    labels=("prefill",), profiles=CAPTION_PREFILL.profiles, cache="condition", count_dim="T", verify="condition_hidden",
    prefills="t2i",
    doc="caption_prefill that also returns every caption position's hidden state [B, T, dim] (after the final norm): "
        "an EAGLE draft head catches up on all of them (the last one paired with token 0) before a t2i image's first round")

# -- two output heads (issue 33: NAR) --------------------------------------------------------------------
TOKEN_TWO_HEADS = StepKind(
    name="token_two_heads", graph="step", method="step", inputs=_TOKEN_INPUTS,
    outputs=(IO("logits", "float32", ("batch", "q", "V")), IO("logits_below", "float32", ("batch", "q", "V"))),
    labels=("decode", "verify"), profiles=_TOKEN_PROFILES, verify="token", calibrate=True,
    doc="the token step of a model with two output heads, each logits [B, q, V] for every position fed: NAR's "
        "`output` after layer n_layer (the token to the right of each fed token) and `medusa_output` after the last "
        "layer (the token below); the decoding method combines them on the host")

STEP_KINDS: dict[str, StepKind] = {k.name: k for k in (TOKEN, TOKEN_HIDDEN, MULTI_QUERY, SCALE, CAPTION_PREFILL,
                                                       TREE_VERIFY, DRAFT_HEAD, CAPTION_PREFILL_HIDDEN, TOKEN_TWO_HEADS)}


def hidden_prefill_kind(model_type: str, available) -> Optional[StepKind]:
    """The kind among `available` (names) that prefills a `model_type` condition and also returns its last
    hidden state (`prefills`), or None: the EAGLE head's round-one input."""
    for name in available:
        kind = STEP_KINDS.get(name)
        if kind is not None and kind.prefills == model_type:
            return kind
    return None


def get_step_kind(kind: Union[str, StepKind]) -> StepKind:
    """A declaration by name (or itself); ArexportError names the known kinds."""
    if isinstance(kind, StepKind):
        return kind
    try:
        return STEP_KINDS[kind]
    except KeyError:
        raise ArexportError(f"unknown step kind {kind!r}; known: {', '.join(STEP_KINDS)}") from None


def graph_step_kind(name: str, graph) -> Optional[StepKind]:
    """The step kind an engine-directory graph implements (format.Graph), or None for graphs without a
    cache (image decoders, next-scale inputs, text encoder). Directories written before graphs recorded
    their kind are read by the graph's name and step labels."""
    if getattr(graph, "step", None):
        return get_step_kind(graph.step)
    labels = set(getattr(graph, "kinds", None) or {})
    for k in STEP_KINDS.values():
        if k.graph == name and (not labels or labels <= set(k.labels)) and (labels or k.cache == "condition"):
            return k
    return None
