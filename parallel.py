"""
parallel.py: one model over the ranks of a torchrun launch, apart from the model and the loop (as
torchtitan keeps its parallelize apart from its Llama).

    parallelize(model, cfg, device, fsdp, compiled)  ->  (the module the loop calls, the module AdamW steps)

DDP (every rank holds the whole model, gradients all-reduced) or FSDP2 (weights, gradients and AdamW state
sharded over the ranks), activation checkpointing per block, torch.compile with one graph per training step;
the distributed and device setup (TF32, deterministic kernels); the device side of the loop (batches prefetched
into pinned memory, an update that drops itself on a non-finite loss without waiting for the GPU, a clock of
training time alone); and a parallel model's weights and AdamW state gathered into, and loaded from, the layout
one process saves (checkpoint.py: AdamW state keyed by parameter name), so a checkpoint reads the same whoever
wrote it.

FSDP's modules are imported where they are used: they add about a second to the start of every process,
which a one-process or DDP run never needs.
"""

import contextlib
import datetime
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from checkpoint import optimizer_state_by_name
from common import CheckpointError, ConfigError, autocast_for, use_tf32
from model import Llama, rope_cos_sin

# -----------------------------------------------------------------------------
# the ranks: joining the process group, agreeing on what each reads, rank 0 acting for all


# rank 0's own work (preparing data, growing a stage, saving and verifying a checkpoint: minutes to hours at 8B)
# is waited for in a gloo group of its own with this timeout, never in an NCCL collective, whose timeout
# (--dist_timeout) is for a rank that is stuck. A rank 0 that dies closes its connections: the others stop at once.
RANK0_WORK_TIMEOUT = datetime.timedelta(hours=24)
_rank0_work_group = None  # made by setup_distributed


def setup_distributed(device_pref="auto", timeout_s=1800, deterministic=False):
    """(rank, local_rank, world_size, device). Under torchrun (RANK set) joins the process group:
    nccl on CUDA (bound to this rank's GPU: device_id), gloo on CPU, with a finite timeout on every collective,
    so a rank that hangs or dies ends the job instead of leaving the others waiting forever; and a gloo group
    with RANK0_WORK_TIMEOUT for on_rank0_then_share. On CUDA float32 matmuls use TF32 (bf16 autocast covers the
    rest); `deterministic`: kernels that give the same bits on every run (use_deterministic_algorithms)."""
    global _rank0_work_group
    if device_pref == "auto":
        device_pref = "cuda" if torch.cuda.is_available() else "cpu"
    rank, local_rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(device_pref, local_rank) if device_pref == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        use_tf32(device)
    use_deterministic_kernels(deterministic)
    if "RANK" in os.environ and not dist.is_initialized():  # a group of one too: FSDP needs one to run at all
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if cuda else None)
        _rank0_work_group = dist.new_group(backend="gloo", timeout=RANK0_WORK_TIMEOUT)
    return rank, local_rank, world, device


def use_deterministic_kernels(on):
    """Kernels that give the same bits on every run, so that --resume on CUDA continues bit for bit (on the CPU it
    does without): torch.use_deterministic_algorithms (an op without a deterministic kernel raises), the cuBLAS
    workspace it needs (CUBLAS_WORKSPACE_CONFIG, read when cuBLAS starts: before the first matmul), the
    flash-attention backward's deterministic mode (it follows the same switch; cuDNN's and the memory-efficient
    attention backward have none, so SDPA is kept to flash and math), inductor without on-device autotuning
    whose choice could differ between the killed and the resumed process. Slower: not measured (no GPU yet)."""
    torch.use_deterministic_algorithms(on)
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        from torch._inductor import config as inductor_config  # a second to import: only for the runs that ask
        inductor_config.deterministic = True
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = on
        torch.backends.cuda.enable_cudnn_sdp(not on)
        torch.backends.cuda.enable_mem_efficient_sdp(not on)


