"""Training's front door (issue 19): the whole config is checked before any work, bad values are one
`error:` line with exit 2 and an untouched workdir; no run loses its final checkpoint or its
metrics; a resume keeps its recorded data and hyper-parameters; a failed async save stops the run
at once; a huge record is refused before it is tokenized."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_assets import build_tiny_tokenizer, tiny_config
from training_runs import REPO, committed_steps, read_metrics, running, start, train_flags

from prm_jax.data import records as records_module
from prm_jax.data import tokenize as tokenize_module
from prm_jax.data.pipeline import load_prm_examples, load_sft_examples
from prm_jax.data.records import DataError
from prm_jax.data.tokenize import TokenizeConfig
from prm_jax.training.config import ConfigError, default_config, validate
from prm_jax.training.run import train_from_config
from prm_jax.training.run_record import CHANGES_FILE, ConfigChangeError

CONFIG = REPO / "configs" / "tiny.py"


def _launch(*flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "launch.train", *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    empty = root / "empty.jsonl"
    empty.write_text("")
    return {"empty": empty, "tokenizer": build_tiny_tokenizer(root / "tok"), "not_a_tokenizer": root}


# (override flags, the field the one-line message must name)
BAD_VALUES = [
    (["--config.checkpoint.max_to_keep=0"], "checkpoint.max_to_keep"),
    (["--config.train.num_steps=-5"], "train.num_steps"),
    (["--config.train.num_steps=0"], "train.num_steps"),
    (["--config.optimizer.learning_rate=-1"], "optimizer.learning_rate"),
    (["--config.optimizer.learning_rate=nan"], "optimizer.learning_rate"),
    (["--config.objective=foo"], "objective"),
    (["--config.train.loss=hinge"], "train.loss"),
    (["--config.optimizer.schedule=cosnie"], "optimizer.schedule"),
    (["--config.train.log_every=0"], "train.log_every"),
    (["--config.checkpoint.save_every=0"], "checkpoint.save_every"),
    (["--config.train.eval_every=0"], "train.eval_every"),
    (["--config.train.grad_accum_steps=0"], "train.grad_accum_steps"),
    (["--config.train.grad_accum_steps=3"], "train.grad_accum_steps"),
    (["--config.train.lm_loss_chunk_tokens=-1"], "train.lm_loss_chunk_tokens"),
    (["--config.train.microbatch_rows_per_shard=-1"], "train.microbatch_rows_per_shard"),
    (["--config.train.microbatch_rows_per_shard=3"], "train.microbatch_rows_per_shard"),
    (["--config.train.microbatch_rows_per_shard=1", "--config.train.grad_accum_steps=2"], "train.grad_accum_steps"),
    (["--config.data.seq_len=8192"], "data.seq_len"),
    (["--config.data.overlong=cut"], "data.overlong"),
    (["--config.model.dtype=float8"], "model.dtype"),
    (["--config.mesh.fsdp=3"], "mesh"),
    (["--config.optimizer.b2=1.5"], "optimizer.b2"),
    (
        [
            "--config.data.synthetic=",
            "--config.data.tokenizer_dir={tokenizer}",
            "--config.data.train_file=/nonexistent/train.jsonl",
        ],
        "data.train_file",
    ),
    (["--config.data.train_file={empty}"], "data.train_file"),
    (["--config.data.tokenizer_dir=/nonexistent/tok"], "data.tokenizer_dir"),
    (["--config.model.init_from=/nonexistent/base"], "model.init_from"),
]


@pytest.mark.parametrize(
    "overrides,field", BAD_VALUES, ids=[b[1] + ":" + b[0][-1].split("=", 1)[1] for b in BAD_VALUES]
)
def test_launch_train_refuses_bad_values_in_one_line(overrides, field, assets, tmp_path) -> None:
    workdir = tmp_path / "run"
    flags = [f.format(empty=assets["empty"], tokenizer=assets["tokenizer"]) for f in overrides]
    result = _launch(f"--config={CONFIG}", f"--workdir={workdir}", "--config.optimizer.warmup_steps=0", *flags)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert field in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not workdir.exists(), sorted(p.name for p in workdir.iterdir())


def test_every_problem_is_reported_at_once(tmp_path) -> None:
    result = _launch(
        f"--config={CONFIG}",
        f"--workdir={tmp_path / 'run'}",
        "--config.train.num_steps=-5",
        "--config.optimizer.learning_rate=-1",
        "--config.objective=foo",
        "--config.train.log_every=0",
    )
    assert result.returncode == 2
    assert "(4 problems)" in result.stderr
    for field in ("train.num_steps", "optimizer.learning_rate", "objective", "train.log_every"):
        assert f"--config.{field}=" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_a_directory_without_a_tokenizer_is_one_line(assets, tmp_path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"id": "a", "problem": "1+1", "steps": ["2"], "labels": [1]}) + "\n")
    result = _launch(
        f"--config={CONFIG}",
        f"--workdir={tmp_path / 'run'}",
        "--config.data.synthetic=",
        f"--config.data.train_file={train}",
        f"--config.data.tokenizer_dir={assets['not_a_tokenizer']}",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--config.data.tokenizer_dir=" in lines[0], lines
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_validator_accepts_the_shipped_configs_and_checks_mesh_divisibility() -> None:
    config = tiny_config()
    assert validate(config, device_count=1) == []
    assert validate(config, device_count=8) == []
    config.mesh.fsdp = 8
    config.train.global_batch_rows = 12
    problems = validate(config, device_count=8)
    assert len(problems) == 1 and "global_batch_rows" in problems[0] and "8 devices" in problems[0]
    defaults = default_config()  # no data files: two problems, both named
    assert [p.split("=")[0] for p in validate(defaults)] == ["--config.data.train_file", "--config.data.tokenizer_dir"]


# ---------------------------------------------------------------------------- data loss, config record


def _fixed_data(tiny_run_config) -> dict:
    return {
        "data.train_file": tiny_run_config.data.train_file,
        "data.eval_file": "",
        "data.synthetic": "",
        "data.tokenizer_dir": tiny_run_config.data.tokenizer_dir,
        "train.eval_every": 1000,
        "train.progress": False,
        "optimizer.warmup_steps": 0,
        "data.seq_len": 128,
        "train.global_batch_rows": 4,
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from data_pipeline.synthetic import prepare_synthetic_run

    root = tmp_path_factory.mktemp("data")
    return _fixed_data(prepare_synthetic_run(tiny_config(), root))


def test_max_to_keep_zero_is_refused_before_anything_is_written(data, tmp_path) -> None:
    config = tiny_config(**{**data, "train.num_steps": 2, "checkpoint.save_every": 2, "checkpoint.max_to_keep": 0})
    with pytest.raises(ConfigError, match="checkpoint.max_to_keep"):
        train_from_config(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_failed_start_writes_nothing_and_a_finished_run_keeps_its_metrics(data, tmp_path) -> None:
    workdir = tmp_path / "run"
    good = tiny_config(**{**data, "train.num_steps": 2, "checkpoint.save_every": 2, "train.log_every": 1})
    train_from_config(good, workdir)
    record = (workdir / "config.json").read_text()
    metrics = (workdir / "metrics.jsonl").read_text()
    assert [r["step"] for r in read_metrics(workdir)["train"]] == [1, 2]
    # A bad rerun is refused and leaves the record alone (it was rewritten before).
    with pytest.raises(ConfigError):
        train_from_config(tiny_config(**{**data, "train.num_steps": -1}), workdir)
    assert (workdir / "config.json").read_text() == record
    # Rerunning the finished run changes nothing: final checkpoint and metrics kept.
    assert train_from_config(good, workdir).final_step == 2
    assert (workdir / "metrics.jsonl").read_text() == metrics
    assert committed_steps(workdir) == [2]


def test_a_resume_with_other_data_or_hyper_parameters_is_refused_unless_recorded(data, tmp_path) -> None:
    workdir = tmp_path / "run"
    mine = tmp_path / "train.jsonl"
    mine.write_text(Path(data["data.train_file"]).read_text())
    base = {**data, "data.train_file": str(mine), "train.num_steps": 2, "checkpoint.save_every": 2}
    train_from_config(tiny_config(**base), workdir)
    record = (workdir / "config.json").read_text()
    other_data = tmp_path / "other.jsonl"
    other_data.write_text("".join(mine.read_text().splitlines(keepends=True)[1:]))  # other records
    for change in ({"optimizer.learning_rate": 1e-2}, {"data.train_file": str(other_data)}, {"train.num_steps": 3}):
        with pytest.raises(ConfigChangeError, match=list(change)[0].replace(".", r"\.")):
            train_from_config(tiny_config(**{**base, **change}), workdir)
        assert (workdir / "config.json").read_text() == record and committed_steps(workdir) == [2]
    # The same path holding other records (edited in place) is other data too.
    lines = mine.read_text().splitlines(keepends=True)
    mine.write_text("".join(lines[:-1]))
    with pytest.raises(ConfigChangeError, match=r"data\.train_file\.sha256"):
        train_from_config(tiny_config(**base), workdir)
    mine.write_text("".join(lines))
    # Runtime-only fields may change.
    runtime = {"model.remat_policy": "full", "train.log_every": 1, "checkpoint.save_every": 1}
    assert train_from_config(tiny_config(**{**base, **runtime}), workdir).final_step == 2
    # The model itself can never change, even with the flag.
    with pytest.raises(ConfigChangeError, match="model.arch.intermediate_size"):
        train_from_config(
            tiny_config(**{**base, "model.arch.intermediate_size": 256, "train.allow_config_change": True}), workdir
        )
    # With the flag, the change is accepted and recorded.
    extended = {**base, "train.num_steps": 3, "train.allow_config_change": True}
    assert train_from_config(tiny_config(**extended), workdir).final_step == 3
    change = json.loads((workdir / CHANGES_FILE).read_text().splitlines()[-1])
    assert change["from_step"] == 2 and change["changed"]["train.num_steps"] == {"old": 2, "new": 3}
    assert json.loads((workdir / "config.json").read_text())["train"]["num_steps"] == 3


def test_a_resume_with_another_vocabulary_is_refused_before_the_run_tokenizer_is_replaced(data, tmp_path) -> None:
    from transformers import AutoTokenizer

    from prm_jax.training.trainer import TrainingError

    workdir = tmp_path / "run"
    base = {**data, "train.num_steps": 2, "checkpoint.save_every": 2}
    train_from_config(tiny_config(**base), workdir)
    saved = {p.name: p.read_bytes() for p in (workdir / "prm_tokenizer").iterdir()}
    record = (workdir / "config.json").read_text()
    other = AutoTokenizer.from_pretrained(data["data.tokenizer_dir"])
    other.add_tokens(["<an_extra_token>"])
    other.save_pretrained(tmp_path / "other_tokenizer")
    changed = {
        **base,
        "data.tokenizer_dir": str(tmp_path / "other_tokenizer"),
        "train.num_steps": 3,
        "train.allow_config_change": True,
    }
    with pytest.raises(TrainingError, match="vocabulary"):
        train_from_config(tiny_config(**changed), workdir)
    # The checkpoints still have the tokenizer they were trained with, and the record is untouched.
    assert {p.name: p.read_bytes() for p in (workdir / "prm_tokenizer").iterdir()} == saved
    assert (workdir / "config.json").read_text() == record and not (workdir / CHANGES_FILE).exists()


# ---------------------------------------------------------------------------- a failed async save


@pytest.mark.slow
def test_a_failed_async_save_stops_the_run_at_once_naming_the_last_good_step(tmp_path) -> None:
    workdir = tmp_path / "run"
    flags = train_flags(workdir, 12, 3, "--config.optimizer.warmup_steps=0", "--config.train.progress=false")
    # Step 6's checkpoint fails in the background as on a full disk; 0.3 s per step leaves the
    # writer ample time to fail long before the next save (step 9), where Orbax would notice.
    run = start(flags, tmp_path / "run.log", cpu_devices=1, step_delay_s=0.3, fail_save_step=6)
    with running(run):
        rc = run.wait()
    log = run.log(tail=10**6)
    assert rc == 2, log[-3000:]
    last = log.strip().splitlines()[-1]
    assert last.startswith("error: saving checkpoint 6 failed (OSError: [Errno 28] No space left on device"), last
    assert "The last good checkpoint is step 3" in last
    assert committed_steps(workdir) == [3]
    steps = [r["step"] for r in read_metrics(workdir)["train"]]
    assert max(steps) < 9, steps  # stopped before the next save


# ---------------------------------------------------------------------------- huge records


def _prm_line(rid: str, steps: list[str]) -> str:
    return json.dumps({"id": rid, "problem": "What is 1+1?", "steps": steps, "labels": [1] * len(steps)}) + "\n"


def test_a_huge_record_is_cut_or_dropped_before_it_is_tokenized(assets, tmp_path, monkeypatch) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    huge = "1 + 1 = 2. " * 400_000  # 4.4 MB in one step
    path = tmp_path / "train.jsonl"
    path.write_text(_prm_line("ok", ["2"]) + _prm_line("huge", [huge]) + _prm_line("tail", ["a", "b", huge]))
    seen: list[int] = []
    build = tokenize_module.build_prm_input

    def spy(tok, problem, steps, **kw):
        seen.append(sum(map(len, steps)))
        return build(tok, problem, steps, **kw)

    monkeypatch.setattr(tokenize_module, "build_prm_input", spy)
    examples, stats = load_prm_examples(path, tokenizer, TokenizeConfig(max_length=128))
    assert [e.record_id for e in examples] == ["ok", "tail"]
    assert stats.dropped_overlong == 1 and stats.truncated == 1 and stats.steps_dropped_overlong == 2
    assert max(seen) < 10_000, seen  # the huge step never reached the tokenizer
    assert examples[1].num_supervised == 2
    # Drop mode drops the partial record too, still without tokenizing it.
    examples, stats = load_prm_examples(path, tokenizer, TokenizeConfig(max_length=128, overlong="drop"))
    assert [e.record_id for e in examples] == ["ok"] and stats.dropped_overlong == 2


def test_the_character_cap_never_changes_what_fits(assets, tmp_path) -> None:
    """The cap is a lower bound on tokens: records near the limit tokenize exactly as without it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    path = tmp_path / "train.jsonl"
    path.write_text("".join(_prm_line(f"r{n}", ["1 + 1 = 2."] * n) for n in (1, 5, 10, 20, 40)))
    capped, capped_stats = load_prm_examples(path, tokenizer, TokenizeConfig(max_length=128))
    uncapped, uncapped_stats = load_prm_examples(path, tokenizer, TokenizeConfig(max_length=128, max_chars=10**9))
    assert capped_stats == uncapped_stats and capped_stats.truncated >= 1
    assert [e.input_ids.tolist() for e in capped] == [e.input_ids.tolist() for e in uncapped]


