"""
judge.py: MT-Bench (Zheng et al. 2023, "Judging LLM-as-a-judge with MT-Bench and Chatbot Arena") for
post-trained checkpoints, the score of Table 2 of Yano et al. 2025 (section 4).

    python judge.py CKPT --out out/mtbench_1b                                 # answers only, no judge needed
    python judge.py CKPT --judge_url https://api.openai.com/v1 --judge_model gpt-4   # answers, then grades
    python judge.py --answers out/mtbench_1b/answers.jsonl --judge_url http://127.0.0.1:8000/v1 --judge_model M

1. Answers: every question has two user turns; the model answers turn 1, then turn 2 with turn 1 and its
   own answer in the context (posttrain.reply: the training chat template), at MT-Bench's temperature for
   the question's category. Questions: hf:HuggingFaceH4/mt_bench_prompts (prompt = [turn 1, turn 2],
   category, prompt_id, reference) or a local .jsonl / .parquet in that schema.
2. Grades: single-answer grading, 1 to 10 per turn, by an LLM judge behind any OpenAI-compatible
   chat-completions endpoint (urllib, no extra dependency), API key from $OPENAI_API_KEY or --judge_key_env.
   The prompts are MT-Bench's (its paper's appendix): general, reference-guided for math, reasoning and
   coding when a reference exists, and turn 2 judged on the second answer with the whole conversation shown.
   The rating is read from "[[rating]]"; a reply without one, an HTTP error or a broken reply is retried
   (at most --judge_attempts tries) and then recorded as failed: it never counts as a score.
3. Scores: per question and turn (judgments.jsonl), per category, per turn and overall (scores.json, and a
   printed table). MT-Bench's score is the mean over all graded turns.
"""

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request

import torch

import posttrain
from chat_data import load_rows
from common import CheckpointError, ConfigError, check_config, read_jsonl

# MT-Bench's sampling temperature per category (deterministic for math and code, loose for writing)
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1}
NEED_REFERENCE = ("math", "reasoning", "coding")


def load_questions(source, limit=0):
    """[{prompt_id, category, turns: [q1, q2], reference: [...]}] from the hub or a local file."""
    if source.startswith("hf:"):
        from datasets import load_dataset
        try:
            rows = load_dataset(source[3:], split="train").to_list()
        except Exception as e:
            raise ConfigError(f"could not load {source} ({type(e).__name__}); offline, pass a local .jsonl in its schema") from None
    elif source.endswith((".jsonl", ".parquet")) and os.path.isfile(source):
        rows = load_rows(source, "train", [])
    else:
        raise ConfigError(f"questions {source!r}: use hf:ID or an existing .jsonl / .parquet file")
    out = []
    for i, r in enumerate(rows[:limit] if limit else rows):
        turns = r.get("prompt", r.get("turns"))  # H4's "prompt", or lmsys' question.jsonl "turns"
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise ConfigError(f"{source} row {i}: no column 'prompt' holding the list of user turns (columns found: {', '.join(r)})")
        out.append({"prompt_id": r.get("prompt_id", r.get("question_id", i)), "category": r.get("category", ""),
                    "turns": turns, "reference": r.get("reference") or []})
    return out


def load_answers(path):
    """The rows of an answers.jsonl to grade (as generate_answers writes them); a malformed line or a row without
    the columns grading reads is one error naming the file and the row."""
    rows = read_jsonl(path, drop_cut_last_line=False)
    for i, r in enumerate(rows):
        missing = [c for c in ("prompt_id", "category", "turns", "answers") if c not in r]
        if missing:
            raise ConfigError(f"{path} row {i}: no column {', '.join(map(repr, missing))} (columns found: {', '.join(r) or 'none'}); "
                             "expected the rows of answers.jsonl that judge.py CKPT writes")
        for c in ("turns", "answers"):
            if not isinstance(r[c], list) or not r[c] or not all(isinstance(t, str) for t in r[c]):
                raise ConfigError(f"{path} row {i}: column {c!r} must be a non-empty list of strings, got {str(r[c])[:80]!r}")
    if not rows:
        raise ConfigError(f"{path} holds no answers")
    return rows


