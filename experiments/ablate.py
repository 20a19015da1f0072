"""
ablate.py: which growth recipe still pays after long training? A grown series under variants of its growth
settings, one changed at a time from a base, then combinations, at equal FLOPs, each over several seeds.

    python experiments/ablate.py configs/ablate_cpu.py --docs_dir=docs --jobs=2                 # the grid
    python experiments/ablate.py configs/ablate_cpu.py --docs_dir=docs --jobs=2 --resume        # after a kill
    python experiments/ablate.py configs/ablate_cpu.py --resume --only=stack_top --seeds=[7]    # one series, as jobs > 1 runs it

The grid, for every seed (it changes initialization, data order and growth noise), each a series.py run in
OUT/s<seed>/<name>:

    base      the base recipe: the grown series, and every member trained alone from scratch (its scratch twin,
              the yardstick of every variant of that seed)
    VARIANT   the grown series alone, with the variant's SeriesConfig overrides (one setting changed)
    COMBO     the same, run after the variants (several settings together; kept apart only for the report's label)

Every grown series spends the largest member's scratch FLOPs (series.py, section 2.2 of Yano et al. 2025), plus,
under grow_schedule "wsd", the cooldown branches that finish the smaller members. What a variant buys is measured
in three ways, each over the seeds (mean ± sd, and the paired grown − scratch difference with a 95% t interval,
experiments/reproduce.py's statistics):
  - each grown member's final validation loss against its scratch twin's;
  - reach: the fraction of the largest scratch member's FLOPs at which the largest grown member's validation curve
    (as trained: a wsd trunk at its stable rate, then its cooldown) first reaches the scratch member's final loss;
  - the budget check, the goal with a finished model: the largest stage trained again from the second-largest
    member (a series.py branch), for what is left of budget_check x the scratch FLOPs with a whole schedule of its
    own (the recipe's family: a wsd run that cools down over its last decay_frac, else the re-warmup and a cosine),
    its final loss against the scratch member's: reached (the interval below 0), not reached (above), inconclusive.

A variant that only changes what happens at growth (GROWTH_KEYS) has the same stage 1 as base of its seed: it is
shared, not trained again (its files are hard links to base's). results.json holds every measurement, ablation.md
the table, ablation.png the figure.
"""

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules, one folder up
import budget
import report
import series
from checkpoint import claim_grid, load_checkpoint
from common import ConfigError, above, at_least, cli_errors, configure, fmt_time, require, rule, type_ok, within
from reproduce import mean_sd, paired, run_seconds, verdict
from train import prepare_data

# SeriesConfig keys that act only when a stage is grown: stage 1 (trained from scratch) is the same run under any
# value of them, so a variant changing only these shares base's stage 1. Anything else (grow_schedule changes stage
# 1's schedule too; lr, batch, data...) trains its own.
GROWTH_KEYS = ("grow_width", "grow_depth", "grow_noise", "grow_optimizer", "grow_warmup_steps")
GRID_KEYS = ("out_dir", "series_mode", "resume", "overwrite", "tokens_per_param", "seed")  # set by the grid, not by a variant
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # a variant's name is a folder and an --only value
REACH_GOAL = 0.70  # the largest grown member, finished, matches its scratch twin within 70% of the FLOPs
BUDGET_WORDS = {"held": "reached", "not held": "not reached", "inconclusive": "inconclusive"}


@dataclass
class AblationConfig:
    out_dir: str = "out/ablate"
    docs_dir: str = ""  # also write ablation.md and ablation.png here ("docs" for the committed copy)
    series: str = "configs/series_cpu.py"  # the base series: batch, schedule, evaluation, and its members unless stages
    stages: list = field(default_factory=list)  # the members, smallest first, replacing the series config's ([]: its own)
    tokens_per_param: float = field(default=40.0, metadata=above(0))  # every series' (replaces the base config's)
    # every series runs once per seed; 3 or more give an interval
    seeds: list = field(default_factory=lambda: [1337, 7, 42], metadata=rule(
        lambda v: len(v) >= 1 and len(set(v)) == len(v) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in v),
        "a list of distinct integers >= 0 (3 or more for an interval)"))
    variants: list = field(default_factory=list)  # [[name, {SeriesConfig key: value}], ...]; "base" is implicit
    combos: list = field(default_factory=list)  # the same, run after the variants (labeled as combinations)
    # series run in this many processes at a time, each on cores // jobs threads
    jobs: int = field(default=1, metadata=at_least(1, "an integer >= 1"))
    overrides: list = field(default_factory=list)  # --key=value for every series run: the base recipe, a tiny test grid
    only: str = ""  # run just this series (base, a variant or a combo) for each of seeds: a parallel grid's process
    # the goal with a finished schedule: every entry's largest stage again, so that its series spends this fraction
    # of the largest scratch member's FLOPs, with a whole schedule of its own (0: off)
    budget_check: float = field(default=0.7, metadata=within(0, 1, "in [0, 1] (0: off)"))
    resume: bool = False
    overwrite: bool = False

    def check(self):
        require(os.path.isfile(self.series), "series", self.series, "a series config file (e.g. configs/series_cpu.py)")


