"""Diffuser encoder and task heads.

``DiffuserConfig`` holds every architectural choice; ``attention`` switches between Diffuser
(multi-hop diffusion), ``sparse`` (one hop on the same pattern, the BigBird-style baseline) and
``full`` (dense attention, the Transformer baseline) with identical parameters, so comparisons
are fair. Inputs are padded ``input_ids: (B, L)`` with ``attention_mask: (B, L)``; inside, tokens
are packed into one batched DGL graph built once per batch from the sequence lengths.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, NamedTuple, Optional

import dgl

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .attention import DiffuserAttention
from .config import atomic_write_text
from .graph import Padding, batch_graphs
from .patterns import PatternSpec

IGNORE_INDEX = -100  # label of positions that carry no loss (padding), as in F.cross_entropy


class DiffuserConfig(BaseModel):
    """Architecture of a Diffuser model (validated; errors name the field)."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: Optional[int] = Field(default=None, ge=2)  # None: taken from the task
    hidden_size: int = Field(default=128, ge=1)
    num_heads: int = Field(default=4, ge=1)
    num_layers: int = Field(default=2, ge=1)
    ffn_size: int = Field(default=256, ge=1)
    max_positions: int = Field(default=2048, ge=1)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    attn_dropout: float = Field(default=0.1, ge=0, lt=1)
    hop_dropout: float = Field(default=0.1, ge=0, lt=1)
    layer_norm: Literal["pre", "post"] = "post"
    attention: Literal["diffuser", "sparse", "full"] = "diffuser"
    engine: Literal["dgl", "block", "auto"] = "auto"  # auto: block where it is faster (prefer_block)
    pattern: PatternSpec = PatternSpec(window=8, num_global=1, num_random=2)
    alpha: float = Field(default=0.1, ge=0, le=1)
    hops: int = Field(default=5, ge=1)
    kernel: Literal["ppr", "heat"] = "ppr"
    t: float = Field(default=1.0, gt=0)
    num_labels: Optional[int] = Field(default=None, ge=2)  # None: taken from the task
    pooling: Literal["cls", "mean"] = "cls"
    pad_token_id: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check_shapes(self) -> "DiffuserConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                             f"({self.num_heads})")
        if self.vocab_size is not None and self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id ({self.pad_token_id}) must be < vocab_size "
                             f"({self.vocab_size})")
        return self


    def resolved(self, vocab_size: int, num_labels: int) -> "DiffuserConfig":
        """This config with the task's vocabulary and label count filled in (or checked)."""
        for name, value in (("vocab_size", vocab_size), ("num_labels", num_labels)):
            mine = getattr(self, name)
            if mine is not None and mine != value:
                raise ValueError(f"model.{name} is {mine} but the task needs {value}; "
                                 f"leave it out to take it from the task")
        return DiffuserConfig.model_validate(
            {**self.model_dump(), "vocab_size": vocab_size, "num_labels": num_labels})

    def require_complete(self) -> None:
        missing = [name for name in ("vocab_size", "num_labels") if getattr(self, name) is None]
        if missing:
            raise ValueError(f"DiffuserConfig needs {', '.join(missing)} to build a model "
                             f"(set them, or call resolved(vocab_size, num_labels))")


