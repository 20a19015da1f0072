"""
model.py: a hand-written Llama, read top to bottom.

    token embedding -> n_layers x [RMSNorm -> attention (RoPE, GQA) -> +residual,
                                   RMSNorm -> SwiGLU MLP -> +residual] -> RMSNorm -> lm_head

It is the architecture the paper trains (Yano et al., section 3.2: "the same architecture as Llama,
context 1024"), and it is checked against transformers' LlamaForCausalLM in tests/test_model.py:
parameter names follow transformers' (minus its "model." prefix) and RoPE uses its rotate-half
layout, so `export_hf` is a renaming and nothing has to be permuted.

With `moe_experts = E > 0` the MLP of every block is a sparse mixture of E SwiGLU experts behind a
router, in Mixtral's layout (SparseMoE; checked against transformers' MixtralForCausalLM in
tests/test_moe.py): the model grow.py upcycles a dense member into (Komatsuzaki et al. 2023).

Also here: the named shapes (the paper's Table 3, the pu family of Hu et al. 2024's PassUntil study,
small CPU shapes), parameter and FLOP counts, the KV-cached `generate`, building a model from a
checkpoint, and the HF export/import. The checkpoint file itself (its keys, atomic saves,
validation) is checkpoint.py's. Run `python model.py shapes` to see every named shape with its parameter counts.
"""

import json
import math
import os
import re
import struct
import sys
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import budget
import data
from checkpoint import CheckpointError, Lineage, find_non_finite, load_checkpoint, make_checkpoint, save_checkpoint
from ops import apply_rope, rms_norm, silu_mul

IGNORE_INDEX = -1  # targets equal to this are left out of the loss (padding, prompt tokens in SFT)

# -----------------------------------------------------------------------------
# configuration and the named shapes


@dataclass
class ModelConfig:
    vocab_size: int = 320  # the `bytes` tokenizer: 256 bytes + specials, padded to a multiple of 64
    d_model: int = 128  # width of the residual stream
    n_layers: int = 4
    n_heads: int = 4  # query heads
    n_kv_heads: int = 4  # key/value heads; n_heads % n_kv_heads == 0 (GQA when smaller)
    head_dim: int = 0  # 0 means d_model // n_heads; growth keeps it fixed and adds heads
    ffn_dim: int = 352  # hidden width of the SwiGLU MLP
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5  # width growth (grow.py, fpi) rescales it with the residual width
    tie_embeddings: bool = False
    # mixture of experts in Mixtral's layout (Jiang et al. 2024, "Mixtral of Experts", section 2.1): 0 is the
    # dense Llama. With E > 0 every block's MLP is E SwiGLU experts of ffn_dim behind a linear router, and each
    # token goes to its moe_top_k best experts (SparseMoE below).
    moe_experts: int = 0
    moe_top_k: int = 2
    # weight of the load-balancing loss in the training loss: Switch Transformer's alpha = 1e-2 (Fedus et al.
    # 2022, section 2.2; OLMoE uses 0.01 too). transformers' MixtralConfig.router_aux_loss_coef defaults to 0.001.
    moe_aux_coef: float = 0.01

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.d_model // self.n_heads
        problems = []
        if min(self.vocab_size, self.d_model, self.n_layers, self.n_heads, self.n_kv_heads, self.ffn_dim, self.max_seq_len) <= 0:
            problems.append("every size must be positive")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        if self.moe_experts < 0 or (self.moe_experts and not 1 <= self.moe_top_k <= self.moe_experts):
            problems.append(f"moe_experts={self.moe_experts} must be >= 0 (0: dense) and moe_top_k={self.moe_top_k} "
                            "in [1, moe_experts]")
        if not (math.isfinite(self.moe_aux_coef) and self.moe_aux_coef >= 0):
            problems.append(f"moe_aux_coef={self.moe_aux_coef} must be a finite number >= 0")
        if problems:
            raise ValueError("bad ModelConfig: " + "; ".join(problems))


