"""Which positions a builder graph computes logits for: a ``logits_start`` input in front of the LM head.

A prefill run needs one position's logits per row (its last real token), yet the builder's LM head multiplies
every position: on the demo model 49152 × 576 multiply-adds a token, about a fifth of a prefill's work, and all
of it wasted on the chunks before a prompt's last. The builder's own ``prune_lm_head`` keeps the last column
only, which a batch of right-padded prompts of different lengths cannot use. So the LM head's input is sliced
from ``logits_start`` along the sequence axis: logits come out for positions ``[logits_start, sequence_length)``
of the run. The input is an overridable initializer with default 0, so whoever does not feed it (parity,
onnxruntime-genai, a plain ``session.run``) gets every position as before; the engine feeds it (see
:meth:`prolora_export.engine.core.Engine._prefill_chunk`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: the graph input: first position (of the run's sequence) whose logits are computed; default 0
LOGITS_START = "logits_start"
#: the builder's LM head: ``/lm_head/MatMul`` (float) or ``/lm_head/MatMul_Q4`` / ``_Q8`` (MatMulNBits)
HEAD_PREFIX = "/lm_head/MatMul"
SLICE = "/lm_head/logits_start/Slice"
#: the logits output's sequence dimension once sliced
LOGITS_LENGTH = "logits_length"


def takes_logits_start(session) -> bool:
    """Whether an ONNX Runtime session's graph has the input (an overridable initializer, so not among
    ``get_inputs()``)."""
    return any(i.name == LOGITS_START for i in session.get_overridable_initializers())


def add_logits_start(model: onnx.ModelProto) -> bool:
    """Slice the LM head's input from ``logits_start`` on (in place); False when the graph has no builder LM
    head (or has the input already)."""
    graph = model.graph
    head = next((n for n in graph.node if n.name.startswith(HEAD_PREFIX)), None)
    if head is None or any(i.name == LOGITS_START for i in graph.input):
        return False
    ends, axes = f"{SLICE}/ends", f"{SLICE}/axes"
    graph.initializer.extend([numpy_helper.from_array(np.zeros(1, np.int64), LOGITS_START),
                              numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), ends),
                              numpy_helper.from_array(np.ones(1, np.int64), axes)])
    graph.input.append(helper.make_tensor_value_info(LOGITS_START, TensorProto.INT64, [1]))
    sliced = f"{SLICE}/output_0"
    node = helper.make_node("Slice", [head.input[0], LOGITS_START, ends, axes], [sliced], name=SLICE)
    head.input[0] = sliced
    nodes = list(graph.node)
    nodes.insert(nodes.index(head), node)
    del graph.node[:]
    graph.node.extend(nodes)
    # the head and what follows it (soft-capping, scaling, a cast) now have logits_length positions
    after = {o for n in nodes[nodes.index(head):] for o in n.output}
    keep = [v for v in graph.value_info if v.name not in after]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    for output in graph.output:
        if output.name == "logits":
            output.type.tensor_type.shape.dim[1].dim_param = LOGITS_LENGTH
    return True
