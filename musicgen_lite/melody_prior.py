"""A melody prior: from a caption alone, the tune a melody model then plays.

A melody model follows a hummed tune closely, but given no tune it must find the key, the mode and
the motion of the line in its caption. The LM learns that poorly: a key word is worth a few
thousandths of a nat per code to its objective, because the codes soon give the key away, and its
text encoder, trained with it, keeps the key words' states almost alike (cosine 0.97 between
"in Eb major" and "in A major" at the key's token in the bundled model). The prior is a second,
much smaller model trained on what the caption should decide, the melody track's pitch class per
chroma frame, with its own text encoder on the model's tokenizer:

    caption --own T5 encoder--> [B, L, d] (cross-attended)
    pitch classes  p_0 p_1 ... p_{C-1}   (C = the melody conditioner's chroma_length, ~7.8 frames/s)
    tokens         t_j = sum_i p_{jF+i} 12^(F-1-i)   F frames a token (`frames_per_token`; 1 for the bundled prior)
    TransformerLM(num_codebooks=1, codebook_size=12^F, "cross")  predicts t_{j+1} from t_<=j
    key head: start state (the caption alone) -> the window's pitch-class histogram (training only)

A token may hold F frames, so that a line takes C / F decoding steps: a step of a small model costs
its operations' overhead, whatever it computes (F = 2 halves the 61 ms a line takes, but its lines
were less varied and the audio followed the key a little less; docs/MODEL_CARD.md).

The next-pitch loss pays little for the key either (after two notes the line gives it away); the key
head's loss pays for it directly, through the same cross-attention that the first frames read.

Generation samples C pitch classes (top-k, temperature and classifier-free guidance against the null
caption, like the LM's own loop) and hands them to the LM as one-hot chroma, the form a written tune
(`--melody tune.mid`) takes: the LM then plays that line as it plays a hum. A model directory that
carries a prior (`melody_prior/`) uses it for every row asked for without a melody; a
later window of a long clip loops it like any melody.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from codebooks.patterns import make_pattern
from conditioning.null import null_text
from conditioning.text import T5Conditioner

from .lm import LMConditions, LMConfig, TransformerLM
from .sampling import SamplingParams, sample_frames


@dataclass
class PriorConfig:
    dim: int = 128  # the decoder's and its text encoder's width
    num_heads: int = 4
    num_layers: int = 3
    text_layers: int = 2
    ffn_dim: int = 512
    num_chroma: int = 12
    chroma_length: int = 79  # frames generated: the melody conditioner's window
    frames_per_token: int = 1  # F
    top_k: int | None = None  # sampling defaults of the prior's own loop (top-k None: every token)
    temperature: float = 1.0
    cfg_coef: float = 3.0

    def lm_config(self) -> LMConfig:
        return LMConfig(num_codebooks=1, codebook_size=self.num_chroma**self.frames_per_token, dim=self.dim, num_heads=self.num_heads,
                        num_layers=self.num_layers, ffn_dim=self.ffn_dim, conditioning="cross")

    def sampling(self) -> SamplingParams:
        return SamplingParams(top_k=self.top_k or self.num_chroma**self.frames_per_token, temperature=self.temperature, cfg_coef=self.cfg_coef)


class MelodyPrior(nn.Module):
    def __init__(self, cfg: PriorConfig, text: T5Conditioner):
        super().__init__()
        if text.dim != cfg.dim:
            raise ValueError(f"the prior's text encoder gives {text.dim}-wide states, the prior is {cfg.dim} wide")
        self.cfg, self.text = cfg, text
        self.lm = TransformerLM(cfg.lm_config())
        self.key_head = nn.Linear(cfg.dim, cfg.num_chroma)
        self.pattern = make_pattern("delay", 1)  # one stream: step s holds token s - 1, step 0 the start token

    @classmethod
    def untrained(cls, cfg: PriorConfig, tokenizer, seed: int = 0) -> MelodyPrior:
        """A new prior (seeded) whose text encoder reads `tokenizer`'s tokens (the model's own)."""
        text = T5Conditioner.untrained(tokenizer, cfg.dim, d_model=cfg.dim, num_layers=cfg.text_layers,
                                       num_heads=cfg.num_heads, d_kv=cfg.dim // cfg.num_heads, d_ff=cfg.ffn_dim, seed=seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(cfg, text)

    def conditions(self, texts: list[str | None], guided: bool, each: bool = True) -> LMConditions:
        """Captions (None: the null caption) -> cross-attention conditions, with the null caption's rows
        after them when guided. `each`: every caption encoded on its own (`T5Conditioner.encode_each`),
        so that a row's line does not depend on the other rows; training encodes the batch at once."""
        placeholders = [text or "." for text in texts]  # a dropped row's placeholder is zeroed below
        emb, mask = self.text.encode_each(placeholders) if each else self.text(placeholders)
        dropped = torch.tensor([not text for text in texts], device=emb.device)
        null_emb, null_mask = null_text(emb, mask)
        emb, mask = torch.where(dropped[:, None, None], null_emb, emb), torch.where(dropped[:, None], null_mask, mask)
        if guided:
            emb, mask = torch.cat([emb, null_emb]), torch.cat([mask, null_mask])
        return LMConditions(cross=emb, cross_mask=mask, independent_rows=True)

    def tokens(self, pitches: Tensor) -> Tensor:
        """Pitch classes [B, C] -> tokens [B, ceil(C / F)] (a short last token repeats its last frame)."""
        f = self.cfg.frames_per_token
        pad = -pitches.shape[1] % f
        pitches = torch.cat([pitches, pitches[:, -1:].expand(-1, pad)], dim=1)
        places = self.cfg.num_chroma ** torch.arange(f - 1, -1, -1, device=pitches.device)  # [F]
        return (pitches.view(pitches.shape[0], -1, f) * places).sum(-1)

    def pitches(self, tokens: Tensor) -> Tensor:
        """Tokens [B, T] -> pitch classes [B, chroma_length]."""
        f, n = self.cfg.frames_per_token, self.cfg.num_chroma
        places = n ** torch.arange(f - 1, -1, -1, device=tokens.device)
        return (tokens[..., None] // places % n).flatten(1)[:, : self.cfg.chroma_length]

    def loss(self, pitches: Tensor, texts: list[str | None]) -> tuple[Tensor, Tensor]:
        """(Mean cross-entropy of the next token, key loss), in nats, for pitch classes [B, C] and
        captions (None: dropped, for guidance). The key loss is the soft cross-entropy of the key head's
        guess from the start state, which has seen nothing but the caption, against the row's
        pitch-class histogram."""
        seq = self.pattern.build(self.tokens(pitches)[:, None], self.lm.cfg.special_token)  # [B, 1, T + 1]
        states = self.lm.states(seq[:, :, :-1], self.conditions(texts, guided=False, each=False))  # [B, T, d]
        logits = self.lm.logits(states)  # [B, 1, T, 12^F]
        ce = F.cross_entropy(logits.float().flatten(0, 2), seq[:, :, 1:].flatten())
        histogram = F.one_hot(pitches, self.cfg.num_chroma).float().mean(1)  # [B, 12]
        key = -(histogram * F.log_softmax(self.key_head(states[:, 0]).float(), dim=-1)).sum(-1).mean()
        return ce, key

    @torch.no_grad()
    def sample(self, texts: list[str], generators: list[torch.Generator], params: SamplingParams | None = None) -> Tensor:
        """Captions -> one-hot chroma [B, chroma_length, 12], one line per row, drawn from its generator."""
        params = params or self.cfg.sampling()
        cond = self.conditions(list(texts), params.guided)
        steps = -(-self.cfg.chroma_length // self.cfg.frames_per_token)
        pieces = sample_frames(self.lm, self.pattern, cond, steps, params, generators, threads=1)
        return F.one_hot(self.pitches(torch.cat(list(pieces), dim=-1)[:, 0]), self.cfg.num_chroma).float()  # [B, C, 12]

    def save_pretrained(self, path: str | Path) -> None:
        """config.json, model.safetensors (decoder and key head) and text_encoder/."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v for k, v in self.state_dict().items() if not k.startswith("text.")}
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path / "model.safetensors")
        (path / "config.json").write_text(json.dumps(asdict(self.cfg), indent=2))
        self.text.save_pretrained(path / "text_encoder")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MelodyPrior:
        path = Path(path)
        cfg = PriorConfig(**json.loads((path / "config.json").read_text()))
        prior = cls(cfg, T5Conditioner.from_pretrained(path / "text_encoder", dim=cfg.dim))
        missing, unexpected = prior.load_state_dict(load_file(path / "model.safetensors"), strict=False)
        if unexpected or any(not k.startswith("text.") for k in missing):
            raise ValueError(f"{path}: weights do not fit the prior's config")
        return prior.eval()
