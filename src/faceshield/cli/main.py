"""The ``faceshield`` command line.

Every command prints a human summary, or with ``--json`` one JSON document on stdout (logs go to stderr).
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

import click

from faceshield.errors import FaceshieldError
from faceshield.settings import SettingError

log = logging.getLogger("faceshield")

DEFAULT_DETECTOR = "retinaface"


def _emit(as_json: bool, payload: dict, human: str) -> None:
    click.echo(json.dumps(payload, indent=2) if as_json else human)


class _Group(click.Group):
    """Every error ends as one line and an exit code, never a traceback: faceshield's own errors and bad options
    exit with 1 and 2 as usual, an unexpected exception (a bug) with 3 and a request to report it (-vv shows the
    traceback). With ``--json`` anywhere on the command line the error is one JSON document on stdout
    (``{"error": ..., "exit_code": ...}``), so that a caller always gets valid JSON."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        as_json = "--json" in argv
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except (click.ClickException, FaceshieldError) as error:
            exc = error if isinstance(error, click.ClickException) else click.ClickException(str(error))
            if isinstance(error, SettingError):
                exc.exit_code = 2  # a bad option value, like click's own usage errors
            if as_json:
                click.echo(json.dumps({"error": exc.format_message(), "exit_code": exc.exit_code}))
            else:
                exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - a bug: one line for the user, the traceback with -vv
            log.debug("unexpected error", exc_info=True)
            message = f"internal error ({type(exc).__name__}: {exc}); please report it with the output of -vv"
            if as_json:
                click.echo(json.dumps({"error": message, "exit_code": 3}))
            else:
                click.echo(f"Error: {message}", err=True)
            sys.exit(3)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="faceshield")
