"""Will the main job run on this GPU? A few RL steps of `python rgra.py --algo rgra` on a model of
Qwen2.5-1.5B-Instruct's shapes with random weights: timed, measured and checked, in under five
minutes on one A100 or H100, with nothing downloaded.

    python bench/gpu_check.py                        # one GPU; more than one visible: torchrun too
    python bench/gpu_check.py --ranks 1              # one GPU only
    python bench/gpu_check.py --device cpu --tiny    # the same code on a tiny model, on CPU

What runs. The model is built from its configuration with seeded random weights (speed and memory
are those of the real model) and saved with a tokenizer built here (a byte-level BPE of the
prompts, padded to the model's vocabulary) in a temporary folder (or --out-dir). rgra.load_models
loads it as the main job does, and rgra.rl_step takes --steps steps of the rgra preset at its
defaults (P 24, G 8, 512 new tokens, micro-batch 8, KL 0.04): once as a full fine-tune in bf16
autocast over fp32 weights, once with --lora-rank 128, and with more than one GPU visible both
again under torchrun (NCCL), one rank per GPU. Two things differ from the main job, to make the
figures the worst case and the update real: a hook on the output layer pushes the EOS logits to
-1e4, so that every completion runs to the full length; and as a random model earns no reward
(its advantages, hence its update, would be zero), the grader runs on every completion and is
timed, but its rewards are replaced by seeded random 0/1 rewards.

Timing, from outside rgra.py: rgra.sample and rgra.score_completions are replaced, for the steps,
by timed wrappers around the originals (rl_step looks them up at call time); on CUDA each timer
synchronises the device. generate and score are their times, train the rest of the step.

Checks, as it goes; the first that fails ends the script with status 1 and its name: rgra.sample
and rgra.score_completions were called, completions ran to the full length, the loss is finite and
no step skipped, the gradient is non-zero, the logits of the training forward are bf16 (autocast
active), every trainable tensor moved, the ranks hold the same weights (torchrun), the shared
prompt forward gives the plain forward's log-probs, the log-probs of sampling with the KV cache
equal a plain forward's (both within a bf16 tolerance under autocast, and a tight one in fp32),
the checkpoint is written, loads with rgra.load_policy and holds the trained weights.
bench/README.md explains each column.
"""

import argparse
import dataclasses
import gc
import importlib
import json
import math
import multiprocessing
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import transformers

# This file's folder (bench/) and the repository root.
BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]
import memory_estimate  # noqa: E402 - in bench/, on the path just set

import rgra  # noqa: E402 - in the repository root, on the path just set

# Qwen2.5-1.5B-Instruct's shapes (its config.json), shared with memory_estimate.py's estimate.
QWEN_SHAPES = memory_estimate.QWEN
TINY_SHAPES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "tie_word_embeddings": True,
    "max_position_embeddings": 1024,
}
# The tiny run: 2 prompts x 8 completions of 24 tokens a step.
TINY_FLAGS = ["--prompts-per-step", "2", "--max-new-tokens", "24"]
# The runs: name and rgra.py flags, each added to --algo rgra --bf16.
RUNS = {"full fine-tune": [], "LoRA rank 128": ["--lora-rank", "128"]}
# Dense bf16 peaks (TFLOP/s, no sparsity) of NVIDIA's datasheets, by a pattern of the device name,
# first match wins; a name matching none (AWS's A10G, whose figure NVIDIA does not publish, among
# them) is measured with a large matmul.
PEAK_BF16_TFLOPS = [
    (r"H100.*PCIe", 756),
    (r"H100 NVL", 835),
    (r"GH200", 989),
    (r"H200", 989),
    (r"H100", 989),
    (r"A100", 312),
    (r"L40S", 362),
    (r"\bL4\b", 121),
    (r"\bA10\b", 125),
]
# Logit given to EOS: never sampled, still finite (0 * -inf would make the entropy NaN).
SUPPRESSED_LOGIT = -1e4
# Largest |difference| of log-probs (nats) allowed between two paths that must agree: under bf16
# autocast, and in fp32. On CPU, Qwen2.5-1.5B's layers with random weights gave up to 0.09 under
# autocast and 1.2e-5 in fp32 between two computations equal in exact arithmetic; a prompt token
# lost from the context moved them by 2.
BF16_TOLERANCE = 0.5
FP32_TOLERANCE = 1e-4
# The exactness check samples this many tokens for 2 prompts x 2 completions.
KV_CHECK_TOKENS = 16
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SPECIAL_PATTERN = "|".join(re.escape(token) for token in SPECIALS)
# Qwen2.5's chat template for a conversation without a system message: its default system prompt.
CHAT_TEMPLATE = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NAMES = ["Maria", "James", "Aisha", "Kenji", "Olga", "Tomas", "Priya", "Lucas"]
GIB = 2**30


