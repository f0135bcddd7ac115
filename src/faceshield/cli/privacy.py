"""``faceshield anonymize``, ``hide``, ``recover`` and ``evaluate-anonymization``: Diff-Privacy's commands
(registered in :mod:`faceshield.cli.main`).

Batches follow ``protect``'s rules (:func:`faceshield.jobs.plan_jobs`): distinct output names, inputs never
overwritten, resume through the run log (same input bytes and settings, output intact), atomic writes, metadata
stripped, a bad photo reported while the batch goes on. The passphrase of a key comes from ``--passphrase-file``,
the environment variable ``FACESHIELD_PASSPHRASE`` or a hidden prompt; ``--passphrase`` exists but lands in the
shell history.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import click

from faceshield.errors import FaceshieldError, InputError

log = logging.getLogger(__name__)

PASS_ENV = "FACESHIELD_PASSPHRASE"
KEY_SUFFIX = ".fskey"


def _config(diffusion_model, clip_model, fr_models, preset, settings, device, **extra):
    from faceshield.methods.diff_privacy import PRESETS, DiffPrivacyConfig
    from faceshield.settings import parse_overrides

    values = dict(PRESETS[preset])
    values.update(parse_overrides(DiffPrivacyConfig, settings) if settings else {})
    values.update({k: v for k, v in extra.items() if v is not None})
    if diffusion_model:
        values["diffusion_model"] = diffusion_model
    if clip_model:
        values["clip_model"] = clip_model
    if fr_models:
        values["fr_models"] = tuple(m.strip() for m in fr_models.split(",") if m.strip())
    values["device"] = device
    return DiffPrivacyConfig(**values)  # checked (SettingError) before any model loads


def _passphrase(passphrase: str | None, passphrase_file: Path | None, confirm: bool) -> str:
    if passphrase_file is not None:
        try:
            text = passphrase_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise InputError(f"{passphrase_file}: cannot read the passphrase file ({exc.strerror})") from None
    elif passphrase is not None:
        text = passphrase
    elif os.environ.get(PASS_ENV):
        text = os.environ[PASS_ENV]
    else:
        text = click.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm)
    if not text:
        raise InputError("the passphrase is empty; give one with --passphrase-file, $FACESHIELD_PASSPHRASE or the prompt")
    return text


def _settings_sha(config, extra: dict) -> str:
    data = {**dataclasses.asdict(config), **{k: v for k, v in extra.items() if not callable(v)}}
    data.pop("device", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _resumable(record: dict | None, job, settings_sha: str, outputs: list[Path]) -> bool:
    from faceshield.fileio import sha256_file

    if not record or record.get("status") != "done" or record.get("settings_sha256") != settings_sha:
        return False
    if record.get("input_sha256") != sha256_file(job.photo):
        return False
    digests = record.get("outputs_sha256", {})
    return all(p.is_file() and digests.get(str(p.resolve())) == sha256_file(p) for p in outputs)


def _written_by_us(job, path: Path) -> bool:
    """``path`` (a variant or key beside the main output) is recorded in a run log as written from ``job.photo``
    (read again here: with ``--overwrite`` the plan keeps no records, yet our own earlier files may be replaced)."""
    from faceshield.jobs import LOG_NAME, read_log

    resolved, photo = str(path.resolve()), job.photo.resolve()
    return any(resolved in r.get("outputs_sha256", {}) and Path(r["input"]).resolve() == photo
               for log_file in {job.log, job.photo.parent / LOG_NAME} for r in read_log(log_file))


def _faces(detector, rgb, photo: Path):
    import torch

    from faceshield.errors import NoFaceError
    from faceshield.faces.detect import detect_faces, landmark_tensor

    faces = detect_faces(rgb, detector)
    if not faces:
        raise NoFaceError(f"{photo}: no face found; nothing to do")
    return landmark_tensor(faces).to(torch.float32)


def _run(kind: str, inputs, output, log_path, overwrite, detector_name, config, extra: dict, work, quiet: bool):
    """Plan (outputs named ``<photo>_<kind>``), then for each job ``work(job, loaded, image, landmarks, save_image,
    progress) -> (written paths, info)`` and log; returns the records. Progress bars (stderr) unless ``quiet``."""
    from tqdm import tqdm

    from faceshield.faces.detect import create_detector
    from faceshield.fileio import sha256_file
    from faceshield.images import load_image, save_image, to_tensor
    from faceshield.jobs import append_record, plan_jobs

    plan = plan_jobs(list(inputs), output, log_path, overwrite, suffix=f"_{kind}")
    settings_sha = _settings_sha(config, extra)
    detector = None
    records = []
    bar = tqdm(total=len(plan.jobs), desc="photos", unit="photo", disable=quiet, position=0)
    steps = tqdm(total=0, unit="step", disable=quiet, position=1, leave=False)

    def progress(stage: str, step: int, total: int) -> None:  # MSI training steps, then sampling steps, per face
        if steps.disable:
            return
        if steps.desc != f"  {stage}":
            steps.set_description_str(f"  {stage}", refresh=False)
            steps.reset(total)
        steps.n = step
        steps.refresh()

    for job in plan.jobs:
        start = time.perf_counter()
        bar.set_postfix_str(job.photo.name[-30:])
        record = {"input": str(job.photo), "command": kind, "settings_sha256": settings_sha,
                  "input_resolved": str(job.photo.resolve())}
        expected = extra.get("outputs_of", lambda out: [out])(job.out)
        if _resumable(plan.earlier_record(job), job, settings_sha, expected):
            records.append({**plan.earlier_record(job), "resumed": True})
            bar.update()
            continue
        try:
            foreign = [p for p in expected if p != job.out and (p.exists() or p.is_symlink())
                       and not _written_by_us(job, p)]
            if foreign:
                raise InputError(f"{foreign[0]}: exists and was not written by faceshield from {job.photo}; move it "
                                 f"or choose another output folder (-o); nothing was written for this photo")
            detector = detector or create_detector(detector_name)
            loaded = load_image(job.photo)
            image = to_tensor(loaded.rgb)
            landmarks = _faces(detector, loaded.rgb, job.photo)
            written, info = work(job, loaded, image, landmarks, save_image, progress)
            record.update(status="done", output=str(job.out), output_resolved=str(job.out.resolve()),
                          outputs=[str(p) for p in written], input_sha256=sha256_file(job.photo),
                          output_sha256=sha256_file(job.out),
                          outputs_sha256={str(p.resolve()): sha256_file(p) for p in written}, **info)
        except FaceshieldError as exc:
            record.update(status="failed", output=None, error=" ".join(str(exc).split()))
            log.warning("%s", record["error"])
        record["seconds"] = round(time.perf_counter() - start, 3)
        if record["status"] == "done":
            append_record(job.log, record)
        records.append(record)
        bar.update()
    steps.close()
    bar.close()
    return records


def _summary(records: list[dict], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"photos": records}, indent=2, default=str))
        return
    for r in records:
        if r.get("status") == "done":
            note = " (resumed)" if r.get("resumed") else ""
            click.echo(f"OK   {r['input']} → {', '.join(r.get('outputs', [r.get('output')]))}{note}")
        else:
            click.echo(f"FAIL {r['error']}")


def _common(f):
    options = [
        click.option("-o", "--output", type=click.Path(path_type=Path),
                     help="Output folder (default: beside each photo)."),
        click.option("--diffusion-model", metavar="HUB_ID|FOLDER", help="Stable Diffusion 1.x (default: SD v1.4)."),
        click.option("--clip-model", metavar="HUB_ID|FOLDER", help="CLIP vision tower of the MSI (default: "
                     "openai/clip-vit-large-patch14)."),
        click.option("--fr-models", help="Comma-separated FR models of the energy (default: calibrated, AUC ≥ 0.9)."),
        click.option("--preset", type=click.Choice(["paper", "fast"]), default="paper",
                     help="paper: 6100 MSI steps per face; fast: 600."),
        click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Any Diff-Privacy setting, e.g. "
                     "--set msi_steps=200 (see docs/diff-privacy.md)."),
        click.option("--device", default="cpu", help="cpu, cuda, cuda:1…"),
        click.option("--detector", default="retinaface", help="Face detector."),
        click.option("--log", "log_path", type=click.Path(path_type=Path), help="JSON-lines run log."),
        click.option("--overwrite", is_flag=True, help="Redo photos an earlier run finished."),
        click.option("--quiet", is_flag=True, help="No progress bars (photos; MSI training and sampling steps)."),
        click.option("--json", "as_json", is_flag=True, help="Print every photo's record as one JSON document."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _method(config):
    from faceshield.methods.diff_privacy import DiffPrivacy

    return DiffPrivacy(config)


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--variants", type=click.IntRange(1, 64), default=4, help="Anonymized versions per photo.")
@click.option("--strength", type=click.FloatRange(0, 1, min_open=True), default=0.6,
              help="Share of the 50 DDIM steps run from the noised photo (more = further from the original).")
@_common
def anonymize(inputs, variants, strength, output, diffusion_model, clip_model, fr_models, preset, settings, device,
              detector, log_path, overwrite, quiet, as_json):
    """Replace every face with an identity that does not exist (pose, expression, background kept)."""
    from faceshield.images import to_uint8

    config = _config(diffusion_model, clip_model, fr_models, preset, settings, device, variants=variants,
                     anonymize_strength=strength)
    method = _method(config)

    def names(out: Path) -> list[Path]:
        return [out] + [out.with_name(f"{out.stem}_v{k + 1}{out.suffix}") for k in range(1, variants)]

    def work(job, loaded, image, landmarks, save_image, progress):
        photos, info = method.anonymize(image.to(method.model.device), landmarks, progress=progress)
        paths = names(job.out)
        for path, photo in zip(paths, photos):
            save_image(path, to_uint8(photo.cpu()), loaded.alpha)
        return paths, {k: v for k, v in info.items() if k != "energy"}

    records = _run("anonymized", inputs, output, log_path, overwrite, detector, config, {"outputs_of": names}, work,
                   quiet or as_json)
    _summary(records, as_json)


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--key-out", type=click.Path(path_type=Path), help=f"Key file (one photo) or folder (several); default: "
              f"beside each hidden photo, <name>{KEY_SUFFIX}.")
@click.option("--passphrase-file", type=click.Path(path_type=Path, dir_okay=False), help="Read the passphrase from "
              "this file (first line).")
@click.option("--passphrase", help=f"The passphrase itself (lands in the shell history: prefer --passphrase-file, "
              f"${PASS_ENV} or the prompt).")
@click.option("--fp16-key", is_flag=True, help="Store the key's tensors as float16 (half the size).")
@_common
def hide(inputs, key_out, passphrase_file, passphrase, fp16_key, output, diffusion_model, clip_model, fr_models,
         preset, settings, device, detector, log_path, overwrite, quiet, as_json):
    """Make every face unrecognisable to people while FR still matches it; write the photo and an encrypted key."""
    from faceshield.fileio import write_bytes_atomic
    from faceshield.images import load_image, to_uint8
    from faceshield.methods.recovery_key import encrypt_key, pixels_sha256

    config = _config(diffusion_model, clip_model, fr_models, preset, settings, device)
    secret = _passphrase(passphrase, passphrase_file, confirm=True)
    several = len(inputs) > 1 or any(Path(i).is_dir() for i in inputs)
    if key_out is not None and several and key_out.exists() and not key_out.is_dir():
        raise InputError(f"{key_out}: several photos need a folder for --key-out, one key per photo")

    def key_of(out: Path) -> Path:
        if key_out is None:
            return out.with_name(out.name + KEY_SUFFIX)
        return key_out / (out.name + KEY_SUFFIX) if several or key_out.is_dir() else key_out

    method = _method(config)

    def work(job, loaded, image, landmarks, save_image, progress):
        published, key, info = method.hide(image.to(method.model.device), landmarks, progress=progress)
        save_image(job.out, to_uint8(published.cpu()), loaded.alpha)
        key.meta["published_sha256"] = pixels_sha256(load_image(job.out).rgb)  # the file as written
        blob = encrypt_key(key, secret, half=fp16_key)
        path = key_of(job.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, blob)
        return [job.out, path], {"key": str(path), "key_bytes": len(blob), **{k: v for k, v in info.items()
                                                                              if k != "energy"}}

    records = _run("hidden", inputs, output, log_path, overwrite, detector, config,
                   {"outputs_of": lambda out: [out, key_of(out)], "fp16_key": fp16_key}, work, quiet or as_json)
    _summary(records, as_json)


def recover_file(hidden: Path, key_path: Path, out: Path, secret: str, diffusion_model: str | None = None,
                 device: str = "cpu", model=None) -> dict:
    """Recover ``hidden`` with the key at ``key_path`` into the new file ``out``; checks everything before writing.

    Raises:
        KeyFileError: wrong passphrase, altered key, key of another photo (nothing written).
    """
    import torch

    from faceshield.fileio import check_output_file
    from faceshield.images import load_image, save_image, to_tensor, to_uint8
    from faceshield.methods.diff_privacy import DiffPrivacy, DiffPrivacyConfig, check_key_model
    from faceshield.methods.recovery_key import KeyFileError, decrypt_key, pixels_sha256

    start = time.perf_counter()
    check_output_file(out, [hidden, key_path], "-o")
    try:
        data = key_path.read_bytes()
    except OSError as exc:
        raise InputError(f"{key_path}: cannot read the key ({exc.strerror})") from None
    key = decrypt_key(data, secret, key_path)
    loaded = load_image(hidden)
    if pixels_sha256(loaded.rgb) != key.meta.get("published_sha256"):
        raise KeyFileError(f"{key_path} is the key of another photo (or {hidden} was edited after hiding); "
                           f"nothing was written")
    config = DiffPrivacyConfig(diffusion_model=diffusion_model or key.meta["diffusion_model"], device=device,
                               image_size=key.meta["image_size"], mask_scale=key.meta["mask_scale"])
    method = DiffPrivacy(config, model=model, clip=None, ensemble=None)
    check_key_model(key, method.model)
    with torch.no_grad():
        recovered, info = method.recover(to_tensor(loaded.rgb, method.model.device), key)
    save_image(out, to_uint8(recovered.cpu()), loaded.alpha)
    return {"input": str(hidden), "key": str(key_path), "output": str(out), **info,
            "seconds": round(time.perf_counter() - start, 3)}


@click.command()
@click.argument("hidden", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--key", "key_path", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="The key file written by `faceshield hide`.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), help="The recovered photo, a new file "
              "(default: <hidden>_recovered.<ext> beside it).")
@click.option("--passphrase-file", type=click.Path(path_type=Path, dir_okay=False), help="Read the passphrase from "
              "this file (first line).")
@click.option("--passphrase", help=f"The passphrase itself (lands in the shell history; prefer ${PASS_ENV}).")
@click.option("--diffusion-model", metavar="HUB_ID|FOLDER", help="Where the key's model is, if not under its id.")
@click.option("--device", default="cpu", help="cpu, cuda…")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
def recover(hidden, key_path, out, passphrase_file, passphrase, diffusion_model, device, as_json):
    """Regenerate the original faces of a hidden photo from its key (nothing is written unless everything checks)."""
    from faceshield.jobs import default_output

    secret = _passphrase(passphrase, passphrase_file, confirm=False)
    out = out or default_output(hidden, None, None, suffix="_recovered")
    record = recover_file(hidden, key_path, out, secret, diffusion_model, device)
    click.echo(json.dumps(record, indent=2) if as_json else f"OK   {hidden} → {out}")


@click.command("evaluate-anonymization")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False), default="faceshield-anonymization",
              help="Folder for report.json and report.html.")
@click.option("--variants", type=click.IntRange(1, 64), default=4, help="Anonymized versions per photo.")
@click.option("--judges", default="", help="Comma-separated models of the independent judge (default: its own).")
@click.option("--no-hide", is_flag=True, help="Skip the hiding/recovery measurements.")
@click.option("--diffusion-model", metavar="HUB_ID|FOLDER", help="Stable Diffusion 1.x.")
@click.option("--clip-model", metavar="HUB_ID|FOLDER", help="CLIP vision tower.")
@click.option("--fr-models", help="Comma-separated FR models of the energy.")
@click.option("--preset", type=click.Choice(["paper", "fast"]), default="paper", help="MSI training length.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Any Diff-Privacy setting.")
@click.option("--device", default="cpu", help="cpu, cuda…")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def evaluate_anonymization(inputs, output, variants, judges, no_hide, diffusion_model, clip_model, fr_models, preset,
                           settings, device, as_json):
    """Measure anonymization (PSR, diversity, background, expression, pose) and hiding/recovery; JSON + HTML."""
    from faceshield.eval.anonymization import evaluate, write_report
    from faceshield.fileio import check_writable_folder
    from faceshield.images import scan_folder

    check_writable_folder(output, "output folder (-o)")
    config = _config(diffusion_model, clip_model, fr_models, preset, settings, device, variants=variants)
    photos: list[Path] = []
    for item in map(Path, inputs):
        photos.extend(scan_folder(item)[0] if item.is_dir() else [item])
    result = evaluate(photos, config, judge_models=tuple(j.strip() for j in judges.split(",") if j.strip()),
                      hide=not no_hide)
    json_path, html_path = write_report(result, output)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    s = result["summary"]
    click.echo(f"report: {html_path}  (data: {json_path})\n" + "  ".join(f"{k} {v:.3f}" if isinstance(v, float)
                                                                         else f"{k} {v}" for k, v in s.items()))
