"""Signing a bundle's checksum list in the OpenSSF model-signing format (private-key method: works offline).

`sign(sums, key)` signs the bytes of SHA256SUMS with an elliptic-curve private key (PEM) and gives the
signature file's bytes (a Sigstore bundle with a DSSE envelope, as `model_signing` writes it); the bundle
keeps it as `SHA256SUMS.sig`. `verify(sums, signature, public_key, where)` refuses an unsigned bundle, one
signed with another key, and an altered SHA256SUMS, each in one line (integrity). Since SHA256SUMS holds the
sha256 of every other file, checking the signature over it and then every file against it covers the whole
bundle while the signature itself hashes a few kilobytes. The `model_signing` library is imported only here,
only when a key is given (the `bundle` extra: `pip install 'prestage[bundle]'`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prestage.runner import checksums
from prestage.stages import errors

SIG = checksums.NAME + ".sig"
_EXTRA = "install the `bundle` extra: pip install 'prestage[bundle]' (model-signing)"


def _library():
    try:
        import model_signing
    except ImportError as e:
        raise errors.UsageError(f"signing needs the model-signing library ({e.name} is missing); {_EXTRA}") from None
    return model_signing


def _key(path, flag: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise errors.NotFoundError(f"{flag} {path}: no such key file; pass a PEM elliptic-curve key")
    return p


def sign(sums: bytes, key) -> bytes:
    """The signature (file bytes) of SHA256SUMS content `sums` made with the private key at `key`."""
    key = _key(key, "--sign")
    ms = _library()
    with tempfile.TemporaryDirectory(prefix="prestage-sign-") as tmp:
        target = Path(tmp) / checksums.NAME
        target.write_bytes(sums)
        try:
            ms.signing.Config().use_elliptic_key_signer(private_key=key).sign(target, Path(tmp) / SIG)
        except (ValueError, TypeError) as e:
            msg = " ".join(str(e).split())[:160]
            raise errors.UsageError(
                f"--sign {key}: not a usable elliptic-curve private key ({msg}); pass a PEM EC private key"
            ) from None
        return (Path(tmp) / SIG).read_bytes()


def verify(sums: bytes, signature: bytes | None, public_key, where: str) -> None:
    """IntegrityError unless `signature` is a valid signature of `sums` by the key at `public_key`."""
    key = _key(public_key, "--verify-key")
    if signature is None:
        raise errors.IntegrityError(
            f"{where}: the bundle is not signed (no {SIG}) and --verify-key was given; get a signed bundle"
        )
    ms = _library()
    with tempfile.TemporaryDirectory(prefix="prestage-verify-") as tmp:
        target = Path(tmp) / checksums.NAME
        target.write_bytes(sums)
        (Path(tmp) / SIG).write_bytes(signature)
        try:
            ms.verifying.Config().use_elliptic_key_verifier(public_key=key).verify(target, Path(tmp) / SIG)
        except Exception as e:  # the library raises ValueError, its own and the crypto library's errors
            text = str(e).lower()
            if "signature mismatch" in text or "hash mismatch" in text:
                what = "SHA256SUMS was altered"
            elif "key mismatch" in text:
                what = "signed with another key"
            else:
                what = "signed with another key, or the signature is damaged"
            raise errors.IntegrityError(
                f"{where}: the signature in {SIG} does not verify with {public_key} ({what}); "
                "the bundle cannot be trusted: nothing was placed"
            ) from None
