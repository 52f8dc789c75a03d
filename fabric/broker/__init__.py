"""fabric.broker: the ZeroMQ broker that routes tasks and object calls.

It never unpickles anything and never imports ``fabric.local``.
"""

__all__: list[str] = []
