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
* `emu3-gen`: Emu3 (Emu3-Gen) through transformers' model definition, the same way; the grid's
  end-of-line tokens are forced by the step graph (models/emu3.py).
* `par-XL-4x`, `par-XXL-4x`, `par-3B-4x`, `par-3B-16x`: PAR (Epiphqny/PAR) checkpoints, LlamaGen's layout plus
  `spe_tok_embeddings`; `demo-par` is shipped.
* `lpd-{l,xl,xxl}-256`, `lpd-{l,xl}-512`: LPD (mit-han-lab/lpd) checkpoints (`model` entry of lpd_*.pth).
* `randar-L`, `randar-XL`: RandAR (ziqipang/RandAR) safetensors, LlamaGen's layout plus `pos_instruct_embeddings`.
* `nar-{B,M,L,XL,XXL}`: NAR (ThisisBillhe/NAR) checkpoints, LlamaGen's layout with the extra block(s) plus
  `medusa_norm`/`medusa_output`.
* `demo`, `demo-draft`, `demo-arpg`, `demo-var`, `demo-var-small`: the digits models shipped inside the
  package (weights committed; the VAR demos decode with their own multi-scale VQVAE, demo-var-vae).
* `demo-t2i`: a text-conditional LlamaGen on the digits with its own small prompt encoder and
  tokenizer.json (models/demo_text.py), also shipped: prompts work with no download.
Each family's names, aliases and configs come from its catalog (models/catalog.py, one per model
module, listed in CATALOGS). Overrides (`n_layer=2,dim=256`) build custom configs from any name, e.g. a B-shaped model with
fewer layers for tests.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

import torch

from arexport.errors import ArexportError, CheckpointError
from arexport.families import get_family
from arexport.format.spec import ModelSpec
from arexport.models import arpg, emu3, janus, llamagen, lpd, lumina_mgpt, nar, par, randar, rar, var
from arexport.models.catalog import Catalog, LoadedModel, with_overrides
from arexport.models.checkpoint import file_sha256, load_into, read_state_dict
from arexport.models.llamagen import LLAMAGEN_SIZES
from arexport.models.var import VARConfig

__all__ = ["CATALOGS", "LLAMAGEN_SIZES", "LoadedModel", "canonical_name", "known_models", "load_model", "model_config",
           "parse_overrides"]

WEIGHTS_DIR = Path(__file__).parent / "weights"

# One catalog per family, each in its family's model module: names, aliases, configs, checkpoint markers.
CATALOGS: tuple[Catalog, ...] = (llamagen.CATALOG, arpg.CATALOG, rar.CATALOG, var.CATALOG, janus.CATALOG,
                                  emu3.CATALOG, lumina_mgpt.CATALOG, par.CATALOG, randar.CATALOG, lpd.CATALOG,
                                  nar.CATALOG)

DEMO_MODELS = {
    "demo": "demo.safetensors",
    "demo-draft": "demo-draft.safetensors",
    "demo-arpg": "demo-arpg.safetensors",
    "demo-var": "demo-var.safetensors",
    "demo-var-small": "demo-var-small.safetensors",
    "demo-t2i": "demo-t2i.safetensors",
    "demo-par": "demo-par.safetensors",
}
# demo models that carry their own prompt encoder: (weights, tokenizer.json) in WEIGHTS_DIR
DEMO_TEXT_ENCODERS = {"demo-t2i": ("demo-t2i-text.safetensors", "demo-t2i-tokenizer.json")}
DEMO_VAR_VAE = "demo-var-vae.safetensors"  # the VAR demos' multi-scale VQVAE


DEMO_CFG_SCALE = 1.5
DEMO_ARPG_CFG_SCALE = 3.0


def catalog_of(family: str) -> Catalog:
    """The catalog of a family with PyTorch models here."""
    for c in CATALOGS:
        if c.family == family:
            return c
    raise ArexportError(f"no PyTorch models of the {family!r} family here; known: {', '.join(c.family for c in CATALOGS)}")


def _resolve(name: str) -> tuple[str, Optional[Catalog]]:
    """(canonical name, its catalog; None for the packaged demos); raise on unknown names."""
    n = name.strip()
    if n in DEMO_MODELS:
        return n, None
    for c in CATALOGS:
        cname = c.canonical(n)
        if cname is not None:
            return cname, c
    aliases = "; ".join(c.alias_help for c in CATALOGS if c.alias_help)
    raise ArexportError(f"unknown model name {name!r}; known: {', '.join(known_models())}; aliases: {aliases}")


def canonical_name(name: str) -> str:
    """Resolve aliases (GPT-B, c2i-B, B, rar_b, ...) to canonical names through the family catalogs; raise on unknown names."""
    return _resolve(name)[0]


def known_models() -> list[str]:
    """Every canonical model name."""
    return list(DEMO_MODELS) + [n for c in CATALOGS for n in c.names()]


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
    """The config of a model name (its family's config class), with overrides and image size."""
    name, catalog = _resolve(name)
    if catalog is not None:
        return catalog.config(name, overrides, image_size)
    return with_overrides(demo_config(name), overrides)


def family_configs() -> dict[str, type]:
    """The config class of each family with PyTorch models here."""
    return {c.family: c.config_class for c in CATALOGS}


def checkpoint_family(sd: dict) -> Optional[str]:
    """The family whose parameter names a state dict holds (None when no marker matches)."""
    held = [c for c in CATALOGS if c.checkpoint_marker and any(k.startswith(c.checkpoint_marker) for k in sd)]
    refined = {c.refines for c in held if c.refines}  # a family whose checkpoints hold another's names (PAR: LlamaGen's)
    held = [c for c in held if c.family not in refined]
    return held[0].family if held else None


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
    cname, catalog = _resolve(name)
    if catalog is not None and catalog.load is not None:  # a family that loads its own way (a transformers directory)
        return catalog.load(cname, checkpoint, random_init, overrides, vq_checkpoint, dtype, device)
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
            hint = catalog_of(held).hint
            raise ArexportError(f"{checkpoint} holds a {held} model, not a {family} one ({cname}): pass --model {hint}")
        trained = meta.get("args", {}).get("gpt_model")  # reference trainers record the model they trained
        if isinstance(trained, str):
            try:
                known = canonical_name(trained)
            except ArexportError:
                known = None
            # a name of another family says nothing here (PAR's trainer records LlamaGen's GPT-XL)
            if known is not None and known != cname and _resolve(known)[1].family == family:
                raise ArexportError(f"{checkpoint} holds a {trained} model (trained as --gpt-model {trained}), "
                                    f"not {cname}: pass --model {known}")
        if catalog is not None:
            catalog.check_trained(cname, cfg, meta.get("args", {}), checkpoint)
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
            "overflow": "error", "source": f"packaged:{weights.name}"}  # no build-machine path in manifests


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


def load_draft_head(source: str, **options):
    """An EAGLE draft head (models.eagle.load_eagle_head): a packaged name, a drafter directory or a file."""
    from arexport.models.eagle import load_eagle_head

    return load_eagle_head(source, **options)
