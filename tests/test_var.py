"""VAR and CoDe (issue 13): parity with a transcription of the official code, the engines, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arexport.errors import ArexportError
from arexport.format.scales import Scales
from arexport.models.registry import LoadedModel
from arexport.models.var import VAR, VARConfig, VARVQVAE
from arexport.runtime.backends.torch.runner import TorchEngine
from arexport.runtime.generator import Generator
from arexport.runtime.sampling import SamplingParams, cfg_scales
from tests.var_official import official_pair

PN = (1, 2, 3, 4)


def tiny_cfg(shared=False, l2=True, depth=2, dim=64, heads=2):
    return VARConfig(depth=depth, dim=dim, n_head=heads, vocab_size=40, cvae=8, patch_nums=PN, num_classes=10,
                     vae_ch=32, vae_ch_mult=(1,), vae_num_res_blocks=1, shared_aln=shared, attn_l2_norm=l2)


def ours_from_official(off_var, off_quant, cfg, seed=0):
    """Our VAR loaded from the transcription's state dict (the released layout), and a VQVAE whose
    quantizer is the transcription's (random encoder/decoder)."""
    var = VAR(cfg)
    from arexport.models.checkpoint import load_into

    load_into(var, off_var.state_dict(), source="official")
    vae = VARVQVAE(cfg).init_random(seed)
    with torch.no_grad():
        for k, v in off_quant.state_dict().items():
            vae.quantize.state_dict()[k].copy_(v)
    return var.eval(), vae.eval()


def engine_of(var, vae, cfg, name="var-d16"):
    spec = cfg.spec(name)
    return TorchEngine(LoadedModel(name, var, spec, vae, {"model": name}))


@pytest.mark.parametrize("shared,l2", [(False, True), (True, True), (False, False)])
def test_teacher_forcing_matches_the_official_forward(shared, l2):
    off, quant = official_pair(1, shared=shared, l2=l2)
    cfg = tiny_cfg(shared, l2)
    var, vae = ours_from_official(off, quant, cfg)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 40, (3, cfg.n_tokens), generator=g)
    classes = torch.tensor([1, 4, 10])  # 10: the null class
    feats = vae.next_scale_inputs(tokens)
    # the transcription's teacher-forcing inputs (idxBl_to_var_input) built its own way
    f_hat = torch.zeros(3, 8, 4, 4)
    sc, ref_feats = Scales(PN), []
    for si in range(len(PN) - 1):
        h = quant.embedding(tokens[:, sc.begins[si]:sc.ends[si]]).transpose(1, 2).reshape(3, 8, PN[si], PN[si])
        f_hat, nxt = quant.get_next_autoregressive_input(si, len(PN), f_hat, h)
        ref_feats.append(nxt.view(3, 8, -1).transpose(1, 2))
    ref_feats = torch.cat(ref_feats, 1)
    assert (feats - ref_feats).abs().max() < 1e-6
    with torch.no_grad():
        ours = var(classes, feats)
        ref = off(classes, ref_feats)
    assert (ours - ref).abs().max() < 1e-4


def _greedy(logits):
    return logits.argmax(-1)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5, 4.0])
def test_greedy_generation_matches_autoregressive_infer_cfg(cfg_scale):
    off, quant = official_pair(2)
    cfg = tiny_cfg()
    var, vae = ours_from_official(off, quant, cfg)
    classes = torch.tensor([0, 3, 7, 9])
    f_ref, toks_ref, _ = off.infer(classes, cfg_scale, _greedy)
    gen = Generator(engine_of(var, vae, cfg))
    params = SamplingParams(temperature=0.0, cfg_scale=cfg_scale, cfg_schedule="ramp")
    out = gen.generate(classes=classes.tolist(), sampling=params, batch_size=3, method="var")
    assert np.array_equal(out.tokens, torch.cat(toks_ref, 1).numpy())
    # the image: the same f_hat through the (random) decoder
    want = vae.latents_to_images(f_ref).numpy().astype(int)
    assert np.abs(out.images.astype(int) - want).max() <= 1
    assert out.stats["target_forwards_per_image"] == len(PN)


def test_code_handoff_matches_the_official_draft_and_refine():
    drafter_off, quant = official_pair(4)
    refiner_off, _ = official_pair(5, depth=1)
    refiner_off.quant = (quant,)  # CoDe shares the VQVAE
    cfg, rcfg = tiny_cfg(), tiny_cfg(depth=1)
    drafter, vae = ours_from_official(drafter_off, quant, cfg)
    refiner, _ = ours_from_official(refiner_off, quant, rcfg)
    classes = torch.tensor([2, 5, 8])
    for n in (1, 2, 3):
        f_hat, toks_d, hub = drafter_off.infer(classes, 3.0, _greedy, stop=n)
        f_hat, toks_r, _ = refiner_off.infer(classes, 3.0, _greedy, start=n, draft=hub, f_hat=f_hat)
        gen = Generator(engine_of(drafter, vae, cfg), engine_of(refiner, vae, rcfg))
        out = gen.generate(classes=classes.tolist(), method="code", method_options={"drafter_steps": n},
                           sampling=SamplingParams(temperature=0.0, cfg_scale=3.0, cfg_schedule="ramp"), batch_size=2)
        assert np.array_equal(out.tokens, torch.cat(toks_d + toks_r, 1).numpy()), n
        assert out.stats["drafter_forwards_per_image"] == n
        assert out.stats["refiner_forwards_per_image"] == len(PN) - n
        assert np.abs(out.images.astype(int) - vae.latents_to_images(f_hat).numpy().astype(int)).max() <= 1


