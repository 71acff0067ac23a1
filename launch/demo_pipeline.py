"""The embedded demo: the whole PRM pipeline on a CPU in minutes, in the procedural math world.

    policy SFT (objective=lm on noisy world solutions)
      -> synthesis (sample, grade, MC rollouts, judge, consensus) with the JAX sampler
      -> PRM training (init_from the policy checkpoint: backbone imported, PRM head from the seed)
      -> Orbax -> Hugging Face conversion
      -> evaluation on held-out problems: ProcessBench-format records whose labels are the exact
         checker's first errors, and Best-of-N (prm@N against maj@N and pass@N).

`backend="vllm"` runs generation and scoring through vLLM instead (the optional extra; on a
machine without a GPU, vLLM's CPU build): the policy checkpoint is exported as a Hugging Face
causal LM (`orbax_to_hf(head="lm")`) and served by one `VLLMBackend` engine for synthesis and for the
held-out responses (sampled right after synthesis on either backend, so the policy is released before
PRM training), and `prm_jax.evaluation.runner` scores the exported PRM with `backend="vllm"` (one
`VLLMStepScorer` engine per evaluation: ProcessBench, Best-of-N). Three engines in all; the
`vllm` section sizes them (`kv_cache_gib` for a CPU).

An application of the library, so it sits in the launch layer, above `data_pipeline` (the math
world is one of its data sources) and `prm_jax`. In this world the LLM judge's role is played by
the exact step checker (`data_pipeline.math_world.CheckerJudge`), wrong at `judge.error_rate`;
everything else is the production code path. `launch/demo.py` is the entry point;
`default_config` (also `configs/demo.py`) the default sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import re
import time
from pathlib import Path

import ml_collections

from data_pipeline import math_world
from prm_jax.config_checks import ConfigChecker
from prm_jax.files import atomic_file, atomic_write_lines
from prm_jax.tiny_tokenizer import TINY_VOCAB_SIZE


def default_config() -> ml_collections.ConfigDict:
    """The default sizes: the whole run in about five minutes on 2 CPU cores."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.progress = True
    c.world = ml_collections.ConfigDict(dict(min_ops=2, max_ops=3, operand_min=1, operand_max=9, max_value=9))
    # The policy: a small Qwen2-architecture causal LM over the tiny tokenizer's vocabulary.
    c.policy = ml_collections.ConfigDict()
    c.policy.arch = ml_collections.ConfigDict(
        dict(
            vocab_size=TINY_VOCAB_SIZE,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=512,
        )
    )
    # Noisy solutions: 60% of them carry one mistake (a wrong carry, off by ten; propagated, or
    # undone by the next step a quarter of the time: the right answer through a wrong step).
    # "off_by_one" adds in-range slips, which a PRM this small does not learn to see (README).
    # The policy learns the arithmetic abruptly, after a number of examples that varies with the
    # seed and the CPU's floating point (about 12k-16k solutions here; at a 70% error rate 16k-24k),
    # so the budget (32k solutions: 2,000 steps of 16 rows) is about twice that: the band in the
    # README holds on every CPU class and seed measured (bench/demo_band.py).
    c.sft = ml_collections.ConfigDict(
        dict(
            num_problems=4000,
            error_rate=0.6,
            mistakes="carry",
            steps=2000,
            rows=16,
            seq_len=112,
            lr=3e-3,
            warmup=20,
            log_every=50,
        )
    )
    # Responses and MC rollouts are sampled at 0.7 (Qwen2.5-Math's usual setting): the policy's
    # mistakes are then mostly the ones it learnt, plus its own arithmetic slips.
    c.synth = ml_collections.ConfigDict(
        dict(num_problems=512, n=4, k=4, temperature=0.7, max_tokens=40, mc_temperature=0.7, mc_max_tokens=32)
    )
    c.judge = ml_collections.ConfigDict(dict(error_rate=0.1))
    c.prm = ml_collections.ConfigDict(dict(steps=400, rows=8, seq_len=112, lr=1e-3, warmup=20, log_every=50))
    c.eval = ml_collections.ConfigDict(dict(num_problems=256, n=4, temperature=0.7, max_tokens=40))
    # "jax": the JAX sampler and scorer in this process; "vllm": vLLM engines for the policy (synthesis
    # and held-out responses) and for scoring the exported PRM. kv_cache_gib sizes each engine's KV
    # cache (vLLM's CPU build reads gpu_memory_utilization as a share of host memory; on a GPU set
    # kv_cache_gib=0 to use gpu_memory_utilization); enforce_eager skips compilation (a faster start,
    # slower steps) in every engine.
    c.backend = "jax"
    c.vllm = ml_collections.ConfigDict(dict(kv_cache_gib=0.25, gpu_memory_utilization=0.9, enforce_eager=True))
    return c


