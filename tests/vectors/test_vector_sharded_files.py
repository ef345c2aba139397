"""Vectors written a group at a time (``KnowledgeVector.save_sharded``, ``save_difference_sharded``): the
streaming vector format, one shard per decoder block and one for the other tensors, read back bit for
bit like the one-file vector, and applied by ``flearn vector apply`` to the same model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner
from vector_helpers import finetuned_copy, params

from flearning.cli.vector import vector_app
from flearning.vectors import KnowledgeVector, VectorError
from flearning.vectors.files import block_groups, save_sharded_vector, sha256_file, shard_file_name
from flearning.vectors.streaming import VectorFiles
from flearning.vectors.vector import save_difference_sharded
from tiny import tiny_llama


def vector_of(tie: bool = True, layers: int = 3) -> KnowledgeVector:
    base = tiny_llama(0, tie=tie, layers=layers)
    return KnowledgeVector.from_models(base, finetuned_copy(base))


def assert_same_vector(got: KnowledgeVector, want: KnowledgeVector) -> None:
    assert got.keys() == want.keys()  # the same order too
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert got.metadata == want.metadata


def test_block_groups_are_the_decoder_blocks_and_the_rest():
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.10.input_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    assert block_groups(names) == [
        ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"],
        ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"],
        ["model.layers.1.self_attn.q_proj.weight"],
        ["model.layers.10.input_layernorm.weight"],
    ]
    assert block_groups(["transformer.h.2.attn.c_attn.weight", "transformer.wte.weight"]) == [
        ["transformer.h.2.attn.c_attn.weight"],
        ["transformer.wte.weight"],
    ]


@pytest.mark.parametrize("tie", [True, False])
def test_sharded_files_load_bit_identical_to_the_consolidated_vector(tmp_path, tie):
    vector = vector_of(tie=tie)
    vector.save(tmp_path / "one")
    assert vector.save_sharded(tmp_path / "sharded") == tmp_path / "sharded"
    one, sharded = KnowledgeVector.load(tmp_path / "one"), KnowledgeVector.load(tmp_path / "sharded")
    assert_same_vector(sharded, one)
    assert_same_vector(sharded, vector)
    # the tied head is the embedding's key only, as in the one-file vector
    assert ("lm_head.weight" in sharded) == (not tie)


def test_the_shards_and_their_index_are_well_formed(tmp_path):
    vector = vector_of(tie=False, layers=3)
    out = vector.save_sharded(tmp_path / "v")
    record = json.loads((out / "vector.json").read_text())
    assert record["format"] == "flearning.knowledge_vector" and record["format_version"] == 2
    names = [shard_file_name(i, 4) for i in range(1, 5)]  # the rest, then blocks 0, 1, 2
    assert list(record["shards"]) == names
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "vector.json"])
    for name, sha in record["shards"].items():
        assert sha256_file(out / name) == sha
    assert list(record["tensors"]) == vector.keys() == list(record["weight_map"])
    assert record["num_params"] == vector.num_params
    for key, info in record["tensors"].items():
        assert info == {"shape": list(vector[key].shape), "dtype": "float32"}
    # the norms' deltas are zero (dropped): the rest shard holds the embedding and the head
    assert "model.norm.weight" in record["metadata"]["dropped_zero"]
    expected = {
        names[0]: ["model.embed_tokens.weight", "lm_head.weight"],
        **{names[1 + i]: [k for k in vector if k.startswith(f"model.layers.{i}.")] for i in range(3)},
    }
    for name, keys in expected.items():
        assert [k for k, f in record["weight_map"].items() if f == name] == keys
        with safe_open(str(out / name), framework="pt") as fh:
            assert sorted(fh.keys()) == sorted(keys)
            assert fh.metadata() == {"format": "flearning.knowledge_vector"}
    # the streaming reader takes it as it takes a vector vectors.streaming wrote
    files = VectorFiles(out)
    files.verify()
    assert files.order == vector.keys()
    assert torch.equal(files.block("lm_head.weight", None), vector["lm_head.weight"])


def test_a_changed_shard_is_refused_by_its_checksum(tmp_path):
    out = vector_of().save_sharded(tmp_path / "v")
    shard = out / shard_file_name(2, 4)
    tensors = load_file(str(shard))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    from safetensors.torch import save_file

    save_file(tensors, str(shard), metadata={"format": "flearning.knowledge_vector"})
    with pytest.raises(VectorError, match="checksum mismatch"):
        KnowledgeVector.load(out)


def test_save_difference_sharded_writes_the_vector_of_from_deltas(tmp_path):
    base = tiny_llama(0, tie=True, layers=3)
    tuned = finetuned_copy(base)
    theta, now = params(base), dict(tuned.named_parameters())
    meta_provenance = KnowledgeVector.from_models(base, tuned).metadata
    from flearning.vectors import Provenance

    provenance = Provenance(base_model="tiny", base_fingerprint=meta_provenance.base_fingerprint, method="x")
    save_difference_sharded(now, theta, provenance, tmp_path / "streamed")
    delta = {k: p.detach().float() - theta[k].float() for k, p in now.items()}
    KnowledgeVector.from_deltas(delta, provenance).save(tmp_path / "whole")
    got, want = KnowledgeVector.load(tmp_path / "streamed"), KnowledgeVector.load(tmp_path / "whole")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert got.metadata.dropped_zero == want.metadata.dropped_zero != []
    assert got.metadata.model_dump(exclude={"created"}) == want.metadata.model_dump(exclude={"created"})


def test_an_all_zero_difference_and_an_empty_vector_are_refused(tmp_path):
    theta = params(tiny_llama(0))
    with pytest.raises(VectorError, match="zero"):
        save_difference_sharded(theta, theta, None, tmp_path / "zero")
    with pytest.raises(VectorError, match="at least one tensor"):
        save_sharded_vector([{}, {}], {}, tmp_path / "empty")
    assert not (tmp_path / "zero").exists() and not (tmp_path / "empty").exists()


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_flearn_vector_apply_of_a_sharded_vector_gives_the_same_model(tmp_path, tiny_model_dir, stream):
    base = tiny_llama()
    vector = KnowledgeVector.from_models(base, finetuned_copy(base))
    vector.save(tmp_path / "one")
    vector.save_sharded(tmp_path / "sharded")
    runner = CliRunner()
    for name in ("one", "sharded"):
        args = ["apply", "--model", tiny_model_dir, "--vector", tmp_path / name, "--forget", "0.7"]
        result = runner.invoke(vector_app, [str(a) for a in [*args, "--out", tmp_path / f"m-{name}", stream]])
        assert result.exit_code == 0, (result.output, result.exception)
    got = load_file(str(tmp_path / "m-sharded" / "model.safetensors"))
    want = load_file(str(tmp_path / "m-one" / "model.safetensors"))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    theta = params(base)
    expected = theta["model.layers.1.mlp.up_proj.weight"] - 0.7 * vector["model.layers.1.mlp.up_proj.weight"]
    torch.testing.assert_close(got["model.layers.1.mlp.up_proj.weight"], expected, atol=1e-6, rtol=0)
    info = runner.invoke(vector_app, ["info", str(tmp_path / "sharded")])
    assert info.exit_code == 0 and f"{vector.num_params:,}" in info.output, info.output
