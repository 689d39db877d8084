"""A trainable residual vector quantizer with EMA codebooks, stored the way transformers' EnCodec stores one.

Each codebook holds C vectors of the latent width D. Stage k writes the residual left by
stages 0..k-1 as the index of its nearest codeword, so the first K codes of a frame are a
coarse-to-fine description of its latent:

    latents [B, D, T] -> residual_0 = latents
    stage k: code_k = argmin_c |residual_k - embed_k[c]|^2,  residual_{k+1} = residual_k - embed_k[code_k]
    quantized = sum_k embed_k[code_k]                       codes [B, K, T]

Codewords are not trained by gradients. Each codebook keeps exponential moving averages
(EMA, decay ~0.99) of how many latents it was assigned (`cluster_size`) and of their sum
(`embed_avg`); a codeword is their ratio, the running mean of its cluster. Training also
needs:

- k-means initialisation: codewords start on clusters of real latents, not at zero;
- dead-code replacement: a codeword whose EMA cluster size falls below a threshold is
  moved onto a random latent of the current batch, so no codeword stays unused;
- a commitment loss, pulling the encoder's latents towards their quantized values;
- the straight-through estimator: the decoder sees the quantized latents, and their
  gradient goes to the encoder as if quantization were the identity.

The buffers (`inited`, `cluster_size`, `embed`, `embed_avg`) and the nearest-codeword
arithmetic are those of transformers' `EncodecEuclideanCodebook`, so `export_to` gives an
`EncodecModel` that encodes to exactly the codes this module computes.

Greedy stage-by-stage choice is not the nearest sum of K codewords. `beam_search_codes` keeps the
`width` best partial sums at every stage instead of one (width 1 is the greedy search, code for code),
and a codec whose config names an `rvq_beam_width` encodes and trains with it: the sum lands nearer
its latent, and the decoded audio nearer the input, at the same bitrate and with the same decoder.

`swap_fine_codes` replaces fine codes by others of the same codebook: what a decoder makes of fine
codes that do not fit their coarse one (decoder training's --code-noise, `evaluate hiss`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def nearest(x: Tensor, embed: Tensor) -> Tensor:
    """Index of the nearest codeword: x [N, D], embed [C, D] -> [N].

    Written as transformers' EncodecEuclideanCodebook.quantize is, operation for operation,
    so that ties and rounding resolve the same way and exported codecs give identical codes.
    """
    embed_t = embed.t()  # [D, C]
    dist = -(x.pow(2).sum(1, keepdim=True) - 2 * x @ embed_t + embed_t.pow(2).sum(0, keepdim=True))  # [N, C]
    return dist.max(dim=-1).indices


BEAM_CHUNK = 4096  # frames searched at once: width x C distances each, so memory stays bounded


def beam_search_codes(x: Tensor, embeds: list[Tensor], width: int) -> Tensor:
    """Codes [N, K] whose codeword sums sum_k embeds[k][codes[:, k]] lie near the rows of x [N, D].

    Each frame is searched on its own: after stage k the `width` partial sums nearest to x are kept
    (out of width x C extensions), and the nearest full sum wins. Width 1 is greedy residual VQ and
    calls `nearest`, so its codes are transformers' own; a width of C^(K-1) or more is exhaustive.
    """
    if width < 1:
        raise ValueError(f"beam width must be >= 1, got {width}")
    if width == 1:
        codes, residual = [], x
        for embed in embeds:
            codes.append(nearest(residual, embed))
            residual = residual - F.embedding(codes[-1], embed)
        return torch.stack(codes, 1)
    return torch.cat([_beam_search(chunk, embeds, width) for chunk in x.split(BEAM_CHUNK)])


def _beam_search(x: Tensor, embeds: list[Tensor], width: int) -> Tensor:
    N, D = x.shape
    residual = x[:, None]  # [N, b, D]: what each kept partial sum leaves of x (b = 1 before stage 1)
    error = residual.pow(2).sum(-1)  # [N, b]
    codes = x.new_zeros(N, 1, 0, dtype=torch.long)  # [N, b, k]
    for embed in embeds:
        b, w = residual.shape[1], min(width, embed.shape[0])
        # |r - e_c|^2 - |r|^2 = |e_c|^2 - 2 r.e_c for every kept residual r and codeword c, one matmul: [N, b, C]
        dist = torch.addmm(embed.pow(2).sum(1), residual.reshape(-1, D), embed.t(), alpha=-2).view(N, b, -1)
        # Only a residual's own w nearest codewords can be among the w best continuations overall.
        nearest, code = dist.topk(w, dim=2, largest=False)  # [N, b, w]
        error, flat = (error[:, :, None] + nearest).flatten(1).topk(min(width, b * w), dim=1, largest=False)  # [N, b']
        parent, code = flat // w, code.flatten(1).gather(1, flat)
        residual = residual.gather(1, parent[..., None].expand(-1, -1, D)) - embed[code]
        codes = torch.cat([codes.gather(1, parent[..., None].expand(-1, -1, codes.shape[2])), code[..., None]], 2)
    return codes[torch.arange(N), error.argmin(1)]  # [N, K]


def _kmeans_plus_plus(x: Tensor, n: int) -> Tensor:
    """n starting centroids [n, D] from the rows of x [N, D] (k-means++ seeding).

    Each centroid is a row drawn with probability proportional to its squared distance from
    the nearest centroid drawn before, so the seeds spread over all clusters of the data.
    Once every distinct row is a centroid (fewer rows than centroids), rows repeat uniformly.
    """
    chosen = torch.empty(n, dtype=torch.long, device=x.device)
    chosen[0] = torch.randint(len(x), (), device=x.device)
    dist = (x - x[chosen[0]]).pow(2).sum(1)  # [N] squared distance to the nearest centroid so far
    for i in range(1, n):
        weights = torch.where(dist.sum() > 0, dist, torch.ones_like(dist))
        chosen[i] = torch.multinomial(weights, 1)[0]
        dist = torch.minimum(dist, (x - x[chosen[i]]).pow(2).sum(1))
    return x[chosen]


def _sample_rows(x: Tensor, n: int) -> Tensor:
    """n rows of x [N, D] at random: without replacement when there are enough, with it otherwise."""
    if len(x) >= n:
        return x[torch.randperm(len(x), device=x.device)[:n]]
    return x[torch.randint(len(x), (n,), device=x.device)]


class EMACodebook(nn.Module):
    """C codewords of width D, learnt as EMA cluster means of the latents assigned to them."""

    def __init__(
        self,
        size: int,
        dim: int,
        decay: float = 0.99,
        dead_threshold: float = 0.1,
        kmeans_iters: int = 10,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"codebook size and dim must be positive, got {size} and {dim}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        if dead_threshold < 0:
            raise ValueError(f"dead-code threshold must be >= 0, got {dead_threshold}")
        self.size = size
        self.decay = decay
        self.dead_threshold = dead_threshold
        self.kmeans_iters = kmeans_iters
        self.eps = eps
        self.register_buffer("inited", torch.zeros(1))
        self.register_buffer("cluster_size", torch.zeros(size))  # EMA count of latents per codeword
        self.register_buffer("embed", torch.zeros(size, dim))  # codewords = embed_avg / cluster_size
        self.register_buffer("embed_avg", torch.zeros(size, dim))  # EMA sum of latents per codeword

    @property
    def is_initialized(self) -> bool:
        return bool(self.inited.item())

    def encode(self, x: Tensor) -> Tensor:
        """x [N, D] -> codes [N]."""
        return nearest(x, self.embed)

    def decode(self, codes: Tensor) -> Tensor:
        """codes [...] -> codewords [..., D]."""
        return F.embedding(codes, self.embed)

    def _cluster_stats(self, x: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
        """Per-codeword count [C] and sum [C, D] of the latents x [N, D] assigned by codes [N]."""
        counts = torch.bincount(codes, minlength=self.size).to(x.dtype)
        sums = torch.zeros(self.size, x.shape[1], device=x.device, dtype=x.dtype).index_add_(0, codes, x)
        return counts, sums

    @torch.no_grad()
    def initialize(self, x: Tensor, batches: int = 1) -> None:
        """k-means on the latents x [N, D], gathered from `batches` training batches.

        Codewords start on k-means++ seeds; clusters that end up empty (with fewer latents than
        codewords, the duplicate seeds) keep their starting point and are replaced as dead
        codes once training starts. Cluster sizes are divided by `batches` so that they are
        on the scale of one batch, the scale of the EMA and of the dead-code threshold.
        """
        x = x.float()
        centroids = _kmeans_plus_plus(x, self.size)  # [C, D]
        counts = torch.zeros(self.size, device=x.device)
        for _ in range(self.kmeans_iters):
            counts, sums = self._cluster_stats(x, nearest(x, centroids))
            centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
        self.embed.copy_(centroids)
        self.cluster_size.copy_(counts / batches)
        self.embed_avg.copy_(centroids * self.cluster_size[:, None])
        self.inited.fill_(1)

    @torch.no_grad()
    def update(self, x: Tensor, codes: Tensor) -> None:
        """One EMA step with the latents x [N, D] and their codes [N], then dead-code replacement."""
        counts, sums = self._cluster_stats(x.float(), codes)
        self.cluster_size.lerp_(counts, 1 - self.decay)  # decay * old + (1 - decay) * new
        self.embed_avg.lerp_(sums, 1 - self.decay)
        # Laplace smoothing keeps the division finite for codewords with a near-zero count.
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.size * self.eps) * total
        self.embed.copy_(self.embed_avg / smoothed[:, None])

        dead = self.cluster_size < self.dead_threshold
        if dead.any():
            fresh = _sample_rows(x.float(), int(dead.sum()))  # [n_dead, D]
            # A new codeword starts at the threshold: unless latents join it in the next step it
            # is dead again and moves to another latent of that batch, so unused codewords keep
            # following the encoder, whose latents move fast early in training.
            self.embed[dead] = fresh
            self.embed_avg[dead] = fresh * self.dead_threshold
            self.cluster_size[dead] = self.dead_threshold

    @torch.no_grad()
    def grow_from(self, other: nn.Module, spread: float = 1e-3) -> None:
        """Take the codewords of a codebook `other` with C / m codewords (m a power of two) and split each
        into m (the LBG split): codeword i of `other` becomes codewords i, i + C/m, ..., each moved by its own
        random offset of `spread` times the codewords' RMS, with an m-th of its EMA count. The grown codebook
        quantizes as the old one did (to within the offsets), and training pulls the copies apart onto the
        halves of their cluster; a copy whose share falls below the dead-code threshold is replaced as usual.
        """
        small = other.embed.shape[0]
        if self.size % small or (self.size // small) & (self.size // small - 1):
            raise ValueError(f"cannot grow a codebook of {small} codewords to {self.size}: not a power-of-two multiple")
        m = self.size // small
        embed = other.embed.float().repeat(m, 1)  # [C, D]: codeword i + j * C/m is a copy of codeword i
        rms = other.embed.float().pow(2).mean().sqrt()
        offsets = torch.randn_like(embed) * spread * rms
        offsets[:small] = 0  # the first copy keeps the codeword, so its code keeps its meaning
        self.embed.copy_(embed + offsets)
        self.cluster_size.copy_(other.cluster_size.float().repeat(m) / m)
        self.embed_avg.copy_(self.embed * self.cluster_size[:, None])
        self.inited.copy_(other.inited)


@dataclass
class RVQOutput:
    quantized: Tensor  # [B, D, T]; in training the straight-through sum, whose gradient goes to the latents
    codes: Tensor  # [B, K, T]
    commit_loss: Tensor  # scalar: mean over stages of |latents - sg(sum of stages 0..k)|^2


class ResidualVQ(nn.Module):
    """K EMA codebooks of C codewords applied in turn to the residual of latents [B, D, T]."""

    def __init__(
        self,
        dim: int,
        num_codebooks: int,
        codebook_size: int,
        decay: float = 0.99,
        dead_threshold: float = 0.1,
        kmeans_iters: int = 10,
        beam_width: int = 1,
    ) -> None:
        super().__init__()
        if num_codebooks < 1:
            raise ValueError(f"num_codebooks must be >= 1, got {num_codebooks}")
        if beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {beam_width}")
        self.dim = dim
        self.beam_width = beam_width
        self.codebook_size = codebook_size
        self.layers = nn.ModuleList(
            EMACodebook(codebook_size, dim, decay, dead_threshold, kmeans_iters) for _ in range(num_codebooks)
        )

    @property
    def num_codebooks(self) -> int:
        return len(self.layers)

    @property
    def is_initialized(self) -> bool:
        return all(layer.is_initialized for layer in self.layers)

    @torch.no_grad()
    def initialize(self, latents: Tensor, batches: int = 1) -> None:
        """k-means for every stage, each on the residual the initialised stages before it leave.

        latents: [B, D, T] or already flattened [N, D].
        """
        residual = latents.transpose(1, 2).reshape(-1, self.dim) if latents.ndim == 3 else latents  # [N, D]
        for layer in self.layers:
            layer.initialize(residual, batches)
            residual = residual - layer.decode(layer.encode(residual))

    def forward(self, latents: Tensor) -> RVQOutput:
        """latents [B, D, T] -> RVQOutput. In training mode also updates the codebooks.

        The first training call on uninitialised codebooks runs k-means on its own latents.
        Latents with non-finite values leave the codebooks untouched.
        """
        B, D, T = latents.shape
        x = latents.transpose(1, 2).reshape(-1, D)  # [B*T, D]
        learn = self.training and bool(torch.isfinite(x).all())
        if learn and not self.is_initialized:
            self.initialize(x.detach())
        residual = x.detach()
        quantized = torch.zeros_like(residual)  # [B*T, D]
        codes, commit = [], []
        searched = beam_search_codes(residual, [layer.embed for layer in self.layers], self.beam_width)  # [B*T, K]
        for layer, stage_codes in zip(self.layers, searched.unbind(1)):
            stage = layer.decode(stage_codes)  # [B*T, D]; each codebook learns the residual it was chosen for
            if learn:
                layer.update(residual, stage_codes)
            residual = residual - stage
            quantized = quantized + stage
            codes.append(stage_codes)
            commit.append(F.mse_loss(x, quantized))  # quantized carries no gradient: only the encoder commits
        quantized = quantized.view(B, T, D).transpose(1, 2)  # [B, D, T]
        if self.training:
            quantized = latents + (quantized - latents).detach()
        codes_t = torch.stack(codes).view(self.num_codebooks, B, T).transpose(0, 1)  # [B, K, T]
        return RVQOutput(quantized, codes_t, torch.stack(commit).mean())

    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, K', T] (K' <= K, the first K' stages) -> quantized latents [B, D, T]."""
        quantized = torch.zeros((), device=codes.device)
        for layer, stage_codes in zip(self.layers, codes.unbind(1)):
            quantized = quantized + layer.decode(stage_codes)  # [B, T, D]
        return quantized.transpose(1, 2)

    def export_to(self, quantizer: nn.Module) -> None:
        """Copy the codebooks into a transformers `EncodecResidualVectorQuantizer` with K stages."""
        self._copy(quantizer, export=True)

    def import_from(self, quantizer: nn.Module) -> None:
        """Take the codebooks and their EMA state from a transformers `EncodecResidualVectorQuantizer`.

        Codebooks smaller by a power of two are grown by splitting (`EMACodebook.grow_from`).
        """
        self._copy(quantizer, export=False)

    @torch.no_grad()
    def _copy(self, quantizer: nn.Module, export: bool) -> None:
        if len(quantizer.layers) != self.num_codebooks:
            raise ValueError(f"the other quantizer has {len(quantizer.layers)} stages, this one {self.num_codebooks}")
        for ours, theirs in zip(self.layers, quantizer.layers):
            other = theirs.codebook
            if not export and other.embed.shape[1] == ours.embed.shape[1] and other.embed.shape[0] < ours.size:
                ours.grow_from(other)
                continue
            if other.embed.shape != ours.embed.shape:
                raise ValueError(f"codebook shape {tuple(other.embed.shape)} != ours {tuple(ours.embed.shape)}")
            for name in ("inited", "cluster_size", "embed", "embed_avg"):
                if export:
                    getattr(other, name).copy_(getattr(ours, name))
                else:
                    getattr(ours, name).copy_(getattr(other, name))


def swap_fine_codes(codes: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """codes [B, K, T] with each code of codebooks 2..K replaced, with probability p, by a code of the
    same codebook drawn uniformly from the batch's B x T codes of it (for B = 1, the clip's own);
    codebook 1 is kept."""
    fine = codes[:, 1:].transpose(0, 1).reshape(codes.shape[1] - 1, -1)  # [K-1, B*T]
    picks = torch.randint(fine.shape[1], fine.shape, generator=generator)  # [K-1, B*T]
    swap = torch.rand(fine.shape, generator=generator) < p
    fine = torch.where(swap, fine.gather(1, picks), fine)
    out = codes.clone()
    out[:, 1:] = fine.view(codes.shape[1] - 1, codes.shape[0], codes.shape[2]).transpose(0, 1)
    return out
