"""Where am I in the job? Rank/world/master from whichever launcher started us.

torchrun, the deepspeed launcher and `accelerate launch` export RANK/WORLD_SIZE/LOCAL_RANK/
MASTER_*; `srun` exports SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and the node list. We normalise
both into the torch env:// variables and create the process group ourselves (accelerate's
`Accelerator()` miscounts processes on CPU, so it is never asked). Training loops only see a
`DistEnv`; they never learn which launcher ran them.
"""
from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"
    job_id: str = ""
    ds_config_file: str = ""   # a DeepSpeed config chosen at launch time (accelerate's deepspeed_config_file)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node_id(self) -> str | None:
        """'node<k>' when the job spans several nodes (system metrics per node), else None."""
        return f"node{self.rank // self.local_world_size}" if self.world_size > self.local_world_size else None

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def first_host(nodelist: str) -> str:
    """First hostname of a Slurm node list ('gpu[003-005,9],cpu1' -> 'gpu003')."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _tasks_per_node(value: str) -> int:
    m = re.match(r"(\d+)", value or "")
    return int(m.group(1)) if m else 1


def detect(env: dict | None = None) -> DistEnv:
    d = _detect(os.environ if env is None else env)
    d.ds_config_file = (os.environ if env is None else env).get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    return d


def _detect(e) -> DistEnv:
    job = e.get("SLURM_JOB_ID", "")
    if "RANK" in e and "WORLD_SIZE" in e:
        if any(k.startswith("ACCELERATE_") for k in e):
            launcher = "accelerate"
        elif "CROSS_RANK" in e:
            launcher = "deepspeed"
        elif "TORCHELASTIC_RUN_ID" in e:
            launcher = "torchrun"
        else:
            launcher = "env"
        world = int(e["WORLD_SIZE"])
        return DistEnv(int(e["RANK"]), world, int(e.get("LOCAL_RANK", 0)),
                       int(e.get("LOCAL_WORLD_SIZE", e.get("LOCAL_SIZE", world))),
                       e.get("MASTER_ADDR", "127.0.0.1"), int(e.get("MASTER_PORT", 29500)), launcher, job)
    if "SLURM_PROCID" in e and "SLURM_NTASKS" in e:
        # derived from the job id: every node computes the same port without talking, and two jobs that share
        # a node differ. The one definition: slurm/*.sh leave it to this (torchrun mode through `torchrun_args`)
        port = int(e.get("MASTER_PORT", 0)) or 20000 + int(job or 0) % 20000
        addr = e.get("MASTER_ADDR") or first_host(e.get("SLURM_JOB_NODELIST", e.get("SLURM_NODELIST", "127.0.0.1")))
        return DistEnv(int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", 0)),
                       _tasks_per_node(e.get("SLURM_TASKS_PER_NODE", e.get("SLURM_NTASKS_PER_NODE", "1"))),
                       addr, port, "slurm", job)
    return DistEnv(job_id=job)


def check_derived_port(port: int, e) -> None:
    """On the job's first node, before anything binds it: the port derived from the job id must be free there
    (another job's or service's listener would otherwise fail the rendezvous with a bare EADDRINUSE, or
    leave the other nodes waiting for the group timeout). One line naming the way out."""
    import socket
    if e.get("MASTER_PORT") or e.get("SLURM_NODEID", "0") != "0":
        return
    with socket.socket() as s:
        # as the TCPStore binds: a requeued job's own port, left in TIME_WAIT by its last run, is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as err:
            raise ValueError(f"MASTER_PORT {port} (derived from Slurm job id {e.get('SLURM_JOB_ID', '?')}) is in use "
                             f"on {socket.gethostname()} ({err.strerror}); set MASTER_PORT to a free port") from None


def torchrun_args(e) -> list[str]:
    """torchrun's rendezvous flags for one agent per Slurm node (`srun --ntasks-per-node=1`)."""
    d = _detect(e)
    check_derived_port(d.master_port, e)
    nproc = e.get("GPUS_PER_NODE") or e.get("SLURM_GPUS_ON_NODE") or "1"
    return [f"--nnodes={e.get('SLURM_JOB_NUM_NODES', d.world_size)}", f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={d.master_addr}:{d.master_port}", f"--rdzv_id={d.job_id}"]


_GIVEN: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a child to bind (single-process runs, local launches, test
    servers). Drawn at random from 10000-19999: below the kernel's ephemeral range, where every outgoing
    connection takes its source port (a port from `bind(0)` can be taken that way before the child binds it),
    below Slurm's derived master ports (20000 + job id), and never the same one twice in a process."""
    import random
    import socket
    for _ in range(200):
        port = random.SystemRandom().randint(10000, 19999)   # not the seeded stream forked ranks share
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as s:               # a crowded range: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(args: list[str], procs: int) -> None:
    """`python -m mer_dist ARGS` under torchrun on this machine, `procs` ranks (the demo's and self-train's alignment
    runs); raises CalledProcessError when it fails."""
    subprocess.run(launch_command(args, procs, "torchrun", {}), check=True)


def launch_command(args: list[str], procs: int, launcher: str, environ) -> list[str]:
    """The command line that starts `python -m mer_dist ARGS` on many ranks: `srun` (every task of the Slurm
    allocation it runs in; launcher "auto" picks it inside one, i.e. where SLURM_JOB_ID is set) or torchrun with
    `procs` ranks on this machine."""
    if launcher == "srun" or (launcher == "auto" and environ.get("SLURM_JOB_ID")):
        # a failed task ends the step (no rank waits on a dead one); its exit code (75: requeue me) is the step's
        return ["srun", "--kill-on-bad-exit=1", sys.executable, "-m", "mer_dist", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
            f"--master_port={free_port()}", "-m", "mer_dist", *args]


EXIT_PREEMPTED = 75     # EX_TEMPFAIL: "checkpointed on a signal, requeue me" (align, and the recipe that runs it)

TIMEOUT_ENV = "MER_DIST_TIMEOUT_S"


def timeout() -> datetime.timedelta:
    """How long a collective may wait for the slowest rank before the job fails: `MER_DIST_TIMEOUT_S` seconds
    (default 1800). Work only rank 0 does never counts against it (`on_main`)."""
    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ValueError(f"environment variable {TIMEOUT_ENV}: expected a number of seconds > 0, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def setup(threads: int = 0, always_group: bool = False) -> DistEnv:
    """Detect, export env:// variables, pin CPU threads, and init the process group (gloo/nccl).

    The group is created when world > 1, or always when asked (DeepSpeed wants one even alone).
    """
    d, wait = detect(), timeout()       # a bad setting is one line before anything starts
    if d.launcher == "slurm" and d.rank == 0 and d.world_size > 1:
        check_derived_port(d.master_port, os.environ)
    if d.world_size == 1 and "MASTER_PORT" not in os.environ:
        d.master_port = free_port()
    os.environ.update(RANK=str(d.rank), WORLD_SIZE=str(d.world_size), LOCAL_RANK=str(d.local_rank),
                      MASTER_ADDR=d.master_addr, MASTER_PORT=str(d.master_port))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        n = threads or max(1, len(os.sched_getaffinity(0)) // max(1, d.local_world_size))
        torch.set_num_threads(n)
    else:
        torch.cuda.set_device(d.local_rank)
    if not tdist.is_initialized() and (d.world_size > 1 or always_group):
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        tdist.init_process_group(backend, init_method="env://", rank=d.rank, world_size=d.world_size,
                                 timeout=wait)
    return d


_ON_MAIN = itertools.count()


def on_main(work, kind: type[Exception] = ValueError):
    """Rank 0 runs `work()`; the other ranks wait for it *outside* any collective -- they poll the process group's
    store, where rank 0 leaves the outcome -- so rank-0 work of any length (adapting a teacher, decoding a frame
    cache, converting a checkpoint) never meets the group's timeout. Every rank returns rank 0's result (plain
    JSON values: lists come back for tuples); an error on rank 0 reaches the others as `kind` with its one line
    within seconds. Every rank must call it, the same number of times."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return work()
    # one key per call; the restart counts keep a requeued or restarted job from reading an earlier attempt's key
    key = (f"mer-dist/on-main/{os.environ.get('SLURM_RESTART_COUNT', '0')}."
           f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{next(_ON_MAIN)}")
    store = tdist.distributed_c10d._get_default_store()
    if tdist.get_rank() == 0:
        try:
            result = work()
            outcome = json.dumps({"result": result}, default=_plain)
        except BaseException as e:
            line = (str(e).splitlines() or [""])[0]
            store.set(key, json.dumps({"error": line if isinstance(e, ValueError) else f"{type(e).__name__}: {line}"}))
            raise
        store.set(key, outcome)
        return result
    while True:
        try:
            store.wait([key], datetime.timedelta(seconds=30))
            break
        except tdist.DistStoreError as e:     # not yet: wait on (a lost rank 0 raises another error, which ends us)
            if "timeout" not in str(e).lower() and "timed out" not in str(e).lower():
                raise
    outcome = json.loads(store.get(key))
    if "error" in outcome:
        raise kind(outcome["error"])
    return outcome["result"]


def _plain(value):
    """numpy numbers and arrays as JSON values (what stages return)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not a plain value")


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def all_gather_object(obj) -> list:
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (every rank must call it): a decision taken once, by one rank, for all."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return obj
    box = [obj if tdist.get_rank() == 0 else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj) -> list | None:
    """Every rank's `obj` as a list on rank 0, None elsewhere (every rank must call it)."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return [obj]
    out = [None] * tdist.get_world_size() if tdist.get_rank() == 0 else None
    tdist.gather_object(obj, out, dst=0)
    return out


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    """All-reduce a small CPU tensor (on the GPU under NCCL); every rank must call it."""
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        if tdist.get_backend() == "nccl":
            t = t.cuda()
        tdist.all_reduce(t, op=op)
    return t.cpu()


def mean_across_ranks(values: list[float]) -> list[float]:
    """Element-wise mean of a few floats over all ranks (logging; every rank must call it)."""
    t = _all_reduce(torch.tensor(values, dtype=torch.float64), tdist.ReduceOp.SUM)
    return (t / (tdist.get_world_size() if tdist.is_initialized() else 1)).tolist()


def max_across_ranks(value: int) -> int:
    """The largest of one integer over all ranks (a flag any rank may raise; every rank must call it)."""
    return int(_all_reduce(torch.tensor([value], dtype=torch.int64), tdist.ReduceOp.MAX).item())


def raise_if_any(error: str, kind: type[Exception]) -> None:
    """Every rank raises `kind` with the first non-empty error any rank reports (every rank must call it):
    a failure seen by one rank (often rank 0, which alone checks) reaches all of them, none waits forever."""
    errors = [e for e in all_gather_object(error) if e]
    if errors:
        raise kind(errors[0])


def cleanup() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


class StopFlag:
    """SIGTERM / SIGUSR1 (Slurm pre-emption warning) -> finish the step, checkpoint, exit.

    A signal may reach only some ranks (or arrive between their steps), so `should_stop` agrees
    across ranks with a MAX all-reduce: every rank stops at the same step. A rank that is waiting for a
    batch when the signal comes (a stalled loader: a hung file system, a stream of corrupt samples)
    cannot finish its step: after `grace_s` more seconds of waiting it exits with `exit_code` without a
    checkpoint (`on_give_up` runs first), so the job ends before Slurm's kill and resumes from the last one.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1), grace_s: float = 60.0, exit_code: int = 1,
                 on_give_up=None):
        self.signum = 0         # the signal all ranks agreed on at the last `should_stop` (0: none)
        self._received = 0      # the signal this rank received; only the handler writes it
        self.grace_s, self.exit_code, self.on_give_up = grace_s, exit_code, on_give_up
        self._waiting = False
        for s in signals:
            signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        self._received = signum
        if self._waiting:
            self._arm()

    def _arm(self) -> None:
        t = threading.Timer(self.grace_s, self._give_up)
        t.daemon = True
        t.start()

    @contextlib.contextmanager
    def waiting_for_data(self):
        """Around the wait for a batch: the one place where a signal cannot wait for the step to end."""
        self._waiting = True
        if self._received:
            self._arm()
        try:
            yield
        finally:
            self._waiting = False

    def _give_up(self) -> None:
        if not self._waiting:
            return
        print(f"signal {self._received}: no batch came within stop_grace_s={self.grace_s:g}s, exiting "
              f"{self.exit_code} without a checkpoint (a resumed job starts from the last one)",
              file=sys.stderr, flush=True)
        if self.on_give_up is not None:
            self.on_give_up()
        os._exit(self.exit_code)     # the main thread is blocked in the loader: no other way out

    def should_stop(self) -> bool:
        # the handler may run inside the all-reduce (Python runs it when the collective returns): it writes
        # `_received` only, so a signal that lands there is agreed on at the next step instead of being lost
        self.signum = max_across_ranks(self._received)
        return self.signum != 0


if __name__ == "__main__":
    # `python -m mer_dist.dist torchrun ARGS...` (slurm/align.sh, MER_LAUNCH=torchrun): torchrun with the
    # rendezvous of this Slurm job, computed inside the job's own environment (container included)
    if sys.argv[1:2] != ["torchrun"]:
        sys.exit("usage: python -m mer_dist.dist torchrun [torchrun args] -m mer_dist STAGE ...")
    from torch.distributed.run import main as torchrun
    torchrun(torchrun_args(os.environ) + sys.argv[2:])
