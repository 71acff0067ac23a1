"""Qwen3 dense models: config, parity with transformers' Qwen3ForCausalLM, conversion both ways and
the Qwen3 PRM export (`Qwen3ForProcessRewardModel` remote code), all through public functions."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import TINY_QWEN2, random_causal_lm, rng_ids, save_hf
from safetensors.numpy import load_file
from tiny_assets import build_tiny_tokenizer

from prm_jax.checkpoint import read_checkpoint_metadata
from prm_jax.conversion.hf_checkpoint import hf_to_orbax, orbax_to_hf
from prm_jax.models.config import ModelConfig, UnsupportedCheckpointError
from prm_jax.models.factory import create_model, params_of
from prm_jax.scoring import score_prm_inputs
from prm_jax.tokenization import build_prm_input
from prm_jax.weights import load_model

TINY_VOCAB = 404  # the tiny tokenizer's length (400 BPE + 4 specials)
# head_dim 64 (not hidden / heads = 8), GQA; untied and tied.
CASES = {
    "gqa_untied": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "gqa_tied": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True),
}
PROBLEMS = [
    ("Compute (12 + 30) * 2.", ["12 + 30 = 42", "42 * 2 = 84", "So the answer is \\boxed{84}."]),
    ("What is 7 - 2?", ["7 - 2 = 5", "\\boxed{5}"]),
]


def _qwen3(name: str, **extra) -> torch.nn.Module:
    return random_causal_lm("qwen3", seed=len(name), **CASES[name], **extra)


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_qwen3(request, tmp_path_factory) -> tuple[str, torch.nn.Module, Path]:
    """A tiny random Qwen3ForCausalLM (fp32, non-trivial norms) and its save_pretrained directory."""
    model = _qwen3(request.param)
    return request.param, model, save_hf(model, tmp_path_factory.mktemp("qwen3") / request.param)


def test_config_reads_qwen3(hf_qwen3) -> None:
    name, hf, _ = hf_qwen3
    config = ModelConfig.from_hf_dict(hf.config.to_dict(), with_prm_head=False)
    assert (config.model_type, config.qk_norm, config.attention_bias, config.head_dim) == ("qwen3", True, False, 64)
    assert config.tie_word_embeddings == (name == "gqa_tied")
    assert config.num_parameters() == sum(p.numel() for p in hf.parameters())
    # Checkpoint metadata from before the field existed still loads (as a model without q/k norms).
    old = {k: v for k, v in config.to_json_dict().items() if k != "qk_norm"}
    assert ModelConfig.from_json_dict(old) == config.replace(qk_norm=False)
    assert ModelConfig.from_json_dict(config.to_json_dict()) == config


def test_config_refuses_what_qwen3_cannot_express() -> None:
    base = dict(
        model_type="qwen3",
        architectures=["Qwen3ForCausalLM"],
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    assert ModelConfig.from_hf_dict(base).head_dim == 128  # transformers' Qwen3Config default
    for change, message in [
        ({"attention_bias": True}, "Qwen3 with attention_bias=true"),
        ({"architectures": ["Qwen2ForCausalLM"]}, "do not match model_type='qwen3'"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types="),
        ({"use_sliding_window": True}, "use_sliding_window"),
    ]:
        with pytest.raises(UnsupportedCheckpointError, match=message):
            ModelConfig.from_hf_dict({**base, **change})
    qwen3 = ModelConfig.from_hf_dict(base)
    assert qwen3.to_hf_dict()["model_type"] == "qwen3" and qwen3.to_hf_dict()["attention_bias"] is False
    with pytest.raises(UnsupportedCheckpointError, match="qk_norm"):
        qwen3.replace(qk_norm=False).to_hf_dict()
    # Qwen2 keeps refusing a bias-free export, and cannot carry q/k norms.
    qwen2 = ModelConfig.from_hf_dict({**base, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    with pytest.raises(UnsupportedCheckpointError, match="needs attention_bias=True"):
        qwen2.replace(attention_bias=False).to_hf_dict()
    with pytest.raises(UnsupportedCheckpointError, match="qk_norm"):
        qwen2.replace(qk_norm=True).to_hf_dict()


def test_qk_norm_adds_only_the_norm_parameters() -> None:
    """q_norm/k_norm (ones, [head_dim] per layer) are Qwen3's only extra parameters; a Qwen2 config
    has none, and num_parameters counts what the model holds."""
    from flax import nnx

    qwen2 = ModelConfig.from_hf_dict({**TINY_QWEN2, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    qwen3 = qwen2.replace(model_type="qwen3", attention_bias=False, qk_norm=True)
    flat = {c: nnx.traversals.flatten_mapping(params_of(create_model(c))) for c in (qwen2, qwen3)}
    norms = {p: v for p, v in flat[qwen3].items() if p[-2] in ("q_norm", "k_norm")}
    assert {p[-2:] for p in norms} == {("q_norm", "weight"), ("k_norm", "weight")}
    assert all(np.all(np.asarray(v) == 1.0) and v.shape[-1] == qwen3.head_dim for v in norms.values())
    assert not any(p[-2] in ("q_norm", "k_norm") for p in flat[qwen2])
    for config, params in flat.items():
        assert sum(np.asarray(v).size for v in params.values()) == config.num_parameters()


def _hf_logits(hf: torch.nn.Module, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.tensor(mask)
        kwargs["position_ids"] = torch.tensor(np.clip(np.cumsum(mask, axis=1) - 1, 0, None), dtype=torch.long)
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids, dtype=torch.long), **kwargs).logits.numpy()


def test_logits_match_transformers_padded_and_packed(hf_qwen3) -> None:
    """Our model loaded from the transformers directory gives transformers' fp32 logits, on a
    left/right/both-padded batch and on packed rows (each segment against the sequence alone)."""
    _, hf, directory = hf_qwen3
    model = load_model(directory, head="lm", dtype="float32", param_dtype="float32")
    vocab = model.config.vocab_size

    ids = rng_ids(4, 11, vocab, seed=1)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    mask[3, :2] = 0
    mask[3, 9:] = 0  # both
    logits = np.asarray(model.lm_logits(model(jnp.asarray(ids), jnp.asarray(mask))))
    real = mask.astype(bool)
    expected = _hf_logits(hf, ids, mask)
    np.testing.assert_allclose(logits[real], expected[real], atol=2e-6, rtol=0)

    a, b, c = rng_ids(1, 7, vocab, seed=2)[0], rng_ids(1, 5, vocab, seed=3)[0], rng_ids(1, 9, vocab, seed=4)[0]
    packed = np.stack([np.concatenate([a, b, np.zeros(4, np.int32)]), np.concatenate([c, a[:7]])])
    segments = np.array([[1] * 7 + [2] * 5 + [0] * 4, [1] * 9 + [2] * 7])
    logits = np.asarray(model.lm_logits(model(jnp.asarray(packed), jnp.asarray(segments))))
    for row, start, seq in [(0, 0, a), (0, 7, b), (1, 0, c), (1, 9, a)]:
        alone = _hf_logits(hf, seq[None])[0]
        np.testing.assert_allclose(logits[row, start : start + len(seq)], alone, atol=2e-6, rtol=0)


def _same_tensors(a_dir: Path, b_dir: Path) -> None:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name


def test_causal_lm_round_trip_is_exact(hf_qwen3, tmp_path) -> None:
    """Qwen3ForCausalLM -> Orbax -> orbax_to_hf(head="lm"): every tensor bit for bit, a Qwen3
    config.json, and transformers gives the source's logits exactly."""
    from transformers import AutoModelForCausalLM

    _, hf, source = hf_qwen3
    config = hf_to_orbax(source, tmp_path / "orbax", seed=5)
    assert config.qk_norm and read_checkpoint_metadata(tmp_path / "orbax")["config"]["qk_norm"] is True
    out = orbax_to_hf(tmp_path / "orbax", tmp_path / "lm", head="lm")
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["Qwen3ForCausalLM"] and written["model_type"] == "qwen3"
    assert written["head_dim"] == 64 and written["attention_bias"] is False and "auto_map" not in written
    _same_tensors(source, out)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(loaded).__name__ == "Qwen3ForCausalLM"
    ids = rng_ids(2, 8, hf.config.vocab_size, seed=9)
    np.testing.assert_array_equal(_hf_logits(loaded, ids), _hf_logits(hf, ids))


