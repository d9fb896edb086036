"""The benchmark scripts never rot: quick mode runs and prints every CPU figure (no speed is asserted)."""
import json
import subprocess
import sys

from conftest import REPO


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
