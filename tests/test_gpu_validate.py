"""`bench.gpu_validate`: the one-shot GPU validation command, run in its --smoke mode on the CPU so
it does not rot before a GPU is lent (the GPU mode itself cannot run here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench import gpu_validate

REPO = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_three_passing_sections_with_figures(tmp_path) -> None:
    out = tmp_path / "report" / "gpu_validation.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_validate", "--smoke", f"--out={out}"],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["schema"] == gpu_validate.SCHEMA and report["mode"] == "smoke" and report["ok"] is True
    sections = report["sections"]
    assert list(sections) == list(gpu_validate.SECTIONS)
    for name, section in sections.items():
        assert section["status"] == "passed", (name, section["error"], section.get("traceback"))
        assert section["seconds"] > 0 and section["environment"]["backend"] == "cpu"
        assert section["checks"] and all(check["passed"] for check in section["checks"])

    kernels = sections["kernel_parity"]["figures"]
    assert [case["dtype"] for case in kernels["cases"]] == ["float32", "bfloat16"]
    for case in kernels["cases"]:
        tolerance = gpu_validate.KERNEL_TOLERANCE[case["dtype"]]
        for impl in ("splash", "pallas_gpu"):
            entry = case["kernels"][impl]
            assert entry["passed"] and entry["vs_xla"]["worst_rel"] <= tolerance
            assert set(entry["vs_xla"]["arrays"]) == {"out", "dq", "dk", "dv"}
            assert entry["fwd_bwd_ms"] > 0
        assert case["kernels"]["xla"]["fwd_bwd_ms"] > 0
    assert "vs_fp32" in kernels["cases"][1]["kernels"]["xla"]  # the bf16 case reports what bf16 costs

    result = sections["train_step_vs_torch"]["figures"]["result"]
    assert result["size"] == "tiny" and result["guard"]["relative_difference"] <= 1e-3
    assert result["jax_tokens_per_s"] > 0 and result["torch_tokens_per_s"] > 0
    assert "jax_mfu" in result and "torch_mfu" in result  # None on a CPU (no known peak)

    memory = sections["plan_vs_peak"]["figures"]
    assert memory["estimate_bytes"] > 0 and memory["plan_training_per_device_bytes"] == memory["estimate_bytes"]
    assert memory["memory_stats_available"] is False and memory["measured_peak_bytes"] is None  # CPU
    assert all(np.isfinite(memory["losses"]))

    for title in ("attention kernels vs XLA", "JAX vs transformers + torch", "estimate vs measured", "summary"):
        assert title in proc.stdout


def test_packed_segment_ids_pack_several_segments_with_padding() -> None:
    ids = gpu_validate.packed_segment_ids(2, 4096, seed=0, left_pad=40)
    assert (ids[1, :40] == 0).all() and ids[0, 0] == 1
    assert (ids[:, -256:] == 0).all()  # trailing padding, T/16
    for row in ids:
        real = row[row > 0]
        assert len(np.unique(real)) >= 3 and (np.diff(real) >= 0).all()  # contiguous, increasing ids


def test_a_failing_section_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch) -> None:
    def broken(record, smoke, save):
        record["figures"]["before"] = 1
        raise ValueError("kernel exploded")

    monkeypatch.setitem(gpu_validate.SECTION_FUNCTIONS, "kernel_parity", broken)
    assert gpu_validate.run_section("kernel_parity", True, tmp_path / "s.json") == 0
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["status"] == "error" and record["error"] == "ValueError: kernel exploded"
    assert "Traceback" in record["traceback"] and record["figures"] == {"before": 1}

    # The parent: a failed check, a timed-out section (its figures so far kept) and a passing one.
    outcomes = {
        "kernel_parity": ({"status": "failed", "error": "checks failed: x", "checks": [{"passed": False}]}, 0),
        "train_step_vs_torch": ({"status": "running", "error": None, "figures": {"size": "tiny"}}, None),
        "plan_vs_peak": ({"status": "passed", "error": None}, 0),
    }

    def fake_spawn(name, smoke, out_path, timeout):
        record, rc = outcomes[name]
        out_path.write_text(json.dumps({"name": name, "figures": {}, "checks": [], "traceback": None, **record}))
        return rc, "stderr tail"

    monkeypatch.setattr(gpu_validate, "_spawn_section", fake_spawn)
    out = tmp_path / "report.json"
    assert gpu_validate.main(["--smoke", f"--out={out}"]) == 1
    report = json.loads(out.read_text())
    assert report["ok"] is False
    statuses = {name: s["status"] for name, s in report["sections"].items()}
    assert statuses == {"kernel_parity": "failed", "train_step_vs_torch": "error", "plan_vs_peak": "passed"}
    timed_out = report["sections"]["train_step_vs_torch"]
    assert "timed out" in timed_out["error"] and timed_out["figures"] == {"size": "tiny"}
    assert timed_out["stderr_tail"] == "stderr tail"


def test_plan_section_halves_a_batch_the_plan_refuses(monkeypatch) -> None:
    """The GPU run starts from the largest batch its memory suggests; a refusal by the pre-flight
    is recorded and the next batch planned (here forced on the CPU, in this process)."""
    from prm_jax.training import plan
    from prm_jax.training.trainer import Trainer

    assert gpu_validate.plan_batch_rows(False, 104 << 30) == [4, 2, 1]  # H200 at JAX's default 75%
    assert gpu_validate.plan_batch_rows(False, 59 << 30) == [2, 1]  # H100
    original = Trainer.preflight

    def refuse_four_rows(self):
        if self.global_rows == 4:
            raise plan.PreflightError("pre-flight: 4 rows do not fit")
        return original(self)

    monkeypatch.setattr(Trainer, "preflight", refuse_four_rows)
    record = {"figures": {}, "checks": []}
    gpu_validate.section_plan_vs_peak(record, True, lambda: None)
    figures = record["figures"]
    assert [r["global_batch_rows"] for r in figures["refused"]] == [4]
    assert figures["global_batch_rows"] == 2 and figures["estimate_bytes"] > 0
    assert all(check["passed"] for check in record["checks"])