def cli(verbose: int) -> None:
    """Protect faces in photos from face recognition and from diffusion models, and measure how well it works."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# --- models ---------------------------------------------------------------------------------------------------
@cli.group()
def models() -> None:
    """List, download and check the model files."""


def _assets_of(names: tuple[str, ...], every: bool) -> list[str]:
    from faceshield.models.assets import list_assets
    from faceshield.models.registry import get_fr_config, list_fr_models

    if every:
        return [a.name for a in list_assets()]
    chosen = names or tuple(list_fr_models())
    files: list[str] = []
    for name in chosen:
        if name in list_fr_models(by_path=True):  # a by-path model's file: fetch() says how to supply it
            files.extend(get_fr_config(name).assets)
        else:
            files.append(name)
    return list(dict.fromkeys(files))


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_list(as_json: bool) -> None:
    """FR models of the zoo, and every model file with its source, licence and local status."""
    from faceshield.eval.calibration import shipped_table
    from faceshield.models.assets import list_assets, locate
    from faceshield.models.registry import get_fr_config, list_fr_models

    table = shipped_table()
    fr = []
    for name in list_fr_models(by_path=True):
        cfg = get_fr_config(name)
        cal = table.models.get(name)
        fr.append({
            "name": name, "input_size": cfg.input_size, "embedding_dim": cfg.embedding_dim,
            "channel_order": cfg.channel_order, "mean": cfg.mean, "std": cfg.std, "licence": cfg.licence,
            "source": cfg.source, "reference": cfg.reference, "assets": list(cfg.assets),
            "auc": cal.auc if cal else None, "weak": cal.weak if cal else None,
            "weights_by_path": cfg.weights_asset is not None,
        })
    files, by_path = [], []
    for asset in list_assets(by_path=True):
        path = locate(asset.name)
        (by_path if asset.by_path else files).append({
            "name": asset.name, "sha256": asset.sha256, "size": asset.size, "licence": asset.licence,
            "sources": [s.describe() for s in asset.sources], "local": str(path) if path else None,
        })
    lines = ["FR models:"]
    for m in fr:
        auc = ("weights by path, uncalibrated" if m["weights_by_path"]
               else "research only (FACESHIELD_ALLOW_RESEARCH_MODELS=1)" if m["auc"] is None and "research" in m["licence"]
               else "uncalibrated" if m["auc"] is None else f"AUC {m['auc']:.3f}{' (weak)' if m['weak'] else ''}")
        lines.append(f"  {m['name']:<20} {m['input_size']}px {m['embedding_dim']}-D  {auc}  {m['licence']}")
    lines.append("Model files:")
    for f in files:
        lines.append(f"  {'ok  ' if f['local'] else 'miss'} {f['name']:<50} {f['size'] / 1e6:7.1f} MB  {f['licence']}")
    lines.append("Weights by path (you supply them: FACESHIELD_WEIGHTS=FOLDER=PATH, or the file under a mirror folder):")
    for f in by_path:
        lines.append(f"  {'ok  ' if f['local'] else 'path'} {f['name']:<50} unpinned  {f['licence']}; "
                     f"get it from {f['sources'][0]}")
    _emit(as_json, {"fr_models": fr, "files": files, "by_path_files": by_path}, "\n".join(lines))


@models.command("fetch")
@click.argument("names", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every model file, detectors included.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_fetch(names: tuple[str, ...], every: bool, as_json: bool) -> None:
    """Download and verify the files of NAMES (FR models or file names); default: every FR model and detector."""
    from faceshield.models.assets import fetch

    files = _assets_of(names, every)
    if not names and not every:  # the FR zoo plus the default detector
        files += [a for a in _assets_of((), True) if a.startswith("retinaface")]
    done = {name: str(fetch(name)) for name in dict.fromkeys(files)}
    _emit(as_json, {"fetched": done}, "\n".join(f"ok  {k} -> {v}" for k, v in done.items()))


@models.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_verify(as_json: bool) -> None:
    """Check the sha256 of every local model file (no download). Exit code 1 if a file is corrupt."""
    from faceshield.models.assets import cache_dir, list_assets, locate

    result = {}
    corrupt = []
    for asset in list_assets():
        path = locate(asset.name)
        cached = cache_dir() / asset.name
        if path:
            result[asset.name] = "ok"
        elif cached.exists():
            result[asset.name] = "corrupt"
            corrupt.append(asset.name)
        else:
            result[asset.name] = "missing"
    _emit(as_json, {"files": result}, "\n".join(f"{v:<8} {k}" for k, v in result.items()))
    if corrupt:
        raise SystemExit(1)


# --- detect ---------------------------------------------------------------------------------------------------
def _detect(path: Path, detector_name: str):
    from faceshield.faces.detect import create_detector, detect_faces
    from faceshield.images import load_image

    photo = load_image(path)
    return photo, detect_faces(photo.rgb, create_detector(detector_name))


def _draw_faces(rgb, faces, out: Path) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    from faceshield.images import save_image

    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    width = max(2, round(max(img.size) / 400))
    for face in faces:
        draw.rectangle(face.box, outline=(0, 255, 0), width=width)
        for x, y in face.landmarks:
            r = width * 1.5
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 0, 0))
        draw.text((face.box[0], max(0, face.box[1] - 12)), f"{face.score:.2f}", fill=(0, 255, 0))
    save_image(out, np.asarray(img))  # atomic, in the format of the name's suffix, no metadata


@cli.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--detector", default=DEFAULT_DETECTOR, help="Face detector.")
@click.option("--show", type=click.Path(), help="Write a copy with boxes and landmarks drawn to this new file "
              "(format from its suffix: .png, .jpg, ...); never the input itself.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def detect(image: Path, detector: str, show: str | None, as_json: bool) -> None:
    """Find the faces in IMAGE: scores, boxes and 5 landmarks."""
    from faceshield.fileio import check_output_file
    from faceshield.images import is_supported

    if show:
        show = check_output_file(show, [image], "--show")
        if not is_supported(show):
            raise click.BadParameter(f"{show}: unsupported suffix; use .png or .jpg", param_hint="--show")
    photo, faces = _detect(image, detector)
    records = [
        {"score": round(f.score, 4), "box": [round(v, 1) for v in f.box],
         "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in f.landmarks]}
        for f in faces
    ]
    if show:
        _draw_faces(photo.rgb, faces, show)
    lines = [f"{image}: {len(faces)} face(s)"] + [
        f"  #{i}: score {r['score']:.3f}, box {r['box']}" for i, r in enumerate(records)
    ]
    _emit(as_json, {"image": str(image), "width": photo.size[0], "height": photo.size[1], "faces": records},
          "\n".join(lines))


# --- verify ---------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("image1", type=click.Path(path_type=Path))
@click.argument("image2", type=click.Path(path_type=Path))
@click.option("--models", "model_names", default="default", help="Comma-separated FR models, 'default' (calibrated "
              "strong models) or 'all'.")
@click.option("--far", type=click.Choice(["0.01", "0.001"]), default="0.01", help="False-accept rate of the threshold.")
@click.option("--detector", default=DEFAULT_DETECTOR, help="Face detector.")
@click.option("--pipeline", type=click.Choice(["faceshield", "independent"]), default="faceshield", show_default=True,
              help="independent: detect and align as a system outside faceshield would (MTCNN, OpenCV bicubic), "
                   "with that pipeline's own thresholds.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify(image1: Path, image2: Path, model_names: str, far: str, detector: str, pipeline: str,
           as_json: bool) -> None:
    """Do IMAGE1 and IMAGE2 show the same person? Per-model cosine similarity and verdict, and a majority vote.

    Uses the most confident face of each photo; thresholds are the shipped calibration at the chosen FAR.
    """
    from faceshield.eval.verify import verify_photos

    report = verify_photos(image1, image2, model_names, float(far), detector, pipeline)
    lines = [f"{image1} vs {image2} (threshold at FAR {far}, {pipeline} pipeline):"]
    for name, r in report["models"].items():
        lines.append(f"  {name:<20} cosine {r['cosine']:+.3f}  threshold {r['threshold']:.3f}  "
                     f"{'same' if r['same'] else 'different'}")
    lines.append(f"verdict: {report['verdict']} ({report['votes_same']}/{len(report['models'])} models say same)")
    _emit(as_json, report, "\n".join(lines))


# --- calibrate ------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("pairs_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--models", "model_names", default="all", help="Comma-separated FR models or 'all'.")
@click.option("--limit", type=int, default=None, help="Use only the first N pairs (sorted by name).")
@click.option("--detector", default=None, help=f"Face detector (default: {DEFAULT_DETECTOR}; mtcnn for "
              "--pipeline independent).")
@click.option("--pipeline", type=click.Choice(["faceshield", "independent"]), default="faceshield", show_default=True,
              help="faceshield: our detector and differentiable alignment (what protection uses); independent: "
                   "the independent judge's MTCNN/dlib + OpenCV bicubic alignment (faceshield.eval.judge).")
@click.option("--output", type=click.Path(path_type=Path), help="Write the table as JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def calibrate(pairs_dir: Path, model_names: str, limit: int | None, detector: str | None, pipeline: str,
              output: Path | None, as_json: bool, quiet: bool) -> None:
    """ROC AUC, cosine thresholds at FAR 1e-2 / 1e-3 and TAR per FR model on PAIRS_DIR (train/N vs test/N).

    The package ships the tables made by:
    faceshield calibrate ../shared/data/celebahq-pairs --output src/faceshield/data/calibration.json
    faceshield calibrate ../shared/data/celebahq-pairs --pipeline independent
    --output src/faceshield/data/judge_calibration.json
    """
    from faceshield.eval.calibration import run_calibration
    from faceshield.eval.judge import calibrate_judge
    from faceshield.fileio import check_output_file

    if output:
        check_output_file(output, [], "--output")
    from faceshield.eval.verify import usable_fr_models

    names = usable_fr_models() if model_names == "all" else [m.strip() for m in model_names.split(",")]
    command = "faceshield calibrate " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    progress = not quiet and not as_json
    if pipeline == "independent":
        table = calibrate_judge(pairs_dir, names, detector or "mtcnn", limit, progress=progress, command=command)
    else:
        table = run_calibration(pairs_dir, names, detector or DEFAULT_DETECTOR, limit, progress=progress,
                                command=command)
    if output:
        table.save(output)
    _emit(as_json, json.loads(table.to_json()), table.markdown())


# --- protect --------------------------------------------------------------------------------------------------
def method_config(method: str, strength: str, surrogates: str | None, settings: tuple[str, ...],
                  diffusion_model: str | None = None):
    """The checked config of ``method`` from the command line's options (nothing loaded yet)."""
    from faceshield.methods.base import get_method_class, method_config as make_config
    from faceshield.settings import parse_overrides

    cls = get_method_class(method)
    overrides = parse_overrides(cls.Config, settings)
    if diffusion_model:
        if "diffusion_model" not in cls.Config.__dataclass_fields__:
            raise click.BadParameter(f"method {method!r} uses no diffusion model", param_hint="--diffusion-model")
        overrides["diffusion_model"] = diffusion_model
    if surrogates:
        names = [s.strip() for s in surrogates.split(",") if s.strip()]
        if names and all(n.startswith("-") for n in names):  # "-model,…": the default pool without those
            from faceshield.eval.calibration import shipped_table

            names = [m for m in shipped_table().surrogate_models() if f"-{m}" not in names]
        overrides["surrogates"] = tuple(names)
    return make_config(method, preset=strength if cls.presets else None, **overrides)


