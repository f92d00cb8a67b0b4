"""
rgra.py: reinforcement learning from verifiable rewards for LLM math, in one file.

One RL step (P prompts, G completions per prompt, the policy pi_theta):

  1. rollout    o_1..o_G ~ pi_old(. | q) for each prompt q                 (pi_old = pi_theta now)
  2. reward     r_i = 1[answer(o_i) == gold(q)] + format_bonus * 1[o_i boxes an answer]
  3. advantage  A_i from the group's rewards, e.g. (r_i - mean_g r) / (std_g r + eps)
  4. update     mu optimizer steps on  J = agg_{i,t} [ l_it + beta * KL_t(pi_theta || pi_ref) ]
                with the per-token surrogate l_it one of
                  pg    -A_i log pi_theta(o_it)                                    (REINFORCE)
                  clip  -min(s_it A_i, clip(s_it, 1 - eps_low, 1 + eps_high) A_i)  (PPO)
                        s_it = pi_theta(o_it) / pi_old(o_it)
                  nll   -log pi_theta(o_it) on kept samples                        (RAFT)
                and agg one of four aggregations (sequence_weights) whose denominators belong to
                the whole optimizer step, never to a micro-batch (TRL #2617, verl #5625).

With mu = 1 (one optimizer step per rollout batch) the ratio is 1, the clip is inactive and the
clipped surrogate has exactly the gradient of pg: GRPO and RGRA differ only when mu > 1.

Presets (--algo), each a few overrides of BASE; every column is also a flag of its own:

  algo       advantage      std_norm  surrogate eps       kl_coef loss_agg                 also
  grpo       group          group     clip      0.2/0.2   0.04    seq-mean-token-mean
  dr_grpo    group          none      clip      0.2/0.2   0       seq-mean-token-sum-norm
  rgra       group          group     pg        -         0.04    seq-mean-token-mean
  grpo_pos   group          group     clip      0.2/0.2   0.04    seq-mean-token-mean      positive-only
  reinforce  raw            none      pg        -         0.04    seq-mean-token-mean
  rloo       leave-one-out  none      pg        -         0       seq-mean-token-sum
  raft       best           none      nll       -         0       token-mean
  dapo       group          group     clip      0.2/0.28  0       token-mean               drop-equal-groups
                                                                                           mask-truncated

  grpo: DeepSeekMath (arXiv 2402.03300) eq. 3-4, KL by the k3 estimator. dr_grpo: Dr. GRPO (arXiv
  2503.20783). rgra: REINFORCE with Group Relative Advantage (arXiv 2603.18756); grpo_pos and reinforce
  are its ablations. rloo: Ahmadian et al. (arXiv 2402.14740). raft: RAFT (arXiv 2304.06767), top-1 per
  group. dapo: DAPO (arXiv 2503.14476); all-equal groups are dropped, not re-sampled.

Run: python rgra.py --algo rgra (the RGRA paper's GSM8K setting on one GPU); add --lora-rank 128 --lr 1e-5
for its LoRA adapters; --algo grpo --ppo-epochs 2 for GRPO with mu = 2, where the clip matters.
"""

import argparse, contextlib, functools, glob, itertools, json, math, multiprocessing, os, random, re
import resource, shutil, signal, sys, threading, time
from fractions import Fraction

import sympy, torch
from tqdm import tqdm

# ==== Configuration: one base objective, each preset a few overrides of it (the table above)
BASE = dict(advantage="group", std_norm="group", positive_only=False, surrogate="clip", eps_low=0.2,
            eps_high=0.2, kl_coef=0.04, kl_estimator="k3", loss_agg="seq-mean-token-mean",
            drop_equal_groups=False, mask_truncated=False)
