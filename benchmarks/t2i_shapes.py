#!/usr/bin/env python
"""Write random-weight checkpoint directories (transformers save_pretrained layout) at Emu3-Gen's and
Lumina-mGPT-7B's widths with a reduced layer count, for step latency work without the real weights:

    python benchmarks/t2i_shapes.py --model lumina --out /tmp/lumina-7b-2l
    python benchmarks/step_latency.py --model lumina-mgpt-7b-768 --checkpoint /tmp/lumina-7b-2l --batch 2 --q 1,16 --offset 1176
    python benchmarks/t2i_shapes.py --model emu3 --out /tmp/emu3-2l
    python benchmarks/step_latency.py --model emu3-gen --checkpoint /tmp/emu3-2l --batch 2 --q 1,16 --offset 4095

Lumina-mGPT 7B (Chameleon-7B): width 4096, FFN 11008, 32 heads (all key/value heads), head 128, the
65536-entry vocabulary with its 8192 image tokens. Emu3-Gen: width 4096, FFN 14336, 32 heads, 8
key/value heads, head 128, the 32768 visual tokens; its text vocabulary is cut from 184622 to the
visual tokens and a few specials (the full embedding and head are 6 GB in fp32, which the 24 GB
benchmark machine cannot hold in the torch model, the export and the ONNX Runtime session at once):
the step's head here is 4096 x 32.9k, not 4096 x 184622. The VQ models are tiny (the step never runs
them). Tokenizers are the tests' word-level ones, so prompts only exercise the path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("emu3", "lumina"), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    if args.model == "lumina":
        from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig

        from tests.test_lumina_mgpt import make_lumina

        vq = ChameleonVQVAEConfig(embed_dim=4, num_embeddings=8192, latent_channels=4, base_channels=32,
                                  channel_multiplier=[1, 1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[])
        text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers, num_attention_heads=32,
                    num_key_value_heads=32, max_position_embeddings=10240)
        make_lumina(out, layers=args.layers, v=8192, text=text, vq=vq, vocab_size=65536, scale=0.02)
    else:
        from transformers.models.emu3.configuration_emu3 import Emu3VQVAEConfig

        from tests.test_emu3 import make_emu3

        vq = Emu3VQVAEConfig(codebook_size=32768, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1, 1, 1],
                             num_res_blocks=1, attn_resolutions=[], hidden_size=32, num_attention_heads=1)
        text = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers, num_attention_heads=32,
                    num_key_value_heads=8, max_position_embeddings=16384)
        make_emu3(out, layers=args.layers, v=32768, text=text, vq=vq, scale=0.02)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
