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


def load_safetensors_model(directory: str | Path, model_type: str, class_name: str, label: str):
    """transformers' `class_name` from a local save_pretrained directory of `model_type` holding
    tokenizer.json and .safetensors weights, loaded onto meta-initialised modules (each tensor is read
    once: no second copy of the weights). Every missing piece is a CheckpointError naming it."""
    import json

    from arexport.errors import CheckpointError

    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{label} checkpoint directory not found: {d} (pass a save_pretrained directory)")
    if not (d / "config.json").exists():
        raise CheckpointError(f"{d} has no config.json: not a transformers save_pretrained directory")
    mt = json.loads((d / "config.json").read_text()).get("model_type")
    if mt != model_type:
        raise CheckpointError(f"{d} holds a {mt!r} model, not {model_type} ({label})")
    if not (d / "tokenizer.json").exists():
        raise CheckpointError(f"{d} has no tokenizer.json: save the processor (or tokenizer) with save_pretrained next to the model")
    if not any(d.glob("*.safetensors")):
        raise CheckpointError(f"{d} has no .safetensors weights (only safetensors are loaded)")
    try:
        import transformers
    except ImportError:
        raise ArexportError(f"{label} needs transformers (pip install arexport[text])") from None
    try:
        return getattr(transformers, class_name).from_pretrained(str(d), local_files_only=True, use_safetensors=True).eval()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load {label} from {d}: {str(e).splitlines()[0][:200]}") from None
