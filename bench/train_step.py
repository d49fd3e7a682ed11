"""Samples/s of one training step, ours against the official recipe (HF + peft), stages 1 and 3.

    python bench/train_step.py                      # SmolLM2-135M, batch 8, real ML-1M prompts, CPU
    python bench/train_step.py --repeats 5 --device cuda

Providers (same model weights, same LoRA values, same batches of 8 real prompts from the shared ML-1M
split `../shared/data/ml1m-collm` read through the data layer's `csv` source):
- `official`: peft LoRA (r=8, alpha=16, dropout 0.05, q_proj/v_proj) on the HF model, full [B, T, V]
  logits, HF's LM loss over the answer (labels -100 elsewhere) plus BCE on the Yes logit taken from the
  same logits; stage 3 = one group's adapter with only the last 8 layers' LoRA trainable (the official
  code trains one group at a time), inputs_embeds with the CF slots filled by the frozen projector.
- `ours`: thinkrec's trainer step: LoRALinear on kernels.lora_linear, Yes-head BCE and answer-only
  cross-entropy through the kernels (no full logits); stage 3 = all experts in one pass over a batch
  mixing groups, layers below the last 8 merged and run without autograd (thinkrec/train/prefix.py).
- `ours-cached` (stage 3): the same with the prefix cache warm, i.e. every epoch after the first: the
  frozen 22 layers' output of each sample is reused, a step runs the top 8 layers only.
A step = forward, loss, backward, AdamW step. Before timing, the first step's loss of both providers is
checked to agree (dropout off for the check). Each (stage, provider) runs in a fresh subprocess; peak
memory is VmHWM minus VmRSS after the model and batches exist (CPU, /proc/self/clear_refs resets the
mark) or torch.cuda.max_memory_allocated minus the allocation before the steps (CUDA).
Prints a table, then one JSON line with stage1_speedup and stage3_speedup (official time / ours) and
stage3_speedup_cached (official / ours-cached).
"""

import argparse
import itertools
import os
import statistics

from _util import ml1m_prepared, peak_memory, print_json, reset_peak_memory, run_worker, time_runs

YES_W, LM_W = 0.9, 0.1  # plain samples


def _batches(lm, tok, mode, n_batches, batch_size, seed=0):
    """Real prompts: the first train rows of n_batches * batch_size random users' histories."""
    import numpy as np

    from thinkrec.data.tokenize import PromptBuilder
    from thinkrec.train.batches import collate

    prep = ml1m_prepared()
    b = PromptBuilder(prep, tok, mode=mode, max_len=1024, placeholder_ids=lm.placeholder_token_ids)
    rows = np.random.default_rng(seed).choice(np.flatnonzero(prep.inter.split == 0), n_batches * batch_size, False)
    out = []
    for k in range(n_batches):
        idx = rows[k * batch_size:(k + 1) * batch_size]
        out.append(collate([b.sample(int(r)) for r in idx], prep.inter.user[idx], tok.pad_token_id))
    return out, prep


def _cf_tables(prep, dim=256, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)  # CF values do not change the cost; random embeddings suffice
    return torch.randn(prep.n_users, dim, generator=g), torch.randn(prep.n_items, dim, generator=g)


