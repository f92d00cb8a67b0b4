"""
rgra.py: reinforcement learning from verifiable rewards for LLM math, in one file.

One RL step (P prompts, G completions per prompt, the policy pi_theta):

  1. rollout   o_1..o_G ~ pi_old(. | q) for each prompt q           (pi_old = pi_theta now)
  2. reward    r_i = 1[answer(o_i) == gold(q)] + format_bonus * 1[o_i is well formed]
  3. advantage A_i from the group's rewards, e.g. (r_i - mean_g r) / (std_g r + eps)
  4. loss      mu optimizer steps on
                 J = agg_{i,t} [ l_{i,t} + beta * KL_t(pi_theta || pi_ref) ]
               with the per-token surrogate l_{i,t} one of
                 pg    -A_i * log pi_theta(o_it)                                   (REINFORCE)
                 clip  -min(s_it A_i, clip(s_it, 1-eps_low, 1+eps_high) A_i)       (PPO)
                       s_it = pi_theta(o_it) / pi_old(o_it)
                 nll   -log pi_theta(o_it)  on kept samples                        (RAFT)
               and agg one of the four aggregations of SPEC section 4 below, whose denominators
               belong to the whole optimizer step, not to a micro-batch.

With mu = 1 (one optimizer step per rollout batch) the ratio is 1, the clip is inactive and the
clipped surrogate has exactly the gradient of pg: GRPO and RGRA differ only when mu > 1.

Presets (--algo); every column is also its own flag that overrides the preset:

  algo       advantage                 surrogate       KL (beta)   aggregation               source
  grpo       group-standardised        clip 0.2        k3, 0.04    seq-mean-token-mean       DeepSeekMath, arXiv 2402.03300 eq. 3
  dr_grpo    group-centred             clip 0.2        none        seq-mean-token-sum-norm   Dr. GRPO, arXiv 2503.20783
  rgra       group-standardised        pg              k3, 0.04    seq-mean-token-mean       RGRA, arXiv 2603.18756
  grpo_pos   max(group-standardised,0) clip 0.2        k3, 0.04    seq-mean-token-mean       RGRA paper ablation
  reinforce  raw reward                pg              k3, 0.04    seq-mean-token-mean       RGRA paper ablation
  rloo       leave-one-out             pg              none        seq-mean-token-sum        Ahmadian et al., arXiv 2402.14740
  raft       best of group (r > 0)     nll             none        token-mean                RAFT, arXiv 2304.06767 (top-1)
  dapo       group-standardised        clip 0.2/0.28   none        token-mean                DAPO, arXiv 2503.14476
             (+ drop all-equal groups, mask truncated completions)

Aggregations over the B sequences of one optimizer step (|o_i| = completion tokens, EOS included):
  seq-mean-token-mean      (1/B) sum_i (1/|o_i|) sum_t l_it
  token-mean               sum_i sum_t l_it / sum_i |o_i|
  seq-mean-token-sum-norm  (1/B) sum_i sum_t l_it / L        (L = max_new_tokens)
  seq-mean-token-sum       (1/B) sum_i sum_t l_it

Run:
  python rgra.py --algo rgra                      # the RGRA paper's GSM8K setting on one GPU
  python rgra.py --algo grpo --ppo-epochs 2       # GRPO with mu = 2, where the clip matters
  python rgra.py --algo rgra --resume             # continue the run in --out-dir
  python -m pytest -q test_rgra.py
"""

import argparse
import cmath
import glob
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from fractions import Fraction

import sympy
import torch
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Configuration

PRESETS = {  # SPEC section 6
    "grpo":      dict(advantage="group", std_norm="group", positive_only=False, surrogate="clip", eps_low=0.2, eps_high=0.2, kl_coef=0.04, kl_estimator="k3", loss_agg="seq-mean-token-mean", drop_equal_groups=False, mask_truncated=False),
    "dr_grpo":   dict(advantage="group", std_norm="none", positive_only=False, surrogate="clip", eps_low=0.2, eps_high=0.2, kl_coef=0.0, kl_estimator="k3", loss_agg="seq-mean-token-sum-norm", drop_equal_groups=False, mask_truncated=False),
    "rgra":      dict(advantage="group", std_norm="group", positive_only=False, surrogate="pg", eps_low=0.2, eps_high=0.2, kl_coef=0.04, kl_estimator="k3", loss_agg="seq-mean-token-mean", drop_equal_groups=False, mask_truncated=False),
    "grpo_pos":  dict(advantage="group", std_norm="group", positive_only=True, surrogate="clip", eps_low=0.2, eps_high=0.2, kl_coef=0.04, kl_estimator="k3", loss_agg="seq-mean-token-mean", drop_equal_groups=False, mask_truncated=False),
    "reinforce": dict(advantage="raw", std_norm="none", positive_only=False, surrogate="pg", eps_low=0.2, eps_high=0.2, kl_coef=0.04, kl_estimator="k3", loss_agg="seq-mean-token-mean", drop_equal_groups=False, mask_truncated=False),
    "rloo":      dict(advantage="leave-one-out", std_norm="none", positive_only=False, surrogate="pg", eps_low=0.2, eps_high=0.2, kl_coef=0.0, kl_estimator="k3", loss_agg="seq-mean-token-sum", drop_equal_groups=False, mask_truncated=False),
    "raft":      dict(advantage="best", std_norm="none", positive_only=False, surrogate="nll", eps_low=0.2, eps_high=0.2, kl_coef=0.0, kl_estimator="k3", loss_agg="token-mean", drop_equal_groups=False, mask_truncated=False),
    "dapo":      dict(advantage="group", std_norm="group", positive_only=False, surrogate="clip", eps_low=0.2, eps_high=0.28, kl_coef=0.0, kl_estimator="k3", loss_agg="token-mean", drop_equal_groups=True, mask_truncated=True),
}
LOSS_AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm", "seq-mean-token-sum")
TEMPLATES = ("chat", "qwen_math", "r1", "none")
STD_EPS = 1e-6  # advantage = (r - mean) / (std + STD_EPS), std Bessel-corrected as torch.std (TRL, verl)
KL_CLAMP = 20.0  # |log pi_theta - log pi_ref| is clamped before exp (verl's bound): k3 overflows otherwise


