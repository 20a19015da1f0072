"""
chat_data.py: post-training's data (posttrain.py trains on it, judge.py prompts with it).

The chat template (one for training and generation; the specials live in data.SPECIALS' ids):
    <|endoftext|> <|system|>SYSTEM<|end|> <|user|>QUESTION<|end|> <|assistant|>ANSWER<|end|> <|user|>...
A conversation starts with <|endoftext|>, as every pretraining document did after the one before it.
render_chat defines it; hf.CHAT_TEMPLATE writes the same in Jinja for transformers (tests/test_export.py
checks that the two give the same ids).

Top to bottom: the template; rows in the Hugging Face schemas (UltraChat-200k's "messages", UltraFeedback's
"chosen" / "rejected") from the hub or a local .jsonl / .parquet file; Example and PreferenceExample records
(token ids and the mask of the ids to learn) and the training and evaluation sets of a run; padded
micro-batches; and a conversation fitted into a model's context for generation.
"""

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from common import ConfigError, read_jsonl
from model import IGNORE_INDEX

# -----------------------------------------------------------------------------
# the chat template


def render_chat(tokenizer, messages, add_generation_prompt=False):
    """(ids, assistant_mask) of a conversation, a list of {"role", "content"}. assistant_mask[i] is 1 where
    ids[i] is an assistant's answer token or the <|end|> after it: what SFT learns by default (the loss on
    the response only, as TRL's SFTConfig(assistant_only_loss=True) in huggingface/trl
    trl/trainer/sft_config.py). add_generation_prompt appends <|assistant|>, so rendering the first k
    messages that way is a prefix of rendering the whole conversation (the tests check it)."""
    special = tokenizer.special
    ids, mask = [tokenizer.eot_id], [0]
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise ConfigError(f"bad message {str(m)[:80]!r}: expected {{'role': system|user|assistant, 'content': str}}")
        content = tokenizer.encode(m["content"]) + [special["<|end|>"]]  # end-of-turn after every turn
        ids += [special[f"<|{role}|>"]] + content
        mask += [0] + [int(role == "assistant")] * len(content)
    if add_generation_prompt:
        ids, mask = ids + [special["<|assistant|>"]], mask + [0]
    return ids, mask


# -----------------------------------------------------------------------------
# rows in the Hugging Face schemas


