"""ONNX Runtime backend: loader.py (sessions from an engine directory), runner.py (IOBinding steps).

`open_directory` joins them here, so the runner imports the loader and never the other way round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from arexport.devices import torch_dtype
from arexport.runtime.backends.ort.loader import OrtSessions
from arexport.runtime.backends.ort.runner import OrtEngine


def open_directory(directory: Path, manifest, device="cpu", threads: Optional[int] = None, cuda_graph: bool = False,
                   spin: bool = False):
    """An OrtEngine over the directory (the step session is created now, so a broken graph fails here).
    spin: let ORT's CPU thread pool spin between parallel sections (its default; off here, see OrtSessions)."""
    dev = torch.device(device)
    sessions = OrtSessions(directory, manifest, dev, threads, cuda_graph, spin)
    sessions.get("step")
    engine = OrtEngine(sessions, manifest, dev, torch_dtype(manifest.precision))
    chat = manifest.export.get("prompter")
    if chat:  # a chat model's prompts: its template and tokenizer.json, carried in the directory
        from arexport.runtime.text import ChatPrompter

        files = {n: Path(directory) / n for n in (chat["tokenizer"], chat.get("template")) if n}
        engine.text_encoder = ChatPrompter(files, chat)
    text = manifest.export.get("text_encoder")
    if text and sessions.has("text_encoder"):  # prompts without transformers: the graph plus tokenizer.json
        from arexport.runtime.text import OrtT5

        engine.text_encoder = OrtT5(sessions.get("text_encoder"), Path(directory) / text["tokenizer"], int(text["max_length"]),
                                    int(text["pad_id"]), text.get("overflow", "truncate"))
    return engine
