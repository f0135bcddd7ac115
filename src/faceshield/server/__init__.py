"""``faceshield serve``: a local web page and REST API (FastAPI) over the protect pipeline.

Install with ``pip install 'faceshield[server]'``. :func:`faceshield.server.app.create_app` builds the app from
:class:`faceshield.server.app.ServerSettings`; :mod:`faceshield.server.worker` runs the jobs.
"""

from __future__ import annotations

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str):
    # lazy: importing faceshield.server must not need FastAPI (it is an optional dependency)
    if name in __all__:
        from faceshield.server import app

        return getattr(app, name)
    raise AttributeError(name)
