"""Validate the by-path networks (ArcFace IR-SE50, FaceNet InceptionResnetV1, BiSeNet face parsing) against their
reference implementations, and derive FaceNet's alignment template.

Fixtures (``python benchmarks/validate_by_path_models.py --refpkgs DIR``, DIR holding the unpacked wheels
``facenet_pytorch-2.6.0`` and ``facexlib-0.3.0`` — ``pip download facenet-pytorch==2.6.0 facexlib==0.3.0 --no-deps``
and unzip): each reference network gets deterministic random weights in its checkpoint's key layout
(:func:`faceshield.models.checkpoint.random_state_dict`, seed :data:`SEED`), runs on fixed seeded inputs, and its
outputs go to ``tests/data/<model>_reference.json`` with the key names, shapes and seed. The references are loaded
from their files with importlib (their packages import torchvision/requests, which we stub). Our networks are run
too and the max abs differences printed; ``tests/test_by_path_models.py`` repeats ours through the users' path.

Template (``--derive-template``): MTCNN (ours: the same P/R/O-net weights and box regression as facenet-pytorch)
on real faces; each face's landmarks mapped into facenet-pytorch's 160×160 crop of the final box (margin 0); the
mean and spread are printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SEED = 1234
INPUT_SEED = 99


def fixed_inputs(batch: int, size: int) -> torch.Tensor:
    """Seeded images ``batch×3×size×size`` in [0, 1]: smooth blobs plus noise (not only white noise)."""
    g = torch.Generator().manual_seed(INPUT_SEED)
    coarse = torch.rand(batch, 3, 8, 8, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, (size, size), mode="bilinear", align_corners=False)
    return (0.8 * smooth + 0.2 * torch.rand(batch, 3, size, size, generator=g)).clamp(0, 1)


def _load_module(name: str, path: Path, package: str | None = None):
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=None)
    module = importlib.util.module_from_spec(spec)
    if package:
        module.__package__ = package
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def references(refpkgs: Path) -> dict:
    """The reference classes, loaded from their files with their package-level imports stubbed."""
    fx = refpkgs / "fx" / "facexlib"
    fn = refpkgs / "fn" / "facenet_pytorch" / "models"
    arcface = _load_module("ref_arcface_arch", fx / "recognition" / "arcface_arch.py")
    pkg = types.ModuleType("ref_parsing")
    pkg.__path__ = [str(fx / "parsing")]
    sys.modules["ref_parsing"] = pkg
    _load_module("ref_parsing.resnet", fx / "parsing" / "resnet.py", "ref_parsing")
    bisenet = _load_module("ref_parsing.bisenet", fx / "parsing" / "bisenet.py", "ref_parsing")
    for stub in ("requests", "requests.adapters"):
        module = types.ModuleType(stub)
        module.HTTPAdapter = object
        sys.modules.setdefault(stub, module)
    fpkg = types.ModuleType("ref_facenet")
    fpkg.__path__ = [str(fn)]
    sys.modules["ref_facenet"] = fpkg
    download = types.ModuleType("ref_facenet.utils.download")
    download.download_url_to_file = None
    sys.modules["ref_facenet.utils"] = types.ModuleType("ref_facenet.utils")
    sys.modules["ref_facenet.utils.download"] = download
    facenet = _load_module("ref_facenet.inception_resnet_v1", fn / "inception_resnet_v1.py", "ref_facenet")
    return {"arcface": arcface.Backbone, "bisenet": bisenet.BiSeNet, "facenet": facenet.InceptionResnetV1}


def cases():
    """(fixture name, our network, checkpoint layout, normalise, input batch, size, output slicer)."""
    from faceshield.faces.parsing import MEAN, STD, BiSeNet
    from faceshield.models.fr.facenet import InceptionResnetV1, checkpoint_layout
    from faceshield.models.fr.ir_se50 import IRSE50

    imagenet = (torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1))
    facenet = InceptionResnetV1()
    return {
        "arcface_ir_se50": (IRSE50(), None, lambda x: (x - 0.5) / 0.5, 2, 112),
        "facenet_vggface2": (facenet, checkpoint_layout(facenet, "vggface2"), lambda x: (x * 255 - 127.5) / 128, 2,
                             160),
        "bisenet_parsing": (BiSeNet(), None, lambda x: (x - imagenet[0]) / imagenet[1], 1, 512),
    }


def parsing_sample(logits: torch.Tensor) -> torch.Tensor:
    """The fixture's part of a ``B×19×512×512`` output: every 32nd pixel from 16 (``B×19×16×16``)."""
    return logits[:, :, 16::32, 16::32]


