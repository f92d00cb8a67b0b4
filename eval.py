"""
eval.py: score a checkpoint on the math benchmarks of the RL-for-reasoning papers, with the
prompt template, answer extraction and grader that rgra.py trains with.

  python eval.py --model runs/rgra/step_000100                 # one checkpoint, all six benchmarks
  python eval.py --model runs/rgra --benchmarks gsm8k math500  # a run folder: one row per step
  python eval.py --model HuggingFaceTB/SmolLM2-135M-Instruct --data-dir path/to/data --limit 50
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
    """The command line as an argparse namespace. Bad flags exit with status 2, naming the flag."""
    parser = argparse.ArgumentParser(
        description="Evaluate checkpoints on math benchmarks (pass@1, avg@n, pass@k)"
    )
    parser.add_argument(
        "--model",
        required=True,
        help="checkpoint folder, hub id, .gguf file, or a run folder of step_* checkpoints",
    )
    parser.add_argument(
        "--benchmarks",
        nargs="+",
        default=list(BENCHMARKS),
        help=f"any of {', '.join(BENCHMARKS)}, or JSONL files of problems (default: the six)",
    )
    parser.add_argument(
        "--data-dir", help="read <data-dir>/<benchmark>/test.jsonl instead of the hub"
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=0,
        help="score only the first N problems of each benchmark (0 = all)",
    )
    parser.add_argument(
        "--template",
        default="chat",
        choices=rgra.TEMPLATES,
        help="prompt template (the one used in training)",
    )
    parser.add_argument("--n", type=int, default=1, help="samples per problem")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy; needed > 0 when --n > 1"
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=3000,
        help="completion budget, capped by the context left after the longest prompt",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    parser.add_argument(
        "--grader-timeout", type=float, default=1.0, help="seconds allowed to grade one answer"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (reset per benchmark)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", help="default: eval_results/<model name>")
    args = parser.parse_args(argv)
    # "gsm8k,amc23" counts as two benchmarks.
    args.benchmarks = [name for item in args.benchmarks for name in item.split(",") if name]
    unknown = [b for b in args.benchmarks if b not in BENCHMARKS and not b.endswith(".jsonl")]
    if unknown:
        parser.error(
            f"unknown benchmark {', '.join(unknown)}; "
            f"choose from {', '.join(BENCHMARKS)} or a .jsonl file"
        )
    for flag in ("n", "max_new_tokens", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.limit < 0 or args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error("--limit and --temperature must be >= 0 and --top-p in (0, 1]")
    if args.n > 1 and args.temperature == 0:
        parser.error(
            f"--n {args.n} with --temperature 0: greedy decoding gives n identical samples"
        )
    if args.out_dir is None:
        args.out_dir = os.path.join("eval_results", short_name(args.model))
    return args


def short_name(path):
    """A short name for a model path, a .gguf file, a JSONL file or a hub id, for folder names and
    table titles: the last part of the path without its .gguf or .jsonl suffix."""
    name = os.path.basename(os.path.normpath(path))
    return name.removesuffix(".gguf").removesuffix(".jsonl") or "model"


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

    name: one of BENCHMARKS, read from <data_dir>/<name>/test.jsonl or, without data_dir, from the
    hub; or the path of any JSONL file of problems. limit: keep the first `limit` problems (0 =
    all). Raises rgra.DataError naming the file, line and field for a missing file, bad JSON, or a
    row without question or gold answer.
    """
    path = name
    hub = BENCHMARKS
    if name in BENCHMARKS and data_dir is not None:
        path = os.path.join(data_dir, name, "test.jsonl")
        hub = {}
    problems = rgra.load_problems(path, hub=hub, gold=benchmark_gold)
    if limit:
        return problems[:limit]
    return problems


def benchmark_gold(row):
    """The gold answer of a benchmark row as a string, or None: OlympiadBench's final_answer[0]
    without its `$`; Dr. GRPO's answer lists (['9.6'] or the string "['9.6']") by their first
    entry; AMC's floats (27.0) as integers; AIME's zero padding ('025') dropped; then
    rgra.gold_answer (GSM8K, MATH)."""
    final = row.get("final_answer")
    if isinstance(final, list) and final and isinstance(final[0], str):
        return final[0].strip().strip("$").strip() or None
    answer = row.get("answer")
    if isinstance(answer, str):
        listed = re.fullmatch(r"\s*\[\s*(['\"])(.*)\1\s*\]\s*", answer, re.S)
        if listed:
            answer = [listed.group(2).replace("\\n", "")]
    # An empty list has no answer: rgra.gold_answer then reads the solution, if any.
    if isinstance(answer, list):
        answer = answer[0] if answer else None
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    if isinstance(answer, str) and re.fullmatch(r"0\d+", answer.strip()):
        answer = answer.strip().lstrip("0")
    return rgra.gold_answer({**row, "answer": answer})


