"""#10-#14: the MER2024 architectures measured at real size on this CPU machine, and the capacity plan built on them.

    python benchmarks/bench_realsize.py --rehearsal DIR --json realsize.json

DIR is a finished `rehearse_mer2024.py` output (its random-weight HuBERT-large / CLIP ViT-L/14 directories, shards,
offline-target shards and LoRA teacher are reused). Parts, each a measurement of this run:
  params    parameters of teacher and encoder: total, trainable after freeze_blocks, LoRA / bottleneck
  flops     FLOPs per clip of the align step at F=16, 224x224 (teacher forward; encoder forward + backward, with and
            without the gradient-checkpointing recompute), counted by torch's FlopCounterMode on the meta device
  activ     what gradient checkpointing saves: peak resident memory of one forward + backward (F=16, batch 1) with
            and without it, each in a fresh process, and the bytes autograd keeps for backward
  zero      per-rank bytes of parameters + gradients + optimizer state under ZeRO-1/2/3 on 2 ranks (from the
            engines: `mer-dist align` summary.json) and each rank's peak RSS
  scaling   samples/s of `mer-dist align` with 2 ranks vs 1 at real size (ZeRO-2, one thread per rank), and the same
            at tiny size with the per-step times that explain where the second rank waits
  decode    decode cost per clip at 224x224, F=16, 2-10 s clips at 25 fps vs `ffmpeg -threads 1` (bench_decode #1b)
`--plan` prints the capacity plan (BENCHMARKS.md) from a JSON this script wrote.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, fresh, report, run, setup

from mer_dist.dist import free_port

ALIGN_YAML = REPO / "configs" / "mer2024" / "align.yaml"
RECIPE_LAYERS = [16, 17, 18, 19, 20, 21]      # configs/mer2024/adapt.yaml


def _align_cfg(overrides: dict):
    from mer_dist import config as C
    return C.load(C.AlignConfig, ALIGN_YAML, overrides)


def params(reh: Path) -> dict:
    from mer_dist import config as C
    from mer_dist.models.teacher import add_bottlenecks, add_lora, build_hubert
    from mer_dist.models.visual import VisualEncoder
    adapt = C.load(C.AdaptConfig, REPO / "configs" / "mer2024" / "adapt.yaml")
    hubert = build_hubert(str(reh / "models" / "chinese-hubert-large"))
    total = sum(p.numel() for p in hubert.parameters())
    lora = add_lora(hubert, RECIPE_LAYERS, adapt.rank, adapt.alpha, adapt.dropout, adapt.target_modules)
    lora_n = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    del lora, hubert
    bott = add_bottlenecks(build_hubert(str(reh / "models" / "chinese-hubert-large")), RECIPE_LAYERS, adapt.bottleneck_dim)
    bott_n = sum(p.numel() for p in bott.parameters() if p.requires_grad)
    del bott
    cfg = _align_cfg({"model.backbone": str(reh / "models" / "clip-vit-large-patch14")})
    enc = VisualEncoder(cfg.model, cfg.data.height)
    res = {"teacher_params": total, "teacher_lora_params": lora_n, "teacher_bottleneck_params": bott_n,
           "encoder_params": sum(p.numel() for p in enc.parameters()),
           "encoder_backbone_params": sum(p.numel() for p in enc.backbone.parameters()),
           "encoder_trainable_params": sum(p.numel() for p in enc.parameters() if p.requires_grad),
           "freeze_blocks": cfg.model.freeze_blocks}
    del enc
    report("#10 parameters at real size", [
        ("teacher: chinese-hubert-large architecture", f"{total / 1e6:.1f}M"),
        (f"  LoRA r={adapt.rank} on layers {RECIPE_LAYERS[0]}-{RECIPE_LAYERS[-1]} (q,k,v,out)", f"{lora_n / 1e6:.2f}M"),
        (f"  bottleneck {adapt.bottleneck_dim} on the same layers", f"{bott_n / 1e6:.2f}M"),
        ("encoder: CLIP ViT-L/14 vision tower + temporal head", f"{res['encoder_params'] / 1e6:.1f}M"),
        (f"  trainable with freeze_blocks={cfg.model.freeze_blocks}", f"{res['encoder_trainable_params'] / 1e6:.1f}M")])
    return res


def flops(reh: Path, seconds: float = 5.0, frames: int = 16) -> dict:
    """FLOPs of one clip: the encoder's counted on the meta device (no memory, no time: shapes are all that
    matter), the teacher's on the CPU (HuBERT reads a length with .item(), which a meta tensor cannot give)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mer_dist.models.teacher import build_hubert, hidden_states
    from mer_dist.models.visual import VisualEncoder
    # the recipe's teacher reads layers 16-21, so it runs 22 of HuBERT-large's 24 layers (Teacher.load drops the
    # layers above the last one read; the rehearsal's own teacher adapted whatever a random-weight probe chose)
    hubert = build_hubert(str(reh / "models" / "chinese-hubert-large"))
    hubert.encoder.layers = hubert.encoder.layers[:max(RECIPE_LAYERS) + 1]
    audio = torch.randn(1, int(seconds * 16000))
    with FlopCounterMode(display=False) as t_count, torch.no_grad():
        hidden_states(hubert, audio, torch.tensor([audio.shape[1]]))
    res = {"clip_seconds": seconds, "frames": frames, "teacher_layers_run": len(hubert.encoder.layers),
           "teacher_gflops": t_count.get_total_flops() / 1e9}
    del hubert
    for gc in (False, True):
        cfg = _align_cfg({"model.backbone": str(reh / "models" / "clip-vit-large-patch14"),
                          "model.gradient_checkpointing": gc})
        enc = VisualEncoder(cfg.model, cfg.data.height).to("meta").train()
        x = torch.zeros(1, frames, 3, cfg.data.height, cfg.data.width, dtype=torch.uint8, device="meta")
        with FlopCounterMode(display=False) as fwd:
            y = enc(x)
        with FlopCounterMode(display=False) as bwd:
            y.float().pow(2).mean().backward()
        key = "gc" if gc else "nogc"
        res[f"encoder_fwd_gflops_{key}"] = fwd.get_total_flops() / 1e9
        res[f"encoder_bwd_gflops_{key}"] = bwd.get_total_flops() / 1e9
        del enc, y
    res["step_gflops_offline"] = res["encoder_fwd_gflops_nogc"] + res["encoder_bwd_gflops_nogc"]
    res["step_gflops_online"] = res["step_gflops_offline"] + res["teacher_gflops"]
    res["executed_gflops_offline_gc"] = res["encoder_fwd_gflops_gc"] + res["encoder_bwd_gflops_gc"]
    report(f"#11 FLOPs per clip (F={frames} at 224x224, {seconds:.0f} s of audio; FlopCounterMode, meta device)", [
        (f"teacher forward ({res['teacher_layers_run']} of 24 layers run)", f"{res['teacher_gflops']:.0f} GFLOP"),
        ("encoder forward", f"{res['encoder_fwd_gflops_nogc']:.0f} GFLOP"),
        ("encoder backward (top blocks + head only)", f"{res['encoder_bwd_gflops_nogc']:.0f} GFLOP"),
        ("align step, offline targets (model FLOPs)", f"{res['step_gflops_offline']:.0f} GFLOP"),
        ("align step, online targets", f"{res['step_gflops_online']:.0f} GFLOP"),
        ("executed with gradient checkpointing (recompute)", f"{res['executed_gflops_offline_gc']:.0f} GFLOP")])
    return res


