"""Edge checks of a completion request body: OpenAI's rules, vLLM's request model, the engine's
limits, and the idselect options (validated once into `idselect.options.VisualOptions`)."""
