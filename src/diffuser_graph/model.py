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
from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator
from torch import nn

from .attention import DiffuserAttention
from .batch import PackedBatch, Padding
from .checks import Float, Int, UserPath
from .diffusion import Alpha, Diffusion, HeatTime, Hops, KernelName
from .engines import EngineName
from .io import atomic_write, atomic_write_text, read_text
from .patterns import PatternSpec
from .tasks.vocab import IGNORE_INDEX, PAD_ID

ARCHITECTURE = ("vocab_size", "hidden_size", "num_heads", "num_layers", "ffn_size",
                "position_offset", "type_vocab_size", "layer_norm", "layer_norm_eps", "activation",
                "pad_token_id")  # fixed by pretrained weights: what a converted model cannot change


class DiffuserConfig(BaseModel):
    """Architecture of a Diffuser model (validated; errors name the field)."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: Int | None = Field(default=None, ge=2)  # None: taken from the task
    hidden_size: Int = Field(default=128, ge=1)
    num_heads: Int = Field(default=4, ge=1)
    num_layers: Int = Field(default=2, ge=1)
    ffn_size: Int = Field(default=256, ge=1)
    max_positions: Int = Field(default=2048, ge=1)  # rows of the position table
    position_offset: Int = Field(default=0, ge=0)  # row of the first token (RoBERTa: pad id + 1)
    type_vocab_size: Int = Field(default=0, ge=0)  # token-type rows (BERT 2, RoBERTa 1; 0: none)
    dropout: Float = Field(default=0.1, ge=0, lt=1)
    attn_dropout: Float = Field(default=0.1, ge=0, lt=1)
    hop_dropout: Float = Field(default=0.1, ge=0, lt=1)
    # before_mix: on A z before theta_k V is added; after_mix: on the mixed iterate (the
    # authors' code); learned hop weights need before_mix
    hop_dropout_at: Literal["before_mix", "after_mix"] = "before_mix"
    layer_norm: Literal["pre", "post"] = "post"
    layer_norm_eps: Float = Field(default=1e-5, gt=0)
    activation: Literal["gelu", "gelu_tanh", "relu"] = "gelu"  # of the feed-forward blocks
    attention: Literal["diffuser", "sparse", "full"] = "diffuser"
    engine: EngineName = "auto"  # see diffuser_graph.engines.choose_engine
    # 0: keep every layer's attention and hops for backward; h: h heads at a time, their
    # attention recomputed in backward (less memory, one more score product and softmax)
    recompute_heads: Int = Field(default=0, ge=0)
    # with recompute_heads: recompute the hops too instead of keeping their inputs (K copies of
    # the values): least memory, K more hops
    recompute_hops: StrictBool = False
    pattern: PatternSpec = PatternSpec(window=8, num_global=1, num_random=2)
    kernel: KernelName = "ppr"
    alpha: Alpha = 0.1
    hops: Hops = 5
    t: HeatTime = 1.0
    num_labels: Int | None = Field(default=None, ge=2)  # None: taken from the task
    pooling: Literal["cls", "mean"] = "cls"
    pad_token_id: Int | None = Field(default=None, ge=0)  # None: taken from the task
    init_from: UserPath | None = None  # a saved model folder whose weights training starts from

    @model_validator(mode="after")
    def _check_shapes(self) -> DiffuserConfig:
        if self.recompute_hops and not self.recompute_heads:
            raise ValueError("recompute_hops=true needs recompute_heads > 0 (the heads computed, "
                             "and recomputed, at a time)")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                             f"({self.num_heads})")
        if (self.vocab_size is not None and self.pad_token_id is not None
                and self.pad_token_id >= self.vocab_size):
            raise ValueError(f"pad_token_id ({self.pad_token_id}) must be < vocab_size "
                             f"({self.vocab_size})")
        if self.position_offset >= self.max_positions:
            raise ValueError(f"position_offset ({self.position_offset}) leaves no row of the "
                             f"{self.max_positions}-row position table")
        if self.kernel == "learned" and self.hop_dropout_at == "after_mix":
            raise ValueError("hop_dropout_at: after_mix needs a fixed kernel (ppr, heat); "
                             "learned hop weights drop out each power A^j V (before_mix)")
        return self

    @property
    def diffusion(self) -> Diffusion:
        """The layers' diffusion (``kernel``, ``alpha``, ``hops``, ``t``) as one value."""
        return Diffusion(kernel=self.kernel, alpha=self.alpha, hops=self.hops, t=self.t)

    @property
    def max_tokens(self) -> int:
        """The longest sequence the position table holds."""
        return self.max_positions - self.position_offset

    def resolved(self, vocab_size: int, num_labels: int, pad_token_id: int = PAD_ID
                 ) -> DiffuserConfig:
        """This config with the task's vocabulary, label count and padding id filled in (or
        checked)."""
        for name, value in (("vocab_size", vocab_size), ("num_labels", num_labels)):
            mine = getattr(self, name)
            if mine is not None and mine != value:
                raise ValueError(f"model.{name} is {mine} but the task needs {value}; "
                                 f"leave it out to take it from the task")
        pad = pad_token_id if self.pad_token_id is None else self.pad_token_id
        return DiffuserConfig.model_validate({**self.model_dump(), "vocab_size": vocab_size,
                                              "num_labels": num_labels, "pad_token_id": pad})

    def require(self, *names: str) -> tuple[int, ...]:
        """The values of ``names`` (e.g. ``"vocab_size"``), which a model needs; an error names
        the missing ones."""
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ValueError(f"DiffuserConfig needs {', '.join(missing)} to build this model "
                             f"(set them, or call resolved(vocab_size, num_labels))")
        return tuple(getattr(self, name) for name in names)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU}


