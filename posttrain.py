"""
posttrain.py: post-training of a series member as Yano et al. 2025 do in section 4.1: SFT on UltraChat-200k
(lr 3e-5), then DPO on UltraFeedback (lr 5e-7), "following the setting of Meng et al." (SimPO, Meng et al.
2024), judged with MT-Bench (judge.py). SimPO and LoRA (Hu et al. 2022) are options; the Tanuki-8B/8x8B
post-training report (GENIAC Matsuo Lab LLM team 2024) used LoRA for cheap DPO runs, beta 0.01 to 0.1, and
lower learning rates for stronger bases.

    python posttrain.py sft CKPT configs/sft_paper.py --out=out/sft_1b
    python posttrain.py dpo out/sft_1b/final.pt configs/dpo_paper.py --out=out/dpo_1b
    python posttrain.py dpo CKPT --ref REF.pt --data prefs.jsonl --beta 0.1
    python posttrain.py dpo CKPT --data prefs.jsonl --loss simpo --beta 2.0 --gamma 1.0   # SimPO: no reference
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
optimizer (AdamW's state by parameter name), the RNG states and DPO's precomputed reference log-probs; the
examples of a step are a pure function of (seed, step), so `--resume` continues bit for bit, as train.py
does (tests/test_posttrain.py kills a run and checks).

The data (the chat template, SFT and preference examples, padded micro-batches) is chat_data.py's. Here, top
to bottom: the settings; the losses (SFT's, and one preference loss that is DPO or SimPO) and their
evaluations; LoRA; the pieces of a run (the reference, --resume, one step, the checkpoint) and train(), whose
loop reads as train.py's; chat; the command line.
"""

import contextlib
import copy
import functools
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

import parallel
from chat_data import (collate, examples_digest, fit_prompt, load_examples, preference_batches, sequence_lengths,
                       sft_batches)
from checkpoint import (Lineage, checkpoint_paths, claim_out_dir, latest_checkpoint, load_checkpoint, make_checkpoint,
                        model_from_checkpoint, prune_checkpoints, save_checkpoint)
from common import (CheckpointError, ConfigError, DivergenceGuard, above, append_jsonl, at_least, autocast_for, check_config,
                    cli_errors, configure, fmt_time, lr_at, make_optimizer, one_of, plot_losses, require, resume_changes,
                    rng_state, rule, set_rng_state, start_metrics, use_tf32, within)
from data import get_tokenizer
from model import IGNORE_INDEX

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
# LoRA's targets: (in the attention or in the block's SwiGLU MLPs, the projection); a mixture of experts gets adapters
# on every expert's projection (its router stays frozen, as the rest of the base)
LORA_TARGETS = {"q": ("attn", "q_proj"), "k": ("attn", "k_proj"), "v": ("attn", "v_proj"), "o": ("attn", "o_proj"),
                "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"), "down": ("mlp", "down_proj")}

# -----------------------------------------------------------------------------
# settings: each field's valid values beside it (common.check_config checks them all before anything is read)


