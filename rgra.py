"""
rgra.py: reinforcement learning from verifiable rewards for LLM math, in one file.

One RL step (P prompts, G completions per prompt, the policy pi_theta):

  1. rollout    o_1..o_G ~ pi_old(. | q) for each prompt q                (pi_old = pi_theta now)
  2. reward     r_i = 1[answer(o_i) == gold(q)] + format_bonus * 1[o_i boxes an answer]
  3. advantage  A_i from the group's rewards, e.g. (r_i - mean_g r) / (std_g r + eps)
  4. update     mu optimizer steps on  J = agg_{i,t} [ l_it + beta * KL_t(pi_theta || pi_ref) ]
                with the per-token surrogate l_it one of
                  pg     -A_i log pi_theta(o_it)                                  (REINFORCE)
                  clip   -min(s A_i, clip(s, 1 - eps_low, 1 + eps_high) A_i)      (PPO)
                  cispo  -sg(clip(s, 1 - eps_low, 1 + eps_high)) A_i log pi_theta(o_it)
                  nll    -log pi_theta(o_it) on kept samples                      (RAFT)
                where the ratio s is s_it = pi_theta(o_it) / pi_old(o_it) per token, or
                s_i = exp(mean_t log s_it) shared by the tokens of o_i (GSPO), and agg is one of
                four aggregations whose denominators belong to the whole optimizer step, never
                to a micro-batch (TRL #2617, verl #5625).

With mu = 1 (one optimizer step per rollout batch) the ratio is 1, the clip is inactive and the
clip, cispo and GSPO surrogates have exactly the gradient of pg: they differ only when mu > 1.

Presets (--algo), each a few overrides of GRPO's values; every column is also a flag of its own:

algo       advantage      std_norm  surrogate  ratio     eps        kl_coef  loss_agg
grpo       group          group     clip       token     0.2/0.2    0.04     seq-mean-token-mean
dr_grpo    group          none      clip       token     0.2/0.2    0        seq-mean-token-sum-norm
rgra       group          group     pg         -         -          0.04     seq-mean-token-mean
grpo_pos   group          group     clip       token     0.2/0.2    0.04     seq-mean-token-mean
reinforce  raw            none      pg         -         -          0.04     seq-mean-token-mean
rloo       leave-one-out  none      pg         -         -          0        seq-mean-token-sum
raft       best           none      nll        -         -          0        token-mean
dapo       group          group     clip       token     0.2/0.28   0        token-mean
gspo       group          group     clip       sequence  3e-4/4e-4  0        seq-mean-token-mean
cispo      group          group     cispo      token     1/3        0        token-mean

Also: grpo_pos --positive-only; dapo --drop-equal-groups --dynamic-sampling --mask-truncated.

grpo: DeepSeekMath (arXiv 2402.03300) eq. 3-4. dr_grpo: Dr. GRPO (arXiv 2503.20783). rgra: RGRA
(arXiv 2603.18756), with its ablations grpo_pos and reinforce. rloo: arXiv 2402.14740. raft: RAFT
(arXiv 2304.06767), top-1. dapo: DAPO (arXiv 2503.14476) eq. 10-11, Algorithm 1. gspo: GSPO (arXiv
2507.18071) eq. 5-7, sec. 5.1 (with --mini-batches 4). cispo: MiniMax-M1 (arXiv 2506.13585) sec.
3.1, no lower bound; its upper bound is unpublished: 4, Tinker's CISPO default.

The file follows one RL step: `rl_step` (steps 1-4), then the functions it calls in the order it
reaches them, then the training loop (`main`). After it, what extends the step (DAPO's refill,
the shared-prompt forward, more than one GPU), then what is not RL (data, models, logs, grading).
"""

import argparse
import contextlib
import dataclasses
import functools
import glob
import itertools
import json
import math
import multiprocessing
import os
import pickle
import random
import re
import resource
import shlex
import shutil
import signal
import sys
import threading
import time
import warnings
from fractions import Fraction

import huggingface_hub
import sympy
import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig

# ==== Configuration: every setting a flag; --algo picks the objective's preset (the table above)

# Each preset as its overrides of GRPO's objective, whose values are those of the Config below.
PRESETS = {
    "grpo": dict(),
    "dr_grpo": dict(std_norm="none", kl_coef=0.0, loss_agg="seq-mean-token-sum-norm"),
    "rgra": dict(surrogate="pg"),
    "grpo_pos": dict(positive_only=True),
    "reinforce": dict(advantage="raw", std_norm="none", surrogate="pg"),
    "rloo": dict(
        advantage="leave-one-out",
        std_norm="none",
        surrogate="pg",
        kl_coef=0.0,
        loss_agg="seq-mean-token-sum",
    ),
    "raft": dict(
        advantage="best", std_norm="none", surrogate="nll", kl_coef=0.0, loss_agg="token-mean"
    ),
    "dapo": dict(
        eps_high=0.28,
        kl_coef=0.0,
        loss_agg="token-mean",
        drop_equal_groups=True,
        dynamic_sampling=True,
        mask_truncated=True,
    ),
    "gspo": dict(ratio_level="sequence", eps_low=3e-4, eps_high=4e-4, kl_coef=0.0),
    "cispo": dict(surrogate="cispo", eps_low=1.0, eps_high=3.0, kl_coef=0.0, loss_agg="token-mean"),
}
LOSS_AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm", "seq-mean-token-sum")
TEMPLATES = ("chat", "qwen_math", "r1", "none")
# Advantages are (r - mean) / (std + STD_EPS); TRL uses 1e-4, verl 1e-6, Dr. GRPO's code 1e-8.
STD_EPS = 1e-6
# Log-ratios are clamped to +-LOG_RATIO_CLAMP before exp, as in verl: exp overflows float32 past 88.
LOG_RATIO_CLAMP = 20.0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def option(default, help, choices=None, at_least=None, grpo=None):
    """A Config field: its --help text, allowed values, lower bound and, for the objective, grpo."""
    metadata = {"help": help, "choices": choices, "at_least": at_least, "grpo": grpo}
    return dataclasses.field(default=default, metadata=metadata)


def objective(grpo, help, choices=None, at_least=None):
    """An objective field: the --algo preset's value unless given; GRPO's if it is silent."""
    return option(None, help, choices, at_least, grpo)


@dataclasses.dataclass
class Config:
    """Every setting of a run, each one a flag (prompts_per_step is --prompts-per-step). The
    objective's fields take the --algo preset's value unless given, from Python as from the
    command line: Config(algo="gspo", lr=1e-5) is parse_args(["--algo", "gspo", "--lr", "1e-5"])."""

    algo: str = option("rgra", "preset of the objective (table in rgra.py)", tuple(PRESETS))
    model: str = option("Qwen/Qwen2.5-1.5B-Instruct", "policy: HF folder, hub id or .gguf file")
    train_data: str = option("gsm8k", "JSONL path, or 'gsm8k' / 'math' from the hub")
    num_problems: int = option(1800, "seeded random subset of the problems (0 = all)", at_least=0)
    skip_bad_rows: bool = option(False, "skip (and count) rows without question or gold answer")
    template: str = option("chat", "prompt template", TEMPLATES)
    seed: int = option(0, "seed of the data order and of sampling")
    prompts_per_step: int = option(24, "P: prompts per rollout batch", at_least=1)
    group_size: int = option(8, "G: completions sampled per prompt", at_least=1)
    max_new_tokens: int = option(512, "completion budget in tokens (Dr. GRPO's L)", at_least=1)
    temperature: float = option(1.0, "sampling temperature; log-probs use the same T")
    top_p: float = option(1.0, "nucleus sampling threshold, in (0, 1]")
    gen_batch_size: int = option(256, "sequences per generate call", at_least=1)
    format_bonus: float = option(0.1, "reward for a boxed answer (RGRA paper: 0.1)")
    grader_timeout: float = option(1.0, "seconds allowed to grade one answer")
    # The objective: the preset's values (GRPO's where it is silent) unless the flag is given.
    advantage: str = objective("group", "baseline", ("group", "leave-one-out", "raw", "best"))
    std_norm: str = objective("group", "advantages / std of", ("group", "batch", "none"))
    positive_only: bool = objective(False, "clamp advantages at 0 (GRPO-pos)")
    surrogate: str = objective("clip", "per-token surrogate", ("pg", "clip", "cispo", "nll"))
    ratio_level: str = objective("token", "per token, or sequence (GSPO)", ("token", "sequence"))
    eps_low: float = objective(0.2, "clip range below 1, in [0, 1]")
    eps_high: float = objective(0.2, "clip range above 1", at_least=0)
    kl_coef: float = objective(0.04, "beta: weight of KL(policy || reference model)", at_least=0)
    kl_estimator: str = option("k3", "per-token KL estimator", ("k1", "k2", "k3"))
    loss_agg: str = objective("seq-mean-token-mean", "loss aggregation", LOSS_AGGS)
    drop_equal_groups: bool = objective(False, "drop groups whose rewards are all equal")
    dynamic_sampling: bool = objective(False, "refill the dropped groups with new prompts (DAPO)")
    max_refill_rounds: int = option(10, "at most this many extra rounds to refill", at_least=0)
    mask_truncated: bool = objective(False, "no loss on completions cut by --max-new-tokens")
    # The update.
    steps: int = option(0, "rollout steps (0 = one pass over the problems)", at_least=0)
    ppo_epochs: int = option(1, "passes over each rollout batch", at_least=1)
    mini_batches: int = option(1, "optimizer steps per pass (mu = epochs x this)", at_least=1)
    micro_batch_size: int = option(8, "sequences per forward/backward", at_least=1)
    lr: float = option(1e-6, "AdamW learning rate, constant after warm-up")
    warmup_steps: int = option(0, "linear warm-up, in optimizer steps", at_least=0)
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping threshold")
    lora_rank: int = option(0, "train LoRA adapters of this rank (0: all weights)", at_least=0)
    lora_alpha: float = option(32.0, "LoRA adapters are scaled by alpha / rank")
    share_prompt: bool = option(True, "run each prompt once per group, sampling and training")
    gradient_checkpointing: bool = option(False, "recompute activations; training unshares prompts")
    bf16: bool | None = option(None, "bf16 autocast, fp32 weights (default: on CUDA)")
    bf16_weights: bool = option(False, "bf16 weights and optimizer state (lr ~1e-6 rounds away)")
    device: str = option("cuda" if torch.cuda.is_available() else "cpu", "cuda or cpu")
    # The run.
    out_dir: str = option("runs/rgra", "metrics.jsonl, config.json and checkpoints go here")
    save_every: int = option(25, "checkpoint every N steps (and at the end)", at_least=1)
    keep_last: int = option(0, "keep only the newest N checkpoints (0 = all)", at_least=0)
    resume: bool = option(False, "continue from the newest checkpoint in --out-dir")
    max_bad_steps: int = option(3, "stop after this many non-finite steps in a row", at_least=1)

    def __post_init__(self):
        """Fill the objective fields left unset from the preset, and bf16 from the device."""
        if self.algo not in PRESETS:
            raise ValueError(f"algo {self.algo!r}: not one of {', '.join(PRESETS)}")
        for field in dataclasses.fields(self):
            if field.metadata["grpo"] is not None and getattr(self, field.name) is None:
                value = PRESETS[self.algo].get(field.name, field.metadata["grpo"])
                setattr(self, field.name, value)
        if self.bf16 is None:
            self.bf16 = self.device.startswith("cuda")

    @property
    def mu(self):
        """Optimizer steps per rollout batch."""
        return self.ppo_epochs * self.mini_batches


def parse_args(argv=None):
    """The command line as a Config; a bad flag exits with status 2, naming it, before any load."""
    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for field in dataclasses.fields(Config):
        help = field.metadata["help"]
        default = field.default
        # An objective flag is absent from the parsed namespace unless given: Config fills it.
        if field.metadata["grpo"] is not None:
            help += " (default: the preset's)"
            default = argparse.SUPPRESS
        flag = "--" + field.name.replace("_", "-")
        kwargs = {"type": field.type, "choices": field.metadata["choices"]}
        if field.type in (bool, bool | None):
            kwargs = {"action": argparse.BooleanOptionalAction}
        parser.add_argument(flag, default=default, help=help, **kwargs)
    cfg = Config(**vars(parser.parse_args(argv)))
    try:
        check_config(cfg)
    except ValueError as error:
        parser.error(str(error))
    if cfg.mu > 1 and cfg.surrogate == "pg":
        print(f"warning: mu = {cfg.mu}: pg reuses stale samples without a ratio", file=sys.stderr)
    if cfg.share_prompt and cfg.gradient_checkpointing:
        print("note: --gradient-checkpointing turns --share-prompt off", file=sys.stderr)
    return cfg


# ==== One RL step: the module docstring's steps 1-4, then each function where the step reaches it


