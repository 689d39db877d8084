"""Move a trained LM onto another codec, so that a better codec does not mean training from scratch.

The transformer, the conditioners and the text encoder carry over; only the code tables change. A code
of the new codec is taken to mean what the old codes it coincides with mean. Both codecs encode the same
audio (a spread of the run's training files), and per codebook k a count C_k[new, old] is made of the
frames where the new codec chose `new` and the old one `old`:

    frame t:          0     1     2     3   ...
    old codebook k:   17    17    902   40
    new codebook k:   5     5     311   5     ->  C_k[5, 17] += 2, C_k[311, 902] += 1, C_k[5, 40] += 1

Each new code's embedding and head row start as the average of the old codes' rows, weighted by
P(old | new) = C_k[new, old] / sum_old C_k[new, old]. A code never chosen on that audio starts from the
average over all frames. The special (start / empty) token keeps its row. Fine-tuning then learns the
rest; the first codebook, which carries most of the music, is the one whose codes correspond best.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from codebooks.audio import READ_ERRORS, read_chunks
from codebooks.codec import EncodecCodec

from ..audio_data import AudioFile
from ..cli_errors import UsageError
from ..lm import TransformerLM
from ..model import MusicGen


FILE_SECONDS = 60.0  # at most this much of each file, so that the sample covers many pieces


def spread(files: list[AudioFile], count: int) -> list[AudioFile]:
    """`count` files spread evenly over `files` in path order (all of them if there are fewer)."""
    ordered = sorted(files, key=lambda f: f.rel)
    if len(ordered) <= count:
        return ordered
    return [ordered[i * len(ordered) // count] for i in range(count)]


@torch.no_grad()
def code_counts(old: EncodecCodec, new: EncodecCodec, files: list[AudioFile], seconds: float) -> Tensor:
    """C [K, new codebook size, old codebook size]: frames where the new codec chose each code and the old
    codec each of its codes, over up to `seconds` of the files' audio, at most FILE_SECONDS from the start of
    each (unreadable files are passed over)."""
    counts = torch.zeros(new.num_codebooks, new.codebook_size, old.codebook_size, dtype=torch.float64)
    heard = 0.0
    for file in files:
        if heard >= seconds:
            break
        try:  # the file's opening: only the first chunk is read
            wav, rate, _ = next(read_chunks(file.path, min(FILE_SECONDS, seconds - heard)))
        except READ_ERRORS:
            continue
        a = old.encode(wav[None], sample_rate=rate)[0].long()  # [K, T]
        b = new.encode(wav[None], sample_rate=rate)[0].long()  # [K, T']
        t = min(a.shape[-1], b.shape[-1])
        for k in range(new.num_codebooks):
            counts[k].view(-1).index_add_(0, b[k, :t] * old.codebook_size + a[k, :t], torch.ones(t, dtype=torch.float64))
        heard += wav.shape[-1] / rate
    return counts


def mix_rows(rows: Tensor, counts: Tensor) -> Tensor:
    """rows [old, D], counts [new, old] -> [new, D]: each new row the P(old | new)-weighted mean of the old
    rows; a new code without counts gets the mean weighted by how often each old code was chosen."""
    total = counts.sum(dim=1, keepdim=True)  # [new, 1]
    overall = counts.sum(dim=0, keepdim=True)  # [1, old]
    weights = torch.where(total > 0, counts / total.clamp(min=1), overall / overall.sum().clamp(min=1))
    return (weights @ rows.double()).to(rows.dtype)


def retarget(model: MusicGen, codec: EncodecCodec, files: list[AudioFile], seconds: float = 1800.0) -> Tensor:
    """Put `codec` in place of the model's codec, its LM's code embeddings and heads mixed from the old ones
    by code co-occurrence on `seconds` of `files`. Returns the share of frames, per codebook, on which the
    new code's most frequent old partner is the old codec's choice (how well the codes correspond)."""
    old, lm = model.codec, model.lm
    if codec.frame_rate != old.frame_rate or codec.num_codebooks != old.num_codebooks:
        raise UsageError(f"--codec has {codec.num_codebooks} codebooks at {codec.frame_rate:g} frames/s; the model's "
                         f"codec has {old.num_codebooks} at {old.frame_rate:g}: an LM moves only between codecs of one layout")
    # files spread over the whole set; enough of them for `seconds` even if most are a few seconds long
    counts = code_counts(old, codec, spread(files, 4 * int(seconds / 10) + 1), seconds)  # [K, new, old]
    if counts[0].sum() == 0:
        raise UsageError("none of the training files could be read to compare the two codecs")
    size, k_books = codec.codebook_size, codec.num_codebooks
    new_lm = TransformerLM(replace(lm.cfg, codebook_size=size))
    state = {k: v for k, v in lm.state_dict().items() if not k.startswith(("embed.", "heads."))}
    heads = lm.heads.weight.view(k_books, lm.cfg.codebook_size, -1)  # [K, old, D]
    new_heads = []
    for k in range(k_books):
        table = lm.embed[k].weight  # [old + 1, D], the last row the special token
        state[f"embed.{k}.weight"] = torch.cat([mix_rows(table[:-1], counts[k]), table[-1:]])
        new_heads.append(mix_rows(heads[k], counts[k]))
    state["heads.weight"] = torch.cat(new_heads)  # [K * new, D]
    new_lm.load_state_dict(state)
    new_lm.train(lm.training)
    model.lm, model.codec = new_lm.to(next(lm.parameters()).device), codec
    return counts.amax(dim=2).sum(dim=1) / counts.sum(dim=(1, 2))
