"""Stripe webhooks: a validly signed body that is not a well-formed event is a 400 and stores nothing."""

import hashlib
import hmac
import json
import time

import pytest

from billing.models import StripeEvent
from tests.billing.test_webhooks import SECRET, URL, event

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def stripe_settings(settings):
    settings.STRIPE_WEBHOOK_SECRET = SECRET


def deliver_raw(client, body: bytes):
    """POST ``body`` exactly as given, with a valid Stripe signature over those bytes."""
    t = int(time.time())
    signature = hmac.new(SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return client.post(
        URL,
        data=body,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=f"t={t},v1={signature}",
    )


def envelope(**changes):
    """A well-formed event with ``changes`` applied (a value of ... removes the key)."""
    body = event("invoice.paid", {"id": "in_1", "customer": "cus_x"}, event_id="evt_garbage")
    for key, value in changes.items():
        if value is ...:
            body.pop(key)
        else:
            body[key] = value
    return json.dumps(body).encode()


def deeply_nested(depth: int) -> bytes:
    head = envelope(data={"object": {"nested": "HOLE"}}).decode()
    return head.replace('"HOLE"', "[" * depth + "]" * depth).encode()


GARBAGE = {
    "empty body": b"",
    "not JSON": b"this is not json",
    "truncated JSON": envelope()[:-5],
    "a JSON array": b"[]",
    "a JSON string": b'"evt_1"',
    "a JSON number": b"42",
    "JSON null": b"null",
    "missing id": envelope(id=...),
    "id not a string": envelope(id=123),
    "id empty": envelope(id=""),
    "id blank": envelope(id="   "),
    "id longer than the column": envelope(id="evt_" + "x" * 252),
    "missing type": envelope(type=...),
    "type not a string": envelope(type=["invoice.paid"]),
    "type longer than the column": envelope(type="x" * 101),
    "missing created": envelope(created=...),
    "created a string": envelope(created="1700000000"),
    "created a boolean": envelope(created=True),
    "created a float": envelope(created=1700000000.5),
    "created negative": envelope(created=-1),
    "created beyond any date": envelope(created=2**63),
    "missing data": envelope(data=...),
    "data a list": envelope(data=[{"object": {}}]),
    "data a string": envelope(data="object"),
    "missing data.object": envelope(data={}),
    "data.object a list": envelope(data={"object": [1, 2]}),
    "data.object a string": envelope(data={"object": "in_1"}),
    "data.object null": envelope(data={"object": None}),
    "NaN in the body": envelope().replace(b'"livemode": false', b'"livemode": NaN'),
    "Infinity in the body": envelope().replace(b'"livemode": false', b'"livemode": -Infinity'),
    "NUL in a string": envelope(data={"object": {"customer": "cus_\u0000x"}}),
    "NUL in a key": envelope(data={"object": {"cus\u0000tomer": "cus_x"}}),
    "lone surrogate": envelope().replace(b'"livemode": false', b'"livemode": "\\ud800"'),
    "not UTF-8": b'{"id": "evt_\xff\xfe"}',
    "nesting deeper than the parser goes": deeply_nested(100_000),
}


@pytest.mark.parametrize("body", GARBAGE.values(), ids=GARBAGE.keys())
def test_signed_garbage_is_refused_with_400_and_nothing_stored(client, body):
    response = deliver_raw(client, body)

    assert response.status_code == 400
    assert response.json()["error"]["code"] in {"invalid_payload", "invalid_signature"}
    assert StripeEvent.objects.count() == 0


def test_garbage_with_a_valid_signature_says_the_payload_is_invalid(client):
    response = deliver_raw(client, envelope(id=...))

    assert response.json()["error"]["code"] == "invalid_payload"
    assert "'id'" in response.json()["error"]["message"]


def test_the_well_formed_envelope_the_table_breaks_is_accepted(client):
    response = deliver_raw(client, envelope())

    assert response.status_code == 200
    assert StripeEvent.objects.get().event_id == "evt_garbage"


def test_a_forged_signature_is_still_an_invalid_signature(client, settings):
    settings.STRIPE_WEBHOOK_SECRET = "whsec_other"

    response = deliver_raw(client, envelope())

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_signature"
    assert StripeEvent.objects.count() == 0
