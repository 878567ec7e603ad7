"""Secrets tenants give CascadeFlow (callback and webhook signing secrets), encrypted at rest.

Fernet (AES-128-CBC + HMAC-SHA256) from ``cryptography``. Keys come from
``CASCADEFLOW_ENCRYPTION_KEYS`` (comma-separated Fernet keys, newest first, so
keys can be rotated: old ciphertexts still decrypt); without it, one key is
derived from ``SECRET_KEY``.

Invariant: the derived key is as secret as ``SECRET_KEY``, which is never a
constant of the code: production refuses to start without ``DJANGO_SECRET_KEY``
and development generates one per install (``cascadeflow_site.settings``). Changing
``SECRET_KEY`` without ``CASCADEFLOW_ENCRYPTION_KEYS`` makes stored secrets
unreadable: set the old derived key there first to keep them.
"""

import base64
import hashlib
from functools import lru_cache

from cryptography.fernet import Fernet, MultiFernet
from django.conf import settings


@lru_cache(maxsize=1)
def _fernet() -> MultiFernet:
    keys = [k for k in settings.CASCADEFLOW_ENCRYPTION_KEYS if k]
    if not keys:
        digest = hashlib.sha256(b"cascadeflow-secrets:" + settings.SECRET_KEY.encode()).digest()
        keys = [base64.urlsafe_b64encode(digest).decode()]
    return MultiFernet([Fernet(k) for k in keys])


def encrypt(value: str) -> str:
    return _fernet().encrypt(value.encode()).decode() if value else ""


def decrypt(token: str) -> str:
    return _fernet().decrypt(token.encode()).decode() if token else ""
