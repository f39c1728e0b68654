"""verify_chain's per-row host path (StandardRule, SampledProposals, CPU, few chains) against its tensor
path: the same accepted counts and bit-equal distributions on random windows with zero-probability
tokens, sampled and one-hot drafts, every limit, rejected drafts and exact ties of u with the ratio.
Controls: perturbed row paths (the limit ignored, the bonus after a rejection) are rejected."""

import numpy as np
import pytest
import torch

import arexport.runtime.speculative as spec
from arexport.runtime.speculative import SampledProposals, StandardRule, verify_chain


def _case(seed: int, b: int, l: int, v: int, one_hot: float, rows: bool):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, l + 1, v, generator=g) * 3
    logits[torch.rand(b, l + 1, v, generator=g) < 0.3] = float("-inf")  # zero-probability tokens
    logits[..., 0] = 0.0  # every row keeps some mass
    P = torch.softmax(logits, -1)
    n = 3 * b * l
    R = torch.softmax(torch.randn(max(n, 1), v, generator=g) * 2, -1) if rows else None
    index = torch.randint(0, max(n, 1), (b, l), generator=g) if rows else torch.full((b, l), -1)
    index[torch.rand(b, l, generator=g) < one_hot] = -1
    D = torch.randint(0, v, (b, l), generator=g)
    if rows:  # sampled drafts come from their rows (drawn, not one-hot), so q(x) > 0
        drawn = torch.multinomial(R[index.clamp(min=0).view(-1)], 1, generator=g).view(b, l)
        D = torch.where(index >= 0, drawn, D)
    limit = torch.randint(0, l + 1, (b,), generator=g)
    u = torch.rand(b, l, generator=g, dtype=torch.float64)
    if l:  # an exact tie u == ratio must reject (u < ratio accepts)
        Q = SampledProposals(R, index, D, v)
        u[0, 0] = float(torch.clamp(P[0, 0, D[0, 0]] / Q.qx[0, 0].clamp(min=1e-30), max=1.0))
    return P, SampledProposals(R, index, D, v), D, limit, u


CASES = [(s, b, l, v, oh, rows) for s, (b, l, v) in enumerate([(1, 15, 17), (2, 7, 17), (4, 3, 5), (3, 1, 9), (1, 0, 17),
                                                                 (4, 15, 64), (1, 15, 2)])
         for oh in (0.0, 0.5, 1.0) for rows in (True, False)]


def _compare(case, path=None):
    P, Q, D, limit, u = _case(*case)
    # token uniforms over [0, 1), including 0 and the largest double below 1 (the target clamp)
    u_token = torch.rand(P.shape[0], generator=torch.Generator().manual_seed(case[0] + 100), dtype=torch.float64)
    u_token[0] = 1.0 - 2.0**-53 if case[0] % 2 else 0.0
    want = spec._verify_tensors(P, Q, D, limit, u, u_token, StandardRule())
    got = (path or spec._verify_rows)(P, Q, D, limit, u, u_token)
    same = torch.equal(want.accepted, got.accepted) and torch.equal(want.dist, got.dist)
    return same and torch.equal(want.token, got.token), want


@pytest.mark.parametrize("case", CASES)
def test_row_path_matches_tensor_path(case):
    ok, want = _compare(case)
    assert ok


def test_cases_exercise_rejections_and_bonuses():
    """The cases cover both outcomes, so equality is not vacuous."""
    kinds = set()
    for case in CASES:
        P, Q, D, limit, u = _case(*case)
        res = spec._verify_tensors(P, Q, D, limit, u, None, StandardRule())
        kinds |= {"rejected" if int(k) < int(m) else "bonus" for k, m in zip(res.accepted, limit)}
        kinds |= {"accepted"} if bool((res.accepted > 0).any()) else set()
    assert kinds == {"rejected", "bonus", "accepted"}


def test_verify_chain_takes_the_row_path_only_where_it_applies(monkeypatch):
    calls = []
    real = spec._verify_rows
    monkeypatch.setattr(spec, "_verify_rows", lambda *a: calls.append(1) or real(*a))
    P, Q, D, limit, u = _case(0, 2, 7, 17, 0.5, True)
    res = verify_chain(P, Q, D, limit, u, torch.rand(2, dtype=torch.float64), StandardRule())
    assert calls == [1] and res.token.shape == (2,)
    P, Q, D, limit, u = _case(1, spec.ROW_PATH_ROWS + 1, 7, 17, 0.5, True)
    verify_chain(P, Q, D, limit, u, None, StandardRule())
    assert calls == [1]  # more chains: the tensor path


def _ignores_limit(P, Q, D, limit, u, u_token):
    return spec._verify_rows(P, Q, D, torch.full_like(limit, D.shape[1]), u, u_token)


