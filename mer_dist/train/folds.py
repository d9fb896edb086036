"""One fold of `mer-dist finetune`: the training set (labeled clips' features, the pseudo-labelled clips after
them, decoded frames when the visual encoder trains too) and the fold's training loop, best epoch by validation
WAF. Pseudo-labelled clips join the *training* part of every fold -- never a validation part, never the test
split (unless `transductive=true`).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mer_dist.config import LABELS, FinetuneConfig
from mer_dist.data.splits import kfold
from mer_dist.eval.metrics import summary
from mer_dist.features import Encoders, StackedRows, extract, frames, specs_for
from mer_dist.models.fusion import FusionModel, VisualFusion
from mer_dist.train.losses import soft_cross_entropy
from mer_dist.train.round_guard import unselected
from mer_dist.train.pseudo import (
    as_targets,
    leave_out_test,
    read_folds,
    read_pseudo,
    read_summary,
    refuse_labeled,
    select,
    test_clips,
    unreadable,
)


def cache_dir(cfg: FinetuneConfig) -> Path:
    return Path(cfg.cache) if cfg.cache else Path(cfg.data.shards).resolve().parent / "feature-cache"


def pseudo_sets(cfg: FinetuneConfig, n_folds: int
                ) -> tuple[list[str], list[str], list[tuple[np.ndarray, np.ndarray]], bool]:
    """(candidate clip names, their views, per fold (indices into them, probabilities), cross-fitted?).

    Cross-fitting: when the pseudo-labels came from a model with the same folds (same seed and K), fold k
    takes the clips that *its own* previous-round model selects, with that model's probabilities. That model
    never saw fold k's validation clips, so no validation label leaks into fold k's training through the
    pseudo-labels (the ensemble saw every labeled clip). Otherwise every fold gets the ensemble's pseudo.csv."""
    pnames, pprobs, pviews = read_pseudo(cfg.pseudo.dir)
    summary, folds = read_summary(cfg.pseudo.dir), read_folds(cfg.pseudo.dir)
    if folds is not None and summary.get("folds") == {"seed": cfg.seed, "folds": n_folds}:
        cand, probs, views = folds
        kept = set(zip(pnames, pviews))     # agree_with filtered the ensemble's selection: keep only those clips
        allowed = np.array([key in kept for key in zip(cand, views)]) if summary.get("agree_with") \
            else np.ones(len(cand), bool)
        sets = []
        for k in range(n_folds):
            mine = select(probs[k], summary["threshold"], summary["top_per_class"],
                          min_precision=summary.get("min_precision", 0.0))
            idx = np.array([i for i in mine if allowed[i]], dtype=int)
            sets.append((idx, probs[k][idx]))
        return cand, views, sets, True
    if cfg.folds > 1:
        print(f"finetune: {cfg.pseudo.dir} comes from other folds than this run's (seed {cfg.seed}, {n_folds} folds): "
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
        clips = _frames(cfg, "train", names)
    if cfg.pseudo.dir:
        cand, views, sets, crossfit = pseudo_sets(cfg, n_folds)
        refuse_labeled(cfg.pseudo.dir, cand, names)
        used_names = [cand[i] for i in np.unique(np.concatenate([idx for idx, _ in sets]))] if len(cand) else []
        out = leave_out_test(used_names, cfg.data.shards, cfg.pseudo.test_split, cfg.pseudo.transductive, "finetune")
        if out:
            is_out = np.array([nm in out for nm in cand], bool)
            sets = [(idx[~is_out[idx]], pr[~is_out[idx]]) for idx, pr in sets]
        used_test = len(test_clips(used_names, cfg.data.shards, cfg.pseudo.test_split)) if cfg.pseudo.transductive else 0
        un_names, _, un_feats, un_present = extract(Encoders(specs_for(cfg), cfg.data.height), cfg.modalities,
                                                    cfg.data.shards, cfg.pseudo.split, cfg.data, cache_dir(cfg),
                                                    rank, world)
        where = {nm: k for k, nm in enumerate(un_names)}
        used = np.unique(np.concatenate([idx for idx, _ in sets])).astype(int)     # test clips left out are not
        # a clip none of whose modalities this run could read (truncated, no audio stream) is skipped, and said
        read = {nm for nm, ok in zip(un_names, un_present.any(1)) if ok}
        skip = unreadable(cfg.pseudo.dir, [cand[i] for i in used], read, cfg.data.shards, cfg.pseudo.split, "finetune")
        sel = np.array([where.get(nm, 0) for nm in cand], dtype=int)     # an unused row's features are never read
        # co-training rows show only their view's modalities; a row left with none (its view is a modality this
        # run lacks, or the clip lacks it) is not trained on, nor is a clip this stage could not read
        cand_present = un_present[sel] & view_mask(views, cfg.modalities)
        usable = cand_present.any(1) & np.array([nm not in skip for nm in cand], bool)
        sets = [(idx[usable[idx]], pr[usable[idx]]) for idx, pr in sets]
        feats = {m: np.concatenate([f, un_feats[m][sel]]) for m, f in feats.items()}
        present = np.concatenate([present, cand_present])
        target = np.concatenate([target, np.zeros((len(sel), len(LABELS)))])
        weight = np.concatenate([weight, np.full(len(sel), cfg.pseudo.weight)])
        info = {"pseudo": [(n + idx, as_targets(pr, cfg.pseudo.soft)) for idx, pr in sets],
                "n_pseudo": int(np.mean([len(idx) for idx, _ in sets])), "pseudo_crossfit": crossfit,
                "pseudo_test_clips": used_test}
        if clips is not None:
            # read batch by batch from both frame caches: the pool's frames are never copied into memory
            clips = StackedRows((clips, np.arange(len(clips))), (_frames(cfg, cfg.pseudo.split, un_names), sel))
    return {"feats": feats, "present": present, "target": target.astype(np.float32),
            "weight": weight.astype(np.float32), "n_labeled": n, "frames": clips, **info}


def _frames(cfg: FinetuneConfig, split: str, names: list[str]) -> np.ndarray:
    """Frames of a split in `names` order (rank 0 decodes into the cache, then everyone maps it)."""
    got, arr = frames(cfg.data.shards, split, cfg.data, cache_dir(cfg))
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
               seed: int, encoder=None) -> tuple[dict, list[dict], float, np.ndarray, np.ndarray]:
    """One fold: labeled `tr` + every pseudo-labelled clip train, labeled `va` validates. Returns the best epoch's
    (state, history, validation WAF, validation probabilities) and the validation probabilities no clip's own label
    chose the epoch of (`round_guard.unselected`: the self-training guard's score). With an `encoder`
    (visual_train=top_k|full) a copy of it trains too and the state holds both."""
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
    best, best_state, history, epoch_probs = -1.0, None, [], []
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
        epoch_probs.append(probs)
        if val["waf"] > best:
            best, best_state, best_probs = val["waf"], copy.deepcopy(model.state_dict()), probs
    return best_state, history, best, best_probs, unselected(y[va], epoch_probs, seed)


