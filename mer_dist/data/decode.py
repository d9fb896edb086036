"""One PyAV demux per clip -> F uniformly sampled frames at HxW + mono 16 kHz audio.

Frames are converted (and scaled by swscale) only for the F frames that are kept, and the audio
is resampled once, inside the same pass over the container: one open, one demux.
"""
from __future__ import annotations

import bisect
import io
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import Interpolation

from mer_dist.timing import frame_times


class DecodeError(RuntimeError):
    """A clip that cannot be used: unreadable container, no video/audio stream, nothing decoded."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


@dataclass
class Clip:
    frames: np.ndarray       # uint8 [F, 3, H, W]
    frame_times: np.ndarray  # float32 [F], seconds
    audio: np.ndarray        # float32 [S], mono, sample_rate
    duration: float


def probe(source: str | Path | bytes, name: str = "") -> dict:
    """Container facts without decoding: duration, fps, stream presence. Raises DecodeError."""
    name = name or str(source)[:80]
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as c:
            v = c.streams.video[0] if c.streams.video else None
            a = c.streams.audio[0] if c.streams.audio else None
            duration = _duration(c, v, a)
            fps = float(v.average_rate) if v is not None and v.average_rate else 0.0
            return {"duration_s": duration, "fps": fps, "has_video": v is not None, "has_audio": a is not None}
    except av.error.FFmpegError as e:
        raise DecodeError(name, f"cannot open container ({e.__class__.__name__}: {e})") from None


def _duration(c, v, a) -> float:
    for s in (v, a):
        if s is not None and s.duration is not None and s.time_base is not None:
            return float(s.duration * s.time_base)
    return float(c.duration / av.time_base) if c.duration else 0.0


def decode(source: str | Path | bytes, frames: int, height: int, width: int, sample_rate: int = 16000,
           max_seconds: float = 0.0, name: str = "", threads: int = 0, need_audio: bool = True) -> Clip:
    """Decode a clip. `frames=0` decodes audio only (teacher targets); raises DecodeError on bad input."""
    name = name or str(source)[:80]
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except (av.error.FFmpegError, OSError) as e:
        raise DecodeError(name, f"cannot open container ({e.__class__.__name__})") from None
    try:
        v = container.streams.video[0] if container.streams.video else None
        a = container.streams.audio[0] if container.streams.audio else None
        if v is None and frames > 0:
            raise DecodeError(name, "no video stream")
        if a is None and need_audio:
            raise DecodeError(name, "no audio stream")
        duration = _duration(container, v, a)
        if max_seconds > 0:
            duration = min(duration, max_seconds)
        targets = frame_times(duration, frames) if frames > 0 else np.zeros(0, np.float32)
        streams = []
        if frames > 0:
            v.thread_type = "AUTO" if threads != 1 else "SLICE"
            if threads > 0:
                v.thread_count = threads
            streams.append(v)
        if a is not None:
            streams.append(a)
        out = np.zeros((frames, height, width, 3), np.uint8)
        filled = 0
        last = None
        # mono float audio already at the target rate needs no resampler (the synthetic corpus, many 16 kHz sets)
        passthrough = a is not None and a.sample_rate == sample_rate and a.codec_context.layout.nb_channels == 1 \
            and a.format is not None and a.format.name in ("flt", "fltp")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate) \
            if a is not None and not passthrough else None
        # one swscale context for all kept frames, one thread: loader workers are the parallelism (swscale's default,
        # a thread per CPU in every worker, oversubscribes the machine and made scaled pixels vary between runs)
        reformatter = av.video.reformatter.VideoReformatter()
        chunks: list[np.ndarray] = []
        n_audio = 0
        max_samples = int(max_seconds * sample_rate) if max_seconds > 0 else None
        half = 0.5 / float(v.average_rate) if v is not None and v.average_rate else 0.0
        # frames nobody keeps and no other frame refers to are not decoded at all (one thread: the setting then
        # applies to exactly the packet sent next; frame threads would apply it a few packets late)
        skip_unneeded = frames > 0 and threads == 1 and half > 0
        keep = _KeepWindows(targets, half, duration, v.time_base) if skip_unneeded else None
        skipping = False
        tlist = [float(t) for t in targets]
        vidx = v.index if v is not None and frames > 0 else -1
        for packet in container.demux(streams):
            if packet.stream_index == vidx:
                if filled >= frames:
                    if a is None or (max_samples is not None and n_audio >= max_samples):
                        break                                   # nothing more is needed from this container
                    continue
                if skip_unneeded and skipping == keep(packet.pts):
                    skipping = not skipping
                    v.codec_context.skip_frame = "NONREF" if skipping else "DEFAULT"
                for fr in packet.decode():
                    t = float(fr.time) if fr.time is not None else 0.0
                    # a decoded frame stands for [t - half, t + half): assign it to every target it covers
                    img = None
                    while filled < frames and t + half >= tlist[filled]:
                        if img is None:
                            img = reformatter.reformat(fr, width, height, "rgb24", threads=1).to_ndarray()
                        out[filled] = img
                        filled += 1
                    last = fr
            elif a is not None and (max_samples is None or n_audio < max_samples):
                for fr in packet.decode():
                    for rf in (resampler.resample(fr) if resampler is not None else (fr,)):
                        arr = rf.to_ndarray().reshape(-1)
                        chunks.append(arr)
                        n_audio += arr.size
            elif filled >= frames:
                break
        if resampler is not None:
            for rf in resampler.resample(None):
                chunks.append(rf.to_ndarray().reshape(-1))
        if frames > 0:
            if last is None:
                raise DecodeError(name, "no video frames decoded")
            if filled < frames:                     # trailing targets past the last frame: repeat it
                out[filled:] = reformatter.reformat(last, width, height, "rgb24", threads=1).to_ndarray()
        audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
        if max_samples is not None:
            audio = audio[:max_samples]
        if need_audio and audio.size == 0:
            raise DecodeError(name, "audio stream decoded to zero samples")
        return Clip(out.transpose(0, 3, 1, 2).copy(), targets, audio, duration)
    except DecodeError:
        raise
    except (av.error.FFmpegError, ValueError, IndexError) as e:
        raise DecodeError(name, f"corrupt stream ({e.__class__.__name__}: {e})") from None
    finally:
        container.close()


class _KeepWindows:
    """Whether the frame of a packet (by its pts) may be kept: it lies within half a frame of a target time, with a
    tenth of a frame to spare for rounded timestamps (the frame that first reaches a target is within half a frame of
    it), or among the last frames (trailing targets). Plain floats and a bisect: this runs for every video packet."""

    def __init__(self, targets: np.ndarray, half: float, duration: float, time_base):
        margin = 1.1 * half
        self.lo = [float(t) - margin for t in targets]
        self.hi = [float(t) + margin for t in targets]
        self.tail = duration - 4 * half
        self.tb = float(time_base) if time_base else 0.0

    def __call__(self, pts: int | None) -> bool:
        if pts is None or not self.tb:
            return True
        t = pts * self.tb
        i = bisect.bisect_right(self.lo, t) - 1          # the last window starting at or before t
        return t >= self.tail or (i >= 0 and t < self.hi[i])


_BITEXACT = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.BITEXACT


def write_av(path: Path, frames: np.ndarray | None, audio: np.ndarray | None, fps: int, container: str,
             sample_rate: int = 16000) -> None:
    """Encode frames (uint8 [T,H,W,3]) and mono float audio into one container (H.264+AAC, or MPEG-4+PCM in .avi):
    the project's one encoder (synthetic corpora and shard re-encoding)."""
    vcodec, acodec = ("libx264", "aac") if container == "mp4" else ("mpeg4", "pcm_s16le")
    # bitexact: no build/version strings or timing in the container or streams, so bytes depend on the input only
    with av.open(str(path), "w", options={"fflags": "+bitexact"}) as out:
        vs = as_ = None
        if frames is not None:
            vs = out.add_stream(vcodec, rate=fps)
            vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            vs.thread_count = 1                      # deterministic bytes
            if vcodec == "libx264":
                # one x264 thread, whatever FFmpeg's thread_count does, and no macroblock-tree rate control: its
                # float SIMD gave other bytes for the same frames depending on the process's heap (seen in CI)
                vs.options = {"preset": "veryfast", "crf": "23", "threads": "1", "flags": "+bitexact",
                              "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0:mbtree=0"}
        if audio is not None:
            as_ = out.add_stream(acodec, rate=sample_rate, layout="mono")
            as_.options = {"flags": "+bitexact"}
        if vs is not None:
            for i, img in enumerate(frames):
                # converted here, not by the encoder: PyAV's implicit conversion carries state from one encode to the
                # next, so the same frames gave other bytes (and pixels) depending on what the process encoded before.
                # One thread and BITEXACT: swscale's default is one slice per CPU, whose output differed between runs
                frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(
                    format=vs.pix_fmt, interpolation=_BITEXACT, threads=1)
                frame.pts = i
                for pkt in vs.encode(frame):
                    out.mux(pkt)
            for pkt in vs.encode():
                out.mux(pkt)
        if as_ is not None:
            fmt = as_.codec_context.format.name
            chunk = as_.codec_context.frame_size or 1024
            for start in range(0, len(audio), chunk):
                block = audio[start:start + chunk]
                arr = (block * 32767).astype(np.int16)[None] if fmt.startswith("s16") else block[None]
                frame = av.AudioFrame.from_ndarray(arr, format=fmt, layout="mono")
                frame.sample_rate, frame.pts = sample_rate, start
                for pkt in as_.encode(frame):
                    out.mux(pkt)
            for pkt in as_.encode():
                out.mux(pkt)