_ACTIV = r"""
import json, sys, threading, time, psutil, torch
from mer_dist import config as C
from mer_dist.models.visual import VisualEncoder
torch.set_num_threads(2)
cfg = C.load(C.AlignConfig, sys.argv[1], {"model.backbone": sys.argv[2], "model.gradient_checkpointing": sys.argv[3]})
enc = VisualEncoder(cfg.model, cfg.data.height).train()
x = torch.randint(0, 255, (1, int(sys.argv[4]), 3, 224, 224), dtype=torch.uint8)
proc, peak, done, saved = psutil.Process(), [0], [False], [0]
def watch():
    while not done[0]:
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.005)
def pack(t):
    saved[0] += t.numel() * t.element_size(); return t
base = proc.memory_info().rss
th = threading.Thread(target=watch, daemon=True); th.start()
t0 = time.perf_counter()
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    y = enc(x)
y.pow(2).mean().backward()
dt = time.perf_counter() - t0
done[0] = True; th.join()
print(json.dumps({"peak_over_base": peak[0] - base, "saved_bytes": saved[0], "seconds": dt}))
"""


def activations(reh: Path, frames: int = 16) -> dict:
    res = {}
    for gc in ("false", "true"):
        p = run([sys.executable, "-c", _ACTIV, str(ALIGN_YAML), str(reh / "models" / "clip-vit-large-patch14"), gc,
                 str(frames)])
        r = json.loads(p.stdout.strip().splitlines()[-1])
        key = "gc" if gc == "true" else "nogc"
        res |= {f"activ_peak_bytes_{key}": r["peak_over_base"], f"activ_saved_bytes_{key}": r["saved_bytes"],
                f"activ_step_seconds_{key}": r["seconds"]}
    res["gc_peak_saving"] = 1 - res["activ_peak_bytes_gc"] / res["activ_peak_bytes_nogc"]
    report(f"#12 gradient checkpointing: one forward + backward, F={frames} at 224x224, batch 1 (fresh process each)", [
        ("peak RSS over the built model, without / with", f"{res['activ_peak_bytes_nogc'] / 2**30:.2f} / "
                                                          f"{res['activ_peak_bytes_gc'] / 2**30:.2f} GiB "
                                                          f"(saves {100 * res['gc_peak_saving']:.0f}%)"),
        ("bytes autograd keeps for backward, without / with", f"{res['activ_saved_bytes_nogc'] / 2**30:.2f} / "
                                                              f"{res['activ_saved_bytes_gc'] / 2**30:.2f} GiB"),
        ("step time without / with (2 threads)", f"{res['activ_step_seconds_nogc']:.0f} / "
                                                 f"{res['activ_step_seconds_gc']:.0f} s")])
    return res


