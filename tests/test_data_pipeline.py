"""Packing, shuffling, resumption and evaluation batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_assets import build_tiny_tokenizer

from prm_jax.data.packing import PACKED_FIELD_SPECS, positions_from_segment_ids
from prm_jax.data.pipeline import PipelineConfig, build_eval_batches, build_train_iterator
from prm_jax.data.records import PRMRecord
from prm_jax.data.tokenize import Example, TokenizeConfig, tokenize_prm

SEQ_LEN = 64


def make_examples(n: int, seed: int = 0, max_len: int = 40) -> list[Example]:
    """Synthetic examples with distinct contents, so a packed row can be checked field by field."""
    rng = np.random.default_rng(seed)
    examples = []
    for k in range(n):
        length = int(rng.integers(3, max_len + 1))
        loss_mask = (rng.random(length) < 0.3).astype(np.float32)
        sup = np.nonzero(loss_mask)[0]
        labels = np.zeros(length, np.float32)
        labels[sup] = rng.integers(0, 2, len(sup))
        step_index = np.full(length, -1, np.int32)
        step_index[sup] = np.arange(len(sup))
        targets = np.zeros(length, np.int32)
        targets[sup] = rng.integers(1, 400, len(sup))
        examples.append(
            Example(
                input_ids=rng.integers(1, 400, length).astype(np.int32),
                loss_mask=loss_mask,
                labels=labels,
                targets=targets,
                step_index=step_index,
                example_index=k,
                record_id=f"r{k}",
            )
        )
    return examples


def take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(count)]


def segments(batch: dict[str, np.ndarray]):
    """Yield `(example_index, {field: values})` for every packed example in a batch."""
    for r in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            where = np.nonzero(seg == s)[0]
            indices = np.unique(batch["example_index"][r, where])
            assert len(indices) == 1, "a segment holds exactly one example"
            yield int(indices[0]), {name: batch[name][r, where] for name in PACKED_FIELD_SPECS}


def check_layout(batch: dict[str, np.ndarray], rows: int) -> None:
    for name, (dtype, _) in PACKED_FIELD_SPECS.items():
        assert batch[name].shape == (rows, SEQ_LEN) and batch[name].dtype == dtype, name
    for r in range(rows):
        seg = batch["segment_ids"][r]
        used = int(np.count_nonzero(seg))
        # Segments are 1, 2, ..., k in order, contiguous, then padding only.
        assert (seg[used:] == 0).all() and (seg[:used] > 0).all()
        assert (np.diff(seg[:used]) >= 0).all() and (np.diff(seg[:used]) <= 1).all()
        if used:
            assert seg[0] == 1
        pad = seg == 0
        assert not batch["input_ids"][r, pad].any() and not batch["loss_mask"][r, pad].any()
        assert not batch["labels"][r, pad].any() and not batch["targets"][r, pad].any()
        assert (batch["step_index"][r, pad] == -1).all()
        assert (batch["example_index"][r, pad] == -1).all()
    expected = positions_from_segment_ids(batch["segment_ids"])
    np.testing.assert_array_equal(batch["positions"], expected)


def check_against_examples(batch, examples) -> list[int]:
    """Every packed segment equals its source example, field by field; return the indices."""
    seen = []
    for index, fields in segments(batch):
        ex = examples[index]
        assert len(fields["input_ids"]) == len(ex)
        for name in ("input_ids", "loss_mask", "labels", "targets", "step_index"):
            np.testing.assert_array_equal(fields[name], getattr(ex, name), err_msg=name)
        np.testing.assert_array_equal(fields["positions"], np.arange(len(ex)))
        seen.append(index)
    return seen


def one_epoch(examples, **kw) -> list[dict[str, np.ndarray]]:
    cfg = PipelineConfig(seq_len=SEQ_LEN, num_epochs=1, drop_remainder=False, **kw)
    return list(build_train_iterator(examples, cfg))


def epoch_order(examples, **kw) -> list[int]:
    """Example order of a run with one unpacked example per batch."""
    cfg = PipelineConfig(seq_len=SEQ_LEN, rows_per_batch=1, packing=False, **kw)
    return [int(b["example_index"][0, 0]) for b in build_train_iterator(examples, cfg)]


def test_packing_places_every_example_once_intact():
    examples = make_examples(60)
    batches = one_epoch(examples, rows_per_batch=4, seed=3)
    seen = []
    for batch in batches:
        check_layout(batch, 4)
        seen += check_against_examples(batch, examples)
    assert sorted(seen) == list(range(60))
    rows = sum(int((b["segment_ids"] > 0).any(axis=1).sum()) for b in batches)
    assert rows < 60  # several examples share rows
    assert max(int(b["segment_ids"].max()) for b in batches) >= 2


def test_packing_keeps_to_the_segment_limit():
    """The packed cuDNN kernel has a static limit of segments per row; the packer keeps to it."""
    examples = make_examples(60)
    unlimited = one_epoch(examples, rows_per_batch=4, seed=3)
    assert max(int(b["segment_ids"].max()) for b in unlimited) > 2
    batches = one_epoch(examples, rows_per_batch=4, seed=3, max_segments_per_row=2)
    seen = []
    for batch in batches:
        check_layout(batch, 4)
        seen += check_against_examples(batch, examples)
    assert sorted(seen) == list(range(60))
    assert max(int(b["segment_ids"].max()) for b in batches) == 2


def test_positions_match_the_model():
    from prm_jax.models.transformer import positions_from_segments

    batch = one_epoch(make_examples(20), rows_per_batch=8)[0]
    np.testing.assert_array_equal(np.asarray(positions_from_segments(batch["segment_ids"])), batch["positions"])


def test_unpacked_rows_hold_one_example_each():
    examples = make_examples(10)
    batches = one_epoch(examples, rows_per_batch=3, packing=False)
    assert len(batches) == 4  # 10 rows, last batch padded with 2 empty rows
    seen = []
    for batch in batches:
        check_layout(batch, 3)
        assert batch["segment_ids"].max() <= 1
        seen += check_against_examples(batch, examples)
    assert sorted(seen) == list(range(10))
    assert not batches[-1]["segment_ids"][1:].any()


def test_drop_remainder_drops_the_last_incomplete_batch():
    examples = make_examples(10)
    cfg = PipelineConfig(seq_len=SEQ_LEN, rows_per_batch=3, packing=False, num_epochs=1)
    assert len(list(build_train_iterator(examples, cfg))) == 3


def test_packed_prm_rows_keep_labels_on_separator_tokens(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / "tok"))
    (sep_id,) = tokenizer.encode("<extra_0>", add_special_tokens=False)
    records = [
        PRMRecord(
            f"r{k}",
            f"What is {k} + {k}?",
            tuple(f"Step {j}: {k} + {j} = {k + j}." for j in range(1 + k % 3)),
            tuple(float((k + j) % 4 != 3) for j in range(1 + k % 3)),
        )
        for k in range(12)
    ]
    cfg = TokenizeConfig(max_length=128, drop_after_first_error=False)
    examples = [tokenize_prm(r, tokenizer, cfg, k) for k, r in enumerate(records)]
    batches = list(
        build_train_iterator(
            examples, PipelineConfig(seq_len=256, rows_per_batch=2, num_epochs=1, drop_remainder=False)
        )
    )
    seen = set()
    for batch in batches:
        sup = batch["loss_mask"] > 0
        assert (batch["input_ids"][sup] == sep_id).all()
        assert (sup == (batch["input_ids"] == sep_id)).all()
        for r, t in zip(*np.nonzero(sup)):
            k, step = batch["example_index"][r, t], batch["step_index"][r, t]
            assert batch["labels"][r, t] == records[k].labels[step]
            seen.add((int(k), int(step)))
    assert seen == {(k, j) for k, r in enumerate(records) for j in range(len(r.steps))}


def test_shuffle_is_deterministic_and_differs_by_seed_and_epoch():
    examples = make_examples(30)
    order = epoch_order(examples, seed=5, num_epochs=3)
    assert order == epoch_order(examples, seed=5, num_epochs=3)
    epochs = [order[e * 30 : (e + 1) * 30] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(30))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert epoch_order(examples, seed=6, num_epochs=1) != epochs[0]
    assert epoch_order(examples, shuffle=False, num_epochs=2) == list(range(30)) * 2
    packed_a = one_epoch(examples, rows_per_batch=2, seed=9)
    packed_b = one_epoch(examples, rows_per_batch=2, seed=9)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(packed_a, packed_b) for k in a)


def test_checkpoint_state_round_trip_is_bitwise(tmp_path):
    examples = make_examples(25, max_len=30)
    # More bins than rows per batch: states get saved in the middle of a packed group, and
    # 40 batches run over several epoch boundaries.
    cfg = PipelineConfig(seq_len=SEQ_LEN, rows_per_batch=2, seed=11, num_packing_bins=5)
    reference = take(build_train_iterator(examples, cfg), 40)
    for split in (1, 7, 20, 33):
        first = build_train_iterator(examples, cfg)
        take(first, split)
        state = json.loads(json.dumps(first.get_state()))  # must survive JSON
        resumed = build_train_iterator(examples, cfg)
        resumed.set_state(state)
        rest = take(resumed, 40 - split)
        continued = take(first, 40 - split)
        for got, cont, want in zip(rest, continued, reference[split:]):
            for name in PACKED_FIELD_SPECS:
                assert got[name].tobytes() == want[name].tobytes(), (split, name)
                assert cont[name].tobytes() == want[name].tobytes(), (split, name)


def test_eval_batches_cover_each_example_once():
    examples = make_examples(23)
    cfg = PipelineConfig(seq_len=SEQ_LEN, rows_per_batch=2, packing=False)
    batches = build_eval_batches(examples, cfg)
    assert len(batches) == 12
    order = [k for b in batches for k in check_against_examples(b, examples)]
    assert order == list(range(23))  # in order, no shuffle
    for batch in batches:
        check_layout(batch, 2)


def test_rejections():
    examples = make_examples(5, max_len=40)
    with pytest.raises(ValueError, match="more than seq_len=16"):
        build_train_iterator(examples, PipelineConfig(seq_len=16, rows_per_batch=1))
    with pytest.raises(ValueError, match="no examples"):
        build_eval_batches([], PipelineConfig(seq_len=SEQ_LEN, rows_per_batch=1))
    with pytest.raises(ValueError, match="seed"):
        PipelineConfig(seq_len=8, rows_per_batch=1, seed=-1)
