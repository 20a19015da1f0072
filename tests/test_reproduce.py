"""reproduce.py: the held-out data it builds from the corpus, the statistics its verdicts read (against closed forms),
series.py's wsd schedule (every member finished, the cooldowns paid), and a tiny grid end to end."""

import json
import math
import os
import statistics

import pytest
import torch

import reproduce
import series
from checkpoint import load_checkpoint
from common import configure

pytestmark = pytest.mark.usefixtures("one_thread")

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


def test_chat_pairs_use_posttrains_schemas_and_reject_a_corrupted_copy():
    functions = [reproduce.documented_function(d) for d in DOCS[:6]]
    sft, dpo = reproduce.chat_pairs(functions, seed=0)
    assert sft[2]["messages"] == [{"role": "user", "content": "What does doc2 do?"},
                                  {"role": "assistant", "content": "Return the 2th thing of x and y."}]
    for row, (_, _, sentence) in zip(dpo, functions):
        assert row["chosen"][-1]["content"] == sentence and row["rejected"][-1]["content"] != sentence
        assert row["chosen"][0] == row["rejected"][0]  # one prompt, two answers
        assert sorted(row["rejected"][-1]["content"].split()) == sorted(sentence.split())  # the same words, swapped
    assert (sft, dpo) == reproduce.chat_pairs(functions, seed=0)
    rng = reproduce.random.Random(0)
    assert reproduce.corrupt("two words", rng) == "words two"  # two swaps would give it back: a third
    assert reproduce.corrupt("same same same", rng) is None


# -----------------------------------------------------------------------------
# the statistics, against closed forms and tables


def test_t_quantile_matches_closed_forms_and_tables():
    p = 0.95
    assert reproduce.t_quantile(p, 1) == pytest.approx(math.tan(p * math.pi / 2), rel=1e-12)  # Cauchy
    assert reproduce.t_quantile(p, 2) == pytest.approx(p * math.sqrt(2 / (1 - p * p)), rel=1e-12)  # t / sqrt(2 + t^2) = p
    # Student's t two-sided 95% points (the 0.975 quantiles)
    for df, t in ((3, 3.182446305284263), (4, 2.7764451051977987), (9, 2.2621571627409915), (29, 2.045229642132703)):
        assert reproduce.t_quantile(p, df) == pytest.approx(t, rel=1e-10), df
    assert reproduce.t_quantile(0.95, 2000) == pytest.approx(1.959963984540054, rel=1e-3)  # toward the normal's
    for df in (1, 2, 5, 6):  # the central probability of the quantile is the level
        assert reproduce.t_central(reproduce.t_quantile(0.9, df), df) == pytest.approx(0.9, abs=1e-12)


def test_paired_interval_against_a_float64_recomputation():
    grown = {1337: 2.101, 7: 2.093, 42: 2.110}
    scratch = {1337: 2.120, 7: 2.118, 42: 2.121, 99: 2.5}  # seed 99 has no pair: left out
    d = reproduce.paired(grown, scratch)
    diffs = [grown[s] - scratch[s] for s in (7, 42, 1337)]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    t = 0.95 * math.sqrt(2 / (1 - 0.95 ** 2))  # df = 2 in closed form
    assert d["n"] == 3 and d["mean"] == pytest.approx(mean, abs=1e-15) and d["sd"] == pytest.approx(sd, rel=1e-12)
    assert d["lo"] == pytest.approx(mean - t * sd / math.sqrt(3), rel=1e-12)
    assert d["hi"] == pytest.approx(mean + t * sd / math.sqrt(3), rel=1e-12)
    one = reproduce.paired({1: 1.0}, {1: 2.0})
    assert one["mean"] == -1.0 and math.isnan(one["lo"]) and reproduce.verdict(one) == "inconclusive"
    assert reproduce.mean_sd([1.0, 2.0, 3.0, 4.0]) == (2.5, statistics.stdev([1.0, 2.0, 3.0, 4.0]))


def test_verdicts_on_constructed_intervals():
    interval = lambda lo, hi: {"n": 3, "mean": (lo + hi) / 2, "sd": 1.0, "lo": lo, "hi": hi}
    assert reproduce.verdict(interval(-0.3, -0.1)) == "held"  # grown below scratch, the whole interval
    assert reproduce.verdict(interval(0.1, 0.3)) == "not held"
    assert reproduce.verdict(interval(-0.1, 0.1)) == "inconclusive"  # straddles the bound
    assert reproduce.verdict(interval(0.1, 0.3), claim="above") == "held"
    assert reproduce.verdict(interval(-0.3, -0.1), claim="above") == "not held"
    assert reproduce.verdict(interval(0.005, 0.008), bound=0.01) == "held"  # within a 1% bound
    assert reproduce.verdict(interval(0.005, 0.012), bound=0.01) == "inconclusive"
    assert reproduce.verdict(interval(0.1, 0.3), measurable=False) == "not measurable at this scale"
    assert reproduce.overall(["held", "held"]) == "held"
    assert reproduce.overall(["held", "inconclusive"]) == "inconclusive"
    assert reproduce.overall(["held", "not held", "inconclusive"]) == "not held"
    assert reproduce.overall(["not measurable at this scale"] * 2) == "not measurable at this scale"
    assert reproduce.near_chance(0.27, 0.02, 0.25) and not reproduce.near_chance(0.30, 0.02, 0.25)