# Fields that must be integers >= 1, by section.
_POSITIVE_INTS = {
    "sft": ("num_problems", "steps", "rows", "seq_len", "log_every", "warmup"),
    "synth": ("num_problems", "n", "k", "max_tokens", "mc_max_tokens"),
    "prm": ("steps", "rows", "seq_len", "log_every", "warmup"),
    "eval": ("num_problems", "n", "max_tokens"),
    "world": ("min_ops", "max_ops", "operand_min", "operand_max"),
}
_RATES = ("sft.error_rate", "judge.error_rate")
_TEMPERATURES = ("synth.temperature", "synth.mc_temperature", "eval.temperature")
BACKENDS = ("jax", "vllm")


def validate_config(config: ml_collections.ConfigDict) -> list[str]:
    """Every problem of a demo config, one line each ([] when valid); nothing is read or written.

    The two trainer configs the demo builds are checked too, their data paths aside (the run
    writes those files).
    """
    c = ConfigChecker(config)
    c.integer("seed", 0)
    for section, names in _POSITIVE_INTS.items():
        for name in names:
            c.integer(f"{section}.{name}", 1)
    for dotted in _RATES:
        c.number(dotted, 0.0, 1.0)
    for dotted in _TEMPERATURES:
        c.number(dotted, 0.0)
    c.choice("backend", BACKENDS)
    c.number("vllm.kv_cache_gib", 0.0)
    c.number("vllm.gpu_memory_utilization", 0.0, 1.0, low_open=True)
    c.boolean("vllm.enforce_eager")
    w = config.world
    if not c.problems and (w.min_ops > w.max_ops or w.operand_min > w.operand_max):
        c.problems.append(f"--config.world: need min_ops <= max_ops and operand_min <= operand_max, got {w.to_dict()}")
    if w.max_value is not None and (not isinstance(w.max_value, int) or w.max_value < 0):
        c.add("world.max_value", w.max_value, "must be an integer >= 0 (or None: no cap)")
    try:
        mistake_kinds(config.sft.mistakes)
    except ValueError as error:
        c.problems.append(f"--config.{error}")
    if c.problems:  # the trainer configs below are built from these fields
        return c.problems
    from prm_jax.training.config import validate as validate_training

    paths = ("--config.data.train_file", "--config.data.tokenizer_dir", "--config.model.init_from")
    for stage, build in (("sft", sft_train_config), ("prm", lambda c, f, t: prm_train_config(c, f, t, Path("")))):
        for problem in validate_training(build(config, Path(""), Path(""))):
            if problem.startswith(paths):
                continue
            for trainer_field, demo_field in _TRAINER_FIELDS.items():  # name the flag the user set
                problem = re.sub(
                    rf"(?<![\w.])(--config\.)?{re.escape(trainer_field)}(?=[=<])",
                    f"--config.{stage}.{demo_field}",
                    problem,
                )
            c.problems.append(f"{stage} stage: {problem}")
    return c.problems


# The demo's stage fields as the trainer config names them (see _trainer_config).
_TRAINER_FIELDS = {
    "optimizer.learning_rate": "lr",
    "optimizer.warmup_steps": "warmup",
    "train.num_steps": "steps",
    "train.global_batch_rows": "rows",
    "data.seq_len": "seq_len",
    "train.log_every": "log_every",
}


def world_kwargs(config: ml_collections.ConfigDict) -> dict:
    """The `math_world.generate_problems` keywords of `config.world` (max_value 0 or None: no cap)."""
    w = config.world
    return dict(
        min_ops=int(w.min_ops),
        max_ops=int(w.max_ops),
        operand_min=int(w.operand_min),
        operand_max=int(w.operand_max),
        max_value=int(w.max_value) if w.max_value else None,
    )


