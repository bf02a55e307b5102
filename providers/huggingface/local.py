"""The ``hf_local`` provider: a transformers model in this worker process, streamed token by
token.

Generation runs in a thread feeding a ``TextIteratorStreamer``; the request's thread reads the
streamer and hands each piece to ``on_chunk``. A stopping criterion watches an event that is
set when the request is cancelled, passes its deadline or ``timeout_s`` (through
``CallGuard``), so a stopped request stops generating instead of running on in the
background. One generation runs at a time per model.

With ``max_batch_size`` above 1 the provider serves up to that many requests at once from the
one model, through a ``BatchingEngine`` (transformers' continuous batching): each request's
thread submits its prompt and reads its own deltas, and a cancel, a deadline or a lost lease
takes it out of the batch at once. The engine's manager then owns the model: ``generate`` is
never called on it. Under batching a request's temperature, top-p, top-k, stop words and
``max_new_tokens`` apply; ``seed``, ``repetition_penalty``, ``min_new_tokens`` and
``num_beams`` do not (the batch samples with one generator and decodes without beams).

Tools (``providers.huggingface.tool_calls``): a call that offers tools gives them to the chat
template, and the answer is read in the entry's ``tool_call_format``: text outside tool-call
blocks streams as it comes, each call goes out as one tool-call fragment when its block
completes, and the reply ends with ``tool_calls``. ``tool_choice`` ``required`` or a named
function cannot be enforced on a local model: the template gets the tools and the model
decides. Once the model is loaded, an entry without ``supports_tools`` gets it from the chat
template (``template_takes_tools``), and the provider's ``config`` says so.
"""

from __future__ import annotations

import threading
from typing import Any

from providers import errors
from providers.base import ChatProvider, OnChunk, ProviderCall
from providers.guard import CallGuard
from providers.huggingface.batching import BatchHandle, BatchingConfig, BatchingEngine
from providers.huggingface.local_models import LoadedModel, load_model
from providers.huggingface.tool_calls import (
    TOOL_CALL_FORMATS,
    GeneratedReply,
    PassThrough,
    Splitter,
    detect_format,
    template_messages,
    template_source,
    template_takes_tools,
)
from providers.messages import merge_generation_kwargs, usage_from
from providers.requirements import needs_of
from settings.providers import HfLocalConfig
from tasks.contract.schemas import AssistantReply

# generation_kwargs names -> transformers' generate() names; anything else is dropped.
_GENERATE_KWARGS = {
    "max_tokens": "max_new_tokens",
    "max_new_tokens": "max_new_tokens",
    "min_new_tokens": "min_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repetition_penalty",
    "do_sample": "do_sample",
    "num_beams": "num_beams",
}


