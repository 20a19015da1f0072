"""
posttrain.py: post-training of a series member as Yano et al. 2025 do in section 4.1: SFT on UltraChat-200k
(lr 3e-5), then DPO on UltraFeedback (lr 5e-7), "following the setting of Meng et al." (SimPO, Meng et al.
2024), judged with MT-Bench (judge.py). SimPO and LoRA (Hu et al. 2022) are options; the Tanuki-8B/8x8B
post-training report (GENIAC Matsuo Lab LLM team 2024) used LoRA for cheap DPO runs, beta 0.01 to 0.1, and
lower learning rates for stronger bases.

    python posttrain.py sft CKPT configs/sft_paper.py --out=out/sft_1b
    python posttrain.py dpo out/sft_1b/final.pt configs/dpo_paper.py --out=out/dpo_1b
    python posttrain.py dpo CKPT --ref REF.pt --data prefs.jsonl --loss simpo --beta 2.0 --gamma 1.0
    python posttrain.py sft CKPT configs/sft_tiny.py --lora_rank 8 --lora_targets q,v
    python posttrain.py chat out/dpo_1b/final.pt [--prompt "Hello"] [--system "..."] [--temperature 0]
    python posttrain.py sft CKPT configs/sft_paper.py --out=out/sft_1b --resume   # after a kill: continues exactly
    torchrun --standalone --nproc_per_node=8 posttrain.py sft CKPT configs/sft_paper.py

Settings are the fields of PostTrainConfig, from config files and --key=value (or --key value), exactly
as in train.py (common.configure). The result is a checkpoint in checkpoint.py's schema (OUT/final.pt: the
model, its config, the tokenizer, the starting checkpoint's lineage with this run's FLOPs added and
{"op": "sft" | "dpo", ...} appended to its history), a plain Llama also when LoRA was used (the adapters
are merged into the weights on save). Every ckpt_interval steps OUT/ckpt_STEP.pt (the last keep_last of
them) holds the same plus what an exact resume needs: the live module (with LoRA: base + adapters), the
optimizer, the RNG states and DPO's precomputed reference log-probs; the examples of a step are a pure
function of (seed, step), so `--resume` continues bit for bit, as train.py does (tests/test_posttrain.py
kills a run and checks).

The chat template (one for training and generation; the specials live in data.SPECIALS' ids):
    <|endoftext|> <|system|>SYSTEM<|end|> <|user|>QUESTION<|end|> <|assistant|>ANSWER<|end|> <|user|>...
A conversation starts with <|endoftext|>, as every pretraining document did after the one before it.

Top to bottom: the chat template; data (rows -> Example / PreferenceExample records -> padded micro-batches);
the losses (SFT's, and one preference loss that is DPO or SimPO) and their evaluations; LoRA; the run (its
state, its setup, one step, evaluation, the checkpoint) and train(), the loop; chat; the command line.
"""

import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data import DataError, get_tokenizer
from checkpoint import (CheckpointError, Lineage, checkpoint_paths, claim_out_dir, latest_checkpoint, load_checkpoint,
                        make_checkpoint, prune_checkpoints, save_checkpoint)
from common import (ConfigError, DivergenceGuard, append_jsonl, autocast_for, cli_errors, configure, fmt_time, lr_at,
                    make_optimizer, plot_losses, rank0_first, rng_state, same_on_every_rank, set_rng_state, setup_distributed,
                    start_metrics)
from model import IGNORE_INDEX, model_from_checkpoint

