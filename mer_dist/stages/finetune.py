"""`mer-dist finetune`: fusion classifier on the labeled split, K-fold cross-validated.

Features of the frozen encoders come from the cache (extracted once, shared over ranks). Folds are
spread over ranks (fold k on rank k mod W); each fold keeps its best epoch by validation WAF, and test
probabilities are the fold ensemble's (`evaluate.predict`). With `pseudo=P`, the pseudo-labelled clips
of `mer-dist pseudo-label` join the *training* part of every fold -- never a validation part, never
the test split (unless `transductive=true`, which is tagged on the run).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mer_dist import dist
from mer_dist.config import LABELS, EvaluateConfig, FinetuneConfig, save, to_dict
from mer_dist.data.ingest import shard_urls
from mer_dist.data.splits import holdout, kfold
from mer_dist.eval import plots
from mer_dist.eval.evaluate import predict, report
from mer_dist.eval.metrics import majority_waf, summary
from mer_dist.features import Encoders, extract, specs_for
from mer_dist.models.ensemble import FoldEnsemble, load_model, write_metrics
from mer_dist.tracking import Tracker
from mer_dist.train.folds import cache_dir, train_fold, training_set, visual_encoder
from mer_dist.train.round_guard import write_oof

log = logging.getLogger("mer_dist.finetune")


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
    visual = "random" if cfg.visual == "random" else f"{Path(cfg.visual).parent.parent.name}/{Path(cfg.visual).parent.name}"
    tags = {"modalities": "".join(cfg.modalities), "world_size": env.world_size, "launcher": env.launcher,
            "pseudo": cfg.pseudo.dir or "none", "n_pseudo": ts["n_pseudo"], "visual": visual, "seed": cfg.seed,
            "acoustic": cfg.acoustic, "visual_train": cfg.visual_train}
    if cfg.pseudo.dir:
        tags["transductive"] = str(cfg.pseudo.transductive and ts.get("pseudo_test_clips", 0) > 0).lower()
    tracker = Tracker(cfg.tracking, out, "finetune", active=env.is_main, tags=tags, dataset=cfg.data.shards,
                      describe=f"{','.join(cfg.modalities)} visual={visual} seed={cfg.seed}"
                      + (f" pseudo={Path(cfg.pseudo.dir).name}" if cfg.pseudo.dir else ""))

    def save_model() -> dict:    # rank 0 writes and logs (an MLflow model takes a while); the others wait outside any collective
        out.mkdir(parents=True, exist_ok=True)
        dims = {m: f.shape[1] for m, f in feats.items()}
        oof = np.zeros((len(y), len(LABELS)))
        states = [gathered[k][0] for k in range(len(splits))]
        fusion_states = [{k[len("fusion."):]: v for k, v in st.items() if k.startswith("fusion.")} if encoder else st
                         for st in states]
        visual_states = [{k[len("encoder."):]: v for k, v in st.items() if k.startswith("encoder.")}
                         for st in states] if encoder else []
        honest = np.zeros_like(oof)
        for k, (tr, va) in enumerate(splits):
            oof[va], honest[va] = gathered[k][3], gathered[k][4]
        covered = np.concatenate([va for _, va in splits])
        cv = summary(y[covered], oof[covered].argmax(1))
        write_oof(out, [names[i] for i in covered], y[covered], honest[covered])
        metrics = {"cv_waf": cv["waf"], "cv_accuracy": cv["accuracy"], "cv_macro_f1": cv["macro_f1"],
                   "cv_waf_unselected": summary(y[covered], honest[covered].argmax(1))["waf"],
                   "fold_val_waf": [gathered[k][2] for k in range(len(splits))],
                   "majority_waf": majority_waf(y, y[covered]), "n_train": len(y), "folds": len(splits),
                   "n_pseudo": ts["n_pseudo"], "pseudo_crossfit": ts.get("pseudo_crossfit", False)}
        FoldEnsemble(fusion_states, dims, to_dict(cfg.fusion), cfg.modalities, encoders.specs, cfg.data.height,
                     to_dict(cfg.data), str(Path(cfg.data.shards).resolve()), str(cache_dir(cfg).resolve()),
                     cfg.pseudo.dir, ts["n_pseudo"], {"seed": cfg.seed, "folds": len(splits)}, visual_states,
                     to_dict(encoder.cfg) if encoder else None).save(out / "model.pt")
        save(cfg, out / "config.yaml")
        plots.confusion_matrix(cv["confusion"], out / "cv_confusion.png", "Cross-validated (out-of-fold)")
        tracker.params(cfg)
        for k in range(len(splits)):
            for h in gathered[k][1]:
                tracker.metrics({f"fold{k}_train_loss": h["train_loss"], f"fold{k}_val_waf": h["val_waf"]}, h["epoch"])
        tracker.metrics({k: v for k, v in metrics.items() if not isinstance(v, list)}, 0)
        for f in ("model.pt", "config.yaml", "cv_confusion.png"):
            tracker.artifact(out / f)
        if cfg.tracking.enabled and cfg.tracking.log_model:
            try:
                tracker.model(_mlflow_model(cfg, out), cfg.tracking.register_model)
            except Exception as e:  # noqa: BLE001 - tracking never stops a stage (at real size the packed model is GBs)
                shutil.rmtree(out / "mlflow-model", ignore_errors=True)
                log.warning("finetune: the MLflow model was not logged (%s: %s); model.pt is complete and serves "
                            "with `mer-dist predict`", type(e).__name__, (str(e).splitlines() or [""])[0][:200])
        pseudo = f", {ts['n_pseudo']} pseudo-labelled clips" if cfg.pseudo.dir else ""
        print(f"finetune[{''.join(cfg.modalities)}]: CV WAF {cv['waf']:.3f} (majority {metrics['majority_waf']:.3f}"
              f"{pseudo}) -> {out}")
        return metrics

    metrics = dist.on_main(save_model)
    if cfg.test_split:      # the fold ensemble on the test split: every rank extracts its share
        names_t, y_t, probs = predict(load_model(out), cfg.test_split, "", encoders, env.rank, env.world_size)

        def report_test() -> dict:
            ev = report(EvaluateConfig(model=str(out), split=cfg.test_split, out=str(out / f"eval-{cfg.test_split}"),
                                       tracking=cfg.tracking), names_t, y_t, probs.mean(0))
            scores = {f"{cfg.test_split}_{k}": v for k, v in ev.items() if k in ("waf", "accuracy", "macro_f1")}
            tracker.metrics(scores, 0)
            return metrics | scores

        metrics = dist.on_main(report_test)

    def finish() -> dict:
        done = {**metrics, "mlflow_run_id": tracker.wait_run_id(10)}
        tracker.close()
        write_metrics(out, done)
        return done

    metrics = dist.on_main(finish)
    dist.cleanup()
    return metrics
