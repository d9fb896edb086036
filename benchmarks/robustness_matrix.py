"""The robustness matrix of RESULTS.md (#19) from `mer-dist demo` runs, one per corpus regime.

    python benchmarks/robustness_matrix.py emotion=runs/m-emotion nuisance=runs/m-nuisance oracle=runs/m-oracle \
        mute=runs/m-mute mute+pseudo=runs/m-mute-st

Each DIR is a demo output (`results.json`, `corpus/`). Per regime: the Bayes ceilings of the corpus, the
single-modality rows, then visual-only and fusion test WAF (mean ± sd over the seeds, each seed a whole
replicate) of every encoder against random init, and the guard's choice per seed; first, an overview of every
objective x regime with the never-hurt check."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from mer_dist.eval.ceiling import ceiling
from mer_dist.stages.demo import SINGLE
from mer_dist.eval.ablation import mean_sd, row, verdict


def _cells(folder: Path) -> dict[tuple[str, int], dict]:
    """(row, seed) -> metrics of every fine-tuning run in a demo dir (models/<row>-seed<s>/metrics.json). A guarded
    variant whose guard kept the last step has no "-last" run: its cell is the guarded one, as the demo counts it."""
    cells: dict[tuple[str, int], dict] = {}
    for m in (folder / "models").glob("*-seed*/metrics.json"):
        row, seed = m.parent.name.rsplit("-seed", 1)
        cells[(row, int(seed))] = json.loads(m.read_text())
    for summ in (folder / "align").glob("*-seed*/summary.json"):
        v, s = summ.parent.name.rsplit("-seed", 1)
        if json.loads(summ.read_text()).get("guard") and not (summ.parent / "encoder-last.pt").is_file():
            for kind in ("visual", "fusion"):
                if (f"{kind}-{v}", int(s)) in cells:
                    cells.setdefault((f"{kind}-{v}-last", int(s)), cells[(f"{kind}-{v}", int(s))])
    return cells


def _key(row: str) -> str:
    """A models/ folder's row name as results.json names it: visual-kd-last -> visual/kd@last."""
    key = row.replace("-", "/", 1) if row.startswith(("visual-", "fusion-")) else row
    return key[:-5] + "@last" if key.endswith("-last") else key


def results(folder: Path) -> dict:
    """The demo's results.json, with the rows of cells run into the same dir after it (the stages by hand, with the
    demo's overrides: RESULTS.md says which) where every seed finished. A demo stopped before its end: the rows
    of the seeds every row finished."""
    cells = _cells(folder)
    rows = {r for r, _ in cells}
    if (folder / "results.json").is_file():
        res = json.loads((folder / "results.json").read_text())
        seeds = list(range(len(res["test_waf"]["visual/random"])))
    else:
        res = {"test_waf": {}, "cv_waf": {}, "encoder_step": {}}
        seeds = [s for s in sorted({s for _, s in cells}) if all((r, s) in cells for r in rows)]
    for r in sorted(rows):
        if _key(r) not in res["test_waf"] and all((r, s) in cells for s in seeds):
            res["test_waf"][_key(r)] = [cells[(r, s)]["test_waf"] for s in seeds]
            res["cv_waf"][_key(r)] = [cells[(r, s)]["cv_waf"] for s in seeds]
    steps = res.setdefault("encoder_step", {})
    for v in sorted({_key(r).split("/", 1)[1] for r in rows if r.startswith("visual-") and not r.endswith("-last")}):
        summaries = [folder / "align" / f"{v}-seed{s}" / "summary.json" for s in seeds]
        if v not in steps and f"visual/{v}" in res["test_waf"] and all(p.is_file() for p in summaries):
            steps[v] = [json.loads(p.read_text()).get("encoder_step") for p in summaries]
    return res


def _align_config(folder: Path, variant: str) -> dict:
    """A variant's seed-0 alignment config (its seeds differ only in train.seed)."""
    return yaml.safe_load((folder / "align" / f"{variant}-seed0" / "config.yaml").read_text())


def _probe(cfg: dict) -> str | None:
    """The run's guard probe: "head", or "linear" for older commits (no guard.probe then); None: no guard."""
    guard = cfg.get("guard", {})
    return guard.get("probe", "linear") if guard.get("enabled") else None


def _variant(waf: dict, name: str) -> str:
    """`name` as this dir's runs call it (runs of older commits named some variants otherwise: OLD_NAMES)."""
    return next((v for v in (name, OLD_NAMES.get(name, name)) if f"visual/{v}" in waf), name)