@cli.command()
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output folder (default: beside each photo, as <name>_protected.<ext>).")
@click.option("--set-of", "set_of", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Text file listing photos of one person (one path a line), protected with INPUTS as one set "
              "(set methods haa, aspl protect every photo of the run together).")
@click.option("--method", default="cloak", help="Protection method (`faceshield methods` lists them).")
@click.option("--strength", type=click.Choice(["low", "mid", "high"]), default="mid", help="Preset of cloak.")
@click.option("--target", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Impersonate the person in this photo instead of just hiding identity.")
@click.option("--surrogates", help="Comma-separated FR models to attack (default: calibrated models with AUC ≥ 0.9); "
              "-NAME,… = the default pool without those (e.g. -dlib-resnet to keep it as an unseen judge).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Override a method setting, e.g. "
              "--set epsilon=4/255 --set steps=60 (repeatable; `faceshield methods` shows them).")
@click.option("--diffusion-model", metavar="HUB_ID|FOLDER", help="Stable Diffusion model of the diffusion methods "
              "(e.g. adv-latent): a local diffusers folder or a hub id  [default: stabilityai/stable-diffusion-2-base].")
@click.option("--strict", is_flag=True, help="Exit with code 1 when any photo is only weakly protected, too.")
@click.option("--keep-metadata", is_flag=True, help="Keep EXIF/GPS and ICC data (stripped by default).")
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=95, help="Quality of JPEG outputs.")
@click.option("--overwrite", is_flag=True, help="Redo every photo, even those an earlier run finished with the "
              "same photo and settings.")
