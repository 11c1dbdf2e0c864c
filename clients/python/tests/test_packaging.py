"""The in-tree build backend produces an installable wheel and a complete sdist."""

import importlib.util
import os
import shutil
import tarfile
import tempfile
import unittest
import zipfile

from support import SDK_DIR


def load_backend():
    spec = importlib.util.spec_from_file_location("nsml_build", os.path.join(SDK_DIR, "backend", "nsml_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PackagingTest(unittest.TestCase):
    def setUp(self):
        self.backend = load_backend()
        self.out = tempfile.mkdtemp(prefix="nsml-dist-")
        self.addCleanup(shutil.rmtree, self.out, True)

    def test_wheel(self):
        self.assertEqual(self.backend.get_requires_for_build_wheel(), [])
        name = self.backend.build_wheel(self.out)
        self.assertEqual(name, "nsml-0.1.0-py3-none-any.whl")
        with zipfile.ZipFile(os.path.join(self.out, name)) as zf:
            names = set(zf.namelist())
            for module in ("__init__", "constants", "_api", "_runner", "_jsonify"):
                self.assertIn("nsml/%s.py" % module, names)
            record = zf.read("nsml-0.1.0.dist-info/RECORD").decode()
            self.assertEqual(len(record.strip().splitlines()), len(names))
            self.assertIn("Name: nsml", zf.read("nsml-0.1.0.dist-info/METADATA").decode())
            self.assertFalse(any(n.startswith("tests/") for n in names))

    def test_editable_and_metadata(self):
        name = self.backend.build_editable(self.out)
        with zipfile.ZipFile(os.path.join(self.out, name)) as zf:
            self.assertEqual(zf.read("__editable__.nsml.pth").decode().strip(), SDK_DIR)
        meta = tempfile.mkdtemp(dir=self.out)
        self.assertEqual(self.backend.prepare_metadata_for_build_wheel(meta), "nsml-0.1.0.dist-info")
        self.assertTrue(os.path.isfile(os.path.join(meta, "nsml-0.1.0.dist-info", "METADATA")))

    def test_sdist(self):
        name = self.backend.build_sdist(self.out)
        with tarfile.open(os.path.join(self.out, name)) as tf:
            names = set(tf.getnames())
        for required in ("PKG-INFO", "pyproject.toml", "README.md", "backend/nsml_build.py", "nsml/_api.py",
                         "tests/support.py"):
            self.assertIn("nsml-0.1.0/" + required, names)


if __name__ == "__main__":
    unittest.main()
