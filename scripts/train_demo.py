#!/usr/bin/env python
"""Train the demo models on scikit-learn's 8x8 digits and write them to arexport/models/weights/.

    python scripts/train_demo.py            # everything (about 75 minutes on 2 idle CPU cores, ARPG 45 of them)
    python scripts/train_demo.py --only classifiers
    OMP_NUM_THREADS=1 python scripts/train_demo.py --only t2i   # demo-t2i alone: about 10 minutes on a busy shared CPU

Writes:
  digit-cnn.safetensors      DigitCNN scorer (verifiers, demo accuracy) + its feature stats
  digit-mlp.safetensors      DigitMLP, an independent judge of a different architecture
  digits-stats.safetensors   real-digit feature mean/covariance (held-out split) for the CNN and MLP
  demo.safetensors           LlamaGen-architecture c2i target model (config in metadata)
  demo-draft.safetensors     smaller draft model sharing the tokenizer
  demo-arpg.safetensors      ARPG-architecture model trained in random orders (parallel decoding)
  demo-par.safetensors       PAR-architecture model (4 distant tokens per step after 4 sequential ones)
  demo-var-vae.safetensors   the VAR demos' multi-scale residual VQVAE (scales 1, 2, 4, 8: 85 tokens)
  demo-var.safetensors       VAR-architecture next-scale model (the CoDe drafter)
  demo-var-small.safetensors a smaller VAR sharing the VQVAE (the CoDe refiner)
  demo-t2i.safetensors       text-conditional LlamaGen (t2i) drawing the digit a prompt names
  demo-t2i-text.safetensors  its prompt encoder (one transformer block), trained jointly with it
  demo-t2i-tokenizer.json    the encoder's word-level tokenizer (vocabulary of the prompt templates below)
  demo-eagle.safetensors     EAGLE draft head for demo, trained on demo's own last hidden states (--only eagle:
                             5000 steps, about 8 minutes on one core; last-batch top-1 agreement with demo 0.82,
                             against 0.70 after the 400 steps of earlier versions)
Data: a token is a pixel's grey level 0..16; images are raster sequences of 64 tokens.
The split is fixed (seed 0): 80% train, 20% held out for classifier accuracy and feature stats.
The ARPG model learns from the real training split plus digits sampled from the raster demo model
(--arpg-synthetic of them, seed 123, its default sampler): 1437 images are too few to learn a
random-order model of 64 pixels that still draws a clear digit when 4+ pixels come per step.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from arexport.quality import DigitCNN, DigitMLP, feature_stats, tokens_to_input
from arexport.models.arpg import ARPG, ARPGConfig
from arexport.models.demo_text import DemoTextConfig, DemoTextEncoder, build_tokenizer, save_text_encoder
from arexport.models.llamagen import LlamaGenConfig
from arexport.models.par import PAR, PARConfig
from arexport.models.var import VAR, VARConfig, VARVQVAE

OUT = Path(__file__).resolve().parent.parent / "arexport" / "models" / "weights"

TARGET = dict(dim=96, n_layer=4, n_head=4, multiple_of=64, vocab_size=17, num_classes=10,
              grid_size=8, cls_token_num=1, model_type="c2i", image_kind="digits", class_dropout_prob=0.1,
              token_dropout_p=0.1, resid_dropout_p=0.1, ffn_dropout_p=0.1)
DRAFT = dict(TARGET, dim=64, n_layer=2, n_head=2)
# PAR: 4 tokens per step (one per 4x4 quadrant) after 4 sequential ones: 19 forwards for 64 tokens
PAR_CFG = dict(dim=96, n_layer=4, n_head=4, multiple_of=64, vocab_size=17, num_classes=10, grid_size=8, cls_token_num=1,
               model_type="c2i", image_kind="digits", class_dropout_prob=0.1, token_dropout_p=0.1, resid_dropout_p=0.1,
               ffn_dropout_p=0.1, ar_token_num=4, spe_token_num=3)
ARPG_CFG = dict(dim=128, n_layer=6, n_head=4, multiple_of=64, vocab_size=17, num_classes=10, grid_size=8,
                image_kind="digits", class_dropout_prob=0.1, token_dropout_p=0.1, resid_dropout_p=0.1, ffn_dropout_p=0.1)


# The VAR demos: one VQVAE (8x8 latents, no down-sampling, 64 codes of 8 dims) and two transformers.
VAR_VAE = dict(depth=1, vocab_size=64, cvae=8, patch_nums=(1, 2, 4, 8), num_classes=10, vae_ch=32, vae_ch_mult=(1,),
               vae_num_res_blocks=1, image_upscale=16)
VAR_SAMPLER = {"cfg_scale": 2.0, "cfg_schedule": "ramp", "top_k": 0, "top_p": 1.0, "temperature": 1.0}
VAR_TARGET = dict(VAR_VAE, depth=4, dim=96, n_head=4, extra={"sampling_defaults": VAR_SAMPLER})
VAR_SMALL = dict(VAR_TARGET, depth=2, dim=64, n_head=2)


# demo-t2i: a small text-conditional LlamaGen on 12 caption features of 32 dims from the prompt encoder
T2I_CFG = dict(dim=64, n_layer=3, n_head=4, multiple_of=64, vocab_size=17, caption_dim=32, cls_token_num=12,
               grid_size=8, model_type="t2i", image_kind="digits", class_dropout_prob=0.1, token_dropout_p=0.1,
               resid_dropout_p=0.1, ffn_dropout_p=0.1,
               extra={"sampling_defaults": {"cfg_scale": 1.5, "top_k": 0, "top_p": 1.0, "temperature": 1.0}})
T2I_TEXT = dict(dim=32, n_head=2, ffn=64, max_length=12)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Training phrasings; {d} is the digit as a word or a numeral, {a} its article (a / an).
T2I_TEMPLATES = (
    "{d}", "{a} {d}", "the digit {d}", "the number {d}", "digit {d}", "number {d}", "a handwritten {d}",
    "{a} handwritten {d}", "handwritten {d}", "a handwritten digit {d}", "a handwritten number {d}", "draw {a} {d}",
    "draw the digit {d}", "draw the number {d}", "draw a {d}", "write {a} {d}", "write the digit {d}",
    "please draw {a} {d}", "a picture of {a} {d}", "an image of the digit {d}", "a drawing of the number {d}",
    "{a} {d} written by hand", "the digit {d} written by hand", "show me {a} {d}", "sketch {a} {d}",
    "a small {d}", "a bold {d}", "a neat handwritten {d}", "a scanned digit {d}", "make {a} {d}",
)


def t2i_prompts(templates=T2I_TEMPLATES, numerals: bool = True) -> tuple[list[str], list[int]]:
    """(prompts, classes): every template with every digit as a word and (numerals) as a numeral."""
    out, cls = [], []
    for c in range(10):
        for d in (NUMBER_WORDS[c], str(c)) if numerals else (NUMBER_WORDS[c],):
            art = "an" if d in ("eight", "8") else "a"
            for t in templates:
                out.append(t.format(d=d, a=art))
                cls.append(c)
    return out, cls


def load_split(seed: int = 0):
    """(x_train, y_train, x_test, y_test): tokens [N,64] int64 and labels, fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.int64)
    y = torch.tensor(d.target, dtype=torch.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return xtr, ytr, xte, yte


def shift_augment(tokens: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel (zero fill), for classifier robustness."""
    img = tokens.view(-1, 8, 8)
    out = torch.zeros_like(img)
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    ys, yd = (slice(max(dy, 0), 8 + min(dy, 0)), slice(max(-dy, 0), 8 + min(-dy, 0)))
    xs, xd = (slice(max(dx, 0), 8 + min(dx, 0)), slice(max(-dx, 0), 8 + min(-dx, 0)))
    out[:, yd, xd] = img[:, ys, xs]
    return out.view(-1, 64)


def train_classifier(model, xtr, ytr, xte, yte, steps=1500, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in range(steps):
        idx = torch.randint(0, len(xtr), (128,), generator=g)
        xb = xtr[idx]
        if step % 2:
            xb = shift_augment(xb, g)
        loss = F.cross_entropy(model(tokens_to_input(xb)), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(tokens_to_input(xte)).argmax(1) == yte).float().mean().item()
    return acc


def synthetic_digits(n: int, checkpoint: Path, seed: int = 123):
    """n digits (classes 0..9 in turn) sampled from the raster demo model at its default sampler."""
    from arexport.runtime.generator import Generator
    from arexport.runtime.sampling import SamplingParams

    gen = Generator.load("demo", checkpoint=str(checkpoint))
    classes = [i % 10 for i in range(n)]
    t0 = time.time()
    r = gen.generate(classes=classes, method="ar", sampling=SamplingParams(**gen.spec.extra["sampling_defaults"]),
                     batch_size=500, images=False, timings=False, seed=seed)
    print(f"sampled {n} synthetic digits from {checkpoint.name} ({time.time() - t0:.0f}s)", flush=True)
    return torch.as_tensor(r.tokens, dtype=torch.int64).view(n, -1), torch.tensor(classes, dtype=torch.int64)


def optimize(model, loss, opt, sched, step: int, steps: int, label: str, t0: float) -> None:
    """One optimizer step (gradients clipped at norm 1) and a progress line every 200 steps."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    if step % 200 == 0 or step == steps - 1:
        print(f"[{label}] step {step:5d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)


def train_ar(cfg, xtr, ytr, steps: int, seed: int, lr=3e-3, batch=64, label="", probe=None, probe_every=500):
    """Teacher forcing; LlamaGen in raster order, ARPG in a fresh random order per sample."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = cfg.build()
    model.init_random(seed)
    arpg, par = isinstance(model, ARPG), isinstance(model, PAR)
    with torch.no_grad():
        (model.head if arpg else model.output).weight.zero_()  # the references zero-initialise the head
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(xtr), (batch,), generator=g)
        tok, cls = xtr[idx], ytr[idx].clone()
        drop = torch.rand(batch, generator=g) < cfg.class_dropout_prob
        cls[drop] = cfg.num_classes  # null class for classifier-free guidance
        if par:  # PAR's region-interleaved order, as its train_c2i.py permutes the codes
            seq = tok[:, model.order]
            logits = model(cls, seq)
            loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), seq.reshape(-1))
        elif arpg:
            order = torch.rand(batch, tok.shape[1], generator=g).argsort(1)
            logits = model(cls, tok, order)
            loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tok.gather(1, order).reshape(-1))
        else:
            logits = model(cls, tok)
            loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tok.reshape(-1))
        optimize(model, loss, opt, sched, step, steps, label, t0)
        if probe is not None and step and step % probe_every == 0:
            rng = torch.get_rng_state()  # the probe must not shift the dropout stream
            print(f"[{label}] step {step:5d} {probe(cfg, model.eval())}", flush=True)
            torch.set_rng_state(rng)
            model.train()
    return model.eval(), float(loss.item())


def arpg_probe(images: int = 200):
    """Progress check while ARPG trains: class accuracy of 16- and 64-step samples under the MLP judge.
    It uses its own random streams, so the trained weights do not depend on whether it runs."""
    def probe(cfg, model):
        import tempfile

        from arexport.quality import score_digits
        from arexport.runtime.generator import Generator
        from arexport.runtime.sampling import default_sampling

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "probe.safetensors"
            save_model(model, cfg, path, {}, quiet=True)
            gen = Generator.load("demo-arpg", checkpoint=str(path))
            classes = [i % 10 for i in range(images)]
            out = []
            for steps in (16, 64):
                r = gen.generate(classes=classes, method="arpg", method_options={"steps": steps},
                                 sampling=default_sampling(gen.spec), batch_size=images, images=False, timings=False)
                out.append(f"acc@{steps} {score_digits(r.tokens, classes, 'mlp').accuracy:.3f}")
        return " ".join(out) + " (MLP judge)"
    return probe


def digits_to_images(tokens: torch.Tensor) -> torch.Tensor:
    """Grey levels [N, 64] -> RGB images [N, 3, 8, 8] in [-1, 1] (the VQVAE's input)."""
    return (tokens.float() / 16 * 2 - 1).view(-1, 1, 8, 8).expand(-1, 3, -1, -1).contiguous()


def train_var_vae(cfg: VARConfig, x: torch.Tensor, steps: int, seed: int = 3, batch: int = 128):
    """The multi-scale residual VQVAE: reconstruction MSE + the reference's VQ loss (commitment 0.25,
    straight-through f_hat), codebook rows initialised from encoder features."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = VARVQVAE(cfg).init_random(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    imgs = digits_to_images(x)
    t0 = time.time()
    for step in range(steps):
        xb = imgs[torch.randint(0, len(imgs), (batch,), generator=g)]
        f = vae.quant_conv(vae.encoder(xb))
        if step == 0:
            with torch.no_grad():
                rows = f.permute(0, 2, 3, 1).reshape(-1, cfg.cvae)
                vae.quantize.embedding.weight.copy_(rows[torch.randperm(len(rows), generator=g)[:cfg.vocab_size]])
        f_hat, vq_loss = quantize_train(vae, f)
        loss = F.mse_loss(vae.decoder(vae.post_quant_conv(f_hat)), xb) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"[var-vae] step {step:5d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    return vae.eval()


def quantize_train(vae: VARVQVAE, f: torch.Tensor):
    """VectorQuantizer2.forward: residual quantization over the scales with gradients to the codebook
    (through f_hat) and the encoder (straight through); returns (f_hat, vq loss)."""
    b, c, hh, ww = f.shape
    rest, f_hat = f.detach().clone(), torch.zeros_like(f)
    emb = vae.quantize.embedding.weight
    n = len(vae.patch_nums)
    loss = 0.0
    for si, pn in enumerate(vae.patch_nums):
        z = (F.interpolate(rest, size=(pn, pn), mode="area") if si != n - 1 else rest).permute(0, 2, 3, 1).reshape(-1, c)
        idx = (z.square().sum(1, keepdim=True) + emb.detach().square().sum(1) - 2 * z @ emb.detach().T).argmin(1)
        h = vae.quantize.embedding(idx.view(b, pn, pn)).permute(0, 3, 1, 2)
        if si != n - 1:
            h = F.interpolate(h, size=(hh, ww), mode="bicubic")
        h = vae.phi(si)(h)
        f_hat = f_hat + h
        rest = rest - h.detach()
        loss = loss + F.mse_loss(f_hat.detach(), f) * 0.25 + F.mse_loss(f_hat, f.detach())
    return (f_hat.detach() - f.detach()) + f, loss / n


def train_var(cfg: VARConfig, vae: VARVQVAE, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int, batch: int = 64,
              lr: float = 2e-3, label: str = "var"):
    """Teacher forcing over all scales (the reference's VAR.forward): class dropout 0.1, loss on every position."""
    with torch.no_grad():
        tokens = torch.cat([vae.image_to_tokens(digits_to_images(x[i:i + 2048])) for i in range(0, len(x), 2048)])
        feats = torch.cat([vae.next_scale_inputs(tokens[i:i + 2048]) for i in range(0, len(x), 2048)])
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = VAR(cfg).init_random(seed)
    with torch.no_grad():
        model.head.weight.mul_(0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(tokens), (batch,), generator=g)
        cls = y[idx].clone()
        cls[torch.rand(batch, generator=g) < 0.1] = cfg.num_classes
        logits = model(cls, feats[idx])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tokens[idx].reshape(-1))
        optimize(model, loss, opt, sched, step, steps, label, t0)
    return model.eval(), float(loss.item())


def t2i_vocabulary(prompts: list[str]) -> list[str]:
    """The words of the training prompts as the tokenizer splits them (lower-cased)."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    return sorted({w for p in prompts for w, _ in split.pre_tokenize_str(p.lower())})


def train_t2i(xtr, ytr, steps: int, out: Path, seed: int = 6, batch: int = 64, lr: float = 3e-3, unk_p: float = 0.1):
    """demo-t2i: the prompt encoder and the t2i GPT trained together by teacher forcing. Each image
    gets a random training phrasing of its class; with probability unk_p each non-digit word becomes
    <unk> (so unseen words do not derail the encoder); captions drop to the null caption with
    probability class_dropout_prob (CFG), keeping their mask as LlamaGen does."""
    from arexport.runtime.text import PromptTokenizer, left_pad

    cfg = LlamaGenConfig(**T2I_CFG)
    prompts, pcls = t2i_prompts()
    tokenizer = build_tokenizer(t2i_vocabulary(prompts))
    tok_file = out / "demo-t2i-tokenizer.json"
    tokenizer.save(str(tok_file))
    tcfg = DemoTextConfig(vocab_size=tokenizer.get_vocab_size(), **T2I_TEXT)
    if tcfg.dim != cfg.caption_dim or tcfg.max_length != cfg.cls_token_num:
        raise SystemExit("T2I_TEXT dim/max_length must equal T2I_CFG caption_dim/cls_token_num")
    ids, mask = (torch.from_numpy(a) for a in PromptTokenizer(tok_file, tcfg.max_length, pad_id=0)(prompts))
    digit_ids = {tokenizer.token_to_id(w) for w in NUMBER_WORDS + tuple(str(c) for c in range(10))}
    droppable = mask.bool() & (ids > 2) & ~torch.isin(ids, torch.tensor(sorted(digit_ids)))  # words other than the digit
    by_class = torch.stack([torch.tensor([i for i, c in enumerate(pcls) if c == k]) for k in range(10)])

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    gpt = cfg.build()
    gpt.init_random(seed)
    text = DemoTextEncoder(tcfg).init_random(seed + 1)
    with torch.no_grad():
        gpt.output.weight.zero_()
    both = torch.nn.ModuleDict({"gpt": gpt, "text": text})
    opt = torch.optim.AdamW(both.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    both.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(xtr), (batch,), generator=g)
        cls = ytr[idx]
        pick = by_class[cls, torch.randint(0, by_class.shape[1], (batch,), generator=g)]
        b_ids, b_mask = ids[pick].clone(), mask[pick]
        b_ids[droppable[pick] & (torch.rand(b_ids.shape, generator=g) < unk_p)] = 1  # <unk>
        feats, cmask = left_pad(text(b_ids, b_mask).last_hidden_state, b_mask)
        drop = torch.rand(batch, generator=g) < cfg.class_dropout_prob
        feats = torch.where(drop.view(-1, 1, 1), gpt.cls_embedding.uncond_embedding.unsqueeze(0), feats)
        logits = gpt(feats, xtr[idx], cond_mask=cmask)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), xtr[idx].reshape(-1))
        optimize(both, loss, opt, sched, step, steps, "t2i", t0)
    info = {"steps": steps, "final_loss": float(loss.item()), "seconds": round(time.time() - t0),
            "data": f"sklearn digits train split; {len(T2I_TEMPLATES)} prompt templates x 20 digit spellings"}
    save_model(gpt.eval(), cfg, out / "demo-t2i.safetensors", info, dtype=torch.float16)
    save_text_encoder(text.eval(), tokenizer, out / "demo-t2i-text.safetensors", tok_file, info)
    print(f"wrote {out / 'demo-t2i-text.safetensors'} and {tok_file}")


def target_hidden(model, cls: torch.Tensor, tokens: torch.Tensor):
    """Teacher forcing through a LlamaGen c2i model: (hidden [B, n, dim] after the final norm, logits
    [B, n, V]); row 0 is the class position, row 1 + t image token t; row i predicts token i."""
    h = torch.cat([model.condition_embeddings(cls), model.tok_embeddings(tokens[:, :-1])], 1)
    b, n, _ = h.shape
    cos, sin = model.rope(torch.cat([torch.full((1,), -1), torch.arange(n - 1)]).expand(b, n))
    for layer in model.layers:
        h = layer.forward_full(h, cos, sin, None, True)
    h = model.norm(h)
    return h, model.output(h).float()


def train_eagle(xtr, ytr, steps: int, synthetic: int, out: Path, seed: int = 7, batch: int = 64, lr: float = 3e-3):
    """demo-eagle: an EAGLE head (one decoder layer over fc([embedding(x_t+1); h_t])) trained on demo's own
    hidden states, as EAGLE trains: the head's output regresses the next hidden state (smooth L1) and its
    logits through demo's output projection match demo's next-token distribution (soft cross-entropy).
    Token table and output projection are demo's, frozen; inputs get EAGLE's uniform noise."""
    from arexport.models.eagle import EagleConfig, EagleHead, save_eagle_head
    from arexport.models.registry import load_model

    target = load_model("demo", checkpoint=str(out / "demo.safetensors")).model.eval()
    tc = target.cfg
    xs, ys = synthetic_digits(synthetic, out / "demo.safetensors") if synthetic else (xtr[:0], ytr[:0])
    x, y = torch.cat([xtr, xs]), torch.cat([ytr, ys])
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    head = EagleHead(EagleConfig(dim=tc.dim, n_head=tc.n_head, n_kv_head=tc.kv_heads, ffn_hidden=2 * tc.dim,
                                 vocab_size=tc.vocab_size, grid_size=tc.grid_size)).init_random(seed)
    with torch.no_grad():
        head.embed_tokens.weight.copy_(target.tok_embeddings.weight)
        head.lm_head.weight.copy_(target.output.weight)
    for p in (head.embed_tokens.weight, head.lm_head.weight):
        p.requires_grad_(False)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    n = x.shape[1]
    # pair i = (hidden row i, token i) at token i's cell (row 0 is the class position: the pair the first round
    # drafts from), predicting token i + 1 (the official position ids: see runtime/methods/eagle.py)
    m = n - 1
    mask = torch.ones(m, m, dtype=torch.bool).tril()[None, None]
    pos = torch.arange(m)[None]
    t0 = time.time()
    head.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        tok, cls = x[idx], y[idx].clone()
        cls[torch.rand(batch, generator=g) < tc.class_dropout_prob] = tc.num_classes  # CFG's null rows too
        with torch.no_grad():
            hid, logits = target_hidden(target, cls, tok)
        inp = hid[:, :m]
        inp = inp + (torch.rand(inp.shape, generator=g) - 0.5) * 0.2  # EAGLE's uniform input noise
        keys, values = head.allocate(batch, m)
        lg, feat, _, _ = head.step(inp, tok[:, :m], pos.expand(batch, m), torch.zeros(batch, dtype=torch.long),
                                   mask.expand(batch, 1, m, m), keys, values)
        want_feat, want_p = hid[:, 1:1 + m], torch.softmax(logits[:, 1:1 + m], -1)
        loss = F.smooth_l1_loss(feat, want_feat) - (want_p * torch.log_softmax(lg, -1)).sum(-1).mean()
        optimize(head, loss, opt, sched, step, steps, "eagle", t0)
    head.eval()
    with torch.no_grad():  # top-1 agreement with demo on held-out teacher forcing (a rough quality line)
        acc = float((lg.argmax(-1) == logits[:, 1:1 + m].argmax(-1)).float().mean())
    path = out / "demo-eagle.safetensors"
    save_eagle_head(head, path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB), last-batch top-1 agreement with demo {acc:.3f}")


def save_model(model, cfg, path: Path, info: dict, quiet: bool = False, dtype: torch.dtype = torch.float32) -> None:
    """Weights stored as `dtype` (demo-t2i: fp16, half the bytes; loading casts back to fp32)."""
    sd = {k: v.detach().to(dtype).contiguous().clone() for k, v in model.state_dict().items()}
    family = "par" if isinstance(model, PAR) else "arpg" if isinstance(model, ARPG) else "var" if isinstance(model, (VAR, VARVQVAE)) else "llamagen"
    # extra is kept where it carries something (VAR's and demo-t2i's sampler defaults)
    config = {k: v for k, v in asdict(cfg).items() if k != "extra" or family == "var" or cfg.extra}
    meta = {"config": json.dumps(config), "info": json.dumps(info), "family": family}
    save_file(sd, str(path), metadata=meta)
    if not quiet:
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["classifiers", "target", "draft", "arpg", "var", "t2i", "eagle", "par"], default=None)
    ap.add_argument("--eagle-steps", type=int, default=5000)
    ap.add_argument("--eagle-synthetic", type=int, default=0, help="digits sampled from demo added to the EAGLE head's data")
    ap.add_argument("--var-steps", type=int, default=2500)
    ap.add_argument("--var-vae-steps", type=int, default=2000)
    ap.add_argument("--var-synthetic", type=int, default=20000, help="digits sampled from the raster demo model for VAR")
    ap.add_argument("--arpg-steps", type=int, default=10000)
    ap.add_argument("--arpg-batch", type=int, default=64)
    ap.add_argument("--arpg-synthetic", type=int, default=30000, help="digits sampled from the raster demo model for ARPG")
    ap.add_argument("--par-steps", type=int, default=2000)
    ap.add_argument("--par-synthetic", type=int, default=0, help="digits sampled from the raster demo model for PAR")
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps for the target model")
    ap.add_argument("--draft-steps", type=int, default=1500)
    ap.add_argument("--t2i-steps", type=int, default=2000, help="optimizer steps for demo-t2i (GPT + prompt encoder)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--probe", action="store_true", help="print ARPG sample accuracy every 500 steps while it trains")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = load_split()

    if args.only in (None, "classifiers"):
        cnn, mlp = DigitCNN(), DigitMLP()
        acc_cnn = train_classifier(cnn, xtr, ytr, xte, yte, seed=0)
        acc_mlp = train_classifier(mlp, xtr, ytr, xte, yte, seed=1)
        print(f"held-out accuracy: cnn {acc_cnn:.4f}, mlp {acc_mlp:.4f}")
        save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(args.out / "digit-cnn.safetensors"),
                  metadata={"heldout_accuracy": f"{acc_cnn:.4f}"})
        save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(args.out / "digit-mlp.safetensors"),
                  metadata={"heldout_accuracy": f"{acc_mlp:.4f}"})
        stats = {}
        with torch.no_grad():
            for name, clf in (("cnn", cnn), ("mlp", mlp)):
                mu, cov = feature_stats(clf.features(tokens_to_input(xte)).numpy())
                stats[f"{name}_mu"] = torch.tensor(mu)
                stats[f"{name}_cov"] = torch.tensor(cov)
                mu_tr, cov_tr = feature_stats(clf.features(tokens_to_input(xtr)).numpy())
                stats[f"{name}_train_mu"] = torch.tensor(mu_tr)
                stats[f"{name}_train_cov"] = torch.tensor(cov_tr)
        save_file(stats, str(args.out / "digits-stats.safetensors"), metadata={"split": "sklearn digits, 20% held out, seed 0"})

    if args.only in (None, "target"):
        cfg = LlamaGenConfig(**TARGET)
        model, loss = train_ar(cfg, xtr, ytr, args.steps, seed=0, label="demo")
        save_model(model, cfg, args.out / "demo.safetensors", {"steps": args.steps, "final_loss": loss, "data": "sklearn digits train split"})
    if args.only in (None, "draft"):
        cfg = LlamaGenConfig(**DRAFT)
        model, loss = train_ar(cfg, xtr, ytr, args.draft_steps, seed=1, label="draft")
        save_model(model, cfg, args.out / "demo-draft.safetensors", {"steps": args.draft_steps, "final_loss": loss, "data": "sklearn digits train split"})
    if args.only in (None, "arpg"):
        cfg = ARPGConfig(**ARPG_CFG)
        xs, ys = synthetic_digits(args.arpg_synthetic, args.out / "demo.safetensors") if args.arpg_synthetic else (xtr[:0], ytr[:0])
        model, loss = train_ar(cfg, torch.cat([xtr, xs]), torch.cat([ytr, ys]), args.arpg_steps, seed=2, lr=2e-3,
                               batch=args.arpg_batch, label="arpg", probe=arpg_probe() if args.probe else None)
        save_model(model, cfg, args.out / "demo-arpg.safetensors",
                   {"steps": args.arpg_steps, "batch": args.arpg_batch, "final_loss": loss,
                    "data": f"sklearn digits train split + {args.arpg_synthetic} digits sampled from demo, random orders"})
    if args.only in (None, "par"):
        cfg = PARConfig(**PAR_CFG)
        xs, ys = synthetic_digits(args.par_synthetic, args.out / "demo.safetensors") if args.par_synthetic else (xtr[:0], ytr[:0])
        model, loss = train_ar(cfg, torch.cat([xtr, xs]), torch.cat([ytr, ys]), args.par_steps, seed=7, lr=3e-3, label="par")
        save_model(model, cfg, args.out / "demo-par.safetensors",
                   {"steps": args.par_steps, "final_loss": loss,
                    "data": f"sklearn digits train split + {args.par_synthetic} digits sampled from demo, PAR order"})
    if args.only in (None, "var"):
        xs, ys = synthetic_digits(args.var_synthetic, args.out / "demo.safetensors") if args.var_synthetic else (xtr[:0], ytr[:0])
        x, y = torch.cat([xtr, xs]), torch.cat([ytr, ys])
        vae_cfg = VARConfig(**VAR_VAE)
        vae = train_var_vae(vae_cfg, x, args.var_vae_steps)
        save_model(vae, vae_cfg, args.out / "demo-var-vae.safetensors", {"steps": args.var_vae_steps})
        data = f"sklearn digits train split + {args.var_synthetic} digits sampled from demo"
        for name, kw, seed, steps in (("demo-var", VAR_TARGET, 4, args.var_steps), ("demo-var-small", VAR_SMALL, 5, args.var_steps)):
            cfg = VARConfig(**kw)
            model, loss = train_var(cfg, vae, x, y, steps, seed=seed, label=name)
            save_model(model, cfg, args.out / f"{name}.safetensors", {"steps": steps, "final_loss": loss, "data": data})

    if args.only in (None, "t2i"):
        train_t2i(xtr, ytr, args.t2i_steps, args.out)
    if args.only in (None, "eagle"):
        train_eagle(xtr, ytr, args.eagle_steps, args.eagle_synthetic, args.out)


if __name__ == "__main__":
    main()