def _signed(x: float) -> str:
    """+0.143; a difference that rounds to zero is +0.000, not -0.000."""
    return f"{x:+.3f}".replace("-0.000", "+0.000")


def describe(folder: Path, key: str) -> str:
    """A row's encoder, from its seed-0 run's config.yaml (runs of older commits name their variants otherwise, and
    their guard used the linear probe: a config without guard.probe is one of those)."""
    a = _align_config(folder, key.split("@")[0])
    what = "InfoNCE, shuffled audio-video pairs (control)" if a.get("pairing") == "shuffled" else \
        "InfoNCE onto the teacher's clip emotion posteriors" if a.get("infonce_target") == "posteriors" else \
        " + ".join({"infonce": "InfoNCE", "kd": "KD of the teacher's frame + utterance posteriors",
                    "mse": f"MSE onto the teacher's {a.get('target_space', 'features')}",
                    "views": "two augmented views (no teacher)"}.get(x, x) for x in a["loss"])
    if key.endswith("@last"):
        return f"{what}, no guard (the same runs' last step)"
    probe = _probe(a)
    if probe is None:
        return f"{what}, no guard"
    default = "; **today's default**" if probe == "head" and what == "InfoNCE" else ""
    return f"{what}, with the guard ({probe} probe{default})"


def regime(name: str, folder: Path, res: dict) -> list[str]:
    """A regime's section; RES is `results(folder)`."""
    waf, cv, steps = res["test_waf"], res["cv_waf"], res["encoder_step"]
    c = ceiling(folder / "corpus")
    lines = [f"### {name}", "", "Bayes ceilings (test-free, every clip): " +
             ", ".join(f"{k} {v:.2f}" for k, v in c.items()), "",
             "| row | test WAF | per seed |", "|---|---|---|"]
    lines += [row(desc, waf[key]) for key, desc, *_ in SINGLE if key in waf]
    for kind in ("visual", "fusion"):
        rand = waf[f"{kind}/random"]
        lines += ["", {"visual": "visual only (frozen encoder)", "fusion": "fusion a+v+t"}[kind], "",
                  "| encoder | test WAF | per seed | minus random init | CV verdict (ablate's rule) |", "|---|---|---|---|---|"]
        for key in sorted((k.split("/", 1)[1] for k in waf if k.startswith(f"{kind}/")), key=lambda k: k != "random"):
            desc = "random-init encoder" if key == "random" else describe(folder, key)
            m, sd = mean_sd(waf[f"{kind}/{key}"])
            diff = m - mean_sd(rand)[0]
            word = "" if key == "random" else verdict(cv[f"{kind}/{key}"], cv[f"{kind}/random"])[0]
            lines.append(f"| {desc} | {m:.3f} ± {sd:.3f} | {', '.join(f'{v:.3f}' for v in waf[f'{kind}/{key}'])} | "
                         f"{_signed(diff)} | {word} |")
    lines += ["", "guard's choice per seed (encoder.pt's step; 0 = the initial encoder): " +
              "; ".join(f"{v}: {s}" for v, s in steps.items())]
    return lines


OBJECTIVES = [  # (row key, what it is) in the overview's order; "@last": the guarded runs' final step
    ("infonce", "InfoNCE (today's default with the head-probe guard)"), ("infonce@last", "InfoNCE, last step"),
    ("kd", "KD"), ("kd@last", "KD, last step"), ("mse-features", "MSE onto features"),
    ("mse-features@last", "MSE onto features, last step"), ("posteriors", "InfoNCE onto posteriors"),
    ("posteriors@last", "InfoNCE onto posteriors, last step"), ("views", "two views (no teacher)"),
    ("views@last", "two views, last step"), ("views+infonce", "two views + InfoNCE"),
    ("views+infonce@last", "two views + InfoNCE, last step"), ("shuffled", "shuffled pairs (control)")]
OLD_NAMES = {"infonce": "infonce-guard"}    # a variant's name in runs of older commits


def _diffs(d: list[float]) -> str:
    """"+0.143 / **-0.027**": differences from random init, bold under the never-hurt line (-0.01)."""
    return " / ".join(f"**{x:+.3f}**" if x < -0.01 else _signed(x) for x in d)


