"""
checkpoint.py: the one owner of nanogrow's checkpoint file.

A checkpoint is one file written by torch.save: a dict built by make_checkpoint() and nothing else.
Every writer (train.py, grow.py, posttrain.py, hf.py's import-hf) goes through it, so the keys below
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
    tokens         pretraining tokens behind these weights: train.py's count for its run; grow.py and
                   posttrain.py carry the source's (post-training's own counts go in history and metrics)
    history        what happened to the weights, oldest first: {"op": "grow", ...}, {"op": "init_from", ...},
                   {"op": "sft", ...}; a grow record holds the unit maps and the depth plan (grow.py)

By writer:
    step, val, train_config, optimizer, rng, data_state,    train.py: the run's place, its last validation
    guard                                                   record, and what an exact --resume needs
    posttrain_config, metrics, resume                       posttrain.py (resume: module, optimizer, rng, ...)

Written by save_checkpoint:
    checksum       {"sha256": hex}: a digest of everything above, tensors byte for byte (payload_digest)

stage, start_flops and history travel together as a Lineage: the one object a run is handed to say
where its model came from. model_from_checkpoint builds the Llama a loaded checkpoint describes, its
weights checked against its model_config.

What loading trusts: nothing in the file. torch.load runs with weights_only=True, whose unpickler builds
only tensors and plain containers (dict, list, tuple, str, int, float, bool, None), so a crafted file
cannot run code; every writer above stores only those types (older files' numpy RNG arrays are the
one allow-listed exception: NUMPY_ARRAY_GLOBALS). The checksum then catches bytes changed
on disk (a bad sector, a partial copy, an overwrite) that would otherwise load as silently wrong weights.
"""

import errno
import fcntl
import glob
import hashlib
import math
import os
import pickle
import re
import shutil
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from common import CheckpointError, decay_groups
from model import Llama, config_from_dict, rope_cos_sin

REQUIRED_KEYS = ("model", "model_config", "tokenizer")  # the least a readable checkpoint holds
# Checkpoints written before nanogrow stored numpy's RNG state as plain lists hold it as a numpy array:
# these globals rebuild such an array and nothing else (an array's items go through the same restricted
# unpickler), so older runs still load and --resume (torch's weights_only docs allow-list them the same way).
NUMPY_ARRAY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
# how a file torch.save wrote begins: a zip archive (torch >= 1.6, what save_checkpoint writes), or, in the legacy
# format, torch.serialization.MAGIC_NUMBER pickled with protocol 2 (still loadable, but it cannot be memory-mapped)
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


@dataclass
class Lineage:
    """Where a model came from: its series stage, the FLOPs spent to reach it, and its history."""
    stage: dict | None = None
    flops: int = 0  # training FLOPs spent before the run that is handed this lineage
    history: list = field(default_factory=list)

    @classmethod
    def from_weights(cls, ckpt):
        """The lineage of a run that starts from ckpt's weights (growth, init_from, post-training): all of
        ckpt's FLOPs are spent before it."""
        return cls(ckpt.get("stage"), ckpt.get("flops", 0), list(ckpt.get("history", [])))

    @classmethod
    def to_resume(cls, ckpt):
        """The lineage the run that wrote ckpt was handed (to --resume that run): its start_flops."""
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
# the checksum: a digest of the whole record, tensors included