@dataclass
class PostTrainConfig:
    out: str = ""  # output folder (final.pt, metrics.jsonl, loss.png); "" is out/<command>
    # data: "hf:ID[:CONFIG]" through datasets, or a local .jsonl / .parquet file in the same schema
    data: str = ""  # "" is the paper's dataset for the command (DEFAULT_DATA)
    split: str = ""  # "" is train_sft / train_prefs
    eval_data: str = ""  # "" is the hf source's test split (none for a local file); "none" switches it off
    eval_examples: int = field(default=200, metadata=at_least(0, ">= 0 (0: all)"))  # cap on evaluation examples
    eval_interval: int = field(default=0, metadata=at_least(0, ">= 0 (0: only at the end)"))  # steps between evaluations
    max_examples: int = field(default=0, metadata=at_least(0, ">= 0 (0: all)"))  # cap on training examples
    # tokens per conversation (prompt + answers), at most the model's max_seq_len; longer ones are cut
    max_len: int = field(default=1024, metadata=at_least(2, ">= 2 (a token and its target)"))
    # DPO: a prompt longer than this keeps its end when the pair does not fit (below max_len)
    max_prompt_len: int = field(default=512, metadata=at_least(1, ">= 1 (and below max_len)"))
    # SFT: "assistant" (answers + their <|end|>, as TRL's assistant_only_loss) or "all" (the zephyr recipe, Tunstall et al. 2023)
    loss_on: str = field(default="assistant", metadata=one_of("assistant", "all"))
    # optimization: examples per step = batch_size * grad_accum * world size
    batch_size: int = field(default=4, metadata=at_least(1, ">= 1"))
    grad_accum: int = field(default=32, metadata=at_least(1, ">= 1"))
    epochs: float = field(default=1.0, metadata=above(0, "> 0"))
    max_steps: int = field(default=0, metadata=at_least(0, ">= 0 (0: as many as epochs take)"))
    lr: float = field(default=0.0, metadata=at_least(0, "> 0 (or 0: the paper's)"))  # PAPER_LR
    # warmup over this fraction of the steps, then cosine (SimPO's setting)
    warmup_frac: float = field(default=0.1, metadata=within(0, 1, "in [0, 1]"))
    schedule: str = field(default="cosine", metadata=one_of("cosine", "wsd", "constant"))
    min_lr_ratio: float = field(default=0.0, metadata=within(0, 1, "in [0, 1]"))
    weight_decay: float = field(default=0.0, metadata=at_least(0, ">= 0"))
    beta1: float = field(default=0.9, metadata=rule(lambda v: 0 <= v < 1, "in [0, 1)"))
    beta2: float = field(default=0.999, metadata=rule(lambda v: 0 <= v < 1, "in [0, 1)"))
    grad_clip: float = field(default=1.0, metadata=at_least(0, ">= 0 (0: off)"))
    # preference optimization
    loss: str = field(default="dpo", metadata=one_of("dpo", "simpo"))  # DPO (Rafailov et al. 2023) or SimPO (no reference model)
    # None: the loss's own default (DEFAULT_BETA: DPO 0.01, SimPO 2.0); a given value wins
    beta: float = field(default=None, metadata=rule(lambda v: v is None or 0 < v < math.inf,
                                                    "> 0 (leave it out for the loss's default)"))
    # SimPO's target reward margin (absolute, as TRL's simpo_gamma); None: SIMPO_GAMMA_BETA_RATIO * beta
    gamma: float = field(default=None, metadata=rule(lambda v: v is None or 0 <= v < math.inf,
                                                     ">= 0 (leave it out for 0.5 * beta)"))
    ref: str = ""  # the frozen reference; "" is CKPT itself (with LoRA: the base with adapters disabled)
    # "precompute" (once, before training, then freed) or "live" (every step)
    ref_mode: str = field(default="precompute", metadata=one_of("precompute", "live"))
    # LoRA (Hu et al. 2022): 0 is full fine-tuning
    lora_rank: int = field(default=0, metadata=at_least(0, ">= 0 (0: full fine-tuning)"))
    lora_alpha: float = field(default=16.0, metadata=above(0, "> 0"))
    lora_dropout: float = field(default=0.0, metadata=rule(lambda v: 0 <= v < 1, "in [0, 1)"))
    lora_targets: str = "q,k,v,o,gate,up,down"
    # system
    device: str = "auto"  # auto, cpu, cuda (sft, dpo: under torchrun each rank takes its own GPU) or cuda:N (chat)
    # bf16 autocast on CUDA, float32 on CPU (common.autocast_for)
    dtype: str = field(default="auto", metadata=one_of("auto", "float32", "bfloat16"))
    compile: bool = False  # padded batches change shape every step, so compiling is off by default
    # pad batches to a multiple of this length (fewer shapes; results do not depend on it)
    pad_multiple: int = field(default=8, metadata=at_least(1, ">= 1"))
    seed: int = field(default=1337, metadata=rule(lambda v: 0 <= v < 2 ** 64, "in [0, 2**64)"))
    log_interval: int = field(default=10, metadata=at_least(1, ">= 1"))
    # steps between resumable saves of OUT/ckpt_STEP.pt (0: only final.pt at the end)
    ckpt_interval: int = field(default=0, metadata=at_least(0, ">= 0 (0: only final.pt)"))
    # periodic checkpoints kept (0: all); a file goes only when that many newer ones verify
    keep_last: int = field(default=2, metadata=at_least(0, ">= 0 (0: all)"))
    resume: bool = False  # continue from the newest OUT/ckpt_STEP.pt that verifies, exactly (fresh if there is none)
    overwrite: bool = False  # a fresh run may delete what an earlier run left in OUT (otherwise refused)
    plot: bool = True
    # divergence, as train.py: a non-finite loss or gradient norm is never stepped on (common.DivergenceGuard)
    divergence: str = field(default="stop", metadata=one_of("stop", "skip"))  # "skip": drop that update, at most max_skips times
    max_skips: int = field(default=10, metadata=at_least(0, ">= 0"))
    # report a loss above this multiple of the running median (0: off)
    spike_factor: float = field(default=2.0, metadata=rule(lambda v: v == 0 or 1 < v < math.inf, "0 (off) or > 1"))
    dist_timeout: int = field(default=1800, metadata=at_least(1, ">= 1"))  # seconds a collective may wait for a stuck rank
    # chat
    prompt: str = ""  # one answer to this, then exit; empty: interactive
    system: str = ""
    max_new_tokens: int = field(default=256, metadata=at_least(1, ">= 1"))
    temperature: float = field(default=0.7, metadata=at_least(0, ">= 0 (0: greedy)"))
    top_k: int = field(default=50, metadata=at_least(0, ">= 0 (0: no top-k)"))

    def check(self):
        """The rules beyond one field's own: LoRA's targets when LoRA is on, and a device torch knows (CUDA only
        where there is one). sft and dpo take fewer devices (resolve)."""
        if self.lora_rank:
            names = lora_target_names(self.lora_targets)
            require(names and all(t in LORA_TARGETS for t in names), "lora_targets", self.lora_targets,
                    f"a comma-separated list of {','.join(LORA_TARGETS)}")
        if self.device != "auto":
            try:
                device = torch.device(self.device)
            except RuntimeError:
                device = None
            require(device is not None, "device", self.device, "auto, cpu, cuda or cuda:N")
            require(device.type != "cuda" or torch.cuda.is_available(), "device", self.device,
                    "cpu or auto: no CUDA device is available here")


