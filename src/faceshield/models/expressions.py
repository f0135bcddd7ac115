"""The classes of the ``emotion`` expression model (Human's), in its output order; importable without torch (the
command line's choices)."""

EMOTION_LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
