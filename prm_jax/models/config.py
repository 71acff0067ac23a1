"""Model configuration: one dataclass for the Qwen2 / Qwen3 / Llama-style decoder family.

`ModelConfig` holds the architecture (what a Hugging Face `config.json` describes) plus the runtime
choices that are ours (compute dtype, remat policy, attention implementation, which heads exist).
Only the architecture part is written back to `config.json` on export; the whole config travels as
Orbax checkpoint metadata so a checkpoint is self-describing.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from prm_jax import jsonl
from prm_jax.files import read_regular_text
from prm_jax.models.attention import ATTENTION_IMPLEMENTATIONS, DEFAULT_MAX_SEGMENTS_PER_ROW

#: Largest config.json read (a real one is a few KB; a FIFO or `/dev/zero` named so is refused).
MAX_CONFIG_BYTES = 16 * 2**20

# Architectures whose checkpoints map onto our decoder without changes to the math.
SUPPORTED_ARCHITECTURES = (
    "Qwen2ForCausalLM",
    "Qwen2ForProcessRewardModel",
    "Qwen3ForCausalLM",
    "Qwen3ForProcessRewardModel",
    "LlamaForCausalLM",
)
SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
#: Architectures of a process reward model checkpoint (step head, no LM head).
PRM_ARCHITECTURES = ("Qwen2ForProcessRewardModel", "Qwen3ForProcessRewardModel")
#: The transformers causal-LM class of each model type an export can write.
CAUSAL_LM_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# An architecture name is its model type's class name plus one of these.
_ARCH_SUFFIXES = ("ForCausalLM", "ForProcessRewardModel")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class UnsupportedCheckpointError(ValueError):
    """A checkpoint's architecture or config is outside what this decoder implements."""


