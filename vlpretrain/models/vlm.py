"""DeepSeek-VL as a list of pipeline-cuttable parts.

    part 0     ``embed``: HybridVisionEncoder + VLAdaptor + text embedding (the paper's heavy "first layer")
    parts 1..N ``layers.<i>``: decoder blocks (a ModuleDict, so names survive when a stage drops some)
    part N+1   ``head``: final RMSNorm + output projection

A pipeline stage is this same module with the parts it does not own set to None / deleted, so every
parameter keeps one fully-qualified name in every layout (what DCP resharding relies on).
"""
from __future__ import annotations

import torch
from torch import nn

from vlpretrain.config import ModelConfig
from vlpretrain.models.adaptor import VLAdaptor
from vlpretrain.models.attention import document_mask
from vlpretrain.models.init import initial_values
from vlpretrain.models.llm import DecoderBlock, OutputHead, rotary_cos_sin
from vlpretrain.models.te import TEDecoderBlock, require_te
from vlpretrain.models.vision import HybridVisionEncoder

PARTS = ("siglip", "sam", "adaptor", "llm")


class VisionLanguageEmbedding(nn.Module):
    """Text embedding with image placeholders replaced by adaptor outputs (the first pipeline stage).

    ``tokens`` (B, S) holds ``image_token_id`` on every image position: each image takes ``image_tokens``
    consecutive positions. ``images`` (B, M, 3, H, W) holds up to M images per sample in placeholder order
    (zero padding past a sample's own count), as uint8 (0..255, as the data path delivers them) or floats in
    [0, 1]; a text-only batch passes None (the towers do not run).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.image_token_id = cfg.image_token_id
        self.image_tokens = cfg.image_tokens
        self.vision = HybridVisionEncoder(cfg)
        high_dim = self.vision.sam.out_dim if self.vision.sam is not None else None
        self.adaptor = VLAdaptor(self.vision.siglip.out_dim, cfg.dim, high_dim)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # what encodes a batch of images: ``encode_images`` here; parallel/vision_split.py may replace it
        self.image_encoder = None

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> adaptor outputs (N, image_tokens, dim)."""
        return self.adaptor(*self.vision(pixels))

    def forward(self, tokens: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        is_image = tokens == self.image_token_id
        h = self.tok_embeddings(tokens.masked_fill(is_image, 0))
        if tokens.is_meta:  # shape-only pass (pipeline shape inference): splicing keeps the shape
            return h
        if images is None:
            if is_image.any():
                raise ValueError("batch has image placeholder tokens but no images")
            return h
        per_sample = is_image.sum(dim=1)
        n_images = torch.div(per_sample, self.image_tokens, rounding_mode="floor")
        if bool((per_sample % self.image_tokens != 0).any()):
            raise ValueError(f"image placeholder runs must be multiples of {self.image_tokens} tokens")
        slots = torch.arange(images.shape[1], device=tokens.device)[None, :] < n_images[:, None]
        pixels = images[slots]  # (N, 3, H, W), in placeholder order
        if pixels.dtype == torch.uint8:
            pixels = pixels.float().div_(255.0)
        encode = self.image_encoder or self.encode_images
        if pixels.shape[0] == 0:
            # An image batch without any image here: run the towers on one blank image weighted by zero, so
            # that every data-parallel rank executes (and gathers) the same modules in every image step.
            blank = encode(pixels.new_zeros(1, *images.shape[2:], dtype=torch.float32))
            return h + 0.0 * blank.sum().to(h.dtype)
        feats = encode(pixels).to(h.dtype)  # (N, image_tokens, dim)
        return h.masked_scatter(is_image.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))


class DeepSeekVL(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed: VisionLanguageEmbedding | None = VisionLanguageEmbedding(cfg)
        if cfg.impl == "te":  # transformer-engine blocks, the same parameter names (models/te.py)
            require_te()
        block = TEDecoderBlock if cfg.impl == "te" else DecoderBlock
        self.layers = nn.ModuleDict({str(i): block(cfg) for i in range(cfg.n_layers)})
        self.head: OutputHead | None = OutputHead(cfg)

    def forward(self, x: torch.Tensor, images: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """x: token ids (B, S) on the first stage, hidden states (B, S, D) on later ones.

        ``positions`` (B, S) long: rotary positions (default arange(S); packed rows restart at 0 per document).
        ``doc_ids`` (B, S) long: document ids of a packed row (``data/packing.py``); attention is then
        document-causal (token i sees j iff j <= i and both are in the same document), by the kernel
        ``model.attention`` names (``models/attention.py``). None: plain causal attention (``is_causal=True``).
        The rotary tables and the attention mask are built once here from the full-length inputs and shared by
        every block, never from a block's (possibly sequence-sharded) input.

        ``logits_at`` (B, S) bool, last stage only: the positions whose logits are wanted (those a loss reads);
        the head then returns (1, N, V) for the N selected positions in row-major order, skipping the rest.

        Returns logits (B, S, V) on the last stage, hidden states otherwise.
        """
        h = self.embed(x, images) if self.embed is not None else x
        if self.layers:
            h = self._blocks(x, h, positions, doc_ids)
        if self.head is None:
            return h
        return self.head(h if logits_at is None else h[logits_at][None])

    def _blocks(self, x: torch.Tensor, h: torch.Tensor, positions: torch.Tensor | None,
                doc_ids: torch.Tensor | None) -> torch.Tensor:
        if positions is None and self.embed is not None:  # token ids: the full length (not an SP shard)
            positions = torch.arange(x.shape[1], device=x.device)[None]  # (1, S): the tables broadcast over B
        # a later pipeline stage of unpacked rows gets no positions: each block then builds arange(S) itself
        rope = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta) if positions is not None else None
        # TE blocks take packed rows as cu_seqlens (its fused "thd" kernel): the varlen mask carries them
        kind = "varlen" if self.cfg.impl == "te" else self.cfg.attention
        mask = document_mask(doc_ids, kind) if doc_ids is not None else None
        for layer in self.layers.values():
            h = layer(h, rope, mask)
        return h


def part_of(param_name: str) -> str:
    """Which paper part a parameter belongs to: siglip, sam, adaptor or llm."""
    if param_name.startswith("embed.vision.siglip."):
        return "siglip"
    if param_name.startswith("embed.vision.sam."):
        return "sam"
    if param_name.startswith("embed.adaptor."):
        return "adaptor"
    return "llm"


def count_parameters(model: nn.Module) -> dict[str, int]:
    counts = {p: 0 for p in PARTS}
    for name, p in model.named_parameters():
        counts[part_of(name)] += p.numel()
    counts["total"] = sum(counts[p] for p in PARTS)
    return counts


def set_trainable(model: nn.Module, trainable: list[str]) -> None:
    """Freeze every part not in ``trainable``: frozen parameters get no grad and no optimizer state."""
    unknown = set(trainable) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown trainable parts {sorted(unknown)}; choose from {PARTS}")
    for name, p in model.named_parameters():
        p.requires_grad_(part_of(name) in trainable)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int = 0) -> DeepSeekVL:
    """Build on ``device`` with the layout-independent init of ``models/init.py``; on "meta" nothing is
    allocated (shapes and counts only)."""
    with torch.device("meta"):
        model = DeepSeekVL(cfg)
    if str(device) == "meta":
        return model
    model.to_empty(device=device)
    with torch.no_grad():
        for _, p, value in initial_values(model, cfg, seed):
            p.copy_(value)
    return model
