r"""Cost of the mc stage per labelled response, with and without the early stop.

  python -m bench.mc_cost [--responses=2000 --k=8 --min_steps=3 --max_steps=16 --step_tokens=60 \
      --p_correct=0.6 --seed=0 --out=figures.json]

Runs `data_pipeline.mc.MCLabeler` (the real labeller: continuous batching, prefix prompts,
grading through math-verify) on a scripted policy with realistic shapes, so the figures are
counts, not model speed:

* responses of `min_steps..max_steps` steps of ~`step_tokens` tokens (Qwen2.5-Math-7B-Instruct
  writes ~8-10 blank-line steps of ~40-80 tokens on MATH), a fraction `p_correct` of them right;
  a wrong response has its first error at a uniformly drawn step;
* a rollout from a prefix before the first error reaches the gold answer with a per-response
  probability in [0.3, 0.95]; after it, with probability 0.03 (a lucky recovery);
* a rollout generates the rest of the solution: the remaining steps' tokens, +-20%.

Each completion's outcome is drawn from its own seed (the request seed + j, the pipeline's scheme),
so both modes see identical rollouts for the steps they share, and the first error the early stop
finds must equal the full expansion's: the benchmark checks it.
"""

from __future__ import annotations

import json
import random
import time

from absl import app, flags

_RESPONSES = flags.DEFINE_integer("responses", 2000, "labelled responses")
_K = flags.DEFINE_integer("k", 8, "completions per step prefix")
_MIN_STEPS = flags.DEFINE_integer("min_steps", 3, "fewest steps per response")
_MAX_STEPS = flags.DEFINE_integer("max_steps", 16, "most steps per response")
_STEP_TOKENS = flags.DEFINE_integer("step_tokens", 60, "mean tokens per step")
_P_CORRECT = flags.DEFINE_float("p_correct", 0.6, "share of responses with a correct answer")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the synthetic responses")
_OUT = flags.DEFINE_string("out", None, "write the figures as JSON")


def make_world(count: int, seed: int):
    """Synthetic graded responses and the ground truth the scripted policy follows."""
    from data_pipeline.schemas import GradeRecord

    rng = random.Random(seed)
    records, truth = [], {}
    for r in range(count):
        steps = rng.randint(_MIN_STEPS.value, _MAX_STEPS.value)
        tokens = [max(8, int(rng.gauss(_STEP_TOKENS.value, _STEP_TOKENS.value / 3))) for _ in range(steps)]
        correct = rng.random() < _P_CORRECT.value
        first_error = -1 if correct else rng.randrange(steps)
        problem = f"Problem {r}: what is the value?"
        truth[problem] = {"tokens": tokens, "first_error": first_error, "p": rng.uniform(0.3, 0.95)}
        text = [f"Step {i}: {'x' * 4 * t}" for i, t in enumerate(tokens)]
        text[-1] += f" \\boxed{{{42 if correct else 41}}}"
        records.append(
            GradeRecord(
                id=f"r{r:06d}#0",
                problem_id=f"r{r:06d}",
                index=0,
                problem=problem,
                gold="42",
                steps=tuple(text),
                answer="42" if correct else "41",
                finish_reason="stop",
                num_tokens=sum(tokens),
                status="correct" if correct else "incorrect",
                correct=correct,
            )
        )
    return records, truth


def make_script(truth):
    def script(prompt: str, index: int, params):
        head, _, rest = prompt.partition("what is the value?\n\n")
        problem = head.rsplit("\n\n", 1)[-1] + "what is the value?"
        world = truth[problem]
        done = rest.count("Step ")  # steps in the prefix
        draw = random.Random(params.seed + index)  # completion j of a request with seed s: seed s + j
        broken = world["first_error"] != -1 and world["first_error"] < done
        ok = draw.random() < (0.03 if broken else world["p"])
        length = max(4, int(sum(world["tokens"][done:]) * draw.uniform(0.8, 1.2)))
        return (f"... \\boxed{{{42 if ok else 41}}}", length)

    return script


def run_mode(records, truth, early_stop: bool):
    from data_pipeline.grading import GradingPool
    from data_pipeline.mc import MCLabeler, MCSettings
    from data_pipeline.scripted import ScriptedBackend

    labeler = MCLabeler(
        ScriptedBackend(make_script(truth)),
        GradingPool(workers=0),
        MCSettings.from_config(k=_K.value, early_stop=early_stop, batch_responses=256),
    )
    start = time.perf_counter()
    out = {r.id: r for r in labeler.label(records)}
    return out, time.perf_counter() - start


def main(argv: list[str]) -> None:
    del argv
    records, truth = make_world(_RESPONSES.value, _SEED.value)
    full, full_s = run_mode(records, truth, early_stop=False)
    early, early_s = run_mode(records, truth, early_stop=True)
    n = len(records)

    def per_response(results, field):
        return sum(getattr(r.cost, field) for r in results.values()) / n

    figures = {}
    for name, results, seconds in (("full_expansion", full, full_s), ("early_stop", early, early_s)):
        figures[name] = {
            "prefixes": per_response(results, "prefixes"),
            "completions": per_response(results, "completions"),
            "generated_tokens": per_response(results, "generated_tokens"),
            "labelled_steps": sum(len(r.labels) for r in results.values()) / n,
            "labeller_seconds": round(seconds, 2),
        }
    same_first_error = sum(full[i].first_error == early[i].first_error for i in full)
    cut = sum(r.early_stopped for r in early.values())
    saved = {
        key: 1 - figures["early_stop"][key] / figures["full_expansion"][key]
        for key in ("prefixes", "completions", "generated_tokens")
    }
    figures.update(
        {
            "responses": n,
            "k": _K.value,
            "mean_steps": sum(len(r.steps) for r in records) / n,
            "correct_responses": sum(r.correct for r in records) / n,
            "saved": saved,
            "first_error_identical": same_first_error,
            "responses_cut_early": cut,
            "prefixes_full_counted_by_early_stop": per_response(early, "prefixes_full"),
        }
    )
    print(
        f"MC cost per labelled response: {n} responses, k={_K.value}, {figures['mean_steps']:.1f} steps of "
        f"~{_STEP_TOKENS.value} tokens on average, {100 * figures['correct_responses']:.0f}% correct"
    )
    print(f"{'':18s}{'prefixes':>10s}{'completions':>13s}{'gen. tokens':>13s}{'labelled steps':>16s}")
    for name in ("full_expansion", "early_stop"):
        f = figures[name]
        print(
            f"{name:18s}{f['prefixes']:10.2f}{f['completions']:13.1f}{f['generated_tokens']:13.0f}"
            f"{f['labelled_steps']:16.2f}"
        )
    print(
        f"{'saved':18s}{100 * saved['prefixes']:9.1f}%{100 * saved['completions']:12.1f}%"
        f"{100 * saved['generated_tokens']:12.1f}%"
    )
    print(
        f"first error identical in both modes: {same_first_error}/{n}; responses cut early: {cut}/{n} "
        f"({100 * cut / n:.1f}%); early-stop records count {figures['prefixes_full_counted_by_early_stop']:.2f} "
        f"full-expansion prefixes per response (summary's prefixes_full)"
    )
    print(f"labeller wall time (scripted policy, inline grading): full {full_s:.1f}s, early stop {early_s:.1f}s")
    if same_first_error != n:
        raise SystemExit("early stop changed a first error: the labels are not comparable")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    app.run(main)