def _split_of(text: str) -> str:
    """A problem's split by a stable hash of its text: 1/8 held-out, 1/8 synthesis, the rest SFT,
    so the splits are disjoint and each one's problems do not depend on the others' sizes."""
    bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 8
    return "eval" if bucket == 0 else "synth" if bucket == 1 else "sft"


def make_splits(config: ml_collections.ConfigDict) -> dict[str, list[math_world.WorldProblem]]:
    """Disjoint problem sets (by text): SFT, synthesis, held-out evaluation."""
    seed = int(config.seed)
    kw = world_kwargs(config)
    splits = {}
    for offset, name, count in (
        (1, "sft", config.sft.num_problems),
        (2, "synth", config.synth.num_problems),
        (3, "eval", config.eval.num_problems),
    ):
        count, chosen, batch = int(count), [], 0
        while len(chosen) < count:
            problems = math_world.generate_problems(count * 4, seed * 1000 + offset * 100 + batch, prefix=name, **kw)
            chosen += [p for p in problems if _split_of(p.text) == name]
            batch += 1
            if batch > 50:
                raise ValueError(f"could not draw {count} {name} problems from this world")
        splits[name] = chosen[:count]
    return splits


def mistake_kinds(spec: str) -> tuple[str, ...]:
    """`sft.mistakes` ("carry" or "carry,off_by_one", ...) as math_world mistake kinds.

    A kind listed twice is drawn twice as often.
    """
    kinds = tuple(k.strip() for k in str(spec).split(",") if k.strip())
    unknown = [k for k in kinds if k not in math_world.MISTAKES]
    if not kinds or unknown:
        raise ValueError(f"sft.mistakes={spec!r}: expected a comma-separated subset of {math_world.MISTAKES}")
    return kinds


def write_sft_data(
    path: Path, problems, *, error_rate: float, seed: int, mistakes: tuple[str, ...] = math_world.MISTAKES
) -> Path:
    """SFT records `{id, prompt, completion}`: world solutions with deliberate mistakes."""
    rng = random.Random(seed)
    records = (
        {
            "id": p.id,
            "prompt": p.text,
            "completion": "\n\n".join(math_world.noisy_solution(p, rng, error_rate, mistakes)),
        }
        for p in problems
    )
    atomic_write_lines(path, map(json.dumps, records))
    return path


def _trainer_config(
    config: ml_collections.ConfigDict, stage: str, train_file: Path, tokenizer_dir: Path
) -> ml_collections.ConfigDict:
    """A fp32 single-checkpoint trainer config from the demo's `stage` section ("sft" or "prm")."""
    from prm_jax.training.config import default_config

    section = config[stage]
    c = default_config()
    c.seed = int(config.seed)
    c.model.dtype = "float32"
    c.model.remat_policy = "none"
    c.data.train_file = str(train_file)
    c.data.tokenizer_dir = str(tokenizer_dir)
    c.data.seq_len = int(section.seq_len)
    c.train.num_steps = int(section.steps)
    c.train.global_batch_rows = int(section.rows)
    c.train.log_every = int(section.log_every)
    c.train.progress = bool(config.progress)
    c.train.eval_every = int(section.steps) * 10  # no eval file: never
    c.optimizer.learning_rate = float(section.lr)
    c.optimizer.warmup_steps = int(section.warmup)
    c.optimizer.b2 = 0.99
    c.optimizer.weight_decay = 0.0
    c.checkpoint.save_every = int(section.steps)
    c.checkpoint.max_to_keep = 1
    c.checkpoint.async_save = False
    return c


def sft_train_config(
    config: ml_collections.ConfigDict, train_file: Path, tokenizer_dir: Path
) -> ml_collections.ConfigDict:
    """The policy's causal-LM fine-tuning from scratch, architecture from `config.policy.arch`."""
    c = _trainer_config(config, "sft", train_file, tokenizer_dir)
    c.objective = "lm"
    c.model.arch.update(dict(config.policy.arch))
    return c


