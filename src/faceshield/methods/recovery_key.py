"""Diff-Privacy's recovery key: everything recovery needs, in one file encrypted and authenticated with a passphrase.

File layout (all integers big-endian)::

    b"FSDPKEY" | version (1 byte) | scrypt log2 N (1) | r (1) | p (1) | salt (16) | nonce (12) | ciphertext

The 39-byte header is the AEAD's associated data, so changing any header byte (version, KDF cost, salt) fails
authentication like a changed ciphertext byte. Key derivation: scrypt (memory-hard; N = 2^15, r = 8, p = 1 by
default, ≈ 32 MB) from ``cryptography``; cipher: AES-256-GCM with a random 96-bit nonce and a random salt per file.
The plaintext is ``len(meta) (4 bytes) | meta JSON | safetensors`` of the tensors (optionally stored as float16).

The public code's "key" was two plain tensor files that anyone holding them could use; here a wrong passphrase, a
changed byte or a truncated file gives one :class:`KeyFileError` line and nothing is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from faceshield.errors import FaceshieldError

MAGIC = b"FSDPKEY"
VERSION = 1
SALT_BYTES, NONCE_BYTES = 16, 12
HEADER = struct.Struct(f">{len(MAGIC)}sBBBB{SALT_BYTES}s{NONCE_BYTES}s")
DEFAULT_LOG2_N, DEFAULT_R, DEFAULT_P = 15, 8, 1
MAX_LOG2_N = 20  # refuse keys that would make us allocate more than ~1 GB in scrypt


class KeyFileError(FaceshieldError):
    """A key that cannot be used: wrong passphrase, altered or truncated file, key of another photo."""


def pixels_sha256(rgb: np.ndarray) -> str:
    """sha256 of a photo's decoded pixels (``H×W×3`` uint8) and shape: binds a key to the published picture, not
    to its metadata (stripping or editing EXIF keeps the key usable, changing a pixel does not)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    digest = hashlib.sha256(struct.pack(">III", *rgb.shape))
    digest.update(rgb.tobytes())
    return digest.hexdigest()


@dataclass
class RecoveryKey:
    """What recovery needs: ``tensors`` (per face: the inverted noise z_T, the 10 bucket tokens, the crop
    geometry) and ``meta`` (model id, scheduler config, steps, strength, sizes, the published photo's hash)."""

    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    def to_bytes(self, half: bool = False) -> bytes:
        from safetensors.torch import save

        stored = {}
        for name, tensor in self.tensors.items():
            tensor = tensor.detach().cpu().contiguous()
            # geometry stays float32/64: a pixel of error there moves the whole pasted face
            stored[name] = tensor.half() if half and tensor.is_floating_point() and not name.endswith(
                ("matrices", "landmarks")) else tensor
        meta = json.dumps({**self.meta, "storage": "float16" if half else "float32"}).encode()
        return struct.pack(">I", len(meta)) + meta + save(stored)

    @classmethod
    def from_bytes(cls, data: bytes) -> "RecoveryKey":
        from safetensors.torch import load

        (n,) = struct.unpack(">I", data[:4])
        meta = json.loads(data[4 : 4 + n].decode())
        tensors = {k: v.float() if v.dtype == torch.float16 else v for k, v in load(data[4 + n :]).items()}
        return cls(tensors, meta)


def _kdf(passphrase: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=32, n=2**log2_n, r=r, p=p).derive(passphrase.encode("utf-8"))


def encrypt_key(key: RecoveryKey, passphrase: str, half: bool = False, log2_n: int = DEFAULT_LOG2_N,
                r: int = DEFAULT_R, p: int = DEFAULT_P) -> bytes:
    """The key file's bytes: header + AES-256-GCM ciphertext of :meth:`RecoveryKey.to_bytes` under a scrypt key."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not passphrase:
        raise KeyFileError("the passphrase is empty; choose one (it is needed again to recover the photo)")
    if not 10 <= log2_n <= MAX_LOG2_N:
        raise KeyFileError(f"scrypt cost 2^{log2_n} is outside 2^10 … 2^{MAX_LOG2_N}")
    salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
    header = HEADER.pack(MAGIC, VERSION, log2_n, r, p, salt, nonce)
    return header + AESGCM(_kdf(passphrase, salt, log2_n, r, p)).encrypt(nonce, key.to_bytes(half), header)


def decrypt_key(data: bytes, passphrase: str, name: str | Path = "key file") -> RecoveryKey:
    """The :class:`RecoveryKey` in a key file's bytes.

    Raises:
        KeyFileError: not a faceshield key, an unknown version, a wrong passphrase or an altered file (one line).
    """
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(data) <= HEADER.size or not data.startswith(MAGIC):
        raise KeyFileError(f"{name}: not a faceshield recovery key (made by `faceshield hide --key-out`)")
    header = data[: HEADER.size]
    _, version, log2_n, r, p, salt, nonce = HEADER.unpack(header)
    if version != VERSION:
        raise KeyFileError(f"{name}: key format version {version}, this faceshield reads version {VERSION}; "
                           f"upgrade faceshield")
    if not 10 <= log2_n <= MAX_LOG2_N or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise KeyFileError(f"{name}: wrong passphrase, or the key file was altered (bad key-derivation header)")
    try:
        plain = AESGCM(_kdf(passphrase, salt, log2_n, r, p)).decrypt(nonce, data[HEADER.size :], header)
    except InvalidTag:
        raise KeyFileError(f"{name}: wrong passphrase, or the key file was altered (authentication failed)") from None
    return RecoveryKey.from_bytes(plain)
