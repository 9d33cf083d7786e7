"""Compile aioquic's packet path with Cython, in place, in the Python that runs this script.

aioquic (the QUIC carrier's engine) ships its per-datagram code as pure Python: parsing and
building packets, frames, loss recovery, congestion control, the stream buffers. This step
takes the sdist of the installed aioquic release from PyPI (``pip download --no-binary``),
checks that each module below is byte for byte the one installed, compiles those unchanged
modules with Cython into extension modules and writes them beside the ``.py`` files in the
installed package, where Python's import system prefers them (no source of aioquic is kept in
this repository). The extension modules are added to the package's RECORD, so ``pip
uninstall`` or an upgrade of aioquic removes them with it.

Idempotent: a stamp in the package keyed by the extension ABI, the aioquic and Cython versions and what
this script compiles how is checked first (a moment). The build takes about 80 s of CPU (45 s on two idle cores;
7 minutes on a machine loaded 6x over); what it built is kept under ``~/.cache/tunnel-build/``
(``$TUNNEL_BUILD_CACHE``) by the same key, so another virtual environment or a fresh clone on
this machine copies it in a second or two, then checks it as after a build. When the
download, the compiler or the check that follows the build fails, aioquic stays pure Python
(it works the same, slower) and the message says why; the stamp remembers the failure, so the
next run does not try again until something in its key changes (``--force`` tries now).
``--remove`` goes back to the pure-Python modules. ``tests/unit/test_aioquic_build.py`` says
which ones are loaded.

    python scripts/build_aioquic.py [--force | --remove | --status]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

#: The modules compiled, relative to the ``aioquic`` package: where a profile of a bulk transfer
#: puts aioquic's own time (``bench/README.md``, issue 23 section). Not ``tls``: compiled, it
#: made a handshake no cheaper (the time is in the cryptography library) and held 1 MB more.
MODULES = (
    "_crypto",
    "quic/connection",
    "quic/crypto",
    "quic/events",
    "quic/packet",
    "quic/packet_builder",
    "quic/rangeset",
    "quic/recovery",
    "quic/stream",
    "quic/congestion/base",
    "quic/congestion/cubic",
    "quic/congestion/reno",
)
STAMP = ".tunnel-compiled.json"
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")

# Python semantics throughout (bounds checks, negative indices, division, annotations as hints):
# the compiled modules must behave exactly as aioquic's tests and ours know them.
DIRECTIVES = {"language_level": 3, "annotation_typing": False, "binding": True}
# No debug information (the interpreter's own CFLAGS ask for -g): a faster build and
# smaller modules.
COMPILE_ARGS = ["-O2", "-g0"]

SMOKE = r"""
import datetime, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
import aioquic
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import HandshakeCompleted, StreamDataReceived

for name in sys.argv[1:]:
    module = __import__("aioquic." + name.replace("/", "."), fromlist=["_"])
    assert module.__file__.endswith(".so"), module.__file__
key = ec.generate_private_key(ec.SECP256R1())
subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smoke")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256()))
client = QuicConnection(configuration=QuicConfiguration(is_client=True, server_name="smoke", verify_mode=0))
server_conf = QuicConfiguration(is_client=False)
server_conf.certificate, server_conf.private_key = cert, key
server = QuicConnection(configuration=server_conf,
                        original_destination_connection_id=client.original_destination_connection_id)
t = 0.0
client.connect(("1.2.3.4", 4433), now=t)
payload = bytes(range(256)) * 4096
stream = None
got = bytearray()
for _ in range(2000):
    t += 0.001
    for a, b, addr in ((client, server, ("1.2.3.4", 1234)), (server, client, ("1.2.3.4", 4433))):
        for data, _ in a.datagrams_to_send(now=t):
            b.receive_datagram(data, addr, now=t)
    while (event := server.next_event()) is not None:
        if isinstance(event, StreamDataReceived):
            got += event.data
            if event.end_stream:
                assert bytes(got) == payload
                print("ok")
                sys.exit(0)
    while (event := client.next_event()) is not None:
        if isinstance(event, HandshakeCompleted):
            stream = client.get_next_available_stream_id()
            client.send_stream_data(stream, payload, end_stream=True)