PRESETS = {name: {**BASE, **overrides} for name, overrides in {
    "grpo": {},
    "dr_grpo": dict(std_norm="none", kl_coef=0.0, loss_agg="seq-mean-token-sum-norm"),
    "rgra": dict(surrogate="pg"),
    "grpo_pos": dict(positive_only=True),
    "reinforce": dict(advantage="raw", std_norm="none", surrogate="pg"),
    "rloo": dict(advantage="leave-one-out", std_norm="none", surrogate="pg", kl_coef=0.0,
                 loss_agg="seq-mean-token-sum"),
    "raft": dict(advantage="best", std_norm="none", surrogate="nll", kl_coef=0.0, loss_agg="token-mean"),
    "dapo": dict(eps_high=0.28, kl_coef=0.0, loss_agg="token-mean", drop_equal_groups=True,
                 mask_truncated=True),
}.items()}
LOSS_AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm", "seq-mean-token-sum")
TEMPLATES = ("chat", "qwen_math", "r1", "none")
STD_EPS = 1e-6  # (r - mean) / (std + STD_EPS); TRL uses 1e-4, verl 1e-6, Dr. GRPO's code 1e-8
KL_CLAMP = 20.0  # |log pi_theta - log pi_ref| is clamped before exp, as verl: k3 overflows otherwise
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
def parse_args(argv=None):
    """Parse the command line into one flat config (argparse.Namespace); objective flags left unset
    take the --algo preset's value. Contradictory flags exit with status 2, naming the flag."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a, flag = p.add_argument, argparse.BooleanOptionalAction
    a("--algo", default="rgra", choices=list(PRESETS), help="preset of the objective (table in rgra.py)")
    a("--model", default="Qwen/Qwen2.5-1.5B-Instruct", help="policy: HF folder, hub id or .gguf file")
    a("--train-data", default="gsm8k", help="JSONL path, or 'gsm8k' / 'math' from the hub")
    a("--num-problems", type=int, default=1800, help="seeded random subset of the problems (0 = all)")
    a("--skip-bad-rows", action="store_true", help="skip (and count) rows without question or gold answer")
    a("--template", default="chat", choices=TEMPLATES, help="prompt template")
    a("--seed", type=int, default=0, help="seed of the data order and of sampling")
    a("--prompts-per-step", type=int, default=24, help="P: prompts per rollout batch")
    a("--group-size", type=int, default=8, help="G: completions sampled per prompt")
    a("--max-new-tokens", type=int, default=512, help="completion budget in tokens (also Dr. GRPO's L)")
    a("--temperature", type=float, default=1.0, help="sampling temperature; log-probs use the same T")
    a("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    a("--gen-batch-size", type=int, default=256, help="sequences per generate call")
    a("--format-bonus", type=float, default=0.1, help="reward for a boxed answer (RGRA paper: 0.1)")
    a("--grader-timeout", type=float, default=1.0, help="seconds allowed to grade one answer")
    # objective (None: the preset's value)
    a("--advantage", choices=("group", "leave-one-out", "raw", "best"), help="baseline of the advantage")
    a("--std-norm", choices=("group", "batch", "none"), help="divide advantages by the group's (batch's) std")
    a("--positive-only", action=flag, help="clamp advantages at 0 (GRPO-pos)")
    a("--surrogate", choices=("pg", "clip", "nll"), help="per-token surrogate")
    a("--eps-low", type=float, help="clip range below 1")
    a("--eps-high", type=float, help="clip range above 1")
    a("--kl-coef", type=float, help="beta: weight of KL(policy || reference model)")
    a("--kl-estimator", choices=("k1", "k2", "k3"), help="per-token KL estimator")
    a("--loss-agg", choices=LOSS_AGGS, help="loss aggregation")
    a("--drop-equal-groups", action=flag, help="drop groups whose rewards are all equal")
    a("--mask-truncated", action=flag, help="drop completions cut by --max-new-tokens from the loss")
    a("--steps", type=int, default=0, help="rollout steps (0 = one pass over the problems)")
    a("--ppo-epochs", type=int, default=1, help="passes over each rollout batch")
    a("--mini-batches", type=int, default=1, help="optimizer steps per pass; mu = ppo_epochs * mini_batches")
    a("--micro-batch-size", type=int, default=8, help="sequences per forward/backward")
    a("--lr", type=float, default=1e-6, help="AdamW learning rate, constant after warm-up")
    a("--warmup-steps", type=int, default=0, help="linear warm-up, in optimizer steps")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping threshold")
    a("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank, not all weights (0 = off)")
    a("--lora-alpha", type=float, default=32.0, help="LoRA adapters are scaled by alpha / rank")
    a("--share-prompt", action=flag, default=True, help="one prompt forward per group in training")
    a("--gradient-checkpointing", action="store_true", help="recompute activations; turns --share-prompt off")
    a("--bf16", action=flag, help="bf16 autocast, fp32 weights (default: on CUDA)")
    a("--bf16-weights", action="store_true", help="bf16 weights and optimizer state (lr ~1e-6 rounds away)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    a("--out-dir", default="runs/rgra", help="metrics.jsonl, config.json and checkpoints go here")
    a("--save-every", type=int, default=25, help="checkpoint every N steps (and at the end)")
    a("--keep-last", type=int, default=0, help="keep only the newest N checkpoints (0 = all)")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out-dir")
    a("--max-bad-steps", type=int, default=3, help="stop after this many non-finite steps in a row")
    args = p.parse_args(argv)
    vars(args).update({k: v for k, v in PRESETS[args.algo].items() if getattr(args, k) is None})
    args.bf16 = args.device.startswith("cuda") if args.bf16 is None else args.bf16
    args.mu = args.ppo_epochs * args.mini_batches
    # contradictory flags: p.error exits with status 2, naming the flag
    if (args.advantage in ("group", "leave-one-out") or args.std_norm == "group") and args.group_size < 2:
        p.error(f"--group-size {args.group_size}: a group baseline needs at least 2 completions")
    for low, names in ((1, "prompts_per_step group_size max_new_tokens ppo_epochs mini_batches "
                           "micro_batch_size gen_batch_size save_every max_bad_steps"),
                       (0, "keep_last steps lora_rank kl_coef eps_high temperature warmup_steps")):
        for name in names.split():
            if getattr(args, name) < low:
                p.error(f"--{name.replace('_', '-')} must be " + ("at least 1" if low else ">= 0"))
    rollout = args.prompts_per_step * args.group_size
    if rollout % args.mini_batches or (rollout // args.mini_batches) % args.micro_batch_size:
        p.error(f"--mini-batches {args.mini_batches} and --micro-batch-size {args.micro_batch_size} "
                f"must divide the rollout batch of {rollout} sequences evenly")
    if not 0 <= args.eps_low < 1 or not 0 < args.top_p <= 1:
        p.error("--eps-low must be in [0, 1) and --top-p in (0, 1]")
    if args.mu > 1 and args.temperature == 0:
        p.error("--temperature 0 (greedy) has no sampling distribution for the ratio")
    if args.mu > 1 and args.surrogate == "pg":
        print(f"warning: mu = {args.mu} with the pg surrogate reuses stale samples without a ratio",
              file=sys.stderr)
    if args.share_prompt and args.gradient_checkpointing:  # HF drops the KV cache that the sharing reuses
        print("note: --gradient-checkpointing turns --share-prompt off", file=sys.stderr)
        args.share_prompt = False
    return args

# ==== Data: problems with gold answers, from a JSONL file or a hub dataset
class DataError(ValueError):
    """Bad input data: the message names the file, line and field."""
HUB_DATASETS = {"gsm8k": ("openai/gsm8k", "main", "train"),
                "math": ("DigitalLearningGmbH/MATH-lighteval", "default", "train")}
def read_rows(source, hub=HUB_DATASETS):
    """[(where, row)] of a JSONL file (where = "path:line") or of a dataset named in `hub` ("repo[i]").
    Raises DataError for a missing or empty file, a line that is not JSON, or a hub set not loaded."""
    if source in hub:
        repo, config, split = hub[source]
        try:
            import datasets
            rows = datasets.load_dataset(repo, config, split=split)
        except Exception as e:  # no `datasets`, offline, refused: one line instead of a stack trace
            raise DataError(f"{source}: could not load {repo} from the hub ({type(e).__name__}: {e}); "
                            "pass a JSONL path instead") from None
        return [(f"{repo}[{i}]", dict(row)) for i, row in enumerate(rows)]
    if not os.path.isfile(source):
        raise DataError(f"{source}: no such file (and not one of the hub names {sorted(hub)})")
    rows = []
    for n, line in enumerate(open(source, encoding="utf-8"), 1):
        try:
            rows += [(f"{source}:{n}", json.loads(line))] if line.strip() else []
        except json.JSONDecodeError as e:
            raise DataError(f"{source}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not rows: raise DataError(f"{source}: file is empty")
    return rows
def question_text(row):
    """The problem statement of a row (field question, problem or input), or None."""
    return next((row[k] for k in ("question", "problem", "input")
                 if isinstance(row.get(k), str) and row[k].strip()), None)
def gold_answer(row):
    """The gold final answer of a row as a string, or None: `answer` (for GSM8K what follows '#### ',
    commas dropped), else the last \\boxed{} of `solution` (MATH)."""
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool): return str(answer)
    if isinstance(answer, str) and answer.strip():
        return answer.split("####")[-1].strip().replace(",", "") if "####" in answer else answer.strip()
    return extract_answer(row["solution"]) if isinstance(row.get("solution"), str) else None
def load_problems(source, num_problems=0, seed=0, skip_bad_rows=False, hub=HUB_DATASETS,
                  gold=gold_answer):
    """Problems [{"question": str, "answer": str}] of read_rows(source, hub), answers from gold(row): a seeded
    subset of num_problems (0 = all, in file order). DataError names file, line and field of a row without
    question or gold answer (skipped and counted with skip_bad_rows), or a source without problems."""
    problems, skipped = [], 0
    for where, row in read_rows(source, hub):
        q, answer = (question_text(row), gold(row)) if isinstance(row, dict) else (None, None)
        if q is not None and answer is not None:
            problems.append({"question": q, "answer": answer})
        elif skip_bad_rows:
            skipped += 1
        else:
            raise DataError(f"{where}: " + ("row is not a JSON object" if not isinstance(row, dict) else
                            "no question field (question/problem/input)" if q is None else
                            "no gold answer (answer, final_answer, or solution with \\boxed{})"))
    if not problems: raise DataError(f"{source}: no usable problems ({skipped} rows skipped)")
    if skipped:
        print(f"skipped {skipped} rows without a question or gold answer in {source}", file=sys.stderr)
    keep = 0 < num_problems < len(problems)
    return random.Random(seed).sample(problems, num_problems) if keep else problems
def problems_for_step(problems, step, count, seed):
    """The `count` problems of rollout step `step` (from 1): a fresh seeded shuffle every epoch."""
    orders, out = {}, []
    for k in range((step - 1) * count, step * count):
        epoch, pos = divmod(k, len(problems))
        if epoch not in orders:  # a step spans at most two epochs: shuffle each once
            orders[epoch] = random.Random(seed * 7919 + epoch).sample(range(len(problems)), len(problems))
        out.append(problems[orders[epoch][pos]])
    return out

# ==== Prompts
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATE_TEXT = {
    "qwen_math": ("<|im_start|>system\n" + BOXED_INSTRUCTION + "<|im_end|>\n"  # as Dr. GRPO's evaluation
                  "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"),
    "r1": ("A conversation between User and Assistant. The User asks a question, and the Assistant "  # R1
           "solves it. The Assistant first thinks about the reasoning process in the mind and then provides "
           "the User with the answer. The reasoning process is enclosed within <think> </think> and answer "
           "is enclosed within <answer> </answer> tags, respectively, i.e., <think> reasoning process here "
           "</think> <answer> answer here </answer>.\nUser: {question}\nAssistant: <think>"),
    "none": "{question}"}
STOP_STRINGS = {"r1": ["</answer>"]}  # what ends a completion besides EOS, per template
def build_prompt(tokenizer, question, template):
    """The prompt text of one question. chat: the chat template, user turn = question + BOXED_INSTRUCTION;
    others fill TEMPLATE_TEXT, with BOS if the tokenizer adds one (sample() tokenizes without it)."""
    if template == "chat":
        messages = [{"role": "user", "content": question + "\n" + BOXED_INSTRUCTION}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = TEMPLATE_TEXT[template].replace("{question}", question)  # not format(): \boxed{} has braces
    bos = tokenizer.bos_token_id
    return tokenizer.bos_token + text if bos is not None and tokenizer("").input_ids[:1] == [bos] else text

# ==== Sampling: G completions per prompt, each prompt's KV cache filled once
@torch.no_grad()
def sample(model, tokenizer, prompts, num_samples, max_new_tokens, temperature, top_p=1.0, batch_size=64,
           stop=()):
    """num_samples completions per prompt (temperature 0: greedy), prompt-major: completion k of prompt i is
    row i * n + k. Returns prompt_ids (P token-id lists), completion_ids (P*n lists, final EOS included),
    texts, truncated (P*n bools: cut by max_new_tokens). Lengths come from the first EOS or stop string, not
    the pad id: with pad == eos (Qwen) EOS would drop out of the loss and never be learned (TRL PR #6357)."""
    from transformers import DynamicCache, GenerationConfig
    model.eval()
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    eos = model.generation_config.eos_token_id  # every id that ends a completion (Qwen lists several)
    eos = sorted({*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id} - {None})
    config = GenerationConfig(  # explicit: a model's own top_k or repetition_penalty would change pi_old
        do_sample=temperature > 0, temperature=temperature or None, top_p=top_p if temperature else None,
        top_k=0 if temperature else None, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos, stop_strings=list(stop) or None)
    completions, truncated, per_call = [], [], max(1, batch_size // num_samples)  # whole groups per call
    for start in range(0, len(prompts), per_call):
        batch = tokenizer.pad({"input_ids": prompt_ids[start:start + per_call]}, return_tensors="pt")
        ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)  # (p, Lp)
        cache = DynamicCache(config=model.config)  # each prompt runs once, not once per completion:
        if ids.shape[1] > 1:  # all but its last token, which generate runs before sampling on
            model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache, use_cache=True,
                  position_ids=(mask.cumsum(1) - 1)[:, :-1].clamp(min=0), logits_to_keep=1)
            cache.batch_repeat_interleave(num_samples)
        out = model.generate(input_ids=ids.repeat_interleave(num_samples, 0), past_key_values=cache,
                             attention_mask=mask.repeat_interleave(num_samples, 0), generation_config=config,
                             tokenizer=tokenizer if stop else None)  # (p * n, Lp + new)
        for tokens in out[:, ids.shape[1]:].tolist():
            n = completion_length(tokens, eos, tokenizer, stop)
            completions.append(tokens[:n])
            truncated.append(not (tokens[n - 1] in eos or tokenizer.decode(tokens[:n]).endswith(tuple(stop))))
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return {"prompt_ids": prompt_ids, "completion_ids": completions, "texts": texts, "truncated": truncated}
def completion_length(tokens, eos, tokenizer, stop):
    """Tokens up to and including the first EOS, or to the end of an earlier stop string (searched before
    the first EOS only: generate pads a row that stopped on a string, and pad may equal EOS)."""
    n = next((t + 1 for t, tok in enumerate(tokens) if tok in eos), len(tokens))
    while stop and n > 1 and any(s in tokenizer.decode(tokens[:n - 1]) for s in stop):
        n -= 1  # back over the padding, to the shortest prefix that holds the stop string
    return n

