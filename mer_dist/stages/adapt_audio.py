"""`mer-dist adapt-audio`: PEFT on the most emotional HuBERT layers -> the (frozen) alignment teacher.

LoRA (peft, `layers_to_transform`) or a bottleneck adapter on the chosen layers only, with a
classification head over a learned weighted sum of those layers' pooled outputs. Early stopping on
the same held-out part of train that the probe used, so the two WAFs are comparable.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mer_dist import dist
from mer_dist.config import LABELS, AdaptConfig, save
from mer_dist.data.splits import holdout
from mer_dist.data.stream import pad_audio
from mer_dist.eval.linear_probe import read_layers
from mer_dist.eval.metrics import summary
from mer_dist.features import map_split
from mer_dist.models.teacher import (
    AudioClassifier,
    add_bottlenecks,
    add_lora,
    build_hubert,
    save_teacher,
    trainable_layers,
)
from mer_dist.tracking import Tracker
from mer_dist.train.losses import soft_cross_entropy
from mer_dist.train.pseudo import as_targets, for_training, refuse_labeled, unreadable

log = logging.getLogger("mer_dist.adapt")


def choose_layers(cfg: AdaptConfig) -> tuple[list[int], dict]:
    if cfg.layers:
        return sorted(cfg.layers), {}
    if not cfg.probe:
        raise ValueError("adapt-audio: set `layers` (e.g. --layers 2,3) or `probe` (a probe-layers output dir)")
    probe = read_layers(cfg.probe)
    ranked = sorted((r for r in probe["layers"] if r["layer"] > 0), key=lambda r: -r["waf"])
    return sorted(r["layer"] for r in ranked[: cfg.top_k]), probe


def _batches(idx: np.ndarray, audio: list[np.ndarray], bs: int, rng: np.random.Generator | None):
    order = rng.permutation(idx) if rng is not None else idx
    for i in range(0, len(order), bs):
        part = order[i:i + bs]
        yield part, *pad_audio([audio[j] for j in part])


def _predict(clf: AudioClassifier, idx, audio, bs) -> np.ndarray:
    clf.eval()
    out = []
    with torch.inference_mode():
        for _, x, lens in _batches(idx, audio, bs, None):
            out.append(clf(x, lens).argmax(-1).numpy())
    return np.concatenate(out) if out else np.zeros(0, int)


def pseudo_audio(cfg: AdaptConfig, labeled: set[str], env: dist.DistEnv) -> tuple[list[np.ndarray], np.ndarray]:
    """Audio and training targets of the pseudo-labelled clips (`cfg.pseudo.dir`), in pseudo.csv order. Test clips are
    left out unless `transductive`; a labeled clip or a name missing from the split is an error."""
    pnames, probs = for_training(cfg.pseudo.dir, cfg.data.shards, cfg.pseudo.test_split, cfg.pseudo.transductive, "adapt-audio",
                                  "a")
    refuse_labeled(cfg.pseudo.dir, pnames, labeled)
    wanted = set(pnames)
    names, audio, _ = map_split(cfg.data.shards, cfg.pseudo.split, cfg.data, env, lambda b: [
        a[:n].numpy().copy() if nm in wanted else None for nm, a, n in zip(b["name"], b["audio"], b["audio_lens"])],
        "adapt: load pseudo-labelled audio")
    where = {n: a for n, a in zip(names, audio) if a is not None}
    skip = unreadable(cfg.pseudo.dir, pnames, set(where), cfg.data.shards, cfg.pseudo.split, "adapt-audio")
    keep = [i for i, n in enumerate(pnames) if n not in skip]
    return [where[pnames[i]] for i in keep], as_targets(probs[keep], cfg.pseudo.soft)


def run(cfg: AdaptConfig) -> dict:
    env = dist.setup()
    # the labeled split is small: rank 0 adapts, the others wait outside any collective (however long it takes)
    result = dist.on_main(lambda: adapt(cfg, env))
    dist.cleanup()
    return result


def adapt(cfg: AdaptConfig, env: dist.DistEnv) -> dict:
    """Choose the layers, train adapter + head with early stopping, save the teacher directory."""
    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    layers, probe = choose_layers(cfg)
    single = dist.DistEnv()
    names, audio, labels = map_split(cfg.data.shards, "train", cfg.data, single, lambda b: [
        a[:n].numpy().copy() for a, n in zip(b["audio"], b["audio_lens"])], "adapt: load audio")
    y = np.asarray(labels)
    tr, va = holdout(names, y, cfg.val_fraction, cfg.seed)
    # targets and weights of every clip the adapter may train on: the labeled ones, then the pseudo-labelled ones
    target, weight = np.eye(len(LABELS), dtype=np.float32)[y], np.ones(len(y), np.float32)
    if cfg.pseudo.dir:
        p_audio, p_target = pseudo_audio(cfg, set(names), single)
        audio = [*audio, *p_audio]
        target = np.concatenate([target, p_target])
        weight = np.concatenate([weight, np.full(len(p_audio), cfg.pseudo.weight, np.float32)])
        train_idx = np.concatenate([tr, np.arange(len(y), len(audio))])
        print(f"adapt-audio: {len(p_audio)} pseudo-labelled clips of '{cfg.pseudo.split}' join the training part "
              f"(weight {cfg.pseudo.weight}, {'soft' if cfg.pseudo.soft else 'hard'})")
    else:
        train_idx = tr
    base = build_hubert(cfg.model)
    if not 1 <= min(layers) <= max(layers) <= base.config.num_hidden_layers:
        raise ValueError(f"adapt-audio: layers {layers} outside 1..{base.config.num_hidden_layers}")
    if cfg.method == "lora":
        hubert = add_lora(base, layers, cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules)
    else:
        hubert = add_bottlenecks(base, layers, cfg.bottleneck_dim)
    touched = trainable_layers(hubert)
    if touched != set(layers):
        raise RuntimeError(f"adapter touches layers {sorted(touched)}, expected exactly {layers}")
    clf = AudioClassifier(hubert, layers, cfg.head, base.config.hidden_size, len(LABELS))
    clf.fit_standardisation((x, lens) for _, x, lens in _batches(tr, audio, cfg.batch_size, None))
    n_adapter = sum(p.numel() for p in hubert.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in clf.parameters() if p.requires_grad)
    print(f"adapt-audio: {cfg.method} on layers {layers}: {n_adapter:,} adapter + "
          f"{n_total - n_adapter:,} head parameters trainable "
          f"({100 * n_total / sum(p.numel() for p in clf.parameters()):.2f}% of the model)")
    tracker = Tracker(cfg.tracking, out, "adapt-audio", dataset=cfg.data.shards,
                      describe=f"{cfg.method} layers={','.join(map(str, layers))}" + (" pseudo" if cfg.pseudo.dir else ""), tags={"method": cfg.method, "layers": layers,
                                                               "world_size": env.world_size, "launcher": env.launcher,
                                                               "pseudo": cfg.pseudo.dir or "none",
                                                               "n_pseudo": len(train_idx) - len(tr)})
    tracker.params(cfg)
    tracker.metrics({"trainable_params": n_total, "adapter_params": n_adapter}, step=0)
    opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs))
    rng = np.random.default_rng(cfg.seed)
    best, best_state, bad_epochs, history = -1.0, None, 0, []
    bar = tqdm(range(cfg.epochs), desc="adapt-audio", unit="epoch")
    for epoch in bar:
        clf.train()
        losses = []
        for part, x, lens in _batches(train_idx, audio, cfg.batch_size, rng):
            loss = soft_cross_entropy(clf(x, lens), torch.from_numpy(target[part]), torch.from_numpy(weight[part]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
        val = summary(y[va], _predict(clf, va, audio, cfg.batch_size))
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_waf": val["waf"],
                        "seconds": round(time.monotonic() - started, 3)})     # since rank 0 began adapting
        tracker.metrics({"train_loss": np.mean(losses), "val_waf": val["waf"], "val_accuracy": val["accuracy"]}, epoch)
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_waf=f"{val['waf']:.3f}")
        if val["waf"] > best:
            best, best_state, bad_epochs = val["waf"], copy.deepcopy(
                {k: v for k, v in clf.state_dict().items() if _is_trainable_key(clf, k)}), 0
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                break
    clf.load_state_dict(best_state, strict=False)
    probe_waf = _probe_waf(probe, layers)
    result = _save(cfg, out, clf, layers, audio, tr, best, probe_waf, history)
    print(f"adapt-audio: best validation WAF {best:.3f}" +
          (f" (linear probe of the same layers: {probe_waf:.3f})" if probe_waf is not None else "") + f" -> {out}")
    tracker.metrics({"best_val_waf": best, **({"probe_val_waf": probe_waf} if probe_waf is not None else {})},
                    step=len(history))
    for f in ("teacher.json", "config.yaml"):
        tracker.artifact(out / f)
    tracker.close()
    return result


def _is_trainable_key(clf: nn.Module, key: str) -> bool:
    params = dict(clf.named_parameters())
    return key in params and params[key].requires_grad


def _probe_waf(probe: dict, layers: list[int]) -> float | None:
    scores = {r["layer"]: r["waf"] for r in probe.get("layers", [])}
    return max(scores[layer] for layer in layers) if probe and all(layer in scores for layer in layers) else None


def _save(cfg, out, clf, layers, audio, tr, best, probe_waf, history) -> dict:
    """The teacher directory (`models/teacher.save_teacher`) and this run's config."""
    dim = clf.head.feat_mean.shape[1] * (len(layers) if cfg.feature_reduce == "concat" else 1)
    spec = save_teacher(out, clf, cfg.method, cfg.model, {
        "layers": layers, "rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout,
        "target_modules": cfg.target_modules, "bottleneck_dim": cfg.bottleneck_dim, "feature_layers": layers,
        "feature_reduce": cfg.feature_reduce, "dim": dim, "head": cfg.head, "val_waf": best,
        "probe_val_waf": probe_waf, "history": history}, (b[1:] for b in _batches(tr, audio, cfg.batch_size, None)))
    save(cfg, out / "config.yaml")
    return spec
