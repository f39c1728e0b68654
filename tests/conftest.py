"""Shared fixtures: tiny random models of each family, seeded so tests are repeatable."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = {"n_layer": 2, "dim": 64, "n_head": 4, "grid_size": 4, "multiple_of": 32}


@pytest.fixture(scope="session")
def tiny_c2i():
    """A 2-layer c2i LlamaGen with a 4x4 grid and random weights (vocab 16384 kept)."""
    from arexport.models.registry import load_model

    return load_model("llamagen-c2i-B", random_init=True, seed=1, overrides=dict(TINY))


@pytest.fixture(scope="session")
def tiny_t2i():
    """A 2-layer t2i LlamaGen with 6 caption tokens of width 32."""
    from arexport.models.registry import load_model

    return load_model("llamagen-t2i-B", random_init=True, seed=2, overrides=dict(TINY, cls_token_num=6, caption_dim=32))


@pytest.fixture(scope="session")
def demo():
    from arexport.models.registry import load_model

    return load_model("demo")


@pytest.fixture(scope="session")
def demo_engine(tmp_path_factory):
    """The demo built into an engine directory once per session (batch sizes 1, 2, 4; verify blocks up to 8)."""
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.models.registry import load_model

    out = tmp_path_factory.mktemp("engines") / "demo"
    build_engine(load_model("demo"), out, BuildOptions(batch_sizes=[1, 2, 4], verify_len=8))
    return out


@pytest.fixture(scope="session")
def demo_tree_engine(tmp_path_factory):
    """The demo with its tree_verify step too (eagle / lantern / vvs verify trees with it), batch 2 and 4, blocks of
    8, no image decoder; built once per session. Tests copy it before changing it."""
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.models.registry import load_model

    out = tmp_path_factory.mktemp("engines") / "demo-tree"
    build_engine(load_model("demo"), out, BuildOptions(batch_sizes=[2, 4], verify_len=8, images=False, steps=("tree_verify",)))
    return out


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """CLI tests run in-process and the CLI may set torch's intra-op threads: no test inherits that."""
    import torch

    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def demo_t2i_engine(tmp_path_factory):
    """demo-t2i built once per session (batch sizes 1, 2, 4; verify blocks up to 8), with its prompt encoder.
    Read-only: test_demo_t2i.py and test_deploy_triton.py both use it."""
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.models.registry import load_model

    out = tmp_path_factory.mktemp("engines") / "demo-t2i"
    build_engine(load_model("demo-t2i"), out, BuildOptions(batch_sizes=[1, 2, 4], verify_len=8))
    return out


@pytest.fixture(scope="session")
def demo_int8(demo_engine):
    """demo_engine quantized to int8 once per session (samples=40, calibrate's defaults otherwise): the
    calibration set demo.calib and the engine demo-int8 sit beside it. (source dir, quantized dir, calibrate's
    report lines, the quantized manifest). Read-only: tests that calibrate again write under their tmp_path."""
    from arexport.calibration.calibrate import calibrate_engine

    said: list[str] = []
    out = demo_engine.parent / "demo-int8"
    m = calibrate_engine(demo_engine, out, "int8", samples=40, report=said.append)
    return demo_engine, out, said, m
