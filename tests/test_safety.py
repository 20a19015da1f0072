"""What a user can rely on (README, "What nanogrow guarantees"): a diverging run never steps on or saves a
non-finite state, corrupt checkpoint bytes are caught by the checksum and skipped, loading never runs
code from the file, a relaunch never deletes another run's checkpoints, two live runs cannot share a
folder, and every bad value or file is one error line with exit code 2."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from checkpoint import (CheckpointError, RunLock, checkpoint_paths, claim_grid, claim_out_dir, latest_checkpoint,  # noqa: E402
                        load_checkpoint, make_checkpoint, payload_digest, prune_checkpoints, save_checkpoint, Lineage)
from common import DivergenceError, DivergenceGuard, read_jsonl  # noqa: E402
from model import Llama, ModelConfig  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def args(out_dir, data_dir, **overrides):
    base = dict(shape="cpu-1", data_dir=data_dir, max_data_tokens=200_000, batch_size=4, seq_len=64, max_steps=10,
                lr=3e-3, warmup_steps=2, eval_interval=1000, eval_batches=1, ckpt_interval=5, log_interval=5,
                keep_last=0, plot=False, out_dir=str(out_dir))
    base.update(overrides)
    return [f"--{k}={v}" for k, v in base.items()]


def run_main(argv, capsys):
    """train.main in this process: (exit code, stderr)."""
    capsys.readouterr()
    try:
        train.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip()


def one_error_line(err):
    """The run ends with exactly one line `error: ...` (progress bars may come before it), no traceback."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    return bool(lines) and lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1 \
        and "Traceback" not in err


def strict_json_lines(path):
    """Every line parses as JSON without NaN or Infinity (Python's json accepts those by default)."""
    def refuse(name):
        raise ValueError(f"bare {name} in {path}")
    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f if line.strip()]


def all_finite(ckpt):
    return all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def file_bytes(paths):
    return {p: open(p, "rb").read() for p in paths}


# -----------------------------------------------------------------------------
# 1. divergence