# -----------------------------------------------------------------------------
# the grid: for every seed base, the variants, the combos, each a SeriesConfig checked before anything runs


@dataclass
class Entry:
    name: str
    kind: str  # "base", "variant" or "combo"
    overrides: dict
    seed: int
    cfg: series.SeriesConfig
    first_stage: str  # stage 1's name: the folder a sharing variant links from base

    @property
    def unit(self):
        return f"s{self.seed}/{self.name}"


def grid(cfg):
    """[Entry]: every seed's base first, then each seed's variants and combos in the configured order. Each override
    is a SeriesConfig field of the right type (else one ConfigError naming it and the known keys), and each series
    passes series.plan_series (ranges, shapes, growth operators), so a mistake fails before any training."""
    known = {f.name: f.type for f in fields(series.SeriesConfig)}
    base = configure(series.SeriesConfig, [cfg.series] + list(cfg.overrides))
    base = replace(base, tokens_per_param=cfg.tokens_per_param, resume=True, overwrite=False,
                   **({"stages": [dict(s) for s in cfg.stages]} if cfg.stages else {}))
    listed = []
    for kind, items in (("variant", cfg.variants), ("combo", cfg.combos)):
        for item in items:
            ok = isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], dict)
            require(ok, f"{kind}s entry", item, "[name, {SeriesConfig key: value}]")
            name, overrides = item
            taken = ["base"] + [n for _, n, _ in listed]
            require(NAME.fullmatch(name) and name not in taken, f"{kind} name", name,
                    f"letters, digits and _ . + - (it names a folder), and not one of {', '.join(taken)}")
            for key, value in overrides.items():
                if key not in known:
                    raise ConfigError(f"{kind} {name}: unknown key {key!r}; the keys are SeriesConfig's fields: {', '.join(sorted(known))}")
                require(key not in GRID_KEYS, f"{kind} {name} key", key, f"none of {', '.join(GRID_KEYS)}: the grid sets those")
                if not type_ok(value, known[key]):
                    raise ConfigError(f"{kind} {name}: {key} must be {getattr(known[key], '__name__', known[key])}, got {value!r}")
            listed.append((kind, name, dict(overrides)))
    folder = lambda seed, name: os.path.join(cfg.out_dir, f"s{seed}", name)
    entries = [Entry("base", "base", {}, seed, replace(base, series_mode="grow+scratch", seed=seed, out_dir=folder(seed, "base")), "")
               for seed in cfg.seeds]
    for seed in cfg.seeds:
        for kind, name, overrides in listed:
            values = {k: float(v) if known[k] is float else v for k, v in overrides.items()}
            entries.append(Entry(name, kind, overrides, seed,
                                 replace(base, series_mode="grow", seed=seed, out_dir=folder(seed, name), **values), ""))
    sizes, planned = None, {}
    for e in entries:
        if e.name not in planned:  # the plan does not depend on the seed
            try:
                planned[e.name] = series.plan_series(e.cfg)[0]
            except ConfigError as err:
                raise ConfigError(f"{e.name}: {err}") from None
        plan = planned[e.name]
        e.first_stage, sizes = plan[0].name, sizes or [s.params for s in plan]
        require([s.params for s in plan] == sizes, f"{e.kind} {e.name} stages", [s.name for s in plan],
                "base's members (the same sizes): each grown member is compared with base's scratch twin")
        require(len(plan) >= 2, f"{e.kind} {e.name} stages", [s.name for s in plan], "two members or more: a series grows")
    return entries


def shares_stage1(overrides):
    """Whether a variant's stage 1 is base's: it changes nothing but what acts at growth."""
    return set(overrides) <= set(GROWTH_KEYS)


def base_of(entries, entry):
    return next(e for e in entries if e.kind == "base" and e.seed == entry.seed)


