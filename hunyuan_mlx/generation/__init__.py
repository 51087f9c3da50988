"""Generation: settings (`settings`), the chat-template prompt and streaming loop (`stream`),
multi-turn chat with a kept KV cache (`session`) and terminal display (`display`)."""

from .session import ChatSession
from .settings import GenerationSettings
from .stream import build_prompt, generate, stream_generate

__all__ = ["ChatSession", "GenerationSettings", "build_prompt", "generate", "stream_generate"]
