"""Fine-tune only a codec's decoder: better sound from the same tokens, so an LM trained on them stays valid.

    python train.py decoder --codec CODEC_DIR --data DIR --out RUN [--time-limit MIN] [options]

A language model is tied to its codec's encoder and codebooks (its tokens); the decoder is free.
Training the decoder alone on the codebooks' own quantised latents lowers the reconstruction's noise
and spectral error without changing a single token:

    wav [B, 1, N] --frozen encoder + frozen RVQ--> quantized [B, D, T] --decoder (trained)--> recon [B, 1, N]
    loss = L1 + 10 MSE + mel_weight x multi-scale log-mel L1   (the codec trainer's losses)
         [+ adv_weight x hinge + feat_weight x feature matching, with --adversarial: the codec trainer's
          multi-scale STFT discriminator, trained beside the decoder from scratch]

An LM samples the fine codebooks (2..K) loosely, and a decoder that has only seen the encoder's own
codes turns a wrong fine code into hiss and false onsets. With --code-noise P each fine code of a
training batch is, with probability P, replaced by a code of the same codebook drawn from the batch
(so as common as the codes are), while the target stays the clean audio: the decoder learns to make
less of codes that do not fit. With --lm MODEL --lm-noise P a training segment's codes are, with
probability P, replaced by the codes MODEL's LM draws for it, teacher-forced on its true codes, guided
by the segment's own chromagram (against the null condition, with no caption) and sampled with MODEL's
defaults: the kind of codes, coarse ones included, that the LM picks when it generates
(`python -m musicgen_lite.evaluate hiss` shows how much hiss each kind makes). MODEL must have been
trained on this codec's tokens. The encoder, codebooks and tokens are unchanged either way.

With --beam-width W the codec searches its codes by beam search (`codebooks.rvq.beam_search_codes`), here
and wherever the saved codec encodes: the codes of a recording land nearer its latents, while the
codebooks, and so what any code sequence an LM draws decodes to, stay as they were.

RUN receives the whole codec (transformers EncodecModel format) every --save-every steps and at the
end, written aside and renamed; run again on the same RUN to go on from the decoder saved there (the
optimisers start afresh, and so does the discriminator, which is not saved). Data, splits and validation segments are the codec trainer's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import EncodecModel

from codebooks.codec import EncodecCodec
from codebooks.rvq import swap_fine_codes
from conditioning.chroma import MIN_PEAK, load_melody

from ..checkpoints import load_model
from ..cli_errors import UsageError
from ..evaluate.signal import si_sdr
from ..model import MusicGen
from ..quiet import transformers_silenced
from ..run_lock import RunInUse, RunLock
from .codec import grads_finite, load_audio_data, sample_batch, save_encodec, validation_segments
from .codec_config import TrainConfig
from .codec_losses import MultiScaleMelLoss, MultiScaleSTFTDiscriminator, discriminator_loss, generator_adversarial_losses

PROG = "train.py decoder"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--codec", required=True, help="the codec whose decoder is tuned (transformers EncodecModel dir)")
    p.add_argument("--data", required=True, type=Path, help="folder of audio files (recursive), as train.py codec")
    p.add_argument("--out", required=True, type=Path, help="run folder: the tuned codec and log.csv")
    p.add_argument("--max-steps", type=int, default=5000)
    p.add_argument("--time-limit", type=float, metavar="MIN", help="stop after MIN minutes (and save)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--segment-seconds", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--mel-weight", type=float, default=0.5, help="weight of the log-mel loss (noise between notes)")
    p.add_argument("--adversarial", action="store_true", help="add the codec trainer's multi-scale STFT discriminator")
    p.add_argument("--adv-weight", type=float, default=TrainConfig.adv_weight, help="adversarial (hinge) loss weight")
    p.add_argument("--feat-weight", type=float, default=TrainConfig.feat_weight, help="feature-matching loss weight")
    p.add_argument("--code-noise", type=float, default=0.0, metavar="P",
                   help="chance that a fine code (codebooks 2..K) of a training batch is replaced by one drawn from "
                        "the batch's codes of that codebook (default 0: the encoder's codes as they are)")
    p.add_argument("--lm", help="model directory (trained on this codec's tokens) whose LM draws the --lm-noise codes")
    p.add_argument("--lm-noise", type=float, default=0.0, metavar="P",
                   help="chance that a training segment's codes are replaced by the codes --lm's LM draws for it "
                        "(teacher-forced on the true codes, guided by the segment's chromagram; default 0)")
    p.add_argument("--beam-width", type=int, metavar="W",
                   help="choose the codes by a beam search of width W over the codebooks' sums, in training and "
                        "whenever the saved codec encodes (default: the codec's own; the codebooks stay the same)")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--valid-segments", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    return p


def load_noise_lm(path: str, codec: EncodecModel) -> MusicGen:
    """The model whose LM draws --lm-noise codes, checked to speak `codec`'s tokens (the same codebooks)."""
    try:
        model = load_model(path)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"--lm: {e}") from None
    ours = [layer.codebook.embed for layer in codec.quantizer.layers[: model.codec.num_codebooks]]
    theirs = [layer.codebook.embed for layer in model.codec.model.quantizer.layers[: model.codec.num_codebooks]]
    if len(ours) != len(theirs) or any(a.shape != b.shape or not torch.equal(a.float(), b.float()) for a, b in zip(ours, theirs)):
        raise UsageError(f"--lm {path} was not trained on this codec's tokens (its codec's codebooks differ)")
    model.lm.float()
    return model


