"""The idselect OpenAI-compatible server: vLLM's own app plus a thin visual-token-budget layer."""
