"""Image decoders in fp16/bf16 (issue 29 item 6): GroupNorm as nodes with GPU kernels, fp32 islands
placed by the support tables, the build-time overflow calibration, and the half graphs' images
against the fp32 PyTorch decoder. (Every family x precision through a full build, VAR's
next-scale graphs included: tests/test_gpu_path.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arexport.format.coverage import check_graph

# odd shapes: (N, C, *spatial), groups; 2D, 1D and 3D spatial axes, C/G = 3, 2 and 2
SHAPES = [((3, 12, 5, 7), 4), ((2, 6, 11), 3), ((1, 10, 3, 3, 2), 5)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _Norms(torch.nn.Module):
    """fp32 inputs -> GroupNorms in `dtype` -> fp32 outputs (ORT's Python API cannot feed bf16)."""

    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.norms = torch.nn.ModuleList(torch.nn.GroupNorm(groups, shape[1], eps=1e-6) for shape, groups in SHAPES)
        with torch.no_grad():
            for m in self.norms:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
        self.to(dtype)
        self.dtype = dtype

    def forward(self, *xs):
        return tuple(m(x.to(self.dtype)).float() for m, x in zip(self.norms, xs))


def _within_one_rounding(got: torch.Tensor, want: torch.Tensor, dtype) -> torch.Tensor:
    """|got - want| within one unit in the last place of `dtype` at want (fp32: 1e-5 abs + rel)."""
    if dtype == torch.float32:
        return (got - want).abs() <= 1e-5 + 1e-5 * want.abs()
    return (got - want).abs() <= torch.finfo(dtype).eps * want.abs().clamp_min(torch.finfo(dtype).tiny)


@pytest.mark.parametrize("precision", list(DTYPES))
def test_group_norm_graph_matches_torch_group_norm(precision, tmp_path):
    """The exported GroupNorm (Cast, LayerNormalization over [N, G, -1] in fp32, affine, Cast) run by
    ONNX Runtime equals torch.nn.functional.group_norm in that dtype (torch also computes half
    group_norm in fp32 and rounds once) within one rounding, on odd shapes; ONNX Runtime CUDA and
    TensorRT have a kernel for every node (no GroupNormalization left to inline). Negative control:
    the same graph with one norm's epsilon 1 instead of 1e-6 is rejected."""
    import onnx
    import onnxruntime as ort

    from arexport.exporter.export import _export
    from arexport.exporter.groupnorm import export_group_norms

    dtype = DTYPES[precision]
    model = _Norms(dtype).eval()
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(shape, generator=g) * 4 + 3 for shape, _ in SHAPES]
    path = tmp_path / "gn.onnx"
    names = [f"x{i}" for i in range(len(xs))]
    with export_group_norms(model):
        _export(model, xs, path, names, [f"y{i}" for i in range(len(xs))], None)
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("LayerNormalization") == len(SHAPES) and "GroupNormalization" not in ops
    assert ops.count("Cast") == (0 if precision == "fp32" else 2 * len(SHAPES) * 2)  # x's cast in and out, + fp32 I/O
    for target in ("cuda", "trt"):
        assert check_graph(path, target) == [], target

    def run(p):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no Cast pair folded away
        sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        return [torch.from_numpy(y) for y in sess.run(None, {n: x.numpy() for n, x in zip(names, xs)})]

    want = [F.group_norm(x.to(dtype), groups, m.weight, m.bias, m.eps).float()
            for x, (_, groups), m in zip(xs, SHAPES, model.norms)]
    for got, ref in zip(run(path), want):
        ok = _within_one_rounding(got, ref, dtype)
        assert ok.all(), (precision, (got - ref).abs().max().item())
    # negative control: the first norm's epsilon 1 instead of 1e-6 (its inputs' variance is about 16)
    norm = next(n for n in proto.graph.node if n.op_type == "LayerNormalization")
    next(a for a in norm.attribute if a.name == "epsilon").f = 1.0
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    assert not all(_within_one_rounding(got, ref, dtype).all() for got, ref in zip(run(bad), want))


# -- LlamaGen's VQ decoder in fp16 and bf16 ------------------------------------------------------

def _vq_decoder(seed: int = 1):
    from arexport.models.vq import VQConfig, VQDecoder

    cfg = VQConfig(codebook_size=64, codebook_embed_dim=8, z_channels=32, ch=32, ch_mult=(1, 2), num_res_blocks=1)
    return VQDecoder(cfg).init_random(seed).eval()


# images of a half decoder vs the fp32 PyTorch decoder, in uint8 levels: (mean, max) |difference|
IMAGE_TOLERANCE = {"fp16": (0.5, 2), "bf16": (2.0, 16)}
TOKENS = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))


def _close(images: np.ndarray, reference: np.ndarray, precision: str) -> bool:
    d = np.abs(images.astype(np.int64) - reference.astype(np.int64))
    mean, top = IMAGE_TOLERANCE[precision]
    return d.mean() <= mean and d.max() <= top


