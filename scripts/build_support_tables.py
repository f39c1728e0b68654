#!/usr/bin/env python
"""Build the kernel/parser support tables that `arexport inspect --target` reads
(arexport/format/support/{ort_cpu,ort_cuda,trt}.json).

ONNX Runtime (cpu, cuda): the kernels a release registers, read from the release's own wheel with
`onnxruntime.capi._pybind_state.get_all_opkernel_def()` -- the function ONNX Runtime's
tools/python/gen_opkernel_doc.py renders into docs/OperatorKernels.md, so the table is that document
for exactly the wheel's version. Reading the CUDA provider's registry needs its shared library to
load; on a machine without CUDA libraries `--stub-cuda-libs` links empty stand-ins for the CUDA,
cuDNN and TensorRT libraries it names (nm and gcc needed): only the kernel registry is read, no
kernel runs.

    pip download --no-deps onnxruntime==1.27.0 -d /tmp/c && unzip -q /tmp/c/*.whl 'onnxruntime/*' -d /tmp/c/x
    python scripts/build_support_tables.py ort --wheel-dir /tmp/c/x --targets cpu
    pip download --no-deps onnxruntime-gpu==1.27.0 -d /tmp/g && unzip -q /tmp/g/*.whl 'onnxruntime/*' -d /tmp/g/x
    python scripts/build_support_tables.py ort --wheel-dir /tmp/g/x --targets cuda --stub-cuda-libs /tmp/g/stubs

TensorRT: onnx-tensorrt's docs/operators.md of the pinned release (its "Operator Support Matrix"):

    python scripts/build_support_tables.py trt --operators-md operators.md --version 10.15 \
        --source "onnx/onnx-tensorrt docs/operators.md (release/10.15-GA)" --commit <sha>

The table records the document's header line, length and sha256 (and the commit when given); a
document whose header names another release is refused.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "arexport" / "format" / "support"
INT_MAX = 2147483647

# --- ONNX Runtime -----------------------------------------------------------------------------

_DUMP = r"""
import json, onnxruntime as ort
from onnxruntime.capi import _pybind_state as C
defs = [{"provider": k.provider, "domain": k.domain or "ai.onnx", "op": k.op_name, "range": list(k.version_range),
         "constraints": {n: sorted(t) for n, t in k.type_constraints.items()}} for k in C.get_all_opkernel_def()]
