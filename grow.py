"""
grow.py: make a trained Llama wider and deeper, the step between the stages of the series
(Yano et al. 2025, section 2.2, eq. (1): theta_{i+1} = f(theta_i; X_{i+1}), with f = bert2BERT, which
"copies the weights of linear layers to widen the hidden dims, and stacks trained layers upward").

    python grow.py out/cpu-1.pt --to cpu-2 --width fpi --depth zero --out out/cpu-2-init.pt
    python grow.py out/cpu-4.pt --to cpu-4,moe_experts=8,moe_top_k=2 --out out/cpu-4-8x.pt   # upcycle (U)
    python grow.py out/cpu-1/final.pt --to cpu-2 --optimizer grown --out g.pt  # AdamW's state too (A), for
    python train.py --init_from=g.pt --init_optimizer ...                      # a run that continues it
    python grow.py --explain     # a worked example (width 4 -> 6, 3 -> 5 layers), printed and drawn

Width first (every existing layer), then depth. Notation: the source has residual width d, FFN width
F, H query heads in Hk KV groups of G = H/Hk, L layers; the target D, F', H', Hk', G', L'. head_dim
stays fixed: width grows by adding heads (the paper's 1B -> 2B: 16 -> 20 heads of 128).

Width, "fpi" (bert2BERT, Chen et al. 2022, ACL, width-wise expansion: "function preserving
initialization", which extends Net2Net to Transformers). Each new unit copies an old one through a map
g: new index -> old index, the identity on the old indices followed by seeded random picks without
replacement, one round per multiple (any ratio, 2048 -> 2560 included). k_j = #{i : g(i) = j} copies
of old unit j. The maps are a WidthMaps; a grown checkpoint's last history record holds them as lists.

Why fpi keeps the function. The rules are named; the lines that apply them cite the names.
  H1  hidden units (FFN neurons, attention heads: between an in- and an out-projection).
      In-weights copied, out-weights divided by the copy count:
          W_in'[i, :] = W_in[g(i), :]        W_out'[:, i] = W_out[:, g(i)] / k_g(i)
      (rows of gate/up and of q/k/v per head_dim block; columns of down_proj and o_proj). Copy i
      computes h'_i = h_g(i), and sum_{i: g(i)=j} W_out[:, j] h_j / k_j = W_out[:, j] h_j.
  H2  GQA: query head h reads KV head h // G'. KV heads are mapped first; the G' query slots of every
      new KV head that copies old KV head m get old query heads of m's group (its G heads once each,
      then seeded repeats), so every query copy reads a copy of the keys and values it was trained
      with. KV heads are never divided (each query reads exactly one KV head); o_proj divides by the
      copies of each query head (H1). Possible iff floor(Hk'/Hk) G' >= G; otherwise ValueError.
  Residual dims (d -> D). Copying as in H1 is not exact here: RMSNorm divides by sqrt(mean over all
  D dims), and a dim copied k times counts k times in that mean. Three rules instead:
  R1  writers (embed_tokens columns, o_proj and down_proj rows) are copied times 1/sqrt(k), so the
      stream carries
          x'_i = x_g(i) / sqrt(k_g(i)),   hence   sum_i x'_i^2 = sum_j x_j^2,   mean'(x'^2) = (d/D) mean(x^2).
      A residual add keeps R1: both of its terms follow it.
  R2  every RMSNorm (the two of each block and the final one):
          gain'_i = gain_g(i) sqrt(d/D)        eps' = eps d/D
      so that, with j = g(i),
          gain'_i x'_i / sqrt(mean'(x'^2) + eps')
              = gain_j sqrt(d/D) (x_j / sqrt k_j) / sqrt((d/D) (mean(x^2) + eps)) = RMSNorm(x)_j / sqrt(k_j):
      the normalized stream follows R1's rule too. Without the gain rule every copy is sqrt(D/d) too
      large; without the eps rule the norm divides by sqrt(mean + eps D/d) instead. The grown config
      therefore carries norm_eps = source eps d/D (the target config's own norm_eps is not used).
  R3  readers (q/k/v, gate/up, an untied lm_head: columns) are copied times 1/sqrt(k):
          sum_i W[:, g(i)] / sqrt(k_g(i)) * y_g(i) / sqrt(k_g(i)) = sum_j k_j W[:, j] y_j / k_j = W y.
  By induction over the blocks (R1 in, R2 + R3 into the hidden units, H1/H2 through them, R1 out) and
  R2 + R3 at the final norm and lm_head, the grown model computes the old logits. Tied embeddings: one
  matrix is writer (R1) and reader (R3), both want 1/sqrt(k): consistent, no logit scale needed.
  N   symmetry breaking (noise > 0, seeded). Exact copies get equal gradients forever (the tests show
      duplicated neurons stay equal after a step with noise=0). Where copies carry equal inputs their
      READER weights only matter through their sum, so those get noise z_c with sum_c z_c = 0 over the
      copies c of each unit: down_proj columns (copied neurons), o_proj columns (copied query heads),
      q/k/v/gate/up and untied lm_head columns (copied residual dims), and the zeroed o_proj/down_proj
      of depth "zero" layers. z_c = y_c - y_next(c), next going round the copies of the unit in a
      cycle, y ~ N(0, (noise std(source weight))^2 / 2): the sum telescopes to 0. A tied embedding is
      also a writer: no noise there. Function preserving up to float rounding. The copies then drift
      apart under training, slowly at first with AdamW, whose first step is sign(grad) for every
      weight (equal for nearly equal gradients).

Width, "aki" (bert2BERT, width-wise expansion: "advanced knowledge initialization"): as fpi, but the
in-weights of the new units (the copies beyond the first of each FFN neuron and KV head) come from the same
units of the layer ABOVE (layer l+1); the top layer has none above and uses its own (fpi there). A query head
reads layer l+1 exactly when its KV head does (H2 again: it attends with the keys it was trained with), so
growth that adds query heads but no KV heads takes every query head from layer l. Out-weights are split as in
fpi (H1), residual dims as in fpi (R1-R3). Not function preserving: the gap is reported, never claimed 0.

Depth (after width; L -> L'):
  * "zero": L'-L new layers spread evenly over the L-1 gaps between old layers: new layer i goes
    after old layer floor((2i+1)(L-1) / 2(L'-L)) (midpoints of equal stretches; 18 -> 22 inserts after
    2, 6, 10, 14). Never after the top layer (unless L = 1): the first and last layers, which face the
    embedding and lm_head, stay at the ends, and trained layers stay in runs of similar length.
    Z: a new layer copies the (widened) layer below it, with o_proj and down_proj set to zero (plus
    the paired noise N, which sums to zero): each new block adds 0 to the residual stream, so the
    function is preserved. Copying the neighbor instead of zeros everywhere gives the new block
    trained attention patterns and activations, so o_proj/down_proj get useful gradients (as the
    identity blocks of LLaMA-Pro's block expansion, Wu et al. 2024, ACL, which copy a block and zero
    its output projections).
  * "zero_groups" (LLaMA-Pro's placement, Wu et al. 2024, section 3.1): the L layers in L'-L groups of
    consecutive layers, a new layer (Z, as above) after each group's top layer, the top layer's included
    (32 -> 40: after layers 3, 7, ..., 31). Function preserving.
  * "stack" (bert2BERT's depth-wise expansion, after StackBERT): the trained stack is stacked on
    itself: new layer L+j copies layer j mod L (L' = 2L copies the whole stack once; a remainder takes
    the bottom layers, 18 -> 22 appends 0-3). "stack_top": a remainder takes the top layers, as
    bert2BERT's Algorithm 1 does (18 -> 22 appends 14-17). Not function preserving.
  * "dus" (SOLAR Depth Up-Scaling, Kim et al. 2024, arXiv 2312.15166): two copies of the L layers,
    the last m dropped from the first and the first m from the second, concatenated: layers
    0..L-m-1, m..L-1, L' = 2L - 2m (m from the target or --dus_overlap). Not function preserving.

The optimizer (grow_checkpoint(optimizer="grown"), grow.py --optimizer grown):
  A   AdamW's moments are grown with the weights, through the same maps, so that the next stage starts from the
      state the grown model would have if it had followed the source's trajectory in grown form: a weight copied
      with scale c into K copies has gradient grad / (c K) there, so m' = m / (c K) and v' = v / (c K)^2 (the
      derivation at moment_scales). Each parameter keeps its step count; a new zero block (Z) and an upcycled
      router with its experts (U) have no history and start fresh (step 0), as a fresh AdamW starts them.

Precision: every tensor is filled in float32 (or float64) and rounded once into the model's dtype, so a bf16 model
grows to the float32 growth of its weights, cast. RoPE's tables are float64, as a fresh model's.

Mixture of experts (a target with moe_experts = E > 0, model.SparseMoE's Mixtral layout):
  U   upcycling (Komatsuzaki et al. 2023, ICLR, "Sparse Upcycling"): from a dense source, every expert of
      a layer is a copy of its (widened) MLP and the router is new (random, std ROUTER_STD). The block gives
          sum_{e in top-k(x)} w_e(x) MLP_e(x),   w_e = p_e / sum_{e' in top-k(x)} p_e'   so  sum_e w_e = 1,
      and with MLP_e = MLP for every e that is MLP(x) * sum_e w_e = MLP(x), whatever the router picks:
      the upcycled model computes the dense function (up to the rounding of the sum of the w's).
      The width rules hold for each expert as for the MLP (H1, R1, R3), with its own noise draws (N):
      where neurons or residual dims are copied, the experts then differ in their weights and agree in
      their function. At the same width there are no copies to hide noise in, and the experts start
      identical: routing breaks the symmetry, since each expert is trained on the tokens routed to it with
      their weights, so the experts' gradients differ from the first step (tests/test_moe.py checks).
      Depth zero's new layers zero every expert's down_proj (Z: a weighted sum of zeros is zero).
      A mixture of experts grows into one with the same E and k: every expert is widened with the same
      maps, and the router reads the stream (R3, with N). Another E or k would change which experts a
      token reaches, so it is refused.
"""

