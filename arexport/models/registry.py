"""Model names -> configs, weights and image decoders.

Names:
* `llamagen-c2i-{B,L,XL,XXL,XXXL,1B,3B,7B}` and `llamagen-t2i-{...}` (every published LlamaGen
  size; aliases `GPT-B`, `c2i-B`, `t2i-XL`, ...). Weights come from `--checkpoint` or
  `--random-init`; images need `--vq-checkpoint` (or random VQ weights with `--random-init`).
* `arpg-{L,XL,XXL}`: ARPG (random-order parallel decoding), same weight options.
* `rar-{b,l,xl,xxl}`: RAR (bytedance/1d-tokenizer) with the MaskGIT-VQGAN tokenizer (`--vq-checkpoint
  maskgit-vqgan-imagenet-f16-256.bin`); `rar_b` etc. are aliases.
* `var-d16`, `var-d20`, `var-d24`, `var-d30` (256 px) and `var-d36` (512 px): VAR next-scale models
  (`--checkpoint var_d16.pth`) with the multi-scale VQVAE (`--vq-checkpoint vae_ch160v4096z32.pth`).
* `janus-pro`: Janus-Pro (any size its config describes) through transformers' model definition,
  from a local save_pretrained directory (`--checkpoint DIR`: config, weights, tokenizer.json); prompts.
* `demo`, `demo-draft`, `demo-arpg`, `demo-var`, `demo-var-small`: the digits models shipped inside the
  package (weights committed; the VAR demos decode with their own multi-scale VQVAE, demo-var-vae).
* `demo-t2i`: a text-conditional LlamaGen on the digits with its own small prompt encoder and
  tokenizer.json (models/demo_text.py), also shipped: prompts work with no download.
Overrides (`n_layer=2,dim=256`) build custom configs from any name, e.g. a B-shaped model with
fewer layers for tests.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import torch

from arexport.errors import ArexportError, CheckpointError
from arexport.models.checkpoint import file_sha256, load_into, read_state_dict
from arexport.models.llamagen import LlamaGenConfig
from arexport.models.rar import RARConfig
from arexport.models.var import VAR_256, VAR_512, VARConfig
from arexport.families import get_family
from arexport.format.spec import ModelSpec

WEIGHTS_DIR = Path(__file__).parent / "weights"

# (n_layer, n_head, dim) from LlamaGen's GPT configs.
LLAMAGEN_SIZES = {
    "B": (12, 12, 768),
    "L": (24, 16, 1024),
    "XL": (36, 20, 1280),
    "XXL": (48, 24, 1536),
    "XXXL": (48, 40, 2560),
    "1B": (22, 32, 2048),
    "3B": (24, 32, 3200),
    "7B": (32, 32, 4096),
}

# (n_layer, n_head, dim) from ARPG's configs.
ARPG_SIZES = {"L": (24, 16, 1024), "XL": (36, 20, 1280), "XXL": (48, 24, 1536)}

# RAR sizes (num_hidden_layers, hidden_size, intermediate_size; 16 heads) and the sampler each
# was evaluated with (randomize_temperature, guidance_scale, guidance_scale_pow), from README_RAR.md.
RAR_SIZES = {"b": (24, 768, 3072), "l": (24, 1024, 4096), "xl": (32, 1280, 5120), "xxl": (40, 1408, 6144)}
RAR_SAMPLERS = {"b": (1.0, 16.0, 2.75), "l": (1.02, 15.5, 2.5), "xl": (1.02, 6.9, 1.5), "xxl": (1.02, 8.0, 1.2)}

# Parameter names only one family's checkpoints hold: a checkpoint names its own family.
FAMILY_MARKERS = {"rar": "timesteps_embeddings", "arpg": "layers.cross_dec.", "llamagen": "tok_embeddings.weight",
                  "var": "lvl_embed."}
FAMILY_HINTS = {"rar": "rar-b|rar-l|rar-xl|rar-xxl", "arpg": "arpg-L|arpg-XL|arpg-XXL",
                "var": "var-d16|var-d20|var-d24|var-d30|var-d36", "llamagen": "llamagen-c2i-<size>"}

# VAR depths released (var_d16.pth ...): 256 px, except d36 (512 px, shared AdaLN)
VAR_DEPTHS = (16, 20, 24, 30, 36)

DEMO_MODELS = {
    "demo": "demo.safetensors",
    "demo-draft": "demo-draft.safetensors",
    "demo-arpg": "demo-arpg.safetensors",
    "demo-var": "demo-var.safetensors",
    "demo-var-small": "demo-var-small.safetensors",
    "demo-t2i": "demo-t2i.safetensors",
}
# demo models that carry their own prompt encoder: (weights, tokenizer.json) in WEIGHTS_DIR
DEMO_TEXT_ENCODERS = {"demo-t2i": ("demo-t2i-text.safetensors", "demo-t2i-tokenizer.json")}
DEMO_VAR_VAE = "demo-var-vae.safetensors"  # the VAR demos' multi-scale VQVAE


DEMO_CFG_SCALE = 1.5
DEMO_ARPG_CFG_SCALE = 3.0


@dataclass(frozen=True)
class JanusOptions:
    """What a Janus checkpoint's config does not say: the prompt slots an engine reserves."""

    prompt_slots: int = 128  # prompt tokens (chat template and image-start token included)


