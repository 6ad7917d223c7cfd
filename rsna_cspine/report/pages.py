"""What the viewer's pages share: the templates and the one way a refusal or failure is answered."""

from __future__ import annotations

from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from fastapi.templating import Jinja2Templates

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))


def wants_json(request: Request) -> bool:
    """The client asked for JSON (the viewer's scripts and API clients), not a page."""
    return "application/json" in request.headers.get("accept", "")


def error_response(request: Request, status: int, message: str) -> Response:
    """A refusal or failure as JSON or as the error page, whichever the client asked for."""
    if wants_json(request):
        return JSONResponse({"error": message}, status_code=status)
    return TEMPLATES.TemplateResponse(request, "error.html", {"status": status, "message": message}, status_code=status)
