"""The paper's lessons, measured in the embedded world where every step label is known.

One policy (the demo's SFT) and one synthesis are shared by every arm; the labellers differ:

    policy SFT -> held-out responses (ProcessBench-format records labelled by the exact checker,
                  Best-of-N records)
               -> synthesis with MC k=8 and the checker-as-judge at error rate judge.error_rate
                  (+ an MC k=4 run and judge runs at the other error rates, sharing the samples,
                  grades and rollouts by copying the finished stage files)
               -> one training set per labeller (`data_pipeline.consensus`, its modes, label types
                  and MC thresholds; subsets drawn here for the size-matched and data-efficiency arms)
               -> label quality of every labeller against the checker
               -> per arm and seed: PRM training from the policy backbone (same budget for all), HF
                  export, ProcessBench-format F1 and Best-of-N through `prm_jax.evaluation.runner`
               -> `W/lessons.json` (`launch.lessons_report` turns it into the findings and the report)

Rerunning the same command resumes: every artifact that exists is reused (the trainers resume
from their checkpoints, finished arms from their `figures.json`). `W/lessons.json` is a function
of the seed and the config alone (timings go to `W/timings.json`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_collections

from data_pipeline import math_world
from launch import demo_pipeline as demo
from prm_jax.config_checks import ConfigChecker
from prm_jax.files import atomic_write_lines

SCALES = ("default", "small")

# What `--config.scale=small` changes (the test scale: every stage and kind of arm, tiny sizes and
# shorter sweeps, about two minutes on 2 cores). A field set by a flag keeps the flag's value.
SMALL_SCALE = {
    "sft.num_problems": 240,
    "sft.steps": 80,
    "synth.num_problems": 24,
    "eval.num_problems": 24,
    "prm.steps": 8,
    "prm.log_every": 4,
    "lessons.judge_error_rates": (0.0, 0.1, 0.3),
    "lessons.trained_thresholds": (0.875,),
    "lessons.data_fractions": (0.5,),
}


def default_config() -> ml_collections.ConfigDict:
    """The demo's world, policy and sizes, plus what the lessons add (16 minutes measured on 2 cores)."""
    c = demo.default_config()
    c.scale = "default"
    c.synth.k = 8  # the paper's k; the k=4 arm reuses this run's samples and grades
    c.prm.steps = 200  # every arm's PRM: the same budget (200 steps of 8 rows, about one epoch)
    c.lessons = ml_collections.ConfigDict(
        dict(
            seeds=3,  # PRM training seeds per arm (init of the head, data order)
            small_k=4,
            judge_error_rates=(0.0, 0.1, 0.2, 0.3),  # the noise curve; 0 is the exact checker
            trained_thresholds=(0.5, 0.875),  # MC hard thresholds trained besides 0 (swept in label quality)
            data_fractions=(0.25, 0.5),  # consensus training-set sizes besides the whole set
        )
    )
    return c


