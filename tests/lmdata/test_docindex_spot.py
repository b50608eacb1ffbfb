"""A sidecar whose header matches and whose positions are plausible (increasing, inside the shard) but shifted by
damage is not trusted: the eot id is checked at a fixed sample of its positions, the first and last always."""

from __future__ import annotations

import numpy as np
import pytest

from lmdata import TokenDataset, docindex
from lmdata.docindex import IndexKey, eot_positions, read_index, write_index
from tests.conftest import write_llmc
from tests.lmdata.test_docindex import EOT, T, reference_starts, shard_of


def _damaged(tmp_path, lengths: list[int], shift: int, delimiter: str = "after"):
    """A shard of documents of ``lengths`` whose sidecar has position ``shift`` moved one token on (still
    increasing and inside the shard), with its true starts."""
    tokens, docs = shard_of(lengths, delimiter)
    shard = write_llmc(tmp_path / "a.bin", tokens)
    positions = eot_positions(tokens, EOT)
    positions[shift] += 1
    assert np.all(np.diff(positions) > 0) and positions[-1] < len(tokens)  # plausible: only the tokens tell
    write_index(shard, positions, IndexKey(EOT, delimiter))
    return shard, tokens, docs


@pytest.mark.parametrize("delimiter", ["after", "before"])
def test_a_shifted_position_is_damage_and_the_index_is_rebuilt(tmp_path, delimiter):
    shard, tokens, docs = _damaged(tmp_path, [3, 8, 20, 5], 1, delimiter)
    positions, why = read_index(shard, IndexKey(EOT, delimiter))
    assert positions is None and why == "damaged: the shard's token at one of its positions is not the eot id"
    with pytest.warns(UserWarning, match="damaged: the shard's token at one of its positions is not the eot id"):
        starts = TokenDataset(shard).document_starts(T, eot_id=EOT, delimiter=delimiter)
    assert starts[0].tolist() == reference_starts(docs, len(tokens), T)


@pytest.mark.parametrize("which", ["first", "last", "sampled"])
def test_with_many_documents_the_first_last_and_sampled_positions_are_checked(tmp_path, which):
    lengths = [3 + i % 5 for i in range(500)]  # more documents than the spot checks
    count = len(lengths)
    sampled = np.unique(np.linspace(0, count - 1, docindex.SPOT_CHECKS).astype(np.int64))
    at = {"first": 0, "last": count - 1, "sampled": int(sampled[len(sampled) // 2])}[which]
    tokens, _ = shard_of(lengths, "after")
    shard = write_llmc(tmp_path / "a.bin", tokens)
    positions = eot_positions(tokens, EOT)
    positions[at] += -1 if which == "last" else 1  # the last eot is the shard's last token: moved back
    assert np.all(np.diff(positions) > 0)
    write_index(shard, positions, IndexKey(EOT, "after"))
    assert read_index(shard, IndexKey(EOT, "after"))[0] is None


def test_a_sound_sidecar_is_still_trusted(tmp_path):
    tokens, _ = shard_of([3 + i % 5 for i in range(500)], "after")
    shard = write_llmc(tmp_path / "a.bin", tokens)
    write_index(shard, eot_positions(tokens, EOT), IndexKey(EOT, "after"))
    positions, why = read_index(shard, IndexKey(EOT, "after"))
    assert why == "" and positions.tolist() == eot_positions(tokens, EOT).tolist()
