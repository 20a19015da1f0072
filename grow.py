"""
grow.py: make a trained Llama wider and deeper, the step between the stages of the series (Yano et al. 2025,
section 2.2, eq. (1): theta_{i+1} = f(theta_i; X_{i+1}), with f = bert2BERT, which "copies the weights of linear
layers to widen the hidden dims, and stacks trained layers upward").

grow(model, target_config, width, depth, seed, noise) returns the grown model, grow_checkpoint(ckpt, target_config,
optimizer) a grown checkpoint (AdamW's state too) and the measured gap; the command line is grow_cli.py.

Width first (every existing layer), then depth. Notation: the source has residual width d, FFN width F, H query
heads in Hk KV groups of G = H/Hk, L layers; the target D, F', H', Hk', G', L'. head_dim stays fixed: width grows
by adding heads (the paper's 1B -> 2B: 16 -> 20 heads of 128).

Width, "fpi" (bert2BERT, Chen et al. 2022, ACL, width-wise expansion: "function preserving initialization", which
extends Net2Net to Transformers). Each new unit copies an old one through a map g: new index -> old index, the
identity on the old indices followed by seeded random picks without replacement, one round per multiple (any
ratio, 2048 -> 2560 included). k_j = #{i : g(i) = j} copies of old unit j. The maps are a WidthMaps; a grown
checkpoint's last history record holds them as lists.

Why fpi keeps the function. The rules are named; the lines that apply them cite the names.
  H1  hidden units (FFN neurons, attention heads: between an in- and an out-projection). In-weights copied,
      out-weights divided by the copy count:
          W_in'[i, :] = W_in[g(i), :]        W_out'[:, i] = W_out[:, g(i)] / k_g(i)
      (rows of gate/up and of q/k/v per head_dim block; columns of down_proj and o_proj). Copy i computes
      h'_i = h_g(i), and sum_{i: g(i)=j} W_out[:, j] h_j / k_j = W_out[:, j] h_j.
  H2  GQA: query head h reads KV head h // G'. KV heads are mapped first; the G' query slots of every new KV head
      that copies old KV head m get old query heads of m's group (its G heads once each, then seeded repeats), so
      every query copy reads a copy of the keys and values it was trained with. KV heads are never divided (each
      query reads exactly one KV head); o_proj divides by the copies of each query head (H1). Possible iff
      floor(Hk'/Hk) G' >= G; otherwise ValueError.
  Residual dims (d -> D). Copying as in H1 is not exact here: RMSNorm divides by sqrt(mean over all D dims), and
  a dim copied k times counts k times in that mean. Three rules instead:
  R1  writers (embed_tokens columns, o_proj and down_proj rows) are copied times 1/sqrt(k), so the stream carries
          x'_i = x_g(i) / sqrt(k_g(i)),   hence   sum_i x'_i^2 = sum_j x_j^2,   mean'(x'^2) = (d/D) mean(x^2).
      A residual add keeps R1: both of its terms follow it.
  R2  every RMSNorm (the two of each block and the final one):
          gain'_i = gain_g(i) sqrt(d/D)        eps' = eps d/D
      so that, with j = g(i),
          gain'_i x'_i / sqrt(mean'(x'^2) + eps')
              = gain_j sqrt(d/D) (x_j / sqrt k_j) / sqrt((d/D) (mean(x^2) + eps)) = RMSNorm(x)_j / sqrt(k_j):
      the normalized stream follows R1's rule too. Without the gain rule every copy is sqrt(D/d) too large;
      without the eps rule the norm divides by sqrt(mean + eps D/d) instead. The grown config therefore carries
      norm_eps = source eps d/D (the target config's own norm_eps is not used).
  R3  readers (q/k/v, gate/up, an untied lm_head: columns) are copied times 1/sqrt(k):
          sum_i W[:, g(i)] / sqrt(k_g(i)) * y_g(i) / sqrt(k_g(i)) = sum_j k_j W[:, j] y_j / k_j = W y.
  By induction over the blocks (R1 in, R2 + R3 into the hidden units, H1/H2 through them, R1 out) and R2 + R3 at
  the final norm and lm_head, the grown model computes the old logits. Tied embeddings: one matrix is writer (R1)
  and reader (R3), both want 1/sqrt(k): consistent, no logit scale needed.
  N   symmetry breaking (noise > 0, seeded). Exact copies get equal gradients forever (the tests show duplicated
      neurons stay equal after a step with noise=0). Where copies carry equal inputs their READER weights only
      matter through their sum, so those get noise z_c with sum_c z_c = 0 over the copies c of each unit:
      down_proj columns (copied neurons), o_proj columns (copied query heads), q/k/v/gate/up and untied lm_head
      columns (copied residual dims), and the zeroed o_proj/down_proj of depth "zero" layers. z_c = y_c - y_next(c),
      next going round the copies of the unit in a cycle, y ~ N(0, (noise std(source weight))^2 / 2): the sum
      telescopes to 0. A tied embedding is also a writer: no noise there. Function preserving up to float rounding,
      as the copies of a residual dim stay equal in float too: o_proj/down_proj rows of one dim's copies carry the
      same noise (the first copy's; the later draws are dropped). Noisy rows that differ round differently, and the
      next readers' noise amplifies that layer by layer (2 -> 16 layers, float32, noise 1: a gap of 0.18 against
      1e-7). noise <= NOISE_MAX: beyond it the rounding of noisy weights to bfloat16 breaks the sum.
      The copies then drift apart under training, slowly at first with AdamW, whose first step is sign(grad) for
      every weight (equal for nearly equal gradients).

Width, "aki" (bert2BERT, width-wise expansion: "advanced knowledge initialization"): as fpi, but the new units'
in-weights come from the same units of the layer ABOVE (l+1; the top layer has none and uses its own, as fpi): the
copies beyond the first of each FFN neuron, and each KV head none of whose query slots holds an original query head,
with those query heads (H2: a query attends with the keys it was trained with). Every original head keeps its own
layer's weights. Out-weights are split as in fpi (H1), residual dims as in fpi (R1-R3). Not function preserving:
the gap is reported, never claimed 0.

Depth (after width; L -> L'):
  * "zero": L'-L new layers spread evenly over the L-1 gaps between old layers: new layer i goes after old layer
    floor((2i+1)(L-1) / 2(L'-L)) (midpoints of equal stretches; 18 -> 22 inserts after 2, 6, 10, 14). Never after
    the top layer (unless L = 1): the layers facing the embedding and lm_head stay at the ends.
    Z: a new layer copies the (widened) layer below it, with o_proj and down_proj set to zero (plus the paired
    noise N, which sums to zero): each new block adds 0 to the residual stream, so the function is preserved.
    The copied neighbor gives the new block trained attention patterns and activations, so o_proj/down_proj get
    useful gradients (LLaMA-Pro's identity blocks, Wu et al. 2024, ACL, copy a block and zero those too).
  * "zero_groups" (LLaMA-Pro, Wu et al. 2024, section 3.1, as their scripts/block_expansion.py): groups of
    floor(L/(L'-L)) layers from the bottom, a new layer (Z) after each group's top layer (32 -> 40: after 3, 7, ..., 31;
    18 -> 22: after 3, 7, 11, 15). The first L'-L groups where their script would add more (10 -> 14: it asserts);
    rounds of one per layer, from the bottom, where L'-L > L. Function preserving.
  * "stack" (bert2BERT's depth-wise expansion, after StackBERT): the trained stack is stacked on itself: new
    layer L+j copies layer j mod L (L' = 2L copies the whole stack once; a remainder takes the bottom layers,
    18 -> 22 appends 0-3). "stack_top": a remainder takes the top layers, as bert2BERT's Algorithm 1 does
    (18 -> 22 appends 14-17). Not function preserving.
  * "dus" (SOLAR Depth Up-Scaling, Kim et al. 2024, arXiv 2312.15166): two copies of the L layers, the last m
    dropped from the first and the first m from the second, concatenated: layers 0..L-m-1, m..L-1, L' = 2L - 2m
    (m from the target or --dus_overlap). Not function preserving.

The optimizer (grow_checkpoint(optimizer="grown"), grow_cli.py --optimizer grown):
  A   AdamW's moments are grown with the weights, by parameter name through the same maps, so that the next stage
      starts from the state the grown model would have if it had followed the source's trajectory in grown form:
      a weight copied with scale c into K copies has gradient grad / (c K) there, so m' = m / (c K) and
      v' = v / (c K)^2 (the derivation at moment_scales). Each parameter keeps its step count; a new zero block
      (Z) and an upcycled router with its experts (U) have no history and start fresh (step 0), as a fresh AdamW.
      The premise is a growth that keeps the function; elsewhere (aki, stack, dus) "grown" is refused.

Precision: every tensor is filled in float32 (or float64) and rounded once into the model's dtype, so a bf16 model
grows to the float32 growth of its weights, cast. RoPE's tables are float64, as a fresh model's.

Mixture of experts (a target with moe_experts = E > 0, model.SparseMoE's Mixtral layout):
  U   upcycling (Komatsuzaki et al. 2023, ICLR, "Sparse Upcycling"): from a dense source, every expert of a layer
      is a copy of its (widened) MLP and the router is new (random, std ROUTER_STD). The block gives
          sum_{e in top-k(x)} w_e(x) MLP_e(x),   w_e = p_e / sum_{e' in top-k(x)} p_e'   so  sum_e w_e = 1,
      and with MLP_e = MLP for every e that is MLP(x) * sum_e w_e = MLP(x), whatever the router picks: the
      upcycled model computes the dense function (up to the rounding of the sum of the w's). The width rules hold
      for each expert as for the MLP (H1, R1, R3), with its own noise draws (N): the experts differ in their
      weights and agree in their function. At the same width the experts start identical: routing breaks the
      symmetry, each expert trained on its tokens (tests/test_moe.py checks). Depth zero's new layers zero every
      expert's down_proj (Z: a weighted sum of zeros is zero). A mixture of experts grows into one with the same E
      and k: every expert is widened with the same maps, and the router reads the stream (R3, with N). Another E
      or k would change which experts a token reaches, so it is refused.

The file reads in that order: the depth plan, the width maps, expanding one tensor, widening a block, the grown
model and its measured gap (the proof, checked), grow() and grow_checkpoint(), AdamW's state.
"""