sys.exit("the in-memory transfer did not complete")
"""


def cache_dir(key: str) -> Path:
    root = os.environ.get("TUNNEL_BUILD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tunnel-build")
    return Path(root) / "aioquic" / key


def package_dir() -> Path:
    spec = importlib.util.find_spec("aioquic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("aioquic is not installed in this Python")
    return Path(list(spec.submodule_search_locations)[0])


def stamp_key(version: str) -> str:
    try:
        cython = importlib.metadata.version("Cython")
    except importlib.metadata.PackageNotFoundError:
        cython = "none"
    # The extension ABI (e.g. cpython-311-x86_64-linux-gnu), not the patch release: modules built
    # under one 3.11 serve another 3.11's virtualenv (the quick start's, on Debian's Python) from
    # the cache, and the check after each copy still guards them.
    parts = [version, cython, SUFFIX, repr(MODULES), repr(DIRECTIVES), repr(COMPILE_ARGS)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def compiled_paths(pkg: Path) -> list[Path]:
    return [pkg / (name + SUFFIX) for name in MODULES]


def _twins(pkg: Path) -> list[Path]:
    """Every extension module beside a ``.py`` of the package: what this step installed, by
    this list or by an earlier one (aioquic's own ``_buffer`` has no ``.py``)."""
    return [py.with_name(py.stem + SUFFIX) for py in pkg.rglob("*.py") if py.with_name(py.stem + SUFFIX).exists()]


def remove(pkg: Path) -> None:
    twins = _twins(pkg)
    for path in twins:
        path.unlink(missing_ok=True)
    (pkg / STAMP).unlink(missing_ok=True)
    record = _record(pkg)
    if record is not None:
        ours = {_record_path(pkg, path) for path in [*compiled_paths(pkg), *twins]} | {_record_path(pkg, pkg / STAMP)}
        lines = [line for line in record.read_text().splitlines() if line.split(",")[0] not in ours]
        record.write_text("\n".join(lines) + "\n")


def _record(pkg: Path) -> Path | None:
    dist = importlib.metadata.distribution("aioquic")
    files = [f for f in (dist.files or ()) if f.name == "RECORD"]
    return Path(dist.locate_file(files[0])) if files else None


def _record_path(pkg: Path, path: Path) -> str:
    return os.path.relpath(path, pkg.parent)


def _register(pkg: Path) -> None:
    """List the extension modules and the stamp in aioquic's RECORD: pip removes them with it."""
    record = _record(pkg)
    if record is None:
        return
    lines = record.read_text().splitlines()
    known = {line.split(",")[0] for line in lines}
    for path in [*compiled_paths(pkg), pkg / STAMP]:
        if _record_path(pkg, path) not in known:
            lines.append(f"{_record_path(pkg, path)},,")
    record.write_text("\n".join(lines) + "\n")


def build(pkg: Path, version: str, work: Path, cache: Path) -> str:
    """Download, check, compile and install (or copy from ``cache``), then check what was
    installed; where they came from, or RuntimeError saying what failed."""
    origin = f"copied from {cache}"
    if all((cache / (name + SUFFIX)).exists() for name in MODULES):
        for name in MODULES:
            shutil.copyfile(cache / (name + SUFFIX), pkg / (name + SUFFIX))
    else:
        origin = "compiled with Cython"
        compile_modules(pkg, version, work)
        for name in MODULES:
            (cache / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pkg / (name + SUFFIX), cache / (name + SUFFIX))
    smoke = subprocess.run([sys.executable, "-c", SMOKE, *MODULES], capture_output=True, text=True,
                           cwd=work, timeout=120)
    if smoke.returncode or "ok" not in smoke.stdout:
        shutil.rmtree(cache, ignore_errors=True)
        raise RuntimeError(f"the compiled modules failed the in-memory check: {smoke.stderr.strip()[-800:]}")
    return origin


def compile_modules(pkg: Path, version: str, work: Path) -> None:
    """Download the sdist, check its modules are the installed ones, compile them into ``pkg``."""
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--no-binary", ":all:", f"aioquic=={version}", "-d", str(work)],
        capture_output=True, text=True)
    sdists = list(work.glob("aioquic-*.tar.gz"))
    if download.returncode or not sdists:
        raise RuntimeError(f"pip download aioquic=={version} (sdist) failed: {download.stderr.strip()[-500:]}")
    src = work / "src"
    with tarfile.open(sdists[0]) as tar:
        tar.extractall(src, filter="data")
    roots = list(src.glob("aioquic-*/src/aioquic"))
    if not roots:
        raise RuntimeError("the sdist has no src/aioquic")
    sdist_pkg = roots[0]
    tree = work / "build" / "aioquic"
    for name in MODULES:
        ours, theirs = pkg / (name + ".py"), sdist_pkg / (name + ".py")
        if not ours.exists() or not theirs.exists() or ours.read_bytes() != theirs.read_bytes():
            raise RuntimeError(f"aioquic/{name}.py differs from the {version} sdist's: not compiling it")
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(theirs, tree / (name + ".py"))
    # Package markers, so that Cython names the modules aioquic.quic.connection etc.
    for folder in {tree, *((tree / name).parent for name in MODULES)}:
        (folder / "__init__.py").touch()
    setup = work / "build" / "setup.py"
    setup.write_text(
        "from Cython.Build import cythonize\n"
        "from setuptools import Extension, setup\n"
        f"names = {list(MODULES)!r}\n"
        "extensions = [Extension('aioquic.' + n.replace('/', '.'), ['aioquic/' + n + '.py'],\n"
        f"                        extra_compile_args={COMPILE_ARGS!r}) for n in names]\n"
        f"setup(ext_modules=cythonize(extensions, compiler_directives={DIRECTIVES!r}, nthreads={os.cpu_count() or 1},\n"
        "                            quiet=True), script_args=['-q', 'build_ext', '--inplace', '-j',\n"
        f"                            '{os.cpu_count() or 1}'])\n")
    compile_ = subprocess.run([sys.executable, str(setup)], cwd=setup.parent, capture_output=True, text=True)
    if compile_.returncode:
        raise RuntimeError(f"Cython or the C compiler failed: {(compile_.stderr or compile_.stdout).strip()[-800:]}")
    for name in MODULES:
        built = tree / (name + SUFFIX)
        if not built.exists():
            raise RuntimeError(f"the build did not produce aioquic/{name}{SUFFIX}")
        shutil.copyfile(built, pkg / (name + SUFFIX))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--force", action="store_true", help="build even when the stamp says it is done or failed")
    action.add_argument("--remove", action="store_true", help="remove the compiled modules (pure aioquic)")
    action.add_argument("--status", action="store_true", help="print what the stamp says")
    args = parser.parse_args()
    pkg = package_dir()
    version = importlib.metadata.version("aioquic")
    if args.remove:
        remove(pkg)
        print(f"aioquic {version}: pure Python")
        return 0
    key = stamp_key(version)
    try:
        stamp = json.loads((pkg / STAMP).read_text())
    except (OSError, ValueError):
        stamp = {}
    present = all(path.exists() for path in compiled_paths(pkg))
    if args.status:
        print(json.dumps({"version": version, "stamp": stamp, "current": stamp.get("key") == key,
                          "compiled_present": present}))
        return 0
    if not args.force and stamp.get("key") == key and (present or stamp.get("status") != "compiled"):
        return 0
    started = time.monotonic()
    remove(pkg)
    with tempfile.TemporaryDirectory(prefix="aioquic-build-") as work:
        try:
            origin = build(pkg, version, Path(work), cache_dir(key))
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            for path in compiled_paths(pkg):
                path.unlink(missing_ok=True)
            (pkg / STAMP).write_text(json.dumps({"key": key, "status": "pure", "why": str(exc)}))
            _register(pkg)
            print(f"aioquic {version} stays pure Python (works the same, slower): {exc}", file=sys.stderr)
            return 0
    (pkg / STAMP).write_text(json.dumps({"key": key, "status": "compiled", "modules": list(MODULES)}))
    _register(pkg)
    print(f"aioquic {version}: {len(MODULES)} modules {origin} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
