"""Issue 26, training side: one writer per run directory, a resume that walks back past a damaged
checkpoint, head shapes that make sense, uncommitted checkpoints refused, records that survive a
change of current directory, and the last one-line refusals (a negative clip norm, `plan --out=DIR`,
`demo --workdir=FILE`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax.nnx.traversals import flatten_mapping
from test_front_door import assert_one_line_refusal, run_table
from tiny_assets import tiny_config
from training_runs import RUN_TIMEOUT_S, read_metrics, running, start, train_flags

from data_pipeline.synthetic import prepare_synthetic_run
from prm_jax.checkpoint import read_checkpoint_metadata, read_model_config, restore_params
from prm_jax.models.config import ModelConfig
from prm_jax.run_lock import LOCK_FILE, LocksUnsupportedError, RunLockedError, read_holders, workdir_lock
from prm_jax.training.config import ConfigError
from prm_jax.training.config import check as check_config
from prm_jax.training.run import train_from_config
from prm_jax.training.run_record import CHANGES_FILE, ConfigChangeError, check_and_record
from prm_jax.training.trainer import TrainingError

ROOT = Path(__file__).resolve().parents[1]

# A short run: 4 packed rows of 128 tokens, checkpoints at steps 2 and 4.
SHORT = {
    "train.num_steps": 4,
    "checkpoint.save_every": 2,
    "train.eval_every": 1000,
    "train.log_every": 1,
    "train.progress": False,
    "data.seq_len": 128,
    "train.global_batch_rows": 4,
    "optimizer.warmup_steps": 2,
}


# ---------------------------------------------------------------------------- 1. one writer per workdir


def _hold_in_child(workdir: Path, tool: str, *, shared: bool = False) -> subprocess.Popen:
    """Another process holding `workdir`'s lock until killed (it prints "held" once it holds it)."""
    code = (
        "import sys, time\n"
        "from prm_jax.run_lock import workdir_lock\n"
        f"with workdir_lock({str(workdir)!r}, {tool!r}, shared={shared}):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_held_workdir_is_refused_naming_its_holder_and_freed_when_the_holder_dies(tmp_path) -> None:
    workdir = tmp_path / "run"
    child = _hold_in_child(workdir, "launch.train")
    try:
        with pytest.raises(RunLockedError) as refused, workdir_lock(workdir, "launch.train"):
            pass
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(
            f"{workdir} is in use by pid {child.pid} on host {socket.gethostname()} (launch.train"
        )
        # Synthesis (a shared holder) is refused by an exclusive one too.
        with pytest.raises(RunLockedError, match=f"pid {child.pid}"), workdir_lock(workdir, "synthesis", shared=True):
            pass
    finally:
        child.kill()
        child.wait()
    # flock dies with its holder: no stale lock, and its record is no longer named.
    assert read_holders(workdir / LOCK_FILE) == []
    with workdir_lock(workdir, "launch.train"), workdir_lock(workdir, "prm_jax.training"):  # nested: this process
        assert [h.pid for h in read_holders(workdir / LOCK_FILE)] == [os.getpid()]


def test_shared_holders_exclude_only_exclusive_ones(tmp_path) -> None:
    workdir = tmp_path / "synth"
    child = _hold_in_child(workdir, "synthesis", shared=True)
    try:
        with workdir_lock(workdir, "synthesis", shared=True) as held:
            assert not held.alone()
        with pytest.raises(RunLockedError, match=f"pid {child.pid} .*synthesis"), workdir_lock(workdir, "launch.train"):
            pass
    finally:
        child.kill()
        child.wait()
    with workdir_lock(workdir, "synthesis", shared=True) as held:
        assert held.alone()


def test_shared_holders_arriving_at_once_are_all_admitted(tmp_path) -> None:
    """Each shared holder is exclusive for a moment (writing its line, asking `alone`): the others
    arriving then wait it out instead of being refused (8 synthesis shards started together)."""
    import threading

    from prm_jax.run_lock import hold

    lock = tmp_path / "synth" / LOCK_FILE
    refused: list[str] = []
    start_together = threading.Barrier(8)

    def shard() -> None:
        start_together.wait()
        for _ in range(20):
            try:  # `hold` opens its own descriptor each time: threads lock like separate processes
                with hold(lock, tool="synthesis", refusal="refused by {holder}", shared=True) as held:
                    held.alone()
            except RunLockedError as error:
                refused.append(str(error))

    threads = [threading.Thread(target=shard) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert refused == []


def test_any_lock_failure_on_process_0_reaches_the_other_processes_before_it_raises(tmp_path, monkeypatch) -> None:
    """Not only a refusal: a failure to lock at all (EACCES) is broadcast before process 0 raises,
    so the other processes of a multi-host job stop with it instead of waiting for the broadcast."""
    import errno

    from prm_jax.training import run

    def unwritable(workdir: Path, tool: str) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(workdir))

    broadcast: list[str] = []
    monkeypatch.setattr(run, "workdir_lock", unwritable)
    monkeypatch.setattr(run.jax, "process_count", lambda: 2)
    monkeypatch.setattr(run, "_from_process_0", lambda text: broadcast.append(text) or text)
    with pytest.raises(PermissionError), run.run_directory_lock(tmp_path / "run"):
        pass
    assert len(broadcast) == 1 and broadcast[0].startswith("PermissionError: ")
    # What the other processes do with it: stop, naming process 0's failure.
    monkeypatch.setattr(run.jax, "process_index", lambda: 1)
    monkeypatch.setattr(run, "_from_process_0", lambda text: broadcast[0])
    with pytest.raises(RunLockedError, match="process 0 could not lock .*PermissionError"):
        with run.run_directory_lock(tmp_path / "run"):
            pass


def test_a_workdir_on_a_file_system_without_flock_is_refused_in_one_line(tmp_path, monkeypatch) -> None:
    """No flock, no way to keep a second run out: refused (not run unguarded), leaving nothing behind."""
    import errno
    import fcntl

    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(LocksUnsupportedError) as refused, workdir_lock(tmp_path / "run", "launch.train"):
        pass
    message = str(refused.value)
    assert isinstance(refused.value, RunLockedError) and "\n" not in message
    assert str(tmp_path / "run" / LOCK_FILE) in message and "does not support flock" in message
    assert list(tmp_path.iterdir()) == []


def test_a_file_as_workdir_is_one_line_for_demo_and_train(tmp_path) -> None:
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("x")
    (demo,) = run_table("launch.demo", [[f"--workdir={a_file}"]], tmp_path)
    assert_one_line_refusal(demo, f"--workdir={a_file} is a file, not a directory")
    assert "Errno" not in demo["stderr"]


@pytest.mark.slow
def test_a_second_launch_train_on_a_running_workdir_is_refused_and_the_first_finishes(tmp_path) -> None:
    workdir = tmp_path / "run"
    flags = train_flags(workdir, 4, 2)
    first = start(flags, tmp_path / "first.log", cpu_devices=1, step_delay_s=2.0)
    with running(first):
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not read_holders(workdir / LOCK_FILE):  # the first holds the lock (before it writes anything)
            assert first.proc.poll() is None and time.monotonic() < deadline, first.log()
            time.sleep(0.05)
        second = start(flags, tmp_path / "second.log", cpu_devices=1)
        with running(second):
            assert second.wait() == 2, second.log()
        assert first.proc.poll() is None, "the first run must still be running when the second is refused"
        lines = [line for line in second.log().splitlines() if line.startswith("error:")]
        assert len(lines) == 1, second.log()
        assert f"{workdir} is in use by pid {first.proc.pid} on host {socket.gethostname()} (launch.train" in lines[0]
        assert first.wait() == 0, first.log()
    assert "training done: final_step=4" in first.log()
    metrics = read_metrics(workdir)  # every line parses
    assert [r["step"] for r in metrics["train"]] == [1, 2, 3, 4]
    assert [r["step"] for r in metrics["data"]] == [0]


# ---------------------------------------------------------------------------- 3. a damaged latest checkpoint


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """The short run trained straight (4 steps, checkpoints 2 and 4) and its final parameters."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    config = prepare_synthetic_run(tiny_config(**SHORT), workdir)
    assert train_from_config(config, workdir).final_step == 4
    return workdir, config, _params(workdir, 4)


def _params(workdir: Path, step: int) -> dict:
    return {k: np.asarray(v) for k, v in flatten_mapping(restore_params(workdir / "checkpoints" / str(step))).items()}


def _truncate_largest_array_file(step_dir: Path) -> None:
    largest = max((step_dir / "params").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_resumes_from_the_previous_step_and_ends_as_a_straight_run(
    short_run, tmp_path, caplog
) -> None:
    straight_dir, config, straight_params = short_run
    workdir = tmp_path / "run"
    shutil.copytree(straight_dir, workdir)
    config = config.copy_and_resolve_references()  # the straight run's data and tokenizer
    _truncate_largest_array_file(workdir / "checkpoints" / "4")
    with caplog.at_level("INFO"):
        result = train_from_config(config, workdir)
    assert result.final_step == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("checkpoint step 4 in" in w and "cannot be restored (params/:" in w for w in warnings), warnings
    assert any(f"resumed from {workdir / 'checkpoints'} at step 2" in r.getMessage() for r in caplog.records)
    # Retrained from step 2: the same parameters as the straight run, bit for bit.
    params = _params(workdir, 4)
    assert params.keys() == straight_params.keys()
    for path, value in params.items():
        np.testing.assert_array_equal(value, straight_params[path], err_msg=str(path))
    # The damaged step is kept aside, not deleted; the metrics say each step once.
    from prm_jax.training.trainer import BROKEN_CHECKPOINTS_DIR

    assert (workdir / BROKEN_CHECKPOINTS_DIR / "4" / "params").is_dir()
    assert [r["step"] for r in read_metrics(workdir)["train"]] == [1, 2, 3, 4]


@pytest.mark.slow
def test_an_error_that_is_no_verdict_on_the_files_is_raised_and_moves_no_checkpoint(
    short_run, tmp_path, monkeypatch
) -> None:
    """Out of memory while restoring (reported as a ValueError, as TensorStore and XLA do) says
    nothing about the files: it stops the run as it is, and no intact step is moved aside."""
    from prm_jax.training import trainer

    straight_dir, config, _ = short_run
    workdir = tmp_path / "run"
    shutil.copytree(straight_dir, workdir)

    def out_of_memory(directory: Path) -> dict:
        raise ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")

    monkeypatch.setattr(trainer, "read_checkpoint_metadata", out_of_memory)
    with pytest.raises(ValueError, match="RESOURCE_EXHAUSTED"):
        train_from_config(config.copy_and_resolve_references(), workdir)
    assert not (workdir / trainer.BROKEN_CHECKPOINTS_DIR).exists()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


@pytest.mark.slow
def test_no_restorable_checkpoint_stops_naming_each_and_leaves_the_record_alone(short_run, tmp_path) -> None:
    straight_dir, config, _ = short_run
    workdir = tmp_path / "run"
    shutil.copytree(straight_dir, workdir)
    config = config.copy_and_resolve_references()
    (workdir / "checkpoints" / "4" / "model_config" / "metadata").write_text("")  # an emptied metadata file
    (workdir / "checkpoints" / "2" / "trainer_state" / "metadata").write_text("{garbled")
    record = (workdir / "config.json").read_text()
    config.train.num_steps, config.train.allow_config_change = 6, True
    with pytest.raises(TrainingError) as stopped:
        train_from_config(config, workdir)
    message = str(stopped.value)
    assert "no checkpoint in" in message and "step 4: model_config/: JSONDecodeError" in message, message
    assert "step 2: trainer_state/: JSONDecodeError" in message, message
    # The accepted change was not recorded: config.json is rewritten only once a restore succeeded.
    assert (workdir / "config.json").read_text() == record
    assert not (workdir / CHANGES_FILE).exists()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


# ---------------------------------------------------------------------------- 15. uncommitted checkpoints


def test_an_uncommitted_step_directory_is_refused_naming_the_latest_committed_one(short_run, tmp_path) -> None:
    straight_dir, _, _ = short_run
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.copytree(straight_dir / "checkpoints" / "4", checkpoints / "4")
    partial = checkpoints / "6.orbax-checkpoint-tmp-1234567"  # what a kill mid-save leaves
    shutil.copytree(straight_dir / "checkpoints" / "4", partial)
    for read in (read_checkpoint_metadata, read_model_config, restore_params):
        with pytest.raises(ValueError) as refused:
            read(partial)
        message = str(refused.value)
        assert "\n" not in message and f"{partial} is an uncommitted checkpoint" in message
        assert f"the latest committed step is {checkpoints / '4'}" in message
    # A training workdir is no checkpoint either: the refusal names its latest step.
    with pytest.raises(FileNotFoundError, match=f"latest committed step is {checkpoints / '4'}"):
        read_checkpoint_metadata(tmp_path / "run")


# ---------------------------------------------------------------------------- 5. head shapes


def test_head_shape_nonsense_is_refused_at_construction_checkpoint_read_and_hf_import(short_run, tmp_path) -> None:
    base = tiny_config().model.arch.to_dict()
    with pytest.raises(ValueError, match=r"num_labels=1: a PRM step head has exactly 2 labels"):
        ModelConfig(**base, num_labels=1)
    with pytest.raises(ValueError, match=r"hidden_size=0.*must be positive integers"):
        ModelConfig(**{**base, "hidden_size": 0})
    assert ModelConfig(**base, num_labels=1, with_prm_head=False).num_labels == 1  # no head, no rule
    # Checkpoint metadata naming 1 label: refused naming the file.
    step = tmp_path / "4"
    shutil.copytree(short_run[0] / "checkpoints" / "4", step)
    metadata_file = step / "model_config" / "metadata"
    metadata = json.loads(metadata_file.read_text())
    metadata["config"]["num_labels"] = 1
    metadata_file.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=rf"{step / 'model_config'}: num_labels=1: a PRM step head"):
        read_model_config(step)
    # A PRM config.json with 1 label (or an id2label of 3), refused naming the file; a causal LM's
    # num_labels describes no weights, and the head trained on it gets the recipe's 2.
    hf = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64}
    hf.update({"num_hidden_layers": 1, "num_attention_heads": 2})
    prm = {**hf, "architectures": ["Qwen2ForProcessRewardModel"]}
    with pytest.raises(ValueError, match=r"x/config\.json: num_labels=1: a PRM step head"):
        ModelConfig.from_hf_dict({**prm, "num_labels": 1}, source="x/config.json")
    with pytest.raises(ValueError, match=r"num_labels=3"):
        ModelConfig.from_hf_dict({**prm, "id2label": {"0": "a", "1": "b", "2": "c"}})
    lm = ModelConfig.from_hf_dict({**hf, "architectures": ["Qwen2ForCausalLM"], "num_labels": 1})
    assert lm.num_labels == 2 and lm.with_prm_head


# ---------------------------------------------------------------------------- 16. another current directory


def test_a_resume_from_another_current_directory_is_the_same_run(tmp_path, monkeypatch) -> None:
    """Paths are recorded absolute; a copy of the training file with the same bytes is the same data."""
    first = tmp_path / "a"
    (first / "data").mkdir(parents=True)
    (first / "tok").mkdir()
    (first / "data" / "train.jsonl").write_text('{"id": "x"}\n')
    workdir = tmp_path / "run"
    monkeypatch.chdir(first)
    config = tiny_config(**{"data.train_file": "data/train.jsonl", "data.tokenizer_dir": "tok"})
    check_and_record(config, workdir)
    (workdir / "checkpoints" / "2").mkdir(parents=True)  # a committed step: a resume

    monkeypatch.chdir(tmp_path)  # the same files, typed from elsewhere
    check_and_record(tiny_config(**{"data.train_file": "a/data/train.jsonl", "data.tokenizer_dir": "a/tok"}), workdir)
    recorded = json.loads((workdir / "config.json").read_text())
    assert recorded["data"]["train_file"] == str(first / "data" / "train.jsonl")
    assert recorded["data"]["tokenizer_dir"] == str(first / "tok")
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes((first / "data" / "train.jsonl").read_bytes())
    check_and_record(tiny_config(**{"data.train_file": str(copy), "data.tokenizer_dir": "a/tok"}), workdir)
    copy.write_text('{"id": "y"}\n')  # other bytes: other data
    with pytest.raises(ConfigChangeError, match=r"data\.train_file"):
        check_and_record(tiny_config(**{"data.train_file": str(copy), "data.tokenizer_dir": "a/tok"}), workdir)


# ---------------------------------------------------------------------------- 17. the last one-liners


def test_a_negative_clip_norm_is_refused_and_zero_disables_clipping() -> None:
    with pytest.raises(ConfigError, match=r"optimizer\.grad_clip_norm"):
        check_config(tiny_config(**{"optimizer.grad_clip_norm": -1.0}))
    check_config(tiny_config(**{"optimizer.grad_clip_norm": 0.0}))


def test_plan_out_is_checked_before_the_compile(tmp_path) -> None:
    (outcome,) = run_table("launch.plan", [[f"--config={ROOT / 'configs' / 'tiny.py'}", f"--out={tmp_path}"]], tmp_path)
    assert_one_line_refusal(outcome, f"--out={tmp_path} is a directory")
    assert outcome["stdout"] == ""  # no plan printed: nothing was compiled


def test_a_run_record_past_the_json_decoder_or_not_a_file_is_one_line(tmp_path) -> None:
    """The run record (W/config.json) is read bounded and decoded by `jsonl.loads`: a 5,000-digit
    number, or a FIFO in its place, is a ConfigChangeError naming it, not a bare ValueError or a hang."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "2").mkdir(parents=True)  # a committed step: the record is read
    record = workdir / "config.json"
    record.write_text('{"seed": ' + "1" * 5000 + "}")
    with pytest.raises(ConfigChangeError) as e:
        check_and_record(tiny_config(), workdir)
    assert str(record) in str(e.value) and "digits" in str(e.value) and "\n" not in str(e.value)
    record.unlink()
    os.mkfifo(record)
    with pytest.raises(ConfigChangeError, match="config.json is not a regular file but a FIFO"):
        check_and_record(tiny_config(), workdir)


def test_a_full_disk_during_a_checkpoint_save_names_the_checkpoints_directory(tmp_path) -> None:
    """Orbax's writes (and an async save's error, raised at confirmation) are named by
    `files.naming_path`: the message says where the disk filled up."""
    import errno
    import types

    from prm_jax.training.trainer import Trainer

    def full(*args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    trainer = object.__new__(Trainer)  # only the save bookkeeping, no model
    trainer.workdir = tmp_path / "run"
    trainer.config = tiny_config(**{"checkpoint.async_save": True})
    trainer._saving_step, trainer._last_good_step = None, 2
    trainer._start_save = full
    with pytest.raises(TrainingError) as e:
        trainer._save(4, None, None, None, {})
    named = f"No space left on device: '{tmp_path / 'run' / 'checkpoints'}'"
    assert named in str(e.value) and "last good checkpoint is step 2" in str(e.value)
    trainer.checkpoint_manager = types.SimpleNamespace(is_saving_in_progress=lambda: False, wait_until_finished=full)
    trainer._saving_step = 4  # an async save in flight fails in its thread
    with pytest.raises(TrainingError) as e:
        trainer._confirm_save(block=False)
    assert named in str(e.value)