# ==== Reward: 1 for a correct final answer, plus a bonus for answering in the asked form
def score_completions(texts, golds, template, format_bonus, timeout):
    """Rewards (N,) float32 and correct (N,) bool of N completions against their golds (same order), and
    format_rate, no_answer_rate, grader_timeouts, grader_errors (a grader failing silently scores 0 on all,
    verl PR #5635). The format bonus needs an answer in a closed, non-empty \\boxed{} (r1: <answer>)."""
    graded = [grade(text, gold, timeout) for text, gold in zip(texts, golds)]
    form = r"</think>\s*<answer>.*</answer>" if template == "r1" else r"\\(?:boxed|fbox)\s*\{\s*[^\s}]"
    correct = torch.tensor([ok for ok, _, _ in graded], dtype=torch.bool)
    formatted = torch.tensor([answer is not None and re.search(form, text, re.S) is not None
                              for text, (_, answer, _) in zip(texts, graded)], dtype=torch.bool)
    info = {"format_rate": formatted.float().mean().item(),
            "no_answer_rate": sum(answer is None for _, answer, _ in graded) / len(graded),
            **{f"grader_{s}s": sum(status == s for *_, status in graded) for s in ("timeout", "error")}}
    return correct.float() + format_bonus * formatted.float(), correct, info

# ==== Advantages: one number per completion, from its group's rewards
def compute_advantages(rewards, cfg):
    """Advantages (P, G) float32 and keep (P, G) bool from rewards (P, G), one group per row, so every
    statistic is over one prompt's G completions (groups built without the prompt degrade to batch
    normalisation, Search-R1 #88). cfg.advantage:
      group          r_i - mean_g r                              Dr. GRPO; GRPO with std_norm group
      leave-one-out  r_i - mean_{j!=i} r_j = G/(G-1) (r_i - mean_g r)                          RLOO
      raw            r_i                                                                  REINFORCE
      best           1 for the first top completion of a group with reward > 0, the rest dropped  RAFT
    std_norm divides by (std + 1e-6) of the group (DeepSeekMath eq. 3) or of the batch (after centring
    on the batch mean, REINFORCE++); std is Bessel-corrected. positive_only clamps at 0 (GRPO-pos);
    drop_equal_groups drops groups whose rewards are all equal (DAPO)."""
    P, G = rewards.shape
    if cfg.advantage == "best":
        keep = torch.zeros(P, G, dtype=torch.bool).scatter_(1, rewards.argmax(1, keepdim=True), True)
        keep &= rewards > 0
        return keep.float(), keep
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (P, G)
    adv = {"group": centred, "leave-one-out": centred * G / (G - 1), "raw": rewards}[cfg.advantage]
    if cfg.std_norm == "group": adv = adv / (rewards.std(dim=1, keepdim=True) + STD_EPS)  # DeepSeekMath eq. 3
    elif cfg.std_norm == "batch": adv = (adv - adv.mean()) / (adv.std() + STD_EPS)  # REINFORCE++
    if cfg.positive_only: adv = adv.clamp(min=0)  # GRPO-pos
    keep = (rewards != rewards[:, :1]).any(1, keepdim=True) | (not cfg.drop_equal_groups)  # DAPO drops
    return adv, keep.expand(P, G).clone()  # groups whose rewards are all equal

# ==== Log-probabilities of the sampled tokens
def completion_logprobs(model, prompt_ids, completion_ids, temperature, share_prompt=False,
                        with_entropy=False):
    """log pi(o_t | q, o_<t) of each sampled completion token, from logits / temperature (TRL PR #3029).
    prompt_ids, completion_ids: lists of m token-id lists (a prompt may repeat across its group).
    Returns logp (m, Tc) float32 (0 on padding), with with_entropy also the entropy (m, Tc) without grad.
    Logits exist for completion positions only (the prompt's full-vocabulary logits dominate memory, TRL
    #3456). With share_prompt each distinct prompt runs once and its KV cache is indexed out to its
    completions; gradients flow through the cache, so loss and gradients equal the plain path's."""
    def pad(seqs, side="right"):  # (m, longest) token ids, -1 padding -> 0, and the mask of real tokens
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(x).long() for x in seqs], True, -1, side)
        return ids.clamp(min=0).to(model.device), (ids >= 0).to(model.device)
    (prompt, prompt_mask), (completion, completion_mask) = pad(prompt_ids, "left"), pad(completion_ids)
    mask, Tc = torch.cat([prompt_mask, completion_mask], 1), completion.shape[1]  # (m, Lp + Tc)
    if share_prompt:
        logits = shared_prompt_logits(model, prompt_ids, prompt, prompt_mask, completion, mask)
    else:
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=torch.cat([prompt, completion], 1), attention_mask=mask,
                       position_ids=positions, logits_to_keep=Tc + 1).logits[:, :-1]
    logits = logits.float() / temperature  # (m, Tc, V) fp32
    logz = logits.logsumexp(-1)  # (m, Tc)
    logp = (logits.gather(-1, completion.unsqueeze(-1)).squeeze(-1) - logz) * completion_mask
    if not with_entropy: return logp
    with torch.no_grad():
        return logp, (logz - (logits.softmax(-1) * logits).sum(-1)) * completion_mask
def shared_prompt_logits(model, prompt_ids, prompt, prompt_mask, completion, mask):
    """Logits (m, Tc, V) of the completion positions, running each distinct prompt's forward once."""
    from transformers import DynamicCache
    keys = [tuple(p) for p in prompt_ids]
    unique = sorted({keys.index(k) for k in keys})  # the first row of each distinct prompt
    index = torch.tensor([unique.index(keys.index(k)) for k in keys], device=prompt.device)  # (m,)
    u_mask = prompt_mask[unique]
    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompt[unique], attention_mask=u_mask, past_key_values=cache, use_cache=True,
                position_ids=(u_mask.long().cumsum(1) - 1).clamp(min=0), logits_to_keep=1)
    cache.batch_select_indices(index)  # (u, ...) -> (m, ...), differentiable indexing
    positions = u_mask.sum(1, keepdim=True)[index] + torch.arange(completion.shape[1], device=prompt.device)
    rest = model(input_ids=completion, attention_mask=mask, position_ids=positions, past_key_values=cache,
                 use_cache=True).logits
    return torch.cat([out.logits[index], rest[:, :-1]], 1)

# ==== The loss: every variant in one place
def token_loss(logp, old_logp, ref_logp, advantages, cfg):
    """Per-token loss l_it (m, T) float32 and per-token statistics, before aggregation. logp (m, T) with
    grad; old_logp (m, T) = log pi_old, no grad; ref_logp (m, T) = log pi_ref or None; advantages (m,).
      pg    -A log pi                                                    REINFORCE, RGRA
      clip  -min(s A, clip(s, 1-eps_low, 1+eps_high) A), s = exp(logp - old_logp)   PPO, GRPO eq. 3
      nll   -log pi                                                      RAFT (kept samples only)
    plus kl_coef * KL_t with KL_t = k1 d | k2 d^2/2 | k3 exp(-d)-1+d, d = logp - ref_logp (k3:
    DeepSeekMath eq. 4), d clamped to +-20 before exp (large values crash runs, OpenRLHF #525)."""
    A = advantages.unsqueeze(1)  # (m, 1), broadcast over tokens
    ratio, lo, hi = torch.exp(logp - old_logp), 1 - cfg.eps_low, 1 + cfg.eps_high
    loss = {"pg": lambda: -A * logp, "nll": lambda: -logp,
            "clip": lambda: -torch.min(ratio * A, ratio.clamp(lo, hi) * A)}[cfg.surrogate]()
    clipped = ((ratio < lo) & (A < 0)) | ((ratio > hi) & (A > 0))  # where the clip zeroes the gradient
    stats = {"pg_loss": loss.detach(), "clip_frac": clipped.float()}
    if cfg.kl_coef > 0:
        d = (logp - ref_logp).clamp(-KL_CLAMP, KL_CLAMP)
        kl = {"k1": d, "k2": d.square() / 2, "k3": torch.exp(-d) - 1 + d}[cfg.kl_estimator]
        loss = loss + cfg.kl_coef * kl
        stats["kl"] = kl.detach()
    return loss, stats
def sequence_weights(lengths, loss_agg, max_new_tokens):
    """Weights (B,) float32: w_i for every token of sequence i, so that sum_{i,t} w_i l_it is the loss
    of one optimizer step. lengths (B,) are the |o_i| of ALL its sequences: computed before the
    micro-batch loop, 1 or k micro-batches give the same gradient (TRL #2617, OpenRLHF PR #1249)."""
    B, lengths = len(lengths), lengths.float()
    return {"seq-mean-token-mean": lambda: 1.0 / (lengths * B),
            "token-mean": lambda: torch.full_like(lengths, 1.0 / lengths.sum()),
            "seq-mean-token-sum-norm": lambda: torch.full_like(lengths, 1.0 / (max_new_tokens * B)),
            "seq-mean-token-sum": lambda: torch.full_like(lengths, 1.0 / B)}[loss_agg]()

