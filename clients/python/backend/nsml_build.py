"""A self-contained PEP 517 / PEP 660 build backend for the nsml package (standard library only).

The SDK is pure Python, so building it needs nothing beyond the interpreter: ``pip install
./clients/python`` works offline, with or without build isolation, and does not depend on
the installed setuptools being able to build wheels.
"""

import base64
import hashlib
import io
import os
import re
import tarfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "nsml"
TAG = "py3-none-any"


def _project():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as fh:
        text = fh.read()
    try:
        import tomllib
    except ImportError:  # Python < 3.11: the few fields used here are simple strings
        fields = dict(re.findall(r'^(name|version|description|requires-python)\s*=\s*"([^"]*)"', text, re.M))
        return fields
    return tomllib.loads(text)["project"]


def _dist_name():
    project = _project()
    return project["name"], project["version"]


def _metadata():
    project = _project()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    lines = [
        "Metadata-Version: 2.1",
        "Name: %s" % project["name"],
        "Version: %s" % project["version"],
        "Summary: %s" % project.get("description", ""),
        "License: Apache-2.0",
        "Requires-Python: %s" % project.get("requires-python", ">=3.8"),
        "Description-Content-Type: text/markdown",
    ]
    return "\n".join(lines) + "\n\n" + readme


def _package_files():
    base = os.path.join(ROOT, PACKAGE)
    for name in sorted(os.listdir(base)):
        if name.endswith(".py"):
            yield "%s/%s" % (PACKAGE, name), os.path.join(base, name)


def _dist_info_files(name, version):
    dist_info = "%s-%s.dist-info" % (name, version)
    wheel = "Wheel-Version: 1.0\nGenerator: nsml_build\nRoot-Is-Purelib: true\nTag: %s\n" % TAG
    return dist_info, [
        ("%s/METADATA" % dist_info, _metadata().encode("utf-8")),
        ("%s/WHEEL" % dist_info, wheel.encode("utf-8")),
        ("%s/top_level.txt" % dist_info, (PACKAGE + "\n").encode("utf-8")),
    ]


def _write_wheel(wheel_directory, entries):
    name, version = _dist_name()
    dist_info, meta = _dist_info_files(name, version)
    filename = "%s-%s-%s.whl" % (name, version, TAG)
    records = []
    with zipfile.ZipFile(os.path.join(wheel_directory, filename), "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname, data in list(entries) + meta:
            zf.writestr(arcname, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")
            records.append("%s,sha256=%s,%d" % (arcname, digest, len(data)))
        record = "%s/RECORD" % dist_info
        records.append("%s,," % record)
        zf.writestr(record, "\n".join(records) + "\n")
    return filename


def _read(path):
    with open(path, "rb") as fh:
        return fh.read()


# --------------------------------------------------------------------------- PEP 517 hooks

def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def get_requires_for_build_editable(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    name, version = _dist_name()
    dist_info, meta = _dist_info_files(name, version)
    for arcname, data in meta:
        path = os.path.join(metadata_directory, *arcname.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
    return dist_info


prepare_metadata_for_build_editable = prepare_metadata_for_build_wheel


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _write_wheel(wheel_directory, [(arc, _read(path)) for arc, path in _package_files()])


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    # A .pth file puts this source directory on sys.path, so edits take effect immediately.
    return _write_wheel(wheel_directory, [("__editable__.%s.pth" % PACKAGE, (ROOT + "\n").encode("utf-8"))])


def build_sdist(sdist_directory, config_settings=None):
    name, version = _dist_name()
    base = "%s-%s" % (name, version)
    filename = base + ".tar.gz"
    files = ["pyproject.toml", "README.md", "backend/nsml_build.py"]
    files += [arc for arc, _ in _package_files()]
    tests = os.path.join(ROOT, "tests")
    files += ["tests/%s" % n for n in sorted(os.listdir(tests)) if n.endswith(".py")]
    now = int(time.time())
    with tarfile.open(os.path.join(sdist_directory, filename), "w:gz", format=tarfile.PAX_FORMAT) as tf:
        pkg_info = ("\n".join(_metadata().split("\n\n", 1)[0].splitlines()) + "\n").encode("utf-8")
        for arcname, data in [("PKG-INFO", pkg_info)] + [(f, _read(os.path.join(ROOT, f))) for f in files]:
            info = tarfile.TarInfo("%s/%s" % (base, arcname))
            info.size = len(data)
            info.mtime = now
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return filename
