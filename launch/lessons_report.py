"""The findings of a lessons run, and its report (`docs/lessons_reproduced.md` is the default run's).

Each finding states the paper's claim with its figures (arXiv 2501.07301), ours from `lessons.json`,
and a verdict computed from the numbers: "reproduced" (the claimed difference is there beyond noise;
for a claim of "equal or better", no loss beyond noise), "not reproduced" (the direction is wrong,
or a claimed difference is inside the seeds' noise), or "not comparable" (a figure is undefined, the
figure depends on this world's policy and judge rather than on the labelling method, or every arm
compared sits at what the exact checker's labels reach, so this world cannot tell them apart). Two
PRM arms differ "beyond noise" when their mean F1 (or other figure) differs by more than twice the
standard error of the difference over the seeds and by at least half a point.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from launch.lessons_pipeline import consensus_arm, judge_arm, rate_name

REPRODUCED, NOT_REPRODUCED, NOT_COMPARABLE = "reproduced", "not reproduced", "not comparable"
MIN_EFFECT = 0.005


def _arm(lessons: dict, name: str) -> dict:
    for arm in lessons["arms"]:
        if arm["name"] == name:
            return arm
    raise KeyError(f"lessons.json has no arm {name!r}")


def _fig(lessons: dict, arm: str, figure: str = "f1") -> dict:
    return _arm(lessons, arm)["figures"][figure]


def difference(lessons: dict, a: str, b: str, figure: str = "f1") -> dict:
    """`a - b` on a figure's seed means, its standard error, and whether it is beyond noise."""
    fa, fb = _fig(lessons, a, figure), _fig(lessons, b, figure)
    na = max(1, sum(v is not None for v in fa["values"]))
    nb = max(1, sum(v is not None for v in fb["values"]))
    se = math.sqrt((fa["std"] or 0.0) ** 2 / na + (fb["std"] or 0.0) ** 2 / nb)
    diff = _mean(lessons, a, figure) - _mean(lessons, b, figure)
    return {
        "a": a,
        "b": b,
        "figure": figure,
        "diff": diff,
        "se": se,
        "beyond_noise": abs(diff) > max(2 * se, MIN_EFFECT),
    }


def paired_difference(lessons: dict, arm: str, figure_a: str, figure_b: str, min_effect: float = MIN_EFFECT) -> dict:
    """`figure_a - figure_b` of one arm, paired by seed: mean, standard error, and beyond noise (more
    than two standard errors and than `min_effect`, e.g. one record of a small evaluation set)."""
    a, b = _fig(lessons, arm, figure_a)["values"], _fig(lessons, arm, figure_b)["values"]
    diffs = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    if not diffs:
        return {
            "a": arm,
            "b": arm,
            "figure": f"{figure_a} - {figure_b}",
            "diff": math.nan,
            "se": 0.0,
            "beyond_noise": False,
        }
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) if len(diffs) > 1 else 0.0
    return {
        "a": arm,
        "b": arm,
        "figure": f"{figure_a} - {figure_b}",
        "diff": mean,
        "se": se,
        "beyond_noise": abs(mean) > max(2 * se, min_effect),
    }


def at_ceiling(lessons: dict, arms: list[str]) -> bool:
    """Whether every arm scores what the exact checker's labels reach (F1 within noise of the checker arm)."""
    return all(not difference(lessons, arm, "checker")["beyond_noise"] for arm in arms)


def ceiling_reason(lessons: dict, arms: list[str]) -> str:
    if not at_ceiling(lessons, arms):
        return ""
    return (
        f"every arm compared scores what the exact checker's labels reach (F1 {_f(_mean(lessons, 'checker'))}), "
        "so this world cannot tell them apart; "
    )