# ==== The update: gradient accumulation over micro-batches, mu optimizer steps per rollout batch
def accumulate_gradients(model, batch, idx, cfg):
    """Forward/backward the sequences idx of a rollout batch in micro-batches, adding into .grad. batch:
    prompt_ids, completion_ids (one per sequence), advantages (N,), old_logp and ref_logp (lists of (|o_i|,)
    tensors, or None). Returns the step's summed statistics."""
    lengths = torch.tensor([len(batch["completion_ids"][i]) for i in idx])
    weights = sequence_weights(lengths, cfg.loss_agg, cfg.max_new_tokens)  # (B,): the whole optimizer step
    # longest first pads less; with a shared prompt a group stays together so its prompt runs once
    key = (lambda j: (-len(batch["prompt_ids"][idx[j]]), batch["prompt_ids"][idx[j]], -lengths[j])) \
        if cfg.share_prompt else (lambda j: -(len(batch["prompt_ids"][idx[j]]) + lengths[j]))
    order = sorted(range(len(idx)), key=key)
    totals = dict.fromkeys(("loss", "pg_loss", "kl", "entropy", "clip_frac"), 0.0)
    for start in range(0, len(order), cfg.micro_batch_size):
        js = order[start:start + cfg.micro_batch_size]
        seqs = [idx[j] for j in js]
        logp, entropy = completion_logprobs(model, [batch["prompt_ids"][i] for i in seqs],
                                            [batch["completion_ids"][i] for i in seqs],
                                            cfg.temperature, cfg.share_prompt, with_entropy=True)
        pad = torch.nn.utils.rnn.pad_sequence
        old, ref = (pad([batch[key][i] for i in seqs], batch_first=True).to(logp.device)
                    if batch[key] else None for key in ("old_logp", "ref_logp"))  # (m, Tc) each
        loss_tok, stats = token_loss(logp, logp.detach() if old is None else old, ref,
                                     batch["advantages"][seqs].to(logp.device), cfg)
        mask = torch.arange(logp.shape[1], device=logp.device) < lengths[js].to(logp.device).unsqueeze(1)
        w = weights[js].to(logp.device).unsqueeze(1) * mask  # (m, Tc)
        loss = (loss_tok * w).sum()
        loss.backward()
        for key, value in {"loss": loss.detach(), "entropy": entropy, **stats}.items():
            totals[key] += (value * (w if value.dim() else 1)).sum().item()
    return totals
@torch.no_grad()
def frozen_logprobs(model, batch, idx, cfg):
    """Log-probs of the sampled tokens under a frozen model (pi_old or pi_ref): list of (|o_i|,)."""
    out = [None] * len(batch["completion_ids"])
    for start in range(0, len(idx), cfg.micro_batch_size):
        seqs = idx[start:start + cfg.micro_batch_size]
        logp = completion_logprobs(model, [batch["prompt_ids"][i] for i in seqs], [batch["completion_ids"][i]
                                   for i in seqs], cfg.temperature, cfg.share_prompt)
        for i, row in zip(seqs, logp): out[i] = row[:len(batch["completion_ids"][i])].cpu()
    return out
def train_on_rollout(model, ref_model, optimizer, scheduler, batch, keep_idx, cfg, generator):
    """mu = ppo_epochs * mini_batches optimizer steps on the sequences keep_idx of one rollout batch. Old
    log-probs only when mu > 1 (at mu = 1 pi_old is the policy), reference log-probs only when kl_coef > 0:
    from ref_model or, under LoRA (ref_model None), the policy with adapters off. A step with a non-finite
    loss or gradient norm is skipped. Returns the mean statistics of its optimizer steps and their count."""
    model.train()  # dropout is off (load_policy); train mode is what enables gradient checkpointing
    batch["old_logp"] = frozen_logprobs(model, batch, keep_idx, cfg) if cfg.mu > 1 else None
    with lora_disabled() if ref_model is None else contextlib.nullcontext():
        batch["ref_logp"] = frozen_logprobs(ref_model or model, batch, keep_idx, cfg) if cfg.kl_coef else None
    stats, skipped = [], 0
    for _ in range(cfg.ppo_epochs):
        perm = [keep_idx[j] for j in torch.randperm(len(keep_idx), generator=generator).tolist()]
        for mb in range(cfg.mini_batches):
            idx = perm[mb * len(perm) // cfg.mini_batches:(mb + 1) * len(perm) // cfg.mini_batches]
            if not idx: continue  # fewer kept sequences than mini-batches
            totals = accumulate_gradients(model, batch, idx, cfg)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()
            if math.isfinite(totals["loss"]) and math.isfinite(grad_norm):
                optimizer.step()
                scheduler.step()
                torch.clear_autocast_cache()  # its bf16 weight copies would be stale for the next step
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
            stats.append({**totals, "grad_norm": grad_norm})
    mean = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]} if stats else {}
    return {**mean, "skipped_steps": skipped, "optimizer_steps": len(stats) - skipped}

# ==== The training loop
def main(argv=None):
    cfg = parse_args(argv)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    try:  # every input check happens here, before anything is written
        problems = load_problems(cfg.train_data, cfg.num_problems, cfg.seed, cfg.skip_bad_rows)
        found = checkpoints(cfg.out_dir)
        if not cfg.resume and (found or os.path.exists(metrics_path)):
            raise FileExistsError(f"--out-dir {cfg.out_dir} already holds a run; pass --resume or another")
        if cfg.resume and not found:
            print(f"--resume: no checkpoint in {cfg.out_dir} yet, starting from step 0", file=sys.stderr)
        resume_from = found[-1] if cfg.resume and found else None  # under LoRA: base model + saved adapters
        model, tokenizer = load_policy(resume_from if resume_from and not cfg.lora_rank else cfg.model,
                                       cfg.device, torch.bfloat16 if cfg.bf16_weights else torch.float32)
    except (DataError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if cfg.lora_rank:  # the reference model is the policy with its adapters off: no second copy
        add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    ref_model = None if cfg.lora_rank or not cfg.kl_coef else load_policy(  # else the initial policy, frozen
        cfg.model, cfg.device, torch.bfloat16 if cfg.bf16 else model.dtype)[0].requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    warmup = lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps))  # noqa: E731 (linear, then constant)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    start_step = load_trainer_state(resume_from, model, optimizer, scheduler) if resume_from else 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    if os.path.exists(metrics_path):  # steps logged after the checkpoint run again: dropped, atomically
        kept = [row for row in open(metrics_path) if row.strip() and json.loads(row)["step"] <= start_step]
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics_path + ".tmp", metrics_path)
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump(vars(cfg), f, indent=1)
    print(json.dumps(vars(cfg)))
    num_steps = cfg.steps or math.ceil(len(problems) / cfg.prompts_per_step)
    stop, bad_in_a_row = install_signal_handlers(), 0
    for step in tqdm(range(start_step + 1, num_steps + 1), initial=start_step, total=num_steps, desc="steps"):
        with torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
            metrics = rl_step(model, ref_model, tokenizer, optimizer, scheduler, problems, step, cfg)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        tqdm.write(f"step={step} " + " ".join(f"{k}={metrics[k]:.4g}" for k in ("reward_mean", "accuracy",
                   "loss", "kl", "grad_norm", "len_mean") if metrics[k] is not None))
        bad_in_a_row = bad_in_a_row + 1 if metrics["skipped_steps"] else 0
        if bad_in_a_row >= cfg.max_bad_steps:
            tqdm.write(f"error: {bad_in_a_row} steps in a row had a non-finite loss or gradient; stopping. "
                       f"Last good checkpoint: {(checkpoints(cfg.out_dir) or ['none'])[-1]}", file=sys.stderr)
            sys.exit(1)
        if (step % cfg.save_every == 0 or step == num_steps) and not bad_in_a_row or stop["signal"]:
            path = save_checkpoint(cfg.out_dir, step, model, tokenizer, optimizer, scheduler, cfg.keep_last)
            plot_metrics(metrics_path, os.path.join(cfg.out_dir, "metrics.png"))
        if stop["signal"]:
            tqdm.write(f"{stop['signal'].name}: saved {path}; continue with --resume", file=sys.stderr)
            sys.exit(128 + stop["signal"])
    print(f"done: {num_steps} steps, last checkpoint {checkpoints(cfg.out_dir)[-1]}")
