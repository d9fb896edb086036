"""Real multi-process DeepSpeed alignment runs on CPU (gloo): torchrun, deepspeed launcher, accelerate."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, free_port

ARGS = ["data.height=32", "data.width=32", "data.frames=4", "data.batch_size=4", "data.workers=1",
        "train.log_every=2", "train.eval_every=10", "train.eval_samples=8", "train.warmup_steps=4",
        "guard.enabled=false"]    # the guard (on by default) has its own tests (test_method.py, test_demo.py)


def align(launcher, shards, teacher, out, steps, extra=(), env=None, wait=True, timeout=400):
    port = str(free_port())
    head = {"single": [sys.executable, "-m", "mer_dist"],
            "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m", "mer_dist"],
            "deepspeed": ["deepspeed", "--num_gpus", "2", "--master_port", port, "--module", "mer_dist"],
            "accelerate": ["accelerate", "launch", "--config_file", "launch/accelerate_zero2.yaml", "--main_process_port", port, "-m", "mer_dist"],
            "accelerate3": ["accelerate", "launch", "--config_file", "launch/accelerate_zero3.yaml", "--main_process_port", port, "-m", "mer_dist"]}[launcher]
    cmd = head + ["align", "--shards", str(shards), "--teacher", str(teacher), "--out", str(out), "--steps", str(steps), *ARGS, *extra]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, **(env or {})}, start_new_session=True)
    if not wait:
        return p
    log, _ = p.communicate(timeout=timeout)
    return p.returncode, log


def metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.mark.slow
def test_torchrun_zero2_mlflow_loss_falls_and_export(shards, teacher, tmp_path, mlflow_server):
    out = tmp_path / "run"
    rc, log = align("torchrun", shards, teacher, out, 40, ["train.zero_stage=2", "train.lr=3e-3", "loss=mse"],
                    env={"MLFLOW_TRACKING_URI": mlflow_server["uri"]})
    assert rc == 0, log[-4000:]
    m = [r for r in metrics(out) if "loss" in r]
    first, last = sum(r["loss"] for r in m[:2]) / 2, sum(r["loss"] for r in m[-2:]) / 2
    assert last < 0.8 * first, (first, last)
    ev = [r for r in metrics(out) if "eval_loss" in r]
    assert ev[-1]["eval_loss"] < ev[0]["eval_loss"]
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["launcher"] == "torchrun" and s["step"] == 40
    # each rank's peak RSS: a real process's (hundreds of MiB with torch + DeepSpeed), one entry per rank
    assert len(s["peak_rss_bytes_per_rank"]) == 2 and all(100 * 2**20 < b < 16 * 2**30 for b in s["peak_rss_bytes_per_rank"])
    # MLflow: rank 0 logged params, per-step metrics and tags to the real server
    from mlflow.tracking import MlflowClient
    c = MlflowClient(mlflow_server["uri"])
    run = c.get_run(s["mlflow_run_id"])        # this run's own (the server is shared by the session's tests)
    assert run.data.tags["stage"] == "align"
    assert run.data.params["train.steps"] == "40" and run.data.tags["world_size"] == "2"
    assert run.data.tags["launcher"] == "torchrun"
    assert len(c.get_metric_history(run.info.run_id, "loss")) == 20
    assert {"cos", "loss_mse", "lr", "samples_per_s", "data_wait_frac", "eval_loss"} <= set(run.data.metrics)
    # exported encoder == consolidated DeepSpeed checkpoint, loaded in a fresh process without DeepSpeed engines
    # (the final step's: encoder-last.pt where the guard kept another step as encoder.pt)
    last = out / "encoder-last.pt" if (out / "encoder-last.pt").is_file() else out / "encoder.pt"
    code = f"""
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from mer_dist.models.visual import load_encoder
m = load_encoder(r'{last}')
sd = get_fp32_state_dict_from_zero_checkpoint(r'{out / "checkpoints"}')
ref = load_encoder(r'{out / "encoder.pt"}')
ref.load_state_dict({{k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}})
x = torch.randint(0, 255, (2, 4, 3, 32, 32), dtype=torch.uint8)
d = (m(x) - ref(x)).abs().max().item()
print('MAXDIFF', d)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert "MAXDIFF" in p.stdout, p.stderr[-3000:]
    assert float(p.stdout.split("MAXDIFF")[1]) < 1e-5


