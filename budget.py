"""
budget.py: the compute budget of a staged model series, and the named model shapes (no torch; plain arithmetic).

The idea (Yano et al., "efficient construction of a model series by staged pretraining with
model expansion", COLM 2025, arXiv 2504.00623):

- Section 2.1: a series of sizes X_1 < X_2 < ... < X_n. Training size X on T tokens from scratch
  costs FLOPs(X, T) = 6·X·T. T_i is the token count the scratch run of size X_i would use; the
  paper takes 2x Chinchilla (Chinchilla: 20 tokens per parameter), i.e. 40 tokens per parameter.
- Section 2.2: train X_1 from scratch on T_1 tokens. Grow it (bert2BERT, grow.py) into X_2 and train
  on with what is left of X_2's scratch budget: FLOPs(X_2, T_2) - (everything spent so far). And so
  on. Stage i+1 therefore trains (FLOPs(X_{i+1}, T_{i+1}) - sum_{j<=i} spent_j) / (6·X_{i+1}) tokens,
  and the whole series costs FLOPs(X_n, T_n): the price of the largest member alone.
- Section 3.3: the staged series reads more tokens than the largest model alone would (small models
  are cheap per token). The "fixed data" variant caps the unique tokens at the largest scratch run's
  count (320B for 8B) and lets later stages repeat data.
- Section 3.4: for [1B, 2B, 4B, 8B] at 2x Chinchilla the scratch runs cost [0.24, 0.96, 3.84, 15.36]
  ZFLOPs = 20.4 ZFLOPs in all; the staged series costs 15.36 ZFLOPs, about 25% less.

X is the non-embedding parameter count unless told otherwise (the CLI says which it used).

Usage:
  python budget.py --sizes 1B,2B,4B,8B --tokens_per_param 40 --gpus 8 --gpu H100 --mfu 0.4
  python budget.py configs/SERIES.py [--fixed_data] [--count total --vocab_size 50304]
  python budget.py --memory --sizes paper-1B,paper-2B,paper-4B,paper-8B --gpus 8 --gpu H100   # memory per GPU
  python budget.py --memory configs/SERIES.py                   # at the config's micro-batch, context, accumulation
  python budget.py --shapes                                     # the named shapes and their parameter counts
"""
import argparse
import math
import re
import runpy
import sys
from dataclasses import dataclass

# -----------------------------------------------------------------------------
# FLOPs and tokens (section 2.1)

def flops(X, T):
    """Training FLOPs of X parameters on T tokens: 6·X·T (forward 2, backward 4 per param per token)."""
    return 6 * X * T

def chinchilla_tokens(X, multiplier=1.0):
    """Chinchilla-optimal tokens, 20 per parameter; multiplier=2 is the paper's '2x Chinchilla rule'."""
    return round(20 * X * multiplier)

def flops_per_token(n_params, n_layers, d_model, seq_len):
    """FLOPs per token including attention scores, as nanoGPT's MFU estimate: 6N + 12·L·d·T.
    6N counts the weight matmuls; 12·L·d·T the QK^T and AV products (fwd+bwd) over a T-long context."""
    return 6 * n_params + 12 * n_layers * d_model * seq_len

# -----------------------------------------------------------------------------
# Parameter counts: parsing "1.5B" and the closed form of a Llama's non-embedding parameters

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}