class CheckFailed(Exception):
    """A check failed: the message names it."""


def check(ok, name, detail=""):
    """Raise CheckFailed naming the check unless ok."""
    if not ok:
        raise CheckFailed(f"{name}: {detail}" if detail else name)


# ==== Inputs: problems, tokenizer, random model, all built here


def build_problems(count, seed=0):
    """count GSM8K-like word problems [{"question", "answer"}] (about 100 tokens each), seeded."""
    generator = random.Random(seed)
    problems = []
    for i in range(count):
        name = NAMES[i % len(NAMES)]
        trays, per_tray, extra, price = (generator.randint(2, 40) for _ in range(4))
        question = (
            f"{name} runs a small bakery. On Monday {name} bakes {trays} trays of muffins with "
            f"{per_tray} muffins on each tray, and on Tuesday {extra} more trays than on Monday. "
            f"Every muffin sells for {price} dollars, but {name} gives away 10 muffins to the "
            "neighbours each day. The flour, sugar and butter for the two days cost 85 dollars in "
            f"total. How many dollars does {name} earn from the muffins sold, after paying for "
            "the flour, sugar and butter?"
        )
        sold = trays * per_tray + (trays + extra) * per_tray - 20
        problems.append({"question": question, "answer": str(sold * price - 85)})
    return problems