def fake_results(tmp_path, grown, scratch, task_acc):
    """A results record as run_grid returns it, 3 seeds x 3 sizes: grown[i] and scratch[i] are each size's loss,
    a seed adds a small shift; every model has task accuracy task_acc."""
    arms, post, tasks = {}, {}, {}
    for k, seed in enumerate((1337, 7, 42)):
        recipes = arms.setdefault(str(seed), {})
        for recipe in reproduce.RECIPES:
            def arm(name, losses):
                out = {}
                for i, loss in enumerate(losses):
                    key = f"s{seed}/{recipe}/{name}/m{i}"
                    metrics = f"s{seed}/{recipe}/{name}/m{i}.jsonl"
                    out[i] = {"key": key, "stage": f"m{i}", "index": i, "params": 1000 * 2 ** i, "val_loss": loss + 0.001 * k,
                              "flops": 1e9 * 4 ** i, "series_flops": 1e9 * 4 ** i, "tokens": 1, "lr": 1e-3, "finished": True,
                              "schedule": "cosine", "unique_token_cap": None, "metrics": metrics, "passes": 0.5}
                    post[key] = {"sft_loss": 1.0 + loss, "dpo_accuracy": 0.9 if name == "grow" else 0.8, "dpo_margin": 0.1, "dpo_loss": 0.5}
                    tasks[key] = {t: {"acc": {"value": task_acc, "stderr": 0.05, "n": 100},
                                      "acc_norm": {"value": task_acc + 0.001 * k, "stderr": 0.05, "n": 100}} for t in ("continuation", "doc_name")}
                return out
            recipes[recipe] = {"grow": arm("grow", grown), "scratch": arm("scratch", scratch), "scratch_top": arm("scratch_top", scratch),
                               "fixed_data": {2: arm("fixed_data", grown)[2]}}
            if recipe == "paper":
                recipes[recipe]["one_rate"] = arm("one_rate", [x + 0.05 for x in grown])
    cfg = reproduce.ReproduceConfig(out_dir=str(tmp_path))
    return cfg, {"config": reproduce.asdict(cfg), "arms": arms, "posttrain": post, "tasks": tasks, "run_seconds": 60.0,
                 "data": {"continuation": 100, "doc_name": 100, "sft_heldout": 100, "dpo_heldout": 100}}


def test_report_reads_each_claim_over_the_seeds(tmp_path):
    cfg, results = fake_results(tmp_path, grown=[3.0, 2.4, 2.0], scratch=[3.0, 2.5, 2.1], task_acc=0.26)
    reproduce.write_report(cfg, results, str(tmp_path))
    text = (tmp_path / "reproduction.md").read_text()
    # grown 0.1 below scratch in every seed: the interval is a point below 0
    assert "| Table 1: grown members at or below scratch (the paper's recipe, the paper's comparison) | **held** |" in text
    assert "| m2 | 2.0010 ± 0.0010 | 2.1010 ± 0.0010 | -0.1000 [-0.1000, -0.1000] (-4.8%) | held |" in text
    assert "| Table 4: one rate for every stage is worse (largest member) | **held** |" in text
    assert "Section 3.3: fixed data within 1% of fresh (the paper's recipe) | **held** |" in text
    assert "| Table 2: DPO reward accuracy (nanogrow's recipe, equal rates) | **held** |" in text
    # every model at 26% +- 5% on 4 choices: within two standard errors of chance
    assert "| Downstream accuracy (the paper's recipe, equal rates) | **not measurable at this scale** |" in text
    assert "| grow_depth | stack_top | zero | section 2.2" in text and "nanogrow's choice (the paper states none)" in text
    assert (tmp_path / "reproduction_series.png").stat().st_size > 10_000 and (tmp_path / "reproduction_diff.png").stat().st_size > 10_000
    # grown above scratch at the largest size: not held; a noisy difference: inconclusive
    cfg, results = fake_results(tmp_path, grown=[3.0, 2.4, 2.2], scratch=[3.0, 2.5, 2.1], task_acc=0.6)
    results["arms"]["7"]["paper"]["grow"][1]["val_loss"] = 2.7  # one seed's grown 24K far above: the interval straddles 0
    reproduce.write_report(cfg, results, str(tmp_path))
    text = (tmp_path / "reproduction.md").read_text()
    assert "| Table 1: grown members at or below scratch (the paper's recipe, equal rates) | **not held** |" in text
    assert "| m1 | 2.5007 ± 0.1726 | 2.5010 ± 0.0010 | -0.0003 [-0.4292, +0.4285] (-0.0%) | inconclusive |" in text
    assert "| Downstream accuracy (the paper's recipe, equal rates) | **inconclusive** |" in text  # 60%: measurable, equal