class EncoderLayer(nn.Module):
    """Attention + feed-forward block with residuals, post- or pre-LayerNorm."""

    def __init__(self, config: DiffuserConfig) -> None:
        super().__init__()
        self.pre_norm = config.layer_norm == "pre"
        self.attention = DiffuserAttention(
            config.hidden_size, config.num_heads, diffusion=config.diffusion,
            attn_dropout=config.attn_dropout, hop_dropout=config.hop_dropout,
            hop_dropout_at=config.hop_dropout_at,
            attention=config.attention, pattern=config.pattern,
            recompute_heads=config.recompute_heads, recompute_hops=config.recompute_hops)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = nn.Sequential(nn.Linear(config.hidden_size, config.ffn_size),
                                 ACTIVATIONS[config.activation](),
                                 nn.Linear(config.ffn_size, config.hidden_size))
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
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


class PretrainedModel(nn.Module):
    """A model built from one :class:`DiffuserConfig`, saved as a folder: ``save_pretrained(dir)``
    writes ``config.json`` (class and config) and ``model.safetensors``; ``from_pretrained(dir)``
    reads them back (older folders with ``weights.pt`` too)."""

    def __init__(self, config: DiffuserConfig) -> None:
        super().__init__()
        (self.vocab_size,) = config.require("vocab_size")
        self.config = config

    @property
    def backbone(self) -> DiffuserEncoder:
        """The encoder (the model itself for a bare encoder)."""
        encoder = self if isinstance(self, DiffuserEncoder) else self.encoder
        assert isinstance(encoder, DiffuserEncoder)
        return encoder

    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_model

        directory = Path(directory).expanduser()
        atomic_write(directory / "model.safetensors",
                     lambda temporary: save_model(self, str(temporary)))
        atomic_write_text(directory / "config.json", json.dumps(
            {"class": type(self).__name__, "config": self.config.model_dump(mode="json")},
            indent=1))

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> Any:
        model = load_pretrained(directory, map_location)
        if not isinstance(model, cls):
            raise ValueError(f"{directory} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def initialise_from(self, directory: str | Path) -> str:
        """Start from the weights of a saved model folder: its encoder always (every weight must
        fit), its head too when the folder holds this class with heads of the same shapes.
        Returns what was taken, for a log line."""
        saved = load_pretrained(directory)
        try:
            self.backbone.load_state_dict(saved.backbone.state_dict())
        except RuntimeError as err:
            raise ValueError(f"the encoder in {directory} does not fit this model: "
                             f"{str(err).splitlines()[0]}") from None
        mine, theirs = self.state_dict(), saved.state_dict()
        if type(saved) is type(self) and all(
                theirs[key].shape == value.shape for key, value in mine.items()):
            self.load_state_dict(theirs)
            return f"encoder and head of {directory}"
        return f"encoder of {directory} (a {type(saved).__name__}; the head starts fresh)"


def load_pretrained(directory: str | Path, map_location: str = "cpu") -> PretrainedModel:
    """The model saved in ``directory`` by ``save_pretrained``, as the class it records."""
    directory = Path(directory).expanduser()
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a saved model folder")
    try:
        saved = json.loads(read_text(directory / "config.json"))
        name, config = saved["class"], DiffuserConfig.model_validate(saved["config"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{directory / 'config.json'} is not a saved model's config: "
                         f"{str(err).splitlines()[0]}") from None
    if name not in MODEL_CLASSES:
        raise ValueError(f"{directory} holds a {name!r}, not one of {sorted(MODEL_CLASSES)}")
    model = MODEL_CLASSES[name](config)
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_model

        load_model(model, str(directory / "model.safetensors"), device=map_location)
    elif (directory / "weights.pt").is_file():
        model.load_state_dict(torch.load(directory / "weights.pt", map_location=map_location,
                                         weights_only=True))
    else:
        raise FileNotFoundError(f"{directory} has no model.safetensors: not a saved model folder")
    return model


class DiffuserEncoder(PretrainedModel):
    """Token, position (and token-type) embeddings, then ``num_layers`` encoder layers."""

    def __init__(self, config: DiffuserConfig) -> None:
        super().__init__(config)
        self.tokens = nn.Embedding(self.vocab_size, config.hidden_size,
                                   padding_idx=config.pad_token_id)
        self.positions = nn.Embedding(config.max_positions, config.hidden_size)
        self.token_types = (nn.Embedding(config.type_vocab_size, config.hidden_size)
                            if config.type_vocab_size else None)
        self.embedding_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.final_norm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
                           if config.layer_norm == "pre" else None)

    def pack(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             token_type_ids: torch.Tensor | None = None) -> PackedBatch:
        """Check the inputs and pack them once: the :class:`PackedBatch` every layer shares."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (B, L) tensor, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        for name, other in (("attention_mask", attention_mask),
                            ("token_type_ids", token_type_ids)):
            if other is not None and (not isinstance(other, torch.Tensor)
                                      or other.shape != input_ids.shape):
                raise ValueError(f"{name} must be a tensor shaped like input_ids "
                                 f"{tuple(input_ids.shape)}, got "
                                 f"{getattr(other, 'shape', type(other).__name__)}")
        batch = PackedBatch.from_mask(attention_mask, self.config.pattern,
                                      engine=self.config.engine, device=input_ids.device)
        longest = max(batch.lengths)
        if longest > self.config.max_tokens:
            raise ValueError(f"a sequence has {longest} tokens but max_positions is "
                             f"{self.config.max_positions}" + (
                                 f" (from row {self.config.position_offset})"
                                 if self.config.position_offset else ""))
        _check_ids("input_ids", input_ids, self.vocab_size)
        if token_type_ids is not None:
            _check_ids("token_type_ids", token_type_ids, self.config.type_vocab_size)
        return batch

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                return_attention: bool = False) -> EncoderOutput:
        """``input_ids, attention_mask, token_type_ids: (B, L)`` -> packed hidden states
        ``(N, hidden)``, the batch, and (``return_attention``) each layer's one-hop attention
        ``(E, H)``. Without ``token_type_ids`` every token has type 0."""
        batch = self.pack(input_ids, attention_mask, token_type_ids)
        ids = batch.pack(input_ids)
        positions = torch.cat([torch.arange(n, device=ids.device) for n in batch.lengths])
        x = self.tokens(ids) + self.positions(positions + self.config.position_offset)
        if self.token_types is not None:
            types = (batch.pack(token_type_ids) if token_type_ids is not None
                     else torch.zeros_like(ids))
            x = x + self.token_types(types)
        x = self.dropout(self.embedding_norm(x))
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


def _check_ids(name: str, ids: torch.Tensor, size: int) -> None:
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
        raise ValueError(f"{name} must be in [0, {size}), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")


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
        (self.num_labels,) = config.require("num_labels")
        self.encoder = DiffuserEncoder(config)
        self.head = ClassificationHead(config.hidden_size, config.hidden_size, self.num_labels,
                                       config.dropout)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None):
        """Returns logits ``(B, num_labels)``, or ``(loss, logits)`` when ``labels: (B,)``."""
        encoded = self.encoder(input_ids, attention_mask, token_type_ids)
        logits = self.head(pool(encoded.hidden, encoded.padding, self.config.pooling))
        return logits if labels is None else (F.cross_entropy(logits, labels), logits)


class DiffuserForMatching(PretrainedModel):
    """Two-tower matching (LRA retrieval): a shared encoder embeds both sequences to u and v,
    and an MLP classifies ``[u, v, u*v, u-v]``."""

    def __init__(self, config: DiffuserConfig) -> None:
        super().__init__(config)
        (self.num_labels,) = config.require("num_labels")
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


def token_loss(logits: torch.Tensor, labels: torch.Tensor, encoded: EncoderOutput,
               input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of packed ``logits: (N, vocab)`` over the ``labels: (B, L)`` that are
    not ``IGNORE_INDEX``."""
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must be (B, L) like input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(labels.shape)}")
    return F.cross_entropy(logits, encoded.padding.pack(labels), ignore_index=IGNORE_INDEX)