def build_tokenizer(vocab_size, questions):
    """A Qwen2Tokenizer of exactly vocab_size tokens (Qwen2.5's class, pre-tokenizer, chat template
    and special tokens: pad <|endoftext|>, EOS <|im_end|>): a byte-level BPE trained here (the
    tokenizers library) on the chat prompts of questions, then filler tokens, so that every id the
    model samples decodes."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # The chat template needs no vocabulary: an empty tokenizer renders the prompts.
    blank = Qwen2Tokenizer()
    blank.chat_template = CHAT_TEMPLATE
    prompts = [rgra.build_prompt(blank, question, "chat") for question in questions]
    texts = [part for prompt in prompts for part in re.split(SPECIAL_PATTERN, prompt)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 4096),
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    vocab = core.get_vocab()
    merges = [tuple(pair) for pair in json.loads(core.to_str())["model"]["merges"]]
    # Fillers of printable ASCII, which the byte-level decoder maps to themselves.
    for i in range(len(vocab), vocab_size):
        vocab[f"<{i}>"] = i
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_tokens([AddedToken(token, special=True) for token in SPECIALS])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def save_random_model(folder, shapes, tokenizer, device):
    """A Qwen2 model of shapes with seeded random weights (initialised on device, saved in bf16
    like the hub's checkpoint) and the tokenizer, as a Hugging Face folder."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    config = Qwen2Config(**shapes, bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad)
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ==== Instruments: a hook on the output layer, timers around rgra's functions


class LogitsHook:
    """Forward hook of an output layer: sets the EOS logits to SUPPRESSED_LOGIT in place (so every
    completion runs to --max-new-tokens), notes the dtype of the logits of forwards with gradient
    (the training forward) and, while `recording` is a list, appends each forward's last-position
    logits (rows, V) in fp32."""

    def __init__(self, eos_ids):
        self.eos_ids = torch.tensor(sorted(eos_ids))
        self.train_dtypes = set()
        self.recording = None

    def __call__(self, module, inputs, output):
        """Edit the logits in place: the output layer's backward does not need its output."""
        # Moved once: a copy to the GPU at every forward would wait for the host.
        if self.eos_ids.device != output.device:
            self.eos_ids = self.eos_ids.to(output.device)
        output.index_fill_(-1, self.eos_ids, SUPPRESSED_LOGIT)
        if torch.is_grad_enabled():
            self.train_dtypes.add(output.dtype)
        if self.recording is not None:
            self.recording.append(output[:, -1].detach().float())


def synchronize(device):
    """Wait for the device's queued work, so that a timer measures it (CUDA runs asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Instruments:
    """Within a `with` block, rgra.sample and rgra.score_completions are replaced by timed wrappers
    around the originals: seconds["generate"] and ["score"] add up their times, `sampled` keeps
    the last sample's output, and the rewards are replaced by seeded random 0/1 ones."""

    def __init__(self, device, seed):
        self.device = device
        self.seed = seed
        self.seconds = {"generate": 0.0, "score": 0.0}
        self.sampled = None
        self.score_calls = 0

    def __enter__(self):
        self.originals = (rgra.sample, rgra.score_completions)
        rgra.sample = self.sample
        rgra.score_completions = self.score_completions
        return self

    def __exit__(self, *exception):
        rgra.sample, rgra.score_completions = self.originals

    def sample(self, *args, **kwargs):
        """rgra.sample, timed; its output kept in `sampled`."""
        synchronize(self.device)
        start = time.perf_counter()
        self.sampled = self.originals[0](*args, **kwargs)
        synchronize(self.device)
        self.seconds["generate"] += time.perf_counter() - start
        return self.sampled

    def score_completions(self, texts, golds, cfg):
        """rgra.score_completions, timed, with seeded random 0/1 rewards in place of its own."""
        start = time.perf_counter()
        rewards, checks = self.originals[1](texts, golds, cfg)
        self.seconds["score"] += time.perf_counter() - start
        self.score_calls += 1
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.score_calls)
        rewards = torch.randint(0, 2, rewards.shape, generator=generator).to(rewards.dtype)
        return rewards, checks


# ==== One run: load, step, measure, check


def rank():
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if dist.is_initialized() else 0


def autocast(cfg):
    """The main job's autocast context (rgra.main): bf16 on cfg's device type when cfg.bf16."""
    return torch.autocast(torch.device(cfg.device).type, torch.bfloat16, enabled=cfg.bf16)


