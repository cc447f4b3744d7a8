"""``replbook`` — run a chapter at a preset, build the site.

    replbook run 00 --preset book [-p max_new_tokens=4 ...]   # -p overrides write runs/, not results/
    replbook prepare [01 02 ...]   # convert models, fetch data once (make test, make book and run do)
    replbook stability 06 --seeds 3   # verdicts over seeds -> results/stability/06_*.json
    replbook reference 05          # on a CPU of another family: its numbers -> results/reference/
    replbook build                 # scoreboard + site (executes chapters with no results)
    replbook scoreboard            # only regenerate the scoreboard files
    replbook annotate --preset book  # write chapter 02's rationales (committed data)
    replbook dryrun 08 [--layers 1|full]  # the paper preset on its models built from their configs (random weights)
    replbook resources [08]        # what a paper preset needs: memory, disk, time (computed from the configs)
    replbook resources --against-dry-runs  # each card beside its recorded dry run's measured memory
"""
from __future__ import annotations

import argparse
import ast
import sys

from .config import PRESETS
from .paths import repo_root
from .runner import RunFailed, build, run, write_scoreboard

def parse_parameters(pairs: list) -> dict:
    """``-p`` arguments -> dict. Each is ``"name=value"``, or ``["name", "value"]`` (the
    ``-p name value`` form), or a list of ``name=value`` words; values are Python literals
    where they parse, else strings."""
    out = {}
    for item in pairs:
        words = [item] if isinstance(item, str) else list(item)
        if len(words) == 2 and "=" not in words[0]:
            words = [f"{words[0]}={words[1]}"]
        for pair in words:
            if "=" not in pair:
                raise ValueError(f"parameter {pair!r} must look like name=value (or: -p name value)")
            key, raw = pair.split("=", 1)
            try:
                out[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                out[key] = raw
    return out


def _terminate_as_interrupt(signum, frame):  # SIGTERM cleans up like Ctrl-C: staging folders go
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    import signal

    parser = argparse.ArgumentParser(prog="replbook", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="execute one chapter with papermill")
    p_run.add_argument("chapter", help="chapter number, e.g. 00 (or 0)")
    p_run.add_argument("--preset", default="book", help=f"one of {', '.join(PRESETS)}")
    p_run.add_argument("-p", "--parameter", action="append", nargs="+", default=[], metavar="NAME=VALUE",
                       help="override a parameter: -p name=value or -p name value")
    p_run.add_argument("--publish", action="store_true",
                       help="publish to notebooks/ and results/ even with -p overrides (book or paper preset)")
    p_prep = sub.add_parser("prepare", help="build the models and data the chapters read once, before any notebook")
    p_prep.add_argument("chapters", nargs="*", help="chapter numbers (default: all)")
    p_prep.add_argument("--preset", default="book", help=f"one of {', '.join(PRESETS)}")
    p_stab = sub.add_parser("stability", help="rerun a chapter at the book preset over seeds, record its verdicts, "
                                                   "then publish the committed seed's run (which shows the record)")
    p_stab.add_argument("chapter", help="chapter number, e.g. 06")
    p_stab.add_argument("--seeds", type=int, default=3, help="how many seeds (the committed one included)")
    p_stab.add_argument("--carry-forward", action="store_true",
                        help="after a change that should move no number: rerun the committed seed only and keep the "
                             "record if that run passes the regression guard against the one it was made with (nothing "
                             "to do while the record is current: `replbook run NN` republishes a chapter)")
    p_ref = sub.add_parser("reference", help="rerun a chapter at the book preset on a machine of another numerics "
                                                 "family than its published results and record that family's numbers "
                                                 "(results/reference/<family>/), which the guard then holds such machines to")
    p_ref.add_argument("chapter", help="chapter number, e.g. 05")
    p_ref.add_argument("--cpu-model", action="store_true",
                       help="record the numbers of this machine's CPU model, which differ from its family's "
                            "(results/reference/<family>@f<family>m<model>/); allowed on the published family too")
    p_build = sub.add_parser("build", help="regenerate the scoreboard and build the site")
    p_build.add_argument("--no-execute", action="store_true", help="do not execute chapters lacking results")
    sub.add_parser("scoreboard", help="regenerate the scoreboard files only")
    p_dry = sub.add_parser("dryrun", help="run a chapter's paper preset on its paper models built from their public "
                                               "configs (random weights, full width, --layers deep), served from a "
                                               "local hub cache; outputs under runs/dryrun/, never results/")
    p_dry.add_argument("chapter", help="chapter number, e.g. 08")
    p_dry.add_argument("--layers", default="1",
                       help="transformer layers of every model (default 1), or full: each model at its own depth")
    p_res = sub.add_parser("resources", help="print what each chapter's paper preset needs (memory, disk, time), "
                                             "computed from the paper models' configs")
    p_res.add_argument("chapters", nargs="*", help="chapter numbers (default: the table of all)")
    p_res.add_argument("--write-page", action="store_true", help="rewrite the table in book/how-to-run.md")
    p_res.add_argument("--against-dry-runs", action="store_true",
                       help="set each card beside the memory its recorded CPU dry run measured")
    p_res.add_argument("--spread", metavar="MODEL", help="plan device_map='auto' for a model over --gpus GPUs")
    p_res.add_argument("--gpus", type=int, default=1, help="GPUs for --spread (default 1)")
    p_res.add_argument("--gpu-gb", type=float, default=80.0, help="memory per GPU for --spread (default 80)")
    p_res.add_argument("--cpu-gb", type=float, default=0.0, help="host memory --spread may use (default 0)")
    p_annotate = sub.add_parser("annotate", help="write chapter 02's skill rationales (once; ~6 min on 2 cores)")
    p_annotate.add_argument("--preset", default="book", help="one of smoke, book, paper")
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    # a job started in the background (`cmd &`) inherits SIGINT ignored, and a run then ignored
    # kill -INT, finished and published (a backgrounded `make test` here; CI failed the same way)
    previous_interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupted = False
    try:
        if args.command == "run":
            if args.publish and args.preset == "smoke":
                raise ValueError("--publish: smoke runs are never published; use --preset book or paper")
            executed = run(args.chapter, args.preset, parse_parameters(args.parameter),
                           publish=True if args.publish else None, prepare_first=True)
            print(executed)
            if executed.parent == repo_root() / "notebooks":  # published: the README's scoreboard follows
                write_scoreboard(repo_root())
        elif args.command == "prepare":
            from . import prepare

            if args.preset not in PRESETS:
                raise ValueError(f"--preset={args.preset!r} is not valid; choose one of: {', '.join(PRESETS)}")
            print(prepare.summary(prepare.prepare(args.chapters or None, args.preset)))
        elif args.command == "stability":
            from . import stability

            if args.carry_forward:
                print(stability.carry_forward(args.chapter))
            else:
                print(stability.run(args.chapter, args.seeds))
            write_scoreboard(repo_root())  # the committed seed's run was published
        elif args.command == "reference":
            from .runner import record_reference

            print(record_reference(args.chapter, cpu_model=args.cpu_model))
        elif args.command == "build":
            build(execute_missing=not args.no_execute)
        elif args.command == "dryrun":
            from . import dryrun

            layers = None if args.layers == "full" else int(args.layers) if args.layers.isdigit() else 0
            if layers is not None and layers < 1:
                raise ValueError(f"--layers={args.layers}: at least 1, or full (each model at its own depth)")
            print(dryrun.record(dryrun.run(args.chapter, layers)))
        elif args.command == "resources":
            from . import resources
            from .paths import notebook_for

            if args.spread:
                plan = resources.device_plan(args.spread, args.gpus, args.gpu_gb, cpu_gb=args.cpu_gb)
                print("\n".join(f"{device:>8}  {gb:8.1f} GB" for device, gb in plan.items()))
            elif args.against_dry_runs:
                print(resources.against_dry_runs_table())
            elif args.write_page:
                changed = resources.update_page(repo_root() / "book" / "how-to-run.md")
                print("book/how-to-run.md " + ("updated" if changed else "already current"))
            elif args.chapters:
                print("\n\n".join(resources.describe(notebook_for(c, repo_root()).stem) for c in args.chapters))
            else:
                print(resources.table())
        elif args.command == "annotate":
            from . import config, skillslices

            print(skillslices.annotate(config.resolve(skillslices.PRESETS, args.preset)))
        else:
            write_scoreboard(repo_root())
    except ValueError as err:
        print(f"replbook: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"replbook: {err}", file=sys.stderr)  # the one line first, then the traceback
        if err.traceback:
            print(err.traceback, file=sys.stderr)
        return 1
    except RuntimeError as err:
        print(f"replbook: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # the run has cleaned up; a late SIGINT must not turn exit 130 into a death by signal
        # (the command line also exits through exit_after_interrupt: see there)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        interrupted = True
        print("replbook: interrupted; nothing was published", file=sys.stderr)
        return INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not interrupted:
            signal.signal(signal.SIGINT, previous_interrupt)
    return 0


INTERRUPTED = 130  # the shell's code for a command stopped by SIGINT (128 + 2)


def exit_after_interrupt() -> None:
    """Leave the process with status 130 whatever its exit handlers do with signals.

    Why not ``sys.exit(130)``: twice in CI (not once in 31 tries by hand under load) a run
    stopped by SIGTERM just after its kernel started printed its one line, returned 130 and
    yet the process died by SIGINT (status −2), so the parent could not tell an interrupted
    run from a killed one. The cause is not pinned down; what is known is that interpreter
    shutdown still has work left by the interrupted run (nbclient registers an exit
    handler that shuts the kernel down on the event loop, asyncio puts SIGINT back to
    ``default_int_handler`` when it removes its handlers, and CPython exits by SIGINT when
    a KeyboardInterrupt escapes). So the exit handlers run here with both signals
    ignored, their errors printed and dropped, and the process leaves with ``os._exit``:
    no later step of shutdown can change the status."""
    import atexit
    import os
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    try:
        atexit._run_exitfuncs()  # the kernel's shutdown among them; errors are printed, not raised
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe must not change the status either
                pass
        os._exit(INTERRUPTED)


def entry() -> None:
    """The ``replbook`` command (and ``python -m replbook.cli``)."""
    status = main()
    if status == INTERRUPTED:
        exit_after_interrupt()
    sys.exit(status)


if __name__ == "__main__":
    entry()