def link_stage1(base, entry):
    """Hard-link every file of base's stage-1 folder into the variant's (series.train_member keeps a finished stage
    under resume): one run on disk, no second training. Files already linked are kept; a file there that is not
    base's is refused, since it would be a stage 1 this variant trained itself."""
    src = os.path.join(base.cfg.out_dir, "grow", entry.first_stage)
    dst = os.path.join(entry.cfg.out_dir, "grow", entry.first_stage)
    if base.cfg.grow_schedule == "wsd":  # stage 1 is a trunk and its cooldown: both shared
        pairs = [(os.path.join(base.cfg.out_dir, "grow_trunk", entry.first_stage),
                  os.path.join(entry.cfg.out_dir, "grow_trunk", entry.first_stage)), (src, dst)]
    else:
        pairs = [(src, dst)]
    if not os.path.exists(os.path.join(src, "final.pt")):
        raise ConfigError(f"{src}/final.pt is missing: base's stage 1 is not done; run the grid without --only first")
    for src, dst in pairs:
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


def run_entry(cfg, entries, entry, t0):
    """One series of the grid, then its budget check (resumable: finished runs are kept)."""
    print(f"=== [{fmt_time(time.time() - t0)}] {label(entry)} ===", flush=True)
    if entry.kind != "base" and shares_stage1(entry.overrides):
        link_stage1(base_of(entries, entry), entry)
    series.run_series(entry.cfg)
    if cfg.budget_check:
        run_budget_check(cfg, entry)


def label(entry):
    """A series' progress line: "s<seed>/NAME: its overrides"."""
    if entry.kind == "base":
        return f"{entry.unit}: {recipe(entry.cfg)}, series_mode {entry.cfg.series_mode} (the scratch twins too)"
    return f"{entry.unit} ({entry.kind}): " + ", ".join(f"{k}={v!r}" for k, v in entry.overrides.items())


def cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_parallel(cfg, entries, argv, t0):
    """Every series of the grid in up to cfg.jobs processes at a time (`ablate.py ARGV --only=NAME --seeds=[SEED]`),
    each on cores // jobs threads and logging to OUT/s<seed>/NAME.log (appended to: a resumed series keeps its
    history). A variant that shares stage 1 starts once its seed's base is done. After a failure no new one starts;
    the running ones finish (their work is kept for --resume), then the failure is one line naming the series and
    its log."""
    threads = max(1, cores() // cfg.jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    pending, running, failed, done = list(entries), {}, [], set()
    # a variant sharing stage 1 waits for its seed's base when the base runs here too (else it was done before, or the
    # variant's process says in one line that it is not)
    waits_for = lambda e: f"s{e.seed}/base" if shares_stage1(e.overrides) and any(b.unit == f"s{e.seed}/base" for b in entries) else None
    ready = lambda e: e.kind == "base" or waits_for(e) is None or waits_for(e) in done
    # a kill of the parent (SIGTERM) ends it through `finally`, which stops the children: none is left running
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        while running or (pending and not failed):
            while not failed and len(running) < cfg.jobs and any(ready(e) for e in pending):
                e = next(e for e in pending if ready(e))
                pending.remove(e)
                log_path = os.path.join(cfg.out_dir, f"s{e.seed}", e.name + ".log")
                os.makedirs(os.path.dirname(log_path), exist_ok=True)
                print(f"=== [{fmt_time(time.time() - t0)}] {label(e)} (a process of {threads} threads, log {log_path}) ===",
                      flush=True)
                log = open(log_path, "a")  # a resumed series' log goes on after the cut one's
                cmd = [sys.executable, os.path.abspath(__file__), *argv, f"--only={e.name}", f"--seeds=[{e.seed}]"]
                running[e.unit] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log, log_path)
            time.sleep(0.5)
            for unit, (proc, log, log_path) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[unit]
                print(f"=== [{fmt_time(time.time() - t0)}] {unit} {'done' if proc.returncode == 0 else 'FAILED'} ===", flush=True)
                if proc.returncode != 0:
                    failed.append((unit, proc.returncode, log_path))
                else:
                    done.add(unit)
    finally:
        for proc, log, _ in running.values():  # the parent was stopped: stop its children too (they resume exactly)
            proc.terminate()
            proc.wait()
            log.close()
        signal.signal(signal.SIGTERM, previous)
    if failed:
        unit, code, log_path = failed[0]
        with open(log_path, errors="replace") as f:
            last = ([line.strip() for line in f if line.strip()] or ["(empty log)"])[-1]
        raise ConfigError(f"series {unit} failed (exit code {code}): {last[:300]}; see {log_path}, fix it and rerun with --resume")