def _align(reh: Path, out: Path, nproc: int, zero: int, steps: int, frames: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "mer_dist", "align", "--config", str(ALIGN_YAML), f"data.shards={reh / 'shards-teacher'}",
           f"teacher={reh / 'teacher'}", f"out={out}", f"model.backbone={reh / 'models' / 'clip-vit-large-patch14'}",
           f"train.zero_stage={zero}", f"train.steps={steps}", "train.epochs=0", "targets=offline",
           f"data.frames={frames}", "data.batch_size=1",
           "data.workers=1", "data.shuffle_buffer=4", "train.warmup_steps=1", "train.log_every=1",
           "train.ckpt_every=100000", "train.eval_samples=0", "train.threads=1", "tracking.enabled=false",
           "guard.enabled=false"]        # what is measured here is the training step
    run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    s = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in open(out / "metrics.jsonl") if '"samples_per_s"' in x]
    s["step_samples_per_s"] = [r["samples_per_s"] for r in rows]
    return s


def zero(reh: Path, frames: int = 2, steps: int = 4) -> dict:
    base = fresh(reh / "bench", "zero")
    res, rows = {}, []
    for z in (1, 2, 3):
        s = _align(reh, base / f"z{z}", 2, z, steps, frames)
        res[f"zero{z}_state_bytes_rank0"] = s["state_bytes_rank0"]
        res[f"zero{z}_peak_rss_per_rank"] = s["peak_rss_bytes_per_rank"]
        res[f"zero{z}_steps_samples_per_s"] = s["step_samples_per_s"]
        rows.append((f"ZeRO-{z}, 2 ranks: state bytes rank 0 | peak RSS per rank",
                     f"{s['state_bytes_rank0'] / 2**30:.2f} GiB | "
                     + " / ".join(f"{b / 2**30:.1f}" for b in s["peak_rss_bytes_per_rank"]) + " GiB"))
    report(f"#13 ZeRO at real size (CLIP ViT-L/14 encoder, fp32, F={frames}, batch 1 per rank, gradient "
           "checkpointing, freeze_blocks 12)", rows)
    return res


