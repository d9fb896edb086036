"""MLflow on rank 0, never fatal and never in the training loop's way.

Every metric goes to `<out>/metrics.jsonl` first (synchronously: the local record is complete
whatever happens to the server). MLflow calls run on a background thread through `MlflowClient`:
a server that is down at start or disappears mid-run costs the training loop nothing; the thread
warns once, drops MLflow records while the server is down, retries every `retry_s` seconds, and
`close()` says where the complete metrics are. Other ranks get a tracker that does nothing.

Imports: every mlflow module the thread will need is imported *here, on the caller's thread*,
before the thread starts; the thread only does I/O with objects that already exist. Two threads
importing one package at once is how `mlflow.entities` came out half-initialised under load, so
the public methods queue plain Python records and never touch mlflow themselves. Any failure,
an import failure included, turns MLflow off for this run with one warning: training goes on.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from mer_dist.config import TrackingConfig, flatten, to_dict
from mer_dist.io import write_text_atomic

log = logging.getLogger("mer_dist.tracking")
# when the stage started (set by the CLI before any work): a run's start is the stage's, not the moment a stage
# that first extracts features opens its tracker
STAGE_START = time.time()
PARENT_ENV = "MER_DIST_PARENT_RUN"     # a demo / self-train run: the runs its stages open are its children
_open: set = set()                     # trackers not closed yet: an error or a signal ends them FAILED / KILLED


def close_open(status: str) -> None:
    """End every run this process still has open (the CLI, when a stage fails or is stopped by a signal)."""
    for t in list(_open):
        t.close(status, timeout_s=10.0)


@contextlib.contextmanager
def parent_of(tracker: "Tracker"):
    """Inside the block, every run a stage opens -- in this process or one it starts -- is a child of `tracker`'s
    (a demo's stages, a self-train's rounds), so the runs table nests them."""
    before, run_id = os.environ.get(PARENT_ENV), tracker.wait_run_id()
    if run_id:
        os.environ[PARENT_ENV] = run_id
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = before


@functools.lru_cache(maxsize=1)
def _git_commit() -> str:
    """The commit of the checkout the package runs from ("" outside a git checkout)."""
    import subprocess
    try:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def default_uri(out: str | Path) -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store beside the run directory (runs/mlflow.db)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(out).resolve().parent / 'mlflow.db')}"


def artifact_root(uri: str) -> str | None:
    """Artifacts of a local store live beside it (not in ./mlruns of whatever directory the user is in);
    a tracking server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


class _MlflowApi:
    """The mlflow names the worker thread uses, imported once on the constructing thread."""

    def __init__(self, uri: str, system_metrics: bool):
        from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
        self.Metric, self.Param, self.RunTag = Metric, Param, RunTag
        self.Dataset, self.DatasetInput, self.InputTag = Dataset, DatasetInput, InputTag
        self.monitor_cls = None
        if system_metrics:
            try:
                import mlflow.utils.autologging_utils  # noqa: F401  (imported lazily by the monitor)
                from mlflow.system_metrics.system_metrics_monitor import (
                    SystemMetricsMonitor,
                )
                self.monitor_cls = SystemMetricsMonitor
            except Exception as e:  # noqa: BLE001 - optional (psutil / platform)
                log.info("system metrics unavailable: %s", e)
        # resolves the store now (a SQLite store is created and migrated here, on this thread);
        # a remote store is only contacted later, by the worker
        with _store_lock(uri):
            self.client = MlflowClient(uri)

    def start_monitor(self, run_id: str, cfg: TrackingConfig, uri: str, node_id: str | None):
        """MLflow's system-metrics monitor of this machine, logging into `run_id` (None when unavailable); MLflow's
        MLFLOW_SYSTEM_METRICS_NODE_ID overrides `node_id`."""
        if self.monitor_cls is None:
            return None
        monitor = self.monitor_cls(run_id, sampling_interval=cfg.system_metrics_interval, tracking_uri=uri,
                                   resume_logging=True, node_id=node_id)
        monitor.start()
        return monitor


