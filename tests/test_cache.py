"""The one cache mechanism (``paths.cached_dir``, ``paths.cached_torch``):
damaged entries are rebuilt with a line saying why, never served; loads run no code from
the cache; two processes on one cold cache both succeed with one build."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from replbook import paths


@pytest.fixture(autouse=True)
def cold_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path / "cache"))
    paths._VERIFIED.clear()
    return tmp_path / "cache"


def _builder(calls, payload=b"weights" * 1000):
    def build(tmp):
        calls.append(tmp)
        (tmp / "weights.bin").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text('{"width": 8}')
        return {"model": "toy"}
    return build


def _flip_one_bit(path, offset=100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def test_a_folder_entry_is_built_once_then_served_from_the_cache(cold_cache):
    calls = []
    folder = paths.cache_dir("toy") / "entry"
    assert paths.cached_dir(folder, _builder(calls)) == ({"model": "toy"}, True)
    assert paths.cached_dir(folder, _builder(calls)) == ({"model": "toy"}, False)
    assert len(calls) == 1
    listed = json.loads((folder / paths.CHECKSUMS).read_text())
    assert set(listed) == {"weights.bin", "sub/config.json", "manifest.json"}


@pytest.mark.parametrize("damage, why", [
    (lambda f: _flip_one_bit(f / "weights.bin"), "fails its sha256"),
    (lambda f: _truncate(f / "weights.bin"), "truncated"),
    (lambda f: (f / "sub" / "config.json").unlink(), "config.json is missing"),
    (lambda f: (f / paths.CHECKSUMS).write_text("{not json"), "is damaged"),
    (lambda f: (f / paths.CHECKSUMS).write_text("{}"), "lists no files"),  # nothing would be verified
])
def test_a_damaged_folder_entry_is_rebuilt_with_one_line_saying_why(damage, why, capsys):
    calls = []
    folder = paths.cache_dir("toy") / "entry"
    paths.cached_dir(folder, _builder(calls))
    paths._VERIFIED.clear()  # a new process
    damage(folder)
    assert paths.cached_dir(folder, _builder(calls)) == ({"model": "toy"}, True)
    assert len(calls) == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if "building it again" in line]
    assert len(lines) == 1 and why in lines[0], lines
    assert paths.entry_problem(folder) is None


def test_a_bit_flip_after_the_first_check_in_a_process_is_still_caught_by_size_or_mtime():
    """Hashing once per process trusts (size, mtime); a rewrite changes mtime, so it is hashed again."""
    calls = []
    folder = paths.cache_dir("toy") / "entry"
    paths.cached_dir(folder, _builder(calls))
    assert paths.entry_problem(folder) is None
    time.sleep(0.01)
    _flip_one_bit(folder / "weights.bin")
    assert "sha256" in paths.entry_problem(folder)


def test_a_verified_file_is_hashed_once_per_process(monkeypatch):
    folder = paths.cache_dir("toy") / "entry"
    paths.cached_dir(folder, _builder([]))
    paths._VERIFIED.clear()
    hashed = []
    real = paths.sha256_file
    monkeypatch.setattr(paths, "sha256_file", lambda p, *a: hashed.append(p) or real(p, *a))
    for _ in range(3):
        assert paths.entry_problem(folder) is None
    assert len(hashed) == 3  # the three files, the first time only


def test_an_entry_made_before_checksums_is_adopted_once_not_rebuilt(capsys):
    folder = paths.cache_dir("toy") / "legacy"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"old weights")
    (folder / "manifest.json").write_text('{"model": "old"}')
    calls = []
    assert paths.cached_dir(folder, _builder(calls)) == ({"model": "old"}, False)
    assert not calls and "predates checksums" in capsys.readouterr().out
    assert paths.entry_problem(folder) is None


def test_a_damaged_entry_is_replaced_and_the_one_set_aside_removed():
    folder = paths.cache_dir("toy") / "entry"
    calls = []
    paths.cached_dir(folder, _builder(calls))
    assert paths.cached_dir(folder, _builder(calls)) == ({"model": "toy"}, False) and len(calls) == 1
    paths._VERIFIED.clear()
    _flip_one_bit(folder / "weights.bin")
    assert paths.cached_dir(folder, _builder(calls)) == ({"model": "toy"}, True)
    assert len(calls) == 2 and paths.entry_problem(folder) is None
    assert not list(folder.parent.glob("*.tmp-*")), "the damaged entry set aside was not removed"


def test_temporaries_older_than_a_day_are_removed_and_fresh_ones_kept():
    parent = paths.cache_dir("toy")
    old, fresh = parent / "entry.tmp-killed", parent / "other.tmp-running"
    finished = parent / "built-last-year"  # a finished entry, however old, is not a temporary
    old.mkdir(), fresh.mkdir(), finished.mkdir()
    day_ago = time.time() - paths.STALE_TEMPORARY_SECONDS - 60
    os.utime(old, (day_ago, day_ago))
    os.utime(finished, (day_ago, day_ago))
    paths.cached_dir(parent / "entry", _builder([]))
    assert not old.exists() and fresh.exists() and finished.exists()


# ----------------------------------------------------------------------------- cached_torch

def test_cached_torch_round_trips_tensors_and_numpy_arrays():
    value = {"w": torch.arange(6.0), "scores": [np.array([[1.5, 2.0]]), np.arange(3)]}
    built, from_cache = paths.cached_torch("toy", "k", lambda: value)
    assert not from_cache
    loaded, from_cache = paths.cached_torch("toy", "k", lambda: pytest.fail("built again"))
    assert from_cache and torch.equal(loaded["w"], value["w"])
    assert np.array_equal(loaded["scores"][0], value["scores"][0]) and loaded["scores"][1].dtype == np.arange(3).dtype


def test_cached_torch_keeps_one_entry_per_key():
    assert paths.cached_torch("toy", "key one", lambda: torch.tensor([1.0]))[0].item() == 1.0
    assert paths.cached_torch("toy", "key two", lambda: torch.tensor([2.0]))[0].item() == 2.0
    assert paths.cached_torch("toy", "key one", lambda: pytest.fail("built again"))[0].item() == 1.0


def _torch_entry():
    paths.cached_torch("toy", "k", lambda: {"w": torch.arange(1000.0)})
    return next(paths.cache_dir("toy").glob("*.pt"))


@pytest.mark.parametrize("damage, why", [(_flip_one_bit, "sha256"), (_truncate, "truncated"),
                                         (lambda p: p.unlink(), None)])
def test_a_damaged_torch_entry_is_rebuilt(damage, why, capsys):
    path = _torch_entry()
    paths._VERIFIED.clear()
    damage(path)
    value, from_cache = paths.cached_torch("toy", "k", lambda: {"w": torch.arange(1000.0)})
    assert not from_cache and torch.equal(value["w"], torch.arange(1000.0))
    out = capsys.readouterr().out
    if why:
        assert why in out and "building it again" in out
    assert paths.cached_torch("toy", "k", lambda: pytest.fail("built again"))[1]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran-code-from-cache",))


def test_a_cache_file_holding_code_is_never_executed(tmp_path, monkeypatch, capsys):
    """A shared cache is untrusted: a pickled callable is refused and the entry rebuilt."""
    monkeypatch.chdir(tmp_path)
    path = _torch_entry()
    torch.save({"w": _RunsCode()}, path)
    path.with_name(path.name + ".sha256").write_text(f"{paths.sha256_file(path)} {path.stat().st_size}\n")
    paths._VERIFIED.clear()
    value, from_cache = paths.cached_torch("toy", "k", lambda: {"w": torch.arange(3.0)})
    assert not from_cache and not (tmp_path / "ran-code-from-cache").exists()
    assert "does not load" in capsys.readouterr().out


def test_a_torch_entry_made_before_checksums_is_adopted_if_it_loads_safely(capsys):
    path = _torch_entry()
    path.with_name(path.name + ".sha256").unlink()
    value, from_cache = paths.cached_torch("toy", "k", lambda: pytest.fail("built again"))
    assert from_cache and "predates checksums" in capsys.readouterr().out
    assert path.with_name(path.name + ".sha256").exists()


# ----------------------------------------------------------------------------- two processes

_CONCURRENT = r'''
import json, sys, time
from pathlib import Path
import torch
from replbook import paths, models

def slow_build(tmp):
    time.sleep(1.0)  # both processes are inside the build window at once
    (tmp / "weights.bin").write_bytes(b"x" * 100000)
    return {"built_by": sys.argv[1]}

folder = paths.cache_dir("race") / "entry"
manifest, _ = paths.cached_dir(folder, slow_build)
value, _ = paths.cached_torch("race", "key", lambda: (time.sleep(1.0), {"w": torch.arange(10.0)})[1])
loaded = models.load("tiny-llama", preset="smoke", progress=False)
tiny = next(Path(paths.cache_dir("models")).glob("tiny-llama-*"))
print(json.dumps({"manifest": manifest, "w": value["w"].tolist(),
                  "tiny": json.loads((tiny / paths.CHECKSUMS).read_text())}))
'''


def test_two_processes_on_a_cold_cache_both_succeed_with_one_build_and_identical_bytes(cold_cache, tmp_path):
    script = tmp_path / "race.py"
    script.write_text(_CONCURRENT)
    env = {**os.environ, "REPLBOOK_CACHE": str(cold_cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), name], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for name in ("first", "second")]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    first, second = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    assert first == second  # one build served both: the same manifest, tensor and model bytes
    assert paths.entry_problem(paths.cache_dir("race") / "entry") is None
    assert not list(cold_cache.rglob("*.tmp-*")), "a temporary was left behind"
