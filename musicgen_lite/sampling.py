"""The sampling loop: one decoder step per pattern step, classifier-free guidance, top-k / top-p.

Each step feeds the previous step's K tokens through the KV cache, mixes conditional and null
logits (`uncond + (cond - uncond) * cfg_coef`, the two halves of one batch; only for cfg_coef > 1, as
transformers does), samples one token
per codebook and writes it where the pattern has a free slot; slots the pattern leaves empty
keep the special token and prompt slots keep the prompt. Randomness comes from one seeded
`torch.Generator` per batch row, so a row's tokens depend on its seed, not on its neighbours.

On a CPU the loop runs on the `threads` it is given, else on `lm.decoding_threads()` (the model's
setting, else all of torch's threads, or for a small model whichever of one and all `FastestThreads`
times faster), restoring the caller's thread count afterwards. `sample_frames` yields the frames as they complete, for streaming.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from codebooks.patterns import CodebookPattern

from .lm import LMConditions, TransformerLM
from .threads import FastestThreads, intra_op_threads


@dataclass
class SamplingParams:
    top_k: int = 250
    top_p: float = 0.0
    temperature: float = 1.0
    cfg_coef: float = 3.0

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not self.cfg_coef >= 0:
            raise ValueError(f"cfg_coef must be >= 0, got {self.cfg_coef!r}")

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 and self.top_p == 0.0

    @property
    def guided(self) -> bool:
        """Guidance applies only above 1, as in transformers' MusicGen (`guidance_scale > 1`): for
        0 <= cfg_coef <= 1 the conditional logits are sampled as they are (at 1 the mix is exactly
        them anyway), so every coefficient gives the tokens transformers gives."""
        return self.cfg_coef > 1.0


def classifier_free_guidance(logits: Tensor, cfg_coef: float) -> Tensor:
    """[2B, ...] logits, conditional rows first -> [B, ...] guided logits."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + (cond - uncond) * cfg_coef


def _pick(sorted_probs: Tensor, sorted_idx: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw from [..., n] descending probabilities with uniforms u [...]."""
    cdf = sorted_probs.cumsum(-1)
    cdf = cdf / cdf[..., -1:]
    choice = torch.searchsorted(cdf, u[..., None].to(cdf.dtype)).clamp_(max=cdf.shape[-1] - 1)
    return sorted_idx.gather(-1, choice)[..., 0]


def sample_top_k(probs: Tensor, k: int, u: Tensor) -> Tensor:
    """Sample among the k most likely codes. probs [..., V], uniforms u [...] -> ids [...]."""
    top, idx = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return _pick(top, idx, u)


def sample_top_p(probs: Tensor, p: float, u: Tensor) -> Tensor:
    """Nucleus sampling: the smallest set of codes whose mass reaches p (always at least one)."""
    sorted_probs, idx = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > p
    return _pick(sorted_probs.masked_fill(outside, 0.0), idx, u)


def sample_next(logits: Tensor, params: SamplingParams, u: Tensor) -> Tensor:
    """[..., V] guided logits -> [...] codes. top_k=1 (with top_p=0) is greedy; top_p > 0 wins over top_k.
    Top-k normalises over the k best logits only: the same distribution as the renormalised top k
    of the full softmax, without exponentiating the whole vocabulary."""
    if params.greedy:
        return logits.argmax(-1)
    logits = logits.float()
    if params.temperature != 1.0:  # x / 1 is x: the division is skipped, not changed
        logits = logits / params.temperature
    if params.top_p > 0.0:
        return sample_top_p(torch.softmax(logits, dim=-1), params.top_p, u)
    top, idx = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1)
    return _pick(torch.softmax(top, dim=-1), idx, u)


@torch.no_grad()
def sample_frames(
    lm: TransformerLM,
    pattern: CodebookPattern,
    conditions: LMConditions,
    frames: int,
    params: SamplingParams,
    generators: list[torch.Generator],
    prompt: Tensor | None = None,
    progress: bool = False,
    threads: int | None = None,
    chunk_frames: int | None = None,
) -> Iterator[Tensor]:
    """Sample [B, K, frames] codes, yielded in frame order as [B, K, n] pieces: a piece as soon as at
    least `chunk_frames` more frames are complete (None: all at once), and the rest at the end.
    `conditions` holds B rows, or 2B when params.guided (the null rows after the conditional ones).
    `prompt` [B, K, P] fixes the first P frames (P <= frames); they come out first."""
    batch, cfg = len(generators), lm.cfg
    k_books, special = cfg.num_codebooks, cfg.special_token
    device = lm.device
    steps = pattern.num_steps(frames)
    where = pattern.step_index(frames).to(device)  # [K, T] step of each code
    complete_after = where.amax(0).tolist()  # [T] the step that completes each frame
    seq = torch.full((batch, k_books, steps), special, dtype=torch.long, device=device)
    free = pattern.slot_mask(frames).to(device).clone()  # [K, S] slots the loop must fill
    if prompt is not None:
        p = prompt.shape[-1]
        seq.scatter_(2, where[None, :, :p].expand(batch, -1, -1), prompt.to(device))
        free.scatter_(1, where[:, :p], False)
    todo = free.any(0).nonzero()
    first = int(todo[0]) if len(todo) else steps  # the first step with a slot to sample; steps before it are known
    chunk = frames if chunk_frames is None else max(1, chunk_frames)
    done = 0  # frames yielded so far

    def finished(step: int) -> int:
        """The number of leading frames complete once `step` is filled."""
        n = done
        while n < frames and complete_after[n] <= step:
            n += 1
        return n

    def piece(end: int) -> Tensor:
        return seq.gather(2, where[None, :, done:end].expand(batch, -1, -1))  # [B, K, end - done]

    ready = finished(first - 1)
    if ready == frames or ready >= chunk:
        yield piece(ready)
        done = ready
    if done == frames:
        return
    copies = 2 if params.guided else 1  # the conditional rows, then the null rows, see the same tokens
    rows = copies * batch
    if conditions.rows != rows:
        raise ValueError(f"conditions have {conditions.rows} rows, expected {rows}")
    cpu = device.type == "cpu"
    pace = FastestThreads((threads,) if threads is not None else lm.decoding_threads(conditions.independent_rows))
    with intra_op_threads(pace.best) if cpu else nullcontext():
        cache = lm.new_cache(conditions, steps)
        inputs = seq[:, :, :first].repeat(copies, 1, 1)  # [rows, K, first]: every known step, fed at once
        step_tokens = seq.new_empty(copies, batch, k_books, 1)  # the next inputs, written in place
        u = torch.empty(batch, k_books)  # [B, K] one uniform per row and codebook
        bar = tqdm(total=steps - first, disable=not progress, desc="generating", unit="step")
        for s in range(first, steps):
            if cpu:
                pace.start()
            logits = lm.step(inputs, cache, conditions).float()  # [rows, K, codebook_size]
            if params.guided:
                logits = classifier_free_guidance(logits, params.cfg_coef)
            for row, g in enumerate(generators):
                torch.rand(k_books, generator=g, out=u[row])
            sampled = sample_next(logits, params, u.to(device))  # [B, K]
            seq[:, :, s] = torch.where(free[:, s], sampled, seq[:, :, s])
            step_tokens.copy_(seq[None, :, :, s : s + 1])
            inputs = step_tokens.view(rows, k_books, 1)
            if cpu:
                pace.stop()
            bar.update(1)
            ready = finished(s)
            if ready - done >= chunk or (ready == frames and ready > done):
                yield piece(ready)
                done = ready
        bar.close()