import copy
import math
from dataclasses import asdict, dataclass, replace

import torch

from checkpoint import Lineage, find_non_finite, make_checkpoint, model_from_checkpoint, optimizer_state_by_name
from common import ConfigError, decay_groups
from model import Llama, rope_cos_sin

WIDTHS = ("fpi", "aki")
OPTIMIZERS = ("fresh", "grown")  # after growth: a fresh AdamW, or the source's state grown with the weights (A)
DEPTHS = ("zero", "zero_groups", "stack", "stack_top", "dus")
CHUNK = 1 << 21  # elements per row chunk when filling a matrix: small temporaries (8 MB in fp32) that malloc reuses
GAP_FLOAT64_MAX_PARAMS = 500_000_000  # grow_checkpoint measures the gap in float64 below this (both models)
NOISE_MAX = 1.0  # N's largest noise: bf16 growths measured 1.1-1.7x their noise-0 gap at 1, 3-12x at 3 (fp32 keep 100)
ROUTER_STD = 0.02  # an upcycled router's init: Llama._init_weights' std (transformers' initializer_range too)

# -----------------------------------------------------------------------------
# the depth plan: which old layer every new layer copies


def depth_plan(n_old, n_new, depth, dus_overlap=None):
    """[(source layer, zero_out)] for every layer of the grown model; zero_out: o_proj/down_proj start at 0 (Z)."""
    n_add = n_new - n_old
    if depth in ("zero", "zero_groups"):
        after = [0] * n_old  # number of new layers inserted after each old layer
        split = max(1, n_old // max(n_add, 1))  # zero_groups: LLaMA-Pro's group size
        for i in range(n_add):
            if depth == "zero":  # midpoints of n_add equal stretches of the L-1 gaps between old layers
                after[(2 * i + 1) * (n_old - 1) // (2 * n_add)] += 1
            else:  # LLaMA-Pro: a new layer after every split-th layer, the first n_add of them (rounds if n_add > L)
                after[((i + 1) * split - 1) % n_old] += 1
        return [(s, z) for s in range(n_old) for z in [False] + [True] * after[s]]
    if depth in ("stack", "stack_top"):
        whole, rest = divmod(n_add, n_old)  # whole copies of the stack, then `rest` more layers
        extra = range(rest) if depth == "stack" else range(n_old - rest, n_old)  # the bottom ones, or bert2BERT's top
        return [(s, False) for s in list(range(n_old)) * (1 + whole) + list(extra)]
    if n_new == n_old and dus_overlap is None:
        return [(s, False) for s in range(n_old)]  # nothing to add (2L-2m = L needs m = L/2, any L here)
    m = dus_overlap if dus_overlap is not None else (2 * n_old - n_new) // 2
    return [(s, False) for s in range(n_old - m)] + [(s, False) for s in range(m, n_old)]


# -----------------------------------------------------------------------------
# the width maps: new unit -> old unit


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
    kv_new: torch.Tensor          # (Hk' head_dim,) the same for k/v rows: no query of that KV copy is an original
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
    residual, ffn = unit_map(src.d_model, tgt.d_model, gen), unit_map(src.ffn_dim, tgt.ffn_dim, gen)
    kv = unit_map(src.n_kv_heads, tgt.n_kv_heads, gen)
    q = torch.empty(tgt.n_heads, dtype=torch.long)
    for m in range(src.n_kv_heads):  # H2: the query slots of every new KV head copying old KV head m
        slots = ((kv == m).nonzero()[:, 0, None] * Gn + torch.arange(Gn)).flatten()
        q[slots] = m * G + unit_map(G, len(slots), gen)  # m's own G query heads once, then repeats
    assert torch.equal(q // G, kv[torch.arange(tgt.n_heads) // Gn])  # each query reads a copy of its own KV head

    def per_row(heads):  # head map -> row map over head_dim blocks (RoPE's layout lives inside a block)
        return (heads[:, None] * hd + torch.arange(hd)).flatten()

    # AKI: a KV copy reads layer l+1 when none of its query slots holds an old query head's first copy, its queries
    # with it (H2): every original head keeps its own layer, also when G' < G spreads a group over several KV copies
    kv_new = ~first_copies(q).view(tgt.n_kv_heads, Gn).any(1)
    return WidthMaps(
        residual=residual, residual_scale=(1.0 / copy_counts(residual, src.d_model).double()).sqrt(),  # R1, R3
        ffn=ffn, ffn_div=1.0 / copy_counts(ffn, src.ffn_dim).double(),  # H1: 1/k
        kv_heads=kv, q_heads=q, kv_rows=per_row(kv), q_rows=per_row(q),
        q_div=(1.0 / copy_counts(q, src.n_heads).double()).repeat_interleave(hd),  # H1: 1/k
        ffn_new=~first_copies(ffn), kv_new=kv_new.repeat_interleave(hd),
        q_new=kv_new[torch.arange(tgt.n_heads) // Gn].repeat_interleave(hd),
        kv_div=(1.0 / copy_counts(kv, src.n_kv_heads).double()).repeat_interleave(hd))


# -----------------------------------------------------------------------------
# expanding one tensor: rows and columns copied through the maps, scaled, (AKI) new rows read one layer up, N added


def work_dtype(dtype):
    """The dtype a grown tensor is computed in: float32 for bfloat16/float16 targets, so that every value is rounded
    once, when it is stored (in bf16 a 1/sqrt(3) would be rounded first, then its product: a gap of 0.05-0.12)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def row_chunks(out, n_old):
    """Fill `out` a block of rows at a time, about CHUNK elements each, so no temporary is full size: yields
    (first row, end row, chunk) where chunk is out's own rows, or for a bf16/fp16 `out` a float32 buffer that is
    rounded into out once, after the caller has filled it."""
    wdtype = work_dtype(out.dtype)
    step = max(1, CHUNK // max(out.shape[1], n_old))
    for i0 in range(0, out.shape[0], step):
        i1 = min(i0 + step, out.shape[0])
        same = wdtype == out.dtype
        chunk = out[i0:i1] if same else torch.empty(i1 - i0, out.shape[1], dtype=wdtype, device=out.device)
        yield i0, i1, chunk
        if not same:
            out[i0:i1].copy_(chunk)  # bf16/fp16: rounded once, here


def gather_rows(W, rows, dtype, above=None, from_above=None):
    """W's rows `rows` in `dtype`; AKI: a row where from_above is True is read from `above` (the layer above)."""
    part = W.index_select(0, rows).to(dtype)
    if above is not None and bool(from_above.any()):
        mask = from_above.to(part.device)
        part[mask] = above.index_select(0, rows[mask]).to(dtype)
    return part


def scale_(chunk, row_scale=None, col_scale=None):
    """chunk[i, c] *= row_scale[i], then *= col_scale[c] (None: 1)."""
    if row_scale is not None:
        chunk *= row_scale[:, None]
    if col_scale is not None:
        chunk *= col_scale


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
        self.scale, self.gen, self.pairings, self.stds = scale, gen, {}, {}

    def for_matrix(self, W, cols, device):
        """What one matrix W, read through column map cols, needs for N: (its copied columns on `device`, nxt, std
        of y), or None where it gets no noise (scale 0, or no column copied)."""
        if self.scale == 0:
            return None
        key = (id(cols), W.shape[1])  # the maps live as long as the growth, and the value keeps cols alive: unique
        if key not in self.pairings:
            self.pairings[key] = (cols, noise_pairs(cols, W.shape[1]))
        noisy, nxt = self.pairings[key][1]
        if not len(noisy):
            return None
        if id(W) not in self.stds:  # the difference of two draws has std sqrt(2) std(y) = scale * std(W)
            self.stds[id(W)] = (W, self.scale * float(W.to(work_dtype(W.dtype)).std()) / math.sqrt(2))
        return noisy.to(device), nxt, self.stds[id(W)][1]

    def add_(self, chunk, noisy, nxt, std):
        """N on a row chunk: column noisy[t] gets y[t] - y[nxt[t]], y ~ N(0, std^2) drawn on the CPU (the same draws on
        any device), so the noise sums to zero over the copies of every column, in every row."""
        # len(nxt) + 1 draws per row, the last unused: the random stream (and so every grown weight for a seed)
        # stays what it was when the noise was scattered over all columns through a zero column
        y = torch.randn(chunk.shape[0], len(nxt) + 1, generator=self.gen, dtype=chunk.dtype)
        y = y[:, :len(nxt)] * std
        y -= y.index_select(1, nxt)  # y[t] - y[nxt[t]]: only the copied columns, no full-width temporaries
        chunk.index_add_(1, noisy, y.to(chunk.device))


@torch.no_grad()
def expand_(out, W, rows=None, cols=None, row_scale=None, col_scale=None, noise=None, above=None, from_above=None):
    """out[i, c] = W[rows[i], cols[c]] * row_scale[i] * col_scale[c] (None: the identity map, a scale of 1), written
    a chunk of rows at a time straight into `out`. AKI: rows where from_above is True are read from `above`.
    noise (a Noise): N on the columns whose source column is copied."""
    dev, wdtype = out.device, work_dtype(out.dtype)
    rows = (torch.arange(out.shape[0]) if rows is None else rows).to(dev)
    cols = torch.arange(W.shape[1]) if cols is None else cols
    draws = noise.for_matrix(W, cols, dev) if noise is not None else None
    cols = cols.to(dev)
    row_scale = None if row_scale is None else row_scale.to(dev, wdtype)
    col_scale = None if col_scale is None else col_scale.to(dev, wdtype)
    for i0, i1, chunk in row_chunks(out, W.shape[1]):
        part = gather_rows(W, rows[i0:i1], wdtype, above, None if above is None else from_above[i0:i1])
        torch.index_select(part, 1, cols, out=chunk)
        del part
        scale_(chunk, None if row_scale is None else row_scale[i0:i1], col_scale)
        if draws:
            noise.add_(chunk, *draws)


@torch.no_grad()
def zero_out_(out, W, cols, noise):
    """Z: out = 0, plus N on the columns that cols copies (std from the source matrix W): the output projection of a
    new block, which then adds zero to the stream."""
    draws = noise.for_matrix(W, cols, out.device)
    for _, _, chunk in row_chunks(out, W.shape[1]):
        chunk.zero_()
        if draws:
            noise.add_(chunk, *draws)


@torch.no_grad()
def copy_norm_(dst, src, residual, scale):
    """An RMSNorm gain (R2): dst[i] = src[residual[i]] * scale[i], computed in float32 or float64, rounded once."""
    wdtype = work_dtype(dst.dtype)
    dst.copy_(src.to(wdtype)[residual.to(src.device)] * scale.to(dst.device, wdtype))


# -----------------------------------------------------------------------------
# widening a block, building the grown model


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


def widen_attention(new_block, block, above, maps, scales, noise):
    """q/k/v: rows copied per head (H1, H2; AKI: a new KV head's rows from the layer above), columns read the stream
    (R3, N on copied dims); o_proj: rows write the stream (R1), columns split over copied query heads (H1, N)."""
    new, old = new_block.self_attn, block.self_attn
    for name, rows, row_scale, from_above in (("q_proj", maps.q_rows, scales.q_in, maps.q_new),
                                              ("k_proj", maps.kv_rows, scales.kv_in, maps.kv_new),
                                              ("v_proj", maps.kv_rows, scales.kv_in, maps.kv_new)):
        expand_(getattr(new, name).weight, getattr(old, name).weight, rows=rows, row_scale=row_scale,
                cols=maps.residual, col_scale=scales.residual, noise=noise,
                above=None if above is None else getattr(above.self_attn, name).weight, from_above=from_above)
    expand_(new.o_proj.weight, old.o_proj.weight, rows=maps.residual, row_scale=scales.residual, cols=maps.q_rows,
            col_scale=scales.q_out, noise=noise)


def widen_ffns(new_block, block, above, maps, scales, noise):
    """The MLP, or each expert (U: a dense source's one MLP into every expert; an MoE source's expert e into e):
    gate/up rows copied (H1; AKI: new neurons from the layer above), columns read the stream (R3, N); down_proj rows
    write it (R1), columns split over copied neurons (H1, N). Every expert draws its own noise N, so copies differ
    in their weights but not in their function."""
    old_ffns, above_ffns = block.ffns(), None if above is None else above.ffns()
    for e, mlp in enumerate(new_block.ffns()):
        old, old_above = old_ffns[e % len(old_ffns)], None if above is None else above_ffns[e % len(above_ffns)]
        for name in ("gate_proj", "up_proj"):
            expand_(getattr(mlp, name).weight, getattr(old, name).weight, rows=maps.ffn, row_scale=scales.ffn_in,
                    cols=maps.residual, col_scale=scales.residual, noise=noise,
                    above=None if above is None else getattr(old_above, name).weight, from_above=maps.ffn_new)
        expand_(mlp.down_proj.weight, old.down_proj.weight, rows=maps.residual, row_scale=scales.residual,
                cols=maps.ffn, col_scale=scales.ffn_out, noise=noise)


@torch.no_grad()
def widen_block(new_block, layers, s, maps, scales, width, noise, moments):
    """Fill new_block with old layer s widened, every copy times its scale (fpi; aki: the new units' in-weights
    from layer s+1, the top layer's from itself)."""
    block = layers[s]
    above = layers[min(s + 1, len(layers) - 1)] if width == "aki" else None
    widen_attention(new_block, block, above, maps, scales, noise)
    widen_ffns(new_block, block, above, maps, scales, noise)
    if new_block.moe:
        router = new_block.block_sparse_moe.gate.weight
        if block.moe:  # R3: the router reads the stream like q/k/v; N on copied dims
            expand_(router, block.block_sparse_moe.gate.weight, cols=maps.residual, col_scale=scales.residual,
                    noise=noise)
        elif moments:  # U's new router has no optimizer history
            router.zero_()
        else:  # U: a new router, random as a fresh model's (std 0.02), so routing depends on the token at once
            router.copy_(ROUTER_STD * torch.randn(router.shape, generator=noise.gen, dtype=torch.float64))
    for name in ("input_layernorm", "post_attention_layernorm"):  # R2: gain times sqrt(d/D)
        copy_norm_(getattr(new_block, name).weight, getattr(block, name).weight, maps.residual, scales.norm)


@torch.no_grad()
def copy_block(new_block, widened, block, maps, zero_out, noise, moments):
    """Depth: new_block copies `widened` (old layer `block` after width growth). zero_out (Z): its o_proj and every
    down_proj are zero plus N, so the block adds zero to the stream; for moments, all of a Z block is zero."""
    if zero_out and moments:  # a new block has no optimizer history: zero moments (and step 0, A)
        for p in new_block.parameters():
            p.zero_()
        return
    for p, q in zip(new_block.parameters(), widened.parameters()):
        p.copy_(q)
    if zero_out:
        zero_out_(new_block.self_attn.o_proj.weight, block.self_attn.o_proj.weight, maps.q_rows, noise)
        old_ffns = block.ffns()
        for e, mlp in enumerate(new_block.ffns()):  # every expert outputs zero: so does their weighted sum
            zero_out_(mlp.down_proj.weight, old_ffns[e % len(old_ffns)].down_proj.weight, maps.ffn, noise)


@torch.no_grad()
def grow_into(new, model, maps, plan, scales, width, noise=None, moments=False):
    """Write every tensor of `new` from `model` through the width maps and the depth plan, each copy times its
    scale. noise: the growth's Noise (N, and an upcycled router's init). moments=True: the tensors are one of AdamW's
    moments (rule A): no noise, and what has no history (depth zero's new blocks, an upcycled router) is zero."""
    # the stream's ends: embedding (writer, R1), final norm (R2), untied lm_head (reader, R3)
    expand_(new.embed_tokens.weight, model.embed_tokens.weight, cols=maps.residual, col_scale=scales.residual)
    if not new.config.tie_embeddings:
        expand_(new.lm_head.weight, model.lm_head.weight, cols=maps.residual, col_scale=scales.residual, noise=noise)
    copy_norm_(new.norm.weight, model.norm.weight, maps.residual, scales.norm)
    # width: every old layer once, into the first target layer that copies it (the same random stream whatever the
    # depth operator); then depth: the other target layers copy it
    widened_at = {}  # old layer -> the target layer it was widened into
    for t, (s, zero_out) in enumerate(plan):
        if s not in widened_at and not zero_out:
            widen_block(new.layers[t], model.layers, s, maps, scales, width, noise, moments)
            widened_at[s] = t
    for t, (s, zero_out) in enumerate(plan):
        if widened_at[s] != t:
            copy_block(new.layers[t], new.layers[widened_at[s]], model.layers[s], maps, zero_out, noise, moments)
    for block in new.layers if noise is not None and noise.scale else []:  # N: a residual dim's copies take the same
        for W in [block.self_attn.o_proj.weight] + [mlp.down_proj.weight for mlp in block.ffns()]:  # writer row
            for i, j in enumerate(maps.residual.tolist()[model.config.d_model:], model.config.d_model):
                W[i] = W[j]  # the first copy's (old dim j is new dim j), noise included


def empty_like_config(config, dtype, device):
    """A Llama of `config` with uninitialized weights (grow_into writes every tensor), tied as the config says."""
    with torch.device("meta"):  # no memory and no init: every tensor is written afterwards
        new = Llama(config)
    new = new.to(dtype=dtype).to_empty(device=device)
    if config.tie_embeddings:
        new.lm_head.weight = new.embed_tokens.weight
    return new


def check_growth(src, tgt, width, depth, noise, dus_overlap, optimizer="fresh"):
    """Raise ValueError (one line: what, and what to do) unless src can grow into tgt (with AdamW's state: "grown")."""
    if width not in WIDTHS or depth not in DEPTHS:
        raise ValueError(f"width must be one of {WIDTHS} and depth one of {DEPTHS}, "
                         f"got width={width!r} depth={depth!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= NOISE_MAX:
        raise ConfigError(f"noise must be a finite number in [0, {NOISE_MAX:g}] (a relative std, e.g. 1e-3; 0 for "
                          f"exact copies; above {NOISE_MAX:g} rounding breaks the function), got {noise!r}")
    if optimizer == "grown" and not is_function_preserving(width, depth, src.n_layers, tgt.n_layers):  # A's premise
        raise ConfigError(f"optimizer 'grown' (rule A) needs a growth that keeps the function, not width={width} "
                          f"depth={depth}: use --optimizer fresh (series.py: grow_optimizer='fresh'), or fpi + zero")
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


@torch.no_grad()
def grow_with_maps(model, target_config, width="fpi", depth="zero", seed=0, noise=1e-3, dus_overlap=None):
    """grow(), returning (grown model, WidthMaps, depth plan) so the maps can be shown and recorded."""
    src = model.config
    check_growth(src, target_config, width, depth, noise, dus_overlap)
    # R2, the two rules that keep RMSNorm exact on the R1 stream: every gain times sqrt(d/D), eps times d/D
    gain = math.sqrt(src.d_model / target_config.d_model)
    cfg = replace(target_config, norm_eps=src.norm_eps * src.d_model / target_config.d_model)
    plan = depth_plan(src.n_layers, cfg.n_layers, depth, dus_overlap)
    like = model.embed_tokens.weight  # the grown model's dtype and device
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
    gen = torch.Generator().manual_seed(seed)  # one stream: the maps first, then the noise of every matrix
    maps = width_maps(src, cfg, gen)
    new = empty_like_config(cfg, like.dtype, like.device)
    # RoPE's tables are float64, as a fresh model's (Llama.forward casts them once per call)
    new.rope_cos, new.rope_sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=like.device)
    grow_into(new, model, maps, plan, weight_scales(maps, gain), width, noise=Noise(noise, gen))
    new.train(model.training)
    return new, maps, plan


# -----------------------------------------------------------------------------
# the proof, measured: the function gap


@torch.no_grad()
def logits_in(m, idx, dtype):
    """m's logits on token ids idx (B, T), run in `dtype` (a model in another dtype is copied; m is not changed)."""
    run = m if next(m.parameters()).dtype == dtype else copy.deepcopy(m).to(dtype)
    return run(idx.to(next(m.parameters()).device))[0]


def function_gap(model_a, model_b, idx, dtype=torch.float64):
    """Largest |logit difference| of the two models on token ids idx (B, T), both run in `dtype` (float64 default)."""
    return (logits_in(model_a, idx, dtype) - logits_in(model_b, idx, dtype)).abs().max().item()


def is_function_preserving(width, depth, n_old, n_new):
    """Whether the rules at the top make the growth exact: fpi with a depth that adds zero blocks (Z) or no layers."""
    return width == "fpi" and (depth in ("zero", "zero_groups") or n_old == n_new)


def measured_gap(model, new, seed):
    """(gap, dtype name, tolerance): the function gap on 2 x 64 seeded random tokens (fewer if either model's
    max_seq_len is shorter), in float64 unless the two models together pass GAP_FLOAT64_MAX_PARAMS, then in the
    model's dtype; and a function-preserving growth's float tolerance, sqrt(eps of the weights) times the largest
    |logit| (at NOISE_MAX, measured 300x below in float32, 2x in bfloat16)."""
    gen = torch.Generator().manual_seed(seed)
    # RoPE has no learned positions, so max_seq_len may change; the gap runs on a length both models take
    seq = min(64, model.config.max_seq_len, new.config.max_seq_len)
    idx = torch.randint(0, model.config.vocab_size, (2, seq), generator=gen)
    big = model.num_params(False) + new.num_params(False) > GAP_FLOAT64_MAX_PARAMS
    gap_dtype = next(model.parameters()).dtype if big else torch.float64
    gap = function_gap(model, new, idx, dtype=gap_dtype)
    if not math.isfinite(gap):
        raise ValueError(f"the function gap of the grown model is {gap} ({str(gap_dtype).removeprefix('torch.')} "
                         "logits overflow): nothing written; check the source checkpoint's weights and the noise")
    eps = torch.finfo(next(new.parameters()).dtype).eps
    tolerance = math.sqrt(eps) * logits_in(model, idx, gap_dtype).abs().max().item()
    return gap, str(gap_dtype).removeprefix("torch."), tolerance


# -----------------------------------------------------------------------------
# growing a model, growing a checkpoint


def grow(model, target_config, width="fpi", depth="zero", seed=0, noise=1e-3, dus_overlap=None):
    """A new Llama grown from `model` (left untouched) to target_config, same dtype and device. Its
    config is target_config with norm_eps = source norm_eps * d/D (R2).
    width: fpi | aki; depth: zero | zero_groups | stack | stack_top | dus; noise: relative std of the zero-sum
    symmetry-breaking noise N (0: exact copies); dus_overlap: SOLAR's m (default: from the target depth)."""
    return grow_with_maps(model, target_config, width, depth, seed, noise, dus_overlap)[0]


def grow_checkpoint(ckpt, target_config, optimizer="fresh", **grow_kwargs):
    """(grown checkpoint, gap). The lineage goes on (Lineage.from_weights: stage, flops, history), tokens carry
    over, a 'grow' record is appended to history. optimizer "fresh": no optimizer state (a fresh AdamW after
    growth); "grown": the source's AdamW state grown with the weights (rule A, keyed by parameter name), for the
    next run to start from (train.py init_optimizer, series.py grow_optimizer). The record holds the operator,
    the configs, the gap and its float tolerance gap_tolerance (measured_gap; a float32 checkpoint evaluated in
    float64 shows the float32 rounding of its scaled copies, ~1e-6, not 1e-15) and
        unit_maps   {"residual", "ffn", "kv_heads", "q_heads"}: lists of ints, new index -> old index
        depth_plan  one {"from": old layer, "zero_out": bool} per new layer (zero_out: depth zero's Z)
    Raises CheckpointError for weights that do not fit their config, ValueError for a bad target or arguments,
    and ValueError rather than return a grown model with a NaN or inf in its weights or its gap."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if optimizer == "grown" and not isinstance(ckpt.get("optimizer"), dict):
        raise ValueError("the checkpoint holds no optimizer state to grow (train.py's ckpt_*.pt and final.pt do): "
                         "grow one of those, or grow with a fresh optimizer")
    model = model_from_checkpoint(ckpt)  # validated against its config; the source held once
    width, depth, noise = (grow_kwargs.get(k, v) for k, v in (("width", "fpi"), ("depth", "zero"), ("noise", 1e-3)))
    check_growth(model.config, target_config, width, depth, noise, grow_kwargs.get("dus_overlap"), optimizer)
    new, maps, plan = grow_with_maps(model, target_config, **grow_kwargs)
    bad = find_non_finite(new.state_dict())
    if bad:
        raise ValueError(f"the grown weight {bad} holds NaN or inf (noise={noise:g} times the weights' std "
                         "overflowed?): nothing written; use a small noise such as 1e-3")
    extra = {}
    if optimizer == "grown":
        decay_embeddings = bool((ckpt.get("train_config") or {}).get("decay_embeddings", False))
        extra["optimizer"] = grow_optimizer_state(model, new, ckpt["optimizer"], maps, plan, width, decay_embeddings)
        bad = find_non_finite(extra["optimizer"]["state"])
        if bad:
            raise ValueError(f"the grown optimizer state {bad} holds NaN or inf: nothing written; grow with a fresh "
                             "optimizer, or from an earlier checkpoint")
    gap, gap_dtype, tolerance = measured_gap(model, new, grow_kwargs.get("seed", 0))
    record = dict(op="grow", width=width, depth=depth, seed=grow_kwargs.get("seed", 0), noise=noise,
                  optimizer=optimizer, dus_overlap=grow_kwargs.get("dus_overlap"), **{"from": asdict(model.config)},
                  to=asdict(new.config), gap=gap, gap_dtype=gap_dtype, gap_tolerance=tolerance,
                  unit_maps=maps.as_lists(), depth_plan=[{"from": s, "zero_out": z} for s, z in plan])
    out = make_checkpoint(new.state_dict(), new.config, ckpt["tokenizer"], Lineage.from_weights(ckpt).then(record),
                          run_flops=0, tokens=ckpt.get("tokens", 0), **extra)
    return out, gap


# -----------------------------------------------------------------------------
# the optimizer through growth (A): AdamW's state, by parameter name, through the same maps as the weights


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
    gradient = Scales(residual=maps.residual_scale, ffn_in=maps.ffn_div, ffn_out=None, q_in=maps.q_div, q_out=None,
                      kv_in=maps.kv_div, norm=maps.residual_scale ** 2 / gain)  # 1/(c K) per role
    return Scales(**{role: None if v is None else v ** power for role, v in vars(gradient).items()})


def moment_model(config, tensors):
    """A Llama on the meta device whose weights are `tensors` ({name: one AdamW moment}), for grow_into to read."""
    with torch.device("meta"):
        m = Llama(config)
    if config.tie_embeddings:
        tensors = {**tensors, "lm_head.weight": tensors["embed_tokens.weight"]}
    m.load_state_dict(tensors, assign=True)
    return m


def source_state(model, state, decay_embeddings):
    """The source's AdamW state keyed by name (an old integer-keyed one renamed, checkpoint.optimizer_state_by_name),
    checked: ValueError unless it has step and both moments for every parameter, in decay_groups' two groups."""
    state = optimizer_state_by_name(state, model, decay_embeddings)
    groups = decay_groups(model, decay_embeddings)
    entries = state.get("state", {})
    have = [sorted(map(str, g.get("params", []))) for g in state.get("param_groups", [])]
    if have != [sorted(g) for g in groups] or set(entries) != {n for g in groups for n in g} or any(
            set(e) != {"step", "exp_avg", "exp_avg_sq"} for e in entries.values()):
        raise ValueError(f"the optimizer state does not fit the model (groups of {[len(g) for g in have]} parameters, "
                         f"{len(entries)} entries, for {[len(g) for g in groups]}; decay_embeddings="
                         f"{decay_embeddings}): grow without the optimizer (fresh AdamW)")
    return state


def moment_source(name, plan, upcycled):
    """(the source parameter whose history parameter `name` of the grown model takes, fresh): a layer's parameters
    come from the layer the depth plan copies; fresh (no history): depth zero's new blocks (Z), and an upcycled
    router and its experts (U: which expert a token reaches, so each expert's gradient, depends on a router that
    was never trained)."""
    parts = name.split(".")
    if parts[0] != "layers":
        return name, False
    s, zero_out = plan[int(parts[1])]
    return ".".join(["layers", str(s)] + parts[2:]), zero_out or bool(upcycled and parts[2] == "block_sparse_moe")


def grow_optimizer_state(model, new, state, maps, plan, width, decay_embeddings=False):
    """AdamW's state dict for `new` (grown from `model` with maps and plan) from `model`'s, keyed by parameter name:
    moments through rule A, each parameter's step count from the parameter it copies; parameters with no history
    start fresh (step 0, zero moments), as a fresh AdamW would start them. The groups keep the source's settings,
    with the new model's names in decay_groups' order. Raises ValueError for a state that does not fit the model."""
    state = source_state(model, state, decay_embeddings)
    entries = state["state"]
    gain = math.sqrt(model.config.d_model / new.config.d_model)
    moments = {}
    for key, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
        old_moment = moment_model(model.config, {name: e[key] for name, e in entries.items()})
        new_moment = empty_like_config(new.config, old_moment.embed_tokens.weight.dtype, "cpu")
        grow_into(new_moment, old_moment, maps, plan, moment_scales(maps, gain, power), width, moments=True)
        moments[key] = dict(new_moment.named_parameters())
    upcycled = new.config.moe_experts and not model.config.moe_experts
    step = next(iter(entries.values()))["step"]
    new_groups = decay_groups(new, decay_embeddings)
    grown = {}
    for name in (n for g in new_groups for n in g):
        source, fresh = moment_source(name, plan, upcycled)
        moment = {key: moments[key][name].detach() for key in ("exp_avg", "exp_avg_sq")}
        if fresh:
            grown[name] = {"step": torch.zeros_like(step), **{key: torch.zeros_like(v) for key, v in moment.items()}}
        else:
            grown[name] = {"step": entries[source]["step"].clone(), **moment}
    # the source's settings (lr, betas, weight decay), the new model's parameters
    groups = [{**g, "params": list(names)} for g, names in zip(state["param_groups"], new_groups)]
    return {"state": grown, "param_groups": groups}
