"""`mer-dist align`: train the visual encoder on unlabeled video against the frozen audio teacher.

Read top to bottom, as torchtitan's trainer: `build` (teacher targets, encoder + objective heads in one DeepSpeed
engine, the batch plan), `resume` (the newest checkpoint that verifies, the MLflow run it names), `fit` (next batch
-> teacher targets -> loss -> backward/step -> log / eval / guard + checkpoint), `finish` (export, summary).
SIGTERM or SIGUSR1 -> checkpoint and exit with code 75 (EX_TEMPFAIL), which launch scripts read as "requeue me".
`pairing=shuffled` and `acoustic=base` are the controls: a fixed other clip's audio, or no adapter. DeepSpeed's
config, batch arithmetic and memory accounting live beside it in `train/zero.py`, the never-hurt guard in
`train/guard.py`, what the engine trains and the targets it meets in `train/align.py`.
"""
from __future__ import annotations

import logging
import math
import os
import resource
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from mer_dist import dist
from mer_dist.config import LABELS, AlignConfig, parse_loss, save
from mer_dist.data.ingest import load_manifest, shard_urls
from mer_dist.data.stream import SkipTotals, eval_loader, iterate, train_loader
from mer_dist.errors import CheckpointError, LockError
from mer_dist.io import OutputLock
from mer_dist.models.teacher import read_spec
from mer_dist.models.visual import VisualEncoder, export, read_encoder
from mer_dist.tracking import NodeMetrics, Tracker
from mer_dist.train import checkpoint
from mer_dist.train.align import Aligner, target_fn
from mer_dist.train.augment import ClipAugment
from mer_dist.train.guard import Guard
from mer_dist.train.losses import AlignmentObjective
from mer_dist.train.zero import ds_config, fp32_state, keep_global_batch, param_elements, state_bytes

log = logging.getLogger("mer_dist.align")


def run(cfg: AlignConfig) -> int:
    env = dist.setup(cfg.train.threads, always_group=True)
    job = build(cfg, env)
    resume(job)
    exit_code = fit(job)
    finish(job, exit_code)
    return exit_code


class Job:
    """What the pieces of a run share: set by `build` and `resume`, advanced by `fit`."""
    cfg: AlignConfig
    env: dist.DistEnv
    out: Path
    ckdir: Path
    lock: OutputLock
    teacher_spec: dict
    targets: Callable          # batch -> the objective's target dict (the teacher's outputs at the frame times)
    encoder: VisualEncoder
    engine: object             # the DeepSpeed engine around encoder + objective heads
    guard: Guard | None
    initial: dict | None       # the initial encoder's weights on rank 0 (the guard may export them)
    epoch_samples: int
    global_batch: int
    client: dict               # the checkpoint's client state ({} on a fresh run)
    step: int = 0
    samples_seen: int = 0
    skipped: int = 0           # corrupt samples the stream skipped (this rank's loader workers)
    tracker: Tracker
    run_id: str