def lm_drawn_codes(model: MusicGen, codes: torch.Tensor, wav: torch.Tensor, p: float,
                   generator: torch.Generator) -> torch.Tensor:
    """codes [B, K, T] with each row, with probability p, replaced by the codes `model`'s LM draws for
    it given its true codes and its own audio wav [B, 1, N] as the melody (no caption; a silent segment
    gets the null melody)."""
    rows = (torch.rand(codes.shape[0], generator=generator) < p).nonzero()[:, 0].tolist()
    if not rows:
        return codes
    melody = None
    if model.has_melody:
        rate = model.chroma.extractor.sample_rate
        melody = [load_melody(wav[i, 0], model.sample_rate, rate) if wav[i].abs().max() >= MIN_PEAK else None
                  for i in rows]  # a silent segment has no tune: the null melody
    out = codes.clone()
    out[rows] = model.draw_teacher_forced(codes[rows], [None] * len(rows), melody, model.generation_defaults, generator)
    return out


@torch.no_grad()
def evaluate(codec: EncodecCodec, segments: torch.Tensor, mel: MultiScaleMelLoss) -> tuple[float, float]:
    """(mean SI-SDR in dB, mean log-mel distance) of the decoded validation segments [M, 1, S]."""
    recon = torch.cat([codec.decode(codec.encode(batch))[..., : batch.shape[-1]] for batch in segments.split(16)])
    return float(np.mean(si_sdr(segments.flatten(1), recon.flatten(1)))), float(mel(recon, segments))


