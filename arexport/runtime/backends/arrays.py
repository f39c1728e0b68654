"""Arrays an engine directory carries beside its graphs: codebook, latent neighbours, null caption."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from arexport.errors import ArexportError
from arexport.format.manifest import Manifest


class EngineDirArrays:
    """Mixin for backends that run an engine directory (needs self.directory, self.manifest, self.device)."""

    directory: Path
    manifest: Manifest

    def _array(self, key: str) -> Optional[np.ndarray]:
        cache = self.__dict__.setdefault("_arrays", {})
        if key not in cache:
            name = self.manifest.arrays.get(key)
            cache[key] = np.load(self.directory / name) if name else None
        return cache[key]

    def codebook(self) -> torch.Tensor:
        cb = self._array("codebook")
        if cb is None:
            raise ArexportError(f"{self.directory} has no codebook.npy (built without VQ weights)")
        return torch.from_numpy(cb).to(self.device)

    def null_caption(self) -> torch.Tensor:
        u = self._array("uncond_embedding")
        if u is None:
            raise ArexportError(f"{self.directory} has no uncond_embedding.npy")
        return torch.from_numpy(u)

    def _load_neighbors(self, k: int):
        nb = self._array("neighbors")
        return None if nb is None else torch.from_numpy(nb.astype(np.int64))
