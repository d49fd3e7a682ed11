"""Samples/s of one training step, ours against the official recipe (HF + peft), stages 1 and 3.

    python bench/train_step.py                      # SmolLM2-135M, batch 8, real ML-1M prompts, CPU
    python bench/train_step.py --repeats 5 --device cuda

Providers (same model weights, same LoRA values, same batches of 8 real prompts from the shared ML-1M
split `../shared/data/ml1m-collm` read through the data layer's `csv` source):
- `official`: peft LoRA (r=8, alpha=16, dropout 0.05, q_proj/v_proj) on the HF model, full [B, T, V]
  logits, HF's LM loss over the answer (labels -100 elsewhere) plus BCE on the Yes logit taken from the
  same logits; stage 3 = one group's adapter with only the last 8 layers' LoRA trainable (the official
  code trains one group at a time), inputs_embeds with the CF slots filled by the frozen projector.
- `ours`: thinkrec's trainer step: LoRALinear on thinkrec_kernels.lora_linear, Yes-head BCE and answer-only
  cross-entropy through the kernels (no full logits); stage 3 = all experts in one pass over a batch
  mixing groups, layers below the last 8 merged and run without autograd (thinkrec/train/prefix.py).
- `ours-cached` (stage 3): the same with the prefix cache warm, i.e. every epoch after the first: the
  frozen 22 layers' output of each sample is reused, a step runs the top 8 layers only.
- `ours-compiled` (`--compile`): ours with the layer function under torch.compile (Inductor, static shapes);
  its warm-up compiles every batch's shape, `compile_seconds` is that warm-up less as many compiled steps.
- `ours-fused` (`--compile`): ours with only the element-wise ops compiled (thinkrec/model/fused.py: RMSNorm,
  SiLU * up, RoPE; dynamic shapes, so one compile serves every batch), what `--fused-ops on` runs.
- `ours-shared` (`--share-prefix`): ours computing the prompt prefix that rows of one user and one history
  share once per batch (train.py --share-prefix). With this flag every provider times the batches that
  train.py --share-prefix draws (the grouped sampler's first batches of an epoch over the train split, rows of
  a group together), so `stage{n}_shared_vs_eager[_bf16]` (ours / ours-shared) compares the same rows, and
  `stage{n}_shared_token_fraction` is the share of those batches' real tokens computed once less. Batches
  differ in how much they share (many share nothing), so that ratio is of MEAN step times over whole cycles
  of the batches (--repeats a multiple of --batches; e.g. --batches 12 --repeats 12), not of medians.
Precisions (`--precisions`, thinkrec/precision.py): fp32, and bf16 where the CPU has native bf16
(avx512_bf16 / amx_bf16; else skipped: --force-slow times it anyway). At bf16 `ours` stores
the frozen weights in bf16 (LoRA and AdamW fp32) and `official` runs the HF + peft recipe under
torch.autocast(bf16) with fp32 weights, as the official code runs under fp16 autocast on GPUs. The peak
fraction is a step's effective FLOP/s (forward linear and attention FLOPs, twice: the backward through
frozen weights computes dx only) over the GEMM rate of its precision measured in the same run.
A step = forward, loss, backward, AdamW step. Before timing, the first step's loss of both providers is
checked (dropout off for the check): at fp32 both agree within 1e-3; at bf16 ours is within 5e-2 of the
fp32 loss (a bug-sized gap; the JSON's first_loss_rel_bf16_vs_fp32 gives both providers' distance from it:
ours keeps the residual stream in bf16, autocast in fp32, so ours is the farther, ~1% against ~0.2-0.5%). Each (stage, provider) runs in a fresh subprocess; peak
memory is VmHWM minus VmRSS after the model and batches exist (CPU, /proc/self/clear_refs resets the
mark) or torch.cuda.max_memory_allocated minus the allocation before the steps (CUDA).
Prints a table, then one JSON line with stage1_speedup and stage3_speedup (official time / ours, fp32),
stage3_speedup_cached (official / ours-cached), stage1/3_speedup_bf16_vs_fp32 (ours vs ours),
stage1_peak_fraction and the probe's rates; with --compile stage{n}_compiled_vs_eager[_bf16] (ours eager time /
ours compiled), stage{n}_compile_seconds[_bf16] and their sum compile_seconds, stage{n}_fused_vs_eager[_bf16]
and stage{n}_fused_compile_seconds[_bf16].
"""

import argparse
import itertools
import os
import statistics
import time