COMMANDS = ("sft", "dpo", "chat")
# what each command reads, unless --data / --split say otherwise: the datasets of the paper (SimPO's setting)
DEFAULT_DATA = {"sft": ("hf:HuggingFaceH4/ultrachat_200k", "train_sft", "test_sft", ["messages"]),
                "dpo": ("hf:HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "test_prefs", ["chosen", "rejected"])}
PAPER_LR = {"sft": 3e-5, "dpo": 5e-7}  # Yano et al. 2025, section 4.1: the same for every member of the series
# Each preference loss has its own beta when --beta is not given. DPO: 0.01, the paper's configs (SimPO's DPO
# baseline on the Base models; the Tanuki-8B/8x8B report used 0.01 to 0.1). SimPO (Meng et al. 2024): beta 2.0 and
# gamma / beta 0.5 on Llama-3-Base, 0.5 also the ratio its authors suggest starting from (princeton-nlp/SimPO
# README.md, "Hyperparameter tuning", and training_configs/llama-3-8b-base-simpo.yaml). simpo_loss takes the absolute
# margin gamma, -log sigmoid(beta * (c - r) - gamma), as TRL's CPOTrainer with loss_type="simpo" takes simpo_gamma
# (huggingface/trl trl/experimental/cpo/cpo_trainer.py; with cpo_alpha=0.0, no NLL term, as here), so the default
# gamma is 0.5 * beta: 1.0 at beta 2.0. TRL's CPOConfig defaults (beta 0.1, simpo_gamma 0.5) are CPO's, not SimPO's.
DEFAULT_BETA = {"dpo": 0.01, "simpo": 2.0}
SIMPO_GAMMA_BETA_RATIO = 0.5


class PostTrainError(Exception):
    """A problem the user can fix; the CLI prints the one-line message without a traceback."""


@dataclass
class PostTrainConfig:
    out: str = ""  # output folder (final.pt, metrics.jsonl, loss.png); "" is out/<command>
    # data: "hf:ID[:CONFIG]" through datasets, or a local .jsonl / .parquet file in the same schema
    data: str = ""  # "" is the paper's dataset for the command (DEFAULT_DATA)
    split: str = ""  # "" is train_sft / train_prefs
    eval_data: str = ""  # "" is the hf source's test split (none for a local file); "none" switches it off
    eval_examples: int = 200  # cap on evaluation examples (0: all)
    eval_interval: int = 0  # steps between evaluations (0: only at the end)
    max_examples: int = 0  # cap on training examples (0: all)
    max_len: int = 1024  # tokens per conversation (prompt + answers), at most the model's max_seq_len; longer ones are cut
    max_prompt_len: int = 512  # DPO: a prompt longer than this keeps its end when the pair does not fit (below max_len)
    # SFT: "assistant" (answers + their <|end|>, as TRL's assistant_only_loss) or "all" (the zephyr recipe, Tunstall et al. 2023)
    loss_on: str = "assistant"
    # optimization: examples per step = batch_size * grad_accum * world size
    batch_size: int = 4
    grad_accum: int = 32
    epochs: float = 1.0
    max_steps: int = 0  # 0: as many as `epochs` take
    lr: float = 0.0  # 0: the paper's (PAPER_LR)
    warmup_frac: float = 0.1  # warmup over this fraction of the steps, then cosine (SimPO's setting)
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    # preference optimization
    loss: str = "dpo"  # "dpo" (Rafailov et al. 2023) or "simpo" (Meng et al. 2024: no reference model)
    beta: float = None  # None: the loss's own default (DEFAULT_BETA: DPO 0.01, SimPO 2.0); a given value wins
    gamma: float = None  # SimPO's target reward margin (absolute, as TRL's simpo_gamma); None: SIMPO_GAMMA_BETA_RATIO * beta
    ref: str = ""  # the frozen reference; "" is CKPT itself (with LoRA: the base with adapters disabled)
    ref_mode: str = "precompute"  # "precompute" (once, before training, then freed) or "live" (every step)
    # LoRA (Hu et al. 2022): 0 is full fine-tuning
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q,k,v,o,gate,up,down"
    # system
    device: str = "auto"
    dtype: str = "auto"  # bf16 autocast on CUDA, float32 on CPU (common.autocast_for)
    compile: bool = False  # padded batches change shape every step, so compiling is off by default
    pad_multiple: int = 8  # pad batches to a multiple of this length (fewer shapes; results do not depend on it)
    seed: int = 1337
    log_interval: int = 10
    ckpt_interval: int = 0  # steps between resumable saves of OUT/ckpt_STEP.pt (0: only final.pt at the end)
    keep_last: int = 2  # periodic checkpoints kept (0: all); a file goes only when that many newer ones verify
    resume: bool = False  # continue from the newest OUT/ckpt_STEP.pt that verifies, exactly (fresh if there is none)
    overwrite: bool = False  # a fresh run may delete what an earlier run left in OUT (otherwise refused)
    plot: bool = True
    # divergence, as train.py: a non-finite loss or gradient norm is never stepped on (common.DivergenceGuard)
    divergence: str = "stop"  # "stop" or "skip" (drop that update, at most max_skips times)
    max_skips: int = 10
    spike_factor: float = 2.0  # report a loss above this multiple of the running median (0: off)
    dist_timeout: int = 1800  # seconds a collective may wait for a stuck rank
    # chat
    prompt: str = ""  # one answer to this, then exit; empty: interactive
    system: str = ""
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 50


# -----------------------------------------------------------------------------
# chat template


def render_chat(tokenizer, messages, add_generation_prompt=False):
    """(ids, assistant_mask) of a conversation, a list of {"role", "content"}. assistant_mask[i] is 1 where
    ids[i] is an assistant's answer token or the <|end|> after it: what SFT learns by default (the loss on
    the response only, as TRL's SFTConfig(assistant_only_loss=True) in huggingface/trl
    trl/trainer/sft_config.py). add_generation_prompt appends <|assistant|>, so rendering the first k
    messages that way is a prefix of rendering the whole conversation (the tests check it)."""
    sp = tokenizer.special
    ids, mask = [tokenizer.eot_id], [0]
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise PostTrainError(f"bad message {str(m)[:80]!r}: expected {{'role': system|user|assistant, 'content': str}}")
        content = tokenizer.encode(m["content"]) + [sp["<|end|>"]]  # end-of-turn after every turn
        ids += [sp[f"<|{role}|>"]] + content
        mask += [0] + [int(role == "assistant")] * len(content)
    if add_generation_prompt:
        ids, mask = ids + [sp["<|assistant|>"]], mask + [0]
    return ids, mask


# -----------------------------------------------------------------------------
# data: rows in the Hugging Face schemas -> Example / PreferenceExample records -> padded micro-batches


def read_jsonl(path):
    """The rows of a JSONL file: one JSON object a line, blank lines skipped. A line that is not a JSON object, or
    a file that is not UTF-8 text (a binary file given as JSONL), is one error naming the file and the line."""
    if not os.path.isfile(path):
        raise PostTrainError(f"no data file {path}")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PostTrainError(f"{path} line {n} is not valid JSON ({e.msg} at column {e.colno}): "
                                         "fix or remove that line (one JSON object a line)") from None
                if not isinstance(row, dict):
                    raise PostTrainError(f"{path} line {n} is a JSON {type(row).__name__}, not an object: "
                                         "each line must be one row, {\"column\": value, ...}")
                rows.append(row)
    except UnicodeDecodeError as e:
        raise PostTrainError(f"{path} is not UTF-8 text (byte {e.object[e.start:e.start + 1].hex()} at offset {e.start}): "
                             "is it a binary file? pass a .jsonl text file or a .parquet file") from None
    except OSError as e:
        raise PostTrainError(f"cannot read {path} ({e.strerror or e})") from None
    return rows


def load_rows(source, split, columns, limit=0):
    """Rows (dicts) of 'hf:ID[:CONFIG]' (that split, through datasets) or a local .jsonl / .parquet file.
    A missing column is one error naming it and the schema expected (for a local file: the first row lacking it)."""
    if source.startswith("hf:"):
        from datasets import load_dataset
        dataset_id, _, config = source[3:].partition(":")
        try:
            rows = load_dataset(dataset_id, config or None, split=split)
        except Exception as e:
            raise PostTrainError(f"could not load {source} split {split!r} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                                 "offline, pass a local .jsonl or .parquet file in the same schema") from None
        found, where = rows.column_names, ""
        rows = rows.select(range(min(limit, len(rows)))) if limit else rows
    elif source.endswith((".jsonl", ".parquet")):
        if source.endswith(".jsonl"):
            rows = read_jsonl(source)
        else:
            if not os.path.isfile(source):
                raise PostTrainError(f"no data file {source}")
            import pyarrow.parquet as pq
            try:
                rows = pq.read_table(source).to_pylist()
            except Exception as e:  # pyarrow's ArrowInvalid (not Parquet), OSError
                raise PostTrainError(f"{source} is not a readable Parquet file ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
        rows = rows[:limit] if limit else rows
        # every row, not only the first: a row without a column would otherwise fail (or train) much later
        bad = next((i for i, r in enumerate(rows) if any(c not in r for c in columns)), None)
        found, where = (list(rows[bad]), f" row {bad}") if bad is not None else (list(rows[0]) if rows else [], "")
    else:
        raise PostTrainError(f"data {source!r}: use hf:ID[:CONFIG] or a .jsonl / .parquet file")
    missing = [c for c in columns if c not in found]
    if missing:
        schema = "HuggingFaceH4/ultrachat_200k" if "messages" in columns else "HuggingFaceH4/ultrafeedback_binarized"
        raise PostTrainError(f"{source}{where}: no column {', '.join(map(repr, missing))} (columns found: {', '.join(found) or 'none'}); "
                             f"expected the {schema} schema")
    return rows


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
        raise PostTrainError(f"column 'messages' must be a list of {{'role', 'content'}} messages, got {type(messages).__name__}")
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


def _prompt_of(conv):  # a conversation's messages before its last, as comparable (role, content) pairs
    return [(m.get("role"), m.get("content")) if isinstance(m, dict) else m for m in conv[:-1]]


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
        raise PostTrainError(f"max_prompt_len {max_prompt_len} must be at least 1 and below max_len {max_len}")
    chosen, rejected = row["chosen"], row["rejected"]
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(conv, list) or not conv or not isinstance(conv[-1], dict) or conv[-1].get("role") != "assistant":
            raise PostTrainError(f"column {name!r} must be a list of messages ending with the assistant's answer, got {str(conv)[:80]!r}")
    prompt_c, prompt_r = _prompt_of(chosen), _prompt_of(rejected)
    if prompt_c != prompt_r:  # a pair compares two answers to one prompt
        at = next((k for k, (a, b) in enumerate(zip(prompt_c, prompt_r)) if a != b), min(len(prompt_c), len(prompt_r)))
        raise PostTrainError(f"chosen and rejected have different prompts (message {at} differs; {len(prompt_c)} and "
                             f"{len(prompt_r)} messages before the answers): a preference pair must share every message but the last")
    prompt_msgs = chosen[:-1]
    if not prompt_msgs:
        if not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise PostTrainError("chosen holds only the answer and there is no 'prompt' string column to take the prompt from")
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


def tokenize(cmd, tokenizer, rows, cfg, max_len, max_prompt_len=None, source=""):
    """The command's examples (Example for sft, PreferenceExample for dpo), and how many rows were dropped for
    having nothing to learn left after cutting. A row that does not fit the schema is one error naming it."""
    max_prompt_len = cfg.max_prompt_len if max_prompt_len is None else max_prompt_len
    out, dropped = [], 0
    for i, row in enumerate(rows):
        try:
            if cmd == "sft":
                ex = sft_example(tokenizer, row["messages"], max_len, cfg.loss_on)
            else:
                ex = dpo_example(tokenizer, row, max_len, max_prompt_len)
            keep = all(seq.mask[1:].any() for seq in ex.sequences())  # the first token is never a target
        except KeyError as e:
            raise PostTrainError(f"{source or 'data'} row {i}: no column {e} (columns found: {', '.join(map(str, row))})") from None
        except (TypeError, AttributeError) as e:
            raise PostTrainError(f"{source or 'data'} row {i} does not fit the schema ({type(e).__name__}: {e})") from None
        except PostTrainError as e:
            raise PostTrainError(f"{source or 'data'} row {i}: {e}") from None
        out += [ex] if keep else []
        dropped += not keep
    return out, dropped


def examples_digest(examples):
    """A fingerprint of tokenized examples (ids and masks, in order): a resumed run must read what the killed
    one would have, step for step, so --resume refuses data that now tokenizes differently."""
    h = hashlib.sha256()
    for ex in examples:
        for seq in ex.sequences():  # SFT: ids, mask; DPO: chosen ids, mask, rejected ids, mask
            for a in (seq.ids, seq.mask):
                h.update(len(a).to_bytes(8, "little") + a.tobytes())
    return h.hexdigest()


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
    since sft_accumulate weighs every token alike whichever micro-batch it falls in."""
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
# losses and evaluations: SFT's, then the preference loss (DPO or SimPO)


def _float(logits):  # log-softmax in float32 at least (bf16 logits lose too much); float64 stays
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def sequence_logps(model, x, y):
    """(sum of log p(target) over the targets that are not IGNORE_INDEX, their number), per row."""
    logits, _ = model(x)
    logp = -F.cross_entropy(_float(logits).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return logp.view(y.shape).sum(-1), (y != IGNORE_INDEX).sum(-1)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), the log-probs
    summed over the completion tokens. It is log 2 when the policy is the reference, and its gradient there
    is -beta/2 on pi_c and +beta/2 on pi_r (per pair; the mean over n pairs divides by n). The implicit
    rewards beta * (pi - ref) are logged."""
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return losses.mean(), _reward_metrics(beta * chosen.detach(), beta * rejected.detach())


def simpo_loss(policy_chosen_mean_logps, policy_rejected_mean_logps, beta, gamma):
    """SimPO (Meng et al. 2024): -log sigmoid(beta * mean logp(chosen) - beta * mean logp(rejected)
    - gamma), the log-probs averaged over the completion tokens (length-normalized); no reference model. gamma is
    the absolute target reward margin: TRL's simpo_gamma, princeton-nlp/SimPO's gamma_beta_ratio * beta."""
    chosen, rejected = beta * policy_chosen_mean_logps, beta * policy_rejected_mean_logps
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return losses.mean(), _reward_metrics(chosen.detach(), rejected.detach())


def _reward_metrics(chosen, rejected):
    return {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
            "rewards/margins": (chosen - rejected).mean().item(), "rewards/accuracy": (chosen > rejected).float().mean().item()}


def preference_loss(sums, counts, cfg, reference):
    """(loss, reward metrics) of B pairs from the policy's summed log-probs and target counts of their B chosen
    rows, then B rejected rows: SimPO when cfg.loss is "simpo" (log-probs averaged over the answer, no
    reference), else DPO against reference() -> (B, 2) reference log-probs, called only then (SimPO runs no
    reference, nor counts FLOPs for one). The one place the choice is made: training and evaluation use it."""
    B = len(sums) // 2
    beta, gamma = preference_hparams(cfg.loss, cfg.beta, cfg.gamma)
    if cfg.loss == "simpo":
        return simpo_loss(sums[:B] / counts[:B], sums[B:] / counts[B:], beta, gamma)
    ref = reference().to(sums.dtype)
    return dpo_loss(sums[:B], sums[B:], ref[:, 0], ref[:, 1], beta)


def preference_hparams(loss, beta=None, gamma=None):
    """(beta, gamma) of the preference loss `loss`: the values given, else its own defaults (DEFAULT_BETA; SimPO's
    gamma SIMPO_GAMMA_BETA_RATIO * beta, the paper's gamma/beta ratio). gamma is SimPO's only."""
    beta = DEFAULT_BETA[loss] if beta is None else beta
    return beta, (SIMPO_GAMMA_BETA_RATIO * beta if gamma is None else gamma) if loss == "simpo" else None


def _no_sync(model, last):  # DDP all-reduces gradients only on the last micro-batch of a step
    return model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and not last else contextlib.nullcontext()


def sft_accumulate(model, micro_batches, ctx=contextlib.nullcontext(), world=1):
    """Backward over one step's micro-batches [(x, y), ...]; returns the mean token loss. Each micro-batch
    adds (sum of its token losses) / (assistant tokens in the whole step, over every rank), so the gradient
    is that of one large batch however the step is split (a per-micro-batch mean would weigh the tokens of
    short conversations more; tests check 4 micro-batches against 1). DDP averages over ranks: times world."""
    n_total = torch.tensor(float(sum(int((y != IGNORE_INDEX).sum()) for _, y in micro_batches)), device=micro_batches[0][0].device)
    if world > 1:
        dist.all_reduce(n_total)
    loss_sum = torch.zeros((), dtype=torch.float64, device=n_total.device)
    for i, (x, y) in enumerate(micro_batches):
        with _no_sync(model, i == len(micro_batches) - 1), ctx:
            logits, _ = model(x)
            s = F.cross_entropy(_float(logits).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        (s * world / n_total.clamp(min=1)).backward()
        loss_sum += s.detach()
    if world > 1:
        dist.all_reduce(loss_sum)  # the logged loss is the whole step's, not this rank's share
    return loss_sum / n_total.clamp(min=1), int(n_total)


def preference_accumulate(model, micro_batches, cfg, reference, ctx=contextlib.nullcontext(), world=1):
    """Backward over one step's micro-batches [(x, y, idx), ...], each x holding B chosen rows then their B
    rejected rows (one forward for both). reference(x, y, idx) -> (B, 2) reference log-probs (precomputed or
    live); SimPO needs none. Each micro-batch adds its mean loss * B / (pairs in the step): one large batch."""
    n_total = torch.tensor(float(sum(len(idx) for _, _, idx in micro_batches)), device=micro_batches[0][0].device)
    if world > 1:
        dist.all_reduce(n_total)
    loss_sum, metrics = 0.0, {}
    for i, (x, y, idx) in enumerate(micro_batches):
        B = len(idx)
        with _no_sync(model, i == len(micro_batches) - 1), ctx:
            sums, counts = sequence_logps(model, x, y)
            loss, m = preference_loss(sums, counts, cfg, lambda: reference(x, y, idx))
        (loss * B * world / n_total).backward()
        loss_sum += loss.item() * B
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v * B
    n = sum(len(idx) for _, _, idx in micro_batches)
    if world > 1:  # the logged loss and rewards are the whole step's, not this rank's share
        packed = torch.tensor([loss_sum, *metrics.values()], dtype=torch.float64, device=n_total.device)
        dist.all_reduce(packed)
        loss_sum, metrics, n = packed[0].item(), dict(zip(metrics, packed[1:].tolist())), int(n_total)
    return loss_sum / n, {k: v / n for k, v in metrics.items()}


@torch.no_grad()
def sft_eval(model, batches, ctx=contextlib.nullcontext()):
    """(mean loss per target token, no other metric) over evaluation micro-batches [(x, y), ...]."""
    total, n = 0.0, 0
    for x, y in batches:
        with ctx:
            sums, counts = sequence_logps(model, x, y)
        total, n = total - sums.sum().item(), n + int(counts.sum())
    return total / max(n, 1), {}


@torch.no_grad()
def preference_eval(model, batches, cfg, reference, ctx=contextlib.nullcontext()):
    """(mean loss per pair, {"val_rewards/...": mean per pair}) over evaluation micro-batches [(x, y, idx), ...],
    with training's preference_loss; reference(x, y, idx) as in preference_accumulate."""
    total, n, metrics = 0.0, 0, {}
    for x, y, idx in batches:
        with ctx:
            sums, counts = sequence_logps(model, x, y)
        loss, m = preference_loss(sums, counts, cfg, lambda: reference(x, y, idx))
        B = len(idx)
        total, n = total + loss.item() * B, n + B
        metrics = {k: metrics.get(k, 0.0) + v * B for k, v in m.items()}
    return total / max(n, 1), {f"val_{k}": v / max(n, 1) for k, v in metrics.items()}


@torch.no_grad()
def reference_logps(ref_model, pairs, batch_size, pad_id, device, ctx=contextlib.nullcontext(), rank=0, world=1):
    """(N, 2) float64 summed log-probs of every pair's chosen and rejected completion under the frozen
    reference, computed once before training (then the reference model can be freed). Ranks split the
    pairs and sum their shares."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float64, device=device)
    ref_model.eval()
    for start in range(rank * batch_size, len(pairs), batch_size * world):
        chunk = pairs[start:start + batch_size]
        x, y = collate([p.chosen for p in chunk] + [p.rejected for p in chunk], pad_id, limit=ref_model.config.max_seq_len, device=device)
        with ctx:
            sums, _ = sequence_logps(ref_model, x, y)
        out[start:start + len(chunk)] = sums.double().view(2, -1).T
    if world > 1:
        dist.all_reduce(out)
    return out


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2022)

# each target: (in the attention or in the block's SwiGLU MLPs, the projection); a mixture of experts gets adapters
# on every expert's projection (its router stays frozen, as the rest of the base)
LORA_TARGETS = {"q": ("attn", "q_proj"), "k": ("attn", "k_proj"), "v": ("attn", "v_proj"), "o": ("attn", "o_proj"),
                "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"), "down": ("mlp", "down_proj")}


class LoRALinear(nn.Module):
    """x W^T + (alpha / r) * dropout(x) A^T B^T with W frozen. B starts at zero, so training starts from
    the base model. The frozen weight keeps its name (`...q_proj.weight`), so merging is one addition."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        w = self.weight
        self.lora_A = nn.Parameter(torch.empty(rank, w.shape[1], device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initializes its weight
        self.scale, self.dropout, self.enabled = alpha / rank, nn.Dropout(dropout), True

    def forward(self, x):
        y = F.linear(x, self.weight)
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale if self.enabled else y

    def merged_weight(self):
        return (self.weight + self.scale * (self.lora_B @ self.lora_A)).detach()


def add_lora(model, rank, alpha, dropout=0.0, targets="q,k,v,o,gate,up,down"):
    """Freeze every weight of the Llama and put adapters on the named projections of every block."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise PostTrainError(f"lora_targets {targets!r}: pick among {','.join(LORA_TARGETS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.layers:
        for t in names:
            where, attr = LORA_TARGETS[t]
            for parent in [block.self_attn] if where == "attn" else block.ffns():
                setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha, dropout))
    return model


def merged_state_dict(model):
    """A plain Llama state dict: every adapter added into its weight, the A and B matrices left out."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            state[f"{name}.weight"] = m.merged_weight()
    return state


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model: with LoRA, DPO's reference needs no second copy of the weights."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m in mods:
            m.enabled = True


# -----------------------------------------------------------------------------
# training: a run's state, its setup, one step, evaluation, the checkpoint, and the loop (train). SFT and
# DPO share all of it; the pieces that are not post-training's own come from common.py and checkpoint.py.


# the valid range of every numeric setting, checked up front (check_config): (test, the range in words)
RANGES = {
    "eval_examples": (lambda v: v >= 0, ">= 0 (0: all)"), "eval_interval": (lambda v: v >= 0, ">= 0 (0: only at the end)"),
    "max_examples": (lambda v: v >= 0, ">= 0 (0: all)"), "max_len": (lambda v: v >= 2, ">= 2 (a token and its target)"),
    "max_prompt_len": (lambda v: v >= 1, ">= 1 (and below max_len)"),
    "batch_size": (lambda v: v >= 1, ">= 1"), "grad_accum": (lambda v: v >= 1, ">= 1"),
    "epochs": (lambda v: 0 < v < math.inf, "> 0"), "max_steps": (lambda v: v >= 0, ">= 0 (0: as many as epochs take)"),
    "lr": (lambda v: 0 <= v < math.inf, "> 0 (or 0: the paper's)"), "warmup_frac": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"), "weight_decay": (lambda v: 0 <= v < math.inf, ">= 0"),
    "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"), "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "grad_clip": (lambda v: 0 <= v < math.inf, ">= 0 (0: off)"),
    "beta": (lambda v: v is None or 0 < v < math.inf, "> 0 (leave it out for the loss's default)"),
    "gamma": (lambda v: v is None or 0 <= v < math.inf, ">= 0 (leave it out for 0.5 * beta)"),
    "lora_rank": (lambda v: v >= 0, ">= 0 (0: full fine-tuning)"), "lora_alpha": (lambda v: 0 < v < math.inf, "> 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"), "pad_multiple": (lambda v: v >= 1, ">= 1"),
    "seed": (lambda v: 0 <= v < 2 ** 64, "in [0, 2**64)"), "log_interval": (lambda v: v >= 1, ">= 1"),
    "ckpt_interval": (lambda v: v >= 0, ">= 0 (0: only final.pt)"), "keep_last": (lambda v: v >= 0, ">= 0 (0: all)"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"), "temperature": (lambda v: 0 <= v < math.inf, ">= 0 (0: greedy)"),
    "top_k": (lambda v: v >= 0, ">= 0 (0: no top-k)"), "max_skips": (lambda v: v >= 0, ">= 0"),
    "spike_factor": (lambda v: v == 0 or 1 < v < math.inf, "0 (off) or > 1"), "dist_timeout": (lambda v: v >= 1, ">= 1"),
}
CHOICES = {"loss_on": ("assistant", "all"), "loss": ("dpo", "simpo"), "ref_mode": ("precompute", "live"),
           "schedule": ("cosine", "wsd", "constant"), "dtype": ("auto", "float32", "bfloat16"), "divergence": ("stop", "skip")}


def check_config(cfg, cmd=None):
    """Every setting in its range, before anything is loaded: one ConfigError naming the first that is not, with
    its valid range (a NaN fails every test)."""
    for key, (ok, valid) in RANGES.items():
        value = getattr(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key} must be {valid}, got {value!r}")
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {getattr(cfg, key)!r}")
    if cfg.lora_rank:
        names = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
        if not names or any(t not in LORA_TARGETS for t in names):
            raise ConfigError(f"lora_targets must be a comma-separated list of {','.join(LORA_TARGETS)}, got {cfg.lora_targets!r}")
    if cmd in ("sft", "dpo") and cfg.device not in ("auto", "cpu", "cuda"):  # torchrun gives every rank its own GPU
        raise ConfigError(f"device must be one of auto, cpu, cuda for {cmd} (under torchrun each rank takes its own GPU), got {cfg.device!r}")
    if cfg.device != "auto":
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {cfg.device!r}, but no CUDA device is available here: use --device=cpu (or auto)")


def resolve(cmd, cfg):
    """Check the settings (check_config) and fill the per-command defaults: the paper's data and learning rate,
    and the preference loss's own beta (and SimPO's gamma) unless given."""
    check_config(cfg, cmd)
    data, split, eval_split, columns = DEFAULT_DATA[cmd]
    cfg.out = cfg.out or os.path.join("out", cmd)
    cfg.lr = cfg.lr or PAPER_LR[cmd]
    if not cfg.data:
        cfg.data = data
    if not cfg.split:
        cfg.split = split
    if cfg.eval_data == "":
        cfg.eval_data = cfg.data if cfg.data.startswith("hf:") else "none"
    if cmd == "dpo":
        cfg.beta, gamma = preference_hparams(cfg.loss, cfg.beta, cfg.gamma)
        cfg.gamma = gamma if cfg.loss == "simpo" else cfg.gamma
    return eval_split, columns


@dataclass
class Run:
    """What a post-training run carries from its setup to its last save: train.py keeps the same in locals;
    here the step, evaluation and save functions below share it."""
    cmd: str  # "sft" or "dpo"
    cfg: PostTrainConfig
    source_path: str  # the starting checkpoint ...
    source: dict  # ... less its weights: the tokenizer and the lineage (stage, flops, history) every save carries on
    raw_model: nn.Module  # the Llama trained (with LoRA: base + adapters), never a compile or DDP wrapper
    examples: list  # Example (sft) or PreferenceExample (dpo) records
    evals: list
    per_step: int  # examples per optimizer step, over every rank
    max_steps: int
    pad_id: int
    max_len: int  # tokens per example
    n_params: int  # non-embedding parameters of the starting model: the N of 6 N T
    device: torch.device
    ctx: object  # bf16 autocast on CUDA, a null context on CPU
    rank: int
    world: int
    log: object  # print on rank 0, silent elsewhere
    setup: dict | None = None  # what may not change across --resume (resume_setup)
    model: nn.Module | None = None  # what the step calls: raw_model, maybe compiled, maybe DDP-wrapped
    optimizer: torch.optim.Optimizer | None = None
    ref_model: nn.Module | None = None  # DPO, live reference: a frozen copy or --ref (LoRA: none, the base itself)
    ref_table: torch.Tensor | None = None  # DPO, precomputed reference: (pairs, 2) log-probs of the examples ...
    ref_eval: torch.Tensor | None = None  # ... and of the evaluation examples
    tokens: int = 0  # trained on so far, pads not counted
    flops: int = 0  # spent so far by this run, the reference's forwards included
    last_metrics: dict = field(default_factory=dict)  # the last logged step's, saved with every checkpoint
    guard: DivergenceGuard = field(default_factory=DivergenceGuard)  # never step on a non-finite loss or gradient
    last_good: str | None = None  # the newest checkpoint written or resumed from: named if the run diverges


def load_examples(cmd, tokenizer, cfg, eval_split, columns, max_len, log, max_prompt_len=None):
    """(training examples, evaluation examples) of the command; raises when no training example is left."""
    examples, dropped = tokenize(cmd, tokenizer, load_rows(cfg.data, cfg.split, columns, cfg.max_examples), cfg, max_len,
                                 max_prompt_len, cfg.data)
    evals = []
    if cfg.eval_data != "none":
        evals, _ = tokenize(cmd, tokenizer, load_rows(cfg.eval_data, eval_split, columns, cfg.eval_examples), cfg, max_len,
                            max_prompt_len, cfg.eval_data)
    if not examples:
        raise PostTrainError(f"{cfg.data}: no usable examples (dropped {dropped} with nothing to learn within max_len={max_len})")
    log(f"{cmd}: {len(examples):,} examples from {cfg.data} ({cfg.split}), {dropped} dropped (nothing to learn within "
        f"{max_len} tokens), {len(evals)} for evaluation")
    return examples, evals


def resume_setup(run):
    """What may not change across --resume for a step to mean the same examples and the same update."""
    cfg = run.cfg
    return {"command": run.cmd, "source": [run.source.get(k) for k in ("step", "tokens", "flops")],
            "examples": examples_digest(run.examples), "eval_examples": examples_digest(run.evals),
            "examples_per_step": run.per_step, "seed": cfg.seed,
            "lora": [cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets] if cfg.lora_rank else None,
            "reference": [cfg.loss, cfg.ref, cfg.ref_mode] if run.cmd == "dpo" else None}


def find_resume(run):
    """(path, checkpoint) that --resume continues from, or (None, None) on a fresh start."""
    cfg = run.cfg
    if cfg.resume and checkpoint_paths(cfg.out):  # --resume with nothing saved yet starts fresh
        path, ckpt = latest_checkpoint(cfg.out, run.source["tokenizer"], run.log, required_key="resume")
        changed = [k for k in run.setup if ckpt["resume"]["setup"].get(k) != run.setup[k]]
        if changed:
            raise ConfigError(f"--resume with a different setup ({', '.join(changed)} changed since {path}): "
                              "restore those settings, or start a new --out")
        return path, ckpt
    return None, None


def load_reference(path, tokenizer, policy_config, max_len, device):
    """The frozen --ref model, checked against the policy when it is loaded: the same tokenizer (name and size)
    and vocab, since DPO compares the two models' log-probs of the same token ids, and a context (max_seq_len)
    that covers max_len, or the reference would score cut sequences. Its width and depth may differ."""
    ckpt = load_checkpoint(path, tokenizer=tokenizer)  # another tokenizer: CheckpointError naming both
    ref = model_from_checkpoint(ckpt, device)
    del ckpt
    if ref.config.vocab_size != policy_config.vocab_size:
        raise PostTrainError(f"--ref {path} has vocab_size {ref.config.vocab_size} but the policy {policy_config.vocab_size}: "
                             "the reference must share the policy's tokenizer and vocab (use its SFT checkpoint)")
    if ref.config.max_seq_len < max_len:
        raise PostTrainError(f"--ref {path} has max_seq_len {ref.config.max_seq_len}, shorter than max_len {max_len}: pass "
                             f"--max_len={ref.config.max_seq_len} or a reference with a context of at least {max_len} tokens")
    return ref.eval().requires_grad_(False)


def setup_reference(run, resume, ref_model=None):
    """DPO's frozen reference, set up before LoRA is added (so the starting model *is* the base): its log-probs
    of every pair computed once (ref_mode "precompute"; a --ref model, ref_model from load_reference, is freed on
    return), or a model kept to run live every step. SFT and SimPO need none."""
    cfg = run.cfg
    if run.cmd != "dpo" or cfg.loss != "dpo":
        return
    how = cfg.ref or ("the base with adapters disabled" if cfg.lora_rank else f"{run.source_path} itself (frozen)")
    run.log(f"reference: {how}, {cfg.ref_mode}")
    if cfg.ref_mode == "precompute" and resume is not None:  # the tables as computed before the kill: no reference model
        run.ref_table, run.ref_eval = (t if t is None else t.to(run.device) for t in resume["resume"]["reference"])
        return
    if cfg.ref:
        frozen = ref_model if ref_model is not None else load_reference(cfg.ref, run.source["tokenizer"], run.raw_model.config,
                                                                         run.max_len, run.device)
    elif cfg.ref_mode == "precompute":  # read once, before training changes it
        frozen = run.raw_model
    elif not cfg.lora_rank:  # live: a copy, since the policy moves away from it
        frozen = copy.deepcopy(run.raw_model).eval().requires_grad_(False)
    else:  # live with LoRA: no copy, the base is the policy with its adapters switched off (batch_reference)
        frozen = None
    if cfg.ref_mode == "live":
        run.ref_model = frozen
        return
    table = lambda pairs: reference_logps(frozen, pairs, cfg.batch_size, run.pad_id, run.device, run.ctx, run.rank, run.world)
    run.ref_table, run.ref_eval = table(run.examples), table(run.evals) if run.evals else None
    run.flops += 2 * run.n_params * sum(len(p.chosen.ids) + len(p.rejected.ids) for p in run.examples + run.evals)  # forward only


def start_run(cmd, ckpt_path, cfg, eval_split, columns, log=print):
    """Everything before the first step, for settings resolve() has filled in: the starting model, the examples,
    the resume checks, DPO's reference, LoRA, AdamW and what --resume restores. Returns (run, the step resumed
    at, or None on a fresh start)."""
    rank, local_rank, world, device = setup_distributed(cfg.device, cfg.dist_timeout)
    log = log if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)  # LoRA's initialization and dropout masks
    ctx, dtype_name = autocast_for(device, cfg.dtype)
    # the starting checkpoint: its weights become the model, the rest (tokenizer, lineage) goes into every save
    source = load_checkpoint(ckpt_path)
    tok = get_tokenizer(source["tokenizer"]["name"])
    model = model_from_checkpoint(source, device)
    del source["model"]
    if tok.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{ckpt_path}: tokenizer {tok.name} has {tok.vocab_size} ids but the model only {model.config.vocab_size}")
    max_len, max_prompt_len, notes = sequence_lengths(cmd, cfg.max_len, cfg.max_prompt_len, model.config.max_seq_len)
    for note in notes:
        log(f"note: {note}")
    # --ref is checked (tokenizer, vocab, context) as it is loaded, before the data is read
    ref_model = (load_reference(cfg.ref, source["tokenizer"], model.config, max_len, device)
                 if cmd == "dpo" and cfg.loss == "dpo" and cfg.ref else None)
    examples, evals = load_examples(cmd, tok, cfg, eval_split, columns, max_len, log, max_prompt_len)
    per_step = cfg.batch_size * cfg.grad_accum * world
    run = Run(cmd=cmd, cfg=cfg, source_path=ckpt_path, source=source, raw_model=model, examples=examples, evals=evals,
              per_step=per_step, max_steps=cfg.max_steps or max(1, math.ceil(cfg.epochs * len(examples) / per_step)),
              pad_id=tok.special["<|pad|>"], max_len=max_len, n_params=model.num_params(non_embedding=True),
              device=device, ctx=ctx, rank=rank, world=world, log=log,
              guard=DivergenceGuard(cfg.divergence, cfg.max_skips, cfg.spike_factor))
    # --resume: the newest readable periodic checkpoint, refused if anything that decides a step changed
    run.setup = resume_setup(run)
    resume_path, resume = find_resume(run)
    same_on_every_rank((resume_path, resume and resume["step"]), "--resume", world)  # each rank found its own
    setup_reference(run, resume, ref_model)
    del ref_model  # precompute: freed now that the tables hold its log-probs (live: run.ref_model keeps it)
    if cfg.lora_rank:  # after the reference: the model it saw is the base the adapters sit on
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    run.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
    if resume is not None:  # the live module (LoRA: base + adapters, not the merged weights), AdamW, the RNGs (dropout)
        model.load_state_dict(resume["resume"]["module"])
        run.optimizer.load_state_dict(resume["resume"]["optimizer"])
        set_rng_state(resume["resume"]["rng"])
        run.tokens, run.flops, run.last_metrics = resume["resume"]["tokens"], resume["resume"]["flops"], resume["metrics"]
        run.guard.load_state_dict(resume["resume"].get("guard", run.guard.state_dict()))
        run.last_good = resume_path
    run.model = torch.compile(model, dynamic=True) if cfg.compile else model
    if world > 1:
        run.model = nn.parallel.DistributedDataParallel(run.model, device_ids=[local_rank] if device.type == "cuda" else None)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{run.n_params:,} non-embedding parameters, {n_trained:,} trained"
        f"{f' (LoRA r={cfg.lora_rank} on {cfg.lora_targets})' if cfg.lora_rank else ''} | {per_step} examples/step x {run.max_steps} steps "
        f"| lr {cfg.lr:.1e}{f' | {cfg.loss} beta {cfg.beta:g}' + (f' gamma {cfg.gamma:g}' if cfg.loss == 'simpo' else '') if cmd == 'dpo' else ''}"
        f" | {device.type} {dtype_name}{f' x{world} ranks' if world > 1 else ''}"
        + (f" | resumed at step {resume['step']} from {resume_path}" if resume is not None else ""))
    return run, (resume["step"] if resume is not None else None)


def micro_batches(run, examples, ids):
    """The micro-batches of examples[ids] (training or evaluation), SFT's or DPO's."""
    batches = sft_batches if run.cmd == "sft" else preference_batches
    return batches(examples, ids, run.cfg.batch_size, run.pad_id, run.cfg.pad_multiple, run.max_len, run.device)


def batch_reference(run, x, y, idx, table):
    """(B, 2) reference log-probs of a micro-batch's pairs idx: rows of a precomputed table, or a forward of
    the frozen reference (with LoRA: the policy itself with its adapters switched off)."""
    if table is not None:
        return table[idx]
    run.flops += 2 * run.n_params * int((x != run.pad_id).sum()) * run.world  # every rank runs its share
    with torch.no_grad(), run.ctx:
        if run.ref_model is not None:
            return sequence_logps(run.ref_model, x, y)[0].view(2, -1).T
        with adapters_disabled(run.raw_model):
            return sequence_logps(run.raw_model, x, y)[0].view(2, -1).T


def forward_backward(run, ids):
    """Forward and backward over this rank's examples `ids` of one step, the gradients accumulated over its
    micro-batches. Returns (the step's loss, DPO's reward metrics, the step's tokens over every rank)."""
    micro = micro_batches(run, run.examples, ids)
    step_tokens = torch.tensor(sum(int((b[0] != run.pad_id).sum()) for b in micro), device=run.device)  # pads: not counted
    if run.world > 1:
        dist.all_reduce(step_tokens)
    if run.cmd == "sft":
        loss, _ = sft_accumulate(run.model, micro, run.ctx, run.world)
        return loss.item(), {}, int(step_tokens)
    reference = lambda x, y, idx: batch_reference(run, x, y, idx, run.ref_table)
    loss, metrics = preference_accumulate(run.model, micro, run.cfg, reference, run.ctx, run.world)
    return loss, metrics, int(step_tokens)


@torch.no_grad()
def evaluate(run):
    """(val loss, val metrics) of the model in eval mode (no LoRA dropout). Every rank evaluates the same
    examples: no collective to wait in."""
    run.raw_model.eval()
    batches = micro_batches(run, run.evals, list(range(len(run.evals))))
    if run.cmd == "sft":
        result = sft_eval(run.raw_model, batches, run.ctx)
    else:
        reference = lambda x, y, idx: batch_reference(run, x, y, idx, run.ref_eval)
        result = preference_eval(run.raw_model, batches, run.cfg, reference, run.ctx)
    run.raw_model.train()
    return result


def history_record(run, step):
    """This run's entry in the checkpoint's history: what was done to the weights, on what, for how long."""
    cfg = run.cfg
    record = {"op": run.cmd, "from": os.path.abspath(run.source_path), "data": cfg.data, "split": cfg.split, "steps": step,
              "examples": step * run.per_step, "tokens": run.tokens, "flops": run.flops, "lr": cfg.lr,
              "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets} if cfg.lora_rank else None}
    if run.cmd == "dpo":
        record.update(loss=cfg.loss, beta=cfg.beta, **({"gamma": cfg.gamma} if cfg.loss == "simpo" else
                                                        {"ref": cfg.ref or "self", "ref_mode": cfg.ref_mode}))
    return record


def save(run, step, name, resumable=False):
    """OUT/name in checkpoint.py's schema: the plain Llama (LoRA merged), the starting checkpoint's lineage
    with this run appended, and when resumable what --resume needs. "model" stays a plain Llama (chat,
    eval); "resume"'s "module" shares its tensors unless LoRA is on."""
    extra = {}
    if resumable:
        extra["resume"] = {"module": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(), "rng": rng_state(),
                           "tokens": run.tokens, "flops": run.flops, "setup": run.setup, "reference": (run.ref_table, run.ref_eval),
                           "guard": run.guard.state_dict()}
    ckpt = make_checkpoint(merged_state_dict(run.raw_model), run.raw_model.config, run.source["tokenizer"],
                           Lineage.after(run.source).then(history_record(run, step)), run_flops=run.flops,
                           tokens=run.source.get("tokens", 0), step=step, posttrain_config=asdict(run.cfg),
                           metrics=run.last_metrics, **extra)
    path = os.path.join(run.cfg.out, name)
    save_checkpoint(ckpt, path)
    return path


def train(cmd, ckpt_path, cfg, log=print):
    """SFT or DPO (cmd) of the checkpoint at ckpt_path as cfg says; returns the path of OUT/final.pt. The run
    holds OUT's lock from start to end (checkpoint.claim_out_dir: one live run per folder, and a fresh run
    never deletes an earlier run's files unless --overwrite)."""
    eval_split, columns = resolve(cmd, cfg)  # checks the settings, fills in cfg.out and the command's defaults
    rank, _, world, _ = setup_distributed(cfg.device, cfg.dist_timeout)
    resuming = cfg.resume and bool(checkpoint_paths(cfg.out))
    if not resuming and os.path.abspath(ckpt_path) in [os.path.abspath(p) for p in checkpoint_paths(cfg.out) +
                                                        [os.path.join(cfg.out, "final.pt")]]:
        raise ConfigError(f"--out {cfg.out} holds {ckpt_path}, the checkpoint this run starts from: choose another --out")
    lock = rank0_first(lambda: claim_out_dir(cfg.out, resuming, cfg.overwrite), rank, world)
    try:
        return train_run(cmd, ckpt_path, cfg, eval_split, columns, log)
    finally:
        if lock is not None:
            lock.release()


def train_run(cmd, ckpt_path, cfg, eval_split, columns, log):
    """train()'s body, in a claimed OUT: set up, then the loop."""
    run, resumed_at = start_run(cmd, ckpt_path, cfg, eval_split, columns, log)
    start_step = resumed_at if resumed_at is not None else 0
    master = run.rank == 0
    trainable = [p for p in run.raw_model.parameters() if p.requires_grad]
    warmup = round(cfg.warmup_frac * run.max_steps)
    # a fresh permutation every epoch; the examples of step s are order[s * per_step:(s + 1) * per_step], a pure
    # function of (seed, step) for given data: what makes --resume exact without saving a data position
    rng = np.random.default_rng(cfg.seed)
    epochs = math.ceil(run.max_steps * run.per_step / len(run.examples))
    order = np.concatenate([rng.permutation(len(run.examples)) for _ in range(epochs)])
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if master:  # resumed: the steps about to be redone go from the metrics
        start_metrics(cfg.out, resumed_at)
    run.model.train()  # the reference's precomputation left it in eval mode
    t_start = t_window = time.perf_counter()
    ex_window = tok_window = 0
    for step in range(start_step, run.max_steps):
        # the learning rate: linear warmup, then cosine (SimPO's setting)
        lr = lr_at(step, run.max_steps, cfg.lr, warmup, cfg.schedule, cfg.min_lr_ratio)
        for group in run.optimizer.param_groups:  # set by hand, as train.py: no scheduler state to save
            group["lr"] = lr
        # this rank's share of the step's examples: ranks interleave, so each reads per_step / world of them
        mine = order[step * run.per_step:(step + 1) * run.per_step][run.rank::run.world].tolist()
        # forward and backward: the gradient of one large batch, however it is split into micro-batches and ranks
        loss, extra, step_tokens = forward_backward(run, mine)
        # clip the norm over every trained weight (an infinite max_norm when clipping is off: the norm is wanted)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf).item()
        # never step on a non-finite loss or gradient (common.DivergenceGuard); then update
        loss = float(loss)  # already the whole step's on every rank (all-reduced): every rank reaches the same verdict
        verdict = run.guard.check(step + 1, loss, grad_norm, run.last_good, run.log)
        if verdict != "skip":
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)  # free the gradients before the next step's activations
        if verdict != "step" and master:
            append_jsonl(metrics_path, {"step": step + 1, "event": verdict, "loss": loss, "grad_norm": grad_norm})
        # the cost: 6 N per trained token (LoRA: 4 N, the frozen base needs no weight gradients)
        run.tokens += step_tokens  # real tokens, pads not counted
        run.flops += (4 if cfg.lora_rank else 6) * run.n_params * step_tokens
        ex_window, tok_window, done = ex_window + run.per_step, tok_window + step_tokens, step + 1
        # log the first step, every log_interval-th and the last; throughput over the steps since the last log
        if done % cfg.log_interval == 0 or done == run.max_steps or done == 1:
            now = time.perf_counter()
            elapsed, dt = now - t_start, now - t_window
            run.last_metrics = {"step": done, "examples": done * run.per_step, "tokens": run.tokens, "loss": loss, "lr": lr,
                                "ex_s": ex_window / dt, "tok_s": tok_window / dt, "elapsed": elapsed,
                                "grad_norm": grad_norm, **extra}
            if master:  # one writer of metrics.jsonl
                append_jsonl(metrics_path, run.last_metrics)
            pref = f" | margin {extra['rewards/margins']:.4f} | acc {extra['rewards/accuracy']:.2f}" if extra else ""
            run.log(f"step {done:>5}/{run.max_steps} | loss {loss:.4f}{pref} | lr {lr:.2e} | {ex_window / dt:,.1f} ex/s | "
                    f"{tok_window / dt:,.0f} tok/s | {fmt_time(elapsed)} elapsed | "
                    f"eta {fmt_time(elapsed / (done - start_step) * (run.max_steps - done))}")
            t_window, ex_window, tok_window = time.perf_counter(), 0, 0  # the next window leaves the logging out
        # evaluate every eval_interval steps and after the last
        if run.evals and ((cfg.eval_interval and done % cfg.eval_interval == 0) or done == run.max_steps):
            val_loss, val_metrics = evaluate(run)  # every rank evaluates the same examples: no collective to wait in
            if master:
                append_jsonl(metrics_path, {"step": done, "tokens": run.tokens, "val_loss": val_loss, **val_metrics})
            run.log(f"step {done:>5} | val loss {val_loss:.4f}" + "".join(f" | {k} {v:.4f}" for k, v in val_metrics.items()))
        # a resumable checkpoint every ckpt_interval steps (final.pt covers the last), only the newest keep_last kept
        if master and cfg.ckpt_interval and done % cfg.ckpt_interval == 0 and done < run.max_steps:
            run.last_good = save(run, done, f"ckpt_{done:07d}.pt", resumable=True)
            prune_checkpoints(cfg.out, cfg.keep_last, run.log)
    # the result: final.pt (a plain Llama, LoRA merged) and the loss plot
    final = None
    if master:
        final = save(run, run.max_steps, "final.pt")
        if cfg.plot:
            plot_losses(metrics_path, os.path.join(cfg.out, "loss.png"), title=f"{cmd}: {cfg.out}")
        run.log(f"done: {final} ({fmt_time(time.perf_counter() - t_start)}, {run.tokens:,} tokens, {run.flops:.3g} FLOPs)")
    if run.world > 1:
        dist.barrier()
    return final


# -----------------------------------------------------------------------------
# chat


def fit_prompt(tokenizer, messages, max_seq_len, max_new_tokens):
    """(prompt ids, max_new_tokens, note) for generating the next answer to `messages` within the model's context:
    the one place chat (reply) and judge.py fit a conversation. The prompt may take the context less a reserve for
    the answer, min(max_new_tokens, max_seq_len // 2), so a large max_new_tokens cannot push the question out.
    Past that budget the oldest history goes first (a whole exchange: a user turn and its answers), then the system
    prompt; the newest message always stays, and if even it alone is too long it keeps its end (the template's
    tokens around it intact). max_new_tokens is then capped to the room left. note: "" when nothing was dropped
    or capped, else one line saying what was."""
    render = lambda msgs: render_chat(tokenizer, msgs, add_generation_prompt=True)[0]
    ids = render(messages)
    if len(ids) + max_new_tokens <= max_seq_len:
        return ids, max_new_tokens, ""
    total, budget = len(ids), max_seq_len - max(1, min(max_new_tokens, max_seq_len // 2))
    system = list(messages[:1]) if messages and messages[0].get("role") == "system" else []
    history, newest = list(messages[len(system):-1]), list(messages[-1:])
    done = []
    dropped = 0
    while len(ids) > budget and history:
        k = 1  # the oldest exchange: its first message and the answers up to the next user turn
        while k < len(history) and history[k].get("role") != "user":
            k += 1
        history, dropped = history[k:], dropped + k
        ids = render(system + history + newest)
    if dropped:
        done.append(f"dropped the {dropped} oldest message{'s' * (dropped > 1)} of the history")
    if len(ids) > budget and system:
        system, ids = [], render(newest)
        done.append("dropped the system prompt")
    if len(ids) > budget:
        keep = budget - 4  # [<|endoftext|>, <|role|>] + the end of the content + [<|end|>, <|assistant|>]
        if keep < 1:
            raise PostTrainError(f"the model's max_seq_len {max_seq_len} leaves no room for a prompt: use a model with a longer context")
        ids = ids[:2] + ids[2:-2][-keep:] + ids[-2:]
        done.append(f"the newest message alone does not fit, so only its last {keep} tokens are kept")
    capped = min(max_new_tokens, max_seq_len - len(ids))
    if capped < max_new_tokens:
        done.append(f"max_new_tokens capped from {max_new_tokens} to {capped}")
    return ids, capped, (f"the conversation ({total} tokens) and max_new_tokens={max_new_tokens} exceed the model's "
                         f"max_seq_len {max_seq_len}: " + "; ".join(done))


def _note(text):
    print(f"note: {text}", file=sys.stderr)


@torch.no_grad()
def reply(model, tokenizer, messages, max_new_tokens=256, temperature=0.7, top_k=50, generator=None, log=_note):
    """The assistant's next answer to `messages`, with the training template; stops at <|end|>. A conversation
    too long for the context is fitted by fit_prompt (oldest history dropped first, max_new_tokens capped), and
    log(note) says what it changed. Ids the tokenizer does not use are never sampled."""
    ids, max_new_tokens, note = fit_prompt(tokenizer, messages, model.config.max_seq_len, max_new_tokens)
    if note and log:
        log(note)
    device = next(model.parameters()).device
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature, top_k=top_k or None,
                         eos_id=tokenizer.special["<|end|>"], generator=generator,
                         suppress_ids=torch.tensor(tokenizer.unused_ids(model.config.vocab_size), dtype=torch.long))
    new = out[0, len(ids):].tolist()
    end = tokenizer.special["<|end|>"]
    return tokenizer.decode(new[:new.index(end)] if end in new else new)


def load_chat_model(path, device="auto"):
    """(Llama in eval mode, tokenizer) of a checkpoint."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    ckpt = load_checkpoint(path)
    tok = get_tokenizer(ckpt["tokenizer"]["name"])
    return model_from_checkpoint(ckpt, device).eval(), tok


def chat(ckpt_path, cfg):
    model, tok = load_chat_model(ckpt_path, cfg.device)
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    answer = lambda msgs: reply(model, tok, msgs, cfg.max_new_tokens, cfg.temperature, cfg.top_k, gen)
    if cfg.prompt:
        print(answer(system + [{"role": "user", "content": cfg.prompt}]))
        return
    print(f"chatting with {ckpt_path}: /reset starts over, /quit or Ctrl-D leaves")
    messages = list(system)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/reset" or not line:
            messages = list(system) if line else messages
            continue
        messages.append({"role": "user", "content": line})
        text = answer(messages)
        messages.append({"role": "assistant", "content": text})
        print(f"assistant> {text}")


# -----------------------------------------------------------------------------
# command line


def parse_args(argv):
    """(command, checkpoint, PostTrainConfig) from `CMD CKPT [config.py ...] [--key=value | --key value ...]`."""
    usage = "usage: python posttrain.py sft|dpo|chat CKPT [config.py ...] [--key=value ...]"
    if not argv or argv[0] not in COMMANDS:
        raise PostTrainError(usage)
    types = {f.name: f.type for f in fields(PostTrainConfig)}
    rest, args, ckpt, i = argv[1:], [], None, 0
    while i < len(rest):
        a = rest[i]
        if a.startswith("--") and "=" not in a and types.get(a[2:]) is not bool and i + 1 < len(rest):
            args.append(f"{a}={rest[i + 1]}")  # --key value, as well as train.py's --key=value
            i += 1
        elif not a.startswith("--") and not a.endswith(".py") and ckpt is None:
            ckpt = a
        else:
            args.append(a)
        i += 1
    if ckpt is None:
        raise PostTrainError(f"{argv[0]} needs a checkpoint; {usage}")
    cfg = configure(PostTrainConfig, args)
    check_config(cfg, argv[0])  # every range up front, before a checkpoint or the data is read
    return argv[0], ckpt, cfg


def main(argv):
    with cli_errors(DataError, PostTrainError):
        cmd, ckpt, cfg = parse_args(argv)
        chat(ckpt, cfg) if cmd == "chat" else train(cmd, ckpt, cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