@click.option("--no-copy-unprotected", is_flag=True, help="With -o, do not copy photos without a face there "
              "(by default they are copied, metadata stripped, so that the output folder is complete).")
@click.option("--log", "log_path", type=click.Path(path_type=Path), help="JSON-lines log of every photo "
              "(default: faceshield-log.jsonl in the output folder, or beside each output).")
@click.option("--detector", default=DEFAULT_DETECTOR, help="Face detector.")
@click.option("--batch", "batch_size", type=click.IntRange(1), default=1, help="Photos protected together "
              "(faster per photo for adv-latent on a GPU).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS|auto|local]",
              help="Spread the photos over a Ray cluster: 'auto' (the cluster this machine is in; the default when "
              "--ray is given alone), HOST:PORT, or 'local' for a Ray instance on this machine. Inputs and outputs "
              "must be on a filesystem every node sees.")
@click.option("--ray-workers", type=click.IntRange(1), help="Ray workers (default: one per GPU, or per free CPU).")
@click.option("--gpus-per-worker", type=click.FloatRange(0, min_open=True), help="GPUs per Ray worker "
              "(default 1 where the cluster has GPUs).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print every photo's record as one JSON document.")
def protect(inputs, output, set_of, method, strength, target, surrogates, settings, diffusion_model, strict,
            keep_metadata, jpeg_quality, overwrite, no_copy_unprotected, log_path, detector, batch_size, ray_address,
            ray_workers, gpus_per_worker, quiet, as_json) -> None:
    """Protect the faces in INPUTS (photos or folders) from face recognition.

    Each photo ends protected (every attacked FR model fooled), weak (some model still recognises a face: the
    summary names it), no-face, or failed. Exit code 1 if any photo failed (or, with --strict, is weak); the
    others are still written.
    """
    from faceshield.faces.detect import create_detector
    from faceshield.jobs import plan_jobs
    from faceshield.methods.base import get_method_class
    from faceshield.protect import Protector, protect_paths

    config = method_config(method, strength, surrogates, settings, diffusion_model)  # checked before any work
    set_method = getattr(get_method_class(method), "set_method", False)
    if set_of:  # relative lines are relative to the list file
        inputs = tuple(inputs) + tuple(str(set_of.parent / line.strip()) for line in set_of.read_text().splitlines()
                                       if line.strip() and not line.lstrip().startswith("#"))
    if not inputs:
        raise click.UsageError("give photos or folders to protect (INPUTS), or --set-of LIST")
    if set_method and ray_address is not None:
        raise click.BadParameter(f"{method} protects all photos as one set on one machine", param_hint="--ray")
    plan = plan_jobs(list(inputs), output, log_path, overwrite)
    progress = not quiet and not as_json
    if ray_address is not None:  # the models live in the Ray workers; same plan, log, verdicts and resume
        from faceshield.distributed import protect_with_ray, surrogate_names

        run = protect_with_ray(plan, method, config=config, address=None if ray_address == "local" else ray_address,
                               workers=ray_workers, gpus_per_worker=gpus_per_worker, detector=detector,
                               target=target, keep_metadata=keep_metadata, jpeg_quality=jpeg_quality,
                               copy_no_face=not no_copy_unprotected, progress=progress, batch_size=batch_size)
        n_models = len(surrogate_names(config))
    else:
        built = get_method_class(method)(config)
        protector = Protector(built, create_detector(detector), target, keep_metadata, jpeg_quality)
        run = protect_paths(plan, protector, progress=progress, batch_size=batch_size,
                            copy_no_face=not no_copy_unprotected)
        n_models = len(built.ensemble.names)
    counts = run.counts()
    bad = counts["failed"] + (counts["weak"] if strict else 0)
    if as_json:
        click.echo(json.dumps({**run.to_dict(), "failed": counts["failed"]}, indent=2))
    else:
        summary = _protect_summary(run, n_models, strength if get_method_class(method).presets else None)
        if set_method:  # the FR sentence does not apply: the verdict is the budget, the harness measures the rest
            from faceshield.protect import SET_NOTE

            summary = "\n".join(line for line in summary.splitlines() if not line.startswith("'protected' means"))
            summary += f"\n{SET_NOTE}" if run.counts()["protected"] else ""
        click.echo(summary)
    if bad:
        raise SystemExit(1)