# config.json fields we read, by the JSON type they must have (bool is never an int here).
POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "num_labels",
)
_POSITIVE_FLOAT_FIELDS = ("rope_theta", "rms_norm_eps")
_BOOL_FIELDS = ("attention_bias", "tie_word_embeddings", "use_sliding_window", "mlp_bias")
_OPTIONAL_INT_FIELDS = ("bos_token_id",)
# Fields whose null means "the default" (head_dim: hidden_size // heads; kv heads: all heads).
_NULLABLE_FIELDS = (
    "num_key_value_heads",
    "head_dim",
    "bos_token_id",
    "eos_token_id",
    "attention_bias",
    "use_sliding_window",
    "mlp_bias",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


#: Labels of the PRM step head: 0 = the step is wrong, 1 = correct (Qwen2.5-Math-PRM's `score.2` is [2, h]).
PRM_NUM_LABELS = 2
# The sizes every array shape is built from: the `ModelConfig` fields named as config.json's.
_SHAPE_FIELDS = POSITIVE_INT_FIELDS


def _field_problem(name: str, value: Any) -> str | None:
    """What is wrong with one config.json field's value (None: fine or absent)."""
    if value is None and name in _NULLABLE_FIELDS:
        return None
    if name in POSITIVE_INT_FIELDS:
        if not _is_int(value) or value <= 0:
            return f"{name}={value!r} must be a positive integer"
    elif name in _POSITIVE_FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            return f"{name}={value!r} must be a positive number"
    elif name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            return f"{name}={value!r} must be true or false"
    elif name in _OPTIONAL_INT_FIELDS:
        if not _is_int(value) or value < 0:
            return f"{name}={value!r} must be a non-negative integer or null"
    elif name == "eos_token_id":
        values = value if isinstance(value, list) else [value]
        if not values or not all(_is_int(v) and v >= 0 for v in values):
            return f"eos_token_id={value!r} must be a non-negative integer, a list of them, or null"
    return None


def _hf_num_labels(hf: Mapping[str, Any]) -> int:
    """A PRM config.json's label count: `num_labels`, else the size of `id2label` (what transformers
    writes), else the recipe's 2."""
    if "num_labels" in hf:
        return hf["num_labels"]
    id2label = hf.get("id2label")
    return len(id2label) if isinstance(id2label, dict) and id2label else PRM_NUM_LABELS


def check_hf_field_types(hf: Mapping[str, Any], source: str) -> None:
    """Every wrongly typed or out-of-range field of a config.json, in one message naming the file."""
    names = (*POSITIVE_INT_FIELDS, *_POSITIVE_FLOAT_FIELDS, *_BOOL_FIELDS, *_OPTIONAL_INT_FIELDS, "eos_token_id")
    problems = [p for name in names if name in hf and (p := _field_problem(name, hf[name])) is not None]
    rope = hf.get("rope_parameters")
    if rope is not None and not isinstance(rope, dict):
        problems.append(f"rope_parameters={rope!r} must be an object")
    elif rope and "rope_theta" in rope and (p := _field_problem("rope_theta", rope["rope_theta"])):
        problems.append("rope_parameters." + p)
    scaling = hf.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        problems.append(f"rope_scaling={scaling!r} must be an object or null")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Architecture (Hugging Face names where they exist).
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # "linear" RoPE scaling; 1.0 = none
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    attention_bias: bool = True  # bias on q/k/v (Qwen2: yes, Llama/Qwen3: no); o_proj never has one
    # Per-head RMSNorm of q and k (weights [head_dim]) before rotary: Qwen3. The default keeps
    # checkpoint metadata written before this field loading as what it was.
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    num_labels: int = 2
    model_type: str = "qwen2"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    # Heads present in this model instance. A PRM needs the step head; a policy needs the LM head.
    with_lm_head: bool = True
    with_prm_head: bool = True
    # Runtime (not written to config.json).
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters (fp32 master weights)
    remat_policy: str = "none"
    attention_impl: str = "auto"
    # Static limit of packed examples per row for the packed cuDNN kernel (the packer keeps to it).
    max_segments_per_row: int = DEFAULT_MAX_SEGMENTS_PER_ROW

    def __post_init__(self) -> None:
        # Modules keep the config as static (hashed) metadata: lists become tuples.
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        # Shapes first: a zero or negative size builds arrays that train to nothing, or divides by zero below.
        bad = [f"{name}={getattr(self, name)!r}" for name in _SHAPE_FIELDS if not _is_positive_int(getattr(self, name))]
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be positive integers")
        if self.with_prm_head and self.num_labels != PRM_NUM_LABELS:
            # With one label softmax is 1.0 for every step (loss 0, nothing learnt); with more, label 1
            # is no longer "correct against error". The recipe's head is Linear(h, 2).
            raise ValueError(
                f"num_labels={self.num_labels}: a PRM step head has exactly {PRM_NUM_LABELS} labels (error, "
                "correct; the step reward is softmax(logits)[1])"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLEMENTATIONS}")
        if not isinstance(self.max_segments_per_row, int) or self.max_segments_per_row < 1:
            raise ValueError(f"max_segments_per_row={self.max_segments_per_row!r} must be a positive integer")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in _DTYPES:
                raise ValueError(f"{field}={getattr(self, field)!r}; choose one of {list(_DTYPES)}")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return _DTYPES[self.dtype]

    @property
    def parameter_dtype(self) -> jnp.dtype:
        return _DTYPES[self.param_dtype]

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        """Parameter count of this instance (heads included as configured)."""
        h, i, n, k, d, v = (
            self.hidden_size,
            self.intermediate_size,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
            self.vocab_size,
        )
        attn = h * n * d + 2 * h * k * d + n * d * h
        if self.attention_bias:
            attn += n * d + 2 * k * d
        if self.qk_norm:
            attn += 2 * d
        per_layer = attn + 3 * h * i + 2 * h
        total = v * h + self.num_hidden_layers * per_layer + h
        if self.with_lm_head and not self.tie_word_embeddings:
            total += h * v
        if self.with_prm_head:
            total += h * h + h + h * self.num_labels + self.num_labels
        return total

    # ------------------------------------------------------------------ Hugging Face config.json

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], source: str = "config.json", **overrides: Any) -> ModelConfig:
        """Reads a Hugging Face config dict (transformers 4.x or 5.x style).

        `source` names the file in error messages. Runtime fields and head choices come from
        `overrides`; by default a PRM checkpoint gets only the step head and a causal LM both.
        """
        model_type = hf.get("model_type")
        architectures = list(hf.get("architectures") or [])
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedCheckpointError(
                f"{source}: model_type={model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})"
            )
        unsupported = [a for a in architectures if a not in SUPPORTED_ARCHITECTURES]
        if unsupported:
            raise UnsupportedCheckpointError(
                f"{source}: architectures={unsupported} not supported (supported: {SUPPORTED_ARCHITECTURES})"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in hf]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {missing}")
        check_hf_field_types(hf, source)
        if "head_dim" not in hf and model_type != "qwen3" and hf["hidden_size"] % hf["num_attention_heads"]:
            raise ValueError(
                f"{source}: hidden_size={hf['hidden_size']} is not a multiple of "
                f"num_attention_heads={hf['num_attention_heads']} (and no head_dim is given)"
            )

        # transformers 5 moved rope_theta/rope_scaling into rope_parameters.
        rope = dict(hf.get("rope_parameters") or {})
        rope_scaling = hf.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type") or rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"
        scaling_factor = 1.0
        if rope_type == "linear":
            scaling_factor = float(rope.get("factor", rope_scaling.get("factor", 1.0)))
        elif rope_type != "default":
            raise UnsupportedCheckpointError(
                f"{source}: rope_type={rope_type!r} is not supported (supported: default, linear)"
            )
        if hf.get("use_sliding_window"):
            raise UnsupportedCheckpointError(f"{source}: use_sliding_window=true is not supported")
        layer_types = hf.get("layer_types")
        if layer_types is not None and (
            not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types)
        ):
            raise UnsupportedCheckpointError(
                f"{source}: layer_types={layer_types!r} is not supported (every layer must be full_attention)"
            )
        family = {
            a: a[: -len(suffix)].lower() for a in architectures for suffix in _ARCH_SUFFIXES if a.endswith(suffix)
        }
        mismatched = sorted(a for a, f in family.items() if f != model_type)
        if mismatched:
            raise UnsupportedCheckpointError(
                f"{source}: architectures={mismatched} do not match model_type={model_type!r}"
            )

        if model_type == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
            # Llama's attention_bias also puts a bias on o_proj, which this decoder does not have.
            raise UnsupportedCheckpointError(f"{source}: Llama with attention_bias/mlp_bias=true is not supported")
        if model_type == "qwen3" and hf.get("attention_bias"):
            # Qwen3's attention is Llama's: attention_bias puts a bias on o_proj too.
            raise UnsupportedCheckpointError(f"{source}: Qwen3 with attention_bias=true is not supported")
        n_heads = int(hf["num_attention_heads"])
        is_prm = any(a in PRM_ARCHITECTURES for a in architectures)
        defaults: dict[str, Any] = {"with_lm_head": not is_prm, "with_prm_head": True}
        defaults.update(overrides)
        # transformers' Qwen3Config defaults head_dim to 128, not hidden_size // heads.
        default_head_dim = 128 if model_type == "qwen3" else int(hf["hidden_size"]) // n_heads
        attention_bias = hf.get("attention_bias", model_type == "qwen2")
        try:
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=n_heads,
                num_key_value_heads=int(hf.get("num_key_value_heads") or n_heads),
                head_dim=int(hf.get("head_dim") or default_head_dim),
                rope_theta=float(rope_theta),
                rope_scaling_factor=scaling_factor,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                attention_bias=bool(attention_bias),
                qk_norm=model_type == "qwen3",
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                # A causal LM's num_labels describes no weights (transformers' sequence-classification default):
                # the PRM head trained on it is ours, with the recipe's 2 labels. A PRM's is checked.
                num_labels=_hf_num_labels(hf) if is_prm else PRM_NUM_LABELS,
                model_type=model_type,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                **defaults,
            )
        except ValueError as error:  # the invariants of __post_init__, named with the file
            raise ValueError(f"{source}: {error}") from None

    @classmethod
    def from_hf_file(cls, path: str | Path, **overrides: Any) -> ModelConfig:
        """The config of a Hugging Face `config.json` (or a directory holding one), read bounded
        (`files.read_regular_text`: a FIFO or a device is refused, not read) and decoded with
        `jsonl.loads`, so every failure is one line naming the file."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = jsonl.loads(read_regular_text(path, max_bytes=MAX_CONFIG_BYTES))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: {jsonl.json_problem(e)} at line {e.lineno}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_hf_dict(data, source=str(path), **overrides)

    def to_hf_dict(self, *, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """The Qwen2 (or, for `model_type="qwen3"`, Qwen3) fields of config.json in a form
        transformers 4.4x and 5.x both read (Qwen3: 4.51+, the first with Qwen3).

        Both spellings are written: 4.x reads top-level `rope_theta`/`torch_dtype`, 5.x reads
        `rope_parameters`/`dtype` (and tolerates the legacy keys).
        """
        qwen3 = self.model_type == "qwen3"
        if qwen3 and (self.attention_bias or not self.qk_norm):
            raise UnsupportedCheckpointError(
                "export to the Qwen3 layout needs attention_bias=False and qk_norm=True (Qwen3 has q/k "
                f"norms and no q/k/v biases); this model has attention_bias={self.attention_bias}, "
                f"qk_norm={self.qk_norm}"
            )
        if not qwen3 and self.qk_norm:
            raise UnsupportedCheckpointError(
                f"model_type={self.model_type!r} with qk_norm=True: only the Qwen3 layout has q/k norms"
            )
        rope_parameters: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        out: dict[str, Any] = {
            "model_type": "qwen3" if qwen3 else "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "rope_parameters": rope_parameters,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": False,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_hidden_layers,
            "tie_word_embeddings": self.tie_word_embeddings,
            "num_labels": self.num_labels,
            "torch_dtype": torch_dtype,
            "dtype": torch_dtype,
        }
        if self.rope_scaling_factor != 1.0:
            scaling = {"rope_type": "linear", "type": "linear", "factor": self.rope_scaling_factor}
            out["rope_scaling"] = scaling
            out["rope_parameters"] = {**rope_parameters, "rope_type": "linear", "factor": self.rope_scaling_factor}
        if qwen3:
            out["attention_bias"] = False
        elif not self.attention_bias:
            # Qwen2 in transformers always has q/k/v bias; without it the checkpoint is Llama-like
            # and cannot be exported in the Qwen2 layout faithfully.
            raise UnsupportedCheckpointError(
                "export to the Qwen2ForProcessRewardModel layout needs attention_bias=True (Qwen2 "
                "always has q/k/v biases); this model has none"
            )
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            eos = self.eos_token_id
            out["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
        return out

    # ------------------------------------------------------------------ checkpoint metadata

    def to_json_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(data["eos_token_id"], tuple):
            data["eos_token_id"] = list(data["eos_token_id"])
        return data

    @classmethod
    def from_json_dict(
        cls, data: Mapping[str, Any], source: str = "checkpoint metadata", **overrides: Any
    ) -> ModelConfig:
        """The config stored as checkpoint metadata (`to_json_dict`); `source` names it in errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown ModelConfig field(s) {unknown}")
        values = dict(data)
        values.update(overrides)
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from None
