"""`mer-dist <stage> [--config configs/<stage>.yaml] [--flag value ...] [key.path=value ...]`.

Flags are shortcuts for config keys; anything else is a dotted override. Bad input of any kind
(config, corpus, shards, model directory) ends in one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from mer_dist import config as C

# stage -> {flag: config key}
SHORTCUTS: dict[str, dict[str, str]] = {
    "synth": {"out": "out", "num-labeled": "num_labeled", "num-unlabeled": "num_unlabeled",
              "num-test": "num_test", "seed": "seed", "container": "container", "workers": "workers"},
    "init-models": {"out": "out", "preset": "preset", "seed": "seed"},
    "shard": {"corpus": "corpus", "out": "out", "workers": "workers", "shard-mb": "shard_mb", "strict": "strict"},
    "pretrain-audio": {"shards": "data.shards", "out": "out", "steps": "steps", "clusters": "clusters"},
    "probe-layers": {"shards": "data.shards", "model": "model", "out": "out", "top-k": "top_k"},
    "adapt-audio": {"shards": "data.shards", "model": "model", "out": "out", "layers": "layers", "probe": "probe",
                    "method": "method", "epochs": "epochs"},
    "extract-targets": {"shards": "data.shards", "teacher": "teacher", "out": "out"},
    "align": {"shards": "data.shards", "teacher": "teacher", "out": "out", "steps": "train.steps",
              "zero": "train.zero_stage", "targets": "targets"},
    "finetune": {"shards": "data.shards", "teacher": "teacher", "visual": "visual", "out": "out",
                 "modalities": "modalities", "seed": "seed", "folds": "folds"},
    "evaluate": {"model": "model", "shards": "shards", "split": "split", "out": "out"},
    "pseudo-label": {"model": "model", "shards": "shards", "split": "split", "out": "out", "threshold": "threshold",
                     "top-per-class": "top_per_class", "agree-with": "agree_with"},
    "self-train": {"shards": "finetune.data.shards", "teacher": "finetune.teacher", "visual": "finetune.visual",
                   "out": "out", "rounds": "rounds", "seed": "finetune.seed"},
    "ablate": {"shards": "shards", "teacher": "teacher", "aligned": "aligned", "shuffled": "shuffled", "out": "out",
               "seeds": "seeds"},
    "demo": {"out": "out", "seeds": "seeds", "self-train-rounds": "self_train_rounds"},
}


# stage -> "module:function", imported only when the stage runs (keeps `mer-dist --help` fast)
RUNNERS = {
    "synth": "mer_dist.data.synth:generate", "init-models": "mer_dist.models.presets:run", "shard": "mer_dist.data.ingest:write_shards",
    "pretrain-audio": "mer_dist.train.pretrain_audio:run",
    "probe-layers": "mer_dist.train.probe:run", "adapt-audio": "mer_dist.train.adapt:run",
    "extract-targets": "mer_dist.train.extract:run", "align": "mer_dist.train.align:run",
    "finetune": "mer_dist.train.finetune:run", "evaluate": "mer_dist.eval.evaluate:run",
    "pseudo-label": "mer_dist.train.pseudo:run", "self-train": "mer_dist.train.selftrain:run",
    "ablate": "mer_dist.train.ablate:run", "demo": "mer_dist.demo:run",
}


def _runner(stage: str):
    module, fn = RUNNERS[stage].split(":")
    return getattr(importlib.import_module(module), fn)


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher prepends --local_rank=N; LOCAL_RANK in the environment says the same."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(a)
    return out


def parse(argv: list[str]) -> tuple[str, object]:
    argv = _strip_local_rank(argv)
    parser = argparse.ArgumentParser(prog="mer-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    for stage, flags in SHORTCUTS.items():
        p = sub.add_parser(stage)
        p.add_argument("--config", help=f"YAML config (e.g. configs/{stage}.yaml)")
        for flag, key in flags.items():
            p.add_argument(f"--{flag}", dest=key, help=f"= {key}")
        p.add_argument("overrides", nargs="*", help="dotted overrides: key.path=value")
    args, rest = parser.parse_known_args(argv)   # overrides may sit between flags
    stray = [r for r in rest if "=" not in r or r.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    stage = args.stage
    overrides = [f"{key}={getattr(args, key)}" for key in SHORTCUTS[stage].values()
                 if getattr(args, key, None) is not None]
    cfg = C.load(C.STAGES[stage], args.config, overrides + list(args.overrides) + rest)
    return stage, cfg


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("MER_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "alembic", "urllib3", "httpx", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from mer_dist.data.decode import DecodeError
    from mer_dist.errors import CheckpointError, DataError, LockError, ModelError
    user_errors = (C.ConfigError, DataError, ModelError, DecodeError, CheckpointError, LockError, FileNotFoundError,
                   ValueError)
    try:
        stage, cfg = parse(sys.argv[1:] if argv is None else argv)
        result = _runner(stage)(cfg)
    except user_errors as e:
        if os.environ.get("MER_DEBUG"):
            raise
        # one write (text and newline together): ranks sharing a terminal never run their lines together
        sys.stderr.write(f"mer-dist: error: {e}".splitlines()[0] + "\n")
        sys.stderr.flush()
        return 2
    finally:
        _stop_loader_workers()
    return int(result) if isinstance(result, int) else 0


def _stop_loader_workers() -> None:
    """Loader workers ignore SIGTERM (the trainer checkpoints first), so at exit multiprocessing's terminate + join
    would wait for ever on one blocked on a full queue: a stage that ends, however it ends, kills its own."""
    import multiprocessing
    import signal
    workers = [c for c in multiprocessing.active_children() if c.daemon]
    if workers:     # the DataLoader's SIGCHLD handler would raise over a worker we kill on purpose
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in workers:
        child.kill()
        child.join(5)


if __name__ == "__main__":
    sys.exit(main())
