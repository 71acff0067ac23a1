"""End to end on vLLM: `launch.synthesize` with `policy.backend=vllm` (the judge shares the engine).

The same launcher runs as in `test_synthesis_e2e` (subprocesses, SIGKILL mid-MC, resume), with
vLLM serving the policy and the judge (an empty `judge.model_path` makes the judge share the
policy's backend: one engine per run). The model is a tiny Qwen2.5-shaped LM (head_dim 64, the real
Qwen2.5 tokenizer) whose weights make it a bigram chain: attention and MLP outputs are zeroed, so
the next token depends on the last one only, and the LM head sends

    "\\n" -> "Step" -> "\\n\\n" -> ("Step" | "\\\\") ; "\\\\" -> "boxed" -> "{" -> ("1" | "2") -> "}" -> <|im_end|>

with the two branches equally likely. Responses therefore have several steps and end with
`\\boxed{1}` or `\\boxed{2}`: the rollouts of a prefix are right or wrong by chance, so the mc
stage really labels steps 1 and 0, rolls later prefixes out after a positive step, and stops at a
negative one. The logit gaps are large (32 against 0), so float noise cannot flip a sample: only
the seeds decide.

Every run goes through a wrapper of the launcher that logs each engine start and each request the
engine receives (prompt token ids, `n`, seed) with its completions, so the tests check what vLLM
was asked, not only what the stages wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from test_synthesis_e2e import KILL_POINT, LAUNCHER, SCHEMAS, assert_same_run, kill_at_the_mc_kill_point, stage_records
from vllm_assets import require_vllm

from data_pipeline.ids import response_id, stable_seed
from data_pipeline.schemas import ErrorRecord
from data_pipeline.shards import Layout, Shard
from data_pipeline.solutions import STEP_BREAK, final_answer, policy_prompt
from prm_jax.critique import critique_messages
from prm_jax.data.records import read_prm_records
from prm_jax.jsonl import read_records
from prm_jax.tokenization import SYSTEM_PROMPT, render_chat

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
NUM_PROBLEMS, N, K = 6, 2, 2  # configs/synth_tiny.py: sample.n = 2, mc.k = 2
MAX_MODEL_LEN = 1024

# The real launcher, with the engine's requests logged to $SYNTH_TEST_LOG (one JSON line per event)
# and, under SYNTH_TEST_KILL=1, a kill point: once the mc stage has written 2 records (one rolled
# out) it writes half of the next line and waits to be SIGKILLed by the test.
WRAPPER = (
    """
import atexit, json, os, sys, time
LOG = os.environ["SYNTH_TEST_LOG"]
state = {"stage": None}
def log(event):
    with open(LOG, "a") as f:
        f.write(json.dumps(event) + "\\n")
atexit.register(lambda: log({"event": "exit", "vllm_imported": "vllm" in sys.modules}))
from data_pipeline import pipeline
for name, runner in list(pipeline._RUNNERS.items()):
    def staged(ctx, _name=name, _runner=runner):
        state["stage"] = _name
        return _runner(ctx)
    pipeline._RUNNERS[name] = staged
from prm_jax.generation import vllm_backend
_init = vllm_backend.VLLMBackend.__init__
def init(self, *args, **kwargs):
    started = time.monotonic()
    _init(self, *args, **kwargs)
    log({"event": "engine", "stage": state["stage"], "seconds": time.monotonic() - started})
    generate = self.llm.generate
    def logged(prompts, sampling_params, **options):
        requests = [
            {"stage": state["stage"], "prompt_token_ids": [int(t) for t in p["prompt_token_ids"]],
             "n": sp.n, "seed": sp.seed, "max_tokens": sp.max_tokens, "temperature": sp.temperature}
            for p, sp in zip(prompts, sampling_params)
        ]
        outputs = generate(prompts, sampling_params, **options)
        for request, output in zip(requests, outputs):
            children = sorted(output.outputs, key=lambda c: c.index)
            log({"event": "request", **request, "texts": [c.text for c in children]})
        return outputs
    self.llm.generate = logged
