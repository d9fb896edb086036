"""`mer-dist align`: train the visual encoder on unlabeled video against the frozen audio teacher.

Read top to bottom: set up the process group, build teacher + encoder + objective (`losses.py`),
wrap encoder and objective heads in one DeepSpeed engine, resume if a checkpoint exists, then loop:
next batch -> teacher targets -> loss -> backward/step -> log / eval / checkpoint. SIGTERM or SIGUSR1
-> checkpoint and exit with code 75 (EX_TEMPFAIL), which launch scripts read as "requeue me".
`pairing=shuffled` and `acoustic=base` are the controls: a fixed other clip's audio, or no adapter.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
import zlib
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from mer_dist import dist
from mer_dist.config import LABELS, AlignConfig, ConfigError, parse_loss, resolve_repo_file, save
from mer_dist.data.ingest import load_manifest, shard_urls
from mer_dist.data.stream import SkipTotals, eval_loader, iterate, train_loader
from mer_dist.errors import CheckpointError, LockError
from mer_dist.io import OutputLock
from mer_dist.models.teacher import TargetStats, Teacher, frame_targets, masked_mean
from mer_dist.models.visual import VisualEncoder, export, read_encoder
from mer_dist.tracking import NodeMetrics, Tracker
from mer_dist.train import checkpoint
from mer_dist.train.guard import Guard
from mer_dist.train.losses import AlignmentObjective
from mer_dist.train.pseudo import as_targets, for_training

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


class Aligner(nn.Module):
    """What the engine trains: the encoder (exported) and the objective's heads (alignment only)."""

    def __init__(self, encoder: VisualEncoder, objective: AlignmentObjective):
        super().__init__()
        self.encoder, self.objective = encoder, objective

    def forward(self, frames: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        return self.objective(self.encoder(frames), target)


def batch_targets(batch: dict, teacher: Teacher | None, stats: TargetStats | None, need: set[str],
                  target_space: str, device: torch.device, clip_space: str = "features") -> dict:
    """The teacher's outputs for a batch at the video's frame times, as the objective's terms `need` them:
    "regress" (in `target_space`), "logits" (frame posteriors), "clip" (utterance embedding: pooled features, or
    with `clip_space=posteriors` the utterance's emotion posteriors), and "valid".
    Online (a live `teacher`, one HuBERT pass) or offline (`teacher.npy` features in the batch): one path."""
    clip_feats = "clip" in need and clip_space == "features"
    want_feats = clip_feats or ("regress" in need and target_space != "logits")
    want_logits = "logits" in need or ("regress" in need and target_space != "features") or \
        ("clip" in need and clip_space == "posteriors")
    if teacher is not None:
        parts, mask = teacher.outputs(batch["audio"].to(device), batch["audio_lens"].to(device),
                                      features=want_feats, logits=want_logits)
        feats, logits = (parts[0] if want_feats else None), (parts[-1] if want_logits else None)
    else:
        if "teacher" not in batch:
            raise ValueError("align.targets=offline but the shards have no teacher.npy (run extract-targets)")
        feats, logits = batch["teacher"].to(device).float(), None
        mask = torch.arange(feats.shape[1], device=device)[None] < batch["teacher_lens"].to(device)[:, None]
    if feats is not None and stats is not None:
        feats = stats(feats)
    per_frame = torch.cat([x for x in (feats, logits) if x is not None], -1)
    pooled, valid = frame_targets(per_frame, mask, batch["frame_times"].to(device), batch["duration"].to(device))
    f_part = pooled[..., :feats.shape[-1]] if feats is not None else None
    l_part = pooled[..., -logits.shape[-1]:] if logits is not None else None
    target = {"valid": valid}
    if "regress" in need:
        target["regress"] = {"features": f_part, "logits": l_part}.get(target_space)
        if target_space == "both":
            target["regress"] = torch.cat([f_part, l_part], -1)
    if "logits" in need:
        target["logits"] = l_part
    if "clip" in need:
        target["clip"] = masked_mean(feats, mask) if clip_feats else masked_mean(logits.float(), mask).softmax(-1)
    return target


def run(cfg: AlignConfig) -> int:
    env = dist.setup(cfg.train.threads, always_group=True)
    import deepspeed  # after setup(): DS_ACCELERATOR must be set before the first import

    out, ckdir = Path(cfg.out), Path(cfg.out) / "checkpoints"
    lock = _one_writer(out, env)
    device = env.device
    urls = shard_urls(cfg.data.shards, cfg.split)
    epoch_samples = load_manifest(cfg.data.shards)["splits"][cfg.split]["samples"]
    spec_file = Path(cfg.teacher) / "teacher.json"
    if not spec_file.is_file():
        raise FileNotFoundError(f"{spec_file}: teacher not found (run `mer-dist adapt-audio`)")
    teacher_spec = json.loads(spec_file.read_text())
    terms = parse_loss(cfg.loss)
    load_teacher = lambda: Teacher.load(cfg.teacher, adapted=cfg.acoustic == "adapted").to(device)  # noqa: E731
    teacher = load_teacher() if cfg.targets == "online" else None
    stats = (teacher.stats if teacher is not None else TargetStats.load(cfg.teacher).to(device)) \
        if cfg.standardize else None
    feat_dim = int(teacher_spec["dim"])
    regress_dim = {"features": feat_dim, "logits": len(LABELS), "both": feat_dim + len(LABELS)}[cfg.target_space]
    if cfg.targets == "online" and teacher.head is None and ("kd" in {t.kind for t in terms} or
                                                            cfg.infonce_target == "posteriors"):
        raise ValueError(f"{cfg.teacher}: loss kd and infonce_target=posteriors need the teacher's emotion head (head.pt)")

    torch.manual_seed(cfg.train.seed)   # identical init on every rank
    encoder = VisualEncoder(cfg.model, cfg.data.height)
    if cfg.model.init:
        encoder.load_state_dict(read_encoder(cfg.model.init)["state_dict"])
    clip_dim = feat_dim if cfg.infonce_target == "features" else len(LABELS)
    objective = AlignmentObjective(terms, encoder.width, regress_dim, len(LABELS), clip_dim, cfg.infonce_dim,
                                   cfg.kd_temperature, cfg.kd_confidence, cfg.frame_weight, cfg.utterance_weight)
    model = Aligner(encoder, objective)
    guard, initial = _guard(cfg, encoder, device, env)
    need = objective.needs
    on_gpu = device.type == "cuda"
    prev = checkpoint.peek(ckdir)
    reshard = bool(prev) and int(prev.get("world_size") or env.world_size) != env.world_size
    if reshard:
        cfg.train.grad_accum = keep_global_batch(cfg, int(prev["world_size"]), prev.get("global_batch"), env.world_size)
    global_batch = cfg.data.batch_size * cfg.train.grad_accum * env.world_size   # accumulation is final from here
    if cfg.train.epochs > 0:     # the same passes over the pool whatever the number of ranks
        cfg.train.steps = max(1, math.ceil(cfg.train.epochs * epoch_samples / global_batch))
    ds = ds_config(cfg, encoder.width, on_gpu, env.ds_config_file)
    if reshard:
        ds["checkpoint"] = {"load_universal": True}
    cfg.train.zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0))   # the stage actually run
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=ds)
    client = checkpoint.load(engine, ckdir, env, cfg.train.trust_checkpoint) or {}
    start = int(client.get("step", 0))
    if guard is not None:
        guard.restore(client.get("guard"))
    samples_seen = int(client.get("samples_seen", 0))
    if start:
        log.info("resumed from %s at step %d (%d samples seen)", client["tag"], start, samples_seen)
        if env.is_main:
            was = f", written by {client['resharded_from']} ranks, now {env.world_size} with gradient accumulation " \
                  f"{cfg.train.grad_accum}" if client.get("resharded_from") else ""
            why = f" ({client['passed_over']})" if client.get("passed_over") else ""
            print(f"align: resumed from checkpoint {client['tag']} at step {start}{was}{why}", flush=True)
    # a resumed run draws a fresh stream (seed mixes in the step) instead of replaying the first samples
    # (pairing=shuffled, the control: every clip's video meets a fixed other clip's audio, see data/stream.py)
    it = iterate(train_loader(urls, cfg.data, env.rank, env.world_size, seed=zlib.crc32(f"{cfg.train.seed}/{start}".encode()),
                           pairing=cfg.pairing))

    pseudo = PseudoTargets(cfg) if cfg.pseudo else None
    eval_batches = _eval_set(cfg)
    if eval_batches:   # eval targets computed once (offline runs load the teacher just for this)
        eval_teacher = teacher or load_teacher()
        for b in eval_batches:
            b["target"] = batch_targets(b, eval_teacher, stats, need, cfg.target_space, device, cfg.infonce_target)
        del eval_teacher
    stop = dist.StopFlag(grace_s=cfg.train.stop_grace_s, exit_code=EXIT_PREEMPTED,
                         on_give_up=(lambda: _mark_requeue(step)) if env.is_main else None)
    # one MLflow run per job: a resumed or requeued job reattaches to the run its checkpoint names
    tracker = Tracker(cfg.tracking, out, "align", active=env.is_main, run_id=client.get("mlflow_run_id", ""), tags={
        "world_size": env.world_size, "launcher": env.launcher, "slurm_job_id": env.job_id,
        "restart": os.environ.get("SLURM_RESTART_COUNT", "0"), "zero_stage": cfg.train.zero_stage,
        "targets": cfg.targets, "loss": ",".join(cfg.loss), "pairing": cfg.pairing, "acoustic": cfg.acoustic,
        "pseudo": cfg.pseudo or "none",
        "resumed_from_step": start}, node_id=env.node_id)
    error = ""
    if env.is_main:       # rank 0 alone; whatever fails here reaches every rank (none waits in a collective)
        try:
            out.mkdir(parents=True, exist_ok=True)
            dropped = tracker.resume_at(start)
            if dropped:
                log.info("dropped %d metric row(s) of steps after the checkpoint (they are redone)", dropped)
            save(cfg, out / "config.yaml")
        except Exception as e:  # noqa: BLE001 - any failure must end every rank with one line
            error = f"{out}: cannot prepare the run directory ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
    dist.raise_if_any(error, CheckpointError)
    if env.is_main:
        tracker.params(cfg)
        tracker.artifact(out / "config.yaml")
        if guard is not None and start == 0:
            tracker.metrics({"guard_cv_waf": guard.scores[0]}, 0)

    def step_loss(batch) -> tuple[torch.Tensor, dict]:
        target = batch["target"] if "target" in batch else batch_targets(batch, teacher, stats, need, cfg.target_space, device, cfg.infonce_target)
        if pseudo is not None:
            target |= pseudo.batch(batch["name"], device)
        return engine(batch["frames"].to(device, non_blocking=True), target)

    skips = SkipTotals()
    # every rank saves the same client state: rank 0's run id, once its tracker has connected
    run_id = dist.all_gather_object(tracker.wait_run_id(30.0) if env.is_main else "")[0]
    # the other nodes' first ranks add their own system/<node>/* metrics to that run
    node_metrics = NodeMetrics(cfg.tracking, out, run_id, env.node_id) \
        if env.node_id and env.local_rank == 0 and not env.is_main else None
    total, step, exit_code = cfg.train.steps, start, 0
    if env.is_main:     # the length of a run in passes over the pool: more ranks at the same steps means more epochs
        print(f"align: {total} steps x global batch {global_batch} = {total * global_batch / max(epoch_samples, 1):.1f} "
              f"epochs of the {epoch_samples}-clip '{cfg.split}' split", flush=True)
    window, t_window = _Window(), time.perf_counter()
    bar = tqdm(total=total, initial=start, desc="align", unit="step", disable=not env.is_main)
    try:
        while step < total:
            engine.train()
            for _ in range(cfg.train.grad_accum):
                t0 = time.perf_counter()
                with stop.waiting_for_data():
                    batch = next(it)
                skips.update(batch)
                window.wait += time.perf_counter() - t0
                loss, parts = step_loss(batch)
                engine.backward(loss)
                engine.step()
                window.add({"loss": loss, **parts}, len(batch["name"]))
                samples_seen += len(batch["name"]) * env.world_size
            step += 1
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == total:
                dt = time.perf_counter() - t_window
                metrics = {**window.mean_across_ranks(dt), "lr": engine.get_lr()[0],
                           "samples_per_s": window.samples * env.world_size / dt,
                           "epoch": samples_seen / max(epoch_samples, 1), "skipped_samples": skips.samples,
                           "bad_shards": skips.shards}
                tracker.metrics(metrics, step)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                window, t_window = _Window(), time.perf_counter()
            if eval_batches and (step % cfg.train.eval_every == 0 or step == total or step == start + 1):
                tracker.metrics(_evaluate(engine, eval_batches, step_loss), step)
            stopping = stop.should_stop()
            if step % cfg.train.ckpt_every == 0 or step == total or stopping:
                if guard is not None and not stopping:      # scored before the save: the checkpoint carries it
                    engine.eval()
                    tracker.metrics({"guard_cv_waf": guard.score(engine.module.encoder.embed, step)}, step)
                    engine.train()
                checkpoint.save(engine, ckdir, step, {"step": step, "samples_seen": samples_seen, "mlflow_run_id": run_id,
                                                      "global_batch": global_batch,
                                                      "guard": guard.state() if guard is not None else {}},
                                cfg.train.keep_checkpoints, env,
                                protect=f"step{guard.best_step():08d}" if guard is not None else "")
            if stopping:
                if env.is_main:
                    print(f"align: signal {stop.signum} -> checkpoint at step {step} saved, exiting for requeue", flush=True)
                    _mark_requeue(step)
                exit_code = EXIT_PREEMPTED
                break
    finally:
        bar.close()     # the error line of a failure starts on a line of its own
    local, full = _param_elements(engine.module)
    state_bytes = _state_bytes(engine, cfg.train.zero_stage, local)
    # peak resident memory of each rank's process (loader workers are processes of their own)
    peak_rss = dist.all_gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if env.is_main:
        # the fp32 master weights of the final checkpoint (DeepSpeed's zero_to_fp32: every stage, any precision;
        # under bf16 the engine's module holds rounded copies)
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )
        # the guard's choice once the run is complete (a pre-empted run exports its latest state, as ever)
        chosen = guard.best_step() if guard is not None and exit_code == 0 else step
        meta = {"teacher": teacher_spec.get("adapter_hash", ""), "loss": list(cfg.loss), "pairing": cfg.pairing}
        for name, at in (("encoder.pt", chosen), ("encoder-last.pt", step)) if chosen != step else (("encoder.pt", step),):
            if at == 0:
                enc_sd = initial
            else:       # encoder-last.pt: the final step's weights, beside the guard's choice
                tag = checkpoint.latest_tag(ckdir) if at == step else f"step{at:08d}"
                sd = get_fp32_state_dict_from_zero_checkpoint(str(ckdir), tag=tag)
                enc_sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
            export(encoder, enc_sd, out / name, {"step": at, **meta})
        summary = {"step": step, "samples_seen": samples_seen, "world_size": env.world_size,
                   "launcher": env.launcher, "exit_code": exit_code, "skipped_samples": skips.samples,
                   "zero_stage": cfg.train.zero_stage, "param_elements_rank0": local, "param_elements_total": full,
                   "state_bytes_rank0": state_bytes, "peak_rss_bytes_per_rank": peak_rss,
                   "encoder_step": chosen, "guard": guard.state() if guard is not None else None}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        if guard is not None and exit_code == 0:
            print(guard.verdict(step), flush=True)
        if exit_code == 0:
            tracker.artifact(out / "encoder.pt")
            print(f"align: done at step {step} -> {out / 'encoder.pt'}", flush=True)
    tracker.close("FINISHED" if exit_code == 0 else "KILLED")
    if node_metrics is not None:
        node_metrics.close()
    dist.barrier()
    lock.release()
    dist.cleanup()
    return exit_code