@dataclass
class LoadedModel:
    """A ready PyTorch model with its spec, image decoder and where its weights came from."""

    name: str
    model: torch.nn.Module
    spec: ModelSpec
    decoder: Optional[torch.nn.Module]
    source: dict[str, Any]
    prompter: Optional[dict] = None  # {'files': {name: path or text}, 'info': {...}}: a chat model's prompt assets
    # a packaged prompt encoder with T5EncoderModel's interface: {'module', 'tokenizer' (path), 'max_length',
    # 'pad_id', 'overflow' ('error': a prompt over max_length is refused), 'source'}
    text_encoder: Optional[dict] = None


def canonical_name(name: str) -> str:
    """Resolve aliases (GPT-B, c2i-B, B) to `llamagen-<type>-<size>`; raise on unknown names."""
    n = name.strip()
    if n in DEMO_MODELS:
        return n
    low = n.lower()
    if low.replace("_", "-").startswith("rar-") and low[4:] in RAR_SIZES:
        return f"rar-{low[4:]}"
    v = low.replace("_", "-")
    if v in ("janus", "janus-pro", "janus-pro-1b", "janus-pro-7b"):
        return "janus-pro"
    if v.startswith("var-d") and v[5:].isdigit() and int(v[5:]) in VAR_DEPTHS:
        return f"var-d{int(v[5:])}"
    if low.startswith("arpg-") and n[5:].upper() in ARPG_SIZES:
        return f"arpg-{n[5:].upper()}"
    for prefix, mtype in (("gpt-", "c2i"), ("llamagen-c2i-", "c2i"), ("llamagen-t2i-", "t2i"), ("c2i-", "c2i"), ("t2i-", "t2i")):
        if low.startswith(prefix):
            size = n[len(prefix):].upper()
            if size in LLAMAGEN_SIZES:
                return f"llamagen-{mtype}-{size}"
    raise ArexportError(f"unknown model name {name!r}; known: {', '.join(known_models())}")


def known_models() -> list[str]:
    """Every canonical model name."""
    names = list(DEMO_MODELS)
    names += [f"llamagen-c2i-{s}" for s in LLAMAGEN_SIZES] + [f"llamagen-t2i-{s}" for s in LLAMAGEN_SIZES]
    names += [f"arpg-{s}" for s in ARPG_SIZES] + [f"rar-{s}" for s in RAR_SIZES] + [f"var-d{d}" for d in VAR_DEPTHS]
    names += ["janus-pro"]
    return names


def parse_overrides(text: Optional[str]) -> dict[str, Any]:
    """`n_layer=2,dim=256,n_kv_head=4` -> typed dict of config fields (of any family's config; tuples as
    `patch_nums=1/2/4/8`, booleans as true/false)."""
    if not text:
        return {}
    types = {}
    for config_class in family_configs().values():
        types.update({f.name: f.type for f in fields(config_class)})
    out: dict[str, Any] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ArexportError(f"bad model override {item!r}: expected KEY=VALUE")
        k, v = (s.strip() for s in item.split("=", 1))
        if k not in types or k == "extra":
            raise ArexportError(f"unknown model config field {k!r}; fields: {', '.join(t for t in types if t != 'extra')}")
        t = str(types[k])
        try:
            if "tuple" in t:  # patch_nums=1/2/4/8
                out[k] = tuple(int(x) for x in v.split("/"))
            elif "bool" in t:
                if v.lower() not in ("true", "false"):
                    raise ValueError
                out[k] = v.lower() == "true"
            elif "int" in t and "float" not in t:
                out[k] = None if v.lower() == "none" else int(v)
            elif "float" in t:
                out[k] = None if v.lower() == "none" else float(v)
            else:
                out[k] = v
        except ValueError:
            raise ArexportError(f"bad value for model config field {k}: {v!r}") from None
    return out


