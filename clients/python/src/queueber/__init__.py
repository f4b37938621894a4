"""Python client for queueber, a durable leased work-queue server.

* :mod:`queueber.aio` — the asyncio client (``queueber.aio.connect``).
* :class:`queueber.Client` — the same API, blocking (``queueber.connect``).
* :mod:`queueber.errors` — one exception per protocol error code, all
  :class:`QueueberError`.
* :mod:`queueber.types` — the result types (:class:`Message`,
  :class:`Lease`, :class:`RemovedAndPolled`, :class:`QueueStats`,
  :class:`ServerInfo`, :class:`QueuePolicy`, :class:`DeadLetter`, ...).
"""

from . import aio, errors, types
from .errors import (ConnectionClosed, ConnectTimeout, DiskFull, FrameTooLarge, Internal,
                     InvalidArgument, InvalidName, MalformedFrame, PayloadTooLarge,
                     QueueberError, ShuttingDown, TLSError, TooManyInFlight, TooManyMessages,
                     Unauthenticated, Unavailable, UnknownOperation, UnknownQueue,
                     PermissionDenied, QueueFull)
from .sync import Client, SyncConsumer, SyncMessage, connect
from .types import (MAX_DELIVERIES_LIMIT, MAX_RETENTION_MS, UNLIMITED, DeadLetter, DeadPeeked,
                    DeadReason, Lease, Limits, Message, NewMessage, Peeked, PolicyInfo,
                    QueueCreated, QueuePolicy, QueueRef, QueueStats, Redriven, RemovedAndPolled,
                    ServerInfo)
from .worker import ConsumedMessage, Consumer

__version__ = "0.1.0"

__all__ = [
    "aio", "errors", "types",
    "Client", "connect", "SyncConsumer", "SyncMessage",
    "Consumer", "ConsumedMessage",
    "Lease", "Limits", "Message", "NewMessage", "Peeked", "QueueRef", "QueueStats", "ServerInfo",
    "RemovedAndPolled",
    "QueuePolicy", "PolicyInfo", "QueueCreated", "UNLIMITED", "MAX_DELIVERIES_LIMIT",
    "MAX_RETENTION_MS",
    "DeadLetter", "DeadPeeked", "DeadReason", "Redriven",
    "QueueberError", "Internal", "InvalidArgument", "InvalidName", "UnknownQueue",
    "PayloadTooLarge", "TooManyMessages", "FrameTooLarge", "MalformedFrame",
    "UnknownOperation", "TooManyInFlight", "ShuttingDown", "Unavailable", "DiskFull",
    "Unauthenticated", "PermissionDenied", "QueueFull",
    "ConnectionClosed", "ConnectTimeout", "TLSError",
]
