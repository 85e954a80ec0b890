"""Diffuser encoder and task heads.

``DiffuserConfig`` holds every architectural choice; ``attention`` switches between Diffuser
(multi-hop diffusion), ``sparse`` (one hop on the same pattern, the BigBird-style baseline) and
``full`` (dense attention, the Transformer baseline) with identical parameters, so comparisons
are fair. Inputs are padded ``input_ids: (B, L)`` with ``attention_mask: (B, L)``; the encoder
packs them once per forward into a :class:`PackedBatch` (padding map, pattern, graph and engine
plan on the model's device) that every layer shares.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dgl
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .attention import DiffuserAttention
from .batch import PackedBatch, Padding
from .checks import Float, Int
from .diffusion import Alpha, Diffusion, HeatTime, Hops, KernelName
from .engines import EngineName
from .io import atomic_save, atomic_write_text
from .patterns import PatternSpec
from .tasks.vocab import IGNORE_INDEX


class DiffuserConfig(BaseModel):
    """Architecture of a Diffuser model (validated; errors name the field)."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: Int | None = Field(default=None, ge=2)  # None: taken from the task
    hidden_size: Int = Field(default=128, ge=1)
    num_heads: Int = Field(default=4, ge=1)
    num_layers: Int = Field(default=2, ge=1)
    ffn_size: Int = Field(default=256, ge=1)
    max_positions: Int = Field(default=2048, ge=1)
    dropout: Float = Field(default=0.1, ge=0, lt=1)
    attn_dropout: Float = Field(default=0.1, ge=0, lt=1)
    hop_dropout: Float = Field(default=0.1, ge=0, lt=1)
    layer_norm: Literal["pre", "post"] = "post"
    attention: Literal["diffuser", "sparse", "full"] = "diffuser"
    engine: EngineName = "auto"  # see diffuser_graph.engines.choose_engine
    pattern: PatternSpec = PatternSpec(window=8, num_global=1, num_random=2)
    kernel: KernelName = "ppr"
    alpha: Alpha = 0.1
    hops: Hops = 5
    t: HeatTime = 1.0
    num_labels: Int | None = Field(default=None, ge=2)  # None: taken from the task
    pooling: Literal["cls", "mean"] = "cls"
    pad_token_id: Int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check_shapes(self) -> DiffuserConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                             f"({self.num_heads})")
        if self.vocab_size is not None and self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id ({self.pad_token_id}) must be < vocab_size "
                             f"({self.vocab_size})")
        return self

    @property
    def diffusion(self) -> Diffusion:
        """The layers' diffusion (``kernel``, ``alpha``, ``hops``, ``t``) as one value."""
        return Diffusion(kernel=self.kernel, alpha=self.alpha, hops=self.hops, t=self.t)

    def resolved(self, vocab_size: int, num_labels: int) -> DiffuserConfig:
        """This config with the task's vocabulary and label count filled in (or checked)."""
        for name, value in (("vocab_size", vocab_size), ("num_labels", num_labels)):
            mine = getattr(self, name)
            if mine is not None and mine != value:
                raise ValueError(f"model.{name} is {mine} but the task needs {value}; "
                                 f"leave it out to take it from the task")
        return DiffuserConfig.model_validate(
            {**self.model_dump(), "vocab_size": vocab_size, "num_labels": num_labels})

    def require_complete(self) -> tuple[int, int]:
        """``(vocab_size, num_labels)``, which a model needs; an error names the missing ones."""
        if self.vocab_size is None or self.num_labels is None:
            missing = [name for name in ("vocab_size", "num_labels") if getattr(self, name) is None]
            raise ValueError(f"DiffuserConfig needs {', '.join(missing)} to build a model "
                             f"(set them, or call resolved(vocab_size, num_labels))")
        return self.vocab_size, self.num_labels


class EncoderLayer(nn.Module):
    """Attention + feed-forward block with residuals, post- or pre-LayerNorm."""

    def __init__(self, config: DiffuserConfig) -> None:
        super().__init__()
        self.pre_norm = config.layer_norm == "pre"
        self.attention = DiffuserAttention(
            config.hidden_size, config.num_heads, diffusion=config.diffusion,
            attn_dropout=config.attn_dropout, hop_dropout=config.hop_dropout,
            attention=config.attention, pattern=config.pattern)
        self.attention_norm = nn.LayerNorm(config.hidden_size)
        self.ffn = nn.Sequential(nn.Linear(config.hidden_size, config.ffn_size), nn.GELU(),
                                 nn.Linear(config.ffn_size, config.hidden_size))
        self.ffn_norm = nn.LayerNorm(config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def _block(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor],
               norm: nn.LayerNorm) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(fn(norm(x)))
        return norm(x + self.dropout(fn(x)))

    def forward(self, batch: PackedBatch, x: torch.Tensor, return_attention: bool = False) -> Any:
        """``x: (N, hidden)`` packed tokens of ``batch`` -> ``(N, hidden)``, and the layer's
        one-hop edge attention ``(E, H)`` with ``return_attention``."""
        attentions = []

        def attend(h: torch.Tensor) -> torch.Tensor:
            if not return_attention:
                return self.attention(batch, h)
            out, attn = self.attention(batch, h, return_attention=True)
            attentions.append(attn)
            return out

        x = self._block(x, attend, self.attention_norm)
        x = self._block(x, self.ffn, self.ffn_norm)
        return (x, attentions[0]) if return_attention else x


