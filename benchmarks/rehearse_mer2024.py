"""The MER2024 job at real architecture size, rehearsed end to end on this machine (CPU, 2 ranks).

`python benchmarks/rehearse_mer2024.py --out DIR` runs what a user submits, through the `mer-dist` CLI and the
`configs/mer2024/*.yaml` files, on a small synthetic corpus (224x224, 25 fps): init-models (random-weight
HuBERT-large, CLIP ViT-L/14, Chinese RoBERTa-large) -> shard -> probe all 24 layers -> adapt-audio (LoRA on the
probe's best layers, and the bottleneck variant) -> extract-targets (offline targets, the alternative the capacity
plan weighs) -> align (online targets, as the config) under ZeRO-3 on 2 ranks with
gradient checkpointing and freeze_blocks as the config sets them, stopped and resumed once -> finetune with
visual_train=top_k -> evaluate. Only counts are shrunk by overrides (clips, steps, epochs, frames, batch);
widths and depths are the recipe's. Writes DIR/rehearsal.json (each stage's command, seconds, exit code) and
prints a table. Accuracy here means nothing: the weights are random.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MER = [sys.executable, "-m", "mer_dist"]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rehearsal:
    def __init__(self, out: Path):
        self.out, self.stages = out, []

    def stage(self, name: str, cmd: list[str], expect: str = "") -> str:
        """Run one stage as a user would; its output streams to DIR/logs/<name>.log, progress to the terminal."""
        cmd = [str(c) for c in cmd]
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(map(str, cmd[2:]))}", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}).returncode
        dt = time.perf_counter() - t0
        text = log.read_text(errors="replace")
        self.stages.append({"stage": name, "seconds": round(dt, 1), "rc": rc, "cmd": " ".join(map(str, cmd))})
        print(f"[{time.strftime('%H:%M:%S')}] {name}: rc {rc} in {dt:.0f} s", flush=True)
        if rc != 0 or (expect and expect not in text):
            tail = "\n".join(text.splitlines()[-30:])
            raise SystemExit(f"rehearsal: stage {name} failed (rc {rc}{', no ' + repr(expect) if expect else ''}); "
                             f"last lines of {log}:\n{tail}")
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/mer-dist-rehearsal")
    ap.add_argument("--quick", action="store_true", help="fewer clips, 2 frames, 1+1 align steps")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    q = a.quick
    frames = 2 if q else 4
    r = Rehearsal(out)
    models, shards, shards_t = out / "models", out / "shards", out / "shards-teacher"
    hubert, clip, roberta = models / "chinese-hubert-large", models / "clip-vit-large-patch14", \
        models / "chinese-roberta-wwm-ext-large"
    cfg = lambda name: ["--config", str(REPO / "configs" / "mer2024" / f"{name}.yaml")]  # noqa: E731
    t0 = time.perf_counter()

    r.stage("init-models", MER + ["init-models", "--preset", "mer2024", "--out", models])
    if not (out / "corpus" / "label-disdim.csv").is_file():
        r.stage("synth", MER + ["synth", "--out", out / "corpus", "--num-labeled", 18 if q else 30, "--num-unlabeled",
                                8 if q else 16, "--num-test", 6 if q else 10, "seconds=3", "seconds_jitter=1", "fps=25",
                                "height=224", "width=224"])
    if not (shards / "manifest.json").is_file():
        r.stage("shard", MER + ["shard", "--corpus", out / "corpus", "--out", shards])
    r.stage("probe-layers", MER + ["probe-layers", *cfg("probe"), f"model={hubert}", f"data.shards={shards}",
                                   f"out={out / 'probe'}", "data.batch_size=4", "data.workers=1"],
            expect="layers.json")
    adapt = [*cfg("adapt"), f"model={hubert}", f"data.shards={shards}", f"probe={out / 'probe'}", "layers=[]",
             "epochs=1", "batch_size=4", "data.workers=1"]
    r.stage("adapt-audio-lora", MER + ["adapt-audio", *adapt, f"out={out / 'teacher'}"])
    r.stage("adapt-audio-bottleneck", MER + ["adapt-audio", *adapt, "method=bottleneck",
                                             f"out={out / 'teacher-bottleneck'}"])
    r.stage("extract-targets", MER + ["extract-targets", "--shards", shards, "--teacher", out / "teacher",
                                      "--out", shards_t, "batch_size=2", "data.max_seconds=10"])
    align = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
             "-m", "mer_dist", "align", *cfg("align"), f"data.shards={shards}", f"teacher={out / 'teacher'}",
             f"out={out / 'align'}", f"model.backbone={clip}", "train.zero_stage=3", f"data.frames={frames}",
             "data.batch_size=1", "data.workers=1", "data.shuffle_buffer=4", "train.warmup_steps=1",
             "train.ckpt_every=1", "train.log_every=1", "train.eval_every=1", "train.eval_samples=2", "train.epochs=0"]
    first, total = (1, 2) if q else (2, 4)
    r.stage("align", align + [f"train.steps={first}"], expect=f"align: done at step {first}")
    r.stage("align-resume", align[:4] + [f"--master_port={_free_port()}"] + align[5:] + [f"train.steps={total}"],
            expect=f"align: resumed from checkpoint step{first:08d} at step {first}")
    r.stage("finetune-top_k", MER + ["finetune", *cfg("finetune"), f"data.shards={shards}",
                                     f"teacher={out / 'teacher'}", f"visual={out / 'align' / 'encoder.pt'}",
                                     f"text_model={roberta}", f"out={out / 'model'}", "visual_train=top_k",
                                     "visual_top_k=1", "folds=2", "epochs=2", f"data.frames={frames}",
                                     "data.batch_size=4", "data.workers=1", "batch_size=8"])
    r.stage("evaluate", MER + ["evaluate", "--model", out / "model", "--split", "test", "--out", out / "eval"],
            expect="WAF")
    summary = json.loads((out / "align" / "summary.json").read_text())
    result = {"stages": r.stages, "total_seconds": round(time.perf_counter() - t0, 1), "align_summary": summary}
    (out / "rehearsal.json").write_text(json.dumps(result, indent=1))
    print("\n| stage | seconds | rc |\n|---|---|---|")
    for s in r.stages:
        print(f"| {s['stage']} | {s['seconds']:.0f} | {s['rc']} |")
    print(f"\nrehearsal: every stage ran at real architecture size in {result['total_seconds']:.0f} s -> "
          f"{out / 'rehearsal.json'}")


if __name__ == "__main__":
    main()
