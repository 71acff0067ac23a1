"""End to end on CPU: the launcher with the JAX sampler and a tiny random model; SIGKILL and resume.

A random model writes garbage, which is fine: every stage must still run and write schema-valid
output. Its LM-head rows of the two blank-line tokens are scaled up so that responses have
several steps and the mc stage has prefixes to roll out. All runs are subprocesses of the real
launcher sharing one JAX compilation cache (the first run compiles, the others mostly reuse it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.consensus import run_merge, shard_consensus
from data_pipeline.schemas import ErrorRecord, GradeRecord, JudgeRecord, MCRecord, SampleRecord
from data_pipeline.shards import Layout, Shard
from prm_jax.data.records import read_prm_records
from prm_jax.files import atomic_write_json, atomic_write_lines
from prm_jax.jsonl import read_records

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = {"sample": SampleRecord, "grade": GradeRecord, "mc": MCRecord, "judge": JudgeRecord}

# The kill point: once the mc stage has written 2 records (one rolled out), it writes half of the
# next line and waits to be SIGKILLed by the test: a kill mid-write. Needs os and time imported.
KILL_POINT = """
from prm_jax import jsonl
from data_pipeline.schemas import MCRecord
_write = jsonl.AppendOnlyWriter.write
seen = {"all": 0, "rolled": 0}
def write(self, record):
    ok = _write(self, record)
    if ok and isinstance(record, MCRecord):
        seen["all"] += 1
        seen["rolled"] += record.cost.prefixes > 0
        if seen["all"] >= 2 and seen["rolled"] >= 1:
            os.write(self._fd, b'{"id": "half-written", "cost": {"prefi')
            os.fsync(self._fd)
            time.sleep(600)
    return ok
jsonl.AppendOnlyWriter.write = write
"""
# The real launcher, with the command line given after `-c`.
LAUNCHER = """
from absl import app
from launch import synthesize
sys.argv = ["launch.synthesize"] + sys.argv[1:]
app.run(synthesize.main)
"""
KILL_WRAPPER = "import os, sys, time\n" + KILL_POINT + LAUNCHER


def kill_at_the_mc_kill_point(
    proc: subprocess.Popen, workdir: Path, *, timeout_s: float, group: bool = False
) -> list[str]:
    """Waits for a run started with `KILL_POINT` to reach it, SIGKILLs it (its whole process group
    with `group`, engine processes included) and returns the mc file's lines, the torn one last."""
    mc_file = Layout(workdir).records("mc", Shard())
    kill = (lambda: os.killpg(proc.pid, signal.SIGKILL)) if group else proc.kill
    deadline = time.monotonic() + timeout_s
    try:
        while not (mc_file.exists() and mc_file.read_bytes().endswith(b'"prefi')):
            assert proc.poll() is None, f"the run ended before the kill point: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the run did not reach the kill point"
            time.sleep(0.05)
        kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            kill()
            proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    layout = Layout(workdir)
    assert not layout.done("mc", Shard()).exists() and not layout.final_records.exists()
    partial = mc_file.read_text().splitlines()
    assert len(partial) >= 3 and partial[-1].endswith('"prefi')  # >= 2 records and a torn line
    return partial


def assert_same_run(workdir: Path, reference: Path) -> None:
    """Every stage's records (no duplicate ids: read_records checks), the training file and the
    summary equal the reference run's; no torn line survived."""
    layout = Layout(workdir)
    for stage in SCHEMAS:
        assert stage_records(workdir, stage) == stage_records(reference, stage), stage
    assert layout.final_records.read_bytes() == Layout(reference).final_records.read_bytes()
    assert layout.summary.read_text() == Layout(reference).summary.read_text()
    assert "half-written" not in layout.records("mc", Shard()).read_text()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import torch
    from hf_models import jax_arrays_from_torch, jax_model, random_causal_lm
    from tiny_assets import TINY_VOCAB_SIZE, build_tiny_tokenizer
    from transformers import AutoTokenizer

    from prm_jax.checkpoint import save_model
    from prm_jax.models.config import ModelConfig

    root = tmp_path_factory.mktemp("synth_e2e")
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_tokenizer(root / "tokenizer"))
    model = random_causal_lm(vocab_size=TINY_VOCAB_SIZE, seed=3, max_position_embeddings=1024)
    with torch.no_grad():
        for token, index in tokenizer.get_vocab().items():
            if "ĊĊ" in token:  # byte-level BPE spelling of "\n\n"
                model.lm_head.weight[index] *= 4.0
    model.config.eos_token_id = tokenizer.eos_token_id
    policy = root / "policy_hf"
    model.save_pretrained(policy, safe_serialization=True)
    tokenizer.save_pretrained(policy)
    # The judge: the same weights as an Orbax checkpoint (the other loading path).
    config = ModelConfig.from_hf_dict(model.config.to_dict(), with_prm_head=False)
    save_model(root / "judge_orbax", jax_model(config, jax_arrays_from_torch(model, config)))
    problems = root / "problems.jsonl"
    problems.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(4)
        )
    )
    return {
        "root": root,
        "policy": policy,
        "judge": root / "judge_orbax",
        "problems": problems,
        "cache": root / "jax_cache",
    }