def _bonus_after_rejection(P, Q, D, limit, u, u_token):
    res = spec._verify_rows(P, Q, D, limit, u, u_token)
    k = res.accepted
    dist = P.gather(1, k.view(-1, 1, 1).expand(-1, 1, P.shape[-1]))[:, 0]
    return spec.ChainResult(k, dist, res.token)


def _float32_running_sum(P, Q, D, limit, u, u_token):
    """The token drawn with a float32 running sum instead of float64."""
    res = spec._verify_rows(P, Q, D, limit, u, None)
    cdf = torch.cumsum(res.dist, -1)
    target = u_token.float()[:, None] * cdf[:, -1:]
    token = torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=P.shape[-1] - 1)
    return spec.ChainResult(res.accepted, res.dist, token)


@pytest.mark.parametrize("control", [_ignores_limit, _bonus_after_rejection, _float32_running_sum])
def test_controls_are_rejected(control):
    assert not all(_compare(case, control)[0] for case in CASES)


@pytest.mark.parametrize("n", [1, 2, spec.ROW_PATH_ROWS])
def test_window_arms_row_path_matches_arrays(n):
    """WindowArms for a few images in Python scalars (choose, observe with lists) against the numpy
    arrays over all of them: the same arms and the same bits of state over a long random run that
    crosses trust, bursts and re-probes. Control: an arrays run fed other yields diverges."""
    from types import SimpleNamespace

    def arms():
        slots = SimpleNamespace(image_tensor=lambda shape, dtype=torch.int64, fill=0, device=None:
                                torch.full((8, *shape), fill, dtype=dtype))
        return spec.WindowArms(slots, torch.tensor([1.0, 1.2] + [1.5] * 14), 16, 0.5, reprobe=5, probe=2, trust=3)

    rows, arrays, control = arms(), arms(), arms()
    g = np.random.default_rng(n)
    same_control, seen = True, set()
    for t in range(300):
        a = rows.choose(n)
        seen.update(a)
        b = arrays._choose_arrays(n).tolist()
        c = control._choose_arrays(n)
        assert a == b, t
        choices = [1, 1, 2, 3, 7, 15] if (t // 60) % 2 == 0 else [1, 1, 1, 2]  # phases where the window pays and not
        yields = [float(g.choice(choices)) if x == 16 else 1.0 for x in a]
        full = [bool(g.random() < 0.9) for _ in a]
        rows.observe(yields, full)
        arrays.observe(np.array(yields), np.array(full))
        control.observe(np.array(yields) + 0.5, np.array(full))
        for k in ("tokens", "counted", "since", "burst", "last", "previous"):
            assert np.array_equal(rows._np[k], arrays._np[k]), (t, k)
        same_control &= np.array_equal(control._np["tokens"], arrays._np["tokens"]) and c.tolist() == b
    assert seen == {1, 16}  # both arms ran
    assert not same_control


@pytest.fixture(scope="module")
def demo_torch():
    from arexport.runtime.generator import Generator

    return Generator.load("demo")


@pytest.mark.parametrize("batch,images,options", [(1, 3, {}), (3, 5, {"window": 4}), (2, 4, {"window": 6, "start": 5}),
                                                  (6, 6, {})])
def test_sjd_host_paths_give_the_tensor_paths_tokens(demo_torch, monkeypatch, batch, images, options):
    """Whole sjd generations with every host path (row verification, scalar window arms, numpy
    bookkeeping) against the same with all of them off: the same tokens and accepted runs.
    Control: a host bookkeeping that commits one token fewer per step changes them."""
    from arexport.runtime.methods import sjd

    def run():
        res = demo_torch.generate(classes=[i % 10 for i in range(images)], method="sjd", method_options=options,
                                  batch_size=batch, images=False, seed=7)
        return res.tokens.copy() if hasattr(res.tokens, "copy") else res.tokens.clone()

    fast = run()
    real_observe = spec.WindowArms.observe
    with monkeypatch.context() as m:
        m.setattr(spec, "ROW_PATH_ROWS", 0)
        m.setattr(sjd, "HOST_BOOKKEEPING", False)
        m.setattr(spec.WindowArms, "choose", lambda self, n: self._choose_arrays(n).tolist())
        m.setattr(spec.WindowArms, "observe", lambda self, c, f: real_observe(self, np.asarray(c, float), np.asarray(f)))
        slow = run()
    assert np.array_equal(np.asarray(fast), np.asarray(slow))
    real_commit = sjd.SJDDecoder._commit_host
    with monkeypatch.context() as m:  # control
        m.setattr(sjd.SJDDecoder, "_commit_host", lambda self, b, k, *a: real_commit(self, b, (k - 1).clamp(min=0), *a))
        assert not np.array_equal(np.asarray(run()), np.asarray(fast))