@pytest.mark.slow
def test_zero3_sigterm_resume(shards, teacher, tmp_path):
    out = tmp_path / "run"
    p = align("torchrun", shards, teacher, out, 60, ["train.zero_stage=3", "train.ckpt_every=500"], wait=False)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and any(r.get("step", 0) >= 6 for r in metrics(out)):
            break
        time.sleep(0.1)
    os.kill(p.pid, signal.SIGTERM)          # torchrun forwards SIGTERM to its workers
    log, _ = p.communicate(timeout=120)
    s1 = json.loads((out / "summary.json").read_text())
    assert s1["exit_code"] == 75 and 6 <= s1["step"] < 60, log[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == f"step{s1['step']:08d}"
    rc, log2 = align("torchrun", shards, teacher, out, 60, ["train.zero_stage=3", "train.ckpt_every=500"])
    assert rc == 0, log2[-3000:]
    assert f"resumed from checkpoint step{s1['step']:08d} at step {s1['step']}" in log2
    s2 = json.loads((out / "summary.json").read_text())
    assert s2["step"] == 60 and s2["samples_seen"] == 60 * 4 * 2
    # ZeRO-3 with 2 ranks: each rank holds half of the parameters
    assert abs(s2["param_elements_rank0"] / s2["param_elements_total"] - 0.5) < 0.05
    # the LR schedule continued where it stopped (not a fresh warmup): compare with DeepSpeed's own schedule
    from deepspeed.runtime.lr_schedules import WarmupCosineLR
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = WarmupCosineLR(opt, total_num_steps=60, warmup_num_steps=4, warmup_type="linear", cos_min_ratio=0.05)
    expected = {}
    for step in range(1, 61):
        opt.step()
        sched.step()
        expected[step] = sched.get_lr()[0]
    after = [r for r in metrics(out) if "lr" in r and r["step"] > s1["step"]]
    assert after and all(abs(r["lr"] - expected[r["step"]]) < 1e-9 for r in after), (after[:2], expected)


@pytest.mark.slow
@pytest.mark.parametrize("launcher,stage,space,loss", [("deepspeed", 2, "logits", "mse"),
                                                       ("accelerate", 2, "features", "kd,infonce:0.5"),
                                                       ("accelerate3", 3, "both", "cosine,kd,infonce,views:0.5")])
def test_other_launchers(launcher, stage, space, loss, shards, teacher, tmp_path):
    out = tmp_path / "run"
    # train.epochs sets the length (half a pass over the 64-clip pool at global batch 8 = 4 steps), not --steps
    # under accelerate the config asks for ZeRO-1: the launch file's stage must win (the stage actually run)
    asked = ["train.zero_stage=1"] if launcher.startswith("accelerate") else []
    rc, log = align(launcher, shards, teacher, out, 99, ["train.eval_samples=4", f"target_space={space}", f"loss={loss}",
                                                          "train.epochs=0.5", *asked])
    assert rc == 0, log[-4000:]
    assert "align: 4 steps x global batch 8 = 0.5 epochs of the 64-clip 'unlabeled' split" in log
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["launcher"] == launcher.rstrip("3") and s["step"] == 4
    assert s["zero_stage"] == stage        # accelerate's deepspeed_config_file chose the stage
    # every configured objective was trained and logged (train and held-out), under ZeRO-2 and ZeRO-3
    rows = metrics(out)
    for kind in (term.split(":")[0] for term in loss.split(",")):
        assert any(f"loss_{kind}" in r for r in rows) and any(f"eval_loss_{kind}" in r for r in rows), kind
    ck = torch.load(out / "encoder.pt", weights_only=True)     # plain tensors + config: no code in the file
    assert ck["loss"] == loss.split(",") and not any(k.startswith(("objective.", "proj.")) for k in ck["state_dict"])


@pytest.mark.slow
def test_mlflow_down_at_start_or_mid_run(shards, teacher, tmp_path):
    from conftest import start_mlflow, stop_mlflow
    base = [sys.executable, "-m", "mer_dist", "align", "--shards", str(shards), "--teacher", str(teacher),
            *ARGS, "train.eval_samples=0"]
    # down at start: a port nobody listens on
    dead = f"http://127.0.0.1:{free_port()}"
    p = subprocess.run(base + ["--out", str(tmp_path / "a"), "--steps", "10"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MLFLOW_TRACKING_URI": dead})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "MLflow unavailable" in p.stderr and str(tmp_path / "a" / "metrics.jsonl") in p.stderr
    assert [r["step"] for r in metrics(tmp_path / "a") if "loss" in r] == list(range(2, 11, 2))
    # goes away mid-run
    (tmp_path / "srv").mkdir()
    uri, server = start_mlflow(tmp_path / "srv")
    proc = subprocess.Popen(base + ["--out", str(tmp_path / "b"), "--steps", "60", "train.log_every=1"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    deadline = time.time() + 200
    while time.time() < deadline and not ((tmp_path / "b" / "metrics.jsonl").exists() and len(metrics(tmp_path / "b")) >= 4):
        time.sleep(0.2)
    stop_mlflow(server)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "metrics continue in" in err and "all metrics are in" in err
    assert [r["step"] for r in metrics(tmp_path / "b") if "loss" in r] == list(range(1, 61))


@pytest.mark.slow
def test_bf16_export_is_the_fp32_master_weights(shards, teacher, tmp_path):
    """Under bf16 the engine's module holds rounded copies; encoder.pt must hold the fp32 master weights."""
    out = tmp_path / "bf16"
    p = subprocess.run([sys.executable, "-m", "mer_dist", "align", "--shards", str(shards), "--teacher", str(teacher),
                        "--out", str(out), "--steps", "4", "train.precision=bf16", "tracking.enabled=false",
                        "train.eval_samples=0", *ARGS[:4], "data.workers=0"],
                       cwd=REPO, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    import yaml
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["precision"] == "bf16"
    last = out / "encoder-last.pt" if (out / "encoder-last.pt").is_file() else out / "encoder.pt"   # the final step
    sd = torch.load(last, weights_only=True)["state_dict"]
    trained = [v for k, v in sd.items() if v.dtype == torch.float32 and v.numel() > 16]
    # fp32 master weights are not all representable in bf16 (rounded module copies would be)
    assert any((v.bfloat16().float() != v).any() for v in trained)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    ref = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"))
    assert all(torch.equal(sd[k], ref["encoder." + k].float()) for k in sd)


@pytest.mark.slow
@pytest.mark.parametrize("stage,before,after", [(2, 2, 1), (3, 1, 2)])
def test_resume_on_another_number_of_ranks(shards, teacher, tmp_path, stage, before, after):
    from mer_dist.train.checkpoint import _to_universal
    out, S = tmp_path / "run", 24
    common = [f"train.zero_stage={stage}", "train.ckpt_every=500", "loss=mse", "train.lr=3e-3", "train.eval_every=500",
              "train.log_every=1"]
    run = lambda n, steps, batch: align("torchrun" if n == 2 else "single", shards, teacher, out, steps,  # noqa: E731
                                        [*common, f"data.batch_size={batch}"])
    # global batch 8: 2 ranks x 4 -> 1 rank x 4 x accumulation 2; global batch 4: 1 x 4 -> 2 ranks x 2
    rc, log = run(before, S, 4)
    assert rc == 0, log[-3000:]
    rc, log = run(after, S + 1, 4 if after == 1 else 2)
    assert rc == 0, log[-3000:]
    accum = 2 if after == 1 else 1
    assert f"at step {S}, written by {before} ranks, now {after} with gradient accumulation {accum}" in log
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, S + 2))
    s = json.loads((out / "summary.json").read_text())
    assert s["step"] == S + 1 and s["world_size"] == after and s["samples_seen"] == (S + 1) * 4 * before
    # the loss right after the resume is where it stopped, not back at the start
    ev = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert abs(ev[S + 1] - ev[S]) < 0.25 * abs(ev[1] - ev[S]), ev
    # the LR schedule went on (DeepSpeed's own schedule for the resumed run's length)
    from deepspeed.runtime.lr_schedules import WarmupCosineLR
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    sched = WarmupCosineLR(opt, total_num_steps=S + 1, warmup_num_steps=4, warmup_type="linear", cos_min_ratio=0.05)
    for _ in range(S + 1):
        opt.step()
        sched.step()
    assert abs(next(r["lr"] for r in rows if r.get("step") == S + 1 and "lr" in r) - sched.get_lr()[0]) < 1e-9
    # Adam's moments came along: one step later v = 0.98 v + 0.02 g^2 >= 0.98 v everywhere (reset: ~0.02 g^2)
    for tag in (S, S + 1):
        _to_universal(out / "checkpoints" / f"step{tag:08d}", tmp_path / f"u{tag}" / "x")
    n_params = 0
    for f in (tmp_path / f"u{S}" / "x" / "zero").glob("*/exp_avg_sq.pt"):
        v0, v1 = (o["param"] if isinstance(o, dict) else o for o in (   # ZeRO-3's files wrap the tensor
            torch.load(f, weights_only=True),
            torch.load(tmp_path / f"u{S + 1}" / "x" / "zero" / f.parent.name / "exp_avg_sq.pt", weights_only=True)))
        assert v0.abs().sum() > 0 and bool((v1 >= 0.98 * v0 * (1 - 1e-5)).all()), f.parent.name
        n_params += 1
    assert n_params > 10


def test_keep_global_batch_adjusts_accumulation_or_says_what_to_set():
    from mer_dist.config import AlignConfig, ConfigError
    from mer_dist.train.zero import keep_global_batch
    cfg = AlignConfig()
    cfg.data.batch_size, cfg.train.grad_accum = 4, 1
    assert keep_global_batch(cfg, 2, 8, 1) == 2            # 16 GPUs -> 8: twice the accumulation
    assert keep_global_batch(cfg, 4, 32, 2) == 4
    assert keep_global_batch(cfg, 1, None, 1) == 1         # an older checkpoint: global batch from the config
    with pytest.raises(ConfigError, match="global batch of 4 on 1 ranks.*data.batch_size=4 does not divide"):
        keep_global_batch(cfg, 1, 4, 2)