def tune(args: argparse.Namespace) -> None:
    start_from = args.out if (args.out / "config.json").is_file() else Path(args.codec)
    with transformers_silenced():
        model = EncodecModel.from_pretrained(start_from).float()
    model.requires_grad_(False)
    model.decoder.requires_grad_(True)
    if args.beam_width is not None:
        model.config.rvq_beam_width = args.beam_width
    rate = model.config.sampling_rate
    bandwidth = max(model.config.target_bandwidths)
    codec = EncodecCodec(model, min(len(model.quantizer.layers), model.quantizer.get_num_quantizers_for_bandwidth(bandwidth)))
    data = load_audio_data(args.data, rate, 0.1)
    hop = int(np.prod(model.config.upsampling_ratios))
    length = max(1, round(args.segment_seconds * rate / hop)) * hop
    segments = validation_segments(data.valid, length, args.valid_segments)
    mel = MultiScaleMelLoss(rate)
    noise_lm = load_noise_lm(args.lm, model) if args.lm_noise > 0 else None
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=args.lr, betas=(0.5, 0.9))
    disc = MultiScaleSTFTDiscriminator(TrainConfig.disc_filters) if args.adversarial else None
    disc_optimizer = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9)) if disc is not None else None
    model.eval()
    print(f"from {start_from}: valid SI-SDR {{:.2f}} dB, mel {{:.4f}}".format(*evaluate(codec, segments, mel)), flush=True)
    log = open(args.out / "log.csv", "a")
    started, step = time.perf_counter(), 0
    while step < args.max_steps and (args.time_limit is None or time.perf_counter() - started < 60 * args.time_limit):
        wav = sample_batch(data.train, args.batch_size, length, generator)  # [B, 1, S]
        with torch.no_grad():
            codes = codec.encode(wav)  # [B, K, T], searched as the codec encodes (its beam width)
            if args.code_noise > 0:
                codes = swap_fine_codes(codes, args.code_noise, generator)
            if noise_lm is not None:
                codes = lm_drawn_codes(noise_lm, codes, wav, args.lm_noise, generator)
            quantized = model.quantizer.decode(codes.transpose(0, 1))  # [B, D, T]
        model.decoder.train()
        recon = model.decoder(quantized)[..., : wav.shape[-1]]
        loss = F.l1_loss(recon, wav) + 10 * F.mse_loss(recon, wav) + args.mel_weight * mel(recon, wav)
        if disc is not None:
            disc.requires_grad_(False)  # the decoder's step does not train the discriminator
            with torch.no_grad():
                real = disc(wav)
            adv, feat = generator_adversarial_losses(disc(recon), real)
            loss = loss + args.adv_weight * adv + args.feat_weight * feat
            disc.requires_grad_(True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if torch.isfinite(loss) and grads_finite(model.decoder.parameters()):
            optimizer.step()
        if disc is not None:
            disc_loss = discriminator_loss(disc(recon.detach()), disc(wav))
            disc_optimizer.zero_grad(set_to_none=True)
            disc_loss.backward()
            if torch.isfinite(disc_loss) and grads_finite(disc.parameters()):
                disc_optimizer.step()
        step += 1
        model.decoder.eval()
        if step % args.save_every == 0 or step == args.max_steps:
            sdr, distance = evaluate(codec, segments, mel)
            print(f"step {step} | loss {loss.item():.4f} | valid SI-SDR {sdr:.2f} dB, mel {distance:.4f}", flush=True)
            log.write(f"{step},{time.perf_counter() - started:.1f},{loss.item():.5f},{sdr:.3f},{distance:.5f}\n")
            log.flush()
            save_encodec(model, args.out)
    sdr, distance = evaluate(codec, segments, mel)
    print(f"done at step {step}: valid SI-SDR {sdr:.2f} dB, mel {distance:.4f}; codec written to {args.out}", flush=True)
    save_encodec(model, args.out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not 0.0 <= args.code_noise <= 1.0:
            raise UsageError(f"--code-noise must lie in [0, 1], got {args.code_noise}")
        if args.beam_width is not None and args.beam_width < 1:
            raise UsageError(f"--beam-width must be >= 1, got {args.beam_width}")
        if not 0.0 <= args.lm_noise <= 1.0:
            raise UsageError(f"--lm-noise must lie in [0, 1], got {args.lm_noise}")
        if args.lm_noise > 0 and args.lm is None:
            raise UsageError("--lm-noise needs --lm MODEL, the model whose LM draws the codes")
        if not (Path(args.codec) / "config.json").is_file():
            raise UsageError(f"--codec {args.codec} has no config.json (a transformers EncodecModel directory)")
        args.out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(args.out, PROG).acquire()
        try:
            tune(args)
        finally:
            lock.release()
    except (UsageError, RunInUse) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to go on from the decoder saved in --out", file=sys.stderr)
        return 130
    return 0
