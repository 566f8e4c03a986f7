"""Reference PRoLoRA checkpoints (the paper's own code, SPEC §3) read exactly as that code writes them.

Folders come from :mod:`reference_layouts` (its save path, step by step); the expected numbers
from its forward pass re-implemented in float64 there, never from ``prolora_export``.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_layouts import (
    PREFIX,
    ReferenceCrash,
    RefRun,
    expanded_state,
    linear_sizes,
    reference_logits,
    trained_state,
    write_checkpoint,
    write_final,
)
from safetensors import safe_open

from prolora_export.cli import main as cli_main
from prolora_export.convert import convert
from prolora_export.errors import PRoLoRAError
from prolora_export.formats.detect import read_adapter
from prolora_export.formats.peft_lora import LoraFactors
from prolora_export.formats.prolora import load_adapter
from prolora_export.formats.reference import ReadOptions, read_expanded
from prolora_export.inject import inject_adapter, load_adapter_weights
from prolora_export.merge import merge_adapters

TOKENS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]])
SIZES = linear_sizes(tiny_llama())  # 72 hidden, 24 k/v, 100 MLP: most rates leave a cut last chunk
#: (r, u, m, n) settings, named; u ∈ {0, 1, r}, m = 1 (stride written as r_s), u = r (stride written as 1)
RUNS = {
    "u1-m2-n2": RefRun(6, 1, 2, 2),
    "u1-m4-n4": RefRun(5, 1, 4, 4),
    "u0-m3-n5-overwide": RefRun(4, 0, 3, 5),
    "u0-m1-n2-stride-rs": RefRun(8, 0, 1, 2),
    "u0-m5-n3-odd-r": RefRun(3, 0, 5, 3),
    "u=r": RefRun(4, 4, 2, 2),
}
#: u > 0 with a cut last chunk: the reference's save_chunk_lora crashes, only checkpoints exist
CHECKPOINT_ONLY = {"u2-m3-n5": RefRun(6, 2, 3, 5), "u1-m7-n6": RefRun(4, 1, 7, 6)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def ours_logits(adapter) -> torch.Tensor:
    model = tiny_llama()
    inject_adapter(model, adapter.config)
    load_adapter_weights(model, adapter.tensors)
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def merged_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "tiny-llama"
    tiny_llama().save_pretrained(out, safe_serialization=True)
    return out


# ----------------------------------------------------------------------------- the fixtures themselves
@pytest.mark.parametrize("name", list(RUNS))
def test_fixtures_are_laid_out_as_the_reference_writes_them(tmp_path: Path, name: str) -> None:
    run = RUNS[name]
    state = trained_state(SIZES, run)
    folder = write_final(tmp_path / "final", state, run)
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "adapter_model.bin", "adapter_model.safetensors", "completed"
    ]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == run.r
    assert not {"unshared_r", "reduce_lora_A_x", "enable_lora_rotation", "lora_A_shift_size"} & set(config)
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
    path = "model.layers.0.mlp.down_proj"  # 100 → 72
    assert shapes[f"{PREFIX}{path}.lora_A.weight"] == [run.shared_r, math.ceil(100 / run.m)]
    assert shapes[f"{PREFIX}{path}.lora_B.weight"] == [math.ceil(72 / run.n), run.shared_r]
    assert shapes[f"{PREFIX}{path}.lora_A_vec"] == [run.u, 100]  # zero-size when u = 0
    assert shapes[f"{PREFIX}{path}.lora_B_vec"] == [run.u, 72]
    expanded = torch.load(folder / "adapter_model.bin", weights_only=True)
    assert list(expanded) == [k for k in state if k.endswith((".lora_A.weight", ".lora_B.weight"))]
    a, b = expanded[f"{PREFIX}{path}.lora_A.weight"], expanded[f"{PREFIX}{path}.lora_B.weight"]
    wide_a, wide_b = run.m * math.ceil(100 / run.m), run.n * math.ceil(72 / run.n)
    if run.u == 0:  # cut at min(m·c, 11008 / 4096): wider than the layer when the last chunk is cut
        assert a.shape == (run.r, wide_a) and b.shape == (wide_b, run.r)
        # saved as the expansion's views: A the (r_s × m·c) buffer itself, B its transpose
        assert a.stride() == (wide_a, 1) and b.stride() == (1, wide_b)
    elif run.shared_r:  # the unshared part concatenated: new (d × r) buffers, A saved transposed
        assert a.shape == (run.r, 100) and b.shape == (72, run.r)
        assert a.stride() == (1, run.r) and b.is_contiguous()
    else:  # u = r: the vectors themselves, A transposed twice
        assert a.shape == (run.r, 100) and b.shape == (72, run.r) and a.is_contiguous() and b.stride() == (1, 72)
    assert run.shift_a == max(run.shared_r // run.m, 1)


@pytest.mark.parametrize("name", list(CHECKPOINT_ONLY))
def test_the_reference_save_crashes_where_u_and_cut_chunks_meet(tmp_path: Path, name: str) -> None:
    run = CHECKPOINT_ONLY[name]
    with pytest.raises(ReferenceCrash):
        write_final(tmp_path / "final", trained_state(SIZES, run), run)


# ----------------------------------------------------------------------------- done when: same numbers
def _layouts(run: RefRun) -> list[str]:
    """checkpoint-N/ (safetensors, or .bin before transformers 4.35); the final folder with both files (read
    as is, or with the pickle allowed and compared) or, before 4.35, with only the expanded .bin."""
    try:
        expanded_state(trained_state(SIZES, run), run)
    except ReferenceCrash:  # the reference crashes before writing a final folder
        return ["checkpoint", "checkpoint-bin"]
    return ["checkpoint", "checkpoint-bin", "final", "final+pickle", "final-bin-only"]


CASES = [(name, layout) for name, run in {**RUNS, **CHECKPOINT_ONLY}.items() for layout in _layouts(run)]


def _folder(tmp_path: Path, run: RefRun, layout: str) -> tuple[Path, dict]:
    state = trained_state(SIZES, run, seed=3)
    if layout.startswith("checkpoint"):
        return write_checkpoint(tmp_path / "checkpoint-10", state, run, safetensors=layout == "checkpoint"), state
    folder = write_final(tmp_path / "final", state, run)
    if layout == "final-bin-only":  # transformers < 4.35: the Trainer wrote a .bin, then it was overwritten
        (folder / "adapter_model.safetensors").unlink()
    return folder, state


@pytest.mark.parametrize(("name", "layout"), CASES, ids=[f"{n}-{layout}" for n, layout in CASES])
def test_reference_folder_converts_and_merges_to_the_reference_numbers(
    tmp_path: Path, base_dir: Path, name: str, layout: str
) -> None:
    run = {**RUNS, **CHECKPOINT_ONLY}[name]
    folder, state = _folder(tmp_path, run, layout)
    expected = reference_logits(tiny_llama, state, run, TOKENS)
    base_logits = reference_logits(tiny_llama, {}, run, TOKENS)
    assert rel_err(base_logits, expected) > 1e-4  # the adapter changes the outputs
    # only what the files cannot say: pickle consent, and the layer sizes of a lone expanded u = 0 .bin
    options = ReadOptions(allow_pickle=layout in ("final+pickle", "final-bin-only", "checkpoint-bin"))
    base = str(base_dir) if layout == "final-bin-only" and run.u == 0 else None
    plain = run.u == run.r or (run.m == 1 and run.n == 1)
    if plain and layout == "final-bin-only":  # full LoRA factors: nothing to compact, merge reads them as is
        with pytest.raises(PRoLoRAError, match="no chunk structure"):
            convert(folder, "prolora", tmp_path / "ours", options=options, base=base)
    else:
        result = convert(folder, "prolora", tmp_path / "ours", options=options, base=base)
        got = result.inference.values
        assert (got["r"], got["unshared_r"]) == (run.r, run.u)
        if run.shared_r:
            assert (got["sharing_rate_a"], got["sharing_rate_b"]) == (run.m, run.n)
            assert (got["stride_a"], got["stride_b"]) == (run.shift_a % run.shared_r, run.shift_b % run.shared_r)
        assert rel_err(ours_logits(load_adapter(tmp_path / "ours")), expected) <= 1e-5
    merge_adapters(base_dir, [(folder, 1.0)], tmp_path / "merged", progress=False, read_options=options)
    assert rel_err(merged_logits(tmp_path / "merged"), expected) <= 1e-5


def test_rotation_off_disagrees_between_files_until_stated(tmp_path: Path) -> None:
    """The CLoRA ablation (rotation off): the training layout alone reads as rotated (the reference's
    default); with the pickle allowed the two files disagree, which --prefer or --no-rotate settles."""
    run = RefRun(5, 0, 3, 2, rotate=False)
    state = trained_state(SIZES, run)
    folder = write_final(tmp_path / "final", state, run)
    expected = reference_logits(tiny_llama, state, run, TOKENS)
    with pytest.raises(PRoLoRAError, match=r"disagree.*--prefer bin or --prefer safetensors"):
        read_adapter(folder, ReadOptions(allow_pickle=True))
    chosen = read_adapter(folder, ReadOptions(allow_pickle=True, prefer="bin"), sizes=SIZES)
    assert chosen.inference.values["rotate"] is False and chosen.inference.sources["rotate"] == "inferred"
    assert rel_err(ours_logits(chosen.adapter), expected) <= 1e-5
    stated = read_adapter(folder, ReadOptions(allow_pickle=True, rotate=False))
    assert any("agree bitwise" in n for n in stated.inference.notes)
    assert rel_err(ours_logits(stated.adapter), expected) <= 1e-5


# ----------------------------------------------------------------------------- options are verified
def test_stated_values_are_checked_and_reported_as_options(tmp_path: Path) -> None:
    run = RefRun(8, 0, 1, 2)  # m = 1: the reference writes stride_a = r_s = 8, meaningful only mod r_s
    folder = write_final(tmp_path / "final", trained_state(SIZES, run), run)
    (folder / "adapter_model.safetensors").unlink()
    pickle_ok = dict(allow_pickle=True)
    good = read_adapter(folder, ReadOptions(**pickle_ok, sharing_rate_b=2, stride_a=8, stride_b=4), sizes=SIZES)
    assert good.inference.sources["sharing_rate_b"] == "option" and good.inference.sources["stride_a"] == "option"
    assert good.inference.sources["unshared_r"] == "inferred"
    for stated, message in (
        (dict(sharing_rate_b=3), "--sharing-rate-b 3 contradicts the tensors"),
        (dict(stride_b=1), "--stride-b 1 contradicts the tensors"),
        (dict(rotate=False), "--rotate false contradicts the tensors"),
        (dict(r=6), "--r 6 contradicts the tensors"),
        (dict(unshared_r=1), "--unshared-r 1 contradicts the tensors"),
    ):
        with pytest.raises(PRoLoRAError, match=message):
            read_adapter(folder, ReadOptions(**pickle_ok, **stated), sizes=SIZES)
    checkpoint = write_checkpoint(tmp_path / "checkpoint-1", trained_state(SIZES, run), run)
    with pytest.raises(PRoLoRAError, match=r"--sharing-rate-a 2 contradicts.*sharing_rate_a ∈ \{1\}"):
        read_adapter(checkpoint, ReadOptions(sharing_rate_a=2))


def test_over_wide_tensors_need_the_sizes_and_are_cut_after_checking_the_tail(tmp_path: Path, base_dir) -> None:
    run = RefRun(4, 0, 3, 5)  # 72 → 3·24 = 72 but 100 → 3·34 = 102, 24 → 5·5 = 25: wider than the layers
    folder = write_final(tmp_path / "final", trained_state(SIZES, run), run)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(PRoLoRAError, match="pass --base MODEL"):
        read_adapter(folder, ReadOptions(allow_pickle=True))
    result = read_adapter(folder, ReadOptions(allow_pickle=True), sizes=SIZES)
    assert result.adapter.config.modules["model.layers.0.mlp.down_proj"] == {"in_features": 100, "out_features": 72}
    assert any("wider than the layer" in n for n in result.inference.notes)
    # a tail that does not continue the rotation is not cut away silently
    expanded = torch.load(folder / "adapter_model.bin", weights_only=True)
    key = f"{PREFIX}model.layers.1.self_attn.k_proj.lora_B.weight"  # 25 rows for a 24-row layer
    expanded[key] = expanded[key].clone()
    expanded[key][24, 0] += 1.0
    torch.save(expanded, folder / "adapter_model.bin")
    for compact in (True, False):  # not even for a merge, which could take plain LoRA
        with pytest.raises(PRoLoRAError, match=r"wider than the layer and no chunk structure.*sharing_rate_b"):
            read_adapter(folder, ReadOptions(allow_pickle=True), sizes=SIZES, compact=compact)
    with pytest.raises(PRoLoRAError, match="wider than the layer"):
        convert(folder, "prolora", tmp_path / "ours", options=ReadOptions(allow_pickle=True), base=str(base_dir))
    assert not (tmp_path / "ours").exists()


# ----------------------------------------------------------------------------- inference, properties
def _expanded_layer(d_in: int, d_out: int, r: int, u: int, m: int, n: int, s_a: int, s_b: int, seed: int):
    """Full A, B from shards by SPEC §1's element rule (independent of the package), and the shards."""
    gen = torch.Generator().manual_seed(seed)
    rs, c_a, c_b = r - u, math.ceil(d_in / m), math.ceil(d_out / n)
    a0, b0 = torch.randn(rs, c_a, generator=gen), torch.randn(c_b, rs, generator=gen)
    a_u, b_u = torch.randn(u, d_in, generator=gen), torch.randn(d_out, u, generator=gen)
    a = torch.empty(r, d_in)
    b = torch.empty(d_out, r)
    for k in range(d_in):
        j, t = divmod(k, c_a)
        a[:rs, k] = a0[[(i + j * s_a) % rs for i in range(rs)], t] if rs else a[:rs, k]
    for k in range(d_out):
        j, t = divmod(k, c_b)
        b[k, :rs] = b0[t, [(i + j * s_b) % rs for i in range(rs)]] if rs else b[k, :rs]
    a[rs:], b[:, rs:] = a_u, b_u
    return a, b, {"prolora_A_shard": a0, "prolora_B_shard": b0, "prolora_A_unshared": a_u, "prolora_B_unshared": b_u}


