"""ESTIMATE of the peak GPU memory of one rgra.py training micro-batch on Qwen2.5-1.5B-Instruct,
made on CPU.

Run:  OMP_NUM_THREADS=1 python bench/memory_estimate.py   (offline, CPU only: ~5 min, ~6 GB RAM)

Setting: rgra defaults (kl_coef 0.04, bf16 autocast over fp32 master weights, AdamW, micro-batch
8 = one group, --share-prompt ON, gradient checkpointing OFF), a 150-token prompt, 8 completions
at the 512-token budget (the worst micro-batch), steady state (grads and AdamW moments exist);
full fine-tune and --lora-rank 128 (alpha 32, q,k,v,o,gate,up,down), each also with
--gradient-checkpointing (which turns --share-prompt off). Method:
1. Static: Qwen2.5-1.5B-Instruct built on the meta device from its config.json (QWEN), params
   counted (LoRA's after rgra.add_lora): fp32 weights 4 B, grads 4 B + AdamW moments 8 B per
   trainable param, full FT's bf16 reference model 2 B/param (LoRA's reference is the policy
   with its adapters off: no copy).
2. Small Qwen2 models (head_dim 128, GQA) run rgra.accumulate_gradients (completion_logprobs,
   token_loss, backward) under torch.autocast("cpu", bfloat16) at the real token geometry;
   tensors saved for backward (saved_tensors_hooks, deduplicated by storage) are split into the
   last decoder layer, the rest ("head": embedding, norm, lm_head, logits) and autocast's bf16
   weight copies (counted per weight). Fits: per layer c0 + a*hidden + b*intermediate +
   c*kv_dim (4 sizes); head d0 + d1*hidden + d2*vocab (3 runs).
3. The fp32 logits are copied around the loss, so the peak exceeds the saved bytes: torch's
   profiler's peak of live CPU bytes at two vocab sizes gives k, bytes per completion token per
   vocab entry at the peak (for d2). Checkpointing keeps each layer's fp32 input (+ one
   recomputed layer where that exceeds the logits).
4. Check: the same formulas predict the profiler's peak for a held-out small model.
Not included: CUDA context, allocator fragmentation, workspaces; the rollout and no-grad passes
(need less).
"""

import collections
import json
import os
import sys
import tempfile

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rgra  # noqa: E402 - rgra.py is found through the path set just above

# Qwen2.5-1.5B-Instruct's config.json (model card: 1.54B params, 28 layers, 12/2 heads).
QWEN = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-6,
}
HEAD_DIM = 128
# The micro-batch: one group of MICRO_BATCH completions of COMPLETION_LEN tokens to one prompt of
# PROMPT_LEN tokens.
MICRO_BATCH = 8
PROMPT_LEN = 150
COMPLETION_LEN = 512
# Completion tokens of the micro-batch: the logits exist for these only.
TOKENS = MICRO_BATCH * COMPLETION_LEN
LORA_RANK = 128
GIB = 2**30
MIB = 2**20
# The four settings estimated: name -> (LoRA, gradient checkpointing).
SETTINGS = {
    "full FT": (False, False),
    "full FT + ckpt": (False, True),
    "LoRA 128": (True, False),
    "LoRA 128 + ckpt": (True, True),
}
ROWS = [
    "fp32 weights (+ adapters)",
    "fp32 grads (trainable)",
    "AdamW moments (trainable)",
    "bf16 reference model",
    "bf16 weight copies (autocast)",
    "activations: decoder layers",
    "activations: embed/norm/lm_head",
    "logits + loss transients at peak",
    "peak estimate (sum)",
    "left of an 80 GB GPU (74.5 GiB)",
]


def small_config(hidden, intermediate, kv_heads=1, layers=2, vocab=4000):
    """A small Qwen2 config with Qwen2.5's layer structure: heads of 128 dimensions, kv_heads of
    them for keys and values (GQA), tied embeddings, sdpa attention."""
    return Qwen2Config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // HEAD_DIM,
        head_dim=HEAD_DIM,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        tie_word_embeddings=True,
    )


