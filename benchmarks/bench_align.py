"""#3 data-bound check, #4 offline vs online targets, #5 ZeRO memory per rank, #6 scaling 1 -> 2 ranks.

#3/#4 run the real align pieces in one process (Teacher, VisualEncoder, DeepSpeed engine, the WebDataset
stream); #5/#6 launch `mer-dist align` under torchrun and read the engines' own numbers (summary.json,
metrics.jsonl).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from common import fresh, report, run, setup, timed

from mer_dist.dist import free_port


def _engine_and_stream(env: dict, shards, targets: str, workers: int, loss: str = "mse", target_space: str = "features"):
    """The real align pieces (teacher, `batch_targets`, `Aligner`, objective, DeepSpeed engine) in one process."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    from mer_dist import config as C
    from mer_dist import dist
    from mer_dist.data.ingest import shard_urls
    from mer_dist.data.stream import train_loader
    from mer_dist.models.teacher import TargetStats, Teacher
    from mer_dist.models.visual import VisualEncoder
    from mer_dist.train.align import Aligner, batch_targets
    from mer_dist.train.zero import ds_config
    from mer_dist.train.losses import AlignmentObjective
    cfg = C.load(C.AlignConfig, overrides={"data.shards": str(shards), "teacher": str(env["teacher"]), "loss": loss,
                                            "targets": targets, "target_space": target_space,
                                            "data.workers": workers, "train.steps": 1000})
    dist.setup(threads=1, always_group=True)
    import deepspeed
    import torch
    teacher = Teacher.load(cfg.teacher) if targets == "online" else None
    stats = TargetStats.load(cfg.teacher)
    dim = stats.mean.numel()
    encoder = VisualEncoder(cfg.model, cfg.data.height)
    regress = {"features": dim, "logits": 6, "both": dim + 6}[target_space]
    objective = AlignmentObjective(C.parse_loss(cfg.loss), encoder.width, regress, 6, dim)
    model = Aligner(encoder, objective)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(cfg, encoder.width, False))
    it = iter(train_loader(shard_urls(shards, "unlabeled"), cfg.data, seed=0))

    def step(batch):
        loss, _ = engine(batch["frames"], batch_targets(batch, teacher, stats, objective.needs, target_space,
                                                          torch.device("cpu")))
        engine.backward(loss)
        engine.step()
    return it, step, cfg


def data_bound_and_targets(quick: bool) -> dict:
    env = setup(quick)
    n = 15 if quick else 60
    offline = env["base"] / "shards-teacher"
    if not (offline / "manifest.json").is_file():
        t_extract, _ = timed(run, [sys.executable, "-m", "mer_dist", "extract-targets", "--shards",
                                   str(env["shards"]), "--teacher", str(env["teacher"]), "--out", str(offline)])
        (env["base"] / "extract_seconds").write_text(str(t_extract))
    t_extract = float((env["base"] / "extract_seconds").read_text())
    res = {}
    for targets, shards in (("online", env["shards"]), ("offline", offline)):
        it, step, cfg = _engine_and_stream(env, shards, targets, workers=1)
        for _ in range(3):
            step(next(it))
        t0 = time.perf_counter()
        for _ in range(n):
            step(next(it))
        stream = (time.perf_counter() - t0) / n
        held = next(it)
        t0 = time.perf_counter()
        for _ in range(n):
            step(held)
        memory = (time.perf_counter() - t0) / n
        res[targets] = {"stream_s": stream, "memory_s": memory, "samples_per_s": cfg.data.batch_size / stream}
        del it
    epoch = json.loads((env["shards"] / "manifest.json").read_text())["splits"]["unlabeled"]["samples"]
    save = epoch / res["online"]["samples_per_s"] - epoch / res["offline"]["samples_per_s"]
    out = {"stream_vs_memory": res["online"]["stream_s"] / res["online"]["memory_s"],
           "offline_vs_online": res["offline"]["samples_per_s"] / res["online"]["samples_per_s"],
           "extract_seconds": t_extract, "break_even_epochs": t_extract / save if save > 0 else float("inf")}
    report("#3 data-bound check (tiny:vit, F=8 at 64x64, batch 8, 1 loader worker, 1 rank, 1 thread)", [
        ("step time with the real stream", f"{res['online']['stream_s'] * 1e3:.0f} ms"),
        ("step time with the batch held in memory", f"{res['online']['memory_s'] * 1e3:.0f} ms"),
        ("ratio (target <= 1.10)", f"{out['stream_vs_memory']:.2f}x")])
    report("#4 offline teacher.npy vs online teacher targets", [
        ("online", f"{res['online']['samples_per_s']:.1f} samples/s"),
        ("offline", f"{res['offline']['samples_per_s']:.1f} samples/s"),
        ("ratio offline/online (target >= 1)", f"{out['offline_vs_online']:.2f}x"),
        (f"extract-targets over {epoch} clips", f"{t_extract:.1f} s"),
        ("break-even (epochs that pay for extraction)", f"{out['break_even_epochs']:.2f}")])
    return out


