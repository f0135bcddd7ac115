"""From what the user named to a list of jobs ``photo → output``, checked before any work, and the run log.

Rules (each one a promise of ``faceshield protect``):

- every photo gets its own output: two inputs that would map to the same name (``A/x.png`` and ``B/x.png`` into
  one ``-o`` folder), a name that is itself an input, or a file faceshield did not write get ``x_protected-2.png``
  and so on, in input order (stable across re-runs);
- files named on the command line must exist and be of a supported type, or the run stops before any work with
  one line naming them; inside folders, other files are listed at the end instead;
- our own earlier outputs are recognised by the run log, never by their name: a user's ``jane_protected.png``
  is a photo like any other;
- every output folder and the log are checked for writability before any work.

The run log is JSON lines, one record per photo and run, written beside the outputs (``faceshield-log.jsonl`` in
the ``-o`` folder, or in each output's folder) unless placed elsewhere. A re-run reuses an output only if the
log says it was made from the same input bytes with the same settings and the file still has the bytes it had.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from faceshield.errors import InputError
from faceshield.fileio import check_writable_folder
from faceshield.images import UNSUPPORTED_HINT, is_supported, scan_folder

log = logging.getLogger(__name__)

SUFFIX = "_protected"
LOG_NAME = "faceshield-log.jsonl"


@dataclass
class Job:
    """One photo to protect and where its output goes."""

    photo: Path
    out: Path
    log: Path


@dataclass
class Plan:
    """Everything a run will do, decided before any work.

    Attributes:
        out_dir: the output folder, or None when outputs go beside each photo.
        jobs: one per photo, in input order.
        unsupported: files inside input folders that are not photos faceshield reads.
        earlier_outputs: files inside input folders that the run log records as faceshield outputs (not redone).
        logs: the records of earlier runs, by resolved output path (the latest record wins).
    """

    out_dir: Path | None = None
    jobs: list[Job] = field(default_factory=list)
    unsupported: list[Path] = field(default_factory=list)
    earlier_outputs: list[Path] = field(default_factory=list)
    logs: dict[Path, dict] = field(default_factory=dict)

    def earlier_record(self, job: Job) -> dict | None:
        return self.logs.get(job.out.resolve())


def default_output(photo: Path, root: Path | None, out_dir: Path | None, suffix: str = SUFFIX) -> Path:
    """``<name><suffix>.<ext>`` (``_protected``) beside the photo, or under ``out_dir`` keeping the path relative to
    ``root``."""
    name = f"{photo.stem}{suffix}{photo.suffix}"
    if out_dir is None:
        return photo.with_name(name)
    relative = photo.parent.relative_to(root) if root is not None else Path()
    return out_dir / relative / name


def read_log(path: Path) -> list[dict]:
    """The records of a JSON-lines run log; unreadable lines (a run killed mid-write) are ignored."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("output"), str):
            # paths as the user gave them, and resolved (a later run may start in another folder)
            record["output"] = record.get("output_resolved") or record["output"]
            record["input"] = record.get("input_resolved") or record["input"]
            records.append(record)
    return records


def check_log_path(path: Path) -> None:
    if path.is_dir():
        raise InputError(f"{path}: is a folder; --log needs a file path, e.g. {path / LOG_NAME}")
    check_writable_folder(path.parent, "log location (--log)")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{path}: the log file is not writable; choose another --log")


