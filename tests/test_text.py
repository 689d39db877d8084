"""Text conditioning (tokenizer, T5 encoder path) and the null conditions used for guidance."""

import pytest
import sentencepiece as spm
import torch
from transformers import (
    AutoTokenizer,
    EncodecConfig,
    MusicgenMelodyConfig,
    MusicgenMelodyDecoderConfig,
    MusicgenMelodyForConditionalGeneration,
    T5Config,
    T5EncoderModel,
)

from conditioning import (
    ChromaConditioner,
    T5Conditioner,
    argmax_bottleneck,
    drop_conditions,
    null_chroma_features,
    null_text,
    train_sentencepiece_tokenizer,
)

CAPTIONS = [
    "happy rock with electric guitar",
    "sad piano ballad",
    "80s pop track with bassy drums and synth",
    "lofi hip hop beat with vinyl crackle",
    "orchestral film score with strings and brass",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_sentencepiece_tokenizer(CAPTIONS, out, vocab_size=64)
    return out


@pytest.fixture(scope="module")
def encoder(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, is_encoder_decoder=False
    )
    torch.manual_seed(0)
    return T5EncoderModel(config).eval()


def test_tokenizer_follows_sentencepiece_and_t5_conventions(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "spiece.model"))
    assert processor.id_to_piece([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    assert len(tokenizer) == processor.get_piece_size() <= 64
    for text in CAPTIONS + ["unseen words: zebra & xylophone", "  extra   spaces  "]:
        assert tokenizer(text)["input_ids"] == processor.encode(text) + [1]


def test_tokenizer_round_trips_and_pads(tmp_path):
    trained = train_sentencepiece_tokenizer(CAPTIONS, tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is type(trained)
    batch = loaded(CAPTIONS[:3], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == trained(CAPTIONS[:3], padding=True, return_tensors="pt")["input_ids"].tolist()
    lengths = [len(loaded(text)["input_ids"]) for text in CAPTIONS[:3]]
    assert len(set(lengths)) == 3
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["input_ids"].shape == (3, max(lengths))
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()


def test_forward_matches_direct_transformers_computation(tokenizer_dir, encoder):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    conditioner = T5Conditioner(encoder, tokenizer, dim=48)
    assert isinstance(conditioner.proj, torch.nn.Linear) and conditioner.proj.bias is not None
    texts = CAPTIONS[:3]
    emb, mask = conditioner(texts)

    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        expected = conditioner.proj(hidden) * batch["attention_mask"][..., None]
    assert emb.shape == (3, batch["input_ids"].shape[1], 48)
    assert mask.dtype == torch.long and mask.tolist() == batch["attention_mask"].tolist()
    torch.testing.assert_close(emb, expected)
    assert (emb[mask == 0] == 0).all() and (mask == 0).any()
    # padding does not change the valid positions
    for i, text in enumerate(texts):
        alone, alone_mask = conditioner([text])
        valid = int(alone_mask.sum())
        torch.testing.assert_close(emb[i, :valid], alone[0], atol=1e-5, rtol=1e-5)


def test_conditioners_reproduce_musicgen_melody_encoder_states(tokenizer_dir, encoder):
    """Text and melody conditioning equal what transformers' MusicGen-Melody feeds its decoder."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    audio = EncodecConfig(
        audio_channels=1, num_filters=4, upsampling_ratios=[8, 4], codebook_size=64, hidden_size=16,
        codebook_dim=16, num_residual_layers=1, num_lstm_layers=1,
    )
    decoder = MusicgenMelodyDecoderConfig(
        vocab_size=64, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, num_codebooks=4,
        pad_token_id=63, bos_token_id=63,
    )
    config = MusicgenMelodyConfig(
        text_encoder=encoder.config.to_dict(), audio_encoder=audio.to_dict(), decoder=decoder.to_dict(), chroma_length=7
    )
    torch.manual_seed(0)
    model = MusicgenMelodyForConditionalGeneration(config).eval()
    seen = {}
    model.decoder.register_forward_hook(lambda module, args, kwargs, out: seen.update(kwargs), with_kwargs=True)
    texts = CAPTIONS[:3]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    features = argmax_bottleneck(torch.rand(3, 3, 12))  # 3 frames, tiled to 7
    with torch.no_grad():
        model(**batch, input_features=features, decoder_input_ids=torch.zeros(3 * 4, 2, dtype=torch.long))

    text = T5Conditioner(model.text_encoder, tokenizer, dim=24, proj=model.enc_to_dec_proj)
    melody = ChromaConditioner(dim=24, chroma_length=7)
    melody.proj.load_state_dict(model.audio_enc_to_dec_proj.state_dict())
    with torch.no_grad():
        emb, _ = text(texts)
        ours = torch.cat([melody(features), emb], dim=1)  # [B, 7 + L, 24]
    torch.testing.assert_close(ours, seen["encoder_hidden_states"], atol=1e-6, rtol=1e-6)


def test_projection_rules(tokenizer_dir, encoder):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert isinstance(T5Conditioner(encoder, tokenizer, dim=32).proj, torch.nn.Identity)
    given = torch.nn.Linear(32, 16)
    conditioner = T5Conditioner(encoder, tokenizer, dim=16, proj=given)
    assert conditioner.proj is given
    emb, _ = conditioner(["sad piano"])
    assert emb.shape[-1] == 16


def test_frozen_encoder_stays_frozen(tokenizer_dir, encoder):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    conditioner = T5Conditioner(encoder, tokenizer, dim=48).train()
    assert not any(p.requires_grad for p in conditioner.encoder.parameters())
    assert not conditioner.encoder.training
    assert all(p.requires_grad for p in conditioner.proj.parameters())
    emb, _ = conditioner(["happy rock"])
    emb.sum().backward()
    assert conditioner.proj.weight.grad is not None
    assert all(p.grad is None for p in conditioner.encoder.parameters())


def test_from_captions_save_and_load(tmp_path):
    conditioner = T5Conditioner.from_captions(
        CAPTIONS, dim=24, out_dir=tmp_path / "tok", d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=64
    )
    assert conditioner.encoder.config.vocab_size == len(conditioner.tokenizer)
    assert all(p.requires_grad for p in conditioner.encoder.parameters())
    conditioner.eval()
    emb, mask = conditioner(CAPTIONS)
    emb.sum().backward()
    assert conditioner.encoder.shared.weight.grad is not None

    conditioner.save_pretrained(tmp_path / "saved")
    loaded = T5Conditioner.from_pretrained(tmp_path / "saved", dim=24)
    assert not any(p.requires_grad for p in loaded.encoder.parameters())
    loaded.proj.load_state_dict(conditioner.proj.state_dict())
    emb2, mask2 = loaded(CAPTIONS)
    assert mask2.tolist() == mask.tolist()
    torch.testing.assert_close(emb2, emb.detach())
    with pytest.raises(FileNotFoundError):
        T5Conditioner.from_pretrained(tmp_path / "nothing", dim=24)


@pytest.mark.parametrize("texts", [["ok", ""], ["ok", "   "], ["ok", 3], [], "a bare string"])
def test_bad_texts_raise(tokenizer_dir, encoder, texts):
    conditioner = T5Conditioner(encoder, AutoTokenizer.from_pretrained(tokenizer_dir), dim=32)
    with pytest.raises(ValueError):
        conditioner(texts)


def test_null_conditions():
    emb, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.long)
    null_emb, null_mask = null_text(emb, mask)
    assert null_emb.shape == emb.shape and not null_emb.any()
    assert null_mask.dtype == torch.long and not null_mask.any()
    null = null_chroma_features(torch.rand(2, 7, 12))
    assert null.shape == (2, 7, 12) and null[..., 0].eq(1).all() and not null[..., 1:].any()


def test_drop_conditions_replaces_whole_rows():
    torch.manual_seed(0)
    emb, mask = torch.randn(64, 5, 8), torch.ones(64, 5, dtype=torch.long)
    features = torch.nn.functional.one_hot(torch.randint(1, 12, (64, 3)), 12).float()

    same = drop_conditions(emb, mask, features, 0.0, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(same, (emb, mask, features)))
    gone_emb, gone_mask, gone_features = drop_conditions(emb, mask, features, 1.0)
    assert not gone_emb.any() and not gone_mask.any() and gone_features[..., 0].eq(1).all()

    out_emb, out_mask, out_features = drop_conditions(emb, mask, features, 0.5, torch.Generator().manual_seed(1))
    dropped = ~out_mask.bool().any(1)  # [B]
    assert 10 < int(dropped.sum()) < 54
    assert not out_emb[dropped].any() and torch.equal(out_emb[~dropped], emb[~dropped])
    assert torch.equal(out_features[dropped], null_chroma_features(features[dropped]))
    assert torch.equal(out_features[~dropped], features[~dropped])
    again = drop_conditions(emb, mask, features, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(again[1], out_mask)

    text_only = drop_conditions(emb, mask, None, 0.5, torch.Generator().manual_seed(1))
    assert text_only[2] is None and torch.equal(text_only[1], out_mask)
    with pytest.raises(ValueError):
        drop_conditions(emb, mask, features, 1.5)
    with pytest.raises(ValueError):
        drop_conditions(emb, mask[:3], features, 0.5)
    with pytest.raises(ValueError):
        drop_conditions(emb, mask, features, 0.1, melody_p=-0.1)


def test_melody_dropout_leaves_text_only_rows():
    """Melody dropout nulls the melody of some rows that keep their text: the text-only condition a
    prompt without a hum gives at generation. Rows dropped together stay dropped together."""
    emb, mask = torch.randn(400, 5, 8), torch.ones(400, 5, dtype=torch.long)
    features = torch.nn.functional.one_hot(torch.randint(1, 12, (400, 3)), 12).float()
    out_emb, out_mask, out_features = drop_conditions(emb, mask, features, 0.1, torch.Generator().manual_seed(2), 0.5)
    text_kept = out_mask.bool().any(1)  # [B]
    melody_kept = (out_features == features).all(dim=(1, 2))  # [B]
    melody_null = (out_features == null_chroma_features(features)).all(dim=(1, 2))
    assert torch.equal(melody_kept, ~melody_null)
    assert torch.equal(out_emb[text_kept], emb[text_kept]) and not out_emb[~text_kept].any()
    assert not (melody_kept & ~text_kept).any()  # no melody-only rows: the null text comes with a null melody
    both, text_only, none = melody_kept.float().mean(), (text_kept & ~melody_kept).float().mean(), (~text_kept).float().mean()
    assert 0.36 < both < 0.54 and 0.36 < text_only < 0.54 and 0.05 < none < 0.16  # 0.45 / 0.45 / 0.1
    # without melody dropout the same seed drops the same rows as before (runs resume on the same stream)
    plain = drop_conditions(emb, mask, features, 0.1, torch.Generator().manual_seed(2))
    assert torch.equal(plain[1], out_mask)