def build(cfg: AlignConfig, env: dist.DistEnv) -> Job:
    """Teacher, encoder and objective wrapped in one DeepSpeed engine; the batch plan fixed before it is built."""
    import deepspeed  # after dist.setup(): DS_ACCELERATOR must be set before the first import
    job = Job()
    job.cfg, job.env, job.out = cfg, env, Path(cfg.out)
    job.ckdir = job.out / "checkpoints"
    job.lock = _one_writer(job.out, env)
    job.epoch_samples = load_manifest(cfg.data.shards)["splits"][cfg.split]["samples"]
    job.teacher_spec = read_spec(cfg.teacher)
    terms = parse_loss(cfg.loss)
    feat_dim = int(job.teacher_spec["dim"])
    torch.manual_seed(cfg.train.seed)   # identical init on every rank
    job.encoder = VisualEncoder(cfg.model, cfg.data.height)
    if cfg.model.init:
        job.encoder.load_state_dict(read_encoder(cfg.model.init)["state_dict"])
    objective = AlignmentObjective(
        terms, job.encoder.width,
        regress_dim={"features": feat_dim, "logits": len(LABELS), "both": feat_dim + len(LABELS)}[cfg.target_space],
        num_classes=len(LABELS), audio_dim=feat_dim if cfg.infonce_target == "features" else len(LABELS),
        embed_dim=cfg.infonce_dim, tau=cfg.kd_temperature, confidence_weighting=cfg.kd_confidence,
        frame_weight=cfg.frame_weight, utterance_weight=cfg.utterance_weight, views_temperature=cfg.views.temperature)
    job.targets = target_fn(cfg, env.device, objective.needs, {t.kind for t in terms})
    model = Aligner(job.encoder, objective, ClipAugment(cfg.views) if "views" in objective.needs else None)
    job.guard, job.initial = _guard(cfg, job.encoder, env.device, env)
    prev = checkpoint.peek(job.ckdir)
    reshard = bool(prev) and int(prev.get("world_size") or env.world_size) != env.world_size
    if reshard:
        cfg.train.grad_accum = keep_global_batch(cfg, int(prev["world_size"]), prev.get("global_batch"), env.world_size)
    job.global_batch = cfg.data.batch_size * cfg.train.grad_accum * env.world_size   # accumulation is final from here
    if cfg.train.epochs > 0:     # the same passes over the pool whatever the number of ranks
        cfg.train.steps = max(1, math.ceil(cfg.train.epochs * job.epoch_samples / job.global_batch))
    ds = ds_config(cfg, job.encoder.width, env.device.type == "cuda", env.ds_config_file)
    if reshard:
        ds["checkpoint"] = {"load_universal": True}
    cfg.train.zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0))   # the stage actually run
    job.engine, _, _, _ = deepspeed.initialize(model=model, config=ds,
                                               model_parameters=[p for p in model.parameters() if p.requires_grad])
    return job


def resume(job: Job) -> None:
    """Load the newest checkpoint that verifies, open the data stream after it, attach the MLflow run it names."""
    cfg, env = job.cfg, job.env
    job.client = checkpoint.load(job.engine, job.ckdir, env, cfg.train.trust_checkpoint) or {}
    job.step, job.samples_seen = int(job.client.get("step", 0)), int(job.client.get("samples_seen", 0))
    if job.guard is not None:
        job.guard.restore(job.client.get("guard"))
    if job.step and env.is_main:
        c = job.client
        was = f", written by {c['resharded_from']} ranks, now {env.world_size} with gradient accumulation " \
              f"{cfg.train.grad_accum}" if c.get("resharded_from") else ""
        why = f" ({c['passed_over']})" if c.get("passed_over") else ""
        print(f"align: resumed from checkpoint {c['tag']} at step {job.step}{was}{why}", flush=True)
    # one MLflow run per job: a resumed or requeued job reattaches to the run its checkpoint names
    job.tracker = Tracker(cfg.tracking, job.out, "align", active=env.is_main, run_id=job.client.get("mlflow_run_id", ""),
                          node_id=env.node_id, dataset=cfg.data.shards, describe=f"{','.join(cfg.loss)} "
                          f"pairing={cfg.pairing} acoustic={cfg.acoustic} seed={cfg.train.seed}", tags={
        "world_size": env.world_size, "launcher": env.launcher, "slurm_job_id": env.job_id,
        "restart": os.environ.get("SLURM_RESTART_COUNT", "0"), "zero_stage": cfg.train.zero_stage,
        "targets": cfg.targets, "loss": ",".join(cfg.loss), "pairing": cfg.pairing, "acoustic": cfg.acoustic,
        "pseudo": cfg.pseudo.dir or "none", "resumed_from_step": job.step})
    error = ""
    if env.is_main:       # rank 0 alone; whatever fails here reaches every rank (none waits in a collective)
        try:
            job.out.mkdir(parents=True, exist_ok=True)
            dropped = job.tracker.resume_at(job.step)
            if dropped:
                log.info("dropped %d metric row(s) of steps after the checkpoint (they are redone)", dropped)
            save(cfg, job.out / "config.yaml")
        except Exception as e:  # noqa: BLE001 - any failure must end every rank with one line
            error = f"{job.out}: cannot prepare the run directory ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
    dist.raise_if_any(error, CheckpointError)
    if env.is_main:
        job.tracker.params(cfg)
        job.tracker.artifact(job.out / "config.yaml")
        if job.guard is not None and job.step == 0:
            job.tracker.metrics({"guard_cv_waf": job.guard.scores[0]}, 0)
    # every rank saves the same client state: rank 0's run id, once its tracker has connected
    job.run_id = dist.all_gather_object(job.tracker.wait_run_id(30.0) if env.is_main else "")[0]


