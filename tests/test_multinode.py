"""Two 'nodes' without a cluster: network namespaces joined by a veth pair, one torchrun per namespace."""
import json
import os
import subprocess
import sys
import uuid

import pytest
from conftest import REPO, free_port

ARGS = ["data.height=32", "data.width=32", "data.frames=4", "data.batch_size=4", "data.workers=1",
        "train.log_every=2", "train.eval_samples=0", "train.ckpt_every=5", "tracking.system_metrics_interval=0.5", "guard.enabled=false"]


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0:
        pytest.skip("ip netns needs root")
    tag = uuid.uuid4().hex[:6]
    a, b = f"merA{tag}", f"merB{tag}"
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"ip netns not permitted here: {e}")
    try:
        sh("ip", "link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        for ns, dev, addr in ((a, f"va{tag}", "10.213.7.1/24"), (b, f"vb{tag}", "10.213.7.2/24")):
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield [(a, f"va{tag}"), (b, f"vb{tag}")], "10.213.7.1"
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.slow
def test_two_node_rendezvous_trains_and_checkpoints(two_hosts, shards, teacher, tmp_path):
    hosts, master = two_hosts
    out, port = tmp_path / "run", str(free_port())
    procs = []
    for node_rank, (ns, dev) in enumerate(hosts):
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               f"--node_rank={node_rank}", "--nproc_per_node=1", f"--master_addr={master}", f"--master_port={port}",
               "-m", "mer_dist", "align", "--shards", str(shards), "--teacher", str(teacher), "--out", str(out),
               "--steps", "10", *ARGS, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, "GLOO_SOCKET_IFNAME": dev}))
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["step"] == 10 and s["launcher"] == "torchrun"
    assert (out / "checkpoints" / "latest").read_text() == "step00000010"
    assert len(list((out / "checkpoints" / "step00000010").glob("**/*optim_states.pt"))) == 2
    # one MLflow run (the SQLite store beside the output, on the 'shared file system'), system metrics of each node
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mer-dist").experiment_id])
    assert len(runs) == 1
    keys = set(runs[0].data.metrics)
    assert "loss" in keys
    for node in ("node0", "node1"):
        assert any(k.startswith(f"system/{node}/") for k in keys), sorted(keys)
