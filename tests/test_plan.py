"""The plan check (series.py CONFIG --plan, and the same check before a run trains): for every stage and arm the tokens
it reads, the unique tokens its source holds, the passes, whether the fixed-data cap binds and the FLOPs, each against
budget.py's closed forms; a plan that repeats its data more than max_passes is refused in one line; the paper's config
passes its own limit with the cap binding at the 8B stage alone (section 3.3). Nothing trains, nothing is downloaded."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import budget  # noqa: E402
import series_plan  # noqa: E402
from common import ConfigError, configure  # noqa: E402
from series import SeriesConfig, plan_series  # noqa: E402
from series_plan import data_sources, plan_data  # noqa: E402

DEMO = os.path.join(ROOT, "configs", "series_cpu.py")
PAPER = os.path.join(ROOT, "configs", "series_paper.py")
CORPUS = 5_688_911  # unique tokens of the demo's prepared corpus, as its meta.json would count them


def prepared(data_dir, tokens, name="default-bytes", max_tokens=None):
    """A meta.json as data.prepare writes it (last, after the token files), counting `tokens` train tokens."""
    os.makedirs(os.path.join(data_dir, name), exist_ok=True)
    meta = {"tokenizer": {"name": "bytes", "vocab_size": 320}, "splits": {"train": {"tokens": tokens}, "val": {"tokens": 1}},
            "args": {"source": "default", "tokenizer": "bytes", "val_fraction": 0.005, "max_tokens": max_tokens, "text_field": "text"}}
    with open(os.path.join(data_dir, name, "meta.json"), "w") as f:
        json.dump(meta, f)
    return str(data_dir)


def plan(argv, vocab_size=None, pin=True):
    # the rows below are written for grow_schedule "continue" (a run per stage); a test that plans "wsd" says so, and
    # pin=False keeps the config's own schedule
    cfg = configure(SeriesConfig, [argv[0], *(["--grow_schedule=continue"] if pin else []), *argv[1:]])
    stages, cap = plan_series(cfg, vocab_size)
    return cfg, stages, cap, {(r.arm, r.stage): r for r in plan_data(cfg, stages, cap, data_sources(cfg))}


def closed_form(config_path, tokens_per_param=None):
    """budget.py's stages of a config, from the closed-form parameter counts of its shapes."""
    cfg = budget.load_config(config_path)
    sizes = [budget.stage_params(st) for st in cfg["stages"]]
    return budget.staged_budget(sizes, tokens_per_param or cfg["tokens_per_param"], [st["name"] for st in cfg["stages"]])


def run(config, *args):
    return subprocess.run([sys.executable, "series.py", config, "--grow_schedule=continue", *args], cwd=ROOT, capture_output=True,
                          text=True)


def test_the_demo_plan_reads_its_corpus_about_once(tmp_path):
    data_dir = prepared(tmp_path, CORPUS)
    cfg, stages, cap, rows = plan([DEMO, f"--data_dir={data_dir}"])
    expected = closed_form(DEMO)
    assert [s.params for s in stages] == [b.params for b in expected]  # model.py's counts are the closed form's
    source, = data_sources(cfg)
    assert (source.unique_tokens, source.share) == (CORPUS, 1.0) and "meta.json" in source.counted_by
    read = 0
    for b in expected:  # the grown series reads on: stage i+1 starts where stage i stopped
        r = rows["grow", b.name]
        assert (r.tokens, r.start, r.flops, r.unique) == (b.staged_tokens, read, b.staged_flops, CORPUS)
        read += b.staged_tokens
        assert r.passes == pytest.approx(read / CORPUS) and r.cap_binds is None
        s = rows["scratch", b.name]  # every scratch run reads from the start
        assert (s.tokens, s.start) == (b.scratch_tokens, 0) and s.passes == pytest.approx(b.scratch_tokens / CORPUS)
        assert s.flops == (0 if b is expected[0] else b.scratch_flops) and s.shared == ("grow" if b is expected[0] else "")
    summary = budget.summarize(expected)
    assert read == summary.staged_tokens and sum(r.flops for (arm, _), r in rows.items() if arm == "grow") == summary.staged_flops
    assert read == 6_152_323 and rows["grow", "0.9M"].passes == pytest.approx(read / CORPUS)  # 1.08 passes
    assert rows["grow", "0.9M"].passes < cfg.max_passes == 4
    # the command prints the same plan and exits 0 without training (no out_dir)
    out = run(DEMO, "--plan", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}")
    assert out.returncode == 0, out.stderr
    assert "| grow | 0.9M | 853K | 3.11M | 3.04M -> 6.15M | 5.69M | 1.08 |  |" in out.stdout, out.stdout
    assert "most passes: 1.08, limit max_passes=4" in out.stdout and not (tmp_path / "out").exists()


