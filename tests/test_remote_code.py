"""Our Hugging Face remote code: an exported PRM dir loads with AutoModel(trust_remote_code=True)."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from prm_jax.conversion.remote_code import ARCHITECTURE, AUTO_MAP, REMOTE_CODE_FILES, write_remote_code
from prm_jax.conversion.safetensors_io import TensorSpec, write_safetensors

HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, NUM_LABELS = 32, 2, 4, 2, 128, 2

# The config.json style we export: legacy keys for transformers 4.x (rope_theta, torch_dtype) next
# to the 5.x ones (rope_parameters, dtype), so one file loads in both.
TINY_PRM_CONFIG: dict[str, Any] = {
    "architectures": [ARCHITECTURE],
    "auto_map": AUTO_MAP,
    "model_type": "qwen2",
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "hidden_act": "silu",
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_parameters": {"rope_theta": 1_000_000.0, "rope_type": "default"},
    "rope_scaling": None,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": LAYERS,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "dtype": "float32",
    "num_labels": NUM_LABELS,
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "use_cache": False,
}


def _expected_names() -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        names |= {f"{p}.self_attn.{x}_proj.{w}" for x in "qkv" for w in ("weight", "bias")}
        names |= {f"{p}.self_attn.o_proj.weight", f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
        names |= {f"{p}.mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
    return names | {"score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"}


def _prm_dir(path: Path) -> Path:
    write_remote_code(path)
    (path / "config.json").write_text(json.dumps(TINY_PRM_CONFIG, indent=2))
    return path


def _random_prm(directory: Path) -> torch.nn.Module:
    """Our PRM class, instantiated from the copied remote-code files, with all weights random."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    model = AutoModel.from_config(config, trust_remote_code=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # default init has zero biases and unit norms, which hide mix-ups
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


def test_constants_agree_with_the_shipped_files() -> None:
    stems = {name.removesuffix(".py") for name in REMOTE_CODE_FILES}
    assert {ref.split(".")[0] for ref in AUTO_MAP.values()} == stems
    assert AUTO_MAP["AutoModel"].endswith("." + ARCHITECTURE)
    source = importlib.resources.files("prm_jax.conversion").joinpath("hf_files")
    for name in REMOTE_CODE_FILES:
        text = source.joinpath(name).read_text()
        cls = next(ref.split(".")[1] for ref in AUTO_MAP.values() if ref.startswith(name[:-3]))
        assert f"class {cls}(" in text


def test_write_remote_code_copies_files(tmp_path: Path) -> None:
    dst = tmp_path / "export" / "nested"
    write_remote_code(dst)
    source = importlib.resources.files("prm_jax.conversion").joinpath("hf_files")
    assert sorted(p.name for p in dst.iterdir()) == sorted(REMOTE_CODE_FILES)
    for name in REMOTE_CODE_FILES:
        assert (dst / name).read_bytes() == source.joinpath(name).read_bytes()
    write_remote_code(dst)  # idempotent: overwrites in place, leaves no temporary files
    assert sorted(p.name for p in dst.iterdir()) == sorted(REMOTE_CODE_FILES)


def test_automodel_loads_exported_prm(tmp_path: Path) -> None:
    from transformers import AutoModel

    directory = _prm_dir(tmp_path / "prm")
    model = _random_prm(directory)
    assert type(model).__name__ == ARCHITECTURE
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    assert set(state) == _expected_names()
    assert state["score.0.weight"].shape == (HIDDEN, HIDDEN)
    assert state["score.2.weight"].shape == (NUM_LABELS, HIDDEN)
    assert state["score.2.bias"].shape == (NUM_LABELS,)

    # Write the weights the way the exporter does (streamed, sharded) rather than save_pretrained.
    specs = [TensorSpec(k, v.shape, v.dtype) for k, v in state.items()]
    write_safetensors(directory, specs, state.__getitem__, max_shard_bytes=32 * 1024)

    loaded, info = AutoModel.from_pretrained(directory, trust_remote_code=True, output_loading_info=True)
    assert type(loaded).__name__ == ARCHITECTURE
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded_state = loaded.state_dict()
    assert set(loaded_state) == _expected_names()
    for name, expected in state.items():
        np.testing.assert_array_equal(loaded_state[name].numpy(), expected, err_msg=name)

    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row exercises the attention-mask path
    with torch.no_grad():
        out = loaded.eval()(input_ids=ids, attention_mask=mask)
        reference = model(input_ids=ids, attention_mask=mask).logits
    assert out.logits.shape == (3, 9, NUM_LABELS)
    assert out[0] is out.logits
    torch.testing.assert_close(out.logits, reference)
    # Scores at unpadded positions must not depend on the padded ones.
    with torch.no_grad():
        alone = loaded(input_ids=ids[:1, 4:]).logits
    torch.testing.assert_close(out.logits[:1, 4:], alone, atol=1e-5, rtol=1e-5)


def test_forward_accepts_inputs_embeds_and_hidden_states(tmp_path: Path) -> None:
    model = _random_prm(_prm_dir(tmp_path / "prm"))
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        by_ids = model(ids).logits
        embeds = model.get_input_embeddings()(ids)
        out = model(inputs_embeds=embeds, output_hidden_states=True)
    torch.testing.assert_close(out.logits, by_ids)
    assert out.hidden_states is not None and len(out.hidden_states) == LAYERS + 1
    with pytest.raises(ValueError):
        model(input_ids=ids, inputs_embeds=embeds)