def overview(regimes: dict[str, Path], res: dict[str, dict], rounds: dict[str, tuple] | None = None) -> list[str]:
    """Objectives x regimes: visual-only / fusion test WAF minus random init (mean over the seeds). A value under
    -0.01 (the never-hurt line) is bold; a run's guard is marked: none = the head probe (today's), † = the linear
    probe (older commits), ° = no guard; "last step" rows are the guarded runs' final encoders, unguarded. RES is
    {regime: `results(folder)`}; ROUNDS ({regime: `pseudo_rows(...)`}) adds the pseudo-label round and its control."""
    lines = ["| objective | " + " | ".join(f"{n} ({len(r['test_waf']['visual/random'])} seeds)" for n, r in res.items())
             + " |", "|---|" + "---|" * len(res)]
    for key, what in OBJECTIVES:
        cells = []
        for name, r in res.items():
            base, _, last = key.partition("@")
            base = _variant(r["test_waf"], base)
            k = base + ("@" + last if last else "")
            if not all(f"{m}/{k}" in r["test_waf"] for m in ("visual", "fusion")):
                cells.append("")
                continue
            d = [mean_sd(r["test_waf"][f"{m}/{k}"])[0] - mean_sd(r["test_waf"][f"{m}/random"])[0]
                 for m in ("visual", "fusion")]
            mark = "" if last or base == "shuffled" else \
                {None: " °", "linear": " †"}.get(_probe(_align_config(regimes[name], base)), "")
            cells.append(_diffs(d) + mark)
        if any(cells):
            lines.append(f"| {what} | " + " | ".join(cells) + " |")
    for what, label in ((PSEUDO, "InfoNCE + pseudo-labels (one self-train round)"), (CONTROL, "its control (the same steps, no pseudo-labels)")):
        cells = []
        for name in res:
            seeds, rows = (rounds or {}).get(name, ([], {}))
            d = [mean_sd(rows[k][what])[0] - mean_sd(rows[k]["random-init encoder"])[0] for k in ("visual", "fusion")] \
                if seeds else []
            n = len(res[name]["test_waf"]["visual/random"])
            cells.append(_diffs(d)
                         + (f" ({len(seeds)} of {n} seeds)" if d and len(seeds) < n else ""))
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + ["", guard_tally(regimes, res)]


def guard_tally(regimes: dict[str, Path], res: dict[str, dict]) -> str:
    """How often the head-probe guard kept the encoder with the higher visual-only test WAF (which it never sees) than
    the same run's last step, a difference under 0.01 counting as right; what its misses cost."""
    right, misses, total = 0, [], 0
    for name, r in res.items():
        waf = r["test_waf"]
        for key in (k.split("/", 1)[1] for k in waf if k.startswith("visual/") and k.endswith("@last")):
            base = key[:-5]
            if _probe(_align_config(regimes[name], base)) != "head":
                continue
            for s, (kept, last) in enumerate(zip(waf[f"visual/{base}"], waf[f"visual/{key}"])):
                total += 1
                if kept >= last - 0.01:
                    right += 1
                else:
                    misses.append(f"{name} {base} seed {s}: {_signed(kept - last)}")
    return (f"The head-probe guard kept the encoder with the higher visual-only test WAF (within 0.01) in {right} of "
            f"{total} runs" + (f"; its misses: {'; '.join(misses)}" if misses else "") + ".")


PSEUDO, CONTROL = "InfoNCE + pseudo-labels from fusion", "control: the same alignment, no pseudo-labels"


def pseudo_rows(waf: dict, st: Path) -> tuple[list[int], dict[str, dict[str, list[float]]]]:
    """InfoNCE + pseudo-labels against its control, from one `self-train encoders=[visual]` round per seed into
    ST (pseudo-seed<s>/, control-seed<s>/ with control=true) started from the demo's default encoder and fusion
    model, and a visual-only finetune on each round's encoder (visual-pseudo-seed<s>/, visual-control-seed<s>/):
    the seeds where all four finished, and {visual|fusion: {row: test WAF per seed}}; WAF is the demo's
    `results()["test_waf"]`. Fusion is the round's model on the new encoder before the head's own pseudo-labels
    (the control has none)."""
    default = _variant(waf, "infonce")
    seeds = [s for s in range(len(waf["visual/random"])) if all(
        (st / f).is_file() for f in (f"pseudo-seed{s}/rounds.json", f"control-seed{s}/rounds.json",
                                     f"visual-pseudo-seed{s}/metrics.json", f"visual-control-seed{s}/metrics.json"))]
    rows = {kind: {"random-init encoder": [waf[f"{kind}/random"][s] for s in seeds],
                   "InfoNCE + guard (the round's start)": [waf[f"{kind}/{default}"][s] for s in seeds]}
            for kind in ("visual", "fusion")}
    for k, what in (("pseudo", PSEUDO), ("control", CONTROL)):
        rows["visual"][what] = [json.loads((st / f"visual-{k}-seed{s}" / "metrics.json").read_text())["test_waf"]
                                for s in seeds]
        rows["fusion"][what] = [(lambda r: r.get("encoders_test_waf", r["test_waf"]))(
            json.loads((st / f"{k}-seed{s}" / "rounds.json").read_text())[-1]) for s in seeds]
    return seeds, rows


