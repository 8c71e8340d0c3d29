"""``pneumoscan serve``: the shipped model as a web service, with a page, metrics and an audit log.

Modules: ``settings`` (the typed configuration), ``app`` (``create_app``), ``routes`` (endpoints),
``schemas`` (response models), ``middleware`` (request ids, API keys, upload limit, audit and
metrics per request), ``upload`` (reading the uploaded image), ``pool`` (bounded, micro-batching
inference workers), ``audit`` (SQLite audit log and its export), ``auth``, ``metrics``, ``cli``;
``static/`` holds the page. Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client).
"""
