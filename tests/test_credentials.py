"""Token storage: KeyringStore on a real Secret Service, the fail backend and MemoryStore."""

from __future__ import annotations

import keyring.backends.fail
import pytest
import secretstorage

from app.core.credentials import KeyringStore, MemoryStore
from app.core.errors import CredentialError
from tests.keyring_service import SecretService, secret_service  # noqa: F401  (fixture)

RELAY = "ws://127.0.0.1:8765"
ACCOUNT = "alice"

TOKENS = {
    "backslashes": r"C:\Users\alice\token\\n\0",
    "non_ascii_letters": "Grüße, Ærøskøbing, Ça va, Żółć",
    "cjk": "東京都の鍵 한국어 中文令牌",
    "emoji": "🔑🚀 token 👩🏽‍💻 🇩🇪",
    "quotes": "it's \"quoted\" `and` 'single'",
    "surrounding_spaces": "  leading and trailing spaces  ",
    "long_token": "".join(chr(ord("a") + i % 26) for i in range(4000)),
}


@pytest.fixture
def store(secret_service: SecretService) -> KeyringStore:
    return KeyringStore(secret_service.backend())


@pytest.mark.parametrize("token", TOKENS.values(), ids=TOKENS.keys())
async def test_token_round_trips_exactly(store, secret_service, token):
    await store.set(RELAY, ACCOUNT, token)

    # A second backend instance shows the value came back from the service, not from a cache.
    fresh = KeyringStore(secret_service.backend())
    assert await fresh.get(RELAY, ACCOUNT) == token


async def test_token_stored_in_login_collection(store):
    await store.set(RELAY, ACCOUNT, "token-in-login")

    with secretstorage.dbus_init() as connection:
        collection = secretstorage.get_default_collection(connection)
        items = list(collection.search_items({"service": "Deskbridge", "username": f"{ACCOUNT}@{RELAY}"}))
        secrets = [item.get_secret() for item in items]
        label = collection.get_label()

    assert label == "Login"
    assert secrets == [b"token-in-login"]


async def test_entries_separate_per_account(store):
    await store.set(RELAY, "alice", "token-a")
    await store.set(RELAY, "bob", "token-b")
    await store.set("ws://127.0.0.1:9999", "alice", "token-c")

    assert await store.get(RELAY, "alice") == "token-a"
    assert await store.get(RELAY, "bob") == "token-b"
    assert await store.get("ws://127.0.0.1:9999", "alice") == "token-c"


async def test_set_replaces_previous_token(store):
    await store.set(RELAY, ACCOUNT, "first")
    await store.set(RELAY, ACCOUNT, "second")

    assert await store.get(RELAY, ACCOUNT) == "second"


async def test_missing_entry_returns_none(store):
    assert await store.get(RELAY, "nobody") is None


async def test_delete_then_get_returns_none(store):
    await store.set(RELAY, ACCOUNT, "to-be-deleted")

    await store.delete(RELAY, ACCOUNT)

    assert await store.get(RELAY, ACCOUNT) is None


async def test_delete_missing_entry_succeeds(store):
    await store.delete(RELAY, "nobody")

    assert await store.get(RELAY, "nobody") is None


async def test_secret_service_backend_passes_check(store):
    store.check_backend()

    assert type(store.backend).__module__ == "keyring.backends.SecretService"


@pytest.mark.parametrize("operation", ["get", "set", "delete"])
async def test_fail_backend_names_fix(operation):
    store = KeyringStore(keyring.backends.fail.Keyring())
    call = {
        "get": lambda: store.get(RELAY, ACCOUNT),
        "set": lambda: store.set(RELAY, ACCOUNT, "token"),
        "delete": lambda: store.delete(RELAY, ACCOUNT),
    }[operation]

    with pytest.raises(CredentialError) as caught:
        await call()

    assert "gnome-keyring" in str(caught.value)
    assert "keyring.backends.fail" in str(caught.value)


async def test_memory_store_round_trip():
    store = MemoryStore()

    await store.set(RELAY, ACCOUNT, TOKENS["emoji"])

    assert await store.get(RELAY, ACCOUNT) == TOKENS["emoji"]


async def test_memory_store_missing_and_deleted():
    store = MemoryStore()
    await store.set(RELAY, ACCOUNT, "token")

    await store.delete(RELAY, ACCOUNT)
    await store.delete(RELAY, "nobody")

    assert await store.get(RELAY, ACCOUNT) is None
    assert await store.get(RELAY, "nobody") is None


async def test_memory_store_repr_hides_tokens():
    store = MemoryStore()

    await store.set(RELAY, ACCOUNT, "secret-token-value")

    assert "secret-token-value" not in repr(store)
