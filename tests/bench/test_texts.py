"""Text sources and the hit-ratio mix of ``embedfleet bench`` (no server)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest

from embedfleet.bench.texts import TextError, TextMix, read_texts


def test_read_texts_from_every_format(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"body": "first", "n": 1}\n\n{"body": "second"}\n')
    assert read_texts(jsonl, "body") == ["first", "second"]
    strings = tmp_path / "s.jsonl"
    strings.write_text('"one"\n"two"\n')
    assert read_texts(strings) == ["one", "two"]
    csv = tmp_path / "t.csv"
    csv.write_text('id,text\n1,"a, quoted text"\n2,plain\n3,\n')
    assert read_texts(csv) == ["a, quoted text", "plain"]
    assert read_texts(csv, "id") == ["1", "2", "3"]
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"n": [1, 2], "passage": ["p one", "p two"]}), parquet)
    assert read_texts(parquet) == ["p one", "p two"]  # the first string column
    txt = tmp_path / "t.txt"
    txt.write_text("line one\n\nline two\n")
    assert read_texts(txt) == ["line one", "line two"]

    with pytest.raises(TextError, match="no field 'text'"):
        read_texts(jsonl)
    with pytest.raises(TextError, match="no column 'nope'"):
        read_texts(csv, "nope")
    with pytest.raises(TextError, match="not strings"):
        read_texts(parquet, "n")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(TextError, match="no text"):
        read_texts(tmp_path / "empty.txt")


def _texts(request: bytes) -> list[str]:
    texts: list[str] = orjson.loads(request)["inputs"]
    return texts


def _prepare(texts: Sequence[str]) -> bytes:
    return orjson.dumps({"inputs": list(texts)})


@pytest.mark.parametrize(("ratio", "batch"), [(0.0, 4), (0.3, 1), (0.75, 8), (1.0, 3)])
def test_hit_ratio_mix_is_exact_and_fresh_texts_never_repeat(ratio: float, batch: int) -> None:
    mix = TextMix(_prepare, batch, hit_ratio=ratio, hot_count=16, text_tokens=8)
    hot = {t for request in mix.priming() for t in _texts(request)}
    assert len(hot) == (16 if ratio else 0)
    seen_fresh: set[str] = set()
    hits = total = 0
    for _ in range(100):
        request, count = mix.take()
        texts = _texts(request)
        assert count == batch == len(texts) and len(set(texts)) == batch  # no text twice in a request
        for text in texts:
            total += 1
            if text in hot:
                hits += 1
            else:
                assert text not in seen_fresh
                seen_fresh.add(text)
    assert abs(hits / total - ratio) <= 1 / total


def test_file_texts_cycle_in_order_and_mixed_fresh_texts_stay_new() -> None:
    plain = TextMix(_prepare, 2, texts=["a", "b", "c"])
    assert [_texts(plain.take()[0]) for _ in range(3)] == [["a", "b"], ["c", "a"], ["b", "c"]]
    mixed = TextMix(_prepare, 2, texts=["a", "b", "c", "d"], hit_ratio=0.5, hot_count=2)
    assert [_texts(r) for r in mixed.priming()] == [["a", "b"]]
    fresh = [t for _ in range(4) for t in _texts(mixed.take()[0]) if t not in ("a", "b")]
    assert fresh[:2] == ["c", "d"] and len(set(fresh)) == 4  # the file's own texts first, then new ones