def test_loss_law_prediction_recovers_a_power_law():
    chain = [{"params": n, "val_loss": 0.5 + 40.0 * n ** -0.3} for n in (1e3, 2e3, 4e3, 8e3)]
    pred, err = reproduce.loss_law_prediction(chain, free_E=True)
    assert abs(err) < 1e-6 and pred == pytest.approx(0.5 + 40.0 * 8e3 ** -0.3, rel=1e-6)
    pure = [{"params": n, "val_loss": 40.0 * n ** -0.3} for n in (1e3, 2e3, 4e3)]
    assert abs(reproduce.loss_law_prediction(pure, free_E=False)[1]) < 1e-9


def test_bad_config_is_one_line(tmp_path, capsys):
    for arg, key in (("--heldout_every=1", "heldout_every"), ("--seeds=[7, 7]", "seeds"), ("--paper_recipe=['grow_noise=0']", "paper_recipe")):
        with pytest.raises(SystemExit) as e:
            reproduce.main([f"--out_dir={tmp_path}/x", arg])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0]
    assert not (tmp_path / "x").exists()


# -----------------------------------------------------------------------------
# series.py's wsd schedule, then the grid end to end

TINY = ["--batch_size=2", "--seq_len=256", "--max_data_tokens=300000", "--warmup_steps=3", "--eval_interval=50", "--eval_batches=2",
        "--log_interval=5", "--ckpt_interval=1000", "--plot=false"]


def last_lr(metrics):
    return [json.loads(line)["lr"] for line in open(metrics) if '"lr"' in line][-1]


def test_a_wsd_series_finishes_every_member_and_pays_for_the_cooldowns(tmp_path):
    stages = [dict(name="a", shape="micro-1", lr=4e-3), dict(name="b", shape="micro-2", lr=3e-3), dict(name="c", shape="micro-3", lr=2e-3)]
    cfg = configure(series.SeriesConfig, ["configs/series_cpu.py"] + TINY + [
        f"--stages={stages!r}", "--tokens_per_param=1", "--series_mode=grow+scratch", "--grow_schedule=wsd", "--decay_frac=0.25",
        f"--out_dir={tmp_path / 's'}", f"--data_dir={tmp_path / 'data'}", "--report=true"])
    series.run_series(cfg)
    out = tmp_path / "s"
    runs = {(r["mode"], r["stage"]): r for r in json.load(open(out / "series.json"))["runs"]}
    assert set(runs) == {("grow", "a"), ("grow", "b"), ("grow", "c"), ("scratch", "b"), ("scratch", "c")}  # trunks not listed
    # every member, grown and scratch, ends at min_lr: its schedule is finished
    for (mode, name), r in runs.items():
        lr = next(st["lr"] for st in stages if st["name"] == name)
        assert r["finished"] and last_lr(out / r["metrics"]) == pytest.approx(lr * cfg.min_lr_ratio, rel=1e-9), (mode, name)
    # the trunk holds each stage's stable rate after warmup, and never decays
    assert last_lr(out / "grow_trunk" / "b" / "metrics.jsonl") == pytest.approx(3e-3, rel=1e-12)
    trunk = {n: load_checkpoint(out / "grow_trunk" / n / "final.pt") for n in "abc"}
    branch = {n: load_checkpoint(out / "grow" / n / "final.pt") for n in "abc"}
    # the trunk continues from the state before the cooldown: stage b grew from trunk a (its FLOPs, not the branch's),
    # and reads the data on from where trunk a stopped, as branch a does
    assert trunk["b"]["start_flops"] == trunk["a"]["flops"] < branch["a"]["flops"]
    assert trunk["b"]["train_config"]["data_step_offset"] == branch["a"]["train_config"]["data_step_offset"] == trunk["a"]["data_state"]["step"]
    # a branch starts from its trunk's final weights and AdamW state (train.py's init_from, init_optimizer)
    assert branch["b"]["start_flops"] == trunk["b"]["flops"] and branch["b"]["train_config"]["init_optimizer"]
    # the cooldowns count in the series' cost: series_flops of the last member = the trunk's FLOPs + every branch's
    own = {n: branch[n]["flops"] - branch[n]["start_flops"] for n in "abc"}
    assert runs["grow", "c"]["series_flops"] == trunk["c"]["flops"] + sum(own.values())
    assert runs["grow", "b"]["series_flops"] == trunk["b"]["flops"] + own["a"] + own["b"]
    # each finished member cost about FLOPs(X, T) in its lineage, as its scratch twin: a cooldown is decay_frac of T
    for n in "bc":
        assert branch[n]["flops"] == pytest.approx(runs["scratch", n]["flops"], rel=0.05)
        assert own[n] == pytest.approx(0.25 * runs["scratch", n]["flops"], rel=0.05)
    text = (out / "report.md").read_text()
    assert "grow_schedule 'wsd': every member finished" in text and "and the cooldown branches of the others" in text


