import numpy as np

from mer_dist.data.splits import holdout, kfold
from mer_dist.eval.metrics import summary


def test_summary_hand_built():
    """Known values: 4 clips, classes 0 and 1 only; one class-0 clip predicted as 1."""
    s = summary([0, 0, 1, 1], [0, 1, 1, 1])
    f0, f1 = 2 * 1 * 0.5 / 1.5, 2 * (2 / 3) * 1 / (2 / 3 + 1)
    assert np.isclose(s["waf"], (f0 + f1) / 2) and np.isclose(s["accuracy"], 0.75)
    assert s["confusion"][0][:2] == [1, 1] and s["confusion"][1][:2] == [0, 2] and s["n"] == 4
    assert s["per_class"]["neutral"]["recall"] == 0.5 and s["per_class"]["angry"]["precision"] == 2 / 3
    assert s["per_class"]["sad"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0.0}
    assert np.isclose(s["macro_f1"], (f0 + f1) / 2)          # over the classes that occur
    assert summary([], [])["waf"] == 0.0 and summary([1], [1])["accuracy"] == 1.0


def test_kfold_disjoint_cover():
    names = [f"s{i:03d}" for i in range(60)]
    y = np.arange(60) % 6
    folds = kfold(names, y, 5, 0)
    vals = np.concatenate([va for _, va in folds])
    assert sorted(vals) == list(range(60))
    for tr, va in folds:
        assert not set(tr) & set(va) and len(tr) + len(va) == 60
    a, b = holdout(names, y, 0.25, 1)
    assert not set(a) & set(b) and len(b) == 15