def rl_step(model, ref_model, tokenizer, optimizer, scheduler, problems, step, cfg):
    """One RL step: sample the rollout batch, score it, compute advantages, update. Returns metrics."""
    t0 = time.time()
    seed = cfg.seed * 1_000_003 + step  # every step reseeds: a resumed run samples what the original would
    torch.manual_seed(seed)
    step_problems = problems_for_step(problems, step, cfg.prompts_per_step, cfg.seed)
    prompts = [build_prompt(tokenizer, p["question"], cfg.template) for p in step_problems]
    rollout = sample(model, tokenizer, prompts, cfg.group_size, cfg.max_new_tokens, cfg.temperature,
                     cfg.top_p, cfg.gen_batch_size, STOP_STRINGS.get(cfg.template, []))
    t1 = time.time()
    P, G = len(prompts), cfg.group_size
    golds = [p["answer"] for p in step_problems for _ in range(G)]  # prompt-major, as the rollout
    rewards, correct, info = score_completions(rollout["texts"], golds, cfg.template, cfg.format_bonus,
                                               cfg.grader_timeout)
    t2 = time.time()
    advantages, keep = compute_advantages(rewards.view(P, G), cfg)  # (P, G)
    truncated = torch.tensor(rollout["truncated"])
    if cfg.mask_truncated: keep &= ~truncated.view(P, G)  # DAPO's overlong filtering
    batch = {"prompt_ids": [rollout["prompt_ids"][i // G] for i in range(P * G)],
             "completion_ids": rollout["completion_ids"], "advantages": advantages.flatten()}
    keep_idx = keep.flatten().nonzero().flatten().tolist()
    stats = {"skipped_steps": 0, "optimizer_steps": 0} if not keep_idx else train_on_rollout(
        model, ref_model, optimizer, scheduler, batch, keep_idx, cfg, torch.Generator().manual_seed(seed))
    t3 = time.time()
    lengths = torch.tensor([len(c) for c in rollout["completion_ids"]], dtype=torch.float32)
    equal = (rewards.view(P, G) == rewards.view(P, G)[:, :1]).all(1)  # groups without any signal
    mean = lambda x: x.float().mean().item() if x.numel() else None  # noqa: E731
    memory = (torch.cuda.max_memory_allocated() if model.device.type == "cuda"  # CPU: peak RSS
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    return {"step": step, "reward_mean": mean(rewards), "accuracy": mean(correct), **info,
            **{k: stats.get(k) for k in ("loss", "pg_loss", "kl", "grad_norm", "entropy", "clip_frac")},
            "len_mean": mean(lengths), "len_correct": mean(lengths[correct]),
            "len_incorrect": mean(lengths[~correct]), "truncated_frac": mean(truncated),
            "kept_frac": len(keep_idx) / (P * G), "equal_group_frac": mean(equal), "mu": cfg.mu,
            "optimizer_steps": stats["optimizer_steps"], "skipped_steps": stats["skipped_steps"],
            "tokens": int(lengths.sum()), "lr": scheduler.get_last_lr()[0], "time_generate": t1 - t0,
            "time_score": t2 - t1, "time_train": t3 - t2, "time_step": t3 - t0, "peak_memory_gb": memory}

# ==== Model loading and LoRA
def check_model(name):
    """FileNotFoundError unless `name` is a local file or folder, or a hub id that is cached or that the hub
    answers for: one request, no retries, so offline it fails at once."""
    if os.path.exists(name): return
    import huggingface_hub
    try:  # a typo, offline, a private model: say which, in one line
        if huggingface_hub.try_to_load_from_cache(name, "config.json") is None:
            huggingface_hub.model_info(name, timeout=10)
    except Exception as e:
        raise FileNotFoundError(f"--model {name}: no such file or folder, and not a hub model cached or "
                                f"online ({type(e).__name__}: {str(e).splitlines()[0]})") from None
def load_policy(name, device, dtype=torch.float32):
    """(model, tokenizer) from an HF folder, a hub id or a .gguf file (de-quantized into a plain model, so
    save_pretrained writes an ordinary checkpoint); FileNotFoundError from check_model. Pads on the left,
    EOS as pad if none. Dropout is off: log-prob passes would disagree with each other (TRL #3500)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    check_model(name)
    folder, gguf = os.path.split(os.path.abspath(name)) if name.endswith(".gguf") else (name, None)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype)
    if gguf:
        model.config.__dict__.pop("quantization_config", None)
        plain = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
        plain.load_state_dict(model.state_dict())
        plain.generation_config, model = model.generation_config, plain
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.pad_token or tokenizer.eos_token
    for module in [model.config, *model.modules()]:  # attention layers copy attention_dropout when built
        for key in ("attention_dropout", "hidden_dropout", "dropout", "p"):
            if isinstance(getattr(module, key, None), float): setattr(module, key, 0.0)
    return model.to(device), tokenizer
class LoRALinear(torch.nn.Linear):
    """y = W x + (alpha / r) B A x with W frozen, A (r, in) random and B (out, r) zero: before the first
    update the model is exactly the base model (LoRA, Hu et al. 2021, arXiv 2106.09685)."""
    enabled = True  # one flag for every adapter: lora_disabled() switches them all off
    def __init__(self, base, rank, alpha):
        super().__init__(base.in_features, base.out_features, base.bias is not None, device="meta")
        self.weight, self.bias, self.scale = base.weight, base.bias, alpha / rank
        self.lora_A = torch.nn.Parameter(torch.empty(rank, base.in_features).to(base.weight))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank).to(base.weight))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as peft
    def forward(self, x):
        y = super().forward(x)
        return y + self.scale * (x @ self.lora_A.t() @ self.lora_B.t()) if LoRALinear.enabled else y
def add_lora(model, rank, alpha):
    """Freeze every weight and wrap each attention and MLP projection in a LoRALinear, in place."""
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in LORA_TARGETS and isinstance(module, torch.nn.Linear):
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, LoRALinear(module, rank, alpha))
@contextlib.contextmanager
def lora_disabled():
    """Inside the block every LoRA adapter is off: the policy is its base model, the reference model."""
    LoRALinear.enabled = False
    try:
        yield
    finally:
        LoRALinear.enabled = True
def merged_state_dict(model):
    """The model's weights under the base model's names, each adapter merged: W + (alpha / r) B A."""
    merged = {f"{name}.weight": m.weight + m.scale * (m.lora_B @ m.lora_A)
              for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    return {k: merged.get(k, v).detach() for k, v in model.state_dict().items() if "lora_" not in k}

# ==== Checkpoints, resume, plots, signals
def checkpoints(out_dir):
    """Complete checkpoint folders step_XXXXXX in out_dir, oldest first."""
    return sorted(os.path.dirname(f) for f in glob.glob(os.path.join(out_dir, "step_*", "trainer_state.pt")))
def save_checkpoint(out_dir, step, model, tokenizer, optimizer, scheduler, keep_last):
    """Write out_dir/step_XXXXXX: an HF checkpoint (LoRA merged) plus trainer_state.pt (optimizer, scheduler,
    LoRA adapters: an exact resume), in a temporary folder renamed into place: a kill keeps the last one."""
    final, tmp = (os.path.join(out_dir, f"{prefix}step_{step:06d}") for prefix in ("", ".tmp_"))
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=merged_state_dict(model))
    tokenizer.save_pretrained(tmp)
    adapters = {k: v for k, v in model.state_dict().items() if k.endswith(("lora_A", "lora_B"))}
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "adapters": adapters}, os.path.join(tmp, "trainer_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoints(out_dir)[:-keep_last] if keep_last else []:
        os.replace(old, os.path.join(out_dir, ".del_" + os.path.basename(old)))  # unlisted, then deleted
        shutil.rmtree(os.path.join(out_dir, ".del_" + os.path.basename(old)))
    return final
def load_trainer_state(folder, model, optimizer, scheduler):
    """Restore optimizer, scheduler and LoRA adapters from a checkpoint folder; returns its step."""
    state = torch.load(os.path.join(folder, "trainer_state.pt"), weights_only=False)
    model.load_state_dict(state["adapters"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    print(f"resumed from {folder} at step {state['step']}")
    return state["step"]
def plot_metrics(metrics_path, png_path):
    """Reward and accuracy, lengths of correct and incorrect completions, KL, entropy and clip fraction
    against step, from metrics.jsonl into a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    panels = [("reward_mean", "accuracy"), ("len_correct", "len_incorrect"), ("kl",), ("entropy",),
              ("clip_frac",)]
    fig = Figure(figsize=(4 * len(panels), 3.2), layout="tight")
    for ax, keys in zip(fig.subplots(1, len(panels)), panels):
        for key in keys:
            steps = [r["step"] for r in rows if r.get(key) is not None]
            ax.plot(steps, [r[key] for r in rows if r.get(key) is not None], label=key)
        ax.set_xlabel("step")
        ax.legend()
    fig.savefig(png_path, dpi=100)
def install_signal_handlers():
    """SIGINT/SIGTERM set stop["signal"]: the loop saves a checkpoint at the end of the step and exits
    with status 128 + the signal's number. A second signal aborts at once."""
    stop = {"signal": None}
    def handler(number, frame):
        if stop["signal"]: raise KeyboardInterrupt
        stop["signal"] = signal.Signals(number)
        os.write(2, f"\n{stop['signal'].name}: finishing this step, then saving a checkpoint\n".encode())
    for s in (signal.SIGINT, signal.SIGTERM): signal.signal(s, handler)
    return stop

# ==== Answer checking (not RL): extract the final answer, decide equality with sympy
# Answers become plain text here, then in a worker process bounded in time (signal.alarm fails off the main
# thread, verl #5635) tuples, sets, relations..., their leaves compared as numbers or by sympy (whitelisted).
MAX_TEXT_CHARS = 100_000  # extraction reads the tail of a completion only
MAX_ANSWER_CHARS = 1000  # longer answers are compared as exact text only
REL_TOL = Fraction(1, 10**6)  # relative tolerance when an answer is written with a decimal point
# ---- Extraction of the final answer of a completion
def _final_box(text):
    """(start, answer) of the last \\boxed{..}/`\\boxed 7` and the boxes it continues; answer None if open."""
    close, stack, boxes = {}, [], []
    for m in re.finditer(r"[{}]", text):  # matching braces, in one pass
        if m[0] == "{": stack.append(m.start())
        elif stack: close[stack.pop()] = m.start()
    for m in re.finditer(r"\\(?:boxed|fbox)\b\s*", text):
        j = m.end()
        if text[j:j + 1] == "{":
            content = text[j + 1:close[j]].strip() if j in close else None  # None: left open
            boxes.append((m.start(), close.get(j, j) + 1, content))
        else:  # `\boxed 7`: one token
            token = re.match(r"[^\s$]*", text[j:j + 100])[0].rstrip(".")
            boxes.append((m.start(), j + len(token), token))
    boxes = [b for b in boxes if b[2] != ""]  # an empty \boxed{} is no answer
    if not boxes or boxes[-1][2] is None: return boxes and (boxes[-1][0], None) or None
    parts = [boxes[-1]]
    for box in reversed(boxes[-21:-1]):  # joined ("2, 3") across commas, \quad, "and"/"or" and a few words
        gap = text[box[1]:parts[0][0]][:201]
        words = re.sub(r"\\(?:text|mbox)\s*\{|\\q?quad|\\[()\[\],;:! ]|[{}$,;]|"  # \) and \( y_2 = \boxed:
                       r"[A-Za-z](?:_\{?\w+\}?)?(?:\(\w*\))?\s*=[\s$\\(]*$", " ", gap).split()  # labels a box
        if box[2] is None or len(gap) > 200 or re.search(r"\$\$|\n\n", gap) or words and not (  # not: =, i.e.
                len(words) < 6 and re.fullmatch(r"(?=.*\b(?:and|or)\b)[A-Za-z() ]+", " ".join(words))):
            break
        parts.insert(0, box)
    answers = [p[2] for p in parts]  # a box equal to the next restates it: 28 or 28_9, x+11 or 11+x
    answers = [a for a, b in zip(answers, answers[1:] + [""]) if not answers_equal(a, b, timeout=0.5)[0]]
    return parts[0][0], ", ".join(dict.fromkeys(answers))  # \boxed{3} or \boxed{2/5}: two answers
def _phrase_answer(rest):  # after "answer is"/"Answer:", to the line end, "I hope it is correct" or "<|"
    ans = re.split(r"\.?\s*I hope|<\||\n", rest.strip()[:MAX_ANSWER_CHARS], maxsplit=1)[0].replace("**", "")
    ans = re.sub(r'^\\?"|\\?"$', "", ans.strip(" $").rstrip(".").strip(" $")).strip(" $")  # is \"$12$\".
    if re.search(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}", re.sub(r"\$[^$]*\$|\\[A-Za-z]+(?:\{[^{}]*\})?", " ", ans)):
        ans = (re.findall(r"\$[^$]*\$|-?\d[\d,]*(?:\.\d+)?", ans) or [ans])[-1].strip("$ ,")  # V is $120$
    return ans if ans and not re.search(r"\\(?:boxed|fbox)", ans) else None

def extract_answer(text):
    """Final answer (str) of a completion (or a MATH solution), None if it gives none. In order: <answer>..
    </answer> (r1; a box inside wins); the last \\boxed{..}, \\fbox{..} or `\\boxed 7` (boxes joined by "and",
    "or", commas are one answer "2, 3" unless equal; an open last box is None; a later "The answer is 12"
    wins); GSM8K's `#### 72`; "The final answer is $x$" (Minerva), "Answer: x". No last-number fallback: in a
    truncated completion that is often the restated question. Reads the last MAX_TEXT_CHARS characters."""
    text = (text or "")[-MAX_TEXT_CHARS:]
    if "<answer>" in text:
        inner = text[text.rfind("<answer>") + 8:].split("</answer>")[0]
        return (_final_box(inner) or (0, inner.strip() or None))[1]
    phrase = ([None] + list(re.finditer(r"(final )?answer\s*(?:is\s*:?|:)", text, re.I)))[-1]
    boxed = _final_box(text)
    if boxed:  # unless a later "The final answer is $10,455$." restates it
        later = phrase and phrase[1] and phrase.start() > boxed[0] and _phrase_answer(text[phrase.end():])
        return later if later and re.search(r"[\d\\]", later) else boxed[1]
    hashes = re.findall(r"####\s*([^\n]+)", text)
    return (hashes[-1].strip() or None) if hashes else _phrase_answer(text[phrase.end():]) if phrase else None
# ---- LaTeX -> plain text: the names a formula may use, commands, then regex rewrites in order
_NAMES = {"pi": sympy.pi, "e": sympy.E, "i": sympy.I, "oo": sympy.oo, **{f: getattr(sympy, f) for f in (
    "sqrt exp log Abs floor ceiling sin cos tan sec csc cot sinh cosh tanh asin acos atan").split()},
          "factorial": lambda n: sympy.factorial(n, evaluate=False),  # unevaluated: _evaluate_capped checks
          "binomial": lambda n, k: sympy.binomial(n, k, evaluate=False)}
_KNOWN = set(_NAMES) | set("alpha beta gamma delta epsilon zeta eta theta kappa lamda mu nu xi rho sigma tau "
                           "phi chi psi omega Gamma Delta Theta Lambda Pi Sigma Phi Omega hbar".split())
_COMMANDS = {**dict.fromkeys("left right big Big bigl bigr Bigl Bigr displaystyle quad qquad limits circ "
                             "degree , ; : !".split() + [" "], " "), **dict(rule.split("->") for rule in r"""
             cdot->* times->* ast->* div->/ le-><= leq-><= leqslant-><= ge->>= geq->>= geqslant->>= ne->!=
             neq->!= lt->< gt->> in->∈ approx->≈ pm->± mp->± langle->( rangle->) rfloor->) rceil->)
             vert->| mid->| lvert->| rvert->| prime->' %->% emptyset->\{\} varnothing->\{\}""".split()),
             "infty": " oo ", "ln": " log ", "lambda": " lamda ", "lfloor": " floor(", "lceil": " ceiling("}
_REWRITES = [
    (r"\\begin\{array\}\{[^{}]*\}(.*?)\\end\{array\}", r"\\begin{matrix}\1\\end{matrix}"),
    (r"\\begin\{[pbvBV]?matrix\}(.*?)\\end\{[pbvBV]?matrix\}", lambda m: _matrix(  # -> ((1,2),(3,4))
        [r.split("&") for r in m[1].split("\\\\") if r.strip()])),
    (r"(?<!\\)\\\\(?=[a-zA-Z])", r"\\"),  # over-escaped JSON text: \\frac
    (r"\\left\s*\.|\\right\s*\.|\\!\s*(?=\d)|\\,(?=\d{3})", ""), (r"\s*\{\s*,\s*\}\s*|,\s*\\!\s*", ","),
    (r"\^\s*\{?\s*\\circ\s*\}?|°", ""), (r"(\d)\s*(?:\\?%|percent(?:age)?\b|pct\b)", r"\1%"),
    (r"\^\s*\{?\s*\\prime\s*\}?", "'"), (r"(\\(?:text|mbox)\s*\{[^{}]*\})\s*\^\s*\{?[23]\}?", r"\1"),  # cm^2
    (r"\\?\$|\\[()\[\]]|\b(?:np|math)\.|~", " "), (r"^\s*\{([^{}]*)\}\s*$", r"\1"),  # {1,3}: braces group
    (r"\\?\barc(sin|cos|tan)", r" a\1 "), (r"\\[dtc]frac", r"\\frac"), (r"\.\.\.|\\[lc]?dots\b", "…"),
    (r"(?<![\w.}^])(\d+)(?:\s*\\frac\{(\d+)\}\{(\d+)\}| (\d+)/(\d+)(?![\d.]))",  # 1\frac{4}{5}, 4 4/9
     lambda m: f"({int(m[1]) + Fraction(int(m[2] or m[4]), int(m[3] or m[5]))})"),
    (r"\\(frac|sqrt|binom)\s*(\w)", r"\\\1{\2}"), (r"(\\(?:frac|binom)\{[^{}]*\})\s*(\w)", r"\1{\2}"),
    (r"\\log\s*_\s*\{?(\w+)\}?\s*\(?(\w+)\)?", r" log(\2,\1)"),  # \frac12, \log_2 8; next: \ln e^2 = ln(e^2)
    (r"\\(ln|log|exp|sin|cos|tan)\s+([\w.]+\^\{?[\w.]+\}?)", r"\\\1{\2}"),
]
_ARG = r"\{([^{}]*)\}"  # a brace group with none inside: groups are rewritten innermost first
_GROUPS = [  # until none is left; the words of \text{} are marked by \x00..\x01
    (rf"\\frac{_ARG}{_ARG}", r"((\1)/(\2))"), (rf"\\binom{_ARG}{_ARG}", r" binomial(\1,\2)"),
    (rf"\\sqrt\s*\[([^\[\]{{}}]*)\]\s*{_ARG}", r"((\2)**(1/(\1)))"), (rf"\\sqrt\s*{_ARG}", r" sqrt(\1)"),
    (r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm)\s*\{\s*([^{}]*?)\s*\}", lambda m: "," if m[1] in
     ("and", "or", ",") else m[1] if re.fullmatch("[A-Za-z]", m[1]) else f"\x00{m[1]}\x01"),
    (rf"\\(?:mathbf|mathit|operatorname|boldsymbol|dot|ddot|hat|bar|vec|tilde)\s*{_ARG}", r"\1"),
    (rf"\^\s*{_ARG}", r"**(\1)"), (rf"_\s*{_ARG}", lambda m: "_" + re.sub(r"\W", "", m[1]) + " "),  # x_{n}t
    (rf"(?<![\\\w}}\]]){_ARG}", r"(\1)"),  # bare grouping braces (\{ \} is a set)
]
_CLEANUP = [  # after the groups: powers, |x|, thousands, 3.2e5, "and", x \in, words after a number (5 cm)
    (r"\s+", " "), (r"\^", "**"), (r"\|([^|]*)\|", r" Abs(\1) "), (r"([A-Za-z0-9)])'", r"\1_p"),  # no quote
    (r"(?<![\d.,(\[])([1-9]\d{0,2})((?:,\d{3})+)(?![\d,)\]])", lambda m: m[0].replace(",", "")),  # 1,000
    (r"(\d) (?=\d{3}(?!\d))", r"\1"), (r"(\d)\.(?!\d)", r"\1"), (r"(\d)E([-+]?\d)", r"\1e\2"),
    (r"(\d) ?\* ?10 ?\*\* ?\(?([-+]?\d+)\)?", r"\1e\2"), (r"\b(?:and|or)\b|;", ","), (r"^ ?\w ?∈", ""),
    (r"(?<=[\d)]) (?!(?:%s)\b)[A-Za-z][A-Za-z.]+(?: [A-Za-z][A-Za-z.]*)* ?$" % "|".join(_KNOWN), ""),
    (r" ?([^\w ]) ?| (_)", r"\1\2"), (r"\b(\d+) (?=[A-Za-z])", r"\1"),  # 2 n -> 2n, keep a b
]
_REWRITES, _GROUPS, _CLEANUP = ([(re.compile(p, re.S), r) for p, r in rules]  # compiled once
                               for rules in (_REWRITES, _GROUPS, _CLEANUP))
_rewrite = functools.partial(functools.reduce, lambda s, rule: rule[0].sub(rule[1], s))  # _rewrite(rules, s)
def _matrix(rows):  # [[cells]] -> ((1,2),(3,4)); one row or one column -> (1,2)
    flat = len(rows) == 1 or max(map(len, rows)) == 1
    return "(" + ",".join(",".join(r) if flat else "(" + ",".join(r) + ")" for r in rows) + ")"
@functools.lru_cache(maxsize=4096)
def _normalize(s):  # \frac{1}{2} -> ((1)/(2)), x^{2} -> x**(2); \text{} words dropped next to math (5 cm)
    s = re.sub(r"\\(?!sqrt\b)([A-Za-z]+|[,;:! %])",  # \cup, \frac and unknown commands stay
               lambda m: _COMMANDS.get(m[1], f" {m[1]} " if m[1] in _KNOWN else m[0]), _rewrite(_REWRITES, s))
    for _ in range(50):
        s, old = _rewrite(_GROUPS, s), s
        if s == old: break
    outside = re.sub(r"\x00[^\x00\x01]*\x01(?:_\w+)?", " ", s)
    s = outside if re.search(r"\w", outside) else s.replace("\x00", "").replace("\x01", "")
    return _rewrite(_CLEANUP, s).strip().rstrip(".,")
# ---- Structure: unions, sets, tuples and intervals, lists, relations; then single values
def _split(s, sep=","):  # s split at sep outside brackets (of any kind: intervals mix them)
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if depth == 0 and s.startswith(sep, i): parts, start = parts + [s[start:i]], i + len(sep)
    return [p.strip() for p in parts + [s[start:]] if p.strip()]
_VARIABLE = re.compile(r"[A-Za-z](?:_\w+)?(?:\([A-Za-z]\))?")
_FLIP = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "=": "=", "!=": "!="}
def _shape(s):  # (kind, items, brackets): union, set, tuple ((..) or [..]), list (a, b or a ± b) or leaf
    depth = list(itertools.accumulate((c in "([{") - (c in ")]}") for c in s))
    one_group = len(s) > 2 and 0 not in depth[1:-1] and depth[-1] == 0  # (1,2] or \{1\}, not (1)(2)
    if len(_split(s, r"\cup")) > 1: return "union", _split(s, r"\cup"), ""
    if s.startswith(r"\{") and s.endswith(r"\}") and one_group: return "set", _split(s[2:-2]), ""
    if s[:1] in "([" and s[-1:] in ")]" and one_group:
        items = _split(s[1:-1])
        return ("tuple", items, s[0] + s[-1]) if len(items) != 1 else _shape(items[0])  # (x) only groups
    if len(_split(s)) > 1 or s.count("±") == 1:
        return "list", _split(s) if len(_split(s)) > 1 else [s.replace("±", "+"), s.replace("±", "-")], ""
    parts = re.split(r"(<=|>=|<|>)", s)  # an inequality in one variable is its interval: x > 3 is (3,oo)
    if len(parts) in (3, 5) and ">" in parts[1]:
        parts = [_FLIP.get(x, x) for x in parts[::-1]]  # 3 > x is x < 3
    if len(parts) == 3: parts = ["-oo", "<", *parts] if _VARIABLE.fullmatch(parts[0]) else [*parts, "<", "oo"]
    if len(parts) == 5 and _VARIABLE.fullmatch(parts[2]) and parts[1][0] == parts[3][0] == "<":
        return _shape("(["[parts[1] == "<="] + parts[0] + "," + parts[4] + ")]"[parts[3] == "<="])
    return "leaf", [s], ""
def _equal(p, g):  # in the worker process: normalised answers, their structure first, then values
    if re.fullmatch(r"-?\d+,\d+ -?\d*\.\d+|-?\d*\.\d+ -?\d+,\d+", f"{p} {g}"):  # a decimal comma: 1,22 = 1.22
        p, g = p.replace(",", "."), g.replace(",", ".")
    (kp, ip, bp), (kg, ig, bg) = _shape(p), _shape(g)
    kinds = {kp, kg}
    if p == g or kinds == {"leaf"}:  # (x) is x
        return p == g or ip[0] == ig[0] or _leaf_equal(ip[0], ig[0])
    if kinds in ({"tuple"}, {"tuple", "list"}):  # ordered: (8, 4) for "8, 4"; interval ends must agree
        return len(ip) == len(ig) and not (len(ip) == 2 and bp != bg and "" not in (bp, bg)) and all(
            map(_equal, ip, ig))
    if kinds == {"tuple", "leaf"}:  # (p, q) = (3, 2) against (3, 2)
        return len(_relation(ip[0] if kp == "leaf" else ig[0])) > 1 and _leaf_equal(p, g)
    ip, ig = list(dict.fromkeys(ip)), list(dict.fromkeys(ig))  # sets, lists, unions: order free, no repeats
    return ("union" in kinds) == (kinds == {"union"}) and len(ip) == len(ig) and all(
        any(_equal(x, y) for y in ig) for x in ip) and all(any(_equal(x, y) for x in ip) for y in ig)
def _relation(s):  # [side, op, side, ...]; x = 1/3 ≈ 0.33 drops the ≈ tail; a lone ≈ is =: x ≈ 11
    parts = [x.strip() for x in re.split(r"(<=|>=|!=|<|>|=|≈)", s)]
    k = parts.index("≈") if "≈" in parts else len(parts)
    return parts[:k] if "=" in parts[:k] else [("=" if x == "≈" else x) for x in parts]
def _leaf_equal(p, g):  # one answer each: relations (x = 5 against 5, rearranged), else values
    rp, rg = _relation(p), _relation(g)
    if len(rp) == 1 and len(rg) == 1:
        percent = lambda s: [s[:-1], f"({s[:-1]})/100"] if s.endswith("%") else [s]  # noqa: E731 10%: 10, 0.1
        return any(_value_equal(a, b) for a in percent(p) for b in percent(g))
    if len(rp) == 1 or len(rg) == 1:  # x = 5 against 5: the value a name (x, f(x), AB, m+n) or a chain states
        rel = rp if len(rp) > 1 else rg
        bare = re.sub(r"_\w+", "", rel[0])  # digits only in subscripts: 2x = 6 states no value
        if set(rel[1::2]) != {"="} or len(rel) == 3 and not re.fullmatch(r"[^\d]*[A-Za-z][^\d]*", bare[:40]):
            return False
        return _equal(rel[-1], g) if rel is rp else _equal(p, rel[-1])
    rp, rg = [[r[0], "=", r[-1]] if set(r[1::2]) == {"="} else r for r in (rp, rg)]  # x = 5+6 = 11
    if len(rp) != 3 or len(rg) != 3 or rg[1] not in (rp[1], _FLIP[rp[1]]): return False
    if rp in (rg, [_FLIP.get(x, x) for x in rg[::-1]]):  # b = a is a = b, also for text
        return True
    u, v = _to_sympy(f"({rp[0]})-({rp[2]})"), _to_sympy(f"({rg[0]})-({rg[2]})")  # a op b as a - b op 0
    rows = list(_samples(u, v)) if u is not None and v is not None else [None]  # a - b = k (c - d) with k a
    ks = [r[0] / r[1] if r and r[0] and r[1] else 0j for r in rows]  # real constant, of the sign the ops need
    return ks[0] != 0 and all(abs(k - ks[0].real) <= 1e-9 * abs(k) for k in ks) and (
        rp[1] in ("=", "!=") or (ks[0].real > 0) == (rp[1] == rg[1]))
# ---- Values: plain numbers exactly; anything else through the whitelist into sympy
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d{1,3})?"
def _number(s):  # exact value of a plain number (12, -0.5, 1e-5, 3/4, ((1)/(2))), else None
    m = re.fullmatch(rf"([-+]?)\(*({_NUMBER})\)*(?:/\(*({_NUMBER})\)*)?", s)
    if m and Fraction(m[3] or 1): return Fraction(m[2]) / Fraction(m[3] or 1) * (-1 if m[1] == "-" else 1)
