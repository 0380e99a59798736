"""The API docs at `/docs` (Swagger UI) and `/redoc` (ReDoc), and the service's favicon.

FastAPI's own docs pages load Swagger UI and ReDoc from a CDN and are blank without
internet; these pages load the same programs from the files the `fastapi-offline` package
ships, served under `/docs-assets`, so nothing on them leaves the service's host.
"""

from importlib.resources import files

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
FAVICON_URL = "/favicon.svg"
# A magnifying glass on a blue tile: small enough to keep in the source, and SVG so it is
# sharp at every size a browser draws it.
FAVICON_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
    '<rect width="32" height="32" rx="6" fill="#2a6f97"/>'
    '<circle cx="13.5" cy="13.5" r="7" fill="none" stroke="#fff" stroke-width="3"/>'
    '<path d="M19 19l7 7" stroke="#fff" stroke-width="3.5" stroke-linecap="round"/></svg>')

router = APIRouter(include_in_schema=False)


def assets_dir() -> str:
    """The folder holding swagger-ui-bundle.js, swagger-ui.css and redoc.standalone.js."""
    return str(files("fastapi_offline") / "static")


def add_docs_pages(app: FastAPI) -> None:
    """Serves the docs pages, their assets and the favicon (build the app with
    `docs_url=None, redoc_url=None` so that FastAPI's CDN pages do not take the paths)."""
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")
    app.include_router(router)


@router.get("/docs")
async def swagger_ui(request: Request):
    app = request.app
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=root + app.openapi_url, title=f"{app.title} API",
        swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=root + FAVICON_URL,
        # Swagger UI otherwise asks validator.swagger.io about the schema of a non-local host.
        swagger_ui_parameters={**(app.swagger_ui_parameters or {}), "validatorUrl": None})


@router.get("/redoc")
async def redoc(request: Request):
    app = request.app
    root = request.scope.get("root_path", "")
    page = get_redoc_html(
        openapi_url=root + app.openapi_url, title=f"{app.title} API",
        redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=root + FAVICON_URL, with_google_fonts=False)
    # ReDoc's sidebar shows its maker's logo from their CDN (and hides it when it fails):
    # the browser is told not to ask another host for images at all.
    page.headers["content-security-policy"] = "img-src 'self' data:"
    return page


# Browsers ask for /favicon.ico on their own for pages that name no icon (the JSON ones).
@router.get(FAVICON_URL)
@router.get("/favicon.ico")
async def favicon():
    return Response(FAVICON_SVG, media_type="image/svg+xml",
                    headers={"cache-control": "public, max-age=86400"})
