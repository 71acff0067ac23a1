r"""The embedded demo's band: the default run over seeds and emulated CPU classes.

  python -m bench.demo_band --out=/tmp/band            # 3 seeds x 3 ISA settings (about 50 minutes on 2 cores)
  python -m bench.demo_band --out=/tmp/band --seeds=0 --isas=none -- --config.sft.steps=800

Each run is `python -m launch.demo` in its own process; an ISA setting caps the instruction set XLA:CPU
compiles for (`XLA_FLAGS=--xla_cpu_max_isa=...`), which changes the floating-point results the way
another CPU would. Prints, per figure of the demo's results table, every run and the mean and range,
and writes `band.json` (the runs and the summary) and `band.md` (the table) into --out. Runs already
finished in --out are reused, so a killed band resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The figures of the README's results table: (label, getter on results.json).
FIGURES = (
    ("policy accuracy", lambda r: r["policy_accuracy"]),
    ("MC first error == checker", lambda r: r["mc_first_error_agreement"]),
    ("judge first error == checker", lambda r: r["judge_first_error_agreement"]),
    ("consensus keep rate", lambda r: r["consensus_keep_rate"]),
    ("PRM F1", lambda r: r["prm_f1"]),
    ("PRM acc_err", lambda r: r["prm_acc_err"]),
    ("PRM acc_ok", lambda r: r["prm_acc_ok"]),
    ("prm@4 (product)", lambda r: r["bon"]["prm"]),
    ("maj@4", lambda r: r["bon"]["maj"]),
    ("pass@4", lambda r: r["bon"]["pass"]),
    ("prm@4 - maj@4", lambda r: r["bon"]["prm"] - r["bon"]["maj"]),
    ("out-of-range errors found", lambda r: _kind_rate(r, "out_of_range")),
    ("in-range slips found", lambda r: _kind_rate(r, "in_range")),
)


def _kind_rate(results: dict, kind: str) -> float | None:
    entry = results.get("prm_detection_by_error_kind", {}).get(kind)
    return entry["rate"] if entry else None


def run_one(out: Path, seed: int, isa: str, extra: list[str]) -> dict:
    workdir = out / f"isa_{isa}_seed_{seed}"
    if (workdir / "results.json").is_file():
        return json.loads((workdir / "results.json").read_text())
    env = dict(os.environ)
    if isa != "none":
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_cpu_max_isa={isa}".strip()
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.demo",
            f"--workdir={workdir}",
            f"--config.seed={seed}",
            "--config.progress=false",
            *extra,
        ],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=False,
    )
    (out / f"isa_{isa}_seed_{seed}.log").write_text(result.stdout + result.stderr)
    if result.returncode:
        raise SystemExit(f"seed {seed}, isa {isa}: launch.demo exited {result.returncode}; see its log in {out}")
    print(f"  isa={isa} seed={seed}: {time.monotonic() - started:.0f} s", flush=True)
    return json.loads((workdir / "results.json").read_text())


def summarize(runs: dict[str, dict]) -> dict:
    summary = {}
    for label, get in FIGURES:
        values = [get(r) for r in runs.values()]
        present = [v for v in values if v is not None]
        summary[label] = {
            "runs": dict(zip(runs, values)),
            "mean": statistics.fmean(present) if present else None,
            "min": min(present) if present else None,
            "max": max(present) if present else None,
        }
    return summary


def table(summary: dict, runs: list[str]) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| figure | mean | range | " + " | ".join(runs) + " |", "|---|---|---|" + "---|" * len(runs)]
    for label, row in summary.items():
        lines.append(
            f"| {label} | {fmt(row['mean'])} | {fmt(row['min'])} - {fmt(row['max'])} | "
            + " | ".join(fmt(row["runs"][name]) for name in runs)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--isas", default="none,AVX2,AVX", help="XLA:CPU ISA caps; none = the machine's own")
    parser.add_argument("extra", nargs="*", help="more launch.demo flags (after --)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for isa in args.isas.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            runs[f"{isa}/s{seed}"] = run_one(args.out, seed, isa, args.extra)
    summary = summarize(runs)
    text = table(summary, list(runs))
    (args.out / "band.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    (args.out / "band.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