def _protect_summary(run, n_models: int, strength: str | None = None) -> str:
    advice = "try more steps (e.g. --set steps=120)" if strength == "high" else None
    lines = []
    for r in run.records:
        again = " (reused: same photo and settings as an earlier run)" if r.resumed else ""
        if r.status == "protected":
            sims = ", ".join(f"{m} {v['before'][0]:.2f}→{v['after'][0]:.2f}" for m, v in r.similarity.items())
            lines.append(f"ok    {r.input} -> {r.output} ({r.faces} face(s), {r.seconds:.1f} s; similarity {sims})"
                         f"{again}")
        elif r.status == "weak":
            why = "; ".join(f"face {i + 1}: " + ", ".join(f"{u['model']} {u['reason']}" for u in v["unfooled"])
                            for i, v in enumerate(r.verdicts) if v["unfooled"])
            lines.append(f"weak  {r.input} -> {r.output}: still recognised — {why}; {advice or r.note}{again}")
        elif r.status == "no-face":
            where = f"copied unchanged to {r.output}" if r.output else "left as it is"
            lines.append(f"none  {r.input}: no face found, nothing to protect; {where}{again}")
        else:
            lines.append(f"FAIL  {r.error}")
    counts = run.counts()
    summary = (f"{counts['protected']} protected, {counts['weak']} weak, {counts['no-face']} without a face, "
               f"{counts['failed']} failed")
    if counts["resumed"]:
        summary += f" ({counts['resumed']} reused from an earlier run)"
    lines.append(summary)
    if run.unsupported:
        shown = ", ".join(run.unsupported[:5]) + (", …" if len(run.unsupported) > 5 else "")
        lines.append(f"skipped: {len(run.unsupported)} file(s) of unsupported type: {shown} "
                     "(convert photos to JPEG or PNG to protect them)")
    if run.earlier_outputs:
        lines.append(f"not redone: {len(run.earlier_outputs)} earlier faceshield output(s) in the input folders")
    if counts["protected"] or counts["weak"]:
        models = f"{n_models} FR model{'s' if n_models > 1 else ''}"
        lines.append(f"'protected' means the {models} faceshield attacked no longer match; FR models it never saw "
                     "may still recognise you (see the README)")
    return "\n".join(lines)


@cli.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def methods_cmd(as_json: bool) -> None:
    """List the protection methods, their default settings and the values each setting allows."""
    from faceshield.methods.base import describe_methods

    info = describe_methods()
    lines = [f"{n:<12} {v['summary']}" for n, v in info.items()]
    _emit(as_json, info, "\n".join(lines))


# --- evaluate -------------------------------------------------------------------------------------------------
@cli.command()
@click.option("--methods", default="cloak@mid,pgd,tip-im", help="Comma-separated method specs; name@strength "
              "for cloak presets (e.g. cloak@low,cloak@mid,cloak@high).")