from _util import ml1m_prepared, peak_memory, print_json, reset_peak_memory, run_worker, sync, time_runs

YES_W, LM_W = 0.9, 0.1  # plain samples


def _batches(lm, tok, mode, n_batches, batch_size, seed=0, grouped=False, share=False):
    """Real prompts: n_batches * batch_size random train rows, or (grouped) the first n_batches batches
    that train.py --share-prefix draws (rows of one user and one history together); share: collated with
    their shared prefixes marked (what ours-shared runs)."""
    import numpy as np

    from thinkrec.batches import collate
    from thinkrec.data.sampler import LengthBucketSampler
    from thinkrec.data.tokenize import PromptBuilder
    from thinkrec.train.data import SampleSet

    prep = ml1m_prepared()
    b = PromptBuilder(prep, tok, mode=mode, max_len=1024, placeholder_ids=lm.placeholder_token_ids)
    train = np.flatnonzero(prep.inter.split == 0)
    if grouped:
        sset = SampleSet(b, train)
        order = LengthBucketSampler(sset.lengths, batch_size, seed=seed, groups=sset.prefix_groups).batches()
        picks = [train[np.asarray(i)] for i in order[:n_batches]]
    else:
        rows = np.random.default_rng(seed).choice(train, n_batches * batch_size, False)
        picks = [rows[k * batch_size:(k + 1) * batch_size] for k in range(n_batches)]
    out = [collate([b.sample(int(r)) for r in idx], prep.inter.user[idx], tok.pad_token_id, share=share)
           for idx in picks]
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
    if batch.share is not None:
        kw["share"] = batch.share
    h = fwd(batch.input_ids, batch.attention_mask, cf_embeds=cf, placeholder_mask=batch.ph_mask,
            select=loss_positions(batch), expert_weights=w, **kw)
    return batch_loss(h, lm.lm_head_weight, lm.yes_token_id, batch)[0]


def _step_flops(lm, batch, stage, cached=False, k=8):
    """FLOPs of a step: the forward's linear-layer and attention FLOPs over the batch's real tokens (a shared
    prefix's linear FLOPs once), twice for the layers autograd runs (their backward computes dx through frozen
    weights), once for stage 3's frozen prefix (not at all when it comes from the prefix cache). The last layer
    counts its key and value projections only: the rest of it runs for the few positions the losses read."""
    import torch

    cfg = lm.llm.config
    first = lm.llm.model.layers[0]
    per_layer = sum(m.weight.numel() for m in first.modules() if isinstance(m, torch.nn.Linear) or hasattr(m, "lora_A"))
    kv = first.self_attn.k_proj.weight.numel() + first.self_attn.v_proj.weight.numel()
    n = batch.attention_mask.sum(1).tolist()
    own = n if batch.share is None else (batch.attention_mask.sum(1) - batch.share_len).tolist()  # shared: once
    layer = sum(2 * per_layer * o + 2 * cfg.hidden_size * t * t for t, o in zip(n, own))  # linears + QK^T and PV
    last = sum(2 * kv * o for o in own)
    L = cfg.num_hidden_layers
    trained = L if stage == 1 else k
    return 2 * ((trained - 1) * layer + last) + (0 if cached else (L - trained) * layer)