def mc_checker_agreement(items) -> dict:
    """How often MC's first error (from hard labels) equals the exact checker's.

    Args:
        items: `(problem: WorldProblem, steps, mc_first_error)` for every MC-labelled response.

    Returns:
        The agreement rate and, for the erroneous responses, how MC's verdict compares.
    """
    total = agree = too_early = too_late = 0
    matrix: dict[str, dict[str, int]] = {}
    for problem, steps, mc_first in items:
        truth = math_world.first_error(problem, steps)
        total += 1
        agree += mc_first == truth
        if mc_first != truth:
            t = len(steps) if truth == -1 else truth
            m = len(steps) if mc_first == -1 else mc_first
            too_early += m < t
            too_late += m > t
        row = matrix.setdefault(str(truth), {})
        row[str(mc_first)] = row.get(str(mc_first), 0) + 1
    return {
        "responses": total,
        "agreement": agree / total if total else None,
        "mc_too_early": too_early,
        "mc_too_late": too_late,
        "matrix_rows_checker_cols_mc": {k: dict(sorted(v.items())) for k, v in sorted(matrix.items())},
    }


def synthesis_figures(synth_dir: Path) -> dict:
    """MC-vs-checker agreement, judge-vs-checker agreement and the consensus keep rate."""
    from data_pipeline.schemas import GradeRecord, JudgeRecord, MCRecord
    from data_pipeline.shards import Layout, Shard, read_json, read_records_if_exists

    layout = Layout(Path(synth_dir))
    grades = {g.id: g for g in read_records_if_exists(layout.records("grade", Shard()), GradeRecord.from_json)}
    mcs = read_records_if_exists(layout.records("mc", Shard()), MCRecord.from_json)
    judges = read_records_if_exists(layout.records("judge", Shard()), JudgeRecord.from_json)
    items = []
    for mc in mcs:
        if mc.status != "labelled" or mc.first_error is None:
            continue
        g = grades[mc.id]
        items.append((math_world.parse_problem(g.problem, g.problem_id), list(g.steps), mc.first_error))
    mc_figures = mc_checker_agreement(items)
    judge_agree = judge_total = 0
    for j in judges:
        if j.status != "judged" or j.first_error is None:
            continue
        g = grades[j.id]
        judge_total += 1
        judge_agree += j.first_error == math_world.first_error(math_world.parse_problem(g.problem), list(g.steps))
    summary = read_json(layout.summary)
    return {
        "mc_first_error_agreement": mc_figures["agreement"],
        "mc_vs_checker": mc_figures,
        "judge_first_error_agreement": judge_agree / judge_total if judge_total else None,
        "consensus_keep_rate": summary["keep_rate"],
        "synth_policy_accuracy": sum(g.correct for g in grades.values()) / len(grades) if grades else None,
        "synth_summary": {k: summary[k] for k in ("keep_rate",) if k in summary},
    }


# ---------------------------------------------------------------------------- the stages

# The JAX sampler's batch shape, for the policy in synthesis and in evaluation alike.
_SAMPLER = dict(max_batch_rows=64, chunk_size=8, length_bucket=64)


def vllm_engine(config: ml_collections.ConfigDict):
    """The policy engine's `VLLMEngineConfig` (fp32, as the JAX path) from the demo's `vllm` section."""
    from prm_jax.generation.types import VLLMEngineConfig

    return VLLMEngineConfig(
        dtype="float32",
        kv_cache_gib=float(config.vllm.kv_cache_gib),
        gpu_memory_utilization=float(config.vllm.gpu_memory_utilization),
        enforce_eager=bool(config.vllm.enforce_eager),
    )


def synth_config(
    config: ml_collections.ConfigDict, problems_path: Path, policy_dir: Path, tokenizer_dir: Path
) -> ml_collections.ConfigDict:
    """The synthesis config of the demo's `synth` section in fp32, on the demo's backend (`policy_dir`
    is the Orbax checkpoint for "jax", the exported HF directory for "vllm")."""
    from data_pipeline.config import default_config

    c = default_config()
    c.seed = int(config.seed)
    c.problems.path = str(problems_path)
    for section in (c.policy, c.judge):
        section.backend = "jax"
        section.dtype = "float32"
        section.sampler.update(_SAMPLER)
    if config.backend == "vllm":
        c.policy.backend = "vllm"
        c.policy.vllm.update(dataclasses.asdict(vllm_engine(config)))
    c.policy.model_path = str(policy_dir)
    c.policy.tokenizer_path = str(tokenizer_dir)
    c.judge.model_path = "math_world.CheckerJudge"  # recorded in run_config.json: the checker judges
    c.judge.tokenizer_path = str(tokenizer_dir)
    c.sample.n = int(config.synth.n)
    c.sample.temperature = float(config.synth.temperature)
    c.sample.max_tokens = int(config.synth.max_tokens)
    c.sample.batch_size = 64
    c.mc.k = int(config.synth.k)
    c.mc.temperature = float(config.synth.mc_temperature)
    c.mc.max_tokens = int(config.synth.mc_max_tokens)
    c.mc.batch_responses = 64
    c.judge.max_tokens = 32
    c.judge.batch_size = 64
    c.grading.workers = 1
    c.grading.timeout_s = 10.0
    c.io.progress = bool(config.progress)
    return c


