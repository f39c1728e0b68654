"""Host work per step (issue 35, part 2): ONNX Runtime's CPU thread pool does not spin between engine
calls by default (its spinning took the cores the runtime's own step work runs on), and switching it
does not change a single token."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from arexport.runtime.generator import Generator  # noqa: E402

SPIN_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


def _spin_entries(gen):
    opts = gen.engine.sessions.options
    out = []
    for k in SPIN_KEYS:
        try:
            out.append(opts.get_session_config_entry(k))
        except Exception:  # noqa: BLE001 - ORT raises when the entry was never set
            out.append(None)
    return out


def test_ort_cpu_pool_does_not_spin_unless_asked(demo_engine):
    quiet = Generator.load(str(demo_engine), backend="ort")
    assert _spin_entries(quiet) == ["0", "0"]
    spinning = Generator.load(str(demo_engine), backend="ort", spin=True)
    assert _spin_entries(spinning) == [None, None]  # ORT's own default (spin) left alone
    for method in ("ar", "sjd"):
        a = quiet.generate(classes=[1, 4, 7], method=method, seed=5, batch_size=2, images=False).tokens
        b = spinning.generate(classes=[1, 4, 7], method=method, seed=5, batch_size=2, images=False).tokens
        np.testing.assert_array_equal(a, b)
