"""A client generated from the public protos (proto/nsml/v1) works against the platform's public endpoint.

The stubs are generated with grpcio-tools into a temporary directory when the test runs (never committed),
then used against `nsmld up` on a fresh data directory: log in, list the example datasets, follow a training
session's logs until the session ends, and find the platform's internal calls refused.

Needs grpcio, protobuf and a grpcio-tools whose protoc accepts proto3 `optional` (Debian bookworm's
python3-grpc-tools 1.14, with protoc 3.6, does not): see GRPC_INSTALL.
"""

import glob
import importlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import unittest

from support import EXAMPLES_DIR, REPO_ROOT

PROTO_DIR = os.path.join(REPO_ROOT, "proto")
BASELINE = os.path.join(EXAMPLES_DIR, "baseline")
BIN_DIR = os.environ.get("NSML_BIN_DIR") or os.path.join(REPO_ROOT, "target", "debug")
GRPC_INSTALL = (
    "apt-get install -y python3-grpcio python3-protobuf python3-pip && "
    "python3 -m pip install --break-system-packages 'grpcio-tools==1.51.1' "
    "(or, where python3 is not Debian's: python3 -m pip install 'grpcio-tools==1.51.1')"
)
# Every wait is a generous bound on something that happens on its own, never a measure of speed.
READY_BOUND = 120
SESSION_BOUND = 120
STOP_BOUND = 30
ENDED = ("SESSION_STATUS_EXITED", "SESSION_STATUS_FAILED", "SESSION_STATUS_STOPPED")


def generate(out_dir):
    """Generates the nsml.v1 messages and stubs into ``out_dir``; returns (module name → module, problem).

    The SDK's own package is also called ``nsml``: the generated one is made a regular package and imported
    with the SDK's modules set aside, which are put back afterwards (the generated modules keep working).
    """
    try:
        import grpc  # noqa: F401
        from grpc_tools import protoc  # noqa: F401
    except ImportError as exc:
        return None, "cannot import grpc / grpc_tools (%s) in %s: install them with %s" % (
            exc, sys.executable, GRPC_INSTALL)
    protos = sorted(glob.glob(os.path.join(PROTO_DIR, "nsml", "v1", "*.proto")))
    proc = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", PROTO_DIR, "--python_out=" + out_dir,
         "--grpc_python_out=" + out_dir] + protos,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    if proc.returncode != 0:
        return None, ("grpc_tools.protoc failed on the public protos (a grpcio-tools too old for proto3 "
                      "`optional`? install %s):\n%s" % (GRPC_INSTALL, proc.stdout))
    for pkg in ("nsml", os.path.join("nsml", "v1")):
        open(os.path.join(out_dir, pkg, "__init__.py"), "a").close()
    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(out_dir, "nsml", "v1", "*_pb2*.py")))

    def ours(name):
        return name == "nsml" or name.startswith("nsml.")

    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, out_dir)
    try:
        modules = {name: importlib.import_module("nsml.v1." + name) for name in names}
    except Exception as exc:  # a runtime older than the generated code wants, say
        import google.protobuf

        return None, "the generated code does not import with protobuf %s: %r (install %s)" % (
            google.protobuf.__version__, exc, GRPC_INSTALL)
    finally:
        sys.path.remove(out_dir)
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
    return modules, None


class Platform:
    """`nsmld up` on a fresh data directory in ``tmp``, with the example competition."""

    def __init__(self, tmp):
        self.log_path = os.path.join(tmp, "nsmld.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [os.path.join(BIN_DIR, "nsmld"), "up", "--data-dir", os.path.join(tmp, "data"),
             "--listen", "127.0.0.1:0", "--gpus", "0"],
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log, text=True,
            start_new_session=True)
        self.ready = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        try:
            url = self.ready.get(timeout=READY_BOUND)
        except queue.Empty:
            url = None
        if not url:
            self.stop()
            raise AssertionError("nsmld did not print `nsmld ready at` within %d s:\n%s" % (READY_BOUND, self.logs()))
        self.url = url
        self.address = url[len("http://"):] if url.startswith("http://") else url

    def _read_stdout(self):
        for line in self.proc.stdout:
            if line.startswith("nsmld ready at "):
                self.ready.put(line[len("nsmld ready at "):].strip())
        self.ready.put(None)

    def logs(self):
        self.log.flush()
        with open(self.log_path) as fh:
            return fh.read()[-4000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_BOUND)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_BOUND)
        # Anything it started and left behind (its own process group).
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.stdout.close()
        self.log.close()