def parse_size(s):
    """'1B' -> 1_000_000_000, '125M', '350K', '1.5B', '2e9', 1e9 -> int."""
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return round(s)
    m = re.fullmatch(r"\s*([0-9][0-9_]*\.?[0-9]*(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(s))
    if not m:
        raise ValueError(f"cannot parse size {s!r}: expected a number with an optional K/M/B/T suffix, e.g. 1B, 125M, 1.5B")
    return round(float(m.group(1)) * _SUFFIX[m.group(2).upper()])

def llama_non_embedding_params(d_model, n_layers, n_heads, n_kv_heads=None, ffn_dim=None, head_dim=None):
    """Closed form of a Llama block stack (no token embedding, no lm_head; model.py counts real tensors).
    Per layer: q and o are d x (n_heads·hd), k and v are d x (n_kv_heads·hd) (GQA), SwiGLU has three
    d x ffn matrices, and two RMSNorm gains of d. Plus the final RMSNorm gain. No biases (Llama)."""
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    hd = head_dim or d_model // n_heads
    attn = d_model * (n_heads * hd) + 2 * d_model * (n_kv_heads * hd) + (n_heads * hd) * d_model
    mlp = 3 * d_model * ffn_dim
    return n_layers * (attn + mlp + 2 * d_model) + d_model

def embedding_params(vocab_size, d_model, tied=False):
    """Token embedding plus lm_head (one matrix when tied)."""
    return vocab_size * d_model * (1 if tied else 2)

# -----------------------------------------------------------------------------
# The named shapes: plain dicts of model.ModelConfig fields (model.config_from_shape builds one; `python budget.py
# --shapes` lists them with their parameter counts)

# The paper's Table 3 (appendix A): hidden size, FFN size, layers, heads; head dim 128 throughout.
PAPER_SHAPES = {
    "paper-1B": dict(d_model=2048, ffn_dim=7168, n_layers=18, n_heads=16, n_kv_heads=16),
    "paper-2B": dict(d_model=2560, ffn_dim=8960, n_layers=22, n_heads=20, n_kv_heads=20),
    "paper-4B": dict(d_model=3200, ffn_dim=11200, n_layers=27, n_heads=25, n_kv_heads=25),
    "paper-8B": dict(d_model=4096, ffn_dim=14336, n_layers=33, n_heads=32, n_kv_heads=32),
}


def _paper(name):
    # GPT-2 vocabulary padded to 50304 (section 3.1), context 1024 (section 3.2), untied embeddings as in Llama
    return dict(**PAPER_SHAPES[name], vocab_size=50304, max_seq_len=1024, rope_theta=10000.0, tie_embeddings=False)


def _passuntil_family(i, vocab_size=50304):
    # Hu et al. 2024 (PassUntil), appendix: one consistent family; layers 4i, heads floor(i(8+i)/4), head dim 64,
    # FFN 2.5 d (rounded up to a multiple of 64), tied embeddings.
    heads = (i * (8 + i)) // 4
    d = 64 * heads
    return dict(vocab_size=vocab_size, d_model=d, n_layers=4 * i, n_heads=heads, n_kv_heads=heads,
                ffn_dim=64 * math.ceil(2.5 * d / 64), max_seq_len=1024, tie_embeddings=True)


def _cpu(d, layers, ffn):
    # small shapes for the CPU: byte vocabulary, head dim 16, context 256; each one roughly doubles
    # the non-embedding parameters of the one before (the paper's x2 per stage, section 3.2)
    return dict(vocab_size=320, d_model=d, n_layers=layers, n_heads=d // 16, n_kv_heads=d // 16,
                ffn_dim=ffn, max_seq_len=256, tie_embeddings=False)


SHAPES = {
    **{name: _paper(name) for name in PAPER_SHAPES},
    **{f"pu{i}": _passuntil_family(i) for i in range(1, 9)},
    "cpu-1": _cpu(64, 2, 176),
    "cpu-2": _cpu(80, 3, 192),
    "cpu-3": _cpu(96, 4, 256),
    "cpu-4": _cpu(128, 4, 384),
    "tiny": dict(_cpu(128, 4, 352), n_heads=4, n_kv_heads=4),  # nanoGPT-comparable: 4 heads of 32
    # the reproduction's series at 40 tokens per parameter (experiments/reproduce.py): 12K, 24K, 46K, 82K, small enough
    # that the whole grown series reads the embedded corpus's pretraining split at most once (fresh data stays fresh)
    "micro-1": _cpu(32, 1, 80),
    "micro-2": _cpu(32, 2, 80),
    "micro-3": _cpu(48, 2, 96),
    "micro-4": _cpu(64, 2, 128),
}

# A training run's micro-batch per GPU, context and gradient accumulation when its config leaves them out:
# train.TrainConfig's defaults, kept here at the bottom of the imports so that --memory plans a config at
# what train.py runs it with
DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN, DEFAULT_GRAD_ACCUM = 16, 256, 1

# -----------------------------------------------------------------------------
# The staged series (section 2.2)

@dataclass
class Stage:
    name: str
    params: int            # X_i
    scratch_tokens: int    # T_i: what a scratch run of this size would train on
    scratch_flops: int     # FLOPs(X_i, T_i)
    staged_tokens: int     # what this stage trains on in the staged series
    staged_flops: int      # 6 · X_i · staged_tokens
    cumulative_flops: int  # spent by stages 1..i (= FLOPs(X_i, T_i) up to rounding)

def staged_budget(sizes, tokens_per_param=40, names=None, tokens=None):
    """Tokens and FLOPs per stage. sizes: parameter counts (ints or '1B'-style strings), strictly
    increasing. tokens: optional explicit scratch token counts T_i (else tokens_per_param · X_i)."""
    sizes = [parse_size(x) for x in sizes]
    n = len(sizes)
    if n == 0:
        raise ValueError("sizes is empty: give at least one model size, e.g. --sizes 1B,2B")
    names = list(names) if names is not None else [_human(x) for x in sizes]
    if len(names) != n:
        raise ValueError(f"got {len(names)} names for {n} sizes")
    for i, x in enumerate(sizes):
        if x <= 0:
            raise ValueError(f"stage {i+1} '{names[i]}' has size {x}: sizes must be positive")
        if i > 0 and x <= sizes[i - 1]:
            raise ValueError(f"sizes must be strictly increasing (section 2.1): stage {i+1} '{names[i]}' "
                             f"has {x:,} params after {sizes[i-1]:,}")
    if tokens is None:
        if not tokens_per_param > 0:
            raise ValueError(f"tokens_per_param must be positive, got {tokens_per_param}")
        tokens = [round(tokens_per_param * x) for x in sizes]
    else:
        tokens = [parse_size(t) for t in tokens]
        if len(tokens) != n:
            raise ValueError(f"got {len(tokens)} token counts for {n} sizes")
        for i, t in enumerate(tokens):
            if t <= 0:
                raise ValueError(f"stage {i+1} '{names[i]}' has {t} scratch tokens: token counts must be positive")
    stages, spent = [], 0
    for i, (name, X, T) in enumerate(zip(names, sizes, tokens)):
        budget = flops(X, T)
        # integer division: a stage never overspends; the remainder (< 6X FLOPs) is simply not used
        t = (budget - spent) // (6 * X)
        if t <= 0:
            raise ValueError(f"stage {i+1} '{name}' gets no tokens: its scratch budget FLOPs(X={X:,}, T={T:,}) = "
                             f"{budget:.4g} is already spent by stages 1..{i} ({spent:.4g} FLOPs); give it more "
                             f"scratch tokens or make the earlier stages smaller")
        spent += flops(X, t)
        stages.append(Stage(name, X, T, budget, t, flops(X, t), spent))
    return stages

@dataclass
class Summary:
    scratch_flops: int    # every member trained alone, summed
    staged_flops: int     # the staged series (= FLOPs of the largest member alone)
    largest_flops: int    # the largest member's scratch run
    saving: float         # 1 - staged / scratch
    staged_tokens: int    # tokens read by the staged series, all stages
    largest_tokens: int   # tokens read by the largest member alone

def summarize(stages):
    scratch = sum(s.scratch_flops for s in stages)
    staged = stages[-1].cumulative_flops
    return Summary(scratch, staged, stages[-1].scratch_flops, 1 - staged / scratch,
                   sum(s.staged_tokens for s in stages), stages[-1].scratch_tokens)

# -----------------------------------------------------------------------------
# Fixed data (section 3.3): unique tokens capped at the largest scratch run's count

@dataclass
class DataUse:
    name: str
    tokens: int    # tokens this stage trains on
    unique: int    # of which read for the first time
    repeated: int  # of which seen before (the corpus is read in order; past the cap it wraps)

def fixed_data(stages, cap=None):
    """(cap, [DataUse per stage]). Stages read the corpus in order; once `cap` unique tokens have been
    read, every further token is a repeat. cap defaults to the largest member's scratch token count."""
    cap = stages[-1].scratch_tokens if cap is None else parse_size(cap)
    uses, seen = [], 0
    for s in stages:
        unique = max(0, min(s.staged_tokens, cap - seen))
        uses.append(DataUse(s.name, s.staged_tokens, unique, s.staged_tokens - unique))
        seen += unique
    return cap, uses

# -----------------------------------------------------------------------------
# GPU time

# bf16 dense tensor-core peaks (no sparsity), FLOP/s per GPU, from the vendors' datasheets. The H200 NVL (PCIe card,
# 600 W) has its own: NVIDIA's H200 page (nvidia.com/en-us/data-center/h200) lists BF16 1,979 TFLOPS for the SXM and
# 1,671 for the NVL, both with sparsity: 989 and 835 dense. The longest name wins, so "H200 NVL" is not the SXM's.
PEAK_FLOPS = {
    "A100": 312e12, "H100": 989e12, "H100SXM": 989e12, "H100PCIE": 756e12, "H100NVL": 835e12,
    "H200": 989e12, "H200NVL": 835e12, "GH200": 989e12, "B200": 2250e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
}

def peak_flops(gpu):
    """Peak FLOP/s from a number ('989e12', 3.1e14) or a GPU name, including torch device names such as
    'NVIDIA H100 80GB HBM3' (the longest known name inside it wins). None when unknown: then say
    'unknown' rather than guess (an A100 peak on an H100 gives a wrong MFU)."""
    try:
        return float(gpu)
    except (TypeError, ValueError):
        pass
    return _by_gpu_name(PEAK_FLOPS, gpu)

def _by_gpu_name(table, gpu):
    key = re.sub(r"[^A-Z0-9]", "", str(gpu).upper()).replace("NVIDIA", "")
    hits = [k for k in table if k in key]
    return table[max(hits, key=len)] if hits else None

def gpu_hours(flops_, peak_flops_per_gpu, mfu):
    """GPU-hours to spend `flops_` at a model FLOPs utilization `mfu` of the peak (independent of the
    GPU count; divide by the count for wall-clock hours)."""
    return flops_ / (peak_flops_per_gpu * mfu) / 3600

def wall_hours(flops_, n_gpus, peak_flops_per_gpu, mfu):
    return gpu_hours(flops_, peak_flops_per_gpu, mfu) / n_gpus

def gpu_days(flops_, peak_flops_per_gpu, mfu):
    return gpu_hours(flops_, peak_flops_per_gpu, mfu) / 24

# -----------------------------------------------------------------------------
# Series config files: plain Python assignments, `stages = [dict(name=, shape= | params= | d_model=...)]`

_SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "ffn_dim")

