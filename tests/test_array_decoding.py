"""Reading Flower Arrays without np.load: the same values, the same refusals."""

import io

import numpy as np
import pytest
from flwr.app import Array

from fedpeft.codecs import array_values
from fedpeft.strategies import AggregationError
from fedpeft.strategies.guard import check_finite
from fedpeft.strategies.testing import ensure_task_identity, train_reply


def _array(values: np.ndarray, version: tuple[int, int] | None = None, **kwargs) -> Array:
    """An Array whose bytes are ``np.save``'s (or ``write_array``'s at a given version)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, values, version=version, **kwargs)
    return Array(
        dtype=str(values.dtype), shape=values.shape, stype="numpy.ndarray", data=buffer.getvalue()
    )


CASES = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.random.default_rng(0).standard_normal((5, 7)),  # float64
    np.arange(6, dtype=np.float16),
    np.arange(6, dtype=np.int64).reshape(2, 3),
    np.array([True, False, True]),
    np.zeros((0, 4), dtype=np.float32),
    np.array(3.5, dtype=np.float32),  # a scalar
    np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
    np.arange(8, dtype=">f4"),  # big-endian
]


@pytest.mark.parametrize("values", CASES, ids=lambda v: f"{v.dtype.str}{v.shape}")
@pytest.mark.parametrize("version", [None, (2, 0)])
def test_array_values_reads_what_numpy_load_reads(values, version):
    array = _array(values, version)
    got = array_values(array)
    want = array.numpy()  # Flower's own reader: np.load
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(array_values(array), want)  # the header, now cached


def test_array_values_refuses_pickled_objects_and_foreign_bytes():
    objects = _array(np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="Python objects"):
        array_values(objects)
    foreign = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"not npy at all")
    with pytest.raises(ValueError, match=".npy"):
        array_values(foreign)
    other = Array(dtype="float32", shape=(2,), stype="torch.Tensor", data=b"")
    with pytest.raises(TypeError, match="torch.Tensor"):
        array_values(other)


def _reply(values: np.ndarray):
    import torch

    ensure_task_identity()
    return train_reply({"w.lora_A.weight": torch.from_numpy(values)}, 4, 1)


def test_check_finite_passes_huge_finite_values_whose_sum_overflows():
    check_finite(_reply(np.array([3e38, 3e38, -1.0], dtype=np.float32)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite_names_a_tensor_with_nan_or_inf(bad):
    values = np.ones(1000, dtype=np.float32)
    values[517] = bad
    with pytest.raises(AggregationError, match="w.lora_A.weight"):
        check_finite(_reply(values))
