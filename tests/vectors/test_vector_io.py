"""Saving and loading knowledge vectors: bit-exact, verified, atomic, never pickle."""

from __future__ import annotations

import json
import os

import pytest
import torch

from flearning.vectors import KnowledgeVector, Provenance, VectorError
from flearning.vectors import files as vio


@pytest.fixture
def vector(base, finetuned):
    return KnowledgeVector.from_models(
        base,
        finetuned,
        Provenance(base_model="tiny", data_hash="d1", hyperparameters={"lr": 5e-5, "targets": ["q", "v"]}),
    )


@pytest.fixture
def saved(vector, tmp_path):
    return vector.save(tmp_path / "vec")


def test_roundtrip_is_bit_exact(vector, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["vector.json", "vector.safetensors"]
    loaded = KnowledgeVector.load(saved)
    assert loaded.keys() == vector.keys()
    assert all(torch.equal(loaded[k], vector[k]) for k in vector)
    assert loaded.metadata == vector.metadata


def test_json_describes_the_tensors(vector, saved):
    record = json.loads((saved / "vector.json").read_text())
    assert record["format"] == "flearning.knowledge_vector" and record["format_version"] == 1
    assert list(record["tensors"]) == vector.keys()
    assert record["tensors"]["model.embed_tokens.weight"] == {"shape": [257, 32], "dtype": "float32"}
    assert record["num_params"] == vector.num_params
    assert record["safetensors_sha256"] == vio.sha256_file(saved / "vector.safetensors")
    assert record["metadata"]["base_fingerprint"] == vector.metadata.base_fingerprint


def test_load_accepts_a_file_inside_the_directory(vector, saved):
    assert KnowledgeVector.load(saved / "vector.json").keys() == vector.keys()


def test_tampered_tensor_file_is_refused(saved):
    path = saved / "vector.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(VectorError, match="checksum mismatch"):
        KnowledgeVector.load(saved)


def test_truncated_tensor_file_with_matching_checksum_is_refused(saved):
    # Someone "fixes" the checksum after truncating: the safetensors reader must still refuse it.
    path = saved / "vector.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    _edit_json(saved, lambda r: r.update(safetensors_sha256=vio.sha256_file(path)))
    with pytest.raises(VectorError, match="cannot read safetensors"):
        KnowledgeVector.load(saved)


def _edit_json(saved, change):
    record = json.loads((saved / "vector.json").read_text())
    change(record)
    (saved / "vector.json").write_text(json.dumps(record))


def test_json_shape_mismatch_is_refused(saved):
    _edit_json(saved, lambda r: r["tensors"]["model.embed_tokens.weight"].update(shape=[257, 33]))
    with pytest.raises(VectorError, match=r"model\.embed_tokens\.weight: shape \[257, 32\]"):
        KnowledgeVector.load(saved)


def test_json_key_mismatch_is_refused(saved):
    def change(record):
        record["tensors"]["extra.weight"] = {"shape": [1], "dtype": "float32"}
        del record["tensors"]["model.embed_tokens.weight"]

    _edit_json(saved, change)
    with pytest.raises(VectorError, match="extra.weight: described in vector.json, missing") as err:
        KnowledgeVector.load(saved)
    assert "model.embed_tokens.weight: in vector.safetensors, not described" in str(err.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": "other"}', "not a knowledge-vector description"),
        ('{"format": "flearning.knowledge_vector", "format_version": 99}', "format version 99"),
        ('{"format": "flearning.knowledge_vector", "format_version": 1}', "field 'metadata'"),
    ],
)
def test_broken_json_is_refused(saved, content, message):
    (saved / "vector.json").write_text(content)
    with pytest.raises(VectorError, match=message):
        KnowledgeVector.load(saved)


def test_invalid_metadata_is_refused(saved):
    _edit_json(saved, lambda r: r["metadata"].update(kind="weird"))
    with pytest.raises(VectorError, match="invalid metadata"):
        KnowledgeVector.load(saved)


def test_missing_files_are_refused(saved, tmp_path):
    with pytest.raises(VectorError, match="no such knowledge-vector directory"):
        KnowledgeVector.load(tmp_path / "nowhere")
    (saved / "vector.safetensors").unlink()
    with pytest.raises(VectorError, match=r"no vector\.safetensors"):
        KnowledgeVector.load(saved)


def test_pickle_is_refused(vector, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(vector.deltas, pickled / "vector.bin")
    with pytest.raises(VectorError, match=r"vector\.bin: the knowledge vector is only in pickle format"):
        KnowledgeVector.load(pickled / "vector.bin")
    with pytest.raises(VectorError, match=r"only in pickle format \(vector\.bin\), refused"):
        KnowledgeVector.load(pickled)


def test_save_refuses_a_non_empty_target_unless_overwrite(vector, saved):
    before = (saved / "vector.safetensors").read_bytes()
    scaled = vector * 2
    with pytest.raises(VectorError, match="not empty"):
        scaled.save(saved)
    assert (saved / "vector.safetensors").read_bytes() == before
    scaled.save(saved, overwrite=True)
    loaded = KnowledgeVector.load(saved)
    assert all(torch.equal(loaded[k], scaled[k]) for k in scaled)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["vec"]  # no temporary or old dirs left


def test_save_into_an_empty_directory_and_refuse_a_file(vector, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    vector.save(empty)
    assert (empty / "vector.json").is_file()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(VectorError, match="not a directory"):
        vector.save(a_file, overwrite=True)


def test_failed_save_leaves_nothing_behind(vector, tmp_path, monkeypatch):
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        vector.save(tmp_path / "vec")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_vector(vector, saved, monkeypatch):
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        (vector * 3).save(saved, overwrite=True)
    loaded = KnowledgeVector.load(saved)
    assert all(torch.equal(loaded[k], vector[k]) for k in vector)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["vec"]


def test_files_get_ordinary_permissions(saved):
    mask = os.umask(0)
    os.umask(mask)
    assert (saved.stat().st_mode & 0o777) == 0o777 & ~mask
    assert ((saved / "vector.safetensors").stat().st_mode & 0o777) == 0o666 & ~mask
