"""
ablate.py: which growth recipe makes the grown series cheapest? (nanogrow issue 14) The CPU demo's grown series
under variants of its growth settings, one changed at a time from a base, then combinations, at equal FLOPs.

    python experiments/ablate.py configs/ablate_cpu.py                        # the grid
    python experiments/ablate.py configs/ablate_cpu.py --resume               # after a kill: the cut run resumed
    python experiments/ablate.py configs/ablate_cpu.py --docs_dir=docs        # also docs/ablation.md and .png
    python experiments/ablate.py configs/ablate_cpu.py --resume --only=stack  # one variant (base done), as jobs > 1 runs it

The grid, each a series.py run in OUT/<name>:

    base      the base series config's recipe: the grown series, and every member trained alone from scratch
              (its scratch twin, the yardstick of every variant)
    VARIANT   the grown series alone, with the variant's SeriesConfig overrides (one setting changed)
    COMBO     the same, run after the variants (several settings together; kept apart only for the report's label)

Every grown series spends the same FLOPs: the largest member's scratch budget (series.py, section 2.2 of Yano
et al. 2025). What a variant buys is measured in two ways: each grown member's final validation loss against its
scratch twin, and the reach: the fraction of the largest scratch member's FLOPs at which the largest grown
member's validation loss first reaches the scratch member's final loss (the issue's goal: 70%).

Reach reads a curve whose learning rate has not decayed at that point yet; with budget_check = f the best entry's
largest stage is trained again (a series.py branch from its second-largest member) for a series total of f times
the scratch FLOPs on a schedule of its own, and its final loss set beside scratch's: the goal with a finished run.

A variant that only changes what happens at growth (GROWTH_KEYS) has the same stage 1 as base: it is shared, not
trained again (its files are hard links to base's). results.json holds every measurement, ablation.md the table,
ablation.png the figure.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules, one folder up
import report
import series
from checkpoint import claim_grid
from common import ConfigError, above, at_least, cli_errors, configure, fmt_time, require, type_ok, within
from reproduce import run_seconds

# SeriesConfig keys that act only when a stage is grown: stage 1 (trained from scratch) is the same run under any
# value of them, so a variant changing only these shares base's stage 1. Anything else (grow_schedule changes stage
# 1's schedule too; lr, batch, data...) trains its own.
GROWTH_KEYS = ("grow_width", "grow_depth", "grow_noise", "grow_optimizer", "grow_warmup_steps")
GRID_KEYS = ("out_dir", "series_mode", "resume", "overwrite", "tokens_per_param")  # set by the grid, not by a variant
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # a variant's name is a folder and an --only value
REACH_GOAL = 0.70  # issue 14: the largest grown member matches its scratch twin within 70% of the FLOPs


@dataclass
class AblationConfig:
    out_dir: str = "out/ablate"
    docs_dir: str = ""  # also write ablation.md and ablation.png here ("docs" for the committed copy)
    series: str = "configs/series_cpu.py"  # the base series: members, per-stage learning rates, batch, schedule
    tokens_per_param: float = field(default=5.0, metadata=above(0))  # every series' (replaces the base config's)
    variants: list = field(default_factory=list)  # [[name, {SeriesConfig key: value}], ...]; "base" is implicit
    combos: list = field(default_factory=list)  # the same, run after the variants (labeled as combinations)
    # variants run in this many processes at a time (after base), each on cores // jobs threads
    jobs: int = field(default=1, metadata=at_least(1, "an integer >= 1"))
    overrides: list = field(default_factory=list)  # extra --key=value for every series run (e.g. a tiny test grid)
    only: str = ""  # run just this variant or combo, on cores // jobs threads (base must be done): a parallel grid's process
    # the goal measured with a finished schedule: the best entry's largest stage again, shortened so that the series
    # spends this fraction of the largest scratch member's FLOPs, with its own full schedule (0: off)
    budget_check: float = field(default=0.0, metadata=within(0, 1, "in [0, 1] (0: off)"))
    resume: bool = False
    overwrite: bool = False

    def check(self):
        require(os.path.isfile(self.series), "series", self.series, "a series config file (e.g. configs/series_cpu.py)")


# -----------------------------------------------------------------------------
# the grid: base, the variants, the combos, each a SeriesConfig checked before anything runs


@dataclass
class Entry:
    name: str
    kind: str  # "base", "variant" or "combo"
    overrides: dict
    cfg: series.SeriesConfig
    first_stage: str  # stage 1's name: the folder a sharing variant links from base


def grid(cfg):
    """[Entry]: base first, then the variants and the combos in the configured order. Each override is a
    SeriesConfig field of the right type (else one ConfigError naming it and the known keys), and each series
    passes series.plan_series (ranges, shapes, growth operators), so a mistake fails before any training."""
    known = {f.name: f.type for f in fields(series.SeriesConfig)}
    base = configure(series.SeriesConfig, [cfg.series] + list(cfg.overrides))
    base = replace(base, tokens_per_param=cfg.tokens_per_param, resume=True, overwrite=False)
    entries = [Entry("base", "base", {}, replace(base, series_mode="grow+scratch", out_dir=os.path.join(cfg.out_dir, "base")), "")]
    for kind, listed in (("variant", cfg.variants), ("combo", cfg.combos)):
        for item in listed:
            ok = isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], dict)
            require(ok, f"{kind}s entry", item, "[name, {SeriesConfig key: value}]")
            name, overrides = item
            taken = [e.name for e in entries]
            require(NAME.fullmatch(name) and name not in taken, f"{kind} name", name,
                    f"letters, digits and _ . + - (it names a folder), and not one of {', '.join(taken)}")
            for key, value in overrides.items():
                if key not in known:
                    raise ConfigError(f"{kind} {name}: unknown key {key!r}; the keys are SeriesConfig's fields: {', '.join(sorted(known))}")
                require(key not in GRID_KEYS, f"{kind} {name} key", key, f"none of {', '.join(GRID_KEYS)}: the grid sets those")
                if not type_ok(value, known[key]):
                    raise ConfigError(f"{kind} {name}: {key} must be {getattr(known[key], '__name__', known[key])}, got {value!r}")
            values = {k: float(v) if known[k] is float else v for k, v in overrides.items()}
            entries.append(Entry(name, kind, dict(overrides),
                                 replace(base, series_mode="grow", out_dir=os.path.join(cfg.out_dir, name), **values), ""))
    sizes = None
    for e in entries:
        try:
            plan = series.plan_series(e.cfg)[0]
        except ConfigError as err:
            raise ConfigError(f"{e.name}: {err}") from None
        e.first_stage, sizes = plan[0].name, sizes or [s.params for s in plan]
        require([s.params for s in plan] == sizes, f"{e.kind} {e.name} stages", [s.name for s in plan],
                "base's members (the same sizes): each grown member is compared with base's scratch twin")
    return entries


def shares_stage1(overrides):
    """Whether a variant's stage 1 is base's: it changes nothing but what acts at growth."""
    return set(overrides) <= set(GROWTH_KEYS)


def link_stage1(base, entry):
    """Hard-link every file of base's stage-1 folder into the variant's (series.train_member keeps a finished stage
    under resume): one run on disk, no second training. Files already linked are kept; a file there that is not
    base's is refused, since it would be a stage 1 this variant trained itself."""
    src = os.path.join(base.cfg.out_dir, "grow", entry.first_stage)
    dst = os.path.join(entry.cfg.out_dir, "grow", entry.first_stage)
    if not os.path.exists(os.path.join(src, "final.pt")):
        raise ConfigError(f"{src}/final.pt is missing: base's stage 1 is not done; run the grid without --only first")
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if not os.path.isfile(s):
            continue
        if os.path.exists(d):
            if not os.path.samefile(s, d):
                raise ConfigError(f"{d} is not base's {name}: delete {entry.cfg.out_dir} and rerun with --resume to share base's stage 1")
            continue
        os.link(s, d)


