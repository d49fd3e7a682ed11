"""The C++ scorer (CMakeLists.txt, csrc/): a tiny trained run exported by `python -m thinkrec.export aoti`
(torch.export + AOTInductor), built with CMake against the torch wheel's libtorch, scored by ctest and by
the `thinkrec-score` tool; both must give infer.py's scores. Also the exported program itself against the
padding-free scorer with per-row mixtures, before any compilation."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_train_cli import train_tiny_run
from tests.train_fixtures import PAD, sample_set, tiny_lm

ROOT = Path(__file__).resolve().parents[1]


def test_exported_program_equals_the_scorer_with_mixtures():
    from thinkrec.export import ExportedScorer
    from thinkrec.batches import right_padded
    from thinkrec.scoring import score_samples

    lm = tiny_lm(layers=2, n_experts=2, cf_dim=5)
    lm.eval()
    g = torch.Generator().manual_seed(0)
    ue, ie = torch.randn(6, 5, generator=g), torch.randn(11, 5, generator=g)
    sset = sample_set(16, ids=True, seed=2)
    samples = [sset.sample(i) for i in range(5)]
    w = torch.tensor([[1, 0, 0], [0, 1, 0], [0, .3, .7], [.2, .5, .3], [0, 0, 1]], dtype=torch.float32)
    rows = right_padded(samples, PAD)
    names = ("input_ids", "attention_mask", "slot_kind", "slot_index")
    model = ExportedScorer(lm, ue, ie).eval()
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=4096)
    with torch.no_grad():
        ep = torch.export.export(model, tuple(rows[n][:3].clone() for n in names) + (w[:3].clone(),),
                                 dynamic_shapes=({0: batch, 1: seq},) * 4 + ({0: batch},))
        got = ep.module()(*(rows[n] for n in names), w).double().numpy()  # other batch size and length
    want = score_samples(lm, samples, w, ue, ie, PAD)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.skipif(not (shutil.which("cmake") and shutil.which("g++")), reason="needs cmake and g++")
def test_cmake_build_ctest_and_cli_give_infer_scores(tmp_path):
    from thinkrec.export import main as export_main

    run = train_tiny_run(tmp_path)
    out = tmp_path / "export"
    info = export_main(["aoti", "--run-dir", str(run), "--out", str(out)])
    assert info["rows"] == 20 and (out / "scorer.pt2").is_file()

    build = tmp_path / "build"
    prefix = torch.utils.cmake_prefix_path
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}",
                    f"-DTHINKREC_TEST_EXPORT={out}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True)
    ctest = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True)
    assert ctest.returncode == 0, ctest.stdout + ctest.stderr
    assert "100% tests passed" in ctest.stdout

    cli = subprocess.run([str(build / "thinkrec-score"), str(out)], capture_output=True, text=True, check=True)
    cpp = [json.loads(x) for x in cli.stdout.splitlines()]
    py = [json.loads(x) for x in (out / "python" / "scores.jsonl").read_text().splitlines()]
    assert [(x["pos"], x["user_id"], x["item_id"], x["label"]) for x in cpp] == \
        [(x["pos"], x["user_id"], x["item_id"], x["label"]) for x in py]
    assert np.abs(np.array([x["score"] for x in cpp]) - np.array([x["score"] for x in py])).max() < 1e-4
    assert json.loads(cli.stderr.strip().splitlines()[-1])["rows"] == 20
    bad = subprocess.run([str(build / "thinkrec-score"), str(tmp_path / "missing")], capture_output=True, text=True)
    assert bad.returncode == 1 and "thinkrec-score: error:" in bad.stderr and "missing" in bad.stderr
