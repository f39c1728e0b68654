"""Lumina-mGPT 1.0 image generation through transformers' Chameleon modules, driven as the official
repository drives its generate (Alpha-VLLM/Lumina-mGPT 104abe4, lumina_mgpt/inference_solver.py and
generate_examples/generate.py).

Official flow: the prompt is BOS + 'Generate an image of {W}x{H} according to the following
prompt:\\n{caption}' + the turn separator `<reserved08706>`; the model then writes the image-start
token `<racm3:break>`, two resolution tokens `<reserved{8800 + n}>` (n = pixels / 32 per side), and
h = 2n rows of w = 2n image tokens each closed by the new-line token `<reserved08799>`, then `<eoss>`.
Guidance starts after the resolution tokens, on raw logits u + s (c - u), with the unconditional
context [image-start, h token, w token] alone; image tokens are the only ones allowed inside a row,
the new-line token alone at its end.

Here the image-start and resolution tokens close the prompt (the engine's size is fixed), so the
first generated token is the first image token; everything after is the official loop. The step
model is Emu3's (models/emu3.py: codebook ids [0, V), EOL = V, text V + 1 + t; the constraint in the
graph) over Chameleon's layers (q/k LayerNorm per head). transformers' ChameleonForConditionalGeneration
masks every image token out of its logits (text generation only), so the head is applied to the
language model's hidden states here directly, as the official fork does with mask_image_logits off.
Images: transformers ships only the VQGAN's encoder; the decoder is models/chameleon_vq.py, read from
the released `vqgan.ckpt` (Chameleon's tokenizer/vqgan.ckpt, which the official code loads): given by
--vq-checkpoint, or found as vqgan.ckpt in the checkpoint directory. Without one, tokens generate and
decoding refuses, naming the file to pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from arexport.errors import ArexportError, CheckpointError
from arexport.hf import load_safetensors_model
from arexport.format.spec import ImageSpec, ModelSpec, s_max_for
from arexport.models.catalog import Catalog
from arexport.models.chameleon_vq import ChameleonVQConfig, ChameleonVQDecoder, load_chameleon_vqgan
from arexport.models.hf_static import static_cache_layers
from arexport.models.emu3 import Emu3ImageModel

SEP_TOKEN = "<reserved08706>"
IMAGE_START = "<racm3:break>"
NEW_LINE = "<reserved08799>"
TEMPLATE = "Generate an image of {w}x{h} according to the following prompt:\n"  # generate.py l.57
SIZES = {"lumina-mgpt-7b-512": 512, "lumina-mgpt-7b-768": 768, "lumina-mgpt-7b-1024": 1024}


def grid_token(n: int) -> str:
    """The resolution token of n grids (item_processor.py get_n_grids_token)."""
    return f"<reserved{8800 + n:05d}>"


def load_hf_chameleon(directory: str | Path):
    return load_safetensors_model(directory, "chameleon", "ChameleonForConditionalGeneration", "Lumina-mGPT")


class ChameleonVocab:
    """hf.model.vocabulary_mapping under the name Emu3ImageModel reads (img2bpe)."""

    def __init__(self, mapping):
        self.img2bpe = mapping.img2bpe


def _normed_qk(attn, x, b, q, hd):
    """Chameleon's q/k projections, each normalised per head (q_norm / k_norm) before the rotation."""
    qh = attn.q_norm(attn.q_proj(x).reshape(-1, attn.num_heads, hd)).reshape(b, q, -1, hd).transpose(1, 2)
    kh = attn.k_norm(attn.k_proj(x).reshape(-1, attn.num_key_value_heads, hd)).reshape(b, q, -1, hd).transpose(1, 2)
    return qh, kh


class LuminaImageModel(Emu3ImageModel):
    """The Emu3 step over Chameleon's modules (see the module docstring)."""

    STEP_WEIGHTS = ("hf.model.layers.", "hf.model.norm.", "hf.model.embed_tokens.", "hf.lm_head.")

    def __init__(self, hf, cond_len: int, width: int, eol_bpe: int):
        nn.Module.__init__(self)
        self.hf, self.cond_len, self.width = hf, cond_len, width
        self.V = hf.config.vq_config.num_embeddings
        img2bpe = hf.model.vocabulary_mapping.img2bpe
        if any(i not in img2bpe for i in range(self.V)):
            raise CheckpointError(f"the vocabulary_map does not name all {self.V} image tokens (IMGIMG...)")
        self.register_buffer("bpe", torch.tensor([int(img2bpe[i]) for i in range(self.V)] + [eol_bpe], dtype=torch.int64),
                             persistent=False)
        if hf.config.swin_norm:
            raise CheckpointError("a swin_norm Chameleon (the 30B layout) is not supported; Lumina-mGPT 7B has swin_norm off")

    def step(self, tokens, positions, write_index, attn_mask, keys, values, cache_write=None):
        """logits [B,q,V+1] fp32 (image tokens and the new-line token, constrained) and the caches."""
        from transformers.models.chameleon.modeling_chameleon import apply_rotary_pos_emb

        if cache_write is None:
            from arexport.models.llamagen import inplace_cache_write as cache_write
        m = self.hf.model
        h = m.embed_tokens(self.bpe_ids(tokens))
        n_valid = attn_mask[:, 0, -1, :self.cond_len].sum(-1, keepdim=True)
        cos, sin = m.rotary_emb(h, positions + n_valid)
        h, new_keys, new_values = static_cache_layers(m.layers, h, cos, sin, keys, values, write_index, attn_mask,
                                                     cache_write, apply_rotary_pos_emb, project_qk=_normed_qk)
        logits = self.hf.lm_head(m.norm(h)).float().index_select(-1, self.bpe)
        return self.constrain(logits, positions), new_keys, new_values