def rl_step(model, ref_model, tokenizer, optimizer, scheduler, problems, step, cursor, cfg):
    """One RL step on the P problems ({"question", "answer"}) at position cursor of the data order;
    ref_model is pi_ref when kl_coef > 0 (under LoRA None: the policy, adapters off). Returns the
    step's metrics (all ranks') and next cursor. ValueError first for a bad config or ref_model."""
    check_config(cfg)
    if cfg.kl_coef > 0 and ref_model is None and not cfg.lora_rank:
        raise ValueError("kl_coef > 0 needs ref_model, the reference model (or lora_rank > 0)")
    P = cfg.prompts_per_step
    G = cfg.group_size
    start = time.time()
    # Every step reseeds, each rank its own way: a resumed run samples what the original would.
    rank, world_size = world()
    torch.manual_seed((cfg.seed * 1_000_003 + step) * world_size + rank)

    # 1. rollout and 2. reward: G completions of each of the next P problems, and their rewards.
    rollout = sample_groups(model, tokenizer, problems_at(problems, cursor, P, cfg.seed), cfg)
    cursor += P
    rounds = 1
    # DAPO's dynamic sampling: more rounds of steps 1 and 2 until P groups have a signal.
    if cfg.dynamic_sampling:
        rollout, cursor, rounds = refill_groups(rollout, model, tokenizer, problems, cursor, cfg)
    sampled = time.time()

    # 3. advantages: one number per completion, from its group's rewards.
    rewards = rollout.rewards.view(-1, G)  # (groups, G)
    advantages, keep = compute_advantages(rewards, cfg)
    # Dynamic sampling sampled more groups than a step trains on: the first P with a signal.
    if cfg.dynamic_sampling:
        with_signal = has_signal(rewards)  # (groups,)
        keep &= (with_signal & (with_signal.cumsum(dim=0) <= P)).unsqueeze(1)
    # DAPO's overlong filtering: a truncated completion is not judged by an answer it never gave.
    if cfg.mask_truncated:
        keep &= ~rollout.truncated.view(-1, G)
    rollout.advantages = advantages.flatten()
    rollout.keep = keep.flatten()

    # 4. update: mu optimizer steps on the kept sequences. Those after the first need pi_old's
    # log-probs (the policy's now), KL pi_ref's: both computed once, before the first update.
    model.train()  # dropout is off (load_policy); train mode enables gradient checkpointing
    kept = rollout.keep.nonzero().flatten().tolist()
    # More than one GPU: each rank needs those of the sequences it trains on, its groups'.
    my_kept = rank_sequences(kept, len(rollout.keep), G)
    if cfg.mu > 1:
        rollout.old_logp = frozen_logprobs(model, rollout, my_kept, cfg)
    if cfg.kl_coef > 0:
        with lora_adapters_off():
            rollout.ref_logp = frozen_logprobs(ref_model or model, rollout, my_kept, cfg)
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    stats = train_on_rollout(model, optimizer, scheduler, rollout, cfg, generator)

    metrics = {"step": step, "cursor": cursor, "sampling_rounds": rounds, "mu": cfg.mu}
    metrics.update(lr=scheduler.get_last_lr()[0], time_rollout=sampled - start)
    metrics.update(time_train=time.time() - sampled, time_step=time.time() - start)
    return {**metrics, **stats, **rollout_metrics(rollout, cfg, model)}


def sample_groups(model, tokenizer, batch, cfg):
    """Steps 1 and 2 for a batch of problems: G completions of each, sampled from the policy as it
    is (pi_old), and their rewards: their Rollout, sequence i answering problem i // G."""
    G = cfg.group_size
    # More than one GPU: each rank samples and grades its share of the problems.
    batch = rank_share(batch)
    prompts = [build_prompt(tokenizer, problem["question"], cfg.template) for problem in batch]
    prompt_ids, completion_ids, texts, truncated = sample(model, tokenizer, prompts, G, cfg)
    golds = [problem["answer"] for problem in batch for _ in range(G)]
    rewards, checks = score_completions(texts, golds, cfg)
    rollout = Rollout(
        prompt_ids=[prompt_ids[i // G] for i in range(len(completion_ids))],
        completion_ids=completion_ids,
        truncated=torch.tensor(truncated, dtype=torch.bool),
        rewards=rewards,
        checks=checks,
    )
    # More than one GPU: every rank gets every rank's sequences.
    return gather_rollouts(rollout)


@dataclasses.dataclass
class Rollout:
    """The N sequences of one RL step, whole groups of G, prompt-major, filled in step by step."""

    # 1. rollout
    prompt_ids: list  # N token-id lists: each sequence's prompt
    completion_ids: list  # N token-id lists, each with its final EOS unless truncated
    truncated: torch.Tensor  # (N,) bool: cut by max_new_tokens
    # 2. reward
    rewards: torch.Tensor  # (N,) float32
    checks: dict = dataclasses.field(default_factory=dict)  # correct, formatted, ...: (N,) bool
    # 3. advantages
    advantages: torch.Tensor | None = None  # (N,) float32
    keep: torch.Tensor | None = None  # (N,) bool: the sequences in the loss
    # 4. update: log-probs (N, T) float32 of the kept sequences this rank trains on, 0 elsewhere
    old_logp: torch.Tensor | None = None  # pi_old's, at mu > 1
    ref_logp: torch.Tensor | None = None  # pi_ref's, with KL


@torch.no_grad()
def sample(model, tokenizer, prompts, n, cfg):
    """n completions of each of P prompts by cfg's max_new_tokens, temperature (0: greedy), top_p,
    gen_batch_size, template and share_prompt: prompt_ids (P token-id lists), and prompt-major (row
    i * n + k is prompt i's k-th) completion_ids, texts and truncated (bool). A completion ends at
    its first EOS or stop string: with pad == eos (Qwen) EOS is never learned (TRL PR #6357)."""
    model.eval()
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    # Every id that ends a completion: Qwen lists several.
    eos = model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    stop = STOP_STRINGS.get(cfg.template, [])
    # Explicit settings: a model's own top_k or repetition_penalty would change pi_old.
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=cfg.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sorted(eos),
        stop_strings=list(stop) or None,
    )
    if cfg.temperature > 0:
        config.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
    completions = []
    truncated = []
    # Whole groups per generate call.
    per_call = max(1, cfg.gen_batch_size // n)
    for start in range(0, len(prompts), per_call):
        ids, mask = pad(prompt_ids[start : start + per_call], model.device, side="left")  # (p, Lp)
        cache = None
        # Faster, same completions: each prompt runs once, not once per completion.
        if cfg.share_prompt:
            cache = prefill_prompts(model, ids, mask, n)
        ids = ids.repeat_interleave(n, dim=0)  # (p * n, Lp)
        mask = mask.repeat_interleave(n, dim=0)
        out = model.generate(
            ids,
            attention_mask=mask,
            past_key_values=cache,
            generation_config=config,
            tokenizer=tokenizer,  # for the stop strings
        )  # (p * n, Lp + new)
        for tokens in out[:, ids.shape[1] :].tolist():
            length = completion_length(tokens, eos, tokenizer, stop)
            completions.append(tokens[:length])
            text = tokenizer.decode(tokens[:length])
            truncated.append(tokens[length - 1] not in eos and not text.endswith(tuple(stop)))
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return prompt_ids, completions, texts, truncated


def score_completions(texts, golds, cfg):
    """Rewards (N,) float32 of N completions: 1 for a correct final answer, plus format_bonus for an
    answer in a closed, non-empty \\boxed{} (r1: <think>...</think> <answer>...</answer>); and the
    checks, (N,) bool each: correct, formatted, answered, timeout, error (verl PR #5635)."""
    form = r"\\(?:boxed|fbox)\s*\{\s*[^\s}]"
    if cfg.template == "r1":
        form = r"</think>\s*<answer>.*</answer>"
    checks = {key: [] for key in ("correct", "formatted", "answered", "timeout", "error")}
    for text, gold in zip(texts, golds, strict=True):
        correct, answer, status = grade(text, gold, cfg.grader_timeout)
        checks["correct"].append(correct)
        checks["formatted"].append(answer is not None and re.search(form, text, re.S) is not None)
        checks["answered"].append(answer is not None)
        checks["timeout"].append(status == "timeout")
        checks["error"].append(status == "error")
    checks = {key: torch.tensor(values, dtype=torch.bool) for key, values in checks.items()}
    rewards = checks["correct"].float() + cfg.format_bonus * checks["formatted"].float()
    return rewards, checks


def compute_advantages(rewards, cfg):
    """Advantages (P, G) float32 and keep (P, G) bool, on rewards' device, from rewards (P, G), a
    group per row: groups built without the prompt degrade to batch normalisation (Search-R1 #88).
    cfg: a Config, or any object with advantage, std_norm, positive_only, drop_equal_groups.
    std is Bessel's. Copy with `import torch`, STD_EPS and has_signal."""
    P, G = rewards.shape
    # RAFT: 1 for the first top completion of a group with reward > 0, the others dropped.
    if cfg.advantage == "best":
        best = rewards.argmax(dim=1, keepdim=True)  # (P, 1)
        keep = torch.zeros_like(rewards, dtype=torch.bool).scatter_(1, best, True) & (rewards > 0)
        return keep.float(), keep
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (P, G)
    # Dr. GRPO: r_i - mean_g r; GRPO divides it by the group's std next.
    if cfg.advantage == "group":
        advantages = centred
    # RLOO: r_i - mean_{j != i} r_j, which is G / (G - 1) (r_i - mean_g r).
    elif cfg.advantage == "leave-one-out":
        advantages = centred * G / (G - 1)
    # REINFORCE: the raw reward, no baseline.
    else:
        advantages = rewards
    # GRPO (DeepSeekMath eq. 3): / (std + eps) of the group; REINFORCE++: of the whole batch.
    if cfg.std_norm == "group":
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + STD_EPS)
    elif cfg.std_norm == "batch":
        advantages = (advantages - advantages.mean()) / (advantages.std() + STD_EPS)
    # Against its own baseline a group whose rewards are all equal has advantage 0, exactly: the
    # float32 mean of eight 0.1 is not 0.1, and / (std + eps) turns the residue into -0.0074.
    with_signal = has_signal(rewards).unsqueeze(1)  # (P, 1)
    if cfg.advantage != "raw" or cfg.std_norm == "group":
        advantages = torch.where(with_signal, advantages, 0.0)
    # GRPO-pos, the RGRA paper's ablation.
    if cfg.positive_only:
        advantages = advantages.clamp(min=0)
    # DAPO eq. 11: a group whose rewards are all equal teaches nothing.
    keep = torch.ones_like(rewards, dtype=torch.bool)
    if cfg.drop_equal_groups:
        keep &= with_signal
    return advantages, keep


def has_signal(rewards):
    """(P,) bool: the groups of rewards (P, G) whose rewards are not all equal."""
    return (rewards != rewards[:, :1]).any(dim=1)


@torch.no_grad()
def frozen_logprobs(model, rollout, idx, cfg):
    """Log-probs (N, T) float32 of the rollout's sequences idx under a frozen model (pi_old, or
    pi_ref), 0 in the other rows and on padding; T is the rollout's longest completion."""
    logps = torch.zeros(len(rollout.completion_ids), max(map(len, rollout.completion_ids)))
    for start in range(0, len(idx), cfg.micro_batch_size):
        seqs = idx[start : start + cfg.micro_batch_size]
        prompts = [rollout.prompt_ids[i] for i in seqs]
        completions = [rollout.completion_ids[i] for i in seqs]
        logp = completion_logprobs(model, prompts, completions, cfg.temperature, cfg.share_prompt)
        logps[seqs, : logp.shape[1]] = logp.cpu()
    return logps


def completion_logprobs(model, prompts, completions, temperature, share_prompt, entropy=False):
    """log pi(o_t | q, o_<t) (m, T) float32 of the m completions' tokens (token-id lists, as the
    prompts), 0 on padding, from logits / temperature (TRL PR #3029); with entropy, also the
    entropy (m, T), no gradient. share_prompt: the same, each distinct prompt run once."""
    prompt, prompt_mask = pad(prompts, model.device, side="left")  # (m, Lp)
    completion, completion_mask = pad(completions, model.device)  # (m, T)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (m, Lp + T)
    # Logits for the completion positions only: the prompt's full-vocabulary logits would dominate
    # memory (TRL #3456). Position t - 1 predicts token t. Gradient checkpointing drops the KV
    # cache that the shared prompt forward reuses.
    if not share_prompt or model.is_activation_checkpointing:
        ids = torch.cat([prompt, completion], dim=1)  # (m, Lp + T)
        T = completion.shape[1]
        out = model(ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=T + 1)
        logits = out.logits[:, :-1]
    else:
        logits = shared_prompt_logits(model, prompts, prompt, prompt_mask, completion, mask)
    logits = logits.float() / temperature  # (m, T, V) fp32
    logz = logits.logsumexp(dim=-1)  # (m, T)
    logp = logits.gather(-1, completion.unsqueeze(-1)).squeeze(-1) - logz
    logp = logp * completion_mask
    if not entropy:
        return logp
    with torch.no_grad():
        return logp, (logz - (logits.softmax(dim=-1) * logits).sum(dim=-1)) * completion_mask


def train_on_rollout(model, optimizer, scheduler, rollout, cfg, generator):
    """mu = ppo_epochs x mini_batches optimizer steps on the rollout's kept sequences, mini-batches
    drawn by generator (alike on every rank), skipping a step whose loss or gradient norm is not
    finite. Returns the steps' mean statistics, optimizer_steps and skipped_steps."""
    kept = rollout.keep.nonzero().flatten()  # (K,)
    steps = []
    skipped = 0
    for _ in range(cfg.ppo_epochs):
        order = kept[torch.randperm(len(kept), generator=generator)]
        # With fewer kept sequences than mini-batches some are empty.
        for part in torch.tensor_split(order, cfg.mini_batches):
            if len(part) == 0:
                continue
            stats = accumulate_gradients(model, rollout, part.tolist(), cfg)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            stats["grad_norm"] = grad_norm.item()
            if math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]):
                optimizer.step()
                scheduler.step()
                # Autocast caches bf16 copies of the weights: they would be stale at the next step.
                torch.clear_autocast_cache()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
            steps.append(stats)
    means = {key: sum(s[key] for s in steps) / len(steps) for key in steps[0]} if steps else {}
    return {**means, "optimizer_steps": len(steps) - skipped, "skipped_steps": skipped}


