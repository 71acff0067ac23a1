"""The memory plan (`launch.plan`, `training.plan`), the trainer's pre-flight, and presets that carry
their architecture (`training.presets`).

CI has no `plan` extra: the plan runs there on the CPU (`--target=local`) end to end, and the GPU/TPU
targets must say how to get their compilers. The deviceless GPU/TPU compiles run only where the
extra is installed (`pip install -e ".[plan]"`), and are skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import pytest
from tiny_assets import tiny_config

from prm_jax.models.config import ModelConfig
from prm_jax.training import plan
from prm_jax.training.config import validate
from prm_jax.training.config import warnings as config_warnings
from prm_jax.training.presets import ARCHITECTURES, arch_differences
from prm_jax.training.trainer import Trainer, TrainingError, training_model_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
PRESETS = {
    "qwen2_5_math_1_5b.py": "Qwen2.5-Math-1.5B-Instruct",
    "qwen2_5_math_7b.py": "Qwen2.5-Math-7B-Instruct",
    "qwen2_5_math_72b.py": "Qwen2.5-Math-72B-Instruct",
}
# Small and fast: the tiny model on 4 packed rows of 128 tokens.
SMALL = {"data.seq_len": 128, "train.global_batch_rows": 4}


def _has_plan_extra() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "libtpu"))


needs_plan_extra = pytest.mark.skipif(
    not _has_plan_extra(), reason='needs the plan extra (pip install -e ".[plan]"): jax_cuda12_plugin and libtpu'
)


def _preset(name: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(name[:-3], CONFIGS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _plan_cli(tmp_path: Path, *flags: str, cpu_devices: int = 4) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={cpu_devices}", JAX_PLATFORMS="")
    return subprocess.run(
        [sys.executable, "-m", "launch.plan", *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


# ---------------------------------------------------------------------------- launch.plan on CPU


def test_plan_on_local_cpu_devices_end_to_end(tmp_path) -> None:
    out = tmp_path / "plan.json"
    proc = _plan_cli(
        tmp_path,
        f"--config={CONFIGS / 'tiny.py'}",
        "--target=local",
        f"--out={out}",
        "--config.data.seq_len=128",
        "--config.train.global_batch_rows=8",
        "--config.train.grad_accum_steps=2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    memory = record["memory"]
    assert record["target"] == "local" and record["platform"] == "cpu" and record["num_devices"] == 4
    assert record["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert record["per_device_bytes"] == (
        memory["argument_bytes"] + memory["output_bytes"] + memory["temp_bytes"] - memory["alias_bytes"]
    )
    assert memory["argument_bytes"] > 0 and memory["alias_bytes"] > 0  # params and opt state are donated
    # The host has no HBM limit: figures without a verdict.
    assert record["usable_bytes"] is None and record["fits"] is None and record["headroom"] is None
    assert record["compile_seconds"] > 0 and record["compile_error"] is None
    assert record["tokens_per_step"] == 8 * 128 and record["grad_accum_steps"] == 2
    model = ModelConfig(**dict(tiny_config().model.arch), with_lm_head=False, dtype="float32", remat_policy="none")
    from prm_jax.training.flops import training_flops_per_token

    assert record["flops_per_step"] == training_flops_per_token(model, 128, "prm") * 8 * 128
    assert record["model"]["parameters"] == model.num_parameters()
    assert record["step_seconds"] is None  # no peak FLOP/s for a CPU
    assert "per device" in proc.stdout and "no verdict" in proc.stdout


def test_a_plan_needs_no_data_but_a_valid_mesh(tmp_path) -> None:
    # The tiny config without its synthetic data: a plan reads no data, so the paths do not matter;
    # a batch that does not divide over the mesh does.
    config = tiny_config(**{**SMALL, "data.synthetic": "", "train.global_batch_rows": 6})
    with pytest.raises(plan.PlanError, match=r"global_batch_rows.*must divide over mesh data x fsdp = 4"):
        plan.plan_training(config, plan.LOCAL)
    with pytest.raises(plan.PlanError, match="unknown target 'h100x3'"):
        plan.plan_training(config, "h100x3")


# ---------------------------------------------------------------------------- GPU / TPU targets


@pytest.mark.parametrize("target", ["h100x8", "v5p-64"])
def test_gpu_and_tpu_targets_say_how_to_install_their_compiler(target, monkeypatch) -> None:
    monkeypatch.setattr(plan, "plugin_available", lambda platform: False)
    with pytest.raises(plan.PlanError, match=r'pip install -e "\.\[plan\]"'):
        plan.plan_training(tiny_config(**SMALL), target)


@pytest.mark.skipif(_has_plan_extra(), reason="the plan extra is installed here")
def test_plan_cli_without_the_plan_extra_is_one_clear_error(tmp_path) -> None:
    proc = _plan_cli(tmp_path, f"--config={CONFIGS / 'tiny.py'}", "--target=h100x8")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert 'pip install -e ".[plan]"' in proc.stderr and "Traceback" not in proc.stderr


@needs_plan_extra
@pytest.mark.parametrize(("target", "devices", "fits"), [("h100x8", 8, True), ("v5p-8", 4, True)])
def test_deviceless_plan_for_gpu_and_tpu_targets(tmp_path, target, devices, fits) -> None:
    out = tmp_path / "plan.json"
    proc = _plan_cli(
        tmp_path, f"--config={CONFIGS / 'tiny.py'}", f"--target={target}", f"--out={out}", "--config.data.seq_len=128"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["num_devices"] == devices and record["fits"] is fits and 0 < record["headroom"] < 1
    assert record["usable_bytes"] < record["hbm_bytes"] and record["step_seconds"] > 0


@needs_plan_extra
def test_a_tpu_program_over_hbm_is_reported_as_not_fitting(tmp_path) -> None:
    # The 1.5B preset's fp32 weights and Adam state alone (~25 GB) on one v5p chip's share of a
    # 2-layer model are fine; a batch of 64 x 4096 tokens in one microbatch on 4 chips is not.
    out = tmp_path / "plan.json"
    proc = _plan_cli(
        tmp_path,
        f"--config={CONFIGS / 'qwen2_5_math_1_5b.py'}",
        "--target=v5p-8",
        f"--out={out}",
        "--config.model.arch.num_hidden_layers=2",
        "--config.model.remat_policy=none",
        "--config.train.global_batch_rows=256",
        "--config.train.microbatch_rows_per_shard=0",  # the preset's 4 rows per shard would split it
        "--config.train.grad_accum_steps=1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["fits"] is False and record["per_device_bytes"] > record["usable_bytes"]


@needs_plan_extra
@pytest.mark.parametrize(
    ("preset", "target"),
    [
        ("qwen2_5_math_7b.py", "h100x8"),
        ("qwen2_5_math_7b.py", "v5p-64"),
        ("qwen2_5_math_72b.py", "h100x64"),
        ("qwen2_5_math_72b.py", "v5p-64"),
    ],
)
def test_presets_fit_the_hardware_they_name_with_ten_percent_headroom(tmp_path, preset, target) -> None:
    """The shipped presets, unchanged, compiled deviceless for the clusters their docstrings name."""
    out = tmp_path / "plan.json"
    proc = _plan_cli(tmp_path, f"--config={CONFIGS / preset}", f"--target={target}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["fits"] is True and record["headroom"] >= 0.10, record


@needs_plan_extra
def test_a_tpu_plan_compiles_the_real_splash_kernel(tmp_path) -> None:
    """Compiled deviceless for TPU from this CPU host, attention is the Mosaic splash kernel, not
    the Pallas interpreter the same model runs on CPU (`packed_attention`'s platform_dependent)."""
    script = tmp_path / "tpu_hlo.py"
    script.write_text(
        "from prm_jax.training import plan\n"
        "from prm_jax.training.trainer import Trainer\n"
        "from tiny_assets import tiny_config\n"
        "config = tiny_config(**{'data.seq_len': 256, 'model.dtype': 'bfloat16', 'model.attention_impl': 'splash'})\n"
        "trainer = Trainer(config, None, devices=plan.compile_only_devices(plan.TARGETS['v5p-8']))\n"
        "print('mosaic kernels:', plan.compile_step(trainer).compiled.as_text().count('tpu_custom_call'))\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'tests'}{os.pathsep}{REPO}")
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mosaic kernels: 0" not in proc.stdout and "mosaic kernels:" in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------- the trainer's pre-flight


def test_preflight_refuses_a_step_over_the_usable_limit_before_any_weights(tmp_path, monkeypatch) -> None:
    config = tiny_config(**SMALL)
    config.model.arch_name = "Tiny-Preset"
    monkeypatch.setattr(plan, "device_usable_bytes", lambda devices: (1 << 20, "a fake 1 MiB limit"))
    trainer = Trainer(config, tmp_path / "run")
    try:
        with pytest.raises(plan.PreflightError) as caught:
            trainer.run(iter(()), None, {})  # the iterator is never read
    finally:
        trainer.close()
    message = str(caught.value)
    assert isinstance(caught.value, TrainingError)  # launch.train: one `error:` line, exit 2
    assert "Tiny-Preset" in message and "1.00 MiB usable (a fake 1 MiB limit)" in message
    assert " MiB per device (argument " in message and "preflight_plan=false" in message
    assert not any((tmp_path / "run" / "checkpoints").iterdir())


def test_preflight_compiles_once_and_the_run_trains_with_that_executable(tmp_path, monkeypatch) -> None:
    config = tiny_config(**SMALL)
    trainer = Trainer(config, tmp_path / "run")
    try:
        figures = trainer.preflight()
        assert isinstance(trainer.train_step, jax.stages.Compiled)
        assert figures["fits"] is None and figures["per_device_bytes"] > 0  # CPU: logged, no verdict
        assert trainer.preflight() is figures  # run() does not compile it again
    finally:
        trainer.close()
    trainer = Trainer(tiny_config(**SMALL, **{"train.preflight_plan": False}), tmp_path / "run2")
    try:
        assert not isinstance(trainer.train_step, jax.stages.Compiled)
    finally:
        trainer.close()


# ---------------------------------------------------------------------------- presets carry their model


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_declare_their_base_models_architecture(preset) -> None:
    config = _preset(preset)
    assert config.model.arch_name == PRESETS[preset] and not config.model.init_from
    assert not [p for p in validate(config) if "model." in p]
    model = training_model_config(config)
    # The released models' parameter counts (LM head, no PRM head), from their shapes.
    released = {
        "Qwen2.5-Math-1.5B-Instruct": 1_543_714_304,
        "Qwen2.5-Math-7B-Instruct": 7_615_616_512,
        "Qwen2.5-Math-72B-Instruct": 72_706_203_648,
    }
    assert model.replace(with_lm_head=True, with_prm_head=False).num_parameters() == released[PRESETS[preset]]
    assert model.rope_theta == 10000.0 and model.max_position_embeddings == 4096 and model.head_dim == 128


def _hf_dir(root: Path, **arch) -> Path:
    """A Hugging Face checkpoint directory as far as its config goes (what the checks read)."""
    root.mkdir(parents=True)
    hf = {**ModelConfig(**arch).to_hf_dict(), "architectures": ["Qwen2ForCausalLM"]}
    (root / "config.json").write_text(json.dumps(hf))
    return root


def test_a_preset_refuses_an_init_from_checkpoint_of_other_shapes(tmp_path) -> None:
    config = _preset("qwen2_5_math_7b.py")
    other = _hf_dir(tmp_path / "1_5b", **ARCHITECTURES["Qwen2.5-Math-1.5B-Instruct"])
    config.model.init_from = str(other)
    with pytest.raises(ValueError, match=r"hidden_size: preset 3584, checkpoint 1536") as caught:
        training_model_config(config)
    assert "Qwen2.5-Math-7B-Instruct" in str(caught.value) and "num_key_value_heads: preset 4, checkpoint 2" in str(
        caught.value
    )
    assert [p for p in validate(config) if "hidden_size: preset 3584, checkpoint 1536" in p]


def test_a_preset_accepts_its_model_and_warns_on_other_hyper_parameters(tmp_path) -> None:
    config = _preset("qwen2_5_math_7b.py")
    arch = {**ARCHITECTURES["Qwen2.5-Math-7B-Instruct"], "num_hidden_layers": 2, "rope_theta": 1e6}
    config.model.arch.num_hidden_layers = 2  # a 2-layer stand-in of the 7B
    config.model.init_from = str(_hf_dir(tmp_path / "7b", **arch))
    assert training_model_config(config).rope_theta == 1e6  # the checkpoint's value is trained with
    assert not [p for p in validate(config) if "preset" in p]
    assert [w for w in config_warnings(config) if "rope_theta: preset 10000.0, checkpoint 1000000.0" in w]


def test_without_an_arch_name_init_from_any_shapes_is_fine(tmp_path) -> None:
    config = tiny_config()  # arch_name "": model.arch is the from-scratch architecture only
    config.model.init_from = str(
        _hf_dir(tmp_path / "other", **{**dict(config.model.arch), "hidden_size": 32, "num_hidden_layers": 3})
    )
    assert training_model_config(config).hidden_size == 32
    assert not [p for p in validate(config) if "preset" in p]


def test_arch_differences_compare_declared_fields_only() -> None:
    declared = {"hidden_size": 64, "rms_norm_eps": 1e-6, "not_a_field": 1}
    model = ModelConfig(
        vocab_size=8,
        hidden_size=32,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        rms_norm_eps=1e-5,
    )
    assert arch_differences(declared, model) == ["hidden_size: preset 64, checkpoint 32"]
    assert arch_differences(declared, model, shapes_only=False) == ["rms_norm_eps: preset 1e-06, checkpoint 1e-05"]
