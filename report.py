"""
report.py: what a finished model series gives (called by `python eval.py --report RUN_DIR` and
`python eval.py --fit RUN_DIR`; eval.py scores models, this file reads RUN_DIR/series.json).

- The paper's Table 1 as Markdown (series_report) and its Figure 2 as a PNG (plot_series): validation
  loss, perplexity and task accuracies of every size, from scratch and grown, and the FLOPs saved.
- Scaling laws fitted on the smaller members to predict the largest (fit_series): the loss law
  L(N) = E + A N^-alpha and Hu et al. 2024's task law log(-log PU) = log c - alpha log N (per task and per
  instance, on PassUntil results).

RUN_DIR/series.json (written by series.py):
  {"config": {...}, "tokenizer": {"name", "vocab_size"},
   "runs": [{"mode": "grow" | "scratch" | "fixed_data" | "branch", "stage": "S2", "index": 1, "params": X (non-embedding),
             "model_config": {...}, "tokens": T of this stage, "flops": cumulative 6XT over the stages that
             led to this model, "val_loss", "val_bpb" (or null), "ckpt": path, "metrics": path to metrics.jsonl}]}
RUN_DIR/eval.json (written by eval.py --report --tasks): {ckpt as in series.json: {task: {metric: {"value", "stderr", "n"}}}}
"""

import json
import math
import os

import numpy as np

from common import ConfigError


# -----------------------------------------------------------------------------
# 1. The series report: Table 1 and Figure 2 of the paper from RUN_DIR/series.json

METHODS = {"scratch": "From Scratch", "grow": "Grown", "fixed_data": "Grown w/ fixed data",
           "branch": "Continued from init_from"}  # branch: series.py's continuations of one checkpoint
# (column, task, metric, scale): accuracies (scale 100) in %; acc_norm where the harness has it (the paper's
# HellaSwag and OBQA figures match acc_norm, which for these tasks is the usual choice)
REPORT_COLUMNS = [("Valid PPL", "valid", "perplexity", 1), ("WikiText PPL", "wikitext", "word_perplexity", 1),
                  ("LAMBADA", "lambada", "acc", 100), ("ARC-e", "arc_easy", "acc_norm", 100),
                  ("ARC-c", "arc_challenge", "acc_norm", 100), ("WinoGrande", "winogrande", "acc", 100),
                  ("PIQA", "piqa", "acc_norm", 100), ("OBQA", "openbookqa", "acc_norm", 100),
                  ("HellaSwag", "hellaswag", "acc_norm", 100)]


def load_series(run_dir):
    path = os.path.join(run_dir, "series.json")
    if not os.path.exists(path):
        raise ConfigError(f"{run_dir} has no series.json: is it the RUN_DIR of a finished series?")
    with open(path) as f:
        return json.load(f)


