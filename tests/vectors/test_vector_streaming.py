"""Streaming knowledge vectors on safetensors checkpoints (``vectors.streaming``, ``io.safetensors``).

Every result is compared with the in-memory path (``KnowledgeVector`` + ``save_pretrained``), on tiny
models saved both as one file and sharded (``max_shard_size="20KB"`` gives 6–7 shards).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner
from vector_helpers import finetuned_copy, params, randomize_lora

from flearning.cli.vector import vector_app
from flearning.io import safetensors as st
from flearning.io.safetensors import SafetensorsError
from flearning.models import load_model, model_fingerprint
from flearning.vectors import KnowledgeVector, Provenance, VectorError, streaming
from flearning.vectors import files as vio
from flearning.vectors.apply import apply_to_directory
from flearning.vectors.metadata import PROVENANCE_FILE
from flearning.vectors.streaming import blocks, names
from tiny import tiny_llama

SHARD = "20KB"


def save(model, path: Path, sharded: bool, tokenizer=None) -> Path:
    model.save_pretrained(path, **({"max_shard_size": SHARD} if sharded else {}))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype, key
        assert torch.equal(ta[key], tb[key]), key


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.fixture(params=[True, False], ids=["sharded", "single"])
def sharded(request):
    return request.param


@pytest.fixture
def dirs(tmp_path, tokenizer, sharded):
    """(base dir, fine-tuned dir) of a tied tiny Llama; norms are frozen (zero delta)."""
    base = save(tiny_llama(0), tmp_path / "base", sharded, tokenizer)
    tuned = save(finetuned_copy(tiny_llama(0)), tmp_path / "tuned", sharded)
    return base, tuned


@pytest.fixture
def reference():
    return KnowledgeVector.from_models(tiny_llama(0), finetuned_copy(tiny_llama(0)))


# -- reading checkpoints, fingerprints ----------------------------------------------------------------------


def test_tied_checkpoint_stores_the_embedding_once_under_its_parameter_name(dirs, sharded):
    base, _ = dirs
    ckpt = st.open_checkpoint(base)
    assert ckpt.sharded == sharded and (len(ckpt.shards) > 3) == sharded
    assert "lm_head.weight" not in ckpt.entries and "model.embed_tokens.weight" in ckpt.entries
    arch, why = names.model_architecture(base)
    assert arch is not None, why
    assert arch.aliases["lm_head.weight"] == "model.embed_tokens.weight"
    assert list(names.model_parameters(ckpt, arch)) == sorted(
        dict(tiny_llama(0).named_parameters()), key=list(ckpt.entries).index
    )


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_checkpoint_fingerprint_equals_model_fingerprint(tmp_path, tokenizer, sharded, tie):
    model = tiny_llama(0, tie=tie)
    path = save(model, tmp_path / "m", sharded, tokenizer)
    expected = model_fingerprint(model)
    assert expected == model_fingerprint(load_model(path, dtype=torch.float32)[0])
    assert streaming.checkpoint_fingerprint(path) == expected
    assert streaming.checkpoint_fingerprint(path, as_stored=True) == expected  # fp32 files


def test_checkpoint_fingerprint_of_bf16_files(tmp_path, tokenizer):
    path = save(tiny_llama(0).to(torch.bfloat16), tmp_path / "bf16", True, tokenizer)
    assert streaming.checkpoint_fingerprint(path) == model_fingerprint(load_model(path)[0])  # fp32
    bf16, _ = load_model(path, dtype=torch.bfloat16)
    assert streaming.checkpoint_fingerprint(path, as_stored=True) == model_fingerprint(bf16)


def test_base_check_accepts_a_vector_of_the_model_loaded_in_its_own_dtype(tmp_path, tokenizer):
    path = save(tiny_llama(0).to(torch.bfloat16), tmp_path / "bf16", True, tokenizer)
    bf16, _ = load_model(path, dtype=torch.bfloat16)
    delta = KnowledgeVector.from_models(bf16, finetuned_copy(bf16), Provenance(base_fingerprint="0" * 32))
    delta.save(tmp_path / "other")
    with pytest.raises(VectorError, match="another base model"):
        streaming.stream_apply(path, tmp_path / "other", -0.5, tmp_path / "refused")
    own = Provenance(base_fingerprint=model_fingerprint(bf16))  # the as-stored fingerprint, not fp32's
    KnowledgeVector.from_models(bf16, finetuned_copy(bf16), own).save(tmp_path / "vec")
    streaming.stream_apply(path, tmp_path / "vec", -0.5, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()


def test_checkpoint_fingerprint_of_a_gpt2_with_buffers(tmp_path):
    model = tiny_gpt2()
    path = save(model, tmp_path / "gpt2", True)
    assert streaming.checkpoint_fingerprint(path) == model_fingerprint(model)


def test_fingerprint_without_config_is_refused_not_guessed(tmp_path, tokenizer):
    path = save(tiny_llama(0), tmp_path / "m", True, tokenizer)
    (path / "config.json").unlink()
    with pytest.raises(VectorError, match="cannot reproduce model_fingerprint.*no config.json"):
        streaming.checkpoint_fingerprint(path)


def test_broken_checkpoints_are_refused(tmp_path, tokenizer):
    path = save(tiny_llama(0), tmp_path / "m", True, tokenizer)
    index = json.loads((path / st.INDEX_FILE).read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    data = (path / shard).read_bytes()
    (path / shard).write_bytes(data[:-4])
    with pytest.raises(SafetensorsError, match="the file has .* bytes, its header describes"):
        st.open_checkpoint(path)
    (path / shard).unlink()
    with pytest.raises(SafetensorsError, match="shards named in .* are missing"):
        st.open_checkpoint(path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(SafetensorsError, match=r"only in pickle format \(pytorch_model\.bin\), refused"):
        st.open_checkpoint(pickled)


# -- Δ = FT(θ) − θ ------------------------------------------------------------------------------------------


def test_stream_difference_equals_the_in_memory_vector(tmp_path, dirs, sharded, reference):
    base, tuned = dirs
    result = streaming.stream_difference(base, tuned, tmp_path / "vec", Provenance(data_hash="d1"))
    vector = KnowledgeVector.load(tmp_path / "vec")
    assert vector.keys() == reference.keys()  # named_parameters order, tied embedding once
    assert all(torch.equal(vector[k], reference[k]) for k in reference)
    meta = vector.metadata
    assert meta.base_fingerprint == reference.metadata.base_fingerprint
    assert meta.dropped_zero == reference.metadata.dropped_zero  # the frozen norms
    assert (meta.kind, meta.method, meta.data_hash, meta.base_model) == ("full", "ft", "d1", str(base))
    assert result.num_tensors == len(reference) and result.num_params == reference.num_params
    assert result.norm == pytest.approx(reference.norm(), rel=1e-5)  # fp32 dot per block
    assert result.max_abs == pytest.approx(reference.stats().max_abs)
    assert not leftovers(tmp_path)


def test_vector_shards_map_one_to_one_to_model_shards(tmp_path, dirs, sharded):
    base, tuned = dirs
    streaming.stream_difference(base, tuned, tmp_path / "vec")
    record = json.loads((tmp_path / "vec" / "vector.json").read_text())
    files = sorted(p.name for p in (tmp_path / "vec").iterdir())
    if not sharded:
        assert files == ["vector.json", "vector.safetensors"] and record["format_version"] == 1
        return
    model_shards = [s.path.name for s in st.open_checkpoint(base).shards]
    assert record["format_version"] == vio.SHARDED_FORMAT_VERSION
    assert files == [vio.shard_file_name(i, len(model_shards)) for i in range(1, len(model_shards) + 1)] + [
        "vector.json"
    ]
    assert record["shards"] == {f: vio.sha256_file(tmp_path / "vec" / f) for f in files[:-1]}
    index = json.loads((base / st.INDEX_FILE).read_text())["weight_map"]
    for key, file in record["weight_map"].items():
        number = file.removeprefix("vector-")[:5]
        assert index[key] == model_shards[int(number) - 1], key  # the model shard with the same number


def test_difference_refuses_different_layouts(tmp_path, tokenizer):
    base = save(tiny_llama(0), tmp_path / "base", True, tokenizer)
    other = save(tiny_llama(0, hidden=16), tmp_path / "other", True)
    with pytest.raises(VectorError, match="different parameters") as err:
        streaming.stream_difference(base, other, tmp_path / "vec")
    assert "shape" in str(err.value)
    untied = save(tiny_llama(0, tie=False), tmp_path / "untied", True)
    with pytest.raises(VectorError, match="lm_head.weight: only in fine-tuned"):
        streaming.stream_difference(base, untied, tmp_path / "vec")
    with pytest.raises(VectorError, match="every delta is zero"):
        streaming.stream_difference(base, base.parent / "base", tmp_path / "vec")
    assert not (tmp_path / "vec").exists() and not leftovers(tmp_path)


def test_keep_zero_keeps_frozen_tensors(tmp_path, dirs, reference):
    base, tuned = dirs
    streaming.stream_difference(base, tuned, tmp_path / "vec", drop_zero=False)
    vector = KnowledgeVector.load(tmp_path / "vec")
    assert len(vector) == len(reference) + len(reference.metadata.dropped_zero)
    assert vector.metadata.dropped_zero == []


# -- θ + λ·Δ ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vector_from", ["memory", "stream"])
def test_stream_apply_is_bit_identical_to_in_memory_apply(tmp_path, dirs, sharded, reference, vector_from):
    base, tuned = dirs
    if vector_from == "memory":
        reference.save(tmp_path / "vec")
    else:
        streaming.stream_difference(base, tuned, tmp_path / "vec")
    result = streaming.stream_apply(base, tmp_path / "vec", -0.7, tmp_path / "out")
    assert result.num_tensors == len(reference) and result.num_shards == (6 if sharded else 1)

    model = tiny_llama(0)
    reference.apply_to(model, -0.7)
    save(model, tmp_path / "expected", sharded)
    assert_same_tensors(tmp_path / "out", tmp_path / "expected")
    # same file layout as the input, with an index; config and tokenizer copied
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors*")) == sorted(
        p.name for p in base.glob("*.safetensors*")
    )
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (tmp_path / "out" / name).read_bytes() == (base / name).read_bytes()
    provenance = json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())
    assert provenance["lambda"] == -0.7 and provenance["streamed"] is True
    assert provenance["vector_metadata"]["base_fingerprint"] == reference.metadata.base_fingerprint
    loaded, _ = load_model(tmp_path / "out")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in loaded.named_parameters())
    assert not leftovers(tmp_path)


def test_a_streamed_vector_applies_in_memory(tmp_path, dirs, reference):
    base, tuned = dirs
    streaming.stream_difference(base, tuned, tmp_path / "vec")
    model, expected = tiny_llama(0), tiny_llama(0)
    KnowledgeVector.load(tmp_path / "vec").apply_to(model, 1.5)
    reference.apply_to(expected, 1.5)
    assert all(
        torch.equal(a, b) for a, b in zip(params(model).values(), params(expected).values(), strict=True)
    )


def test_untied_sharded_model(tmp_path, tokenizer):
    base = save(tiny_llama(0, tie=False), tmp_path / "base", True, tokenizer)
    tuned = save(finetuned_copy(tiny_llama(0, tie=False)), tmp_path / "tuned", True)
    streaming.stream_difference(base, tuned, tmp_path / "vec")
    vector = KnowledgeVector.load(tmp_path / "vec")
    assert "lm_head.weight" in vector
    streaming.stream_apply(base, tmp_path / "vec", 0.3, tmp_path / "out")
    model = tiny_llama(0, tie=False)
    vector.apply_to(model, 0.3)
    save(model, tmp_path / "expected", True)
    assert_same_tensors(tmp_path / "out", tmp_path / "expected")


def test_bf16_checkpoint_stays_bf16_and_matches_in_memory(tmp_path, tokenizer):
    base_model = tiny_llama(0).to(torch.bfloat16)
    base = save(base_model, tmp_path / "base", True, tokenizer)
    fp32_base, _ = load_model(base)  # what `flearn vector compute` sees: fp32
    vector = KnowledgeVector.from_models(fp32_base, finetuned_copy(fp32_base))
    vector.save(tmp_path / "vec")
    streaming.stream_apply(base, tmp_path / "vec", -0.5, tmp_path / "out")  # fp32 fingerprint accepted
    vector.apply_to(base_model, -0.5, check_base=False)  # fp32 arithmetic, cast back to bf16
    save(base_model, tmp_path / "expected", True)
    assert_same_tensors(tmp_path / "out", tmp_path / "expected")
    assert all(t.dtype == torch.bfloat16 for t in tensors_of(tmp_path / "out").values())
    # a vector whose fingerprint is of the model loaded in bf16 is accepted too
    bf16_vector = KnowledgeVector.from_deltas(
        vector.deltas,
        Provenance(base_fingerprint=model_fingerprint(load_model(base, dtype=torch.bfloat16)[0])),
    )
    bf16_vector.save(tmp_path / "vec16")
    streaming.stream_apply(base, tmp_path / "vec16", -0.5, tmp_path / "out16")


# -- block arithmetic: the in-memory functions' values without their allocations ---------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("lam", [-0.7, 1.0, 3.3e-3])
def test_block_kernels_are_bit_identical_to_ops(dtype, lam):
    from flearning.vectors import ops

    gen = torch.Generator().manual_seed(0)
    theta = (torch.randn(37, 11, generator=gen) * 0.02).to(dtype)
    delta = torch.randn(37, 11, generator=gen) * 1e-3
    buffers = blocks.BlockBuffers()
    expected = ops.updated_values({"w": theta}, {"w": delta}, lam)["w"]
    got, bad = blocks.updated_block(theta, delta, lam, buffers)
    assert bad == 0 and got.dtype == dtype and torch.equal(got, expected)
    tuned = (theta.float() + delta).to(dtype)
    diff = blocks.difference_block(theta, tuned, buffers)
    assert torch.equal(diff, ops.difference({"w": theta}, {"w": tuned})["w"])
    # buffers are reused, not reallocated, for blocks of the same or a smaller size
    again, _ = blocks.updated_block(theta[:5], delta[:5], lam, buffers)
    assert again.data_ptr() == got.data_ptr()


def test_block_kernel_counts_values_that_overflow_the_stored_dtype():
    from flearning.vectors import ops

    theta = torch.tensor([[1.0, 60000.0], [2.0, float("nan")]], dtype=torch.float16)
    delta = torch.tensor([[0.0, 1e4], [0.0, 0.0]])
    _, bad = blocks.updated_block(theta, delta, 1.0, blocks.BlockBuffers())
    assert bad == 2  # 70000 is finite in fp32 but inf in fp16; the NaN stays NaN
    with pytest.raises(VectorError, match="2 of 4 values not finite"):
        ops.updated_values({"w": theta}, {"w": delta}, 1.0)
    assert blocks.all_finite(torch.zeros(0)) and not blocks.all_finite(torch.tensor([float("-inf")]))


def test_row_blocks_cover_every_row_once():
    assert list(st.row_blocks((10, 4), chunk_bytes=48)) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert list(st.row_blocks((3, 100), chunk_bytes=8)) == [(0, 1), (1, 2), (2, 3)]  # a row at least
    assert list(st.row_blocks(())) == [None] and list(st.row_blocks((0, 5))) == []


# -- memory: one block at a time ---------------------------------------------------------------------------


class OpenCounter:
    """Wraps ``st._safe_open``: counts handles alive and tensors/bytes read from files alive."""

    def __init__(self, monkeypatch):
        self.handles = self.max_handles = self.opened = 0
        self.tensors = self.max_tensors = 0
        self.bytes = self.max_bytes = 0
        monkeypatch.setattr(st, "_safe_open", self.open)

    def _track(self, tensor):
        size = tensor.numel() * tensor.element_size()
        self.tensors += 1
        self.bytes += size
        self.max_tensors = max(self.max_tensors, self.tensors)
        self.max_bytes = max(self.max_bytes, self.bytes)
        weakref.finalize(tensor, self._release, size)
        return tensor

    def _release(self, size):
        self.tensors -= 1
        self.bytes -= size

    def open(self, path):
        counter = self

        class Handle:
            def __enter__(self):
                counter.opened += 1
                counter.handles += 1
                counter.max_handles = max(counter.max_handles, counter.handles)
                self.fh = safe_open(str(path), framework="pt").__enter__()
                return self

            def __exit__(self, *exc):
                counter.handles -= 1
                return self.fh.__exit__(*exc)

            def get_tensor(self, name):
                return counter._track(self.fh.get_tensor(name))

            def get_slice(self, name):
                sl = self.fh.get_slice(name)

                class Slice:
                    def __getitem__(self, index):
                        return counter._track(sl[index])

                return Slice()

        return Handle()


@pytest.mark.parametrize("operation", ["apply", "difference", "lora"])
def test_at_most_two_blocks_are_materialised_at_once(tmp_path, tokenizer, monkeypatch, operation):
    base = save(tiny_llama(0), tmp_path / "base", True, tokenizer)
    tuned = save(finetuned_copy(tiny_llama(0)), tmp_path / "tuned", True)
    chunk = 1024  # 8 rows of the 32-wide matrices; the embedding alone is 33 KB
    if operation == "apply":
        streaming.stream_difference(base, tuned, tmp_path / "vec")
    if operation == "lora":
        adapter = lora_adapter(tmp_path, target_modules="all-linear")
    counter = OpenCounter(monkeypatch)
    if operation == "apply":
        streaming.stream_apply(base, tmp_path / "vec", -1.0, tmp_path / "out", chunk_bytes=chunk)
    elif operation == "difference":
        streaming.stream_difference(base, tuned, tmp_path / "out", chunk_bytes=chunk)
    else:
        streaming.stream_apply(base, adapter, -1.0, tmp_path / "out", chunk_bytes=chunk)
    smallest_shard = min(p.stat().st_size for p in base.glob("model-*.safetensors"))
    assert counter.max_handles == 1  # each block through its own short-lived mmap handle
    assert counter.opened > 40  # ... so many handles: blocks, not tensors or shards
    limit = 2 if operation != "lora" else 3  # θ block and Δ block; LoRA: θ block plus the small A and B
    assert counter.max_tensors <= limit
    assert counter.max_bytes <= 2 * chunk + (4 * 32 * 8 * 2 if operation == "lora" else 0)
    assert counter.max_bytes < smallest_shard
    assert counter.tensors == 0


def test_peak_rss_does_not_grow_with_the_shard_size(tmp_path):
    """A real process: two 64 MB shards applied with 4 MB blocks; the resident set grows far less.

    A first apply on 16 MB shards warms the process up: its one-time allocations (thread pools, lazily
    imported modules, allocator arenas; 20-25 MB measured) are not per-shard memory and made the
    single-run version of this test flaky (29-34 MB growth against a 33.5 MB bound). Warm, the 64 MB
    shards grow the resident set by about three 4 MB blocks (12.7 MB measured).
    """
    script = textwrap.dedent(
        """
        import json, sys, os, torch
        from safetensors.torch import save_file
        from flearning.vectors import streaming
        from flearning.vectors.vector import KnowledgeVector

        def make(root, rows):
            os.makedirs(root + "/m")
            weight_map = {}
            for i in (1, 2):
                name = f"model-0000{i}-of-00002.safetensors"
                tensors = {f"w{i}.{j}": torch.randn(rows, 4096) for j in range(4)}
                save_file(tensors, f"{root}/m/{name}", metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(tensors, name))
                if i == 1:
                    KnowledgeVector.from_deltas({k: torch.randn(rows, 4096) for k in tensors}).save(root + "/v")
                del tensors
            index = {"metadata": {}, "weight_map": weight_map}
            json.dump(index, open(root + "/m/model.safetensors.index.json", "w"))

        def status(field):
            line = [l for l in open("/proc/self/status") if l.startswith(field)][0]
            return int(line.split()[1]) * 1024

        growth = {}
        for tag, rows in (("warm", 256), ("measured", 1024)):
            root = os.path.join(sys.argv[1], tag)
            make(root, rows)
            # reset the high-water mark to the current resident set before measuring
            open("/proc/self/clear_refs", "w").write("5")
            before = status("VmRSS")
            streaming.stream_apply(root + "/m", root + "/v", -0.5, root + "/o", chunk_bytes=4 << 20)
            growth[tag] = status("VmHWM") - before
        print(json.dumps(growth))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    growth = json.loads(done.stdout.strip().splitlines()[-1])
    shard = (tmp_path / "measured" / "m" / "model-00001-of-00002.safetensors").stat().st_size
    assert shard > 64 << 20
    assert growth["measured"] < 0.5 * shard, (growth, shard)