def random_rollout(vocab):
    """The micro-batch as an rgra.Rollout of random tokens below vocab: one prompt, MICRO_BATCH
    completions, random advantages and reference log-probs (KL on, as by default)."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(vocab, (PROMPT_LEN,), generator=generator).tolist()
    completions = []
    for _ in range(MICRO_BATCH):
        completions.append(torch.randint(vocab, (COMPLETION_LEN,), generator=generator).tolist())
    advantages = torch.randn(MICRO_BATCH, generator=generator)
    ref_logp = torch.randn(MICRO_BATCH, COMPLETION_LEN, generator=generator)
    return rgra.Rollout(
        prompt_ids=[prompt] * MICRO_BATCH,
        completion_ids=completions,
        rewards=torch.zeros(MICRO_BATCH),
        advantages=advantages,
        keep=torch.ones(MICRO_BATCH, dtype=torch.bool),
        truncated=torch.zeros(MICRO_BATCH, dtype=torch.bool),
        ref_logp=ref_logp,
    )


class SavedTensors:
    """The bytes of the tensors autograd saves for backward, each storage counted once, by (kind,
    place). kind: "act" (an activation), "wbase" (autocast's bf16 copy of a weight) or "wadapt"
    (of a LoRA adapter's weight); place: "layer" (the last decoder layer), "other" (the other
    decoder layers) or "head" (embedding, norm, lm_head, logits and loss)."""

    def __init__(self, model, lora):
        """Follow the forward of model's decoder layers, to know where a tensor is saved."""
        self.lora = lora
        self.last = model.model.layers[-1]
        self.place = "head"
        # storage address -> ((kind, place), bytes)
        self.storages = {}
        # The shapes of the 2-D weights, either way round.
        self.weight_shapes = set()
        for param in model.parameters():
            if param.dim() == 2:
                self.weight_shapes.add(tuple(param.shape))
                self.weight_shapes.add(tuple(param.shape[::-1]))
        for layer in model.model.layers:
            layer.register_forward_pre_hook(self.enter_layer)
            layer.register_forward_hook(self.leave_layer)

    def enter_layer(self, layer, inputs):
        """Forward pre-hook of a decoder layer: what is saved now belongs to that layer."""
        self.place = "other"
        if layer is self.last:
            self.place = "layer"

    def leave_layer(self, layer, inputs, output):
        """Forward hook of a decoder layer: what is saved now belongs to the head."""
        self.place = "head"

    def pack(self, tensor):
        """saved_tensors_hooks' pack: count the tensor's storage, keep the tensor itself."""
        # A bf16 tensor shaped like a weight is a copy made by autocast; under LoRA, one with a
        # grad_fn is an adapter's.
        shape = tensor.shape[-2:]
        copy = tensor.dtype == torch.bfloat16 and tuple(shape) in self.weight_shapes
        copy = copy and shape.numel() == tensor.numel()
        kind = "act"
        if copy:
            kind = "wbase"
        if copy and self.lora and tensor.grad_fn is not None:
            kind = "wadapt"
        storage = tensor.untyped_storage()
        self.storages.setdefault(storage.data_ptr(), ((kind, self.place), storage.nbytes()))
        return tensor

    def unpack(self, tensor):
        """saved_tensors_hooks' unpack: the tensor itself."""
        return tensor

    def totals(self):
        """Counter (kind, place) -> bytes."""
        totals = collections.Counter()
        for key, size in self.storages.values():
            totals[key] += size
        return totals


def profiler_peak(profile):
    """The peak of the CPU bytes allocated during a torch.profiler profile, above those allocated
    before it began."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        profile.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = [event["args"] for event in events if event.get("name") == "[memory]"]
    # An event's "Total Allocated" includes its own "Bytes".
    before = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(m["Total Allocated"] for m in memory) - before


def measure(config, lora, ckpt):
    """Counter of one micro-batch's forward and backward on a model of config: the saved bytes by
    (kind, place) (see SavedTensors), "peak" (the profiler's peak of new CPU bytes) and the numbers
    of base ("n_base") and adapter ("n_adapt") weights of the last decoder layer. It measures the
    second of two micro-batches, when .grad and autocast's cache exist, as in a running step."""
    model = Qwen2ForCausalLM(config)
    flags = ["--device", "cpu", "--bf16"]
    if lora:
        flags += ["--lora-rank", str(LORA_RANK)]
    if ckpt:
        flags += ["--gradient-checkpointing"]
    cfg = rgra.parse_args(flags)
    # Full FT: autocast caches one bf16 copy per weight; LoRA: frozen weights and .t() views are
    # not cached.
    if lora:
        rgra.add_lora(model, LORA_RANK, cfg.lora_alpha)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rollout = random_rollout(config.vocab_size)
    saved = SavedTensors(model, lora)
    every = list(range(MICRO_BATCH))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rgra.accumulate_gradients(model, rollout, every, cfg)
        with (
            torch.profiler.profile(profile_memory=True) as profile,
            torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack),
        ):
            rgra.accumulate_gradients(model, rollout, every, cfg)
    out = saved.totals()
    out["peak"] = profiler_peak(profile)
    for name, param in saved.last.named_parameters():
        if param.dim() != 2:
            continue
        if "lora_" in name:
            out["n_adapt"] += param.numel()
        else:
            out["n_base"] += param.numel()
    return out


def solve(rows, values):
    """Least-squares coefficients x of rows @ x = values, in float64, as a list."""
    rows = torch.tensor(rows).double()
    values = torch.tensor(values).double()[:, None]
    return torch.linalg.lstsq(rows, values).solution[:, 0].tolist()


def fit(lora, ckpt):
    """Coefficients from small models: "head" (d0, d1, d2: saved head bytes = d0 + d1 hidden + d2
    vocab), "k" (peak bytes per completion token per vocab entry), bf16 copies per weight
    "w_base", "w_head", "w_adapt", and without checkpointing (layers are opaque with it) "layer"
    (c0, a, b, c: one layer's saved bytes = c0 + a hidden + b intermediate + c kv_dim)."""
    configs = {
        "A": small_config(256, 1493),
        "B": small_config(512, 1493),
        "V2": small_config(256, 1493, vocab=8000),
    }
    if not ckpt:
        configs["C"] = small_config(256, 2987)
        configs["D"] = small_config(512, 1493, kv_heads=2)
    runs = {key: measure(config, lora, ckpt) for key, config in configs.items()}
    embedding = {key: c.vocab_size * c.hidden_size for key, c in configs.items()}
    # The bf16 lm_head copies made in the measured micro-batch: full FT's came from the cache.
    made = {}
    for key in configs:
        made[key] = max(0, runs[key]["wbase", "head"] - 2 * embedding[key] * (not lora))
    head_runs = ("A", "B", "V2")
    head_rows = [[1, configs[k].hidden_size, configs[k].vocab_size] for k in head_runs]
    a = runs["A"]
    # V2 has 4000 more vocabulary entries than A.
    peak_gap = runs["V2"]["peak"] - made["V2"] - a["peak"] + made["A"]
    coefficients = {
        "head": solve(head_rows, [runs[k]["act", "head"] for k in head_runs]),
        "k": peak_gap / (TOKENS * 4000),
        "w_base": a["wbase", "layer"] / 2 / a["n_base"],
        "w_head": a["wbase", "head"] / 2 / embedding["A"],
        "w_adapt": a["wadapt", "layer"] / 2 / max(1, a["n_adapt"]),
    }
    if not ckpt:
        layer_rows = []
        for c in configs.values():
            layer_rows.append(
                [1, c.hidden_size, c.intermediate_size, c.num_key_value_heads * HEAD_DIM]
            )
        coefficients["layer"] = solve(layer_rows, [runs[k]["act", "layer"] for k in configs])
    return coefficients


def predict(coefficients, layer_fit, config, lora, ckpt):
    """Bytes of one micro-batch on a model of config, from the fit of its setting (coefficients)
    and the per-layer fit without checkpointing (layer_fit): saved "layers" and "head",
    "logits" at the peak, autocast's bf16 weight "copies", and "made": the copies made during
    the micro-batch, not taken from autocast's cache."""
    hidden = config.hidden_size
    intermediate = config.intermediate_size
    vocab = config.vocab_size
    kv_dim = config.num_key_value_heads * HEAD_DIM
    c0, a, b, c = layer_fit["layer"]
    one_layer = c0 + a * hidden + b * intermediate + c * kv_dim
    logits = coefficients["k"] * TOKENS * vocab
    layers = config.num_hidden_layers * one_layer
    if ckpt:
        # Each layer's fp32 input, for every token (no shared prompt), and one layer recomputed in
        # backward, where it exceeds the logits.
        sequence_tokens = MICRO_BATCH * (PROMPT_LEN + COMPLETION_LEN)
        inputs = config.num_hidden_layers * sequence_tokens * hidden * 4
        recomputed = one_layer * sequence_tokens / (TOKENS + PROMPT_LEN)
        layers = inputs + max(0, recomputed - logits)
    # A layer's weights: q and o (hidden x hidden), k and v (kv_dim x hidden), gate, up and down
    # (intermediate x hidden); its adapters: A (rank x in) and B (out x rank) of each.
    base = hidden * (2 * hidden + 2 * kv_dim + 3 * intermediate)
    adapters = LORA_RANK * (9 * hidden + 2 * kv_dim + 3 * intermediate) * lora
    # Full FT's copies are cached by autocast: at least one per weight.
    cached = not lora
    per_layer = max(cached, coefficients["w_base"]) * base + coefficients["w_adapt"] * adapters
    head_copies = max(cached, coefficients["w_head"]) * vocab * hidden
    copies = 2 * (config.num_hidden_layers * per_layer + head_copies)
    made = copies - 2 * cached * (config.num_hidden_layers * base + vocab * hidden)
    head = coefficients["head"][0] + coefficients["head"][1] * hidden
    return {"layers": layers, "head": head, "logits": logits, "copies": copies, "made": made}


def print_fits(fits):
    """Print the fitted bytes per token of each setting."""
    print(
        f"measured on small Qwen2 models, micro-batch {MICRO_BATCH} x ({PROMPT_LEN} prompt + "
        f"{COMPLETION_LEN} completion) tokens, B = bytes:"
    )
    kv_dim = QWEN["num_key_value_heads"] * HEAD_DIM
    for name, setting in SETTINGS.items():
        f = fits[setting]
        print(
            f"  {name:16s} head saves {f['head'][1] / TOKENS:.2f} B/(token*hidden) + "
            f"{f['head'][2] / TOKENS:.2f} B/(token*vocab), peak {f['k']:.2f} B/(token*vocab); "
            f"bf16 copies per weight: layers {f['w_base']:.2f}, adapters {f['w_adapt']:.2f}, "
            f"lm_head {f['w_head']:.2f}"
        )
        if "layer" not in f:
            continue
        c0, a, b, c = (x / TOKENS for x in f["layer"])
        at_qwen = c0 + a * QWEN["hidden_size"] + b * QWEN["intermediate_size"] + c * kv_dim
        print(
            f"{'':19s}a layer saves per completion token {c0:.0f} + {a:.2f}*hidden + "
            f"{b:.2f}*intermediate + {c:.2f}*kv_dim B = {at_qwen / 1024:.1f} KiB at 1.5B shapes"
        )


def print_check(fits):
    """Print the prediction for a held-out small model against the profiler's peak. What the
    profiler sees leaves out autocast's cached copies."""
    print(
        "check, held-out model (hidden 768, intermediate 4480, 6 q heads per kv head, 3 layers, "
        "vocab 8000):"
    )
    test = small_config(768, 4480, layers=3, vocab=8000)
    for name, (lora, ckpt) in SETTINGS.items():
        parts = predict(fits[lora, ckpt], fits[lora, False], test, lora, ckpt)
        predicted = parts["layers"] + parts["head"] + parts["logits"] + parts["made"]
        profiled = measure(test, lora, ckpt)["peak"]
        print(
            f"  {name:16s} predicted {predicted / MIB:6.1f} MiB, "
            f"profiler {profiled / MIB:6.1f} MiB ({predicted / profiled - 1:+.1%})"
        )


def estimate(fits, config, lora, ckpt):
    """The ROWS of one setting for a model of config (a Qwen2Config), in bytes: each component,
    their sum (the peak estimate) and what is left of 80 GB. fits: fit(lora, ckpt) and
    fit(lora, False) by (lora, ckpt)."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
        params = sum(p.numel() for p in model.parameters())
        rgra.add_lora(model, LORA_RANK, 32.0)
        lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts = predict(fits[lora, ckpt], fits[lora, False], config, lora, ckpt)
    trainable = params
    if lora:
        trainable = lora_params
    column = [
        4 * (params + lora_params * lora),
        4 * trainable,
        8 * trainable,
        2 * params * (not lora),
        parts["copies"],
        parts["layers"],
        parts["head"],
        parts["logits"],
    ]
    column.append(sum(column))
    column.append(80e9 - column[-1])
    return column


def set_micro_batch(sequences, completion_len, prompt_len=150):
    """Estimate, from now on in this process, for micro-batches of `sequences` completions of
    completion_len tokens to one prompt of prompt_len tokens (the defaults: 8, 512, 150)."""
    global MICRO_BATCH, PROMPT_LEN, COMPLETION_LEN, TOKENS
    MICRO_BATCH = sequences
    PROMPT_LEN = prompt_len
    COMPLETION_LEN = completion_len
    TOKENS = MICRO_BATCH * COMPLETION_LEN


def peak_estimate_gib(config, lora, ckpt=False):
    """The peak estimate in GiB of one training micro-batch of a model of config (a Qwen2Config),
    rgra defaults and this file's micro-batch, fitted afresh on small models (about 20 s of one
    CPU core per fit). bench/gpu_check.py prints it beside the measured peak."""
    fits = {(lora, False): fit(lora, False)}
    if ckpt:
        fits[lora, True] = fit(lora, True)
    return estimate(fits, config, lora, ckpt)[-2] / GIB


def main():
    """Fit on small models, check on a held-out one, and print the estimate for Qwen2.5-1.5B."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    fits = {setting: fit(*setting) for setting in SETTINGS.values()}
    config = Qwen2Config(**QWEN)
    with torch.device("meta"):
        qwen = Qwen2ForCausalLM(config)
        params = sum(p.numel() for p in qwen.parameters())
        rgra.add_lora(qwen, LORA_RANK, 32.0)
        lora_params = sum(p.numel() for p in qwen.parameters() if p.requires_grad)
    print_fits(fits)
    print_check(fits)
    print(
        f"\nQwen2.5-1.5B-Instruct (meta device): {params:,} parameters; "
        f"LoRA rank {LORA_RANK} trainable: {lora_params:,}"
    )
    print(
        "\nESTIMATE of peak GPU memory (GiB = 2^30 B) in one training micro-batch, rgra defaults:"
    )
    table = {name: estimate(fits, config, *setting) for name, setting in SETTINGS.items()}
    print(f"{'component':34s}" + "".join(f"{name:>17s}" for name in SETTINGS))
    for j, row in enumerate(ROWS):
        print(f"{row:34s}" + "".join(f"{table[name][j] / GIB:>17.2f}" for name in SETTINGS))
    print(
        "not included: CUDA context (~0.5 GiB), allocator fragmentation, "
        "cuBLAS/attention workspaces"
    )


if __name__ == "__main__":
    main()