def build_fixtures(refpkgs: Path) -> None:
    from faceshield.models.checkpoint import random_state_dict

    ref_classes = references(refpkgs)
    DATA.mkdir(parents=True, exist_ok=True)
    for name, (ours, layout, normalise, batch, size) in cases().items():
        layout = layout if layout is not None else ours.state_dict()
        weights = random_state_dict(layout, SEED)
        if name == "arcface_ir_se50":
            ref = ref_classes["arcface"](50, 0.6, "ir_se")
        elif name == "facenet_vggface2":
            ref = ref_classes["facenet"](pretrained=None)
            ref.logits = torch.nn.Linear(512, 8631)  # as pretrained='vggface2' builds it before loading the file
        else:
            ref = ref_classes["bisenet"](19)
        ref_keys = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        ckpt_keys = {k: tuple(v.shape) for k, v in weights.items()}
        assert ref_keys == ckpt_keys, f"{name}: our checkpoint layout differs from the reference's"
        ref.load_state_dict(weights, strict=True)
        ref.eval()
        ours.load_state_dict({k: v for k, v in weights.items() if not k.startswith("logits.")}, strict=True)
        ours.eval()
        x = fixed_inputs(batch, size)
        with torch.no_grad():
            if name == "bisenet_parsing":
                out_ref, out_ours = parsing_sample(ref(normalise(x))[0]), parsing_sample(ours(normalise(x)))
            else:
                out_ref = ref(normalise(x))  # both references L2-normalise in eval
                out_ours = torch.nn.functional.normalize(ours(normalise(x)), dim=1)
        diff = float((out_ref - out_ours).abs().max())
        print(f"{name}: {len(ckpt_keys)} keys, output {tuple(out_ref.shape)}, |ref| max {float(out_ref.abs().max()):.4g}, "
              f"ours vs reference max abs diff {diff:.3g}")
        fixture = {
            "model": name, "seed": SEED, "input_seed": INPUT_SEED, "input_shape": list(x.shape),
            "input_sample": [round(float(v), 7) for v in x.flatten()[:8]],
            "keys": {k: list(s) for k, s in sorted(ckpt_keys.items())},
            "output_shape": list(out_ref.shape),
            "output": [float(f"{v:.7g}") for v in out_ref.flatten().tolist()],
            "reference": {"arcface_ir_se50": "facexlib 0.3.0 recognition/arcface_arch.py Backbone(50, 0.6, 'ir_se')",
                          "facenet_vggface2": "facenet-pytorch 2.6.0 models/inception_resnet_v1.py "
                                              "InceptionResnetV1 (+ logits 8631)",
                          "bisenet_parsing": "facexlib 0.3.0 parsing/bisenet.py BiSeNet(19), main output, "
                                             "pixels [16::32, 16::32]"}[name],
            "ours_max_abs_diff": diff,
        }
        path = DATA / f"{name}_reference.json"
        path.write_text(json.dumps(fixture, separators=(",", ":")))
        print(f"  wrote {path} ({path.stat().st_size / 1e3:.0f} KB)")


