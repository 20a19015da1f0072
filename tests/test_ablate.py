"""ablate.py: the reach of a validation curve, which variants share base's stage 1, one-line errors, and a tiny grid
end to end (base and one variant sharing its stage 1 through hard links)."""

import json
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


@pytest.mark.parametrize("args, says", [
    (["--variants=[['x', {'grow_nois': 0.0}]]"], "unknown key 'grow_nois'"),  # names the known keys too (asserted below)
    (["--variants=[['x', {'grow_noise': 'big'}]]"], "grow_noise must be float"),
    (["--variants=[['x', {'grow_width': 'wide'}]]"], "width must be one of"),  # series.plan_series, before any run
    (["--variants=[['base', {}]]"], "variant name='base'"),
    (["--variants=[['x', {'series_mode': 'scratch'}]]"], "the grid sets those"),
    (["--variants=[['x', {'stages': [{'name': 'a', 'shape': 'cpu-1', 'lr': 0.003}]}]]"], "must be base's members"),
    (["--jobs=0"], "jobs=0"),
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
    # the child runs --only=noise0 on a grid whose base never ran: it fails at once, with one line
    argv = [f"--series={SERIES}", f"--out_dir={tmp_path}", "--jobs=2", "--variants=[['noise0', {'grow_noise': 0.0}]]"]
    cfg = ablate.configure(ablate.AblationConfig, argv)
    entries = ablate.grid(cfg)
    with pytest.raises(ConfigError) as e:
        ablate.run_parallel(cfg, entries[1:], argv, 0.0)
    message = str(e.value)
    assert "variant noise0 failed (exit code 2)" in message and "base is not done" in message
    assert os.path.join(str(tmp_path), "noise0.log") in message and "\n" not in message


TINY = ["--eval_interval=5", "--eval_batches=1", "--log_interval=5", "--batch_size=4", "--seq_len=64", "--warmup_steps=2",
        "--grow_warmup_steps=2", "--plot=false", "--max_data_tokens=400000",
        "--stages=[{'name': 'a', 'shape': 'cpu-1', 'lr': 3e-3}, {'name': 'b', 'shape': 'cpu-2', 'lr': 2.5e-3}]"]


def test_tiny_grid_end_to_end(tmp_path, capsys):
    out, docs = tmp_path / "grid", tmp_path / "docs"
    overrides = TINY + [f"--data_dir={tmp_path / 'data'}"]
    argv = [f"--series={SERIES}", f"--out_dir={out}", f"--docs_dir={docs}", "--tokens_per_param=0.2", f"--overrides={overrides!r}",
            "--variants=[['noise0', {'grow_noise': 0.0}]]"]
    ablate.main(argv)
    results = json.loads((out / "results.json").read_text())
    v = {r["name"]: r for r in results["variants"]}
    assert list(v) == ["base", "noise0"] and v["noise0"]["shares_stage1"]
    # stage 1 is base's run, on disk once: the same inode, hence the same loss
    assert os.path.samefile(out / "noise0" / "grow" / "a" / "final.pt", out / "base" / "grow" / "a" / "final.pt")
    assert v["noise0"]["members"][0]["val_loss"] == v["base"]["members"][0]["val_loss"]
    # the yardstick is base's scratch run of each size; stage 1's twin is base's stage 1 itself
    base = {(r["mode"], r["stage"]): r for r in report.load_series(out / "base")["runs"]}
    for r in v.values():
        assert [m["scratch_loss"] for m in r["members"]] == [base["grow", "a"]["val_loss"], base["scratch", "b"]["val_loss"]]
        assert r["members"][0]["rel"] == 0.0  # base's stage 1, shared
        assert r["all_le_scratch"] == all(m["val_loss"] <= m["scratch_loss"] for m in r["members"])
        assert r["reach"] is None or 0 < r["reach"] <= r["flops_fraction"] + 1e-9
    for folder in (out, docs):
        text = (folder / "ablation.md").read_text()
        assert "| noise0 | grow_noise=0.0 |" in text and "vs scratch)" in text and "Best:" in text
        assert (folder / "ablation.png").stat().st_size > 10_000
    # the budget check: the best entry's largest stage again as a branch from its stage 1, for 95% of the scratch FLOPs
    cfg = ablate.configure(ablate.AblationConfig, argv + ["--budget_check=0.95"])
    forced = {**results, "variants": [{**v["base"], "all_le_scratch": True, "reach": 0.5}]}  # base made "best"
    check = ablate.budget_check(cfg, ablate.grid(cfg), forced)
    top = results["scratch"][-1]
    step_flops = 6 * top["params"] * 4 * 64  # one step of the tiny grid
    assert check["name"] == "base" and abs(check["flops"] - 0.95 * top["flops"]) <= step_flops
    assert check["reached"] == (check["val_loss"] <= top["val_loss"])
    assert (out / "budget_base" / "branch" / "b" / "final.pt").exists()
    # a second fresh run into the finished grid is refused in one line; --resume is how to continue it
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        ablate.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--resume" in err[0]
