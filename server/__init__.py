"""The OpenAI-compatible HTTP server (`factorllm serve`) over the inference engine."""
