"""One PyAV demux per clip -> F uniformly sampled frames at HxW + mono 16 kHz audio.

Frames are converted (and scaled by swscale) only for the F frames that are kept, and the audio
is resampled once, inside the same pass over the container: one open, one demux.
"""
from __future__ import annotations

import bisect
import contextlib
import io
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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


def probe(source: str | Path | bytes | BinaryIO, name: str = "") -> dict:
    """Container facts without decoding: duration, fps, stream presence. Raises DecodeError."""
    name = name or str(source)[:80]
    with _container(source, name) as c:
        v = c.streams.video[0] if c.streams.video else None
        a = c.streams.audio[0] if c.streams.audio else None
        fps = float(v.average_rate) if v is not None and v.average_rate else 0.0
        return {"duration_s": _duration(c, v, a), "fps": fps, "has_video": v is not None, "has_audio": a is not None}


# The container families we read, told by their first bytes and opened with that demuxer alone: FFmpeg is never
# asked to guess, so a file from elsewhere cannot pick a demuxer that opens further URLs (an HLS playlist, a concat
# list, an image sequence) -- a clip is data, and what it names is never fetched.
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")


def sniff(head: bytes) -> str | None:
    """FFmpeg's demuxer for a container's first 12 bytes (mp4/mov, avi, mkv/webm), None for anything else."""
    if len(head) >= 8 and head[4:8] in _MP4_BOXES:
        return "mov"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    return None


def open_regular(path: str | Path, name: str) -> BinaryIO:
    """A local file opened by us, never by FFmpeg (no protocol, no URL): only a regular file, and the open itself
    never blocks (a FIFO or a device named like a video is refused, not waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DecodeError(name, f"cannot open file ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DecodeError(name, "not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _duration(c, v, a) -> float:
    for s in (v, a):
        if s is not None and s.duration is not None and s.time_base is not None:
            return float(s.duration * s.time_base)
    return float(c.duration / av.time_base) if c.duration else 0.0


@contextlib.contextmanager
def _container(source: str | Path | bytes | BinaryIO, name: str):
    """The opened container, closed after; a clip that cannot be opened or read is a DecodeError with its reason.
    A path is opened as a regular file by `open_regular`, bytes are read from memory, a file object as given; in
    every case FFmpeg gets a file object and the demuxer `sniff` names, never a string to interpret."""
    owned = None
    if isinstance(source, (bytes, bytearray, memoryview)):
        fh = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        fh = owned = open_regular(source, name)
    else:
        fh = source
    try:
        start = fh.tell()
        head = fh.read(12)
        fh.seek(start)
        fmt = sniff(head)
        if fmt is None:
            raise DecodeError(name, "cannot open container (not an mp4/mov, avi or mkv/webm file)")
        try:
            container = av.open(fh, format=fmt)
        except (av.error.FFmpegError, OSError) as e:
            raise DecodeError(name, f"cannot open container ({e.__class__.__name__})") from None
        try:
            yield container
        except DecodeError:
            raise
        except (av.error.FFmpegError, ValueError, IndexError) as e:
            raise DecodeError(name, f"corrupt stream ({e.__class__.__name__}: {e})") from None
        finally:
            container.close()
    finally:
        if owned is not None:
            owned.close()


def decode(source: str | Path | bytes | BinaryIO, frames: int, height: int, width: int, sample_rate: int = 16000,
           max_seconds: float = 0.0, name: str = "", threads: int = 0, need_audio: bool = True,
           deadline: float = 0.0) -> Clip:
    """Decode a clip. `frames=0` decodes audio only (teacher targets); raises DecodeError on bad input, and when
    `deadline` (a `time.monotonic()` instant; 0 = none) passes before the clip is decoded."""
    name = name or str(source)[:80]
    with _container(source, name) as container:
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
            if deadline and time.monotonic() > deadline:
                raise DecodeError(name, "decoding ran past its time limit")
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


class _Encoder:
    """The project's one encoder (H.264 + AAC in .mp4, MPEG-4 + PCM in .avi), fed frame by frame and audio block by
    block: memory stays one frame and one audio block whatever the clip's length. Bytes depend on the input only."""

    def __init__(self, path: Path, fps: int, size: tuple[int, int] | None, audio: bool, container: str,
                 sample_rate: int = 16000):
        vcodec, acodec = ("libx264", "aac") if container == "mp4" else ("mpeg4", "pcm_s16le")
        # bitexact: no build/version strings or timing in the container or streams, so bytes depend on the input only
        self.out = av.open(str(path), "w", options={"fflags": "+bitexact"})
        self.vs = self.as_ = None
        self.n_frames = self.n_samples = 0
        if size is not None:
            self.vs = vs = self.out.add_stream(vcodec, rate=fps)
            vs.height, vs.width = size
            vs.pix_fmt = "yuv420p"
            vs.thread_count = 1                      # deterministic bytes
            if vcodec == "libx264":
                # one x264 thread, whatever FFmpeg's thread_count does, and no macroblock-tree rate control: its
                # float SIMD gave other bytes for the same frames depending on the process's heap (seen in CI)
                vs.options = {"preset": "veryfast", "crf": "23", "threads": "1", "flags": "+bitexact",
                              "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0:mbtree=0"}
        if audio:
            self.as_ = self.out.add_stream(acodec, rate=sample_rate, layout="mono")
            self.as_.options = {"flags": "+bitexact"}
            self.sample_rate, self.pending = sample_rate, np.zeros(0, np.float32)

    def frame(self, img: np.ndarray) -> None:
        """One uint8 [H, W, 3] frame."""
        # converted here, not by the encoder: PyAV's implicit conversion carries state from one encode to the
        # next, so the same frames gave other bytes (and pixels) depending on what the process encoded before.
        # One thread and BITEXACT: swscale's default is one slice per CPU, whose output differed between runs
        frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(
            format=self.vs.pix_fmt, interpolation=_BITEXACT, threads=1)
        frame.pts = self.n_frames
        self.n_frames += 1
        for pkt in self.vs.encode(frame):
            self.out.mux(pkt)

    def end_video(self) -> None:
        if self.vs is not None:
            for pkt in self.vs.encode():
                self.out.mux(pkt)
            self.vs = None

    def audio(self, samples: np.ndarray, final: bool = False) -> None:
        """Mono float samples, encoded in the codec's frame size as they fill (`final`: the rest too)."""
        fmt = self.as_.codec_context.format.name
        chunk = self.as_.codec_context.frame_size or 1024
        self.pending = np.concatenate([self.pending, samples.astype(np.float32, copy=False)])
        while len(self.pending) >= chunk or (final and len(self.pending)):
            block, self.pending = self.pending[:chunk], self.pending[chunk:]
            arr = (block * 32767).astype(np.int16)[None] if fmt.startswith("s16") else block[None]
            frame = av.AudioFrame.from_ndarray(arr, format=fmt, layout="mono")
            frame.sample_rate, frame.pts = self.sample_rate, self.n_samples
            self.n_samples += len(block)
            for pkt in self.as_.encode(frame):
                self.out.mux(pkt)

    def close(self) -> None:
        self.end_video()
        if self.as_ is not None:
            self.audio(np.zeros(0, np.float32), final=True)
            for pkt in self.as_.encode():
                self.out.mux(pkt)
        self.out.close()


