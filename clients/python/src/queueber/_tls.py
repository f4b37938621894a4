"""TLS settings: the ``tls*`` arguments of the clients, with the same
environment variables as defaults as the CLI's flags.

* ``tls``: ``QUEUEBER_TLS`` (``--tls``)
* ``tls_ca``: ``QUEUEBER_TLS_CA`` (``--tls-ca``)
* ``tls_client_cert``: ``QUEUEBER_TLS_CLIENT_CERT`` (``--tls-client-cert``)
* ``tls_client_key``: ``QUEUEBER_TLS_CLIENT_KEY`` (``--tls-client-key``)
* ``tls_server_name``: ``QUEUEBER_TLS_SERVER_NAME`` (``--tls-server-name``)

An argument given (not ``None``) wins over its variable; an empty variable
counts as unset.
"""

from __future__ import annotations

import os
import ssl
from typing import Optional, Union

__all__ = ["TLSArg", "PathArg", "resolve", "client_context", "server_name"]

#: ``tls=``: ``True``/``False``, a ready :class:`ssl.SSLContext`, or ``None``
#: (from ``QUEUEBER_TLS`` and the other ``tls_*`` settings).
TLSArg = Union[bool, ssl.SSLContext, None]
PathArg = Union[str, "os.PathLike[str]", None]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _env(name: str) -> Optional[str]:
    value = os.environ.get(name)
    return value if value else None


def _env_flag(name: str) -> bool:
    value = _env(name)
    if value is None:
        return False
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise ValueError(f"{name}={value!r}: expected true or false")


def client_context(ca: PathArg = None, client_cert: PathArg = None,
                   client_key: PathArg = None) -> ssl.SSLContext:
    """A client :class:`ssl.SSLContext` like the CLI's: TLS 1.2 or newer,
    the server's certificate and name verified against the CA certificates
    in ``ca`` (PEM) or, without one, the system's; presenting the client
    certificate ``client_cert`` (PEM chain, leaf first) with its key
    ``client_key`` if given (servers started with ``--tls-client-ca`` need
    one). Raises :class:`ValueError` when a file cannot be loaded."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("tls_client_cert and tls_client_key go together: give both or neither")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=os.fspath(ca) if ca is not None else None)
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        what = repr(os.fspath(ca)) if ca is not None else "of the system"
        raise ValueError(f"cannot load the TLS CA certificates {what}: {e}") from e
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert is not None and client_key is not None:
        try:
            ctx.load_cert_chain(os.fspath(client_cert), os.fspath(client_key))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load the TLS client certificate {os.fspath(client_cert)!r} "
                             f"with key {os.fspath(client_key)!r}: {e}") from e
    return ctx


def resolve(tls: TLSArg, ca: PathArg, client_cert: PathArg,
            client_key: PathArg) -> Optional[ssl.SSLContext]:
    """The context a client connects with (``None``: plaintext), from its
    ``tls*`` arguments and the environment.

    * ``tls=False``: plaintext, whatever the environment says (the file
      arguments must not be given).
    * ``tls=<SSLContext>``: that context as it is (the file arguments must
      not be given; their variables are not read).
    * ``tls=True``, or ``None`` with ``QUEUEBER_TLS=true``, or a CA or a
      client certificate given (argument or variable): TLS with
      :func:`client_context`.
    """
    explicit_files = [name for name, value in (("tls_ca", ca), ("tls_client_cert", client_cert),
                                               ("tls_client_key", client_key))
                      if value is not None]
    if tls is False or isinstance(tls, ssl.SSLContext):
        if explicit_files:
            what = "tls=False" if tls is False else "an SSLContext as tls="
            raise ValueError(f"{', '.join(explicit_files)} cannot be combined with {what}")
        return tls if isinstance(tls, ssl.SSLContext) else None
    if tls is not None and tls is not True:
        raise TypeError(f"tls= takes a bool, an ssl.SSLContext or None, not {type(tls).__name__}")
    if ca is None:
        ca = _env("QUEUEBER_TLS_CA")
    if client_cert is None:
        client_cert = _env("QUEUEBER_TLS_CLIENT_CERT")
    if client_key is None:
        client_key = _env("QUEUEBER_TLS_CLIENT_KEY")
    enabled = tls is True or (tls is None and _env_flag("QUEUEBER_TLS")) \
        or ca is not None or client_cert is not None
    if not enabled:
        return None
    return client_context(ca, client_cert, client_key)


def server_name(given: Optional[str], host: str) -> str:
    """The name the server's certificate must carry: ``tls_server_name``,
    else ``QUEUEBER_TLS_SERVER_NAME``, else the host connected to (a name or
    an IP address)."""
    return given or _env("QUEUEBER_TLS_SERVER_NAME") or host
