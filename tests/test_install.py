"""Our packages live beside the ecosystem's: transformers >= 5.25 depends on Hugging Face's `kernels`
distribution and imports it from its activations; our Triton ops are `thinkrec_kernels`, so both import in one
process and `import kernels` is always theirs (issue 25: ours used to shadow it and transformers failed)."""

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.smoke

# Run in a fresh interpreter started in the repository root (where a top-level `kernels/` of ours would win
# the import), our package imported first: the order in which the old name broke transformers.
BOTH = r"""
import importlib.util, sys, tempfile
from pathlib import Path
import torch
import thinkrec_kernels
import transformers.activations                     # imports Hugging Face's `kernels` where it is installed
from transformers import AutoModelForCausalLM
sys.path.insert(0, "tests")
from tiny_llama import tiny_llama

with tempfile.TemporaryDirectory() as d:
    tiny_llama().save_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
logits = model(torch.tensor([[1, 5, 7]])).logits
assert logits.shape == (1, 3, 300), logits.shape
x, W = torch.randn(3, 64), model.model.layers[0].self_attn.q_proj.weight
A, B, w = torch.randn(2, 4, 64), torch.randn(2, 64, 4), torch.rand(3, 2)
from thinkrec_kernels import reference as ref
assert torch.allclose(thinkrec_kernels.lora_linear(x, W, None, A, B, w, 0.5),
                      ref.lora_linear(x, W, None, A, B, w, 0.5), atol=1e-4)
spec = importlib.util.find_spec("kernels")
if spec is None:
    print("KERNELS none")
else:
    import kernels
    from importlib import metadata
    theirs = metadata.distribution("kernels").locate_file("kernels/__init__.py")
    assert Path(kernels.__file__).resolve() == Path(theirs).resolve(), \
        f"`import kernels` found {kernels.__file__}, not the kernels distribution's {theirs}"
    assert hasattr(kernels, "CUDAProperties"), f"{kernels.__file__} is not Hugging Face's kernels"
    print("KERNELS", kernels.__file__)
print("OK")
"""


def test_transformers_hf_kernels_and_ours_in_one_process():
    proc = subprocess.run([sys.executable, "-c", BOTH], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
    import transformers
    if tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (5, 25):
        # from 5.25 on, `kernels` is one of transformers' requirements: it must be there, and theirs
        assert "KERNELS none" not in proc.stdout, "transformers >= 5.25 installed without Hugging Face's kernels"


def test_no_top_level_package_takes_a_common_name():
    """The wheel ships thinkrec and thinkrec_kernels only; neither name is `kernels`, and no folder of the
    repository that setuptools would pick up shadows an installed distribution."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = cfg["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(include) == ["thinkrec*", "thinkrec_kernels*"], include
    assert not (ROOT / "kernels").exists(), "a top-level kernels/ folder would shadow Hugging Face's package"
    spec = importlib.util.find_spec("thinkrec_kernels")
    assert spec is not None and Path(spec.origin).parent == ROOT / "thinkrec_kernels"


def test_constraints_pin_every_runtime_dependency():
    """constraints.txt (the tested set the README's commands install) pins each dependency that pyproject.toml
    names, torch included, and each pin satisfies pyproject's range."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = {}
    for n, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            spec = list(req.specifier)
            assert len(spec) == 1 and spec[0].operator == "==", f"constraints.txt:{n}: {line!r} is not name==version"
            pins[canonicalize_name(req.name)] = spec[0].version
    wanted = cfg["project"]["dependencies"] + cfg["project"]["optional-dependencies"]["test"]
    for text in wanted:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt pins no version of {req.name} (pyproject.toml asks {text!r})"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {text!r}"
