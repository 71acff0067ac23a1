r"""Synthesis throughput with 1 and with 2 Ray generation workers on the tiny config (configs/synth_tiny.py).

  python -m bench.ray_workers [--problems=32 --workers=1,2 --out=figures.json]

Builds a random tiny policy (the tiny tokenizer, a 2-layer Qwen2-shaped model saved as an Orbax
checkpoint) and a problem file in a temporary directory, then runs the sample, grade and mc stages
(`data_pipeline.pipeline.run` with a `RayGenerationPool` built from the policy section: the JAX
sampler in each worker) once per worker count on a local Ray cluster with one CPU per worker,
after one untimed run that fills the JAX compilation cache every run shares; the clock starts
once every worker has loaded its engine. Prints records/s per stage side by side
(from each run's W/ray_summary.json) and checks that every run wrote the same records.

On a 2-core machine the driver (grading, writing) and the workers share the cores, so 2 workers
cannot double the rate there; the figure shows what the balancing costs or gains at this size.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from absl import app, flags

_PROBLEMS = flags.DEFINE_integer("problems", 32, "problems to synthesize")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "worker counts to compare")
_OUT = flags.DEFINE_string("out", None, "write the figures as JSON")

STAGES = ("sample", "mc")


def build_policy(root: Path) -> Path:
    """A random tiny policy (Orbax) beside the tiny tokenizer; the tokenizer directory is `root/tokenizer`."""
    from flax import nnx

    from prm_jax.checkpoint import save_model
    from prm_jax.models.config import ModelConfig
    from prm_jax.models.transformer import Transformer
    from prm_jax.tiny_tokenizer import build_tiny_tokenizer
    from prm_jax.training.config import default_config as training_defaults

    build_tiny_tokenizer(root / "tokenizer")
    # The from-scratch architecture of the training defaults (configs/tiny.py's), as a causal LM.
    arch = {**dict(training_defaults().model.arch), "max_position_embeddings": 512}
    config = ModelConfig(**arch, with_prm_head=False)
    model = Transformer(config, rngs=nnx.Rngs(0))
    # A random model rarely writes a blank line, and the mc stage rolls out step prefixes: give the
    # residual stream a constant direction (embedding dim 0) that only the "\n\n" tokens' logits read.
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(root / "tokenizer").get_vocab()
    breaks = [index for token, index in vocab.items() if "ĊĊ" in token]
    embedding = model.model.embed_tokens.embedding
    embedding[...] = embedding[...].at[:, 0].set(4.0)
    kernel = model.lm_head.kernel
    kernel[...] = kernel[...].at[0, :].set(0.0).at[0, breaks].set(0.4)
    return save_model(root / "policy", model)


def synth_config(root: Path, policy: Path, problems: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "synth_tiny", Path(__file__).resolve().parents[1] / "configs" / "synth_tiny.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.problems.path = str(problems)
    c.policy.model_path = str(policy)
    c.policy.tokenizer_path = str(root / "tokenizer")
    c.mc.skip_truncated = False  # a random model rarely ends a response: roll every response out
    # A random policy is never right, so the early stop would end every response at its first step:
    # roll out every prefix instead (the generation load of a run with accurate prefixes).
    c.mc.early_stop = False
    c.sample.batch_size = 2  # several batches per stage, so that 2 workers share them
    c.mc.batch_responses = 2
    c.io.progress = False
    c.io.fsync_every = 64
    return c


def records(workdir: Path, stage: str) -> dict[str, str]:
    lines = (workdir / stage / "shard-00000-of-00001.jsonl").read_text().splitlines()
    return {json.loads(line)["id"]: line for line in lines}


def main(argv: list[str]) -> None:
    del argv
    root = Path(tempfile.mkdtemp(prefix="ray_workers_bench_"))
    # Every worker compiles the same programs: one shared cache, filled by an untimed run.
    os.environ.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    import ray

    from data_pipeline.grading import GradingPool
    from data_pipeline.pipeline import run
    from data_pipeline.ray_runner import RayGenerationPool, SectionBackend

    policy = build_policy(root)
    problems = root / "problems.jsonl"
    problems.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "problem": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)}) + "\n"
            for i in range(_PROBLEMS.value)
        )
    )
    counts = [int(w) for w in _WORKERS.value]
    ray.init(num_cpus=max(counts), include_dashboard=False, log_to_driver=False)
    figures: dict[str, dict] = {}
    outputs = {}
    try:
        for label, workers in [("warm-up", max(counts))] + [(f"{w} worker(s)", w) for w in counts]:
            config = synth_config(root, policy, problems)
            workdir = root / f"run_{len(outputs)}_{workers}"
            # Engines loaded before the clock starts: the figures are generation, not model loading.
            pool = RayGenerationPool(
                SectionBackend(config.policy.to_dict(), config.seed), workers=workers, name="policy"
            )
            pool.wait_for_workers()
            try:
                start = time.perf_counter()
                for stage in ("sample", "grade", "mc"):
                    run(config, workdir, stage=stage, policy=pool, grader=GradingPool(workers=0))
                wall = time.perf_counter() - start
            finally:
                pool.close()
            if label == "warm-up":
                outputs[label] = None
                continue
            summary = json.loads((workdir / "ray_summary.json").read_text())
            figures[label] = {
                "wall_s (sample+grade+mc)": round(wall, 2),
                **{f"{s}_records_per_s": summary[s]["records_per_s"] for s in STAGES},
                **{f"{s}_completions_per_s": summary[s]["completions_per_s"] for s in STAGES},
                "batches_per_worker": {s: [w["batches"] for w in summary[s]["workers"]] for s in STAGES},
                "busy_s_per_worker": {s: [w["busy_s"] for w in summary[s]["workers"]] for s in STAGES},
            }
            outputs[label] = {s: records(workdir, s) for s in STAGES}
    finally:
        ray.shutdown()
    outputs.pop("warm-up", None)
    same = all(o == next(iter(outputs.values())) for o in outputs.values())
    print(f"{_PROBLEMS.value} problems, tiny config (n={config.sample.n}, k={config.mc.k}); records identical: {same}")
    header = ["", *figures]
    rows = [(key, *(str(figures[label][key]) for label in figures)) for key in next(iter(figures.values()))]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
    if _OUT.value:
        Path(_OUT.value).write_text(json.dumps({"records_identical": same, **figures}, indent=2) + "\n")
    if not same:
        raise SystemExit("runs with different worker counts wrote different records")


if __name__ == "__main__":
    app.run(main)
