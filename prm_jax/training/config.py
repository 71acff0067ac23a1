"""The training config schema with defaults; `configs/*.py` start from `default_config()`.

Every field is overridable on the command line: `--config.optimizer.learning_rate=5e-6`.
"""

from __future__ import annotations

import math
from pathlib import Path

import ml_collections

from prm_jax.config_checks import MISSING, ConfigChecker
from prm_jax.data.pipeline import PipelineConfig
from prm_jax.data.tokenize import TokenizeConfig
from prm_jax.models.config import POSITIVE_INT_FIELDS, ModelConfig
from prm_jax.tiny_tokenizer import TINY_VOCAB_SIZE


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.objective = "prm"  # prm: step head + cross-entropy at separators; lm: causal-LM (SFT)
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.init_from = ""  # Hugging Face directory or Orbax model checkpoint (launch.convert output, a step dir)
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.param_dtype = "float32"  # master weights and optimizer state
    c.model.remat_policy = "dots_no_batch"  # none | full | dots | dots_no_batch
    # auto: splash on TPU, packed cuDNN flash on Hopper+ GPUs, XLA on CPU (prm_jax.models.attention)
    c.model.attention_impl = "auto"  # auto | xla | cudnn | cudnn_bias | splash | pallas_gpu
    c.model.max_segments_per_row = ModelConfig.max_segments_per_row  # packed examples per row (cuDNN limit)
    # The base model a preset is built for ("" = none). With a name, `model.arch` is that model's
    # real architecture: launch.plan compiles it without a checkpoint, and an init_from checkpoint
    # must have its shapes (`training.presets`). Without one, `model.arch` is only the architecture
    # of a model trained from scratch and is ignored with init_from.
    c.model.arch_name = ""
    c.model.arch = ml_collections.ConfigDict(
        dict(
            vocab_size=TINY_VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            max_position_embeddings=4096,
            attention_bias=True,
            tie_word_embeddings=False,
        )
    )

    c.data = ml_collections.ConfigDict()
    c.data.train_file = ""  # JSONL {id, problem, steps, labels} (prm) or {id, prompt, completion} (lm)
    c.data.eval_file = ""  # held-out file of the same format ("" = no eval)
    c.data.tokenizer_dir = ""
    c.data.seq_len = 4096  # packed row length
    # The data section's defaults are the tokenizer's and the input pipeline's own (stated there).
    c.data.packing = PipelineConfig.packing
    c.data.soft_labels = TokenizeConfig.soft_labels
    c.data.drop_after_first_error = TokenizeConfig.drop_after_first_error
    c.data.negative_threshold = TokenizeConfig.negative_threshold  # negative = label <= this (0.0: the paper's)
    c.data.overlong = TokenizeConfig.overlong  # truncate (at a step boundary) | drop
    c.data.separator = TokenizeConfig.separator
    c.data.shuffle = PipelineConfig.shuffle
    c.data.synthetic = ""  # "arithmetic": generate a small learnable labelled set into WORKDIR/data

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.global_batch_rows = 128  # packed sequences per optimizer step, over all processes
    c.train.grad_accum_steps = 1
    # Rows per batch shard (one device, or one tensor-parallel group: mesh data x fsdp shards) in one
    # microbatch; > 0 derives grad_accum_steps from the mesh (global_batch_rows / (this x data x
    # fsdp)), so one preset runs on 8 or 64 GPUs alike with the same memory per device.
    c.train.microbatch_rows_per_shard = 0
    c.train.log_every = 10
    c.train.progress = True  # a progress bar on the terminal (process 0)
    c.train.eval_every = 200
    # PRM loss at the separators: cross_entropy against [1 - p, p] (hard labels, the paper's final
    # recipe) or mse between p(correct) and the label (how the paper trained its soft-label ablation).
    c.train.loss = "cross_entropy"
    # objective=lm: the LM loss is computed over chunks of this many positions of every row, so the
    # fp32 [rows, seq_len, vocab] logits never exist whole (9.3 GiB per copy at Qwen's 152k vocabulary
    # and 4 rows x 4096 per device, the 7B preset). XLA's temporaries of that train step: 28.7 GiB
    # unchunked, 5.5 GiB at 1024, 3.8 GiB at 512; 1024 keeps each chunk's logits matmul large
    # (rows x 1024 tokens) and the scan short (seq_len / 1024 steps). 0 = unchunked.
    c.train.lm_loss_chunk_tokens = 1024
    c.train.peak_flops_per_device = 0.0  # 0 = look up by device kind (unknown on CPU: no MFU)
    # Before any weights are loaded, compile the train step for the run's mesh and stop when XLA's
    # per-device memory exceeds what the devices can allocate (`training.plan`); the run then trains
    # with that executable (no second compile). On CPU the figures are only logged.
    c.train.preflight_plan = True
    # A resume must train on the data and hyper-parameters the workdir recorded (config.json);
    # true accepts different ones and records the change in config_changes.jsonl.
    c.train.allow_config_change = False

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 5e-6
    c.optimizer.end_learning_rate_ratio = 0.1
    c.optimizer.warmup_steps = 50
    c.optimizer.schedule = "cosine"
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 1.0

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.save_every = 200
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # -1 = remaining devices
    return c