def plan_jobs(inputs: list[str | Path], out_dir: str | Path | None = None, log_path: str | Path | None = None,
              overwrite: bool = False, suffix: str = SUFFIX) -> Plan:
    """Decide every job of a run and check that it can be done, before any work.

    Args:
        inputs: photos and folders (searched recursively), in the user's order.
        out_dir: output folder (relative structure of folder inputs kept), or None for beside each photo.
        log_path: one run log for the whole run, or None for the default beside the outputs.
        overwrite: never reuse an earlier output (the plan's ``logs`` stay empty); earlier outputs of the same
            photos are replaced, files faceshield did not write still never are.
        suffix: appended to each output's stem (``_protected``; other commands name theirs, e.g. ``_anonymized``).

    Raises:
        InputError: an empty, missing or unsupported input named by the user; an output folder or log that
            cannot be written. One line naming every offending path and the fix.
    """
    out_dir = None if out_dir is None else Path(out_dir)
    log_path = None if log_path is None else Path(log_path)
    named: list[tuple[Path, Path | None]] = []  # (photo, root folder or None)
    unsupported: list[Path] = []
    problems: list[str] = []
    for raw in inputs:
        if str(raw).strip() == "":
            raise InputError("an input is an empty path; name a photo or a folder")
        item = Path(raw)
        if item.is_dir():
            photos, others = scan_folder(item)
            named.extend((p, item) for p in photos)
            unsupported.extend(p for p in others if p.name != LOG_NAME)
        elif not item.exists():
            problems.append(f"{item}: no such file; check the path")
        elif not is_supported(item):
            problems.append(f"{item}: unsupported type '{item.suffix or 'no suffix'}' ({UNSUPPORTED_HINT})")
        else:
            named.append((item, None))
    if problems:
        raise InputError("; ".join(problems) + "; nothing was done")
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: is a file, not a folder; choose another output folder (-o)")

    def log_for(out: Path) -> Path:
        if log_path is not None:
            return log_path
        return (out_dir if out_dir is not None else out.parent) / LOG_NAME

    desired = [(photo, root, default_output(photo, root, out_dir, suffix)) for photo, root in named]
    # the records of every log this run writes to, and of the logs beside every input photo (earlier runs
    # without -o wrote their outputs, and logs, there)
    log_files = {log_for(out) for _, _, out in desired} | {photo.parent / LOG_NAME for photo, _ in named}
    records: dict[Path, dict] = {}
    for path in sorted(log_files):
        for record in read_log(path):
            records[Path(record["output"]).resolve()] = record
    ours = {path for path, r in records.items() if r.get("output_sha256")}

    plan = Plan(out_dir, unsupported=unsupported, logs=records)
    # found in a folder and written by an earlier run: our output, not a user's photo
    plan.earlier_outputs = [photo for photo, root, _ in desired if root is not None and photo.resolve() in ours]
    desired = [d for d in desired if d[0] not in plan.earlier_outputs]
    inputs_resolved = {photo.resolve() for photo, _, _ in desired}
    taken: set[Path] = set()
    for photo, root, out in desired:
        candidate, n = out, 1
        while not _free_for(candidate, photo, records, taken | inputs_resolved):
            n += 1
            candidate = out.with_name(f"{out.stem}-{n}{out.suffix}")
        taken.add(candidate.resolve())
        plan.jobs.append(Job(photo, candidate, log_for(candidate)))
    if overwrite:
        plan.logs = {}
    for folder in sorted({job.out.parent for job in plan.jobs}):
        check_writable_folder(folder, "output folder (-o)")
    for path in sorted({job.log for job in plan.jobs}):
        check_log_path(path)
    return plan


def _free_for(candidate: Path, photo: Path, records: dict[Path, dict], taken: set[Path]) -> bool:
    """``candidate`` may receive ``photo``'s output: nobody else's output in this run, not an input, and either no
    file yet or an output that faceshield wrote earlier from this same photo (so replacing it loses nothing)."""
    resolved = candidate.resolve()
    if resolved in taken:
        return False
    if not candidate.exists() and not candidate.is_symlink():
        return True
    record = records.get(resolved)
    return bool(record and record.get("output_sha256") and Path(record["input"]).resolve() == photo.resolve())


def append_record(path: Path, record: dict) -> bool:
    """Append one record to a run log; False (and a warning) if it cannot be written."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        return True
    except OSError as exc:
        log.warning("%s: cannot append to the run log (%s); a re-run will redo this photo", path, exc.strerror)
        return False
