"""#8 GPU: `mer-dist align` at ViT-B/16, F=16, 224x224 (bf16 on a GPU): samples/s, MFU and data-wait fraction.

The product path runs as a user runs it (torchrun, one rank per GPU, DeepSpeed ZeRO-2, `train.precision=auto`)
on a synthetic corpus encoded at 224x224; samples/s and `data_wait_frac` come from its metrics.jsonl (the steps
after the first log row). FLOPs per sample come from torch's FlopCounterMode over one forward + backward of the
same Aligner (the frozen teacher's forward included, since the step runs it), on the same device. MFU = achieved
FLOP/s over the card's dense bf16 peak: the table below by device name, or `--peak-tflops`.

`--quick` is tiny:vit, F=4 at 64x64 on whatever device there is (the tests run it on CPU, where no peak exists
and MFU is reported as not applicable). One command on a lent GPU machine:
    python benchmarks/bench_gpu.py --json gpu.json

`--recipe` measures what users submit instead: `configs/mer2024/align.yaml` as shipped (random-weight CLIP
ViT-L/14 and HuBERT-large from `init-models`' writer, online targets from a LoRA teacher on layers 16-21, F=16 at
224x224, micro-batch 16, gradient checkpointing on), then the same with checkpointing off. MFU counts model FLOPs
(no recompute); HFU counts what ran. `--steps/--batch/--frames/--clips` shrink it for a dry run on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from common import REPO, fresh, report, run, setup

from mer_dist.dist import free_port

# dense bf16 tensor-core peak per GPU in TFLOP/s (vendor data sheets; sparsity not counted), first match wins
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
               ("A10G", 125.0), ("L4", 121.0), ("V100", 125.0)]
FULL = {"backbone": "tiny:vit-b16", "frames": 16, "size": 224, "batch": 8, "steps": 60, "clips": 256}
QUICK = {"backbone": "tiny:vit", "frames": 4, "size": 64, "batch": 4, "steps": 6, "clips": 32}
RECIPE = {"frames": 16, "size": 224, "batch": 16, "steps": 40, "clips": 192}
ALIGN_YAML = REPO / "configs" / "mer2024" / "align.yaml"


def peak_tflops(name: str) -> float:
    """The table's peak for a device name (0 when unknown: pass --peak-tflops)."""
    return next((v for k, v in PEAK_TFLOPS if k.lower() in name.lower()), 0.0)


