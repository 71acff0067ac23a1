"""HF <-> Orbax conversion: round trips, the Qwen2.5-Math-PRM layout, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import per_layer_params, random_causal_lm, restore_model, save_hf, save_raw_checkpoint
from safetensors.numpy import load_file
from tiny_assets import build_tiny_tokenizer

from prm_jax.checkpoint import read_checkpoint_metadata
from prm_jax.conversion.hf_checkpoint import hf_tensor_names, hf_to_orbax, orbax_to_hf
from prm_jax.conversion.safetensors_io import SafetensorsCheckpoint, TensorSpec, write_safetensors
from prm_jax.models.config import UnsupportedCheckpointError
from prm_jax.models.factory import params_of
from prm_jax.scoring import score_prm_inputs, score_steps
from prm_jax.tokenization import build_prm_input, separator_token_id
from prm_jax.weights import ConversionError

PROBLEM = "Compute (12 + 30) * 2."
STEPS = ["12 + 30 = 42", "42 * 2 = 84", "So the answer is \\boxed{84}."]
TINY_VOCAB = 404  # the tiny tokenizer's length (400 BPE + 4 specials)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """causal LM (HF) -> Orbax (fresh head) -> HF PRM (fp32, with tokenizer)."""
    root = tmp_path_factory.mktemp("conv")
    hf_lm = save_hf(random_causal_lm(vocab_size=TINY_VOCAB, seed=7), root / "hf_lm")
    tokenizer = build_tiny_tokenizer(root / "tokenizer")
    hf_to_orbax(hf_lm, root / "orbax", seed=5)
    orbax_to_hf(root / "orbax", root / "hf_prm", dtype="float32", tokenizer_dir=tokenizer)
    return {"root": root, "hf_lm": hf_lm, "orbax": root / "orbax", "hf_prm": root / "hf_prm", "tokenizer": tokenizer}


def test_causal_lm_import_keeps_backbone_and_lm_head(converted) -> None:
    meta = read_checkpoint_metadata(converted["orbax"])
    assert meta["provenance"]["prm_head"] == "fresh (seed 5)"
    model = restore_model(converted["orbax"])
    assert model.config.with_lm_head and model.config.with_prm_head
    source = load_file(converted["hf_lm"] / "model.safetensors")
    np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]), source["lm_head.weight"].T)
    q = source["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(np.asarray(model.model.layers.self_attn.q_proj.kernel[1]), q.T.reshape(32, 4, 8))


def test_causal_lm_export_round_trips_to_transformers_exactly(converted, tmp_path) -> None:
    """head="lm": the policy's export is a plain Qwen2ForCausalLM (no score head, no remote code)
    whose tensors and logits are the source LM's."""
    from transformers import AutoModelForCausalLM

    out = orbax_to_hf(
        converted["orbax"], tmp_path / "lm", head="lm", dtype="float32", tokenizer_dir=converted["tokenizer"]
    )
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and "auto_map" not in config
    assert config["eos_token_id"] is not None and not list(out.glob("*.py"))
    written, source = load_file(out / "model.safetensors"), load_file(converted["hf_lm"] / "model.safetensors")
    assert sorted(written) == sorted(source)  # backbone + lm_head, no score.*
    for name, value in source.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    ids = torch.tensor([[1, 5, 9, 33, 120]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
        expected = AutoModelForCausalLM.from_pretrained(converted["hf_lm"], dtype=torch.float32).eval()(ids).logits
    np.testing.assert_array_equal(got.numpy(), expected.numpy())
    prm_only = orbax_to_hf(converted["orbax"], tmp_path / "prm", dtype="float32", tokenizer_dir=converted["tokenizer"])
    hf_to_orbax(prm_only, tmp_path / "prm_orbax")  # an imported PRM has no LM head
    with pytest.raises(ConversionError, match="no LM head; nothing to export with head='lm'"):
        orbax_to_hf(tmp_path / "prm_orbax", tmp_path / "lm2", head="lm")
    assert not (tmp_path / "lm2").exists()


def test_exported_layout_is_qwen_prm(converted) -> None:
    out = converted["hf_prm"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForProcessRewardModel"]
    assert config["auto_map"]["AutoModel"] == "modeling_qwen2_prm.Qwen2ForProcessRewardModel"
    assert config["num_labels"] == 2 and config["model_type"] == "qwen2"
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert (out / "modeling_qwen2_prm.py").exists() and (out / "configuration_qwen2_prm.py").exists()
    weights = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in weights
    assert {"score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"} <= set(weights)
    assert weights["score.2.weight"].shape == (2, 32) and weights["score.0.weight"].shape == (32, 32)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert separator_token_id(tokenizer) == config["step_separator_id"]


def test_qwen_base_export_takes_the_released_prms_separator(qwen_prm_checkpoint, qwen_tokenizer_dirs) -> None:
    """A Qwen2.5 base exported with its own (real-vocabulary) tokenizer: <extra_0> takes id 151651
    as in the released PRM's tokenizer (the same vocabulary), inside the unresized embedding."""
    from transformers import AutoTokenizer

    out = qwen_prm_checkpoint["hf_prm"]
    config = json.loads((out / "config.json").read_text())
    assert config["step_separator_id"] == 151_651 and "vllm_pooler_config" not in config
    assert config["vocab_size"] == 151_936 and not (out / "README.md").exists()
    exported, released = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(qwen_tokenizer_dirs["prm"])
    assert exported.encode("<extra_0>") == [151_651] and exported.get_vocab() == released.get_vocab()


def test_jax_rewards_equal_transformers_remote_code(qwen_prm_checkpoint) -> None:
    """JAX PRM -> HF dir -> AutoModel(trust_remote_code) gives the same step rewards, on the real
    Qwen2.5 vocabulary (ids up to 151,664, separator 151651)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_prm_checkpoint["hf_prm"])
    jax_model = restore_model(qwen_prm_checkpoint["orbax"], dtype="float32")
    hf_model = AutoModel.from_pretrained(
        qwen_prm_checkpoint["hf_prm"], trust_remote_code=True, dtype=torch.float32
    ).eval()
    problems = [(PROBLEM, STEPS), ("What is 7 - 2?", ["7 - 2 = 5", "\\boxed{5}"]), ("x" * 40, ["a b c"] * 6)]
    inputs = [build_prm_input(tokenizer, p, s) for p, s in problems]
    # Batched with padding to a 16-token bucket (crossing bucket sizes) and one at a time.
    jax_batched = score_prm_inputs(jax_model, inputs, pad_to_multiple=16)
    for (problem, steps), x, batched in zip(problems, inputs, jax_batched):
        with torch.no_grad():
            logits = hf_model(input_ids=torch.tensor([x.input_ids])).logits[0]
        expected = torch.softmax(logits, dim=-1)[:, 1].numpy()[x.separator_positions]
        np.testing.assert_allclose(batched, expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(score_steps(jax_model, tokenizer, problem, steps), expected, atol=1e-4, rtol=0)


def test_qwen_prm_round_trip_is_exact_and_keeps_the_separator(qwen_prm_checkpoint, tmp_path) -> None:
    """A released-PRM-like HF dir (real vocabulary, <extra_0> = 151651) -> Orbax -> HF, exported
    with its own tokenizer: every tensor bit for bit, and the separator stays at 151651."""
    source = qwen_prm_checkpoint["hf_prm"]
    hf_to_orbax(source, tmp_path / "orbax")
    orbax_to_hf(tmp_path / "orbax", tmp_path / "back", tokenizer_dir=source)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["step_separator_id"], config["vocab_size"], config["torch_dtype"]) == (151_651, 151_936, "float32")
    a, b = load_file(source / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_prm_round_trip_is_exact(converted, tmp_path, dtype) -> None:
    """HF PRM -> Orbax -> HF with default flags reproduces every tensor bit for bit, in the
    source's dtype (sharded output too)."""
    source = converted["hf_prm"]
    if dtype == "bfloat16":
        orbax_to_hf(converted["orbax"], tmp_path / "src", dtype="bfloat16")
        source = tmp_path / "src"
    hf_to_orbax(source, tmp_path / "orbax")
    meta = read_checkpoint_metadata(tmp_path / "orbax")
    assert meta["provenance"]["prm_head"] == "imported" and meta["source_dtype"] == dtype
    orbax_to_hf(tmp_path / "orbax", tmp_path / "back", max_shard_size=20_000)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == dtype
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()
    with SafetensorsCheckpoint(source) as a, SafetensorsCheckpoint(tmp_path / "back") as b:
        assert a.names() == b.names()
        for name in a.names():
            x, y = a.get(name), b.get(name)
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert x.tobytes() == y.tobytes(), name


def test_dtype_flag_overrides_the_source_dtype(converted, tmp_path) -> None:
    assert read_checkpoint_metadata(converted["orbax"])["source_dtype"] == "float32"
    orbax_to_hf(converted["orbax"], tmp_path / "bf16", dtype="bfloat16")
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {str(v.dtype) for v in weights.values()} == {"bfloat16"}


def test_checkpoint_without_new_metadata_still_restores_and_exports(converted, tmp_path) -> None:
    """Checkpoints written before source_dtype/tokenizer were recorded (layout 2, one tensor per
    layer): bf16 default, no tokenizer."""
    model = restore_model(converted["orbax"])
    old_metadata = {"layout_version": 2, "scan_layers": False, "config": model.config.to_json_dict(), "provenance": {}}
    params = nnx.traversals.unflatten_mapping(per_layer_params(nnx.traversals.flatten_mapping(params_of(model))))
    save_raw_checkpoint(tmp_path / "old", params, old_metadata)
    assert "source_dtype" not in read_checkpoint_metadata(tmp_path / "old")
    restore_model(tmp_path / "old")
    orbax_to_hf(tmp_path / "old", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and "step_separator_id" not in config
    orbax_to_hf(tmp_path / "old", tmp_path / "hf_tok", tokenizer_dir=converted["tokenizer"])
    assert json.loads((tmp_path / "hf_tok" / "config.json").read_text())["step_separator_id"] == 403


def test_separator_off_vllms_default_is_stated(converted, tmp_path, caplog) -> None:
    """Id 403 is not vLLM's default step_tag_id 151651: config.json, README.md and the log say what to pass."""
    setting = """--pooler-config '{"pooling_type": "STEP", "step_tag_id": 403}'"""
    with caplog.at_level("WARNING", logger="prm_jax.conversion.hf_checkpoint"):
        orbax_to_hf(converted["orbax"], tmp_path / "hf", tokenizer_dir=converted["tokenizer"])
    assert any(setting in r.getMessage() for r in caplog.records)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["step_separator_id"] == 403
    assert config["vllm_pooler_config"] == {"pooling_type": "STEP", "step_tag_id": 403}
    assert setting in (tmp_path / "hf" / "README.md").read_text()


def test_sharded_export_loads_in_transformers(converted, tmp_path) -> None:
    from transformers import AutoModel

    orbax_to_hf(converted["orbax"], tmp_path / "sharded", dtype="float32", max_shard_size="30KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert sorted(index["weight_map"]) == sorted(hf_tensor_names(restore_model(converted["orbax"]).config))
    model = AutoModel.from_pretrained(tmp_path / "sharded", trust_remote_code=True, dtype=torch.float32)
    single = load_file(converted["hf_prm"] / "model.safetensors")
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), single[name], err_msg=name)


# ---------------------------------------------------------------------------- bad input


def _edit_checkpoint(src: Path, dst: Path, *, drop=(), add=None, reshape=None, config_edit=None) -> Path:
    """Copies an HF checkpoint with tensors dropped, added or reshaped, or config.json edited."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config.update(config_edit)
    (dst / "config.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in load_file(src / "model.safetensors").items() if k not in drop}
    tensors.update(add or {})
    if reshape:
        name, shape = reshape
        tensors[name] = np.zeros(shape, tensors[name].dtype)
    specs = [TensorSpec(k, v.shape, v.dtype) for k, v in tensors.items()]
    write_safetensors(dst, specs, tensors.__getitem__)
    return dst


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            {"drop": ["model.layers.1.mlp.up_proj.weight"]},
            r"missing tensor\(s\) \['model.layers.1.mlp.up_proj.weight'\]",
        ),
        (
            {"add": {"model.layers.9.extra.weight": np.zeros(3, np.float32)}},
            r"unexpected tensor\(s\) \['model.layers.9.extra.weight'\]",
        ),
        (
            {"reshape": ("model.layers.0.self_attn.k_proj.weight", (8, 32))},
            r"tensor model.layers.0.self_attn.k_proj.weight: shape \(8, 32\) in checkpoint, expected \(16, 32\)",
        ),
    ],
)
def test_bad_tensors_are_named_and_nothing_is_written(converted, tmp_path, edit, message) -> None:
    bad = _edit_checkpoint(converted["hf_lm"], tmp_path / "bad", **edit)
    with pytest.raises(ConversionError, match=message):
        hf_to_orbax(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]


def test_unsupported_architecture_is_refused(converted, tmp_path) -> None:
    bad = _edit_checkpoint(converted["hf_lm"], tmp_path / "bad", config_edit={"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedCheckpointError, match="GPT2LMHeadModel"):
        hf_to_orbax(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_splitting_separator_is_added_with_embedding_resized(converted, tmp_path) -> None:
    from transformers import AutoModel, AutoTokenizer

    plain_tokenizer = build_tiny_tokenizer(tmp_path / "tok", separator_special=False)
    orbax_to_hf(converted["orbax"], tmp_path / "hf", dtype="float32", tokenizer_dir=plain_tokenizer)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    sep = separator_token_id(tokenizer)
    # The tiny tokenizer without the separator has 403 tokens; the model has 404 rows, so id 403
    # fits and the embedding keeps its size.
    assert sep == 403 and config["vocab_size"] == TINY_VOCAB
    model = AutoModel.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32)
    x = build_prm_input(tokenizer, PROBLEM, STEPS)
    assert len(x.separator_positions) == len(STEPS)
    with torch.no_grad():
        assert model(input_ids=torch.tensor([x.input_ids])).logits.shape == (1, len(x.input_ids), 2)


def test_separator_beyond_embedding_grows_it_with_mean_rows(tmp_path) -> None:
    from transformers import AutoModel, AutoTokenizer

    hf_lm = save_hf(random_causal_lm(vocab_size=403, seed=2), tmp_path / "hf_lm")
    hf_to_orbax(hf_lm, tmp_path / "orbax")
    tokenizer_dir = build_tiny_tokenizer(tmp_path / "tok", separator_special=False)
    orbax_to_hf(tmp_path / "orbax", tmp_path / "hf", dtype="float32", tokenizer_dir=tokenizer_dir)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == 448  # 404 needed, rounded up to a multiple of 64
    embed = load_file(tmp_path / "hf" / "model.safetensors")["model.embed_tokens.weight"]
    source = load_file(hf_lm / "model.safetensors")["model.embed_tokens.weight"]
    np.testing.assert_array_equal(embed[:403], source)
    np.testing.assert_allclose(embed[403:], np.broadcast_to(source.mean(0), (45, 32)), rtol=1e-6)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert separator_token_id(tokenizer) == 403
    AutoModel.from_pretrained(tmp_path / "hf", trust_remote_code=True)


def test_splitting_separator_refused_leaves_nothing(converted, tmp_path) -> None:
    plain_tokenizer = build_tiny_tokenizer(tmp_path / "tok", separator_special=False)
    with pytest.raises(ValueError, match="<extra_0>"):
        orbax_to_hf(converted["orbax"], tmp_path / "hf", tokenizer_dir=plain_tokenizer, add_separator=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_existing_destination_is_not_clobbered(converted, tmp_path) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        orbax_to_hf(converted["orbax"], tmp_path / "hf")
    with pytest.raises(FileExistsError):
        hf_to_orbax(converted["hf_lm"], converted["orbax"])
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"


def test_convert_cli_both_directions(converted, tmp_path) -> None:
    root = Path(__file__).resolve().parents[1]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "launch.convert", *args], cwd=root, capture_output=True, text=True, timeout=300
        )

    done = run("--direction=hf_to_orbax", f"--hf_dir={converted['hf_prm']}", f"--orbax_dir={tmp_path / 'o'}")
    assert done.returncode == 0, done.stderr
    done = run(
        "--direction=orbax_to_hf", f"--orbax_dir={tmp_path / 'o'}", f"--hf_dir={tmp_path / 'h'}", "--dtype=float32"
    )
    assert done.returncode == 0, done.stderr
    a, b = load_file(converted["hf_prm"] / "model.safetensors"), load_file(tmp_path / "h" / "model.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    failed = run("--direction=hf_to_orbax", f"--hf_dir={tmp_path / 'missing'}", f"--orbax_dir={tmp_path / 'x'}")
    assert failed.returncode == 2 and "--hf_dir=" in failed.stderr and "does not exist" in failed.stderr
    assert "Traceback" not in failed.stderr and not (tmp_path / "x").exists()
