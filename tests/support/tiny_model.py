"""A tiny random Llama chat model with a BPE tokenizer trained on the spot (under a second).

Its answers are gibberish, but it has everything a real chat model has — a chat template,
special tokens, an EOS id — so the ``hf_local`` provider and the GPU-queue routing can be
tested without downloading weights.

``TOOLS_CHAT_TEMPLATE`` is a Hermes-style template that takes tools (the system turn lists
them inside ``<tools>``, an assistant turn writes its calls as ``<tool_call>`` blocks, a tool
result comes back inside ``<tool_response>``). ``build_scripted_model`` builds a model that,
under greedy decoding, answers every prompt with the same fixed text (see its docstring).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOLS_CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% for message in messages if message['role'] == 'system' %}{{ message['content'] }}\n{% endfor %}"
    "You may call functions. The tools:\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    'Call one as <tool_call>{"name": <name>, "arguments": <object>}</tool_call>.<|im_end|>\n{% endif %}'
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% if not tools %}<|im_start|>system\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}{% elif message['role'] == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{% for call in message.get('tool_calls', []) %}<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n</tool_call>'
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The capital of France is Paris.",
    "Natural language processing lets computers read and write text.",
    "Queues carry requests from producers to workers, and Redis streams the tokens back.",
    "user assistant system hello world, numbers 0 1 2 3 4 5 6 7 8 9.",
] * 20


def build_tiny_model(
    target: Path, *, seed: int = 0, chat_template: str = CHAT_TEMPLATE, extra_tokens: Sequence[str] = ()
) -> Path:
    """Write a tiny random Llama model and its tokenizer to ``target``; return it.

    ``extra_tokens`` are added to the vocabulary as ordinary (not special) tokens."""
    _build(target, seed=seed, chat_template=chat_template, extra_tokens=extra_tokens)
    return target


def build_scripted_model(target: Path, answer: Sequence[str], *, chat_template: str = TOOLS_CHAT_TEMPLATE) -> Path:
    """A tiny model that answers any prompt with ``"".join(answer)`` and then EOS, greedily.

    Each piece of ``answer`` is a token of its own (added to the vocabulary; pieces must be
    distinct and hold no newline). Every attention and MLP output projection is zero, so the
    hidden state at a position is its token's embedding and the next token depends on the
    current token alone; the output head maps the generation prompt's last token (the newline
    after ``assistant``) to the first piece, each piece to the next and the last one to EOS.
    The model runs through ``generate`` and continuous batching like any other: nothing of
    transformers is replaced.
    """
    import torch

    tokenizer, model = _build(target, seed=0, chat_template=chat_template, extra_tokens=answer)
    start = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-1]
    chain = [start, *(tokenizer.convert_tokens_to_ids(piece) for piece in answer), tokenizer.eos_token_id]
    if len(set(chain)) != len(chain):
        raise ValueError("the answer's pieces must be distinct tokens, none of them the newline")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embeddings = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        head.zero_()
        for current, following in pairwise(chain):
            unit = embeddings[current] / embeddings[current].norm()
            head[following] = 20.0 * unit
    model.save_pretrained(target)
    return target


def _build(target: Path, *, seed: int, chat_template: str, extra_tokens: Sequence[str]) -> tuple[Any, Any]:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<unk>",
    )
    if extra_tokens:
        fast.add_tokens(list(extra_tokens))
    fast.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    fast.save_pretrained(target)
    return fast, model