@st.composite
def geometries(draw):
    d_in, d_out = draw(st.integers(2, 40)), draw(st.integers(2, 40))
    r = draw(st.integers(2, 6))
    u = draw(st.integers(0, r - 1))
    m, n = draw(st.integers(1, d_in)), draw(st.integers(1, d_out))
    rs = r - u
    s_a, s_b = draw(st.integers(0, rs - 1)), draw(st.integers(0, rs - 1))
    return d_in, d_out, r, u, m, n, s_a, s_b, draw(st.integers(0, 2**16))


def _lora(a: torch.Tensor, b: torch.Tensor, r: int) -> LoraFactors:
    return LoraFactors(r, 2.0 * r, {"layer": (a, b)}, {"r": r, "lora_alpha": 2.0 * r, "peft_type": "LORA"})


def _effective(rate: int, size: int) -> int:
    """Chunks that hold data: rates with the same chunk width build the same tensors."""
    return math.ceil(size / math.ceil(size / rate))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometries())
def test_expanded_to_compact_recovers_the_shards_bitwise(geometry) -> None:
    d_in, d_out, r, u, m, n, s_a, s_b, seed = geometry
    a, b, shards = _expanded_layer(d_in, d_out, r, u, m, n, s_a, s_b, seed)
    m_eff, n_eff = _effective(m, d_in), _effective(n, d_out)
    if m_eff == 1 and n_eff == 1:  # no sharing at all: a genuine plain LoRA
        with pytest.raises(PRoLoRAError, match="no chunk structure"):
            read_expanded(_lora(a, b, r), ReadOptions(), None, "x", compact=True)
        return
    adapter, info, structured = read_expanded(_lora(a, b, r), ReadOptions(), None, "x", compact=True)
    assert structured and info.values["unshared_r"] == u
    g = adapter.config.module_geometry("layer")
    assert (g.chunk_a, g.chunk_b) == (math.ceil(d_in / m), math.ceil(d_out / n)) or (m_eff, n_eff).count(1)
    rebuilt_b, rebuilt_a = adapter.factors("layer")
    assert torch.equal(rebuilt_a, a) and torch.equal(rebuilt_b, b)
    if (g.chunk_a, g.chunk_b) == (math.ceil(d_in / m), math.ceil(d_out / n)):
        for name, tensor in adapter.tensors.items():
            assert torch.equal(tensor, shards[name.removeprefix("layer.")]), name


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometries(), st.data())
def test_a_one_element_change_in_a_chunk_is_refused(geometry, data) -> None:
    d_in, d_out, r, u, m, n, s_a, s_b, seed = geometry
    m, n = _effective(m, d_in), _effective(n, d_out)
    side = data.draw(st.sampled_from([s for s, k in (("A", m), ("B", n)) if k > 1] or ["none"]))
    if side == "none":
        return
    a, b, _ = _expanded_layer(d_in, d_out, r, u, m, n, s_a, s_b, seed)
    size, chunk = (d_in, math.ceil(d_in / m)) if side == "A" else (d_out, math.ceil(d_out / n))
    # any element of chunks 1…, or of chunk 0 where chunk 1 repeats it (elsewhere chunk 0 is free)
    position = data.draw(st.integers(0, size - 1).filter(lambda k: k >= chunk or k + chunk < size))
    rank = data.draw(st.integers(0, r - u - 1))
    target = a if side == "A" else b
    index = (rank, position) if side == "A" else (position, rank)
    target[index] = target[index] + 0.5 + abs(float(target[index]))
    stated = ReadOptions(r=r, unshared_r=u, sharing_rate_a=m, sharing_rate_b=n)
    with pytest.raises(PRoLoRAError, match=r"contradicts the tensors.*layer 'layer'"):
        read_expanded(_lora(a, b, r), stated, None, "x", compact=True)
    if (m if side == "B" else n) == 1:  # the other factor is not shared: refused, unless the change left a coarser
        # structure (a partial last chunk: d_in 11 at rate 4 holds x x x x[:2], and x x' | x x[:2] still repeats at
        # rate 2), which must then rebuild the changed tensors exactly
        try:
            adapter, _, _ = read_expanded(_lora(a, b, r), ReadOptions(unshared_r=u), None, "x", compact=True)
        except PRoLoRAError as err:
            assert "no chunk structure" in str(err)
        else:
            rebuilt_b, rebuilt_a = adapter.factors("layer")
            assert torch.equal(rebuilt_a, a) and torch.equal(rebuilt_b, b)