def run_entry(base, entry, t0):
    """One series of the grid (resumable: finished stages are kept)."""
    print(f"=== [{fmt_time(time.time() - t0)}] {label(entry)} ===", flush=True)
    if entry.kind != "base" and shares_stage1(entry.overrides):
        link_stage1(base, entry)
    series.run_series(entry.cfg)


def label(entry):
    """A series' progress line: "variant NAME: its overrides"."""
    if entry.kind == "base":
        return f"base: {recipe(entry.cfg)}, series_mode {entry.cfg.series_mode} (the scratch twins too)"
    return f"{entry.kind} {entry.name}: " + ", ".join(f"{k}={v!r}" for k, v in entry.overrides.items())


def base_done(base):
    """Whether base's series.json holds every grown member and every scratch twin."""
    path = os.path.join(base.cfg.out_dir, "series.json")
    if not os.path.exists(path):
        return False
    have = {(r["mode"], r["index"]) for r in report.load_series(base.cfg.out_dir)["runs"]}
    n = len(base.cfg.stages)
    return all(("grow", i) in have for i in range(n)) and all(("scratch", i) in have for i in range(1, n))


def cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_parallel(cfg, entries, argv, t0):
    """The variants and combos in up to cfg.jobs processes at a time (`ablate.py ARGV --only=NAME`), each on
    cores // jobs threads and logging to OUT/NAME.log (appended to: a resumed variant keeps its history). After a
    failure no new one starts; the running ones finish (their work is kept for --resume), then the failure is one
    line naming the variant and its log."""
    threads = max(1, cores() // cfg.jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    pending, running, failed = list(entries), {}, []
    # a kill of the parent (SIGTERM) ends it through `finally`, which stops the children: none is left running
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        while running or (pending and not failed):
            while pending and not failed and len(running) < cfg.jobs:
                e = pending.pop(0)
                log_path = os.path.join(cfg.out_dir, e.name + ".log")
                print(f"=== [{fmt_time(time.time() - t0)}] {label(e)} (a process of {threads} threads, log {log_path}) ===",
                      flush=True)
                log = open(log_path, "a")  # a resumed variant's log goes on after the cut one's
                cmd = [sys.executable, os.path.abspath(__file__), *argv, f"--only={e.name}"]
                running[e.name] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log, log_path)
            time.sleep(0.5)
            for name, (proc, log, log_path) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                print(f"=== [{fmt_time(time.time() - t0)}] {name} {'done' if proc.returncode == 0 else 'FAILED'} ===", flush=True)
                if proc.returncode != 0:
                    failed.append((name, proc.returncode, log_path))
    finally:
        for proc, log, _ in running.values():  # the parent was stopped: stop its children too (they resume exactly)
            proc.terminate()
            proc.wait()
            log.close()
        signal.signal(signal.SIGTERM, previous)
    if failed:
        name, code, log_path = failed[0]
        with open(log_path, errors="replace") as f:
            last = ([line.strip() for line in f if line.strip()] or ["(empty log)"])[-1]
        raise ConfigError(f"variant {name} failed (exit code {code}): {last[:300]}; see {log_path}, fix it and rerun with --resume")


