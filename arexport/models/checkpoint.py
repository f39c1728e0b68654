"""Checkpoint reading for every layout the reference repositories write.

Accepted: `.pt`/`.pth`/`.bin` (read with `torch.load(weights_only=True)`) holding a dict with a
`model`, `ema`, `module` or `state_dict` entry, or a bare state dict (FSDP `consolidated.pth`);
`.safetensors`. Training checkpoints of the reference trainers (ARPG's `train_c2i.py`: model,
optimizer state, step count and the run's `argparse.Namespace`) load too: `argparse.Namespace` is the
one class allowed besides tensors and plain containers, and nothing else is unpickled. DDP/torch.compile prefixes (`module.`, `_orig_mod.`) are stripped, and buffers that
the reference saves but recomputes (`freqs_cis`, `causal_mask`) are dropped.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Iterable, Optional

import torch

from arexport.errors import CheckpointError
from arexport.format.manifest import file_sha256  # noqa: F401  (re-exported for loaders)

WRAPPER_KEYS = ("model", "ema", "module", "state_dict")
PREFIXES = ("module.", "_orig_mod.")
RECOMPUTED_BUFFERS = ("freqs_cis", "causal_mask")
SAFE_GLOBALS = [argparse.Namespace]  # the run arguments reference trainers save next to the weights


def read_state_dict(path: str | os.PathLike, key: Optional[str] = None, meta: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """Load a checkpoint file into a flat {name: tensor} dict (CPU), unwrapping known layouts. With
    `meta`, the run arguments a training checkpoint carries are put in meta['args'] (a dict)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"checkpoint path is a directory, expected a file: {p}")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            raw = load_file(str(p), device="cpu")
        except Exception as e:  # safetensors raises SafetensorError / OSError on bad files
            raise CheckpointError(f"not a readable safetensors file: {p} ({_short(e)})") from None
    else:
        _check_pytorch_container(p)
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                raw = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # the weights-only unpickler raises many types on foreign bytes
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            if found:
                raise CheckpointError(f"{p} holds a {found.group(1)} object, which is not loaded (only tensors, plain "
                                      "containers and argparse.Namespace are)") from None
            raise CheckpointError(f"not a readable PyTorch checkpoint: {p} ({_short(e)})") from None
    if meta is not None and isinstance(raw, dict) and isinstance(raw.get("args"), argparse.Namespace):
        meta["args"] = vars(raw["args"])
    return unwrap_state_dict(raw, source=str(p), key=key)


def _check_pytorch_container(p: Path) -> None:
    """torch.save writes a zip archive (or, legacy, a pickle starting with protocol byte 0x80): name
    anything else before the unpickler fails with an opaque message."""
    with open(p, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return
    if not head:
        raise CheckpointError(f"not a readable PyTorch checkpoint: {p} is empty")
    text = head.decode("utf-8", errors="replace")
    if all(c.isprintable() or c.isspace() for c in text):
        raise CheckpointError(f"not a readable PyTorch checkpoint: {p} is a text file (starts with {text.split(chr(10))[0][:40]!r})")
    raise CheckpointError(f"not a readable PyTorch checkpoint: {p} (neither a torch.save zip archive nor a pickle)")


def unwrap_state_dict(raw, source: str = "checkpoint", key: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Pick the state dict out of a loaded checkpoint object and normalise its key names."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors, found {type(raw).__name__}")
    if key is not None:
        if key not in raw:
            raise CheckpointError(f"{source}: no entry {key!r} (entries: {_names(raw.keys())})")
        raw = raw[key]
    elif not _is_tensor_dict(raw):
        for k in WRAPPER_KEYS:
            if k in raw and isinstance(raw[k], dict) and _is_tensor_dict(raw[k]):
                raw = raw[k]
                break
        else:
            raise CheckpointError(
                f"{source}: no state dict found; expected tensors or one of {', '.join(WRAPPER_KEYS)} "
                f"(entries: {_names(raw.keys())})"
            )
    sd = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{source}: the state dict holds no tensors")
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if k.split(".")[-1] not in RECOMPUTED_BUFFERS}


def load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, ignore_prefixes: Iterable[str] = ()) -> None:
    """Copy sd into model, refusing missing, unexpected or mis-shaped keys with their names."""
    expected = model.state_dict()
    ignore = tuple(ignore_prefixes)
    given = {k: v for k, v in sd.items() if not (ignore and k.startswith(ignore))}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shaped = [
        f"{k} (checkpoint {tuple(given[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if shaped:
        problems.append(f"mis-shaped keys: {_names(shaped)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(given[k].to(t.dtype))


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def _names(keys, limit: int = 6) -> str:
    keys = list(keys)
    shown = ", ".join(str(k) for k in keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _short(e: Exception) -> str:
    s = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return s[:160]
