"""Regressions found by running the tools as a new user would (each named by what broke)."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file, save_file

from vlm_bridge.testing.checks import checkpoint_mismatches

TOL = 1e-4
PACKAGE = Path(__file__).resolve().parents[2] / "vlm_bridge"


def test_square_fused_gate_up_imports_like_transformers(tmp_path, run_cli, parity):
    """hidden == 2 * moe_intermediate (as transformers' own Qwen3-VL-MoE tester config): gate_up is
    square, down_proj tells the inner order; import, verify and export work."""
    from vlm_bridge.testing.tiny_qwen2_5_vl import save_tiny_checkpoint
    from vlm_bridge.testing.tiny_qwen3_vl import (
        make_tiny_qwen3_model,
        make_tiny_qwen3_processor,
        tiny_qwen3_vl_config,
    )

    config = tiny_qwen3_vl_config(moe=True, text_config={"moe_intermediate_size": 32})
    hf = save_tiny_checkpoint(tmp_path / "hf", make_tiny_qwen3_model(config), make_tiny_qwen3_processor())
    gate_up = [v for k, v in load_file(hf / "model.safetensors").items() if k.endswith("gate_up_proj")]
    assert gate_up and gate_up[0].shape[1] == gate_up[0].shape[2] == 64
    meg, out = tmp_path / "meg", tmp_path / "out"
    assert run_cli("import", "--hf-model", hf, "--megatron-path", meg) == 0
    report = parity(hf, meg)
    assert report["max_abs_diff"] <= TOL and report["top1_agreement"] == 1.0, report
    assert run_cli("export", "--megatron-path", meg, "--hf-path", out) == 0
    assert checkpoint_mismatches(hf, out) == []


def test_verify_reports_an_incomplete_hf_load(tiny_hf, tiny_megatron, run_cli, capsys, tmp_path):
    """transformers re-initialises weights it cannot find; verify must say the HF side did not
    load instead of blaming the conversion with a 'first divergence'."""
    partial = tmp_path / "partial"
    shutil.copytree(tiny_hf, partial)
    tensors = load_file(partial / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert run_cli("verify", "--hf-model", partial, "--megatron-path", tiny_megatron) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "did not load the HF model completely" in err and "missing keys" in err
    assert "model.layers.1.mlp.up_proj.weight" in err


def test_moe_tp_check_uses_the_expert_ffn_width():
    """The dense intermediate_size is unused by MoE layers and must not decide the TP check."""
    from vlm_bridge.families._qwen.settings import check_divisibility

    def config(intermediate, moe_intermediate):
        text = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
                               intermediate_size=intermediate, moe_intermediate_size=moe_intermediate,
                               num_experts=4)
        vision = SimpleNamespace(num_heads=2, intermediate_size=64, hidden_size=32, spatial_merge_size=2)
        return SimpleNamespace(text_config=text, vision_config=vision)

    check_divisibility(config(intermediate=3, moe_intermediate=24), tp=2, pp=1)
    with pytest.raises(ValueError, match=r"--tp 2 does not divide the language FFN size \(25\)"):
        check_divisibility(config(intermediate=128, moe_intermediate=25), tp=2, pp=1)


def test_an_internal_error_is_not_a_failed_parity_check(run_cli, capsys, monkeypatch):
    """Exit 1 means 'parity failed'; a crash gets its own code and one line."""
    import vlm_bridge.cli as cli

    def broken(args):
        raise KeyError("something the code did not expect")

    monkeypatch.setitem(cli.COMMANDS, "verify", broken)
    capsys.readouterr()
    assert run_cli("verify", "--hf-model", "x") == cli.EXIT_CRASH == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("internal error: KeyError") and len(err.splitlines()) == 1


def _raise(kind: str) -> None:
    raise {"bug": TypeError, "user": ValueError}[kind]("boom")


@pytest.mark.parametrize("kind,user_error", [("bug", False), ("user", True)])
def test_a_rank_error_says_whether_it_is_a_user_mistake(kind, user_error):
    """The CLI turns a bug on a rank into exit 3 and a bad input into exit 2."""
    from vlm_bridge.parallel import RankError, run_parallel

    with pytest.raises(RankError) as info:
        run_parallel(_raise, 2, kind)
    assert info.value.user_error is user_error


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m.startswith("vlm_bridge")}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def test_package_structure_has_no_circles_and_no_upward_imports():
    """No import circles; convert/ imports nothing from families, the registry or peft; shared
    modules never name a family."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in _imports(p) if m in modules} for name, p in modules.items()}
    for name in modules:
        if name.startswith("vlm_bridge.convert"):
            bad = {m for m in graph[name] if m.startswith(("vlm_bridge.families", "vlm_bridge.registry",
                                                            "vlm_bridge.peft", "vlm_bridge.loading"))}
            assert not bad, f"{name} imports {bad}"
    # cycles: depth-first search over module-level and function-level imports alike
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            # a package importing its own submodules (re-exports) is not a cycle through code
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(cycle, cycle[1:])):
                    raise AssertionError(f"import circle: {' -> '.join(cycle)}")
            elif state.get(nxt) is None:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(modules):
        if name not in state:
            visit(name, [name])
    family_names = ("qwen", "gemma", "nemotron")
    families = PACKAGE / "families"
    shared = [p for p in PACKAGE.rglob("*.py") if "testing" not in p.parts and (
        "families" not in p.parts or p.parent == families / "_common" or p == families / "base.py")]
    for path in shared:  # code, comments and docstrings alike: shared code asks the family
        named = {n for n in family_names if n in path.read_text().lower()}
        assert not named, f"{path.relative_to(PACKAGE)} names a family: {sorted(named)}"



def test_verify_works_with_a_tokenizer_without_pad_token(tiny_hf, tmp_path, parity):
    """Many real tokenizers have none; the batch of rows of different lengths must still pad."""
    from transformers import AutoProcessor

    folder = tmp_path / "no_pad"
    shutil.copytree(tiny_hf, folder)
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.pad_token = None
    processor.save_pretrained(folder)
    assert AutoProcessor.from_pretrained(folder).tokenizer.pad_token is None
    report = parity(folder, None)
    assert report["max_abs_diff"] <= TOL and report["top1_agreement"] == 1.0, report