def test_a_plan_that_repeats_its_data_too_often_is_refused_in_one_line(tmp_path):
    # no prepared data: the recorded count decides; a sixth of the demo's corpus is read 6.15 times by the grown series
    few = ["--data_unique_tokens=[1_000_000]", f"--data_dir={tmp_path / 'none'}", f"--out_dir={tmp_path / 'out'}"]
    for argv in ([DEMO, "--plan", *few], [DEMO, *few]):  # the plan, and a run: refused before anything trains
        out = run(*argv)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert out.stderr.startswith("error: the plan reads default 6.15 times (grow 0.9M: 6.15M tokens of its 1M unique), "
                                     "more than max_passes=4 (arms over it: grow, scratch)"), out.stderr
        assert not (tmp_path / "out").exists() and not (tmp_path / "none").exists()
    assert "| grow | 0.9M |" in run(DEMO, "--plan", *few).stdout  # --plan prints the plan it refuses
    cfg = configure(SeriesConfig, [DEMO, *few, "--max_passes=6.2"])  # the limit is the config's
    series_plan.check_passes(cfg, plan_data(cfg, *plan_series(cfg), data_sources(cfg)))
    with pytest.raises(ConfigError, match="max_passes=6.1"):
        cfg = configure(SeriesConfig, [DEMO, *few, "--max_passes=6.1"])
        series_plan.check_passes(cfg, plan_data(cfg, *plan_series(cfg), data_sources(cfg)))
    with pytest.raises(ConfigError, match="data_unique_tokens=.*one count per source"):
        configure(SeriesConfig, [DEMO, "--data_unique_tokens=[1, 2]"])
    # a source of unknown size and no count: the plan says so, and a run prepares it first and checks then
    cfg = configure(SeriesConfig, [DEMO, f"--data_dir={tmp_path / 'none'}"])
    assert data_sources(cfg)[0].unique_tokens is None
    assert all(r.passes is None for r in plan_data(cfg, *plan_series(cfg), data_sources(cfg)))


