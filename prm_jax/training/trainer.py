"""The training loop: sharded PRM (or causal-LM) training with Orbax checkpoints.

Side effects live here (data loading, checkpoint I/O, metrics, signals); the math is in
`train_step`. One run directory (`workdir`) holds `checkpoints/<step>/` (params, opt_state,
data_iter, model_config, trainer_state), `prm_tokenizer/` (the separator-bearing tokenizer a PRM run
trains with, recorded in every checkpoint's metadata), `metrics.jsonl`, `tensorboard/`, and
`broken_checkpoints/<step>/` once a resume found a damaged step and fell back past it. A
checkpoint step directory is also a model checkpoint: `weights.load_model` and `launch.convert`
read it.

Determinism: every process builds the same global batch stream (same seed, same data) and feeds
the rows its devices own, so a run's batches do not depend on the number of processes, and a
restored iterator state replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import math
import signal
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prm_jax.checkpoint import (
    CONFIG_ITEM,
    LAYOUT_VERSION,
    PARAMS_ITEM,
    checkpoint_metadata,
    params_save_args,
    read_checkpoint_metadata,
)
from prm_jax.files import naming_path
from prm_jax.metrics import first_error_index, step_error_scores
from prm_jax.models.config import ModelConfig
from prm_jax.models.factory import abstract_model, abstract_params, create_model, params_of
from prm_jax.models.vocab import grow_vocab_axis, padded_vocab_size, vocab_axes
from prm_jax.sharding import logical_to_partition_spec, make_mesh
from prm_jax.training import flops
from prm_jax.training.config import grad_accum_steps
from prm_jax.training.metrics_writer import MetricsWriter
from prm_jax.training.optimizer import OptimizerConfig, build_optimizer, learning_rate_schedule
from prm_jax.training.presets import arch_differences, arch_mismatch_message
from prm_jax.training.train_step import make_eval_step, make_train_step
from prm_jax.weights import load_weights, read_config, source_dtype

_log = logging.getLogger(__name__)

OPT_STATE_ITEM = "opt_state"
DATA_ITER_ITEM = "data_iter"
TRAINER_STATE_ITEM = "trainer_state"
#: Where damaged checkpoint steps are moved once an earlier one restored (beside `checkpoints/`).
BROKEN_CHECKPOINTS_DIR = "broken_checkpoints"
# The batch fields the jitted steps take; the others (example and step indices) stay on the host.
STEP_INPUT_FIELDS = ("input_ids", "segment_ids", "positions", "loss_mask", "labels", "targets")


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
    final_step: int
    stopped_early: bool  # SIGTERM / preemption
    last_metrics: dict[str, float]
    last_eval: dict[str, float] | None


# ---------------------------------------------------------------------------- model config


_RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention_impl", "max_segments_per_row")


def training_model_config(
    config: ml_collections.ConfigDict, tokenizer_record: dict[str, Any] | None = None
) -> ModelConfig:
    """The ModelConfig to train: from `model.init_from`'s config (Orbax or HF) or `model.arch`, heads per objective.

    With the run's `tokenizer_record`, a separator the run added to the tokenizer (origin "added")
    gets an embedding row: the vocabulary grows (`padded_vocab_size`) only when the id falls outside
    it, and `Trainer._fresh_params` grows the base's arrays to match.

    A preset that names its base model (`model.arch_name`) refuses an init_from checkpoint of other
    shapes (`training.presets`); without a name, `model.arch` is ignored with init_from.
    """
    runtime = {f: config.model[f] for f in _RUNTIME_FIELDS}
    heads = {"with_prm_head": config.objective == "prm", "with_lm_head": config.objective == "lm"}
    if config.model.init_from:
        model_config = read_config(config.model.init_from).replace(**runtime, **heads)
        arch_name = config.model.get("arch_name", "")
        differences = arch_differences(dict(config.model.arch), model_config) if arch_name else []
        if differences:
            raise ValueError(arch_mismatch_message(arch_name, config.model.init_from, differences))
    else:
        model_config = ModelConfig(**dict(config.model.arch), **runtime, **heads)
    if tokenizer_record is None or tokenizer_record.get("origin") != "added":
        return model_config
    needed = int(tokenizer_record["separator_id"]) + 1
    return model_config.replace(vocab_size=padded_vocab_size(model_config.vocab_size, needed))


# ---------------------------------------------------------------------------- sharding helpers


def _batch_sharding(mesh: Mesh, rows: int) -> NamedSharding:
    spec = logical_to_partition_spec(("activation_batch", None), (rows, 1), mesh)
    return NamedSharding(mesh, spec)


def _local_rows(sharding: NamedSharding, global_shape: tuple[int, int]) -> slice:
    """The contiguous block of global rows whose shards live on this process's devices."""
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        rows = index[0]
        starts.append(rows.start or 0)
        stops.append(global_shape[0] if rows.stop is None else rows.stop)
    return slice(min(starts), max(stops))