def _paper(name):
    # Table 3 of the paper (kept in budget.py, which must not import torch); GPT-2 vocabulary padded to
    # 50304 (section 3.1), context 1024 (section 3.2), untied embeddings as in Llama
    return dict(**budget.PAPER_SHAPES[name], vocab_size=50304, max_seq_len=1024, rope_theta=10000.0, tie_embeddings=False)


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
    **{name: _paper(name) for name in budget.PAPER_SHAPES},
    **{f"pu{i}": _passuntil_family(i) for i in range(1, 9)},
    "cpu-1": _cpu(64, 2, 176),
    "cpu-2": _cpu(80, 3, 192),
    "cpu-3": _cpu(96, 4, 256),
    "cpu-4": _cpu(128, 4, 384),
    "tiny": dict(_cpu(128, 4, 352), n_heads=4, n_kv_heads=4),  # nanoGPT-comparable: 4 heads of 32
}


def config_from_shape(shape, **overrides):
    """ModelConfig for a named shape (see SHAPES), with any field overridden."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: pick one of {', '.join(SHAPES)}")
    return ModelConfig(**{**SHAPES[shape], **overrides})


def config_from_dict(d):
    """ModelConfig from a checkpoint's dict. ValueError naming the field for an unknown one, or one whose
    value is not of its type (a str "64" where an int belongs, a NaN float): a file edited by hand or
    written by something else fails here, not deep inside the model."""
    if not isinstance(d, dict):
        raise ValueError(f"model_config is a {type(d).__name__}, not a dict of ModelConfig fields")
    known = {f.name: f.type for f in fields(ModelConfig)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"unknown model_config field(s) {unknown}: this checkpoint was made by another version of nanogrow")
    for name, value in d.items():
        typ = known[name]
        if typ is bool:
            ok = isinstance(value, bool)
        elif typ is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:  # float: an int is fine (a config read from JSON), NaN and inf are not
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok:
            raise ValueError(f"model_config has {name}={value!r}, not a finite {typ.__name__}: fix that field or re-save the model")
    return ModelConfig(**d)


# -----------------------------------------------------------------------------
# the model


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight. Half-precision inputs are normalized in float32 (as
    transformers does); float32 and float64 stay in their own precision, which the growth tests
    need to see gaps of 1e-10."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)  # ops.py: the backward written out, x and 1/rms saved


def rope_cos_sin(head_dim, seq_len, theta, device=None):
    """RoPE tables for transformers' rotate-half layout: dimension i < head_dim/2 is paired with i + head_dim/2
    and rotated by the angle t * theta^(-2i/head_dim). Returns (cos, sin) of those angles, each
    (seq_len, head_dim/2), in float64; Llama.forward casts them once per call, ops.apply_rope rotates."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    return angles.cos(), angles.sin()


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated to max_len."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # number of positions already cached; advanced by Llama.forward

    def update(self, layer, k, v):
        t = k.shape[2]
        self.k[layer, :, :, self.pos:self.pos + t] = k
        self.v[layer, :, :, self.pos:self.pos + t] = v
        return self.k[layer, :, :, :self.pos + t], self.v[layer, :, :, :self.pos + t]


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=False)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, _ = x.shape
        # RoPE on the projections' own (B, T, heads, head_dim) layout, then SDPA's (B, heads, T, head_dim) view
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        mask, causal = None, True
        if kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)
            if past > 0:
                # SDPA's is_causal aligns the mask to the top left; with cached keys the queries are the
                # last T positions, so build the bottom-right aligned mask (none needed for one query).
                causal = False
                if T > 1:
                    mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        # query head h reads key/value head h // (n_heads / n_kv_heads) (GQA); grow.py keeps this grouping
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))  # silu(gate(x)) * up(x), ops.py


