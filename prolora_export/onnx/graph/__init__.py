"""Decoder graphs from ONNX Runtime GenAI's model builder with the ``ai.prolora`` ops spliced in.

:mod:`.builder` runs the builder on a Hugging Face folder (the base graph: fused attention, a
shared KV buffer, 1.37× faster decode than optimum's traced graph, and it runs on transformers 5),
:mod:`.splice` puts one ``RotatedShardLoRA`` (or slot) node on each adapted projection, and
:mod:`.check` verifies the wiring before a graph is handed out.
"""
