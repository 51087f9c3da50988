"""`ChatSession`: a multi-turn conversation that keeps its KV cache between turns."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from mlx_lm.generate import GenerationResponse
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import LogitsProcessor

from ..models import HunYuanMoEV1ForCausalLM
from ..tokenizer import HunYuanTokenizer
from .settings import GenerationSettings
from .stream import require_text, stream_generate


class ChatSession:
    """A conversation whose KV cache persists across turns, so each turn prefills only the tokens
    the cache lacks: the re-rendered conversation minus its longest prefix already cached."""

    def __init__(
        self,
        model: HunYuanMoEV1ForCausalLM,
        tokenizer: HunYuanTokenizer,
        settings: GenerationSettings | None = None,
        system_prompt: str | None = None,
        enable_thinking: bool | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or GenerationSettings()
        self.system_prompt = system_prompt
        self.enable_thinking = enable_thinking
        self.logits_processors = logits_processors
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and empty the cache."""
        self.messages: list[dict[str, str]] = (
            [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        )
        self.cache = self.settings.make_cache(self.model)
        self.cached_tokens: list[int] = []
        self.prefilled = 0
        self.reused = 0

    def send(self, user_text: str) -> Iterator[GenerationResponse]:
        """Add a user turn and stream the reply; `prefilled` is how many prompt tokens it runs,
        `reused` how many it takes from the cache.

        The reply joins the conversation as it streams, so stopping early keeps what was shown.
        """
        require_text(user_text)
        messages = [*self.messages, {"role": "user", "content": user_text}]
        text = self.tokenizer.apply_chat_template(
            messages, enable_thinking=self.enable_thinking, tokenize=False
        )
        tokens = self.tokenizer.encode(text)
        # Without a rotating window the whole conversation must fit; with one, this turn.
        added = len(tokens) - (0 if self.settings.max_kv_size is None else len(self.cached_tokens))
        self.settings.check_prompt_fits(added, self.model)
        reused = self._reuse_cache(tokens)
        new_tokens = tokens[reused:]
        self.prefilled = len(new_tokens)
        self.reused = reused
        return self._stream(messages, tokens, new_tokens, self._reply_start(messages, text))

    def _stream(
        self,
        messages: list[dict[str, str]],
        tokens: list[int],
        new_tokens: list[int],
        reply: str,
    ) -> Iterator[GenerationResponse]:
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        self.cached_tokens = tokens
        for response in stream_generate(
            self.model,
            self.tokenizer,
            new_tokens,
            self.settings,
            prompt_cache=self.cache,
            logits_processors=self.logits_processors,
        ):
            # mlx-lm has fed every token it yields, the final eos included, to the cache.
            self.cached_tokens.append(response.token)
            reply += response.text
            self.messages[-1]["content"] = reply
            yield response

    def _reply_start(self, messages: list[dict[str, str]], rendered: str) -> str:
        """Text the template appended after the last message (empty unless thinking is off).

        It starts the assistant's reply, as the empty <think> block does in the release's
        training data, so it joins the assistant message and the next render matches the cache.
        """
        bare = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return rendered[len(bare) :] if rendered.startswith(bare) else ""

    def _reuse_cache(self, tokens: list[int]) -> int:
        """Keep the cache's longest prefix of `tokens` (at least one token left to run)."""
        cached = self.cached_tokens
        # A turn interrupted during prefill leaves the cache out of step with cached_tokens.
        if self.cache[0].offset != len(cached):
            self.cache, cached = self.settings.make_cache(self.model), []
        common = 0
        limit = min(len(cached), len(tokens) - 1)
        while common < limit and cached[common] == tokens[common]:
            common += 1
        if common < len(cached):
            if common > 0 and can_trim_prompt_cache(self.cache):
                trim_prompt_cache(self.cache, len(cached) - common)
            else:
                self.cache, common = self.settings.make_cache(self.model), 0
        self.cached_tokens = tokens[:common]
        return common


