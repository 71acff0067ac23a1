"""The launchers' front door (issue 19): nonsense is refused before any work, in one line, exit 2;
no input is ever written over; corrupt files name themselves; remote code stays off by default.

The table-driven tests run each launcher's real `main` through `launch.errors` in one helper
interpreter per launcher (tests/launcher_table.py), so every row is an actual launcher run.
"""

from __future__ import annotations

import errno
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
HF_CONFIG = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def run_table(module: str, cases: list[list[str]], tmp: Path) -> list[dict]:
    spec = tmp / f"{module}.cases.json"
    spec.write_text(json.dumps(cases))
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "launcher_table.py"), module, str(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_one_line_refusal(outcome: dict, *needles: str) -> None:
    lines = [line for line in outcome["stderr"].splitlines() if line.strip()]
    assert outcome["code"] == 2, outcome
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome["stderr"]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def tiny_hf_dir(path: Path, **config_changes) -> Path:
    """A tiny Qwen2 causal-LM checkpoint (random weights) written with the safetensors library."""
    from safetensors.numpy import save_file

    from prm_jax.conversion.hf_mapping import tensor_mappings
    from prm_jax.models.config import ModelConfig

    path.mkdir(parents=True)
    config = ModelConfig.from_hf_dict(HF_CONFIG, with_prm_head=False)
    rng = np.random.default_rng(0)
    tensors = {m.hf_name: rng.standard_normal(m.hf_shape).astype(np.float32) for m in tensor_mappings(config)}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**HF_CONFIG, **config_changes}))
    return path


# ------------------------------------------------------------------ 1. data is never lost


def test_convert_refuses_its_own_input_as_output_in_both_directions(tmp_path) -> None:
    from prm_jax.conversion.hf_checkpoint import hf_to_orbax, orbax_to_hf
    from prm_jax.output_paths import OutputOverInputError

    hf = tiny_hf_dir(tmp_path / "hf")
    before = sorted(p.name for p in hf.iterdir())
    for out in (hf, hf / "sub", tmp_path, hf / ".." / "hf"):
        with pytest.raises(OutputOverInputError, match="input hf_dir"):
            hf_to_orbax(hf, out, overwrite=True)
    orbax = tmp_path / "orbax"
    hf_to_orbax(hf, orbax)
    orbax_files = sorted(p.name for p in orbax.iterdir())
    for out in (orbax, orbax / "export"):
        with pytest.raises(OutputOverInputError, match="input orbax_dir"):
            orbax_to_hf(orbax, out, overwrite=True)
    (tmp_path / "link").symlink_to(orbax)
    with pytest.raises(OutputOverInputError):
        orbax_to_hf(orbax, tmp_path / "link", overwrite=True)
    assert sorted(p.name for p in hf.iterdir()) == before and not (hf / "sub").exists()
    assert sorted(p.name for p in orbax.iterdir()) == orbax_files and not (orbax / "export").exists()


