import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from mer_dist.data.splits import holdout, kfold
from mer_dist.eval.metrics import summary


def test_agrees_with_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y, p = rng.integers(0, 6, 50), rng.integers(0, 6, 50)
        y[:3] = 0  # uneven classes
        s = summary(y, p)
        assert np.isclose(s["waf"], f1_score(y, p, average="weighted"))
        assert np.isclose(s["macro_f1"], f1_score(y, p, average="macro"))
        assert np.isclose(s["accuracy"], accuracy_score(y, p))
        assert np.allclose([s["per_class"][k]["f1"] for k in s["per_class"]], f1_score(y, p, average=None, labels=range(6)))


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
