"""The `arexport` command line: generate, build, inspect, verify, profile, calibrate, serve."""

from __future__ import annotations

import sys
import time
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
                     "RAR and VAR release; a transformers save_pretrained directory for janus-pro)."),
        click.option("--random-init", is_flag=True, help="Random weights (latency work without checkpoints)."),
        click.option("--vq-checkpoint", type=click.Path(dir_okay=False), help="Image tokenizer checkpoint, for images (LlamaGen VQ-16; MaskGIT-VQGAN for RAR)."),
        click.option("--model-config", "model_config", metavar="K=V,...", help="Override config fields, e.g. n_layer=2,dim=256."),
        click.option("--image-size", type=int, help="Output size in pixels (LlamaGen: 256, 384, 512; grid = size/16)."),
        click.option("--init-seed", type=int, default=0, show_default=True, help="Seed of --random-init weights."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


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


def engine_or_model_options(default_backend: str):
    """ENGINE_DIR or --model plus its weights, and the backend/device that run it (profile, serve)."""
    def deco(f):
        opts = [
            click.argument("engine_dir", required=False, type=click.Path(file_okay=False)),
            click.option("--model", "model_name", help="Model name (torch backend) instead of ENGINE_DIR."),
            model_options,
            click.option("--backend", type=click.Choice(["torch", "ort", "trt"]), default=default_backend, show_default=True),
            click.option("--device", default="cpu", show_default=True),
            click.option("--threads", type=click.IntRange(min=1), help="CPU threads per engine call: torch intra-op "
                     "threads (default: 1 for models under 20M step weights, where more threads only contend; torch's "
                     "default otherwise), ONNX Runtime intra-op threads (default: ORT's)."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


def method_options(f):
    """One click option per declared method option that names a CLI flag (runtime.methods: each
    method's Options dataclass), with its type, choices and help; --option K=V sets any other."""
    import typing

    from arexport.runtime.methods import METHODS
    from arexport.runtime.methods.base import option_fields

    found: dict[str, list] = {}
    for mname in sorted(METHODS):
        for fld, typ in option_fields(METHODS[mname].Options):
            if fld.name in found:
                found[fld.name][3].append(mname)
            elif fld.metadata.get("flag"):
                found[fld.name] = [fld.metadata["flag"], typ, fld, [mname]]
    for name, (flag, typ, fld, users) in sorted(found.items(), reverse=True):
        base = [a for a in typing.get_args(typ) if a is not type(None)] or [typ]
        ctype = fld.metadata.get("choices") and click.Choice(list(fld.metadata["choices"])) or \
            {int: int, float: float}.get(base[0], str)
        default = fld.default if not isinstance(fld.default, tuple) else "/".join(map(str, fld.default))
        if base[0] is bool:  # a switch: given = True, absent = the method's default
            f = click.option(flag, name, is_flag=True, default=None, flag_value=True,
                             help=f"{'/'.join(users)}: {fld.metadata['help']}.")(f)
            continue
        f = click.option(flag, name, type=ctype, default=None,
                         help=f"{'/'.join(users)}: {fld.metadata['help']} (default {default}).")(f)
    return f


def _method_kwargs(values: dict) -> dict:
    """The method options a command was given (None = not given)."""
    from arexport.runtime.methods import METHODS
    from arexport.runtime.methods.base import option_fields

    names = {fld.name for cls in METHODS.values() for fld, _ in option_fields(cls.Options)}
    return {k: v for k, v in values.items() if k in names and v is not None}


def _model_kwargs(model_name, checkpoint, random_init, init_seed, model_config, image_size, vq_checkpoint, precision=None) -> dict:
    """Keyword arguments that load a model by name (empty for an engine directory)."""
    if not model_name:
        return {}
    from arexport.models.registry import parse_overrides

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
        return int(s)
    except ValueError:
        raise ArexportError(f"bad {what}: {s!r} is not an integer") from None


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

@cli.command()
@click.argument("engine_dir", required=False, type=click.Path(file_okay=False))
@click.option("--model", "model_name", help="Model name (torch backend), e.g. demo, llamagen-c2i-B, GPT-XL, arpg-L, rar-b.")
@model_options
@click.option("--classes", help="Class ids, comma separated; repeats allowed (3,3,7 or 3x4 for four 3s).")
@click.option("--caption-embeddings", type=click.Path(dir_okay=False), help="t2i: .npy [N,T,C] or .npz with 'embeds' and 'mask'.")
@prompt_options
@click.option("--method", help="Decoding method: ar, sjd, sd, lantern, vvs, arpg, gridar, best-of-n (default: ar; arpg for ARPG models).")
@click.option("--backend", type=click.Choice(["torch", "ort", "trt"]), default="torch", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads per engine call: torch intra-op "
                     "threads (default: 1 for models under 20M step weights, where more threads only contend; torch's "
                     "default otherwise), ONNX Runtime intra-op threads (default: ORT's).")
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
@click.option("--stats-json", type=click.Path(dir_okay=False), help="Write run statistics as JSON.")
@click.option("--progress/--no-progress", default=None,
              help="Progress (default on: a bar on a terminal, else a plain line to stderr every 5 s).")
def generate(engine_dir, model_name, checkpoint, random_init, vq_checkpoint, model_config, image_size, init_seed,
             classes, caption_embeddings, prompt_list, prompts_file, text_encoder, method, backend, device, threads, precision,
             cfg_scale, cfg_interval, cfg_schedule,
             cfg_power, top_k, top_p, temperature, seed, batch_size, draft, refiner, latency_profile, method_opts, save_tokens, out_dir, grid_png, stats_json, progress,
             **named_method_options):
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
    from arexport.runtime.sampling import default_sampling

    source = _source(engine_dir, model_name, "run")
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
    sampling = default_sampling(spec, temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                                cfg_interval=cfg_interval, cfg_schedule=cfg_schedule, cfg_power=cfg_power)
    captions, cmask = _load_captions(caption_embeddings)
    opts = parse_method_options(method_opts)
    opts.update(_method_kwargs(named_method_options))
    show = ("lines" if not sys.stderr.isatty() else True) if progress is None else progress
    need_images = bool(out_dir or grid_png)
    result = _run_with_progress(gen, show, dict(
        classes=_parse_classes(classes), captions=captions, caption_mask=cmask, prompts=prompts, method=method, method_options=opts,
        sampling=sampling, seed=seed, batch_size=batch_size, images=need_images))
    if save_tokens:
        atomic_save_npy(save_tokens, result.tokens.astype(np.int64))
    if out_dir:
        out = Path(out_dir)
        for i, img in enumerate(result.images):
            atomic_save_png(out / f"{i:04d}.png", img)
    if grid_png:
        atomic_save_png(grid_png, image_grid(result.images))
    stats = dict(result.stats, method=method, sampling=sampling.__dict__, model=spec.name, seed=seed)
    if stats_json:
        atomic_write_json(stats_json, stats)
    click.echo(
        f"{stats['images']} images in {stats['seconds']:.2f}s ({stats['seconds_per_image']:.3f}s/image), "
        + (f"{stats['drafter_forwards_per_image']:.1f} drafter + {stats['refiner_forwards_per_image']:.1f} refiner forwards per image"
           if "refiner_forwards_per_image" in stats else f"{stats['target_forwards_per_image']:.1f} target forwards per image"
           + (f", {stats['draft_forwards']} draft forwards" if stats.get("draft_forwards") else ""))
        + (f", mean accepted length {stats['mean_accepted_length']:.2f}" if "mean_accepted_length" in stats else "")
        + (f" -> {out_dir}" if out_dir else ""),
        err=True,
    )


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

    for flag, path, kind in outputs:
        if path:
            check_writable(path, kind, what=flag)


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
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Engine directory to write.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--batch-sizes", default="1,2,4,8", show_default=True, help="Engine batch sizes in rows (CFG: 2 rows per image).")
@click.option("--verify-len", type=int, help="Largest query length of the step (verify block K). Default 16; ARPG: all tokens.")
@click.option("--backend", type=click.Choice(["onnx", "trt"]), default="onnx", show_default=True, help="onnx: ONNX graphs; trt: also TensorRT plans.")
@click.option("--no-images", is_flag=True, help="Skip the VQ decoder graph.")
@click.option("--overwrite", is_flag=True, help="Replace an existing directory (only once the new one is complete).")
@click.option("--trt-opt-level", type=click.IntRange(0, 5), default=3, show_default=True, help="TensorRT builder optimization level.")
@click.option("--trt-timing-cache", type=click.Path(dir_okay=False), help="TensorRT timing cache file (read and updated).")
@click.option("--trt-workspace-gb", type=float, help="TensorRT workspace memory pool limit in GiB.")
@click.option("--lantern-k", type=int, default=1000, show_default=True, help="Codebook neighbours stored per token for LANTERN.")
@click.option("--text-encoder", type=click.Path(file_okay=False), help=TEXT_ENCODER_HELP + " Exported as text_encoder.onnx with its tokenizer.json.")
def build(model_name, checkpoint, random_init, vq_checkpoint, model_config, image_size, init_seed, out_dir, precision,
          batch_sizes, verify_len, backend, no_images, overwrite, trt_opt_level, trt_timing_cache, trt_workspace_gb,
          lantern_k, text_encoder):
    """Export MODEL_NAME's step functions into an engine directory (written atomically).

    \b
    Examples:
      arexport build demo --out engines/demo
      arexport build GPT-B --random-init --precision fp16 --batch-sizes 2,4 --verify-len 16 --out engines/b
      arexport build GPT-XL --checkpoint c2i_XL_384.pt --image-size 384 --backend trt --out engines/xl
    """
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.models.registry import load_model, parse_overrides

    opts = BuildOptions(precision=precision, batch_sizes=_int_list(batch_sizes, "--batch-sizes"), verify_len=verify_len,
                        backend=backend, images=not no_images, overwrite=overwrite, trt_opt_level=trt_opt_level,
                        trt_timing_cache=trt_timing_cache, trt_workspace_gb=trt_workspace_gb, lantern_k=lantern_k,
                        text_encoder=text_encoder).validate()
    if Path(out_dir).exists() and not overwrite:
        raise ArexportError(f"{out_dir} already exists (use --overwrite to replace it)")
    _check_outputs(("--out", out_dir, "dir"))
    if backend == "trt":
        from arexport.devices import require_tensorrt

        require_tensorrt()
    loaded = load_model(model_name, checkpoint=checkpoint, random_init=random_init, seed=init_seed,
                        overrides=parse_overrides(model_config), image_size=image_size, vq_checkpoint=vq_checkpoint)
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("building") as status:
        def report(msg):
            status.update(msg)
            console.log(msg)

        manifest = build_engine(loaded, out_dir, opts, report=report)
    _print_manifest(manifest.to_json(), console, brief=True)


@cli.command()
@click.argument("engine_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.")
@click.option("--check-hashes/--no-check-hashes", default=True, show_default=True, help="Verify file hashes too.")
def inspect(engine_dir, as_json, check_hashes):
    """Print an engine directory's manifest readably (and validate its files).

    \b
    Example:
      arexport inspect engines/demo
    """
    import json as _json

    from arexport.format.manifest import read_manifest, verify_files

    manifest = read_manifest(engine_dir)
    verify_files(engine_dir, manifest, check_hashes=check_hashes)
    if as_json:
        click.echo(_json.dumps(manifest.to_json(), indent=2, sort_keys=True))
        return
    from rich.console import Console

    _print_manifest(manifest.to_json(), Console(), brief=False)


def _print_manifest(m: dict, console, brief: bool) -> None:
    from rich.table import Table

    spec = m["spec"]
    console.print(f"[bold]{spec['name']}[/] ({spec['family']} {spec['model_type']}), precision {m['precision']}, "
                  f"format v{m['format_version']}, created {m.get('created', '?')}")
    layout = (f"scales {','.join(map(str, spec['extra']['patch_nums']))}" if "patch_nums" in spec.get("extra", {})
              else f"{spec['grid_size']}x{spec['grid_size']}")
    console.print(f"  layers {spec['n_layer']}, heads {spec['n_head']} (kv {spec['n_kv_head']}), dim {spec['dim']}, "
                  f"vocab {spec['vocab_size']}, {spec['n_tokens']} tokens ({layout}), "
                  f"condition {spec['cond_len']} token(s), S_max {spec['s_max']}")
    prof = m["profiles"]
    console.print(f"  batch sizes (rows) {prof['batch_sizes']}, step kinds {prof['step_kinds']}")
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
def verify(engine_dir, backend, device, batch, atol, rtol, n_images, json_out):
    """Compare ENGINE_DIR with the PyTorch reference on every step function.

    Prints max abs / relative error per output for prefill, decode (q = 1) and verify (q = K) at
    zero and non-zero cache offsets, and greedy token agreement over whole images.

    \b
    Example:
      arexport verify engines/demo
    """
    from rich.console import Console
    from rich.table import Table

    _check_outputs(("--json", json_out, "file"))
    from arexport.fileio import atomic_write_json
    from arexport.runtime.loading import open_engine
    from arexport.verify import verify_engine

    engine = open_engine(engine_dir, backend=backend, device=device)
    reference = open_engine(engine_dir, backend="torch", device=device, verify_hashes=False)
    rep = verify_engine(engine, reference, engine.manifest.precision, batch=batch,
                        verify_len=engine.manifest.profiles.verify_len, atol=atol, rtol=rtol,
                        full_image=n_images > 0, n_images=max(n_images, 1))
    console = Console()
    t = Table(title=f"{engine_dir}: {backend} vs torch ({rep.precision}, atol {rep.atol:g}, rtol {rep.rtol:g})")
    for col in ("case", "cache slots", "output", "max abs", "max rel", ""):
        t.add_column(col)
    for r in rep.rows:
        t.add_row(r["case"], str(r["offsets"]), r["output"], f"{r['max_abs']:.3g}", f"{r['max_rel']:.3g}",
                  "[green]ok[/]" if r["passed"] else "[red]FAIL[/]")
    console.print(t)
    if rep.token_agreement is not None:
        console.print(f"greedy whole-image token agreement: {rep.token_agreement:.4f} ({rep.images_identical} images identical)")
    console.print(f"[bold]{'PASS' if rep.passed else 'FAIL'}[/] in {rep.seconds:.1f}s")
    if json_out:
        atomic_write_json(json_out, rep.as_dict())
    if not rep.passed:
        sys.exit(1)


@cli.command()
@click.argument("source")
@model_options
@click.option("--tokens", "tokens_file", required=True, type=click.Path(dir_okay=False), help=".npy int array [N, n_tokens].")
@click.option("--backend", type=click.Choice(["torch", "ort", "trt"]), default="torch", show_default=True)
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
        tokens = np.load(tokens_file)
    except Exception as e:  # numpy raises several types on bad files
        raise ArexportError(f"cannot read tokens {tokens_file}: {e}") from None
    kw = {} if Path(source).is_dir() else _model_kwargs(source, checkpoint, random_init, init_seed, model_config, image_size,
                                                        vq_checkpoint)
    engine = open_engine(source, backend=backend, device=device, **kw)
    spec = engine.spec
    if tokens.ndim != 2 or tokens.shape[1] != spec.n_tokens or not np.issubdtype(tokens.dtype, np.integer) or not len(tokens):
        raise ArexportError(f"tokens must be a non-empty integer array [N, {spec.n_tokens}], got {tokens.dtype} {list(tokens.shape)}")
    images = engine.decode_images(torch.from_numpy(tokens.astype(np.int64))).cpu().numpy()
    if out_dir:
        for i, img in enumerate(images):
            atomic_save_png(Path(out_dir) / f"{i:04d}.png", img)
    if grid_png:
        atomic_save_png(grid_png, image_grid(images))
    click.echo(f"decoded {len(images)} images", err=True)


@cli.command()
@engine_or_model_options("torch")
@click.option("--method", default=None, help="Decoding method (default ar; arpg for ARPG models).")
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
def profile(engine_dir, model_name, checkpoint, random_init, vq_checkpoint, model_config, image_size, init_seed, backend, device,
            threads, method, method_opts, compare, classes, batch_size, cfg_scale, draft, refiner, prompt_list, prompts_file,
            text_encoder, warmup, repeats, cuda_graph, precision,
            bandwidth, json_out, plot_png):
    """Profile latency of generation: per step kind p50/p90/p99, per-image latency, throughput, memory.

    \b
    Examples:
      arexport profile --model demo --method sjd --classes 0,1,2,3 --json prof.json --plot prof.png
      arexport profile engines/b --compare torch:ar,ort:ar,ort:sjd:window=16 --batch-size 1
      arexport profile engines/xl --backend trt --device cuda --cuda-graph --batch-size 8
    """
    from rich.console import Console

    from arexport.fileio import atomic_write_json
    from arexport.profiling.bandwidth import measure_copy_bandwidth
    from arexport.profiling.profiler import RunConfig, profile_generator
    from arexport.profiling.report import plot, print_table, to_json
    from arexport.runtime.methods.base import parse_method_options
    from arexport.runtime.sampling import default_sampling

    source = _source(engine_dir, model_name, "profile")
    _check_outputs(("--json", json_out, "file"), ("--plot", plot_png, "file"))
    if repeats < 1 or warmup < 0:
        raise ArexportError("--repeats must be >= 1 and --warmup >= 0")
    kw = _model_kwargs(model_name, checkpoint, random_init, init_seed, model_config, image_size, vq_checkpoint, precision)
    try:
        configs = [RunConfig.parse(c) for c in compare.split(",")] if compare else [RunConfig(backend, method or "", parse_method_options(method_opts))]
    except ValueError as e:
        raise ArexportError(str(e)) from None
    console = Console()
    prompts = _prompts(prompt_list, prompts_file)
    cls = None if prompts else _parse_classes(classes)
    bw = measure_copy_bandwidth(device) if bandwidth else None
    results, context = [], {}
    for cfg in configs:
        gen = _load_generator(source, cfg.backend, device, threads, draft=_second(draft, refiner), cuda_graph=cuda_graph,
                              text_encoder=text_encoder, **kw)
        spec = gen.spec
        cfg.method = cfg.method or gen.engine.family.default_method
        sampling = default_sampling(spec, cfg_scale=cfg_scale)
        prec = gen.engine.manifest.precision if hasattr(gen.engine, "manifest") else precision or "fp32"
        console.log(f"profiling {cfg.label} on {device} ({repeats} x {len(prompts or cls)} images, batch {batch_size})")
        results.append(profile_generator(gen, cfg, cls, sampling, batch_size, warmup, repeats, bw, prec, prompts=prompts))
        context = {"model": spec.name, "n_tokens": spec.n_tokens, "precision": prec, "batch_size": batch_size,
                   "cfg_scale": sampling.cfg_scale, "device": device, "cuda_graph": cuda_graph,
                   "gpu": torch_gpu_name(device), "copy_bandwidth_gbps": (bw / 1e9) if bw else None}
    print_table(results, console, compare=bool(compare))
    if json_out:
        atomic_write_json(json_out, to_json(results, context))
    if plot_png:
        plot(results, plot_png)


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
def calibrate(engine_dir, mode, out_dir, samples, calib_set, classes, every, min_agreement, max_kl, max_accuracy_drop,
              int8_activations, force, overwrite):
    """Quantize ENGINE_DIR (INT8 / FP8 Q/DQ, or INT4 weight-only) into a new engine directory, gated on accuracy.

    \b
    Examples:
      arexport calibrate engines/demo --mode int8 --out engines/demo-int8
      arexport calibrate engines/b --mode int4-weight --samples 32 --out engines/b-int4
    """
    from rich.console import Console

    from arexport.calibration.calibrate import calibrate_engine

    if Path(out_dir).exists() and not overwrite:
        raise ArexportError(f"{out_dir} already exists (use --overwrite to replace it)")
    th = {k: v for k, v in (("min_agreement", min_agreement), ("max_kl", max_kl), ("max_accuracy_drop", max_accuracy_drop)) if v is not None}
    console = Console(stderr=True)
    m = calibrate_engine(engine_dir, out_dir, mode, samples=samples, calib_set=calib_set, classes=_parse_classes(classes),
                         every=every, force=force, thresholds=th, overwrite=overwrite, activations=int8_activations,
                         report=console.log)
    g = m.quantization["gates"]
    click.echo(f"{mode}: top-1 agreement {g['top1_agreement']:.4f}, mean KL {g['mean_kl']:.4g} on {g['heldout_steps']} held-out "
               f"step rows" + (f"; demo accuracy {g['demo']['reference']['accuracy']:.3f} -> {g['demo']['quantized']['accuracy']:.3f}"
                               if g.get("demo") else "") + f"; weights {m.weights['unique_bytes'] / 2**20:.2f} MiB -> {out_dir}")


@cli.command()
@engine_or_model_options("ort")
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
def serve(engine_dir, model_name, checkpoint, random_init, vq_checkpoint, model_config, image_size, init_seed, backend, device,
          threads, draft, refiner, text_encoder, latency_profile, host, port, batching, max_batch, token_env, max_body_bytes, max_images, insecure_no_auth):
    """Serve ENGINE_DIR over HTTP: POST /generate, GET /healthz, GET /metrics (Prometheus).

    \b
    Examples:
      arexport serve engines/demo --port 8000
      AREXPORT_TOKEN=secret arexport serve engines/b --batching request --max-batch 4
      curl -s localhost:8000/generate -H 'content-type: application/json' -d '{"classes": [3]}' -o three.png
    """
    import os

    from arexport.serving.http import create_app
    from arexport.serving.server import serve_forever
    from arexport.serving.service import GenerationService

    source = _source(engine_dir, model_name, "serve")
    token = os.environ.get(token_env) or None
    if token is None and not insecure_no_auth and not _loopback(host):
        raise ArexportError(f"no bearer token in ${token_env}: refusing to listen on {host} unauthenticated; set the token, "
                            "listen on 127.0.0.1, or pass --insecure-no-auth")
    if not 0 < port < 65536:
        raise ArexportError(f"--port must be in 1..65535, got {port}")
    kw = _model_kwargs(model_name, checkpoint, random_init, init_seed, model_config, image_size, vq_checkpoint)
    if model_name:
        backend = "torch"
    gen = _load_generator(source, backend, device, threads, draft=_second(draft, refiner), text_encoder=text_encoder,
                          latency_profile=latency_profile, **kw)
    service = GenerationService(gen, batching=batching, max_batch=max_batch)
    app = create_app(service, token=token, max_body_bytes=max_body_bytes, max_images=max_images)
    click.echo(f"serving {gen.spec.name} ({backend}, {batching} batching, max batch {max_batch}) on http://{host}:{port}"
               + (" with bearer auth" if token else ""), err=True)
    serve_forever(app, host=host, port=port, service=service)


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


def image_grid(images, cols: Optional[int] = None, pad: int = 4):
    """uint8 [N,H,W,3] -> one uint8 grid image with `pad` grey pixels between cells."""
    import numpy as np

    n, h, w, c = images.shape
    cols = cols or min(n, 10)
    rows = (n + cols - 1) // cols
    grid = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, c), 96, dtype=np.uint8)  # grey gutters
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * (h + pad): r * (h + pad) + h, k * (w + pad): k * (w + pad) + w] = img
    return grid


if __name__ == "__main__":
    main()
