"""
grow_cli.py: grow.py's command line. Grow a checkpoint file, or show growth on a model small enough to read every
map (grow.py's rules, one worked example).

    python grow_cli.py out/cpu-1.pt --to cpu-2 --width fpi --depth zero --out out/cpu-2-init.pt
    python grow_cli.py out/cpu-4.pt --to cpu-4,moe_experts=8,moe_top_k=2 --out out/cpu-4-8x.pt   # upcycle (U)
    python grow_cli.py out/cpu-1/final.pt --to cpu-2 --optimizer grown --out g.pt  # AdamW's state too (A), for
    python train.py --init_from=g.pt --init_optimizer ...                          # a run that continues it

--explain: a random float64 Llama of width 4, FFN 6, 2 heads and 3 layers grown to width 6, FFN 9, 3 heads and 5
layers. Prints every new -> old unit map with its copy counts and scales (R1-R3, H1, H2), the depth plan (Z), the
measured function gap, and draws the maps to a figure (docs/growth_explain.png). Needs no checkpoint.

    python grow_cli.py --explain                                # fpi + zero: function preserving
    python grow_cli.py --explain --width aki --depth stack      # not function preserving, and said so
    python grow_cli.py --explain --noise 1e-3 --explain_png /tmp/n.png
"""

import argparse
import math
import os
import re
from dataclasses import asdict, fields, replace

import matplotlib.pyplot as plt
import torch
from matplotlib.lines import Line2D

from checkpoint import CheckpointError, checkpoint_config, load_checkpoint, save_checkpoint
from common import cli_errors
from grow import (DEPTHS, OPTIMIZERS, WIDTHS, copy_counts, function_gap, grow_checkpoint, grow_with_maps,
                  is_function_preserving)
from model import Llama, ModelConfig, config_from_shape

plt.switch_backend("Agg")  # the figure goes to a file, never to a window

COLOR = {1: "0.55", 2: "tab:blue", 3: "tab:orange", 4: "tab:red"}  # a unit's copy count k in the figure


# -----------------------------------------------------------------------------
# --explain: a worked example small enough to read every map, printed, then drawn


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


def draw_width_panel(ax, name, rule, g, n_old, scale):
    """One unit map: old units left, new units right, a line from every new unit to the old unit it copies,
    colored by k, the scale at the new end."""
    k = copy_counts(g, n_old).tolist()
    y_old = [(n_old - 1) / 2 - j for j in range(n_old)]  # index 0 at the top
    y_new = [(len(g) - 1) / 2 - i for i in range(len(g))]
    for i, j in enumerate(g.tolist()):
        ax.plot([0, 1], [y_old[j], y_new[i]], color=COLOR.get(k[i], "k"), lw=2.5, zorder=1)
        ax.text(1.16, y_new[i], scale(k[i]), va="center", fontsize=12, color=COLOR.get(k[i], "k"))
    ax.scatter([0] * n_old, y_old, s=420, c="white", edgecolors="k", zorder=2)
    ax.scatter([1] * len(g), y_new, s=420, c=[COLOR.get(x, "k") for x in k], edgecolors="k", zorder=2)
    for j, y in enumerate(y_old):
        ax.text(0, y, str(j), ha="center", va="center", fontsize=10, zorder=3)
    for i, y in enumerate(y_new):
        ax.text(1, y, str(i), ha="center", va="center", fontsize=10, color="white", zorder=3)
    ax.set_title(f"{name}\n{rule}", fontsize=12)


def draw_depth_panel(ax, src, cfg, plan):
    """The depth plan: old layers left, new layers right, bottom to top; a new zero block (Z) hatched."""
    y_old = [s - (src.n_layers - 1) / 2 for s in range(src.n_layers)]  # layer 0 at the bottom
    y_new = [t - (cfg.n_layers - 1) / 2 for t in range(cfg.n_layers)]
    for t, (s, z) in enumerate(plan):
        ax.plot([0.2, 0.8], [y_old[s], y_new[t]], color="tab:green" if z else "0.55", lw=2.5, zorder=1)
        ax.add_patch(plt.Rectangle((0.8, y_new[t] - 0.3), 0.4, 0.6, facecolor="white" if z else "0.85",
                                   edgecolor="tab:green" if z else "k", hatch="//" if z else None, lw=1.5))
        ax.text(1.0, y_new[t], str(t), ha="center", va="center", fontsize=11,
                bbox=dict(facecolor="white", edgecolor="none", pad=1) if z else None)
        ax.text(1.27, y_new[t], f"copy of {s}" + ("\no_proj = down_proj = 0" if z else ""), va="center",
                fontsize=10, color="tab:green" if z else "k")
    for s, y in enumerate(y_old):
        ax.add_patch(plt.Rectangle((-0.2, y - 0.3), 0.4, 0.6, facecolor="0.85", edgecolor="k", lw=1.5))
        ax.text(0, y, str(s), ha="center", va="center", fontsize=11)
    depth_rule = "hatched: new block that adds 0 (Z)" if any(z for _, z in plan) else "new layers copy old ones"
    ax.set_title(f"layers {src.n_layers} → {cfg.n_layers} (bottom to top)\n{depth_rule}", fontsize=12)