def test_evaluate_never_writes_over_or_into_its_inputs(tmp_path) -> None:
    from prm_jax.evaluation.runner import EvaluationConfig, run_evaluation

    data = tmp_path / "pb"
    data.mkdir()
    record = {
        "id": "g0",
        "generator": "t",
        "problem": "p",
        "steps": ["a", "b"],
        "final_answer_correct": True,
        "label": -1,
    }
    (data / "gsm8k.jsonl").write_text(json.dumps(record) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    preds = out / "predictions.jsonl"
    preds.write_text(json.dumps({"id": "g0", "pred": -1}) + "\n")
    originals = {p: p.read_bytes() for p in (preds, data / "gsm8k.jsonl")}
    for out_dir, needle in (
        (out, "contains the input predictions"),
        (data, "is the input data"),
        (data / "eval", "is inside the input data"),
    ):
        with pytest.raises(ValueError, match=needle):
            run_evaluation(
                EvaluationConfig(task="processbench", data=str(data), out=str(out_dir), predictions=str(preds))
            )
    assert {p: p.read_bytes() for p in originals} == originals
    assert sorted(p.name for p in data.iterdir()) == ["gsm8k.jsonl"] and sorted(p.name for p in out.iterdir()) == [
        "predictions.jsonl"
    ]
    run_evaluation(
        EvaluationConfig(task="processbench", data=str(data), out=str(tmp_path / "e"), predictions=str(preds))
    )
    assert (tmp_path / "e" / "results.json").is_file()


# ------------------------------------------------------------------ 2. a failed start leaves the workdir usable


def test_synthesis_validates_before_writing_and_a_corrected_rerun_proceeds(tmp_path) -> None:
    from data_pipeline.config import ConfigError, default_config
    from data_pipeline.pipeline import run
    from data_pipeline.shards import Layout
    from prm_jax.files import atomic_write_json

    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"id": "p0", "problem": "What is 1 + 1?", "answer": "2"}) + "\n")
    config = default_config()
    config.problems.path = str(problems)
    config.policy.model_path = str(tmp_path / "modle")  # a typo
    workdir = tmp_path / "w"
    with pytest.raises(ConfigError, match=r"policy\.model_path=.*modle does not exist") as info:
        run(config, workdir, stage="sample")
    assert "Orbax" not in str(info.value)
    assert not workdir.exists()
    # A workdir whose recorded settings come from a start that wrote no record yet is re-recorded.
    layout = Layout(workdir)
    workdir.mkdir()
    atomic_write_json(layout.run_config, {"policy.model_path": "/old/typo", "mc.k": 3})
    (workdir / "sample").mkdir()
    (workdir / "sample" / "shard-00000-of-00001.lock").write_text("")
    # ... but not while another process (another shard, maybe still loading its model) runs with them.
    import fcntl
    import os

    from data_pipeline.pipeline import _using_workdir, check_run_config

    other = os.open(workdir / ".run.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_SH)
    try:
        with _using_workdir(layout), pytest.raises(Exception, match="in use by another synthesis process"):
            check_run_config(layout, config, 1)
    finally:
        os.close(other)
    assert json.loads(layout.run_config.read_text())["policy.model_path"] == "/old/typo"
    with _using_workdir(layout):
        check_run_config(layout, config, 1)
    assert json.loads(layout.run_config.read_text())["policy.model_path"] == config.policy.model_path
    # Once a stage has written a record, other settings are refused as before.
    (workdir / "sample" / "shard-00000-of-00001.jsonl").write_text('{"id": "p0"}\n')
    config.mc.k = 16
    with pytest.raises(Exception, match="would mix two datasets"):
        check_run_config(layout, config, 1)


# ------------------------------------------------------------------ 3. one line, exit 2


def test_disk_full_and_held_lock_are_one_line_naming_the_path(tmp_path, capsys) -> None:
    from data_pipeline.shards import ShardLockedError, exclusive_lock
    from launch import errors

    def disk_full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "w" / "mc" / "shard.jsonl"))

    with pytest.raises(SystemExit) as exit_:
        errors.call(disk_full, ["prog"])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: no space left") and str(tmp_path / "w" / "mc" / "shard.jsonl") in line

    lock = tmp_path / "sample" / "shard-00000-of-00001.lock"

    def second_writer(argv):
        with exclusive_lock(lock), exclusive_lock(lock):
            pass

    with pytest.raises(SystemExit) as exit_:
        errors.call(second_writer, ["prog"], (ShardLockedError,))
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{lock} is locked" in line

    def bug(argv):
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        errors.call(bug, ["prog"])


# ------------------------------------------------------------------ 4. nonsense in files is refused by name


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"num_hidden_layers": 2.7}, "num_hidden_layers=2.7 must be a positive integer"),
        ({"hidden_size": "16"}, "hidden_size='16' must be a positive integer"),
        (
            {"tie_word_embeddings": "no", "rms_norm_eps": -1},
            "rms_norm_eps=-1 must be a positive number; tie_word_embeddings='no' must be true or false",
        ),
        ({"max_position_embeddings": None}, "max_position_embeddings=None"),
    ],
)
def test_config_json_fields_are_typed_and_named(tmp_path, changes, needle) -> None:
    from prm_jax.conversion.hf_checkpoint import hf_to_orbax

    hf = tiny_hf_dir(tmp_path / "hf", **changes)
    with pytest.raises(ValueError) as info:
        hf_to_orbax(hf, tmp_path / "orbax")
    assert str(hf / "config.json") in str(info.value) and needle in str(info.value)
    assert not (tmp_path / "orbax").exists()


