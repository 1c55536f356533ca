"""Development tools run from the checkout (not installed): the demo, the server launcher for
tests and benchmarks, and the tiny test-model builders of the non-LLaVA-1.5 architectures."""