class NoChameleonDecoder(nn.Module):
    """The codebook (LANTERN / VVS neighbourhoods) when no vqgan.ckpt was given: decoding refuses, naming
    the file it needs (transformers' Chameleon checkpoint holds the VQGAN's encoder, not its decoder)."""

    def __init__(self, hf):
        super().__init__()
        self.quantize = hf.model.vqmodel.quantize

    not_exportable = ("the Chameleon VQGAN decoder is not in a transformers checkpoint: pass --vq-checkpoint "
                      "PATH/vqgan.ckpt (Chameleon's tokenizer/vqgan.ckpt)")

    def forward(self, tokens):
        raise ArexportError("Lumina-mGPT images need the Chameleon VQGAN decoder, which a transformers checkpoint does not "
                            "hold: pass --vq-checkpoint PATH/vqgan.ckpt (or put vqgan.ckpt in the checkpoint directory), "
                            "or generate tokens only (images off)")

    def codebook(self) -> torch.Tensor:
        w = self.quantize.embedding.weight
        return torch.cat([w, w.new_zeros(1, w.shape[1])])


@dataclass(frozen=True)
class LuminaOptions:
    prompt_slots: int = 128  # BOS, the instruction, the caption, separator, image start and resolution tokens
    image_px: int = 768  # pixels per side (the name's size unless overridden; a multiple of 32)


