"""ASGI middlewares `idselect serve` adds around vLLM's OpenAI app (order: `server.serve`)."""