class DiffuserEncoder(nn.Module):
    """Token + learned position embeddings and ``num_layers`` encoder layers."""

    def __init__(self, config: DiffuserConfig) -> None:
        super().__init__()
        vocab_size, _ = config.require_complete()
        self.config = config
        self.tokens = nn.Embedding(vocab_size, config.hidden_size,
                                   padding_idx=config.pad_token_id)
        self.positions = nn.Embedding(config.max_positions, config.hidden_size)
        self.embedding_norm = nn.LayerNorm(config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size) if config.layer_norm == "pre" else None

    def pack(self, input_ids: torch.Tensor,
             attention_mask: torch.Tensor | None) -> PackedBatch:
        """Check the inputs and pack them once: the :class:`PackedBatch` every layer shares."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (B, L) tensor, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must be a tensor shaped like input_ids "
                             f"{tuple(input_ids.shape)}, got "
                             f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
        batch = PackedBatch.from_mask(attention_mask, self.config.pattern,
                                      engine=self.config.engine, device=input_ids.device)
        longest = max(batch.lengths)
        if longest > self.config.max_positions:
            raise ValueError(f"a sequence has {longest} tokens but max_positions is "
                             f"{self.config.max_positions}")
        vocab = self.tokens.num_embeddings
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(f"input_ids must be in [0, {vocab}), got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        return batch

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_attention: bool = False) -> EncoderOutput:
        """``input_ids, attention_mask: (B, L)`` -> packed hidden states ``(N, hidden)``, the
        batch, and (``return_attention``) each layer's one-hop attention ``(E, H)``."""
        batch = self.pack(input_ids, attention_mask)
        ids = batch.pack(input_ids)
        positions = torch.cat([torch.arange(n, device=ids.device) for n in batch.lengths])
        x = self.dropout(self.embedding_norm(self.tokens(ids) + self.positions(positions)))
        attentions = []
        for layer in self.layers:
            if return_attention:
                x, attn = layer(batch, x, return_attention=True)
                attentions.append(attn)
            else:
                x = layer(batch, x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return EncoderOutput(x, batch, attentions)


@dataclass(frozen=True)
class EncoderOutput:
    hidden: torch.Tensor  # (N, hidden) packed tokens
    batch: PackedBatch
    attentions: list[torch.Tensor] = field(default_factory=list)  # per layer (E, H), if asked

    @property
    def padding(self) -> Padding:
        return self.batch.padding

    @property
    def graph(self) -> dgl.DGLGraph:
        """The batched graph; ``attentions`` are in its edge order."""
        return self.batch.graph


def pool(hidden: torch.Tensor, padding: Padding, how: str) -> torch.Tensor:
    """``(N, hidden)`` packed states -> ``(B, hidden)``: first token (``cls``) or mean."""
    lengths = torch.tensor(padding.lengths, device=hidden.device)
    starts = torch.cumsum(lengths, 0) - lengths
    if how == "cls":
        return hidden[starts]
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
    total = hidden.new_zeros(len(lengths), hidden.shape[-1]).index_add_(0, segment, hidden)
    return total / lengths[:, None].to(hidden.dtype)


class PretrainedModel(nn.Module):
    """A model built from one :class:`DiffuserConfig`, saved as a folder: ``save_pretrained(dir)``
    writes ``config.json`` (class and config) and ``weights.pt``; ``from_pretrained(dir)`` reads
    them back."""

    def __init__(self, config: DiffuserConfig) -> None:
        super().__init__()
        self.vocab_size, self.num_labels = config.require_complete()
        self.config = config

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "config.json", json.dumps(
            {"class": type(self).__name__, "config": self.config.model_dump(mode="json")},
            indent=1))
        atomic_save(directory / "weights.pt", self.state_dict())

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> Any:
        directory = Path(directory)
        for name in ("config.json", "weights.pt"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} has no {name}: not a saved model folder")
        saved = json.loads((directory / "config.json").read_text())
        if saved.get("class") != cls.__name__:
            raise ValueError(f"{directory} holds a {saved.get('class')}, not a {cls.__name__}")
        model = cls(DiffuserConfig.model_validate(saved["config"]))
        state = torch.load(directory / "weights.pt", map_location=map_location, weights_only=True)
        model.load_state_dict(state)
        return model


