"""
eval.py: score a checkpoint on the math benchmarks of the RL-for-reasoning papers, with the
prompt template, answer extraction and grader that rgra.py trains with.

  python eval.py --model runs/rgra/step_000100                 # one checkpoint, all six benchmarks
  python eval.py --model runs/rgra --benchmarks gsm8k math500  # a run folder: one row per step
  python eval.py --model HuggingFaceTB/SmolLM2-135M-Instruct --data-dir ../shared/data --limit 50
  python eval.py --model PATH --n 16 --temperature 0.6         # avg@16 and pass@1,2,4,8,16

Decoding is greedy pass@1 by default. With --n N samples per problem, c of them correct, the
report gives avg@n = mean over problems of c/n, and the unbiased pass@k estimator of
Chen et al. 2021 (Codex, arXiv 2107.03374, eq. 1):

  pass@k = E_problems[ 1 - C(n-c, k) / C(n, k) ]

computed in the numerically stable product form of the paper's Figure 3,
  1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i),
which is exactly 1 when n - c < k (every draw of k holds a correct sample) and 0 when c = 0.

Outputs in --out-dir: results.json (config, metrics, wall time), <benchmark>.jsonl with every
completion (one folder per step for a run folder) and accuracy_vs_step.png for a run folder.
"""

import argparse
import json
import math
import os
import re
import sys
import time

import torch
from tqdm import tqdm

import rgra