import argparse
import copy
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, fields, replace

import torch

from checkpoint import CheckpointError, Lineage, find_non_finite, load_checkpoint, make_checkpoint, save_checkpoint
from common import make_optimizer
from model import Llama, ModelConfig, config_from_dict, config_from_shape, model_from_checkpoint, rope_cos_sin

WIDTHS = ("fpi", "aki")
OPTIMIZERS = ("fresh", "grown")  # after growth: a fresh AdamW, or the source's state grown with the weights (A)
DEPTHS = ("zero", "zero_groups", "stack", "stack_top", "dus")
CHUNK = 1 << 21  # elements per row chunk when filling a matrix: small temporaries (8 MB in fp32) that malloc reuses
GAP_FLOAT64_MAX_PARAMS = 500_000_000  # grow_checkpoint measures the gap in float64 below this (both models)
ROUTER_STD = 0.02  # an upcycled router's init: Llama._init_weights' std (transformers' initializer_range too)

# -----------------------------------------------------------------------------
# checks and plans


def depth_plan(n_old, n_new, depth, dus_overlap=None):
    """[(source layer, zero_out)] for every layer of the grown model; zero_out: o_proj/down_proj start at 0 (Z)."""
    n_add = n_new - n_old
    if depth in ("zero", "zero_groups"):
        after = [0] * n_old  # number of new layers inserted after each old layer
        for i in range(n_add):
            if depth == "zero":  # midpoints of n_add equal stretches of the L-1 gaps between old layers
                after[(2 * i + 1) * (n_old - 1) // (2 * n_add)] += 1
            else:  # LLaMA-Pro: n_add groups of consecutive layers, one new layer after each group's top layer
                after[-(-(i + 1) * n_old // n_add) - 1] += 1  # ceil((i+1) L / n_add) - 1
        return [(s, z) for s in range(n_old) for z in [False] + [True] * after[s]]
    if depth in ("stack", "stack_top"):
        whole, rest = divmod(n_add, n_old)  # whole copies of the stack, then `rest` more layers
        extra = range(rest) if depth == "stack" else range(n_old - rest, n_old)  # the bottom ones, or bert2BERT's top
        return [(s, False) for s in list(range(n_old)) * (1 + whole) + list(extra)]
    if n_new == n_old and dus_overlap is None:
        return [(s, False) for s in range(n_old)]  # nothing to add (2L-2m = L needs m = L/2, any L here)
    m = dus_overlap if dus_overlap is not None else (2 * n_old - n_new) // 2
    return [(s, False) for s in range(n_old - m)] + [(s, False) for s in range(m, n_old)]


def check_growth(src, tgt, width, depth, noise, dus_overlap):
    """Raise ValueError (one line: what, and what to do) unless src can grow into tgt."""
    if width not in WIDTHS or depth not in DEPTHS:
        raise ValueError(f"width must be one of {WIDTHS} and depth one of {DEPTHS}, "
                         f"got width={width!r} depth={depth!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0 (a relative std, e.g. 1e-3; 0 for exact copies), "
                         f"got {noise!r}")
    for name in ("vocab_size", "head_dim", "rope_theta", "tie_embeddings"):
        if getattr(src, name) != getattr(tgt, name):
            have, want = getattr(src, name), getattr(tgt, name)
            raise ValueError(f"growth keeps {name} fixed ({have}) but the target has {want}: set {name}={have} in the target")
    if src.moe_experts and (tgt.moe_experts, tgt.moe_top_k) != (src.moe_experts, src.moe_top_k):  # U
        raise ValueError(f"a mixture of experts grows only into one with the same moe_experts={src.moe_experts} and "
                         f"moe_top_k={src.moe_top_k} (other experts or another k would change which experts a token "
                         f"reaches), but the target has {tgt.moe_experts} and {tgt.moe_top_k}: set those in the target")
    for name in ("d_model", "ffn_dim", "n_heads", "n_kv_heads", "n_layers"):
        if getattr(tgt, name) < getattr(src, name):
            raise ValueError(f"target {name}={getattr(tgt, name)} is smaller than the source's {getattr(src, name)}: "
                             f"growth only adds; pick a target at least as large in every dimension")
    G, Gn, per_kv = src.n_heads // src.n_kv_heads, tgt.n_heads // tgt.n_kv_heads, tgt.n_kv_heads // src.n_kv_heads
    if per_kv * Gn < G:  # H2
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


# -----------------------------------------------------------------------------
# index maps: new unit -> old unit


@dataclass
class WidthMaps:
    """The width growth as maps new index -> old index, and the scales they imply (the rules at the top).
    A unit map has one entry per unit; a row map one per row of a projection (head_dim rows per head)."""
    residual: torch.Tensor        # (D,) residual dim i copies old dim residual[i]
    residual_scale: torch.Tensor  # (D,) 1/sqrt(k) of that old dim, float64: writers (R1) and readers (R3)
    ffn: torch.Tensor             # (F',) FFN neuron n copies old neuron ffn[n]
    ffn_div: torch.Tensor         # (F',) 1/k of that old neuron, float64: down_proj columns (H1)
    kv_heads: torch.Tensor        # (Hk',) KV head h copies old KV head kv_heads[h] (H2)
    q_heads: torch.Tensor         # (H',) query head h copies old query head q_heads[h], of its KV head's group (H2)
    kv_rows: torch.Tensor         # (Hk' head_dim,) row map of k_proj and v_proj: kv_heads over each head's block
    q_rows: torch.Tensor          # (H' head_dim,) row map of q_proj, and column map of o_proj
    q_div: torch.Tensor           # (H' head_dim,) 1/k of the query head of each q row, float64: o_proj columns (H1)
    ffn_new: torch.Tensor         # (F',) True for a copy beyond the first: AKI reads its in-weights one layer up
    kv_new: torch.Tensor          # (Hk' head_dim,) the same for k_proj/v_proj rows
    q_new: torch.Tensor           # (H' head_dim,) AKI for q_proj rows: True exactly where the query's KV head is new
    kv_div: torch.Tensor          # (Hk' head_dim,) 1/k of the KV head of each k/v row, float64: their moments (A)

    def as_lists(self):
        """The unit maps as plain lists of ints (new index -> old index): the grow record's unit_maps."""
        return {name: getattr(self, name).tolist() for name in ("residual", "ffn", "kv_heads", "q_heads")}


def unit_map(n_old, n_new, gen):
    """Identity on the n_old old units, then seeded random picks without replacement, one round per
    n_old (bert2BERT picks the copied units at random). Every old unit gets floor or ceil(n_new/n_old) copies."""
    parts, left = [torch.arange(n_old)], n_new - n_old
    while left > 0:
        take = min(left, n_old)
        parts.append(torch.randperm(n_old, generator=gen)[:take])
        left -= take
    return torch.cat(parts)


def copy_counts(g, n_old):
    """k_{g(i)} for every new unit i: how many copies its old unit has."""
    return torch.bincount(g, minlength=n_old)[g]


def first_copies(g):
    """True where g[i] occurs for the first time: the 'old' units; the others are new copies (for AKI)."""
    seen, out = set(), []
    for j in g.tolist():
        out.append(j not in seen)
        seen.add(j)
    return torch.tensor(out)


def width_maps(src, tgt, gen):
    """All maps of the width growth (a WidthMaps). The draws, in this order: residual, FFN, KV heads,
    then the query heads of each old KV group."""
    hd, G, Gn = src.head_dim, src.n_heads // src.n_kv_heads, tgt.n_heads // tgt.n_kv_heads
    r, f = unit_map(src.d_model, tgt.d_model, gen), unit_map(src.ffn_dim, tgt.ffn_dim, gen)
    kv = unit_map(src.n_kv_heads, tgt.n_kv_heads, gen)
    q = torch.empty(tgt.n_heads, dtype=torch.long)
    for m in range(src.n_kv_heads):  # H2: the query slots of every new KV head copying old KV head m
        slots = ((kv == m).nonzero()[:, 0, None] * Gn + torch.arange(Gn)).flatten()
        q[slots] = m * G + unit_map(G, len(slots), gen)  # m's own G query heads once, then repeats
    assert torch.equal(q // G, kv[torch.arange(tgt.n_heads) // Gn])  # each query reads a copy of its own KV head

    def per_row(heads):  # head map -> row map over head_dim blocks (RoPE's layout lives inside a block)
        return (heads[:, None] * hd + torch.arange(hd)).flatten()

    kv_new = ~first_copies(kv)
    return WidthMaps(
        residual=r, residual_scale=(1.0 / copy_counts(r, src.d_model).double()).sqrt(),  # R1, R3: 1/sqrt(k)
        ffn=f, ffn_div=1.0 / copy_counts(f, src.ffn_dim).double(),  # H1: 1/k
        kv_heads=kv, q_heads=q, kv_rows=per_row(kv), q_rows=per_row(q),
        q_div=(1.0 / copy_counts(q, src.n_heads).double()).repeat_interleave(hd),  # H1: 1/k
        ffn_new=~first_copies(f), kv_new=kv_new.repeat_interleave(hd),
        # AKI keeps H2: a query head reads layer l+1 exactly when its KV head does, so it attends with the keys
        # and values it was trained with (the G' query slots of KV head h are h G' .. h G' + G' - 1)
        q_new=kv_new[torch.arange(tgt.n_heads) // Gn].repeat_interleave(hd),
        kv_div=(1.0 / copy_counts(kv, src.n_kv_heads).double()).repeat_interleave(hd))


# -----------------------------------------------------------------------------
# filling one matrix


def noise_pairs(cols, n_old):
    """Zero-sum noise (N) over the copies of each source column, as (noisy, nxt): noisy holds the output
    columns whose source column has k > 1 copies, grouped by source column, and nxt[t] the position in
    noisy of the next copy of the same group, cyclically. Column noisy[t] gets y[t] - y[nxt[t]]: around
    each cycle the differences sum to zero. Depends on the unit map only, so Noise computes it once per map."""
    noisy = (torch.bincount(cols, minlength=n_old)[cols] > 1).nonzero()[:, 0]
    noisy = noisy[torch.argsort(cols[noisy], stable=True)]  # grouped by source column
    g, t = cols[noisy], torch.arange(len(noisy))
    last = torch.searchsorted(g, g, right=True) - 1
    return noisy, torch.where(t == last, torch.searchsorted(g, g), t + 1)


class Noise:
    """N for one growth: the relative std, the one seeded stream every matrix draws from in turn, and what
    matrices share, computed once: the pairing of each unit map (many matrices read the same map) and the
    std of each source matrix (depth zero's new layers reuse their source layer's)."""

    def __init__(self, scale, gen):
        self.scale, self.gen, self._pairs, self._stds = scale, gen, {}, {}

    def pairs(self, cols, n_old):
        key = (id(cols), n_old)  # the maps live as long as the growth; the value keeps cols alive, so ids stay unique
        if key not in self._pairs:
            self._pairs[key] = (cols, noise_pairs(cols, n_old))
        return self._pairs[key][1]

    def std(self, W):
        """std of y: the difference of two draws has std sqrt(2) times it, scale * std(W)."""
        if id(W) not in self._stds:
            self._stds[id(W)] = (W, self.scale * float(W.to(work_dtype(W.dtype)).std()) / math.sqrt(2))
        return self._stds[id(W)][1]


def work_dtype(dtype):
    """The dtype a fill computes in: float32 for bfloat16/float16 targets, so that every value is rounded once, when
    it is stored (in bf16 itself a 1/sqrt(3) would be rounded first, then its product: a gap of 0.05-0.12)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


@torch.no_grad()
def expand_(out, W, rows=None, cols=None, row_scale=None, col_scale=None, noise=None, alt=None, alt_rows=None,
            zero=False):
    """out[i, c] = W[rows[i], cols[c]] * row_scale[i] * col_scale[c], written in row chunks straight into
    `out` (no full-size temporary). alt/alt_rows (AKI): rows where alt_rows is True are read from alt.
    zero: start from zeros instead of W. noise (a Noise with scale > 0): add noise of std scale*std(W) on
    the columns whose source column is copied k > 1 times, summing to zero over the copies (in every row): N."""
    n_rows, n_old = out.shape[0], W.shape[1]
    rows = torch.arange(n_rows) if rows is None else rows
    cols = torch.arange(n_old) if cols is None else cols
    noisy, nxt = noise.pairs(cols, n_old) if noise is not None and noise.scale > 0 else (None, None)
    n_noisy = 0 if noisy is None else len(noisy)
    std = noise.std(W) if n_noisy else 0.0
    wdtype, dev = work_dtype(out.dtype), out.device
    rows, cols = rows.to(dev), cols.to(dev)
    noisy_dev = noisy.to(dev) if n_noisy else None
    row_scale = None if row_scale is None else row_scale.to(dev, wdtype)
    col_scale = None if col_scale is None else col_scale.to(dev, wdtype)
    step = max(1, CHUNK // max(out.shape[1], n_old))
    for i0 in range(0, n_rows, step):
        i1 = min(i0 + step, n_rows)
        chunk = out[i0:i1] if wdtype == out.dtype else torch.empty(i1 - i0, out.shape[1], dtype=wdtype, device=dev)
        if zero:
            chunk.zero_()
        else:
            part = W.index_select(0, rows[i0:i1]).to(wdtype)  # (chunk rows, n_old)
            if alt is not None and bool(alt_rows[i0:i1].any()):
                m = alt_rows[i0:i1].to(dev)
                part[m] = alt.index_select(0, rows[i0:i1][m]).to(wdtype)
            torch.index_select(part, 1, cols, out=chunk)
            del part
            if row_scale is not None:
                chunk *= row_scale[i0:i1, None]
            if col_scale is not None:
                chunk *= col_scale
        if n_noisy:
            # n_noisy + 1 draws per row, the last unused: the random stream (and so every grown weight for a
            # seed) stays what it was when the noise was scattered over all columns through a zero column
            # a CPU generator: the same draws on any device
            y = torch.randn(i1 - i0, n_noisy + 1, generator=noise.gen, dtype=wdtype)
            y = y[:, :n_noisy] * std
            y -= y.index_select(1, nxt)  # y[t] - y[nxt[t]]: only the copied columns, no full-width temporaries
            chunk.index_add_(1, noisy_dev, y.to(dev))
        if chunk.dtype != out.dtype:
            out[i0:i1].copy_(chunk)  # bf16/fp16: rounded once, here


# -----------------------------------------------------------------------------
# growing a model


@dataclass
class Scales:
    """What every copy is multiplied by, per role (None: 1; vectors over the new rows or columns, float64): for the
    weights (weight_scales: the rules at the top) or for an AdamW moment (moment_scales: rule A)."""
    residual: torch.Tensor        # residual dims: writers' rows (R1) and readers' columns (R3)
    ffn_in: torch.Tensor | None   # gate/up rows (copied neurons)
    ffn_out: torch.Tensor | None  # down_proj columns (H1)
    q_in: torch.Tensor | None     # q_proj rows (copied query heads)
    q_out: torch.Tensor | None    # o_proj columns (H1)
    kv_in: torch.Tensor | None    # k_proj/v_proj rows (copied KV heads)
    norm: torch.Tensor            # RMSNorm gains, per residual dim (R2)


def weight_scales(maps, gain):
    """The weights' scales: R1/R3 on residual dims, H1's 1/k on out-weights, gains times sqrt(d/D) (R2)."""
    return Scales(residual=maps.residual_scale, ffn_in=None, ffn_out=maps.ffn_div, q_in=None, q_out=maps.q_div,
                  kv_in=None, norm=torch.full_like(maps.residual_scale, gain))


def moment_scales(maps, gain, power):
    """A, the AdamW state through growth. Adam's moments are running averages of the gradient (exp_avg, power 1)
    and of its square (exp_avg_sq, power 2). At the grown point theta' = M theta of an fpi growth (noise 0) the grown
    model computes the source's function, so by the chain rule M^T grad' = grad; and the K copies of a weight, each
    c times it, carry equal gradients by symmetry, so K c grad'_copy = grad:
        grad'_copy = grad / (c K)
    per factor of a matrix entry (c and K are products of a row and a column part): residual dims c = 1/sqrt(k),
    K = k: 1/sqrt(k), as the weight; copied in-weights (q/k/v, gate/up rows) c = 1: 1/k; divided out-weights
    (o_proj/down_proj columns) c = 1/k: 1; gains c = sqrt(d/D), K = k: 1/(k sqrt(d/D)). Had the grown model
    followed the source's trajectory in grown form, each of its gradients would have been this multiple of the
    source's, so its moments are m' = m / (c K) and v' = v / (c K)^2 (tests/test_grow_recipe.py checks the gradients
    and one step). KV rows are exact when every copy of a KV head serves its group's query heads in equal proportions
    (so when H'/Hk' = H/Hk); otherwise 1/k is their mean share."""
    d = Scales(residual=maps.residual_scale, ffn_in=maps.ffn_div, ffn_out=None, q_in=maps.q_div, q_out=None,
               kv_in=maps.kv_div, norm=maps.residual_scale ** 2 / gain)
    return Scales(**{k: None if v is None else v ** power for k, v in vars(d).items()})


@torch.no_grad()
def copy_norm_(dst, src, r, scale):
    """An RMSNorm gain (R2): dst[i] = src[r[i]] * scale[i], computed in float32 or float64, rounded once."""
    wdtype = work_dtype(dst.dtype)
    dst.copy_(src.to(wdtype)[r.to(src.device)] * scale.to(dst.device, wdtype))


@torch.no_grad()
def widen_block(dst, src_layers, s, maps, sc, width, noise):
    """Fill block dst with old layer s widened (fpi or aki; for aki the new units read layer s+1), every copy times
    its scale in sc. noise None: AdamW moments (rule A), no N, and an upcycled router's are zero (no history)."""
    b = src_layers[s]
    up = src_layers[min(s + 1, len(src_layers) - 1)] if width == "aki" else None
    reader = dict(cols=maps.residual, col_scale=sc.residual, noise=noise)  # R3: columns read the stream; N on copied dims
    for name, rows, row_scale, new in (("q_proj", maps.q_rows, sc.q_in, maps.q_new),  # H1, H2: rows copied per head
                                       ("k_proj", maps.kv_rows, sc.kv_in, maps.kv_new),
                                       ("v_proj", maps.kv_rows, sc.kv_in, maps.kv_new)):
        expand_(getattr(dst.self_attn, name).weight, getattr(b.self_attn, name).weight, rows=rows, row_scale=row_scale,
                **reader, alt=getattr(up.self_attn, name).weight if up else None, alt_rows=new)
    # o_proj and down_proj: rows write the stream (R1), columns split over copied heads/neurons (H1)
    expand_(dst.self_attn.o_proj.weight, b.self_attn.o_proj.weight, rows=maps.residual, row_scale=sc.residual,
            cols=maps.q_rows, col_scale=sc.q_out, noise=noise)
    # the MLP, or each expert: U, a dense source's one MLP into every expert; an MoE source's expert e into e.
    # Every expert draws its own noise N, so copies differ in their weights but not in their function.
    src_ffns, up_ffns = b.ffns(), up.ffns() if up else None
    for e, mlp in enumerate(dst.ffns()):
        old, above = src_ffns[e % len(src_ffns)], up_ffns[e % len(up_ffns)] if up else None
        for name in ("gate_proj", "up_proj"):  # H1: rows copied
            expand_(getattr(mlp, name).weight, getattr(old, name).weight, rows=maps.ffn, row_scale=sc.ffn_in, **reader,
                    alt=getattr(above, name).weight if above else None, alt_rows=maps.ffn_new)
        expand_(mlp.down_proj.weight, old.down_proj.weight, rows=maps.residual, row_scale=sc.residual, cols=maps.ffn,
                col_scale=sc.ffn_out, noise=noise)
    if dst.moe:
        router = dst.block_sparse_moe.gate.weight
        if b.moe:  # R3: the router reads the stream like q/k/v; N on copied dims
            expand_(router, b.block_sparse_moe.gate.weight, **reader)
        elif noise is None:  # U's new router has no optimizer history
            router.zero_()
        else:  # U: a new router, random as a fresh model's (std 0.02), so routing depends on the token at once
            router.copy_(ROUTER_STD * torch.randn(router.shape, generator=noise.gen, dtype=torch.float64))
    for name in ("input_layernorm", "post_attention_layernorm"):  # R2: gain times sqrt(d/D)
        copy_norm_(getattr(dst, name).weight, getattr(b, name).weight, maps.residual, sc.norm)


@torch.no_grad()
def fill(new, model, maps, plan, sc, width, noise):
    """Write every weight of `new` from `model` through the width maps and the depth plan, each copy times its
    scale in sc. noise None fills AdamW moments (rule A): no N, and depth zero's new blocks are all zero."""
    # the stream's ends: embedding (writer, R1), final norm (R2), untied lm_head (reader, R3)
    expand_(new.embed_tokens.weight, model.embed_tokens.weight, cols=maps.residual, col_scale=sc.residual)
    if not new.config.tie_embeddings:
        expand_(new.lm_head.weight, model.lm_head.weight, cols=maps.residual, col_scale=sc.residual, noise=noise)
    copy_norm_(new.norm.weight, model.norm.weight, maps.residual, sc.norm)

    # width: every old layer once, into the first target layer that copies it (same random stream
    # whatever the depth operator); then depth: the other target layers copy it
    primary = {}
    for t, (s, zero_out) in enumerate(plan):
        if s not in primary and not zero_out:
            widen_block(new.layers[t], model.layers, s, maps, sc, width, noise)
            primary[s] = t
    for t, (s, zero_out) in enumerate(plan):
        if primary[s] == t:
            continue
        if zero_out and noise is None:  # a new block has no optimizer history: zero moments (and step 0, A)
            for p in new.layers[t].parameters():
                p.zero_()
            continue
        for p, q in zip(new.layers[t].parameters(), new.layers[primary[s]].parameters()):
            p.copy_(q)
        if zero_out:  # Z: the block outputs zero, plus zero-sum noise (N) on duplicated heads/neurons
            b = model.layers[s]
            expand_(new.layers[t].self_attn.o_proj.weight, b.self_attn.o_proj.weight, rows=maps.residual,
                    cols=maps.q_rows, noise=noise, zero=True)
            src_ffns = b.ffns()
            for e, mlp in enumerate(new.layers[t].ffns()):  # every expert outputs zero: so does their weighted sum
                expand_(mlp.down_proj.weight, src_ffns[e % len(src_ffns)].down_proj.weight, rows=maps.residual,
                        cols=maps.ffn, noise=noise, zero=True)


def empty_like_config(config, dtype, device):
    """A Llama of `config` with uninitialized weights (every tensor is filled by fill), tied as the config says."""
    with torch.device("meta"):  # no memory and no init: every tensor is written afterwards
        new = Llama(config)
    new = new.to(dtype=dtype).to_empty(device=device)
    if config.tie_embeddings:
        new.lm_head.weight = new.embed_tokens.weight
    return new


@torch.no_grad()
def grow_with_maps(model, target_config, width="fpi", depth="zero", seed=0, noise=1e-3, dus_overlap=None):
    """grow(), returning (grown model, WidthMaps, depth plan) so the maps can be shown and recorded."""
    src = model.config
    check_growth(src, target_config, width, depth, noise, dus_overlap)
    # R2, the two rules that keep RMSNorm exact on the R1 stream: every gain times sqrt(d/D), eps times d/D
    gain = math.sqrt(src.d_model / target_config.d_model)
    cfg = replace(target_config, norm_eps=src.norm_eps * src.d_model / target_config.d_model)
    plan = depth_plan(src.n_layers, cfg.n_layers, depth, dus_overlap)
    ref = model.embed_tokens.weight
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
    gen = torch.Generator().manual_seed(seed)  # one stream: the maps first, then the noise of every matrix
    maps = width_maps(src, cfg, gen)
    new = empty_like_config(cfg, ref.dtype, ref.device)
    # RoPE's tables are float64, as a fresh model's (Llama.forward casts them once per call)
    new.rope_cos, new.rope_sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=ref.device)
    fill(new, model, maps, plan, weight_scales(maps, gain), width, Noise(noise, gen))
    new.train(model.training)
    return new, maps, plan


# the optimizer through growth (A)


def optimizer_names(model, decay_embeddings=False):
    """The parameter names of each of AdamW's groups, in its order (common.make_optimizer): a state dict's keys
    0, 1, ... count through them."""
    opt = make_optimizer(model, 0.0, 0.0, (0.9, 0.95), torch.device("cpu"), decay_embeddings)
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [[name_of[id(p)] for p in g["params"]] for g in opt.param_groups]


def moment_model(config, tensors):
    """A Llama on the meta device whose weights are `tensors` ({name: one AdamW moment}), for fill to read."""
    with torch.device("meta"):
        m = Llama(config)
    if config.tie_embeddings:
        tensors = {**tensors, "lm_head.weight": tensors["embed_tokens.weight"]}
    m.load_state_dict(tensors, assign=True)
    return m


def grow_optimizer_state(model, new, state, maps, plan, width, decay_embeddings=False):
    """AdamW's state dict for `new` (grown from `model` with maps and plan) from `model`'s (full_state's layout):
    moments through rule A, each parameter's step count from the parameter it copies. Parameters with no history
    start fresh (step 0, zero moments), as a fresh AdamW would start them: depth zero's new blocks, and an
    upcycled router and its experts (U: which expert a token reaches, so each expert's gradient, depends on a
    router that was never trained). Raises ValueError for a state that does not fit the model."""
    src_groups, new_groups = optimizer_names(model, decay_embeddings), optimizer_names(new, decay_embeddings)
    src_order = [name for g in src_groups for name in g]
    sizes = [len(g.get("params", [])) for g in state.get("param_groups", [])]
    entries = state.get("state", {})
    if sizes != [len(g) for g in src_groups] or sorted(entries) != list(range(len(src_order))) or any(
            set(e) != {"step", "exp_avg", "exp_avg_sq"} for e in entries.values()):
        raise ValueError(f"the optimizer state does not fit the model (groups of {sizes} parameters, "
                         f"{len(entries)} entries, for {[len(g) for g in src_groups]}; decay_embeddings="
                         f"{decay_embeddings}): grow without the optimizer (fresh AdamW)")
    by_name = {src_order[i]: e for i, e in entries.items()}
    gain = math.sqrt(model.config.d_model / new.config.d_model)
    moments = {}
    for key, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
        src = moment_model(model.config, {name: by_name[name][key] for name in src_order})
        dst = empty_like_config(new.config, src.embed_tokens.weight.dtype, "cpu")
        fill(dst, src, maps, plan, moment_scales(maps, gain, power), width, None)
        moments[key] = dict(dst.named_parameters())
    upcycled = new.config.moe_experts and not model.config.moe_experts
    grown = {}
    for i, name in enumerate(n for g in new_groups for n in g):
        parts = name.split(".")
        if parts[0] == "layers":  # the depth plan says which source layer a layer copies
            t = int(parts[1])
            source, fresh = ".".join(["layers", str(plan[t][0])] + parts[2:]), plan[t][1]
            fresh = fresh or bool(upcycled and parts[2] == "block_sparse_moe")
        else:
            source, fresh = name, False
        moment = {key: moments[key][name].detach() for key in ("exp_avg", "exp_avg_sq")}
        if fresh:
            grown[i] = {"step": torch.zeros_like(by_name[src_order[0]]["step"]),
                        **{key: torch.zeros_like(v) for key, v in moment.items()}}
        else:
            grown[i] = {"step": by_name[source]["step"].clone(), **moment}
    groups, first = [], 0
    for g, names in zip(state["param_groups"], new_groups):  # the source's settings, the new model's parameters
        groups.append({**g, "params": list(range(first, first + len(names)))})
        first += len(names)
    return {"state": grown, "param_groups": groups}


def grow(model, target_config, width="fpi", depth="zero", seed=0, noise=1e-3, dus_overlap=None):
    """A new Llama grown from `model` (left untouched) to target_config, same dtype and device. Its
    config is target_config with norm_eps = source norm_eps * d/D (R2).
    width: fpi | aki; depth: zero | stack | dus; noise: relative std of the zero-sum symmetry-breaking
    noise N (0: exact copies); dus_overlap: SOLAR's m (default: from the target depth)."""
    return grow_with_maps(model, target_config, width, depth, seed, noise, dus_overlap)[0]


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
    return width == "fpi" and (depth in ("zero", "zero_groups") or n_old == n_new)


def grow_checkpoint(ckpt, target_config, optimizer="fresh", **grow_kwargs):
    """(grown checkpoint, gap). The lineage goes on (Lineage.after: stage, flops, history), tokens carry
    over, a 'grow' record is appended to history. optimizer "fresh": no optimizer state (a fresh AdamW after
    growth); "grown": the source's AdamW state grown with the weights (rule A), for the next run to start from
    (train.py init_optimizer, series.py grow_optimizer). The record holds the operator, the configs, the gap and
        unit_maps   {"residual", "ffn", "kv_heads", "q_heads"}: lists of ints, new index -> old index
        depth_plan  one {"from": old layer, "zero_out": bool} per new layer (zero_out: depth zero's Z)
    The gap is measured on 2 x 64 seeded random tokens (fewer if either model's max_seq_len is shorter),
    in float64 unless the two models are too large (> GAP_FLOAT64_MAX_PARAMS together), then in the
    model's dtype; the record says which. A float32 checkpoint evaluated in float64 shows the float32
    rounding of its scaled copies (~1e-6), not 1e-15. Raises CheckpointError for weights that do not fit
    their config, ValueError for a bad target or arguments, and ValueError rather than return a grown
    model with a NaN or inf in its weights or its gap."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if optimizer == "grown" and not isinstance(ckpt.get("optimizer"), dict):
        raise ValueError("the checkpoint holds no optimizer state to grow (train.py's ckpt_*.pt and final.pt do): "
                         "grow one of those, or grow with a fresh optimizer")
    model = model_from_checkpoint(ckpt)  # validated against its config; the source held once
    new, maps, plan = grow_with_maps(model, target_config, **grow_kwargs)
    noise = grow_kwargs.get("noise", 1e-3)
    bad = find_non_finite(new.state_dict())
    if bad:
        raise ValueError(f"the grown weight {bad} holds NaN or inf (noise={noise:g} times the weights' std "
                         "overflowed?): nothing written; use a small noise such as 1e-3")
    extra = {}
    if optimizer == "grown":
        decay_embeddings = bool((ckpt.get("train_config") or {}).get("decay_embeddings", False))
        extra["optimizer"] = grow_optimizer_state(model, new, ckpt["optimizer"], maps, plan,
                                                  grow_kwargs.get("width", "fpi"), decay_embeddings)
        bad = find_non_finite({f"{i}.{k}": v for i, e in extra["optimizer"]["state"].items() for k, v in e.items()})
        if bad:
            raise ValueError(f"the grown optimizer state {bad} holds NaN or inf: nothing written; grow with a fresh "
                             "optimizer, or from an earlier checkpoint")
    gen = torch.Generator().manual_seed(grow_kwargs.get("seed", 0))
    # RoPE has no learned positions, so max_seq_len may change; the gap runs on a length both models take
    seq = min(64, model.config.max_seq_len, new.config.max_seq_len)
    idx = torch.randint(0, model.config.vocab_size, (2, seq), generator=gen)
    big = model.num_params(False) + new.num_params(False) > GAP_FLOAT64_MAX_PARAMS
    gap_dtype = next(model.parameters()).dtype if big else torch.float64
    gap = function_gap(model, new, idx, dtype=gap_dtype)
    if not math.isfinite(gap):
        raise ValueError(f"the function gap of the grown model is {gap} ({str(gap_dtype).removeprefix('torch.')} "
                         "logits overflow): nothing written; check the source checkpoint's weights and the noise")
    record = dict(op="grow", width=grow_kwargs.get("width", "fpi"), depth=grow_kwargs.get("depth", "zero"),
                  seed=grow_kwargs.get("seed", 0), noise=noise, optimizer=optimizer,
                  dus_overlap=grow_kwargs.get("dus_overlap"), **{"from": asdict(model.config)}, to=asdict(new.config),
                  gap=gap, gap_dtype=str(gap_dtype).removeprefix("torch."), unit_maps=maps.as_lists(),
                  depth_plan=[{"from": s, "zero_out": z} for s, z in plan])
    out = make_checkpoint(new.state_dict(), new.config, ckpt["tokenizer"], Lineage.after(ckpt).then(record),
                          run_flops=0, tokens=ckpt.get("tokens", 0), **extra)
    return out, gap


# -----------------------------------------------------------------------------
# command line


def parse_value(key, text, kind):
    """One --to value, strictly: an int is digits, a float finite, a bool true or false (any case).
    Anything else is an error, never a silent default (int("3.0"), "ture" -> False)."""
    if kind is bool:
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise ValueError(f"bad --to value {key}={text}: {key} is true or false")
    if kind is int:
        if re.fullmatch(r"[+-]?[0-9]+", text):
            return int(text)
        raise ValueError(f"bad --to value {key}={text}: {key} is a whole number")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"bad --to value {key}={text}: {key} is a finite number")
    return value


def parse_target(spec, src):
    """--to: a shape name (model.SHAPES), or field=value overrides of the source config, or both
    ('cpu-2,max_seq_len=512'). ValueError (one line) for an unknown shape or field, a value not of its
    field's type, a field given twice, or norm_eps (it follows from the source, R2)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"--to {spec!r} names no shape and no field: give e.g. cpu-2 or d_model=96,n_layers=4")
    base = asdict(src)
    if "=" not in parts[0]:
        base = asdict(config_from_shape(parts.pop(0)))
    types = {f.name: f.type for f in fields(ModelConfig)}
    seen = set()
    for p in parts:
        key, eq, value = (x.strip() for x in p.partition("="))
        if not eq or key not in types or not value:
            raise ValueError(f"bad --to item {p!r}: give a shape name first, then field=value with a field of "
                             f"{', '.join(types)}")
        if key == "norm_eps":
            raise ValueError("--to norm_eps is not used: the grown model's eps is the source's times d/D (rule R2); "
                             "leave norm_eps out of --to")
        if key in seen:
            raise ValueError(f"--to gives {key} twice: give each field once")
        seen.add(key)
        base[key] = parse_value(key, value, types[key])
    return ModelConfig(**base)


def param_counts(config):
    """(non-embedding, total, active non-embedding) parameters of a config."""
    with torch.device("meta"):
        m = Llama(config)
    return m.num_params(True), m.num_params(False), m.num_params(True, active=True)


# --explain: a worked example small enough to read every map, printed, then drawn for a slide


def explain_growth(width="fpi", depth="zero", seed=0, noise=0.0):
    """(source, grown, maps, plan): a random float64 Llama of width 4, FFN 6, 2 heads of head_dim 2 and
    3 layers, grown to width 6, FFN 9, 3 heads and 5 layers (4 for dus, whose 2L - 2m is even)."""
    src = ModelConfig(vocab_size=16, d_model=4, n_layers=3, n_heads=2, n_kv_heads=2, head_dim=2, ffn_dim=6,
                      max_seq_len=16)
    tgt = replace(src, d_model=6, n_heads=3, n_kv_heads=3, ffn_dim=9, n_layers=4 if depth == "dus" else 5)
    model = Llama(src).to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # unit-scale weights and gains far from 1: a wrong scale cannot hide in a tiny init
        for p in model.parameters():
            z = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(z / math.sqrt(p.shape[1]) if p.dim() == 2 else 1 + 0.5 * z)
    new, maps, plan = grow_with_maps(model, tgt, width, depth, seed, noise)
    return model, new, maps, plan


def print_map(title, g, n_old, scales):
    """One unit map as a table: new index, old index, copy count k, and the scales ({label: list of floats})."""
    k = copy_counts(g, n_old)
    print(title)
    for label, values in [("new", range(len(g))), ("old", g.tolist()), ("k", k.tolist())] + list(scales.items()):
        print(f"  {label:<10}" + "".join(f"{v:>8.4g}" if isinstance(v, float) else f"{v:>8}" for v in values))


def explain(width="fpi", depth="zero", seed=0, noise=0.0, png="docs/growth_explain.png"):
    """Print the worked example's maps, scales, depth plan and measured gap; draw the maps to png."""
    model, new, maps, plan = explain_growth(width, depth, seed, noise)
    src, cfg = model.config, new.config
    idx = torch.randint(0, src.vocab_size, (2, src.max_seq_len), generator=torch.Generator().manual_seed(seed))
    gap = function_gap(model, new, idx)
    print(f"Worked example in float64: width {width}, depth {depth}, seed {seed}, noise {noise:g}")
    for label, c in (("source", src), ("grown ", cfg)):
        print(f"  {label}: d_model {c.d_model}, ffn_dim {c.ffn_dim}, {c.n_heads} query heads / {c.n_kv_heads} KV heads "
              f"of head_dim {c.head_dim}, {c.n_layers} layers")
    print("\nWidth: every new unit copies an old one (new index -> old index); the old units keep their\n"
          "index, the rest are seeded random picks. k = number of copies of that old unit.\n")
    print_map(f"residual dims (d_model {src.d_model} -> {cfg.d_model})", maps.residual, src.d_model,
              {"1/sqrt(k)": maps.residual_scale.tolist()})
    print("  R1 writers: embed_tokens columns, o_proj and down_proj rows copied times 1/sqrt(k)")
    print("  R3 readers: q/k/v, gate/up and lm_head columns copied times 1/sqrt(k)")
    print(f"  R2 RMSNorm: every gain times sqrt(d/D) = sqrt({src.d_model}/{cfg.d_model}) = "
          f"{math.sqrt(src.d_model / cfg.d_model):.4f}; eps times d/D: {src.norm_eps:g} -> {cfg.norm_eps:.4g}\n")
    print_map(f"FFN neurons (ffn_dim {src.ffn_dim} -> {cfg.ffn_dim})", maps.ffn, src.ffn_dim,
              {"1/k": maps.ffn_div.tolist()})
    print("  H1: gate/up rows copied, down_proj columns times 1/k\n")
    print_map(f"KV heads ({src.n_kv_heads} -> {cfg.n_kv_heads}; never divided, H2)", maps.kv_heads, src.n_kv_heads, {})
    print_map(f"query heads ({src.n_heads} -> {cfg.n_heads})", maps.q_heads, src.n_heads,
              {"1/k": maps.q_div[::src.head_dim].tolist()})
    print(f"  H1, H2: q_proj rows copied per block of head_dim {src.head_dim}, o_proj columns times 1/k;\n"
          "          each query head reads a copy of its old KV head")
    if width == "aki":
        print("  aki: the in-weights of every copy beyond the first come from the layer above (the top layer: its own)")
    print(f"\nDepth ({depth}, {src.n_layers} -> {cfg.n_layers} layers): new layer <- old layer")
    for t, (s, z) in enumerate(plan):
        zero_note = "   Z: a copy of the layer below with o_proj = down_proj = 0: adds 0 to the stream"
        print(f"  {t} <- {s}" + (zero_note if z else ""))
    with torch.no_grad():
        logit = model(idx)[0].abs().max().item()
    print(f"\nfunction gap: max |logit difference| = {gap:.3e} (float64, {idx.shape[0]} x {idx.shape[1]} random "
          f"tokens; the logits themselves reach {logit:.3g})")
    if is_function_preserving(width, depth, src.n_layers, cfg.n_layers):
        print(f"{width} + {depth} is function preserving (H1, H2, R1-R3, Z{', N' if noise > 0 else ''}): "
              "the grown model computes the same logits, up to float64 rounding")
    else:
        print(f"width={width} depth={depth} is not function preserving: a nonzero gap is expected")
    draw_explain(src, cfg, maps, plan, f"bert2BERT growth, width {width} + depth {depth} (seed {seed}): "
                 f"measured max |logit difference| {gap:.1e}", png)
    print(f"wrote {png}")


def draw_explain(src, cfg, maps, plan, title, path):
    """The maps of the worked example as one figure: three width panels (old units left, new units right,
    a line from every new unit to the old unit it copies, colored by k, the scale at the new end) and
    the depth plan (old layers left, new layers right, bottom to top)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    color = {1: "0.55", 2: "tab:blue", 3: "tab:orange", 4: "tab:red"}
    width_panels = [
        (f"residual dims {src.d_model} → {cfg.d_model}", "writers (R1) and readers (R3) × 1/√k", maps.residual,
         src.d_model, lambda k: "×1" if k == 1 else f"×1/√{k}"),
        (f"FFN neurons {src.ffn_dim} → {cfg.ffn_dim}", "down_proj columns × 1/k (H1)", maps.ffn, src.ffn_dim,
         lambda k: "×1" if k == 1 else f"×1/{k}"),
        (f"query heads {src.n_heads} → {cfg.n_heads}", "o_proj columns × 1/k (H1)", maps.q_heads, src.n_heads,
         lambda k: "×1" if k == 1 else f"×1/{k}"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(17, 7.5))
    y_max = max(cfg.ffn_dim, cfg.n_layers) / 2 + 0.3
    for ax, (name, rule, g, n_old, scale) in zip(axes, width_panels):
        k = copy_counts(g, n_old).tolist()
        y_old = [(n_old - 1) / 2 - j for j in range(n_old)]  # index 0 at the top
        y_new = [(len(g) - 1) / 2 - i for i in range(len(g))]
        for i, j in enumerate(g.tolist()):
            ax.plot([0, 1], [y_old[j], y_new[i]], color=color.get(k[i], "k"), lw=2.5, zorder=1)
            ax.text(1.16, y_new[i], scale(k[i]), va="center", fontsize=12, color=color.get(k[i], "k"))
        ax.scatter([0] * n_old, y_old, s=420, c="white", edgecolors="k", zorder=2)
        ax.scatter([1] * len(g), y_new, s=420, c=[color.get(x, "k") for x in k], edgecolors="k", zorder=2)
        for j, y in enumerate(y_old):
            ax.text(0, y, str(j), ha="center", va="center", fontsize=10, zorder=3)
        for i, y in enumerate(y_new):
            ax.text(1, y, str(i), ha="center", va="center", fontsize=10, color="white", zorder=3)
        ax.set_title(f"{name}\n{rule}", fontsize=12)
    ratio = f"{src.d_model}/{cfg.d_model}"
    axes[0].text(0.5, -y_max + 0.2, f"RMSNorm (R2): gains × √({ratio}),\neps × {ratio}", ha="center", va="bottom",
                 fontsize=11)
    if torch.equal(maps.kv_heads, maps.q_heads):
        axes[2].text(0.5, -y_max + 0.2, "KV heads: the same map\n(k/v rows copied, never divided)", ha="center",
                     va="bottom", fontsize=11)
    depth_ax = axes[3]
    y_old = [s - (src.n_layers - 1) / 2 for s in range(src.n_layers)]  # layer 0 at the bottom
    y_new = [t - (cfg.n_layers - 1) / 2 for t in range(cfg.n_layers)]
    for t, (s, z) in enumerate(plan):
        depth_ax.plot([0.2, 0.8], [y_old[s], y_new[t]], color="tab:green" if z else "0.55", lw=2.5, zorder=1)
        depth_ax.add_patch(plt.Rectangle((0.8, y_new[t] - 0.3), 0.4, 0.6, facecolor="white" if z else "0.85",
                                         edgecolor="tab:green" if z else "k", hatch="//" if z else None, lw=1.5))
        depth_ax.text(1.0, y_new[t], str(t), ha="center", va="center", fontsize=11,
                      bbox=dict(facecolor="white", edgecolor="none", pad=1) if z else None)
        depth_ax.text(1.27, y_new[t], f"copy of {s}" + ("\no_proj = down_proj = 0" if z else ""), va="center",
                      fontsize=10, color="tab:green" if z else "k")
    for s, y in enumerate(y_old):
        depth_ax.add_patch(plt.Rectangle((-0.2, y - 0.3), 0.4, 0.6, facecolor="0.85", edgecolor="k", lw=1.5))
        depth_ax.text(0, y, str(s), ha="center", va="center", fontsize=11)
    depth_rule = "hatched: new block that adds 0 (Z)" if any(z for _, z in plan) else "new layers copy old ones"
    depth_ax.set_title(f"layers {src.n_layers} → {cfg.n_layers} (bottom to top)\n{depth_rule}", fontsize=12)
    for ax in axes:
        ax.set_xlim(-0.45, 1.9)
        ax.set_ylim(-y_max, y_max)
        ax.text(0, y_max - 0.1, "old", ha="center", va="top", fontsize=12, weight="bold")
        ax.text(1, y_max - 0.1, "new", ha="center", va="top", fontsize=12, weight="bold")
        ax.axis("off")
    ks = sorted(set(copy_counts(maps.residual, src.d_model).tolist() + copy_counts(maps.ffn, src.ffn_dim).tolist()
                    + copy_counts(maps.q_heads, src.n_heads).tolist()))
    handles = [Line2D([], [], color=color.get(k, "k"), lw=3, label=f"k = {k}: the old unit has {k} "
                      + ("copy" if k == 1 else "copies")) for k in ks]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=12, frameon=False)
    fig.suptitle(title, fontsize=14)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_out(path, overwrite):
    """--out, before any work: a file the user has is never replaced unasked, and a path that cannot be
    written fails now rather than after the growth."""
    if os.path.isdir(path):
        raise ValueError(f"--out {path} is a folder: give the path of the checkpoint file to write")
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"--out {path} exists: choose another path, or pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):  # save_checkpoint makes the missing folders under the nearest existing one
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise OSError(f"cannot write {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK):
        raise OSError(f"cannot write {path}: {folder} is not writable (read-only, or another user's)")


def write_checkpoint(ckpt, path):
    """save_checkpoint, with a failed write (a full disk, a read-only folder) as one line naming the file."""
    try:
        save_checkpoint(ckpt, path)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None


def fail(e):
    """A bad input's answer: one line on stderr saying what was wrong and what to do, exit code 2."""
    print("error: " + " ".join(line.strip() for line in str(e).splitlines()), file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    p = argparse.ArgumentParser(description="Grow a nanogrow checkpoint (bert2BERT width, zero/stack/DUS depth).")
    p.add_argument("ckpt", nargs="?", help="the checkpoint to grow (not with --explain)")
    p.add_argument("--to", help="a shape name (e.g. cpu-2, paper-2B) or d_model=..,n_layers=..,... or both "
                   "(cpu-4,moe_experts=8,moe_top_k=2 upcycles into a mixture of experts); "
                   "booleans are true/false, and norm_eps follows from the source")
    p.add_argument("--width", default="fpi", choices=WIDTHS)
    p.add_argument("--depth", default="zero", choices=DEPTHS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=None,
                   help="relative std of the zero-sum symmetry-breaking noise, finite and >= 0 "
                   "(default 1e-3; 0 with --explain; series.py grows with 0.3, the best of docs/ablation.md)")
    p.add_argument("--dus_overlap", type=int, default=None, help="SOLAR's m (layers dropped from each copy)")
    p.add_argument("--optimizer", default="fresh", choices=OPTIMIZERS, help="grown: also grow the checkpoint's AdamW "
                   "state (rule A), for train.py --init_from=OUT --init_optimizer; fresh: weights only")
    p.add_argument("--out", help="the grown checkpoint; an existing file is kept unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--explain", action="store_true", help="print and draw a worked example (width 4 -> 6, 3 -> 5 "
                   "layers) with --width/--depth/--seed/--noise; needs no checkpoint")
    p.add_argument("--explain_png", default="docs/growth_explain.png", help="where --explain draws the maps")
    args = p.parse_args(argv)
    if args.explain:
        try:
            explain(args.width, args.depth, args.seed, args.noise or 0.0, args.explain_png)
        except (ValueError, OSError) as e:
            fail(e)
        return
    if not (args.ckpt and args.to and args.out):
        p.error("give a checkpoint, --to and --out (or --explain for a worked example)")
    noise = 1e-3 if args.noise is None else args.noise
    try:
        if not os.path.isfile(args.ckpt):  # the input first; then --out, before the (long) load and growth
            raise CheckpointError(f"no checkpoint at {args.ckpt}")
        check_out(args.out, args.overwrite)
        ckpt = load_checkpoint(args.ckpt)
        old = config_from_dict(ckpt.get("model_config"))
        target = parse_target(args.to, old)
        new_ckpt, gap = grow_checkpoint(ckpt, target, width=args.width, depth=args.depth, seed=args.seed,
                                        noise=noise, dus_overlap=args.dus_overlap, optimizer=args.optimizer)
        del ckpt  # the source's tensors: only the grown model is held while writing
        write_checkpoint(new_ckpt, args.out)
    except (CheckpointError, ValueError, OSError) as e:
        fail(e)
    new = config_from_dict(new_ckpt["model_config"])
    for label, c in (("source", old), ("grown", new)):
        ne, tot, act = param_counts(c)
        moe = f" experts={c.moe_experts} top_k={c.moe_top_k}" if c.moe_experts else ""
        print(f"{label:<7} d_model={c.d_model} ffn_dim={c.ffn_dim} n_layers={c.n_layers} "
              f"heads={c.n_heads}/{c.n_kv_heads}{moe}: non-embedding {ne:,} (active per token {act:,}) "
              f"total {tot:,} parameters")
    rec = new_ckpt["history"][-1]
    print(f"function gap: max |logit difference| = {gap:.3e} ({rec['gap_dtype']}, 2 random sequences)")
    if not is_function_preserving(args.width, args.depth, old.n_layers, new.n_layers):
        print(f"width={args.width} depth={args.depth} is not function preserving: a nonzero gap is expected")
    print(f"norm_eps {old.norm_eps:.4g} -> {new.norm_eps:.4g} (scaled by d/D); wrote {args.out}")


if __name__ == "__main__":
    main()