def _official_model(lm, stage):
    """peft LoRA on the same base weights, with our adapter values copied in."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from thinkrec.model.lora import merge_lora

    base = merge_lora(copy.deepcopy(lm.llm), w=[0.0] * lm.n_adapters)  # plain Linear, W exactly (w = 0)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], bias="none")
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for path, mod in lm.lora_layers().items():
            peft_mod = model.base_model.model.get_submodule(path)
            peft_mod.lora_A["default"].weight.copy_(mod.lora_A[0])
            peft_mod.lora_B["default"].weight.copy_(mod.lora_B[0])
    if stage == 3:
        keep = {f"layers.{i}." for i in lm.last_layers(8)}
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n and any(k in n for k in keep))
    return model


def _official_step(model, lm, batch, cf):
    """HF forward with labels (full logits), BCE on the Yes column of the same logits (plain samples)."""
    import torch
    import torch.nn.functional as F

    B = len(batch.labels)
    if len(batch.ans_target) != B:
        raise ValueError("bench/train_step.py: the official step is written for plain samples (one answer token)")
    # the official input is prompt + answer with labels -100 except the answer; HF shifts the labels, so
    # the answer token (label of the last column) is predicted by the last prompt position
    ids = torch.cat([batch.input_ids, batch.ans_target.view(B, 1)], 1)
    mask = torch.cat([batch.attention_mask, torch.ones(B, 1, dtype=torch.long, device=ids.device)], 1)
    labels = torch.full(ids.shape, -100, dtype=torch.long, device=ids.device)
    labels[:, -1] = batch.ans_target
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    if cf is not None:  # stage 3: CoLLM-style inputs_embeds with the CF slots filled by the projector
        ph = torch.cat([batch.ph_mask, torch.zeros(B, 1, dtype=torch.bool, device=ids.device)], 1)
        kw = {"inputs_embeds": lm.embed(ids, cf, ph)}
    else:
        kw = {"input_ids": ids}
    out = model(attention_mask=mask, position_ids=pos, labels=labels, **kw)  # logits [B, T + 1, V]
    yes = out.logits[torch.arange(B), -2, lm.yes_token_id].float()
    return YES_W * F.binary_cross_entropy_with_logits(yes, batch.labels) + LM_W * out.loss


def _our_step(lm, fwd, batch, cf, groups, cached):
    from thinkrec.experts import one_hot_experts
    from thinkrec.train.losses import batch_loss, loss_positions

    w = None if groups is None else one_hot_experts(groups, lm.n_experts).to(batch.input_ids.device)
    kw = {"keys": [("plain", int(r)) for r in batch.rows]} if cached else {}
    h = fwd(batch.input_ids, batch.attention_mask, cf_embeds=cf, placeholder_mask=batch.ph_mask,
            select=loss_positions(batch), expert_weights=w, **kw)
    return batch_loss(h, lm.lm_head_weight, lm.yes_token_id, batch)[0]


def worker(args):
    """One (stage, provider): prints one JSON line with times and memory."""
    import torch

    from thinkrec.model import ThinkRecLM
    from thinkrec.train import stages
    from thinkrec.train.batches import cf_inputs

    torch.manual_seed(0)
    dev = torch.device(args.device)
    lm, tok = ThinkRecLM.from_pretrained(args.model, n_experts=args.experts, cf_dim=256 if args.stage == 3 else None)
    with torch.no_grad():  # a trained-looking global adapter (B = 0 at init would make LoRA a no-op)
        g = torch.Generator().manual_seed(1)
        for mod in lm.lora_layers().values():
            mod.lora_B[0].copy_(0.01 * torch.randn(mod.lora_B[0].shape, generator=g))
    batches, prep = _batches(lm, tok, "text" if args.stage == 1 else "ids", args.batches, args.batch_size)
    ue, ie = _cf_tables(prep) if args.stage == 3 else (None, None)
    cfs = [cf_inputs(b, ue, ie) for b in batches]
    groups = [torch.arange(len(b.labels)) % args.experts for b in batches]  # every batch mixes the groups
    cached = args.provider == "ours-cached"
    fwd = stages.setup(lm, f"stage{args.stage}", prefix_cache_mb=4096 if cached else 0) or lm  # stage 3: FrozenPrefix
    if args.provider == "official":
        model = _official_model(lm, args.stage).to(dev)
        model.train()
        step = lambda b, cf, gr: _official_step(model, lm, b, cf)  # noqa: E731
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        lm.train()
        step = lambda b, cf, gr: _our_step(lm, fwd, b, cf, gr if args.stage == 3 else None, cached)  # noqa: E731
        params = [p for p in lm.parameters() if p.requires_grad]
    lm.to(dev)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-3)
    batches = [b.to(dev) for b in batches]
    cfs = [None if c is None else c.to(dev) for c in cfs]
    if args.check:  # first loss with dropout off, compared across providers by the parent
        (model if args.provider == "official" else lm).eval()
        with torch.no_grad():
            print_json({"check_loss": float(step(batches[0], cfs[0], groups[0]))})
        return

    def train_step(b):
        step(batches[b], cfs[b], groups[b]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in range(len(batches) if cached else 1):  # warm-up (allocator, first calls; fills the prefix cache)
        train_step(b)
    base = reset_peak_memory(dev)
    repeat = itertools.count()
    times = time_runs(lambda: train_step(next(repeat) % len(batches)), args.repeats, dev)
    peak = peak_memory(dev) - base
    tokens = sum(int(batches[r % len(batches)].attention_mask.sum()) for r in range(args.repeats)) / args.repeats
    print_json({"median_s": statistics.median(times), "times": times, "peak_mb": peak / 2**20,
                "tokens_per_batch": tokens})


def _run(stage, provider, a, check=False):
    args = ["--worker", "--stage", stage, "--provider", provider, "--repeats", a.repeats, "--batches", a.batches,
            "--batch-size", a.batch_size, "--device", a.device, "--experts", a.experts]
    args += (["--model", a.model] if a.model else []) + (["--check"] if check else [])
    return run_worker(os.path.abspath(__file__), args)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec (default SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=3, help="distinct batches cycled through")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per provider (median reported)")
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--stages", default="1,3")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--provider", default="ours", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    res = {}
    print(f"| stage | provider | step s (median of {a.repeats}) | samples/s | peak MB | tokens/batch |")
    print("|---|---|---|---|---|---|")
    for stage in [int(s) for s in a.stages.split(",")]:
        chk = {p: _run(stage, p, a, check=True)["check_loss"] for p in ("official", "ours")}
        rel = abs(chk["ours"] - chk["official"]) / max(1.0, abs(chk["official"]))
        if rel > 1e-3:
            raise SystemExit(f"stage {stage}: losses differ before timing: {chk}")
        for p in ("official", "ours") + (("ours-cached",) if stage == 3 else ()):
            r = _run(stage, p, a)
            r["samples_per_s"] = a.batch_size / r["median_s"]
            res[(stage, p)] = r
            print(f"| {stage} | {p} | {r['median_s']:.2f} | {r['samples_per_s']:.2f} | {r['peak_mb']:.0f} | "
                  f"{r['tokens_per_batch']:.0f} |", flush=True)
        res[(stage, "check")] = chk
    out = {"device": a.device, "batch_size": a.batch_size, "repeats": a.repeats}
    for stage in [int(s) for s in a.stages.split(",")]:
        o, u = res[(stage, "official")], res[(stage, "ours")]
        out[f"stage{stage}_speedup"] = round(o["median_s"] / u["median_s"], 3)
        out[f"stage{stage}_samples_per_s"] = {"official": round(o["samples_per_s"], 3), "ours": round(u["samples_per_s"], 3)}
        out[f"stage{stage}_peak_mb"] = {"official": round(o["peak_mb"], 1), "ours": round(u["peak_mb"], 1)}
        out[f"stage{stage}_check_loss"] = res[(stage, "check")]
        if (stage, "ours-cached") in res:  # epochs after the first: the frozen prefix comes from the cache
            c = res[(stage, "ours-cached")]
            out[f"stage{stage}_speedup_cached"] = round(o["median_s"] / c["median_s"], 3)
            out[f"stage{stage}_samples_per_s"]["ours-cached"] = round(c["samples_per_s"], 3)
            out[f"stage{stage}_peak_mb"]["ours-cached"] = round(c["peak_mb"], 1)
    print_json(out)


if __name__ == "__main__":
    main()