def head_cv_waf(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> float:
    """Out-of-fold WAF of finetune's own head on fixed clip features -- the visual-only fusion model with the default
    recipe, K stratified folds (K at most the rarest class's count, >= 2) -- what `finetune modalities=[v]` would
    report for an encoder, without decoding or running it (the alignment guard's score)."""
    counts = np.bincount(y)
    k = int(max(2, min(folds, counts[counts > 0].min())))
    cfg = FinetuneConfig(modalities=["v"], folds=k, seed=seed)
    splits = kfold([f"{i:08d}" for i in range(len(y))], y, k, seed)
    ts = {"feats": {"v": np.ascontiguousarray(x, dtype=np.float32)}, "present": np.ones((len(y), 1), bool),
          "target": np.eye(len(LABELS), dtype=np.float32)[y], "weight": np.ones(len(y), np.float32),
          "n_labeled": len(y), "frames": None, "pseudo": [(np.zeros(0, int), np.zeros((0, len(LABELS))))] * k}
    oof = np.zeros((len(y), len(LABELS)))
    # the guard scores under no_grad and must not move align's random stream; a head this small runs fastest on
    # one thread (measured on a loaded 2-core machine: 10 s against 97 s with two)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            for j, (tr, va) in enumerate(splits):
                oof[va] = train_fold(cfg, ts, y, tr, va, j, seed * 1000 + j)[3]
    finally:
        torch.set_num_threads(threads)
    return summary(y, oof.argmax(1))["waf"]
