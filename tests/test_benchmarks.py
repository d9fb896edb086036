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
                "zero1_vs_1rank", "zero3_vs_1rank", "worker_rss_growth_mb"):
        assert key in figures and figures[key] == figures[key], key     # present and not NaN
    assert "| #5 ZeRO-3 vs 1 rank |" in p.stdout and "all benchmarks:" in p.stdout
    assert "| #6 2 ranks vs 1 | not measured in --quick |" in p.stdout    # a speed ratio needs the full run
    assert figures["offline_vs_online"] > 0 and figures["zero1_vs_1rank"] < 1.0   # ZeRO-1 partitions Adam state
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
    """The lookup, not the constants: no entry is shadowed by an earlier, more general one (an "H100" before
    "H100 PCIe" would give a PCIe card the SXM peak and understate its MFU), names match whatever their case
    and wrapping, and an unknown card has no peak (MFU n/a, never a guess)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_gpu import PEAK_TFLOPS, peak_tflops
    for key, value in PEAK_TFLOPS:
        assert peak_tflops(f"NVIDIA {key.upper()} 80GB") == value, key
    assert peak_tflops("NVIDIA H100 PCIe") != peak_tflops("NVIDIA H100 80GB HBM3")
    assert peak_tflops("Some Future GPU") == 0.0


def test_matrix_joins_cells_run_after_the_demo(tmp_path):
    """A regime's rows are the demo's results.json plus the cells run into its dir afterwards, where every seed
    finished; a guarded cell whose guard kept the last step stands for its "@last" row, as the demo counts it."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from robustness_matrix import results

    (tmp_path / "results.json").write_text(json.dumps({
        "test_waf": {"visual/random": [0.2, 0.3], "fusion/random": [0.4, 0.5]},
        "cv_waf": {"visual/random": [0.21, 0.31], "fusion/random": [0.41, 0.51]},
        "encoder_step": {"infonce": [240, 0]}}))

    def cell(row, seed, waf):
        (tmp_path / "models" / f"{row}-seed{seed}").mkdir(parents=True)
        (tmp_path / "models" / f"{row}-seed{seed}" / "metrics.json").write_text(
            json.dumps({"test_waf": waf, "cv_waf": waf + 0.01}))
    for seed, (step, kept_last) in enumerate([(100, False), (240, True)]):
        a = tmp_path / "align" / f"kd-seed{seed}"
        a.mkdir(parents=True)
        (a / "summary.json").write_text(json.dumps({"step": 240, "encoder_step": step, "guard": {"scores": {}}}))
        if not kept_last:
            (a / "encoder-last.pt").write_bytes(b"")
            cell("visual-kd-last", seed, 0.15)
        cell("visual-kd", seed, 0.25 + seed)
        cell("fusion-kd", seed, 0.45 + seed)
    cell("visual-mse-features", 0, 0.9)      # seed 1 never finished: not a row
    res = results(tmp_path)
    assert res["test_waf"]["visual/random"] == [0.2, 0.3]
    assert res["test_waf"]["visual/kd"] == [0.25, 1.25] and res["cv_waf"]["fusion/kd"] == [0.46, 1.46]
    assert res["test_waf"]["visual/kd@last"] == [0.15, 1.25]      # seed 0's own last step; seed 1's guard kept it
    assert "fusion/kd@last" not in res["test_waf"]                 # seed 0's fusion on the last step never ran
    assert "visual/mse-features" not in res["test_waf"]
    assert res["encoder_step"] == {"infonce": [240, 0], "kd": [100, 240]}
    # the overview: minus random init per objective, bold under the never-hurt line, the guard's probe marked
    (tmp_path / "align" / "kd-seed0" / "config.yaml").write_text("loss: [kd]\nguard: {enabled: true}\n")
    from robustness_matrix import overview

    def matrix():       # the overview of the dir as it is now (the lines below change its files)
        return "\n".join(overview({"r": tmp_path}, {"r": results(tmp_path)}))
    table = matrix()
    assert "| KD | +0.500 / +0.500 † |" in table                    # (0.25+1.25)/2 - 0.25; a linear-probe guard
    assert "| KD, last step |" not in table                         # seed 0's fusion on its last step never ran
    (tmp_path / "models" / "fusion-kd-last-seed0").mkdir()
    (tmp_path / "models" / "fusion-kd-last-seed0" / "metrics.json").write_text('{"test_waf": 0.1, "cv_waf": 0.1}')
    assert "| KD, last step | +0.450 / +0.325 |" in matrix()
    (tmp_path / "models" / "fusion-kd-last-seed0" / "metrics.json").write_text('{"test_waf": -1.0, "cv_waf": 0.1}')
    assert "| KD, last step | +0.450 / **-0.225** |" in matrix()
    assert "in 0 of 0 runs." in table                               # the tally counts head-probe guards only
    (tmp_path / "align" / "kd-seed0" / "config.yaml").write_text("loss: [kd]\nguard: {enabled: true, probe: head}\n")
    assert "in 2 of 2 runs." in matrix()     # seed 0 kept 0.25 over the last step's 0.15
    (tmp_path / "models" / "visual-kd-last-seed0" / "metrics.json").write_text('{"test_waf": 0.5, "cv_waf": 0.1}')
    assert "in 1 of 2 runs; its misses: r kd seed 0: -0.250." in matrix()