def fit(job: Job) -> int:
    """The loop: next batch -> targets -> loss -> backward/step, then log, eval and checkpoint; 75 on a signal."""
    cfg, env, engine, total, start = job.cfg, job.env, job.engine, job.cfg.train.steps, job.step
    # a resumed run draws a fresh stream (seed mixes in the step) instead of replaying the first samples
    # (pairing=shuffled, the control: every clip's video meets a fixed other clip's audio, see data/stream.py)
    it = iterate(train_loader(shard_urls(cfg.data.shards, cfg.split), cfg.data, env.rank, env.world_size,
                              seed=zlib.crc32(f"{cfg.train.seed}/{start}".encode()), pairing=cfg.pairing))
    eval_batches = _eval_set(cfg, job.targets)
    stop = dist.StopFlag(grace_s=cfg.train.stop_grace_s, exit_code=dist.EXIT_PREEMPTED,
                         on_give_up=(lambda: _mark_requeue(job.step)) if env.is_main else None)
    # the other nodes' first ranks add their own system/<node>/* metrics to the run
    node_metrics = NodeMetrics(cfg.tracking, job.out, job.run_id, env.node_id) \
        if env.node_id and env.local_rank == 0 and not env.is_main else None
    step_loss = lambda b: engine(b["frames"].to(env.device, non_blocking=True), job.targets(b))  # noqa: E731
    if env.is_main:     # the length of a run in passes over the pool: more ranks at the same steps means more epochs
        print(f"align: {total} steps x global batch {job.global_batch} = "
              f"{total * job.global_batch / max(job.epoch_samples, 1):.1f} epochs of the {job.epoch_samples}-clip "
              f"'{cfg.split}' split", flush=True)
    skips, window, exit_code = SkipTotals(), _Window(), 0
    bar = tqdm(total=total, initial=start, desc="align", unit="step", disable=not env.is_main)
    try:
        while job.step < total:
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
                job.samples_seen += len(batch["name"]) * env.world_size
            job.step += 1
            bar.update(1)
            if job.step % cfg.train.log_every == 0 or job.step == total:
                window = _log_row(job, window, skips, bar)
            if eval_batches and (job.step % cfg.train.eval_every == 0 or job.step in (total, start + 1)):
                job.tracker.metrics(_evaluate(engine, eval_batches, step_loss), job.step)
            stopping = stop.should_stop()
            if job.step % cfg.train.ckpt_every == 0 or job.step == total or stopping:
                _checkpoint(job, score=not stopping)
            if stopping:
                if env.is_main:
                    print(f"align: signal {stop.signum} -> checkpoint at step {job.step} saved, exiting for requeue",
                          flush=True)
                    _mark_requeue(job.step)
                exit_code = dist.EXIT_PREEMPTED
                break
    finally:
        bar.close()     # the error line of a failure starts on a line of its own
    job.skipped = skips.samples
    if node_metrics is not None:
        node_metrics.close()
    return exit_code


def _log_row(job: Job, window: _Window, skips: SkipTotals, bar) -> _Window:
    """One metrics row (the window's means over every rank); returns a fresh window."""
    dt = time.perf_counter() - window.t0
    metrics = {**window.mean_across_ranks(dt), "lr": job.engine.get_lr()[0],
               "samples_per_s": window.samples * job.env.world_size / dt,
               "epoch": job.samples_seen / max(job.epoch_samples, 1), "skipped_samples": skips.samples,
               "bad_shards": skips.shards}
    if job.env.device.type == "cuda":       # rank 0's peak since start: what sizing a card needs (BENCHMARKS.md)
        metrics["gpu_peak_gib"] = torch.cuda.max_memory_allocated(job.env.device) / 2**30
    job.tracker.metrics(metrics, job.step)
    bar.set_postfix(loss=f"{metrics['loss']:.3f}")
    return _Window()


