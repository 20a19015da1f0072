"""ablate.py: the reach of a validation curve, which variants share base's stage 1, the summary over seeds against
closed-form statistics, one-line errors, and a tiny grid end to end (base and one variant sharing its stage 1 through
hard links, each with its budget check)."""

import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ablate  # noqa: E402
import report  # noqa: E402
from common import ConfigError  # noqa: E402

SERIES = os.path.join(ROOT, "configs", "series_cpu.py")


def test_reach_interpolates_linearly_between_validation_points():
    points = [(8.0, 3.0), (10.0, 2.5), (20.0, 2.0), (30.0, 1.0)]
    # 1.5 lies halfway from 2.0 (x=20) to 1.0 (x=30): x = 25, a quarter of 100
    assert ablate.reach(points, 1.5, 100.0) == pytest.approx(0.25, rel=1e-12)
    # 2.9 is a fifth of the way from 3.0 to 2.5: x = 8 + 0.2 * 2 = 8.4
    assert ablate.reach(points, 2.9, 50.0) == pytest.approx(8.4 / 50, rel=1e-12)
    assert ablate.reach(points, 2.0, 40.0) == pytest.approx(0.5, rel=1e-12)  # met exactly at a point
    assert ablate.reach(points, 3.5, 40.0) == pytest.approx(0.2, rel=1e-12)  # reached at the first point
    assert ablate.reach(points, 0.9, 40.0) is None  # never reached
    # the first crossing counts, not a later one after the curve went back up
    assert ablate.reach([(0.0, 3.0), (10.0, 1.0), (20.0, 3.0), (30.0, 1.0)], 2.0, 10.0) == pytest.approx(0.5, rel=1e-12)


def test_only_growth_settings_share_stage_1():
    assert ablate.shares_stage1({"grow_noise": 0.0})
    assert ablate.shares_stage1({"grow_width": "aki", "grow_depth": "stack", "grow_optimizer": "grown", "grow_warmup_steps": 0})
    assert not ablate.shares_stage1({"grow_schedule": "continue", "grow_warmup_steps": 0})  # changes stage 1's schedule
    assert not ablate.shares_stage1({"warmup_steps": 3})
    assert not ablate.shares_stage1({"grow_noise": 0.0, "lr": 1e-3})


def test_summary_over_seeds_is_the_paired_t_interval():
    # three seeds. The 95% t interval's half-width is t * sd / sqrt(3), t = t(0.975, df=2) = 0.95 * sqrt(2 / (4 * 0.975
    # * 0.025)) (the closed form of Student's t with 2 degrees of freedom) = 4.3026527...
    t = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))

    def record(g2, s2, budget_loss):
        return {"members": [{"stage": "a", "params": 1, "val_loss": 3.0, "scratch_loss": 3.0},
                            {"stage": "b", "params": 2, "val_loss": g2, "scratch_loss": s2}],
                "reach": 0.6, "flops_fraction": 1.0, "budget": {"flops_fraction": 0.7, "val_loss": budget_loss, "scratch_loss": s2}}
    # grown − scratch of the second member: -0.2, -0.25, -0.3 (mean -0.25, sd 0.05): the interval is below 0, held;
    # the budget check: -0.05, -0.1, -0.15 (mean -0.1, sd 0.05): the interval reaches above 0, inconclusive
    per_seed = {1: record(1.8, 2.0, 1.95), 2: record(1.75, 2.0, 1.9), 3: record(1.7, 2.0, 1.85)}
    out = ablate.summarize(per_seed)
    half = t * 0.05 / math.sqrt(3)
    d = out["members"][1]["diff"]
    assert d["n"] == 3 and d["mean"] == pytest.approx(-0.25, abs=1e-12) and d["sd"] == pytest.approx(0.05, abs=1e-12)
    assert (d["lo"], d["hi"]) == (pytest.approx(-0.25 - half, abs=1e-9), pytest.approx(-0.25 + half, abs=1e-9))
    assert out["members"][1]["verdict"] == "held" and out["members"][0]["verdict"] == "stage 1"
    b = out["budget"]
    assert b["diff"]["mean"] == pytest.approx(-0.1, abs=1e-12) and b["diff"]["hi"] == pytest.approx(-0.1 + half, abs=1e-9)
    assert b["verdict"] == "inconclusive" and b["flops_fraction"] == pytest.approx(0.7)
    assert out["reach_mean_sd"] == (pytest.approx(0.6), pytest.approx(0.0, abs=1e-12))
    # all three budget losses 0.2 lower: the whole interval below 0, reached; 0.3 higher: above it, not reached
    for shift, said in ((-0.2, "reached"), (0.3, "not reached")):
        moved = {s: {**r, "budget": {**r["budget"], "val_loss": r["budget"]["val_loss"] + shift}} for s, r in per_seed.items()}
        assert ablate.summarize(moved)["budget"]["verdict"] == said
    # one seed gives no interval: inconclusive, never "reached"
    one = ablate.summarize({1: record(1.0, 2.0, 1.0)})
    assert one["budget"]["verdict"] == "inconclusive" and math.isnan(one["budget"]["diff"]["lo"])
    # a seed that never reaches leaves no mean reach
    per_seed[2]["reach"] = None
    assert ablate.summarize(per_seed)["reach_mean_sd"] is None