def snapshot(model):
    """A strided sample of at most ~4096 values of each trainable tensor, copied to the CPU."""
    samples = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            stride = max(1, param.numel() // 4096)
            samples[name] = param.detach().flatten()[::stride].to("cpu", copy=True)
    return samples


def release_memory(device):
    """Free what earlier work left (CUDA's cached blocks included) and forget the peak memory so far
    (CUDA; on CPU the peak RSS cannot be reset)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """(peak allocated, peak reserved) bytes of the CUDA device since the last reset; on CPU the
    process's peak resident memory (since it started) for both."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return rss, rss


def take_steps(model, ref_model, tokenizer, problems, cfg, hook):
    """cfg.steps RL steps through rgra.rl_step under the main job's optimizer, scheduler and
    autocast, each one checked. Returns the optimizer, scheduler, step rows, the last sample's
    output and the data cursor."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, cfg.lr, (0.9, 0.95), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    )
    rows = []
    cursor = 0
    for step in range(1, cfg.steps + 1):
        hook.train_dtypes.clear()
        with Instruments(cfg.device, step * 100 + rank()) as instruments:
            synchronize(cfg.device)
            start = time.perf_counter()
            with autocast(cfg):
                metrics = rgra.rl_step(
                    model, ref_model, tokenizer, optimizer, scheduler, problems, step, cursor, cfg
                )
            synchronize(cfg.device)
            seconds = time.perf_counter() - start
        cursor = metrics["cursor"]
        check_step(step, metrics, instruments, hook, cfg)
        generate = instruments.seconds["generate"]
        score = instruments.seconds["score"]
        rows.append(
            {
                "step": step,
                "generate": generate,
                "score": score,
                "train": seconds - generate - score,
                "seconds": seconds,
                "tokens": metrics["tokens"],
                "trained_tokens": metrics["tokens"] * metrics["kept_frac"] * cfg.ppo_epochs,
            }
        )
    return optimizer, scheduler, rows, instruments.sampled, cursor


def check_step(step, metrics, instruments, hook, cfg):
    """The checks of one RL step (module docstring), each named with the step."""
    check(instruments.sampled is not None, f"step {step}: rl_step called rgra.sample")
    check(instruments.score_calls > 0, f"step {step}: rl_step called rgra.score_completions")
    lengths = {len(c) for c in instruments.sampled[1]}
    full = lengths == {cfg.max_new_tokens}
    check(full, f"step {step}: completions of full length", f"lengths {sorted(lengths)}")
    loss = metrics["loss"]
    finite = math.isfinite(loss) and metrics["skipped_steps"] == 0
    check(finite, f"step {step}: finite loss", f"loss {loss}, {metrics['skipped_steps']} skipped")
    grad_norm = metrics["grad_norm"]
    check(grad_norm > 0, f"step {step}: non-zero gradient", f"gradient norm {grad_norm}")
    dtypes = sorted(map(str, hook.train_dtypes))
    bf16 = hook.train_dtypes == {torch.bfloat16}
    check(bf16, f"step {step}: bf16 autocast active", f"training logits of dtype {dtypes}")


def check_weights_moved(before, model):
    """Every trainable tensor changed since `before` (a snapshot); under torchrun, the ranks hold
    the same weights."""
    after = snapshot(model)
    unmoved = [name for name, values in before.items() if torch.equal(values, after[name])]
    detail = f"{len(unmoved)} of {len(before)} trainable tensors unchanged, first {unmoved[:1]}"
    check(not unmoved, "weights moved", detail)
    if dist.is_initialized():
        sums = [None] * dist.get_world_size()
        dist.all_gather_object(sums, sum(values.double().sum().item() for values in after.values()))
        check(len(set(sums)) == 1, "ranks hold the same weights", f"weight sums {sums}")


# ==== Exactness: the shared prompt forward and the KV cache against a plain forward


def micro_batches(sampled, cfg):
    """The (prompts, completions) micro-batches of a sample's output (prompt_ids, completion_ids,
    ...), cfg.micro_batch_size sequences each in the sample's order: whole groups at the default
    micro-batch, as the training forward takes them."""
    prompt_ids, completion_ids = sampled[0], sampled[1]
    per_prompt = len(completion_ids) // len(prompt_ids)
    prompts = [prompt_ids[i // per_prompt] for i in range(len(completion_ids))]
    size = cfg.micro_batch_size
    batches = []
    for start in range(0, len(completion_ids), size):
        batches.append((prompts[start : start + size], completion_ids[start : start + size]))
    return batches


def forward_backward(model, prompts, completions, share_prompt, cfg):
    """rgra.completion_logprobs and a backward of their mean under autocast, timed. Returns the
    log-probs (m, Tc) without gradient and the seconds."""
    synchronize(cfg.device)
    start = time.perf_counter()
    with autocast(cfg):
        logp = rgra.completion_logprobs(model, prompts, completions, cfg.temperature, share_prompt)
    logp.mean().backward()
    synchronize(cfg.device)
    return logp.detach(), time.perf_counter() - start


def sharing_timing(model, sampled, cfg):
    """The last step's micro-batches through the training forward and backward under autocast,
    with the shared prompt and without (after one untimed warm-up of each): the seconds of each
    and the largest |log-prob difference| between them, checked."""
    batches = micro_batches(sampled, cfg)
    seconds = {True: 0.0, False: 0.0}
    gap = 0.0
    for share in (True, False):
        forward_backward(model, *batches[0], share, cfg)
    for prompts, completions in batches:
        logps = {}
        for share in (True, False):
            logps[share], elapsed = forward_backward(model, prompts, completions, share, cfg)
            seconds[share] += elapsed
        gap = max(gap, (logps[True] - logps[False]).abs().max().item())
    model.zero_grad(set_to_none=True)
    check(gap <= BF16_TOLERANCE, "prompt sharing exact on the training micro-batches", f"{gap:.3g}")
    return {
        "shared": seconds[True],
        "plain": seconds[False],
        "micro_batches": len(batches),
        "gap": gap,
    }


def logprob_gaps(model, tokenizer, prompts, cfg, hook):
    """The largest |difference| to a plain forward (rgra.completion_logprobs without sharing) of the
    log-probs of KV_CHECK_TOKENS tokens sampled by rgra.sample (2 completions of each prompt):
    "kv" from the logits the hook recorded while sampling (a prefilled, shared and growing KV
    cache), "shared" from the shared prompt forward."""
    short = dataclasses.replace(cfg, max_new_tokens=KV_CHECK_TOKENS)
    hook.recording = []
    prompt_ids, completion_ids, _, _ = rgra.sample(model, tokenizer, prompts, 2, short)
    rows = len(completion_ids)
    # One forward per new token, of all the rows; the prompts' prefill comes before.
    steps = [logits for logits in hook.recording if logits.shape[0] == rows][-KV_CHECK_TOKENS:]
    hook.recording = None
    logits = torch.stack(steps, dim=1) / cfg.temperature  # (rows, T, V)
    tokens = torch.tensor(completion_ids, device=logits.device)  # (rows, T)
    sampled = logits.log_softmax(dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    prompts_of_rows = [prompt_ids[i // 2] for i in range(rows)]
    with torch.no_grad():
        logps = {}
        for share in (True, False):
            logps[share] = rgra.completion_logprobs(
                model, prompts_of_rows, completion_ids, cfg.temperature, share
            )
    return {
        "kv": (sampled - logps[False]).abs().max().item(),
        "shared": (logps[True] - logps[False]).abs().max().item(),
    }


def exactness_check(model, tokenizer, problems, cfg, hook):
    """logprob_gaps of two prompts of different lengths (so with left padding), under autocast and
    in fp32, each checked against its tolerance. Returns {precision: gaps}."""
    questions = [problems[0]["question"], problems[1]["question"][:150]]
    prompts = [rgra.build_prompt(tokenizer, question, cfg.template) for question in questions]
    device_type = torch.device(cfg.device).type
    tolerances = {"bf16": BF16_TOLERANCE, "fp32": FP32_TOLERANCE}
    gaps = {}
    for precision, tolerance in tolerances.items():
        with torch.autocast(device_type, torch.bfloat16, enabled=precision == "bf16"):
            gaps[precision] = logprob_gaps(model, tokenizer, prompts, cfg, hook)
        for path, name in (("kv", "KV cache"), ("shared", "prompt sharing")):
            gap = gaps[precision][path]
            check(gap <= tolerance, f"{name} exact ({precision})", f"max |diff| {gap:.3g}")
    return gaps


def checkpoint_check(model, tokenizer, optimizer, scheduler, cursor, cfg, initial_folder):
    """rgra.save_checkpoint after the last step; on rank 0, the folder must be listed complete by
    rgra.checkpoints, load with rgra.load_policy (on the CPU), hold rgra.merged_state_dict's
    weights exactly and differ from the initial weights."""
    start = time.perf_counter()
    rgra.save_checkpoint(cfg.steps, cursor, model, tokenizer, optimizer, scheduler, cfg)
    seconds = time.perf_counter() - start
    if rank() != 0:
        return seconds
    folders = rgra.checkpoints(cfg.out_dir)
    check(folders, "checkpoint written", f"no complete checkpoint in {cfg.out_dir}")
    saved = rgra.load_policy(folders[-1], "cpu")[0].state_dict()
    initial = rgra.load_policy(initial_folder, "cpu")[0].state_dict()
    expected = rgra.merged_state_dict(model)
    wrong = [k for k, v in expected.items() if k not in saved or not saved[k].equal(v.cpu())]
    check(
        not wrong, "checkpoint loads the trained weights", f"{len(wrong)} differ, first {wrong[:1]}"
    )
    changed = [k for k in expected if not saved[k].equal(initial[k])]
    check(changed, "checkpoint holds trained weights", "it equals the initial model")
    return seconds


# ==== The GPU's peak, the memory estimate


def bf16_peak(device):
    """(FLOP/s, source): the device's dense bf16 peak from PEAK_BF16_TFLOPS by its name, or
    measured: the best of 5 bf16 matmuls (n = 8192 on CUDA, 1024 on CPU)."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
        for pattern, tflops in PEAK_BF16_TFLOPS:
            if re.search(pattern, name):
                return tflops * 1e12, f"{name}, datasheet"
        n = 8192
    else:
        name = platform.processor() or platform.machine() or "CPU"
        n = 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = math.inf
    for _ in range(6):
        synchronize(device)
        start = time.perf_counter()
        a @ a
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best, f"{name}, measured (bf16 matmul, n = {n})"