class SparseMoE(nn.Module):
    """Mixtral's sparse mixture of experts (Jiang et al. 2024, section 2.1), in place of the MLP:

        p = softmax(gate(x)) over the E experts    (float32 at least, as transformers' MixtralTopKRouter)
        y = sum over the k largest p_e of  (p_e / sum of those k p's) * expert_e(x)

    The router `gate` is a linear map without bias; the experts are ordinary SwiGLU MLPs. The chosen weights
    are renormalized to sum to one, which is what makes upcycling exact (grow.py, rule U): k identical experts
    give back the one MLP. Names follow transformers' Mixtral checkpoints (block_sparse_moe.gate, .experts.i),
    so export_hf is a renaming (gate/up/down_proj <-> w1/w3/w2).

    Dispatch, grouped by expert: the N*k (token, choice) pairs are sorted by expert, every expert runs once on
    its contiguous slice (a loop over experts, none over tokens), and the outputs go back to (token, choice)
    order by a permutation (index_copy: each slot written once, so no atomics and the same bits on every run,
    which exact resume needs). An expert that gets no token still runs on its empty slice, so every parameter
    is in the graph and receives a (zero) gradient: DDP needs no find_unused_parameters."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.moe_top_k
        self.gate = nn.Linear(config.d_model, config.moe_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config) for _ in range(config.moe_experts))
        self.routing = None  # set by every forward

    def forward(self, x):
        """x: (B, T, d). Keeps self.routing = (top-k choices per expert (E,), router probabilities summed over
        the tokens (E,)) for the load-balancing loss, which Llama.forward gathers from every layer. (An attribute,
        not an argument to append to: FSDP's hooks copy a block's arguments, and the copy would be appended to.)"""
        B, T, d = x.shape
        h = x.reshape(B * T, d)
        logits = self.gate(h)
        probs = F.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = weights / weights.sum(-1, keepdim=True)  # renormalized over the chosen experts: they sum to 1
        # sort the (token, choice) pairs by expert; one host sync per layer for the slice sizes
        flat = chosen.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts))
        slices = h[order // self.top_k].split(counts.tolist())
        ys = torch.cat([expert(part) for expert, part in zip(self.experts, slices)])
        y = ys.new_empty(ys.shape).index_copy_(0, order, ys).view(B * T, self.top_k, d)
        self.routing = (counts, probs.sum(0))
        return (y * weights.unsqueeze(-1).to(y.dtype)).sum(1).view(B, T, d)


def load_balancing_loss(routing, n_experts, n_tokens):
    """The Switch/Mixtral auxiliary loss (Fedus et al. 2022, eq. 4-6), computed as transformers'
    load_balancing_loss_func (models/mixtral/modeling_mixtral.py) does, pooled over the layers:

        aux = E * sum_e f_e P_e,   f_e = (top-k choices of expert e) / (tokens * layers),
                                   P_e = (router probability of e summed) / (tokens * layers)

    f is counted (no gradient), P carries the gradient to the routers. Each token makes k choices, so
    sum_e f_e = k; at perfect balance f_e = k/E and P_e = 1/E, and aux = E * E * (k/E) * (1/E) = k
    (1 for top-1, Switch's value; 2 for Mixtral's top-2). routing: every layer's SparseMoE.routing;
    n_tokens: tokens per layer."""
    counts = sum(c for c, _ in routing)
    probs = sum(p for _, p in routing)
    rows = n_tokens * len(routing)
    return n_experts * ((counts.to(probs.dtype) / rows) * (probs / rows)).sum()


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.moe = config.moe_experts > 0
        if self.moe:
            self.block_sparse_moe = SparseMoE(config)
        else:
            self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache)
        return x + (self.block_sparse_moe if self.moe else self.mlp)(self.post_attention_layernorm(x))

    def ffns(self):
        """The block's SwiGLU MLPs: [its MLP], or its experts in order (what grow.py widens)."""
        return list(self.block_sparse_moe.experts) if self.moe else [self.mlp]


