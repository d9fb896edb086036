"""MLflow on rank 0, never fatal.

Every metric also goes to `<out>/metrics.jsonl`, so a run whose tracking server is down at start
or disappears mid-run keeps its numbers: MLflow errors are warned about once, tracking pauses,
and a reconnect is tried every `retry_s` seconds. Other ranks get a tracker that does nothing.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from mer_dist.config import TrackingConfig, flatten, to_dict

log = logging.getLogger("mer_dist.tracking")


def default_uri(out: str | Path) -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store beside the run directory (runs/mlflow.db)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(out).resolve().parent / 'mlflow.db')}"


class Tracker:
    def __init__(self, cfg: TrackingConfig, out: str | Path, stage: str, active: bool = True,
                 tags: dict[str, Any] | None = None, retry_s: float = 30.0):
        self.active = active                       # rank 0: local metrics.jsonl always
        self.mlflow = active and cfg.enabled       # ... and MLflow when enabled
        self.out = Path(out)
        self.local = self.out / "metrics.jsonl"
        self.stage, self.cfg, self.retry_s = stage, cfg, retry_s
        self.ok = False
        self._down_since = 0.0
        self.run_id = ""
        self.uri = cfg.uri or default_uri(out)
        if not active:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.mlflow:
            return
        # fail fast instead of mlflow's default multi-minute retry ladder
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self._tags = {"stage": stage, **{k: str(v) for k, v in (tags or {}).items()}}
        self._start()

    def _start(self) -> None:
        try:
            import mlflow
            mlflow.set_tracking_uri(self.uri)
            mlflow.set_experiment(self.cfg.experiment)
            name = self.cfg.run_name or f"{self.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
            run = mlflow.start_run(run_id=self.run_id or None, run_name=None if self.run_id else name,
                                   tags=self._tags, log_system_metrics=self.cfg.system_metrics)
            self.run_id, self.ok = run.info.run_id, True
            log.info("MLflow run %s at %s", self.run_id, self.uri)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self._fail(e)

    def _fail(self, e: Exception) -> None:
        if self.ok or not self._down_since:
            log.warning("MLflow unavailable (%s: %s); metrics continue in %s", type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "", self.local)
        self.ok = False
        self._down_since = time.monotonic()

    def _call(self, fn_name: str, *args, **kwargs) -> None:
        if not self.mlflow:
            return
        if not self.ok:
            if time.monotonic() - self._down_since < self.retry_s:
                return
            self._start()
            if not self.ok:
                return
        try:
            import mlflow
            getattr(mlflow, fn_name)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def _local(self, record: dict) -> None:
        with open(self.local, "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- public API ------------------------------------------------------------------
    def params(self, cfg_or_dict: Any) -> None:
        d = cfg_or_dict if isinstance(cfg_or_dict, dict) else to_dict(cfg_or_dict)
        flat = {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in flatten(d).items()}
        self._call("log_params", {k: str(v)[:500] for k, v in flat.items()})

    def metrics(self, values: dict[str, float], step: int) -> None:
        if not self.active:
            return
        values = {k: float(v) for k, v in values.items()}
        self._local({"step": step, "time": time.time(), **values})
        self._call("log_metrics", values, step=step)

    def artifact(self, path: str | Path, subdir: str | None = None) -> None:
        if Path(path).exists():
            self._call("log_artifact", str(path), subdir)

    def tags(self, tags: dict[str, Any]) -> None:
        self._call("set_tags", {k: str(v) for k, v in tags.items()})

    def close(self, status: str = "FINISHED") -> None:
        if self.mlflow and self.ok:
            try:
                import mlflow
                mlflow.end_run(status=status)
            except Exception as e:  # noqa: BLE001
                self._fail(e)
        if self.mlflow and not self.ok:
            log.warning("MLflow was unreachable for part of this run; all metrics are in %s", self.local)
