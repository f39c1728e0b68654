"""Prompts -> caption features for text-conditional LlamaGen: the T5 encoder as LlamaGen uses it.

LlamaGen's `T5Embedder.get_text_embeddings` tokenizes each prompt to exactly `max_length` (120)
tokens (truncated, `</s>` appended, padded with `<pad>` on the right, attention mask), runs the
T5 encoder and keeps `last_hidden_state`; `sample_t2i.py` then moves each caption's padding to the
left (the valid features rotated to the end) and zeroes the padded rows, which is the layout the
GPT's prefill expects. Both backends do exactly that:

* `TorchT5` runs `transformers.T5EncoderModel` from a local `save_pretrained` directory (config,
  weights, tokenizer);
* `OrtT5` runs the `text_encoder.onnx` an engine directory carries, with its `tokenizer.json` read by
  the `tokenizers` package: an ORT engine serves prompts without `transformers` installed.

A prompt longer than the encoder's limit is truncated as the reference does, with a warning naming
how many tokens were dropped; an empty prompt is an error. The shipped `demo-t2i` prompt encoder
(`TorchTextModule` on torch, `OrtT5` on its engine's text_encoder.onnx: same interface as T5's)
refuses an over-long prompt instead (`overflow="error"`): its 12 tokens would cut a prompt mid-sentence.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from arexport.errors import ArexportError

ENCODE_CHUNK = 256  # prompts per text-encoder call (a long --prompts-file is encoded in pieces)


class PromptTokenizer:
    """A `tokenizer.json` (the fast tokenizer's file) padded and truncated to `max_length` as T5Embedder
    asks (`fit`), or left as it encodes (`fit=False`: the caller pads). Set once here: calls from
    several threads share the tokenizer."""

    def __init__(self, path: str | Path, max_length: int, pad_id: int = 0, fit: bool = True, overflow: str = "truncate"):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - a core dependency
            raise ArexportError(f"prompts need the tokenizers package ({e})") from None
        path = Path(path)
        if not path.is_file():
            raise ArexportError(f"tokenizer file not found: {path}")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception subclasses on bad files
            raise ArexportError(f"cannot read tokenizer {path}: {str(e).splitlines()[0][:200]}") from None
        if overflow not in ("truncate", "error"):
            raise ArexportError(f"unknown prompt overflow rule {overflow!r}; choose truncate or error")
        self.max_length, self.pad_id, self.overflow = max_length, pad_id, overflow
        self.tok.no_truncation()
        self.tok.no_padding()
        if fit:
            if overflow == "truncate":
                self.tok.enable_truncation(max_length)
            self.tok.enable_padding(length=max_length, pad_id=pad_id)

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids [N, max_length] int64, attention_mask [N, max_length] int64)."""
        enc = self.tok.encode_batch(list(prompts))
        if self.overflow == "error":
            for i, e in enumerate(enc):
                if len(e.ids) > self.max_length:
                    raise ArexportError(f"prompt {i} is {len(e.ids)} tokens; this model's text encoder takes at most "
                                        f"{self.max_length} (end-of-text token included): shorten it")
        for p, e in zip(prompts, enc):
            if e.overflowing:  # what truncation cut off
                warnings.warn(f"prompt {p[:40]!r}... is over the text encoder's limit; truncated to the text encoder's "
                              f"{self.max_length} tokens as LlamaGen's T5Embedder does", stacklevel=3)
        return (np.array([e.ids for e in enc], dtype=np.int64), np.array([e.attention_mask for e in enc], dtype=np.int64))


def check_prompts(prompts) -> list[str]:
    """A non-empty list of non-empty strings."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts or [])
    if not prompts:
        raise ArexportError("give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ArexportError(f"prompt {i} must be a string, got {type(p).__name__}")
        if not p.strip():
            raise ArexportError(f"prompt {i} is empty")
    return prompts


def left_pad(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaGen's sample_t2i: each caption's valid features move to the end (padding first) and the
    padded rows are zeroed; returns (features [N,T,C], mask [N,T] bool)."""
    out, masks = [], []
    for e, m in zip(embeds, mask.bool()):
        n = int(m.sum())
        out.append(torch.cat([e[n:], e[:n]]))
        masks.append(m.flip(0))
    feats, m = torch.stack(out), torch.stack(masks)
    return feats * m.unsqueeze(-1).to(feats.dtype), m


class TextEncoder:
    """prompts -> (caption features [N, T, C] float32, mask [N, T] bool), left-padded as LlamaGen's prefill wants."""

    max_length: int

    def encode_ids(self, ids: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = check_prompts(prompts)
        ids, mask = self.tokenizer(prompts)
        feats = torch.cat([self.encode_ids(ids[i:i + ENCODE_CHUNK], mask[i:i + ENCODE_CHUNK]).float()
                           for i in range(0, len(ids), ENCODE_CHUNK)])
        return left_pad(feats, torch.from_numpy(mask))


class TorchT5(TextEncoder):
    """transformers' T5EncoderModel from a local save_pretrained directory (no download)."""

    def __init__(self, directory: str | Path, max_length: int = 120, device="cpu"):
        from arexport.hf import load_t5_encoder

        d = Path(directory)
        self.model = load_t5_encoder(d).to(device)
        self.directory, self.max_length, self.device = d, max_length, torch.device(device)
        self.tokenizer = PromptTokenizer(d / "tokenizer.json", max_length, int(self.model.config.pad_token_id or 0))

    @torch.inference_mode()
    def encode_ids(self, ids, mask):
        out = self.model(input_ids=torch.from_numpy(ids).to(self.device), attention_mask=torch.from_numpy(mask).to(self.device))
        return out.last_hidden_state.cpu()


class OrtT5(TextEncoder):
    """The text_encoder.onnx and tokenizer.json of an engine directory."""

    def __init__(self, session, tokenizer_path: Path, max_length: int, pad_id: int, overflow: str = "truncate"):
        self.session, self.max_length = session, max_length
        self.tokenizer = PromptTokenizer(tokenizer_path, max_length, pad_id, overflow=overflow)

    def encode_ids(self, ids, mask):
        return torch.from_numpy(self.session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0])


class TorchTextModule(TextEncoder):
    """A PyTorch prompt encoder with T5EncoderModel's interface ((input_ids, attention_mask) ->
    .last_hidden_state) and its tokenizer.json: a model's packaged encoder (demo-t2i), no transformers."""

    def __init__(self, module, tokenizer_path: Path, max_length: int, pad_id: int, overflow: str = "truncate", device="cpu"):
        self.model, self.max_length, self.device = module, max_length, torch.device(device)
        self.tokenizer = PromptTokenizer(tokenizer_path, max_length, pad_id, overflow=overflow)

    @torch.inference_mode()
    def encode_ids(self, ids, mask):
        out = self.model(input_ids=torch.from_numpy(ids).to(self.device), attention_mask=torch.from_numpy(mask).to(self.device))
        return out.last_hidden_state.cpu()


def text_encoder_info(encoder: Optional[TextEncoder]) -> Optional[dict]:
    """What the manifest records about a text encoder."""
    if encoder is None:
        return None
    return {"max_length": encoder.max_length, "pad_id": encoder.tokenizer.pad_id}


class ChatPrompter:
    """Janus: prompt -> the checkpoint's chat template (rendered as transformers renders templates) +
    the image-start token -> token ids (BOS by the tokenizer), left-padded to the engine's prompt slots.

    `info` (recorded in the manifest's export.prompter): template file or None, boi token string, slots,
    pad id and the special-token strings the template may use."""

    def __init__(self, files: dict, info: dict):
        """files: name -> Path (or the text itself): the tokenizer.json and chat template named in `info`."""
        self.info, self.max_length = info, int(info["slots"])
        self.tok = PromptTokenizer(files[info["tokenizer"]], self.max_length, int(info["pad_id"]), fit=False).tok
        self.template = None
        if info.get("template"):
            text = files[info["template"]]
            import jinja2
            import jinja2.ext
            import jinja2.sandbox

            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                                extensions=[jinja2.ext.loopcontrols])
            self.template = env.from_string(text if isinstance(text, str) else Path(text).read_text(encoding="utf-8"))

    def render(self, prompt: str, suffix: bool = True) -> str:
        """The text transformers' JanusProcessor (or Emu3Processor: `prefix` = BOS text, `prompt_suffix`
        the official positive prompt) tokenizes for image generation."""
        prefix = self.info.get("prefix", "") if suffix else self.info.get("negative_prefix", self.info.get("prefix", ""))
        text = prefix + prompt + (self.info.get("prompt_suffix", "") if suffix else "")
        if self.template is not None:
            msgs = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
            text = self.template.render(messages=msgs, add_generation_prompt=True, **self.info.get("special_tokens", {}))
        return text + self.info["boi_token"]

    def negative(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The negative prompt (the unconditional CFG context; Emu3) for n rows, as __call__ returns prompts."""
        neg = self.info.get("negative_prompt")
        if neg is None:
            raise ArexportError("this engine's prompter has no negative prompt")
        ids, mask = self([neg] * n, suffix=False, check=False, what="the negative prompt")
        return ids, mask

    def __call__(self, prompts, suffix: bool = True, check: bool = True, what: str = "prompt {i}") -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [N, slots] int64, mask [N, slots] bool), left-padded."""
        prompts = check_prompts(prompts) if check else list(prompts)
        enc = self.tok.encode_batch([self.render(p, suffix) for p in prompts],
                                    add_special_tokens=self.info.get("add_special_tokens", True))
        ids = torch.full((len(prompts), self.max_length), int(self.info["pad_id"]), dtype=torch.int64)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        for i, e in enumerate(enc):
            n = len(e.ids)
            if n > self.max_length:
                raise ArexportError(f"{what.format(i=i)} is {n} tokens with the chat template and image-start token; this model "
                                    f"holds {self.max_length} (raise --model-config prompt_slots=N and rebuild)")
            ids[i, self.max_length - n:] = torch.tensor(e.ids, dtype=torch.int64)
            mask[i, self.max_length - n:] = True
        return ids, mask