# -- checks: nothing written on any error -------------------------------------------------------------------


def vector_with(tmp_path, deltas, **kwargs) -> Path:
    KnowledgeVector.from_deltas(deltas, Provenance(**kwargs), drop_zero=False).save(tmp_path / "bad-vec")
    return tmp_path / "bad-vec"


@pytest.mark.parametrize(
    ("deltas", "message"),
    [
        ({"model.layers.9.mlp.up_proj.weight": torch.ones(64, 32)}, "no such parameter"),
        ({"lm_head.weight": torch.ones(257, 32)}, "tied to model.embed_tokens.weight"),
        ({"model.norm.weight": torch.ones(33)}, r"shape \(33,\) in the vector, \(32,\) in the model"),
    ],
    ids=["missing", "tied-name", "shape"],
)
def test_vectors_that_do_not_fit_are_refused(tmp_path, dirs, deltas, message):
    base, _ = dirs
    with pytest.raises(VectorError, match=message):
        streaming.stream_apply(base, vector_with(tmp_path, deltas), 1.0, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_nan_in_the_last_shard_leaves_nothing_behind(tmp_path, dirs, reference):
    base, _ = dirs
    ckpt = st.open_checkpoint(base)
    last = next(e.name for e in reversed(ckpt.shards[-1].entries) if e.name in reference)
    deltas = dict(reference.deltas)
    deltas[last] = deltas[last].clone()
    deltas[last][0, 0] = float("nan")
    with pytest.raises(VectorError, match=f"(?s)NaN/inf values; nothing was written.*{last}: 1 of"):
        streaming.stream_apply(base, vector_with(tmp_path, deltas), 1.0, tmp_path / "out", check_base=False)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_overflow_to_inf_is_refused_and_existing_output_kept(tmp_path, dirs, reference):
    base, _ = dirs
    reference.save(tmp_path / "vec")
    streaming.stream_apply(base, tmp_path / "vec", 1.0, tmp_path / "out")
    before = tensors_of(tmp_path / "out")
    with pytest.raises(VectorError, match="not finite"):
        streaming.stream_apply(base, tmp_path / "vec", 1e40, tmp_path / "out", overwrite=True)
    after = tensors_of(tmp_path / "out")
    assert all(torch.equal(before[k], after[k]) for k in before) and not leftovers(tmp_path)


@pytest.mark.parametrize("lam", [float("inf"), float("nan"), True, "1"])
def test_lambda_must_be_a_finite_number(tmp_path, dirs, reference, lam):
    base, _ = dirs
    reference.save(tmp_path / "vec")
    with pytest.raises(VectorError, match="lambda must be"):
        streaming.stream_apply(base, tmp_path / "vec", lam, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_another_base_is_refused_unless_check_base_is_off(tmp_path, dirs, reference):
    _, tuned = dirs
    reference.save(tmp_path / "vec")
    with pytest.raises(VectorError, match="another base model"):
        streaming.stream_apply(tuned, tmp_path / "vec", -1.0, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    streaming.stream_apply(tuned, tmp_path / "vec", -1.0, tmp_path / "out", check_base=False)


def test_unverifiable_base_asks_for_check_base_false(tmp_path, dirs, reference):
    base, _ = dirs
    reference.save(tmp_path / "vec")
    (base / "config.json").unlink()
    with pytest.raises(VectorError, match="check_base=False"):
        streaming.stream_apply(base, tmp_path / "vec", -1.0, tmp_path / "out")
    streaming.stream_apply(base, tmp_path / "vec", -1.0, tmp_path / "out", check_base=False)


def test_tampered_vector_shard_is_refused(tmp_path, dirs):
    base, tuned = dirs
    streaming.stream_difference(base, tuned, tmp_path / "vec")
    shard = sorted((tmp_path / "vec").glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(VectorError, match="checksum mismatch"):
        streaming.stream_apply(base, tmp_path / "vec", 1.0, tmp_path / "out")
    with pytest.raises(VectorError, match="checksum mismatch"):
        KnowledgeVector.load(tmp_path / "vec")
    assert not (tmp_path / "out").exists()


def test_output_paths_are_checked(tmp_path, dirs, reference):
    base, _ = dirs
    reference.save(tmp_path / "vec")
    for out in (base, base / "sub", tmp_path / "vec"):
        with pytest.raises(VectorError, match="refusing to write into the input"):
            streaming.stream_apply(base, tmp_path / "vec", 1.0, out, overwrite=True)
    with pytest.raises(VectorError, match="holds the input"):
        streaming.stream_apply(base, tmp_path / "vec", 1.0, tmp_path, overwrite=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(VectorError, match="not empty"):
        streaming.stream_apply(base, tmp_path / "vec", 1.0, tmp_path / "out")
    with pytest.raises(VectorError, match="replaces only an earlier output of flearn vector apply"):
        streaming.stream_apply(base, tmp_path / "vec", 1.0, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep").read_text() == "x"
    streaming.stream_apply(base, tmp_path / "vec", 1.0, tmp_path / "applied")
    streaming.stream_apply(base, tmp_path / "vec", 2.0, tmp_path / "applied", overwrite=True)
    assert json.loads((tmp_path / "applied" / PROVENANCE_FILE).read_text())["lambda"] == 2.0


def test_stale_pickled_weights_are_not_copied(tmp_path, dirs, reference):
    base, _ = dirs
    (base / "pytorch_model.bin").write_bytes(b"old weights")
    reference.save(tmp_path / "vec")
    streaming.stream_apply(base, tmp_path / "vec", 1.0, tmp_path / "out")
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()


# -- sharded vector files -----------------------------------------------------------------------------------


def test_sharded_vector_description_is_checked(tmp_path, tokenizer):
    base = save(tiny_llama(0), tmp_path / "base", True, tokenizer)
    tuned = save(finetuned_copy(tiny_llama(0)), tmp_path / "tuned", True)
    streaming.stream_difference(base, tuned, tmp_path / "vec")
    path = tmp_path / "vec" / "vector.json"
    record = json.loads(path.read_text())
    key, file = next(iter(record["weight_map"].items()))
    other = next(f for f in record["shards"] if f != file)
    record["weight_map"][key] = other
    path.write_text(json.dumps(record))
    with pytest.raises(VectorError, match=f"{key}: in {file}, vector.json places it in {other}"):
        KnowledgeVector.load(tmp_path / "vec")
    with pytest.raises(VectorError, match="places it in"):
        streaming.stream_apply(base, tmp_path / "vec", 1.0, tmp_path / "out")
    (tmp_path / "vec" / other).unlink()
    with pytest.raises(VectorError, match=f"no {other}"):
        KnowledgeVector.load(tmp_path / "vec")


# -- LoRA adapters ------------------------------------------------------------------------------------------


def lora_adapter(tmp_path, model=None, name="adapter", **config) -> Path:
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **config}
    peft_model = get_peft_model(model if model is not None else tiny_llama(0), LoraConfig(**config))
    randomize_lora(peft_model)
    peft_model.save_pretrained(tmp_path / name)
    return tmp_path / name


def in_memory_lora(adapter: Path, model) -> KnowledgeVector:
    from peft import PeftModel

    return KnowledgeVector.from_lora(PeftModel.from_pretrained(model, str(adapter)))


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"target_modules": "all-linear", "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 3}},
        {"use_rslora": True, "r": 8},
    ],
    ids=["qv", "patterns", "rslora"],
)
def test_lora_adapter_on_a_sharded_base_equals_the_in_memory_merge(tmp_path, dirs, config):
    base, _ = dirs
    adapter = lora_adapter(tmp_path, **config)
    streaming.stream_apply(base, adapter, -0.8, tmp_path / "out")
    expected = tiny_llama(0)
    in_memory_lora(adapter, tiny_llama(0)).apply_to(expected, -0.8)
    got = tensors_of(tmp_path / "out")
    for name, value in params(expected).items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=name)
    provenance = json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())
    assert provenance["adapter"] == str(adapter) and provenance["lora"]["r"] == config.get("r", 4)


def test_lora_with_lambda_one_equals_peft_merge_and_unload(tmp_path, dirs):
    from peft import PeftModel

    base, _ = dirs
    adapter = lora_adapter(tmp_path, target_modules="all-linear")
    streaming.stream_apply(base, adapter, 1.0, tmp_path / "out")
    merged = PeftModel.from_pretrained(tiny_llama(0), str(adapter)).merge_and_unload()
    got = tensors_of(tmp_path / "out")
    for name, value in params(merged).items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=name)