def named_shape(shape, where, hint=""):
    """A named shape's dict (SHAPES). ValueError naming `where` for an unknown name."""
    if shape not in SHAPES:
        raise ValueError(f"{where}: unknown shape {shape!r} (known: {', '.join(SHAPES)}){hint}")
    return SHAPES[shape]

def stage_params(stage, count="non-embedding", vocab_size=None, tied=False):
    """X for one config stage dict: `params` as given, or the closed form from a shape (a Table 3 name
    in `shape`, a dict in `shape`, or d_model/n_layers/n_heads/n_kv_heads/ffn_dim keys on the stage)."""
    name = stage.get("name", "?")
    if "params" in stage:
        if count == "total":
            raise ValueError(f"stage '{name}' gives params={stage['params']}: --count total needs a shape (d_model etc.)")
        return parse_size(stage["params"])
    shape = stage.get("shape", stage)
    if isinstance(shape, str):
        shape = named_shape(shape, f"stage '{name}'", "; or give params= or d_model, n_layers, n_heads, n_kv_heads, ffn_dim")
    missing = [k for k in _SHAPE_KEYS if k not in shape]
    if missing:
        raise ValueError(f"stage '{name}' has no params= and its shape lacks {', '.join(missing)}")
    X = llama_non_embedding_params(shape["d_model"], shape["n_layers"], shape["n_heads"],
                                   shape.get("n_kv_heads"), shape["ffn_dim"], shape.get("head_dim"))
    if count == "total":
        if not vocab_size:
            raise ValueError("--count total needs a vocab size (--vocab_size or vocab_size in the config)")
        X += embedding_params(vocab_size, shape["d_model"], tied)
    return X