def same_on_every_rank(value, what, world):
    """Raise ConfigError on every rank unless each holds the same `value` (anything picklable): what a rank
    reads from disk by itself, the checkpoint it resumes from or the data rank 0 prepared, must be what rank 0
    reads. On one node it always is; a multi-node launch without a shared filesystem would otherwise start
    some ranks fresh while others resume, their AdamW states apart under one DDP model, and no error."""
    if world == 1:
        return
    values = [None] * world
    dist.all_gather_object(values, value)
    other = next((r for r, v in enumerate(values) if v != values[0]), None)
    if other is not None:
        raise ConfigError(f"{what}: rank {other} reads {values[other]!r} where rank 0 reads {values[0]!r}; every node must "
                          "see the same out_dir and data_dir: put them on a filesystem all nodes share")


def on_rank0_then_share(fn, rank, world):
    """fn() on rank 0 while the other ranks wait (its result there, None elsewhere), in the gloo group with
    RANK0_WORK_TIMEOUT (setup_distributed): rank 0's work may take hours, and no NCCL collective is open meanwhile.
    An exception on rank 0 is raised on every rank, so the others stop too instead of waiting until the timeout."""
    if world == 1:
        return fn()
    result, raised = None, [None]
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # handed to every rank below, then raised
            raised = [e]
    dist.broadcast_object_list(raised, src=0, group=_rank0_work_group)  # also a barrier: no rank goes on before rank 0 is done
    if raised[0] is not None:
        raise raised[0]
    return result


# -----------------------------------------------------------------------------
# the model across ranks: DDP or FSDP2, activation checkpointing, compile


def is_fsdp(model):
    return hasattr(model, "set_requires_gradient_sync")  # FSDPModule's, without importing it


def checkpoint_blocks(model, on=True):
    """Activation checkpointing per block (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
    Cost"): a block keeps only its input for backward and recomputes the rest there, so a run holds every
    block's input plus one block's activations instead of all of them, for about one more forward pass of
    compute. A flag each Block's forward reads (model.Block.forward: non-reentrant torch.utils.checkpoint called
    inside it, which works under DDP, FSDP and torch.compile); the block's class, parameter names and state dict
    stay as they are."""
    for block in model.layers:
        block.checkpointed = on


def compile_settings(backend):
    """Before a run compiles: dynamo's caches emptied (torch._dynamo.reset), so that each run, and each stage of a
    series in one process, compiles afresh (the stages' graphs, and each stage's train and eval graphs, would
    otherwise add up to dynamo's recompile limit of 8 for Llama.forward, after which it runs eagerly); scalars read
    from tensors captured in the graph (a mixture of experts' slice sizes, model.SparseMoE.dispatch: otherwise a
    graph break at every layer). `backend`: "inductor" (the default), or a test's counting backend."""
    torch._dynamo.reset()
    torch._dynamo.config.capture_scalar_outputs = True
    return dict(backend=backend, fullgraph=True, dynamic=False)  # a graph break or a recompile past the limit raises


