"""Checkpoint layouts of the reference repositories all load; bad files and keys are named."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from arexport.errors import CheckpointError
from arexport.models.checkpoint import load_into, read_state_dict
from arexport.models.llamagen import LlamaGen
from arexport.models.registry import load_model


def _fresh(cfg):
    return LlamaGen(cfg)


@pytest.mark.parametrize("layout", ["model", "ema", "module", "state_dict", "bare", "bare+freqs_cis", "ddp-prefix", "compile-prefix", "safetensors"])
def test_every_layout_loads(tmp_path, tiny_c2i, layout):
    sd = {k: v.clone() for k, v in tiny_c2i.model.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    if layout in ("model", "ema", "module", "state_dict"):
        torch.save({layout: sd, "steps": 10, "args": {"lr": 1e-4}}, path)
    elif layout == "bare":
        torch.save(sd, path)
    elif layout == "bare+freqs_cis":
        torch.save({**sd, "freqs_cis": torch.zeros(17, 8, 2)}, path)
    elif layout == "ddp-prefix":
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif layout == "compile-prefix":
        torch.save({f"_orig_mod.{k}": v for k, v in sd.items()}, path)
    else:
        path = tmp_path / "ckpt.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = load_model("llamagen-c2i-B", checkpoint=str(path), overrides=dict(tiny_c2i.source["overrides"]))
    for k, v in tiny_c2i.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k


def test_t2i_checkpoint_with_uncond_embedding(tmp_path, tiny_t2i):
    path = tmp_path / "t2i.pth"
    torch.save({"model": tiny_t2i.model.state_dict()}, path)
    loaded = load_model("llamagen-t2i-B", checkpoint=str(path), overrides=dict(tiny_t2i.source["overrides"]))
    assert torch.equal(loaded.model.cls_embedding.uncond_embedding, tiny_t2i.model.cls_embedding.uncond_embedding)


def test_misshaped_key_is_named(tmp_path, tiny_c2i):
    sd = dict(tiny_c2i.model.state_dict())
    sd["layers.1.attention.wo.weight"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: layers\.1\.attention\.wo\.weight \(checkpoint \(3, 3\)"):
        load_model("llamagen-c2i-B", checkpoint=str(tmp_path / "bad.pt"), overrides=dict(tiny_c2i.source["overrides"]))


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny_c2i):
    sd = dict(tiny_c2i.model.state_dict())
    del sd["norm.weight"]
    sd["extra.head.weight"] = torch.zeros(2)
    torch.save({"model": sd}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        load_model("llamagen-c2i-B", checkpoint=str(tmp_path / "bad.pt"), overrides=dict(tiny_c2i.source["overrides"]))
    assert "missing keys: norm.weight" in str(e.value)
    assert "unexpected keys: extra.head.weight" in str(e.value)


def test_wrong_model_size_lists_shapes(tmp_path, tiny_c2i):
    torch.save(tiny_c2i.model.state_dict(), tmp_path / "small.pt")
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: cls_embedding.embedding_table.weight \(checkpoint \(1001, 64\), model \(1001, 768\)\)"):
        load_model("llamagen-c2i-B", checkpoint=str(tmp_path / "small.pt"), overrides={"n_layer": 2})


@pytest.mark.parametrize("content,match", [
    (b"this is not a checkpoint at all", r"not a readable PyTorch checkpoint: .*x\.pt is a text file \(starts with 'this is not"),
    (b"", r"not a readable PyTorch checkpoint: .*x\.pt is empty"),
    (b"\x00\x01\x02binary", r"neither a torch\.save zip archive nor a pickle"),
])
def test_unreadable_files(tmp_path, content, match):
    p = tmp_path / "x.pt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        read_state_dict(p)


def test_bad_safetensors(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x00" * 32)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_state_dict(p)


def test_non_dict_and_tensorless_checkpoints(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict of tensors, found list"):
        read_state_dict(tmp_path / "list.pt")
    torch.save({"steps": 3, "args": {"a": 1}}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="no state dict found"):
        read_state_dict(tmp_path / "meta.pt")


def test_arbitrary_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_state_dict(p)


def test_missing_checkpoint_is_named_before_the_model_is_built(tmp_path, monkeypatch):
    from arexport.models import registry

    monkeypatch.setattr(registry, "model_config", lambda *a, **k: pytest.fail("built the model before checking the path"))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model("GPT-XXL", checkpoint=str(tmp_path / "nope.pt"))
    with pytest.raises(CheckpointError, match="tokenizer checkpoint path is a directory"):
        load_model("GPT-XXL", random_init=True, vq_checkpoint=str(tmp_path))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_state_dict(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        read_state_dict(tmp_path)


def test_load_into_reports_nothing_on_success(tiny_c2i):
    m = LlamaGen(tiny_c2i.model.cfg)
    load_into(m, tiny_c2i.model.state_dict(), "mem")
    assert torch.equal(m.output.weight, tiny_c2i.model.output.weight)
