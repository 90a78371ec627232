"""``fit``: a plain supervised training loop with tqdm bars, atomic checkpoints and DDP.

The same call runs in one process or under ``torchrun --nproc_per_node=N``: when the launcher's
``RANK``/``WORLD_SIZE`` variables are set, ``fit`` joins the process group itself (gloo on CPU,
nccl on CUDA), wraps the module in DistributedDataParallel and gives each rank its share of every
mini-batch.  The shares are cut from the same seeded global batches a single process would use,
and each rank's loss is weighted by its share, so N processes make the same updates as one (up
to float summation order).  Only rank 0 draws progress bars and writes checkpoints.
"""

from __future__ import annotations

import atexit
import io
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset, default_collate

from mlpersonal.errors import TrainingError
from mlpersonal.fileio import atomic_write_bytes

__all__ = ["fit", "distributed_context", "close_distributed"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_LOSSES: dict[str, LossFn] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


def distributed_context(backend: str | None = None) -> tuple[int, int]:
    """``(rank, world_size)``; joins the process group when launched by torchrun and not yet joined.

    ``backend`` defaults to gloo (CPU tensors); pass "nccl" for modules on CUDA.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    dist.init_process_group(backend or "gloo")
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return dist.get_rank(), dist.get_world_size()


def close_distributed() -> None:
    """Wait for every rank, then leave the process group: call it at the end of a torchrun script.
    (Tearing gloo down while a peer still works, e.g. rank 0 writing files, can abort a rank.)"""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _as_dataset(data: Any, what: str) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return TensorDataset(*(torch.as_tensor(np.asarray(t) if not torch.is_tensor(t) else t) for t in data))
    raise TrainingError(f"{what} must be a torch Dataset or an (inputs, targets) pair of tensors/arrays, "
                        f"got {type(data).__name__}")


def _batch(ds: Dataset, idx: Sequence[int]):
    if isinstance(ds, TensorDataset):
        i = torch.as_tensor(idx, dtype=torch.long)
        return tuple(t[i] for t in ds.tensors)
    return default_collate([ds[int(i)] for i in idx])


def _loss_fn(loss: str | LossFn) -> LossFn:
    if callable(loss):
        return loss
    if loss not in _LOSSES:
        raise TrainingError(f"unknown loss {loss!r}; use one of {sorted(_LOSSES)} or a callable(out, target)")
    return _LOSSES[loss]


def _optimizer(opt: Any, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if isinstance(opt, torch.optim.Optimizer):
        return opt
    if opt == "adam":
        return torch.optim.Adam(params, lr=lr)
    if opt == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if callable(opt):
        return opt(params)
    raise TrainingError(f"unknown optimizer {opt!r}; use 'adam', 'sgd', an optimizer, or a callable(params)")


def _save_checkpoint(module: nn.Module, folder: Path, epoch: int) -> Path:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return atomic_write_bytes(folder / f"epoch_{epoch:03d}.pt", buf.getvalue())


def _all_sum(values: list[float], world: int, device: torch.device) -> list[float]:
    """``values`` summed over the ranks (on ``device``: NCCL reduces only GPU tensors)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def _evaluate(module: nn.Module, ds: Dataset, loss_fn: LossFn, batch_size: int, rank: int, world: int,
              device: torch.device) -> dict[str, float]:
    was_training = module.training
    module.eval()
    total, correct, count, classify = 0.0, 0.0, 0, True
    mine = list(range(rank, len(ds), world))
    for i in range(0, len(mine), batch_size):
        x, y = (t.to(device) for t in _batch(ds, mine[i:i + batch_size]))
        out = module(x)
        total += float(loss_fn(out, y)) * len(y)
        classify = classify and out.dim() == 2 and not torch.is_floating_point(y)
        if classify:
            correct += float((out.argmax(1) == y).sum())
        count += len(y)
    module.train(was_training)
    total, correct, count = _all_sum([total, correct, float(count)], world, device)
    res = {"val_loss": total / max(count, 1)}
    if classify:
        res["val_accuracy"] = correct / max(count, 1)
    return res


def fit(module: nn.Module, train_data: Dataset | tuple, *, epochs: int = 1, batch_size: int = 32,
        optimizer: str | torch.optim.Optimizer | Callable = "adam", lr: float = 1e-3,
        loss: str | LossFn = "cross_entropy", val_data: Dataset | tuple | None = None,
        shuffle: bool = True, progress: bool = True, checkpoint_dir: str | os.PathLike | None = None,
        seed: int = 0) -> list[dict[str, float]]:
    """Train ``module`` in place on ``train_data``; returns one record per epoch.

    ``train_data``/``val_data``: a map-style Dataset of ``(input, target)`` or an ``(inputs,
    targets)`` pair.  Only parameters with ``requires_grad`` are optimised, by ``optimizer``: "adam",
    "sgd" (momentum 0.9), an Optimizer over them, or a callable(params).  ``seed`` drives the
    per-epoch shuffling (global batch order is identical for any number of processes).
    Records hold ``epoch``, ``loss`` (mean training loss), ``seconds`` and, with ``val_data``,
    ``val_loss`` (+ ``val_accuracy`` for classification).
    """
    if epochs < 0 or batch_size < 1:
        raise TrainingError(f"epochs must be >= 0 and batch_size >= 1 (got {epochs}, {batch_size})")
    ds = _as_dataset(train_data, "train_data")
    val = None if val_data is None else _as_dataset(val_data, "val_data")
    n = len(ds)
    if n == 0:
        raise TrainingError("train_data is empty")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("no parameter of the module requires grad: nothing to train "
                            "(unfreeze some layers, e.g. trainers.mark_updatable)")
    loss_fn = _loss_fn(loss)
    device = params[0].device
    rank, world = distributed_context("gloo" if device.type == "cpu" else "nccl")
    net = module
    if world > 1:
        net = nn.parallel.DistributedDataParallel(module, device_ids=None if device.type == "cpu" else [device])
    opt = _optimizer(optimizer, params, lr)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    show = progress and rank == 0
    if show:
        from tqdm.auto import tqdm
    steps = math.ceil(n / batch_size)
    history: list[dict[str, float]] = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
                 if shuffle else torch.arange(n))
        net.train()
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=True) if show else None
        seen, total = 0, 0.0
        for b in range(steps):
            glob = order[b * batch_size:(b + 1) * batch_size]
            mine = glob[rank::world]
            weight = len(mine) * world / len(glob)
            if len(mine) == 0:  # tiny last batch: still join the gradient all-reduce, with zero weight
                mine, weight = glob[:1], 0.0
            x, y = (t.to(device) for t in _batch(ds, mine.tolist()))
            opt.zero_grad(set_to_none=True)
            value = loss_fn(net(x), y)
            bad = not torch.isfinite(value)
            if world > 1:  # every rank must stop together, or the others hang in the next all-reduce
                bad = _all_sum([float(bad)], world, device)[0] > 0
            if bad:
                raise TrainingError(f"the loss is not finite at epoch {epoch + 1}, batch {b + 1} (rank {rank}: "
                                    f"{float(value)}); check the data for NaN/inf or lower the learning "
                                    f"rate (lr={lr})")
            (value * weight if weight != 1.0 else value).backward()
            opt.step()
            total += float(value.detach()) * len(mine) * (weight > 0)
            seen += len(mine) * (weight > 0)
            if bar is not None:
                bar.update()
                bar.set_postfix(loss=f"{total / max(seen, 1):.4f}", refresh=False)
        total, seen = _all_sum([total, float(seen)], world, device)
        rec = {"epoch": epoch + 1, "loss": total / seen}
        if val is not None:
            rec.update(_evaluate(module, val, loss_fn, max(batch_size, 256), rank, world, device))
        rec["seconds"] = time.perf_counter() - t0
        if bar is not None:
            bar.set_postfix({k: f"{v:.4f}" for k, v in rec.items() if k in ("loss", "val_loss", "val_accuracy")})
            bar.close()
        if ckpt is not None and rank == 0:
            _save_checkpoint(module, ckpt, epoch + 1)
        history.append(rec)
    return history
