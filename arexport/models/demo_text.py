"""The demo-t2i prompt encoder: a word-level tokenizer and a one-block transformer, trained from scratch.

`demo-t2i` is a text-conditional LlamaGen (model_type t2i) over the 8x8 digits, conditioned on
caption features exactly as LlamaGen t2i is on T5's: the encoder here stands in for T5 and keeps
T5EncoderModel's interface, `(input_ids, attention_mask) -> .last_hidden_state`, so the exporter's
text-encoder graph, the ORT runtime's `OrtT5` and LlamaGen's left-padding of captions all apply
unchanged. Nothing is downloaded: the vocabulary comes from the prompt templates in
scripts/train_demo.py, and the tokenizer is a `tokenizers` WordLevel model saved as tokenizer.json
(lower-cased, split on whitespace and punctuation, `</s>` appended as T5's tokenizer does).

Shapes: input_ids, attention_mask [N, max_length] int64 (right-padded with pad id 0) ->
last_hidden_state [N, max_length, dim] float32.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from arexport.errors import ArexportError

PAD, UNK, EOS = "<pad>", "<unk>", "</s>"  # ids 0, 1, 2 (T5's order)


@dataclass(frozen=True)
class DemoTextConfig:
    vocab_size: int
    dim: int = 32  # = the GPT's caption_dim
    n_head: int = 2
    ffn: int = 64
    max_length: int = 12  # tokens per prompt, `</s>` included (= the GPT's cls_token_num)


class TextEncoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor


class DemoTextEncoder(nn.Module):
    """Token + position embeddings, one pre-norm self-attention block over the valid tokens, final LayerNorm."""

    def __init__(self, cfg: DemoTextConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(cfg.max_length, cfg.dim))
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, cfg.dim)
        self.norm_out = nn.LayerNorm(cfg.dim)

    def init_random(self, seed: int = 0) -> "DemoTextEncoder":
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "norm" in name:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoderOutput:
        n, length = input_ids.shape
        h = self.tok(input_ids) + self.pos[:length]
        heads, hd = self.cfg.n_head, self.cfg.dim // self.cfg.n_head
        q, k, v = (t.view(n, length, heads, hd).transpose(1, 2) for t in self.qkv(self.norm1(h)).chunk(3, dim=-1))
        # padded keys are never attended to; the mask is spelled out per query (ONNX Attention wants [.., q, k])
        keep = attention_mask.bool().view(n, 1, 1, length).expand(n, 1, length, length)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        h = h + self.proj(a.transpose(1, 2).reshape(n, length, self.cfg.dim))
        h = h + self.fc2(F.gelu(self.fc1(self.norm2(h))))
        return TextEncoderOutput(self.norm_out(h))


def build_tokenizer(words: list[str]):
    """A `tokenizers.Tokenizer`: WordLevel over <pad>, <unk>, </s> and `words` (sorted, lower-case)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {PAD: 0, UNK: 1, EOS: 2}
    for w in sorted({w.lower() for w in words}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])])
    return tok


def save_text_encoder(model: DemoTextEncoder, tokenizer, weights: Path, tokenizer_file: Path, info: dict) -> None:
    """The encoder's weights (config in the metadata) and its tokenizer.json."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, str(weights), metadata={"config": json.dumps(asdict(model.cfg)), "info": json.dumps(info)})
    tokenizer.save(str(tokenizer_file))


def load_text_encoder(weights: Path, tokenizer_file: Path) -> DemoTextEncoder:
    """The encoder saved by `save_text_encoder` (eval mode, fp32), checked against its tokenizer's vocabulary."""
    from safetensors import safe_open

    from arexport.models.checkpoint import load_into, read_state_dict

    for p in (weights, tokenizer_file):
        if not Path(p).is_file():
            raise ArexportError(f"demo text encoder file missing from the package: {p} (run scripts/train_demo.py --only t2i)")
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ArexportError(f"{weights} has no config metadata")
    cfg = DemoTextConfig(**json.loads(meta["config"]))
    vocab = json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))["model"]["vocab"]
    if len(vocab) != cfg.vocab_size:
        raise ArexportError(f"{tokenizer_file} has {len(vocab)} words; the text encoder in {weights} embeds {cfg.vocab_size}")
    model = DemoTextEncoder(cfg)
    load_into(model, read_state_dict(weights), source=str(weights))
    return model.eval()
