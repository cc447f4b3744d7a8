import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from replbook import cli, paths, runner


def test_parse_parameters_both_forms():
    assert cli.parse_parameters(["n=4", "models=['a', 'b']", "name=smollm2-135m", "x=1.5"]) == \
        {"n": 4, "models": ["a", "b"], "name": "smollm2-135m", "x": 1.5}
    # argparse's -p NAME VALUE and -p NAME=VALUE [NAME=VALUE ...]
    assert cli.parse_parameters([["offload_dir", "/mnt/nvme/endor"], ["n=4", "x=1.5"]]) == \
        {"offload_dir": "/mnt/nvme/endor", "n": 4, "x": 1.5}
    # a value may hold "=" itself: only the first one separates the name
    assert cli.parse_parameters(["prompt=a=b", ["query", "x=1"]]) == {"prompt": "a=b", "query": "x=1"}
    with pytest.raises(ValueError, match="name=value"):
        cli.parse_parameters(["oops"])


def test_chapter_numbers_with_or_without_the_leading_zero(repo_root):
    assert paths.notebook_for("1", repo_root).name == "01_restor.ipynb"
    assert paths.notebook_for("01", repo_root).name == "01_restor.ipynb"
    for bad in ("99", "x", "", "1_"):
        with pytest.raises(ValueError, match=r"is not valid; choose one of: 00"):
            paths.notebook_for(bad, repo_root)


def test_unknown_preset_and_parameter_fail_before_running(repo_root):
    with pytest.raises(ValueError, match=r"preset='huge' is not valid; choose one of: smoke, book, paper"):
        runner.run("00", "huge", root=repo_root)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) epochs.*valid parameters: preset, language_models"):
        runner.run("00", "smoke", {"epochs": 3}, root=repo_root)
    with pytest.raises(ValueError, match="never published"):
        runner.run("00", "smoke", publish=True, root=repo_root)


def test_main_reports_errors_with_exit_code_2(capsys):
    assert cli.main(["run", "00", "--preset", "huge"]) == 2
    assert "choose one of: smoke, book, paper" in capsys.readouterr().err


@pytest.fixture
def book(tmp_path, repo_root):
    """A copy of the book's notebooks and committed results to run in."""
    for name in ("_toc.yml", "pyproject.toml"):
        shutil.copy(repo_root / name, tmp_path / name)
    shutil.copytree(repo_root / "notebooks", tmp_path / "notebooks", ignore=shutil.ignore_patterns(".*"))
    shutil.copytree(repo_root / "results", tmp_path / "results")
    return tmp_path