def load_config(path):
    """Execute a config file (plain assignments) into a dict of its public names."""
    try:
        g = runpy.run_path(path)
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}")
    except Exception as e:  # a typo in the config: one line naming the file, not a traceback
        raise ValueError(f"cannot execute config {path}: {type(e).__name__}: {e}")
    return {k: v for k, v in g.items() if not k.startswith("_")}

# -----------------------------------------------------------------------------
# Memory per GPU (--memory): weights, gradients, AdamW state and activations, under DDP and FSDP

# GPU memory in GiB as sold; a name that says its size ("A100-SXM4-80GB") is taken at its word, and a bare
# "A100" is the smaller part.
GPU_MEMORY_GIB = {"A100": 40, "H100": 80, "H100NVL": 94, "H200": 141, "B200": 180, "L40S": 48, "L4": 24, "A10": 24}
RESERVE = 0.1  # of a GPU's memory left for the CUDA context, NCCL's buffers and the allocator's fragmentation

def gpu_memory(gpu):
    """Bytes of memory of a GPU: a number of GiB ('80'), a name with its size ('A100 80GB'), or a name from
    GPU_MEMORY_GIB (torch device names too). None when unknown."""
    try:
        return float(gpu) * 2**30
    except (TypeError, ValueError):
        pass
    sized = re.search(r"(\d+)\s*GB", str(gpu).upper())
    gib = int(sized.group(1)) if sized else _by_gpu_name(GPU_MEMORY_GIB, gpu)
    return gib * 2**30 if gib else None

# Precisions of a training step on a GPU, by how train.py runs it:
#   "amp"      DDP: float32 weights under bf16 autocast
#   "bf16"     FSDP: bf16 weights gathered for compute (MixedPrecisionPolicy), float32 shards, under autocast
#   "float32"  the CPU
PRECISIONS = ("amp", "bf16", "float32")