class Llama(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_cos_sin(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # derived from the config, never saved
        self.register_buffer("rope_sin", sin, persistent=False)
        self.aux_loss = self.expert_counts = None  # a mixture of experts' routing in the last forward (see forward)
        self.apply(self._init_weights)
        # GPT-2's scaled init: the two projections that write into the residual stream get
        # std 0.02 / sqrt(2 n_layers), so the stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, kv_cache=None):
        """idx, targets: (B, T) token ids. Returns (logits (B, T, vocab), mean cross-entropy over the
        targets that are not IGNORE_INDEX, or None without targets).
        A mixture of experts also sets self.aux_loss (the load-balancing loss of this call, detached) and
        self.expert_counts ((n_layers, E) top-k choices per expert). In training mode its loss is the training
        objective, cross-entropy + moe_aux_coef * aux_loss (what transformers' Mixtral returns with
        output_router_logits); in eval mode it is the cross-entropy alone, so validation reports pure CE."""
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        x = self.embed_tokens(idx)
        # (T, 1, head_dim/2): one row per position, broadcast over the heads
        cos, sin = self.rope_cos[start:start + T, None].to(x.dtype), self.rope_sin[start:start + T, None].to(x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        logits = self.lm_head(self.norm(x))
        aux = None
        if self.config.moe_experts:
            routing = [block.block_sparse_moe.routing for block in self.layers]
            aux = load_balancing_loss(routing, self.config.moe_experts, B * T)
            self.aux_loss, self.expert_counts = aux.detach(), torch.stack([c for c, _ in routing])
        loss = None
        if targets is not None:
            # the loss is taken in float32 at least (bf16 logits lose too much in log_softmax), float64 stays
            logits_for_loss = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
            loss = F.cross_entropy(logits_for_loss.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)
            if aux is not None and self.training:
                loss = loss + self.config.moe_aux_coef * aux
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eos_id=None, use_cache=True, generator=None,
                 suppress_ids=None):
        """Sample max_new_tokens after idx (B, T). temperature 0 is greedy. With use_cache the prompt is
        run once and every new token is one cached step; without it the whole sequence is re-run
        (tests/test_model.py checks the two agree). Stops early once every row has produced eos_id.
        suppress_ids (a LongTensor) are never produced, e.g. the vocab's unused padding ids."""
        total = idx.shape[1] + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_seq_len={self.config.max_seq_len}")
        dtype = next(self.parameters()).dtype
        cache = KVCache(self.config, idx.shape[0], total, idx.device, dtype) if use_cache else None
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        step_input = idx
        for _ in range(max_new_tokens):
            logits, _ = self(step_input if use_cache else idx, kv_cache=cache)
            logits = logits[:, -1, :].float()
            if suppress_ids is not None:
                logits = logits.index_fill(-1, suppress_ids.to(logits.device), float("-inf"))
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            if eos_id is not None:
                next_id = next_id.masked_fill(done[:, None], eos_id)  # finished rows keep emitting eos
                done |= next_id[:, 0] == eos_id
            idx = torch.cat([idx, next_id], dim=1)
            step_input = next_id
            if eos_id is not None and bool(done.all()):
                break
        return idx

    # --- counts ---------------------------------------------------------------

    def num_params(self, non_embedding=True, active=False):
        """Parameter count. non_embedding=True leaves out the token embedding and an untied lm_head:
        that is the paper's model size X (section 2.1; the Table 3 shapes give 1.09B ... 8.03B).
        active=True counts what one token uses: of a mixture of experts only moe_top_k experts per layer
        (the routers all); the same as the total for a dense model."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied matrix once
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        if active and self.config.moe_experts:
            idle = self.config.moe_experts - self.config.moe_top_k
            n -= sum(idle * sum(p.numel() for p in block.ffns()[0].parameters()) for block in self.layers)
        return n

    def flops_per_token(self, seq_len=None, with_attention=True):
        """Training FLOPs per token (forward + backward). 6N for the matmul weights, N = non-embedding
        parameters + the lm_head (the embedding lookup is no matmul), plus 12 L h T for attention
        scores and values (nanoGPT's MFU estimate). with_attention=False gives the paper's 6X. A mixture
        of experts counts its active parameters: the routers and top-k experts per layer."""
        c = self.config
        if not with_attention:
            return 6 * self.num_params(non_embedding=True, active=True)
        matmul_params = self.num_params(non_embedding=True, active=True) + c.vocab_size * c.d_model
        return budget.flops_per_token(matmul_params, c.n_layers, c.n_heads * c.head_dim, seq_len or c.max_seq_len)


# -----------------------------------------------------------------------------
# from a checkpoint (checkpoint.py owns the file and its keys)


def checkpoint_config(ckpt):
    """The ModelConfig of a loaded checkpoint; CheckpointError (one line) when its model_config is unusable.
    Fields that a checkpoint predates take their defaults (one written before moe_experts is dense)."""
    try:
        return config_from_dict(ckpt.get("model_config"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint has an unusable model_config: {e}") from None


def model_from_checkpoint(ckpt, device="cpu"):
    """The Llama a loaded checkpoint describes, its weights checked against its model_config: CheckpointError
    (one line, naming the tensor) for a missing or extra key, another shape, a tensor that is not floating
    point, a NaN or an inf. The model is built on the meta device and loaded with assign=True, so there is
    no random init and, for float32 weights on the CPU, no second copy: its parameters are the
    checkpoint's own tensors (peak memory while growing: source + target)."""
    config = checkpoint_config(ckpt)
    state = ckpt.get("model")
    if not isinstance(state, dict):
        raise CheckpointError(f"the checkpoint's weights ('model') are a {type(state).__name__}, not a state dict")
    with torch.device("meta"):
        model = Llama(config)
    want = model.state_dict()
    missing, extra = [k for k in want if k not in state], [k for k in state if k not in want]
    if missing or extra:
        hint = ("; it was saved from a compiled or DDP-wrapped model: strip the '_orig_mod.'/'module.' prefixes"
                if any(str(k).startswith(("_orig_mod.", "module.")) for k in extra) else "")
        few = [f"{keys[:3]}{' ...' if len(keys) > 3 else ''}" for keys in (missing, extra)]
        raise CheckpointError(f"the checkpoint's weights do not fit its model_config: missing {few[0]}, unexpected "
                              f"{few[1]}{hint or '; the weights and the config come from different models'}")
    sizes = ", ".join(f"{k}={getattr(config, k)}" for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                                            "head_dim", "ffn_dim", "moe_experts"))
    for k, meta in want.items():
        v = state[k]
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            what = f"a {v.dtype} tensor" if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"
            raise CheckpointError(f"the checkpoint's weight {k} is {what}, not a floating-point tensor")
        if v.shape != meta.shape:
            raise CheckpointError(f"the checkpoint's weight {k} has shape {tuple(v.shape)} but its model_config ({sizes}) "
                                  f"gives {tuple(meta.shape)}: the weights and the config come from different models")
    bad = find_non_finite({k: state[k] for k in want})
    if bad:
        raise CheckpointError(f"the checkpoint's weight {bad} holds NaN or inf (the run diverged before it was saved): "
                              "use an earlier checkpoint")
    tensors = {k: state[k].to("cpu", torch.float32) for k in want}  # no copy when already float32 on the CPU
    if config.tie_embeddings:
        emb, head = tensors["embed_tokens.weight"], tensors["lm_head.weight"]
        if head is not emb and not torch.equal(head, emb):
            raise CheckpointError("the checkpoint's model_config has tie_embeddings=True but its lm_head.weight differs "
                                  "from embed_tokens.weight: set tie_embeddings=false in its config, or re-save the model")
        tensors["lm_head.weight"] = emb
    model.load_state_dict(tensors, assign=True)
    if config.tie_embeddings:  # assign gives each module its own Parameter: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rope_cos_sin(config.head_dim, config.max_seq_len, config.rope_theta)
    return model.to(device)


# -----------------------------------------------------------------------------
# transformers' LlamaForCausalLM (MixtralForCausalLM for a mixture of experts): export and import (the weights,
# config.json, generation_config.json, the tokenizer)
# The safetensors format is a little-endian u64 header length, a JSON header and the raw bytes;
# it is written and read here directly so that nanogrow needs no extra dependency for it.

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def write_safetensors(tensors, path):
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        blob = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)


def read_safetensors(path):
    names = {v: k for k, v in _ST_DTYPES.items()}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = torch.frombuffer(bytearray(data[start:end]), dtype=torch.uint8) if end > start else torch.empty(0, dtype=torch.uint8)
        out[name] = raw.view(names[info["dtype"]]).reshape(info["shape"])
    return out


# Mixtral's expert linears in transformers' checkpoints (what save_pretrained writes, in v5 as well, whose
# conversion_mapping fuses them on load): w1 the gate, w3 the up and w2 the down projection
HF_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def hf_name(name):
    """A nanogrow parameter name as transformers' checkpoints spell it: 'model.' in front (lm_head aside), and
    an expert's gate/up/down_proj as w1/w3/w2 (layers.0.block_sparse_moe.experts.3.w1.weight)."""
    name = re.sub(r"(\.experts\.\d+\.)(gate_proj|up_proj|down_proj)\.", lambda m: m[1] + HF_EXPERT_NAMES[m[2]] + ".", name)
    return name if name == "lm_head.weight" else "model." + name


def from_hf_name(name):
    """hf_name's inverse."""
    back = {v: k for k, v in HF_EXPERT_NAMES.items()}
    return re.sub(r"(\.experts\.\d+\.)(w1|w2|w3)\.", lambda m: m[1] + back[m[2]] + ".", str(name).removeprefix("model."))


def hf_config(config, tok, chat=False):
    """config.json of transformers' LlamaForCausalLM (MixtralForCausalLM for a mixture of experts) for this
    model and tokenizer (a data.Tokenizer)."""
    ids = special_ids(tok, chat)
    moe = {  # Mixtral: the experts and the router; full attention (no sliding window), no router jitter
        "num_local_experts": config.moe_experts, "num_experts_per_tok": config.moe_top_k,
        "router_aux_loss_coef": config.moe_aux_coef, "output_router_logits": False, "router_jitter_noise": 0.0,
        "sliding_window": None,
    }
    return {
        "architectures": ["MixtralForCausalLM" if config.moe_experts else "LlamaForCausalLM"],
        "model_type": "mixtral" if config.moe_experts else "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu",
        **(moe if config.moe_experts else {"attention_bias": False, "mlp_bias": False}), "torch_dtype": "float32",
        **{f"{k}_token_id": i for k, i in ids.items()},
        "nanogrow_tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size},
    }


# The chat format posttrain.py trains on and `posttrain.py chat` prompts with (posttrain.render_chat), in Jinja, for
# transformers' apply_chat_template, lm-evaluation-harness's --apply_chat_template and vLLM's chat endpoint:
#     <|endoftext|> then, per message, <|ROLE|>CONTENT<|end|>; then <|assistant|> for the generation prompt.
# tests/test_export.py checks that its ids are render_chat's, with and without the generation prompt.
CHAT_TEMPLATE = (
    "{{ '<|endoftext|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] or message['content'] is not string %}"
    "{{ raise_exception('each message needs a role (system, user or assistant) and a string content') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
CHAT_OPS = ("sft", "dpo")  # posttrain.py's history records: a model that went through one is a chat model


def is_chat_model(ckpt):
    """Post-trained, or imported from a folder that carried nanogrow's chat template (import-hf records it)."""
    return any(isinstance(h, dict) and (h.get("op") in CHAT_OPS or h.get("chat") is True) for h in ckpt.get("history") or [])


def hf_is_chat(hf_dir):
    """Whether an HF folder carries nanogrow's chat template (so import-hf, then export-hf, keeps it)."""
    try:
        with open(os.path.join(hf_dir, "tokenizer_config.json"), encoding="utf-8") as f:
            return json.load(f).get("chat_template") == CHAT_TEMPLATE
    except (OSError, ValueError, AttributeError):
        return False


def special_ids(tok, chat=False):
    """bos, eos and pad ids of the export. BOS is <|endoftext|>: every document and conversation starts after one,
    and it is what lm-evaluation-harness puts before an empty context (its prefix_token_id), as eval.py does. EOS is
    where generation stops: <|endoftext|> for a pretrained model, the end of a turn (<|end|>) for a chat model."""
    return {"bos": tok.eot_id, "eos": tok.special["<|end|>"] if chat else tok.eot_id, "pad": tok.special["<|pad|>"]}


def export_hf(model, out_dir, tokenizer, chat=False):
    """Write out_dir as a Hugging Face model folder that transformers (AutoTokenizer, AutoModelForCausalLM),
    lm-evaluation-harness and vLLM load as it is: config.json, model.safetensors, generation_config.json, and
    the tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json) giving exactly nanogrow's ids.
    tokenizer: a data.Tokenizer or a checkpoint's tokenizer record ({"name", ...}). chat: a post-trained model:
    the chat template goes with it and generation stops at <|end|>. Returns the data.Tokenizer written."""
    tok = tokenizer if isinstance(tokenizer, data.Tokenizer) else data.get_tokenizer(
        tokenizer.get("name") if isinstance(tokenizer, dict) else tokenizer)
    if tok.n_used > model.config.vocab_size:
        raise ValueError(f"tokenizer {tok.name} uses {tok.n_used} ids but the model's vocab_size is {model.config.vocab_size}")
    os.makedirs(out_dir, exist_ok=True)
    state = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue  # transformers re-ties it from embed_tokens
        state[hf_name(name)] = t
    ids = special_ids(tok, chat)
    names = {i: s for s, i in tok.special.items()}
    special_map = {f"{k}_token": names[i] for k, i in ids.items()}
    tokenizer_config = {
        # the generic class: the tokenizer is all in tokenizer.json, and every version of transformers has it
        "tokenizer_class": "PreTrainedTokenizerFast", **special_map,
        "add_bos_token": False, "add_eos_token": False,  # a BOS in front of every request moves harness scores
        "clean_up_tokenization_spaces": False,  # decoding gives the text back as it was
        "model_max_length": model.config.max_seq_len,
        **({"chat_template": CHAT_TEMPLATE} if chat else {}),
    }
    generation_config = {
        **{f"{k}_token_id": i for k, i in ids.items()},
        # posttrain.py's reply() never samples the vocab's padding ids; generate() should not either
        "suppress_tokens": tok.unused_ids(model.config.vocab_size),
    }
    files = {"config.json": hf_config(model.config, tok, chat), "generation_config.json": generation_config,
             "tokenizer.json": data.hf_tokenizer_json(tok), "tokenizer_config.json": tokenizer_config,
             "special_tokens_map.json": special_map}
    for name, obj in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=None if name == "tokenizer.json" else 2, ensure_ascii=False)
    write_safetensors(state, os.path.join(out_dir, "model.safetensors"))
    return tok


def _read_hf_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{os.path.dirname(path) or '.'} has no {os.path.basename(path)}: not a Hugging Face model folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def hf_tokenizer(hf_dir, cfg):
    """The folder's own tokenizer, as a data.Tokenizer: its tokenizer.json if it is one of nanogrow's (bytes, gpt2:
    data.tokenizer_from_hf), else the record that nanogrow's exports before tokenizer.json put in config.json.
    Nothing is guessed from the vocabulary size: any other folder is one CheckpointError."""
    path = os.path.join(hf_dir, "tokenizer.json")
    try:
        if os.path.exists(path):
            return data.tokenizer_from_hf(path)
        record = cfg.get("nanogrow_tokenizer")
        if isinstance(record, dict) and record.get("name") in ("bytes", "gpt2"):
            return data.get_tokenizer(record["name"])
    except data.DataError as e:
        raise CheckpointError(str(e)) from None
    raise CheckpointError(f"{hf_dir} has no tokenizer.json (nor a nanogrow tokenizer record in config.json): nanogrow reads "
                          "a folder's own tokenizer and cannot tell it from the weights")


def import_hf(hf_dir):
    """Read a Llama or Mixtral folder (config.json + model.safetensors or pytorch_model.bin, and its tokenizer) into
    (Llama, tokenizer record {"name", "vocab_size"}). The weights are checked as a checkpoint's are
    (model_from_checkpoint); anything unusable is one CheckpointError."""
    hf_dir = os.fspath(hf_dir)
    cfg = _read_hf_json(os.path.join(hf_dir, "config.json"))
    kind = cfg.get("model_type")
    if kind not in ("llama", "mixtral"):
        raise CheckpointError(f"{hf_dir} holds a {kind!r} model; only Llama and Mixtral can be imported")
    if kind == "mixtral" and cfg.get("sliding_window") is not None:
        raise CheckpointError(f"{hf_dir} uses sliding-window attention (sliding_window={cfg['sliding_window']}), which "
                              "nanogrow's model does not have")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default" or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise CheckpointError(f"{hf_dir} uses RoPE scaling or biases, which nanogrow's Llama does not have")
    try:
        config = dict(
            vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], ffn_dim=cfg["intermediate_size"],
            n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            max_seq_len=cfg.get("max_position_embeddings", 2048), norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
        if kind == "mixtral":  # absent keys take MixtralConfig's defaults, as transformers would
            config.update(moe_experts=cfg.get("num_local_experts", 8), moe_top_k=cfg.get("num_experts_per_tok", 2),
                          moe_aux_coef=cfg.get("router_aux_loss_coef", 0.001))
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{hf_dir}/config.json lacks or garbles a {kind} field ({type(e).__name__}: {e})") from None
    tok = hf_tokenizer(hf_dir, cfg)
    st_path, bin_path = os.path.join(hf_dir, "model.safetensors"), os.path.join(hf_dir, "pytorch_model.bin")
    try:
        if os.path.exists(st_path):
            hf_state = read_safetensors(st_path)
        elif os.path.exists(bin_path):
            hf_state = torch.load(bin_path, map_location="cpu", weights_only=True)  # tensors only: no code from the file
        else:
            raise CheckpointError(f"{hf_dir} has neither model.safetensors nor pytorch_model.bin (sharded folders are not supported)")
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or foreign file: struct, JSON, dtype or unpickling errors
        raise CheckpointError(f"{hf_dir}: the weights cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if not isinstance(hf_state, dict):
        raise CheckpointError(f"{hf_dir}: the weights file holds a {type(hf_state).__name__}, not a state dict")
    # older transformers saved RoPE's inverse frequencies; they follow from the config
    state = {from_hf_name(k): v for k, v in hf_state.items() if not str(k).endswith("rotary_emb.inv_freq")}
    if config["tie_embeddings"] and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]  # a saved copy of the tied head is dropped
    model = model_from_checkpoint({"model": state, "model_config": config})
    if tok.n_used > model.config.vocab_size:
        raise CheckpointError(f"{hf_dir}: its tokenizer ({tok.name}) uses {tok.n_used} ids but the model has only "
                              f"{model.config.vocab_size}")
    return model, {"name": tok.name, "vocab_size": tok.vocab_size}


# -----------------------------------------------------------------------------
# command line: python model.py shapes | export-hf CKPT DIR | import-hf DIR CKPT


def print_shapes():
    print(f"{'shape':<10} {'d_model':>7} {'ffn':>6} {'layers':>6} {'heads':>5} {'kv':>3} {'vocab':>6} {'tied':>5} "
          f"{'non-embedding':>14} {'total':>14}")
    for name, kw in SHAPES.items():
        c = ModelConfig(**kw)
        with torch.device("meta"):  # count without allocating 8B parameters
            m = Llama(c)
        print(f"{name:<10} {c.d_model:>7} {c.ffn_dim:>6} {c.n_layers:>6} {c.n_heads:>5} {c.n_kv_heads:>3} {c.vocab_size:>6} "
              f"{str(c.tie_embeddings):>5} {m.num_params(True):>14,} {m.num_params(False):>14,}")


def main(argv):
    usage = "usage: python model.py shapes | export-hf CKPT DIR | import-hf DIR CKPT [--overwrite]"
    overwrite = "--overwrite" in argv
    argv = [a for a in argv if a != "--overwrite"]
    if not argv or argv[0] not in ("shapes", "export-hf", "import-hf"):
        print(usage, file=sys.stderr)
        sys.exit(2)
    cmd, args = argv[0], argv[1:]
    try:
        if cmd == "shapes":
            print_shapes()
        elif cmd == "export-hf" and len(args) == 2:
            ckpt = load_checkpoint(args[0])
            chat = is_chat_model(ckpt)
            tok = export_hf(model_from_checkpoint(ckpt), args[1], tokenizer=ckpt["tokenizer"], chat=chat)
            print(f"exported {args[0]} to {args[1]} ({'chat' if chat else 'pretrained'} model, tokenizer "
                  f"{tok.name}: config.json, generation_config.json, model.safetensors, "
                  "tokenizer.json, tokenizer_config.json, special_tokens_map.json)")
        elif cmd == "import-hf" and len(args) == 2:
            model, tokenizer = import_hf(args[0])
            lineage = Lineage(history=[{"op": "import-hf", "from": args[0], "chat": hf_is_chat(args[0])}])
            save_checkpoint(make_checkpoint(model.state_dict(), model.config, tokenizer, lineage, step=0), args[1], overwrite=overwrite)
            print(f"imported {args[0]} into {args[1]} ({model.num_params(True):,} non-embedding parameters, tokenizer {tokenizer['name']})")
        else:
            print(usage, file=sys.stderr)
            sys.exit(2)
    except (CheckpointError, data.DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