@pytest.fixture
def fake_papermill(monkeypatch):
    """papermill.execute_notebook replaced by a stand-in that 'executes' the notebook: it
    writes the output notebook and a results file where the run's environment says, or
    fails in cell 7 like papermill does, leaving a partly executed notebook."""
    import os
    from pathlib import Path

    import papermill

    calls = []

    def execute(source, out, parameters, **kwargs):
        calls.append({**parameters, "environment": {k: os.environ.get(k) for k in runner.OFFLINE_ENVIRONMENT},
                      "cpu": {name: os.environ.get(name) for name in runner.CPU_PINS}})
        Path(out).write_text(json.dumps({"cells": [], "metadata": {"papermill": {"duration": 1}}, "partial": True}))
        if parameters.get("fail"):
            raise papermill.PapermillExecutionError(7, 3, "x = 1 / 0", "ZeroDivisionError", "division by zero",
                                                    ["Traceback line 1", "ZeroDivisionError: division by zero"])
        folder = Path(os.environ["REPLBOOK_RESULTS_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{Path(source).stem}.json").write_text(json.dumps({"preset": parameters["preset"]}))
        return {}

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    monkeypatch.setattr(runner, "notebook_parameters", lambda path: ["seed", "fail"])
    monkeypatch.setattr(runner, "check_parameters", lambda *a: None)  # "fail" is this stand-in's own parameter
    monkeypatch.setattr(runner, "busy_share", lambda: 0.0)  # no second of sampling per published run
    from replbook import prepare

    monkeypatch.setattr(prepare, "prepare", lambda *a, **k: [])  # `replbook run` prepares nothing real here
    return calls


def _published(book):
    return (book / "notebooks" / "00_model_zoo.ipynb").read_bytes(), (book / "results" / "00_model_zoo.json").read_bytes()


def test_only_a_finished_book_run_without_overrides_is_published(book, fake_papermill):
    before = _published(book)
    assert runner.run("00", "smoke", root=book) == book / "runs" / "smoke" / "00_model_zoo.ipynb"
    assert json.loads((book / "runs" / "smoke" / "results" / "00_model_zoo.json").read_text()) == {"preset": "smoke"}
    assert runner.run("00", "book", {"seed": 3}, root=book) == book / "runs" / "book-with-overrides" / "00_model_zoo.ipynb"
    assert (book / "runs" / "book-with-overrides" / "results" / "00_model_zoo.json").exists()
    assert _published(book) == before, "a smoke run or a run with overrides reached notebooks/ or results/"
    assert runner.run("00", "book", root=book) == book / "notebooks" / "00_model_zoo.ipynb"
    assert json.loads((book / "results" / "00_model_zoo.json").read_text()) == {"preset": "book"}
    assert "duration" not in (book / "notebooks" / "00_model_zoo.ipynb").read_text()  # cleaned of timings
    assert runner.run("00", "book", {"seed": 3}, root=book, publish=True) == book / "notebooks" / "00_model_zoo.ipynb"
    assert not [p for p in (book / "runs").iterdir() if p.name.startswith(".staging")], "staging folder left behind"


def test_replbook_run_prepares_its_chapter_after_the_parameters_pass_and_before_the_notebook(book, fake_papermill,
                                                                                             monkeypatch):
    """A first `replbook run 09` on an empty cache found no CIFAR-10 (only `replbook prepare`
    writes it): the run prepares its own chapter, but never for a parameter it refuses."""
    from replbook import prepare

    prepared = []
    monkeypatch.setattr(prepare, "prepare", lambda chapters, preset, root=None, progress=True: prepared.append(
        (chapters, preset, Path(root), len(fake_papermill))))
    monkeypatch.chdir(book)
    monkeypatch.setenv("REPLBOOK_ROOT", str(book))
    assert cli.main(["run", "00", "--preset", "smoke", "-p", "epochs=3"]) == 2 and prepared == [] == fake_papermill
    assert cli.main(["run", "0", "--preset", "smoke"]) == 0
    assert prepared == [(["00"], "smoke", book, 0)], "prepared after papermill started, or not for this chapter"
    assert len(fake_papermill) == 1
    runner.run("00", "smoke", root=book)  # the library call (stability runs, tests) leaves it to the caller
    assert len(prepared) == 1


def test_a_paper_run_records_the_commit_each_hub_model_ran_at(book, fake_papermill, tmp_path, monkeypatch, capsys):
    """A repository's main moves, so the registry pins each paper model's commit
    (models.HUB_REVISIONS) and the loaders ask for it: a paper run's results say which
    snapshot of each model it loaded (the pinned one, where the hub cache holds it, whatever
    refs/main says), and None, said aloud, for a model the cache does not hold."""
    from replbook import models

    pins = {hub_id: models.HUB_REVISIONS[hub_id] for hub_id in ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-70b-hf")}
    hub = tmp_path / "hub"
    seven, seventy = hub / "models--meta-llama--Llama-2-7b-hf", hub / "models--meta-llama--Llama-2-70b-hf"
    (seven / "refs").mkdir(parents=True)
    (seven / "refs" / "main").write_text("8cca527612d856d7d32bd94f8103728d614eb852\n")  # main has moved on
    (seven / "snapshots" / pins["meta-llama/Llama-2-7b-hf"]).mkdir(parents=True)
    # another ref of the same repository, and a repository 08 does not load unless asked
    (seven / "refs" / "pr-1").write_text("1111111111111111111111111111111111111111")
    (seventy / "snapshots" / pins["meta-llama/Llama-2-70b-hf"]).mkdir(parents=True)
    # huggingface_hub read its variables when first imported (here, as in a session that loaded a
    # model before it pointed HF_HUB_CACHE elsewhere): the run must read the hub cache its kernel reads
    import huggingface_hub.constants  # noqa: F401

    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    runner.run("08", "paper", root=book, out_dir=tmp_path / "paper")
    saved = json.loads((tmp_path / "paper" / "results" / "08_loki.json").read_text())
    assert saved == {"preset": "paper", "hub_revisions": {"meta-llama/Llama-2-7b-hf": pins["meta-llama/Llama-2-7b-hf"],
                                                          "meta-llama/Llama-2-13b-hf": None}}
    err = capsys.readouterr().err
    assert f"08_loki ran meta-llama/Llama-2-7b-hf at {pins['meta-llama/Llama-2-7b-hf']}" in err
    assert f"meta-llama/Llama-2-13b-hf at an unknown commit (not in the hub cache {hub})" in err
    # the reader's -p values decide which models ran
    monkeypatch.setattr(runner, "notebook_parameters", lambda path: ["model_names"])
    runner.run("08", "paper", {"model_names": ["llama2-70b"]}, root=book, out_dir=tmp_path / "seventy")
    assert json.loads((tmp_path / "seventy" / "results" / "08_loki.json").read_text())["hub_revisions"] == {
        "meta-llama/Llama-2-70b-hf": pins["meta-llama/Llama-2-70b-hf"]}
    # a book run loads no hub model and records none
    runner.run("00", "book", root=book, out_dir=tmp_path / "book")
    assert "hub_revisions" not in json.loads((tmp_path / "book" / "results" / "00_model_zoo.json").read_text())


def test_the_hub_cache_is_found_in_huggingface_hubs_order_of_variables(monkeypatch, tmp_path):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert runner.hub_cache() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runner.hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert runner.hub_cache() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert runner.hub_cache() == tmp_path / "cache"


def test_a_published_notebook_keeps_no_timings_of_its_cells_or_its_run(tmp_path):
    """A rerun that changed nothing leaves the committed notebook byte for byte as it was."""
    notebook = tmp_path / "run.ipynb"
    timed = {"execution": {"iopub.execute_input": "2026-12-06T10:00:00"},
             "papermill": {"duration": 1.5, "status": "completed"}, "tags": ["parameters"]}
    notebook.write_text(json.dumps({"cells": [{"cell_type": "code", "metadata": dict(timed), "source": ""},
                                              {"cell_type": "markdown", "metadata": dict(timed), "source": ""}],
                                    "metadata": {"papermill": {"duration": 9.0, "start_time": "a", "end_time": "b",
                                                               "input_path": "i", "output_path": "o",
                                                               "parameters": {"preset": "book"}}}}))
    runner.clean_metadata(notebook)
    cleaned = json.loads(notebook.read_text())
    assert [cell["metadata"] for cell in cleaned["cells"]] == [{"tags": ["parameters"]}] * 2
    assert cleaned["metadata"]["papermill"] == {"parameters": {"preset": "book"}}


def test_busy_share_is_the_machines_busy_ticks_over_its_ticks():
    ticks = iter([(100, 1000), (160, 1100)])
    assert runner.busy_share(0, times=lambda: next(ticks)) == pytest.approx(0.6)
    assert runner.busy_share(0, times=lambda: None) == 0.0
    busy, total = runner._cpu_times()
    assert 0 <= busy <= total


def test_a_published_run_started_on_a_busy_machine_says_its_runtime_includes_the_wait(book, fake_papermill,
                                                                                     monkeypatch, capsys):
    monkeypatch.setattr(runner, "busy_share", lambda: 0.9)
    runner.run("00", "smoke", root=book)
    assert "busy" not in capsys.readouterr().err, "only a published run's runtime is recorded"
    runner.run("00", "book", root=book)
    assert "90% busy before 00_model_zoo starts" in capsys.readouterr().err
    monkeypatch.setattr(runner, "busy_share", lambda: 0.1)
    runner.run("00", "book", root=book)
    assert "busy" not in capsys.readouterr().err


def test_smoke_and_book_runs_are_offline_and_the_paper_preset_may_reach_the_hub(book, fake_papermill, monkeypatch):
    for name in runner.OFFLINE_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    runner.run("00", "smoke", root=book)
    runner.run("00", "book", {"seed": 2}, root=book)
    runner.run("00", "paper", {"seed": 1}, root=book)
    smoke, book_run, paper = (call["environment"] for call in fake_papermill)
    assert smoke == book_run == {name: "1" for name in runner.OFFLINE_ENVIRONMENT}
    assert paper == {name: None for name in runner.OFFLINE_ENVIRONMENT}
    assert not any(name in __import__("os").environ for name in runner.OFFLINE_ENVIRONMENT), "the caller's environment changed"


def test_book_runs_ask_every_library_for_its_avx2_code_unless_the_reader_chose(book, fake_papermill, monkeypatch):
    """An AVX-512 machine sums floats differently from the AVX2 run that made results/: the
    rerun's retrained models then moved past the guard's bands (runner.CPU_PINS)."""
    for name in runner.CPU_PINS:
        monkeypatch.delenv(name, raising=False)
    # the paper run first: it reads the chapter's notebook for its hub models, which the
    # published book run below replaces with this stand-in's empty notebook
    runner.run("00", "paper", {"seed": 1}, root=book)
    runner.run("00", "book", root=book)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    runner.run("00", "smoke", root=book)
    paper, pinned, overridden = (call["cpu"] for call in fake_papermill)
    assert pinned == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert overridden == pinned | {"ATEN_CPU_CAPABILITY": "default"}
    assert paper == {name: None for name in runner.CPU_PINS}, "the paper preset (a GPU node) is pinned"


def test_the_makefile_pins_what_the_runner_pins():
    """`make test` runs nbval's kernels, not runner.run: its exported pins must be the same list."""
    from replbook.paths import repo_root

    makefile = (repo_root() / "Makefile").read_text()
    pinned = dict(re.findall(r"^(\w+) \?= (\S+)$", makefile, flags=re.M))
    exported = set(re.search(r"^export ATEN_CPU_CAPABILITY.*$", makefile, flags=re.M).group(0).split()[1:])
    assert {name: pinned.get(name) for name in runner.CPU_PINS} == runner.CPU_PINS
    assert exported == set(runner.CPU_PINS)


def test_a_killed_runs_staging_folder_is_removed_after_a_day(book, fake_papermill):
    import os
    import time

    runs = book / "runs"
    killed, running = runs / ".staging-00_model_zoo.killed", runs / ".staging-01_restor.running"
    killed.mkdir(parents=True), running.mkdir()
    day_ago = time.time() - 24 * 3600 - 60
    os.utime(killed, (day_ago, day_ago))
    runner.run("00", "smoke", root=book)
    assert not killed.exists() and running.exists()


def test_a_failed_run_publishes_nothing_and_keeps_its_notebook(book, fake_papermill, capsys, monkeypatch):
    before = _published(book)
    monkeypatch.chdir(book)
    monkeypatch.setenv("REPLBOOK_ROOT", str(book))
    assert cli.main(["run", "00", "--preset", "book", "-p", "fail", "True", "--publish"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("replbook: 00_model_zoo failed in cell 7: ZeroDivisionError: division by zero "
                      f"(partly executed notebook: {book / 'runs' / 'failed' / '00_model_zoo.ipynb'})")
    assert err[1] == "Traceback line 1", "the traceback follows the one-line summary"
    assert _published(book) == before
    assert json.loads((book / "runs" / "failed" / "00_model_zoo.ipynb").read_text())["partial"]
    assert not [p for p in (book / "runs").iterdir() if p.name.startswith(".staging")]


def test_a_run_that_saves_no_results_is_not_published(book, fake_papermill, monkeypatch):
    import papermill

    before = _published(book)
    monkeypatch.setattr(papermill, "execute_notebook",
                        lambda source, out, parameters, **kw: __import__("pathlib").Path(out).write_text("{}"))
    with pytest.raises(RuntimeError, match="saved no results"):
        runner.run("00", "book", root=book)
    assert _published(book) == before


def test_failed_smoke_run_of_loki_writes_no_results(book):
    """The issue's case: ``replbook run 08 --preset smoke -p timing_repeats=0`` failed but
    its results JSON was written. That value is now refused before a kernel starts
    (tests/test_parameters.py); here the chapter fails in a cell *after* its results were
    saved (a cell appended to the notebook raises): it must exit 1, say which cell failed,
    keep the notebook and write no results anywhere."""
    import nbformat

    notebook = book / "notebooks" / "08_loki.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell('raise RuntimeError("a failure after run.save")'))
    nbformat.write(nb, notebook)
    done = subprocess.run([sys.executable, "-m", "replbook.cli", "run", "08", "--preset", "smoke"],
                          cwd=book, capture_output=True, text=True,
                          env={**__import__("os").environ, "REPLBOOK_ROOT": str(book)})
    assert done.returncode == 1, done.stderr[-2000:]
    first = next(line for line in done.stderr.splitlines() if line.startswith("replbook:"))
    assert first.startswith("replbook: 08_loki failed in cell ") and "runs/failed/08_loki.ipynb" in first
    assert "RuntimeError: a failure after run.save" in first
    assert (book / "runs" / "failed" / "08_loki.ipynb").exists()
    assert not list(book.glob("runs/**/results/08_loki.json"))
    committed = json.loads((book / "results" / "08_loki.json").read_text())
    assert committed["preset"] == "book"


def test_papermill_started_directly_writes_under_runs(book):
    """The issue's case: ``papermill notebooks/00_model_zoo.ipynb out.ipynb -p preset smoke``
    from the repo root rewrote results/00_model_zoo.json."""
    import os

    import papermill

    before = (book / "results" / "00_model_zoo.json").read_bytes()
    env = {k: v for k, v in os.environ.items() if k != "REPLBOOK_RESULTS_DIR"}
    done = subprocess.run([sys.executable, "-m", "papermill", "notebooks/00_model_zoo.ipynb", "out.ipynb",
                           "-p", "preset", "smoke", "--cwd", "notebooks"], cwd=book, capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (book / "results" / "00_model_zoo.json").read_bytes() == before
    assert json.loads((book / "runs" / "unpublished" / "00_model_zoo.json").read_text())["preset"] == "smoke"
    assert papermill  # imported for the module's presence


def test_clean_metadata_drops_timings(tmp_path):
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps({"cells": [{"cell_type": "code", "metadata": {"papermill": {"duration": 1},
                                "execution": {"x": 1}, "tags": ["a"]}}],
                                "metadata": {"papermill": {"duration": 3, "parameters": {"preset": "book"}}}}))
    runner.clean_metadata(path)
    nb = json.loads(path.read_text())
    assert nb["cells"][0]["metadata"] == {"tags": ["a"]}
    assert nb["metadata"]["papermill"] == {"parameters": {"preset": "book"}}


def test_needs_execution(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "results").mkdir()
    nb = tmp_path / "notebooks" / "05_x.ipynb"
    nb.write_text(json.dumps({"cells": [{"cell_type": "code", "source": ["1"], "execution_count": 1}]}))
    assert runner.needs_execution(nb, tmp_path)  # no results yet
    (tmp_path / "results" / "05_x.json").write_text("{}")
    assert not runner.needs_execution(nb, tmp_path)
    nb.write_text(json.dumps({"cells": [{"cell_type": "code", "source": ["1"], "execution_count": None}]}))
    assert runner.needs_execution(nb, tmp_path)


# A socket guard every Python process of the run loads (the kernel too): a connection to any
# address but the loopback (the kernel talks to papermill over it) is written down and refused.
_SOCKET_GUARD = r'''
import os, socket
_connect = socket.socket.connect
def _guarded(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
        with open(os.environ["REPLBOOK_SOCKET_LOG"], "a") as log:
            log.write(f"{os.getpid()} tried to connect to {address}\n")
        raise OSError(f"network access during an offline run: {address}")
    return _connect(self, address)
socket.socket.connect = _guarded
'''


def test_a_smoke_run_on_a_cold_cache_makes_no_network_lookup(book, tmp_path):
    """The issue's case: building the tiny sentence encoder looked up the hub for a model
    card. Chapter 00's smoke run on an empty cache, in a network namespace with no network
    (``unshare -n``, loopback up for the kernel) and with the socket guard above: it must
    finish, and no process may have tried to connect anywhere. ``replbook run`` sets the
    offline variables itself: they are removed from the environment here."""
    import os
    import shutil as sh

    if not sh.which("unshare") or subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode:
        pytest.skip("this machine does not allow a network namespace (unshare -n)")
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(_SOCKET_GUARD)
    log = tmp_path / "connections.log"
    env = {k: v for k, v in os.environ.items() if k not in runner.OFFLINE_ENVIRONMENT}
    env.update(REPLBOOK_ROOT=str(book), REPLBOOK_CACHE=str(tmp_path / "cold-cache"), REPLBOOK_SOCKET_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(guard), *filter(None, [os.environ.get("PYTHONPATH")])]))
    script = f"ip link set lo up && exec {sys.executable} -m replbook.cli run 00 --preset smoke"
    done = subprocess.run(["unshare", "-n", "sh", "-c", script], cwd=book, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not log.exists(), log.read_text()
    assert (book / "runs" / "smoke" / "results" / "00_model_zoo.json").exists()


@pytest.mark.parametrize("cells_before_signal", [0, 3], ids=["at-start", "mid-run"])
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signalled_run_removes_its_staging_folder_and_publishes_nothing(book, signal_name, cells_before_signal):
    """Ctrl-C or a SIGTERM while a chapter runs: exit 130 with one line, no staging folder,
    no temporary notebook, no results anywhere."""
    import os
    import signal
    import time

    before = _published(book)
    proc = subprocess.Popen([sys.executable, "-m", "replbook.cli", "run", "00", "--preset", "smoke"], cwd=book,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "REPLBOOK_ROOT": str(book)},
                            # as a job started in the background is: SIGINT ignored from the start
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))

    def cells_executed() -> int:  # papermill rewrites the staged notebook after every cell
        try:
            staged = next((book / "runs").glob(".staging-*/*.ipynb"))
            return sum(1 for c in json.loads(staged.read_text())["cells"] if c.get("execution_count"))
        except (StopIteration, ValueError, KeyError, OSError):  # not there yet, or half written
            return 0

    deadline = time.time() + 120
    # at start (the staged notebook written, the kernel starting: an inherited ignored SIGINT once let
    # the run finish and publish) or mid-run, while the kernel executes cells
    while (not list((book / "runs").glob(".staging-*/*.ipynb")) or cells_executed() < cells_before_signal) \
            and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(getattr(signal, signal_name))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "replbook: interrupted; nothing was published" in err
    assert not list((book / "runs").glob(".staging-*")), "the staging folder was left behind"
    assert not list((book / "notebooks").glob(".*")) and not list(book.glob("runs/**/results/*.json"))
    assert _published(book) == before


@pytest.mark.parametrize("status", [130, 2, 0])
def test_the_command_exits_130_after_an_interrupt_whatever_shutdown_does(tmp_path, status):
    """After an interrupt the command still runs the exit handlers (they shut the kernel
    down) and then leaves with 130 even if a handler raises KeyboardInterrupt or a late
    SIGTERM arrives during shutdown; any other status passes through unchanged."""
    import os

    marker = tmp_path / "exit-handlers-ran"
    script = f"""
import atexit, os, signal, sys
from replbook import cli

atexit.register(lambda: open({str(marker)!r}, "w").write("ran"))  # registered first, runs last
if {status} == 130:
    atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))  # a late SIGTERM
    def raises():
        raise KeyboardInterrupt("late")
    atexit.register(raises)
cli.main = lambda argv=None: {status}
cli.entry()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(paths.repo_root() / "lib")})
    assert proc.returncode == status, proc.stderr[-2000:]
    assert marker.read_text() == "ran", "the exit handlers (the kernel's shutdown) were skipped"


def test_a_published_run_records_which_numerics_family_made_it(book, fake_papermill, monkeypatch):
    """`replbook run` says which family's sums the published numbers are (results/reference/
    published.json); a smoke run or a run with overrides changes nothing there."""
    from replbook import numerics

    monkeypatch.setattr(numerics, "family", lambda environ=None, *a: "x86_64-testvendor")
    before = numerics.published_families(book)
    runner.run("00", "smoke", root=book)
    runner.run("00", "book", {"seed": 3}, root=book)
    assert numerics.published_families(book) == before
    runner.run("00", "book", root=book)
    assert numerics.published_families(book) == {**before, "00_model_zoo": "x86_64-testvendor"}


def test_publishing_commands_regenerate_the_readme_scoreboard(monkeypatch, tmp_path):
    from replbook import stability

    written = []
    monkeypatch.setattr(cli, "write_scoreboard", lambda root: written.append(root))
    monkeypatch.setattr(cli, "run", lambda chapter, preset, parameters, publish=None, prepare_first=False: (
        paths.repo_root() / ("notebooks" if preset == "book" else "runs/smoke") / "00_model_zoo.ipynb"))
    monkeypatch.setattr(stability, "carry_forward", lambda chapter: tmp_path / "record.json")
    assert cli.main(["run", "00", "--preset", "smoke"]) == 0 and written == []
    assert cli.main(["run", "00"]) == 0 and len(written) == 1
    assert cli.main(["stability", "00", "--carry-forward"]) == 0 and len(written) == 2


def test_a_reference_run_records_this_familys_numbers_and_publishes_nothing(book, fake_papermill, monkeypatch):
    from replbook import numerics

    monkeypatch.setattr(numerics, "family", lambda environ=None, *a: "x86_64-testvendor")
    before, families = _published(book), numerics.published_families(book)
    path = runner.record_reference("00", root=book, progress=False)
    assert path == book / "results" / "reference" / "x86_64-testvendor" / "00_model_zoo.json"
    recorded = json.loads(path.read_text())
    assert recorded["results"] == {"preset": "book"} and recorded["family"] == "x86_64-testvendor"
    assert fake_papermill[-1]["preset"] == "book" and set(fake_papermill[-1]) == {"preset", "environment", "cpu"}
    assert _published(book) == before and numerics.published_families(book) == families
    assert not [p for p in (book / "runs").iterdir() if p.name.startswith(".reference")]


def test_a_cpu_model_reference_is_filed_under_the_model_and_allowed_on_the_published_family(book, fake_papermill,
                                                                                             monkeypatch):
    from replbook import numerics

    home = numerics.published_family("00_model_zoo", book)
    monkeypatch.setattr(numerics, "family", lambda environ=None, *a: home)
    monkeypatch.setattr(numerics, "cpu_variant", lambda cpuinfo=None: "f9m9")
    before = _published(book)
    path = runner.record_reference("00", root=book, progress=False, cpu_model=True)
    assert path == book / "results" / "reference" / f"{home}@f9m9" / "00_model_zoo.json"
    assert json.loads(path.read_text())["family"] == f"{home}@f9m9"
    assert not (book / "results" / "reference" / home / "00_model_zoo.json").exists()
    assert _published(book) == before and numerics.published_families(book)["00_model_zoo"] == home


def test_a_cpu_model_that_sums_like_its_family_gets_no_record(book, fake_papermill, monkeypatch, capsys):
    """`replbook reference NN --cpu-model` on a model whose rerun gives its family's numbers
    writes nothing: a record equal to the family's would only go stale with the next code change."""
    import os
    from pathlib import Path

    import papermill

    from replbook import numerics

    home = numerics.published_family("00_model_zoo", book)
    monkeypatch.setattr(numerics, "family", lambda environ=None, *a: home)
    monkeypatch.setattr(numerics, "cpu_variant", lambda cpuinfo=None: "f9m9")
    committed = (book / "results" / "00_model_zoo.json").read_text()

    def rerun_with_the_family_numbers(source, out, parameters, **kwargs):
        Path(out).write_text(json.dumps({"cells": [], "metadata": {"papermill": {"duration": 1}}}))
        folder = Path(os.environ["REPLBOOK_RESULTS_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "00_model_zoo.json").write_text(committed)
        return {}

    monkeypatch.setattr(papermill, "execute_notebook", rerun_with_the_family_numbers)
    before = _published(book)
    assert runner.record_reference("00", root=book, progress=False, cpu_model=True) is None
    assert "nothing recorded" in capsys.readouterr().out
    assert not list((book / "results" / "reference").glob("*@*/00_model_zoo.json"))
    assert not (book / "results" / "reference" / home / "00_model_zoo.json").exists()
    assert _published(book) == before and numerics.published_families(book)["00_model_zoo"] == home
    assert "00_model_zoo" not in numerics.family_dependent(book)