def worker(args):
    """One (stage, provider, precision): prints one JSON line with times and memory."""
    import torch

    from thinkrec import precision as P
    from thinkrec.model import ThinkRecLM, lowp
    from thinkrec.train import stages
    from thinkrec.batches import cf_inputs

    torch.manual_seed(0)
    dev = torch.device(args.device)
    lm, tok = ThinkRecLM.from_pretrained(args.model, n_experts=args.experts, cf_dim=256 if args.stage == 3 else None)
    with torch.no_grad():  # a trained-looking global adapter (B = 0 at init would make LoRA a no-op)
        g = torch.Generator().manual_seed(1)
        for mod in lm.lora_layers().values():
            mod.lora_B[0].copy_(0.01 * torch.randn(mod.lora_B[0].shape, generator=g))
    shared = args.provider == "ours-shared"
    batches, prep = _batches(lm, tok, "text" if args.stage == 1 else "ids", args.batches, args.batch_size,
                             grouped=args.share_prefix, share=shared)
    ue, ie = _cf_tables(prep) if args.stage == 3 else (None, None)
    cfs = [cf_inputs(b, ue, ie) for b in batches]
    if args.share_prefix:  # a user's rows share a route (as in training); still every batch mixes the groups
        groups = [torch.as_tensor(b.users) % args.experts for b in batches]
    else:
        groups = [torch.arange(len(b.labels)) % args.experts for b in batches]  # every batch mixes the groups
    cached = args.provider == "ours-cached"
    compiled = args.provider == "ours-compiled"
    if compiled:  # the layer function under Inductor, static shapes (dynamic=True fails on the packed layout)
        from thinkrec.model import packed
        packed.layer_forward = torch.compile(packed.layer_forward, dynamic=False)
    if args.provider == "ours-fused":  # only the element-wise ops compiled (dynamic shapes: compiled once)
        from thinkrec.model import fused
        fused.enable()
        compiled = True
    prec = P.Precision(args.precision, args.precision, dev.type, "bench")
    if args.provider == "official":
        fwd = stages.setup(lm, f"stage{args.stage}", prefix_cache_mb=0)
        model = _official_model(lm, args.stage).to(dev)
        model.train()

        def step(b, cf, gr):  # the recipe under autocast (fp32 weights cast by autocast on every call)
            with lowp.autocast(args.precision, dev):
                return _official_step(model, lm, b, cf)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        lowp.apply(lm, prec)  # before the frozen prefix merges its layers, so they are merged in bf16 too
        fwd = stages.setup(lm, f"stage{args.stage}", prefix_cache_mb=4096 if cached else 0) or lm  # stage 3: FrozenPrefix
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

    t0 = time.perf_counter()
    for b in range(len(batches) if cached or compiled else 1):  # warm-up (allocator, first calls; fills the
        train_step(b)  # prefix cache; compiles each batch's shape)
    sync(dev)
    warm_s = time.perf_counter() - t0
    if args.profile:  # one step under torch.profiler: the operators by self time
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            train_step(0)
            sync(dev)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        print_json({"profile": [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count,
                                 "share": round(e.self_cpu_time_total / max(total, 1), 4)}
                                for e in events[:args.profile]], "step_self_ms": round(total / 1e3, 1)})
        return
    base = reset_peak_memory(dev)
    repeat = itertools.count()
    times = time_runs(lambda: train_step(next(repeat) % len(batches)), args.repeats, dev)
    peak = peak_memory(dev) - base
    timed = [batches[r % len(batches)] for r in range(args.repeats)]
    tokens = sum(int(b.attention_mask.sum()) for b in timed) / args.repeats
    flops = sum(_step_flops(lm, b, args.stage, cached) for b in timed) / args.repeats
    med = statistics.median(times)
    computed = tokens - sum(int(b.share_len.sum()) for b in timed if b.share is not None) / args.repeats
    print_json({"median_s": med, "mean_s": statistics.fmean(times), "times": times, "peak_mb": peak / 2**20, "tokens_per_batch": tokens,
                "tokens_computed": computed, "step_gflop": flops / 1e9,
                "compile_seconds": max(0.0, warm_s - len(batches) * med) if compiled else None})