def quiet_worker(threads):
    """Start a worker process: torch's CPU threads, and output to /dev/null (the profiler that
    memory_estimate.py runs writes lines of its own)."""
    torch.set_num_threads(threads)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)


def estimate_gib(config, lora, ckpt, sequences, completion_len):
    """memory_estimate.peak_estimate_gib for micro-batches of `sequences` completions of
    completion_len tokens (it sets memory_estimate's micro-batch: call it in a worker process)."""
    memory_estimate.set_micro_batch(sequences, completion_len)
    return memory_estimate.peak_estimate_gib(config, lora, ckpt)


def start_estimates(shapes, cfgs):
    """estimate_gib of each run of cfgs (its model of shapes and micro-batch) in a worker process,
    CPU work (~20 s a run at full size) done while the runs use the device: {run: AsyncResult} on
    rank 0, {} elsewhere."""
    from transformers import Qwen2Config

    if rank() != 0:
        return {}
    # The worker finds its functions by module name, so this file as the module gpu_check: run as
    # a script it is __main__, which the worker need not share.
    this_file = importlib.import_module("gpu_check")
    pool = multiprocessing.get_context("spawn").Pool(1, this_file.quiet_worker, (4,))
    config = Qwen2Config(**shapes)
    results = {}
    for name, cfg in cfgs.items():
        settings = (config, cfg.lora_rank > 0, cfg.gradient_checkpointing)
        settings += (cfg.micro_batch_size, cfg.max_new_tokens)
        results[name] = pool.apply_async(this_file.estimate_gib, settings)
    pool.close()
    return results


