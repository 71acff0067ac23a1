"""Issue 26, conversion: what --overwrite may replace, staging a killed convert leaves, NaN weights,
files that are not regular, and the messages of a full or read-only disk."""

from __future__ import annotations

import ast
import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hf_models import random_causal_lm, save_hf
from safetensors.numpy import load_file

from launch import errors
from prm_jax.conversion.hf_checkpoint import hf_to_orbax, is_hf_export, orbax_to_hf
from prm_jax.conversion.safetensors_io import SafetensorsCheckpoint
from prm_jax.files import NotRegularFileError, atomic_file, staged_directory
from prm_jax.output_paths import OutputNotOwnedError
from prm_jax.weights import ConversionError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny HF causal LM, its Orbax import and its PRM export (no tokenizer: fast)."""
    root = tmp_path_factory.mktemp("trust_conv")
    hf = save_hf(random_causal_lm(seed=3), root / "hf_lm")
    orbax = root / "orbax"
    hf_to_orbax(hf, orbax, seed=1)
    export = orbax_to_hf(orbax, root / "export", dtype="float32")
    return {"hf": hf, "orbax": orbax, "export": export}


def _training_workdir(path: Path) -> Path:
    (path / "checkpoints" / "100").mkdir(parents=True)
    (path / "checkpoints" / "100" / "state").write_text("weights")
    (path / "config.json").write_text('{"train": {}}')
    (path / "metrics.jsonl").write_text('{"step": 100}\n')
    return path


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def _within(seconds: int) -> Iterator[None]:
    """Fails (instead of hanging the suite) when the block blocks, e.g. on a FIFO."""

    def timeout(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------- 2. --overwrite replaces only its own


def test_overwrite_refuses_a_training_workdir_and_unrelated_folders(tiny, tmp_path) -> None:
    workdir = _training_workdir(tmp_path / "run")
    before = _tree(workdir)
    with pytest.raises(
        OutputNotOwnedError, match="is a training workdir .*, not an Orbax checkpoint imported by prm-jax"
    ) as e:
        hf_to_orbax(tiny["hf"], workdir, overwrite=True)
    assert "\n" not in str(e.value) and "checkpoints/" in str(e.value)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "paper.tex").write_text("mine")
    with pytest.raises(OutputNotOwnedError, match=r"is a folder holding paper.tex, not a prm-jax Hugging Face export"):
        orbax_to_hf(tiny["orbax"], notes, overwrite=True)
    # A downloaded (not exported) model is not ours either, nor is an export an Orbax checkpoint.
    with pytest.raises(OutputNotOwnedError, match="a Hugging Face model"):
        orbax_to_hf(tiny["orbax"], tiny["hf"], overwrite=True)
    with pytest.raises(OutputNotOwnedError):
        hf_to_orbax(tiny["hf"], tiny["export"], overwrite=True)
    assert _tree(workdir) == before and (notes / "paper.tex").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "run"]  # no staging left either


def test_overwrite_replaces_what_the_tool_wrote(tiny, tmp_path) -> None:
    orbax = tmp_path / "o"
    hf_to_orbax(tiny["hf"], orbax, seed=1)
    hf_to_orbax(tiny["hf"], orbax, seed=2, overwrite=True)  # its own import
    export = orbax_to_hf(orbax, tmp_path / "e", dtype="float32")
    assert json.loads((export / "config.json").read_text())["exported_by"] == "prm-jax"
    first = load_file(export / "model.safetensors")["score.2.weight"]
    hf_to_orbax(tiny["hf"], orbax, seed=3, overwrite=True)
    orbax_to_hf(orbax, export, dtype="float32", overwrite=True)  # its own export
    assert not (load_file(export / "model.safetensors")["score.2.weight"] == first).all()
    # An export written before the marker is recognised by its architecture, auto_map and remote code.
    config = json.loads((export / "config.json").read_text())
    del config["exported_by"]
    (export / "config.json").write_text(json.dumps(config))
    assert is_hf_export(export)
    orbax_to_hf(orbax, export, dtype="float32", overwrite=True)
    # An empty directory holds nothing to lose.
    (tmp_path / "empty").mkdir()
    orbax_to_hf(orbax, tmp_path / "empty", dtype="float32")


def test_convert_cli_refuses_a_workdir_in_one_line_before_reading(tiny, tmp_path) -> None:
    workdir = _training_workdir(tmp_path / "run")
    cases = [
        ["--direction=hf_to_orbax", f"--hf_dir={tiny['hf']}", f"--orbax_dir={workdir}", "--overwrite"],
        ["--direction=orbax_to_hf", f"--orbax_dir={tiny['orbax']}", f"--hf_dir={workdir}"],
    ]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "launcher_table.py"), "launch.convert", str(tmp_path / "cases.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    overwrite, plain = json.loads(done.stdout)
    assert overwrite["code"] == 2 and plain["code"] == 2
    (line,) = overwrite["stderr"].strip().splitlines()
    assert f"--orbax_dir={workdir} is a training workdir (checkpoints/" in line and "not an Orbax checkpoint" in line
    (line,) = plain["stderr"].strip().splitlines()
    assert "exists and is not empty (a training workdir" in line and "pass --overwrite" in line
    assert (workdir / "checkpoints" / "100" / "state").read_text() == "weights"


# ---------------------------------------------------------------------------- 4. staging of dead writers

_KILLED_WRITER = """
import sys, time
from pathlib import Path
from prm_jax.files import staged_directory
with staged_directory(Path(sys.argv[1])) as staging:
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"x" * 4096)
    print("writing", flush=True)
    time.sleep(600)
