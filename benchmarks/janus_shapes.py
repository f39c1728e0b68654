#!/usr/bin/env python
"""Write a random-weight Janus checkpoint directory (transformers save_pretrained layout) of Janus-Pro-1B's
generation shapes, for latency work without the real weights:

    python benchmarks/janus_shapes.py --out /tmp/janus-pro-1b-random
    python benchmarks/step_latency.py --model janus-pro --checkpoint /tmp/janus-pro-1b-random --batch 2 --q 1,16 --offset 288

Language model as DeepSeek-LLM-1.3B (24 layers, width 2048, 16 heads, FFN 5632, vocab 102400), the
generation embedding/aligner/head and VQ model as Janus-Pro's (16384 codes of 8 dims, 24 x 24 tokens for
384 px). The understanding tower (SigLIP), which image generation never runs, is shrunk to one tiny layer.
`--tiny` writes the small model the methods benchmark uses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
from tests.test_janus import make_janus  # noqa: E402  (tokenizer, processor and chat template written offline)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    if args.tiny:
        make_janus(Path(args.out))
        return
    import torch
    from transformers import JanusConfig, JanusForConditionalGeneration, LlamaConfig
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    small, proc = make_janus(Path(args.out) / "_tokenizer")  # the tokenizer files of the tiny model
    vocab = 102400
    text = LlamaConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                       num_key_value_heads=16, max_position_embeddings=16384, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = JanusVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=384,
                               patch_size=16, num_image_tokens=576)
    vq = JanusVQVAEConfig(num_patches=24)  # defaults: 16384 x 8 codebook, projection and image embed width 2048
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(JanusConfig(text_config=text, vision_config=vision, vq_config=vq)).eval()
    model.generation_config.generation_kwargs = small.generation_config.generation_kwargs
    model.save_pretrained(args.out)
    proc.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
