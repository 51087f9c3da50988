"""The OpenAI-compatible server's parts: protocol, output parser, prompt cache, engine, HTTP app."""
