"""Emu3 (transformers' Emu3ForConditionalGeneration): raster text-to-image from prompts, with an
end-of-line token closing every row of the grid.

A prompt becomes BOS + prompt + the positive suffix + the image header ('<|image start|>h*w<|image
token|>'), tokenized by the checkpoint's tokenizer and left-padded to the engine's prompt slots; the
unconditional CFG rows are the negative prompt rendered the same way without the suffix (the official
demo's unconditional context). The image is h rows of w + 1 tokens; the step graph forces the last
token of each row to EOL (models/emu3.py), so every raster method runs unchanged and samples EOL with
probability one.
"""

from __future__ import annotations

from arexport.errors import ArexportError
from arexport.families.base import Conditions
from arexport.families.janus import JanusFamily


class Emu3Family(JanusFamily):
    name = "emu3"

    def sampling_defaults(self, spec):
        # baaivision/Emu3 image_generation.py lines 34 and 53-55: guidance 3.0, sampling with top_k 2048
        return {"cfg_scale": 3.0, "top_k": 2048, "top_p": 1.0, "temperature": 1.0}

    def null_conditions(self, engine, conds: Conditions) -> Conditions:
        prompter = engine.text_encoder
        if prompter is None or not hasattr(prompter, "negative"):
            raise ArexportError(f"{engine.spec.name} needs its prompter (tokenizer.json in the engine) for the negative prompt")
        ids, mask = prompter.negative(len(conds))
        return Conditions(ids=ids.to(conds.ids.device), mask=mask.to(conds.mask.device))

    def check_draft(self, target_spec, draft_spec) -> None:
        super(JanusFamily, self).check_draft(target_spec, draft_spec)
        for f in ("bos_token_id", "pad_token_id", "eol_token_id", "text_vocab_size"):
            if target_spec.extra.get(f) != draft_spec.extra.get(f):
                raise ArexportError(f"draft {draft_spec.name} does not share {target_spec.name}'s tokenizer ({f})")


class LuminaMGPTFamily(Emu3Family):
    """Lumina-mGPT 1.0 (models/lumina_mgpt.py): the same grid with new-line tokens; the unconditional
    context is the image-start and resolution tokens alone (an empty negative prompt without BOS)."""

    name = "lumina-mgpt"

    def sampling_defaults(self, spec):
        # Alpha-VLLM/Lumina-mGPT inference_solver.py l.391 (create_logits_processor: cfg 3.0, image_top_k 2000)
        return {"cfg_scale": 3.0, "top_k": 2000, "top_p": 1.0, "temperature": 1.0}
