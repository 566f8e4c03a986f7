"""The model builder's process with less memory (prolora_export/onnx/graph/builder_entry.py, issue 29): the
checkpoint's mapped pages handed back without changing what the process reads, and int4/int8 weights
quantized one at a time into the very graph the builder's own ``to_nbits`` writes."""

from __future__ import annotations

import hashlib
import mmap
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
from builder_helpers import needs_builder
from test_data import tiny_tokenizer

from prolora_export.onnx.graph import builder_entry
from prolora_export.onnx.graph.builder import BUILDER_ENTRY, BUILDER_MODULE

MB = 1 << 20


def file_rss() -> int:
    return builder_entry._file_rss()


@pytest.fixture
def mapped(tmp_path):
    """A 32 MB ``*.safetensors`` file mapped private and writable (as torch maps a checkpoint), every page read."""
    path = tmp_path / "weights.safetensors"
    path.write_bytes(bytes(range(256)) * (32 * MB // 256))
    with open(path, "r+b") as f:
        view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    before = file_rss()
    digest = hashlib.sha256(view[:]).hexdigest()  # reads every page
    yield view, before, digest
    view.close()


def test_page_release_hands_back_read_pages_and_keeps_written_ones(mapped):
    view, before, digest = mapped
    view[:4] = b"PRoL"  # a page this process wrote (copy-on-write): reclaiming must not lose it
    assert file_rss() - before > 24 * MB
    if not builder_entry.PageRelease().release():
        pytest.skip("the kernel refuses MADV_PAGEOUT")
    assert file_rss() - before < 8 * MB
    assert view[:4] == b"PRoL"
    view[:4] = bytes(range(4))
    assert hashlib.sha256(view[:]).hexdigest() == digest  # read back from the file: the same bytes


def test_page_release_thread_runs_when_file_backed_rss_grows(mapped):
    view, _, _ = mapped
    if not builder_entry.PageRelease().release():  # the fixture read every page: hand them back first
        pytest.skip("the kernel refuses MADV_PAGEOUT")
    release = builder_entry.PageRelease(step=4 * MB, period=0.01)
    release.start()
    try:
        deadline = time.monotonic() + 10
        while not release.released and time.monotonic() < deadline:
            view[:].count(b"x")  # keep touching the pages
            time.sleep(0.02)
    finally:
        release.stop()
    assert release.released


def fake_builder(**changes) -> SimpleNamespace:
    """The attributes :func:`builder_entry.streamable` reads, as the builder's default int4 route sets them."""
    values = {"quant_type": None, "quant_attrs": {"use_qdq": False}, "quantization_algo": "default",
              "int4_customized_weight_config": {}, "exact_quant_overrides": {}, "exact_quant_override_names": set(),
              "ep": "cpu", "matmul_attrs": {"weights_prepacked": 0}, "model": SimpleNamespace(graph=[])}
    return SimpleNamespace(**{**values, **changes})


@pytest.mark.parametrize("changes", [
    {"quantization_algo": "k_quant"}, {"quant_type": "awq"}, {"quant_attrs": {"use_qdq": True}},
    {"int4_customized_weight_config": {"/lm_head/MatMul": {"bits": 8}}},
    {"ep": "cuda", "matmul_attrs": {"weights_prepacked": 1}},
])
def test_only_the_builders_default_route_is_streamed(changes):
    pytest.importorskip("onnx_ir")
    assert builder_entry.streamable(fake_builder())
    assert not builder_entry.streamable(fake_builder(**changes))


def graph_record(path: Path) -> dict:
    """What a graph computes and stores: opsets, IR version, inputs, outputs, nodes in order, value infos,
    every initializer's type, shape and bytes (the producer version is left out: the builder stamps it with
    the git commit of the working directory)."""
    model = onnx.load(str(path))
    graph = model.graph

    def messages(items) -> list[bytes]:
        return [m.SerializeToString(deterministic=True) for m in items]

    return {"ir": model.ir_version, "opsets": sorted((o.domain, o.version) for o in model.opset_import),
            "inputs": messages(graph.input), "outputs": messages(graph.output), "nodes": messages(graph.node),
            "value_info": sorted(messages(graph.value_info)),
            "initializers": {t.name: (t.data_type, tuple(t.dims),
                                      hashlib.sha256(onnx.numpy_helper.to_array(t).tobytes()).hexdigest())
                             for t in graph.initializer}}


def tiny_llama_folder(root: Path, tied: bool) -> Path:
    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=128,
                                      max_position_embeddings=64, tie_word_embeddings=tied)
    folder = root / "hf"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@needs_builder
@pytest.mark.parametrize(("precision", "tied", "options"), [
    ("int4", True, ["fuse_qkv=false", "block_size=16", "accuracy_level=1"]),  # the tied head: GatherBlockQuantized
    ("int8", False, []),  # packed Q/K/V, the embedding float
])
def test_streamed_quantization_writes_the_builders_own_graph(tmp_path, precision, tied, options):
    folder = tiny_llama_folder(tmp_path, tied)
    args = ["-i", str(folder), "-p", precision, "-e", "cpu", "-c", str(tmp_path / "cache"),
            *(["--extra_options", *options] if options else [])]
    theirs = subprocess.run([sys.executable, "-m", BUILDER_MODULE, *args, "-o", str(tmp_path / "theirs")],
                            capture_output=True, text=True, check=True)
    ours = subprocess.run([sys.executable, str(BUILDER_ENTRY), BUILDER_MODULE, *args, "-o", str(tmp_path / "ours")],
                          capture_output=True, text=True, check=True)
    assert "weight by weight" in ours.stdout and "weight by weight" not in theirs.stdout
    record = graph_record(tmp_path / "ours" / "model.onnx")
    assert record == graph_record(tmp_path / "theirs" / "model.onnx")
    assert sum(onnx.NodeProto.FromString(n).op_type == "MatMulNBits" for n in record["nodes"]) > 2  # projections
    assert not any(name.endswith("MatMul.weight") for name in record["initializers"])  # float weights gone
    for name in ("genai_config.json", "tokenizer.json"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes()