def shard_model(model, cfg, device, compiled, backend="inductor"):
    """FSDP2 (torch.distributed.fsdp.fully_shard; Zhao et al. 2023, "PyTorch FSDP"): every rank holds 1/world
    of each parameter, of its gradient and of its AdamW moments, and all-gathers a block's weights just
    before the block runs. The model is built again on the meta device (no memory), each block is sharded
    as its own group (its weights are gathered one block at a time), then the root, whose group holds the
    embedding, the final norm and the lm_head (a tied embedding stays one parameter in one group). Only
    then is it materialized, sharded, and `model`'s weights, which rank 0 alone holds, are broadcast into
    the shards. On CUDA with bf16 the weights are gathered in bf16 and gradients reduced in float32, while
    the sharded weights AdamW steps stay float32 (the master copy). Compiled per block, as torchtitan's Llama
    (torchtitan/models/llama3/infra/parallelize.py, apply_compile): each block's forward is one graph, which
    every block shares, between FSDP's hooks (its all-gather and reduce-scatter), which run eagerly; the
    embedding, the final norm, the lm_head and the loss run eagerly too."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    config = model.config
    with torch.device("meta"):
        sharded = Llama(config)
    checkpoint_blocks(sharded, cfg.activation_checkpointing)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if autocast_for(device, cfg.dtype)[1] == "bfloat16" else MixedPrecisionPolicy())
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    settings = compile_settings(backend) if compiled else None
    for block in sharded.layers:
        if compiled:  # the forward alone, an attribute of the block: its name and state dict stay, FSDP's hooks around it
            block.forward = torch.compile(block.forward, **settings)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(sharded, mesh=mesh, mp_policy=mp)
    sharded.to_empty(device=device)
    sharded.rope_cos, sharded.rope_sin = rope_cos_sin(config.head_dim, config.max_seq_len, config.rope_theta, device)
    set_model_state_dict(sharded, model.state_dict() if dist.get_rank() == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return sharded


def parallelize(model, cfg, device, fsdp, compiled, backend="inductor"):
    """(the module the loop calls, the module whose parameters AdamW steps and whose weights are saved).
    FSDP: shard_model's, both at once. Otherwise the model on the device, checkpointed, compiled whole with
    fullgraph=True (the forward to the loss, and its backward, one graph per training step) and under torchrun
    DDP-wrapped; the raw model stays what is saved (never the wrapper's state dict: nanoGPT issue 325).
    DDP wraps the compiled model: dynamo's DDP optimizer (torch._dynamo.config.optimize_ddp, on by default)
    splits the graph compiled inside DDP's forward at DDP's gradient buckets, so each bucket's all-reduce starts
    while the backward of the rest runs. (Compiling the wrapper instead traces DDP's own forward, the reducer's
    bookkeeping, which dynamo cannot: two graph breaks every step, and fullgraph impossible.)"""
    if fsdp:
        sharded = shard_model(model, cfg, device, compiled, backend)
        return sharded, sharded
    raw_model = model.to(device)
    checkpoint_blocks(raw_model, cfg.activation_checkpointing)
    model = torch.compile(raw_model, **compile_settings(backend)) if compiled else raw_model
    if dist.is_initialized():
        # gradients as views into DDP's all-reduce buckets: no second copy of them (4 bytes per parameter); no buffers
        # synced before each forward: the model's only buffers are the RoPE tables, the same on every rank
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        gradient_as_bucket_view=True, forward_sync_buffers=False)
    return model, raw_model


def unwrap_ddp(model):
    """The module DDP wraps (compiled, if it was), or the model itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@torch.no_grad()
def mean_loss(model, batches, ctx):
    """The mean loss per target token of a model over fixed batches of (inputs, targets) (fixed validation
    batches), with every rank taking part: each computes its share and the sums are all-reduced (no rank-0-only
    evaluation that would leave the others waiting in a collective). Under FSDP each forward is a collective too
    (it all-gathers the weights): every rank runs as many, and one short of batches repeats its first and leaves
    it out of the sums."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model = unwrap_ddp(model)  # no gradients to all-reduce
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=batches[0][0].device if batches else "cpu")
    rank_batches = batches[rank::world]
    for i in range(-(-len(batches) // world) if is_fsdp(model) else len(rank_batches)):
        x, y = rank_batches[i] if i < len(rank_batches) else batches[0]
        with ctx:
            _, loss = model(x, y)
        if i < len(rank_batches):
            total += torch.tensor([loss.item() * y.numel(), y.numel()], dtype=torch.float64, device=total.device)
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def clip_grad_norm(model, max_norm):
    """Clip the gradients to max_norm (0: no clipping); their norm before clipping, a plain tensor, the same on every
    rank. Wanted with clipping off too (divergence check, logs): an infinite max_norm scales by exactly 1. Over FSDP's
    sharded gradients the whole model's (all-reduced): a replicated DTensor, made plain."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def mean_over_ranks(tensor):
    """The tensor averaged over the ranks (all-reduced: the same on every rank); itself in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    dist.all_reduce(tensor)
    return tensor / dist.get_world_size()


def no_sync_unless_last(model, last):
    """DDP all-reduces the gradients on a step's last micro-batch only (the context for the others skips it). FSDP
    reduce-scatters after every one, so a rank only ever holds its shard of the gradients: skipping it
    (set_requires_gradient_sync) would keep an unsharded float32 gradient on every rank, 4 bytes per parameter,
    the memory FSDP is for (torchtitan accumulates so too)."""
    return model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()


# -----------------------------------------------------------------------------
# the device side of the loop: batches ahead of the step, an update that needs no host sync, a clock of training


class Prefetcher:
    """A loader's batches (get_batch(step, micro)) on the device, one batch ahead: each is read, pinned and its copy
    queued (non_blocking=True from pinned memory on CUDA: data.BatchLoader(device=...)) when the one before is handed
    out, so the host does that work while the GPU still runs what was queued before it, and no copy waits for the
    GPU. Asked for another batch than the one foreseen (the first of a run), it fetches that one."""

    def __init__(self, loader, grad_accum):
        self.loader, self.grad_accum, self.ahead = loader, grad_accum, (None, None)

    def get_batch(self, step, micro):
        key, batch = self.ahead
        batch = batch if key == (step, micro) else self.loader.get_batch(step, micro)
        following = (step, micro + 1) if micro + 1 < self.grad_accum else (step + 1, 0)
        self.ahead = (following, self.loader.get_batch(*following))
        return batch


def update(optimizer, lr, loss, grad_norm, aux):
    """One optimizer update at learning rate lr and the step's one host sync: (the loss averaged over the ranks, the
    gradient norm, the load-balancing loss averaged) as floats. The update leaves weights, moments and step counts as they were where the
    loss or the norm is not finite, decided on the device: fused AdamW reads optimizer.found_inf (1.0: skip), as under
    torch.amp.GradScaler, so nothing waits for the GPU before the update is queued (common.DivergenceGuard then
    stops the run, or counts the skip). The sync comes after: the GPU runs the update (AdamW reads and writes 28 bytes
    per parameter: milliseconds at 1B) while the host reads two numbers and queues the next step's first kernels,
    so it need not idle (not measured: no GPU yet)."""
    loss, aux = mean_over_ranks(torch.stack([loss, aux]))
    optimizer.found_inf = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).to(torch.float32)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack([loss, grad_norm.to(loss.dtype), aux]).tolist()


class TrainingClock:
    """Seconds of training alone, for tok/s and MFU: the time from one step's host sync to the next, where neither an
    evaluation nor a checkpoint came between (restart() after them) and the step compiled no graph (dynamo's count
    of graphs, read on the host)."""

    def __init__(self):
        self.tokens, self.seconds, self.graphs_before = 0, 0.0, compiled_graphs()
        self.restart()

    def graphs_compiled(self):
        """Graphs dynamo compiled since the clock was made (the run's training step and evaluation: 2 in all)."""
        return compiled_graphs() - self.graphs_before

    def restart(self):
        self.since, self.graphs = time.perf_counter(), compiled_graphs()

    def tick(self, tokens):
        now, graphs = time.perf_counter(), compiled_graphs()
        if graphs == self.graphs:
            self.tokens, self.seconds = self.tokens + tokens, self.seconds + now - self.since
        self.since, self.graphs = now, graphs

    def tokens_per_second(self):
        """Of the training time since the last call; None where all of it compiled."""
        rate = self.tokens / self.seconds if self.seconds else None
        self.tokens, self.seconds = 0, 0.0
        return rate


def compiled_graphs():
    """Graphs dynamo has compiled in this process (0 where nothing was compiled: dynamo is not even imported)."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    return dynamo.counters["stats"]["unique_graphs"] if dynamo else 0


# -----------------------------------------------------------------------------
# a parallel model's state in the layout one process saves (under FSDP every rank must call these: they gather)


def model_state(model):
    """The whole model's state dict on the host: the model's own under DDP or one process; under FSDP
    gathered one tensor at a time, on rank 0 (the other ranks get an empty dict)."""
    if not is_fsdp(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if state and model.config.tie_embeddings:  # gathered as two copies; one tensor, as a single process saves it
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def parameter_names(model, optimizer):
    """The names (model.named_parameters()) of each AdamW group's parameters, in the group's order."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [[name_of[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def optimizer_state(model, optimizer):
    """AdamW's state keyed by parameter name (checkpoint.py's format): {"state": {name: {"step", "exp_avg",
    "exp_avg_sq"}}, "param_groups": [{..., "params": [name, ...]}]}. Under FSDP gathered on rank 0 (the other
    ranks get an empty dict): torch.distributed.checkpoint names the parameters itself."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not state:
            return {}
        names = [name for group in state["param_groups"] for name in group["params"]]
        return {"state": {name: state["state"][name] for name in names if name in state["state"]},
                "param_groups": state["param_groups"]}
    names = [name for group in parameter_names(model, optimizer) for name in group]
    state = optimizer.state_dict()  # torch's own: parameters numbered 0, 1, ... in group order
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def load_optimizer_state(model, optimizer, state, decay_embeddings=False, where="the checkpoint", own_settings=False):
    """Load a by-name AdamW state (optimizer_state's) into a live optimizer: its moments and step counts, and each
    group's settings unless own_settings (the live lr, betas and weight decay stay: a run that starts from another's
    moments). An older file's state numbered in make_optimizer's group order is renamed first
    (checkpoint.optimizer_state_by_name; decay_embeddings as the run that wrote it). CheckpointError (one line)
    for no state or one that does not fit the model. Under FSDP rank 0's state is broadcast, each rank keeps its shard."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} holds no optimizer state (a checkpoint of train.py, or one grown with grow.py "
                              "--optimizer grown, holds one): drop init_optimizer, or use such a checkpoint")
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    state = optimizer_state_by_name(state, model, decay_embeddings)
    live = parameter_names(model, optimizer)
    params = dict(model.named_parameters())
    entries = state.get("state", {})
    fits = [sorted(g.get("params", [])) for g in state.get("param_groups", [])] == [sorted(names) for names in live]
    if fits and not entries:
        # no update taken yet (every step so far skipped as non-finite, parallel.update): AdamW holds no moments, as a
        # fresh one does; only the groups' settings carry over
        if not own_settings:
            for group, saved in zip(optimizer.param_groups, state["param_groups"]):
                group.update({k: v for k, v in saved.items() if k != "params"})
        return
    fits = fits and all(isinstance(entries.get(n), dict) and all(isinstance(entries[n].get(k), torch.Tensor)
                                                                  and entries[n][k].shape == params[n].shape
                                                                  for k in ("exp_avg", "exp_avg_sq"))
                        for names in live for n in names)
    if not fits:
        raise CheckpointError(f"{where}: its optimizer state does not fit this model (decay_embeddings must match the run "
                              "that wrote it): grow or train that checkpoint again with this model, or start a fresh optimizer")
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state if dist.get_rank() == 0 else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:  # torch's own layout: the live groups' parameters numbered in order (torch pairs saved and live ones by position)
        index = {name: i for i, name in enumerate(name for names in live for name in names)}
        optimizer.load_state_dict({"state": {index[n]: entries[n] for n in index},
                                   "param_groups": [{**g, "params": [index[n] for n in names]}
                                                    for g, names in zip(state["param_groups"], live)]})
    if own_settings:
        for group, own in zip(optimizer.param_groups, settings):
            group.update(own)