def small_embeddings(encoder: DiffuserEncoder) -> None:
    """Initialise the embedding tables with N(0, 0.02^2), as GPT-2 and BERT do, for a model whose
    token table is also its output layer: at nn.Embedding's N(0, 1) the untrained logits spread
    by sqrt(hidden_size) and the loss starts far above ln(vocab). Positions and token types get
    the same scale, or they would drown the tokens in the sum the embedding LayerNorm sees."""
    with torch.no_grad():
        for table in (encoder.tokens, encoder.positions, encoder.token_types):
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)
        if encoder.config.pad_token_id is not None:
            encoder.tokens.weight[encoder.config.pad_token_id].zero_()


class MaskedLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> decoder tied to the token embeddings, + bias (the
    head of BERT and RoBERTa)."""

    def __init__(self, config: DiffuserConfig, embeddings: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACTIVATIONS[config.activation]()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, embeddings.num_embeddings, bias=False)
        self.decoder.weight = embeddings.weight
        self.bias = nn.Parameter(torch.zeros(embeddings.num_embeddings))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.activation(self.dense(x)))) + self.bias


class DiffuserForMaskedLM(PretrainedModel):
    """Encoder + masked-LM head: logits for every token, the loss on the chosen ones."""

    def __init__(self, config: DiffuserConfig) -> None:
        super().__init__(config)
        self.encoder = DiffuserEncoder(config)
        self.head = MaskedLMHead(config, self.encoder.tokens)
        small_embeddings(self.encoder)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None):
        """Returns logits ``(B, L, vocab)`` (zeros at padding), or ``(loss, logits)`` with
        ``labels: (B, L)``: the original token where one was masked, ``-100`` elsewhere."""
        encoded = self.encoder(input_ids, attention_mask, token_type_ids)
        logits = self.head(encoded.hidden)  # (N, vocab)
        padded = encoded.padding.unpack(logits)
        if labels is None:
            return padded
        return token_loss(logits, labels, encoded, input_ids), padded


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
        small_embeddings(self.encoder)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None):
        """Returns next-token logits ``(B, L, vocab)`` (zeros at padding), or ``(loss, logits)``
        with ``labels: (B, L)`` (mean cross-entropy in nats over labels != -100)."""
        encoded = self.encoder(input_ids, attention_mask)
        logits = self.lm_head(encoded.hidden)  # (N, vocab)
        padded = encoded.padding.unpack(logits)
        if labels is None:
            return padded
        return token_loss(logits, labels, encoded, input_ids), padded

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
        if input_ids.shape[1] + max_new_tokens > self.config.max_tokens:
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


MODEL_CLASSES: dict[str, type[PretrainedModel]] = {
    cls.__name__: cls for cls in (DiffuserEncoder, DiffuserForSequenceClassification,
                                  DiffuserForMatching, DiffuserForCausalLM, DiffuserForMaskedLM)}
