"""ID-Selection visual token pruning for vision-language models, served through vLLM."""
