"""A small tokenizer the project builds itself, so the demo and tests need no download.

A byte-level BPE trained on a fixed corpus (the templates' markers and plain English), with
Llama-style `<s>`/`</s>` (BOS added), `<unk>`, `<pad>` and `<image>` special tokens.
Training is deterministic, so the same ids come out on every machine.
"""

from __future__ import annotations

from typing import Any

_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT: Human: Assistant: ### [INST] [/INST] <<SYS>> <</SYS>>",
    "<|im_start|>system <|im_start|>user <|im_start|>assistant <|im_end|>",
    "What color is the shape? Is the shape on the left or the right? What is the background?",
    "Describe the image. What is shown in this picture? Answer with one word.",
    "a red circle on a white background. a green square on a gray background.",
    "a blue triangle on a black background. a yellow, purple or orange shape.",
    "left right white gray black red green blue yellow purple orange circle square triangle",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 yes no",
    "Hello! How can I help you today? Thank you. I am an AI assistant.",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def build_demo_tokenizer(vocab_size: int = 600) -> Any:
    """Train the demo tokenizer and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos = core.token_to_id("<s>")
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens=["<image>"], model_max_length=2048)
