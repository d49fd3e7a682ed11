"""thinkrec/model/fused.py: the Inductor-fused RMSNorm, SiLU(gate) * up and RoPE against their eager
references (values and gradients, fp32 and bf16, two token counts: dynamic shapes, no recompiling per batch),
and a model's packed forward and gradients with the fused ops against the eager ones (Llama and Qwen3's
q/k norms)."""

import pytest
import torch
from torch._dynamo.utils import counters

from tests.test_model_packed import _loss_and_grads, trainable_case
from thinkrec.model import fused
from thinkrec.train.losses import loss_positions

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture
def compiled():
    fused.enable()
    yield
    fused.enable(False)


def _inputs(name, n, dtype, g):
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    if name == "rms_norm":
        return r(n, 48), r(48), 1e-5
    if name == "silu_mul":
        return r(n, 80), r(n, 80)
    return r(n, 3, 16), r(n, 16), r(n, 16)  # rope: x [n, H, d], cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["rms_norm", "silu_mul", "rope"])
def test_compiled_ops_match_the_references_at_any_token_count(compiled, name, dtype):
    counters.clear()
    for n in (37, 53):  # a second batch size must not compile again (dynamic shapes)
        args = _inputs(name, n, dtype, torch.Generator().manual_seed(n))
        ref_args = [a.detach().clone().requires_grad_() if torch.is_tensor(a) else a for a in args]
        out, ref = fused._ops[name](*args), fused._REF[name](*ref_args)
        assert out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, **TOL[dtype])
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        out.backward(grad)
        ref.backward(grad)
        for a, b in zip(args, ref_args):
            if torch.is_tensor(a):
                torch.testing.assert_close(a.grad, b.grad, **TOL[dtype])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_model_with_fused_ops_matches_eager(kind):
    lm, b, cf, w = trainable_case(kind)
    loss_e, g_e = _loss_and_grads(lm, b, cf, w, packed=True)
    with torch.no_grad():
        h_e = lm(b.input_ids, b.attention_mask, cf_embeds=cf, placeholder_mask=b.ph_mask, select=loss_positions(b),
                 expert_weights=w)
    fused.enable()
    try:
        assert fused.enabled()
        loss_f, g_f = _loss_and_grads(lm, b, cf, w, packed=True)
        with torch.no_grad():
            h_f = lm(b.input_ids, b.attention_mask, cf_embeds=cf, placeholder_mask=b.ph_mask,
                     select=loss_positions(b), expert_weights=w)
    finally:
        fused.enable(False)
    assert not fused.enabled()
    torch.testing.assert_close(h_f, h_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_f, loss_e, atol=1e-6, rtol=1e-6)
    assert g_f.keys() == g_e.keys()
    for n in g_e:
        torch.testing.assert_close(g_f[n], g_e[n], atol=1e-5, rtol=1e-4, msg=n)


def test_other_norms_and_activations_run_as_written():
    ln = torch.nn.LayerNorm(8)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fused.rms_norm(ln, x), ln(x))
    gelu = torch.nn.GELU()
    torch.testing.assert_close(fused.silu_mul(gelu, x, x), gelu(x) * x)


def test_train_fuses_bf16_cpu_runs_by_default(tmp_path, capsys, monkeypatch):
    """train.py --fused-ops auto (the default): compiled ops for a bf16 run on a CPU long enough to pay back the
    compile; eager for a shorter one, at fp32 and with --fused-ops off; where Inductor cannot compile, the bf16
    run goes on eager and says so; the process gets eager back when train.main returns. (fused.enable is
    stubbed: what is checked is the decision.)"""
    import train
    from tests.test_train_cli import train_tiny_run
    from thinkrec.errors import UserError

    calls = []

    def stub(on=True, check=False):
        calls.append(on)
        if on and fail:
            raise UserError("no compiler here")

    monkeypatch.setattr(fused, "enable", stub)
    bf16 = ["--precision", "bf16"]
    for name, extra, fail, min_steps, want in [
            ("bf16", bf16, False, 1, "fused ops: on (--fused-ops auto"),
            ("broken", bf16, True, 1, "fused ops: off, eager"),
            ("short", bf16, False, 10_000, "would not pay back"),
            ("fp32", ["--precision", "fp32"], False, 1, None),
            ("off", bf16 + ["--fused-ops", "off"], False, 1, None)]:
        calls.clear()
        monkeypatch.setattr(train, "FUSED_MIN_STEPS", min_steps)
        (tmp_path / name).mkdir()
        train_tiny_run(tmp_path / name, *extra)
        out = capsys.readouterr().out
        if want:
            assert want in out, name
        if name in ("bf16", "broken"):
            assert calls[0] is True and calls[-1] is False, (name, calls)  # tried, then eager restored
        else:  # never compiled; only the restore at the end
            assert calls == [False], (name, calls)
            assert (name == "short") == ("fused ops:" in out), name


def test_planned_steps():
    """The step count auto weighs: each stage's rows (--stage-rows, else --max-train-samples, 0 = the whole
    split, never more than it) times --epochs over --batch-size, for the stages up to --last-stage."""
    import train

    a = train.parse(["--max-train-samples", "64", "--batch-size", "8"])
    assert train.planned_steps(a, 10_000) == 8 * len(train.stages.STAGES)
    a = train.parse(["--max-train-samples", "0", "--batch-size", "10", "--last-stage", train.stages.STAGES[0],
                     "--epochs", "2"])
    assert train.planned_steps(a, 95) == 19
