"""`mer-dist align`: train the visual encoder to regress onto the frozen teacher's features of each clip's audio.

Read top to bottom: set up the process group, build teacher + encoder, wrap the encoder in a
DeepSpeed engine, resume if a checkpoint exists, then loop: next batch -> targets -> loss ->
backward/step -> log / eval / checkpoint. SIGTERM or SIGUSR1 -> checkpoint and exit with code 75
(EX_TEMPFAIL), which launch scripts read as "requeue me".
"""
from __future__ import annotations

import json
import logging
import os
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from tqdm import tqdm

from mer_dist.config import LABELS, AlignConfig, resolve_repo_file, save
from mer_dist.data.ingest import load_manifest, shard_urls
from mer_dist.data.stream import SkipTotals, eval_loader, iterate, train_loader
from mer_dist.models.teacher import Teacher, frame_window, pool_to_frames
from mer_dist.models.visual import VisualEncoder, export
from mer_dist.tracking import Tracker
from mer_dist.train import checkpoint, dist

log = logging.getLogger("mer_dist.align")
EXIT_PREEMPTED = 75


def ds_config(cfg: AlignConfig, width: int, on_gpu: bool, launch_file: str = "") -> dict:
    """configs/ds/zero{N}.json (or the file the launch named) with every "auto" filled from the stage config,
    so batch size, accumulation and schedule are set once and never disagree."""
    path = Path(launch_file) if launch_file else resolve_repo_file(f"configs/ds/zero{cfg.train.zero_stage}.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: DeepSpeed config not found (train.zero_stage must be 1, 2 or 3)")
    ds = json.loads(path.read_text())
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_gpu and torch.cuda.is_bf16_supported())
    fill = {"train_micro_batch_size_per_gpu": cfg.data.batch_size, "gradient_accumulation_steps": cfg.train.grad_accum,
            "gradient_clipping": cfg.train.grad_clip, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay,
            "torch_adam": not on_gpu, "total_num_steps": cfg.train.steps,
            "warmup_num_steps": min(cfg.train.warmup_steps, max(cfg.train.steps - 1, 0)),
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


def load_stats(teacher_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    s = np.load(Path(teacher_dir) / "stats.npz")
    return torch.from_numpy(s["mean"]).float(), torch.from_numpy(s["std"]).float().clamp(min=1e-4)


def alignment_loss(pred, target, valid, kind: str, frame_w: float, utt_w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame-level (masked where the audio is padding) + utterance-level regression; returns (loss, cosine)."""
    m = valid.to(pred.dtype)
    n = m.sum().clamp(min=1)
    cos = F.cosine_similarity(pred, target, dim=-1)
    frame = ((pred - target) ** 2).mean(-1) if kind == "mse" else 1 - cos
    loss = frame_w * (frame * m).sum() / n
    if utt_w > 0:
        w = m.unsqueeze(-1) / m.sum(1, keepdim=True).clamp(min=1).unsqueeze(-1)
        up, ut = (pred * w).sum(1), (target * w).sum(1)
        utt = ((up - ut) ** 2).mean(-1) if kind == "mse" else 1 - F.cosine_similarity(up, ut, dim=-1)
        loss = loss + utt_w * utt.mean()
    return loss, (cos * m).sum() / n


def consolidated_state_dict(engine, zero_stage: int) -> dict | None:
    """Full fp32 state dict on rank 0 (ZeRO-3 shards gathered); all ranks must call it."""
    import deepspeed
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero_stage == 3):
        if tdist.get_rank() == 0:
            return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    return None


def run(cfg: AlignConfig) -> int:
    env = dist.setup(cfg.train.threads, always_group=True)
    import deepspeed  # after setup(): DS_ACCELERATOR must be set before the first import

    out, ckdir = Path(cfg.out), Path(cfg.out) / "checkpoints"
    device = env.device
    urls = shard_urls(cfg.data.shards, cfg.split)
    epoch_samples = load_manifest(cfg.data.shards)["splits"][cfg.split]["samples"]
    spec_file = Path(cfg.teacher) / "teacher.json"
    if not spec_file.is_file():
        raise FileNotFoundError(f"{spec_file}: teacher not found (run `mer-dist adapt-audio`)")
    teacher_spec = json.loads(spec_file.read_text())
    if cfg.target_space != "features" and cfg.targets == "offline":
        raise ValueError("align.target_space=logits/both needs align.targets=online (teacher.npy holds layer features)")
    teacher = Teacher.load(cfg.teacher).to(device) if cfg.targets == "online" else None
    mean, std = (t.to(device) for t in load_stats(cfg.teacher))
    out_dim = {"features": int(teacher_spec["dim"]), "logits": len(LABELS),
               "both": int(teacher_spec["dim"]) + len(LABELS)}[cfg.target_space]

    torch.manual_seed(cfg.train.seed)   # identical init on every rank
    model = VisualEncoder(cfg.model, out_dim, cfg.data.height)
    if cfg.model.init:
        model.load_state_dict(torch.load(cfg.model.init, map_location="cpu", weights_only=False)["state_dict"])
    on_gpu = device.type == "cuda"
    ds = ds_config(cfg, model.width, on_gpu, env.ds_config_file)
    cfg.train.zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0))   # the stage actually run
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=ds)
    client = checkpoint.load(engine, ckdir, env) or {}
    start = int(client.get("step", 0))
    samples_seen = int(client.get("samples_seen", 0))
    if start:
        log.info("resumed from %s at step %d (%d samples seen)", client["tag"], start, samples_seen)
        if env.is_main:
            print(f"align: resumed from checkpoint {client['tag']} at step {start}", flush=True)
    # a resumed run draws a fresh stream (seed mixes in the step) instead of replaying the first samples
    stream_seed = zlib.crc32(f"{cfg.train.seed}/{start}".encode())
    it = iter(train_loader(urls, cfg.data, env.rank, env.world_size, seed=stream_seed))

    def teacher_targets(t: Teacher, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame-time targets from a live teacher (one HuBERT pass), in the configured target space."""
        parts, mask = t.outputs(batch["audio"].to(device), batch["audio_lens"].to(device),
                                features=cfg.target_space in ("features", "both"),
                                logits=cfg.target_space in ("logits", "both"))
        if cfg.target_space != "logits" and cfg.standardize:
            parts[0] = (parts[0] - mean) / std
        ft = batch["frame_times"].to(device)
        return pool_to_frames(torch.cat(parts, -1), mask, ft, frame_window(ft, batch["duration"].to(device)))

    eval_batches = _eval_set(cfg)
    if eval_batches:   # eval targets computed once (offline runs load the teacher just for this)
        eval_teacher = teacher or Teacher.load(cfg.teacher).to(device)
        for b in eval_batches:
            b["target"] = teacher_targets(eval_teacher, b)
        del eval_teacher
    stop = dist.StopFlag()
    tracker = Tracker(cfg.tracking, out, "align", active=env.is_main, tags={
        "world_size": env.world_size, "launcher": env.launcher, "slurm_job_id": env.job_id,
        "restart": os.environ.get("SLURM_RESTART_COUNT", "0"), "zero_stage": cfg.train.zero_stage,
        "targets": cfg.targets, "resumed_from_step": start})
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save(cfg, out / "config.yaml")
        tracker.params(cfg)
        tracker.artifact(out / "config.yaml")

    def targets_of(batch) -> tuple[torch.Tensor, torch.Tensor]:
        if cfg.targets == "online":
            return teacher_targets(teacher, batch)
        if "teacher" not in batch:
            raise ValueError("align.targets=offline but the shards have no teacher.npy (run extract-targets)")
        feats = batch["teacher"].to(device).float()
        if cfg.standardize:
            feats = (feats - mean) / std
        mask = torch.arange(feats.shape[1], device=device)[None] < batch["teacher_lens"].to(device)[:, None]
        ft = batch["frame_times"].to(device)
        return pool_to_frames(feats, mask, ft, frame_window(ft, batch["duration"].to(device)))

    def step_loss(batch) -> tuple[torch.Tensor, torch.Tensor]:
        tgt, valid = batch["target"] if "target" in batch else targets_of(batch)
        pred = engine(batch["frames"].to(device, non_blocking=True)).float()
        return alignment_loss(pred, tgt, valid, cfg.loss, cfg.frame_weight, cfg.utterance_weight)

    skips = SkipTotals()
    total, step, exit_code = cfg.train.steps, start, 0
    window = {"loss": 0.0, "cos": 0.0, "n": 0, "wait": 0.0, "t0": time.perf_counter()}
    bar = tqdm(total=total, initial=start, desc="align", unit="step", disable=not env.is_main)
    while step < total:
        engine.train()
        for _ in range(cfg.train.grad_accum):
            t0 = time.perf_counter()
            batch = next(it)
            skips.update(batch)
            window["wait"] += time.perf_counter() - t0
            loss, cos = step_loss(batch)
            engine.backward(loss)
            engine.step()
            window["loss"] += loss.item()
            window["cos"] += cos.item()
            window["n"] += 1
            samples_seen += len(batch["name"]) * env.world_size
        step += 1
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == total:
            dt = time.perf_counter() - window["t0"]
            stats = _mean_across_ranks([window["loss"] / window["n"], window["cos"] / window["n"], window["wait"] / dt])
            metrics = {"loss": stats[0], "cos": stats[1], "data_wait_frac": stats[2],
                       "lr": engine.get_lr()[0], "samples_per_s": window["n"] * cfg.data.batch_size * env.world_size / dt,
                       "epoch": samples_seen / max(epoch_samples, 1), "skipped_samples": skips.samples,
                       "bad_shards": skips.shards}
            tracker.metrics(metrics, step)
            bar.set_postfix(loss=f"{stats[0]:.3f}", cos=f"{stats[1]:.3f}")
            window = {"loss": 0.0, "cos": 0.0, "n": 0, "wait": 0.0, "t0": time.perf_counter()}
        if eval_batches and (step % cfg.train.eval_every == 0 or step == total or step == start + 1):
            tracker.metrics(_evaluate(engine, eval_batches, step_loss), step)
        stopping = stop.should_stop()
        if step % cfg.train.ckpt_every == 0 or step == total or stopping:
            checkpoint.save(engine, ckdir, step, {"step": step, "samples_seen": samples_seen,
                                                   "stream_seed": stream_seed}, cfg.train.keep_checkpoints, env)
        if stopping:
            if env.is_main:
                print(f"align: signal {stop.signum} -> checkpoint at step {step} saved, exiting for requeue", flush=True)
                # launch scripts may name a file to learn of this even when a slower rank is killed before
                # the exit code reaches them (srun --kill-on-bad-exit): written before any rank exits
                marker = os.environ.get("MER_REQUEUE_MARKER")
                if marker:
                    Path(marker).write_text(f"{step}\n")
            exit_code = EXIT_PREEMPTED
            break
    bar.close()
    local, full = _param_elements(engine.module)
    state_bytes = _state_bytes(engine, cfg.train.zero_stage, local, full)
    sd = consolidated_state_dict(engine, cfg.train.zero_stage)
    if env.is_main:
        export(model, sd, out / "encoder.pt", {"step": step, "teacher": teacher_spec.get("adapter_hash", "")})
        summary = {"step": step, "samples_seen": samples_seen, "world_size": env.world_size,
                   "launcher": env.launcher, "exit_code": exit_code, "skipped_samples": skips.samples,
                   "zero_stage": cfg.train.zero_stage, "param_elements_rank0": local, "param_elements_total": full,
                   "state_bytes_rank0": state_bytes}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        if exit_code == 0:
            tracker.artifact(out / "encoder.pt")
            print(f"align: done at step {step} -> {out / 'encoder.pt'}", flush=True)
    tracker.close("FINISHED" if exit_code == 0 else "KILLED")
    dist.barrier()
    dist.cleanup()
    return exit_code


def _eval_set(cfg: AlignConfig) -> list[dict]:
    """A fixed held-out set, identical on every rank (all ranks must run ZeRO-3 forwards together)."""
    if cfg.train.eval_samples <= 0:
        return []
    data = type(cfg.data)(**{**vars(cfg.data), "workers": 0})
    batches, n = [], 0
    for b in iterate(eval_loader(shard_urls(cfg.data.shards, cfg.eval_split), data, 0, 1)):
        batches.append(b)
        n += len(b["name"])
        if n >= cfg.train.eval_samples:
            break
    return batches


@torch.no_grad()
def _evaluate(engine, batches, step_loss) -> dict:
    engine.eval()
    losses, coss = zip(*[(lo.item(), co.item()) for lo, co in (step_loss(b) for b in batches)])
    engine.train()
    return {"eval_loss": float(np.mean(losses)), "eval_cos": float(np.mean(coss))}


def _param_elements(module) -> tuple[int, int]:
    """(elements this rank holds, elements of the full model); they differ under ZeRO-3 partitioning."""
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())
    full = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    return int(local), int(full)


def _state_bytes(engine, stage: int, local: int, full: int) -> int:
    """Bytes this rank holds for parameters + gradients + optimizer state (fp32 master partition and Adam
    moments, measured on the engine's optimizer; gradients: full under ZeRO-1, the partition above)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    parts = list(inner.state.keys())      # the fp32 (flat, partitioned) tensors Adam steps (after >= 1 step)
    partition = sum(p.numel() for p in parts)
    moments = sum(t.numel() * t.element_size() for p in parts for t in inner.state.get(p, {}).values()
                  if torch.is_tensor(t) and t.dim() > 0)
    param_bytes = next(engine.module.parameters()).element_size()
    grads = (full if stage < 2 else partition) * param_bytes
    return int(local * param_bytes + partition * 4 + grads + moments)


def _mean_across_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        if tdist.get_backend() == "nccl":
            t = t.cuda()
        tdist.all_reduce(t)
        t /= tdist.get_world_size()
    return t.cpu().tolist()