def test_an_ambiguous_structure_takes_the_documented_answer() -> None:
    """Rates 9 and 10 both cut 72 features into chunks of 8: the same tensors. The smallest rate wins, and
    the note says what else fits; an all-zero factor fits every rate: the most compact (largest) wins."""
    a, b, shards = _expanded_layer(72, 72, 4, 0, 10, 2, 1, 2, seed=0)
    adapter, info, _ = read_expanded(_lora(a, b, 4), ReadOptions(), None, "x", compact=True)
    assert info.values["sharing_rate_a"] == 9 and info.values["sharing_rate_b"] == 2
    assert any("other chunk structure" in note and "m=10" in note for note in info.notes)
    assert torch.equal(adapter.tensors["layer.prolora_A_shard"], shards["prolora_A_shard"])
    zero_b = torch.zeros_like(b)
    adapter, info, _ = read_expanded(_lora(a, zero_b, 4), ReadOptions(), None, "x", compact=True)
    assert info.values["sharing_rate_b"] == 72 and adapter.config.module_geometry("layer").chunk_b == 1


# ----------------------------------------------------------------------------- pickle, CLI, messages
class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _cli(*args) -> object:
    return CliRunner().invoke(cli_main, [str(a) for a in args])


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_is_read_only_when_allowed_and_never_runs_code(tmp_path: Path) -> None:
    run = RefRun(6, 1, 2, 2)
    folder = write_final(tmp_path / "final", trained_state(SIZES, run), run)
    (folder / "adapter_model.safetensors").unlink()
    refused = _cli("convert", folder, "--to", "prolora", "--out", tmp_path / "a")
    assert refused.exit_code == 2 and "--allow-pickle" in refused.output and not (tmp_path / "a").exists()
    done = _cli("convert", folder, "--to", "prolora", "--out", tmp_path / "a", "--allow-pickle")
    assert done.exit_code == 0, done.output
    assert "reference-expanded → prolora" in done.output and "sharing_rate_a=2 (inferred)" in done.output

    marker = tmp_path / "code-ran"
    with open(folder / "adapter_model.bin", "wb") as handle:
        pickle.dump({"x": _RunsCode(marker)}, handle)
    torch.save({"x": _RunsCode(marker)}, tmp_path / "evil.bin")
    for evil in (folder / "adapter_model.bin", tmp_path / "evil.bin"):
        (folder / "adapter_model.bin").write_bytes(evil.read_bytes())
        result = _cli("convert", folder, "--to", "prolora", "--out", tmp_path / "b", "--allow-pickle")
        assert result.exit_code == 2 and "weights_only" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
        assert not marker.exists() and not (tmp_path / "b").exists()