def _checkpoint(job: Job, score: bool) -> None:
    """The guard scores the step first (the checkpoint carries its score), then every rank saves; the guard's best
    checkpoint stays out of rotation."""
    guard = job.guard
    if guard is not None and score:
        job.engine.eval()
        job.tracker.metrics({"guard_cv_waf": guard.score(job.engine.module.encoder.embed, job.step)}, job.step)
        job.engine.train()
    checkpoint.save(job.engine, job.ckdir, job.step, {
        "step": job.step, "samples_seen": job.samples_seen, "mlflow_run_id": job.run_id,
        "global_batch": job.global_batch, "guard": guard.state() if guard is not None else {}},
        job.cfg.train.keep_checkpoints, job.env, protect=checkpoint.tag(guard.best_step()) if guard is not None else "")


def finish(job: Job, exit_code: int) -> None:
    """Export encoder.pt (the guard's choice once the run is complete; a pre-empted run exports its latest state),
    write summary.json, close the MLflow run, release the run directory."""
    cfg, env, step, guard = job.cfg, job.env, job.step, job.guard
    local, full = param_elements(job.engine.module)
    state = state_bytes(job.engine, cfg.train.zero_stage, local)
    # peak resident memory of each rank's process (loader workers are processes of their own)
    peak_rss = dist.all_gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if env.is_main:
        chosen = guard.best_step() if guard is not None and exit_code == 0 else step
        meta = {"teacher": job.teacher_spec.get("adapter_hash", ""), "loss": list(cfg.loss), "pairing": cfg.pairing}
        # encoder-last.pt: the final step's weights, beside the guard's choice when that is another step
        for name, at in (("encoder.pt", chosen), ("encoder-last.pt", step)) if chosen != step else (("encoder.pt", step),):
            tag = checkpoint.latest_tag(job.ckdir) if at == step else checkpoint.tag(at)
            weights = job.initial if at == 0 else fp32_state(job.ckdir, tag, "encoder.", cfg.train.trust_checkpoint)
            export(job.encoder, weights, job.out / name, {"step": at, **meta})
        summary = {"step": step, "samples_seen": job.samples_seen, "world_size": env.world_size,
                   "launcher": env.launcher, "exit_code": exit_code, "skipped_samples": job.skipped,
                   "zero_stage": cfg.train.zero_stage, "param_elements_rank0": local, "param_elements_total": full,
                   "state_bytes_rank0": state, "peak_rss_bytes_per_rank": peak_rss,
                   "encoder_step": chosen, "guard": guard.state() if guard is not None else None,
                   "mlflow_run_id": job.run_id}
        checkpoint.write_summary(job.out, summary)
        if exit_code == 0:
            if guard is not None:
                print(guard.verdict(step), flush=True)
            job.tracker.artifact(job.out / "encoder.pt")
            print(f"align: done at step {step} -> {job.out / 'encoder.pt'}", flush=True)
    job.tracker.close("FINISHED" if exit_code == 0 else "KILLED")
    dist.barrier()
    job.lock.release()
    dist.cleanup()


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
        self.n, self.samples, self.wait, self.t0 = 0, 0, 0.0, time.perf_counter()

    def add(self, values: dict, samples: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        self.n += 1
        self.samples += samples

    def mean_across_ranks(self, seconds: float) -> dict[str, float]:
        keys = sorted(self.sums)
        means = dist.mean_across_ranks([self.sums[k] / max(self.n, 1) for k in keys] + [self.wait / seconds])
        return {**dict(zip(keys, means[:-1])), "data_wait_frac": means[-1]}


def _eval_set(cfg: AlignConfig, targets: Callable) -> list[dict]:
    """A fixed held-out set, identical on every rank (all ranks must run ZeRO-3 forwards together), its targets
    computed once (offline runs load the teacher just for this)."""
    if cfg.train.eval_samples <= 0:
        return []
    data = type(cfg.data)(**{**vars(cfg.data), "workers": 0})
    batches, n = [], 0
    for b in iterate(eval_loader(shard_urls(cfg.data.shards, cfg.eval_split), data, 0, 1)):
        batches.append(b)
        n += len(b["name"])
        if n >= cfg.train.eval_samples:
            break
    if batches:
        teacher = targets.teacher()
        for b in batches:
            b["target"] = targets(b, teacher=teacher)
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
