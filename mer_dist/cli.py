"""`mer-dist <stage> [--config configs/<stage>.yaml] [--flag value ...] [key.path=value ...]`.

Flags are shortcuts for config keys; anything else is a dotted override. Bad input of any kind
(config, corpus, shards, model directory) ends in one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

from mer_dist import config as C



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


PIPELINE = """pipeline (each stage reads what the one before it wrote):
  synth | your corpus -> shard -> [pretrain-audio] -> probe-layers -> adapt-audio -> [extract-targets]
  -> align -> finetune -> evaluate;  pseudo-label / self-train use the unlabeled pool;  ablate asks whether
  alignment helped on your corpus;  demo runs them all on a synthetic corpus.
`mer-dist STAGE --help` lists every config key of a stage."""


def summary_line(stage: C.Stage) -> str:
    """The first line of the stage module's docstring, read without importing it (`--help` stays fast)."""
    import ast
    import importlib.util
    origin = importlib.util.find_spec(stage.runner.split(":")[0]).origin
    doc = ast.get_docstring(ast.parse(open(origin, encoding="utf-8").read())) or ""
    line = doc.strip().splitlines()[0] if doc.strip() else ""
    return line.split(": ", 1)[1] if line.startswith("`mer-dist") and ": " in line else line


def keys_help(cls: type) -> str:
    """Every config key of a stage with its type, default and one-line doc, grouped by section (the text of
    configs/<stage>.yaml, from the same dataclasses)."""
    import dataclasses
    import typing
    docs = C.field_docs()
    groups: dict[str, list[str]] = {}

    def walk(c: type, obj, prefix: str) -> None:
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(type(v), v, f"{prefix}{f.name}.")
                continue
            t = hints[f.name]
            tp = "|".join(map(str, typing.get_args(t))) if typing.get_origin(t) is typing.Literal else \
                getattr(t, "__name__", None) if typing.get_origin(t) is None else str(t).replace("typing.", "")
            groups.setdefault(prefix.rstrip(".") or "(top level)", []).append(
                f"  {prefix}{f.name} ({tp}, default {v!r}): {docs.get((c.__name__, f.name), '')}")
    walk(cls, cls(), "")
    order = sorted(groups, key=lambda g: g != "(top level)")
    return "config keys (set any as key.path=value):\n" + "\n".join(
        f"{section}:\n" + "\n".join(groups[section]) for section in order)


def parse(argv: list[str]) -> tuple[str, object]:
    argv = _strip_local_rank(argv)
    parser = argparse.ArgumentParser(prog="mer-dist", description="Distributed pretraining for multimodal emotion "
                                     "recognition: one subcommand per pipeline stage.", epilog=PIPELINE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    help_asked = any(a in ("-h", "--help") for a in argv)
    for name, stage in C.STAGES.items():
        line = summary_line(stage) if help_asked else ""
        p = sub.add_parser(name, help=line, description=line, formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=keys_help(stage.config) if help_asked and name in argv else None)
        p.add_argument("--config", help=f"YAML config (e.g. configs/{stage.yaml}.yaml)")
        for flag, key in stage.flags.items():
            p.add_argument(f"--{flag}", dest=key, help=f"= {key}")
        p.add_argument("overrides", nargs="*", help="dotted overrides: key.path=value" + (
            "; and the video files or directories to predict" if name == "predict" else ""))
    args, rest = parser.parse_known_args(argv)   # overrides may sit between flags
    stage = args.stage
    words = list(args.overrides) + rest
    paths = [w for w in words if "=" not in w and not w.startswith("-")] if stage == "predict" else []
    stray = [w for w in words if ("=" not in w or w.startswith("-")) and w not in paths]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    overrides = dict(C.split_override(f"{key}={getattr(args, key)}") for key in C.STAGES[stage].flags.values()
                     if getattr(args, key, None) is not None)
    overrides |= dict(C.split_override(w) for w in words if w not in paths)
    if paths:           # `mer-dist predict --model M a.mp4 dir/`: the videos are positional
        overrides["paths"] = paths
    cfg = C.load(C.STAGES[stage].config, args.config, overrides)
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
    from mer_dist import tracking
    tracking.STAGE_START = time.time()      # a stage's MLflow run starts when the stage does
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupted)     # align installs its own (checkpoint, then exit 75)
    try:
        stage, cfg = parse(sys.argv[1:] if argv is None else argv)
        result = C.STAGES[stage].function()(cfg)
    except user_errors as e:
        tracking.close_open("FAILED")
        if os.environ.get("MER_DEBUG"):
            raise
        # one write (text and newline together): ranks sharing a terminal never run their lines together
        sys.stderr.write(f"mer-dist: error: {e}".splitlines()[0] + "\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:           # SIGINT, or SIGTERM through _interrupted: the runs end KILLED
        tracking.close_open("KILLED")
        return 130
    except BaseException:
        tracking.close_open("FAILED")
        raise
    finally:
        _stop_loader_workers()
    return int(result) if isinstance(result, int) else 0


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


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
