"""Conversion of metrics and predictions to JSON, including numpy/pandas values when present.

numpy and pandas are not required: small stand-ins registered in ``sys.modules`` exercise the
same code paths (the SDK only looks those modules up, it never imports them).
"""

import sys
import types
import unittest
from unittest import mock

import support  # noqa: F401

from nsml._jsonify import NotJsonable, to_json


def fake_numpy():
    np = types.ModuleType("numpy")

    class generic:
        def __init__(self, value):
            self.value = value

        def item(self):
            return self.value

    class float64(float, generic):
        pass

    class bool_(generic):
        pass

    class int64(generic):
        pass

    class ndarray:
        def __init__(self, rows):
            self.rows = rows

        def tolist(self):
            return [[r.item() if isinstance(r, generic) else r for r in row] if isinstance(row, list) else row
                    for row in self.rows]

    np.generic, np.float64, np.bool_, np.int64, np.ndarray = generic, float64, bool_, int64, ndarray
    return np


def fake_pandas(np):
    pd = types.ModuleType("pandas")

    class DataFrame:
        def __init__(self, columns):
            self.columns = columns

        def to_dict(self, orient):
            assert orient == "records"
            keys = list(self.columns)
            n = len(self.columns[keys[0]])
            return [{k: self.columns[k][i] for k in keys} for i in range(n)]

    class Series:
        def __init__(self, values):
            self.values = values

        def tolist(self):
            return list(self.values)

    pd.DataFrame, pd.Series = DataFrame, Series
    return pd


class JsonifyTest(unittest.TestCase):
    def test_plain_values(self):
        value = {"a": (1, 2.5, "x", None, True), "b": [{"c": False}], 3: "int key"}
        self.assertEqual(to_json(value), {"a": [1, 2.5, "x", None, True], "b": [{"c": False}], "3": "int key"})

    def test_non_finite_floats(self):
        self.assertEqual(to_json([float("nan"), float("inf"), -float("inf")]), ["NaN", "Infinity", "-Infinity"])

    def test_rejections_carry_a_path(self):
        with self.assertRaises(NotJsonable) as ctx:
            to_json({"rows": [1, {"x": {1, 2}}]})
        self.assertEqual(ctx.exception.path, "['rows'][1]['x']")
        self.assertEqual(ctx.exception.value_type, "set")
        self.assertIsInstance(ctx.exception, TypeError)
        for bad in (b"bytes", object(), 1j, {(1, 2): "tuple key"}):
            with self.assertRaises(TypeError):
                to_json(bad)

    def test_numpy_values(self):
        np = fake_numpy()
        with mock.patch.dict(sys.modules, {"numpy": np}):
            self.assertEqual(to_json(np.int64(3)), 3)
            self.assertIs(to_json(np.bool_(True)), True)
            self.assertEqual(to_json(np.float64(0.5)), 0.5)
            self.assertEqual(to_json(np.ndarray([[np.int64(1), 2], [3, 4]])), [[1, 2], [3, 4]])
            self.assertEqual(to_json({np.int64(7): np.float64(float("nan"))}), {"7": "NaN"})

    def test_pandas_values(self):
        np = fake_numpy()
        pd = fake_pandas(np)
        with mock.patch.dict(sys.modules, {"numpy": np, "pandas": pd}):
            frame = pd.DataFrame({"filename": ["a.wav", "b.wav"], "y_pred": [np.int64(1), np.int64(0)]})
            self.assertEqual(to_json(frame), [{"filename": "a.wav", "y_pred": 1}, {"filename": "b.wav", "y_pred": 0}])
            self.assertEqual(to_json(pd.Series([np.float64(0.25), 1])), [0.25, 1])

    def test_2018_style_zip_output(self):
        result = list(zip([0.9, 0.8], [1, 0]))
        self.assertEqual(to_json(result), [[0.9, 1], [0.8, 0]])


if __name__ == "__main__":
    unittest.main()