def accumulate_gradients(model, rollout, idx, cfg):
    """Forward and backward the rollout's sequences idx (one optimizer step) micro-batch by
    micro-batch, into .grad: the gradient of step_loss over idx. Returns its statistics."""
    lengths = torch.tensor([len(rollout.completion_ids[i]) for i in idx])
    # Each sequence's weight, from the lengths of the whole optimizer step: 1 or k micro-batches
    # give the same gradient (TRL #2617).
    weights = torch.zeros(len(rollout.keep))
    weights[idx] = sequence_weights(lengths, cfg.loss_agg, cfg.max_new_tokens)
    # More than one GPU: each rank runs its own groups' sequences.
    my_seqs = rank_sequences(idx, len(rollout.keep), cfg.group_size)
    # Micro-batches that pad little, each group's sequences together: its prompt then runs once.
    prompts = rollout.prompt_ids
    my_seqs.sort(key=lambda i: (-len(prompts[i]), prompts[i], -len(rollout.completion_ids[i])))
    stats = StepStats()
    for start in range(0, len(my_seqs), cfg.micro_batch_size):
        seqs = my_seqs[start : start + cfg.micro_batch_size]
        completions = [rollout.completion_ids[i] for i in seqs]
        logp, entropy = completion_logprobs(
            model, [prompts[i] for i in seqs], completions, cfg.temperature, cfg.share_prompt, True
        )  # (m, T) each
        mask = pad(completions, logp.device)[1]  # (m, T)
        T = logp.shape[1]
        # At mu = 1 pi_old is the policy itself: the ratio is exactly 1.
        old_logp = logp.detach()
        if rollout.old_logp is not None:
            old_logp = rollout.old_logp[seqs, :T].to(logp.device)
        ref_logp = None
        if rollout.ref_logp is not None:
            ref_logp = rollout.ref_logp[seqs, :T].to(logp.device)
        advantages = rollout.advantages[seqs].to(logp.device)
        losses, token_stats = token_loss(logp, old_logp, ref_logp, advantages, mask, cfg)
        w = weights[seqs].to(logp.device)  # (m,)
        loss = step_loss(losses, w, mask)
        loss.backward()
        stats.add(loss, token_stats, entropy, w, mask, advantages, cfg)
    # More than one GPU: the gradient is the sum of the ranks' gradients.
    sum_gradients_over_ranks(model)
    return stats.result()


def sequence_weights(lengths, loss_agg, max_new_tokens):
    """Weights (B,) float32, w_i for each token of sequence i: sum_{i,t} w_i l_it is the loss of one
    optimizer step. lengths (B,) are the |o_i| of ALL its sequences, so that 1 or k micro-batches
    give the same gradient (TRL #2617, OpenRLHF PR #1249). Copy with `import torch`."""
    B = len(lengths)
    lengths = lengths.float()
    if loss_agg == "seq-mean-token-mean":
        return 1.0 / (lengths * B)
    if loss_agg == "token-mean":
        return torch.ones_like(lengths) / lengths.sum()
    if loss_agg == "seq-mean-token-sum-norm":
        return torch.full_like(lengths, 1.0 / (max_new_tokens * B))
    return torch.full_like(lengths, 1.0 / B)  # seq-mean-token-sum


def token_loss(logp, old_logp, ref_logp, advantages, mask, cfg):
    """Per-token loss l_it + kl_coef * KL_t (m, T) float32 (the module docstring's table) and its
    parts (m, T): pg_loss, ratio, kl. logp (m, T) with grad; old_logp and ref_logp (m, T) (None
    without KL) without; advantages (m,); mask (m, T) bool, the real tokens. cfg: a Config or an
    object with surrogate, ratio_level, eps_low, eps_high, kl_coef, kl_estimator. ValueError: KL
    without ref_logp. Copy with `import torch` and LOG_RATIO_CLAMP."""
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp, the reference model's log-probs")
    A = advantages.unsqueeze(1)  # (m, 1): one advantage per sequence, on each of its tokens
    log_ratio = logp - old_logp  # (m, T)
    # GSPO eq. 7: one ratio per sequence, the mean of its tokens' log-ratios (real tokens only).
    if cfg.ratio_level == "sequence":
        log_ratio = (log_ratio * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).expand_as(logp)
    # REINFORCE, RGRA: no ratio, no clip.
    if cfg.surrogate == "pg":
        loss = -A * logp
    # PPO, GRPO eq. 3, GSPO eq. 5. The min keeps the unclipped term, and its gradient, where
    # clipping would lower the loss: the clip only removes the pull further out of the range.
    elif cfg.surrogate == "clip":
        loss = -torch.min(ratio * A, ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * A)
    # CISPO, MiniMax-M1 eq. 4: the clipped ratio is a detached weight, so no gradient is lost.
    elif cfg.surrogate == "cispo":
        loss = -ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high).detach() * A * logp
    # RAFT: the likelihood of the kept samples.
    else:
        loss = -logp
    stats = {"pg_loss": loss.detach(), "ratio": ratio.detach()}
    if cfg.kl_coef > 0:
        # d is clamped before exp: large values crash runs (OpenRLHF #525).
        d = (logp - ref_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        if cfg.kl_estimator == "k1":
            kl = d
        elif cfg.kl_estimator == "k2":
            kl = d.square() / 2
        # k3, GRPO's (DeepSeekMath eq. 4): exp(-d) - 1 + d >= 0.
        else:
            kl = torch.exp(-d) - 1 + d
        loss = loss + cfg.kl_coef * kl
        stats["kl"] = kl.detach()
    return loss, stats


def step_loss(losses, weights, mask):
    """The loss of an optimizer step's sequences: sum over sequences i and their real tokens t of
    w_i * l_it, a scalar. losses (m, T) float32 (token_loss), weights (m,) (sequence_weights of the
    whole step), mask (m, T) bool. Summed over micro-batches, the aggregated loss of the step."""
    return (losses * (weights.unsqueeze(1) * mask)).sum()


# ==== The training loop


def main(argv=None):
    """Train: parse the flags and check every input (bad input exits with status 2 before anything
    loads or is written), then run the RL steps, logging metrics and saving checkpoints."""
    cfg = parse_args(argv)
    problems, resume_from = check_inputs(cfg)
    start_distributed(cfg)
    rank = world()[0]
    model, ref_model, tokenizer = load_models(cfg, resume_from)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, cfg.lr, (0.9, 0.95), weight_decay=cfg.weight_decay)
    # Linear warm-up over warmup_steps optimizer steps, then constant.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    )
    start_step, cursor = load_trainer_state(resume_from, model, optimizer, scheduler)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if rank == 0:
        start_log(metrics_path, start_step, cfg)
    num_steps = cfg.steps or math.ceil(len(problems) / cfg.prompts_per_step)
    stop = install_signal_handlers()
    bad_in_a_row = 0
    steps = range(start_step + 1, num_steps + 1)
    for step in tqdm(steps, initial=start_step, total=num_steps, disable=rank > 0):
        with torch.autocast(torch.device(cfg.device).type, torch.bfloat16, enabled=cfg.bf16):
            metrics = rl_step(
                model, ref_model, tokenizer, optimizer, scheduler, problems, step, cursor, cfg
            )
        cursor = metrics["cursor"]
        if rank == 0:
            log_metrics(metrics_path, metrics)
        # Every rank sees the same metrics, so every rank stops here alike.
        bad_in_a_row = bad_in_a_row + 1 if metrics["skipped_steps"] else 0
        if bad_in_a_row >= cfg.max_bad_steps:
            message = f"{bad_in_a_row} steps in a row had a non-finite loss or gradient; stopping"
            last = (checkpoints(cfg.out_dir) or ["none"])[-1]
            sys.exit(f"error: {message}. Last good checkpoint: {last}")
        # A signal to any rank stops every rank, after the same step.
        signal_number = int(sum_over_ranks(torch.tensor(stop["signal"]), dist.ReduceOp.MAX))
        due = step % cfg.save_every == 0 or step == num_steps
        if due and not bad_in_a_row or signal_number:
            save_checkpoint(step, cursor, model, tokenizer, optimizer, scheduler, cfg)
            if rank == 0:
                plot_metrics(metrics_path, os.path.join(cfg.out_dir, "metrics.png"))
        if signal_number:
            name = signal.Signals(signal_number).name
            tqdm.write(f"{name}: saved step {step}; continue with --resume", file=sys.stderr)
            sys.exit(128 + signal_number)
    if rank == 0:
        last = (checkpoints(cfg.out_dir) or ["none"])[-1]
        print(f"done: {num_steps} steps, last checkpoint {last}")


def load_models(cfg, resume_from):
    """The policy (from resume_from, else cfg.model; under LoRA with its adapters added), the
    reference model (None without KL, and under LoRA: the policy, adapters off) and tokenizer."""
    # Under LoRA a resumed run loads the base model; load_trainer_state then loads its adapters.
    name = resume_from if resume_from and not cfg.lora_rank else cfg.model
    dtype = torch.bfloat16 if cfg.bf16_weights else torch.float32
    model, tokenizer = load_policy(name, cfg.device, dtype)
    ref_model = None
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    elif cfg.kl_coef > 0:
        ref_dtype = torch.bfloat16 if cfg.bf16 else dtype
        ref_model = load_policy(cfg.model, cfg.device, ref_dtype)[0].requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model, ref_model, tokenizer


# ==== What extends the step: DAPO's refill, the shared-prompt forward, more than one GPU


def refill_groups(rollout, model, tokenizer, problems, cursor, cfg):
    """DAPO's dynamic sampling (arXiv 2503.14476, Algorithm 1): more rounds of steps 1 and 2, at
    most max_refill_rounds, until P groups have a signal. Returns (rollout, cursor, rounds)."""
    P = cfg.prompts_per_step
    rounds = [rollout]
    while len(rounds) <= cfg.max_refill_rounds:
        if has_signal(rollout.rewards.view(-1, cfg.group_size)).sum() >= P:
            break
        batch = problems_at(problems, cursor, P, cfg.seed)
        cursor += P
        rounds.append(sample_groups(model, tokenizer, batch, cfg))
        rollout = concat_rollouts(rounds)
    return rollout, cursor, len(rounds)


def prefill_prompts(model, ids, mask, n):
    """The KV cache of the prompts ids (p, Lp), left-padded (mask (p, Lp)), all but each one's last
    token, repeated n times (p * n rows): generate runs only what its cache lacks, so a prompt runs
    once, not n times. SmolLM2-135M on one CPU thread, 8 prompts x 8, 48 tokens: sampling takes
    22.7 s of CPU time with it, 29.2 s without."""
    cache = DynamicCache(config=model.config)
    if ids.shape[1] > 1:
        pos = positions(mask)[:, :-1]
        mask = mask[:, :-1]
        # The decoder alone: the cache is all that is wanted, no logits.
        model.base_model(ids[:, :-1], attention_mask=mask, position_ids=pos, past_key_values=cache)
        cache.batch_repeat_interleave(n)
    return cache