# -----------------------------------------------------------------------------
# the measurements


def reach(points, target, flops):
    """The FLOPs fraction (x / flops) at which a validation curve [(x, loss), ...] first reaches `target`, by linear
    interpolation between its points; None if it never does."""
    for k, (x, y) in enumerate(points):
        if y <= target:
            if k == 0:
                return x / flops
            x0, y0 = points[k - 1]
            return (x0 + (y0 - target) / (y0 - y) * (x - x0)) / flops
    return None


def measure(cfg, entries):
    """The results record: for every series of the grid, each grown member's final validation loss beside its
    scratch twin's (base's scratch run; stage 1's twin is base's stage 1, itself trained from scratch), whether
    every member is at or below its twin, the reach of the largest member, the FLOPs spent and the run seconds."""
    scratch = report.series_chains(report.load_series(entries[0].cfg.out_dir)["runs"])["scratch"]
    top = scratch[-1]
    out = {"scratch": [{k: r[k] for k in ("stage", "params", "val_loss", "flops")} for r in scratch],
           "scratch_metrics": os.path.join("base", top["metrics"]), "variants": []}
    for e in entries:
        grown = report.series_chains(report.load_series(e.cfg.out_dir)["runs"])["grow"]
        if len(grown) != len(scratch):
            raise ConfigError(f"{e.cfg.out_dir} holds {len(grown)} of {len(scratch)} grown members: rerun with --resume to finish it")
        members = [{"stage": g["stage"], "params": g["params"], "val_loss": g["val_loss"], "scratch_loss": s["val_loss"],
                    "rel": g["val_loss"] / s["val_loss"] - 1, "flops": g["flops"]} for g, s in zip(grown, scratch)]
        points, is_val = report.read_curve(os.path.join(e.cfg.out_dir, grown[-1]["metrics"]))
        out["variants"].append({
            "name": e.name, "kind": e.kind, "overrides": e.overrides, "shares_stage1": e.kind != "base" and shares_stage1(e.overrides),
            "members": members, "all_le_scratch": all(m["val_loss"] <= m["scratch_loss"] for m in members),
            "reach": reach(points, top["val_loss"], top["flops"]) if is_val else None,
            "flops_fraction": grown[-1]["flops"] / top["flops"], "run_seconds": run_seconds(e.cfg.out_dir),
            "metrics": os.path.join(e.name, grown[-1]["metrics"])})
    return out


