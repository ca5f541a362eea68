"""The synthesize stage's final files: duplicates found the same way for small splits (a dict) and large ones (numpy)."""

from __future__ import annotations

import json
from array import array

import pytest

from azdistill.synthesis import outputs


@pytest.mark.parametrize("dict_up_to", [0, 10_000])  # 0: the numpy path even for a few records
def test_duplicates_point_to_the_first_copy_whichever_way_they_are_found(tmp_path, monkeypatch, dict_up_to):
    monkeypatch.setattr(outputs, "DICT_DUPLICATE_CHECK_UP_TO", dict_up_to)
    answers = ["a", "b", "a", "c", "b", "a", "rejected", "d"]
    path = tmp_path / "train.journal.jsonl"
    offsets = array("q")
    with path.open("wb") as handle:
        for index, answer in enumerate(answers):
            offsets.append(handle.tell())
            status = "rejected" if answer == "rejected" else "ok"
            row = {"index": index, "status": status, "messages": [{"role": "user", "content": "same prompt"},
                                                                   {"role": "assistant", "content": answer}]}
            handle.write((json.dumps(row) + "\n").encode())
    offsets.append(-1)  # a record with no journal row yet
    with path.open("rb") as handle:
        duplicate_of = outputs._duplicates(handle, offsets)
    assert [int(value) for value in duplicate_of] == [-1, -1, 0, -1, 1, 0, -1, -1, -1]
