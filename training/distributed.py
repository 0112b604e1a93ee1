"""Training on several processes (one per GPU) with PyTorch's own DistributedDataParallel: the one
place that talks to torch.distributed. Launched by torchrun, e.g. on one machine with 8 GPUs

    torchrun --standalone --nproc_per_node 8 -m training.train_composer --batch 32 --out models/shapes_world

Every process builds the same model (same seed); DDP broadcasts rank 0's weights at wrapping and
averages the gradients in backward, so the weights stay equal. Data is split (rank-distinct seeds
for the scene generator, a DistributedSampler shard of a pre-rendered scene set). Contrastive
losses see the batch gathered from every process (torch.distributed.nn's differentiable
all_gather: each process's rows keep their gradient), as the papers' code does. Only rank 0
prints, saves and writes records; the --minutes budget is rank 0's clock, broadcast every step.

Without torchrun (no WORLD_SIZE > 1 in the environment) nothing here does anything: one process,
no process group, the single-process code path unchanged.

MC_DIST_CHECK=<folder> makes every rank write <folder>/rank<r>.json at the end (a test hook): the
sha256 of its trained parameters, the logits shapes of its contrastive losses and the files it wrote.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

# a data seed per rank: rank 0 keeps the run's seed, so one process draws what it always drew
RANK_SEED_STRIDE = 100_003


@dataclass(frozen=True)
class Context:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_context: Context | None = None
_check = {"logits": {}, "writes": []}


def _from_env() -> Context:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    return Context(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)


def select_cuda_device():
    """Make this process's GPU (LOCAL_RANK) the current CUDA device: called before ComfyUI's
    model_management is imported, which takes the current device as its own."""
    ctx = _from_env()
    if ctx.enabled and torch.cuda.is_available():
        torch.cuda.set_device(ctx.local_rank)


def init() -> Context:
    """Idempotent: join torchrun's process group (nccl on CUDA, gloo on CPU) when launched by it."""
    global _context
    if _context is not None:
        return _context
    ctx = _from_env()
    if ctx.enabled and not dist.is_initialized():
        select_cuda_device()
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    _context = ctx
    return ctx


def context() -> Context:
    return _context or init()


def data_seed(seed: int) -> int:
    """The seed of this process's data and noise (model initialisation keeps the run's seed)."""
    return seed + RANK_SEED_STRIDE * context().rank


def wrap(module: torch.nn.Module, **ddp_options) -> torch.nn.Module:
    """`module` in DistributedDataParallel when there are several processes, else itself. Call it
    (never module.something) in the training step: DDP averages the gradients of its forward. Keep
    the returned object until backward has run: a DDP dropped after its forward takes its
    gradient hooks with it, and the gradients silently stay per process."""
    ctx = context()
    if not ctx.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel
    if torch.cuda.is_available():
        ddp_options.setdefault("device_ids", [ctx.local_rank])
    return DistributedDataParallel(module, **ddp_options)


def gather(x: torch.Tensor) -> torch.Tensor:
    """The rows of every process, concatenated in rank order; differentiable (each process's own
    rows get their gradient back)."""
    if not context().enabled:
        return x
    import torch.distributed.nn.functional as dist_fn
    return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)


def clip_loss():
    """open_clip's ClipLoss over the gathered batch (gather_with_grad: torch.distributed.nn's
    all_gather; local_loss off: the full (N x N) logits of the N gathered pairs)."""
    from open_clip.loss import ClipLoss

    class _NotedClipLoss(ClipLoss):
        def get_logits(self, *args, **kwargs):
            logits = super().get_logits(*args, **kwargs)
            note_logits("clip", logits[0].shape)
            return logits

    ctx = context()
    return _NotedClipLoss(local_loss=False, gather_with_grad=True, cache_labels=True, rank=ctx.rank,
                          world_size=ctx.world_size)


def mean(value: float, device) -> float:
    """The average of a number over the processes (a loss for the log)."""
    if not context().enabled:
        return value
    t = torch.tensor([float(value)], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / context().world_size


def broadcast_from_main(values: list[float], device) -> list[float]:
    """Rank 0's numbers on every process (the budget decision: every rank must stop at the same step)."""
    if not context().enabled:
        return values
    t = torch.tensor(values, device=device, dtype=torch.float64)
    dist.broadcast(t, src=0)
    return t.tolist()


# ---------------------------------------------------------------------------------------------
# The test hook (MC_DIST_CHECK)

def note_logits(name: str, shape):
    """The (rows, columns) of a contrastive loss's logits, for the check file."""
    _check["logits"][name] = [int(n) for n in shape]


def note_batch(x: torch.Tensor):
    """The sha256 of this process's first training batch (the check that the ranks' data differ)."""
    if os.environ.get("MC_DIST_CHECK") and "first_batch_sha256" not in _check:
        _check["first_batch_sha256"] = hashlib.sha256(x.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def note_shard(indices):
    """The scene-set rows this process draws from (the DistributedSampler's shard)."""
    if os.environ.get("MC_DIST_CHECK"):
        _check["shard"] = sorted(int(i) for i in indices)


def note_write(path):
    _check["writes"].append(str(path))


def parameters_sha256(*modules: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, p in module.named_parameters():
            h.update(f"{i}.{name}".encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def note_trained(*trained: torch.nn.Module):
    """The fingerprint of the trained weights as the last optimiser step left them (before rank 0
    alone evaluates, samples, loads EMA weights)."""
    if os.environ.get("MC_DIST_CHECK"):
        _check["parameters_sha256"] = parameters_sha256(*trained)
        if os.environ.get("MC_DIST_CHECK_EACH"):  # per tensor, to find which ones differ
            _check["parameter_sha256"] = {
                f"{i}.{name}": hashlib.sha256(p.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
                for i, m in enumerate(trained) for name, p in m.named_parameters()}


def finish(**fields):
    """End of a run: the MC_DIST_CHECK file (if asked), then wait for every process and leave the group."""
    ctx = context()
    folder = os.environ.get("MC_DIST_CHECK")
    if folder:
        pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
        out = {"rank": ctx.rank, "world_size": ctx.world_size, **_check, **fields}
        (pathlib.Path(folder) / f"rank{ctx.rank}.json").write_text(json.dumps(out, indent=1) + "\n")
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
