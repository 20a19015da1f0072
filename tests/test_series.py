"""The staged series (series.py): each stage's budget follows section 2.2, a grown stage starts from
the function of the stage before, checkpoints carry the lineage, and a series killed mid-stage
resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import budget  # noqa: E402
from common import configure  # noqa: E402
from series import SeriesConfig, plan_series  # noqa: E402

SERIES = """
# written for grow_schedule "continue" (one schedule over the series), whatever series.py's default
grow_schedule = "continue"
stages = [dict(name="a", shape="cpu-1", lr=3e-3), dict(name="b", shape="cpu-2", lr=2e-3)]
tokens_per_param = 0.5  # small: every stage still crosses its checkpoints and the fixed-data cap
series_mode = "grow+scratch+fixed_data"
batch_size = 4
seq_len = 64
max_data_tokens = 400_000
warmup_steps = 5
grow_warmup_steps = 3
eval_interval = 40
eval_batches = 2
log_interval = 1
ckpt_interval = 20
plot = False
"""


def write_config(tmp_path, name, data_dir):
    path = tmp_path / f"{name}.py"
    path.write_text(SERIES + f"out_dir = {str(tmp_path / name)!r}\ndata_dir = {data_dir!r}\n")
    return path


def losses(metrics):
    return {r["step"]: r["loss"] for r in map(json.loads, open(metrics)) if "loss" in r}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def test_plan_follows_the_staged_rule(tmp_path, data_dir):
    cfg = configure(SeriesConfig, [str(write_config(tmp_path, "plan", data_dir))])
    plan, cap = plan_series(cfg)
    X = [p.params for p in plan]
    assert X == [100_672, 215_600]  # model.py's counts of cpu-1 and cpu-2
    T1, T2 = round(0.5 * X[0]), round(0.5 * X[1])
    assert plan[0].staged_tokens == T1
    assert plan[1].staged_tokens == (budget.flops(X[1], T2) - budget.flops(X[0], T1)) // (6 * X[1])
    assert cap == T2 and plan[1].repeats_in_fixed_data and not plan[0].repeats_in_fixed_data


def test_series_runs_and_a_killed_series_resumes_exactly(tmp_path, data_dir):
    full = write_config(tmp_path, "full", data_dir)
    subprocess.run([sys.executable, "series.py", str(full)], cwd=ROOT, check=True, capture_output=True)
    series = json.load(open(tmp_path / "full" / "series.json"))
    runs = {(r["mode"], r["stage"]): r for r in series["runs"]}
    assert set(runs) == {("grow", "a"), ("grow", "b"), ("scratch", "b"), ("fixed_data", "b")}
    # the grown model carries the whole series' compute and its lineage
    grown = torch.load(tmp_path / "full" / runs["grow", "b"]["ckpt"], weights_only=False)
    assert grown["flops"] == runs["grow", "a"]["flops"] + 6 * runs["grow", "b"]["params"] * grown["tokens"]
    assert [h["op"] for h in grown["history"]] == ["grow"] and grown["history"][0]["gap"] < 1e-4
    assert grown["stage"]["name"] == "b" and grown["stage"]["mode"] == "grow"
    # the grown stage starts where stage a ended: its first validation equals a's last
    val = lambda run: [r["val_loss"] for r in map(json.loads, open(tmp_path / "full" / run["metrics"])) if "val_loss" in r]
    assert abs(val(runs["grow", "b"])[0] - val(runs["grow", "a"])[-1]) < 1e-4
    # fixed data: same stream as grow until the cap, then repeats: the early losses agree exactly
    g, f = losses(tmp_path / "full" / runs["grow", "b"]["metrics"]), losses(tmp_path / "full" / runs["fixed_data", "b"]["metrics"])
    assert g[1] == f[1] and g != f
    assert (tmp_path / "full" / "report.md").exists() and (tmp_path / "full" / "series.png").exists()

    # the same series, killed (SIGKILL) in the middle of the grown stage b, then resumed
    killed = write_config(tmp_path, "killed", data_dir)
    proc = subprocess.Popen([sys.executable, "series.py", str(killed)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "grow" / "b" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and max(losses(metrics) or [0]) >= 25:  # past the step-20 checkpoint
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the series finished before it could be killed"
    subprocess.run([sys.executable, "series.py", str(killed), "--resume"], cwd=ROOT, check=True, capture_output=True)
    for mode, stage in runs:
        a = losses(tmp_path / "full" / mode / stage / "metrics.jsonl")
        b = losses(tmp_path / "killed" / mode / stage / "metrics.jsonl")
        assert a == b, (mode, stage)  # every loss bit for bit
    resumed = json.load(open(tmp_path / "killed" / "series.json"))
    assert [(r["mode"], r["stage"], r["val_loss"]) for r in resumed["runs"]] == [(r["mode"], r["stage"], r["val_loss"]) for r in series["runs"]]


def test_train_py_refuses_a_series_config_and_series_py_needs_stages():
    # a series config is series.py's: train.py, which would ignore the series keys, refuses it in one line saying so
    out = subprocess.run([sys.executable, "train.py", "configs/series_cpu.py", "--series_mode=grow+bogus"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "series.py" in out.stderr, out.stderr
    # series.py checks the series keys before anything runs: a bad mode is one line
    out = subprocess.run([sys.executable, "series.py", "configs/series_cpu.py", "--series_mode=grow+bogus"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "series_mode 'grow+bogus'" in out.stderr
    out = subprocess.run([sys.executable, "series.py", "configs/tiny_cpu.py"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no stages" in out.stderr


def test_a_stage_sets_its_own_activation_checkpointing(tmp_path, data_dir, monkeypatch):
    # the largest member alone checkpointed (configs/series_paper.py): the plan, every run of that member, and
    # budget.py --memory's marks follow the stage; anything but True or False is one error line
    import series
    path = write_config(tmp_path, "ckpt", data_dir)
    path.write_text(path.read_text() + "stages = [dict(name='a', shape='cpu-1', lr=3e-3), "
                    "dict(name='b', shape='cpu-2', lr=2e-3, activation_checkpointing=True)]\n")
    cfg = configure(SeriesConfig, [str(path)])
    plan, _ = plan_series(cfg)
    assert [stage.activation_checkpointing for stage in plan] == [False, True]

    class Stop(Exception):
        pass

    def fake_train(run_cfg, **kwargs):
        seen.append((run_cfg.shape, run_cfg.activation_checkpointing))
        raise Stop

    monkeypatch.setattr(series, "train", fake_train)
    seen = []
    for stage in plan:
        for mode in ("grow", "scratch"):
            with pytest.raises(Stop):
                series.train_member(cfg, [], mode, stage, 100, 1e-3)
    assert seen == [("cpu-1", False), ("cpu-1", False), ("cpu-2", True), ("cpu-2", True)]
    out = subprocess.run([sys.executable, "budget.py", "--memory", str(path), "--gpus", "1"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    marked = [row.split()[:4] for row in out.stdout.splitlines() if row.split()[4:5] == ["*"]]
    assert [(row[0], row[2], row[3]) for row in marked] == [("a", "ddp", "off"), ("b", "ddp", "on")], out.stdout
    assert "activation_checkpointing a off, b on" in out.stdout
    path.write_text(path.read_text() + "stages = [dict(name='a', shape='cpu-1', lr=3e-3, activation_checkpointing='yes')]\n")
    out = subprocess.run([sys.executable, "series.py", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "stage 1 activation_checkpointing" in out.stderr, out.stderr


def test_the_gpu_check_runs_every_part_on_the_cpu(tmp_path, data_dir, capsys):
    # bench/gpu_check.py, the first command on a GPU, at toy sizes here so that it cannot rot: every part passes, and
    # it writes one JSON and one markdown table; without CUDA and without --device cpu it is one error line
    import gpu_check
    with pytest.raises(SystemExit) as stop:
        gpu_check.main([])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: no CUDA device") and err.count("\n") == 1
    out = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--out_dir", str(tmp_path), "--data_dir", data_dir],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record = json.load(open(tmp_path / "gpu_check.json"))
    parts = {p["part"]: p for p in record["parts"]}
    assert [(p["part"], p["status"]) for p in record["parts"]] == [(name, "pass") for name, _, _ in gpu_check.PARTS], out.stdout
    assert parts["compile"]["detail"]["graph_breaks"] == 0 and parts["compile"]["detail"]["graphs_after_first_step"] == 0
    assert parts["resume"]["detail"]["max_abs_loss_diff"] == 0 and parts["resume"]["detail"]["resumed_steps"] == 30
    assert parts["fsdp"]["detail"]["graphs"] > 0 and parts["series"]["detail"]["stages_finished"] == 3
    assert parts["series"]["detail"]["recompile_limit_hits"] == 0
    for name in ("ddp_1b", "fsdp_1b"):
        detail = parts[name]["detail"]
        assert detail["tokens_per_s"] > 0 and detail["mfu"] > 0 and detail["estimate_gib"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| part | status | seconds | result |" in table and "| setting | tokens/s | MFU | peak allocated | peak reserved |" in table
