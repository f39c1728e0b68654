"""Loader of the `torch` backend: the PyTorch reference model, by name or from an engine directory.

This is the one place the runtime reaches into `arexport.models` (an import-linter contract allows
exactly this edge): the other backends run engine directories without any model code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from arexport.devices import torch_dtype
from arexport.errors import ArexportError


def open_model(name: str, device: str = "cpu", dtype: Optional[str] = None, cuda_graph: bool = False, **model_options):
    """A TorchEngine for a model name (`model_options`: checkpoint, random_init, seed, overrides, ...)."""
    from arexport.models.registry import load_model
    from arexport.runtime.backends.torch.runner import TorchEngine

    loaded = load_model(name, dtype=torch_dtype(dtype or "fp32"), device=device, **model_options)
    engine = TorchEngine(loaded, device=device, cuda_graph=cuda_graph)
    if loaded.prompter is not None:  # a chat model's prompts (Janus): template + tokenizer of its checkpoint
        from arexport.runtime.text import ChatPrompter

        engine.text_encoder = ChatPrompter(loaded.prompter["files"], loaded.prompter["info"])
    if loaded.text_encoder is not None:  # a packaged prompt encoder (demo-t2i): caption features without transformers
        from arexport.runtime.text import TorchTextModule

        t = loaded.text_encoder
        engine.text_encoder = TorchTextModule(t["module"], t["tokenizer"], t["max_length"], t["pad_id"], t["overflow"], device)
    return engine


def open_draft_head(source: str, target_dim: int, target_vocab: int, grid_size: Optional[int] = None, device: str = "cpu"):
    """An EAGLE draft head (PyTorch) for a target of this width and vocabulary (`--draft-head`); it runs
    beside any backend's target engine."""
    from arexport.models.registry import load_draft_head

    return load_draft_head(source, target_dim=target_dim, target_vocab=target_vocab, grid_size=grid_size).to(device)


def open_directory(directory: Path, manifest, device: str = "cpu", cuda_graph: bool = False, precision: Optional[str] = None):
    """The PyTorch reference of an engine directory, rebuilt from the weights source it records
    (at the engine's precision unless `precision` says otherwise)."""
    src = manifest.source
    kw: dict[str, Any] = dict(overrides=src.get("overrides") or None, image_size=src.get("image_size"))
    if "checkpoint" in src:
        if not Path(src["checkpoint"]).exists():
            raise ArexportError(f"the engine was built from {src['checkpoint']}, which no longer exists; the torch reference needs it")
        kw["checkpoint"] = src["checkpoint"]
    elif "random_init_seed" in src:
        kw.update(random_init=True, seed=src["random_init_seed"])
    if src.get("vq_checkpoint"):
        kw["vq_checkpoint"] = src["vq_checkpoint"]
    engine = open_model(src["model"], device=device, dtype=precision or manifest.precision, cuda_graph=cuda_graph, **kw)
    if "vq_decoder" not in manifest.graphs:
        engine.decoder = None  # mirror the engine: it was built without images
    engine.spec = manifest.spec  # same model; the directory's spec records its cache length
    engine.max_q = manifest.max_q
    engine.directory = directory  # its embedded draft head, if any (methods.eagle.engine_head)
    text = manifest.export.get("text_encoder")
    if text and Path(text["source"]).is_dir():  # the T5 directory the engine's text encoder was exported from
        from arexport.runtime.text import TorchT5

        engine.text_encoder = TorchT5(text["source"], max_length=int(text["max_length"]), device=device)
    return engine
