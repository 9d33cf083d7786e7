"""The agent's own identity: an EC P-256 key made once, and the client certificate the relay's
CA issues for it (docs/PROTOCOL.md, "Enrolment"), kept in the agent's state directory.

``AGENT_STATE_DIR`` (or ``state_dir`` in the config file; default: ``<config file without
its suffix>.state`` beside the config file; an agent configured by environment variables
only enrols when it is set)::

    agent-key.pem    the private key (mode 0600; it never leaves the host)
    agent-cert.pem   the certificate, then the CA's (written atomically: temp file + rename)
    .lock            held while an agent process uses the directory

The directory is created with mode 0700; an existing one that others may read or enter, or a
key file others may read, is refused with a message naming the fix (``chmod``). Two agent
processes never share one identity: a second process finding the directory locked runs
without it (registration JWT only) and says so.

The certificate's common name is the agent *instance* (the relay names links, audit lines and
revocations by it), so an enrolled agent keeps its instance across restarts. It is renewed
over the live link when :meth:`AgentIdentity.renew_at` has passed (60 % of the lifetime left
at the time it was written, so before two thirds), with the same key.

Key generation, certificate requests, reading a certificate and signing run in a short-lived
helper process (this module's :func:`helper_main`, started as ``tunnel-agent _identity ...``):
the ``cryptography`` package they need holds about 10 MB of RSS once imported, which the
long-running agent does not pay (its TLS stack presents the certificate from the files).
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import os
import stat
import sys
import time
from pathlib import Path

from tunnel.ops.files import write_private

KEY_FILE = "agent-key.pem"
CERT_FILE = "agent-cert.pem"
LOCK_FILE = ".lock"
#: Share of the remaining lifetime after which the certificate is renewed (before 2/3).
RENEW_AFTER = 0.6
#: A certificate this close to its end (s) is not presented any more.
EXPIRY_MARGIN = 30.0
#: What the agent signs, followed by the relay's nonce, to prove it holds the key of the
#: certificate in its ``auth`` where TLS did not carry it (QUIC; docs/PROTOCOL.md).
PROOF_CONTEXT = b"tunnel agent certificate proof v1\x00"
#: The SAN URI prefixes the relay writes (relay.state.enrolment).
CUSTOMER_URI = "tunnel:customer/"
INSTANCE_URI = "tunnel:instance/"
RESOURCE_URI = "tunnel:resource/"


#: The argument that makes ``tunnel-agent`` the helper process (agent.cli).
HELPER = "_identity"
#: The longest a helper may take (s): importing cryptography on a slow host, a key made.
HELPER_TIMEOUT = 60.0


class IdentityError(Exception):
    """The state directory or its files cannot be used; the message names the fix."""


class StateDirUnavailable(IdentityError):
    """The state directory cannot be created or written (as opposed to being unsafe)."""


def default_state_dir(config_file: str | None, environ) -> str | None:
    """``AGENT_STATE_DIR``, else ``<config file without suffix>.state`` beside the config
    file, else None (environment-only configuration: no enrolment)."""
    if environ.get("AGENT_STATE_DIR"):
        return environ["AGENT_STATE_DIR"]
    if config_file:
        path = Path(config_file)
        return str(path.with_name(path.stem + ".state"))
    return None


def _check_private(path: Path, what: str, allowed: int) -> None:
    st = path.stat()
    loose = stat.S_IMODE(st.st_mode) & ~allowed & 0o777
    if loose:
        raise IdentityError(f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}: other users may read it; "
                            f"run 'chmod {allowed:o} {path}' (it holds the agent's private key)")




class AgentIdentity:
    """The key and certificate in one state directory (see the module docstring). Open it
    with :meth:`open`; the certificate fields are None before the first enrolment."""

    def __init__(self, directory: Path, lock_fd: int) -> None:
        self.directory = directory
        self.key_file = directory / KEY_FILE
        self.cert_file = directory / CERT_FILE
        self._lock_fd = lock_fd
        #: From the certificate: the instance it names, its customer, the resource ids it
        #: allows (None: customer-wide), its serial, end (Unix s) and when it was written.
        self.instance: str | None = None
        self.customer_id: str | None = None
        self.resource_ids: list[str] | None = None
        self.serial: int | None = None
        self.not_after: float | None = None
        self.written_at: float | None = None
        #: Held while one link enrols or renews (the other slots then find it done).
        self.busy = asyncio.Lock()

    # --- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, state_dir: str | os.PathLike) -> "AgentIdentity | None":
        """Create or check the directory, take its lock, make the key if there is none, read
        the certificate if any. None when another agent process holds the directory;
        :class:`IdentityError` when it cannot be used."""
        directory = Path(state_dir)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateDirUnavailable(f"cannot create the agent state directory {directory} (AGENT_STATE_DIR): "
                                      f"{exc.strerror or exc}; create it (mode 0700) or point AGENT_STATE_DIR "
                                      "at a writable directory") from None
        if not directory.is_dir():
            raise IdentityError(f"the agent state directory {directory} (AGENT_STATE_DIR) is not a directory")
        _check_private(directory, "the agent state directory", 0o700)
        try:
            lock_fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateDirUnavailable(f"cannot write in the agent state directory {directory}: "
                                      f"{exc.strerror or exc}; make it writable by the agent's user") from None
        import fcntl

        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(lock_fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return None
            raise IdentityError(f"cannot lock the agent state directory {directory}: {exc.strerror or exc}") from None
        try:
            identity = cls(directory, lock_fd)
            if identity.key_file.exists():
                _check_private(identity.key_file, "the agent key", 0o600)
            else:
                _helper(["keygen", str(identity.key_file)])
            if identity.cert_file.exists():
                identity._apply(_helper(["info", str(identity.cert_file), str(identity.key_file)]),
                                identity.cert_file.stat().st_mtime)
        except BaseException:
            os.close(lock_fd)
            raise
        return identity

    def close(self) -> None:
        """Release the directory's lock."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # --- the certificate -------------------------------------------------------------------

    def _apply(self, info: str, written_at: float) -> None:
        """Take the fields of the helper's ``info`` answer (JSON)."""
        fields = json.loads(info)
        self.instance = fields["instance"]
        self.customer_id = fields["customer_id"]
        self.resource_ids = fields["resource_ids"]
        self.serial = int(fields["serial"])
        self.not_after = float(fields["not_after"])
        self.written_at = written_at

    @property
    def enrolled(self) -> bool:
        return self.not_after is not None

    def usable(self, now: float) -> bool:
        """A certificate is there and not (nearly) expired: links present it."""
        return self.not_after is not None and now < self.not_after - EXPIRY_MARGIN

    def renew_at(self) -> float | None:
        """When to ask for the next certificate (Unix s), None before the first."""
        if self.not_after is None or self.written_at is None:
            return None
        return self.written_at + RENEW_AFTER * max(0.0, self.not_after - self.written_at)

    async def csr(self, instance: str) -> str:
        """A certificate request for this key naming ``instance`` (CN) and nothing else."""
        return await _helper_async(["csr", str(self.key_file), instance])

    async def store(self, certificate: str, now: float) -> None:
        """Check ``certificate`` (PEM chain from ``enrolled``) is for this key, then replace the
        certificate file atomically; links made from now on present it."""
        if not isinstance(certificate, str) or len(certificate) > 64 * 1024:
            raise IdentityError("the relay's certificate is not a PEM text")
        tmp = self.cert_file.with_name(f".{CERT_FILE}.{os.urandom(4).hex()}.tmp")
        try:
            write_private(tmp, certificate.encode("ascii", "replace"), 0o644)
            info = await _helper_async(["info", str(tmp), str(self.key_file)])
            os.utime(tmp, (now, now))
            os.replace(tmp, self.cert_file)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        self._apply(info, now)

    async def sign(self, data: bytes) -> bytes:
        """ECDSA-SHA256 signature of ``data`` by the key (the QUIC link's proof, docs/PROTOCOL.md)."""
        return base64.b64decode(await _helper_async(["sign", str(self.key_file)], base64.b64encode(data)))

    def certificate_pem(self) -> str:
        return self.cert_file.read_text("ascii")

    def expires(self) -> str:
        """The certificate's end for log lines (UTC, ISO 8601)."""
        if self.not_after is None:
            return "never enrolled"
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.not_after))


