"""The HTTP server: OpenAI-compatible endpoints over continuous batching.

Modules: :mod:`.scheduler` (one thread owns the model and decodes every running sequence per
step), :mod:`.app` (the FastAPI application: routes, the OpenAI schema, errors, streaming),
``static/`` (the playground page). ``mini-transformer serve`` starts it.
"""
