"""The engine: continuous batching over one adapter-slot graph, a different adapter on every row.

Step-driven: :meth:`Engine.step` does one scheduling step and returns its events. In a step,
(1) submitted requests are checked (a bad one finishes at once with an error event, nothing else is
touched), (2) every running row decodes one token, and rows that finish leave the batch, (3) when no
prefill is under way, queued requests are taken while the batch size and the cached-token bound
allow, and grouped by similar prompt length (padded, each row with its own adapter), (4) prefill
runs take at most ``max_prefill_tokens`` new tokens in all: a chunk of the first group, the previous
chunks' presents fed as its past, then (on a KV pool) further groups whose whole prompts fit what is
left. A group whose prompts are done samples its first tokens and its cache joins the running rows'
(a batch cache: in one rebuild). Rows never wait for each other to finish, and a running row waits
at most one chunk's tokens for its next token, however long a prompt being prefilled. In a busy
batch on a pool, prompts that hit the prefix cache with a tail shorter than a block take no prefill
run: they join the running rows at once and the decode steps feed their tails a token per step.

Padding and positions (:mod:`.cache`): on optimum's traced graphs rows are left-padded and a row's
positions count its real tokens, fed as ``position_ids``. Such a graph without that input is served
only when its positions survive left padding (ALiBi, :data:`MASK_POSITIONS`); one deriving them from
the cache length (old Gemma slot exports) would decode rows left-padded after their own prefill at
wrong positions, and is refused at load. The model builder's graphs (``GroupQueryAttention``) take no
positions: each row's length is its mask's sum, so rows are right-padded and a group's first tokens
are read at each row's last real column.

The cache: on the CPU, a builder graph runs on a :class:`~.pool.KVPool` allocated once (``max_batch``
rows of ``max_cached_tokens / max_batch`` positions, bound as past and present: the graph writes in
place, no row is ever copied); other graphs (and CUDA sessions) keep a :class:`~.cache.KVBatch` that
the graph extends every step and that is rebuilt, one copy per step, when rows join or leave.

Failures: a graph run that fails finishes only the rows in that run (the decoding rows, or one
prefill group) with an error event; the other rows go on.

Threads: ``step`` (and :meth:`generate` / :meth:`stream`, which call it) must run on one thread at
a time; :meth:`submit`, :meth:`cancel`, :meth:`load_adapter` and :meth:`unload_adapter` may be called
from any thread (submits and cancels are applied at the next step boundary; loads and unloads wait
for the step in progress). :class:`~prolora_export.engine.runner.EngineRunner` runs the steps on a
background thread and hands events to threads or to an asyncio loop.

Bounds: at most ``max_batch`` rows run or prefill at once, and ``rows × longest possible row``
(prompt + max_new_tokens, padding included) stays within ``max_cached_tokens`` (on a pool: a request
fits one row, and the pool is that bound, allocated once); requests beyond wait in a FIFO queue.
A graph run takes at most ``max_prefill_tokens`` new tokens (a decode step: one per row), so a
prefill's activations are bounded by the chunk (attention scores: chunk × cached length) whatever
the prompt; ONNX Runtime's arena is shrunk after a prefill's last chunk, so that memory goes back.
Prompts and generation stop at the model's context (taken from its config class, so aliases such as
GPT-2's ``n_positions`` count).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import PRoLoRAError
from ..models import kv_cache_shape
from ..onnx.graph.logits import LOGITS_START, takes_logits_start
from ..onnx.op import ADAPTER_INDEX
from ..onnx.slots import SLOT_DIM, slot_record
from ..runtime import inference_session
from .binding import SessionBinding
from .cache import CopyStats, KVBatch, to_value
from .detokenize import TextDecoder
from .pool import KVPool
from .prefix import DEFAULT_BLOCK, Block, PrefixCache
from .requests import Event, Request, Result
from .sampler import Sampler, sampling_problem
from .slots import AdapterSource, SlotTable
from .stops import StopStrings

PAST, PRESENT = "past_key_values", "present"
#: a prefill group's padded tokens stay within this factor of its real ones (else a new group)
PREFILL_PADDING = 1.15
#: prefix-cache hits ride the decode batch (their tails fed a token per step, see Engine._feed_hits) when at
#: least this many rows decode together: below it, a run of the tail alone costs less than the steps
#: (measured on the demo model: a 7-token tail costs 28 ms fp32 as its own run, ~2 ms a token in a
#: 32-row decode step, and a run alone is what one request waiting by itself should get)
FEED_MIN_ROWS = 16
#: model types whose graphs may take no ``position_ids`` and stay exact under left padding: ALiBi
#: from the mask's running count (BLOOM, Falcon with ``alibi``) or from key-column distances (MPT)
MASK_POSITIONS = frozenset({"bloom", "falcon", "mpt"})
#: config fields that hold a context length, in order, after ``max_position_embeddings`` (which the
#: config classes' attribute maps already alias, e.g. GPT-2's ``n_positions``)
CONTEXT_FIELDS = ("n_positions", "max_seq_len", "max_sequence_length", "seq_length", "n_ctx")
#: context assumed when the config names none (ALiBi models such as BLOOM have no position table)
DEFAULT_CONTEXT = 2048
Listener = Callable[[Event], None]


@dataclass(eq=False)  # identity: the engine finds and removes sequences by object
class _Sequence:
    """A request inside the engine: its prompt, decoding state and what it has produced."""

    request: Request
    prompt_ids: list[int]
    max_new: int
    sampler: Sampler
    stop_ids: frozenset[int]
    listener: Listener | None
    submitted: float
    slot: int = -1
    owner: int = 0  # its adapter as loaded (0: the base), the prefix cache's key
    row: int = -1  # its KV pool row, if the engine has a pool
    tokens: list[int] = field(default_factory=list)
    decoder: TextDecoder | None = None  # the tokens' text, a few at a time (None without a tokenizer, or once final)
    stops: StopStrings | None = None  # the request's stop strings, matched as the text grows
    text: str = ""  # decoded so far
    emitted: int = 0  # of which sent
    first_token: float | None = None
    logits: list[np.ndarray] = field(default_factory=list)
    finished: bool = False

    @property
    def final_length(self) -> int:
        """The most positions this row can ever cache."""
        return len(self.prompt_ids) + self.max_new

    def close_text(self) -> str:
        """The text the decoder still holds back (the last, incomplete character); it decodes no more."""
        rest = self.decoder.rest() if self.decoder is not None else ""
        self.decoder = None
        return rest


@dataclass(eq=False)
class _Prefill:
    """Joiners prefilled together: prompts left-padded to one width, run a chunk of columns per step,
    each chunk's presents the next one's past."""

    seqs: list[_Sequence]
    ids: np.ndarray  # (rows, width) int64, padded on the graph's side
    mask: np.ndarray  # (rows, width) int64, 1 real token
    right_padded: bool
    done: int = 0  # columns prefilled so far
    past: dict | None = None  # presents of the columns done
    row: int | None = None  # first of its KV pool rows, once taken
    prefix: list[Block] = field(default_factory=list)  # cached blocks restored into its row (one row)

    @classmethod
    def of(cls, seqs: list[_Sequence], right_padded: bool) -> _Prefill:
        width = max(len(s.prompt_ids) for s in seqs)
        ids = np.zeros((len(seqs), width), np.int64)
        mask = np.zeros((len(seqs), width), np.int64)
        for row, seq in enumerate(seqs):
            columns = slice(0, len(seq.prompt_ids)) if right_padded else slice(width - len(seq.prompt_ids), width)
            ids[row, columns] = seq.prompt_ids
            mask[row, columns] = 1
        return cls(seqs, ids, mask, right_padded)

    def last_columns(self, start: int) -> np.ndarray | None:
        """Where each row's first token's logits are in the chunk starting at ``start``, when right-padded:
        the row's last real column (None: the chunk's last column, every row's when left-padded)."""
        return self.mask.sum(axis=1) - 1 - start if self.right_padded else None

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    @property
    def remaining(self) -> int:
        """Tokens (padding included) its runs have still to feed."""
        return len(self.seqs) * (self.width - self.done)