def prm_train_config(config: ml_collections.ConfigDict, train_file: Path, tokenizer_dir: Path, init_from: Path):
    """PRM training from the policy checkpoint `init_from` (backbone imported, head initialised)."""
    c = _trainer_config(config, "prm", train_file, tokenizer_dir)
    c.objective = "prm"
    c.model.init_from = str(init_from)
    return c


def evaluation_records(problems, sampler, config: ml_collections.ConfigDict) -> tuple[list[dict], list[dict], dict]:
    """Held-out responses of the policy as evaluation records, and figures about them.

    Returns:
        ProcessBench records (label = the checker's first error), Best-of-N records, and the
        policy's accuracy on them with each erroneous record's error kind
        (`math_world.error_kind`) by record id.
    """
    from data_pipeline.sample import sample_problems
    from data_pipeline.schemas import Problem
    from prm_jax.tokenization import SYSTEM_PROMPT

    items = [Problem(id=p.id, problem=p.text, answer=str(p.answer), source="demo") for p in problems]
    samples = sample_problems(
        sampler,
        items,
        n=int(config.eval.n),
        temperature=float(config.eval.temperature),
        top_p=1.0,
        max_tokens=int(config.eval.max_tokens),
        system_prompt=SYSTEM_PROMPT,
        base_seed=int(config.seed) + 7,
    )
    pb, bon, kinds = [], [], {}
    correct = total = process_ok = 0
    max_value = world_kwargs(config)["max_value"]
    for p, s in zip(problems, samples):
        responses = []
        for r in s.responses:
            steps = list(r.steps) or [r.text.strip() or "(empty)"]
            label = math_world.first_error(p, steps)
            right = r.answer is not None and r.answer.strip() == str(p.answer)
            if label != -1:
                kinds[f"{p.id}#{r.index}"] = math_world.error_kind(p, steps, label, max_value)
            pb.append(
                {
                    "id": f"{p.id}#{r.index}",
                    "generator": "demo-policy",
                    "problem": p.text,
                    "steps": steps,
                    "final_answer_correct": right,
                    "label": label,
                }
            )
            responses.append({"steps": steps, "correct": right, "final_answer": r.answer})
            correct += right
            process_ok += label == -1
            total += 1
        bon.append({"id": p.id, "problem": p.text, "answer": str(p.answer), "responses": responses})
    return (
        pb,
        bon,
        {
            "policy_accuracy": correct / total,
            "policy_process_accuracy": process_ok / total,
            "eval_responses": total,
            "error_kinds": kinds,
        },
    )


def detection_by_kind(predictions, kinds: dict[str, str]) -> dict[str, dict]:
    """For each kind of first error: how many held-out records have it and the share the PRM located.

    Args:
        predictions: ProcessBench prediction rows with id/label/pred.
        kinds: The error kind of each erroneous record, by id.
    """
    table: dict[str, dict] = {}
    for row in predictions:
        if row["label"] == -1:
            continue
        entry = table.setdefault(kinds[row["id"]], {"records": 0, "found": 0})
        entry["records"] += 1
        entry["found"] += row["pred"] == row["label"]
    return {
        kind: {**entry, "rate": entry["found"] / entry["records"]}
        for kind, entry in sorted(table.items(), key=lambda item: -item[1]["records"])
    }


# ---------------------------------------------------------------------------- the whole run

JUDGE_NOTE = (
    "In this world the LLM judge's role is played by the exact step checker (wrong at an error rate "
    "of {rate:g}, naming another step at random); MC labels and PRM predictions are scored against "
    "the same checker."
)