# ---------------------------------------------------------------------------- validation
#
# `validate` checks a whole config before any data is read, any array compiled or anything
# written into the workdir, and returns every problem (one line each, naming the field and the
# fix); `check` raises them as one ConfigError. Launchers print that as one block.

OBJECTIVES = ("prm", "lm")
SCHEDULES = ("cosine", "linear", "constant")
OVERLONG = ("truncate", "drop")
SYNTHETIC = ("", "arithmetic")
MESH_AXES = ("data", "fsdp", "tensor")
# The architecture's positive integers, as config.json states them (num_labels is the PRM head's).
_ARCH_POSITIVE_INTS = tuple(name for name in POSITIVE_INT_FIELDS if name != "num_labels")


class ConfigError(ValueError):
    """A training config has invalid values; `problems` lists them, one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        if len(problems) == 1:
            super().__init__(f"invalid training config: {problems[0]}")
        else:
            super().__init__(f"invalid training config ({len(problems)} problems):\n  " + "\n  ".join(problems))


def seq_len_problem(seq_len: int, max_position_embeddings: int) -> str | None:
    """Packed rows longer than the model's context: one example may fill a row, and positions past
    `max_position_embeddings` were never trained (the released model does not support them)."""
    if seq_len <= max_position_embeddings:
        return None
    return (
        f"data.seq_len={seq_len} exceeds the model's max_position_embeddings={max_position_embeddings}: "
        f"a single example could reach position {seq_len - 1}; set --config.data.seq_len<={max_position_embeddings} "
        "(and raise train.global_batch_rows to keep the tokens per step)"
    )


def validate(config: ml_collections.ConfigDict, *, device_count: int | None = None) -> list[str]:
    """Every problem of a training config, one line each; [] when it is valid.

    Cheap and side-effect free: no data is read (paths are only stat-ed), nothing is written.
    `device_count` (`jax.device_count()`) enables the mesh checks. With `data.synthetic`
    set, an empty train file and tokenizer directory are allowed (the generator fills them in).
    """
    c = ConfigChecker(config)
    objective = c.choice("objective", OBJECTIVES)
    c.integer("seed", 0)
    _validate_model(c)
    _validate_data(c)
    _validate_train(c, objective)
    _validate_optimizer(c)
    _validate_checkpoint(c)
    _validate_mesh(c, device_count)
    return c.problems


def warnings(config: ml_collections.ConfigDict) -> list[str]:
    """Legal but probably unintended settings, logged at the start of a run."""
    out = []
    warmup, num_steps = config.optimizer.warmup_steps, config.train.num_steps
    if isinstance(warmup, int) and isinstance(num_steps, int) and warmup > num_steps > 0:
        out.append(
            f"optimizer.warmup_steps={warmup} > train.num_steps={num_steps}: the learning rate never reaches "
            f"its peak {config.optimizer.learning_rate}"
        )
    arch_name, init_from = config.model.get("arch_name", ""), config.model.init_from
    if arch_name and init_from and Path(init_from).is_dir():
        from prm_jax.training.presets import arch_differences
        from prm_jax.weights import read_config

        try:
            others = arch_differences(dict(config.model.arch), read_config(init_from), shapes_only=False)
        except (OSError, ValueError, KeyError, TypeError):
            others = []  # an unreadable checkpoint is `validate`'s to report
        if others:
            out.append(
                f"model.init_from={init_from} differs from the preset's {arch_name} in {'; '.join(others)}: "
                "the checkpoint's values are used"
            )
    return out


def check(config: ml_collections.ConfigDict, *, device_count: int | None = None) -> None:
    """Raise `ConfigError` listing every problem of `config`."""
    problems = validate(config, device_count=device_count)
    if problems:
        raise ConfigError(problems)


def _validate_model(c: ConfigChecker) -> None:
    from prm_jax.models.config import _DTYPES, ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES

    for field in ("model.dtype", "model.param_dtype"):
        c.choice(field, tuple(_DTYPES))
    c.choice("model.remat_policy", REMAT_POLICIES)
    c.choice("model.attention_impl", ATTENTION_IMPLEMENTATIONS)
    c.integer("model.max_segments_per_row", 1)
    c.path("model.init_from", "dir", required=False)
    arch_name = c.get("model.arch_name")
    arch_name = "" if arch_name is MISSING else arch_name
    if not isinstance(arch_name, str):
        c.add("model.arch_name", arch_name, "must be a string: the base model a preset declares, or ''")
        arch_name = ""
    if c.get("model.init_from") and not arch_name:
        return  # model.arch is ignored
    before = len(c.problems)
    arch = {name: c.integer(f"model.arch.{name}", 1) for name in _ARCH_POSITIVE_INTS}
    heads, kv_heads, head_dim = arch["num_attention_heads"], arch["num_key_value_heads"], arch["head_dim"]
    if heads and kv_heads and heads % kv_heads:
        c.add("model.arch.num_key_value_heads", kv_heads, f"must divide num_attention_heads={heads}")
    if head_dim and head_dim % 2:
        c.add("model.arch.head_dim", head_dim, "must be even (rotary embeddings)")
    c.number("model.arch.rope_theta", 0.0, low_open=True)
    c.number("model.arch.rms_norm_eps", 0.0, low_open=True)
    c.boolean("model.arch.attention_bias")
    c.boolean("model.arch.tie_word_embeddings")
    init_from = c.get("model.init_from")
    if init_from and Path(init_from).is_dir() and len(c.problems) == before:
        from prm_jax.training.presets import arch_differences, arch_mismatch_message
        from prm_jax.weights import read_config

        try:
            differences = arch_differences(dict(c.get("model.arch")), read_config(init_from))
        except (OSError, ValueError, KeyError, TypeError):
            return  # reported by the max_position_embeddings check
        if differences:
            c.problems.append(arch_mismatch_message(arch_name, init_from, differences))


def _max_position_embeddings(c: ConfigChecker) -> int | None:
    init_from = c.get("model.init_from")
    if not init_from:
        value = c.get("model.arch.max_position_embeddings")
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if not Path(init_from).is_dir():
        return None  # reported by the path check
    from prm_jax.weights import read_config

    try:
        return read_config(init_from).max_position_embeddings
    except (OSError, ValueError, KeyError, TypeError) as error:
        c.add("model.init_from", init_from, f"not a readable model checkpoint, Orbax or Hugging Face ({error})")
        return None


def _validate_data(c: ConfigChecker) -> None:
    c.choice("data.synthetic", SYNTHETIC)
    synthetic = bool(c.get("data.synthetic"))  # even a misspelt generator: one problem, not three
    c.path("data.train_file", "file", required=not synthetic, hint="a JSONL file of training records")
    c.path("data.eval_file", "file", required=False)
    c.path("data.tokenizer_dir", "tokenizer", required=not synthetic, hint="a Hugging Face tokenizer directory")
    seq_len = c.integer("data.seq_len", 2)
    max_positions = _max_position_embeddings(c)
    if seq_len is not None and max_positions is not None:
        problem = seq_len_problem(seq_len, max_positions)
        if problem:
            c.problems.append(problem)
    for field in ("data.packing", "data.soft_labels", "data.drop_after_first_error", "data.shuffle"):
        c.boolean(field)
    c.number("data.negative_threshold", 0.0, 1.0, high_open=True)
    c.choice("data.overlong", OVERLONG)
    separator = c.get("data.separator")
    if not isinstance(separator, str) or not separator:
        c.add("data.separator", separator, "must be a non-empty string (the step separator token)")


def grad_accum_steps(config: ml_collections.ConfigDict, data_shards: int) -> int:
    """Microbatches per step: `train.grad_accum_steps`, or derived from
    `train.microbatch_rows_per_shard` over `data_shards` (mesh data x fsdp) devices when that is set."""
    per_shard = int(config.train.get("microbatch_rows_per_shard", 0) or 0)
    if per_shard <= 0:
        return int(config.train.grad_accum_steps)
    rows = int(config.train.global_batch_rows)
    if rows % (per_shard * data_shards):
        raise ValueError(
            f"train.global_batch_rows={rows} does not divide into microbatches of "
            f"train.microbatch_rows_per_shard={per_shard} x {data_shards} devices (data x fsdp)"
        )
    return rows // (per_shard * data_shards)


def _validate_train(c: ConfigChecker, objective: str | None) -> None:
    from prm_jax.training.losses import PRM_LOSSES

    c.integer("train.num_steps", 1)
    rows = c.integer("train.global_batch_rows", 1)
    accum = c.integer("train.grad_accum_steps", 1)
    if rows and accum and rows % accum:
        c.add("train.grad_accum_steps", accum, f"must divide train.global_batch_rows={rows}")
    for field in ("train.log_every", "train.eval_every"):
        c.integer(field, 1)
    c.boolean("train.progress")
    c.boolean("train.allow_config_change")
    c.boolean("train.preflight_plan")
    c.integer("train.lm_loss_chunk_tokens", 0)
    per_shard = c.integer("train.microbatch_rows_per_shard", 0)
    if per_shard and accum not in (None, 1):
        c.add(
            "train.grad_accum_steps",
            accum,
            f"is derived from train.microbatch_rows_per_shard={per_shard}; set one of them "
            "(--config.train.microbatch_rows_per_shard=0 to give grad_accum_steps yourself)",
        )
    loss = c.choice("train.loss", PRM_LOSSES)
    if loss and objective == "lm" and loss != "cross_entropy":
        c.add("train.loss", loss, "objective='lm' trains with 'cross_entropy' only")
    c.number("train.peak_flops_per_device", 0.0)
    # warmup_steps > num_steps is allowed (short smoke runs of real configs; the demo's micro
    # band): the learning rate then never reaches its peak, which `warnings` reports.
    c.integer("optimizer.warmup_steps", 0)


def _validate_optimizer(c: ConfigChecker) -> None:
    c.number("optimizer.learning_rate", 0.0, low_open=True)
    c.number("optimizer.end_learning_rate_ratio", 0.0, 1.0)
    c.choice("optimizer.schedule", SCHEDULES)
    c.number("optimizer.b1", 0.0, 1.0, high_open=True)
    c.number("optimizer.b2", 0.0, 1.0, high_open=True)
    c.number("optimizer.eps", 0.0, low_open=True)
    c.number("optimizer.weight_decay", 0.0)
    c.number("optimizer.grad_clip_norm", 0.0)  # 0 disables clipping; a negative norm is a typo, not "off"


def _validate_checkpoint(c: ConfigChecker) -> None:
    c.integer("checkpoint.save_every", 1)
    keep = c.get("checkpoint.max_to_keep")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        c.add(
            "checkpoint.max_to_keep", keep, "must be >= 1 (0 would delete every checkpoint, the final model included)"
        )
    c.boolean("checkpoint.async_save")


def _validate_mesh(c: ConfigChecker, device_count: int | None) -> None:
    mesh = c.get("mesh")
    if mesh is MISSING or not hasattr(mesh, "items"):
        c.add("mesh", mesh, f"must map {MESH_AXES} to sizes")
        return
    unknown = sorted(set(mesh.keys()) - set(MESH_AXES))
    if unknown:
        c.add("mesh", dict(mesh), f"unknown axes {unknown}; use {MESH_AXES}")
        return
    sizes: dict[str, int] = {}
    for axis in MESH_AXES:
        value = mesh.get(axis, 1)
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
            c.add(f"mesh.{axis}", value, "must be a positive integer, or -1 for the remaining devices")
            return
        sizes[axis] = value
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        c.add("mesh", sizes, f"at most one axis may be -1, got {free}")
        return
    if device_count is None:
        return
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free and device_count % fixed:
        c.add("mesh", sizes, f"{device_count} devices do not divide by the fixed axes (product {fixed})")
        return
    if free:
        sizes[free[0]] = device_count // fixed
    elif fixed != device_count:
        c.add("mesh", sizes, f"needs {fixed} devices, {device_count} available")
        return
    rows, accum = c.get("train.global_batch_rows"), c.get("train.grad_accum_steps")
    per_shard = c.get("train.microbatch_rows_per_shard")
    shards = sizes["data"] * sizes["fsdp"]
    if isinstance(per_shard, int) and per_shard > 0 and isinstance(rows, int) and rows > 0:
        if rows % (per_shard * shards):
            c.add(
                "train.microbatch_rows_per_shard",
                per_shard,
                f"x mesh data x fsdp = {shards} devices must divide train.global_batch_rows={rows}",
            )
    elif isinstance(rows, int) and isinstance(accum, int) and rows > 0 and accum > 0 and rows % accum == 0:
        if (rows // accum) % shards:
            c.add(
                "train.global_batch_rows",
                rows,
                f"a microbatch of {rows // accum} rows (/ grad_accum_steps={accum}) must divide over "
                f"mesh data x fsdp = {shards} devices",
            )