# The request's names for the cap on generated tokens that map to ``max_new_tokens``.
_OUTPUT_LIMITS = frozenset(name for name, target in _GENERATE_KWARGS.items() if target == "max_new_tokens")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class HfLocalProvider(ChatProvider):
    """A local transformers chat model; see the module docstring."""

    config: HfLocalConfig

    def __init__(self, provider_id: str, config: HfLocalConfig) -> None:
        super().__init__(provider_id, config)
        self.config = config
        self._loaded: LoadedModel | None = None
        self._engine: BatchingEngine | None = None
        self._load_lock = threading.Lock()
        self._generate_lock = threading.Lock()
        self._template_lock = threading.Lock()
        self.tool_call_format: str = config.tool_call_format

    @property
    def batching(self) -> bool:
        """Whether requests are batched (``max_batch_size`` above 1)."""
        return self.config.max_batch_size > 1

    def warm_up(self) -> None:
        """Load the model now (called at worker start for the queues the worker consumes), and
        when batching start the engine, so its KV cache is allocated before the first request."""
        self._model()
        if self.batching:
            self._batching_engine().start()

    def _model(self) -> LoadedModel:
        with self._load_lock:
            if self._loaded is None:
                self._loaded = self._read_template(load_model(self.config))
            return self._loaded

    def _read_template(self, loaded: LoadedModel) -> LoadedModel:
        """Learn from the loaded tokenizer whether the template takes tools and how calls read."""
        config = self.config
        if config.supports_tools is None:
            takes_tools = template_takes_tools(template_source(loaded.tokenizer, config.chat_template))
            self.config = config.model_copy(update={"supports_tools": takes_tools})
        if config.tool_call_format == "auto":
            self.tool_call_format = detect_format(loaded.tokenizer, config.chat_template)
        return loaded

    def _batching_engine(self) -> BatchingEngine:
        loaded = self._model()
        with self._load_lock:
            if self._engine is None:
                config = self.config
                self._engine = BatchingEngine(
                    loaded.model,
                    loaded.tokenizer,
                    BatchingConfig(
                        max_batch_size=config.max_batch_size,
                        block_size=config.kv_block_size,
                        num_blocks=config.kv_num_blocks,
                        memory_fraction=config.kv_memory_fraction,
                        max_tokens_per_request=config.max_tokens_per_request,
                        # The call's guard enforces timeout_s and the deadline; this only catches
                        # a generation loop that stopped answering.
                        stall_timeout_s=config.timeout_s,
                    ),
                )
            return self._engine

    def generate_kwargs(self, call: ProviderCall) -> dict[str, Any]:
        """``generate()`` arguments from the config's and the request's generation_kwargs.

        The entry's ``max_new_tokens`` is both the default and the cap: a request may ask for
        fewer tokens, never more (``num_beams`` is bounded when the request is read:
        ``Settings.max_num_beams``)."""
        cap = self.config.max_new_tokens
        merged = merge_generation_kwargs(self.config.generation_kwargs, call.generation_kwargs, max_output_tokens=cap)
        kwargs: dict[str, Any] = {"max_new_tokens": cap}
        for name, value in merged.items():
            if name in _GENERATE_KWARGS:
                kwargs[_GENERATE_KWARGS[name]] = value
        kwargs["max_new_tokens"] = min([cap, *(v for k, v in merged.items() if k in _OUTPUT_LIMITS and _is_count(v))])
        temperature = kwargs.get("temperature")
        kwargs.setdefault("do_sample", bool(temperature and temperature > 0))
        if not kwargs["do_sample"]:
            # Greedy decoding: sampling knobs would only produce warnings.
            for knob in ("temperature", "top_p", "top_k"):
                kwargs.pop(knob, None)
        stops = [*self.config.stop_words, *(merged.get("stop") or [])]
        if stops:
            kwargs["stop_strings"] = stops
        return kwargs

    def _template_kwargs(self, call: ProviderCall) -> dict[str, Any]:
        template_kwargs: dict[str, Any] = {"chat_template": self.config.chat_template}
        if self.config.enable_thinking is not None:
            template_kwargs["enable_thinking"] = self.config.enable_thinking
        if call.offers_tools and call.tools:
            template_kwargs["tools"] = [tool.model_dump(mode="json", exclude_none=True) for tool in call.tools]
        return template_kwargs

    def render_prompt(self, call: ProviderCall) -> str:
        """The prompt text the chat template makes of ``call`` (tools included)."""
        tokenizer = self._model().tokenizer
        with self._template_lock:
            rendered = tokenizer.apply_chat_template(
                template_messages(call.messages),
                add_generation_prompt=True,
                tokenize=False,
                **self._template_kwargs(call),
            )
        return str(rendered)

    def _encode(self, tokenizer: Any, call: ProviderCall, **kwargs: Any) -> Any:
        # One tokenizer serves every request thread; the template step is the only one that
        # may reconfigure it (padding, truncation), so it runs one thread at a time.
        with self._template_lock:
            return tokenizer.apply_chat_template(
                template_messages(call.messages),
                add_generation_prompt=True,
                return_dict=True,
                **kwargs,
                **self._template_kwargs(call),
            )

    def splitter(self, call: ProviderCall, tokenizer: Any, prompt: list[int]) -> Splitter:
        """How this call's answer is read: for tool calls when it offers tools, else as text."""
        if not call.offers_tools:
            return PassThrough()
        prefix = tokenizer.decode(prompt) if self.tool_call_format == "template" else ""
        return TOOL_CALL_FORMATS[self.tool_call_format](tokenizer, prefix)

    def run(self, call: ProviderCall, on_chunk: OnChunk) -> list[AssistantReply]:
        """Generate a reply, streaming each decoded piece through ``on_chunk``."""
        self._model()
        if needs_of(call).tools and not self.config.capabilities().tools:
            # The chain skips such a provider once it is loaded; this catches a call that
            # reached it before (the model loads on its first call).
            raise errors.Unsupported(f"{self.provider_id}: the model's chat template takes no tools")
        if self.batching:
            return self._run_batched(call, on_chunk)
        return self._run_alone(call, on_chunk)

    def _run_batched(self, call: ProviderCall, on_chunk: OnChunk) -> list[AssistantReply]:
        """One request in the shared batch: submit, read its own deltas, leave on any stop."""
        engine = self._batching_engine()
        encoded = self._encode(engine.tokenizer, call)
        prompt = [int(token) for token in encoded["input_ids"]]
        kwargs = self.generate_kwargs(call)
        reply = GeneratedReply(on_chunk, self.config.model, self.splitter(call, engine.tokenizer, prompt))
        handle: BatchHandle | None = None
        try:
            with CallGuard(call, self.config, self.provider_id) as guard:
                handle = engine.submit(
                    prompt,
                    max_new_tokens=kwargs["max_new_tokens"],
                    do_sample=bool(kwargs["do_sample"]),
                    temperature=kwargs.get("temperature"),
                    top_p=kwargs.get("top_p"),
                    top_k=kwargs.get("top_k"),
                    stop=kwargs.get("stop_strings", ()),
                )
                submitted = handle
                guard.attach(lambda: engine.cancel(submitted))
                for text in handle:
                    guard.chunk_received()
                    reply.feed(text)
                guard.raise_if_fired()
                reply.close()
        finally:
            if handle is not None and handle.result is None:
                engine.cancel(handle)  # a stop raised from on_chunk: leave the batch now
        result = handle.result
        if result is None:
            raise errors.ServerError(f"{self.provider_id}: the request left the batch without an answer")
        return reply.replies(result.finish_reason, usage_from(result.prompt_tokens, result.completion_tokens))

    def _run_alone(self, call: ProviderCall, on_chunk: OnChunk) -> list[AssistantReply]:
        """One generation at a time on the model, through ``generate``."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        loaded = self._model()
        tokenizer = loaded.tokenizer
        inputs = self._encode(tokenizer, call, return_tensors="pt").to(loaded.model.device)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        prompt = [int(token) for token in inputs["input_ids"][0]]
        reply = GeneratedReply(on_chunk, self.config.model, self.splitter(call, tokenizer, prompt))
        kwargs = self.generate_kwargs(call)
        if "stop_strings" in kwargs:
            kwargs["tokenizer"] = tokenizer
        seed = call.generation_kwargs.get("seed")
        stop = threading.Event()

        class _StopWhenSet(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        streamer: Any = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        outcome: dict[str, Any] = {}

        def generate() -> None:
            try:
                if isinstance(seed, int):
                    torch.manual_seed(seed)
                with torch.inference_mode():
                    outcome["ids"] = loaded.model.generate(
                        **inputs, streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopWhenSet()]), **kwargs
                    )
            except BaseException as exc:  # noqa: BLE001 - reported to the reading thread below
                outcome["error"] = exc
                streamer.end()

        with self._generate_lock, CallGuard(call, self.config, self.provider_id) as guard:
            guard.attach(stop.set)
            worker = threading.Thread(target=generate, name=f"generate-{self.provider_id}", daemon=True)
            worker.start()
            try:
                for text in streamer:
                    guard.chunk_received()
                    reply.feed(text)
            finally:
                stop.set()
                worker.join()
            guard.raise_if_fired()
            if "error" not in outcome:
                reply.close()
        if "error" in outcome:
            raise translate_local_error(outcome["error"], self.provider_id)

        generated = outcome["ids"][0][prompt_tokens:]
        completion_tokens = int(generated.shape[0])
        finish_reason = "stop"
        eos = loaded.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        if completion_tokens >= kwargs["max_new_tokens"] and int(generated[-1]) not in eos_ids:
            finish_reason = "length"
        return reply.replies(finish_reason, usage_from(prompt_tokens, completion_tokens))


def translate_local_error(exc: BaseException, provider_id: str) -> errors.ProviderError:
    """The taxonomy error for a failure inside ``generate``."""
    name = type(exc).__name__
    if name == "OutOfMemoryError":
        return errors.Overloaded(f"{provider_id}: out of GPU memory")
    if isinstance(exc, errors.ProviderError):
        return exc
    return errors.ServerError(f"{provider_id}: generation failed: {name}: {exc}")
