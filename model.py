"""
model.py: a hand-written Llama, read top to bottom.

    token embedding -> n_layers x [RMSNorm -> attention (RoPE, GQA) -> +residual,
                                   RMSNorm -> SwiGLU MLP -> +residual] -> RMSNorm -> lm_head

It is the architecture the paper trains (Yano et al., section 3.2: "the same architecture as Llama,
context 1024"), and it is checked against transformers' LlamaForCausalLM in tests/test_model.py:
parameter names follow transformers' (minus its "model." prefix) and RoPE uses its rotate-half
layout, so hf.py's export is a renaming and nothing has to be permuted.

With `moe_experts = E > 0` the MLP of every block is a sparse mixture of E SwiGLU experts behind a
router, in Mixtral's layout (SparseMoE; checked against transformers' MixtralForCausalLM in
tests/test_moe.py): the model grow.py upcycles a dense member into (Komatsuzaki et al. 2023).

Also here: the config (a named shape from budget.SHAPES, or a checkpoint's dict), the KV-cached `generate`,
and parameter and FLOP counts. Building a model from a checkpoint is checkpoint.py's; the transformers
export and import are hf.py's. `python budget.py --shapes` lists every named shape with its parameter counts.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import budget
from ops import apply_rope, rms_norm, silu_mul

IGNORE_INDEX = -1  # targets equal to this are left out of the loss (padding, prompt tokens in SFT)

# -----------------------------------------------------------------------------
# configuration


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


def config_from_shape(shape, **overrides):
    """ModelConfig for a named shape (budget.SHAPES: the paper's Table 3, the pu family, cpu-1..4, tiny), with any
    field overridden."""
    if shape not in budget.SHAPES:
        raise ValueError(f"unknown shape {shape!r}: pick one of {', '.join(budget.SHAPES)}")
    return ModelConfig(**{**budget.SHAPES[shape], **overrides})


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
    so hf.py's export is a renaming (gate/up/down_proj <-> w1/w3/w2).

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
        """x: (B, T, d). Keeps self.routing (dispatch's) for the load-balancing loss, which Llama.forward gathers
        from every layer. (An attribute, not an argument to append to: FSDP's hooks copy a block's arguments, and
        the copy would be appended to.)"""
        y, self.routing = self.dispatch(x)
        return y

    def dispatch(self, x):
        """(the layer's output, its routing: top-k choices per expert (E,), router probabilities summed over the
        tokens (E,)), with no side effect: what a checkpointed block computes (Block.forward)."""
        B, T, d = x.shape
        h = x.reshape(B * T, d)
        logits = self.gate(h)
        probs = F.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = weights / weights.sum(-1, keepdim=True)  # renormalized over the chosen experts: they sum to 1
        # sort the (token, choice) pairs by expert. The counts as a sum of one-hot rows (bincount's numbers, in a
        # shape known before it runs, which dynamo keeps in the graph); the slice sizes are read on the host: one
        # sync per layer (and per recomputed layer under activation checkpointing), inside the one compiled graph
        # (parallel.compile_settings captures scalar outputs). On a GPU the queue drains there and the experts'
        # kernels start one host launch later: an estimated tens of microseconds a layer, not measured (no GPU yet).
        # torch's grouped_mm would need none, but its CUDA support for float32 is unknown: not used.
        flat = chosen.flatten()
        order = flat.argsort(stable=True)
        counts = F.one_hot(flat, len(self.experts)).sum(0)
        sizes = counts.tolist()
        for size in sizes:
            torch._check(size >= 0)  # what dynamo cannot know of a value read at run time, and split needs
        slices = h[order // self.top_k].split(sizes)
        ys = torch.cat([expert(part) for expert, part in zip(self.experts, slices)])
        y = ys.new_empty(ys.shape).index_copy_(0, order, ys).view(B * T, self.top_k, d)
        return (y * weights.unsqueeze(-1).to(y.dtype)).sum(1).view(B, T, d), (counts, probs.sum(0))


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
        self.checkpointed = False  # activation checkpointing (forward), set by parallel.checkpoint_blocks
        if self.moe:
            self.block_sparse_moe = SparseMoE(config)
        else:
            self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None):
        """With self.checkpointed (parallel.checkpoint_blocks) and gradients recorded, activation checkpointing
        (Chen et al. 2016): the block keeps its input alone for backward and recomputes the rest there. Non-reentrant
        torch.utils.checkpoint, called here so that torch.compile traces it as one higher-order op of the step's
        graph; the parameter names and state dict stay as they are. A mixture of experts' routing leaves the
        checkpointed function as a value (a side effect inside it is not traced)."""
        if self.checkpointed and torch.is_grad_enabled():
            x, routing = torch.utils.checkpoint.checkpoint(self.layer, x, cos, sin, kv_cache, use_reentrant=False)
        else:
            x, routing = self.layer(x, cos, sin, kv_cache)
        if self.moe:
            self.block_sparse_moe.routing = routing
        return x

    def layer(self, x, cos, sin, kv_cache=None):
        """(the block's output, a mixture of experts' routing or None)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache)
        h = self.post_attention_layernorm(x)
        y, routing = self.block_sparse_moe.dispatch(h) if self.moe else (self.mlp(h), None)
        return x + y, routing

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
