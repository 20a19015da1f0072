"""
posttrain.py: post-training of a series member, as the paper does in section 4 (seed 000): SFT on
UltraChat-200k (lr 3e-5), then DPO on UltraFeedback (lr 5e-7), "following the setting of Meng et al."
(SimPO), judged with MT-Bench (judge.py). SimPO and LoRA are options (seed 004, Tanuki: LoRA for cheap
DPO runs, beta 0.01 to 0.1, lower learning rates for stronger bases).

    python posttrain.py sft CKPT configs/sft_paper.py --out=out/sft_1b
    python posttrain.py dpo out/sft_1b/final.pt configs/dpo_paper.py --out=out/dpo_1b
    python posttrain.py dpo CKPT --ref REF.pt --data prefs.jsonl --loss simpo --beta 2.0 --gamma 1.0
    python posttrain.py sft CKPT configs/sft_tiny.py --lora_rank 8 --lora_targets q,v
    python posttrain.py chat out/dpo_1b/final.pt [--prompt "Hello"] [--system "..."] [--temperature 0]
    python posttrain.py sft CKPT configs/sft_paper.py --out=out/sft_1b --resume   # after a kill: continues exactly
    torchrun --standalone --nproc_per_node=8 posttrain.py sft CKPT configs/sft_paper.py

Settings are the fields of PostTrainConfig, from config files and --key=value (or --key value), exactly
as in train.py. The result is a checkpoint in train.py's format (OUT/final.pt: the model, its config, the
tokenizer, flops carried over and increased, history + [{"op": "sft" | "dpo", ...}]), a plain Llama
also when LoRA was used (the adapters are merged into the weights on save). Every ckpt_interval steps
OUT/ckpt_STEP.pt (the last keep_last of them) holds the same plus what an exact resume needs: the live
module (with LoRA: base + adapters), the optimizer, the RNG states and DPO's precomputed reference
log-probs; the examples of a step are a pure function of (seed, step), so `--resume` continues bit for
bit, as train.py does (tests/test_posttrain.py kills a run and checks).

The chat template (one for training and generation; the specials live in data.SPECIALS' ids):
    <|endoftext|> <|system|>SYSTEM<|end|> <|user|>QUESTION<|end|> <|assistant|>ANSWER<|end|> <|user|>...
A conversation starts with <|endoftext|>, as every pretraining document did after the one before it.
"""

import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data import DataError, get_tokenizer
from checkpoint import CheckpointError, checkpoint_paths, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from common import (ConfigError, append_jsonl, autocast_for, configure, fmt_time, lr_at, make_optimizer, plot_losses, rng_state,
                    set_rng_state, setup_distributed, start_metrics)
from model import IGNORE_INDEX, model_from_checkpoint

