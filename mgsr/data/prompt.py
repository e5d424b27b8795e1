"""Prompt formats: the Alpaca-style template used by MiniLLM / DistiLLM for Dolly and the evaluation sets, and
an instruct model's own chat template (`prompt_format: chat`)."""

from __future__ import annotations

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def build_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - field name of the data files
    """Return the exact prompt string the model is given (the `prompt` field of the MiniLLM JSONL files).

    An empty `input` selects the no-input variant of the template.
    """
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


PROMPT_FORMATS = ("alpaca", "chat")
_SENTINEL = "MGSRENDOFTURNPROBE"  # no spaces: templates that trim message content keep it whole


def _template_or_fail(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"prompt_format=chat but tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat "
                         "template; use prompt_format=alpaca")


def chat_prompt(tokenizer, instruction: str, input: str = "") -> str:  # noqa: A002 - field name of the data files
    """The tokenizer's chat template for one user turn holding the instruction (and the input after a blank
    line), ending with the assistant's generation prompt: the response follows it directly."""
    _template_or_fail(tokenizer)
    content = f"{instruction}\n\n{input}" if input else instruction
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def end_of_turn_token(tokenizer) -> str:
    """The token the chat template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`, ...): read off
    a rendered turn, so it is the template's own choice rather than whatever `eos_token` says."""
    _template_or_fail(tokenizer)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}],
                                         tokenize=False)
    after = text.split(_SENTINEL, 1)[1] if _SENTINEL in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_tokens) | {str(t) for t in tokenizer.added_tokens_decoder.values()}
    first = tokenizer.convert_ids_to_tokens(ids[0]) if ids else None
    if first not in special:
        raise ValueError(f"the chat template of {getattr(tokenizer, 'name_or_path', '?')!r} ends an assistant turn "
                         f"with {after[:20]!r}, not a special token; use prompt_format=alpaca")
    return first


def use_prompt_format(tokenizer, prompt_format: str):
    """Make `tokenizer` agree with the prompt format; returns it. `chat`: its EOS becomes the template's
    end-of-turn token, which every consumer reads as `eos_token_id`: the last token of each training target,
    the stop of generation (SCRG, evaluation, SeqKD) and what the exported student's tokenizer says."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format={prompt_format!r}: choose one of {', '.join(PROMPT_FORMATS)}")
    if prompt_format == "chat":
        eot = end_of_turn_token(tokenizer)
        if tokenizer.eos_token != eot:
            tokenizer.eos_token = eot
    return tokenizer


def format_records(records: list[dict], tokenizer, prompt_format: str) -> list[dict]:
    """Records with `prompt` in the given format. `alpaca`: as loaded (the files' own `prompt` field, or the
    template above). `chat`: the tokenizer's chat template over `instruction` and `input`; a record with only
    a `prompt` puts that text in the user turn."""
    if prompt_format == "alpaca":
        return records
    if prompt_format != "chat":
        raise ValueError(f"prompt_format={prompt_format!r}: choose one of {', '.join(PROMPT_FORMATS)}")
    out = []
    for r in records:
        instruction = r.get("instruction")
        if isinstance(instruction, str) and instruction.strip():
            inp = r.get("input") if isinstance(r.get("input"), str) else ""
            prompt = chat_prompt(tokenizer, instruction, inp)
        else:
            prompt = chat_prompt(tokenizer, r["prompt"])
        out.append({**r, "prompt": prompt})
    return out