def test_a_huge_sft_completion_is_cut_before_it_is_tokenized(assets, tmp_path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    path = tmp_path / "sft.jsonl"
    lines = [
        {"id": "a", "prompt": "1+1?", "completion": "2 " * 2_000_000},
        {"id": "b", "prompt": "x" * 3_000_000, "completion": "2"},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    examples, stats = load_sft_examples(path, tokenizer, TokenizeConfig(max_length=64))
    assert [e.record_id for e in examples] == ["a"] and len(examples[0]) == 64
    assert stats.truncated == 1 and stats.dropped_overlong == 1


def test_jsonl_lines_have_a_hard_length_cap(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(records_module, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "train.jsonl"
    path.write_text(_prm_line("a", ["2"]) + _prm_line("b", ["x" * 2000]))
    with pytest.raises(DataError, match=r"train.jsonl:2: line longer than"):
        list(records_module.read_prm_records(path))


def test_records_of_earlier_runs_and_equivalent_paths_are_not_changes(tmp_path, monkeypatch) -> None:
    from prm_jax.training.run_record import config_changes

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    recorded = {
        "data": {"train_file": "data/train.jsonl", "negative_threshold": 0.5, "soft_labels": False},
        "optimizer": {"learning_rate": 1e-5},
    }
    current = {
        "data": {"train_file": str(tmp_path / "data" / "train.jsonl"), "negative_threshold": 0.0, "soft_labels": False},
        "optimizer": {"learning_rate": 1e-5},
        "train": {"loss": "mse"},
    }
    # A relative and an absolute path to one file; the old default cut on hard labels; a new field.
    assert config_changes(recorded, current) == {}
    # With soft labels the cut selects other steps: a real change.
    soft = lambda tree: {**tree, "data": {**tree["data"], "soft_labels": True}}  # noqa: E731
    assert config_changes(soft(recorded), soft(current)) == {"data.negative_threshold": (0.5, 0.0)}
    assert "data.train_file" in config_changes(recorded, {**current, "data": {**current["data"], "train_file": "x"}})
