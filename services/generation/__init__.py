"""The generation service: streams grounded answers from an OpenAI-compatible LLM or the offline extractive answerer."""
