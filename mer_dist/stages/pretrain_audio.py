"""`mer-dist pretrain-audio`: HuBERT's first iteration on the corpus's own audio.

The method assumes a pretrained speech model whose middle layers already carry prosody; `tiny:hubert` has random
weights. At small scale the honest stand-in is what HuBERT itself does first: cluster MFCC frames with k-means and
train the model to predict the cluster of masked frames from their context. Labels are never read. The result is a
`save_pretrained` directory that `probe-layers` / `adapt-audio` load like chinese-hubert-large (`model=DIR`).

setup (audio of the chosen splits, MFCC at HuBERT's 20 ms frames, k-means) -> fit (masked prediction) -> save.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import scipy.fft
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn
from tqdm import tqdm
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from mer_dist import dist
from mer_dist.config import PretrainAudioConfig, save
from mer_dist.data.stream import pad_audio
from mer_dist.io import write_json_atomic
from mer_dist.models.teacher import build_hubert, hidden_states
from mer_dist.tracking import Tracker
from mer_dist.features import map_split

log = logging.getLogger("mer_dist.pretrain_audio")
WINDOW, HOP = 400, 320          # HuBERT's conv stack: receptive field and stride, in samples at 16 kHz


def mfcc(wave: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
    """13 MFCCs + deltas + delta-deltas [T, 39], one row per HuBERT frame (same window and hop, no centring)."""
    wave = np.pad(wave, (0, max(0, WINDOW - wave.size)))
    mel = mel_filter_bank(WINDOW // 2 + 57, 40, 20.0, sample_rate / 2, sample_rate)   # 512-point FFT: 257 bins
    spec = spectrogram(wave, window_function(WINDOW, "hann"), WINDOW, HOP, fft_length=512, power=2.0,
                       center=False, mel_filters=mel, log_mel="log")                  # [40, T]
    c = scipy.fft.dct(spec, type=2, axis=0, norm="ortho")[:13].T                       # [T, 13]
    d1 = np.gradient(c, axis=0) if len(c) > 1 else np.zeros_like(c)
    d2 = np.gradient(d1, axis=0) if len(c) > 1 else np.zeros_like(c)
    return np.concatenate([c, d1, d2], 1).astype(np.float32)


def run(cfg: PretrainAudioConfig) -> dict:
    env = dist.setup()
    # built first, so a bad preset fails before any decoding; mask_time_prob > 0 gives the model its learned mask
    # embedding (the masks themselves are ours, below)
    model = build_hubert(cfg.model, cfg.seed, mask_time_prob=cfg.mask_prob, mask_time_length=cfg.mask_length)
    clips: list[np.ndarray] = []
    for split in cfg.splits:        # every rank decodes its share; rank 0 gets all clips
        clips += map_split(cfg.data.shards, split, cfg.data, env, lambda b: [
            b["audio"][i, : int(n)].numpy() for i, n in enumerate(b["audio_lens"])], f"audio[{split}]")[1]
    # one small model: rank 0 trains it, the others wait outside any collective (however long it takes)
    return dist.on_main(lambda: train(cfg, model, clips))


def train(cfg: PretrainAudioConfig, model, clips: list[np.ndarray]) -> dict:
    """k-means units of MFCC frames, then masked prediction of them; saves the model and pretrain.json."""
    out = Path(cfg.out)
    tracker = Tracker(cfg.tracking, out, "pretrain-audio", tags={"model": cfg.model, "clusters": cfg.clusters},
                      describe=f"{cfg.model} steps={cfg.steps} clusters={cfg.clusters}", dataset=cfg.data.shards)
    save(cfg, out / "pretrain_audio.yaml")
    tracker.params(cfg)

    # targets: k-means of standardised MFCC frames (fitted on at most 100k frames)
    feats = [mfcc(c, cfg.data.sample_rate) for c in clips]
    allf = np.concatenate(feats)
    mu, sd = allf.mean(0), allf.std(0) + 1e-5
    rng = np.random.default_rng(cfg.seed)
    fit = allf[rng.permutation(len(allf))[:100_000]]
    km = KMeans(cfg.clusters, n_init=1, random_state=cfg.seed).fit((fit - mu) / sd)
    units = [km.predict((f - mu) / sd) for f in feats]
    counts = np.bincount(np.concatenate(units), minlength=cfg.clusters)
    majority = float(counts.max() / counts.sum())
    log.info("pretrain-audio: %d clips, %d frames, %d clusters (largest %.1f%%)", len(clips), len(allf),
             cfg.clusters, 100 * majority)

    model.train()
    torch.manual_seed(cfg.seed)
    head = nn.Linear(model.config.hidden_size, cfg.clusters)
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    warmup = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    history = []
    bar = tqdm(range(1, cfg.steps + 1), desc="pretrain-audio", unit="step")
    for step in bar:
        idx = rng.choice(len(clips), size=min(cfg.batch_size, len(clips)), replace=False)
        audio, lens = pad_audio([clips[i] for i in idx])
        t = int(model._get_feat_extract_output_lengths(torch.tensor(audio.shape[1])))
        flen = model._get_feat_extract_output_lengths(lens)
        valid = torch.arange(t)[None] < flen[:, None]
        masked = torch.from_numpy(_compute_mask_indices((len(idx), t), cfg.mask_prob, cfg.mask_length,
                                                        attention_mask=valid.long(), min_masks=1)) & valid
        target = torch.full((len(idx), t), -100, dtype=torch.long)
        for j, i in enumerate(idx):
            n = min(t, len(units[i]))
            target[j, :n] = torch.from_numpy(units[i][:n].astype(np.int64))
        target[~masked] = -100
        hs, _ = hidden_states(model, audio, lens, mask_time_indices=masked)
        logits = head(hs[-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.clusters), target.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        keep = target != -100
        acc = float((logits.argmax(-1)[keep] == target[keep]).float().mean())
        history.append((loss.item(), acc))
        if step % 50 == 0 or step == cfg.steps:
            tracker.metrics({"loss": loss.item(), "masked_accuracy": acc}, step)
            bar.set_postfix(loss=f"{loss.item():.3f}", masked_acc=f"{acc:.3f}")
    bar.close()

    model.config.mask_time_prob = 0.0     # downstream stages train it without SpecAugment, as any HuBERT
    model.eval().save_pretrained(str(out))
    span = max(1, len(history) // 10)
    first, last = np.mean(history[:span], 0), np.mean(history[-span:], 0)
    summary = {"clips": len(clips), "frames": int(len(allf)), "clusters": cfg.clusters, "steps": cfg.steps,
               "largest_cluster_share": majority, "loss_first": float(first[0]), "loss_last": float(last[0]),
               "masked_accuracy_first": float(first[1]), "masked_accuracy_last": float(last[1])}
    write_json_atomic(out / "pretrain.json", summary)
    tracker.artifact(out / "pretrain.json")
    tracker.close()
    print(f"pretrain-audio: masked-unit accuracy {summary['masked_accuracy_first']:.3f} -> "
          f"{summary['masked_accuracy_last']:.3f} (largest cluster {majority:.3f}) -> {out}", flush=True)
    return summary