def parse_args(argv=None):
    """Parse the command line and resolve --algo into one flat config (argparse.Namespace).

    Flags left unset take the preset's value (PRESETS, SPEC section 6). Contradictory flags exit
    with status 2 and a message naming the flag, before anything slow starts.
    """
    p = argparse.ArgumentParser(description="RL from verifiable rewards for LLM math (GRPO, Dr. GRPO, RGRA, ...)")
    a = p.add_argument
    a("--algo", default="rgra", choices=sorted(PRESETS), help="preset of the objective (SPEC section 6)")
    # model and data
    a("--model", default="Qwen/Qwen2.5-1.5B-Instruct", help="policy: HF folder, hub id or .gguf file")
    a("--train-data", default="gsm8k", help="JSONL path, or 'gsm8k' / 'math' from the hub (needs `datasets`)")
    a("--num-problems", type=int, default=1800, help="seeded random subset of the training problems (0 = all)")
    a("--skip-bad-rows", action="store_true", help="skip data rows without a question or gold answer (counted) instead of failing")
    a("--template", default="chat", choices=TEMPLATES, help="prompt template")
    a("--seed", type=int, default=0, help="seed of the data order and of sampling")
    # rollout
    a("--prompts-per-step", type=int, default=24, help="P: prompts per rollout batch")
    a("--group-size", type=int, default=8, help="G: completions sampled per prompt")
    a("--max-new-tokens", type=int, default=512, help="completion budget in tokens (also Dr. GRPO's L)")
    a("--temperature", type=float, default=1.0, help="sampling temperature; log-probs use the same T")
    a("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    a("--gen-batch-size", type=int, default=256, help="sequences per generate call")
    a("--format-bonus", type=float, default=0.1, help="reward added for a well-formed answer (RGRA paper: 0.1)")
    a("--grader-timeout", type=float, default=1.0, help="seconds allowed to grade one answer")
    # objective (None = the preset's value)
    a("--advantage", choices=("group", "leave-one-out", "raw", "best"), help="baseline: group mean, leave-one-out mean, none, or RAFT's best-of-group selection")
    a("--std-norm", choices=("group", "batch", "none"), help="divide advantages by the group's or the batch's std")
    a("--positive-only", action=argparse.BooleanOptionalAction, help="clamp advantages at 0 (GRPO-pos ablation)")
    a("--surrogate", choices=("pg", "clip", "nll"), help="per-token surrogate")
    a("--eps-low", type=float, help="clip range below 1")
    a("--eps-high", type=float, help="clip range above 1")
    a("--kl-coef", type=float, help="beta: weight of KL(policy || reference model); 0 loads no reference model")
    a("--kl-estimator", choices=("k1", "k2", "k3"), help="per-token KL estimator (SPEC section 5)")
    a("--loss-agg", choices=LOSS_AGGS, help="loss aggregation (SPEC section 4)")
    a("--drop-equal-groups", action=argparse.BooleanOptionalAction, help="drop groups whose rewards are all equal")
    a("--mask-truncated", action=argparse.BooleanOptionalAction, help="drop completions cut at --max-new-tokens from the loss")
    # optimisation
    a("--steps", type=int, default=0, help="rollout steps (0 = one pass over the problems)")
    a("--ppo-epochs", type=int, default=1, help="passes over each rollout batch")
    a("--mini-batches", type=int, default=1, help="optimizer steps per pass; mu = ppo_epochs * mini_batches")
    a("--micro-batch-size", type=int, default=8, help="sequences per forward/backward (gradient accumulation)")
    a("--lr", type=float, default=1e-6, help="AdamW learning rate, constant after warm-up")
    a("--warmup-steps", type=int, default=0, help="linear warm-up, in optimizer steps")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping threshold")
    a("--share-prompt", action=argparse.BooleanOptionalAction, default=True, help="one prompt forward per group, reused by its G completions")
    a("--gradient-checkpointing", action=argparse.BooleanOptionalAction, help="recompute activations in backward (default: on for CUDA)")
    a("--bf16-weights", action="store_true", help="pure bf16 weights and optimizer (saves memory; lr ~1e-6 updates may round away)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    # run management
    a("--out-dir", default="runs/rgra", help="metrics.jsonl, config.json and checkpoints go here")
    a("--save-every", type=int, default=25, help="checkpoint every N steps (and at the end)")
    a("--keep-last", type=int, default=0, help="keep only the newest N checkpoints (0 = all)")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out-dir")
    a("--max-bad-steps", type=int, default=3, help="stop after this many non-finite steps in a row")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.algo].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = args.device.startswith("cuda")
    if args.share_prompt and args.gradient_checkpointing:
        args.share_prompt = False  # HF drops past_key_values under checkpointing; the prompt reuse needs them
    args.mu = args.ppo_epochs * args.mini_batches
    check_args(p, args)
    return args


def check_args(parser, args):
    """Refuse contradictory flags with parser.error (exit status 2); warn about legal oddities."""
    group_baseline = args.advantage in ("group", "leave-one-out") or args.std_norm == "group"
    if group_baseline and args.group_size < 2:
        parser.error(f"--group-size {args.group_size}: --advantage {args.advantage} / --std-norm {args.std_norm} need a group of at least 2")
    for flag in ("prompts_per_step", "group_size", "max_new_tokens", "ppo_epochs", "mini_batches", "micro_batch_size",
                 "gen_batch_size", "save_every", "max_bad_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    rollout = args.prompts_per_step * args.group_size
    if rollout % args.mini_batches:
        parser.error(f"--mini-batches {args.mini_batches} does not divide the rollout batch of {rollout} sequences")
    if (rollout // args.mini_batches) % args.micro_batch_size:
        parser.error(f"--micro-batch-size {args.micro_batch_size} does not divide the optimizer step of {rollout // args.mini_batches} sequences")
    if args.kl_coef < 0:
        parser.error(f"--kl-coef {args.kl_coef} is negative")
    if not 0 <= args.eps_low < 1:
        parser.error(f"--eps-low {args.eps_low} must be in [0, 1)")
    if args.eps_high < 0:
        parser.error(f"--eps-high {args.eps_high} must be >= 0")
    if args.keep_last < 0 or args.steps < 0:
        parser.error("--keep-last and --steps must be >= 0")
    if args.temperature < 0 or not (0 < args.top_p <= 1):
        parser.error("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.mu > 1 and args.surrogate == "pg":
        print(f"warning: mu = {args.mu} with the pg surrogate: without a ratio, the extra optimizer steps "
              "reuse stale samples with no off-policy correction", file=sys.stderr)
    if args.mu > 1 and args.temperature == 0:
        parser.error("--temperature 0 (greedy) has no sampling distribution for the ratio")


# -----------------------------------------------------------------------------
# Data: problems with gold answers (SPEC section 9)

class DataError(ValueError):
    """Bad training data: the message names the file, line and field."""


def question_text(row):
    """The problem statement of a data row (question / problem / input field), or None."""
    for key in ("question", "problem", "input"):
        if isinstance(row.get(key), str) and row[key].strip():
            return row[key]
    return None


def gold_answer(row):
    """The gold final answer of a data row as a string, or None (SPEC section 9).

    final_answer[0] (OlympiadBench, `$` stripped) | answer (GSM8K: after '#### ', commas
    dropped; AMC's float 27.0 -> '27'; Dr. GRPO's list ['9.6\\n'] or "['9.6']" -> '9.6')
    | last \\boxed{} of solution (MATH, Minerva), joined with the boxes just before it when only
    separators stand between them (multi-part MATH answers boxed piece by piece).
    """
    final = row.get("final_answer")
    if isinstance(final, list) and final and isinstance(final[0], str):
        return final[0].strip().strip("$").strip() or None
    answer = row.get("answer")
    if isinstance(answer, list):  # Dr. GRPO's Minerva/OlympiadBench: a list of accepted forms
        answer = answer[0] if answer and isinstance(answer[0], str) else None
    if isinstance(answer, bool):
        answer = None
    if isinstance(answer, (int, float)):
        return str(int(answer)) if float(answer).is_integer() else repr(float(answer))
    if isinstance(answer, str) and answer.strip():
        if "####" in answer:
            return answer.split("####")[-1].strip().replace(",", "")
        listed = re.fullmatch(r"\s*\[\s*(['\"])(.*)\1\s*\]\s*", answer, re.S)
        return (listed.group(2).replace("\\n", "").strip() if listed else answer.strip()) or None
    for key in ("solution", "gt_answer", "ground_truth_answer"):
        if isinstance(row.get(key), str):
            boxed = (_final_boxes(row[key]) or (0, None))[1] if key == "solution" else row[key].strip()
            if boxed:
                return boxed
    return None


def load_problems(source, num_problems=None, seed=0, skip_bad_rows=False):
    """Read training problems: list of {"question": str, "answer": str}.

    source: a JSONL path, or "gsm8k" / "math" loaded with `datasets` from the hub.
    num_problems: keep a random subset of this size, drawn with `seed` (None or 0 = all).
    Raises DataError naming file, line and field for a missing/empty file, a line that is not
    JSON, or a row with no question or gold answer (skipped and counted with skip_bad_rows).
    """
    rows = read_jsonl(source) if source not in HUB_DATASETS else load_hub_rows(source)
    problems, skipped = [], 0
    for where, row in rows:
        q, gold = (question_text(row), gold_answer(row)) if isinstance(row, dict) else (None, None)
        if q is None or gold is None:
            field = "row is not an object" if not isinstance(row, dict) else (
                "no question field (question/problem/input)" if q is None else
                "no gold answer (final_answer/answer/solution with \\boxed{})")
            if not skip_bad_rows:
                raise DataError(f"{where}: {field}")
            skipped += 1
            continue
        problems.append({"question": q, "answer": gold})
    if not problems:
        raise DataError(f"{source}: no usable problems ({skipped} rows skipped)")
    if skipped:
        print(f"skipped {skipped} rows without a question or gold answer in {source}", file=sys.stderr)
    if num_problems and num_problems < len(problems):
        problems = random.Random(seed).sample(problems, num_problems)
    return problems


HUB_DATASETS = {"gsm8k": ("openai/gsm8k", "main"), "math": ("DigitalLearningGmbH/MATH-lighteval", "default")}


def read_jsonl(path):
    """Yield (f"{path}:{line}", row) for each non-blank line; DataError on a missing file or bad JSON."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (and not one of the hub names {sorted(HUB_DATASETS)})")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not rows:
        raise DataError(f"{path}: file is empty")
    return rows


def load_hub_rows(name):
    """Rows of a hub dataset's train split, as (where, row) pairs; needs network and `datasets`."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"--train-data {name}: `pip install datasets` to load it from the hub, or pass a JSONL path") from None
    repo, config = HUB_DATASETS[name]
    try:
        rows = datasets.load_dataset(repo, config, split="train")
    except Exception as e:  # offline, or the hub refused: say so instead of a stack trace
        raise DataError(f"--train-data {name}: could not load {repo} from the hub ({type(e).__name__}: {e}); "
                        "pass a JSONL path instead") from None
    return [(f"{repo}[{i}]", dict(row)) for i, row in enumerate(rows)]


# -----------------------------------------------------------------------------
# Prompt templates

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
R1_TEMPLATE = (  # Dr. GRPO's R1-Zero template
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with the answer. "
    "The reasoning process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>.\n"
    "User: {question}\nAssistant: <think>")
QWEN_MATH_TEMPLATE = ("<|im_start|>system\n" + BOXED_INSTRUCTION + "<|im_end|>\n"
                      "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def build_prompt(tokenizer, question, template):
    """The prompt text for one question. Raises ValueError for an unknown template.

    chat: the model's own chat template, user turn = question + BOXED_INSTRUCTION.
    qwen_math: Qwen2.5-Math's system prompt (as Dr. GRPO). r1: the R1-Zero template, ends with
    "Assistant: <think>". none: the bare question. Non-chat prompts get the tokenizer's BOS
    when the tokenizer would add one itself (sample() tokenizes without special tokens).
    """
    if template == "chat":
        messages = [{"role": "user", "content": question + "\n" + BOXED_INSTRUCTION}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")
    text = {"qwen_math": QWEN_MATH_TEMPLATE, "r1": R1_TEMPLATE, "none": "{question}"}[template].format(question=question)
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("").input_ids[:1] == [bos]:
        text = tokenizer.bos_token + text
    return text


def stop_strings(template):
    """Strings that end a completion besides EOS: the r1 template stops at </answer>."""
    return ["</answer>"] if template == "r1" else []


# -----------------------------------------------------------------------------
# Reward checking: extract the final answer of a completion, decide whether it
# is mathematically equal to the gold answer.
#
# Safety: completions are untrusted. No text is ever handed to eval/exec,
# sympify or parse_expr. Answers go through a small LaTeX tokenizer and a
# recursive-descent parser written here; sympy objects are built node by node.
# Bounds: inputs are capped in size, regexes are linear, the parser caps depth
# and token count, and powers/factorials are size-checked before evaluation.
# Equality is decided in this process by exact rational arithmetic and by
# evaluating both answers at fixed random points (complex floats). Only when
# that is inconclusive does sympy get the pair, in a forked worker process
# that is killed and replaced when it overruns the timeout (signal.alarm
# cannot be used off the main thread: verl #5635, Math-Verify #55).
# -----------------------------------------------------------------------------


REL_TOL = 1e-6          # relative tolerance for decimals: |a-b| <= REL_TOL*max(|a|,|b|)
MAX_ANSWER_CHARS = 2000  # longer answers are compared as strings only
MAX_TEXT_CHARS = 100_000  # extraction looks at the tail of a completion only
_MAX_TOKENS, _MAX_DEPTH, _MAX_BITS = 600, 40, 20_000


class _Unsupported(Exception):
    """The fast path cannot decide this answer (parse or evaluation failure)."""


class _TooLarge(Exception):
    """A number beyond the size caps (9^9^9^9): only an identical text can match it."""


# ---------------------------------------------------------------- extraction

def _boxes(text):
    """(start, end, content) of every \\boxed{...} / \\fbox{...} / `\\boxed 7`, in order;
    content is None for a box left open (a completion cut inside its answer). Braces
    are matched in one linear pass (no rescans on unbalanced input)."""
    close, stack = {}, []
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            close[stack.pop()] = m.start()
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\b\s*", text):
        j = m.end()
        if text[j:j + 1] == "{":
            content = text[j + 1:close[j]].strip() if j in close else None
            out.append((m.start(), close.get(j, j) + 1, content))
        else:   # `\boxed 7`: the box holds one space-delimited token
            tok = re.match(r"[^\s$]*", text[j:j + 100]).group().rstrip(".")
            out.append((m.start(), j + len(tok), tok))
    return [b for b in out if b[2] != ""]


def _joinable(gap):
    """True when the text between two boxes only separates answers: `, `, ` and `,
    `\\quad \\text{and} \\quad`, `\\) and \\( y_2 =`, ` papers and ` (a few words with
    and/or, no sentence end), so that both boxes are parts of one answer."""
    if len(gap) > 200:
        return False
    gap = re.sub(r"(?:[A-Za-z](?:_\{?\w+\}?)?|\([A-Za-z,\s]*\))\s*=\s*\$?\s*(?:\\\(\s*)?$", "", gap)
    gap = re.sub(r"\\(?:text|mbox|textbf)\s*\{|\\q?quad|\\[()\[\],;:! ]|[${}]", " ", gap)
    words = re.findall(r"[^\s,;]+", gap)
    if not words:
        return True
    return len(words) <= 5 and "\n\n" not in gap and re.fullmatch(r"[A-Za-z(),;\s]*", gap) is not None \
        and any(w.lower() in ("and", "or") for w in words)


def _join_last(text, spans):
    """(start, answer) of the last (start, end, content) span joined with the spans right
    before it when only separators stand between them (`\\boxed{2} and \\boxed{3}`,
    `$1$ or $2$` -> "2, 3"). None if there is none, or if the last one was left open
    (the final answer is unfinished: an earlier one is not the answer either)."""
    if not spans or spans[-1][2] is None:
        return None
    parts = [spans[-1]]
    for span in reversed(spans[:-1]):
        if len(parts) >= 20 or span[2] is None or not _joinable(text[span[1]:parts[0][0]]):
            break
        parts.insert(0, span)
    contents = list(dict.fromkeys(p[2] for p in parts))   # a repeated answer counts once
    return parts[0][0], ", ".join(contents)


def _final_boxes(text):
    """(start, answer) of the final boxed answer (see _join_last), or None."""
    return _join_last(text, _boxes(text))


# inline $..$ and \(..\) stay on one line; display $$..$$ and \[..\] may span lines
_MATH_SPAN = re.compile(r"\$\$([^$]{1,2000}?)\$\$|\\\[(.{1,2000}?)\\\]|\\\(([^\n]{1,2000}?)\\\)"
                        r"|(?<!\\)\$((?:\\\$|[^$\n]){1,2000}?)(?<!\\)\$", re.S)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _last_math(text):
    """(start, answer) of the last math span ($..$, $$..$$, \\(..\\), \\[..\\]) joined
    as _join_last does, or None. Reads the last 5000 characters."""
    text = text[-5000:]
    spans = [(m.start(), m.end(), next(g for g in m.groups() if g is not None).strip())
             for m in _MATH_SPAN.finditer(text)]
    return _join_last(text, [sp for sp in spans if sp[2]])


def _phrase_answer(rest):
    """The answer after "final answer is"/"Answer:": up to the line end, "I hope it is
    correct" or a chat token; in a sentence of prose ("The largest $n$ is 34") the
    last math span or number."""
    ans = re.split(r"\.?\s*I hope|<\||\n", rest.strip(), maxsplit=1)[0].replace("**", "").strip(" $")
    ans = ans[:-1].strip(" $") if ans.endswith(".") else ans
    ans = re.sub(r'^\\?"\s*|\s*\\?"$', "", ans).strip(" $")   # The final answer is "$12$"
    boxed = _final_boxes(ans)
    if boxed:
        return boxed[1]
    bare = re.sub(r"\$[^$]*\$|\\[A-Za-z]+(?:\{[^{}]*\})?", " ", ans)
    if re.search(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}", bare):   # prose around the value
        math, nums = _last_math(ans), list(_NUMBER.finditer(bare))
        num = (nums[-1].start(), nums[-1].group().rstrip(",")) if nums else None
        ans = max((c for c in (math, num) if c), default=(0, None))[1]
    return ans if ans and len(ans) <= MAX_ANSWER_CHARS else None


_FINAL = re.compile(r"final answer is\s*:?", re.I)
_PHRASE = re.compile(r"answer\s*(?:is\s*:?|:)", re.I)


def _last_match(pattern, text):
    """The last match of pattern in text, or None."""
    last = None
    for last in pattern.finditer(text):
        pass
    return last


def extract_answer(text, last_number_fallback=False, last_math_fallback=True):
    """Final answer of a model completion, or None.

    Looks, in order, at: <answer>...</answer> (r1 template; a box inside wins;
    a missing closing tag is allowed since generation stops at it), the last
    \\boxed{...} (nested braces, `\\boxed 7`, \\fbox; boxes separated only by
    "and"/commas are one answer; a "final answer is" sentence after the box wins),
    GSM8K's `#### 72`, phrases like "The final answer is $x$. I hope it is correct."
    (Minerva) or "Answer: x", and then, when last_math_fallback, the last math span
    ($x$, \\[x\\]). Training and eval.py turn that fallback off: in an unfinished
    completion the last span is often the restated question (`|(1-i)^8|` for gold 16),
    which would reward echoing the problem. A last box
    left open gives None. When last_number_fallback is True (off by default: it
    rewards unfinished completions) the last number in the text is the answer of
    last resort. Only the last MAX_TEXT_CHARS characters are read; linear time.
    """
    if not text:
        return None
    text = text[-MAX_TEXT_CHARS:]
    k = text.rfind("<answer>")
    if k >= 0:
        inner = text[k + 8:].split("</answer>")[0]
        boxed = _final_boxes(inner)
        return boxed[1] if boxed else (inner.strip() or None)
    boxed = _final_boxes(text)
    if boxed is not None:   # unless a later "The final answer is $10,455$" restates it
        final = _last_match(_FINAL, text)
        restated = _phrase_answer(text[final.end():]) if final and final.start() > boxed[0] else None
        return restated if restated and re.search(r"[\d\\]", restated) else boxed[1]
    if _boxes(text):
        return None   # the last box is unfinished
    hashes = re.findall(r"####\s*([^\n]+)", text)
    if hashes:
        return hashes[-1].strip()
    last = _last_match(_PHRASE, text)
    if last is not None:
        phrase = _phrase_answer(text[last.end():])
        return None if phrase and re.search(r"\\(?:boxed|fbox)", phrase) else phrase  # "within \boxed{}": empty box
    math = _last_math(text) if last_math_fallback else None
    if math:
        return math[1]
    if last_number_fallback:
        nums = _NUMBER.findall(text)
        return nums[-1].rstrip(",") if nums else None
    return None


# ------------------------------------------------------------- normalization

_SPACE_CMDS = {"!", ",", ";", ":", " ", "quad", "qquad", "displaystyle", "left", "right", "bigl",
               "bigr", "Bigl", "Bigr", "big", "Big", "(", ")", "[", "]", "$", "limits"}
_CMDS = {"dfrac": r"\frac", "tfrac": r"\frac", "cfrac": r"\frac", "leqslant": "<=", "geqslant": ">=",
         "leq": "<=", "geq": ">=", "le": "<=", "ge": ">=", "neq": "!=", "ne": "!=", "lt": "<",
         "gt": ">", "langle": "(", "rangle": ")", "varnothing": r"\emptyset", "degree": "",
         "%": "%", "infty": "∞", "ast": "*", "cdot": "*", "times": "*", "div": "/", "to": "→",
         "dots": "", "ldots": "", "approx": "≈", "cdots": "", "mid": "|", "vert": "|", "lvert": "|", "rvert": "|"}


def _command(m):
    name = m.group(1)
    return " " if name in _SPACE_CMDS else _CMDS.get(name, m.group(0))


_UNITS = ("units?|cm|mm|km|meters?|metres?|inch(?:es)?|feet|foot|ft|yards?|miles?|mph|hours?|"
          "minutes?|seconds?|days?|weeks?|months?|years?|dollars?|cents?|degrees?|sq|square|cubic|"
          "pounds?|lbs?|ounces?|grams?|kg|liters?|litres?|gallons?|students?|people|points?|ways?")


def _text_group(m):
    """\\text{...}: words next to math are units/prose and vanish; 'or'/'and' separate answers."""
    body = m.group(1).strip()
    if body.lower() in ("or", "and", ","):
        return ","
    return "\x00" + body + "\x01"


def _unwrap_text(s):
    r"""Replace \text{..}-like groups: kept as content when the answer is only text."""
    for _ in range(4):
        s2 = re.sub(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|rm|mathit|textnormal)\s*\{([^{}]*)\}"
                    r"(?:\^\{?[23]\}?)?", _text_group, s)
        if s2 == s:
            break
        s = s2
    outside = re.sub(r"\x00[^\x00\x01]*\x01(_\{?\w+\}?)?", "", s)
    if re.search(r"[\dA-Za-z]", outside):
        s = outside  # math is present: the words are units or commentary
    return s.replace("\x00", "").replace("\x01", "")


def _matrix(m):
    """pmatrix/bmatrix body -> nested tuple text; a single row/column -> flat tuple."""
    rows = [r.split("&") for r in m.group(1).split(r"\\") if r.strip()]
    if len(rows) == 1 or all(len(r) == 1 for r in rows):
        return "(" + ",".join(c for r in rows for c in r) + ")"
    return "(" + ",".join("(" + ",".join(r) + ")" for r in rows) + ")"


def _repeating(m):
    """0.1\\overline{6} -> \\frac{1}{6}: a repeating decimal as an exact fraction."""
    whole, fixed, rep = m.group(1) or "0", m.group(2), m.group(3)
    value = Fraction(int(whole)) + Fraction(int(fixed or "0"), 10 ** len(fixed)) + \
        Fraction(int(rep), (10 ** len(rep) - 1) * 10 ** len(fixed))
    return r"\frac{%d}{%d}" % (value.numerator, value.denominator)


def _normalize(s):
    """Canonical text of one answer (no math decided here, only notation)."""
    s = str(s).strip()
    s = re.sub(r"(?<!\\)\\\\(?=(?:[dt]?frac|left|right|sqrt|pi|le|ge|leq|geq|lt|gt|neq|cdot|times|text|"
               r"mathrm|infty|cup|in|pm|circ|boxed|approx)\b)", r"\\", s)   # over-escaped \\frac
    if r"\boxed" in s or r"\fbox" in s:   # a boxed answer, or a whole completion
        s = (_final_boxes(s) or (0, s))[1]
    s = re.sub(r"(\d*)\.(\d{0,50})\\overline\{(\d{1,50})\}", _repeating, s)
    s = re.sub(r"\\left\s*[\[(]\s*(\\begin\{array\}.*?\\end\{array\})\s*\\right\s*[\])]", r"\1", s, flags=re.S)
    s = s.replace(r"\mathbb{R}", r"(-\infty,\infty)")
    s = re.sub(r"\\begin\{array\}\{[^{}]*\}", r"\\begin{matrix}", s).replace(r"\end{array}", r"\end{matrix}")
    s = re.sub(r"\\begin\{[pbvBV]?matrix\}(.*?)\\end\{[pbvBV]?matrix\}", _matrix, s, flags=re.S)
    s = s.replace(r"\begin{matrix}", "").replace(r"\end{matrix}", "")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace(r"\circ", "")
    s = re.sub(r"\^\s*\{?\s*\\prime\s*\}?|\\prime", "'", s)
    s = re.sub(r"\s*\{\s*,\s*\}\s*|,\s*\\!\s*", ",", s)   # 10{,}000 and MATH's 10,\!080
    s = re.sub(r"(\d)\s*(?:percent(?:age)?|pct)\b", r"\1%", s)
    s = re.sub(r"\\q?quad", " ", s)   # also when glued to a name: \quadx_2
    s = re.sub(r"\\([A-Za-z]+|[^A-Za-z{}|])", _command, s)
    s = re.sub(r"[$°\n]|np\.|math\.|infinity", lambda m: "∞" if m.group() == "infinity" else " ", s)
    s = _unwrap_text(s)
    s = re.sub(r"\\?\bor\b|\band\b|;", ",", s)
    s = re.sub(r"(\d)\s+(?=\d{3}(?!\d))", r"\1", s)   # 1 000 -> 1000
    s = re.sub(r"(?<![\d.,(\[])([1-9]\d{0,2})((?:,\d{3})+)(?![\d,)\]])", lambda m: m.group(0).replace(",", ""), s)
    s = re.sub(r"(\d[0-9A-Za-z]*)_\{?(\d{1,2})\}?", r"\1_\2", s)   # base-n subscript 1011_{2}
    s = re.sub(r"(?<![\w.}^])(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}", r"(\1+\2/\3)", s)  # 1\frac45
    s = re.sub(r"^[A-Za-z]\s*\\in\s*", "", s.strip())   # x \in [-2, 7]
    s = re.sub(r"(\d)\s*(?:" + _UNITS + r")\b(?:\^\{?[23]\}?)?\.?$", r"\1", s.strip())
    s = re.sub(r"\s+", " ", s).strip().rstrip(".,").strip()
    while s.startswith("{") and s.endswith("}") and _balanced(s[1:-1]):
        s = s[1:-1].strip()   # bare braces only group in LaTeX: {1,3} is 1,3
    return s


# --------------------------------------------------------------- tokenizer

_FUNCS = {"sin", "cos", "tan", "sec", "csc", "cot", "arcsin", "arccos", "arctan", "sinh", "cosh",
          "tanh", "ln", "log", "exp", "sqrt", "abs", "asin", "acos", "atan"}
_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*(?:[eE][+-]?\d+(?![\d.]))?|\.\d+(?:[eE][+-]?\d+)?)"
                    r"|(\\[A-Za-z]+|\\[{}|])|([A-Za-z]+)|(<=|>=|!=|\S))")


def _tokens(s):
    """Token list: ('n', text) numbers, ('c', \\cmd), ('w', name), ('o', char)."""
    out, pos = [], 0
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if not m or m.end() == pos:
            break
        pos = m.end()
        num, cmd, word, op = m.groups()
        if num:
            out.append(("n", num))
        elif cmd:
            out.append(("c", cmd))
        elif word:
            if word == "pi":   # plain-text pi (-2*pi)
                out.append(("c", r"\pi"))
            else:
                out.extend([("w", word)] if word in _FUNCS else [("w", ch) for ch in word])
        elif op:
            out.append(("o", op))
        if len(out) > _MAX_TOKENS:
            raise _Unsupported("too many tokens")
    return out


# ------------------------------------------------------------------ parser
# AST: ("num", Fraction) ("sym", name) ("const", "pi"|"e"|"i"|"inf") ("add", [..])
# ("mul", [..]) ("neg", a) ("div", a, b) ("pow", a, b) ("fn", name, [args]) ("pct", a)

_CONSTS = {r"\pi": "pi", "e": "e", "i": "i", "∞": "inf", r"\infty": "inf"}
_CMD_FUNCS = {r"\sin", r"\cos", r"\tan", r"\sec", r"\csc", r"\cot", r"\arcsin", r"\arccos",
              r"\arctan", r"\sinh", r"\cosh", r"\tanh", r"\ln", r"\log", r"\exp"}
_STOP = {")", "]", "}", ",", "=", "<", ">", "<=", ">=", "!=", "&", r"\}", r"\rfloor",
         r"\rceil", "|", r"\cup", r"\cap", r"\in", "→", r"\pm"}


class _Parser:
    """Recursive descent over _tokens; precedence: + - < * / implicit < unary - < ^ < ! ."""

    def __init__(self, s):
        self.t, self.i, self.depth = _tokens(s), 0, 0

    def peek(self):
        return self.t[self.i] if self.i < len(self.t) else (None, None)

    def take(self, val=None):
        tok = self.peek()
        if tok[0] is None or (val is not None and tok[1] != val):
            raise _Unsupported(f"expected {val}")
        self.i += 1
        return tok

    def parse(self):
        node = self.expr()
        if self.i != len(self.t):
            raise _Unsupported("trailing tokens")
        return node

    def expr(self):
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise _Unsupported("too deep")
        terms = [self.term()]
        while self.peek()[1] in ("+", "-"):
            sign = self.take()[1]
            terms.append(self.term() if sign == "+" else ("neg", self.term()))
        self.depth -= 1
        return terms[0] if len(terms) == 1 else ("add", terms)

    def term(self):
        factors = [self.factor()]
        while True:
            kind, val = self.peek()
            if val in ("*", "/"):
                self.take()
                f = self.factor()
                factors.append(f if val == "*" else ("div", ("num", Fraction(1)), f))
            elif kind is not None and val not in _STOP and val not in ("+", "-", "^", "!", "%", "_"):
                factors.append(self.factor())   # implicit multiplication: 2x, 3\sqrt{2}
            else:
                break
        return factors[0] if len(factors) == 1 else ("mul", factors)

    def factor(self):
        self.depth += 1
        if self.depth > 4 * _MAX_DEPTH:
            raise _Unsupported("too deep")
        if self.peek()[1] in ("-", "+"):
            sign = self.take()[1]
            f = self.factor()
            node = ("neg", f) if sign == "-" else f
        else:
            node = self.postfix()
            if self.peek()[1] == "^":
                self.take()
                node = ("pow", node, self.factor())   # right associative: 9^9^9 = 9^(9^9)
        self.depth -= 1
        return node

    def postfix(self):
        node = self.atom()
        while self.peek()[1] in ("!", "%", "'"):
            op = self.take()[1]
            node = ("fn", "fact", [node]) if op == "!" else ("pct", node) if op == "%" else \
                ("sym", _name(node) + "'")
        return node

    def group(self):
        """A {..} argument, or a single token (\\frac12, \\sqrt2)."""
        if self.peek()[1] == "{":
            self.take()
            node = self.expr()
            self.take("}")
            return node
        kind, val = self.take()
        if kind == "n" and len(val) > 1 and val.isdigit():   # \frac12 = \frac{1}{2}
            self.t.insert(self.i, ("n", val[1:]))
            val = val[0]
        self.i -= 1
        self.t[self.i] = (kind, val)
        return self.atom()

    def atom(self):
        kind, val = self.take()
        if kind == "n":
            if "e" in val.lower() and abs(int(re.split("[eE]", val)[1])) > 400:
                raise _Unsupported("number literal out of range")
            return ("num", Fraction(val))
        if val in ("(", "[", "{"):
            node = self.expr()
            self.take({"(": ")", "[": "]", "{": "}"}[val])
            return node
        if val == "|":
            node = self.expr()
            self.take("|")
            return ("fn", "abs", [node])
        if val in (r"\lfloor", r"\lceil"):
            node = self.expr()
            self.take(r"\rfloor" if val == r"\lfloor" else r"\rceil")
            return ("fn", val[2:], [node])
        if val == r"\frac":
            num = self.group()
            return ("div", num, self.group())
        if val == r"\binom":
            n = self.group()
            return ("fn", "binom", [n, self.group()])
        if val == r"\sqrt":
            index = ("num", Fraction(2))
            if self.peek()[1] == "[":
                self.take()
                index = self.expr()
                self.take("]")
            return ("pow", self.group(), ("div", ("num", Fraction(1)), index))
        if val in _CMD_FUNCS or (kind == "w" and val in _FUNCS) or val == r"\operatorname":
            return self.function(val.lstrip("\\"))
        if val in _CONSTS:
            return ("const", _CONSTS[val])
        if val in (r"\dot", r"\ddot", r"\hat", r"\bar", r"\vec", r"\tilde", r"\overline"):
            return self.subscript(("sym", val[1:] + "(" + _name(self.group()) + ")"))
        if kind in ("w", "c") and val not in _STOP and not val.startswith(r"\end") \
                and val not in (r"\begin", r"\emptyset"):
            return self.subscript(("sym", val.lstrip("\\")))
        raise _Unsupported(f"unexpected {val}")

    def subscript(self, node):
        if self.peek()[1] == "_":
            self.take()
            sub = self.group() if self.peek()[1] == "{" else self.atom()
            node = ("sym", node[1] + "_" + _name(sub))
        return node

    def function(self, name):
        if name == "operatorname":
            name = _name(self.group())
        base = None
        if name == "log" and self.peek()[1] == "_":
            self.take()
            base = self.group()
        power = None
        if self.peek()[1] == "^":      # \sin^2 x
            self.take()
            power = self.group()
        if self.peek()[1] in ("(", "{"):
            arg = self.atom()
        else:
            arg = self.factor()
        node = ("fn", name, [arg] if base is None else [arg, base])
        return node if power is None else ("pow", node, power)


def _name(node):
    """A stable name for a subscript or primed symbol (x_{0}, m_{max}, x')."""
    if node[0] == "sym":
        return node[1]
    if node[0] == "num":
        return str(node[1])
    if node[0] == "const":
        return node[1]
    return repr(node)


# ----------------------------------------------------- numeric evaluation

def _c(v):
    if not isinstance(v, Fraction):
        return v
    try:
        return complex(v.numerator / v.denominator)
    except OverflowError:
        raise _TooLarge("beyond float range") from None


def _pow(a, b):
    """a**b, exact when both are rational and the result is small; bounded otherwise."""
    if isinstance(a, Fraction) and isinstance(b, Fraction) and b.denominator == 1:
        bits = max(abs(a.numerator), a.denominator).bit_length() * abs(b.numerator)
        if bits <= _MAX_BITS:
            if a == 0 and b < 0:
                raise _Unsupported("0 to a negative power")
            return a ** int(b)
    a, b = _c(a), _c(b)
    if abs(b) > 1e6 or (abs(a) > 1 and abs(b) * math.log2(abs(a)) > 1e4):
        raise _TooLarge("power too large")
    if a == 0:
        if b.real <= 0:
            raise _Unsupported("0 to a non-positive power")
        return complex(0)
    return a ** b


def _real(v, what):
    v = _c(v)
    if abs(v.imag) > 1e-9 * max(1.0, abs(v)):
        raise _Unsupported(what)
    return v.real


def _fn(name, args):
    x = args[0]
    if name == "fact":
        if isinstance(x, Fraction) and x.denominator == 1 and 0 <= x <= 3000:
            return Fraction(math.factorial(int(x)))
        if _real(x, "factorial") > 170:
            raise _TooLarge("factorial")
        return complex(math.gamma(_real(x, "factorial") + 1))
    if name == "binom":
        n, k = args
        if all(isinstance(v, Fraction) and v.denominator == 1 for v in args) and 0 <= k <= n:
            if n <= 5000 or min(k, n - k) <= 100:
                return Fraction(math.comb(int(n), int(k)))
            raise _TooLarge("binomial")   # C(10^9, 5*10^8): a number of ~3*10^8 digits
        n, k = _real(n, "binom"), _real(k, "binom")
        return complex(math.gamma(n + 1) / (math.gamma(k + 1) * math.gamma(n - k + 1)))
    if name == "abs":
        return abs(x) if isinstance(x, Fraction) else complex(abs(x))
    if name in ("floor", "ceil"):
        r = _real(x, name)
        return Fraction(math.floor(r) if name == "floor" else math.ceil(r))
    if name == "log" and len(args) == 2:
        return cmath.log(_c(x)) / cmath.log(_c(args[1]))
    table = {"sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "sinh": cmath.sinh,
             "cosh": cmath.cosh, "tanh": cmath.tanh, "ln": cmath.log, "log": cmath.log,
             "exp": cmath.exp, "sqrt": cmath.sqrt, "arcsin": cmath.asin, "asin": cmath.asin,
             "arccos": cmath.acos, "acos": cmath.acos, "arctan": cmath.atan, "atan": cmath.atan,
             "sec": lambda z: 1 / cmath.cos(z), "csc": lambda z: 1 / cmath.sin(z),
             "cot": lambda z: 1 / cmath.tan(z)}
    if name not in table:
        raise _Unsupported(f"function {name}")
    if name == "exp" and abs(_c(x)) > 700:
        raise _TooLarge("exp overflow")
    return table[name](_c(x))


def _eval(node, env):
    """Value of an AST: Fraction when exact, complex otherwise. Raises _Unsupported."""
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "sym":
        return env[node[1]]
    if kind == "const":
        return {"pi": complex(math.pi), "e": complex(math.e), "i": 1j, "inf": math.inf}[node[1]]
    if kind == "pct":
        return _eval(node[1], env) * env["%"]
    if kind == "neg":
        return -_eval(node[1], env)
    if kind in ("add", "mul"):
        vals = [_eval(n, env) for n in node[1]]
        acc = vals[0]
        for v in vals[1:]:
            acc = acc + v if kind == "add" else acc * v
            if not isinstance(acc, Fraction) and isinstance(acc, complex) and cmath.isnan(acc):
                raise _Unsupported("nan")
        return acc
    if kind == "div":
        a, b = _eval(node[1], env), _eval(node[2], env)
        if b == 0:
            raise _Unsupported("division by zero")
        return a / b
    if kind == "pow":
        return _pow(_eval(node[1], env), _eval(node[2], env))
    if kind == "fn":
        return _fn(node[1], [_eval(a, env) for a in node[2]])
    raise _Unsupported(kind)


def _symbols(node, out):
    if node[0] == "sym":
        out.add(node[1])
    for child in node[1:]:
        if isinstance(child, tuple):
            _symbols(child, out)
        elif isinstance(child, list):
            for c in child:
                _symbols(c, out)
    return out


def _has_pct(node):
    return node[0] == "pct" or any(
        _has_pct(c) for c in node[1:] if isinstance(c, tuple)) or any(
        _has_pct(c) for c in node[1:] if isinstance(c, list) for c in c)


_POINTS = [(2.6180339887, 0.173), (1.3247179572, 0.291), (3.2360679775, 0.137)]


def _env(names, base, step):
    """Sample values of the variables at one point. Variable k gets base**(1 + k/7) +
    step*k: not affine in k, so no linear relation between variables (x - y = (x - z)/2)
    holds at every point by accident."""
    return {n: complex(base ** (1 + (k % 9) / 7) + step * k, 0) for k, n in enumerate(names)}


def _decimal_places(gold):
    """Gold written as a decimal with >= 2 significant digits: (places, exponent) else None."""
    m = re.fullmatch(r"-?(\d*)\.(\d+)(?:[eE]([+-]?\d+))?", gold.strip())
    if not m or len((m.group(1) + m.group(2)).lstrip("0")) < 2:
        return None
    return len(m.group(2)), int(m.group(3) or 0)


def _close(a, b, gold_text="", exact=False):
    """Equality of two values. exact (no decimal written on either side): rationals must
    be equal, other values agree to 1e-9 relative (float rounding). Otherwise relative
    tolerance REL_TOL; and when the gold is written as a decimal with >= 2 significant
    digits, a prediction that rounds to it at the gold's precision also counts
    (0.333 for 0.33, 4.48e33 for 4.5e33)."""
    if isinstance(a, Fraction) and isinstance(b, Fraction) and (exact or a == b):
        return a == b
    a, b = _c(a), _c(b)
    if not (cmath.isfinite(a) and cmath.isfinite(b)):
        return a == b
    if abs(a - b) <= (1e-9 if exact else REL_TOL) * max(abs(a), abs(b)):
        return True
    if exact:
        return False
    places = _decimal_places(gold_text)
    if places and abs(a.imag) < 1e-12 and abs(b.imag) < 1e-12:
        digits, exp = places
        scale = 10.0 ** exp
        return round(a.real / scale, digits) == round(b.real / scale, digits)
    return False


def _value_equal(pa, pg, gold_text, exact):
    """Compare two ASTs by exact/numeric evaluation at fixed random points."""
    names = sorted(_symbols(pa, set()) | _symbols(pg, set()))
    pct_a, pct_g = _has_pct(pa), _has_pct(pg)
    for scale_a in ((Fraction(1, 100), Fraction(1)) if pct_a else (Fraction(1),)):
        for scale_g in ((Fraction(1, 100), Fraction(1)) if pct_g else (Fraction(1),)):
            points = _POINTS if names else _POINTS[:1]
            ok = True
            for base, step in points:
                env = _env(names, base, step)
                env["%"] = scale_a
                va = _eval(pa, env)
                env["%"] = scale_g
                if not _close(va, _eval(pg, env), gold_text if not names else "", exact):
                    ok = False
                    break
            if ok:
                return True
    return False


# ------------------------------------------------------------- sympy path

def _sympy(node):
    """Build a sympy expression from an AST node by node (never from text)."""
    kind = node[0]
    if kind == "num":
        return sympy.Rational(node[1].numerator, node[1].denominator)
    if kind == "sym":
        return sympy.Symbol(node[1])
    if kind == "const":
        return {"pi": sympy.pi, "e": sympy.E, "i": sympy.I, "inf": sympy.oo}[node[1]]
    if kind == "pct":
        return _sympy(node[1]) / 100
    if kind == "neg":
        return -_sympy(node[1])
    if kind == "add":
        return sympy.Add(*[_sympy(n) for n in node[1]])
    if kind == "mul":
        return sympy.Mul(*[_sympy(n) for n in node[1]])
    if kind == "div":
        return _sympy(node[1]) / _sympy(node[2])
    if kind == "pow":
        base, exp = _sympy(node[1]), _sympy(node[2])
        if exp.is_Number and abs(exp) > 10_000:
            return sympy.Pow(base, exp, evaluate=False)
        return sympy.Pow(base, exp)
    if kind == "fn":
        args = [_sympy(a) for a in node[2]]
        table = {"fact": sympy.factorial, "binom": sympy.binomial, "abs": sympy.Abs,
                 "floor": sympy.floor, "ceil": sympy.ceiling, "sin": sympy.sin, "cos": sympy.cos,
                 "tan": sympy.tan, "sec": sympy.sec, "csc": sympy.csc, "cot": sympy.cot,
                 "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh, "ln": sympy.log,
                 "log": sympy.log, "exp": sympy.exp, "sqrt": sympy.sqrt, "arcsin": sympy.asin,
                 "arccos": sympy.acos, "arctan": sympy.atan, "asin": sympy.asin,
                 "acos": sympy.acos, "atan": sympy.atan}
        if node[1] not in table:
            return sympy.Function(node[1])(*args)
        return table[node[1]](*args)
    raise _Unsupported(kind)


def _sympy_equal(pa, pg, exact):
    """Symbolic equality: simplify(a - g) == 0, or for constants a numeric check in
    sympy's arbitrary-exponent floats (same tolerance as _close)."""
    a, g = _sympy(pa), _sympy(pg)
    if a == g or sympy.simplify(a - g) == 0:
        return True
    if not (a.is_number and g.is_number) or a.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo) \
            or g.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
        return False
    diff, scale = abs(sympy.N(a - g, 30)), sympy.Max(abs(sympy.N(a, 30)), abs(sympy.N(g, 30)))
    try:
        return bool(diff <= (1e-9 if exact else REL_TOL) * scale)
    except TypeError:   # undecidable comparison (nan, zoo)
        return False


# ---------------------------------------------------------- structure

_OPEN, _CLOSE = "([{", ")]}"


def _split_top(s, seps=(",",)):
    """Split s at separators outside any bracket (bracket kinds may mismatch: (1,2])."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        elif depth == 0:
            for sep in seps:
                if s.startswith(sep, i):
                    parts.append(s[start:i])
                    start = i + len(sep)
                    i = start - 1
                    break
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _wrapped(s):
    """(open, close, inner) when s is one bracketed group like (a,b] or \\{a,b\\}."""
    if s.startswith(r"\{") and s.endswith(r"\}"):
        inner = s[2:-2]
        return ("{", "}", inner) if _balanced(inner) else None
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _balanced(s[1:-1]):
        return s[0], s[-1], s[1:-1]
    return None


def _balanced(s):
    depth = 0
    for c in s:
        depth += (c in _OPEN) - (c in _CLOSE)
        if depth < 0:
            return False
    return depth == 0


def _structure(s):
    """('union', parts) | ('set', items) | ('tuple', items, open, close) | ('list', items)
    | ('leaf', text)."""
    parts = _split_top(s, (r"\cup",))
    if len(parts) > 1:
        return ("union", parts)
    if s in (r"\emptyset", r"\{\}"):
        return ("set", [])
    w = _wrapped(s)
    if w:
        items = [x.rstrip(".") for x in _split_top(w[2].strip().rstrip(".,")) if x]
        if w[0] == "{":
            return ("set", [x for x in items if x])
        if len(items) > 1:
            return ("tuple", items, w[0], w[1])
        if (w[0], w[1]) == ("(", ")") and items:
            return _structure(items[0])   # redundant parentheses
    items = [x.rstrip(".") for x in _split_top(s) if x]
    if len(items) > 1:
        return ("list", items)
    if s.count(r"\pm") == 1:   # 1 \pm \sqrt{2}: two answers
        return ("list", [s.replace(r"\pm", "+"), s.replace(r"\pm", "-")])
    return ("leaf", s)


def _set_equal(xs, ys, eq):
    """Order-free matching of two answer lists under eq; a repeated item counts once
    (answers are sets of solutions). Greedy: answer lists are short."""
    xs, ys = [list({re.sub(r"\s", "", v): v for v in vs}.values()) for vs in (xs, ys)]
    if len(xs) != len(ys):
        return False
    left = list(ys)
    for x in xs:
        for j, y in enumerate(left):
            if eq(x, y):
                del left[j]
                break
        else:
            return False
    return True


def _equal(pred, gold, use_sympy):
    """Structured comparison of two normalized answers. True/False, or raises _Unsupported."""
    if pred == gold:
        return True
    for x, y in ((pred, gold), (gold, pred)):   # decimal comma: 1,22 for 1.22
        if re.fullmatch(r"-?\d+,\d+", x) and re.fullmatch(r"-?\d*\.\d+", y):
            return _leaf_equal(x.replace(",", "."), y, use_sympy)
    sp, sg = _structure(pred), _structure(gold)
    pred, gold = (sp[1] if sp[0] == "leaf" else pred), (sg[1] if sg[0] == "leaf" else gold)
    eq = lambda a, b: _equal(a, b, use_sympy)
    kinds = {sp[0], sg[0]}
    if kinds & {"union", "set", "list"}:
        if kinds == {"tuple", "list"}:   # (8, 4) for "8, 4": same order
            return len(sp[1]) == len(sg[1]) and all(map(eq, sp[1], sg[1]))
        if kinds <= {"set", "list"} or kinds == {"union"}:
            return _set_equal(sp[1], sg[1], eq)
        if "union" in kinds:   # an interval or x > 3 is not a union
            return False
        return _set_equal([pred] if sp[0] == "leaf" else sp[1], [gold] if sg[0] == "leaf" else sg[1], eq)
    if "tuple" in kinds:
        if sp[0] == "leaf":
            sp = _interval(pred) or sp
        if sg[0] == "leaf":
            sg = _interval(gold) or sg
        if "leaf" in (sp[0], sg[0]):   # (p, q) = (3, 2) against a tuple
            return _leaf_equal(pred, gold, use_sympy)
        if sp[0] != "tuple" or sg[0] != "tuple" or len(sp[1]) != len(sg[1]):
            return False
        if len(sp[1]) == 2 and (sp[2], sp[3]) != (sg[2], sg[3]):
            return False   # interval ends: (1,2] is not [1,2]
        return all(map(eq, sp[1], sg[1]))
    return _leaf_equal(pred, gold, use_sympy)


_VAR = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?(?:\([A-Za-z]\))?|\\[A-Za-z]+")


def _interval(s):
    """An inequality in one variable as an interval tuple: x > 3 -> (3, ∞), 0 < f(x) < 1."""
    parts = re.split(r"(<=|>=|<|>)", s)
    if len(parts) == 3 and _VAR.fullmatch(parts[0].strip()):
        op, val = parts[1], parts[2].strip()
        return ("tuple", [val, "∞"], "[" if op == ">=" else "(", ")") if ">" in op else \
            ("tuple", ["-∞", val], "(", "]" if op == "<=" else ")")
    if len(parts) == 5 and _VAR.fullmatch(parts[2].strip()) and "<" in parts[1] + parts[3]:
        return ("tuple", [parts[0].strip(), parts[4].strip()], "[" if parts[1] == "<=" else "(",
                "]" if parts[3] == "<=" else ")")
    return None


_RELATION = re.compile(r"(<=|>=|!=|<|>|=|≈)")


def _is_name(lhs):
    """A left-hand side that names the answer: x, f(x), (p, q), AB, |AB|, V_1:V_2,
    \\frac{NO}{BO}, m+n; digits only in subscripts."""
    bare = re.sub(r"_\{[^{}]*\}|_\w", "", lhs)
    return len(lhs) <= 40 and re.search(r"[A-Za-z]", bare) is not None and re.search(r"\d", bare) is None


def _relation(s):
    """s split at relation signs, [side, op, side, ...]: an `≈ 0.33` tail after an `=`
    is dropped (x = 1/3 ≈ 0.33) and a lone ≈ reads as = (x ≈ 11)."""
    parts = [p.strip() for p in _RELATION.split(s)]
    if "≈" in parts:
        k = parts.index("≈")
        parts = parts[:k] if "=" in parts[:k] else ["=" if p == "≈" else p for p in parts]
    return parts


def _stated_value(parts):
    """The value an equation states: the right side of `name = value` (x, f(x), (p,q),
    AB) or the last side of a chain `x = 5+5+1 = 11`; None for inequalities and for
    equations like `2x = 6` that do not name a value."""
    if set(parts[1::2]) != {"="} or (len(parts) == 3 and not _is_name(parts[0])):
        return None
    return parts[-1]


def _leaf_equal(pred, gold, use_sympy):
    """Compare single answers: relations (x = 5 against 5), then math values or text."""
    pp, pg = _relation(pred), _relation(gold)
    if len(pp) == 1 and len(pg) == 1:
        return _expr_equal(pred, gold, use_sympy)
    if len(pp) > 1 and len(pg) > 1:   # a = b = c: first and last sides
        return _relation_equal(*[[r[0], "=", r[-1]] if set(r[1::2]) == {"="} else r for r in (pp, pg)],
                               use_sympy)
    value = _stated_value(pp if len(pp) > 1 else pg)   # x = 5 against 5
    if value is None:
        return False
    return _equal(value, gold, use_sympy) if len(pp) > 1 else _equal(pred, value, use_sympy)


def _relation_equal(pp, pg, use_sympy):
    """Two relations a op b: same operator (or mirrored) and equal sides, or the same
    relation rearranged: (a - b) = k (c - d) for a constant k, of the sign the two
    operators need (x < 1 and -x > -1; y = 2x + 3 and 2x - y + 3 = 0)."""
    if len(pp) != 3 or len(pg) != 3:
        return len(pp) == len(pg) and all(
            (a == b) if i % 2 else _expr_equal(a, b, use_sympy) for i, (a, b) in enumerate(zip(pp, pg)))
    flip = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "=": "=", "!=": "!="}
    (a, op, b), (c, op2, d) = pp, pg
    if op == op2 and _expr_equal(a, c, use_sympy) and _expr_equal(b, d, use_sympy):
        return True
    if flip[op] == op2 and _expr_equal(a, d, use_sympy) and _expr_equal(b, c, use_sympy):
        return True
    if op2 not in (op, flip[op]):
        return False
    k = _constant_ratio(f"({a})-({b})", f"({c})-({d})")
    if k is None or k == 0:
        return False
    return op in ("=", "!=") or (k > 0) == (op == op2)


def _constant_ratio(p, q):
    """p / q when it is the same real constant at every sample point (p, q contain a
    variable), else None."""
    try:
        ratio = ("div", _Parser(p).parse(), _Parser(q).parse())
        names = sorted(_symbols(ratio, set()))
        vals = [_c(_eval(ratio, {**_env(names, b0, s), "%": 1})) for b0, s in _POINTS]
    except (_Unsupported, _TooLarge, ZeroDivisionError, OverflowError, ValueError, KeyError):
        return None
    if not names or abs(vals[0].imag) > 1e-9 * abs(vals[0]) or \
            not all(_close(v, vals[0], exact=True) for v in vals):
        return None
    return vals[0].real


def _text_key(s):
    s = re.sub(r"[\s{}]|\\text|\\mathrm", "", s).lower()
    return re.sub(r"^\(([a-e])\)$", r"\1", s)   # multiple choice: (C) = C


_BASE = re.compile(r"(\d[0-9A-Za-z]*)_(\d{1,2})")


def _expr_equal(pred, gold, use_sympy):
    if pred == gold or _text_key(pred) == _text_key(gold):
        return True
    bp, bg = _BASE.fullmatch(pred), _BASE.fullmatch(gold)
    if bp or bg:   # numbers in base n: same digits, and same base when both give one
        return (bp.group(1) if bp else pred).lower() == (bg.group(1) if bg else gold).lower() \
            and (not (bp and bg) or bp.group(2) == bg.group(2))
    try:
        pa, pg = _Parser(pred).parse(), _Parser(gold).parse()
    except _Unsupported:
        return False   # not math we can read, and the texts differ
    exact = not re.search(r"\d\.|\.\d|\d[eE]", pred + " " + gold)
    try:
        return _value_equal(pa, pg, gold, exact)
    except _TooLarge:
        return False
    except (_Unsupported, ZeroDivisionError, OverflowError, ValueError, KeyError):
        if not use_sympy:
            raise _Unsupported("needs sympy")
        return _sympy_equal(pa, pg, exact)


# ------------------------------------------------------------ worker process

def _worker_main(conn):
    """Worker loop: receive (pred, gold), send back ('ok', bool) or ('error', False)."""
    while True:
        try:
            pred, gold = conn.recv()
        except (EOFError, OSError):
            return
        try:
            result = ("ok", bool(_equal(pred, gold, True)))
        except Exception:
            result = ("error", False)
        conn.send(result)


class _SympyWorker:
    """One forked process doing the sympy work; killed, reaped and replaced on timeout.
    fork (as PyTorch's DataLoader uses) works for code run as __main__ and from any thread."""

    def __init__(self):
        self.lock, self.proc, self.conn = threading.Lock(), None, None

    def _start(self):
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def _stop(self):
        self.proc.kill()
        self.proc.join()
        self.conn.close()
        self.proc = self.conn = None

    def call(self, pred, gold, timeout):
        deadline = time.monotonic() + timeout
        if not self.lock.acquire(timeout=timeout):
            return False, "timeout"
        try:
            if self.proc is None or not self.proc.is_alive():
                if self.proc is not None:
                    self._stop()
                self._start()
            self.conn.send((pred, gold))
            if self.conn.poll(max(0.0, deadline - time.monotonic())):
                status, value = self.conn.recv()
                return value, status
            self._stop()
            return False, "timeout"
        except (OSError, EOFError):
            if self.proc is not None:
                self._stop()
            return False, "error"
        finally:
            self.lock.release()


_WORKER = _SympyWorker()


# ---------------------------------------------------------------- public API

def _is_prose(s):
    """Words outside the math of s, as in a whole completion ("Therefore $x = 3$.")."""
    if not re.search(r"[A-Za-z]{3}", s):
        return False
    bare = re.sub(r"\\[A-Za-z]+(?:\{[^{}]*\})?", " ", _MATH_SPAN.sub(" ", s[-5000:]))
    return re.search(r"[A-Za-z]{3,}", bare) is not None


def _check_pair(pred, gold, timeout):
    """check_answer for one (pred, gold) text pair."""
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False, "ok"
    p, g = _normalize(pred), _normalize(gold)
    if not p:
        return False, "ok"
    try:
        return bool(_equal(p, g, False)), "ok"
    except _Unsupported:
        return _WORKER.call(p, g, timeout)


def check_answer(pred, gold, timeout=1.0):
    """Grade one answer: (is_equal, status) with status "ok" | "timeout" | "error".

    pred: extracted model answer (None = no answer, graded False); gold: gold answer.
    Both are LaTeX or plain text; $, \\left/\\right, spacing, \\text units, degrees,
    thousands separators, `x =` prefixes are ignored. A text with prose around its
    math (a whole completion or solution) is also tried through extract_answer.
    Numbers are equal when exact rationals agree or within relative tolerance REL_TOL
    (1e-6); a gold written as a decimal with >= 2 significant digits also accepts
    predictions that round to it. Percent: 10% equals both 10 and 0.1. Tuples,
    intervals (ends matter) and matrices are ordered; sets, comma lists and unions
    are order-free, a repeated item counting once. Expressions with variables are
    compared at fixed random points, then with sympy in a worker process. Never
    raises; returns within about `timeout` seconds (False, "timeout"). Answers over
    MAX_ANSWER_CHARS characters are compared as exact strings only.
    """
    if pred is None or gold is None:
        return False, "ok"
    try:
        deadline = time.monotonic() + timeout
        pred, gold = str(pred).strip(), str(gold).strip()
        if pred == gold:
            return True, "ok"
        pairs = [tuple((extract_answer(x) or x) if _is_prose(x) else x for x in (pred, gold))]
        if pairs[0] != (pred, gold):
            pairs.append((pred, gold))   # a prose-like answer ("f(x) = x$, where ...") as written
        status = "ok"
        for p, g in pairs:
            ok, st = _check_pair(p, g, max(0.05, deadline - time.monotonic()))
            if ok:
                return True, "ok"
            status = st if st != "ok" else status
        return False, status
    except Exception:
        return False, "error"


def math_equal(pred, gold, timeout=1.0):
    """True when pred and gold are the same mathematical answer (see check_answer)."""
    return check_answer(pred, gold, timeout)[0]


# ---- end of reward checking


def score_completions(texts, golds, template, format_bonus, timeout):
    """Rewards of P*G completions against their golds (one gold per completion).

    Returns (rewards (N,) float32 tensor, correct (N,) bool tensor, info dict with format_ok,
    no_answer counts and grader timeouts/errors). r = 1[correct] + format_bonus * 1[well formed].
    """
    correct, format_ok, statuses, answers = [], [], [], []
    for text, gold in zip(texts, golds):
        pred = extract_answer(text, last_math_fallback=False)  # a bare $x$ in a cut-off completion is no answer
        ok, status = check_answer(pred, gold, timeout)
        well_formed = pred is not None and bool(  # the format the template asks for, not any parsable answer
            re.search(r"</think>\s*<answer>.*</answer>", text, re.S) if template == "r1" else re.search(r"\\(boxed|fbox)", text))
        correct.append(ok), format_ok.append(well_formed), statuses.append(status), answers.append(pred)
    correct = torch.tensor(correct, dtype=torch.bool)
    format_ok = torch.tensor(format_ok, dtype=torch.bool)
    rewards = correct.float() + format_bonus * format_ok.float()
    info = {"format_rate": format_ok.float().mean().item(),
            "no_answer_rate": sum(a is None for a in answers) / len(answers),
            "grader_timeouts": statuses.count("timeout"), "grader_errors": statuses.count("error")}
    return rewards, correct, info


# -----------------------------------------------------------------------------
# Model loading and sampling

def load_policy(model_path, device, dtype=torch.float32):
    """Load (model, tokenizer) from an HF folder, a hub id or a .gguf file.

    A .gguf file is de-quantized by transformers and copied into a plain model built from its
    config, so save_pretrained writes an ordinary checkpoint. The tokenizer pads on the left
    (generation) and gets a pad token (EOS when it has none). Dropout is switched off: it would
    make the log-prob passes disagree with each other (trap 4, TRL #3500).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, gguf = (os.path.dirname(os.path.abspath(model_path)), os.path.basename(model_path)) \
        if model_path.endswith(".gguf") else (model_path, None)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype)
    if gguf:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
        plain.load_state_dict(model.state_dict())
        plain.generation_config = model.generation_config
        model = plain
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for module in model.modules():  # attention layers copy attention_dropout from the config when built
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout"):
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)
    return model.to(device), tokenizer


def eos_ids(model, tokenizer):
    """All token ids that end a completion (generation_config may list several, e.g. Qwen)."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


@torch.no_grad()
def sample(model, tokenizer, prompts, num_samples, max_new_tokens, temperature, top_p=1.0, batch_size=64, stop=()):
    """Generate num_samples completions per prompt with transformers' generate.

    Returns a dict, prompt-major (completion k of prompt i is row i * num_samples + k):
      prompt_ids      list of P token-id lists
      completion_ids  list of P*n token-id lists, the terminating EOS included when generated
      texts           decoded completions (special tokens skipped)
      truncated       P*n bools: stopped by the max_new_tokens budget, not by EOS or a stop string
    The completion length comes from the first EOS (or stop string) in the generated tokens,
    never from comparing to the pad id: with pad == eos that would drop the EOS from the loss
    (trap 2). temperature 0 means greedy decoding. Prompts are batched sorted by length, in whole
    groups of at most batch_size sequences.
    """
    from transformers import GenerationConfig
    model.eval()
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompt_ids[i]))  # longest first: less padding
    stops = set(eos_ids(model, tokenizer))
    gen_config = GenerationConfig(  # explicit: a model's own defaults (top_k, repetition_penalty) would change pi_old
        do_sample=temperature > 0, temperature=temperature if temperature > 0 else None, top_p=top_p if temperature > 0 else None,
        top_k=0 if temperature > 0 else None, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sorted(stops), stop_strings=list(stop) or None)
    completions, truncated = [None] * (len(prompts) * num_samples), [None] * (len(prompts) * num_samples)
    per_chunk = max(1, batch_size // num_samples)  # whole groups per generate call
    for start in range(0, len(order), per_chunk):
        chunk = order[start:start + per_chunk]
        with autocast(next(model.parameters()).device):
            out, prompt_len = generate_group(model, tokenizer, [prompt_ids[i] for i in chunk], num_samples, gen_config, stop)
        for j, tokens in enumerate(out[:, prompt_len:].tolist()):
            r = chunk[j // num_samples] * num_samples + j % num_samples
            n = completion_length(tokens, stops, tokenizer, stop)
            completions[r], truncated[r] = tokens[:n], not ended(tokens[:n], stops, tokenizer, stop)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return {"prompt_ids": prompt_ids, "completion_ids": completions, "texts": texts, "truncated": truncated}


def generate_group(model, tokenizer, prompt_ids, num_samples, gen_config, stop):
    """generate num_samples continuations of each prompt; the prompts are pre-filled only once.

    generate would run the prompt of every one of the P*n rows; here each distinct prompt fills
    a KV cache once (all but its last token), the cache is repeated n times, and generate goes
    on from it. Returns (token ids (P*n, Lp + new) on the model's device, Lp), prompt-major.
    """
    from transformers import DynamicCache
    device = next(model.parameters()).device
    batch = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt").to(device)  # left-padded
    ids, mask = batch["input_ids"], batch["attention_mask"]
    cache = DynamicCache(config=model.config)
    if ids.shape[1] > 1:
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(num_samples)
    out = model.generate(input_ids=ids.repeat_interleave(num_samples, 0), attention_mask=mask.repeat_interleave(num_samples, 0),
                         past_key_values=cache, generation_config=gen_config, tokenizer=tokenizer if stop else None)
    return out, ids.shape[1]


def completion_length(tokens, stops, tokenizer, stop):
    """Tokens up to and including the first EOS, or to the end of an earlier stop string.

    The stop string is searched only before the first EOS: generate pads a row that stopped on a
    string with pad tokens, and pad may equal EOS, a token that was never sampled.
    """
    n = next((t + 1 for t, tok in enumerate(tokens) if tok in stops), len(tokens))
    if stop and any(s in tokenizer.decode(tokens[:n]) for s in stop):
        lo, hi = 1, n  # smallest prefix whose text holds a stop string (monotone in length)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if any(s in tokenizer.decode(tokens[:mid]) for s in stop) else (mid + 1, hi)
        return lo
    return n


def ended(tokens, stops, tokenizer, stop):
    """Whether a completion ends with EOS or a stop string (i.e. was not cut by the budget)."""
    return bool(tokens) and (tokens[-1] in stops or any(tokenizer.decode(tokens).endswith(s) for s in stop))


def autocast(device):
    """bf16 autocast on CUDA (fp32 master weights stay fp32, trap 10); nothing on CPU."""
    device = torch.device(device)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


# -----------------------------------------------------------------------------
# Advantages (SPEC section 2)

def compute_advantages(rewards, cfg):
    """Per-completion advantages from rewards of shape (P, G), float32.

    Returns (advantages (P, G), keep (P, G) bool). Groups are rows, so every group statistic is
    over its own G completions (trap 9). Estimators (cfg.advantage):
      group          r_i - mean_g r                         (Dr. GRPO; GRPO with std_norm=group)
      leave-one-out  r_i - mean_{j!=i} r_j = G/(G-1) (r_i - mean_g r)       (RLOO)
      raw            r_i                                                    (REINFORCE)
      best           1 for the first highest-reward completion of a group with reward > 0, else 0,
                     and only that one is kept                              (RAFT top-1)
    then std_norm: divide by (std + 1e-6) of the group (DeepSeekMath eq. 3) or of the whole batch
    (centred on the batch mean first, REINFORCE++); std is Bessel-corrected (torch.std).
    positive_only clamps at 0 (GRPO-pos). keep drops all-equal groups when drop_equal_groups.
    """
    P, G = rewards.shape
    keep = torch.ones(P, G, dtype=torch.bool)
    if cfg.advantage == "best":
        best = rewards.argmax(dim=1, keepdim=True)  # (P, 1)
        keep = torch.zeros(P, G, dtype=torch.bool).scatter_(1, best, True) & (rewards > 0)
        return keep.float(), keep
    mean = rewards.mean(dim=1, keepdim=True)  # (P, 1)
    adv = {"group": rewards - mean, "leave-one-out": (rewards - mean) * G / max(G - 1, 1), "raw": rewards}[cfg.advantage]
    if cfg.std_norm == "group":
        adv = adv / (rewards.std(dim=1, keepdim=True) + STD_EPS)
    elif cfg.std_norm == "batch":
        adv = (adv - adv.mean()) / (adv.std() + STD_EPS)
    if cfg.positive_only:
        adv = adv.clamp(min=0)
    if cfg.drop_equal_groups:
        keep &= (rewards != rewards[:, :1]).any(dim=1, keepdim=True)
    return adv, keep


# -----------------------------------------------------------------------------
# Log-probabilities of the sampled tokens

def collate(prompt_ids, completion_ids, device):
    """Pad one micro-batch: prompts on the left, completions on the right.

    Returns prompt (m, Lp) and prompt_mask, completion (m, Tc) and completion_mask (m, Tc),
    all long/bool tensors on device. completion_mask is 1 on the |o_i| completion tokens.
    """
    Lp, Tc = max(map(len, prompt_ids)), max(map(len, completion_ids))
    prompt = torch.zeros(len(prompt_ids), Lp, dtype=torch.long)
    prompt_mask = torch.zeros(len(prompt_ids), Lp, dtype=torch.bool)
    completion = torch.zeros(len(completion_ids), Tc, dtype=torch.long)
    completion_mask = torch.zeros(len(completion_ids), Tc, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        prompt[i, Lp - len(p):], prompt_mask[i, Lp - len(p):] = torch.tensor(p), True
        completion[i, :len(c)], completion_mask[i, :len(c)] = torch.tensor(c), True
    return [t.to(device) for t in (prompt, prompt_mask, completion, completion_mask)]


def completion_logprobs(model, prompt_ids, completion_ids, temperature, share_prompt=False, with_entropy=False):
    """log pi(o_t | q, o_<t) of each sampled completion token, from logits / temperature.

    prompt_ids, completion_ids: lists of m token-id lists (a prompt may repeat across its group).
    Returns logp (m, Tc) float32 (0 on padding) and, if with_entropy, the per-token entropy
    (m, Tc) float32 without grad. Only completion positions get logits (trap 6), and they are
    divided by the sampling temperature (trap 3). With share_prompt each distinct prompt is run
    once and its KV cache indexed out to its completions; gradients flow through the cache, so
    loss and gradients equal the plain path's.
    """
    device = next(model.parameters()).device
    prompt, prompt_mask, completion, completion_mask = collate(prompt_ids, completion_ids, device)
    Tc = completion.shape[1]
    with autocast(device):
        if share_prompt:
            logits = shared_prompt_logits(model, prompt_ids, prompt, prompt_mask, completion, completion_mask)
        else:
            ids, mask = torch.cat([prompt, completion], 1), torch.cat([prompt_mask, completion_mask], 1)
            positions = (mask.long().cumsum(1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=Tc + 1).logits[:, :-1]
    logits = logits.float() / temperature  # (m, Tc, V) fp32
    logz = logits.logsumexp(-1)  # (m, Tc)
    logp = (logits.gather(-1, completion.unsqueeze(-1)).squeeze(-1) - logz) * completion_mask
    if not with_entropy:
        return logp
    with torch.no_grad():
        entropy = (logz - (logits.softmax(-1) * logits).sum(-1)) * completion_mask
    return logp, entropy


def shared_prompt_logits(model, prompt_ids, prompt, prompt_mask, completion, completion_mask):
    """Logits (m, Tc, V) for the completions, running each distinct prompt's forward only once."""
    from transformers import DynamicCache
    keys = [tuple(p) for p in prompt_ids]
    first = {k: i for i, k in reversed(list(enumerate(keys)))}  # first row of each distinct prompt
    unique = sorted(set(first.values()))
    index = torch.tensor([unique.index(first[k]) for k in keys], device=prompt.device)  # (m,)
    u_mask = prompt_mask[unique]
    u_positions = (u_mask.long().cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompt[unique], attention_mask=u_mask, position_ids=u_positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.batch_select_indices(index)  # (u, ...) -> (m, ...), differentiable indexing
    mask = torch.cat([prompt_mask, completion_mask], 1)
    positions = u_mask.sum(1, keepdim=True)[index] + torch.arange(completion.shape[1], device=prompt.device)
    rest = model(input_ids=completion, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True).logits
    return torch.cat([out.logits[index], rest[:, :-1]], 1)


# -----------------------------------------------------------------------------
# The loss: every variant in one place

def token_loss(logp, old_logp, ref_logp, advantages, cfg):
    """Per-token loss l_{i,t} (m, T) float32 and per-token statistics, before aggregation.

    logp (m, T) with grad; old_logp (m, T) = log pi_old, no grad (logp.detach() when mu = 1);
    ref_logp (m, T) = log pi_ref or None when kl_coef = 0; advantages (m,).
      pg    -A log pi                                  REINFORCE / RGRA
      clip  -min(s A, clip(s, 1-eps_low, 1+eps_high) A),  s = exp(logp - old_logp)   PPO / GRPO eq. 3
      nll   -log pi                                    RAFT (kept samples only)
    plus kl_coef * KL_t with KL_t = k1 d | k2 d^2/2 | k3 exp(-d)-1+d,  d = logp - ref_logp
    (DeepSeekMath eq. 4 for k3), d clamped to +-20 in fp32 before exp.
    """
    A = advantages.unsqueeze(1)  # (m, 1), broadcast over tokens
    ratio = torch.exp(logp - old_logp)
    if cfg.surrogate == "pg":
        loss = -A * logp
    elif cfg.surrogate == "clip":
        loss = -torch.min(ratio * A, ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * A)
    elif cfg.surrogate == "nll":
        loss = -logp
    else:
        raise ValueError(f"unknown surrogate {cfg.surrogate!r}")
    stats = {"pg_loss": loss.detach(),
             "clip_frac": (((ratio < 1 - cfg.eps_low) & (A < 0)) | ((ratio > 1 + cfg.eps_high) & (A > 0))).float()}
    if cfg.kl_coef > 0:
        d = (logp - ref_logp).clamp(-KL_CLAMP, KL_CLAMP)
        kl = {"k1": d, "k2": d.square() / 2, "k3": torch.exp(-d) - 1 + d}[cfg.kl_estimator]
        loss = loss + cfg.kl_coef * kl
        stats["kl"] = kl.detach()
    return loss, stats


def sequence_weights(lengths, loss_agg, max_new_tokens):
    """Weight w_i of each token of sequence i so that sum_{i,t} w_i l_it is the step's loss.

    lengths: (B,) completion lengths |o_i| of *all* sequences of one optimizer step. Computed
    once per optimizer step, before the micro-batch loop, so that 1 or k micro-batches give the
    same gradient (trap 1). Returns (B,) float32. SPEC section 4.
    """
    B, lengths = len(lengths), lengths.float()
    if loss_agg == "seq-mean-token-mean":
        return 1.0 / (lengths * B)
    if loss_agg == "token-mean":
        return torch.full_like(lengths, 1.0 / lengths.sum())
    if loss_agg == "seq-mean-token-sum-norm":
        return torch.full_like(lengths, 1.0 / (max_new_tokens * B))
    if loss_agg == "seq-mean-token-sum":
        return torch.full_like(lengths, 1.0 / B)
    raise ValueError(f"unknown loss aggregation {loss_agg!r}")


def accumulate_gradients(model, batch, idx, cfg):
    """Forward/backward the sequences idx of a rollout batch in micro-batches; adds into .grad.

    batch: dict with prompt_ids (per sequence), completion_ids, advantages (N,), old_logp and
    ref_logp (lists of (|o_i|,) tensors or None). Returns summed statistics of the step.
    """
    lengths = torch.tensor([len(batch["completion_ids"][i]) for i in idx])
    weights = sequence_weights(lengths, cfg.loss_agg, cfg.max_new_tokens)  # (B,) whole optimizer step
    # length-sorted micro-batches pad less; with a shared prompt, keep each group together so that
    # its prompt runs once per micro-batch rather than once per completion
    prompt_len = [len(batch["prompt_ids"][i]) for i in idx]
    key = (lambda j: (-prompt_len[j], batch["prompt_ids"][idx[j]], -lengths[j])) if cfg.share_prompt else \
          (lambda j: -(prompt_len[j] + lengths[j]))
    order = sorted(range(len(idx)), key=key)
    totals = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_frac": 0.0, "time_forward": 0.0, "time_backward": 0.0}
    for start in range(0, len(order), cfg.micro_batch_size):
        t0 = time.time()
        js = order[start:start + cfg.micro_batch_size]
        seqs = [idx[j] for j in js]
        logp, entropy = completion_logprobs(model, [batch["prompt_ids"][i] for i in seqs],
                                            [batch["completion_ids"][i] for i in seqs],
                                            cfg.temperature, cfg.share_prompt, with_entropy=True)
        mask = (torch.arange(logp.shape[1], device=logp.device) < lengths[js].to(logp.device).unsqueeze(1)).float()
        old = pad_rows([batch["old_logp"][i] for i in seqs], logp) if batch["old_logp"] else logp.detach()
        ref = pad_rows([batch["ref_logp"][i] for i in seqs], logp) if batch["ref_logp"] else None
        loss_tok, stats = token_loss(logp, old, ref, batch["advantages"][seqs].to(logp.device), cfg)
        w = weights[js].to(logp.device).unsqueeze(1) * mask  # (m, T)
        loss = (loss_tok * w).sum()
        t1 = time.time()
        loss.backward()
        totals["time_forward"] += t1 - t0
        totals["time_backward"] += time.time() - t1
        totals["loss"] += loss.item()
        totals["entropy"] += (entropy * w).sum().item()
        for key in ("pg_loss", "kl", "clip_frac"):
            if key in stats:
                totals[key] += (stats[key] * w).sum().item()
    return totals


def pad_rows(rows, like):
    """Stack 1-D tensors of uneven length into a zero-padded tensor shaped like `like` (m, T)."""
    out = torch.zeros_like(like, dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r.to(out.device)
    return out


@torch.no_grad()
def frozen_logprobs(model, batch, idx, cfg):
    """log-probs of the sampled tokens under a frozen model (pi_old or pi_ref): list of (|o_i|,)."""
    out = [None] * len(batch["completion_ids"])
    for start in range(0, len(idx), cfg.micro_batch_size):
        seqs = idx[start:start + cfg.micro_batch_size]
        logp = completion_logprobs(model, [batch["prompt_ids"][i] for i in seqs],
                                   [batch["completion_ids"][i] for i in seqs], cfg.temperature, cfg.share_prompt)
        for i, row in zip(seqs, logp):
            out[i] = row[:len(batch["completion_ids"][i])].cpu()
    return out


def train_on_rollout(model, ref_model, optimizer, scheduler, batch, keep_idx, cfg, generator):
    """mu = ppo_epochs * mini_batches optimizer steps on one rollout batch.

    Old log-probs are computed only when mu > 1 (with mu = 1 pi_old is the current policy);
    reference log-probs only when kl_coef > 0. A step whose loss or gradient norm is not finite
    is skipped: gradients dropped, weights and optimizer state untouched. Returns (stats, timings)
    with timings in seconds: time_logprobs (no-grad old/reference passes plus the policy's
    forward) and time_backward (backward and optimizer).
    """
    t0 = time.time()
    model.train()  # dropout is off (load_policy); train mode enables gradient checkpointing
    batch["old_logp"] = frozen_logprobs(model, batch, keep_idx, cfg) if cfg.mu > 1 else None
    batch["ref_logp"] = frozen_logprobs(ref_model, batch, keep_idx, cfg) if cfg.kl_coef > 0 else None
    t1 = time.time()
    stats, skipped = [], 0
    for _ in range(cfg.ppo_epochs):
        perm = [keep_idx[j] for j in torch.randperm(len(keep_idx), generator=generator).tolist()]
        for mb in range(cfg.mini_batches):
            idx = perm[mb * len(perm) // cfg.mini_batches:(mb + 1) * len(perm) // cfg.mini_batches]
            if not idx:
                continue
            totals = accumulate_gradients(model, batch, idx, cfg)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()
            if math.isfinite(totals["loss"]) and math.isfinite(grad_norm):
                optimizer.step()
                scheduler.step()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
            stats.append({**totals, "grad_norm": grad_norm})
    mean = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]} if stats else {}
    forward = sum(s["time_forward"] for s in stats)
    timings = {"time_logprobs": t1 - t0 + forward, "time_backward": time.time() - t1 - forward}
    return {**mean, "skipped_steps": skipped, "optimizer_steps": len(stats)}, timings


# -----------------------------------------------------------------------------
# Checkpoints, resume, plots

def checkpoints(out_dir):
    """Complete checkpoint folders step_XXXXXX in out_dir, oldest first."""
    found = glob.glob(os.path.join(out_dir, "step_*", "trainer_state.pt"))
    return sorted(os.path.dirname(f) for f in found)


def save_checkpoint(out_dir, step, model, tokenizer, optimizer, scheduler, keep_last):
    """Write step_XXXXXX atomically: a temporary folder renamed into place (a kill leaves the
    previous checkpoint intact). HF format (save_pretrained + tokenizer) plus trainer_state.pt."""
    final = os.path.join(out_dir, f"step_{step:06d}")
    tmp = os.path.join(out_dir, f".tmp_step_{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               os.path.join(tmp, "trainer_state.pt"))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        for old in checkpoints(out_dir)[:-keep_last]:
            doomed = os.path.join(out_dir, ".del_" + os.path.basename(old))
            os.replace(old, doomed)  # no longer listed as a checkpoint before its files go
            shutil.rmtree(doomed)
    return final


def plot_metrics(metrics_path, png_path):
    """Plot reward, accuracy, lengths (correct/incorrect), KL, entropy and clip fraction against
    step from metrics.jsonl into a PNG. Needs matplotlib (optional); returns False without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    panels = [("reward_mean", "accuracy"), ("len_correct", "len_incorrect"), ("kl",), ("entropy",), ("clip_frac",)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, keys in zip(axes, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), label=key)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------
# Training loop

def main(argv=None):
    cfg = parse_args(argv)
    try:  # every input check happens here, before the model loads
        problems = load_problems(cfg.train_data, cfg.num_problems, cfg.seed, cfg.skip_bad_rows)
        prepare_out_dir(cfg)
    except (DataError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(vars(cfg), indent=1))
    device = torch.device(cfg.device)
    dtype = torch.bfloat16 if cfg.bf16_weights else torch.float32
    resume_from = checkpoints(cfg.out_dir)[-1] if cfg.resume and checkpoints(cfg.out_dir) else None
    model, tokenizer = load_policy(resume_from or cfg.model, device, dtype)
    ref_model = None
    if cfg.kl_coef > 0:  # the reference model is the initial policy; only loaded when KL is used
        ref_model, _ = load_policy(cfg.model, device, torch.bfloat16 if device.type == "cuda" else dtype)
        ref_model.eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    start_step = 0
    if resume_from:
        state = torch.load(os.path.join(resume_from, "trainer_state.pt"), weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["step"]
        print(f"resumed from {resume_from} at step {start_step}")
    if cfg.resume:  # steps logged after the checkpoint are run again: drop their lines
        trim_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), start_step)
    num_steps = cfg.steps or math.ceil(len(problems) / cfg.prompts_per_step)
    stop = install_signal_handlers()
    bad_in_a_row, step = 0, start_step
    for step in tqdm(range(start_step + 1, num_steps + 1), initial=start_step, total=num_steps, desc="rl steps"):
        metrics = rl_step(model, ref_model, tokenizer, optimizer, scheduler, problems, step, cfg)
        with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                            if k in ("step", "reward_mean", "accuracy", "loss", "kl", "grad_norm", "len_mean", "time_step")))
        bad_in_a_row = bad_in_a_row + 1 if metrics["skipped_steps"] else 0
        if bad_in_a_row >= cfg.max_bad_steps:
            tqdm.write(f"error: {bad_in_a_row} steps in a row had a non-finite loss or gradient; stopping. "
                       f"Last good checkpoint: {(checkpoints(cfg.out_dir) or ['none'])[-1]}", file=sys.stderr)
            sys.exit(1)
        if (step % cfg.save_every == 0 or step == num_steps) and not bad_in_a_row or stop["signal"]:
            path = save_checkpoint(cfg.out_dir, step, model, tokenizer, optimizer, scheduler, cfg.keep_last)
            if not plot_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), os.path.join(cfg.out_dir, "metrics.png")) and step == num_steps:
                print("metrics.png not written: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        if stop["signal"]:
            tqdm.write(f"received {stop['signal']}: saved {path}; continue with --resume", file=sys.stderr)
            sys.exit(128 + stop["number"])
    print(f"done: {num_steps} steps, last checkpoint {checkpoints(cfg.out_dir)[-1]}")


def rl_step(model, ref_model, tokenizer, optimizer, scheduler, problems, step, cfg):
    """One RL step: sample the rollout batch, score it, compute advantages, update. Returns metrics."""
    t0 = time.time()
    seed = cfg.seed * 1_000_003 + step  # every step reseeds: a resumed run samples what the original would
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    batch_problems = problems_for_step(problems, step, cfg.prompts_per_step, cfg.seed)
    prompts = [build_prompt(tokenizer, p["question"], cfg.template) for p in batch_problems]
    rollout = sample(model, tokenizer, prompts, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                     cfg.gen_batch_size, stop_strings(cfg.template))
    t1 = time.time()
    golds = [p["answer"] for p in batch_problems for _ in range(cfg.group_size)]
    rewards, correct, score_info = score_completions(rollout["texts"], golds, cfg.template, cfg.format_bonus, cfg.grader_timeout)
    t2 = time.time()
    P, G = len(prompts), cfg.group_size
    advantages, keep = compute_advantages(rewards.view(P, G), cfg)  # (P, G)
    truncated = torch.tensor(rollout["truncated"])
    if cfg.mask_truncated:
        keep &= ~truncated.view(P, G)
    batch = {"prompt_ids": [rollout["prompt_ids"][i // G] for i in range(P * G)],
             "completion_ids": rollout["completion_ids"], "advantages": advantages.flatten()}
    keep_idx = keep.flatten().nonzero().flatten().tolist()
    stats, timings = train_on_rollout(model, ref_model, optimizer, scheduler, batch, keep_idx, cfg, generator) \
        if keep_idx else ({"skipped_steps": 0, "optimizer_steps": 0}, {"time_logprobs": 0.0, "time_backward": 0.0})
    lengths = torch.tensor([len(c) for c in rollout["completion_ids"]], dtype=torch.float32)
    equal = (rewards.view(P, G) == rewards.view(P, G)[:, :1]).all(dim=1)
    return {"step": step, "reward_mean": rewards.mean().item(), "accuracy": correct.float().mean().item(),
            **score_info, **{k: stats.get(k) for k in ("loss", "pg_loss", "kl", "grad_norm", "entropy", "clip_frac")},
            "len_mean": lengths.mean().item(),
            "len_correct": lengths[correct].mean().item() if correct.any() else None,
            "len_incorrect": lengths[~correct].mean().item() if (~correct).any() else None,
            "truncated_frac": truncated.float().mean().item(), "equal_group_frac": equal.float().mean().item(),
            "kept_frac": len(keep_idx) / (P * G), "mu": cfg.mu, "optimizer_steps": stats["optimizer_steps"],
            "skipped_steps": stats["skipped_steps"], "tokens": int(lengths.sum().item()), "lr": scheduler.get_last_lr()[0],
            "time_generate": t1 - t0, "time_score": t2 - t1, **timings, "time_step": time.time() - t0,
            "peak_memory_gb": peak_memory_gb(model)}


def problems_for_step(problems, step, count, seed):
    """The `count` problems of a step: a fresh seeded shuffle every epoch, derived from the step."""
    orders, out = {}, []
    for k in range((step - 1) * count, step * count):
        epoch, pos = divmod(k, len(problems))
        if epoch not in orders:  # a step spans at most two epochs: shuffle each once
            orders[epoch] = list(range(len(problems)))
            random.Random(seed * 7919 + epoch).shuffle(orders[epoch])
        out.append(problems[orders[epoch][pos]])
    return out


def peak_memory_gb(model):
    """Peak memory so far: CUDA allocated bytes on GPU, the process's max resident set on CPU."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def prepare_out_dir(cfg):
    """Create out_dir and save config.json; refuse to overwrite an existing run unless --resume."""
    hub_id = re.fullmatch(r"[\w-][\w.-]*(/[\w-][\w.-]*)?", cfg.model) and not cfg.model.endswith(".gguf")
    if not hub_id and not os.path.exists(cfg.model):
        raise FileNotFoundError(f"--model {cfg.model}: no such file or folder")
    if not cfg.resume and (checkpoints(cfg.out_dir) or os.path.exists(os.path.join(cfg.out_dir, "metrics.jsonl"))):
        raise FileExistsError(f"--out-dir {cfg.out_dir} already holds a run; pass --resume or choose another --out-dir")
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump(vars(cfg), f, indent=1)


def trim_metrics(path, last_step):
    """Drop metric lines after last_step (they will be logged again), rewriting the file atomically."""
    if not os.path.exists(path):
        return
    lines = [l for l in open(path) if l.strip() and json.loads(l)["step"] <= last_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def install_signal_handlers():
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits."""
    state = {"signal": None, "number": 0}

    def handler(number, frame):
        if state["signal"]:  # a second signal: the user does not want to wait for the step to end
            raise KeyboardInterrupt
        state["signal"], state["number"] = signal.Signals(number).name, number
        os.write(2, f"\n{state['signal']}: finishing this step, then saving a checkpoint (send again to abort)\n".encode())
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)
    return state


if __name__ == "__main__":
    main()
