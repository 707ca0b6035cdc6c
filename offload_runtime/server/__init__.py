"""The OpenAI-compatible server: app.py (routes, errors, streaming), schema.py (request validation),
requests.py (options, prompts, response shapes), engine.py (the engine worker: queue, contexts,
cancellation), http.py (uvicorn adapted). The command line is offload_runtime/serve.py."""
