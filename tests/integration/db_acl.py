"""The checks shared by the MySQL and PostgreSQL ACL-query tests: the same rows, inserted
by each test, must give the same decisions over real MQTT 5 and 3.1.1 clients. The rows:

    deny  all        devices/%c/secret
    allow all        devices/%c/#
    allow subscribe  eq broadcast/#
(and acl_no_match = deny)
"""

from __future__ import annotations

from typing import Any

from tests.integration.clients import V5, V311, Client

NOT_AUTHORIZED = 0x87


def check_acl_rows(b: Any, uid: str, user: str, password: str) -> None:
    cid = f"{uid}dev"
    clients = []
    try:
        c = Client(b, client_id=cid, version=V5)
        clients.append(c)
        c.c.username_pw_set(user, password)
        assert c.connect().reason_code == 0
        assert c.subscribe(f"devices/{cid}/#", qos=1) == [1]
        assert c.subscribe(f"devices/{uid}other/#", qos=1) == [NOT_AUTHORIZED]
        assert c.subscribe(f"devices/{cid}/secret", qos=1) == [NOT_AUTHORIZED]  # deny first
        assert c.subscribe("broadcast/#", qos=1) == [1]  # eq: the filter itself
        assert c.subscribe("broadcast/news", qos=1) == [NOT_AUTHORIZED]
        assert c.publish(f"devices/{cid}/temp", b"21", qos=1) == 0
        assert c.get().payload == b"21"
        assert c.publish(f"devices/{cid}/secret", b"no", qos=1) == NOT_AUTHORIZED
        assert c.publish("broadcast/news", b"no", qos=1) == NOT_AUTHORIZED  # subscribe only
        c.expect_none(0.3)
        # another client id of the same user gets its own %c
        v3 = Client(b, client_id=f"{uid}dev2", version=V311)
        clients.append(v3)
        v3.c.username_pw_set(user, password)
        assert v3.connect().reason_code == 0
        assert v3.subscribe(f"devices/{cid}/#", qos=1) == [0x80]
        assert v3.subscribe(f"devices/{uid}dev2/#", qos=1) == [1]
    finally:
        for c in clients:
            c.close()
