"""Token ids for normalised pairs: chat template (or plain concatenation), alignment, truncation.

With a chat template, the prompt is ``apply_chat_template(prompt, add_generation_prompt=True)`` and a
completion is what the templated prompt+response adds after it, so the end-of-turn token the
template appends belongs to the completion. When the prompt's tokens are not a prefix of the
prompt+response tokens (BPE merged across the boundary, e.g. after a generation prompt ending in
a space), the completion is the text after the templated prompt, tokenized on its own; such rows
are counted as ``retokenized``. Without a chat template, the prompt is its turns' text joined by
blank lines and each completion its text plus EOS, tokenized separately.

Pairs over ``max_length`` (prompt + response, each side checked) are truncated, dropped, or
reported, by the ``overlength`` policy. Truncation follows the original DPO code: first the
prompt's start is dropped down to ``max_prompt_length`` tokens, then the responses' ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dpokit.data.formats import Pair, SkippedRow
from dpokit.errors import DpokitError

OVERLENGTH_POLICIES = ("truncate", "drop", "error")
PLAIN_TURN_SEPARATOR = "\n\n"


@dataclass
class TokenizedPair:
    """Token ids of one pair, or the reason it was dropped."""

    prompt_ids: list[int] = field(default_factory=list)
    chosen_ids: list[int] = field(default_factory=list)
    rejected_ids: list[int] = field(default_factory=list)
    truncated: bool = False
    retokenized: bool = False  # a completion was tokenized apart from its prompt (see module docstring)
    dropped: Optional[str] = None  # reason, a manifest count key
    detail: str = ""


# ---------------------------------------------------------------------------------------------
# Tokenizer, template and fingerprint


def load_tokenizer(name: str, chat_template: Optional[str] = None):
    """The tokenizer of `name` (a directory or hub name), with `chat_template` (text or file) applied."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # transformers raises OSError, ValueError, ... for a bad name or directory
        raise DpokitError(f"could not load a tokenizer from {name!r}: {exc}; pass a model directory or --tokenizer") from None
    if chat_template is not None:
        tokenizer.chat_template = chat_template_text(chat_template)
    if tokenizer.chat_template:
        check_chat_template(tokenizer)
    return tokenizer


