"""reproduce.py: the held-out data it builds from the corpus, and the claims its report draws from a grid."""

import json
import os

import pytest

import reproduce

DOCS = [f"doc{i}(x, y) -> int\n\nReturn the {i}th thing of x and y. More text follows here.\nline two of doc {i} is long enough to be an ending"
        for i in range(30)]


def test_split_corpus_holds_out_every_kth_document_once():
    train, held = reproduce.split_corpus(DOCS, 10)
    assert held == [DOCS[0], DOCS[10], DOCS[20]]
    assert sorted(train + held) == sorted(DOCS) and not set(train) & set(held)


def test_documented_function_and_first_sentence():
    assert reproduce.documented_function(DOCS[3]) == ("doc3", "doc3(x, y) -> int", "Return the 3th thing of x and y.")
    assert reproduce.documented_function("Some prose without a signature.\n\nBody text that is long enough.") is None
    assert reproduce.documented_function("f(x)\n\nShort.") is None  # under 15 characters: not an answer
    assert reproduce.first_sentence("A sentence that ends\nacross lines. Then more.") == "A sentence that ends across lines."


def test_continuation_item_is_the_documents_own_next_line():
    doc = "\n".join(f"line {i} " + "x" * 40 for i in range(8))
    context, ending = reproduce.continuation_item(doc)
    assert len(context) >= 150 and context.endswith("\n")
    assert doc.startswith(context + ending)
    assert reproduce.continuation_item("too short\nfor a context") is None


def test_choice_items_gold_is_its_own_answer_among_distinct_others():
    pairs = [(f"context {i}", f"answer {i}") for i in range(12)]
    rows = reproduce.choice_items(pairs, 4, seed=0)
    assert len(rows) == 12
    golds = set()
    for (context, answer), row in zip(pairs, rows):
        assert row["context"] == context and row["choices"][row["gold"]] == answer
        assert len(set(row["choices"])) == 4 and row["choices"].count(answer) == 1
        golds.add(row["gold"])
    assert len(golds) > 1  # the right answer is not always in one place
    assert rows == reproduce.choice_items(pairs, 4, seed=0)  # a pure function of its inputs
    assert reproduce.choice_items(pairs[:3], 4, seed=0) == []  # too few others for 3 distractors


def test_chat_pairs_use_posttrains_schemas():
    functions = [reproduce.documented_function(d) for d in DOCS[:6]]
    sft, dpo = reproduce.chat_pairs(functions, seed=0)
    assert sft[2]["messages"] == [{"role": "user", "content": "What does doc2 do?"},
                                  {"role": "assistant", "content": "Return the 2th thing of x and y."}]
    for row, (_, _, sentence) in zip(dpo, functions):
        assert row["chosen"][-1]["content"] == sentence and row["rejected"][-1]["content"] != sentence
        assert row["chosen"][0] == row["rejected"][0]  # one prompt, two answers


def fake_grid(tmp_path, grown, scratch, fixed_lr):
    """A results record as run_grid returns it, with one validation point per run."""
    def run(mode, index, loss, part):
        metrics = f"{mode}/s{index}/metrics.jsonl"
        os.makedirs(tmp_path / part / mode / f"s{index}", exist_ok=True)
        with open(tmp_path / part / metrics, "w") as f:
            f.write(json.dumps({"step": 1, "tokens": 1, "flops": 1e9 * 2 ** index, "val_loss": loss}) + "\n")
        return {"mode": mode, "stage": f"s{index}", "index": index, "params": 1000 * 2 ** index, "flops": 1e9 * 2 ** (index + 1),
                "val_loss": loss, "ckpt": f"{mode}/s{index}/final.pt", "metrics": metrics, "lr": 1e-3, "unique_token_cap": None}

    series = {"main": {"runs": [run("grow", i, x, "main") for i, x in enumerate(grown)] +
                       [run("scratch", i, x, "main") for i, x in enumerate(scratch) if i > 0]},
              "fixed_lr": {"runs": [run("grow", i, x, "fixed_lr") for i, x in enumerate(fixed_lr)]},
              "tpp20": {"runs": [run("grow", i, x, "tpp20") for i, x in enumerate(grown[:2])] + [run("scratch", 1, scratch[1], "tpp20")]}}
    tasks = {f"{part}/{r['mode']}/{r['stage']}": {t: {"acc": {"value": 0.5, "stderr": 0.05, "n": 100},
                                                      "acc_norm": {"value": 0.5, "stderr": 0.05, "n": 100}}
                                                  for t in ("continuation", "doc_name")}
             for part in ("main", "fixed_lr") for r in series[part]["runs"]}
    post = {f"{mode}/s{i}": {"sft_loss": 2.0, "dpo_loss": 0.6, "dpo_accuracy": 0.6 if mode == "grow" else 0.5, "dpo_margin": 0.1}
            for mode in ("grow", "scratch") for i in range(1, len(grown))}
    return {"series": series, "tasks": tasks, "posttrain": post, "data": {"continuation": 100, "doc_name": 100, "dpo_heldout": 96},
            "times": {"main": 60.0, "total": 100.0}, "run_seconds": 90.0}


def test_report_marks_each_claim_held_or_not(tmp_path):
    cfg = reproduce.ReproduceConfig(out_dir=str(tmp_path), tpp_study=[[20, 2]])
    # grown below scratch at every size; one rate worse; the largest member's fit
    results = fake_grid(tmp_path, grown=[3.0, 2.4, 2.0, 1.7], scratch=[3.0, 2.5, 2.1, 1.75], fixed_lr=[3.1, 2.6, 2.2, 1.8])
    reproduce.write_report(cfg, results, str(tmp_path))
    text = (tmp_path / "reproduction.md").read_text()
    assert "Grown at or below scratch at every size: **held** (3 of 3)" in text
    assert "the per-stage rates are better: **held**" in text
    assert "keep their lead" in text and "(3 of 3)" in text
    assert os.path.getsize(tmp_path / "reproduction_series.png") > 0 and os.path.getsize(tmp_path / "reproduction_tpp.png") > 0
    # grown worse than scratch at the largest size, one rate better: both claims reported as not held
    results = fake_grid(tmp_path, grown=[3.0, 2.4, 2.0, 1.8], scratch=[3.0, 2.5, 2.1, 1.75], fixed_lr=[3.0, 2.3, 1.9, 1.7])
    reproduce.write_report(cfg, results, str(tmp_path))
    text = (tmp_path / "reproduction.md").read_text()
    assert "Grown at or below scratch at every size: **not held** (2 of 3)" in text
    assert "the per-stage rates are better: **not held**" in text


def test_loss_law_prediction_recovers_a_power_law():
    chain = [{"params": n, "val_loss": 0.5 + 40.0 * n ** -0.3} for n in (1e3, 2e3, 4e3, 8e3)]
    pred, err = reproduce.loss_law_prediction(chain, free_E=True)
    assert abs(err) < 1e-6 and pred == pytest.approx(0.5 + 40.0 * 8e3 ** -0.3, rel=1e-6)
    pure = [{"params": n, "val_loss": 40.0 * n ** -0.3} for n in (1e3, 2e3, 4e3)]
    assert abs(reproduce.loss_law_prediction(pure, free_E=False)[1]) < 1e-9


def test_bad_config_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main([f"--out_dir={tmp_path}/x", "--heldout_every=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "heldout_every" in err[0]