def budget_check(cfg, entries, results):
    """Whether the best entry's largest member reaches the scratch member's final loss on cfg.budget_check of its
    FLOPs when trained for that budget (reach reads a curve whose learning rate has not decayed yet at that point,
    so it understates a shorter run). The largest stage runs again as a series.py branch from the entry's
    second-largest member: grown as in the entry, trained for what is left of budget_check x the scratch FLOPs,
    with a schedule of its own (the entry's re-warmup, then a cosine), in OUT/budget_NAME. Returns the record for
    results.json, or None."""
    b = best(results)
    if not cfg.budget_check or b is None:
        return None
    entry = next(e for e in entries if e.name == b["name"])
    runs = report.series_chains(report.load_series(entry.cfg.out_dir)["runs"])["grow"]
    top, before = results["scratch"][-1], runs[-2]
    left = cfg.budget_check * top["flops"] - before["flops"]
    require(left > 0, "budget_check", cfg.budget_check, f"above the FLOPs spent before the largest stage ({before['flops'] / top['flops']:.2f})")
    scfg = replace(entry.cfg, series_mode="branch", init_from=os.path.join(entry.cfg.out_dir, before["ckpt"]),
                   stages=[entry.cfg.stages[-1]], branch_flops=float(left), report=False,
                   out_dir=os.path.join(cfg.out_dir, f"budget_{entry.name}"))
    print(f"=== budget check: {entry.name}'s {runs[-1]['stage']} on {cfg.budget_check:.0%} of the scratch FLOPs ===", flush=True)
    series.run_series(scfg)
    final = report.load_series(scfg.out_dir)["runs"][-1]
    return {"name": entry.name, "fraction": cfg.budget_check, "flops": final["flops"], "val_loss": final["val_loss"],
            "scratch_loss": top["val_loss"], "reached": final["val_loss"] <= top["val_loss"]}


# -----------------------------------------------------------------------------
# the report: one table at equal FLOPs, one figure


def recipe(scfg):
    """The growth settings of a SeriesConfig, in words."""
    return ", ".join(f"{k}={getattr(scfg, k)!r}" for k in GROWTH_KEYS + ("grow_schedule",))


def changes(v):
    said = ", ".join(f"{k}={val!r}" for k, val in v["overrides"].items())
    return {"base": "the base recipe", "combo": f"combination: {said}"}.get(v["kind"], said)


def best(results):
    """The variant with the lowest reach among those with every member at or below scratch, or None."""
    ok = [v for v in results["variants"] if v["all_le_scratch"] and v["reach"] is not None]
    return min(ok, key=lambda v: v["reach"]) if ok else None