def _to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    out = {}
    for name in STEP_INPUT_FIELDS:
        value = batch[name]
        rows = _local_rows(sharding, value.shape)
        out[name] = jax.make_array_from_process_local_data(sharding, value[rows], value.shape)
    return out


def _fingerprint(batch: dict[str, np.ndarray]) -> int:
    """A cheap identity of a batch's content: equal fingerprints = the same examples, same order."""
    return zlib.crc32(np.ascontiguousarray(batch["input_ids"]).tobytes()) ^ zlib.crc32(
        np.ascontiguousarray(batch["segment_ids"]).tobytes()
    )


# ---------------------------------------------------------------------------- trainer


class Trainer:
    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str | Path | None,
        *,
        tokenizer_record: dict[str, Any] | None = None,
        devices: Sequence[jax.Device] | None = None,
    ):
        """`tokenizer_record`: the step separator and tokenizer directory the run trains with
        (`StepSeparator.to_json_dict()` plus `dir`), stored in every checkpoint's metadata so an
        export scores at the same token id.

        `workdir=None` builds the steps and their shardings only, no checkpoint manager (a memory
        plan, `training.plan`); `devices` are the mesh's (default: all; a compile-only topology's
        for a deviceless plan)."""
        self.config = config
        self.workdir = Path(workdir).absolute() if workdir is not None else None
        self.tokenizer_record = tokenizer_record
        # The dtype the base was imported in travels with the run: the export default.
        init_from = config.model.init_from
        self.source_dtype = source_dtype(init_from) if init_from else None
        self.is_primary = jax.process_index() == 0
        self.mesh = make_mesh({k: int(v) for k, v in config.mesh.items()}, devices)
        self.model_config = training_model_config(config, tokenizer_record)
        self.objective = config.objective
        self.global_rows = int(config.train.global_batch_rows)
        data_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.grad_accum_steps = accum = grad_accum_steps(config, data_shards)
        if self.global_rows % accum:
            raise ValueError(f"global_batch_rows={self.global_rows} is not divisible by grad_accum_steps={accum}")
        if (self.global_rows // accum) % data_shards:
            # Otherwise the batch constraint silently replicates: every device would compute the
            # whole microbatch.
            raise ValueError(
                f"a microbatch of {self.global_rows // accum} rows (global_batch_rows={self.global_rows} / "
                f"grad_accum_steps={accum}) does not divide over data x fsdp = {data_shards} devices"
            )
        self.opt_config = OptimizerConfig(**dict(config.optimizer), total_steps=int(config.train.num_steps))
        self.optimizer = build_optimizer(self.opt_config)
        self.schedule = learning_rate_schedule(self.opt_config)

        self.graphdef = nnx.graphdef(abstract_model(self.model_config))
        self.abstract_params = abstract_params(self.model_config, self.mesh)
        self.param_shardings = jax.tree.map(lambda s: s.sharding, self.abstract_params)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        # Optimizer moments are sharded exactly like their parameters (counts replicated); left to
        # the compiler, zeros_like would come out replicated on every device.
        self.abstract_opt_state = jax.eval_shape(self.optimizer.init, self.abstract_params)
        self.opt_shardings = optax.tree_map_params(
            self.optimizer,
            lambda _, sharding: sharding,
            self.abstract_opt_state,
            self.param_shardings,
            transform_non_params=lambda _: replicated,
        )
        self.batch_sharding = _batch_sharding(self.mesh, self.global_rows)
        self.train_step = jax.jit(
            make_train_step(
                self.graphdef,
                self.optimizer,
                objective=self.objective,
                grad_accum_steps=accum,
                schedule=self.schedule,
                loss=str(config.train.loss),
                lm_loss_chunk_tokens=int(config.train.lm_loss_chunk_tokens),
            ),
            in_shardings=(self.param_shardings, self.opt_shardings, self.batch_sharding, replicated),
            out_shardings=(self.param_shardings, self.opt_shardings, replicated),
            donate_argnums=(0, 1),
        )
        self.eval_step = jax.jit(
            make_eval_step(
                self.graphdef,
                objective=self.objective,
                loss=str(config.train.loss),
                lm_loss_chunk_tokens=int(config.train.lm_loss_chunk_tokens),
            ),
            in_shardings=(self.param_shardings, self.batch_sharding),
            out_shardings=replicated,
        )
        self.flops_per_token = flops.training_flops_per_token(
            self.model_config, int(config.data.seq_len), self.objective
        )
        self.peak_flops = flops.peak_flops_per_device(
            self.mesh.devices.flat[0], override=float(config.train.peak_flops_per_device)
        )

        self.checkpoint_manager = None
        if self.workdir is not None:
            self.checkpoint_manager = ocp.CheckpointManager(
                self.workdir / "checkpoints",
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=int(config.checkpoint.max_to_keep),
                    enable_async_checkpointing=bool(config.checkpoint.async_save),
                    create=True,
                ),
            )
        self._stop_requested = False
        self._preflight: dict[str, Any] | None = None  # the pre-flight's figures, once it ran
        self._last_good_step: int | None = None  # the newest checkpoint known to be committed
        self._saving_step: int | None = None  # a save started and not yet confirmed

    # ------------------------------------------------------------------ state

    def _fresh_params(self) -> Any:
        init_from = self.config.model.init_from
        seed = int(self.config.seed)
        if not init_from:
            return params_of(create_model(self.model_config, seed=seed, mesh=self.mesh))
        # Load what the source has (backbone, and whichever of this run's heads it carries);
        # a head its config does not declare starts from the seed (a declared one that is missing is
        # an error), never a whole second model.
        base_rows = read_config(init_from).vocab_size
        params = load_weights(
            init_from, self.model_config.replace(vocab_size=base_rows), mesh=self.mesh, fresh_heads_seed=seed
        )
        if base_rows != self.model_config.vocab_size:
            params = self._grow_vocab(params, base_rows)
        return params

    def _grow_vocab(self, params: Any, base_rows: int) -> Any:
        """The base's vocab-indexed arrays grown to this run's vocabulary (an added separator),
        new entries at the mean of the base's rows, laid out with the shardings the model expects."""
        rows = self.model_config.vocab_size
        _log.info(
            "growing the vocabulary of %s from %d to %d rows for the step separator (new rows: the mean row)",
            self.config.model.init_from,
            base_rows,
            rows,
        )
        flat, shardings = nnx.traversals.flatten_mapping(params), nnx.traversals.flatten_mapping(self.param_shardings)
        for path, axis in vocab_axes(self.model_config).items():
            if path in flat:
                grow = functools.partial(grow_vocab_axis, vocab_size=rows, axis=axis)
                flat[path] = jax.jit(grow, out_shardings=shardings[path])(flat[path])
        return nnx.traversals.unflatten_mapping(flat)

    def _save(
        self, step: int, params: Any, opt_state: Any, iterator: Any, extra: dict[str, Any], force: bool = False
    ) -> bool:
        self._confirm_save(block=True)  # Orbax would wait for the previous save anyway
        try:
            with naming_path(self.workdir / "checkpoints"):  # a full disk names where
                saved = self._start_save(step, params, opt_state, iterator, extra, force)
        except Exception as error:  # noqa: BLE001 - any failure to write loses this step's state
            raise self._save_failed(step, error) from error
        self._saving_step = step if saved else None
        if not self.config.checkpoint.async_save:
            self._confirm_save(block=True)
        return saved

    def _confirm_save(self, *, block: bool) -> None:
        """Raise TrainingError when the save in flight failed; `block=False` only looks when it
        has finished (cheap enough for every step, so a failed async save stops the run at once)."""
        step = self._saving_step
        if step is None or (not block and self.checkpoint_manager.is_saving_in_progress()):
            return
        self._saving_step = None
        try:
            with naming_path(self.workdir / "checkpoints"):
                self.checkpoint_manager.wait_until_finished()
                self.checkpoint_manager.check_for_errors()
        except Exception as error:  # noqa: BLE001 - Orbax re-raises the writer's own error
            raise self._save_failed(step, error) from error
        if not ocp.step.is_checkpoint_finalized(self.workdir / "checkpoints" / str(step)):
            raise self._save_failed(step, RuntimeError("the checkpoint was not committed (see the Orbax log above)"))
        self._last_good_step = step

    def _save_failed(self, step: int, error: BaseException) -> TrainingError:
        return TrainingError(
            f"saving checkpoint {step} failed ({type(error).__name__}: {error}); training stopped. "
            f"{self.last_good_checkpoint()}"
        )

    def last_good_checkpoint(self) -> str:
        """A sentence naming the newest committed checkpoint, for messages that stop the run."""
        if self._last_good_step is None:
            return f"No checkpoint is committed yet in {self.workdir / 'checkpoints'}."
        return f"The last good checkpoint is step {self._last_good_step} in {self.workdir / 'checkpoints'}."

    def _start_save(
        self, step: int, params: Any, opt_state: Any, iterator: Any, extra: dict[str, Any], force: bool
    ) -> bool:
        meta = checkpoint_metadata(
            self.model_config,
            {"source": "prm_jax.training", "init_from": self.config.model.init_from or None},
            source_dtype=self.source_dtype,
            tokenizer=self.tokenizer_record,
        )
        saved = self.checkpoint_manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    PARAMS_ITEM: ocp.args.PyTreeSave(params, save_args=params_save_args(params)),
                    OPT_STATE_ITEM: ocp.args.PyTreeSave(opt_state),
                    CONFIG_ITEM: ocp.args.JsonSave(meta),
                    DATA_ITER_ITEM: grain.checkpoint.CheckpointSave(iterator),
                    TRAINER_STATE_ITEM: ocp.args.JsonSave({"step": step, **extra}),
                }
            ),
            force=force,
        )
        return bool(saved)

    def _restore_latest(self, iterator: Any) -> tuple[int, Any, Any, dict[str, Any]] | None:
        """(step, params, opt_state, trainer_state) of the newest committed checkpoint that restores,
        or None when there is none (a fresh run).

        A committed checkpoint can still be damaged afterwards (a truncated array file, an emptied
        metadata file: a disk or a copy gone wrong). Such a step is skipped with a warning naming it
        and why, and the previous committed one is restored; once one restores, the damaged steps are
        moved aside (`_set_aside`), so the run saves those steps anew and nothing is deleted. A
        refusal (another model, separator or layout) is not damage: it stops the run. When no
        committed step restores, the run stops and names them all rather than silently start over.
        """
        broken: list[tuple[int, str]] = []
        for step in sorted(self.checkpoint_manager.all_steps(), reverse=True):
            try:
                params, opt_state, trainer_state = self._restore(step, iterator)
                problem = None
            except DamagedCheckpointError as error:
                problem = str(error)
            problem = _agreed_problem(problem)
            if problem is None:
                if broken:
                    self._set_aside([s for s, _ in broken])
                return step, params, opt_state, trainer_state
            broken.append((step, problem))
            _log.warning(
                "checkpoint step %d in %s cannot be restored (%s); trying the previous committed step",
                step,
                self.workdir / "checkpoints",
                problem,
            )
        if broken:
            listed = "; ".join(f"step {s}: {p}" for s, p in broken)
            raise TrainingError(
                f"no checkpoint in {self.workdir / 'checkpoints'} can be restored ({listed}); restore the files, or "
                f"move {self.workdir / 'checkpoints'} aside to start the run over"
            )
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Move damaged checkpoint steps out of Orbax's directory (into `broken_checkpoints/`), kept
        for inspection: the run saves those steps again, and Orbax never counts them as saved."""
        root = self.workdir / "checkpoints"
        aside = self.workdir / BROKEN_CHECKPOINTS_DIR
        if self.is_primary:
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = aside / str(step)
                suffix = 1
                while target.exists():
                    target, suffix = aside / f"{step}.{suffix}", suffix + 1
                (root / str(step)).rename(target)
                _log.warning("moved the damaged checkpoint step %d to %s (delete it once inspected)", step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("prm_jax_set_aside_broken_checkpoints")
        self.checkpoint_manager.reload()

    def _restore(self, step: int, iterator: Any) -> tuple[Any, Any, dict[str, Any]]:
        """Restore checkpoint `step`: raises TrainingError for a checkpoint of another model, separator
        or layout, `DamagedCheckpointError` naming the item for files that cannot be read."""
        directory = self.workdir / "checkpoints" / str(step)
        # Runtime fields (dtype, remat, attention) may change on resume, e.g. after an OOM; the
        # architecture and heads may not. Checked before restoring anything big.
        with _damage_in(CONFIG_ITEM):
            metadata = read_checkpoint_metadata(directory)
            stored = ModelConfig.from_json_dict(metadata["config"], source=str(directory / CONFIG_ITEM))
            layout_version = metadata["layout_version"]
        runtime = {f: getattr(self.model_config, f) for f in _RUNTIME_FIELDS}
        if stored.replace(**runtime) != self.model_config:
            raise TrainingError(
                f"checkpoint {step} in {self.workdir} was written for a different model:\n"
                f"  checkpoint: {stored}\n  this run:   {self.model_config}"
            )
        check_same_separator(metadata.get("tokenizer"), self.tokenizer_record, step, self.workdir)
        if layout_version != LAYOUT_VERSION:
            # Its optimizer state holds the old parameter names too; only the model is read across layouts.
            raise TrainingError(
                f"checkpoint {step} in {self.workdir} has parameter layout {layout_version} (an older "
                f"prm-jax): resume it with that version, or start a new run from it with "
                f"--config.model.init_from={directory}"
            )
        abstract_opt = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            self.abstract_opt_state,
            self.opt_shardings,
        )
        # One item at a time, so damage is named by its item; the data iterator last, so a damaged
        # step never leaves the iterator moved (the previous step's restore sets it anyway).
        items = {
            PARAMS_ITEM: ocp.args.PyTreeRestore(
                item=self.abstract_params,
                restore_args=ocp.checkpoint_utils.construct_restore_args(self.abstract_params),
            ),
            OPT_STATE_ITEM: ocp.args.PyTreeRestore(
                item=abstract_opt, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_opt)
            ),
            TRAINER_STATE_ITEM: ocp.args.JsonRestore(),
            DATA_ITER_ITEM: grain.checkpoint.CheckpointRestore(iterator),
        }
        restored = {}
        for name, args in items.items():
            with _damage_in(name):
                restored[name] = self.checkpoint_manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]
        with _damage_in(TRAINER_STATE_ITEM):
            trainer_state = dict(restored[TRAINER_STATE_ITEM])
            if int(trainer_state["step"]) != step:
                raise ValueError(f"records step {trainer_state['step']}")
        return restored[PARAMS_ITEM], restored[OPT_STATE_ITEM], trainer_state

    # ------------------------------------------------------------------ eval

    def evaluate(self, params: Any, eval_batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
        loss_sum = weight = correct = 0.0
        rewards_by_example: dict[int, dict[int, float]] = {}
        labels_by_example: dict[int, dict[int, float]] = {}
        for batch in eval_batches:
            with jax.set_mesh(self.mesh):
                sums, rewards = self.eval_step(params, _to_global(batch, self.batch_sharding))
            loss_sum += float(sums["loss_sum"])
            weight += float(sums["weight"])
            correct += float(sums["correct"])
            if self.objective != "prm":
                continue
            rewards = np.asarray(rewards)
            rows, cols = np.nonzero(batch["loss_mask"] > 0)
            for r, c in zip(rows, cols):
                ex, st = int(batch["example_index"][r, c]), int(batch["step_index"][r, c])
                rewards_by_example.setdefault(ex, {})[st] = float(rewards[r, c])
                labels_by_example.setdefault(ex, {})[st] = float(batch["labels"][r, c])
        out = {"eval_loss": loss_sum / max(weight, 1.0), "eval_accuracy": correct / max(weight, 1.0)}
        if self.objective == "prm":
            pairs = []
            for ex, rewards in rewards_by_example.items():
                order = sorted(rewards)
                pairs.append(
                    (
                        first_error_index([rewards[s] for s in order]),
                        first_error_index([labels_by_example[ex][s] for s in order]),
                    )
                )
            scores = step_error_scores(pairs)
            out.update({"eval_f1": scores.f1, "eval_acc_err": scores.acc_err, "eval_acc_ok": scores.acc_ok})
        return out

    # ------------------------------------------------------------------ pre-flight

    def preflight(self) -> dict[str, Any]:
        """Compile the train step for this mesh from abstract inputs (no weights exist yet) and
        raise `plan.PreflightError` when XLA's per-device memory exceeds what the devices can
        allocate; on CPU (no device limit) the figures are only logged. The run then trains with
        the compiled executable: the pre-flight costs no second compile. Returns the figures."""
        from prm_jax.training import plan

        if self._preflight is None:
            self._preflight = plan.preflight(self)
        return self._preflight

    # ------------------------------------------------------------------ loop

    def _install_sigterm_handler(self) -> None:
        def request_stop(signum, frame):  # noqa: ARG001
            _log.warning("SIGTERM received: saving a checkpoint at the next step boundary and exiting")
            self._stop_requested = True

        if threading_is_main():
            signal.signal(signal.SIGTERM, request_stop)

    def _stop_agreed(self) -> bool:
        """All processes stop at the same step (any one's SIGTERM counts)."""
        flag = np.array([self._stop_requested], dtype=np.int32)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = multihost_utils.process_allgather(flag)
        return bool(np.any(flag))

    def run(
        self,
        train_iterator: Any,
        eval_batches: list[dict[str, np.ndarray]] | None,
        data_stats: dict[str, Any],
        on_start: Callable[[int | None], None] | None = None,
    ) -> TrainResult:
        """Train to `train.num_steps`, resuming from the newest checkpoint that restores
        (`_restore_latest`). `on_start(step)` runs once the state is restored (`step`) or freshly
        initialised (None), before the first line of metrics: the caller writes its run records
        there, so a failed restore leaves them as they were."""
        cfg = self.config.train
        num_steps = int(cfg.num_steps)
        if cfg.get("preflight_plan", False):
            self.preflight()  # before any weights are loaded or restored
        restored = self._restore_latest(train_iterator)
        latest = None if restored is None else restored[0]
        self._last_good_step = latest
        if restored is not None:
            _, params, opt_state, trainer_state = restored
            step = int(trainer_state["step"])
            _log.info("resumed from %s at step %d", self.workdir / "checkpoints", step)
        else:
            params = self._fresh_params()
            with jax.set_mesh(self.mesh):
                opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(params)
            step = 0
        if on_start is not None:
            on_start(latest)  # the run's state is known good: its records may now be written
        # A fresh start forgets all lines of an attempt killed before its first checkpoint
        # (resume_step=None); keeping its step-0 line would log the data stats twice.
        writer = MetricsWriter(self.workdir, enabled=self.is_primary, resume_step=step if latest is not None else None)
        if self.is_primary and step == 0:
            writer.write(0, {f"data/{k}": v for k, v in data_stats.items() if isinstance(v, (int, float))})
        self._install_sigterm_handler()

        progress = _progress(self.is_primary and bool(self.config.train.progress), initial=step, total=num_steps)
        pending: list[tuple[int, dict[str, jax.Array], int]] = []
        last_metrics: dict[str, float] = {}
        last_eval: dict[str, float] | None = None
        # (completion time, cumulative tokens) of recent steps: throughput over a sliding window is
        # robust to a step whose metrics are read right after the previous one's (save/eval steps).
        completions: collections.deque[tuple[float, float]] = collections.deque(maxlen=21)
        completions.append((time.perf_counter(), 0.0))
        total_tokens = 0.0
        stopped = False

        def resolve_pending() -> None:
            nonlocal total_tokens, last_metrics
            while pending:
                s, device_metrics, fingerprint = pending.pop(0)
                metrics = {k: float(v) for k, v in device_metrics.items()}
                checked = ("loss", "grad_norm", "param_norm")
                if not all(math.isfinite(metrics[k]) for k in checked):
                    values = ", ".join(f"{k}={metrics[k]}" for k in checked)
                    raise TrainingError(
                        f"non-finite training state at step {s} ({values}); stopping. {self.last_good_checkpoint()}"
                    )
                total_tokens += metrics["tokens"]
                completions.append((time.perf_counter(), total_tokens))
                if s % int(cfg.log_every) == 0 or s == num_steps:
                    (t0, n0), (t1, n1) = completions[0], completions[-1]
                    tokens_per_s = (n1 - n0) / max(t1 - t0, 1e-9)
                    metrics.update({"tokens_per_s": tokens_per_s, "batch_fingerprint": fingerprint})
                    if self.peak_flops:
                        metrics["mfu"] = tokens_per_s * self.flops_per_token / (self.peak_flops * jax.device_count())
                    writer.write(s, metrics)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tokens_per_s:.0f}")
                last_metrics = metrics

        try:
            while step < num_steps:
                batch = next(train_iterator)
                fingerprint = _fingerprint(batch)
                global_batch = _to_global(batch, self.batch_sharding)
                with jax.set_mesh(self.mesh):
                    params, opt_state, device_metrics = self.train_step(params, opt_state, global_batch, np.int32(step))
                step += 1
                progress.update(1)
                self._confirm_save(block=False)
                # Resolve the previous step's metrics after dispatching this one: the host check
                # for NaN then never stalls the device pipeline.
                resolve_pending()
                pending.append((step, device_metrics, fingerprint))
                # Multi-host agreement is a collective: check at log boundaries, not every step.
                stop_now = self._stop_agreed() if jax.process_count() == 1 or step % int(cfg.log_every) == 0 else False
                if eval_batches and (step % int(cfg.eval_every) == 0 or step == num_steps):
                    resolve_pending()
                    last_eval = self.evaluate(params, eval_batches)
                    writer.write(step, last_eval)
                if step % int(self.config.checkpoint.save_every) == 0 or step == num_steps or stop_now:
                    resolve_pending()  # never checkpoint a step whose loss was not checked
                    self._save(step, params, opt_state, train_iterator, {"data_stats": data_stats}, force=True)
                if stop_now:
                    stopped = True
                    _log.warning("stopped at step %d on request; checkpoint saved", step)
                    break
            resolve_pending()
            self._confirm_save(block=True)
            self._require_final_checkpoint(step)
        finally:
            progress.close()
            self._wait_quietly()
            writer.flush()
            writer.close()
        return TrainResult(step, stopped, last_metrics, last_eval)

    def _require_final_checkpoint(self, step: int) -> None:
        """No run ends without the checkpoint of its last step (it is the trained model)."""
        if step > 0 and not ocp.step.is_checkpoint_finalized(self.workdir / "checkpoints" / str(step)):
            raise TrainingError(
                f"training reached step {step} but its checkpoint is missing from "
                f"{self.workdir / 'checkpoints'}; {self.last_good_checkpoint()}"
            )

    def _wait_quietly(self) -> None:
        """On the way out of a failing run: finish writes in flight without masking its error."""
        try:
            self.checkpoint_manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - already reported by _confirm_save, or the run is failing
            _log.exception("a checkpoint save failed while the run was stopping")

    def close(self) -> None:
        if self.checkpoint_manager is None:
            return
        try:
            self.checkpoint_manager.close()
        except Exception:  # noqa: BLE001 - a failed save was reported by run(); never mask it
            _log.exception("closing the checkpoint manager failed")


