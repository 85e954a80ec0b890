"""Warm-start from Hugging Face RoBERTa and BERT checkpoints, as Longformer and BigBird do.

:func:`from_hf` copies a checkpoint's weights into a Diffuser model of the same shape: token,
position and token-type embeddings, the embedding LayerNorm, every layer's query/key/value and
output projections, LayerNorms and feed-forward weights, and the head where there is one. The
result keeps the checkpoint's post-LayerNorm layers, LayerNorm epsilon, activation and RoBERTa's
position offset (positions start at ``padding_idx + 1``), so with ``attention: full`` it computes
what the checkpoint computes; with Diffuser attention the pretrained one-hop attention is
diffused over the chosen pattern. A ``max_positions`` beyond the checkpoint's is filled by
copying the pretrained table again and again (Longformer's scheme).

Needs the ``hf`` extra (``transformers``); nothing is downloaded: the source is a local folder in
the ``save_pretrained`` layout or a model object already in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
import torch
from torch import nn

from .config import describe_validation_error
from .model import (
    ARCHITECTURE,
    DiffuserConfig,
    DiffuserEncoder,
    DiffuserForMaskedLM,
    DiffuserForSequenceClassification,
    PretrainedModel,
)
from .patterns import PatternSpec

# Hugging Face class -> (the Diffuser class it becomes, the attribute holding its base model)
SUPPORTED: dict[str, tuple[type[PretrainedModel], str | None]] = {
    "RobertaModel": (DiffuserEncoder, None),
    "RobertaForSequenceClassification": (DiffuserForSequenceClassification, "roberta"),
    "RobertaForMaskedLM": (DiffuserForMaskedLM, "roberta"),
    "BertModel": (DiffuserEncoder, None),
    "BertForSequenceClassification": (DiffuserForSequenceClassification, "bert"),
    "BertForMaskedLM": (DiffuserForMaskedLM, "bert"),
}
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu"}
# What a converted model is unless told otherwise: the authors' attention (their released code).
DIFFUSER_DEFAULTS = {"attention": "diffuser", "pattern": PatternSpec(kind="official"),
                     "kernel": "ppr", "alpha": 0.1, "hops": 5, "hop_dropout": 0.1}


class ConversionError(ValueError):
    """A source that cannot be converted, or overrides that contradict it."""


def load_hf_model(source: Any) -> Any:
    """A supported ``transformers`` model from a local folder (or the model itself), in eval
    mode."""
    try:
        import transformers
    except ImportError:
        raise ConversionError("converting Hugging Face checkpoints needs the hf extra: "
                              "pip install 'diffuser-graph[hf]'") from None
    if isinstance(source, transformers.PreTrainedModel):
        model = source
    else:
        folder = Path(source).expanduser()
        if not (folder / "config.json").is_file():
            raise ConversionError(f"{folder} is not a Hugging Face checkpoint folder (no "
                                  f"config.json); give the folder save_pretrained wrote")
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        names = list(getattr(config, "architectures", None) or [])
        if not names:  # a base model saved without its class name
            names = [{"roberta": "RobertaModel", "bert": "BertModel"}.get(config.model_type, "")]
        name = names[0]
        if name not in SUPPORTED:
            raise ConversionError(f"{folder} holds a {name or config.model_type!r} model; "
                                  f"supported: {', '.join(SUPPORTED)}")
        model = getattr(transformers, name).from_pretrained(str(folder), local_files_only=True)
    if type(model).__name__ not in SUPPORTED:
        raise ConversionError(f"{type(model).__name__} cannot be converted; supported: "
                              f"{', '.join(SUPPORTED)}")
    return model.eval()


def diffuser_config(hf_config: Any, model_class: type[PretrainedModel],
                    overrides: dict[str, Any]) -> DiffuserConfig:
    """The :class:`DiffuserConfig` of a checkpoint, with ``overrides`` (which may set anything
    but what the pretrained weights fix: sizes, vocabulary, norms, activation)."""
    roberta = hf_config.model_type == "roberta"
    if hf_config.hidden_act not in ACTIVATIONS:
        raise ConversionError(f"activation {hf_config.hidden_act!r} is not supported "
                              f"({', '.join(ACTIVATIONS)})")
    if not getattr(hf_config, "tie_word_embeddings", True):
        raise ConversionError("the checkpoint's output layer is not tied to its token "
                              "embeddings; only tied checkpoints (as released) are supported")
    if roberta and model_class is DiffuserForMaskedLM and hf_config.hidden_act != "gelu":
        raise ConversionError("RoBERTa's masked-LM head applies GELU whatever hidden_act says; "
                              f"a checkpoint with hidden_act {hf_config.hidden_act!r} cannot be "
                              f"converted exactly")
    if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
        raise ConversionError("only absolute position embeddings can be converted, not "
                              f"{hf_config.position_embedding_type!r}")
    fixed = {
        "vocab_size": hf_config.vocab_size, "hidden_size": hf_config.hidden_size,
        "num_heads": hf_config.num_attention_heads, "num_layers": hf_config.num_hidden_layers,
        "ffn_size": hf_config.intermediate_size, "layer_norm": "post",
        "layer_norm_eps": hf_config.layer_norm_eps,
        "activation": ACTIVATIONS[hf_config.hidden_act],
        "type_vocab_size": hf_config.type_vocab_size, "pad_token_id": hf_config.pad_token_id,
        "position_offset": hf_config.pad_token_id + 1 if roberta else 0,
    }
    clashes = [f"{key}={overrides[key]!r} (the checkpoint has {fixed[key]!r})"
               for key in ARCHITECTURE if key in overrides and overrides[key] != fixed[key]]
    if model_class is DiffuserForSequenceClassification and overrides.get(
            "num_labels", hf_config.num_labels) != hf_config.num_labels:
        clashes.append(f"num_labels={overrides['num_labels']!r} (the checkpoint's head has "
                       f"{hf_config.num_labels})")
    if clashes:
        raise ConversionError(f"these overrides contradict the pretrained weights: "
                              f"{', '.join(clashes)}")
    settings = {
        **fixed, **DIFFUSER_DEFAULTS, "max_positions": hf_config.max_position_embeddings,
        "dropout": hf_config.hidden_dropout_prob,
        "attn_dropout": hf_config.attention_probs_dropout_prob, "pooling": "cls",
        "num_labels": (hf_config.num_labels if model_class is DiffuserForSequenceClassification
                       else None),
    }
    try:
        return DiffuserConfig.model_validate({**settings, **overrides})
    except pydantic.ValidationError as err:
        problems = describe_validation_error(err).splitlines()
        raise ConversionError(f"overrides are invalid: "
                              f"{'; '.join(p.strip() for p in problems)}") from None


def from_hf(source: Any, **overrides: Any) -> PretrainedModel:
    """A Diffuser model with the weights of a Hugging Face RoBERTa or BERT checkpoint.

    ``source``: a local checkpoint folder or a ``transformers`` model. Returns a
    :class:`DiffuserEncoder` for a base model, :class:`DiffuserForSequenceClassification` for a
    sequence-classification checkpoint and :class:`DiffuserForMaskedLM` for a masked-LM one.
    ``overrides``: :class:`DiffuserConfig` fields (``pattern``, ``attention``, ``alpha``,
    ``hops``, ``kernel``, ``max_positions``, dropouts, ...); by default the authors' attention
    (official pattern, PPR alpha 0.1, K = 5).
    """
    hf_model = load_hf_model(source)
    model_class, base_name = SUPPORTED[type(hf_model).__name__]
    config = diffuser_config(hf_model.config, model_class, overrides)
    model = model_class(config)
    base = getattr(hf_model, base_name) if base_name else hf_model
    with torch.no_grad():
        _copy_encoder(model.backbone, base, config)
        if isinstance(model, DiffuserForSequenceClassification):
            _copy_classifier(model, hf_model)
        if isinstance(model, DiffuserForMaskedLM):
            _copy_masked_lm_head(model, hf_model)
    return model.eval()


def _copy(target: nn.Module, source: nn.Module) -> None:
    for name, parameter in target.named_parameters(recurse=False):
        value = getattr(source, name)
        if parameter.shape != value.shape:
            raise ConversionError(f"{type(source).__name__}.{name} has shape {tuple(value.shape)}, "
                                  f"expected {tuple(parameter.shape)}")
        parameter.copy_(value)


def tiled_positions(table: torch.Tensor, rows: int, offset: int) -> torch.Tensor:
    """A position table of ``rows`` rows: the first ``offset`` rows as they are, then the
    pretrained rows after them repeated (Longformer); fewer rows than the checkpoint's keep the
    first ones."""
    learned = table[offset:]
    repeats = -(-(rows - offset) // len(learned))
    return torch.cat([table[:offset], learned.repeat(repeats, 1)])[:rows]


def _copy_encoder(encoder: DiffuserEncoder, base: Any, config: DiffuserConfig) -> None:
    embeddings = base.embeddings
    _copy(encoder.tokens, embeddings.word_embeddings)
    encoder.positions.weight.copy_(tiled_positions(embeddings.position_embeddings.weight,
                                                   config.max_positions, config.position_offset))
    if encoder.token_types is not None:
        _copy(encoder.token_types, embeddings.token_type_embeddings)
    _copy(encoder.embedding_norm, embeddings.LayerNorm)
    for mine, theirs in zip(encoder.layers, base.encoder.layer, strict=True):
        attention = theirs.attention
        for name in ("query", "key", "value"):
            _copy(getattr(mine.attention, name), getattr(attention.self, name))
        _copy(mine.attention.output, attention.output.dense)
        _copy(mine.attention_norm, attention.output.LayerNorm)
        _copy(mine.ffn[0], theirs.intermediate.dense)
        _copy(mine.ffn[2], theirs.output.dense)
        _copy(mine.ffn_norm, theirs.output.LayerNorm)


def _copy_classifier(model: DiffuserForSequenceClassification, hf_model: Any) -> None:
    """RoBERTa: dense -> tanh -> out_proj on <s>; BERT: pooler (dense -> tanh) -> classifier.
    Both are the head's dense and output layers (its dropouts act only in training)."""
    dense, out = model.head.net[1], model.head.net[4]
    if hasattr(hf_model, "roberta"):
        _copy(dense, hf_model.classifier.dense)
        _copy(out, hf_model.classifier.out_proj)
    else:
        if hf_model.bert.pooler is None:
            raise ConversionError("the BERT classifier has no pooler to copy")
        _copy(dense, hf_model.bert.pooler.dense)
        _copy(out, hf_model.classifier)


def _copy_masked_lm_head(model: DiffuserForMaskedLM, hf_model: Any) -> None:
    """dense -> activation -> LayerNorm -> decoder (tied to the token embeddings) + bias."""
    if hasattr(hf_model, "roberta"):
        head = hf_model.lm_head
        dense, norm, bias = head.dense, head.layer_norm, head.bias
    else:
        head = hf_model.cls.predictions
        dense, norm, bias = head.transform.dense, head.transform.LayerNorm, head.bias
    _copy(model.head.dense, dense)
    _copy(model.head.norm, norm)
    model.head.bias.copy_(bias)