# name -> (hub id, config, split); used only without --data-dir. Gold answers come out of
# benchmark_gold whichever copy is read, so every copy grades alike.
BENCHMARKS = {
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test"),
    "aime24": ("HuggingFaceH4/aime_2024", None, "train"),
    "amc23": ("zwhe99/amc23", None, "test"),
    "minerva_math": ("math-ai/minervamath", None, "test"),
    "olympiadbench": ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate checkpoints on math benchmarks (pass@1, avg@n, pass@k)")
    a = p.add_argument
    a("--model", required=True, help="checkpoint folder, hub id, .gguf file, or a run folder of step_* checkpoints")
    a("--benchmarks", nargs="+", default=list(BENCHMARKS),
      help=f"any of {', '.join(BENCHMARKS)}, or JSONL files of problems (default: the six)")
    a("--data-dir", help="read <data-dir>/<benchmark>/test.jsonl instead of the hub")
    a("--limit", type=int, default=0, help="score only the first N problems of each benchmark (0 = all)")
    a("--template", default="chat", choices=rgra.TEMPLATES, help="prompt template (the one used in training)")
    a("--n", type=int, default=1, help="samples per problem")
    a("--temperature", type=float, default=0.0, help="0 = greedy; needed > 0 when --n > 1")
    a("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    a("--max-new-tokens", type=int, default=3000, help="completion budget, capped by the context left after the longest prompt")
    a("--batch-size", type=int, default=64, help="sequences per generate call")
    a("--grader-timeout", type=float, default=1.0, help="seconds allowed to grade one answer")
    a("--seed", type=int, default=0, help="sampling seed (reset per benchmark)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--out-dir", help="default: eval_results/<model name>")
    args = p.parse_args(argv)
    args.benchmarks = [b for item in args.benchmarks for b in item.split(",") if b]
    unknown = [b for b in args.benchmarks if b not in BENCHMARKS and not b.endswith(".jsonl")]
    if unknown:
        p.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)} or a .jsonl file")
    for flag in ("n", "max_new_tokens", "batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.limit < 0 or args.temperature < 0 or not (0 < args.top_p <= 1):
        p.error("--limit and --temperature must be >= 0 and --top-p in (0, 1]")
    if args.n > 1 and args.temperature == 0:
        p.error(f"--n {args.n} with --temperature 0: greedy decoding gives n identical samples")
    args.out_dir = args.out_dir or os.path.join("eval_results", model_name(args.model))
    return args


def model_name(model):
    """A short name for a model path or hub id, for folder names and table titles."""
    return os.path.basename(os.path.normpath(model)).removesuffix(".gguf") or "model"


def pass_at_k(n, c, k):
    """Unbiased pass@k of one problem from n samples with c correct (Chen et al. 2021, eq. 1).

    Returns 1 - C(n-c, k) / C(n, k) as a float in [0, 1], via the product form
    1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids huge binomials.
    Raises ValueError unless 1 <= k <= n and 0 <= c <= n (k > n has no unbiased estimate).
    """
    if not (1 <= k <= n and 0 <= c <= n):
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def load_benchmark(name, data_dir=None, limit=0):
    """Problems of one benchmark: list of {"question": str, "answer": str}, in file order.

    name: one of BENCHMARKS, read from <data_dir>/<name>/test.jsonl or, without data_dir, from the hub;
    or the path of any JSONL file of problems. limit: keep the first `limit` problems (0 = all).
    Raises rgra.DataError naming the file, line and field for a missing file, bad JSON, or a row
    without question or gold answer.
    """
    local = name in BENCHMARKS and data_dir is not None
    path = os.path.join(data_dir, name, "test.jsonl") if local else name
    problems = rgra.load_problems(path, hub={} if local else BENCHMARKS, gold=benchmark_gold)
    return problems[:limit] if limit else problems


def benchmark_gold(row):
    """The gold answer of a benchmark row: OlympiadBench's final_answer[0] without its `$`, Dr. GRPO's
    answer lists (['9.6'] or the string "['9.6']") by their first entry, AMC's floats (27.0) as
    integers, AIME's zero padding ('025') dropped; otherwise rgra.gold_answer (GSM8K, MATH)."""
    final, answer = row.get("final_answer"), row.get("answer")
    if isinstance(final, list) and final and isinstance(final[0], str):
        return final[0].strip().strip("$").strip() or None
    listed = re.fullmatch(r"\s*\[\s*(['\"])(.*)\1\s*\]\s*", answer, re.S) if isinstance(answer, str) else None
    if isinstance(answer, list) or listed:
        answer = (listed.group(2).replace("\\n", "") if listed else answer[0] if answer else "").strip() or None
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    if isinstance(answer, str) and re.fullmatch(r"0\d+", answer.strip()):
        answer = answer.strip().lstrip("0")
    return rgra.gold_answer({**row, "answer": answer})


def find_checkpoints(model):
    """[(label, path, step)] to score: the step_* checkpoints of a run folder (step = int), or the
    one checkpoint folder / .gguf file / hub id (step = None). Raises FileNotFoundError for a
    local path that does not exist or a folder that is neither checkpoint nor run folder."""
    if os.path.isdir(model):
        steps = rgra.checkpoints(model)
        if steps:
            return [(os.path.basename(s), s, int(os.path.basename(s).split("_")[1])) for s in steps]
        if os.path.isfile(os.path.join(model, "config.json")):
            return [(model_name(model), model, None)]
        raise FileNotFoundError(f"--model {model}: folder holds neither config.json (a checkpoint) "
                                "nor step_*/trainer_state.pt (a run folder)")
    rgra.check_model(model)  # a .gguf file, or a hub id that is cached or on the hub
    return [(model_name(model), model, None)]


def evaluate(model, tokenizer, problems, args, desc="eval"):
    """Generate args.n completions per problem and grade them.

    Returns (records, summary). records: one dict per completion (problem index i, sample k,
    prompt, problem, gold, completion, answer, correct, status, length in tokens, truncated).
    summary: problems, n, max_new_tokens, accuracy (= avg@n, mean of c/n), pass@k for
    k = 1, 2, 4, ... <= n, mean_length (tokens), truncation_rate, no_answer_rate,
    grader_timeouts, grader_errors (counted, never hidden: verl PR #5635).
    """
    prompts = [rgra.build_prompt(tokenizer, p["question"], args.template) for p in problems]
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    context = getattr(model.config, "max_position_embeddings", None)
    budget = args.max_new_tokens if context is None else min(args.max_new_tokens, context - max(lengths))
    if budget < 1:
        raise ValueError(f"the longest prompt ({max(lengths)} tokens) fills the {context}-token context")
    if budget < args.max_new_tokens:
        print(f"{desc}: --max-new-tokens capped at {budget} (context {context} - longest prompt {max(lengths)})")
    # sort longest first across the whole benchmark (not just within a generate call), so each
    # batch pads little and a batch too large for memory fails at the start, not the end
    order = sorted(range(len(problems)), key=lambda i: -lengths[i])
    per_call = max(1, args.batch_size // args.n)
    torch.manual_seed(args.seed)
    records = [None] * (len(problems) * args.n)
    with tqdm(total=len(problems), desc=desc, unit="problem") as bar:
        for start in range(0, len(order), per_call):
            chunk = order[start:start + per_call]
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
                out = rgra.sample(model, tokenizer, [prompts[i] for i in chunk], args.n, budget, args.temperature,
                                  args.top_p, args.batch_size, rgra.STOP_STRINGS.get(args.template, []))
            for row, (text, ids, cut) in enumerate(zip(out["texts"], out["completion_ids"], out["truncated"])):
                i, k = chunk[row // args.n], row % args.n
                correct, answer, status = rgra.grade(text, problems[i]["answer"], args.grader_timeout)
                records[i * args.n + k] = {
                    "index": i, "sample": k, "prompt": prompts[i], "problem": problems[i]["question"],
                    "gold": problems[i]["answer"], "completion": text, "answer": answer, "correct": correct,
                    "status": status, "length": len(ids), "truncated": cut}
            bar.update(len(chunk))
    return records, summarize(records, len(problems), args.n, budget)


def summarize(records, num_problems, n, max_new_tokens):
    """Benchmark metrics from the per-completion records (see evaluate)."""
    correct = [sum(r["correct"] for r in records[i * n:(i + 1) * n]) for i in range(num_problems)]
    total = len(records)
    summary = {"problems": num_problems, "n": n, "max_new_tokens": max_new_tokens,
               "accuracy": sum(c / n for c in correct) / num_problems}
    k = 1
    while k <= n:
        summary[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / num_problems
        k *= 2
    summary.update(
        mean_length=sum(r["length"] for r in records) / total,
        truncation_rate=sum(r["truncated"] for r in records) / total,
        no_answer_rate=sum(r["answer"] is None for r in records) / total,
        grader_timeouts=sum(r["status"] == "timeout" for r in records),
        grader_errors=sum(r["status"] == "error" for r in records))
    return summary


def format_table(rows, columns):
    """Plain-text table; rows are (label, dict), columns are keys of the dicts (missing = '').
    Floats are rates printed in %, except the token lengths."""
    def cell(column, v):
        return "" if v is None else f"{v:.1f}" if column == "mean_length" else \
            f"{100 * v:.1f}" if isinstance(v, float) else str(v)
    header = [""] + columns
    body = [[label] + [cell(c, d.get(c)) for c in columns] for label, d in rows]
    widths = [max(len(r[j]) for r in [header] + body) for j in range(len(header))]
    return "\n".join("  ".join(x.rjust(w) if j else x.ljust(w) for j, (x, w) in enumerate(zip(r, widths)))
                     for r in [header] + body)


def benchmark_table(metrics, n):
    """The per-benchmark table of one checkpoint, plus the unweighted average row."""
    acc = "accuracy" if n == 1 else f"avg@{n}"
    columns = ["problems", acc] + [f"pass@{2 ** j}" for j in range(1, n.bit_length())] + \
        ["mean_length", "truncation_rate", "no_answer_rate", "grader_timeouts", "grader_errors"]
    rows = [(name, dict(m, **{acc: m["accuracy"]})) for name, m in metrics.items()]
    rows.append(("average", {acc: average(metrics)}))
    return ("rates in %, lengths in tokens\n" + format_table(rows, columns))


def average(metrics):
    """Unweighted mean accuracy across benchmarks (each benchmark counts once, as in the papers)."""
    return sum(m["accuracy"] for m in metrics.values()) / len(metrics)


def plot_steps(results, path):
    """Accuracy (%) against step, one line per benchmark plus the average, into a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(results[0]["benchmarks"]) + ["average"]
    for name in names:
        values = [100 * (r["average"] if name == "average" else r["benchmarks"][name]["accuracy"]) for r in results]
        ax.plot([r["step"] for r in results], values, marker="o", label=name, linestyle="--" if name == "average" else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    try:  # every input check happens here, before a model is loaded
        data = {os.path.basename(name).removesuffix(".jsonl") if name.endswith(".jsonl") else name:
                load_benchmark(name, args.data_dir, args.limit) for name in args.benchmarks}
        targets = find_checkpoints(args.model)
    except (rgra.DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(args.out_dir, exist_ok=True)
    t_start, results = time.time(), []
    for label, path, step in targets:
        t0 = time.time()
        model, tokenizer = rgra.load_policy(path, torch.device(args.device))
        folder = args.out_dir if len(targets) == 1 else os.path.join(args.out_dir, label)
        os.makedirs(folder, exist_ok=True)
        metrics = {}
        for name, problems in data.items():
            records, metrics[name] = evaluate(model, tokenizer, problems, args, desc=f"{label} {name}")
            with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        del model
        results.append({"label": label, "path": path, "step": step, "benchmarks": metrics,
                        "average": average(metrics), "wall_time_s": time.time() - t0})
        print(f"\n{label} ({results[-1]['wall_time_s']:.0f} s)\n{benchmark_table(metrics, args.n)}\n")
    if len(targets) > 1:
        columns = list(data) + ["average"]
        rows = [(r["label"], dict({b: m["accuracy"] for b, m in r["benchmarks"].items()}, average=r["average"]))
                for r in results]
        print("accuracy (%) by step\n" + format_table(rows, columns) + "\n")
        plot_steps(results, os.path.join(args.out_dir, "accuracy_vs_step.png"))
    wall = time.time() - t_start
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"config": vars(args), "wall_time_s": wall, "checkpoints": results}, f, indent=1)
    print(f"wall time {wall:.0f} s; results in {args.out_dir}")


if __name__ == "__main__":
    main()
