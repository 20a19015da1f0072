"""
parallel.py: one model over the ranks of a torchrun launch, apart from the model and the loop (as
torchtitan keeps its parallelize apart from its Llama).

    parallelize(model, cfg, device, fsdp, compiled)  ->  (the module the loop calls, the module AdamW steps)

DDP (every rank holds the whole model, gradients all-reduced) or FSDP2 (weights, gradients and AdamW state
sharded over the ranks), activation checkpointing per block, torch.compile; the distributed setup; and a
parallel model's weights and AdamW state gathered into, and loaded from, the layout one process saves
(checkpoint.py: AdamW state keyed by parameter name), so a checkpoint reads the same whoever wrote it.

FSDP's modules are imported where they are used: they add about a second to the start of every process,
which a one-process or DDP run never needs.
"""

import contextlib
import datetime
import functools
import os

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.nn.parallel import DistributedDataParallel

from checkpoint import optimizer_state_by_name
from common import CheckpointError, ConfigError, autocast_for
from model import Llama, rope_cos_sin

# -----------------------------------------------------------------------------
# the ranks: joining the process group, agreeing on what each reads, rank 0 acting for all


def setup_distributed(device_pref="auto", timeout_s=1800):
    """(rank, local_rank, world_size, device). Under torchrun (RANK set) joins the process group:
    nccl on CUDA, gloo on CPU, with a finite timeout on every collective, so a rank that hangs or dies
    ends the job instead of leaving the others waiting forever."""
    if device_pref == "auto":
        device_pref = "cuda" if torch.cuda.is_available() else "cpu"
    rank, local_rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(device_pref, local_rank) if device_pref == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():  # a group of one too: FSDP needs one to run at all
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return rank, local_rank, world, device


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
    """fn() on rank 0 while the other ranks wait (its result there, None elsewhere). An exception on rank 0
    is raised on every rank, so the others stop too instead of waiting in the next collective until the timeout."""
    if world == 1:
        return fn()
    result, raised = None, [None]
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # handed to every rank below, then raised
            raised = [e]
    dist.broadcast_object_list(raised, src=0)  # also a barrier: no rank goes on before rank 0 is done
    if raised[0] is not None:
        raise raised[0]
    return result


# -----------------------------------------------------------------------------
# the model across ranks: DDP or FSDP2, activation checkpointing, compile


def is_fsdp(model):
    return hasattr(model, "set_requires_gradient_sync")  # FSDPModule's, without importing it


def checkpoint_blocks(model):
    """Activation checkpointing per block (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
    Cost"): a block keeps only its input for backward and recomputes the rest there, so a run holds every
    block's input plus one block's activations instead of all of them, for about one more forward pass of
    compute. Non-reentrant torch.utils.checkpoint, which works under DDP, FSDP and torch.compile; the
    block's class, parameter names and state dict stay as they are."""
    for block in model.layers:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


def shard_model(model, cfg, device, compiled):
    """FSDP2 (torch.distributed.fsdp.fully_shard; Zhao et al. 2023, "PyTorch FSDP"): every rank holds 1/world
    of each parameter, of its gradient and of its AdamW moments, and all-gathers a block's weights just
    before the block runs. The model is built again on the meta device (no memory), each block is sharded
    as its own group (its weights are gathered one block at a time), then the root, whose group holds the
    embedding, the final norm and the lm_head (a tied embedding stays one parameter in one group). Only
    then is it materialized, sharded, and `model`'s weights, which rank 0 alone holds, are broadcast into
    the shards. On CUDA with bf16 the weights are gathered in bf16 and gradients reduced in float32, while
    the sharded weights AdamW steps stay float32 (the master copy)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    config = model.config
    with torch.device("meta"):
        sharded = Llama(config)
    if cfg.activation_checkpointing:
        checkpoint_blocks(sharded)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if autocast_for(device, cfg.dtype)[1] == "bfloat16" else MixedPrecisionPolicy())
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in sharded.layers:
        if compiled:
            block.compile()  # per block, inside FSDP's hooks (as torchtitan's Llama does)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(sharded, mesh=mesh, mp_policy=mp)
    sharded.to_empty(device=device)
    sharded.rope_cos, sharded.rope_sin = rope_cos_sin(config.head_dim, config.max_seq_len, config.rope_theta, device)
    set_model_state_dict(sharded, model.state_dict() if dist.get_rank() == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return sharded


def parallelize(model, cfg, device, fsdp, compiled):
    """(the module the loop calls, the module whose parameters AdamW steps and whose weights are saved).
    DDP (or one process): the model on the device, checkpointed, compiled, DDP-wrapped; the raw model stays
    what is saved (never the wrapper's state dict: nanoGPT issue 325). FSDP: shard_model's, both at once."""
    if fsdp:
        sharded = shard_model(model, cfg, device, compiled)
        return sharded, sharded
    raw_model = model.to(device)
    if cfg.activation_checkpointing:
        checkpoint_blocks(raw_model)
    model = torch.compile(raw_model) if compiled else raw_model
    if dist.is_initialized() and dist.get_world_size() > 1:
        # gradients as views into DDP's all-reduce buckets: no second copy of them (4 bytes per parameter)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        gradient_as_bucket_view=True)
    return model, raw_model


@torch.no_grad()
def mean_loss(model, batches, ctx):
    """The mean loss per target token of a model over fixed batches of (inputs, targets) (fixed validation
    batches), with every rank taking part: each computes its share and the sums are all-reduced (no rank-0-only
    evaluation that would leave the others waiting in a collective). Under FSDP each forward is a collective too
    (it all-gathers the weights): every rank runs as many, and one short of batches repeats its first and leaves
    it out of the sums."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model = model.module if isinstance(model, DistributedDataParallel) else model  # no gradients to all-reduce
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
