"""The README's demo command, at a reduced size: every stage runs and the table comes out."""
from conftest import run_cli


def test_demo_small(tmp_path):
    p = run_cli("demo", "--out", tmp_path / "demo", "synth.num_labeled=60", "synth.num_unlabeled=60",
                "synth.num_test=24", "synth.height=32", "synth.width=32", "synth.seconds=1.2", "align_steps=12",
                "folds=2", timeout=900)
    table = (tmp_path / "demo" / "RESULTS.md").read_text()
    for row in "abcdefg":
        assert f"| ({row}) |" in table
    assert "mlflow ui --backend-store-uri sqlite:///" in p.stdout
    assert (tmp_path / "demo" / "align" / "encoder.pt").is_file() and (tmp_path / "demo" / "mlflow.db").is_file()
