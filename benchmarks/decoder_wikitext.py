"""Decoder pruning on WikiText-2: Kprune, Kwon et al., magnitude and random on llama-wiki-gqa at
10, 20, 30 and 50% of the non-embedding parameters removed (``keep_params`` 0.9, 0.8, 0.7, 0.5).

Model. ../shared/models/llama-wiki-gqa: a stock LlamaForCausalLM (6 layers, hidden 256, 8 query /
2 key/value heads of size 32, FFN 768, vocabulary 8,192, tied embeddings), seen through prunekit's
Llama adapter when one is registered, else the test-only one in tests/llama_view.py (the results
say which).

Calibration. One sample for every method: ``--num-sequences`` windows of ``--seq-len`` tokens
(default 16 x 256 = 4,096 tokens, far below the literature's 128 x 2048, because the CPU is two cores shared by
several engineers) at seeded offsets of ../shared/data/wikitext2/wiki.valid.tokens (part of the
model's training corpus; the test split is never used for calibration). FLOPs are counted at the
calibration length.

Evaluation. Perplexity of wiki.test.raw (rows joined with "\\n\\n", tokenized once with the model's
tokenizer, a BOS first) in non-overlapping windows of ``--window`` tokens (256, the model README's
convention), over the first ``--eval-windows`` windows (default 64 = 16,384 tokens, about 5% of
the test text, again for the CPU budget; 0 = the whole text). The same windows score the teacher
and every pruned model, so the ratios are exact comparisons; the absolute teacher value differs
from metrics.json's 385.9 (whole text) by the subset.

Speed. Greedy generation with the KV cache (prunekit.bench.measure_generation): prefill latency
of a ``--prompt-len`` prompt and decode tokens/s over ``--new-tokens`` tokens, batch 1, median of
``--repeats`` repeats alternating with the original model, on this CPU.

Scale. ``--scale`` also prunes, in a subprocess of its own (so its peak RSS is its own), a
randomly initialised model of Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 query / 2 key/value
heads of size 64, FFN 4864, vocabulary 151,936, tied embeddings) built as a LlamaForCausalLM
(Qwen2's q/k/v biases aside, the same shapes) with 16 x 512 calibration tokens, and reports time,
peak RSS and the size of Kprune's sparse next-token targets against dense ones.

    python benchmarks/decoder_wikitext.py --scale              # about 40 minutes on a shared 2-core CPU
    python benchmarks/decoder_wikitext.py --quick              # smoke run: a few minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "llama-wiki-gqa"
DATA = SHARED / "data" / "wikitext2"
RESULTS = ROOT / "benchmarks" / "results"

logger = logging.getLogger("decoder_wikitext")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--methods", default="kprune,kwon,magnitude,random,kprune-uniform",
                   help="methods; kprune-uniform is Kprune with --uniform (a stock-class folder)")
    p.add_argument("--removed", default="0.2,0.1,0.3,0.5", help="fractions of non-embedding parameters removed")
    p.add_argument("--num-sequences", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=64, help="first N test windows (0: the whole test text)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", action="store_true", help="also prune the Qwen2.5-0.5B-shaped random model")
    p.add_argument("--scale-only", action="store_true", help=argparse.SUPPRESS)  # the subprocess
    p.add_argument("--scale-method", default="magnitude")
    p.add_argument("--name", default="decoder_wikitext")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows (and teacher) already in the results JSON and run only the missing ones")
    args = p.parse_args(argv)
    if args.quick:
        args.num_sequences, args.seq_len, args.eval_windows, args.repeats = 4, 64, 2, 1
        args.removed, args.new_tokens, args.prompt_len = "0.2", 4, 16
    return args


def register_llama() -> str:
    """Which adapter serves the Llama model (for the results' header)."""
    from prunekit.families import ADAPTERS

    return f"prunekit.families ({ADAPTERS['llama'].__module__})"


def write(result: dict, args: argparse.Namespace) -> None:
    folder = Path(args.results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / f"{args.name}.md").write_text(markdown(result))


def fmt(value, spec: str = ".4g") -> str:
    return "" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    s = result["setting"]
    teacher = result.get("teacher", {})
    lines = [
        "# Decoder pruning on WikiText-2 (llama-wiki-gqa)", "",
        f"Model `{s['model']}` through {s['adapter']}. Calibration: {s['num_sequences']} windows of "
        f"{s['seq_len']} tokens of `wiki.valid.tokens` (seed {s['seed']}), shared by every method "
        f"(small for the shared 2-core CPU; the literature uses 128 x 2048). Budget: fraction of the "
        f"{s['non_embedding_params']:,} non-embedding parameters removed (keep_params = 1 - removed); key/value "
        "heads are kept whole (reserved at full cost) in this release.",
        f"Perplexity: `wiki.test.raw`, rows joined with \"\\n\\n\", non-overlapping windows of **{s['window']}** tokens, "
        f"first {s['eval_windows'] or 'all'} windows ({s['eval_tokens']:,} tokens scored). The model's metrics.json "
        f"gives {s['reference_ppl']:.1f} on the whole test text with the same window (our read_text rows give "
        f"{fmt(teacher.get('perplexity'), '.2f')} on this subset).",
        f"Speed: {s['bench']}. Machine: {s['machine']}; {s['note']}", "",
        f"Teacher: perplexity {fmt(teacher.get('perplexity'), '.2f')}, prefill "
        f"{fmt(teacher.get('prefill_ms'), '.1f')} ms, decode {fmt(teacher.get('decode_tokens_per_s'), '.1f')} tokens/s.",
        "",
        "| method | removed | params kept (non-emb.) | FLOPs kept | perplexity | vs teacher | prefill ms | "
        "decode tok/s | prefill speedup | decode speedup | prune s | peak RSS GB (process so far) | "
        "q heads / kv heads / neurons per layer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(result["rows"], key=lambda r: (r["removed"], r["method"])):
        lines.append(
            f"| {r['method']} | {r['removed']:.0%} | {r['non_embedding_params_kept']:.4f} | {r['flops_kept']:.4f} | "
            f"{r['perplexity']:.2f} | {r['perplexity'] / teacher['perplexity'] - 1:+.1%} | {fmt(r.get('prefill_ms'), '.1f')} | "
            f"{fmt(r.get('decode_tokens_per_s'), '.1f')} | {fmt(r.get('prefill_speedup'), '.2f')} | "
            f"{fmt(r.get('decode_speedup'), '.2f')} | {r['prune_seconds']:.1f} | {r['peak_rss_gb_process_so_far']:.2f} | "
            f"{r['structure']} |")
    targets = result.get("targets")
    if targets:
        lines += ["", "Targets: " + "; ".join(f"{k}: {v}" for k, v in targets.items())]
    scale = result.get("scale")
    if scale:
        lines += ["", "## Scale: a random model of Qwen2.5-0.5B's shape on CPU", "",
                  scale.get("summary", json.dumps(scale))]
    lines.append("")
    return "\n".join(lines)


def structure(layers: list[dict]) -> str:
    return " ".join(f"{layer['num_heads']}/{layer.get('num_kv_heads', '-')}/{layer['intermediate_size']}"
                    for layer in layers)


def targets_check(result: dict) -> dict:
    """The benchmark's targets from the rows written so far."""
    teacher = result["teacher"]["perplexity"]
    rows = {(r["method"], round(r["removed"], 4)): r["perplexity"] for r in result["rows"]}
    out = {}
    if ("kprune", 0.2) in rows:
        increase = rows[("kprune", 0.2)] / teacher - 1
        out["Kprune perplexity increase at 20% removed <= 15%"] = f"{increase:+.1%} ({'met' if increase <= 0.15 else 'NOT met'})"
    ahead = []
    for (method, removed), ppl in rows.items():
        if method != "kprune":
            continue
        for other in ("kwon", "magnitude"):
            if (other, removed) in rows:
                ahead.append(ppl < rows[(other, removed)])
    if ("kprune-uniform", 0.2) in rows and ("kprune", 0.2) in rows:
        gap = rows[("kprune-uniform", 0.2)] / rows[("kprune", 0.2)] - 1
        out["Kprune --uniform within 10% of non-uniform perplexity at 20% removed"] = (
            f"{gap:+.1%} ({'met' if gap <= 0.10 else 'NOT met'})")
    if ahead:
        out["Kprune ahead of Kwon and magnitude at every budget"] = (
            f"{sum(ahead)} of {len(ahead)} comparisons ({'met' if all(ahead) else 'NOT met'})")
    return out


def main_wikitext(args: argparse.Namespace) -> None:
    import torch

    from prunekit import api
    from prunekit.core.accounting import count_non_embedding_params
    from prunekit.core.runtime import library_versions, peak_rss_bytes
    from prunekit.deploy.bench import measure_generation
    from prunekit.io.folders import load_model, load_tokenizer
    from prunekit.tasks import build_calibration_sample
    from prunekit.tasks.causal_lm.data import perplexity, read_text, tokenize_text

    adapter = register_llama()
    tokenizer = load_tokenizer(args.model)
    teacher = load_model(args.model, head="causal_lm").eval()
    sample = build_calibration_sample("causal_lm", tokenizer, args.data, num_sequences=args.num_sequences,
                                      max_length=args.seq_len, seed=args.seed, batch_size=args.batch_size)
    tokens = tokenize_text(tokenizer, read_text(args.data, "test"))
    if args.eval_windows:
        tokens = tokens[: args.eval_windows * args.window]
    reference = json.loads((Path(args.model) / "metrics.json").read_text()).get("wikitext2_test_ppl")
    load = os.getloadavg()
    result: dict = {
        "setting": {
            "model": args.model, "adapter": adapter, "data": args.data, "num_sequences": args.num_sequences,
            "seq_len": args.seq_len, "seed": args.seed, "window": args.window, "stride": args.window,
            "eval_windows": args.eval_windows, "eval_tokens": int(tokens.numel()), "reference_ppl": reference,
            "non_embedding_params": count_non_embedding_params(teacher),
            "bench": (f"greedy decode with KV cache, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
                      f"median of {args.repeats} repeats alternating with the original"),
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
            "note": (f"load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (other engineers' jobs "
                     "share the cores, so times are noisy; ratios are measured in one run, alternating)"),
            "versions": library_versions(),
        },
        "rows": [],
    }
    previous = Path(args.results_dir) / f"{args.name}.json"
    if args.resume and previous.is_file():
        # Same sample, windows and settings (checked), so the kept rows compare with the new ones.
        old = json.loads(previous.read_text())
        same = ("num_sequences", "seq_len", "seed", "window", "eval_windows", "eval_tokens")
        if any(old["setting"][k] != result["setting"][k] for k in same):
            raise SystemExit(f"--resume: {previous} was made with other settings ({same})")
        result["setting"]["note"] = old["setting"]["note"] + "; resumed at load average " + \
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
        result["rows"], result["teacher"] = old["rows"], old["teacher"]
        teacher_ppl = {"perplexity": old["teacher"]["perplexity"]}
    else:
        start = time.perf_counter()
        teacher_ppl = perplexity(teacher, tokens, window=args.window, batch_size=8, desc="teacher")
        result["teacher"] = {"perplexity": teacher_ppl["perplexity"], "num_scored": teacher_ppl["num_scored"],
                             "eval_seconds": time.perf_counter() - start}
    logger.info("teacher perplexity %.3f", teacher_ppl["perplexity"])
    write(result, args)
    removed = [float(x) for x in args.removed.split(",")]
    teacher_speed = result["teacher"].get("prefill_ms")
    done = {(r["method"], r["removed"]) for r in result["rows"]}
    # Budget by budget (20% removed first), every method at each: each row is one standalone
    # pruning (its own calibration step), written as soon as it is measured.
    for cut in removed:
        keep = round(1.0 - cut, 6)
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            if (method, round(cut, 6)) in done:
                continue
            base, _, variant = method.partition("-")  # "kprune-uniform": Kprune with --uniform
            pruned = api.prune(teacher, tokenizer, sample, api.PruneOptions(
                task="causal_lm", method=base, keep_params=keep, seed=args.seed, device="cpu",
                uniform=variant == "uniform"))
            rss = peak_rss_bytes() / 2**30
            report = pruned.report
            ppl = perplexity(pruned.model, tokens, window=args.window, batch_size=8, desc=f"{method} {keep}")
            speed = measure_generation(pruned.model, baseline=teacher, prompt_len=args.prompt_len,
                                       new_tokens=args.new_tokens, repeats=args.repeats, device="cpu")["results"][0]
            if teacher_speed is None:
                teacher_speed = speed
                result["teacher"] |= {"prefill_ms": speed["baseline_prefill_ms"],
                                      "decode_tokens_per_s": speed["baseline_decode_tokens_per_s"]}
            row = {
                "method": method, "removed": round(cut, 6), "keep_params": keep,
                "non_embedding_params_kept": report["non_embedding_params_kept"],
                "flops_kept": report["flops_kept"], "params_kept": report["params_kept"],
                "perplexity": ppl["perplexity"], "nll": ppl["nll"],
                "prune_seconds": report["prune_seconds"], "run_seconds": report["run_seconds"],
                "surgery_seconds": report["surgery_seconds"],
                "peak_rss_gb_process_so_far": rss,
                "prefill_ms": speed["prefill_ms"], "decode_tokens_per_s": speed["decode_tokens_per_s"],
                "baseline_prefill_ms": speed["baseline_prefill_ms"],
                "baseline_decode_tokens_per_s": speed["baseline_decode_tokens_per_s"],
                "prefill_speedup": speed["prefill_speedup"], "decode_speedup": speed["decode_speedup"],
                "layers": report["layers"], "structure": structure(report["layers"]),
            }
            result["rows"].append(row)
            result["targets"] = targets_check(result)
            write(result, args)
            logger.info("%s removed %.0f%%: perplexity %.2f (teacher %.2f), %.1f s", method, 100 * cut,
                        ppl["perplexity"], teacher_ppl["perplexity"], report["prune_seconds"])
            del pruned
    if args.scale:
        result["scale"] = run_scale_subprocess(args)
    elif (Path(args.results_dir) / f"{args.name}_scale.json").is_file():  # an earlier --scale-only run
        result["scale"] = json.loads((Path(args.results_dir) / f"{args.name}_scale.json").read_text())
    write(result, args)


# ---- the scale run: a random model of Qwen2.5-0.5B's shape -----------------------------------------
QWEN_SHAPE = {"num_hidden_layers": 24, "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2,
              "head_dim": 64, "intermediate_size": 4864, "vocab_size": 151_936, "tie_word_embeddings": True,
              "max_position_embeddings": 32_768, "rms_norm_eps": 1e-6}


def run_scale_subprocess(args: argparse.Namespace) -> dict:
    out = Path(args.results_dir) / f"{args.name}_scale.json"
    command = [sys.executable, __file__, "--scale-only", "--scale-method", args.scale_method,
               "--data", args.data, "--model", args.model, "--results-dir", args.results_dir, "--name", args.name]
    start = time.perf_counter()
    done = subprocess.run(command, check=False)
    if done.returncode != 0 or not out.is_file():
        return {"summary": f"the scale run failed (exit {done.returncode}) after {time.perf_counter() - start:.0f} s"}
    return json.loads(out.read_text())


def main_scale(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunekit import api
    from prunekit.core.accounting import count_non_embedding_params
    from prunekit.core.runtime import peak_rss_bytes
    from prunekit.io.folders import load_tokenizer
    from prunekit.tasks import build_calibration_sample
    from prunekit.tasks.losses import sparse_target_bytes, teacher_targets

    register_llama()
    torch.manual_seed(0)
    start = time.perf_counter()
    model = LlamaForCausalLM(LlamaConfig(**QWEN_SHAPE)).eval()
    build_seconds = time.perf_counter() - start
    tokenizer = load_tokenizer(args.model)  # ids < 8,192 are valid ids of the larger vocabulary
    sample = build_calibration_sample("causal_lm", tokenizer, args.data, num_sequences=16, max_length=512,
                                      seed=0, batch_size=2)
    # Kprune's sparse next-token targets of one batch, against the dense distributions they replace.
    batch = sample.batches[0]
    with torch.no_grad():
        targets = teacher_targets("lm", model(input_ids=batch["input_ids"]), 1.0, batch["attention_mask"])
    per_token = sparse_target_bytes(targets) / int(batch["attention_mask"].sum())
    dense_per_token = QWEN_SHAPE["vocab_size"] * 4
    del targets
    start = time.perf_counter()
    result = api.prune(model, tokenizer, sample, task="causal_lm", method=args.scale_method, keep_params=0.8,
                       device="cpu")
    seconds = time.perf_counter() - start
    report = result.report
    tokens = sample.num_tokens
    out = {
        "shape": QWEN_SHAPE, "built_as": "LlamaForCausalLM with Qwen2.5-0.5B's config (no q/k/v biases)",
        "params": sum(p.numel() for p in model.parameters()),
        "non_embedding_params": count_non_embedding_params(model),
        "method": args.scale_method, "keep_params": 0.8, "calibration": "16 x 512 tokens of wiki.valid.tokens",
        "build_seconds": build_seconds, "prune_seconds": seconds,
        "non_embedding_params_kept": report["non_embedding_params_kept"],
        "peak_rss_gb": peak_rss_bytes() / 2**30,
        "sparse_target_bytes_per_token": per_token, "dense_target_bytes_per_token": dense_per_token,
        "sparse_targets_gb_16x512": per_token * tokens / 2**30, "dense_targets_gb_16x512": dense_per_token * tokens / 2**30,
        "sparse_targets_gb_128x2048": per_token * 128 * 2048 / 2**30,
        "dense_targets_gb_128x2048": dense_per_token * 128 * 2048 / 2**30,
    }
    out["summary"] = (
        f"{out['params'] / 1e6:.0f} M parameters ({out['non_embedding_params'] / 1e6:.0f} M non-embedding), "
        f"{out['built_as']}. {args.scale_method} to keep 0.8 of the non-embedding parameters with a "
        f"16 x 512-token calibration sample: {seconds:.0f} s through the whole pipeline (sample, method, surgery), "
        f"non-embedding parameters kept {out['non_embedding_params_kept']:.4f}, peak RSS "
        f"{out['peak_rss_gb']:.2f} GB (model built in {build_seconds:.0f} s). Kprune's sparse next-token targets: "
        f"{per_token:.0f} bytes per token (top-32 probabilities and ids + tail mass), "
        f"{out['sparse_targets_gb_16x512'] * 1024:.1f} MB for 16 x 512 tokens and "
        f"{out['sparse_targets_gb_128x2048']:.2f} GB for 128 x 2048, against {out['dense_targets_gb_16x512']:.1f} GB "
        f"and {out['dense_targets_gb_128x2048']:.0f} GB dense (float32). Kprune and Kwon et al. themselves were not "
        "run at this size here: on the shared 2-core CPU their (L + 1) forward/backward passes over 8,192 tokens "
        "of a 0.5 B model take hours.")
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.results_dir) / f"{args.name}_scale.json").write_text(json.dumps(out, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    sys.path.insert(0, str(ROOT / "src"))
    if args.scale_only:
        main_scale(args)
    else:
        main_wikitext(args)


if __name__ == "__main__":
    main()