def profile() -> None:
    """CPU cost per stage (this process's threads): checkpoint save + load through the users' path, forward of one
    face, forward + backward (what the Diff-Privacy energy costs per step and face), BiSeNet mask of one 512² crop."""
    import tempfile
    import time

    from faceshield.faces.parsing import load_face_parser
    from faceshield.models.checkpoint import random_state_dict
    from faceshield.models.registry import create_fr_model

    def timed(fn, repeat: int = 3) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - start) / repeat * 1e3

    print(f"threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (ours, layout, _, _, size) in cases().items():
            path = Path(tmp) / f"{name}.pth"
            torch.save(random_state_dict(layout if layout is not None else ours.state_dict(), SEED), path)
            start = time.perf_counter()
            if name == "bisenet_parsing":
                parser = load_face_parser(str(path))
                load = time.perf_counter() - start
                with torch.no_grad():
                    forward = timed(lambda: parser(fixed_inputs(1, size)), 2)
                print(f"{name}: file {path.stat().st_size / 1e6:.0f} MB, load {load:.2f} s, mask of one 512² crop "
                      f"{forward:.0f} ms")
                continue
            model = create_fr_model(name.replace("_", "-"), weights=str(path))
            load = time.perf_counter() - start
            x = fixed_inputs(1, size)
            with torch.no_grad():
                forward = timed(lambda: model(x))
            xg = x.clone().requires_grad_(True)
            backward = timed(lambda: torch.autograd.grad(model(xg).sum(), xg))
            print(f"{name}: file {path.stat().st_size / 1e6:.0f} MB, load {load:.2f} s, forward {forward:.0f} ms, "
                  f"forward + backward {backward:.0f} ms (1 face)")


def derive_template(limit: int) -> None:
    import numpy as np

    from faceshield.faces.detect import create_detector, detect_faces
    from faceshield.images import load_image

    shared = Path("/work/shared/data")
    photos = sorted((shared / "celebahq-pairs" / "test").glob("*.png"))[:limit]
    photos += sorted((shared / "vggface2-n000050").glob("set_*/*.png")) + sorted((shared / "targets").glob("*/*.jpg"))
    detector = create_detector("mtcnn")
    points = []
    clipped = 0
    for photo in photos:
        rgb = load_image(photo).rgb
        faces = detect_faces(rgb, detector)
        if not faces:
            continue
        face = faces[0]
        x0, y0, x1, y1 = face.box
        if x0 < 0 or y0 < 0 or x1 > rgb.shape[1] or y1 > rgb.shape[0]:
            clipped += 1  # facenet-pytorch clips such boxes to the photo, which distorts that crop: not the template
            continue
        # facenet-pytorch: int() of the box, crop, resize to 160; pixel centres at integers in both frames.
        bx0, by0, bx1, by1 = int(x0), int(y0), int(x1), int(y1)
        sx, sy = 160 / (bx1 - bx0), 160 / (by1 - by0)
        lm = face.landmarks.astype(np.float64)
        points.append(np.stack([(lm[:, 0] - bx0 + 0.5) * sx - 0.5, (lm[:, 1] - by0 + 0.5) * sy - 0.5], -1))
    points = np.stack(points)
    print(f"{len(points)} faces from {len(photos)} photos ({clipped} boxes crossing the border left out)")
    print("mean template:", [tuple(round(float(v), 4) for v in p) for p in points.mean(0)])
    print("std per point (px):", [tuple(round(float(v), 2) for v in p) for p in points.std(0)])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refpkgs", type=Path, default=Path("/work/refpkgs"))
    parser.add_argument("--derive-template", action="store_true")
    parser.add_argument("--profile", action="store_true", help="CPU cost per stage")
    parser.add_argument("--faces", type=int, default=200, help="CelebA-HQ photos for the template")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.derive_template:
        derive_template(args.faces)
    elif args.profile:
        torch.set_grad_enabled(True)
        profile()
    else:
        build_fixtures(args.refpkgs)