def test_integer_weights_are_refused_not_cast(tmp_path) -> None:
    from safetensors.numpy import load_file, save_file

    from prm_jax.conversion.hf_checkpoint import hf_to_orbax
    from prm_jax.weights import ConversionError

    hf = tiny_hf_dir(tmp_path / "hf")
    tensors = load_file(str(hf / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"tensor model\.norm\.weight \(model\.safetensors\): dtype int32"):
        hf_to_orbax(hf, tmp_path / "orbax")
    assert not (tmp_path / "orbax").exists()


def test_tune_threshold_subset_is_checked_before_any_scoring(tmp_path, monkeypatch) -> None:
    from prm_jax.evaluation import runner

    data = tmp_path / "gsm8k.jsonl"
    data.write_text(
        json.dumps(
            {"id": "g0", "generator": "t", "problem": "p", "steps": ["a"], "final_answer_correct": True, "label": -1}
        )
        + "\n"
    )
    model = tmp_path / "model"
    model.mkdir()

    def no_scoring(config):
        raise AssertionError("the model was loaded before the subset was checked")

    monkeypatch.setattr(runner, "_prm_scorer", no_scoring)
    with pytest.raises(ValueError, match=r"tune_threshold_on='gsm8' is not a subset .*\['gsm8k'\]"):
        runner.run_evaluation(
            runner.EvaluationConfig(
                task="processbench", data=str(data), out=str(tmp_path / "o"), model=str(model), tune_threshold_on="gsm8"
            )
        )


# ------------------------------------------------------------------ 6. corrupt safetensors name file and tensor


def _corrupt(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    (size,) = struct.unpack("<Q", raw[:8])
    if how == "truncated":
        path.write_bytes(bytes(raw[: len(raw) - 8]))
    elif how == "header":
        path.write_bytes(bytes(raw[:8]) + b"{not json" + bytes(raw[17:]))
    elif how == "size":
        path.write_bytes(struct.pack("<Q", 10**12) + bytes(raw[8:]))
    elif how == "offsets":
        header = json.loads(raw[8 : 8 + size])
        header["model.norm.weight"]["data_offsets"] = [10**9, 10**9 + 64]
        encoded = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(raw[8 + size :]))


@pytest.mark.parametrize(
    "how, needles",
    [
        ("truncated", ["model.safetensors: tensor", "truncated or corrupt"]),
        ("header", ["model.safetensors: header is not valid UTF-8 JSON"]),
        ("size", ["model.safetensors: header size field says 1000000000000 bytes"]),
        ("offsets", ["tensor 'model.norm.weight'", "data ends at byte 1000000064"]),
    ],
)
def test_corrupt_safetensors_are_named_on_open(tmp_path, how, needles) -> None:
    from prm_jax.conversion.safetensors_io import SafetensorsCheckpoint, SafetensorsFormatError

    hf = tiny_hf_dir(tmp_path / "hf")
    _corrupt(hf / "model.safetensors", how)
    with pytest.raises(SafetensorsFormatError) as info:
        SafetensorsCheckpoint(hf)
    assert str(hf / "model.safetensors") in str(info.value)
    for needle in needles:
        assert needle in str(info.value)


# ------------------------------------------------------------------ 7. remote code is off unless asked for


def test_vllm_scoring_and_synthesis_do_not_trust_remote_code_by_default(tmp_path, monkeypatch) -> None:
    import prm_jax.generation.vllm_backend as vllm_backend
    from data_pipeline.backends import build_backend
    from data_pipeline.config import default_config
    from prm_jax import weights
    from prm_jax.evaluation import runner, tokenizer_loading

    seen = []

    class Engine:
        def __init__(self, model, **kwargs):
            seen.append(kwargs["engine"].trust_remote_code)

    monkeypatch.setattr(vllm_backend, "VLLMStepScorer", Engine)
    monkeypatch.setattr(vllm_backend, "VLLMBackend", Engine)
    monkeypatch.setattr(tokenizer_loading, "load_tokenizer", lambda *a: None)
    monkeypatch.setattr(weights, "checkpoint_kind", lambda *a: "hf")
    base = dict(task="processbench", data=str(tmp_path), out=str(tmp_path / "o"), model=str(tmp_path), backend="vllm")
    runner._prm_scorer(runner.EvaluationConfig(**base))
    runner._prm_scorer(runner.EvaluationConfig(**base, trust_remote_code=True))
    section = default_config().policy
    section.backend, section.model_path = "vllm", str(tmp_path)
    build_backend(section)
    assert seen == [False, True, False]


# ------------------------------------------------------------------ 5. one huge record costs little


def test_an_oversized_record_is_refused_at_read_without_parsing(tmp_path) -> None:
    from prm_jax.evaluation.records import EvaluationDataError, read_processbench

    small = {"id": "g0", "generator": "t", "problem": "p", "steps": ["a"], "final_answer_correct": True, "label": -1}
    big = {**small, "id": "g1", "steps": ["x " * 300_000]}
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps(small) + "\n" + json.dumps(big) + "\n")
    with pytest.raises(EvaluationDataError, match=r"gsm8k\.jsonl:2: .*longer than the limit of 100000 bytes"):
        list(read_processbench(data, max_record_bytes=100_000))
    assert len(list(read_processbench(data))) == 2  # the default limit (16 MiB) holds normal data