@pytest.fixture(scope="module")
def half_vq(tmp_path_factory):
    """precision -> (graph path, ExportedGraph) of the small VQ decoder exported once per precision."""
    from arexport.exporter.build import _in_precision
    from arexport.exporter.export import WeightStore, export_image_decoder

    out = {}
    dec = _vq_decoder()
    for precision in ("fp16", "bf16"):
        d = tmp_path_factory.mktemp(f"vq-{precision}")
        store = WeightStore(d)
        g = export_image_decoder(_in_precision(dec, precision), SimpleNamespace(n_tokens=TOKENS.shape[1]), d, store,
                                 max_batch=4, half=True)
        store.close()
        out[precision] = (d / g.file, g)
    return dec, out


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_vq_decoder_runs_on_gpu_kernels_and_matches_fp32(precision, half_vq):
    """The VQ decoder exported in fp16/bf16: its convolutions run in that dtype, ONNX Runtime CUDA and
    TensorRT have a kernel for every node (nothing falls back, fails or is inlined), the only Casts
    are the GroupNorms' fp32 statistics (2 each) and the two at the ends, and the fp32 islands are
    exactly the nodes the CUDA table has no half kernel for (bf16 Resize). Its images equal the fp32
    PyTorch decoder's within IMAGE_TOLERANCE: the fp16 graph run by ONNX Runtime's CPU provider
    (which upcasts the nodes it lacks fp16 kernels for), the bf16 arithmetic by PyTorch in bf16 (no
    CPU provider runs bf16 convolutions). Negative control: the fp32 decoder with conv_out's bias
    shifted by 0.03 (4 levels) fails the same tolerance."""
    import copy

    import onnx
    import onnxruntime as ort

    from arexport.exporter.build import _in_precision
    from arexport.exporter.groupnorm import export_group_norms

    dec, graphs = half_vq
    path, g = graphs[precision]
    proto = onnx.load(str(path), load_external_data=False)
    half = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.BFLOAT16
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    weights = {i.name: i.data_type for i in proto.graph.initializer}
    assert convs and all(weights.get(n.input[1]) == half for n in convs)
    for target in ("cuda", "trt"):
        assert check_graph(path, target) == [], target
    n_norms = sum(isinstance(m, torch.nn.GroupNorm) for m in dec.modules())
    assert g.ops["Cast"] <= 2 * n_norms + 4, g.ops["Cast"]
    assert [(r["op"], r["dtype"]) for r in g.islands] == ([] if precision == "fp16" else [("Resize", "bfloat16")])
    assert all("no CUDAExecutionProvider kernel" in r["why"] for r in g.islands)
    with torch.no_grad():
        reference = dec(TOKENS).numpy()
        if precision == "fp16":
            images = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"tokens": TOKENS.numpy()})[0]
        else:
            m = _in_precision(dec, "bf16")
            with export_group_norms(m):  # the graph's GroupNorm arithmetic (fp32 statistics)
                images = m(TOKENS).numpy()
        assert images.shape == reference.shape and images.dtype == np.uint8
        assert ((reference > 0) & (reference < 255)).mean() > 0.5  # mostly unsaturated: the comparison can fail
        assert _close(images, reference, precision)
        off = copy.deepcopy(dec)
        off.decoder.conv_out.bias.data += 0.03
        assert not _close(off(TOKENS).numpy(), reference, precision)


# -- the build-time overflow calibration ------------------------------------------------------------

def test_calibration_keeps_or_refuses_fp16_on_weights_that_would_overflow():
    """On the decoder's own weights, in fp32 PyTorch over the calibration grids: a decoder whose
    activations stay far inside fp16's range is exported in fp16; the same decoder with conv_in's
    weights scaled by 1e4 (negative control: activations past fp16 max / MARGIN) is kept in fp32
    under `auto` and refused with DecoderOverflow when fp16 is forced; bf16 needs no check; the
    record names the peak, its layer and the limit."""
    import copy

    from arexport.exporter.calibrate import LIMIT, DecoderOverflow, calibrate_image_decoder, decide

    dec = _vq_decoder()
    peaks = lambda d: (lambda: calibrate_image_decoder(d, 64, 16))  # noqa: E731
    ok = decide("vq_decoder", "auto", "fp16", dec, peaks(dec))
    assert ok["precision"] == "fp16" and 0 < ok["calibration"]["peak"] < LIMIT and ok["calibration"]["limit"] == LIMIT
    assert ok["calibration"]["top"][0][1] == ok["calibration"]["peak"]
    hot = copy.deepcopy(dec)
    hot.decoder.conv_in.weight.data *= 1e4
    kept = decide("vq_decoder", "auto", "fp16", hot, peaks(hot))
    assert kept["precision"] == "fp32" and kept["calibration"]["peak"] > LIMIT and "kept in fp32" in kept["why"]
    assert kept["calibration"]["peak_layer"].startswith("decoder.")
    with pytest.raises(DecoderOverflow, match="vq_decoder: fp16 would come too close to overflowing"):
        decide("vq_decoder", "fp16", "bf16", hot, peaks(hot))
    assert decide("vq_decoder", "auto", "bf16", hot, None)["precision"] == "bf16"  # no calibration run
    assert decide("vq_decoder", "fp32", "fp16", hot, None)["precision"] == "fp32"