class LuminaCatalog(Catalog):
    """`lumina-mgpt-7b-{512,768,1024}`: Lumina-mGPT 1.0 from a transformers save_pretrained directory."""

    family = "lumina-mgpt"
    config_class = LuminaOptions
    hint = "lumina-mgpt-7b-768"
    alias_help = "lumina-mgpt for lumina-mgpt-7b-768"
    tokenizer_grid = None

    def names(self):
        return list(SIZES)

    def canonical(self, name):
        n = name.lower().replace("_", "-")
        if n in ("lumina-mgpt", "lumina-mgpt-7b"):
            return "lumina-mgpt-7b-768"
        return n if n in SIZES else None

    def config(self, name, overrides=None, image_size=None):
        raise ArexportError(f"{name}'s config comes from its checkpoint directory: load it with --checkpoint DIR")

    def load(self, cname, checkpoint, random_init, overrides, vq_checkpoint, dtype, device, seed=0, image_size=None):
        from tokenizers import Tokenizer

        from arexport.families import get_family
        from arexport.models.catalog import LoadedModel

        if random_init or checkpoint is None:
            raise ArexportError(f"{cname} loads a transformers save_pretrained directory: pass --checkpoint DIR")
        if image_size is not None:
            raise ArexportError(f"{cname}: the size is in the name (lumina-mgpt-7b-512|768|1024) or image_px; no --image-size")
        bad = set(overrides or {}) - {"prompt_slots", "image_px"}
        if bad:
            raise ArexportError(f"{cname} takes only prompt_slots and image_px as model overrides, not {', '.join(sorted(bad))}")
        slots = int((overrides or {}).get("prompt_slots", LuminaOptions().prompt_slots))
        if slots < 4:
            raise ArexportError(f"prompt_slots must be >= 4, got {slots}")
        px = int((overrides or {}).get("image_px", SIZES[cname]))
        if px % 32 or not 32 <= px <= 2048:
            raise ArexportError(f"image_px must be a multiple of 32 in [32, 2048] (the resolution tokens count 32 px), got {px}")
        grids = px // 32
        side = 2 * grids  # image tokens per side (16x VQGAN)
        hf = load_hf_chameleon(checkpoint)
        tok = Tokenizer.from_file(str(Path(checkpoint) / "tokenizer.json"))
        ids = {k: tok.token_to_id(t) for k, t in (("eol", NEW_LINE), ("sep", SEP_TOKEN), ("start", IMAGE_START),
                                                   ("grid", grid_token(grids)))}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise CheckpointError(f"{checkpoint}: the tokenizer lacks the Lumina-mGPT tokens {missing}")
        text = hf.config
        bos = text.bos_token_id
        bos_tok = tok.id_to_token(bos) if bos is not None else None
        if bos_tok is None:
            raise CheckpointError(f"{checkpoint}: the config names no bos_token_id")
        V = hf.config.vq_config.num_embeddings
        heads = text.num_attention_heads
        head_dim = text.hidden_size // heads
        n_tokens = side * (side + 1)
        vq_cfg = ChameleonVQConfig.from_hf(hf.config.vq_config)
        image_px = side * 2 ** (len(vq_cfg.channel_multiplier) - 1)  # 16 px a token with the released 5 levels
        spec = ModelSpec(
            name=cname, family="lumina-mgpt", model_type="t2i", vocab_size=V + 1, n_tokens=n_tokens, grid_size=side + 1,
            cond_len=slots, num_classes=0, caption_dim=0, n_layer=text.num_hidden_layers, n_head=heads,
            n_kv_head=text.num_key_value_heads, head_dim=head_dim, dim=text.hidden_size, n_cache_layers=text.num_hidden_layers,
            s_max=s_max_for(slots, n_tokens), image=ImageSpec("lumina-mgpt", side + 1, image_px, vq_cfg.embed_dim),
            extra={"bos_token_id": int(bos), "pad_token_id": int(text.pad_token_id if text.pad_token_id is not None else 1),
                   "eol_token_id": ids["eol"], "eol_id": V, "image_rows": side, "image_cols": side,
                   "text_vocab_size": text.vocab_size, "class_token_offset": V + 1})
        model = LuminaImageModel(hf, slots, side, ids["eol"]).to_precision(device=device, dtype=dtype).eval()
        step_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith(model.STEP_WEIGHTS))
        spec = dataclasses.replace(spec, extra={**spec.extra, "sampling_defaults": get_family("lumina-mgpt").sampling_defaults(spec),
                                                "step_weight_params": int(step_params)})
        header = IMAGE_START + grid_token(grids) * 2
        info = {"kind": "chat", "tokenizer": "tokenizer.json", "template": None, "slots": slots,
                "pad_id": spec.extra["pad_token_id"], "prefix": bos_tok + TEMPLATE.format(w=px, h=px),
                "prompt_suffix": SEP_TOKEN, "boi_token": header, "negative_prompt": "", "negative_prefix": "",
                "add_special_tokens": False, "special_tokens": {}}
        source = {"model": cname, "overrides": dict(overrides or {}), "image_size": None,
                  "checkpoint": str(Path(checkpoint).resolve())}
        vq_file = Path(vq_checkpoint) if vq_checkpoint is not None else Path(checkpoint) / "vqgan.ckpt"
        if vq_checkpoint is not None or vq_file.exists():
            decoder = load_chameleon_vqgan(str(vq_file), vq_cfg, side, side, codebook=hf.model.vqmodel.quantize.embedding.weight)
            source["vq_checkpoint"] = str(vq_file.resolve())
        else:
            decoder = NoChameleonDecoder(hf)
        return LoadedModel(cname, model, spec, decoder.to(device).eval(), source,
                           prompter={"files": {"tokenizer.json": Path(checkpoint) / "tokenizer.json"}, "info": info})


    def dry_run_shape(self, cname, checkpoint, overrides):
        """The StepShape (models.memory) of an engine of this checkpoint from its config.json alone."""
        from arexport.models.memory import StepShape

        if checkpoint is None or not (Path(checkpoint) / "config.json").exists():
            raise ArexportError(f"{cname} --dry-run reads the checkpoint's config.json: pass --checkpoint DIR holding one")
        from transformers import ChameleonConfig, ChameleonForConditionalGeneration

        slots = int((overrides or {}).get("prompt_slots", LuminaOptions().prompt_slots))
        px = int((overrides or {}).get("image_px", SIZES[cname]))
        side = 2 * (px // 32)
        cfg = ChameleonConfig.from_pretrained(str(checkpoint), local_files_only=True)
        cfg.vocabulary_map = cfg.vocabulary_map or {}  # not needed to count parameters
        with torch.device("meta"):
            hf = ChameleonForConditionalGeneration(cfg)
            dec = ChameleonVQDecoder(ChameleonVQConfig.from_hf(cfg.vq_config), side, side)
        step = sum(p.numel() for n, p in hf.named_parameters() if not n.startswith("model.vqmodel."))
        vqp = sum(p.numel() for p in dec.parameters())  # the VQGAN decoder (models/chameleon_vq.py)
        vc = cfg.vq_config
        top = len(vc.channel_multiplier) - 1
        peak = max(vc.base_channels * m * (side * 2 ** (top - i)) ** 2 for i, m in enumerate(vc.channel_multiplier))
        heads = cfg.num_attention_heads
        return StepShape(name=f"{cname} ({side}x{side} tokens, {px} px)", n_layer=cfg.num_hidden_layers, n_head=heads,
                         n_kv_head=cfg.num_key_value_heads, head_dim=cfg.hidden_size // heads, dim=cfg.hidden_size,
                         intermediate=cfg.intermediate_size, logits_width=cfg.vocab_size,
                         s_max=s_max_for(slots, side * (side + 1), 15), step_params=step, decoder_params=vqp,
                         decoder_peak_elems=peak)


CATALOG = LuminaCatalog()