def flops_per_sample(env: dict, size: dict, device: str, yaml=None, gc: bool = False) -> tuple[float, float]:
    """(FLOPs of one training sample: teacher forward + encoder forward/backward, of which the teacher's), counted
    by FlopCounterMode on one real batch of the corpus (with `gc`, the checkpointing recompute included)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mer_dist import config as C
    from mer_dist.data.ingest import shard_urls
    from mer_dist.data.stream import eval_loader, iterate
    from mer_dist.models.teacher import TargetStats, Teacher
    from mer_dist.models.visual import VisualEncoder
    from mer_dist.train.align import Aligner, batch_targets
    from mer_dist.train.losses import AlignmentObjective
    cfg = C.load(C.AlignConfig, yaml, {"data.shards": str(env["shards"]), "teacher": str(env["teacher"]),
                                       "model.backbone": size["backbone"], "data.frames": size["frames"],
                                       "data.height": size["size"], "data.width": size["size"],
                                       "model.gradient_checkpointing": gc})
    dev = torch.device(device)
    teacher = Teacher.load(cfg.teacher).to(dev)
    stats = TargetStats.load(cfg.teacher).to(dev)
    encoder = VisualEncoder(cfg.model, cfg.data.height)
    dim = stats.mean.numel()
    objective = AlignmentObjective(C.parse_loss(cfg.loss), encoder.width, dim, 6, dim)
    model = Aligner(encoder, objective).to(dev).train()
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


def align_run(env: dict, size: dict, nproc: int, workers: int, out, extra: tuple = ()) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "mer_dist", "align", *extra, "--shards", str(env["shards"]), "--teacher", str(env["teacher"]),
           "--out", str(out), "--steps", str(size["steps"]), "train.epochs=0", "tracking.enabled=false", "guard.enabled=false",
           "train.eval_samples=0", "train.log_every=5", "train.ckpt_every=100000", "train.zero_stage=2",
           "train.precision=auto", f"model.backbone={size['backbone']}", f"data.frames={size['frames']}",
           f"data.height={size['size']}", f"data.width={size['size']}", f"data.batch_size={size['batch']}",
           f"data.workers={workers}"]
    t0 = time.perf_counter()
    run(cmd)
    logged = [json.loads(x) for x in open(out / "metrics.jsonl") if '"samples_per_s"' in x]
    rows = logged[1:] or logged        # after the warm-up window (a dry run of one window keeps it)
    return {"samples_per_s": sum(r["samples_per_s"] for r in rows) / len(rows),
            "data_wait_frac": sum(r["data_wait_frac"] for r in rows) / len(rows),
            "gpu_peak_gib": max(r.get("gpu_peak_gib", 0.0) for r in rows), "wall_s": time.perf_counter() - t0}


def recipe_setup(base, size: dict, workers: int) -> dict:
    """Random-weight HuBERT-large and CLIP ViT-L/14 (init-models' writer), a 224x224 25-fps corpus, its shards and
    the recipe's LoRA teacher (layers 16-21, one epoch: its accuracy is not the point), built once under `base`."""
    from mer_dist.models.presets import write
    models = base / "models"
    for name in ("chinese-hubert-large", "clip-vit-large-patch14"):
        if not (models / name / "config.json").is_file():
            write(name, models / name)
    mer = [sys.executable, "-m", "mer_dist"]
    if not (base / "shards" / "manifest.json").is_file():
        run(mer + ["synth", "--out", str(base / "corpus"), "--num-labeled", "30", "--num-unlabeled", str(size["clips"]),
                   "--num-test", "0", "seconds=4", "seconds_jitter=1", "fps=25", f"height={size['size']}",
                   f"width={size['size']}", f"workers={workers}"])
        run(mer + ["shard", "--corpus", str(base / "corpus"), "--out", str(base / "shards"), f"workers={workers}"])
    if not (base / "teacher" / "teacher.json").is_file():
        run(mer + ["adapt-audio", "--config", str(REPO / "configs" / "mer2024" / "adapt.yaml"),
                   f"model={models / 'chinese-hubert-large'}", f"data.shards={base / 'shards'}",
                   f"out={base / 'teacher'}", "epochs=1", "batch_size=8", "data.workers=2", "tracking.enabled=false"])
    return {"base": base, "shards": base / "shards", "teacher": base / "teacher",
            "backbone": str(models / "clip-vit-large-patch14")}


def measure_recipe(size: dict, peak: float = 0.0) -> dict:
    """`configs/mer2024/align.yaml` on this machine's GPUs: checkpointing on (as shipped), then off."""
    import torch
    from common import ROOT
    gpu = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if gpu else "CPU"
    nproc = torch.cuda.device_count() if gpu else 1
    workers = max(1, min(14, (os.cpu_count() or 2) // nproc - 2))
    env = recipe_setup(ROOT / f"recipe-{size['size']}px-{size['clips']}", size, max(1, (os.cpu_count() or 2) - 1))
    size = {**size, "backbone": env["backbone"]}
    dev = "cuda" if gpu else "cpu"
    model_flops, teacher_flops = flops_per_sample(env, size, dev, ALIGN_YAML, gc=False)
    ran_flops, _ = flops_per_sample(env, size, dev, ALIGN_YAML, gc=True)
    peak = peak or (peak_tflops(name) if gpu else 0.0)
    out = {"device": name, "ranks": nproc, "loader_workers": workers, "recipe": str(ALIGN_YAML.relative_to(REPO)),
           "frames": size["frames"], "micro_batch": size["batch"], "steps": size["steps"],
           "model_gflops_per_sample": model_flops / 1e9, "executed_gflops_per_sample_gc": ran_flops / 1e9,
           "teacher_gflops_per_sample": teacher_flops / 1e9, "peak_tflops_per_device": peak}
    rows = [("model GFLOPs per sample (teacher forward of it)", f"{model_flops / 1e9:.0f} ({teacher_flops / 1e9:.0f})"),
            ("executed GFLOPs per sample with checkpointing", f"{ran_flops / 1e9:.0f}")]
    for gc in (True, False):
        key = "gc" if gc else "nogc"
        r = align_run(env, size, nproc, workers, fresh(env["base"], f"align-{key}"),
                      ("--config", str(ALIGN_YAML), f"model.gradient_checkpointing={str(gc).lower()}"))
        mfu = model_flops * r["samples_per_s"] / (peak * 1e12 * nproc) if peak else None
        hfu = (ran_flops if gc else model_flops) * r["samples_per_s"] / (peak * 1e12 * nproc) if peak else None
        out |= {f"{key}_{k}": v for k, v in r.items()} | {f"{key}_mfu": mfu, f"{key}_hfu": hfu}
        rows += [(f"checkpointing {'on' if gc else 'off'}: samples/s (all ranks)", f"{r['samples_per_s']:.1f}"),
                 ("  data-wait fraction of step time", f"{r['data_wait_frac']:.3f}"),
                 ("  peak GPU memory, rank 0", f"{r['gpu_peak_gib']:.1f} GiB"),
                 ("  MFU / HFU", f"{mfu:.1%} / {hfu:.1%}" if mfu is not None else "n/a (no bf16 peak known)")]
    report(f"#8 recipe: {ALIGN_YAML.relative_to(REPO)} (CLIP ViT-L/14, F={size['frames']} at {size['size']}x"
           f"{size['size']}, micro-batch {size['batch']}, ZeRO-2, online HuBERT-large targets) on {nproc} x {name}",
           rows)
    return out


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
    ap.add_argument("--recipe", action="store_true", help="configs/mer2024/align.yaml at real size (see above)")
    for k in RECIPE:
        ap.add_argument(f"--{k}", type=int, default=RECIPE[k], help=f"--recipe: {k} (default {RECIPE[k]})")
    a = ap.parse_args()
    figures = (measure_recipe({k: getattr(a, k) for k in RECIPE}, a.peak_tflops) if a.recipe
               else measure(a.quick, a.peak_tflops))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(figures, f, indent=1)