def model_config(name: str, overrides: Optional[dict] = None, image_size: Optional[int] = None):
    """The config (LlamaGenConfig or ARPGConfig) for a model name, with overrides and image size."""
    name = canonical_name(name)
    if name.startswith("var-"):
        depth = int(name[5:])
        native = 512 if depth == 36 else 256
        if image_size not in (None, native):
            raise ArexportError(f"{name} generates {native} px images (its released patch_nums); --image-size {image_size} does not apply")
        # width and heads follow an overridden depth (64 x depth, depth heads) unless given too
        kw = {"depth": depth, "patch_nums": VAR_512 if depth == 36 else VAR_256, "shared_aln": depth == 36, **(overrides or {})}
        try:
            return VARConfig(**kw)
        except (ValueError, TypeError) as e:
            raise ArexportError(f"invalid model config: {e}") from None
    if image_size is not None and image_size % 16 and name not in DEMO_MODELS:
        raise ArexportError(f"image size {image_size} is not a multiple of 16 (the VQ-16 downsampling)")
    if name in DEMO_MODELS:
        cfg = demo_config(name)
    elif name.startswith("rar-"):
        size = name[4:]
        n_layer, dim, ffn = RAR_SIZES[size]
        temperature, g, power = RAR_SAMPLERS[size]
        sampler = {"cfg_scale": g, "cfg_schedule": "cosine", "cfg_power": power, "temperature": temperature,
                   "top_k": 0, "top_p": 1.0}
        cfg = RARConfig(dim=dim, n_layer=n_layer, n_head=16, intermediate_size=ffn,
                        grid_size=(image_size or 256) // 16, extra={"sampling_defaults": sampler})
    elif name.startswith("arpg-"):
        from arexport.models.arpg import ARPGConfig

        n_layer, n_head, dim = ARPG_SIZES[name.split("-")[1]]
        cfg = ARPGConfig(dim=dim, n_layer=n_layer, n_head=n_head, grid_size=(image_size or 256) // 16)
    else:
        _, mtype, size = name.split("-")
        n_layer, n_head, dim = LLAMAGEN_SIZES[size]
        kw: dict[str, Any] = dict(n_layer=n_layer, n_head=n_head, dim=dim, model_type=mtype)
        if mtype == "t2i":
            kw["cls_token_num"] = 120
        if image_size is not None:
            kw["grid_size"] = image_size // 16
        cfg = LlamaGenConfig(**kw)
    if overrides:
        try:
            cfg = cfg.with_overrides(**overrides)
        except (ValueError, TypeError) as e:
            raise ArexportError(f"invalid model config: {e}") from None
    return cfg


def family_configs() -> dict[str, type]:
    """The config class of each family with PyTorch models here."""
    from arexport.models.arpg import ARPGConfig

    return {"llamagen": LlamaGenConfig, "arpg": ARPGConfig, "rar": RARConfig, "var": VARConfig, "janus": JanusOptions}


def checkpoint_family(sd: dict) -> Optional[str]:
    """The family whose parameter names a state dict holds (None when no marker matches)."""
    for family, marker in FAMILY_MARKERS.items():
        if any(k.startswith(marker) for k in sd):
            return family
    return None


def demo_config(name: str):
    """Config stored in the committed demo weights' metadata (LlamaGen or ARPG)."""
    path = WEIGHTS_DIR / DEMO_MODELS[name]
    if not path.exists():
        raise ArexportError(f"demo weights missing from the package: {path} (run scripts/train_demo.py)")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ArexportError(f"{path} has no config metadata")
    configs = family_configs()
    family = meta.get("family", "llamagen")
    if family not in configs:
        raise ArexportError(f"{path} holds a {family!r} model; known families: {', '.join(configs)}")
    return configs[family](**json.loads(meta["config"]))


def load_model(
    name: str,
    checkpoint: Optional[str] = None,
    random_init: bool = False,
    seed: int = 0,
    overrides: Optional[dict] = None,
    image_size: Optional[int] = None,
    vq_checkpoint: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Build a model by name and fill its weights from a checkpoint, the package, or a seed."""
    cname = canonical_name(name)
    if cname == "janus-pro":
        return load_janus(cname, checkpoint, random_init, overrides, vq_checkpoint, dtype, device)
    for path, what in ((checkpoint, "checkpoint"), (vq_checkpoint, "tokenizer checkpoint")):
        if path is not None and not Path(path).is_file():  # before building (and allocating) the model
            raise CheckpointError(f"{what} not found: {path}" if not Path(path).exists() else
                                  f"{what} path is a directory, expected a file: {path}")
    cfg = model_config(cname, overrides, image_size)
    model = cfg.build()
    source: dict[str, Any] = {"model": cname, "overrides": dict(overrides or {}), "image_size": image_size}
    if checkpoint is not None and random_init:
        raise ArexportError("give either --checkpoint or --random-init, not both")
    if checkpoint is not None:
        meta: dict = {}
        sd = read_state_dict(checkpoint, meta=meta)
        held = checkpoint_family(sd)
        family = cfg.spec(cname).family
        if held is not None and held != family:
            hint = FAMILY_HINTS.get(held, "llamagen-c2i-<size>")
            raise ArexportError(f"{checkpoint} holds a {held} model, not a {family} one ({cname}): pass --model {hint}")
        trained = meta.get("args", {}).get("gpt_model")  # reference trainers record the model they trained
        if isinstance(trained, str):
            try:
                known = canonical_name(trained)
            except ArexportError:
                known = None
            if known is not None and known != cname:
                raise ArexportError(f"{checkpoint} holds a {trained} model (trained as --gpt-model {trained}), "
                                    f"not {cname}: pass --model {known}")
        load_into(model, sd, source=str(checkpoint))
        source.update(checkpoint=str(Path(checkpoint).resolve()), checkpoint_sha256=file_sha256(checkpoint))
    elif random_init:
        model.init_random(seed)
        source.update(random_init_seed=seed)
    elif cname in DEMO_MODELS and not overrides:
        path = WEIGHTS_DIR / DEMO_MODELS[cname]
        load_into(model, read_state_dict(path), source=str(path))
        source.update(packaged=DEMO_MODELS[cname])
    else:
        raise ArexportError(f"model {cname} needs weights: pass --checkpoint PATH or --random-init")
    model = model.to_precision(device=device, dtype=dtype).eval()  # models keep their fp32 tables fp32
    spec = cfg.spec(cname, image_size)
    step_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith(model.STEP_WEIGHTS))
    spec = dataclasses.replace(spec, extra={**spec.extra, "sampling_defaults": sampling_defaults(cname, spec),
                                            "step_weight_params": int(step_params)})
    decoder = image_decoder(spec, random_init=random_init, seed=seed, vq_checkpoint=vq_checkpoint, config=cfg)
    if decoder is not None:
        decoder = decoder.to(device).eval()
    if vq_checkpoint:
        source.update(vq_checkpoint=str(Path(vq_checkpoint).resolve()), vq_checkpoint_sha256=file_sha256(vq_checkpoint))
    return LoadedModel(cname, model, spec, decoder, source, text_encoder=demo_text_encoder(cname, spec, device))


def demo_text_encoder(name: str, spec: ModelSpec, device) -> Optional[dict]:
    """The packaged prompt encoder of a demo t2i model (LoadedModel.text_encoder), or None."""
    if name not in DEMO_TEXT_ENCODERS:
        return None
    from arexport.models.demo_text import load_text_encoder

    weights, tokenizer = (WEIGHTS_DIR / f for f in DEMO_TEXT_ENCODERS[name])
    module = load_text_encoder(weights, tokenizer)
    if (module.cfg.max_length, module.cfg.dim) != (spec.cond_len, spec.caption_dim):
        raise ArexportError(f"{weights} gives [{module.cfg.max_length}, {module.cfg.dim}] caption features; {name} takes "
                            f"[{spec.cond_len}, {spec.caption_dim}] (a --model-config override does not apply to the prompt encoder)")
    return {"module": module.to(device), "tokenizer": tokenizer, "max_length": module.cfg.max_length, "pad_id": 0,
            "overflow": "error", "source": str(weights)}


def sampling_defaults(name: str, spec: ModelSpec) -> dict[str, Any]:
    """Per-model sampler defaults: the digits demo uses the settings its accuracy was measured with;
    every other model its family's reference demo settings (the family adapter says which)."""
    if "sampling_defaults" in spec.extra:  # the model config's own (RAR: per size)
        return dict(spec.extra["sampling_defaults"])
    if name in DEMO_MODELS:
        if name == "demo-arpg":  # constant guidance and T 0.7: the demo's best accuracy at 16 and 64 steps (docs/benchmarks.md)
            return {"cfg_scale": DEMO_ARPG_CFG_SCALE, "top_k": 0, "top_p": 1.0, "temperature": 0.7, "cfg_schedule": "constant"}
        return {"cfg_scale": DEMO_CFG_SCALE, "top_k": 0, "top_p": 1.0, "temperature": 1.0}
    return get_family(spec.family).sampling_defaults(spec)


def image_decoder(spec: ModelSpec, random_init: bool = False, seed: int = 0, vq_checkpoint: Optional[str] = None,
                  config=None):
    """The torch module turning tokens into uint8 images, or None when no VQ weights were given."""
    if spec.image.kind == "var":
        from arexport.models.var import VARVQVAE

        if vq_checkpoint:
            return load_var_vae(vq_checkpoint, config)
        if random_init:
            return VARVQVAE(config).init_random(seed + 1)
        if spec.name in DEMO_MODELS:
            vae = VARVQVAE(config)
            load_into(vae, read_state_dict(WEIGHTS_DIR / DEMO_VAR_VAE), source=str(WEIGHTS_DIR / DEMO_VAR_VAE))
            return vae
        return None
    if spec.image.kind == "digits":
        from arexport.models.digits import DigitsDecoder

        return DigitsDecoder(scale=spec.image.image_size // spec.grid_size)
    if spec.image.kind == "maskgit":
        from arexport.models.maskgit_vq import MaskGITDecoder, MaskGITVQConfig, load_maskgit_decoder

        mcfg = MaskGITVQConfig(codebook_size=spec.vocab_size)
        if vq_checkpoint:
            return load_maskgit_decoder(vq_checkpoint, mcfg)
        return MaskGITDecoder(mcfg).init_random(seed + 1) if random_init else None
    from arexport.models.vq import VQConfig, VQDecoder, load_vq_decoder

    cfg = VQConfig(codebook_size=spec.vocab_size)
    if vq_checkpoint:
        return load_vq_decoder(vq_checkpoint, cfg)
    if random_init:
        return VQDecoder(cfg).init_random(seed + 1)
    return None


def load_var_vae(path: str, cfg: VARConfig):
    """The multi-scale VQVAE of `vae_ch160v4096z32.pth` (a plain state dict), checked against cfg."""
    from arexport.models.var import VARVQVAE

    sd = read_state_dict(path)
    if "quantize.embedding.weight" not in sd or not any(k.startswith("quantize.quant_resi.") for k in sd):
        kind = ("a LlamaGen VQ-16 tokenizer" if any(k.startswith("decoder.conv_blocks.") for k in sd) else
                "a VAR transformer, not its VQVAE" if any(k.startswith("lvl_embed.") for k in sd) else
                "not a VAR multi-scale VQVAE")
        raise CheckpointError(f"{path} is {kind}: VAR decodes with vae_ch160v4096z32.pth (quantize.quant_resi.* + decoder.*)")
    have = tuple(sd["quantize.embedding.weight"].shape)
    if have != (cfg.vocab_size, cfg.cvae):
        raise CheckpointError(f"{path} holds a VQVAE with a {have[0]} x {have[1]} codebook; the model needs "
                              f"{cfg.vocab_size} x {cfg.cvae} (vocab x Cvae)")
    vae = VARVQVAE(cfg)
    load_into(vae, sd, source=str(path))
    return vae.eval()


def load_janus(cname: str, checkpoint, random_init: bool, overrides, vq_checkpoint, dtype, device) -> LoadedModel:
    """Janus-Pro from a save_pretrained directory: the step model, its VQ decoder and spec."""
    from arexport.models.janus import (JanusImageDecoder, JanusImageModel, janus_spec, load_hf_janus, pixel_mapping, prompter_assets,
                                       special_ids)

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
    from tokenizers import Tokenizer

    boi = Tokenizer.from_file(str(Path(checkpoint) / "tokenizer.json")).id_to_token(ids["boi_token_id"])
    assets = prompter_assets(checkpoint, slots, ids["pad_token_id"], boi)
    decoder = JanusImageDecoder(hf, pixel_mapping(checkpoint)).to(device).eval()
    return LoadedModel(cname, model, spec, decoder, source, prompter=assets)
