"""`mer-dist finetune`: fusion classifier on the labeled split, K-fold cross-validated.

Features of the frozen encoders come from the cache (extracted once, shared over ranks). Folds are
spread over ranks (fold k on rank k mod W); each fold keeps its best epoch by validation WAF, and test
probabilities are the fold ensemble's (`evaluate.predict`). With `pseudo=P`, the pseudo-labelled clips
of `mer-dist pseudo-label` join the *training* part of every fold -- never a validation part, never
the test split (unless `transductive=true`, which is tagged on the run).
"""
from __future__ import annotations

import copy
import shutil
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mer_dist import dist
from mer_dist.config import (
    LABELS,
    EvaluateConfig,
    FinetuneConfig,
    save,
    to_dict,
)
from mer_dist.data.ingest import shard_urls
from mer_dist.data.splits import holdout, kfold
from mer_dist.eval import plots
from mer_dist.eval.evaluate import load_model, predict, report
from mer_dist.eval.metrics import majority_waf, summary
from mer_dist.features import Encoders, extract, frames, index, specs_for
from mer_dist.io import write_json_atomic
from mer_dist.models.fusion import FusionModel, VisualFusion
from mer_dist.tracking import Tracker
from mer_dist.train.losses import soft_cross_entropy
from mer_dist.train.pseudo import as_targets, read_pseudo, refuse_labeled, select, unreadable



def cache_dir(cfg: FinetuneConfig) -> Path:
    return Path(cfg.cache) if cfg.cache else Path(cfg.data.shards).resolve().parent / "feature-cache"


def pseudo_sets(cfg: FinetuneConfig, n_folds: int
                ) -> tuple[list[str], list[str], list[tuple[np.ndarray, np.ndarray]], bool]:
    """(candidate clip names, their views, per fold (indices into them, probabilities), cross-fitted?).

    Cross-fitting: when the pseudo-labels came from a model with the same folds (same seed and K), fold k
    takes the clips that *its own* previous-round model selects, with that model's probabilities. That model
    never saw fold k's validation clips, so no validation label leaks into fold k's training through the
    pseudo-labels (the ensemble saw every labeled clip). Otherwise every fold gets the ensemble's pseudo.csv."""
    pnames, pprobs, pviews = read_pseudo(cfg.pseudo)
    folder = Path(cfg.pseudo)
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
    if (folder / "folds.npz").is_file() and summary.get("folds") == {"seed": cfg.seed, "folds": n_folds}:
        z = np.load(folder / "folds.npz", allow_pickle=False)
        cand, probs = [str(n) for n in z["names"]], z["probs"]
        views = [str(v) for v in z["views"]] if "views" in z else [""] * len(cand)
        kept = set(zip(pnames, pviews))     # agree_with filtered the ensemble's selection: keep only those clips
        allowed = np.array([key in kept for key in zip(cand, views)]) if summary.get("agree_with") \
            else np.ones(len(cand), bool)
        sets = []
        for k in range(n_folds):
            idx = np.array([i for i in select(probs[k], summary["threshold"], summary["top_per_class"]) if allowed[i]],
                           dtype=int)
            sets.append((idx, probs[k][idx]))
        return cand, views, sets, True
    if cfg.folds > 1:
        print(f"finetune: {cfg.pseudo} comes from other folds than this run's (seed {cfg.seed}, {n_folds} folds): "
              f"every fold uses the ensemble's pseudo-labels, so CV WAF is optimistic; test WAF is not affected")
    return pnames, pviews, [(np.arange(len(pnames)), pprobs)] * n_folds, False


def view_mask(views: list[str], modalities: list[str]) -> np.ndarray:
    """[N, M] bool: which of the run's modalities a pseudo-labelled row may show ("" = all of them)."""
    return np.array([[not v or m in v for m in modalities] for v in views], bool).reshape(len(views), len(modalities))


