"""Emu3 image generation through transformers' `Emu3ForConditionalGeneration`, with a static-cache
step function over its own modules.

How Emu3 generates an image (baaivision/Emu3 `image_generation.py` and transformers' Emu3Processor):
the prompt is BOS + text + image-start + "{h}*{w}" + image-wrapper token; then h rows of w visual
tokens each followed by the end-of-line token (the prefix constraint allows only visual tokens inside
a row and only EOL at a row's end), then end-of-frame, end-of-image and EOS. CFG runs the negative
prompt as the unconditional context (log-softmax guidance, which picks and samples exactly as
u + s (c - u) on logits). The VQ-VAE decodes the grid with the EOL column removed.

Step token space: ids [0, V) are VQ codebook ids, id V is the end-of-line token, text token t is
fed as V + 1 + t; the graph maps each to the checkpoint's BPE id (`vocabulary_map`) before the
embedding. A generated image is h rows of (w + 1) tokens, EOL last in each row; logits [B, q, V + 1]
are the language model's logits at those BPE ids, with the constraint applied in the graph: at an
EOL position (target index j = position + 1 with j % (w + 1) == w) every visual token is masked and
EOL alone is left; elsewhere EOL is masked. Masked logits are a large finite negative (not -inf, so
the CFG combine u + s (c - u) stays finite), which softmax turns into exactly zero probability: the
EOL tokens are forced whatever the sampler or method. RoPE positions are as transformers counts them
(index among valid prompt tokens, `positions + n_valid` as for Janus).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from arexport.errors import ArexportError, CheckpointError
from arexport.hf import load_safetensors_model
from arexport.format.spec import ImageSpec, ModelSpec, s_max_for
from arexport.models.catalog import Catalog
from arexport.models.hf_static import static_cache_layers

# the official demo's prompt additions and guidance (baaivision/Emu3 image_generation.py lines 31-34, 53-55)
POSITIVE_PROMPT = " masterpiece, film grained, best quality."
NEGATIVE_PROMPT = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst "
                   "quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry.")
EOL_TOKEN = "<|extra_200|>"
MASKED = -1e9  # logit of a token the prefix constraint forbids (finite: CFG combines stay finite)
MAX_GRID = 256  # tokens per side an engine may hold (Emu3-Gen's 720 px is 90)


def load_hf_emu3(directory: str | Path):
    return load_safetensors_model(directory, "emu3", "Emu3ForConditionalGeneration", "Emu3")


def grid_for(image_area: int, factor: int = 8) -> int:
    """Tokens per side of a square image of `image_area` pixels, as Emu3's processors compute it
    (calculate_generate_size at ratio 1:1: round(sqrt(area) / 8))."""
    return int(round(image_area ** 0.5 / factor))


def special_tokens(directory: str | Path, hf) -> dict:
    """The token strings and ids the prompt and grid need (from tokenizer_config.json and the config)."""
    from tokenizers import Tokenizer

    d = Path(directory)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tcfg = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").exists() else {}

    def named(key: str, default: str) -> str:
        v = tcfg.get(key) or (tcfg.get("extra_special_tokens") or {}).get(key) or default
        return v.get("content") if isinstance(v, dict) else v

    out = {"bos_token": named("bos_token", "<|extra_203|>"), "pad_token": named("pad_token", "<|endoftext|>"),
           "boi_token": named("boi_token", "<|image start|>"), "image_wrapper_token": named("image_wrapper_token", "<|image token|>")}
    vmap = hf.config.vocabulary_map or {}
    ids = {k + "_id": tok.token_to_id(v) for k, v in out.items()}
    ids["eol_token_id"] = vmap.get(EOL_TOKEN, tok.token_to_id(EOL_TOKEN))
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise CheckpointError(f"{directory}: the tokenizer has no {', '.join(missing)} (an Emu3 tokenizer names them)")
    return {**out, **{k: int(v) for k, v in ids.items()}}


def visual_bpe_ids(hf) -> list[int]:
    """BPE id of each codebook id 0..V-1 ('<|visual token 000123|>' in the config's vocabulary_map)."""
    V = hf.config.vq_config.codebook_size
    img2bpe = hf.model.vocabulary_mapping.img2bpe
    missing = [i for i in range(V) if i not in img2bpe]
    if missing:
        raise CheckpointError(f"the vocabulary_map has no visual token {missing[0]} of the {V}-entry codebook")
    return [int(img2bpe[i]) for i in range(V)]


class Emu3ImageModel(nn.Module):
    """Image generation of a transformers Emu3 model: the step function over its modules."""

    STEP_WEIGHTS = ("hf.model.text_model.layers.", "hf.model.text_model.norm.", "hf.lm_head.")
    step_kinds = ("token",)

    def __init__(self, hf, cond_len: int, width: int, eol_bpe: int):
        super().__init__()
        self.hf, self.cond_len, self.width = hf, cond_len, width
        self.V = hf.config.vq_config.codebook_size
        # step id -> BPE id for the V codebook ids and EOL (a constant of the graph, 4 bytes per entry)
        self.register_buffer("bpe", torch.tensor(visual_bpe_ids(hf) + [eol_bpe], dtype=torch.int64), persistent=False)

    def to_precision(self, device=None, dtype=None):
        return self.to(device=device, dtype=dtype)

    def bpe_ids(self, tokens):
        """Step ids -> the checkpoint's BPE ids (module docstring)."""
        img = self.bpe[torch.minimum(torch.maximum(tokens, tokens.new_zeros(())), tokens.new_tensor(self.V))]
        return torch.where(tokens <= self.V, img, tokens - (self.V + 1))

    def constrain(self, logits, positions):
        """The prefix constraint: EOL alone at a row's end, visual tokens alone elsewhere."""
        target = positions + 1  # the image index the logits of `positions` predict
        at_eol = (((target % (self.width + 1)) == self.width) & (target >= 0)).to(logits.dtype).unsqueeze(-1)
        is_eol_col = (torch.arange(self.V + 1, device=logits.device) == self.V).to(logits.dtype)
        # float arithmetic, not a bool comparison: TensorRT's parser takes no bool Equal
        allowed = at_eol * is_eol_col + (1 - at_eol) * (1 - is_eol_col)  # [B, q, V+1], 1 or 0
        return torch.where(allowed > 0.5, logits, torch.full_like(logits, MASKED))

    def step(self, tokens, positions, write_index, attn_mask, keys, values, cache_write=None):
        """logits [B,q,V+1] fp32 (codebook ids and EOL, constrained) and the updated caches."""
        from transformers.models.emu3.modeling_emu3 import apply_rotary_pos_emb

        if cache_write is None:
            from arexport.models.llamagen import inplace_cache_write as cache_write
        tm = self.hf.model.text_model
        h = tm.embed_tokens(self.bpe_ids(tokens))
        n_valid = attn_mask[:, 0, -1, :self.cond_len].sum(-1, keepdim=True)
        cos, sin = tm.rotary_emb(h, positions + n_valid)
        h, new_keys, new_values = static_cache_layers(tm.layers, h, cos, sin, keys, values, write_index, attn_mask,
                                                     cache_write, apply_rotary_pos_emb)
        # the full text-vocabulary head, then the V + 1 image columns (no copy of lm_head's rows)
        logits = self.hf.lm_head(tm.norm(h)).float().index_select(-1, self.bpe)
        return self.constrain(logits, positions), new_keys, new_values


class Emu3ImageDecoder(nn.Module):
    """tokens [N, h (w + 1)] -> uint8 RGB [N, H, W, 3]: the EOL column dropped, the VQ-VAE's decode,
    then the image processor's postprocess (x std + mean, times 1 / rescale_factor, clipped, uint8)."""

    def __init__(self, hf, mapping: dict, height: int, width: int):
        super().__init__()
        self.vq, self.h, self.w = hf.model.vqmodel, height, width
        self.V = hf.config.vq_config.codebook_size
        rf = 1.0 / mapping["rescale_factor"]
        self.register_buffer("mean", torch.tensor(mapping["image_mean"]).view(1, 3, 1, 1) * rf, persistent=False)
        self.register_buffer("std", torch.tensor(mapping["image_std"]).view(1, 3, 1, 1) * rf, persistent=False)

    def forward(self, tokens):
        ids = tokens.view(tokens.shape[0], self.h, self.w + 1)[:, :, : self.w]
        ids = torch.minimum(torch.maximum(ids, ids.new_zeros(())), ids.new_tensor(self.V - 1))  # no int64 Clip (TensorRT)
        x = self.vq.decode(ids).float()
        return (x * self.std + self.mean).clamp(0, 255).permute(0, 2, 3, 1).to(torch.uint8).contiguous()

    def codebook(self) -> torch.Tensor:
        """[V + 1, d]: the codebook rows and a zero row for EOL (LANTERN / VVS neighbourhoods; EOL is
        forced, so its row only has to exist)."""
        w = self.vq.quantize.embedding.weight
        return torch.cat([w, w.new_zeros(1, w.shape[1])])


def pixel_mapping(directory: str | Path) -> dict:
    """The image processor's mean, std and rescale factor (processor_config.json or preprocessor_config.json)."""
    d = Path(directory)
    cfg: dict = {}
    if (d / "processor_config.json").exists():
        cfg = json.loads((d / "processor_config.json").read_text()).get("image_processor", {})
    if not cfg and (d / "preprocessor_config.json").exists():
        cfg = json.loads((d / "preprocessor_config.json").read_text())
    if not cfg:
        raise CheckpointError(f"{d} has no processor_config.json or preprocessor_config.json (the image processor's mean and std)")
    return {"image_mean": list(cfg["image_mean"]), "image_std": list(cfg["image_std"]),
            "rescale_factor": float(cfg.get("rescale_factor", 1 / 255))}


def emu3_spec(name: str, hf, cond_len: int, side: int, ids: dict) -> ModelSpec:
    """The ModelSpec of an Emu3 model generating side x side token images (grid columns include EOL)."""
    text, vq = hf.config.text_config, hf.config.vq_config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    n_tokens = side * (side + 1)
    scale = 2 ** (len(vq.channel_multiplier) - 1)
    return ModelSpec(
        name=name, family="emu3", model_type="t2i", vocab_size=vq.codebook_size + 1, n_tokens=n_tokens, grid_size=side + 1,
        cond_len=cond_len, num_classes=0, caption_dim=0, n_layer=text.num_hidden_layers, n_head=heads,
        n_kv_head=text.num_key_value_heads, head_dim=head_dim, dim=text.hidden_size, n_cache_layers=text.num_hidden_layers,
        s_max=s_max_for(cond_len, n_tokens), image=ImageSpec("emu3", side + 1, side * scale, vq.embed_dim),
        extra={"bos_token_id": ids["bos_token_id"], "pad_token_id": ids["pad_token_id"], "eol_token_id": ids["eol_token_id"],
               "eol_id": vq.codebook_size, "image_rows": side, "image_cols": side, "text_vocab_size": text.vocab_size,
               "class_token_offset": vq.codebook_size + 1},
    )


# -- catalog ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Emu3Options:
    """What an Emu3 checkpoint's config does not say: prompt slots, image area and the prompt additions."""

    prompt_slots: int = 128  # prompt tokens (BOS, text, image header); the negative prompt must fit too
    image_area: int = 518400  # pixels of the square image (Emu3's default: 720 x 720, 90 x 90 tokens)
    positive_prompt: str = POSITIVE_PROMPT  # appended to every prompt, as the official demo does
    negative_prompt: str = NEGATIVE_PROMPT  # the unconditional CFG context


def prompter_assets(directory: str | Path, opts: Emu3Options, side: int, tokens: dict) -> dict:
    """The files an engine carries and the prompter's info (runtime.text.ChatPrompter): no chat
    template; BOS + prompt + positive suffix + '<|image start|>{h}*{w}<|image token|>'."""
    d = Path(directory)
    info = {"kind": "chat", "tokenizer": "tokenizer.json", "template": None, "slots": opts.prompt_slots,
            "pad_id": tokens["pad_token_id"], "prefix": tokens["bos_token"], "prompt_suffix": opts.positive_prompt,
            "boi_token": f"{tokens['boi_token']}{side}*{side}{tokens['image_wrapper_token']}",
            "negative_prompt": opts.negative_prompt, "special_tokens": {}}
    return {"files": {"tokenizer.json": d / "tokenizer.json"}, "info": info}


class Emu3Catalog(Catalog):
    """`emu3-gen`: any size its config describes, from a transformers save_pretrained directory."""

    family = "emu3"
    config_class = Emu3Options
    hint = "emu3-gen"
    alias_help = "emu3 for emu3-gen"
    ALIASES = ("emu3", "emu3-gen", "emu3-gen-hf")

    def names(self):
        return ["emu3-gen"]

    def canonical(self, name):
        return "emu3-gen" if name.lower().replace("_", "-") in self.ALIASES else None

    def config(self, name, overrides=None, image_size=None):
        raise ArexportError(f"{name}'s config comes from its checkpoint directory: load it with --checkpoint DIR")

    def options(self, overrides) -> Emu3Options:
        """Validated Emu3Options from --model-config overrides."""
        fields = {f.name: f.type for f in dataclasses.fields(Emu3Options)}
        bad = set(overrides or {}) - set(fields)
        if bad:
            raise ArexportError(f"emu3-gen takes only {', '.join(fields)} as model overrides, not {', '.join(sorted(bad))}")
        o = dict(overrides or {})
        try:
            for k in ("prompt_slots", "image_area"):
                if k in o:
                    o[k] = int(o[k])
        except (TypeError, ValueError):
            raise ArexportError(f"emu3-gen: prompt_slots and image_area must be integers, got {overrides}") from None
        opts = Emu3Options(**o)
        if opts.prompt_slots < 2:
            raise ArexportError(f"prompt_slots must be >= 2, got {opts.prompt_slots}")
        side = grid_for(opts.image_area)
        if not 1 <= side <= MAX_GRID:
            raise ArexportError(f"image_area {opts.image_area} gives {side} tokens per side; 1..{MAX_GRID} are allowed")
        return opts

    def load(self, cname, checkpoint, random_init, overrides, vq_checkpoint, dtype, device, seed=0, image_size=None):
        """Emu3 from a save_pretrained directory: the step model, its VQ-VAE decoder and spec."""
        from arexport.families import get_family
        from arexport.models.catalog import LoadedModel

        if random_init or checkpoint is None:
            raise ArexportError(f"{cname} loads a transformers save_pretrained directory: pass --checkpoint DIR")
        if vq_checkpoint is not None:
            raise ArexportError(f"{cname} decodes with its own VQ-VAE (in the checkpoint directory): drop --vq-checkpoint")
        if image_size is not None:
            raise ArexportError(f"{cname} sets its image size by --model-config image_area=PIXELS, not --image-size")
        opts = self.options(overrides)
        side = grid_for(opts.image_area)
        mapping = pixel_mapping(checkpoint)
        hf = load_hf_emu3(checkpoint)
        tokens = special_tokens(checkpoint, hf)
        spec = emu3_spec(cname, hf, opts.prompt_slots, side, tokens)
        model = Emu3ImageModel(hf, opts.prompt_slots, side, tokens["eol_token_id"]).to_precision(device=device, dtype=dtype).eval()
        step_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith(model.STEP_WEIGHTS))
        spec = dataclasses.replace(spec, extra={**spec.extra, "sampling_defaults": get_family("emu3").sampling_defaults(spec),
                                                "step_weight_params": int(step_params)})
        source = {"model": cname, "overrides": dict(overrides or {}), "image_size": None,
                  "checkpoint": str(Path(checkpoint).resolve())}
        decoder = Emu3ImageDecoder(hf, mapping, side, side).to(device).eval()
        return LoadedModel(cname, model, spec, decoder, source, prompter=prompter_assets(checkpoint, opts, side, tokens))


    def dry_run_shape(self, cname, checkpoint, overrides):
        """The StepShape (models.memory) of an engine of this checkpoint, from its config.json alone:
        parameters counted on meta tensors, nothing allocated or read but the config."""
        from arexport.models.memory import StepShape

        if checkpoint is None or not (Path(checkpoint) / "config.json").exists():
            raise ArexportError(f"{cname} --dry-run reads the checkpoint's config.json: pass --checkpoint DIR holding one")
        opts = self.options(overrides)
        side = grid_for(opts.image_area)
        from transformers import Emu3Config, Emu3ForConditionalGeneration

        cfg = Emu3Config.from_pretrained(str(checkpoint), local_files_only=True)
        with torch.device("meta"):
            hf = Emu3ForConditionalGeneration(cfg)
        step = sum(p.numel() for n, p in hf.named_parameters() if n.startswith(("model.text_model.", "lm_head.")))
        vq = hf.model.vqmodel
        dec = sum(p.numel() for n, p in vq.named_parameters() if not n.startswith(("encoder.", "quant_conv.")))
        vc, text = cfg.vq_config, cfg.text_config
        top = len(vc.channel_multiplier) - 1  # level i works at (side * 2^(top - i)) pixels per side
        peak = max(vc.base_channels * m * (side * 2 ** (top - i)) ** 2 for i, m in enumerate(vc.channel_multiplier))
        peak *= vc.temporal_downsample_factor  # the decoder upsamples one latent frame to this many
        n_tokens = side * (side + 1)
        heads = text.num_attention_heads
        return StepShape(name=f"{cname} ({side}x{side} tokens, {side * 8} px)", n_layer=text.num_hidden_layers, n_head=heads,
                         n_kv_head=text.num_key_value_heads, head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
                         dim=text.hidden_size, intermediate=text.intermediate_size, logits_width=text.vocab_size,
                         s_max=s_max_for(opts.prompt_slots, n_tokens, 15), step_params=step, decoder_params=dec,
                         decoder_peak_elems=peak)


CATALOG = Emu3Catalog()