# ------------------------------------------------------------------ 8. table-driven: bad values per launcher


@pytest.fixture(scope="module")
def convert_table(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert_table")
    src = tmp / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    ok = ["--direction=hf_to_orbax", f"--hf_dir={src}"]
    export = ["--direction=orbax_to_hf", f"--orbax_dir={src}"]
    cases = [
        (ok + [f"--orbax_dir={src}", "--overwrite"], ["--orbax_dir", "is the input --hf_dir"]),
        (ok + [f"--orbax_dir={src / 'sub'}", "--overwrite"], ["is inside the input --hf_dir"]),
        (export + [f"--hf_dir={tmp}", "--overwrite"], ["--hf_dir", "contains the input --orbax_dir"]),
        (
            ["--direction=hf_to_orbax", f"--hf_dir={tmp / 'nope'}", f"--orbax_dir={tmp / 'o'}"],
            ["--hf_dir=", "does not exist"],
        ),
        (["--direction=sideways", f"--hf_dir={src}", f"--orbax_dir={tmp / 'o'}"], ["direction"]),
        (ok, ["orbax_dir"]),
        (ok + [f"--orbax_dir={tmp / 'o'}", "--seed=-1"], ["--seed=-1"]),
        (export + [f"--hf_dir={tmp / 'o'}", "--max_shard_size=lots"], ["max_shard_size='lots'"]),
        (export + [f"--hf_dir={tmp / 'o'}", "--max_shard_size=0GB"], ["max_shard_size='0GB'"]),
        (export + [f"--hf_dir={tmp / 'o'}", "--dtype=int8"], ["dtype"]),
        (export + [f"--hf_dir={tmp / 'o'}", f"--tokenizer_dir={tmp / 'tok'}"], ["--tokenizer_dir=", "does not exist"]),
        (ok + [f"--orbax_dir={tmp / 'o'}", "stray"], ["unexpected arguments"]),
        (export + [f"--hf_dir={tmp / 'o'}", "--seed=x"], ["seed"]),
    ]
    return tmp, cases, run_table("launch.convert", [args for args, _ in cases], tmp)


@pytest.mark.parametrize("row", range(13))
def test_convert_bad_values_table(convert_table, row) -> None:
    tmp, cases, outcomes = convert_table
    assert_one_line_refusal(outcomes[row], *cases[row][1])
    assert sorted(p.name for p in tmp.iterdir()) == ["launch.convert.cases.json", "src"]
    assert sorted(p.name for p in (tmp / "src").iterdir()) == ["config.json"]


@pytest.fixture(scope="module")
def evaluate_table(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate_table")
    data = tmp / "pb"
    data.mkdir()
    (data / "gsm8k.jsonl").write_text(
        json.dumps(
            {"id": "g0", "generator": "t", "problem": "p", "steps": ["a"], "final_answer_correct": True, "label": -1}
        )
        + "\n"
    )
    model = tmp / "model"
    model.mkdir()
    base = ["--task=processbench", f"--data={data}", f"--model={model}"]
    out = f"--out={tmp / 'out'}"
    cases = [
        (base + [out, "--max_length=-5"], ["max_length=-5"]),
        (
            base + [out, "--tokens_per_batch=0", "--threshold=2", "--critic_top_p=0"],
            ["tokens_per_batch=0", "threshold=2", "critic_top_p=0"],
        ),
        (base + [out, "--bon_k=a,b"], ["--bon_k=a,b"]),
        (base + [out, "--mesh=fsdp=x"], ["mesh shape 'fsdp=x'"]),
        (base + [out, "--mesh=fsdp=0"], ["axis sizes must be positive"]),
        (base + [out, "--max_length=abc"], ["max_length"]),
        (base + [out, "--task=foo"], ["task"]),
        (
            base + [out, "--gpu_memory_utilization=1.5", "--critic_samples=0"],
            ["gpu_memory_utilization=1.5", "critic_samples=0"],
        ),
        (base + [f"--out={data}"], ["out", "is the input data"]),
        (base + [f"--out={data / 'eval'}"], ["is inside the input data"]),
        (["--task=processbench", f"--data={tmp / 'nope'}", f"--model={model}", out], ["data=", "does not exist"]),
        (base + [out, "--tune_threshold_on=gsm8"], ["tune_threshold_on='gsm8'", "gsm8k"]),
        (base + [out, f"--predictions={data / 'gsm8k.jsonl'}"], ["exactly one of model, critic_model, predictions"]),
        (["--task=bon", f"--data={data}", f"--model={model}", out, "--aggregations=foo"], ["aggregations"]),
    ]
    return tmp, cases, run_table("launch.evaluate", [args for args, _ in cases], tmp)


@pytest.mark.parametrize("row", range(14))
def test_evaluate_bad_values_table(evaluate_table, row) -> None:
    tmp, cases, outcomes = evaluate_table
    assert_one_line_refusal(outcomes[row], *cases[row][1])
    assert not (tmp / "out").exists() and sorted(p.name for p in (tmp / "pb").iterdir()) == ["gsm8k.jsonl"]


@pytest.fixture(scope="module")
def synthesize_table(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synthesize_table")
    problems = tmp / "problems.jsonl"
    problems.write_text(json.dumps({"id": "p0", "problem": "What is 1 + 1?", "answer": "2"}) + "\n")
    (tmp / "empty.jsonl").write_text("\n\n")
    model = tmp / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    orbax = tmp / "orbax"
    orbax.mkdir()
    base = [
        f"--config={ROOT / 'configs' / 'synth_tiny.py'}",
        f"--workdir={tmp / 'w'}",
        f"--config.problems.path={problems}",
        f"--config.policy.model_path={model}",
    ]
    cases = [
        (base + [f"--config.policy.model_path={tmp / 'modle'}"], ["policy.model_path=", "modle does not exist"]),
        (base + ["--config.policy.backend=vlm"], ["policy.backend='vlm'"]),
        (base + ["--config.problems.format=csv"], ["problems.format='csv'"]),
        (
            base + ["--config.sample.temperature=-1", "--config.mc.top_p=0", "--config.mc.k=0"],
            ["sample.temperature=-1", "mc.top_p=0", "mc.k=0"],
        ),
        (base + [f"--config.problems.path={tmp / 'empty.jsonl'}"], ["empty.jsonl is empty"]),
        (base + [f"--config.problems.path={tmp / 'nope.jsonl'}"], ["nope.jsonl does not exist"]),
        (base + ["--config.mc.k=abc"], ["mc.k"]),
        (base + ["--num_shards=2", "--shard_index=5"], ["--shard_index=5 --num_shards=2"]),
        (base + ["--stage=everything"], ["stage"]),
        (base + [f"--config.policy.model_path={orbax}"], ["read as an Orbax checkpoint", "tokenizer_path"]),
        (
            base + ["--config.judge.prompt=mine", "--config.on_error=ignore"],
            ["judge.prompt='mine'", "on_error='ignore'"],
        ),
        (base + ["--config.judge.top_p=1.5", "--config.seed=-3"], ["judge.top_p=1.5", "seed=-3"]),
        (base + [f"--config.judge.model_path={tmp / 'judge'}"], ["judge.model_path=", "does not exist"]),
        ([f"--config={ROOT / 'configs' / 'nope.py'}", f"--workdir={tmp / 'w'}"], ["nope.py"]),
        (base + ["--ray_workers=2"], ["--ray_workers need --runner=ray"]),
    ]
    return tmp, cases, run_table("launch.synthesize", [args for args, _ in cases], tmp)


@pytest.mark.parametrize("row", range(15))
def test_synthesize_bad_values_table(synthesize_table, row) -> None:
    tmp, cases, outcomes = synthesize_table
    assert_one_line_refusal(outcomes[row], *cases[row][1])
    assert not (tmp / "w").exists()


def test_an_oversized_problem_line_becomes_an_error_record_without_being_parsed(tmp_path) -> None:
    from data_pipeline.problems import read_problems
    from data_pipeline.schemas import ErrorRecord

    path = tmp_path / "problems.jsonl"
    good = json.dumps({"id": "a", "problem": "1 + 1?", "answer": "2"})
    path.write_text(
        good
        + "\n"
        + json.dumps({"id": "b", "problem": "x" * 5000, "answer": "2"})
        + "\n"
        + good.replace('"a"', '"c"')
        + "\n"
    )
    items = list(read_problems(path, max_line_bytes=1000))
    assert [type(i).__name__ for i in items] == ["Problem", "ErrorRecord", "Problem"]
    assert isinstance(items[1], ErrorRecord) and items[1].error == "too_long" and items[1].source == f"{path}:2"
    assert items[2].id == "c"
