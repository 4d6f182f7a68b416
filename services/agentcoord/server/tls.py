"""TLS files, checked at start-up: a bad one is one line naming its flag, not a traceback.

grpc reads the PEM files only when a client connects, so a missing file, a key that does
not match the certificate or a CA bundle with no certificate would surface as failed
handshakes. The standard library's ``ssl`` module checks each file first.
"""

from __future__ import annotations

import ssl

import grpc

from agentcoord.core.errors import InvalidInput
from agentcoord.server.config import ServerConfig


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """Return the server's TLS credentials, or None when it serves plaintext.

    Raises:
        InvalidInput: naming ``tls_cert``, ``tls_key`` or ``tls_client_ca`` when that file
            cannot be read or does not hold what the flag asks for.
    """
    if not config.tls_cert:
        return None
    chain = _read("tls_cert", config.tls_cert)
    key = _read("tls_key", config.tls_key)
    _check_certificates("tls_cert", config.tls_cert, chain)
    _check_key(config)
    client_ca = None
    if config.tls_client_ca:
        client_ca = _read("tls_client_ca", config.tls_client_ca)
        _check_certificates("tls_client_ca", config.tls_client_ca, client_ca)
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _flag(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def _read(setting: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise InvalidInput(
            setting, f"{_flag(setting)} {path}: cannot be read: {error.strerror}"
        ) from None


def _check_certificates(setting: str, path: str, pem: bytes) -> None:
    """Check ``pem`` holds at least one PEM certificate and nothing unreadable among them."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError, ValueError):
        raise InvalidInput(
            setting, f"{_flag(setting)} {path}: is not a PEM certificate (chain)"
        ) from None


def _check_key(config: ServerConfig) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An encrypted key would ask for a password on the terminal: answer with none.
        context.load_cert_chain(config.tls_cert, config.tls_key, password=lambda: b"")
    except ssl.SSLError as error:
        if "KEY_VALUES_MISMATCH" in str(error):
            problem = f"does not match the certificate of --tls-cert {config.tls_cert}"
        else:
            problem = "is not an unencrypted PEM private key"
        raise InvalidInput("tls_key", f"--tls-key {config.tls_key}: {problem}") from None