def _close(x, y, gold, exact):
    """x == y for Fractions or complex values: exactly (floats to 1e-9) without a decimal point written,
    else within REL_TOL or, for a gold decimal of >= 2 digits, rounded alike (0.333 = 0.33, 0.54 != 0.5)."""
    tolerance = 0 if exact and isinstance(x, Fraction) else Fraction(1, 10**9) if exact else REL_TOL
    if abs(x - y) <= tolerance * max(abs(x), abs(y)): return True
    m = re.fullmatch(r"-?(\d*)\.(\d+)(?:e([-+]?\d+))?", gold)
    if exact or not m or len((m[1] + m[2]).lstrip("0")) < 2 or isinstance(x, complex) and (x.imag or y.imag):
        return False
    scale = Fraction(10) ** int(m[3] or 0)
    return round(Fraction(x.real) / scale, len(m[2])) == round(Fraction(y.real) / scale, len(m[2]))
def _parseable(s):  # the whitelist in front of sympy's parser (and no eval anywhere): nothing else reaches it
    """Digits, + - * / ( ) , ! . spaces, names (1-2 letters but keywords, or _KNOWN) with _subscripts; dots
    only before a digit (no attribute access); no quotes, brackets, dunders."""
    if not re.fullmatch(r"[\w\s.+\-*/(),!]*", s, re.A) or "__" in s or re.search(r"\.(?!\d)|[A-Za-z_)]\.", s):
        return False
    names = re.findall(r"[A-Za-z]+", re.sub(r"_[A-Za-z0-9]+", "", s))
    return all(n in _KNOWN or len(n) <= 2 and n not in ("as", "if", "in", "is", "or") for n in names)
