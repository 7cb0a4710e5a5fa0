"""The admin routes (``api/admin.py``) without an admin key configured:
closed to everyone, with an answer that says how to open them."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from api import admin, errors
from broker.settings import Settings


def test_admin_routes_refuse_every_call_while_no_admin_key_is_set() -> None:
    app = FastAPI()
    app.state.settings = Settings(admin_key=None)
    errors.install(app)
    app.include_router(admin.router)
    client = TestClient(app)
    for route, body in (("load_lora_adapter", {"lora_name": "a", "lora_path": "/a"}),
                        ("unload_lora_adapter", {"lora_name": "a"})):
        for headers in ({}, {"Authorization": "Bearer anything"}):
            r = client.post(f"/v1/{route}", json=body, headers=headers)
            assert r.status_code == 403, r.text
            error = r.json()["error"]
            assert error["code"] == "admin_disabled" and "LLMQ_ADMIN_KEY" in error["message"]
            assert set(error) == {"message", "type", "param", "code"}