# -----------------------------------------------------------------------------
# the budget check: the largest member again, on a shorter budget, with a whole schedule


def scratch_flops(entry):
    """FLOPs of the largest member trained alone (6 X T from the plan: the scratch run's, to within a step)."""
    top = series.plan_series(entry.cfg)[0][-1]
    return budget.flops(top.params, top.scratch_tokens)


def run_budget_check(cfg, entry):
    """The largest stage of `entry` trained again as a series.py branch in OUT/s<seed>/budget_NAME: grown as in the
    entry from its second-largest member (under wsd from that member's trunk, which the series grows from; else
    from the member itself), for what is left of budget_check x the scratch FLOPs after what the series spent on
    its smaller members (their cooldowns included), with a whole schedule of its own: a wsd run cooling down over its
    last decay_frac, else the recipe's re-warmup and a cosine to min_lr. Reach reads a curve whose learning rate has
    not decayed at that point; this is the same budget, finished."""
    runs = report.series_chains(report.load_series(entry.cfg.out_dir)["runs"])["grow"]
    before, wsd = runs[-2], entry.cfg.grow_schedule == "wsd"
    spent = before.get("series_flops") or before["flops"]
    left = cfg.budget_check * scratch_flops(entry) - spent
    require(left > 0, "budget_check", cfg.budget_check,
            f"above the FLOPs the series spends before its largest stage ({spent / scratch_flops(entry):.2f} of the scratch run's)")
    init = os.path.join(entry.cfg.out_dir, "grow_trunk" if wsd else "grow", before["stage"], "final.pt")
    scfg = replace(entry.cfg, series_mode="branch", init_from=init, stages=[dict(entry.cfg.stages[-1])], branch_flops=float(left),
                   report=False, out_dir=budget_dir(entry), **({"schedule": "wsd"} if wsd else {}))
    print(f"=== {entry.unit}: budget check, the largest stage on {cfg.budget_check:.0%} of the scratch FLOPs ===", flush=True)
    series.run_series(scfg)


def budget_dir(entry):
    return os.path.join(os.path.dirname(entry.cfg.out_dir), "budget_" + entry.name)


def budget_result(cfg, entry):
    """{"flops": the series' total at the end of the check, "val_loss"} of a finished budget check."""
    runs = report.series_chains(report.load_series(entry.cfg.out_dir)["runs"])["grow"]
    spent = runs[-2].get("series_flops") or runs[-2]["flops"]
    final = report.load_series(budget_dir(entry))["runs"][-1]
    start = load_checkpoint(os.path.join(budget_dir(entry), final["ckpt"]), mmap=True)["start_flops"]
    return {"flops": spent + final["flops"] - start, "val_loss": final["val_loss"]}


# -----------------------------------------------------------------------------
# the measurements, seed by seed, then over the seeds


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


def largest_curve(entry, last):
    """(series FLOPs, validation loss) points of the largest grown member as trained: under wsd its trunk's curve,
    then its cooldown's; every x moved by the FLOPs of the earlier members' cooldowns (the series pays for them)."""
    shift = (last.get("series_flops") or last["flops"]) - last["flops"]
    points, is_val = report.read_curve(os.path.join(entry.cfg.out_dir, last["metrics"]))
    if entry.cfg.grow_schedule == "wsd":
        trunk, _ = report.read_curve(os.path.join(entry.cfg.out_dir, "grow_trunk", last["stage"], "metrics.jsonl"))
        points = [p for p in trunk if p[0] < points[0][0]] + points
    return [(x + shift, y) for x, y in points], is_val