def check_same_separator(
    stored: dict[str, Any] | None, current: dict[str, Any] | None, step: int, workdir: Path
) -> None:
    """A resumed run must supervise the same token id over the same vocabulary as before."""
    if stored is None or current is None:
        return  # checkpoints from before the record existed, or a causal-LM run
    keys = ("separator", "separator_id", "vocabulary")
    if any(stored[k] != current[k] for k in keys):
        raise TrainingError(
            f"checkpoint {step} in {workdir} was trained with separator {stored['separator']!r} at id "
            f"{stored['separator_id']} (vocabulary {stored['vocabulary']}); this run's tokenizer gives "
            f"{current['separator']!r} id {current['separator_id']} (vocabulary {current['vocabulary']})"
        )


class DamagedCheckpointError(Exception):
    """A committed checkpoint's files cannot be read (the message names the item and the error)."""


# Errors that say the files are bad: TensorStore reports data errors as ValueError, JSON decoding
# too; a missing key, a wrong type, a missing file. Anything else (MemoryError, an XLA RuntimeError,
# an OSError such as EIO or EACCES) is no verdict on the files: moving the step aside for it would
# silently restart the run from an older step.
_DAMAGE = (ValueError, KeyError, TypeError, IndexError, EOFError, FileNotFoundError)
# Out of memory reported inside a ValueError (TensorStore, XLA): the files may be intact.
_NOT_DAMAGE_TEXT = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory")