def generate_answers(model, tokenizer, questions, max_new_tokens=512, seed=0):
    """Each question with `answers`: one per turn, each turn seeing the earlier turns and answers (posttrain.reply:
    a conversation longer than the model's context keeps its newest turn, and notes what it dropped or capped)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    out = []
    for q in questions:
        messages, answers = [], []
        for turn in q["turns"]:
            messages.append({"role": "user", "content": turn})
            answers.append(posttrain.reply(model, tokenizer, messages, max_new_tokens,
                                           TEMPERATURE.get(q["category"], 0.7), top_k=None, generator=gen))
            messages.append({"role": "assistant", "content": answers[-1]})
        out.append({**q, "answers": answers})
    return out


# -----------------------------------------------------------------------------
# the judge


def judge_messages(row, turn):
    """Chat messages asking the judge to grade the answer to turn `turn` (1 or 2) of `row`."""
    ref = row["reference"] if row["category"] in NEED_REFERENCE and row.get("reference") else None
    criteria = ("Your evaluation should consider correctness and helpfulness. You will be given a reference answer and the "
                "assistant's answer. Begin your evaluation by comparing the assistant's answer with the reference answer. "
                "Identify and correct any mistakes." if ref else
                "Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, "
                "and level of detail of the response. Begin your evaluation by providing a short explanation.")
    focus = " Your evaluation should focus on the assistant's answer to the second user question." if turn == 2 else ""
    instruction = ("Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to "
                   f"the user question displayed below. {criteria}{focus} Be as objective as possible. After providing your "
                   "explanation, you must rate the response on a scale of 1 to 10 by strictly following this format: "
                   "\"[[rating]]\", for example: \"Rating: [[5]]\".")
    if turn == 1:
        body = f"[Question]\n{row['turns'][0]}\n\n"
        body += f"[The Start of Reference Answer]\n{ref[0]}\n[The End of Reference Answer]\n\n" if ref else ""
        body += f"[The Start of Assistant's Answer]\n{row['answers'][0]}\n[The End of Assistant's Answer]"
        return [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"[Instruction]\n{instruction}\n\n{body}"}]
    body = ""
    if ref:
        body += ("<|The Start of Reference Answer|>\n\n### User:\n" + row["turns"][0] + "\n\n### Reference answer:\n" + ref[0]
                 + "\n\n### User:\n" + row["turns"][1] + "\n\n### Reference answer:\n" + (ref[1] if len(ref) > 1 else "")
                 + "\n\n<|The End of Reference Answer|>\n\n\n")
    body += ("<|The Start of Assistant A's Conversation with User|>\n\n### User:\n" + row["turns"][0] + "\n\n### Assistant A:\n"
             + row["answers"][0] + "\n\n### User:\n" + row["turns"][1] + "\n\n### Assistant A:\n" + row["answers"][1]
             + "\n\n<|The End of Assistant A's Conversation with User|>")
    return [{"role": "system", "content": instruction}, {"role": "user", "content": body}]


def chat_completion(url, model, messages, api_key=None, timeout=120.0, max_tokens=2048):
    """The reply text of one OpenAI-style POST {url}/chat/completions (temperature 0, as MT-Bench)."""
    url = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=timeout) as r:
            reply = json.loads(r.read().decode("utf-8"))
        return reply["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as e:
        raise ConfigError(f"HTTP {e.code} from {url}: {e.read()[:200].decode('utf-8', 'replace')}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise ConfigError(f"no answer from {url}: {e}") from None
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ConfigError(f"reply from {url} is not a chat completion ({type(e).__name__}: {e})") from None


def parse_rating(text):
    """The 1-10 rating in "[[rating]]" (or "[rating]", as MT-Bench's parser also accepts); None if absent."""
    for pattern in (r"\[\[(\d+\.?\d*)\]\]", r"\[(\d+\.?\d*)\]"):
        m = re.search(pattern, text or "")
        if m:
            value = float(m.group(1))
            return value if 1 <= value <= 10 else None
    return None


def grade(rows, url, model, api_key=None, attempts=3, backoff=1.0, timeout=120.0, log=print):
    """One judgment per (question, turn): score, or status "failed" with the last error after `attempts` tries."""
    out = []
    for row in rows:
        for turn in range(1, min(2, len(row["answers"])) + 1):
            j = {"prompt_id": row["prompt_id"], "category": row["category"], "turn": turn, "score": None}
            for attempt in range(1, attempts + 1):
                try:
                    text = chat_completion(url, model, judge_messages(row, turn), api_key, timeout)
                    j["judgment"] = text
                    j["score"] = parse_rating(text)
                    if j["score"] is not None:
                        break
                    j["error"] = "no [[rating]] from 1 to 10 in the judge's reply"
                except ConfigError as e:
                    j["error"] = str(e)
                if attempt < attempts:
                    time.sleep(backoff * 2 ** (attempt - 1))
            j.update(status="ok" if j["score"] is not None else "failed", attempts=attempt)
            if j["score"] is not None:
                j.pop("error", None)
            else:
                log(f"warning: question {row['prompt_id']} turn {turn}: judging failed after {attempt} tries ({j['error']})")
            out.append(j)
    return out


def aggregate(judgments):
    """Mean scores per question, per category and turn, and overall; failed judgments counted, never scored."""
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    ok = [j for j in judgments if j["status"] == "ok"]
    questions = {}
    for j in judgments:
        q = questions.setdefault(str(j["prompt_id"]), {"category": j["category"]})
        q[f"turn{j['turn']}"] = j["score"]
    categories = {}
    for cat in sorted({j["category"] for j in judgments}):
        c = [j for j in ok if j["category"] == cat]
        categories[cat] = {"turn1": mean([j["score"] for j in c if j["turn"] == 1]), "turn2": mean([j["score"] for j in c if j["turn"] == 2]),
                           "score": mean([j["score"] for j in c]), "graded": len(c),
                           "failed": sum(j["status"] == "failed" and j["category"] == cat for j in judgments)}
    return {"score": mean([j["score"] for j in ok]), "turn1": mean([j["score"] for j in ok if j["turn"] == 1]),
            "turn2": mean([j["score"] for j in ok if j["turn"] == 2]), "graded": len(ok),
            "failed": len(judgments) - len(ok), "categories": categories, "questions": questions}


def format_table(summary):
    f = lambda v: f"{v:6.2f}" if v is not None else "     -"
    lines = [f"{'category':<12} {'turn 1':>6} {'turn 2':>6} {'score':>6} {'graded':>6} {'failed':>6}"]
    for cat, c in summary["categories"].items():
        lines.append(f"{cat:<12} {f(c['turn1'])} {f(c['turn2'])} {f(c['score'])} {c['graded']:>6} {c['failed']:>6}")
    lines.append(f"{'MT-Bench':<12} {f(summary['turn1'])} {f(summary['turn2'])} {f(summary['score'])} "
                 f"{summary['graded']:>6} {summary['failed']:>6}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# command line


def main(argv):
    p = argparse.ArgumentParser(description="MT-Bench answers and LLM-judge grades for a nanogrow checkpoint")
    p.add_argument("ckpt", nargs="?", help="checkpoint to answer with (leave out with --answers)")
    p.add_argument("--questions", default="hf:HuggingFaceH4/mt_bench_prompts")
    p.add_argument("--answers", default="", help="grade this answers.jsonl instead of generating")
    p.add_argument("--out", default="", help="folder for answers.jsonl, judgments.jsonl, scores.json")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--judge_url", default="", help="an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    p.add_argument("--judge_model", default="gpt-4")
    p.add_argument("--judge_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--judge_attempts", type=int, default=3)
    p.add_argument("--judge_backoff", type=float, default=2.0, help="seconds before the first retry; doubles")
    p.add_argument("--judge_timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    try:
        for key, ok, valid in (("limit", args.limit >= 0, ">= 0 (0: all)"), ("max_new_tokens", args.max_new_tokens >= 1, ">= 1"),
                               ("judge_attempts", args.judge_attempts >= 1, ">= 1"),
                               ("judge_backoff", 0 <= args.judge_backoff < float("inf"), ">= 0"),
                               ("judge_timeout", 0 < args.judge_timeout < float("inf"), "> 0")):
            if not ok:
                raise ConfigError(f"--{key} must be {valid}, got {getattr(args, key)!r}")
        check_config(posttrain.PostTrainConfig(device=args.device))  # --device as chat takes it
        if args.answers:
            out = args.out or os.path.dirname(os.path.abspath(args.answers))
            rows = load_answers(args.answers)
        elif args.ckpt:
            out = args.out or os.path.join("out", "mtbench")
            model, tok = posttrain.load_chat_model(args.ckpt, args.device)
            questions = load_questions(args.questions, args.limit)
            print(f"answering {len(questions)} questions with {args.ckpt}")
            rows = [{**r, "model": args.ckpt} for r in generate_answers(model, tok, questions, args.max_new_tokens, args.seed)]
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "answers.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            print(f"answers: {os.path.join(out, 'answers.jsonl')}")
        else:
            raise ConfigError("give a checkpoint to answer with, or --answers FILE to grade")
        if not args.judge_url:
            print(f"no judge configured, so nothing graded: run python judge.py --answers {os.path.join(out, 'answers.jsonl')} "
                  f"--judge_url URL --judge_model NAME (an OpenAI-compatible chat-completions endpoint, e.g. "
                  f"https://api.openai.com/v1 with gpt-4 as MT-Bench uses; API key in ${args.judge_key_env} or --judge_key_env VAR)")
            return None
        key = os.environ.get(args.judge_key_env)
        if not key:
            print(f"note: ${args.judge_key_env} is not set: calling {args.judge_url} without an API key")
        judgments = grade(rows, args.judge_url, args.judge_model, key, args.judge_attempts, args.judge_backoff, args.judge_timeout)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "judgments.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(j, ensure_ascii=False) + "\n" for j in judgments)
        summary = {"judge_model": args.judge_model, "judge_url": args.judge_url, **aggregate(judgments)}
        with open(os.path.join(out, "scores.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(format_table(summary))
        print(f"scores: {os.path.join(out, 'scores.json')}")
        if judgments and not summary["graded"]:
            raise ConfigError(f"every judgment failed (last: {judgments[-1].get('error')}); check --judge_url, --judge_model and the key")
        return summary
    except (ConfigError, CheckpointError, OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