def _undefined(finding: dict) -> dict:
    """A finding whose compared figures are undefined (no seed defines them) is not comparable."""
    if any(math.isnan(d["diff"]) for d in finding.get("comparisons", [])):
        return {
            **finding,
            "reproduced": NOT_COMPARABLE,
            "reason": "a compared figure is undefined in this run (no seed defines it); " + finding["reason"],
        }
    return finding


def _better(d: dict) -> bool:
    return d["beyond_noise"] and d["diff"] > 0


def _not_worse(d: dict) -> bool:
    return not (d["beyond_noise"] and d["diff"] < 0)


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mean(lessons: dict, arm: str, figure: str = "f1") -> float:
    """A figure's mean over the seeds; NaN where no seed defines it (then no comparison holds)."""
    mean = _fig(lessons, arm, figure)["mean"]
    return math.nan if mean is None else mean


def findings(lessons: dict) -> list[dict]:
    """The paper's findings, each with our measurement and a verdict."""
    cfg = lessons["config"]
    k = cfg["synth"]["k"]
    rate = cfg["judge"]["error_rate"]
    mc, judge = f"mc_hard_k{k}", f"judge_{rate_name(rate)}"
    quality = lessons["label_quality"]["labellers"]
    out = []

    # 1. MC labels against judge labels (and the exact checker, the human-label analogue).
    d = difference(lessons, judge, mc)
    d_checker = difference(lessons, "checker", judge)
    out.append(
        {
            "id": "mc_vs_judge",
            "title": "MC-estimated labels are worse than LLM-judge labels for finding the first error",
            "paper": "ProcessBench avg F1: MC 40.1, LLM judge 46.5, human (PRM800K) 56.5",
            "measured": (
                f"PRM F1: {mc} {_f(_mean(lessons, mc))}, {judge} {_f(_mean(lessons, judge))}, checker "
                f"{_f(_mean(lessons, 'checker'))}; label first-error agreement: MC "
                f"{_f(quality[mc]['first_error_agreement'])}, judge {_f(quality[judge]['first_error_agreement'])}"
            ),
            "comparisons": [d, d_checker],
            "reproduced": REPRODUCED if _better(d) else NOT_REPRODUCED,
            "reason": _reason(d, "the judge's PRM", "the MC PRM")
            + f"; as labels, MC's first errors agree with the checker about as often as the judge's "
            f"({_f(quality[mc]['first_error_agreement'])} vs {_f(quality[judge]['first_error_agreement'])}), but MC "
            f"misses more error steps (error recall {_f(quality[mc]['error_recall'])} vs "
            f"{_f(quality[judge]['error_recall'])}), and a PRM learns those misses",
        }
    )

    # 2. Best-of-N barely separates the labellers; ProcessBench does.
    group = [mc, judge, "checker", "consensus"]
    f1s = [_mean(lessons, a) for a in group]
    bons = [_mean(lessons, a, "prm_product") for a in group]
    f1_spread, bon_spread = max(f1s) - min(f1s), max(bons) - min(bons)
    headroom = _mean(lessons, mc, "pass") - _mean(lessons, mc, "maj")
    tau = kendall_tau(
        [_mean(lessons, a["name"]) for a in lessons["arms"]],
        [_mean(lessons, a["name"], "prm_product") for a in lessons["arms"]],
    )
    out.append(
        {
            "id": "bon_vs_processbench",
            "title": "Best-of-N hardly separates PRMs that ProcessBench tells apart",
            "paper": "BoN@8 65.9 / 65.3 / 64.9 / 65.7 (spread 1.0) for MC / judge / human / consensus, against a ProcessBench spread of 16.4",
            "measured": (
                f"over {', '.join(group)}: prm@N spread {_f(max(bons) - min(bons))}, F1 spread {_f(max(f1s) - min(f1s))}; "
                f"Kendall tau between the BoN and F1 rankings of all {len(lessons['arms'])} arms {_f(tau, 2)}"
            ),
            "reproduced": (
                NOT_COMPARABLE
                if any(math.isnan(v) for v in f1s + bons)
                else REPRODUCED
                if f1_spread > MIN_EFFECT and bon_spread < f1_spread
                else NOT_REPRODUCED
            ),
            "reason": (
                f"prm@N spread {_f(bon_spread)} (with {_f(headroom)} between maj@N and pass@N to move in) against an "
                f"F1 spread of {_f(f1_spread)}; over all arms the two rankings agree with Kendall tau {_f(tau, 2)}"
            ),
        }
    )

    # 3. Consensus filtering: a fraction of the data at equal or better quality.
    keep = quality[f"consensus_{rate_name(rate)}"]["keep_rate"]
    d_all = difference(lessons, "consensus", mc)
    d_same = difference(lessons, "consensus", "mc_same_size")
    out.append(
        {
            "id": "consensus_quality",
            "title": "Consensus filtering (MC and judge agree) keeps a fraction of the data at equal or better quality",
            "paper": "keeps ~40% (860k -> 350k); F1 46.3 on 40% against MC 40.1 on all",
            "measured": (
                f"consensus F1 {_f(_mean(lessons, 'consensus'))} on {keep:.0%} of the responses, MC on all "
                f"{_f(_mean(lessons, mc))}, MC on as many responses as consensus keeps {_f(_mean(lessons, 'mc_same_size'))}"
            ),
            "comparisons": [d_all, d_same],
            "reproduced": REPRODUCED if _not_worse(d_all) else NOT_REPRODUCED,
            "reason": _reason(d_all, "consensus", "MC on all the data", equal_ok=True),
        }
    )
    out.append(
        {
            "id": "consensus_keep_rate",
            "title": "How much consensus filtering keeps",
            "paper": "~40% of the samples (860k -> 350k)",
            "measured": f"{keep:.1%} of {lessons['label_quality']['candidates']} responses",
            "reproduced": NOT_COMPARABLE,
            "reason": (
                "the keep rate is the MC-judge agreement rate, set by how often this world's policy errs, how often "
                f"its MC estimate is fooled and the judge's error rate ({rate:g}); the paper's policy, problems and "
                "72B judge disagree far more often"
            ),
        }
    )

    # 4. Hard labels beat soft labels after filtering.
    d_ce = difference(lessons, "consensus", "consensus_soft_ce")
    d_mse = difference(lessons, "consensus", "consensus_soft_mse")
    out.append(
        {
            "id": "hard_vs_soft",
            "title": "After consensus filtering, hard labels beat soft labels",
            "paper": "ProcessBench 66.5 (hard) vs 49.3 (soft); BoN 67.2 vs 65.4",
            "measured": (
                f"F1 hard {_f(_mean(lessons, 'consensus'))}, soft CE {_f(_mean(lessons, 'consensus_soft_ce'))}, soft MSE "
                f"{_f(_mean(lessons, 'consensus_soft_mse'))}; prm@N hard {_f(_mean(lessons, 'consensus', 'prm_product'))}, "
                f"soft CE {_f(_mean(lessons, 'consensus_soft_ce', 'prm_product'))}"
            ),
            "comparisons": [d_ce, d_mse],
            "reproduced": NOT_COMPARABLE
            if at_ceiling(lessons, ["consensus", "consensus_soft_ce", "consensus_soft_mse"])
            else REPRODUCED
            if _better(d_ce) and _better(d_mse)
            else NOT_REPRODUCED,
            "reason": ceiling_reason(lessons, ["consensus", "consensus_soft_ce", "consensus_soft_mse"])
            + _reason(d_ce, "hard labels", "soft labels (CE)")
            + "; "
            + _reason(d_mse, "hard labels", "soft labels (MSE)"),
        }
    )

    # 5. The hard-label threshold: "any completion correct" is best.
    sweep = lessons["label_quality"]["mc_threshold_sweep"]
    best = max(sweep, key=lambda row: row["first_error_agreement"] or 0)
    trained = [t for t in cfg["lessons"]["trained_thresholds"]]
    d_thresholds = [difference(lessons, mc, f"{mc}_t{t:g}") for t in trained]
    out.append(
        {
            "id": "hard_threshold",
            "title": 'The MC hard-label threshold "any of k completions correct" is best',
            "paper": "ProcessBench 40.2 at threshold 0 down to 29.5 at 7/8",
            "measured": (
                "label first-error agreement "
                + ", ".join(f"{row['threshold']:.3g}: {_f(row['first_error_agreement'])}" for row in sweep)
                + "; PRM F1 "
                + ", ".join(
                    [f"0: {_f(_mean(lessons, mc))}"] + [f"{t:g}: {_f(_mean(lessons, f'{mc}_t{t:g}'))}" for t in trained]
                )
            ),
            "comparisons": d_thresholds,
            "reproduced": REPRODUCED
            if best["threshold"] == 0 and all(_not_worse(d) for d in d_thresholds)
            else NOT_REPRODUCED,
            "reason": f"labels agree with the checker most at threshold {best['threshold']:.3g}; "
            + "; ".join(_reason(d, "threshold 0", d["b"], equal_ok=True) for d in d_thresholds),
        }
    )

    # 6. Outcome drift: where the minimum step score falls.
    d_min = difference(lessons, mc, "consensus", "min_on_last")
    out.append(
        {
            "id": "min_on_last_step",
            "title": "MC-trained PRMs drift towards outcome scoring: their lowest step score falls on the final step",
            "paper": "share of responses with the minimum on the final step: Math-Shepherd-PRM-7B (MC) 44.5%, Qwen2.5-Math-PRM-7B (consensus) 17.5%",
            "measured": f"{mc} {_mean(lessons, mc, 'min_on_last'):.1%}, consensus {_mean(lessons, 'consensus', 'min_on_last'):.1%}, "
            f"checker {_mean(lessons, 'checker', 'min_on_last'):.1%} (Best-of-N responses)",
            "comparisons": [d_min],
            "reproduced": REPRODUCED if _better(d_min) else NOT_REPRODUCED,
            "reason": _reason(d_min, "the MC PRM's final-step share", "the consensus PRM's", figure="share"),
        }
    )

    # 7. Correct answer, flawed process: a PRM that tolerates them finds their first error less often
    # than it finds other responses' (paired over the seeds).
    world = lessons["world"]
    flawed = world["eval_correct_answer_flawed_process"]
    share = flawed / world["eval_correct_answer"] if world["eval_correct_answer"] else 0.0
    one_record = 1 / flawed if flawed else 1.0  # a change smaller than one of these records is no finding
    d_mc_flawed = paired_difference(lessons, mc, "flawed_exact", "acc_err", one_record)
    d_cons_flawed = paired_difference(lessons, "consensus", "flawed_exact", "acc_err", one_record)
    out.append(
        {
            "id": "correct_answer_flawed_process",
            "title": "Responses with a correct answer through a flawed process are common, and PRMs trained on MC labels tolerate them",
            "paper": "5.1% (GSM8K) to 43.4% (Omni-MATH) of correct-answer responses have a flawed process; PRMs flag few of them",
            "measured": (
                f"{share:.1%} of the held-out responses with a correct answer ({flawed} of {world['eval_correct_answer']}); "
                f"the first error found in them / in all erroneous responses: {mc} "
                f"{_mean(lessons, mc, 'flawed_exact'):.1%} / {_mean(lessons, mc, 'acc_err'):.1%}, consensus "
                f"{_mean(lessons, 'consensus', 'flawed_exact'):.1%} / {_mean(lessons, 'consensus', 'acc_err'):.1%}"
            ),
            "comparisons": [d_mc_flawed, d_cons_flawed],
            "reproduced": REPRODUCED if _better({**d_mc_flawed, "diff": -d_mc_flawed["diff"]}) else NOT_REPRODUCED,
            "reason": _reason(d_mc_flawed, f"{mc} on flawed-process responses", "on all erroneous ones", figure="found")
            + "; "
            + _reason(d_cons_flawed, "consensus on flawed-process responses", "on all erroneous ones", figure="found"),
        }
    )

    # 8. The noise curve: consensus protects against the judge's errors.
    rates = sorted(cfg["lessons"]["judge_error_rates"])
    judge_curve = [_mean(lessons, judge_arm(r)) for r in rates]
    cons_curve = [_mean(lessons, consensus_arm(r, rate)) for r in rates]
    judge_drop, cons_drop = judge_curve[0] - judge_curve[-1], cons_curve[0] - cons_curve[-1]
    noisiest = judge_arm(rates[-1])
    judge_hurt = difference(lessons, "checker", noisiest)["beyond_noise"]
    out.append(
        {
            "id": "judge_noise",
            "title": "Consensus filtering protects the PRM from the judge's errors",
            "paper": "no figure: the paper argues that agreement with MC filters out the judge's mistakes",
            "measured": (
                f"PRM F1 at judge error rates {', '.join(f'{r:g}' for r in rates)}: judge alone "
                f"{', '.join(_f(v) for v in judge_curve)}; consensus {', '.join(_f(v) for v in cons_curve)}"
            ),
            "reproduced": NOT_COMPARABLE
            if not judge_hurt
            else REPRODUCED
            if judge_drop - cons_drop > MIN_EFFECT
            else NOT_REPRODUCED,
            "reason": (
                ""
                if judge_hurt
                else "the judge's random errors do not lower the judge-alone PRM's F1 beyond noise, so there is "
                "nothing here for consensus to protect against; "
            )
            + f"F1 falls by {_f(judge_drop)} with the judge alone and by {_f(cons_drop)} with consensus from "
            f"rate {rates[0]:g} to {rates[-1]:g}",
        }
    )

    # 9. Data efficiency.
    fractions = sorted(cfg["lessons"]["data_fractions"])
    sizes = [(f, f"consensus_{f:g}") for f in fractions] + [(1.0, "consensus")]
    half = [name for f, name in sizes if f >= 0.5][0]
    d_half = difference(lessons, half, mc)
    out.append(
        {
            "id": "data_efficiency",
            "title": "Filtered data is data-efficient: a fraction of it matches all the unfiltered data",
            "paper": "consensus on 40% of the data: 46.3 against the judge's 46.5 and MC's 40.1 on all of it",
            "measured": "PRM F1 against consensus training-set size: "
            + ", ".join(
                f"{_arm(lessons, name)['training_records']} records {_f(_mean(lessons, name))}" for _, name in sizes
            )
            + f"; MC on all {_arm(lessons, mc)['training_records']} records {_f(_mean(lessons, mc))}",
            "comparisons": [d_half],
            "reproduced": REPRODUCED if _not_worse(d_half) else NOT_REPRODUCED,
            "reason": _reason(d_half, f"{half}", "MC on all the data", equal_ok=True),
        }
    )
    return [_undefined(f) for f in out]