def model_context(config) -> int:
    """The most positions a model takes: ``max_position_embeddings`` as its config class reads it
    (aliases included), else the first other context field, else :data:`DEFAULT_CONTEXT`."""
    for name in ("max_position_embeddings", *CONTEXT_FIELDS):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_CONTEXT


def _model_config(folder: Path):
    """The export's transformers config (its class maps aliased fields); one line when unreadable."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as err:
        raise PRoLoRAError(f"cannot read the model config: {_first_line(err)}", str(folder)) from None


def _shrink_options(device: str):
    """Run options that hand ONNX Runtime's arena memory back after the run: a prefill's last chunk,
    so what its activations took is returned rather than kept at its peak for the decode steps."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0" if device == "cpu" else "cpu:0;gpu:0")
    return options


def _fused_attention(model: Path) -> bool:
    """Whether the graph's attention is the model builder's ``GroupQueryAttention`` (rows right-padded,
    lengths from the mask); read without its weights, and only for graphs that take no positions."""
    import onnx

    from ..onnx.graph import is_builder_graph

    return is_builder_graph(onnx.load(str(model), load_external_data=False).graph)


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"


class Engine:
    """Generation with many PRoLoRA adapters in one batch, on an ``onnx --mode compact --slots`` export.

    ``adapters`` maps names to adapter folders, ``.onnx_adapter`` files or in-memory adapters;
    more can be loaded (and unloaded) while the engine runs. ``tokenizer``: ``"auto"`` loads the
    folder's tokenizer when it has one (text prompts, chat messages, stop strings need it); None
    for token ids only. ``provider``/``threads`` go to :func:`prolora_export.runtime.inference_session`.
    ``kv_pool``: run on a :class:`~.pool.KVPool` where the graph allows it (the model builder's graphs
    on the CPU); False keeps the batch cache (to compare the two). On a pool, prompts' blocks of
    ``prefix_block`` tokens are kept in a :class:`~.prefix.PrefixCache` of at most
    ``prefix_cache_tokens`` positions (0: none), per adapter. ``huge_pages``: rebuild the loaded weights as
    huge pages (:mod:`prolora_export.hugepages`: faster decode at small batches), by default in the background
    (``"wait"``: before the constructor returns; ``"off"``).
    """

    def __init__(
        self,
        onnx_dir: str | Path,
        adapters: Mapping[str, AdapterSource] | None = None,
        *,
        max_batch: int = 16,
        max_cached_tokens: int = 32768,
        max_prefill_tokens: int = 2048,
        provider: str = "cpu",
        threads: int | None = None,
        tokenizer="auto",
        kv_pool: bool = True,
        prefix_cache_tokens: int = 4096,
        prefix_block: int = DEFAULT_BLOCK,
        huge_pages: str = "background",
    ):
        if max_batch < 1 or max_cached_tokens < 1 or max_prefill_tokens < 1:
            raise PRoLoRAError("max_batch, max_cached_tokens and max_prefill_tokens must be ≥ 1")
        self.folder = Path(onnx_dir)
        if not (self.folder / "model.onnx").is_file():
            raise PRoLoRAError("not an adapter-slot ONNX export (no model.onnx); make one with `prolora-export onnx "
                               "--mode compact --slots`", str(self.folder))
        self.session = inference_session(self.folder, provider, threads=threads,
                                         huge_pages=huge_pages)
        record = slot_record(self.session)
        self.device = "cpu" if provider == "cpu" else "cuda"
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [name for name in inputs if name.startswith(PAST)]
        self.present_names = [PRESENT + name[len(PAST):] for name in self.past_names]
        outputs = {o.name for o in self.session.get_outputs()}
        if ADAPTER_INDEX not in inputs or not self.past_names or not set(self.present_names) <= outputs:
            raise PRoLoRAError("not a decoder slot graph with a KV cache (needs adapter_index and past_key_values)",
                               str(self.folder))
        past = inputs[self.past_names[0]]
        self.kv_dtype = np.float16 if "float16" in past.type else np.float32
        self.has_positions = "position_ids" in inputs
        self.has_logits_start = takes_logits_start(self.session)
        config = _model_config(self.folder)
        text = config.get_text_config()
        dims = (past.shape[1], past.shape[3])  # heads, head_dim: the builder leaves them symbolic
        self.kv_shape = dims if all(isinstance(d, int) for d in dims) else kv_cache_shape(text)
        self.right_padded = not self.has_positions and _fused_attention(self.folder / "model.onnx")
        if not self.has_positions and not self.right_padded and config.model_type not in MASK_POSITIONS:
            raise PRoLoRAError(f"this {config.model_type} slot graph has no position_ids input, so it takes positions "
                               "from the cache length and rows batched after their own prefill would decode at "
                               "wrong positions; re-export it with this version of `prolora-export onnx --mode "
                               "compact --slots`, which adds position_ids", str(self.folder))
        shapes = {name: tuple(i.shape[1:]) for name, i in inputs.items() if i.shape and i.shape[0] == SLOT_DIM}
        self.slots = SlotTable(shapes, record, self.session, self.device)
        self.context = model_context(text)
        self.pool = None
        if kv_pool and self.right_padded and self.device == "cpu":
            row_length = min(self.context, max_cached_tokens // max_batch)
            if row_length < 2:
                raise PRoLoRAError(f"max_cached_tokens {max_cached_tokens} leaves rows of {row_length} positions for "
                                   f"max_batch {max_batch}; give at least 2 per row")
            self.pool = KVPool(self.past_names, max_batch, row_length, *self.kv_shape, self.kv_dtype)
        if prefix_cache_tokens < 0 or prefix_block < 1:
            raise PRoLoRAError("prefix_cache_tokens must be ≥ 0 and prefix_block ≥ 1")
        self.prefix = (PrefixCache(prefix_block, prefix_cache_tokens)
                       if self.pool is not None and prefix_cache_tokens >= prefix_block else None)
        self._owners: dict[str, int] = {}  # adapter name -> the number of its load (prefix cache owner)
        self._owner_numbers = itertools.count(1)
        self.vocab_size = int(text.vocab_size)
        self.tokenizer = self._tokenizer(tokenizer)
        self.eos_ids = self._eos_ids(getattr(text, "eos_token_id", None))
        self.max_batch, self.max_cached_tokens = max_batch, max_cached_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.stats = CopyStats()
        self._lock = threading.RLock()  # held by a step, and by loads and unloads
        self._inbox_lock = threading.Lock()
        self._inbox: deque[tuple[Request, Listener | None, float]] = deque()
        self._cancels: set[str] = set()
        self._unloading: set[str] = set()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._joining: list[_Sequence] = []  # taken from the queue, not yet in a prefill group
        self._prefills: deque[_Prefill] = deque()  # taken from the queue, prefilled a chunk per step
        self._shrink = _shrink_options(self.device)
        self._binding = SessionBinding(self.session, self.slots, self.past_names, self.present_names, self.device)
        self._cache: KVBatch | None = None
        for name, source in (adapters or {}).items():
            self.load_adapter(name, source)

    # ------------------------------------------------------------------ setup helpers

    def _tokenizer(self, tokenizer):
        if tokenizer != "auto":
            return tokenizer
        if not any((self.folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.folder))

    def _eos_ids(self, config_eos) -> frozenset[int]:
        ids: set[int] = set()
        sources = [config_eos]
        generation = self.folder / "generation_config.json"
        if generation.is_file():
            sources.append(json.loads(generation.read_text()).get("eos_token_id"))
        if self.tokenizer is not None:
            sources.append(self.tokenizer.eos_token_id)
        for value in sources:
            ids.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
        return frozenset(ids)

    # ------------------------------------------------------------------ adapters

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters (those being unloaded excluded)."""
        return [name for name in self.slots.slot_of if name not in self._unloading]

    def load_adapter(self, name: str, source: AdapterSource, *, deadline: float | None = None) -> int:
        """Load an adapter into a free slot (waits for the step in progress); returns its slot.
        An adapter that does not fit the graph's slots is refused with a clear error; nothing changes.
        Its files are read before the lock is taken (slow or hung storage must not stop the steps);
        only the copy into the slot waits for the step. ``deadline`` (a :func:`time.monotonic` time):
        refuse it if it is ready only after that (a caller that stopped waiting said it was not loaded)."""
        arrays = self.slots.read(name, source)
        with self._lock:
            if deadline is not None and time.monotonic() > deadline:
                raise PRoLoRAError(f"adapter {name!r} was read too late (after its deadline); not loaded")
            self._finish_unloads()
            if name in self._unloading:
                raise PRoLoRAError(f"adapter {name!r} is being unloaded while rows still use it; load it "
                                   "under another name or wait for them")
            slot = self.slots.place(name, arrays)
            self._owners[name] = next(self._owner_numbers)
            return slot

    def unload_adapter(self, name: str) -> None:
        """Unload an adapter: new requests for it are refused at once; rows running with it finish
        first, then its slot is zeroed and freed."""
        with self._lock:
            if name not in self.slots.slot_of or name in self._unloading:
                raise PRoLoRAError(f"no adapter named {name!r} is loaded")
            self._unloading.add(name)
            self._finish_unloads()

    def _finish_unloads(self) -> None:
        """Free the slots of unloaded adapters that no running or prefilling row reads any more (and
        forget their cached prefixes)."""
        prefilling = [s for group in self._prefills for s in group.seqs if not s.finished]
        busy = {s.request.adapter for s in [*self._running, *prefilling, *self._joining]}
        for name in sorted(self._unloading - busy):
            self.slots.unload(name)
            self._unloading.discard(name)
            owner = self._owners.pop(name)
            if self.prefix is not None:
                self.prefix.drop(owner)

    # ------------------------------------------------------------------ requests

    def submit(self, request: Request, listener: Listener | None = None) -> str:
        """Queue a request (any thread); it is checked and scheduled at the next step. ``listener`` is
        called with each of its events, on the stepping thread. Returns the request id."""
        with self._inbox_lock:
            self._inbox.append((request, listener, time.perf_counter()))
        return request.request_id

    def cancel(self, request_id: str) -> None:
        """Stop a request at the next step (finish reason ``cancelled``); unknown ids are ignored."""
        with self._inbox_lock:
            self._cancels.add(request_id)

    @property
    def pending(self) -> int:
        """Requests submitted, queued, being prefilled or running."""
        prefilling = sum(not s.finished for group in self._prefills for s in group.seqs)
        return len(self._inbox) + len(self._waiting) + prefilling + len(self._running)

    def generate(self, requests: Iterable[Request]) -> list[Result]:
        """Run requests to the end (sharing the batch with anything else submitted); results in order."""
        requests = list(requests)
        results: dict[str, Result] = {}
        for request in requests:
            self.submit(request, lambda e: results.__setitem__(e.request_id, e.result) if e.finished else None)
        while len(results) < len(requests):
            self.step()
        return [results[r.request_id] for r in requests]

    def stream(self, request: Request) -> Iterator[Event]:
        """The events of one request as they come, stepping the engine (single-threaded use; with a
        background runner use :meth:`EngineRunner.stream` instead)."""
        events: deque[Event] = deque()
        self.submit(request, events.append)
        while True:
            self.step()
            while events:
                event = events.popleft()
                yield event
                if event.finished:
                    return

    def fail_all(self, message: str) -> list[Event]:
        """Finish every submitted, queued, prefilling and running request with ``message`` as its error
        and drop the batch (what a runner does when a step fails outside its graph runs)."""
        with self._lock:
            events: list[Event] = []
            with self._inbox_lock:
                submitted, self._inbox = list(self._inbox), deque()
            prefilling = [s for group in self._prefills for s in group.seqs] + self._joining
            seqs = [*self._running, *(s for s in prefilling if s not in self._running and not s.finished),
                    *self._waiting]
            seqs += [_Sequence(r, [], 0, Sampler(), frozenset(), listener, t) for r, listener, t in submitted]
            self._running, self._joining, self._prefills, self._waiting = [], [], deque(), deque()
            self._cache = None
            if self.pool is not None:
                self.pool.clear()
            for seq in seqs:
                self._finish(seq, "error", events, error=message)
            self._finish_unloads()
            return events

    # ------------------------------------------------------------------ the step

    def step(self) -> list[Event]:
        """One scheduling step (see the module docstring); returns every event it produced."""
        with self._lock:
            events: list[Event] = []
            with self._inbox_lock:
                submitted, self._inbox = list(self._inbox), deque()
                cancels, self._cancels = self._cancels, set()
            for request, listener, submitted_at in submitted:
                self._check_in(request, listener, submitted_at, events)
            if cancels:
                self._cancel(cancels, events)
            before = self._moved()
            decoded = bool(self._running)
            keep = self._decode(events) if decoded else []  # cache rows still running after this token
            joined = self._prefill(events)
            self._rebuild(keep, joined)
            if decoded:
                copied = self._moved() - before
                self.stats.step_copied += copied
                self.stats.step_copied_max = max(self.stats.step_copied_max, copied)
            if self._unloading:
                self._finish_unloads()
            return events

    def _check_in(self, request: Request, listener: Listener | None, submitted: float, events: list[Event]) -> None:
        try:
            seq = self._sequence(request, listener, submitted)
        except Exception as err:  # a bad request (PRoLoRAError) or a failure checking it: that request only
            message = (str(err) if isinstance(err, PRoLoRAError)
                       else f"the request could not be checked: {_first_line(err)}")
            seq = _Sequence(request, [], 0, Sampler(), frozenset(), listener, submitted)
            self._finish(seq, "error", events, error=message)
            return
        self._waiting.append(seq)

    def _sequence(self, request: Request, listener: Listener | None, submitted: float) -> _Sequence:
        """A checked request; every problem is a PRoLoRAError naming it."""
        given = [x is not None for x in (request.prompt, request.messages, request.prompt_ids)]
        if sum(given) != 1:
            raise PRoLoRAError("give exactly one of prompt, messages or prompt_ids")
        problem = sampling_problem(request)
        if problem:
            raise PRoLoRAError(problem)
        if not isinstance(request.max_new_tokens, int) or request.max_new_tokens < 1:
            raise PRoLoRAError(f"max_new_tokens must be an integer ≥ 1, got {request.max_new_tokens!r}")
        if isinstance(request.stop, str) or not all(isinstance(s, str) for s in request.stop):
            raise PRoLoRAError("stop must be a list of strings (one stop string: [text])")
        if self.tokenizer is None and (request.prompt is not None or request.messages is not None or request.stop):
            raise PRoLoRAError("this engine has no tokenizer: give prompt_ids, and no stop strings")
        ids = self.prompt_ids(request)
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise PRoLoRAError(f"prompt token ids must be in [0, {self.vocab_size})")
        if request.adapter is not None and request.adapter not in self.adapters:
            raise PRoLoRAError(f"unknown adapter {request.adapter!r} (loaded: {', '.join(self.adapters) or 'none'})")
        max_new = min(request.max_new_tokens, self.context - len(ids))
        if self.pool is not None and len(ids) + max_new > self.pool.row_length:
            raise PRoLoRAError(f"needs {len(ids) + max_new} cached tokens; a row of this engine's KV pool holds "
                               f"{self.pool.row_length} (max_cached_tokens / max_batch)")
        if len(ids) + max_new > self.max_cached_tokens:
            raise PRoLoRAError(f"needs {len(ids) + max_new} cached tokens; this engine holds at most "
                               f"{self.max_cached_tokens}")
        stop_ids = frozenset(int(t) for t in request.stop_token_ids) | (frozenset() if request.ignore_eos
                                                                           else self.eos_ids)
        sampler = Sampler.for_request(request, ids, stop_ids)
        seq = _Sequence(request, ids, max_new, sampler, stop_ids, listener, submitted)
        if self.tokenizer is not None:
            seq.decoder = TextDecoder(self.tokenizer, seq.tokens)
            seq.stops = StopStrings(request.stop)
        return seq

    def prompt_ids(self, request: Request) -> list[int]:
        """The request's prompt as token ids: ``prompt_ids`` as given, ``prompt`` tokenized, ``messages``
        rendered with the chat template. Any thread may call it: a server tokenizes off the stepping
        thread (a long prompt would stall every row) and submits the ids."""
        if request.prompt_ids is not None:
            ids = [int(t) for t in request.prompt_ids]
        elif self.tokenizer is None:
            raise PRoLoRAError("this engine has no tokenizer: give prompt_ids")
        elif request.messages is not None:
            if not request.messages:
                raise PRoLoRAError("empty prompt: no chat messages")
            try:  # ids, not transformers 5's default BatchEncoding
                ids = [int(t) for t in self.tokenizer.apply_chat_template(
                    list(request.messages), add_generation_prompt=True, tokenize=True, return_dict=False)]
            except Exception as err:  # jinja and tokenizer errors of a malformed message
                raise PRoLoRAError(f"chat messages could not be rendered with the chat template ({err})") from None
        else:
            ids = list(self.tokenizer(request.prompt).input_ids) if request.prompt else []
        if not ids:
            raise PRoLoRAError("empty prompt")
        if len(ids) >= self.context:
            raise PRoLoRAError(f"prompt of {len(ids)} tokens does not fit the model's context of {self.context}")
        return ids

    def _cancel(self, ids: set[str], events: list[Event]) -> None:
        for seq in [s for s in self._waiting if s.request.request_id in ids]:
            self._waiting.remove(seq)
            self._finish(seq, "cancelled", events)
        for seq in [s for group in self._prefills for s in group.seqs if s.request.request_id in ids]:
            if not seq.finished:  # its row is dropped when its group's prefill ends
                self._finish(seq, "cancelled", events)
        for group in [g for g in self._prefills if all(s.finished for s in g.seqs)]:
            self._prefills.remove(group)
            self._free_rows(group.seqs)
        rows = {i for i, s in enumerate(self._running) if s.request.request_id in ids}
        for i in sorted(rows):
            self._finish(self._running[i], "cancelled", events)
        if rows:
            keep = [i for i in range(len(self._running)) if i not in rows]
            self._free_rows([s for i, s in enumerate(self._running) if i in rows])
            self._running = [self._running[i] for i in keep]
            self._rebuild(keep, None)

    def _pick_joiners(self, events: list[Event]) -> None:
        """Move the queued requests that fit now to ``_joining``, in order (FIFO: the first that does
        not fit waits, and so do the ones behind it)."""
        joiners = self._joining
        longest = max((s.final_length for s in self._running), default=0)
        while self._waiting and len(self._running) + len(joiners) < self.max_batch:
            seq = self._waiting[0]
            if seq.request.adapter is not None and seq.request.adapter not in self.adapters:
                self._waiting.popleft()
                self._finish(seq, "error", events, error=f"adapter {seq.request.adapter!r} was unloaded")
                continue
            rows = len(self._running) + len(joiners) + 1
            if self.pool is None and rows * max(longest, seq.final_length) > self.max_cached_tokens:
                break
            longest = max(longest, seq.final_length)
            seq.slot = -1 if seq.request.adapter is None else self.slots.slot_of[seq.request.adapter]
            seq.owner = 0 if seq.request.adapter is None else self._owners[seq.request.adapter]
            joiners.append(self._waiting.popleft())

    # ------------------------------------------------------------------ running the graph

    def _run(self, feeds: dict[str, np.ndarray], past: dict, options=None,
             columns: np.ndarray | None = None, *, in_place: bool = False,
             into_buffer: bool = False) -> tuple[np.ndarray, dict]:
        """One run (:class:`~.binding.SessionBinding`: small inputs from the host, cache and slots as OrtValues,
        presents left where the graph wrote them; ``in_place``: into the past OrtValues themselves, a pool's
        rows); returns the logits (host) at each row's column in ``columns`` (default: the last) and the
        presents. ``into_buffer``: a pool decode's logits, a view valid until the next such run."""
        if self.has_logits_start:  # bound every run: a binding keeps its inputs, a prefill's start included
            feeds = {LOGITS_START: np.zeros(1, np.int64), **feeds}
        self.stats.host_to_graph += sum(array.nbytes for array in feeds.values())
        logits, presents = self._binding.run(feeds, past, options, in_place=in_place, into_buffer=into_buffer)
        self.stats.logit_positions += logits.shape[0] * logits.shape[1]
        logits = logits[:, -1] if columns is None else logits[np.arange(len(columns)), columns]
        if self.device != "cpu":
            self.stats.graph_to_host += logits.nbytes
        if in_place:
            self.stats.graph_kv_written += feeds["input_ids"].size * self.pool.token_bytes
            return logits, past
        self.stats.graph_kv_written += sum(v.tensor_size_in_bytes() for v in presents)
        return logits, dict(zip(self.past_names, presents, strict=True))

    def _decode(self, events: list[Event]) -> list[int]:
        """One token for every running row; finished rows leave ``_running`` at once and the cache
        rows to keep are returned (a batch cache is rebuilt once per step, with the joiners; a pool's
        rows are freed). A failed run finishes every running row with its error (the prefilling and
        queued ones go on)."""
        rows = self._running
        try:
            logits, order = self._decode_pool(rows) if self.pool is not None else self._decode_batch(rows)
        except Exception as err:  # any failure of the run fails its rows, and only them
            self._fail(rows, err, events)
            self._free_rows(rows)
            self._running = []
            return []
        self.stats.steps += 1
        keep = [i for i, seq in enumerate(rows) if not self._sample(seq, logits[order[i]], events)]
        self._free_rows([seq for seq in rows if seq.finished])
        self._running = [rows[i] for i in keep]
        return keep

    def _sample(self, seq: _Sequence, logits: np.ndarray, events: list[Event]) -> bool:
        """After a decode run: a row still being fed its prompt samples nothing; one whose prompt the run
        completed caches its prefix and samples its first token; True when the request has finished."""
        if seq.row >= 0 and self.pool is not None:
            written = int(self.pool.lengths[seq.row])
            if written < len(seq.prompt_ids):
                return False
            if written == len(seq.prompt_ids) and self.prefix is not None:
                self.prefix.insert(seq.owner, seq.prompt_ids, self.pool, seq.row)
        return self._next(seq, logits, events)

    def _decode_batch(self, rows: list[_Sequence]) -> tuple[np.ndarray, range]:
        """A decode run of the batch cache (its rows in ``_running`` order); the graph's presents become it.
        Returns the logits and each running row's row of them (as :meth:`_decode_pool`)."""
        cache = self._cache
        feeds = {
            "input_ids": np.array([[s.tokens[-1]] for s in rows], np.int64),
            "attention_mask": cache.next_mask(),
            ADAPTER_INDEX: np.array([s.slot for s in rows], np.int64),
        }
        if self.has_positions:
            feeds["position_ids"] = cache.positions()
        logits, presents = self._run(feeds, cache.values)
        cache.advance(presents)
        return logits, range(len(rows))

    def _decode_pool(self, rows: list[_Sequence]) -> tuple[np.ndarray, list[int]]:
        """A decode run of pool rows ``[0, high)`` in place, each at its own length (see :mod:`.pool`:
        rows not decoding get a junk position nobody reads). Returns the logits (a view of the binding's
        buffer, read before the next decode: no copy, which cost a fresh 6 MB array at 32 rows) and each
        running row's row of them."""
        pool = self.pool
        high = pool.high
        where = np.array([s.row for s in rows], np.int64)
        ids = np.zeros((high, 1), np.int64)
        # the token at each row's length: its last sampled one, or the next of a prompt being fed
        ids[where, 0] = [s.prompt_ids[n] if n < len(s.prompt_ids) else s.tokens[-1]
                         for s, n in zip(rows, pool.lengths[where].tolist(), strict=True)]
        index = np.full(high, -1, np.int64)
        index[where] = [s.slot for s in rows]
        feeds = {"input_ids": ids, "attention_mask": pool.decode_mask(high), ADAPTER_INDEX: index}
        logits, _ = self._run(feeds, pool.view(0, high), in_place=True, into_buffer=True)
        pool.lengths[where] += 1
        return logits, where.tolist()

    def _free_rows(self, seqs: Iterable[_Sequence]) -> None:
        """Give the pool rows of requests that no longer run back (no-op without a pool)."""
        if self.pool is None:
            return
        for seq in seqs:
            if seq.row >= 0:
                self.pool.free(seq.row)
                seq.row = -1

    def _groups(self, joiners: list[_Sequence], cached: dict[_Sequence, list[Block]]) -> list[_Prefill]:
        """The joiners in prefill groups of similar prompt length (padding wastes compute), shortest
        first (their first tokens come soonest); a group of several rows fits one run, and a group of
        one may take several chunks. A prompt with a cached prefix (``cached``: its blocks) goes first,
        alone, from its end."""
        groups: list[list[_Sequence]] = []
        hits: list[_Prefill] = []
        cold: list[_Sequence] = []
        for seq in joiners:
            blocks = cached.get(seq)
            if not blocks:
                cold.append(seq)
                continue
            hit = _Prefill.of([seq], True)  # prefilled alone, from the end of its cached prefix
            hit.prefix, hit.done = blocks, len(blocks) * self.prefix.block
            hits.append(hit)
        for seq in sorted(cold, key=lambda s: len(s.prompt_ids)):
            group = groups[-1] if groups else None
            padded = (len(group) + 1) * len(seq.prompt_ids) if group else 0
            real = sum(len(s.prompt_ids) for s in group or []) + len(seq.prompt_ids)
            if group and padded <= self.max_prefill_tokens and padded <= PREFILL_PADDING * real:
                group.append(seq)
            else:
                groups.append([seq])
        return hits + [_Prefill.of(group, self.right_padded) for group in groups]

    def _queue_prefills(self, events: list[Event]) -> None:
        """When no prefill is under way, the queued requests that fit now become prefill groups (or,
        short tails of cached prefixes in a busy batch, rows fed through the decode steps)."""
        if not self._prefills:
            self._pick_joiners(events)
            cached = ({seq: self.prefix.match(seq.owner, seq.prompt_ids) for seq in self._joining}
                      if self.prefix is not None else {})
            self._prefills.extend(self._groups(self._feed_hits(self._joining, cached), cached))
            self._joining = []

    def _feed_hits(self, joiners: list[_Sequence], cached: dict[_Sequence, list[Block]]) -> list[_Sequence]:
        """Joiners whose prompts hit the prefix cache with a tail shorter than a block join the running
        rows at once when at least :data:`FEED_MIN_ROWS` rows will decode together: their cached blocks
        are restored into a pool row and the decode steps feed the tail a token per step (ONNX Runtime's
        CPU attention prefills a tail over a past one row per run, so a burst of such prompts would cost
        a run each, every one streaming all the weights for a few tokens). ``cached``: each joiner's cached
        blocks. Returns the other joiners."""
        if self.prefix is None:
            return joiners
        hits = {seq: blocks for seq, blocks in cached.items()
                if blocks and len(seq.prompt_ids) - len(blocks) * self.prefix.block < self.prefix.block}
        if len(self._running) + len(hits) < FEED_MIN_ROWS:
            return joiners
        rest = []
        for seq in joiners:
            row = self.pool.allocate(1) if seq in hits else None
            if row is None:
                rest.append(seq)
                continue
            seq.row = row
            self.pool.lengths[row] = self.prefix.restore(hits[seq], self.pool, row)
            self._running.append(seq)
        return rest

    def _prefill(self, events: list[Event]) -> tuple[KVBatch, list[int]] | None:
        """A step's prefill: at most ``max_prefill_tokens`` new tokens, so that no running row waits
        longer than one chunk. A batch cache takes one run (its joiners are rebuilt into it once per
        step). On a pool, whole prompts that fit what is left of the budget follow in further runs:
        prompts prefilled alone (prefix-cache hits, rows apart) would otherwise join one per step, and
        the running rows would decode that many steps at a fraction of the batch."""
        self._queue_prefills(events)
        if not self._prefills:
            return None
        joined, budget = self._prefill_chunk(events, self.max_prefill_tokens)
        while self.pool is not None:
            self._queue_prefills(events)
            if not self._prefills or self._prefills[0].remaining > budget:
                break
            budget = self._prefill_chunk(events, budget)[1]
        return joined

    def _prefill_chunk(self, events: list[Event], budget: int) -> tuple[tuple[KVBatch, list[int]] | None, int]:
        """One run of the first prefill group: its next columns, at most ``budget`` tokens in all, the
        columns done fed as past; returns what joins the batch cache and the budget left. When the
        prompts are done, each row samples its first token and the group's cache with the rows that go
        on running joins (a pool's rows are in place: nothing). A failed run finishes the group's rows
        with its error."""
        group = self._take_rows() if self.pool is not None else self._prefills[0]
        rows = len(group.seqs)
        start = group.done
        stop = min(group.width, start + max(1, budget // rows))
        left = budget - rows * (stop - start)
        feeds = {"input_ids": group.ids[:, start:stop], "attention_mask": group.mask[:, :stop],
                 ADAPTER_INDEX: np.array([s.slot for s in group.seqs], np.int64)}
        if self.has_positions:
            feeds["position_ids"] = np.maximum(np.cumsum(group.mask, axis=1) - 1, 0)[:, start:stop]
        if group.past is None:
            heads, head_dim = self.kv_shape
            empty = np.zeros((rows, heads, 0, head_dim), self.kv_dtype)
            group.past = {name: to_value(empty, self.device) for name in self.past_names}
        last = stop == group.width
        columns = group.last_columns(start) if last else None
        if self.has_logits_start:  # the LM head runs on the columns read (the chunk's last one before the last chunk)
            first = stop - start - 1 if columns is None else int(columns.min())
            feeds[LOGITS_START] = np.array([first], np.int64)
            columns = None if columns is None else columns - first
        try:
            logits, group.past = self._run(feeds, group.past, self._shrink if last else None, columns,
                                           in_place=self.pool is not None)
        except Exception as err:  # any failure of the run fails its rows, and only them
            self._prefills.popleft()
            self._fail([s for s in group.seqs if not s.finished], err, events)
            self._free_rows(group.seqs)
            return None, left
        group.done = stop
        if self.pool is not None:
            self.pool.lengths[group.row:group.row + rows] = group.mask[:, :stop].sum(axis=1)
        self.stats.prefill_runs += 1
        if stop < group.width:
            return None, left
        if self.prefix is not None:
            for offset, seq in enumerate(group.seqs):
                self.prefix.insert(seq.owner, seq.prompt_ids, self.pool, group.row + offset)
        self._prefills.popleft()
        self.stats.prefills += 1
        alive = [row for row, seq in enumerate(group.seqs)
                 if not seq.finished and not self._next(seq, logits[row], events)]
        self._free_rows([seq for seq in group.seqs if seq.finished])
        self._running.extend(group.seqs[row] for row in alive)
        if self.pool is not None or not alive:
            return None, left
        return (KVBatch(self.past_names, group.past, group.mask, self.stats, self.device,
                        right_padded=self.right_padded), alive), left

    def _take_rows(self) -> _Prefill:
        """The first prefill group, with its pool rows: on its first chunk it takes contiguous rows (one
        run binds them as one view); when free rows are not contiguous, it is split into groups of one
        (there is always a free row for each: the group was admitted under ``max_batch``)."""
        group = self._prefills[0]
        if group.row is None:
            start = self.pool.allocate(len(group.seqs))
            if start is None:
                self._prefills.popleft()
                self._prefills.extendleft(reversed([_Prefill.of([s], True) for s in group.seqs]))
                group = self._prefills[0]
                start = self.pool.allocate(1)
            group.row = start
            group.past = self.pool.view(start, start + len(group.seqs))
            if group.prefix:
                self.pool.lengths[start] = self.prefix.restore(group.prefix, self.pool, start)
            for offset, seq in enumerate(group.seqs):
                seq.row = start + offset
        return group

    def _fail(self, seqs: list[_Sequence], err: Exception, events: list[Event]) -> None:
        """Finish the rows of a failed run with its error."""
        for seq in seqs:
            self._finish(seq, "error", events, error=f"engine run failed: {_first_line(err)}")

    def _rebuild(self, keep: list[int], joined: tuple[KVBatch, list[int]] | None) -> None:
        """The batch's cache after rows left (``keep``: cache rows still running) and a group joined,
        in one copy; nothing is copied when nobody left or joined, or a whole group starts a batch."""
        if self.pool is not None:
            return  # rows stay where they are
        parts: list[tuple[KVBatch, list[int] | None]] = []
        if self._cache is not None and keep:
            parts.append((self._cache, None if len(keep) == self._cache.rows else keep))
        if joined is not None:
            batch, alive = joined
            parts.append((batch, None if len(alive) == batch.rows else alive))
        if not parts:
            self._cache = None
        elif len(parts) == 1 and parts[0][1] is None:
            self._cache = parts[0][0]
        else:
            self._cache = KVBatch.combine(parts)

    def _moved(self) -> int:
        s = self.stats
        return s.host_to_graph + s.graph_to_host + s.cache_moved

    # ------------------------------------------------------------------ tokens to events

    def _next(self, seq: _Sequence, logits: np.ndarray, events: list[Event]) -> bool:
        """:meth:`_emit`, a failure of which (its sampler, its stop rules) finishes that row only."""
        try:
            return self._emit(seq, logits, events)
        except Exception as err:  # one row's failure must not stop the others
            if not seq.finished:
                self._finish(seq, "error", events, error=f"choosing the next token failed: {_first_line(err)}")
            return True

    def _emit(self, seq: _Sequence, logits: np.ndarray, events: list[Event]) -> bool:
        """Choose the row's next token and report it; True when the request has finished."""
        if seq.first_token is None:
            seq.first_token = time.perf_counter()
        if seq.request.return_logits:
            seq.logits.append(np.array(logits, np.float32))
        token = seq.sampler(logits)
        if token in seq.stop_ids:
            self._finish(seq, "stop", events)
            return True
        seq.tokens.append(token)
        reason = "length" if len(seq.tokens) >= seq.max_new else None
        delta = ""
        if seq.decoder is not None:
            new = seq.decoder.update() + (seq.close_text() if reason else "")
            cut = seq.stops.feed(new)
            full = seq.text + new
            if cut is not None:
                full, reason = full[:cut], "stop"
                seq.decoder = None  # what it holds back comes after the stop string
            seq.text = full
            # not what could still begin a stop string (it is sent once more text decides)
            safe = len(full) if reason else max(len(full) - seq.stops.held(), seq.emitted)
            if safe > seq.emitted:
                delta, seq.emitted = full[seq.emitted:safe], safe
        if reason:
            self._finish(seq, reason, events, text=delta, token=token)
            return True
        self._event(seq, Event(seq.request.request_id, delta, token), events)
        return False

    def _finish(self, seq: _Sequence, reason: str, events: list[Event], *, text: str = "", token: int | None = None,
                error: str | None = None) -> None:
        seq.finished = True
        seq.text += seq.close_text()
        if not text and seq.emitted < len(seq.text) and reason != "error":
            text = seq.text[seq.emitted:]  # anything held back is final now
        now = time.perf_counter()
        result = Result(
            seq.request.request_id, seq.text, list(seq.tokens), reason, len(seq.prompt_ids), error,
            None if seq.first_token is None else seq.first_token - seq.submitted, now - seq.submitted,
            np.stack(seq.logits) if seq.logits else None,
        )
        if not any(seq in group.seqs for group in self._prefills):  # a prefilling group's rows go when it ends
            self._free_rows([seq])  # before anyone hears it finished: its row is free by then
        self._event(seq, Event(seq.request.request_id, text, token, reason, error, result), events)

    @staticmethod
    def _event(seq: _Sequence, event: Event, events: list[Event]) -> None:
        events.append(event)
        if seq.listener is not None:
            seq.listener(event)
