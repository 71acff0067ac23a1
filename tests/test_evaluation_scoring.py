"""Batched evaluation scoring: parity with transformers across buckets and padding on several
meshes, Orbax and Hugging Face loading, streaming windows that split records, the critic task."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from hf_models import random_causal_lm, restore_model, save_hf
from tiny_assets import TINY_VOCAB_SIZE, build_tiny_tokenizer

from prm_jax.conversion.hf_checkpoint import hf_to_orbax, orbax_to_hf
from prm_jax.evaluation.records import BoNRecord, BoNResponse, EvaluationDataError, ProcessBenchRecord
from prm_jax.evaluation.scorer import BatchedScorer, BucketConfig, length_bucket
from prm_jax.evaluation.tasks import bon_with_prm, prepare_input, processbench_with_critic, processbench_with_prm
from prm_jax.evaluation.tokenizer_loading import load_tokenizer
from prm_jax.generation.types import Completion, RequestOutput, SamplingParams
from prm_jax.sharding import make_mesh
from prm_jax.tokenization import build_prm_input
from prm_jax.weights import ConversionError, checkpoint_kind, load_model

WORDS = "the sum of two and three is five so we add them then multiply by four".split()


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    """A random causal LM exported as a PRM (fp32), its Orbax checkpoint and the tokenizer."""
    root = tmp_path_factory.mktemp("eval_scoring")
    hf_lm = save_hf(random_causal_lm(vocab_size=TINY_VOCAB_SIZE, seed=11, max_position_embeddings=1024), root / "hf_lm")
    tokenizer_dir = build_tiny_tokenizer(root / "tokenizer")
    hf_to_orbax(hf_lm, root / "orbax", seed=3)
    orbax_to_hf(root / "orbax", root / "hf_prm", dtype="float32", tokenizer_dir=tokenizer_dir)
    return {
        "hf_lm": hf_lm,
        "tokenizer_dir": tokenizer_dir,
        "orbax": root / "orbax",
        "hf_prm": root / "hf_prm",
        "tokenizer": load_tokenizer(root / "hf_prm"),
    }


SHORT = [(2, [3]), (5, [3, 4]), (8, [2, 2, 2])]  # ~55-80 tokens
MEDIUM = [(50, [10, 10, 10]), (60, [10, 10, 10]), (65, [10, 9, 10])]  # ~220-240 tokens
LONG = [(30, [20] * 20), (25, [20] * 19)]  # ~900-950 tokens, 19-20 steps


def solutions(shapes: list[tuple[int, list[int]]], seed: int = 0) -> list[tuple[str, list[str]]]:
    """(problem, steps) with the given (problem words, [words per step]) shapes."""
    rng = np.random.default_rng(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS, size=n))

    return [(text(p), [text(k) for k in steps]) for p, steps in shapes]


@pytest.fixture(scope="module")
def hf_reference(assets) -> callable:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(assets["hf_prm"], trust_remote_code=True, dtype=torch.float32).eval()

    def rewards(x) -> np.ndarray:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([x.input_ids])).logits[0]
        return torch.softmax(logits, dim=-1)[:, 1].numpy()[x.separator_positions]

    return rewards


@pytest.mark.parametrize(
    "mesh_shape, source", [({"data": 2, "fsdp": 2}, "hf_prm"), ({"fsdp": 2, "tensor": 2}, "orbax")]
)
def test_batched_scores_equal_transformers_across_buckets_and_padding(assets, hf_reference, mesh_shape, source) -> None:
    """Rows of 55 to 950 tokens, in three length buckets with padded rows, from either checkpoint
    format, with parameters sharded over fsdp or fsdp x tensor, match an unpadded HF forward."""
    tokenizer = assets["tokenizer"]
    shapes = [LONG[0], SHORT[0], MEDIUM[0], SHORT[1], LONG[1], MEDIUM[1], SHORT[2], MEDIUM[2]]
    inputs = [build_prm_input(tokenizer, p, s) for p, s in solutions(shapes)]
    mesh = make_mesh(mesh_shape)
    model = load_model(assets[source], mesh=mesh, dtype="float32", param_dtype="float32")
    scorer = BatchedScorer(
        model, mesh=mesh, config=BucketConfig(min_length=128, tokens_per_batch=1024, max_rows=4, min_steps=32)
    )
    scores = scorer.score(inputs)
    assert sorted(shape[1] for shape in scorer.stats.shapes) == [128, 256, 1024]  # three buckets, one shape each
    assert scorer.row_multiple == mesh_shape.get("data", 1) * mesh_shape["fsdp"]  # rows split over data x fsdp
    assert all(shape[0] % scorer.row_multiple == 0 for shape in scorer.stats.shapes)
    assert scorer.stats.padded_tokens > 1.2 * scorer.stats.tokens  # rows really are padded
    for x, got in zip(inputs, scores):
        assert len(got) == len(x.separator_positions)
        np.testing.assert_allclose(got, hf_reference(x), atol=1e-4, rtol=0)
    shapes_seen = set(scorer.stats.shapes)
    again = scorer.score(list(reversed(inputs)))
    assert scorer.stats.shapes == shapes_seen  # same inputs, other order: no new compiled shapes
    np.testing.assert_allclose(np.concatenate(again[::-1]), np.concatenate(scores), atol=1e-6)


def test_scoring_a_qwen_hf_dir_equals_transformers(qwen_prm_checkpoint) -> None:
    """Evaluation's path from an HF PRM dir on the real Qwen2.5 vocabulary: the tokenizer found
    beside the weights puts the separator at 151651, and bucketed, padded, sharded scores equal an
    unpadded transformers forward of the same ids."""
    from transformers import AutoModel

    hf_dir = qwen_prm_checkpoint["hf_prm"]
    tokenizer = load_tokenizer(hf_dir)
    inputs = [build_prm_input(tokenizer, p, s) for p, s in solutions(SHORT + MEDIUM, seed=1)]
    assert all(x.input_ids[i] == 151_651 for x in inputs for i in x.separator_positions)
    mesh = make_mesh({"fsdp": 2, "tensor": 2})
    scorer = BatchedScorer(
        load_model(hf_dir, mesh=mesh),
        mesh=mesh,
        config=BucketConfig(min_length=64, tokens_per_batch=512, max_rows=4, min_steps=8),
    )
    hf_model = AutoModel.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
    for x, got in zip(inputs, scorer.score(inputs)):
        with torch.no_grad():
            logits = hf_model(input_ids=torch.tensor([x.input_ids])).logits[0]
        np.testing.assert_allclose(
            got, torch.softmax(logits, -1)[:, 1].numpy()[x.separator_positions], atol=1e-4, rtol=0
        )
    assert len(scorer.stats.shapes) >= 2  # more than one length bucket, with padded rows


def test_length_buckets_are_a_bounded_ladder() -> None:
    assert [length_bucket(n, 64) for n in (1, 64, 65, 96, 97, 129, 200, 1000)] == [64, 64, 96, 96, 128, 192, 256, 1024]
    ladder = {length_bucket(n, 64) for n in range(1, 8193)}
    assert len(ladder) == 15  # 64 .. 8192: two per octave
    assert all(length_bucket(n, 64) < 1.5 * n + 64 for n in range(1, 8193))  # padding stays bounded


def test_loading_errors(assets, tmp_path) -> None:
    mesh = make_mesh({"fsdp": -1})
    with pytest.raises(ConversionError, match="not a process reward model"):
        load_model(assets["hf_lm"], mesh=mesh, head="prm")
    with pytest.raises(ConversionError, match="no LM head"):
        load_model(assets["hf_prm"], mesh=mesh, head="lm")
    with pytest.raises(ValueError, match="--tokenizer"):
        load_tokenizer(assets["orbax"])
    assert checkpoint_kind(assets["orbax"]) == "orbax" and checkpoint_kind(assets["hf_prm"]) == "hf"
    with pytest.raises(FileNotFoundError, match="neither"):
        checkpoint_kind(tmp_path)


def test_unscorable_inputs_name_the_record(assets) -> None:
    with pytest.raises(EvaluationDataError, match="data.jsonl:3: field 'steps'.*separator"):
        prepare_input(assets["tokenizer"], "p", ["a <extra_0> b"], source="data.jsonl:3")


def test_over_long_inputs_are_scored_or_skipped_and_always_counted(assets) -> None:
    """An input past the trained context no longer aborts the run: scored (RoPE extrapolates) by
    default, or its record skipped by choice; counted in results.json either way."""
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    scorer = BatchedScorer(
        load_model(assets["orbax"], mesh=mesh, dtype="float32"), mesh=mesh, config=BucketConfig(min_length=256)
    )
    tokenizer = assets["tokenizer"]
    sols = solutions(SHORT + MEDIUM, seed=4)  # SHORT: < 100 tokens, MEDIUM: > 200
    records = [
        ProcessBenchRecord(f"g{i}", "gsm8k" if i % 2 else "math", p, tuple(s), -1, True)
        for i, (p, s) in enumerate(sols)
    ]
    full = processbench_with_prm(records, scorer, tokenizer, max_length=None)
    scored = processbench_with_prm(records, scorer, tokenizer, max_length=150)
    assert [row["rewards"] for row in scored.predictions] == [row["rewards"] for row in full.predictions]
    assert [row["over_length"] for row in scored.predictions] == [False] * 3 + [True] * 3
    over = scored.results["over_length"]
    assert (over["policy"], over["n_inputs"], over["n_skipped"], over["max_length"]) == ("score", 3, 0, 150)
    assert over["by_group"] == {"gsm8k": 2, "math": 1} and over["longest"] > 200
    skipped = processbench_with_prm(records, scorer, tokenizer, max_length=150, over_length="skip")
    assert [row["id"] for row in skipped.predictions] == ["g0", "g1", "g2"]
    assert skipped.results["over_length"]["n_skipped"] == 3
    assert skipped.results["subsets"]["gsm8k"]["n_ok"] == 1  # g1 only: g3 and g5 were skipped

    long_steps = tuple(" ".join(sols[3][1]) for _ in range(4))
    bon = [
        BoNRecord("b0", "d", sols[0][0], "1", (BoNResponse(tuple(sols[0][1]), True), BoNResponse(long_steps, False))),
        BoNRecord("b1", "d", sols[1][0], "1", (BoNResponse(tuple(sols[1][1]), True),)),
    ]
    out = bon_with_prm(bon, scorer, tokenizer, max_length=150, over_length="skip")
    assert [row["id"] for row in out.predictions] == ["b1"]  # b0 has an over-long response: the problem goes
    assert out.results["over_length"]["n_skipped"] == 1 and out.results["average"]["n_problems"] == 1
    out = bon_with_prm(bon, scorer, tokenizer, max_length=150)
    assert out.results["over_length"]["n_inputs"] == 1 and out.results["average"]["n_problems"] == 2
    with pytest.raises(ValueError, match="over_length"):
        bon_with_prm(bon, scorer, tokenizer, over_length="truncate")


def test_bon_rewards_survive_windows_that_split_records(assets) -> None:
    mesh = make_mesh({"data": 2, "fsdp": 2})
    scorer = BatchedScorer(
        load_model(assets["orbax"], mesh=mesh, dtype="float32"), mesh=mesh, config=BucketConfig(min_length=256)
    )
    tokenizer = assets["tokenizer"]
    sols = solutions((SHORT + MEDIUM) * 2, seed=2)
    records = [
        BoNRecord(
            f"r{i}",
            "d",
            sols[i][0],
            "1",
            tuple(BoNResponse(tuple(s), correct=j == 0) for j, (_, s) in enumerate(sols[i : i + 1 + i % 3])),
        )
        for i in range(6)
    ]
    calls = []
    score = scorer.score
    scorer.score = lambda inputs: calls.append(len(inputs)) or score(inputs)
    out = bon_with_prm(records, scorer, tokenizer, ks=[1, 2], window=4)
    assert calls == [4, 4, 4] and [len(r.responses) for r in records] == [1, 2, 3, 1, 2, 3]  # windows split r1, r2, r4
    for record, row in zip(records, out.predictions):
        expected = scorer.score([build_prm_input(tokenizer, record.problem, r.steps) for r in record.responses])
        assert len(row["rewards"]) == len(record.responses)
        np.testing.assert_allclose(np.concatenate(row["rewards"]), np.concatenate(expected), atol=1e-6)
    assert out.results["by_k"]["1"]["prm_at_n"]["product"] == 1.0  # the only response at k=1 is the correct one
    assert out.results["average"]["n"] is None  # 1 to 3 responses per problem


def test_processbench_with_prm_predicts_first_step_below_threshold(assets) -> None:
    mesh = make_mesh({"fsdp": 4})
    # restored on one device without a mesh: the scorer lays the parameters out on its mesh itself
    scorer = BatchedScorer(restore_model(assets["orbax"]), mesh=mesh, config=BucketConfig(min_length=256))
    assert len(jax.tree.leaves(scorer._state)[0].sharding.device_set) == 4
    sols = solutions(SHORT + MEDIUM, seed=3)
    records = [
        ProcessBenchRecord(f"g{i}", "gsm8k" if i < 3 else "math", p, tuple(s), -1 if i % 2 else len(s) - 1, True)
        for i, (p, s) in enumerate(sols)
    ]
    all_rewards = [
        r for row in processbench_with_prm(records, scorer, assets["tokenizer"]).predictions for r in row["rewards"]
    ]
    threshold = float(np.median(all_rewards))  # random weights: rewards bunch near one value
    out = processbench_with_prm(records, scorer, assets["tokenizer"], threshold=threshold, tune_on="gsm8k")
    for row in out.predictions:
        below = [i for i, r in enumerate(row["rewards"]) if r < threshold]
        assert row["pred"] == (below[0] if below else -1)
    assert set(out.results["subsets"]) == {"gsm8k", "math"}
    assert out.results["threshold_sweep"]["subsets"]["gsm8k"]["f1"] >= out.results["subsets"]["gsm8k"]["f1"]
    assert out.results["analyses"]["calibration"]["n_steps"] == sum(
        len(r.steps) if r.label == -1 else r.label + 1 for r in records
    )


class ScriptedCritic:
    """A GenerationBackend that answers from a script: problem -> sample texts."""

    tokenizer = None

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = script
        self.calls: list[int] = []

    def generate(self, prompts, params):
        self.calls.append(len(prompts))
        outputs = []
        for messages in prompts:
            text = messages[0]["content"]
            problem = next(p for p in self.script if f"[Math Problem]\n\n{p}\n\n" in text)
            texts = self.script[problem][: params.n]
            outputs.append(
                RequestOutput(
                    (1,), tuple(Completion(t, (1,), "length" if t.endswith("...") else "stop") for t in texts)
                )
            )
        return outputs


def test_critic_majority_vote_and_unparseable_answers() -> None:
    records = [
        ProcessBenchRecord("a", "gsm8k", "P-a", ("s0", "s1", "s2"), 1, True),
        ProcessBenchRecord("b", "gsm8k", "P-b", ("s0", "s1"), -1, True),
        ProcessBenchRecord("c", "math", "P-c", ("s0", "s1"), 0, False),
    ]
    critic = ScriptedCritic(
        {
            "P-a": ["\\boxed{1}", "\\boxed{2}", "I think \\boxed{1}"],  # vote: 1 (right)
            "P-b": ["\\boxed{0}", "\\boxed{-1}", "no box..."],  # 0 vs -1 tie -> 0 (first): wrong
            "P-c": ["\\boxed{7}", "nothing", "\\boxed{x}"],  # nothing parseable: unparseable, wrong
        }
    )
    out = processbench_with_critic(records, critic, SamplingParams(n=3, temperature=0.7, max_tokens=8), batch_size=2)
    assert critic.calls == [2, 1]
    assert [row["pred"] for row in out.predictions] == [1, 0, None]
    assert out.predictions[0]["verdicts"] == [1, 2, 1] and out.predictions[2]["verdicts"] == [None, None, None]
    gsm8k = out.results["subsets"]["gsm8k"]
    assert (gsm8k["acc_err"], gsm8k["acc_ok"], gsm8k["f1"]) == (1.0, 0.0, 0.0)
    assert out.results["subsets"]["math"]["n_unparseable"] == 1
    assert out.results["critic"]["unparseable_samples"] == 4 and out.results["critic"]["truncated_samples"] == 1
    flawed = out.results["analyses"]["flawed_process"]
    assert (flawed["n"], flawed["flagged"], flawed["exact"], flawed["pooled_exact"]) == (1, 1.0, 1.0, 1.0)
    assert list(flawed["subsets"]) == ["gsm8k"]


def test_critic_defaults_to_processbench_budget_and_official_parse_is_selectable() -> None:
    from absl import flags

    from launch import evaluate  # noqa: F401 - defines the flags
    from prm_jax.evaluation.runner import EvaluationConfig

    # ProcessBench generates up to 8192 tokens; a critique cut at 2048 would score as no verdict.
    assert EvaluationConfig(task="processbench", data="d", out="o", critic_model="m").critic_max_tokens == 8192
    assert flags.FLAGS["critic_max_tokens"].default == 8192 and flags.FLAGS["official_parse"].default is False
    records = [ProcessBenchRecord("a", "gsm8k", "P-a", ("s0", "s1", "s2"), 1, True)]
    critic = ScriptedCritic({"P-a": ["\\boxed{\\text{1}}"]})
    params = SamplingParams(n=1, max_tokens=8)
    lenient = processbench_with_critic(records, critic, params)
    official = processbench_with_critic(records, critic, params, official_parse=True)
    assert lenient.predictions[0]["pred"] == 1 and lenient.results["critic"]["parser"] == "lenient"
    # ProcessBench's extract_answer reads "\\text{1" from this box and int() fails: no verdict.
    assert official.predictions[0]["pred"] is None and official.results["critic"]["parser"] == "processbench_official"
    assert official.results["subsets"]["gsm8k"]["n_unparseable"] == 1
