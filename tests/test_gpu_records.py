"""Which recorded GPU measurement decides a chapter's check (replbook.gpu_records)."""
import json

import nbformat
import pytest

from conftest import ROOT
from replbook import gpu_records


@pytest.mark.parametrize("kind", sorted(gpu_records.DECIDING))
def test_each_deciding_record_is_kept_and_holds_what_its_chapter_reads(kind):
    path = gpu_records.deciding_path(kind, ROOT)
    assert path.exists(), f"gpu_records.DECIDING names {path.name} for {kind}, which kernels/measurements lacks"
    record = gpu_records.deciding(kind, ROOT)
    missing = [f for f in gpu_records.REQUIRED_FIELDS[kind] if f not in record]
    assert not missing, f"{path.name} lacks {missing}: not a {kind} record"
    assert record["device"] and record["triton"]


def test_the_named_record_decides_whatever_else_the_folder_holds(tmp_path):
    """An H100 record kept beside the H200 one must not take over: it sorts first by name,
    which is how chapter 04 used to choose."""
    folder = tmp_path / "kernels" / "measurements"
    folder.mkdir(parents=True)
    (folder / "endor_h100.json").write_text(json.dumps({"device": "an older run"}))
    (folder / gpu_records.DECIDING["endor_decode"]).write_text(json.dumps({"device": "the deciding run"}))
    assert gpu_records.deciding("endor_decode", tmp_path) == {"device": "the deciding run"}
    assert gpu_records.deciding("loki_step", tmp_path) is None  # not kept: the chapter says not testable
    with pytest.raises(KeyError, match="kind='loki'"):
        gpu_records.deciding("loki", tmp_path)


@pytest.mark.parametrize("slug", ["04_endor", "08_loki"])
def test_the_chapters_read_gpu_records_only_through_gpu_records(slug):
    notebook = nbformat.read(ROOT / "notebooks" / f"{slug}.ipynb", as_version=4)
    code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    assert "gpu_records.deciding(" in code
    assert '"measurements"' not in code and ".glob(" not in code, (
        f"{slug} reads kernels/measurements itself: go through gpu_records.deciding")