def test_the_fixed_data_cap_binds_where_the_source_holds_more_than_it(tmp_path):
    config = tmp_path / "fixed.py"
    config.write_text("stages = [dict(name='a', shape='cpu-1', lr=3e-3), dict(name='b', shape='cpu-2', lr=2e-3), "
                      "dict(name='c', shape='cpu-3', lr=2e-3)]\ntokens_per_param = 5\nseries_mode = 'grow+scratch+fixed_data'\n")
    expected = closed_form(str(config))
    cap, uses = budget.fixed_data(expected)
    assert cap == expected[-1].scratch_tokens and [u.repeated > 0 for u in uses] == [False, False, True]
    for unique, binds in ((2 * cap, [False, False, True]), (cap // 2, [False, False, False])):
        _, stages, plan_cap, rows = plan([str(config), f"--data_unique_tokens=[{unique}]", f"--data_dir={tmp_path}"])
        assert plan_cap == cap
        assert [rows["fixed_data", b.name].cap_binds for b in expected] == binds
        read = 0
        for b in expected:
            read += b.staged_tokens
            r = rows["fixed_data", b.name]  # read over the cap's unique tokens, or the source's when it holds fewer
            assert r.unique == min(unique, cap) and r.passes == pytest.approx(read / min(unique, cap))
            # the stages before the cap are grow's own runs (train_grown_series shares them); the one past it trains
            assert (r.shared, r.flops) == (("", b.staged_flops) if b is expected[-1] else ("grow", 0))
        assert rows["grow", "c"].cap_binds is None and rows["grow", "c"].passes == pytest.approx(read / unique)
    out = run(str(config), "--plan", f"--data_unique_tokens=[{cap // 2}]", f"--data_dir={tmp_path}")
    assert out.returncode == 0 and "warning: the fixed-data cap never binds" in out.stdout, out.stdout + out.stderr


def test_a_wsd_series_plans_its_trunks_and_cooldowns(tmp_path):
    cfg, stages, _, rows = plan([DEMO, "--grow_schedule=wsd", f"--data_dir={prepared(tmp_path, CORPUS)}"])
    read = 0
    for s in stages:  # each cooldown reads on from its trunk's end, where the next trunk starts too
        trunk, cool = rows["grow trunk", s.name], rows["grow cooldown", s.name]
        assert (trunk.start, trunk.tokens, cool.tokens) == (read, series_plan.trunk_tokens(cfg, s),
                                                            series_plan.cooldown_tokens(cfg, s))
        read += trunk.tokens
        assert cool.start == read and cool.flops == budget.flops(s.params, cool.tokens)
        assert cool.passes == pytest.approx((read + cool.tokens) / CORPUS)


def test_the_paper_config_is_the_papers_recipe_and_passes_its_plan(tmp_path):
    # offline and unprepared: the plan counts FineWeb-Edu by its dataset card and needs no GPT-2 tokenizer
    argv = [PAPER, f"--data_dir={tmp_path}"]
    cfg, stages, cap, rows = plan(argv, vocab_size=0, pin=False)
    assert (cfg.grow_width, cfg.grow_depth, cfg.grow_schedule, cfg.grow_noise) == ("fpi", "stack_top", "restart", 1e-3)
    assert cfg.series_mode == "grow+scratch+fixed_data" and cfg.tokens_per_param == 40
    expected = closed_form(PAPER)
    assert [s.params for s in stages] == [b.params for b in expected]
    source, = data_sources(cfg)
    assert source.name == "hf:HuggingFaceFW/fineweb-edu" and source.unique_tokens == cfg.max_data_tokens == 480e9
    assert series_plan.KNOWN_SOURCE_TOKENS["HuggingFaceFW/fineweb-edu", "gpt2"] > source.unique_tokens
    staged = budget.summarize(expected).staged_tokens  # 462.3B
    assert cap == expected[-1].scratch_tokens and 321e9 < cap < 322e9 and 462e9 < staged < 463e9
    # the grown and scratch arms read fresh data; the fixed-data cap binds at the 8B stage alone (section 3.3)
    assert rows["grow", "8B"].passes == pytest.approx(staged / 480e9) and rows["grow", "8B"].passes < 1
    assert max(r.passes for (arm, _), r in rows.items() if arm == "scratch") == pytest.approx(cap / 480e9)
    assert [rows["fixed_data", b.name].cap_binds for b in expected] == [False, False, False, True]
    assert rows["fixed_data", "8B"].passes == pytest.approx(staged / cap) and rows["fixed_data", "8B"].passes <= cfg.max_passes
    out = run(*argv, "--plan")
    assert out.returncode == 0, out.stderr
    assert "| fixed_data | 8B | 8.03B | 241B | 221B -> 462B | 321B | 1.44 | yes | 1.16e+22 |" in out.stdout, out.stdout
    # on sample-10BT, the old setting, the grown series would read it 46 times: refused
    out = run(*argv, "--plan", '--data=["hf:HuggingFaceFW/fineweb-edu:sample-10BT"]', "--max_data_tokens=0")
    assert out.returncode == 2 and "46.23 times" in out.stderr and "warning: the fixed-data cap never binds" in out.stdout
