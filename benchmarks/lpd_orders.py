"""LPD order costs on the host: computing one image's locality-aware order (families.lpd.lpd_order) at 256 and
512 px, and reading an official-format orders file (families.lpd.read_orders_file) of R random orders.

    python benchmarks/lpd_orders.py [--rows-256 60000] [--rows-512 20000] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from arexport.families.lpd import GROUP_SIZES, _grid_tables, lpd_order, read_orders_file


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows-256", type=int, default=60000)
    ap.add_argument("--rows-512", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    for n, steps, grid, rep in ((256, 20, 16, 2.0), (1024, 48, 32, 4.0)):
        sizes = GROUP_SIZES[n][steps]
        _grid_tables(grid)  # built once per process
        times = []
        for s in range(a.repeats):
            keys = torch.rand(len(sizes), n, generator=torch.Generator().manual_seed(s))
            t = time.perf_counter()
            lpd_order(sizes, grid, keys, rep)
            times.append(time.perf_counter() - t)
        print(f"lpd_order N={n} steps={steps} repulsion={rep}: median {1e3 * statistics.median(times):.1f} ms "
              f"(min {1e3 * min(times):.1f}) over {a.repeats}")
    rng = np.random.default_rng(0)
    for rows, n in ((a.rows_256, 256), (a.rows_512, 1024)):
        orders = np.argsort(rng.random((rows, n)), axis=1)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "orders.json")
            with open(path, "w") as f:
                json.dump(orders.tolist(), f)  # as orders/run_lpd_order.py writes it
            size = os.path.getsize(path)
            t = time.perf_counter()
            got = read_orders_file(path, n)
            dt = time.perf_counter() - t
        assert torch.equal(got.long(), torch.from_numpy(orders))
        print(f"read_orders_file R={rows} N={n}: {size / 1e6:.1f} MB JSON, {dt:.2f} s, held {got.numel() * got.element_size() / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