def scaling(reh: Path, two_rank_rates: list[float], frames: int = 2, steps: int = 4) -> dict:
    """Real size: 1 rank vs the ZeRO-2 2-rank run of `zero` (same settings). Tiny size: the same pair with a row per
    step, to see where the second rank waits."""
    one = _align(reh, fresh(reh / "bench", "scale1") / "r1", 1, 2, steps, frames)
    r1, r2 = statistics.mean(one["step_samples_per_s"][1:]), statistics.mean(two_rank_rates[1:])
    res = {"real_1rank_samples_per_s": r1, "real_2rank_samples_per_s": r2, "real_scaling_2_vs_1": r2 / r1}
    env = setup(False)
    tiny = fresh(env["base"], "scaling-steps")
    per = {}
    for n in (1, 2):
        out = tiny / f"r{n}"
        run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={free_port()}",
             "-m", "mer_dist", "align", "--shards", str(env["shards"]), "--teacher", str(env["teacher"]), "--out", str(out),
             "--steps", "120", "tracking.enabled=false", "guard.enabled=false", "train.eval_samples=0", "train.log_every=1", "train.threads=1",
             "data.workers=0", "train.zero_stage=2", "train.ckpt_every=100000"], env={**os.environ, "OMP_NUM_THREADS": "1"})
        rates = [json.loads(x)["samples_per_s"] for x in open(out / "metrics.jsonl") if '"samples_per_s"' in x][10:]
        per[n] = [8 * n / r for r in rates]                     # seconds per step (batch 8 per rank)
    t1, t2 = statistics.mean(per[1]), statistics.mean(per[2])
    # if each of two ranks took a step time drawn like the 1-rank run's, a step would last the slower of the two
    pairs = [max(a, b) for a, b in zip(per[1], per[1][1:] + per[1][:1])]
    res |= {"tiny_step_ms_1rank": 1e3 * t1, "tiny_step_ms_2rank": 1e3 * t2, "tiny_scaling_2_vs_1": 2 * t1 / t2,
            "tiny_step_ms_1rank_sd": 1e3 * statistics.stdev(per[1]),
            "tiny_predicted_scaling_slower_of_two": 2 * t1 / statistics.mean(pairs)}
    report("#14 scaling, 2 ranks vs 1 (one thread per rank, ZeRO-2)", [
        ("real size (CLIP ViT-L/14, F=2 at 224x224, batch 1 per rank)", f"{r1:.3f} vs {r2:.3f} samples/s = "
                                                                       f"{res['real_scaling_2_vs_1']:.2f}x (target >= 1.8)"),
        ("tiny size, mean step time 1 rank / 2 ranks", f"{1e3 * t1:.0f} ms (sd {res['tiny_step_ms_1rank_sd']:.0f}) / "
                                                       f"{1e3 * t2:.0f} ms = {res['tiny_scaling_2_vs_1']:.2f}x"),
        ("tiny, predicted if a step lasts the slower rank's", f"{res['tiny_predicted_scaling_slower_of_two']:.2f}x")])
    return res


def decode() -> dict:
    import bench_decode
    real = sorted((bench_decode.realistic_corpus(False) / "video-labeled").glob("*.mp4"))
    ours, ff, ratios = bench_decode._compare(real, 16, 224, 5)
    lengths = [float(json.loads(subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of",
                                                "json", str(c)], capture_output=True, text=True).stdout)
                     ["format"]["duration"]) for c in real]
    res = {"decode224_ms_per_clip": 1e3 / ours, "decode224_clips_per_core_s": ours, "ffmpeg224_clips_per_s": ff,
           "decode224_vs_ffmpeg": statistics.median(ratios), "decode224_rounds": ratios,
           "decode224_mean_clip_seconds": statistics.mean(lengths)}
    report("#1b decode at real size (1 core)", [
        ("clips", f"{len(real)}, {min(lengths):.1f}-{max(lengths):.1f} s (mean {res['decode224_mean_clip_seconds']:.1f}), "
                  f"224x224 @ 25 fps, H.264 + AAC"),
        ("mer_dist decode, F=16 + audio", f"{1e3 / ours:.1f} ms/clip = {ours:.1f} clips/s per core"),
        ("ratio to ffmpeg -threads 1, median of 5 rounds", f"{res['decode224_vs_ffmpeg']:.2f}x "
                                                           f"({', '.join(f'{r:.2f}' for r in ratios)})")])
    return res


# ----------------------------------------------------------------------------- the capacity plan
GPUS = {"H100 SXM": 989.0, "H200 SXM": 989.0, "A100 SXM": 312.0}   # dense bf16 TFLOP/s (data sheets)
CORPORA = {"MER2024": 115_595, "MER2025": 124_802}                    # unlabeled clips
NODE_CORES = 112                                                      # a typical 8-GPU node (2 x 56-core CPUs)