def resolve(cmd, cfg):
    """Check the settings (common.check_config, and sft's and dpo's devices) and fill the per-command defaults: the
    paper's data and learning rate, and the preference loss's own beta (and SimPO's gamma) unless given. Returns
    (the evaluation split, the columns the command reads)."""
    check_config(cfg)
    require(cfg.device in ("auto", "cpu", "cuda"), "device", cfg.device,
            f"one of auto, cpu, cuda for {cmd} (under torchrun each rank takes its own GPU)")
    data, split, eval_split, columns = DEFAULT_DATA[cmd]
    cfg.out = cfg.out or os.path.join("out", cmd)
    cfg.lr = cfg.lr or PAPER_LR[cmd]
    cfg.data = cfg.data or data
    cfg.split = cfg.split or split
    if cfg.eval_data == "":
        cfg.eval_data = cfg.data if cfg.data.startswith("hf:") else "none"
    # a reference the run would not read is refused, not ignored: SimPO has none (Meng et al. 2024), SFT none either
    require(not cfg.ref or (cmd == "dpo" and cfg.loss == "dpo"), "ref", cfg.ref,
            "empty here: only --loss=dpo reads a reference model (SimPO and SFT have none); drop --ref")
    if cmd == "dpo":
        cfg.beta, gamma = preference_hparams(cfg.loss, cfg.beta, cfg.gamma)
        cfg.gamma = gamma if cfg.loss == "simpo" else cfg.gamma
    return eval_split, columns


# -----------------------------------------------------------------------------
# losses and evaluations: SFT's, then the preference loss (DPO or SimPO)