def draw_explain(src, cfg, maps, plan, title, path):
    """The maps of the worked example as one figure: three width panels (residual dims, FFN neurons, query
    heads) and the depth plan."""
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
    for ax, panel in zip(axes, width_panels):
        draw_width_panel(ax, *panel)
    ratio = f"{src.d_model}/{cfg.d_model}"
    axes[0].text(0.5, -y_max + 0.2, f"RMSNorm (R2): gains × √({ratio}),\neps × {ratio}", ha="center", va="bottom",
                 fontsize=11)
    if torch.equal(maps.kv_heads, maps.q_heads):
        axes[2].text(0.5, -y_max + 0.2, "KV heads: the same map\n(k/v rows copied, never divided)", ha="center",
                     va="bottom", fontsize=11)
    draw_depth_panel(axes[3], src, cfg, plan)
    for ax in axes:
        ax.set_xlim(-0.45, 1.9)
        ax.set_ylim(-y_max, y_max)
        ax.text(0, y_max - 0.1, "old", ha="center", va="top", fontsize=12, weight="bold")
        ax.text(1, y_max - 0.1, "new", ha="center", va="top", fontsize=12, weight="bold")
        ax.axis("off")
    ks = sorted(set(copy_counts(maps.residual, src.d_model).tolist() + copy_counts(maps.ffn, src.ffn_dim).tolist()
                    + copy_counts(maps.q_heads, src.n_heads).tolist()))
    handles = [Line2D([], [], color=COLOR.get(k, "k"), lw=3, label=f"k = {k}: the old unit has {k} "
                      + ("copy" if k == 1 else "copies")) for k in ks]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=12, frameon=False)
    fig.suptitle(title, fontsize=14)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# growing a checkpoint file: the target, --out, the counts printed


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
    """--to: a shape name (budget.SHAPES), or field=value overrides of the source config, or both
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


def main(argv=None):
    p = argparse.ArgumentParser(description="Grow a nanogrow checkpoint (bert2BERT width, zero/stack/DUS depth), "
                                "or --explain: a worked example, printed and drawn.")
    p.add_argument("ckpt", nargs="?", help="the checkpoint to grow (not with --explain)")
    p.add_argument("--to", help="a shape name (e.g. cpu-2, paper-2B) or d_model=..,n_layers=..,... or both "
                   "(cpu-4,moe_experts=8,moe_top_k=2 upcycles into a mixture of experts); "
                   "booleans are true/false, and norm_eps follows from the source")
    p.add_argument("--width", default="fpi", choices=WIDTHS)
    p.add_argument("--depth", default="zero", choices=DEPTHS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=None, help="relative std of the zero-sum symmetry-breaking noise, "
                   "in [0, 1] (default 1e-3; 0 with --explain; series.py grows with 0.3, the best of "
                   "docs/ablation.md)")
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
        with cli_errors(ValueError, OSError):
            explain(args.width, args.depth, args.seed, 0.0 if args.noise is None else args.noise, args.explain_png)
        return
    if not (args.ckpt and args.to and args.out):
        p.error("give a checkpoint, --to and --out (or --explain for a worked example)")
    with cli_errors(ValueError, OSError):
        if not os.path.isfile(args.ckpt):  # the input first; then --out, before the (long) load and growth
            raise CheckpointError(f"no checkpoint at {args.ckpt}")
        check_out(args.out, args.overwrite)
        ckpt = load_checkpoint(args.ckpt)
        old = checkpoint_config(ckpt)
        target = parse_target(args.to, old)
        new_ckpt, gap = grow_checkpoint(ckpt, target, width=args.width, depth=args.depth, seed=args.seed,
                                        noise=1e-3 if args.noise is None else args.noise,
                                        dus_overlap=args.dus_overlap, optimizer=args.optimizer)
        del ckpt  # the source's tensors: only the grown model is held while writing
        tolerance = new_ckpt["history"][-1]["gap_tolerance"]
        if gap > tolerance and is_function_preserving(args.width, args.depth, old.n_layers, target.n_layers):
            # an error (exit 2, nothing written), not a warning: the next run would start from another function than
            # the one trained, while a warning scrolls past and a script (grow_cli.py ... && train.py --init_from=...)
            # goes on; with noise <= grow.NOISE_MAX this is a bug or a source grow.py's measurements did not cover
            raise ValueError(f"width={args.width} depth={args.depth} preserves the function, but the grown logits "
                             f"differ from the source's by {gap:.3e}, above the float tolerance {tolerance:.1e}: "
                             "nothing written; try --noise 0, and report the source's shape if the gap stays")
        write_checkpoint(new_ckpt, args.out)
    new = checkpoint_config(new_ckpt)
    for label, c in (("source", old), ("grown", new)):
        non_embedding, total, active = param_counts(c)
        moe = f" experts={c.moe_experts} top_k={c.moe_top_k}" if c.moe_experts else ""
        print(f"{label:<7} d_model={c.d_model} ffn_dim={c.ffn_dim} n_layers={c.n_layers} "
              f"heads={c.n_heads}/{c.n_kv_heads}{moe}: non-embedding {non_embedding:,} (active per token {active:,}) "
              f"total {total:,} parameters")
    gap_dtype = new_ckpt["history"][-1]["gap_dtype"]
    print(f"function gap: max |logit difference| = {gap:.3e} ({gap_dtype}, 2 random sequences)")
    if not is_function_preserving(args.width, args.depth, old.n_layers, new.n_layers):
        print(f"width={args.width} depth={args.depth} is not function preserving: a nonzero gap is expected")
    print(f"norm_eps {old.norm_eps:.4g} -> {new.norm_eps:.4g} (scaled by d/D); wrote {args.out}")


if __name__ == "__main__":
    main()