class PseudoTargets:
    """Loss `pseudo`: the pseudo-label distribution of each clip that has one (soft, or one-hot with
    `pseudo_soft=false`); a clip without one weighs 0 (the held-out set, clips the selection left out)."""

    def __init__(self, cfg: AlignConfig):
        names, probs = for_training(cfg.pseudo, cfg.data.shards, cfg.test_split, cfg.transductive, "align", "v")
        self.table = {n: torch.from_numpy(p) for n, p in zip(names, as_targets(probs, cfg.pseudo_soft))}
        self.none = torch.zeros(len(LABELS))

    def batch(self, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        rows = [self.table.get(n, self.none) for n in names]
        return {"pseudo": torch.stack(rows).to(device),
                "pseudo_weight": torch.tensor([float(n in self.table) for n in names], device=device)}


def _guard(cfg: AlignConfig, encoder: VisualEncoder, device, env: dist.DistEnv) -> tuple[Guard | None, dict | None]:
    """The guard with the initial encoder's score (step 0), and that encoder's weights on rank 0 (exported when
    alignment does not beat it); (None, None) when it is off or the labeled split is too small to tell."""
    if not cfg.guard.enabled:
        return None, None
    guard = Guard(cfg, device, env.rank, env.world_size)
    if not guard.active:
        if env.is_main:
            print(f"align: guard off: {guard.why_off}; encoder.pt is the final step's", flush=True)
        return None, None
    encoder.to(device).eval()
    guard.score(encoder.embed, 0)
    encoder.train()
    return guard, ({k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()} if env.is_main else None)


def _one_writer(out: Path, env: dist.DistEnv) -> OutputLock:
    """Rank 0 locks the run directory; every rank learns if another run holds it (one line, exit 2)."""
    lock, error = OutputLock(out), ""
    if env.is_main:
        try:
            lock.acquire()
        except LockError as e:
            error = str(e)
    dist.raise_if_any(error, LockError)
    return lock


def _mark_requeue(step: int) -> None:
    """Launch scripts may name a file to learn of a pre-emption exit even when a slower rank is killed before the
    exit code reaches them (srun --kill-on-bad-exit): rank 0 writes it before any rank exits."""
    marker = os.environ.get("MER_REQUEUE_MARKER")
    if marker:
        Path(marker).write_text(f"{step}\n")


class _Window:
    """Sums of the loss terms over the steps since the last log line."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n, self.samples, self.wait = 0, 0, 0.0

    def add(self, values: dict, samples: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        self.n += 1
        self.samples += samples

    def mean_across_ranks(self, seconds: float) -> dict[str, float]:
        keys = sorted(self.sums)
        means = dist.mean_across_ranks([self.sums[k] / max(self.n, 1) for k in keys] + [self.wait / seconds])
        return {**dict(zip(keys, means[:-1])), "data_wait_frac": means[-1]}


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
    window = _Window()
    for b in batches:
        loss, parts = step_loss(b)
        window.add({"loss": loss, **parts}, len(b["name"]))
    engine.train()
    return {f"eval_{k}": v / window.n for k, v in window.sums.items()}


def _param_elements(module) -> tuple[int, int]:
    """(elements this rank holds, elements of the full model); they differ under ZeRO-3 partitioning."""
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())
    full = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    return int(local), int(full)


def _state_bytes(engine, stage: int, local: int) -> int:
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