def write_report(cfg, results, out_dir):
    """ablation.md and ablation.png in out_dir."""
    vs, scratch = results["variants"], results["scratch"]
    top = scratch[-1]
    low, high = min(v["flops_fraction"] for v in vs), max(v["flops_fraction"] for v in vs)
    spread = f"{low:.3f}" if f"{low:.3f}" == f"{high:.3f}" else f"{low:.3f}-{high:.3f}"
    lines = ["# Growth-recipe ablation at CPU scale (issue 14)", "",
             f"Which growth recipe makes the grown series cheapest? The grown series of `{cfg.series}` "
             f"(members {', '.join(s['stage'] for s in scratch)}: {report.human(scratch[0]['params'])}-"
             f"{report.human(scratch[-1]['params'])} non-embedding parameters, {cfg.tokens_per_param:g} tokens per parameter) under variants of its growth settings, one changed at a time from the base, then combinations. "
             "Every number below comes from one run of", "",
             f"    {results['command']}", "",
             f"Base recipe: {results['base_recipe']}. "
             f"Every grown series spends {spread} of the FLOPs of the largest member trained "
             f"alone ({top['flops']:.3g}): the table is at equal FLOPs. Losses are final validation losses (nats per byte); in "
             "brackets, the difference to the scratch twin of the same size (base's scratch runs; the smallest member's twin "
             "is base's stage 1, trained from scratch). Variants that change only what happens at growth share base's stage 1. "
             f"Reach: the fraction of the largest scratch member's FLOPs at which the largest grown member's validation loss "
             f"first reaches that member's final loss ({top['val_loss']:.4f}), interpolated linearly between evaluations; the "
             f"issue's goal is {REACH_GOAL:.0%}.", "",
             "| variant | changes | " + " | ".join(s["stage"] for s in scratch) + " | reach | all ≤ scratch |",
             "|---|---|" + "---|" * len(scratch) + "---|---|"]
    for v in vs:
        cells = [f"{m['val_loss']:.4f} ({100 * m['rel']:+.1f}% vs scratch)" for m in v["members"]]
        lines.append(f"| {v['name']} | {changes(v)} | " + " | ".join(cells) + f" | {percent(v['reach'])} | "
                     f"{'yes' if v['all_le_scratch'] else 'no'} |")
    b = best(results)
    lines += ["", f"Best: {b['name']} ({changes(b)}): reach {percent(b['reach'])}, every member at or below scratch." if b else
              "Best: none (no variant has every member at or below scratch and reaches the scratch loss).", ""]
    check = results.get("budget_check")
    if check:
        lines += [f"Budget check: {check['name']}'s largest member trained again for a series total of "
                  f"{check['flops'] / top['flops']:.0%} of the scratch FLOPs ({check['flops']:.3g}), from its second-largest "
                  f"member, with a schedule of its own (the recipe's re-warmup, then a cosine to the end; series.py branch "
                  f"mode, `OUT/budget_{check['name']}`): final "
                  f"validation loss {check['val_loss']:.4f} against the scratch member's {check['scratch_loss']:.4f} "
                  f"({100 * (check['val_loss'] / check['scratch_loss'] - 1):+.1f}%): "
                  + ("**reached**" if check["reached"] else "**not reached**") + f" on {check['fraction']:.0%} of the FLOPs.", ""]
    lines += [
              "![validation loss of the largest member against FLOPs, and the reach of each variant](ablation.png)", ""]
    with open(os.path.join(out_dir, "ablation.md"), "w") as f:
        f.write("\n".join(lines))
    plot(cfg, results, os.path.join(out_dir, "ablation.png"))


def percent(x):
    return "not reached" if x is None else f"{100 * x:.0f}%"


