"""Decoding codes to audio while they arrive: overlapping windows of codes, cross-faded.

The codec's decoder sees a whole code sequence at once: its convolutions look a few frames to each
side and its LSTM carries state from the start. A stream has only the codes made so far, so each
new piece is decoded inside a window of codes around it:

    codes so far   ....................|cccccccccccccccc|lll
                        context         new audio        held back (lookahead)
    window         [emitted - context, frames so far)  -> audio of the new frames

    context    frames before the new ones, so that the LSTM and the convolutions settle on what
               the whole-sequence decode has there
    lookahead  the newest frames' audio is not final (the decoder has not seen what follows them);
               it is held back until more codes arrive, or until `flush` at the end
    fade       the first samples of each new part are cross-faded from the previous window's
               decode of them, so that where two windows meet there is no step
    window     given the most frames one push brings (`piece_frames`), every window once the stream
               is long enough has the same length, context + piece_frames + lookahead (reaching
               further back than `context` after a shorter piece): the convolutions' kernels are
               prepared for each new input length (~0.1-0.5 s each in a fresh process), so a fixed
               length pays that once

The chunks concatenated have exactly the whole decode's length (frames x hop samples) and differ
from it by far less than the codec's own error (tests/test_streaming.py measures the SNR).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .codec import EncodecCodec


class StreamingDecoder:
    """Codes [B, K, n] pushed piece by piece -> audio [B, channels, samples] as it becomes final."""

    def __init__(
        self,
        codec: EncodecCodec,
        context_frames: int = 50,
        lookahead_frames: int = 4,
        fade_frames: int = 2,
        piece_frames: int | None = None,
    ):
        if not 0 < fade_frames <= lookahead_frames or context_frames < 0:
            raise ValueError("need 0 < fade_frames <= lookahead_frames and context_frames >= 0")
        self.codec = codec
        self.context, self.lookahead, self.fade = context_frames, lookahead_frames, fade_frames
        self.window = None if piece_frames is None else context_frames + piece_frames + lookahead_frames
        self.codes: Tensor | None = None  # [B, K, frames so far]
        self.emitted = 0  # frames whose audio has been handed out
        self.tail: Tensor | None = None  # the last window's decode of the next `fade` frames' audio

    def push(self, codes: Tensor) -> Tensor:
        """Add [B, K, n] codes; returns the audio that is now final (possibly 0 samples)."""
        self.codes = codes if self.codes is None else torch.cat([self.codes, codes], dim=-1)
        return self._emit(self.codes.shape[-1] - self.lookahead)

    def flush(self) -> Tensor:
        """The audio of every frame not yet handed out (call once, after the last push)."""
        if self.codes is None:
            raise ValueError("nothing was pushed")
        return self._emit(self.codes.shape[-1], final=True)

    def _emit(self, until: int, final: bool = False) -> Tensor:
        """Audio of frames [emitted, until), cross-faded with the previous window's decode of its start."""
        hop = self.codec.hop_length
        batch = self.codes.shape[0]
        if until <= self.emitted:
            return self.codes.new_zeros((batch, self.codec.channels, 0), dtype=torch.float32)
        start = max(0, self.emitted - self.context)
        if self.window is not None:
            start = max(0, min(start, self.codes.shape[-1] - self.window))
        window = self.codec.decode(self.codes[:, :, start:]).float()  # [B, C, (frames - start) * hop]
        offset = (self.emitted - start) * hop
        new = window[..., offset : (until - start) * hop].clone()
        if self.tail is not None:
            n = min(self.tail.shape[-1], new.shape[-1])
            ramp = torch.linspace(0.0, 1.0, n + 2, device=new.device)[1:-1]  # strictly between the two
            new[..., :n] = self.tail[..., :n] * (1 - ramp) + new[..., :n] * ramp
        self.tail = None if final else window[..., (until - start) * hop : (until - start + self.fade) * hop]
        self.emitted = until
        return new