def block_activation_bytes(d_model, n_heads, n_kv_heads, head_dim, ffn_dim, precision):
    """Bytes one block of model.py's Llama keeps for backward, per token. Korthikanti et al. 2022 ("Reducing
    Activation Recomputation in Large Transformer Models", section 4.1) count them for GPT as
    s*b*h*(34 + 5*a*s/h) bytes per layer; redone here for this block (RMSNorm, RoPE, SwiGLU, SDPA's flash
    attention, no dropout) by listing what autograd saves, with ops.py's Functions:

      each of the 2 RMSNorms: its input and 1/rms (one float32), not its normalized copy; its output is
          kept by the matmuls that read it
      attention: q and k after RoPE, v, and SDPA's output (o_proj reads a view of it): 2 dq + 2 dkv values,
          dq = n_heads * head_dim, dkv = n_kv_heads * head_dim; and SDPA's logsumexp, n_heads floats.
          RoPE keeps only its cos and sin tables, and flash attention never stores the T x T attention
          matrix, so Korthikanti's 5as/h term (scores, softmax, its dropout mask) is gone
      SwiGLU: gate(x) and up(x) (silu is computed again in backward) and their gated product: 3 ffn values

    Bytes per value depend on the precision:
      float32  4 each:                                     16 d + 8 dq + 8 dkv + 12 ffn + 4 heads + 8
      bf16     2 each:                                      8 d + 4 dq + 4 dkv +  6 ffn + 4 heads + 8
      amp      the residual stream and the norms' outputs stay float32 (a norm's input: 4 d), and every
               matmul that reads a norm keeps its own bf16 cast of it (q, k, v after the first; gate, up
               after the second: 10 d):                    18 d + 4 dq + 4 dkv +  6 ffn + 4 heads + 8
               plus block_fixed_bytes, whatever the number of tokens
    tests/test_fsdp.py checks each line against the bytes torch saves (saved_tensors_hooks) on a small model."""
    dq, dkv = n_heads * head_dim, n_kv_heads * head_dim
    small = 4 * n_heads + 2 * 4  # logsumexp, and the two norms' 1/rms, in float32
    if precision == "float32":
        return 16 * d_model + 4 * (2 * dq + 2 * dkv + 3 * ffn_dim) + small
    if precision == "bf16":
        return 8 * d_model + 2 * (2 * dq + 2 * dkv + 3 * ffn_dim) + small
    if precision == "amp":
        return 18 * d_model + 2 * (2 * dq + 2 * dkv + 3 * ffn_dim) + small
    raise ValueError(f"unknown precision {precision!r}: one of {', '.join(PRECISIONS)}")

