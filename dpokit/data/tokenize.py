"""Token ids for normalised pairs, ranked and unpaired rows: chat template (or plain text), alignment, truncation.

With a chat template, the prompt is ``apply_chat_template(prompt, add_generation_prompt=True)`` and a
completion is what the templated prompt+response adds after it, so the end-of-turn token the
template appends belongs to the completion. When the prompt's tokens are not a prefix of the
prompt+response tokens (BPE merged across the boundary, e.g. after a generation prompt ending in
a space), the completion is the text after the templated prompt, tokenized on its own; such rows
are counted as ``retokenized``. When the generation prompt adds text the conversation lacks (a
reasoning model's ``<think>`` opener), the prompt is the text both renderings share, as TRL does;
such rows are counted as ``template_common_prefix``. Without a chat template, the prompt is its
turns' text joined by blank lines, followed by a separator (a blank line unless the prompt ends in,
or every completion starts with, whitespace), and each completion its text plus EOS. A ranked row's
k completions go through the same steps as a pair's two (`PairTokenizer.tokenize_ranked`), and so does an
unpaired row's one completion (`PairTokenizer.tokenize_unpaired`).

Length limits (`LengthLimits`): completions keep their first ``max_completion_length`` tokens and
prompts ``max_prompt_length`` tokens (the end ``truncation`` names); a pair still over
``max_length`` is truncated, dropped or reported by the ``overlength`` policy. Truncation keeps the
sequence's start under ``keep_start`` (TRL's default: the whole prompt, completions cut at their
end) or, under ``keep_end``, cuts the prompt's start first (down to half of ``max_length``). A ranked
row is fitted as a pair is, each completion with the prompt; under ``overlength="drop"`` only its
completions over ``max_length`` are left out (the row too, when the rest state no preference). An unpaired
row's completion is fitted as a pair's chosen is (it states no preference, so none is checked); its KL
completion is added after tokenizing (`pipeline.with_kl_completions`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dpokit.data.formats import Pair, Ranked, SkippedRow, Unpaired, preference_problem
from dpokit.errors import DpokitError

OVERLENGTH_POLICIES = ("truncate", "drop", "error")
TRUNCATION_MODES = ("keep_start", "keep_end")
PLAIN_TURN_SEPARATOR = "\n\n"


@dataclass
class TokenizedRow:
    """What a tokenized row of any shape holds besides its completions: the prompt, what happened to it, or the
    reason it was dropped."""

    prompt_ids: list[int] = field(default_factory=list)
    truncated_prompt: bool = False
    truncated_completion: bool = False
    retokenized: bool = False  # a completion was tokenized apart from its prompt (see module docstring)
    template_common_prefix: bool = False  # the prompt is the text the renderings share (see module docstring)
    dropped: Optional[str] = None  # reason, a manifest count key
    detail: str = ""

    @property
    def truncated(self) -> bool:
        """Either part was cut (the manifest's ``truncated`` count: `pipeline.ROW_EVENTS`)."""
        return self.truncated_prompt or self.truncated_completion


@dataclass
class TokenizedPair(TokenizedRow):
    """Token ids of one pair, or the reason it was dropped."""

    chosen_ids: list[int] = field(default_factory=list)
    rejected_ids: list[int] = field(default_factory=list)
    scores: Optional[tuple[float, float]] = None  # the pair's (chosen, rejected) scores, set by the pipeline


@dataclass
class TokenizedRanked(TokenizedRow):
    """Token ids of one ranked row (its completions in source order, with their scores), or the reason it was
    dropped; also what `PairTokenizer` makes of a pair before fitting it (two completions, no scores)."""

    completion_ids: list[list[int]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    completions_dropped: list[tuple[str, str]] = field(default_factory=list)  # (reason, detail): over max_length


@dataclass
class TokenizedUnpaired(TokenizedRow):
    """Token ids of one unpaired row (its one completion, before the KL completion is added) and its label, or
    the reason it was dropped."""

    completion_ids: list[int] = field(default_factory=list)
    label: bool = True


# ---------------------------------------------------------------------------------------------
# Tokenizer, template and fingerprint


# The files a tokenizer folder holds one of (fast, sentencepiece, BPE and WordPiece vocabularies).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
)


def load_tokenizer(name: str, chat_template: Optional[str] = None):
    """The tokenizer of `name` (a directory or hub name), with `chat_template` (text or file) applied."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # transformers raises OSError, ValueError, ... for a bad name or directory
        raise DpokitError(
            f"could not load a tokenizer from {name!r}: {exc}; pass a model directory or --tokenizer"
        ) from exc
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
        raise DpokitError(f"the chat template does not render a user/assistant conversation: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Truncation


@dataclass(frozen=True)
class LengthLimits:
    """The token limits of a prepared pair and what happens to a pair over them (checked on creation)."""

    max_length: int = 1024
    max_prompt_length: Optional[int] = None
    max_completion_length: Optional[int] = None
    truncation: str = "keep_start"
    overlength: str = "truncate"

    def __post_init__(self):
        if self.overlength not in OVERLENGTH_POLICIES:
            raise DpokitError(f"--overlength {self.overlength!r} is not one of {', '.join(OVERLENGTH_POLICIES)}")
        if self.truncation not in TRUNCATION_MODES:
            raise DpokitError(f"--truncation {self.truncation!r} is not one of {', '.join(TRUNCATION_MODES)}")
        if self.max_length < 2:
            raise DpokitError(
                f"--max-length {self.max_length} leaves no room for a prompt and a completion; use 2 or more"
            )
        for flag, value in (
            ("--max-prompt-length", self.max_prompt_length),
            ("--max-completion-length", self.max_completion_length),
        ):
            if value is not None and value < 1:
                raise DpokitError(f"{flag} {value} must be at least 1 (leave it out for no limit)")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise DpokitError(
                f"--max-prompt-length {self.max_prompt_length} must be below --max-length {self.max_length}, "
                "so that every completion keeps at least one token"
            )


@dataclass(frozen=True)
class Truncated:
    """A pair's or ranked row's ids after `fit`, and which parts were cut."""

    prompt: list[int]
    completions: list[list[int]]
    cut_prompt: bool
    cut_completion: bool


def capped(prompt: list[int], completions: list[list[int]], limits: LengthLimits):
    """The prompt and completions under the per-part caps: completions keep their first
    ``max_completion_length`` tokens, the prompt ``max_prompt_length`` tokens from the end ``truncation`` names."""
    if limits.max_completion_length is not None:
        completions = [ids[: limits.max_completion_length] for ids in completions]
    if limits.max_prompt_length is not None and len(prompt) > limits.max_prompt_length:
        keep = limits.max_prompt_length
        prompt = prompt[:keep] if limits.truncation == "keep_start" else prompt[len(prompt) - keep :]
    return prompt, completions


def fit(prompt: list[int], completions: list[list[int]], original: tuple[int, ...], limits: LengthLimits) -> Truncated:
    """The `capped` prompt and completions with every prompt+completion sequence fitted into
    ``limits.max_length``; `original` are the uncapped lengths (prompt, then each completion), to tell what was cut.

    Under ``keep_start`` the prompt is kept whole and the completions keep their first tokens (a
    prompt that leaves no room comes back whole, with empty completions: the caller drops it).
    Under ``keep_end`` the prompt's start is cut, as little as needed for the longest completion but not
    below ``max_prompt_length`` (default: half of ``max_length``) tokens, and then the completions' ends.
    A completion's start is never cut: it must follow its prompt.
    """
    excess = len(prompt) + max(map(len, completions)) - limits.max_length
    if excess > 0 and limits.truncation == "keep_end":
        floor = limits.max_prompt_length if limits.max_prompt_length is not None else limits.max_length // 2
        prompt = prompt[min(excess, max(0, len(prompt) - floor)) :]
    room = max(0, limits.max_length - len(prompt))
    completions = [ids[:room] for ids in completions]
    cut_completion = tuple(map(len, completions)) != tuple(original[1:])
    return Truncated(prompt, completions, len(prompt) < original[0], cut_completion)


def overlength_detail(prompt: list[int], completions: list[list[int]], names: list[str], max_length: int) -> str:
    """Why a pair (or ranked row) is too long (empty when it fits); `names` are the completions' (chosen, ...)."""
    parts = [
        f"prompt {len(prompt)} + {name} {len(ids)} = {len(prompt) + len(ids)} tokens"
        for name, ids in zip(names, completions)
        if len(prompt) + len(ids) > max_length
    ]
    return f"{' and '.join(parts)}, over --max-length {max_length}" if parts else ""


def prompt_over_max_length(prompt: list[int], limits: LengthLimits) -> str:
    return (
        f"the prompt's {len(prompt)} tokens leave no room for a completion under --max-length "
        f"{limits.max_length}; raise it, set --max-prompt-length, or use --truncation keep_end"
    )


# ---------------------------------------------------------------------------------------------
# Pair tokenizer


class PairTokenizer:
    """Turns `Pair` messages into `TokenizedPair` ids (`Ranked` rows into `TokenizedRanked`, `Unpaired` rows into
    `TokenizedUnpaired`) under one set of length limits (picklable)."""

    def __init__(self, tokenizer, limits: LengthLimits, separator: str = PLAIN_TURN_SEPARATOR):
        if not tokenizer.chat_template and tokenizer.eos_token_id is None:
            raise DpokitError(
                "the tokenizer has no chat template and no EOS token to end responses with; pass --chat-template"
            )
        self.tokenizer = tokenizer
        self.limits = limits
        self.separator = separator

    @property
    def uses_chat_template(self) -> bool:
        return bool(self.tokenizer.chat_template)

    def tokenize(self, pairs: list[Pair]) -> list[TokenizedPair]:
        """Ids of each pair, fitted to the length limits (a batch, for fast tokenizers)."""
        groups = self.untruncated_ids([(pair.prompt, [pair.chosen, pair.rejected]) for pair in pairs])
        return [self.fitted(as_pair(ids)) if ids.dropped is None else as_pair(ids) for ids in groups]

    def tokenize_ranked(self, rows: list[Ranked]) -> list[TokenizedRanked]:
        """Ids of each ranked row, with its scores, fitted to the length limits (a batch, for fast tokenizers)."""
        groups = self.untruncated_ids([(row.prompt, row.completions) for row in rows])
        for row, ids in zip(rows, groups):
            ids.scores = list(row.scores)
        return [self.fitted_ranked(ids, row.names) if ids.dropped is None else ids for row, ids in zip(rows, groups)]

    def tokenize_unpaired(self, rows: list[Unpaired]) -> list[TokenizedUnpaired]:
        """Ids of each unpaired row's prompt and completion, with its label, fitted to the length limits."""
        groups = self.untruncated_ids([(row.prompt, [row.completion]) for row in rows])
        return [
            self.fitted_unpaired(ids, row.label)
            if ids.dropped is None
            else TokenizedUnpaired(dropped=ids.dropped, detail=ids.detail)
            for row, ids in zip(rows, groups)
        ]

    def untruncated_ids(self, groups: list[tuple[list, list[list]]]) -> list[TokenizedRanked]:
        """Prompt and completion ids of each (prompt, completions) messages, before truncation."""
        return self.templated_ids(groups) if self.uses_chat_template else self.plain_ids(groups)

    # -- chat template ------------------------------------------------------------------------

    def templated_ids(self, groups: list[tuple[list, list[list]]]) -> list[TokenizedRanked]:
        """Prompt and completion ids from the chat template, before truncation."""
        texts: list[Optional[tuple[str, list[str], bool]]] = []
        failures: dict[int, SkippedRow] = {}
        for index, (prompt, completions) in enumerate(groups):
            try:
                texts.append(self.templated_texts(prompt, completions))
            except SkippedRow as skipped:
                texts.append(None)
                failures[index] = skipped
            except Exception as exc:  # the template's raise_exception (e.g. roles must alternate) and jinja errors
                texts.append(None)
                failures[index] = SkippedRow("template_error", str(exc))
        ids = iter(self.encode([t for texts_of in texts if texts_of is not None for t in (texts_of[0], *texts_of[1])]))
        results = []
        for index, texts_of in enumerate(texts):
            if texts_of is None:
                results.append(TokenizedRanked(dropped=failures[index].reason, detail=failures[index].detail))
                continue
            prompt_text, full_texts, common_prefix = texts_of
            prompt_ids = next(ids)
            completions = [self.completion_ids(prompt_text, prompt_ids, text, next(ids)) for text in full_texts]
            results.append(
                TokenizedRanked(
                    prompt_ids=prompt_ids,
                    completion_ids=[completion for completion, _ in completions],
                    retokenized=any(split for _, split in completions),
                    template_common_prefix=common_prefix,
                )
            )
        return results

    def templated_texts(self, prompt: list, completions: list[list]) -> tuple[str, list[str], bool]:
        """The templated prompt (with the generation prompt), each templated prompt+response text, and
        whether the prompt had to be cut back to the text all of them share."""
        render = self.tokenizer.apply_chat_template
        prompt_text = render(prompt, tokenize=False, add_generation_prompt=True)
        full_texts = [render(prompt + completion, tokenize=False) for completion in completions]
        if all(text.startswith(prompt_text) for text in full_texts):
            return prompt_text, full_texts, False
        # The generation prompt adds text the conversation lacks (e.g. "<think>\n"): the prompt is the
        # shared text, provided it still holds the whole conversation before the response.
        shared = os.path.commonprefix([prompt_text, *full_texts])
        if not shared.startswith(render(prompt, tokenize=False)):
            raise SkippedRow(
                "template_prompt_mismatch",
                "the chat template renders the prompt differently when a response follows it",
            )
        return shared, full_texts, True

    def completion_ids(self, prompt_text: str, prompt_ids: list[int], full_text: str, full_ids: list[int]):
        """The completion's ids, and whether they had to be tokenized apart from the prompt (whose text
        `full_text` starts with)."""
        if full_ids[: len(prompt_ids)] == prompt_ids:
            return full_ids[len(prompt_ids) :], False
        return self.encode([full_text[len(prompt_text) :]])[0], True

    # -- plain concatenation ------------------------------------------------------------------

    def plain_ids(self, groups: list[tuple[list, list[list]]]) -> list[TokenizedRanked]:
        """Prompt ids (with the tokenizer's own special tokens and the separator) and completion ids plus EOS."""
        completion_texts = [[plain_text(messages) for messages in completions] for _, completions in groups]
        prompt_texts = [
            self.separated(plain_text(prompt), texts) for (prompt, _), texts in zip(groups, completion_texts)
        ]
        prompts = self.encode(prompt_texts, add_special_tokens=True)
        completions = iter(self.encode([text for texts in completion_texts for text in texts]))
        eos = [self.tokenizer.eos_token_id]
        return [
            TokenizedRanked(prompt_ids=prompt, completion_ids=[next(completions) + eos for _ in texts])
            for prompt, texts in zip(prompts, completion_texts)
        ]

    def prompt_ids(self, prompts: list[list[dict[str, Any]]]) -> list[list[int]]:
        """Ids of prompts alone, as `tokenize` makes a pair's prompt: the template's generation prompt, or the
        plain text and the separator (for generation, where no reply decides whether whitespace divides them)."""
        if self.uses_chat_template:
            render = self.tokenizer.apply_chat_template
            return self.encode([render(p, tokenize=False, add_generation_prompt=True) for p in prompts])
        return self.encode([self.separated(plain_text(p), ["x"]) for p in prompts], add_special_tokens=True)

    def separated(self, prompt: str, completions: list[str]) -> str:
        """The prompt followed by the separator, unless whitespace already divides it from every completion."""
        if prompt[-1:].isspace() or all(c[:1].isspace() for c in completions):
            return prompt
        return prompt + self.separator

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
        """The pair under the length limits: unchanged, truncated, or dropped with a reason."""
        limits = self.limits
        prompt, completions = capped(pair.prompt_ids, [pair.chosen_ids, pair.rejected_ids], limits)
        detail = overlength_detail(prompt, completions, ["chosen", "rejected"], limits.max_length)
        if detail and limits.overlength != "truncate":  # "error" is raised by the caller, which knows the row
            return TokenizedPair(dropped="overlength", detail=detail)
        cut = fit(prompt, completions, (len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)), limits)
        chosen, rejected = cut.completions
        if not chosen or not rejected:
            return TokenizedPair(dropped="prompt_over_max_length", detail=prompt_over_max_length(cut.prompt, limits))
        if chosen == rejected:
            return TokenizedPair(dropped="identical_after_truncation", detail=detail)
        return TokenizedPair(
            prompt_ids=cut.prompt,
            chosen_ids=chosen,
            rejected_ids=rejected,
            truncated_prompt=cut.cut_prompt,
            truncated_completion=cut.cut_completion,
            retokenized=pair.retokenized,
            template_common_prefix=pair.template_common_prefix,
        )

    def fitted_ranked(self, row: TokenizedRanked, names: list[str]) -> TokenizedRanked:
        """The ranked row under the length limits, each completion with the prompt as a pair's are: unchanged,
        truncated, or dropped with a reason. Under ``overlength="drop"`` the completions over ``max_length`` are
        left out (listed in `TokenizedRanked.completions_dropped`), and the row is dropped as ``overlength`` only
        when the others state no preference (`formats.preference_problem`)."""
        limits = self.limits
        prompt, completions = capped(row.prompt_ids, row.completion_ids, limits)
        original = (len(row.prompt_ids), *map(len, row.completion_ids))
        scores, names = row.scores, names or [f"completion {index}" for index in range(len(completions))]
        detail = overlength_detail(prompt, completions, names, limits.max_length)
        if detail and limits.overlength == "error":  # raised by the caller, which knows the row
            return TokenizedRanked(dropped="overlength", detail=detail)
        dropped = []
        if detail and limits.overlength == "drop":
            over = [len(prompt) + len(ids) > limits.max_length for ids in completions]
            dropped = [
                ("overlength", overlength_detail(prompt, [ids], [name], limits.max_length))
                for ids, name, too_long in zip(completions, names, over)
                if too_long
            ]
            kept = [index for index, too_long in enumerate(over) if not too_long]
            completions, scores = [completions[i] for i in kept], [scores[i] for i in kept]
            original = (original[0], *(original[1 + i] for i in kept))
            problem = preference_problem(completions, scores)
            if problem is not None:
                return TokenizedRanked(
                    dropped="overlength", detail=f"{detail}; what is left: {problem[1]}", completions_dropped=dropped
                )
        cut = fit(prompt, completions, original, limits)
        if not all(cut.completions):
            return TokenizedRanked(
                dropped="prompt_over_max_length",
                detail=prompt_over_max_length(cut.prompt, limits),
                completions_dropped=dropped,
            )
        if preference_problem(cut.completions, scores) is not None:  # truncation made them the same
            return TokenizedRanked(dropped="identical_after_truncation", detail=detail, completions_dropped=dropped)
        return TokenizedRanked(
            prompt_ids=cut.prompt,
            completion_ids=cut.completions,
            scores=scores,
            truncated_prompt=cut.cut_prompt,
            truncated_completion=cut.cut_completion,
            retokenized=row.retokenized,
            template_common_prefix=row.template_common_prefix,
            completions_dropped=dropped,
        )

    def fitted_unpaired(self, row: TokenizedRanked, label: bool) -> TokenizedUnpaired:
        """The unpaired row (untruncated ids of its one completion) under the length limits, its completion as a
        pair's chosen: unchanged, truncated, or dropped with a reason. One completion states no preference, so
        none is checked (`formats.preference_problem` does not apply)."""
        limits = self.limits
        prompt, completions = capped(row.prompt_ids, row.completion_ids, limits)
        detail = overlength_detail(prompt, completions, ["completion"], limits.max_length)
        if detail and limits.overlength != "truncate":  # "error" is raised by the caller, which knows the row
            return TokenizedUnpaired(dropped="overlength", detail=detail)
        cut = fit(prompt, completions, (len(row.prompt_ids), *map(len, row.completion_ids)), limits)
        (completion,) = cut.completions
        if not completion:
            return TokenizedUnpaired(
                dropped="prompt_over_max_length", detail=prompt_over_max_length(cut.prompt, limits)
            )
        return TokenizedUnpaired(
            prompt_ids=cut.prompt,
            completion_ids=completion,
            label=label,
            truncated_prompt=cut.cut_prompt,
            truncated_completion=cut.cut_completion,
            retokenized=row.retokenized,
            template_common_prefix=row.template_common_prefix,
        )


def as_pair(ids: TokenizedRanked) -> TokenizedPair:
    """Untruncated ids of a pair (``[chosen, rejected]``) as a `TokenizedPair`."""
    if ids.dropped is not None:
        return TokenizedPair(dropped=ids.dropped, detail=ids.detail)
    chosen, rejected = ids.completion_ids
    return TokenizedPair(
        prompt_ids=ids.prompt_ids,
        chosen_ids=chosen,
        rejected_ids=rejected,
        retokenized=ids.retokenized,
        template_common_prefix=ids.template_common_prefix,
    )


def plain_text(messages: list[dict[str, Any]]) -> str:
    """The turns' contents joined by blank lines (the no-template rendering)."""
    return PLAIN_TURN_SEPARATOR.join(m["content"] for m in messages)
