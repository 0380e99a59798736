"""The API docs pages work offline: every file they load comes from the service itself; and
/healthz reports the limits the web page reads (max_k)."""

import re

import pytest
from fastapi.testclient import TestClient

from jaxretrieval.retriever import Retriever
from jaxretrieval.service.app import ServiceSettings, create_app

MAX_K = 37  # not the default, so that the answer must come from the settings


@pytest.fixture(scope="module")
def client(trained_workdir):
    retriever = Retriever.load(trained_workdir[0])
    settings = ServiceSettings(max_k=MAX_K, allowed_hosts=("testserver",))  # TestClient's Host
    with TestClient(create_app(retriever, settings)) as client:
        yield client
    retriever.close()


def referenced_urls(html):
    """Every URL a page loads: src and href attributes, and Swagger UI's `url: '...'`."""
    return re.findall(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']""", html) + \
        re.findall(r"""\burl:\s*["']([^"']+)["']""", html)


@pytest.mark.parametrize("page, assets", [
    ("/docs", {".js": "javascript", ".css": "text/css", ".svg": "image/svg+xml"}),
    ("/redoc", {".js": "javascript", ".svg": "image/svg+xml"}),
])
def test_docs_pages_load_only_the_services_own_files(client, page, assets):
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith(
        "text/html")
    html = response.text
    # No other host: no absolute URL, and no protocol-relative one.
    assert not re.search(r"https?://|[\"'(]//", html), html
    urls = referenced_urls(html)
    assert "/openapi.json" in urls
    loaded = {}
    for url in urls:
        assert url.startswith("/"), url
        ending = url[url.rfind("."):]
        if ending in assets:
            answer = client.get(url)
            assert answer.status_code == 200, url
            assert len(answer.content) > 100, url
            assert assets[ending] in answer.headers["content-type"], (url, answer.headers)
            loaded[ending] = url
    assert set(loaded) == set(assets), (urls, loaded)  # each kind of asset is referenced


def test_swagger_ui_does_not_ask_the_online_validator(client):
    assert '"validatorUrl": null' in client.get("/docs").text


def test_healthz_reports_max_k_from_the_settings_and_the_schema_documents_it(client):
    health = client.get("/healthz").json()
    assert health["max_k"] == MAX_K
    assert client.post(f"/search?k={MAX_K + 1}", json={"embedding": [1.0]}).status_code == 400
    described = client.get("/openapi.json").json()["paths"]["/healthz"]["get"]["description"]
    assert "max_k" in described and "match_threshold" in described


def test_the_favicon_answers_on_both_paths(client):
    for path in ("/favicon.svg", "/favicon.ico"):
        answer = client.get(path)
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/svg+xml"
        assert answer.text.startswith("<svg")
    assert 'rel="icon" href="/favicon.svg"' in client.get("/").text
