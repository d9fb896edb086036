"""MLflow on rank 0, never fatal and never in the training loop's way.

Every metric goes to `<out>/metrics.jsonl` first (synchronously: the local record is complete
whatever happens to the server). MLflow calls run on a background thread through `MlflowClient`:
a server that is down at start or disappears mid-run costs the training loop nothing; the thread
warns once, drops MLflow records while the server is down, retries every `retry_s` seconds, and
`close()` says where the complete metrics are. Other ranks get a tracker that does nothing.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
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
        self.out, self.local = Path(out), Path(out) / "metrics.jsonl"
        self.stage, self.cfg, self.retry_s = stage, cfg, retry_s
        self.uri = cfg.uri or default_uri(out)
        self.run_id = ""
        self.ever_down = False
        self._down_since = 0.0
        if not active:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.mlflow:
            return
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self._tags = {"stage": stage, **{k: str(v) for k, v in (tags or {}).items()}}
        self._q: queue.Queue = queue.Queue()
        self._client = None
        self._monitor = None
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # -- background thread --------------------------------------------------------------
    def _connect(self) -> bool:
        try:
            from mlflow.tracking import MlflowClient
            self._client = MlflowClient(self.uri)
            if self.run_id:
                self._client.get_run(self.run_id)       # reachable again?
            else:
                exp = self._client.get_experiment_by_name(self.cfg.experiment)
                exp_id = exp.experiment_id if exp else self._client.create_experiment(self.cfg.experiment)
                name = self.cfg.run_name or f"{self.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
                self.run_id = self._client.create_run(exp_id, tags=self._tags, run_name=name).info.run_id
                log.info("MLflow run %s at %s", self.run_id, self.uri)
                if self.cfg.system_metrics:
                    self._start_system_metrics()
            self._down_since = 0.0
            return True
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self._fail(e)
            return False

    def _start_system_metrics(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=10)
            self._monitor.start()
        except Exception as e:  # noqa: BLE001
            log.info("system metrics unavailable: %s", e)

    def _fail(self, e: Exception) -> None:
        if not self._down_since:
            log.warning("MLflow unavailable at %s (%s: %s); metrics continue in %s", self.uri, type(e).__name__,
                        (str(e).splitlines() or [""])[0][:200], self.local)
        self._down_since = time.monotonic()
        self.ever_down = True

    def _work(self) -> None:
        connected = self._connect()
        while True:
            item = self._q.get()
            if item is None:
                break
            if not connected or self._down_since:
                if time.monotonic() - self._down_since < self.retry_s:
                    continue            # server down: this record lives in metrics.jsonl only
                connected = self._connect()
                if not connected:
                    continue
            fn, args = item
            try:
                fn(self._client, self.run_id, *args)
            except Exception as e:  # noqa: BLE001
                self._fail(e)
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:  # noqa: BLE001
                pass

    def _submit(self, fn, *args) -> None:
        if self.mlflow:
            self._q.put((fn, args))

    # -- public API ---------------------------------------------------------------------
    def params(self, cfg_or_dict: Any) -> None:
        from mlflow.entities import Param
        d = cfg_or_dict if isinstance(cfg_or_dict, dict) else to_dict(cfg_or_dict)
        flat = {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in flatten(d).items()}
        params = [Param(k, str(v)[:500]) for k, v in flat.items()]
        self._submit(lambda c, run, ps: c.log_batch(run, params=ps), params)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if not self.active:
            return
        values = {k: float(v) for k, v in values.items()}
        with open(self.local, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        from mlflow.entities import Metric
        ts = int(time.time() * 1000)
        ms = [Metric(k, v, ts, step) for k, v in values.items()]
        self._submit(lambda c, run, m: c.log_batch(run, metrics=m), ms)

    def artifact(self, path: str | Path, subdir: str | None = None) -> None:
        if Path(path).exists():
            self._submit(lambda c, run, p, d: c.log_artifact(run, p, d), str(path), subdir)

    def tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._submit(lambda c, run, key, val: c.set_tag(run, key, val), k, str(v))

    def close(self, status: str = "FINISHED", timeout_s: float = 60.0) -> None:
        if not self.mlflow:
            return
        self._submit(lambda c, run, s: c.set_terminated(run, s), status)
        self._q.put(None)
        self._thread.join(timeout_s)
        if self.ever_down or self._thread.is_alive():
            log.warning("MLflow was unreachable for part of this run; all metrics are in %s", self.local)