def _value_equal(p, g):  # numbers in base n (1011_2), plain numbers, text (Yes = yes), else sympy
    bp, bg = (re.fullmatch(r"(\d[0-9A-Za-z]*)_(\d{1,2})", s) for s in (p, g))
    if bp or bg:  # the same digits, and the same base when both give one
        return (bp or [0, p])[1].lower() == (bg or [0, g])[1].lower() and not (bp and bg and bp[2] != bg[2])
    exact, a, b = not re.search(r"\d\.|\.\d|\de", p + " " + g), _number(p), _number(g)
    if a is not None and b is not None: return _close(a, b, g, exact)
    if not (_parseable(p) and _parseable(g)): return p.lower() == g.lower()
    a, b = _to_sympy(p), _to_sympy(g)
    if a is None or b is None or a == b or (a - b).is_Rational:  # exact numbers (1/2006!, 1/2004!): no floats
        return a is not None and b is not None and (a == b or a - b == 0)
    for values in _samples(a, b):  # equal values at 3 points; without values (g(x), zoo, 10^400) simplify
        if values is None or not _close(*values, g, exact):
            return values is None and sympy.simplify(a - b) == 0
    return True
def _samples(*exprs):  # complex values of exprs at 3 points (each a list), or None where one has none
    symbols = sorted(set().union(*(e.free_symbols for e in exprs)), key=str)
    for base in (2.618034, 1.324718, 3.236068)[:3 if symbols else 1]:  # symbol k = base**(1 + k/7) + k/10:
        point = {s: sympy.Float(base ** (1 + k / 7) + k / 10) for k, s in enumerate(symbols)}  # not affine
        values = [e.xreplace(point).evalf(20) for e in exprs]
        yield [complex(v) for v in values] if all(v.is_number and v.is_finite and abs(v) < 1e300
                                                   for v in values) else None
