"""
grow.py: make a trained Llama wider and deeper, the step between the stages of the series
(Yano et al., section 2.2, eq. (1): theta_{i+1} = f(theta_i; X_{i+1}), with f = bert2BERT, which
"copies the weights of linear layers to widen the hidden dims, and stacks trained layers upward").

    python grow.py out/cpu-1.pt --to cpu-2 --width fpi --depth zero --out out/cpu-2-init.pt

Width first (every existing layer), then depth. Notation: the source has residual width d, FFN width
F, H query heads in Hk KV groups of G = H/Hk, L layers; the target D, F', H', Hk', G', L'. head_dim
stays fixed: width grows by adding heads (the paper's 1B -> 2B: 16 -> 20 heads of 128).

Width, "fpi" (bert2BERT, Chen et al. 2022, width-wise expansion: "function preserving initialization",
which extends Net2Net to Transformers). Each new unit copies an old one through a map g: new index ->
old index, the identity on the old indices followed by seeded random picks without replacement, one
round per multiple (any ratio, 2048 -> 2560 included). k_j = #{i : g(i) = j} copies of old unit j.
  * FFN neurons and attention heads (hidden units between an in- and an out-projection): in-weights
    (rows of gate/up, of q/k/v per head_dim block) are copied; out-weights (columns of down_proj,
    head blocks of o_proj's columns) are divided by k_j, so the k_j equal copies sum to the old one.
  * GQA: query head h reads KV head h // G'. KV heads are mapped first; the G' query slots of every
    new KV head that copies old KV head m are filled with old query heads of m's group (its G heads
    once each, then seeded repeats), so every copy reads a copy of the keys it was trained with.
    The KV heads themselves are never divided (each query reads exactly one KV head); o_proj divides
    by the copies of each query head. Possible iff every old KV head gets >= G slots, i.e.
    floor(Hk'/Hk) * G' >= G; otherwise ValueError.
  * Residual dims (d -> D). Net2Net-style copying (writers copied, readers divided by k_j, as for a
    hidden unit) stops being exact here: RMSNorm divides by sqrt(mean over all D dims), and a dim
    copied k times counts k times in that mean.
    Fix: the stream carries x'_i = x_j / sqrt(k_j) (j = g(i)), so sum_i x'_i^2 = sum_j x_j^2 and
        mean'(x'^2) = (d/D) mean(x^2).
    Writers (embed_tokens columns, o_proj and down_proj rows) are copied times 1/sqrt(k_j). With
        eps' = eps d/D  and  gain'_i = gain_j sqrt(d/D):
        gain'_i x'_i / sqrt(mean' + eps') = gain_j sqrt(d/D) (x_j/sqrt k_j) / (sqrt(d/D) sqrt(mean + eps))
                                          = RMSNorm(x)_j / sqrt(k_j),
    i.e. normalized values follow the same 1/sqrt(k) rule. Readers (q/k/v/gate/up columns, an untied
    lm_head's columns) are copied times 1/sqrt(k_j): sum over copies k_j (1/sqrt k_j)(1/sqrt k_j) = 1,
    exact. Tied embeddings: one matrix is writer and reader, both want 1/sqrt(k): consistent, no
    logit scale needed. The grown model's config therefore carries norm_eps = source eps * d/D (one eps,
    every norm sees the stream); the target config's own norm_eps is not used.
  * Symmetry breaking (noise > 0, seeded). Exact copies get equal gradients forever (the tests show
    duplicated neurons stay equal after a step with noise=0). Where copies carry equal inputs, their
    READER weights only matter through their sum, so we add noise z_c with sum_c z_c = 0 over the
    copies of each unit: on down_proj columns (duplicated neurons), o_proj columns (duplicated query
    heads), q/k/v/gate/up and untied lm_head columns (duplicated residual dims), and on the zeroed
    o_proj/down_proj of "zero" depth layers (duplicated units there too). z_c = y_c - y_next(c), next
    going round the copies of the unit in a cycle, y ~ N(0, (noise std(source weight))^2 / 2): the sum
    telescopes to 0. A tied embedding is also a writer: no noise there. Function preserving up to
    float rounding. The copies then drift apart under training, slowly at first with AdamW, whose
    first step is sign(grad) for every weight (equal for nearly equal gradients).

Width, "aki" (bert2BERT, width-wise expansion: "advanced knowledge initialization"): as fpi, but
the in-weights of the new units (the copies beyond the first of each FFN neuron, KV head, query head)
come from the same units of the layer ABOVE (layer l+1); the top layer has none above and uses its own
(fpi there). Out-weights are split as in fpi, residual dims as in fpi. Not function preserving: the gap
is reported, never claimed 0.

Depth (after width; L -> L'):
  * "zero": L'-L new layers spread evenly over the L-1 gaps between old layers: new layer i goes
    after old layer floor((2i+1)(L-1) / 2(L'-L)) (midpoints of equal stretches; 18 -> 22 inserts after
    2, 6, 10, 14). Never after the top layer (unless L = 1): the first and last layers, which face the
    embedding and lm_head, stay at the ends, and trained layers stay in runs of similar length.
    A new layer copies the (widened) layer below it, with o_proj and down_proj set to zero (plus the
    paired noise on duplicated units, which sums to zero): each new block adds 0 to the residual
    stream, so the function is preserved. Copying the neighbor instead of zeros everywhere gives the
    new block trained attention patterns and activations, so o_proj/down_proj get useful gradients.
  * "stack" (bert2BERT's depth expansion, after StackBERT): the trained stack is stacked on itself:
    new layer L+j copies layer j mod L (L' = 2L copies the whole stack once). Not function preserving.
  * "dus" (SOLAR Depth Up-Scaling, Kim et al. 2024, seed 001): two copies of the L layers, the last m
    dropped from the first and the first m from the second, concatenated: layers 0..L-m-1, m..L-1,
    L' = 2L - 2m (m from the target or --dus_overlap). Not function preserving.
"""