def plot(cfg, results, path):
    """Left: validation loss of the largest member's stage against FLOPs (a fraction of the largest scratch
    member's) for every variant, with the scratch member's curve and final loss. Right: each variant's reach."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend needed

    vs, top = results["variants"], results["scratch"][-1]
    fig = Figure(figsize=(14, 6.5))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.5, 1]})
    # tab20 without its reds (base's colour): the dark shades first, then the light ones
    colors = [colormaps["tab20"].colors[i] for i in (0, 2, 4, 8, 10, 12, 14, 16, 18, 1, 3, 5, 9, 11, 13, 15, 17, 19)]
    starts, seen = [], []
    for i, v in enumerate(vs):
        points, _ = report.read_curve(os.path.join(cfg.out_dir, v["metrics"]))
        x, y = zip(*[(f / top["flops"], loss) for f, loss in points])
        starts.append(x[0])
        seen += y
        is_base = v["kind"] == "base"
        left.plot(x, y, color="tab:red" if is_base else colors[(i - 1) % len(colors)], lw=3.5 if is_base else 1.6,
                  ls="-" if v["kind"] != "combo" else "-.", label=v["name"], zorder=3 if is_base else 2)
    points, _ = report.read_curve(os.path.join(cfg.out_dir, results["scratch_metrics"]))
    x, y = zip(*[(f / top["flops"], loss) for f, loss in points])
    left.plot(x, y, color="black", ls="--", lw=1.8, label=f"{top['stage']} from scratch")
    left.axhline(top["val_loss"], color="black", ls=":", lw=1.2)
    x0 = min(starts)
    left.set_xlim(x0, max(1.0, max(v["flops_fraction"] for v in vs)) + 0.02 * (1 - x0))
    low, high = min(seen + [top["val_loss"]]), max(seen)
    left.set_ylim(low - 0.03 * (high - low), high + 0.03 * (high - low))
    left.set_xlabel("FLOPs (fraction of the largest member trained from scratch)", fontsize=12)
    left.set_ylabel("validation loss (nats per byte)", fontsize=12)
    left.set_title(f"The largest member's stage ({top['stage']})", fontsize=13)
    left.grid(alpha=0.3)
    left.legend(fontsize=9, ncol=2)

    names = [v["name"] for v in vs]
    for i, v in enumerate(vs):
        if v["reach"] is None:
            right.barh(i, 1.0, color="white", edgecolor="0.4", hatch="//")
            right.text(0.5, i, "not reached", va="center", ha="center", fontsize=11, bbox=dict(facecolor="white", edgecolor="none"))
        else:
            right.barh(i, v["reach"], color="tab:red" if v["kind"] == "base" else colors[(i - 1) % len(colors)])
            right.text(v["reach"] + 0.01, i, percent(v["reach"]), va="center", fontsize=10)
    right.axvline(REACH_GOAL, color="black", ls="--", lw=1.2)
    right.text(REACH_GOAL, -0.75, f" goal {REACH_GOAL:.0%}", fontsize=11, va="center")
    right.set_yticks(range(len(vs)), names, fontsize=11)
    right.set_ylim(len(vs) - 0.5, -1.2)  # base on top, as in the table
    right.set_xlim(0, 1.12)
    right.set_xlabel("reach: FLOPs fraction where the grown member\nfirst matches the scratch member's final loss", fontsize=12)
    right.set_title("Reach (lower is cheaper)", fontsize=13)
    right.grid(axis="x", alpha=0.3)
    for ax in (left, right):
        ax.tick_params(labelsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -----------------------------------------------------------------------------


def command(argv):
    """The command line that makes the report (without the flags that only say how to treat an old out_dir)."""
    kept = [a for a in argv if not a.startswith(("--resume", "--overwrite", "--only"))]
    return shlex.join(["python", "experiments/ablate.py"] + kept)


def main(argv):
    with cli_errors():
        cfg = configure(AblationConfig, argv)  # every field's range is declared beside it (common.check_config)
        entries = grid(cfg)
        base, rest = entries[0], entries[1:]
        if cfg.only:  # one variant, in a process of a parallel grid (or by hand); each series holds its own lock
            chosen = [e for e in rest if e.name == cfg.only]
            require(bool(chosen), "only", cfg.only, "a configured variant or combo: " + ", ".join(e.name for e in rest))
            torch.set_num_threads(max(1, cores() // cfg.jobs))
            if not base_done(base):
                raise ConfigError(f"base is not done in {base.cfg.out_dir}: run the grid without --only first")
            run_entry(base, chosen[0], time.time())
            return
        lock = claim_grid(cfg.out_dir, cfg.resume, cfg.overwrite)
        try:
            t0 = time.time()
            run_entry(base, base, t0)
            if cfg.jobs > 1 and rest:
                run_parallel(cfg, rest, argv, t0)
            for e in rest if cfg.jobs == 1 else []:
                run_entry(base, e, t0)
            results = {"config": asdict(cfg), "command": command(argv), "base_recipe": recipe(base.cfg), **measure(cfg, entries)}
            results["budget_check"] = budget_check(cfg, entries, results)
            results["seconds"] = time.time() - t0  # this invocation's wall time (a resumed grid's last part)
            with open(os.path.join(cfg.out_dir, "results.json.tmp"), "w") as f:
                json.dump(results, f, indent=1)
            os.replace(os.path.join(cfg.out_dir, "results.json.tmp"), os.path.join(cfg.out_dir, "results.json"))
            for out in [cfg.out_dir] + ([cfg.docs_dir] if cfg.docs_dir else []):
                os.makedirs(out, exist_ok=True)
                write_report(cfg, results, out)
            b = best(results)
            print(f"report: {os.path.join(cfg.docs_dir or cfg.out_dir, 'ablation.md')} ({fmt_time(results['seconds'])}); best: "
                  + (f"{b['name']}, reach {percent(b['reach'])}" if b else "none"))
        finally:
            lock.release()


if __name__ == "__main__":
    main(sys.argv[1:])
