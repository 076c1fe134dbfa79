"""The train loop of one rank (paper §3.2–3.4): Lamb (or AdamW), warm-up + exponential decay, episodic
batches, Dice + BCE, the EMA memory bank, validation, atomic checkpoints and exact resume.

Launchers (``iris_pipelines.launch``) decide where ranks run; this function is the same code for one
process, ``torch.multiprocessing`` DDP and SLURM. With ``world_size > 1`` the launcher has already
initialised the default process group.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from pytorch_optimizer import Lamb
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from iris_pipelines.model import Iris, IrisConfig, dice_score, segmentation_loss

from .augment import AugmentParams
from .checkpoint import (
    SCHEDULING_KEYS,
    capture_rng_state,
    exclusive_checkpoint_folder,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .config import TrainConfig
from .sampler import (
    CaseRecord,
    EpisodeSampler,
    StepDataset,
    batch_to_device,
    case_records,
    crop_window,
    load_crop,
    train_class_ids,
    train_pool,
    union_box,
    volume_shape,
)

logger = logging.getLogger(__name__)
MetricsCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    """What a finished run hands to the train pipeline (rank 0's view)."""

    state_dict: dict[str, Tensor]
    model_config: dict[str, Any]
    history: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    class_ids: dict[str, int]
    world_size: int
    final_step: int
    weights_checksum: list[str] = field(default_factory=list)


class TrainingDiverged(RuntimeError):
    """The loss or the weights stopped being finite: training stops before such weights are written
    over the good checkpoints (pruning keeps only the last two) or registered."""


class TrainingInterrupted(Exception):
    """Raised on every rank once ``stop_requested`` fired: a checkpoint of ``step`` is on disk, so a
    restarted run resumes there (the SLURM launcher's preemption / time-limit path)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training stopped on request after step {step}; checkpoint saved")
        self.step = step


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimiser: Lamb (pytorch-optimizer, the paper's) or torch's AdamW."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return Lamb(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(index: int, config: TrainConfig) -> float:
    """Multiplier of the base lr for scheduler index ``index`` (0 = the first update).

    Linear warm-up to 1 over ``warmup_steps``, then exponential decay reaching ``final_lr_fraction`` at
    the last step (the paper's "exponential decay"; its rate is not stated, so we pin the end point).
    """
    warmup = config.warmup_steps
    if index < warmup:
        return (index + 1) / warmup
    decay_steps = config.steps - 1 - warmup
    if decay_steps <= 0:
        return 1.0
    progress = min(1.0, (index - warmup) / decay_steps)
    return config.final_lr_fraction**progress


def resolve_device(config: TrainConfig, rank: int, world_size: int = 1) -> torch.device:
    """``auto``: this rank's GPU on its node, or the CPU.

    The node-local index is ``LOCAL_RANK`` (set by the DDP and SLURM launchers, as by torchrun), the GPU
    those launchers pinned for NCCL. The global rank modulo the node's GPUs is only a fallback: it names
    another GPU when SLURM places ranks cyclically or unevenly over the nodes. A GPU index given with
    several ranks is refused: every rank would train on that one GPU, which NCCL rejects only after the
    ranks started (or which runs them all on one card).
    """
    if config.device != "auto":
        device = torch.device(config.device)
        if world_size > 1 and device.type == "cuda" and device.index is not None:
            raise ValueError(
                f"train.device {config.device!r} puts all {world_size} ranks on one GPU; use 'auto' or "
                "'cuda', which give each rank the GPU of its LOCAL_RANK"
            )
        return device
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def weights_checksum(state_dict: Mapping[str, Tensor]) -> str:
    """sha256 over the name, dtype, shape and raw bytes of every tensor, in name order: equal iff the
    weights are equal (the same bytes under another shape or dtype are other weights)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # empty: no bytes
    return digest.hexdigest()


class _EpisodeModel(nn.Module):
    """Returns the task embeddings alongside the logits, so the memory bank can reuse them, while the
    whole forward still goes through DDP (its gradient hooks are armed only inside DDP.forward)."""

    def __init__(self, iris: Iris) -> None:
        super().__init__()
        self.iris = iris

    def forward(
        self, query: Tensor, ref_image: Tensor, ref_masks: Tensor, class_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        task = self.iris.encode_task(ref_image, ref_masks)
        return self.iris.segment(query, task, class_mask), task


def _model_config(model_config: Mapping[str, Any], class_ids: Mapping[str, int]) -> IrisConfig:
    data = dict(model_config)
    size = int(data.get("memory_bank_size", 0))
    if size == 0:
        data["memory_bank_size"] = len(class_ids)
    elif size < len(class_ids):
        raise ValueError(f"memory_bank_size {size} is smaller than the {len(class_ids)} training classes")
    return IrisConfig.from_dict(data)


def _check_class_table(episode_index: Mapping[str, Any], class_ids: Mapping[str, int]) -> None:
    """Refuse, before the model is built, an index whose class tables give its train datasets no class:
    the memory bank would get no slot and the first step would fail on a disabled bank. (An index
    without train cases is left to the sampler, which says so.)"""
    datasets = sorted(
        {c["dataset"] for c in episode_index["cases"] if c["split"] == "train" and not c["heldout"]}
    )
    if datasets and not class_ids:
        raise ValueError(
            f"episode_index has no class-table entries for its training datasets {datasets} (its "
            f"'classes' holds {sorted(episode_index.get('classes', {}))}), so no class gets a memory-bank "
            "slot: the index is incomplete or was edited by hand; re-run `kedro run --pipelines=episodes` "
            "to rebuild it"
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    """Episodes are seeded per step; this only keeps stray global RNG use in workers reproducible."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def update_memory_bank(
    model: Iris, task: Tensor, class_ids: Tensor, class_mask: Tensor, momentum: float, world_size: int
) -> None:
    """EMA-update the bank with this step's reference embeddings of all ranks.

    Under DDP every rank all-gathers the (fixed-shape, padded with id −1) updates and applies them in
    rank order, so the banks stay bit-identical without broadcasting buffers and every rank's episodes
    count (averaging banks after the step would instead mix EMA states and break the α = 0.999 rule).
    """
    ids = torch.where(class_mask, class_ids, torch.full_like(class_ids, -1)).reshape(-1)
    emb = task.detach().float().reshape(-1, *task.shape[2:])
    if world_size > 1:
        all_ids = [torch.empty_like(ids) for _ in range(world_size)]
        all_emb = [torch.empty_like(emb) for _ in range(world_size)]
        dist.all_gather(all_ids, ids)
        dist.all_gather(all_emb, emb)
        ids, emb = torch.cat(all_ids), torch.cat(all_emb)
    model.update_memory_bank(ids, emb, momentum)


@dataclass(frozen=True)
class ValEpisode:
    dataset: str
    query: CaseRecord
    reference: CaseRecord
    classes: tuple[int, ...]


def validation_episodes(
    episode_index: Mapping[str, Any], records: Mapping[tuple[str, str], CaseRecord]
) -> list[ValEpisode]:
    """The fixed val episodes, one-shot with their first reference, on the classes both cases show."""
    out = []
    for ep in episode_index.get("episodes", []):
        if ep["split"] != "val" or not ep["references"]:
            continue
        query = records[(ep["dataset"], ep["query"])]
        reference = records[(ep["dataset"], ep["references"][0])]
        classes = tuple(c for c in ep["classes"] if c in query.bboxes and c in reference.bboxes)
        if classes:
            out.append(ValEpisode(ep["dataset"], query, reference, classes))
    return out


def _centred_crop(record: CaseRecord, classes: tuple[int, ...], crop: tuple[int, int, int]):
    lo, hi = union_box([record.bboxes[c] for c in classes])
    return load_crop(record, crop_window(volume_shape(record), crop, lo, hi, None), crop, classes)


@torch.no_grad()
def validate(
    model: Iris, episodes: list[ValEpisode], config: TrainConfig, device: torch.device, step: int
) -> list[dict[str, Any]]:
    """Mean one-shot Dice per dataset on foreground-centred crops (a cheap proxy for the full
    sliding-window evaluation of the evaluate pipeline).

    Classes spread wider than a crop are cut out of the windows centred on their union: a class the
    reference crop does not show leaves the episode (as in training), and only classes the query crop
    shows are scored, since Dice counts nothing found in an empty target as perfect.
    """
    was_training = model.training
    model.eval()
    scores: dict[str, list[float]] = {}
    for ep in episodes:
        ref, r_masks = _centred_crop(ep.reference, ep.classes, config.crop_size)
        shown = r_masks.flatten(1).amax(1) > 0
        classes = tuple(c for c, visible in zip(ep.classes, shown.tolist(), strict=True) if visible)
        if not classes:
            continue
        query, q_masks = _centred_crop(ep.query, classes, config.crop_size)
        present = q_masks.flatten(1).amax(1) > 0
        if not present.any():
            continue
        with autocast_context(device, config.precision):
            logits = model(query[None].to(device), ref[None].to(device), r_masks[shown][None].to(device))
        dice = dice_score(logits.float() > 0, q_masks[None].to(device) > 0.5)[0]
        scores.setdefault(ep.dataset, []).append(float(dice[present.to(device)].mean()))
    model.train(was_training)
    return [{"step": step, "dataset": d, "dice": float(np.mean(v))} for d, v in sorted(scores.items())]


# What _resume reads from a checkpoint: a file lacking one is passed over for the one before it.
RESUME_KEYS = ("model", "optimizer", "scheduler", "rng", "sampler", "history", "validation", "step")


@dataclass
class _State:
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)


def _resume(
    checkpoint_dir: Path,
    model: Iris,
    optimizer,
    scheduler,
    config: TrainConfig,
    device: torch.device,
    world_size: int,
) -> _State:
    found = load_latest_checkpoint(checkpoint_dir, required_keys=RESUME_KEYS)
    if found is None:
        return _State()
    path, ckpt = found
    # A rank's episodes depend on its rank and share of the batch, so the same steps on another number
    # of ranks are other episodes: the result would match neither run. Checkpoints from before the
    # world size was recorded are taken as they are.
    written_by = ckpt.get("world_size", world_size)
    if written_by != world_size:
        raise RuntimeError(
            f"checkpoint {path} was written by a run on {written_by} rank(s), this one has {world_size}: "
            f"resume with {written_by}, or move {checkpoint_dir} away to start afresh"
        )
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as error:
        raise RuntimeError(
            f"checkpoint {path} does not fit this network (written by other code or another config); "
            f"move {checkpoint_dir} away to start afresh.\n{error}"
        ) from error
    model.to(device)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    changed = _recipe_changes(ckpt.get("train_config"), config.to_dict())
    if changed:
        # The optimiser's and scheduler's states carry the old lr and weight decay; without this a
        # resumed run would keep them while the log says otherwise.
        _apply_schedule(optimizer, scheduler, config)
        logger.warning(
            "resuming %s, written with another train config (%s); continuing with the new one", path, changed
        )
    restore_rng_state(ckpt["rng"])
    logger.info("resumed from %s at step %d", path, ckpt["step"])
    return _State(int(ckpt["sampler"]["step"]), list(ckpt["history"]), list(ckpt["validation"]))


def _recipe_changes(saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str:
    """The train-config keys whose values differ from the checkpoint's, as ``key old → new``; "" when
    none does. ``SCHEDULING_KEYS`` change no weight, so a change of them alone resumes silently."""
    if saved is None:
        return "the checkpoint records none"
    missing = "(not recorded)"
    keys = sorted((saved.keys() | current.keys()) - set(SCHEDULING_KEYS))
    return ", ".join(
        f"{key} {saved.get(key, missing)} → {current.get(key, missing)}"
        for key in keys
        if saved.get(key, missing) != current.get(key, missing)
    )


def require_same_resume_step(steps: Sequence[int], checkpoint_dir: Path) -> None:
    """Every rank must resume the step rank 0 resumed. Ranks read the checkpoint folder each on its own
    node: a folder on node-local disk, or a shared filesystem that has not shown the newest file to every
    node yet, would have them train on from different weights while DDP averages their gradients."""
    if len(set(steps)) > 1:
        by_rank = ", ".join(f"rank {rank}: step {step}" for rank, step in enumerate(steps))
        raise RuntimeError(
            f"the ranks resumed from different checkpoints in {checkpoint_dir} ({by_rank}); the folder "
            "must be one shared directory that every node sees (not node-local disk): put "
            "checkpoint_dir on the shared filesystem, or wait for it to sync, and requeue"
        )


def require_same_weights_on_every_rank(checksums: Sequence[str], checkpoint_dir: Path) -> None:
    """DDP keeps every rank's weights bit-identical. Ranks that ended apart (a collective one rank
    skipped, a faulty GPU) trained no single model, and only rank 0's weights would be kept."""
    if len(set(checksums)) <= 1:
        return
    ranks_by_checksum: dict[str, list[int]] = {}
    for rank, checksum in enumerate(checksums):
        ranks_by_checksum.setdefault(checksum, []).append(rank)
    by_rank = "; ".join(
        f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {checksum[:12]}…"
        for checksum, ranks in ranks_by_checksum.items()
    )
    raise RuntimeError(
        f"the {len(checksums)} ranks ended training with different weights ({by_rank}), so the run made "
        f"no single model and nothing of it is kept. The checkpoints in {checkpoint_dir} hold rank 0's "
        "weights and may have drifted too: move that folder away and train afresh; if ranks drift apart "
        "again, suspect the hardware of the ranks that differ"
    )


def _apply_schedule(optimizer, scheduler: LambdaLR, config: TrainConfig) -> None:
    """Set ``config``'s lr and weight decay on restored optimiser and scheduler states, at their step."""
    scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr
        group["weight_decay"] = config.weight_decay
        group["lr"] = config.lr * lr_factor(scheduler.last_epoch, config)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _loader(sampler: EpisodeSampler, config: TrainConfig, start: int, device: torch.device) -> Iterator:
    steps = list(range(start + 1, config.steps + 1))
    return iter(
        DataLoader(
            StepDataset(sampler, config.steps + 1),
            batch_size=None,
            sampler=steps,
            num_workers=config.num_workers,
            worker_init_fn=_seed_worker if config.num_workers else None,
            pin_memory=device.type == "cuda",
            # The iterator draws its workers' base seed from this generator; from the global one it
            # would draw after a resume's restore_rng_state too, and a resumed run would then hold, and
            # checkpoint, another global RNG state than the uninterrupted run at the same step.
            generator=torch.Generator().manual_seed(config.seed),
        )
    )


def _global_mean(values: list[float], world_size: int, device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(tensor)
        tensor /= world_size
    return tensor.tolist()


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _diverged(what: str, checkpoint_dir: Path) -> TrainingDiverged:
    return TrainingDiverged(
        f"training diverged: {what}. Nothing of it was saved: the checkpoints in {checkpoint_dir} stop "
        "before it. Lower train.lr or train.grad_clip, or look for extreme intensities in the data, before "
        "rerunning: kedro run trains a changed train config afresh in its own checkpoint folder"
    )


def _any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """True on every rank if it is True on one: signals reach ranks at different steps, but all ranks
    must stop after the same one (a rank that leaves early would hang the others' collectives)."""
    if world_size == 1:
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def run_training(
    model_config: dict,
    train_config: dict,
    episode_index: dict,
    preprocessed_manifest: pd.DataFrame,
    *,
    checkpoint_dir: str | Path,
    rank: int = 0,
    world_size: int = 1,
    on_metrics: MetricsCallback | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train (or resume training) Iris on episodes of the train split; one rank's share of the work.

    ``stop_requested`` is polled after every step (e.g. a flag set by a SLURM warning signal); once it
    returns True on any rank, rank 0 writes a checkpoint of that step and every rank raises
    :class:`TrainingInterrupted`.
    """
    config = TrainConfig.from_dict(train_config)
    distributed = world_size > 1
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"world_size={world_size} but no process group is initialised (use a launcher)")
    if config.batch_size % world_size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by world_size {world_size}")
    checkpoint_dir = Path(checkpoint_dir)
    device = resolve_device(config, rank, world_size)
    is_main = rank == 0
    emit = on_metrics if (on_metrics and is_main) else (lambda _: None)

    records = case_records(preprocessed_manifest)
    class_ids = train_class_ids(episode_index)
    _check_class_table(episode_index, class_ids)
    iris_config = _model_config(model_config, class_ids)
    config.check_crop_fits(iris_config.size_divisor)
    # Rank 0 writes the checkpoints; the lock refuses a second run in this folder before it resumes.
    with exclusive_checkpoint_folder(checkpoint_dir) if is_main else contextlib.nullcontext():
        _seed_everything(config.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
        model = Iris(iris_config).to(device)
        optimizer = make_optimizer(model, config)
        scheduler = LambdaLR(optimizer, lambda index: lr_factor(index, config))
        state = _resume(checkpoint_dir, model, optimizer, scheduler, config, device, world_size)
        if distributed:
            resumed: list[Any] = [None] * world_size
            dist.all_gather_object(resumed, state.step)
            require_same_resume_step(resumed, checkpoint_dir)
        net: nn.Module = _EpisodeModel(model)
        if distributed:
            # Buffers are not broadcast: the memory bank is kept identical by all-gathered updates.
            net = DistributedDataParallel(
                net, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
        if config.compile:
            # After the DDP wrap, as torch documents for DDP + compile; ``model`` stays the plain module,
            # so checkpoints, validation and the memory bank never see the compiled wrapper's key prefix.
            net = torch.compile(net)
        sampler = EpisodeSampler(
            train_pool(episode_index, records),
            class_ids,
            config,
            rank=rank,
            batch_size=config.batch_size // world_size,
            augment=AugmentParams(flip_prob=config.flip_prob),
        )
        val_episodes = validation_episodes(episode_index, records) if is_main else []

        progress = tqdm(
            total=config.steps, initial=state.step, desc="train", disable=not is_main, dynamic_ncols=True
        )
        window_start, window_steps = time.perf_counter(), 0
        for cpu_batch in _loader(sampler, config, state.step, device):
            step = state.step + 1
            batch = batch_to_device(cpu_batch, device)
            lr = optimizer.param_groups[0]["lr"]
            with autocast_context(device, config.precision):
                logits, task = net(
                    batch["query"], batch["ref_image"], batch["ref_masks"], batch["class_mask"]
                )
            terms = segmentation_loss(
                logits,
                batch["query_masks"],
                batch["class_mask"],
                config.dice_weight,
                config.bce_weight,
                exclusive_weight=config.exclusive_weight,
            )
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            if config.grad_clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm(
                    p.grad for p in model.parameters() if p.grad is not None
                )
            # Every step, before the optimiser takes a NaN: the logged loss is only read every log_every
            # steps. One host sync; DDP has all-reduced the gradients, so every rank stops at this step.
            if not torch.isfinite(grad_norm):
                raise _diverged(
                    f"the gradient norm is {float(grad_norm)} at step {step} (lr {lr:.3g}; this rank's loss "
                    f"{terms.total.item()})",
                    checkpoint_dir,
                )
            optimizer.step()
            scheduler.step()
            update_memory_bank(
                model, task, batch["class_ids"], batch["class_mask"], config.memory_bank_momentum, world_size
            )
            state.step, window_steps = step, window_steps + 1
            progress.update(1)

            last = step == config.steps
            if step % config.log_every == 0 or step == 1 or last:
                parts = [terms.total, terms.dice, terms.bce] + (
                    [terms.exclusive] if terms.exclusive is not None else []
                )
                loss, dice_loss, ce_loss, *exclusive = _global_mean(
                    [t.item() for t in parts], world_size, device
                )
                if not np.isfinite(loss):  # the same mean on every rank, so all of them stop here
                    raise _diverged(f"the loss is {loss} at step {step} (lr {lr:.3g})", checkpoint_dir)
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": step,
                    "loss": loss,
                    "dice_loss": dice_loss,
                    "ce_loss": ce_loss,
                    **({"exclusive_loss": exclusive[0]} if exclusive else {}),
                    "lr": lr,
                    "samples_per_s": window_steps * config.batch_size / max(elapsed, 1e-9),
                }
                state.history.append(record)
                emit(record)
                progress.set_postfix(loss=f"{loss:.4f}", samples_s=f"{record['samples_per_s']:.2f}")
                window_start, window_steps = time.perf_counter(), 0
            if is_main and val_episodes and (step % config.val_every == 0 or last):
                for record in validate(model, val_episodes, config, device, step):
                    state.validation.append(record)
                    emit(record)
            stop = stop_requested is not None and not last and _any_rank(stop_requested(), world_size, device)
            if step % config.checkpoint_every == 0 or last or stop:
                if _any_rank(not _finite(model), world_size, device):
                    raise _diverged(
                        f"the weights hold NaN or infinite values after step {step}", checkpoint_dir
                    )
                if is_main:
                    save_checkpoint(
                        checkpoint_dir,
                        step,
                        {
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "rng": capture_rng_state(),
                            "sampler": {"step": step},
                            "world_size": world_size,
                            "train_config": config.to_dict(),
                            "model_config": iris_config.to_dict(),
                            "class_ids": class_ids,
                            "history": state.history,
                            "validation": state.validation,
                        },
                    )
                if distributed:
                    dist.barrier()
            if stop:
                progress.close()
                raise TrainingInterrupted(step)
        progress.close()

        final = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        checksums = [weights_checksum(final)]
        if distributed:
            gathered: list[Any] = [None] * world_size
            dist.all_gather_object(gathered, checksums[0])
            checksums = [str(c) for c in gathered]
            require_same_weights_on_every_rank(checksums, checkpoint_dir)
        return TrainResult(
            state_dict=final,
            model_config=iris_config.to_dict(),
            history=state.history,
            validation=state.validation,
            class_ids=class_ids,
            world_size=world_size,
            final_step=state.step,
            weights_checksum=checksums,
        )


__all__ = [
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "lr_factor",
    "run_training",
    "weights_checksum",
]
