"""Synthetic MER-like corpus in the MER2024 release layout.

Each clip draws latent factors -- emotion, arousal, a speaker, and a syllable timeline -- and
renders all three modalities from them:

* video: a face drawing; expression (mouth curve, brows, eyes), tint and head motion follow the
  *expressed* emotion and arousal, and the mouth opens with the voice's syllable envelope;
* audio: a harmonic voice; pitch level/contour, tempo (syllable rate) and loudness follow the
  expressed emotion and arousal, plus background noise;
* text: a sentence from emotion templates that overlap on purpose.

Each modality shows a *confusable* emotion with its own probability (visual/audio/text_noise), so
no modality is perfect. What audio and video share besides is the regime (`shared`, `faces`):

* shared=emotion (default): arousal, drawn from the emotion, sets tempo, loudness, mouth motion and head
  motion in both, so whatever matches the two streams learns emotion;
* shared=nuisance: a per-clip energy unrelated to emotion sets them, as on real video, where lip motion,
  loudness and clip length dominate what audio and video share; emotion stays in the voice's pitch and
  contour and in the face's static expression only;
* faces=speaker: one face per speaker, who also owns the voice's pitch offset: identity is shared too.

`expression` and `prosody` fade the face's and the voice's emotion toward neutral's; with shared=nuisance and
prosody=0 the audio carries no emotion, so neither does any teacher: what alignment can match is energy and
identity alone (the corpus #19 was filed on, in the limit).
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mer_dist.config import LABELS, TRUTH_FILE, SynthConfig, to_dict
from mer_dist.data.decode import write_av
from mer_dist.data.ingest import load_manifest

SR = 16000
CONFUSABLE = {
    "neutral": ["worried", "sad", "happy"], "angry": ["worried", "surprise", "sad"],
    "happy": ["surprise", "neutral"], "sad": ["worried", "neutral"],
    "worried": ["sad", "angry", "neutral"], "surprise": ["happy", "angry"],
}
# expression parameters of the face: mouth curve (+smile), mouth open, brow tilt (+angry), eye size, tint (RGB)
FACE = {
    "neutral": (0.0, 0.10, 0.0, 1.0, (200, 180, 160)),
    "angry": (-0.6, 0.35, 1.0, 0.75, (225, 130, 110)),
    "happy": (1.0, 0.30, -0.2, 0.9, (230, 200, 120)),
    "sad": (-1.0, 0.05, -0.9, 0.6, (150, 165, 205)),
    "worried": (-0.4, 0.10, -0.7, 1.15, (170, 200, 160)),
    "surprise": (0.0, 0.85, -1.0, 1.5, (225, 170, 200)),
}
# voice parameters: f0 (Hz), contour kind, loudness, base arousal
VOICE = {
    "neutral": (140.0, "flat", 0.45, 0.30), "angry": (185.0, "fall_fast", 0.95, 0.85),
    "happy": (215.0, "wave", 0.75, 0.70), "sad": (115.0, "fall", 0.30, 0.20),
    "worried": (165.0, "tremolo", 0.45, 0.50), "surprise": (230.0, "rise", 0.80, 0.80),
}
TEMPLATES_EN = {
    "neutral": ["I went to the office today.", "The meeting is at three o'clock.", "We talked about the plan.",
                "It is what it is.", "I will call you later."],
    "angry": ["How dare you do this to me!", "I am sick of your excuses.", "Get out of my way right now!",
              "This is completely unacceptable.", "I can't believe this happened."],
    "happy": ["This is the best day ever!", "I am so glad you came.", "We won, we actually won!",
              "What a lovely surprise, thank you.", "I will call you later."],
    "sad": ["I miss her so much.", "Nothing seems to matter anymore.", "I lost everything today.",
            "I can't believe this happened.", "It is what it is."],
    "worried": ["What if something goes wrong?", "I am not sure we can make it.", "Is everything going to be okay?",
                "I have a bad feeling about this.", "We talked about the plan."],
    "surprise": ["Wait, what did you just say?", "No way, really?", "I can't believe this happened.",
                 "What a lovely surprise, thank you.", "Oh! I didn't expect you here."],
}
TEMPLATES_ZH = {
    "neutral": ["我今天去了办公室。", "会议在三点。", "我们讨论了计划。", "就这样吧。", "我晚点给你打电话。"],
    "angry": ["你怎么敢这样对我！", "我受够了你的借口。", "马上给我让开！", "这完全不能接受。", "我真不敢相信。"],
    "happy": ["今天是最好的一天！", "你来了我真高兴。", "我们赢了！", "真是个惊喜，谢谢。", "我晚点给你打电话。"],
    "sad": ["我好想她。", "一切都没有意义了。", "我今天失去了一切。", "我真不敢相信。", "就这样吧。"],
    "worried": ["万一出事怎么办？", "我不确定我们能做到。", "一切都会好吗？", "我有不好的预感。", "我们讨论了计划。"],
    "surprise": ["等等，你说什么？", "不会吧，真的吗？", "我真不敢相信。", "真是个惊喜，谢谢。", "哦！没想到你在这里。"],
}
VALENCE = {"neutral": 0.0, "angry": -3.0, "happy": 3.5, "sad": -3.5, "worried": -1.5, "surprise": 1.0}


@dataclass
class ClipSpec:
    name: str
    emotion: str
    index: int


def _express(rng: np.random.Generator, emotion: str, noise: float) -> str:
    return str(rng.choice(CONFUSABLE[emotion])) if rng.random() < noise else emotion


def _syllables(rng: np.random.Generator, seconds: float, arousal: float) -> list[tuple[float, float, float]]:
    """(start, length, strength) of each syllable; the tempo rises with arousal."""
    rate = 2.0 + 4.5 * arousal
    t, out = rng.uniform(0.0, 0.15), []
    while t < seconds - 0.1:
        length = rng.uniform(0.6, 1.0) / rate
        out.append((t, length, rng.uniform(0.6, 1.0)))
        t += length + rng.exponential(0.35 / rate) + (rng.uniform(0.2, 0.4) if rng.random() < 0.15 else 0.0)
    return out


def _envelope(times: np.ndarray, syl: list[tuple[float, float, float]]) -> np.ndarray:
    env = np.zeros_like(times, dtype=np.float64)
    for start, length, strength in syl:
        x = (times - start) / length
        inside = (x >= 0) & (x <= 1)
        env[inside] = np.maximum(env[inside], strength * np.sin(np.pi * x[inside]) ** 0.7)
    return env


def render_audio(rng, emotion: str, arousal: float, seconds: float, syl, speaker_f0: float,
                 loudness: float | None = None, prosody: float = 1.0) -> np.ndarray:
    """`loudness` replaces the emotion's own (shared=nuisance: loudness is energy, not emotion); `prosody` moves the
    pitch level and contour that far from the neutral voice's (flat) toward the emotion's (1 = the emotion's own)."""
    f0_base, contour, loud, _ = VOICE[emotion]
    loud = loud if loudness is None else loudness
    n = int(round(seconds * SR))
    t = np.arange(n) / SR
    u = t / seconds
    shape = {"flat": np.zeros_like(u), "fall": -0.25 * u, "fall_fast": 0.1 - 0.3 * u ** 0.5,
             "wave": 0.18 * np.sin(2 * np.pi * 1.5 * u), "rise": 0.45 * u ** 2,
             "tremolo": 0.07 * np.sin(2 * np.pi * 7.0 * t)}[contour]
    if prosody != 1.0:      # the default corpus keeps its exact samples
        f0_base, shape = _fade(f0_base, VOICE["neutral"][0], prosody), _fade(shape, 0.0, prosody)   # neutral: flat
    f0 = (f0_base + 50.0 * (arousal - 0.5) + speaker_f0) * (1.0 + shape)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    env = _envelope(t, syl)
    # per-syllable vowel colour: random harmonic weights, constant inside a syllable
    voice = np.zeros(n)
    weights = rng.uniform(0.2, 1.0, size=(len(syl) + 1, 8)) / np.arange(1, 9) ** (1.2 - 0.5 * arousal)
    idx = np.zeros(n, dtype=int)
    for i, (start, _, _) in enumerate(syl):
        idx[t >= start] = i
    for h in range(8):
        voice += weights[idx, h] * np.sin((h + 1) * phase)
    voice *= env * (0.25 + 0.5 * loud * (0.6 + 0.4 * arousal))
    noise = rng.normal(0, 1, n) * rng.uniform(0.01, 0.06)
    audio = voice / 3.0 + noise
    return np.clip(audio, -1, 1).astype(np.float32)


def _fade(value, neutral, strength: float):
    """`value` moved `strength` of the way from `neutral` (expression and prosody: 0 = neutral's, 1 = its own)."""
    return neutral + strength * (value - neutral)


def _expression(emotion: str, strength: float) -> tuple:
    """FACE parameters of `emotion` moved `strength` of the way from the neutral face (1 = the full expression)."""
    if strength == 1.0:
        return FACE[emotion]
    emo, neu = FACE[emotion], FACE["neutral"]
    return (*(_fade(e, n, strength) for e, n in zip(emo[:4], neu[:4])),
            tuple(_fade(e, n, strength) for e, n in zip(emo[4], neu[4])))


def render_video(rng, emotion: str, arousal: float, seconds: float, fps: int, h: int, w: int, syl,
                 expression: float = 1.0, look: dict | None = None) -> np.ndarray:
    """`look` (faces=speaker): the speaker's background, tint offset and face shape instead of per-clip draws."""
    curve, open_base, brow, eye, tint = _expression(emotion, expression)
    nframes = max(1, int(round(seconds * fps)))
    times = (np.arange(nframes) + 0.5) / fps
    env = _envelope(times, syl)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / h * 2 - 1, xx / w * 2 - 1            # [-1, 1]
    if look is None:
        bg = rng.uniform(20, 120, size=3)
        tint = np.clip(np.array(tint) + rng.normal(0, 22, 3), 0, 255)
        fw, fh = 0.62, 0.78
    else:
        bg, fw, fh = look["bg"], look["fw"], look["fh"]
        tint = np.clip(np.array(tint) + look["tint"], 0, 255)
    bob_f = 0.8 + 2.5 * arousal
    bob_a = 0.02 + 0.10 * arousal
    phase0 = rng.uniform(0, 2 * np.pi)
    frames = np.empty((nframes, h, w, 3), dtype=np.uint8)
    for i, t in enumerate(times):
        dx = bob_a * np.sin(2 * np.pi * bob_f * t + phase0)
        dy = 0.5 * bob_a * np.cos(2 * np.pi * bob_f * t + phase0)
        x, y = xx - dx, yy - dy
        img = np.broadcast_to(bg, (h, w, 3)).copy()
        face = (x / fw) ** 2 + (y / fh) ** 2 <= 1
        img[face] = tint
        for ex in (-0.25, 0.25):                       # eyes
            e = ((x - ex) / 0.11) ** 2 + ((y + 0.18) / (0.07 * eye)) ** 2 <= 1
            img[e] = (250, 250, 250)
            p = ((x - ex) / 0.045) ** 2 + ((y + 0.18) / 0.045) ** 2 <= 1
            img[p] = (20, 20, 20)
            # brow: a thick line whose inner end is lowered (angry) or raised (sad/worried)
            s = (x - ex) / 0.16
            inner = (1 - s * np.sign(ex)) / 2
            line = -0.38 - 0.06 * (eye - 1) + brow * 0.10 * inner
            img[(np.abs(s) <= 1) & (np.abs(y - line) <= 0.03)] = (60, 40, 30)
        mouth_open = open_base + 0.35 * env[i] * (0.5 + arousal)
        mx = x / 0.3
        centre = 0.40 + 0.12 * curve * (1 - mx ** 2) - 0.06 * curve
        band = (np.abs(mx) <= 1) & (y >= centre - 0.025) & (y <= centre + 0.025 + 0.18 * mouth_open * (1 - mx ** 2))
        img[band] = (90, 20, 30)
        frames[i] = img
    frames = frames.astype(np.float32) + rng.normal(0, 6, frames.shape)
    return np.clip(frames, 0, 255).astype(np.uint8)


def make_clip(cfg: SynthConfig, spec: ClipSpec) -> dict:
    rng = np.random.default_rng([cfg.seed, spec.index])
    e = spec.emotion
    e_v, e_a, e_t = (_express(rng, e, cfg.visual_noise), _express(rng, e, cfg.audio_noise),
                     _express(rng, e, cfg.text_noise))
    arousal = float(np.clip(VOICE[e][3] + rng.normal(0, 0.18), 0.0, 1.0))
    seconds = float(max(0.6, cfg.seconds + rng.uniform(-cfg.seconds_jitter, cfg.seconds_jitter)))
    # the regimes draw from their own generators, so the default corpus stays the same clip for clip
    extra = np.random.default_rng([cfg.seed, spec.index, 1])
    shared = arousal if cfg.shared == "emotion" else float(extra.uniform(0.0, 1.0))   # what sets timing and loudness
    syl = _syllables(rng, seconds, shared)
    speaker_f0 = float(rng.normal(0, 18))
    look, speaker = None, -1
    if cfg.faces == "speaker":
        speaker = int(extra.integers(cfg.speakers))
        who = np.random.default_rng([cfg.seed, 1_000_003, speaker])
        speaker_f0 = float(who.normal(0, 25))
        look = {"bg": who.uniform(20, 120, size=3), "tint": who.normal(0, 22, 3), "fw": who.uniform(0.5, 0.7),
                "fh": who.uniform(0.65, 0.85)}
    loudness = None if cfg.shared == "emotion" else 0.3 + 0.65 * shared
    audio = render_audio(rng, e_a, shared, seconds, syl, speaker_f0=speaker_f0, loudness=loudness,
                         prosody=cfg.prosody)
    frames = render_video(rng, e_v, shared, seconds, cfg.fps, cfg.height, cfg.width, syl, cfg.expression, look)
    k = int(rng.integers(len(TEMPLATES_EN[e_t])))
    return {"frames": frames, "audio": audio, "english": TEMPLATES_EN[e_t][k], "chinese": TEMPLATES_ZH[e_t][k],
            "meta": {"name": spec.name, "emotion": e, "visual": e_v, "audio": e_a, "text": e_t,
                     "arousal": round(arousal, 4), "seconds": round(seconds, 3), "speaker": speaker,
                     "valence": round(VALENCE[e] + float(rng.normal(0, 0.7)), 2)}}


def _worker(args: tuple[SynthConfig, ClipSpec, str]) -> dict:
    cfg, spec, folder = args
    clip = make_clip(cfg, spec)
    write_av(Path(folder) / f"{spec.name}.{cfg.container}", clip["frames"], clip["audio"], cfg.fps, cfg.container)
    return {k: clip[k] for k in ("english", "chinese", "meta")}


def generate(cfg: SynthConfig) -> Path:
    """Write the corpus to cfg.out; returns its path."""
    if cfg.height % 2 or cfg.width % 2:
        raise ValueError(f"synth.height/width must be even for yuv420p video, got {cfg.height}x{cfg.width}")
    if len(cfg.label_balance) != len(LABELS):
        raise ValueError(f"synth.label_balance: expected {len(LABELS)} weights, got {len(cfg.label_balance)}")
    out = Path(cfg.out)
    (out / "video-labeled").mkdir(parents=True, exist_ok=True)
    (out / "video-unlabeled").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    p = np.asarray(cfg.label_balance, dtype=float) / sum(cfg.label_balance)
    total = cfg.num_labeled + cfg.num_unlabeled + cfg.num_test
    emotions = rng.choice(len(LABELS), size=total, p=p)
    order = rng.permutation(cfg.num_unlabeled + cfg.num_test)  # test clips hide among unlabeled ones
    specs: list[tuple[ClipSpec, str, str]] = []
    for i in range(cfg.num_labeled):
        specs.append((ClipSpec(f"sample_{i:08d}", LABELS[emotions[i]], i), "video-labeled", "train"))
    for j, k in enumerate(order):
        idx = cfg.num_labeled + j
        split = "test" if k < cfg.num_test else "unlabeled"
        specs.append((ClipSpec(f"sample_{idx:08d}", LABELS[emotions[idx]], idx), "video-unlabeled", split))
    t0 = time.time()
    jobs = [(cfg, s, str(out / folder)) for s, folder, _ in specs]
    with get_context("spawn").Pool(max(1, cfg.workers)) as pool:
        results = list(tqdm(pool.imap(_worker, jobs, chunksize=4), total=len(jobs), desc="synth", unit="clip"))
    dt = time.time() - t0
    print(f"synth: {len(jobs)} clips in {dt:.1f}s ({len(jobs) / max(dt, 1e-9):.1f} clips/s) -> {out}")
    splits = {s.name: split for s, _, split in specs}
    with open(out / "label-transcription.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["name", "chinese", "english"])
        for r in results:
            w.writerow([r["meta"]["name"], r["chinese"], r["english"]])
    for fname, keep in (("label-disdim.csv", "train"), ("label-test.csv", "test")):
        with open(out / fname, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["name", "discrete", "valence"])
            for r in results:
                if splits[r["meta"]["name"]] == keep:
                    w.writerow([r["meta"]["name"], r["meta"]["emotion"], r["meta"]["valence"]])
    # the true emotion of every clip in video-unlabeled/: hidden (dot file), never read by training code; the
    # pseudo-label line and the self-training round table read it to report true precision, which a real corpus cannot tell
    with open(out / TRUTH_FILE, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["name", "discrete"])
        w.writerows([r["meta"]["name"], r["meta"]["emotion"]] for r in results if splits[r["meta"]["name"]] != "train")
    (out / "synth.json").write_text(json.dumps({"config": to_dict(cfg), "clips": [r["meta"] for r in results]}))
    return out


def read_truth(path: str, shards: str) -> dict[str, str]:
    """{name: emotion} of a synthetic corpus's unlabeled clips (its hidden `.truth-unlabeled.csv`, or `path`): for
    reports of pseudo-label precision only, never for training. {} when `path` is "" and the corpus has none (a
    real corpus)."""
    f = Path(path) if path else Path(load_manifest(shards)["corpus"]) / TRUTH_FILE
    if not f.is_file():
        if path:
            raise FileNotFoundError(f"{f}: truth file not found")
        return {}
    with open(f, newline="", encoding="utf-8") as fh:
        return {r["name"]: r["discrete"] for r in csv.DictReader(fh)}