def find_checkpoints(model):
    """[(label, path, step)] to score: the step_* checkpoints of a run folder (step = int), or the
    one checkpoint folder / .gguf file / hub id (step = None). Raises FileNotFoundError for a
    local path that does not exist or a folder that is neither checkpoint nor run folder."""
    if not os.path.isdir(model):
        # A .gguf file, or a hub id that is cached or on the hub.
        rgra.check_model(model)
        return [(short_name(model), model, None)]
    targets = []
    for path in rgra.checkpoints(model):
        label = os.path.basename(path)
        targets.append((label, path, int(label.removeprefix("step_"))))
    if targets:
        return targets
    if os.path.isfile(os.path.join(model, "config.json")):
        return [(short_name(model), model, None)]
    raise FileNotFoundError(
        f"--model {model}: folder holds neither config.json (a checkpoint) "
        "nor step_*/trainer_state.pt (a run folder)"
    )


def evaluate(model, tokenizer, problems, args, desc="eval"):
    """Generate args.n completions per problem and grade them.

    Returns (records, summary). records: one dict per completion, problem-major (problem index i,
    sample k, prompt, problem, gold, completion, answer, correct, status, length in tokens,
    truncated). summary: see summarize. The budget is args.max_new_tokens, capped so that the
    longest prompt and its completion fit the model's context.
    """
    prompts = [rgra.build_prompt(tokenizer, p["question"], args.template) for p in problems]
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    longest = max(lengths)
    budget = args.max_new_tokens
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None:
        budget = min(budget, context - longest)
    if budget < 1:
        raise ValueError(f"the longest prompt ({longest} tokens) fills the {context}-token context")
    if budget < args.max_new_tokens:
        message = (
            f"--max-new-tokens capped at {budget} (context {context} - longest prompt {longest})"
        )
        print(f"{desc}: {message}")
    # Longest first across the whole benchmark, not just within a generate call: each batch pads
    # little, and a batch too large for memory fails at the start, not at the end.
    order = sorted(range(len(problems)), key=lambda i: -lengths[i])
    prompts_per_call = max(1, args.batch_size // args.n)
    # rgra.sample's settings: greedy or sampled, the budget, the template's stop strings.
    settings = rgra.Config(
        template=args.template,
        max_new_tokens=budget,
        temperature=args.temperature,
        top_p=args.top_p,
        gen_batch_size=args.batch_size,
    )
    bf16 = model.device.type == "cuda"
    torch.manual_seed(args.seed)
    records = [None] * (len(problems) * args.n)
    with tqdm(total=len(problems), desc=desc, unit="problem") as bar:
        for start in range(0, len(order), prompts_per_call):
            chunk = order[start : start + prompts_per_call]
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
                chunk_prompts = [prompts[i] for i in chunk]
                _, completion_ids, texts, truncated = rgra.sample(
                    model, tokenizer, chunk_prompts, args.n, settings
                )
            # Row j of the chunk's completions is sample j % n of problem chunk[j // n].
            for j, text in enumerate(texts):
                i = chunk[j // args.n]
                k = j % args.n
                correct, answer, status = rgra.grade(
                    text, problems[i]["answer"], args.grader_timeout
                )
                records[i * args.n + k] = {
                    "index": i,
                    "sample": k,
                    "prompt": prompts[i],
                    "problem": problems[i]["question"],
                    "gold": problems[i]["answer"],
                    "completion": text,
                    "answer": answer,
                    "correct": correct,
                    "status": status,
                    "length": len(completion_ids[j]),
                    "truncated": truncated[j],
                }
            bar.update(len(chunk))
    return records, summarize(records, len(problems), args.n, budget)


def summarize(records, num_problems, n, max_new_tokens):
    """Benchmark metrics from the problem-major records of evaluate (n per problem): problems, n,
    max_new_tokens, accuracy (= avg@n, the mean of c/n), pass@k for k = 1, 2, 4, ... <= n,
    mean_length (tokens), truncation_rate, no_answer_rate, and the grader_timeouts and
    grader_errors counted, never hidden (verl PR #5635)."""
    correct = [sum(r["correct"] for r in records[i * n : (i + 1) * n]) for i in range(num_problems)]
    total = len(records)
    summary = {
        "problems": num_problems,
        "n": n,
        "max_new_tokens": max_new_tokens,
        "accuracy": sum(c / n for c in correct) / num_problems,
    }
    for k in powers_of_two(n):
        summary[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / num_problems
    summary["mean_length"] = sum(r["length"] for r in records) / total
    summary["truncation_rate"] = sum(r["truncated"] for r in records) / total
    summary["no_answer_rate"] = sum(r["answer"] is None for r in records) / total
    summary["grader_timeouts"] = sum(r["status"] == "timeout" for r in records)
    summary["grader_errors"] = sum(r["status"] == "error" for r in records)
    return summary


def powers_of_two(n):
    """The k of the pass@k reported for n samples: 1, 2, 4, ... up to n."""
    return [2**j for j in range(n.bit_length())]


def format_cell(column, value):
    """A table cell: '' for a missing value, mean_length in tokens, other floats (rates) in %."""
    if value is None:
        return ""
    if column == "mean_length":
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{100 * value:.1f}"
    return str(value)


def format_table(rows, columns):
    """Plain-text table: rows are (label, dict), columns are keys of the dicts (missing = '')."""
    lines = [[""] + columns]
    for label, values in rows:
        lines.append([label] + [format_cell(c, values.get(c)) for c in columns])
    widths = [max(len(line[j]) for line in lines) for j in range(len(lines[0]))]
    text = []
    for line in lines:
        # The label column is aligned left, the numbers right.
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        text.append("  ".join(cells))
    return "\n".join(text)


def benchmark_table(metrics, n):
    """The table of one checkpoint: a row per benchmark of metrics (name -> summary), and the
    unweighted average row. Its accuracy column is avg@n, pass@1 being the same number."""
    accuracy = "accuracy"
    if n > 1:
        accuracy = f"avg@{n}"
    passes = [f"pass@{k}" for k in powers_of_two(n)[1:]]
    counts = [
        "mean_length",
        "truncation_rate",
        "no_answer_rate",
        "grader_timeouts",
        "grader_errors",
    ]
    columns = ["problems", accuracy, *passes, *counts]
    rows = [(name, {**m, accuracy: m["accuracy"]}) for name, m in metrics.items()]
    rows.append(("average", {accuracy: average(metrics)}))
    return "rates in %, lengths in tokens\n" + format_table(rows, columns)


def average(metrics):
    """Unweighted mean accuracy across benchmarks (each counts once, as in the papers)."""
    return sum(m["accuracy"] for m in metrics.values()) / len(metrics)


def accuracies(result):
    """benchmark -> accuracy of one checkpoint's result, then "average" -> their average."""
    values = {name: m["accuracy"] for name, m in result["benchmarks"].items()}
    values["average"] = result["average"]
    return values


def plot_steps(results, path):
    """Accuracy (%) against step, one line per benchmark plus the average (dashed), into a PNG."""
    # No pyplot: no GUI backend, no global figure state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.subplots()
    steps = [r["step"] for r in results]
    for name in accuracies(results[0]):
        values = [100 * accuracies(r)[name] for r in results]
        linestyle = "--" if name == "average" else "-"
        ax.plot(steps, values, marker="o", label=name, linestyle=linestyle)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (%)")
    ax.legend()
    fig.savefig(path, dpi=100)


def main(argv=None):
    """Check every input (bad input exits with status 2 before a model loads), then score each
    checkpoint on each benchmark, print the tables and write the outputs to --out-dir."""
    args = parse_args(argv)
    try:
        # A JSONL file is a benchmark named after its file.
        data = {}
        for name in args.benchmarks:
            data[short_name(name)] = load_benchmark(name, args.data_dir, args.limit)
        targets = find_checkpoints(args.model)
    except (rgra.DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(args.out_dir, exist_ok=True)
    t_start = time.time()
    results = []
    for label, path, step in targets:
        t0 = time.time()
        model, tokenizer = rgra.load_policy(path, torch.device(args.device))
        folder = args.out_dir
        if len(targets) > 1:
            folder = os.path.join(args.out_dir, label)
        os.makedirs(folder, exist_ok=True)
        metrics = {}
        for name, problems in data.items():
            records, metrics[name] = evaluate(model, tokenizer, problems, args, f"{label} {name}")
            with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        # Free this checkpoint before the next one loads.
        del model
        wall = time.time() - t0
        result = {
            "label": label,
            "path": path,
            "step": step,
            "benchmarks": metrics,
            "average": average(metrics),
            "wall_time_s": wall,
        }
        results.append(result)
        print(f"\n{label} ({wall:.0f} s)\n{benchmark_table(metrics, args.n)}\n")
    if len(targets) > 1:
        rows = [(r["label"], accuracies(r)) for r in results]
        table = format_table(rows, [*data, "average"])
        print(f"accuracy (%) by step\n{table}\n")
        plot_steps(results, os.path.join(args.out_dir, "accuracy_vs_step.png"))
    wall = time.time() - t_start
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"config": vars(args), "wall_time_s": wall, "checkpoints": results}, f, indent=1)
    print(f"wall time {wall:.0f} s; results in {args.out_dir}")


if __name__ == "__main__":
    main()
