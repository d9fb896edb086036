"""#8 GPU: `mer-dist align` at ViT-B/16, F=16, 224x224 (bf16 on a GPU): samples/s, MFU and data-wait fraction.

The product path runs as a user runs it (torchrun, one rank per GPU, DeepSpeed ZeRO-2, `train.precision=auto`)
on a synthetic corpus encoded at 224x224; samples/s and `data_wait_frac` come from its metrics.jsonl (the steps
after the first log row). FLOPs per sample come from torch's FlopCounterMode over one forward + backward of the
same Aligner (the frozen teacher's forward included, since the step runs it), on the same device. MFU = achieved
FLOP/s over the card's dense bf16 peak: the table below by device name, or `--peak-tflops`.

`--quick` is tiny:vit, F=4 at 64x64 on whatever device there is (the tests run it on CPU, where no peak exists
and MFU is reported as not applicable). One command on a lent GPU machine:
    python benchmarks/bench_gpu.py --json gpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from common import fresh, report, run, setup

from mer_dist.dist import free_port

# dense bf16 tensor-core peak per GPU in TFLOP/s (vendor data sheets; sparsity not counted), first match wins
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
               ("A10G", 125.0), ("L4", 121.0), ("V100", 125.0)]
FULL = {"backbone": "tiny:vit-b16", "frames": 16, "size": 224, "batch": 8, "steps": 60, "clips": 256}
QUICK = {"backbone": "tiny:vit", "frames": 4, "size": 64, "batch": 4, "steps": 6, "clips": 32}


def peak_tflops(name: str) -> float:
    """The table's peak for a device name (0 when unknown: pass --peak-tflops)."""
    return next((v for k, v in PEAK_TFLOPS if k.lower() in name.lower()), 0.0)


def flops_per_sample(env: dict, size: dict, device: str) -> tuple[float, float]:
    """(FLOPs of one training sample: teacher forward + encoder forward/backward, of which the teacher's), counted
    by FlopCounterMode on one real batch of the corpus."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mer_dist import config as C
    from mer_dist.data.ingest import shard_urls
    from mer_dist.data.stream import eval_loader, iterate
    from mer_dist.models.teacher import TargetStats, Teacher
    from mer_dist.models.visual import VisualEncoder
    from mer_dist.train.align import Aligner, batch_targets
    from mer_dist.train.losses import AlignmentObjective
    cfg = C.load(C.AlignConfig, overrides={"data.shards": str(env["shards"]), "teacher": str(env["teacher"]),
                                            "model.backbone": size["backbone"], "data.frames": size["frames"],
                                            "data.height": size["size"], "data.width": size["size"]})
    dev = torch.device(device)
    teacher = Teacher.load(cfg.teacher).to(dev)
    stats = TargetStats.load(cfg.teacher).to(dev)
    encoder = VisualEncoder(cfg.model, cfg.data.height)
    dim = stats.mean.numel()
    objective = AlignmentObjective(C.parse_loss(cfg.loss), encoder.width, dim, 6, dim)
    model = Aligner(encoder, objective).to(dev)
    data = type(cfg.data)(**{**vars(cfg.data), "workers": 0, "batch_size": 2})
    batch = next(iterate(eval_loader(shard_urls(cfg.data.shards, "unlabeled"), data, 0, 1)))
    n = len(batch["name"])
    with FlopCounterMode(display=False) as teacher_count:
        target = batch_targets(batch, teacher, stats, objective.needs, cfg.target_space, dev)
    with FlopCounterMode(display=False) as step_count:
        loss, _ = model(batch["frames"].to(dev), target)
        loss.backward()
    t = teacher_count.get_total_flops()
    return (step_count.get_total_flops() + t) / n, t / n


def align_run(env: dict, size: dict, nproc: int, workers: int, out) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "mer_dist", "align", "--shards", str(env["shards"]), "--teacher", str(env["teacher"]), "--out", str(out),
           "--steps", str(size["steps"]), "tracking.enabled=false", "train.eval_samples=0", "train.log_every=5",
           "train.ckpt_every=100000", "train.zero_stage=2", "train.precision=auto", f"model.backbone={size['backbone']}",
           f"data.frames={size['frames']}", f"data.height={size['size']}", f"data.width={size['size']}",
           f"data.batch_size={size['batch']}", f"data.workers={workers}"]
    t0 = time.perf_counter()
    run(cmd)
    rows = [json.loads(x) for x in open(out / "metrics.jsonl") if '"samples_per_s"' in x][1:]   # after warm-up
    return {"samples_per_s": sum(r["samples_per_s"] for r in rows) / len(rows),
            "data_wait_frac": sum(r["data_wait_frac"] for r in rows) / len(rows), "wall_s": time.perf_counter() - t0}


def measure(quick: bool, peak: float = 0.0) -> dict:
    import torch
    size = QUICK if quick else FULL
    gpu = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if gpu else "CPU"
    nproc = torch.cuda.device_count() if gpu else 1
    workers = max(1, min(8, (os.cpu_count() or 2) // nproc - 1))
    env = setup(quick, size=size["size"], unlabeled=size["clips"])
    flops, teacher_flops = flops_per_sample(env, size, "cuda" if gpu else "cpu")
    r = align_run(env, size, nproc, workers, fresh(env["base"], "gpu"))
    peak = peak or (peak_tflops(name) if gpu else 0.0)
    achieved = flops * r["samples_per_s"]
    mfu = achieved / (peak * 1e12 * nproc) if peak else None
    out = {"device": name, "ranks": nproc, "loader_workers": workers, "samples_per_s": r["samples_per_s"],
           "data_wait_frac": r["data_wait_frac"], "gflops_per_sample": flops / 1e9,
           "teacher_gflops_per_sample": teacher_flops / 1e9, "achieved_tflops": achieved / 1e12,
           "peak_tflops_per_device": peak, "mfu": mfu}
    report(f"#8 align at {size['backbone']}, F={size['frames']}, {size['size']}x{size['size']}, batch {size['batch']} "
           f"per rank, ZeRO-2, precision auto, on {nproc} x {name}", [
               ("samples/s (all ranks)", f"{r['samples_per_s']:.1f}"),
               ("data-wait fraction of step time", f"{r['data_wait_frac']:.3f}"),
               ("GFLOPs per sample (teacher forward of it)", f"{flops / 1e9:.1f} ({teacher_flops / 1e9:.1f})"),
               ("achieved TFLOP/s", f"{achieved / 1e12:.2f}"),
               ("MFU (target >= 35%)", f"{mfu:.1%}" if mfu is not None else "n/a (no bf16 peak known for this device)")])
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny:vit at 64x64 (the tests run this on CPU)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak per device (default: the table)")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    figures = measure(a.quick, a.peak_tflops)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(figures, f, indent=1)