def measure_seed(cfg, entries, entry):
    """One series of one seed: each grown member beside its scratch twin (base's scratch run of that seed; stage 1's
    twin is base's stage 1, itself trained from scratch), the reach, the series' FLOPs, the budget check."""
    scratch = report.series_chains(report.load_series(base_of(entries, entry).cfg.out_dir)["runs"])["scratch"]
    grown = report.series_chains(report.load_series(entry.cfg.out_dir)["runs"])["grow"]
    if len(grown) != len(scratch):
        raise ConfigError(f"{entry.cfg.out_dir} holds {len(grown)} of {len(scratch)} grown members: rerun with --resume to finish it")
    top = scratch[-1]
    points, is_val = largest_curve(entry, grown[-1])
    out = {"members": [{"stage": g["stage"], "params": g["params"], "val_loss": g["val_loss"], "scratch_loss": s["val_loss"]}
                       for g, s in zip(grown, scratch)],
           "reach": reach(points, top["val_loss"], top["flops"]) if is_val else None,
           "flops_fraction": (grown[-1].get("series_flops") or grown[-1]["flops"]) / top["flops"],
           "scratch_flops": top["flops"], "curve": [(x / top["flops"], y) for x, y in points],
           "scratch_curve": [(x / top["flops"], y) for x, y in report.read_curve(os.path.join(
               base_of(entries, entry).cfg.out_dir, top["metrics"]))[0]],
           "run_seconds": run_seconds(entry.cfg.out_dir)}
    if cfg.budget_check:
        check = budget_result(cfg, entry)
        out["budget"] = {"flops_fraction": check["flops"] / top["flops"], "val_loss": check["val_loss"],
                         "scratch_loss": top["val_loss"], "run_seconds": run_seconds(budget_dir(entry))}
    return out


def summarize(per_seed):
    """One entry over its seeds ({seed: measure_seed record}): per member the mean losses, the paired grown − scratch
    difference (relative to the scratch mean) and its verdict; reach; the budget check's difference and verdict."""
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    members = []
    for i, m in enumerate(first["members"]):
        grown = {s: per_seed[s]["members"][i]["val_loss"] for s in seeds}
        scratch = {s: per_seed[s]["members"][i]["scratch_loss"] for s in seeds}
        d = paired(grown, scratch)
        members.append({"stage": m["stage"], "params": m["params"], "grown": mean_sd(list(grown.values())),
                        "scratch": mean_sd(list(scratch.values())), "diff": d, "scale": mean_sd(list(scratch.values()))[0],
                        "verdict": verdict(d) if i else "stage 1"})
    reaches = [per_seed[s]["reach"] for s in seeds]
    out = {"seeds": seeds, "members": members, "reach": reaches,
           "reach_mean_sd": mean_sd(reaches) if all(r is not None for r in reaches) else None,
           "flops_fraction": mean_sd([per_seed[s]["flops_fraction"] for s in seeds])[0]}
    if "budget" in first:
        b = {s: per_seed[s]["budget"] for s in seeds}
        d = paired({s: b[s]["val_loss"] for s in seeds}, {s: b[s]["scratch_loss"] for s in seeds})
        out["budget"] = {"flops_fraction": mean_sd([b[s]["flops_fraction"] for s in seeds])[0], "diff": d,
                         "scale": mean_sd([b[s]["scratch_loss"] for s in seeds])[0], "verdict": BUDGET_WORDS[verdict(d)]}
    return out


def measure(cfg, entries):
    """The results record: per entry name its kind, overrides, seed-by-seed measurements and their summary."""
    out = {"variants": []}
    for name in dict.fromkeys(e.name for e in entries):
        chosen = [e for e in entries if e.name == name]
        per_seed = {e.seed: measure_seed(cfg, entries, e) for e in chosen}
        e = chosen[0]
        out["variants"].append({"name": name, "kind": e.kind, "overrides": e.overrides,
                                "shares_stage1": e.kind != "base" and shares_stage1(e.overrides), "schedule": e.cfg.grow_schedule,
                                "per_seed": {str(s): r for s, r in per_seed.items()}, **summarize(per_seed)})
    base = out["variants"][0]["per_seed"]
    out["scratch"] = [{"stage": m["stage"], "params": m["params"],
                       "val_loss": mean_sd([base[s]["members"][i]["scratch_loss"] for s in base])} for i, m in
                      enumerate(next(iter(base.values()))["members"])]
    return out


def best(results):
    """The entry whose finished budget check is lowest against scratch (the upper end of its interval, then its mean);
    without budget checks, the lowest mean reach among those that reach on every seed. None if nothing qualifies."""
    vs = results["variants"]
    if all("budget" in v for v in vs):
        key = lambda v: (v["budget"]["diff"]["hi"] if math.isfinite(v["budget"]["diff"]["hi"]) else math.inf, v["budget"]["diff"]["mean"])
        return min(vs, key=key)
    ok = [v for v in vs if v["reach_mean_sd"] is not None]
    return min(ok, key=lambda v: v["reach_mean_sd"][0]) if ok else None


# -----------------------------------------------------------------------------
# the report: one table at equal FLOPs, one figure