def test_divergence_stops_before_stepping_and_keeps_the_good_checkpoints(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert run_main(args(out, data_dir), capsys)[0] == 0
    good = file_bytes(checkpoint_paths(out))
    # resume at an absurd learning rate: the loss goes non-finite, the run stops with one line naming the
    # step and the last good checkpoint, and nothing it saved (if anything) holds a NaN
    code, err = run_main(args(out, data_dir, lr=1e3, max_steps=60, grad_clip=0.0, resume=True, keep_last=2), capsys)
    assert code == 2 and one_error_line(err), err
    assert "not finite" in err and "the last good checkpoint is " in err
    named = err.split("the last good checkpoint is ")[1].split(";")[0]
    assert os.path.exists(named) and all_finite(load_checkpoint(named))
    resumed_from = os.path.join(out, "ckpt_0000010.pt")
    assert open(resumed_from, "rb").read() == good[resumed_from]  # what the run resumed from is untouched
    for path in checkpoint_paths(out):  # and nothing it saved holds a NaN
        assert all_finite(load_checkpoint(path))
    strict_json_lines(out / "metrics.jsonl")


def test_skip_policy_drops_updates_then_stops(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    code, err = run_main(args(out, data_dir, lr=1e3, max_steps=60, grad_clip=0.0, divergence="skip", max_skips=3), capsys)
    assert code == 2 and one_error_line(err) and "after 3 skipped updates" in err, err
    rows = strict_json_lines(out / "metrics.jsonl")
    assert [r["event"] for r in rows if "event" in r].count("skip") == 3
    # the non-finite figure is written as null, not as a bare NaN that JSON parsers refuse
    assert all(r["loss"] is None or r["grad_norm"] is None for r in rows if r.get("event") == "skip")
    for path in checkpoint_paths(out):
        assert all_finite(load_checkpoint(path))


def test_guard_verdicts_and_state():
    logged = []
    guard = DivergenceGuard(policy="skip", max_skips=2, spike_factor=2.0, window=20)
    assert [guard.check(s, 1.0, 0.5, None, logged.append) for s in range(1, 21)] == ["step"] * 20
    assert guard.check(21, 2.5, 0.5, None, logged.append) == "spike" and "spike" in logged[-1]
    assert guard.check(22, float("nan"), 0.5, None, logged.append) == "skip"
    assert guard.check(23, 1.0, float("inf"), None, logged.append) == "skip"
    with pytest.raises(DivergenceError, match="step 24: .*not finite after 2 skipped updates.*ckpt_9"):
        guard.check(24, float("nan"), float("nan"), "ckpt_9", logged.append)
    restored = DivergenceGuard(policy="skip", max_skips=2, spike_factor=2.0, window=20)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict() and restored.skipped == 2
    with pytest.raises(DivergenceError):  # policy stop: the first non-finite step ends the run
        DivergenceGuard().check(1, 1.0, float("nan"), None, logged.append)


def test_non_finite_weights_are_never_saved(tmp_path):
    model = Llama(ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32, vocab_size=64, max_seq_len=16))
    state = model.state_dict()
    state["layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="up_proj.*NaN or inf"):
        save_checkpoint(make_checkpoint(state, model.config, {"name": "bytes", "vocab_size": 64}, Lineage()), tmp_path / "x.pt")
    assert not os.listdir(tmp_path)


# -----------------------------------------------------------------------------
# 2. corruption inside a checkpoint's tensor data


def test_checksum_catches_changed_bytes_and_resume_takes_the_previous(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert run_main(args(out, data_dir, max_steps=15), capsys)[0] == 0
    paths = checkpoint_paths(out)
    assert [os.path.basename(p) for p in paths] == ["ckpt_0000005.pt", "ckpt_0000010.pt", "ckpt_0000015.pt"]
    newest = paths[-1]
    size = os.path.getsize(newest)
    with open(newest, "r+b") as f:  # 4 KiB of garbage in the middle: tensor bytes, not the zip's index
        f.seek(size // 2)
        f.write(os.urandom(4096))
    with pytest.raises(CheckpointError, match="checksum|corrupt"):
        load_checkpoint(newest)
    warnings = []
    path, _ = latest_checkpoint(out, None, warnings.append)
    assert path == paths[1] and newest in warnings[0]
    # pruning to one keeps the corrupt file (for inspection) and the last one that verifies
    prune_checkpoints(out, 1, log=warnings.append)
    assert checkpoint_paths(out) == paths[1:]
    # and a resumed run continues from the good one, not the corrupt one
    code, err = run_main(args(out, data_dir, max_steps=20, resume=True), capsys)
    assert code == 0, err
    ckpt = load_checkpoint(os.path.join(out, "final.pt"))
    assert ckpt["step"] == 20 and all_finite(ckpt)


def test_digest_covers_every_value():
    a = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 3, "val": {"val_loss": 1.25}, "rng": [1, (2, 3)]}
    b = {"model": {"w": torch.arange(6.0).reshape(3, 2)}, "step": 3, "val": {"val_loss": 1.25}, "rng": [1, (2, 3)]}
    c = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 3, "val": {"val_loss": 1.2500001}, "rng": [1, (2, 3)]}
    d = {"model": {"w": torch.arange(6.0).reshape(2, 3).to(torch.bfloat16)}, "step": 3, "val": {"val_loss": 1.25}, "rng": [1, (2, 3)]}
    digests = {payload_digest(x) for x in (a, b, c, d)}
    assert len(digests) == 4 and payload_digest(a) == payload_digest(dict(a))


def test_a_file_that_is_not_a_checkpoint_says_what_it_is(tmp_path):
    # an empty file, a saved web page, a Git LFS pointer, other text: each named, with what to do (not torch's words
    # about mmap or weights_only); a checkpoint in torch's legacy (pre-zip) format loads, memory-mapped or not
    cases = {"empty.pt": (b"", "is empty (0 bytes)"),
             "page.pt": (b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head>", "an HTML page"),
             "lfs.pt": (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 1048576\n", "git lfs pull"),
             "notes.pt": ("a text file, not a model – été\n".encode(), "a text file (it begins 'a text file, not a model")}
    for name, (raw, says) in cases.items():
        (tmp_path / name).write_bytes(raw)
        for mmap in (False, True):
            with pytest.raises(CheckpointError) as e:
                load_checkpoint(tmp_path / name, mmap=mmap)
            assert f"{tmp_path / name} is not a checkpoint: it is " in str(e.value) and says in str(e.value), str(e.value)
            assert "mmap" not in str(e.value) and "tampered" not in str(e.value)
    model = Llama(ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32, vocab_size=64, max_seq_len=16))
    ckpt = make_checkpoint(model.state_dict(), model.config, {"name": "bytes", "vocab_size": 64}, Lineage(), step=3)
    torch.save(ckpt, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for mmap in (False, True):
        assert load_checkpoint(tmp_path / "legacy.pt", mmap=mmap)["step"] == 3
    # through a command: one line, exit 2
    p = subprocess.run([sys.executable, "eval.py", str(tmp_path / "page.pt"), "--tasks", "valid"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and one_error_line(p.stderr) and "an HTML page" in p.stderr, p.stderr


# -----------------------------------------------------------------------------
# 3. loading never runs code from the file


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a crafted pickle does: call a function of the attacker's choice on load
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker), "model_config": {}, "tokenizer": {"name": "bytes", "vocab_size": 320}}, evil)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(evil)
    for cli in (["grow_cli.py", str(evil), "--to", "cpu-2", "--out", str(tmp_path / "g.pt")], ["eval.py", str(evil), "--tasks", "valid"],
                ["posttrain.py", "chat", str(evil)]):
        p = subprocess.run([sys.executable, *cli], cwd=ROOT, capture_output=True, text=True, input="", timeout=300)
        assert p.returncode == 2 and "Traceback" not in p.stderr, (cli, p.stderr)
    assert not marker.exists()


# -----------------------------------------------------------------------------
# 4. the out_dir: relaunch, overwrite, lock, resume


def test_relaunch_without_resume_is_refused_and_overwrite_is_explicit(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert run_main(args(out, data_dir, max_steps=5), capsys)[0] == 0
    before = file_bytes(checkpoint_paths(out) + [os.path.join(out, "final.pt")])
    code, err = run_main(args(out, data_dir, max_steps=5), capsys)
    assert code == 2 and one_error_line(err) and "--resume" in err and "--overwrite" in err, err
    assert file_bytes(list(before)) == before
    # a changed shape (or another run's file) is never adopted by --resume
    code, err = run_main(args(out, data_dir, max_steps=10, shape="cpu-2", resume=True), capsys)
    assert code == 2 and one_error_line(err) and "another model" in err, err
    # a kill mid-save leaves a temporary file: the next run of the folder removes it, and nothing of the user's
    stale = os.path.join(out, "ckpt_0000010.pt.tmp.99999")
    open(stale, "wb").write(b"partial")
    (out / "notes.tmp.txt").write_text("keep")
    (out / "build.tmp").mkdir()  # a folder named like a temporary: no run refuses the out_dir for it
    assert run_main(args(out, data_dir, max_steps=5, overwrite=True, seed=7), capsys)[0] == 0
    assert not os.path.exists(stale)
    assert (out / "notes.tmp.txt").read_text() == "keep" and (out / "build.tmp").is_dir()
    assert load_checkpoint(os.path.join(out, "final.pt"))["train_config"]["seed"] == 7


def test_only_the_projects_own_temporaries_are_swept(tmp_path):
    ours = ["ckpt_0000010.pt.tmp.4242", "final.pt.tmp.17", "final.pt.tmp", "metrics.jsonl.tmp", "series.json.tmp"]
    users = ["notes.tmp.txt", "a.tmp", "ckpt_0000010.pt.tmp.backup", "data.tmp.1", "metrics.jsonl.tmp.old", "tmp"]
    for name in ours + users:
        (tmp_path / name).write_text("x")
    (tmp_path / "build.tmp").mkdir()
    (tmp_path / "final.pt.tmp.99").mkdir()  # a folder is never a writer's temporary
    os.symlink(tmp_path / "notes.tmp.txt", tmp_path / "final.pt.tmp.55")  # nor a link (it may point anywhere)
    claim_out_dir(str(tmp_path), resume=True, overwrite=False).release()
    left = set(os.listdir(tmp_path))
    assert not left & set(ours), left & set(ours)
    assert set(users) | {"build.tmp", "final.pt.tmp.99", "final.pt.tmp.55", "run.lock"} == left


def test_an_out_dir_that_is_a_file_says_so(tmp_path, data_dir, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("a file of the user's")
    for out_dir, says in ((blocker, f"out_dir {blocker} is a file"), (blocker / "run", f"{blocker}, a folder above out_dir")):
        code, err = run_main(args(out_dir, data_dir, max_steps=5), capsys)
        assert code == 2 and one_error_line(err) and says in err and "move the file" in err and "free space" not in err, err
    assert blocker.read_text() == "a file of the user's"


def test_resume_says_what_it_does_with_a_lost_log_and_a_changed_lr(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert run_main(args(out, data_dir, max_steps=5), capsys)[0] == 0
    os.remove(out / "metrics.jsonl")
    capsys.readouterr()
    train.main(args(out, data_dir, max_steps=10, lr=6e-3, resume=True))
    said = capsys.readouterr().out.splitlines()
    lost = [line for line in said if "metrics.jsonl" in line and line.startswith("warning:")]
    assert len(lost) == 1 and "rows of steps 0 to 5 are lost" in lost[0], said
    changed = [line for line in said if line.startswith("note: --resume with")]
    assert len(changed) == 1 and "lr 0.003 -> 0.006" in changed[0] and "max_steps 5 -> 10" in changed[0], said
    assert "the remaining steps use the new values" in changed[0]
    assert min(r["step"] for r in strict_json_lines(out / "metrics.jsonl")) > 5  # the rows after the checkpoint


def test_resume_with_nothing_saved_yet_starts_fresh(tmp_path, data_dir, capsys):
    out = tmp_path / "new"
    code, err = run_main(args(out, data_dir, max_steps=5, resume=True), capsys)
    assert code == 0, err
    assert load_checkpoint(os.path.join(out, "final.pt"))["step"] == 5


def test_a_second_live_run_cannot_take_the_folder(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from checkpoint import RunLock; "
                               f"lock = RunLock({str(out)!r}); print('locked', flush=True); time.sleep(120)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = run_main(args(out, data_dir, max_steps=5), capsys)
        assert code == 2 and one_error_line(err) and "in use by a live run" in err and str(holder.pid) in err, err
    finally:
        holder.kill()
        holder.wait()
    RunLock(out).release()  # a dead run's lock goes with its process: the folder is free again


def test_a_grid_is_never_deleted_while_it_runs(tmp_path):
    # reproduce.py and ablate.py claim their folder with claim_grid: the lock first, so --overwrite cannot delete a
    # live grid; a fresh start into a folder that holds one is refused; --overwrite empties a dead one
    out = tmp_path / "grid"
    (out / "main").mkdir(parents=True)
    (out / "main" / "final.pt").write_text("a finished run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from checkpoint import RunLock; "
                               f"lock = RunLock({str(out)!r}); print('locked', flush=True); time.sleep(120)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match="in use by a live run"):
            claim_grid(str(out), resume=False, overwrite=True)
        assert (out / "main" / "final.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(CheckpointError, match="already holds a grid .main."):
        claim_grid(str(out), resume=False, overwrite=False)
    claim_grid(str(out), resume=True, overwrite=False).release()
    assert (out / "main" / "final.pt").exists()
    claim_grid(str(out), resume=False, overwrite=True).release()
    assert os.listdir(out) == ["run.lock"]


def test_a_line_cut_short_in_metrics_is_dropped_on_resume(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert run_main(args(out, data_dir, max_steps=5), capsys)[0] == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a kill in the middle of a write
    code, err = run_main(args(out, data_dir, max_steps=10, resume=True), capsys)
    assert code == 0, err
    assert max(r["step"] for r in strict_json_lines(out / "metrics.jsonl")) == 10
    with open(out / "metrics.jsonl", "a") as f:
        f.write("not json\n{}\n")
    with pytest.raises(Exception, match=r"line \d+ is not JSON"):
        read_jsonl(out / "metrics.jsonl")


# -----------------------------------------------------------------------------
# 5. every bad value or file: one line, exit 2


BAD_VALUES = [("batch_size", 0), ("batch_size", -4), ("lr", -1e-3), ("lr", 0.0), ("lr", "nan"), ("grad_accum", 0),
              ("max_steps", 0), ("eval_interval", 0), ("log_interval", 0), ("ckpt_interval", 0), ("seq_len", 0),
              ("warmup_steps", -1), ("schedule", "cosin"), ("beta2", 1.0), ("min_lr_ratio", 2.0), ("weight_decay", -0.1),
              ("grad_clip", -1.0), ("keep_last", -1), ("dtype", "fp8"), ("compile", "yes"), ("tokenizer", "llama"),
              ("divergence", "ignore"), ("spike_factor", 0.5), ("decay_frac", 0.0), ("data", []), ("max_tokens", -5)]


@pytest.mark.parametrize("key,value", BAD_VALUES)
def test_bad_values_are_one_line(key, value, tmp_path, capsys):
    code, err = run_main([f"--{key}={value}", f"--out_dir={tmp_path / 'run'}"], capsys)
    assert code == 2 and one_error_line(err) and key in err, err
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    code, err = run_main(["--device=cuda", f"--out_dir={tmp_path}"], capsys)
    assert code == 2 and one_error_line(err) and "no GPU" in err, err


def test_bad_files_are_one_line(tmp_path, data_dir, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = run_main(args(blocker / "run", data_dir, max_steps=5), capsys)  # out_dir under a file: unwritable
    assert code == 2 and one_error_line(err), err
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    broken = tmp_path / "docs.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "cut\n')
    for src, says in ((binary, "not UTF-8 text"), (broken, "line 2 is not valid JSON")):
        code, err = run_main(args(tmp_path / "r", str(tmp_path / "cache"), max_steps=5, data=f"['{src}']"), capsys)
        assert code == 2 and one_error_line(err) and says in err, err


def test_a_series_is_not_restarted_over_an_old_one(tmp_path, capsys):
    import series
    out = tmp_path / "series"
    out.mkdir()
    (out / "series.json").write_text('{"runs": []}')
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        series.main(["configs/series_cpu.py", f"--out_dir={out}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and one_error_line(err) and "--resume" in err, err
    assert (out / "series.json").read_text() == '{"runs": []}'
    with pytest.raises(SystemExit) as e:  # the series' own values are range-checked too
        series.main(["configs/series_cpu.py", f"--out_dir={tmp_path / 'other'}", "--grow_noise=inf"])
    assert e.value.code == 2 and "grow_noise" in capsys.readouterr().err


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, data_dir, capsys, monkeypatch):
    out = tmp_path / "run"
    saves, real_save = [], torch.save

    def filling_disk(obj, f, *a, **k):  # the second checkpoint finds the disk full, as torch's zip writer reports it
        saves.append(1)
        if len(saves) >= 2:
            f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", filling_disk)
    code, err = run_main(args(out, data_dir, max_steps=10), capsys)
    assert code == 2 and one_error_line(err) and "disk full" in err, err
    monkeypatch.undo()
    assert [os.path.basename(p) for p in os.listdir(out) if p.startswith("ckpt_")] == ["ckpt_0000005.pt"]  # no temporary left
    assert load_checkpoint(os.path.join(out, "ckpt_0000005.pt"))["step"] == 5


def test_a_checkpoint_from_before_the_checksums_still_resumes(tmp_path, data_dir, capsys):
    # older nanogrow wrote numpy's RNG state as an array and no checksum: such a run must still resume
    out = tmp_path / "run"
    assert run_main(args(out, data_dir, max_steps=10, keep_last=1), capsys)[0] == 0
    path = checkpoint_paths(out)[-1]
    old = load_checkpoint(path)
    kind, keys, pos, has_gauss, cached = old["rng"]["numpy"]
    old["rng"]["numpy"] = (kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached)
    torch.save(old, path)  # as the old save did: no "checksum" key
    assert load_checkpoint(path)["step"] == 10
    code, err = run_main(args(out, data_dir, max_steps=15, keep_last=1, resume=True), capsys)
    assert code == 0, err
    assert load_checkpoint(os.path.join(out, "final.pt"))["step"] == 15
