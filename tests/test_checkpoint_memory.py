"""Loading a transformers checkpoint (Janus-Pro, Emu3, Lumina-mGPT go through `arexport.hf.load_safetensors_model`)
must not need twice the checkpoint's size in memory (issue 32: a 7-8B model on a machine sized for one copy).

Measured in a child process: the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) after the
load and after every parameter has been read, against the RSS before the load. The negative control loads the same
file the naive way (a materialised model, then load_state_dict of the whole file), which holds two copies at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the loaders under test need transformers (the [text] extra)")
if not Path("/proc/self/clear_refs").exists():
    pytest.skip("needs Linux /proc to reset the RSS high-water mark", allow_module_level=True)

CHILD = r"""
import sys
import torch
from transformers import ChameleonConfig, ChameleonForConditionalGeneration

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

def naive(d):
    from safetensors.torch import load_file
    m = ChameleonForConditionalGeneration(ChameleonConfig.from_pretrained(d))
    m.load_state_dict(load_file(f"{d}/model.safetensors"), strict=False)
    return m

before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark restarts at the current RSS
if sys.argv[2] == "arexport":
    from arexport.models.lumina_mgpt import load_hf_chameleon
    model = load_hf_chameleon(sys.argv[1])
else:
    model = naive(sys.argv[1])
with torch.no_grad():
    total = sum(float(p.float().sum()) for p in model.parameters())  # every weight read: resident now
print(status("VmHWM") - before)
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_lumina_mgpt import make_lumina

    d = tmp_path_factory.mktemp("mem") / "lumina"
    make_lumina(d, layers=6, text=dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8))
    return d, sum(f.stat().st_size for f in d.glob("*.safetensors"))


def peak_growth(d: Path, how: str) -> int:
    res = subprocess.run([sys.executable, "-c", CHILD, str(d), how], capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.strip().splitlines()[-1])


def test_loading_a_checkpoint_holds_one_copy_of_its_weights(checkpoint):
    d, size = checkpoint
    assert size > 60e6  # large enough that allocator noise (a few MB) cannot decide the comparison
    grown = peak_growth(d, "arexport")
    assert grown < 1.4 * size, f"loading peaked at {grown / size:.2f}x the checkpoint's {size / 1e6:.0f} MB"
    naive = peak_growth(d, "naive")  # negative control: two copies at once
    assert naive > 1.8 * size, f"the naive load peaked at only {naive / size:.2f}x: the measurement cannot tell"