def at_least_float32(logits):  # log-softmax in float32 at least (bf16 logits lose too much); float64 stays
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def sequence_logps(model, x, y):
    """(sum of log p(target) over the targets that are not IGNORE_INDEX, their number), per row."""
    logits, _ = model(x)
    logp = -F.cross_entropy(at_least_float32(logits).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return logp.view(y.shape).sum(-1), (y != IGNORE_INDEX).sum(-1)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), the log-probs
    summed over the completion tokens. It is log 2 when the policy is the reference, and its gradient there
    is -beta/2 on pi_c and +beta/2 on pi_r (per pair; the mean over n pairs divides by n). The implicit
    rewards beta * (pi - ref) are logged."""
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return losses.mean(), reward_metrics(beta * chosen.detach(), beta * rejected.detach())


def simpo_loss(policy_chosen_mean_logps, policy_rejected_mean_logps, beta, gamma):
    """SimPO (Meng et al. 2024): -log sigmoid(beta * mean logp(chosen) - beta * mean logp(rejected)
    - gamma), the log-probs averaged over the completion tokens (length-normalized); no reference model. gamma is
    the absolute target reward margin: TRL's simpo_gamma, princeton-nlp/SimPO's gamma_beta_ratio * beta."""
    chosen, rejected = beta * policy_chosen_mean_logps, beta * policy_rejected_mean_logps
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return losses.mean(), reward_metrics(chosen.detach(), rejected.detach())


def reward_metrics(chosen, rejected):
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
        with parallel.no_sync_unless_last(model, i == len(micro_batches) - 1), ctx:
            logits, _ = model(x)
            s = F.cross_entropy(at_least_float32(logits).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
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
        with parallel.no_sync_unless_last(model, i == len(micro_batches) - 1), ctx:
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


def lora_target_names(targets):  # "q, v" -> ["q", "v"]
    return [t.strip() for t in targets.split(",") if t.strip()]


def add_lora(model, rank, alpha, dropout=0.0, targets="q,k,v,o,gate,up,down"):
    """Freeze every weight of the Llama and put adapters on the named projections of every block."""
    names = lora_target_names(targets)
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise ConfigError(f"lora_targets {targets!r}: pick among {','.join(LORA_TARGETS)}")
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
# the pieces of a run: the starting model, DPO's reference, --resume, one step, evaluation, the checkpoint


def load_starting_model(path, device):
    """(the Llama, its checkpoint less the weights, the tokenizer): the weights become the model; the rest of the
    checkpoint (the tokenizer, the lineage: stage, flops, history) goes into every save."""
    source = load_checkpoint(path)
    tokenizer = get_tokenizer(source["tokenizer"]["name"])
    model = model_from_checkpoint(source, device)
    del source["model"]
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model only "
                              f"{model.config.vocab_size}")
    return model, source, tokenizer


def load_reference(path, tokenizer, policy_config, max_len, device):
    """The frozen --ref model, checked against the policy when it is loaded: the same tokenizer (name and size)
    and vocab, since DPO compares the two models' log-probs of the same token ids, and a context (max_seq_len)
    that covers max_len, or the reference would score cut sequences. Its width and depth may differ."""
    ckpt = load_checkpoint(path, tokenizer=tokenizer)  # another tokenizer: CheckpointError naming both
    ref = model_from_checkpoint(ckpt, device)
    del ckpt
    if ref.config.vocab_size != policy_config.vocab_size:
        raise ConfigError(f"--ref {path} has vocab_size {ref.config.vocab_size} but the policy {policy_config.vocab_size}: "
                          "the reference must share the policy's tokenizer and vocab (use its SFT checkpoint)")
    if ref.config.max_seq_len < max_len:
        raise ConfigError(f"--ref {path} has max_seq_len {ref.config.max_seq_len}, shorter than max_len {max_len}: pass "
                          f"--max_len={ref.config.max_seq_len} or a reference with a context of at least {max_len} tokens")
    return ref.eval().requires_grad_(False)


def frozen_reference(cfg, model, ref_model):
    """DPO's frozen reference, taken before LoRA is added (so the starting model *is* the base): the --ref model
    (ref_model, from load_reference), else the starting model, read as it is (precompute: once, before training
    changes it) or copied (live: the policy moves away from it); None for live with LoRA, where the base is the
    policy with its adapters switched off (reference_logps_of)."""
    if cfg.ref:
        return ref_model
    if cfg.ref_mode == "precompute":
        return model
    if not cfg.lora_rank:
        return copy.deepcopy(model).eval().requires_grad_(False)
    return None


def reference_logps_of(x, y, idx, table, ref_model, policy, ctx):
    """(B, 2) reference log-probs of a micro-batch's pairs idx: rows of a precomputed table, or a forward of
    the frozen reference (with LoRA: the policy itself with its adapters switched off)."""
    if table is not None:
        return table[idx]
    with torch.no_grad(), ctx:
        if ref_model is not None:
            return sequence_logps(ref_model, x, y)[0].view(2, -1).T
        with adapters_disabled(policy):
            return sequence_logps(policy, x, y)[0].view(2, -1).T


def resume_setup(cmd, cfg, source, examples, evals, per_step):
    """What may not change across --resume for a step to mean the same examples and the same update."""
    return {"command": cmd, "source": [source.get(k) for k in ("step", "tokens", "flops")],
            "examples": examples_digest(examples), "eval_examples": examples_digest(evals),
            "examples_per_step": per_step, "seed": cfg.seed,
            "lora": [cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets] if cfg.lora_rank else None,
            "reference": [cfg.loss, cfg.ref, cfg.ref_mode] if cmd == "dpo" else None}


def find_resume(cfg, setup, tokenizer, log):
    """(path, checkpoint) that --resume continues from, or (None, None) on a fresh start."""
    if cfg.resume and checkpoint_paths(cfg.out):  # --resume with nothing saved yet starts fresh
        path, ckpt = latest_checkpoint(cfg.out, tokenizer, log, required_key="resume")
        changed = [k for k in setup if ckpt["resume"]["setup"].get(k) != setup[k]]
        if changed:
            raise ConfigError(f"--resume with a different setup ({', '.join(changed)} changed since {path}): "
                              "restore those settings, or start a new --out")
        return path, ckpt
    return None, None


def tokens_in(micro_batches, pad_id):  # the real tokens of micro-batches: pads not counted
    return sum(int((batch[0] != pad_id).sum()) for batch in micro_batches)


def forward_backward(cmd, model, micro_batches, cfg, ctx, world, reference):
    """Forward and backward over this rank's micro-batches of one step, the gradients accumulated over them.
    Returns (the step's loss over every rank, DPO's reward metrics)."""
    if cmd == "sft":
        loss, _ = sft_accumulate(model, micro_batches, ctx, world)
        return loss.item(), {}
    return preference_accumulate(model, micro_batches, cfg, reference, ctx, world)


@torch.no_grad()
def evaluate(cmd, model, batches, cfg, ctx, reference):
    """(val loss, val metrics) of the model in eval mode (no LoRA dropout). Every rank evaluates the same
    examples: no collective to wait in."""
    model.eval()
    result = sft_eval(model, batches, ctx) if cmd == "sft" else preference_eval(model, batches, cfg, reference, ctx)
    model.train()
    return result


def history_record(cmd, cfg, source_path, step, per_step, tokens, flops):
    """This run's entry in the checkpoint's history: what was done to the weights, on what, for how long."""
    record = {"op": cmd, "from": os.path.abspath(source_path), "data": cfg.data, "split": cfg.split, "steps": step,
              "examples": step * per_step, "tokens": tokens, "flops": flops, "lr": cfg.lr,
              "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets} if cfg.lora_rank else None}
    if cmd == "dpo":
        record.update(loss=cfg.loss, beta=cfg.beta, **({"gamma": cfg.gamma} if cfg.loss == "simpo" else
                                                        {"ref": cfg.ref or "self", "ref_mode": cfg.ref_mode}))
    return record


def save(path, model, source, cfg, record, metrics, resume=None):
    """`path` in checkpoint.py's schema: the plain Llama (LoRA merged), the starting checkpoint's lineage with
    this run's history record appended, and, for a periodic checkpoint, what --resume needs. "model" stays a
    plain Llama (chat, eval); "resume"'s "module" shares its tensors unless LoRA is on."""
    ckpt = make_checkpoint(merged_state_dict(model), model.config, source["tokenizer"], Lineage.from_weights(source).then(record),
                           run_flops=record["flops"], tokens=source.get("tokens", 0), step=record["steps"],
                           posttrain_config=asdict(cfg), metrics=metrics, **({"resume": resume} if resume is not None else {}))
    save_checkpoint(ckpt, path)
    return path


