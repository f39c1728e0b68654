"""Janus-Pro image generation through transformers' `JanusForConditionalGeneration`, with a
static-cache step function over its own modules.

`generate(generation_mode="image")` in transformers: the prompt (ending in the image-start token)
runs through the Llama language model; unconditional rows are the same prompt with every token but
BOS and the image-start token replaced by the pad token; each image token is sampled from
`generation_head(last hidden state)` guided u + g (c - u), then fed back as
`generation_aligner(generation_embeddings(token))`. The VQ model decodes the tokens
(`decode_image_tokens`), and the image processor maps pixels x in [-1, 1] to
uint8(clip((255 x + 255) / 2)).

The step function keeps the shared signature (tokens, positions, write_index, mask, caches). Token
ids below V (the image codebook size) are image tokens; text token t is fed as V + t. The
prompt is left-padded to `cond_len` slots (pads hidden by the mask); RoPE positions are what
transformers uses, the index among valid tokens: `positions + n_valid` with positions = slot -
cond_len for prompt tokens and the image-token index for image tokens, and n_valid the number of
valid prompt slots, read from the mask. Layers, norms, projections and the rotary table are the
model's own modules (no weights are copied).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from arexport.errors import ArexportError, CheckpointError
from arexport.format.spec import ImageSpec, ModelSpec, s_max_for
from arexport.models.catalog import Catalog
from arexport.models.hf_static import static_cache_layers



def load_hf_janus(directory: str | Path):
    """JanusForConditionalGeneration from a local save_pretrained directory (no download)."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"Janus checkpoint directory not found: {d} (pass a save_pretrained directory)")
    if not (d / "config.json").exists():
        raise CheckpointError(f"{d} has no config.json: not a transformers save_pretrained directory")
    if json.loads((d / "config.json").read_text()).get("model_type") != "janus":
        raise CheckpointError(f"{d} holds a {json.loads((d / 'config.json').read_text()).get('model_type')!r} model, not janus")
    if not (d / "tokenizer.json").exists():
        raise CheckpointError(f"{d} has no tokenizer.json: save the processor (or tokenizer) with save_pretrained next to the model")
    try:
        from transformers import JanusForConditionalGeneration
    except ImportError:
        raise ArexportError("Janus models need transformers (pip install arexport[text])") from None
    try:
        return JanusForConditionalGeneration.from_pretrained(str(d), local_files_only=True).eval()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load Janus from {d}: {str(e).splitlines()[0][:200]}") from None


def special_ids(directory: str | Path, hf) -> dict[str, int]:
    """bos, pad and image-start (boi) token ids, as transformers' Janus generate reads them."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
    gc = hf.generation_config
    boi = (getattr(gc, "generation_kwargs", None) or {}).get("boi_token_id")
    if boi is None:
        boi = tok.token_to_id("<begin_of_image>")
    if boi is None:
        raise CheckpointError(f"{directory}: no image-start token (<begin_of_image>) in the tokenizer or generation config")
    text = hf.config.text_config
    bos = gc.bos_token_id if gc.bos_token_id is not None else text.bos_token_id
    pad = gc.pad_token_id if gc.pad_token_id is not None else text.pad_token_id
    if bos is None or pad is None:
        raise CheckpointError(f"{directory}: the config names no bos/pad token ids")
    return {"bos_token_id": int(bos), "pad_token_id": int(pad), "boi_token_id": int(boi)}


class JanusImageModel(nn.Module):
    """Image generation of a transformers Janus model: the step function over its modules."""

    STEP_WEIGHTS = ("hf.model.language_model.layers.", "hf.model.generation_head.", "hf.model.language_model.norm.")
    step_kinds = ("token",)  # the step kinds (arexport.format.stepkinds) this model implements

    def __init__(self, hf, cond_len: int):
        super().__init__()
        self.hf = hf
        self.cond_len = cond_len
        self.V = hf.config.vq_config.num_embeddings

    def to_precision(self, device=None, dtype=None):
        return self.to(device=device, dtype=dtype)

    def embed(self, tokens):
        m = self.hf.model
        img = m.generation_aligner(m.generation_embeddings(torch.minimum(torch.maximum(tokens, tokens.new_zeros(())), tokens.new_tensor(self.V - 1))))
        txt = m.language_model.embed_tokens(torch.maximum(tokens - self.V, tokens.new_zeros(())))
        return torch.where((tokens < self.V).unsqueeze(-1), img, txt)

    def step(self, tokens, positions, write_index, attn_mask, keys, values, cache_write=None):
        """logits [B,q,V] fp32 over image tokens, and the updated caches (see the module docstring)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        if cache_write is None:
            from arexport.models.llamagen import inplace_cache_write as cache_write
        lm = self.hf.model.language_model
        h = self.embed(tokens)
        n_valid = attn_mask[:, 0, -1, :self.cond_len].sum(-1, keepdim=True)
        cos, sin = lm.rotary_emb(h, positions + n_valid)
        h, new_keys, new_values = static_cache_layers(lm.layers, h, cos, sin, keys, values, write_index, attn_mask,
                                                     cache_write, apply_rotary_pos_emb)
        return self.hf.model.generation_head(lm.norm(h)).float(), new_keys, new_values


