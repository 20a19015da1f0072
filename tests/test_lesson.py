"""docs/lesson.md runs as written: its Python blocks, in order, as one script in a fresh process (cwd a temporary
folder, the repository on PYTHONPATH), and every number its "You should see" lines state is checked against the
line the script printed with that label, within the tolerance the lesson gives:

    `label = 2.79 ± 0.05`   |printed - 2.79| <= 0.05 (no ±: exactly equal)
    `label ≈ 1e-14`         the same order of magnitude: within a factor of 10 either way
    `label < 1e-15`         below the bound

The figures the lesson draws land in the temporary folder's docs/; the committed ones are checked to exist."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LESSON = os.path.join(ROOT, "docs", "lesson.md")
NUMBER = r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
STEPS = 8


def lesson_text():
    with open(LESSON, encoding="utf-8") as f:
        return f.read()


def python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def expectations(text):
    """[(step, label, op, value, tolerance, unit)] from every `...` item of the "You should see" paragraphs."""
    out = []
    for step, body in re.findall(r"^## Step (\d+)\.(.*?)(?=^## |\Z)", text, re.S | re.M):
        for para in re.findall(r"\*\*You should see:\*\*(.*?)(?:\n\n|\Z)", body, re.S):
            for item in re.findall(r"`([^`]+)`", para):
                m = re.fullmatch(rf"(.+?) (=|≈|<) ({NUMBER})(?: ± ({NUMBER}))?(%?)", item)
                if not m:
                    raise ValueError(f"step {step}: cannot read the expectation `{item}`: write `label = 2.79 ± 0.05`, "
                                     "`label ≈ 1e-14` or `label < 1e-15`")
                label, op, value, tol, unit = m.groups()
                out.append((int(step), label, op, float(value), float(tol or 0), unit))
    return out


EXPECTED = expectations(lesson_text())


def printed_values(stdout):
    """{label: [(number, unit)]} from the script's `label = number...` lines."""
    values = {}
    for line in stdout.splitlines():
        m = re.match(rf"(.+?) = ({NUMBER})(%?)", line)
        if m:
            values.setdefault(m.group(1), []).append((float(m.group(2)), m.group(3)))
    return values


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The lesson's blocks as one script, run once for the module: (stdout, the temporary folder); its CPU time is
    a figure for BENCHMARKS.md, not an assertion (about 70 s on 2 cores)."""
    folder = tmp_path_factory.mktemp("lesson")
    script = folder / "lesson.py"
    script.write_text("\n\n".join(python_blocks(lesson_text())), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
           "TMPDIR": str(folder)}  # the lesson's prepared data (tempfile.mkdtemp) goes with pytest's temporary folder
    out = subprocess.run([sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, f"the lesson's script failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout, folder


def test_every_step_is_there_in_order_and_ends_with_numbers():
    text = lesson_text()
    steps = [int(n) for n in re.findall(r"^## Step (\d+)\.", text, re.M)]
    assert steps == list(range(1, STEPS + 1))
    assert {step for step, *_ in EXPECTED} == set(steps), "every step states the numbers the student should see"
    labels = [label for _, label, *_ in EXPECTED]
    assert len(labels) == len(set(labels)), "each label is stated once"
    assert len(python_blocks(text)) >= STEPS


@pytest.mark.parametrize("step,label,op,value,tol,unit", EXPECTED, ids=[e[1] for e in EXPECTED])
def test_number(run, step, label, op, value, tol, unit):
    printed = printed_values(run[0]).get(label)
    assert printed is not None, f"step {step}: the lesson states `{label}` but its code never prints `{label} = ...`"
    assert len(printed) == 1, f"step {step}: `{label}` is printed {len(printed)} times"
    got, got_unit = printed[0]
    assert got_unit == unit, f"step {step}: `{label}` printed with unit {got_unit!r}, stated with {unit!r}"
    if op == "=":
        assert abs(got - value) <= tol, f"step {step}: {label} = {got}, the lesson says {value} ± {tol}"
    elif op == "≈":
        assert value / 10 <= got <= value * 10, f"step {step}: {label} = {got:.2e}, the lesson says about {value:.0e}"
    else:
        assert got < value, f"step {step}: {label} = {got:.2e}, the lesson says below {value:.0e}"


def test_figures(run):
    """The lesson draws every figure it shows, and the committed copies exist (docs/lesson_*.png)."""
    shown = re.findall(r"!\[[^\]]*\]\((lesson_[^)]+\.png)\)", lesson_text())
    assert shown
    for name in shown:
        drawn = run[1] / "docs" / name
        assert drawn.is_file() and drawn.stat().st_size > 10_000, f"the lesson did not draw docs/{name}"
        assert os.path.isfile(os.path.join(ROOT, "docs", name)), f"docs/{name} is not committed"