def estimate_text(pending):
    """The estimate of an AsyncResult as text: "54.4 GiB", or why there is none."""
    try:
        return f"{pending.get(timeout=600):.3g} GiB"
    except Exception as error:
        return f"failed ({type(error).__name__}: {error})"


# ==== One run, its table


def run(name, cfg, problems, initial_folder):
    """One run (RUNS[name]): load as rgra.main does, take the steps, measure and check. Returns
    what its table shows."""
    # The random state of a fresh process, the same on every rank: LoRA's A matrices are drawn
    # from it, and an earlier run's rank-dependent sampling seeds have moved it.
    torch.manual_seed(0)
    model, ref_model, tokenizer = rgra.load_models(cfg, None)
    eos = {tokenizer.eos_token_id, *model.generation_config.eos_token_id}
    hook = LogitsHook(eos)
    for m in (model, ref_model):
        if m is not None:
            m.get_output_embeddings().register_forward_hook(hook)
    before = snapshot(model)
    release_memory(cfg.device)
    optimizer, scheduler, rows, sampled, cursor = take_steps(
        model, ref_model, tokenizer, problems, cfg, hook
    )
    memory = peak_memory(cfg.device)
    check_weights_moved(before, model)
    result = {"name": name, "rows": rows, "memory": memory}
    result["sharing"] = sharing_timing(model, sampled, cfg)
    result["exactness"] = exactness_check(model, tokenizer, problems, cfg, hook)
    result["checkpoint"] = checkpoint_check(
        model, tokenizer, optimizer, scheduler, cursor, cfg, initial_folder
    )
    result["prompt_tokens"] = sum(map(len, sampled[0])) / len(sampled[0])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    result.update(trainable=trainable, frozen=frozen)
    if dist.is_initialized():
        most = torch.tensor(memory, device=cfg.device)
        dist.all_reduce(most, dist.ReduceOp.MAX)
        result["memory"] = most.tolist()
    return result


