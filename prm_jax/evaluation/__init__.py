"""Evaluation the way the paper does it: ProcessBench F1, Best-of-N, and the bias analyses.

Modules (one concept each):

* `records`: the input schemas (ProcessBench, Best-of-N, predictions), streamed and validated;
* `tokenizer_loading`: the tokenizer a checkpoint scores with (models load through `prm_jax.weights`);
* `scorer`: batched, length-bucketed, jitted, sharded step scoring;
* `processbench`: the ProcessBench metric and the threshold sweep (the critic's vote is `prm_jax.critique.critic_vote`);
* `best_of_n`: aggregations, selection, maj@N and pass@N with documented tie-breaking;
* `analyses`: min-step position, correct-answer-flawed-process detection, calibration (ECE);
* `tasks`: the tasks end to end (records -> results + per-record predictions);
* `report`: results.json (strict JSON), results.md, predictions.jsonl, PNG plots;
* `runner`: one run from an `EvaluationConfig` (what `launch.evaluate` calls).
"""

from prm_jax.evaluation.records import (  # noqa: F401
    BoNRecord,
    BoNResponse,
    EvaluationDataError,
    Prediction,
    ProcessBenchRecord,
    read_bon,
    read_predictions,
    read_processbench,
)