def _is_damage(error: BaseException) -> bool:
    """Whether `error` (Orbax's, wrapping TensorStore's or JSON's) says the checkpoint's files are bad."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    if any(isinstance(e, MemoryError) or any(t in str(e) for t in _NOT_DAMAGE_TEXT) for e in chain):
        return False
    return isinstance(chain[-1], _DAMAGE)


@contextlib.contextmanager
def _damage_in(item: str) -> Iterator[None]:
    """A failure reading `item` of a checkpoint that says its files are bad (`_is_damage`) is damage
    to it; a refusal (TrainingError) stays one, and any other error (out of memory, a read error of
    the disk) is raised as it is, moving nothing."""
    try:
        yield
    except TrainingError:
        raise
    except Exception as error:
        if not _is_damage(error):
            raise
        raise DamagedCheckpointError(f"{item}/: {_first_line(error)}") from error


def _first_line(error: BaseException, limit: int = 300) -> str:
    """An error as one short line (TensorStore and Orbax messages run over many lines). Orbax
    re-raises TensorStore's error in a generic one: the innermost cause says which array and why."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split()) or "no message"
    text = text.split(" See full TensorStore details")[0]  # a dump of the TensorStore spec follows
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _agreed_problem(problem: str | None) -> str | None:
    """Every process restores the same step: a step one process could not restore is broken for all."""
    if jax.process_count() == 1:
        return problem
    from jax.experimental import multihost_utils

    failed = multihost_utils.process_allgather(np.array([problem is not None], dtype=np.int32))
    if problem is None and np.any(failed):
        return "another process could not restore it (see that process's log)"
    return problem


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _NullProgress:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(enabled: bool, initial: int, total: int):
    if not enabled:
        return _NullProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


__all__ = ["DamagedCheckpointError", "Trainer", "TrainResult", "TrainingError", "training_model_config"]
