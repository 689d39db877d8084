"""Text conditioning: a T5 encoder whose hidden states condition the LM (cross-attention or a prefix).

MusicGen encodes the caption with a frozen T5 encoder, projects the hidden
states to the LM width (only when the widths differ) and zeroes the padded
positions by multiplying with the attention mask. This module reproduces that
path so that its output can be fed to the LM exactly as transformers'
`MusicgenForConditionalGeneration` would.

For training without a pretrained T5, `train_sentencepiece_tokenizer` and
`T5Conditioner.from_captions` build a small unigram tokenizer and a randomly
initialised T5 encoder from a list of captions.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5Config, T5EncoderModel, T5Tokenizer

SPIECE_FILE = "spiece.model"


def _check_texts(texts: list[str]) -> None:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of strings")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] is a {type(text).__name__}, expected a string")
        if not text.strip():
            raise ValueError(f"texts[{i}] is empty; every caption needs some text")


def train_sentencepiece_tokenizer(
    captions: list[str], out_dir: str | Path, vocab_size: int = 256
) -> PreTrainedTokenizerBase:
    """Train a unigram sentencepiece model on `captions` and save it as a T5 tokenizer in `out_dir`.

    Ids follow T5: 0 "<pad>", 1 "</s>" (appended to every sequence), 2 "<unk>"; no BOS.
    `vocab_size` is an upper bound: with few captions the trainer stops at the
    vocabulary the text supports. No sentinel (<extra_id_*>) tokens are added,
    so `len(tokenizer)` is the size of the sentencepiece vocabulary.
    """
    _check_texts(captions)
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be at least 4 (3 special ids + 1 piece), got {vocab_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        minloglevel=2,
    )
    (out_dir / SPIECE_FILE).write_bytes(model.getvalue())
    # transformers converts a sentencepiece model only when loading from a directory.
    tokenizer = T5Tokenizer.from_pretrained(str(out_dir), extra_ids=0)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


class T5Conditioner(nn.Module):
    """Caption -> (embeddings [B, L, dim], mask [B, L]) with MusicGen's T5 encoding path."""

    def __init__(
        self,
        encoder: T5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        dim: int,
        proj: nn.Module | None = None,
        freeze: bool = True,
    ):
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.dim = dim
        self.freeze = freeze
        d_model = encoder.config.d_model
        if proj is None:
            # transformers' MusicGen has an `enc_to_dec_proj` only when the widths differ.
            proj = nn.Linear(d_model, dim) if d_model != dim else nn.Identity()
        self.proj = proj
        if freeze:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> T5Conditioner:
        """A frozen encoder stays in eval mode (no dropout) while the projection trains."""
        super().train(mode)
        if self.freeze:
            self.encoder.eval()
        return self

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """input_ids and attention_mask [B, L], padded to the longest caption."""
        _check_texts(texts)
        batch = self.tokenizer(list(texts), padding=True, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        batch = self.tokenize(texts)
        device = next(self.encoder.parameters()).device
        input_ids = batch["input_ids"].to(device)  # [B, L]
        mask = batch["attention_mask"].to(device).long()  # [B, L]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            hidden = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [B, L, d_model]
        emb = self.proj(hidden)  # [B, L, dim]
        emb = emb * mask[..., None]
        return emb, mask

    def encode_each(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """`forward` of each text on its own, padded to the longest: [B, L, dim], [B, L]. A padded batch
        can round differently row by row; this way a row's states do not depend on the other texts."""
        rows = [self([text]) for text in texts]  # ([1, L_i, dim], [1, L_i]) each
        length = max(mask.shape[1] for _, mask in rows)
        emb = torch.cat([F.pad(e, (0, 0, 0, length - e.shape[1])) for e, _ in rows])
        mask = torch.cat([F.pad(m, (0, length - m.shape[1])) for _, m in rows])
        return emb, mask

    @classmethod
    def from_pretrained(cls, path: str | Path, dim: int, freeze: bool = True) -> T5Conditioner:
        """Load a T5 encoder and its tokenizer saved in one directory; the projection is freshly initialised."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"T5 directory not found: {path}")
        encoder = T5EncoderModel.from_pretrained(str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        return cls(encoder, tokenizer, dim, freeze=freeze)

    def save_pretrained(self, path: str | Path) -> None:
        """Save encoder and tokenizer (not the projection, which belongs to the owner's state_dict)."""
        self.encoder.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))

    @classmethod
    def from_captions(
        cls, captions: list[str], dim: int, out_dir: str | Path | None = None, vocab_size: int = 256, **encoder
    ) -> T5Conditioner:
        """A randomly initialised T5 encoder (`untrained`'s `encoder` options) on a sentencepiece tokenizer
        trained on `captions`.

        Trainable by default (`freeze=False`): a random encoder is only useful if it learns.
        The tokenizer is written to `out_dir` (a temporary directory if None).
        """
        if out_dir is None:
            out_dir = tempfile.mkdtemp(prefix="t5_conditioner_")
        tokenizer = train_sentencepiece_tokenizer(captions, out_dir, vocab_size=vocab_size)
        return cls.untrained(tokenizer, dim, **encoder)

    @classmethod
    def untrained(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        dim: int,
        d_model: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        d_kv: int = 64,
        d_ff: int = 1024,
        freeze: bool = False,
        seed: int = 0,
    ) -> T5Conditioner:
        """A randomly initialised T5 encoder (seeded) on an existing tokenizer."""
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=d_kv,
            d_ff=d_ff,
            num_layers=num_layers,
            num_heads=num_heads,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            is_encoder_decoder=False,
            use_cache=False,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(T5EncoderModel(config), tokenizer, dim, freeze=freeze)
