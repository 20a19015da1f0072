"""
checkpoint.py: the one owner of nanogrow's checkpoint file.

A checkpoint is one file written by torch.save: a dict built by make_checkpoint() and nothing else.
Every writer (train.py, grow.py, posttrain.py, model.py's import-hf) goes through it, so the keys below
are the whole schema. Every reader (eval.py, grow.py, posttrain.py, series.py) may count on the first
group; the second group is there when the writer says so.

Always present:
    model          the plain Llama's state dict (never a torch.compile or DDP wrapper's: nanoGPT issue 325)
    model_config   dataclasses.asdict(ModelConfig): enough to rebuild the model (model.config_from_dict)
    tokenizer      {"name", "vocab_size"}: the ids the model speaks (data.get_tokenizer(name))
    stage          {"index", "name", "mode"} of the series stage this model belongs to, or None
    start_flops    training FLOPs spent on this model's line before the run that wrote the file
                   (earlier stages, the model it was grown from; 0 for a model from scratch)
    flops          training FLOPs in all: start_flops + what this run spent (6 X T, budget.flops)
    tokens         tokens the run that wrote the file trained on
    history        what happened to the weights, oldest first: {"op": "grow", ...}, {"op": "init_from", ...},
                   {"op": "sft", ...}; a grow record holds the unit maps and the depth plan (grow.py)

By writer:
    step, val, train_config, optimizer, rng, data_state     train.py: the run's place, its last validation
                                                            record, and what an exact --resume needs
    posttrain_config, metrics, resume                       posttrain.py (resume: module, optimizer, rng, ...)

stage, start_flops and history travel together as a Lineage: the one object a run is handed to say
where its model came from.
"""

import glob
import os
from dataclasses import asdict, dataclass, field

import torch

REQUIRED_KEYS = ("model", "model_config", "tokenizer")  # the least a readable checkpoint holds


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line saying why and what to do."""


@dataclass
class Lineage:
    """Where a model came from: its series stage, the FLOPs spent to reach it, and its history."""
    stage: dict | None = None
    flops: int = 0  # training FLOPs spent before the run that is handed this lineage
    history: list = field(default_factory=list)

    @classmethod
    def after(cls, ckpt):
        """The lineage of a run that starts from ckpt's weights (growth, init_from, post-training)."""
        return cls(ckpt.get("stage"), ckpt.get("flops", 0), list(ckpt.get("history", [])))

    @classmethod
    def before(cls, ckpt):
        """The lineage the run that wrote ckpt was handed (to --resume that run)."""
        return cls(ckpt.get("stage"), ckpt.get("start_flops", 0), list(ckpt.get("history", [])))

    def then(self, record):
        """This lineage with one more history record."""
        return Lineage(self.stage, self.flops, self.history + [record])


def make_checkpoint(state_dict, model_config, tokenizer, lineage, run_flops=0, tokens=0, **extra):
    """The checkpoint dict (the schema above). tokenizer: a data.Tokenizer or a {"name", "vocab_size"}
    dict; run_flops: the FLOPs the writing run spent; extra: the by-writer keys."""
    if not isinstance(tokenizer, dict):
        tokenizer = {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size}
    return {"model": state_dict, "model_config": asdict(model_config), "tokenizer": tokenizer,
            "stage": lineage.stage, "start_flops": lineage.flops, "flops": lineage.flops + run_flops,
            "tokens": tokens, "history": lineage.history, **extra}


# -----------------------------------------------------------------------------
# writing and reading one file


def save_checkpoint(ckpt, path):
    """Write atomically: a temporary file in the same folder, flushed and fsynced, then renamed over
    `path`, so a run killed mid-write leaves the previous file intact."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path, map_location="cpu", tokenizer=None):
    """Load and validate a checkpoint. `tokenizer` (a name, or a dict with name and vocab_size) is what
    the caller's data uses; a checkpoint made with another raises CheckpointError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                              "use an earlier checkpoint or re-save it") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a nanogrow checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: it was not written by nanogrow's save_checkpoint")
    if tokenizer is not None:
        want = tokenizer if isinstance(tokenizer, dict) else {"name": tokenizer}
        have = ckpt["tokenizer"]
        for key, value in want.items():
            if have.get(key) != value:
                raise CheckpointError(f"checkpoint {path} was made with tokenizer {have} but the data uses {want}: "
                                      "prepare the data with the checkpoint's tokenizer")
    return ckpt


# -----------------------------------------------------------------------------
# a run's folder: periodic ckpt_STEP.pt files, the newest few kept, resume from the newest readable one


def checkpoint_paths(out_dir):
    """Periodic checkpoints in out_dir, oldest first."""
    return sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")))


def prune_checkpoints(out_dir, keep_last):
    """Keep the newest keep_last periodic checkpoints (0 keeps all)."""
    for old in checkpoint_paths(out_dir)[:-keep_last] if keep_last > 0 else []:
        os.remove(old)


def latest_checkpoint(out_dir, tokenizer, log=print, required_key=None):
    """(path, checkpoint) of the newest readable ckpt_*.pt in out_dir, for --resume. A file cut short by a
    kill is skipped for the one before it (saves are atomic, so that one is whole): nothing is lost.
    required_key: a key the caller's checkpoints always hold (posttrain.py's resume state)."""
    for path in reversed(checkpoint_paths(out_dir)):
        try:
            ckpt = load_checkpoint(path, tokenizer=tokenizer)
            if required_key and required_key not in ckpt:
                raise CheckpointError(f"{path} has no {required_key!r}: it was not written by this kind of run")
            return path, ckpt
        except CheckpointError as e:
            log(f"warning: {e}")
    raise CheckpointError(f"--resume: no usable checkpoint in {out_dir}; run without --resume to start fresh")
