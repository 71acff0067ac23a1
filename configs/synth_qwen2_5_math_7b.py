r"""Data synthesis with the paper's settings: Qwen2.5-Math-7B-Instruct policy, Qwen2.5-72B-Instruct judge, vLLM.

  python -m launch.synthesize --config=configs/synth_qwen2_5_math_7b.py --workdir=/shared/synth1 \
      --config.problems.path=/data/math_train.jsonl --config.problems.format=math \
      --config.policy.model_path=/ckpt/Qwen2.5-Math-7B-Instruct --config.judge.model_path=/ckpt/Qwen2.5-72B-Instruct \
      --num_shards=16 --shard_index=$SLURM_PROCID

8 responses per problem at temperature 0.7, k = 8 rollouts per step prefix with early stop at the
first hard-negative step, greedy judge, consensus of MC hard labels with the judge (the final
recipe). The stages of one shard share its GPUs: the policy (TP=1) for sample and mc, the judge
(TP=4 on the same node, once the policy stages are done: run --stage=sample/grade/mc first, then
--stage=judge with a judge-only process, or give the judge its own nodes).
"""

from data_pipeline.config import default_config


def get_config():
    c = default_config()
    c.problems.format = "jsonl"
    c.policy.backend = "vllm"
    c.policy.vllm.tensor_parallel_size = 1
    c.policy.vllm.max_model_len = 4096
    c.judge.backend = "vllm"
    c.judge.vllm.tensor_parallel_size = 4
    c.judge.vllm.max_model_len = 16384
    c.sample.n = 8
    c.sample.temperature = 0.7
    c.sample.max_tokens = 2048
    c.sample.batch_size = 512
    c.mc.k = 8
    c.mc.temperature = 0.7
    c.mc.max_tokens = 2048
    c.mc.batch_responses = 512
    c.judge.num_samples = 1
    c.judge.temperature = 0.0
    c.judge.max_tokens = 4096
    c.judge.prompt = "paper"  # the paper's judge prompt (App. C); "processbench" for ProcessBench's
    c.judge.batch_size = 256
    c.grading.workers = 16
    c.grading.timeout_s = 5.0
    c.consensus.mode = "agree"
    c.consensus.label_type = "hard"
    return c