class _Clock:
    """Stage timings, with a `[  12s] stage: what` line when each stage starts and ends."""

    def __init__(self, say):
        self.say = say
        self.start = time.monotonic()
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str, what: str):
        started = time.monotonic()
        self.say(f"[{started - self.start:6.0f}s] {name}: {what}")
        yield
        self.timings[name] = round(time.monotonic() - started, 1)
        self.say(f"[{time.monotonic() - self.start:6.0f}s] {name} done in {self.timings[name]:.0f}s")


def _last_step_dir(run_dir: Path, steps: int) -> Path:
    path = run_dir / "checkpoints" / str(steps)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} missing after training")
    return path


def run_demo(config: ml_collections.ConfigDict, workdir: str | Path, *, say=print) -> dict:
    """Run every stage into `workdir`; returns (and writes) `results.json`'s content.

    Rerunning with the same workdir and config resumes: the trainers resume from their
    checkpoints and synthesis from its shards; the evaluation is recomputed.
    """
    from transformers import AutoTokenizer

    from data_pipeline.pipeline import run as run_synthesis
    from prm_jax.conversion.hf_checkpoint import orbax_to_hf
    from prm_jax.evaluation.runner import EvaluationConfig, run_evaluation
    from prm_jax.generation.jax_sampler import JaxSampler, SamplerConfig
    from prm_jax.tiny_tokenizer import build_tiny_tokenizer
    from prm_jax.training.run import train_from_config
    from prm_jax.weights import load_model

    problems = validate_config(config)
    if problems:
        raise ValueError(f"invalid demo config ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
    W = Path(workdir)
    W.mkdir(parents=True, exist_ok=True)
    clock = _Clock(say)
    say(JUDGE_NOTE.format(rate=float(config.judge.error_rate)))

    with clock.stage("setup", "tokenizer and world problems"):
        tokenizer_dir = W / "tokenizer"
        if not (tokenizer_dir / "tokenizer.json").exists():
            build_tiny_tokenizer(tokenizer_dir)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        splits = make_splits(config)
        sft_file = write_sft_data(
            W / "data" / "sft.jsonl",
            splits["sft"],
            error_rate=float(config.sft.error_rate),
            seed=int(config.seed),
            mistakes=mistake_kinds(config.sft.mistakes),
        )
        synth_problems = math_world.write_problems(W / "data" / "synth_problems.jsonl", splits["synth"])
        math_world.write_problems(W / "data" / "eval_problems.jsonl", splits["eval"])
        say(
            f"  world: {len(splits['sft'])} SFT / {len(splits['synth'])} synthesis / {len(splits['eval'])} held-out "
            f"problems, e.g. {splits['eval'][0].text!r}"
        )

    with clock.stage(
        "policy_sft",
        f"causal-LM fine-tuning of the policy, {config.sft.steps} steps on noisy solutions "
        f"(error rate {config.sft.error_rate:g})",
    ):
        train_from_config(sft_train_config(config, sft_file, tokenizer_dir), W / "policy")
        policy_dir = _last_step_dir(W / "policy", int(config.sft.steps))

    use_vllm = config.backend == "vllm"
    if use_vllm:
        from prm_jax.generation.vllm_backend import VLLMBackend

        with clock.stage("policy_export", "Orbax -> Hugging Face causal LM (for vLLM)"):
            from prm_jax.conversion.hf_checkpoint import orbax_to_hf

            policy_model = orbax_to_hf(
                policy_dir, W / "policy_hf", head="lm", dtype="float32", tokenizer_dir=tokenizer_dir, overwrite=True
            )
        with clock.stage("policy_engine", "a vLLM engine for the policy"):
            sampler = VLLMBackend(str(policy_model), engine=vllm_engine(config), seed=int(config.seed))
    else:
        policy_model = policy_dir
        sampler = JaxSampler(
            load_model(policy_dir, head="lm", dtype="float32"), tokenizer, config=SamplerConfig(**_SAMPLER)
        )
    backends = {"synthesis": type(sampler).__name__}

    with clock.stage("synthesis", f"sample N={config.synth.n}, grade, MC k={config.synth.k}, checker judge, consensus"):
        judge = math_world.CheckerJudge(tokenizer, error_rate=float(config.judge.error_rate), seed=int(config.seed))
        run_synthesis(
            synth_config(config, synth_problems, policy_model, tokenizer_dir), W / "synth", policy=sampler, judge=judge
        )
        figures = synthesis_figures(W / "synth")
        say(
            f"  policy accuracy {_pct(figures['synth_policy_accuracy'])}, MC-vs-checker first-error agreement "
            f"{_pct(figures['mc_first_error_agreement'])}, consensus keep rate {_pct(figures['consensus_keep_rate'])}"
        )

    # The policy's last use: its model (a vLLM engine's processes and memory) is released before training.
    with clock.stage("eval_sampling", f"held-out responses, N={config.eval.n} per problem"):
        held_out = evaluation_records(splits["eval"], sampler, config)
    backends["eval_sampling"] = type(sampler).__name__
    if use_vllm:
        sampler.close()  # an engine's processes would otherwise outlive `del` until exit
    del sampler

    with clock.stage("prm_train", f"PRM training from the policy backbone, {config.prm.steps} steps"):
        train_from_config(
            prm_train_config(config, W / "synth" / "consensus" / "prm_train.jsonl", tokenizer_dir, policy_dir),
            W / "prm",
        )
        prm_dir = _last_step_dir(W / "prm", int(config.prm.steps))

    with clock.stage("convert", "Orbax -> Hugging Face (Qwen2.5-Math-PRM layout)"):
        hf_dir = orbax_to_hf(prm_dir, W / "prm_hf", dtype="float32", tokenizer_dir=tokenizer_dir, overwrite=True)

    with clock.stage("evaluate", f"held-out ProcessBench-format records and Best-of-{config.eval.n}"):
        pb, bon, policy_figures = held_out
        atomic_write_lines(W / "eval" / "processbench" / "world.jsonl", map(json.dumps, pb))
        atomic_write_lines(W / "eval" / "bon.jsonl", map(json.dumps, bon))
        common = dict(model=str(hf_dir), dtype="float32", param_dtype="float32", overwrite=True)
        if use_vllm:
            engine = vllm_engine(config)  # the policy's engine settings, for the scoring engines too
            common.update(
                backend="vllm",
                kv_cache_gib=engine.kv_cache_gib,
                gpu_memory_utilization=engine.gpu_memory_utilization,
                enforce_eager=engine.enforce_eager,
                vllm_dtype=engine.dtype,
            )
        pb_out = run_evaluation(
            EvaluationConfig(
                task="processbench",
                data=str(W / "eval" / "processbench"),
                out=str(W / "eval" / "processbench_results"),
                **common,
            )
        )
        bon_out = run_evaluation(
            EvaluationConfig(
                task="bon", data=str(W / "eval" / "bon.jsonl"), out=str(W / "eval" / "bon_results"), **common
            )
        )

    with (W / "eval" / "processbench_results" / "predictions.jsonl").open() as f:
        by_kind = detection_by_kind((json.loads(line) for line in f), policy_figures["error_kinds"])
    pb_world = pb_out.results["subsets"]["world"]
    n_err, n_ok = pb_world["n_err"], pb_world["n_ok"]
    average = bon_out.results["average"]
    backends.update(processbench=pb_out.results["run"]["backend"], bon=bon_out.results["run"]["backend"])
    results = {
        "seed": int(config.seed),
        "judge": JUDGE_NOTE.format(rate=float(config.judge.error_rate)),
        "policy_accuracy": policy_figures["policy_accuracy"],
        "policy_process_accuracy": policy_figures["policy_process_accuracy"],
        "synth_policy_accuracy": figures["synth_policy_accuracy"],
        "mc_first_error_agreement": figures["mc_first_error_agreement"],
        "judge_first_error_agreement": figures["judge_first_error_agreement"],
        "consensus_keep_rate": figures["consensus_keep_rate"],
        "prm_f1": pb_world["f1"],
        "prm_acc_err": pb_world["acc_err"],
        "prm_acc_ok": pb_world["acc_ok"],
        "baseline_f1": baseline_f1(n_err, n_ok),
        "prm_detection_by_error_kind": by_kind,
        "eval_records": {"n_err": n_err, "n_ok": n_ok},
        "bon": {
            "n": int(config.eval.n),
            "prm": average["prm_at_n"]["product"],
            "prm_by_aggregation": average["prm_at_n"],
            "maj": average["maj_at_n"],
            "pass": average["pass_at_n"],
            "problems": average["n_problems"],
        },
        "mc_vs_checker": figures["mc_vs_checker"],
        # What generated and scored: the sampler's class (synthesis, held-out responses) and the
        # evaluation runner's backend (ProcessBench and Best-of-N scoring).
        "backends": backends,
        "config": config.to_dict(),
    }
    from prm_jax.evaluation.report import json_safe, write_json

    results = json_safe(results)  # NaN (an empty class) -> null, as in the file
    write_json(W / "results.json", results)
    write_json(W / "timings.json", clock.timings | {"total": round(time.monotonic() - clock.start, 1)})
    plots = plot_results(results, W)
    say(results_table(results, clock.timings))
    say(f"wrote {W / 'results.json'}, plots {', '.join(p.name for p in plots)}; timings in {W / 'timings.json'}")
    return results


def baseline_f1(n_err: int, n_ok: int) -> float:
    """F1 of always predicting -1 ("no error"): acc_err 0, acc_ok 1, so 0 whenever both classes exist."""
    from prm_jax.metrics import step_error_scores

    return float(step_error_scores([(-1, 0)] * n_err + [(-1, -1)] * n_ok).f1)


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def results_table(results: dict, timings: dict | None = None) -> str:
    """The results as the table printed at the end of a run."""
    bon = results["bon"]
    rows = [
        ("policy accuracy (held-out, answers)", f"{results['policy_accuracy']:.1%}"),
        ("MC first error == checker", _pct(results["mc_first_error_agreement"])),
        ("judge (checker) first error == checker", _pct(results["judge_first_error_agreement"])),
        ("consensus keep rate", f"{results['consensus_keep_rate']:.1%}"),
        (
            "PRM F1 (held-out, checker labels)",
            f"{results['prm_f1']:.3f}  (acc_err {_pct(results['prm_acc_err'])}, acc_ok {_pct(results['prm_acc_ok'])})",
        ),
        ("baseline F1 (always -1)", f"{results['baseline_f1']:.3f}"),
        (
            "PRM finds the first error, by kind",
            ", ".join(
                f"{kind} {v['found']}/{v['records']}"
                for kind, v in results.get("prm_detection_by_error_kind", {}).items()
            ),
        ),
        (f"prm@{bon['n']} (product)", f"{bon['prm']:.1%}"),
        (f"maj@{bon['n']}", f"{bon['maj']:.1%}"),
        (f"pass@{bon['n']}", f"{bon['pass']:.1%}"),
    ]
    if timings:
        rows.append(("timings (s)", ", ".join(f"{k} {v:.0f}" for k, v in timings.items())))
    width = max(len(k) for k, _ in rows)
    lines = ["", "=" * (width + 40), "prm-jax embedded demo: results", "-" * (width + 40)]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines.append("=" * (width + 40))
    return "\n".join(lines)


def plot_results(results: dict, workdir: Path) -> list[Path]:
    """`results.png` (synthesis and ProcessBench-style figures) and `bon.png` in `workdir`."""
    n = results["bon"]["n"]
    figures = [
        ("policy acc", results["policy_accuracy"], "#888"),
        ("MC==checker", results["mc_first_error_agreement"], "#4c72b0"),
        ("keep rate", results["consensus_keep_rate"], "#55a868"),
        ("PRM F1", results["prm_f1"], "#c44e52"),
        ("baseline F1", results["baseline_f1"], "#bbb"),
    ]
    bon = [
        (f"maj@{n}", results["bon"]["maj"], "#888"),
        (f"prm@{n}", results["bon"]["prm"], "#c44e52"),
        (f"pass@{n}", results["bon"]["pass"], "#55a868"),
    ]
    return [
        _bar_chart(
            workdir / "results.png", figures, "Embedded demo: synthesis and ProcessBench-style figures", (7, 3.5)
        ),
        _bar_chart(workdir / "bon.png", bon, f"Best-of-{n} on held-out problems", (5, 3.5)),
    ]


def _bar_chart(path: Path, bars: list[tuple[str, float | None, str]], title: str, size: tuple[float, float]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [0.0 if v is None else v for _, v, _ in bars]
    fig, ax = plt.subplots(figsize=size)
    ax.bar([name for name, _, _ in bars], values, color=[color for _, _, color in bars])
    ax.set_ylim(0, 1)
    for i, v in enumerate(values):
        ax.text(i, v + 0.02, f"{v:.2f}", ha="center")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path
