"""fabric.remote: Manager, shared-object proxies, the cluster executor and worker nodes."""

__all__: list[str] = []