def _run(stage, provider, a, check=False, precision="fp32", profile=0):
    args = ["--worker", "--stage", stage, "--provider", provider, "--repeats", a.repeats, "--batches", a.batches,
            "--batch-size", a.batch_size, "--device", a.device, "--experts", a.experts, "--precision", precision,
            "--profile", profile] + (["--share-prefix"] if a.share_prefix else [])
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
    ap.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (bf16 only where the CPU has native bf16, "
                    "unless --force-slow)")
    ap.add_argument("--force-slow", action="store_true", help="time bf16 even on a CPU without native bf16")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="instead of the comparison: one step of ours per stage and precision under torch.profiler, "
                         "the N operators with the most self time")
    ap.add_argument("--compile", action="store_true", help="also time ours with torch.compile (Inductor) of the "
                    "layer function: compile_seconds (every batch shape compiled once) and the compiled step")
    ap.add_argument("--share-prefix", action="store_true", help="time the batches train.py --share-prefix draws, "
                    "and ours-shared: their common prompt prefixes computed once")
    ap.add_argument("--skip", default="", help="providers not to time, comma-separated (e.g. ours-compiled); the "
                    "ratios that need them are left out")
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--provider", default="ours", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if {"official", "ours"} & set(a.skip.split(",")):
        ap.error("--skip: official and ours are the reference of every ratio; skip ours-cached, ours-fused or "
                 "ours-compiled")
    if a.share_prefix and a.repeats % a.batches:
        ap.error(f"--share-prefix compares mean step times over whole cycles of the batches: --repeats {a.repeats} "
                 f"must be a multiple of --batches {a.batches}")
    if a.worker:
        from thinkrec.runtime import tune_malloc

        tune_malloc()  # as train.py runs, for both providers alike (THINKREC_DEFAULT_MALLOC=1: off)
        return worker(a)
    import torch

    from thinkrec import hardware

    # the machine's bf16 decision (thinkrec.hardware.machine_bf16: CPU flags, then a cached once-per-machine
    # probe), the same that --precision auto takes in train.py and the experiments
    machine = hardware.machine_bf16() if a.device == "cpu" else None
    precs, skipped = [], {}
    for p in [x for x in a.precisions.split(",") if x]:
        if p == "bf16" and machine is not None and not machine.native and not a.force_slow:
            skipped[p] = ("this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag): a bf16 step would take "
                          "hours; --force-slow runs it anyway")
        else:
            precs.append(p)
    # the peak fraction's denominator (the best of three 0.3 s timings: the rate this CPU reaches, not a
    # moment when another process held a core)
    rates = {p: round(max(hardware.gemm_rate(torch.float32 if p == "fp32" else torch.bfloat16, 1024, 0.3)
                          for _ in range(3)), 1) for p in precs} if machine else {}
    probe = machine.rates if machine else None
    print(f"precision: auto on this machine -> {machine.decision if machine else 'n/a'} (native bf16 flags: "
          f"{list(machine.native) if machine else 'n/a'}; its probe: {probe}); GEMM rates for the peak fraction: "
          f"{rates}" + "".join(f"\nskipped {p}: {why}" for p, why in skipped.items()))
    stages_ = [int(s) for s in a.stages.split(",")]
    if a.profile:
        profiles = {}
        for stage in stages_:
            for prec in precs:
                r = _run(stage, "ours", a, precision=prec, profile=a.profile)
                profiles[f"stage{stage}_{prec}"] = r
                print(f"\nstage {stage}, {prec}, ours: one step, {r['step_self_ms']:.0f} ms of operator self time")
                print("| operator | self ms | calls | share |\n|---|---|---|---|")
                for e in r["profile"]:
                    print(f"| {e['op']} | {e['self_ms']:.1f} | {e['calls']} | {e['share']:.1%} |")
        print_json({"profiles": profiles, "precision_probe": probe, "precisions_skipped": skipped})
        return
    res = {}
    print(f"| stage | precision | provider | step s (median of {a.repeats}) | samples/s | peak MB | tokens/batch | "
          f"GFLOP/step | peak fraction |")
    print("|---|---|---|---|---|---|---|---|---|")
    for stage in stages_:
        for prec in precs:
            chk = {p: _run(stage, p, a, check=True, precision=prec)["check_loss"] for p in ("official", "ours")}
            if prec == "fp32":  # the same math: agree to float rounding
                rel = abs(chk["ours"] - chk["official"]) / max(1.0, abs(chk["official"]))
                if rel > 1e-3:
                    raise SystemExit(f"stage {stage} {prec}: losses differ before timing: {chk}")
            else:  # bf16 rounds differently in each (autocast keeps an fp32 residual stream, ours is bf16): each
                # against the fp32 loss, which both must be near (they err on either side of it)
                ref = res.get((stage, "check", "fp32")) or {
                    "ours": _run(stage, "ours", a, check=True, precision="fp32")["check_loss"]}
                chk["fp32"] = ref["ours"]
                if abs(chk["ours"] - ref["ours"]) / max(1.0, abs(ref["ours"])) > 5e-2:  # a bug, not rounding
                    raise SystemExit(f"stage {stage} {prec}: our loss is off the fp32 loss before timing: {chk}")
            for p in ("official", "ours") + (("ours-cached",) if stage == 3 else ()) + (
                    ("ours-fused", "ours-compiled") if a.compile else ()) + (
                    ("ours-shared",) if a.share_prefix else ()):
                if a.skip and p in a.skip.split(","):
                    continue
                r = _run(stage, p, a, precision=prec)
                r["samples_per_s"] = a.batch_size / r["median_s"]
                r["peak_fraction"] = r["step_gflop"] / r["median_s"] / rates[prec] if rates else None
                res[(stage, p, prec)] = r
                pf = "" if r["peak_fraction"] is None else f"{r['peak_fraction']:.2f}"
                print(f"| {stage} | {prec} | {p} | {r['median_s']:.2f} | {r['samples_per_s']:.2f} | {r['peak_mb']:.0f} | "
                      f"{r['tokens_per_batch']:.0f} | {r['step_gflop']:.0f} | {pf} |", flush=True)
            res[(stage, "check", prec)] = chk
    out = {"device": a.device, "batch_size": a.batch_size, "repeats": a.repeats, "precision_probe": probe,
           "gemm_gflops": rates, "precisions_skipped": skipped}
    for stage in stages_:
        if (stage, "ours", "fp32") in res:
            o, u = res[(stage, "official", "fp32")], res[(stage, "ours", "fp32")]
            out[f"stage{stage}_speedup"] = round(o["median_s"] / u["median_s"], 3)
            out[f"stage{stage}_samples_per_s"] = {"official": round(o["samples_per_s"], 3),
                                                  "ours": round(u["samples_per_s"], 3)}
            out[f"stage{stage}_peak_mb"] = {"official": round(o["peak_mb"], 1), "ours": round(u["peak_mb"], 1)}
            out[f"stage{stage}_check_loss"] = res[(stage, "check", "fp32")]
            if (stage, "ours-compiled", "fp32") in res:
                out[f"stage{stage}_speedup_compiled"] = round(o["median_s"] / res[(stage, "ours-compiled", "fp32")]["median_s"], 3)
            if (stage, "ours-cached", "fp32") in res:  # epochs after the first: the frozen prefix from the cache
                c = res[(stage, "ours-cached", "fp32")]
                out[f"stage{stage}_speedup_cached"] = round(o["median_s"] / c["median_s"], 3)
                out[f"stage{stage}_samples_per_s"]["ours-cached"] = round(c["samples_per_s"], 3)
                out[f"stage{stage}_peak_mb"]["ours-cached"] = round(c["peak_mb"], 1)
        for prec in precs:
            u, c, sfx = res.get((stage, "ours", prec)), res.get((stage, "ours-compiled", prec)), "" if prec == "fp32" else f"_{prec}"
            if u and c:  # compiled against eager, and what compiling every batch's shape once cost
                out[f"stage{stage}_compiled_vs_eager{sfx}"] = round(u["median_s"] / c["median_s"], 3)
                out[f"stage{stage}_compile_seconds{sfx}"] = round(c["compile_seconds"], 1)
                out["compile_seconds"] = round(out.get("compile_seconds", 0.0) + c["compile_seconds"], 1)
            f = res.get((stage, "ours-fused", prec))
            if u and f:  # the element-wise ops fused (thinkrec/model/fused.py) against eager
                out[f"stage{stage}_fused_vs_eager{sfx}"] = round(u["median_s"] / f["median_s"], 3)
                out[f"stage{stage}_fused_compile_seconds{sfx}"] = round(f["compile_seconds"], 1)
            sh = res.get((stage, "ours-shared", prec))
            if u and sh:  # the same rows with their shared prefixes computed once
                out[f"stage{stage}_shared_vs_eager{sfx}"] = round(u["mean_s"] / sh["mean_s"], 3)
                out[f"stage{stage}_shared_token_fraction"] = round(1 - sh["tokens_computed"] / sh["tokens_per_batch"], 3)
            if u and u["peak_fraction"] is not None:
                out[f"stage{stage}_peak_fraction" + ("" if prec == "fp32" else f"_{prec}")] = round(u["peak_fraction"], 3)
        if (stage, "ours", "bf16") in res and (stage, "ours", "fp32") in res:
            b, f = res[(stage, "ours", "bf16")], res[(stage, "ours", "fp32")]
            out[f"stage{stage}_speedup_bf16_vs_fp32"] = round(f["median_s"] / b["median_s"], 3)
            out[f"stage{stage}_official_bf16_vs_ours_bf16"] = round(res[(stage, "official", "bf16")]["median_s"]
                                                                    / b["median_s"], 3)
            out[f"stage{stage}_check_loss_bf16"] = res[(stage, "check", "bf16")]
            chk = res[(stage, "check", "bf16")]
            out[f"stage{stage}_first_loss_rel_bf16_vs_fp32"] = {
                p: round(abs(chk[p] - chk["fp32"]) / abs(chk["fp32"]), 5) for p in ("official", "ours")}
        elif "bf16" in skipped:
            out[f"stage{stage}_speedup_bf16_vs_fp32"] = None
    print_json(out)


if __name__ == "__main__":
    main()