# --------------------------------------------------------------------------- the helper process


def _helper_command(args: list[str]) -> list[str]:
    if getattr(sys, "frozen", False):  # the single-file build: the binary itself
        return [sys.executable, HELPER, *args]
    return [sys.executable, "-m", "agent", HELPER, *args]


def _helper(args: list[str], data: bytes = b"") -> str:
    """Run the helper for ``args`` and wait (at start); its output, or IdentityError."""
    import subprocess

    try:
        out = subprocess.run(_helper_command(args), input=data, capture_output=True, timeout=HELPER_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IdentityError(f"cannot run the agent's key helper: {exc}") from None
    return _helper_answer(out.returncode, out.stdout, out.stderr)


async def _helper_async(args: list[str], data: bytes = b"") -> str:
    """:func:`_helper` without blocking the event loop."""
    try:
        proc = await asyncio.create_subprocess_exec(*_helper_command(args), stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise IdentityError(f"cannot run the agent's key helper: {exc}") from None
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(data), HELPER_TIMEOUT)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        proc.kill()
        await proc.wait()
        raise
    return _helper_answer(proc.returncode, stdout, stderr)


def _helper_answer(code: int, stdout: bytes, stderr: bytes) -> str:
    if code != 0:
        lines = stderr.decode("utf-8", "replace").strip().splitlines()
        raise IdentityError(lines[-1] if lines else f"the agent's key helper failed (exit {code})")
    return stdout.decode("ascii")


def helper_main(argv: list[str]) -> int:
    """The helper process: ``keygen KEY``, ``csr KEY INSTANCE``, ``sign KEY`` (base64 data on
    stdin) or ``info CERT KEY`` (JSON of what the certificate says, after checking it is for
    the key); the answer on stdout, a one-line error on stderr and exit 1."""
    ops = {"keygen": _keygen, "csr": _csr, "sign": _sign, "info": _info}
    if not argv or argv[0] not in ops:
        print(f"usage: {HELPER} {{{','.join(ops)}}} ARGS", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(ops[argv[0]](*argv[1:]))
    except (IdentityError, OSError, ValueError, TypeError) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def _load_key(key_file: str):
    from cryptography.hazmat.primitives import serialization

    try:
        with open(key_file, "rb") as f:
            return serialization.load_pem_private_key(f.read(), None)
    except (ValueError, TypeError, OSError) as exc:
        raise IdentityError(f"cannot read the agent key {key_file}: {getattr(exc, 'strerror', None) or exc}; "
                            "remove it and the certificate beside it to enrol again with a registration JWT") from None


def _keygen(key_file: str) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never over an existing key
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
        fh.flush()
        os.fsync(fh.fileno())
    return ""


def _csr(key_file: str, instance: str) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, instance)]))
               .sign(_load_key(key_file), hashes.SHA256()))
    return request.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _sign(key_file: str) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    data = base64.b64decode(sys.stdin.buffer.read().strip(), validate=True)
    return base64.b64encode(_load_key(key_file).sign(data, ec.ECDSA(hashes.SHA256()))).decode("ascii")


def _info(cert_file: str, key_file: str) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        with open(cert_file, "rb") as f:
            cert = x509.load_pem_x509_certificates(f.read())[0]
    except (ValueError, IndexError):
        raise IdentityError(f"{cert_file} is not a PEM certificate; remove it to enrol again") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(serialization.Encoding.DER, spki) != \
            _load_key(key_file).public_key().public_bytes(serialization.Encoding.DER, spki):
        raise IdentityError(f"the certificate {cert_file} is not for the key {key_file}; remove the certificate "
                            "to enrol again")
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    resources = [u[len(RESOURCE_URI):] for u in uris if u.startswith(RESOURCE_URI)]
    return json.dumps({
        "instance": next((u[len(INSTANCE_URI):] for u in uris if u.startswith(INSTANCE_URI)), None),
        "customer_id": next((u[len(CUSTOMER_URI):] for u in uris if u.startswith(CUSTOMER_URI)), None),
        "resource_ids": resources or None,
        "serial": str(cert.serial_number),
        "not_after": cert.not_valid_after_utc.timestamp(),
    })