def test_matrix_pseudo_rows_pair_each_seed_with_its_control(tmp_path):
    """The pseudo-label table reads each seed's round and its control, and only seeds where all four runs finished."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from robustness_matrix import pseudo, pseudo_rows, results

    demo, st = tmp_path / "demo", tmp_path / "st"
    demo.mkdir()
    (demo / "results.json").write_text(json.dumps({"test_waf": {
        "visual/random": [0.2, 0.3], "fusion/random": [0.4, 0.5], "visual/infonce": [0.2, 0.4],
        "fusion/infonce": [0.4, 0.6]}, "cv_waf": {}}))
    for seed in (0, 1):
        for kind, fusion, visual in (("pseudo", {"test_waf": 0.9, "encoders_test_waf": 0.7}, 0.6),
                                     ("control", {"test_waf": 0.45}, 0.25)):
            (st / f"{kind}-seed{seed}").mkdir(parents=True)
            (st / f"{kind}-seed{seed}" / "rounds.json").write_text(json.dumps([{"test_waf": 0.0}, fusion]))
            if seed == 0:                     # seed 1's visual-only finetunes never ran
                (st / f"visual-{kind}-seed{seed}").mkdir()
                (st / f"visual-{kind}-seed{seed}" / "metrics.json").write_text(json.dumps({"test_waf": visual}))
    table = "\n".join(pseudo(*pseudo_rows(results(demo)["test_waf"], st)))
    assert "(1 seeds: 0)" in table
    assert "| InfoNCE + pseudo-labels from fusion | 0.600 ± " in table and "| +0.400 | 0.700 ± " in table
    assert "| control: the same alignment, no pseudo-labels | 0.250 ± " in table and "| +0.050 | 0.450 ± " in table
    # the overview's rows for it, with how many of the regime's seeds finished
    from robustness_matrix import overview
    (demo / "align" / "infonce-seed0").mkdir(parents=True)
    (demo / "align" / "infonce-seed0" / "config.yaml").write_text("loss: [infonce]\nguard: {enabled: true, probe: head}\n")
    table = "\n".join(overview({"r": demo}, {"r": results(demo)}, {"r": pseudo_rows(results(demo)["test_waf"], st)}))
    assert "| InfoNCE + pseudo-labels (one self-train round) | +0.400 / +0.300 (1 of 2 seeds) |" in table
    assert "| its control (the same steps, no pseudo-labels) | +0.050 / +0.050 (1 of 2 seeds) |" in table


def test_matrix_self_training_record_counts_where_the_guard_agreed_with_the_test():
    """A kept round that lowered test WAF is a miss; a rejected round that would have lowered it, and a kept one
    that raised it, agree; the kept round's test WAF is what the product returns."""
    from robustness_matrix import self_training

    def run(seed, change, guard):
        return {"view": "fusion", "seed": seed, "kept_round": int(guard == "kept"), "rows": [
            {"round": 0, "test_waf": 0.40, "guard": "start"},
            {"round": 1, "test_waf": 0.40 + change, "guard": guard, "guard_gain": 0.02, "kept": 90,
             "precision": 0.5, "expected_precision": 0.55}]}
    res = {"self_train": [run(0, 0.03, "kept"), run(1, -0.02, "kept"), run(2, -0.04, "rejected")],
           "test_waf": {"self-train/fusion": [0.43, 0.38, 0.40]}}
    text = "\n".join(self_training(res))
    assert "agreed with the hidden test in 2 of 3 rounds" in text
    assert "| fusion | 1 | 1 | 90 | 0.500 (0.550) | -0.020 | kept (+0.020) | **no** |" in text
    assert "| fusion | 0.403 ± 0.025 | 0.430, 0.380, 0.400 | +0.003 |" in text
    assert self_training({"test_waf": {}}) == []