def shared_prompt_logits(model, prompt_ids, prompt, prompt_mask, completion, mask):
    """completion_logprobs' logits (m, T, V) from its tensors, each distinct prompt run once and
    its KV cache indexed out to its completions. Gradients flow through the cache: the same ones."""
    # Each row's prompt among the distinct ones, and the first row of each distinct prompt.
    distinct = {}
    index = [distinct.setdefault(tuple(p), len(distinct)) for p in prompt_ids]
    first = [index.index(k) for k in range(len(distinct))]
    cache = DynamicCache(config=model.config)
    out = model(
        prompt[first],
        attention_mask=prompt_mask[first],
        position_ids=positions(prompt_mask[first]),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    # (u, ...) -> (m, ...): differentiable indexing.
    index = torch.tensor(index, device=prompt.device)
    cache.batch_select_indices(index)
    position_ids = positions(mask)[:, prompt.shape[1] :]  # (m, T), as in the unshared forward
    rest = model(completion, attention_mask=mask, position_ids=position_ids, past_key_values=cache)
    return torch.cat([out.logits[index], rest.logits[:, :-1]], dim=1)


# ---- More than one GPU: torchrun starts one process (rank) per GPU, each running this file. Every
# rank holds the whole rollout, runs its share of the groups, and sums over the ranks make the
# update one process's (TRL #2881, prime-rl #600).


def start_distributed(cfg):
    """Under torchrun: join the process group, NCCL on CUDA with each rank on its LOCAL_RANK's GPU
    ("cuda" is then that GPU), gloo on CPU. Without torchrun (no WORLD_SIZE) nothing runs."""
    if "WORLD_SIZE" not in os.environ:
        return
    if cfg.device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")


def world():
    """(rank, world size): (0, 1) in a single process."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def rank_share(batch):
    """This rank's contiguous share of a list (of problems): the whole list in one process."""
    rank, world_size = world()
    return batch[rank * len(batch) // world_size : (rank + 1) * len(batch) // world_size]


def rank_sequences(idx, num_sequences, group_size):
    """The sequences of idx that this rank runs: those of its share of the groups (rank_share)."""
    groups = rank_share(range(num_sequences // group_size))
    return [i for i in idx if i // group_size in groups]


def gather_rollouts(rollout):
    """Every rank's Rollout (steps 1 and 2), concatenated in rank order: the same on every rank."""
    if not dist.is_initialized():
        return rollout
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rollout)
    return concat_rollouts(parts)


def concat_rollouts(parts):
    """The sequences of Rollouts (steps 1 and 2 filled in), one after the other."""
    return Rollout(
        prompt_ids=[ids for part in parts for ids in part.prompt_ids],
        completion_ids=[ids for part in parts for ids in part.completion_ids],
        truncated=torch.cat([part.truncated for part in parts]),
        rewards=torch.cat([part.rewards for part in parts]),
        checks={key: torch.cat([part.checks[key] for part in parts]) for key in parts[0].checks},
    )


def sum_gradients_over_ranks(model):
    """Sum .grad over the ranks, one all-reduce per parameter. A sum, not DDP's mean: each rank's
    loss already carries the whole step's normaliser."""
    for p in model.parameters():
        if p.requires_grad and dist.is_initialized():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def sum_over_ranks(tensor, op=dist.ReduceOp.SUM):
    """tensor summed over the ranks (or reduced by op), on the CPU; as it is in one process."""
    if not dist.is_initialized():
        return tensor
    tensor = tensor.to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op)
    return tensor.cpu()


# ==== Token batches (not RL): padding, positions, where a completion ends


def pad(sequences, device, side="right"):
    """Token ids (m, longest), 0-padded on `side`, and the (m, longest) mask of the real ones."""
    tensors = [torch.tensor(s, dtype=torch.long) for s in sequences]
    ids = torch.nn.utils.rnn.pad_sequence(tensors, True, padding_value=-1, padding_side=side)
    return ids.clamp(min=0).to(device), (ids >= 0).to(device)


def positions(mask):
    """Position ids (m, L) of left-padded rows: 0 at each row's first real token."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def completion_length(tokens, eos, tokenizer, stop):
    """Tokens up to and including the first EOS, or to the end of an earlier stop string (searched
    before the first EOS only: generate pads a row that stopped on a string, and pad may be EOS)."""
    n = next((t + 1 for t, token in enumerate(tokens) if token in eos), len(tokens))
    # Back over the padding, to the shortest prefix that holds the stop string.
    while stop and n > 1 and any(s in tokenizer.decode(tokens[: n - 1]) for s in stop):
        n -= 1
    return n


# ==== Checking the inputs (not RL): the flags, the data, the model, the output folder


def check_config(cfg):
    """ValueError naming the flag for the first setting out of range or contradicting another."""
    for field in dataclasses.fields(cfg):
        low = field.metadata["at_least"]
        if low is not None and getattr(cfg, field.name) < low:
            raise ValueError(f"--{field.name.replace('_', '-')} must be at least {low}")
    needs_group = cfg.advantage in ("group", "leave-one-out") or cfg.std_norm == "group"
    if needs_group and cfg.group_size < 2:
        message = f"--group-size {cfg.group_size}: a group baseline needs at least 2 completions"
        raise ValueError(message)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.prompts_per_step % world_size:
        message = f"--prompts-per-step {cfg.prompts_per_step}: not divisible by {world_size} ranks"
        raise ValueError(message)
    rollout = cfg.prompts_per_step * cfg.group_size
    if rollout % cfg.mini_batches or rollout // cfg.mini_batches % cfg.micro_batch_size:
        sizes = f"--mini-batches {cfg.mini_batches} and --micro-batch-size {cfg.micro_batch_size}"
        raise ValueError(f"{sizes} must divide the rollout batch of {rollout} sequences evenly")
    if not 0 <= cfg.eps_low <= 1 or not 0 < cfg.top_p <= 1:
        raise ValueError("--eps-low must be in [0, 1] and --top-p in (0, 1]")
    # Log-probs divide the logits by T: greedy decoding (T = 0, eval.py's) has none to train on.
    if not 0 < cfg.temperature < math.inf:
        why = "log-probs divide the logits by T, which must be finite and above 0"
        raise ValueError(f"--temperature {cfg.temperature:g}: {why}")
    if cfg.dynamic_sampling and not cfg.drop_equal_groups:
        message = "--dynamic-sampling refills the groups that --drop-equal-groups drops: set both"
        raise ValueError(message)


def check_inputs(cfg):
    """The problems and the checkpoint to resume from (or None), once every input is checked: the
    data, the model, the output folder and, on --resume, the run's flags and newest checkpoint.
    Bad input exits with status 2, writing nothing."""
    try:
        problems = load_problems(cfg.train_data, cfg.num_problems, cfg.seed, cfg.skip_bad_rows)
        found = checkpoints(cfg.out_dir)
        if not cfg.resume and (found or os.path.exists(os.path.join(cfg.out_dir, "metrics.jsonl"))):
            raise FileExistsError(f"--out-dir {cfg.out_dir} holds a run; pass --resume or another")
        check_model(cfg.model)
        resume_from = None
        if cfg.resume and found:
            check_resumed_flags(cfg)
            resume_from = readable_checkpoint(found)
    except (DataError, FileExistsError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if cfg.resume and not found:
        print(f"--resume: no checkpoint in {cfg.out_dir} yet, starting at step 0", file=sys.stderr)
    return problems, resume_from


# What --resume may change: how long the run goes, how often and where it saves, and the machine
# (device, precision, memory, speed). The rest defines what is trained and must match config.json.
MAY_CHANGE_ON_RESUME = """steps save_every keep_last max_bad_steps out_dir resume device bf16
gen_batch_size micro_batch_size share_prompt gradient_checkpointing grader_timeout""".split()


def check_resumed_flags(cfg):
    """CheckpointError listing each flag that differs from the run's config.json with both values,
    but those in MAY_CHANGE_ON_RESUME: a run trains to the end with what it began with."""
    path = os.path.join(cfg.out_dir, "config.json")
    try:
        with open(path) as f:
            began = json.load(f)
    except (OSError, ValueError) as e:
        reason = f"cannot be read ({e}); --resume checks the flags against it"
        raise CheckpointError(f"{path}: {reason}") from None
    changed = []
    for name, value in dataclasses.asdict(cfg).items():
        if name not in MAY_CHANGE_ON_RESUME and began.get(name) != value:
            changed.append(f"--{name.replace('_', '-')} {value} (the run's: {began.get(name)})")
    if changed:
        why = "these define what is trained; a new --out-dir starts a new run"
        raise CheckpointError(f"--resume with {', '.join(changed)} against {path}: {why}")


def readable_checkpoint(found):
    """The newest of the checkpoint folders found (oldest first), once its trainer state reads as
    data (read_trainer_state). CheckpointError if it does not, naming it and the newest readable
    one before it, with the commands that continue from there; nothing is deleted."""
    unreadable = {}  # folder: why, newest first
    for folder in reversed(found):
        try:
            read_trainer_state(folder, mmap=True)
        except CheckpointError as e:
            unreadable[folder] = str(e)
            continue
        if not unreadable:
            return folder
        aside = shlex.quote(os.path.join(os.path.dirname(folder), "unreadable"))
        moves = f"mkdir -p {aside} && mv {' '.join(map(shlex.quote, unreadable))} {aside}"
        advice = f"to continue from it: {moves}, then --resume again"
        raise CheckpointError(
            f"{unreadable[found[-1]]}. The newest readable checkpoint is {folder}; {advice}"
        )
    why = "No checkpoint before it reads: start anew in another --out-dir"
    raise CheckpointError(f"{unreadable[found[-1]]}. {why}")


# ==== Data (not RL): problems with gold answers, from a JSONL file or a hub dataset, as prompts


class DataError(ValueError):
    """Bad input data: the message names the file, line and field."""


HUB_DATASETS = {
    "gsm8k": ("openai/gsm8k", "main", "train"),
    "math": ("DigitalLearningGmbH/MATH-lighteval", "default", "train"),
}


def read_rows(source, hub=HUB_DATASETS):
    """[(where, row)] of a JSONL file ("path:line") or of a dataset named in hub ("repo[i]").
    DataError for a missing or empty file, a line that is not JSON, a hub set that fails to load."""
    if source in hub:
        repo, config, split = hub[source]
        # No `datasets`, offline, refused: one line instead of a stack trace.
        try:
            import datasets

            rows = datasets.load_dataset(repo, config, split=split)
        except Exception as e:
            message = f"{source}: could not load {repo} from the hub ({type(e).__name__}: {e})"
            raise DataError(message + "; pass a JSONL path instead") from None
        return [(f"{repo}[{i}]", dict(row)) for i, row in enumerate(rows)]
    if not os.path.isfile(source):
        raise DataError(f"{source}: no such file (and not one of the hub names {sorted(hub)})")
    rows = []
    with open(source, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{source}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                message = f"{source}:{n}: not valid JSON ({e.msg} at column {e.colno})"
                raise DataError(message) from None
    if not rows:
        raise DataError(f"{source}: file is empty")
    return rows


def question_text(row):
    """The problem statement of a row (field question, problem or input), or None."""
    texts = [row[k] for k in ("question", "problem", "input") if isinstance(row.get(k), str)]
    return next((text for text in texts if text.strip()), None)


def gold_answer(row):
    """The gold final answer of a row as a string, or None: `answer` (for GSM8K what follows
    '#### ', commas dropped), else the last \\boxed{} of `solution` (MATH)."""
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(answer)
    if isinstance(answer, str) and "####" in answer:
        return answer.split("####")[-1].strip().replace(",", "")
    if isinstance(answer, str) and answer.strip():
        return answer.strip()
    if isinstance(row.get("solution"), str):
        return extract_answer(row["solution"])
    return None


def load_problems(
    source, num_problems=0, seed=0, skip_bad_rows=False, hub=HUB_DATASETS, gold=gold_answer
):
    """Problems [{"question": str, "answer": str}] of read_rows(source, hub), answers by gold(row):
    a seeded subset of num_problems (0 = all, in order). DataError names the file, line and field
    of a row without question or gold answer (skip_bad_rows: skipped), or a source without any."""
    problems = []
    skipped = 0
    for where, row in read_rows(source, hub):
        question = question_text(row) if isinstance(row, dict) else None
        answer = gold(row) if question is not None else None
        if answer is not None:
            problems.append({"question": question, "answer": answer})
        elif skip_bad_rows:
            skipped += 1
        elif not isinstance(row, dict):
            raise DataError(f"{where}: row is not a JSON object")
        elif question is None:
            raise DataError(f"{where}: no question field (question/problem/input)")
        else:
            fields = "answer, final_answer, or solution with \\boxed{}"
            raise DataError(f"{where}: no gold answer ({fields})")
    if not problems:
        raise DataError(f"{source}: no usable problems ({skipped} rows skipped)")
    if skipped:
        print(f"skipped {skipped} rows without question or gold answer: {source}", file=sys.stderr)
    if 0 < num_problems < len(problems):
        return random.Random(seed).sample(problems, num_problems)
    return problems


def problems_at(problems, start, count, seed):
    """The `count` problems at positions start, start + 1, ... of the data order: the problems
    shuffled afresh every epoch, by a seeded shuffle."""
    orders = {}
    out = []
    for position in range(start, start + count):
        epoch, i = divmod(position, len(problems))
        if epoch not in orders:
            shuffle = random.Random(seed * 7919 + epoch)
            orders[epoch] = shuffle.sample(range(len(problems)), len(problems))
        out.append(problems[orders[epoch][i]])
    return out


# ---- Prompts: a problem as the model is asked it

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# The qwen_math template is the one of Dr. GRPO's evaluation; r1 is DeepSeek-R1-Zero's.
TEMPLATE_TEXT = {
    "qwen_math": (
        "<|im_start|>system\n" + BOXED_INSTRUCTION + "<|im_end|>\n"
        "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    ),
    "r1": (
        "A conversation between User and Assistant. The User asks a question, and the Assistant "
        "solves it. The Assistant first thinks about the reasoning process in the mind and then "
        "provides the User with the answer. The reasoning process is enclosed within <think> "
        "</think> and answer is enclosed within <answer> </answer> tags, respectively, i.e., "
        "<think> reasoning process here </think> <answer> answer here </answer>.\nUser: {question}"
        "\nAssistant: <think>"
    ),
    "none": "{question}",
}
# What ends a completion besides EOS, per template.
STOP_STRINGS = {"r1": ["</answer>"]}


def build_prompt(tokenizer, question, template):
    """The prompt text of one question. chat: the tokenizer's chat template, with the question and
    BOXED_INSTRUCTION as the user's turn; the others fill TEMPLATE_TEXT, with the BOS token if the
    tokenizer adds one (sample() tokenizes without special tokens)."""
    if template == "chat":
        messages = [{"role": "user", "content": question + "\n" + BOXED_INSTRUCTION}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Not str.format(): \boxed{} has braces.
    text = TEMPLATE_TEXT[template].replace("{question}", question)
    if tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]:
        return tokenizer.bos_token + text
    return text


# ==== Model loading and LoRA (not RL)


def check_model(name):
    """FileNotFoundError unless name is a local file or folder, or a hub id that is cached or that
    the hub answers for: one request, no retries, so that offline it fails at once."""
    if os.path.exists(name):
        return
    # A typo, offline, a private model: say which, in one line.
    try:
        if huggingface_hub.try_to_load_from_cache(name, "config.json") is None:
            huggingface_hub.model_info(name, timeout=10)
    except Exception as e:
        reason = f"no such file or folder, nor a hub model ({type(e).__name__}: {e})"
        raise FileNotFoundError(f"--model {name}: {reason}".splitlines()[0]) from None


def load_policy(name, device, dtype=torch.float32):
    """(model, tokenizer) from a Hugging Face folder, a hub id or a .gguf file (de-quantized: an
    ordinary checkpoint is saved), or FileNotFoundError (check_model). The tokenizer pads on the
    left, EOS if it has no pad. Dropout is off: log-prob passes would disagree (TRL #3500)."""
    check_model(name)
    folder = name
    gguf = None
    if name.endswith(".gguf"):
        folder, gguf = os.path.split(os.path.abspath(name))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype)
    if gguf:
        model.config.__dict__.pop("quantization_config", None)
        plain = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
        plain.load_state_dict(model.state_dict())
        plain.generation_config = model.generation_config
        model = plain
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    # Attention layers copy attention_dropout from the config when they are built.
    for module in [model.config, *model.modules()]:
        for key in ("attention_dropout", "hidden_dropout", "dropout", "p"):
            if isinstance(getattr(module, key, None), float):
                setattr(module, key, 0.0)
    return model.to(device), tokenizer


class LoRALinear(torch.nn.Linear):
    """y = W x + (alpha / r) B A x with W frozen, A (r, in) random and B (out, r) zero: before the
    first update the model is exactly the base model (LoRA, Hu et al. 2021, arXiv 2106.09685)."""

    # One switch for every adapter: off, the policy is its base model, the reference model.
    enabled = True

    def __init__(self, base, rank, alpha):
        super().__init__(base.in_features, base.out_features, base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.scale = alpha / rank
        self.lora_A = torch.nn.Parameter(torch.empty(rank, base.in_features).to(base.weight))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank).to(base.weight))
        # nn.Linear's own initialisation, as peft does.
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        """The frozen projection plus, while adapters are enabled, the scaled low-rank update."""
        y = super().forward(x)
        if not LoRALinear.enabled:
            return y
        return y + self.scale * (x @ self.lora_A.t() @ self.lora_B.t())


@contextlib.contextmanager
def lora_adapters_off():
    """Within the block every LoRA adapter is off: the policy is its base model, the reference
    model. They are back on after it, even if the block raises."""
    LoRALinear.enabled = False
    try:
        yield
    finally:
        LoRALinear.enabled = True


def add_lora(model, rank, alpha):
    """Freeze every weight and wrap each attention and MLP projection in a LoRALinear, in place."""
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        if child in LORA_TARGETS and isinstance(module, torch.nn.Linear):
            setattr(model.get_submodule(parent), child, LoRALinear(module, rank, alpha))


def merged_state_dict(model):
    """The model's weights under the base model's names, each adapter merged: W + (alpha/r) B A."""
    merged = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            merged[f"{name}.weight"] = module.weight + module.scale * module.lora_B @ module.lora_A
    return {k: merged.get(k, v).detach() for k, v in model.state_dict().items() if "lora_" not in k}


# ==== Checkpoints, logs, plots, signals (not RL)


def checkpoints(out_dir):
    """The complete checkpoint folders step_XXXXXX in out_dir, oldest first."""
    states = glob.glob(os.path.join(out_dir, "step_*", "trainer_state.pt"))
    return sorted(os.path.dirname(f) for f in states)


def save_checkpoint(step, cursor, model, tokenizer, optimizer, scheduler, cfg):
    """Write <out_dir>/step_XXXXXX on rank 0 (the others wait): a Hugging Face checkpoint, LoRA
    merged, and trainer_state.pt for an exact resume, in a temporary folder renamed into place, so
    that a kill keeps the last checkpoint; then keep the newest --keep-last."""
    if world()[0] == 0:
        final = os.path.join(cfg.out_dir, f"step_{step:06d}")
        tmp = os.path.join(cfg.out_dir, f".tmp_step_{step:06d}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=merged_state_dict(model))
        tokenizer.save_pretrained(tmp)
        adapters = {k: v for k, v in model.state_dict().items() if k.endswith(("lora_A", "lora_B"))}
        state = {"step": step, "cursor": cursor, "adapters": adapters}
        state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        # Old checkpoints are first renamed out of the listing, then deleted.
        if cfg.keep_last:
            for old in checkpoints(cfg.out_dir)[: -cfg.keep_last]:
                doomed = os.path.join(cfg.out_dir, ".del_" + os.path.basename(old))
                os.replace(old, doomed)
                shutil.rmtree(doomed)
    if dist.is_initialized():
        dist.barrier()


def load_trainer_state(folder, model, optimizer, scheduler):
    """Restore optimizer, scheduler and LoRA adapters from a checkpoint folder (read_trainer_state).
    Returns its step and data cursor; (0, 0) without one."""
    if folder is None:
        return 0, 0
    state = read_trainer_state(folder)
    model.load_state_dict(state["adapters"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    print(f"resumed from {folder} at step {state['step']}")
    return state["step"], state["cursor"]


class CheckpointError(ValueError):
    """A run folder --resume cannot continue: the message names the file and what to do."""


def read_trainer_state(folder, mmap=False):
    """<folder>/trainer_state.pt (step, cursor, adapters, optimizer, scheduler), read as data only:
    a file that pickles code is refused before any of it runs. mmap: map the tensors, not read
    them (a cheap check). CheckpointError, naming the file, if it is refused or damaged."""
    path = os.path.join(folder, "trainer_state.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        what = re.search(r"GLOBAL \S+", str(e))
        holds = what.group() if what else "Python objects"
        refused = f"{path}: refused, it pickles {holds}, not data; none of it ran"
        raise CheckpointError(refused) from None
    except Exception as e:
        reason = str(e).splitlines()[0]
        raise CheckpointError(f"{path}: cannot be read, truncated or damaged ({reason})") from None


def start_log(metrics_path, start_step, cfg):
    """Create the run's folder, keep an earlier metrics.jsonl's steps up to start_step (the others
    run again), write config.json and print it."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            kept = [row for row in f if row.strip() and json.loads(row)["step"] <= start_step]
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics_path + ".tmp", metrics_path)
    # A resumed run keeps the config.json it began with, and logs the flags that may change.
    if start_step == 0:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    else:
        resumed = {name: getattr(cfg, name) for name in MAY_CHANGE_ON_RESUME}
        with open(os.path.join(cfg.out_dir, "resumes.jsonl"), "a") as f:
            f.write(json.dumps({"step": start_step, **resumed}) + "\n")
    print(json.dumps(dataclasses.asdict(cfg)))


def log_metrics(metrics_path, metrics):
    """Append the step's metrics to metrics.jsonl and print its headline numbers."""
    with open(metrics_path, "a") as f:
        f.write(json.dumps(metrics) + "\n")
    keys = ("reward_mean", "accuracy", "loss", "kl", "grad_norm", "len_mean")
    shown = [f"{k}={metrics[k]:.4g}" for k in keys if metrics.get(k) is not None]
    tqdm.write(f"step={metrics['step']} " + " ".join(shown))


def rollout_metrics(rollout, cfg, model):
    """What a step's rollout shows of learning, and the peak memory so far (GiB)."""
    checks = rollout.checks
    correct = checks["correct"]
    lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)
    memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak resident, from KiB
    if model.device.type == "cuda":
        memory = torch.cuda.max_memory_allocated()
    return {
        "reward_mean": mean(rollout.rewards),
        "accuracy": mean(correct),
        "format_rate": mean(checks["formatted"]),
        "no_answer_rate": 1 - mean(checks["answered"]),
        "grader_timeouts": int(checks["timeout"].sum()),
        "grader_errors": int(checks["error"].sum()),
        "len_mean": mean(lengths),
        "len_correct": mean(lengths[correct]),
        "len_incorrect": mean(lengths[~correct]),
        "truncated_frac": mean(rollout.truncated),
        "kept_frac": rollout.keep.sum().item() / (cfg.prompts_per_step * cfg.group_size),
        "equal_group_frac": mean(~has_signal(rollout.rewards.view(-1, cfg.group_size))),
        "groups_sampled": len(lengths) // cfg.group_size,
        "tokens": int(lengths.sum()),
        "peak_memory_gb": memory / 2**30,
    }


def mean(values):
    """The mean of a tensor as a float, None if it is empty."""
    return values.float().mean().item() if values.numel() else None


# The per-token statistics of an optimizer step, logged as means over its tokens.
TOKEN_STATS = ("kl", "entropy", "ratio_mean", "clip_low_frac", "clip_high_frac")


def clipped(ratio, advantages, cfg):
    """Where the clip acts, (m, T) bool each side, of ratios (m, T), advantages (m,): below 1 -
    eps_low with A < 0, above 1 + eps_high with A > 0, the tokens whose gradient the min zeroes;
    CISPO clips its weight on either side whatever A; pg and nll have no clip."""
    A = advantages.unsqueeze(1)  # (m, 1)
    low = ratio < 1 - cfg.eps_low
    high = ratio > 1 + cfg.eps_high
    if cfg.surrogate == "clip":
        low &= A < 0
        high &= A > 0
    if cfg.surrogate in ("pg", "nll"):
        return torch.zeros_like(low), torch.zeros_like(high)
    return low, high


class StepStats:
    """The statistics of one optimizer step, summed over its micro-batches and over the ranks: the
    loss and pg_loss as aggregated, the ratio's min and max, the others means over tokens."""

    def __init__(self):
        self.sums = dict.fromkeys(("loss", "pg_loss", "tokens", *TOKEN_STATS), 0.0)
        self.extremes = torch.full((2,), -math.inf)  # the ratio's -min and max, reduced by one max

    def add(self, loss, token_stats, entropy, weights, mask, advantages, cfg):
        """One micro-batch: its step_loss, token_loss's parts, the entropy (m, T), the sequences'
        weights and advantages (m,), the mask (m, T)."""
        ratio = token_stats["ratio"]
        low, high = clipped(ratio, advantages, cfg)
        values = {"entropy": entropy, "ratio_mean": ratio, "kl": token_stats.get("kl")}
        values.update(clip_low_frac=low.float(), clip_high_frac=high.float())
        self.sums["loss"] += loss.item()
        self.sums["pg_loss"] += step_loss(token_stats["pg_loss"], weights, mask).item()
        self.sums["tokens"] += mask.sum().item()
        for key, value in values.items():
            if value is not None:
                self.sums[key] += value[mask].sum().item()
        ratio = ratio[mask]
        self.extremes = torch.maximum(self.extremes, torch.stack([-ratio.min(), ratio.max()]).cpu())

    def result(self):
        """The step's statistics, the same on every rank."""
        totals = sum_over_ranks(torch.tensor(list(self.sums.values()), dtype=torch.float64))
        sums = dict(zip(self.sums, totals.tolist(), strict=True))
        low, high = sum_over_ranks(self.extremes, dist.ReduceOp.MAX).tolist()
        stats = {key: sums[key] / sums["tokens"] for key in TOKEN_STATS}
        stats.update(loss=sums["loss"], pg_loss=sums["pg_loss"], ratio_min=-low, ratio_max=high)
        stats["clip_frac"] = stats["clip_low_frac"] + stats["clip_high_frac"]
        return stats


def plot_metrics(metrics_path, png_path):
    """Reward, accuracy, lengths, KL, entropy and clip fraction against step, into a PNG."""
    # matplotlib's Figure, not pyplot: no GUI backend, no global figure state.
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    panels = ["reward_mean accuracy", "len_correct len_incorrect", "kl", "entropy", "clip_frac"]
    fig = Figure(figsize=(4 * len(panels), 3.2), layout="tight")
    for ax, keys in zip(fig.subplots(1, len(panels)), panels, strict=True):
        for key in keys.split():
            shown = [r for r in rows if r.get(key) is not None]
            ax.plot([r["step"] for r in shown], [r[key] for r in shown], label=key)
        ax.set_xlabel("step")
        ax.legend()
    fig.savefig(png_path, dpi=100)


def install_signal_handlers():
    """SIGINT and SIGTERM set stop["signal"]: the loop saves a checkpoint after the step and exits
    with status 128 + signal. A second signal aborts at once, except under torchrun: it repeats
    the terminal's signal, and kills the ranks itself after its --shutdown-timeout."""
    stop = {"signal": 0}

    def handler(number, frame):
        if stop["signal"] and not dist.is_initialized():
            raise KeyboardInterrupt
        if not stop["signal"]:
            stop["signal"] = number
            message = f"\n{signal.Signals(number).name}: finishing this step, then saving\n"
            os.write(2, message.encode())

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


# ==== Answer checking (not RL): extract the final answer, decide equality with sympy
# Answers become plain text, compared in a worker process bounded in time (signal.alarm fails off
# the main thread, verl #5635). Extraction reads the last MAX_TEXT_CHARS of a completion.
MAX_TEXT_CHARS = 100_000
# Longer answers are compared as text; REL_TOL applies to numbers written with a decimal point.
MAX_ANSWER_CHARS = 1000
REL_TOL = Fraction(1, 10**6)
# Math in a text: $..$, \(..\), \[..\], a command and its argument (hidden to find words).
_MATH = r"\$[^$]*\$|\\\(.*?\\\)|\\\[.*?\\\]|\\[A-Za-z]+(?:\{[^{}]*\})?"

# ---- Extraction of the final answer of a completion


def _boxes(text):
    """Yield (start, end, content) of text's nonempty boxes; content None for a box left open."""
    # The index of the closing brace of each opening one, in one pass.
    closing = {}
    opened = []
    for brace in re.finditer(r"[{}]", text):
        if brace[0] == "{":
            opened.append(brace.start())
        elif opened:
            closing[opened.pop()] = brace.start()
    for match in re.finditer(r"\\(?:boxed|fbox)\b\s*", text):
        after = match.end()
        # A box {..}, content None if it is left open, or `\boxed 7`: one token.
        end = closing.get(after, after) + 1
        content = text[after + 1 : end - 1].strip() if after in closing else None
        if text[after : after + 1] != "{":
            content = re.match(r"[^\s$]*", text[after : after + 100])[0].rstrip(".")
            end = after + len(content)
        if content != "":
            yield match.start(), end, content


def _joins_boxes(gap):
    """True if gap, between two boxes, has no words but a label (`y_2 =`) or a few with and/or."""
    if len(gap) > 200 or "$$" in gap or "\n\n" in gap:
        return False
    noise = r"\\(?:text|mbox)\s*\{|\\q?quad|\\[()\[\],;:! ]|[{}$,;]"
    label = r"[A-Za-z](?:_\{?\w+\}?)?(?:\(\w*\))?\s*=[\s$\\(]*$"
    words = re.sub(f"{noise}|{label}", " ", gap).split()
    joined = re.fullmatch(r"(?=.*\b(?:and|or)\b)[A-Za-z() ]+", " ".join(words))
    return not words or (len(words) < 6 and joined is not None)


def _final_box(text):
    """(start, answer) of the last box and those it joins ("2, 3"; 28 or 28_9: "28_9"), or None."""
    boxes = list(_boxes(text))
    if not boxes:
        return None
    start, _, answer = boxes[-1]
    if answer is None:
        return start, None
    answers = [answer]
    for earlier_start, earlier_end, earlier_answer in reversed(boxes[-21:-1]):
        if earlier_answer is None or not _joins_boxes(text[earlier_end:start]):
            break
        answers.insert(0, earlier_answer)
        start = earlier_start
    pairs = zip(answers, answers[1:] + [""], strict=True)
    distinct = [a for a, b in pairs if not answers_equal(a, b, timeout=0.5)[0]]
    return start, ", ".join(dict.fromkeys(distinct))


def _phrase_answer(rest):
    """The answer (or None) at the start of rest, the text after "answer is", up to its words."""
    answer = re.split(r"\.?\s*I hope|<\||\n", rest.strip()[:MAX_ANSWER_CHARS], maxsplit=1)[0]
    answer = re.sub(r'^\s*\\?"|\\?"\s*$', "", answer.replace("**", "")).strip()
    hidden = re.sub(_MATH, lambda match: "~" * len(match[0]), answer)
    first_word = re.search(rf"\b(?!(?:and|or|percent|{'|'.join(_KNOWN)})\b)[A-Za-z]{{2,}}", hidden)
    # "$\frac{1}{2}$ since half are red" -> "\frac{1}{2}", "5, not 6" -> "5"
    if first_word and re.search(r"[\d~]", hidden[: first_word.start()]):
        answer = answer[: first_word.start()]
    # "The volume of $ABCD$ is 120." -> "120", "yes, as 91 = 7*13" -> "yes": in the first clause
    elif first_word:
        clause = re.split(r"[,;:.](?:\s|$)", answer)[0]
        candidates = re.findall(r"\$[^$]*\$|-?\d[\d,]*(?:\.\d+)?", clause)
        answer = candidates[-1] if candidates else clause
    answer = answer.strip(" $,;:").rstrip(".").strip(" $")
    return answer if answer and not re.search(r"\\(?:boxed|fbox)", answer) else None


def extract_answer(text):
    """The final answer (str or None) of a completion: <answer>..</answer> (r1), the last
    box or a later "final answer is 12", `#### 72` (GSM8K), "Answer: x"; no last-number fallback."""
    text = (text or "")[-MAX_TEXT_CHARS:]
    if "<answer>" in text:
        inner = text[text.rfind("<answer>") + len("<answer>") :].split("</answer>")[0]
        boxed = _final_box(inner)
        return boxed[1] if boxed else inner.strip() or None
    phrases = list(re.finditer(r"(final )?answer\s*(?:is\s*:?|:)", text, re.I))
    phrase = phrases[-1] if phrases else None
    boxed = _final_box(text)
    if boxed and phrase and phrase[1] and phrase.start() > boxed[0]:
        later = _phrase_answer(text[phrase.end() :])
        if later and re.search(r"[\d\\]", later):
            return later
    if boxed:
        return boxed[1]
    hashes = re.findall(r"####\s*([^\n]+)", text)
    if hashes:
        return hashes[-1].strip() or None
    return _phrase_answer(text[phrase.end() :]) if phrase else None


# ---- LaTeX -> plain text: the names a formula may use, commands, then regex rewrites in order


def _matrix(match):
    """The tuple of tuples of a matched matrix: ((1,2),(3,4)); ((1,2)) and ((1),(2)) are (1,2)."""
    rows = [row.split("&") for row in match[1].split("\\\\") if row.strip()]
    return "(" + ",".join("(" + ",".join(row) + ")" for row in rows) + ")"


def _rewrite(rules, s, rounds=1):
    for _ in range(rounds):
        before = s
        for pattern, replacement in rules:
            s = re.sub(pattern, replacement, s, flags=re.S)
        if s == before:
            break
    return s


# What names mean; lamda is sympy's lambda; factorial and binomial stay unevaluated (capped later).
_FUNCTIONS = "sqrt exp log Abs floor ceiling sin cos tan sec csc cot sinh cosh tanh asin acos atan"
_GREEK = "alpha beta gamma delta epsilon zeta eta theta kappa lamda mu nu xi rho sigma tau phi chi"
_GREEK += " psi omega Gamma Delta Theta Lambda Pi Sigma Phi Omega hbar"
_NAMES = {"pi": sympy.pi, "e": sympy.E, "i": sympy.I, "oo": sympy.oo}
_NAMES.update({name: getattr(sympy, name) for name in _FUNCTIONS.split()})
_NAMES["factorial"] = functools.partial(sympy.factorial, evaluate=False)
_NAMES["binomial"] = functools.partial(sympy.binomial, evaluate=False)
# The names that may reach sympy's parser, besides those of one or two letters.
_KNOWN = set(_NAMES) | set(_GREEK.split())

# What LaTeX commands become (\pi -> pi, \cdot -> *); others stay: \frac for a rule, \cup to fail.
_COMMANDS = {
    **{name: f" {name} " for name in _KNOWN},
    **dict.fromkeys(["left", "right", "big", "Big", "bigl", "bigr", "Bigl", "Bigr", "limits"], " "),
    **dict.fromkeys(["displaystyle", "quad", "qquad", "circ", "degree", *",;:! "], " "),
    **dict(cdot="*", times="*", ast="*", div="/", pm="±", mp="±", approx="≈", prime="'"),
    **dict(le="<=", leq="<=", leqslant="<=", ge=">=", geq=">=", geqslant=">=", lt="<", gt=">"),
    **dict(ne="!=", neq="!=", infty=" oo ", ln=" log ", emptyset=r"\{\}", varnothing=r"\{\}"),
    **dict(vert="|", mid="|", lvert="|", rvert="|", langle="(", rangle=")", rfloor=")", rceil=")"),
    **{"in": "∈", "%": "%", "lambda": " lamda ", "lfloor": " floor(", "lceil": " ceiling("},
}

# Unicode math and its LaTeX, a character and its command in pairs: π -> \pi, ≤ -> \le.
_UNICODE_PAIRS = r"π\pi ∞\infty ≠\ne ≤\le ≥\ge ×\times ·\cdot ⋅\cdot ÷\div √\sqrt −- ∓\mp ∪\cup"
_UNICODE = dict(re.findall(r"(\S)(\S+)", _UNICODE_PAIRS + r" ∅\emptyset ²^2 ³^3 θ\theta λ\lambda"))

# Rewrites of whole LaTeX constructs, in order; the last one replaces the commands but \sqrt.
_REWRITES = [
    # (2, π/2) -> (2, \pi /2)
    (f"[{''.join(_UNICODE)}]", lambda match: f" {_UNICODE[match[0]]} "),
    # \frac {1} {2} -> \frac{1} {2}, \log _{10} -> \log_{10}: a command touches its arguments
    (r"(\\[A-Za-z]+)\s+(?=[{\[_^])", r"\1"),
    # 12^{\mathrm{th}} -> 12, 3rd -> 3
    (r"(\d)\^?(\{)?(?:\\(?:text|mathrm)\{)?(?:st|nd|rd|th)\}?(?(2)\})(?![A-Za-z])", r"\1"),
    # \begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix} -> (( 1 , 2 ),( 3 , 4 ))
    (r"\\begin\{ ?(?:\w?matrix|array\}\{[^{}]*) ?\}(.*?)\\end\{ ?(?:\w?matrix|array) ?\}", _matrix),
    # \\frac{1}{2} -> \frac{1}{2}
    (r"(?<!\\)\\\\(?=[a-zA-Z])", r"\\"),
    # 10{,}000 -> 10000, \frac{12}{5,\!525} -> \frac{12}{5525}
    (r"(?<=\d)(?:\s*\{\s*,\s*\}\s*|,\s*\\!\s*)(?=\d{3})", ""),
    # 45^{\circ} -> 45\circ, x^{\prime} -> x\prime (neither is a power), 45° -> 45
    (r"\^\s*\{?\s*(\\circ|\\prime)\s*\}?|°", r"\1 "),
    # 28 percent -> 28%
    (r"(\d)\s*(?:\\?%|percent(?:age)?\b|pct\b)", r"\1%"),
    # $\pi~$ -> " \pi  "
    (r"\\?\$|\\[()\[\]]|\b(?:np|math)\.|~", " "),
    # {1,3} -> 1,3
    (r"^\s*\{([^{}]*)\}\s*$", r"\1"),
    # \arcsin x -> " asin  x", \tan^{-1} x -> " atan  x"
    (r"\\?\barc(sin|cos|tan)|\\(sin|cos|tan)\s*\^\s*\{?\s*-1\s*\}?", r" a\1\2 "),
    # \dfrac{1}{2} -> \frac{1}{2}
    (r"\\[dtc]frac", r"\\frac"),
    # 1, 2, \ldots -> 1, 2, …
    (r"\.\.\.|\\[lc]?dots\b", "…"),
    # 1\frac{4}{5} -> (1+4/5) and 4 4/9 -> (4+4/9); one pair of the groups 2-5 is empty
    (
        r"(?<![\w.}^])(\d+)(?:\s*\\frac\{ ?(\d+) ?\}\{ ?(\d+) ?\}| (\d+)/(\d+)(?![\d.]))",
        r"(\1+\2\4/\3\5)",
    ),
    # \frac12 -> \frac{1}2
    (r"\\(frac|sqrt|binom)\s*(\w)", r"\\\1{\2}"),
    # \frac{1}2 -> \frac{1}{2}
    (r"(\\(?:frac|binom)\{[^{}]*\})\s*(\w)", r"\1{\2}"),
    # \log_2 8 -> " log(8,2)", (4, \log_{10}(2)) -> (4, log(2,10))
    (r"\\log\s*_\s*\{?\s*(\w+)\s*\}?\s*(?:\((\w+)\)|(\w+))", r" log(\2\3,\1)"),
    # \cdot \pi -> "*  pi "
    (r"\\(?!sqrt\b)([A-Za-z]+|[,;:! %])", lambda match: _COMMANDS.get(match[1], match[0])),
]

# A brace group with none inside (groups are rewritten innermost first), and \text{ and its kin.
_ARG = r"\{([^{}]*)\}"
_TEXT = r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm)\s*\{\s*"
# Rewrites of brace groups, repeated until none applies (50 rounds at most).
_GROUPS = [
    # \frac{1}{2} -> ((1)/(2))
    (rf"\\frac{_ARG}\s*{_ARG}", r"((\1)/(\2))"),
    # \binom{5}{2} -> " binomial(5,2)"
    (rf"\\binom{_ARG}\s*{_ARG}", r" binomial(\1,\2)"),
    # \sqrt[3]{8} -> ((8)**(1/(3)))
    (rf"\\sqrt\s*\[([^\[\]{{}}]*)\]\s*{_ARG}", r"((\2)**(1/(\1)))"),
    # \sqrt{2} -> " sqrt(2)", and \sqrt(2) too
    (rf"\\sqrt\s*(?:{_ARG}|\(([^()]*)\))", r" sqrt(\1\2)"),
    # 2 \text{ and } 3 -> "2 , 3"
    (_TEXT + r"(?:and|or|,)\s*\}", ","),
    # \text{x} = 5 -> x = 5
    (_TEXT + r"([A-Za-z])\s*\}", r"\1"),
    # 5\text{ cm} -> 5\x00cm\x01: words that _normalize drops next to math
    (_TEXT + r"([^{}]*?)\s*\}", "\x00\\1\x01"),
    # \vec{v} -> v
    (rf"\\(?:mathbf|mathit|operatorname|boldsymbol|dot|ddot|hat|bar|vec|tilde)\s*{_ARG}", r"\1"),
    # x_{n}t -> "x_n t"
    (rf"_\s*{_ARG}", lambda match: "_" + re.sub(r"\W", "", match[1]) + " "),
    # x^{2} -> x^(2), but \{1\} stays (a set)
    (rf"(?<![\\\w}}\]]){_ARG}", r"(\1)"),
]

# Functions that take an argument without parentheses, one factor of such an argument (x**2), an
# item of a list with balanced parentheses (1+sqrt(5)).
_APPLIED = r"(?:a?(?:sin|cos|tan)h?|sec|csc|cot|log|exp)\b"
_TERM = rf"(?!{_APPLIED})[\w.]+(?:\*\*(?:\([^()]*\)|[\w.]+))?"
_ITEM = r"(?:[^,{}()]|\([^()]*\))*"
# Rewrites of the plain text that is left, in order.
_CLEANUP = [
    # "1 \n 2" -> "1 2"
    (r"\s+", " "),
    # x^2 -> x**2
    (r"\^", "**"),
    # |-3| -> " Abs(-3) "
    (r"\|([^|]*)\|", r" Abs(\1) "),
    # f' -> f_p
    (r"([A-Za-z0-9)])'", r"\1_p"),
    # 1,000,000 -> 1000000
    (r"(?<![\d.,(\[])[1-9]\d{0,2}(?:,\d{3})+(?![\d,)\]])", lambda match: match[0].replace(",", "")),
    # 1 000 -> 1000
    (r"(\d) (?=\d{3}(?!\d))", r"\1"),
    # 1 or 2; 3 -> "1 , 2, 3"
    (r"\b(?:and|or)\b|;", ","),
    # sin x cos x -> sin(x) cos(x), sin**2 2x -> sin(2x)**2: an argument ends at an operator or name
    (rf"\b({_APPLIED}) ?(\*\* ?(?:\([^()]*\)|\w+))? ?({_TERM}(?: {_TERM})*)(?![\w(])", r"\1(\3)\2"),
    # λ ∈ (1,2) -> " (1,2)"
    (r"^ ?[A-Za-z]\w* ?∈", ""),
    # 12 square inches -> 12
    (rf"(?<=[\d)]) (?!(?:{'|'.join(_KNOWN)})\b)[A-Za-z][A-Za-z.]+(?: [A-Za-z][A-Za-z.]*)* ?$", ""),
    # x _1 + 2 -> x_1+2
    (r" ?([^\w ]) ?| (_)", r"\1\2"),
    # \{x|-1<x<1\} -> -1<x<1: a set given by a condition is the condition's solutions
    (r"^\\\{[A-Za-z]\w*(?:∈[^|:]*)?[|:](.+)\\\}$", r"\1"),
    # \{1±sqrt(5),-2\} -> \{1+sqrt(5),1-sqrt(5),-2\}: a ± b in a set or list is two answers
    (rf"(?<![^,{{])({_ITEM})±({_ITEM})(?=$|,|\\\}})", r"\1+\2,\1-\2"),
    # 5:8 -> (5/8), a ratio; a time 10:30 (1-2 digits, then 2) stays
    (r"(?<![\w.:])(?!\d\d?:\d\d(?![\w.:]))(\d+):(\d+)(?![\w.:])", r"(\1/\2)"),
]


@functools.lru_cache(maxsize=4096)
def _normalize(s):
    """The plain text of a LaTeX answer: \\frac{1}{2} -> ((1)/(2)), 5 \\text{ cm} -> 5. Cached."""
    s = _rewrite(_GROUPS, _rewrite(_REWRITES, s), rounds=50)
    # The words of \text{..} (and a square: cm^2) go next to anything else, else they stay.
    outside_text = re.sub(r"\x00[^\x00\x01]*\x01(?:_\w+|\^\(?[23]\)?)?", " ", s)
    if re.search(r"\w", outside_text):
        s = outside_text
    # \boxed{3:1.} -> "3:1": a sentence's period goes before the rules that read the end
    s = s.replace("\x00", "").replace("\x01", "").strip().rstrip(".,")
    return _rewrite(_CLEANUP, s).strip().rstrip(".,")


# ---- Structure: unions, sets, tuples and intervals, lists, relations; then single values

# Each relation operator, and the one that says the same with the sides swapped.
_FLIP = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "=": "=", "!=": "!="}


def _depths(s):
    """The bracket depth (of any kind) after each character of s: "(1)" -> [1, 1, 0]."""
    return list(itertools.accumulate((c in "([{") - (c in ")]}") for c in s))


def _split(s, separator=","):
    """The nonempty parts of s between separators outside brackets: "(1,2],3" -> ["(1,2]", "3"]."""
    cuts = [i for i, depth in enumerate(_depths(s)) if depth == 0 and s.startswith(separator, i)]
    starts = [0] + [cut + len(separator) for cut in cuts]
    parts = [s[start:end].strip() for start, end in zip(starts, cuts + [len(s)], strict=True)]
    return [part for part in parts if part]


def _interval(s):
    """The interval of an inequality in any variable, or None: x>3 -> (3,oo), 3<mu<=4 -> (3,4]."""
    parts = re.split(r"(<=|>=|<|>)", s)
    if len(parts) in (3, 5) and ">" in parts[1]:
        parts = [_FLIP.get(part, part) for part in reversed(parts)]
    variable = r"(?!(?:pi|e|i|oo)\b)[A-Za-z]+(?:_\w+)?(?:\([A-Za-z]\))?"
    if len(parts) == 3:
        parts = ["-oo", "<", *parts] if re.fullmatch(variable, parts[0]) else [*parts, "<", "oo"]
    if len(parts) != 5 or not re.fullmatch(variable, parts[2]) or ">" in parts[1] + parts[3]:
        return None
    left = "[" if parts[1] == "<=" else "("
    right = "]" if parts[3] == "<=" else ")"
    return f"{left}{parts[0]},{parts[4]}{right}"


def _shape(s):
    """(kind, items, brackets) of an answer: "union", "set", "tuple", "list" or "leaf"."""
    depths = _depths(s)
    # (1,2] or \{1\} is one bracket group, (1)(2) is not.
    one_group = len(s) > 2 and 0 not in depths[1:-1] and depths[-1] == 0
    if len(_split(s, r"\cup")) > 1:
        return "union", _split(s, r"\cup"), ""
    if s.startswith(r"\{") and s.endswith(r"\}") and one_group:
        return "set", _split(s[2:-2]), ""
    if s[:1] in "([" and s[-1:] in ")]" and one_group:
        items = _split(s[1:-1])
        return _shape(items[0]) if len(items) == 1 else ("tuple", items, s[0] + s[-1])
    if len(_split(s)) > 1:
        return "list", _split(s), ""
    interval = _interval(s)
    return _shape(interval) if interval else ("leaf", [s], "")


def _equal(pred, gold):
    """True if two normalised answers are equal: structure first, then part by part (the worker)."""
    # A decimal comma against a decimal point: 1,22 = 1.22.
    if re.fullmatch(r"-?\d+,\d+ -?\d*\.\d+|-?\d*\.\d+ -?\d+,\d+", f"{pred} {gold}"):
        return _equal(pred.replace(",", "."), gold.replace(",", "."))
    pred_kind, pred_items, pred_brackets = _shape(pred)
    gold_kind, gold_items, gold_brackets = _shape(gold)
    kinds = {pred_kind, gold_kind}
    if kinds == {"leaf"}:
        return pred_items[0] == gold_items[0] or _leaf_equal(pred_items[0], gold_items[0])
    # Tuples are ordered, also against a list (8, 4 is (8, 4)); (1,2] is not [1,2].
    if kinds == {"tuple"} and len(pred_items) == 2 and pred_brackets != gold_brackets:
        return False
    if kinds in ({"tuple"}, {"tuple", "list"}):
        return len(pred_items) == len(gold_items) and all(map(_equal, pred_items, gold_items))
    # (p, q) = (3, 2) against (3, 2); else sets, lists and unions (only against one) in any order.
    if kinds == {"tuple", "leaf"}:
        return len(_relation(pred if pred_kind == "leaf" else gold)) > 1 and _leaf_equal(pred, gold)
    same_kind = ("union" in kinds) == (kinds == {"union"})
    found = same_kind and all(any(_equal(x, y) for y in gold_items) for x in pred_items)
    return found and all(any(_equal(x, y) for x in pred_items) for y in gold_items)


def _relation(s):
    """[side, op, side, ...] of s; x = 1/3 ≈ 0.33 and 2/3 ≈ 0.67 drop the ≈ tail; x ≈ 11 is x=11."""
    parts = [part.strip() for part in re.split(r"(<=|>=|!=|<|>|=|≈)", s)]
    if "≈" in parts and ("=" in parts[: parts.index("≈")] or not re.search("[A-Za-z]", parts[0])):
        return parts[: parts.index("≈")]
    return ["=" if part == "≈" else part for part in parts]


def _leaf_equal(pred, gold):
    """True if single answers are equal: values (10% is 0.1), relations, 5 and x = 5 (not 2x=5)."""
    pred_relation = _relation(pred)
    gold_relation = _relation(gold)
    if len(pred_relation) == 1 and len(gold_relation) == 1:
        preds = [pred[:-1], f"({pred[:-1]})/100"] if pred.endswith("%") else [pred]
        golds = [gold[:-1], f"({gold[:-1]})/100"] if gold.endswith("%") else [gold]
        return any(_value_equal(p, g) for p in preds for g in golds)
    if len(pred_relation) > 1 and len(gold_relation) > 1:
        return _relations_equal(pred_relation, gold_relation)
    relation = pred_relation if len(pred_relation) > 1 else gold_relation
    name = re.sub(r"_\w+", "", relation[0])[:40]
    states_value = len(relation) > 3 or re.fullmatch(r"\D*[A-Za-z]\D*", name)
    if set(relation[1::2]) != {"="} or not states_value:
        return False
    return _equal(relation[-1], gold) if relation is pred_relation else _equal(pred, relation[-1])


def _relations_equal(pred, gold):
    """True if two relations say the same: a-b = k(c-d) at 3 points, k > 0 if < (x<1 is -x>-1)."""
    pred = [pred[0], "=", pred[-1]] if set(pred[1::2]) == {"="} else pred
    gold = [gold[0], "=", gold[-1]] if set(gold[1::2]) == {"="} else gold
    if len(pred) != 3 or len(gold) != 3 or gold[1] not in (pred[1], _FLIP[pred[1]]):
        return False
    if pred in (gold, [gold[2], _FLIP[gold[1]], gold[0]]):
        return True
    differences = [_to_sympy(f"({left})-({right})") for left, _, right in (pred, gold)]
    if None in differences:
        return False
    ratios = [v[0] / v[1] if v and 0 not in v else 0 for v in _samples(*differences)]
    k = ratios[0].real
    if k == 0 or any(abs(ratio - k) > 1e-9 * abs(ratio) for ratio in ratios):
        return False
    return pred[1] in ("=", "!=") or (k > 0) == (pred[1] == gold[1])


# ---- Values: plain numbers exactly; anything else through the whitelist into sympy


def _number(s):
    """The exact value (Fraction) of a plain number (12, -0.5, 1e-5, 3/4, ((1)/(2))), else None."""
    number = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d{1,3})?"
    match = re.fullmatch(rf"([-+]?)\(*({number})\)*(?:/\(*({number})\)*)?", s)
    if not match or Fraction(match[3] or 1) == 0:
        return None
    return Fraction(match[1] + "1") * Fraction(match[2]) / Fraction(match[3] or 1)


def _close(x, y, gold, exact):
    """True if x == y (Fractions, complex): exactly, within REL_TOL or rounded as gold (0.33)."""
    if exact:
        return x == y if isinstance(x, Fraction) else abs(x - y) <= 1e-9 * max(abs(x), abs(y))
    if abs(x - y) <= REL_TOL * max(abs(x), abs(y)):
        return True
    decimal = re.fullmatch(r"-?(\d*)\.(\d+)(?:e([-+]?\d+))?", gold)
    if not decimal or len((decimal[1] + decimal[2]).lstrip("0")) < 2 or x.imag or y.imag:
        return False
    scale = Fraction(10) ** int(decimal[3] or 0)
    places = len(decimal[2])
    return round(Fraction(x.real) / scale, places) == round(Fraction(y.real) / scale, places)


def _parseable(s):
    """True if s passes the whitelist in front of sympy's parser (no eval anywhere)."""
    if not re.fullmatch(r"[\w\s.+\-*/(),!]*", s, re.A) or "__" in s:
        return False
    if re.search(r"\.(?!\d)|[A-Za-z_)]\.|\de[-+]?\d{4}", s):
        return False
    depths = _depths(s) or [0]
    names = re.findall(r"[A-Za-z]+", re.sub(r"_[A-Za-z0-9]+", "", s))
    keywords = ("as", "if", "in", "is", "or")
    short = all(n in _KNOWN or (len(n) <= 2 and n not in keywords) for n in names)
    return short and max(depths) <= 40 and min(depths) >= 0 and depths[-1] == 0


def _value_equal(pred, gold):
    """True if two values are equal: base-n numbers (1011_2), numbers, words (Yes = yes), sympy."""
    bases = [re.fullmatch(r"(\d[0-9A-Za-z]*)_(\d{1,2})", s) for s in (pred, gold)]
    if any(bases):
        digits = [match[1] if match else s for match, s in zip(bases, (pred, gold), strict=True)]
        return digits[0].lower() == digits[1].lower() and len({m[2] for m in bases if m}) == 1
    # No = no, YES = yes: a word in any case (x and X stay two variables).
    if re.fullmatch(r"[A-Za-z]{2,}", pred) and pred.lower() == gold.lower():
        return True
    exact = not re.search(r"\d\.|\.\d|\de", f"{pred} {gold}")
    numbers = [_number(pred), _number(gold)]
    if None not in numbers:
        return _close(*numbers, gold, exact)
    if not (_parseable(pred) and _parseable(gold)):
        return pred.lower() == gold.lower()
    a = _to_sympy(pred)
    b = _to_sympy(gold)
    # Exact numbers (1/2006! against 1/2004!) are never compared as floats.
    if a is None or b is None or a == b or (a - b).is_Rational:
        return a is not None and b is not None and (a == b or a - b == 0)
    # Equal values at three points; where there are none (g(x), zoo, 10^400), simplify decides.
    for values in _samples(a, b):
        if values is None or not _close(*values, gold, exact):
            return values is None and sympy.simplify(a - b) == 0
    return True


def _samples(*exprs):
    """Yield exprs' complex values (None if not finite) at 3 points; p(0) is one more variable."""
    applied = set().union(*(expr.atoms(sympy.core.function.AppliedUndef) for expr in exprs))
    exprs = [expr.xreplace({f: sympy.Symbol(str(f)) for f in applied}) for expr in exprs]
    symbols = sorted(set().union(*(expr.free_symbols for expr in exprs)), key=str)
    for base in (2.618034, 1.324718, 3.236068) if symbols else (2.618034,):
        point = {s: sympy.Float(base ** (1 + k / 7) + k / 10) for k, s in enumerate(symbols)}
        values = [expr.xreplace(point).evalf(20) for expr in exprs]
        finite = all(v.is_number and v.is_finite and abs(v) < 1e300 for v in values)
        yield [complex(v) for v in values] if finite else None


def _evaluate_capped(expr, depth=0):
    """expr evaluated bottom-up; ValueError if too deep or too large (9^9^9^9, (10^1000)!)."""
    if depth > 60:
        raise ValueError("too deep")
    args = [_evaluate_capped(arg, depth + 1) for arg in expr.args]
    numbers = all(arg.is_number for arg in args)
    if numbers and expr.func in (sympy.factorial, sympy.binomial) and min(map(abs, args)) > 5000:
        raise ValueError("too large to compute")
    if numbers and expr.func in (sympy.Pow, sympy.exp):
        base, power = args if expr.func is sympy.Pow else (sympy.E, args[0])
        if abs(power) > 64 and abs(power) * sympy.log(abs(base) + 2) > 14e3:
            raise ValueError("too large to compute")
    return expr.func(*args) if args else expr


@functools.lru_cache(maxsize=4096)
def _to_sympy(s):
    """The sympy expression of a leaf, or None (text, bad syntax, a tuple, too large). Cached."""
    if not _parseable(s):
        return None
    risky = re.search(r"\*\*|!|binomial|exp|\d{8}", s) is not None
    # Powers and factorials are evaluated capped; "implicit" reads 2x; no builtins can be called.
    names = "Symbol Integer Float Rational Function Add Mul Pow I"
    calls = {name: getattr(sympy, name) for name in names.split()} | {"__builtins__": {}}
    # p(0) is p at 0, not p*0: a letter only ever applied to a number or a letter is a function
    applied = re.findall(r"(?<![A-Za-z_.])([A-Za-z])\((?:[-+]?[\d./]+|[A-Za-z])\)", s)
    letters = re.findall(r"(?<![A-Za-z_])[A-Za-z](?![A-Za-z_])", s)
    functions = {f: sympy.Function(f) for f in applied if applied.count(f) == letters.count(f)}
    try:
        expr = sympy.parse_expr(s, functions | _NAMES, "implicit", calls, evaluate=not risky)
        expr = _evaluate_capped(expr) if risky else expr
    except sympy.parsing.sympy_parser.TokenError:
        return None
    except (SyntaxError, TypeError, ValueError, NameError, ArithmeticError, AttributeError):
        return None
    return expr if isinstance(expr, sympy.Expr) and not expr.has(sympy.Tuple) else None


# ---- The worker process: one per grading process, forked (fine for any thread)


def _decide(pred, gold):
    """(equal, status) of _equal(pred, gold), "error" for a bug (printed), warnings silenced."""
    try:
        with warnings.catch_warnings(action="ignore"):
            return bool(_equal(pred, gold)), "ok"
    except Exception as error:
        print(f"grader error on {pred!r} vs {gold!r}: {error!r}", file=sys.stderr)
        return False, "error"


class _SympyWorker:
    """The worker process running _decide, forked (os.fork works in daemonic Pool workers) at the
    first call and after a timeout or death, by each pid; without fork (Windows) a daemon thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.owner = os.getpid()
        self.pid = None

    def start(self):
        try:
            self.conn, child_end = multiprocessing.Pipe()
            # Python 3.12 warns of a fork beside threads: the worker only runs _decide.
            with warnings.catch_warnings(action="ignore", category=DeprecationWarning):
                self.pid = os.fork()
        except (AttributeError, OSError):
            return False
        # The worker answers on child_end until EOF (the parent is gone; its end's copy would hide
        # EOF); SIGTERM ends it; the trainer's signals to its group (Ctrl-C, torchrun's) spare it.
        if self.pid == 0:
            try:
                self.conn.close()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.setpgrp()
                while True:
                    child_end.send(_decide(*child_end.recv()))
            finally:
                os._exit(0)
        child_end.close()
        return True

    def alive(self):
        """True if the worker runs; a dead one is reaped."""
        try:
            return self.pid is not None and os.waitpid(self.pid, os.WNOHANG)[0] == 0
        except ChildProcessError:
            return False

    def call(self, pred, gold, timeout):
        """(equal, status) of _decide(pred, gold) in the worker; a timeout kills it, death errs."""
        if self.owner != os.getpid():
            self.__init__()
        with self.lock:
            if not self.alive() and not self.start():
                results = []
                thread = threading.Thread(target=lambda: results.append(_decide(pred, gold)))
                thread.daemon = True
                thread.start()
                thread.join(timeout)
                return results[0] if results else (False, "timeout")
            try:
                self.conn.send((pred, gold))
                if self.conn.poll(timeout):
                    return self.conn.recv()
            except (EOFError, OSError):
                return False, "error"
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            return False, "timeout"


_WORKER = _SympyWorker()


def _answer_part(s):
    """s, or in a text with words around its math its box, answer phrase or last math span."""
    math = _MATH + r"|\b(and|or)\b"
    if not re.search(r"\\(?:boxed|fbox)", s) and not re.search(r"[A-Za-z]{3}", re.sub(math, "", s)):
        return s
    spans = re.findall(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\(([^\n]+?)\\\)|\$([^$\n]+?)\$", s, re.S)
    return extract_answer(s) or ("".join(spans[-1]).strip() if spans else s)


def answers_equal(pred, gold, timeout=1.0):
    """(equal: bool, status: "ok" | "timeout" | "error") of an answer (None: (False, "ok")) against
    the gold, LaTeX or text (then its box, answer phrase or last math span), notation ignored,
    decimals within REL_TOL; "timeout" after `timeout` s. Never raises: a bug is "error" (stderr)"""
    pred = "" if pred is None else str(pred).strip()
    gold = "" if gold is None else str(gold).strip()
    if pred == gold or not pred or not gold or max(len(pred), len(gold)) > MAX_ANSWER_CHARS:
        return pred == gold and pred != "", "ok"
    try:
        p = _normalize(pred)
        g = _normalize(gold)
        if p != g:
            p = _normalize(_answer_part(pred))
            g = _normalize(_answer_part(gold))
    except Exception as error:
        print(f"grader error on {pred!r} vs {gold!r}: {error!r}", file=sys.stderr)
        return False, "error"
    if p == g or not p:
        return p != "", "ok"
    return _WORKER.call(p, g, timeout)


def grade(text, gold, timeout=1.0):
    """(correct, answer, status): answer = extract_answer(text) (None if text is no str)
    graded by answers_equal(answer, gold, timeout); never raises, in Pool workers, forks, spawn."""
    answer = extract_answer(text if isinstance(text, str) else None)
    correct, status = answers_equal(answer, gold, timeout)
    return correct, answer, status


if __name__ == "__main__":
    main()