def training_set(cfg: FinetuneConfig, names, y, feats, present, n_folds: int, rank: int, world: int) -> dict:
    """Labeled clips (index < n_labeled) + the candidate pseudo-labelled ones after them, with one-hot targets
    and weights for the labeled ones; `pseudo[k]` = (row indices, target rows) of fold k's pseudo-labels."""
    n = len(y)
    target = np.eye(len(LABELS))[y]
    weight = np.ones(n)          # class weights, when asked, are the fold's own (train_fold)
    info: dict = {"n_pseudo": 0, "pseudo": [(np.zeros(0, int), np.zeros((0, len(LABELS))))] * n_folds}
    clips = None
    if cfg.visual_train != "frozen":      # decoded frames of every training clip, for the encoder that trains
        clips = _frames(cfg, "train", names, rank)
    if cfg.pseudo:
        cand, views, sets, crossfit = pseudo_sets(cfg, n_folds)
        refuse_labeled(cfg.pseudo, cand, names)
        test = set(index(cfg.data.shards, cfg.test_split)[0]) if cfg.test_split else set()
        is_test = np.array([nm in test for nm in cand], bool)
        used_test = is_test[np.unique(np.concatenate([idx for idx, _ in sets]))].sum() if len(cand) else 0
        if used_test and not cfg.transductive:
            print(f"finetune: {used_test} pseudo-labelled clip(s) are test clips: left out (transductive=true uses them)")
            sets = [(idx[~is_test[idx]], pr[~is_test[idx]]) for idx, pr in sets]
        un_names, _, un_feats, un_present = extract(Encoders(specs_for(cfg), cfg.data.height), cfg.modalities,
                                                    cfg.data.shards, cfg.pseudo_split, cfg.data, cache_dir(cfg),
                                                    rank, world)
        where = {nm: k for k, nm in enumerate(un_names)}
        used = np.unique(np.concatenate([idx for idx, _ in sets])).astype(int)     # test clips left out are not
        skip = unreadable(cfg.pseudo, [cand[i] for i in used], set(where), cfg.data.shards, cfg.pseudo_split,
                          "finetune")
        sel = np.array([where.get(nm, 0) for nm in cand], dtype=int)     # an unused row's features are never read
        # co-training rows show only their view's modalities; a row left with none (its view is a modality this
        # run lacks, or the clip lacks it) is not trained on, nor is a clip this stage could not read
        cand_present = un_present[sel] & view_mask(views, cfg.modalities)
        usable = cand_present.any(1) & np.array([nm not in skip for nm in cand], bool)
        sets = [(idx[usable[idx]], pr[usable[idx]]) for idx, pr in sets]
        feats = {m: np.concatenate([f, un_feats[m][sel]]) for m, f in feats.items()}
        present = np.concatenate([present, cand_present])
        target = np.concatenate([target, np.zeros((len(sel), len(LABELS)))])
        weight = np.concatenate([weight, np.full(len(sel), cfg.pseudo_weight)])
        info = {"pseudo": [(n + idx, as_targets(pr, cfg.pseudo_soft)) for idx, pr in sets],
                "n_pseudo": int(np.mean([len(idx) for idx, _ in sets])), "pseudo_crossfit": crossfit,
                "pseudo_test_clips": int(used_test) if cfg.transductive else 0}
        if clips is not None:
            clips = np.concatenate([clips, _frames(cfg, cfg.pseudo_split, un_names, rank)[sel]])
    return {"feats": feats, "present": present, "target": target.astype(np.float32),
            "weight": weight.astype(np.float32), "n_labeled": n, "frames": clips, **info}


def _frames(cfg: FinetuneConfig, split: str, names: list[str], rank: int) -> np.ndarray:
    """Frames of a split in `names` order (rank 0 decodes into the cache, then everyone maps it)."""
    got, arr = frames(cfg.data.shards, split, cfg.data, cache_dir(cfg), rank)
    assert got == names, f"{split}: frame cache and feature index disagree"
    return arr


def visual_encoder(cfg: FinetuneConfig, encoders: Encoders):
    """The encoder that trains with the fusion model: the one `visual` names (aligned or random init)."""
    from mer_dist.models.visual import load_encoder
    return (encoders.build("v") if cfg.visual == "random" else load_encoder(cfg.visual)).train()


def fold_train_indices(tr: np.ndarray, ts: dict, k: int) -> np.ndarray:
    """Fold k trains on its labeled part and on its pseudo-labelled clips (rows after the labeled ones)."""
    return np.concatenate([tr, ts["pseudo"][k][0]]).astype(int)


