"""A small learnable step-labelled set for smoke-training a PRM from scratch (configs/tiny.py).

Each solution is 2-5 single-digit calculations ("7 * 3 = 21"), all correct except, with
probability `error_rate`, one division by zero ("4 / 0 = 2"). Labels follow the paper's
convention: 1 up to the first wrong step, 0 from it on. The error is visible in the step's own
tokens ("/" followed by "0"), which a 2-layer model trained from scratch learns in CPU-minutes, so
ProcessBench-style F1 on held-out solutions checks the training machinery end to end. (Wrong sums
and false parity claims, tried first, need a fact table or an XOR and stayed at the label prior
for 400-1500 steps at this size: that is the demo world's job with a pretrained policy.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from prm_jax.files import atomic_write_lines


def _correct_step(rng: random.Random) -> str:
    op = rng.choice("+-*/")
    if op == "/":
        b, quotient = rng.randint(1, 9), rng.randint(0, 9)
        return f"{b * quotient} / {b} = {quotient}"
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{a} {op} {b} = {eval(f'{a} {op} {b}')}"  # noqa: S307 - digits and one operator


def arithmetic_record(rng: random.Random, record_id: str, error_rate: float = 0.5) -> dict:
    """2-5 single-digit calculations, all computed right except possibly one division by zero."""
    count = rng.randint(2, 5)
    error_at = rng.randrange(count) if rng.random() < error_rate else -1
    steps, labels = [], []
    for index in range(count):
        if index == error_at:
            steps.append(f"{rng.randint(1, 9)} / 0 = {rng.randint(0, 9)}")
        else:
            steps.append(_correct_step(rng))
        labels.append(0 if error_at != -1 and index >= error_at else 1)
    problem = "Work through " + str(count) + " calculations."
    return {"id": record_id, "problem": problem, "steps": steps, "labels": labels}


def write_arithmetic_dataset(
    out_dir: str | Path, *, n_train: int = 2000, n_eval: int = 200, seed: int = 0
) -> tuple[Path, Path]:
    """Writes train.jsonl and eval.jsonl (idempotent: same seed, same files)."""
    rng = random.Random(seed)
    paths = []
    for name, count in (("train", n_train), ("eval", n_eval)):
        path = Path(out_dir) / f"{name}.jsonl"
        atomic_write_lines(path, (json.dumps(arithmetic_record(rng, f"{name}-{i:06d}")) for i in range(count)))
        paths.append(path)
    return paths[0], paths[1]


def prepare_synthetic_run(config, workdir: str | Path):
    """Fills a config's empty data fields for `data.synthetic` runs (files under WORKDIR/data).

    Generates the labelled set and, without `data.tokenizer_dir`, builds the tiny tokenizer.
    Process 0 writes (the workdir is shared, as Orbax checkpoints require); the others wait.
    """
    import jax

    if not config.data.synthetic:
        return config
    if config.data.synthetic != "arithmetic":
        raise ValueError(f"data.synthetic={config.data.synthetic!r}; the only generator is 'arithmetic'")
    workdir = Path(workdir)
    config = config.copy_and_resolve_references()
    writer = jax.process_index() == 0
    if not config.data.train_file:
        data_dir = workdir / "data"
        if writer:
            write_arithmetic_dataset(data_dir, seed=int(config.seed))
        config.data.train_file = str(data_dir / "train.jsonl")
        config.data.eval_file = config.data.eval_file or str(data_dir / "eval.jsonl")
    if not config.data.tokenizer_dir:
        from prm_jax.tiny_tokenizer import build_tiny_tokenizer

        if writer:
            build_tiny_tokenizer(workdir / "tokenizer")
        config.data.tokenizer_dir = str(workdir / "tokenizer")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("prm_jax synthetic data written")
    return config