print(json.dumps({"version": ort.__version__, "defs": defs}))
"""


def _stub_libraries(wheel_dir: Path, stubs: Path) -> None:
    """Empty stand-ins for every library the wheel's provider libraries need but this machine lacks:
    each exports the symbols (with their version tags) that the provider imports from it."""
    stubs.mkdir(parents=True, exist_ok=True)
    capi = wheel_dir / "onnxruntime" / "capi"
    wanted: dict[str, set] = collections.defaultdict(set)
    unversioned: set = set()
    missing: set = set()
    for lib in capi.glob("libonnxruntime_providers_*.so"):
        env = dict(os.environ, LD_LIBRARY_PATH=str(stubs))
        ldd = subprocess.run(["ldd", str(lib)], capture_output=True, text=True, env=env).stdout
        missing |= {line.split()[0] for line in ldd.splitlines() if "not found" in line}
        for line in subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True).stdout.splitlines():
            sym = line.split()[-1]
            if "@" in sym:
                name, tag = sym.split("@", 1)
                tag = tag.lstrip("@")
                if not re.match(r"(GLIBC|GLIBCXX|CXXABI|GCC_)", tag):
                    wanted[tag].add(name)
            elif not sym.startswith(("_ITM_", "__gmon")) and sym != "Provider_GetHost":
                unversioned.add(sym)
    for soname in sorted(missing | set(wanted)):
        names = set(wanted.get(soname, ()))
        if soname.startswith("libnvonnxparser"):
            names |= {s for s in unversioned if "OnnxParser" in s}
        elif soname.startswith("libnvinfer"):
            names |= {s for s in unversioned if "OnnxParser" not in s}
        src = stubs / f"{soname}.c"
        src.write_text("".join(f"long {n}(void) {{ return 0; }}\n" for n in sorted(names)) + "int arexport_stub;\n")
        args = ["gcc", "-shared", "-fPIC", "-o", str(stubs / soname), str(src), f"-Wl,-soname,{soname}"]
        if soname in wanted:
            (stubs / f"{soname}.map").write_text(f"{soname} {{ global: *; }};\n")
            args.append(f"-Wl,--version-script={stubs / (soname + '.map')}")
        subprocess.run(args, check=True)


def _merge(defs: list[dict]) -> list[dict]:
    """Typed kernels register one def per type; merge defs that agree on the version range and on
    every constraint but one (the union of that one is then matched exactly as the separate defs)."""
    changed = True
    defs = [dict(d, constraints={k: sorted(set(v)) for k, v in d["constraints"].items()}) for d in defs]
    while changed:
        changed = False
        groups: dict = {}
        for d in defs:
            names = sorted(d["constraints"])
            for free in names:
                key = (tuple(d["range"]), tuple(names), free,
                       tuple((n, tuple(d["constraints"][n])) for n in names if n != free))
                groups.setdefault(key, []).append(d)
        for key, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            if len(members) > 1 and all(m in defs for m in members):
                free = key[2]
                merged = dict(members[0], constraints=dict(members[0]["constraints"]))
                merged["constraints"][free] = sorted(set().union(*(m["constraints"][free] for m in members)))
                ids = {id(m) for m in members}
                defs = [d for d in defs if id(d) not in ids] + [merged]
                changed = True
                break
    return sorted(defs, key=lambda d: (d["range"], json.dumps(d["constraints"], sort_keys=True)))


def _short(t: str) -> str:
    return t[len("tensor("):-1] if t.startswith("tensor(") else t


def ort_tables(wheel_dir: Path, stubs: Path | None, targets: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(wheel_dir))
    if stubs:
        _stub_libraries(wheel_dir, stubs)
        env["LD_LIBRARY_PATH"] = str(stubs)
    with tempfile.TemporaryDirectory() as cwd:  # not the checkout: its onnxruntime must not shadow the wheel's
        out = subprocess.run([sys.executable, "-c", _DUMP], capture_output=True, text=True, env=env, cwd=cwd)
    if out.returncode != 0:
        raise SystemExit(f"reading the kernel registry failed:\n{out.stderr[-2000:]}")
    dump = json.loads(out.stdout)
    gpu = any(d["provider"] == "CUDAExecutionProvider" for d in dump["defs"])
    for provider, target in (("CPUExecutionProvider", "cpu"), ("CUDAExecutionProvider", "cuda")):
        if target not in targets:
            continue
        ops: dict[str, list] = collections.defaultdict(list)
        for d in dump["defs"]:
            if d["provider"] == provider:
                ops[f"{d['domain']}:{d['op']}"].append(
                    {"range": [d["range"][0], None if d["range"][1] >= INT_MAX else d["range"][1]],
                     "constraints": {n: [_short(t) for t in ts] for n, ts in d["constraints"].items()}})
        if not ops:
            raise SystemExit(f"{provider}: no kernels registered (for CUDA, is the provider library loadable? --stub-cuda-libs)")
        table = {"kind": "ort", "target": target, "provider": provider, "onnxruntime": dump["version"],
                 "source": (f"onnxruntime{'-gpu' if gpu else ''} {dump['version']} wheel, {provider}: "
                            "get_all_opkernel_def() (what tools/python/gen_opkernel_doc.py renders as docs/OperatorKernels.md)"),
                 "ops": {k: _merge(v) for k, v in sorted(ops.items())}}
        _write(f"ort_{target}.json", table)


# --- TensorRT ---------------------------------------------------------------------------------

_TRT_TYPES = {"FP32": "float", "FP16": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
              "INT8": "int8", "UINT8": "uint8", "BOOL": "bool", "FP8": "float8e4m3fn", "FP4": "float4e2m1",
              "INT4": "int4", "DOUBLE": "double"}


def trt_table(md: Path, version: str, source: str, commit: str | None = None) -> None:
    text = md.read_text()
    m = re.search(r"opset (\d+) to opset (\d+)", text)
    if not m:
        raise SystemExit(f"{md}: no 'opset A to opset B' range")
    header = re.search(r"TensorRT ([\d.]+) supports operators[^.]*", text)
    if not header or header.group(1) != version:  # the document must be the release's, not main's
        raise SystemExit(f"{md}: its header names TensorRT {header.group(1) if header else '?'}, not {version}")
    ops = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[1] not in ("Y", "N") or cells[0] in ("Operator",):
            continue
        types = [_TRT_TYPES[t.strip()] for t in (cells[2].split(",") if len(cells) > 2 else []) if t.strip()]
        ops[f"ai.onnx:{cells[0]}"] = {"supported": cells[1] == "Y", "types": types,
                                      "restrictions": cells[3] if len(cells) > 3 else ""}
    if len(ops) < 100:
        raise SystemExit(f"{md}: only {len(ops)} operator rows parsed")
    document = {"header": header.group(0), "chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest(),
                "commit": commit or "unknown"}
    _write("trt.json", {"kind": "trt", "target": "trt", "tensorrt": version, "source": source, "document": document,
                        "opset": [int(m.group(1)), int(m.group(2))],
                        "uint8_io_only": "UINT8 is only supported as network input or output" in text, "ops": ops})


def _write(name: str, table: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(json.dumps(table, indent=None, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"wrote {OUT / name}: {len(table['ops'])} ops ({table['source']})")


def _set_out(path: Path | None) -> None:
    global OUT
    if path is not None:
        OUT = path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    o = sub.add_parser("ort", help="ort_cpu.json and ort_cuda.json from an unpacked onnxruntime(-gpu) wheel")
    o.add_argument("--wheel-dir", type=Path, required=True, help="folder holding the wheel's onnxruntime/ package")
    o.add_argument("--targets", default="cpu,cuda", help="tables to write: cpu, cuda or both")
    o.add_argument("--stub-cuda-libs", type=Path, help="folder for stand-ins of CUDA/cuDNN/TensorRT libraries this machine lacks")
    t = sub.add_parser("trt", help="trt.json from onnx-tensorrt's docs/operators.md")
    t.add_argument("--operators-md", type=Path, required=True)
    t.add_argument("--version", required=True)
    t.add_argument("--source", required=True, help="where the document came from (repository, path, release)")
    t.add_argument("--commit", help="onnx-tensorrt commit the document was read at (recorded in the table)")
    ap.add_argument("--out", type=Path, help=f"folder for the tables (default {OUT}, the package's)")
    args = ap.parse_args()
    _set_out(args.out)
    if args.what == "ort":
        ort_tables(args.wheel_dir, args.stub_cuda_libs, args.targets.split(","))
    else:
        trt_table(args.operators_md, args.version, args.source, args.commit)


if __name__ == "__main__":
    main()