def payload_digest(obj):
    """sha256 over a checkpoint's contents in their stored order: each container's kind and length,
    each key, each plain value's repr (exact for floats), each tensor's dtype, shape and bytes. A loaded
    file gives the digest it was written with unless a byte of it changed."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # the raw bytes, whatever the dtype
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__[0]}{len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    walk(obj)
    return h.hexdigest()


def find_non_finite(state, prefix=""):
    """The name of the first floating tensor (or float) in `state`, nested dicts and lists, that holds a
    NaN or an inf, or None: nothing non-finite is ever saved. By min and max (a NaN propagates through
    both, an inf is one of them): one pass and no temporary, where isfinite builds full-size ones and is
    about 20x slower. A tensor seen under two names (tied embeddings) is checked once."""
    seen = set()

    def walk(x, name):
        if isinstance(x, torch.Tensor):
            if not x.is_floating_point() or x.numel() == 0 or id(x) in seen:
                return None
            seen.add(id(x))
            return None if all(math.isfinite(v.item()) for v in torch.aminmax(x.detach())) else (name or "tensor")
        if isinstance(x, float):
            return None if math.isfinite(x) else name
        items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, (list, tuple)) else ()
        for k, v in items:
            found = walk(v, f"{name}.{k}" if name else str(k))
            if found:
                return found
        return None

    return walk(state, prefix)



def optimizer_state_by_name(state, model, decay_embeddings=False):
    """A checkpoint's AdamW state keyed by parameter name (model.named_parameters() names), as every writer
    stores it now. Files written before that numbered the parameters 0, 1, ... in make_optimizer's group
    order (common.decay_groups of the model that wrote them): those are renamed here, so an old run still
    resumes and grows. A state already keyed by name is returned as it is."""
    if not state or all(isinstance(k, str) for k in state.get("state", {})) and \
            all(isinstance(n, str) for g in state.get("param_groups", []) for n in g.get("params", [])):
        return state
    names = [n for group in decay_groups(model, decay_embeddings) for n in group]
    def name(i):
        if not isinstance(i, int) or not 0 <= i < len(names):
            raise CheckpointError(f"the optimizer state names parameter {i!r}, which the model ({len(names)} parameters) "
                                  "does not have: the file is not this model's; start with a fresh optimizer")
        return names[i]
    return {"state": {name(i): s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [name(i) for i in g["params"]]} for g in state["param_groups"]]}

# -----------------------------------------------------------------------------
# writing and reading one file


def save_checkpoint(ckpt, path, overwrite=True):
    """Write atomically: a temporary file in the same folder, flushed and fsynced, then renamed over
    `path`, so a run killed mid-write leaves the previous file intact. Refuses weights that are not
    finite (a diverged model is never saved over a good one), and with overwrite=False an existing path.
    Adds the checksum that load_checkpoint verifies."""
    path = os.fspath(path)
    if not overwrite and os.path.exists(path):
        raise CheckpointError(f"{path} exists: choose another output path, or pass --overwrite to replace it")
    bad = find_non_finite({k: ckpt[k] for k in ("model", "optimizer", "resume") if k in ckpt})
    if bad:
        raise CheckpointError(f"not saving {path}: {bad} holds NaN or inf values")
    ckpt = {k: v for k, v in ckpt.items() if k != "checksum"}
    ckpt["checksum"] = {"sha256": payload_digest(ckpt)}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except RuntimeError as e:  # torch.save's zip writer reports a failed write (a full disk) as a RuntimeError
        first_line = (str(e).strip().splitlines() or [""])[0][:160]
        raise OSError(errno.EIO, f"cannot write the checkpoint (is the disk full?): {first_line}", path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path, map_location="cpu", tokenizer=None, mmap=False):
    """Load and validate a checkpoint: plain types only (never code from the file), the checksum verified.
    `tokenizer` (a name, or a dict with name and vocab_size) is what the caller's data uses; a checkpoint
    made with another raises CheckpointError. mmap=True maps the tensors from the file instead of
    reading them into memory (verification; a large checkpoint that several ranks of one host read)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        head = f.read(512)
    if not head.startswith((ZIP_MAGIC, LEGACY_MAGIC)):
        what = not_a_checkpoint(head)
        if what:
            raise CheckpointError(f"{path} is not a checkpoint: it is {what}")
    mmap = mmap and head.startswith(ZIP_MAGIC)  # torch maps only the zip format's tensors: a legacy file is read
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0][:160]
        if isinstance(e, pickle.UnpicklingError) and "weights_only" in str(e):
            raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and plain containers "
                                  f"({first_line}); nanogrow never writes such files, so it was made elsewhere "
                                  "or tampered with") from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {first_line}); "
                              "use an earlier checkpoint or re-save it") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a nanogrow checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: it was not written by nanogrow's save_checkpoint")
    stored = ckpt.pop("checksum", None)
    if stored is not None and (not isinstance(stored, dict) or stored.get("sha256") != payload_digest(ckpt)):
        raise CheckpointError(f"checkpoint {path} fails its checksum: its bytes changed after it was written; "
                              "use an earlier checkpoint")
    if tokenizer is not None:
        want = tokenizer if isinstance(tokenizer, dict) else {"name": tokenizer}
        have = ckpt["tokenizer"]
        for key, value in want.items():
            if have.get(key) != value:
                raise CheckpointError(f"checkpoint {path} was made with tokenizer {have} but the data uses {want}: "
                                      "prepare the data with the checkpoint's tokenizer")
    return ckpt


