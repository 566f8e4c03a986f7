"""bench/binding.py: the benches time a graph as the engine runs it, through one IOBinding with the slot inputs
bound once, not with every shard input converted from numpy on each call (what `session.run` with numpy feeds
does, and what the slots figures of bench_graphs and the engine's bare decode call timed before). On a
stand-in graph with a slot graph's interface; no export runs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import bench_graphs as bg  # noqa: E402


def tiny_slot_graph(folder: Path) -> None:
    """A stand-in decoder with a slot graph's interface: a row's logits = its input_ids · Σ slots[its adapter_index]
    (one head of size 1), present = past ++ input_ids."""
    import onnx
    from onnx import TensorProto, helper

    float_, int64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [
        helper.make_node("Gather", ["lora_A_slots", "adapter_index"], ["picked"], axis=0),
        helper.make_node("ReduceSum", ["picked", "one"], ["total"], keepdims=0),
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=float_),
        helper.make_node("Unsqueeze", ["ids_f", "last"], ["ids_3d"]),
        helper.make_node("Unsqueeze", ["total", "rows"], ["total_3d"]),
        helper.make_node("Mul", ["ids_3d", "total_3d"], ["logits"]),
        helper.make_node("Unsqueeze", ["ids_f", "head_and_dim"], ["kv_new"]),
        helper.make_node("Concat", ["past_key_values.0.key", "kv_new"], ["present.0.key"], axis=2),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input_ids", int64, ["batch", "new"]),
         helper.make_tensor_value_info("attention_mask", int64, ["batch", "total"]),
         helper.make_tensor_value_info("past_key_values.0.key", float_, ["batch", 1, "past", 1]),
         helper.make_tensor_value_info("lora_A_slots", float_, ["slots", 3]),
         helper.make_tensor_value_info("adapter_index", int64, ["batch"])],
        [helper.make_tensor_value_info("logits", float_, ["batch", "new", 1]),
         helper.make_tensor_value_info("present.0.key", float_, ["batch", 1, "all", 1])],
        [helper.make_tensor("last", int64, [1], [2]), helper.make_tensor("one", int64, [1], [1]),
         helper.make_tensor("rows", int64, [2], [1, 2]),
         helper.make_tensor("head_and_dim", int64, [2], [1, 3])])
    folder.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    (folder / "config.json").write_text('{"num_attention_heads": 1, "num_key_value_heads": 1, "hidden_size": 1}')


def test_decoder_binds_the_slot_inputs_once_and_feeds_presents_back(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The slots figure times the graph, not numpy → OrtValue conversion of its shard inputs on every call:
    no session.run; the shard input bound once, at construction; presents come back as the next past."""
    tiny_slot_graph(tmp_path / "slots")
    decoder = bg.Decoder(tmp_path / "slots", "function")
    monkeypatch.setattr(decoder.graph.session, "run", lambda *a, **k: pytest.fail("numpy feeds through session.run"))
    bound: list[str] = []
    bind = decoder.graph.binding.bind_ortvalue_input
    monkeypatch.setattr(decoder.graph.binding, "bind_ortvalue_input", lambda n, v: (bound.append(n), bind(n, v)))
    slot = np.random.default_rng(1).standard_normal((1, 3)) * 0.02  # what Decoder bound: rng(1), scaled
    past = bg.random_past(decoder.kv, 2, 4)
    ids = np.array([[3], [5]])
    for step in range(3):
        seconds, logits, past = decoder.run(ids, past)
        assert seconds > 0 and logits[:, 0, 0] == pytest.approx(ids[:, 0] * slot.sum(), rel=1e-5)
        assert past["past_key_values.0.key"].shape() == [2, 1, 5 + step, 1]
    assert "lora_A_slots" not in bound  # bound once, before the calls
    assert bound.count("adapter_index") == 3 and bound.count("past_key_values.0.key") == 3
    assert bg.decode_ms(decoder, bg.random_past(decoder.kv, 2, 4), 2) > 0


def test_engine_decode_step_binds_the_slot_inputs_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_engine's decode call (the engine's bare-graph figure, bench_llamacpp's single stream): no numpy
    feeds through session.run."""
    import onnxruntime as ort

    bench_engine = pytest.importorskip("bench_engine")
    tiny_slot_graph(tmp_path / "slots")
    session = ort.InferenceSession(str(tmp_path / "slots" / "model.onnx"), providers=["CPUExecutionProvider"])
    monkeypatch.setattr(session, "run", lambda *a, **k: pytest.fail("numpy feeds through session.run"))
    assert bench_engine.decode_step_ms(session, 4, 6, 2, slots=3) > 0
