"""Every command line as a new user meets it, in a subprocess: -h/--help answers with the usage and exit 0, and a bad
value, a series resumed under another plan, or a collective that fails under torchrun ends with one `error:` line
and exit code 2, never a traceback (issue 25, "the last tracebacks")."""

import glob
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
from checkpoint import Lineage, make_checkpoint, save_checkpoint  # noqa: E402
from model import Llama, ModelConfig  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CLIS = ["train.py", "series.py", "posttrain.py", "eval.py", "budget.py", "data.py", "hf.py", "grow_cli.py", "judge.py",
        "experiments/reproduce.py", "experiments/ablate.py",
        *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "bench", "bench_*.py")))]


def run(*args, timeout=600):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)


def one_error_line(out, code=2):
    """The command ended with exit code `code` and one `error: ...` line on stderr, no traceback; returns the line."""
    lines = [line for line in out.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert out.returncode == code and lines and lines[-1].startswith("error: "), (out.returncode, out.stderr[-2000:])
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    return lines[-1]


# -----------------------------------------------------------------------------
# -h and --help


# every script run as __main__ with -h, then --help, in one process (one interpreter start, torch imported once), as
# `python SCRIPT -h` runs it: its own folder first on sys.path
HELP_DRIVER = """
import contextlib, io, json, os, runpy, sys
answers = {}
for script in sys.argv[1:]:
    for flag in ("-h", "--help"):
        sys.argv, out, err, code = [script, flag], io.StringIO(), io.StringIO(), 0
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as e:
                code = e.code or 0
            except BaseException as e:
                code, err = 1, io.StringIO("Traceback: " + repr(e))
        sys.path.pop(0)
        answers[f"{script} {flag}"] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def help_answers():
    out = run("-c", HELP_DRIVER, *CLIS)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("script", CLIS)
def test_every_cli_answers_help(script, help_answers):
    for flag in ("-h", "--help"):
        code, stdout, stderr = help_answers[f"{script} {flag}"]
        assert code == 0 and "usage:" in stdout and "Traceback" not in stderr and "error" not in stderr, (flag, code, stdout, stderr)
        if script in ("train.py", "series.py", "posttrain.py", "experiments/reproduce.py", "experiments/ablate.py"):
            assert "  --out" in stdout and "  --resume=False  bool" in stdout, stdout  # its keys, with defaults


def test_help_into_a_closed_pipe_is_quiet():
    # `python train.py --help | head -1`: the reader is gone before the help is written; the command ends without a
    # traceback or an error line (exit 1, as Python advises for a broken pipe)
    for script in ("train.py", "series.py"):
        p = subprocess.Popen([sys.executable, script, "--help"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.close()  # before the child has imported torch, let alone written
        err = p.stderr.read().decode()
        assert p.wait() == 1 and err == "", err


# -----------------------------------------------------------------------------
# bad values: one line, exit 2, before anything is prepared or loaded


def test_an_unknown_shape_is_one_line_before_the_data(tmp_path):
    err = one_error_line(run("train.py", "configs/tiny_cpu.py", "--shape=tiny2", f"--out_dir={tmp_path / 'o'}",
                             f"--data_dir={tmp_path / 'data'}"))
    assert "shape='tiny2'" in err and "cpu-1" in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def ckpt_and_data(tmp_path_factory):
    """A tiny checkpoint, and a prepared folder of text for eval.py's valid task."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=320, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=32))
    ckpt = root / "m.pt"
    save_checkpoint(make_checkpoint(model.state_dict(), model.config, data.get_tokenizer("bytes"), Lineage()), ckpt)
    (root / "src").mkdir()
    for i in range(4):
        (root / "src" / f"{i}.txt").write_text(f"document {i}: " + "some text to score. " * 40)
    data.prepare(str(root / "src"), "bytes", str(root / "prepared"), val_fraction=0.5, num_workers=1)
    return str(ckpt), str(root / "prepared")


@pytest.mark.parametrize("arg,says", [("--batch_size=0", "--batch_size=0: must be an integer >= 1"),
                                      ("--limit=-1", "--limit=-1: must be an integer >= 1"),
                                      ("--pu_r=0", "--pu_r=0: must be an integer >= 1"),
                                      ("--pu_cap=1", "--pu_cap=1: must be an integer >= --pu_r (2)"),
                                      ("--stride=0", "--stride=0: must be an integer >= 1")])
def test_eval_numbers_are_checked_up_front(arg, says, ckpt_and_data):
    ckpt, prepared = ckpt_and_data
    err = one_error_line(run("eval.py", ckpt, "--tasks", "valid", "--data_dir", prepared, "--device", "cpu", arg))
    assert err.startswith(f"error: {says}"), err


# -----------------------------------------------------------------------------
# a series resumed under another plan


SERIES = """
# written for grow_schedule "continue" (one schedule over the series), whatever series.py's default
grow_schedule = "continue"
stages = [dict(name="a", shape="cpu-1", lr=3e-3), dict(name="b", shape="cpu-2", lr=2e-3)]
tokens_per_param = 0.05
series_mode = "grow"
batch_size = 4
seq_len = 64
max_data_tokens = 200_000
warmup_steps = 2
eval_interval = 1000
eval_batches = 1
ckpt_interval = 1000
log_interval = 10
plot = False
report = False
"""


def test_a_series_resumed_under_another_plan_stops_and_says_what_differs(tmp_path):
    config = tmp_path / "tiny_series.py"
    config.write_text(SERIES + f"out_dir = {str(tmp_path / 's')!r}\ndata_dir = {str(tmp_path / 'data')!r}\n")
    out = run("series.py", config)
    assert out.returncode == 0, out.stderr[-2000:]
    record = (tmp_path / "s" / "series.json").read_text()
    finals = {p: os.path.getmtime(p) for p in glob.glob(str(tmp_path / "s" / "grow" / "*" / "final.pt"))}
    # another budget: the finished runs hold 0.05's tokens, so the resume is refused and nothing is rewritten
    err = one_error_line(run("series.py", config, "--resume", "--tokens_per_param=0.1"))
    assert "tokens_per_param 0.05 -> 0.1" in err and "new out_dir" in err, err
    err = one_error_line(run("series.py", config, "--resume", "--grow_noise=0.5", "--stages=" + repr(
        [dict(name="a", shape="cpu-1", lr=3e-3), dict(name="b", shape="cpu-3", lr=2e-3)])))
    assert "grow_noise 0.3 -> 0.5" in err and "stages" in err, err
    assert (tmp_path / "s" / "series.json").read_text() == record
    # a change the resume can honour (how the runs are logged and reported): it goes on, and trains nothing
    out = run("series.py", config, "--resume", "--log_interval=5", "--report=true")
    assert out.returncode == 0 and "===" not in out.stdout, out.stderr[-2000:]
    assert {p: os.path.getmtime(p) for p in finals} == finals
    assert json.loads((tmp_path / "s" / "series.json").read_text())["config"]["tokens_per_param"] == 0.05


# -----------------------------------------------------------------------------
# a collective that fails under torchrun: one line from the rank that is left


RANKS = """
import os, sys, time
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
from common import cli_errors
from parallel import setup_distributed
with cli_errors():
    rank, _, world, _ = setup_distributed("cpu", 3)
    if rank == 1:
        if {killed}:
            os._exit(0)  # gone without a word, as a killed process
        time.sleep(60)  # stuck
    dist.all_reduce(torch.ones(1))
    print("finished")
"""


@pytest.mark.parametrize("killed", [False, True], ids=["stuck", "killed"])
def test_a_failed_collective_is_one_line_naming_rank_timeout_and_resume(tmp_path, killed):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS.format(root=ROOT, killed=killed))
    out = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, timeout=300)
    assert out.returncode != 0 and "finished" not in out.stdout
    # the worker's line; torchrun itself then reports the failed child in its own words
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "[rank0]: Traceback" not in out.stderr and "RuntimeError" not in out.stderr, out.stderr[-3000:]
    assert errors[0].startswith("error: rank 0 ") and "--dist_timeout=3 s" in errors[0] and "--resume" in errors[0], errors
    assert ("lost its connection" if killed else "waited --dist_timeout=3 s") in errors[0], errors
