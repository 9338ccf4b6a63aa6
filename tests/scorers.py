"""Scoring functions for `dpokit score --scorer scorers:NAME` in tests (tests/ is on the path)."""

from __future__ import annotations


def completion_length(prompts: list[list[dict]], completions: list[str]) -> list[float]:
    """A rule: the completion's length in characters."""
    assert len(prompts) == len(completions) and all(isinstance(p, list) for p in prompts)
    return [float(len(text)) for text in completions]


def one_score_short(prompts: list[list[dict]], completions: list[str]) -> list[float]:
    """Broken: one score fewer than completions."""
    return [1.0] * (len(completions) - 1)


def nan_for_the_second(prompts: list[list[dict]], completions: list[str]) -> list[float]:
    """Broken: NaN for the batch's second completion."""
    return [float("nan") if row == 1 else 1.0 for row in range(len(completions))]