def load_eval(run_dir):
    path = os.path.join(run_dir, "eval.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def series_chains(runs):
    """The two ways of building the series, each a list of runs by stage index: "scratch" (every size
    trained alone) and "grow" (the staged chain). The chain's first stage is itself trained from
    scratch, so one run can be in both: series.py lists it once, as mode "grow"; a series that lists it
    as "scratch" has its grown chain start from that run."""
    scratch = {r["index"]: r for r in runs if r["mode"] == "scratch"}
    grow = {r["index"]: r for r in runs if r["mode"] == "grow"}
    if grow:
        first = min(grow)
        grow.update({i: r for i, r in scratch.items() if i < first})
        scratch.setdefault(first, grow[first])
    return {"scratch": [scratch[i] for i in sorted(scratch)], "grow": [grow[i] for i in sorted(grow)]}


def method(r, chains):
    """A row's label; the grown chain's first run is trained from scratch (the paper's 1B row)."""
    if r["mode"] == "grow" and r is chains["grow"][0]:
        return "From Scratch (grown chain's start)" + ("" if r.get("finished", True) else " (mid-schedule)")
    return METHODS[r["mode"]] + ("" if r.get("finished", True) else " (mid-schedule)")


def human(x):
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def number(x):
    return f"{x:.2f}" if abs(x) < 1e4 else f"{x:.3g}"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def series_report(run_dir, task_results=None):
    """Markdown: Table 1 (a row group per size: From Scratch, Grown, Grown w/ fixed data) and a summary of
    the FLOPs saved and of grown vs scratch validation loss. task_results ({ckpt: {task: metrics}}, as
    RUN_DIR/eval.json) adds the task columns."""
    series = load_series(run_dir)
    task_results = load_eval(run_dir) if task_results is None else task_results
    runs = sorted(series["runs"], key=lambda r: (r["index"], list(METHODS).index(r["mode"])))
    has_bpb = any(r.get("val_bpb") is not None for r in runs)
    cols = [c for c in REPORT_COLUMNS if any(c[1] in task_results.get(r["ckpt"], {}) for r in runs)]
    header = ["Size", "Method", "Params", "FLOPs", "Val loss", "PPL"] + (["BPB"] if has_bpb else []) + [c[0] for c in cols]
    chains = series_chains(runs)
    rows, last_stage = [], None
    for r in runs:
        size = f"{r['stage']}" if r["stage"] != last_stage else ""
        last_stage = r["stage"]
        loss = r.get("val_loss")
        row = [size, method(r, chains), human(r["params"]), f"{r['flops']:.3g}",
               "-" if loss is None else f"{loss:.4f}", "-" if loss is None else f"{math.exp(loss):.2f}"]
        if has_bpb:
            row.append(f"{r['val_bpb']:.4f}" if r.get("val_bpb") is not None else "-")
        for _, task, metric, scale in cols:
            v = task_results.get(r["ckpt"], {}).get(task, {}).get(metric)
            row.append("-" if not v else f"{100 * v['value']:.1f}" if scale == 100 else number(v["value"]))
        rows.append(row)
    tok = series.get("tokenizer", {})
    out = [f"# Series report: {run_dir}", "",
           f"Tokenizer {tok.get('name', '?')} (vocab {tok.get('vocab_size', '?')}). Params: non-embedding (a mixture of "
           "experts: active per token). FLOPs: 6·X·T, "
           "cumulative over the stages that led to the model (a scratch run's own). PPL = exp(val loss). "
           "Task accuracies in % (acc_norm for ARC, PIQA, OBQA, HellaSwag; acc for LAMBADA, WinoGrande).", "",
           markdown_table(header, rows), ""]
    grown, scratch = chains["grow"], chains["scratch"]
    schedule = series.get("config", {}).get("grow_schedule")
    if grown and schedule:  # series.py's: which schedule made the grown members, and whether each is finished
        unfinished = [r["stage"] for r in grown if not r.get("finished", True)]
        out.append(f"Grown members made with grow_schedule '{schedule}'" + (
            f"; {', '.join(unfinished)} end mid-schedule (not finished models): not compared below." if unfinished else
            ": every member finished (its schedule ends at min_lr)."))
    if len(grown) > 1 and len(scratch) == len(grown):  # every size trained alone too (not a grow-only series)
        # series_flops: with wsd's cooldown branches, which no later member descends from
        g, s = grown[-1].get("series_flops") or grown[-1]["flops"], sum(r["flops"] for r in scratch)
        out.append(f"Series cost: grown {g:.3g} FLOPs (the whole grown series: the largest grown model's cumulative FLOPs"
                   f"{', and the cooldown branches of the others' if g != grown[-1]['flops'] else ''}) "
                   f"vs {s:.3g} FLOPs for training each size from scratch ({', '.join(r['stage'] for r in scratch)}): "
                   f"{100 * (1 - g / s):.1f}% saved.")
    for r in runs:
        base = [x for x in scratch if x["index"] == r["index"] and x is not r]
        if not r.get("finished", True):
            continue  # a member in the middle of its schedule is not a finished model: no verdict on it
        if r["mode"] != "scratch" and base and r.get("val_loss") is not None and base[0].get("val_loss") is not None:
            ok = r["val_loss"] <= base[0]["val_loss"]
            out.append(f"- {r['stage']}: {METHODS[r['mode']]} val loss {r['val_loss']:.4f} {'<=' if ok else '>'} "
                       f"From Scratch {base[0]['val_loss']:.4f}: {'yes' if ok else 'no'}")
    return "\n".join(out) + "\n"


def read_curve(path):
    """(flops, val_loss) points of a metrics.jsonl; a validation line without "flops" takes the last
    training line's. Runs that logged no validation fall back to the training loss."""
    val, train, flops = [], [], None
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            m = json.loads(line)
            flops = m.get("flops", flops)
            if flops is None:
                continue
            if m.get("val_loss") is not None:
                val.append((flops, m["val_loss"]))
            elif m.get("loss") is not None:
                train.append((flops, m["loss"]))
    return (val, True) if val else (train, False)


def plot_series(run_dir, out_png):
    """Figure 2: validation loss against cumulative FLOPs (log x), one line per run: grown runs solid in
    reds (their FLOPs start where the model they grew from stopped, so the chain reads left to right),
    fixed-data runs dotted, scratch runs dashed in blues; a branch series' runs in greens, from the init_from
    run's curve (grey) when its metrics.jsonl is at hand."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend needed

    series = load_series(run_dir)
    runs = sorted(series["runs"], key=lambda r: r["index"])
    curves = {id(r): read_curve(os.path.join(run_dir, r["metrics"])) for r in runs}
    chain = series_chains(runs)["grow"]
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    style = {"scratch": ("Blues", "--"), "grow": ("Reds", "-"), "fixed_data": ("Oranges", ":"), "branch": ("Greens", "-")}
    init = series["config"].get("init_from")
    parent = os.path.join(os.path.dirname(init), "metrics.jsonl") if init else ""
    if os.path.exists(parent) and read_curve(parent)[0]:  # branches: the run they all continue, in grey
        x, y = zip(*read_curve(parent)[0])
        ax.plot(x, y, color="0.5", label=f"{os.path.basename(os.path.dirname(init))} (init_from)")
    for mode, (cmap, ls) in style.items():
        chosen = [r for r in runs if r["mode"] == mode]
        colors = colormaps[cmap](np.linspace(0.5, 0.95, max(len(chosen), 1)))
        for r, color in zip(chosen, colors):
            points, is_val = curves[id(r)]
            if not points:
                continue
            x, y = zip(*points)
            ax.plot(x, y, ls=ls, color=color, marker="o" if len(x) < 30 else None, ms=3,
                    label=f"{r['stage']} {METHODS[mode]}" + ("" if is_val else " (train loss)"))
            parents = [p for p in chain if p["index"] < r["index"] and curves[id(p)][0]]
            if mode != "scratch" and parents:  # a thin link from the model it was grown from: the chain
                px, py = curves[id(parents[-1])][0][-1]
                ax.plot([px, x[0]], [py, y[0]], ls=ls, color=color, lw=0.8, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (cumulative over stages)")
    ax.set_ylabel("validation loss")
    ax.set_title("Continuations of one checkpoint at equal FLOPs" if any(r["mode"] == "branch" for r in runs)
                 else "Loss against compute: grown (solid) vs from scratch (dashed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


# -----------------------------------------------------------------------------
# 2. Scaling laws: predict the largest member of a series from the smaller ones


def fit_task_law(N, pu):
    """Seed 003's task scaling law log(-log PU) = log c - alpha log N, by least squares in log space.
    Needs 0 < PU < 1 and at least two sizes. Returns (c, alpha)."""
    N, pu = np.asarray(N, dtype=np.float64), np.asarray(pu, dtype=np.float64)
    if len(N) < 2 or not ((pu > 0) & (pu < 1)).all():
        raise ConfigError("the task law needs >= 2 sizes with 0 < PU < 1")
    slope, intercept = np.polyfit(np.log(N), np.log(-np.log(pu)), 1)
    return math.exp(intercept), -slope


def task_law(N, c, alpha):
    return np.exp(-c * np.asarray(N, dtype=np.float64) ** -alpha)


def fit_loss_law(N, L, alphas=np.geomspace(1e-3, 4.0, 400)):
    """L(N) = E + A N^-alpha. For a fixed alpha the law is linear in (E, A): closed-form least squares.
    Scan alpha on a log grid, then refine the best by golden-section search between its neighbours.
    N is scaled by its smallest value inside (so N^-alpha stays near 1); A is returned unscaled.
    With fewer than 3 points E is fixed at 0 (a pure power law, which 2 points determine). E is kept
    >= 0: the irreducible loss cannot be negative."""
    N, L = np.asarray(N, dtype=np.float64), np.asarray(L, dtype=np.float64)
    n0, free_E = N.min(), len(N) >= 3

    def solve(alpha):
        X = np.stack([np.ones_like(N), (N / n0) ** -alpha], 1) if free_E else ((N / n0) ** -alpha)[:, None]
        coef = np.linalg.lstsq(X, L, rcond=None)[0]
        if free_E and coef[0] < 0:
            # a loss has a floor E >= 0; the unconstrained optimum below it (3 points fit any law exactly,
            # e.g. E = -692 with alpha = 0.001) says nothing about larger N: the bounded optimum is E = 0
            A = np.linalg.lstsq(X[:, 1:], L, rcond=None)[0][0]
            coef = np.array([0.0, A])
        return float(((X @ coef - L) ** 2).sum()), coef

    sse = [solve(a)[0] for a in alphas]
    i = int(np.argmin(sse))
    lo, hi = math.log(alphas[max(i - 1, 0)]), math.log(alphas[min(i + 1, len(alphas) - 1)])
    g = (math.sqrt(5) - 1) / 2
    for _ in range(100):  # golden section on log alpha
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if solve(math.exp(a))[0] < solve(math.exp(b))[0]:
            hi = b
        else:
            lo = a
    alpha = math.exp((lo + hi) / 2)
    coef = solve(alpha)[1]
    E, A = (coef[0], coef[1]) if free_E else (0.0, coef[0])
    return float(E), float(A * n0 ** alpha), alpha


def loss_law(N, E, A, alpha):
    return E + A * np.asarray(N, dtype=np.float64) ** -alpha


def fit_series(run_dir):
    """Text: for each chain with >= 3 members, the loss law (and the task law for PassUntil tasks in
    RUN_DIR/eval.json) fitted on all but the largest member, and the error predicting the largest."""
    series, results = load_series(run_dir), load_eval(run_dir)
    lines = []
    for mode, chain in series_chains(series["runs"]).items():
        if len(chain) < 3:
            lines.append(f"{mode}: {len(chain)} members; fitting needs at least 3 (2 to fit, 1 to predict)")
            continue
        fit, last = chain[:-1], chain[-1]
        N = [r["params"] for r in fit]
        E, A, alpha = fit_loss_law(N, [r["val_loss"] for r in fit])
        pred = float(loss_law(last["params"], E, A, alpha))
        lines.append(f"{mode}: loss law L(N) = E + A N^-alpha on {', '.join(r['stage'] for r in fit)}: E={E:.4g} A={A:.4g} "
                     f"alpha={alpha:.4g}{' (E fixed at 0: 2 points)' if len(fit) < 3 else ''}")
        lines.append(f"  {last['stage']} (N={last['params']:.3g}): predicted {pred:.4f}, actual {last['val_loss']:.4f}, "
                     f"error {pred - last['val_loss']:+.4f} ({100 * (pred / last['val_loss'] - 1):+.2f}%)")
        for task in sorted({t for r in chain for t, v in results.get(r["ckpt"], {}).items() if "instances" in v}):
            if not all(task in results.get(r["ckpt"], {}) for r in chain):
                continue
            pu = np.array([[x["estimate"] for x in results[r["ckpt"]][task]["instances"]] for r in chain])  # (runs, docs)
            actual, means = pu[-1].mean(), pu[:-1].mean(axis=1)
            try:
                c, a = fit_task_law(N, means)
                task_pred = f"{float(task_law(last['params'], c, a)):.4g} (c={c:.4g}, alpha={a:.4g})"
            except ConfigError as e:
                task_pred = f"not fitted ({e})"
            preds = []
            for i in range(pu.shape[1]):  # instance level: one law per document
                ok = (pu[:-1, i] > 0) & (pu[:-1, i] < 1)
                if ok.sum() >= 2:
                    preds.append(float(task_law(last["params"], *fit_task_law(np.array(N)[ok], pu[:-1, i][ok]))))
                else:  # fewer than two usable sizes: keep the latest value seen
                    preds.append(float(pu[-2, i]))
            lines.append(f"  {task} PU at {last['stage']}: actual {actual:.4g}; task-level law {task_pred}; "
                         f"instance-level law {np.mean(preds):.4g}")
    return "\n".join(lines)