@pytest.mark.parametrize("args, says", [
    (["--variants=[['x', {'grow_nois': 0.0}]]"], "unknown key 'grow_nois'"),  # names the known keys too (asserted below)
    (["--variants=[['x', {'grow_noise': 'big'}]]"], "grow_noise must be float"),
    (["--variants=[['x', {'grow_width': 'wide'}]]"], "width must be one of"),  # series.plan_series, before any run
    (["--variants=[['base', {}]]"], "variant name='base'"),
    (["--variants=[['x', {'series_mode': 'scratch'}]]"], "the grid sets those"),
    (["--variants=[['x', {'stages': [{'name': 'a', 'shape': 'cpu-1', 'lr': 0.003}]}]]"], "must be base's members"),
    (["--jobs=0"], "jobs=0"),
    (["--seeds=[1, 1]"], "seeds=[1, 1]"),
    (["--variants=[['x', {'seed': 3}]]"], "the grid sets those"),
    (["--only=nope"], "only='nope'"),
])
def test_bad_config_is_one_line(tmp_path, capsys, args, says):
    with pytest.raises(SystemExit) as e:
        ablate.main([f"--series={SERIES}", f"--out_dir={tmp_path / 'grid'}", "--variants=[['noise0', {'grow_noise': 0.0}]]"] + args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    if "unknown key" in says:
        assert "grow_noise" in err[0] and "grow_width" in err[0]
    assert not (tmp_path / "grid").exists()  # nothing ran


def test_a_failed_variant_process_is_one_line_naming_it_and_its_log(tmp_path):
    # the child runs --only=noise0 --seeds=[5] on a grid whose base never ran (and is not run here): it fails at once,
    # with one line
    argv = [f"--series={SERIES}", f"--out_dir={tmp_path}", "--jobs=2", "--seeds=[5]", "--variants=[['noise0', {'grow_noise': 0.0}]]"]
    cfg = ablate.configure(ablate.AblationConfig, argv)
    entries = ablate.grid(cfg)
    assert [e.unit for e in entries] == ["s5/base", "s5/noise0"]
    with pytest.raises(ConfigError) as e:
        ablate.run_parallel(cfg, entries[1:], argv, 0.0)
    message = str(e.value)
    assert "series s5/noise0 failed (exit code 2)" in message and "base's stage 1 is not done" in message
    assert os.path.join(str(tmp_path), "s5", "noise0.log") in message and "\n" not in message


TINY = ["--eval_interval=5", "--eval_batches=1", "--log_interval=5", "--batch_size=4", "--seq_len=64", "--warmup_steps=2",
        "--grow_warmup_steps=2", "--plot=false", "--max_data_tokens=400000",
        "--stages=[{'name': 'a', 'shape': 'cpu-1', 'lr': 3e-3}, {'name': 'b', 'shape': 'cpu-2', 'lr': 2.5e-3}]"]


def test_tiny_grid_end_to_end(tmp_path, capsys):
    out, docs = tmp_path / "grid", tmp_path / "docs"
    overrides = TINY + [f"--data_dir={tmp_path / 'data'}"]
    argv = [f"--series={SERIES}", f"--out_dir={out}", f"--docs_dir={docs}", "--tokens_per_param=0.2", f"--overrides={overrides!r}",
            "--seeds=[3]", "--variants=[['noise0', {'grow_noise': 0.0}]]"]
    ablate.main(argv)
    results = json.loads((out / "results.json").read_text())
    v = {r["name"]: r for r in results["variants"]}
    assert list(v) == ["base", "noise0"] and v["noise0"]["shares_stage1"]
    # stage 1 is base's run, on disk once: the same inode, hence the same loss
    assert os.path.samefile(out / "s3" / "noise0" / "grow" / "a" / "final.pt", out / "s3" / "base" / "grow" / "a" / "final.pt")
    seed = {name: r["per_seed"]["3"] for name, r in v.items()}
    assert seed["noise0"]["members"][0]["val_loss"] == seed["base"]["members"][0]["val_loss"]
    # the yardstick is base's scratch run of each size; stage 1's twin is base's stage 1 itself
    base = {(r["mode"], r["stage"]): r for r in report.load_series(out / "s3" / "base")["runs"]}
    top = base["scratch", "b"]
    for name, r in seed.items():
        assert [m["scratch_loss"] for m in r["members"]] == [base["grow", "a"]["val_loss"], top["val_loss"]]
        assert r["reach"] is None or 0 < r["reach"] <= r["flops_fraction"] + 1e-9
        # the budget check: the largest stage again from the grown series' stage 1, the series at 70% of the scratch FLOPs
        step_flops = 6 * top["params"] * 4 * 64  # one step of the tiny grid
        assert abs(r["budget"]["flops_fraction"] * top["flops"] - 0.7 * top["flops"]) <= step_flops
        check = report.load_series(out / "s3" / f"budget_{name}")["runs"]
        assert [c["mode"] for c in check] == ["branch"] and r["budget"]["val_loss"] == check[0]["val_loss"]
    assert v["base"]["members"][0]["verdict"] == "stage 1" and v["noise0"]["budget"]["verdict"] == "inconclusive"  # one seed
    for folder in (out, docs):
        text = (folder / "ablation.md").read_text()
        assert "| noise0 | grow_noise=0.0 |" in text and "Best:" in text and "finished at 70%" in text
        assert (folder / "ablation.png").stat().st_size > 10_000
    # a second fresh run into the finished grid is refused in one line; --resume is how to continue it
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        ablate.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--resume" in err[0]
    # --resume keeps every finished run: nothing trains again, and the report is the same
    before = (docs / "ablation.md").read_text()
    ablate.main(argv + ["--resume"])
    assert (docs / "ablation.md").read_text() == before