def objectives(quick: bool) -> dict:
    """Step time of each alignment objective on one held batch (online targets), as a ratio to `mse`."""
    env = setup(quick)
    n = 8 if quick else 30
    times = {}
    for loss, space in (("mse", "features"), ("mse", "logits"), ("kd", "features"), ("infonce", "features"),
                        ("kd,infonce", "features")):
        it, step, _ = _engine_and_stream(env, env["shards"], "online", workers=0, loss=loss, target_space=space)
        held = next(it)
        for _ in range(2):
            step(held)
        t0 = time.perf_counter()
        for _ in range(n):
            step(held)
        times[f"{loss}/{space}"] = (time.perf_counter() - t0) / n
        del it
    base = times["mse/features"]
    out = {f"{k}_vs_mse": v / base for k, v in times.items()}
    report("#9 objectives: step time with the batch in memory (online teacher, tiny:vit, batch 8, 1 thread)",
           [(k, f"{v * 1e3:.0f} ms ({v / base:.2f}x mse/features; target <= 1.15x)") for k, v in times.items()])
    return out


def _align(env, nproc: int, steps: int, extra: list[str], out) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "mer_dist", "align", "--shards", str(env["shards"]), "--teacher", str(env["teacher"]), "--out", str(out),
           "--steps", str(steps), "tracking.enabled=false", "guard.enabled=false", "train.eval_samples=0", "train.log_every=5",
           "train.threads=1", "data.workers=0", *extra]
    run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    summary = json.loads((out / "summary.json").read_text())
    m = [json.loads(x) for x in open(out / "metrics.jsonl") if '"samples_per_s"' in x]
    summary["samples_per_s"] = sum(r["samples_per_s"] for r in m[1:]) / max(1, len(m) - 1)
    return summary


def zero_and_scaling(quick: bool) -> dict:
    """Quick mode (the test suite's smoke run) measures ZeRO-1 and ZeRO-3 only: ZeRO-2 is every align test's
    stage, and a 2-vs-1-rank speed ratio means nothing at the quick run's step counts."""
    env = setup(quick)
    base = fresh(env["base"], "zero")      # fresh run directories: nothing resumes an earlier run
    one = _align(env, 1, 4, ["train.zero_stage=1"], base / "r1")
    res = {}
    rows = [("1 rank: params+grads+Adam state", f"{one['state_bytes_rank0'] / 2**20:.2f} MiB")]
    for z in (1, 3) if quick else (1, 2, 3):
        s = _align(env, 2, 4, [f"train.zero_stage={z}"], base / f"z{z}")
        res[f"zero{z}_vs_1rank"] = s["state_bytes_rank0"] / one["state_bytes_rank0"]
        rows.append((f"ZeRO-{z}, 2 ranks, rank 0 (ratio)", f"{s['state_bytes_rank0'] / 2**20:.2f} MiB "
                     f"({res[f'zero{z}_vs_1rank']:.2f}x; target ZeRO-3 <= 0.55x)"))
    report("#5 ZeRO per-rank bytes of parameters + gradients + optimizer state (from the engines)", rows)
    if quick:
        return res
    s1 = _align(env, 1, 60, ["train.zero_stage=2"], base / "s1")
    s2 = _align(env, 2, 60, ["train.zero_stage=2"], base / "s2")
    res["scaling_2_vs_1"] = s2["samples_per_s"] / s1["samples_per_s"]
    report("#6 scaling, 1 thread per rank, batch 8 per rank, ZeRO-2, decode in the rank (0 workers)", [
        ("1 rank", f"{s1['samples_per_s']:.1f} samples/s"), ("2 ranks", f"{s2['samples_per_s']:.1f} samples/s"),
        ("ratio (target >= 1.7)", f"{res['scaling_2_vs_1']:.2f}x")])
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--part", choices=["targets", "objectives", "zero", "all"], default="all")
    a = ap.parse_args()
    if a.part in ("targets", "all"):
        data_bound_and_targets(a.quick)
    if a.part in ("objectives", "all"):
        objectives(a.quick)
    if a.part in ("zero", "all"):
        zero_and_scaling(a.quick)
