"""VQ-16 decoder: reference checkpoint layout loads (encoder ignored), real shapes decode to uint8."""

from __future__ import annotations

import pytest
import torch

from arexport.errors import CheckpointError
from arexport.models.vq import VQDecoder, load_vq_decoder, to_uint8_image


def _reference_layout_state_dict(dec: VQDecoder) -> dict:
    """A full VQModel-style state dict: decoder keys plus encoder/quant_conv/usage keys it ignores."""
    sd = dict(dec.state_dict())
    sd["encoder.conv_in.weight"] = torch.zeros(128, 3, 3, 3)
    sd["quant_conv.weight"] = torch.zeros(8, 256, 1, 1)
    sd["quant_conv.bias"] = torch.zeros(8)
    sd["quantize.codebook_used"] = torch.zeros(65536)
    return sd


def test_reference_key_names():
    keys = VQDecoder().state_dict().keys()
    for k in ["quantize.embedding.weight", "post_quant_conv.weight", "decoder.conv_in.weight",
              "decoder.mid.1.q.weight", "decoder.conv_blocks.0.res.0.norm1.weight", "decoder.conv_blocks.0.attn.2.proj_out.bias",
              "decoder.conv_blocks.0.upsample.conv.weight", "decoder.conv_blocks.1.res.0.nin_shortcut.weight",
              "decoder.norm_out.weight", "decoder.conv_out.weight"]:
        assert k in keys, k
    assert not any(k.startswith("decoder.conv_blocks.4.upsample") for k in keys)  # the last level keeps its size
    assert sum(k.startswith("decoder.conv_blocks.0.attn.") and k.endswith("q.weight") for k in keys) == 3


@pytest.mark.slow
def test_decodes_real_shaped_input(tmp_path):
    dec = VQDecoder().init_random(0)
    torch.save({"model": _reference_layout_state_dict(dec)}, tmp_path / "vq_ds16_c2i.pt")
    loaded = load_vq_decoder(str(tmp_path / "vq_ds16_c2i.pt"))
    tokens = torch.randint(0, 16384, (1, 256))  # 16x16 grid -> 256 px
    with torch.inference_mode():
        img = loaded(tokens)
        ref = dec(tokens)
    assert img.shape == (1, 256, 256, 3) and img.dtype == torch.uint8
    assert torch.equal(img, ref)
    assert img.float().std() > 0


def test_decoding_uses_the_l2_normalised_codebook():
    """LlamaGen's VQ decodes l2-normalised rows; codebook() gives the raw rows LANTERN's neighbours use."""
    dec = VQDecoder().init_random(3)
    cb = dec.codebook()
    assert cb.shape == (16384, 8) and not torch.allclose(cb.norm(dim=-1), torch.ones(16384), atol=1e-3)
    tokens = torch.randint(0, 16384, (1, 4))
    with torch.no_grad():
        scaled = VQDecoder().init_random(3)
        scaled.quantize.embedding.weight.mul_(7.0)  # row norms do not matter to decoding
        assert torch.allclose(scaled.decode_float(tokens), dec.decode_float(tokens), atol=1e-5)


def test_pixel_mapping_matches_torchvision_save_image():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8_image(x)[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]


def test_missing_decoder_key_is_named(tmp_path):
    sd = _reference_layout_state_dict(VQDecoder())
    del sd["decoder.conv_out.bias"]
    torch.save({"model": sd}, tmp_path / "vq.pt")
    with pytest.raises(CheckpointError, match="missing keys: decoder.conv_out.bias"):
        load_vq_decoder(str(tmp_path / "vq.pt"))
