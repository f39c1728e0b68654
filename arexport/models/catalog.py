"""Model catalogs: what each family's PyTorch module says about its released models.

A catalog lives next to its family's model code (models/<family>.py) and answers what the registry
asks: the canonical names and their aliases, the config of a name, the parameter names only its
checkpoints hold, and (where a family loads differently) how to load it. The registry asks every
catalog instead of switching on name prefixes, so a new family is one catalog in its own module
plus one line in `registry.CATALOGS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from arexport.errors import ArexportError
from arexport.format.spec import ModelSpec


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


class Catalog:
    """Base catalog of one family; subclasses set the attributes and implement names/canonical/base_config."""

    family: str = "?"
    config_class: type = object
    checkpoint_marker: Optional[str] = None  # a parameter-name prefix only this family's checkpoints hold
    refines: Optional[str] = None  # a family whose marker this family's checkpoints also hold (its marker wins)
    hint: str = ""  # the --model names to suggest for a checkpoint of this family
    alias_help: str = ""  # the aliases an unknown-name error lists (the README's spellings)
    tokenizer_grid: Optional[int] = 16  # image pixels per token side (VQ-16); None: the config fixes the image size

    def names(self) -> list[str]:
        """Every canonical name of the family."""
        raise NotImplementedError

    def canonical(self, name: str) -> Optional[str]:
        """The canonical name for `name` (an alias or itself), or None when it is not this family's."""
        raise NotImplementedError

    def base_config(self, name: str, image_size: Optional[int]):
        """The config of a canonical name at an image size (None: its native size)."""
        raise NotImplementedError

    def config(self, name: str, overrides: Optional[dict] = None, image_size: Optional[int] = None):
        """The config of a canonical name with config-field overrides and image size."""
        if image_size is not None and self.tokenizer_grid and image_size % self.tokenizer_grid:
            raise ArexportError(f"image size {image_size} is not a multiple of {self.tokenizer_grid} (the VQ-{self.tokenizer_grid} downsampling)")
        return with_overrides(self.base_config(name, image_size), overrides)

    def check_trained(self, name: str, cfg, args: dict, path) -> None:
        """Refuse a checkpoint whose recorded training arguments (a dict) contradict the config of `name`."""

    # A catalog whose models load differently (a transformers directory) defines
    # load(name, checkpoint, random_init, overrides, vq_checkpoint, dtype, device) -> LoadedModel.
    load = None


def with_overrides(cfg, overrides: Optional[dict]):
    """`cfg` with config-field overrides applied (a bad field or value is a one-line error)."""
    if not overrides:
        return cfg
    try:
        return cfg.with_overrides(**overrides)
    except (ValueError, TypeError) as e:
        raise ArexportError(f"invalid model config: {e}") from None
