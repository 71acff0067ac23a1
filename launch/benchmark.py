r"""JAX vs transformers + torch, side by side in one run (see bench/compare.py for the method).

  python -m launch.benchmark --suite=train|score --size=tiny|0.5b|1.5b|7b --out=FILE \
      [--rows=8 --seq_len=2048 --steps=10 --torch_compile]
"""

from __future__ import annotations

from absl import app, flags

from bench.compare import SIZES, dump, format_table, run
from launch.logs import configure_logging

_SUITE = flags.DEFINE_enum("suite", "train", ["train", "score"], "Train step or forward-only scoring.")
_SIZE = flags.DEFINE_enum("size", "tiny", list(SIZES), "Model shape (Qwen2.5 sizes).")
_ROWS = flags.DEFINE_integer("rows", 8, "Global batch rows.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per row.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per path (after two warm-up steps).")
_REMAT = flags.DEFINE_string("remat_policy", "dots_no_batch", "JAX remat policy for the train suite.")
_ATTENTION = flags.DEFINE_enum("attention_impl", "auto", ["auto", "xla", "cudnn"], "JAX attention kernel.")
_COMPILE = flags.DEFINE_bool("torch_compile", False, "Add a torch.compile row.")
_OUT = flags.DEFINE_string("out", None, "Write the figures as JSON here.")


def main(argv: list[str]) -> None:
    del argv
    configure_logging()
    result = run(
        _SUITE.value,
        _SIZE.value,
        rows=_ROWS.value,
        seq_len=_SEQ_LEN.value,
        steps=_STEPS.value,
        torch_compile=_COMPILE.value,
        remat_policy=_REMAT.value,
        attention_impl=_ATTENTION.value,
    )
    print(format_table(result))
    if _OUT.value:
        dump(result, _OUT.value)


if __name__ == "__main__":
    app.run(main)