def chat_template_text(value: str) -> str:
    """The Jinja template in `value`, or in the file it names."""
    path = Path(value)
    if "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise DpokitError(f"--chat-template {value!r} is neither a file nor a Jinja template (no {{{{ or {{% in it)")


def check_chat_template(tokenizer) -> None:
    """Render a one-turn conversation so that a broken template fails before any work starts."""
    try:
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}], tokenize=False
        )
    except Exception as exc:  # jinja2 syntax and runtime errors
        raise DpokitError(f"the chat template does not render a user/assistant conversation: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Truncation


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, max_prompt_length: int):
    """Fit both prompt+response sequences into `max_length` tokens.

    When either side is too long, the prompt keeps its last `max_prompt_length` tokens; then each
    response keeps its first ``max_length - len(prompt)`` tokens.
    """
    if len(prompt) + max(len(chosen), len(rejected)) > max_length and len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length:]
    room = max_length - len(prompt)
    return prompt, chosen[:room], rejected[:room]


def overlength_detail(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int) -> str:
    """Why the pair is too long (empty when it fits)."""
    parts = [
        f"prompt {len(prompt)} + {side} {len(ids)} = {len(prompt) + len(ids)} tokens"
        for side, ids in (("chosen", chosen), ("rejected", rejected))
        if len(prompt) + len(ids) > max_length
    ]
    return f"{' and '.join(parts)}, over --max-length {max_length}" if parts else ""


# ---------------------------------------------------------------------------------------------
# Pair tokenizer


class PairTokenizer:
    """Turns `Pair` messages into `TokenizedPair` ids under one set of length limits (picklable)."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int, overlength: str):
        if overlength not in OVERLENGTH_POLICIES:
            raise DpokitError(f"--overlength {overlength!r} is not one of {', '.join(OVERLENGTH_POLICIES)}")
        if not 0 <= max_prompt_length < max_length:
            raise DpokitError(
                f"--max-prompt-length {max_prompt_length} must be at least 0 and below --max-length {max_length}, "
                "so that truncated responses keep at least one token"
            )
        if not tokenizer.chat_template and tokenizer.eos_token_id is None:
            raise DpokitError(
                "the tokenizer has no chat template and no EOS token to end responses with; pass --chat-template"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.overlength = overlength

    @property
    def uses_chat_template(self) -> bool:
        return bool(self.tokenizer.chat_template)

    def tokenize(self, pairs: list[Pair]) -> list[TokenizedPair]:
        """Ids of each pair, fitted to the length limits (a batch, for fast tokenizers)."""
        untruncated = self.templated_ids(pairs) if self.uses_chat_template else self.plain_ids(pairs)
        return [self.fitted(ids) if ids.dropped is None else ids for ids in untruncated]

    # -- chat template ------------------------------------------------------------------------

    def templated_ids(self, pairs: list[Pair]) -> list[TokenizedPair]:
        """Prompt and completion ids from the chat template, before truncation."""
        texts: list[Optional[tuple[str, str, str]]] = []
        failures: dict[int, str] = {}
        for index, pair in enumerate(pairs):
            try:
                texts.append(self.templated_texts(pair))
            except Exception as exc:  # the template's raise_exception (e.g. roles must alternate) and jinja errors
                texts.append(None)
                failures[index] = str(exc)
        ids = iter(self.encode([t for triple in texts if triple is not None for t in triple]))
        results = []
        for index, triple in enumerate(texts):
            if triple is None:
                results.append(TokenizedPair(dropped="template_error", detail=failures[index]))
                continue
            prompt_text, chosen_text, rejected_text = triple
            prompt_ids, chosen_full, rejected_full = next(ids), next(ids), next(ids)
            try:
                chosen_ids, chosen_split = self.completion_ids(prompt_text, prompt_ids, chosen_text, chosen_full)
                rejected_ids, rejected_split = self.completion_ids(prompt_text, prompt_ids, rejected_text, rejected_full)
            except SkippedRow as skipped:
                results.append(TokenizedPair(dropped=skipped.reason, detail=skipped.detail))
                continue
            results.append(
                TokenizedPair(prompt_ids, chosen_ids, rejected_ids, retokenized=chosen_split or rejected_split)
            )
        return results

    def templated_texts(self, pair: Pair) -> tuple[str, str, str]:
        """The templated prompt (with the generation prompt) and both templated prompt+response texts."""
        render = self.tokenizer.apply_chat_template
        return (
            render(pair.prompt, tokenize=False, add_generation_prompt=True),
            render(pair.prompt + pair.chosen, tokenize=False),
            render(pair.prompt + pair.rejected, tokenize=False),
        )

    def completion_ids(self, prompt_text: str, prompt_ids: list[int], full_text: str, full_ids: list[int]):
        """The completion's ids, and whether they had to be tokenized apart from the prompt."""
        if full_ids[: len(prompt_ids)] == prompt_ids:
            return full_ids[len(prompt_ids):], False
        if not full_text.startswith(prompt_text):
            raise SkippedRow(
                "template_prompt_mismatch",
                "the chat template renders the prompt differently when a response follows it",
            )
        return self.encode([full_text[len(prompt_text):]])[0], True

    # -- plain concatenation ------------------------------------------------------------------

    def plain_ids(self, pairs: list[Pair]) -> list[TokenizedPair]:
        """Prompt ids (with the tokenizer's own special tokens) and completion ids plus EOS."""
        prompts = self.encode([plain_text(p.prompt) for p in pairs], add_special_tokens=True)
        completions = self.encode([plain_text(m) for p in pairs for m in (p.chosen, p.rejected)])
        eos = [self.tokenizer.eos_token_id]
        return [
            TokenizedPair(prompt, completions[2 * i] + eos, completions[2 * i + 1] + eos)
            for i, prompt in enumerate(prompts)
        ]

    # -- shared -------------------------------------------------------------------------------

    def encode(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Ids of each text, by default without added special tokens (templates write their own)."""
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer directly: without offsets it is about twice as fast
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]

    def fitted(self, pair: TokenizedPair) -> TokenizedPair:
        """The pair under the overlength policy: unchanged, truncated, or dropped with a reason."""
        detail = overlength_detail(pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, self.max_length)
        if not detail:
            return pair
        if self.overlength != "truncate":  # "error" is raised by the caller, which knows the row
            return TokenizedPair(dropped="overlength", detail=detail)
        prompt, chosen, rejected = truncate_pair(
            pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, self.max_length, self.max_prompt_length
        )
        if not prompt:
            return TokenizedPair(dropped="empty_prompt_after_truncation", detail=detail)
        if chosen == rejected:
            return TokenizedPair(dropped="identical_after_truncation", detail=detail)
        return TokenizedPair(prompt, chosen, rejected, truncated=True, retokenized=pair.retokenized)


def plain_text(messages: list[dict[str, Any]]) -> str:
    """The turns' contents joined by blank lines (the no-template rendering)."""
    return PLAIN_TURN_SEPARATOR.join(m["content"] for m in messages)
