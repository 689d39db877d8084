"""EncodecCodec against transformers' EncodecModel called directly, on a tiny 32 kHz / hop-640 codec."""
import math

import julius
import pytest
import torch
from transformers import EncodecConfig, EncodecModel

from codebooks.codec import EncodecCodec

CARD = 64  # 6-bit codebooks at 50 frames/s: 300 bps per codebook


def tiny_config(**overrides) -> EncodecConfig:
    kwargs = dict(
        sampling_rate=32000,
        audio_channels=1,
        num_filters=4,
        hidden_size=8,
        upsampling_ratios=[8, 5, 4, 4],  # hop 640 -> 50 frames/s
        num_lstm_layers=1,
        codebook_size=CARD,
        target_bandwidths=[1.2, 2.4],  # 4 and 8 codebooks
    )
    kwargs.update(overrides)
    return EncodecConfig(**kwargs)


def tiny_model(config: EncodecConfig, seed: int = 0) -> EncodecModel:
    """Random EnCodec whose codebooks are drawn from its own latents, so that codes vary with the input.

    (transformers initialises codebooks to zero, which would make every code 0.)
    """
    torch.manual_seed(seed)
    model = EncodecModel(config).eval()
    envelope = torch.linspace(0.1, 2.0, config.sampling_rate)
    calibration = torch.randn(2, config.audio_channels, envelope.numel()) * envelope
    with torch.no_grad():
        residual = model.encoder(calibration).transpose(1, 2).flatten(0, 1)  # [frames, D]
        for layer in model.quantizer.layers:
            codebook = layer.codebook
            codebook.embed.copy_(residual[torch.randint(len(residual), (config.codebook_size,))])
            residual = residual - codebook.decode(codebook.encode(residual[None]))[0]
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("encodec")
    tiny_model(tiny_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def codec(checkpoint):
    return EncodecCodec.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def oracle(checkpoint):
    return EncodecModel.from_pretrained(str(checkpoint)).eval()


def noise(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def oracle_encode(model: EncodecModel, wav: torch.Tensor, bandwidth: float) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(wav, bandwidth=bandwidth).audio_codes[0]  # [B, K, T]


def oracle_decode(model: EncodecModel, codes: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.decode(codes[None], [None]).audio_values


def test_properties(codec):
    assert codec.sample_rate == 32000
    assert codec.channels == 1
    assert codec.hop_length == 640
    assert codec.frame_rate == 50.0
    assert codec.num_codebooks == 4  # smallest bandwidth: 1.2 kbps / (50 Hz * 6 bits)
    assert codec.codebook_size == CARD


def test_encode_shapes_and_frame_counts(codec):
    codes = codec.encode(noise(2, 1, 16000))  # 0.5 s
    assert codes.shape == (2, 4, 25) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < CARD
    assert len(codes.unique()) > 4  # random codebooks give varied codes
    assert not codes.requires_grad
    for samples in (1, 639, 640, 641, 12345):
        assert codec.encode(noise(samples)).shape == (1, 4, math.ceil(samples / 640))
    assert codec.encode(noise(3, 1000)).shape == (3, 4, 2)  # [B, N] input


def test_encode_decode_match_transformers(codec, oracle):
    wav = noise(2, 1, 7000, seed=1)
    codes = codec.encode(wav)
    assert torch.equal(codes, oracle_encode(oracle, wav, 1.2))
    audio = codec.decode(codes)
    assert audio.shape == (2, 1, 11 * 640) and audio.dtype == torch.float32
    torch.testing.assert_close(audio, oracle_decode(oracle, codes)[..., : 11 * 640])


def test_a_codec_with_a_beam_width_searches_its_codes_and_decodes_as_before(checkpoint, oracle, tmp_path):
    config = EncodecConfig.from_pretrained(checkpoint)
    config.rvq_beam_width = 16
    EncodecModel.from_pretrained(str(checkpoint), config=config).save_pretrained(tmp_path)
    beam = EncodecCodec.from_pretrained(tmp_path)
    assert beam.beam_width == 16 and EncodecCodec.from_pretrained(checkpoint).beam_width == 1
    wav = noise(2, 1, 16000, seed=4)
    codes, greedy = beam.encode(wav), oracle_encode(oracle, wav, 1.2)
    assert codes.shape == greedy.shape and not torch.equal(codes, greedy)
    with torch.no_grad():
        latents = oracle.encoder(wav)  # [B, D, T]
        embeds = [layer.codebook.embed for layer in oracle.quantizer.layers[:4]]
        error = lambda c: (latents - sum(e[c[:, k]] for k, e in enumerate(embeds)).transpose(1, 2)).pow(2).sum()  # noqa: E731
    assert error(codes) < error(greedy)  # the searched sums lie nearer the latents
    torch.testing.assert_close(beam.decode(codes), oracle_decode(oracle, codes)[..., : codes.shape[-1] * 640])
    config.rvq_beam_width = 0
    with pytest.raises(ValueError, match="rvq_beam_width"):
        EncodecCodec(EncodecModel(config))


def test_resamples_and_downmixes_44k1_stereo(codec, oracle):
    wav = noise(2, 2, 13230, seed=2)  # 0.3 s at 44.1 kHz
    codes = codec.encode(wav, sample_rate=44100)
    resampled = julius.resample_frac(wav.mean(dim=1, keepdim=True), 44100, 32000)
    assert resampled.shape[-1] == 9600
    assert codes.shape == (2, 4, 15)
    assert torch.equal(codes, oracle_encode(oracle, resampled, 1.2))


def test_decode_length_and_bad_codes(codec):
    codes = torch.randint(0, CARD, (2, 4, 7), generator=torch.Generator().manual_seed(3))
    audio = codec.decode(codes)
    assert audio.shape == (2, 1, 7 * 640) and torch.isfinite(audio).all()
    assert torch.equal(codec.decode(codes.int()), audio)
    for bad in (
        codes.clone().fill_(CARD),  # out of range
        codes.clone().fill_(-1),
        codes[0],  # wrong ndim
        codes[:, :3],  # wrong number of codebooks
        codes.float(),
        codes[:, :, :0],  # no frames
    ):
        with pytest.raises(ValueError):
            codec.decode(bad)


def test_bad_audio_raises(codec):
    for bad in (torch.zeros(0), torch.zeros(2, 1, 0), torch.zeros(1, 1, 1, 100), torch.zeros(100, dtype=torch.long)):
        with pytest.raises(ValueError):
            codec.encode(bad)
    with pytest.raises(ValueError):
        codec.encode(torch.full((100,), float("nan")))
    with pytest.raises(ValueError):
        codec.encode(noise(100), sample_rate=0)
    with pytest.raises(ValueError):
        codec.encode(noise(1), sample_rate=44100)  # resamples to nothing


def test_save_load_round_trip(codec, tmp_path):
    wav = noise(1, 1, 5000, seed=4)
    codec.save_pretrained(tmp_path / "saved")
    reloaded = EncodecCodec.from_pretrained(tmp_path / "saved")
    codes = codec.encode(wav)
    assert torch.equal(reloaded.encode(wav), codes)
    assert torch.equal(reloaded.decode(codes), codec.decode(codes))
    with pytest.raises(FileNotFoundError):
        EncodecCodec.from_pretrained(tmp_path / "missing")


def test_num_codebooks_picks_bandwidth(oracle):
    wav = noise(1, 1, 6400, seed=5)
    full = oracle_encode(oracle, wav, 2.4)  # 8 codebooks
    assert full.shape[1] == 8
    assert torch.equal(EncodecCodec(oracle, num_codebooks=2).encode(wav), full[:, :2])
    assert torch.equal(EncodecCodec(oracle, num_codebooks=4).encode(wav), oracle_encode(oracle, wav, 1.2))
    assert torch.equal(EncodecCodec(oracle, num_codebooks=6).encode(wav), full[:, :6])
    with pytest.raises(ValueError, match="exceeds"):
        EncodecCodec(oracle, num_codebooks=9)


def test_keeps_training_state(oracle):
    wav = noise(1, 1, 3000, seed=6)
    expected = oracle_encode(oracle, wav, 1.2)
    codec = EncodecCodec(oracle)
    oracle.train()
    oracle.decoder.eval()
    try:
        assert torch.equal(codec.encode(wav), expected)
        codec.decode(expected)
        assert oracle.training and oracle.encoder.training and not oracle.decoder.training
    finally:
        oracle.eval()


def test_normalizing_codec():
    model = tiny_model(tiny_config(normalize=True), seed=7)
    codec = EncodecCodec(model)
    wav = noise(2, 1, 4000, seed=7)
    codes = codec.encode(wav)
    assert torch.equal(codes, oracle_encode(model, wav, 1.2))
    assert torch.equal(codec.encode(2 * wav), codes)  # input loudness is divided out
    torch.testing.assert_close(codec.decode(codes), oracle_decode(model, codes)[..., : codes.shape[-1] * 640])


def test_stereo_codec_duplicates_mono():
    model = tiny_model(tiny_config(audio_channels=2), seed=8)
    codec = EncodecCodec(model)
    wav = noise(2, 1, 3000, seed=8)
    codes = codec.encode(wav)
    assert torch.equal(codes, oracle_encode(model, wav.expand(-1, 2, -1), 1.2))
    assert codec.decode(codes).shape == (2, 2, 5 * 640)
    with pytest.raises(ValueError):
        codec.encode(noise(1, 3, 3000))


def test_chunked_codec_rejected():
    model = EncodecModel(tiny_config(chunk_length_s=1.0, overlap=0.01))
    with pytest.raises(ValueError, match="chunk"):
        EncodecCodec(model)