def plan(f: dict, mfu: float = 0.35, micro_batch: int = 16) -> str:
    """The capacity plan as markdown, from the measured figures (FLOPs per clip, decode per core, parameters,
    activation bytes); the ZeRO law is checked against the engines' own bytes first."""
    step = f["executed_gflops_offline_gc"] * 1e9          # executed FLOPs of one clip, recompute included
    psi, psi_t = f["encoder_params"], f["encoder_trainable_params"]
    out = ["**ZeRO law vs the engines** (2 ranks, fp32 on CPU: params 4 B, grads 4 B, fp32 partition 4 B + Adam 8 B "
           "per trainable parameter):", "", "| stage | law, rank 0 | measured, rank 0 |", "|---|---|---|"]
    law_cpu = {1: 4 * psi + 4 * psi_t + 12 * psi_t / 2, 2: 4 * psi + 16 * psi_t / 2, 3: (4 * psi + 16 * psi_t) / 2}
    for z, b in law_cpu.items():
        out.append(f"| ZeRO-{z} | {b / 2**30:.2f} GiB | {f[f'zero{z}_state_bytes_rank0'] / 2**30:.2f} GiB |")
    out += ["", f"**Throughput and decode** at {100 * mfu:.0f}% MFU, offline targets, {step / 1e12:.2f} TFLOP per clip "
            f"(F={f['frames']}, 224x224, gradient-checkpointing recompute included); decode at the measured "
            f"{f['decode224_clips_per_core_s']:.1f} clips/s per core (clips of {f['decode224_mean_clip_seconds']:.1f} s "
            f"on average; MER clips are of that order):", "",
            "| GPU (dense bf16) | clips/s per GPU | GPU-hours per epoch, MER2024 / MER2025 | decode cores per GPU | "
            f"decode share of a {NODE_CORES}-core 8-GPU node | 64 GPUs: one MER2025 epoch |", "|---|---|---|---|---|---|"]
    for name, peak in GPUS.items():
        rate = peak * 1e12 * mfu / step
        hours = [n / rate / 3600 for n in CORPORA.values()]
        cores = rate / f["decode224_clips_per_core_s"]
        out.append(f"| {name} ({peak:.0f} TFLOP/s) | {rate:.0f} | {hours[0]:.1f} / {hours[1]:.1f} | {cores:.1f} | "
                   f"{100 * 8 * cores / NODE_CORES:.0f}% | {CORPORA['MER2025'] / (64 * rate):.0f} s |")
    act = f["activ_saved_bytes_gc"] / 2 * micro_batch            # bf16 on a GPU: half the fp32 bytes measured here
    out += ["", f"**Memory per GPU** (bf16 params and grads, fp32 master + Adam; encoder {psi / 1e6:.0f}M parameters, "
            f"{psi_t / 1e6:.0f}M trainable; offline targets: no teacher on the GPU; activations with gradient "
            f"checkpointing at micro-batch {micro_batch}: {act / 2**30:.1f} GiB, from #12):", "",
            "| GPUs | ZeRO-2: states + activations | ZeRO-3: states + activations |", "|---|---|---|"]
    for n in (8, 64):
        z2 = 2 * psi + 14 * psi_t / n
        z3 = (2 * psi + 14 * psi_t) / n
        out.append(f"| {n} | {z2 / 2**30:.2f} + {act / 2**30:.1f} GiB | {z3 / 2**30:.2f} + {act / 2**30:.1f} GiB |")
    teacher = f["teacher_gflops"] * 1e9
    npy = 50 * 1024 * 2 * f["decode224_mean_clip_seconds"]
    out += ["", f"**Offline targets.** The teacher's forward is {f['teacher_gflops']:.0f} GFLOP per clip "
            f"({100 * teacher / (teacher + step):.0f}% of an online step). Extraction pays it once (inference only), "
            f"online targets every epoch, so offline breaks even within the first epoch and saves that share of every "
            f"later one. It costs storage and reads: float16 [T, 1024] at 50 Hz = {npy / 2**20:.2f} MiB per clip, "
            f"{CORPORA['MER2025'] * npy / 2**30:.0f} GiB for MER2025's pool."]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rehearsal", default="/tmp/mer-dist-rehearsal", help="a finished rehearse_mer2024.py output")
    ap.add_argument("--parts", default="params,flops,activ,zero,scaling,decode")
    ap.add_argument("--json", default="", help="write (and merge into) this JSON")
    ap.add_argument("--plan", action="store_true", help="print the capacity plan from --json and stop")
    a = ap.parse_args()
    path = Path(a.json) if a.json else None
    figures = json.loads(path.read_text()) if path and path.is_file() else {}
    if a.plan:
        print(plan(figures))
        return
    reh = Path(a.rehearsal)
    if not (reh / "rehearsal.json").is_file():
        raise SystemExit(f"{reh}: run benchmarks/rehearse_mer2024.py --out {reh} first")
    parts = a.parts.split(",")
    t0 = time.perf_counter()
    for part in parts:
        if part == "scaling":
            figures |= scaling(reh, figures["zero2_steps_samples_per_s"])
        elif part == "decode":
            figures |= decode()
        else:
            figures |= {"params": params, "flops": flops, "activ": activations, "zero": zero}[part](reh)
        if path:
            path.write_text(json.dumps(figures, indent=1))
    print(f"\nreal-size benchmarks ({','.join(parts)}): {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
