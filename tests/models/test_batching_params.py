"""TF Serving's batching parameters file (sgserve/models/batching_params.py), read as
tensorflow_model_server --batching_parameters_file reads it."""
from __future__ import annotations

import json
import os

import pytest

from sgserve.models.batching_params import (BatchingConfigError, BatchingParameters, default_num_batch_threads,
                                            load_batching_parameters, parse_batching_parameters)


# The example of TF Serving's docs (serving_config.md, "Batching Configuration"), plus the BatchingSession
# fields, exactly as tensorflow_model_server --batching_parameters_file reads them.
TFS_FILE = """\
max_batch_size { value: 128 }
batch_timeout_micros { value: 0 }
max_enqueued_batches { value: 1000000 }
num_batch_threads { value: 8 }
thread_pool_name { value: "model_server_batch_threads" }
# BatchingSession options
allowed_batch_sizes: 32
allowed_batch_sizes: 64
allowed_batch_sizes: 128
pad_variable_length_inputs: true
"""


def test_parses_a_tf_serving_batching_file_verbatim(tmp_path):
    path = tmp_path / "batching.txt"
    path.write_text(TFS_FILE)
    p = load_batching_parameters(str(path))
    assert p == BatchingParameters(max_batch_size=128, batch_timeout_micros=0, max_enqueued_batches=1000000,
                                   num_batch_threads=8, thread_pool_name="model_server_batch_threads",
                                   allowed_batch_sizes=(32, 64, 128), pad_variable_length_inputs=True)
    assert p.enable_large_batch_splitting is False and p.max_execution_batch_size == 128
    assert p.resolved_num_batch_threads() == 8


def test_defaults_are_tf_servings():
    p = parse_batching_parameters("")
    assert (p.max_batch_size, p.batch_timeout_micros, p.max_enqueued_batches) == (1000, 0, 10)
    assert p.num_batch_threads is None and p.resolved_num_batch_threads() == default_num_batch_threads()
    assert default_num_batch_threads() == len(os.sched_getaffinity(0))
    assert p.thread_pool_name == "batch_threads"
    assert p.allowed_batch_sizes == () and p.pad_variable_length_inputs is False
    assert p.enable_large_batch_splitting is False and p.max_execution_batch_size == 1000
    assert p == BatchingParameters()


def test_large_batch_splitting_fields():
    p = parse_batching_parameters("max_batch_size { value: 64 }\nenable_large_batch_splitting { value: true }")
    assert p.enable_large_batch_splitting and p.max_execution_batch_size == 64  # defaults to max_batch_size
    p = parse_batching_parameters("max_batch_size { value: 64 } enable_large_batch_splitting { value: true } "
                                  "max_execution_batch_size { value: 16 }")
    assert p.max_execution_batch_size == 16 and p.batch_size_limit == 16
    # Without splitting, TF Serving ignores max_execution_batch_size.
    p = parse_batching_parameters("max_batch_size { value: 64 } max_execution_batch_size { value: 16 }")
    assert p.batch_size_limit == 64


def test_zero_max_enqueued_batches_is_one_without_splitting():
    # SharedBatchScheduler::AddQueue rewrites 0 to 1 for old configs; with splitting it is an error.
    assert parse_batching_parameters("max_enqueued_batches { value: 0 }").max_enqueued_batches == 1
    with pytest.raises(BatchingConfigError, match="max_enqueued_batches must be positive; was 0"):
        parse_batching_parameters("max_enqueued_batches { value: 0 }\nenable_large_batch_splitting { value: true }")


