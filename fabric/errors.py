"""The exception tree shared by every layer.

Each layer raises these (or stdlib types users already catch, such as
``queue.Empty`` and ``TimeoutError``); foreign errors are translated once, at
the I/O edge.
"""


class FabricError(Exception):
    """Base class of every error fabric raises on its own account."""


class WorkerLostError(FabricError):
    """A worker process or node died while running a task, past the retry limit."""


class ProtocolError(FabricError):
    """A peer sent a frame that does not follow the wire protocol."""


class AuthenticationError(FabricError):
    """A peer could not be authenticated, or was refused."""


class BrokerUnavailable(FabricError):
    """The broker could not be reached within the allowed time."""


class VersionMismatchError(FabricError):
    """Two peers run incompatible versions (protocol, Python or cloudpickle)."""
