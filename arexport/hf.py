"""Local transformers checkpoints shared by the exporter and the torch runtime (never downloaded)."""

from __future__ import annotations

from pathlib import Path

from arexport.errors import ArexportError


def load_t5_encoder(directory: str | Path, eager: bool = False):
    """transformers' T5EncoderModel from a local save_pretrained directory that also holds the fast
    tokenizer's tokenizer.json. `eager` selects the eager attention, which the dynamo exporter traces
    (the SDPA path reshapes a non-contiguous view the exporter rejects)."""
    d = Path(directory)
    if not d.is_dir():
        raise ArexportError(f"text encoder directory not found: {d}")
    if not (d / "tokenizer.json").exists():
        raise ArexportError(f"{d} has no tokenizer.json (save the fast tokenizer with save_pretrained next to the model)")
    try:
        from transformers import T5EncoderModel
    except ImportError:
        raise ArexportError("a text encoder directory needs transformers (pip install arexport[text]); an ONNX Runtime "
                            "engine built with --text-encoder serves prompts without it") from None
    kw = {"attn_implementation": "eager"} if eager else {}
    try:
        return T5EncoderModel.from_pretrained(str(d), local_files_only=True, **kw).eval()
    except (OSError, ValueError) as e:
        raise ArexportError(f"cannot load a T5 encoder from {d}: {str(e).splitlines()[0][:200]}") from None
