"""The exception tree shared by every layer.

Each layer raises these (or stdlib types users already catch, such as
``queue.Empty`` and ``TimeoutError``); foreign errors are translated once, at
the I/O edge.
"""


class FabricError(Exception):
    """Base class of every error fabric raises on its own account."""


class WorkerLostError(FabricError):
    """A worker process or node died while running a task, past the retry limit.

    ``task`` names the task, ``pid`` the last worker that died running it,
    ``exitcode`` how it died (``-N`` for signal N) and ``attempts`` how many
    workers it took down; each is ``None`` where the raiser cannot know it.
    """

    def __init__(
        self,
        message: str,
        *,
        task: object = None,
        pid: int | None = None,
        exitcode: int | None = None,
        attempts: int | None = None,
    ) -> None:
        super().__init__(message)
        self.task = task
        self.pid = pid
        self.exitcode = exitcode
        self.attempts = attempts


class ProtocolError(FabricError):
    """A peer sent a frame that does not follow the wire protocol."""


class AuthenticationError(FabricError):
    """A peer could not be authenticated, or was refused."""


class BrokerUnavailable(FabricError):
    """The broker could not be reached within the allowed time."""


class VersionMismatchError(FabricError):
    """Two peers run incompatible versions (protocol, Python or cloudpickle)."""