def test_inspect_shows_inferred_values_and_their_sources(tmp_path: Path) -> None:
    run = RefRun(6, 1, 2, 2)
    folder = write_checkpoint(tmp_path / "checkpoint-5", trained_state(SIZES, run), run)
    text = _cli("inspect", folder)
    assert text.exit_code == 0, text.output
    assert "(reference-training)" in text.output
    for fragment in ("r=6 (files)", "unshared_r=1 (files)", "sharing_rate_a=2 (inferred)",
                     "rotate=True (reference default)", "stride_a=2 (reference default)"):
        assert fragment in text.output, text.output
    data = json.loads(_cli("inspect", folder, "--json", "--sharing-rate-b", "2").output)
    assert data["sources"]["sharing_rate_b"] == "option" and data["hyperparameters"]["stride_b"] == 2


def test_training_layout_errors_never_call_it_plain_peft_lora(tmp_path: Path) -> None:
    run = RefRun(6, 1, 2, 2)
    state = trained_state(SIZES, run)
    key = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
    state[key] = torch.zeros(5, 7)  # a chunk width no sharing rate of the other layers gives
    folder = write_checkpoint(tmp_path / "checkpoint-1", state, run)
    result = _cli("convert", folder, "--to", "prolora", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "plain PEFT LoRA" not in result.output, result.output


def test_onnx_adapter_reads_a_reference_checkpoint(tmp_path: Path) -> None:
    run = RefRun(6, 1, 2, 2)
    folder = write_checkpoint(tmp_path / "checkpoint-5", trained_state(SIZES, run), run)
    result = _cli("onnx-adapter", "--adapter", folder, "--out", tmp_path / "a.onnx_adapter")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a.onnx_adapter").stat().st_size > 0


@pytest.mark.optimum
def test_onnx_export_and_parity_read_a_reference_folder(tmp_path: Path) -> None:
    """The final folder with both files, the pickle allowed: onnx (compact) and parity read it like the rest."""
    from test_data import tiny_tokenizer

    tiny_llama().save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    run = RefRun(6, 1, 2, 2)
    folder = write_final(tmp_path / "final", trained_state(SIZES, run), run)
    common = ["--base", tmp_path / "base", "--adapter", folder, "--allow-pickle"]
    done = _cli("onnx", *common, "--mode", "compact", "--out", tmp_path / "onnx")
    assert done.exit_code == 0, done.output
    gate = _cli("parity", *common, "--onnx", tmp_path / "onnx", "--max-new-tokens", "2")
    assert gate.exit_code == 0, gate.output