# -----------------------------------------------------------------------------
# training: SFT or DPO of a checkpoint, the loop as train.py's


def train(cmd, ckpt_path, cfg, log=print):
    """SFT or DPO (cmd) of the checkpoint at ckpt_path as cfg says; returns the path of OUT/final.pt. The run
    holds OUT's lock from start to end (checkpoint.claim_out_dir: one live run per folder, and a fresh run
    never deletes an earlier run's files unless --overwrite)."""
    eval_split, columns = resolve(cmd, cfg)  # checks the settings, fills in cfg.out and the command's defaults
    rank, local_rank, world, device = parallel.setup_distributed(cfg.device, cfg.dist_timeout)
    master = rank == 0
    log = log if master else (lambda *a, **k: None)
    resuming = cfg.resume and bool(checkpoint_paths(cfg.out))  # --resume with nothing saved yet starts fresh
    if not resuming and os.path.abspath(ckpt_path) in [os.path.abspath(p) for p in checkpoint_paths(cfg.out) +
                                                        [os.path.join(cfg.out, "final.pt")]]:
        raise ConfigError(f"--out {cfg.out} holds {ckpt_path}, the checkpoint this run starts from: choose another --out")
    # one live run per OUT, never over another run's files; an error on rank 0 stops every rank
    lock = parallel.on_rank0_then_share(lambda: claim_out_dir(cfg.out, resuming, cfg.overwrite), rank, world)
    try:
        # autocast, and the seed of LoRA's initialization and dropout masks
        torch.manual_seed(cfg.seed)
        ctx, dtype_name = autocast_for(device, cfg.dtype)

        # the model: the starting checkpoint's, and the lengths of examples it can read
        model, source, tokenizer = load_starting_model(ckpt_path, device)
        n_params = model.num_params(non_embedding=True)  # the N of 6 N T
        max_len, max_prompt_len, notes = sequence_lengths(cmd, cfg.max_len, cfg.max_prompt_len, model.config.max_seq_len)
        for note in notes:
            log(f"note: {note}")
        dpo_reference = cmd == "dpo" and cfg.loss == "dpo"  # SFT and SimPO need no reference
        live = dpo_reference and cfg.ref_mode == "live"  # the reference runs every step: 2 N FLOPs per token it reads
        # --ref is checked (tokenizer, vocab, context) as it is loaded, before the data is read
        ref_model = load_reference(cfg.ref, source["tokenizer"], model.config, max_len, device) if dpo_reference and cfg.ref else None

        # the data: examples (SFT's conversations or DPO's pairs), per_step of them a step over every rank
        examples, evals = load_examples(cmd, tokenizer, cfg, eval_split, columns, max_len, max_prompt_len, log)
        per_step = cfg.batch_size * cfg.grad_accum * world
        max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(examples) / per_step))
        pad_id = tokenizer.special["<|pad|>"]
        batches = functools.partial(sft_batches if cmd == "sft" else preference_batches, batch_size=cfg.batch_size,
                                    pad_id=pad_id, multiple=cfg.pad_multiple, limit=max_len, device=device)
        # a fresh permutation every epoch; the examples of step s are order[s * per_step:(s + 1) * per_step], a pure
        # function of (seed, step) for given data: what makes --resume exact without saving a data position
        rng = np.random.default_rng(cfg.seed)
        order = np.concatenate([rng.permutation(len(examples)) for _ in range(math.ceil(max_steps * per_step / len(examples)))])

        # --resume: the newest readable periodic checkpoint, refused if anything that decides a step changed
        setup = resume_setup(cmd, cfg, source, examples, evals, per_step)
        resume_path, resume = find_resume(cfg, setup, source["tokenizer"], log)
        parallel.same_on_every_rank((resume_path, resume and resume["step"]), "--resume", world)  # each rank found its own
        note = resume and resume_changes(resume.get("posttrain_config", {}), cfg, resume_path)  # a changed --lr: said, and used
        if note:
            log(note)

        # DPO's frozen reference, before LoRA: its log-probs of every pair computed once (precompute: then the
        # model is freed; a resumed run reads the tables it saved), or a model run live every step
        ref_tables, live_reference, flops = (None, None), None, 0  # flops: spent so far, the reference's forwards included
        if dpo_reference:
            how = cfg.ref or ("the base with adapters disabled" if cfg.lora_rank else f"{ckpt_path} itself (frozen)")
            log(f"reference: {how}, {cfg.ref_mode}")
            if cfg.ref_mode == "precompute" and resume is not None:
                ref_tables = tuple(t if t is None else t.to(device) for t in resume["resume"]["reference"])
            elif live:
                live_reference = frozen_reference(cfg, model, ref_model)
            else:
                frozen = frozen_reference(cfg, model, ref_model)
                ref_tables = tuple(reference_logps(frozen, pairs, cfg.batch_size, pad_id, device, ctx, rank, world) if pairs else None
                                   for pairs in (examples, evals))
                flops += 2 * n_params * sum(len(p.chosen.ids) + len(p.rejected.ids) for p in examples + evals)  # forward only
                del frozen
        del ref_model
        train_reference, eval_reference = (functools.partial(reference_logps_of, table=table, ref_model=live_reference, policy=model,
                                                             ctx=ctx) for table in ref_tables)

        # LoRA, after the reference: the model it saw is the base the adapters sit on; then AdamW over what trains
        if cfg.lora_rank:
            add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        guard = DivergenceGuard(cfg.divergence, cfg.max_skips, cfg.spike_factor)  # never step on a non-finite loss or gradient
        tokens, last_metrics, last_good = 0, {}, None  # last_good: the newest checkpoint, named if the run diverges
        if resume is not None:  # the live module (LoRA: base + adapters, not the merged weights), AdamW, the RNGs (dropout)
            state = resume["resume"]
            model.load_state_dict(state["module"])
            parallel.load_optimizer_state(model, optimizer, state["optimizer"], where=resume_path)
            set_rng_state(state["rng"])
            tokens, flops, last_metrics, last_good = state["tokens"], state["flops"], resume["metrics"], resume_path
            guard.load_state_dict(state.get("guard", guard.state_dict()))
        # what the step calls: the Llama, maybe compiled, maybe DDP-wrapped; raw_model, the Llama itself, is evaluated and saved
        raw_model = model
        model = torch.compile(raw_model, dynamic=True) if cfg.compile else raw_model
        if world > 1:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
        preference = f" | {cfg.loss} beta {cfg.beta:g}" + (f" gamma {cfg.gamma:g}" if cfg.loss == "simpo" else "") if cmd == "dpo" else ""
        log(f"{n_params:,} non-embedding parameters, {sum(p.numel() for p in trainable):,} trained"
            f"{f' (LoRA r={cfg.lora_rank} on {cfg.lora_targets})' if cfg.lora_rank else ''} | {per_step} examples/step x {max_steps} steps "
            f"| lr {cfg.lr:.1e}{preference} | {device.type} {dtype_name}{f' x{world} ranks' if world > 1 else ''}"
            + (f" | resumed at step {resume['step']} from {resume_path}" if resume is not None else ""))

        # the loop
        resumed_at = resume["step"] if resume is not None else None
        start_step = resumed_at or 0
        metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        if master:  # resumed: the steps about to be redone go from the metrics
            start_metrics(cfg.out, resumed_at, log)
        model.train()  # the reference's precomputation left the model in eval mode
        warmup = round(cfg.warmup_frac * max_steps)
        t_start = t_window = time.perf_counter()
        ex_window = tok_window = 0
        for step in range(start_step, max_steps):
            # the learning rate: linear warmup, then cosine (SimPO's setting)
            lr = lr_at(step, max_steps, cfg.lr, warmup, cfg.schedule, cfg.min_lr_ratio)
            for group in optimizer.param_groups:  # set by hand, as train.py: no scheduler state to save
                group["lr"] = lr
            # this rank's share of the step's examples: ranks interleave, so each reads per_step / world of them
            rank_ids = order[step * per_step:(step + 1) * per_step][rank::world].tolist()
            micro = batches(examples, rank_ids)
            rank_tokens = tokens_in(micro, pad_id)
            step_tokens = torch.tensor(rank_tokens, device=device)  # over every rank, pads not counted
            if world > 1:
                dist.all_reduce(step_tokens)
            step_tokens = int(step_tokens)
            # forward and backward: the gradient of one large batch, however it is split into micro-batches and ranks
            loss, extra = forward_backward(cmd, model, micro, cfg, ctx, world, train_reference)
            # clip the norm over every trained weight (an infinite max_norm when clipping is off: the norm is wanted)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf).item()
            # never step on a non-finite loss or gradient (common.DivergenceGuard); then update
            loss = float(loss)  # already the whole step's on every rank (all-reduced): every rank reaches the same verdict
            verdict = guard.check(step + 1, loss, grad_norm, last_good, log)
            if verdict != "skip":
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # free the gradients before the next step's activations
            if verdict != "step" and master:
                append_jsonl(metrics_path, {"step": step + 1, "event": verdict, "loss": loss, "grad_norm": grad_norm})
            # the cost: 6 N per trained token (LoRA: 4 N, the frozen base needs no weight gradients), and a live
            # reference's forward, 2 N per token (this rank's, times the ranks)
            tokens += step_tokens
            flops += (2 * n_params * rank_tokens * world if live else 0) + (4 if cfg.lora_rank else 6) * n_params * step_tokens
            ex_window, tok_window, done = ex_window + per_step, tok_window + step_tokens, step + 1
            # log the first step, every log_interval-th and the last; throughput over the steps since the last log
            if done % cfg.log_interval == 0 or done == max_steps or done == 1:
                now = time.perf_counter()
                elapsed, dt = now - t_start, now - t_window
                last_metrics = {"step": done, "examples": done * per_step, "tokens": tokens, "loss": loss, "lr": lr,
                                "ex_s": ex_window / dt, "tok_s": tok_window / dt, "elapsed": elapsed, "grad_norm": grad_norm, **extra}
                if master:  # one writer of metrics.jsonl
                    append_jsonl(metrics_path, last_metrics)
                rewards = f" | margin {extra['rewards/margins']:.4f} | acc {extra['rewards/accuracy']:.2f}" if extra else ""
                log(f"step {done:>5}/{max_steps} | loss {loss:.4f}{rewards} | lr {lr:.2e} | {ex_window / dt:,.1f} ex/s | "
                    f"{tok_window / dt:,.0f} tok/s | {fmt_time(elapsed)} elapsed | "
                    f"eta {fmt_time(elapsed / (done - start_step) * (max_steps - done))}")
                t_window, ex_window, tok_window = time.perf_counter(), 0, 0  # the next window leaves the logging out
            # evaluate every eval_interval steps and after the last (every rank the same examples: no collective to wait in)
            if evals and ((cfg.eval_interval and done % cfg.eval_interval == 0) or done == max_steps):
                eval_batches = batches(evals, list(range(len(evals))))
                val_loss, val_metrics = evaluate(cmd, raw_model, eval_batches, cfg, ctx, eval_reference)
                flops += 2 * n_params * tokens_in(eval_batches, pad_id) * world if live else 0
                if master:
                    append_jsonl(metrics_path, {"step": done, "tokens": tokens, "val_loss": val_loss, **val_metrics})
                log(f"step {done:>5} | val loss {val_loss:.4f}" + "".join(f" | {k} {v:.4f}" for k, v in val_metrics.items()))
            # a resumable checkpoint every ckpt_interval steps (final.pt covers the last), only the newest keep_last kept
            if master and cfg.ckpt_interval and done % cfg.ckpt_interval == 0 and done < max_steps:
                resume_state = {"module": raw_model.state_dict(), "optimizer": parallel.optimizer_state(raw_model, optimizer),
                                "rng": rng_state(), "tokens": tokens, "flops": flops, "setup": setup, "reference": ref_tables,
                                "guard": guard.state_dict()}
                record = history_record(cmd, cfg, ckpt_path, done, per_step, tokens, flops)
                last_good = save(os.path.join(cfg.out, f"ckpt_{done:07d}.pt"), raw_model, source, cfg, record, last_metrics, resume_state)
                prune_checkpoints(cfg.out, cfg.keep_last, log)
        # the result: final.pt (a plain Llama, LoRA merged) and the loss plot
        def finish():  # rank 0 writes while the others wait in the gloo group (no NCCL collective open over a long save)
            record = history_record(cmd, cfg, ckpt_path, max_steps, per_step, tokens, flops)
            path = save(os.path.join(cfg.out, "final.pt"), raw_model, source, cfg, record, last_metrics)
            if cfg.plot:
                plot_losses(metrics_path, os.path.join(cfg.out, "loss.png"), title=f"{cmd}: {cfg.out}")
            log(f"done: {path} ({fmt_time(time.perf_counter() - t_start)}, {tokens:,} tokens, {flops:.3g} FLOPs)")
            return path
        return parallel.on_rank0_then_share(finish, rank, world)
    finally:
        if lock is not None:
            lock.release()