def test_prm_export_loads_in_transformers_and_matches_our_rewards(tmp_path) -> None:
    """A Qwen3 base -> Orbax (fresh head) -> PRM export: transformers loads it as
    Qwen3ForProcessRewardModel (no missing or unexpected weights) and scores the steps as we do;
    the export converts back to an identical PRM."""
    from transformers import AutoModel, AutoTokenizer

    source = save_hf(_qwen3("gqa_untied", vocab_size=TINY_VOCAB), tmp_path / "hf_lm")
    tokenizer_dir = build_tiny_tokenizer(tmp_path / "tokenizer")
    hf_to_orbax(source, tmp_path / "orbax", seed=5)
    out = orbax_to_hf(tmp_path / "orbax", tmp_path / "prm", dtype="float32", tokenizer_dir=tokenizer_dir)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForProcessRewardModel"] and config["model_type"] == "qwen3"
    assert config["auto_map"]["AutoModel"] == "modeling_qwen3_prm.Qwen3ForProcessRewardModel"
    assert sorted(p.name for p in out.glob("*.py")) == ["configuration_qwen3_prm.py", "modeling_qwen3_prm.py"]
    assert "no native Qwen3ForProcessRewardModel" in (out / "README.md").read_text()
    weights = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in weights and "model.layers.1.self_attn.k_norm.weight" in weights

    hf_prm, info = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32, output_loading_info=True)
    assert type(hf_prm).__name__ == "Qwen3ForProcessRewardModel"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = [build_prm_input(tokenizer, p, s) for p, s in PROBLEMS]
    ours = score_prm_inputs(load_model(tmp_path / "orbax", head="prm", dtype="float32"), inputs, pad_to_multiple=16)
    reimported = score_prm_inputs(load_model(out, head="prm", dtype="float32"), inputs, pad_to_multiple=16)
    for x, rewards, again in zip(inputs, ours, reimported):
        with torch.no_grad():
            logits = hf_prm.eval()(input_ids=torch.tensor([x.input_ids])).logits[0]
        expected = torch.softmax(logits, dim=-1)[:, 1].numpy()[x.separator_positions]
        np.testing.assert_allclose(rewards, expected, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(again, rewards)

    hf_to_orbax(out, tmp_path / "prm_orbax")
    assert read_checkpoint_metadata(tmp_path / "prm_orbax")["provenance"]["prm_head"] == "imported"
    back = orbax_to_hf(tmp_path / "prm_orbax", tmp_path / "back")
    _same_tensors(out, back)
    assert json.loads((back / "config.json").read_text())["architectures"] == ["Qwen3ForProcessRewardModel"]
