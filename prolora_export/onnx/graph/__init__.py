"""Decoder graphs from ONNX Runtime GenAI's model builder with the ``ai.prolora`` ops spliced in.

:mod:`.builder` runs the builder on a Hugging Face folder (the base graph: fused attention, a
shared KV buffer, 1.37× faster decode than optimum's traced graph, and it runs on transformers 5),
:mod:`.splice` puts one ``RotatedShardLoRA`` (or slot) node on each adapted projection, and
:mod:`.check` verifies the wiring before a graph is handed out.
"""


def is_builder_graph(graph) -> bool:
    """Whether ONNX Runtime GenAI's model builder wrote the graph: its attention is one
    ``com.microsoft::GroupQueryAttention`` node per layer (optimum traces attention into plain ops), over a
    past/present buffer and an attention mask without position_ids (each row's length is the mask's sum)."""
    return any(n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft" for n in graph.node)