def test_stream_lora_vector_equals_from_lora(tmp_path, dirs, sharded):
    base, _ = dirs
    adapter = lora_adapter(tmp_path, target_modules="all-linear")
    streaming.stream_lora_vector(base, adapter, tmp_path / "vec")
    vector, reference = KnowledgeVector.load(tmp_path / "vec"), in_memory_lora(adapter, tiny_llama(0))
    assert vector.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(vector[key], reference[key], atol=1e-7, rtol=0)
    assert vector.metadata.base_fingerprint == reference.metadata.base_fingerprint
    assert vector.metadata.hyperparameters["lora"] == reference.metadata.hyperparameters["lora"]
    assert (len(list((tmp_path / "vec").glob("vector-*"))) > 1) == sharded


def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=257, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def test_lora_fan_in_fan_out_on_gpt2(tmp_path):
    base = save(tiny_gpt2(), tmp_path / "gpt2", True)
    adapter = lora_adapter(tmp_path, tiny_gpt2(), target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    streaming.stream_apply(base, adapter, -0.5, tmp_path / "out")
    expected = tiny_gpt2()
    in_memory_lora(adapter, tiny_gpt2()).apply_to(expected, -0.5)
    got = tensors_of(tmp_path / "out")
    for name, value in params(expected).items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["embed_tokens"]}, "embedding"),
    ],
    ids=["dora", "modules_to_save", "embedding"],
)
def test_unsupported_adapters_are_refused(tmp_path, dirs, config, message):
    base, _ = dirs
    adapter = lora_adapter(tmp_path, **config)
    with pytest.raises(VectorError, match=message):
        streaming.stream_apply(base, adapter, 1.0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_adapter_of_another_architecture_is_refused(tmp_path, dirs):
    base, _ = dirs
    adapter = lora_adapter(tmp_path, tiny_llama(0, hidden=16))
    with pytest.raises(VectorError, match="shape"):
        streaming.stream_apply(base, adapter, 1.0, tmp_path / "out")


# -- CLI ------------------------------------------------------------------------------------------------------


def run(*args, ok: bool = True):
    result = CliRunner().invoke(vector_app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_cli_streams_sharded_models_by_default(tmp_path, tokenizer, reference):
    base = save(tiny_llama(0), tmp_path / "base", True, tokenizer)
    tuned = save(finetuned_copy(tiny_llama(0)), tmp_path / "tuned", True)
    result = run("compute", "--base", base, "--finetuned", tuned, "--out", tmp_path / "vec")
    assert "streamed, 6 files" in result.output
    vector = KnowledgeVector.load(tmp_path / "vec")
    assert vector.keys() == reference.keys() and all(torch.equal(vector[k], reference[k]) for k in vector)
    assert vector.metadata.hyperparameters == {"finetuned": str(tuned)}
    result = run(
        "apply", "--model", base, "--vector", tmp_path / "vec", "--lambda=-0.7", "--out", tmp_path / "out"
    )
    assert "streamed" in result.output
    model = tiny_llama(0)
    reference.apply_to(model, -0.7)
    save(model, tmp_path / "expected", True)
    assert_same_tensors(tmp_path / "out", tmp_path / "expected")
    assert f"{reference.num_params:,}" in run("info", tmp_path / "vec").output  # loads a sharded vector
    # --no-stream: the in-memory path on the same sharded directory
    result = run(
        "apply",
        "--model",
        base,
        "--vector",
        tmp_path / "vec",
        "--lambda=-0.7",
        "--out",
        tmp_path / "mem",
        "--no-stream",
    )
    assert "streamed" not in result.output
    got = tensors_of(tmp_path / "mem")
    assert all(torch.equal(got[k], v) for k, v in tensors_of(tmp_path / "expected").items())


def test_cli_single_file_models_stay_in_memory_unless_stream(tmp_path, tiny_model_dir, tokenizer, reference):
    tuned = save(finetuned_copy(tiny_llama(0)), tmp_path / "tuned", False, tokenizer)
    result = run("compute", "--base", tiny_model_dir, "--finetuned", tuned, "--out", tmp_path / "mem")
    assert "streamed" not in result.output
    result = run(
        "compute", "--base", tiny_model_dir, "--finetuned", tuned, "--out", tmp_path / "str", "--stream"
    )
    assert "streamed, 1 file" in result.output
    a, b = KnowledgeVector.load(tmp_path / "mem"), KnowledgeVector.load(tmp_path / "str")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a.metadata.base_fingerprint == b.metadata.base_fingerprint
    result = run(
        "apply",
        "--model",
        tiny_model_dir,
        "--vector",
        tmp_path / "str",
        "--lambda",
        "0.5",
        "--out",
        tmp_path / "o1",
    )
    assert "streamed" not in result.output
    result = run(
        "apply",
        "--model",
        tiny_model_dir,
        "--vector",
        tmp_path / "str",
        "--lambda",
        "0.5",
        "--out",
        tmp_path / "o2",
        "--stream",
    )
    assert "streamed" in result.output
    assert_same_tensors(tmp_path / "o1", tmp_path / "o2")


def test_cli_applies_and_computes_lora_adapters_by_streaming(tmp_path, tokenizer):
    base = save(tiny_llama(0), tmp_path / "base", True, tokenizer)
    adapter = lora_adapter(tmp_path)
    result = run("apply", "--model", base, "--vector", adapter, "--lambda=-1", "--out", tmp_path / "out")
    assert "LoRA adapter" in result.output and "4 tensors" in result.output
    result = run(
        "apply",
        "--model",
        base,
        "--vector",
        adapter,
        "--lambda=-1",
        "--out",
        tmp_path / "o",
        "--no-stream",
        ok=False,
    )
    assert "LoRA adapter directory" in str(result.exception)
    result = run("compute", "--base", base, "--lora-adapter", adapter, "--out", tmp_path / "vec")
    assert "lora vector: 4 tensors" in result.output and "streamed" in result.output
    run("apply", "--model", base, "--vector", tmp_path / "vec", "--lambda=-1", "--out", tmp_path / "out2")
    assert_same_tensors(tmp_path / "out", tmp_path / "out2")


def test_in_memory_and_streamed_apply_write_the_same_provenance_file(tmp_path, dirs, reference):
    """One file name and one record for both paths (were two constants kept equal by hand)."""
    base, _ = dirs
    reference.save(tmp_path / "vec")
    apply_to_directory(base, tmp_path / "vec", -0.5, tmp_path / "mem")
    streaming.stream_apply(base, tmp_path / "vec", -0.5, tmp_path / "str")
    in_memory = json.loads((tmp_path / "mem" / PROVENANCE_FILE).read_text())
    streamed = json.loads((tmp_path / "str" / PROVENANCE_FILE).read_text())
    assert streamed == {**in_memory, "streamed": True}
    assert in_memory["vector"] == str(tmp_path / "vec") and in_memory["lambda"] == -0.5


def test_save_file_vectors_and_streamed_vectors_have_the_same_format(tmp_path, dirs, reference):
    """A single-file streamed vector is the same format as KnowledgeVector.save writes."""
    base, tuned = dirs
    reference.save(tmp_path / "mem")
    streaming.stream_difference(base, tuned, tmp_path / "str")
    a = json.loads((tmp_path / "mem" / "vector.json").read_text())
    b = json.loads((tmp_path / "str" / "vector.json").read_text())
    assert a["tensors"] == b["tensors"] and a["num_params"] == b["num_params"]
    for file in (tmp_path / "str").glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as fh:
            assert fh.metadata() == {"format": vio.FORMAT}