@pytest.mark.parametrize("text, message, line", [
    ("max_batch_size { value: 0 }", "max_batch_size must be positive; was 0", 1),
    ("# c\nbatch_timeout_micros { value: -5 }", "batch_timeout_micros must be non-negative; was -5", 2),
    ("max_enqueued_batches { value: -1 }", "max_enqueued_batches must be positive; was -1", 1),
    ("num_batch_threads { value: 0 }", "num_batch_threads must be positive; was 0", 1),
    ("max_batch_size { value: 8 }\nallowed_batch_sizes: 4\nallowed_batch_sizes: 2\nallowed_batch_sizes: 8",
     "allowed_batch_sizes entries must be monotonically increasing; 2 follows 4", 4),
    ("max_batch_size { value: 8 }\nallowed_batch_sizes: 4\nallowed_batch_sizes: 4\nallowed_batch_sizes: 8",
     "monotonically increasing; 4 follows 4", 4),
    ("max_batch_size { value: 8 }\nallowed_batch_sizes: 2\nallowed_batch_sizes: 4",
     "Last entry in allowed_batch_sizes must match max_batch_size; last entry was 4; expected 8", 3),
    ("allowed_batch_sizes: 32", "last entry was 32; expected 1000", 1),  # against the default max_batch_size
    ("max_batch_size { value: 8 }\nallowed_batch_sizes: [0, 8]", "allowed_batch_sizes entries must be positive", 2),
    ("max_batch_size { value: 8 }\nenable_large_batch_splitting { value: true }\n"
     "max_execution_batch_size { value: 16 }",
     "max_batch_size must be greater than or equal to max_execution_batch_size", 3),
    ("enable_large_batch_splitting { value: true }\nmax_execution_batch_size { value: 0 }",
     "max_execution_batch_size must be positive; was 0", 2),
])
def test_validation_errors_name_the_field_and_line(text, message, line):
    with pytest.raises(BatchingConfigError) as info:
        parse_batching_parameters(text, source="b.txt")
    assert message in str(info.value)
    assert str(info.value).startswith(f"b.txt:{line}: ")
    assert isinstance(info.value, ValueError)


def test_validation_also_applies_to_values_built_in_code():
    with pytest.raises(BatchingConfigError, match="max_batch_size must be positive"):
        BatchingParameters(max_batch_size=-1)
    with pytest.raises(BatchingConfigError, match="must be an integer"):
        BatchingParameters(max_batch_size=2.5)  # type: ignore[arg-type]
    with pytest.raises(BatchingConfigError, match="must match max_batch_size"):
        BatchingParameters(max_batch_size=10, allowed_batch_sizes=(5,))


@pytest.mark.parametrize("text, message, where", [
    ("max_batch_size { value: 8 }\nmax_batch_size_typo { value: 1 }",
     'has no field named "max_batch_size_typo" (valid fields: max_batch_size, batch_timeout_micros', "b.txt:2:1"),
    ("max_batch_size: 8", "google.protobuf wrappers: write e.g. max_batch_size { value: 128 }", "b.txt:1:"),
    ("max_batch_size { value: 1 }\nmax_batch_size { value: 2 }", 'should not have multiple "max_batch_size"',
     "b.txt:2:"),
    ("pad_variable_length_inputs: maybe", "pad_variable_length_inputs", "b.txt:1:"),
    ("max_batch_size { value: 8 ", "Expected", "b.txt:1:"),
])
def test_syntax_errors_and_unknown_fields_have_positions(text, message, where):
    with pytest.raises(BatchingConfigError) as info:
        parse_batching_parameters(text, source="b.txt")
    assert str(info.value).startswith(where) and "syntax error" in str(info.value)
    assert message in str(info.value)


def test_unreadable_file(tmp_path):
    with pytest.raises(BatchingConfigError, match="cannot read batching parameters file .*missing.txt"):
        load_batching_parameters(str(tmp_path / "missing.txt"))


def test_dict_round_trip_through_json():
    p = parse_batching_parameters(TFS_FILE)
    assert BatchingParameters.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(BatchingConfigError, match="unknown batching parameter"):
        BatchingParameters.from_dict({"max_batch_sizes": 3})


# ---------------------------------------------------------------------------------------------------
# Helpers: a real TensorFlow model
# ---------------------------------------------------------------------------------------------------