def print_table(result, cfg, peak, estimate):
    """The run's table and the lines below it."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device(cfg.device)
    # 6 FLOPs per parameter and token for a trained weight (forward, backward to the activations
    # and to the weight), 4 for a frozen one (no weight gradient).
    flops_per_token = 6 * result["trainable"] + 4 * result["frozen"]
    processes = "1 process"
    if world > 1:
        processes = f"{world} ranks (torchrun)"
    print(f"\n== {result['name']}: {processes} on {peak[1]} ==")
    print(
        f"{result['trainable']:,} of {result['trainable'] + result['frozen']:,} parameters "
        f"trained; P {cfg.prompts_per_step} x G {cfg.group_size}, {cfg.max_new_tokens} new tokens "
        f"(forced), prompts of {result['prompt_tokens']:.0f} tokens, micro-batch "
        f"{cfg.micro_batch_size}, KL {cfg.kl_coef}, bf16 autocast {cfg.bf16}"
    )
    header = ("step", "generate s", "score s", "train s", "step s", "gen tok/s", "train tok/s")
    print("".join(f"{h:>12s}" for h in (*header, "MFU")))
    for row in result["rows"]:
        mfu = flops_per_token * row["trained_tokens"] / row["train"] / (peak[0] * world)
        cells = [f"{row['step']:>12d}"]
        cells += [f"{row[k]:>12.2f}" for k in ("generate", "score", "train", "seconds")]
        cells += [f"{row['tokens'] / row['generate']:>12,.0f}"]
        cells += [f"{row['trained_tokens'] / row['train']:>12,.0f}", f"{mfu:>12.1%}"]
        print("".join(cells))
    allocated, reserved = (m / GIB for m in result["memory"])
    where = "peak RSS of the process"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / GIB
        where = f"peak allocated, {reserved:.3g} GiB reserved, of {total:.3g} GiB"
    print(f"memory: {allocated:.3g} GiB {where}; memory_estimate.py: {estimate}")
    sharing = result["sharing"]
    change = sharing["shared"] / sharing["plain"] - 1
    print(
        f"shared prompt forward: {sharing['shared']:.2f} s against {sharing['plain']:.2f} s "
        f"plain ({change:+.0%}) for the forward+backward of the last step's "
        f"{sharing['micro_batches']} micro-batches; log-probs max |diff| {sharing['gap']:.2g}"
    )
    gaps = result["exactness"]
    print(
        f"against a plain forward, log-probs max |diff|: KV cache {gaps['bf16']['kv']:.2g} (bf16), "
        f"{gaps['fp32']['kv']:.2g} (fp32); shared prompt {gaps['bf16']['shared']:.2g} (bf16), "
        f"{gaps['fp32']['shared']:.2g} (fp32)"
    )
    steps = math.ceil(cfg.num_problems / cfg.prompts_per_step)
    minutes = steps * result["rows"][-1]["seconds"] / 60
    one_pass = f"a pass over {cfg.num_problems} problems ({steps} steps)"
    print(f"{one_pass} at the last step's time: {minutes:.0f} min")
    print(f"checkpoint: written in {result['checkpoint']:.1f} s, loaded, holds the trained weights")
    print("checks: all passed", flush=True)


# ==== Main: the runs in this process, then under torchrun


def parse_args(argv=None):
    """The command line; bad flags exit with status 2 before anything runs."""
    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0],
        epilog="Other flags are rgra.py's, added to every run: --micro-batch-size 4, "
        "--gradient-checkpointing, ...",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny model, 2 prompts x 8 completions of 24 tokens"
    )
    parser.add_argument(
        "--steps", type=int, default=2, help="RL steps a run (LoRA's A matrices move at the 2nd)"
    )
    parser.add_argument(
        "--ranks", type=int, help="processes of the torchrun runs (default: visible GPUs; 1: none)"
    )
    parser.add_argument(
        "--out-dir", help="for the model and checkpoints (default: a temporary one)"
    )
    args, args.rgra_flags = parser.parse_known_args(argv)
    cuda = args.device.startswith("cuda")
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is visible (try --device cpu --tiny)")
    if "WORLD_SIZE" in os.environ and args.out_dir is None:
        parser.error("under torchrun, --out-dir must name a folder that every rank sees")
    if args.ranks is None:
        args.ranks = torch.cuda.device_count() if cuda else 1
    return args


def run_flags(args, out_dir, name):
    """rgra.py's flags of the run `name` (RUNS) in this process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    folder = os.path.join(out_dir, f"{name.replace(' ', '_')}_{world}_ranks")
    flags = ["--algo", "rgra", "--bf16", "--device", args.device, "--steps", str(args.steps)]
    flags += ["--model", os.path.join(out_dir, "model"), "--out-dir", folder]
    if args.tiny:
        flags += TINY_FLAGS
    return flags + args.rgra_flags + RUNS[name]