def test_tiny_grid_end_to_end(tmp_path, capsys):
    out, docs = tmp_path / "grid", tmp_path / "docs"
    stages = [dict(name="a", shape="micro-1", lr=4e-3), dict(name="b", shape="micro-2", lr=3e-3)]
    argv = [f"--out_dir={out}", f"--docs_dir={docs}", f"--stages={stages!r}", "--tokens_per_param=1", "--seeds=[1, 2]",
            "--sft_steps=2", "--dpo_steps=2", "--post_batch_size=2", "--max_task_items=8", f"--overrides={TINY!r}"]
    reproduce.main(argv + ["--estimate"])  # the plan and its time, nothing else
    printed = capsys.readouterr().out
    assert "estimated CPU time left" in printed and "2 seeds x 5 parts, 30 training runs" in printed and not out.exists()
    reproduce.main(argv)
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["arms"]) == ["1", "2"] and set(results["arms"]["1"]) == set(reproduce.RECIPES)
    paper, nano = results["arms"]["1"]["paper"], results["arms"]["1"]["nanogrow"]
    assert set(paper) == {"grow", "scratch", "scratch_top", "fixed_data", "one_rate"} and "one_rate" not in nano
    # the paper's comparison: the smaller size at the largest rate, the largest shared with the equal-rate one
    assert paper["scratch_top"]["0"]["lr"] == 3e-3 and paper["scratch"]["0"]["lr"] == 4e-3
    assert paper["scratch_top"]["1"]["key"] == paper["scratch"]["1"]["key"] == "s1/paper/scratch/b"
    # the recipes: the paper's stacks and restarts a cosine; nanogrow's finishes each member with a wsd cooldown
    assert paper["grow"]["1"]["schedule"] == "cosine" and nano["grow"]["1"]["schedule"].startswith("wsd")
    assert nano["scratch"]["1"]["schedule"] == "wsd decay_frac=0.2"
    assert all(m["finished"] for r in results["arms"].values() for arms in r.values() for arm in arms.values() for m in arm.values())
    assert nano["grow"]["1"]["series_flops"] > nano["grow"]["1"]["flops"]  # the smaller member's cooldown paid on top
    # the seed changes the run: another loss
    assert results["arms"]["2"]["paper"]["grow"]["1"]["val_loss"] != paper["grow"]["1"]["val_loss"]
    # every arm reports its passes; fixed data over its cap, past one pass
    assert paper["fixed_data"]["1"]["passes"] > 1 and paper["fixed_data"]["1"]["unique_token_cap"] and 0 < paper["grow"]["1"]["passes"] < 1
    assert set(results["posttrain"]) >= {"s1/paper/grow/b", "s1/paper/scratch/b", "s1/paper/fixed_data/b", "s2/nanogrow/grow/b"}
    assert set(results["tasks"]) >= {"s1/paper/grow/a", "s1/paper_top_rate/scratch/a", "s1/paper_one_rate/grow/b"}
    assert results["data"]["dpo_heldout"] > 50 and results["data"]["continuation"] == 8
    for folder in (out, docs):
        text = (folder / "reproduction.md").read_text()
        assert "## Every verdict" in text and "seeds 1, 2" in text
        assert text.count("**held**") + text.count("**not held**") + text.count("**inconclusive**") + text.count("**not measurable") > 10
        assert (folder / "reproduction_diff.png").stat().st_size > 10_000
    # a second fresh run into the finished grid is refused in one line; --resume keeps every finished run
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        reproduce.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--resume" in err[0]
    mtime = os.path.getmtime(out / "s1" / "paper" / "grow" / "b" / "final.pt")
    reproduce.main(argv + ["--resume"])
    assert os.path.getmtime(out / "s1" / "paper" / "grow" / "b" / "final.pt") == mtime
    assert json.loads((out / "results.json").read_text())["arms"] == results["arms"]
