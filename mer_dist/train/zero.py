"""DeepSpeed beside the alignment loop, not inside it: the config filled from the stage's, the batch arithmetic
that keeps a checkpoint's global batch on another number of ranks, the fp32 weights of a checkpoint, and the
bytes a ZeRO stage leaves on a rank (summary.json, BENCHMARKS.md)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mer_dist.config import AlignConfig, ConfigError, resolve_repo_file


def ds_config(cfg: AlignConfig, width: int, on_gpu: bool, launch_file: str = "") -> dict:
    """configs/ds/zero{N}.json (or the file the launch named) with every "auto" filled from the stage config,
    so batch size, accumulation and schedule are set once and never disagree. The optimizer is torch's AdamW
    (fused kernels on a GPU) rather than DeepSpeed's FusedAdam, whose JIT build needs nvcc on every node."""
    path = Path(launch_file) if launch_file else resolve_repo_file(f"configs/ds/zero{cfg.train.zero_stage}.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: DeepSpeed config not found (train.zero_stage must be 1, 2 or 3)")
    ds = json.loads(path.read_text())
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_gpu and torch.cuda.is_bf16_supported())
    fill = {"train_micro_batch_size_per_gpu": cfg.data.batch_size, "gradient_accumulation_steps": cfg.train.grad_accum,
            "gradient_clipping": cfg.train.grad_clip, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay,
            "torch_adam": True, "fused": on_gpu, "total_num_steps": cfg.train.steps,
            # DeepSpeed's WarmupCosineLR refuses 0 (train.steps=1 or train.warmup_steps=0)
            "warmup_num_steps": max(1, min(cfg.train.warmup_steps, cfg.train.steps - 1)),
            "enabled": bf16, "stage3_param_persistence_threshold": 10 * width,
            "stage3_prefetch_bucket_size": int(0.9 * width * width)}

    def walk(node):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v)
            elif v == "auto":
                node[k] = fill[k]
    walk(ds)
    ds.pop("train_batch_size", None)
    return ds


def keep_global_batch(cfg: AlignConfig, old_world: int, old_global: int | None, world: int) -> int:
    """Gradient accumulation that keeps a checkpoint's global batch on another number of ranks (the LR schedule
    and the optimizer moments were tuned for it); a ConfigError saying what to set where none does."""
    old_global = old_global or cfg.data.batch_size * cfg.train.grad_accum * old_world
    per_step = cfg.data.batch_size * world
    if old_global % per_step:
        raise ConfigError(f"train.grad_accum: the checkpoint was trained with a global batch of {old_global} on "
                          f"{old_world} ranks; on {world} ranks data.batch_size x train.grad_accum x {world} must equal "
                          f"it (data.batch_size={cfg.data.batch_size} does not divide it: set data.batch_size so it does)")
    return old_global // per_step


def fp32_state(ckdir: Path, tag: str, prefix: str, trust: bool = False) -> dict[str, torch.Tensor]:
    """The fp32 master weights of the submodule `prefix` in checkpoint `tag` (DeepSpeed's zero_to_fp32: every stage,
    any precision; under bf16 the engine's module holds rounded copies). DeepSpeed's loader unpickles: the
    checkpoint is verified first (`checkpoint.verify`), like every other path that loads one."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mer_dist.train.checkpoint import verify
    verify(ckdir, tag, trust)
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckdir), tag=tag)
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def param_elements(module) -> tuple[int, int]:
    """(elements this rank holds, elements of the full model); they differ under ZeRO-3 partitioning."""
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())
    full = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    return int(local), int(full)


def state_bytes(engine, stage: int, local: int) -> int:
    """Bytes this rank holds for parameters + gradients + optimizer state (fp32 master partition and Adam
    moments, measured on the engine's optimizer; gradients: of every trainable parameter under ZeRO-1 -- frozen
    blocks have none --, the partition above)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    parts = list(inner.state.keys())      # the fp32 (flat, partitioned) tensors Adam steps (after >= 1 step)
    partition = sum(p.numel() for p in parts)
    moments = sum(t.numel() * t.element_size() for p in parts for t in inner.state.get(p, {}).values()
                  if torch.is_tensor(t) and t.dim() > 0)
    param_bytes = next(engine.module.parameters()).element_size()
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)
    grads = (trainable if stage < 2 else partition) * param_bytes
    return int(local * param_bytes + partition * 4 + grads + moments)
