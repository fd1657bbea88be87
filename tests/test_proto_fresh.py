"""The committed generated code must match proto/ (regenerate with `make proto`)."""

from __future__ import annotations

import filecmp
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    _load_generator().generate(tmp_path / "_proto")
    committed = ROOT / "qrelay" / "_proto"
    fresh = tmp_path / "_proto"
    names = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    committed_names = sorted(
        p.relative_to(committed)
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert names == committed_names, "generated file set differs: run `make proto`"
    stale = [str(n) for n in names if not filecmp.cmp(fresh / n, committed / n, shallow=False)]
    assert not stale, f"stale generated files {stale}: run `make proto`"