vllm_backend.VLLMBackend.__init__ = init
if os.environ.get("SYNTH_TEST_KILL") == "1":
"""
    + textwrap.indent(KILL_POINT, "    ")
    + LAUNCHER
)


def bigram_lm(tokenizer_dir: Path, out: Path) -> Path:
    """The chain of the module doc as an HF directory (fp32 safetensors + the tokenizer)."""
    import shutil

    import torch
    from hf_models import TINY_QWEN2_5, random_causal_lm
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def token(text: str) -> int:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == 1, (text, ids)
        return ids[0]

    backslash, boxed, brace = tokenizer.encode("\\boxed{", add_special_tokens=False)
    eos = token("<|im_end|>")
    chain = {
        token("\n"): [token("Step")],  # the assistant turn opens with "\n"
        token("Step"): [token("\n\n")],
        token("\n\n"): [token("Step"), backslash],
        backslash: [boxed],
        boxed: [brace],
        brace: [token("1"), token("2")],
        token("1"): [token("}")],
        token("2"): [token("}")],
        token("}"): [eos],
    }
    model = random_causal_lm(seed=5, **{**TINY_QWEN2_5, "tie_word_embeddings": False, "max_position_embeddings": 1024})
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream keeps the last token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        embed = model.model.embed_tokens.weight
        for slot, (previous, successors) in enumerate(chain.items()):
            embed[previous] = 0.0
            embed[previous, slot] = 1.0  # normed: 8 (= sqrt(hidden 64)) on this axis
            for successor in successors:
                model.lm_head.weight[successor, slot] = 4.0  # logit 32; every other token 0
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    model.save_pretrained(out, safe_serialization=True)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, out / file.name)
    return out


@pytest.fixture(scope="module")
def assets(qwen_tokenizer_dirs, tmp_path_factory):
    require_vllm()
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("vllm_synth")
    policy = bigram_lm(qwen_tokenizer_dirs["base"], root / "policy_hf")
    problems = root / "problems.jsonl"
    # Golds "1" and "2" alternate: every problem gets right and wrong rollouts.
    problems.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "problem": f"What is {i} + {1 + i % 2} - {i}?", "answer": str(1 + i % 2)}) + "\n"
            for i in range(NUM_PROBLEMS)
        )
    )
    return {"root": root, "policy": policy, "problems": problems, "tokenizer": AutoTokenizer.from_pretrained(policy)}


def command(assets, workdir: Path) -> list[str]:
    return [
        "--config=" + str(REPO / "configs" / "synth_tiny.py"),
        f"--workdir={workdir}",
        f"--config.problems.path={assets['problems']}",
        f"--config.policy.model_path={assets['policy']}",
        "--config.policy.backend=vllm",
        "--config.policy.vllm.kv_cache_gib=0.25",
        "--config.policy.vllm.dtype=float32",
        "--config.policy.vllm.enforce_eager=true",
        f"--config.policy.vllm.max_model_len={MAX_MODEL_LEN}",
        "--config.mc.skip_truncated=False",
        "--config.io.progress=False",
    ]  # judge.model_path stays empty: the judge shares the policy's engine


def environment(log: Path, *, kill: bool = False) -> dict[str, str]:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
        "SYNTH_TEST_LOG": str(log),
        "SYNTH_TEST_KILL": "1" if kill else "0",
    }


def launch(assets, workdir: Path, log: Path) -> list[dict]:
    """Runs the launcher (through the wrapper) to the end; its logged events."""
    result = subprocess.run(
        [sys.executable, "-c", WRAPPER, *command(assets, workdir)],
        cwd=REPO,
        env=environment(log),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return events(log)


def events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def requests(log_events: list[dict], stage: str) -> list[dict]:
    return [e for e in log_events if e["event"] == "request" and e["stage"] == stage]


def snapshot(workdir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(assets):
    workdir = assets["root"] / "reference"
    started = time.monotonic()
    log_events = launch(assets, workdir, assets["root"] / "reference.log")
    print(f"reference run: {time.monotonic() - started:.1f} s; engines: {engine_events(log_events)}")
    return workdir, log_events


def engine_events(log_events: list[dict]) -> list[dict]:
    return [e for e in log_events if e["event"] == "engine"]


def ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def expected_mc_requests(workdir: Path, tokenizer, only: set[str] | None = None) -> Counter:
    """(seed, prompt ids, n) of every prefix the mc records say was rolled out (early stop checked)."""
    grades = stage_records(workdir, "grade")
    expected = Counter()
    for record in stage_records(workdir, "mc").values():
        if only is not None and record.id not in only:
            continue
        assert record.status == "labelled", record
        grade = grades[record.id]
        rolled = [label for label in record.labels if label.rolled_out]
        assert record.labels[: len(rolled)] == tuple(rolled)  # rolled out in order, from step 0
        assert all(label.hard == 1 for label in rolled[:-1])  # nothing rolled out after a negative step
        if rolled and rolled[-1].hard == 0:  # early stop: no label (and no prefix) after it
            assert record.early_stopped and len(record.labels) == len(rolled) and record.first_error == len(rolled) - 1
        else:  # every prefix but the whole response; the last label is the response's own grade
            assert len(rolled) == record.num_steps - 1 and record.labels[-1].hard == int(grade.correct)
        head = policy_prompt(tokenizer, grade.problem, SYSTEM_PROMPT)
        for i in range(len(rolled)):
            prompt = ids(tokenizer, head + STEP_BREAK.join(grade.steps[: i + 1]) + STEP_BREAK)
            expected[(stable_seed(0, "mc", record.id, i), prompt, K)] += 1
    return expected


def key(request: dict) -> tuple:
    return request["seed"], tuple(request["prompt_token_ids"]), request["n"]


def test_every_stage_writes_schema_valid_output_through_vllm(reference) -> None:
    workdir, log_events = reference
    layout = Layout(workdir)
    for stage, schema in SCHEMAS.items():
        assert layout.done(stage, Shard()).exists()
        assert read_records(layout.records(stage, Shard()), schema.from_json), stage  # validated on read
    errors = layout.errors("sample", Shard())
    assert not errors.exists() or read_records(errors, ErrorRecord.from_json) == []
    samples = stage_records(workdir, "sample")
    assert len(samples) == NUM_PROBLEMS and all(len(s.responses) == N for s in samples.values())
    grades = stage_records(workdir, "grade")
    assert len(grades) == NUM_PROBLEMS * N
    assert {"correct", "incorrect"} <= {g.status for g in grades.values()}  # the chain answers 1 or 2
    mc = stage_records(workdir, "mc")
    assert set(mc) == set(grades) and all(r.status == "labelled" for r in mc.values())
    hard = [label.hard for r in mc.values() for label in r.labels if label.rolled_out]
    assert 0 in hard and 1 in hard  # rollouts are right and wrong by chance: real labels both ways
    assert any(r.early_stopped for r in mc.values())
    assert any(sum(label.rolled_out for label in r.labels) > 1 for r in mc.values())  # prefixes past step 0
    judged = stage_records(workdir, "judge")
    assert set(judged) == set(grades) and all(r.status == "judged" for r in judged.values())
    # Greedy judge on the chain: "Step\n\n\boxed{1}" (ties go to the lower token id), verdict step 1.
    assert {r.first_error for r in judged.values()} == {1}
    summary = json.loads(layout.summary.read_text())
    assert summary["counts"]["consensus"]["candidates"] == NUM_PROBLEMS * N
    assert summary["mc_compute"]["prefixes_run"] == sum(r.cost.prefixes for r in mc.values())
    agree = [r for r in mc.values() if r.first_error == 1]
    records = list(read_prm_records(layout.final_records))
    assert len(records) == summary["counts"]["consensus"]["kept"] == len(agree) > 0
    assert all(r.labels == (1, 0) for r in records)  # hard labels up to the first error (step 1)
    # One engine for the whole run, started by the first stage that generates; the judge shares it.
    assert [e["stage"] for e in engine_events(log_events)] == ["sample"]
    assert {e["stage"] for e in log_events if e["event"] == "request"} == {"sample", "mc", "judge"}


def test_vllm_requests_are_one_per_problem_prefix_and_response(assets, reference) -> None:
    """What the engine received: sample one n=N request per problem, mc one n=k request per rolled-out
    prefix (the rendered problem + the steps so far, the seed of that prefix, none after a negative
    step), judge one request per response; and the records hold exactly what the engine returned."""
    workdir, log_events = reference
    tokenizer = assets["tokenizer"]
    samples, grades = stage_records(workdir, "sample"), stage_records(workdir, "grade")

    sent = requests(log_events, "sample")
    expected = Counter(
        (stable_seed(0, "sample", s.id), ids(tokenizer, policy_prompt(tokenizer, s.problem, SYSTEM_PROMPT)), N)
        for s in samples.values()
    )
    assert Counter(key(r) for r in sent) == expected
    texts = {r["seed"]: r["texts"] for r in sent}
    for s in samples.values():  # completion j is response j
        assert [r.text for r in s.responses] == texts[s.seed]

    sent = requests(log_events, "mc")
    assert Counter(key(r) for r in sent) == expected_mc_requests(workdir, tokenizer)
    assert all(r["temperature"] == 0.7 and r["max_tokens"] == 12 for r in sent)
    # Each rolled-out label counts the completions of its own prefix that reach the gold.
    outputs = {r["seed"]: r["texts"] for r in sent}
    for record in stage_records(workdir, "mc").values():
        grade = grades[record.id]
        for i, label in enumerate(x for x in record.labels if x.rolled_out):
            prefix = STEP_BREAK.join(grade.steps[: i + 1]) + STEP_BREAK
            completions = outputs[stable_seed(0, "mc", record.id, i)]
            assert label.n == K == len(completions)
            assert label.n_correct == sum(final_answer(prefix + t) == grade.gold for t in completions)

    sent = requests(log_events, "judge")
    expected = Counter(
        (
            stable_seed(0, "judge", g.id),
            ids(tokenizer, render_chat(tokenizer, critique_messages(g.problem, g.steps, "processbench"))),
            1,  # greedy: one completion
        )
        for g in grades.values()
    )
    assert Counter(key(r) for r in sent) == expected


@pytest.mark.redundant
def test_sigkill_during_mc_then_rerun_equals_an_uninterrupted_run(assets, reference) -> None:
    """Redundant with `test_synthesis_e2e.py::test_sigkill_during_mc_then_rerun_equals_an_uninterrupted_run`
    (the same stage runner's resume, killed at the same point, on the JAX backend) and with
    `test_rerun_of_a_finished_run_changes_nothing_and_starts_no_engine` below (vLLM engines started
    only for missing work); this one kills a vLLM engine's process group too (about 110 s)."""
    ref_workdir, ref_events = reference
    workdir = assets["root"] / "killed"
    log = assets["root"] / "killed.log"
    # A session of its own: the SIGKILL takes vLLM's engine process along, as a crashed node would.
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, *command(assets, workdir)],
        cwd=REPO,
        env=environment(log, kill=True),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    partial = kill_at_the_mc_kill_point(proc, workdir, timeout_s=480, group=True)
    finished_before = {json.loads(line)["id"] for line in partial[:-1]}
    assert len(finished_before) < len(stage_records(ref_workdir, "mc"))  # killed before the end of mc

    started = time.monotonic()
    resumed = launch(assets, workdir, assets["root"] / "resumed.log")  # the same command again
    print(f"resumed run: {time.monotonic() - started:.1f} s")

    assert_same_run(workdir, ref_workdir)
    # The resumed run asked vLLM only for what was missing: nothing sampled or graded again, the
    # prefixes of the responses the killed run had not finished, each once, and every judgment.
    assert requests(resumed, "sample") == []
    tokenizer = assets["tokenizer"]
    pending = set(stage_records(workdir, "mc")) - finished_before
    assert Counter(key(r) for r in requests(resumed, "mc")) == expected_mc_requests(workdir, tokenizer, pending)
    assert Counter(key(r) for r in requests(resumed, "judge")) == Counter(key(r) for r in requests(ref_events, "judge"))
    assert [e["stage"] for e in engine_events(resumed)] == ["mc"]


def test_rerun_of_a_finished_run_changes_nothing_and_starts_no_engine(assets, reference) -> None:
    workdir, _ = reference
    before = snapshot(workdir)
    log = assets["root"] / "finished_rerun.log"
    started = time.monotonic()
    log_events = launch(assets, workdir, log)
    print(f"rerun of a finished run: {time.monotonic() - started:.1f} s")
    assert snapshot(workdir) == before  # every file byte for byte (run config, stages, merge, summary)
    assert log_events == [{"event": "exit", "vllm_imported": False}]  # no engine, no request, no vLLM import
    assert response_id("p0", 0) in stage_records(workdir, "mc")