class ClassificationHead(nn.Module):
    """dropout -> dense -> tanh -> dropout -> out (the RoBERTa head of the authors' code)."""

    def __init__(self, in_size: int, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_size, hidden_size), nn.Tanh(),
                                 nn.Dropout(dropout), nn.Linear(hidden_size, num_labels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DiffuserForSequenceClassification(PretrainedModel):
    """Encoder + pooling (``config.pooling``) + classification head -> logits ``(B, labels)``."""

    def __init__(self, config: DiffuserConfig) -> None:
        super().__init__(config)
        self.encoder = DiffuserEncoder(config)
        self.head = ClassificationHead(config.hidden_size, config.hidden_size, self.num_labels,
                                       config.dropout)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None):
        """Returns logits ``(B, num_labels)``, or ``(loss, logits)`` when ``labels: (B,)``."""
        encoded = self.encoder(input_ids, attention_mask)
        logits = self.head(pool(encoded.hidden, encoded.padding, self.config.pooling))
        return logits if labels is None else (F.cross_entropy(logits, labels), logits)


class DiffuserForMatching(PretrainedModel):
    """Two-tower matching (LRA retrieval): a shared encoder embeds both sequences to u and v,
    and an MLP classifies ``[u, v, u*v, u-v]``."""

    def __init__(self, config: DiffuserConfig) -> None:
        super().__init__(config)
        self.encoder = DiffuserEncoder(config)
        self.head = ClassificationHead(4 * config.hidden_size, config.hidden_size,
                                       self.num_labels, config.dropout)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        encoded = self.encoder(input_ids, attention_mask)
        return pool(encoded.hidden, encoded.padding, self.config.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                input_ids_2: torch.Tensor, attention_mask_2: torch.Tensor | None,
                labels: torch.Tensor | None = None):
        u, v = self.embed(input_ids, attention_mask), self.embed(input_ids_2, attention_mask_2)
        logits = self.head(torch.cat([u, v, u * v, u - v], dim=-1))
        return logits if labels is None else (F.cross_entropy(logits, labels), logits)


class DiffuserForCausalLM(PretrainedModel):
    """Encoder on a causal pattern + a next-token head tied to the token embeddings.

    The pattern must be causal (``pattern.causal``: edges only from earlier to later tokens),
    so diffusion over any number of hops stays causal: position t never sees t+1 onwards.
    """

    def __init__(self, config: DiffuserConfig) -> None:
        if not config.pattern.causal:
            raise ValueError("a causal language model needs model.pattern.causal: true (without "
                             "it every token attends to the tokens it must predict)")
        super().__init__(config)
        self.encoder = DiffuserEncoder(config)
        self.lm_head = nn.Linear(config.hidden_size, self.vocab_size, bias=False)
        self.lm_head.weight = self.encoder.tokens.weight
        # The tied table is also the output layer: at nn.Embedding's N(0, 1) the untrained logits
        # have a spread of sqrt(hidden_size) and the loss starts far above ln(vocab). GPT-2's
        # N(0, 0.02^2) starts it at ln(vocab); the input side is unaffected (LayerNorm follows).
        with torch.no_grad():
            nn.init.normal_(self.encoder.tokens.weight, std=0.02)
            self.encoder.tokens.weight[config.pad_token_id].zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None):
        """Returns next-token logits ``(B, L, vocab)`` (zeros at padding), or ``(loss, logits)``
        with ``labels: (B, L)`` (mean cross-entropy in nats over labels != -100)."""
        encoded = self.encoder(input_ids, attention_mask)
        logits = self.lm_head(encoded.hidden)  # (N, vocab)
        padded = encoded.padding.unpack(logits)
        if labels is None:
            return padded
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must be (B, L) like input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(labels.shape)}")
        loss = F.cross_entropy(logits, encoded.padding.pack(labels), ignore_index=IGNORE_INDEX)
        return loss, padded

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend ``input_ids: (B, L)`` by ``max_new_tokens`` sampled tokens -> ``(B, L + new)``.

        ``temperature=0`` is greedy decoding; ``top_k`` samples among the k likeliest tokens.
        Each step runs the whole sequence again (no key/value cache).
        """
        if not math.isfinite(temperature) or temperature < 0 or (top_k is not None
                                                                 and top_k < 1):
            raise ValueError(f"temperature must be a finite number >= 0 and top_k >= 1, got "
                             f"{temperature}, {top_k}")
        if input_ids.shape[1] + max_new_tokens > self.config.max_positions:
            raise ValueError(f"{input_ids.shape[1]} + {max_new_tokens} tokens exceed "
                             f"max_positions ({self.config.max_positions})")
        was_training = self.training
        self.eval()
        ids = input_ids
        for _ in range(max_new_tokens):
            logits = self(ids)[:, -1]
            if temperature == 0:
                choice = logits.argmax(-1, keepdim=True)
            else:
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits / temperature, dim=-1)
                choice = torch.multinomial(probs, 1, generator=generator)
            ids = torch.cat([ids, choice], dim=1)
        self.train(was_training)
        return ids