def test_scales_mask_and_ramp():
    sc = Scales((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert sc.total == 680 and sc.begins[-1] == 424 and sc.largest == 256
    assert all(b + sc.largest <= sc.total for b in sc.begins)  # a padded block never passes the end
    pos = torch.tensor([[0, 1, 4, 5, 679]])
    m = sc.visible_mask(pos, 680)[0, 0]
    assert m.sum(1).tolist() == [1, 5, 5, 14, 680]
    p = SamplingParams(cfg_scale=1.5, cfg_schedule="ramp")
    assert p.uses_cfg and SamplingParams(cfg_scale=0.5, cfg_schedule="ramp").uses_cfg
    assert [round(cfg_scales(p, k, 10), 6) for k in (0, 9)] == [1.0, 2.5]


def test_batches_and_continuous_batching_do_not_change_an_images_tokens():
    off, quant = official_pair(6)
    cfg = tiny_cfg()
    var, vae = ours_from_official(off, quant, cfg)
    gen = Generator(engine_of(var, vae, cfg))
    classes = [1, 2, 3, 4, 5]
    a = gen.generate(classes=classes, batch_size=1, seed=7, images=False)
    b = gen.generate(classes=classes, batch_size=3, seed=7, images=False)  # images join at different scales
    assert np.array_equal(a.tokens, b.tokens)
    smooth = gen.generate(classes=classes[:2], batch_size=2, seed=7, method_options={"more_smooth": True})
    assert smooth.images.shape == (2, 4, 4, 3)


@pytest.fixture(scope="module")
def var_engines(tmp_path_factory):
    """A tiny VAR written as released files (var_d16.pth layout, vae_ch160v4096z32.pth layout), built to ORT."""
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.models.registry import load_model

    d = tmp_path_factory.mktemp("var")
    off, quant = official_pair(7)
    cfg = tiny_cfg()
    torch.save(off.state_dict(), d / "var_d16.pth")
    vae = VARVQVAE(cfg).init_random(1)
    with torch.no_grad():
        for k, v in quant.state_dict().items():
            vae.quantize.state_dict()[k].copy_(v)
    torch.save(vae.state_dict(), d / "vae.pth")
    ov = dict(depth=2, dim=64, n_head=2, vocab_size=40, cvae=8, patch_nums=PN, num_classes=10, vae_ch=32,
              vae_ch_mult=(1,), vae_num_res_blocks=1)
    loaded = load_model("var-d16", checkpoint=str(d / "var_d16.pth"), vq_checkpoint=str(d / "vae.pth"), overrides=ov)
    build_engine(loaded, d / "eng", BuildOptions(batch_sizes=[1, 4]))
    return d, ov


def test_ort_engine_equals_torch_and_needs_no_model_code(var_engines):
    import json
    import onnx

    d, ov = var_engines
    manifest = json.loads((d / "eng" / "manifest.json").read_text())
    assert manifest["graphs"]["step"]["kinds"] == {"scale": 30}
    assert set(manifest["graphs"]) >= {"step", "next_scale_0", "next_scale_3", "latent_decoder", "vq_decoder"}
    ops = {n.op_type for n in onnx.load(str(d / "eng" / "model.onnx"), load_external_data=False).graph.node}
    assert {"TensorScatter", "Attention"} <= ops and not ops & {"If", "Loop", "Scan"}
    assert manifest["graphs"]["step"]["aliases"]["present_key_0"] == "past_key_0"
    ort_gen = Generator.load(str(d / "eng"), backend="ort")
    torch_gen = Generator.load(str(d / "eng"), backend="torch")
    params = SamplingParams(temperature=0.0, cfg_scale=4.0, cfg_schedule="ramp")
    a = ort_gen.generate(classes=[0, 1, 2, 3, 4], sampling=params, batch_size=3)
    b = torch_gen.generate(classes=[0, 1, 2, 3, 4], sampling=params, batch_size=3)
    assert np.array_equal(a.tokens, b.tokens)
    assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1
    sampled = [g.generate(classes=[5, 6], seed=3, images=False).tokens for g in (ort_gen, torch_gen)]
    assert np.array_equal(*sampled)


def test_cli_build_verify_generate_code(var_engines, tmp_path):
    from click.testing import CliRunner

    from arexport.cli import cli

    d, ov = var_engines
    r = CliRunner().invoke(cli, ["verify", str(d / "eng")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["generate", str(d / "eng"), "--backend", "ort", "--method", "code", "--refiner", str(d / "eng"),
                                 "--drafter-steps", "2", "--classes", "1,2", "--save-tokens", str(tmp_path / "t.npy"),
                                 "--stats-json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    import json

    s = json.loads((tmp_path / "s.json").read_text())
    assert s["drafter_forwards_per_image"] == 2 and s["refiner_forwards_per_image"] == 2
    assert np.load(tmp_path / "t.npy").shape == (2, 30)
    r = CliRunner().invoke(cli, ["generate", str(d / "eng"), "--backend", "ort", "--method", "code", "--classes", "1"])
    assert r.exit_code == 1 and "needs a refiner" in r.output


def test_bad_input_is_named(var_engines, tmp_path):
    from arexport.models.registry import load_model

    d, ov = var_engines
    with pytest.raises(ArexportError, match="holds a var model.*var-d16"):
        load_model("GPT-B", checkpoint=str(d / "var_d16.pth"))
    lg = tmp_path / "llamagen.pth"
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2)}, lg)
    with pytest.raises(ArexportError, match="holds a llamagen model"):
        load_model("var-d16", checkpoint=str(lg), overrides=ov)
    with pytest.raises(ArexportError, match="VQVAE with a 40 x 8 codebook; the model needs 4096 x 32"):
        load_model("var-d16", random_init=True, vq_checkpoint=str(d / "vae.pth"),
                   overrides={k: v for k, v in ov.items() if k not in ("vocab_size", "cvae")})
    with pytest.raises(ArexportError, match="VAR transformer, not its VQVAE"):
        load_model("var-d16", checkpoint=str(d / "var_d16.pth"), vq_checkpoint=str(d / "var_d16.pth"), overrides=ov)
    gen = Generator.load(str(d / "eng"), backend="ort")
    with pytest.raises(ArexportError, match="class id 10 out of range"):
        gen.generate(classes=[10])
    with pytest.raises(ArexportError, match="does not apply to"):
        gen.generate(classes=[1], method="sjd")
    from arexport.calibration.calibrate import calibrate_engine

    with pytest.raises(ArexportError, match="serves scale .var., which it does not quantize yet"):
        calibrate_engine(d / "eng", tmp_path / "q", "int8")
    assert not (d / "eng.calib").exists()
    with pytest.raises(ArexportError, match="drafter_steps must be in"):
        Generator(gen.engine, gen.engine).generate(classes=[1], method="code", method_options={"drafter_steps": 4})


def test_service_batches_var_and_code_requests_like_solo_runs():
    from concurrent.futures import ThreadPoolExecutor

    from arexport.serving.service import GenerationService

    off, quant = official_pair(8)
    roff, _ = official_pair(9, depth=1)
    cfg, rcfg = tiny_cfg(), tiny_cfg(depth=1)
    var, vae = ours_from_official(off, quant, cfg)
    ref, _ = ours_from_official(roff, quant, rcfg)
    gen = Generator(engine_of(var, vae, cfg), engine_of(ref, vae, rcfg))
    reqs = [([0, 1], 1, "var"), ([3], 2, "code"), ([5, 6, 7], 3, "var"), ([9, 2], 4, "code")]
    svc = GenerationService(gen, batching="continuous", max_batch=3)
    try:
        with ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(lambda c=c, s=s, m=m: svc.submit(c, seed=s, method=m, images=True).result(timeout=120))
                    for c, s, m in reqs]
            outs = [f.result(timeout=150) for f in futs]
    finally:
        svc.close()
    for (c, s, m), out in zip(reqs, outs):
        alone = gen.generate(classes=c, seed=s, method=m, sampling=svc.default_sampling())
        assert np.array_equal(out.tokens, alone.tokens)
        assert out.images.shape == (len(c), 4, 4, 3)


@pytest.mark.slow
def test_shipped_demo_var_quality_and_code_cuts_the_drafters_forwards():
    """The packaged VAR demo at its default sampler: >= 0.90 class accuracy under both judges (the
    issue's floor, 50 images per class here), and CoDe with the small refiner within 3 points while the
    large model runs 2 of the 4 scales."""
    from arexport.quality import score_images

    classes = [i % 10 for i in range(500)]
    gen = Generator.load("demo-var", draft="demo-var-small")
    var = gen.generate(classes=classes, method="var", batch_size=250, seed=11)
    code = gen.generate(classes=classes, method="code", batch_size=250, seed=11)
    assert var.stats["target_forwards_per_image"] == 4
    assert code.stats["drafter_forwards_per_image"] == 2 and code.stats["refiner_forwards_per_image"] == 2
    for judge in ("cnn", "mlp"):
        a_var = score_images(var.images, classes, judge).accuracy
        a_code = score_images(code.images, classes, judge).accuracy
        assert a_var >= 0.90, (judge, a_var)
        assert a_code >= a_var - 0.03, (judge, a_var, a_code)