import argparse
import copy
import math
import sys
from dataclasses import asdict, fields, replace

import torch

from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model import (Llama, ModelConfig, config_from_dict, config_from_shape,
                   model_from_checkpoint, rope_cos_sin)

WIDTHS = ("fpi", "aki")
DEPTHS = ("zero", "stack", "dus")
CHUNK = 1 << 21  # elements per row chunk when filling a matrix: small temporaries (8 MB in fp32) that malloc reuses
GAP_FLOAT64_MAX_PARAMS = 500_000_000  # grow_checkpoint measures the gap in float64 below this (both models)

# -----------------------------------------------------------------------------
# checks and plans


def depth_plan(n_old, n_new, depth, dus_overlap=None):
    """[(source layer, zero_out)] for every layer of the grown model; zero_out: o_proj/down_proj start at 0."""
    if depth == "zero":
        after = [0] * n_old  # number of new layers inserted after each old layer
        n_add = n_new - n_old
        for i in range(n_add):  # midpoints of n_add equal stretches of the L-1 gaps between old layers
            after[(2 * i + 1) * (n_old - 1) // (2 * n_add)] += 1
        return [(s, z) for s in range(n_old) for z in [False] + [True] * after[s]]
    if depth == "stack":
        return [(s, False) for s in range(n_old)] + [(j % n_old, False) for j in range(n_new - n_old)]
    if n_new == n_old and dus_overlap is None:
        return [(s, False) for s in range(n_old)]  # nothing to add (2L-2m = L needs m = L/2, any L here)
    m = dus_overlap if dus_overlap is not None else (2 * n_old - n_new) // 2
    return [(s, False) for s in range(n_old - m)] + [(s, False) for s in range(m, n_old)]


def check_growth(src, tgt, width, depth, noise, dus_overlap):
    """Raise ValueError (one line: what, and what to do) unless src can grow into tgt. Returns the
    config of the grown model (tgt with the rescaled norm_eps)."""
    if width not in WIDTHS or depth not in DEPTHS:
        raise ValueError(f"width must be one of {WIDTHS} and depth one of {DEPTHS}, "
                         f"got width={width!r} depth={depth!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0 (a relative std), got {noise}")
    for name in ("vocab_size", "head_dim", "rope_theta", "tie_embeddings"):
        if getattr(src, name) != getattr(tgt, name):
            have, want = getattr(src, name), getattr(tgt, name)
            raise ValueError(f"growth keeps {name} fixed ({have}) but the target has {want}: set {name}={have} in the target")
    for name in ("d_model", "ffn_dim", "n_heads", "n_kv_heads", "n_layers"):
        if getattr(tgt, name) < getattr(src, name):
            raise ValueError(f"target {name}={getattr(tgt, name)} is smaller than the source's {getattr(src, name)}: "
                             f"growth only adds; pick a target at least as large in every dimension")
    G, Gn, per_kv = src.n_heads // src.n_kv_heads, tgt.n_heads // tgt.n_kv_heads, tgt.n_kv_heads // src.n_kv_heads
    if per_kv * Gn < G:
        raise ValueError(f"cannot keep GQA groups: {src.n_kv_heads} KV heads with {G} query heads each -> "
                         f"{tgt.n_kv_heads} KV heads with {Gn} each leaves some KV head only {per_kv * Gn} query slots "
                         f"for its {G} heads; make floor(n_kv_heads'/{src.n_kv_heads}) * n_heads'/n_kv_heads' >= {G}")
    L, Ln = src.n_layers, tgt.n_layers
    if depth == "dus":
        m = dus_overlap
        if m is None and Ln != L and (Ln % 2 or Ln > 2 * L):
            raise ValueError(f"depth 'dus' gives 2L-2m layers, so from L={L} it reaches only even depths up to "
                             f"{2 * L}, not n_layers={Ln}: pick an even n_layers in [{L}, {2 * L}] or use depth zero/stack")
        if m is not None and not (0 <= m < L and 2 * L - 2 * m == Ln):
            raise ValueError(f"dus_overlap={m} gives 2*{L}-2*{m}={2 * L - 2 * m} layers but the target has "
                             f"n_layers={Ln}: leave dus_overlap out (m follows from the target) "
                             f"or pick n_layers=2*{L}-2m with 0 <= m < {L}")
    elif dus_overlap is not None:
        raise ValueError(f"dus_overlap is only for depth 'dus', not {depth!r}")
    return replace(tgt, norm_eps=src.norm_eps * src.d_model / tgt.d_model)


# -----------------------------------------------------------------------------
# index maps: new unit -> old unit


def unit_map(n_old, n_new, gen):
    """Identity on the n_old old units, then seeded random picks without replacement, one round per
    n_old (bert2BERT picks the copied units at random). Every old unit gets floor or ceil(n_new/n_old) copies."""
    parts, left = [torch.arange(n_old)], n_new - n_old
    while left > 0:
        take = min(left, n_old)
        parts.append(torch.randperm(n_old, generator=gen)[:take])
        left -= take
    return torch.cat(parts)


def first_copies(g):
    """True where g[i] occurs for the first time: the 'old' units; the others are new copies (for AKI)."""
    seen, out = set(), []
    for j in g.tolist():
        out.append(j not in seen)
        seen.add(j)
    return torch.tensor(out)


def width_maps(src, tgt, gen):
    """All maps of the width growth, as index tensors over rows/columns, and the scale vectors."""
    hd, G, Gn = src.head_dim, src.n_heads // src.n_kv_heads, tgt.n_heads // tgt.n_kv_heads
    r, f = unit_map(src.d_model, tgt.d_model, gen), unit_map(src.ffn_dim, tgt.ffn_dim, gen)
    kv = unit_map(src.n_kv_heads, tgt.n_kv_heads, gen)
    q = torch.empty(tgt.n_heads, dtype=torch.long)
    for m in range(src.n_kv_heads):  # the query slots of every new KV head copying old KV head m
        slots = ((kv == m).nonzero()[:, 0, None] * Gn + torch.arange(Gn)).flatten()
        q[slots] = m * G + unit_map(G, len(slots), gen)  # m's own G query heads once, then repeats
    assert torch.equal(q // G, kv[torch.arange(tgt.n_heads) // Gn])  # each query reads a copy of its own KV head

    def per_dim(heads):  # head map -> row map over head_dim blocks (RoPE's layout lives inside a block)
        return (heads[:, None] * hd + torch.arange(hd)).flatten()

    def inv_count(g, n):  # 1/k_{g(i)}
        return 1.0 / torch.bincount(g, minlength=n).double()[g]

    return dict(r=r, r_scale=inv_count(r, src.d_model).sqrt(), f=f, f_div=inv_count(f, src.ffn_dim),
                kv=per_dim(kv), q=per_dim(q), q_div=inv_count(q, src.n_heads).repeat_interleave(hd),
                f_new=~first_copies(f), kv_new=~first_copies(kv).repeat_interleave(hd),
                q_new=~first_copies(q).repeat_interleave(hd))


# -----------------------------------------------------------------------------
# filling one matrix


def noise_pairs(cols, n_old):
    """Zero-sum noise over copies without scattering into columns: the columns whose source column has
    k > 1 copies, in groups, each paired with the next copy of its group, cyclically. Column c gets
    y[ia[c]] - y[ib[c]] for y with n + 1 columns, the last one zero (ia = ib = n where not copied):
    around each cycle the differences sum to zero."""
    noisy = (torch.bincount(cols, minlength=n_old)[cols] > 1).nonzero()[:, 0]
    noisy = noisy[torch.argsort(cols[noisy], stable=True)]  # grouped by source column
    g, t, n = cols[noisy], torch.arange(len(noisy)), len(noisy)
    last = torch.searchsorted(g, g, right=True) - 1
    ia, ib = torch.full_like(cols, n), torch.full_like(cols, n)
    ia[noisy], ib[noisy] = t, torch.where(t == last, torch.searchsorted(g, g), t + 1)
    return ia, ib, n


@torch.no_grad()
def expand_(out, W, rows=None, cols=None, row_scale=None, col_scale=None, noise=0.0, gen=None, alt=None, alt_rows=None,
            zero=False):
    """out[i, c] = W[rows[i], cols[c]] * row_scale[i] * col_scale[c], written in row chunks straight into
    `out` (no full-size temporary). alt/alt_rows (AKI): rows where alt_rows is True are read from alt.
    zero: start from zeros instead of W. noise > 0: add noise of std noise*std(W) on the columns whose
    source column is copied k > 1 times, summing to zero over the copies (in every row)."""
    n_rows, n_old = out.shape[0], W.shape[1]
    rows = torch.arange(n_rows) if rows is None else rows
    cols = torch.arange(n_old) if cols is None else cols
    ia, ib, n_noisy = noise_pairs(cols, n_old) if noise > 0 else (None, None, 0)
    std = noise * float(W.std()) / math.sqrt(2) if n_noisy else 0.0  # a difference of two draws: std * sqrt(2)
    zdtype = out.dtype if out.dtype in (torch.float32, torch.float64) else torch.float32
    dev = out.device
    rows, cols = rows.to(dev), cols.to(dev)
    row_scale = None if row_scale is None else row_scale.to(dev, out.dtype)
    col_scale = None if col_scale is None else col_scale.to(dev, out.dtype)
    step = max(1, CHUNK // max(out.shape[1], n_old))
    for i0 in range(0, n_rows, step):
        i1 = min(i0 + step, n_rows)
        chunk = out[i0:i1]
        if zero:
            chunk.zero_()
        else:
            part = W.index_select(0, rows[i0:i1])  # (chunk rows, n_old)
            if alt is not None and bool(alt_rows[i0:i1].any()):
                m = alt_rows[i0:i1].to(dev)
                part[m] = alt.index_select(0, rows[i0:i1][m])
            torch.index_select(part, 1, cols, out=chunk)
            del part
            if row_scale is not None:
                chunk *= row_scale[i0:i1, None]
            if col_scale is not None:
                chunk *= col_scale
        if n_noisy:
            y = torch.randn(i1 - i0, n_noisy + 1, generator=gen, dtype=zdtype)  # CPU generator: same on any device
            y[:, n_noisy] = 0
            y *= std
            z = y.index_select(1, ia)
            z -= y.index_select(1, ib)
            chunk += z.to(dev, out.dtype)


# -----------------------------------------------------------------------------
# growing a model


@torch.no_grad()
def widen_block(dst, src_layers, s, maps, width, noise, gen, gain):
    """Fill block dst with old layer s widened (fpi or aki; for aki the new units read layer s+1)."""
    b = src_layers[s]
    up = src_layers[min(s + 1, len(src_layers) - 1)] if width == "aki" else None
    r, rs = maps["r"], maps["r_scale"]
    reader = dict(cols=r, col_scale=rs, noise=noise, gen=gen)  # columns read the residual stream
    for name, rows, new in (("q_proj", "q", "q_new"), ("k_proj", "kv", "kv_new"), ("v_proj", "kv", "kv_new")):
        expand_(getattr(dst.self_attn, name).weight, getattr(b.self_attn, name).weight, rows=maps[rows], **reader,
                alt=getattr(up.self_attn, name).weight if up else None, alt_rows=maps[new])
    expand_(dst.self_attn.o_proj.weight, b.self_attn.o_proj.weight, rows=r, row_scale=rs, cols=maps["q"],
            col_scale=maps["q_div"], noise=noise, gen=gen)
    for name in ("gate_proj", "up_proj"):
        expand_(getattr(dst.mlp, name).weight, getattr(b.mlp, name).weight, rows=maps["f"], **reader,
                alt=getattr(up.mlp, name).weight if up else None, alt_rows=maps["f_new"])
    expand_(dst.mlp.down_proj.weight, b.mlp.down_proj.weight, rows=r, row_scale=rs, cols=maps["f"],
            col_scale=maps["f_div"], noise=noise, gen=gen)
    for name in ("input_layernorm", "post_attention_layernorm"):
        getattr(dst, name).weight.copy_(getattr(b, name).weight[r.to(dst.input_layernorm.weight.device)] * gain)


@torch.no_grad()
def grow(model, target_config, width="fpi", depth="zero", seed=0, noise=1e-3, dus_overlap=None):
    """A new Llama grown from `model` (left untouched) to target_config, same dtype and device. Its
    config is target_config with norm_eps = source norm_eps * d/D (the RMSNorm fix, see the top).
    width: fpi | aki; depth: zero | stack | dus; noise: relative std of the zero-sum symmetry-breaking
    noise (0: exact copies); dus_overlap: SOLAR's m (default: from the target depth)."""
    src = model.config
    cfg = check_growth(src, target_config, width, depth, noise, dus_overlap)
    plan = depth_plan(src.n_layers, cfg.n_layers, depth, dus_overlap)
    ref = model.embed_tokens.weight
    gen = torch.Generator().manual_seed(seed)
    maps = width_maps(src, cfg, gen)
    with torch.device("meta"):  # no memory and no init for the target: every tensor is filled below
        new = Llama(cfg)
    new = new.to(dtype=ref.dtype).to_empty(device=ref.device)
    if cfg.tie_embeddings:
        new.lm_head.weight = new.embed_tokens.weight
    cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    new.rope_cos.copy_(cos)
    new.rope_sin.copy_(sin)
    gain = math.sqrt(src.d_model / cfg.d_model)
    r = maps["r"].to(ref.device)

    # the stream's ends: embedding (writer), final norm, untied lm_head (reader)
    expand_(new.embed_tokens.weight, ref, cols=maps["r"], col_scale=maps["r_scale"])
    if not cfg.tie_embeddings:
        expand_(new.lm_head.weight, model.lm_head.weight, cols=maps["r"], col_scale=maps["r_scale"],
                noise=noise, gen=gen)
    new.norm.weight.copy_(model.norm.weight[r] * gain)

    # width: every old layer once, into the first target layer that copies it (same random stream
    # whatever the depth operator); then depth: the other target layers copy it
    primary = {}
    for t, (s, zero_out) in enumerate(plan):
        if s not in primary and not zero_out:
            widen_block(new.layers[t], model.layers, s, maps, width, noise, gen, gain)
            primary[s] = t
    for t, (s, zero_out) in enumerate(plan):
        if primary[s] == t:
            continue
        for p, q in zip(new.layers[t].parameters(), new.layers[primary[s]].parameters()):
            p.copy_(q)
        if zero_out:  # identity block: outputs zero, plus zero-sum noise on duplicated heads/neurons
            b = model.layers[s]
            expand_(new.layers[t].self_attn.o_proj.weight, b.self_attn.o_proj.weight, rows=maps["r"],
                    cols=maps["q"], noise=noise, gen=gen, zero=True)
            expand_(new.layers[t].mlp.down_proj.weight, b.mlp.down_proj.weight, rows=maps["r"], cols=maps["f"],
                    noise=noise, gen=gen, zero=True)
    new.train(model.training)
    return new


@torch.no_grad()
def function_gap(model_a, model_b, idx, dtype=torch.float64):
    """Largest |logit difference| of the two models on token ids idx (B, T), both run in `dtype`
    (float64 by default; a model in another dtype is copied, the models themselves are not changed)."""
    logits = []
    for m in (model_a, model_b):
        run = m if next(m.parameters()).dtype == dtype else copy.deepcopy(m).to(dtype)
        logits.append(run(idx.to(next(m.parameters()).device))[0])
        del run
    return (logits[0] - logits[1]).abs().max().item()


def is_function_preserving(width, depth, n_old, n_new):
    return width == "fpi" and (depth == "zero" or n_old == n_new)


def grow_checkpoint(ckpt, target_config, **grow_kwargs):
    """(grown checkpoint, gap). Carries tokenizer, flops, tokens (the series' cumulative compute) and
    stage over, appends a 'grow' record to history, and has no optimizer state (fresh AdamW after growth).
    The gap is measured on 2 x 64 seeded random tokens, in float64 unless the two models are too large
    (> GAP_FLOAT64_MAX_PARAMS together), then in the model's dtype; the history records which. A float32
    checkpoint evaluated in float64 shows the float32 rounding of its scaled copies (~1e-6), not 1e-15."""
    model = model_from_checkpoint(ckpt)
    new = grow(model, target_config, **grow_kwargs)
    gen = torch.Generator().manual_seed(grow_kwargs.get("seed", 0))
    idx = torch.randint(0, model.config.vocab_size, (2, min(64, model.config.max_seq_len)), generator=gen)
    big = model.num_params(False) + new.num_params(False) > GAP_FLOAT64_MAX_PARAMS
    gap_dtype = next(model.parameters()).dtype if big else torch.float64
    gap = function_gap(model, new, idx, dtype=gap_dtype)
    record = dict(op="grow", width=grow_kwargs.get("width", "fpi"), depth=grow_kwargs.get("depth", "zero"),
                  seed=grow_kwargs.get("seed", 0), noise=grow_kwargs.get("noise", 1e-3),
                  dus_overlap=grow_kwargs.get("dus_overlap"), **{"from": asdict(model.config)}, to=asdict(new.config),
                  gap=gap, gap_dtype=str(gap_dtype).removeprefix("torch."))
    out = dict(model=new.state_dict(), model_config=asdict(new.config), tokenizer=ckpt["tokenizer"],
               flops=ckpt.get("flops", 0), tokens=ckpt.get("tokens", 0),
               history=list(ckpt.get("history", [])) + [record])
    if "stage" in ckpt:
        out["stage"] = ckpt["stage"]
    return out, gap


# -----------------------------------------------------------------------------
# command line


def parse_target(spec, src):
    """--to: a shape name (model.SHAPES), or field=value overrides of the source config, or both
    ('cpu-2,max_seq_len=512')."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    base = asdict(src)
    if parts and "=" not in parts[0]:
        base = asdict(config_from_shape(parts.pop(0)))
    types = {f.name: f.type for f in fields(ModelConfig)}
    for p in parts:
        key, _, value = p.partition("=")
        if key not in types or not value:
            raise ValueError(f"bad --to item {p!r}: give a shape name or field=value, a field of {', '.join(types)}")
        try:
            base[key] = value.lower() in ("1", "true", "yes") if types[key] is bool else types[key](value)
        except ValueError:
            raise ValueError(f"bad --to value {p!r}: {key} is a {types[key].__name__}") from None
    return ModelConfig(**base)


def param_counts(config):
    with torch.device("meta"):
        m = Llama(config)
    return m.num_params(True), m.num_params(False)


def main(argv=None):
    p = argparse.ArgumentParser(description="Grow a nanogrow checkpoint (bert2BERT width, zero/stack/DUS depth).")
    p.add_argument("ckpt")
    p.add_argument("--to", required=True, help="a shape name (e.g. cpu-2, paper-2B) or d_model=..,n_layers=..,...")
    p.add_argument("--width", default="fpi", choices=WIDTHS)
    p.add_argument("--depth", default="zero", choices=DEPTHS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=1e-3, help="relative std of the zero-sum symmetry-breaking noise")
    p.add_argument("--dus_overlap", type=int, default=None, help="SOLAR's m (layers dropped from each copy)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        ckpt = load_checkpoint(args.ckpt)
        old = config_from_dict(ckpt["model_config"])
        target = parse_target(args.to, old)
        new_ckpt, gap = grow_checkpoint(ckpt, target, width=args.width, depth=args.depth, seed=args.seed,
                                        noise=args.noise, dus_overlap=args.dus_overlap)
        save_checkpoint(new_ckpt, args.out)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    new = config_from_dict(new_ckpt["model_config"])
    for label, c in (("source", old), ("grown", new)):
        ne, tot = param_counts(c)
        print(f"{label:<7} d_model={c.d_model} ffn_dim={c.ffn_dim} n_layers={c.n_layers} "
              f"heads={c.n_heads}/{c.n_kv_heads}: non-embedding {ne:,} total {tot:,} parameters")
    rec = new_ckpt["history"][-1]
    print(f"function gap: max |logit difference| = {gap:.3e} ({rec['gap_dtype']}, 2 random sequences)")
    if not is_function_preserving(args.width, args.depth, old.n_layers, new.n_layers):
        print(f"width={args.width} depth={args.depth} is not function preserving: a nonzero gap is expected")
    print(f"norm_eps {old.norm_eps:.4g} -> {new.norm_eps:.4g} (scaled by d/D); wrote {args.out}")


if __name__ == "__main__":
    main()