def command(assets, workdir: Path) -> list[str]:
    return [
        "--config=" + str(REPO / "configs" / "synth_tiny.py"),
        f"--workdir={workdir}",
        f"--config.problems.path={assets['problems']}",
        f"--config.policy.model_path={assets['policy']}",
        f"--config.judge.model_path={assets['judge']}",
        f"--config.judge.tokenizer_path={assets['policy']}",
        "--config.mc.skip_truncated=False",
        "--config.io.progress=False",
    ]


def environment(assets) -> dict[str, str]:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(assets["cache"]),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "PYTHONPATH": str(REPO),
    }


def launch(assets, workdir: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "launch.synthesize", *command(assets, workdir)],
        cwd=REPO,
        env=environment(assets),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def reference(assets):
    workdir = assets["root"] / "reference"
    launch(assets, workdir)
    return workdir


def stage_records(workdir: Path, stage: str) -> dict[str, object]:
    return {r.id: r for r in read_records(Layout(workdir).records(stage, Shard()), SCHEMAS[stage].from_json)}


@pytest.mark.slow
def test_every_stage_writes_schema_valid_output(reference) -> None:
    layout = Layout(reference)
    for stage, schema in SCHEMAS.items():
        assert layout.done(stage, Shard()).exists()
        records = read_records(layout.records(stage, Shard()), schema.from_json)  # validated on read
        assert records, stage
    samples = stage_records(reference, "sample")
    assert len(samples) == 4 and all(len(s.responses) == 2 for s in samples.values())
    grades = stage_records(reference, "grade")
    assert len(grades) == 8
    mc = stage_records(reference, "mc")
    assert set(mc) == set(grades) and any(r.cost.prefixes for r in mc.values())
    judged = stage_records(reference, "judge")
    assert set(judged) == set(grades) and any(r.status == "judged" for r in judged.values())
    list(read_prm_records(layout.final_records))  # readable training file (empty is allowed here)
    summary = json.loads(layout.summary.read_text())
    assert summary["counts"]["consensus"]["candidates"] == 8
    assert summary["mc_compute"]["prefixes_run"] <= summary["mc_compute"]["prefixes_full"]
    # The judge's garbage rarely parses, so the agreement filter keeps ~nothing; the MC-only
    # ablation keeps every labelled response, which must be valid training data.
    kept, counts = shard_consensus(layout, Shard(), "mc", "soft")
    assert kept and counts["consensus"]["kept"] == len(kept)
    copy = Layout(reference.parent / "mc_only")
    atomic_write_lines(copy.records("consensus", Shard()), (json.dumps(r) for r in kept))
    atomic_write_json(copy.done("consensus", Shard()), {"mode": "mc", "label_type": "soft", "counts": counts})
    records = list(read_prm_records(run_merge(copy, 1)))
    assert len(records) == len(kept) and all(len(r.labels) == len(r.steps) >= 1 for r in records)


@pytest.mark.slow
def test_sigkill_during_mc_then_rerun_equals_an_uninterrupted_run(assets, reference) -> None:
    workdir = assets["root"] / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_WRAPPER, *command(assets, workdir)],
        cwd=REPO,
        env=environment(assets),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    partial = kill_at_the_mc_kill_point(proc, workdir, timeout_s=240)
    assert len(partial) - 1 < len(stage_records(reference, "mc"))  # killed before the end of mc

    launch(assets, workdir)  # the same command again

    assert_same_run(workdir, reference)
    layout = Layout(workdir)
    errors = layout.errors("sample", Shard())
    assert not errors.exists() or read_records(errors, ErrorRecord.from_json) == []
    shutil.rmtree(workdir)