def pseudo(seeds: list[int], rows: dict[str, dict[str, list[float]]]) -> list[str]:
    """The pseudo-label table of a regime from `pseudo_rows`' SEEDS and ROWS, mean ± sd and minus random init."""
    if not seeds:
        return []
    lines = [f"InfoNCE + pseudo-labels ({len(seeds)} seeds: {', '.join(map(str, seeds))})", "",
             "| encoder | visual only | per seed | minus random init | fusion a+v+t | per seed | minus random init |",
             "|---|---|---|---|---|---|---|"]
    for what in rows["visual"]:
        cells = []
        for kind in ("visual", "fusion"):
            m, sd = mean_sd(rows[kind][what])
            cells += [f"{m:.3f} ± {sd:.3f}", ", ".join(f"{v:.3f}" for v in rows[kind][what]),
                      _signed(m - mean_sd(rows[kind]['random-init encoder'])[0])]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    return lines


def self_training(res: dict) -> list[str]:
    """The demo's guarded self-training rounds of a regime (results.json "self_train"), per variant and seed: the
    pseudo-labels (true precision from the generator's truth, and the precision calibration expected), the test
    WAF change each round would have made, and the guard's decision -- which agrees with the hidden test when it
    kept a round the test says helped or rejected one the test says did not (a change under 0.005 counts either
    way). Last, the guard's record over every round."""
    runs = res.get("self_train") or []
    if not runs:
        return []
    lines = ["guarded self-training from the default fusion model (round 0); the round the guard keeps is what "
             "the product returns", "",
             "| variant | seed | round | pseudo-labels kept | precision (expected) | test WAF change | guard | "
             "agrees with test |", "|---|---|---|---|---|---|---|---|"]
    agree, total = 0, 0
    for run in runs:
        start = run["rows"][0]["test_waf"]
        for r in run["rows"][1:]:
            change = r["test_waf"] - start
            kept = r.get("guard") == "kept"
            ok = abs(change) < 0.005 or (change > 0) == kept
            agree, total = agree + ok, total + 1
            prec = f"{r['precision']:.3f}" if r.get("precision", -1) >= 0 else "n/a"
            exp = f" ({r['expected_precision']:.3f})" if r.get("expected_precision", -1) >= 0 else ""
            lines.append(f"| {run['view']} | {run['seed']} | {r['round']} | {r.get('kept', 0)} | {prec}{exp} | "
                         f"{_signed(change)} | {r.get('guard', '-')} ({_signed(r.get('guard_gain', 0.0))}) | "
                         f"{'yes' if ok else '**no**'} |")
    views = sorted({run["view"] for run in runs})
    lines += ["", "| variant | test WAF of the round kept | per seed | minus the start (fusion, default encoder) |",
              "|---|---|---|---|"]
    for v in views:
        kept = res["test_waf"].get(f"self-train/{v}", [])
        start = [run["rows"][0]["test_waf"] for run in runs if run["view"] == v]
        m, sd = mean_sd(kept)
        lines.append(f"| {v} | {m:.3f} ± {sd:.3f} | {', '.join(f'{x:.3f}' for x in kept)} | "
                     f"{_signed(m - mean_sd(start)[0])} |")
    return lines + ["", f"The self-training guard agreed with the hidden test in {agree} of {total} rounds."]


if __name__ == "__main__":
    args = [arg.split("=", 1) for arg in sys.argv[1:]]      # NAME=DEMO_DIR, or NAME+pseudo=SELF_TRAIN_DIR
    regimes = {name: Path(folder) for name, folder in args if not name.endswith("+pseudo")}
    res = {name: results(folder) for name, folder in regimes.items()}      # each dir read once
    rounds = {name[:-7]: pseudo_rows(res[name[:-7]]["test_waf"], Path(st)) for name, st in args if name.endswith("+pseudo")}
    out = ["visual only / fusion a+v+t, test WAF minus random init:", ""] + overview(regimes, res, rounds) + [""]
    for name, folder in regimes.items():
        out += regime(name, folder, res[name]) + [""] + (pseudo(*rounds[name]) + [""] if name in rounds else [])
        out += self_training(res[name]) + [""] if res[name].get("self_train") else []
    print("\n".join(out))
