"""`dpokit inspect`: prepared rows decoded with the recorded tokenizer, equal to decoding the stored ids."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from dpokit.cli import main
from dpokit.data.inspection import inspected_rows, inspection_tokenizer
from dpokit.data.prepared import load_prepared


def prepare(data, model, out, *flags):
    return main(["prepare", str(data), "--model", str(model), "--out", str(out), *map(str, flags)])


def test_inspect_shows_each_part_decoded_with_special_tokens_and_counts(tokenizer_dir, tmp_path, capsys):
    rows = [
        {
            "prompt": f"what is {i} plus 1?",
            "chosen": f"{i + 1}.",
            "rejected": "no.",
            "score_chosen": 9,
            "score_rejected": i,
        }
        for i in range(5)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prepared"
    assert prepare(data, tokenizer_dir, out) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--rows", "2", "--start", "1"]) == 0
    shown = capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    split = load_prepared(out).split("train")
    for index in (1, 2):
        for part in ("prompt", "chosen", "rejected"):
            ids = split[index][f"{part}_ids"]
            text = tokenizer.decode(ids, skip_special_tokens=False)
            assert text in shown
            assert f"{part}: {len(ids)} tokens" in shown
        assert f"rejected: {len(split[index]['rejected_ids'])} tokens, score {index}" in shown
    assert "<|assistant|>" in shown and "train row 0" not in shown and "train row 3" not in shown
    assert "pairs with scores" in shown and "rows kept" in shown


def test_inspected_rows_equal_the_tokenizers_decoding_of_every_part_of_ranked_rows(tokenizer_dir, tmp_path):
    rows = [
        {"prompt": f"q {i}", "completions": ["a", "b b", "c c c"], "scores": [1.0, 0.5, float(i)]} for i in range(3)
    ]
    data = tmp_path / "ranked.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prepared"
    assert prepare(data, tokenizer_dir, out) == 0
    prepared = load_prepared(out)
    tokenizer = inspection_tokenizer(prepared)
    reference = AutoTokenizer.from_pretrained(tokenizer_dir)
    for row in inspected_rows(prepared, tokenizer, rows=3):
        stored = prepared.split("train")[row.index]
        assert [(p.name, p.text, p.score) for p in row.parts] == [
            ("prompt", reference.decode(stored["prompt_ids"], skip_special_tokens=False), None),
            *(
                (f"completion {k}", reference.decode(ids, skip_special_tokens=False), score)
                for k, (ids, score) in enumerate(zip(stored["completion_ids"], stored["scores"]))
            ),
        ]
