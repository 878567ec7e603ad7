import pytest
from cryptography.fernet import InvalidToken

from core import crypto


@pytest.fixture
def fresh_keys():
    crypto._fernet.cache_clear()
    yield
    crypto._fernet.cache_clear()


def test_secrets_encrypted_by_one_install_are_unreadable_by_another(settings, fresh_keys):
    settings.CASCADEFLOW_ENCRYPTION_KEYS = []
    settings.SECRET_KEY = "install-one-" + "a" * 40
    ciphertext = crypto.encrypt("whsec_tenant")
    assert crypto.decrypt(ciphertext) == "whsec_tenant"

    settings.SECRET_KEY = "install-two-" + "b" * 40
    crypto._fernet.cache_clear()

    with pytest.raises(InvalidToken):
        crypto.decrypt(ciphertext)


def test_configured_encryption_keys_win_over_the_secret_key(settings, fresh_keys):
    from cryptography.fernet import Fernet

    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.CASCADEFLOW_ENCRYPTION_KEYS = [old]
    ciphertext = crypto.encrypt("whsec_tenant")
    settings.CASCADEFLOW_ENCRYPTION_KEYS = [new, old]
    settings.SECRET_KEY = "changed-" + "c" * 40
    crypto._fernet.cache_clear()

    assert crypto.decrypt(ciphertext) == "whsec_tenant"