def scaled(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the sizes of its scale (fields a flag changed from the default keep their value)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if config.scale != "small":
        return config
    defaults = default_config()
    for dotted, value in SMALL_SCALE.items():
        section, name = dotted.split(".")
        if config[section][name] == defaults[section][name]:
            config[section][name] = value
    return config


def validate_config(config: ml_collections.ConfigDict) -> list[str]:
    """Every problem of a lessons config, one line each ([] when valid)."""
    c = ConfigChecker(config)
    c.choice("scale", SCALES)
    c.integer("lessons.seeds", 2)  # one seed has no spread: every gap would look like a finding
    c.integer("lessons.small_k", 1)
    lessons = config.lessons
    if not c.problems and not 1 <= lessons.small_k < config.synth.k:
        c.add("lessons.small_k", lessons.small_k, f"must be in [1, synth.k={config.synth.k})")
    rates = tuple(lessons.judge_error_rates)
    if not rates or any(not 0 <= r <= 1 for r in rates) or float(config.judge.error_rate) not in rates:
        c.add(
            "lessons.judge_error_rates",
            rates,
            f"must be rates in [0, 1] including judge.error_rate={config.judge.error_rate} (the judge arm)",
        )
    if 0.0 not in rates:
        c.add("lessons.judge_error_rates", rates, "must include 0.0 (the exact checker arm)")
    for name in ("judge_error_rates", "trained_thresholds", "data_fractions"):
        values = [f"{v:g}" for v in lessons[name]]
        if len(set(values)) != len(values):
            c.add(f"lessons.{name}", tuple(lessons[name]), "has a value twice (each names an arm)")
    for t in lessons.trained_thresholds:
        if not 0 < t < 1:
            c.add("lessons.trained_thresholds", tuple(lessons.trained_thresholds), "each must be in (0, 1)")
    for f in lessons.data_fractions:
        if not 0 < f < 1:
            c.add("lessons.data_fractions", tuple(lessons.data_fractions), "each must be in (0, 1)")
    if config.backend != "jax":
        c.add("backend", config.backend, "the lessons run on the JAX backend")
    if c.problems:
        return c.problems
    return demo.validate_config(_demo_view(config))


def _demo_view(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The demo config inside a lessons config (the sections the demo's functions read)."""
    view = ml_collections.ConfigDict(config.to_dict())
    del view["lessons"], view["scale"]
    return view


# Settings that change nothing a run produces (a resume may change them).
_RUNTIME_FIELDS = ("progress",)


def semantic_config(config: ml_collections.ConfigDict) -> dict:
    """The config as lessons.json records it: everything but the runtime fields."""
    values = config.to_dict()
    for name in _RUNTIME_FIELDS:
        values.pop(name, None)
    return json.loads(json.dumps(values))  # tuples as lists, as the file holds them


def check_run_config(config: ml_collections.ConfigDict, W: Path) -> None:
    """Record the run's settings on first use of `W`; refuse a resume with other settings, since every
    cached dataset and arm would then describe a run that did not happen."""
    from prm_jax.files import atomic_write_json
    from prm_jax.training.run_record import flatten

    path = W / "lessons_config.json"
    current = semantic_config(config)
    if not path.exists():
        atomic_write_json(path, current)
        return
    stored = json.loads(path.read_text())
    flat_stored, flat_current = flatten(stored), flatten(current)
    diffs = sorted(k for k in set(flat_stored) | set(flat_current) if flat_stored.get(k) != flat_current.get(k))
    if diffs:
        raise ValueError(
            f"{W} was started with other lessons settings ({', '.join(diffs)}; see {path}): use a new --workdir, "
            "or restore the original settings"
        )


# ---------------------------------------------------------------------------- arms


@dataclass(frozen=True)
class Arm:
    """A PRM trained on one labeller's data."""

    name: str
    dataset: str  # a file under W/datasets (without .jsonl)
    what: str  # one line for the report
    loss: str = "cross_entropy"
    soft: bool = False


def rate_name(rate: float) -> str:
    return f"r{rate:g}"


def judge_arm(rate: float) -> str:
    """The arm trained on the judge's labels at error rate `rate` (0: the exact checker)."""
    return "checker" if rate == 0 else f"judge_{rate_name(rate)}"


def consensus_arm(rate: float, judge_rate: float) -> str:
    """The arm trained on consensus with the judge at `rate` (`judge_rate`'s is the main one)."""
    return "consensus" if rate == judge_rate else f"consensus_{rate_name(rate)}"


def arms(config: ml_collections.ConfigDict) -> list[Arm]:
    """Every arm of the run, in report order."""
    k, small_k, rate = int(config.synth.k), int(config.lessons.small_k), float(config.judge.error_rate)
    out = [
        Arm(f"mc_hard_k{k}", f"mc_hard_k{k}", f"MC hard labels (k={k}, any completion correct), every response"),
        Arm(f"mc_hard_k{small_k}", f"mc_hard_k{small_k}", f"MC hard labels (k={small_k}), every response"),
    ]
    for t in config.lessons.trained_thresholds:
        out.append(Arm(f"mc_hard_k{k}_t{t:g}", f"mc_hard_k{k}_t{t:g}", f"MC hard labels, 1 iff n_correct/k > {t:g}"))
    out += [
        Arm(f"judge_{rate_name(rate)}", f"judge_{rate_name(rate)}", f"LLM-judge labels alone (error rate {rate:g})"),
        Arm("checker", "judge_r0", "the exact checker's labels (the human-label analogue)"),
        Arm("consensus", f"consensus_{rate_name(rate)}", f"MC k={k} and judge agree (hard labels)"),
        Arm("consensus_soft_ce", "consensus_soft", "consensus responses, soft MC labels, cross-entropy", soft=True),
        Arm("consensus_soft_mse", "consensus_soft", "consensus responses, soft MC labels, MSE", loss="mse", soft=True),
        Arm("mc_same_size", "mc_same_size", "MC hard labels, unfiltered, as many responses as consensus keeps"),
    ]
    for f in config.lessons.data_fractions:
        out.append(Arm(f"consensus_{f:g}", f"consensus_{f:g}", f"a {f:.0%} subset of the consensus data"))
    for r in config.lessons.judge_error_rates:
        if r not in (0.0, rate):
            out.append(Arm(f"judge_{rate_name(r)}", f"judge_{rate_name(r)}", f"judge labels alone, error rate {r:g}"))
    for r in config.lessons.judge_error_rates:
        if r != rate:
            out.append(
                Arm(f"consensus_{rate_name(r)}", f"consensus_{rate_name(r)}", f"consensus with the judge at {r:g}")
            )
    return out


# ---------------------------------------------------------------------------- label quality


def step_confusion(labeller_first: int, true_first: int, num_steps: int) -> tuple[int, int, int]:
    """(tp, fp, fn) of "error" step labels for one response, over the steps the labeller labels.

    A labeller with first error e labels steps 0..e (1 before e, 0 at e; all steps when e = -1), the
    steps its training record keeps; a step truly has an error when the prefix ending at it does
    (index >= the checker's first error t).
    """
    labelled = num_steps if labeller_first == -1 else labeller_first + 1
    bad_from = num_steps if true_first == -1 else true_first
    tp = int(labeller_first != -1 and labeller_first >= bad_from)
    fp = int(labeller_first != -1 and labeller_first < bad_from)
    fn = max(0, min(labelled, num_steps) - bad_from) - tp
    return tp, fp, fn


def label_quality(pairs: Sequence[tuple[int, int, int]], candidates: int) -> dict:
    """First-error agreement and "error"-label precision/recall of `(labeller, truth, num_steps)`."""
    tp = fp = fn = agree = 0
    for labeller_first, true_first, num_steps in pairs:
        a, b, c = step_confusion(labeller_first, true_first, num_steps)
        tp, fp, fn, agree = tp + a, fp + b, fn + c, agree + (labeller_first == true_first)
    return {
        "records": len(pairs),
        "keep_rate": len(pairs) / candidates if candidates else None,
        "first_error_agreement": agree / len(pairs) if pairs else None,
        "error_precision": tp / (tp + fp) if tp + fp else None,
        "error_recall": tp / (tp + fn) if tp + fn else None,
        "with_error": sum(p[0] != -1 for p in pairs),
    }


def soft_label_error(records: Sequence[dict], truths: dict[str, int]) -> float | None:
    """Mean squared error of soft step labels against the prefix truth (1 before the first error)."""
    total = count = 0.0
    for r in records:
        t = truths[r["id"]]
        for i, label in enumerate(r["labels"]):
            truth = 1.0 if t == -1 or i < t else 0.0
            total += (float(label) - truth) ** 2
            count += 1
    return total / count if count else None


# ---------------------------------------------------------------------------- the run


def _copy_stages(source: Path, target: Path, stages: Sequence[str]) -> None:
    """Seed a synthesis workdir with another's finished stages (the shared samples, grades, rollouts).

    Each stage directory is copied aside and renamed into place, so a kill mid-copy never leaves a
    done marker beside a partial record file.
    """
    for stage in stages:
        if (target / stage).exists():
            continue
        staging = target / f".{stage}.copying"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source / stage, staging, ignore=shutil.ignore_patterns("*.lock"))
        os.replace(staging, target / stage)


def _read_jsonl(path: Path) -> list[dict]:
    from prm_jax.jsonl import iter_objects

    return [record for _, record in iter_objects(path)]


def _subset(records: list[dict], count: int, seed: int) -> list[dict]:
    """`count` records drawn without replacement, in their file (id) order."""
    chosen = sorted(random.Random(seed).sample(range(len(records)), count))
    return [records[i] for i in chosen]


def _mean_std(values: Sequence[float | None]) -> dict:
    """Mean and sample standard deviation over the seeds that have the figure (None: undefined, e.g.
    F1 without an error-free response)."""
    present = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(present) if present else None,
        "std": statistics.stdev(present) if len(present) > 1 else 0.0 if present else None,
        "values": list(values),
    }


# The per-seed figures of an arm, from the evaluation runner's results.
FIGURES = (
    "f1",
    "acc_err",
    "acc_ok",
    "prm_product",
    "prm_min",
    "prm_last",
    "maj",
    "pass",
    "min_on_last",
    "flawed_flagged",
    "flawed_exact",
)


def arm_figures(pb: dict, bon: dict) -> dict:
    world = pb["subsets"]["world"]
    average = bon["average"]
    flawed = pb["analyses"].get("flawed_process") or {}  # absent without correct-answer, flawed-process records
    return {
        "f1": world["f1"],
        "acc_err": world["acc_err"],
        "acc_ok": world["acc_ok"],
        "prm_product": average["prm_at_n"]["product"],
        "prm_min": average["prm_at_n"]["min"],
        "prm_last": average["prm_at_n"]["last"],
        "maj": average["maj_at_n"],
        "pass": average["pass_at_n"],
        "min_on_last": bon["analyses"]["min_position"]["final_step_share"],
        "flawed_flagged": flawed.get("flagged"),
        "flawed_exact": flawed.get("exact"),
    }


def run_lessons(config: ml_collections.ConfigDict, workdir: str | Path, *, say: Callable[[str], None] = print) -> dict:
    """Run every stage and arm into `workdir`; returns (and writes) `lessons.json`'s content."""
    import jax
    from transformers import AutoTokenizer

    from data_pipeline.pipeline import run as run_synthesis
    from prm_jax.evaluation.report import json_safe, write_json
    from prm_jax.generation.jax_sampler import JaxSampler, SamplerConfig
    from prm_jax.tiny_tokenizer import build_tiny_tokenizer
    from prm_jax.training.run import train_from_config
    from prm_jax.weights import load_model

    config = scaled(config)
    problems = validate_config(config)
    if problems:
        raise ValueError(f"invalid lessons config ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
    W = Path(workdir)
    W.mkdir(parents=True, exist_ok=True)
    check_run_config(config, W)
    # Every arm trains and scores the same shapes: compile them once for the whole run.
    jax.config.update("jax_compilation_cache_dir", str(W / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    dcfg = _demo_view(config)
    clock = demo._Clock(say)
    seed, k, small_k = int(config.seed), int(config.synth.k), int(config.lessons.small_k)
    base_rate = float(config.judge.error_rate)

    with clock.stage("setup", "tokenizer and world problems"):
        tokenizer_dir = W / "tokenizer"
        if not (tokenizer_dir / "tokenizer.json").exists():
            build_tiny_tokenizer(tokenizer_dir)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        splits = demo.make_splits(dcfg)
        sft_file = demo.write_sft_data(
            W / "data" / "sft.jsonl",
            splits["sft"],
            error_rate=float(config.sft.error_rate),
            seed=seed,
            mistakes=demo.mistake_kinds(config.sft.mistakes),
        )
        synth_problems = math_world.write_problems(W / "data" / "synth_problems.jsonl", splits["synth"])

    with clock.stage("policy_sft", f"the policy (shared by every arm), {config.sft.steps} steps"):
        train_from_config(demo.sft_train_config(dcfg, sft_file, tokenizer_dir), W / "policy")
        policy_dir = demo._last_step_dir(W / "policy", int(config.sft.steps))

    sampler = JaxSampler(
        load_model(policy_dir, head="lm", dtype="float32"), tokenizer, config=SamplerConfig(**demo._SAMPLER)
    )
    with clock.stage("eval_sampling", f"held-out responses, N={config.eval.n} per problem"):
        pb, bon, policy_figures = demo.evaluation_records(splits["eval"], sampler, dcfg)
        atomic_write_lines(W / "eval" / "processbench" / "world.jsonl", map(json.dumps, pb))
        atomic_write_lines(W / "eval" / "bon.jsonl", map(json.dumps, bon))

    synth = W / "synth"
    base = synth / f"k{k}_{rate_name(base_rate)}"

    def synthesize(workdir: Path, k_value: int, rate: float, mode: str = "agree", policy=sampler) -> None:
        c = demo.synth_config(dcfg, synth_problems, policy_dir, tokenizer_dir)
        c.mc.k = k_value
        c.consensus.mode = mode
        judge = math_world.CheckerJudge(tokenizer, error_rate=rate, seed=seed)
        run_synthesis(c, workdir, policy=policy, judge=judge)

    with clock.stage("synthesis", f"sample N={config.synth.n}, grade, MC k={k} and k={small_k}, judge runs"):
        synthesize(base, k, base_rate)
        small = synth / f"k{small_k}"
        _copy_stages(base, small, ("sample", "grade"))
        synthesize(small, small_k, base_rate, mode="mc")
        for rate in config.lessons.judge_error_rates:
            if rate != base_rate:
                target = synth / f"k{k}_{rate_name(rate)}"
                _copy_stages(base, target, ("sample", "grade", "mc"))
                synthesize(target, k, float(rate))
    del sampler, synthesize  # the policy's last use: release it before the arms train

    with clock.stage("datasets", "one training set per labeller"):
        datasets = build_datasets(config, W, synth_problems, policy_dir, tokenizer_dir)
        quality = labeller_quality(config, W, datasets)

    arm_list = arms(config)
    seeds = [seed * 1000 + s for s in range(int(config.lessons.seeds))]
    results = []
    with clock.stage("arms", f"{len(arm_list)} arms x {len(seeds)} seeds: PRM training, export, evaluation"):
        for i, arm in enumerate(arm_list):
            per_seed = [train_and_evaluate(config, W, arm, s, tokenizer_dir, policy_dir) for s in seeds]
            figures = {name: _mean_std([f.get(name) for f in per_seed]) for name in FIGURES}
            results.append(
                {
                    "name": arm.name,
                    "what": arm.what,
                    "dataset": arm.dataset,
                    "training_records": datasets[arm.dataset]["records"],
                    "loss": arm.loss,
                    "soft_labels": arm.soft,
                    "seeds": seeds,
                    "figures": figures,
                }
            )
            say(
                f"  [{i + 1}/{len(arm_list)}] {arm.name}: F1 {figures['f1']['mean']:.3f} +- {figures['f1']['std']:.3f}, "
                f"prm@{config.eval.n} {figures['prm_product']['mean']:.3f}, min on last step "
                f"{figures['min_on_last']['mean']:.1%}"
            )

    from launch.lessons_report import findings

    lessons = {
        "seed": seed,
        "scale": config.scale,
        "world": {
            "policy_accuracy": policy_figures["policy_accuracy"],
            "policy_process_accuracy": policy_figures["policy_process_accuracy"],
            "eval_responses": policy_figures["eval_responses"],
            "eval_with_error": sum(r["label"] != -1 for r in pb),
            "eval_correct_answer": sum(bool(r["final_answer_correct"]) for r in pb),
            "eval_correct_answer_flawed_process": sum(r["label"] != -1 and r["final_answer_correct"] for r in pb),
            "synthesis_responses": quality["candidates"],
        },
        "label_quality": quality,
        "arms": results,
        "config": semantic_config(config),
    }
    lessons["findings"] = findings(lessons)
    lessons = json_safe(lessons)
    write_json(W / "lessons.json", lessons)
    write_json(W / "timings.json", clock.timings | {"total": round(time.monotonic() - clock.start, 1)})
    return lessons


def _consensus_dataset(
    config: ml_collections.ConfigDict,
    synth_dir: Path,
    out: Path,
    paths: tuple[Path, Path, Path],
    *,
    k_value: int,
    mode: str,
    label_type: str = "hard",
    mc_threshold: float = 0.0,
) -> None:
    """Rerun the consensus stage of `synth_dir` with these settings and keep its training set as `out`."""
    from data_pipeline.pipeline import run as run_synthesis

    synth_problems, policy_dir, tokenizer_dir = paths
    c = demo.synth_config(_demo_view(config), synth_problems, policy_dir, tokenizer_dir)
    c.mc.k = k_value
    c.consensus.update(dict(mode=mode, label_type=label_type, mc_threshold=mc_threshold))
    run_synthesis(c, synth_dir, stage="consensus")
    run_synthesis(c, synth_dir, stage="merge")
    atomic_write_lines(out, (synth_dir / "consensus" / "prm_train.jsonl").read_text().splitlines())


def build_datasets(
    config: ml_collections.ConfigDict, W: Path, synth_problems: Path, policy_dir: Path, tokenizer_dir: Path
) -> dict[str, dict]:
    """Every arm's training set under `W/datasets`, with its record count."""
    k, small_k, base_rate = int(config.synth.k), int(config.lessons.small_k), float(config.judge.error_rate)
    synth, out = W / "synth", W / "datasets"
    base = synth / f"k{k}_{rate_name(base_rate)}"
    paths = (synth_problems, policy_dir, tokenizer_dir)
    plan: dict[str, tuple[Path, dict]] = {
        f"mc_hard_k{k}": (base, dict(k_value=k, mode="mc")),
        f"mc_hard_k{small_k}": (synth / f"k{small_k}", dict(k_value=small_k, mode="mc")),
        "consensus_soft": (base, dict(k_value=k, mode="agree", label_type="soft")),
        f"mc_soft_k{k}": (base, dict(k_value=k, mode="mc", label_type="soft")),  # label quality only
    }
    for t in config.lessons.trained_thresholds:
        plan[f"mc_hard_k{k}_t{t:g}"] = (base, dict(k_value=k, mode="mc", mc_threshold=float(t)))
    for r in config.lessons.judge_error_rates:
        workdir = synth / f"k{k}_{rate_name(r)}"
        plan[f"judge_{rate_name(r)}"] = (workdir, dict(k_value=k, mode="judge"))
        plan[f"consensus_{rate_name(r)}"] = (workdir, dict(k_value=k, mode="agree"))
    for name, (synth_dir, settings) in plan.items():
        target = out / f"{name}.jsonl"
        if not target.exists():
            _consensus_dataset(config, synth_dir, target, paths, **settings)
    consensus = _read_jsonl(out / f"consensus_{rate_name(base_rate)}.jsonl")
    derived = {"mc_same_size": _subset(_read_jsonl(out / f"mc_hard_k{k}.jsonl"), len(consensus), int(config.seed))}
    for f in config.lessons.data_fractions:
        derived[f"consensus_{f:g}"] = _subset(consensus, max(1, round(f * len(consensus))), int(config.seed))
    for name, records in derived.items():
        target = out / f"{name}.jsonl"
        if not target.exists():
            atomic_write_lines(target, (json.dumps(r, sort_keys=True) for r in records))
    return {path.stem: {"records": sum(1 for _ in path.open())} for path in sorted(out.glob("*.jsonl"))}


def labeller_quality(config: ml_collections.ConfigDict, W: Path, datasets: dict[str, dict]) -> dict:
    """Every labeller's labels against the exact checker, with its generation cost per kept label."""
    from data_pipeline.consensus import mc_first_error
    from data_pipeline.schemas import GradeRecord, MCRecord, SampleRecord
    from data_pipeline.shards import Layout, Shard, read_records_if_exists

    k, small_k, base_rate = int(config.synth.k), int(config.lessons.small_k), float(config.judge.error_rate)
    base = Layout(W / "synth" / f"k{k}_{rate_name(base_rate)}")
    grades = {g.id: g for g in read_records_if_exists(base.records("grade", Shard()), GradeRecord.from_json)}
    truths = {
        gid: math_world.first_error(math_world.parse_problem(g.problem, g.problem_id), list(g.steps))
        for gid, g in grades.items()
    }
    candidates = len(grades)
    sampled_tokens = sum(
        r.num_tokens
        for s in read_records_if_exists(base.records("sample", Shard()), SampleRecord.from_json)
        for r in s.responses
    )

    def rollout_tokens(layout: Layout) -> int:
        records = read_records_if_exists(layout.records("mc", Shard()), MCRecord.from_json)
        return sum(m.cost.generated_tokens for m in records)

    rollouts = {k: rollout_tokens(base), small_k: rollout_tokens(Layout(W / "synth" / f"k{small_k}"))}

    def quality(records: list[dict], *, mc_k: int | None, judged: bool) -> dict:
        pairs = [(r["first_error"], truths[r["id"]], len(grades[r["id"]].steps)) for r in records]
        figures = label_quality(pairs, candidates)
        tokens = sampled_tokens + (rollouts[mc_k] if mc_k else 0)
        steps = sum(len(r["labels"]) for r in records)
        figures.update(
            generated_tokens=tokens,
            judge_calls=candidates if judged else 0,
            kept_step_labels=steps,
            tokens_per_kept_label=tokens / steps if steps else None,
        )
        return figures

    labellers = {}
    for mc_k in (k, small_k):
        name = f"mc_hard_k{mc_k}"
        labellers[name] = quality(_read_jsonl(W / "datasets" / f"{name}.jsonl"), mc_k=mc_k, judged=False)
    for r in config.lessons.judge_error_rates:
        judge_name = judge_arm(r)
        labellers[judge_name] = quality(
            _read_jsonl(W / "datasets" / f"judge_{rate_name(r)}.jsonl"), mc_k=None, judged=True
        )
        labellers[f"consensus_{rate_name(r)}"] = quality(
            _read_jsonl(W / "datasets" / f"consensus_{rate_name(r)}.jsonl"), mc_k=k, judged=True
        )

    # The MC hard threshold swept over 0 .. (k-1)/k, from the k-rollout counts of every labelled response.
    mcs = [m for m in read_records_if_exists(base.records("mc", Shard()), MCRecord.from_json) if m.status == "labelled"]
    sweep = []
    for j in range(k):
        threshold = j / k
        pairs = [(mc_first_error(m, threshold), truths[m.id], len(grades[m.id].steps)) for m in mcs]
        sweep.append({"threshold": threshold, **label_quality(pairs, candidates)})
    return {
        "candidates": candidates,
        "sampled_tokens": sampled_tokens,
        "rollout_tokens": {f"k{key}": value for key, value in rollouts.items()},
        "labellers": labellers,
        "soft_label_mse": {
            name: soft_label_error(_read_jsonl(W / "datasets" / f"{name}.jsonl"), truths)
            for name in (f"mc_soft_k{k}", "consensus_soft")
        },
        "mc_threshold_sweep": sweep,
        "datasets": datasets,
    }


def train_and_evaluate(
    config: ml_collections.ConfigDict, W: Path, arm: Arm, seed: int, tokenizer_dir: Path, policy_dir: Path
) -> dict:
    """One arm at one seed: PRM training from the policy backbone, HF export, ProcessBench and BoN."""
    from prm_jax.conversion.hf_checkpoint import orbax_to_hf
    from prm_jax.evaluation.report import write_json
    from prm_jax.evaluation.runner import EvaluationConfig, run_evaluation
    from prm_jax.training.run import train_from_config

    run_dir = W / "arms" / arm.name / f"seed{seed}"
    done = run_dir / "figures.json"
    if done.exists():
        return json.loads(done.read_text())
    c = demo.prm_train_config(_demo_view(config), W / "datasets" / f"{arm.dataset}.jsonl", tokenizer_dir, policy_dir)
    c.seed = seed
    c.train.loss = arm.loss
    c.data.soft_labels = arm.soft
    c.train.progress = False
    train_from_config(c, run_dir / "prm")
    prm_dir = demo._last_step_dir(run_dir / "prm", int(config.prm.steps))
    hf_dir = orbax_to_hf(prm_dir, run_dir / "prm_hf", dtype="float32", tokenizer_dir=tokenizer_dir, overwrite=True)
    common = dict(model=str(hf_dir), dtype="float32", param_dtype="float32", overwrite=True)
    pb = run_evaluation(
        EvaluationConfig(
            task="processbench", data=str(W / "eval" / "processbench"), out=str(run_dir / "processbench"), **common
        )
    )
    bon = run_evaluation(
        EvaluationConfig(task="bon", data=str(W / "eval" / "bon.jsonl"), out=str(run_dir / "bon"), **common)
    )
    write_json(done, arm_figures(pb.results, bon.results))
    return json.loads(done.read_text())  # as a resumed run reads it (NaN written as null)
