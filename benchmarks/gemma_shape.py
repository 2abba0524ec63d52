"""Kprune, Kwon et al. and magnitude at 20% of the non-embedding parameters removed
(``keep_params=0.8``) on a randomly initialised model of Gemma 3 270M's shape, each method in a
subprocess of its own so that its peak RSS is its own: time through the whole pipeline (sample,
method, surgery), peak RSS, non-embedding parameters kept, and what the pruned model looks like.

Shape (``Gemma3ForCausalLM``): 18 layers, hidden 640, 4 query heads over 1 key/value head of size
256, FFN 2048 (GeGLU), vocabulary 262,144 (tied), sliding window 512 on five layers of six, query
scalar 256, sandwich (1 + w) RMSNorms, as google/gemma-3-270m's config states them. Random weights
(transformers' initialisation, seed 0): the numbers measure cost, not quality; perplexity on real
weights comes from the users' runs.

Calibration: ``--sequences`` windows (default 4) of ``--seq-len`` tokens (default 128) drawn from a
seeded random token stream (no Gemma tokenizer or text here), batches of 2. Perplexity of the
teacher and of each pruned model on another random stream (4 windows of 128) is reported only as a
check that the pruned model runs end to end.

    python benchmarks/gemma_shape.py                 # full vocabulary, ~15-20 minutes on 2 shared cores
    python benchmarks/gemma_shape.py --vocab 16384   # a reduced vocabulary (stated in the results)
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("magnitude", "kwon", "kprune")
GEMMA3_270M = {
    "num_hidden_layers": 18, "hidden_size": 640, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 256, "intermediate_size": 2048, "vocab_size": 262_144, "sliding_window": 512,
    "query_pre_attn_scalar": 256, "max_position_embeddings": 32_768, "tie_word_embeddings": True,
    "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=GEMMA3_270M["vocab_size"])
    p.add_argument("--layers", type=int, default=GEMMA3_270M["num_hidden_layers"])
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--keep-params", type=float, default=0.8)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--name", default="families_gemma")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--one", help=argparse.SUPPRESS)  # the subprocess: one method
    return p.parse_args(argv)


def shape(args: argparse.Namespace) -> dict:
    return {**GEMMA3_270M, "vocab_size": args.vocab, "num_hidden_layers": args.layers}


def run_one(args: argparse.Namespace) -> dict:
    """One method in this process: build the model, prune, measure."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from prunekit import api
    from prunekit.core.accounting import count_non_embedding_params
    from prunekit.core.runtime import peak_rss_bytes
    from prunekit.families import get_adapter, pruning_view
    from prunekit.tasks.causal_lm.data import build_lm_calibration_sample, perplexity

    torch.manual_seed(0)
    start = time.perf_counter()
    model = Gemma3ForCausalLM(Gemma3TextConfig(**shape(args))).eval()
    build_seconds = time.perf_counter() - start
    vocab = shape(args)["vocab_size"]
    stream = torch.randint(3, vocab, (args.sequences * args.seq_len * 4,), generator=torch.Generator().manual_seed(1))
    sample = build_lm_calibration_sample(None, stream, num_sequences=args.sequences, seq_len=args.seq_len,
                                         batch_size=2)
    held_out = torch.randint(3, vocab, (4 * args.seq_len,), generator=torch.Generator().manual_seed(2))
    start = time.perf_counter()
    result = api.prune(model, None, sample, task="causal_lm", method=args.one, keep_params=args.keep_params,
                       device="cpu")
    seconds = time.perf_counter() - start
    shapes = get_adapter(result.model).layer_shapes()
    out = {
        "method": args.one, "prune_seconds": seconds, "build_seconds": build_seconds,
        "peak_rss_gb": peak_rss_bytes() / 2**30,
        "params": sum(p.numel() for p in model.parameters()),
        "non_embedding_params": count_non_embedding_params(pruning_view(model)),
        "non_embedding_params_kept": result.report["non_embedding_params_kept"],
        "query_heads_kept": sum(s.num_heads for s in shapes), "kv_heads_kept": sum(s.num_kv_heads or 0 for s in shapes),
        "neurons_kept": sum(s.intermediate_size for s in shapes),
        "perplexity_random_stream": perplexity(result.model, held_out, window=args.seq_len)["perplexity"],
    }
    if args.one == "kprune":
        out["teacher_perplexity_random_stream"] = perplexity(model, held_out, window=args.seq_len)["perplexity"]
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return
    import torch
    import transformers

    rows = []
    for method in args.methods.split(","):
        command = [sys.executable, __file__, "--one", method, "--vocab", str(args.vocab), "--layers", str(args.layers),
                   "--sequences", str(args.sequences), "--seq-len", str(args.seq_len),
                   "--keep-params", str(args.keep_params)]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            rows.append({"method": method, "error": done.stderr.strip().splitlines()[-1:],
                         "seconds": time.perf_counter() - start})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    result = {
        "model": "random Gemma3ForCausalLM of gemma-3-270m's shape", "shape": shape(args),
        "reduced": {} if args.vocab == GEMMA3_270M["vocab_size"] and args.layers == GEMMA3_270M["num_hidden_layers"]
        else {"vocab_size": args.vocab, "num_hidden_layers": args.layers},
        "calibration": f"{args.sequences} x {args.seq_len} random tokens (seed 1), batches of 2",
        "keep_params": args.keep_params, "rows": rows,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
    }
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {result['model']}: {args.keep_params:.0%} of the non-embedding parameters kept", "",
             f"Shape: {json.dumps(shape(args))}.", f"Reduced from the real shape: {result['reduced'] or 'nothing'}.",
             f"Calibration: {result['calibration']}. Each method in its own process (its own peak RSS); "
             f"{result['machine']['threads']} threads of a shared CPU, torch {torch.__version__}, "
             f"transformers {transformers.__version__}.", "",
             "| method | prune s | peak RSS GB | non-embedding kept | query heads | kv heads | FFN neurons | "
             "ppl, random stream (sanity) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['prune_seconds']:.1f} | {r['peak_rss_gb']:.2f} | "
                     f"{r['non_embedding_params_kept']:.4f} | {r['query_heads_kept']} | {r['kv_heads_kept']} | "
                     f"{r['neurons_kept']} | {r['perplexity_random_stream']:.0f} |")
    full = next((r for r in rows if "params" in r), None)
    if full:
        lines += ["", f"{full['params'] / 1e6:.1f} M parameters, {full['non_embedding_params'] / 1e6:.1f} M of them "
                  "outside the embedding table (the budget's base); the unpruned model has "
                  f"{4 * shape(args)['num_hidden_layers']} query heads, {shape(args)['num_hidden_layers']} kv heads, "
                  f"{2048 * shape(args)['num_hidden_layers']} neurons."]
        teacher = next((r["teacher_perplexity_random_stream"] for r in rows if "teacher_perplexity_random_stream" in r),
                       None)
        if teacher is not None:
            lines.append(f"Teacher perplexity on the same random stream: {teacher:.0f} (random weights: a run check only).")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
