"""GPU checks of the runtime (run by benchmarks/gpu_all.sh); each skips with its reason without CUDA."""

from __future__ import annotations

import pytest
import torch

from arexport.runtime.generator import Generator
from arexport.runtime.rng import _uniforms_np, uniforms
from arexport.runtime.sampling import SamplingParams

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")


@cuda
def test_gpu_rng_device_path_equals_the_cpu_path():
    """Row streams are the same bits on the GPU (torch int64 ops) as on the CPU (numpy)."""
    g = torch.Generator().manual_seed(1)
    seeds = torch.randint(0, 2**62, (32,), generator=g)
    counters = torch.randint(0, 2**40, (32,), generator=g)
    for lanes in (1, 33):
        on_gpu = uniforms(seeds.cuda(), counters.cuda(), lanes).cpu()
        assert torch.equal(on_gpu, torch.from_numpy(_uniforms_np(seeds.numpy(), counters.numpy(), lanes, 0)))


@cuda
@pytest.mark.parametrize("method,options", [("ar", {}), ("sjd", {"window": 8})])
def test_gpu_greedy_tokens_equal_the_cpu_tokens(method, options):
    """The demo decodes the same greedy tokens on the GPU as on the CPU (torch backend)."""
    greedy = SamplingParams(temperature=0.0, cfg_scale=3.0)
    cpu = Generator.load("demo").generate(classes=list(range(4)), method=method, method_options=options,
                                          sampling=greedy, images=False)
    gpu = Generator.load("demo", device="cuda").generate(classes=list(range(4)), method=method, method_options=options,
                                                         sampling=greedy, images=False)
    assert (cpu.tokens == gpu.tokens).mean() >= 0.99


@cuda
def test_gpu_cuda_graph_replay_equals_eager():
    """Steps captured into CUDA graphs give the eager tokens (same sampler, same seeds)."""
    args = dict(classes=list(range(4)), method="sjd", method_options={"window": 8}, seed=3, images=False)
    eager = Generator.load("demo", device="cuda").generate(**args)
    graph = Generator.load("demo", device="cuda", cuda_graph=True).generate(**args)
    assert (eager.tokens == graph.tokens).all()