def _reason(d: dict, a: str, b: str, *, equal_ok: bool = False, figure: str = "F1") -> str:
    sign = "higher" if d["diff"] > 0 else "lower"
    if not d["beyond_noise"]:
        verdict = "equal within noise" + (" (as claimed)" if equal_ok else "")
        return f"{a} vs {b}: {figure} {d['diff']:+.3f} +- {2 * d['se']:.3f} (2 SE), {verdict}"
    return f"{a} is {sign} than {b} by {abs(d['diff']):.3f} ({figure}; 2 SE {2 * d['se']:.3f})"


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-a between two rankings of the same items (ties count as neither)."""
    concordant = discordant = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            s = (x[i] - x[j]) * (y[i] - y[j])
            concordant += s > 0
            discordant += s < 0
    pairs = len(x) * (len(x) - 1) / 2
    return (concordant - discordant) / pairs if pairs else 0.0


# ---------------------------------------------------------------------------- the report


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _pm(figure: dict, digits: int = 3, percent: bool = False) -> str:
    if figure["mean"] is None:
        return "n/a"
    if percent:
        return f"{figure['mean']:.1%} ± {figure['std']:.1%}"
    return f"{figure['mean']:.{digits}f} ± {figure['std']:.{digits}f}"


def render_markdown(lessons: dict, plots: dict[str, str], command: str) -> str:
    """The report: findings first, then every arm and labeller, with the plots."""
    cfg, world, quality = lessons["config"], lessons["world"], lessons["label_quality"]
    n = cfg["eval"]["n"]
    mc_quality = quality["labellers"][f"mc_hard_k{cfg['synth']['k']}"]
    lines = [
        "# The paper's lessons, reproduced in the embedded world",
        "",
        "<!-- Generated by launch.lessons from lessons.json; do not edit by hand. -->",
        "",
        f"Generated by `{command}` (seed {lessons['seed']}, scale `{lessons['scale']}`, "
        f'{len(lessons["arms"][0]["seeds"])} PRM seeds per arm). The paper is "The Lessons of Developing Process Reward '
        'Models in Mathematical Reasoning" (arXiv 2501.07301); its figures below are from its tables and figures.',
        "",
        "In this world every step label is known: the exact step checker says where each response's first error is, so "
        "each labelling method is scored against the truth, and every PRM is trained on one labeller's data with the same "
        "budget, from the same policy backbone, and evaluated on the same held-out responses. The LLM judge's role is "
        "played by the checker wrong at a set error rate (a wrong verdict names another step at random).",
        "",
        f"World: policy accuracy {world['policy_accuracy']:.1%} on {world['eval_responses']} held-out responses "
        f"({world['eval_with_error']} with an error, {world['eval_correct_answer_flawed_process']} of them with a correct "
        f"answer); {world['synthesis_responses']} synthesis responses.",
        "",
        "## Findings",
        "",
    ]
    lines += _table(
        ["finding", "paper", "measured here", "verdict"],
        [[f["title"], f["paper"], f["measured"], f"**{f['reproduced']}**"] for f in lessons["findings"]],
    )
    lines += ["", "Why each verdict:", ""]
    lines += [f"- **{f['title']}**: {f['reproduced']}; {f['reason'].rstrip('.')}." for f in lessons["findings"]]
    lines += ["", "## PRMs trained on each labeller's data", ""]
    lines += [
        f"Mean ± standard deviation over the seeds. F1: ProcessBench-format F1 against the checker's labels "
        f"(threshold 0.5). prm@{n}: Best-of-{n} accuracy by the product / min / last-step score; maj@{n} "
        f"{_pm(lessons['arms'][0]['figures']['maj'])}, pass@{n} {_pm(lessons['arms'][0]['figures']['pass'])} for every arm. "
        "Min on last: the share of Best-of-N responses whose lowest step score is on the final step. Flawed found: the "
        "share of correct-answer, flawed-process responses whose first error the PRM locates.",
        "",
    ]
    rows = []
    for arm in lessons["arms"]:
        f = arm["figures"]
        rows.append(
            [
                f"`{arm['name']}`",
                arm["what"],
                str(arm["training_records"]),
                _pm(f["f1"]),
                f"{_pm(f['prm_product'])} / {f['prm_min']['mean']:.3f} / {f['prm_last']['mean']:.3f}",
                _pm(f["min_on_last"], percent=True),
                _pm(f["flawed_exact"], percent=True),
            ]
        )
    lines += _table(
        ["arm", "training data", "records", "F1", f"prm@{n} product / min / last", "min on last", "flawed found"], rows
    )
    lines += ["", f"![PRM F1 per arm]({plots['f1']})", "", "## Label quality against the checker", ""]
    lines += [
        "Over the training records each labeller keeps. First-error agreement: the labeller's first error equals the "
        "checker's. Error precision / recall: over the step labels the record carries, a step is truly an error when the "
        "prefix ending at it contains one. Cost: tokens generated by the policy (responses, plus rollouts for MC-based "
        "labels) per kept step label; the judge's calls are counted apart, since this world's judge writes a verdict, "
        "not a critique (a real judge's critique costs hundreds of tokens per call).",
        "",
    ]
    rows = []
    for name, q in quality["labellers"].items():
        rows.append(
            [
                f"`{name}`",
                f"{q['keep_rate']:.1%}",
                _f(q["first_error_agreement"]),
                _f(q["error_precision"]),
                _f(q["error_recall"]),
                _f(q["tokens_per_kept_label"], 1),
                str(q["judge_calls"]),
            ]
        )
    lines += _table(
        [
            "labeller",
            "keep rate",
            "first-error agreement",
            "error precision",
            "error recall",
            "tokens / kept label",
            "judge calls",
        ],
        rows,
    )
    soft = quality["soft_label_mse"]
    lines += [
        "",
        "Soft labels (n_correct / k) against the prefix truth, mean squared error: "
        + ", ".join(f"`{name}` {_f(v, 4)}" for name, v in soft.items())
        + ".",
        "",
        "MC hard-label threshold (a step is 1 when n_correct / k > threshold):",
        "",
    ]
    lines += _table(
        ["threshold", "first-error agreement", "error precision", "error recall", "responses with an error"],
        [
            [
                f"{r['threshold']:.3g}",
                _f(r["first_error_agreement"]),
                _f(r["error_precision"]),
                _f(r["error_recall"]),
                str(r["with_error"]),
            ]
            for r in quality["mc_threshold_sweep"]
        ],
    )
    lines += [
        "",
        f"![MC threshold sweep]({plots['thresholds']})",
        "",
        "## Judge noise and data size",
        "",
        f"![PRM F1 against the judge's error rate]({plots['noise']})",
        "",
        f"![PRM F1 against training-set size]({plots['data_size']})",
        "",
        "## Where this world differs from the paper's",
        "",
        "- The policy is a 4-layer model over a tiny vocabulary solving short arithmetic chains; its mistakes are the "
        "ones it learnt (a wrong carry) plus its own slips. The paper's policies are 7B-72B models on competition math.",
        "- The judge is the exact checker with random errors, not an LLM: its mistakes are not correlated with MC's, so "
        "consensus filters them better than a real judge's, and its cost is one call per response, not a critique.",
        "- ProcessBench here is the held-out world responses labelled by the checker, one subset; the paper averages "
        "four datasets labelled by experts.",
        "- F1 near 1 leaves little room: arms that differ by less than the seeds' noise are reported as equal.",
        f"- MC errs here almost only one way, by missing errors (at threshold 0: error precision "
        f"{_f(mc_quality['error_precision'])}, recall {_f(mc_quality['error_recall'])}): rollouts from a wrong step still "
        "reach the right answer, as when the next step undoes a wrong carry. That is the paper's correct-answer, "
        "flawed-process case, and it is why MC-trained PRMs here miss those responses' errors and why stricter "
        "thresholds can label or train better here than in the paper.",
        "",
        "Every arm's artifacts (training sets, checkpoints, HF exports, evaluation outputs) are in the run's workdir; "
        "`lessons.json` holds every figure in this report.",
        "",
    ]
    return "\n".join(lines)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    from prm_jax.files import atomic_file

    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, metadata={"Software": None})
    _plt().close(fig)


def plot_lessons(lessons: dict, out_dir: Path) -> dict[str, Path]:
    """The report's PNGs in `out_dir`."""
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = lessons["config"]
    paths = {}

    arms = lessons["arms"]
    fig, ax = plt.subplots(figsize=(9, 4))
    means = [a["figures"]["f1"]["mean"] for a in arms]
    ax.bar(range(len(arms)), means, yerr=[a["figures"]["f1"]["std"] for a in arms], color="#4c72b0", capsize=3)
    ax.set_xticks(range(len(arms)), [a["name"] for a in arms], rotation=60, ha="right", fontsize=8)
    ax.set_ylim(max(0.0, min(means) - 0.1), 1.0)
    ax.set_ylabel("ProcessBench-format F1")
    ax.set_title("PRM F1 per arm (mean ± std over seeds)")
    paths["f1"] = out_dir / "lessons_f1.png"
    _save(fig, paths["f1"])

    sweep = lessons["label_quality"]["mc_threshold_sweep"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r["threshold"] for r in sweep]
    for key, label in (
        ("first_error_agreement", "first-error agreement"),
        ("error_precision", "error precision"),
        ("error_recall", "error recall"),
    ):
        ax.plot(xs, [r[key] if r[key] is not None else math.nan for r in sweep], marker="o", label=label)
    ax.set_xlabel("MC hard-label threshold (1 iff n_correct/k > t)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"MC labels (k={cfg['synth']['k']}) against the checker")
    paths["thresholds"] = out_dir / "lessons_thresholds.png"
    _save(fig, paths["thresholds"])

    rate = cfg["judge"]["error_rate"]
    rates = sorted(cfg["lessons"]["judge_error_rates"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, names in (
        ("judge alone", [judge_arm(r) for r in rates]),
        ("consensus (MC and judge agree)", [consensus_arm(r, rate) for r in rates]),
    ):
        figs = [_fig(lessons, n) for n in names]
        ax.errorbar(rates, [f["mean"] for f in figs], yerr=[f["std"] for f in figs], marker="o", capsize=3, label=label)
    ax.set_xlabel("judge error rate")
    ax.set_ylabel("PRM F1")
    ax.legend(fontsize=8)
    ax.set_title("PRM F1 against the judge's error rate")
    paths["noise"] = out_dir / "lessons_noise.png"
    _save(fig, paths["noise"])

    fig, ax = plt.subplots(figsize=(5, 3.5))
    sizes = [f"consensus_{f:g}" for f in sorted(cfg["lessons"]["data_fractions"])] + ["consensus"]
    figs = [(_arm(lessons, n)["training_records"], _fig(lessons, n)) for n in sizes]
    ax.errorbar(
        [x for x, _ in figs],
        [f["mean"] for _, f in figs],
        yerr=[f["std"] for _, f in figs],
        marker="o",
        capsize=3,
        label="consensus subsets",
    )
    for name, marker in ((f"mc_hard_k{cfg['synth']['k']}", "s"), ("mc_same_size", "^")):
        arm = _arm(lessons, name)
        ax.errorbar(
            [arm["training_records"]],
            [arm["figures"]["f1"]["mean"]],
            yerr=[arm["figures"]["f1"]["std"]],
            marker=marker,
            capsize=3,
            linestyle="none",
            label=name,
        )
    ax.set_xlabel("training records")
    ax.set_ylabel("PRM F1")
    ax.legend(fontsize=8)
    ax.set_title("PRM F1 against training-set size")
    paths["data_size"] = out_dir / "lessons_data_size.png"
    _save(fig, paths["data_size"])
    return paths


def write_report(lessons: dict, report: Path, command: str) -> Path:
    """`report` (markdown) and its PNGs in `<report's stem>/` beside it."""
    from prm_jax.files import atomic_write

    plot_dir = report.parent / report.stem
    paths = plot_lessons(lessons, plot_dir)
    relative = {key: f"{plot_dir.name}/{path.name}" for key, path in paths.items()}
    atomic_write(report, render_markdown(lessons, relative, command))
    return report