COMMANDS = ("sft", "dpo", "chat")
# what each command reads, unless --data / --split say otherwise: the datasets of the paper (SimPO's setting)
DEFAULT_DATA = {"sft": ("hf:HuggingFaceH4/ultrachat_200k", "train_sft", "test_sft", ["messages"]),
                "dpo": ("hf:HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "test_prefs", ["chosen", "rejected"])}
PAPER_LR = {"sft": 3e-5, "dpo": 5e-7}  # section 4.1, the same for every member of the series


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
    max_len: int = 1024  # tokens per conversation (prompt + answers); longer ones are cut
    max_prompt_len: int = 512  # DPO: a prompt longer than this keeps its end when the pair does not fit
    loss_on: str = "assistant"  # SFT: "assistant" (answers + their <|end|>; seed 004) or "all" (the zephyr recipe)
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
    loss: str = "dpo"  # "dpo" (Rafailov et al.) or "simpo" (Meng et al.: no reference model)
    beta: float = 0.01  # DPO: 0.01 in the paper's configs (seed 004: 0.01 to 0.1); SimPO: about 2.0
    gamma: float = 1.0  # SimPO's target reward margin
    ref: str = ""  # the frozen reference; "" is CKPT itself (with LoRA: the base with adapters disabled)
    ref_mode: str = "precompute"  # "precompute" (once, before training, then freed) or "live" (every step)
    # LoRA (Hu et al.): 0 is full fine-tuning
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q,k,v,o,gate,up,down"
    # system
    device: str = "auto"
    dtype: str = "auto"  # bf16 autocast on CUDA, float32 on CPU (train.autocast_for)
    compile: bool = False  # padded batches change shape every step, so compiling is off by default
    pad_multiple: int = 8  # pad batches to a multiple of this length (fewer shapes; results do not depend on it)
    seed: int = 1337
    log_interval: int = 10
    ckpt_interval: int = 0  # steps between resumable saves of OUT/ckpt_STEP.pt (0: only final.pt at the end)
    keep_last: int = 2  # periodic checkpoints kept (0: all)
    resume: bool = False  # continue from the newest readable OUT/ckpt_STEP.pt, exactly
    plot: bool = True
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
    ids[i] is an assistant's answer token or the <|end|> after it: what SFT learns by default (seed 004:
    loss on the response only). add_generation_prompt appends <|assistant|>, so rendering the first k
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
# data: rows in the Hugging Face schemas -> token ids and masks


def load_rows(source, split, columns, limit=0):
    """Rows (dicts) of 'hf:ID[:CONFIG]' (that split, through datasets) or a local .jsonl / .parquet file.
    A missing column is one error naming it and the schema expected."""
    if source.startswith("hf:"):
        from datasets import load_dataset
        dataset_id, _, config = source[3:].partition(":")
        try:
            rows = load_dataset(dataset_id, config or None, split=split)
        except Exception as e:
            raise PostTrainError(f"could not load {source} split {split!r} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                                 "offline, pass a local .jsonl or .parquet file in the same schema") from None
        found = rows.column_names
        rows = rows.select(range(min(limit, len(rows)))) if limit else rows
    elif source.endswith(".jsonl"):
        if not os.path.isfile(source):
            raise PostTrainError(f"no data file {source}")
        with open(source, encoding="utf-8") as f:
            try:
                rows = [json.loads(line) for line in f if line.strip()]
            except json.JSONDecodeError as e:
                raise PostTrainError(f"{source}: a line is not JSON ({e})") from None
        found = list(rows[0]) if rows else []
    elif source.endswith(".parquet"):
        if not os.path.isfile(source):
            raise PostTrainError(f"no data file {source}")
        import pyarrow.parquet as pq
        rows = pq.read_table(source).to_pylist()
        found = list(rows[0]) if rows else []
    else:
        raise PostTrainError(f"data {source!r}: use hf:ID[:CONFIG] or a .jsonl / .parquet file")
    missing = [c for c in columns if c not in found]
    if missing:
        schema = "HuggingFaceH4/ultrachat_200k" if "messages" in columns else "HuggingFaceH4/ultrafeedback_binarized"
        raise PostTrainError(f"{source}: no column {', '.join(map(repr, missing))} (columns found: {', '.join(found) or 'none'}); "
                             f"expected the {schema} schema")
    return rows[:limit] if limit and isinstance(rows, list) else rows


def sft_example(tokenizer, messages, max_len, loss_on="assistant"):
    ids, mask = render_chat(tokenizer, messages)
    if loss_on == "all":  # every token after the first, prompts too
        mask = [0] + [1] * (len(ids) - 1)
    return ids[:max_len], mask[:max_len]


def dpo_example(tokenizer, row, max_len, max_prompt_len):
    """((chosen ids, mask), (rejected ids, mask)), the mask on the completion only: the last (assistant)
    message and its <|end|>. The prompt is chosen[:-1] (or the `prompt` string when that is empty). When a
    pair does not fit, the prompt keeps its last max_prompt_len tokens, then the answers are cut."""
    chosen, rejected = row["chosen"], row["rejected"]
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(conv, list) or not conv or not isinstance(conv[-1], dict) or conv[-1].get("role") != "assistant":
            raise PostTrainError(f"column {name!r} must be a list of messages ending with the assistant's answer, got {str(conv)[:80]!r}")
    prompt_msgs = chosen[:-1] or [{"role": "user", "content": row.get("prompt", "")}]
    prompt, _ = render_chat(tokenizer, prompt_msgs, add_generation_prompt=True)
    pair = []
    for answer in (chosen[-1], rejected[-1]):
        full, _ = render_chat(tokenizer, prompt_msgs + [answer])
        pair.append(full[len(prompt):])  # the answer and its <|end|>, by the prefix property of the template
    longest = max(len(c) for c in pair)
    if len(prompt) + longest > max_len:
        prompt = prompt[-max_prompt_len:] if len(prompt) > max_prompt_len else prompt
    room = max_len - len(prompt)
    return tuple((prompt + c[:room], [0] * len(prompt) + [1] * len(c[:room])) for c in pair)


def tokenize(cmd, tokenizer, rows, cfg, max_len):
    """Examples of the command as numpy arrays (int32 ids, bool masks: 200k conversations as Python lists of
    ints would take ~10 GB), and how many rows were dropped for having nothing to learn left after cutting."""
    arr = lambda seq: (np.asarray(seq[0], dtype=np.int32), np.asarray(seq[1], dtype=np.bool_))
    out, dropped = [], 0
    for i, row in enumerate(rows):
        try:
            if cmd == "sft":
                ex = arr(sft_example(tokenizer, row["messages"], max_len, cfg.loss_on))
                keep = ex[1][1:].any()
            else:
                ex = tuple(map(arr, dpo_example(tokenizer, row, max_len, cfg.max_prompt_len)))
                keep = ex[0][1][1:].any() and ex[1][1][1:].any()
        except (KeyError, TypeError, AttributeError) as e:
            raise PostTrainError(f"row {i} does not fit the schema ({type(e).__name__}: {e})") from None
        out += [ex] if keep else []
        dropped += not keep
    return out, dropped


def examples_digest(examples):
    """A fingerprint of tokenized examples (ids and masks, in order): a resumed run must read what the killed
    one would have, step for step, so --resume refuses data that now tokenizes differently."""
    h = hashlib.sha256()
    for ex in examples:
        for a in (ex if isinstance(ex[0], np.ndarray) else ex[0] + ex[1]):  # SFT: (ids, mask); DPO: a pair of them
            h.update(len(a).to_bytes(8, "little") + a.tobytes())
    return h.hexdigest()


def collate(seqs, pad_id, multiple=1, limit=None, device="cpu"):
    """Inputs x and targets y (B, T) from (ids, mask) pairs: y[t] = ids[t+1] where mask[t+1], else
    IGNORE_INDEX. Padding is on the right, one conversation per row, so no row attends to another and a
    causal model's log-probs of a row do not depend on how far it is padded (tests check it)."""
    T = max(len(ids) for ids, _ in seqs) - 1
    T = min(-(-T // multiple) * multiple, limit or 1 << 30)
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, mask) in enumerate(seqs):
        n = len(ids) - 1
        x[i, :n] = torch.as_tensor(ids[:-1])
        y[i, :n] = torch.where(torch.as_tensor(mask[1:], dtype=torch.bool), torch.as_tensor(ids[1:]), IGNORE_INDEX)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# losses


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
    - gamma), the log-probs averaged over the completion tokens (length-normalized); no reference model."""
    chosen, rejected = beta * policy_chosen_mean_logps, beta * policy_rejected_mean_logps
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return losses.mean(), _reward_metrics(chosen.detach(), rejected.detach())


def _reward_metrics(chosen, rejected):
    return {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
            "rewards/margins": (chosen - rejected).mean().item(), "rewards/accuracy": (chosen > rejected).float().mean().item()}


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
            if cfg.loss == "simpo":
                loss, m = simpo_loss(sums[:B] / counts[:B], sums[B:] / counts[B:], cfg.beta, cfg.gamma)
            else:
                ref = reference(x, y, idx).to(sums.dtype)
                loss, m = dpo_loss(sums[:B], sums[B:], ref[:, 0], ref[:, 1], cfg.beta)
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
def reference_logps(ref_model, pairs, batch_size, pad_id, device, ctx=contextlib.nullcontext(), rank=0, world=1):
    """(N, 2) float64 summed log-probs of every pair's chosen and rejected completion under the frozen
    reference, computed once before training (then the reference model can be freed). Ranks split the
    pairs and sum their shares."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float64, device=device)
    ref_model.eval()
    for start in range(rank * batch_size, len(pairs), batch_size * world):
        chunk = pairs[start:start + batch_size]
        x, y = collate([c for c, _ in chunk] + [r for _, r in chunk], pad_id, limit=ref_model.config.max_seq_len, device=device)
        with ctx:
            sums, _ = sequence_logps(ref_model, x, y)
        out[start:start + len(chunk)] = sums.double().view(2, -1).T
    if world > 1:
        dist.all_reduce(out)
    return out


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021)

LORA_TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


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
            parent_name, attr = LORA_TARGETS[t].split(".")
            parent = getattr(block, parent_name)
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
# training (SFT and DPO share the loop; the pieces come from train.py)


def resolve(cmd, cfg):
    """Fill the per-command defaults and check the choices."""
    data, split, eval_split, columns = DEFAULT_DATA[cmd]
    cfg.out = cfg.out or os.path.join("out", cmd)
    cfg.lr = cfg.lr or PAPER_LR[cmd]
    if not cfg.data:
        cfg.data = data
    if not cfg.split:
        cfg.split = split
    if cfg.eval_data == "":
        cfg.eval_data = cfg.data if cfg.data.startswith("hf:") else "none"
    for key, allowed in (("loss_on", ("assistant", "all")), ("loss", ("dpo", "simpo")), ("ref_mode", ("precompute", "live"))):
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {getattr(cfg, key)!r}")
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ConfigError("batch_size and grad_accum must be at least 1")
    return eval_split, columns


def train(cmd, ckpt_path, cfg, log=print):
    """SFT or DPO (cmd) of the checkpoint at ckpt_path as cfg says; returns the path of OUT/final.pt."""
    eval_split, columns = resolve(cmd, cfg)
    rank, local_rank, world, device = setup_distributed(cfg.device)
    master = rank == 0
    log = log if master else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    ctx, dtype_name = autocast_for(device, cfg.dtype)
    ckpt = load_checkpoint(ckpt_path)
    tok = get_tokenizer(ckpt["tokenizer"]["name"])
    model = model_from_checkpoint(ckpt, device)
    del ckpt["model"]  # what save() needs of it is the rest: tokenizer, history, flops
    if tok.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{ckpt_path}: tokenizer {tok.name} has {tok.vocab_size} ids but the model only {model.config.vocab_size}")
    max_len = min(cfg.max_len, model.config.max_seq_len)
    pad_id, n_params = tok.special["<|pad|>"], model.num_params(non_embedding=True)

    # --- data ---
    examples, dropped = tokenize(cmd, tok, load_rows(cfg.data, cfg.split, columns, cfg.max_examples), cfg, max_len)
    evals = []
    if cfg.eval_data != "none":
        evals, _ = tokenize(cmd, tok, load_rows(cfg.eval_data, eval_split, columns, cfg.eval_examples), cfg, max_len)
    if not examples:
        raise PostTrainError(f"{cfg.data}: no usable examples (dropped {dropped} with nothing to learn within max_len={max_len})")
    log(f"{cmd}: {len(examples):,} examples from {cfg.data} ({cfg.split}), {dropped} dropped (nothing to learn within "
        f"{max_len} tokens), {len(evals)} for evaluation")
    per_step = cfg.batch_size * cfg.grad_accum * world
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(examples) / per_step))

    # --- the state to resume: what may not change for a step to mean the same examples and the same update ---
    setup = {"command": cmd, "source": [ckpt.get(k) for k in ("step", "tokens", "flops")], "examples": examples_digest(examples),
             "eval_examples": examples_digest(evals), "examples_per_step": per_step, "seed": cfg.seed,
             "lora": [cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets] if cfg.lora_rank else None,
             "reference": [cfg.loss, cfg.ref, cfg.ref_mode] if cmd == "dpo" else None}
    resume = None
    if cfg.resume:
        resume_path, resume = latest_checkpoint(cfg.out, ckpt["tokenizer"], log, required_key="resume")
        changed = [k for k in setup if resume["resume"]["setup"].get(k) != setup[k]]
        if changed:
            raise ConfigError(f"--resume with a different setup ({', '.join(changed)} changed since {resume_path}): "
                              "restore those settings, or start a new --out")
    elif os.path.abspath(ckpt_path) in map(os.path.abspath, checkpoint_paths(cfg.out)):
        raise ConfigError(f"--out {cfg.out} holds {ckpt_path}, whose periodic checkpoints a fresh run deletes: choose another --out")

    # --- the reference (DPO): precomputed once by the starting weights or --ref, or run live ---
    flops, ref_model, ref_table, ref_eval = 0, None, None, None
    use_ref = cmd == "dpo" and cfg.loss == "dpo"
    if use_ref:
        how = cfg.ref or ("the base with adapters disabled" if cfg.lora_rank else f"{ckpt_path} itself (frozen)")
        log(f"reference: {how}, {cfg.ref_mode}")
        load_ref = lambda: model_from_checkpoint(load_checkpoint(cfg.ref, tokenizer=ckpt["tokenizer"]), device).eval().requires_grad_(False)
        if cfg.ref_mode == "precompute" and resume is not None:  # the tables as computed before the kill: no reference model
            ref_table, ref_eval = (t if t is None else t.to(device) for t in resume["resume"]["reference"])
        elif cfg.ref_mode == "precompute":  # before LoRA is added: the starting model *is* the base
            frozen = load_ref() if cfg.ref else model
            ref_table = reference_logps(frozen, examples, cfg.batch_size, pad_id, device, ctx, rank, world)
            ref_eval = reference_logps(frozen, evals, cfg.batch_size, pad_id, device, ctx, rank, world) if evals else None
            flops += 2 * n_params * sum(len(c[0]) + len(r[0]) for c, r in examples + evals)  # forward only
            del frozen  # a --ref model is freed: only the policy stays in memory
        elif cfg.ref:
            ref_model = load_ref()
        elif not cfg.lora_rank:
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # LoRA: forward 2N + activation gradients 2N per token; the adapters' own weight gradients are negligible
    train_factor = 4 if cfg.lora_rank else 6
    raw_model = model
    optimizer = make_optimizer(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
    if resume is not None:  # the live module (LoRA: base + adapters, not the merged weights), AdamW, the RNGs (dropout)
        raw_model.load_state_dict(resume["resume"]["module"])
        optimizer.load_state_dict(resume["resume"]["optimizer"])
        set_rng_state(resume["resume"]["rng"])
    if cfg.compile:
        model = torch.compile(model, dynamic=True)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)

    def reference(x, y, idx, table=None):
        if table is not None:
            return table[idx]
        nonlocal flops
        flops += 2 * n_params * int((x != pad_id).sum()) * world  # every rank runs its share
        with torch.no_grad(), ctx:
            if ref_model is not None:
                return sequence_logps(ref_model, x, y)[0].view(2, -1).T
            with adapters_disabled(raw_model):
                return sequence_logps(raw_model, x, y)[0].view(2, -1).T

    def batches(exs, ids):
        """Micro-batches of the examples `ids` (sorted by length: less padding, same gradient, see above)."""
        ids = sorted(ids, key=lambda i: -len(exs[i][0]) if cmd == "sft" else -max(len(exs[i][0][0]), len(exs[i][1][0])))
        out = []
        for s in range(0, len(ids), cfg.batch_size):
            chunk = ids[s:s + cfg.batch_size]
            seqs = [exs[i] for i in chunk] if cmd == "sft" else [exs[i][0] for i in chunk] + [exs[i][1] for i in chunk]
            x, y = collate(seqs, pad_id, cfg.pad_multiple, max_len, device)
            out.append((x, y) if cmd == "sft" else (x, y, torch.tensor(chunk, device=device)))
        return out

    @torch.no_grad()
    def evaluate():
        raw_model.eval()
        total, n, metrics = 0.0, 0, {}
        for b in batches(evals, list(range(len(evals)))):
            with ctx:
                sums, counts = sequence_logps(raw_model, b[0], b[1])
            if cmd == "sft":
                total, n = total - sums.sum().item(), n + int(counts.sum())
                continue
            B = len(b[2])
            if cfg.loss == "simpo":
                loss, m = simpo_loss(sums[:B] / counts[:B], sums[B:] / counts[B:], cfg.beta, cfg.gamma)
            else:
                ref = reference(b[0], b[1], b[2], ref_eval).to(sums.dtype)
                loss, m = dpo_loss(sums[:B], sums[B:], ref[:, 0], ref[:, 1], cfg.beta)
            total, n = total + loss.item() * B, n + B
            metrics = {k: metrics.get(k, 0.0) + v * B for k, v in m.items()}
        raw_model.train()
        return total / max(n, 1), {f"val_{k}": v / max(n, 1) for k, v in metrics.items()}

    # --- the loop: warmup + cosine (train.lr_at), global batches of shuffled examples ---
    warmup = round(cfg.warmup_frac * max_steps)
    # the examples of step s are order[s * per_step:(s + 1) * per_step]: a pure function of (seed, step) for given data
    rng = np.random.default_rng(cfg.seed)
    order = np.concatenate([rng.permutation(len(examples)) for _ in range(math.ceil(max_steps * per_step / len(examples)))])
    os.makedirs(cfg.out, exist_ok=True)
    start_step = resume["step"] if resume is not None else 0
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if master:
        start_metrics(cfg.out, start_step if resume is not None else None)
    log(f"{n_params:,} non-embedding parameters, {sum(p.numel() for p in trainable):,} trained"
        f"{f' (LoRA r={cfg.lora_rank} on {cfg.lora_targets})' if cfg.lora_rank else ''} | {per_step} examples/step x {max_steps} steps "
        f"| lr {cfg.lr:.1e} | {device.type} {dtype_name}{f' x{world} ranks' if world > 1 else ''}"
        + (f" | resumed at step {start_step} from {resume_path}" if resume is not None else ""))

    def save(step, name, last_metrics, resumable=False):
        record = {"op": cmd, "from": os.path.abspath(ckpt_path), "data": cfg.data, "split": cfg.split, "steps": step,
                  "examples": step * per_step, "tokens": tokens, "flops": flops, "lr": cfg.lr,
                  "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets} if cfg.lora_rank else None}
        if cmd == "dpo":
            record.update(loss=cfg.loss, beta=cfg.beta, **({"gamma": cfg.gamma} if cfg.loss == "simpo" else
                                                            {"ref": cfg.ref or "self", "ref_mode": cfg.ref_mode}))
        out = {"model": merged_state_dict(raw_model), "model_config": asdict(raw_model.config), "tokenizer": ckpt["tokenizer"],
               "step": step, "tokens": ckpt.get("tokens", 0), "flops": ckpt.get("flops", 0) + flops,
               "history": list(ckpt.get("history", [])) + [record], "posttrain_config": asdict(cfg), "metrics": last_metrics}
        if "stage" in ckpt:
            out["stage"] = ckpt["stage"]
        if resumable:  # "model" stays a plain Llama (chat, eval); "module" shares its tensors unless LoRA is on
            out["resume"] = {"module": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(),
                             "tokens": tokens, "flops": flops, "setup": setup, "reference": (ref_table, ref_eval)}
        path = os.path.join(cfg.out, name)
        save_checkpoint(out, path)
        return path

    model.train()
    tokens, last_metrics = (resume["resume"]["tokens"], resume["metrics"]) if resume is not None else (0, {})
    flops = resume["resume"]["flops"] if resume is not None else flops  # the reference's precomputation included
    t_start = t_window = time.perf_counter()
    ex_window = tok_window = 0
    for step in range(start_step, max_steps):
        lr = lr_at(step, max_steps, cfg.lr, warmup, cfg.schedule, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mine = order[step * per_step:(step + 1) * per_step][rank::world].tolist()
        micro = batches(examples, mine)
        step_tokens = torch.tensor(sum(int((b[0] != pad_id).sum()) for b in micro), device=device)  # pads: not counted
        if world > 1:
            dist.all_reduce(step_tokens)
        step_tokens = int(step_tokens)
        if cmd == "sft":
            loss, _ = sft_accumulate(model, micro, ctx, world)
            loss, extra = loss.item(), {}
        else:
            loss, extra = preference_accumulate(model, micro, cfg, lambda x, y, idx: reference(x, y, idx, ref_table), ctx, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += step_tokens
        flops += train_factor * n_params * step_tokens
        ex_window, tok_window, done = ex_window + per_step, tok_window + step_tokens, step + 1
        if done % cfg.log_interval == 0 or done == max_steps or done == 1:
            now = time.perf_counter()
            elapsed, dt = now - t_start, now - t_window
            last_metrics = {"step": done, "examples": done * per_step, "tokens": tokens, "loss": loss, "lr": lr,
                            "ex_s": ex_window / dt, "tok_s": tok_window / dt, "elapsed": elapsed,
                            "grad_norm": grad_norm.item() if grad_norm is not None else None, **extra}
            if master:
                append_jsonl(metrics_path, last_metrics)
            pref = f" | margin {extra['rewards/margins']:.4f} | acc {extra['rewards/accuracy']:.2f}" if extra else ""
            log(f"step {done:>5}/{max_steps} | loss {loss:.4f}{pref} | lr {lr:.2e} | {ex_window / dt:,.1f} ex/s | "
                f"{tok_window / dt:,.0f} tok/s | {fmt_time(elapsed)} elapsed | eta {fmt_time(elapsed / (done - start_step) * (max_steps - done))}")
            t_window, ex_window, tok_window = time.perf_counter(), 0, 0
        if evals and ((cfg.eval_interval and done % cfg.eval_interval == 0) or done == max_steps):
            val_loss, val_metrics = evaluate()  # every rank evaluates the same examples: no collective to wait in
            if master:
                append_jsonl(metrics_path, {"step": done, "tokens": tokens, "val_loss": val_loss, **val_metrics})
            log(f"step {done:>5} | val loss {val_loss:.4f}" + "".join(f" | {k} {v:.4f}" for k, v in val_metrics.items()))
        if master and cfg.ckpt_interval and done % cfg.ckpt_interval == 0 and done < max_steps:
            save(done, f"ckpt_{done:07d}.pt", last_metrics, resumable=True)
            prune_checkpoints(cfg.out, cfg.keep_last)
    final = None
    if master:
        final = save(max_steps, "final.pt", last_metrics)
        if cfg.plot:
            plot_losses(metrics_path, os.path.join(cfg.out, "loss.png"), title=f"{cmd}: {cfg.out}")
        log(f"done: {final} ({fmt_time(time.perf_counter() - t_start)}, {tokens:,} tokens, {flops:.3g} FLOPs)")
    if world > 1:
        dist.barrier()
    return final


# -----------------------------------------------------------------------------
# chat


def unused_ids(tokenizer, vocab_size):
    """The ids no text ever maps to: the vocab's padding to a multiple of 64 (262..319 for bytes). Training
    never targets them, so only a barely trained model gives them weight, and a reply would show <|N|>.
    The specials stay allowed: <|end|> ends the turn."""
    used = torch.zeros(vocab_size, dtype=torch.bool)
    used[:tokenizer.n_base] = True
    used[list(tokenizer.special.values())] = True
    return (~used).nonzero().flatten()


@torch.no_grad()
def reply(model, tokenizer, messages, max_new_tokens=256, temperature=0.7, top_k=50, generator=None):
    """The assistant's next answer to `messages`, with the training template; stops at <|end|>. A
    conversation too long for the context loses its oldest tokens. Ids the tokenizer does not use are
    never sampled."""
    ids, _ = render_chat(tokenizer, messages, add_generation_prompt=True)
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - 1)
    ids = ids[-(model.config.max_seq_len - max_new_tokens):]
    device = next(model.parameters()).device
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature, top_k=top_k or None,
                         eos_id=tokenizer.special["<|end|>"], generator=generator,
                         suppress_ids=unused_ids(tokenizer, model.config.vocab_size))
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
    return argv[0], ckpt, configure(PostTrainConfig, args)


def main(argv):
    try:
        cmd, ckpt, cfg = parse_args(argv)
        chat(ckpt, cfg) if cmd == "chat" else train(cmd, ckpt, cfg)
    except (ConfigError, CheckpointError, DataError, PostTrainError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