def train_fold(cfg: FinetuneConfig, ts: dict, y: np.ndarray, tr: np.ndarray, va: np.ndarray, k: int,
               seed: int, encoder=None) -> tuple[dict, list[dict], float, np.ndarray]:
    """One fold: labeled `tr` + every pseudo-labelled clip train, labeled `va` validates. Returns the best epoch's
    (state, history, validation WAF, validation probabilities). With an `encoder` (visual_train=top_k|full) a
    copy of it trains too and the state holds both."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    feats, present = ts["feats"], ts["present"]
    model = FusionModel({m: f.shape[1] for m, f in feats.items()}, cfg.fusion)
    groups = [{"params": list(model.parameters()), "lr": cfg.lr}]
    if encoder is not None:
        model = VisualFusion(copy.deepcopy(encoder), model)
        groups += model.encoder.trainable_groups(cfg.visual_train, cfg.visual_top_k, cfg.visual_lr, cfg.visual_lr_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    x = {m: torch.from_numpy(f) for m, f in feats.items()}
    clips = ts["frames"]

    def forward(idx: np.ndarray):
        f = {m: v[idx] for m, v in x.items()}
        if encoder is None:
            return model(f, p[idx])
        return model(f, p[idx], torch.from_numpy(np.array(clips[idx])))

    @torch.no_grad()
    def val_probs() -> np.ndarray:
        model.eval()
        return torch.cat([forward(va[i:i + 64]).softmax(-1) for i in range(0, len(va), 64)]).numpy()
    idx_k, target_k = ts["pseudo"][k]
    q = ts["target"].copy()
    q[idx_k] = target_k                       # this fold's pseudo-labels
    w = ts["weight"].copy()
    if cfg.class_weights:                     # from this fold's training labels only, as before pseudo-labels
        counts = np.bincount(y[tr], minlength=len(LABELS)).astype(float)
        w[:ts["n_labeled"]] = (counts.sum() / np.maximum(counts, 1) / len(LABELS))[y]
    p, q, w = torch.from_numpy(present), torch.from_numpy(q), torch.from_numpy(w)
    train_idx = fold_train_indices(tr, ts, k)
    best, best_state, history = -1.0, None, []
    # an encoder that trains makes an epoch minutes long at real size: show epochs then
    for epoch in tqdm(range(cfg.epochs), desc=f"finetune: fold {k}", unit="epoch", leave=False, disable=encoder is None):
        model.train()
        order = rng.permutation(train_idx)
        losses = []
        for i in range(0, len(order), cfg.batch_size):
            idx = np.sort(order[i:i + cfg.batch_size])
            loss = soft_cross_entropy(forward(idx), q[idx], w[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        probs = val_probs()
        val = summary(y[va], probs.argmax(1))
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_waf": val["waf"]})
        if val["waf"] > best:
            best, best_state, best_probs = val["waf"], copy.deepcopy(model.state_dict()), probs
    return best_state, history, best, best_probs


def _mlflow_model(cfg: FinetuneConfig, out: Path) -> Path:
    """The fold ensemble as an MLflow model directory (out/mlflow-model), its input example one training clip."""
    from webdataset.tariterators import tarfile_samples

    from mer_dist import serve
    url = shard_urls(cfg.data.shards, "train")[0]
    example = next((s[k] for s in tarfile_samples([{"url": url}]) for k in s if k in ("mp4", "avi", "mkv", "webm", "mov")),
                   b"")
    shutil.rmtree(out / "mlflow-model", ignore_errors=True)
    return serve.save(out, out / "mlflow-model", example)


def run(cfg: FinetuneConfig) -> dict:
    env = dist.setup()
    out = Path(cfg.out)
    encoders = Encoders(specs_for(cfg), cfg.data.height)
    names, y, feats, present = extract(encoders, cfg.modalities, cfg.data.shards, "train", cfg.data, cache_dir(cfg),
                                       env.rank, env.world_size)
    keep = y >= 0
    if not keep.all():
        raise ValueError(f"{cfg.data.shards}: {int((~keep).sum())} train sample(s) without a label")
    splits = kfold(names, y, cfg.folds, cfg.seed) if cfg.folds > 1 else [holdout(names, y, cfg.val_fraction, cfg.seed)]
    ts = training_set(cfg, names, y, feats, present, len(splits), env.rank, env.world_size)
    encoder = visual_encoder(cfg, encoders) if cfg.visual_train != "frozen" else None
    mine = [k for k in range(len(splits)) if k % env.world_size == env.rank]
    results = {}
    for k in tqdm(mine, desc="finetune: folds", unit="fold", disable=not env.is_main):
        tr, va = splits[k]
        results[k] = train_fold(cfg, ts, y, tr, va, k, cfg.seed * 1000 + k, encoder)
    gathered = {}
    for part in dist.all_gather_object(results):
        gathered.update(part)
    metrics: dict = {}
    tracker = None
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dims = {m: f.shape[1] for m, f in feats.items()}
        oof = np.zeros((len(y), len(LABELS)))
        states = [gathered[k][0] for k in range(len(splits))]
        fusion_states = [{k[len("fusion."):]: v for k, v in st.items() if k.startswith("fusion.")} if encoder else st
                         for st in states]
        visual_states = [{k[len("encoder."):]: v for k, v in st.items() if k.startswith("encoder.")}
                         for st in states] if encoder else []
        for k, (tr, va) in enumerate(splits):
            oof[va] = gathered[k][3]
        covered = np.concatenate([va for _, va in splits])
        cv = summary(y[covered], oof[covered].argmax(1))
        metrics = {"cv_waf": cv["waf"], "cv_accuracy": cv["accuracy"], "cv_macro_f1": cv["macro_f1"],
                   "fold_val_waf": [gathered[k][2] for k in range(len(splits))],
                   "majority_waf": majority_waf(y, y[covered]), "n_train": len(y), "folds": len(splits),
                   "n_pseudo": ts["n_pseudo"], "pseudo_crossfit": ts.get("pseudo_crossfit", False)}
        visual = {"visual_folds": visual_states, "visual_config": to_dict(encoder.cfg)} if encoder else {}
        torch.save({"folds": fusion_states, **visual, "dims": dims,
                    "fusion": to_dict(cfg.fusion), "modalities": cfg.modalities, "specs": encoders.specs,
                    "image_size": cfg.data.height, "data": to_dict(cfg.data), "shards": str(Path(cfg.data.shards).resolve()),
                    "cache": str(cache_dir(cfg).resolve()), "pseudo": cfg.pseudo, "n_pseudo": ts["n_pseudo"],
                    "split": {"seed": cfg.seed, "folds": len(splits)}},
                   out / "model.pt")
        save(cfg, out / "config.yaml")
        plots.confusion_matrix(cv["confusion"], out / "cv_confusion.png", "Cross-validated (out-of-fold)")
        tags = {"modalities": "".join(cfg.modalities), "world_size": env.world_size, "launcher": env.launcher,
                "pseudo": cfg.pseudo or "none", "n_pseudo": ts["n_pseudo"]}
        if cfg.pseudo:
            tags["transductive"] = str(cfg.transductive and ts.get("pseudo_test_clips", 0) > 0).lower()
        visual = "random" if cfg.visual == "random" else f"{Path(cfg.visual).parent.parent.name}/{Path(cfg.visual).parent.name}"
        tags |= {"visual": visual, "seed": cfg.seed, "acoustic": cfg.acoustic, "visual_train": cfg.visual_train}
        tracker = Tracker(cfg.tracking, out, "finetune", tags=tags, dataset=cfg.data.shards,
                          describe=f"{','.join(cfg.modalities)} visual={visual} seed={cfg.seed}"
                          + (f" pseudo={Path(cfg.pseudo).name}" if cfg.pseudo else ""))
        tracker.params(cfg)
        for k in range(len(splits)):
            for h in gathered[k][1]:
                tracker.metrics({f"fold{k}_train_loss": h["train_loss"], f"fold{k}_val_waf": h["val_waf"]}, h["epoch"])
        tracker.metrics({k: v for k, v in metrics.items() if not isinstance(v, list)}, 0)
        for f in ("model.pt", "config.yaml", "cv_confusion.png"):
            tracker.artifact(out / f)
        if cfg.tracking.enabled and cfg.tracking.log_model:
            tracker.model(_mlflow_model(cfg, out), cfg.tracking.register_model)
        pseudo = f", {ts['n_pseudo']} pseudo-labelled clips" if cfg.pseudo else ""
        print(f"finetune[{''.join(cfg.modalities)}]: CV WAF {cv['waf']:.3f} (majority {metrics['majority_waf']:.3f}"
              f"{pseudo}) -> {out}")
    dist.barrier()
    if cfg.test_split:      # the fold ensemble on the test split: every rank extracts its share
        names_t, y_t, probs = predict(load_model(out), cfg.test_split, "", encoders, env.rank, env.world_size)
        if env.is_main:
            ev = report(EvaluateConfig(model=str(out), split=cfg.test_split, out=str(out / f"eval-{cfg.test_split}"),
                                       tracking=cfg.tracking), names_t, y_t, probs.mean(0))
            metrics |= {f"{cfg.test_split}_{k}": v for k, v in ev.items() if k in ("waf", "accuracy", "macro_f1")}
            tracker.metrics({f"{cfg.test_split}_{k}": v for k, v in ev.items()
                             if k in ("waf", "accuracy", "macro_f1")}, 0)
    if env.is_main:
        metrics["mlflow_run_id"] = tracker.wait_run_id(10)
        tracker.close()
        write_json_atomic(out / "metrics.json", metrics)
    dist.barrier()
    dist.cleanup()
    return metrics