@click.option("--pairs", "pairs_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              default="../shared/data/celebahq-pairs", help="Folder of identity pairs train/N + test/N.")
@click.option("--targets", "targets_dir", type=click.Path(path_type=Path, file_okay=False),
              default="../shared/data/targets", help="Impersonation targets (target/, test/, pairs.csv); "
              "'none' to skip.")
@click.option("--n-pairs", type=int, default=100, help="Dodging pairs.")
@click.option("--n-per-target", type=int, default=25, help="Impersonation sources per target (0 = skip).")
@click.option("--judges", default="", help="Comma-separated held-out judge models (default: calibrated strong).")
@click.option("--surrogates", default="", help="Comma-separated surrogate pool, minus the judge each time "
              "(default: calibrated models with AUC ≥ 0.9).")
@click.option("--no-robustness", is_flag=True, help="Skip the JPEG / resize / blur measurements.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Method setting for every method "
              "that has it, e.g. --set steps=20.")
@click.option("--diffusion-model", metavar="HUB_ID|FOLDER", help="Stable Diffusion model of the diffusion methods.")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False), default="faceshield-eval",
              help="Folder for report.json, report.html and the protected photos (protected/: a rerun reuses "
              "them and resumes where it stopped).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def evaluate(methods, pairs_dir, targets_dir, n_pairs, n_per_target, judges, surrogates, no_robustness, settings,
             diffusion_model, output, quiet, as_json) -> None:
    """Measure protection the way the literature does: leave-one-out black-box PSR, quality, speed, robustness."""
    from faceshield.eval.protocol import EvalConfig
    from faceshield.eval.protocol import evaluate as run_protocol
    from faceshield.eval.report import to_json, write_report
    from faceshield.methods.base import get_method_class

    from faceshield.fileio import check_writable_folder
    from faceshield.settings import parse_overrides

    check_writable_folder(output, "output folder (-o)")  # before hours of work, not after
    specs = tuple(m.strip() for m in methods.split(",") if m.strip())
    configs = tuple(get_method_class(spec.partition("@")[0]).Config for spec in specs)
    overrides = parse_overrides(configs, settings) if settings else {}
    if diffusion_model:
        overrides["diffusion_model"] = diffusion_model
    config = EvalConfig(
        methods=specs, pairs_dir=pairs_dir,
        targets_dir=None if str(targets_dir) == "none" else targets_dir,
        n_pairs=n_pairs, n_per_target=n_per_target,
        judges=tuple(j.strip() for j in judges.split(",") if j.strip()),
        surrogates=tuple(m.strip() for m in surrogates.split(",") if m.strip()),
        robustness=not no_robustness,
        settings=overrides,  # each method takes the ones it has
        cache_dir=output / "protected",  # an interrupted run resumes at the photo it stopped at
    )
    result = run_protocol(config, progress=not quiet and not as_json)
    result["config"]["command"] = "faceshield " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    json_path, html_path = write_report(result, output)
    if as_json:
        click.echo(to_json(result))
        return
    lines = [f"report: {html_path}  (data: {json_path})"]
    for spec, r in result["methods"].items():
        psr = [v["dodging"]["0.01"] for v in r["judges"].values()]
        q = r["quality"]
        lines.append(f"{spec:<12} dodging PSR@1e-2 {100 * sum(psr) / len(psr):5.1f}%  PSNR {q['psnr']:.1f} dB  "
                     f"SSIM {q['ssim']:.3f}  {q['seconds']:.1f} s/photo")
    click.echo("\n".join(lines))


def _register_serve() -> None:
    from faceshield.cli.serve import serve

    cli.add_command(serve)


_register_serve()


def _register_privacy() -> None:
    from faceshield.cli.privacy import anonymize, evaluate_anonymization, hide, recover

    for command in (anonymize, hide, recover, evaluate_anonymization):
        cli.add_command(command)


_register_privacy()


def _register_customize() -> None:
    from faceshield.cli.customize import attack, evaluate_customization

    cli.add_command(attack)
    cli.add_command(evaluate_customization)


_register_customize()


def _register_map() -> None:
    from faceshield.cli.map import map_group

    cli.add_command(map_group)


_register_map()


def _register_apl() -> None:
    from faceshield.cli.apl import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


_register_apl()


def main() -> None:
    cli(prog_name="faceshield")


if __name__ == "__main__":
    main()