# -----------------------------------------------------------------------------
# chat


def note_to_stderr(text):
    print(f"note: {text}", file=sys.stderr)


@torch.no_grad()
def reply(model, tokenizer, messages, max_new_tokens=256, temperature=0.7, top_k=50, generator=None, log=note_to_stderr):
    """The assistant's next answer to `messages`, with the training template; stops at <|end|>. A conversation
    too long for the context is fitted by chat_data.fit_prompt (oldest history dropped first, max_new_tokens
    capped), and log(note) says what it changed. Ids the tokenizer does not use are never sampled."""
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
    tokenizer = get_tokenizer(ckpt["tokenizer"]["name"])
    return model_from_checkpoint(ckpt, device).eval(), tokenizer


def chat(ckpt_path, cfg):
    use_tf32(cfg.device)  # float32 matmuls on TF32 tensor cores
    model, tokenizer = load_chat_model(ckpt_path, cfg.device)
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    answer = lambda msgs: reply(model, tokenizer, msgs, cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator)
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
    """(command, checkpoint, PostTrainConfig) from `CMD CKPT [config.py ...] [--key=value | --key value ...]`. Every
    setting is checked here (common.configure), before a checkpoint or the data is read."""
    usage = "usage: python posttrain.py sft|dpo|chat CKPT [config.py ...] [--key=value ...]"
    if "-h" in argv or "--help" in argv:
        configure(PostTrainConfig, ["--help"], usage=usage)  # prints the usage and the keys, exits 0
    if not argv or argv[0] not in COMMANDS:
        raise ConfigError(usage)
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
        raise ConfigError(f"{argv[0]} needs a checkpoint; {usage}")
    return argv[0], ckpt, configure(PostTrainConfig, args)


def main(argv):
    with cli_errors():
        cmd, ckpt, cfg = parse_args(argv)
        chat(ckpt, cfg) if cmd == "chat" else train(cmd, ckpt, cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
