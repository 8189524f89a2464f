"""The generative task: rows to tokens (loss on response tokens only), the per-row loss, perplexity, sample generations."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import datasets
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

IGNORE = -100  # a label the loss skips: prompt tokens and padding

Encoded = list[dict[str, list[int]]]


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """A prompt as the model sees it before its response: the chat template's user turn and assistant header, or
    the prompt and a newline for a tokenizer without a chat template."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return f"{prompt}\n"


def _response_text(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> str:
    """What follows `render_prompt(prompt)` in a whole exchange: the response and its end-of-turn marker."""
    if tokenizer.chat_template:
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        whole, head = tokenizer.apply_chat_template(turns, tokenize=False), render_prompt(tokenizer, prompt)
        if whole.startswith(head):
            return whole[len(head) :]
    return response + (tokenizer.eos_token or "")


def _ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def encode_instructions(prompts: list[str], responses: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    """Prompt and response tokens of each row, labelled so that only the response is scored.

    A row longer than `max_length` loses the middle of its prompt first (the template's header and the end of the
    prompt stay), down to half the length, then the end of its response: the row still teaches a response, and
    it stays one row (one example, one unit of privacy).
    """
    heads = _ids(tokenizer, [render_prompt(tokenizer, p) for p in prompts])
    tails = _ids(tokenizer, [_response_text(tokenizer, p, r) for p, r in zip(prompts, responses)])
    rows = []
    for head, tail in zip(heads, tails):
        keep_tail = min(len(tail), max(max_length - len(head), max_length // 2))
        if len(head) > (room := max_length - keep_tail):
            head = head[: room // 2] + head[len(head) - (room - room // 2) :]
        tail = tail[:keep_tail]
        rows.append(
            {"input_ids": head + tail, "attention_mask": [1] * (len(head) + len(tail)), "labels": [IGNORE] * len(head) + tail}
        )
    return rows


def encode_texts(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    """Each text's tokens and an end-of-text marker, cut to `max_length`; every token is scored."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows = []
    for ids in tokenizer(texts)["input_ids"] if texts else []:
        ids = (ids + eos if ids[-1:] != eos else ids)[:max_length]  # some tokenizers end every text with it already
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    return rows


def encode_lm(examples: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    """A causal LM's rows (columns `text`, or `prompt` and `response`) as token ids and labels, unpadded."""
    if "prompt" in examples.column_names:
        return encode_instructions(list(examples["prompt"]), list(examples["response"]), tokenizer, max_length)
    return encode_texts(list(examples["text"]), tokenizer, max_length)


def _bf16(device: torch.device):
    """bf16 autocast for generating on a GPU that has it (half the memory traffic); fp32 elsewhere. Training and
    scoring stay fp32: Opacus clips per-row gradients, which bf16's 8-bit mantissa would blur, and a perplexity
    must not depend on the device that computed it."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and torch.cuda.is_bf16_supported())


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed next-token loss over its scored tokens, and how many tokens it scored."""
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE, reduction="none")
    return nll.sum(1), (targets != IGNORE).sum(1)


def row_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The batch loss to train on: each row's mean token loss, averaged over rows.

    Not the Hugging Face loss (one mean over all tokens of the batch): there a row's gradient would be divided
    by the batch's token count, so adding or removing one row would rescale every other row's contribution,
    and per-sample clipping would no longer bound a row's influence. Here a row's gradient depends on that row
    alone, as DP-SGD's accounting assumes.
    """
    summed, counts = token_losses(logits, labels)
    return (summed / counts.clamp(min=1)).mean()


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module, data: Encoded, tokenizer: PreTrainedTokenizerBase, batch_size: int, device: torch.device
) -> dict[str, float | int]:
    """Per-token loss and perplexity over every scored token of `data`, and scoring throughput."""
    from fedtune.client import wire
    from fedtune.client.train import forward, make_loader

    model.to(device).eval()
    order = sorted(range(len(data)), key=lambda i: len(data[i]["input_ids"]))  # little padding per batch
    nll, tokens, began = 0.0, 0, time.perf_counter()
    for batch in make_loader([data[i] for i in order], tokenizer, batch_size, shuffle=False):
        labels = batch.pop("labels").to(device)
        summed, counts = token_losses(forward(model, batch, device).logits, labels)
        nll, tokens = nll + float(summed.sum()), tokens + int(counts.sum())
    loss = nll / max(tokens, 1)
    return {
        wire.LOSS: loss,
        wire.PERPLEXITY: math.exp(min(loss, 700.0)),
        wire.TOKENS: tokens,
        wire.NUM_EXAMPLES: len(data),
        wire.TOKENS_PER_SECOND: tokens / max(time.perf_counter() - began, 1e-9),
    }


@torch.no_grad()
def generate_samples(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    device: torch.device,
    chat: bool = False,
    max_new_tokens: int = 40,
) -> list[dict[str, str]]:
    """Greedy completions of fixed prompts (rendered with the chat template when `chat`): the same model gives
    the same text, so runs compare."""
    model.to(device).eval()
    samples = []
    for prompt in prompts:
        text = render_prompt(tokenizer, prompt) if chat else prompt
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(device)
        ids = {k: ids[k] for k in ("input_ids", "attention_mask")}  # a causal LM takes no token type ids
        with _bf16(device):
            out = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        samples.append(
            {"prompt": prompt, "completion": tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)}
        )
    return samples