def pixel_mapping(directory: str | Path) -> dict[str, list[float] | float]:
    """The image processor's mean, std and rescale factor (processor_config.json or
    preprocessor_config.json; Janus-Pro's are 0.5, 0.5 and 1/255)."""
    d = Path(directory)
    cfg: dict = {}
    if (d / "processor_config.json").exists():
        cfg = json.loads((d / "processor_config.json").read_text()).get("image_processor", {})
    elif (d / "preprocessor_config.json").exists():
        cfg = json.loads((d / "preprocessor_config.json").read_text())
    return {"image_mean": list(cfg.get("image_mean", [0.5] * 3)), "image_std": list(cfg.get("image_std", [0.5] * 3)),
            "rescale_factor": float(cfg.get("rescale_factor", 1 / 255))}


class JanusImageDecoder(nn.Module):
    """tokens [N, n] -> uint8 RGB [N, H, W, 3]: decode_image_tokens, then the image processor's
    postprocess, which undoes its normalisation: (255 x - m') / s' with m' = -255 mean / std and
    s' = 1 / std, clipped to [0, 255] and truncated to uint8."""

    def __init__(self, hf, mapping: dict):
        super().__init__()
        self.vq = hf.model.vqmodel
        rf = 1.0 / mapping["rescale_factor"]
        mean, std = torch.tensor(mapping["image_mean"]), torch.tensor(mapping["image_std"])
        self.register_buffer("rf", torch.tensor(rf), persistent=False)
        self.register_buffer("shift", (-rf * mean / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("div", (1.0 / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, tokens):
        x = self.vq.decode(tokens).float()
        return ((x * self.rf - self.shift) / self.div).clamp(0, 255).permute(0, 2, 3, 1).to(torch.uint8).contiguous()

    def codebook(self) -> torch.Tensor:
        """[V, d] codebook rows (LANTERN's neighbours; decoding l2-normalises them)."""
        return self.vq.quantize.embedding.weight


def janus_spec(name: str, hf, cond_len: int, ids: dict[str, int]) -> ModelSpec:
    """The ModelSpec of a Janus model's image generation."""
    text, vq = hf.config.text_config, hf.config.vq_config
    n_tokens = int(hf.config.vision_config.num_image_tokens)
    grid = int(round(n_tokens ** 0.5))
    if grid * grid != n_tokens:
        raise CheckpointError(f"{name}: {n_tokens} image tokens are not a square grid")
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    pixels = vq.num_patches * 2 ** (len(vq.channel_multiplier) - 1)
    return ModelSpec(
        name=name, family="janus", model_type="t2i", vocab_size=vq.num_embeddings, n_tokens=n_tokens, grid_size=grid,
        cond_len=cond_len, num_classes=0, caption_dim=0, n_layer=text.num_hidden_layers, n_head=heads,
        n_kv_head=text.num_key_value_heads, head_dim=head_dim, dim=text.hidden_size, n_cache_layers=text.num_hidden_layers,
        s_max=s_max_for(cond_len, n_tokens), image=ImageSpec("janus", grid, pixels, vq.embed_dim),
        extra={**ids, "text_vocab_size": text.vocab_size, "class_token_offset": vq.num_embeddings},
    )


def prompter_assets(directory: str | Path, slots: int, pad_id: int, boi_token: str) -> dict:
    """What a Janus checkpoint directory contributes to prompts: the files an engine carries (name ->
    path, or the template's text) and the prompter's info (runtime.text.ChatPrompter reads both)."""
    d = Path(directory)
    files = {"tokenizer.json": d / "tokenizer.json"}
    info = {"kind": "chat", "tokenizer": "tokenizer.json", "template": None, "slots": slots, "pad_id": pad_id,
            "boi_token": boi_token, "special_tokens": {}}
    template = None
    if (d / "chat_template.jinja").exists():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    elif (d / "chat_template.json").exists():
        template = json.loads((d / "chat_template.json").read_text()).get("chat_template")
    tcfg = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").exists() else {}
    template = template or tcfg.get("chat_template")
    if isinstance(template, str):
        info["template"] = "chat_template.jinja"
        files["chat_template.jinja"] = template  # text, written as a file
    for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = tcfg.get(k)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            info["special_tokens"][k] = v
    return {"files": files, "info": info}


# -- catalog: Janus-Pro -----------------------------------------------------------------------------
@dataclass(frozen=True)
class JanusOptions:
    """What a Janus checkpoint's config does not say: the prompt slots an engine reserves."""

    prompt_slots: int = 128  # prompt tokens (chat template and image-start token included)


class JanusCatalog(Catalog):
    """`janus-pro`: any size its config describes, from a transformers save_pretrained directory."""

    family = "janus"
    config_class = JanusOptions
    hint = "janus-pro"
    alias_help = "janus for janus-pro"
    ALIASES = ("janus", "janus-pro", "janus-pro-1b", "janus-pro-7b")

    def names(self):
        return ["janus-pro"]

    def canonical(self, name):
        return "janus-pro" if name.lower().replace("_", "-") in self.ALIASES else None

    def config(self, name, overrides=None, image_size=None):
        raise ArexportError(f"{name}'s config comes from its checkpoint directory: load it with --checkpoint DIR")

    def load(self, cname, checkpoint, random_init, overrides, vq_checkpoint, dtype, device, seed=0, image_size=None):
        """Janus-Pro from a save_pretrained directory: the step model, its VQ decoder and spec."""
        from tokenizers import Tokenizer

        from arexport.families import get_family
        from arexport.models.catalog import LoadedModel

        if random_init or checkpoint is None:
            raise ArexportError(f"{cname} loads a transformers save_pretrained directory: pass --checkpoint DIR")
        if vq_checkpoint is not None:
            raise ArexportError(f"{cname} decodes with its own VQ model (in the checkpoint directory): drop --vq-checkpoint")
        bad = set(overrides or {}) - {"prompt_slots"}
        if bad:
            raise ArexportError(f"{cname} takes only prompt_slots as a model override, not {', '.join(sorted(bad))}")
        slots = int((overrides or {}).get("prompt_slots", JanusOptions().prompt_slots))
        if slots < 2:
            raise ArexportError(f"prompt_slots must be >= 2, got {slots}")
        hf = load_hf_janus(checkpoint)
        ids = special_ids(checkpoint, hf)
        spec = janus_spec(cname, hf, slots, ids)
        model = JanusImageModel(hf, slots).to_precision(device=device, dtype=dtype).eval()
        step_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith(model.STEP_WEIGHTS))
        spec = dataclasses.replace(spec, extra={**spec.extra, "sampling_defaults": get_family("janus").sampling_defaults(spec),
                                                "step_weight_params": int(step_params)})
        source = {"model": cname, "overrides": dict(overrides or {}), "image_size": None,
                  "checkpoint": str(Path(checkpoint).resolve())}
        boi = Tokenizer.from_file(str(Path(checkpoint) / "tokenizer.json")).id_to_token(ids["boi_token_id"])
        assets = prompter_assets(checkpoint, slots, ids["pad_token_id"], boi)
        decoder = JanusImageDecoder(hf, pixel_mapping(checkpoint)).to(device).eval()
        return LoadedModel(cname, model, spec, decoder, source, prompter=assets)


CATALOG = JanusCatalog()