def recipe(scfg):
    """The growth settings of a SeriesConfig, in words."""
    return ", ".join(f"{k}={getattr(scfg, k)!r}" for k in GROWTH_KEYS + ("grow_schedule",)) + (
        f", decay_frac={scfg.decay_frac:g}" if scfg.grow_schedule == "wsd" else "")


def changes(v):
    said = ", ".join(f"{k}={val!r}" for k, val in v["overrides"].items())
    return {"base": "the base recipe", "combo": f"combination: {said}"}.get(v["kind"], said)


def rel_cell(d, scale):
    """A paired difference as a percentage of `scale`: mean [95% interval]."""
    if not d["n"]:
        return "-"
    ci = f" [{100 * d['lo'] / scale:+.1f}, {100 * d['hi'] / scale:+.1f}]" if math.isfinite(d["lo"]) else ""
    return f"{100 * d['mean'] / scale:+.1f}%{ci}"


def reach_cell(v):
    if v["reach_mean_sd"] is None:
        n = sum(r is None for r in v["reach"])
        return f"not reached ({n} of {len(v['reach'])} seeds)"
    mean, sd = v["reach_mean_sd"]
    return f"{100 * mean:.0f}%" + (f" ± {100 * sd:.0f}" if len(v["reach"]) > 1 else "")


def write_report(cfg, results, out_dir):
    """ablation.md and ablation.png in out_dir."""
    vs, scratch = results["variants"], results["scratch"]
    n = len(vs[0]["seeds"])
    top_loss = scratch[-1]["val_loss"][0]
    lines = ["# Growth-recipe ablation at the paper's training length", "",
             f"Which growth recipe still pays after long training? The grown series of the members "
             f"{', '.join(s['stage'] for s in scratch)} ({report.human(scratch[0]['params'])}-{report.human(scratch[-1]['params'])} "
             f"non-embedding parameters) at {cfg.tokens_per_param:g} tokens per parameter"
             + (" (2x Chinchilla, as Yano et al. 2025 train, section 3.3)" if cfg.tokens_per_param == 40 else "") + ", under variants of its growth settings, one changed at a time from the base, then "
             f"combinations; each over {n} seeds ({', '.join(map(str, vs[0]['seeds']))}: the seed changes initialization, data order "
             "and growth noise). Every number below comes from one run of", "",
             f"    {results['command']}", "",
             f"Base recipe: {results['base_recipe']}. Batch, context, warmup and evaluation: `{cfg.series}`'s.", "",
             "How to read it. Each member column is the grown member's final validation loss (nats per byte) against its "
             "scratch twin's of the same seed (base's scratch run; stage 1's twin is base's stage 1): the mean paired "
             "difference as a percentage of the scratch mean, and in brackets its 95% t interval over the seeds. Reach: the "
             "fraction of the largest scratch member's FLOPs at which the largest grown member's validation curve, as trained, "
             f"first reaches that member's final loss ({top_loss:.4f}, the mean over seeds), mean ± sd; a wsd trunk reads a "
             "curve at its stable rate, so reach understates a finished model there and overstates nothing. "
             + (f"Finished at {cfg.budget_check:.0%}: the largest stage trained again from the second-largest member so that "
                f"the series spends {cfg.budget_check:.0%} of the scratch member's FLOPs, with a whole schedule of its own "
                "(wsd recipes a WSD run that cools down over its last decay_frac, the others the re-warmup and a cosine); "
                "its final loss against the scratch member's, paired by seed: **reached** when the whole interval is below "
                "0, **not reached** when it is above, else inconclusive. This is the goal: the largest grown member, finished, "
                f"at or below its scratch twin's final loss on {REACH_GOAL:.0%} of its FLOPs. " if cfg.budget_check else "")
             + "Series FLOPs: what the grown series spends, as a fraction of the largest scratch member's (under wsd the "
             "smaller members' cooldown branches are counted). Variants that change only what happens at growth share "
             "base's stage 1.", "",
             "| variant | changes | " + " | ".join(s["stage"] for s in scratch) + " | reach | "
             + (f"finished at {cfg.budget_check:.0%} | " if cfg.budget_check else "") + "series FLOPs |",
             "|---|---|" + "---|" * len(scratch) + "---|" + ("---|" if cfg.budget_check else "") + "---|"]
    losses = lambda v: [[m["val_loss"] for m in r["members"]] for _, r in sorted(v["per_seed"].items())]
    for k, v in enumerate(vs):
        # two settings that grow these shapes alike (e.g. stack and stack_top where one layer becomes two) train the same runs
        same = [u["name"] for u in vs[:k] if losses(u) == losses(v)]
        if same:
            v = {**v, "overrides": v["overrides"], "note": f" (the same runs as {same[0]}: at these shapes the two grow alike)"}
        cells = ["(stage 1)" if i == 0 and v["kind"] == "base" else rel_cell(m["diff"], m["scale"]) for i, m in enumerate(v["members"])]
        check = [f"{rel_cell(v['budget']['diff'], v['budget']['scale'])}: **{v['budget']['verdict']}**"] if cfg.budget_check else []
        lines.append(f"| {v['name']} | {changes(v)}{v.get('note', '')} | " + " | ".join(cells + [reach_cell(v)] + check)
                     + f" | {v['flops_fraction']:.2f} |")
    lines += ["", "Scratch twins (mean ± sd over the seeds): " + ", ".join(
        f"{s['stage']} {s['val_loss'][0]:.4f} ± {s['val_loss'][1]:.4f}" for s in scratch) + ".", ""]
    b = best(results)
    if b and cfg.budget_check:
        d = b["budget"]["diff"]
        lines += [f"Best: {b['name']} ({changes(b)}): finished on {b['budget']['flops_fraction']:.0%} of the scratch FLOPs, its "
                  f"largest member ends {rel_cell(d, b['budget']['scale'])} against the scratch member: "
                  f"**{b['budget']['verdict']}** (the goal, the interval included: below 0 at {REACH_GOAL:.0%})."
                  + (" No variant reaches the goal with its interval: the table says how close each came." if b["budget"]["verdict"] != "reached" else ""), ""]
    elif b:
        lines += [f"Best: {b['name']} ({changes(b)}): reach {reach_cell(b)}.", ""]
    lines += ["![validation loss of the largest member against FLOPs, and each variant's finished budget check](ablation.png)", ""]
    with open(os.path.join(out_dir, "ablation.md"), "w") as f:
        f.write("\n".join(lines))
    plot(cfg, results, os.path.join(out_dir, "ablation.png"))