def not_a_checkpoint(head):
    """What a file that torch.save did not write is, from its first bytes, and what to do; None when it cannot
    tell (then torch.load's own error, corrupt or refused, is the answer)."""
    if not head:
        return ("empty (0 bytes): a copy, download or save that did not finish, or a disk that filled up; "
                "use an earlier checkpoint, or copy it again")
    text = head.lstrip()
    if text.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the file it points to: run `git lfs pull` in its repository, or download the file itself"
    if text[:1] == b"<" and b"html" in text.lower():
        return ("an HTML page (a download that saved a web page: a login, an error or a file's page, not the file): "
                "download the file itself (on the Hugging Face hub, its .../resolve/... link)")
    try:
        chars = text.decode("utf-8")
    except UnicodeDecodeError as e:  # binary, unless only a character cut by the 512-byte read
        if e.start < len(text) - 3:
            return None
        chars = text[:e.start].decode("utf-8")
    if not chars or not all(c.isprintable() or c.isspace() for c in chars):
        return None
    return f"a text file (it begins {chars.splitlines()[0][:60]!r}), not one that torch.save wrote: pass the checkpoint's .pt file"


# -----------------------------------------------------------------------------
# a model from a loaded checkpoint


def checkpoint_config(ckpt):
    """The ModelConfig of a loaded checkpoint; CheckpointError (one line) when its model_config is unusable.
    Fields that a checkpoint predates take their defaults (one written before moe_experts is dense)."""
    try:
        return config_from_dict(ckpt.get("model_config"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint has an unusable model_config: {e}") from None


def model_from_checkpoint(ckpt, device="cpu"):
    """The Llama a loaded checkpoint describes, its weights checked against its model_config: CheckpointError
    (one line, naming the tensor) for a missing or extra key, another shape, a tensor that is not floating
    point, a NaN or an inf. The model is built on the meta device and loaded with assign=True, so there is
    no random init and, for float32 weights on the CPU, no second copy: its parameters are the
    checkpoint's own tensors (peak memory while growing: source + target)."""
    config = checkpoint_config(ckpt)
    state = ckpt.get("model")
    if not isinstance(state, dict):
        raise CheckpointError(f"the checkpoint's weights ('model') are a {type(state).__name__}, not a state dict")
    with torch.device("meta"):
        model = Llama(config)
    want = model.state_dict()
    missing, extra = [k for k in want if k not in state], [k for k in state if k not in want]
    if missing or extra:
        hint = ("; it was saved from a compiled or DDP-wrapped model: strip the '_orig_mod.'/'module.' prefixes"
                if any(str(k).startswith(("_orig_mod.", "module.")) for k in extra) else "")
        few = [f"{keys[:3]}{' ...' if len(keys) > 3 else ''}" for keys in (missing, extra)]
        raise CheckpointError(f"the checkpoint's weights do not fit its model_config: missing {few[0]}, unexpected "
                              f"{few[1]}{hint or '; the weights and the config come from different models'}")
    sizes = ", ".join(f"{k}={getattr(config, k)}" for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                                            "head_dim", "ffn_dim", "moe_experts"))
    for k, meta in want.items():
        v = state[k]
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            what = f"a {v.dtype} tensor" if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"
            raise CheckpointError(f"the checkpoint's weight {k} is {what}, not a floating-point tensor")
        if v.shape != meta.shape:
            raise CheckpointError(f"the checkpoint's weight {k} has shape {tuple(v.shape)} but its model_config ({sizes}) "
                                  f"gives {tuple(meta.shape)}: the weights and the config come from different models")
    bad = find_non_finite({k: state[k] for k in want})
    if bad:
        raise CheckpointError(f"the checkpoint's weight {bad} holds NaN or inf (the run diverged before it was saved): "
                              "use an earlier checkpoint")
    tensors = {k: state[k].to("cpu", torch.float32) for k in want}  # no copy when already float32 on the CPU
    if config.tie_embeddings:
        emb, head = tensors["embed_tokens.weight"], tensors["lm_head.weight"]
        if head is not emb and not torch.equal(head, emb):
            raise CheckpointError("the checkpoint's model_config has tie_embeddings=True but its lm_head.weight differs "
                                  "from embed_tokens.weight: set tie_embeddings=false in its config, or re-save the model")
        tensors["lm_head.weight"] = emb
    model.load_state_dict(tensors, assign=True)
    if config.tie_embeddings:  # assign gives each module its own Parameter: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rope_cos_sin(config.head_dim, config.max_seq_len, config.rope_theta)
    return model.to(device)


# -----------------------------------------------------------------------------
# a run's folder: periodic ckpt_STEP.pt files, the newest few kept, resume from the newest readable one


def checkpoint_paths(out_dir):
    """Periodic checkpoints in out_dir, oldest first."""
    return sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")))


_verified = {}  # (path, size, mtime_ns) -> whether it loaded and matched its checksum, once per process


def verifies(path):
    """Whether the file at path loads and matches its checksum (memory-mapped: not read into RAM twice)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _verified:
        try:
            load_checkpoint(path, mmap=True)
            _verified[key] = True
        except CheckpointError:
            _verified[key] = False
    return _verified[key]


def prune_checkpoints(out_dir, keep_last, log=print):
    """Keep the newest keep_last periodic checkpoints that verify (0 keeps all). A file is deleted only
    when keep_last newer ones have been read back whole, so the last checkpoint that verified is never
    deleted, whatever happened to the newer ones; a newer one that fails is kept for inspection."""
    if keep_last <= 0:
        return
    good = 0
    for path in reversed(checkpoint_paths(out_dir)):
        if good >= keep_last:
            os.remove(path)
        elif verifies(path):
            good += 1
        else:
            log(f"warning: {path} does not verify (corrupt on disk?); keeping older checkpoints")


def latest_checkpoint(out_dir, tokenizer, log=print, required_key=None, mmap=False):
    """(path, checkpoint) of the newest readable ckpt_*.pt in out_dir, for --resume. A file cut short by a
    kill is skipped for the one before it (saves are atomic, so that one is whole): nothing is lost.
    required_key: a key the caller's checkpoints always hold (posttrain.py's resume state). mmap: map the
    tensors from the file (the ranks of a host then share one copy of a large checkpoint in the page cache)."""
    for path in reversed(checkpoint_paths(out_dir)):
        try:
            ckpt = load_checkpoint(path, tokenizer=tokenizer, mmap=mmap)
            if required_key and required_key not in ckpt:
                raise CheckpointError(f"{path} has no {required_key!r}: it was not written by this kind of run")
            return path, ckpt
        except CheckpointError as e:
            log(f"warning: {e}")
    raise CheckpointError(f"--resume: no usable checkpoint in {out_dir}; run without --resume to start fresh")


# -----------------------------------------------------------------------------
# claiming an out_dir: one live run per folder, and never over another run's checkpoints


def check_folder_path(out_dir):
    """CheckpointError when out_dir, or a folder above it, is a file: saying which file, and what to do."""
    path = os.path.abspath(out_dir)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "out_dir " + out_dir if path == os.path.abspath(out_dir) else f"{path}, a folder above out_dir {out_dir},"
        what = f"a file ({os.path.getsize(path)} bytes)" if os.path.isfile(path) else "not a folder (a device, a socket or a pipe)"
        raise CheckpointError(f"{where} is {what}, not a folder: choose another out_dir, or move the file")


class RunLock:
    """An exclusive flock on out_dir/run.lock for the life of a run: a second live run on the same folder
    is refused, while a killed run's lock goes with its process (so --resume after a kill just works)."""

    def __init__(self, out_dir):
        check_folder_path(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "run.lock")
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise CheckpointError(f"{out_dir} is in use by a live run ({holder}): wait for it, or choose another out_dir") from None
            raise
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        self.file.flush()

    def release(self):
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def claim_grid(out_dir, resume, overwrite):
    """claim_out_dir for a grid of runs (reproduce.py, ablate.py): take out_dir's RunLock first, so no live grid
    is touched; then a fresh start into a folder that holds anything is refused unless overwrite, which deletes
    all of it but the lock. resume keeps everything (each run in it resumes or is kept)."""
    lock = RunLock(out_dir)
    try:
        held = [name for name in sorted(os.listdir(out_dir)) if name != "run.lock"]
        if held and not resume:
            if not overwrite:
                raise CheckpointError(f"{out_dir} already holds a grid ({', '.join(held[:3])}{' ...' if len(held) > 3 else ''}): "
                                      "pass --resume to continue it, choose a new out_dir, or pass --overwrite to delete it")
            for name in held:
                path = os.path.join(out_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    except BaseException:
        lock.release()
        raise
    return lock


# The temporary files nanogrow's writers put in a run's folder, renamed into place when whole, so left behind only
# by a kill mid-write: save_checkpoint's <name>.tmp.<pid> of ckpt_STEP.pt and final.pt, train.py's final.pt.tmp (a
# hard link), common.start_metrics' metrics.jsonl.tmp and series.py's series.json.tmp. Nothing else is the project's:
# a user's notes.tmp.txt or build.tmp/ stays.
RUN_TEMPORARY = re.compile(r"(ckpt_\d+\.pt|final\.pt)\.tmp\.\d+|(final\.pt|metrics\.jsonl|series\.json)\.tmp")


def run_temporaries(out_dir):
    """The paths in out_dir that are the project's own temporaries (RUN_TEMPORARY): plain files, never a folder or a link."""
    return sorted(path for path in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp*"))
                  if RUN_TEMPORARY.fullmatch(os.path.basename(path)) and os.path.isfile(path) and not os.path.islink(path))


def claim_out_dir(out_dir, resume, overwrite, results=("final.pt",), logs=("metrics.jsonl",)):
    """Take out_dir's RunLock and ready the folder; returns the lock, which the run releases at its end.
    Removes the temporaries a killed run of the project left behind (run_temporaries), and no other file. A fresh
    run (no --resume) into a folder that holds another run's checkpoints or results is refused unless overwrite,
    which deletes them with the old logs: nothing a user has is replaced unasked."""
    lock = RunLock(out_dir)
    try:
        for tmp in run_temporaries(out_dir):
            os.remove(tmp)
        if not resume:
            kept = checkpoint_paths(out_dir) + [p for p in (os.path.join(out_dir, r) for r in results) if os.path.exists(p)]
            if kept and not overwrite:
                raise CheckpointError(f"{out_dir} already holds a run ({os.path.basename(kept[-1])}): pass --resume to continue it, "
                                      "choose a new out_dir, or pass --overwrite to delete it")
            for path in kept + [os.path.join(out_dir, name) for name in logs]:
                if os.path.exists(path):
                    os.remove(path)
    except BaseException:
        lock.release()
        raise
    return lock
