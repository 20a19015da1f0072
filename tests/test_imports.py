"""The project's imports run one way, as docs/design.md draws them: the closed forms and the kernels at the
bottom, the model on them, growth on the model, training, the series on top, and the commands and
folders (eval, post-training, the experiment drivers, the benchmarks) above the spine. Parsed, not run:
a module may import only modules below it in LAYERS, and only at its top level (an import inside a
function hides a circle until the call)."""

import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# bottom to top: a module imports only modules that come before it
LAYERS = [
    "ops", "budget",                      # FLOPs, budgets, named shapes; the hand-written backward passes
    "common",                             # errors, configuration, schedule, AdamW, RNG, metrics
    "data", "report",                     # tokenizers and token arrays; the series report
    "model",                              # the Llama
    "checkpoint",                         # the checkpoint file, and a model built from one
    "hf",                                 # transformers import and export
    "grow", "grow_cli",                   # the expansion operators; their command line
    "parallel",                           # DDP, FSDP2, activation checkpointing, torch.compile
    "train",                              # one pretraining run
    "series_plan",                        # the series' plan check, record and logs
    "series",                             # the staged series
    "eval", "chat_data", "posttrain", "judge",
    "reproduce", "ablate",                # experiments/
    "bench_checkpoint", "bench_eval", "bench_gpu", "bench_grow", "bench_moe", "bench_train", "gpu_check",  # bench/
]


def project_files():
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py")) \
        + glob.glob(os.path.join(ROOT, "experiments", "*.py"))
    return {os.path.splitext(os.path.basename(f))[0]: f for f in files}


def project_imports(path, modules):
    """(imported project module, line, at module level?) for every import statement in the file."""
    tree = ast.parse(open(path).read(), path)
    top = set()
    for node in tree.body:  # module level: plain statements, and those under a top-level if/try
        top.add(node)
        if isinstance(node, (ast.If, ast.Try)):
            top.update(ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        else:
            continue
        found += [(name, node.lineno, node in top) for name in names if name in modules]
    return found


def test_every_module_has_a_place_in_the_layers():
    missing = sorted(set(project_files()) - set(LAYERS))
    assert not missing, f"place {missing} in tests/test_imports.py's LAYERS (and docs/design.md's drawing)"


@pytest.mark.parametrize("name", LAYERS)
def test_imports_go_down_only_and_at_the_top(name):
    files = project_files()
    if name not in files:
        pytest.skip(f"{name}.py does not exist")
    below = set(LAYERS[:LAYERS.index(name)])
    for imported, line, at_top in project_imports(files[name], set(files)):
        assert at_top, f"{name}.py:{line} imports {imported} inside a function: import it at the top, or move the code"
        assert imported in below, f"{name}.py:{line} imports {imported}, which is not below it: a circle or an upward import"


def test_the_parser_sees_a_circle_and_an_import_in_a_function(tmp_path):
    # the checker itself: an upward import and one hidden in a function are both found
    (tmp_path / "a.py").write_text("import b\n\ndef f():\n    from c import x\n")
    found = project_imports(str(tmp_path / "a.py"), {"b", "c"})
    assert found == [("b", 1, True), ("c", 4, False)]
