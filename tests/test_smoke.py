def test_healthz_returns_ok(app):
    response = app.get("/healthz")
    assert response.status_int == 200
    assert response.json == {"status": "ok"}