def block_fixed_bytes(matmul_params, seq_len, head_dim, precision):
    """Bytes a block keeps for backward whatever the batch: under amp, autocast's bf16 copy of each of its weight
    matrices, and RoPE's bf16 cos and sin for q and for k (4 tables of seq_len x head_dim/2)."""
    return 2 * matmul_params + 4 * seq_len * (head_dim // 2) * 2 if precision == "amp" else 0

def head_activation_bytes(d_model, vocab_size, precision):
    """Bytes per token kept for backward outside the blocks: the final RMSNorm (as in a block, with one reader,
    the lm_head), the float32 log-softmax of the logits (4 V), and the token ids and targets (int64)."""
    norm = {"float32": 8 * d_model, "bf16": 4 * d_model, "amp": 6 * d_model}[precision] + 4
    return norm + 4 * vocab_size + 16

@dataclass
class Memory:
    weights: float      # bytes per GPU: the parameters (and under FSDP the gathered bf16 copies in flight)
    grads: float
    optimizer: float    # AdamW's two float32 moments
    activations: float  # what backward needs, plus the loss's transient gradients

    @property
    def total(self):
        return self.weights + self.grads + self.optimizer + self.activations

def memory_per_gpu(shape, vocab_size, tied, micro_batch, seq_len, grad_accum, gpus, parallel, checkpointing):
    """Bytes per GPU at the peak of a training step of train.py on CUDA, for a shape dict (d_model, n_layers,
    n_heads, n_kv_heads, ffn_dim[, head_dim]):

      ddp   every GPU holds the float32 weights (4 bytes per parameter), their gradients (4, as views into
            DDP's buckets) and AdamW's two moments (8): 16 bytes per parameter
      fsdp  the same 16 bytes divided over the GPUs (the float32 shards are AdamW's master weights), plus
            the bf16 weights being used: the root group (embedding, final norm, lm_head: kept from forward
            to backward) and two blocks (the one running and the next, prefetched); one block's unsharded
            gradient in bf16 and float32 as it is reduce-scattered (after every micro-step, so accumulation
            keeps the gradients sharded: train.forward_backward)

    grad_accum changes none of it (DDP's unreduced gradients accumulate in its buckets; FSDP reduce-scatters
    every micro-step): it is an argument so that a config's setting reads through unchanged.

    Activations: n_layers blocks (block_activation_bytes), the head, and the loss's transient gradients
    (those of the log-probabilities and the logits at the start of backward, about 10 bytes per vocab entry
    in bf16, 8 in float32; an estimate: they are not saved tensors). With activation checkpointing a block
    keeps only its input (the residual stream: float32 under amp, bf16 under FSDP) and one block's
    activations are rebuilt at a time."""
    d, L, H = shape["d_model"], shape["n_layers"], shape["n_heads"]
    kv, f = shape.get("n_kv_heads") or H, shape["ffn_dim"]
    hd = shape.get("head_dim") or d // H
    X = llama_non_embedding_params(d, L, H, kv, f, hd)
    P = X + embedding_params(vocab_size, d, tied)
    block = (X - d) // L  # one block's parameters (X also holds the final norm's d)
    root = P - L * block
    tokens = micro_batch * seq_len
    precision = "amp" if parallel == "ddp" else "bf16"
    one_block = block_activation_bytes(d, H, kv, hd, f, precision) * tokens + block_fixed_bytes(block - 2 * d, seq_len, hd, precision)
    head = head_activation_bytes(d, vocab_size, precision) * tokens + (2 * vocab_size * d if precision == "amp" else 0)
    loss_transient = (8 if precision == "float32" else 10) * vocab_size * tokens
    kept = L * (4 if precision == "amp" else 2) * d * tokens + one_block if checkpointing else L * one_block
    activations = kept + head + loss_transient
    if parallel == "ddp":
        return Memory(4 * P, 4 * P, 8 * P, activations)
    if parallel != "fsdp":
        raise ValueError(f"unknown parallel {parallel!r}: ddp or fsdp")
    grads = 4 * P / gpus + 6 * block
    return Memory(4 * P / gpus + 2 * (root + 2 * block), grads, 8 * P / gpus, activations)

# -----------------------------------------------------------------------------
# CLI: print the table

_FLOP_UNITS = [(1e21, " ZFLOPs"), (1e18, " EFLOPs"), (1e15, " PFLOPs"), (1e12, " TFLOPs"), (1e9, " GFLOPs"), (1, " FLOPs")]
_COUNT_UNITS = [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")]

def _unit(x, units):
    # one unit per column, picked from its largest value, so the column reads 0.24 .. 15.36 ZFLOPs
    return next((u for u in units if abs(x) >= u[0]), units[-1])

def _human(x, unit=None, units=_COUNT_UNITS):
    scale, name = unit or _unit(x, units)
    return f"{x / scale:.4g}{name}"

def print_shapes():
    """--shapes: every named shape with its parameter counts, from the closed forms (tests/test_model.py checks
    them against the Llama's own count)."""
    print(f"{'shape':<10} {'d_model':>7} {'ffn':>6} {'layers':>6} {'heads':>5} {'kv':>3} {'vocab':>6} {'tied':>5} "
          f"{'non-embedding':>14} {'total':>14}")
    for name, s in SHAPES.items():
        X = llama_non_embedding_params(s["d_model"], s["n_layers"], s["n_heads"], s["n_kv_heads"], s["ffn_dim"])
        total = X + embedding_params(s["vocab_size"], s["d_model"], s["tie_embeddings"])
        print(f"{name:<10} {s['d_model']:>7} {s['ffn_dim']:>6} {s['n_layers']:>6} {s['n_heads']:>5} {s['n_kv_heads']:>3} "
              f"{s['vocab_size']:>6} {str(s['tie_embeddings']):>5} {X:>14,} {total:>14,}")

def main(argv=None):
    p = argparse.ArgumentParser(description="Compute budget of a staged model series (Yano et al. 2.2, 3.3, 3.4).")
    p.add_argument("config", nargs="?", help="series config file (plain Python: stages = [...], tokens_per_param = ...)")
    p.add_argument("--sizes", help="comma-separated sizes, e.g. 1B,2B,4B,8B (taken as non-embedding params)")
    p.add_argument("--names", help="comma-separated stage names (default: from the sizes)")
    p.add_argument("--tokens_per_param", type=float, help="scratch tokens per parameter (default 40 = 2x Chinchilla)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs, for wall-clock time")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpu", default="H100", help=f"GPU name for the bf16 peak ({', '.join(PEAK_FLOPS)})")
    g.add_argument("--peak", type=float, help="peak FLOP/s per GPU, e.g. 989e12")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization")
    p.add_argument("--fixed_data", action="store_true", help="cap unique tokens at the largest scratch run's (3.3)")
    p.add_argument("--count", choices=["non-embedding", "total"], default="non-embedding", help="what X counts")
    p.add_argument("--vocab_size", type=int, help="vocab size, for --count total")
    p.add_argument("--tied", action="store_true", help="tied embeddings, for --count total")
    p.add_argument("--memory", action="store_true", help="per-GPU memory of training each member (needs shapes: "
                   "--sizes paper-1B,... or a config), under DDP and FSDP, with and without activation checkpointing")
    p.add_argument("--batch_size", type=int, help="--memory: micro-batch per GPU (default: the config's, else 8)")
    p.add_argument("--seq_len", type=int, help="--memory: context (default: the config's, else 1024)")
    p.add_argument("--grad_accum", type=int, help="--memory: micro-steps per step (default: the config's, else 1)")
    p.add_argument("--shapes", action="store_true", help="list the named shapes with their parameter counts")
    p.error = lambda msg: (print(f"error: {msg}", file=sys.stderr), sys.exit(2))  # one line, not usage + error
    args = p.parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

def memory_report(args):
    """--memory: the per-GPU memory of every member (memory_per_gpu) under DDP and FSDP, with and without
    activation checkpointing, at the config's micro-batch, context and accumulation, and whether it fits."""
    if args.config and args.sizes:
        raise ValueError("give either a config file or --sizes, not both")
    cfg = load_config(args.config) if args.config else {}
    if args.config:
        if not isinstance(cfg.get("stages"), (list, tuple)) or not cfg["stages"]:
            raise ValueError(f"{args.config} sets no `stages = [dict(name=..., shape=...), ...]`")
        members = [(st.get("name", st.get("shape", "?")), st.get("shape", st)) for st in cfg["stages"]]
        # a stage's own activation_checkpointing (series.py) overrides the config's
        per_stage = [st.get("activation_checkpointing", cfg.get("activation_checkpointing", False)) for st in cfg["stages"]]
    elif args.sizes:
        members = [(name, name) for name in args.sizes.split(",")]
    else:
        raise ValueError("nothing to do: give a config file or --sizes paper-1B,paper-2B,paper-4B,paper-8B")
    shapes = []
    for name, shape in members:
        if isinstance(shape, str):
            shape = named_shape(shape, f"--memory: {name}", "; --memory needs model shapes: names such as paper-1B, or a config")
        missing = [k for k in _SHAPE_KEYS if k not in shape]
        if missing:
            raise ValueError(f"--memory: member '{name}' has no shape with {', '.join(missing)}")
        shapes.append((name, shape))

    def setting(key, fallback, train_default):
        # the flag, else the config's value, else what train.py runs the config with; no config: the fallback
        value = getattr(args, key)
        if value is None and args.config:
            value = cfg.get(key, train_default)
        if value is None:
            value = fallback
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
        return value

    micro, seq_len, accum = (setting("batch_size", 8, DEFAULT_BATCH_SIZE), setting("seq_len", 1024, DEFAULT_SEQ_LEN),
                             setting("grad_accum", 1, DEFAULT_GRAD_ACCUM))
    capacity = gpu_memory(args.gpu)
    if capacity is None:
        raise ValueError(f"unknown GPU memory for {args.gpu!r}: known {', '.join(GPU_MEMORY_GIB)}, or a name with its "
                         "size (A100-80GB), or a number of GiB")
    if args.gpus <= 0:
        raise ValueError(f"--gpus {args.gpus}: the GPUs the model is spread over must be 1 or more (one node of 8: --gpus 8)")
    usable = capacity * (1 - RESERVE)
    chosen = [(cfg.get("parallel", "ddp"), bool(c)) for c in per_stage] if args.config else None
    gib = lambda x: f"{x / 2**30:.1f}"
    print(f"per-GPU memory of a training step, GiB: {args.gpus} x {args.gpu} ({capacity / 2**30:g} GiB; a plan fits in "
          f"{usable / 2**30:.0f} GiB, {RESERVE:.0%} left for the CUDA context, NCCL and fragmentation)")
    print(f"micro-batch {micro} x {seq_len} tokens, grad_accum {accum}; ddp: float32 weights under bf16 autocast; "
          "fsdp: bf16 weights gathered from float32 shards, gradients reduced in float32")
    hdr = ["member", "params", "parallel", "act. ckpt", "weights", "grads", "AdamW", "activations", "total", "fits"]
    rows, misfits = [], []
    for i, (name, shape) in enumerate(shapes):
        vocab = args.vocab_size or cfg.get("vocab_size") or shape.get("vocab_size") or 50304  # the paper's GPT-2 vocab (3.1)
        tied = args.tied or bool(cfg.get("tie_embeddings", shape.get("tie_embeddings", False)))
        P = llama_non_embedding_params(shape["d_model"], shape["n_layers"], shape["n_heads"], shape.get("n_kv_heads"),
                                       shape["ffn_dim"], shape.get("head_dim")) + embedding_params(vocab, shape["d_model"], tied)
        for parallel in ("ddp", "fsdp"):
            for ckpt in (False, True):
                m = memory_per_gpu(shape, vocab, tied, micro, seq_len, accum, args.gpus, parallel, ckpt)
                mark = " *" if chosen and chosen[i] == (parallel, ckpt) else ""
                rows.append([name, _human(P), parallel, ("on" if ckpt else "off") + mark, gib(m.weights), gib(m.grads),
                             gib(m.optimizer), gib(m.activations), gib(m.total), "yes" if m.total <= usable else "no"])
                if mark and m.total > usable:
                    misfits.append(name)
    w = [max(len(r[i]) for r in [hdr] + rows) for i in range(len(hdr))]
    for r in [hdr] + rows:
        print("  ".join(c.ljust(w[i]) if i in (0, 2, 3) else c.rjust(w[i]) for i, c in enumerate(r)))
    if chosen:
        ckpts = sorted({c for _, c in chosen})
        ckpt_text = f"activation_checkpointing={ckpts[0]}" if len(ckpts) == 1 else "activation_checkpointing " + ", ".join(
            f"{name} {'on' if c else 'off'}" for (name, _), (_, c) in zip(shapes, chosen))
        print(f"* the config's setting (parallel={chosen[0][0]}, {ckpt_text}): "
              + (f"does not fit {', '.join(misfits)}" if misfits else "fits every member"))

def run(args):
    if args.shapes:
        return print_shapes()
    if args.memory:
        return memory_report(args)
    cfg = {}
    if args.config and args.sizes:
        raise ValueError("give either a config file or --sizes, not both")
    if args.config:
        cfg = load_config(args.config)
        if not isinstance(cfg.get("stages"), (list, tuple)) or not cfg["stages"]:
            raise ValueError(f"{args.config} sets no `stages = [dict(name=..., shape=... | params=...), ...]`")
        vocab, tied = args.vocab_size or cfg.get("vocab_size"), args.tied or bool(cfg.get("tie_embeddings", False))
        sizes = [stage_params(s, args.count, vocab, tied) for s in cfg["stages"]]
        names = [s.get("name", _human(x)) for s, x in zip(cfg["stages"], sizes)]
        tokens = [s.get("tokens") for s in cfg["stages"]]
        tokens = tokens if all(t is not None for t in tokens) else None
        if args.count == "total":
            label = f"X = total parameters (embeddings{' tied' if tied else ''}, vocab {vocab}), from the config's shapes"
        else:
            label = "X = non-embedding parameters" + (", from the config" if args.config else "")
    elif args.sizes:
        if args.count == "total":
            raise ValueError("--count total needs model shapes (a config file); --sizes are taken as given")
        sizes = [parse_size(s) for s in args.sizes.split(",")]
        names, tokens = None, None
        label = "X = non-embedding parameters (the --sizes as given)"
    else:
        raise ValueError("nothing to do: give a config file or --sizes 1B,2B,4B,8B")
    if args.names:
        names = args.names.split(",")
    tpp = args.tokens_per_param if args.tokens_per_param is not None else cfg.get("tokens_per_param", 40)
    stages = staged_budget(sizes, tpp, names, tokens)
    sm = summarize(stages)
    peak = args.peak if args.peak is not None else peak_flops(args.gpu)
    if peak is not None and not 0 < peak < math.inf:
        raise ValueError(f"peak FLOP/s must be a positive number, got {peak}")
    if peak is None:
        raise ValueError(f"unknown GPU {args.gpu!r}: known {', '.join(PEAK_FLOPS)}; or give --peak FLOP/s")
    if not (0 < args.mfu <= 1) or args.gpus <= 0:
        raise ValueError(f"--mfu {args.mfu} --gpus {args.gpus}: need a utilization in (0, 1] (0.4 is typical) and 1 GPU "
                         "or more")

    fu = _unit(sm.scratch_flops, _FLOP_UNITS)
    tu = _unit(max(s.scratch_tokens for s in stages), _COUNT_UNITS)
    print(label)
    print(f"tokens per parameter: {'per-stage tokens from the config' if tokens else f'{tpp:g}'}; "
          f"GPU-hours at {args.mfu:.0%} MFU of {peak/1e12:g} TFLOP/s" + (f" ({args.gpu})" if args.peak is None else ""))
    hdr = ["stage", "params", "scratch tok", "scratch FLOPs", "staged tok", "staged FLOPs", "cumul. FLOPs", "GPU-h"]
    rows = [[s.name, _human(s.params), _human(s.scratch_tokens, tu), _human(s.scratch_flops, fu), _human(s.staged_tokens, tu),
             _human(s.staged_flops, fu), _human(s.cumulative_flops, fu), f"{gpu_hours(s.staged_flops, peak, args.mfu):,.0f}"]
            for s in stages]
    w = [max(len(r[i]) for r in [hdr] + rows) for i in range(len(hdr))]
    for r in [hdr] + rows:
        print("  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)))
    h_scr, h_stg = gpu_hours(sm.scratch_flops, peak, args.mfu), gpu_hours(sm.staged_flops, peak, args.mfu)
    print(f"scratch, every member alone: {_human(sm.scratch_flops, fu)}  ({h_scr:,.0f} GPU-h, "
          f"{h_scr / args.gpus / 24:,.1f} days on {args.gpus} GPUs)")
    print(f"staged series: {_human(sm.staged_flops, fu)} = the largest alone ({h_stg:,.0f} GPU-h, "
          f"{h_stg / args.gpus / 24:,.1f} days on {args.gpus} GPUs)")
    print(f"saving: {sm.saving:.1%} of the scratch compute")
    print(f"tokens seen: {_human(sm.staged_tokens, tu)} staged vs {_human(sm.largest_tokens, tu)} for the largest alone "
          f"({sm.staged_tokens / sm.largest_tokens:.2f}x)")
    if args.fixed_data or cfg.get("mode") == "fixed_data":
        cap, uses = fixed_data(stages)
        print(f"fixed data (3.3): unique tokens capped at {_human(cap, tu)}; "
              f"{sm.staged_tokens / cap:.2f} passes over the capped corpus")
        for u in uses:
            print(f"  {u.name}: {_human(u.tokens, tu)} = {_human(u.unique, tu)} unique + {_human(u.repeated, tu)} repeated")

if __name__ == "__main__":
    main()
