"""The draft head on TensorRT: its graph's node support (onnx-tensorrt operators.md table), the plan built by the
engine builder's path (`build-head --backend trt`) and TrtDraftHead, the runner a CUDA target uses. TensorRT cannot
be installed on this project's CI machines: the plan and runner tests skip there, saying so."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from arexport.cli import cli

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "demo-eagle"
    r = CliRunner().invoke(cli, ["build-head", "demo-eagle", "--model", "demo", "--out", str(out), "--verify-len", "4",
                                 "--batch-sizes", "2", "--extra-slots", "8"])
    assert r.exit_code == 0, r.output
    return out


def test_every_node_of_the_head_is_supported_by_tensorrt(head_dir, tmp_path):
    """build-head records each target's findings (none) and `inspect HEAD_DIR --target trt|cuda` says every node is
    supported. Control: a head graph with an int64 Clip (how the head clamped positions before: TensorRT's parser
    takes Clip in float only) is flagged and exits 1."""
    info = json.loads((head_dir / "head.json").read_text())
    assert info["targets"] == {"cuda": [], "trt": []}
    for target in ("trt", "cuda"):
        r = CliRunner().invoke(cli, ["inspect", str(head_dir), "--target", target])
        assert r.exit_code == 0 and "draft_head: every node supported" in r.output, r.output

    x = helper.make_tensor_value_info("positions", TensorProto.INT64, ["batch", "q"])
    y = helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", "q"])
    lo, hi = helper.make_tensor("lo", TensorProto.INT64, [], [0]), helper.make_tensor("hi", TensorProto.INT64, [], [64])
    g = helper.make_graph([helper.make_node("Clip", ["positions", "lo", "hi"], ["idx"], name="node_clamp")], "h", [x], [y],
                          initializer=[lo, hi])
    bad = tmp_path / "bad"
    bad.mkdir()
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(bad / "draft_head.onnx"))
    (bad / "head.json").write_text(json.dumps(dict(info, graph="draft_head.onnx")))
    r = CliRunner().invoke(cli, ["inspect", str(bad), "--target", "trt"])
    assert r.exit_code == 1 and "[fail] Clip" in r.output and "int64" in r.output, r.output


def test_trt_head_build_without_tensorrt_is_refused_before_writing(tmp_path):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the refusal is for machines without it")
    except ImportError:
        pass
    out = tmp_path / "h"
    r = CliRunner().invoke(cli, ["build-head", "demo-eagle", "--model", "demo", "--out", str(out), "--backend", "trt"])
    assert r.exit_code != 0 and "TensorRT is not installed" in r.output, r.output
    assert not out.exists()


def test_a_cuda_target_runs_the_heads_plan(head_dir):
    """On a CUDA device an exported head runs as its TensorRT plan (TrtDraftHead), never silently on ONNX Runtime:
    a head built without --backend trt is refused there, naming the rebuild."""
    from arexport.errors import ArexportError
    from arexport.models.registry import load_model
    from arexport.runtime.methods.eagle import EagleOptions, load_head

    spec = load_model("demo").spec
    with pytest.raises(ArexportError, match="has no TensorRT plan: rebuild it with `arexport build-head ... --backend trt`"):
        load_head(EagleOptions(draft_head=str(head_dir)), spec, "cuda")


def test_trt_head_plan_equals_the_ort_head(head_dir, tmp_path):
    """The plan built through exporter/trt_build.py's path, run by TrtDraftHead, against the ORT head on the same
    inputs (2 rows at different offsets, a tree-shaped mask, a cache already holding pairs): logits, hidden output
    and every cache slot within fp32 tolerances (TF32 off)."""
    pytest.importorskip("tensorrt", reason="TensorRT cannot be installed on this machine (no NVIDIA driver/GPU)")
    import shutil

    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA device is visible")
    from arexport.exporter.head import build_head_plan
    from arexport.runtime.backends.ort.head import OrtDraftHead
    from arexport.runtime.backends.trt.head import TrtDraftHead

    d = tmp_path / "h"
    shutil.copytree(head_dir, d)
    info = json.loads((d / "head.json").read_text())
    info["tensorrt"] = build_head_plan(d, info, "draft_head.plan")
    (d / "head.json").write_text(json.dumps(info))
    ort_head, trt_head = OrtDraftHead(str(d), 96, 17), TrtDraftHead(str(d), 96, 17, "cuda")
    g = torch.Generator().manual_seed(0)
    q, slots = 4, ort_head.slots
    write = torch.tensor([3, 9])
    positions = write[:, None] + torch.arange(q)[None]
    s = torch.arange(slots)
    mask = (s[None, None] <= positions[:, :, None]) & ~((s[None, None] > write[:, None, None]) & (s[None, None] % 2 == 0)
                                                       & (s[None, None] < positions[:, :, None]))
    hidden, tokens = torch.randn(2, q, 96, generator=g), torch.randint(0, 17, (2, q), generator=g)
    ko, vo = ort_head.allocate(2, slots)
    for t in ko + vo:
        t.copy_(torch.randn(t.shape, generator=g))
    kt, vt = [k.cuda() for k in ko], [v.cuda() for v in vo]
    lo, ho, ko, vo = ort_head.step(hidden, tokens, positions, write, mask[:, None], ko, vo)
    lt, ht, kt, vt = trt_head.step(hidden, tokens, positions, write, mask[:, None], kt, vt)
    torch.cuda.synchronize()
    for a, b in [(lo, lt), (ho, ht)] + list(zip(ko + vo, kt + vt)):
        np.testing.assert_allclose(b.cpu().numpy(), a.numpy(), atol=1e-4, rtol=1e-3)