def mean_curve(curves):
    """(x, mean, low, high) of curves sampled at the same points (the seeds of one entry share their step grid);
    each later curve is interpolated onto the first one's x, and low/high are the seeds' min and max."""
    x = np.array([p[0] for p in curves[0]])
    ys = np.array([np.interp(x, [p[0] for p in c], [p[1] for p in c]) for c in curves])
    return x, ys.mean(0), ys.min(0), ys.max(0)


def plot(cfg, results, path):
    """Left: validation loss of the largest member's stage against FLOPs (a fraction of the largest scratch member's),
    the mean over seeds with the seeds' range shaded, for every variant and the scratch member. Right: each variant's
    finished budget check against scratch (mean and 95% interval), or its reach without budget checks."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend needed

    vs = results["variants"]
    fig = Figure(figsize=(14, 6.5))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.5, 1]})
    colors = [colormaps["tab10"].colors[i] for i in (0, 2, 4, 1, 5, 6, 8, 9, 7)]  # tab10 without base's red
    color = lambda i, v: "tab:red" if v["kind"] == "base" else colors[(i - 1) % len(colors)]
    starts, seen = [], []
    for i, v in enumerate(vs):
        x, y, lo, hi = mean_curve([r["curve"] for r in v["per_seed"].values()])
        starts.append(x[0])
        seen += list(y)
        is_base = v["kind"] == "base"
        left.plot(x, y, color=color(i, v), lw=3 if is_base else 1.6, ls="-." if v["kind"] == "combo" else "-",
                  label=v["name"], zorder=3 if is_base else 2)
        left.fill_between(x, lo, hi, color=color(i, v), alpha=0.15, lw=0)
    x, y, lo, hi = mean_curve([r["scratch_curve"] for r in vs[0]["per_seed"].values()])
    left.plot(x, y, color="black", ls="--", lw=1.8, label=f"{results['scratch'][-1]['stage']} from scratch")
    left.fill_between(x, lo, hi, color="black", alpha=0.1, lw=0)
    top_loss = results["scratch"][-1]["val_loss"][0]
    left.axhline(top_loss, color="black", ls=":", lw=1.2)
    left.axvline(REACH_GOAL, color="0.5", ls=":", lw=1.2)
    x0 = min(starts)
    left.set_xlim(x0, 1.0 + 0.02 * (1 - x0) + max(0.0, max(v["flops_fraction"] for v in vs) - 1.0))
    low, high = min(seen + [top_loss]), max(seen)
    left.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    left.set_xlabel("FLOPs (fraction of the largest member trained from scratch)", fontsize=12)
    left.set_ylabel("validation loss (nats per byte)", fontsize=12)
    left.set_title(f"The largest member's stage ({results['scratch'][-1]['stage']}), mean over "
                   f"{len(vs[0]['seeds'])} seeds, their range shaded", fontsize=12)
    left.grid(alpha=0.3)
    left.legend(fontsize=9, ncol=2)

    names = [v["name"] for v in vs]
    if cfg.budget_check:
        for i, v in enumerate(vs):
            d, scale = v["budget"]["diff"], v["budget"]["scale"]
            mean = 100 * d["mean"] / scale
            err = [[mean - 100 * d["lo"] / scale], [100 * d["hi"] / scale - mean]] if math.isfinite(d["lo"]) else None
            right.errorbar(mean, i, xerr=err, fmt="o", color=color(i, v), ms=8, capsize=5, lw=2)
            right.text(0.98, i - 0.3, v["budget"]["verdict"], transform=right.get_yaxis_transform(), ha="right", fontsize=10)
        right.axvline(0, color="black", ls="--", lw=1.2)
        right.set_xlabel(f"largest member finished on {cfg.budget_check:.0%} of the scratch FLOPs:\n"
                         "final loss vs scratch (%), mean and 95% interval", fontsize=12)
        right.set_title(f"The goal: below 0 on {REACH_GOAL:.0%} of the FLOPs", fontsize=13)
    else:
        for i, v in enumerate(vs):
            if v["reach_mean_sd"] is not None:
                right.errorbar(v["reach_mean_sd"][0], i, xerr=v["reach_mean_sd"][1] if len(v["reach"]) > 1 else None,
                               fmt="o", color=color(i, v), ms=8, capsize=5)
        right.axvline(REACH_GOAL, color="black", ls="--", lw=1.2)
        right.set_xlabel("reach (mean ± sd)", fontsize=12)
        right.set_title("Reach (lower is cheaper)", fontsize=13)
    right.set_yticks(range(len(vs)), names, fontsize=11)
    right.set_ylim(len(vs) - 0.5, -0.7)  # base on top, as in the table
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
        if cfg.only:  # one series for each of cfg.seeds, in a process of a parallel grid (or by hand); each holds its own lock
            chosen = [e for e in entries if e.name == cfg.only]
            require(bool(chosen), "only", cfg.only, "base or a configured variant or combo: " + ", ".join(dict.fromkeys(e.name for e in entries)))
            torch.set_num_threads(max(1, cores() // cfg.jobs))
            for e in chosen:
                run_entry(cfg, entries, e, time.time())
            return
        lock = claim_grid(cfg.out_dir, cfg.resume, cfg.overwrite)
        try:
            t0 = time.time()
            prepare_data(entries[0].cfg, 0, 1, "cpu")  # the corpus tokenized once, before the processes that read it start
            if cfg.jobs > 1:
                run_parallel(cfg, entries, argv, t0)
            else:
                for e in entries:
                    run_entry(cfg, entries, e, t0)
            results = {"config": asdict(cfg), "command": command(argv), "base_recipe": recipe(entries[0].cfg), **measure(cfg, entries)}
            results["seconds"] = time.time() - t0  # this invocation's wall time (a resumed grid's last part)
            results["run_seconds"] = run_seconds(cfg.out_dir)  # every run's, summed: the grid's cost in one process
            with open(os.path.join(cfg.out_dir, "results.json.tmp"), "w") as f:
                json.dump(results, f, indent=1)
            os.replace(os.path.join(cfg.out_dir, "results.json.tmp"), os.path.join(cfg.out_dir, "results.json"))
            for out in [cfg.out_dir] + ([cfg.docs_dir] if cfg.docs_dir else []):
                os.makedirs(out, exist_ok=True)
                write_report(cfg, results, out)
            b = best(results)
            print(f"report: {os.path.join(cfg.docs_dir or cfg.out_dir, 'ablation.md')} ({fmt_time(results['seconds'])}); best: "
                  + (f"{b['name']}" + (f", finished at {cfg.budget_check:.0%}: {b['budget']['verdict']}" if cfg.budget_check else
                                        f", reach {reach_cell(b)}") if b else "none"))
        finally:
            lock.release()


if __name__ == "__main__":
    main(sys.argv[1:])