def _evaluate_capped(expr, depth=0):  # an unevaluated parse tree evaluated bottom-up, refusing (ValueError)
    if depth > 60:  # to compute a power of more than ~20,000 bits (9^9^9^9, e^e^e^e^10) or a factorial or
        raise ValueError("too deep")  # binomial of numbers above 5,000 ((10^1000)!)
    args = [_evaluate_capped(a, depth + 1) for a in expr.args]
    base, power = args if expr.func is sympy.Pow else (sympy.E, args[0]) if expr.func is sympy.exp else (1, 1)
    if power != 1 and base.is_number and power.is_number and abs(power) > 64 and abs(power) * sympy.log(
            abs(base) + 2) > 14e3 or expr.func in (sympy.factorial, sympy.binomial) and all(
            a.is_number and abs(a) > 5000 for a in args):
        raise ValueError("too large to compute")
    return expr.func(*args) if args else expr
@functools.lru_cache(maxsize=4096)
def _to_sympy(s):  # sympy expression of a leaf (golds repeat: cached); None for text, bad syntax, too large
    depth = list(itertools.accumulate((c == "(") - (c == ")") for c in s)) or [0]  # balanced, <= 40 deep; and
    if not _parseable(s) or max(depth) > 40 or min(depth) < 0 or depth[-1] or re.search(r"\de[-+]?\d{4}", s):
        return None  # no 1e99999 (sympy's Float takes minutes)
    risky = re.search(r"\*\*|!|binomial|exp|\d{8}", s) is not None  # parsed unevaluated, then capped
    calls = {"__builtins__": {}, **{n: getattr(sympy, n) for n in "Symbol Integer Float Rational Function "
                                    "Add Mul Pow I".split()}}  # what the parser's generated code calls
    sp = sympy.parsing.sympy_parser  # parse_expr with implicit multiplication: 2x, sin x
    try:
        expr = sp.parse_expr(s, dict(_NAMES), sp.standard_transformations + (
            sp.implicit_multiplication_application,), calls, evaluate=not risky)
        expr = _evaluate_capped(expr) if risky else expr
    except (SyntaxError, sp.TokenError, TypeError, ValueError, NameError, ArithmeticError, AttributeError):
        return None
    return expr if isinstance(expr, sympy.Expr) and not expr.has(sympy.Tuple) else None  # (1, 2) is no leaf
# ---- The worker process: one, forked (as PyTorch's DataLoader: fine for __main__ scripts and any thread)
def _worker_loop(conn, parent_end):  # receives normalised (pred, gold), sends back (equal, status)
    parent_end.close()  # the fork's copy: open, it would keep recv() from seeing the parent's death as EOF
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the trainer's handler: terminate() must end it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    while True:
        pred, gold = conn.recv()  # EOFError once the parent is gone (even SIGKILLed): the worker ends
        try:
            conn.send((bool(_equal(pred, gold)), "ok"))
        except Exception as err:  # a grader bug or a sympy failure: reported, and counted by the caller
            print(f"grader error on {pred!r} vs {gold!r}: {err!r}", file=sys.stderr)
            conn.send((False, "error"))
class _SympyWorker:  # call(pred, gold, timeout): _equal in the worker, or (False, "timeout") killing it
    lock, proc, conn = threading.Lock(), None, None
    def call(self, pred, gold, timeout):
        with self.lock:
            if self.proc is None or not self.proc.is_alive():  # the first call, or the worker died (memory)
                self.conn, child = multiprocessing.Pipe()
                self.proc = multiprocessing.get_context("fork").Process(target=_worker_loop, daemon=True,
                                                                        args=(child, self.conn))
                self.proc.start()
            self.conn.send((pred, gold))
            if self.conn.poll(timeout): return self.conn.recv()
            self.proc.kill()  # overran: killed, reaped, replaced at the next call
            self.proc.join()
            return False, "timeout"
_WORKER = _SympyWorker()
def _answer_part(s):  # in a text that is more than an answer: its box, answer phrase or last math span
    prose = re.sub(r"(?s)\$[^$]*\$|\\\(.*?\\\)|\\\[.*?\\\]|\\[A-Za-z]+(\{[^{}]*\})?|\band\b|\bor\b", "", s)
    if not re.search(r"\\(?:boxed|fbox)", s) and not re.search(r"[A-Za-z]{3}", prose): return s
    spans = re.findall(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\(([^\n]+?)\\\)|\$([^$\n]+?)\$", s, re.S)
    return extract_answer(s) or ("".join(spans[-1]).strip() if spans else s)

def answers_equal(pred, gold, timeout=1.0):
    """(equal: bool, status: "ok" | "timeout" | "error") of an extracted answer against the gold, both LaTeX
    or text (pred None: (False, "ok")). Notation is ignored ($, \\left, spacing, units, degrees, thousands
    separators, `x =`); in a longer text its box, answer phrase or last math span counts. Numbers: exact,
    or within REL_TOL if written with a decimal point; 10% is 10 and 0.1. Tuples, intervals, matrices are
    ordered, sets and lists not; relations may be rearranged. Decided in the sympy worker: (False, "timeout")
    after `timeout` s. Never raises: a grader bug gives (False, "error") and a message on stderr."""
    pred, gold = ("" if x is None else str(x).strip() for x in (pred, gold))
    if pred == gold or not pred or not gold or len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return pred == gold and bool(pred), "ok"
    try:
        p, g = _normalize(pred), _normalize(gold)  # as written; else the answer part of a longer text
        p, g = (p, g) if p == g else (_normalize(_answer_part(pred)), _normalize(_answer_part(gold)))
    except Exception as err:  # a grader bug: reported, and counted by the caller as an error
        print(f"grader error on {pred!r} vs {gold!r}: {err!r}", file=sys.stderr)
        return False, "error"
    return (bool(p), "ok") if p == g or not p else _WORKER.call(p, g, timeout)  # bounded: in the worker

def grade(text, gold, timeout=1.0):
    """Grade one completion: (correct: bool, answer: str | None, status: "ok" | "timeout" | "error"), with
    answer = extract_answer(text) and (correct, status) = answers_equal(answer, gold, timeout)."""
    answer = extract_answer(text)
    correct, status = answers_equal(answer, gold, timeout)
    return correct, answer, status


if __name__ == "__main__":
    main()