class EncoderLayer(nn.Module):
    """Attention + feed-forward block with residuals, post- or pre-LayerNorm."""

    def __init__(self, config: DiffuserConfig) -> None:
        super().__init__()
        self.pre_norm = config.layer_norm == "pre"
        self.attention = DiffuserAttention(
            config.hidden_size, config.num_heads, alpha=config.alpha, hops=config.hops,
            kernel=config.kernel, t=config.t, attn_dropout=config.attn_dropout,
            hop_dropout=config.hop_dropout, attention=config.attention, engine=config.engine,
            pattern=config.pattern)
        self.attention_norm = nn.LayerNorm(config.hidden_size)
        self.ffn = nn.Sequential(nn.Linear(config.hidden_size, config.ffn_size), nn.GELU(),
                                 nn.Linear(config.ffn_size, config.hidden_size))
        self.ffn_norm = nn.LayerNorm(config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def _block(self, x: torch.Tensor, fn, norm: nn.LayerNorm) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(fn(norm(x)))
        return norm(x + self.dropout(fn(x)))

    def forward(self, g, x: torch.Tensor, return_attention: bool = False):
        """``x: (N, hidden)`` packed tokens of the batched graph ``g`` -> ``(N, hidden)``,
        and the layer's one-hop edge attention ``(E, H)`` with ``return_attention``."""
        attentions = []

        def attend(h: torch.Tensor) -> torch.Tensor:
            if not return_attention:
                return self.attention(g, h)
            out, attn = self.attention(g, h, return_attention=True)
            attentions.append(attn)
            return out

        x = self._block(x, attend, self.attention_norm)
        x = self._block(x, self.ffn, self.ffn_norm)
        return (x, attentions[0]) if return_attention else x


class DiffuserEncoder(nn.Module):
    """Token + learned position embeddings and ``num_layers`` encoder layers."""

    def __init__(self, config: DiffuserConfig) -> None:
        super().__init__()
        config.require_complete()
        self.config = config
        self.tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                   padding_idx=config.pad_token_id)
        self.positions = nn.Embedding(config.max_positions, config.hidden_size)
        self.embedding_norm = nn.LayerNorm(config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size) if config.layer_norm == "pre" else None

    def check_inputs(self, input_ids: torch.Tensor,
                     attention_mask: Optional[torch.Tensor]) -> Padding:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (B, L) tensor, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from "
                             f"input_ids shape {tuple(input_ids.shape)}")
        padding = Padding.from_mask(attention_mask.cpu())
        longest = max(padding.lengths)
        if longest > self.config.max_positions:
            raise ValueError(f"a sequence has {longest} tokens but max_positions is "
                             f"{self.config.max_positions}")
        vocab = self.config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(f"input_ids must be in [0, {vocab}), got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        return padding

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                return_attention: bool = False) -> "EncoderOutput":
        """``input_ids, attention_mask: (B, L)`` -> packed hidden states ``(N, hidden)``, the
        padding map and batched graph, and (``return_attention``) each layer's ``(E, H)``."""
        padding = self.check_inputs(input_ids, attention_mask)
        device = input_ids.device
        g = batch_graphs(padding.lengths, self.config.pattern).to(device)
        ids = padding.pack(input_ids)
        positions = torch.cat([torch.arange(n) for n in padding.lengths]).to(device)
        x = self.dropout(self.embedding_norm(self.tokens(ids) + self.positions(positions)))
        attentions = []
        for layer in self.layers:
            if return_attention:
                x, attn = layer(g, x, return_attention=True)
                attentions.append(attn)
            else:
                x = layer(g, x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return EncoderOutput(x, padding, g, attentions)


class EncoderOutput(NamedTuple):
    hidden: torch.Tensor  # (N, hidden) packed tokens
    padding: Padding
    graph: "dgl.DGLGraph"
    attentions: list  # per layer (E, H) edge attention, when asked for


def pool(hidden: torch.Tensor, padding: Padding, how: str) -> torch.Tensor:
    """``(N, hidden)`` packed states -> ``(B, hidden)``: first token (``cls``) or mean."""
    lengths = torch.tensor(padding.lengths, device=hidden.device)
    starts = torch.cumsum(lengths, 0) - lengths
    if how == "cls":
        return hidden[starts]
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
    total = hidden.new_zeros(len(lengths), hidden.shape[-1]).index_add_(0, segment, hidden)
    return total / lengths[:, None].to(hidden.dtype)


class PretrainedMixin:
    """``save_pretrained(dir)`` / ``from_pretrained(dir)``: config.json + weights.pt."""

    config: DiffuserConfig

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "config.json", json.dumps(
            {"class": type(self).__name__, "config": self.config.model_dump(mode="json")},
            indent=1))
        temporary = directory / ".weights.pt.tmp"
        torch.save(self.state_dict(), temporary)
        temporary.replace(directory / "weights.pt")

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu"):
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


class DiffuserForSequenceClassification(PretrainedMixin, nn.Module):
    """Encoder + pooling (``config.pooling``) + classification head -> logits ``(B, labels)``."""

    def __init__(self, config: DiffuserConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = DiffuserEncoder(config)
        self.head = ClassificationHead(config.hidden_size, config.hidden_size, config.num_labels,
                                       config.dropout)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None):
        """Returns logits ``(B, num_labels)``, or ``(loss, logits)`` when ``labels: (B,)``."""
        encoded = self.encoder(input_ids, attention_mask)
        logits = self.head(pool(encoded.hidden, encoded.padding, self.config.pooling))
        return logits if labels is None else (F.cross_entropy(logits, labels), logits)


class DiffuserForMatching(PretrainedMixin, nn.Module):
    """Two-tower matching (LRA retrieval): a shared encoder embeds both sequences to u and v,
    and an MLP classifies ``[u, v, u*v, u-v]``."""

    def __init__(self, config: DiffuserConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = DiffuserEncoder(config)
        self.head = ClassificationHead(4 * config.hidden_size, config.hidden_size,
                                       config.num_labels, config.dropout)

    def embed(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        encoded = self.encoder(input_ids, attention_mask)
        return pool(encoded.hidden, encoded.padding, self.config.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                input_ids_2: torch.Tensor, attention_mask_2: Optional[torch.Tensor],
                labels: Optional[torch.Tensor] = None):
        u, v = self.embed(input_ids, attention_mask), self.embed(input_ids_2, attention_mask_2)
        logits = self.head(torch.cat([u, v, u * v, u - v], dim=-1))
        return logits if labels is None else (F.cross_entropy(logits, labels), logits)


class DiffuserForCausalLM(PretrainedMixin, nn.Module):
    """Encoder on a causal pattern + a next-token head tied to the token embeddings.

    The pattern must be causal (``pattern.causal``: edges only from earlier to later tokens),
    so diffusion over any number of hops stays causal: position t never sees t+1 onwards.
    """

    def __init__(self, config: DiffuserConfig) -> None:
        super().__init__()
        if not config.pattern.causal:
            raise ValueError("a causal language model needs model.pattern.causal: true (without "
                             "it every token attends to the tokens it must predict)")
        self.config = config
        self.encoder = DiffuserEncoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.encoder.tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None):
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
                 top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Extend ``input_ids: (B, L)`` by ``max_new_tokens`` sampled tokens -> ``(B, L + new)``.

        ``temperature=0`` is greedy decoding; ``top_k`` samples among the k likeliest tokens.
        Each step runs the whole sequence again (no key/value cache).
        """
        if temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"temperature must be >= 0 and top_k >= 1, got {temperature}, "
                             f"{top_k}")
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