def run_all(args, out_dir):
    """Every run of RUNS in this process (a torchrun rank, or alone), rank 0 printing the tables.
    Returns each run's peak memory as text."""
    shapes = TINY_SHAPES if args.tiny else QWEN_SHAPES
    cfgs = {name: rgra.parse_args(run_flags(args, out_dir, name)) for name in RUNS}
    first = cfgs[next(iter(RUNS))]
    rgra.start_distributed(first)
    problems = build_problems(first.prompts_per_step * args.steps)
    folder = os.path.join(out_dir, "model")
    if rank() == 0 and not os.path.exists(os.path.join(folder, "config.json")):
        tokenizer = build_tokenizer(shapes["vocab_size"], [p["question"] for p in problems])
        save_random_model(folder, shapes, tokenizer, first.device)
    if dist.is_initialized():
        dist.barrier()
    estimates = start_estimates(shapes, cfgs)
    peak = bf16_peak(first.device)
    peaks = []
    for name, cfg in cfgs.items():
        # Under torchrun, start_distributed chose this rank's GPU.
        cfg.device = first.device
        result = run(name, cfg, problems, folder)
        if rank() == 0:
            print_table(result, cfg, peak, estimate_text(estimates[name]))
        peaks.append(f"{name} {max(result['memory']) / GIB:.3g} GiB")
        del result
        release_memory(cfg.device)
    return peaks


def run_torchrun(args, out_dir):
    """This script again under torchrun with args.ranks processes, on the same folder."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(args.ranks), os.path.abspath(__file__)]
    command += ["--device", args.device, "--steps", str(args.steps), "--out-dir", out_dir]
    if args.tiny:
        command.append("--tiny")
    command += args.rgra_flags
    print(f"\n== the same under torchrun, {args.ranks} ranks ==", flush=True)
    status = subprocess.run(command).returncode
    check(status == 0, f"torchrun with {args.ranks} ranks", f"exit status {status} (output above)")


def main(argv=None):
    """Run, print the tables, exit 1 naming the first failed check."""
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    # The fp32 exactness checks in full fp32: TF32 matmuls would round to 10 bits.
    torch.set_float32_matmul_precision("highest")
    under_torchrun = "WORLD_SIZE" in os.environ
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="gpu_check_")
    start = time.time()
    try:
        peaks = run_all(args, out_dir)
        if not under_torchrun and args.ranks > 1:
            run_torchrun(args, out_dir)
    except CheckFailed as failure:
        print(f"gpu_check: FAILED: {failure}", file=sys.stderr, flush=True)
        sys.exit(1)
    except torch.OutOfMemoryError as error:
        message = str(error).splitlines()[0]
        print(f"gpu_check: FAILED: out of memory: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if args.out_dir is None:
            shutil.rmtree(out_dir, ignore_errors=True)
    if not under_torchrun:
        seconds = time.time() - start
        print(f"\ngpu_check: every check passed in {seconds:.0f} s: the main job runs here, at")
        print(f"these settings; peak memory {', '.join(peaks)}")


if __name__ == "__main__":
    main()