@contextlib.contextmanager
def _store_lock(uri: str):
    """Processes that create one SQLite store at once race in its schema migration: serialise them."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Tracker:
    def __init__(self, cfg: TrackingConfig, out: str | Path, stage: str, active: bool = True,
                 tags: dict[str, Any] | None = None, retry_s: float = 30.0, run_id: str = "",
                 resume_keys: tuple[str, ...] = ("loss",), node_id: str | None = None, describe: str = "",
                 dataset: str = ""):
        """`describe`: what the run is, in a few words (its name is "<stage> <describe>"); `dataset`: the shards
        directory, logged as the run's dataset input (digest of its manifest.json)."""
        self.node_id = node_id                     # multi-node jobs: system/<node_id>/* metrics
        self.active = active                       # rank 0: local metrics.jsonl always
        self.mlflow = active and cfg.enabled       # ... and MLflow when enabled
        self.out, self.local = Path(out), Path(out) / "metrics.jsonl"
        self.stage, self.cfg, self.retry_s = stage, cfg, retry_s
        self.uri = cfg.uri or default_uri(out)
        self.run_id = run_id                       # non-empty: reattach to this run (a resumed job)
        self._resume_keys, self._logged_until = resume_keys, -1
        self.ever_down = False
        self._down_since = 0.0
        if not active:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.mlflow:
            return
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            self._api = _MlflowApi(self.uri, cfg.system_metrics)
        except Exception as e:  # noqa: BLE001 - tracking must never stop a stage
            log.warning("MLflow disabled for this run (%s: %s); metrics are in %s", type(e).__name__,
                        (str(e).splitlines() or [""])[0][:200], self.local)
            self.mlflow, self.ever_down = False, True
            return
        self._tags = {"stage": stage, **{k: str(v) for k, v in (tags or {}).items()},
                      **dict(t.split("=", 1) for t in cfg.tags)}
        if _git_commit():
            self._tags["mlflow.source.git.commit"] = _git_commit()
        if os.environ.get(PARENT_ENV):
            self._tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
        self._name = cfg.run_name or (f"{stage} {describe}" if describe else f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}")
        self._dataset = dataset
        _open.add(self)
        self._q: queue.Queue = queue.Queue()
        self._monitor = None
        self._connected, self._attempted = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # -- background thread --------------------------------------------------------------
    def _connect(self) -> bool:
        c = self._api.client
        try:
            if self.run_id:
                c.get_run(self.run_id)       # reachable (again)?
                if not self._connected.is_set():   # reattaching to an earlier job's run (a resume, a requeue)
                    c.update_run(self.run_id, status="RUNNING")
                    for k, v in self._tags.items():
                        c.set_tag(self.run_id, k, v)
                    # steps the earlier job already logged are not logged again (the redone ones keep theirs)
                    self._logged_until = max((m.step for key in self._resume_keys
                                              for m in c.get_metric_history(self.run_id, key)), default=-1)
            else:
                exp = c.get_experiment_by_name(self.cfg.experiment)
                exp_id = exp.experiment_id if exp else c.create_experiment(
                    self.cfg.experiment, artifact_location=artifact_root(self.uri))
                if exp is None or "mlflow.experimentKind" not in exp.tags:    # the UI opens on runs, not traces
                    c.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")
                self.run_id = c.create_run(exp_id, start_time=int(STAGE_START * 1000), tags=self._tags,
                                           run_name=self._name).info.run_id
                if self._dataset:
                    self._log_dataset(c)
                log.info("MLflow run %s at %s", self.run_id, self.uri)
            if self._monitor is None and self._api.monitor_cls is not None:
                self._start_system_metrics()
            self._connected.set()
            self._down_since = 0.0
            return True
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self._fail(e)
            return False

    def _log_dataset(self, c) -> None:
        """The shards as the run's dataset input: name, digest of manifest.json, where they are."""
        import hashlib
        manifest = Path(self._dataset) / "manifest.json"
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16] if manifest.is_file() else ""
        ds = self._api.Dataset(name=Path(self._dataset).resolve().name, digest=digest, source_type="local",
                               source=json.dumps({"uri": str(Path(self._dataset).resolve())}))
        c.log_inputs(self.run_id, datasets=[self._api.DatasetInput(ds, tags=[self._api.InputTag("mlflow.data.context",
                                                                                                 "training")])])

    def _start_system_metrics(self) -> None:
        try:
            self._monitor = self._api.start_monitor(self.run_id, self.cfg, self.uri, self.node_id)
        except Exception as e:  # noqa: BLE001
            self._monitor = False
            log.info("system metrics unavailable: %s", e)

    def _fail(self, e: Exception) -> None:
        if not self._down_since:
            log.warning("MLflow unavailable at %s (%s: %s); metrics continue in %s", self.uri, type(e).__name__,
                        (str(e).splitlines() or [""])[0][:200], self.local)
        self._down_since = time.monotonic()
        self.ever_down = True

    def _send(self, kind: str, payload: Any) -> None:
        """Plain record -> MLflow call (entities built here, from classes imported before the thread)."""
        c, run, api = self._api.client, self.run_id, self._api
        if kind == "params":
            # a resumed run may change a setting (train.steps raised to train on): MLflow params are immutable, so
            # those already logged keep their first value and the new one goes to a `resumed.<key>` tag
            had = c.get_run(run).data.params
            new = [api.Param(k, v) for k, v in payload.items() if k not in had]
            changed = [api.RunTag(f"resumed.{k}", f"{had[k]} -> {v}") for k, v in payload.items() if k in had and had[k] != v]
            if new or changed:
                c.log_batch(run, params=new, tags=changed)
        elif kind == "metrics":
            fresh = [api.Metric(k, v, ts, step) for k, v, ts, step in payload if step > self._logged_until]
            if fresh:
                c.log_batch(run, metrics=fresh)
        elif kind == "artifact":
            c.log_artifact(run, *payload)
        elif kind == "model":           # an MLflow model directory, then (optionally) a registry version of it
            folder, name = payload
            c.log_artifacts(run, folder, "model")
            if name:
                try:
                    c.create_registered_model(name)
                except Exception:  # noqa: BLE001 - it exists already: a new version is what we want
                    pass
                c.create_model_version(name, f"runs:/{run}/model", run_id=run)
        elif kind == "end":
            c.set_terminated(run, payload, end_time=int(time.time() * 1000))

    def _work(self) -> None:
        try:
            connected = self._connect()
            self._attempted.set()
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
                try:
                    self._send(*item)
                except Exception as e:  # noqa: BLE001
                    self._fail(e)
            if self._monitor:
                self._monitor.finish()
        except Exception as e:  # noqa: BLE001 - whatever happens here stays here
            self._fail(e)
        finally:
            self._attempted.set()

    def _submit(self, kind: str, payload: Any) -> None:
        if self.mlflow:
            self._q.put((kind, payload))

    # -- public API: plain Python only, no mlflow on the caller's thread ---------------
    def params(self, cfg_or_dict: Any) -> None:
        d = cfg_or_dict if isinstance(cfg_or_dict, dict) else to_dict(cfg_or_dict)
        flat = {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in flatten(d).items()}
        self._submit("params", {k: str(v)[:500] for k, v in flat.items()})

    def metrics(self, values: dict[str, float], step: int) -> None:
        if not self.active:
            return
        values = {k: float(v) for k, v in values.items()}
        with open(self.local, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        ts = int(time.time() * 1000)
        self._submit("metrics", [(k, v, ts, step) for k, v in values.items()])

    def artifact(self, path: str | Path, subdir: str | None = None) -> None:
        if Path(path).exists():
            self._submit("artifact", (str(path), subdir))

    def model(self, folder: str | Path, register_as: str = "") -> None:
        """Log an MLflow model directory as the run's `model` artifact (`runs:/<id>/model`); `register_as`: also a
        new version of that registered model."""
        if Path(folder).is_dir():
            self._submit("model", (str(folder), register_as))

    def resume_at(self, step: int) -> int:
        """A resumed run redoes the steps after its checkpoint: drop their local rows so every step appears
        once in metrics.jsonl (returns how many were dropped)."""
        if not self.active or not self.local.is_file():
            return 0
        rows, torn = [], 0
        for line in self.local.read_text().splitlines():
            try:
                rows.append((line, json.loads(line).get("step", 0)))
            except ValueError:        # a write cut short by a kill: that row is redone anyway
                torn += 1
        if torn:
            log.warning("%s: dropped %d unreadable row(s) (a write cut short)", self.local, torn)
        keep = [line for line, s in rows if s <= step]
        if len(keep) != len(rows) or torn:
            write_text_atomic(self.local, "".join(r + "\n" for r in keep))
        return len(rows) - len(keep)

    def wait_run_id(self, timeout_s: float = 30.0) -> str:
        """The MLflow run id once the worker's first connection attempt is over ("" if it failed, or MLflow is
        off): a server that is down costs no more than its connection timeout."""
        if self.mlflow:
            self._attempted.wait(timeout_s)
        return self.run_id if self.mlflow and self._connected.is_set() else ""

    def close(self, status: str = "FINISHED", timeout_s: float = 60.0) -> None:
        if not self.mlflow or self not in _open:
            return
        _open.discard(self)
        self._submit("end", status)
        self._q.put(None)
        self._thread.join(timeout_s)
        if self.ever_down or self._thread.is_alive():
            log.warning("MLflow was unreachable for part of this run; all metrics are in %s", self.local)


class NodeMetrics:
    """System metrics of a node other than rank 0's, into the job's one run (rank 0 logs everything else).
    Never raises: a node that cannot reach the store just logs nothing."""

    def __init__(self, cfg: TrackingConfig, out: str | Path, run_id: str, node_id: str):
        self._monitor = None
        if not (cfg.enabled and cfg.system_metrics and run_id):
            return
        uri = cfg.uri or default_uri(out)
        try:
            self._monitor = _MlflowApi(uri, system_metrics=True).start_monitor(run_id, cfg, uri, node_id)
        except Exception as e:  # noqa: BLE001 - tracking must never stop a stage
            self._monitor = None
            log.info("system metrics of %s unavailable: %s", node_id, e)

    def close(self) -> None:
        try:
            if self._monitor is not None:
                self._monitor.finish()
        except Exception as e:  # noqa: BLE001
            log.info("system metrics: %s", e)