def write_av(path: Path, frames: np.ndarray | None, audio: np.ndarray | None, fps: int, container: str,
             sample_rate: int = 16000) -> None:
    """Encode frames (uint8 [T,H,W,3]) and mono float audio into one container (H.264+AAC, or MPEG-4+PCM in .avi)."""
    enc = _Encoder(path, fps, frames.shape[1:3] if frames is not None else None, audio is not None, container,
                   sample_rate)
    try:
        for img in frames if frames is not None else ():
            enc.frame(img)
        enc.end_video()
        if audio is not None:
            enc.audio(audio, final=True)
    finally:
        enc.close()


def transcode(source: str | Path | bytes | BinaryIO, path: Path, fps: int, height: int, width: int, sample_rate: int = 16000,
              name: str = "") -> int:
    """Re-encode a clip to `fps` frames a second at height x width with mono `sample_rate` audio (H.264 + AAC mp4)
    in one streaming pass: frame i is the decoded frame shown at (i + 0.5) / fps, as `decode` picks them, until
    the video really ends -- neither memory nor the output follows the duration a header claims (ten hours, or a
    genuinely long clip, cost one frame and one audio block of memory). Returns the number of frames written."""
    name = name or str(source)[:80]
    with _container(source, name) as container:
        v = container.streams.video[0] if container.streams.video else None
        a = container.streams.audio[0] if container.streams.audio else None
        if v is None:
            raise DecodeError(name, "no video stream")
        half = 0.5 / float(v.average_rate) if v.average_rate else 0.0
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate) if a is not None else None
        reformatter = av.video.reformatter.VideoReformatter()
        enc = _Encoder(path, fps, (height, width), a is not None, "mp4", sample_rate)
        try:
            last, t_last = None, 0.0
            for packet in container.demux([s for s in (v, a) if s is not None]):
                for fr in packet.decode():
                    if packet.stream.type == "video":
                        t = float(fr.time) if fr.time is not None else t_last
                        img = None
                        while (enc.n_frames + 0.5) / fps <= t + half:     # every output time this frame covers
                            img = img if img is not None else reformatter.reformat(fr, width, height, "rgb24",
                                                                                    threads=1).to_ndarray()
                            enc.frame(img)
                        last, t_last = fr, t
                    else:
                        for rf in resampler.resample(fr):
                            enc.audio(rf.to_ndarray().reshape(-1))
            if last is None:
                raise DecodeError(name, "no video frames decoded")
            img = reformatter.reformat(last, width, height, "rgb24", threads=1).to_ndarray()
            while enc.n_frames == 0 or (enc.n_frames + 0.5) / fps < t_last + 2 * half:   # the last frame's span
                enc.frame(img)
            if resampler is not None:
                for rf in resampler.resample(None):
                    enc.audio(rf.to_ndarray().reshape(-1))
            return enc.n_frames
        finally:
            enc.close()