"""


def test_a_killed_writers_staging_is_removed_by_the_next_and_a_live_ones_kept(tmp_path, caplog) -> None:
    target = tmp_path / "export"
    killed = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_KILLED_WRITER), str(target)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert killed.stdout.readline().strip() == "writing"
    killed.kill()
    killed.wait()
    (dead,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert dead.name.startswith(".export.tmp-")
    with staged_directory(target) as live:  # a live writer beside the next one
        live.mkdir()
        (live / "f").write_text("live")
        with caplog.at_level(logging.WARNING, logger="prm_jax"), staged_directory(target) as staging:
            staging.mkdir()
        assert (live / "f").read_text() == "live"
    assert not dead.exists() and (target / "f").read_text() == "live"
    removed = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
    assert any(str(dead) in m and f"pid {killed.pid}" in m and "4.1 KB" in m for m in removed), removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no lock file or staging left


def test_a_writer_killed_mid_swap_gets_its_previous_directory_back(tmp_path) -> None:
    """Killed between "old aside" and "new in": the next writer restores the old directory, never deletes it."""
    writer = "0123456789ab"
    (tmp_path / f".ckpt.tmp-{writer}.lock").write_text("pid 1 on elsewhere\n")  # nobody holds it
    aside = tmp_path / f".ckpt.tmp-{writer}.old-aaaaaaaaaaaa"
    aside.mkdir()
    (aside / "params").write_text("the previous checkpoint")
    with pytest.raises(RuntimeError), staged_directory(tmp_path / "ckpt"):
        raise RuntimeError("this writer fails; the previous checkpoint must still be there")
    assert (tmp_path / "ckpt" / "params").read_text() == "the previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ---------------------------------------------------------------------------- 6. NaN / Inf weights at import


@pytest.mark.parametrize("tensor, value", [("model.layers.1.mlp.down_proj.weight", "nan"), ("lm_head.weight", "inf")])
def test_import_refuses_non_finite_weights_naming_the_tensor(tmp_path, tensor, value) -> None:
    model = random_causal_lm(seed=4)
    with torch.no_grad():
        model.get_parameter(tensor)[2, 5] = float(value)
    hf = save_hf(model, tmp_path / "hf")
    with pytest.raises(ConversionError) as e:
        hf_to_orbax(hf, tmp_path / "o")
    message = str(e.value)
    assert f"tensor {tensor} (model.safetensors): 1 of " in message and f"{value}, at index [2, 5]" in message
    assert not (tmp_path / "o").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# ---------------------------------------------------------------------------- 12. files that are not regular


def _replace_with(path: Path, kind: str) -> None:
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:  # a regular file larger than any real config.json (sparse: costs no disk)
        with open(path, "wb") as f:
            f.truncate(20 * 2**20)


@pytest.mark.parametrize(
    "kind, needle", [("fifo", "but a FIFO"), ("device", "but a character device"), ("huge", "MB, more")]
)
def test_config_json_that_is_not_a_small_regular_file_is_refused(tiny, tmp_path, kind, needle) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("model.safetensors", "config.json"):
        (hf / name).write_bytes((tiny["hf"] / name).read_bytes())
    _replace_with(hf / "config.json", kind)
    with _within(20), pytest.raises(NotRegularFileError, match=needle) as e:
        hf_to_orbax(hf, tmp_path / "o")
    assert str(hf / "config.json") in str(e.value) and not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_tokenizer_and_index_files_that_are_not_regular_are_refused(tiny, tmp_path, kind) -> None:
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    _replace_with(tokenizer / "tokenizer_config.json", kind)
    with _within(20), pytest.raises(NotRegularFileError, match="tokenizer_config.json is not a regular file but a"):
        orbax_to_hf(tiny["orbax"], tmp_path / "e", tokenizer_dir=tokenizer)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    _replace_with(sharded / "model.safetensors.index.json", kind)
    with (
        _within(20),
        pytest.raises(NotRegularFileError, match="model.safetensors.index.json is not a regular file but a"),
    ):
        SafetensorsCheckpoint(sharded)


# ---------------------------------------------------------------------------- 17. messages


def test_a_fifo_weight_file_is_named_as_such_not_missing(tmp_path) -> None:
    os.mkfifo(tmp_path / "model.safetensors")
    with _within(20), pytest.raises(NotRegularFileError) as e:
        SafetensorsCheckpoint(tmp_path)
    assert f"{tmp_path / 'model.safetensors'} is not a regular file but a FIFO" in str(
        e.value
    ) and "no model.safetensors" not in str(e.value)


def _launcher_constant(launcher: str, name: str) -> str:
    """A module-level string of a launcher, read without importing it: a launcher defines its absl
    flags at import, and two launchers in one test process (evaluate, convert) both define --dtype."""
    tree = ast.parse((Path(__file__).parents[1] / "launch" / f"{launcher}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"launch/{launcher}.py defines no {name}")


def test_a_full_disk_names_the_file_and_promises_no_resume(tmp_path, monkeypatch) -> None:
    convert_rerun_note = _launcher_constant("convert", "RERUN_NOTE")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")  # as the kernel reports it: no file name

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e, atomic_file(tmp_path / "out" / "model.safetensors", "wb") as f:
        f.write(b"weights")
    generic = errors.user_message(e.value)
    assert f"no space left on the device at {tmp_path / 'out' / 'model.safetensors'}" in generic
    assert "resumes" not in generic and "free space" in generic
    assert "starts over" in errors.user_message(e.value, rerun_note=convert_rerun_note)
    # A directory built in stages (an export, an Orbax save) names its destination.
    with pytest.raises(OSError) as e, staged_directory(tmp_path / "export"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(tmp_path / "export") in errors.user_message(e.value)


@pytest.mark.parametrize(
    "code, needles",
    [
        (errno.EROFS, ("read-only file system at /mnt/ro/x", "writable file system")),
        (errno.EACCES, ("permission denied at /mnt/ro/x", "fix its permissions")),
        (errno.ENOSPC, ("no space left", "free space")),
    ],
)
def test_read_only_and_forbidden_are_not_told_to_free_space(code, needles) -> None:
    error = (PermissionError if code == errno.EACCES else OSError)(code, os.strerror(code), "/mnt/ro/x")
    message = errors.user_message(error)
    assert all(n in message for n in needles), message
    assert ("free space" in message) == (code == errno.ENOSPC) and "\n" not in message


def test_staging_without_a_writer_lock_is_reported_not_removed(tmp_path, caplog) -> None:
    """Left by a prm-jax that took no lock: whether its writer lives cannot be told, so it stays."""
    legacy = tmp_path / ".export.tmp-0123456789ab"
    legacy.mkdir()
    with caplog.at_level(logging.WARNING, logger="prm_jax"), staged_directory(tmp_path / "export") as staging:
        staging.mkdir()
    assert legacy.is_dir() and any(f"left {legacy}" in r.getMessage() for r in caplog.records)


def test_without_flock_a_staging_is_kept_as_someones_and_never_removed(tmp_path, caplog, monkeypatch) -> None:
    """A file system without flock (one lock mechanism, `prm_jax.run_lock`): the writer goes on, its
    lock file still names it, and the next writer, unable to tell whether it lives, leaves its staging."""
    import fcntl

    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    target = tmp_path / "export"
    with staged_directory(target) as first:
        first.mkdir()
        (first / "f").write_text("first")
        (lock,) = tmp_path.glob(".export.tmp-*.lock")
        assert f'"pid": {os.getpid()}' in lock.read_text()
        with caplog.at_level(logging.WARNING, logger="prm_jax"), staged_directory(target) as second:
            second.mkdir()
        assert (first / "f").read_text() == "first"
    assert any("cannot tell whether its writer lives" in r.getMessage() for r in caplog.records)
    assert (target / "f").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# ---------------------------------------------------------------------------- 13. JSON past Python's decoder

_HUGE_NUMBER = "1" * 5000  # past sys.get_int_max_str_digits(): json.loads raises a bare ValueError


def _one_line_naming(error: BaseException, path: Path) -> None:
    message = str(error)
    assert str(path) in message and "digits" in message and "\n" not in message, message


def test_a_config_json_number_past_the_decoder_is_one_line_naming_the_file(tiny, tmp_path) -> None:
    from prm_jax.models.config import ModelConfig

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").symlink_to(tiny["hf"] / "model.safetensors")
    config = (tiny["hf"] / "config.json").read_text()
    (hf / "config.json").write_text(config.replace("{", '{"huge": ' + _HUGE_NUMBER + ",", 1))
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf_file(hf)
    _one_line_naming(e.value, hf / "config.json")
    with pytest.raises(ValueError) as e:
        hf_to_orbax(hf, tmp_path / "o")
    _one_line_naming(e.value, hf / "config.json")
    assert not (tmp_path / "o").exists()


def test_a_safetensors_header_or_index_number_past_the_decoder_names_the_file(tmp_path) -> None:
    import struct

    from prm_jax.conversion.safetensors_io import SafetensorsFormatError

    single = tmp_path / "single"
    single.mkdir()
    header = ('{"__metadata__": {"n": "1"}, "huge": ' + _HUGE_NUMBER + "}").encode()
    (single / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(SafetensorsFormatError) as e:
        SafetensorsCheckpoint(single)
    _one_line_naming(e.value, single / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {"total_size": ' + _HUGE_NUMBER + "}}")
    with pytest.raises(SafetensorsFormatError) as e:
        SafetensorsCheckpoint(sharded)
    _one_line_naming(e.value, sharded / "model.safetensors.index.json")


# ---------------------------------------------------------------------------- 12/17. evaluation's tokenizer, appends


def test_evaluate_refuses_a_tokenizer_file_that_is_a_fifo(tiny, tmp_path) -> None:
    from prm_jax.evaluation.tokenizer_loading import load_tokenizer

    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    os.mkfifo(tokenizer / "tokenizer.json")
    with _within(20), pytest.raises(NotRegularFileError, match="tokenizer.json is not a regular file but a FIFO"):
        load_tokenizer(tiny["export"], tokenizer)


def test_a_full_disk_during_an_append_names_the_file(tmp_path, monkeypatch) -> None:
    """`AppendOnlyWriter` (synthesis records, predictions): ENOSPC from write/fsync names the file."""
    import dataclasses

    from prm_jax.jsonl import AppendOnlyWriter

    @dataclasses.dataclass
    class Record:
        id: str

        def to_json(self) -> dict:
            return {"id": self.id}

    def full(*args) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    path = tmp_path / "records.jsonl"
    with AppendOnlyWriter(path, lambda d: Record(d["id"]), fsync_every=1) as writer:
        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(OSError) as e:
            writer.write(Record("a"))
        monkeypatch.undo()
    assert e.value.filename == str(path)
    assert f"no space left on the device at {path}" in errors.user_message(e.value, rerun_note="it resumes")