def load_rows(source, split, columns, limit=0):
    """Rows (dicts) of 'hf:ID[:CONFIG]' (that split, through datasets) or a local .jsonl / .parquet file.
    A missing column is one error naming it and the schema expected (for a local file: the first row lacking it)."""
    if source.startswith("hf:"):
        from datasets import load_dataset
        dataset_id, _, config = source[3:].partition(":")
        try:
            rows = load_dataset(dataset_id, config or None, split=split)
        except Exception as e:
            raise ConfigError(f"could not load {source} split {split!r} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                              "offline, pass a local .jsonl or .parquet file in the same schema") from None
        found, where = rows.column_names, ""
        rows = rows.select(range(min(limit, len(rows)))) if limit else rows
    elif source.endswith((".jsonl", ".parquet")):
        if not os.path.isfile(source):
            raise ConfigError(f"no data file {source}")
        rows = read_jsonl(source, drop_cut_last_line=False) if source.endswith(".jsonl") else read_parquet(source)
        rows = rows[:limit] if limit else rows
        # every row, not only the first: a row without a column would otherwise fail (or train) much later
        bad = next((i for i, r in enumerate(rows) if any(c not in r for c in columns)), None)
        found, where = (list(rows[bad]), f" row {bad}") if bad is not None else (list(rows[0]) if rows else [], "")
    else:
        raise ConfigError(f"data {source!r}: use hf:ID[:CONFIG] or a .jsonl / .parquet file")
    missing = [c for c in columns if c not in found]
    if missing:
        schema = "HuggingFaceH4/ultrachat_200k" if "messages" in columns else "HuggingFaceH4/ultrafeedback_binarized"
        raise ConfigError(f"{source}{where}: no column {', '.join(map(repr, missing))} (columns found: {', '.join(found) or 'none'}); "
                          f"expected the {schema} schema")
    return rows


def read_parquet(path):
    """The rows of a Parquet file, as dicts."""
    import pyarrow.parquet as pq
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's ArrowInvalid (not Parquet), OSError
        raise ConfigError(f"{path} is not a readable Parquet file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None


# -----------------------------------------------------------------------------
# examples: a conversation (SFT) or a preference pair (DPO) as token ids and the mask of the ids to learn


@dataclass
class Example:
    """One tokenized conversation: int32 token ids and a bool mask of the ids to learn (its answers, or for DPO
    the completion). numpy arrays, not lists: 200k conversations as Python lists of ints would take ~10 GB.
    An SFT example is one; each side of a preference pair is one."""
    ids: np.ndarray
    mask: np.ndarray

    def __post_init__(self):  # from render_chat's lists, or arrays already
        self.ids, self.mask = np.asarray(self.ids, dtype=np.int32), np.asarray(self.mask, dtype=np.bool_)

    def sequences(self):  # tokenize and examples_digest read either kind of example through this
        return [self]


@dataclass
class PreferenceExample:
    """A DPO pair: the same prompt with the chosen and with the rejected answer, each masked on its answer."""
    chosen: Example
    rejected: Example

    def sequences(self):
        return [self.chosen, self.rejected]


def sft_example(tokenizer, messages, max_len, loss_on="assistant"):
    """The Example of a conversation, cut to max_len tokens."""
    if not isinstance(messages, list):
        raise ConfigError(f"column 'messages' must be a list of {{'role', 'content'}} messages, got {type(messages).__name__}")
    ids, mask = render_chat(tokenizer, messages)
    if loss_on == "all":  # every token after the first, prompts too
        mask = [0] + [1] * (len(ids) - 1)
    return Example(ids[:max_len], mask[:max_len])


def sequence_lengths(cmd, max_len, max_prompt_len, max_seq_len):
    """(max_len, max_prompt_len, notes) that fit the model: max_len at most its max_seq_len (longer examples could
    not run through it), and for DPO max_prompt_len below max_len, so that a prompt cut to it leaves room for the
    response. A max_prompt_len that leaves none becomes half of max_len, the share of the paper's config (512 of
    1024). notes: one line for each value changed."""
    notes = []
    if max_len > max_seq_len:
        notes.append(f"max_len {max_len} is above the model's max_seq_len {max_seq_len}: using {max_seq_len}")
        max_len = max_seq_len
    if cmd == "dpo" and max_prompt_len >= max_len:
        fitted = max(1, max_len // 2)
        notes.append(f"max_prompt_len {max_prompt_len} leaves no room for the response within max_len {max_len}: using {fitted}")
        max_prompt_len = fitted
    return max_len, max_prompt_len, notes


def prompt_turns(conversation):  # the messages before the last, as comparable (role, content) pairs
    return [(m.get("role"), m.get("content")) if isinstance(m, dict) else m for m in conversation[:-1]]


def dpo_example(tokenizer, row, max_len, max_prompt_len):
    """The PreferenceExample of a row, the masks on the completion only: the last (assistant) message and its
    <|end|>. The prompt is chosen[:-1] (or the `prompt` string when that is empty), and rejected[:-1] must be the
    same. When a pair does not fit, the prompt keeps its last max_prompt_len tokens, then the answers are cut to
    the room left (TRL: to max_length - max_prompt_length, at most that), as TRL's DPOTrainer does with
    truncation_mode="keep_end", the default of its DPOConfig
    (huggingface/trl trl/trainer/dpo_trainer.py, _truncate_tokens, and trl/trainer/dpo_config.py, v0.11; through
    v0.19 tokenize_row keeps a prompt's last max_prompt_length tokens too). max_prompt_len < max_len
    (sequence_lengths), so every pair fits in max_len, which TRL does not check."""
    if not 0 < max_prompt_len < max_len:
        raise ConfigError(f"max_prompt_len {max_prompt_len} must be at least 1 and below max_len {max_len}")
    chosen, rejected = row["chosen"], row["rejected"]
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(conversation, list) or not conversation or not isinstance(conversation[-1], dict) \
                or conversation[-1].get("role") != "assistant":
            raise ConfigError(f"column {name!r} must be a list of messages ending with the assistant's answer, "
                              f"got {str(conversation)[:80]!r}")
    prompt_c, prompt_r = prompt_turns(chosen), prompt_turns(rejected)
    if prompt_c != prompt_r:  # a pair compares two answers to one prompt
        at = next((k for k, (a, b) in enumerate(zip(prompt_c, prompt_r)) if a != b), min(len(prompt_c), len(prompt_r)))
        raise ConfigError(f"chosen and rejected have different prompts (message {at} differs; {len(prompt_c)} and "
                          f"{len(prompt_r)} messages before the answers): a preference pair must share every message but the last")
    prompt_msgs = chosen[:-1]
    if not prompt_msgs:
        if not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise ConfigError("chosen holds only the answer and there is no 'prompt' string column to take the prompt from")
        prompt_msgs = [{"role": "user", "content": row["prompt"]}]
    prompt, _ = render_chat(tokenizer, prompt_msgs, add_generation_prompt=True)
    pair = []
    for answer in (chosen[-1], rejected[-1]):
        full, _ = render_chat(tokenizer, prompt_msgs + [answer])
        pair.append(full[len(prompt):])  # the answer and its <|end|>, by the prefix property of the template
    longest = max(len(c) for c in pair)
    if len(prompt) + longest > max_len and len(prompt) > max_prompt_len:
        prompt = prompt[len(prompt) - max_prompt_len:]  # keep_end: the question is at the end of a long prompt
    room = max_len - len(prompt)  # >= 1: len(prompt) <= max_prompt_len < max_len, or the pair fits untouched
    chosen_ex, rejected_ex = (Example(prompt + c[:room], [0] * len(prompt) + [1] * len(c[:room])) for c in pair)
    return PreferenceExample(chosen_ex, rejected_ex)


def tokenize(cmd, tokenizer, rows, max_len, max_prompt_len, loss_on="assistant", source=""):
    """The command's examples (Example for sft, PreferenceExample for dpo), and how many rows were dropped for
    having nothing to learn left after cutting. A row that does not fit the schema is one error naming it."""
    out, dropped = [], 0
    for i, row in enumerate(rows):
        try:
            if cmd == "sft":
                ex = sft_example(tokenizer, row["messages"], max_len, loss_on)
            else:
                ex = dpo_example(tokenizer, row, max_len, max_prompt_len)
            keep = all(seq.mask[1:].any() for seq in ex.sequences())  # the first token is never a target
        except KeyError as e:
            raise ConfigError(f"{source or 'data'} row {i}: no column {e} (columns found: {', '.join(map(str, row))})") from None
        except (TypeError, AttributeError) as e:
            raise ConfigError(f"{source or 'data'} row {i} does not fit the schema ({type(e).__name__}: {e})") from None
        except ConfigError as e:
            raise ConfigError(f"{source or 'data'} row {i}: {e}") from None
        out += [ex] if keep else []
        dropped += not keep
    return out, dropped


def load_examples(cmd, tokenizer, cfg, eval_split, columns, max_len, max_prompt_len, log=print):
    """(training examples, evaluation examples) of the command, read as posttrain's config `cfg` says (data,
    split, max_examples, eval_data, eval_examples, loss_on); raises when no training example is left."""
    examples, dropped = tokenize(cmd, tokenizer, load_rows(cfg.data, cfg.split, columns, cfg.max_examples), max_len,
                                 max_prompt_len, cfg.loss_on, cfg.data)
    evals = []
    if cfg.eval_data != "none":
        evals, _ = tokenize(cmd, tokenizer, load_rows(cfg.eval_data, eval_split, columns, cfg.eval_examples), max_len,
                            max_prompt_len, cfg.loss_on, cfg.eval_data)
    if not examples:
        raise ConfigError(f"{cfg.data}: no usable examples (dropped {dropped} with nothing to learn within max_len={max_len})")
    log(f"{cmd}: {len(examples):,} examples from {cfg.data} ({cfg.split}), {dropped} dropped (nothing to learn within "
        f"{max_len} tokens), {len(evals)} for evaluation")
    return examples, evals


def examples_digest(examples):
    """A fingerprint of tokenized examples (ids and masks, in order): a resumed run must read what the killed
    one would have, step for step, so --resume refuses data that now tokenizes differently."""
    h = hashlib.sha256()
    for ex in examples:
        for seq in ex.sequences():  # SFT: ids, mask; DPO: chosen ids, mask, rejected ids, mask
            for a in (seq.ids, seq.mask):
                h.update(len(a).to_bytes(8, "little") + a.tobytes())
    return h.hexdigest()


# -----------------------------------------------------------------------------
# padded micro-batches


def collate(examples, pad_id, multiple=1, limit=None, device="cpu"):
    """Inputs x and targets y (B, T) from Examples: y[t] = ids[t+1] where mask[t+1], else
    IGNORE_INDEX. Padding is on the right, one conversation per row, so no row attends to another and a
    causal model's log-probs of a row do not depend on how far it is padded (tests check it)."""
    T = max(len(ex.ids) for ex in examples) - 1
    T = min(-(-T // multiple) * multiple, limit or 1 << 30)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.ids) - 1
        x[i, :n] = torch.as_tensor(ex.ids[:-1])
        y[i, :n] = torch.where(torch.as_tensor(ex.mask[1:], dtype=torch.bool), torch.as_tensor(ex.ids[1:]), IGNORE_INDEX)
    return x.to(device), y.to(device)


def sft_batches(examples, ids, batch_size, pad_id, multiple=1, limit=None, device="cpu"):
    """Micro-batches [(x, y), ...] of the examples `ids`, longest first: less padding, and the same gradient,
    since posttrain.sft_accumulate weighs every token alike whichever micro-batch it falls in."""
    ids = sorted(ids, key=lambda i: -len(examples[i].ids))
    return [collate([examples[i] for i in ids[s:s + batch_size]], pad_id, multiple, limit, device)
            for s in range(0, len(ids), batch_size)]


def preference_batches(pairs, ids, batch_size, pad_id, multiple=1, limit=None, device="cpu"):
    """Micro-batches [(x, y, idx), ...] of the pairs `ids`, longest first: x holds the B chosen rows, then
    their B rejected rows (one forward for both); idx is the pairs' indices (rows of the reference table)."""
    ids = sorted(ids, key=lambda i: -max(len(pairs[i].chosen.ids), len(pairs[i].rejected.ids)))
    out = []
    for s in range(0, len(ids), batch_size):
        chunk = ids[s:s + batch_size]
        x, y = collate([pairs[i].chosen for i in chunk] + [pairs[i].rejected for i in chunk], pad_id, multiple, limit, device)
        out.append((x, y, torch.tensor(chunk, device=device)))
    return out


# -----------------------------------------------------------------------------
# a conversation fitted into a model's context, for generating its next answer


def fit_prompt(tokenizer, messages, max_seq_len, max_new_tokens):
    """(prompt ids, max_new_tokens, note) for generating the next answer to `messages` within the model's context:
    the one place chat (posttrain.reply) and judge.py fit a conversation. The prompt may take the context less a
    reserve for the answer, min(max_new_tokens, max_seq_len // 2), so a large max_new_tokens cannot push the
    question out. Past that budget the oldest history goes first (a whole exchange: a user turn and its answers),
    then the system prompt; the newest message always stays, and if even it alone is too long it keeps its end (the
    template's tokens around it intact). max_new_tokens is then capped to the room left. note: "" when nothing was
    dropped or capped, else one line saying what was."""
    render = lambda msgs: render_chat(tokenizer, msgs, add_generation_prompt=True)[0]
    ids = render(messages)
    if len(ids) + max_new_tokens <= max_seq_len:
        return ids, max_new_tokens, ""
    total, budget = len(ids), max_seq_len - max(1, min(max_new_tokens, max_seq_len // 2))
    system = list(messages[:1]) if messages and messages[0].get("role") == "system" else []
    history, newest = list(messages[len(system):-1]), list(messages[-1:])
    changes, dropped = [], 0
    while len(ids) > budget and history:
        k = 1  # the oldest exchange: its first message and the answers up to the next user turn
        while k < len(history) and history[k].get("role") != "user":
            k += 1
        history, dropped = history[k:], dropped + k
        ids = render(system + history + newest)
    if dropped:
        changes.append(f"dropped the {dropped} oldest message{'s' * (dropped > 1)} of the history")
    if len(ids) > budget and system:
        system, ids = [], render(newest)
        changes.append("dropped the system prompt")
    if len(ids) > budget:
        keep = budget - 4  # [<|endoftext|>, <|role|>] + the end of the content + [<|end|>, <|assistant|>]
        if keep < 1:
            raise ConfigError(f"the model's max_seq_len {max_seq_len} leaves no room for a prompt: use a model with a longer context")
        ids = ids[:2] + ids[2:-2][-keep:] + ids[-2:]
        changes.append(f"the newest message alone does not fit, so only its last {keep} tokens are kept")
    capped = min(max_new_tokens, max_seq_len - len(ids))
    if capped < max_new_tokens:
        changes.append(f"max_new_tokens capped from {max_new_tokens} to {capped}")
    return ids, capped, (f"the conversation ({total} tokens) and max_new_tokens={max_new_tokens} exceed the model's "
                         f"max_seq_len {max_seq_len}: " + "; ".join(changes))