def streaming(method):
    """(client_streaming, server_streaming) of a method descriptor."""
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.MethodDescriptorProto()
    method.CopyToProto(proto)
    return proto.client_streaming, proto.server_streaming


class GeneratedClientTest(unittest.TestCase):
    problem = None

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="nsml-generated-client-")
        cls.addClassCleanup(shutil.rmtree, cls.tmp, True)
        gen_dir = os.path.join(cls.tmp, "gen")
        os.mkdir(gen_dir)
        cls.pb, cls.problem = generate(gen_dir)
        if cls.problem:
            return
        missing = [b for b in ("nsmld", "nsml") if not os.path.isfile(os.path.join(BIN_DIR, b))]
        if missing:
            cls.problem = "%s missing in %s: build with `cargo build -p nsmld -p nsml-cli` (or set NSML_BIN_DIR)" % (
                ", ".join(missing), BIN_DIR)
            return
        import grpc

        cls.grpc = grpc
        cls.platform = Platform(cls.tmp)
        cls.addClassCleanup(cls.platform.stop)
        cls.channel = grpc.insecure_channel(cls.platform.address)
        cls.addClassCleanup(cls.channel.close)
        grpc.channel_ready_future(cls.channel).result(timeout=READY_BOUND)
        auth = cls.pb["auth_pb2_grpc"].AuthServiceStub(cls.channel)
        login = auth.Login(cls.pb["auth_pb2"].LoginRequest(username="alice", password="alice-pass"), timeout=60)
        cls.token = login.token
        cls.login = login
        cls.auth = [("authorization", "Bearer " + login.token)]

    def setUp(self):
        if self.problem:
            self.fail(self.problem)

    def stub(self, module, service):
        return getattr(self.pb[module + "_pb2_grpc"], service + "Stub")(self.channel)

    def test_login_and_datasets(self):
        self.assertTrue(self.token)
        self.assertEqual(self.login.username, "alice")
        who = self.stub("auth", "AuthService").WhoAmI(self.pb["common_pb2"].Empty(), metadata=self.auth, timeout=60)
        self.assertEqual(who.username, "alice")
        self.assertIn("demo", [m.team for m in who.memberships])

        storage = self.stub("storage", "StorageService")
        listed = storage.ListDatasets(self.pb["storage_pb2"].ListDatasetsRequest(), metadata=self.auth, timeout=60)
        names = [d.meta.name for d in listed.datasets]
        self.assertIn("t1-cls", names)
        self.assertIn("t2-reg", names)

        with self.assertRaises(self.grpc.RpcError) as caught:
            storage.ListDatasets(self.pb["storage_pb2"].ListDatasetsRequest(), timeout=60)
        self.assertEqual(caught.exception.code(), self.grpc.StatusCode.UNAUTHENTICATED, caught.exception.details())

    def test_follow_session_logs(self):
        # The session is started with the CLI, on the token the generated client logged in with.
        code = os.path.join(self.tmp, "baseline")
        shutil.copytree(BASELINE, code, ignore=shutil.ignore_patterns(
            "nsml_checkpoints", "__pycache__", "nsml_predictions.json"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("NSML_")}
        env.update(NSML_SERVER=self.platform.url, NSML_TOKEN=self.token, HOME=self.tmp,
                   NSML_CONFIG_DIR=os.path.join(self.tmp, "nsml-config"))
        run = subprocess.run([os.path.join(BIN_DIR, "nsml"), "run", "-d", "t1-cls", "-g", "0", "-a", "--epochs 2"],
                             cwd=code, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, timeout=SESSION_BOUND)
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
        started = [l for l in run.stdout.splitlines() if l.startswith("Session ") and l.endswith(" is started")]
        self.assertTrue(started, run.stdout + run.stderr)
        name = started[0][len("Session "):-len(" is started")]
        self.assertEqual(name, "demo/t1-cls/1")

        sessions = self.stub("session", "SessionService")
        session_pb2 = self.pb["session_pb2"]
        lines = []
        try:
            for line in sessions.Logs(session_pb2.LogsRequest(name=name, follow=True), metadata=self.auth,
                                      timeout=SESSION_BOUND):
                lines.append(line)
        except self.grpc.RpcError as exc:
            self.fail("following %s's logs: %s %s (lines so far: %s)\n%s" % (
                name, exc.code(), exc.details(), [l.text for l in lines], self.platform.logs()))
        texts = [l.text for l in lines]
        self.assertTrue(any(t.startswith("epoch 1/2 ") for t in texts), texts)
        self.assertTrue(any(t.startswith("epoch 2/2 ") for t in texts), texts)
        seqs = [l.seq for l in lines]
        self.assertEqual(seqs, sorted(seqs))
        self.assertEqual(len(set(seqs)), len(seqs))
        self.assertTrue({l.stream for l in lines} <= {"stdout", "stderr", "nsml"}, {l.stream for l in lines})

        # The stream ended because the session did.
        got = sessions.Get(session_pb2.GetSessionRequest(name=name), metadata=self.auth, timeout=60)
        status = session_pb2.SessionStatus.Name(got.status)
        self.assertIn(status, ENDED)
        self.assertEqual(status, "SESSION_STATUS_EXITED", "%s: %s" % (status, got.reason))
        self.assertEqual(got.exit_code, 0)

    def test_internal_methods_refused(self):
        """The platform's own calls are refused to a participant's client at the public endpoint.

        The protos are being split while this is written, so the calls come from whichever source exists:
        methods the public protos still mark `(nsml.v1.internal) = true` (called through the generated stubs),
        every method of the internal protos under proto/nsml/internal (never generated for clients: called by
        path), and the path a client generated from an older copy of the public protos still has. If none of the
        first two exists any more, the legacy path alone is checked.
        """
        refused = (self.grpc.StatusCode.PERMISSION_DENIED, self.grpc.StatusCode.UNIMPLEMENTED)
        calls = []  # (label, client_streaming, server_streaming, callable, request)
        internal_ext = getattr(self.pb["common_pb2"], "internal", None)
        for module_name, module in sorted(self.pb.items()):
            if internal_ext is None or not module_name.endswith("_pb2"):
                continue
            for service in module.DESCRIPTOR.services_by_name.values():
                for method in service.methods:
                    if not method.GetOptions().Extensions[internal_ext]:
                        continue
                    stub = self.stub(module_name[:-len("_pb2")], service.name)
                    request = self.message_class(method.input_type)()
                    calls.append(("stub %s.%s" % (service.full_name, method.name),) + streaming(method)
                                 + (getattr(stub, method.name), request))
        for path, client_streaming, server_streaming in self.internal_proto_methods() + [
                ("/nsml.v1.SessionService/RunnerHeartbeat", False, False)]:
            kind = ("stream" if client_streaming else "unary") + "_" + ("stream" if server_streaming else "unary")
            # No serializers: the request is the empty message's encoding, valid for every request type.
            calls.append(("path " + path, client_streaming, server_streaming, getattr(self.channel, kind)(path), b""))
        for label, client_streaming, server_streaming, call, request in calls:
            with self.subTest(call=label):
                with self.assertRaises(self.grpc.RpcError) as caught:
                    answer = call(iter([request]) if client_streaming else request, metadata=self.auth, timeout=60)
                    if server_streaming:
                        list(answer)
                # PERMISSION_DENIED: the gateway knows the call as internal; UNIMPLEMENTED: it is not served.
                self.assertIn(caught.exception.code(), refused, caught.exception.details())

    def internal_proto_methods(self):
        """(path, client_streaming, server_streaming) of every method in proto/nsml/internal, if it exists."""
        from google.protobuf import descriptor_pb2

        protos = sorted(glob.glob(os.path.join(PROTO_DIR, "nsml", "internal", "**", "*.proto"), recursive=True))
        if not protos:
            return []
        out = os.path.join(self.tmp, "internal.desc")
        proc = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", PROTO_DIR,
                               "--descriptor_set_out=" + out] + protos,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stdout)
        fds = descriptor_pb2.FileDescriptorSet()
        with open(out, "rb") as fh:
            fds.ParseFromString(fh.read())
        return [("/%s.%s/%s" % (f.package, svc.name, m.name), m.client_streaming, m.server_streaming)
                for f in fds.file for svc in f.service for m in svc.method]

    def message_class(self, descriptor):
        """The generated class of a message type, from whichever generated module defines it."""
        module = self.pb[os.path.basename(descriptor.file.name)[:-len(".proto")] + "_pb2"]
        return getattr(module, descriptor.name)


if __name__ == "__main__":
    unittest.main()
