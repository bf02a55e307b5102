"""Continuous batching for a local transformers model: many requests, one model, one batch.

A ``BatchingEngine`` owns one loaded model and one transformers ``ContinuousBatchingManager``
(``model.init_continuous_batching``): its background thread runs the forward passes, and the
scheduler and paged KV cache are transformers' own. Requests join and leave the running batch
between steps. Any number of threads may ``submit`` at once; each gets a ``BatchHandle`` whose
iterator yields that request's text deltas only.

What the manager does per request, and what the engine adds:

* ``max_new_tokens`` and EOS ids are per request in the manager.
* Sampling: ``do_sample`` is batch-wide in the manager, while temperature, top-k and top-p are
  per request (``per_request_processors``). With ``sampling=True`` the engine samples, gives
  every request explicit temperature/top-k/top-p values, and serves a greedy request as top-k 1
  (a one-token distribution, so the pick is the argmax). With ``sampling=False`` every request
  is greedy and the knobs are ignored. A per-request seed is not supported (``seed`` is
  engine-wide); neither are repetition penalties nor beams.
* Stop strings are not in the manager: the engine watches the decoded text and cancels the
  request when one appears; the reply keeps the stop string, as ``generate`` does.
* A request larger than the whole KV cache, or with token ids outside the vocabulary, is
  refused at ``submit``: in the manager it would fail the whole batch. A request that fits the
  cache but not the room left waits in the manager's queue.
* An exception inside a forward step ends transformers' loop and fails every request it held
  (transformers 5.24 has no per-step recovery); the next ``submit`` starts a new manager.
* ``cancel`` ends the handle at once and asks the manager to drop the request, which it does
  before its next step, freeing the request's KV blocks.

The manager thread starts on the first ``submit``; a forked child never inherits it.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from providers import errors
from providers.huggingface.batch_handle import DONE, BatchHandle, BatchResult, IncrementalDecoder

__all__ = ["BatchHandle", "BatchResult", "BatchingConfig", "BatchingEngine", "IncrementalDecoder"]

logger = logging.getLogger(__name__)

# Stand-in knob values that make transformers build the temperature/top-k/top-p processors;
# every request overrides all three, so these are never applied as such.
_PLACEHOLDER_TEMPERATURE = 0.5
_PLACEHOLDER_TOP_P = 0.5


@dataclass(frozen=True)
class BatchingConfig:
    """How one engine batches and how large its KV cache is.

    The cache holds ``num_blocks`` blocks of ``block_size`` tokens; left unset it is sized for
    ``max_batch_size`` requests of ``max_tokens_per_request`` tokens each, or, when
    ``memory_fraction`` is set, to that share of the free device memory.
    """

    max_batch_size: int = 8
    block_size: int = 256
    num_blocks: int | None = None
    memory_fraction: float | None = None
    max_tokens_per_request: int = 2048
    max_batch_tokens: int = 512  # tokens per forward step; a longer prompt is prefilled in parts
    sampling: bool = True
    seed: int | None = None
    stall_timeout_s: float = 300.0  # no output for this long: the request fails instead of hanging
    poll_s: float = 0.1

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.block_size < 4 or self.max_tokens_per_request < 1:
            raise ValueError("max_batch_size >= 1, block_size >= 4 and max_tokens_per_request >= 1 are required")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be positive")
        if self.memory_fraction is not None and not 0 < self.memory_fraction <= 1:
            raise ValueError("memory_fraction must be in (0, 1]")

    def cache_blocks(self) -> int | None:
        """The number of blocks to ask for, or None to size the cache by ``memory_fraction``."""
        if self.num_blocks is not None:
            return self.num_blocks
        if self.memory_fraction is not None:
            return None
        return -(-self.max_batch_size * self.max_tokens_per_request // self.block_size)


_ENGINES: weakref.WeakSet[BatchingEngine] = weakref.WeakSet()


def _forget_managers_in_child() -> None:
    for engine in list(_ENGINES):
        engine._reset_after_fork()


def _close_all_at_exit() -> None:
    for engine in list(_ENGINES):
        engine.close(timeout_s=5.0)


os.register_at_fork(after_in_child=_forget_managers_in_child)
# The manager's generation thread is not a daemon, and the interpreter joins such threads
# before it runs ``atexit`` handlers: without this hook an engine left open keeps the process
# from exiting. ``threading._register_atexit`` runs before that join (concurrent.futures uses it).
_register_before_thread_join = getattr(threading, "_register_atexit", None)
if _register_before_thread_join is not None:
    _register_before_thread_join(_close_all_at_exit)


class BatchingEngine:
    """One model, one continuous-batching manager, many concurrent requests; thread-safe."""

    def __init__(self, model: Any, tokenizer: Any, config: BatchingConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or BatchingConfig()
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids: frozenset[int] = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._lock = threading.Lock()
        self._manager: Any = None
        self._capacity_tokens = 0
        self._handles: dict[str, BatchHandle] = {}
        self._router: threading.Thread | None = None
        self._pid = os.getpid()
        _ENGINES.add(self)

    def start(self) -> None:
        """Start the manager now (building its KV cache), instead of on the first ``submit``."""
        with self._lock:
            self._running_manager()

    # --- submitting ----------------------------------------------------------------------

    def submit(
        self,
        input_ids: Sequence[int],
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: Sequence[str] = (),
    ) -> BatchHandle:
        """Queue one request; it joins the batch as soon as the cache has room for it.

        Raises ``ContextLengthExceeded`` when the request could never fit in the KV cache and
        ``BadProviderRequest`` for token ids outside the vocabulary: either would otherwise
        fail every request in the batch.
        """
        prompt = [int(token) for token in input_ids]
        if not prompt or max_new_tokens < 1:
            raise errors.BadProviderRequest("an empty prompt or max_new_tokens < 1")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise errors.BadProviderRequest(f"token ids must be in [0, {self.vocab_size})")
        kwargs = self._sampling_kwargs(do_sample, temperature, top_p, top_k)
        with self._lock:
            manager = self._running_manager()
            needed = len(prompt) + max_new_tokens
            if needed > self._capacity_tokens:
                raise errors.ContextLengthExceeded(
                    f"{len(prompt)} prompt + {max_new_tokens} new tokens exceed the KV cache ({self._capacity_tokens})"
                )
            handle = BatchHandle(self, f"cb-{uuid.uuid4().hex}", prompt, max_new_tokens, [s for s in stop if s])
            self._handles[handle.request_id] = handle
        try:
            added = manager.add_request(
                prompt, request_id=handle.request_id, max_new_tokens=max_new_tokens, streaming=True, **kwargs
            )
        except Exception as exc:
            self._drop(handle.request_id)
            raise errors.Overloaded(f"the batch queue is full: {type(exc).__name__}") from exc
        if added is None:
            self._drop(handle.request_id)
            raise errors.ServerError("the batching manager is stopping and refused the request")
        return handle

    def _sampling_kwargs(
        self, do_sample: bool, temperature: float | None, top_p: float | None, top_k: int | None
    ) -> dict[str, Any]:
        if not self.config.sampling:
            return {}
        if not do_sample or temperature == 0:
            return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        return {
            "temperature": float(temperature or 1.0),
            "top_k": int(top_k) if top_k else self.vocab_size,
            "top_p": float(top_p if top_p is not None else 1.0),
        }

    def cancel(self, handle: BatchHandle) -> None:
        """Take the request out of the batch now, freeing its KV blocks; its iterator ends."""
        handle._cancelled.set()
        with self._lock:
            manager = self._manager if self._handles.pop(handle.request_id, None) is not None else None
        if manager is not None:
            manager.cancel_request(handle.request_id)
        handle._deliver(DONE)

    def _drop(self, request_id: str) -> None:
        with self._lock:
            self._handles.pop(request_id, None)

    @property
    def active_requests(self) -> int:
        """Requests submitted and not yet ended."""
        with self._lock:
            return len(self._handles)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the generation loop between two steps; requests stay in the batch and resume after."""
        with self._lock:
            manager = self._running_manager()
        with manager.pause():
            yield

    @property
    def capacity_tokens(self) -> int:
        """Tokens the KV cache holds (0 before the manager starts)."""
        return self._capacity_tokens

    # --- the manager and the router --------------------------------------------------------

    def _running_manager(self) -> Any:
        """The live manager, started (or restarted after a failure) under ``self._lock``."""
        if self._pid != os.getpid():
            self._reset_after_fork()
        if self._manager is not None and self._manager.is_running():
            return self._manager
        if self._manager is not None:
            self._retire(self._manager, "the generation loop stopped")
        self._manager = self._start_manager()
        router = threading.Thread(target=self._route, args=(self._manager,), name="batching-router", daemon=True)
        self._router = router
        router.start()
        return self._manager

    def _start_manager(self) -> Any:
        import torch
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        config = self.config
        generation: dict[str, Any] = {"do_sample": False}
        if config.sampling:
            # top_k = vocab size keeps the top-k processor built but neutral by default.
            generation = {
                "do_sample": True,
                "temperature": _PLACEHOLDER_TEMPERATURE,
                "top_k": self.vocab_size,
                "top_p": _PLACEHOLDER_TOP_P,
            }
        eos = sorted(self.eos_ids) or None
        make_generation_config: Any = GenerationConfig
        generation_config = make_generation_config(
            max_new_tokens=config.max_tokens_per_request,
            eos_token_id=eos,
            pad_token_id=self.tokenizer.pad_token_id,
            **generation,
        )
        cb_config = ContinuousBatchingConfig(
            page_size=config.block_size,
            num_blocks=config.cache_blocks(),
            max_memory_percent=config.memory_fraction,
            max_batch_tokens=config.max_batch_tokens,
            max_requests_per_batch=config.max_batch_size,
            per_request_processors=config.sampling,
            seed=config.seed,
            # Flash kernels are taken only when the model was loaded with them: switching here
            # would change the model under any other user of it.
            auto_switch_to_flash=False,
        )
        with torch.inference_mode():
            manager = self.model.init_continuous_batching(
                generation_config=generation_config, continuous_batching_config=cb_config
            )
            manager.warmup()  # builds the cache now, so its real size is known before any request
            cache = manager.batch_processor.cache
            self._capacity_tokens = int(cache.num_blocks) * config.block_size
            manager.start()
        logger.info(
            "continuous batching: %d requests at once, KV cache %d tokens", config.max_batch_size, self._capacity_tokens
        )
        return manager

    def _route(self, manager: Any) -> None:
        """Hand each output of ``manager`` to its request's handle until the manager stops."""
        while True:
            output = manager.get_result(timeout=self.config.poll_s)
            if output is None:
                if manager.is_running():
                    continue
                with self._lock:
                    if self._manager is manager:
                        self._retire(manager, "the generation loop stopped")
                return
            with self._lock:
                handle = self._handles.get(output.request_id)
                if handle is not None and output.is_finished():
                    del self._handles[output.request_id]
            if handle is not None:
                handle._deliver(output)

    def _retire(self, manager: Any, why: str) -> None:
        """Fail every request still waiting on ``manager``; called under ``self._lock``."""
        fatal = getattr(manager.background_thread_status, "fatal_error", None)
        message = f"{why}: {fatal}" if fatal is not None else why
        for handle in self._handles.values():
            handle._deliver(errors.ServerError(message))
        self._handles.clear()
        if self._manager is manager:
            self._manager = None

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the manager now; requests still running fail."""
        with self._lock:
            manager, self._manager = self._manager, None
            if manager is not None:
                self._retire(manager, "the engine was closed")
        if manager is not None and manager.is_running():
            manager.stop(block=True, timeout=timeout_s, hard_stop=True)
        router = self._router
        if router is not None and router is not threading.current_thread():
            router.join(timeout=timeout_s)

    def _reset_after_fork(self) -> None:
        """In a forked child: forget the parent's manager, router and requests (their threads
        do not exist here); the next ``submit`` starts a manager of the child's own."""
        self._lock = threading.Lock()
        self._manager = None
        self._router = None
        self._handles = {}
        self._pid = os.getpid()
