"""The benchmark scripts never rot: quick mode runs and prints every CPU figure (no speed is asserted)."""
import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_run_all_quick(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/run_all.py", "--quick", "--json", str(tmp_path / "f.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**__import__("os").environ, "MER_BENCH_DIR": str(tmp_path / "bench")})
    assert p.returncode == 0, p.stderr[-3000:]
    figures = json.loads((tmp_path / "f.json").read_text())
    for key in ("decode_vs_ffmpeg", "loader_vs_linear", "stream_vs_memory", "offline_vs_online", "break_even_epochs",
                "zero1_vs_1rank", "zero2_vs_1rank", "zero3_vs_1rank", "scaling_2_vs_1", "worker_rss_growth_mb"):
        assert key in figures and figures[key] == figures[key], key     # present and not NaN
    assert "| #5 ZeRO-3 vs 1 rank |" in p.stdout and "all benchmarks:" in p.stdout
    assert 0.3 < figures["zero3_vs_1rank"] < 0.7     # ZeRO-3 really partitions across the 2 ranks


@pytest.mark.slow
def test_gpu_benchmark_quick(tmp_path):
    """#8's script (run as is on a lent GPU machine) works end to end here: a real align run under torchrun and a
    FLOP count of the same step; on CPU there is no bf16 peak, so no MFU is claimed."""
    p = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--quick", "--json", str(tmp_path / "g.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**__import__("os").environ, "MER_BENCH_DIR": str(tmp_path / "bench")})
    assert p.returncode == 0, p.stderr[-3000:]
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["device"] == "CPU" and g["mfu"] is None and "n/a" in p.stdout
    assert g["samples_per_s"] > 0 and 0 <= g["data_wait_frac"] <= 1
    assert g["gflops_per_sample"] > g["teacher_gflops_per_sample"] > 0
    assert abs(g["achieved_tflops"] - g["gflops_per_sample"] * g["samples_per_s"] / 1e3) < 1e-9


def test_gpu_peak_table():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_gpu import peak_tflops
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some Future GPU") == 0.0
